"""Shared benchmark utilities: run context, RESULTS.md sections, quiet Lightning runs.

Every benchmark script records the context its numbers were measured in (Liger-Kernel's
``benchmark/scripts/utils.py`` habit): the exact command, the date, the device and CPU load,
and the torch / Lightning versions. It writes its results as one section of
``benchmarks/RESULTS.md`` between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers,
replacing only its own section (other scripts write theirs to the same file, under a file lock).

Also here, because several scripts need them (time_to_target, rule_fidelity, equal_budget):

- `quiet_lightning` silences Lightning's info logs and warnings for hundreds of short fits;
- `fast_trainer` builds a CPU `Trainer` with no logger, checkpointing or progress bar;
- `quiet_module` turns a task's LightningModule class into one whose ``training_step`` does
  not log (``self.log`` costs ~1 ms per call on CPU, more than a tiny model's step);
- `BatchedTensorDataset` / `BatchedWindows`: datasets with ``__getitems__``, so a
  `ResizableDataLoader` gathers a batch with one indexing op instead of B ``__getitem__`` calls
  (at B = 512 on the synthetic task, per-item fetching was half the step time);
- `Progress`: a callback recording, at each optimizer step, samples, batch size, the
  measured noise scale and (on a schedule) an evaluation loss; it stops a run at a target
  loss, a sample / step budget or divergence, and times training without the evaluations;
- `pareto` / `frontier_steps` / `frontier_samples`: the fixed-batch (samples, steps) frontier
  of a steps-to-target comparison;
- `trajectory_model` / `predicted_saving`: McCandlish et al.'s App. D model of a run's
  (B, B_noise) trajectory and the step saving it predicts.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from results import cpu_name, write_section  # noqa: F401  (re-exported for the scripts)
from torch.utils.data import Dataset

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "RESULTS.md"
FIGURES_DIR = BENCH_DIR / "figures"


# ----------------------------------------------------------------------------- context
def load_average() -> str:
    """The 1/5/15-minute load averages over the number of CPUs, e.g. ``4.4/4.6/4.5 on 2``."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} CPUs"


def device_line() -> str:
    """Device, CPU, load, thread count and library versions, for a results row."""
    import lightning

    if torch.cuda.is_available():
        dev = f"CUDA {torch.cuda.get_device_name(0)} (+ CPU {cpu_name()})"
    else:
        dev = f"CPU {cpu_name()}, {os.cpu_count()} cores"
    return (
        f"{dev}; torch {torch.__version__}, lightning {lightning.__version__}, "
        f"python {platform.python_version()}, torch threads {torch.get_num_threads()}"
    )


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run: ``python benchmarks/<script> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, args)])


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def context_lines(script: str, argv: Sequence[str] | None, load_before: str) -> list[str]:
    """Markdown bullet lines: command, date, device and versions, CPU load before/after."""
    return [
        f"- command: `{command_line(script, argv)}`",
        f"- date: {now()}",
        f"- device: {device_line()}",
        f"- CPU load (1/5/15 min) at start: {load_before}; at end: {load_average()} "
        "(the machine is shared: wall times are noisy, step and sample counts are not)",
    ]


def goal_line(text: str, met: bool | None, detail: str) -> str:
    """One line per goal: ``- goal: ... -- **met** (numbers)``; ``None`` = not measured."""
    verdict = "not measured" if met is None else ("met" if met else "missed")
    return f"- goal: {text} -- **{verdict}** ({detail})"


# ----------------------------------------------------------------------------- RESULTS.md
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells are ``str()``-ed)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".3g", missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def median_range(values: Sequence[float], spec: str = ".3g") -> str:
    """``median [min, max]`` of the finite values, ``n/a`` if none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    med = statistics.median(vals)
    if len(vals) == 1:
        return format(med, spec)
    return f"{format(med, spec)} [{format(min(vals), spec)}, {format(max(vals), spec)}]"


def finite_median(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


# ----------------------------------------------------------------------------- Lightning
def quiet_lightning() -> None:
    """Silence Lightning's per-fit info logs and the warnings short benchmark fits trigger."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def fast_trainer(callbacks: list, root: str | Path, **kwargs: Any):
    """A CPU `Trainer` that only trains: no logger, checkpoints, progress bar or validation."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(root), max_epochs=-1,
    )
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


_QUIET: dict[type, type] = {}


def quiet_module(cls: type) -> type:
    """Subclass of a `TaskModule` class whose ``training_step`` returns the loss unlogged."""
    if cls not in _QUIET:
        def training_step(self, batch, batch_idx):  # noqa: ANN001
            return self.loss(batch)

        _QUIET[cls] = type(f"Quiet{cls.__name__}", (cls,), {"training_step": training_step})
    return _QUIET[cls]


def identity_collate(batch: Any) -> Any:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class BatchedTensorDataset(Dataset):
    """`TensorDataset` whose ``__getitems__`` gathers a whole batch with one index op."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("tensors must be given and share their first dimension")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


class BatchedWindows(Dataset):
    """The windows of a char-LM `WindowDataset`, gathered a batch at a time."""

    def __init__(self, windows: Any) -> None:
        self.tokens, self.offsets, self.context = windows.tokens, windows.offsets, windows.context
        self._span = torch.arange(self.context + 1)

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.offsets[torch.as_tensor(indices, dtype=torch.long)]
        w = self.tokens[starts[:, None] + self._span].long()
        return w[:, :-1], w[:, 1:]


def resizable_loader(dataset: Dataset, batch_size: int, seed: int):
    """A checkpointable `ResizableDataLoader` over ``dataset`` (sampler-mode resizing)."""
    from adabatch.data import ResizableBatchSampler, ResizableDataLoader

    sampler = ResizableBatchSampler(dataset, batch_size, seed=seed)
    collate = identity_collate if hasattr(dataset, "__getitems__") else None
    kwargs = {"collate_fn": collate} if collate is not None else {}
    return ResizableDataLoader(dataset, sampler, **kwargs)


@dataclass
class RunRecord:
    """What `Progress` saw in one run."""

    reached: bool = False
    diverged: bool = False
    steps_to_target: float = math.nan  # interpolated between evaluations
    samples_to_target: float = math.nan
    wall_to_target: float = math.nan  # seconds of training, evaluations excluded
    steps: int = 0
    samples: int = 0
    wall: float = 0.0
    evals: list[tuple[int, int, float]] = field(default_factory=list)  # (step, samples, loss)
    batch: list[int] = field(default_factory=list)  # per optimizer step
    gns: list[float] = field(default_factory=list)  # measured B_simple per step (nan: none)
    extra: list[dict[str, float]] = field(default_factory=list)  # task-specific, per step


def every_step(step: int) -> bool:
    return True


def geometric_schedule(ratio: float = 1.04, dense: int = 20) -> Callable[[int], bool]:
    """Evaluate at every step up to ``dense``, then at steps spaced by ``ratio`` (>= 1 apart).

    Depends only on the step number, so every run (fixed or adaptive) is evaluated at the
    same steps; the step at which a target is crossed is then known to ``ratio - 1``
    before interpolation.
    """
    points: set[int] = set(range(1, dense + 1))
    s = float(dense)
    while s < 1e7:
        s = max(s + 1, s * ratio)
        points.add(math.ceil(s))

    def due(step: int) -> bool:
        return step in points

    return due


class Progress(Callback):
    """Lightning callback: per-step bookkeeping, evaluation on a schedule, stop rules.

    Put it after `AdaptiveBatchSize` in the callback list. ``eval_fn(module) -> float`` is
    timed separately and excluded from the wall time. The run stops when the evaluated loss
    reaches ``target`` (the crossing step/samples are interpolated linearly in loss between
    the two evaluations around it), when ``max_samples`` or ``max_steps`` is reached, or when
    the loss is not finite or above ``diverge_factor`` x the first evaluation, or (with
    ``patience``) when that many evaluations in a row brought no new lowest loss (a run stuck
    on a plateau above the target: a learning rate too high for this batch).
    """

    def __init__(
        self,
        eval_fn: Callable[[Any], float],
        target: float | None,
        schedule: Callable[[int], bool] = every_step,
        max_samples: int | None = None,
        max_steps: int | None = None,
        adabatch: Any = None,
        extra_fn: Callable[[Any], dict[str, float]] | None = None,
        diverge_factor: float = 4.0,
        patience: int | None = None,
    ) -> None:
        super().__init__()
        self.patience = patience
        self._best = math.inf
        self._since_best = 0
        self.eval_fn, self.target, self.schedule = eval_fn, target, schedule
        self.max_samples, self.max_steps = max_samples, max_steps
        self.adabatch, self.extra_fn = adabatch, extra_fn
        self.diverge_factor = diverge_factor
        self.record = RunRecord()
        self._pending_samples = 0
        self._t0 = 0.0
        self._eval_time = 0.0
        self._first_loss: float | None = None

    def _evaluate(self, pl_module: Any) -> float:
        t = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            loss = float(self.eval_fn(pl_module))
        pl_module.train(was_training)
        self._eval_time += time.perf_counter() - t
        return loss

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        loss = self._evaluate(pl_module)
        self._first_loss = loss
        self.record.evals.append((0, 0, loss))
        self._eval_time = 0.0
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rec = self.record
        self._pending_samples += int(batch[0].shape[0])
        if trainer.global_step == rec.steps:
            return  # accumulating
        rec.steps = trainer.global_step
        rec.samples += self._pending_samples
        rec.batch.append(self._pending_samples)
        self._pending_samples = 0
        gns = None
        if self.adabatch is not None and self.adabatch.estimator is not None:
            gns = self.adabatch.estimator.gns
        rec.gns.append(math.nan if gns is None else float(gns))
        if self.extra_fn is not None:
            rec.extra.append(self.extra_fn(pl_module))
        rec.wall = time.perf_counter() - self._t0 - self._eval_time
        stop = False
        if self.schedule(rec.steps):
            loss = self._evaluate(pl_module)
            prev = rec.evals[-1]
            rec.evals.append((rec.steps, rec.samples, loss))
            if not math.isfinite(loss) or loss > self.diverge_factor * max(self._first_loss, 1e-12):
                rec.diverged, stop = True, True
            elif self.patience is not None and self._stalled(loss):
                rec.diverged, stop = True, True
            elif self.target is not None and loss <= self.target:
                frac = 1.0
                if prev[2] > loss:
                    frac = min(1.0, max(0.0, (prev[2] - self.target) / (prev[2] - loss)))
                rec.reached, stop = True, True
                rec.steps_to_target = prev[0] + frac * (rec.steps - prev[0])
                rec.samples_to_target = prev[1] + frac * (rec.samples - prev[1])
                rec.wall_to_target = rec.wall  # the evaluation interval is small
        if self.max_samples is not None and rec.samples >= self.max_samples:
            stop = True
        if self.max_steps is not None and rec.steps >= self.max_steps:
            stop = True
        if stop:
            trainer.should_stop = True


    def _stalled(self, loss: float) -> bool:
        if loss < self._best:
            self._best, self._since_best = loss, 0
            return False
        self._since_best += 1
        return self._since_best >= self.patience  # type: ignore[operator]


def set_threads(n: int) -> None:
    """Pin torch to ``n`` intra-op threads (tiny models: threads mostly add overhead)."""
    torch.set_num_threads(max(1, n))


# ----------------------------------------------------------------------------- frontiers
SAMPLE_TOLERANCE = 0.1  # fixed runs may spend this much more samples than the adaptive run


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(samples, steps) points no other point beats in both, sorted by samples."""
    pts = sorted(p for p in points if all(map(math.isfinite, p)))
    out: list[tuple[float, float]] = []
    for e, s in pts:
        if not out or s < out[-1][1]:
            out.append((e, s))
    return out


def frontier_steps(front: list[tuple[float, float]], samples: float,
                   tol: float = SAMPLE_TOLERANCE) -> float:
    """Steps of the fixed frontier at ``(1 + tol) * samples`` (log-log interpolation).

    The fixed runs are allowed ``tol`` more samples than the adaptive one: the frontier is
    nearly vertical where every small batch needs about the same samples, and there a
    comparison at exactly equal samples would turn seed noise in sample counts into large
    "savings". Below the fewest samples any fixed run needed, the frontier is taken at
    ``(1 + tol)`` times that (no fixed run reaches the target with fewer); above the most,
    at its last point.
    """
    if not front or not math.isfinite(samples):
        return math.nan
    samples = max(samples, front[0][0]) * (1.0 + tol)
    if samples <= front[0][0]:
        return front[0][1]
    if samples >= front[-1][0]:
        return front[-1][1]
    for (e0, s0), (e1, s1) in zip(front, front[1:]):
        if e0 <= samples <= e1:
            t = (math.log(samples) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0)))
    return math.nan


def frontier_samples(front: list[tuple[float, float]], steps: float) -> float:
    """Samples of the fixed frontier at ``steps`` (log-log interpolation, clamped).

    More steps than the frontier's first point: its samples (no fixed run used fewer);
    fewer steps than its last point: the last point's samples (no fixed run was faster).
    """
    if not front or not math.isfinite(steps):
        return math.nan
    if steps >= front[0][1]:
        return front[0][0]
    if steps <= front[-1][1]:
        return front[-1][0]
    for (e0, s0), (e1, s1) in zip(front, front[1:]):
        if s1 <= steps <= s0:
            t = (math.log(s0) - math.log(steps)) / (math.log(s0) - math.log(s1))
            return math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))
    return math.nan


# ----------------------------------------------------------------------------- the model
def trajectory_model(record: RunRecord, key: str = "gns") -> dict[str, float]:
    """gamma and P of McCandlish et al. 2018, App. D, from a run's per-step (B, B_noise).

    ``key`` is ``"gns"`` (the callback's estimate) or a key of ``record.extra``. Steps before
    the first finite estimate take that estimate. One step at batch B is worth
    ``dS_min = B / (B + B_noise)`` minimal steps and ``dE_min = B_noise dS_min`` minimal
    samples; averages are over that progress. Returns ``gamma = <sqrt B_noise>^2/<B_noise>``,
    ``P = <B_noise/B><B>/<B_noise>`` (the schedule actually used), ``s_min`` / ``e_min`` (the
    minimal steps / samples for the progress made), and ``first`` / ``last``, the medians of
    the first / last tenth of the finite values.
    """
    bn = record.gns if key == "gns" else [row.get(key, math.nan) for row in record.extra]
    finite = [v for v in bn if math.isfinite(v) and v > 0]
    if not finite:
        return dict.fromkeys(("gamma", "P", "first", "last", "s_min", "e_min"), math.nan)
    w_sum = w_sqrt = w_bn = w_ratio = w_b = 0.0
    last = finite[0]
    for b, v in zip(record.batch, bn):
        v = v if math.isfinite(v) and v > 0 else last
        last = v
        w = b / (b + v)
        w_sum += w
        w_sqrt += w * math.sqrt(v)
        w_bn += w * v
        w_ratio += w * v / b
        w_b += w * b
    tenth = max(1, len(finite) // 10)
    return {
        "gamma": (w_sqrt / w_sum) ** 2 / (w_bn / w_sum),
        "P": (w_ratio / w_sum) * (w_b / w_sum) / (w_bn / w_sum),
        "first": statistics.median(finite[:tenth]),
        "last": statistics.median(finite[-tenth:]),
        "s_min": w_sum,
        "e_min": w_bn,
    }


def predicted_saving(tradeoff: float, samples: float, e_min: float) -> float:
    """``1 - (1 + k/x) / (1 + 1/x)`` at sample overhead ``x = E/E_min - 1`` (k = gamma or P).

    McCandlish et al.'s trade-off ``(S/S_min - 1)(E/E_min - 1) = k``: at equal samples a
    schedule with ``k < 1`` needs that fraction fewer steps than a fixed batch (``k = 1``).
    ``nan`` when an input is not finite or ``samples <= e_min``.
    """
    if not all(map(math.isfinite, (tradeoff, samples, e_min))) or samples <= e_min:
        return math.nan
    x = samples / e_min - 1.0
    return 1.0 - (1.0 + tradeoff / x) / (1.0 + 1.0 / x)


def rel_path(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(BENCH_DIR.parent))
    except ValueError:
        return str(path)


def charlm_windows(context: int) -> tuple[BatchedWindows, Any, Any]:
    """The char-LM benchmark data: train windows (batched fetching) and the whole validation
    set as two tensors (the first 1.5 MB of stdlib source, 128 validation windows)."""
    from adabatch.tasks.charlm import CharLMData

    data = CharLMData(batch_size=8, context=context, max_bytes=1_500_000, max_val_windows=128)
    data.setup("fit")
    val = BatchedWindows(data.val_set)
    val_x, val_y = val.__getitems__(list(range(len(val))))
    return BatchedWindows(data.train_set), val_x, val_y


def publish(text: str, results: Path | str | None, section: str) -> None:
    """Print a benchmark's section and, unless ``results`` is None, write it to that
    RESULTS.md (replacing the section of the same name)."""
    print(text)
    if results is not None:
        write_section(results, section, text)
        print(f"wrote section '{section}' to {results}")
