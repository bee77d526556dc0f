"""Scaling rules, by table."""

from __future__ import annotations

import math

import pytest

from adabatch.control.rules import (
    LR_RULES,
    adascale_gain,
    decay_from_half_life,
    ema_decay,
    lr_factor,
    scale_betas,
    scale_eps,
    weight_decay_factor,
)


@pytest.mark.parametrize(
    ("kappa", "rule", "gain", "expected"),
    [
        (1.0, "linear", None, 1.0),
        (4.0, "linear", None, 4.0),
        (0.25, "linear", None, 0.25),
        (4.0, "sqrt", None, 2.0),
        (0.25, "sqrt", None, 0.5),
        (9.0, "sqrt", None, 3.0),
        (4.0, "none", None, 1.0),
        (4.0, "adascale", 3.0, 3.0),
        (4.0, "adascale_sqrt", 2.25, 1.5),
        (4.0, "linear", 123.0, 4.0),  # gain ignored by non-AdaScale rules
    ],
)
def test_lr_factor_table(kappa, rule, gain, expected):
    assert lr_factor(kappa, rule, gain) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kappa": 2.0, "rule": "cubic"}, "rule='cubic'"),
        ({"kappa": 0.0, "rule": "linear"}, "kappa=0.0"),
        ({"kappa": -1.0, "rule": "sqrt"}, "kappa=-1.0"),
        ({"kappa": math.nan, "rule": "sqrt"}, "kappa=nan"),
        ({"kappa": math.inf, "rule": "linear"}, "kappa=inf"),
        ({"kappa": 2.0, "rule": "adascale"}, "gain=None"),
        ({"kappa": 2.0, "rule": "adascale", "gain": 0.0}, "gain=0.0"),
        ({"kappa": 2.0, "rule": "adascale_sqrt", "gain": math.nan}, "gain=nan"),
    ],
)
def test_lr_factor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(**kwargs)


def test_lr_rules_listed():
    assert set(LR_RULES) == {"linear", "sqrt", "adascale", "adascale_sqrt", "none"}


@pytest.mark.parametrize(
    ("trace_sigma", "grad_sq", "b", "b_ref", "expected"),
    [
        (0.0, 1.0, 256, 32, 1.0),  # no noise: a bigger batch buys nothing
        (1e12, 1e-12, 256, 32, 8.0),  # noise dominated: linear scaling
        (64.0, 1.0, 256, 32, (2.0 + 1.0) / (0.25 + 1.0)),
        (64.0, 1.0, 32, 32, 1.0),  # at the reference batch
        (64.0, 1.0, 16, 32, (2.0 + 1.0) / (4.0 + 1.0)),  # smaller batch: gain < 1
        # |G|^2 estimated <= 0 under noise: the noise-dominated limit B / B_ref
        (64.0, 0.0, 256, 32, 8.0),
        (64.0, -1.0, 256, 32, 8.0),
        (64.0, -1.0, 16, 32, 0.5),
        # guards: bad statistics -> 1.0
        (-1.0, 1.0, 256, 32, 1.0),
        (0.0, 0.0, 256, 32, 1.0),
        (0.0, -1.0, 256, 32, 1.0),
        (math.nan, 1.0, 256, 32, 1.0),
        (64.0, math.inf, 256, 32, 1.0),
    ],
)
def test_adascale_gain_table(trace_sigma, grad_sq, b, b_ref, expected):
    assert adascale_gain(trace_sigma, grad_sq, b, b_ref) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("gns", [0.5, 10.0, 1e3, 1e5])
@pytest.mark.parametrize("kappa", [1.5, 4.0, 32.0])
def test_adascale_gain_between_one_and_kappa(gns, kappa):
    r = adascale_gain(gns, 1.0, 32 * kappa, 32)
    assert 1.0 <= r <= kappa


@pytest.mark.parametrize(
    ("args", "match"),
    [((1.0, 1.0, 0, 32), "batch_size=0"), ((1.0, 1.0, 32, -1), "ref_batch_size=-1")],
)
def test_adascale_gain_rejects_batch_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        adascale_gain(*args)


@pytest.mark.parametrize(
    ("betas", "kappa", "expected"),
    [
        ((0.9, 0.999), 1.0, (0.9, 0.999)),
        ((0.9, 0.999), 2.0, (0.81, 0.999**2)),
        ((0.9, 0.999), 0.5, (0.9**0.5, 0.999**0.5)),
        ((0.0, 1.0), 3.0, (0.0, 1.0)),
        ([0.95], 4.0, (0.95**4,)),
    ],
)
def test_scale_betas_table(betas, kappa, expected):
    assert scale_betas(betas, kappa) == pytest.approx(expected, rel=1e-15)


def test_scale_betas_half_life_in_samples():
    # half-life in steps shrinks by kappa: the same half-life in samples
    beta, kappa = 0.99, 8.0
    (scaled,) = scale_betas((beta,), kappa)
    h_steps = math.log(0.5) / math.log(beta)
    assert math.log(0.5) / math.log(scaled) * kappa == pytest.approx(h_steps)


@pytest.mark.parametrize(("betas", "match"), [((0.9, 1.5), "beta=1.5"), ((-0.1,), "beta=-0.1")])
def test_scale_betas_rejects(betas, match):
    with pytest.raises(ValueError, match=match):
        scale_betas(betas, 2.0)


@pytest.mark.parametrize(
    ("eps", "kappa", "expected"), [(1e-8, 1.0, 1e-8), (1e-8, 4.0, 5e-9), (1e-6, 0.25, 2e-6),
                                   (0.0, 9.0, 0.0)]
)
def test_scale_eps_table(eps, kappa, expected):
    assert scale_eps(eps, kappa) == pytest.approx(expected, rel=1e-15)


def test_scale_eps_rejects():
    with pytest.raises(ValueError, match="eps=-1"):
        scale_eps(-1e-8, 2.0)
    with pytest.raises(ValueError, match="kappa=0"):
        scale_eps(1e-8, 0)


@pytest.mark.parametrize(
    ("kappa", "lr_f", "expected"),
    [(4.0, 4.0, 1.0), (4.0, 2.0, 2.0), (4.0, 1.0, 4.0), (0.25, 0.5, 0.5), (1.0, 1.0, 1.0)],
)
def test_weight_decay_factor_table(kappa, lr_f, expected):
    assert weight_decay_factor(kappa, lr_f) == pytest.approx(expected)


@pytest.mark.parametrize("rule", ["linear", "sqrt", "none"])
@pytest.mark.parametrize("kappa", [0.5, 2.0, 16.0])
def test_weight_decay_timescale_in_samples_fixed(rule, kappa):
    # Power Lines: B / (lr * wd) is unchanged
    b, lr, wd = 64, 1e-3, 0.1
    f = lr_factor(kappa, rule)
    wd2 = wd * weight_decay_factor(kappa, f)
    assert (b * kappa) / (lr * f * wd2) == pytest.approx(b / (lr * wd))


def test_weight_decay_factor_rejects():
    with pytest.raises(ValueError, match="lr_factor=0"):
        weight_decay_factor(2.0, 0.0)


@pytest.mark.parametrize(
    ("rho", "kappa", "expected"),
    [(0.5, 2.0, 0.25), (0.999, 1.0, 0.999), (0.81, 0.5, 0.9), (0.0, 2.0, 0.0), (1.0, 7.0, 1.0)],
)
def test_ema_decay_table(rho, kappa, expected):
    assert ema_decay(rho, kappa) == pytest.approx(expected, rel=1e-12)


def test_ema_decay_rejects():
    with pytest.raises(ValueError, match="rho=1.1"):
        ema_decay(1.1, 2.0)


@pytest.mark.parametrize(
    ("b", "h", "expected"),
    [(64, 64, 0.5), (32, 64, 2**-0.5), (128, 64, 0.25), (1, math.inf, 1.0)],
)
def test_decay_from_half_life_table(b, h, expected):
    assert decay_from_half_life(b, h) == pytest.approx(expected, rel=1e-15)


def test_decay_from_half_life_consistent_with_ema_decay():
    # decay at kappa*B == (decay at B) ** kappa
    assert decay_from_half_life(256, 1000) == pytest.approx(
        ema_decay(decay_from_half_life(64, 1000), 4.0)
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 10), "batch_size=0"), ((8, 0), "half_life_samples=0"), ((8, -3), "half_life_samples=-3")],
)
def test_decay_from_half_life_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        decay_from_half_life(*args)
