"""`RunSummary`: what a fit did, for every user (plain Python and the ``adabatch`` command).

The `AdaptiveBatchSize` callback builds one at the end of training and prints it on rank 0;
``adabatch fit`` writes the same object to ``summary.json``. Counters come from the
callback's own state, which a checkpoint restores, so a resumed run reports the whole run
(samples and steps since the first step, the batch history from the starting batch), not
the current session only. Wall time is this session's.

The batch-size history is the callback's ``history``: a list of dicts, one per decided
change, ``{"step": S, "samples": N, "batch_size": new, "from": old}`` where ``step`` and
``samples`` are the optimizer steps and samples done when the change was decided (the
change reaches training at the next aligned boundary; the logged ``adabatch/batch_size`` is
the measured one). The summary prepends the starting batch as ``{"step": 0, "samples": 0,
"batch_size": start}``.

Example::

    >>> s = RunSummary(steps=10, samples=120, start_batch_size=8, stop_reason="max_samples",
    ...                history=[{"step": 5, "samples": 40, "batch_size": 16, "from": 8}])
    >>> s.batch_sizes
    [8, 16]
    >>> s.to_dict()["stop_reason"]
    'max_samples'
    >>> print(s)
    adabatch run summary
      stopped by          max_samples
      optimizer steps     10
      samples             120
      global batch size   8 (step 0, 0 samples) -> 16 (step 5, 40 samples)
      noise measured      ?
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from adabatch.control.critical import lossless

# Why a fit ended, in the order they are checked (the first that holds wins).
STOP_REASONS = ("interrupted", "error", "max_samples", "max_steps", "max_epochs", "max_time",
                "early_stopping", "should_stop", "data exhausted")


@dataclass
class RunSummary:
    """The closing numbers of a fit.

    Args:
        steps: optimizer steps of the whole run (the callback's restored counter on resume).
        samples: samples of the whole run.
        start_batch_size: the global batch the run started with (None if unknown).
        history: batch-size decisions (see the module docstring).
        stop_reason: one of `STOP_REASONS`, or None while training runs.
        max_samples: the callback's sample budget, if any.
        noise_source: ``per_example``, ``microbatch`` or None (not measured / disabled).
        covered: number of parameters the per-example probe measures (None for micro-batch
            statistics, which see every parameter).
        uncovered: names of parameters left out of the measurement.
        measured: False when no estimate was ever made (e.g. no small batch).
        not_measured_reason: why, when ``measured`` is False or a warning applies.
        updates: accepted estimator updates; skipped: updates skipped (non-finite, or
            steps the estimator refused).
        gns: the final noise-scale estimate (B_simple), if any.
        probe_windows: branched critical-batch probes run (None: the policy has no probe);
            probe_conclusive: those that resolved an answer (main progress on the probe
            set, and a ratio whose confidence interval excludes some answer).
        probe_overhead: the probes' compute as a fraction of the samples trained.
        critical_batch: the last conclusive probe's critical batch, from its ratio's lower
            confidence bound; when that probe found no loss at ``k x B`` it is the largest
            level one probe resolves and ``critical_batch_bounded`` is False.
        larger_start: every conclusive probe (at least two) found no loss at ``k x B`` with
            the lr scaled by the rule (the ratio's lower bound at least ``1 - tolerance``):
            the batch stayed below what the lr allows.
        wall_time_s: this session's wall time; train_loss / val_loss: last logged values.
        enabled: whether the adabatch callback was enabled.
        log_dir: the trainer's log directory.
    """

    steps: int = 0
    samples: int = 0
    start_batch_size: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    max_samples: int | None = None
    noise_source: str | None = None
    covered: int | None = None
    uncovered: list[str] = field(default_factory=list)
    measured: bool = True
    not_measured_reason: str | None = None
    updates: int | None = None
    skipped: int | None = None
    gns: float | None = None
    probe_windows: int | None = None
    probe_conclusive: int | None = None
    probe_overhead: float | None = None
    critical_batch: float | None = None
    critical_batch_bounded: bool = True
    probe_last: dict[str, Any] | None = None
    larger_start: bool = False
    wall_time_s: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    enabled: bool = True
    log_dir: str | None = None

    # ---------------------------------------------------------------- derived
    @property
    def batch_history(self) -> list[dict[str, Any]]:
        """The starting batch followed by each decided change."""
        head = []
        if self.start_batch_size is not None:
            head = [{"step": 0, "samples": 0, "batch_size": int(self.start_batch_size)}]
        return head + [dict(h) for h in self.history]

    @property
    def batch_sizes(self) -> list[int]:
        """The global batch sizes the run went through, in order."""
        return [int(h["batch_size"]) for h in self.batch_history if "batch_size" in h]

    @property
    def samples_per_s(self) -> float | None:
        if not self.wall_time_s or self.wall_time_s <= 0:
            return None
        return self.samples / self.wall_time_s

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``summary.json``); ``batch_size_history`` includes the start."""
        out = asdict(self)
        out.pop("history")
        out["batch_size_history"] = _jsonable(self.batch_history)
        out["samples_per_s"] = None if self.samples_per_s is None else round(self.samples_per_s, 1)
        if self.wall_time_s is not None:
            out["wall_time_s"] = round(self.wall_time_s, 3)
        return out

    def __str__(self) -> str:
        rows: list[tuple[str, str]] = [
            ("stopped by", self.stop_reason or "-"),
            ("optimizer steps", f"{self.steps:,}"),
            ("samples", f"{self.samples:,}"
             + (f" of max_samples={self.max_samples:,}" if self.max_samples else "")),
        ]
        if self.wall_time_s is not None:
            rate = self.samples_per_s
            rows.append(("wall (session)", f"{self.wall_time_s:.1f} s"
                         + (f", {rate:,.0f} samples/s" if rate else "")))
        if self.train_loss is not None or self.val_loss is not None:
            rows.append(("loss", f"train {_num(self.train_loss)}   val {_num(self.val_loss)}"))
        rows.append(("global batch size", _format_history(self.batch_history)))
        if not self.enabled:
            rows.append(("adabatch", "disabled (fixed batch)"))
        else:
            rows.append(("noise measured", self._measured_text()))
            if self.gns is not None:
                rows.append(("noise scale", f"B_simple {self.gns:.4g}"))
            if self.probe_windows is not None:
                rows.append(("critical batch", self._probe_text()))
            if self.larger_start and self.probe_last is not None:
                k = self.probe_last["factor"]
                rows.append(("advice", f"every probe found no loss at {k}x the batch with the "
                             f"lr scaled by the rule: starting at {k}x, the lr scaled the same "
                             "way, may cost nothing (docs/POLICIES.md)"))
        if self.log_dir:
            rows.append(("logs", f"{self.log_dir}  (adabatch plot {self.log_dir})"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(["adabatch run summary"]
                         + [f"  {k.ljust(width)}   {v}" for k, v in rows])

    def _probe_text(self) -> str:
        text = (f"{self.probe_windows} probe window(s), {self.probe_conclusive} conclusive, "
                f"cost {_pct(self.probe_overhead)} of the samples")
        last = self.probe_last
        if last is None or self.critical_batch is None:
            return text
        bound = "" if self.critical_batch_bounded else ">= "
        std = last.get("ratio_std")
        ratio = f"r {last['ratio']:.3f}" + ("" if std is None else f" +- {std:.3f}")
        return (f"{text}; last: B_crit {bound}{self.critical_batch:.4g} (B={last['batch_size']}"
                f" vs {last['factor']}x, {ratio}, at {last['samples']:,} samples)")

    def _measured_text(self) -> str:
        if not self.measured:
            return "NO" + (f": {self.not_measured_reason}" if self.not_measured_reason else "")
        parts = [self.noise_source or "?"]
        if self.covered is not None:
            parts.append(f"{self.covered} parameter(s) covered")
        if self.uncovered:
            names = ", ".join(self.uncovered[:3]) + (", ..." if len(self.uncovered) > 3 else "")
            parts.append(f"{len(self.uncovered)} not measured ({names})")
        if self.updates is not None:
            parts.append(f"{self.updates:,} updates")
        if self.skipped:
            parts.append(f"{self.skipped:,} skipped")
        text = ", ".join(parts)
        if self.not_measured_reason:
            text += f"; {self.not_measured_reason}"
        return text

    # ---------------------------------------------------------------- building
    @classmethod
    def from_trainer(cls, trainer: Any, callback: Any = None,
                     exception: BaseException | None = None,
                     t_start: float | None = None) -> RunSummary:
        """Build from a trainer and (optionally) its `AdaptiveBatchSize` callback.

        An enabled callback gives samples, steps and history from its (restored) state. A
        disabled or absent one: steps from ``trainer.global_step`` and samples as the
        completed training batches times the loader's batch size and world size (a
        checkpoint restores both counters; an epoch's short last batch counts in full).
        ``t_start`` is a `time.perf_counter` reading: the wall time runs from it to now.
        """
        wall_time_s = None if t_start is None else time.perf_counter() - t_start
        metrics = getattr(trainer, "callback_metrics", {}) or {}
        enabled = bool(callback is not None and getattr(callback, "enabled", False))
        s = cls(
            stop_reason=stop_reason(trainer, callback, exception),
            wall_time_s=wall_time_s,
            train_loss=_scalar(metrics.get("train_loss")),
            val_loss=_scalar(metrics.get("val_loss")),
            enabled=enabled,
            log_dir=getattr(trainer, "log_dir", None),
        )
        if enabled:
            s.steps = int(callback.steps)
            s.samples = int(callback.samples)
            s.start_batch_size = getattr(callback, "_start", None)
            s.history = [dict(h) for h in getattr(callback, "history", [])]
            s.max_samples = getattr(callback, "max_samples", None)
            s._read_measurement(callback)
        else:
            s.steps = int(trainer.global_step)
            micro = _loader_batch_size(trainer)
            batches = _completed_batches(trainer)
            if micro is not None:
                world = int(getattr(trainer, "world_size", 1) or 1)
                s.samples = batches * micro * world
                accumulation = getattr(trainer, "accumulate_grad_batches", 1)
                if isinstance(accumulation, int):
                    s.start_batch_size = micro * accumulation * world
            s.measured = False
            s.not_measured_reason = "adabatch disabled"
        return s

    def _read_measurement(self, cb: Any) -> None:
        self.noise_source = getattr(cb, "_source", None)
        probe = getattr(cb, "_probe", None)
        if probe is not None and hasattr(probe, "uncovered"):
            uncovered = list(probe.uncovered)
            self.uncovered = [str(u) if not isinstance(u, (tuple, list)) else str(u[0])
                              for u in uncovered]
            covered = getattr(probe, "covered", None)
            if covered is not None and self.noise_source == "per_example":
                self.covered = len(tuple(covered))
        est = getattr(cb, "estimator", None)
        if est is not None:
            self.updates = int(getattr(est, "num_updates", 0))
            self.skipped = int(getattr(est, "num_skipped", 0))
            gns = getattr(est, "gns", None)
            self.gns = float(gns) if gns is not None and math.isfinite(gns) else None
        self._read_probes(cb)
        if getattr(cb, "_warned_no_small_batch", False):
            self.not_measured_reason = ("no small batch below the global batch: use gradient "
                                        "accumulation, several ranks or noise='per_example'")
        if self.updates == 0 and self.steps > 0:
            self.measured = False
            self.not_measured_reason = self.not_measured_reason or "no estimator update accepted"


    def _read_probes(self, cb: Any) -> None:
        policy = getattr(cb, "policy", None)
        config = getattr(policy, "probe", None)
        results = getattr(policy, "results", None)
        if config is None or not isinstance(results, list):
            return
        z = float(getattr(policy, "confidence", 2.0))
        branch = getattr(cb, "_branch", None)
        spent = float(getattr(branch, "spent", 0.0))
        conclusive = [r for r in results if r.critical_batch_lower(z) is not None]
        self.probe_windows, self.probe_conclusive = len(results), len(conclusive)
        self.probe_overhead = spent / self.samples if self.samples else None
        if not conclusive:
            return
        last = conclusive[-1]
        crit = float(last.critical_batch_lower(z))  # conclusive: not None
        self.critical_batch_bounded = crit < last.resolvable
        self.critical_batch = min(crit, last.resolvable)
        self.probe_last = {"samples": last.samples, "batch_size": last.batch_size,
                           "factor": last.factor, "ratio": last.ratio,
                           "ratio_std": last.ratio_std}
        self.larger_start = lossless(results, z)


def print_summary(summary: RunSummary) -> None:
    """Print the summary on rank 0 (the global rank from the environment, as Lightning's
    ``rank_zero_only`` reads it)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print("\n" + str(summary), flush=True)


def stop_reason(trainer: Any, callback: Any = None,
                exception: BaseException | None = None) -> str | None:
    """Why the fit ended: the first of `STOP_REASONS` that holds."""
    if exception is not None:
        return "interrupted" if isinstance(exception, KeyboardInterrupt) else (
            f"error ({type(exception).__name__})")
    if getattr(trainer, "interrupted", False):
        return "interrupted"
    if callback is not None and getattr(callback, "enabled", False):
        budget = getattr(callback, "max_samples", None)
        if budget is not None and callback.samples >= budget:
            return "max_samples"
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return "max_steps"
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs:
        return "max_epochs"
    for cb in getattr(trainer, "callbacks", []):
        name = type(cb).__name__
        if name == "Timer" and getattr(cb, "_duration", None) is not None:
            remaining = cb.time_remaining() if hasattr(cb, "time_remaining") else None
            if remaining is not None and remaining <= 0:
                return "max_time"
        reason = getattr(cb, "stopping_reason", None)  # EarlyStopping (Lightning >= 2.5)
        if name == "EarlyStopping" and getattr(reason, "name", "NOT_STOPPED") != "NOT_STOPPED":
            return "early_stopping"
    if getattr(trainer, "should_stop", False):
        return "should_stop"
    return "data exhausted"


def _loader_batch_size(trainer: Any) -> int | None:
    loader = getattr(trainer, "train_dataloader", None)
    for obj in (loader, getattr(loader, "batch_sampler", None)):
        size = getattr(obj, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


def _completed_batches(trainer: Any) -> int:
    try:
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)
    except AttributeError:
        return 0


def _format_history(hist: list[dict[str, Any]]) -> str:
    if not hist:
        return "n/a"
    if len(hist) > 12:  # the first and the last changes
        hist = [*hist[:6], {}, *hist[-5:]]

    def one(h: dict[str, Any]) -> str:
        if not h:
            return "..."
        samples = h.get("samples")
        samples = f"{samples:,.0f}" if isinstance(samples, (int, float)) else "?"
        return f"{h.get('batch_size', '?')} (step {h.get('step', '?')}, {samples} samples)"

    return " -> ".join(one(h) for h in hist)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))
