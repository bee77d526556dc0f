"""Least-squares regression whose gradient noise scale is known in closed form.

Data: x ~ N(0, S) with S = diag(spectrum), y = x . w_star + N(0, noise_std^2), per-example
loss (x . w - y)^2 / 2. With d = w - w_star the per-example gradient is x (x . d - e), so

    G       = S d
    Sigma   = S d d^T S + (d^T S d + noise_std^2) S
    B_noise = tr(Sigma) / |G|^2 = 1 + (d^T S d + noise_std^2) tr(S) / |S d|^2

(McCandlish et al. 2018 define B_simple = tr(Sigma) / |G|^2.) The noise scale grows as
training shrinks d, which is what an adaptive batch size exploits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
