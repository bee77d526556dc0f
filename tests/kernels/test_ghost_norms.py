"""The ghost-norm kernel against the reference and torch.func.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/triton_kernels.py).
"""

import pytest
import torch
from triton_kernels import DEVICE, kernel_module

from adabatch.kernels import reference

ghost_norms = kernel_module("ghost_norms")

ghost = ghost_norms.ghost_sq_norms


def _data(B, T, d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=gen)
    g = torch.randn(B, T, d_out, generator=gen)
    return x.to(DEVICE), g.to(DEVICE)


def _truth(x, g):
    return reference.linear_sq_norms(x.double(), g.double(), "materialize")


def _func_sq_norms(x, g):
    """Per-example weight-gradient norms by torch.func, float64: an independent oracle."""
    w = torch.zeros(g.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)

    def loss(w, xb, gb):
        return (gb * (xb @ w.T)).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x.double(), g.double())
    return grads.square().sum((1, 2))


def _rel(a, truth):
    return ((a.double() - truth).abs() / truth.abs()).max().item()


SHAPES = [
    # (B, T, d_in, d_out, launch options)
    (1, 1, 17, 5, {}),
    (3, 33, 17, 20, {}),
    (4, 1, 33, 9, {}),
    (2, 70, 40, 70, dict(block_t=16, block_k=16)),  # 5 row tiles: 15 tile pairs, masked K
    (1, 200, 5, 3, dict(block_t=16)),  # 13 row tiles: 91 pairs, the triangle index map
]


@pytest.mark.parametrize("B,T,d_in,d_out,opts", SHAPES)
def test_float32_matches_reference_and_torch_func(B, T, d_in, d_out, opts):
    x, g = _data(B, T, d_in, d_out)
    sq = ghost(x, g, **opts)
    assert sq.dtype == torch.float32 and sq.shape == (B,)
    torch.testing.assert_close(sq.double(), _truth(x, g), rtol=1e-4, atol=0)
    torch.testing.assert_close(sq.double(), _func_sq_norms(x, g), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,d_in,d_out,opts", [SHAPES[1], SHAPES[3]])
def test_half_inputs_accumulate_in_float32(B, T, d_in, d_out, opts, dtype):
    x, g = _data(B, T, d_in, d_out, seed=1)
    xh, gh = x.to(dtype), g.to(dtype)
    sq = ghost(xh, gh, **opts)
    assert sq.dtype == torch.float32
    # the half inputs are read exactly and accumulated in float32 ...
    torch.testing.assert_close(sq.double(), _truth(xh, gh), rtol=1e-4, atol=0)
    # ... so against the float64 truth of the unrounded data, the error is no worse than 2x
    # that of the same quantity computed by torch in the half dtype (ghost form)
    xx = torch.bmm(xh, xh.transpose(1, 2))
    gg = torch.bmm(gh, gh.transpose(1, 2))
    sq_torch = (xx * gg).sum((1, 2))
    truth = _truth(x, g)
    assert _rel(sq, truth) <= 2 * _rel(sq_torch, truth) + 1e-6


def test_strided_mixed_and_two_dim_inputs():
    B, T, d_in, d_out = 3, 19, 17, 20
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, d_in, generator=gen).to(DEVICE).transpose(0, 1)
    g = torch.randn(B, d_out, T, generator=gen).to(DEVICE).transpose(1, 2)
    assert not x.is_contiguous() and not g.is_contiguous()
    sq = ghost(x, g.to(torch.float16))
    torch.testing.assert_close(sq.double(), _truth(x, g.to(torch.float16)), rtol=1e-4, atol=0)
    sq2 = ghost(x[:, 0], g[:, 0])  # [B, d] inputs: T = 1, |x|^2 |g|^2
    expected = x[:, 0].double().square().sum(1) * g[:, 0].double().square().sum(1)
    torch.testing.assert_close(sq2.double(), expected, rtol=1e-4, atol=0)


def test_empty_and_bad_inputs():
    x, g = _data(2, 3, 4, 5)
    assert ghost(x[:0], g[:0]).shape == (0,)
    assert torch.equal(ghost(x[:, :0], g[:, :0]), torch.zeros(2, device=DEVICE))
    with pytest.raises(TypeError, match="float64"):
        ghost(x.double(), g.double())
    with pytest.raises(ValueError, match=r"differ in \[B, T\]"):
        ghost(x, g[:, :2])
