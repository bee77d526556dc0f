"""Small Lightning set-ups shared by the callback tests and the DDP scripts."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from adabatch.data import ResizableBatchSampler, ResizableDataLoader
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel


class SamplerData(LeastSquaresData):
    """`LeastSquaresData` whose train loader is a checkpointed `ResizableDataLoader`."""

    def train_dataloader(self) -> ResizableDataLoader:
        assert self.train_set is not None
        sampler = ResizableBatchSampler(self.train_set, self.batch_size, seed=self.seed)
        return ResizableDataLoader(self.train_set, sampler)


class StepRecorder(Callback):
    """Records, per optimizer step, what the optimizer actually used and where training is.

    Put it after `AdaptiveBatchSize` in the callback list so it sees the scaled values.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._samples = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._samples += len(batch[0])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        group = optimizer.param_groups[0]
        w = pl_module.linear.weight
        self.rows.append(
            {
                "step": trainer.global_step,
                "batch": self._samples,
                "lr": group["lr"],
                "loss": float(pl_module.problem.loss(w)),
            }
        )
        self._samples = 0


def trainer(tmp_path: Any, callbacks: list, **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path),
    }
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


def model_near_optimum(offset: float = 0.1, seed: int = 0, **kwargs: Any) -> LeastSquaresModel:
    """A model at ``w_star + offset * N(0, 1)``: a large, known noise scale."""
    model = LeastSquaresModel(**kwargs)
    g = torch.Generator().manual_seed(seed)
    w = model.problem.w_star + offset * torch.randn(model.problem.dim, generator=g,
                                                    dtype=torch.float64)
    with torch.no_grad():
        model.linear.weight.copy_(w.float().reshape(1, -1))
    return model
