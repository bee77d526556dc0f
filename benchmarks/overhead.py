"""What does measuring the noise scale cost per training step? Time and peak memory.

Configurations, on the char-LM transformer (``adabatch.tasks.charlm.CharLM``), one global
batch per optimizer step:

- ``off``: plain Lightning, no adabatch callback;
- ``per-example (torch)``: ``AdaptiveBatchSize(noise="per_example")`` with
  ``ADABATCH_KERNELS=torch`` (the exact torch reference path: ghost norm or materialised
  per-example products per layer, whichever is cheaper);
- ``per-example (torch) + log every step``: the same with ``log_every_n_steps=1`` (ten
  ``pl_module.log`` calls per step; the library's default follows the trainer's interval),
  every other row logs never;
- ``off, accumulate k`` and ``micro-batch probe, accumulate k``: the global batch as k
  micro-batches (``noise="microbatch"``: parameter hooks see each micro-batch's gradient);
  compare it with ``off, accumulate k``, since accumulation itself costs;
- ``per-example (Triton)``: ``ADABATCH_KERNELS=triton``; only where CUDA is present (else a
  line says it was skipped).

All adabatch rows use ``policy=FixedPolicy()`` (measure only; the batch never changes).

Step time: wall time between consecutive optimizer steps (``on_train_batch_end`` of the step's
last micro-batch; CUDA synchronised), after ``--warmup`` steps, and on CPU also the main
thread's CPU time over the same interval (``time.thread_time``; with 1 torch thread and no
loader workers all the step's work runs there, and other processes on a shared machine do
not inflate it); the median of all measured
steps over ``--repeats`` runs, which are interleaved across configurations so that drifts in
the machine's load hit all of them alike. The spread is the interquartile range.

Peak memory: each run is a forked process. On CPU it is the rise of the peak resident set size
(``VmHWM``, reset through ``/proc/self/clear_refs`` before ``fit``) over the resident set size
just before ``fit``: everything the training allocates at its peak, Lightning's own state
included, an upper bound on the step's tensors (the allocator may keep freed memory). On CUDA
it is ``torch.cuda.max_memory_allocated()`` during ``fit`` (exact tensor memory).

    python benchmarks/overhead.py --quick     # < 60 s: a tiny char-LM, 1 repeat
    python benchmarks/overhead.py             # the default char-LM (d=64, 2 layers, T=64)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SECTION = "overhead"


class StepTimer(Callback):
    """Wall time between consecutive optimizer steps."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._last_step = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.thread_time())


def _status_kb(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"{key}:\s+(\d+)", text)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


CONFIGS = {
    # name: (callback kwargs or None, accumulation, kernels)
    "off": (None, 1, None),
    "per-example (torch)": ({"noise": "per_example"}, 1, "torch"),
    "per-example (torch) + log every step": ({"noise": "per_example",
                                              "log_every_n_steps": 1}, 1, "torch"),
    "off, accumulate k": (None, "k", None),
    "micro-batch probe, accumulate k": ({"noise": "microbatch"}, "k", None),
    "per-example (Triton)": ({"noise": "per_example"}, 1, "triton"),
}


def _child(name: str, args: argparse.Namespace, data: Any, conn: Any) -> None:
    """One run, in a forked process: (step times, peak memory) through ``conn``."""
    try:
        from lightning.pytorch import seed_everything

        from adabatch import AdaptiveBatchSize
        from adabatch.control.policy import FixedPolicy
        from adabatch.tasks.charlm import CharLM

        cb_kw, accumulation, kernels = CONFIGS[name]
        k = args.accumulate if accumulation == "k" else 1
        if kernels is not None:
            os.environ["ADABATCH_KERNELS"] = kernels
        common.quiet_lightning()
        common.set_threads(args.threads)
        seed_everything(0, verbose=False)
        model = common.quiet_module(CharLM)(d_model=args.d_model, n_layers=args.layers,
                                            n_heads=args.heads, context=args.context)
        loader = common.resizable_loader(data, args.batch // k, seed=0)
        timer = StepTimer()
        callbacks: list = []
        if cb_kw is not None:
            kw = dict(policy=FixedPolicy(), ref_batch_size=args.batch, log_every_n_steps=10**9,
                      resize="accumulate")
            kw.update(cb_kw)
            callbacks.append(AdaptiveBatchSize(**kw))
        callbacks.append(timer)
        cuda = torch.cuda.is_available()
        trainer = common.fast_trainer(
            callbacks, tempfile.mkdtemp(), accelerator="gpu" if cuda else "cpu",
            max_steps=args.warmup + args.steps, accumulate_grad_batches=k)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss0 = _status_kb("VmRSS")
        reset = _reset_peak_rss()
        trainer.fit(model, train_dataloaders=loader)
        if cuda:
            mem = torch.cuda.max_memory_allocated() / 2**20
            kind = "CUDA max_memory_allocated"
        else:
            hwm = _status_kb("VmHWM")
            mem = (hwm - rss0) / 1024 if reset and hwm is not None and rss0 is not None \
                else float("nan")
            kind = "peak RSS rise"
        t = timer.times
        t = t[args.warmup - 1:]  # the end of the last warm-up step starts the first measured
        steps = [b - a for a, b in zip(t, t[1:])]
        c = timer.cpu_times[args.warmup - 1:]
        cpu = [b - a for a, b in zip(c, c[1:])]
        conn.send({"steps": steps, "cpu": cpu, "mem": mem, "mem_kind": kind})
    except Exception as e:  # report, don't hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _run(name: str, args: argparse.Namespace, data: Any) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, args, data, child))
    proc.start()
    child.close()
    try:
        out = parent.recv()
    except EOFError:
        out = {"error": f"the run died (exit code {proc.exitcode})"}
    proc.join()
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 repeat (< 60 s)")
    ap.add_argument("--batch", type=int, default=None, help="global batch (sequences)")
    ap.add_argument("--accumulate", type=int, default=4, help="k for the accumulation rows")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="measured steps per run")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to write to (default benchmarks/RESULTS.md; --quick: none)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    quick = args.quick
    defaults = dict(batch=16 if quick else 32, context=32 if quick else 64,
                    d_model=32 if quick else 64, heads=2 if quick else 4,
                    warmup=3 if quick else 5, steps=8 if quick else 30,
                    repeats=1 if quick else 2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1:
        ap.error(f"--warmup={args.warmup} must be >= 1")
    if args.batch % args.accumulate:
        ap.error(f"--batch={args.batch} must be a multiple of --accumulate={args.accumulate}")
    if args.results is None and not quick:
        args.results = common.DEFAULT_RESULTS
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    common.quiet_lightning()
    common.set_threads(args.threads)
    load_before = common.load_average()
    t0 = time.perf_counter()
    from adabatch.tasks.charlm import CharLMData

    data_module = CharLMData(batch_size=args.batch, context=args.context, max_bytes=400_000)
    data_module.setup("fit")
    data = common.BatchedWindows(data_module.train_set)
    names = [n for n in CONFIGS if n != "per-example (Triton)" or torch.cuda.is_available()]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            out = _run(name, args, data)
            runs[name].append(out)
            print(f"  rep {rep} {name}: "
                  + (out["error"] if "error" in out else
                     f"{1e3 * statistics.median(out['steps']):.1f} ms/step, "
                     f"mem {out['mem']:.1f} MiB"), flush=True)
    seconds = time.perf_counter() - t0

    def summary(name: str) -> dict[str, float]:
        steps = [s for r in runs[name] if "steps" in r for s in r["steps"]]
        mems = [r["mem"] for r in runs[name] if "mem" in r]
        if not steps:
            return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"),
                    "cpu": float("nan"), "mem": float("nan"), "n": 0}
        q = statistics.quantiles(steps, n=4) if len(steps) > 1 else [steps[0]] * 3
        cpu = [s for r in runs[name] if "cpu" in r for s in r["cpu"]]
        return {"median": statistics.median(steps), "q1": q[0], "q3": q[2],
                "cpu": statistics.median(cpu) if cpu else float("nan"),
                "mem": max(mems) if mems else float("nan"), "n": len(steps)}

    stats = {n: summary(n) for n in names}
    base = {1: stats["off"], "k": stats["off, accumulate k"]}
    rows = []
    for name in names:
        s = stats[name]
        _, accumulation, _ = CONFIGS[name]
        ref = base[accumulation]
        errors = [r["error"] for r in runs[name] if "error" in r]
        rows.append([
            name, f"{args.batch // (args.accumulate if accumulation == 'k' else 1)} x "
                  f"{args.accumulate if accumulation == 'k' else 1}",
            f"{1e3 * s['median']:.1f} [{1e3 * s['q1']:.1f}, {1e3 * s['q3']:.1f}]",
            common.fmt(s["median"] / ref["median"], ".2f") + "x",
            f"{1e3 * s['cpu']:.1f}",
            common.fmt(s["cpu"] / ref["cpu"], ".3f") + "x",
            common.fmt(s["mem"], ".1f"),
            common.fmt(s["mem"] - ref["mem"], "+.1f"),
            str(s["n"]) + (f" ({'; '.join(errors)})" if errors else ""),
        ])
    mem_kind = next((r["mem_kind"] for rs in runs.values() for r in rs if "mem_kind" in r),
                    "peak RSS rise")
    lines = [f"## {SECTION}: cost of measuring the noise scale per training step", ""]
    lines += common.context_lines("overhead.py", argv, load_before)
    lines += [
        f"- wall time: {seconds:.0f} s",
        f"- model: char-LM transformer d_model={args.d_model}, {args.layers} layers, "
        f"{args.heads} heads, context {args.context}; AdamW; global batch {args.batch} "
        f"sequences; {args.warmup} warm-up steps, then {args.steps} measured steps per run, "
        f"{args.repeats} interleaved repeat(s), each run in a forked process",
        f"- step time: median [interquartile range] over all measured steps; ratio against "
        f"'off' with the same micro-batch layout. Memory: {mem_kind} during fit, MiB "
        "(see the script's docstring for what it includes)",
    ]
    if not torch.cuda.is_available():
        lines.append("- per-example (Triton): skipped, no CUDA device on this machine")
    lines += ["", common.md_table(
        ["configuration", "micro x k", "ms per step", "vs off", "CPU ms per step",
         "CPU vs off", "memory MiB",
         "memory vs off MiB", "steps measured"], rows)]
    text = "\n".join(lines)
    common.publish(text, None if args.no_write else args.results, SECTION)
    return {"stats": stats, "text": text}


if __name__ == "__main__":
    main()
