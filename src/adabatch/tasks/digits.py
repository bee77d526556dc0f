"""A small CNN on scikit-learn's bundled digits (1797 8x8 images; no download).

No batch norm: it mixes examples within a batch, which would make per-example gradients
(and so the measured noise scale) meaningless.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from adabatch.tasks.common import (
    OptimizerName,
    TaskData,
    TaskModule,
    check_fraction,
    check_positive,
)


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``(x [N, 1, 8, 8] float32 in [0, 1], y [N] int64)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits task needs scikit-learn: pip install 'adabatch[tasks]'"
        ) from e
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.as_tensor(bunch.target, dtype=torch.long)


class DigitsData(TaskData):
    """scikit-learn digits split into train/validation by a seeded permutation.

    ``test`` uses the validation split.

    Args:
        batch_size: micro-batch per rank.
        val_fraction: fraction of the 1797 images held out.
        num_workers: DataLoader workers.
        resizable: a resizable training loader (see `TaskData`), for ``adabatch.resize:
            sampler|auto``.
        seed: seed of the split (independent of the global seed) and of the resizable
            sampler.

    Example::

        >>> dm = DigitsData(batch_size=8)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set)
        (1438, 359)
    """

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, num_workers: int = 0,
                 resizable: bool = False, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, resizable=resizable,
                         seed=seed)
        check_fraction("val_fraction", val_fraction)
        self.val_fraction = val_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(y))
        val, train = perm[:n_val], perm[n_val:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])


class DigitsCNN(TaskModule):
    """Two 3x3 convolutions, a 2x2 max-pool and a two-layer classifier head.

    Args:
        channels: output channels of the two convolutions.
        hidden: width of the hidden Linear layer.
        lr, optimizer, momentum, weight_decay, betas: see `TaskModule`.

    Example::

        >>> m = DigitsCNN(channels=(4, 8), hidden=16)
        >>> tuple(m(torch.zeros(5, 1, 8, 8)).shape)
        (5, 10)
    """

    def __init__(
        self,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        lr: float = 0.05,
        optimizer: OptimizerName = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__(lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, betas=betas)
        c1, c2 = channels
        for name, value in [("channels[0]", c1), ("channels[1]", c2), ("hidden", hidden)]:
            check_positive(name, value)
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val_acc", acc, on_epoch=True, batch_size=len(y))
        return super().validation_step(batch, batch_idx)
