"""The branched critical-batch probe inside real (CPU) Lightning runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import probe_oracle
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import SamplerData, StepRecorder, model_near_optimum, trainer
from probe_oracle import ProbeOnly
from torch.utils.data import DataLoader

from adabatch import AdaptiveBatchSize
from adabatch.control.critical import CriticalBatchProbe, ProbeResult
from adabatch.control.policy import CriticalBatchPolicy, FixedPolicy
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel


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
    probe = CriticalBatchProbe(window_steps=4, eval_samples=32, max_overhead=0.5,
                               refresh_samples_factor=1.2)
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


def test_the_probe_tells_an_lr_near_its_limit_from_one_far_below(tmp_path):
    """The branch runs at k B with k times the main run's lr (SGD). Far below the lr's
    curvature limit the same samples at 2B then make the same progress (r -> 1, whatever the
    noise: a saturating AdaScale gain would have fixed the branch's lr from the noise scale,
    and the probe would only have measured the noise scale again); with the lr a few times
    closer to the limit the doubled step overshoots and r falls well below 1."""
    probe = CriticalBatchProbe(window_steps=8, eval_samples=128, max_overhead=1.0,
                               refresh_samples_factor=1.01)

    def first_ratio(lr):
        policy = ProbeOnly(probe)
        model = LeastSquaresModel(dim=8, lr=lr, init_scale=20.0, noise_std=0.01)
        _fit(tmp_path / str(lr), policy, steps=60, model=model, noise_std=0.01)
        return policy.results[0].ratio

    far, near = first_ratio(0.01), first_ratio(0.3)
    assert far > 0.99 and near < 0.95, (far, near)  # measured: 1.008 and 0.897


def test_the_summary_reports_the_probes_and_advises_a_larger_start_only_without_loss(tmp_path):
    """The run summary names the probes' count, cost and last critical batch; it advises a
    larger starting batch only when every conclusive probe found no loss at k x B (an lr far
    below its limit), not when one did (an lr near it)."""
    probe = CriticalBatchProbe(window_steps=8, eval_samples=128, max_overhead=1.0,
                               refresh_samples_factor=1.01)

    def summary(lr):
        policy = ProbeOnly(probe)
        model = LeastSquaresModel(dim=8, lr=lr, init_scale=20.0, noise_std=0.01)
        _, cb, _ = _fit(tmp_path / str(lr), policy, steps=150, model=model, noise_std=0.01)
        s = cb.run_summary
        conclusive = [r for r in policy.results if r.ratio is not None]
        assert s.probe_windows == len(policy.results) and s.probe_conclusive == len(conclusive)
        assert s.probe_overhead == pytest.approx(cb._branch.spent / cb.samples)
        assert s.probe_last["ratio"] == conclusive[-1].ratio
        assert "critical batch" in str(s) and f"{s.probe_windows} probe window(s)" in str(s)
        return s, conclusive

    far, probes = summary(0.01)
    assert len(probes) >= 2 and all(r.ratio > 0.99 for r in probes)
    assert far.larger_start and "advice" in str(far) and "starting at 2x" in str(far)
    assert not far.critical_batch_bounded and far.critical_batch == probes[-1].resolvable
    near, probes = summary(0.3)
    assert probes[0].ratio < 0.95
    assert not near.larger_start and "advice" not in str(near)


@pytest.mark.parametrize(("optimizer", "lr_ratio"), [("sgd", 2.0), ("adamw", 2.0**0.5)])
def test_the_branch_lr_is_k_times_the_main_runs_under_the_saturating_gain(tmp_path, optimizer,
                                                                           lr_ratio):
    """Under the default AdaScale rule, at B = 4 B_ref with a measured noise scale (the main
    run's gain strictly between 1 and kappa), the branch at 2B gets exactly 2x (SGD) or
    sqrt 2 x (Adam) the main run's lr factor, while the rules' other factors are those of 2B;
    the gain at 2B itself would give less."""
    from lightning.pytorch import Callback

    from adabatch.control.rules import adascale_gain

    class Check(Callback):
        def __init__(self) -> None:
            self.rows: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            est = cb.estimator
            if trainer.global_step < 20 or est.grad_sq is None or self.rows:
                return
            main, branch = cb._apply_factors(4), cb._apply_branch_factors(8)
            cb._scaler.restore()
            gain4 = adascale_gain(est.trace_sigma, est.grad_sq, 4, 1.0)
            gain8 = adascale_gain(est.trace_sigma, est.grad_sq, 8, 1.0)
            self.rows.append((main, branch, gain4, gain8))

    seed_everything(0)
    model = LeastSquaresModel(dim=8, lr=0.01, init_scale=2.0, optimizer=optimizer)
    data = LeastSquaresData(dim=8, batch_size=4, num_samples=4096)
    cb = AdaptiveBatchSize(policy=ProbeOnly(CriticalBatchProbe()), ref_batch_size=1,
                           half_life_samples=200)
    check = Check()
    trainer(tmp_path, [cb, check], max_steps=30).fit(model, data)
    (main, branch, gain4, gain8), = check.rows
    root = (lambda g: g) if optimizer == "sgd" else math.sqrt
    assert 1.0 < gain4 < 4.0 and gain8 < 2 * gain4
    assert main["lr_factor"] == pytest.approx(root(gain4), rel=1e-12)
    assert branch["lr_factor"] == pytest.approx(lr_ratio * main["lr_factor"], rel=1e-12)
    assert branch["kappa"] == 8.0
    if optimizer == "adamw":
        assert branch["eps_factor"] == pytest.approx(8.0**-0.5)


def test_the_ratio_error_is_the_delta_method_over_probe_batches():
    """``ratio_std`` against an independent computation: the influence of each probe batch on
    ``r`` by autograd (float64), ``var(r) = sum_i (dr/dw_i)^2`` at unit batch weights."""
    from adabatch.branch import BranchRunner

    class Strategy:
        @staticmethod
        def reduce(t, reduce_op):  # noqa: ANN001, ANN205 - one rank: the identity
            return t

    class Trainer:
        strategy = Strategy()

    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([4.0, 4.0, 3.0, 5.0, 4.0], dtype=torch.float64)
    l0 = torch.stack([2.0 + torch.rand(5, generator=gen, dtype=torch.float64), sizes], 1)
    main = torch.stack([l0[:, 0] - 0.5 - 0.1 * torch.rand(5, generator=gen,
                                                          dtype=torch.float64), sizes], 1)
    branch = torch.stack([l0[:, 0] - 0.4 - 0.2 * torch.rand(5, generator=gen,
                                                            dtype=torch.float64), sizes], 1)
    progress, branch_progress, std = BranchRunner._compare(Trainer(), l0, main, branch)

    w = torch.ones(5, dtype=torch.float64, requires_grad=True)
    a, c = l0[:, 0] - branch[:, 0], l0[:, 0] - main[:, 0]
    r = (w * sizes * a).sum() / (w * sizes * c).sum()
    (influence,) = torch.autograd.grad(r, w)
    assert branch_progress / progress == pytest.approx(r.item(), rel=1e-12)
    assert progress == pytest.approx(float((sizes * c).sum() / sizes.sum()), rel=1e-12)
    assert std == pytest.approx(float(influence.square().sum().sqrt()), rel=1e-9)
    assert std > 0
    one = BranchRunner._compare(Trainer(), l0[:1], main[:1], branch[:1])
    assert one[2] is None  # one batch: no spread to measure


def test_a_window_saved_without_per_batch_losses_is_dropped_on_load():
    """A checkpoint whose open window holds the probe set's loss as one number (no per-batch
    losses to compare) loads with the window dropped: the probe opens a new one later."""
    from adabatch.branch import BranchRunner

    runner = BranchRunner(CriticalBatchProbe())
    snapshot = {"model": {}, "optim": [], "groups": []}
    state = {"eval_batches": [], "eval_count": 0, "spent": 1.0, "seconds": 0.0, "last": None,
             "window": {"snapshot": snapshot, "l0": 1.5, "batch_size": 4, "steps": []}}
    runner.load_state_dict(state)
    assert runner.window is None and runner.spent == 1.0
    state["window"]["l0"] = torch.ones(2, 2, dtype=torch.float64)
    runner.load_state_dict(state)
    assert runner.window is not None and runner.window["batch_size"] == 4


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


def _two_ranks(script: str, out: Path) -> list[dict]:
    """Run ``tests/scripts/<script>`` as a 2-rank gloo job; each rank's JSON."""
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    proc = subprocess.run([sys.executable, str(here / "scripts" / script), str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_probe_and_decide_identically(tmp_path):
    r0, r1 = _two_ranks("ddp_branch.py", tmp_path)
    assert r0["results"], "the test needs a probe"
    assert r0 == r1  # same probes, same decisions, same weights on both ranks
    assert r0["spent"] <= 0.3 * r0["samples"]


@pytest.mark.parametrize(("noise", "accumulate", "lr_rule"),
                         [("per_example", 1, "kappa"), ("per_example", 2, "kappa"),
                          ("microbatch", 2, "kappa"), ("per_example", 1, "auto")])
def test_the_probe_reports_the_closed_form_critical_batch(tmp_path, noise, accumulate, lr_rule):
    """End to end through the callback: every probe's L0, progress, branch progress and
    B_crit, and the noise scale at its end, equal a closed form (float64) of the problem
    alone (`probe_oracle`). The branch's lr is k times the main run's under the plain rule and
    under the default saturating one alike (at B = B_ref the main run's AdaScale gain is 1)."""
    cb, rec = probe_oracle.callback(noise, lr_rule), probe_oracle.WeightRecorder()
    loader = DataLoader(probe_oracle.dataset(), batch_size=probe_oracle.BATCH // accumulate,
                        shuffle=False)
    trainer(tmp_path, [cb, rec], max_steps=probe_oracle.MAX_STEPS,
            accumulate_grad_batches=accumulate).fit(probe_oracle.QuadraticOnAxes(), loader)
    probe_oracle.check(cb.policy.results, rec.sq_norms)


def test_two_ranks_report_the_closed_form_critical_batch(tmp_path):
    """The same oracle under 2-rank gloo DDP (each rank replays its own micro-batches; the
    branch's gradients are averaged): both ranks report it."""
    for out in _two_ranks("ddp_probe_oracle.py", tmp_path):
        probe_oracle.check([ProbeResult.from_dict(r) for r in out["results"]], out["sq_norms"])


def test_an_inconclusive_window_delays_the_next_as_a_conclusive_one_would(tmp_path):
    """At an lr too small to move float32 weights every window sees no progress on the probe
    set (inconclusive). The next window must wait for the samples to grow by
    ``refresh_samples_factor``, as after a conclusive one, not reopen at once (back to back it
    spent the budget on windows that see the same noise)."""
    probe = CriticalBatchProbe(window_steps=4, eval_samples=32, max_overhead=1.0,
                               refresh_samples_factor=2.0, reprobe_growth=1e9)
    policy = ProbeOnly(probe)
    model = LeastSquaresModel(dim=8, lr=1e-30, init_scale=2.0)
    _, cb, _ = _fit(tmp_path, policy, steps=200, model=model)
    assert len(policy.results) >= 3, "the test needs several windows"
    assert all(r.ratio is None for r in policy.results)  # every one inconclusive
    ends = [r.samples for r in policy.results]
    assert all(b >= 2 * a for a, b in zip(ends, ends[1:])), ends
    assert cb._branch.last == policy.results[-1]
