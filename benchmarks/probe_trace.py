"""What does the branched critical-batch probe measure, next to the equal-budget frontier?

For each task of `equal_budget.py`, one run of the library default (`CriticalBatchPolicy`)
under that benchmark's protocol (from B0 at B0's tuned lr, warm-up + cosine in samples, the
task's sample budget) and, for every probe it took: where (samples, the main run's batch B,
the branch's factor k), the progress ratio ``r = branch progress / main progress`` over the
window (the branch at ``k B`` with ``k`` times the main run's lr, ``sqrt(k)`` for Adam), its
standard error over the probe set's batches, the critical batch the default policy credits
(from ``r - 2`` standard errors: ``inf`` when ``k B`` did as well as ``B``; none when the main
run made no progress or the interval spans every answer), and the noise scale ``B_simple``
then. The policy's calibration ``rho`` (``B_crit / B_simple_lcb``, weighted over the probes)
is the one it ended with.

Next to it, from `equal_budget`'s cached fixed runs: the *final-loss* critical batch, the
largest fixed batch whose final loss is within the seed spread of the best fixed batch's
(`equal_budget.equal_or_better`). The probe measures progress per sample over a short window
(a local property); the frontier says which batches lose nothing by the end of the budget.
Where the budget is ample the two part: early samples wasted by a large batch cost nothing
in final loss.

    python benchmarks/probe_trace.py                      # four tasks, ~1 min; RESULTS.md
    python benchmarks/probe_trace.py --tasks charlm --seeds 1 2
    python benchmarks/probe_trace.py --quick              # seconds, prints only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import equal_budget as eb  # noqa: E402

from adabatch.control.critical import ProbeResult, lossless  # noqa: E402

SECTION = "probe_trace"
TASKS = ("noisefloor", "teacher", "synthetic", "charlm")


def final_loss_critical_batch(task: eb.Task, data: Path) -> dict | None:
    """The largest fixed batch (fixed or control runs) whose final loss on the cache's
    evaluation seeds is equal or better than the best fixed batch's (``None``: no cache)."""
    path = data / f"equal_budget_{task.name}.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["key"] != eb.config_key(task):
        return None
    fixed = saved["fixed"]
    points = []
    for kind in ("fixed", "control"):
        for b in task.batches:
            runs = [r for r in fixed["runs"] if r["kind"] == kind and r["batch"] == b]
            if runs:
                points.append(eb.Point(f"B={b}" + (" +transforms" if kind == "control" else ""),
                                       kind, b, runs[0]["lr"], runs))
    finite = [p for p in points if math.isfinite(p.loss)]
    if not finite:
        return None
    best = min(finite, key=lambda p: (p.loss, p.steps))
    equal = [p for p in finite if eb.equal_or_better(p, best)]
    return {"best": best.label, "largest_equal": max(p.batch for p in equal)}


def trace(task: eb.Task, quick: bool, seed: int, data: Path) -> dict[str, Any]:
    """One default run of ``task`` on ``seed``: its probes and end state."""
    lr0 = task.lr_center(task.batches[0])
    cached = data / f"equal_budget_{task.name}.json"
    if cached.is_file() and not quick:
        lr0 = json.loads(cached.read_text())["fixed"]["best_lr"][str(task.batches[0])]
    run = eb.run_job(eb.Job(task.name, quick, "default", seed, lr0, task.batches[0]))
    return {"seed": seed, "lr": lr0, "run": run}


def advises(out: dict[str, Any]) -> bool:
    """Whether the run summary advised a larger starting batch (every probe lossless at the
    default policy's z = 2)."""
    return lossless([ProbeResult.from_dict(p) for p in out["run"]["probes"]], z=2.0)


def probe_rows(out: dict[str, Any], z: float = 2.0) -> list[list[str]]:
    """One row per probe: r, its standard error, and the critical batch the default policy
    credits (from ``r - z ratio_std``; none when the main run made no progress, or when the
    interval ``r +- z ratio_std`` spans every answer)."""
    rows = []
    for p in out["run"]["probes"]:
        result = ProbeResult.from_dict(p)
        ratio = result.ratio
        crit = result.critical_batch_lower(z)
        if ratio is None:
            text = "none (no main progress)"
        elif crit is None:
            text = "none (interval spans every answer)"
        else:
            text = common.fmt(crit, ".3g", "inf")
        rows.append([out["seed"], p["samples"], p["batch_size"], p["factor"],
                     common.fmt(ratio, ".3f", "-"), common.fmt(p.get("ratio_std"), ".3f", "-"),
                     text, common.fmt(p["gns"], ".3g", "-")])
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny noise-floor task, print only")
    ap.add_argument("--tasks", nargs="+", choices=eb.TASKS, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--data", type=Path, default=eb.DATA_DIR,
                    help="equal_budget's cache (tuned lrs, fixed runs)")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to write to (default benchmarks/RESULTS.md; --quick: none)")
    args = ap.parse_args(argv)
    tasks = args.tasks or (["noisefloor"] if args.quick else list(TASKS))
    results = None if args.quick else (args.results or common.DEFAULT_RESULTS)
    common.quiet_lightning()
    load_before = common.load_average()
    t0 = time.perf_counter()
    lines = [f"## {SECTION}: what the branched probe measures, next to the equal-budget "
             "frontier", ""]
    lines += common.context_lines("probe_trace.py", argv, load_before)
    lines.append("- protocol: the library default from B0 at B0's tuned lr (equal_budget's "
                 "cache), warm-up + cosine in samples over the task's budget; every probe of "
                 "the run: r = branch progress / main progress over the window (the branch at "
                 "k B with k x the main run's lr, sqrt(k) x for Adam), its standard error over "
                 "the probe set's batches, the B_crit the default policy credits, from "
                 "r - 2 s.e. (inf: k B did as well; none: no main progress, or an interval "
                 "r +- 2 s.e. that spans every answer), B_simple at the window's end. "
                 "Final-loss critical batch: the largest fixed batch of equal_budget whose "
                 "final loss is within "
                 "the seed spread of the best fixed batch's (its evaluation seeds)")
    for name in tasks:
        task = eb.get_task(name, args.quick)
        outs = [trace(task, args.quick, s, args.data) for s in args.seeds]
        frontier = None if args.quick else final_loss_critical_batch(task, args.data)
        lines += ["", f"### {name}", ""]
        lines.append(f"- B0 = {task.batches[0]}, lr {common.fmt(outs[0]['lr'], '.3g')}, "
                     f"N = {task.budget}; per seed: batch at the end "
                     f"{[o['run']['batch_end'] for o in outs]}, final loss "
                     f"{[float(common.fmt(o['run']['final_loss'], '.5g', 'nan')) for o in outs]},"
                     f" rho at the end {[common.fmt(o['run']['rho'], '.3g') for o in outs]}, "
                     f"run summary advises a larger start {[advises(o) for o in outs]}")
        if frontier is not None:
            lines.append(f"- final-loss critical batch (equal_budget, fixed runs): every fixed "
                         f"batch up to B={frontier['largest_equal']} is within the seed spread "
                         f"of the best ({frontier['best']})")
        lines += ["", common.md_table(["seed", "samples", "B", "k", "r", "r's std. error",
                                       "B_crit at r - 2 s.e.", "B_simple"],
                                      [r for o in outs for r in probe_rows(o)])]
    lines += ["", f"- wall time: {time.perf_counter() - t0:.0f} s"]
    text = "\n".join(lines)
    common.publish(text, results, SECTION)
    return text


if __name__ == "__main__":
    main()
