"""Which dim of a captured tensor is the batch: the step's batch size, batch_first flags, memory.

``_Where.pick`` resolves one call; ``_layout_hint`` reads the ``batch_first`` of the stock
``nn.Transformer*`` module a layer sits in (at ``attach()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adabatch.noise.per_example.base import _Refused


@dataclass(eq=False)
class _Where:
    """What a rule needs to find the batch dim of one call.

    ``batch_size``: the step's micro-batch size, if the caller told the probe; ``hint``: the
    batch dim implied by a ``batch_first`` flag (the module's own, or that of the stock
    ``nn.Transformer*`` module it sits in); ``memo``: the dim resolved for this (module, call
    index) on an earlier, unambiguous pass.
    """

    batch_size: int | None
    hint: int | None
    memo: dict[int, int]
    index: int

    def pick(self, lead: tuple[int, ...] | torch.Size, what: str = "input") -> int:
        """The batch dim among the leading dims ``lead`` of a captured tensor; `_Refused` if
        no dim, or more than one with nothing to tell them apart, can be the batch."""
        lead = tuple(lead)
        if not lead:
            raise _Refused(f"unbatched {what}: no batch dim")
        n = self.batch_size
        if self.hint is not None:
            if self.hint >= len(lead):
                raise _Refused(f"{what} of leading shape {lead} has no batch dim {self.hint}")
            if n is not None and lead[self.hint] != n:
                raise _Refused(
                    f"{what} of leading shape {lead}: dim {self.hint} (from batch_first) has "
                    f"size {lead[self.hint]}, not the batch size {n}"
                )
            return self.hint
        if n is None:
            return 0  # not told the batch size: the documented contract, dim 0
        dims = [d for d, size in enumerate(lead) if size == n]
        if len(dims) == 1:
            self.memo[self.index] = dims[0]
            return dims[0]
        if not dims:
            raise _Refused(f"no leading dim of the {what} {lead} has the batch size {n}")
        known = self.memo.get(self.index)
        if known in dims:
            return known
        raise _Refused(
            f"ambiguous layout: dims {dims} of the {what} {lead} all have the batch size {n} "
            "and no batch_first attribute tells them apart"
        )

    def require(self, lead: tuple[int, ...] | torch.Size, dim: int, what: str = "input") -> int:
        """A layout with a fixed batch dim: check its size against the known batch size."""
        lead = tuple(lead)
        if len(lead) <= dim:
            raise _Refused(f"unbatched {what} of leading shape {lead}: no batch dim")
        if self.batch_size is not None and lead[dim] != self.batch_size:
            raise _Refused(
                f"{what} of leading shape {lead}: dim {dim} has size {lead[dim]}, not the "
                f"batch size {self.batch_size}"
            )
        return dim


_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_TRANSFORMER_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)


def _batch_first_of(m: nn.Module) -> bool | None:
    """The layout a stock nn.Transformer* module passes to its submodules, or None."""
    for base in (*_TRANSFORMER_LAYERS, *_TRANSFORMER_STACKS, nn.Transformer):
        if isinstance(m, base):
            if type(m).forward is not base.forward or "forward" in m.__dict__:
                return None  # a user forward may transpose: no hint
            if isinstance(m, _TRANSFORMER_LAYERS):
                return m.self_attn.batch_first
            if isinstance(m, _TRANSFORMER_STACKS):  # its forward reads layers[0].self_attn
                attn = getattr(m.layers[0], "self_attn", None) if len(m.layers) else None
                return getattr(attn, "batch_first", None)
            return m.batch_first
    return None


def _layout_hint(model: nn.Module, name: str) -> int | None:
    """Batch dim of the module ``name`` from the stock nn.Transformer* module it sits in.

    The walk up stops at the first ancestor that is neither a stock transformer module nor
    an ``nn.ModuleList``: a user module in between (e.g. a custom layer in an
    ``nn.TransformerEncoder``) may transpose, so its submodules get no hint.
    """
    parts = name.split(".") if name else []
    for k in range(len(parts) - 1, -1, -1):
        anc = model.get_submodule(".".join(parts[:k]))
        bf = _batch_first_of(anc)
        if bf is not None:
            return 0 if bf else 1
        if not isinstance(anc, nn.ModuleList):
            return None
    return None
