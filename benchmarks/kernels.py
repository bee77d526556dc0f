"""Per-example gradient norm kernels: speed against the plain dW GEMM, the torch reference and
torch.func, and their cost inside a GPT-2-small training step.

On a CUDA GPU, in one call (each part time-boxed, a failing config recorded and skipped):

1. correctness of every kernel against ``kernels/reference.py`` on odd shapes, and on tensors
   of more than 2^31 elements (int64 offsets; ``--skip-large`` to skip);
2. Linear layers over a (B, T, d_in, d_out) grid with GPT-2-small shapes (768/3072, T=128..2048,
   B*T tokens fixed): plain dW GEMM ``g^T x`` (cuBLAS), fused dW+norms kernel, fused norms
   only, ghost kernel, torch reference (auto method; simultaneous dW+norms) and
   ``torch.func.vmap(grad)`` per-example gradients; LayerNorm affine norms kernel vs reference;
3. a GPT-2-small-sized model (12 layers, d=768, untied head) training step (bf16 autocast,
   AdamW) with the probe off, LayerNorm-only, all layers (with and without the probe's
   run-time verification), and all Linear layers computing dW through the fused kernel in a
   custom autograd function (norms for free) plus the probe on LayerNorm/Embedding;
4. ``--tune``-style sweep of block sizes / splits / warps for two shapes, while time is left.

Timing: warm-up, then the median of repeats, CUDA events. Goals printed against: all-layer
norms add <= 10% to the step, LayerNorm-only <= 1%, fused linear within 1.25x of the plain
dW GEMM. Writes a CSV (each row: device, torch/triton versions, date, config) and the
section between ``<!-- kernels:start -->`` and ``<!-- kernels:end -->`` of
``benchmarks/RESULTS.md`` (other sections kept).

Without CUDA (or with ``--quick``) it runs tiny shapes as a smoke check, on the CPU through
Triton's interpreter (< 1 min), and writes no files unless ``--csv``/``--results`` are given.

    python benchmarks/kernels.py                     # GPU, ~8 min, --time-limit 480 by default
    python benchmarks/kernels.py --quick             # smoke check (CPU: interpreter)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from results import write_section

# TRITON_INTERPRET is read when triton is first imported: decide before importing adabatch.
_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from adabatch.kernels import reference  # noqa: E402

HERE = Path(__file__).resolve().parent
GOAL_ALL, GOAL_LN, GOAL_FUSED = 0.10, 0.01, 1.25


# ------------------------------------------------------------------------------ plumbing
class Bench:
    """Rows, a deadline, and failure bookkeeping shared by all sections."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.skipped: list[str] = []
        self.device = "cuda" if _CUDA else "cpu"
        self.context = _context()

    def left(self) -> float:
        return self.args.time_limit - (time.monotonic() - self.t0)

    def ok_to_start(self, what: str, need: float = 5.0) -> bool:
        if self.left() < need:
            self.skipped.append(what)
            print(f"  [time limit] skipping {what}", flush=True)
            return False
        return True

    def add(self, section: str, name: str, config: dict, ms: float | None, **extra) -> dict:
        row = {"section": section, "name": name, **config, "ms": ms, **extra}
        self.rows.append(row)
        return row

    def attempt(self, what: str, fn):
        """Run one config; on failure (OOM, compile error, ...) record it and go on."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - a benchmark keeps going
            msg = f"{what}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            self.failures.append(msg)
            print(f"  FAILED {msg}", flush=True)
            if self.args.verbose:
                traceback.print_exc()
            if _CUDA:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return None


def _context() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "missing"
    if _CUDA:
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU (Triton interpreter={os.environ.get('TRITON_INTERPRET') == '1'})"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "-",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _sync() -> None:
    if _CUDA:
        torch.cuda.synchronize()


def timeit(fn, *, warmup: int = 2, reps: int = 10, budget_s: float = 1.0) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""
    if not _CUDA:  # interpreter smoke check: the numbers mean nothing, keep it short
        warmup, reps = min(warmup, 1), min(reps, 2)
    for _ in range(warmup):
        fn()
    _sync()
    times: list[float] = []
    t_end = time.monotonic() + budget_s
    for k in range(reps):
        if _CUDA:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if k >= 2 and time.monotonic() > t_end:
            break  # slow config: 3 repeats are enough for a median
    return statistics.median(times)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item() if b.numel() else 0.0


def _rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


# ------------------------------------------------------------------------------ 1. correctness
def check_correctness(bench: Bench, kernels) -> None:
    lin, gho, aff = kernels
    dev = bench.device
    shapes = [(3, 33, 17, 20), (1, 1, 17, 5)]
    if _CUDA:
        shapes += [(2, 130, 40, 70), (4, 257, 768, 3072), (2, 1023, 3072, 768)]
    for B, T, i, o in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            cfg = dict(B=B, T=T, d_in=i, d_out=o, dtype=str(dtype).split(".")[-1])

            def run(B=B, T=T, i=i, o=o, dtype=dtype, cfg=cfg):
                x = torch.randn(B, T, i, device=dev).to(dtype)
                g = torch.randn(B, T, o, device=dev).to(dtype)
                dw_ref, sq_ref = reference.linear_weight_grad_and_sq_norms(x.double(), g.double())
                dw, sq = lin.linear_weight_grad_and_sq_norms(x, g)
                errs = {
                    "fused_sq": _rel_err(sq, sq_ref),
                    "fused_dw": _rel_fro(dw, dw_ref),
                    "ghost_sq": _rel_err(gho.ghost_sq_norms(x, g), sq_ref),
                }
                w_ref, b_ref = reference.norm_affine_sq_norms(x.double(), x.double())
                w, b = aff.norm_affine_sq_norms(x, x)
                errs["norm_w"], errs["norm_b"] = _rel_err(w, w_ref), _rel_err(b, b_ref)
                # fp32 may run as TF32 on GPU (torch's float32_matmul_precision); 16-bit inputs
                # are read exactly and accumulated in fp32
                tol = 5e-3 if dtype == torch.float32 and _CUDA else 1e-4
                bad = {k: v for k, v in errs.items() if not v <= tol}
                status = "ok" if not bad else f"MISMATCH {bad}"
                print(f"  check {cfg}: max rel err {max(errs.values()):.2e} {status}", flush=True)
                if bad:
                    bench.failures.append(f"correctness {cfg}: {bad}")
                bench.add("check", "kernels vs reference", cfg, None,
                          max_rel_err=max(errs.values()), status=status)

            if bench.ok_to_start(f"check {cfg}", 2):
                bench.attempt(f"check {cfg}", run)

    def fused_linear_layer():
        """FusedNormLinear (used by the step benchmark) against nn.Linear and the reference."""
        FusedNormLinear.lin = lin
        torch.manual_seed(0)
        plain = nn.Linear(17, 20).to(dev)
        fused = FusedNormLinear(17, 20).to(dev)
        fused.load_state_dict(plain.state_dict())
        x = torch.randn(3, 33, 17, device=dev)
        FusedNormLinear.sink.clear()
        for m in (plain, fused):
            m(x).square().sum().backward()
        g = 2 * plain(x).detach()
        _, sq_ref = reference.linear_weight_grad_and_sq_norms(x.double(), g.double())
        errs = {
            "weight": _rel_fro(fused.weight.grad, plain.weight.grad),
            "bias": _rel_fro(fused.bias.grad, plain.bias.grad),
            "sq": _rel_err(FusedNormLinear.sink[0], sq_ref),
        }
        tol = 5e-3 if _CUDA else 1e-4
        bad = {k: v for k, v in errs.items() if not v <= tol}
        status = "ok" if not bad else f"MISMATCH {bad}"
        print(f"  check FusedNormLinear: {errs} {status}", flush=True)
        if bad:
            bench.failures.append(f"FusedNormLinear: {bad}")
        bench.add("check", "FusedNormLinear vs nn.Linear", {}, None,
                  max_rel_err=max(errs.values()), status=status)

    if bench.ok_to_start("check FusedNormLinear", 2):
        bench.attempt("check FusedNormLinear", fused_linear_layer)


def check_large_offsets(
    bench: Bench,
    kernels,
    lin_shape=(64, 16, (1 << 21) + 16, 16),  # x: 2.15e9 elements
    norm_shape=(64, 16384, 2064),  # 2.16e9 elements each
) -> None:
    """Tensors with more than 2^31 elements: int64 offsets (GPU only; ~13 GB)."""
    lin, gho, aff = kernels
    dev = bench.device

    def linear():
        B, T, i, o = lin_shape
        x = torch.randn(B, T, i, device=dev, dtype=torch.bfloat16)
        g = torch.randn(B, T, o, device=dev, dtype=torch.bfloat16)
        xx = torch.empty(B, T, T, device=dev, dtype=torch.float64)
        for s in range(0, B, 4):
            xc = x[s : s + 4].float()
            xx[s : s + 4] = torch.bmm(xc, xc.transpose(1, 2)).double()
        gd = g.double()
        truth = (xx * torch.bmm(gd, gd.transpose(1, 2))).sum((1, 2))
        e_ghost = _rel_err(gho.ghost_sq_norms(x, g), truth)
        e_fused = _rel_err(lin.linear_weight_grad_and_sq_norms(x, g, write_dw=False)[1], truth)
        return {"ghost_sq": e_ghost, "fused_sq": e_fused}

    def norm():
        B, T, d = norm_shape
        xh = torch.randn(B, T, d, device=dev, dtype=torch.bfloat16)
        g = torch.randn(B, T, d, device=dev, dtype=torch.bfloat16)
        w_ref, b_ref = reference.norm_affine_sq_norms(xh, g)
        w, b = aff.norm_affine_sq_norms(xh, g)
        return {"norm_w": _rel_err(w, w_ref), "norm_b": _rel_err(b, b_ref)}

    for name, fn in (("linear (x > 2^31 elements)", linear), ("norm (> 2^31 elements)", norm)):
        if not bench.ok_to_start(f"large {name}", 30):
            continue
        errs = bench.attempt(f"large {name}", fn)
        if _CUDA:
            torch.cuda.empty_cache()
        if errs is None:
            continue
        bad = {k: v for k, v in errs.items() if not v <= 1e-3}
        status = "ok" if not bad else f"MISMATCH {bad}"
        print(f"  large offsets, {name}: {errs} {status}", flush=True)
        if bad:
            bench.failures.append(f"large {name}: {bad}")
        bench.add("check", f"large offsets: {name}", {}, None,
                  max_rel_err=max(errs.values()), status=status)


# ------------------------------------------------------------------------------ 2. kernels
def _vmap_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(g.shape[-1], x.shape[-1], device=x.device, dtype=x.dtype)

    def loss(w, xb, gb):
        return (gb * (xb @ w.T)).sum()

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, g)
    return per_example.float().square().sum((1, 2))


def _linear_fns(lin, gho, x: torch.Tensor, g: torch.Tensor) -> dict:
    x2, g2 = x.flatten(0, 1), g.flatten(0, 1)
    return {
        "gemm": lambda: g2.T @ x2,
        "fused": lambda: lin.linear_weight_grad_and_sq_norms(x, g),
        "fused_norms": lambda: lin.linear_weight_grad_and_sq_norms(x, g, write_dw=False),
        "ghost": lambda: gho.ghost_sq_norms(x, g),
        "ref_auto": lambda: reference.linear_sq_norms(x, g),
        "ref_fused": lambda: reference.linear_weight_grad_and_sq_norms(x, g),
        "vmap": lambda: _vmap_sq_norms(x, g),
    }


def bench_linear(bench: Bench, kernels, shapes, dtype) -> list[dict]:
    lin, gho, _ = kernels
    dev = bench.device
    table = []
    for B, T, i, o in shapes:
        cfg = dict(B=B, T=T, d_in=i, d_out=o, dtype=str(dtype).split(".")[-1])
        if not bench.ok_to_start(f"linear {cfg}", 10):
            continue
        print(f"  linear {cfg}", flush=True)
        data = bench.attempt(
            f"linear {cfg} allocation",
            lambda B=B, T=T, i=i, o=o: (
                torch.randn(B, T, i, device=dev).to(dtype),
                torch.randn(B, T, o, device=dev).to(dtype),
            ),
        )
        if data is None:
            continue
        method = reference.choose_method(T, i, o)
        res = {}
        for name, fn in _linear_fns(lin, gho, *data).items():
            if not bench.ok_to_start(f"linear {cfg} {name}", 3):
                break
            ms = bench.attempt(f"linear {cfg} {name}", lambda fn=fn: timeit(fn))
            res[name] = ms
            flops = 2 * B * T * i * o
            bench.add("linear", name, cfg, ms, auto_method=method,
                      tflops=(flops / ms / 1e9 if ms and name in ("gemm", "fused") else None))
        ratio = res["fused"] / res["gemm"] if res.get("fused") and res.get("gemm") else None
        table.append({**cfg, **res, "fused/gemm": ratio, "auto": method})
        print("    " + ", ".join(f"{k} {_fmt(v)} ms" for k, v in res.items())
              + (f", fused/gemm {ratio:.2f}x" if ratio else ""), flush=True)
        data = None
        if _CUDA:
            torch.cuda.empty_cache()
    return table


def bench_norm_affine(bench: Bench, kernels, shapes, dtype) -> list[dict]:
    _, _, aff = kernels
    dev = bench.device
    table = []
    for B, T, d in shapes:
        cfg = dict(B=B, T=T, d_in=d, d_out=d, dtype=str(dtype).split(".")[-1])
        if not bench.ok_to_start(f"norm {cfg}", 5):
            continue
        xh = torch.randn(B, T, d, device=dev).to(dtype)
        g = torch.randn(B, T, d, device=dev).to(dtype)
        fns = {
            "kernel": lambda xh=xh, g=g: aff.norm_affine_sq_norms(xh, g),
            "reference": lambda xh=xh, g=g: reference.norm_affine_sq_norms(xh, g),
        }
        res = {}
        for name, fn in fns.items():
            ms = bench.attempt(f"norm {cfg} {name}", lambda fn=fn: timeit(fn))
            res[name] = ms
            gbps = 2 * xh.numel() * xh.element_size() / ms / 1e6 if ms else None
            bench.add("norm_affine", name, cfg, ms, gbytes_per_s=gbps)
        table.append({**cfg, **res})
        print(f"  norm {cfg}: " + ", ".join(f"{k} {_fmt(v)} ms" for k, v in res.items()),
              flush=True)
    return table


# ------------------------------------------------------------------------------ 3. a step
class _FusedLinearFn(torch.autograd.Function):
    """F.linear whose backward computes dW with the fused kernel (per-example norms free)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink, lin):
        ctx.save_for_backward(x, weight)
        ctx.sink, ctx.lin = sink, lin
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        B, i, o = x.shape[0], x.shape[-1], g.shape[-1]
        dx = g @ weight.to(g.dtype)
        dw, sq = ctx.lin.linear_weight_grad_and_sq_norms(
            x.reshape(B, -1, i), g.reshape(B, -1, o)
        )
        ctx.sink.append(sq)
        db = g.reshape(-1, o).sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw.to(weight.dtype), db, None, None


class FusedNormLinear(nn.Linear):
    sink: list = []
    lin = None

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
            with torch.autocast(x.device.type, enabled=False):
                return _FusedLinearFn.apply(x, weight, bias, self.sink, self.lin)
        return _FusedLinearFn.apply(x, weight, bias, self.sink, self.lin)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, linear=nn.Linear) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = linear(d, 3 * d), linear(d, d)
        self.fc, self.out = linear(d, 4 * d), linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-small-sized (12 x 768, 12 heads); the head is untied so every weight is covered."""

    def __init__(self, vocab=50257, T=1024, d=768, layers=12, heads=12, linear=nn.Linear):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads, linear) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = linear(d, vocab, bias=False)

    def forward(self, ids):
        # positions as [B, T]: the probe reads dim 0 of every covered module's input as the batch
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _train_step(model, opt, probe, inp, tgt, amp) -> None:
    FusedNormLinear.sink.clear()
    with amp:
        logits = model(inp)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if probe is not None:
        probe.sq_norms  # noqa: B018 - read every step, as the callback does (one host sync)
        probe.reset()


def bench_step(bench: Bench, kernels, cfg: dict) -> list[dict]:
    from adabatch.noise.per_example import PerExampleGradNorms

    dev = bench.device
    B, T = cfg["B"], cfg["T"]
    model_kw = {k: cfg[k] for k in ("vocab", "d", "layers", "heads")}
    torch.manual_seed(0)
    ids = torch.randint(0, cfg["vocab"], (B, T + 1), device=dev)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if _CUDA else contextlib.nullcontext()
    FusedNormLinear.lin = kernels[0]

    def make(linear=nn.Linear):
        torch.manual_seed(0)
        model = GPT(T=T, linear=linear, **model_kw).to(dev)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=_CUDA)

    def subset(model, types):
        return nn.ModuleList(m for m in model.modules() if isinstance(m, types))

    variants = {
        "probe off": (nn.Linear, None, {}),
        "LayerNorm only": (nn.Linear, lambda m: subset(m, nn.LayerNorm), {"verify": False}),
        "all layers": (nn.Linear, lambda m: m, {"verify": False}),
        "all layers, verify=True": (nn.Linear, lambda m: m, {"verify": True}),
        "all layers, fused dW": (
            FusedNormLinear, lambda m: subset(m, (nn.LayerNorm, nn.Embedding)), {"verify": False}
        ),
    }
    table = []
    base = None
    for name, (linear, target, kw) in variants.items():
        if not bench.ok_to_start(f"step {name}", 20 if _CUDA else 5):
            continue
        print(f"  step: {name}", flush=True)

        def run(linear=linear, target=target, kw=kw):
            model, opt = make(linear)
            probe = PerExampleGradNorms(target(model), **kw).attach() if target else None
            try:
                ms = timeit(lambda: _train_step(model, opt, probe, inp, tgt, amp),
                            warmup=2, reps=8, budget_s=15)
                return ms, (probe.uncovered if probe is not None else [])
            finally:
                if probe is not None:
                    probe.detach()

        out = bench.attempt(f"step {name}", run)
        if _CUDA:
            torch.cuda.empty_cache()
        ms, uncovered = out if out else (None, [])
        if name == "probe off":
            base = ms
        overhead = ms / base - 1 if ms and base else None
        bench.add("step", name, {k: cfg[k] for k in ("B", "T", "d", "layers")}, ms,
                  overhead=overhead, uncovered=len(uncovered))
        table.append({"variant": name, "ms": ms, "overhead": overhead,
                      "uncovered": ", ".join(uncovered[:3])})
        print(f"    {_fmt(ms)} ms" + (f", {overhead:+.1%}" if overhead is not None else "")
              + (f", uncovered {uncovered[:3]}" if uncovered else ""), flush=True)
    return table


# ------------------------------------------------------------------------------ 4. tuning
def bench_tune(bench: Bench, kernels, shapes, dtype) -> list[dict]:
    lin, gho, _ = kernels
    dev = bench.device
    best = []
    for B, T, i, o in shapes:
        cfg = dict(B=B, T=T, d_in=i, d_out=o, dtype=str(dtype).split(".")[-1])
        if not bench.ok_to_start(f"tune {cfg}", 10):
            continue
        x = torch.randn(B, T, i, device=dev).to(dtype)
        g = torch.randn(B, T, o, device=dev).to(dtype)
        gemm_fn = _linear_fns(lin, gho, x, g)["gemm"]
        gemm = bench.attempt("tune gemm", lambda fn=gemm_fn: timeit(fn))
        trials = []
        for bo, bi in ((128, 128), (64, 128), (128, 64)):
            for splits in (1, 2, 4, 8):
                for warps, stages in ((8, 3), (4, 3), (8, 4)):
                    opts = dict(block_o=bo, block_i=bi, block_t=64, splits=splits,
                                num_warps=warps, num_stages=stages)
                    trials.append(("fused", lambda o=opts, x=x, g=g:
                                   lin.linear_weight_grad_and_sq_norms(x, g, **o), opts))
        for bt in (32, 64, 128):
            for bk in (32, 64):
                for warps in (4, 8):
                    opts = dict(block_t=bt, block_k=bk, num_warps=warps)
                    trials.append(("ghost", lambda o=opts, x=x, g=g: gho.ghost_sq_norms(x, g, **o),
                                   opts))
        results: dict[str, list] = {"fused": [], "ghost": []}
        for kind, fn, opts in trials:
            if not bench.ok_to_start(f"tune {cfg} {kind} {opts}", 3):
                break
            ms = bench.attempt(f"tune {kind} {opts}", lambda fn=fn: timeit(fn, reps=5))
            if ms is not None:
                results[kind].append((ms, opts))
                bench.add("tune", kind, cfg, ms, options=str(opts), gemm_ms=gemm)
        for kind, res in results.items():
            if res:
                ms, opts = min(res, key=lambda r: r[0])
                best.append({**cfg, "kernel": kind, "best ms": ms, "gemm ms": gemm,
                             "options": str(opts)})
                print(f"  tune {cfg} {kind}: best {ms:.3f} ms with {opts} (gemm {_fmt(gemm)})",
                      flush=True)
        trials = x = g = None
        if _CUDA:
            torch.cuda.empty_cache()
    return best


# ------------------------------------------------------------------------------ output
def _md_table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(no results)"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            if c == "overhead" and isinstance(v, float):
                vals.append(f"{v:+.1%}")
            elif c == "fused/gemm" and isinstance(v, float):
                vals.append(f"{v:.2f}x")
            else:
                vals.append(_fmt(v))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _goals(lin_table, step_table) -> list[str]:
    if not _CUDA:
        return ["not evaluated: no GPU (interpreter timings say nothing about GPU speed)"]
    out = []
    ratios = [r["fused/gemm"] for r in lin_table if r.get("fused/gemm")]
    if ratios:
        worst = max(ratios)
        out.append(f"fused linear vs plain dW GEMM: worst {worst:.2f}x, median "
                   f"{statistics.median(ratios):.2f}x (goal <= {GOAL_FUSED}x): "
                   f"{'PASS' if worst <= GOAL_FUSED else 'FAIL'}")
    by = {r["variant"]: r for r in step_table}
    for name, goal in (("LayerNorm only", GOAL_LN), ("all layers", GOAL_ALL),
                       ("all layers, fused dW", GOAL_ALL)):
        ov = by.get(name, {}).get("overhead")
        if ov is not None:
            out.append(f"step, {name}: {ov:+.1%} (goal <= {goal:.0%}): "
                       f"{'PASS' if ov <= goal else 'FAIL'}")
    return out


def write_csv(bench: Bench, path: Path) -> None:
    keys: list[str] = []
    for r in bench.rows:
        keys += [k for k in r if k not in keys]
    cols = list(bench.context) + keys
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in bench.rows:
            w.writerow({**bench.context, **r})
    print(f"wrote {path}", flush=True)


def write_results(bench: Bench, path: Path, body_md: str) -> None:
    write_section(path, "kernels", body_md)
    print(f"wrote section of {path}", flush=True)


# ------------------------------------------------------------------------------ main
def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes only (the default without CUDA: Triton interpreter)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the whole run; later parts are skipped (default 480 on "
                    "GPU, 50 quick)")
    ap.add_argument("--tokens", type=int, default=16384, help="B*T of the linear grid")
    ap.add_argument("--step-batch", type=int, default=8, help="B of the GPT-2 step (T=1024)")
    ap.add_argument("--fp32-precision", default="high", choices=["highest", "high", "medium"],
                    help="torch.set_float32_matmul_precision for the training step (the probe "
                    "computes in float32; 'high' lets it and the kernels use TF32)")
    ap.add_argument("--skip-large", action="store_true", help="skip the > 2^31-element checks")
    ap.add_argument("--no-tune", action="store_true", help="skip the block-size sweep")
    ap.add_argument("--csv", type=Path, default=None,
                    help="CSV path (default on GPU: benchmarks/kernels_<device>_<date>.csv)")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to update (default on GPU: benchmarks/RESULTS.md)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    args.quick = args.quick or not _CUDA
    if args.time_limit is None:
        args.time_limit = 50.0 if args.quick else 480.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    bench = Bench(args)
    ctx = bench.context
    print(f"adabatch kernels benchmark: {ctx['device']}, torch {ctx['torch']}, triton "
          f"{ctx['triton']}, {ctx['date']}, time limit {args.time_limit:.0f} s", flush=True)
    if not _CUDA:
        print("no CUDA device: smoke check of tiny shapes through the Triton interpreter on the "
              "CPU; timings say nothing about GPU speed", flush=True)
    try:
        from adabatch.kernels import ghost_norms, linear_norms, norm_affine_norms
    except Exception as err:  # noqa: BLE001
        print(f"cannot import the Triton kernels: {err!r}", flush=True)
        return 2
    kernels = (linear_norms, ghost_norms, norm_affine_norms)
    dt = torch.bfloat16

    print("[1/4] correctness", flush=True)
    check_correctness(bench, kernels)
    if _CUDA and not args.quick and not args.skip_large:
        check_large_offsets(bench, kernels)

    print("[2/4] kernels", flush=True)
    if args.quick:
        lin_shapes = [(4, 33, 24, 40)] if not _CUDA else [
            (16, 128, 768, 768), (8, 512, 768, 3072)]
        norm_shapes = [(4, 33, 24)] if not _CUDA else [(16, 128, 768)]
    else:
        lin_shapes = [
            (max(1, args.tokens // T), T, i, o)
            for T in (128, 512, 1024, 2048)
            for i, o in ((768, 768), (768, 3072), (3072, 768))
        ]
        norm_shapes = [(max(1, args.tokens // T), T, 768) for T in (128, 1024, 2048)]
        norm_shapes += [(1, 1024, 768)]
    lin_table = bench_linear(bench, kernels, lin_shapes, dt)
    norm_table = bench_norm_affine(bench, kernels, norm_shapes, dt)

    print("[3/4] training step", flush=True)
    if args.quick and not _CUDA:
        step_cfg = dict(B=2, T=8, vocab=32, d=16, layers=1, heads=2)
    elif args.quick:
        step_cfg = dict(B=4, T=256, vocab=50257, d=768, layers=2, heads=12)
    else:
        step_cfg = dict(B=args.step_batch, T=1024, vocab=50257, d=768, layers=12, heads=12)
    step_table = []
    if bench.ok_to_start("step", 5):
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(args.fp32_precision)
        try:
            step_table = bench_step(bench, kernels, step_cfg)
        finally:
            torch.set_float32_matmul_precision(previous)

    tune_table = []
    if _CUDA and not args.quick and not args.no_tune:
        print("[4/4] block-size sweep (while time is left)", flush=True)
        tune_table = bench_tune(bench, kernels, [(16, 1024, 768, 768), (16, 1024, 768, 3072)], dt)

    elapsed = time.monotonic() - bench.t0
    goals = _goals(lin_table, step_table)
    lin_cols = ["B", "T", "d_in", "d_out", "auto", "gemm", "fused", "fused/gemm",
                "fused_norms", "ghost", "ref_auto", "ref_fused", "vmap"]
    sections = [
        "## kernels: per-example gradient norm kernels",
        "",
        f"- command: `python benchmarks/kernels.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- date: {ctx['date']}; device: {ctx['device']}; torch {ctx['torch']} (CUDA "
        f"{ctx['cuda']}), triton {ctx['triton']}; wall time {elapsed:.0f} s",
        "- timings: median of repeats after warm-up, CUDA events, milliseconds; bf16 inputs",
        "",
        "### Goals",
        "",
        *(f"- {g}" for g in goals or ["(not measured)"]),
        "",
        f"### Linear layers (B*T = {args.tokens}; gemm = cuBLAS g^T x; auto = reference's "
        "choice)",
        "",
        _md_table(lin_table, lin_cols),
        "",
        "### LayerNorm affine norms",
        "",
        _md_table(norm_table, ["B", "T", "d_in", "kernel", "reference"]),
        "",
        f"### Training step ({step_cfg}, bf16 autocast, AdamW, float32 matmul precision "
        f"{args.fp32_precision!r}; overhead vs probe off)",
        "",
        _md_table(step_table, ["variant", "ms", "overhead", "uncovered"]),
    ]
    if tune_table:
        sections += ["", "### Block-size sweep (best per kernel)", "",
                     _md_table(tune_table, ["B", "T", "d_in", "d_out", "kernel", "best ms",
                                            "gemm ms", "options"])]
    if bench.failures or bench.skipped:
        sections += ["", "### Failures and skips", ""]
        sections += [f"- failed: {f}" for f in bench.failures]
        sections += [f"- skipped (time limit): {s}" for s in bench.skipped[:20]]
    body = "\n".join(sections)
    print("\n" + body + "\n", flush=True)

    csv_path = args.csv
    if csv_path is None and not args.quick:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = "".join(c if c.isalnum() else "-" for c in ctx["device"]).strip("-").lower()
        csv_path = HERE / f"kernels_{name}_{stamp}.csv"
    if csv_path is not None:
        write_csv(bench, csv_path)
    results = args.results if args.results is not None else (
        None if args.quick else HERE / "RESULTS.md")
    if results is not None:
        write_results(bench, results, body)
    if args.quick and not _CUDA:
        print("smoke check done (interpreter): "
              + ("no failures" if not bench.failures else f"{len(bench.failures)} failures"))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
