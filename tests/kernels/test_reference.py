"""kernels/reference.py against brute-force per-example loops and plain autograd (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adabatch import kernels
from adabatch.kernels import reference as R

F64 = torch.float64


def _brute_linear(x, g):
    return torch.stack([(g[b].T @ x[b]).square().sum() for b in range(x.shape[0])])


def _brute_embedding(ids, g, padding_idx):
    out = []
    for b in range(ids.shape[0]):
        same = (ids[b][:, None] == ids[b][None, :]).to(g.dtype)
        if padding_idx is not None:
            keep = (ids[b] != padding_idx).to(g.dtype)
            same = same * keep[:, None] * keep[None, :]
        out.append((same * (g[b] @ g[b].T)).sum())
    return torch.stack(out)


SHAPES = [(1, 1, 3, 2), (4, 1, 5, 7), (3, 7, 5, 3), (2, 9, 1, 4), (5, 4, 6, 6)]


@pytest.mark.parametrize("B,T,i,o", SHAPES)
@pytest.mark.parametrize("budget", [1, 37, R.DEFAULT_CHUNK_ELEMS])
def test_ghost_materialize_simultaneous_agree(B, T, i, o, budget):
    gen = torch.Generator().manual_seed(B * 100 + T)
    x = torch.randn(B, T, i, dtype=F64, generator=gen)
    g = torch.randn(B, T, o, dtype=F64, generator=gen)
    expected = _brute_linear(x, g)
    for method in ("ghost", "materialize", "auto"):
        got = R.linear_sq_norms(x, g, method, max_chunk_elems=budget)
        assert got.dtype == F64 and got.shape == (B,)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    dw, sq = R.linear_weight_grad_and_sq_norms(x, g, max_chunk_elems=budget)
    torch.testing.assert_close(sq, expected, rtol=1e-10, atol=0)
    # The simultaneous dW is the weight gradient autograd computes for a summed loss.
    w = torch.randn(o, i, dtype=F64, generator=gen, requires_grad=True)
    F.linear(x, w).backward(g)
    torch.testing.assert_close(dw, w.grad, rtol=1e-10, atol=1e-12)


def test_auto_picks_the_cheaper_method():
    assert R.choose_method(T=2, i=8, o=8) == "ghost"  # 2*16 = 32 <= 64
    assert R.choose_method(T=4, i=8, o=8) == "ghost"  # 4*16 = 64 <= 64: the tie is ghost
    assert R.choose_method(T=5, i=8, o=8) == "materialize"  # 80 > 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_accumulates_in_float32(dtype):
    x = torch.randn(3, 5, 4).to(dtype)
    g = torch.randn(3, 5, 6).to(dtype)
    exact = _brute_linear(x.double(), g.double())
    for method in ("ghost", "materialize"):
        got = R.linear_sq_norms(x, g, method)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)
    dw, sq = R.linear_weight_grad_and_sq_norms(x, g)
    assert dw.dtype == sq.dtype == torch.float32
    assert R.bias_sq_norms(g).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in R.norm_affine_sq_norms(g, g))
    assert R.embedding_sq_norms(torch.zeros(3, 5, dtype=torch.long), g).dtype == torch.float32


def test_bias_and_norm_affine():
    gen = torch.Generator().manual_seed(0)
    xhat = torch.randn(4, 3, 5, dtype=F64, generator=gen)
    g = torch.randn(4, 3, 5, dtype=F64, generator=gen)
    w_sq, b_sq = R.norm_affine_sq_norms(xhat, g, max_chunk_elems=7)
    torch.testing.assert_close(w_sq, (xhat * g).sum(1).square().sum(1))
    torch.testing.assert_close(b_sq, g.sum(1).square().sum(1))
    torch.testing.assert_close(R.bias_sq_norms(g), b_sq)


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
@pytest.mark.parametrize("B,T,V,d", [(1, 1, 4, 3), (3, 9, 4, 5), (2, 6, 2, 1)])
def test_embedding_matches_pairwise_formula(padding_idx, B, T, V, d):
    gen = torch.Generator().manual_seed(T)
    ids = torch.randint(0, V, (B, T), generator=gen)
    g = torch.randn(B, T, d, dtype=F64, generator=gen)
    expected = _brute_embedding(ids, g, padding_idx)
    for budget in (1, R.DEFAULT_CHUNK_ELEMS):
        got = R.embedding_sq_norms(ids, g, padding_idx, max_chunk_elems=budget)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_embedding_matches_autograd_weight_gradient():
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[1, 1, 2, 0, 1], [0, 0, 0, 0, 0]])
    g = torch.randn(2, 5, 3, dtype=F64, generator=gen)
    expected = []
    for b in range(2):
        w = torch.randn(4, 3, dtype=F64, requires_grad=True)
        F.embedding(ids[b], w, padding_idx=0).backward(g[b])
        expected.append(w.grad.square().sum())
    torch.testing.assert_close(R.embedding_sq_norms(ids, g, 0), torch.stack(expected))


def test_dispatch_serves_the_reference_on_cpu_float64():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, dtype=F64, generator=gen)
    g = torch.randn(2, 3, 4, dtype=F64, generator=gen)
    ids = torch.randint(0, 3, (2, 3), generator=gen)
    torch.testing.assert_close(kernels.linear_sq_norms(x, g), R.linear_sq_norms(x, g))
    torch.testing.assert_close(
        kernels.linear_weight_grad_and_sq_norms(x, g), R.linear_weight_grad_and_sq_norms(x, g)
    )
    torch.testing.assert_close(kernels.bias_sq_norms(g), R.bias_sq_norms(g))
    torch.testing.assert_close(kernels.norm_affine_sq_norms(x, g), R.norm_affine_sq_norms(x, g))
    torch.testing.assert_close(
        kernels.embedding_sq_norms(ids, g, 1), R.embedding_sq_norms(ids, g, 1)
    )


def test_empty_batch():
    x, g = torch.zeros(0, 3, 2), torch.zeros(0, 3, 4)
    assert R.linear_sq_norms(x, g, "ghost").shape == (0,)
    assert R.linear_sq_norms(x, g, "materialize").shape == (0,)
    assert R.embedding_sq_norms(torch.zeros(0, 3, dtype=torch.long), g).shape == (0,)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: R.linear_sq_norms(torch.ones(2, 3, 4), torch.ones(2, 3, 5), "fast"), "'fast'"),
        (lambda: R.linear_sq_norms(torch.ones(2, 4), torch.ones(2, 5)), r"shape=\(2, 4\)"),
        (lambda: R.linear_sq_norms(torch.ones(2, 3, 4), torch.ones(2, 2, 5)), r"\(2, 2, 5\)"),
        (lambda: R.linear_sq_norms(torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 5)),
         "torch.int64"),
        (lambda: R.linear_sq_norms(torch.ones(1, 1, 1), torch.ones(1, 1, 1), max_chunk_elems=0),
         "max_chunk_elems=0"),
        (lambda: R.embedding_sq_norms(torch.ones(2, 3), torch.ones(2, 3, 4)), "torch.float32"),
        (lambda: R.embedding_sq_norms(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, 4)),
         r"ids.shape=\(2, 3\)"),
        (lambda: R.embedding_sq_norms(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, 4),
                                      padding_idx=1.5), "padding_idx=1.5"),
        (lambda: R.norm_affine_sq_norms(torch.ones(2, 3, 4), torch.ones(2, 3, 5)), r"\(2, 3, 5\)"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()
