"""AdaptiveBatchSize inside real (CPU) Lightning runs on problems with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import SamplerData, StepRecorder, model_near_optimum, trainer

from adabatch import AdaptiveBatchSize
from adabatch.control.policy import FixedPolicy, NoisePolicy, RampPolicy
from adabatch.control.rules import ScalingRules
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise": "both"}, "noise='both'"),
        ({"policy": "greedy"}, "policy='greedy'"),
        ({"resize": "grow"}, "resize='grow'"),
        ({"rules": "linear"}, "rules='linear'"),
        ({"min_batch_size": 0}, "min_batch_size=0"),
        ({"max_batch_size": 8, "min_batch_size": 16}, "min_batch_size=16"),
        ({"half_life_samples": -1.0}, "half_life_samples=-1.0"),
        ({"half_life_samples": math.inf}, "half_life_samples=inf"),
        ({"half_life_samples": "long"}, "half_life_samples='long'"),
        ({"log_every_n_steps": 0}, "log_every_n_steps=0"),
        ({"log_every_n_steps": 1.5}, "log_every_n_steps=1.5"),
        ({"log_every_n_steps": math.nan}, "log_every_n_steps=nan"),
        ({"max_samples": 2.5}, "max_samples=2.5"),
        ({"enabled": "no"}, "enabled='no'"),
        ({"ref_batch_size": True}, "ref_batch_size=True"),
        ({"ref_batch_size": 0}, "ref_batch_size=0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AdaptiveBatchSize(**kwargs)


def test_disabled_callback_does_nothing(tmp_path):
    seed_everything(0)
    model = LeastSquaresModel(dim=4, lr=0.05)
    data = LeastSquaresData(dim=4, batch_size=4, num_samples=64)
    cb = AdaptiveBatchSize(enabled=False, policy=RampPolicy(ramp_samples=10))
    rec = StepRecorder()
    trainer(tmp_path, [cb, rec], max_steps=6, accumulate_grad_batches=2).fit(model, data)
    assert cb.estimator is None and cb.samples == 0 and cb.state_dict() == {}
    assert {r["lr"] for r in rec.rows} == {0.05}
    assert {r["batch"] for r in rec.rows} == {8}


def test_manual_optimization_is_refused(tmp_path):
    class Manual(LeastSquaresModel):
        def __init__(self) -> None:
            super().__init__(dim=4)
            self.automatic_optimization = False

    data = LeastSquaresData(dim=4, batch_size=4, num_samples=64)
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        trainer(tmp_path, [AdaptiveBatchSize()], max_steps=2).fit(Manual(), data)


def test_sampler_mode_refuses_a_float_batch_limit(tmp_path):
    data = SamplerData(dim=4, batch_size=4, num_samples=64)
    with pytest.raises(MisconfigurationException, match="limit_train_batches=0.5"):
        trainer(tmp_path, [AdaptiveBatchSize(resize="sampler")], max_steps=2,
                limit_train_batches=0.5).fit(LeastSquaresModel(dim=4), data)


def test_sampler_mode_needs_a_resizable_sampler(tmp_path):
    data = LeastSquaresData(dim=4, batch_size=4, num_samples=64)
    with pytest.raises(MisconfigurationException, match="ResizableBatchSampler"):
        trainer(tmp_path, [AdaptiveBatchSize(resize="sampler")], max_steps=2).fit(
            LeastSquaresModel(dim=4), data
        )


def test_noise_policy_settles_at_c_times_the_exact_noise_scale(tmp_path):
    """Frozen weights (lr ~ 0) keep B_noise constant; the policy must settle at c * B_noise."""
    seed_everything(0)
    model = model_near_optimum(offset=0.1, dim=16, lr=1e-12)
    exact = float(model.problem.exact_stats(model.linear.weight)["gns"])
    data = SamplerData(dim=16, batch_size=4, num_samples=60_000, fresh=True)
    c = 0.5
    cb = AdaptiveBatchSize(
        noise="per_example",
        policy=NoisePolicy(scale=c, confidence=0.0, hysteresis=0.05, never_decrease=False),
        resize="sampler", half_life_samples=4_000, min_batch_size=4, max_batch_size=512,
    )
    trainer(tmp_path, [cb], max_epochs=1, max_steps=-1).fit(model, data)
    assert cb.estimator.gns == pytest.approx(exact, rel=0.1)
    assert cb.batch_size == pytest.approx(c * exact, rel=0.2)
    assert len(cb.history) >= 1 and cb.history[0]["from"] == 4


@pytest.mark.parametrize(
    ("optimizer", "lr", "rule"),
    [("sgd", 0.02, "linear"), ("adamw", 0.01, "sqrt")],
)
def test_scaling_rules_keep_the_loss_curve_in_samples(tmp_path, optimizer, lr, rule):
    """At 4x the batch, the rules keep loss-vs-samples close to the reference run's."""
    small, big, n = 8, 32, 4096

    def run(batch: int, lr_rule: str) -> list[float]:
        seed_everything(0)
        model = LeastSquaresModel(dim=16, lr=lr, optimizer=optimizer, weight_decay=0.01,
                                  init_scale=1.0)
        data = LeastSquaresData(dim=16, batch_size=batch, num_samples=n)
        cb = AdaptiveBatchSize(policy=FixedPolicy(), ref_batch_size=small,
                               rules=ScalingRules(lr=lr_rule))
        rec = StepRecorder()
        trainer(tmp_path, [cb, rec], max_epochs=1).fit(model, data)
        # The population loss at each multiple of `big` samples.
        every = big // batch
        return [r["loss"] for r in rec.rows[every - 1 :: every]]

    reference = torch.tensor(run(small, "none"))
    with_rules = torch.tensor(run(big, "kappa"))
    without = torch.tensor(run(big, "none"))
    start = len(reference) // 10
    gap_rules = ((with_rules - reference).abs() / reference)[start:].mean()
    gap_none = ((without - reference).abs() / reference)[start:].mean()
    print(f"{optimizer}: relative gap with rules {gap_rules:.4f}, without {gap_none:.4f}")
    assert gap_rules < 0.5 * gap_none, (gap_rules, gap_none)


def _run_and_record(tmp_path, resize, max_steps, ckpt_path=None, save_every=None):
    seed_everything(0)
    model = LeastSquaresModel(dim=8, lr=0.1, init_scale=1.0)
    data = SamplerData(dim=8, batch_size=2, num_samples=4096)
    policy = NoisePolicy(scale=0.5, confidence=0.0, hysteresis=0.1, never_decrease=False)
    cb = AdaptiveBatchSize(noise="per_example", policy=policy, resize=resize,
                           half_life_samples=100, min_batch_size=2, max_batch_size=256,
                           ref_batch_size=2)
    rec = StepRecorder()
    callbacks = [cb, rec]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every,
                                         save_top_k=-1, filename="{step}"))
    trainer(tmp_path, callbacks, max_steps=max_steps,
            enable_checkpointing=bool(save_every)).fit(model, data, ckpt_path=ckpt_path)
    return model, cb, rec


@pytest.mark.parametrize("resize", ["sampler", "accumulate"])
def test_resume_mid_run_is_exact(tmp_path, resize):
    full_model, full_cb, full_rec = _run_and_record(tmp_path / "full", resize, 40)
    assert len(full_cb.history) >= 2, "the test needs batch-size changes to be meaningful"
    _run_and_record(tmp_path / "a", resize, 40, save_every=5)
    for step in (10, 15, 25):  # before, between and after batch-size changes
        ckpt = tmp_path / "a" / f"step={step}.ckpt"
        model, cb, rec = _run_and_record(tmp_path / f"b{step}", resize, 40, ckpt_path=str(ckpt))
        assert cb.history == full_cb.history
        assert [r["batch"] for r in rec.rows] == [r["batch"] for r in full_rec.rows[step:]]
        assert [r["lr"] for r in rec.rows] == [r["lr"] for r in full_rec.rows[step:]]
        torch.testing.assert_close(model.linear.weight, full_model.linear.weight, rtol=0, atol=0)
        assert cb.estimator.state_dict() == full_cb.estimator.state_dict()


def test_non_finite_gradients_never_change_the_batch_size(tmp_path):
    class Exploding(LeastSquaresModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * (math.nan if self.global_step >= 5 else 1.0)

    seed_everything(0)
    model = Exploding(dim=8, lr=0.05, init_scale=1.0)
    data = SamplerData(dim=8, batch_size=2, num_samples=4096)
    policy = NoisePolicy(scale=1.0, confidence=0.0, hysteresis=0.0, never_decrease=False)
    cb = AdaptiveBatchSize(noise="per_example", policy=policy, resize="sampler",
                           half_life_samples=50, min_batch_size=2, max_batch_size=64,
                           ref_batch_size=2)
    trainer(tmp_path, [cb], max_steps=30).fit(model, data)
    assert all(change["step"] <= 5 for change in cb.history)
    assert cb.estimator.num_skipped >= 20


def test_logs_through_the_lightning_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    model = LeastSquaresModel(dim=4, lr=0.05, init_scale=1.0)
    data = LeastSquaresData(dim=4, batch_size=4, num_samples=256)
    cb = AdaptiveBatchSize(noise="microbatch", policy=NoisePolicy(), half_life_samples=64)
    logger = CSVLogger(tmp_path, name="run")
    trainer(tmp_path, [cb], max_steps=10, logger=logger, log_every_n_steps=1,
            accumulate_grad_batches=2).fit(model, data)
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for key in ("gns", "grad_sq", "trace_sigma", "batch_size", "micro_batch", "accumulation",
                "lr_factor", "samples"):
        assert f"adabatch/{key}" in header


def test_max_samples_stops_training(tmp_path):
    model = LeastSquaresModel(dim=4, lr=0.05)
    data = LeastSquaresData(dim=4, batch_size=4, num_samples=4096)
    cb = AdaptiveBatchSize(policy=FixedPolicy(), max_samples=100)
    trainer(tmp_path, [cb], max_epochs=5).fit(model, data)
    assert 100 <= cb.samples < 104


def test_a_short_last_accumulation_window_is_measured_exactly(tmp_path):
    """10 micro-batches with k = 4: the epoch's last step holds 2 of them (8 samples), while
    Lightning still divides their losses by 4. The step's |G|^2 estimate must be the one of
    those 8 samples, computed here by hand."""
    model = LeastSquaresModel(dim=4, lr=1e-12, init_scale=1.0)
    data = LeastSquaresData(dim=4, batch_size=4, num_samples=40, fresh=True)  # in order
    cb = AdaptiveBatchSize(noise="per_example", policy=FixedPolicy(), ref_batch_size=16)
    trainer(tmp_path, [cb], max_epochs=1, accumulate_grad_batches=4).fit(model, data)
    assert cb.estimator.num_updates == 3 and cb.samples == 40
    data.setup("fit")
    x, y = (torch.stack(t).double() for t in zip(*(data.train_set[i] for i in range(32, 40))))
    w = model.linear.weight.detach().double().reshape(-1)
    g = x * (x @ w - y)[:, None]  # per-example gradients of (x.w - y)^2 / 2
    big, small = g.mean(0).square().sum(), g.square().sum(1).mean()
    assert cb.estimator.last_grad_sq == pytest.approx(float((8 * big - small) / 7), rel=1e-4)


def test_auto_resize_grows_the_micro_batch_then_accumulates(tmp_path):
    seed_everything(0)
    model = LeastSquaresModel(dim=4, lr=0.01)
    data = SamplerData(dim=4, batch_size=2, num_samples=2048)
    cb = AdaptiveBatchSize(policy=RampPolicy(ramp_samples=200), resize="auto", min_batch_size=2,
                           max_batch_size=16, max_micro_batch=4)
    rec = StepRecorder()
    fit = trainer(tmp_path, [cb, rec], max_steps=60)
    fit.fit(model, data)
    assert [h["batch_size"] for h in cb.history][-1] == 16
    assert fit.train_dataloader.batch_sampler.batch_size == 4
    assert fit.accumulate_grad_batches == 4
    assert {r["batch"] for r in rec.rows[-10:]} == {16}  # 4 micro-batches of 4
    assert rec.rows[0]["batch"] == 2


def test_a_skipped_step_leaves_the_scheduler_on_the_users_lr(tmp_path):
    """AMP's GradScaler skips optimizer.step on inf/NaN gradients, so the step post-hook does
    not run, and Lightning steps the LR scheduler before the next batch: the scaled lr must
    be restored anyway, or a chained scheduler loses one step per skipped step."""
    from lightning.pytorch.plugins.precision import Precision

    class SkipEveryOtherStep(Precision):
        calls = 0

        def optimizer_step(self, optimizer, model, closure, **kwargs):
            self.calls += 1
            if self.calls % 2 == 0:  # as MixedPrecision does when GradScaler finds inf/NaN:
                closure()  # forward and backward,
                self._after_closure(model, optimizer)  # on_before_optimizer_step,
                return None  # and no optimizer.step
            return super().optimizer_step(optimizer, model, closure, **kwargs)

    class Scheduled(LeastSquaresModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.01)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    model = Scheduled(dim=4)
    data = LeastSquaresData(dim=4, batch_size=8, num_samples=256)
    cb = AdaptiveBatchSize(policy=FixedPolicy(), ref_batch_size=2)  # kappa = 4: lr x 4 in the step
    fit = trainer(tmp_path, [cb], max_steps=6, plugins=[SkipEveryOtherStep()])
    fit.fit(model, data)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.9**6)


def test_resume_keeps_the_bounds_of_the_starting_batch(tmp_path):
    """Default bounds come from the starting global batch (micro x k x world), also after a
    resume in which the layout in force is no longer the starting one."""

    def run(root, ckpt_path=None, save=False):
        seed_everything(0)
        model = LeastSquaresModel(dim=4, lr=0.05, init_scale=1.0)
        data = SamplerData(dim=4, batch_size=2, num_samples=512)
        cb = AdaptiveBatchSize(policy=FixedPolicy(), ref_batch_size=4)
        extra = [ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1,
                                 filename="{step}")] if save else []
        trainer(root, [cb, *extra], max_steps=6, accumulate_grad_batches=2,
                enable_checkpointing=save).fit(model, data, ckpt_path=ckpt_path)
        return cb

    fresh = run(tmp_path / "a", save=True)
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "step=3.ckpt"))
    assert resumed.policy.bounds == fresh.policy.bounds
    assert (fresh.policy.bounds.lo, fresh.policy.bounds.hi) == (4, 256)


def test_default_lr_rule_saturates_where_the_linear_rule_diverges(tmp_path):
    """SGD at half its stability limit at B_ref = 16, then a ramp to 64 x B_ref. Far from w*
    the gradient dominates (B_noise ~ 10), so a larger batch buys little: the linear rule
    multiplies the lr by 64 (far past 2 / lambda_max) and diverges; the default (AdaScale
    gain, at most 1 + B_noise / B_ref) keeps the run finite and still converging (measured:
    the linear rule reached 3e23 by step 15; the default stayed near 0.85 from 13.2). The
    gain bounds the lr by the measured noise, not by the curvature: near w* (B_noise large)
    it grows again; the loss-spike guard is the backstop there."""

    def run(rule):
        seed_everything(0)
        lam = float(LeastSquaresModel(dim=16).problem.spectrum.max())
        model = LeastSquaresModel(dim=16, init_scale=3.0, lr=1.0 / lam)  # lr lambda_max < 2
        data = SamplerData(dim=16, batch_size=16, num_samples=1 << 16)
        cb = AdaptiveBatchSize(policy=RampPolicy(ramp_samples=2000, spike_factor=None),
                               rules=ScalingRules(lr=rule), resize="sampler",
                               ref_batch_size=16, max_batch_size=1024, noise="per_example",
                               half_life_samples=500)
        rec = StepRecorder()
        trainer(tmp_path, [cb, rec], max_steps=60).fit(model, data)
        return [r["loss"] for r in rec.rows], cb

    linear, _ = run("kappa")
    default, cb = run("auto")
    assert cb.batch_size >= 512  # kappa >= 32
    assert not math.isfinite(linear[-1]) or linear[-1] > 1e6 * linear[0]
    assert math.isfinite(default[-1]) and default[-1] < default[0]
