"""Batch-size policies and the decider."""

from __future__ import annotations

import math

import pytest

from adabatch.control.policy import (
    POLICIES,
    BatchSizeDecider,
    FixedPolicy,
    GoodputPolicy,
    NoisePolicy,
    Observation,
    RampPolicy,
    make_policy,
)


def obs(samples=0, steps=0, batch_size=64, gns=None, rel=0.1, throughput=None):
    return Observation(samples, steps, batch_size, gns, rel, throughput)


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
        (NoisePolicy(), obs(gns=500.0), 500.0),
        (NoisePolicy(scale=0.2), obs(gns=500.0), 100.0),
        (NoisePolicy(scale=2.0, exponent=0.5), obs(gns=400.0), 40.0),
        (NoisePolicy(), obs(gns=None), None),
        (NoisePolicy(), obs(gns=-5.0), None),
        (NoisePolicy(), obs(gns=math.inf), None),
        (NoisePolicy(), obs(gns=math.nan), None),
        (NoisePolicy(max_rel_std=0.3), obs(gns=500.0, rel=0.31), None),  # not trustworthy yet
        (NoisePolicy(max_rel_std=0.3), obs(gns=500.0, rel=None), None),  # unknown precision
        (NoisePolicy(max_rel_std=0.3), obs(gns=500.0, rel=math.nan), None),
        (NoisePolicy(max_rel_std=None), obs(gns=500.0, rel=None), 500.0),
        (NoisePolicy(max_rel_std=None), obs(gns=500.0, rel=10.0), 500.0),
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
        ({"max_rel_std": -0.1}, "max_rel_std=-0.1"),
        ({"scale": "big"}, "scale='big'"),
    ],
)
def test_noise_policy_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoisePolicy(**kwargs)


@pytest.mark.parametrize(("c", "gns", "g"), [(1.0, 700.0, 32), (0.25, 3000.0, 64), (2.0, 45, 8)])
def test_noise_policy_settles_at_c_times_gns(c, gns, g):
    policy = NoisePolicy(scale=c)
    decider = BatchSizeDecider(g, 1 << 16, granularity=g, hysteresis=0.1)
    batch, samples = g, 0
    history = []
    for step in range(50):
        target = policy.target(obs(samples, step, batch, gns=gns))
        batch = decider.decide(target, batch, samples)
        samples += batch
        history.append(batch)
    assert abs(batch - c * gns) <= g / 2
    assert len(set(history[5:])) == 1  # settled, no oscillation
    assert decider.num_changes == 1


# --------------------------------------------------------------------------- GoodputPolicy


def _tput(b, a, slope):
    """samples/s when a step takes a + slope * b seconds."""
    return b / (a + slope * b)


def _run_goodput(policy, gns, a, slope, start=64, steps=30):
    decider = BatchSizeDecider(policy.min_batch_size, policy.max_batch_size,
                               policy.granularity, hysteresis=0.0)
    batch, samples = start, 0
    for step in range(steps):
        o = obs(samples, step, batch, gns=gns, throughput=_tput(batch, a, slope))
        batch = decider.decide(policy.target(o), batch, samples)
        samples += batch
    return batch


def test_goodput_grows_when_throughput_scales_perfectly():
    # fixed 0.1 s per step: throughput proportional to B; large gns -> grow to the max,
    # by at most explore_factor per step
    policy = GoodputPolicy(32, 2048, 32, explore_factor=2.0)
    assert policy.target(obs(batch_size=64, gns=1e6, throughput=_tput(64, 0.1, 0.0))) == 128
    assert _run_goodput(GoodputPolicy(32, 2048, 32), gns=1e6, a=0.1, slope=0.0) == 2048


def test_goodput_shrinks_when_throughput_is_flat():
    # time proportional to B: constant samples/s; efficiency falls with B -> smallest batch
    assert _run_goodput(GoodputPolicy(32, 2048, 32), gns=1e6, a=0.0, slope=1e-3) == 32


@pytest.mark.parametrize(("a", "slope", "gns"), [(0.05, 1e-4, 1000.0), (0.2, 1e-4, 300.0)])
def test_goodput_finds_closed_form_optimum(a, slope, gns):
    # goodput B/(a+bB) * 1/(1+B/gns) peaks at sqrt(a * gns / b)
    g = 8
    policy = GoodputPolicy(8, 8192, g)
    batch = _run_goodput(policy, gns, a, slope)
    fitted_a, fitted_b = policy.step_time_model()
    assert fitted_a == pytest.approx(a, rel=1e-9) and fitted_b == pytest.approx(slope, rel=1e-9)
    grid = range(8, 8193, g)
    best = max(grid, key=lambda b: _tput(b, a, slope) / (1 + b / gns))
    assert batch == best
    assert abs(batch - math.sqrt(a * gns / slope)) <= g


def test_goodput_needs_gns_and_measurement():
    policy = GoodputPolicy(32, 2048, 32)
    assert policy.target(obs(gns=1e4)) is None  # no throughput yet
    assert policy.target(obs(gns=None, throughput=640.0)) is None  # measurement kept
    assert policy.step_time_model() == (0.1, 0.0)
    assert policy.target(obs(gns=1e4, rel=5.0)) is None  # not trustworthy


def test_goodput_state_roundtrip():
    p = GoodputPolicy(32, 2048, 32)
    p.observe(64, 640.0)
    p.observe(128, 1000.0)
    q = GoodputPolicy(32, 2048, 32)
    q.load_state_dict(p.state_dict())
    o = obs(batch_size=128, gns=5e3)
    assert q.target(o) == p.target(o)
    assert q.step_time_model() == p.step_time_model()


def test_goodput_smoothing_and_bad_measurements():
    p = GoodputPolicy(smoothing=0.5)
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
        ({"min_batch_size": 64, "max_batch_size": 32}, "min_batch_size=64"),
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
    p = RampPolicy(32, 64, ramp_samples=1000, increment=increment)
    assert p.target(obs(samples=samples, gns=1e9)) == pytest.approx(expected)


def test_ramp_down_and_zero_length():
    assert RampPolicy(64, 32, 1000, increment=16).target(obs(samples=600)) == 48.0
    assert RampPolicy(32, 64, 0).target(obs(samples=0)) == 64.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 64, 10), "start_batch_size=0"),
        ((32, 64, -1), "ramp_samples=-1"),
        ((32, 64, 10, 0), "increment=0"),
        ((32, 64, 10, 5), "increment=5"),
    ],
)
def test_ramp_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        RampPolicy(*args)


def test_ramp_through_decider_reaches_end_with_zero_hysteresis():
    policy = RampPolicy(32, 64, ramp_samples=1000, increment=8)
    decider = BatchSizeDecider(8, 64, granularity=8, hysteresis=0.0)
    batch, samples, seen = 32, 0, []
    while samples < 2000:
        batch = decider.decide(policy.target(obs(samples, 0, batch)), batch, samples)
        seen.append(batch)
        samples += batch
    assert sorted(set(seen)) == [32, 40, 48, 56, 64]


def test_fixed_policy():
    assert FixedPolicy().target(obs(gns=1e6)) is None
    assert FixedPolicy().state_dict() == {}


# --------------------------------------------------------------------------- make_policy


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("noise", {"scale": 0.3}, NoisePolicy),
        ("goodput", {"min_batch_size": 8}, GoodputPolicy),
        ("ramp", {"start_batch_size": 8, "end_batch_size": 16, "ramp_samples": 100}, RampPolicy),
        ("fixed", {}, FixedPolicy),
    ],
)
def test_make_policy(name, kwargs, cls):
    p = make_policy(name, **kwargs)
    assert type(p) is cls and p.name == name


def test_make_policy_errors():
    with pytest.raises(ValueError, match=r"'gns'.*\['noise', 'goodput', 'ramp', 'fixed'\]"):
        make_policy("gns")
    with pytest.raises(ValueError, match=r"\['sclae'\].*scale"):
        make_policy("noise", sclae=0.3)
    with pytest.raises(ValueError, match="does not take"):
        make_policy("fixed", scale=1.0)
    assert list(POLICIES) == ["noise", "goodput", "ramp", "fixed"]


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
        (80.0, 64, 96),  # 80 -> 96: +50% > 20%
    ],
)
def test_decider_table(target, current, expected):
    d = BatchSizeDecider(32, 1024, granularity=32, hysteresis=0.2)
    assert d.decide(target, current, samples=100) == expected


def test_decider_bounds_rounded_inward():
    d = BatchSizeDecider(33, 1000, granularity=32)
    assert (d.min_batch_size, d.max_batch_size) == (64, 992)
    assert d.decide(1.0, 512, 0) == 64
    assert d.decide(1e9, 512, 0) == 992


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_batch_size": 0, "max_batch_size": 8}, "min_batch_size=0"),
        ({"min_batch_size": 16, "max_batch_size": 8}, "min_batch_size=16.*max_batch_size=8"),
        ({"min_batch_size": 1, "max_batch_size": 8, "granularity": 0}, "granularity=0"),
        ({"min_batch_size": 33, "max_batch_size": 63, "granularity": 32}, "granularity=32"),
        ({"min_batch_size": 1, "max_batch_size": 8, "hysteresis": -0.1}, "hysteresis=-0.1"),
        ({"min_batch_size": 1, "max_batch_size": 8, "hysteresis": math.nan}, "hysteresis=nan"),
        (
            {"min_batch_size": 1, "max_batch_size": 8, "min_samples_between_changes": -1},
            "min_samples_between_changes=-1",
        ),
        ({"min_batch_size": 1.5, "max_batch_size": 8}, "min_batch_size=1.5"),
    ],
)
def test_decider_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeDecider(**kwargs)


def test_decider_rejects_bad_calls():
    d = BatchSizeDecider(1, 100)
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
        d = BatchSizeDecider(8, 4096, granularity=8, hysteresis=hysteresis)
        batch, samples, changes = 64, 0, 0
        for t in targets:
            new = d.decide(t, batch, samples)
            changes += new != batch
            batch, samples = new, samples + new
        assert changes == d.num_changes
        assert (changes <= max_changes) if hysteresis else changes == max_changes


def test_min_samples_between_changes():
    d = BatchSizeDecider(8, 4096, granularity=8, hysteresis=0.0, min_samples_between_changes=1000)
    assert d.decide(128, 64, samples=999) == 64  # counted from sample 0
    assert d.decide(128, 64, samples=1000) == 128
    assert d.decide(256, 128, samples=1500) == 128
    assert d.decide(256, 128, samples=1999) == 128
    assert d.decide(256, 128, samples=2000) == 256
    assert d.last_change_samples == 2000 and d.num_changes == 2


def test_never_decrease():
    d = BatchSizeDecider(8, 4096, granularity=8, hysteresis=0.0, never_decrease=True)
    assert d.decide(32, 64, 0) == 64
    assert d.decide(128, 64, 0) == 128
    assert d.decide(64, 128, 10) == 128
    assert BatchSizeDecider(8, 4096, hysteresis=0.0).decide(32, 64, 0) == 32


def test_current_outside_bounds_is_moved_in():
    d = BatchSizeDecider(64, 256, granularity=64, hysteresis=0.5, never_decrease=True,
                         min_samples_between_changes=10**6)
    assert d.decide(300.0, 512, 0) == 256
    assert d.decide(70.0, 16, 0) == 64


def test_decider_state_roundtrip_gives_same_decisions():
    kw = {"min_batch_size": 8, "max_batch_size": 4096, "granularity": 8,
          "min_samples_between_changes": 500}
    a = BatchSizeDecider(**kw)
    a.decide(200.0, 64, 600)
    b = BatchSizeDecider(**kw)
    b.load_state_dict(a.state_dict())
    for t, cur, s in ((400.0, 200, 900), (400.0, 200, 1100), (50.0, 400, 1700)):
        assert a.decide(t, cur, s) == b.decide(t, cur, s)
    assert a.state_dict() == b.state_dict()
    c = BatchSizeDecider(**kw)
    c.load_state_dict({})  # missing keys: defaults
    assert c.state_dict() == {"last_change_samples": 0, "num_changes": 0}


def test_target_at_or_beyond_a_bound_skips_hysteresis():
    d = BatchSizeDecider(64, 1024, granularity=64, hysteresis=0.2)
    assert d.decide(5000.0, 960, 0) == 1024  # +6.7%, but the bound is the stable answer
    assert d.decide(1024.0, 960, 0) == 1024
    assert d.decide(1000.0, 960, 0) == 960  # inside the bounds: hysteresis applies
    assert d.decide(1.0, 70, 0) == 64  # -8.6%, to the lower bound
    nd = BatchSizeDecider(64, 1024, granularity=64, hysteresis=0.2, never_decrease=True,
                          min_samples_between_changes=100)
    assert nd.decide(1.0, 128, 1000) == 128  # never_decrease still holds
    assert nd.decide(5000.0, 960, 50) == 960  # so does min_samples_between_changes


def test_ramp_with_hysteresis_is_coarser_but_reaches_the_end():
    policy = RampPolicy(32, 2048, ramp_samples=100_000)
    decider = BatchSizeDecider(32, 2048, granularity=32, hysteresis=0.2)
    batch, samples, seen = 32, 0, [32]
    while samples < 200_000:
        target = policy.target(obs(samples, 0, batch))
        new = decider.decide(target, batch, samples)
        if new != batch:  # hysteresis is judged on the unrounded target
            assert target / batch > 1.2 or new == 2048
            seen.append(new)
        batch, samples = new, samples + new
    assert seen[-1] == 2048 and seen == sorted(seen) and len(seen) > 5


def test_noise_policy_acts_on_a_lower_confidence_bound():
    from adabatch.control.policy import NoisePolicy, Observation

    policy = NoisePolicy(scale=0.5, max_rel_std=None, confidence=2.0)
    obs = Observation(1000, 10, 32, gns=600.0, gns_rel_std=0.5)
    assert policy.target(obs) == pytest.approx(0.5 * 600.0 / 2.0)  # still grows from 32
    assert policy.target(Observation(1000, 10, 32, gns=600.0, gns_rel_std=None)) is None
    gate = NoisePolicy(scale=0.5, max_rel_std=0.3)
    assert gate.target(obs) is None  # a gate would hold the batch at 32
    with pytest.raises(ValueError, match="confidence=-1"):
        NoisePolicy(confidence=-1.0)


def test_hysteresis_holds_a_target_on_a_rounding_boundary():
    """A target near 28 on a grid of 8 rounds to 24 or 32; neither move is 20% of the target."""
    from adabatch.control.policy import BatchSizeDecider

    decider = BatchSizeDecider(8, 256, granularity=8, hysteresis=0.2)
    current = 24
    for target in (28.1, 27.9, 28.3, 27.7, 28.0):
        current = decider.decide(target, current, samples=0)
    assert current == 24 and decider.num_changes == 0
    assert decider.decide(40.0, current, samples=0) == 40  # a real move still happens
