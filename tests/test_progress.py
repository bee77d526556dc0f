"""The progress bar: adabatch metrics shown, a total that is right under a sample budget."""

import pytest
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lit_helpers import SamplerData, trainer

from adabatch import AdaptiveBatchSize
from adabatch.control.policy import FixedPolicy, RampPolicy
from adabatch.progress import batches_left
from adabatch.tasks.synthetic import LeastSquaresModel


class BarRecorder(Callback):
    """After adabatch (before the bar, which Lightning appends last): the bar's total."""

    def __init__(self) -> None:
        self.totals: list[int | None] = []
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        self.totals.append(trainer.progress_bar_callback.train_progress_bar.total)


BARS = [TQDMProgressBar, RichProgressBar]


def _fit(tmp_path, cb, bar, **kw):
    seed_everything(0)
    rec = BarRecorder()
    t = trainer(tmp_path, [cb, rec, bar()], enable_progress_bar=True, log_every_n_steps=1, **kw)
    t.fit(LeastSquaresModel(dim=4, lr=0.05), SamplerData(dim=4, batch_size=2, num_samples=4096))
    return t, rec


@pytest.mark.parametrize("bar", BARS)
def test_total_is_the_batches_a_sample_budget_allows(tmp_path, bar):
    # 50 samples at batch 2: 25 batches, whatever max_steps (Lightning's total) says.
    cb = AdaptiveBatchSize(policy=FixedPolicy(), max_samples=50, resize="sampler")
    t, rec = _fit(tmp_path, cb, bar, max_steps=1000)
    assert rec.batches == 25 and cb.samples == 50
    assert rec.totals == [25] * 25
    shown = t.progress_bar_callback.get_metrics(t, t.lightning_module)
    assert {"adabatch/batch_size", "adabatch/gns"} <= set(shown)


@pytest.mark.parametrize("bar", BARS)
def test_total_follows_a_growing_batch(tmp_path, bar):
    cb = AdaptiveBatchSize(policy=RampPolicy(ramp_samples=40), min_batch_size=2,
                           max_batch_size=8, ref_batch_size=2, resize="sampler", max_samples=120)
    _, rec = _fit(tmp_path, cb, bar, max_steps=1000)
    assert rec.totals[-1] == rec.batches  # the bar ends full
    assert rec.totals[0] > rec.batches  # first estimated at the starting batch of 2: 60


def test_batches_left_takes_the_tightest_bound():
    assert batches_left(samples_left=None, micro_batch=4) == float("inf")
    assert batches_left(samples_left=17, micro_batch=4) == 5
    assert batches_left(samples_left=17, micro_batch=4, world_size=2) == 3
    assert batches_left(samples_left=1000, micro_batch=4, steps_left=3, accumulation=2) == 6
    assert batches_left(samples_left=1000, micro_batch=4, epoch_batches_left=9) == 9
    assert batches_left(samples_left=-3, micro_batch=4) == 0
