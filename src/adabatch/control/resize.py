"""Applying a global batch size to a running Lightning trainer.

The global batch B = micro-batch per rank x accumulation steps k x world size. Three modes:

- ``accumulate``: the micro-batch stays fixed and ``trainer.accumulate_grad_batches`` changes.
  Lightning zeroes the gradient when ``batch_idx % k == 0`` and steps when
  ``batches_done_in_epoch % k == 0``, so a new k is safe only right after a step at which
  ``batches_done_in_epoch % k_new == 0`` (or at an epoch start); until then it is pending.
  Otherwise the next step would mix a partial window into a loss divided by the new k.
- ``sampler``: k = 1 and the micro-batch itself grows through a `ResizableBatchSampler`.
  A change made after batch k reaches the model at batch k + 2 + prefetch_factor x
  num_workers (Lightning's fetcher holds one batch ahead of a loader with no length).
- ``auto``: grow the micro-batch up to ``max_micro_batch``, then accumulate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Split:
    """How a global batch is laid out: ``micro`` per rank, ``accumulation`` micro-batches."""

    micro: int
    accumulation: int


def split_global_batch(
    global_batch: int,
    *,
    world_size: int,
    mode: str,
    micro_batch: int,
    max_micro_batch: int | None = None,
) -> Split:
    """Lay out ``global_batch`` as micro-batch x accumulation x world size.

    ``global_batch`` must be a multiple of ``micro_batch * world_size`` in ``accumulate`` mode
    and of ``world_size`` otherwise (the decider's granularity guarantees it).

    Example::

        >>> split_global_batch(256, world_size=2, mode="accumulate", micro_batch=32)
        Split(micro=32, accumulation=4)
        >>> split_global_batch(256, world_size=2, mode="sampler", micro_batch=32)
        Split(micro=128, accumulation=1)
        >>> split_global_batch(768, world_size=1, mode="auto", micro_batch=32, max_micro_batch=256)
        Split(micro=256, accumulation=3)
    """
    if global_batch < 1 or world_size < 1 or micro_batch < 1:
        raise ValueError(
            f"global_batch={global_batch}, world_size={world_size} and "
            f"micro_batch={micro_batch} must all be >= 1"
        )
    if mode == "accumulate":
        per_rank = micro_batch * world_size
        if global_batch % per_rank:
            raise ValueError(
                f"global_batch={global_batch} is not a multiple of micro_batch x world_size "
                f"= {per_rank}"
            )
        return Split(micro_batch, global_batch // per_rank)
    if global_batch % world_size:
        raise ValueError(
            f"global_batch={global_batch} is not a multiple of world_size={world_size}"
        )
    per_rank = global_batch // world_size
    if mode == "sampler":
        if max_micro_batch is not None and per_rank > max_micro_batch:
            raise ValueError(
                f"global_batch={global_batch} needs a micro-batch of {per_rank} per rank, above "
                f"max_micro_batch={max_micro_batch}; use resize='auto' to accumulate past it"
            )
        return Split(per_rank, 1)
    if mode == "auto":
        cap = max_micro_batch if max_micro_batch is not None else per_rank
        # The smallest accumulation whose micro-batch fits under the cap and divides evenly.
        for k in range(max(1, -(-per_rank // cap)), per_rank + 1):
            if per_rank % k == 0 and per_rank // k <= cap:
                return Split(per_rank // k, k)
    raise ValueError(f"mode={mode!r} must be one of 'accumulate', 'sampler', 'auto'")


def can_change_accumulation(batches_done_in_epoch: int, new_accumulation: int) -> bool:
    """Whether Lightning's accumulation may switch to ``new_accumulation`` right after a step.

    Example::

        >>> can_change_accumulation(12, 4), can_change_accumulation(12, 5)
        (True, False)
    """
    return batches_done_in_epoch % new_accumulation == 0


def refuse_other_layout_writers(trainer: Any) -> None:
    """Refuse, at setup, anything else that would write the batch layout during training.

    Lightning's ``GradientAccumulationScheduler`` sets ``trainer.accumulate_grad_batches`` at
    every epoch start (it forced k = 4, a batch of 16, under a callback that believed 8 and
    a ``max_batch_size`` below 16); a non-int ``Trainer(accumulate_grad_batches=...)``
    (Lightning 2.6 stores a dict unchecked) is a schedule of its own.

    Raises:
        MisconfigurationException: naming the conflicting callback or value.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    k = trainer.accumulate_grad_batches
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MisconfigurationException(
            f"Trainer(accumulate_grad_batches={k!r}) must be an int >= 1 with AdaptiveBatchSize, "
            "which owns the accumulation from there (resize='accumulate' or 'auto')"
        )
    for cb in trainer.callbacks:
        if isinstance(cb, GradientAccumulationScheduler):
            raise MisconfigurationException(
                "GradientAccumulationScheduler and AdaptiveBatchSize both write "
                "trainer.accumulate_grad_batches: remove the scheduler (a batch-size ramp is "
                "AdaptiveBatchSize's ramp policy) or set AdaptiveBatchSize(enabled=False)"
            )


def check_layout_unchanged(trainer: Any, split: Split, sampler: Any) -> None:
    """Raise when something other than adabatch changed the layout since adabatch set it.

    Raises:
        MisconfigurationException: naming the value found and the one adabatch set.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if trainer.accumulate_grad_batches != split.accumulation:
        raise MisconfigurationException(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches!r} was changed "
            f"by something other than AdaptiveBatchSize, which set {split.accumulation}: only "
            "one owner may write the batch layout"
        )
    if sampler is not None and sampler.batch_size != split.micro:
        raise MisconfigurationException(
            f"the ResizableBatchSampler's batch_size={sampler.batch_size} was changed by "
            f"something other than AdaptiveBatchSize, which set {split.micro}"
        )
