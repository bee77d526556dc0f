"""What every built-in task shares: optimizer settings, loss logging, argument checks.

Each task's LightningModule subclasses `TaskModule`, implements ``loss(batch)`` (a loss
mean-reduced over the batch, which the per-example probes assume) and gets the
optimizer, ``train_loss`` / ``val_loss`` / ``test_loss`` logging and validation of its
optimizer arguments from here. Each task's DataModule subclasses `TaskData` and only
builds its datasets.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adabatch.data import ResizableBatchSampler, ResizableDataLoader

OptimizerName = Literal["sgd", "adamw"]


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` naming ``name=value`` unless it is > 0 (or >= 0)."""
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name=value`` unless 0 < value < 1."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} must be in (0, 1)")


def make_optimizer(
    params: Any,
    optimizer: str,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """Build ``torch.optim.SGD`` or ``torch.optim.AdamW`` from plain settings.

    Example::

        >>> opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], "sgd", lr=0.1)
        >>> type(opt).__name__, opt.param_groups[0]["lr"]
        ('SGD', 0.1)
    """
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"optimizer={optimizer!r} must be one of 'sgd', 'adamw'")


class TaskModule(LightningModule):
    """Base LightningModule of the built-in tasks: optimizer choice and loss logging.

    Subclasses build their network, call ``super().__init__(...)`` with the optimizer
    arguments and implement ``loss(batch) -> Tensor`` (mean over the batch).

    Args:
        lr: learning rate (> 0).
        optimizer: ``sgd`` or ``adamw``.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay, >= 0.
        betas: AdamW betas, each in [0, 1).
    """

    def __init__(
        self,
        lr: float,
        optimizer: OptimizerName,
        momentum: float,
        weight_decay: float,
        betas: tuple[float, float],
    ) -> None:
        super().__init__()
        check_positive("lr", lr)
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={optimizer!r} must be one of 'sgd', 'adamw'")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
        check_positive("weight_decay", weight_decay, allow_zero=True)
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.betas = betas

    def loss(self, batch: Any) -> Tensor:
        """The batch's loss, mean-reduced over examples."""
        raise NotImplementedError

    def _step(self, batch: Any, stage: str) -> Tensor:
        loss = self.loss(batch)
        size = _batch_size(batch)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=size)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optimizer_name, lr=self.lr,
                              momentum=self.momentum, weight_decay=self.weight_decay,
                              betas=self.betas)


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0])


class TaskData(LightningDataModule):
    """Base DataModule of the built-in tasks: loaders over ``train_set`` / ``val_set``.

    Subclasses fill ``train_set`` and ``val_set`` in ``setup``; ``test`` uses the validation
    split. Training batches are shuffled (unless ``shuffle_train`` is False) and the last
    incomplete batch is dropped, so every optimizer step sees the same global batch.

    Args:
        batch_size: micro-batch per rank.
        num_workers: DataLoader workers.
        resizable: train through a `ResizableDataLoader` (a `ResizableBatchSampler` seeded with
            ``seed``), which ``adabatch.resize: sampler|auto`` needs to grow the micro-batch.
            It has no length: ``val_check_interval``/``limit_train_batches`` must be ints, and
            under DDP set ``trainer.use_distributed_sampler: false`` (the sampler shards).
        seed: shuffling seed of the resizable sampler (the plain loader uses the global seed).
    """

    shuffle_train = True

    def __init__(self, batch_size: int, num_workers: int, resizable: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        check_positive("num_workers", num_workers, allow_zero=True)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resizable = resizable
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders")
        return DataLoader(dataset, batch_size=self.batch_size,
                          shuffle=train and self.shuffle_train, drop_last=train,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if not self.resizable:
            return self._loader(self.train_set, train=True)
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders")
        sampler = ResizableBatchSampler(self.train_set, self.batch_size,
                                        shuffle=self.shuffle_train, seed=self.seed,
                                        drop_last=True)
        return ResizableDataLoader(self.train_set, sampler, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
