"""`EMA`: weight averaging whose decay follows the global batch size.

Built on Lightning's ``WeightAveraging`` (2.6): it keeps a ``torch.optim.swa_utils.AveragedModel``
of the LightningModule, updates it in ``on_train_batch_end`` after optimizer steps for which
``should_update(step_idx)`` is true (the first update copies the weights, later ones call the
``multi_avg_fn`` given to the averaged model), swaps the averaged weights in for validation,
copies them into the model when training ends, and stores them in checkpoints as the model's
``state_dict`` (the live weights under ``current_model_state``, ``n_averaged`` under
``averaging_state``).

The decay per update is ``2 ** (-S / H)``, with S the samples trained since the previous update
and H the half-life in samples; at a constant global batch B and an update every n steps that
is ``2 ** (-B n / H)``. In terms of a decay ``rho`` tuned at a reference batch ``B_ref`` it is
``rho ** kappa`` with ``kappa = B / B_ref`` (Busbridge et al. 2023, "How to Scale Your EMA"), so
the EMA averages over the same number of samples whatever the batch size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from adabatch.control.rules import decay_from_half_life

__all__ = ["EMA"]

_STATE_VERSION = 1


def _check_batch(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    return value


class EMA(WeightAveraging):
    """Exponential moving average of the weights whose decay follows the global batch size.

    Give either ``half_life_samples`` (H), or ``decay`` (per update) at ``ref_batch_size``, from
    which ``H = -ref_batch_size * update_every_n_steps / log2(decay)``. Each update then decays by
    ``2 ** (-S / H)``, S the samples trained since the previous update (``B * n`` at a constant
    global batch B): a change of the batch size keeps the averaging window fixed in samples, the
    ``rho' = rho ** kappa`` rule of Busbridge et al. 2023.

    The global batch B (micro-batch x accumulation x world size) comes from `set_batch_size`,
    which adabatch's `AdaptiveBatchSize` calls at every optimizer step with the step's measured
    global batch (in ``on_before_optimizer_step``, so before this callback's update in
    ``on_train_batch_end``, whatever the order of the callbacks; the loader's prefetch lag is
    thereby accounted for). B is read when the update is made: a call made in an
    ``on_train_batch_end`` of a callback placed before this one counts for the step just
    taken. Until the first call B is measured on the first
    training batch (its size x ``trainer.accumulate_grad_batches`` x ``trainer.world_size``), or
    is ``ref_batch_size`` when the batch's size cannot be inferred. With ``decay`` and no
    ``ref_batch_size`` the reference is that first B.

    Validation runs on the averaged weights, and they replace the model's when training ends
    (Lightning's ``WeightAveraging``). Integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) are copied, not averaged. The half-life, current batch, decay and
    the samples since the last update are kept in the callback's ``state_dict``; the averaged
    weights are in the checkpoint's ``state_dict``, the live ones in ``current_model_state``.

    Args:
        half_life_samples: samples after which a weight's contribution has halved.
        decay: decay per update at ``ref_batch_size`` (instead of ``half_life_samples``).
        ref_batch_size: global batch at which ``decay`` holds; also the batch size used when
            the first batch's size cannot be inferred.
        update_every_n_steps: update the average every n optimizer steps.
        device: where to keep the averaged model (default: the model's device).
        use_buffers: average the buffers too (else they are copied from the model).

    Raises:
        ValueError: when both or neither of ``half_life_samples`` and ``decay`` are given, or on
            a value out of range (``half_life_samples <= 0``, ``decay`` outside (0, 1),
            ``ref_batch_size`` or ``update_every_n_steps`` < 1).
        MisconfigurationException: at the first training batch, when its size cannot be
            inferred and neither ``ref_batch_size`` nor `set_batch_size` gave one.

    Example::

        >>> ema = EMA(half_life_samples=4096)
        >>> ema.set_batch_size(256)
        >>> round(ema.decay, 6)  # 2 ** (-256 / 4096)
        0.957603
        >>> ema.set_batch_size(1024)  # 4x the batch: 0.957603 ** 4
        >>> round(ema.decay, 6)
        0.840896
        >>> round(EMA(decay=0.999, ref_batch_size=32).half_life_samples)
        22170
        >>> # Trainer(callbacks=[AdaptiveBatchSize(...), EMA(half_life_samples=50_000)])
    """

    def __init__(
        self,
        half_life_samples: float | None = None,
        decay: float | None = None,
        ref_batch_size: int | None = None,
        update_every_n_steps: int = 1,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
    ) -> None:
        if (half_life_samples is None) == (decay is None):
            raise ValueError(
                f"give exactly one of half_life_samples={half_life_samples!r} and decay={decay!r}"
            )
        if half_life_samples is not None:
            h = float(half_life_samples)
            if math.isnan(h) or h <= 0:
                raise ValueError(f"half_life_samples={half_life_samples!r} must be > 0")
        if decay is not None and not 0.0 < float(decay) < 1.0:
            raise ValueError(f"decay={decay!r} must be in (0, 1)")
        if ref_batch_size is not None:
            _check_batch("ref_batch_size", ref_batch_size)
        if (
            isinstance(update_every_n_steps, bool)
            or not isinstance(update_every_n_steps, int)
            or update_every_n_steps < 1
        ):
            raise ValueError(f"update_every_n_steps={update_every_n_steps!r} must be an int >= 1")
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=self._average)
        self.update_every_n_steps = update_every_n_steps
        self.ref_batch_size = ref_batch_size
        self._init_args = {
            "half_life_samples": half_life_samples,
            "decay": decay,
            "ref_batch_size": ref_batch_size,
            "update_every_n_steps": update_every_n_steps,
        }
        self._decay_at_ref = None if decay is None else float(decay)
        self._half_life: float | None = None
        if half_life_samples is not None:
            self._half_life = float(half_life_samples)
        elif ref_batch_size is not None:
            self._half_life = self._derive_half_life(ref_batch_size)
        self._batch_size: int | None = None
        self._samples_since_update = 0.0
        self._last_step = 0
        self._update_decay = 1.0  # decay of the update about to run

    # ----------------------------------------------------------------- public
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._init_args)

    @property
    def half_life_samples(self) -> float | None:
        """Half-life in samples (None while it awaits the first batch to fix ``decay``'s
        reference)."""
        return self._half_life

    @property
    def batch_size(self) -> int | None:
        """The global batch size the decay follows (None until known)."""
        return self._batch_size

    @property
    def decay(self) -> float | None:
        """Decay per update at the current batch: ``2 ** (-B * n / H)`` (None until known)."""
        if self._batch_size is None or self._half_life is None:
            return None
        return decay_from_half_life(self._batch_size * self.update_every_n_steps, self._half_life)

    def set_batch_size(self, batch_size: int) -> None:
        """Follow a new global batch size from the next optimizer step on.

        Raises:
            ValueError: when ``batch_size`` is not an int >= 1.
        """
        self._batch_size = _check_batch("batch_size", batch_size)
        if self._half_life is None:
            self._half_life = self._derive_half_life(self._batch_size)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after every ``update_every_n_steps``-th optimizer step, never at epoch ends."""
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_size is None:
            self._measure(trainer, batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        steps = trainer.global_step - self._last_step
        if steps > 0 and self._batch_size is not None:
            self._samples_since_update += steps * self._batch_size
            self._last_step = trainer.global_step
        if self._half_life is not None and self._samples_since_update > 0:
            self._update_decay = decay_from_half_life(self._samples_since_update, self._half_life)
        before = self._latest_update_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._latest_update_step != before:
            self._samples_since_update = 0.0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            version=_STATE_VERSION,
            half_life_samples=self._half_life,
            batch_size=self._batch_size,
            decay=self.decay,
            samples_since_update=self._samples_since_update,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        half_life = state_dict.get("half_life_samples")
        if half_life is not None:
            self._half_life = float(half_life)
        batch_size = state_dict.get("batch_size")
        if batch_size is not None:
            self._batch_size = int(batch_size)
        self._samples_since_update = float(state_dict.get("samples_since_update", 0.0))

    # ---------------------------------------------------------------- helpers
    def _derive_half_life(self, ref_batch_size: int) -> float | None:
        if self._decay_at_ref is None:
            return None
        return -ref_batch_size * self.update_every_n_steps / math.log2(self._decay_at_ref)

    def _measure(self, trainer: Any, batch: Any) -> None:
        try:
            micro = extract_batch_size(batch)
        except (MisconfigurationException, RecursionError):
            micro = None
        if micro is not None:
            global_batch = micro * trainer.accumulate_grad_batches * trainer.world_size
        elif self.ref_batch_size is not None:
            global_batch = self.ref_batch_size
        else:
            raise MisconfigurationException(
                "EMA could not infer the batch size from the first training batch: pass "
                "ref_batch_size or call set_batch_size before training"
            )
        self.set_batch_size(global_batch)

    @torch.no_grad()
    def _average(
        self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any
    ) -> None:
        # Called by AveragedModel.update_parameters once per (device, dtype) group.
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - self._update_decay)
        else:
            for avg, cur in zip(averaged, current):
                avg.copy_(cur)
