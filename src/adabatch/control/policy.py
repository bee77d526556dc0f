"""Batch-size policies (what batch size to aim for) and the change discipline.

A policy reads an :class:`Observation` and returns a target global batch size, or ``None``
for "no opinion: keep the batch" (not enough information yet, or a monitor-only policy).
The :class:`BatchSizeDecider` turns targets into actual changes: on the granularity grid,
within bounds, with hysteresis, a minimum number of samples between changes and an optional
never-decrease rule. Everything here is plain Python arithmetic on values that are identical on
every rank (the estimator all-reduces its statistics first), so every rank decides the same.

Policies:

- ``noise``: ``B* = c * B_simple ** p`` (McCandlish et al. 2018);
- ``goodput``: maximise throughput(B) / (1 + B / B_noise) (Pollux, Qiao et al. 2021);
- ``ramp``: a linear ramp in samples (Megatron-LM's ``--rampup-batch-size``);
- ``fixed``: monitor only.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "POLICIES",
    "BatchSizeDecider",
    "FixedPolicy",
    "GoodputPolicy",
    "NoisePolicy",
    "Observation",
    "Policy",
    "RampPolicy",
    "make_policy",
]


def _finite_positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return value


def _check_float(name: str, value: Any, minimum: float, *, strict: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number") from None
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name}={value!r} must be a finite number {op} {minimum}")
    return v


@dataclass(frozen=True)
class Observation:
    """What a policy sees at a decision point.

    Args:
        samples: examples trained on so far (global).
        steps: optimizer steps so far.
        batch_size: current global batch size ``B``.
        gns: the gradient noise scale estimate ``B_simple`` (``None``: not available yet).
        gns_rel_std: the estimate's relative standard deviation (``None``: unknown).
        throughput: samples per second measured at ``batch_size`` (``None``: not measured).

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

    def __post_init__(self) -> None:
        _check_int("samples", self.samples, 0)
        _check_int("steps", self.steps, 0)
        _check_int("batch_size", self.batch_size, 1)


class Policy:
    """Base class: ``target(obs) -> float | None`` plus (empty) state.

    Subclasses holding state override :meth:`state_dict` / :meth:`load_state_dict`.
    """

    name: str = "policy"

    def target(self, obs: Observation) -> float | None:  # pragma: no cover - interface
        """Target global batch size, or ``None`` to keep the current one."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (empty for stateless policies)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _trusted(obs: Observation, max_rel_std: float | None) -> bool:
    """The gns estimate exists, is finite and > 0, and (if asked) is precise enough."""
    if not _finite_positive(obs.gns):
        return False
    if max_rel_std is None:
        return True
    rel = obs.gns_rel_std
    return rel is not None and math.isfinite(rel) and rel <= max_rel_std


class NoisePolicy(Policy):
    """``B* = scale * B_simple ** exponent`` (McCandlish et al. 2018).

    With ``exponent=1`` McCandlish's trade-off ``(S/S_min - 1)(E/E_min - 1) = 1`` says
    ``B = c * B_noise`` costs ``(1 + 1/c)`` x the minimal number of steps and ``(1 + c)`` x
    the minimal number of samples: ``c = 1`` doubles both; smaller ``c`` saves data, larger
    saves steps. The exact ``B_simple`` overstated the best batch of a sweep by 2.5-8x on
    digits (DESIGN.md), so treat ``c`` as something to calibrate (0.1-0.4 there).

    With ``exponent=0.5`` the batch grows like ``sqrt(B_noise)``, McCandlish et al.'s App. D
    step-optimal adaptive schedule. ``scale`` then carries units of sqrt(samples) (e.g.
    ``c = B_0 / sqrt(B_noise_0)`` to start at ``B_0``). Its benefit is bounded: with
    ``gamma = <sqrt(B_noise)>^2 / <B_noise>`` over training, the trade-off becomes
    ``(S/S_min - 1)(E/E_min - 1) = gamma`` instead of 1 (about 26% fewer steps at 10% extra
    samples for a 100x growth of B_noise, 9% for 10x), and a square-root schedule reacts
    less to a noisy estimate.

    A confidence ``z > 0`` acts on a lower bound of the estimate, ``B_simple / (1 + z r)``
    with ``r`` its relative standard error, instead of refusing to act while ``r`` is large.
    The relative error of the ``|G|^2`` estimate grows like ``B_noise / B`` (per step), so a
    gate on ``r`` holds the batch small exactly while it lies far below ``B_noise``
    (benchmarks/RESULTS.md, time_to_target); a lower bound still grows it, cautiously.

    Args:
        scale: ``c > 0``.
        exponent: ``p`` in ``(0, 1]``.
        max_rel_std: ``None`` (return ``None``: not trustworthy yet) when the estimate's
            relative std is above this or unknown; ``None`` disables the check.
        confidence: ``z >= 0``; with ``z > 0`` the target uses the lower bound above and is
            ``None`` while the relative std is unknown.

    Raises:
        ValueError: on ``scale <= 0``, ``exponent`` outside ``(0, 1]``, ``max_rel_std < 0``
            or ``confidence < 0``.

    Example::

        >>> p = NoisePolicy(scale=0.25)
        >>> p.target(Observation(6400, 100, 64, gns=1024.0, gns_rel_std=0.1))
        256.0
        >>> p.target(Observation(6400, 100, 64, gns=1024.0, gns_rel_std=2.0)) is None
        True
        >>> NoisePolicy(scale=8.0, exponent=0.5).target(Observation(0, 0, 64, gns=1024.0,
        ...                                                          gns_rel_std=0.0))
        256.0
        >>> lcb = NoisePolicy(scale=0.25, max_rel_std=None, confidence=2.0)
        >>> lcb.target(Observation(6400, 100, 64, gns=1024.0, gns_rel_std=1.5))  # 1024 / 4
        64.0
    """

    name = "noise"

    def __init__(
        self,
        scale: float = 1.0,
        exponent: float = 1.0,
        max_rel_std: float | None = 0.5,
        confidence: float = 0.0,
    ) -> None:
        self.scale = _check_float("scale", scale, 0.0, strict=True)
        self.exponent = _check_float("exponent", exponent, 0.0, strict=True)
        if self.exponent > 1.0:
            raise ValueError(f"exponent={exponent!r} must be in (0, 1]")
        self.max_rel_std = (
            None if max_rel_std is None else _check_float("max_rel_std", max_rel_std, 0.0)
        )
        self.confidence = _check_float("confidence", confidence, 0.0)

    def target(self, obs: Observation) -> float | None:
        """``scale * gns ** exponent``, or ``None`` while the estimate is not trustworthy."""
        if not _trusted(obs, self.max_rel_std):
            return None
        gns = float(obs.gns)  # type: ignore[arg-type]
        if self.confidence > 0:
            rel = obs.gns_rel_std
            if rel is None or not math.isfinite(rel):
                return None
            gns /= 1.0 + self.confidence * rel
        return self.scale * gns**self.exponent


class GoodputPolicy(Policy):
    """Maximise goodput = throughput(B) * 1 / (1 + B / B_noise) (Pollux, Qiao et al. 2021).

    ``1 / (1 + B / B_noise)`` is the statistical efficiency: the progress per sample relative
    to a tiny batch (McCandlish et al. 2018). Throughput is learned online: each observation
    adds a step time ``t = B / throughput`` to a per-batch-size moving average, and
    ``t(B) = a + b * B`` is fitted by least squares with ``a, b >= 0`` (one point per
    observed batch size). Then goodput ``B / (a + b B) * B_n / (B_n + B)`` has its maximum at
    ``B* = sqrt(a * B_noise / b)`` (set the derivative of its log to zero), and the best
    point of the granularity grid is one of the two grid points around it.

    Exploration: with a single observed batch size ``a`` and ``b`` cannot be told apart, and
    the prior is perfect scaling (``b = 0``), so goodput rises with ``B``; the search is
    capped at ``explore_factor`` times the largest batch observed so far at every step, so
    the policy grows by at most that factor before it has measured the new size.

    Under DDP the throughput must be the same number on every rank (all-reduce or broadcast
    it before building the :class:`Observation`): a per-rank wall-clock measurement would
    make ranks decide different batch sizes.

    Args:
        min_batch_size, max_batch_size, granularity: the candidate grid (multiples of
            ``granularity`` within the bounds, rounded inward).
        explore_factor: cap on the target relative to the largest observed batch (> 1).
        smoothing: weight of the old value in each batch size's step-time average, in
            ``[0, 1)`` (the first measurement is taken as is).
        max_rel_std: as in :class:`NoisePolicy`.

    Raises:
        ValueError: on bad bounds (see :class:`BatchSizeDecider`), ``explore_factor <= 1``
            or ``smoothing`` outside ``[0, 1)``.

    Example::

        >>> p = GoodputPolicy(min_batch_size=32, max_batch_size=4096, granularity=32)
        >>> # time per step 0.1 s at both sizes: perfect scaling -> grow (by <= 2x)
        >>> p.target(Observation(0, 0, 64, gns=10_000.0, gns_rel_std=0.1, throughput=640.0))
        128.0
        >>> p.target(Observation(6400, 100, 128, gns=10_000.0, gns_rel_std=0.1,
        ...                      throughput=1280.0))
        256.0
    """

    name = "goodput"

    def __init__(
        self,
        min_batch_size: int = 1,
        max_batch_size: int = 1 << 20,
        granularity: int = 1,
        explore_factor: float = 2.0,
        smoothing: float = 0.5,
        max_rel_std: float | None = 0.5,
    ) -> None:
        self.min_batch_size, self.max_batch_size, self.granularity = _grid_bounds(
            min_batch_size, max_batch_size, granularity
        )
        self.explore_factor = _check_float("explore_factor", explore_factor, 1.0, strict=True)
        self.smoothing = _check_float("smoothing", smoothing, 0.0)
        if self.smoothing >= 1.0:
            raise ValueError(f"smoothing={smoothing!r} must be in [0, 1)")
        self.max_rel_std = (
            None if max_rel_std is None else _check_float("max_rel_std", max_rel_std, 0.0)
        )
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
        """Record ``obs.throughput``, then the goodput-optimal batch on the grid (or None)."""
        if obs.throughput is not None:
            self.observe(obs.batch_size, obs.throughput)
        model = self.step_time_model()
        if model is None or not _trusted(obs, self.max_rel_std):
            return None
        a, b = model
        gns = float(obs.gns)  # type: ignore[arg-type]
        g = self.granularity
        hi = min(self.max_batch_size, self.explore_factor * max(self._step_time))
        hi = max(self.min_batch_size, math.floor(hi / g) * g)
        lo = self.min_batch_size
        best = math.inf if b == 0 else math.sqrt(a * gns / b)
        best = min(max(best, lo), hi)
        below = max(lo, math.floor(best / g) * g)
        above = min(hi, below + g)
        return float(max((below, above), key=lambda x: (self.goodput(x, gns), -x)))

    def state_dict(self) -> dict[str, Any]:
        """The step-time averages as ``[[batch_size, seconds], ...]``."""
        return {"step_time": [[k, v] for k, v in sorted(self._step_time.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self._step_time = {int(k): float(v) for k, v in state.get("step_time", [])}


class RampPolicy(Policy):
    """Linear ramp in samples from ``start_batch_size`` to ``end_batch_size`` (ignores gns).

    As Megatron-LM's ``--rampup-batch-size start increment ramp_samples``: with an
    ``increment`` the batch grows in steps of ``increment``, one every
    ``ramp_samples / ((end - start) / increment)`` samples; without one it is interpolated
    linearly (and rounded by the decider). Counting samples, not steps, keeps the ramp's
    shape whatever the batch does. The decider's hysteresis coarsens the ramp (steps of at
    least that fraction; the end, a bound, is always reached); use ``hysteresis=0`` to follow
    it exactly.

    Raises:
        ValueError: on batch sizes < 1, ``ramp_samples < 0``, ``increment < 1`` or an
            ``increment`` that does not divide ``end - start``.

    Example::

        >>> p = RampPolicy(32, 64, ramp_samples=1000, increment=8)
        >>> [p.target(Observation(s, 0, 32)) for s in (0, 249, 250, 999, 1000, 5000)]
        [32.0, 32.0, 40.0, 56.0, 64.0, 64.0]
        >>> RampPolicy(32, 64, ramp_samples=1000).target(Observation(500, 0, 32))
        48.0
    """

    name = "ramp"

    def __init__(
        self,
        start_batch_size: int,
        end_batch_size: int,
        ramp_samples: int,
        increment: int | None = None,
    ) -> None:
        self.start_batch_size = _check_int("start_batch_size", start_batch_size, 1)
        self.end_batch_size = _check_int("end_batch_size", end_batch_size, 1)
        self.ramp_samples = _check_int("ramp_samples", ramp_samples, 0)
        if increment is not None:
            _check_int("increment", increment, 1)
            if (end_batch_size - start_batch_size) % increment:
                raise ValueError(
                    f"increment={increment} must divide end_batch_size - start_batch_size "
                    f"= {end_batch_size - start_batch_size}"
                )
        self.increment = increment

    def target(self, obs: Observation) -> float:
        """The ramp's batch size after ``obs.samples`` samples."""
        start, end = self.start_batch_size, self.end_batch_size
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

    name = "fixed"

    def target(self, obs: Observation) -> None:
        """Always ``None``."""
        return None


#: Policy names accepted by :func:`make_policy`.
POLICIES: dict[str, type[Policy]] = {
    "noise": NoisePolicy,
    "goodput": GoodputPolicy,
    "ramp": RampPolicy,
    "fixed": FixedPolicy,
}


def make_policy(name: str, **kwargs: Any) -> Policy:
    """Build a policy by name (``noise``, ``goodput``, ``ramp``, ``fixed``).

    Raises:
        ValueError: on an unknown name (listing the valid ones) or an argument the policy
            does not take (listing the ones it does).

    Example::

        >>> make_policy("noise", scale=0.2)
        NoisePolicy(scale=0.2, exponent=1.0, max_rel_std=0.5, confidence=0.0)
        >>> make_policy("nosie")
        Traceback (most recent call last):
        ...
        ValueError: policy name='nosie' is not one of ['noise', 'goodput', 'ramp', 'fixed']
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"policy name={name!r} is not one of {list(POLICIES)}")
    params = [p for p in inspect.signature(cls).parameters if p not in ("self",)]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"policy {name!r} does not take {unknown}; it takes {params}")
    return cls(**kwargs)


def _grid_bounds(min_batch_size: Any, max_batch_size: Any, granularity: Any) -> tuple[int, ...]:
    """Validate bounds and round them inward to multiples of ``granularity``."""
    _check_int("min_batch_size", min_batch_size, 1)
    _check_int("max_batch_size", max_batch_size, 1)
    _check_int("granularity", granularity, 1)
    if min_batch_size > max_batch_size:
        raise ValueError(
            f"min_batch_size={min_batch_size} must be <= max_batch_size={max_batch_size}"
        )
    lo = -(-min_batch_size // granularity) * granularity
    hi = max_batch_size // granularity * granularity
    if lo > hi:
        raise ValueError(
            f"no multiple of granularity={granularity} lies in "
            f"[min_batch_size={min_batch_size}, max_batch_size={max_batch_size}]"
        )
    return lo, hi, granularity


class BatchSizeDecider:
    """Turns a policy's target into the next global batch size, with discipline.

    ``decide(target, current, samples)``:

    1. ``None`` or a non-finite target keeps ``current``;
    2. the target is clipped to the bounds and rounded (half up) to a multiple of
       ``granularity`` (bounds are rounded inward to multiples of it);
    3. with ``never_decrease``, a smaller result keeps ``current``;
    4. the batch changes only when ``|target / current - 1| > hysteresis`` and at least
       ``min_samples_between_changes`` samples have passed since the last change (or since
       sample 0). Two exceptions: a ``current`` outside the bounds is always moved inside,
       and a target at or beyond a bound skips the hysteresis (the bound is then a stable
       answer, not noise; without this a batch at 0.9 x max would never reach max, nor a
       ramp its end).

    Pure given its state (the sample count at the last change), so the same inputs on
    every rank give the same decision.

    Raises:
        ValueError: on bounds < 1, ``min > max``, no grid point within the bounds,
            ``hysteresis < 0`` or ``min_samples_between_changes < 0``.

    Example::

        >>> d = BatchSizeDecider(32, 1024, granularity=32, hysteresis=0.2)
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
        min_batch_size: int,
        max_batch_size: int,
        granularity: int = 1,
        hysteresis: float = 0.2,
        min_samples_between_changes: int = 0,
        never_decrease: bool = False,
    ) -> None:
        self.min_batch_size, self.max_batch_size, self.granularity = _grid_bounds(
            min_batch_size, max_batch_size, granularity
        )
        self.hysteresis = _check_float("hysteresis", hysteresis, 0.0)
        self.min_samples_between_changes = _check_int(
            "min_samples_between_changes", min_samples_between_changes, 0
        )
        self.never_decrease = bool(never_decrease)
        self.last_change_samples = 0
        self.num_changes = 0

    def round(self, target: float) -> int:
        """Clip ``target`` to the bounds and round it to the granularity grid.

        Example::

            >>> BatchSizeDecider(32, 1024, granularity=32).round(47.0)
            32
            >>> BatchSizeDecider(32, 1024, granularity=32).round(48.0)
            64
        """
        g = self.granularity
        t = min(max(float(target), self.min_batch_size), self.max_batch_size)
        return min(max(math.floor(t / g + 0.5) * g, self.min_batch_size), self.max_batch_size)

    def decide(self, target: float | None, current: int, samples: int) -> int:
        """The batch size to use from now on (see the class docstring).

        Raises:
            ValueError: on ``current < 1``, ``samples < 0``, or ``samples`` before the last
                change (a state_dict that does not belong to this run).
        """
        _check_int("current", current, 1)
        _check_int("samples", samples, 0)
        if samples < self.last_change_samples:
            raise ValueError(
                f"samples={samples} is before the last change at "
                f"{self.last_change_samples} samples; restore the decider's state_dict "
                "together with the sample counter"
            )
        if target is None or not math.isfinite(float(target)):
            return current
        new = self.round(target)
        out_of_bounds = not self.min_batch_size <= current <= self.max_batch_size
        at_bound = not self.min_batch_size < target < self.max_batch_size
        if new == current:
            return current
        if not out_of_bounds:
            if self.never_decrease and new < current:
                return current
            # Against the unrounded target: a target sitting on a rounding boundary would
            # otherwise flip between two grid points, each one grid step (> hysteresis) away.
            if not at_bound and abs(float(target) / current - 1.0) <= self.hysteresis:
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
        self.last_change_samples = int(state.get("last_change_samples", 0))
        self.num_changes = int(state.get("num_changes", 0))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(min_batch_size={self.min_batch_size}, "
            f"max_batch_size={self.max_batch_size}, granularity={self.granularity}, "
            f"hysteresis={self.hysteresis}, "
            f"min_samples_between_changes={self.min_samples_between_changes}, "
            f"never_decrease={self.never_decrease})"
        )
