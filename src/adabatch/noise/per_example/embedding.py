"""nn.Embedding: ``sum_{t,s}[x_t = x_s] g_t.g_s``, ``padding_idx`` positions excluded."""

from __future__ import annotations

from torch import nn

from adabatch import kernels
from adabatch.noise.per_example.base import _acc_dtype, _cat_t, _first_arg, _Refused, _Rule


class _EmbeddingRule(_Rule):
    kind = "embedding"
    stock = (nn.Embedding,)

    def refuse(self, module):
        if module.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True divides gradients by batch-wide token counts, so a "
                "per-example gradient is not defined"
            )
        return super().refuse(module)

    def capture(self, module, args, kwargs, where):
        ids = _first_arg(args, kwargs, "input")
        if ids.dim() < 1:
            raise _Refused("a 0-dim index has no batch dim")
        d = where.pick(ids.shape, "indices")
        return {"ids": ids if d == 0 else ids.movedim(d, 0)}, ids.shape[d], d

    def compute(self, unit, calls, probe):
        m = unit.module
        B, d = calls[0].batch, m.embedding_dim
        ids = _cat_t([c.captured["ids"].reshape(B, -1) for c in calls])
        dt = _acc_dtype(*(c.grads[0] for c in calls))
        g = _cat_t([c.grads[0].reshape(B, -1, d).to(dt) for c in calls])
        sq = kernels.embedding_sq_norms(
            ids, g, m.padding_idx, max_chunk_elems=probe.max_chunk_elems
        )
        proj = None
        if probe._verify_now:
            u, v = unit.vecs["weight"]
            terms = u[ids] * (g @ v)
            if m.padding_idx is not None:
                terms = terms.masked_fill(ids == m.padding_idx, 0)
            proj = terms.sum()
        return {"weight": (sq, proj)}
