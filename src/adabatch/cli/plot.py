"""``adabatch plot``: PNG figures from runs' or a sweep's logged metrics (matplotlib, Agg).

- ``adabatch plot RUN [RUN ...] [-o OUT.png] [--label NAME ...]``: the runs overlaid (e.g. an
  adaptive run and its fixed-batch baseline), four rows (loss, noise scale, global batch
  size with the policy's target dotted, LR factor) against samples (left) and optimizer
  steps (right). A RUN is a run directory, a ``metrics.csv`` or a TensorBoard event file.
  A run without ``adabatch/samples`` (adabatch disabled) is put on the samples axis as
  steps x its configured batch, which is also drawn in the batch panel.
- ``adabatch plot --sweep SWEEP_DIR [-o OUT.png]``: the objective against each swept
  parameter, against each trial's optimizer steps and wall time, and the objective
  metric's curves of the best trials.

Metrics are found by name (`cli.metrics`), so any LightningModule's ``*loss`` is drawn; a
panel with nothing logged says so instead of failing.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adabatch.cli.metrics import SAMPLES_KEY, Metrics, find_metrics_csv, load_run

MAX_CURVES = 10
TARGET_KEY = "adabatch/target_batch_size"
X_LABELS = {"samples": "samples (training examples seen)", "step": "optimizer steps"}


def _is_loss(c: str) -> bool:
    return c.endswith(("loss", "loss_step", "loss_epoch"))


def _is_noise(c: str) -> bool:
    return (any(k in c for k in ("gns", "noise_scale", "b_simple", "b_noise"))
            and "std" not in c)


def _is_batch(c: str) -> bool:
    return c == "adabatch/batch_size"


def _is_lr(c: str) -> bool:
    return c.startswith("adabatch/") and ("lr" in c or "gain" in c)


# (title, y-axis label with units, predicate on a metric name)
PANELS: list[tuple[str, str, Any]] = [
    ("loss", "loss (as logged: mean per example)", _is_loss),
    ("noise scale", "B_simple (examples)", _is_noise),
    ("global batch size", "batch size (examples / step)", _is_batch),
    ("LR factor", "LR factor (x the tuned LR)", _is_lr),
]


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


def _format_x(ax: Any, x_name: str) -> None:
    if x_name == "samples":  # 200000 -> 200k: long sample counts overlap otherwise
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _marker(n: int) -> str | None:
    return "o" if n < 30 else None  # few points: show where they are


def _draw_run(axes_row: Any, m: Metrics, color: str, label: str, match: Any,
              title: str) -> bool:
    """One run's metrics of one panel row (samples, steps); returns whether it drew."""
    cols = [c for c in m.names() if match(c) and c != SAMPLES_KEY]
    drew = False
    for ax, x in zip(axes_row, ("samples", "step")):
        if x == "samples" and not m.has_samples():
            continue
        for i, c in enumerate(cols):
            xs, ys, _ = m.series(c, x=x)
            dashes = "--" if i else "-"  # the second metric of a run (e.g. val_loss) dashed
            ax.plot(xs, ys, marker=_marker(len(xs)), color=color, linestyle=dashes, markersize=3,
                    linewidth=1.2, label=f"{label}: {c}")
            drew = True
        if title == "global batch size":
            if m.has(TARGET_KEY):
                xs, ys, _ = m.series(TARGET_KEY, x=x)
                ax.plot(xs, ys, color=color, linestyle=":", linewidth=1.5,
                        label=f"{label}: policy target")
                drew = True
            elif not cols and m.batch_size is not None:  # a fixed-batch run
                xs = np.array([0.0, m.last_step() * (m.batch_size if x == "samples" else 1)])
                ax.plot(xs, [m.batch_size] * 2, color=color, linestyle="-", linewidth=1.2,
                        label=f"{label}: fixed {m.batch_size} (config)")
                drew = True
    return drew


def build_run_figure(runs: Sequence[Metrics], labels: Sequence[str] | None = None) -> Any:
    """The overlay figure of `plot_runs` (matplotlib Figure, 4 rows x 2 columns)."""
    plt = _pyplot()
    labels = list(labels) if labels else [_run_label(m, i) for i, m in enumerate(runs)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(PANELS), 2, figsize=(13, 3.2 * len(PANELS)), squeeze=False)
    for row, (title, y_label, match) in zip(axes, PANELS):
        spread = 1.0
        for i, m in enumerate(runs):
            _draw_run(row, m, colors[i % len(colors)], labels[i], match, title)
        for ax, x in zip(row, ("samples", "step")):
            ax.set_title(f"{title} vs {X_LABELS[x].split(' (')[0]}", fontsize=10)
            ax.set_ylabel(y_label)
            ax.set_xlabel(X_LABELS[x])
            _format_x(ax, x)
            ax.grid(alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
                continue
            for line in ax.lines:
                spread = max(spread, _spread(np.asarray(line.get_ydata(), dtype=float)))
            ax.legend(fontsize=7)
        if spread > 20:
            for ax in row:
                if ax.lines:
                    ax.set_yscale("log", base=2 if title == "global batch size" else 10)
    fig.suptitle(" vs ".join(labels), fontsize=9)
    fig.tight_layout()
    return fig


def _run_label(m: Metrics, i: int) -> str:
    parts = Path(m.label).parts
    return "/".join(parts[-2:]) if parts else f"run {i}"


def plot_runs(paths: Sequence[str | Path], out: str | Path | None = None,
              labels: Sequence[str] | None = None) -> Path:
    """Overlay one or more runs (see the module docstring); returns the PNG."""
    if labels and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} --label value(s) for {len(paths)} run(s)")
    runs = [load_run(p) for p in paths]
    default = (runs[0].path.parent if runs[0].path is not None else Path(".")) / "adabatch.png"
    out = Path(out) if out else default
    fig = build_run_figure(runs, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def plot_run(path: str | Path, out: str | Path | None = None) -> Path:
    """One run: `plot_runs` with a single run."""
    return plot_runs([path], out)


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


def _scatter_axis(ax: Any, values: list[Any], objective: np.ndarray) -> None:
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


def build_sweep_figure(sweep_dir: str | Path) -> Any:
    """The figure of `plot_sweep`."""
    from adabatch.cli.sweep import parse_scalar

    plt = _pyplot()
    sweep_dir = Path(sweep_dir)
    spec, rows = _read_sweep(sweep_dir)
    metric, params = spec["metric"], spec["params"]
    done = [r for r in rows if r.get("state") == "COMPLETE" and r.get(metric) not in ("", None)]
    if not done:
        raise ValueError(f"no completed trial in {str(sweep_dir)!r} ({len(rows)} failed or "
                         "interrupted): nothing to plot; see results.csv for the errors")
    n_failed = len(rows) - len(done)
    extra = [("steps", "optimizer steps of the trial"),
             ("wall_time_s", "wall time of the trial (s)")]
    n_panels = len(params) + len(extra) + 1
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 4), squeeze=False)
    objective = np.array([float(r[metric]) for r in done])
    y_label = f"{metric} ({spec.get('reduce', 'last')})"
    for ax, key in zip(axes[0], params):
        _scatter_axis(ax, [parse_scalar(r[key]) for r in done], objective)
        ax.set_xlabel(key)
    for ax, (key, label) in zip(axes[0][len(params):], extra):
        pts = [(float(r[key]), o) for r, o in zip(done, objective) if r.get(key) not in ("", None)]
        if pts:
            ax.scatter(*zip(*pts))
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
        ax.set_xlabel(label)
    for ax in axes[0][:-1]:
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    title = f"{spec.get('name', sweep_dir.name)}: {len(done)} complete"
    if n_failed:
        title += f", {n_failed} failed/interrupted (not shown)"
    axes[0][0].set_title(title, fontsize=9, loc="left")

    ax = axes[0][-1]
    ax.set_title(f"{metric}, best {min(len(done), MAX_CURVES)} trials", fontsize=9)
    x_name = "step"
    spread = 1.0
    for r in done[:MAX_CURVES]:  # results.csv is ranked best first
        try:
            m = load_run(find_metrics_csv(Path(r.get("trial_dir") or "")))
        except (FileNotFoundError, ValueError):
            continue
        if not m.has(metric):
            continue
        x, y, x_name = m.series(metric)
        label = f"#{r['trial']} " + " ".join(f"{k.split('.')[-1]}={_short(r[k])}"
                                             for k in params)
        ax.plot(x, y, marker=_marker(len(x)), markersize=3, label=label)
        spread = max(spread, _spread(y))
    if spread > 20:
        ax.set_yscale("log")
    _format_x(ax, x_name)
    ax.set_xlabel(X_LABELS[x_name])
    ax.set_ylabel(metric)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes,
                color="gray")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Objective vs each parameter, steps and wall time, beside the best trials' curves."""
    fig = build_sweep_figure(sweep_dir)
    out = Path(out) if out else Path(sweep_dir) / "sweep.png"
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``adabatch plot`` argument parser."""
    p = argparse.ArgumentParser(
        prog="adabatch plot",
        description="PNG figures from runs' logs (metrics.csv or TensorBoard events) or from "
                    "a sweep's results.",
        epilog="example: adabatch plot runs/charlm/version_0 runs/charlm/version_1 "
               "--label adaptive --label fixed -o compare.png")
    p.add_argument("paths", nargs="*", metavar="RUN",
                   help="run directory, metrics.csv or TensorBoard event file (several: overlaid)")
    p.add_argument("--label", action="append", default=None,
                   help="legend name of each RUN, in order (repeatable)")
    p.add_argument("--sweep", metavar="SWEEP_DIR", help="output directory of `adabatch sweep`")
    p.add_argument("-o", "--out", help="PNG to write (default: next to the first input)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adabatch plot``."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if bool(ns.paths) == bool(ns.sweep):
        parser.error("give either run directories / logs or --sweep SWEEP_DIR")
    try:
        out = plot_sweep(ns.sweep, ns.out) if ns.sweep else plot_runs(ns.paths, ns.out, ns.label)
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(str(e))
    print(f"wrote {out}")
    return 0
