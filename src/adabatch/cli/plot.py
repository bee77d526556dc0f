"""``adabatch plot``: PNG figures from a run's or a sweep's logged metrics (matplotlib, Agg).

- ``adabatch plot RUN_DIR_OR_METRICS_CSV [-o OUT.png]``: loss, noise scale, batch size and
  learning-rate factor, against ``adabatch/samples`` when logged, else the optimizer step.
- ``adabatch plot --sweep SWEEP_DIR [-o OUT.png]``: the objective against each swept
  parameter, beside the objective metric's curves of the best trials.

Columns are found by name, so any logger layout that a `CSVLogger` writes works; a panel
whose metrics were not logged says so instead of failing.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES_KEY = "adabatch/samples"
MAX_CURVES = 10

# Panel title -> predicate on a column name.
PANELS: list[tuple[str, Any]] = [
    ("loss", lambda c: c.endswith("loss") or c.endswith("loss_step")
     or c.endswith("loss_epoch")),
    ("noise scale", lambda c: any(k in c for k in ("gns", "noise_scale", "b_simple",
                                                    "b_noise")) and "std" not in c),
    ("batch size", lambda c: "batch_size" in c),
    ("LR factor", lambda c: c.startswith("adabatch/") and ("lr" in c or "gain" in c)),
]


class Metrics:
    """A `CSVLogger` ``metrics.csv``: each column's logged (step, value) pairs.

    Args:
        path: the CSV file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            self.columns = [c for c in (reader.fieldnames or []) if c not in ("epoch", "step")]
            rows = list(reader)
        if not rows or "step" not in (rows[0].keys()):
            raise ValueError(f"{self.path} has no 'step' column or no rows: not a metrics.csv")
        self._series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for c in self.columns:
            pts = [(float(r["step"]), float(r[c])) for r in rows if r.get(c) not in (None, "")]
            if pts:
                arr = np.asarray(pts)
                self._series[c] = (arr[:, 0], arr[:, 1])

    def has(self, column: str) -> bool:
        return column in self._series

    def names(self) -> list[str]:
        return list(self._series)

    def series(self, column: str, x: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
        """``(x, y, x_label)`` of one column; x is samples when logged (interpolated by
        step for metrics logged at other rows, e.g. validation), else the step."""
        steps, values = self._series[column]
        if x in ("auto", "samples") and self.has(SAMPLES_KEY):
            s_steps, s_samples = self._series[SAMPLES_KEY]
            order = np.argsort(s_steps, kind="stable")
            return np.interp(steps, s_steps[order], s_samples[order]), values, "samples"
        return steps, values, "optimizer step"


def find_metrics_csv(path: str | Path) -> Path:
    """``path`` itself, ``path/metrics.csv``, or the newest ``metrics.csv`` below ``path``."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    if (p / "metrics.csv").is_file():
        return p / "metrics.csv"
    found = sorted(p.rglob("metrics.csv"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {str(p)!r}")
    if len(found) > 1:
        print(f"{len(found)} metrics.csv files under {p}; plotting the newest: {found[-1]}")
    return found[-1]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("adabatch plot needs matplotlib: pip install 'adabatch[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(v.max() / v.min()) if v.size and (v > 0).all() else 0.0


def _short(text: str) -> str:
    from adabatch.cli.sweep import parse_scalar

    v = parse_scalar(text)
    return f"{v:.3g}" if isinstance(v, float) else str(text)


def _format_x(ax: Any, x_label: str) -> None:
    if x_label == "samples":  # 200000 -> 200k: long sample counts overlap otherwise
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def plot_run(path: str | Path, out: str | Path | None = None) -> Path:
    """Four panels (loss, noise scale, batch size, LR factor) of one run; returns the PNG."""
    plt = _pyplot()
    csv_path = find_metrics_csv(path)
    m = Metrics(csv_path)
    out = Path(out) if out else csv_path.parent / "adabatch.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    x_label = "optimizer step"
    for ax, (title, match) in zip(axes.flat, PANELS):
        cols = [c for c in m.names() if match(c) and c != SAMPLES_KEY]
        ax.set_title(title)
        if not cols:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
            continue
        spread = 1.0
        for c in cols:
            x, y, x_label = m.series(c)
            style = "o-" if len(x) < 30 else "-"
            ax.plot(x, y, style, label=c, markersize=3, linewidth=1.2)
            spread = max(spread, _spread(y))
        if spread > 20:
            ax.set_yscale("log", base=2 if title == "batch size" else 10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat:
        _format_x(ax, x_label)
    for ax in axes[-1]:
        ax.set_xlabel(x_label)
    fig.suptitle(str(csv_path.parent), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _read_sweep(sweep_dir: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    from adabatch.cli.sweep import RESULTS_FILE, SPEC_FILE

    spec_path, results_path = sweep_dir / SPEC_FILE, sweep_dir / RESULTS_FILE
    for p in (spec_path, results_path):
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} not found: is {str(sweep_dir)!r} the output "
                                    "directory of `adabatch sweep`?")
    spec = json.loads(spec_path.read_text())
    with open(results_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return spec, rows


def plot_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Objective vs each parameter, beside the best trials' curves; returns the PNG."""
    from adabatch.cli.sweep import parse_scalar

    plt = _pyplot()
    sweep_dir = Path(sweep_dir)
    spec, rows = _read_sweep(sweep_dir)
    metric, params = spec["metric"], spec["params"]
    done = [r for r in rows if r.get("state") == "COMPLETE" and r.get(metric) not in ("", None)]
    n_failed = len(rows) - len(done)
    out = Path(out) if out else sweep_dir / "sweep.png"
    fig, axes = plt.subplots(1, len(params) + 1, figsize=(4.2 * (len(params) + 1), 4),
                             squeeze=False)
    objective = np.array([float(r[metric]) for r in done])
    for ax, key in zip(axes[0], params):
        values = [parse_scalar(r[key]) for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and values:
            xs = np.array(values, dtype=float)
            ax.scatter(xs, objective)
            if _spread(xs) > 10:
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
        else:
            cats = sorted({str(v) for v in values})
            ax.scatter([cats.index(str(v)) for v in values], objective)
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} ({spec.get('reduce', 'last')})")
        ax.grid(alpha=0.3)
    title = f"{spec.get('name', sweep_dir.name)}: {len(done)} complete"
    if n_failed:
        title += f", {n_failed} failed/interrupted (not shown)"
    axes[0][0].set_title(title, fontsize=9, loc="left")

    ax = axes[0][-1]
    ax.set_title(f"{metric}, best {min(len(done), MAX_CURVES)} trials", fontsize=9)
    x_label = "optimizer step"
    spread = 1.0
    for r in done[:MAX_CURVES]:  # results.csv is ranked best first
        trial_dir = Path(r.get("trial_dir") or "")
        try:
            m = Metrics(find_metrics_csv(trial_dir))
        except (FileNotFoundError, ValueError):
            continue
        if not m.has(metric):
            continue
        x, y, x_label = m.series(metric)
        label = f"#{r['trial']} " + " ".join(f"{k.split('.')[-1]}={_short(r[k])}"
                                             for k in params)
        ax.plot(x, y, "o-" if len(x) < 30 else "-", markersize=3, label=label)
        spread = max(spread, _spread(y))
    if spread > 20:
        ax.set_yscale("log")
    _format_x(ax, x_label)
    ax.set_xlabel(x_label)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes,
                color="gray")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``adabatch plot`` argument parser."""
    p = argparse.ArgumentParser(
        prog="adabatch plot",
        description="PNG figures from a run's metrics.csv or from a sweep's results.")
    p.add_argument("path", nargs="?", help="run directory (searched for metrics.csv) or the CSV")
    p.add_argument("--sweep", metavar="SWEEP_DIR", help="output directory of `adabatch sweep`")
    p.add_argument("-o", "--out", help="PNG to write (default: next to the input)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adabatch plot``."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if (ns.path is None) == (ns.sweep is None):
        parser.error("give either a run directory / metrics.csv or --sweep SWEEP_DIR")
    try:
        out = plot_sweep(ns.sweep, ns.out) if ns.sweep else plot_run(ns.path, ns.out)
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(str(e))
    print(f"wrote {out}")
    return 0

