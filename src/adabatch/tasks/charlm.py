"""Character-level language model on the Python standard library's own source.

Nothing is downloaded: the corpus is the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (``site-packages``/``dist-packages`` excluded), read in
sorted order up to a byte budget. Tokens are raw bytes (vocabulary 256), so any file
decodes. Files go to train or validation by a hash of their relative path, so the split
does not depend on the budget or on the order files are found in.

The model is a small causal transformer built only from layers the per-example probes
cover (``nn.Embedding``, ``nn.Linear``, ``nn.LayerNorm``), with an untied output head.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from adabatch.tasks.common import (
    OptimizerName,
    TaskData,
    TaskModule,
    check_fraction,
    check_positive,
)

VOCAB_SIZE = 256
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_corpus(
    root: str | Path | None = None, max_bytes: int | None = None
) -> list[tuple[str, bytes]]:
    """``(relative path, content)`` of the ``.py`` files under ``root``, sorted, within budget.

    Files are taken in sorted order of their relative POSIX path until ``max_bytes`` is
    reached; the last file is truncated to fit. ``root`` defaults to the stdlib.
    """
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root={str(root)!r} is not a directory")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune, don't filter
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                paths.append((path.relative_to(root).as_posix(), path))
    paths.sort()
    files, total = [], 0
    for rel, path in paths:
        if max_bytes is not None and total >= max_bytes:
            break
        data = path.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        if data:
            files.append((rel, data))
            total += len(data)
    if not files:
        raise ValueError(f"no .py files found under corpus root={str(root)!r}")
    return files


def is_val_file(rel_path: str, val_fraction: float) -> bool:
    """Deterministic split by file: md5 of the relative path, independent of budget/order."""
    h = int.from_bytes(hashlib.md5(rel_path.encode()).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


class WindowDataset(Dataset):
    """Fixed windows of a byte stream: item i is ``(x [T], y [T])`` with ``y`` shifted by one.

    Args:
        tokens: 1-D uint8 tensor.
        offsets: start of each window; each needs ``context + 1`` tokens.
        context: window length T.
    """

    def __init__(self, tokens: Tensor, offsets: Tensor, context: int) -> None:
        if offsets.numel() and int(offsets.max()) + context + 1 > tokens.numel():
            raise ValueError("a window runs past the end of the token stream")
        self.tokens = tokens
        self.offsets = offsets
        self.context = context

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        o = int(self.offsets[i])
        w = self.tokens[o : o + self.context + 1].long()
        return w[:-1], w[1:]


class CharLMData(TaskData):
    """Byte-level windows of stdlib source, split into train/validation by file.

    The training set holds ``len(train bytes) // context`` windows at random offsets drawn
    once with ``seed`` (one epoch sees about every byte once); the DataLoader shuffles them.
    Validation uses up to ``max_val_windows`` evenly spaced windows. ``test`` uses the
    validation split.

    Args:
        batch_size: micro-batch per rank.
        context: tokens per window (T).
        max_bytes: byte budget over all files, in sorted path order.
        val_fraction: fraction of files (by path hash) held out for validation.
        max_val_windows: cap on validation windows (keeps validation fast).
        root: corpus directory; defaults to the interpreter's stdlib.
        num_workers: DataLoader workers.
        resizable: a resizable training loader (see `TaskData`), for ``adabatch.resize:
            sampler|auto``.
        seed: seed of the training window offsets (and of the resizable sampler).

    Example::

        >>> dm = CharLMData(batch_size=4, context=16, max_bytes=20_000)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), bool((x[:, 1:] == y[:, :-1]).all())
        ((4, 16), True)
    """

    def __init__(
        self,
        batch_size: int = 32,
        context: int = 64,
        max_bytes: int = 2_000_000,
        val_fraction: float = 0.1,
        max_val_windows: int = 512,
        root: str | None = None,
        num_workers: int = 0,
        resizable: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, resizable=resizable,
                         seed=seed)
        check_positive("context", context)
        check_positive("max_bytes", max_bytes)
        check_positive("max_val_windows", max_val_windows)
        check_fraction("val_fraction", val_fraction)
        self.context = context
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction
        self.max_val_windows = max_val_windows
        self.root = root

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = read_corpus(self.root, self.max_bytes)
        train = [data for rel, data in files if not is_val_file(rel, self.val_fraction)]
        val = [data for rel, data in files if is_val_file(rel, self.val_fraction)]
        need = self.context + 1
        if not train or not val or sum(map(len, val)) < need or sum(map(len, train)) < need:
            raise ValueError(
                f"max_bytes={self.max_bytes} with val_fraction={self.val_fraction} leaves "
                f"{len(train)} train / {len(val)} validation files; each split needs at "
                f"least one file and context + 1 = {need} bytes: raise max_bytes"
            )
        train_tokens = _tokens(train)
        val_tokens = _tokens(val)
        n_train = max(1, (train_tokens.numel() - 1) // self.context)
        g = torch.Generator().manual_seed(self.seed)
        offsets = torch.randint(0, train_tokens.numel() - need + 1, (n_train,), generator=g)
        self.train_set = WindowDataset(train_tokens, offsets, self.context)
        n_val = min(self.max_val_windows, (val_tokens.numel() - 1) // self.context)
        val_offsets = torch.linspace(0, val_tokens.numel() - need, n_val).long()
        self.val_set = WindowDataset(val_tokens, val_offsets, self.context)


def _tokens(chunks: list[bytes]) -> Tensor:
    # bytearray: torch.frombuffer wants a writable buffer; uint8 keeps 1 byte per token.
    return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).clone()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``nn.Linear`` q/k/v/out projections.

    Separate Linears (not ``nn.MultiheadAttention``, whose packed projection is a bare
    Parameter) so the per-example probes cover every weight; the attention itself is
    parameter-free (``scaled_dot_product_attention``).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(z: Tensor) -> Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                           is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.proj = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class CharLM(TaskModule):
    """A small causal transformer over bytes, trained with next-byte cross-entropy.

    Args:
        d_model: width.
        n_layers: transformer blocks.
        n_heads: attention heads (must divide ``d_model``).
        context: longest sequence the position table covers (the data's context must not
            exceed it).
        mlp_ratio: hidden width of the MLP over ``d_model``.
        lr, optimizer, momentum, weight_decay, betas: see `TaskModule`.

    Example::

        >>> m = CharLM(d_model=32, n_layers=1, n_heads=2, context=8)
        >>> x = torch.randint(0, 256, (3, 8))
        >>> tuple(m(x).shape)
        (3, 8, 256)
    """

    def __init__(
        self,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        context: int = 64,
        mlp_ratio: int = 4,
        lr: float = 2e-3,
        optimizer: OptimizerName = "adamw",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
    ) -> None:
        super().__init__(lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, betas=betas)
        for name, value in [("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads),
                            ("context", context), ("mlp_ratio", mlp_ratio)]:
            check_positive(name, value)
        self.save_hyperparameters()
        self.context = context
        self.tok = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
        self.apply(_init_weights)
        for block in self.blocks:  # GPT-2: residual projections scaled by depth
            for proj in (block.attn.out, block.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context={self.context}")
        # Positions as a [B, T] index (not [T]) so the embedding probe sees one row per example.
        pos = torch.arange(t, device=x.device).expand(b, t)
        h = self.tok(x) + self.pos(pos)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self(x)
        # Mean over all tokens = mean over examples of each example's mean (equal lengths).
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
