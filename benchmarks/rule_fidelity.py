"""Do the scaling rules keep loss-vs-samples curves intact when the batch grows 4x or 16x?

The claim under test (issue 6): the scaling rules keep the training dynamics intact as the
batch changes. With ``policy="fixed"`` and ``ref_batch_size=B`` the callback applies the rules
for ``kappa = 4`` and ``16`` to runs at ``4B`` and ``16B``; the rules should then make each run's
loss, as a function of samples seen, follow the run at ``B``:

- SGD: lr x kappa (Goyal et al. 2017);
- AdamW: lr x sqrt(kappa), betas -> beta^kappa, eps / sqrt(kappa) (Malladi et al. 2022,
  "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"), decoupled weight decay
  keeping B / (lr wd) fixed (Bergsma et al. 2025);
- weight EMA: decay rho -> rho^kappa, a fixed half-life in samples (Busbridge et al. 2023,
  "How to Scale Your EMA"), through ``adabatch.EMA`` (the loss is then the EMA weights').

Task: least squares (``adabatch.tasks.synthetic``), whose population loss is exact, so each
curve is free of evaluation noise; every example is fresh (no repeats). Each curve is the mean
over seeds of the loss at every multiple of ``16B`` samples. Distance: the mean over the
points after the first 10% of the samples of ``|L_kappa - L_B| / L_B`` ("loss gap"); the same
on the excess loss ``L - L_floor`` (the noise floor ``noise_std^2 / 2``) is stricter and shown
too. "seed noise" is the gap between the B curve and a B curve from other seeds: the resolution
of the measurement.

AdamW investigation: Malladi et al.'s square-root rule is derived for the regime where the
gradient noise dominates the update (B well below the noise scale B_simple, small lr). Far
from the optimum B_simple is ~10 here, so 4B and 16B are past it: the update is nearly
deterministic, Adam's normalised step does not shrink with the noise, and the step that keeps
progress per sample is lr x kappa (the linear rule), not lr x sqrt(kappa). Near the optimum
(B_simple in the hundreds) the square-root rule should hold. The ``regime`` rows run AdamW from
both starts with the square-root, linear and no rule (betas/eps/wd scaled in all ruled runs).

    python benchmarks/rule_fidelity.py --quick    # < 60 s: SGD + AdamW at 4B, 1 seed
    python benchmarks/rule_fidelity.py            # 4B and 16B, +-EMA, regimes, 3 seeds
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from adabatch.control.policy import FixedPolicy  # noqa: E402
from adabatch.control.rules import ScalingRules  # noqa: E402

SECTION = "rule_fidelity"
GOAL_GAP = 0.02  # with rules, the 4B curve within 2% of the B curve


@dataclass(frozen=True)
class Setting:
    optimizer: str  # sgd | adamw
    kappa: int
    rules: str  # "on" (library defaults), "off", or an lr rule name with betas/eps/wd on
    ema: bool = False
    start: str = "far"  # far: w = N(0, 1/dim) ~ 0 (B_simple ~ 10); near: w* + 0.05 N(0, 1)
    ema_decay: float | None = None  # per step at B; None: --ema-decay

    def label(self) -> str:
        ema = ""
        if self.ema:
            ema = " + EMA" if self.ema_decay is None else f" + EMA {self.ema_decay:g}"
        return f"{self.optimizer}{ema}, {self.start} start"


def _cb_kwargs(s: Setting, ref: int) -> dict[str, Any]:
    kw: dict[str, Any] = dict(policy=FixedPolicy(), ref_batch_size=ref, noise="per_example",
                              log_every_n_steps=10**9)
    if s.rules == "off":
        kw.update(rules=ScalingRules(lr="none", betas=False, eps=False, weight_decay=False))
    elif s.rules == "on":
        kw.update(rules=ScalingRules(lr="kappa"))  # the rules of kappa (the default saturates)
    else:
        kw.update(rules=ScalingRules(lr=s.rules))
    return kw


def run_curve(s: Setting, seed: int, args, root: Path, problem_kw: dict) -> list[float]:
    """Population loss after every ``16 B`` samples (mean of nothing: one seed)."""
    from lightning.pytorch import seed_everything

    from adabatch import AdaptiveBatchSize
    from adabatch.tasks.synthetic import LeastSquaresModel, LeastSquaresProblem

    problem = LeastSquaresProblem(**problem_kw)
    batch = args.batch * s.kappa
    seed_everything(seed, verbose=False)
    lr = args.sgd_lr if s.optimizer == "sgd" else args.adamw_lr
    model = common.quiet_module(LeastSquaresModel)(
        dim=problem.dim, noise_std=problem.noise_std, condition=problem.condition, lr=lr,
        optimizer=s.optimizer, weight_decay=args.weight_decay if s.optimizer == "adamw" else 0.0,
        init_scale=1.0)
    if s.start == "near":
        g = torch.Generator().manual_seed(10_000 + seed)
        w = problem.w_star + args.near_offset * torch.randn(problem.dim, generator=g,
                                                            dtype=torch.float64)
        with torch.no_grad():
            model.linear.weight.copy_(w.float().reshape(1, -1))
    g = torch.Generator().manual_seed(20_000 + seed)
    x, y = problem.sample(args.samples, g)
    loader = common.resizable_loader(common.BatchedTensorDataset(x.float(), y.float()), batch,
                                     seed=seed)
    cb = AdaptiveBatchSize(**_cb_kwargs(s, args.batch))
    callbacks: list = [cb]
    ema = None
    if s.ema:
        from adabatch import EMA

        # "without rules" keeps the per-step decay: its reference batch is the run's own.
        ref = args.batch if s.rules != "off" else batch
        ema = EMA(decay=s.ema_decay or args.ema_decay, ref_batch_size=ref)
        callbacks.append(ema)

    def weights(module) -> torch.Tensor:
        avg = getattr(ema, "_average_model", None) if ema is not None else None
        return (avg.module if avg is not None else module).linear.weight

    every = args.batch * 16 // batch  # steps between curve points: every 16 B samples
    progress = common.Progress(lambda m: float(problem.loss(weights(m))), None,
                               schedule=lambda step: step % every == 0,
                               max_samples=args.samples, diverge_factor=1e6)
    callbacks.append(progress)
    common.fast_trainer(callbacks, root).fit(model, train_dataloaders=loader)
    return [loss for step, _, loss in progress.record.evals[1:]]


def gap(curve: list[float], ref: list[float], floor: float, skip_frac: float = 0.1
        ) -> tuple[float, float, float]:
    """Mean relative gap of the loss and of the excess loss after the first ``skip_frac`` of
    the points, and of the loss over the second half (what is left once transients, e.g. an
    EMA's start, have decayed)."""
    n = min(len(curve), len(ref))
    start = max(1, math.ceil(skip_frac * n)) if n > 1 else 0
    pairs = list(zip(curve[start:n], ref[start:n]))
    if not pairs or any(not math.isfinite(c) for c, _ in pairs):
        return math.inf, math.inf, math.inf
    loss = sum(abs(c - r) / r for c, r in pairs) / len(pairs)
    excess = sum(abs(c - r) / max(r - floor, 1e-12) for c, r in pairs) / len(pairs)
    late = list(zip(curve[n // 2:n], ref[n // 2:n]))
    return loss, excess, sum(abs(c - r) / r for c, r in late) / len(late)


def mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SGD and AdamW at 4B, 1 seed (< 60 s)")
    ap.add_argument("--batch", type=int, default=8, help="reference batch B")
    ap.add_argument("--samples", type=int, default=None, help="samples per run")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--noise-std", type=float, default=1.0)
    ap.add_argument("--sgd-lr", type=float, default=0.02)
    ap.add_argument("--adamw-lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW (decoupled)")
    ap.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay per step at B")
    ap.add_argument("--near-offset", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to write to (default benchmarks/RESULTS.md; --quick: none)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.samples is None:
        args.samples = 1024 if args.quick else 4096
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.results is None and not args.quick:
        args.results = common.DEFAULT_RESULTS
    if args.samples % (16 * args.batch):
        ap.error(f"--samples={args.samples} must be a multiple of 16 x --batch={args.batch}")
    return args


def settings(quick: bool) -> tuple[list[tuple[str, Setting]], list[tuple[str, Setting]]]:
    """(main rows, regime rows) as (group, setting) pairs; kappa 1 = the reference."""
    main_rows: list[tuple[str, Setting]] = []
    kappas = (4,) if quick else (4, 16)
    groups = [("sgd", False, None), ("adamw", False, None)]
    if not quick:
        # EMA at the default decay (half-life 552 samples at B = 8) and, to tell the EMA's
        # start-up transient from the rule, a short one (half-life 53 samples)
        groups += [("sgd", True, None), ("adamw", True, None), ("sgd", True, 0.9)]
    for opt, ema, decay in groups:
        for k in kappas:
            for rules in ("on", "off"):
                main_rows.append((f"{opt}{ema}{decay or ''}",
                                  Setting(opt, k, rules, ema, ema_decay=decay)))
    regime: list[tuple[str, Setting]] = []
    if not quick:
        for start in ("far", "near"):
            for rule in ("sqrt", "linear", "off"):
                regime.append((f"adamw-{start}", Setting("adamw", 4, rule, False, start)))
    return main_rows, regime


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    common.quiet_lightning()
    common.set_threads(args.threads)
    load_before = common.load_average()
    t0 = time.perf_counter()
    problem_kw = dict(dim=args.dim, noise_std=args.noise_std, condition=10.0, seed=0)
    floor = 0.5 * args.noise_std**2
    seeds = list(range(args.seeds))
    noise_seeds = list(range(100, 100 + args.seeds))
    main_rows, regime_rows = settings(args.quick)
    cache: dict[tuple, list[float]] = {}

    def curve(s: Setting, seed_list: list[int]) -> list[float]:
        key = (s, tuple(seed_list))
        if key not in cache:
            with tempfile.TemporaryDirectory() as tmp:
                cache[key] = mean_curve([run_curve(s, seed, args, Path(tmp), problem_kw)
                                         for seed in seed_list])
        return cache[key]

    table, results = [], {}
    for group, s in main_rows + regime_rows:
        ref_setting = Setting(s.optimizer, 1, "on", s.ema, s.start, s.ema_decay)
        ref = curve(ref_setting, seeds)
        if (group, "noise") not in results:
            other = curve(ref_setting, noise_seeds)
            results[(group, "noise")] = gap(other, ref, floor)
            table.append([s.label(), "1 (other seeds)", "seed noise",
                          *(f"{100 * v:.2f}%" for v in results[(group, "noise")]),
                          f"{ref[-1]:.4f}"])
        c = curve(s, seeds)
        results[(group, s.kappa, s.rules)] = gap(c, ref, floor)
        rules = {"on": "library rules", "off": "no rules"}.get(s.rules, f"lr rule {s.rules}")
        table.append([s.label(), str(s.kappa), rules,
                      *(f"{100 * v:.2f}%" for v in results[(group, s.kappa, s.rules)]),
                      f"{c[-1]:.4f}"])
        print(" | ".join(table[-1]), flush=True)
    seconds = time.perf_counter() - t0

    goals = []
    for group, label in (("sgdFalse", "SGD"), ("adamwFalse", "AdamW"),
                         ("sgdTrue", "SGD + EMA"), ("adamwTrue", "AdamW + EMA"),
                         ("sgdTrue0.9", "SGD + EMA (decay 0.9)")):
        if (group, 4, "on") not in results:
            continue
        on, off = results[(group, 4, "on")][0], results[(group, 4, "off")][0]
        noise = results[(group, "noise")][0]
        met = on <= GOAL_GAP and on < 0.5 * off
        goals.append(common.goal_line(
            f"{label}: with rules the 4B curve within {GOAL_GAP:.0%} of the B curve (after the "
            "first 10% of samples) and clearly closer than without", met,
            f"gap {100 * on:.2f}% with rules vs {100 * off:.2f}% without; seed noise "
            f"{100 * noise:.2f}%"
            + (f"; at 16B: {100 * results[(group, 16, 'on')][0]:.2f}% vs "
               f"{100 * results[(group, 16, 'off')][0]:.2f}%" if (group, 16, "on") in results
               else "")))
    if ("adamw-near", 4, "sqrt") in results:
        on, off = results[("adamw-near", 4, "sqrt")][1], results[("adamw-near", 4, "off")][1]
        noise = results[("adamw-near", "noise")][1]
        goals.append(common.goal_line(
            "AdamW where the noise dominates (near start, B << B_simple): the sqrt rule keeps "
            "the 4B curve within 2% of the B curve and clearly closer than without",
            results[("adamw-near", 4, "sqrt")][0] <= GOAL_GAP and on < 0.5 * off,
            f"loss gap {100 * results[('adamw-near', 4, 'sqrt')][0]:.2f}% (the floor dilutes "
            f"it); excess-loss gap {100 * on:.2f}% with the sqrt rule vs {100 * off:.2f}% "
            f"without and {100 * results[('adamw-near', 4, 'linear')][1]:.2f}% with the linear "
            f"rule; seed noise {100 * noise:.2f}%"))
    lines = [f"## {SECTION}: loss-vs-samples curves at B, 4B, 16B with and without the rules",
             ""]
    lines += common.context_lines("rule_fidelity.py", argv, load_before)
    lines += [
        f"- wall time: {seconds:.0f} s",
        f"- task: least squares dim={args.dim}, condition 10, noise_std={args.noise_std:g} "
        f"(loss floor {floor:g}), fresh examples; B={args.batch}, {args.samples} samples per run, "
        f"{args.seeds} seed(s) averaged per curve; SGD lr {args.sgd_lr:g} (no momentum), AdamW "
        f"lr {args.adamw_lr:g}, betas (0.9, 0.999), wd {args.weight_decay:g}; EMA decay "
        f"{args.ema_decay:g} per step at B (adabatch.EMA; 'no rules' keeps it per step); "
        "far start w ~ N(0, 1/dim) (B_simple ~ 10 at the start), near start w* + "
        f"{args.near_offset:g} N(0, 1) (B_simple in the hundreds)",
        "- policy='fixed', ref_batch_size=B: the callback applies kappa = 4 or 16. 'library "
        "rules' = lr_rule='auto' (linear for SGD, sqrt for Adam) + betas^kappa + eps/sqrt(kappa) "
        "+ AdamW wd x kappa/lr_factor; 'no rules' = lr_rule='none' and no betas/eps/wd scaling; "
        "'lr rule X' = that lr rule with betas/eps/wd scaled",
        "- gap = mean over curve points after the first 10% of samples of |L_kappa - L_B| / L_B; "
        "excess gap uses L - floor; '2nd half' averages over the last 50% of samples only. The "
        "runs at B and kappa B share their seed: the same initial weights and the same examples "
        "in the same order (a kappa B batch is kappa consecutive B batches), so their gap is "
        "far below the 'seed noise' row (two seed sets)",
        "",
        "### Goals",
        *goals,
        "",
        common.md_table(["setting", "kappa", "rules", "loss gap", "excess-loss gap",
                         "loss gap, 2nd half", "final loss"], table),
    ]
    text = "\n".join(lines)
    common.publish(text, None if args.no_write else args.results, SECTION)
    return {"results": results, "text": text}


if __name__ == "__main__":
    main()
