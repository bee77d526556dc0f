"""Lightning's progress bar for a run whose batch changes and whose budget is in samples.

Two things the `AdaptiveBatchSize` callback calls:

- `split_progress_metrics`: the metrics shown in the progress bar (``adabatch/batch_size``,
  ``adabatch/gns``), logged with ``prog_bar=True``, apart from the rest.
- `sync_train_total`: sets the train bar's total to the micro-batches this epoch will
  really run. Lightning sets it once per epoch from the loader's length, or from
  ``max_steps`` when the loader has none (a `ResizableBatchSampler` has no length), so a run
  bounded by ``max_samples`` ended its epochs at 30-43% of the bar. The total is recomputed
  after every batch from the samples left, the current micro-batch and world size, capped
  by the steps left and by what is left of the epoch.

Lightning's two bars are handled: `TQDMProgressBar` and `RichProgressBar` (the default when
``rich`` is installed); any other bar is left alone.
"""

from __future__ import annotations

import math
from typing import Any

PROGRESS_KEYS = ("adabatch/batch_size", "adabatch/gns")


def split_progress_metrics(
    metrics: dict[str, float],
) -> tuple[dict[str, float], dict[str, float]]:
    """``(shown in the progress bar, logger only)``; both go to the logger.

    Example::

        >>> bar, rest = split_progress_metrics({"adabatch/gns": 3.0, "adabatch/samples": 8.0})
        >>> bar, rest
        ({'adabatch/gns': 3.0}, {'adabatch/samples': 8.0})
    """
    bar = {k: v for k, v in metrics.items() if k in PROGRESS_KEYS}
    rest = {k: v for k, v in metrics.items() if k not in PROGRESS_KEYS}
    return bar, rest


def batches_left(
    *,
    samples_left: float | None,
    micro_batch: int,
    world_size: int = 1,
    steps_left: float | None = None,
    accumulation: int = 1,
    epoch_batches_left: float | None = None,
) -> float:
    """Micro-batches (per rank) still to run: the smallest of the three bounds (inf if none).

    Example::

        >>> batches_left(samples_left=100, micro_batch=8, world_size=2)  # 100 / 16 -> 7
        7
        >>> batches_left(samples_left=100, micro_batch=8, steps_left=2, accumulation=2)
        4
    """
    bounds = [math.inf]
    if samples_left is not None:
        bounds.append(max(0, math.ceil(samples_left / max(1, micro_batch * world_size))))
    if steps_left is not None:
        bounds.append(max(0.0, steps_left) * accumulation)
    if epoch_batches_left is not None:
        bounds.append(max(0.0, epoch_batches_left))
    best = min(bounds)
    return best if math.isinf(best) else int(best)


def sync_train_total(trainer: Any, *, batch_idx: int, samples_left: float | None,
                     micro_batch: int, sampler: Any = None) -> int | None:
    """Set the train bar's total after batch ``batch_idx``; returns it (None: no bar)."""
    setter = _total_setter(getattr(trainer, "progress_bar_callback", None))
    if setter is None:
        return None
    max_steps = getattr(trainer, "max_steps", -1)
    steps_left = None
    if max_steps is not None and max_steps >= 0:
        steps_left = max_steps - trainer.global_step
    epoch_left = None
    n = trainer.num_training_batches
    if isinstance(n, int) or (isinstance(n, float) and math.isfinite(n)):
        epoch_left = n - (batch_idx + 1)
    elif sampler is not None and hasattr(sampler, "consumed"):
        per_batch = max(1, sampler.batch_size * getattr(sampler, "num_replicas", 1))
        epoch_left = math.ceil(max(0, sampler.num_samples - sampler.consumed) / per_batch)
    left = batches_left(
        samples_left=samples_left,
        micro_batch=micro_batch,
        world_size=int(getattr(trainer, "world_size", 1) or 1),
        steps_left=steps_left,
        accumulation=int(trainer.accumulate_grad_batches),
        epoch_batches_left=epoch_left,
    )
    if math.isinf(left):
        return None
    total = batch_idx + 1 + int(left)
    setter(total)
    return total


def _total_setter(bar: Any) -> Any:
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if isinstance(bar, TQDMProgressBar):
        tqdm = getattr(bar, "_train_progress_bar", None)
        if tqdm is not None:
            return lambda total: setattr(tqdm, "total", total)
    elif isinstance(bar, RichProgressBar):
        progress, task = getattr(bar, "progress", None), getattr(bar, "train_progress_bar_id", None)
        if progress is not None and task is not None:
            return lambda total: progress.update(task, total=total)
    return None
