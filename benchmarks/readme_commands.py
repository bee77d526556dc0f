"""The README's main job, timed: the adaptive run and its fixed-batch baseline.

Runs, as subprocesses exactly as a user types them (``adabatch fit``, here as
``python -m adabatch.cli.main fit``):

- ``adaptive``: ``adabatch fit --config configs/charlm.yaml`` (stops at adabatch's
  ``max_samples``);
- ``fixed``: the same with ``--adabatch.enabled=false`` (stops at the config's
  ``max_steps``, the same number of samples at the starting batch).

Each run's wall time is the process's, start to exit (imports, data, validation included);
samples, steps, the batch history and the final losses come from its ``summary.json``
(`adabatch.summary.RunSummary`). The README quotes this section.

    python benchmarks/readme_commands.py --quick   # a tiny char-LM (under a minute)
    python benchmarks/readme_commands.py           # the README's job (minutes on a CPU)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SECTION = "readme_commands"
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "charlm.yaml"
QUICK = ["--model.d_model=16", "--model.n_layers=1", "--model.n_heads=2", "--model.context=16",
         "--data.context=16", "--data.batch_size=4", "--data.max_bytes=30000",
         "--data.max_val_windows=8", "--trainer.max_steps=8", "--trainer.val_check_interval=4",
         "--trainer.limit_val_batches=1", "--adabatch.max_samples=32"]
RUNS = {"adaptive": [], "fixed": ["--adabatch.enabled=false"]}


def run_one(name: str, extra: list[str], out: Path) -> dict[str, Any]:
    """One ``adabatch fit`` process; returns its wall time and summary."""
    log = {"class_path": "lightning.pytorch.loggers.CSVLogger",
           "init_args": {"save_dir": str(out), "name": name, "version": ""}}
    cmd = [sys.executable, "-m", "adabatch.cli.main", "fit", "--config", str(CONFIG), *extra,
           f"--trainer.logger={json.dumps(log)}", "--trainer.enable_progress_bar=false",
           "--trainer.enable_checkpointing=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    summary = json.loads((out / name / "summary.json").read_text())
    return {"name": name, "wall_s": wall, "summary": summary}


def _history(summary: dict[str, Any]) -> str:
    sizes = [h["batch_size"] for h in summary.get("batch_size_history", [])]
    return " -> ".join(map(str, sizes)) or "n/a"


def report(rows: list[dict[str, Any]], argv: list[str] | None, load: str,
           quick: bool = False) -> str:
    table = []
    for r in rows:
        s = r["summary"]
        table.append([r["name"], common.fmt(r["wall_s"], ".1f"), f"{s['samples']:,}",
                      f"{s['steps']:,}", common.fmt(s.get("samples_per_s"), ".0f"),
                      common.fmt(s.get("val_loss"), ".3f"), _history(s),
                      s.get("stop_reason") or "-"])
    lines = [f"## {SECTION}: the README's main job, adaptive vs fixed batch", "",
             *common.context_lines("readme_commands.py", argv, load),
             f"- config: `{CONFIG.relative_to(ROOT)}`"
             + (f" with `{' '.join(QUICK)}`" if quick else ""),
             "- wall: the whole `adabatch fit` process (imports, data, validation included)",
             ""]
    lines.append(common.md_table(["run", "wall s", "samples", "optimizer steps", "samples/s",
                                  "val_loss", "global batch", "stopped by"], table))
    by = {r["name"]: r for r in rows}
    if "adaptive" in by and "fixed" in by:
        ratio = by["adaptive"]["wall_s"] / by["fixed"]["wall_s"]
        lines += ["", f"- adaptive / fixed wall time: {ratio:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny char-LM (under a minute)")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to write (default: benchmarks/RESULTS.md unless --quick)")
    ap.add_argument("--runs", default="adaptive,fixed", help="comma-separated: adaptive,fixed")
    args = ap.parse_args(argv)
    if args.results is None and not args.quick:
        args.results = common.DEFAULT_RESULTS
    load = common.load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            extra = RUNS[name] + (QUICK if args.quick else [])
            rows.append(run_one(name, extra, Path(tmp)))
            print(f"{name}: {rows[-1]['wall_s']:.1f} s", flush=True)
    text = report(rows, argv, load, quick=args.quick)
    common.publish(text, args.results, SECTION)
    return rows


if __name__ == "__main__":
    main()
