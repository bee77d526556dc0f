"""Overhead of the per-example gradient-norm probe on a CPU training step of a small transformer.

    python benchmarks/norm_overhead.py --quick      # < 1 min
    python benchmarks/norm_overhead.py              # the recorded run

Every configuration trains its own copy of the same model (same init, same batch, AdamW) and
the configurations take turns step by step, so a change in machine load hits all of them
alike; each row is the median over the timed steps after a warm-up. The main figure is the
process CPU time per step (``time.process_time``: the work done, which other processes on a
shared machine barely change); wall time is shown beside it. A probed step includes what the
callback does each step: read ``sq_norms`` and ``reset()``.

Configurations: ``plain`` (no probe); ``probe`` (``PerExampleGradNorms`` defaults:
``method="auto"``, simultaneous Linear weight gradients where they pay, the run-time check on
the first two passes and every 64th); ``check every pass`` (``verify_every=1``); ``no
simultaneous`` (autograd computes every dW, norms by ghost/materialise, no check); ``ghost
only`` and ``materialize only`` (every Linear/Conv forced to one method, no simultaneous, no
check); ``vmap`` (per-example gradients of the whole model from ``torch.func.vmap(grad)``,
summed into ``.grad``: the generic baseline).

Per layer type: CPU time inside each norm rule (the rules' ``compute``), per step. The
simultaneous Linear's work happens in its backward, which replaces autograd's dW, so it shows
in the step time, not here; the rest of the overhead is hooks, bookkeeping and the check.

Memory: the high-water mark of the bytes of tensor storages created during one step (by any
torch op, forward, backward, hooks and optimizer alike), tracked by a ``TorchDispatchMode``
that counts each new storage and uncounts it when it is freed. It counts tensors only
(activations, gradients, the probe's temporaries), not Python objects or allocator caching;
``torch.profiler``'s memory events were tried first and drifted (frees of tensors allocated
before profiling are invisible to it).

Two model variants: ``linear`` attention (q/k/v/out as ``nn.Linear``, like the char-LM task)
is the headline; ``mha`` uses ``nn.MultiheadAttention``, whose rule reads the module's own
q/k/v and out projections during its forward (no recompute).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import sys
import time
import warnings
import weakref
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from results import cpu_name, write_section
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from adabatch import PerExampleGradNorms
from adabatch.noise import per_example

TARGET = 1.2  # issue 10's target: the probe adds <= 20% to a CPU training step


# ------------------------------------------------------------------------------------ model
class Attention(nn.Module):
    def __init__(self, d: int, heads: int, kind: str) -> None:
        super().__init__()
        self.kind, self.heads = kind, heads
        if kind == "mha":
            self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if self.kind == "mha":
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
            return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, kind: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, kind)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """Embedding + positions ([B, T] index) + pre-norm blocks + LayerNorm + untied head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int, kind: str):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, kind) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device).expand(b, t))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


# ------------------------------------------------------------------------------------ steps
class Runner:
    """One configuration: a model copy, its optimizer, and optionally a probe."""

    def __init__(self, name: str, model: nn.Module, probe_kw: dict | None, vmap_grads: bool):
        self.name, self.model = name, model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.probe = None if probe_kw is None else PerExampleGradNorms(model, **probe_kw).attach()
        self.vmap_grads = vmap_grads
        self.times: list[float] = []  # CPU seconds of this process per step
        self.walls: list[float] = []
        self.rule_times: dict[str, list[float]] = defaultdict(list)

    def step(self, ids: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.vmap_grads:
            self._vmap_step(ids, y)
        else:
            loss = F.cross_entropy(self.model(ids).flatten(0, 1), y.flatten())
            loss.backward()
            if self.probe is not None:
                sq = self.probe.sq_norms
                assert sq.shape == (ids.shape[0],)
                self.probe.reset()
        self.opt.step()

    def _vmap_step(self, ids: torch.Tensor, y: torch.Tensor) -> None:
        params = {n: p.detach() for n, p in self.model.named_parameters()}

        def loss_one(p: dict, i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = functional_call(self.model, p, (i.unsqueeze(0),))
            return F.cross_entropy(logits.flatten(0, 1), t)

        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, ids, y)
        sq = sum(g.flatten(1).square().sum(1) for g in grads.values())
        assert sq.shape == (ids.shape[0],)
        for n, p in self.model.named_parameters():
            p.grad = grads[n].mean(0)


class RuleTimer:
    """Wraps each norm rule's compute to accumulate wall time per layer type."""

    def __init__(self) -> None:
        self.active: Runner | None = None
        self.acc: dict[str, float] = defaultdict(float)
        for rule in per_example._RULES:
            rule.compute = self._wrap(rule.kind, rule.compute)

    def _wrap(self, kind, fn):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[kind] += time.process_time() - t0

        return timed


class StorageTracker(TorchDispatchMode):
    """Live bytes of the tensor storages that torch ops create while the mode is active.

    Every op output's storage is counted once when created and uncounted when it is freed
    (a weakref finaliser), so ``peak`` is the high-water mark of tensor memory made during the
    tracked region, temporaries included. Tensors that existed before (parameters, optimizer
    state) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: set[int] = set()
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or storage.nbytes() == 0:
                    continue
                self.live.add(key)
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        if key in self.live:
            self.live.discard(key)
            self.current -= nbytes


def peak_step_bytes(runner: Runner, ids: torch.Tensor, y: torch.Tensor) -> int | None:
    """Peak bytes of tensors created during one step (see `StorageTracker`)."""
    tracker = StorageTracker()
    try:
        with tracker:
            runner.step(ids, y)
    except RuntimeError:  # torch.func transforms refuse some dispatch modes
        return None
    return tracker.peak


# ------------------------------------------------------------------------------------ main
CONFIGS = [
    ("plain", None, False),
    ("probe", {}, False),
    ("check every pass", {"verify_every": 1}, False),
    ("no simultaneous", {"simultaneous": False, "verify": False}, False),
    ("ghost only", {"simultaneous": False, "method": "ghost", "verify": False}, False),
    ("materialize only", {"simultaneous": False, "method": "materialize", "verify": False}, False),
    ("vmap", None, True),
]
RULE_COLUMNS = slice(1, 6)  # the probe configurations


def run_variant(kind: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base = TinyLM(args.vocab, args.d_model, args.layers, args.heads, args.seq, kind)
    runners = [Runner(n, copy.deepcopy(base), kw, vm) for n, kw, vm in CONFIGS]
    for r in runners:
        if r.probe is not None and r.probe.uncovered:
            raise SystemExit(f"{kind}: probe does not cover {r.probe.uncovered_reasons}")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    timer = RuleTimer()
    for k in range(args.warmup + args.repeats):
        for r in runners:
            timer.acc.clear()
            w0, t0 = time.perf_counter(), time.process_time()
            r.step(ids, y)
            cpu, wall = time.process_time() - t0, time.perf_counter() - w0
            if k >= args.warmup:
                r.times.append(cpu)
                r.walls.append(wall)
                for rule_kind, seconds in timer.acc.items():
                    r.rule_times[rule_kind].append(seconds)
    memory = {r.name: peak_step_bytes(r, ids, y) for r in runners}
    return {"runners": runners, "memory": memory}


def fmt_table(kind: str, result: dict) -> list[str]:
    runners, memory = result["runners"], result["memory"]
    plain = statistics.median(runners[0].times)
    plain_mem = memory["plain"]
    lines = [
        f"**{kind} attention**",
        "",
        "| config | CPU ms/step | x plain | wall ms/step | x plain | peak step MB | x plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    plain_wall = statistics.median(runners[0].walls)
    for r in runners:
        t, w = statistics.median(r.times), statistics.median(r.walls)
        m = memory[r.name]
        mem = "n/a | n/a" if m is None else f"{m / 2**20:.1f} | {m / max(plain_mem, 1):.2f}"
        lines.append(
            f"| {r.name} | {t * 1e3:.1f} | {t / plain:.2f} | {w * 1e3:.1f} | "
            f"{w / plain_wall:.2f} | {mem} |"
        )
    kinds = sorted({k for r in runners for k in r.rule_times})
    lines += [
        "",
        "CPU time inside the norm rules per step, ms (share of the plain step):",
        "",
        "| layer type | " + " | ".join(r.name for r in runners[RULE_COLUMNS]) + " |",
        "|---|" + "---:|" * len(runners[RULE_COLUMNS]),
    ]
    for k in kinds:
        cells = []
        for r in runners[RULE_COLUMNS]:
            v = statistics.median(r.rule_times[k]) if r.rule_times.get(k) else 0.0
            cells.append(f"{v * 1e3:.1f} ({v / plain:.0%})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def write_results(path: Path, body: list[str]) -> None:
    write_section(path, "norm_overhead", "\n".join(body))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (< 1 min)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=96)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--attention", choices=["linear", "mha", "both"], default="both")
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "d_model", "layers", "heads", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.d_model % args.heads:
        parser.error(f"--d-model={args.d_model} must be divisible by --heads={args.heads}")
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.repeats = args.repeats if args.repeats is not None else (4 if args.quick else 20)
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f"--warmup={args.warmup} must be >= 0 and --repeats={args.repeats} >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")

    kinds = ["linear", "mha"] if args.attention == "both" else [args.attention]
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    results = {kind: run_variant(kind, args) for kind in kinds}
    load_after = os.getloadavg()

    command = "python benchmarks/norm_overhead.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    body = [
        "## Per-example norm probe overhead (`benchmarks/norm_overhead.py`)",
        "",
        f"- command: `{command.strip()}`",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}",
        f"- load average (1/5/15 min) before: {'/'.join(f'{v:.1f}' for v in load_before)}, "
        f"after: {'/'.join(f'{v:.1f}' for v in load_after)} (a shared machine: the rows are "
        "interleaved step by step so load hits them alike, but it adds noise)",
        f"- model: vocab {args.vocab}, d_model {args.d_model}, {args.layers} layers, "
        f"{args.heads} heads, MLP 4x; batch {args.batch} x seq {args.seq}, AdamW; "
        f"{args.warmup} warm-up + {args.repeats} timed steps per config; "
        f"wall {time.perf_counter() - t_start:.0f} s",
        f"- target: probe <= {TARGET:.2f}x plain (linear attention, default settings, CPU time)",
        "",
    ]
    if "linear" in results:
        runners = results["linear"]["runners"]
        ratio = statistics.median(runners[1].times) / statistics.median(runners[0].times)
        verdict = "meets" if ratio <= TARGET else "misses"
        body += [
            f"**Verdict: the probe costs {ratio:.2f}x a plain step (linear attention), which "
            f"{verdict} the {TARGET:.2f}x target.**",
            "",
        ]
    body += [
        "Reading the tables: at T=64 and d=128 the ghost and materialised norms each cost about "
        "a third of a Linear's forward+backward (ghost T(i+o)/(3io), materialised 1/3), so "
        "autograd's dW plus any separate norm pass has that floor; the simultaneous method "
        "(default) replaces dW for the layers where that third is largest (q/k/v/out, head) and "
        "the ghost norm stays on the MLP. `nn.MultiheadAttention`'s rule reads the q/k/v and "
        "out projections of the module's own forward (`F.linear` tapped while it runs), so it "
        "costs the norms of those four maps and no recompute (before issue 10: a batched "
        "recompute of the attention, 37% of a plain step). Measured kernel costs at these "
        "shapes (B=32, T=64, one thread): dW matmul 0.82 ms, simultaneous 1.19, ghost 0.94 for "
        "a 128x128 layer; 3.4 / 5.4 / 2.5 for 128x512: the remaining overhead is mostly these "
        "GEMMs, not Python.",
        "",
    ]
    for kind in kinds:
        body += fmt_table(kind, results[kind]) + [""]
    print("\n".join(body))
    if not args.no_write:
        write_results(args.results, body)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
