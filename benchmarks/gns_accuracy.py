"""Accuracy of the online gradient noise scale against the exact least-squares value.

On ``LeastSquaresProblem`` at fixed weights (start, mid-way, near the optimum) it runs the
online estimator (``GNSEstimator``) on fresh data every step (so there is no finite-data bias)
and compares ``gns`` with ``exact_stats(w)["gns"]`` as steps accumulate, for

- micro-batch style: a float64 ``nn.Linear`` trained-style loop with gradient accumulation
  over ``B / b`` micro-batches, norms from ``MicroBatchGradNorms`` (``grad_scale = 1/k``) and
  the big-batch norm from the accumulated ``.grad``;
- per-example style (b = 1): per-example gradients ``x_i (x_i . w - y_i)`` computed directly
  (or by ``PerExampleGradNorms`` when that probe exists and ``--per-example-probe`` is given).

Prints a table and writes it to ``benchmarks/RESULTS.md`` between the markers
``<!-- gns_accuracy:start -->`` / ``<!-- gns_accuracy:end -->`` (replaced on rerun; other
sections are kept).

    python benchmarks/gns_accuracy.py --quick     # < 1 min on a laptop CPU
    python benchmarks/gns_accuracy.py             # 5 seeds, up to 3000 steps
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from results import cpu_name, write_section
from torch import nn

from adabatch.noise.estimator import GNSEstimator
from adabatch.noise.microbatch import MicroBatchGradNorms
from adabatch.tasks.synthetic import LeastSquaresProblem

POINTS = {"start": 0.0, "mid": 0.5, "near": 0.95}  # w = frac * w_star


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, up to 300 steps (< 1 min)")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--noise-std", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64, help="big batch B")
    ap.add_argument("--micro", type=int, nargs="+", default=[8, 16],
                    help="micro-batch sizes b (divisors of --batch)")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="report after these step counts")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--half-life", type=float, default=None,
                    help="EMA half-life in samples (default: 4x the largest step count x B)")
    ap.add_argument("--per-example-probe", action="store_true",
                    help="use adabatch.noise.per_example.PerExampleGradNorms for b=1 if present")
    ap.add_argument("--results", type=Path,
                    default=Path(__file__).resolve().parent / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = [10, 30, 100, 300] if args.quick else [10, 30, 100, 300, 1000, 3000]
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    for name in ("dim", "batch", "seeds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if any(s < 1 for s in args.steps):
        ap.error(f"--steps={args.steps} must all be >= 1")
    for b in args.micro:
        if b < 1 or b >= args.batch or args.batch % b:
            ap.error(f"--micro {b} must divide --batch={args.batch} and be < it")
    args.steps = sorted(set(args.steps))
    if args.half_life is None:
        args.half_life = 4.0 * max(args.steps) * args.batch
    return args


def _per_example_probe():
    try:
        from adabatch.noise.per_example import PerExampleGradNorms  # type: ignore
    except ImportError:
        return None
    return PerExampleGradNorms


def run_microbatch(p, w, b, B, steps, half_life, gen):
    """Real loop: accumulation over k = B/b micro-batches, probe on parameter hooks."""
    k = B // b
    model = nn.Linear(p.dim, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w.reshape(1, -1))
    est = GNSEstimator(half_life)
    out = {}
    with MicroBatchGradNorms(model, grad_scale=1.0 / k) as probe:
        for step in range(1, max(steps) + 1):
            model.zero_grad(set_to_none=True)
            probe.reset()
            x, y = p.sample(B, gen)
            for xb, yb in zip(x.split(b), y.split(b)):
                loss = 0.5 * (model(xb).squeeze(-1) - yb).square().mean() / k
                loss.backward()
            small = probe.sq_norms.mean()
            big = model.weight.grad.square().sum()
            est.update(small, b, big, B)
            if step in steps:
                out[step] = (est.gns, est.gns_rel_std)
    return out


def run_per_example(p, w, B, steps, half_life, gen, probe_cls=None):
    """b = 1: per-example gradients x_i (x_i . w - y_i), or PerExampleGradNorms on nn.Linear."""
    est = GNSEstimator(half_life)
    out = {}
    model = probe = None
    if probe_cls is not None:
        model = nn.Linear(p.dim, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            model.weight.copy_(w.reshape(1, -1))
        probe = probe_cls(model, loss_reduction="mean")
        probe.attach()
    try:
        for step in range(1, max(steps) + 1):
            x, y = p.sample(B, gen)
            if probe is None:
                per_ex = x * (x @ w - y)[:, None]
                small = per_ex.square().sum(-1).mean()
                big = per_ex.mean(0).square().sum()
            else:
                model.zero_grad(set_to_none=True)
                probe.reset()
                (0.5 * (model(x).squeeze(-1) - y).square().mean()).backward()
                small = probe.sq_norms.double().mean()
                big = model.weight.grad.square().sum()
            est.update(small, 1, big, B)
            if step in steps:
                out[step] = (est.gns, est.gns_rel_std)
    finally:
        if probe is not None:
            probe.detach()
    return out


def _fmt(v, spec):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    p = LeastSquaresProblem(dim=args.dim, noise_std=args.noise_std, seed=0)
    probe_cls = _per_example_probe() if args.per_example_probe else None
    b1_name = "per-example (probe)" if probe_cls is not None else "per-example (direct)"
    methods = [(b1_name, 1)] + [("micro-batch", b) for b in args.micro]
    rows = []
    t0 = time.perf_counter()
    for i_point, (point, frac) in enumerate(POINTS.items()):
        w = p.w_star * frac
        exact = float(p.exact_stats(w)["gns"])
        for i_method, (name, b) in enumerate(methods):
            per_seed = []
            for seed in range(args.seeds):
                # independent data for every (point, method, seed): errors are not shared
                gen = torch.Generator().manual_seed(10_000 * seed + 100 * i_point + i_method)
                if b == 1:
                    res = run_per_example(p, w, args.batch, args.steps, args.half_life, gen,
                                          probe_cls)
                else:
                    res = run_microbatch(p, w, b, args.batch, args.steps, args.half_life, gen)
                per_seed.append(res)
            for s in args.steps:
                vals = [r[s][0] for r in per_seed]
                stds = [r[s][1] for r in per_seed if r[s][1] is not None]
                finite = [v for v in vals if v is not None]
                mean = statistics.fmean(finite) if finite else None
                abs_err = [abs(v / exact - 1) for v in finite]
                rows.append(dict(
                    point=point, method=name, b=b, steps=s, estimate=mean, exact=exact,
                    rel_err=None if mean is None else mean / exact - 1,
                    med_abs_err=statistics.median(abs_err) if abs_err else None,
                    rel_std=statistics.fmean(stds) if stds else None,
                    undefined=len(vals) - len(finite),
                ))
    elapsed = time.perf_counter() - t0
    header = ("| point | method | b | steps | gns (mean over seeds) | exact | rel err of mean "
              "| median abs rel err | reported rel std |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        est = _fmt(r["estimate"], ".3f")
        if r["undefined"]:
            est += f" ({r['undefined']} undefined)"
        lines.append(
            f"| {r['point']} | {r['method']} | {r['b']} | {r['steps']} | {est} | "
            f"{r['exact']:.3f} | {_fmt(r['rel_err'], '+.2%')} | {_fmt(r['med_abs_err'], '.2%')} | "
            f"{_fmt(r['rel_std'], '.2%')} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"\n{elapsed:.1f} s")
    if not args.no_write:
        _write_section(args, table, elapsed)
    return rows


def _write_section(args, table: str, elapsed: float) -> None:
    cmd = " ".join(["python", "benchmarks/gns_accuracy.py", *sys.argv[1:]])
    body = "\n".join([
        "## gns_accuracy: online GNS vs exact (least squares)",
        "",
        f"- command: `{cmd}`",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: CPU ({cpu_name()}), torch {torch.__version__}, "
        f"python {platform.python_version()}, 1 thread",
        f"- config: dim={args.dim}, noise_std={args.noise_std}, B={args.batch}, "
        f"micro b={args.micro}, seeds={args.seeds}, half-life={args.half_life:g} samples, "
        "fresh data every step; w = frac * w_star with start=0, mid=0.5, near=0.95",
        f"- wall time: {elapsed:.1f} s",
        "- rel std: the estimator's own `gns_rel_std` (mean over seeds); one run's error should "
        "be within ~2-3x of it",
        "",
        table,
    ])
    path: Path = args.results
    write_section(path, "gns_accuracy", body)
    print(f"wrote section to {path}")


if __name__ == "__main__":
    main()
