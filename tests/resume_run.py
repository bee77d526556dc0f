"""One deterministic CPU run with batch-size changes, checkpoints and an LR schedule in
samples, shared by tests/test_resume.py and tests/scripts/chaos_resume.py.

11 micro-batches of 4 per epoch (44 samples: an odd count, so accumulation windows and the
epoch's last batch never line up by chance), AdamW-free SGD with momentum (optimizer state
that a bad resume would corrupt), a shuffled `ResizableDataLoader`, and a warm-up/cosine LR
schedule read from the callback's sample count.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import SamplerData, trainer

from adabatch import AdaptiveBatchSize
from adabatch.control.policy import RampPolicy
from adabatch.control.rules import ScalingRules
from adabatch.control.schedules import SampleSchedule, sample_lambda_lr
from adabatch.tasks.synthetic import LeastSquaresModel

MICRO = 4
NUM_SAMPLES = 44


def ramp_callback(start: int, end: int, ramp_samples: int, **kwargs: Any) -> AdaptiveBatchSize:
    """The ramp policy from ``start`` to ``end`` over ``ramp_samples``: the one place that
    knows how the callback's constructor spells it."""
    # The mechanics under test are resizing and state: no loss guard, the plain kappa rules.
    kwargs.setdefault("rules", ScalingRules(lr="kappa"))
    return AdaptiveBatchSize(policy=RampPolicy(ramp_samples=ramp_samples, spike_factor=None),
                             min_batch_size=start, max_batch_size=end, **kwargs)


class ScheduledModel(LeastSquaresModel):
    """SGD with momentum and a sample-based warm-up/cosine LR read from ``self.counter``."""

    counter: Any = None

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        schedule = SampleSchedule("warmup_cosine", warmup_samples=40, total_samples=2000,
                                  final_factor=0.1)
        sched = sample_lambda_lr(opt, schedule, self.counter)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Recorder(Callback):
    """Per optimizer step: the step, its samples, micro-batches, first index and the LR used.

    Put it after `AdaptiveBatchSize` so it sees the scaled LR.
    """

    def __init__(self, journal: Path | None = None) -> None:
        self.journal = journal  # rows are appended there as they come (survives a SIGKILL)
        self.rows: list[dict[str, Any]] = []
        self._samples = 0
        self._micro = 0
        self._first: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._samples += len(batch[0])
        self._micro += 1
        if self._first is None:
            self._first = float(batch[0][0, 0])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.rows.append({"step": trainer.global_step, "batch": self._samples,
                          "micro_batches": self._micro, "first": self._first,
                          "lr": optimizer.param_groups[0]["lr"],
                          "epoch": trainer.current_epoch})
        if self.journal is not None:
            with self.journal.open("a") as f:
                f.write(json.dumps(self.rows[-1]) + "\n")
        self._samples, self._micro, self._first = 0, 0, None


class Killer(Callback):
    """SIGKILL this process at ``(global_step, hook)``: the hard stop of a preempted job."""

    HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_epoch_end",
             "on_train_epoch_start")

    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook
        self.last: tuple[int, str] | None = None  # the last (step, hook) passed

    def _maybe(self, trainer: Any, hook: str) -> None:
        event = (trainer.global_step, hook)
        if event == self.last:
            return  # a later micro-batch of the same step
        if event == (self.step, self.hook):
            os.kill(os.getpid(), signal.SIGKILL)
        self.last = event

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["chaos_event"] = self.last  # where in the run this checkpoint was saved

    def on_train_batch_start(self, trainer, pl_module, batch, idx):
        self._maybe(trainer, "on_train_batch_start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._maybe(trainer, "on_before_optimizer_step")

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe(trainer, "on_train_epoch_end")

    def on_train_epoch_start(self, trainer, pl_module):
        self._maybe(trainer, "on_train_epoch_start")


def fit(
    root: Path,
    *,
    mode: str = "accumulate",
    accumulation: int = 1,
    max_epochs: int | None = None,
    max_steps: int = -1,
    ckpt_path: str | None = None,
    save: bool = False,
    kill: tuple[int, str] | None = None,
    callback: AdaptiveBatchSize | None = None,
    journal: Path | None = None,
    **trainer_kwargs: Any,
) -> tuple[ScheduledModel, AdaptiveBatchSize, Recorder]:
    """Train from scratch or from ``ckpt_path``; ``save`` writes a checkpoint after every step
    (``s<step>.ckpt``) and at every epoch end (``e<step>.ckpt``)."""
    seed_everything(0)
    torch.use_deterministic_algorithms(True)
    model = ScheduledModel(dim=4, init_scale=1.0)
    data = SamplerData(dim=4, batch_size=MICRO, num_samples=NUM_SAMPLES)
    start = MICRO * accumulation
    if callback is None:
        end = 4 * start if mode == "accumulate" else 16
        callback = ramp_callback(start, end, ramp_samples=150, resize=mode, ref_batch_size=4)
    model.counter = callback
    rec = Recorder(journal)
    callbacks: list[Callback] = [callback, rec]
    if kill is not None:
        callbacks.append(Killer(*kill))
    if save:
        callbacks += [
            ModelCheckpoint(dirpath=root, filename="s{step}", every_n_train_steps=1,
                            save_top_k=-1, auto_insert_metric_name=False),
            ModelCheckpoint(dirpath=root, filename="e{step}", every_n_epochs=1,
                            save_on_train_epoch_end=True, save_top_k=-1,
                            auto_insert_metric_name=False),
        ]
    trainer(root, callbacks, max_epochs=max_epochs, max_steps=max_steps,
            accumulate_grad_batches=accumulation, enable_checkpointing=save,
            **trainer_kwargs).fit(
        model, data, ckpt_path=ckpt_path)
    return model, callback, rec


def checkpoint_step(path: Path) -> int:
    """The global step a ``s<step>.ckpt`` / ``e<step>.ckpt`` file was saved at."""
    return int(path.stem[1:].split("-")[0])
