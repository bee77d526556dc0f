"""Fixed against adaptive batch sizes at an equal data budget (issue 9, item 5).

The protocol of the large-batch papers (Shallue et al. 2019, McCandlish et al. 2018, Merrill
et al. 2025): every run of a task spends the same number of samples N and follows the same
learning-rate schedule *in samples* (linear warm-up over ``WARMUP`` of N, cosine decay to 0 at
N; `adabatch.control.schedules.warmup_cosine` through `sample_lambda_lr`). What is compared is
(optimizer steps, final loss): a larger batch takes fewer steps for the same data, and a
batch-size schedule pays only if it reaches a loss no fixed batch reaches in as few steps.

Per task:

1. *Fixed batches* ``B0, 2 B0, ...``, each with its own learning rate: a 3-point grid (x0.5,
   x1, x2 around a per-task centre) on the tuning seed, extended by one more factor of 2 while
   the best is at an edge (twice at most); then the evaluation seeds at the best.
2. *Control*: the same fixed batches and learning rates with `AdaptiveBatchSize` attached as a
   monitor (fixed policy, ``ref_batch_size=B0``, no learning-rate rule), so the Adam betas /
   eps / weight-decay transforms of kappa = B/B0 apply exactly as in an adaptive run. Only
   where a transform exists (Adam-family optimizers); with SGD (no momentum rule) the control
   is the fixed run itself. It also measures B_simple along fixed runs.
3. *Adaptive*: the library default, and as variants `SeesawPolicy`, a sqrt-law noise policy
   and a doubling ramp, from B0 with B0's tuned learning rate, ``ref_batch_size=B0``,
   ``max_batch_size`` = the largest fixed batch, the library's default scaling rules; on the
   evaluation seeds. ``default_tuned`` is the default with its own lr grid around B0's (as a
   fixed batch's, on the tuning seed): whether the lr inherited from B0 holds it back.

Tasks: least squares (``synthetic``; ``noisefloor``, run to its noise floor), the digits CNN
(``digits``: validation loss; ``digits_long``: 4x the samples, loss on the training set), the
char-LM (``charlm``; ``charlm_long``, 8/3 the samples), a causal-CNN byte LM with SGD on the
same text (``charcnn``) and a teacher-student MLP on fresh data (``teacher``). More evaluation
seeds than a cache holds are added at its tuned lrs.

Reported per task: the fixed frontier (B, lr, final loss median [min, max], steps); for each
adaptive variant its steps and loss, the step saving against the best-loss fixed batch when
its loss is equal or better (seed ranges overlap or lie below), the step saving against the
cheapest fixed batch of equal or better loss, whether it is *dominated* (a fixed batch with a
lower loss beyond the seed spread, i.e. its whole seed range below the variant's, in no more
steps), the model's predicted saving (McCandlish et al. 2018 App. D, from the measured
B_simple trajectory: ``gamma = <sqrt B_noise>^2/<B_noise>`` over training progress, trade-off
``(S/S_min - 1)(E/E_min - 1) = gamma`` at ``E = N``, ``E_min`` from the same trajectory), the
noise scale's growth (last / first tenth), wall-clock per run and the critical-batch probe's
logged cost (``adabatch/probe_overhead``, when the callback logs it).

    python benchmarks/equal_budget.py --quick                 # seconds: one tiny task
    python benchmarks/equal_budget.py --jobs 2                # all tasks, figures, RESULTS.md
    python benchmarks/equal_budget.py --reuse-fixed           # rerun the adaptive runs only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from adabatch.control.policy import Policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Progress, fmt, median_range, predicted_saving, trajectory_model  # noqa: E402

SECTION = "equal_budget"
TASKS = ("synthetic", "noisefloor", "digits", "digits_long", "charlm", "charlm_long", "teacher",
         "charcnn")
WARMUP = 0.05  # warm-up fraction of the sample budget
DATA_DIR = common.BENCH_DIR / "data"
# the tasks built as high-growth candidates: their goals are always reported; those of any
# other task too when its measured noise scale grows >= GROWTH_GOAL x (the precondition)
HIGH_GROWTH = ("noisefloor", "charlm_long", "teacher")
GROWTH_GOAL = 100.0
SAVING_GOAL = 0.30
PREDICTED_FRACTION_GOAL = 0.8
VARIANTS = ("default", "default_tuned", "seesaw", "seesaw_uncapped", "seesaw_adam_plain",
            "default_lr_fixed", "sqrt", "ramp")
# run unless --variants says otherwise; the others are diagnostics, run by name: SeesawPolicy's
# cap, Adam's betas/eps transforms, and the default policy without an lr rule
DEFAULT_VARIANTS = ("default", "default_tuned", "seesaw", "sqrt", "ramp")
CONST_BUDGET = 4  # the constant-lr check runs until its target or this many budgets
CONST_EXCESS = 0.2  # its target: the noise floor plus this fraction (least-squares tasks)


# ============================================================================ API adapter
class DoublingRamp(Policy):
    """A hand-written schedule: the batch doubles from the bottom of the bounds to the top in
    equal sample intervals (``n + 1`` sizes ``lo, 2 lo, ..., lo 2^n = hi``, each for
    ``budget / (n + 1)`` samples); the noise scale is ignored."""

    def __init__(self, budget: int, **discipline: Any) -> None:
        super().__init__(hysteresis=0.0, **discipline)
        self.budget = budget

    def target(self, obs: Any) -> float:
        lo, hi = self.bounds.lo, self.bounds.hi
        n = max(0, round(math.log2(hi / lo)))
        return float(min(hi, lo * 2 ** min(n, math.floor(obs.samples * (n + 1) / self.budget))))


def make_callback(kind: str, **kw: Any):
    """The `AdaptiveBatchSize` of a run kind; the only code that knows the callback's API.

    Kinds: ``control`` (monitor only at a fixed batch, ``ref_batch_size = b0``, no lr rule:
    only the betas / eps / weight-decay transforms apply), ``default`` (the library default
    policy and rules), ``seesaw`` (`SeesawPolicy`: the schedule's lr decay traded for batch
    growth, capped by B_simple; ``seesaw_uncapped`` without the cap, ``seesaw_adam_plain``
    without Adam's betas/eps transforms: diagnostics), ``sqrt`` (B = sqrt(b0 * B_simple),
    McCandlish's App. D shape) and ``ramp`` (doubling from b0 to b_max in equal sample
    intervals over the budget).
    Keywords: ``b0``, ``b_max``, ``n`` (the sample budget), ``half_life`` (the estimator's,
    for the control only: it is a monitor there; the adaptive runs use the library default).
    """
    from adabatch import AdaptiveBatchSize
    from adabatch.control.policy import FixedPolicy, NoisePolicy, SeesawPolicy
    from adabatch.control.rules import ScalingRules

    b0, b_max, n = kw["b0"], kw["b_max"], kw["n"]
    common_kw = dict(noise="per_example", resize="sampler", ref_batch_size=b0, max_samples=n,
                     log_every_n_steps=25)
    if kind == "control":
        return AdaptiveBatchSize(policy=FixedPolicy(), rules=ScalingRules(lr="none"),
                                 half_life_samples=kw["half_life"], **common_kw)
    bounds = dict(min_batch_size=b0, max_batch_size=b_max)
    if kind in ("default", "default_tuned"):  # default_tuned: the benchmark tunes its lr
        return AdaptiveBatchSize(**bounds, **common_kw)
    if kind == "seesaw":
        return AdaptiveBatchSize(policy=SeesawPolicy(), **bounds, **common_kw)
    if kind == "seesaw_uncapped":
        return AdaptiveBatchSize(policy=SeesawPolicy(noise_fraction=None), **bounds, **common_kw)
    if kind == "seesaw_adam_plain":  # Seesaw as published: Adam's betas and eps untouched
        return AdaptiveBatchSize(policy=SeesawPolicy(), rules=ScalingRules(betas=False, eps=False),
                                 **bounds, **common_kw)
    if kind == "default_lr_fixed":  # the lr stays on the user's schedule as the batch grows
        return AdaptiveBatchSize(rules=ScalingRules(lr="none"), **bounds, **common_kw)
    if kind == "sqrt":
        return AdaptiveBatchSize(policy=NoisePolicy(scale=math.sqrt(b0), exponent=0.5),
                                 **bounds, **common_kw)
    if kind == "ramp":
        return AdaptiveBatchSize(policy=DoublingRamp(n), **bounds, **common_kw)
    raise ValueError(f"kind={kind!r} is not one of control, {', '.join(VARIANTS)}")


VARIANT_LABELS = {
    "default": "library default",
    "default_tuned": "library default, its own lr tuned",
    "seesaw": "SeesawPolicy (lr decay -> batch, cap B_simple)",
    "seesaw_uncapped": "SeesawPolicy, no noise cap",
    "seesaw_adam_plain": "SeesawPolicy, Adam betas/eps not scaled",
    "default_lr_fixed": "library default, no lr rule",
    "sqrt": "sqrt law B = sqrt(B0 B_simple)",
    "ramp": "doubling ramp B0 -> B_max",
}


# ============================================================================ tasks
@dataclass
class Task:
    """One task of the benchmark: its budget, batch grid, lr grid and model."""

    name: str
    budget: int  # samples per run (N), a multiple of every fixed batch
    batches: list[int]
    lr_center: Callable[[int], float]
    optimizer: str  # sgd | adamw
    half_life: float  # the estimator's half-life in samples in the control runs
    loss_text: str
    make_model: Callable[[float], Any] = None  # type: ignore[assignment]
    make_dataset: Callable[[int], Any] = None  # type: ignore[assignment]
    eval_fn: Callable[[Any], float] = None  # type: ignore[assignment]
    extra_fn: Callable[[Any], dict[str, float]] | None = None
    const_target: float | None = None  # the constant-lr steps-to-target check's target
    floor: float = 0.0  # the loss's known floor: the figure shows loss - floor, log scale
    notes: list[str] = field(default_factory=list)

    @property
    def control(self) -> bool:
        """Whether the kappa transforms change anything (Adam betas / eps / wd)."""
        return self.optimizer != "sgd"

    def config(self) -> dict[str, Any]:
        """What the cached runs depend on, the data each seed sees included (a fingerprint of
        its first batches: a change to the sampler or the data invalidates the cache)."""
        return {"budget": self.budget, "batches": self.batches, "optimizer": self.optimizer,
                "centres": [self.lr_center(b) for b in self.batches], "notes": self.notes,
                "warmup": WARMUP, "half_life": self.half_life,
                "data": data_fingerprint(self)}


def data_fingerprint(task: Task, seed: int = 1, batches: int = 4) -> str:
    """A digest of the first ``batches`` batches a run of ``seed`` reads at the smallest batch
    (float64 sums of each tensor): the data and its order, as the runs see them."""
    loader = common.resizable_loader(task.make_dataset(seed), task.batches[0], seed=seed)
    sums = []
    for i, batch in enumerate(loader):
        if i == batches:
            break
        sums += [round(float(t.double().sum()), 6) for t in batch]
    return hashlib.sha1(json.dumps(sums).encode()).hexdigest()[:12]


def scheduled(cls: type) -> type:
    """A quiet task module whose optimizer follows warm-up + cosine in samples.

    The model's ``clock`` (a `SampleCounter`, advanced by `SampleClock` before every
    optimizer step) and ``budget`` drive a `sample_lambda_lr` stepped every optimizer step;
    ``budget = None`` keeps the lr constant.
    """
    from adabatch.control.schedules import SampleSchedule, sample_lambda_lr

    base = common.quiet_module(cls)

    def configure_optimizers(self):  # noqa: ANN001, ANN202
        opt = base.configure_optimizers(self)
        if self.budget is None:  # the constant-lr steps-to-target check
            sched = SampleSchedule("constant")
        else:
            sched = SampleSchedule("warmup_cosine", warmup_samples=int(WARMUP * self.budget),
                                   total_samples=self.budget)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": sample_lambda_lr(opt, sched, self.clock),
                                 "interval": "step"}}

    return type(f"Scheduled{cls.__name__}", (base,), {"configure_optimizers":
                                                      configure_optimizers})


class SampleClock(common.Callback):
    """Counts the samples of each optimizer step before the step (and so before the
    scheduler reads them): the schedule sees the samples trained on after this step.

    ``trace`` holds ``(samples before the step, lr)`` of every step, read before any callback
    after this one scales the learning rate: the schedule itself, to check it is in samples.
    """

    def __init__(self, counter: Any) -> None:
        self.counter, self._pending = counter, 0
        self.trace: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._pending += int(batch[0].shape[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.trace.append((self.counter.samples, float(optimizer.param_groups[0]["lr"])))
        self.counter.add(self._pending)
        self._pending = 0


def schedule_error(run: dict[str, Any], budget: int) -> float:
    """Largest ``|lr / lr0 - warmup_cosine(samples)|`` over a run's steps (0: in samples)."""
    from adabatch.control.schedules import warmup_cosine

    return max((abs(lr / run["lr"] - warmup_cosine(s, int(WARMUP * budget), budget))
                for s, lr in run["lr_trace"]), default=math.nan)


def _least_squares(name: str, quick: bool, dim: int, noise_std: float, budget: int,
                   batches: list[int]) -> Task:
    from adabatch.tasks.synthetic import LeastSquaresModel, LeastSquaresProblem

    cond = 10.0
    problem = LeastSquaresProblem(dim=dim, noise_std=noise_std, condition=cond, seed=0)
    lam_max = float(problem.spectrum.max())
    floor = 0.5 * noise_std**2
    task = Task(
        name=name, budget=budget, batches=batches, optimizer="sgd",
        # linear up to the curvature limit (with a cosine the mean lr is half the peak)
        lr_center=lambda b: min(b / (6.0 * dim), 1.0 / lam_max),
        half_life=budget / 16, loss_text=f"exact population loss (noise floor {floor:.4g})",
        const_target=floor * (1 + CONST_EXCESS), floor=floor,
        notes=[f"least squares dim={dim}, condition={cond:g}, noise_std={noise_std:g} (w0 = 0, "
               f"initial loss {float(problem.loss(torch.zeros(dim))):.3g}); plain SGD; fresh "
               "examples; loss evaluated exactly"],
    )
    model_cls = scheduled(LeastSquaresModel)

    def make_model(lr: float):
        return model_cls(dim=dim, noise_std=noise_std, condition=cond, lr=lr, optimizer="sgd",
                         init_scale=0.0)

    def make_dataset(seed: int, const: bool = False):
        g = torch.Generator().manual_seed(1000 + seed)
        x, y = problem.sample((CONST_BUDGET if const else 1) * budget + max(batches), g)
        return common.BatchedTensorDataset(x.float(), y.float())

    spectrum = problem.spectrum
    trace_s2 = float(spectrum.square().sum())

    def extra_fn(module) -> dict[str, float]:
        # exact B_simple and McCandlish's B_noise = 1 + (d^T S d + s^2) tr(S^2) / (d^T S^3 d)
        w = module.linear.weight.detach().double().reshape(-1)
        d2 = (w - problem.w_star).square()
        quad = float((spectrum * d2).sum()) + noise_std**2
        return {"exact_gns": float(problem.exact_stats(w)["gns"]),
                "exact_bnoise": 1.0 + quad * trace_s2 / float((spectrum**3 * d2).sum())}

    task.make_model, task.make_dataset = make_model, make_dataset
    task.eval_fn = lambda m: float(problem.loss(m.linear.weight))
    task.extra_fn = extra_fn
    return task


def synthetic_task(quick: bool) -> Task:
    if quick:
        return _least_squares("synthetic", quick, 8, 1.0, 2048, [8, 16, 32])
    return _least_squares("synthetic", quick, 64, 1.0, 8192, [16, 32, 64, 128, 256, 512])


def noisefloor_task(quick: bool) -> Task:
    """Least squares run close to its noise floor: B_simple grows without bound as d -> 0."""
    if quick:
        return _least_squares("noisefloor", quick, 8, 0.05, 1024, [8, 16, 32])
    return _least_squares("noisefloor", quick, 16, 0.05, 32_768,
                          [16, 32, 64, 128, 256, 512, 1024])


def digits_task(quick: bool, name: str = "digits", budget: int = 12_288,
                train_loss: bool = False) -> Task:
    from adabatch.tasks.digits import DigitsCNN, DigitsData

    data = DigitsData(batch_size=8)
    data.setup("fit")
    train = common.BatchedTensorDataset(*data.train_set.tensors)
    val_x, val_y = data.val_set.tensors
    budget = 2048 if quick else budget
    task = Task(
        name=name, budget=budget, batches=[16, 32] if quick else [16, 32, 64, 128, 256, 512],
        optimizer="sgd", lr_center=lambda b: min(0.05 * b / 16, 0.2), half_life=budget / 16,
        loss_text=f"validation cross-entropy ({len(val_y)} held-out digits)",
        notes=[f"CNN channels (8, 16), hidden 32, on {len(train)} scikit-learn digits "
               f"({budget / len(train):.1f} epochs); SGD momentum 0.9"],
    )
    model_cls = scheduled(DigitsCNN)
    task.make_model = lambda lr: model_cls(channels=(8, 16), hidden=32, lr=lr, optimizer="sgd",
                                           momentum=0.9)
    task.make_dataset = lambda seed: train
    if train_loss:
        tx, ty = data.train_set.tensors
        task.eval_fn = lambda m: float(m.loss((tx, ty)))
        task.loss_text = f"training cross-entropy ({len(ty)} digits, the full training set)"
    else:
        task.eval_fn = lambda m: float(m.loss((val_x, val_y)))
    return task


def charlm_task(quick: bool, name: str = "charlm", budget: int = 12_288,
                batches: tuple[int, ...] = (8, 16, 32, 64, 128, 256)) -> Task:
    from adabatch.tasks.charlm import CharLM

    context, d_model = 32, 32
    train, val_x, val_y = common.charlm_windows(context)
    budget = 1024 if quick else budget
    task = Task(
        name=name, budget=budget, batches=[8, 16] if quick else list(batches),
        optimizer="adamw", lr_center=lambda b: min(2e-3 * math.sqrt(b / 8), 1e-2),
        half_life=budget / 16,
        loss_text=f"validation cross-entropy, nats/byte ({len(val_x)} windows of {context})",
        notes=[f"byte-level transformer d_model={d_model}, 2 layers, 2 heads, context "
               f"{context}, {len(train)} training windows of stdlib source; AdamW betas "
               "(0.9, 0.99), weight decay 0.01"],
    )
    model_cls = scheduled(CharLM)
    task.make_model = lambda lr: model_cls(d_model=d_model, n_layers=2, n_heads=2,
                                           context=context, lr=lr, optimizer="adamw",
                                           weight_decay=0.01, betas=(0.9, 0.99))
    task.make_dataset = lambda seed: train
    task.eval_fn = lambda m: float(m.loss((val_x, val_y)))
    return task


def charlm_long_task(quick: bool) -> Task:
    """The char-LM trained on 8/3 the samples (the largest batch dropped to keep the CPU cost):
    the high-growth candidate with room, as its noise scale keeps growing with the loss."""
    return charlm_task(quick, "charlm_long", 32_768, (8, 16, 32, 64, 128))


def _teacher_student_classes():
    from torch import nn
    from torch.nn import functional as F

    from adabatch.tasks.common import TaskModule

    class Student(TaskModule):
        """A one-hidden-layer tanh MLP classifier (the student)."""

        def __init__(self, dim: int, hidden: int, classes: int, lr: float,
                     momentum: float = 0.9) -> None:
            super().__init__(lr=lr, optimizer="sgd", momentum=momentum, weight_decay=0.0,
                             betas=(0.9, 0.999))
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, classes))

        def loss(self, batch):  # noqa: ANN001, ANN201
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    return Student


def teacher_student_task(quick: bool, name: str = "teacher", budget: int = 524_288,
                         dim: int = 16, hidden: int = 64, classes: int = 10,
                         scale: float = 3.0) -> Task:
    """Fresh Gaussian inputs labelled by sampling a fixed random teacher MLP's softmax: the
    loss has a floor (the teacher's entropy) and the student, larger than the teacher, can
    reach it, so the gradient vanishes while the label noise stays."""
    g = torch.Generator().manual_seed(0)
    t_hidden = hidden // 2
    w1 = torch.randn(dim, t_hidden, generator=g) / math.sqrt(dim)
    w2 = torch.randn(t_hidden, classes, generator=g) * scale / math.sqrt(t_hidden)

    def teacher_logp(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(torch.tanh(x @ w1) @ w2, dim=-1)

    eval_x = torch.randn(8192, dim, generator=g)
    eval_logp = teacher_logp(eval_x)
    entropy = float(-(eval_logp.exp() * eval_logp).sum(-1).mean())
    budget = 2048 if quick else budget
    batches = [16, 32] if quick else [128, 256, 512, 1024, 2048, 4096, 8192]
    task = Task(
        name=name, budget=budget, batches=batches, optimizer="sgd",
        lr_center=lambda b: min(0.05 * b / 16, 4.0), half_life=budget / 16,
        loss_text="KL(teacher || student) on 8192 fixed inputs (nats)",
        notes=[f"teacher-student: x ~ N(0, I_{dim}), y ~ softmax(teacher), teacher tanh MLP "
               f"{dim}-{t_hidden}-{classes} (logit scale {scale:g}, entropy {entropy:.3f} "
               f"nats), student tanh MLP {dim}-{hidden}-{classes}; fresh examples; SGD "
               "momentum 0.9"],
    )
    model_cls = scheduled(_teacher_student_classes())
    task.make_model = lambda lr: model_cls(dim=dim, hidden=hidden, classes=classes, lr=lr)

    def make_dataset(seed: int, const: bool = False):
        gs = torch.Generator().manual_seed(2000 + seed)
        n = (CONST_BUDGET if const else 1) * budget + max(batches)
        x = torch.randn(n, dim, generator=gs)
        y = torch.multinomial(teacher_logp(x).exp(), 1, generator=gs).squeeze(-1)
        return common.BatchedTensorDataset(x, y)

    def kl(m) -> float:
        with torch.no_grad():
            logq = torch.log_softmax(m.net(eval_x), dim=-1)
        return float((eval_logp.exp() * (eval_logp - logq)).sum(-1).mean())

    task.make_dataset, task.eval_fn = make_dataset, kl
    return task


def _char_cnn_class():
    from torch import nn
    from torch.nn import functional as F

    from adabatch.tasks.common import TaskModule

    class CharCNN(TaskModule):
        """A causal convolutional byte-level LM: embedding, one causal convolution over the
        last ``kernel`` bytes, tanh, a per-position linear read-out (SGD-friendly, no
        attention, no normalisation)."""

        def __init__(self, lr: float, d_embed: int = 32, channels: int = 128, kernel: int = 8,
                     momentum: float = 0.9) -> None:
            super().__init__(lr=lr, optimizer="sgd", momentum=momentum, weight_decay=0.0,
                             betas=(0.9, 0.999))
            self.kernel = kernel
            self.embed = nn.Embedding(256, d_embed)
            self.conv = nn.Conv1d(d_embed, channels, kernel)
            self.out = nn.Linear(channels, 256)

        def forward(self, x):  # noqa: ANN001, ANN201
            h = self.embed(x).transpose(1, 2)  # [B, C, T]
            h = torch.tanh(self.conv(F.pad(h, (self.kernel - 1, 0))))
            return self.out(h.transpose(1, 2))  # [B, T, 256]

        def loss(self, batch):  # noqa: ANN001, ANN201
            x, y = batch
            return F.cross_entropy(self(x).reshape(-1, 256), y.reshape(-1))

    return CharCNN


def charcnn_task(quick: bool, name: str = "charcnn", budget: int = 32_768) -> Task:
    """A causal CNN byte-level LM on the char-LM's data with SGD + momentum."""
    context = 32
    train, val_x, val_y = common.charlm_windows(context)
    budget = 1024 if quick else budget
    task = Task(
        name=name, budget=budget, batches=[8, 16] if quick else [8, 16, 32, 64, 128, 256],
        optimizer="sgd", lr_center=lambda b: min(0.1 * b / 8, 2.0), half_life=budget / 16,
        loss_text=f"validation cross-entropy, nats/byte ({len(val_x)} windows of {context})",
        notes=[f"causal CNN byte LM: embedding 32, one causal convolution (kernel 8, 128 "
               f"channels), tanh, linear read-out; {len(train)} training windows of stdlib "
               "source; SGD momentum 0.9"],
    )
    model_cls = scheduled(_char_cnn_class())
    task.make_model = lambda lr: model_cls(lr=lr)
    task.make_dataset = lambda seed: train
    task.eval_fn = lambda m: float(m.loss((val_x, val_y)))
    return task


def digits_long_task(quick: bool) -> Task:
    """The digits CNN on 4x the samples (34 epochs), judged by its loss on the whole training
    set: an exact full-dataset statistic, without the held-out set's seed spread, for a run
    long enough to fit the data."""
    return digits_task(quick, "digits_long", 49_152, train_loss=True)


BUILDERS = {"synthetic": synthetic_task, "noisefloor": noisefloor_task, "digits": digits_task,
            "digits_long": digits_long_task, "charlm": charlm_task,
            "charlm_long": charlm_long_task, "teacher": teacher_student_task,
            "charcnn": charcnn_task}


@cache
def get_task(name: str, quick: bool) -> Task:
    return BUILDERS[name](quick)


# ============================================================================ one run
@dataclass(frozen=True)
class Job:
    task: str
    quick: bool
    kind: str  # fixed | control | default | sqrt | ramp
    seed: int
    lr: float
    batch: int  # the fixed batch, or B0 for the adaptive runs
    target: float | None = None  # constant lr until this loss (or CONST_BUDGET x N samples)


def _thin(values: list[float], n: int = 200) -> list[float]:
    """At most ``n`` evenly spaced values (for plots in the JSON)."""
    if len(values) <= n:
        return list(values)
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def run_job(job: Job) -> dict[str, Any]:
    """Train one run to the budget; a JSON-able summary."""
    from lightning.pytorch import seed_everything

    from adabatch.control.schedules import SampleCounter

    common.quiet_lightning()
    common.set_threads(1)
    task = get_task(job.task, job.quick)
    seed_everything(job.seed, verbose=False)
    model = task.make_model(job.lr)
    const = job.target is not None
    budget = CONST_BUDGET * task.budget if const else task.budget
    model.clock, model.budget = SampleCounter(), None if const else task.budget
    data = task.make_dataset(job.seed, const) if const else task.make_dataset(job.seed)
    loader = common.resizable_loader(data, job.batch, seed=job.seed)
    cb = None
    if job.kind != "fixed":
        # an adaptive run starts (and has its bounds' bottom and B_ref) at the job's batch,
        # B0 in this benchmark; the control's B_ref is B0 whatever its fixed batch
        b0 = task.batches[0] if job.kind == "control" else job.batch
        cb = make_callback(job.kind, b0=b0, b_max=task.batches[-1], n=budget,
                           half_life=task.half_life)
    evals = common.every_step if const else common.geometric_schedule(1.25, 5)
    progress = Progress(task.eval_fn, job.target, evals, max_samples=budget, adabatch=cb,
                        extra_fn=task.extra_fn)
    clock = SampleClock(model.clock)
    callbacks = [clock] + ([cb] if cb is not None else []) + [progress]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = common.fast_trainer(callbacks, tmp)
        t0 = time.perf_counter()
        trainer.fit(model, train_dataloaders=loader)
        seconds = time.perf_counter() - t0
    rec = progress.record
    model.eval()
    with torch.no_grad():
        final = float(task.eval_fn(model))
    if rec.diverged or not math.isfinite(final):
        final = math.inf
    overhead = trainer.callback_metrics.get("adabatch/probe_overhead")
    out: dict[str, Any] = {
        **asdict(job), "steps": rec.steps, "samples": rec.samples, "final_loss": final,
        "diverged": bool(rec.diverged), "wall": rec.wall, "fit_seconds": seconds,
        "batch_end": rec.batch[-1] if rec.batch else job.batch,
        "batch_max": max(rec.batch, default=job.batch),
        "probe_overhead": None if overhead is None else float(overhead),
        "batch_trace": _thin([float(b) for b in rec.batch]),
        "gns_trace": _thin(rec.gns), "lr_trace": _thin(clock.trace), "model": {},
        "reached": rec.reached, "steps_to_target": rec.steps_to_target,
        "samples_to_target": rec.samples_to_target,
    }
    if cb is not None:
        out["model"]["measured"] = trajectory_model(rec)
        out["probes"] = [r.to_dict() for r in getattr(cb.policy, "results", [])]
        out["rho"] = getattr(cb.policy, "rho", None)
    if task.extra_fn is not None:
        out["model"]["exact_bnoise"] = trajectory_model(rec, "exact_bnoise")
        out["model"]["exact_gns"] = trajectory_model(rec, "exact_gns")
    return out


def run_all(jobs: list[Job], n_jobs: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``jobs`` (in a spawn pool of ``n_jobs`` processes when > 1), in order."""
    def show(r: dict[str, Any]) -> None:
        log(f"  [{r['task']} s{r['seed']}] {r['kind']:<8s} B={r['batch']:<5d} lr={r['lr']:<8.3g}"
            f" steps {r['steps']:6d} loss {r['final_loss']:.5g} B_end {r['batch_end']}"
            f" {r['wall']:.1f}s")

    if n_jobs <= 1 or len(jobs) <= 1:
        out = []
        for j in jobs:
            out.append(run_job(j))
            show(out[-1])
        return out
    import multiprocessing as mp

    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as pool:
        out = []
        for r in pool.map(run_job, jobs):
            show(r)
            out.append(r)
        return out


# ============================================================================ protocol
def tune_lrs(task: Task, quick: bool, keys: list[tuple[str, int]],
             center: Callable[[tuple[str, int]], float], tune_seed: int, n_jobs: int,
             log: Callable[[str], None]) -> dict[tuple[str, int], dict[float, dict[str, Any]]]:
    """The lr grid of each ``(kind, batch)`` on the tuning seed: ``x0.5, x1, x2`` around its
    centre, extended by one more factor of 2 while the best is at an edge (twice at most;
    quick: no extension). Returns every run, by key and lr."""
    tried: dict[tuple[str, int], dict[float, dict[str, Any]]] = {k: {} for k in keys}
    factors = {k: [0.5, 1.0, 2.0] for k in keys}
    for _round in range(1 if quick else 3):
        jobs = [Job(task.name, quick, k[0], tune_seed, center(k) * f, k[1])
                for k in keys for f in factors[k] if center(k) * f not in tried[k]]
        for r in run_all(jobs, n_jobs, log):
            tried[(r["kind"], r["batch"])][r["lr"]] = r
        factors = {}
        for k in keys:  # extend the grid while the best lr is at its edge
            lrs = sorted(tried[k])
            best = min(lrs, key=lambda lr: tried[k][lr]["final_loss"])
            if best == lrs[0]:
                factors[k] = [best / 2 / center(k)]
            elif best == lrs[-1] and math.isfinite(tried[k][best]["final_loss"]):
                factors[k] = [best * 2 / center(k)]
        if not factors:
            break
        factors = {k: factors.get(k, []) for k in keys}
    return tried


def tune_and_run_fixed(task: Task, quick: bool, tune_seed: int, seeds: list[int], n_jobs: int,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """The lr grid on the tuning seed, then fixed and control runs on ``seeds``."""
    tried = tune_lrs(task, quick, [("fixed", b) for b in task.batches],
                     lambda key: task.lr_center(key[1]), tune_seed, n_jobs, log)
    tried = {b: tried[("fixed", b)] for b in task.batches}
    best_lr = {b: min(tried[b], key=lambda lr: tried[b][lr]["final_loss"]) for b in task.batches}
    kinds = ["fixed"] + (["control"] if task.control else [])
    jobs = [Job(task.name, quick, k, s, best_lr[b], b) for k in kinds for s in seeds
            for b in task.batches]
    runs = run_all(jobs, n_jobs, log)
    out = {"config": task.config(), "tune_seed": tune_seed, "seeds": seeds,
           "tuning": [r for b in task.batches for r in tried[b].values()],
           "best_lr": {str(b): lr for b, lr in best_lr.items()}, "runs": runs}
    if task.const_target is not None:
        out["constant"] = run_constant_fixed(task, quick, out, n_jobs, log)
    return out


def run_constant_fixed(task: Task, quick: bool, fixed: dict[str, Any], n_jobs: int,
                       log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The constant-lr check's fixed runs: every batch at its tuned lr, held constant."""
    return run_all([Job(task.name, quick, "fixed", s, fixed["best_lr"][str(b)], b,
                        target=task.const_target) for s in fixed["seeds"] for b in task.batches],
                   n_jobs, log)


def extend_seeds(task: Task, quick: bool, fixed: dict[str, Any], seeds: list[int], n_jobs: int,
                 log: Callable[[str], None], argv: list[str] | None = None) -> dict[str, Any]:
    """``fixed`` with the fixed (and control) runs, and the constant-lr check's, of ``seeds``
    added at the cached tuned lrs (no new tuning)."""
    kinds = ["fixed"] + (["control"] if task.control else [])
    lr = {int(b): v for b, v in fixed["best_lr"].items()}
    out = {**fixed, "seeds": sorted(set(fixed["seeds"]) | set(seeds)),
           "more_seeds": fixed.get("more_seeds", []) + [{
               "seeds": seeds, "date": common.now(), "device": common.device_line(),
               "command": common.command_line("equal_budget.py", argv)}]}
    jobs = [Job(task.name, quick, k, s, lr[b], b) for k in kinds for s in seeds
            for b in task.batches]
    out["runs"] = fixed["runs"] + run_all(jobs, n_jobs, log)
    if "constant" in fixed:
        added = run_constant_fixed(task, quick, {**fixed, "seeds": seeds}, n_jobs, log)
        out["constant"] = fixed["constant"] + added
    return out


def select_seeds(fixed: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """``fixed`` restricted to the evaluation ``seeds`` (the cache may hold more)."""
    keep = set(seeds)
    out = {**fixed, "seeds": [s for s in fixed["seeds"] if s in keep]}
    out["runs"] = [r for r in fixed["runs"] if r["seed"] in keep]
    if "constant" in fixed:
        out["constant"] = [r for r in fixed["constant"] if r["seed"] in keep]
    return out


def run_adaptive(task: Task, quick: bool, fixed: dict[str, Any], seeds: list[int],
                 variants: list[str], n_jobs: int, log: Callable[[str], None]) -> list[dict]:
    """The adaptive variants from B0 at B0's tuned lr; with a constant-lr check, also the
    default policy at that lr held constant (those runs have a ``target``)."""
    b0 = task.batches[0]
    lr0 = fixed["best_lr"][str(b0)]
    lr = {v: lr0 for v in variants}
    tuning: list[dict[str, Any]] = []
    if "default_tuned" in variants:  # its own lr grid around B0's, like a fixed batch's
        tried = tune_lrs(task, quick, [("default_tuned", b0)], lambda key: lr0,
                         fixed["tune_seed"], n_jobs, log)[("default_tuned", b0)]
        lr["default_tuned"] = min(tried, key=lambda v: tried[v]["final_loss"])
        tuning = [{**r, "tuning": True} for r in tried.values()]
    jobs = [Job(task.name, quick, v, s, lr[v], b0) for v in variants for s in seeds]
    if task.const_target is not None and "default" in variants:
        jobs += [Job(task.name, quick, "default", s, lr0, b0, target=task.const_target)
                 for s in seeds]
    return tuning + run_all(jobs, n_jobs, log)


def config_key(task: Task) -> str:
    return hashlib.sha1(json.dumps(task.config(), sort_keys=True).encode()).hexdigest()[:12]


# ============================================================================ analysis
@dataclass
class Point:
    """A group of runs (one fixed batch, one variant) over the evaluation seeds."""

    label: str
    kind: str
    batch: int
    lr: float
    runs: list[dict[str, Any]]

    @property
    def losses(self) -> list[float]:
        return [r["final_loss"] for r in self.runs]

    @property
    def loss(self) -> float:
        return statistics.median(self.losses)

    @property
    def lo(self) -> float:
        return min(self.losses)

    @property
    def hi(self) -> float:
        return max(self.losses)

    @property
    def steps(self) -> float:
        return statistics.median([r["steps"] for r in self.runs])

    @property
    def wall(self) -> float:
        return statistics.median([r["wall"] for r in self.runs])


def better_beyond_spread(a: Point, b: Point) -> bool:
    """``a``'s final loss is lower than ``b``'s beyond the seed spread: the seed ranges are
    disjoint, or (for runs paired by seed: same data order and initialisation) ``a`` is lower
    on every common seed, i.e. the range of the per-seed differences excludes 0. Pairing
    cancels the seed-to-seed variation both share (on the least-squares tasks the data draw
    moves every run's loss together)."""
    diffs = paired_difference(a, b)
    return a.hi < b.lo or (len(diffs) >= 2 and max(diffs) < 0)


def equal_or_better(a: Point, b: Point) -> bool:
    """``a``'s loss is not worse than ``b``'s beyond the seed spread."""
    return not better_beyond_spread(b, a)


def compare(point: Point, fixed: list[Point]) -> dict[str, Any]:
    """Step savings and domination of an adaptive point against the fixed points."""
    finite = [f for f in fixed if math.isfinite(f.loss)]
    best = min(finite, key=lambda f: (f.loss, f.steps), default=None)
    out: dict[str, Any] = {"best": best, "vs_best": math.nan, "matched": None,
                           "vs_matched": math.nan, "dominated_by": []}
    if best is None or not math.isfinite(point.loss):
        return out
    if equal_or_better(point, best):
        out["vs_best"] = 1.0 - point.steps / best.steps
    # the cheapest fixed batch whose loss is equal or better than the point's
    matched = [f for f in finite if equal_or_better(f, point)]
    if matched:
        m = min(matched, key=lambda f: f.steps)
        out["matched"], out["vs_matched"] = m, 1.0 - point.steps / m.steps
    out["dominated_by"] = [f for f in finite
                           if f.steps <= point.steps and better_beyond_spread(f, point)]
    out["paired"] = paired_difference(point, best)
    return out


def paired_difference(a: Point, b: Point) -> list[float]:
    """``a``'s loss minus ``b``'s, seed by seed (same data order and initialisation), for the
    seeds both have: the seed-to-seed variation common to both cancels."""
    loss_b = {r["seed"]: r["final_loss"] for r in b.runs}
    return [r["final_loss"] - loss_b[r["seed"]] for r in a.runs if r["seed"] in loss_b]


def model_prediction(point: Point, budget: int, key: str = "measured") -> dict[str, float]:
    """Medians over seeds of gamma, the growth of B_noise and the predicted step saving."""
    models = [r["model"].get(key) for r in point.runs if r["model"].get(key)]
    if not models:
        return {"gamma": math.nan, "growth": math.nan, "pred": math.nan, "first": math.nan,
                "last": math.nan, "e_min": math.nan}
    pred = [predicted_saving(m["gamma"], budget, m["e_min"]) for m in models]
    growth = [m["last"] / m["first"] for m in models]
    med = common.finite_median
    return {"gamma": med([m["gamma"] for m in models]), "growth": med(growth),
            "pred": med(pred), "first": med([m["first"] for m in models]),
            "last": med([m["last"] for m in models]), "e_min": med([m["e_min"] for m in models])}


def analyze(task: Task, fixed: dict[str, Any], adaptive: list[dict[str, Any]]) -> dict[str, Any]:
    best_lr = {int(b): lr for b, lr in fixed["best_lr"].items()}
    const_runs = [r for r in adaptive if r.get("target") is not None]
    adaptive_tuning = [r for r in adaptive if r.get("tuning")]
    adaptive = [r for r in adaptive if r.get("target") is None and not r.get("tuning")]
    adaptive_pts = group_variants(adaptive)

    def group(kind: str, runs: list[dict[str, Any]], key: str, label: Callable[[Any], str]):
        groups: dict[Any, list[dict[str, Any]]] = {}
        for r in runs:
            if r["kind"] == kind:
                groups.setdefault(r[key], []).append(r)
        return [Point(label(k), kind, rs[0]["batch"], rs[0]["lr"], rs) for k, rs in
                groups.items()]

    fixed_pts = group("fixed", fixed["runs"], "batch", lambda b: f"B={b}")
    control_pts = group("control", fixed["runs"], "batch", lambda b: f"B={b} +transforms")
    frontier = fixed_pts + control_pts  # a batch schedule must beat the transforms too
    comparisons = {p.kind: compare(p, frontier) for p in adaptive_pts}
    models = {p.kind: model_prediction(p, task.budget) for p in adaptive_pts}
    exact = {p.kind: model_prediction(p, task.budget, "exact_bnoise") for p in adaptive_pts}
    fixed_growth = {p.batch: model_prediction(p, task.budget, "exact_gns")["growth"]
                    for p in fixed_pts}
    control_growth = {p.batch: model_prediction(p, task.budget)["growth"] for p in control_pts}
    all_runs = fixed["tuning"] + fixed["runs"] + adaptive + adaptive_tuning
    sched_err = max((schedule_error(r, task.budget) for r in all_runs if r.get("lr_trace")),
                    default=math.nan)
    budget_range = (min(r["samples"] for r in all_runs), max(r["samples"] for r in all_runs))
    return dict(task=task, best_lr=best_lr, fixed=fixed_pts, control=control_pts,
                schedule_error=sched_err, budget_range=budget_range,
                adaptive=adaptive_pts, comparisons=comparisons, models=models, exact=exact,
                fixed_growth=fixed_growth, control_growth=control_growth, raw=fixed,
                adaptive_tuning=adaptive_tuning,
                constant=constant_check(task, fixed.get("constant", []), const_runs))


def _median_inf(values: list[float]) -> float:
    """Median with a missing value (a run that did not reach the target) as ``inf``."""
    return statistics.median([v if math.isfinite(v) else math.inf for v in values])


def constant_check(task: Task, fixed_runs: list[dict], adaptive_runs: list[dict]) -> dict | None:
    """Constant lr, steps to ``task.const_target``: the default policy from B0 against the
    fixed-batch (samples, steps) frontier at its samples (+ `common.SAMPLE_TOLERANCE`)."""
    if not fixed_runs or not adaptive_runs:
        return None

    def summary(runs: list[dict]) -> dict[str, Any]:
        steps = _median_inf([r["steps_to_target"] if r["reached"] else math.inf for r in runs])
        samples = _median_inf([r["samples_to_target"] if r["reached"] else math.inf
                               for r in runs])
        return {"steps": steps, "samples": samples, "reached": sum(r["reached"] for r in runs),
                "n": len(runs), "lr": runs[0]["lr"],
                "wall": statistics.median([r["wall"] for r in runs])}

    per_batch = {b: summary([r for r in fixed_runs if r["batch"] == b]) for b in task.batches}
    front = common.pareto([(v["samples"], v["steps"]) for v in per_batch.values()])
    ada = summary(adaptive_runs)
    ada["batch_end"] = statistics.median([r["batch_end"] for r in adaptive_runs])
    f_steps = common.frontier_steps(front, ada["samples"])
    saving = 1.0 - ada["steps"] / f_steps if math.isfinite(ada["steps"]) else -math.inf
    return {"per_batch": per_batch, "adaptive": ada, "frontier_steps": f_steps,
            "saving": saving, "met": bool(math.isfinite(ada["steps"]) and saving >= 0)}


def group_variants(adaptive: list[dict[str, Any]]) -> list[Point]:
    out = []
    for v in VARIANTS:
        rs = [r for r in adaptive if r["kind"] == v]
        if rs:
            out.append(Point(VARIANT_LABELS[v], v, rs[0]["batch"], rs[0]["lr"], rs))
    return out


# ============================================================================ output
def _loss(p: Point) -> str:
    return median_range(p.losses, ".5g") if all(map(math.isfinite, p.losses)) else (
        f"{sum(not math.isfinite(v) for v in p.losses)}/{len(p.losses)} diverged; "
        + median_range(p.losses, ".5g"))


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task: Task = out["task"]
    fig, ax = plt.subplots(figsize=(9.5, 4.8))

    f0 = task.floor

    def draw(points: list[Point], fmt_: str, color: str, label: str, line: bool = True) -> None:
        pts = [p for p in points if math.isfinite(p.loss)]
        if not pts:
            return
        xs, ys = [p.steps for p in pts], [p.loss - f0 for p in pts]
        err = [[p.loss - p.lo for p in pts], [p.hi - p.loss for p in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt=fmt_, color=color, capsize=3, ms=6, label=label,
                    ls="-" if line else "none", lw=1)
        for p in pts:
            if p.kind == "fixed":
                ax.annotate(f"B={p.batch}", (p.steps, p.loss - f0), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)

    draw(out["fixed"], "o", "0.3", "fixed batch, tuned lr")
    draw(out["control"], "s", "tab:purple", "fixed + kappa transforms (control)")
    style = {"default": ("*", "tab:red"), "seesaw": ("X", "tab:brown"),
             "seesaw_uncapped": ("x", "tab:pink"), "seesaw_adam_plain": ("v", "tab:olive"),
             "default_lr_fixed": ("p", "tab:cyan"), "default_tuned": ("P", "tab:orange"),
             "sqrt": ("D", "tab:blue"), "ramp": ("^", "tab:green")}
    for p in out["adaptive"]:
        m, c = style[p.kind]
        draw([p], m, c, p.label, line=False)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps (equal sample budget)")
    ax.set_ylabel(f"final {task.loss_text}" + (f" - {f0:.4g}" if f0 else ""))
    finite = [v - f0 for p in out["fixed"] + out["control"] + out["adaptive"] for v in p.losses
              if math.isfinite(v)]
    if f0 or (finite and min(finite) > 0 and max(finite) / min(finite) > 3):
        ax.set_yscale("log")
    ax.set_title(f"{task.name}: N = {task.budget} samples, warm-up + cosine in samples; "
                 "median and range over seeds", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v: float) -> str:
    return fmt(100 * v, ".1f") + "%" if math.isfinite(v) else "n/a"


def goals(outs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for out in outs:
        task, comp = out["task"], out["comparisons"].get("default")
        text = f"{task.name}: the default policy is not dominated by a fixed batch"
        if comp is None:
            lines.append(common.goal_line(text, None, "no default-policy runs"))
            continue
        doms = comp["dominated_by"]
        lines.append(common.goal_line(
            text, not doms,
            "dominated by " + ", ".join(f"{f.label} ({f.steps:.0f} steps, loss {f.loss:.4g})"
                                        for f in doms) if doms else
            f"{out['adaptive'][0].steps:.0f} steps, loss {_loss(out['adaptive'][0])}"))
    for hg in outs:  # the designated candidates, and any task that meets the precondition
        if "default" not in hg["comparisons"]:
            continue
        name = hg["task"].name
        comp, model = hg["comparisons"]["default"], hg["models"]["default"]
        if name not in HIGH_GROWTH and not model["growth"] >= GROWTH_GOAL:
            continue
        saving = comp["vs_best"]
        lines.append(common.goal_line(
            f"{name}: >= {SAVING_GOAL:.0%} fewer steps than the best fixed batch of "
            "equal or better final loss",
            bool(math.isfinite(saving) and saving >= SAVING_GOAL),
            f"saving {_pct(saving)} against {comp['best'].label if comp['best'] else 'n/a'}; "
            "against the cheapest fixed batch of equal or better loss: "
            f"{_pct(comp['vs_matched'])}"))
        pred = model["pred"]
        met = None if not (math.isfinite(pred) and pred > 0) else bool(
            math.isfinite(saving) and saving >= PREDICTED_FRACTION_GOAL * pred)
        lines.append(common.goal_line(
            f"{name}: >= {PREDICTED_FRACTION_GOAL:.0%} of the model's predicted saving",
            met, f"predicted {_pct(pred)} (gamma {fmt(model['gamma'], '.2f')}), measured "
                 f"{_pct(saving)}" + ("" if met is not None else "; prediction not positive")))
        growth = model["growth"]
        lines.append(common.goal_line(
            f"{name}: the measured noise scale grows >= {GROWTH_GOAL:g}x over training "
            "(a precondition)", bool(math.isfinite(growth) and growth >= GROWTH_GOAL),
            f"adabatch/gns {fmt(model['first'], '.3g')} -> {fmt(model['last'], '.3g')}: "
            f"x{fmt(growth, '.3g')} in the default runs"))
    for out in outs:
        c = out["constant"]
        if c is None:
            continue
        a = c["adaptive"]
        lines.append(common.goal_line(
            f"{out['task'].name}: constant lr, steps to target from the smallest batch: no more "
            "than the best fixed batch at equal samples", c["met"],
            f"default policy {fmt(a['steps'], '.4g', 'inf')} steps / "
            f"{fmt(a['samples'], '.4g', 'inf')} samples ({a['reached']}/{a['n']} reached); "
            f"fixed frontier there {fmt(c['frontier_steps'], '.4g')} steps: saving "
            f"{fmt(100 * c['saving'], '.1f', '-inf')}%"))
    return lines


def render(outs: list[dict[str, Any]], args: argparse.Namespace, argv: list[str] | None,
           load_before: str, seconds: float, figures: dict[str, Path]) -> str:
    lines = [f"## {SECTION}: fixed vs adaptive batch at an equal sample budget", ""]
    lines += common.context_lines("equal_budget.py", argv, load_before)
    lines.append(f"- wall time of the benchmark: {seconds:.0f} s, CPU time {cpu_seconds():.0f} s "
                 f"(this process and its workers; jobs {args.jobs}; fixed runs "
                 f"{'reused from the cache' if args.reuse_fixed else 'run now'})")
    lines.append(
        f"- protocol: per task one sample budget N and one lr schedule in samples (linear "
        f"warm-up over {WARMUP:.0%} of N, cosine to 0 at N) for every run. Fixed batches: lr "
        f"tuned on seed {args.tune_seed} (grid x0.5/x1/x2 around a centre, extended while the "
        f"best is at an edge), then seeds {args.seeds} at the best. Control: the same runs "
        "with AdaptiveBatchSize as a monitor (fixed policy, ref_batch_size = B0, no lr rule), "
        "so the Adam betas^kappa / eps/sqrt(kappa) / weight-decay transforms apply (run where "
        "they exist: Adam-family tasks). Adaptive: from B0 at B0's tuned lr, ref_batch_size = "
        "B0, max batch = the largest fixed one, the library's default rules and estimator "
        "half-life (the control's monitor uses N/16); the critical-batch probe's replays are "
        "extra compute, not counted as steps (its cost is the 'probe overhead' column)")
    lines.append(
        "- 'beyond the seed spread' = the seed ranges [min, max] of the final loss do not "
        "overlap, or (runs paired by seed) the per-seed differences all have one sign. saving "
        "vs best = 1 - steps / steps of the best-loss fixed batch (fixed or "
        "control), counted only when the adaptive loss is equal or better. saving vs matched "
        "= against the fewest-step fixed batch whose loss is equal or better. dominated = a "
        "fixed batch with a lower loss beyond the spread in no more steps. 'loss - best fixed's"
        "' pairs the runs of one seed (same data order and initialisation): median [min, max] "
        "of the differences, for a sharper view than the unpaired ranges. Model: McCandlish "
        "et al. 2018 App. D from the measured B_simple of the run, gamma = "
        "<sqrt B_noise>^2/<B_noise> over progress (one step worth B/(B + B_noise)), E_min = "
        "sum of B_noise dS_min, predicted saving = 1 - (1 + gamma/x)/(1 + 1/x), x = N/E_min - 1")
    lines += ["", "### Goals", ""] + goals(outs)
    for out in outs:
        task: Task = out["task"]
        lo, hi = out["budget_range"]
        lines += ["", f"### {task.name}", "", f"- N = {task.budget} samples (runs used {lo} to "
                  f"{hi}: a run stops at the first step that reaches N); loss: {task.loss_text}"]
        lines += [f"- {n}" for n in task.notes]
        lines.append("- schedule check: largest |lr/lr0 - warmup_cosine(samples before the step)|"
                     f" over every step of every run: {fmt(out['schedule_error'], '.2g')}")
        lines.append(lr_scaling_line(out["best_lr"]))
        if task.name in figures:
            lines.append(f"- figure: `{_rel(figures[task.name])}`")
        measured = out["raw"].get("measured")
        if args.reuse_fixed and measured:
            lines.append(f"- fixed and control runs reused from `{measured['command']}` of "
                         f"{measured['date']} on {measured['device']}")
            for more in out["raw"].get("more_seeds", []):
                lines.append(f"- seeds {more['seeds']} of the fixed and control runs added by "
                             f"`{more['command']}` of {more['date']} on {more['device']}")
        for m in out.get("adaptive_measured") or []:
            lines.append(f"- adaptive runs of {', '.join(m['variants'])} reused from "
                         f"`{m['command']}` of {m['date']} (commit "
                         f"{m.get('commit', 'unknown')}) on {m['device']}")
        rows = []
        for p in out["fixed"] + out["control"]:
            growth = (out["fixed_growth"] if p.kind == "fixed" else out["control_growth"]).get(
                p.batch, math.nan)
            rows.append([p.label, fmt(p.lr, ".3g"), _loss(p), f"{p.steps:.0f}",
                         f"{p.wall:.2f}", fmt(growth, ".3g")])
        lines += ["", "Fixed frontier (evaluation seeds):", ""]
        lines.append(common.md_table(["batch", "lr", "final loss median [min, max]", "steps",
                                      "wall s", "B_simple growth (exact / measured)"], rows))
        rows = []
        for p in out["adaptive"]:
            c, m, e = out["comparisons"][p.kind], out["models"][p.kind], out["exact"][p.kind]
            over = [r["probe_overhead"] for r in p.runs if r["probe_overhead"] is not None]
            rows.append([
                p.label, fmt(p.lr, ".3g"), _loss(p), f"{p.steps:.0f}",
                median_range([r["batch_end"] for r in p.runs], ".0f"),
                _pct(c["vs_best"]) + (f" vs {c['best'].label}" if c["best"] else ""),
                _pct(c["vs_matched"]) + (f" vs {c['matched'].label}" if c["matched"] else ""),
                ", ".join(f.label for f in c["dominated_by"]) or "no",
                median_range(c.get("paired", []), "+.2g"),
                f"{fmt(m['first'], '.3g')} -> {fmt(m['last'], '.3g')} (x{fmt(m['growth'], '.3g')})",
                fmt(m["gamma"], ".2f") + (f" (exact {fmt(e['gamma'], '.2f')})"
                                          if math.isfinite(e["gamma"]) else ""),
                _pct(m["pred"]) + (f" (exact {_pct(e['pred'])})" if math.isfinite(e["gamma"])
                                   else ""),
                f"{p.wall:.2f}", median_range([100 * v for v in over], ".1f") + "%"
                if over else "not logged"])
        lines += ["", "Adaptive (evaluation seeds):", ""]
        lines.append(common.md_table(
            ["variant", "lr at B0", "final loss median [min, max]", "steps", "B at end",
             "saving vs best fixed", "saving vs matched fixed", "dominated by",
             "loss - best fixed's, per seed",
             "B_simple first -> last tenth", "gamma", "predicted saving", "wall s",
             "probe overhead"], rows))
        if out["adaptive_tuning"]:
            grid = sorted(out["adaptive_tuning"], key=lambda r: r["lr"])
            lines += ["", f"- {VARIANT_LABELS['default_tuned']}: its lr grid on seed "
                      f"{out['raw']['tune_seed']} (lr at B0: final loss): " + ", ".join(
                          f"{fmt(r['lr'], '.3g')}: {fmt(r['final_loss'], '.5g', 'diverged')}"
                          for r in grid)]
        c = out["constant"]
        if c is not None:
            lines += ["", f"Constant lr (each batch at its tuned lr, held constant), steps to "
                      f"loss <= {fmt(task.const_target, '.4g')} (medians over seeds; at most "
                      f"{CONST_BUDGET} N samples):", ""]
            rows = [[f"B={b}", fmt(v["lr"], ".3g"), fmt(v["steps"], ".4g", "inf"),
                     fmt(v["samples"], ".4g", "inf"), f"{v['reached']}/{v['n']}",
                     f"{v['wall']:.2f}"] for b, v in c["per_batch"].items()]
            a = c["adaptive"]
            rows.append([f"library default from B={task.batches[0]} (B at end "
                         f"{a['batch_end']:.0f})", fmt(a["lr"], ".3g"),
                         fmt(a["steps"], ".4g", "inf"), fmt(a["samples"], ".4g", "inf"),
                         f"{a['reached']}/{a['n']}", f"{a['wall']:.2f}"])
            lines.append(common.md_table(["run", "lr", "steps", "samples", "reached", "wall s"],
                                         rows))
        tuning = sorted(out["raw"]["tuning"], key=lambda r: (r["batch"], r["lr"]))
        lines += ["", f"lr tuning (seed {out['raw']['tune_seed']}):", ""]
        lines.append(common.md_table(
            ["B", "lr", "final loss", "best"],
            [[r["batch"], fmt(r["lr"], ".3g"), fmt(r["final_loss"], ".5g", "diverged"),
              "yes" if out["best_lr"][r["batch"]] == r["lr"] else ""] for r in tuning]))
    return "\n".join(lines)


def lr_scaling_line(best_lr: dict[int, float]) -> str:
    """How the tuned lr grows with the batch: the least-squares slope of log lr on log B over
    the fixed batches. About 1 (SGD) or 0.5 (Adam) where the gradient noise sets the lr (a
    larger batch buys a larger lr: room to trade samples for steps); about 0 where the
    curvature does (a larger batch only takes fewer steps of the same size)."""
    bs = sorted(best_lr)
    if len(bs) < 2:
        return "- tuned lr vs batch: one batch only"
    xs, ys = [math.log(b) for b in bs], [math.log(best_lr[b]) for b in bs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    ratios = ", ".join(f"{b}: {best_lr[b] / best_lr[bs[0]]:.3g}" for b in bs)
    return (f"- tuned lr vs batch: slope d log lr / d log B = {slope:.2f} over B = {bs[0]}.."
            f"{bs[-1]} (lr / lr(B={bs[0]}): {ratios}); ~1 (SGD) or ~0.5 (Adam): noise-limited, "
            "~0: curvature-limited (a larger batch cannot take a larger step)")


def _commit() -> str:
    """The checkout's short commit, ``+dirty`` when src/ has uncommitted changes."""
    import subprocess

    root = common.BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, text=True,
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished child processes."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


_rel = common.rel_path


def provenance(saved_adaptive: dict[str, Any]) -> list[dict[str, Any]]:
    """The cached adaptive runs' provenance, one entry per command, each naming the variants
    it ran (a cache written before entries named them: every variant in its runs)."""
    measured = saved_adaptive["measured"]
    if isinstance(measured, dict):
        kinds = [v for v in VARIANTS if any(r["kind"] == v for r in saved_adaptive["runs"])]
        measured = [{**measured, "variants": kinds}]
    return measured


# ============================================================================ main
def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny noise-floor task, one seed, two variants (seconds)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="evaluation seeds (default 1 2 3 4 5; --quick: 1)")
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="parallel runs (processes)")
    ap.add_argument("--reuse-fixed", action="store_true",
                    help="read the fixed and control runs from --data instead of running them")
    ap.add_argument("--reuse-adaptive", action="store_true",
                    help="with --reuse-fixed: re-analyse the cached adaptive runs too")
    ap.add_argument("--replace-variants", action="store_true",
                    help="run --variants again and keep the cached runs of the others")
    ap.add_argument("--fixed-only", action="store_true",
                    help="run and cache the fixed and control runs only (no report)")
    ap.add_argument("--data", type=Path, default=None,
                    help="directory of the cached runs (default benchmarks/data; --quick: none)")
    ap.add_argument("--results", type=Path, default=None,
                    help="RESULTS.md to write to (default benchmarks/RESULTS.md; --quick: none)")
    ap.add_argument("--figures", type=Path, default=None,
                    help="directory for PNGs (default benchmarks/figures; --quick: none)")
    args = ap.parse_args(argv)
    if args.tasks is None:
        args.tasks = [HIGH_GROWTH[0]] if args.quick else list(TASKS)
    if args.seeds is None:
        args.seeds = [1] if args.quick else [1, 2, 3, 4, 5]
    if args.variants is None:
        args.variants = ["default", "ramp"] if args.quick else list(DEFAULT_VARIANTS)
    if not args.quick:
        args.data = args.data or DATA_DIR
        args.results = args.results or common.DEFAULT_RESULTS
        args.figures = args.figures or common.FIGURES_DIR
    if (args.reuse_adaptive or args.replace_variants) and not args.reuse_fixed:
        ap.error("--reuse-adaptive and --replace-variants need --reuse-fixed")
    if args.reuse_adaptive and args.replace_variants:
        ap.error("--reuse-adaptive runs nothing; --replace-variants reruns --variants")
    if args.reuse_fixed and args.data is None:
        ap.error("--reuse-fixed needs --data (or a full run)")
    if args.jobs < 1:
        ap.error(f"--jobs={args.jobs} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse(argv)
    common.quiet_lightning()
    load_before = common.load_average()
    t0 = time.perf_counter()
    outs = []

    def log(s: str) -> None:
        print(s, flush=True)

    for name in args.tasks:
        task = get_task(name, args.quick)
        path = None if args.data is None else Path(args.data) / f"equal_budget_{name}.json"
        if args.reuse_fixed:
            saved = json.loads(path.read_text())
            if saved["key"] != config_key(task):
                raise SystemExit(f"{path} was measured with another task configuration; "
                                 "rerun without --reuse-fixed")
            fixed = saved["fixed"]
            missing = [s for s in args.seeds if s not in fixed["seeds"]]
            if missing:  # more evaluation seeds: the tuned lrs, the new seeds' runs only
                log(f"== {name}: fixed runs of seeds {missing} at the tuned lrs")
                fixed = extend_seeds(task, args.quick, fixed, missing, args.jobs, log, argv)
            if task.const_target is not None and "constant" not in fixed:
                fixed["constant"] = run_constant_fixed(task, args.quick, fixed, args.jobs, log)
            if missing or "constant" not in saved["fixed"]:
                path.write_text(json.dumps({"key": config_key(task), "fixed": fixed}, indent=1))
            fixed = select_seeds(fixed, args.seeds)
        else:
            log(f"== {name}: fixed batches {task.batches}, N = {task.budget}")
            fixed = tune_and_run_fixed(task, args.quick, args.tune_seed, args.seeds, args.jobs,
                                       log)
            fixed["measured"] = {"date": common.now(), "device": common.device_line(),
                                 "command": common.command_line("equal_budget.py", argv)}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"key": config_key(task), "fixed": fixed}, indent=1))
        if args.fixed_only:
            continue
        apath = None if path is None else path.with_name(f"equal_budget_{name}_adaptive.json")
        adaptive_measured: list[dict[str, Any]] = []
        if args.reuse_adaptive or args.replace_variants:
            saved_adaptive = json.loads(apath.read_text())
            if saved_adaptive.get("key") != config_key(task):
                raise SystemExit(f"{apath} was measured with another task configuration or "
                                 "data; rerun without --reuse-adaptive / --replace-variants")
            adaptive, adaptive_measured = saved_adaptive["runs"], provenance(saved_adaptive)
            # the evaluation seeds only (the cache may hold more); the lr grid's runs stay
            adaptive = [r for r in adaptive if r.get("tuning") or r["seed"] in args.seeds]
        if not args.reuse_adaptive:
            log(f"== {name}: adaptive {args.variants}")
            fresh = run_adaptive(task, args.quick, fixed, args.seeds, args.variants,
                                 args.jobs, log)
            measured = {"date": common.now(), "device": common.device_line(),
                        "command": common.command_line("equal_budget.py", argv),
                        "commit": _commit(), "variants": list(args.variants)}
            if args.replace_variants:  # the other variants' cached runs stay
                adaptive = [r for r in adaptive if r["kind"] not in args.variants] + fresh
                adaptive_measured = [
                    {**m, "variants": [v for v in m["variants"] if v not in args.variants]}
                    for m in adaptive_measured]
                adaptive_measured = [m for m in adaptive_measured if m["variants"]]
            else:
                adaptive = fresh
            if apath is not None:
                apath.write_text(json.dumps({"measured": adaptive_measured + [measured],
                                             "key": config_key(task), "runs": adaptive},
                                            indent=1))
        outs.append(analyze(task, fixed, adaptive))
        outs[-1]["adaptive_measured"] = adaptive_measured
    seconds = time.perf_counter() - t0
    if args.fixed_only:
        print(f"fixed runs cached in {args.data} ({seconds:.0f} s, CPU {cpu_seconds():.0f} s)")
        return outs
    figures: dict[str, Path] = {}
    if args.figures is not None:
        for out in outs:
            figures[out["task"].name] = Path(args.figures) / f"equal_budget_{out['task'].name}.png"
            plot(out, figures[out["task"].name])
    text = render(outs, args, argv, load_before, seconds, figures)
    common.publish(text, args.results, SECTION)
    return outs


if __name__ == "__main__":
    main()
