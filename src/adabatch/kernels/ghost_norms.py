"""Ghost per-example squared gradient norms of a Linear layer (Triton).

``|G_b^T X_b|_F^2 = <X_b X_b^T, G_b G_b^T> = sum_{t,s} (x_t . x_s) (g_t . g_s)`` for
``x[B, T, N_IN]``, ``g[B, T, N_OUT]``: ~2 T^2 (N_IN + N_OUT) FLOPs per example instead of
2 T N_IN N_OUT, the cheaper choice when T (N_IN + N_OUT) <= N_IN N_OUT. The T x T Gram
matrices never reach memory: one program owns one BLOCK_T x BLOCK_T tile pair (r, c) of one
example, builds its tile of X X^T (K loop over N_IN) and of G G^T (K loop over N_OUT) in
registers, and reduces their elementwise product to one float.

Design:
- Symmetry: both Gram matrices are symmetric, so only tiles with c <= r are computed and the
  off-diagonal ones count twice, halving the FLOPs. The lower triangle is enumerated
  directly (tile index p -> (r, c) by an integer square root), so no program starts idle.
- Programs are ordered example-major: the n_pairs programs of one example run together and
  share its X_b and G_b (T (N_IN + N_OUT) elements) in L2.
- Reduction: every (example, tile pair) writes one float to a partial buffer
  ``[B, n_pairs]`` (n_pairs = 528 at T=2048, BLOCK_T=64) summed by one torch reduction:
  deterministic, no atomics, no zero-init.
- int64 offsets; fp32 accumulation; 16-bit tiles feed tl.dot directly; fp32 follows
  ``torch.get_float32_matmul_precision()``; upcast to fp32 under TRITON_INTERPRET (the
  triton 3.9 interpreter's dot reads bf16 as raw uint16), see ``linear_norms.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adabatch.kernels._launch import as_3d, check_device, is_interpreted

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _gram_tile(
    base_ptr,
    rows_r,
    rows_c,
    mask_r,
    mask_c,
    D,
    stride_d,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile (r, c) of A A^T for one example: rows ``rows_r`` times rows ``rows_c``."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < D
        cols = k.to(tl.int64) * stride_d
        a_r = tl.load(
            base_ptr + rows_r[:, None] + cols[None, :],
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        )
        a_c = tl.load(
            base_ptr + rows_c[:, None] + cols[None, :],
            mask=mask_c[:, None] & mask_k[None, :],
            other=0.0,
        )
        acc = tl.dot(
            a_r.to(DOT_DTYPE), tl.trans(a_c.to(DOT_DTYPE)), acc, input_precision=PRECISION
        )
    return acc


@triton.jit
def _ghost_norms_kernel(
    x_ptr,
    g_ptr,
    out_ptr,
    T,
    N_IN,
    N_OUT,
    stride_xb,
    stride_xt,
    stride_xi,
    stride_gb,
    stride_gt,
    stride_go,
    n_pairs,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_pairs
    p = pid - b * n_pairs
    # p -> (r, c), c <= r, p = r (r + 1) / 2 + c; the float root is fixed up by one step
    r = ((tl.sqrt(8.0 * p.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
    r = tl.where(r * (r + 1) // 2 > p, r - 1, r)
    r = tl.where((r + 1) * (r + 2) // 2 <= p, r + 1, r)
    c = p - r * (r + 1) // 2

    t_r = r * BLOCK_T + tl.arange(0, BLOCK_T)
    t_c = c * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_r = t_r < T
    mask_c = t_c < T

    xx = _gram_tile(
        x_ptr + b * stride_xb,
        t_r * stride_xt,
        t_c * stride_xt,
        mask_r,
        mask_c,
        N_IN,
        stride_xi,
        BLOCK_T,
        BLOCK_K,
        DOT_DTYPE,
        PRECISION,
    )
    gg = _gram_tile(
        g_ptr + b * stride_gb,
        t_r * stride_gt,
        t_c * stride_gt,
        mask_r,
        mask_c,
        N_OUT,
        stride_go,
        BLOCK_T,
        BLOCK_K,
        DOT_DTYPE,
        PRECISION,
    )
    partial = tl.sum(tl.sum(xx * gg, axis=1), axis=0)
    partial = tl.where(r == c, partial, 2.0 * partial)
    tl.store(out_ptr + pid, partial)








def ghost_sq_norms(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    block_t: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Return ``sq[B]`` (float32), ``sq[b] = <x_b x_b^T, g_b g_b^T>``.

    ``x``: ``[B, T, N_IN]`` (or ``[B, N_IN]``), ``g``: ``[B, T, N_OUT]``; float32, float16 or
    bfloat16 (mixed dtypes are computed in the wider one).
    """
    x3, g3 = as_3d(x, "x"), as_3d(g, "g")
    if x3.shape[:2] != g3.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)} and g {tuple(g.shape)} differ in [B, T]")
    dtype = torch.promote_types(x3.dtype, g3.dtype)
    if dtype not in _TL_DTYPES:
        raise TypeError(f"Triton ghost_norms supports float32/float16/bfloat16, got {dtype}")
    check_device(_ghost_norms_kernel, x3, g3)
    B, T, N_IN = x3.shape
    N_OUT = g3.shape[-1]
    interpreted = is_interpreted(_ghost_norms_kernel)
    # 64 x 64 Gram tiles: two fp32 accumulators of 16 KB each stay in registers; not yet tuned
    # on a GPU (see benchmarks/kernels.py).
    block_t = block_t or max(16, min(64, triton.next_power_of_2(T)))
    block_k = block_k or max(16, min(64, triton.next_power_of_2(max(N_IN, N_OUT))))
    n_t = triton.cdiv(T, block_t)
    n_pairs = n_t * (n_t + 1) // 2
    out = torch.empty((B, n_pairs), device=x3.device, dtype=torch.float32)
    if B * n_pairs == 0:
        return torch.zeros(B, device=x3.device, dtype=torch.float32)
    dot_dtype = tl.float32 if interpreted else _TL_DTYPES[dtype]
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    launch = {}
    if num_warps is not None or not interpreted:
        launch["num_warps"] = num_warps or 4
    if num_stages is not None or not interpreted:
        launch["num_stages"] = num_stages or 3
    _ghost_norms_kernel[(B * n_pairs,)](
        x3,
        g3,
        out,
        T,
        N_IN,
        N_OUT,
        *x3.stride(),
        *g3.stride(),
        n_pairs,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        **launch,
    )
    return out.sum(1)
