"""Fused Linear weight gradient + per-example squared gradient norms (Triton).

For a Linear layer with inputs ``x[B, T, N_IN]`` and output-grads ``g[B, T, N_OUT]`` the
weight gradient is ``dW = sum_b G_b^T X_b`` and example b's squared gradient norm is
``|G_b^T X_b|_F^2``. The plain dW GEMM already forms ``G_b^T X_b`` implicitly (its K loop runs
over the B*T rows); this kernel only makes the example boundaries visible: each program owns
one (N_OUT, N_IN) output tile and runs its K loop over the rows of a contiguous range of
examples; at every example boundary it squares and sums its register accumulator (this
example's tile of ``G_b^T X_b``) into the example's norm, adds the tile into its running dW
tile and restarts. Per-example gradients never leave registers; the work on top of the dW
GEMM is one square-sum of a BLOCK_O x BLOCK_I tile per example (1/BLOCK_T of the GEMM's
FLOPs, on CUDA cores). Examples shorter than BLOCK_T (>= 16, tl.dot's minimum) are padded
with masked rows: T = 1 spends 16x the GEMM's MACs, cheap at the sizes 2-D layers have.

Design (why split/reduce, no atomics):
- The K loop is flattened over (example, row chunk) pairs, each example padded to whole
  BLOCK_T chunks, so the software pipeline keeps streaming across example boundaries (the
  loop shape of Triton's persistent-matmul tutorial); a nested per-example loop would drain
  and refill the pipeline every example, which costs most at short T (T=128: 2 chunks).
- Norms across tiles: every (tile, example) pair writes one float to a partial buffer
  ``[n_tiles, B]`` (36 x 8 floats at GPT-2's 768x768, B=8), summed by one torch reduction.
  Deterministic, unlike float atomics, and nothing to zero first.
- dW across example splits: when the output tiles alone are too few to fill the GPU (768x768
  in 128x128 tiles is 36 programs for 132 SMs), the examples are split into S contiguous
  ranges: split-K at example boundaries, never inside an example, since the square needs
  the whole per-example sum. Each split stores its fp32 dW tile to ``[S, N_OUT, N_IN]`` and
  one torch sum reduces them; S = 1 stores dW directly. Deterministic (a training gradient
  should not change from run to run), at the price of S x N_OUT x N_IN x 4 bytes written and
  read once more.
- int64 offsets wherever a product of sizes can pass 2^31 (B*T*N_IN elements can).
- bf16/fp16 tiles feed tl.dot directly (tensor cores, fp32 accumulation); fp32 follows
  ``torch.get_float32_matmul_precision()`` ("highest" -> IEEE fp32, else TF32), like the torch
  GEMM it replaces. Under TRITON_INTERPRET, tiles are upcast to fp32 before tl.dot because
  the triton 3.9 interpreter's dot multiplies bf16 as raw uint16 bit patterns; bf16 x bf16
  products are exact in fp32, so the numerics stay those of a tensor-core dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adabatch.kernels._launch import as_3d, check_device, is_interpreted, num_sms

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _linear_norms_kernel(
    x_ptr,
    g_ptr,
    dw_ptr,
    sq_ptr,
    B,
    T,
    N_IN,
    N_OUT,
    stride_xb,
    stride_xt,
    stride_xi,
    stride_gb,
    stride_gt,
    stride_go,
    examples_per_split,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WRITE_DW: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    n_tiles_i = tl.cdiv(N_IN, BLOCK_I)
    pid_o = pid_tile // n_tiles_i
    pid_i = pid_tile % n_tiles_i

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_o = offs_o < N_OUT
    mask_i = offs_i < N_IN
    offs_t = tl.arange(0, BLOCK_T)
    # column offsets inside a row, int64 so that non-contiguous strides cannot overflow
    col_x = offs_i.to(tl.int64) * stride_xi
    col_g = offs_o.to(tl.int64) * stride_go

    chunks_per_example = tl.cdiv(T, BLOCK_T)
    b_start = pid_split * examples_per_split
    b_end = tl.minimum(b_start + examples_per_split, B)
    c_start = b_start * chunks_per_example
    c_end = b_end * chunks_per_example

    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    dw_acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for c in range(c_start, c_end):
        b = c // chunks_per_example
        tc = c - b * chunks_per_example
        t = tc * BLOCK_T + offs_t
        mask_t = t < T
        rows_x = b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt
        rows_g = b.to(tl.int64) * stride_gb + t.to(tl.int64) * stride_gt
        x = tl.load(
            x_ptr + rows_x[:, None] + col_x[None, :],
            mask=mask_t[:, None] & mask_i[None, :],
            other=0.0,
        )
        g = tl.load(
            g_ptr + rows_g[:, None] + col_g[None, :],
            mask=mask_t[:, None] & mask_o[None, :],
            other=0.0,
        )
        acc = tl.dot(
            tl.trans(g.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=PRECISION
        )
        if tc == chunks_per_example - 1:
            # example boundary: acc holds this tile of G_b^T X_b
            partial = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
            tl.store(sq_ptr + pid_tile.to(tl.int64) * B + b, partial)
            if WRITE_DW:
                dw_acc += acc
            acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)

    if WRITE_DW:
        dw_offs = (
            pid_split.to(tl.int64) * N_OUT * N_IN
            + offs_o.to(tl.int64)[:, None] * N_IN
            + offs_i.to(tl.int64)[None, :]
        )
        tl.store(dw_ptr + dw_offs, dw_acc, mask=mask_o[:, None] & mask_i[None, :])










def linear_weight_grad_and_sq_norms(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    write_dw: bool = True,
    block_o: int | None = None,
    block_i: int | None = None,
    block_t: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Return ``(dW[N_OUT, N_IN] or None, sq[B])`` with ``sq[b] = |g_b^T x_b|_F^2`` (float32).

    ``x``: ``[B, T, N_IN]`` (or ``[B, N_IN]``), ``g``: ``[B, T, N_OUT]``; float32, float16 or
    bfloat16 (mixed dtypes are computed in the wider one). ``dW`` is float32 (the caller casts).
    Block sizes, the number of example splits and launch options may be forced (tests and
    benchmarks); by default they follow the heuristics below.
    """
    x3, g3 = as_3d(x, "x"), as_3d(g, "g")
    if x3.shape[:2] != g3.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)} and g {tuple(g.shape)} differ in [B, T]")
    dtype = torch.promote_types(x3.dtype, g3.dtype)
    if dtype not in _TL_DTYPES:
        raise TypeError(f"Triton linear_norms supports float32/float16/bfloat16, got {dtype}")
    check_device(_linear_norms_kernel, x3, g3)
    B, T, N_IN = x3.shape
    N_OUT = g3.shape[-1]
    if B == 0 or T == 0 or N_IN == 0 or N_OUT == 0:
        sq = torch.zeros(B, device=x3.device, dtype=torch.float32)
        dw = torch.zeros((N_OUT, N_IN), device=x3.device, dtype=torch.float32)
        return (dw if write_dw else None), sq
    interpreted = is_interpreted(_linear_norms_kernel)
    wide = dtype == torch.float32
    # 128x128 tiles for 16-bit inputs (the usual tensor-core GEMM tile); fp32 tiles take twice
    # the shared memory per element, so halve K. Not yet tuned on a GPU: see benchmarks/.
    block_o = block_o or max(16, min(128, triton.next_power_of_2(N_OUT)))
    block_i = block_i or max(16, min(128, triton.next_power_of_2(N_IN)))
    block_t = block_t or max(16, min(32 if wide else 64, triton.next_power_of_2(T)))
    n_tiles = triton.cdiv(N_OUT, block_o) * triton.cdiv(N_IN, block_i)
    if splits is None:
        # ~2 programs per SM. At GPT-2's 768x768 (36 tiles of 128x128, B=8, T=1024) S=8 splits
        # add 2 x 8 x 2.4 MB of fp32 partials to 25 MB of bf16 inputs, while 36 programs
        # alone would leave 3/4 of an H200's 132 SMs idle. Untuned: benchmarks/kernels.py
        # --tune times the alternatives.
        splits = min(triton.cdiv(2 * num_sms(x3.device), n_tiles), 16)
    splits = max(1, min(splits, B))
    per_split = triton.cdiv(B, splits)
    splits = triton.cdiv(B, per_split)

    sq_part = torch.empty((n_tiles, B), device=x3.device, dtype=torch.float32)
    dw = (
        torch.empty((splits, N_OUT, N_IN), device=x3.device, dtype=torch.float32)
        if write_dw
        else sq_part  # never written (WRITE_DW=False); any pointer will do
    )
    if interpreted:
        dot_dtype = tl.float32
    else:
        dot_dtype = _TL_DTYPES[dtype]
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    launch = {}
    if num_warps is not None or not interpreted:
        launch["num_warps"] = num_warps or (8 if block_o * block_i >= 128 * 128 else 4)
    if num_stages is not None or not interpreted:
        launch["num_stages"] = num_stages or 3
    _linear_norms_kernel[(n_tiles, splits)](
        x3,
        g3,
        dw,
        sq_part,
        B,
        T,
        N_IN,
        N_OUT,
        *x3.stride(),
        *g3.stride(),
        per_split,
        BLOCK_O=block_o,
        BLOCK_I=block_i,
        BLOCK_T=block_t,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        WRITE_DW=write_dw,
        **launch,
    )
    sq = sq_part.sum(0)
    if not write_dw:
        return None, sq
    return (dw[0] if splits == 1 else dw.sum(0)), sq
