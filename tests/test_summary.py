"""`RunSummary`: printed by the callback at the end of fit, correct across a resume."""

import json

import pytest
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lit_helpers import SamplerData, trainer

from adabatch import AdaptiveBatchSize
from adabatch.control.policy import FixedPolicy, RampPolicy
from adabatch.summary import RunSummary, stop_reason
from adabatch.tasks.synthetic import LeastSquaresModel


class SampleCounter(Callback):
    """The oracle: every training batch's length, counted independently of the callback."""

    def __init__(self) -> None:
        self.samples = 0
        self.batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.samples += len(batch[0])
        self.batches.append(len(batch[0]))


def _ramp():
    # The one place that names policy arguments: a ramp 2 -> 8 over 40 samples.
    return AdaptiveBatchSize(policy=RampPolicy(ramp_samples=40), min_batch_size=2,
                             max_batch_size=8, ref_batch_size=2, resize="sampler",
                             max_samples=120)


def _run(root, ckpt_path=None, save=False):
    seed_everything(0)
    model = LeastSquaresModel(dim=4, lr=0.05, init_scale=1.0)
    data = SamplerData(dim=4, batch_size=2, num_samples=4096)
    cb, counter = _ramp(), SampleCounter()
    extra = [ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_top_k=-1,
                             filename="{step}")] if save else []
    trainer(root, [cb, counter, *extra], max_steps=1000,
            enable_checkpointing=save).fit(model, data, ckpt_path=ckpt_path)
    return cb, counter


def test_summary_counts_the_whole_run_across_a_resume(tmp_path, capsys):
    full, counter = _run(tmp_path / "a", save=True)
    s = full.run_summary
    assert s is not None and s.stop_reason == "max_samples"
    assert s.samples == counter.samples >= 120
    assert s.steps == len(counter.batches)  # resize=sampler, no accumulation: one batch a step
    assert s.batch_sizes[0] == 2 and s.batch_sizes[-1] == 8 and len(s.batch_sizes) >= 3
    printed = capsys.readouterr().out
    assert "adabatch run summary" in printed and "max_samples" in printed

    resumed, rcounter = _run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "step=10.ckpt"))
    r = resumed.run_summary
    assert rcounter.samples < counter.samples  # this session saw only part of the run
    assert (r.samples, r.steps) == (s.samples, s.steps)  # the summary reports all of it
    assert r.batch_history == s.batch_history  # starts at the starting batch, not the current
    assert r.stop_reason == "max_samples"
    d = json.loads(json.dumps(r.to_dict()))
    assert d["batch_size_history"][0] == {"step": 0, "samples": 0, "batch_size": 2}
    assert d["samples"] == s.samples and d["noise_source"] == "per_example"
    assert d["measured"] is True and d["updates"] > 0


def test_stop_reasons(tmp_path):
    class Plain(LeastSquaresModel):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", 1.0)  # never improves: early stopping after `patience`

    def fit(callbacks, **kw):
        seed_everything(0)
        t = trainer(tmp_path, callbacks, **kw)
        t.fit(Plain(dim=4, lr=0.05), SamplerData(dim=4, batch_size=2, num_samples=64))
        return t

    off = AdaptiveBatchSize(enabled=False)
    t = fit([off], max_steps=7)
    assert stop_reason(t, off) == "max_steps" and off.run_summary is None
    s = RunSummary.from_trainer(t, off)
    assert (s.steps, s.samples, s.start_batch_size) == (7, 14, 2) and not s.enabled
    assert stop_reason(fit([off], max_epochs=2), off) == "max_epochs"
    es = EarlyStopping("val_loss", patience=1)
    t = fit([off, es], max_epochs=50, limit_val_batches=1, val_check_interval=8)
    assert stop_reason(t, off) == "early_stopping" and t.current_epoch < 49
    assert stop_reason(t, off, KeyboardInterrupt()) == "interrupted"


def test_str_names_what_was_not_measured():
    s = RunSummary(steps=3, samples=24, start_batch_size=8, noise_source="per_example",
                   covered=4, uncovered=["head.weight"], updates=0, measured=False,
                   not_measured_reason="no small batch")
    text = str(s)
    assert "NO: no small batch" in text
    s.measured, s.updates = True, 3
    assert "1 not measured (head.weight)" in str(s) and "4 parameter(s) covered" in str(s)


@pytest.mark.parametrize("n", [13, 30])
def test_long_history_is_elided_in_the_table(n):
    hist = [{"step": i, "samples": 8 * i, "batch_size": 8 + i, "from": 7 + i} for i in range(n)]
    text = str(RunSummary(start_batch_size=8, history=hist))
    assert "..." in text and f"{8 + n - 1} (step {n - 1}" in text
    assert len(RunSummary(start_batch_size=8, history=hist).to_dict()["batch_size_history"]) \
        == n + 1


def test_a_fit_that_fails_still_reports_what_it_did(tmp_path, capsys):
    class Failing(LeastSquaresModel):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    seed_everything(0)
    cb = AdaptiveBatchSize(policy=FixedPolicy(), ref_batch_size=2, resize="sampler")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [cb], max_steps=10).fit(
            Failing(dim=4, lr=0.05), SamplerData(dim=4, batch_size=2, num_samples=64))
    s = cb.run_summary
    assert s is not None and s.stop_reason == "error (RuntimeError)"
    assert (s.steps, s.samples) == (3, 6)
    assert "error (RuntimeError)" in capsys.readouterr().out


def _probed(*ratios):
    """A stand-in callback whose policy ran probes with ``(r, ratio_std)`` at B = 16, k = 2."""
    from types import SimpleNamespace

    from adabatch.control.critical import CriticalBatchProbe, ProbeResult
    results = [ProbeResult(samples=100 * (i + 1), batch_size=16, factor=2, progress=1.0,
                           branch_progress=r, ratio_std=std) for i, (r, std) in enumerate(ratios)]
    policy = SimpleNamespace(probe=CriticalBatchProbe(), results=results, confidence=2.0)
    return SimpleNamespace(policy=policy, _branch=SimpleNamespace(spent=50.0))


@pytest.mark.parametrize(("ratios", "advice"), [
    (((1.0, 0.01), (0.99, 0.01)), True),      # both lower bounds >= 1 - tolerance = 0.95
    (((1.0, 0.01),), False),                  # one probe is not enough
    (((1.0, 0.01), (0.9, 0.01)), False),      # the last one lost
    (((0.9, 0.01), (1.0, 0.01)), False),      # an earlier one lost
    (((1.0, 0.01), (0.96, 0.01)), False),     # 0.96 - 2 x 0.01 < 0.95: not shown lossless
    (((1.0, 0.01), (0.99, 0.01), (0.7, 0.2)), True),  # [0.3, 1.1]: inconclusive, not a loss
])
def test_the_larger_start_advice_needs_every_probe_lossless_at_its_lower_bound(ratios, advice):
    s = RunSummary(samples=1000)
    s._read_probes(_probed(*ratios))
    assert s.larger_start is advice
    assert s.probe_windows == len(ratios) and s.probe_overhead == 0.05
    resolved = [(r, std) for r, std in ratios if not (r - 2 * std <= 0.5 <= 0.95 <= r + 2 * std)]
    assert s.probe_conclusive == len(resolved)
    last_r, last_std = resolved[-1]
    crit = 16 * (2 * (last_r - 2 * last_std) - 1) / (1 - (last_r - 2 * last_std))
    resolvable = 16 * (2 * 0.95 - 1) / 0.05
    assert s.critical_batch == pytest.approx(min(crit, resolvable))
    assert s.critical_batch_bounded is (crit < resolvable)
