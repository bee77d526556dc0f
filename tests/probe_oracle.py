"""A closed-form oracle for the critical-batch probe, shared by `test_branch.py` and the DDP
script `scripts/ddp_probe_oracle.py`.

Per-example loss ``|w - z_i|^2 / 2`` with every ``z_i`` on an axis of its own: a batch's noise
is orthogonal to everything before it and its squared norm is exactly its expectation, so the
probe's losses, its B_crit and the callback's B_simple are closed forms of the problem alone.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import TensorDataset

from adabatch import AdaptiveBatchSize
from adabatch.control.critical import (
    CriticalBatchProbe,
    ProbeResult,
    critical_batch_from_ratio,
)
from adabatch.control.policy import FixedPolicy
from adabatch.control.rules import ScalingRules

#: global batch, probe-set examples (z = 0), noise s, |w0|, lr, window, factor, half-life,
#: examples
BATCH, ZEROS, S, W0, LR, WINDOW, K, HALF_LIFE, N = 4, 8, 3.0, 2.0, 0.1, 4, 2, 16.0, 400


class ProbeOnly(FixedPolicy):
    """Runs the probe but never changes the batch: isolates the probe's side effects."""

    def __init__(self, probe: CriticalBatchProbe) -> None:
        super().__init__()
        self._probe = probe
        self.results: list = []

    @property
    def probe(self) -> CriticalBatchProbe:
        return self._probe

    def observe_probe(self, result) -> None:  # noqa: ANN001
        self.results.append(result)


class QuadraticOnAxes(LightningModule):
    """``w`` is the weight of a bias-free ``Linear(1, D)`` fed ``x = 1`` (so the per-example
    probe covers it); it starts at ``W0 e_0``. The first ``ZEROS`` examples are ``z = 0`` (they
    become the probe set, whose loss is then exactly ``|w|^2 / 2``); example ``i >= ZEROS`` is
    ``S e_(i+1)``, orthogonal to every other example and to ``e_0``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1 + N, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0, 0] = W0

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, z = batch
        return 0.5 * (self.linear(x) - z).square().sum(1).mean()

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=LR)


def dataset() -> TensorDataset:
    z = torch.zeros(N, 1 + N, dtype=torch.float64)
    z[torch.arange(ZEROS, N), torch.arange(ZEROS, N) + 1] = S
    return TensorDataset(torch.ones(N, 1, dtype=torch.float64), z)


def callback(noise: str, lr_rule: str = "kappa") -> AdaptiveBatchSize:
    probe = CriticalBatchProbe(factor=K, window_steps=WINDOW, eval_samples=ZEROS,
                               max_overhead=1.0, refresh_samples_factor=1.2)
    return AdaptiveBatchSize(policy=ProbeOnly(probe), noise=noise, ref_batch_size=BATCH,
                             rules=ScalingRules(lr=lr_rule), half_life_samples=HALF_LIFE)


MAX_STEPS = (N - ZEROS) // BATCH


class WeightRecorder(Callback):
    """``|w|^2`` after each number of optimizer steps taken (index 0: before the first)."""

    def __init__(self) -> None:
        self.sq_norms: list[float] = []

    def _record(self, trainer: Any, pl_module: Any) -> None:
        if len(self.sq_norms) == trainer.global_step:
            self.sq_norms.append(float(pl_module.linear.weight.detach().square().sum()))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._record(trainer, pl_module)


def closed_form_loss(w0_sq: float, lr: float, steps: int, noise_sq: float) -> float:
    """``|w|^2 / 2`` after ``steps`` SGD steps from ``|w0|^2`` when each step's batch-mean
    noise has squared norm ``noise_sq`` and is orthogonal to all else:
    ``w <- (1 - lr) w + lr xi``."""
    a = (1.0 - lr) ** 2
    return 0.5 * (a**steps * w0_sq + lr**2 * noise_sq * sum(a**j for j in range(steps)))


def check(results: list[ProbeResult], sq_norms: list[float]) -> None:
    """Every conclusive probe equals the closed form; all three outcomes occur."""
    results = [r for r in results if r.ratio is not None]
    assert len(results) >= 3, "the test needs probes"
    for r in results:
        end = r.samples // BATCH  # the step that closed the window
        w_open_sq = sq_norms[end - WINDOW]
        assert r.batch_size == BATCH and r.factor == K
        main = closed_form_loss(w_open_sq, LR, WINDOW, S * S / BATCH)
        branch = closed_form_loss(w_open_sq, K * LR, WINDOW // K, S * S / (K * BATCH))
        l0 = 0.5 * w_open_sq
        assert r.progress == pytest.approx(l0 - main, rel=1e-9)
        assert r.branch_progress == pytest.approx(l0 - branch, rel=1e-9)
        ratio = (l0 - branch) / (l0 - main)
        assert r.critical_batch == pytest.approx(
            critical_batch_from_ratio(ratio, BATCH, K), rel=1e-6)
        assert r.ratio_std == pytest.approx(0.0, abs=1e-12)  # alike probe batches: no spread
        # B_simple at the window's end: the ratio of two EMAs of the per-step estimates, each
        # exact here (per example and per micro-batch alike): |G_j|^2 = |w_(j-1)|^2 and
        # tr(Sigma_j) = s^2 (0 on the probe set's steps, whose examples are all z = 0)
        decay = [2.0 ** (-BATCH / HALF_LIFE * (end - j)) for j in range(1, end + 1)]
        trace = sum(d * (S * S if j * BATCH > ZEROS else 0.0)
                    for j, d in enumerate(decay, start=1))
        grad = sum(d * sq_norms[j - 1] for j, d in enumerate(decay, start=1))
        assert r.gns == pytest.approx(trace / grad, rel=1e-9)
    # far from w = 0 at this lr (well below the optimal one) the doubled lr wins outright
    # (r > 1: B_crit above what a probe resolves); near the noise floor the branch ends higher
    # (r < 1/k: B_crit <= B); in between, a finite level
    crit = [r.critical_batch for r in results]
    assert crit[0] == math.inf and crit[-1] == 0.0 and any(0 < c < math.inf for c in crit)
