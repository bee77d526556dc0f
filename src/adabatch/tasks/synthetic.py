"""Least-squares regression whose gradient noise scale is known in closed form.

Data: x ~ N(0, S) with S = diag(spectrum), y = x . w_star + N(0, noise_std^2), per-example
loss (x . w - y)^2 / 2. With d = w - w_star the per-example gradient is x (x . d - e), so

    G       = S d
    Sigma   = S d d^T S + (d^T S d + noise_std^2) S
    B_noise = tr(Sigma) / |G|^2 = 1 + (d^T S d + noise_std^2) tr(S) / |S d|^2

(McCandlish et al. 2018 define B_simple = tr(Sigma) / |G|^2.) The noise scale grows as
training shrinks d, which is what an adaptive batch size exploits.

`LeastSquaresData` and `LeastSquaresModel` wrap the problem as a Lightning task whose model
logs the exact noise scale at its current weights (``synthetic/exact_gns``), to compare with
the measured ``adabatch/gns``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from adabatch.tasks.common import OptimizerName, TaskData, TaskModule, check_positive


@dataclass(frozen=True)
class LeastSquaresProblem:
    """A linear-regression problem with exact gradient statistics.

    Args:
        dim: number of features.
        noise_std: standard deviation of the label noise.
        condition: ratio of the largest to the smallest eigenvalue of S (log-spaced spectrum).
        seed: seed for ``w_star``.

    Example::

        >>> p = LeastSquaresProblem(dim=4, noise_std=0.5, seed=0)
        >>> w = torch.zeros(4, dtype=torch.float64)
        >>> stats = p.exact_stats(w)
        >>> bool(stats["gns"] > 1.0)
        True
    """

    dim: int = 16
    noise_std: float = 1.0
    condition: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim={self.dim} must be >= 1")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0")
        if self.condition < 1:
            raise ValueError(f"condition={self.condition} must be >= 1")

    @property
    def spectrum(self) -> Tensor:
        """Eigenvalues of the data covariance S (float64, mean 1)."""
        s = torch.logspace(0, -torch.log10(torch.tensor(self.condition)).item(), self.dim,
                           dtype=torch.float64)
        return s / s.mean()

    @property
    def w_star(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.dim, generator=g, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` examples ``(x [n, dim], y [n])`` in float64."""
        x = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = x * self.spectrum.sqrt()
        e = torch.randn(n, generator=generator, dtype=torch.float64) * self.noise_std
        return x, x @ self.w_star + e

    def exact_stats(self, w: Tensor) -> dict[str, Tensor]:
        """Exact ``grad_sq`` (|G|^2), ``trace_sigma`` (tr Sigma) and ``gns`` at weights ``w``."""
        s = self.spectrum
        d = w.detach().to(torch.float64).reshape(-1) - self.w_star
        if d.numel() != self.dim:
            raise ValueError(f"w has {d.numel()} elements, expected dim={self.dim}")
        g = s * d
        grad_sq = g.square().sum()
        quad = (s * d.square()).sum()
        trace_sigma = grad_sq + (quad + self.noise_std**2) * s.sum()
        return {"grad_sq": grad_sq, "trace_sigma": trace_sigma, "gns": trace_sigma / grad_sq}

    def loss(self, w: Tensor) -> Tensor:
        """Expected loss E[(x . w - y)^2 / 2] = (d^T S d + noise_std^2) / 2."""
        d = w.detach().to(torch.float64).reshape(-1) - self.w_star
        return ((self.spectrum * d.square()).sum() + self.noise_std**2) / 2


class FreshSamples(Dataset):
    """A virtual dataset of ``length`` examples, each drawn on access from its own seed.

    Item ``i`` is always the same example (so runs are reproducible and samplers work), but
    no two indices share one: with ``length`` much larger than the samples a run uses, every
    batch is fresh data from the population, and the noise-scale target is exactly
    `LeastSquaresProblem.exact_stats` (no finite-data bias).
    """

    def __init__(self, problem: LeastSquaresProblem, length: int, seed: int) -> None:
        self.problem = problem
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} examples")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        x, y = self.problem.sample(1, generator=g)
        return x[0].float(), y[0].float()


class LeastSquaresData(TaskData):
    """Examples of a `LeastSquaresProblem`: a fixed seeded draw, or fresh samples.

    Args:
        dim, noise_std, condition, problem_seed: the `LeastSquaresProblem` (``problem_seed``
            is its ``seed``: it fixes ``w_star``). The model's must match.
        batch_size: micro-batch per rank.
        num_samples: training examples per epoch.
        fresh: draw every training example independently on access (the population itself)
            instead of a fixed dataset of ``num_samples``; a fixed set of N examples biases
            the measured noise scale by about B_simple / N (docs/DESIGN.md).
        val_samples: size of the fixed validation set.
        num_workers: DataLoader workers.
        resizable: a resizable training loader (see `TaskData`), for ``adabatch.resize:
            sampler|auto``.
        seed: seed of the data draws (and of the resizable sampler).

    Example::

        >>> dm = LeastSquaresData(dim=4, batch_size=8, num_samples=64)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape)
        ((8, 4), (8,))
    """

    def __init__(
        self,
        dim: int = 16,
        noise_std: float = 1.0,
        condition: float = 10.0,
        problem_seed: int = 0,
        batch_size: int = 32,
        num_samples: int = 65_536,
        fresh: bool = False,
        val_samples: int = 4096,
        num_workers: int = 0,
        resizable: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, resizable=resizable,
                         seed=seed)
        check_positive("num_samples", num_samples)
        check_positive("val_samples", val_samples)
        self.problem = LeastSquaresProblem(dim=dim, noise_std=noise_std, condition=condition,
                                           seed=problem_seed)
        self.num_samples = num_samples
        self.fresh = fresh
        # Fresh samples need no shuffling: every index is already an independent draw.
        self.shuffle_train = not fresh
        self.val_samples = val_samples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # Separate streams for train and validation so one's size never shifts the other.
        g_val = torch.Generator().manual_seed(2 * self.seed + 1)
        self.val_set = TensorDataset(*(t.float() for t in self.problem.sample(self.val_samples,
                                                                              g_val)))
        if self.fresh:
            self.train_set = FreshSamples(self.problem, self.num_samples, self.seed)
        else:
            g = torch.Generator().manual_seed(2 * self.seed)
            x, y = self.problem.sample(self.num_samples, g)
            self.train_set = TensorDataset(x.float(), y.float())


class LeastSquaresModel(TaskModule):
    """A linear model ``nn.Linear(dim, 1, bias=False)`` with loss ``(x . w - y)^2 / 2``.

    Logs the exact statistics at the current weights every training step:
    ``synthetic/exact_gns`` (B_simple), ``synthetic/exact_grad_sq``,
    ``synthetic/exact_trace_sigma`` and ``synthetic/exact_loss`` (population loss).

    Args:
        dim, noise_std, condition, problem_seed: the `LeastSquaresProblem`; must equal the
            DataModule's (checked at setup when it is a `LeastSquaresData`).
        init_scale: weights start at ``init_scale * N(0, 1/dim)`` (seeded by the global seed).
        lr, optimizer, momentum, weight_decay, betas: see `TaskModule`.

    Example::

        >>> m = LeastSquaresModel(dim=4)
        >>> x, y = m.problem.sample(8)
        >>> bool(m.loss((x.float(), y.float())) > 0)
        True
    """

    def __init__(
        self,
        dim: int = 16,
        noise_std: float = 1.0,
        condition: float = 10.0,
        problem_seed: int = 0,
        init_scale: float = 0.0,
        lr: float = 0.1,
        optimizer: OptimizerName = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__(lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, betas=betas)
        check_positive("init_scale", init_scale, allow_zero=True)
        self.save_hyperparameters()
        self.problem = LeastSquaresProblem(dim=dim, noise_std=noise_std, condition=condition,
                                           seed=problem_seed)
        self.linear = nn.Linear(dim, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, init_scale / math.sqrt(dim))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_problem = getattr(datamodule, "problem", None)
        if isinstance(data_problem, LeastSquaresProblem) and data_problem != self.problem:
            raise ValueError(
                f"the model's problem {self.problem} differs from the data's {data_problem}: "
                "set dim/noise_std/condition/problem_seed the same in model and data"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * (self(x) - y).square().mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        stats = self.problem.exact_stats(self.linear.weight)
        self.log_dict({
            "synthetic/exact_gns": stats["gns"].float(),
            "synthetic/exact_grad_sq": stats["grad_sq"].float(),
            "synthetic/exact_trace_sigma": stats["trace_sigma"].float(),
            "synthetic/exact_loss": self.problem.loss(self.linear.weight).float(),
        }, on_step=True, on_epoch=False, batch_size=len(batch[0]))
        return loss

