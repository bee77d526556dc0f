"""`AdaptiveBatchSize`: the Lightning callback that wires probes, estimator, policy and rules.

This module holds no maths: it decides the order of things within a training step and keeps
their state. See ARCHITECTURE.md for the data flow. Per optimizer step:

1. ``on_train_batch_start``: restore hyperparameters (defensive, after an AMP-skipped step),
   tell the probe the loss scale of the coming backward, count the micro-batch.
2. ``on_before_optimizer_step``: the accumulated, all-reduced, unscaled ``.grad`` is the big
   batch gradient; one all-reduce of five scalars gives every rank the same small-batch
   statistics; the estimator is updated; the scaling factors are applied to the optimizer.
3. optimizer step; a step post-hook restores the user's hyperparameters.
4. ``on_train_batch_end``: count samples, decide the next batch size, resize (at an aligned
   boundary), log, stop at ``max_samples``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, Literal

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size

from adabatch import validation as check
from adabatch.branch import BranchRunner
from adabatch.control.apply import OptimizerScaler
from adabatch.control.policy import BatchBounds, CriticalBatchPolicy, Observation, Policy
from adabatch.control.resize import (
    Split,
    can_change_accumulation,
    check_layout_unchanged,
    refuse_other_layout_writers,
    split_global_batch,
)
from adabatch.control.restart import repair_epoch_end_restart
from adabatch.control.rules import ScalingRules, adascale_gain
from adabatch.noise.estimator import GNSEstimator
from adabatch.noise.microbatch import MicroBatchGradNorms
from adabatch.noise.per_example import PerExampleGradNorms
from adabatch.noise.step_stats import (
    SKIP_NO_NORMS,
    SKIP_NO_SMALL_BATCH,
    StepStats,
    big_batch_sq_norm,
    reduce_step_stats,
)
from adabatch.progress import split_progress_metrics, sync_train_total
from adabatch.state import STATE_VERSION, validate_state
from adabatch.summary import RunSummary, print_summary
from adabatch.types import Count

NoiseSource = Literal["auto", "per_example", "microbatch"]
ResizeMode = Literal["auto", "accumulate", "sampler"]

_MIN_EFFECTIVE_STEPS = 8.0
# The default half-life of the estimator: this fraction of the samples so far, and at least
# this many steps of the current batch.
DEFAULT_HALF_LIFE_FRACTION = 0.0625
_MIN_HALF_LIFE_STEPS = 16
_NOISE_SOURCES = ("auto", "per_example", "microbatch")
_RESIZE_MODES = ("auto", "accumulate", "sampler")


class AdaptiveBatchSize(Callback):
    """Adapt the global batch size to the measured critical batch and gradient noise scale.

    Args:
        enabled: when False the callback does nothing at all (LightningCLI always builds it).
        policy: what batch size to aim for, an :class:`~adabatch.control.policy.Policy`
            (default :class:`~adabatch.control.policy.CriticalBatchPolicy`: the measured
            critical batch, grown like its square root). In a LightningCLI config:
            ``policy: {class_path: adabatch.control.policy.NoisePolicy, init_args: {...}}``;
            a user's subclass works the same way. A policy instance belongs to one callback.
        noise: where small-batch gradient statistics come from: ``per_example`` (module
            hooks, b = 1), ``microbatch`` (parameter hooks, b = micro-batch per rank) or
            ``auto`` (per-example when the probe covers every parameter, else micro-batch).
        rules: how hyperparameters follow the batch
            (:class:`~adabatch.control.rules.ScalingRules`; default: lr by the saturating
            AdaScale gain, Adam betas/eps and AdamW weight decay scaled).
        ref_batch_size: the global batch size at which the optimizer's hyperparameters were
            tuned (B_ref); the rules use kappa = B / B_ref. Defaults to the starting
            global batch size, with a warning.
        min_batch_size: smallest global batch size (default: the starting one).
        max_batch_size: largest global batch size (default: 64 x the starting one).
        max_samples: stop training after this many samples (a budget in data, not steps).
        resize: ``accumulate`` (micro-batch fixed, change ``accumulate_grad_batches``),
            ``sampler`` (grow the micro-batch through a `ResizableBatchSampler`) or ``auto``
            (grow the micro-batch up to ``max_micro_batch``, then accumulate).
        max_micro_batch: cap on the per-rank micro-batch in ``sampler``/``auto`` modes.
        half_life_samples: half-life of the noise-scale estimator's EMAs, in samples.
            Default (``None``): a sixteenth of the samples trained so far, and at least
            ``16`` steps of the current batch: the estimate then follows a noise scale that
            grows with training progress. A longer window errs silently: ``|G|^2`` falls by
            orders of magnitude as training converges and old, large values dominate the
            EMA (a quarter of the samples kept the lower bound at ~7 against an exact ~10^4
            on least squares at its noise floor; a sixteenth let it grow to ~250), while the
            variance of a short one is measured and enters the policy's lower bound.
        log_every_n_steps: log ``adabatch/*`` metrics every this many optimizer steps
            (default: the trainer's ``log_every_n_steps``).

    Raises:
        ValueError: on a bad argument, naming it and its value.

    Example::

        >>> from adabatch.control.policy import NoisePolicy
        >>> cb = AdaptiveBatchSize(policy=NoisePolicy(scale=0.5, exponent=0.5),
        ...                        ref_batch_size=64, max_samples=1e6)
        >>> cb.max_samples, type(cb.policy).__name__
        (1000000, 'NoisePolicy')
    """

    def __init__(
        self,
        enabled: bool = True,
        policy: Policy | None = None,
        noise: NoiseSource = "auto",
        rules: ScalingRules | None = None,
        ref_batch_size: Count | None = None,
        min_batch_size: Count | None = None,
        max_batch_size: Count | None = None,
        max_samples: Count | None = None,
        resize: ResizeMode = "accumulate",
        max_micro_batch: Count | None = None,
        half_life_samples: float | None = None,
        log_every_n_steps: Count | None = None,
    ) -> None:
        super().__init__()
        self.enabled = check.flag("enabled", enabled)
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(
                f"policy={policy!r} must be an adabatch.control.policy.Policy (e.g. "
                "CriticalBatchPolicy(), NoisePolicy(scale=0.25), RampPolicy(ramp_samples=...))"
            )
        self.policy: Policy = policy if policy is not None else CriticalBatchPolicy()
        self.noise = check.choice("noise", noise, _NOISE_SOURCES)
        if rules is not None and not isinstance(rules, ScalingRules):
            raise ValueError(f"rules={rules!r} must be an adabatch.control.rules.ScalingRules")
        self.rules = rules if rules is not None else ScalingRules()
        self.ref_batch_size = check.count("ref_batch_size", ref_batch_size, optional=True)
        self.min_batch_size = check.count("min_batch_size", min_batch_size, optional=True)
        self.max_batch_size = check.count("max_batch_size", max_batch_size, optional=True)
        if min_batch_size is not None and max_batch_size is not None:
            if min_batch_size > max_batch_size:
                raise ValueError(
                    f"min_batch_size={min_batch_size} must be <= max_batch_size={max_batch_size}"
                )
        self.max_samples = check.count("max_samples", max_samples, optional=True)
        self.resize = check.choice("resize", resize, _RESIZE_MODES)
        self.max_micro_batch = check.count("max_micro_batch", max_micro_batch, optional=True)
        self.half_life_samples = check.number(
            "half_life_samples", half_life_samples, 0.0, strict=True, optional=True
        )
        self.log_every_n_steps = check.count(
            "log_every_n_steps", log_every_n_steps, optional=True
        )
        self._reset_run_state()

    # ------------------------------------------------------------------ state
    def _reset_run_state(self) -> None:
        """Forget everything about a run; setup() calls it, so a callback can fit twice.

        Nothing here is a tensor: one made in ``__init__`` would be shared by ddp_spawn ranks.
        """
        self.samples = 0
        self.steps = 0
        self.history: list[dict[str, float]] = []
        self._estimator: GNSEstimator | None = None
        self._bound = False  # policy bound to this run's bounds
        self._branch: BranchRunner | None = None
        self._loss_sum: torch.Tensor | None = None  # this step's micro-batch losses
        self._loss_batches = 0
        self._new_step = True  # the next micro-batch starts an optimizer step
        self._lr0: float | None = None  # the user's initial lr (first param group)
        self._last_probe: Any = None  # the last ProbeResult (for logging)
        self._scaler: OptimizerScaler | None = None
        self._probe: PerExampleGradNorms | MicroBatchGradNorms | None = None
        self._source: str | None = None
        self._sampler: Any = None
        self._unwrap: Any = None  # undoes _wrap_optimizer_step
        self._world = 1
        self._micro0: int | None = None  # per-rank micro-batch at the start of the run
        self._start: int | None = None  # global batch at the start of the run
        self._ref: int | None = self.ref_batch_size
        self._target: int | None = None  # global batch size decided
        self._split: Split | None = None  # layout in force
        self._pending: Split | None = None  # layout waiting for an aligned boundary
        self._local_samples = 0
        self._local_batches = 0
        self._step_stats: dict[str, float] | None = None
        self._t_last: float | None = None
        self._restored: dict[str, Any] | None = None
        self._big_params: list[torch.nn.Parameter] = []
        self._big_params_key: tuple[str, ...] | None = None
        self.run_summary: RunSummary | None = None  # set when training ends (summary.py)
        self._t_train: float | None = None

    @property
    def estimator(self) -> GNSEstimator | None:
        """The noise-scale estimator (None before ``setup``)."""
        return self._estimator

    @property
    def batch_size(self) -> int | None:
        """The global batch size in force (None before the first batch)."""
        return self._target

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "samples": self.samples,
            "steps": self.steps,
            "history": list(self.history),
            "micro0": self._micro0,
            "start": self._start,
            "ref_batch_size": self._ref,
            "target": self._target,
            "split": None if self._split is None else [self._split.micro, self._split.accumulation],
            "pending": None
            if self._pending is None
            else [self._pending.micro, self._pending.accumulation],
        }
        if self._estimator is not None:
            state["estimator"] = self._estimator.state_dict()
        if self._bound:
            state["policy"] = self.policy.state_dict()
        if self._branch is not None:
            state["branch"] = self._branch.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.enabled or not state_dict:
            return
        # Checked whole before any of it is kept (adabatch/state.py): a bad field is refused
        # here, naming it, never half-applied. Applied in on_train_start: the trainer,
        # optimizer and loader exist only then.
        state = validate_state(state_dict)
        # The policy's and the probe's own fields: checked on throw-away copies now, so a
        # bad one is refused here too (they are applied in on_train_start).
        if "policy" in state:
            trial = copy.deepcopy(self.policy)
            trial.bind(BatchBounds(1, 1 << 40))
            trial.load_state_dict(state["policy"])
        if "branch" in state and self.policy.probe is not None:
            BranchRunner(self.policy.probe).load_state_dict(state["branch"])
        self._restored = state
        self.samples = state["samples"]
        self.steps = state["steps"]
        self.history = state["history"]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "AdaptiveBatchSize needs automatic optimization: with manual optimization "
                "Lightning does not accumulate or step for it. Set enabled=False or use "
                "automatic optimization."
            )
        if self.resize in ("sampler", "auto"):
            limit = trainer.limit_train_batches
            if isinstance(limit, float) and limit != 1.0:
                raise MisconfigurationException(
                    f"limit_train_batches={limit} is a fraction, which needs a loader length; "
                    f"resize={self.resize!r} uses a ResizableBatchSampler without one. Use an "
                    "int or 1.0."
                )
        refuse_other_layout_writers(trainer)
        self._reset_run_state()  # load_state_dict, on resume, comes after setup
        self._world = trainer.world_size
        self._estimator = GNSEstimator(self.half_life_samples or _MIN_HALF_LIFE_STEPS)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.enabled:
            return
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"AdaptiveBatchSize supports exactly one optimizer, got {len(trainer.optimizers)}"
            )
        self._scaler = OptimizerScaler(
            trainer.optimizers[0],
            lr_rule=self.rules.lr,
            scale_betas=self.rules.betas,
            scale_eps=self.rules.eps,
            scale_weight_decay=self.rules.weight_decay,
            max_lr_factor=self.rules.max_lr_factor,
        )
        group = trainer.optimizers[0].param_groups[0]
        self._lr0 = float(group.get("initial_lr", group["lr"]))
        probe = self.policy.probe
        self._branch = None if probe is None else BranchRunner(probe, self._world)
        # Found in accumulate mode too: its position is then kept up to date for resume.
        self._sampler = _find_resizable_sampler(trainer)
        if self._sampler is None and self.resize in ("sampler", "auto"):
            raise MisconfigurationException(
                f"resize={self.resize!r} needs the train DataLoader to use "
                "batch_sampler=adabatch.ResizableBatchSampler(...) (and, under DDP, "
                "Trainer(use_distributed_sampler=False)); or use resize='accumulate'."
            )
        if self._sampler is not None and not hasattr(trainer.train_dataloader, "state_dict"):
            rank_zero_warn(
                "adabatch: the ResizableBatchSampler sits in a plain DataLoader, whose position "
                "Lightning does not checkpoint; a run resumed mid-epoch restarts that epoch. "
                "Use adabatch.data.ResizableDataLoader for an exact resume."
            )
        self._wrap_optimizer_step(trainer)
        self._attach_probe(trainer, pl_module)
        repair_epoch_end_restart(trainer)  # before the epoch loop starts (control/restart.py)
        if self._restored is not None:
            self._apply_restored(trainer)
        self._t_last = None
        self._t_train = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.enabled:  # before _teardown: the summary reads the probe's coverage
            self.run_summary = RunSummary.from_trainer(trainer, self, t_start=self._t_train)
        self._teardown()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.enabled and self.run_summary is not None:
            print_summary(self.run_summary)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.enabled and self._t_train is not None:
            self.run_summary = RunSummary.from_trainer(
                trainer, self, exception=exception, t_start=self._t_train
            )
            print_summary(self.run_summary)
        self._teardown()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._teardown()

    def _wrap_optimizer_step(self, trainer: Any) -> None:
        """Restore the user's hyperparameters right after every optimizer step, skipped or not.

        The step post-hook does not run when AMP's GradScaler skips a step (inf/NaN
        gradients), and Lightning steps the LR schedulers before the next batch starts: they
        would step on scaled values, and a checkpoint could save them. The precision plugin's
        ``optimizer_step`` returns in both cases, so restore there as well.
        """
        plugin = trainer.strategy.precision_plugin
        original = plugin.optimizer_step

        def optimizer_step(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                if self._scaler is not None:
                    self._scaler.restore()

        plugin.optimizer_step = optimizer_step
        self._unwrap = lambda: plugin.__dict__.pop("optimizer_step", None)

    def _teardown(self) -> None:
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None
        if self._probe is not None:
            self._probe.detach()
            self._probe = None
        if self._scaler is not None:
            self._scaler.restore()
            self._scaler.close()
            self._scaler = None

    def _attach_probe(self, trainer: Any, pl_module: Any) -> None:
        """Choose and attach the probe; say plainly, once, what is measured and what is not."""
        self._warned: set[str] = set()
        self._covered_fraction = 0.0
        # A small batch below the global one exists for micro-batch statistics only with
        # several ranks or accumulation (the policy may add accumulation later).
        small_batch = self._world > 1 or trainer.accumulate_grad_batches > 1
        compiled = _compiled_modules(pl_module)
        source = self.noise
        if source == "auto":
            probe = PerExampleGradNorms(pl_module, loss_reduction="mean")
            probe.attach()
            if compiled:
                # Module hooks do not fire inside a compiled graph; parameter tensor hooks
                # (the micro-batch probe) do (tests/test_measurement_e2e.py).
                probe.detach()
                source = "microbatch"
                rank_zero_info(
                    f"adabatch: noise='auto' uses micro-batch statistics: {compiled[0]!r} is "
                    "torch.compile'd, and the per-example probe's module hooks do not fire in "
                    "a compiled graph"
                )
            elif not probe.uncovered:
                self._probe, self._source = probe, "per_example"
                self._covered_params(pl_module)
                return
            elif small_batch or not probe.covered:
                probe.detach()
                source = "microbatch"
                rank_zero_info(
                    f"adabatch: noise='auto' uses micro-batch statistics: the per-example probe "
                    f"does not cover {len(probe.uncovered)} parameter(s) "
                    f"(e.g. {probe.uncovered[0]})"
                )
            else:
                # No small batch for micro-batch statistics: measure the covered subset, which
                # predicts the whole model's noise scale well (Gray et al. 2024).
                self._probe, self._source = probe, "per_example"
                self._covered_params(pl_module)
                rank_zero_warn(
                    "adabatch: noise='auto' measures the noise scale over the parameters the "
                    f"per-example probe covers only ({self._covered_fraction:.1%} of the "
                    f"trainable parameters; not measured: {_names(probe.uncovered)}): one "
                    "device and no accumulation leave no small batch for micro-batch "
                    "statistics. Logged as adabatch/covered_fraction."
                )
                return
        if source == "per_example":
            self._probe = PerExampleGradNorms(pl_module, loss_reduction="mean")
            self._probe.attach()
            self._source = source
            self._covered_params(pl_module)
            if compiled:
                rank_zero_warn(
                    f"adabatch: noise='per_example' on a torch.compile'd module ({compiled[0]!r})"
                    ": its module hooks do not fire in a compiled graph, so no step will be "
                    "measured. Use noise='microbatch' (or 'auto') with accumulation or several "
                    "devices."
                )
            elif not self._probe.covered:
                rank_zero_warn(
                    "adabatch: NOTHING IS MEASURED: the per-example probe covers no parameter "
                    f"({_names(self._probe.uncovered)}). Use noise='microbatch' with "
                    "accumulation or several devices."
                )
            elif self._probe.uncovered:
                rank_zero_warn(
                    "adabatch: the noise scale is measured over the parameters the per-example "
                    f"probe covers only ({self._covered_fraction:.1%} of the trainable "
                    f"parameters; not measured: {_names(self._probe.uncovered)}). Logged as "
                    "adabatch/covered_fraction."
                )
            return
        self._probe = MicroBatchGradNorms(pl_module)
        self._probe.attach()
        self._source = "microbatch"
        self._covered_params(pl_module)
        if not small_batch:
            self._warned.add(SKIP_NO_SMALL_BATCH)
            rank_zero_warn(
                "adabatch: NOTHING IS MEASURED yet: micro-batch statistics need a small batch "
                "below the global batch (accumulation or several devices), and this run has "
                "one device and no accumulation. The noise scale stays unmeasured until the "
                "layout changes; use noise='per_example' or accumulate_grad_batches > 1."
            )

    def _apply_restored(self, trainer: Any) -> None:
        state = self._restored or {}
        self._restored = None
        if self._estimator is not None and "estimator" in state:
            self._estimator.load_state_dict(state["estimator"])
        self._micro0 = state.get("micro0")
        self._start = state.get("start")
        if self._start is None and self._micro0 is not None:  # a checkpoint from before 0.1
            self._start = self._micro0 * self._world
        saved_ref = state.get("ref_batch_size")
        if self.ref_batch_size is None:
            self._ref = saved_ref if saved_ref is not None else self._ref
        elif saved_ref is not None and saved_ref != self.ref_batch_size:
            # The constructor's explicit value wins: it is the user's current statement of
            # where the hyperparameters were tuned (the LR then changes at the resume).
            rank_zero_warn(
                f"adabatch: ref_batch_size={self.ref_batch_size} differs from the checkpoint's "
                f"{saved_ref}; using {self.ref_batch_size}: the scaled hyperparameters change "
                "from the resumed step on"
            )
        if self._micro0 is not None and self._start is not None:
            self._build_policy()
        if self._bound and "policy" in state:
            self.policy.load_state_dict(state["policy"])
        elif self._bound and "decider" in state:  # a version-1 checkpoint
            self.policy.load_state_dict({"decider": state["decider"]})
        if self._branch is not None and "branch" in state:
            self._branch.load_state_dict(state["branch"])
        self._target = state.get("target")
        split = state.get("split")
        pending = state.get("pending")
        self._split = None if split is None else Split(*split)
        self._pending = None if pending is None else Split(*pending)
        if self._split is not None:
            trainer.accumulate_grad_batches = self._split.accumulation
            if self._sampler is not None and self._sampler.batch_size != self._split.micro:
                self._sampler.set_batch_size(self._split.micro)  # a loader Lightning can't restore

    def _build_policy(self) -> None:
        """Bounds from the run's *starting* batch (restored on resume, since the layout in
        force may have changed since), handed to the policy."""
        assert self._micro0 is not None and self._start is not None
        start = self._start
        granularity = self._micro0 * self._world
        lo = self.min_batch_size if self.min_batch_size is not None else start
        hi = self.max_batch_size if self.max_batch_size is not None else 64 * start
        if self.resize == "sampler" and self.max_micro_batch is not None:
            hi = min(hi, self.max_micro_batch * self._world)
        try:
            bounds = BatchBounds(lo, hi, granularity)
        except ValueError as err:
            raise MisconfigurationException(
                f"adabatch: the batch-size bounds cannot be honoured with a starting global "
                f"batch of {start} (micro-batch {self._micro0} x {self._world} rank(s)): {err}"
            ) from None
        if not bounds.lo <= start <= bounds.hi:
            raise MisconfigurationException(
                f"adabatch: the starting global batch {start} lies outside "
                f"[min_batch_size={bounds.lo}, max_batch_size={bounds.hi}]; change the "
                "DataLoader's batch size or the bounds"
            )
        self.policy.bind(bounds)
        self._bound = True

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or self._probe is None:
            return
        if self._scaler is not None:
            self._scaler.restore()  # a step skipped by AMP skips the post-hook
        n = extract_batch_size(batch)
        if self._micro0 is None:
            self._micro0 = n
            self._split = Split(n, trainer.accumulate_grad_batches)
            start = n * trainer.accumulate_grad_batches * self._world
            self._start = self._target = start
            if self._ref is None:
                self._ref = start
                if self.rules.lr != "none":
                    rank_zero_warn(
                        f"adabatch: ref_batch_size not set; scaling rules are relative to the "
                        f"starting global batch size {start}. Set ref_batch_size to the batch "
                        "at which your hyperparameters were tuned."
                    )
            self._build_policy()
        self._local_samples += n
        self._local_batches += 1
        if self._branch is not None:
            self._branch.collect_eval(batch)
            self._branch.record(batch, trainer.optimizers[0], self._new_step)
        self._new_step = False
        # Lightning divides the loss by k; AMP multiplies it by the scaler's scale.
        scale = 1.0 / trainer.accumulate_grad_batches
        amp_scaler = getattr(trainer.precision_plugin, "scaler", None)
        if amp_scaler is not None and amp_scaler.is_enabled():
            scale *= float(amp_scaler.get_scale())
        self._probe.grad_scale = scale
        if isinstance(self._probe, PerExampleGradNorms):
            # The batch dimension of each call is the one of this size (sequence-first
            # layouts are then exact).
            self._probe.batch_size = n

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self.enabled or self._probe is None or self._estimator is None:
            return
        stats = self._measure(trainer, pl_module)
        batch = int(stats.samples)
        # Counted here, not in on_train_batch_end: Lightning steps a step-interval LR scheduler
        # between the two, and a schedule reading ``samples`` must see this step's samples.
        self.samples += batch
        self._notify_ema(trainer, batch)
        accepted = False
        if stats.skip is None:
            if self.half_life_samples is None:
                self._estimator.half_life_samples = default_half_life(self.samples, batch)
            accepted = self._estimator.update(stats.small_sq, stats.b, stats.big_sq, batch)
        else:
            self._estimator.record_skip()  # never reaches the estimate; counted
            self._on_unmeasured(pl_module, stats)
        self._step_stats = {
            # the decision gate in on_train_batch_end reads these two: finite unless the
            # gradients are (an unmeasured step has no small-batch value to be non-finite)
            "small_sq": stats.small_sq if stats.skip is None else 0.0,
            "big_sq": stats.big_sq,
            "b": stats.b,
            "samples": stats.samples,
            "step_time": stats.step_time,
            "accepted": float(accepted),
        }
        factors = self._apply_factors(batch)
        self._step_stats["lr_factor"] = float(factors.get("lr_factor", 1.0))

    def _on_unmeasured(self, pl_module: Any, stats: StepStats) -> None:
        """Warn once per reason; under ``noise='auto'`` fall back to micro-batch statistics
        when the per-example probe records nothing (e.g. a compiled graph)."""
        assert stats.skip is not None
        fallback = (stats.skip == SKIP_NO_NORMS and self.noise == "auto"
                    and self._source == "per_example")
        if fallback:
            assert self._probe is not None
            self._probe.detach()
            self._probe = MicroBatchGradNorms(pl_module).attach()
            self._source = "microbatch"
            self._covered_params(pl_module)
        if stats.skip in self._warned:
            return
        self._warned.add(stats.skip)
        what = {"per_example": "per-example", "microbatch": "micro-batch"}
        rank_zero_warn(
            f"adabatch: step {self.steps} NOT MEASURED: {stats.skip} (probe "
            f"{'per_example' if fallback else self._source}: {stats.count:.0f} small batches "
            f"recorded for {stats.samples:.0f} samples in {stats.batches:.0f} micro-batches). "
            "Such steps are skipped and counted (adabatch/skipped_steps)."
            + (f" noise='auto' now uses {what['microbatch']} statistics." if fallback else "")
        )

    def _measure(self, trainer: Any, pl_module: Any) -> StepStats:
        """The step's statistics (`adabatch.noise.step_stats`), identical on every rank."""
        assert self._probe is not None
        small = self._probe.sq_norms
        self._probe.reset()
        device = pl_module.device
        big_sq = big_batch_sq_norm(self._covered_params(pl_module), device=device)
        # Step time, from this point of the previous step (None across a validation run).
        now = time.perf_counter()
        elapsed = 0.0 if self._t_last is None else now - self._t_last
        self._t_last = now
        stats = reduce_step_stats(
            small,
            per_example=self._source == "per_example",
            local_samples=self._local_samples,
            local_batches=self._local_batches,
            big_sq=big_sq,
            accumulation=trainer.accumulate_grad_batches,
            elapsed=elapsed,
            world_size=self._world,
            all_reduce_fn=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
        )
        self._local_samples = 0
        self._local_batches = 0
        return stats

    def _covered_params(self, pl_module: Any) -> list[torch.nn.Parameter]:
        """The parameters whose big-batch gradient matches the small-batch statistics (and
        their fraction of the trainable parameter count, ``_covered_fraction``)."""
        if self._source == "per_example":
            covered = tuple(self._probe.covered)  # type: ignore[union-attr]
        else:
            covered = tuple(n for n, p in pl_module.named_parameters() if p.requires_grad)
        if covered != self._big_params_key:
            named = dict(pl_module.named_parameters())
            self._big_params = [named[n] for n in covered]
            self._big_params_key = covered
            total = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            self._covered_fraction = (
                sum(p.numel() for p in self._big_params) / total if total else 0.0
            )
        return self._big_params

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or self._probe is None:
            return
        self._add_loss(outputs)
        if self._step_stats is None:
            return  # still accumulating
        stats, self._step_stats = self._step_stats, None
        self._new_step = True
        batch_size = int(stats["samples"])
        # The layout this step ran with (logged), before a decision changes the trainer's: the
        # micro-batch it read and the micro-batches in its window (a short last one included).
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        stats["micro"] = float(extract_batch_size(batch))
        stats["accumulation"] = float(done % trainer.accumulate_grad_batches
                                      or trainer.accumulate_grad_batches)
        self.steps += 1
        if self._sampler is not None:
            self._sampler.advance(batch_size)
        step_time = stats["step_time"]
        throughput = batch_size / step_time if step_time > 0 else None
        loss = self._step_loss(trainer)
        finite = math.isfinite(stats["big_sq"]) and math.isfinite(stats["small_sq"])
        if finite:
            obs = self._observe(batch_size, throughput, loss, trainer)
            if not self._probe_step(trainer, pl_module, obs):
                self._decide(obs)
        self._apply_pending(trainer)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if self.steps % every == 0:
            self._log(pl_module, stats)
        if self.max_samples is not None and self.samples >= self.max_samples:
            trainer.should_stop = True
        if self.max_samples is not None and self._split is not None:
            sync_train_total(trainer, batch_idx=batch_idx, micro_batch=self._split.micro,
                             samples_left=self.max_samples - self.samples, sampler=self._sampler)

    def _add_loss(self, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().double()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_batches += 1

    def _step_loss(self, trainer: Any) -> float | None:
        """The step's mean training loss over the micro-batches and ranks (``None``: none)."""
        if self._loss_sum is None:
            return None
        # Lightning's outputs hold loss / k: undo it, over the micro-batches actually seen.
        loss = self._loss_sum * (trainer.accumulate_grad_batches / self._loss_batches)
        self._loss_sum, self._loss_batches = None, 0
        return float(trainer.strategy.reduce(loss, reduce_op="mean"))

    def _observe(
        self, batch_size: int, throughput: float | None, loss: float | None, trainer: Any
    ) -> Observation:
        est = self._estimator
        assert est is not None
        # A spread measured over a handful of steps is itself too noisy to vouch for the
        # estimate: report no uncertainty (untrusted) until the EMA holds enough steps.
        settled = est.effective_sample_size >= _MIN_EFFECTIVE_STEPS
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        last = self._last_probe
        return Observation(
            samples=self.samples,
            steps=self.steps,
            batch_size=batch_size,
            gns=est.gns,
            gns_rel_std=est.gns_rel_std if settled else None,
            throughput=throughput,
            loss=loss,
            lr_factor=float(lr) / self._lr0 if self._lr0 else None,
            critical_batch=None if last is None else last.critical_batch,
        )

    def _probe_step(self, trainer: Any, pl_module: Any, obs: Observation) -> bool:
        """Advance the critical-batch probe; True while its window is open (batch held)."""
        branch = self._branch
        if branch is None:
            return False
        optimizer = trainer.optimizers[0]
        if branch.window is not None:
            if branch.window["batch_size"] != obs.batch_size:
                branch.abandon()  # the layout changed under the window (a resume)
                return False
            if not branch.full:
                return True
            with self._noise_probe_paused():
                result = branch.close(
                    pl_module, optimizer, trainer, self._apply_branch_factors,
                    samples=self.samples, gns=obs.gns, gns_rel_std=obs.gns_rel_std,
                )
            self._last_probe = result
            self.policy.observe_probe(result)
            return False
        probe = branch.config
        if (
            self._pending is None
            and self._target == obs.batch_size
            and branch.eval_ready
            and probe.should_start(samples=self.samples, batch_size=obs.batch_size,
                                   gns=obs.gns, spent=branch.spent, last=branch.last,
                                   planned_samples=self.max_samples)
        ):
            with self._noise_probe_paused():
                branch.open(pl_module, optimizer, trainer, obs.batch_size)
            return True
        return False

    @contextlib.contextmanager
    def _noise_probe_paused(self) -> Any:
        """The branch's forward/backward passes must not reach the noise statistics."""
        probe = self._probe
        if probe is not None:
            probe.detach()
        try:
            yield
        finally:
            if probe is not None:
                probe.attach()
                probe.reset()

    def _gain(self, batch_size: int) -> float | None:
        """The AdaScale gain at ``batch_size`` (``None``: the lr rule does not use one)."""
        assert self._scaler is not None and self._estimator is not None
        if not self._scaler.needs_gain:
            return None
        est = self._estimator
        if est.grad_sq is None or est.trace_sigma is None:
            return 1.0  # until the estimate exists: the lr the user tuned at B_ref
        return adascale_gain(est.trace_sigma, est.grad_sq, batch_size,
                             float(self._ref or batch_size))

    def _apply_factors(self, batch_size: int) -> dict[str, float]:
        """Scale the optimizer for one step at global ``batch_size``."""
        assert self._scaler is not None
        ref = float(self._ref or batch_size)
        return self._scaler.apply(batch_size / ref, gain=self._gain(batch_size))

    def _apply_branch_factors(self, batch_size: int) -> dict[str, float]:
        """Scale the optimizer for a probe's branch step at ``batch_size = k B``: the rules
        at ``k B``, except that an AdaScale gain is the main run's at ``B`` times ``k`` (the
        lr ``k`` x the main run's for SGD, ``sqrt(k)`` x for Adam). The saturating gain at
        ``k B`` is set by the noise scale: a branch using it would measure the noise scale
        again (on the noise-floor task it read B_crit 14-140 where B_simple read 10-101)."""
        assert self._scaler is not None and self._branch is not None
        main = batch_size // self._branch.config.factor
        ref = float(self._ref or main)
        gain = self._gain(main)
        if gain is not None:
            gain *= batch_size / main
        return self._scaler.apply(batch_size / ref, gain=gain)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._t_last = None  # keep validation time out of the throughput

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.enabled:
            # Always a real epoch start: Lightning 2.6 skips this hook when it resumes mid-epoch
            # (and repair_epoch_end_restart turns an epoch-end resume into a plain start). Do not
            # read batch_progress here: the epoch loop resets it only after this hook.
            self._apply_pending(trainer, epoch_start=True)
        self._t_last = None

    def _decide(self, obs: Observation) -> None:
        current = self._target or obs.batch_size
        new = self.policy.decide(obs, current)
        if new == current:
            return
        assert self._micro0 is not None and self._split is not None
        self._pending = split_global_batch(
            new,
            world_size=self._world,
            mode=self.resize,
            micro_batch=self._micro0,
            max_micro_batch=self.max_micro_batch,
        )
        self._target = new
        self.history.append(
            {"step": self.steps, "samples": self.samples, "batch_size": new, "from": current}
        )

    def _apply_pending(self, trainer: Any, epoch_start: bool = False) -> None:
        if self._split is not None:
            sampler = self._sampler if self.resize != "accumulate" else None
            check_layout_unchanged(trainer, self._split, sampler)  # one owner of the layout
        pending = self._pending
        if pending is None or self._split is None:
            return
        if pending.micro != self._split.micro and self._sampler is not None:
            self._sampler.set_batch_size(pending.micro)
            self._split = Split(pending.micro, self._split.accumulation)
        if pending.accumulation != self._split.accumulation:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            if not (epoch_start or can_change_accumulation(done, pending.accumulation)):
                return  # wait for an aligned boundary
            trainer.accumulate_grad_batches = pending.accumulation
        self._split = pending
        self._pending = None

    def _notify_ema(self, trainer: Any, batch_size: int) -> None:
        """Tell weight averaging the global batch of the step about to be taken.

        The measured batch, not the decided one: a decision reaches training only after the
        loader's prefetch (sampler) or an aligned boundary (accumulation).
        """
        # adabatch.EMA, or any weight averaging whose decay can follow the batch.
        for cb in trainer.callbacks:
            if isinstance(cb, WeightAveraging) and hasattr(cb, "set_batch_size"):
                cb.set_batch_size(batch_size)

    def _log(self, pl_module: Any, stats: dict[str, float]) -> None:
        est = self._estimator
        assert est is not None and self._split is not None
        metrics = {
            "adabatch/batch_size": float(stats["samples"]),
            "adabatch/target_batch_size": float(self._target or stats["samples"]),
            "adabatch/micro_batch": stats.get("micro", float(self._split.micro)),
            "adabatch/accumulation": stats.get("accumulation", float(self._split.accumulation)),
            "adabatch/lr_factor": stats.get("lr_factor", 1.0),
            "adabatch/samples": float(self.samples),
            # measurement: whether this step reached the estimate, over which share of the
            # trainable parameters, and how many steps could not be measured so far
            "adabatch/measured": stats.get("accepted", 0.0),
            "adabatch/covered_fraction": float(getattr(self, "_covered_fraction", 0.0)),
            "adabatch/skipped_steps": float(est.num_skipped),
        }
        for key, value in (
            ("adabatch/gns", est.gns),
            ("adabatch/gns_rel_std", est.gns_rel_std),
            ("adabatch/grad_sq", est.grad_sq),
            ("adabatch/trace_sigma", est.trace_sigma),
        ):
            if value is not None and math.isfinite(value):
                metrics[key] = float(value)
        if self._branch is not None:
            metrics["adabatch/probe_overhead"] = self._branch.spent / max(self.samples, 1)
            metrics["adabatch/probe_seconds"] = self._branch.seconds
            last = self._last_probe
            if last is not None and last.ratio is not None:
                metrics["adabatch/probe_ratio"] = float(last.ratio)
                if last.ratio_std is not None and math.isfinite(last.ratio_std):
                    metrics["adabatch/probe_ratio_std"] = float(last.ratio_std)
        crit = getattr(self.policy, "critical_batch", None)
        if callable(crit) and est.gns is not None:
            value = crit(Observation(self.samples, self.steps, int(stats["samples"]),
                                     gns=est.gns, gns_rel_std=est.gns_rel_std))
            if value is not None and math.isfinite(value):
                metrics["adabatch/critical_batch"] = float(value)
        bar, rest = split_progress_metrics(metrics)
        pl_module.log_dict(rest, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log_dict(bar, on_step=True, on_epoch=False, batch_size=1, prog_bar=True)


def default_half_life(samples: float, batch_size: int,
                      fraction: float = DEFAULT_HALF_LIFE_FRACTION) -> float:
    """The estimator's default half-life in samples: ``fraction`` of the samples trained so
    far, and at least ``16`` steps of the current batch (see ``half_life_samples``)."""
    return max(_MIN_HALF_LIFE_STEPS * batch_size, fraction * samples)


def _compiled_modules(module: Any) -> list[str]:
    """Names of the ``torch.compile``'d submodules (``OptimizedModule``) of ``module``."""
    return [name or "<root>" for name, m in module.named_modules()
            if type(m).__name__ == "OptimizedModule"]


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _find_resizable_sampler(trainer: Any) -> Any:
    from adabatch.data import ResizableBatchSampler

    batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
    return batch_sampler if isinstance(batch_sampler, ResizableBatchSampler) else None
