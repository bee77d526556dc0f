"""Tests for adabatch.noise.estimator against independent oracles.

Oracles: Monte-Carlo means of synthetic Gaussian gradients with known G and Sigma (tolerance
from the samples' own standard error), the least-squares closed form
(``LeastSquaresProblem.exact_stats``), and brute-force explicit EMA weights.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from adabatch.noise.estimator import (
    GNSEstimator,
    GradientNoiseScale,
    gns_estimates,
    grad_sq_estimate,
    reduce_small_batch_stats,
    small_batch_payload,
    torch_distributed_sum,
    trace_sigma_estimate,
)
from adabatch.tasks.synthetic import LeastSquaresProblem

F64 = torch.float64


# ----------------------------------------------------------------------------------------
# functional core
# ----------------------------------------------------------------------------------------


def test_functional_known_values_and_tensors():
    # S = |G|^2 + trS/b, Gb = |G|^2 + trS/B with |G|^2 = 2, trS = 12, b = 2, B = 6.
    s, big = 2 + 12 / 2, 2 + 12 / 6
    assert grad_sq_estimate(s, 2, big, 6) == pytest.approx(2.0, rel=1e-15)
    assert trace_sigma_estimate(s, 2, big, 6) == pytest.approx(12.0, rel=1e-15)
    # elementwise on tensors, same maths
    st = torch.tensor([s, 2 * s], dtype=F64)
    bt = torch.tensor([big, 2 * big], dtype=F64)
    g, tr = gns_estimates(st, 2, bt, 6)
    torch.testing.assert_close(g, torch.tensor([2.0, 4.0], dtype=F64))
    torch.testing.assert_close(tr, torch.tensor([12.0, 24.0], dtype=F64))


@pytest.mark.parametrize(
    ("b", "B", "match"),
    [(0, 4, "b=0 must be >= 1"), (0.5, 4, "b=0.5"), (4, 4, "B=4 must be > b=4"),
     (4, 2, "B=2"), (float("nan"), 4, "b=nan"), (1, float("inf"), "B=inf"), ("x", 4, "b='x'"),
     (torch.tensor([1.0, 2.0]), 4, "b must be a number")],
)
def test_functional_validation(b, B, match):
    with pytest.raises(ValueError, match=match):
        grad_sq_estimate(1.0, b, 1.0, B)
    with pytest.raises(ValueError, match=match):
        trace_sigma_estimate(1.0, b, 1.0, B)


def _gaussian_problem(d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(d, generator=g, dtype=F64) * 0.5
    L = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    return G, L, g


@pytest.mark.parametrize(("b", "B", "nested"), [(1, 8, True), (4, 32, True), (3, 5, False)])
def test_monte_carlo_unbiased(b, B, nested):
    """Mean of per-step estimates equals |G|^2 and tr(Sigma) within 4 standard errors."""
    G, L, gen = _gaussian_problem()
    d, n = G.numel(), 20_000
    true_g2 = float(G.square().sum())
    true_tr = float((L @ L.T).trace())
    per_ex = G + torch.randn(n, B, d, generator=gen, dtype=F64) @ L.T  # [n, B, d]
    big = per_ex.mean(1).square().sum(-1)  # [n]
    if nested:  # small batches partition the big batch (micro-batches)
        small = per_ex.reshape(n, B // b, b, d).mean(2).square().sum(-1).mean(1)
    else:  # an independent small batch
        extra = G + torch.randn(n, b, d, generator=gen, dtype=F64) @ L.T
        small = extra.mean(1).square().sum(-1)
    g_est, tr_est = gns_estimates(small, b, big, B)
    for est, truth in ((g_est, true_g2), (tr_est, true_tr)):
        se = float(est.std()) / math.sqrt(n)
        assert abs(float(est.mean()) - truth) < 4 * se, (float(est.mean()), truth, se)
        assert se < 0.05 * truth  # the check has teeth


# ----------------------------------------------------------------------------------------
# closed form: least squares
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "b", "steps"), [("mid", 1, 1000), ("mid", 4, 1000), ("near", 1, 4000)]
)
def test_least_squares_closed_form(where, b, steps):
    """Online gns within 5% of the exact B_simple after ``steps`` steps of B = 64 fresh data.

    Fresh examples every step (no finite-data bias). Measured rel. std after the given steps:
    ~0.7-0.9% at "mid" (gns ~ 6.3), ~1.3% "near" the optimum (gns ~ 41), so 5% is >= 4 sigma.
    """
    p = LeastSquaresProblem(dim=8, noise_std=0.5, seed=0)
    w = p.w_star * {"mid": 0.5, "near": 0.95}[where]
    exact = float(p.exact_stats(w)["gns"])
    B = 64
    gen = torch.Generator().manual_seed(1)
    est = GNSEstimator(half_life_samples=100_000)
    for _ in range(steps):
        x, y = p.sample(B, gen)
        per_ex = x * (x @ w - y)[:, None]  # g_i = x_i (x_i . w - y_i), float64
        small = per_ex.reshape(B // b, b, -1).mean(1).square().sum(-1).mean()
        big = per_ex.mean(0).square().sum()
        assert est.update(small, b, big, B)
    assert est.gns == pytest.approx(exact, rel=0.05)
    assert est.gns_rel_std < 0.02
    # the uncertainty is honest: the error is within 4 of its own standard errors
    assert abs(est.gns - exact) < 4 * est.gns_rel_std * exact


# ----------------------------------------------------------------------------------------
# EMA shell
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [0, -1, float("nan"), float("inf"), "abc", None])
def test_half_life_validation(h):
    with pytest.raises(ValueError, match=f"half_life_samples={h!r}"):
        GNSEstimator(half_life_samples=h)


def test_update_validation():
    est = GNSEstimator(100)
    with pytest.raises(ValueError, match="B=1 must be > b=1"):
        est.update(1.0, 1, 1.0, 1)
    with pytest.raises(ValueError, match="small_sq must be a number or a one-element tensor"):
        est.update(torch.ones(3), 1, 1.0, 4)
    assert est.num_updates == 0 and est.num_skipped == 0


def test_empty_and_first_update_is_raw():
    est = GNSEstimator(50)
    assert est.grad_sq is None and est.trace_sigma is None and est.gns is None
    assert est.gns_rel_std is None and est.effective_sample_size == 0.0
    s, b, big, B = 7.0, 2, 3.5, 8
    assert est.update(s, b, big, B)
    g, tr = gns_estimates(s, b, big, B)
    assert est.grad_sq == g and est.trace_sigma == tr  # debiased: exactly the raw values
    assert est.gns == pytest.approx(tr / g)
    assert est.last_grad_sq == g and est.last_trace_sigma == tr
    assert est.gns_rel_std is None  # one point: no spread
    assert est.num_updates == 1 and est.samples == 8


def _stats_for(g2: float, tr: float, b: float, B: float) -> tuple[float, float]:
    """(small_sq, big_sq) whose per-step estimates are exactly (g2, tr)."""
    return g2 + tr / b, g2 + tr / B


def test_half_life_semantics():
    """One marked step's share of the average halves after exactly H more samples."""
    H = 1000.0
    est = GNSEstimator(H)
    # Saturate the EMA with zeros (40 half-lives: total weight 1 - 2^-40).
    for _ in range(40):
        est.update(*_mix(0.0, 0.0, 1, H))
    est.update(*_mix(1.0, 1.0, 1, 100))
    right_after = est.grad_sq
    for B in (300, 200, 400, 100):  # H samples in uneven steps
        est.update(*_mix(0.0, 0.0, 1, B))
    assert est.grad_sq == pytest.approx(right_after / 2, rel=1e-9)
    assert est.trace_sigma == pytest.approx(right_after / 2, rel=1e-9)


def _mix(g2: float, tr: float, b: float, B: float) -> tuple[float, float, float, float]:
    small, big = _stats_for(g2, tr, b, B)
    return small, b, big, B


def _brute_force(values, sizes, H):
    """Debiased EMA with explicit weights a_i = (1 - beta_i) prod_{j > i} beta_j."""
    betas = [2.0 ** (-B / H) for B in sizes]
    n = len(values)
    w = [(1 - betas[i]) * math.prod(betas[i + 1:]) for i in range(n)]
    W = sum(w)
    mean = [sum(wi * v[k] for wi, v in zip(w, values)) / W for k in range(2)]
    cov = [[sum(wi * (v[i] - mean[i]) * (v[j] - mean[j]) for wi, v in zip(w, values)) / W
            for j in range(2)] for i in range(2)]
    ess = W * W / sum(wi * wi for wi in w)
    return mean, cov, ess


def test_ema_matches_explicit_weights_with_batch_size_changes():
    H = 500.0
    gen = torch.Generator().manual_seed(3)
    sizes = [16] * 10 + [64] * 7 + [8] * 13 + [256] * 5 + [32] * 4
    values = [(1.0 + float(torch.randn((), generator=gen)),
               20.0 + 5 * float(torch.randn((), generator=gen))) for _ in sizes]
    est = GNSEstimator(H)
    for (g2, tr), B in zip(values, sizes):
        est.update(*_mix(g2, tr, 4, B))
    mean, cov, ess = _brute_force(values, sizes, H)
    assert est.grad_sq == pytest.approx(mean[0], rel=1e-10)
    assert est.trace_sigma == pytest.approx(mean[1], rel=1e-10)
    assert est.effective_sample_size == pytest.approx(ess, rel=1e-10)
    assert est.samples == sum(sizes)
    # delta method for the ratio, written out independently
    r = mean[1] / mean[0]
    grad = [-mean[1] / mean[0] ** 2, 1 / mean[0]]
    var_r = sum(grad[i] * grad[j] * cov[i][j] for i in range(2) for j in range(2)) / (ess - 1)
    assert est.gns == pytest.approx(r, rel=1e-10)
    assert est.gns_rel_std == pytest.approx(math.sqrt(var_r) / r, rel=1e-8)


def test_constant_input_any_batch_schedule():
    est = GNSEstimator(64)
    for B in (8, 4096, 8, 16, 1_000_000, 9):
        est.update(*_mix(2.0, 6.0, 1, B))
        assert est.grad_sq == pytest.approx(2.0, rel=1e-12)
        assert est.gns == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize(
    "bad", [dict(small_sq=float("nan")), dict(big_sq=float("inf")),
            dict(small_sq=torch.tensor(float("-inf"))), dict(small_sq=1e308, big_sq=-1e308)]
)
def test_non_finite_skipped(bad):
    est = GNSEstimator(100)
    est.update(3.0, 1, 1.5, 4)
    before = est.state_dict()
    args = dict(small_sq=3.0, b=1, big_sq=1.5, B=4) | bad
    assert est.update(**args) is False
    after = est.state_dict()
    assert after.pop("num_skipped") == 1
    before.pop("num_skipped")
    assert after == before
    assert est.grad_sq == 1.0 and est.num_updates == 1


def test_gns_none_when_grad_sq_not_positive():
    est = GNSEstimator(100)
    est.update(*_mix(-1.0, 5.0, 1, 8))  # a noisy step can give a negative |G|^2 estimate
    assert est.grad_sq == pytest.approx(-1.0) and est.gns is None and est.gns_rel_std is None
    est.update(*_mix(0.0, 5.0, 1, 8000))
    assert est.gns is None


def test_state_dict_round_trip_and_old_checkpoints():
    gen = torch.Generator().manual_seed(5)
    data = [(2 + float(torch.randn((), generator=gen)), 30 + float(torch.randn((), generator=gen)))
            for _ in range(30)]
    a = GNSEstimator(300)
    for g2, tr in data[:20]:
        a.update(*_mix(g2, tr, 2, 32))
    a.update(float("nan"), 2, 1.0, 32)
    state = a.state_dict()
    assert all(type(v) in (int, float) for v in state.values())
    b = GNSEstimator(300)
    b.load_state_dict(state)
    for g2, tr in data[20:]:
        a.update(*_mix(g2, tr, 2, 48))
        b.update(*_mix(g2, tr, 2, 48))
        assert (a.grad_sq, a.trace_sigma, a.gns, a.gns_rel_std) == (
            b.grad_sq, b.trace_sigma, b.gns, b.gns_rel_std)
    assert a.state_dict() == b.state_dict()
    assert (b.num_updates, b.num_skipped, b.samples) == (30, 1, 20 * 32 + 10 * 48)
    # an older checkpoint without the newer keys still loads
    old = {k: state[k] for k in ("weight", "mean_grad_sq", "mean_trace_sigma", "num_updates")}
    c = GNSEstimator(300)
    c.load_state_dict(old)
    assert c.gns == pytest.approx(state["mean_trace_sigma"] / state["mean_grad_sq"])
    assert c.num_skipped == 0 and c.last_grad_sq is None


def test_reset():
    est = GNSEstimator(100)
    est.update(3.0, 1, 1.5, 4)
    est.update(float("nan"), 1, 1.5, 4)
    est.reset()
    fresh = GNSEstimator(100)
    assert est.state_dict() == pytest.approx(fresh.state_dict(), nan_ok=True)
    assert est.gns is None and est.half_life_samples == 100


def _stationary_steps(n, gen, b=1, B=16):
    """Per-step inputs from Gaussian per-example gradients, |G|^2 = 1, tr(Sigma) = 16."""
    d = 4
    G = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    per_ex = G + 2.0 * torch.randn(n, B, d, generator=gen, dtype=F64)
    small = per_ex.reshape(n, B // b, b, d).mean(2).square().sum(-1).mean(1)
    big = per_ex.mean(1).square().sum(-1)
    return small.tolist(), big.tolist()


def test_gns_rel_std_shrinks_on_stationary_data():
    gen = torch.Generator().manual_seed(7)
    small, big = _stationary_steps(4000, gen)
    est = GNSEstimator(half_life_samples=1e9)
    seen = {}
    for i, (s, g) in enumerate(zip(small, big), start=1):
        est.update(s, 1, g, 16)
        if i in (40, 400, 4000):
            seen[i] = est.gns_rel_std
    assert seen[40] > seen[400] > seen[4000]
    # ~ 1/sqrt(n) for a (nearly) flat average
    assert seen[400] / seen[4000] == pytest.approx(math.sqrt(10), rel=0.3)


def test_gns_rel_std_is_calibrated():
    """Across independent runs, the spread of gns matches the reported relative std."""
    gen = torch.Generator().manual_seed(11)
    runs, steps, H = 200, 200, 16 * 100  # half-life of 100 steps: a real EMA, ESS ~ 170
    finals, reported = [], []
    for _ in range(runs):
        small, big = _stationary_steps(steps, gen)
        est = GNSEstimator(H)
        for s, g in zip(small, big):
            est.update(s, 1, g, 16)
        finals.append(est.gns)
        reported.append(est.gns_rel_std)
    t = torch.tensor(finals, dtype=F64)
    empirical = float(t.std() / t.mean())
    assert float(t.mean()) == pytest.approx(16.0, rel=0.05)
    assert empirical == pytest.approx(sum(reported) / runs, rel=0.25)


# ----------------------------------------------------------------------------------------
# cross-rank reduction
# ----------------------------------------------------------------------------------------


def test_reduce_small_batch_stats_simulated_ranks():
    rank_norms = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])]
    payloads = [small_batch_payload(n.sum(), n.numel()) for n in rank_norms]
    total = torch.stack(payloads).sum(0)

    def in_place(t):  # like torch.distributed.all_reduce: mutates, returns None
        t.copy_(total)

    def returning(t):  # like Lightning's strategy.reduce(t, reduce_op="sum")
        return total.clone()

    pooled = torch.cat(rank_norms).mean().double()
    for fn in (in_place, returning):
        results = [reduce_small_batch_stats(n.sum(), n.numel(), fn) for n in rank_norms]
        for mean_sq, count in results:
            assert mean_sq.dtype == F64 and float(count) == 6
            torch.testing.assert_close(mean_sq, pooled)
    # no reduction: local statistics
    mean_sq, count = reduce_small_batch_stats(rank_norms[0].sum(), 3)
    assert float(mean_sq) == 2.0 and float(count) == 3
    # empty: NaN, which the estimator skips
    mean_sq, _ = reduce_small_batch_stats(0.0, 0)
    est = GNSEstimator(10)
    assert math.isnan(float(mean_sq)) and est.update(mean_sq, 1, 1.0, 2) is False
    # single process: torch_distributed_sum is the identity
    p = small_batch_payload(3.0, 2)
    assert torch.equal(torch_distributed_sum(p.clone()), p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GLOO_WORKER = """
import json, os, sys
import torch, torch.distributed as dist
from adabatch.noise.estimator import GNSEstimator, reduce_small_batch_stats, torch_distributed_sum
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
local = torch.tensor([1.0, 2.0]) * (rank + 1)  # rank 0: [1, 2]; rank 1: [2, 4]
mean_sq, count = reduce_small_batch_stats(local.sum(), local.numel(), torch_distributed_sum)
est = GNSEstimator(1000)
est.update(mean_sq, 1, 0.5, 8)
dist.destroy_process_group()
print(json.dumps([float(mean_sq), float(count), est.state_dict()]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="gloo test on POSIX only")
def test_reduce_small_batch_stats_gloo_two_ranks():
    """Two real processes (gloo): every rank ends with the pooled S and identical state."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", _GLOO_WORKER, str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    (m0, c0, s0), (m1, c1, s1) = outs
    assert (m0, c0) == (m1, c1) == (2.25, 4.0)
    assert s0 == s1


# ----------------------------------------------------------------------------------------
# torchmetrics Metric
# ----------------------------------------------------------------------------------------


def _metric_steps(n=12, seed=2):
    """Noisy (small norms, b, big_sq, B) around |G|^2 = 5, tr(Sigma) = 4 with changing B."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for i in range(n):
        B = 8 * (i % 3 + 1)
        small = 5 + 4 / 2 + torch.randn(4, generator=gen, dtype=F64) * 0.5
        big = 5 + 4 / B + torch.randn((), generator=gen, dtype=F64) * 0.1
        steps.append((small, 2, big, B))
    return steps


def test_metric_is_ratio_of_sums():
    steps = _metric_steps()
    m = GradientNoiseScale()
    for small, b, big, B in steps:
        m.update(small, b, big, B)
    num = sum(float(trace_sigma_estimate(s.mean(), b, g, B)) for s, b, g, B in steps)
    den = sum(float(grad_sq_estimate(s.mean(), b, g, B)) for s, b, g, B in steps)
    torch.testing.assert_close(m.compute(), torch.tensor(num / den, dtype=F64))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_merge_equals_single_instance():
    steps = _metric_steps()
    one, a, b = GradientNoiseScale(), GradientNoiseScale(), GradientNoiseScale()
    for i, args in enumerate(steps):
        one.update(*args)
        (a if i % 2 else b).update(*args)
    a.merge_state(b)
    assert 0.5 < float(one.compute()) < 1.1  # ~ 4 / 5: the data are sensible
    torch.testing.assert_close(a.compute(), one.compute())
    assert float(a.num_steps) == len(steps)
    # what a DDP sync does: sum every state over the instances, then compute
    c = GradientNoiseScale()
    for name in ("grad_sq_sum", "trace_sigma_sum", "num_steps", "num_skipped"):
        setattr(c, name, getattr(a, name).clone())
    torch.testing.assert_close(c.compute(), one.compute())


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_skips_non_finite_and_empty():
    m = GradientNoiseScale()
    assert math.isnan(float(m.compute()))
    m.update(torch.tensor([float("nan"), 1.0]), 1, 0.5, 4)
    assert math.isnan(float(m.compute())) and float(m.num_skipped) == 1
    m.update(torch.tensor([2.0, 4.0]), 1, 1.5, 4)
    assert float(m.compute()) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="small_sq is empty"):
        m.update(torch.tensor([]), 1, 0.5, 4)
    with pytest.raises(ValueError, match="b=0 must be >= 1"):
        m.update(torch.tensor([1.0]), 0, 0.5, 4)
    m.reset()
    assert math.isnan(float(m.compute()))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_non_positive_denominator_is_nan():
    m = GradientNoiseScale()
    small, big = _stats_for(-1.0, 5.0, 1, 4)
    m.update(torch.tensor([small]), 1, big, 4)
    assert math.isnan(float(m.compute()))


def test_public_export():
    import adabatch

    assert adabatch.GradientNoiseScale is GradientNoiseScale
    assert adabatch.GNSEstimator is GNSEstimator
