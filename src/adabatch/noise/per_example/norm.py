"""LayerNorm, RMSNorm, GroupNorm, eval-mode BatchNorm: ``|sum_t xhat_t g_t|^2``, ``|sum_t g_t|^2``.

``xhat`` is recomputed from the captured input with the module's eps (one extra
normalisation, ~T*d): cheaper than holding a second copy of the activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch import kernels
from adabatch.noise.per_example.base import (
    _acc_dtype,
    _cat_t,
    _first_arg,
    _proj_dense,
    _Refused,
    _Rule,
)


class _NormRule(_Rule):
    """LayerNorm / RMSNorm / GroupNorm: recompute xhat, then |sum_t xhat*g|^2, |sum_t g|^2."""

    kind = "norm"
    stock = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)

    def capture(self, module, args, kwargs, where):
        x = _first_arg(args, kwargs, "input")
        lead = 1 if isinstance(module, nn.GroupNorm) else len(module.normalized_shape)
        if x.dim() <= lead:
            raise _Refused(f"unbatched input of shape {tuple(x.shape)}: no batch dim")
        if isinstance(module, nn.GroupNorm):  # [N, C, *]: the batch is dim 0
            return {"x": x}, x.shape[where.require(x.shape[:1], 0)], 0
        d = where.pick(x.shape[:-lead])
        return {"x": x if d == 0 else x.movedim(d, 0)}, x.shape[d], d

    @staticmethod
    def xhat_and_layout(m: nn.Module, x: Tensor, g: Tensor, dt: torch.dtype):
        """Normalised input and output-grad, both as [B, T, d] with d the affine dims."""
        B = x.shape[0]
        xf = x.to(dt)
        # torch's own kernels without the affine part give xhat exactly as the forward did
        # (and ~6x faster on CPU than var_mean + arithmetic).
        if isinstance(m, nn.GroupNorm):
            C = x.shape[1]
            xhat = F.group_norm(xf, m.num_groups, None, None, m.eps)
            layout = (B, C, -1)
            return xhat.reshape(layout).transpose(1, 2), g.to(dt).reshape(layout).transpose(1, 2)
        if isinstance(m, nn.RMSNorm):
            # eps=None means finfo(input dtype).eps: the dtype the forward saw, not dt.
            eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            xhat = F.rms_norm(xf, m.normalized_shape, None, eps)
        else:
            xhat = F.layer_norm(xf, m.normalized_shape, None, None, m.eps)
        d = math.prod(m.normalized_shape)
        return xhat.reshape(B, -1, d), g.to(dt).reshape(B, -1, d)

    def compute(self, unit, calls, probe):
        m = unit.module
        dt = _acc_dtype(*(c.captured["x"] for c in calls), *(c.grads[0] for c in calls))
        pairs = [self.xhat_and_layout(m, c.captured["x"], c.grads[0], dt) for c in calls]
        xhat = _cat_t([p[0] for p in pairs])
        g = _cat_t([p[1] for p in pairs])
        w_sq, b_sq = kernels.norm_affine_sq_norms(xhat, g, max_chunk_elems=probe.max_chunk_elems)
        out = {}
        if "weight" in unit.params:
            proj = None
            if probe._verify_now:
                u, v = unit.vecs["weight"]
                r = torch.outer(u, v).flatten()
                proj = torch.linalg.vecdot(xhat.flatten(), (g * r).flatten())
            out["weight"] = (w_sq, proj)
        if "bias" in unit.params:
            proj = _proj_dense(unit.vecs["bias"], g.sum((0, 1))) if probe._verify_now else None
            out["bias"] = (b_sq, proj)
        return out



def _uses_batch_stats(m: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether this BatchNorm normalises with the batch's statistics (as its forward decides)."""
    return m.training or (m.running_mean is None and m.running_var is None)


class _BatchNormRule(_Rule):
    """BatchNorm with running statistics (eval mode): a per-example affine map.

    ``xhat = (x - running_mean) / sqrt(running_var + eps)`` per channel, then the norm rule.
    In batch-statistics mode (train mode) a BatchNorm couples the examples of a batch; the
    probe detects that separately and marks every parameter uncovered (see ``coupled``).
    """

    kind = "batch_norm"
    stock = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

    def refuse_call(self, module):
        if _uses_batch_stats(module):
            return "normalises with batch statistics (train mode): examples are coupled"
        return None

    def capture(self, module, args, kwargs, where):
        x = _first_arg(args, kwargs, "input")
        if x.dim() < 2:
            raise _Refused(f"unbatched input of shape {tuple(x.shape)}: no batch dim")
        return {"x": x}, x.shape[where.require(x.shape[:1], 0)], 0

    def compute(self, unit, calls, probe):
        m = unit.module
        dt = _acc_dtype(*(c.captured["x"] for c in calls), *(c.grads[0] for c in calls))
        xs, gs = [], []
        for c in calls:
            x, g = c.captured["x"].to(dt), c.grads[0].to(dt)
            B, C = x.shape[:2]
            shape = (1, C) + (1,) * (x.dim() - 2)
            mean = m.running_mean.to(dt).view(shape)
            inv = torch.rsqrt(m.running_var.to(dt) + m.eps).view(shape)
            xs.append(((x - mean) * inv).reshape(B, C, -1).transpose(1, 2))
            gs.append(g.reshape(B, C, -1).transpose(1, 2))
        xhat, g = _cat_t(xs), _cat_t(gs)
        w_sq, b_sq = kernels.norm_affine_sq_norms(xhat, g, max_chunk_elems=probe.max_chunk_elems)
        out = {}
        if "weight" in unit.params:
            proj = None
            if probe._verify_now:
                u, v = unit.vecs["weight"]
                proj = torch.linalg.vecdot(xhat.flatten(), (g * (u * v)).flatten())
            out["weight"] = (w_sq, proj)
        if "bias" in unit.params:
            proj = _proj_dense(unit.vecs["bias"], g.sum((0, 1))) if probe._verify_now else None
            out["bias"] = (b_sq, proj)
        return out
