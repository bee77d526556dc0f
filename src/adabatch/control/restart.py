"""Exact resume from a checkpoint saved at an epoch's end, for loaders without ``__len__``.

Lightning 2.6.6 (``loops/fit_loop.py``, ``loops/training_epoch_loop.py``) resumes such a
checkpoint into the next epoch, but not as that epoch would have started (measured with a
`ResizableDataLoader`, 11 batches per epoch, in ``tests/test_resume.py``):

- **saved at the epoch's last batch** (``ModelCheckpoint(every_n_train_steps=...)``, in
  ``on_train_batch_end``): the fit loop counts the epoch as finished, but the batch counter
  is reset only when ``completed >= num_training_batches``, which is ``inf`` without a
  length. The next epoch's batches are numbered on from the old ``batch_idx`` (11, 12, ...),
  so every accumulation window is shifted (``ready % k``): the first step gets 1 micro-batch
  instead of k. ``on_train_epoch_start`` is not called for that epoch, and the epoch
  counters ``ready``/``started`` stay one behind, so a *later* mid-epoch checkpoint is taken
  for a finished epoch and its loader state is ignored.
- **saved in** ``on_train_epoch_end`` **with** ``max_steps`` (iteration-based training, where
  the fit loop keeps ``restarting``): the same numbering on from the old ``batch_idx``, and
  ``current_epoch`` stays one behind.
- **saved in** ``on_train_epoch_end`` **with** ``max_epochs`` (``RESUMED_ON_EPOCH_END``, where
  ``restarting`` is False): the loaders' saved states are not loaded at all, and the epoch's
  iterator is created (and a batch prefetched) before ``set_epoch``: the next epoch runs in
  the previous epoch's order, with the starting batch size.

Not repaired (Lightning keeps no partial gradients): a checkpoint saved inside an accumulation
window, e.g. by ``ModelCheckpoint(train_time_interval=...)``, resumes with that window's earlier
micro-batches lost. ``ModelCheckpoint(every_n_train_steps=...)`` saves at steps only, except
right after a resume, which `repair_epoch_end_restart` also prevents.

`repair_epoch_end_restart` turns each of these into what an uninterrupted run does at an
epoch start (counters reset, the epoch-start hooks called, the loaders' saved states loaded and
a fresh iterator made). It must run in ``on_train_start``: after the fit loop's ``reset`` and
before the epoch loop's. `AdaptiveBatchSize` calls it; `ExactEpochResume` is the same as a
callback of its own, for runs without adabatch's callback.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["ExactEpochResume", "repair_epoch_end_restart"]

_LAST_BATCH = "last_batch"
_EPOCH_END = "epoch_end"
_EPOCH_END_NOT_LOADED = "epoch_end_loader_states"


def repair_epoch_end_restart(trainer: Any) -> str | None:
    """Make a restart at an epoch's end start the next epoch as an uninterrupted run would.

    Returns which case it repaired (``"last_batch"``, ``"epoch_end"`` or
    ``"epoch_end_loader_states"``, see the module docstring), or None when there was nothing
    to repair (no restart, a mid-epoch restart, or a loader with a length, which Lightning
    handles itself). Call it on every rank, in ``on_train_start``.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(fit_loop, "epoch_loop", None)
    if fit_loop is None or epoch_loop is None or not hasattr(fit_loop, "_restart_stage"):
        return None
    for checkpoint in getattr(trainer, "checkpoint_callbacks", []):
        # ModelCheckpoint does not save the step it last saved at: resumed at step g inside an
        # accumulation window it saves again at g, mid-window, and Lightning checkpoints no
        # partial gradients, so a run resumed from *that* file is not exact (measured by
        # tests/scripts/chaos_resume.py). The uninterrupted run saved at g already.
        if getattr(checkpoint, "_last_global_step_saved", None) == 0:
            checkpoint._last_global_step_saved = trainer.global_step
    if not math.isinf(trainer.num_training_batches):
        return None  # Lightning resets the batch counter itself when the loader has a length
    batches = epoch_loop.batch_progress
    epochs = fit_loop.epoch_progress
    if fit_loop.resumed_on_epoch_end:
        # restarting is False here, so FitLoop.setup_data skipped the saved loader states and
        # left them in _combined_loader_states_to_load; its iterator already holds a batch.
        states = getattr(fit_loop, "_combined_loader_states_to_load", None)
        loader = fit_loop._combined_loader
        if not states or loader is None or fit_loop._data_fetcher is None:
            return None
        loader._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []
        iter(fit_loop._data_fetcher)  # a fresh iterator from the loaded states
        return _EPOCH_END_NOT_LOADED
    if not (epoch_loop.restarting and batches.is_last_batch):
        return None
    if fit_loop.restarted_mid_epoch and epoch_loop.restarted_on_train_batch_end:
        # Saved in on_train_batch_end of the last batch: what the epoch loop's reset and
        # on_advance_end would have done for that batch. FitLoop.reset already counted the
        # epoch as processed and completed.
        batches.increment_completed()
        epoch_loop._batches_that_stepped += 1
        case = _LAST_BATCH
    elif fit_loop.restarted_on_epoch_end and epoch_loop.restarted_on_last:
        # Saved in on_train_epoch_end: only FitLoop.on_advance_end's last increment is missing.
        epochs.increment_completed()
        case = _EPOCH_END
    else:
        return None
    # A plain next epoch: FitLoop.on_advance_start increments ready/started and calls the
    # epoch-start hooks; the epoch loop's reset, not restarting, resets the batch counters.
    fit_loop.reset_restart_stage()
    epoch_loop.reset_restart_stage()
    epoch_loop.restarting = False
    return case


class ExactEpochResume(Callback):
    """`repair_epoch_end_restart` as a callback, for runs without `AdaptiveBatchSize` (which
    calls it itself).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ExactEpochResume()], logger=False)
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        repair_epoch_end_restart(trainer)
