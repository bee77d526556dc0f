"""Both probes feed the estimator to the exact full-dataset noise scale.

Oracle: a small MLP at fixed weights on scikit-learn's bundled digits; per-example gradients
of all N = 1797 examples from float64 `torch.func.vmap(grad)` give the exact G (their mean)
and Sigma (their population covariance). Batches are drawn with replacement, i.e. i.i.d. from
the empirical distribution, for which the estimators are unbiased for exactly these G and
Sigma (drawing without replacement would instead target tr(Sigma) N/(N-1) /
(|G|^2 - tr(Sigma)/(N-1)), see docs/DESIGN.md).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from adabatch import GNSEstimator, MicroBatchGradNorms, PerExampleGradNorms

sklearn = pytest.importorskip("sklearn.datasets")

BIG = 64
# Steps after which both estimates are within 5% of the exact value (exact ~68; the
# estimator's own relative standard error is ~2-3% there).
STEPS = 1000


@pytest.fixture(scope="module")
def problem():
    digits = sklearn.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_example.values()], dim=1)
    mean = flat.mean(0)
    trace_sigma = (flat - mean).square().sum(1).mean()  # population covariance's trace
    exact = float(trace_sigma / mean.square().sum())
    return model, x, y, exact


def _batches(n: int, seed: int, steps: int = STEPS):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (BIG,), generator=g)


def test_per_example_probe_reaches_the_exact_noise_scale(problem):
    model, x, y, exact = problem
    est = GNSEstimator(half_life_samples=1e12)  # a plain average over the steps
    with PerExampleGradNorms(model) as probe:
        assert probe.uncovered == []
        for idx in _batches(len(x), seed=1):
            model.zero_grad()
            probe.reset()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            big = sum(p.grad.square().sum() for p in model.parameters())
            assert est.update(probe.sq_norms.mean(), 1, big, BIG)
    assert est.gns == pytest.approx(exact, rel=0.05)
    assert est.gns_rel_std < 0.05


def test_microbatch_probe_reaches_the_exact_noise_scale(problem):
    model, x, y, exact = problem
    micro, k = 16, BIG // 16
    est = GNSEstimator(half_life_samples=1e12)
    with MicroBatchGradNorms(model, grad_scale=1.0 / k) as probe:
        for idx in _batches(len(x), seed=2, steps=800):
            model.zero_grad()
            probe.reset()
            for chunk in idx.split(micro):  # accumulation, loss divided by k as Lightning does
                (nn.functional.cross_entropy(model(x[chunk]), y[chunk]) / k).backward()
            big = sum(p.grad.square().sum() for p in model.parameters())
            assert est.update(probe.sq_norms.mean(), micro, big, BIG)
    assert est.gns == pytest.approx(exact, rel=0.05)
