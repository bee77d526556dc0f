"""The fused LayerNorm/RMSNorm affine norm kernel against the reference and torch.func.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/triton_kernels.py).
"""

import pytest
import torch
from triton_kernels import DEVICE, kernel_module

from adabatch.kernels import reference

norm_affine_norms = kernel_module("norm_affine_norms")

norms = norm_affine_norms.norm_affine_sq_norms


def _data(B, T, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xhat = torch.randn(B, T, D, generator=gen)
    g = torch.randn(B, T, D, generator=gen)
    return xhat.to(DEVICE), g.to(DEVICE)


def _truth(xhat, g):
    return reference.norm_affine_sq_norms(xhat.double(), g.double())


def _rel(a, truth):
    return ((a.double() - truth).abs() / truth.abs()).max().item()


SHAPES = [
    # (B, T, D, launch options)
    (1, 1, 17, {}),
    (3, 33, 17, {}),
    (4, 1, 9, {}),
    (2, 70, 300, dict(block_t=16, block_d=16)),  # 19 column blocks, masked rows and columns
    (2, 1023, 24, {}),
]


@pytest.mark.parametrize("B,T,D,opts", SHAPES)
def test_float32_matches_reference(B, T, D, opts):
    xhat, g = _data(B, T, D)
    w_sq, b_sq = norms(xhat, g, **opts)
    assert w_sq.dtype == b_sq.dtype == torch.float32 and w_sq.shape == b_sq.shape == (B,)
    w_ref, b_ref = _truth(xhat, g)
    torch.testing.assert_close(w_sq.double(), w_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(b_sq.double(), b_ref, rtol=1e-4, atol=0)
    none, b_only = norms(None, g, **opts)  # bias-only (a Linear bias)
    assert none is None
    torch.testing.assert_close(b_only.double(), b_ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_matches_torch_func_per_example_grads(norm):
    B, T, D = 3, 33, 17
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(DEVICE)
    g = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(DEVICE)
    if norm == "layer":
        module = torch.nn.LayerNorm(D, dtype=torch.float64, device=DEVICE)
        xhat = torch.nn.functional.layer_norm(x, (D,), eps=module.eps)
    else:
        module = torch.nn.RMSNorm(D, eps=1e-6, dtype=torch.float64, device=DEVICE)
        xhat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    params = dict(module.named_parameters())

    def loss(p, xb, gb):
        return (gb * torch.func.functional_call(module, p, (xb,))).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, g)
    w_sq, b_sq = norms(xhat.float(), g.float())
    torch.testing.assert_close(w_sq.double(), grads["weight"].square().sum(1), rtol=1e-4, atol=0)
    if norm == "layer":
        torch.testing.assert_close(b_sq.double(), grads["bias"].square().sum(1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,D,opts", [SHAPES[1], SHAPES[3]])
def test_half_inputs_accumulate_in_float32(B, T, D, opts, dtype):
    xhat, g = _data(B, T, D, seed=1)
    xh, gh = xhat.to(dtype), g.to(dtype)
    w_sq, b_sq = norms(xh, gh, **opts)
    assert w_sq.dtype == b_sq.dtype == torch.float32
    w_half, b_half = _truth(xh, gh)
    torch.testing.assert_close(w_sq.double(), w_half, rtol=1e-4, atol=0)
    torch.testing.assert_close(b_sq.double(), b_half, rtol=1e-4, atol=0)
    # vs the float64 truth of the unrounded data: no worse than 2x torch in the half dtype
    w_truth, b_truth = _truth(xhat, g)
    w_torch = (xh * gh).sum(1).square().sum(1)
    b_torch = gh.sum(1).square().sum(1)
    assert _rel(w_sq, w_truth) <= 2 * _rel(w_torch, w_truth) + 1e-6
    assert _rel(b_sq, b_truth) <= 2 * _rel(b_torch, b_truth) + 1e-6


def test_strided_two_dim_empty_and_bad_inputs():
    B, T, D = 3, 19, 17
    gen = torch.Generator().manual_seed(2)
    xhat = torch.randn(T, B, D, generator=gen).to(DEVICE).transpose(0, 1)
    g = torch.randn(B, D, T, generator=gen).to(DEVICE).transpose(1, 2)
    w_sq, b_sq = norms(xhat, g)
    w_ref, b_ref = _truth(xhat, g)
    torch.testing.assert_close(w_sq.double(), w_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(b_sq.double(), b_ref, rtol=1e-4, atol=0)
    w2, b2 = norms(xhat[:, 0], g[:, 0])  # [B, d]: T = 1
    torch.testing.assert_close(w2.double(), _truth(xhat[:, :1], g[:, :1])[0], rtol=1e-4, atol=0)
    w0, b0 = norms(xhat[:0], g[:0])
    assert w0.shape == b0.shape == (0,)
    wt, bt = norms(xhat[:, :0], g[:, :0])
    assert torch.equal(wt, torch.zeros(B, device=DEVICE)) and torch.equal(bt, wt)
    with pytest.raises(TypeError, match="float64"):
        norms(xhat.double(), g.double())
    with pytest.raises(ValueError, match="differ"):
        norms(xhat, g[:, :2])
