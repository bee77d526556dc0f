"""The fused dW + per-example norm kernel against the reference and torch.func.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/triton_kernels.py).
"""

import pytest
import torch
from triton_kernels import DEVICE, kernel_module

from adabatch.kernels import reference

linear_norms = kernel_module("linear_norms")

fused = linear_norms.linear_weight_grad_and_sq_norms


def _data(B, T, d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=gen)
    g = torch.randn(B, T, d_out, generator=gen)
    return x.to(DEVICE), g.to(DEVICE)


def _truth(x, g):
    return reference.linear_weight_grad_and_sq_norms(x.double(), g.double())


def _func_grads(x, g):
    """Per-example weight gradients by torch.func, float64: an oracle independent of ours."""
    w = torch.zeros(g.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)

    def loss(w, xb, gb):
        return (gb * (xb @ w.T)).sum()

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x.double(), g.double())


def _rel(a, truth):
    return ((a.double() - truth).abs() / truth.abs()).max().item()


def _rel_fro(a, truth):
    return ((a.double() - truth).norm() / truth.norm()).item()


SHAPES = [
    # (B, T, d_in, d_out, launch options)
    (1, 1, 17, 5, {}),
    (3, 33, 17, 20, {}),
    (2, 1, 8, 16, {}),
    (4, 5, 33, 9, {}),
    (2, 130, 9, 7, {}),  # several row chunks per example
    (5, 33, 40, 70, dict(block_o=32, block_i=16, block_t=16, splits=2)),  # 3x3 tiles, masked
    (7, 17, 24, 40, dict(block_o=16, block_i=16, block_t=16, splits=3)),  # uneven splits
]


@pytest.mark.parametrize("B,T,d_in,d_out,opts", SHAPES)
def test_float32_matches_reference_and_torch_func(B, T, d_in, d_out, opts):
    x, g = _data(B, T, d_in, d_out)
    dw, sq = fused(x, g, **opts)
    assert dw.dtype == sq.dtype == torch.float32
    assert dw.shape == (d_out, d_in) and sq.shape == (B,)
    dw_ref, sq_ref = _truth(x, g)
    torch.testing.assert_close(sq.double(), sq_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-4, atol=1e-4)
    per_example = _func_grads(x, g)
    torch.testing.assert_close(sq.double(), per_example.square().sum((1, 2)), rtol=1e-4, atol=0)
    torch.testing.assert_close(dw.double(), per_example.sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,d_in,d_out,opts", [SHAPES[1], SHAPES[4], SHAPES[5]])
def test_half_inputs_accumulate_in_float32(B, T, d_in, d_out, opts, dtype):
    x, g = _data(B, T, d_in, d_out, seed=1)
    xh, gh = x.to(dtype), g.to(dtype)
    dw, sq = fused(xh, gh, **opts)
    assert dw.dtype == sq.dtype == torch.float32
    # the half inputs are read exactly and accumulated in float32 ...
    dw_half_truth, sq_half_truth = _truth(xh, gh)
    torch.testing.assert_close(sq.double(), sq_half_truth, rtol=1e-4, atol=0)
    # ... so against the float64 truth of the unrounded data, the error is no worse than 2x
    # that of the same quantity computed by torch in the half dtype
    dw_truth, sq_truth = _truth(x, g)
    per_example = torch.bmm(gh.transpose(1, 2), xh)
    sq_torch = per_example.square().sum((1, 2))
    dw_torch = gh.flatten(0, 1).T @ xh.flatten(0, 1)
    assert _rel(sq, sq_truth) <= 2 * _rel(sq_torch, sq_truth) + 1e-6
    assert _rel_fro(dw, dw_truth) <= 2 * _rel_fro(dw_torch, dw_truth) + 1e-6


def test_norms_only_and_two_dim_input():
    x, g = _data(6, 1, 17, 5)
    dw, sq = fused(x[:, 0], g[:, 0])  # [B, d] inputs mean T = 1
    none, sq_only = fused(x, g, write_dw=False, splits=2)
    assert none is None
    dw_ref, sq_ref = _truth(x, g)
    torch.testing.assert_close(sq.double(), sq_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(sq_only.double(), sq_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-4, atol=1e-4)


def test_strided_and_mixed_dtype_inputs():
    B, T, d_in, d_out = 3, 19, 17, 20
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, d_in, generator=gen).to(DEVICE).transpose(0, 1)  # batch-inner
    g = torch.randn(B, d_out, T, generator=gen).to(DEVICE).transpose(1, 2)  # o is the strided dim
    assert not x.is_contiguous() and not g.is_contiguous()
    dw, sq = fused(x, g.to(torch.bfloat16), splits=2)
    dw_ref, sq_ref = _truth(x, g.to(torch.bfloat16))
    torch.testing.assert_close(sq.double(), sq_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-4, atol=1e-4)


def test_empty_and_bad_inputs():
    x, g = _data(2, 3, 4, 5)
    dw, sq = fused(x[:0], g[:0])
    assert sq.shape == (0,) and torch.equal(dw, torch.zeros(5, 4, device=DEVICE))
    dw, sq = fused(x[:, :0], g[:, :0])
    assert torch.equal(sq, torch.zeros(2, device=DEVICE))
    with pytest.raises(TypeError, match="float64"):
        fused(x.double(), g.double())
    with pytest.raises(ValueError, match=r"differ in \[B, T\]"):
        fused(x, g[:, :2])
