"""Does the online noise scale follow a noise scale that grows with training? (issue 9)

SGD on least squares (`LeastSquaresProblem`, warm-up + cosine in samples at the tuned lr of
the `equal_budget` tasks ``noisefloor`` and ``synthetic``, batch 16, fresh data) makes the
exact ``B_simple`` grow by two to three orders of magnitude as the weights reach the noise
floor. Every step feeds the exact per-example gradients' statistics to a `GNSEstimator`
whose half-life is ``max(16 steps, f x samples so far)`` for several fractions ``f`` (the
callback's default rule is `adabatch.callback.default_half_life`), and compares

- the estimate ``B_simple`` and its lower confidence bound (`lower_bound`, z = 2, what the
  default policy follows) with the exact value along the run;
- the growth of the lower bound (median of the last tenth of the run over the first tenth)
  against the exact growth;
- ``|log(estimate / exact)|`` over the second half of the run (median over steps and seeds).

A long window errs silently: ``|G|^2`` falls by orders of magnitude and its old, large values
dominate the EMA, so the estimate lags far below the truth while its reported spread stays
moderate. A short window is noisier, but that noise is measured and widens the lower bound.

    python benchmarks/gns_tracking.py            # ~1 min on a laptop CPU, writes RESULTS.md
    python benchmarks/gns_tracking.py --quick    # seconds, prints only
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from adabatch.callback import DEFAULT_HALF_LIFE_FRACTION, default_half_life  # noqa: E402
from adabatch.control.policy import lower_bound  # noqa: E402
from adabatch.control.schedules import warmup_cosine  # noqa: E402
from adabatch.noise.estimator import GNSEstimator  # noqa: E402
from adabatch.tasks.synthetic import LeastSquaresProblem  # noqa: E402

SECTION = "gns_tracking"
FRACTIONS = (1 / 4, 1 / 8, 1 / 16)
CONFIDENCE = 2.0
BATCH = 16
# (dim, noise_std, sample budget, lr): the equal_budget tasks' problems and B=16's tuned lr
TASKS = {"noisefloor": (16, 0.05, 32_768, 0.0208), "synthetic": (64, 1.0, 8192, 0.0417)}
QUICK = {"noisefloor": (16, 0.05, 4096, 0.0208)}


def run(dim: int, noise_std: float, budget: int, lr: float, seed: int) -> dict[str, list]:
    """One SGD run; per step the exact ``B_simple`` and, per fraction, estimate and bound."""
    problem = LeastSquaresProblem(dim=dim, noise_std=noise_std, condition=10.0, seed=0)
    g = torch.Generator().manual_seed(1000 + seed)
    x_all, y_all = problem.sample(budget, g)
    w = torch.zeros(dim, dtype=torch.float64)
    ests = [GNSEstimator(half_life_samples=1.0) for _ in FRACTIONS]
    out: dict[str, list] = {"exact": [], **{f"gns{i}": [] for i in range(len(FRACTIONS))},
                            **{f"lcb{i}": [] for i in range(len(FRACTIONS))}}
    warmup = int(0.05 * budget)
    for start in range(0, budget, BATCH):
        x = x_all[start:start + BATCH].double()
        y = y_all[start:start + BATCH].double()
        per = x * (x @ w - y)[:, None]  # exact per-example gradients
        grad = per.mean(0)
        small_sq, big_sq = float(per.square().sum(1).mean()), float(grad.square().sum())
        out["exact"].append(float(problem.exact_stats(w)["gns"]))
        samples = start + BATCH
        for i, (f, est) in enumerate(zip(FRACTIONS, ests)):
            est.half_life_samples = default_half_life(samples, BATCH, fraction=f)
            est.update(small_sq, 1, big_sq, BATCH)
            gns = est.gns
            settled = est.effective_sample_size >= 8
            out[f"gns{i}"].append(math.nan if gns is None else gns)
            bound = lower_bound(gns, est.gns_rel_std if settled else None, CONFIDENCE)
            out[f"lcb{i}"].append(math.nan if bound is None else bound)
        w = w - lr * warmup_cosine(start, warmup, budget) * grad
    return out


def _tenth(values: list[float], last: bool) -> float:
    n = max(1, len(values) // 10)
    part = values[-n:] if last else values[:n]
    finite = [v for v in part if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def summarize(runs: list[dict[str, list]]) -> list[list[str]]:
    rows = []
    n = len(runs[0]["exact"])
    marks = [n // 4, n // 2, 3 * n // 4, n - 1]

    def at(key: str, j: int) -> float:
        vals = [r[key][j] for r in runs if math.isfinite(r[key][j])]
        return statistics.median(vals) if vals else math.nan

    exact_growth = statistics.median(_tenth(r["exact"], True) / _tenth(r["exact"], False)
                                     for r in runs)
    rows.append(["exact B_simple", *(common.fmt(at("exact", j), ".3g") for j in marks),
                 f"x{exact_growth:.3g}", "-", "-"])
    for i, f in enumerate(FRACTIONS):
        growth = statistics.median(_tenth(r[f"lcb{i}"], True) / _tenth(r[f"lcb{i}"], False)
                                   for r in runs)
        errs = [abs(math.log(r[f"gns{i}"][j] / r["exact"][j])) for r in runs
                for j in range(n // 2, n) if math.isfinite(r[f"gns{i}"][j])]
        undefined = sum(not math.isfinite(r[f"gns{i}"][j]) for r in runs
                        for j in range(n // 2, n)) / (len(runs) * (n - n // 2))
        label = f"f = 1/{round(1 / f)}" + (" (default)" if f == DEFAULT_HALF_LIFE_FRACTION else "")
        rows.append([f"lower bound, {label}",
                     *(common.fmt(at(f"lcb{i}", j), ".3g") for j in marks),
                     f"x{common.fmt(growth, '.3g')}",
                     common.fmt(math.exp(statistics.median(errs)) if errs else math.nan, ".3g"),
                     f"{100 * undefined:.0f}%"])
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small task, one seed, print only")
    ap.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to write to (default benchmarks/RESULTS.md; --quick: none)")
    args = ap.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    results = None if args.quick else (args.results or common.DEFAULT_RESULTS)
    load_before = common.load_average()
    t0 = time.perf_counter()
    lines = [f"## {SECTION}: does the online noise scale follow a growing one?", ""]
    lines += common.context_lines("gns_tracking.py", argv, load_before)
    lines.append(f"- protocol: SGD, batch {BATCH}, fresh data, warm-up (5%) + cosine in "
                 "samples at B=16's tuned lr of the equal_budget task; exact per-example "
                 f"gradients each step into a GNSEstimator with half-life max(16 steps, f x "
                 f"samples so far); lower bound = B_simple / (1 + {CONFIDENCE:g} rel_std) "
                 "(the default policy's level); medians over seeds")
    lines.append("- columns: the value at 1/4, 1/2, 3/4 and the end of the run; growth = "
                 "median of the last tenth / first tenth; error = exp(median |log(B_simple "
                 "estimate / exact)|) over the second half; undefined = share of those steps "
                 "with no estimate (EMA of |G|^2 <= 0)")
    for name, (dim, noise_std, budget, lr) in (QUICK if args.quick else TASKS).items():
        runs = [run(dim, noise_std, budget, lr, s) for s in range(1, seeds + 1)]
        rows = summarize(runs)
        lines += ["", f"### {name}: dim={dim}, noise_std={noise_std:g}, N={budget}, lr={lr:g}",
                  "", common.md_table(["series", "1/4", "1/2", "3/4", "end", "growth",
                                       "error (x)", "undefined"], rows)]
    lines.append("")
    lines.append(f"- wall time: {time.perf_counter() - t0:.0f} s")
    text = "\n".join(lines)
    common.publish(text, results, SECTION)
    return text


if __name__ == "__main__":
    main()
