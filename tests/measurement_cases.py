"""End-to-end measurement runs with exact answers, shared by tests/test_measurement_e2e.py and
the DDP script tests/scripts/ddp_measurement.py.

Least squares at frozen weights (lr ~ 0): the population |G|^2 and tr(Sigma) are constant and
known in closed form (`LeastSquaresProblem.exact_stats`), and `FreshSamples` makes every
example an independent draw from the population, so the estimator's average over the run
targets exactly those values (no finite-data bias, DESIGN.md). A second, deterministic oracle:
the model records the micro-batches of every optimizer step, so the last step's per-step
estimates are recomputed here in float64 from the very examples the step used. The data set
is sized so that the last step is a short accumulation window (k = 4: 2 of 4 micro-batches).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adabatch import AdaptiveBatchSize
from adabatch.control.policy import FixedPolicy
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel

GLOBAL_BATCH = 16
STEPS = 150
DIM = 4


class RecordingModel(LeastSquaresModel):
    """Keeps the micro-batches of the step being accumulated and of the last step taken."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window: list[tuple[list, list]] = []
        self.last_window: list[tuple[list, list]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        self.window.append((x.double().tolist(), y.double().tolist()))
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Runs after the callbacks' hook of the same name: adabatch has measured this step.
        self.last_window, self.window = self.window, []


def make_run(source: str, accumulation: int, world: int, steps: int = STEPS
             ) -> tuple[RecordingModel, Any, Any]:
    """Model, data and callback for one configuration (micro-batch = 16 / (k * world))."""
    micro = GLOBAL_BATCH // (accumulation * world)
    torch.manual_seed(0)
    model = RecordingModel(dim=DIM, lr=1e-12, init_scale=0.0)
    # w = 0: d = -w_star, B_simple = exact_stats(w)["gns"] ~ 3.8 for this problem
    # A short last step with accumulation: half a window more than STEPS full steps.
    extra = GLOBAL_BATCH // 2 if accumulation > 1 else 0
    data = LeastSquaresData(dim=DIM, batch_size=micro, fresh=True,
                            num_samples=steps * GLOBAL_BATCH + extra, val_samples=16)
    cb = AdaptiveBatchSize(noise=source, policy=FixedPolicy(), ref_batch_size=GLOBAL_BATCH,
                           half_life_samples=1e12, log_every_n_steps=10**6)
    return model, data, cb


def exact_last_step(windows: list[list[tuple[list, list]]], w: torch.Tensor, source: str
                    ) -> tuple[float, float]:
    """Per-step (|G|^2, tr Sigma) estimates of one step from its micro-batches (all ranks)."""
    grads = []  # per micro-batch: per-example gradients [m, dim]
    for window in windows:
        for xs, ys in window:
            x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
            grads.append(x * (x @ w - y)[:, None])
    allg = torch.cat(grads)
    big_n = float(len(allg))
    big = float(allg.mean(0).square().sum())
    if source == "per_example":
        b, small = 1.0, float(allg.square().sum(1).mean())
    else:
        b = big_n / len(grads)
        small = float(torch.stack([g.mean(0).square().sum() for g in grads]).mean())
    g_t = (big_n * big - b * small) / (big_n - b)
    s_t = (small - big) * b * big_n / (big_n - b)
    return g_t, s_t


def summary(cb: AdaptiveBatchSize, model: RecordingModel) -> dict[str, Any]:
    """What a test compares: the estimate with its standard errors, the exact values, the
    last step's estimates and its micro-batches."""
    est = cb.estimator
    state = est.state_dict()
    w = model.linear.weight.detach().double().reshape(-1)
    exact = {k: float(v) for k, v in model.problem.exact_stats(w).items()}
    ess = est.effective_sample_size
    se = {}
    for key, m2 in (("grad_sq", "m2_grad_sq"), ("trace_sigma", "m2_trace_sigma")):
        var = state[m2] / (state["weight"] * (ess - 1.0)) if ess > 1 else math.inf
        se[key] = math.sqrt(max(var, 0.0))
    return {
        "grad_sq": est.grad_sq, "trace_sigma": est.trace_sigma, "gns": est.gns,
        "gns_rel_std": est.gns_rel_std, "se": se, "exact": exact,
        "num_updates": est.num_updates, "num_skipped": est.num_skipped,
        "steps": cb.steps, "samples": cb.samples,
        "last_grad_sq": est.last_grad_sq, "last_trace_sigma": est.last_trace_sigma,
        "last_window": model.last_window, "w": w.tolist(),
    }


def check(result: dict[str, Any], source: str, accumulation: int,
          windows: list[list[tuple[list, list]]], steps: int = STEPS,
          power: float = 0.1) -> None:
    """Assert the run measured exactly what the closed form and the last step's data say.

    Tolerance of the run's average: 4 standard errors of the mean of the per-step estimates
    (from the estimator's own weighted spread; the steps are independent at frozen weights),
    which are at most ``power`` of the exact values (150 steps: ~6% for |G|^2 with b = 1),
    while every mutant in benchmarks/mutants.py moves one of them by 2x or more (or leaves the
    estimate empty). The last step's estimates must match its own data to float precision.
    """
    steps = steps + (1 if accumulation > 1 else 0)
    assert result["steps"] == steps and result["num_skipped"] == 0
    assert result["num_updates"] == steps
    exact, se = result["exact"], result["se"]
    for key in ("grad_sq", "trace_sigma"):
        assert se[key] < power * exact[key], (key, se, exact)  # the check has power
        assert abs(result[key] - exact[key]) < 4 * se[key], (key, result[key], exact[key], se)
    rel = result["gns_rel_std"]
    assert abs(result["gns"] - exact["gns"]) < 4 * rel * exact["gns"]
    w = torch.tensor(result["w"], dtype=torch.float64)
    g_t, s_t = exact_last_step(windows, w, source)
    assert result["last_grad_sq"] == _approx(g_t)
    assert result["last_trace_sigma"] == _approx(s_t)


def _approx(value: float) -> Any:
    import pytest

    return pytest.approx(value, rel=1e-4, abs=1e-6)
