"""`AdaptiveBatchSize`: the Lightning callback that wires probes, estimator, policy and rules.

This module holds no maths: it decides the order of things within a training step and keeps
their state. See ARCHITECTURE.md for the data flow.
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.callbacks import Callback

NoiseSource = Literal["auto", "per_example", "microbatch"]
PolicyName = Literal["noise", "goodput", "ramp", "fixed"]
ResizeMode = Literal["auto", "accumulate", "sampler"]
LrRule = Literal["auto", "linear", "sqrt", "adascale", "none"]


class AdaptiveBatchSize(Callback):
    """Adapt the global batch size to the measured gradient noise scale.

    Args:
        enabled: when False the callback does nothing at all (LightningCLI always builds it).
        noise: where small-batch gradient statistics come from: ``per_example`` (module
            hooks, b = 1), ``microbatch`` (parameter hooks, b = micro-batch per rank) or
            ``auto`` (per-example when the micro-batch per rank is 1 or all parameters are
            covered by supported layers, else micro-batch).
        policy: ``noise`` (B = c * B_simple), ``goodput``, ``ramp`` or ``fixed`` (monitor only).
        ref_batch_size: the global batch size at which the optimizer's hyperparameters were
            tuned (B_ref); scaling rules use kappa = B / B_ref. Defaults to the starting
            global batch size, with a warning.
        min_batch_size: smallest global batch size (default: the starting one).
        max_batch_size: largest global batch size (default: 64 x the starting one).
        half_life_samples: half-life of the estimator's EMAs, in samples.
        max_samples: stop training after this many samples (a budget in data, not steps).
        resize: ``accumulate`` (micro-batch fixed, change ``accumulate_grad_batches``),
            ``sampler`` (grow the micro-batch through a `ResizableBatchSampler`) or ``auto``
            (grow the micro-batch up to ``max_micro_batch``, then accumulate).
        max_micro_batch: cap on the per-rank micro-batch in ``sampler``/``auto`` modes.
        noise_scale_factor: c in B = c * B_simple ** noise_exponent (``noise`` policy).
        noise_exponent: 1 follows B_simple; 0.5 grows like its square root (McCandlish et al.
            2018, App. D).
        max_rel_std: the ``noise``/``goodput`` policies act only when the estimate's relative
            standard error is below this.
        ramp_samples: samples over which the ``ramp`` policy goes from min to max batch size.
        hysteresis: relative change below which the batch size is kept.
        min_samples_between_changes: samples that must pass between two changes.
        never_decrease: never shrink the batch.
        warmup_samples: no batch-size decision before this many samples.
        lr_rule: learning-rate scaling with kappa: ``auto`` (linear for SGD, sqrt for Adam),
            ``linear``, ``sqrt``, ``adascale`` or ``none``.
        scale_betas: Adam betas -> beta ** kappa.
        scale_eps: Adam eps -> eps / sqrt(kappa).
        scale_weight_decay: AdamW decoupled weight decay keeps B / (lr * wd) constant.
        log_every_n_steps: log ``adabatch/*`` metrics every this many optimizer steps.
    """

    def __init__(
        self,
        enabled: bool = True,
        noise: NoiseSource = "auto",
        policy: PolicyName = "noise",
        ref_batch_size: int | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        half_life_samples: float = 20_000.0,
        max_samples: int | None = None,
        resize: ResizeMode = "accumulate",
        max_micro_batch: int | None = None,
        noise_scale_factor: float = 0.25,
        noise_exponent: float = 1.0,
        max_rel_std: float = 0.5,
        ramp_samples: int | None = None,
        hysteresis: float = 0.2,
        min_samples_between_changes: int = 0,
        never_decrease: bool = False,
        warmup_samples: int = 0,
        lr_rule: LrRule = "auto",
        scale_betas: bool = True,
        scale_eps: bool = True,
        scale_weight_decay: bool = True,
        log_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        self.enabled = enabled
        self.noise = noise
        self.policy = policy
        self.ref_batch_size = ref_batch_size
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.half_life_samples = half_life_samples
        self.max_samples = max_samples
        self.resize = resize
        self.max_micro_batch = max_micro_batch
        self.noise_scale_factor = noise_scale_factor
        self.noise_exponent = noise_exponent
        self.max_rel_std = max_rel_std
        self.ramp_samples = ramp_samples
        self.hysteresis = hysteresis
        self.min_samples_between_changes = min_samples_between_changes
        self.never_decrease = never_decrease
        self.warmup_samples = warmup_samples
        self.lr_rule = lr_rule
        self.scale_betas = scale_betas
        self.scale_eps = scale_eps
        self.scale_weight_decay = scale_weight_decay
        self.log_every_n_steps = log_every_n_steps
