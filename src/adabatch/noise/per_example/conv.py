"""nn.Conv1d/2d/3d: im2col, then each group is the Linear case.

Stride, padding incl. ``"same"`` and non-zero padding modes, dilation, groups: the input is
unfolded (T = output positions, C*K/groups features per group, memory T*C*K per example,
processed in chunks of examples).
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


def _unfold(x: Tensor, m: nn.modules.conv._ConvNd) -> Tensor:
    """im2col for any spatial rank: [c, C, *S] -> [c, T, C * prod(kernel)] (channel-major)."""
    pad = m._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, pad, mode=mode)
    n = len(m.kernel_size)
    for d, (k, s, dil) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
        x = x.unfold(2 + d, (k - 1) * dil + 1, s)  # window appended as the last dim
        if dil > 1:
            x = x[..., ::dil]
    c, C = x.shape[:2]
    perm = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    return x.permute(perm).reshape(c, -1, C * math.prod(m.kernel_size))


class _ConvRule(_Rule):
    kind = "conv"
    stock = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def capture(self, module, args, kwargs, where):
        x = _first_arg(args, kwargs, "input")
        if x.dim() != module.weight.dim():
            raise _Refused(f"unbatched input of shape {tuple(x.shape)}: no batch dim")
        where.require(x.shape[:1], 0)  # [N, C, *spatial]: the batch is dim 0
        return {"x": x}, x.shape[0], 0

    def compute(self, unit, calls, probe):
        m = unit.module
        B, G = calls[0].batch, m.groups
        n_out = m.out_channels
        dt = _acc_dtype(*(c.captured["x"] for c in calls), *(c.grads[0] for c in calls))
        K = math.prod(m.kernel_size)
        T_total = sum(c.grads[0][0].numel() // n_out for c in calls)
        step = max(1, probe.max_chunk_elems // max(1, T_total * m.in_channels * K))
        want_w, want_b = "weight" in unit.params, "bias" in unit.params
        w_sq = torch.empty(B, dtype=dt, device=m.weight.device)
        b_sq = torch.empty(B, dtype=dt, device=m.weight.device)
        w_proj = torch.zeros((), dtype=dt, device=m.weight.device)
        b_total = torch.zeros(n_out, dtype=dt, device=m.weight.device)
        for s in range(0, B, step):
            xs, gs = [], []
            for c in calls:
                xs.append(_unfold(c.captured["x"][s : s + step].to(dt), m))
                g = c.grads[0][s : s + step].to(dt)
                gs.append(g.reshape(g.shape[0], n_out, -1).transpose(1, 2))
            x, g = _cat_t(xs), _cat_t(gs)  # [c, T, C*K], [c, T, n_out]
            n, T = x.shape[:2]
            if want_w:
                xg = x.view(n, T, G, -1).transpose(1, 2).reshape(n * G, T, -1)
                gg = g.view(n, T, G, -1).transpose(1, 2).reshape(n * G, T, -1)
                sq = kernels.linear_sq_norms(
                    xg, gg, probe.method, max_chunk_elems=probe.max_chunk_elems
                )
                w_sq[s : s + n] = sq.view(n, G).sum(1)
                if probe._verify_now:
                    u, v = unit.vecs["weight"]
                    gu = torch.einsum("ntgo,go->ntg", g.view(n, T, G, -1), u.view(G, -1))
                    w_proj += torch.linalg.vecdot(gu.flatten(), (x.view(n, T, G, -1) @ v).flatten())
            if want_b:
                b_sq[s : s + n] = kernels.bias_sq_norms(g)
                b_total += g.sum((0, 1))
        out = {}
        if want_w:
            out["weight"] = (w_sq, w_proj if probe._verify_now else None)
        if want_b:
            proj = _proj_dense(unit.vecs["bias"], b_total) if probe._verify_now else None
            out["bias"] = (b_sq, proj)
        return out
