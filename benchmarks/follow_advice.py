"""Does following the run summary's advice reach the fixed frontier?

When every probe of a run finds no loss at ``k x B`` with the lr scaled by the rule, the run
summary advises starting at ``k x`` the batch, the lr scaled the same way (``k`` for SGD,
``sqrt(k)`` for Adam). This script does what a user would: for each task of `equal_budget.py`,
it runs the library default from B0 at B0's tuned lr (the benchmark's cache) on every seed
under the benchmark's protocol (same sample budget, warm-up + cosine in samples); while the
advice fires on every seed, it starts again at ``k x`` the batch with the lr scaled by the rule
(``--max-rounds`` at most, and not past the largest fixed batch). Each round's steps and final
loss sit next to the fixed batches of `equal_budget` (their tuned lrs, the same seeds).

    python benchmarks/follow_advice.py                    # four tasks, 5 seeds; RESULTS.md
    python benchmarks/follow_advice.py --tasks noisefloor --seeds 1 2
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

from adabatch.control.critical import CriticalBatchProbe, ProbeResult, lossless  # noqa: E402

SECTION = "follow_advice"
TASKS = ("noisefloor", "synthetic", "charlm", "teacher")
K = CriticalBatchProbe().factor  # the default probe's factor: what the advice names


def advised(run: dict[str, Any]) -> bool:
    """Whether the run summary advised a larger start (the default policy's z = 2)."""
    return lossless([ProbeResult.from_dict(p) for p in run.get("probes", [])], z=2.0)


def scaled_lr(lr: float, factor: int, optimizer: str) -> float:
    """The lr at ``factor x`` the batch by the plain rule (linear for SGD, sqrt for Adam)."""
    return lr * (factor if optimizer == "sgd" else math.sqrt(factor))


def rounds(task: eb.Task, seeds: list[int], lr0: float, max_rounds: int) -> list[dict]:
    """The default from B0, then from k x the batch while every seed's run advised it."""
    out, batch, lr = [], task.batches[0], lr0
    for _ in range(max_rounds):
        runs = [eb.run_job(eb.Job(task.name, False, "default", s, lr, batch)) for s in seeds]
        out.append({"batch": batch, "lr": lr, "runs": runs,
                    "advised": sum(advised(r) for r in runs)})
        if out[-1]["advised"] < len(seeds) or K * batch > task.batches[-1]:
            break
        batch, lr = K * batch, scaled_lr(lr, K, task.optimizer)
    return out


def task_lines(task: eb.Task, fixed: dict[str, Any], seeds: list[int],
               done: list[dict]) -> list[str]:
    rows = []
    for r in done:
        runs = r["runs"]
        rows.append([f"default from B={r['batch']}", common.fmt(r["lr"], ".3g"),
                     common.median_range([x["steps"] for x in runs], ".4g"),
                     common.median_range([x["final_loss"] for x in runs], ".5g"),
                     common.median_range([x["batch_end"] for x in runs], ".4g"),
                     f"{r['advised']}/{len(runs)}"])
    for b in task.batches:
        runs = [x for x in fixed["runs"] if x["kind"] == "fixed" and x["batch"] == b
                and x["seed"] in seeds]
        if runs:
            rows.append([f"fixed B={b}", common.fmt(runs[0]["lr"], ".3g"),
                         common.median_range([x["steps"] for x in runs], ".4g"),
                         common.median_range([x["final_loss"] for x in runs], ".5g"), str(b), "-"])
    return ["", f"### {task.name}", "",
            f"- B0 = {task.batches[0]}, N = {task.budget}, optimizer {task.optimizer}, "
            f"seeds {seeds}; the advice names {K}x",
            "", common.md_table(["run", "lr", "steps median [min, max]",
                                 "final loss median [min, max]", "batch at the end",
                                 "advised a larger start"], rows)]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=eb.TASKS, default=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--max-rounds", type=int, default=6)
    ap.add_argument("--data", type=Path, default=eb.DATA_DIR,
                    help="equal_budget's cache (tuned lrs, fixed runs)")
    ap.add_argument("--results", type=Path, default=common.DEFAULT_RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    common.quiet_lightning()
    load_before = common.load_average()
    t0 = time.perf_counter()
    lines = [f"## {SECTION}: does following the run summary's advice reach the frontier?", ""]
    lines += common.context_lines("follow_advice.py", argv, load_before)
    lines.append("- protocol: the library default from B0 at B0's tuned lr (equal_budget's "
                 "cache and protocol); while the run summary advised a larger start on every "
                 f"seed, again from {K}x the batch with the lr scaled by the plain rule (x{K} "
                 f"SGD, x sqrt({K}) Adam). Fixed rows: equal_budget's fixed batches at their "
                 "tuned lrs, the same seeds")
    for name in args.tasks:
        task = eb.get_task(name, False)
        path = args.data / f"equal_budget_{name}.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or saved["key"] != eb.config_key(task):
            lines += ["", f"### {name}", "", "- no equal_budget cache for this task: skipped"]
            continue
        fixed = saved["fixed"]
        done = rounds(task, args.seeds, fixed["best_lr"][str(task.batches[0])],
                      args.max_rounds)
        lines += task_lines(task, fixed, args.seeds, done)
    lines += ["", f"- wall time: {time.perf_counter() - t0:.0f} s"]
    text = "\n".join(lines)
    common.publish(text, None if args.no_write else args.results, SECTION)
    return text


if __name__ == "__main__":
    main()
