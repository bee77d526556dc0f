"""`reduce_step_stats` and `big_batch_sq_norm`: the callback's measurement maths, directly.

Oracles are hand-computed values and the pooled statistics of all ranks' small batches.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adabatch.noise.step_stats import (
    SKIP_MISMATCH,
    SKIP_NO_NORMS,
    SKIP_NO_SMALL_BATCH,
    big_batch_sq_norm,
    reduce_step_stats,
)


def _stats(small, **kw):
    defaults = dict(per_example=True, local_samples=len(small), local_batches=1,
                    big_sq=torch.tensor(0.5, dtype=torch.float64), accumulation=1,
                    elapsed=0.1, world_size=1)
    defaults.update(kw)
    return reduce_step_stats(torch.as_tensor(small, dtype=torch.float32), **defaults)


def test_per_example_step():
    s = _stats([1.0, 2.0, 6.0])
    assert (s.small_sq, s.count, s.b, s.big_sq, s.samples) == (3.0, 3.0, 1.0, 0.5, 3.0)
    assert s.skip is None and s.finite and s.step_time == pytest.approx(0.1)


def test_microbatch_step_b_is_the_mean_micro_batch():
    # 4 micro-batches of 4 examples each, accumulation 4: b = 4, not 1 (nor 16)
    s = _stats([1.0, 2.0, 3.0, 6.0], per_example=False, local_samples=16, local_batches=4,
               accumulation=4)
    assert (s.small_sq, s.b, s.samples, s.big_sq) == (3.0, 4.0, 16.0, 0.5)
    assert s.skip is None


def test_short_accumulation_window_rescales_the_big_gradient():
    # k = 4 but only 2 micro-batches: .grad = (g1 + g2) / 4, the big batch is (g1 + g2) / 2,
    # so |g_B|^2 = (4/2)^2 |.grad|^2: a square, not a single factor
    s = _stats([1.0, 1.0], per_example=False, local_samples=8, local_batches=2,
               accumulation=4, big_sq=torch.tensor(0.25, dtype=torch.float64))
    assert s.big_sq == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("small", "kw", "reason"),
    [
        ([], {"local_samples": 4}, SKIP_NO_NORMS),  # e.g. a compiled module: hooks never fire
        ([1.0, 2.0], {"local_samples": 4}, SKIP_MISMATCH),  # per-example: 2 norms, 4 samples
        ([1.0], {"per_example": False, "local_samples": 4, "local_batches": 2}, SKIP_MISMATCH),
        ([1.0], {"per_example": False, "local_samples": 4, "local_batches": 1},
         SKIP_NO_SMALL_BATCH),  # one micro-batch is the whole batch: b = B
        ([1.0], {"local_samples": 1}, SKIP_NO_SMALL_BATCH),  # per-example with B = 1
    ],
)
def test_unmeasurable_steps_say_why(small, kw, reason):
    s = _stats(small, **kw)
    assert s.skip == reason
    assert s.finite  # the gradients are finite: a decision may still be taken


def test_non_finite_is_reported_not_skipped():
    s = _stats([1.0, math.nan])
    assert s.skip is None and not s.finite


def _two_ranks(rank_inputs, **common):
    """Run reduce_step_stats on every simulated rank with an all-reduce that sums payloads."""
    payloads = []
    for small, kw in rank_inputs:
        reduce_step_stats(torch.tensor(small), **common, **kw,
                          all_reduce_fn=lambda t: payloads.append(t.clone()))
    total = torch.stack(payloads).sum(0)
    return [reduce_step_stats(torch.tensor(small), **common, **kw,
                              all_reduce_fn=lambda t: total.clone())
            for small, kw in rank_inputs]


def test_ranks_pool_their_small_batches_and_agree():
    common = dict(per_example=False, big_sq=torch.tensor(2.0, dtype=torch.float64),
                  accumulation=2, world_size=2)
    r0, r1 = _two_ranks([([1.0, 3.0], dict(local_samples=6, local_batches=2, elapsed=0.2)),
                         ([5.0, 7.0], dict(local_samples=6, local_batches=2, elapsed=0.4))],
                        **common)
    assert r0 == r1
    assert (r0.small_sq, r0.count, r0.b, r0.samples, r0.batches) == (4.0, 4.0, 3.0, 12.0, 4.0)
    assert r0.step_time == pytest.approx(0.3)


def test_step_time_needs_every_rank():
    common = dict(per_example=True, big_sq=torch.tensor(1.0, dtype=torch.float64),
                  accumulation=1, world_size=2, local_batches=1)
    r0, _ = _two_ranks([([1.0, 2.0], dict(local_samples=2, elapsed=0.2)),
                        ([1.0, 2.0], dict(local_samples=2, elapsed=0.0))], **common)
    assert math.isnan(r0.step_time) and r0.skip is None and r0.samples == 4.0


@pytest.mark.parametrize("kw", [{"accumulation": 0}, {"world_size": 0}, {"local_samples": -1}])
def test_validation_names_the_values(kw):
    with pytest.raises(ValueError, match="accumulation="):
        _stats([1.0], **kw)


def test_big_batch_sq_norm_matches_float64_sum_of_squares():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2, bias=False))
    model[0].weight.grad = torch.randn(5, 3)
    model[0].bias.grad = None  # parameters without a gradient are left out
    model[1].weight.grad = torch.randn(2, 5, dtype=torch.float64).float()
    want = sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None)
    got = big_batch_sq_norm(model.parameters())
    assert got.dtype == torch.float64 and float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(big_batch_sq_norm([model[0].bias])) == 0.0


def test_big_batch_sq_norm_sparse_and_mixed_dtypes():
    emb = nn.Embedding(6, 3, sparse=True)
    emb(torch.tensor([1, 1, 4])).sum().backward()
    lin = nn.Linear(2, 1).double()
    lin.weight.grad = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    want = float(emb.weight.grad.to_dense().square().sum()) + 25.0
    assert float(big_batch_sq_norm([emb.weight, lin.weight])) == pytest.approx(want)
