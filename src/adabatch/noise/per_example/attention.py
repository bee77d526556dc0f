"""nn.MultiheadAttention: its projections seen through the module's own forward, no recompute.

The module's weights are bare Parameters used by ``F.multi_head_attention_forward`` through
``F.linear`` (q/k/v in-projections, out-projection), and ``bias_k``/``bias_v`` through
``Tensor.repeat``. Each is a linear map of a known input, so a per-example gradient needs only
that input and the gradient at the map's output. While the module's forward runs, the rule
wraps ``torch.nn.functional.linear`` (a pass-through that records the calls whose weight is
one of this module's parameters; restored when the forward returns or raises) and, after the
forward, finds the ``repeat`` nodes of ``bias_k``/``bias_v`` in the autograd graph. The real
backward then delivers the output-gradients of exactly the forward that ran: dropout masks,
masks, ``need_weights`` and the SDPA path are whatever the forward used, and nothing is
recomputed. Cost: ghost/materialised norms of 2-4 linear maps; memory: the projections' inputs
(autograd holds them anyway).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch import kernels
from adabatch.noise.per_example.base import (
    _acc_dtype,
    _cat_t,
    _Refused,
    _Rule,
)


class _LinearTap:
    """``F.linear`` for the duration of one forward: same result, and the calls are recorded."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        self.params = {id(p) for p in module.parameters()}
        self.storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.orig = F.linear
        self.records: list[tuple[Tensor, Tensor, Tensor | None, Tensor]] = []

    def __call__(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = self.orig(input, weight, bias)
        if weight.untyped_storage().data_ptr() in self.storages:
            self.records.append((input, weight, bias, out))
        return out


@dataclass
class _Piece:
    """A block of rows of one parameter: a linear map (or a bias) of a known input."""

    name: str  # local parameter name
    start: int  # first row of the parameter
    rows: int
    kind: str  # "in" (x [L, B, i]), "out" (x [L*B, i]), "bias_kv" ([1, B, E] output-grad)
    target: int  # index of the grad target (and of the held input, "in"/"out")
    bias: tuple[str, int] | None = None  # (bias name, first row) of the same linear call


def _where_in(p: Tensor, view: Tensor) -> int | None:
    """First row of ``view`` inside parameter ``p``, or None if it is not a view of ``p``."""
    if view.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
        return None
    row = p.stride(0) if p.dim() > 1 else 1
    return (view.storage_offset() - p.storage_offset()) // row


def _repeat_nodes(output: Tensor, leaves: dict[str, Tensor], stop: set) -> dict[str, Any]:
    """The autograd ``repeat`` nodes that read ``bias_k``/``bias_v`` (walk from the output)."""
    found: dict[str, Any] = {}
    want = {id(t): n for n, t in leaves.items()}
    seen, todo = set(), [output.grad_fn]
    while todo and len(found) < len(want):
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in want and "Repeat" in type(node).__name__:
                found[want[id(var)]] = node
            todo.append(nxt)
    return found


class _MultiheadAttentionRule(_Rule):
    kind = "multihead_attention"
    stock = (nn.MultiheadAttention,)
    taps = True  # the probe calls start() before the forward and stop() after it
    _signature = inspect.signature(nn.MultiheadAttention.forward)

    def start(self, module: nn.MultiheadAttention) -> _LinearTap:
        tap = _LinearTap(module)
        F.linear = tap
        return tap

    def stop(self, tap: _LinearTap) -> None:
        F.linear = tap.orig

    def capture(self, module, args, kwargs, where, tap=None, output=None):
        bound = self._signature.bind(module, *args, **kwargs)
        query = bound.arguments["query"]
        if not isinstance(query, Tensor) or query.dim() != 3:
            shape = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise _Refused(f"unbatched query of shape {shape}: no batch dim")
        B = query.shape[where.require(query.shape[:2], 0 if module.batch_first else 1, "query")]
        named = dict(module.named_parameters())
        in_w = [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if named.get(n) is not None]
        pieces: list[_Piece] = []
        captured: dict[str, Any] = {}
        targets: list[Any] = []
        for x, w, b, out in tap.records if tap is not None else ():
            kind = "out" if w is module.out_proj.weight else "in"
            names = ["out_proj.weight"] if kind == "out" else in_w
            hit = next(((n, r) for n in names if (r := _where_in(named[n], w)) is not None), None)
            if hit is None or not out.requires_grad:
                continue
            bias = None
            if b is not None:
                bname = "out_proj.bias" if kind == "out" else "in_proj_bias"
                if named.get(bname) is not None and (r := _where_in(named[bname], b)) is not None:
                    bias = (bname, r)
            k = len(targets)
            pieces.append(_Piece(hit[0], hit[1], w.shape[0], kind, k, bias))
            captured[f"x{k}"] = x
            targets.append(out)
        leaves = {n: named[n] for n in ("bias_k", "bias_v") if named.get(n) is not None}
        if leaves and isinstance(output, Tensor) and output.grad_fn is not None:
            stop = {t.grad_fn for t, p in zip(targets, pieces) if p.kind == "in"}
            for n, node in _repeat_nodes(output, leaves, stop).items():
                pieces.append(_Piece(n, 0, 1, "bias_kv", len(targets)))
                targets.append(node)
        if leaves and {p.name for p in pieces if p.kind == "bias_kv"} != set(leaves):
            raise _Refused("bias_k/bias_v not found in the autograd graph")
        captured["pieces"] = pieces
        captured["_targets"] = targets
        captured["_meta"] = [
            (t.shape, t.dtype, t.device) if isinstance(t, Tensor)
            else ((1, B, module.embed_dim), named[p.name].dtype, named[p.name].device)
            for t, p in zip(targets, pieces)
        ]
        return captured, B, 0

    def compute(self, unit, calls, probe):
        m = unit.module
        names = list(unit.params)
        B = calls[0].batch
        dt = _acc_dtype(*unit.params.values(), *(g for c in calls for g in c.grads))
        device = calls[0].grads[0].device if calls[0].grads else m.out_proj.weight.device
        sq = {n: torch.zeros(B, dtype=dt, device=device) for n in names}
        proj = {n: torch.zeros((), dtype=dt, device=device) for n in names}
        dense = {n: torch.zeros(unit.params[n].shape, dtype=dt, device=device)
                 for n in names if unit.params[n].dim() == 1 or n in ("bias_k", "bias_v")}
        # Per parameter, the pieces of every call as (first row, rows, x [B,T,i], g [B,T,rows]).
        weights: dict[str, list[tuple[int, int, Tensor, Tensor]]] = {}
        biases: dict[str, list[tuple[int, int, Tensor]]] = {}
        kv: dict[str, list[Tensor]] = {}  # bias_k/bias_v: [B, E] per call
        for c in calls:
            for p in c.captured["pieces"]:
                g = c.grads[p.target].to(dt)
                if p.kind == "bias_kv":  # [1, B, E]: example b's gradient is g[0, b]
                    if p.name in sq:
                        kv.setdefault(p.name, []).append(g[0])
                    continue
                x = c.captured[f"x{p.target}"].to(dt)
                if p.kind == "out":  # [L*B, i], rows ordered (l, b)
                    x, g = x.view(-1, B, x.shape[-1]), g.view(-1, B, g.shape[-1])
                x, g = x.movedim(1, 0), g.movedim(1, 0)  # [L, B, .] -> [B, L, .]
                if p.name in sq:
                    weights.setdefault(p.name, []).append((p.start, p.rows, x, g))
                if p.bias is not None and p.bias[0] in sq:
                    biases.setdefault(p.bias[0], []).append((p.bias[1], p.rows, g))
        for n, gs in kv.items():
            total = sum(gs)  # example b's gradient, summed over the calls
            sq[n] = torch.linalg.vecdot(total, total)
            dense[n] += total.sum(0).view_as(dense[n])
        for n, items in weights.items():
            for start, rows, xs, gs in _group(items):
                x, g = _cat_t(xs), _cat_t(gs)
                sq[n] += kernels.linear_sq_norms(
                    x, g, probe.method, max_chunk_elems=probe.max_chunk_elems
                )
                if probe._verify_now:
                    u, v = unit.vecs[n]
                    proj[n] += torch.linalg.vecdot(
                        (g @ u[start : start + rows]).flatten(), (x @ v).flatten()
                    )
        for n, items in biases.items():
            for start, rows, _, gs in _group([(s, r, g, g) for s, r, g in items]):
                g = _cat_t(gs)
                sq[n] += kernels.bias_sq_norms(g)
                dense[n][start : start + rows] += g.sum((0, 1))
        if probe._verify_now:
            for n in dense:
                u, v = unit.vecs[n]
                proj[n] = u @ dense[n].reshape(u.shape[0], -1) @ v
        return {n: (sq[n], proj[n] if probe._verify_now else None) for n in names}


def _group(items: list[tuple[int, int, Tensor, Tensor]]):
    """Pieces of one parameter grouped by row block, for concatenation along T.

    Pieces with the same rows in every call are grouped as they are (a self-attention's one
    [3E] in-projection keeps one Gram matrix); where calls split the rows differently (self-
    then cross-attention), every piece is cut at all the boundaries so each group is one block.
    """
    blocks = sorted({(s, r) for s, r, *_ in items})
    cuts = sorted({s for s, _ in blocks} | {s + r for s, r in blocks})
    if any(s2 < s1 + r1 for (s1, r1), (s2, _) in zip(blocks, blocks[1:])):
        pieces = []
        for s, r, x, g in items:
            inner = [c for c in cuts if s <= c <= s + r]
            for a, b in zip(inner, inner[1:]):
                pieces.append((a, b - a, x, g[..., a - s : b - s]))
        items = pieces
    groups: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}
    for s, r, x, g in items:
        xs, gs = groups.setdefault((s, r), ([], []))
        xs.append(x)
        gs.append(g)
    return [(s, r, xs, gs) for (s, r), (xs, gs) in groups.items()]
