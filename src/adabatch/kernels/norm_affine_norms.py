"""LayerNorm / RMSNorm affine per-example squared gradient norms, fused (Triton).

For normalised inputs ``xhat[B, T, d]`` and output-grads ``g[B, T, d]``, example ``b``'s
weight gradient is ``sum_t xhat_t * g_t`` and its bias gradient ``sum_t g_t``; the kernel
returns ``|.|^2`` of both from one read of (xhat, g). With ``xhat=None`` it computes only the
bias term, which is also the bias norm of a Linear layer (``bias_sq_norms``).

Design: one program per (example, BLOCK_D columns) runs down the example's T rows, keeping
BLOCK_T x BLOCK_D fp32 partial sums (independent adds, folded once at the end), then squares
its column sums and writes one float per term to a ``[2, B, n_d]`` buffer (bias; weight),
summed by one torch reduction: deterministic, no atomics, one extra launch. T is not split:
the square needs the whole column sum, and a split would cost a second pass. BLOCK_D shrinks
(down to 16) until B x n_d gives ~2 programs per SM; the T loop then streams the 2 B T d
elements once, which is all the op must read (at GPT-2 sizes it is launch-bound anyway).
int64 row offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adabatch.kernels._launch import as_3d, check_device, is_interpreted, num_sms

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _norm_affine_norms_kernel(
    xhat_ptr,
    g_ptr,
    out_ptr,
    B,
    T,
    D,
    stride_xb,
    stride_xt,
    stride_xd,
    stride_gb,
    stride_gt,
    stride_gd,
    HAS_XHAT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_d = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_t = tl.arange(0, BLOCK_T)
    col_g = offs_d.to(tl.int64) * stride_gd
    col_x = offs_d.to(tl.int64) * stride_xd

    acc_w = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + offs_t).to(tl.int64)
        mask = (t < T)[:, None] & mask_d[None, :]
        g = tl.load(
            g_ptr + b * stride_gb + t[:, None] * stride_gt + col_g[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        acc_b += g
        if HAS_XHAT:
            x = tl.load(
                xhat_ptr + b * stride_xb + t[:, None] * stride_xt + col_x[None, :],
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            acc_w += x * g

    col_b = tl.sum(acc_b, axis=0)
    tl.store(out_ptr + b * n_d + pid_d, tl.sum(col_b * col_b, axis=0))
    if HAS_XHAT:
        col_w = tl.sum(acc_w, axis=0)
        tl.store(out_ptr + (B + b) * n_d + pid_d, tl.sum(col_w * col_w, axis=0))










def norm_affine_sq_norms(
    xhat: torch.Tensor | None,
    g: torch.Tensor,
    *,
    block_t: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Return ``(w_sq[B] or None, b_sq[B])`` (float32) for ``xhat, g: [B, T, d]``.

    ``w_sq[b] = |sum_t xhat_bt * g_bt|^2``, ``b_sq[b] = |sum_t g_bt|^2``; ``xhat=None``
    skips the weight term (bias-only layers). float32, float16 or bfloat16 inputs.
    """
    g3 = as_3d(g, "g")
    x3 = g3 if xhat is None else as_3d(xhat, "xhat")
    if x3.shape != g3.shape:
        raise ValueError(f"xhat {tuple(x3.shape)} and g {tuple(g3.shape)} differ")
    for t in (x3, g3):
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"Triton norm_affine_norms supports float32/float16/bfloat16, got {t.dtype}"
            )
    check_device(_norm_affine_norms_kernel, x3, g3)
    B, T, D = g3.shape
    interpreted = is_interpreted(_norm_affine_norms_kernel)
    if block_d is None:
        # widest column block (<= 128) that still gives ~2 programs per SM
        block_d = max(16, min(128, triton.next_power_of_2(D)))
        while block_d > 16 and B * triton.cdiv(D, block_d) < 2 * num_sms(g3.device):
            block_d //= 2
    block_t = block_t or max(1, min(4096 // block_d, triton.next_power_of_2(max(T, 1))))
    n_d = triton.cdiv(D, block_d)
    # [bias; weight] partials, every entry written by the kernel
    out = torch.empty((1 + (xhat is not None), B, n_d), device=g3.device, dtype=torch.float32)
    if B == 0 or D == 0:
        out.zero_()
    else:
        launch = {}
        if num_warps is not None or not interpreted:
            launch["num_warps"] = num_warps or 4
        _norm_affine_norms_kernel[(B, n_d)](
            x3,
            g3,
            out,
            B,
            T,
            D,
            *x3.stride(),
            *g3.stride(),
            HAS_XHAT=xhat is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            **launch,
        )
    sums = out.sum(-1)
    return (None if xhat is None else sums[1]), sums[0]
