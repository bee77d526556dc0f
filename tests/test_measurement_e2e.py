"""The callback's measurement end to end, against exact values (see measurement_cases.py), and
the callback-level wiring a wrong number would slip through: a step with nothing measured,
the settled-estimate gate, the EMA notification, AdamW's weight-decay factor.

The two-rank (gloo) runs of the same cases are in test_callback_ddp.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lit_helpers import SamplerData, model_near_optimum, trainer
from measurement_cases import check, make_run, summary
from torch import nn

from adabatch import EMA, AdaptiveBatchSize
from adabatch.control.policy import FixedPolicy, NoisePolicy, RampPolicy
from adabatch.control.rules import ScalingRules
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel


@pytest.mark.parametrize(("source", "accumulation"),
                         [("per_example", 1), ("per_example", 4), ("microbatch", 4)])
def test_one_device_measures_the_exact_statistics(tmp_path, source, accumulation):
    model, data, cb = make_run(source, accumulation, world=1)
    trainer(tmp_path, [cb], max_epochs=1, accumulate_grad_batches=accumulation).fit(model, data)
    result = summary(cb, model)
    check(result, source, accumulation, [result["last_window"]])
    assert cb.batch_size == 16


def test_microbatch_without_a_small_batch_says_nothing_is_measured(tmp_path):
    model, data, cb = make_run("microbatch", 1, world=1)
    logged = LogRecorder()
    cb.log_every_n_steps = 1
    with pytest.warns(UserWarning, match="NOTHING IS MEASURED"):
        trainer(tmp_path, [cb, logged], max_steps=5).fit(model, data)
    assert cb.estimator.num_updates == 0 and cb.estimator.num_skipped == 5
    assert logged.rows[-1]["adabatch/measured"] == 0.0
    assert logged.rows[-1]["adabatch/skipped_steps"] == 5.0
    assert "adabatch/gns" not in logged.rows[-1]


class LogRecorder(Callback):
    """The adabatch/* metrics logged at each step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()
                          if k.startswith("adabatch/")})


class TwoLayer(LeastSquaresModel):
    """The least-squares model behind an unsupported layer (a per-example probe gap)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = nn.Parameter(torch.ones(1))  # a raw parameter: no per-example rule

    def forward(self, x):
        return self.linear(x).squeeze(-1) * self.scale


def test_auto_on_one_device_measures_the_covered_part_and_says_so(tmp_path):
    """One device, no accumulation, an uncovered parameter: no small batch exists for
    micro-batch statistics, so 'auto' measures the covered layers (before: nothing at all)."""
    seed_everything(0)
    model = TwoLayer(dim=4, lr=1e-12, init_scale=0.0)
    data = LeastSquaresData(dim=4, batch_size=8, num_samples=160, fresh=True)
    cb = AdaptiveBatchSize(noise="auto", policy=FixedPolicy(), ref_batch_size=8,
                           log_every_n_steps=1)
    logged = LogRecorder()
    with pytest.warns(UserWarning, match=r"covers only \(80.0% of the trainable"):
        trainer(tmp_path, [cb, logged], max_epochs=1).fit(model, data)
    assert cb._source == "per_example"
    assert cb.estimator.num_updates == 20 and cb.estimator.num_skipped == 0
    assert logged.rows[-1]["adabatch/covered_fraction"] == pytest.approx(4 / 5)
    assert logged.rows[-1]["adabatch/measured"] == 1.0


class CompiledMLP(LeastSquaresModel):
    """A torch.compile'd body: the per-example probe's module hooks never fire in it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # aot_eager: the same AOTAutograd graph as inductor, without code generation (~1 s)
        self.body = torch.compile(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
                                  backend="aot_eager")

    def forward(self, x):
        return self.body(x).squeeze(-1)


@pytest.mark.parametrize("noise", ["per_example", "auto"])
def test_compiled_module_steps_never_reach_the_estimator(tmp_path, noise, monkeypatch):
    import adabatch.callback

    infos: list[str] = []  # what the callback tells the user (the logger may be muted)
    monkeypatch.setattr(adabatch.callback, "rank_zero_info", infos.append)
    seed_everything(0)
    model = CompiledMLP(dim=4, lr=1e-12)
    data = LeastSquaresData(dim=4, batch_size=4, num_samples=64)
    cb = AdaptiveBatchSize(noise=noise, policy=FixedPolicy(), ref_batch_size=8, log_every_n_steps=1)
    logged = LogRecorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb, logged], max_epochs=1, accumulate_grad_batches=2).fit(model, data)
    text = " | ".join(str(w.message) for w in caught)
    est = cb.estimator
    if noise == "per_example":
        # hooks never fire: every step is skipped, counted, logged and warned about (loudly)
        assert "compiled graph" in text and "NOT MEASURED: no small-batch norms" in text
        assert est.num_updates == 0 and est.num_skipped == 8 and est.gns is None
        assert logged.rows[-1]["adabatch/skipped_steps"] == 8.0
    else:
        # auto sees the compiled module and uses parameter hooks, which do fire; it says why
        assert cb._source == "microbatch"
        assert any("uses micro-batch statistics" in m and "torch.compile'd" in m for m in infos)
        assert est.num_updates == 8 and est.num_skipped == 0


def test_auto_falls_back_when_the_per_example_probe_records_nothing(tmp_path):
    """A probe that silently records nothing (as under a compiled LightningModule): the first
    such step is skipped and 'auto' switches to micro-batch statistics for the rest."""
    from adabatch.noise import per_example

    class Silent(per_example.PerExampleGradNorms):
        @property
        def sq_norms(self):
            return torch.zeros(0)

    seed_everything(0)
    model = LeastSquaresModel(dim=4, lr=1e-12)
    data = LeastSquaresData(dim=4, batch_size=4, num_samples=64)
    cb = AdaptiveBatchSize(noise="auto", policy=FixedPolicy(), ref_batch_size=8)
    import adabatch.callback as callback_module

    original = callback_module.PerExampleGradNorms
    callback_module.PerExampleGradNorms = Silent
    try:
        with pytest.warns(UserWarning, match="now uses micro-batch statistics"):
            trainer(tmp_path, [cb], max_epochs=1, accumulate_grad_batches=2).fit(model, data)
    finally:
        callback_module.PerExampleGradNorms = original
    assert cb._source == "microbatch"
    assert cb.estimator.num_skipped == 1 and cb.estimator.num_updates == 7


def test_noise_policy_waits_for_a_settled_estimate(tmp_path):
    """The spread of fewer than 8 effective steps is no error bar: until then a confidence
    bound (however loose) must not exist, so the first change comes at step 8 or 9."""
    seed_everything(0)
    model = model_near_optimum(offset=1.0, dim=4, lr=1e-12)  # |G|^2 clearly > 0
    data = SamplerData(dim=4, batch_size=2, num_samples=4000, fresh=True)
    # a confidence bound needs an error bar; z = 1e-9 makes the bound the estimate itself
    policy = NoisePolicy(scale=8.0, confidence=1e-9, hysteresis=0.0, spike_factor=None)
    cb = AdaptiveBatchSize(noise="per_example", policy=policy, resize="sampler",
                           half_life_samples=1e9, min_batch_size=2, max_batch_size=64,
                           ref_batch_size=2)
    trainer(tmp_path, [cb], max_steps=12).fit(model, data)
    # (the EMA's weights decay a hair, so 8 updates hold an effective 8 - 1e-8 steps)
    assert cb.history and cb.history[0]["step"] in (8, 9)


def test_weight_averaging_follows_the_measured_batch(tmp_path):
    seed_everything(0)
    model = LeastSquaresModel(dim=4, lr=0.01)
    data = SamplerData(dim=4, batch_size=2, num_samples=2048)
    cb = AdaptiveBatchSize(policy=RampPolicy(ramp_samples=60), resize="sampler",
                           min_batch_size=2, max_batch_size=8)
    ema = EMA(half_life_samples=100)
    seen = EmaBatchRecorder(ema)
    trainer(tmp_path, [cb, seen, ema], max_steps=40).fit(model, data)
    assert cb.batch_size == 8 and ema.batch_size == 8  # the first batch was 2
    # every step: the batch it really trained on, not the decided one (the loader's prefetch
    # makes a decision reach training two steps later)
    assert [e for _, e in seen.rows] == [m for m, _ in seen.rows]
    assert len({m for m, _ in seen.rows}) >= 3


class EmaBatchRecorder(Callback):
    """(samples the step trained on, the batch the EMA was told) at each optimizer step."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.rows, self._n = ema, [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._n += len(batch[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rows.append((self._n, self.ema.batch_size))
        self._n = 0


class GroupRecorder(Callback):
    """lr and weight decay the optimizer steps with (placed after adabatch)."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        group = optimizer.param_groups[0]
        self.rows.append((group["lr"], group["weight_decay"]))


def test_adamw_weight_decay_keeps_its_timescale_in_samples(tmp_path):
    """kappa = 4 with the sqrt rule: lr x 2, and wd x kappa / lr_factor = x 2 (Power Lines)."""
    model = LeastSquaresModel(dim=4, lr=0.01, optimizer="adamw", weight_decay=0.1)
    data = LeastSquaresData(dim=4, batch_size=4, num_samples=64)
    cb = AdaptiveBatchSize(policy=FixedPolicy(), ref_batch_size=4,
                           rules=ScalingRules(lr="sqrt"))
    rec = GroupRecorder()
    trainer(tmp_path, [cb, rec], max_steps=3, accumulate_grad_batches=4).fit(model, data)
    assert rec.rows == [(pytest.approx(0.02), pytest.approx(0.2))] * 3


@pytest.mark.parametrize("source", ["per_example", "microbatch"])
def test_amp_loss_scale_is_undone(tmp_path, source):
    """float16 autocast with a GradScaler (scale 1024) on CPU: the probes see gradients of the
    scaled loss and must divide their squares by scale**2 (and 1/k's); the last step's
    estimates match the float64 values of its own data to float16 precision."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    from measurement_cases import exact_last_step

    model, data, cb = make_run(source, 4, world=1, steps=20)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(tmp_path, [cb], max_epochs=1, accumulate_grad_batches=4,
            plugins=[plugin]).fit(model, data)
    assert scaler.get_scale() == 2.0**10  # no overflow: every step measured at this scale
    result = summary(cb, model)
    assert result["num_updates"] == 21 and result["num_skipped"] == 0
    w = torch.tensor(result["w"], dtype=torch.float64)
    g_t, s_t = exact_last_step([result["last_window"]], w, source)
    assert result["last_grad_sq"] == pytest.approx(g_t, rel=5e-3)
    assert result["last_trace_sigma"] == pytest.approx(s_t, rel=5e-3)
