"""The critical batch measured by branching: settings, result, and the maths (pure).

A branched probe (Merrill et al. 2025 measured the critical batch of LMs by branching from
checkpoints at k x B and comparing the loss after a short window) works like this during
training (:mod:`adabatch.branch` runs it; this module holds no Lightning and no torch):

1. at an optimizer step, snapshot the weights and optimizer state, and evaluate the loss
   ``L0`` on a fixed probe set;
2. the main run trains on as usual for ``window_steps`` steps at batch ``B``; its batches
   are kept;
3. evaluate ``L_main``; load the snapshot; replay the *same samples* as
   ``window_steps / k`` steps at ``k x B`` with the hyperparameters the run's rules give at
   ``k x B``, except that a saturating AdaScale gain is replaced by the plain rule: ``k``
   times the main run's lr (``sqrt(k)`` for the Adam family, as Merrill et al.; a run
   without an lr rule keeps its lr); evaluate ``L_branch``; put the main run's state
   back. The main run's data order is untouched: nothing is skipped and nothing is seen
   twice by it.

Progress ``P = L0 - L_main`` and ``P_k = L0 - L_branch`` are made with the same samples. In
McCandlish et al.'s model (2018, eq. 2.7) the progress per sample at batch ``B`` is
proportional to ``1 / (1 + B / B_crit)``, so ``r = P_k / P = (1 + B/B_crit) / (1 + kB/B_crit)``,
which solves to

    B_crit = B (k r - 1) / (1 - r)        for 1/k < r < 1.

``r >= 1`` (the larger batch lost nothing) says only that ``B_crit`` is well above ``kB``:
one probe resolves levels up to ``r = 1 - tolerance``, i.e.
``B (k (1 - tolerance) - 1) / tolerance``. ``r <= 1/k`` says ``B_crit <= B``.
A probe whose main run made no progress (``P <= 0``) is inconclusive.

Cost, in sample-equivalents of one forward+backward: the replay (``window_steps x B``) plus
three forward passes over the probe set (``~eval_samples``, a forward being ~1/3 of a
forward+backward). The probe runs only while the cost so far stays within
``max_overhead`` of the samples trained.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from adabatch import validation as check

__all__ = ["CriticalBatchProbe", "ProbeResult", "critical_batch_from_ratio", "lossless"]


def _check_number(name: str, value: Any, lo: float, hi: float = math.inf, *,
                  lo_open: bool = False, integer: bool = False) -> Any:
    if integer:
        return check.count(name, value, int(lo))
    return check.number(name, value, lo, hi, strict=lo_open)


def critical_batch_from_ratio(ratio: float, batch_size: float, factor: float) -> float:
    """``B_crit`` from the progress ratio ``r`` of a branch at ``factor x batch_size``.

    Returns ``inf`` for ``r >= 1`` and ``0`` for ``r <= 1/factor`` (see the module doc).

    Raises:
        ValueError: on a non-finite ``ratio``, ``batch_size <= 0`` or ``factor <= 1``.

    Example::

        >>> critical_batch_from_ratio(0.75, 100, 2)    # (1 + 100/200) / (1 + 200/200)
        200.0
        >>> critical_batch_from_ratio(1.02, 100, 2), critical_batch_from_ratio(0.4, 100, 2)
        (inf, 0.0)
    """
    if not math.isfinite(ratio):
        raise ValueError(f"ratio={ratio!r} must be finite")
    _check_number("batch_size", batch_size, 0.0, lo_open=True)
    _check_number("factor", factor, 1.0, lo_open=True)
    if ratio >= 1.0:
        return math.inf
    if ratio * factor <= 1.0:
        return 0.0
    return batch_size * (factor * ratio - 1.0) / (1.0 - ratio)


@dataclass(frozen=True)
class CriticalBatchProbe:
    """Settings of the branched critical-batch probe.

    Args:
        factor: the branch's batch is ``factor x B`` (an int >= 2).
        window_steps: main-run optimizer steps per window (a multiple of ``factor``).
        eval_samples: size of the fixed probe set (the first samples of training).
        max_overhead: probe compute allowed, as a fraction of training compute (of the
            samples so far, or of the planned ``max_samples`` when larger).
        tolerance: the smallest progress loss (``1 - r``) a probe is trusted to resolve;
            sets the largest critical batch one probe can report.
        reprobe_growth: probe again once ``B_simple`` has grown by this factor since the
            last probe (the level can drift as training moves on) ...
        refresh_samples_factor: ... or once the sample count has grown by this factor.

    Raises:
        ValueError: naming the bad value.

    Example::

        >>> CriticalBatchProbe().cost(batch_size=32)   # 16 steps x 32 + 256
        768.0
    """

    factor: int = 2
    window_steps: int = 16
    eval_samples: int = 256
    max_overhead: float = 0.1
    tolerance: float = 0.05
    reprobe_growth: float = 2.0
    refresh_samples_factor: float = 2.0

    def __post_init__(self) -> None:
        _check_number("factor", self.factor, 2, integer=True)
        _check_number("window_steps", self.window_steps, 1, integer=True)
        if self.window_steps % self.factor:
            raise ValueError(
                f"window_steps={self.window_steps} must be a multiple of factor={self.factor}"
            )
        _check_number("eval_samples", self.eval_samples, 1, integer=True)
        _check_number("max_overhead", self.max_overhead, 0.0, 1.0, lo_open=True)
        _check_number("tolerance", self.tolerance, 0.0, 0.5, lo_open=True)
        _check_number("reprobe_growth", self.reprobe_growth, 1.0, lo_open=True)
        _check_number("refresh_samples_factor", self.refresh_samples_factor, 1.0, lo_open=True)

    def cost(self, batch_size: int) -> float:
        """Sample-equivalents (forward+backward) of one probe at ``batch_size``."""
        return float(self.window_steps * batch_size + self.eval_samples)

    def should_start(self, *, samples: int, batch_size: int, gns: float | None,
                     spent: float, last: ProbeResult | None,
                     planned_samples: int | None = None) -> bool:
        """Whether to open a window now (budget allows it and the level may have moved).

        ``last`` is the last probe, conclusive or not (``None``: none yet): a window that saw
        no progress on the probe set would see the same noise if reopened at once. The budget is
        ``max_overhead`` of the samples so far, or of ``planned_samples`` (the run's sample
        budget, when known) if that is larger: a run of known length may calibrate early,
        and its probes still cost at most ``max_overhead`` of it in the end.

        Example::

            >>> p = CriticalBatchProbe()       # one probe at B = 16 costs 512
            >>> p.should_start(samples=1000, batch_size=16, gns=50.0, spent=0.0, last=None)
            False
            >>> p.should_start(samples=1000, batch_size=16, gns=50.0, spent=0.0, last=None,
            ...                planned_samples=8192)
            True
        """
        if gns is None or not math.isfinite(gns) or gns <= 0:
            return False
        horizon = max(samples, planned_samples or 0)
        if spent + self.cost(batch_size) > self.max_overhead * horizon:
            return False
        if last is None:
            return True
        grown = last.gns is not None and gns >= self.reprobe_growth * last.gns
        return grown or samples >= self.refresh_samples_factor * last.samples


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the progress of the main run and of the branch over the same samples.

    Args:
        samples: samples trained at the end of the window.
        batch_size: ``B``, the main run's global batch in the window.
        factor: the branch ran at ``factor x B``.
        progress: ``L0 - L_main`` on the probe set.
        branch_progress: ``L0 - L_branch``.
        gns: ``B_simple`` at the end of the window (``None``: not measured).
        gns_rel_std: its relative standard error (``None``: unknown).
        ratio_std: the standard error of ``r`` over the probe set's batches (``None``:
            unknown).
        tolerance: the probe's :attr:`CriticalBatchProbe.tolerance`.
        cost: sample-equivalents the probe spent.
        seconds: wall-clock seconds the probe spent.
    """

    samples: int
    batch_size: int
    factor: int
    progress: float
    branch_progress: float
    gns: float | None = None
    gns_rel_std: float | None = None
    ratio_std: float | None = None
    tolerance: float = 0.05
    cost: float = 0.0
    seconds: float = 0.0

    @property
    def ratio(self) -> float | None:
        """``r = branch_progress / progress`` (``None``: no progress, inconclusive)."""
        if not (math.isfinite(self.progress) and math.isfinite(self.branch_progress)):
            return None
        if self.progress <= 0:
            return None
        return self.branch_progress / self.progress

    @property
    def critical_batch(self) -> float | None:
        """The measured ``B_crit`` (``inf``: above what one probe resolves; ``None``:
        inconclusive)."""
        r = self.ratio
        return None if r is None else critical_batch_from_ratio(r, self.batch_size, self.factor)

    def critical_batch_lower(self, z: float) -> float | None:
        """``B_crit`` from the ratio's lower confidence bound ``r - z ratio_std`` (the
        measured value where the standard error is unknown). ``None`` (inconclusive) without
        main progress, or when the interval ``r +- z ratio_std`` reaches both ends of what a
        probe resolves (``<= 1/k``: below ``B``; ``>= 1 - tolerance``: unbounded), so that
        it excludes no answer.

        Example::

            >>> p = ProbeResult(samples=0, batch_size=100, factor=2, progress=1.0,
            ...                 branch_progress=0.85, ratio_std=0.05)
            >>> round(p.critical_batch, 1), round(p.critical_batch_lower(2.0), 1)
            (466.7, 200.0)
            >>> ProbeResult(samples=0, batch_size=100, factor=2, progress=1.0,
            ...             branch_progress=0.85, ratio_std=0.2).critical_batch_lower(2.0)
        """
        r = self.ratio
        if r is None:
            return None
        std = self.ratio_std
        if std is not None and math.isfinite(std):
            if r - z * std <= 1.0 / self.factor and r + z * std >= 1.0 - self.tolerance:
                return None
            r -= z * std
        return critical_batch_from_ratio(r, self.batch_size, self.factor)

    @property
    def resolvable(self) -> float:
        """The largest ``B_crit`` this probe can tell apart from "unbounded"."""
        return critical_batch_from_ratio(1.0 - self.tolerance, self.batch_size, self.factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Any) -> ProbeResult:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on a missing or unknown field, or a value of the wrong type.
        """
        names = {f.name for f in fields(cls)}
        if not isinstance(state, dict) or not {"samples", "batch_size", "factor", "progress",
                                               "branch_progress"} <= set(state) <= names:
            raise ValueError(f"probe result {state!r} has missing or unknown fields")
        for key in ("samples", "batch_size", "factor"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"probe result {key}={value!r} must be an int >= 0")
        for key in ("progress", "branch_progress", "tolerance", "cost", "seconds"):
            if key in state and (isinstance(state[key], bool)
                                 or not isinstance(state[key], (int, float))):
                raise ValueError(f"probe result {key}={state[key]!r} must be a number")
        for key in ("gns", "gns_rel_std", "ratio_std"):
            v = state.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"probe result {key}={v!r} must be a number or None")
        return cls(**state)


def lossless(results: list[ProbeResult], z: float) -> bool:
    """Whether every conclusive probe (at least two; see
    :meth:`ProbeResult.critical_batch_lower`) found no loss at ``k x B``: the lower
    confidence bound ``r - z ratio_std`` of each ratio at least ``1 - tolerance``, where one
    probe can no longer tell the critical batch from "unbounded". The batch then stayed below
    what the lr allows with the lr scaled by ``k`` (``sqrt(k)``).

    Example::

        >>> p = dict(samples=0, batch_size=16, factor=2, progress=1.0, ratio_std=0.01)
        >>> lossless([ProbeResult(branch_progress=1.0, **p)] * 2, z=2.0)
        True
        >>> lossless([ProbeResult(branch_progress=1.0, **p),
        ...           ProbeResult(branch_progress=0.96, **p)], z=2.0)   # 0.94 < 0.95
        False
    """
    crits = [(r.critical_batch_lower(z), r.resolvable) for r in results]
    conclusive = [(c, top) for c, top in crits if c is not None]
    return len(conclusive) >= 2 and all(c >= top for c, top in conclusive)
