"""Batch-size policies and the decider."""

from __future__ import annotations

import math

import pytest

from adabatch.control.critical import ProbeResult
from adabatch.control.policy import (
    BatchBounds,
    BatchSizeDecider,
    CriticalBatchPolicy,
    FixedPolicy,
    GoodputPolicy,
    NoisePolicy,
    Observation,
    Policy,
    RampPolicy,
    SeesawPolicy,
)


def obs(samples=0, steps=0, batch_size=64, gns=None, rel=0.1, throughput=None, loss=None):
    return Observation(samples, steps, batch_size, gns, rel, throughput, loss=loss)


def D(lo, hi, granularity=1, **kw):  # noqa: N802 - a decider on a grid, old defaults
    kw.setdefault("never_decrease", False)
    return BatchSizeDecider(BatchBounds(lo, hi, granularity), **kw)


def bound(policy, lo, hi, granularity=1):
    policy.bind(BatchBounds(lo, hi, granularity))
    return policy


# --------------------------------------------------------------------------- Observation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": -1, "steps": 0, "batch_size": 1}, "samples=-1"),
        ({"samples": 0, "steps": -2, "batch_size": 1}, "steps=-2"),
        ({"samples": 0, "steps": 0, "batch_size": 0}, "batch_size=0"),
        ({"samples": 0, "steps": 0, "batch_size": 1.5}, "batch_size=1.5"),
    ],
)
def test_observation_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Observation(**kwargs)


# --------------------------------------------------------------------------- NoisePolicy


@pytest.mark.parametrize(
    ("policy", "o", "expected"),
    [
        (NoisePolicy(scale=1.0, confidence=0.0), obs(gns=500.0), 500.0),
        (NoisePolicy(scale=0.2, confidence=0.0), obs(gns=500.0), 100.0),
        (NoisePolicy(scale=2.0, exponent=0.5, confidence=0.0), obs(gns=400.0), 40.0),
        (NoisePolicy(scale=1.0, confidence=2.0), obs(gns=500.0, rel=0.25), 500.0 / 1.5),
        (NoisePolicy(), obs(gns=None), None),
        (NoisePolicy(), obs(gns=-5.0), None),
        (NoisePolicy(), obs(gns=math.inf), None),
        (NoisePolicy(), obs(gns=math.nan), None),
        (NoisePolicy(confidence=2.0), obs(gns=500.0, rel=None), None),  # unknown precision
        (NoisePolicy(confidence=2.0), obs(gns=500.0, rel=math.nan), None),
        (NoisePolicy(scale=1.0, confidence=0.0), obs(gns=500.0, rel=None), 500.0),
    ],
)
def test_noise_policy_table(policy, o, expected):
    assert policy.target(o) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 0.0}, "scale=0.0"),
        ({"scale": -1}, "scale=-1"),
        ({"exponent": 0}, "exponent=0"),
        ({"exponent": 1.5}, "exponent=1.5"),
        ({"confidence": -0.1}, "confidence=-0.1"),
        ({"scale": "big"}, "scale='big'"),
        ({"scale": True}, "scale=True"),
        ({"hysteresis": math.inf}, "hysteresis=inf"),
        ({"warmup_samples": math.nan}, "warmup_samples=nan"),
        ({"never_decrease": "no"}, "never_decrease='no'"),
        ({"spike_factor": 1.0}, "spike_factor=1.0"),
    ],
)
def test_noise_policy_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoisePolicy(**kwargs)


@pytest.mark.parametrize(("c", "gns", "g"), [(1.0, 700.0, 32), (0.25, 3000.0, 64), (2.0, 45, 8)])
def test_noise_policy_settles_at_c_times_gns(c, gns, g):
    policy = bound(NoisePolicy(scale=c, confidence=0.0, hysteresis=0.1), g, 1 << 16, g)
    batch, samples = g, 0
    history = []
    for step in range(50):
        batch = policy.decide(obs(samples, step, batch, gns=gns), batch)
        samples += batch
        history.append(batch)
    assert abs(batch - c * gns) <= g / 2
    assert len(set(history[5:])) == 1  # settled, no oscillation
    assert policy.state_dict()["decider"]["num_changes"] == 1


def test_policy_decide_needs_bind_and_warmup_holds():
    p = NoisePolicy(scale=1.0, confidence=0.0, warmup_samples=1000)
    with pytest.raises(RuntimeError, match="before bind"):
        p.decide(obs(gns=500.0), 64)
    bound(p, 8, 4096, 8)
    assert p.decide(obs(samples=999, gns=500.0), 64) == 64
    assert p.decide(obs(samples=1000, gns=500.0), 64) == 504  # 500 half up on a grid of 8


def test_a_user_policy_subclass_gets_the_discipline():
    class Double(Policy):
        def target(self, obs):
            return 2.0 * obs.batch_size

    p = bound(Double(hysteresis=0.0, min_samples_between_changes=100), 8, 64, 8)
    assert p.decide(obs(samples=50, batch_size=8), 8) == 8
    assert p.decide(obs(samples=100, batch_size=8), 8) == 16
    assert p.decide(obs(samples=10_000, batch_size=64), 64) == 64  # the bound


# --------------------------------------------------------------------------- CriticalBatchPolicy


def _probe(batch, r, gns, rel=0.0, samples=1000, factor=2):
    return ProbeResult(samples=samples, batch_size=batch, factor=factor, progress=1.0,
                       branch_progress=r, gns=gns, gns_rel_std=rel)


def test_critical_policy_grows_like_the_square_root_capped_by_the_probe():
    p = bound(CriticalBatchPolicy(confidence=0.0), 16, 1 << 14, 16)
    o = obs(gns=100.0, batch_size=16)
    # no probe yet: the square-root law from the starting batch, uncapped
    assert p.rho is None and p.target(o) == pytest.approx(math.sqrt(16 * 100.0))
    big = obs(gns=10_000.0, batch_size=16)
    assert p.target(big) == pytest.approx(400.0)  # 100x the noise scale: 10x the batch
    # r = 0.9 at B = 16, k = 2: B_crit = 16 (1.8 - 1) / 0.1 = 128, rho = 1.28 > 1: the
    # level is not raised; the cap 0.5 * B_crit = 64 is above sqrt(16 * 100) = 40
    p.observe_probe(_probe(16, 0.9, gns=100.0))
    assert p.rho == pytest.approx(1.28)
    assert p.critical_batch(o) == pytest.approx(128.0)
    assert p.target(o) == pytest.approx(40.0)
    assert p.target(big) == pytest.approx(400.0)  # below the cap 0.5 * 12800
    # a probe that finds a small critical batch (r = 0.6: B_crit = 16 * 0.2 / 0.4 = 8)
    # lowers the level and caps the target at half of it
    q = bound(CriticalBatchPolicy(confidence=0.0), 16, 1 << 14, 16)
    q.observe_probe(_probe(16, 0.6, gns=100.0))
    assert q.rho == pytest.approx(0.08)
    assert q.target(o) == pytest.approx(min(math.sqrt(16 * 8.0), 0.5 * 8.0))


def test_critical_policy_calibration_is_a_weighted_log_mean_and_clipped():
    p = bound(CriticalBatchPolicy(confidence=0.0, calibration_weight=0.5), 16, 4096, 16)
    p.observe_probe(_probe(16, 0.9, gns=100.0))  # rho 1.28
    p.observe_probe(_probe(16, 0.75, gns=100.0))  # B_crit = 16 * 0.5 / 0.25 = 32: rho 0.32
    assert p.rho == pytest.approx(math.sqrt(1.28 * 0.32))
    # kB did better than B: unbounded; credit what one probe resolves (tolerance 0.05)
    q = bound(CriticalBatchPolicy(confidence=0.0), 16, 4096, 16)
    q.observe_probe(_probe(16, 1.3, gns=100.0))
    assert q.rho == pytest.approx(16 * (2 * 0.95 - 1) / 0.05 / 100.0)
    # no progress: inconclusive, nothing learnt
    z = bound(CriticalBatchPolicy(), 16, 4096, 16)
    z.observe_probe(ProbeResult(1000, 16, 2, progress=-0.1, branch_progress=0.2, gns=100.0))
    assert z.rho is None and len(z.results) == 1


def test_critical_policy_uses_the_lower_bound_consistently():
    p = bound(CriticalBatchPolicy(confidence=2.0), 16, 4096, 16)
    p.observe_probe(_probe(16, 0.9, gns=150.0, rel=0.25))  # lcb 100 at the probe
    assert p.rho == pytest.approx(1.28)
    assert p.critical_batch(obs(gns=150.0, rel=0.25)) == pytest.approx(128.0)
    assert p.critical_batch(obs(gns=150.0, rel=None)) is None
    # the probe's ratio is credited at its lower bound r - z ratio_std: r = 0.95 +- 0.025
    # at z = 2 is r = 0.9, the same B_crit = 128 as above; without the error, 16 * 0.9 / 0.05
    q = bound(CriticalBatchPolicy(confidence=2.0), 16, 4096, 16)
    q.observe_probe(ProbeResult(1000, 16, 2, progress=1.0, branch_progress=0.95, gns=150.0,
                                gns_rel_std=0.25, ratio_std=0.025))
    assert q.rho == pytest.approx(1.28)
    u = bound(CriticalBatchPolicy(confidence=2.0), 16, 4096, 16)
    u.observe_probe(ProbeResult(1000, 16, 2, progress=1.0, branch_progress=0.95, gns=150.0,
                                gns_rel_std=0.25))
    assert u.rho == pytest.approx(16 * 0.9 / 0.05 / 100.0)
    # an interval r +- 2 ratio_std reaching both 1/k and 1 - tolerance excludes no answer:
    # inconclusive, the calibration is kept (r = 5 +- 3.9 read as B_crit = 0 at its bound)
    for r, std in ((5.0, 3.9), (0.75, 0.125)):
        w = bound(CriticalBatchPolicy(confidence=2.0), 16, 4096, 16)
        w.observe_probe(_probe(16, 0.9, gns=150.0, rel=0.25))
        w.observe_probe(ProbeResult(2000, 16, 2, progress=1.0, branch_progress=r, gns=150.0,
                                    gns_rel_std=0.25, ratio_std=std))
        assert w.rho == pytest.approx(1.28) and len(w.results) == 2


def test_critical_policy_state_roundtrip_and_bind_resets():
    p = bound(CriticalBatchPolicy(confidence=0.0), 16, 4096, 16)
    p.observe_probe(_probe(16, 0.9, gns=100.0))
    p.decide(obs(samples=5000, steps=100, gns=1000.0, batch_size=16, loss=1.0), 16)
    q = bound(CriticalBatchPolicy(confidence=0.0), 16, 4096, 16)
    q.load_state_dict(p.state_dict())
    assert q.rho == p.rho and q.results == p.results
    o = obs(samples=9000, steps=150, gns=3000.0, batch_size=96, loss=0.9)
    assert q.decide(o, 96) == p.decide(o, 96) > 96
    p.bind(BatchBounds(16, 4096, 16))
    assert p.rho is None and p.results == []
    with pytest.raises(ValueError, match="log_rho='x'"):
        q.load_state_dict({**q.state_dict(), "log_rho": "x"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exponent": 0.0}, "exponent=0.0"),
        ({"max_fraction": 1.5}, "max_fraction=1.5"),
        ({"calibration_weight": 0.0}, "calibration_weight=0.0"),
        ({"probe": "yes"}, "probe='yes'"),
    ],
)
def test_critical_policy_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CriticalBatchPolicy(**kwargs)


# --------------------------------------------------------------------------- SeesawPolicy


def sobs(lr, gns=1e6, samples=0, steps=0, batch_size=16, rel=0.0):
    return Observation(samples, steps, batch_size, gns, rel, lr_factor=lr)


@pytest.mark.parametrize(
    ("lrs", "expected"),
    [
        ([1.0], 16.0),  # at the peak: B_min
        ([1.0, 0.5], 32.0),  # lr halved: batch doubled
        ([0.1, 0.5, 1.0, 0.25], 64.0),  # a warm-up is not traded: relative to the peak
        ([2.0, 0.5], 64.0),  # a peak above the initial lr (OneCycle): relative to it
        ([1.0, 0.0], math.inf),  # decayed to zero: as large as the bounds allow
    ],
)
def test_seesaw_trades_the_schedule_relative_to_its_peak(lrs, expected):
    p = bound(SeesawPolicy(noise_fraction=None), 16, 4096, 16)
    for lr in lrs:
        t = p.target(sobs(lr))
    assert t == expected


def test_seesaw_is_capped_by_the_noise_scale_lower_bound_and_holds_without_one():
    p = bound(SeesawPolicy(noise_fraction=0.5, confidence=2.0), 16, 4096, 16)
    p.target(sobs(1.0))
    # wants 16 / 0.1 = 160; the cap: 0.5 * 300 / (1 + 2 * 0.25) = 100
    assert p.target(sobs(0.1, gns=300.0, rel=0.25)) == pytest.approx(100.0)
    assert p.target(sobs(0.1, gns=1e5, rel=0.25)) == pytest.approx(160.0)
    assert p.target(sobs(0.1, gns=None)) is None  # no estimate: hold
    assert p.target(sobs(0.1, gns=300.0, rel=None)) is None  # spread unknown: hold
    assert p.target(sobs(None)) is None  # schedule unknown: hold


def test_seesaw_through_the_discipline_never_decreases_and_state_roundtrips():
    p = bound(SeesawPolicy(noise_fraction=None, hysteresis=0.0), 16, 4096, 16)
    assert p.decide(sobs(1.0, samples=100), 16) == 16
    assert p.decide(sobs(0.25, samples=200), 16) == 64
    assert p.decide(sobs(0.5, samples=300), 64) == 64  # the lr rose: never decrease
    q = bound(SeesawPolicy(noise_fraction=None, hysteresis=0.0), 16, 4096, 16)
    q.load_state_dict(p.state_dict())
    # the peak came back with the state: 0.125 of it is 128, not 16
    assert q.decide(sobs(0.125, samples=400), 64) == p.decide(sobs(0.125, samples=400), 64) == 128
    p.bind(BatchBounds(16, 4096, 16))
    assert p.target(sobs(0.125)) == 16.0  # bind forgets the peak
    with pytest.raises(ValueError, match="lr_peak=-1"):
        q.load_state_dict({**q.state_dict(), "lr_peak": -1})


def test_seesaw_tracks_the_peak_while_the_discipline_holds():
    """The policy's own warm-up skips target(); the lr's peak passed meanwhile still counts."""
    p = bound(SeesawPolicy(noise_fraction=None, hysteresis=0.0, warmup_samples=1000), 16,
              4096, 16)
    assert p.decide(sobs(1.0, samples=100), 16) == 16  # held by the warm-up
    assert p.decide(sobs(0.5, samples=2000), 16) == 32  # half of the peak seen at 100


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"noise_fraction": 0.0}, "noise_fraction=0.0"), ({"confidence": -1}, "confidence=-1"),
     ({"hysteresis": -0.1}, "hysteresis=-0.1")],
)
def test_seesaw_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeesawPolicy(**kwargs)


# --------------------------------------------------------------------------- spike guard


def test_spike_guard_reverts_an_increase_followed_by_a_loss_spike():
    class Grow(Policy):
        def target(self, obs):
            return 4.0 * obs.batch_size

    p = bound(Grow(hysteresis=0.0, spike_factor=1.5, spike_window_steps=20), 8, 1024, 8)
    batch, samples = 8, 0
    for step in range(10):  # a steady loss of 1.0, then the increase
        samples += batch
        batch = p.decide(obs(samples, step, batch, loss=1.0), batch)
    assert batch > 8
    grown = batch
    reverted = None
    for step in range(10, 30):
        samples += batch
        new = p.decide(obs(samples, step, batch, loss=5.0), batch)  # the loss blows up
        if new < batch:
            reverted = new
            break
        batch = new
    assert reverted is not None and reverted < grown and p.reverts == 1
    # increases wait until the sample count has doubled
    assert p.decide(obs(samples + 8, 31, reverted, loss=1.0), reverted) == reverted
    assert p.decide(obs(3 * samples, 32, reverted, loss=1.0), reverted) > reverted


def test_spike_guard_ignores_noise_and_can_be_disabled():
    class Grow(Policy):
        def target(self, obs):
            return 2.0 * obs.batch_size

    for factor in (1.5, None):
        p = bound(Grow(hysteresis=0.0, spike_factor=factor), 8, 64, 8)
        batch, samples = 8, 0
        for step in range(60):
            samples += batch
            loss = 1.0 + 0.2 * (-1) ** step  # +-20% noise: not a spike
            batch = p.decide(obs(samples, step, batch, loss=loss), batch)
        assert batch == 64 and p.reverts == 0


# --------------------------------------------------------------------------- GoodputPolicy


def _tput(b, a, slope):
    """samples/s when a step takes a + slope * b seconds."""
    return b / (a + slope * b)


def _goodput(lo=32, hi=2048, g=32, **kw):
    kw.setdefault("confidence", 0.0)
    return bound(GoodputPolicy(**kw), lo, hi, g)


def _run_goodput(policy, gns, a, slope, start=64, steps=30):
    decider = BatchSizeDecider(policy.bounds, hysteresis=0.0, never_decrease=False)
    batch, samples = start, 0
    for step in range(steps):
        o = obs(samples, step, batch, gns=gns, throughput=_tput(batch, a, slope))
        batch = decider.decide(policy.target(o), batch, samples)
        samples += batch
    return batch


def test_goodput_grows_when_throughput_scales_perfectly():
    # fixed 0.1 s per step: throughput proportional to B; large gns -> grow to the max,
    # by at most explore_factor per step
    policy = _goodput(explore_factor=2.0)
    assert policy.target(obs(batch_size=64, gns=1e6, throughput=_tput(64, 0.1, 0.0))) == 128
    assert _run_goodput(_goodput(), gns=1e6, a=0.1, slope=0.0) == 2048


def test_goodput_shrinks_when_throughput_is_flat():
    # time proportional to B: constant samples/s; efficiency falls with B -> smallest batch
    assert _run_goodput(_goodput(), gns=1e6, a=0.0, slope=1e-3) == 32


@pytest.mark.parametrize(("a", "slope", "gns"), [(0.05, 1e-4, 1000.0), (0.2, 1e-4, 300.0)])
def test_goodput_finds_closed_form_optimum(a, slope, gns):
    # goodput B/(a+bB) * 1/(1+B/gns) peaks at sqrt(a * gns / b)
    g = 8
    policy = _goodput(8, 8192, g)
    batch = _run_goodput(policy, gns, a, slope)
    fitted_a, fitted_b = policy.step_time_model()
    assert fitted_a == pytest.approx(a, rel=1e-9) and fitted_b == pytest.approx(slope, rel=1e-9)
    grid = range(8, 8193, g)
    best = max(grid, key=lambda b: _tput(b, a, slope) / (1 + b / gns))
    assert batch == best
    assert abs(batch - math.sqrt(a * gns / slope)) <= g


def test_goodput_needs_gns_and_measurement():
    policy = _goodput()
    assert policy.target(obs(gns=1e4)) is None  # no throughput yet
    assert policy.target(obs(gns=None, throughput=640.0)) is None  # measurement kept
    assert policy.step_time_model() == (0.1, 0.0)
    assert _goodput(confidence=2.0).target(obs(gns=1e4, rel=None)) is None  # no precision


def test_goodput_state_roundtrip():
    p = _goodput()
    p.observe(64, 640.0)
    p.observe(128, 1000.0)
    q = _goodput()
    q.load_state_dict(p.state_dict())
    o = obs(batch_size=128, gns=5e3)
    assert q.target(o) == p.target(o)
    assert q.step_time_model() == p.step_time_model()


def test_goodput_smoothing_and_bad_measurements():
    p = _goodput(smoothing=0.5)
    p.observe(10, 100.0)  # 0.1 s
    p.observe(10, 50.0)  # 0.2 s -> average 0.15
    p.observe(10, 0.0)  # ignored
    p.observe(10, math.nan)  # ignored
    assert p.step_time_model() == (pytest.approx(0.15), 0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"explore_factor": 1.0}, "explore_factor=1.0"),
        ({"smoothing": 1.0}, "smoothing=1.0"),
        ({"explore_factor": math.nan}, "explore_factor=nan"),
    ],
)
def test_goodput_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GoodputPolicy(**kwargs)


# --------------------------------------------------------------------------- Ramp / Fixed


@pytest.mark.parametrize(
    ("increment", "samples", "expected"),
    [
        (None, 0, 32.0),
        (None, 250, 40.0),
        (None, 999, 32 + 32 * 0.999),
        (None, 1000, 64.0),
        (16, 0, 32.0),
        (16, 499, 32.0),
        (16, 500, 48.0),
        (16, 1000, 64.0),
        (16, 10**6, 64.0),
    ],
)
def test_ramp_table(increment, samples, expected):
    p = RampPolicy(1000, 32, 64, increment=increment)
    assert p.target(obs(samples=samples, gns=1e9)) == pytest.approx(expected)


def test_ramp_down_and_zero_length():
    assert RampPolicy(1000, 64, 32, increment=16).target(obs(samples=600)) == 48.0
    assert RampPolicy(0, 32, 64).target(obs(samples=0)) == 64.0
    # sizes default to the bounds
    assert bound(RampPolicy(1000), 16, 48, 16).target(obs(samples=500)) == 32.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 0, 64), "start_batch_size=0"),
        ((-1, 32, 64), "ramp_samples=-1"),
        ((10, 32, 64, 0), "increment=0"),
        ((10, 32, 64, 5), "increment=5"),
    ],
)
def test_ramp_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        RampPolicy(*args)


def test_ramp_through_decider_reaches_end_with_zero_hysteresis():
    policy = bound(RampPolicy(1000, 32, 64, increment=8), 8, 64, 8)
    batch, samples, seen = 32, 0, []
    while samples < 2000:
        batch = policy.decide(obs(samples, 0, batch), batch)
        seen.append(batch)
        samples += batch
    assert sorted(set(seen)) == [32, 40, 48, 56, 64]


def test_fixed_policy():
    assert FixedPolicy().target(obs(gns=1e6)) is None
    assert bound(FixedPolicy(), 8, 64).decide(obs(gns=1e6, batch_size=8), 8) == 8


# --------------------------------------------------------------------------- BatchSizeDecider


@pytest.mark.parametrize(
    ("target", "current", "expected"),
    [
        (None, 64, 64),
        (math.nan, 64, 64),
        (math.inf, 64, 64),
        (-math.inf, 64, 64),
        (100.0, 64, 96),  # 100 -> 96 on the grid of 32
        (111.0, 64, 96),
        (112.0, 64, 128),  # half up
        (1.0, 128, 32),  # clipped to min
        (-50.0, 128, 32),
        (0.0, 128, 32),
        (1e300, 64, 1024),  # clipped to max
        (70.0, 64, 64),  # rounds to 64: no change
        (72.0, 64, 64),  # 72 -> 64
        (80.0, 64, 64),  # 80 -> 96 is +50%, but 80 sits on the midpoint: kept
        (90.0, 64, 96),  # past the midpoint by more than 0.2 x 32
    ],
)
def test_decider_table(target, current, expected):
    d = D(32, 1024, 32, hysteresis=0.2)
    assert d.decide(target, current, samples=100) == expected


def test_decider_bounds_rounded_inward():
    d = D(33, 1000, 32)
    assert (d.bounds.lo, d.bounds.hi) == (64, 992)
    assert d.decide(1.0, 512, 0) == 64
    assert d.decide(1e9, 512, 0) == 992


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_batch_size": 0, "max_batch_size": 8}, "min_batch_size=0"),
        ({"min_batch_size": 16, "max_batch_size": 8}, "min_batch_size=16.*max_batch_size=8"),
        ({"min_batch_size": 1, "max_batch_size": 8, "granularity": 0}, "granularity=0"),
        ({"min_batch_size": 33, "max_batch_size": 63, "granularity": 32}, "granularity=32"),
        ({"min_batch_size": 1.5, "max_batch_size": 8}, "min_batch_size=1.5"),
        ({"min_batch_size": True, "max_batch_size": 8}, "min_batch_size=True"),
    ],
)
def test_bounds_reject(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchBounds(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hysteresis": -0.1}, "hysteresis=-0.1"),
        ({"hysteresis": math.nan}, "hysteresis=nan"),
        ({"min_samples_between_changes": -1}, "min_samples_between_changes=-1"),
    ],
)
def test_decider_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D(1, 8, **kwargs)
    with pytest.raises(ValueError, match="bounds=8"):
        BatchSizeDecider(8)


def test_decider_rejects_bad_calls():
    d = D(1, 100)
    with pytest.raises(ValueError, match="current=0"):
        d.decide(10.0, 0, 0)
    with pytest.raises(ValueError, match="samples=-1"):
        d.decide(10.0, 8, -1)
    d.decide(50.0, 8, 1000)
    with pytest.raises(ValueError, match="samples=10 is before the last change at 1000"):
        d.decide(50.0, 50, 10)


def test_hysteresis_suppresses_oscillation():
    # a target jittering +-10% around 256 moves the batch once, then never again
    targets = [256 * (1.1 if i % 2 else 0.9) for i in range(40)]
    for hysteresis, max_changes in ((0.25, 1), (0.0, 40)):
        d = D(8, 4096, 8, hysteresis=hysteresis)
        batch, samples, changes = 64, 0, 0
        for t in targets:
            new = d.decide(t, batch, samples)
            changes += new != batch
            batch, samples = new, samples + new
        assert changes == d.num_changes
        assert (changes <= max_changes) if hysteresis else changes == max_changes


def test_min_samples_between_changes():
    d = D(8, 4096, 8, hysteresis=0.0, min_samples_between_changes=1000)
    assert d.decide(128, 64, samples=999) == 64  # counted from sample 0
    assert d.decide(128, 64, samples=1000) == 128
    assert d.decide(256, 128, samples=1500) == 128
    assert d.decide(256, 128, samples=1999) == 128
    assert d.decide(256, 128, samples=2000) == 256
    assert d.last_change_samples == 2000 and d.num_changes == 2


def test_never_decrease():
    d = D(8, 4096, 8, hysteresis=0.0, never_decrease=True)
    assert d.decide(32, 64, 0) == 64
    assert d.decide(128, 64, 0) == 128
    assert d.decide(64, 128, 10) == 128
    assert D(8, 4096, hysteresis=0.0).decide(32, 64, 0) == 32
    assert BatchSizeDecider(BatchBounds(8, 4096)).never_decrease  # the default


def test_current_outside_bounds_is_moved_in():
    d = D(64, 256, 64, hysteresis=0.5, never_decrease=True,
          min_samples_between_changes=10**6)
    assert d.decide(300.0, 512, 0) == 256
    assert d.decide(70.0, 16, 0) == 64


def test_decider_state_roundtrip_gives_same_decisions():
    kw = {"min_samples_between_changes": 500}
    a = D(8, 4096, 8, **kw)
    a.decide(200.0, 64, 600)
    b = D(8, 4096, 8, **kw)
    b.load_state_dict(a.state_dict())
    for t, cur, s in ((400.0, 200, 900), (400.0, 200, 1100), (50.0, 400, 1700)):
        assert a.decide(t, cur, s) == b.decide(t, cur, s)
    assert a.state_dict() == b.state_dict()
    c = D(8, 4096, 8, **kw)
    c.load_state_dict({})  # missing keys: defaults
    assert c.state_dict() == {"last_change_samples": 0, "num_changes": 0}


def test_target_at_or_beyond_a_bound_skips_hysteresis():
    d = D(64, 1024, 64, hysteresis=0.2)
    assert d.decide(5000.0, 960, 0) == 1024  # +6.7%, but the bound is the stable answer
    assert d.decide(1024.0, 960, 0) == 1024
    assert d.decide(1000.0, 960, 0) == 960  # inside the bounds: hysteresis applies
    assert d.decide(1.0, 70, 0) == 64  # -8.6%, to the lower bound
    nd = D(64, 1024, 64, hysteresis=0.2, never_decrease=True,
           min_samples_between_changes=100)
    assert nd.decide(1.0, 128, 1000) == 128  # never_decrease still holds
    assert nd.decide(5000.0, 960, 50) == 960  # so does min_samples_between_changes


def test_ramp_with_hysteresis_is_coarser_but_reaches_the_end():
    policy = RampPolicy(100_000, 32, 2048)
    decider = D(32, 2048, 32, hysteresis=0.2)
    batch, samples, seen = 32, 0, [32]
    while samples < 200_000:
        target = policy.target(obs(samples, 0, batch))
        new = decider.decide(target, batch, samples)
        if new != batch:  # hysteresis is judged on the unrounded target
            assert target / batch > 1.2 or new == 2048
            seen.append(new)
        batch, samples = new, samples + new
    assert seen[-1] == 2048 and seen == sorted(seen) and len(seen) > 5


def test_hysteresis_holds_a_target_on_a_rounding_boundary():
    """A target near 28 on a grid of 8 rounds to 24 or 32; neither move is 20% of the target."""
    decider = D(8, 256, 8, hysteresis=0.2)
    current = 24
    for target in (28.1, 27.9, 28.3, 27.7, 28.0):
        current = decider.decide(target, current, samples=0)
    assert current == 24 and decider.num_changes == 0
    assert decider.decide(40.0, current, samples=0) == 40  # a real move still happens


def test_coarse_grid_does_not_flip_flop():
    """Granularity 16, targets jittering around 24 (a user's run went 32, 16, 32, 16 ...)."""
    decider = D(16, 512, 16, hysteresis=0.2)
    current, seen = 16, []
    for t in [23.0, 25.0, 22.0, 26.0] * 10:
        current = decider.decide(t, current, samples=0)
        seen.append(current)
    assert set(seen) == {16}
    assert decider.decide(28.0, 16, 0) == 32  # a clear move still happens
    assert decider.decide(23.0, 32, 0) == 32
