"""Tests for `adabatch.ema.EMA`: decay that follows the batch size, state through checkpoints."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adabatch.ema import EMA


class _Lin(pl.LightningModule):
    def __init__(self, n: int = 48, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        gen = torch.Generator().manual_seed(1)
        self.data = TensorDataset(
            torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen)
        )
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.count += 1
        return (self.layer(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.layer.parameters()])


class _Driver(Callback):
    """Placed before the EMA: records the weights after each optimizer step, calls
    ``ema.set_batch_size`` by a schedule {global_step: B} and may overwrite the weights."""

    def __init__(self, ema: EMA, schedule=None, overwrite=None) -> None:
        self.ema, self.schedule, self.overwrite = ema, schedule or {}, overwrite
        self.weights: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.weights:
            return  # accumulating: no optimizer step in this batch
        if self.overwrite is not None:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(self.overwrite(step))
        self.weights[step] = _flat(pl_module)
        self.counts[step] = int(pl_module.count)
        if step in self.schedule:
            self.ema.set_batch_size(self.schedule[step])


def _fit(module, callbacks, max_steps, tmp_path, ckpt_path=None, **kwargs):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _oracle(weights: dict[int, torch.Tensor], updates: list[int], samples, half_life: float):
    """Closed form of the EMA after updates at the given steps: the first update copies w_1,
    then w_T^ema = prod_k d_k w_1 + sum_k (1 - d_k) prod_{j > k} d_j w_k with
    d_k = 2 ** (-samples since the previous update / H)."""
    decays = [
        2.0 ** (-sum(samples(s) for s in range(a + 1, b + 1)) / half_life)
        for a, b in zip(updates, updates[1:])
    ]
    total = math.prod(decays) * weights[updates[0]]
    for k, step in enumerate(updates[1:]):
        total = total + (1 - decays[k]) * math.prod(decays[k + 1 :]) * weights[step]
    return total


@pytest.mark.parametrize("every", [1, 2])
def test_matches_closed_form_with_a_batch_change(tmp_path, every):
    half_life = 40.0
    ema = EMA(half_life_samples=half_life, update_every_n_steps=every)
    driver = _Driver(ema, schedule={3: 32})
    module = _Lin()
    _fit(module, [driver, ema], max_steps=6, tmp_path=tmp_path, accumulate_grad_batches=2)
    # measured on the first batch: 4 samples x 2 accumulated x 1 rank; the driver, placed
    # before the EMA, sets 32 in on_train_batch_end of step 3: it counts for step 3 on
    assert ema.batch_size == 32 and ema.half_life_samples == half_life
    updates = [s for s in range(1, 7) if (s - 1) % every == 0]
    expected = _oracle(driver.weights, updates, lambda s: 8 if s < 3 else 32, half_life)
    # on_train_end copies the average into the model
    torch.testing.assert_close(_flat(module), expected, rtol=0, atol=1e-6)
    assert int(module.count) == driver.counts[updates[-1]]  # integer buffers are copied
    assert ema.decay == pytest.approx(2 ** (-32 * every / half_life))


@pytest.mark.parametrize("batch_size", [8, 32])
def test_half_life_in_samples_is_the_same_at_b_and_4b(tmp_path, batch_size):
    half_life = 64
    ema = EMA(half_life_samples=half_life)
    # weights 1 at the first update, 0 after: the average is the initial weights' share
    driver = _Driver(ema, overwrite=lambda step: 1.0 if step == 1 else 0.0)
    module = _Lin(n=320, batch_size=batch_size)
    _fit(module, [driver, ema], max_steps=1 + half_life // batch_size, tmp_path=tmp_path)
    assert ema.batch_size == batch_size
    for p in module.layer.parameters():
        torch.testing.assert_close(p.detach(), torch.full_like(p, 0.5), rtol=0, atol=1e-6)


def test_decay_at_reference_batch(tmp_path):
    ema = EMA(decay=0.9)  # reference: the first batch (4 samples)
    assert ema.half_life_samples is None and ema.decay is None
    _fit(_Lin(), [ema], max_steps=2, tmp_path=tmp_path)
    assert ema.half_life_samples == pytest.approx(-4 / math.log2(0.9))
    assert ema.decay == pytest.approx(0.9)
    ema = EMA(decay=0.9, ref_batch_size=16, update_every_n_steps=2)
    ema.set_batch_size(64)  # kappa = 4
    assert ema.decay == pytest.approx(0.9**4)
    assert ema.half_life_samples == pytest.approx(-32 / math.log2(0.9))


def test_checkpoint_round_trip_matches_uninterrupted_run(tmp_path):
    schedule = {2: 8, 6: 12}

    def run(ckpt_path=None, seed=0, checkpoint=False):
        ema = EMA(half_life_samples=20)
        callbacks = [_Driver(ema, schedule=schedule), ema]
        if checkpoint:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=tmp_path,
                    filename="s{step}",
                    every_n_train_steps=4,
                    save_top_k=-1,
                    auto_insert_metric_name=False,
                )
            )
        module = _Lin(n=16, seed=seed)  # 4 batches per epoch
        _fit(module, callbacks, max_steps=8, tmp_path=tmp_path, ckpt_path=ckpt_path)
        return module, ema

    full, full_ema = run(checkpoint=True)
    saved = torch.load(tmp_path / "s4.ckpt", weights_only=False)
    state = saved["callbacks"][full_ema.state_key]
    assert state["batch_size"] == 8 and state["half_life_samples"] == 20
    assert state["latest_update_step"] == 4 and state["samples_since_update"] == 0
    assert state["decay"] == pytest.approx(2 ** (-8 / 20))

    resumed, resumed_ema = run(ckpt_path=tmp_path / "s4.ckpt", seed=123)
    torch.testing.assert_close(_flat(resumed), _flat(full), rtol=0, atol=0)
    assert resumed_ema.state_dict() == full_ema.state_dict()


def test_state_round_trip_without_trainer():
    ema = EMA(decay=0.99, ref_batch_size=64)
    ema.set_batch_size(256)
    other = EMA(decay=0.99, ref_batch_size=64)
    other.load_state_dict(ema.state_dict())
    assert other.batch_size == 256 and other.decay == pytest.approx(0.99**4)
    assert EMA(half_life_samples=1).state_key != EMA(half_life_samples=2).state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"half_life_samples": 10, "decay": 0.9}, "exactly one"),
        ({"half_life_samples": 0}, "half_life_samples=0"),
        ({"half_life_samples": -5.0}, "half_life_samples=-5.0"),
        ({"half_life_samples": float("nan")}, "half_life_samples=nan"),
        ({"decay": 0.0}, "decay=0.0"),
        ({"decay": 1.0}, "decay=1.0"),
        ({"decay": 1.5}, "decay=1.5"),
        ({"decay": 0.9, "ref_batch_size": 0}, "ref_batch_size=0"),
        ({"half_life_samples": 10, "update_every_n_steps": 0}, "update_every_n_steps=0"),
        ({"half_life_samples": 10, "update_every_n_steps": 1.5}, "update_every_n_steps=1.5"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


def test_bad_batch_size():
    ema = EMA(half_life_samples=10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size={bad!r}"):
            ema.set_batch_size(bad)


def test_unmeasurable_batch_falls_back_to_ref_batch_size():
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    trainer = SimpleNamespace(accumulate_grad_batches=2, world_size=3)
    ema = EMA(half_life_samples=100, ref_batch_size=48)
    ema.on_train_batch_start(trainer, None, {"text": "no tensors"}, 0)
    assert ema.batch_size == 48
    ema = EMA(half_life_samples=100)
    ema.on_train_batch_start(trainer, None, (torch.zeros(5, 2), torch.zeros(5)), 0)
    assert ema.batch_size == 30  # 5 per micro-batch x 2 accumulated x 3 ranks
    with pytest.raises(MisconfigurationException, match="ref_batch_size"):
        EMA(half_life_samples=100).on_train_batch_start(trainer, None, "no tensors", 0)
