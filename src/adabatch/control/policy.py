"""Batch-size policies: what global batch size to aim for, and the discipline of changing it.

A policy is an object with one method to write, ``target(obs) -> float | None``: the global
batch size it would like given an :class:`Observation` (``None``: no opinion, keep the
batch). The base class :class:`Policy` turns targets into changes with one discipline for
every policy: the :class:`BatchBounds` grid (bounds and granularity, owned by the callback
and handed to the policy by :meth:`Policy.bind`), hysteresis, a minimum number of samples
between changes, never-decrease (the default), a warm-up in samples, and a guard that
reverts a change followed by a loss spike. Everything here is plain Python arithmetic on
values that are identical on every rank, so every rank decides the same.

Built-in policies (select one in a LightningCLI config by ``class_path``; a user's subclass
works the same way):

- :class:`CriticalBatchPolicy` (the default): follows the *measured* critical batch, its level
  from branched probes (:mod:`adabatch.control.critical`), its shape between probes from the
  noise scale, and grows like its square root (McCandlish et al. 2018, App. D);
- :class:`NoisePolicy`: ``B = c * B_simple ** p``;
- :class:`GoodputPolicy`: maximise throughput(B) / (1 + B / B_noise) (Pollux, Qiao et al. 2021);
- :class:`RampPolicy`: a linear ramp in samples (Megatron-LM's ``--rampup-batch-size``);
- :class:`FixedPolicy`: monitor only.

Why the default is not ``B = c * B_noise``: in McCandlish et al.'s model a fixed batch and
``B = c * B_noise`` (any ``c``) reach a given loss on the same trade-off curve
``(S/S_min - 1)(E/E_min - 1) = 1`` (steps S, samples E), so such a policy cannot beat a
well-chosen fixed batch; a schedule growing like ``sqrt(B_noise)`` reaches
``gamma = <sqrt(B_noise)>^2 / <B_noise> < 1`` instead (docs/DESIGN.md, "What limits a
policy's gain").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adabatch import validation as check
from adabatch.control.critical import CriticalBatchProbe, ProbeResult

__all__ = [
    "BatchBounds",
    "BatchSizeDecider",
    "CriticalBatchPolicy",
    "FixedPolicy",
    "GoodputPolicy",
    "NoisePolicy",
    "Observation",
    "Policy",
    "RampPolicy",
    "SeesawPolicy",
    "lower_bound",
]


def _finite_positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class Observation:
    """What a policy sees at a decision point (identical on every rank).

    Args:
        samples: examples trained on so far (global).
        steps: optimizer steps so far.
        batch_size: global batch size ``B`` of the step just taken.
        gns: the gradient noise scale estimate ``B_simple`` (``None``: not available yet).
        gns_rel_std: the estimate's relative standard deviation (``None``: unknown).
        throughput: samples per second measured at ``batch_size`` (``None``: not measured).
        loss: the training loss of the step just taken (``None``: not reported).
        lr_factor: the user's LR schedule now, relative to its initial value (``None``:
            unknown); scaling factors applied by adabatch are not included.
        critical_batch: the critical batch measured by the latest branched probe
            (``None``: none yet).

    Raises:
        ValueError: on negative ``samples``/``steps`` or ``batch_size < 1``.

    Example::

        >>> Observation(samples=6400, steps=100, batch_size=64, gns=512.0).gns
        512.0
    """

    samples: int
    steps: int
    batch_size: int
    gns: float | None = None
    gns_rel_std: float | None = None
    throughput: float | None = None
    loss: float | None = None
    lr_factor: float | None = None
    critical_batch: float | None = None

    def __post_init__(self) -> None:
        check.count("samples", self.samples, 0)
        check.count("steps", self.steps, 0)
        check.count("batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class BatchBounds:
    """The grid of global batch sizes a run may use: multiples of ``granularity`` within
    ``[min_batch_size, max_batch_size]``.

    The granularity is the per-rank micro-batch times the world size (a global batch must
    split evenly into micro-batches). Bounds that are not on the grid are rounded *inward*:
    the minimum up, the maximum down, so the run never goes below or above what was asked.

    Raises:
        ValueError: on a value < 1 (or a bool), ``min > max``, or no grid point within the
            bounds (naming the values).

    Example::

        >>> b = BatchBounds(6, 100, granularity=4)
        >>> b.lo, b.hi, b.round(47.0), b.round(1e9)
        (8, 100, 48, 100)
    """

    min_batch_size: int
    max_batch_size: int
    granularity: int = 1

    def __post_init__(self) -> None:
        check.count("min_batch_size", self.min_batch_size, 1)
        check.count("max_batch_size", self.max_batch_size, 1)
        check.count("granularity", self.granularity, 1)
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(
                f"min_batch_size={self.min_batch_size} must be <= "
                f"max_batch_size={self.max_batch_size}"
            )
        if self.lo > self.hi:
            raise ValueError(
                f"no multiple of granularity={self.granularity} (micro-batch x world size) "
                f"lies in [min_batch_size={self.min_batch_size}, "
                f"max_batch_size={self.max_batch_size}]"
            )

    @property
    def lo(self) -> int:
        """The smallest grid point >= ``min_batch_size``."""
        return -(-self.min_batch_size // self.granularity) * self.granularity

    @property
    def hi(self) -> int:
        """The largest grid point <= ``max_batch_size``."""
        return self.max_batch_size // self.granularity * self.granularity

    def round(self, target: float) -> int:
        """Clip ``target`` to the bounds and round it (half up) to the grid."""
        g = self.granularity
        t = min(max(float(target), self.lo), self.hi)
        return min(max(math.floor(t / g + 0.5) * g, self.lo), self.hi)


class BatchSizeDecider:
    """Turns a target into the next global batch size, with discipline.

    ``decide(target, current, samples)``:

    1. ``None`` or a non-finite target keeps ``current``;
    2. the target is clipped to the bounds and rounded (half up) to the grid;
    3. with ``never_decrease``, a smaller result keeps ``current``;
    4. the batch changes only when ``|target / current - 1| > hysteresis`` (judged on the
       unrounded target: a target on a rounding boundary would otherwise flip between two
       grid points) and the target lies past the midpoint between ``current`` and the new
       grid point by ``hysteresis * granularity`` (a grid coarser than the hysteresis would
       otherwise alternate 16, 32, 16, 32 around a target of 24), and at least
       ``min_samples_between_changes`` samples have passed since the last change. Two
       exceptions: a ``current`` outside the bounds is always moved inside, and a target at
       or beyond a bound skips the hysteresis (a bound is a stable answer, not noise).

    Pure given its state (the sample count at the last change), so the same inputs on
    every rank give the same decision.

    Example::

        >>> d = BatchSizeDecider(BatchBounds(32, 1024, granularity=32), hysteresis=0.2,
        ...                      never_decrease=False)
        >>> d.decide(300.0, current=64, samples=1000)
        288
        >>> d.decide(310.0, current=288, samples=2000)  # +7.6%: within hysteresis
        288
        >>> d.decide(None, current=288, samples=3000)
        288
        >>> d.decide(1e9, current=288, samples=4000)
        1024
    """

    def __init__(
        self,
        bounds: BatchBounds,
        hysteresis: float = 0.2,
        min_samples_between_changes: int = 0,
        never_decrease: bool = True,
    ) -> None:
        if not isinstance(bounds, BatchBounds):
            raise ValueError(f"bounds={bounds!r} must be a BatchBounds")
        self.bounds = bounds
        self.hysteresis = check.number("hysteresis", hysteresis, 0.0)
        self.min_samples_between_changes = check.count(
            "min_samples_between_changes", min_samples_between_changes, 0
        )
        self.never_decrease = bool(never_decrease)
        self.last_change_samples = 0
        self.num_changes = 0

    def decide(self, target: float | None, current: int, samples: int) -> int:
        """The batch size to use from now on (see the class docstring).

        Raises:
            ValueError: on ``current < 1``, ``samples < 0``, or ``samples`` before the last
                change (a state_dict that does not belong to this run).
        """
        check.count("current", current, 1)
        check.count("samples", samples, 0)
        if samples < self.last_change_samples:
            raise ValueError(
                f"samples={samples} is before the last change at "
                f"{self.last_change_samples} samples; restore the decider's state_dict "
                "together with the sample counter"
            )
        if target is None or not math.isfinite(float(target)):
            return current
        b = self.bounds
        new = b.round(target)
        if new == current:
            return current
        out_of_bounds = not b.lo <= current <= b.hi
        at_bound = not b.lo < target < b.hi
        if not out_of_bounds:
            if self.never_decrease and new < current:
                return current
            if not at_bound:
                if abs(float(target) / current - 1.0) <= self.hysteresis:
                    return current
                # Past the rounding midpoint by a margin, like a Schmitt trigger: on a grid
                # coarser than the hysteresis a target near 24 on a grid of 16 would
                # otherwise alternate 16, 32, 16, 32 (measured on a user's run).
                margin = 0.5 * abs(new - current) + self.hysteresis * b.granularity
                if abs(float(target) - current) <= margin:
                    return current
            if samples - self.last_change_samples < self.min_samples_between_changes:
                return current
        self.last_change_samples = samples
        self.num_changes += 1
        return new

    def state_dict(self) -> dict[str, Any]:
        """``last_change_samples`` and ``num_changes``."""
        return {"last_change_samples": self.last_change_samples, "num_changes": self.num_changes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys take their defaults)."""
        self.last_change_samples = check.count(
            "decider.last_change_samples", state.get("last_change_samples", 0), 0
        )
        self.num_changes = check.count("decider.num_changes", state.get("num_changes", 0), 0)


class Policy:
    """Base class of batch-size policies: write :meth:`target`; the discipline is here.

    Args:
        hysteresis: relative change (of the target, and of the grid step) below which the
            batch is kept.
        min_samples_between_changes: samples that must pass between two changes.
        never_decrease: never shrink the batch (except the spike guard's revert).
        warmup_samples: no decision before this many samples.
        spike_factor: revert a batch increase when, within ``spike_window_steps`` steps
            after it, the smoothed training loss exceeds ``spike_factor`` x its value
            before the change; further increases then wait until the sample count has
            doubled. ``None`` disables the guard.
        spike_window_steps: how long after a change the guard watches.

    Subclasses holding state override :meth:`state_dict`/:meth:`load_state_dict` (calling
    ``super()``), and :meth:`bind` to read the bounds.

    Example::

        >>> class Double(Policy):
        ...     def target(self, obs):
        ...         return 2.0 * obs.batch_size
        >>> p = Double(hysteresis=0.0)
        >>> p.bind(BatchBounds(8, 64, granularity=8))
        >>> p.decide(Observation(800, 100, 8), current=8)
        16
    """

    def __init__(
        self,
        *,
        hysteresis: float = 0.2,
        min_samples_between_changes: int = 0,
        never_decrease: bool = True,
        warmup_samples: int = 0,
        spike_factor: float | None = 1.5,
        spike_window_steps: int = 50,
    ) -> None:
        self.hysteresis = check.number("hysteresis", hysteresis, 0.0)
        self.min_samples_between_changes = check.count(
            "min_samples_between_changes", min_samples_between_changes, 0
        )
        if not isinstance(never_decrease, bool):
            raise ValueError(f"never_decrease={never_decrease!r} must be a bool")
        self.never_decrease = never_decrease
        self.warmup_samples = check.count("warmup_samples", warmup_samples, 0)
        self.spike_factor = (
            None
            if spike_factor is None
            else check.number("spike_factor", spike_factor, 1.0, strict=True)
        )
        self.spike_window_steps = check.count("spike_window_steps", spike_window_steps, 1)
        self.bounds: BatchBounds | None = None
        self._decider: BatchSizeDecider | None = None
        self._loss_ema: float | None = None
        self._guard: dict[str, float] | None = None  # the change being watched
        self._hold_until_samples = 0  # no increase before this (after a revert)
        self.reverts = 0

    # -------------------------------------------------------------- what subclasses write
    def target(self, obs: Observation) -> float | None:  # pragma: no cover - interface
        """Target global batch size, or ``None`` to keep the current one."""
        raise NotImplementedError

    def bind(self, bounds: BatchBounds) -> None:
        """Start a run within ``bounds``: the callback calls it at the first batch of every
        fit (so one instance can fit twice); run state is reset here."""
        self.bounds = bounds
        self._loss_ema = None
        self._guard = None
        self._hold_until_samples = 0
        self.reverts = 0
        self._decider = BatchSizeDecider(
            bounds,
            hysteresis=self.hysteresis,
            min_samples_between_changes=self.min_samples_between_changes,
            never_decrease=self.never_decrease,
        )

    @property
    def probe(self) -> CriticalBatchProbe | None:
        """A branched critical-batch probe the callback should run for this policy."""
        return None

    def observe_probe(self, result: ProbeResult) -> None:
        """Receive a finished probe's result (policies with a :attr:`probe`)."""

    # -------------------------------------------------------------- the discipline
    def decide(self, obs: Observation, current: int) -> int:
        """The global batch size from now on, given the last step and the batch in force.

        Raises:
            RuntimeError: before :meth:`bind`.
        """
        if self._decider is None:
            raise RuntimeError(f"{type(self).__name__}.decide() called before bind(bounds)")
        reverted = self._watch_loss(obs, current)
        if reverted is not None:
            return reverted
        if obs.samples < self.warmup_samples:
            return current
        target = self.target(obs)
        if target is not None and obs.samples < self._hold_until_samples:
            target = min(float(target), float(current))
        new = self._decider.decide(target, current, obs.samples)
        if new > current and self.spike_factor is not None and self._loss_ema is not None:
            self._guard = {"from": current, "loss": self._loss_ema, "until": obs.steps
                           + self.spike_window_steps}
        return new

    def _watch_loss(self, obs: Observation, current: int) -> int | None:
        """Smooth the loss; return the batch to revert to after a spike, else ``None``."""
        if obs.loss is None or not math.isfinite(obs.loss):
            return None
        beta = 0.9  # ~10-step smoothing: one noisy batch is not a spike
        ema = obs.loss if self._loss_ema is None else beta * self._loss_ema + (1 - beta) * obs.loss
        self._loss_ema = ema
        guard = self._guard
        if guard is None or self.spike_factor is None:
            return None
        if obs.steps > guard["until"]:
            self._guard = None
            return None
        before = guard["loss"]
        if ema - before <= (self.spike_factor - 1.0) * abs(before):
            return None
        self._guard = None
        self._hold_until_samples = 2 * obs.samples
        self.reverts += 1
        assert self._decider is not None
        self._decider.last_change_samples = obs.samples
        self._decider.num_changes += 1
        return min(int(guard["from"]), current)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The decider's and the spike guard's state (subclasses add theirs)."""
        return {
            "decider": None if self._decider is None else self._decider.state_dict(),
            "loss_ema": self._loss_ema,
            "guard": None if self._guard is None else dict(self._guard),
            "hold_until_samples": self._hold_until_samples,
            "reverts": self.reverts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (call after :meth:`bind`).

        Raises:
            ValueError: naming a field of the wrong type or range.
        """
        if not isinstance(state, dict):
            raise ValueError(f"policy state={state!r} must be a dict")
        if state.get("decider") is not None and self._decider is not None:
            self._decider.load_state_dict(state["decider"])
        loss = state.get("loss_ema")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))
                                 or not math.isfinite(loss)):
            raise ValueError(f"policy.loss_ema={loss!r} must be a finite number or None")
        self._loss_ema = None if loss is None else float(loss)
        guard = state.get("guard")
        if guard is not None and not (isinstance(guard, dict)
                                      and set(guard) == {"from", "loss", "until"}):
            raise ValueError(f"policy.guard={guard!r} must be None or from/loss/until")
        self._guard = None if guard is None else dict(guard)
        self._hold_until_samples = check.count(
            "policy.hold_until_samples", state.get("hold_until_samples", 0), 0
        )
        self.reverts = check.count("policy.reverts", state.get("reverts", 0), 0)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k not in ("bounds", "reverts"))
        return f"{type(self).__name__}({args})"


def lower_bound(gns: float | None, rel_std: float | None, confidence: float) -> float | None:
    """``B_simple / (1 + z * rel_std)``, or ``None`` while the estimate is unusable.

    Example::

        >>> lower_bound(300.0, 0.25, 2.0), lower_bound(300.0, None, 2.0)
        (200.0, None)
    """
    if not _finite_positive(gns):
        return None
    gns = float(gns)  # type: ignore[arg-type]
    if confidence > 0:
        if rel_std is None or not math.isfinite(rel_std):
            return None
        gns /= 1.0 + confidence * rel_std
    return gns


def _lower_bound(obs: Observation, confidence: float) -> float | None:
    return lower_bound(obs.gns, obs.gns_rel_std, confidence)


class CriticalBatchPolicy(Policy):
    """Grow like the square root of the noise scale, capped by the measured critical batch
    (the default).

    The target is ``B_min ** (1 - p) * level ** p`` with ``p = exponent`` (0.5: McCandlish
    et al. 2018, App. D: the step-optimal schedule at a fixed data overhead grows like
    ``sqrt(B_noise)``), ``B_min`` the bottom of the bounds (the batch the run starts at, the
    one its hyperparameters were tuned at) and ``level`` the lower confidence bound of the
    noise scale ``B_simple / (1 + z rel_std)``: the geometric mean of the starting batch and
    the noise scale, which stays at ``B_min`` while the noise scale is below it and grows
    ``10x`` when it grows ``100x``.

    The noise scale tracks the *shape* of the critical batch's growth but not its level
    (measured ``B_crit / B_simple`` from 0.12 to 10 across tasks, docs/DESIGN.md). A branched
    probe (:class:`~adabatch.control.critical.CriticalBatchProbe`) measures the level: it
    replays a window of training at ``k x B`` and compares the progress with the main run's.
    Its calibration ``rho``, the weighted geometric mean of the probes'
    ``B_crit / B_simple_lcb``, gives ``B_crit(t) = rho * B_simple_lcb(t)`` between probes,
    and it is used conservatively: the target never exceeds ``max_fraction * B_crit(t)``
    (where a larger batch stops saving steps; Merrill et al. 2025 double while the critical
    batch is above ``2B``), and a ``rho < 1`` lowers the level to ``rho * B_simple_lcb``;
    a ``rho > 1`` does not raise it (one probe's "no loss at kB" is bounded by its noise).
    Each probe is credited at the lower confidence bound of its progress ratio,
    ``r - z ratio_std`` (the standard error over the probe set's batches), so both inputs
    of the calibration are lower bounds at the same ``z``.

    Before the first conclusive probe the target is the square-root law alone.

    Args:
        exponent: ``p`` in ``(0, 1]``.
        max_fraction: cap on ``B / B_crit`` in ``(0, 1]``.
        confidence: ``z >= 0`` of the lower confidence bounds on ``B_simple`` and on a
            probe's progress ratio.
        calibration_weight: weight of a new probe in the log-mean of ``rho`` in ``(0, 1]``.
        probe: the branched probe's settings (``None``: the defaults).
        **discipline: :class:`Policy`'s arguments.

    Example::

        >>> from adabatch.control.critical import ProbeResult
        >>> p = CriticalBatchPolicy(confidence=0.0)
        >>> p.bind(BatchBounds(16, 4096, granularity=16))
        >>> o = Observation(1000, 60, 16, gns=100.0, gns_rel_std=0.1)
        >>> p.target(o)                  # sqrt(16 * 100), no probe yet
        40.0
        >>> p.observe_probe(ProbeResult(samples=1000, batch_size=16, factor=2,
        ...                             progress=1.0, branch_progress=0.75, gns=100.0))
        >>> p.rho                        # B_crit = 16 (2 * 0.75 - 1) / 0.25 = 32
        0.32
        >>> p.target(o)                  # min(sqrt(16 * 32), 0.5 * 32)
        16.0
    """

    def __init__(
        self,
        exponent: float = 0.5,
        max_fraction: float = 0.5,
        confidence: float = 2.0,
        calibration_weight: float = 0.5,
        probe: CriticalBatchProbe | None = None,
        **discipline: Any,
    ) -> None:
        super().__init__(**discipline)
        self.exponent = check.number("exponent", exponent, 0.0, strict=True)
        if self.exponent > 1.0:
            raise ValueError(f"exponent={exponent!r} must be in (0, 1]")
        self.max_fraction = check.number("max_fraction", max_fraction, 0.0, strict=True)
        if self.max_fraction > 1.0:
            raise ValueError(f"max_fraction={max_fraction!r} must be in (0, 1]")
        self.confidence = check.number("confidence", confidence, 0.0)
        self.calibration_weight = check.number(
            "calibration_weight", calibration_weight, 0.0, strict=True
        )
        if self.calibration_weight > 1.0:
            raise ValueError(f"calibration_weight={calibration_weight!r} must be in (0, 1]")
        if probe is not None and not isinstance(probe, CriticalBatchProbe):
            raise ValueError(f"probe={probe!r} must be a CriticalBatchProbe or None")
        self._probe = probe if probe is not None else CriticalBatchProbe()
        self._log_rho: float | None = None
        self.results: list[ProbeResult] = []

    @property
    def probe(self) -> CriticalBatchProbe:
        return self._probe

    def bind(self, bounds: BatchBounds) -> None:
        super().bind(bounds)
        self._log_rho = None
        self.results = []

    @property
    def rho(self) -> float | None:
        """The calibration ``B_crit / B_simple_lcb`` (``None`` before a conclusive probe)."""
        return None if self._log_rho is None else math.exp(self._log_rho)

    def critical_batch(self, obs: Observation) -> float | None:
        """``rho * B_simple_lcb`` now, or ``None``."""
        lcb = _lower_bound(obs, self.confidence)
        if self._log_rho is None or lcb is None:
            return None
        return math.exp(self._log_rho) * lcb

    def observe_probe(self, result: ProbeResult) -> None:
        self.results.append(result)
        crit = result.critical_batch_lower(self.confidence)
        lcb = lower_bound(result.gns, result.gns_rel_std, self.confidence)
        if crit is None or lcb is None:
            return  # inconclusive: keep the calibration
        # An unbounded answer (kB did at least as well as B) says only "well above kB":
        # credit the largest level one probe at this batch can resolve; a zero one "below
        # B": credit B / factor.
        crit = min(max(crit, result.batch_size / result.factor), result.resolvable)
        log_rho = math.log(crit / lcb)
        w = self.calibration_weight
        self._log_rho = log_rho if self._log_rho is None else (
            (1 - w) * self._log_rho + w * log_rho
        )

    def target(self, obs: Observation) -> float | None:
        lcb = _lower_bound(obs, self.confidence)
        if lcb is None:
            return None
        assert self.bounds is not None
        rho = self.rho
        # The probe lowers the level, never raises it: one probe's "k B lost nothing" is
        # bounded by its own noise (taken at face value it drove the char-LM batch to 96 and
        # +0.064 nats, benchmarks/RESULTS.md, equal_budget).
        level = lcb if rho is None else min(1.0, rho) * lcb
        shaped = self.bounds.lo ** (1.0 - self.exponent) * level**self.exponent
        cap = math.inf if rho is None else self.max_fraction * rho * lcb
        return min(shaped, cap)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["log_rho"] = self._log_rho
        state["results"] = [r.to_dict() for r in self.results]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        log_rho = state.get("log_rho")
        if log_rho is not None and (isinstance(log_rho, bool)
                                    or not isinstance(log_rho, (int, float))
                                    or not math.isfinite(log_rho)):
            raise ValueError(f"policy.log_rho={log_rho!r} must be a finite number or None")
        results = state.get("results", [])
        if not isinstance(results, list):
            raise ValueError(f"policy.results={results!r} must be a list")
        self.results = [ProbeResult.from_dict(r) for r in results]
        self._log_rho = None if log_rho is None else float(log_rho)


class SeesawPolicy(Policy):
    """Trade the learning-rate schedule's decay for batch growth, capped by the noise scale.

    Where the user's schedule would lower the learning rate by a factor ``s`` (relative to
    its peak so far), grow the batch by ``1 / s`` instead: ``B = B_min / s``. The scaling
    rules then turn the schedule's ``lr * s`` into ``lr * s * kappa`` for SGD (the lr stays
    at its peak: Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch
    Size") and ``lr * s * sqrt(kappa) = lr * sqrt(s)`` for Adam (Seesaw, Meterez et al.
    2025: cut the lr by ``sqrt(a)`` and grow the batch by ``a`` where the schedule cuts it by
    ``a``). Both keep the noise of the update (lr / B for SGD, lr / sqrt(B) for Adam) on the
    schedule's trajectory, so the loss follows the fixed-batch run's at equal samples while
    the number of steps falls by the mean of ``s`` over the decay (about half under a
    cosine to zero).

    The equivalence holds only while the batch stays below the critical batch, where the
    lr rule is still linear (square-root); past it a larger batch stops replacing lr decay
    (McCandlish et al. 2018; Seesaw's own limit). The batch is therefore capped at
    ``noise_fraction x B_simple_lcb`` (the noise scale's lower confidence bound
    ``B_simple / (1 + z rel_std)``); where the estimate is unusable the batch is held.

    With a constant learning rate there is nothing to trade and the batch stays at
    ``B_min``: growing at a constant noise temperature cannot beat a tuned fixed batch in
    McCandlish et al.'s model (docs/POLICIES.md); use :class:`CriticalBatchPolicy` or
    :class:`NoisePolicy` to grow on the noise scale alone.

    The schedule factor is the first parameter group's lr before adabatch's factors,
    relative to its largest value so far (a warm-up is not traded). With the default
    ``never_decrease=True`` a schedule that rises again (warm restarts) keeps the batch and
    the scaled lr: set ``never_decrease=False`` for such schedules.

    Args:
        noise_fraction: cap on ``B / B_simple_lcb`` (> 0; ``None``: no cap but the bounds).
        confidence: ``z >= 0`` of the lower confidence bound on ``B_simple``.
        **discipline: :class:`Policy`'s arguments.

    Example::

        >>> p = SeesawPolicy(confidence=0.0)
        >>> p.bind(BatchBounds(16, 4096, granularity=16))
        >>> p.target(Observation(0, 0, 16, gns=1e4, lr_factor=0.1))    # warm-up: peak so far
        16.0
        >>> p.target(Observation(800, 50, 16, gns=1e4, lr_factor=1.0))  # the peak
        16.0
        >>> p.target(Observation(8000, 400, 16, gns=1e4, lr_factor=0.25))  # lr / 4: B x 4
        64.0
        >>> p.target(Observation(9000, 420, 64, gns=40.0, lr_factor=0.25))  # capped by B_simple
        40.0
    """

    def __init__(
        self,
        noise_fraction: float | None = 1.0,
        confidence: float = 2.0,
        **discipline: Any,
    ) -> None:
        super().__init__(**discipline)
        self.noise_fraction = check.number("noise_fraction", noise_fraction, 0.0, strict=True,
                                           optional=True)
        self.confidence = check.number("confidence", confidence, 0.0)
        self._lr_peak: float | None = None

    def bind(self, bounds: BatchBounds) -> None:
        super().bind(bounds)
        self._lr_peak = None

    def decide(self, obs: Observation, current: int) -> int:
        # The peak follows every step, also those on which the discipline does not consult
        # target() (the policy's warm-up, a spike revert): a peak passed then would be missed.
        self.schedule_factor(obs)
        return super().decide(obs, current)

    def schedule_factor(self, obs: Observation) -> float | None:
        """``s``: the schedule's lr relative to its peak so far (``None``: unknown); the
        peak is updated with ``obs`` (idempotent: the same observation twice is harmless)."""
        lr = obs.lr_factor
        if lr is None or not math.isfinite(lr) or lr < 0:
            return None
        if self._lr_peak is None or lr > self._lr_peak:
            self._lr_peak = lr
        return lr / self._lr_peak if self._lr_peak > 0 else None

    def target(self, obs: Observation) -> float | None:
        assert self.bounds is not None, "bind(bounds) first"
        s = self.schedule_factor(obs)
        if s is None:
            return None
        want = self.bounds.lo / s if s > 0 else math.inf
        if self.noise_fraction is None:
            return want
        lcb = _lower_bound(obs, self.confidence)
        if lcb is None:
            return None  # no usable estimate: hold the batch
        return min(want, self.noise_fraction * lcb)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lr_peak"] = self._lr_peak
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._lr_peak = check.number("policy.lr_peak", state.get("lr_peak"), 0.0,
                                     optional=True)


class NoisePolicy(Policy):
    """``B* = scale * B_simple_lcb ** exponent`` (McCandlish et al. 2018).

    With ``exponent=1`` McCandlish's trade-off ``(S/S_min - 1)(E/E_min - 1) = 1`` says
    ``B = c * B_noise`` costs ``(1 + 1/c)`` x the minimal number of steps and ``(1 + c)`` x
    the minimal number of samples, the same curve as a fixed batch: it cannot beat a tuned
    fixed batch. With ``exponent=0.5`` the batch grows like ``sqrt(B_noise)`` (App. D),
    ``scale`` then carries units of sqrt(samples) (``c = B_0 / sqrt(B_noise_0)`` starts at
    ``B_0``). The level of ``B_simple`` is not the critical batch (docs/DESIGN.md):
    :class:`CriticalBatchPolicy` measures it.

    The target uses a lower confidence bound ``B_simple / (1 + z r)`` with ``r`` the
    estimate's relative standard error (``z = confidence``; ``0`` uses the estimate as is):
    a gate on ``r`` would hold the batch small exactly while it lies far below ``B_noise``.

    Args:
        scale: ``c > 0``.
        exponent: ``p`` in ``(0, 1]``.
        confidence: ``z >= 0``.
        **discipline: :class:`Policy`'s arguments.

    Example::

        >>> p = NoisePolicy(scale=0.25, confidence=2.0)
        >>> p.target(Observation(6400, 100, 64, gns=1024.0, gns_rel_std=1.5))  # 1024 / 4
        64.0
        >>> NoisePolicy(scale=8.0, exponent=0.5, confidence=0.0).target(
        ...     Observation(0, 0, 64, gns=1024.0))
        256.0
    """

    def __init__(
        self,
        scale: float = 0.25,
        exponent: float = 1.0,
        confidence: float = 2.0,
        **discipline: Any,
    ) -> None:
        super().__init__(**discipline)
        self.scale = check.number("scale", scale, 0.0, strict=True)
        self.exponent = check.number("exponent", exponent, 0.0, strict=True)
        if self.exponent > 1.0:
            raise ValueError(f"exponent={exponent!r} must be in (0, 1]")
        self.confidence = check.number("confidence", confidence, 0.0)

    def target(self, obs: Observation) -> float | None:
        lcb = _lower_bound(obs, self.confidence)
        return None if lcb is None else self.scale * lcb**self.exponent


class GoodputPolicy(Policy):
    """Maximise goodput = throughput(B) * 1 / (1 + B / B_noise) (Pollux, Qiao et al. 2021).

    ``1 / (1 + B / B_noise)`` is the statistical efficiency: the progress per sample relative
    to a tiny batch (McCandlish et al. 2018). Throughput is learned online: each observation
    adds a step time ``t = B / throughput`` to a per-batch-size moving average, and
    ``t(B) = a + b * B`` is fitted by least squares with ``a, b >= 0`` (one point per
    observed batch size). Goodput ``B / (a + b B) * B_n / (B_n + B)`` has its maximum at
    ``B* = sqrt(a * B_noise / b)``; the best point of the grid is one of the two around it.

    Exploration: with a single observed batch size the prior is perfect scaling (``b = 0``),
    so the search is capped at ``explore_factor`` times the largest batch observed so far.
    Throughput is wall-clock: runs are not reproducible step for step under this policy.

    Args:
        explore_factor: cap on the target relative to the largest observed batch (> 1).
        smoothing: weight of the old value in each batch size's step-time average, in
            ``[0, 1)``.
        confidence: ``z`` of the lower confidence bound on ``B_simple`` (as NoisePolicy).
        **discipline: :class:`Policy`'s arguments.

    Example::

        >>> p = GoodputPolicy(confidence=0.0)
        >>> p.bind(BatchBounds(32, 4096, granularity=32))
        >>> # time per step 0.1 s at both sizes: perfect scaling -> grow (by <= 2x)
        >>> p.target(Observation(0, 0, 64, gns=10_000.0, throughput=640.0))
        128.0
        >>> p.target(Observation(6400, 100, 128, gns=10_000.0, throughput=1280.0))
        256.0
    """

    def __init__(
        self,
        explore_factor: float = 2.0,
        smoothing: float = 0.5,
        confidence: float = 2.0,
        **discipline: Any,
    ) -> None:
        super().__init__(**discipline)
        self.explore_factor = check.number("explore_factor", explore_factor, 1.0, strict=True)
        self.smoothing = check.number("smoothing", smoothing, 0.0)
        if self.smoothing >= 1.0:
            raise ValueError(f"smoothing={smoothing!r} must be in [0, 1)")
        self.confidence = check.number("confidence", confidence, 0.0)
        self._step_time: dict[int, float] = {}

    def observe(self, batch_size: int, throughput: float) -> None:
        """Record one throughput measurement (samples/s) at ``batch_size``; bad ones ignored."""
        if not _finite_positive(throughput) or batch_size < 1:
            return
        t = batch_size / throughput
        old = self._step_time.get(batch_size)
        self._step_time[batch_size] = t if old is None else (
            self.smoothing * old + (1.0 - self.smoothing) * t
        )

    def step_time_model(self) -> tuple[float, float] | None:
        """``(a, b)`` of ``t(B) = a + b * B`` in seconds, or ``None`` before any measurement."""
        if not self._step_time:
            return None
        xs = sorted(self._step_time)
        ts = [self._step_time[x] for x in xs]
        if len(xs) == 1:
            return ts[0], 0.0  # prior: perfect scaling
        n = len(xs)
        mx, mt = sum(xs) / n, sum(ts) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        sxt = sum((x - mx) * (t - mt) for x, t in zip(xs, ts))
        b = sxt / sxx
        a = mt - b * mx
        if b <= 0:  # time falls with B: noise; best constant fit
            return mt, 0.0
        if a < 0:  # best fit through the origin
            return 0.0, sum(x * t for x, t in zip(xs, ts)) / sum(x * x for x in xs)
        return a, b

    def goodput(self, batch_size: float, gns: float) -> float:
        """Modelled goodput at ``batch_size`` (examples/s of small-batch progress)."""
        model = self.step_time_model()
        if model is None:
            raise ValueError("goodput() needs at least one throughput measurement (observe)")
        a, b = model
        return batch_size / (a + b * batch_size) / (1.0 + batch_size / gns)

    def target(self, obs: Observation) -> float | None:
        if obs.throughput is not None:
            self.observe(obs.batch_size, obs.throughput)
        model = self.step_time_model()
        gns = _lower_bound(obs, self.confidence)
        if model is None or gns is None:
            return None
        assert self.bounds is not None, "bind(bounds) first"
        a, b = model
        g, lo = self.bounds.granularity, self.bounds.lo
        hi = min(self.bounds.hi, self.explore_factor * max(self._step_time))
        hi = max(lo, math.floor(hi / g) * g)
        best = math.inf if b == 0 else math.sqrt(a * gns / b)
        best = min(max(best, lo), hi)
        below = max(lo, math.floor(best / g) * g)
        above = min(hi, below + g)
        return float(max((below, above), key=lambda x: (self.goodput(x, gns), -x)))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["step_time"] = [[k, v] for k, v in sorted(self._step_time.items())]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        try:
            self._step_time = {int(k): float(v) for k, v in state.get("step_time", [])}
        except (TypeError, ValueError):
            raise ValueError(
                f"policy.step_time={state.get('step_time')!r} must be [[batch, seconds], ...]"
            ) from None


class RampPolicy(Policy):
    """Linear ramp in samples from ``start_batch_size`` to ``end_batch_size`` (ignores gns).

    As Megatron-LM's ``--rampup-batch-size start increment ramp_samples``: with an
    ``increment`` the batch grows in steps of ``increment``, one every
    ``ramp_samples / ((end - start) / increment)`` samples; without one it is interpolated
    linearly (and rounded to the grid). The sizes default to the bounds. Hysteresis
    coarsens the ramp (the default here is 0: follow it exactly).

    Raises:
        ValueError: on batch sizes < 1, ``ramp_samples < 0``, ``increment < 1`` or an
            ``increment`` that does not divide ``end - start``.

    Example::

        >>> p = RampPolicy(ramp_samples=1000, start_batch_size=32, end_batch_size=64,
        ...                increment=8)
        >>> [p.target(Observation(s, 0, 32)) for s in (0, 249, 250, 999, 1000, 5000)]
        [32.0, 32.0, 40.0, 56.0, 64.0, 64.0]
    """

    def __init__(
        self,
        ramp_samples: int,
        start_batch_size: int | None = None,
        end_batch_size: int | None = None,
        increment: int | None = None,
        hysteresis: float = 0.0,
        **discipline: Any,
    ) -> None:
        super().__init__(hysteresis=hysteresis, **discipline)
        self.ramp_samples = check.count("ramp_samples", ramp_samples, 0)
        self.start_batch_size = (
            None if start_batch_size is None
            else check.count("start_batch_size", start_batch_size, 1)
        )
        self.end_batch_size = (
            None if end_batch_size is None else check.count("end_batch_size", end_batch_size, 1)
        )
        if increment is not None:
            check.count("increment", increment, 1)
        self.increment = increment
        self._check_increment()

    def _check_increment(self) -> None:
        if self.increment is None or self.start_batch_size is None or self.end_batch_size is None:
            return
        span = self.end_batch_size - self.start_batch_size
        if span % self.increment:
            raise ValueError(
                f"increment={self.increment} must divide end_batch_size - start_batch_size "
                f"= {span}"
            )

    def bind(self, bounds: BatchBounds) -> None:
        super().bind(bounds)
        if self.start_batch_size is None:
            self.start_batch_size = bounds.lo
        if self.end_batch_size is None:
            self.end_batch_size = bounds.hi
        self._check_increment()

    def target(self, obs: Observation) -> float:
        start, end = self.start_batch_size, self.end_batch_size
        if start is None or end is None:
            raise RuntimeError("RampPolicy needs bind(bounds) or explicit start/end sizes")
        if obs.samples >= self.ramp_samples or start == end:
            return float(end)
        span = end - start
        if self.increment is None:
            return start + span * obs.samples / self.ramp_samples
        n_inc = abs(span) // self.increment
        per_inc = self.ramp_samples / n_inc
        done = min(n_inc, math.floor(obs.samples / per_inc))
        return float(start + math.copysign(done * self.increment, span))


class FixedPolicy(Policy):
    """Monitor only: never has an opinion (the batch size stays as configured).

    Example::

        >>> FixedPolicy().target(Observation(0, 0, 64, gns=1e6)) is None
        True
    """

    def target(self, obs: Observation) -> None:
        return None
