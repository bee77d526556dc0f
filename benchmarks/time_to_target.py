"""Optimizer steps and samples to a target loss: fixed batch sizes against adaptive ones.

The claim under test (issue 6): batch sizes driven by the measured gradient noise scale
reach a target loss in fewer optimizer steps than any fixed batch size that spends the same
number of samples.

Protocol, per task (synthetic least squares, char-LM, digits):

1. *Calibration seed* (seed 0). Every fixed batch size B of a grid is trained with each of
   three learning rates; its best (fewest steps to target) is kept. Every adaptive setting
   of a grid (policy ``noise`` with several ``c`` / exponents, ``ramp``, ``goodput``, each
   with three learning rates) is trained once. The adaptive setting with the largest step
   saving against the calibration frontier (below) is selected per policy. All settings are
   printed and written to RESULTS.md, selected or not.
2. *Evaluation seeds* (1, 2, 3; new initialisation and data order). Each fixed B at its
   calibrated learning rate and each selected adaptive setting are rerun; medians and
   ranges over these seeds are reported. A quick run (``--quick``) has one seed, which is
   then both calibration and evaluation (flagged).

The fixed-batch *frontier* is the set of (samples, steps) to target of the fixed runs that
no other fixed run beats in both; between its points the steps at a given number of samples
are interpolated linearly in log-log. The *step saving* of an adaptive run is
``1 - steps / frontier(samples)``, computed against the same seed's frontier and summarised by
the median over seeds. An adaptive run that needs fewer samples than any fixed run is compared
with the fixed run that needs the fewest (which spends more samples: conservative for the
adaptive run); one that needs more samples than all with the last frontier point.

Model prediction (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
App. D). Fitting ``S = S_min + E_min / B`` to the fixed runs gives S_min, E_min; at a sample
overhead ``x = E / E_min - 1`` a fixed batch needs ``S_min (1 + 1/x)`` steps and the best
adaptive schedule (B proportional to sqrt(B_noise)) ``S_min (1 + gamma/x)``, with
``gamma = <sqrt(B_noise)>^2 / <B_noise>`` averaged over training progress. Progress is
McCandlish's minimal-step count: one step at batch B counts ``dS_min = B / (B + B_noise)``.
The schedule actually used gets ``P = <B_noise/B> <B> / <B_noise>`` in place of gamma
(``P = 1`` for B = c B_noise: the model predicts no saving for the linear policy; gamma <= P).
B_noise is the measured B_simple (and, on the synthetic task, the exact one). The model assumes
each fixed batch runs at its per-step optimal learning rate (a decaying one as B_noise grows);
the fixed runs here use a constant learning rate, so measured savings can exceed the model's.

Learning rates of the adaptive runs: ``lr_rule="none"`` keeps the learning rate constant while
the batch grows, so the gradient noise per step (the "temperature" lr/B) falls as training
approaches the noise floor: Smith et al. 2018, "Don't Decay the Learning Rate, Increase the
Batch Size". With B = c B_noise this is also what McCandlish et al.'s per-step optimal rate
``eps_max / (1 + B_noise / B)`` prescribes: a constant. A setting with the library's default
rule (``lr_rule="auto"``: linear for SGD, sqrt for Adam, relative to ``ref_batch_size``) is
included on each task for comparison; it keeps lr/B (SGD) fixed, i.e. preserves the dynamics of
the reference batch in samples (see ``rule_fidelity.py``), which saves steps only relative to
that reference batch.

    python benchmarks/time_to_target.py --quick     # < 60 s: synthetic, 1 seed, tiny grids
    python benchmarks/time_to_target.py             # all tasks, 1 + 3 seeds, figures
"""

from __future__ import annotations

import argparse
import math
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (  # noqa: E402
    SAMPLE_TOLERANCE,
    Progress,
    RunRecord,
    fmt,
    frontier_samples,
    frontier_steps,
    median_range,
    pareto,
    predicted_saving,
    trajectory_model,
)

from adabatch.control.policy import GoodputPolicy, NoisePolicy, RampPolicy  # noqa: E402
from adabatch.control.rules import ScalingRules  # noqa: E402

SECTION = "time_to_target"
TASKS = ("synthetic", "charlm", "digits")
GOALS = {"synthetic": 0.25, "charlm": 0.20, "digits": 0.10}
GATE_OFF = 1e9  # max_rel_std so large the policies always act on the estimate


# ============================================================================ settings
@dataclass(frozen=True)
class Adaptive:
    """One adaptive setting: a policy, its knobs and the learning-rate handling."""

    policy: str  # noise | ramp | goodput
    lr_scale: float  # lr = lr_scale * the best fixed lr of the largest batch (lr_rule none)
    c: float = 0.25
    exponent: float = 1.0
    ramp_frac: float = 0.5  # ramp over this fraction of the smallest fixed batch's samples
    lr_rule: str = "none"
    max_rel_std: float | None = 0.5  # a precision gate; GATE_OFF disables it
    confidence: float = 0.0  # z of the noise policy's lower bound (the library's default: 2)


    def label(self) -> str:
        if self.policy == "noise":
            knobs = f"noise c={self.c:g} p={self.exponent:g}"
        elif self.policy == "ramp":
            knobs = f"ramp over {self.ramp_frac:g} N(B_min)"
        else:
            knobs = self.policy
        if self.policy != "ramp" and self.confidence > 0:
            knobs += f" lcb z={self.confidence:g}"
        elif self.policy != "ramp" and self.max_rel_std != 0.5:
            knobs += " gate off" if self.max_rel_std >= GATE_OFF else f" gate {self.max_rel_std:g}"
        if self.lr_rule == "none":
            return f"{knobs}, lr {self.lr_scale:g} x lr*(B_max), const"
        return f"{knobs}, lr rule {self.lr_rule} from B_min"


@dataclass
class Task:
    """A task's data, model, target and grids. ``build`` fills the callables."""

    name: str
    target: float
    target_text: str
    batches: list[int]
    lr_center: Callable[[int], float]  # centre of the 3-point lr sweep at batch B
    lr_factors: tuple[float, ...]
    adaptive: list[Adaptive]
    half_life: float  # estimator half-life in samples
    max_samples: int
    max_steps: int
    schedule: Callable[[int], bool]
    patience: int  # evaluations without a new lowest loss before a run counts as stalled
    make_model: Callable[[float], Any] = None  # type: ignore[assignment]
    make_dataset: Callable[[int], Any] = None  # type: ignore[assignment]
    eval_fn: Callable[[Any], float] = None  # type: ignore[assignment]
    extra_fn: Callable[[Any], dict[str, float]] | None = None
    notes: list[str] = field(default_factory=list)


# How a policy treats the estimate's uncertainty: a precision gate, none, or (the library's
# default) acting on a lower confidence bound.
TRUST = ((0.5, 0.0), (GATE_OFF, 0.0), (None, 2.0))


def _grid(lr_scales, cs_lin, cs_sqrt, ramp_fracs, trust=TRUST) -> list[Adaptive]:
    out = []
    for s in lr_scales:
        for g, z in trust:
            out += [Adaptive("noise", s, c=c, exponent=1.0, max_rel_std=g, confidence=z)
                    for c in cs_lin]
            out += [Adaptive("noise", s, c=c, exponent=0.5, max_rel_std=g, confidence=z)
                    for c in cs_sqrt]
            if z == 0.0:  # goodput has no lower-bound mode
                out.append(Adaptive("goodput", s, max_rel_std=g))
        out += [Adaptive("ramp", s, ramp_frac=f) for f in ramp_fracs]
    return out


def _small_grid() -> list[Adaptive]:
    """The adaptive settings of the (slower) char-LM and digits tasks."""
    out = []
    for s in (0.5, 1.0):
        out += [Adaptive("noise", s, c=1.0), Adaptive("noise", s, c=1.0, max_rel_std=GATE_OFF),
                Adaptive("noise", s, c=2.0, max_rel_std=GATE_OFF),
                Adaptive("noise", s, c=2.0, max_rel_std=None, confidence=2.0),
                Adaptive("noise", s, c=4.0, exponent=0.5, max_rel_std=GATE_OFF),
                Adaptive("goodput", s, max_rel_std=GATE_OFF), Adaptive("ramp", s, ramp_frac=0.5)]
    return out + [Adaptive("noise", 1.0, c=1.0, lr_rule="auto", max_rel_std=GATE_OFF)]


def synthetic_task(quick: bool) -> Task:
    from adabatch.tasks.synthetic import LeastSquaresModel, LeastSquaresProblem

    dim, cond, noise_std = (16, 10.0, 1.0) if quick else (64, 10.0, 1.0)
    excess = 0.2 if quick else 0.05
    problem = LeastSquaresProblem(dim=dim, noise_std=noise_std, condition=cond, seed=0)
    target = 0.5 * noise_std**2 * (1 + excess)
    lam_max = float(problem.spectrum.max())
    if quick:
        batches = [8, 32, 128]
        adaptive = [Adaptive("noise", 0.5, c=0.25), Adaptive("ramp", 0.5, ramp_frac=0.5),
                    Adaptive("goodput", 0.5)]
    else:
        batches = [16, 32, 64, 128, 256, 512, 1024]
        adaptive = _grid((0.25, 0.5, 1.0), (0.25, 0.5, 1.0), (4.0, 8.0, 16.0),
                         (0.25, 0.5, 1.0))
        adaptive.append(Adaptive("noise", 1.0, c=1.0, lr_rule="auto", max_rel_std=GATE_OFF))
    max_samples = 60_000 if quick else 150_000
    task = Task(
        name="synthetic",
        target=target,
        target_text=(f"exact population loss <= {target:.4g} (noise floor {0.5 * noise_std**2:g}"
                     f" + {excess:g} of it), from w = 0"),
        batches=batches,
        # Linear scaling up to the curvature limit ~1/lambda_max; the constant comes from the
        # mean-field recursion of SGD on this problem (optimum lr ~ B / (12.5 dim)).
        lr_center=lambda B: min(B / (12.5 * dim), 1.0 / lam_max),
        lr_factors=(1.0,) if quick else (0.5, 1.0, 2.0),
        adaptive=adaptive,
        half_life=500.0 if quick else 2000.0,
        max_samples=max_samples,
        max_steps=5000,
        schedule=common.every_step,
        patience=400,
        notes=[f"least squares dim={dim}, condition={cond:g}, noise_std={noise_std:g}, "
               f"lambda_max={lam_max:.3g}; SGD (no momentum); fresh examples (a fixed draw of "
               f"{max_samples} per seed, fewer than that used per run); loss evaluated exactly "
               "every step"],
    )
    model_cls = common.quiet_module(LeastSquaresModel)

    def make_model(lr: float):
        return model_cls(dim=dim, noise_std=noise_std, condition=cond, lr=lr, optimizer="sgd",
                         init_scale=0.0)

    def make_dataset(seed: int):
        g = torch.Generator().manual_seed(1000 + seed)
        x, y = problem.sample(max_samples, g)
        return common.BatchedTensorDataset(x.float(), y.float())

    def eval_fn(module) -> float:
        return float(problem.loss(module.linear.weight))

    spectrum = problem.spectrum
    trace_s2 = float(spectrum.square().sum())

    def extra_fn(module) -> dict[str, float]:
        # B_simple = tr(Sigma)/|G|^2 and McCandlish's B_noise = tr(H Sigma)/(G^T H G), H = S:
        # with d = w - w*, G = S d and Sigma = S d d^T S + (d^T S d + s^2) S (docs/DESIGN.md),
        # B_noise = 1 + (d^T S d + s^2) tr(S^2) / (d^T S^3 d).
        w = module.linear.weight.detach().double().reshape(-1)
        d = w - problem.w_star
        quad = float((spectrum * d.square()).sum()) + noise_std**2
        bnoise = 1.0 + quad * trace_s2 / float((spectrum**3 * d.square()).sum())
        return {"exact_gns": float(problem.exact_stats(w)["gns"]), "exact_bnoise": bnoise}

    task.make_model, task.make_dataset = make_model, make_dataset
    task.eval_fn, task.extra_fn = eval_fn, extra_fn
    return task


def charlm_task(quick: bool) -> Task:
    from adabatch.tasks.charlm import CharLM

    context, d_model = 32, 32
    train, val_x, val_y = common.charlm_windows(context)
    target = 2.3
    task = Task(
        name="charlm",
        target=target,
        target_text=f"validation cross-entropy <= {target:g} nats/byte "
                    f"({len(val_x)} windows of {context} bytes)",
        batches=[8, 16, 32, 64, 128],
        # AdamW's usable lr saturates near 5e-3 here: on seed 0 at B >= 32 the smallest lr of a
        # sqrt-scaled sweep was always best, and B >= 32 all needed ~145 steps
        lr_center=lambda B: 4e-3,
        lr_factors=(1.0,) if quick else (0.5, 1.0, 2.0),
        adaptive=_small_grid(),
        half_life=2000.0,
        max_samples=40_000,
        max_steps=3000,
        schedule=common.geometric_schedule(1.05, 20),
        patience=25,
        notes=[f"byte-level transformer d_model={d_model}, 2 layers, 2 heads, context "
               f"{context}, on {len(train)} training windows of stdlib source; AdamW "
               "betas (0.9, 0.99), no weight decay; validation loss at steps 1..20, then "
               "every 5%"],
    )
    model_cls = common.quiet_module(CharLM)

    def make_model(lr: float):
        return model_cls(d_model=d_model, n_layers=2, n_heads=2, context=context, lr=lr,
                         optimizer="adamw", weight_decay=0.0, betas=(0.9, 0.99))

    def eval_fn(module) -> float:
        return float(module.loss((val_x, val_y)))

    task.make_model, task.make_dataset, task.eval_fn = make_model, (lambda seed: train), eval_fn
    return task


def digits_task(quick: bool) -> Task:
    from adabatch.tasks.digits import DigitsCNN, DigitsData

    data = DigitsData(batch_size=8)
    data.setup("fit")
    train = common.BatchedTensorDataset(*data.train_set.tensors)
    val_x, val_y = data.val_set.tensors
    target = 0.15
    task = Task(
        name="digits",
        target=target,
        target_text=f"validation cross-entropy <= {target:g} ({len(val_y)} held-out digits)",
        batches=[8, 16, 32, 64, 128, 256],
        # linear up to 0.1: at 0.2 (momentum 0.9) every batch size stalled on seed 0
        lr_center=lambda B: min(0.05 * B / 32.0, 0.1),
        lr_factors=(1.0,) if quick else (0.5, 1.0, 2.0),
        adaptive=_small_grid(),
        half_life=2000.0,
        max_samples=60_000,
        max_steps=3000,
        schedule=common.geometric_schedule(1.05, 20),
        patience=25,
        notes=[f"CNN channels (8, 16), hidden 32 on {len(train)} scikit-learn digits; SGD "
               "momentum 0.9; validation loss at steps 1..20, then every 5%"],
    )
    model_cls = common.quiet_module(DigitsCNN)

    def make_model(lr: float):
        return model_cls(channels=(8, 16), hidden=32, lr=lr, optimizer="sgd", momentum=0.9)

    def eval_fn(module) -> float:
        return float(module.loss((val_x, val_y)))

    task.make_model, task.make_dataset, task.eval_fn = make_model, (lambda seed: train), eval_fn
    return task


BUILDERS = {"synthetic": synthetic_task, "charlm": charlm_task, "digits": digits_task}


# ============================================================================ running
@dataclass
class Result:
    kind: str  # fixed | adaptive
    label: str
    seed: int
    batch: int | None
    lr: float
    record: RunRecord
    setting: Adaptive | None = None

    @property
    def steps(self) -> float:
        """Steps to target; ``inf`` when the run did not reach it."""
        return self.record.steps_to_target if self.record.reached else math.inf

    @property
    def samples(self) -> float:
        return self.record.samples_to_target if self.record.reached else math.inf


def run_one(task: Task, seed: int, lr: float, batch: int, root: Path,
            adaptive: dict[str, Any] | None = None) -> RunRecord:
    """Train once (fixed batch if ``adaptive`` is None) until target / budget / divergence."""
    from lightning.pytorch import seed_everything

    from adabatch import AdaptiveBatchSize

    seed_everything(seed, verbose=False)
    model = task.make_model(lr)
    loader = common.resizable_loader(task.make_dataset(seed), batch, seed=seed)
    callbacks: list = []
    cb = None
    if adaptive is not None:
        cb = AdaptiveBatchSize(noise="per_example", resize="sampler",
                               half_life_samples=task.half_life,
                               log_every_n_steps=10**9, **adaptive)
        callbacks.append(cb)
    progress = Progress(task.eval_fn, task.target, task.schedule, max_samples=task.max_samples,
                        max_steps=task.max_steps, adabatch=cb, extra_fn=task.extra_fn,
                        patience=task.patience)
    callbacks.append(progress)
    trainer = common.fast_trainer(callbacks, root)
    trainer.fit(model, train_dataloaders=loader)
    return progress.record


def adaptive_kwargs(a: Adaptive, b_min: int, b_max: int, lr_big: float, lr_small: float,
                    n_small: float, adam: bool) -> tuple[float, dict[str, Any]]:
    """(model lr, AdaptiveBatchSize kwargs) of a setting.

    The policies keep this benchmark's original discipline (decreases allowed, no loss
    guard); a precision gate (``max_rel_std``) is no longer a library option and is ignored.
    """
    discipline = dict(never_decrease=False, spike_factor=None)
    if a.policy == "noise":
        policy: Any = NoisePolicy(scale=a.c, exponent=a.exponent, confidence=a.confidence,
                                  **discipline)
    elif a.policy == "ramp":
        policy = RampPolicy(ramp_samples=max(1, int(a.ramp_frac * n_small)), **discipline)
    else:
        policy = GoodputPolicy(confidence=a.confidence, **discipline)
    kw: dict[str, Any] = dict(policy=policy, min_batch_size=b_min, max_batch_size=b_max,
                              ref_batch_size=b_min,
                              rules=ScalingRules(lr="kappa" if a.lr_rule == "auto" else a.lr_rule))
    if a.lr_rule == "none":
        return a.lr_scale * lr_big, kw
    # The library's rule from B_min at the lr tuned there; the batch is capped where the
    # scaled lr would pass the best lr of the largest fixed batch (beyond it SGD diverges).
    kappa_max = max(1.0, lr_big / lr_small) ** (2 if adam else 1)
    kw["max_batch_size"] = max(b_min, min(b_max, int(b_min * kappa_max) // b_min * b_min))
    return lr_small, kw


# ============================================================================ analysis
def fit_mccandlish(fixed: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares fit (relative errors) of ``S = S_min + E_min / B`` to (B, steps)."""
    rows = [(b, s) for b, s in fixed if math.isfinite(s) and s > 0]
    if len(rows) < 2:
        return math.nan, math.nan
    a = torch.tensor([[1.0 / s, 1.0 / (b * s)] for b, s in rows], dtype=torch.float64)
    y = torch.ones(len(rows), dtype=torch.float64)
    sol = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
    return float(sol[0]), float(sol[1])


# ============================================================================ per task
def saving(res: Result, front: list[tuple[float, float]]) -> float:
    """Step saving of one run against a frontier; ``-inf`` when it did not reach the target."""
    if not res.record.reached:
        return -math.inf
    return 1.0 - res.steps / frontier_steps(front, res.samples)


def collect(task: Task, calib_seed: int, eval_seeds: list[int], root: Path,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Run the calibration and evaluation protocol; the raw results (picklable)."""
    t_task = time.perf_counter()
    results: list[Result] = []

    def fixed(seed: int, batch: int, lr: float) -> Result:
        rec = run_one(task, seed, lr, batch, root)
        res = Result("fixed", f"fixed B={batch}", seed, batch, lr, rec)
        results.append(res)
        log(f"  [{task.name} s{seed}] fixed B={batch:<5d} lr={lr:<8.3g} "
            + _outcome(rec))
        return res

    # 1. calibration: fixed grid x lrs
    best_lr: dict[int, float] = {}
    calib_fixed: dict[int, Result] = {}
    for batch in task.batches:
        center = task.lr_center(batch)
        tried = [fixed(calib_seed, batch, center * f) for f in task.lr_factors]
        ok = [r for r in tried if r.record.reached]
        best = min(ok, key=lambda r: r.steps) if ok else tried[len(tried) // 2]
        best_lr[batch], calib_fixed[batch] = best.lr, best
    b_min, b_max = task.batches[0], task.batches[-1]
    lr_big, lr_small = best_lr[b_max], best_lr[b_min]
    n_small = calib_fixed[b_min].samples
    if not math.isfinite(n_small):
        n_small = task.max_samples / 4
    front_cal = pareto([(r.samples, r.steps) for r in calib_fixed.values()])

    # 2. calibration: adaptive grid
    is_adam = task.name == "charlm"
    calib_adaptive: list[Result] = []
    for a in task.adaptive:
        lr, kw = adaptive_kwargs(a, b_min, b_max, lr_big, lr_small, n_small, is_adam)
        rec = run_one(task, calib_seed, lr, b_min, root, adaptive=kw)
        res = Result("adaptive", a.label(), calib_seed, None, lr, rec, setting=a)
        calib_adaptive.append(res)
        results.append(res)
        log(f"  [{task.name} s{calib_seed}] {a.label():<52s} " + _outcome(rec))

    selected: dict[str, Result] = {}
    for res in calib_adaptive:
        s = saving(res, front_cal)
        if not math.isfinite(s):
            continue
        cur = selected.get(res.setting.policy)
        if cur is None or s > saving(cur, front_cal):
            selected[res.setting.policy] = res

    # 3. evaluation seeds
    same = eval_seeds == [calib_seed]
    eval_fixed: dict[int, dict[int, Result]] = {}
    eval_adaptive: dict[str, dict[int, Result]] = {}
    for seed in eval_seeds:
        for batch in task.batches:
            eval_fixed.setdefault(batch, {})[seed] = (
                calib_fixed[batch] if same else fixed(seed, batch, best_lr[batch]))
        for policy, chosen in selected.items():
            if same:
                eval_adaptive.setdefault(policy, {})[seed] = chosen
                continue
            a = chosen.setting
            lr, kw = adaptive_kwargs(a, b_min, b_max, lr_big, lr_small, n_small, is_adam)
            rec = run_one(task, seed, lr, b_min, root, adaptive=kw)
            res = Result("adaptive", a.label(), seed, None, lr, rec, setting=a)
            results.append(res)
            eval_adaptive.setdefault(policy, {})[seed] = res
            log(f"  [{task.name} s{seed}] {a.label():<52s} " + _outcome(rec))

    return dict(results=results, calib_fixed=calib_fixed, best_lr=best_lr,
                calib_adaptive=calib_adaptive, selected=selected, eval_fixed=eval_fixed,
                eval_adaptive=eval_adaptive, same=same, lr_big=lr_big, lr_small=lr_small,
                n_small=n_small, seconds=time.perf_counter() - t_task, calib_seed=calib_seed,
                eval_seeds=eval_seeds)


GNS_POLICIES = ("noise", "goodput")  # driven by the measured noise scale; ramp is a schedule


def analyze(task: Task, raw: dict[str, Any]) -> dict[str, Any]:
    """Frontiers, savings, model predictions and table rows from `collect`'s output."""
    results, calib_fixed, best_lr = raw["results"], raw["calib_fixed"], raw["best_lr"]
    calib_adaptive, selected = raw["calib_adaptive"], raw["selected"]
    eval_fixed, eval_adaptive = raw["eval_fixed"], raw["eval_adaptive"]
    calib_seed, eval_seeds = raw["calib_seed"], raw["eval_seeds"]
    front_cal = pareto([(r.samples, r.steps) for r in calib_fixed.values()])
    # the frontier of the per-B medians over the evaluation seeds (a run that did not reach
    # the target counts as infinitely long) and, for the spread, each seed's own frontier
    fronts = {seed: pareto([(eval_fixed[b][seed].samples, eval_fixed[b][seed].steps)
                            for b in task.batches]) for seed in eval_seeds}
    fixed_rows, med_fixed = [], []
    for b in task.batches:
        runs = list(eval_fixed[b].values())
        st = [r.steps for r in runs]
        sa = [r.samples for r in runs]
        wt = [r.record.wall_to_target if r.record.reached else math.inf for r in runs]
        med_fixed.append((b, statistics.median(st), statistics.median(sa)))
        fixed_rows.append([b, fmt(best_lr[b], ".3g"), _mr(st), _mr(sa), _mr(wt, ".2f"),
                           f"{sum(r.record.reached for r in runs)}/{len(runs)}"])
    front_med = pareto([(e, s) for _, s, e in med_fixed])
    s_min, e_min = fit_mccandlish([(b, s) for b, s, _ in med_fixed])
    policy_rows, model_rows, policy_summary = [], [], {}
    for policy, by_seed in eval_adaptive.items():
        runs = list(by_seed.values())
        steps = statistics.median([r.steps for r in runs])
        samples = statistics.median([r.samples for r in runs])
        reached = math.isfinite(steps) and math.isfinite(samples)
        f_steps = frontier_steps(front_med, samples)
        med_saving = 1.0 - steps / f_steps if reached else -math.inf
        f_samples = frontier_samples(front_med, steps)
        sample_saving = 1.0 - samples / f_samples if reached else -math.inf
        dominated = [f"B={b}" for b, s, e in med_fixed if reached and e <= samples and s <= steps]
        per_seed = [saving(r, fronts[r.seed]) for r in runs]
        models = [trajectory_model(r.record) for r in runs]
        pred_gamma = [predicted_saving(m["gamma"], r.samples, e_min)
                      for m, r in zip(models, runs)]
        pred_p = [predicted_saving(m["P"], r.samples, e_min) for m, r in zip(models, runs)]
        policy_summary[policy] = {"label": runs[0].label, "saving": med_saving,
                                  "savings": per_seed,
                                  "seed_median": statistics.median(per_seed),
                                  "runs": runs, "dominated": dominated,
                                  "sample_saving": sample_saving, "steps": steps,
                                  "samples": samples, "frontier": f_steps}
        policy_rows.append([
            policy, runs[0].label, _mr([r.steps for r in runs]), _mr([r.samples for r in runs]),
            fmt(f_steps, ".4g"),
            fmt(100 * med_saving, ".1f") + "%",
            _per_seed(per_seed),
            fmt(100 * sample_saving, ".1f") + "%",
            ", ".join(dominated) or "none",
            _mr([r.record.wall_to_target if r.record.reached else math.inf for r in runs],
                ".2f"),
            f"{sum(r.record.reached for r in runs)}/{len(runs)}",
        ])
        row = [policy,
               median_range([m["first"] for m in models], ".3g") + " -> "
               + median_range([m["last"] for m in models], ".3g"),
               median_range([m["gamma"] for m in models], ".2f"),
               median_range([m["P"] for m in models], ".2f"),
               _pct_or_why(pred_gamma, [r.samples for r in runs], e_min),
               _pct_or_why(pred_p, [r.samples for r in runs], e_min),
               fmt(100 * med_saving, ".1f") + "%"]
        if task.extra_fn is not None:
            exact = [trajectory_model(r.record, "exact_bnoise") for r in runs]
            simple = [trajectory_model(r.record, "exact_gns") for r in runs]
            row[1:1] = [median_range([m["first"] for m in simple], ".3g") + " -> "
                        + median_range([m["last"] for m in simple], ".3g")]
            row.insert(4, median_range([m["gamma"] for m in exact], ".2f"))
            pe = [predicted_saving(m["gamma"], r.samples, e_min) for m, r in zip(exact, runs)]
            row.insert(7, _pct_or_why(pe, [r.samples for r in runs], e_min))
        model_rows.append(row)
    calib_rows = []
    for res in calib_adaptive:
        mark = " (selected)" if selected.get(res.setting.policy) is res else ""
        calib_rows.append([res.label + mark, fmt(res.lr, ".3g"),
                           fmt(res.steps, ".4g") if res.record.reached else _why(res.record),
                           fmt(res.samples, ".4g"),
                           fmt(frontier_steps(front_cal, res.samples), ".4g"),
                           fmt(100 * saving(res, front_cal), ".1f") + "%"
                           if res.record.reached else "n/a",
                           f"{max(res.record.batch) if res.record.batch else 0}"])
    calib_fixed_rows = []
    for r in results:
        if r.kind == "fixed" and r.seed == calib_seed:
            calib_fixed_rows.append([r.batch, fmt(r.lr, ".3g"),
                                     fmt(r.steps, ".4g") if r.record.reached
                                     else _why(r.record), fmt(r.samples, ".4g"),
                                     "yes" if best_lr[r.batch] == r.lr else ""])
    gns_driven = [p for p in policy_summary if p in GNS_POLICIES]
    best_policy = max(gns_driven, key=lambda p: policy_summary[p]["saving"], default=None)
    return dict(task=task, results=results, fixed_rows=fixed_rows, policy_rows=policy_rows,
                model_rows=model_rows, calib_rows=calib_rows,
                calib_fixed_rows=calib_fixed_rows, policy_summary=policy_summary,
                best_policy=best_policy, s_min=s_min, e_min=e_min, fronts=fronts,
                front_med=front_med, med_fixed=med_fixed, eval_fixed=eval_fixed,
                eval_adaptive=eval_adaptive, same_seed=raw["same"], seconds=raw["seconds"],
                lr_big=raw["lr_big"], lr_small=raw["lr_small"], n_small=raw["n_small"])


def _mr(values: list[float], spec: str = ".4g") -> str:
    """``median [min, max]`` over all runs, a run that missed the target counting as inf."""
    def one(v: float) -> str:
        return format(v, spec) if math.isfinite(v) else "inf"

    if len(values) == 1:
        return one(values[0])
    return f"{one(statistics.median(values))} [{one(min(values))}, {one(max(values))}]"


def _per_seed(values: list[float]) -> str:
    """``median [min, max]`` in percent; a seed that did not reach the target is '-inf'."""
    def one(v: float) -> str:
        return f"{100 * v:.1f}" if math.isfinite(v) else "-inf"

    if len(values) == 1:
        return one(values[0]) + "%"
    return f"{one(statistics.median(values))} [{one(min(values))}, {one(max(values))}]%"


def _pct_or_why(values: list[float], samples: list[float], e_min: float) -> str:
    if any(math.isfinite(v) for v in values):
        return median_range([100 * v for v in values], ".1f") + "%"
    if math.isfinite(e_min) and any(math.isfinite(e) and e <= e_min for e in samples):
        return "n/a (E <= E_min)"
    return "n/a"


def _outcome(rec: RunRecord) -> str:
    if rec.reached:
        return (f"steps {rec.steps_to_target:8.1f} samples {rec.samples_to_target:9.0f} "
                f"wall {rec.wall_to_target:6.2f}s B_end {rec.batch[-1] if rec.batch else 0}")
    return f"{_why(rec)} after {rec.steps} steps, {rec.samples} samples"


def _why(rec: RunRecord) -> str:
    return "diverged/stalled" if rec.diverged else "not reached"


# ============================================================================ output
def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task: Task = out["task"]
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    seeds = sorted(out["fronts"])
    for b in task.batches:
        runs = [out["eval_fixed"][b][s] for s in seeds if out["eval_fixed"][b][s].record.reached]
        if not runs:
            continue
        sa = [r.samples for r in runs]
        st = [r.steps for r in runs]
        x, y = statistics.median(sa), statistics.median(st)
        ax.errorbar(x, y, xerr=[[x - min(sa)], [max(sa) - x]], yerr=[[y - min(st)], [max(st) - y]],
                    fmt="o", color="0.35", ms=5, capsize=2, zorder=3)
        ax.annotate(f"B={b}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    med = out["front_med"]
    if med:
        ax.plot([e for e, _ in med], [s for _, s in med], "-", color="0.35",
                label="fixed-batch frontier (median)")
    if math.isfinite(out["s_min"]) and math.isfinite(out["e_min"]) and out["e_min"] > 0:
        lo = out["e_min"] * 1.05
        hi = max(e for _, _, e in out["med_fixed"] if math.isfinite(e)) * 1.5
        es = [lo * (hi / lo) ** (i / 99) for i in range(100)]
        ax.plot(es, [out["s_min"] * (1 + 1 / (e / out["e_min"] - 1)) for e in es], ":",
                color="0.6", label=f"fit (S/{out['s_min']:.3g}-1)(E/{out['e_min']:.3g}-1)=1")
    markers = {"noise": ("*", "tab:red"), "goodput": ("D", "tab:blue"), "ramp": ("s", "tab:green")}
    for policy, summ in out["policy_summary"].items():
        runs = [r for r in summ["runs"] if r.record.reached]
        if not runs:
            continue
        sa = [r.samples for r in runs]
        st = [r.steps for r in runs]
        x, y = statistics.median(sa), statistics.median(st)
        m, c = markers.get(policy, ("^", "k"))
        ax.errorbar(x, y, xerr=[[x - min(sa)], [max(sa) - x]], yerr=[[y - min(st)], [max(st) - y]],
                    fmt=m, color=c, ms=10 if m == "*" else 7, capsize=2, zorder=4,
                    label=f"{summ['label']} (step saving {100 * summ['saving']:.0f}%)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples to target")
    ax.set_ylabel("optimizer steps to target")
    ax.set_title(f"{task.name}: {task.target_text}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(outs: list[dict[str, Any]], args, argv, load_before: str, seconds: float,
           figures: dict[str, Path]) -> str:
    lines = [f"## {SECTION}: steps and samples to a target loss, fixed vs adaptive batch", ""]
    lines += common.context_lines("time_to_target.py", argv, load_before)
    lines.append(f"- wall time of the benchmark: {seconds:.0f} s")
    same = bool(outs) and outs[0]["same_seed"]
    seeds_text = (f"one seed ({args.calib_seed}): calibration and evaluation on the same seed "
                  "(quick mode: optimistic for every tuned setting)" if same else
                  f"calibration seed {args.calib_seed}; evaluation seeds {args.eval_seeds}")
    lines.append(
        f"- protocol: {seeds_text}. Fixed batches: best of "
        f"{len(outs[0]['task'].lr_factors) if outs else 0} learning rates on the calibration "
        "seed. Adaptive: every setting listed below run on the calibration seed; per policy the "
        "one with the largest step saving is rerun on the evaluation seeds. Per-example probe "
        "(b = 1), resize='sampler', min batch = smallest fixed batch, max batch = largest")
    lines.append(
        "- step saving = 1 - steps / frontier steps, at the adaptive run's samples plus "
        f"{SAMPLE_TOLERANCE:.0%} (the frontier is nearly vertical where all small batches need "
        "about the same samples; the tolerance keeps seed noise in sample counts from becoming "
        "'savings'; below the fewest samples of any fixed run, that run's samples plus the "
        "tolerance are used). Frontier: Pareto set of the per-B medians over the evaluation "
        "seeds, log-log interpolation; 'per seed' compares each seed with its own frontier. "
        "'sample saving' is the converse: samples saved at equal steps. 'dominated by' lists "
        "fixed batches that needed no more steps and no more samples (medians)")
    lines.append(
        "- model (McCandlish et al. 2018, App. D): at the run's sample overhead "
        "x = E/E_min - 1 (S_min, E_min fitted to the fixed runs: S = S_min + E_min/B) a fixed "
        "batch needs S_min(1 + 1/x) steps, the best adaptive schedule (B ~ sqrt(B_noise)) "
        "S_min(1 + gamma/x), gamma = <sqrt B_noise>^2/<B_noise>, and the schedule actually used "
        "S_min(1 + P/x), P = <B_noise/B><B>/<B_noise> (P = 1 for B = c B_noise: no saving). "
        "Averages over training progress, one step weighted by B/(B + B_noise). Measured "
        "B_simple lags the truth (EMA over a falling |G|^2), so on the synthetic task the exact "
        "values are shown too. The model's fixed batches run at their per-step optimal lr (it "
        "decays as B_noise grows); the fixed runs here use a constant lr")
    lines += ["", "### Goals", "",
              "Judged on the policies driven by the measured noise scale (noise, goodput): met "
              "when the step saving of the medians and the median of the per-seed savings both "
              "reach the goal. The sample-based ramp is a schedule, shown for reference.", ""]
    for out in outs:
        task: Task = out["task"]
        goal = GOALS[task.name]
        text = (f"{task.name}: adaptive needs >= {goal:.0%} fewer steps than the fixed frontier "
                "at equal samples")
        best = out["best_policy"]
        if best is None:
            lines.append(common.goal_line(text, False, "no noise-driven policy reached the "
                                                       "target on the calibration seed"))
            continue
        summ = out["policy_summary"][best]
        s, s_seed = summ["saving"], summ["seed_median"]
        dom = (f"; dominated by fixed {', '.join(summ['dominated'])}" if summ["dominated"]
               else "; not dominated by any fixed batch")
        others = "; ".join(f"{p} {fmt(100 * o['saving'], '.1f', '-inf')}%"
                           for p, o in out["policy_summary"].items() if p != best)
        lines.append(common.goal_line(
            text, bool(s >= goal and s_seed >= goal),
            f"best noise-driven policy '{summ['label']}': {fmt(summ['steps'], '.4g')} steps / "
            f"{fmt(summ['samples'], '.4g')} samples vs frontier {fmt(summ['frontier'], '.4g')} "
            f"steps: saving {fmt(100 * s, '.1f', '-inf')}% (per seed "
            f"{', '.join(fmt(100 * v, '.1f', '-inf') + '%' for v in summ['savings'])}); "
            f"samples saved at equal steps {fmt(100 * summ['sample_saving'], '.1f', '-inf')}%"
            f"{dom}; other policies: {others or 'none'}"))
    for out in outs:
        task = out["task"]
        lines += ["", f"### {task.name}", ""]
        lines += [f"- target: {task.target_text}"] + [f"- {n}" for n in task.notes]
        lines.append(f"- estimator half-life {task.half_life:g} samples; fixed-batch lr sweep "
                     f"centre(B) x {list(task.lr_factors)}; adaptive lr scales are relative to "
                     f"the best lr of B={task.batches[-1]} ({out['lr_big']:.3g}); lr rule 'auto' "
                     f"starts from the best lr of B={task.batches[0]} ({out['lr_small']:.3g}) "
                     "and caps the batch where the scaled lr reaches the former; 'gate off' sets "
                     f"max_rel_std={GATE_OFF:g}, no label means the gate max_rel_std=0.5, "
                     "'lcb z=2' acts on B_simple / (1 + 2 rel_std) with no gate (the library's "
                     "default)")
        lines.append(f"- McCandlish fit to the fixed runs: S_min = {fmt(out['s_min'], '.4g')} "
                     f"steps, E_min = {fmt(out['e_min'], '.4g')} samples; task time "
                     f"{out['seconds']:.0f} s")
        if task.name in figures:
            lines.append(f"- figure: `{_rel(figures[task.name])}`")
        lines += ["", "Fixed batch sizes (evaluation seeds, best calibrated lr; median [min, "
                  "max]):", ""]
        lines.append(common.md_table(
            ["B", "lr", "steps", "samples", "wall s (train only)", "reached"], out["fixed_rows"]))
        lines += ["", "Adaptive policies (selected setting, evaluation seeds):", ""]
        lines.append(common.md_table(
            ["policy", "setting", "steps", "samples", "frontier steps at those samples",
             "step saving (medians)", "step saving per seed", "sample saving at equal steps",
             "dominated by", "wall s", "reached"], out["policy_rows"]))
        lines += ["", "Measured against predicted (evaluation seeds):", ""]
        if task.extra_fn is not None:
            head = ["policy", "exact B_simple start -> end", "measured B_simple start -> end",
                    "gamma (measured)", "gamma (exact B_noise)", "P (measured)",
                    "predicted saving, optimal (measured)", "predicted, optimal (exact)",
                    "predicted, this schedule", "measured saving"]
        else:
            head = ["policy", "measured B_simple start -> end", "gamma", "P",
                    "predicted saving, optimal", "predicted, this schedule", "measured saving"]
        lines.append(common.md_table(head, out["model_rows"]))
        lines += ["", f"All adaptive settings tried (calibration seed {args.calib_seed}, against "
                  "its own frontier):", ""]
        lines.append(common.md_table(
            ["setting", "lr", "steps", "samples", "frontier steps", "step saving", "max B"],
            out["calib_rows"]))
        lines += ["", f"Fixed-batch learning-rate sweep (calibration seed {args.calib_seed}):",
                  ""]
        lines.append(common.md_table(["B", "lr", "steps", "samples", "best"],
                                     out["calib_fixed_rows"]))
    return "\n".join(lines)


_rel = common.rel_path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="synthetic task only, tiny grids, one seed (< 60 s)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to write the section to (default: benchmarks/RESULTS.md; "
                         "with --quick: none unless given)")
    ap.add_argument("--figures", type=Path, default=None,
                    help="directory for PNGs (default: benchmarks/figures; --quick: none)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--raw-out", type=Path, default=None,
                    help="pickle the raw run records here (to re-analyse with --from-raw)")
    ap.add_argument("--from-raw", type=Path, default=None,
                    help="skip training: analyse the records pickled by --raw-out")
    args = ap.parse_args(argv)
    if args.tasks is None:
        args.tasks = ["synthetic"] if args.quick else list(TASKS)
    if args.eval_seeds is None:
        args.eval_seeds = [args.calib_seed] if args.quick else [1, 2, 3]
    if args.results is None and not args.quick:
        args.results = common.DEFAULT_RESULTS
    if args.figures is None and not args.quick:
        args.figures = common.FIGURES_DIR
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse(argv)
    common.quiet_lightning()
    common.set_threads(args.threads)
    load_before = common.load_average()
    t0 = time.perf_counter()
    raws: dict[str, Any] = {}
    if args.from_raw is not None:
        with open(args.from_raw, "rb") as f:
            saved = pickle.load(f)
        raws, seconds, load_before = saved["raws"], saved["seconds"], saved["load_before"]
        argv = saved["argv"]  # the command that trained, for the record
        args.tasks = [t for t in args.tasks if t in raws]
    tasks = {name: BUILDERS[name](args.quick) for name in args.tasks}
    if args.from_raw is None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, task in tasks.items():
                print(f"== {name}: target {task.target_text}", flush=True)
                raws[name] = collect(task, args.calib_seed, args.eval_seeds, Path(tmp),
                                     lambda s: print(s, flush=True))
        seconds = time.perf_counter() - t0
        if args.raw_out is not None:
            with open(args.raw_out, "wb") as f:
                pickle.dump({"raws": raws, "seconds": seconds, "load_before": load_before,
                             "argv": list(sys.argv[1:] if argv is None else argv)}, f)
    outs = [analyze(task, raws[name]) for name, task in tasks.items()]
    figures: dict[str, Path] = {}
    if args.figures is not None:
        for out in outs:
            path = Path(args.figures) / f"time_to_target_{out['task'].name}.png"
            plot(out, path)
            figures[out["task"].name] = path
    text = render(outs, args, argv, load_before, seconds, figures)
    common.publish(text, None if args.no_write else args.results, SECTION)
    return outs


if __name__ == "__main__":
    main()
