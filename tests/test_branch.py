"""The branched critical-batch probe inside real (CPU) Lightning runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import SamplerData, StepRecorder, model_near_optimum, trainer
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSize
from adabatch.control.critical import CriticalBatchProbe, critical_batch_from_ratio
from adabatch.control.policy import CriticalBatchPolicy, FixedPolicy
from adabatch.control.rules import ScalingRules
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel


class ProbeOnly(FixedPolicy):
    """Runs the probe but never changes the batch: isolates the probe's side effects."""

    def __init__(self, probe: CriticalBatchProbe) -> None:
        super().__init__()
        self._probe = probe
        self.results: list = []

    @property
    def probe(self) -> CriticalBatchProbe:
        return self._probe

    def observe_probe(self, result) -> None:
        self.results.append(result)


def _fit(tmp_path, policy, steps=120, accumulate=1, model=None, noise_std=1.0, **kw):
    seed_everything(0)
    model = model or LeastSquaresModel(dim=8, lr=0.05, init_scale=2.0)
    data = LeastSquaresData(dim=8, batch_size=4, num_samples=4096, noise_std=noise_std)
    cb = AdaptiveBatchSize(policy=policy, noise="per_example", ref_batch_size=4 * accumulate,
                           half_life_samples=200, **kw)
    rec = StepRecorder()
    trainer(tmp_path, [cb, rec], max_steps=steps, accumulate_grad_batches=accumulate).fit(
        model, data)
    return model, cb, rec


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_probe_leaves_the_main_run_bit_identical(tmp_path, accumulate):
    probe = CriticalBatchProbe(window_steps=4, eval_samples=32, max_overhead=0.5)
    plain_model, _, plain_rec = _fit(tmp_path / "a", FixedPolicy(), accumulate=accumulate)
    policy = ProbeOnly(probe)
    model, cb, rec = _fit(tmp_path / "b", policy, accumulate=accumulate)
    assert len(policy.results) >= 3, "the test needs probes to have run"
    torch.testing.assert_close(model.linear.weight, plain_model.linear.weight, rtol=0, atol=0)
    assert [r["lr"] for r in rec.rows] == [r["lr"] for r in plain_rec.rows]
    assert [r["batch"] for r in rec.rows] == [r["batch"] for r in plain_rec.rows]
    # the budget: probe compute within max_overhead of the samples trained
    assert cb._branch.spent <= probe.max_overhead * cb.samples
    assert cb._branch.spent == sum(r.cost for r in policy.results)
    assert all(r.batch_size == 4 * accumulate for r in policy.results)


def test_the_probe_sees_a_larger_critical_batch_near_the_optimum(tmp_path):
    """Far from w* the gradient dominates (B_noise of order the dimension): doubling the
    batch loses progress per sample (r well below 1). Near w* the noise dominates (B_noise
    in the thousands): the same samples at 2B make the same progress (r -> 1). The probe
    must tell them apart."""
    probe = CriticalBatchProbe(window_steps=8, eval_samples=128, max_overhead=1.0,
                               refresh_samples_factor=1.01)

    def ratios(model, noise_std=1.0):
        policy = ProbeOnly(probe)
        _fit(tmp_path, policy, steps=200, model=model, noise_std=noise_std)
        return [r.ratio for r in policy.results if r.ratio is not None]

    far = ratios(LeastSquaresModel(dim=8, lr=0.01, init_scale=20.0, noise_std=0.01), 0.01)
    near = ratios(model_near_optimum(offset=0.01, dim=8, lr=0.01))
    assert far and near
    far_r, near_r = sum(far) / len(far), sum(near) / len(near)
    assert far_r < 0.9 < near_r, (far, near)  # measured: 0.82 and 0.98
    assert critical_batch_from_ratio(far_r, 4, 2) < 32 < critical_batch_from_ratio(near_r, 4, 2)


def test_the_default_policy_grows_the_batch_from_probes(tmp_path):
    seed_everything(0)
    model = model_near_optimum(offset=0.3, dim=8, lr=0.01)
    data = LeastSquaresData(dim=8, batch_size=4, num_samples=8192)
    probe = CriticalBatchProbe(window_steps=8, eval_samples=64, max_overhead=0.2)
    cb = AdaptiveBatchSize(policy=CriticalBatchPolicy(probe=probe), ref_batch_size=4,
                           half_life_samples=500, max_batch_size=256)
    trainer(tmp_path, [cb], max_steps=600, log_every_n_steps=1).fit(model, data)
    assert cb.policy.results and cb.policy.rho is not None
    assert cb.history and cb.history[0]["from"] == 4 and cb.batch_size > 4
    assert all(h["batch_size"] > h["from"] for h in cb.history)  # never decreases
    assert cb._branch.spent <= 0.2 * cb.samples


def test_resume_during_an_open_window_is_exact(tmp_path):
    probe = CriticalBatchProbe(window_steps=8, eval_samples=64, max_overhead=0.5)

    def run(root, ckpt_path=None, save=False):
        seed_everything(0)
        model = model_near_optimum(offset=0.05, dim=8, lr=0.01)
        data = SamplerData(dim=8, batch_size=4, num_samples=8192)
        cb = AdaptiveBatchSize(policy=CriticalBatchPolicy(probe=probe), ref_batch_size=4,
                               half_life_samples=200, max_batch_size=64)
        extra = [ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")] if save else []
        trainer(root, [cb, *extra], max_steps=150, enable_checkpointing=save).fit(
            model, data, ckpt_path=ckpt_path)
        return model, cb

    full_model, full_cb = run(tmp_path / "a", save=True)
    assert full_cb.policy.results, "the test needs a probe"
    # a step inside the first window: after it opened, before it closed
    first = full_cb.policy.results[0]
    inside = first.samples // 4 - probe.window_steps // 2
    model, cb = run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / f"step={inside}.ckpt"))
    assert cb.history == full_cb.history
    def key(r):
        return r.samples, r.batch_size, r.progress, r.branch_progress, r.gns

    assert [key(r) for r in cb.policy.results] == [key(r) for r in full_cb.policy.results]
    torch.testing.assert_close(model.linear.weight, full_model.linear.weight, rtol=0, atol=0)


def test_bad_probe_settings_name_the_value():
    for kwargs, match in (({"factor": 1}, "factor=1"), ({"window_steps": 5}, "window_steps=5"),
                          ({"max_overhead": 0.0}, "max_overhead=0.0"),
                          ({"tolerance": math.nan}, "tolerance=nan"),
                          ({"eval_samples": True}, "eval_samples=True")):
        with pytest.raises(ValueError, match=match):
            CriticalBatchProbe(**kwargs)


def test_two_ranks_probe_and_decide_identically(tmp_path):
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    proc = subprocess.run(
        [sys.executable, str(here / "scripts" / "ddp_branch.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["results"], "the test needs a probe"
    assert r0 == r1  # same probes, same decisions, same weights on both ranks
    assert r0["spent"] <= 0.3 * r0["samples"]


class QuadraticOnAxes(LightningModule):
    """Per-example loss ``|w - z_i|^2 / 2`` with every ``z_i`` on an axis of its own.

    ``w`` is the weight of a bias-free ``Linear(1, D)`` fed ``x = 1`` (so the per-example probe
    covers it). The first ``zeros`` examples are ``z = 0`` (they become the probe set, whose
    loss is then exactly ``|w|^2 / 2``); example ``i >= zeros`` is ``s e_i``, orthogonal to
    every other example and to ``w``'s starting direction ``e_0``. A batch's noise is then
    orthogonal to everything before it, and its squared norm is exactly its expectation,
    ``s^2 / B``, at every batch size: the progress of any SGD schedule is a closed form.
    """

    def __init__(self, dim: int, w0: float, lr: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, dim, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0, 0] = w0
        self.lr = lr

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, z = batch
        return 0.5 * (self.linear(x) - z).square().sum(1).mean()

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _closed_form_loss(w0_sq: float, lr: float, steps: int, noise_sq: float) -> float:
    """``|w|^2 / 2`` after ``steps`` SGD steps from ``|w0|^2`` when each step's batch-mean
    noise has squared norm ``noise_sq`` and is orthogonal to all else:
    ``w <- (1 - lr) w + lr xi``."""
    a = (1.0 - lr) ** 2
    return 0.5 * (a**steps * w0_sq + lr**2 * noise_sq * sum(a**j for j in range(steps)))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_probe_reports_the_closed_form_critical_batch(tmp_path, accumulate):
    """End to end through the callback: every probe's L0, progress, branch progress and
    B_crit equal a closed form (float64) computed from the problem alone, and the noise
    scale the callback measured is exactly ``s^2 / |w|^2``."""
    batch, zeros, s, w0, lr, window, k, half_life = 4, 8, 3.0, 2.0, 0.1, 4, 2, 16.0
    micro = batch // accumulate
    n = 400
    dim = 1 + n
    z = torch.zeros(n, dim, dtype=torch.float64)
    z[torch.arange(zeros, n), torch.arange(zeros, n) + 1] = s
    x = torch.ones(n, 1, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, z), batch_size=micro, shuffle=False)
    probe = CriticalBatchProbe(factor=k, window_steps=window, eval_samples=zeros,
                               max_overhead=1.0, refresh_samples_factor=1.2)
    policy = ProbeOnly(probe)
    cb = AdaptiveBatchSize(policy=policy, noise="per_example", ref_batch_size=batch,
                           rules=ScalingRules(lr="kappa"), half_life_samples=half_life)
    rec = _WeightRecorder()
    model = QuadraticOnAxes(dim, w0, lr)
    trainer(tmp_path, [cb, rec], max_steps=(n - zeros) // batch,
            accumulate_grad_batches=accumulate).fit(model, loader)
    results = [r for r in policy.results if r.ratio is not None]
    assert len(results) >= 3, "the test needs probes"
    for r in results:
        end = r.samples // batch  # the step that closed the window
        w_open_sq = rec.sq_norms[end - window]
        assert r.batch_size == batch and r.factor == k
        main = _closed_form_loss(w_open_sq, lr, window, s * s / batch)
        branch = _closed_form_loss(w_open_sq, k * lr, window // k, s * s / (k * batch))
        l0 = 0.5 * w_open_sq
        assert r.progress == pytest.approx(l0 - main, rel=1e-9)
        assert r.branch_progress == pytest.approx(l0 - branch, rel=1e-9)
        ratio = (l0 - branch) / (l0 - main)
        assert r.critical_batch == pytest.approx(
            critical_batch_from_ratio(ratio, batch, k), rel=1e-6)
        # B_simple at the window's end: the ratio of two EMAs (half-life 16 samples) of the
        # per-step estimates, each exact here: |G_j|^2 = |w_(j-1)|^2 and tr(Sigma_j) = s^2
        # (0 on the probe set's steps, whose examples are all z = 0)
        decay = [2.0 ** (-batch / half_life * (end - j)) for j in range(1, end + 1)]
        trace = sum(d * (s * s if j * batch > zeros else 0.0)
                    for j, d in enumerate(decay, start=1))
        grad = sum(d * rec.sq_norms[j - 1] for j, d in enumerate(decay, start=1))
        assert r.gns == pytest.approx(trace / grad, rel=1e-9)
    # all three outcomes occur: far from w = 0 at this lr (well below the optimal one) the
    # doubled lr wins outright (r > 1: B_crit above what a probe resolves); near the noise
    # floor the branch ends higher (r < 1/k: B_crit <= B); in between, a finite level
    crit = [r.critical_batch for r in results]
    assert crit[0] == math.inf and crit[-1] == 0.0 and any(0 < c < math.inf for c in crit)


class _WeightRecorder(Callback):
    """``|w|^2`` after each number of optimizer steps taken (index 0: before the first)."""

    def __init__(self) -> None:
        self.sq_norms: list[float] = []

    def _record(self, trainer, pl_module) -> None:  # noqa: ANN001
        if len(self.sq_norms) == trainer.global_step:
            self.sq_norms.append(float(pl_module.linear.weight.detach().square().sum()))

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._record(trainer, pl_module)
