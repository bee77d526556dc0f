"""Hyperparameter scaling rules: pure functions of kappa = B / B_ref.

``B_ref`` is the global batch size at which the user tuned their hyperparameters and ``B``
the batch size in use now. Every function here is pure, cheap and validated; the callback
and :class:`adabatch.control.apply.OptimizerScaler` call them, the tests check them by table.

Rules and where they come from:

- learning rate, SGD: ``lr * kappa`` (linear rule; Goyal et al. 2017);
- learning rate, Adam family: ``lr * sqrt(kappa)`` (square-root rule; Malladi et al. 2022,
  "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms");
- AdaScale (Johnson et al. 2020): ``lr * r`` for SGD, ``lr * sqrt(r)`` for Adam, with the gain
  ``r = (tr(Sigma)/B_ref + |G|^2) / (tr(Sigma)/B + |G|^2)``, which lies between 1 (no gradient
  noise: a bigger batch buys nothing) and kappa (pure noise: linear scaling);
- Adam's betas: ``beta ** kappa`` (the same half-life in samples; Malladi et al. use the first
  order form ``1 - kappa (1 - beta)``); eps: ``eps / sqrt(kappa)`` (the gradient noise, and so
  ``sqrt(v)``, shrinks like ``1 / sqrt(B)``);
- decoupled weight decay (AdamW): keep the timescale ``B / (lr * wd)`` in samples fixed
  (Power Lines, Bergsma et al. 2025), so ``wd' = wd * kappa * lr / lr'``;
- weight EMA: ``rho ** kappa`` (Busbridge et al. 2023, "How to Scale Your EMA"), i.e. a
  fixed half-life in samples, see also :func:`decay_from_half_life`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LR_RULES",
    "ScalingRules",
    "adascale_gain",
    "decay_from_half_life",
    "ema_decay",
    "lr_factor",
    "scale_betas",
    "scale_eps",
    "weight_decay_factor",
]

#: Names accepted by :func:`lr_factor`.
LR_RULES: tuple[str, ...] = ("linear", "sqrt", "adascale", "adascale_sqrt", "none")


@dataclass(frozen=True)
class ScalingRules:
    """Which hyperparameters follow the batch size, and how (the callback's ``rules=``).

    Args:
        lr: ``"auto"`` (the default: AdaScale's gain for SGD, its square root for the Adam
            family: the linear / square-root rules while the gradient is noise-dominated,
            saturating at ``1 + B_noise / B_ref`` as the batch passes the noise scale, so
            growing the batch does not push the lr past what the measured noise justifies),
            ``"kappa"`` (plain linear / square-root rules of ``kappa = B / B_ref``), or one of
            :data:`LR_RULES`.
        betas: Adam's betas -> ``beta ** kappa``.
        eps: Adam's eps -> ``eps / sqrt(kappa)``.
        weight_decay: AdamW's decoupled weight decay keeps ``B / (lr * wd)``.
        max_lr_factor: a hard cap on the lr factor (``None``: none).

    Raises:
        ValueError: naming a bad value.

    Example::

        >>> ScalingRules(lr="kappa", betas=False)
        ScalingRules(lr='kappa', betas=False, eps=True, weight_decay=True, max_lr_factor=None)
        >>> ScalingRules(lr="lin")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: lr='lin' is not one of ['auto', 'kappa', 'linear', ...]
    """

    lr: str = "auto"
    betas: bool = True
    eps: bool = True
    weight_decay: bool = True
    max_lr_factor: float | None = None

    def __post_init__(self) -> None:
        valid = ["auto", "kappa", *LR_RULES]
        if self.lr not in valid:
            raise ValueError(f"lr={self.lr!r} is not one of {valid}")
        for name in ("betas", "eps", "weight_decay"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        m = self.max_lr_factor
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float))
                              or not math.isfinite(m) or m < 1):
            raise ValueError(f"max_lr_factor={m!r} must be a finite number >= 1 or None")


def _check_kappa(kappa: float) -> float:
    kappa = float(kappa)
    if not math.isfinite(kappa) or kappa <= 0:
        raise ValueError(f"kappa={kappa} must be a finite number > 0 (kappa = B / B_ref)")
    return kappa


def lr_factor(kappa: float, rule: str, gain: float | None = None) -> float:
    """Factor by which to multiply the learning rate at ``kappa = B / B_ref``.

    Args:
        kappa: batch size over the reference batch size, finite and > 0.
        rule: ``"linear"`` (``kappa``; SGD), ``"sqrt"`` (``sqrt(kappa)``; Adam family,
            Malladi et al. 2022), ``"adascale"`` (``gain``; SGD, Johnson et al. 2020),
            ``"adascale_sqrt"`` (``sqrt(gain)``; AdaScale for the Adam family) or ``"none"``
            (``1``).
        gain: the AdaScale gain from :func:`adascale_gain`; required by the two AdaScale
            rules, ignored by the others.

    Returns:
        The multiplicative learning-rate factor.

    Raises:
        ValueError: on an unknown ``rule``, a ``kappa`` that is not finite and > 0, or a
            missing / non-finite / non-positive ``gain`` for an AdaScale rule.

    Example::

        >>> lr_factor(4.0, "linear")
        4.0
        >>> lr_factor(4.0, "sqrt")
        2.0
        >>> lr_factor(4.0, "adascale_sqrt", gain=2.25)
        1.5
        >>> lr_factor(4.0, "none")
        1.0
    """
    if rule not in LR_RULES:
        raise ValueError(f"rule={rule!r} is not one of {list(LR_RULES)}")
    kappa = _check_kappa(kappa)
    if rule == "linear":
        return kappa
    if rule == "sqrt":
        return math.sqrt(kappa)
    if rule == "none":
        return 1.0
    if gain is None:
        raise ValueError(f"rule={rule!r} needs gain=... (see adascale_gain); got gain=None")
    gain = float(gain)
    if not math.isfinite(gain) or gain <= 0:
        raise ValueError(f"gain={gain} must be a finite number > 0 for rule={rule!r}")
    return gain if rule == "adascale" else math.sqrt(gain)


def adascale_gain(
    trace_sigma: float, grad_sq: float, batch_size: float, ref_batch_size: float
) -> float:
    """AdaScale gain ``r = (tr(Sigma)/B_ref + |G|^2) / (tr(Sigma)/B + |G|^2)``.

    Johnson et al. 2020, "AdaScale SGD", eq. (4), with the per-example statistics of
    McCandlish et al. 2018. Both expectations ``E|g_B|^2 = |G|^2 + tr(Sigma)/B`` are of the
    batch gradient's squared norm; ``r`` is the number of reference-batch steps one step at
    batch ``B`` is worth. For ``B >= B_ref`` it lies in ``[1, B/B_ref]``.

    The statistics are noisy online estimates, so a bad value must not stop training: when
    ``trace_sigma`` or ``grad_sq`` is not finite or ``trace_sigma < 0``, the gain is ``1.0``
    (no learning-rate change). An estimate ``grad_sq <= 0`` with ``trace_sigma > 0`` says the
    gradient is lost in the noise: the gain is then its limit as ``|G|^2 -> 0``,
    ``B / B_ref``. (A fallback to 1.0 there dropped the lr to B_ref's at a large batch
    whenever the EMA of ``|G|^2`` was <= 0: on about half of the late steps at B = 16 near a
    least-squares noise floor, ``benchmarks/gns_tracking.py``, column "undefined".)
    The batch sizes are configuration, not estimates: a bad one raises.

    Args:
        trace_sigma: estimate of ``tr(Sigma)``, per-example units.
        grad_sq: estimate of ``|G|^2``.
        batch_size: current global batch size ``B`` (> 0).
        ref_batch_size: reference batch size ``B_ref`` (> 0).

    Raises:
        ValueError: when a batch size is not a finite number > 0.

    Example::

        >>> adascale_gain(trace_sigma=0.0, grad_sq=1.0, batch_size=256, ref_batch_size=32)
        1.0
        >>> gain = adascale_gain(trace_sigma=64.0, grad_sq=1.0, batch_size=256, ref_batch_size=32)
        >>> round(gain, 6)  # (64/32 + 1) / (64/256 + 1)
        2.4
        >>> adascale_gain(trace_sigma=64.0, grad_sq=-1.0, batch_size=256, ref_batch_size=32)
        8.0
    """
    for name, value in (("batch_size", batch_size), ("ref_batch_size", ref_batch_size)):
        if not math.isfinite(float(value)) or value <= 0:
            raise ValueError(f"{name}={value} must be a finite number > 0")
    trace_sigma, grad_sq = float(trace_sigma), float(grad_sq)
    if not (math.isfinite(trace_sigma) and math.isfinite(grad_sq)):
        return 1.0
    if trace_sigma < 0 or (grad_sq <= 0 and trace_sigma == 0):
        return 1.0
    if grad_sq <= 0:  # noise dominated: the limit of the formula as |G|^2 -> 0
        return float(batch_size) / float(ref_batch_size)
    return (trace_sigma / ref_batch_size + grad_sq) / (trace_sigma / batch_size + grad_sq)


def scale_betas(betas: Sequence[float], kappa: float) -> tuple[float, ...]:
    """Adam's betas at ``kappa``: ``beta ** kappa`` each (same half-life in samples).

    Args:
        betas: decay rates in ``[0, 1]`` (e.g. Adam's ``(beta1, beta2)``).
        kappa: ``B / B_ref``, finite and > 0.

    Raises:
        ValueError: on a beta outside ``[0, 1]`` or a bad ``kappa``.

    Example::

        >>> scale_betas((0.9, 0.999), 1.0)
        (0.9, 0.999)
        >>> tuple(round(b, 6) for b in scale_betas((0.9, 0.999), 2.0))
        (0.81, 0.998001)
    """
    kappa = _check_kappa(kappa)
    out = []
    for beta in betas:
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta={beta} in betas={tuple(betas)} must be in [0, 1]")
        out.append(beta**kappa)
    return tuple(out)


def scale_eps(eps: float, kappa: float) -> float:
    """Adam's eps at ``kappa``: ``eps / sqrt(kappa)``.

    ``sqrt(v)`` estimates the gradient's RMS, whose noise part shrinks like ``1/sqrt(B)``;
    scaling eps the same way keeps its weight relative to ``sqrt(v)`` (Malladi et al. 2022).

    Raises:
        ValueError: on ``eps < 0`` / not finite or a bad ``kappa``.

    Example::

        >>> scale_eps(1e-8, 4.0)
        5e-09
    """
    kappa = _check_kappa(kappa)
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps={eps} must be a finite number >= 0")
    return eps / math.sqrt(kappa)


def weight_decay_factor(kappa: float, lr_factor: float) -> float:
    """Factor for decoupled weight decay: ``kappa / lr_factor``.

    Power Lines (Bergsma et al. 2025): the timescale of AdamW's decay in samples is
    ``B / (lr * wd)``. Holding it fixed while ``B -> kappa B`` and ``lr -> lr_factor * lr``
    gives ``wd' = wd * kappa / lr_factor``: the per-step decay ``lr' * wd'`` grows by
    ``kappa``, exactly offsetting the ``kappa``-times fewer steps per sample.

    Raises:
        ValueError: when ``kappa`` or ``lr_factor`` is not a finite number > 0.

    Example::

        >>> weight_decay_factor(4.0, 2.0)  # sqrt rule: wd doubles too
        2.0
        >>> weight_decay_factor(4.0, 4.0)  # linear rule: wd unchanged
        1.0
    """
    kappa = _check_kappa(kappa)
    lr_f = float(lr_factor)
    if not math.isfinite(lr_f) or lr_f <= 0:
        raise ValueError(f"lr_factor={lr_factor} must be a finite number > 0")
    return kappa / lr_f


def ema_decay(rho: float, kappa: float) -> float:
    """Weight-EMA decay at ``kappa``: ``rho ** kappa`` (Busbridge et al. 2023).

    One step at ``kappa B`` replaces ``kappa`` steps at ``B``, so the EMA keeps its
    half-life in samples.

    Raises:
        ValueError: on ``rho`` outside ``[0, 1]`` or a bad ``kappa``.

    Example::

        >>> ema_decay(0.5, 2.0)
        0.25
        >>> round(ema_decay(0.999, 0.5), 8)
        0.99949987
    """
    kappa = _check_kappa(kappa)
    rho = float(rho)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho} must be in [0, 1]")
    return rho**kappa


def decay_from_half_life(batch_size: float, half_life_samples: float) -> float:
    """Per-step decay ``2 ** (-B / H)`` of an EMA whose half-life is ``H`` samples.

    ``half_life_samples=math.inf`` gives ``1.0`` (never forget).

    Raises:
        ValueError: when ``batch_size`` is not a finite number > 0 or ``half_life_samples``
            is not > 0.

    Example::

        >>> decay_from_half_life(64, 64)
        0.5
        >>> round(decay_from_half_life(32, 128) ** 4, 12)  # 4 steps of 32 samples: one half-life
        0.5
    """
    b, h = float(batch_size), float(half_life_samples)
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"batch_size={batch_size} must be a finite number > 0")
    if math.isnan(h) or h <= 0:
        raise ValueError(f"half_life_samples={half_life_samples} must be > 0")
    return 2.0 ** (-b / h)
