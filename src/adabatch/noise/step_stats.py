"""One optimizer step's gradient statistics, reduced across ranks: the maths of the callback's
measurement, with no Lightning in it.

Inputs, per rank, for the step that is about to be taken:

- ``small``: the probe's small-batch squared norms (per-example units), one per example
  (per-example probe, ``b = 1``) or one per micro-batch (micro-batch probe);
- ``local_samples`` / ``local_batches``: examples and micro-batches this rank contributed;
- ``big_sq``: ``|.grad|^2`` over the measured parameters, i.e. the accumulated, all-reduced
  gradient (identical on every rank) as Lightning left it;
- ``accumulation``: Lightning's ``accumulate_grad_batches`` ``k``: it divided every
  micro-batch's loss by ``k``, also in an epoch's last, shorter window, so ``.grad`` is rescaled
  by ``k / local_batches`` to the mean over the micro-batches it holds;
- ``elapsed``: this rank's step time (0 when unknown).

One all-reduce (:func:`adabatch.noise.estimator.reduce_small_batch_stats`, the estimator's
tested reduction) sums ``[sum of small norms, their count, samples, micro-batches, step time,
ranks timed]`` so that every rank holds the same numbers and takes the same decision.

A step is *measurable* only if it has a small batch below the big one (``b < B``) and the
probe recorded what the step's layout says it should have: one norm per example (per-example
probe) or one per micro-batch (micro-batch probe). Anything else, e.g. a ``torch.compile``'d
module whose module hooks never fire, is reported as a ``skip`` reason and must never reach
the estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from adabatch.noise.estimator import reduce_small_batch_stats

__all__ = ["StepStats", "big_batch_sq_norm", "reduce_step_stats"]

SKIP_NO_NORMS = "no small-batch norms were recorded"
SKIP_MISMATCH = "the probe recorded a different number of small batches than the step holds"
SKIP_NO_SMALL_BATCH = "no small batch below the global batch"


@dataclass(frozen=True)
class StepStats:
    """Reduced statistics of one step, identical on every rank.

    Attributes:
        small_sq: mean small-batch squared norm ``S`` (NaN when ``count`` is 0).
        count: number of small batches recorded, all ranks.
        b: small-batch size (1 for per-example statistics, else the mean micro-batch).
        big_sq: ``|g_B|^2`` of the big-batch gradient (per-example units).
        samples: global batch ``B`` of the step.
        batches: micro-batches in the step, all ranks.
        step_time: mean step time over ranks, NaN unless every rank timed the step.
        skip: why the step cannot be measured, or ``None`` if it can.
    """

    small_sq: float
    count: float
    b: float
    big_sq: float
    samples: float
    batches: float
    step_time: float
    skip: str | None

    @property
    def finite(self) -> bool:
        """Whether the measured values are finite (a skipped step has nothing to be infinite)."""
        if self.skip is not None:
            return math.isfinite(self.big_sq)
        return math.isfinite(self.big_sq) and math.isfinite(self.small_sq)


def big_batch_sq_norm(params: Iterable[Tensor], *, device: torch.device | None = None) -> Tensor:
    """``sum_p |p.grad|^2`` in float64, one fused norm over all gradients, no host sync.

    Parameters without a gradient are left out; 0 when none has one.
    """
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    if any(g.is_sparse for g in grads):
        grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
    norms = torch._foreach_norm(grads)  # one kernel per device and dtype group
    out_device = grads[0].device if device is None else device
    return torch.stack([n.to(out_device, torch.float64) for n in norms]).square().sum()


def reduce_step_stats(
    small: Tensor,
    *,
    per_example: bool,
    local_samples: int,
    local_batches: int,
    big_sq: Tensor,
    accumulation: int,
    elapsed: float,
    world_size: int,
    all_reduce_fn: Callable[[Tensor], Tensor | None] | None = None,
) -> StepStats:
    """Reduce one step's local statistics to :class:`StepStats` (one all-reduce, one sync).

    Args:
        small: this rank's small-batch squared norms (1-D, any float dtype and device).
        per_example: ``True`` for per-example norms (``b = 1``, one per example), ``False`` for
            micro-batch norms (one per micro-batch, ``b`` = the mean micro-batch per rank).
        local_samples, local_batches: examples and micro-batches this rank contributed.
        big_sq: this rank's ``|.grad|^2`` (0-d tensor) over the measured parameters.
        accumulation: Lightning's ``accumulate_grad_batches`` (``k``) during the step.
        elapsed: this rank's step time in seconds, ``<= 0`` when unknown.
        world_size: number of ranks.
        all_reduce_fn: sums a tensor over ranks (see ``reduce_small_batch_stats``); ``None`` in
            a single process.

    Raises:
        ValueError: if ``accumulation``, ``world_size`` are not >= 1 or counts are negative.
    """
    if accumulation < 1 or world_size < 1 or local_samples < 0 or local_batches < 0:
        raise ValueError(
            f"accumulation={accumulation}, world_size={world_size} must be >= 1 and "
            f"local_samples={local_samples}, local_batches={local_batches} >= 0"
        )
    device = big_sq.device
    small = small.detach().to(device=device, dtype=torch.float64).reshape(-1)
    extra = torch.tensor(
        [float(local_samples), float(local_batches), max(float(elapsed), 0.0),
         float(elapsed > 0)],
        dtype=torch.float64, device=device,
    )
    mean_sq, count, sums = reduce_small_batch_stats(
        small.sum(), small.numel(), all_reduce_fn, extra=extra
    )
    # .grad holds sum_j g_j / k over the local_batches micro-batches j it accumulated (the
    # same count on every rank: DDP syncs every rank's windows alike); the big batch is their
    # mean, so rescale by k / local_batches (1 in a full window).
    window = accumulation / max(local_batches, 1)
    big = big_sq.to(torch.float64) * (window * window)
    values = torch.cat([torch.stack([mean_sq, count, big]), sums]).tolist()  # the host sync
    small_sq, count_f, big_f, samples, batches, time_sum, timed = values
    if per_example:
        b = 1.0
        expected = samples
    else:
        b = samples / count_f if count_f > 0 else math.nan
        expected = batches
    if count_f == 0:
        skip: str | None = SKIP_NO_NORMS
    elif count_f != expected:
        skip = SKIP_MISMATCH
    elif not b < samples:
        skip = SKIP_NO_SMALL_BATCH
    else:
        skip = None
    step_time = time_sum / world_size if timed == world_size else math.nan
    return StepStats(small_sq=small_sq, count=count_f, b=b, big_sq=big_f, samples=samples,
                     batches=batches, step_time=step_time, skip=skip)
