"""A run's logged metrics, read back from a `CSVLogger` ``metrics.csv`` or TensorBoard events.

`load_run(path)` finds the log under a run directory (``metrics.csv`` or
``events.out.tfevents.*``; the newest when several), reads each metric's (step, value)
pairs and the run's batch size from the LightningCLI ``config.yaml`` or the logger's
``hparams.yaml`` beside it. `Metrics.series` puts a metric on a samples axis: the logged
``adabatch/samples`` when the callback was enabled, else steps x the configured global
batch (a fixed-batch baseline), so adaptive and fixed runs can be compared at equal data.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES_KEY = "adabatch/samples"
TB_GLOB = "events.out.tfevents.*"


class Metrics:
    """Each metric's logged ``(steps, values)``, with the run's configured batch size.

    Args:
        path: a ``metrics.csv`` (CSVLogger). Use `Metrics.from_tensorboard` for event files
            and `load_run` for a run directory.
    """

    def __init__(self, path: str | Path | None = None,
                 series: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.batch_size: int | None = None  # configured global batch (fixed-batch runs)
        self.label = "" if self.path is None else str(self.path.parent)
        if series is not None:
            self._series = dict(series)
            return
        if self.path is None:
            raise ValueError("Metrics needs a metrics.csv path or series")
        self._series = _read_csv(self.path)

    @classmethod
    def from_tensorboard(cls, path: str | Path) -> Metrics:
        """Scalars of a TensorBoard event file, or of every event file in a directory."""
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading TensorBoard logs needs tensorboard: "
                              "pip install 'adabatch[plot]'") from e
        path = Path(path)
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        series = {}
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            if events:
                series[tag] = (np.array([e.step for e in events], dtype=float),
                               np.array([e.value for e in events], dtype=float))
        if not series:
            raise ValueError(f"{path} holds no scalars: not a TensorBoard log of a run")
        m = cls(series=series)
        m.path = path
        m.label = str(path.parent if path.is_file() else path)
        return m

    def has(self, column: str) -> bool:
        return column in self._series

    def names(self) -> list[str]:
        return list(self._series)

    def last_step(self) -> float:
        """The largest step any metric was logged at."""
        return max((float(s.max()) for s, _ in self._series.values() if s.size), default=0.0)

    def has_samples(self) -> bool:
        """Whether a samples axis exists (logged, or derived from a configured batch)."""
        return self.has(SAMPLES_KEY) or self.batch_size is not None

    def series(self, column: str, x: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
        """``(x, y, x_name)`` of one metric; x is ``"samples"`` or ``"step"``.

        ``x="auto"`` or ``"samples"``: samples when available (the logged
        ``adabatch/samples``, interpolated by step for metrics logged at other rows such as
        validation; else step x the configured batch), otherwise the optimizer step.
        """
        steps, values = self._series[column]
        if x in ("auto", "samples"):
            if self.has(SAMPLES_KEY):
                s_steps, s_samples = self._series[SAMPLES_KEY]
                order = np.argsort(s_steps, kind="stable")
                return np.interp(steps, s_steps[order], s_samples[order]), values, "samples"
            if self.batch_size is not None:
                return steps * self.batch_size, values, "samples"
        return steps, values, "step"


def _read_csv(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c not in ("epoch", "step")]
        rows = list(reader)
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{path} has no 'step' column or no rows: not a metrics.csv")
    series = {}
    for c in columns:
        pts = [(float(r["step"]), float(r[c])) for r in rows if r.get(c) not in (None, "")]
        if pts:
            arr = np.asarray(pts)
            series[c] = (arr[:, 0], arr[:, 1])
    return series


def find_log(path: str | Path) -> Path:
    """The run's log: ``path`` itself (a CSV or an event file), ``path/metrics.csv``, an
    event file in ``path``, or the newest of either below ``path``."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    if (p / "metrics.csv").is_file():
        return p / "metrics.csv"
    here = sorted(p.glob(TB_GLOB), key=lambda f: f.stat().st_mtime)
    if here:
        return here[-1]
    found = sorted([*p.rglob("metrics.csv"), *p.rglob(TB_GLOB)], key=lambda f: f.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv or TensorBoard events under {str(p)!r}")
    if len(found) > 1:
        print(f"{len(found)} logs under {p}; reading the newest: {found[-1]}")
    return found[-1]


def find_metrics_csv(path: str | Path) -> Path:
    """Like `find_log`, for a CSVLogger log only (sweep trials log with one)."""
    log = find_log(path)
    if log.suffix != ".csv":
        raise FileNotFoundError(f"no metrics.csv under {str(path)!r} (found {log.name})")
    return log


def load_run(path: str | Path) -> Metrics:
    """A run's metrics from a directory, a ``metrics.csv`` or an event file."""
    log = find_log(path)
    m = Metrics(log) if log.suffix == ".csv" else Metrics.from_tensorboard(log)
    m.batch_size = configured_batch_size(log.parent)
    return m


def configured_batch_size(run_dir: Path) -> int | None:
    """The global batch a run was configured with: micro-batch x accumulation x devices.

    Read from LightningCLI's ``config.yaml`` (``data.init_args.batch_size``,
    ``trainer.accumulate_grad_batches``, ``trainer.devices`` when an int) in the run
    directory or its parents, else from a ``batch_size`` in the logger's ``hparams.yaml``.
    None when neither says.
    """
    import yaml

    for d in (run_dir, *run_dir.parents[:2]):
        cfg = d / "config.yaml"
        if cfg.is_file():
            doc = yaml.safe_load(cfg.read_text()) or {}
            data = doc.get("data") or {}
            micro = (data.get("init_args") or {}).get("batch_size", data.get("batch_size"))
            if isinstance(micro, int) and micro > 0:
                trainer = doc.get("trainer") or {}
                accumulation = trainer.get("accumulate_grad_batches") or 1
                devices = trainer.get("devices")
                world = devices if isinstance(devices, int) and devices > 0 else 1
                return micro * (accumulation if isinstance(accumulation, int) else 1) * world
    hp = run_dir / "hparams.yaml"
    if hp.is_file():
        doc: Any = yaml.safe_load(hp.read_text()) or {}
        size = doc.get("batch_size") if isinstance(doc, dict) else None
        if isinstance(size, int) and size > 0:
            return size
    return None
