"""Tests for `adabatch.data`: ResizableBatchSampler and ResizableDataLoader."""

from __future__ import annotations

import collections
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from adabatch.data import ResizableBatchSampler, ResizableDataLoader

SCRIPTS = Path(__file__).parent / "scripts"


# --------------------------------------------------------------------------- helpers
def make_ranks(n: int, num_replicas: int, batch_size: int, **kwargs) -> list[ResizableBatchSampler]:
    return [
        ResizableBatchSampler(n, batch_size, num_replicas=num_replicas, rank=r, **kwargs)
        for r in range(num_replicas)
    ]


def train(samplers, schedule=None, *, depth=1, first_step=0, stop=None, advance=True):
    """Simulate a trainer over simulated ranks, all stepping in lockstep.

    A fetcher holds ``depth`` batches ahead (Lightning's holds 1): each step pops the oldest
    batch, refills, "trains" it, calls ``advance()`` and then applies ``schedule[step]`` (the
    same change on every rank). Returns the trained steps, each a list of per-rank batches.
    """
    schedule = schedule or {}
    iters = [iter(s) for s in samplers]
    queue: collections.deque = collections.deque()

    def fetch() -> None:
        got = [next(it, None) for it in iters]
        assert all(g is None for g in got) or all(g is not None for g in got), got
        if got[0] is not None:
            queue.append(got)

    for _ in range(depth):
        fetch()
    trained, step = [], first_step
    while True:
        if not queue:
            fetch()
        if not queue:
            break
        batches = queue.popleft()
        if depth:
            fetch()
        trained.append(batches)
        for s in samplers:
            if advance:
                s.advance()
            if step in schedule:
                s.set_batch_size(schedule[step])
        step += 1
        if stop is not None and step == stop:
            break
    return trained


def random_schedule(rng: random.Random, steps: int = 60, max_batch: int = 9) -> dict[int, int]:
    return {k: rng.randint(1, max_batch) for k in range(steps) if rng.random() < 0.4}


def flat(steps) -> list[int]:
    return [i for batches in steps for batch in batches for i in batch]


# ------------------------------------------------------------------ exactly once
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_every_sample_once_with_random_changes(shuffle, seed):
    rng = random.Random(seed)
    n = rng.randint(1, 200)
    sampler = ResizableBatchSampler(n, rng.randint(1, 9), shuffle=shuffle, seed=seed)
    seen = []
    for batch in sampler:
        assert batch
        seen += batch
        if rng.random() < 0.4:
            sampler.set_batch_size(rng.randint(1, 9))
    assert sorted(seen) == list(range(n))
    assert (seen == list(range(n))) is (not shuffle or n == 1 or seen == sorted(seen))


@pytest.mark.parametrize("seed", range(6))
def test_simulated_ranks_see_every_sample_once(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 300)
    samplers = make_ranks(n, 3, rng.randint(1, 9), seed=seed)
    steps = train(samplers, random_schedule(rng), depth=rng.randint(0, 3))
    assert sorted(flat(steps)) == list(range(n))  # disjoint and complete
    for batches in steps:
        sizes = [len(b) for b in batches]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    # a change applies from the next batch the sampler yields: identical per-step sizes then
    for batches in steps[:-1]:
        assert len({len(b) for b in batches}) == 1


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 101])
@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_equal_batch_counts_for_awkward_sizes(n, batch_size):
    samplers = make_ranks(n, 3, batch_size, seed=1)
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches: no DDP deadlock
    assert all(batch for batches in per_rank for batch in batches)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    if n >= 3:
        assert sorted(seen) == list(range(n))
    else:  # fewer samples than ranks: one each, some repeated, none lost
        assert len(per_rank[0]) == 1 and len(seen) == 3 and set(seen) == set(range(n))


def test_small_remainder_is_merged_into_the_previous_batch():
    per_rank = [list(s) for s in make_ranks(20, 3, 3, shuffle=False)]
    # 20 = 9 + 11: the remainder 2 < 3 ranks is merged into the second global batch (4/4/3)
    assert [[len(b) for b in batches] for batches in per_rank] == [[3, 4], [3, 4], [3, 3]]
    assert per_rank[0][1] == [9, 10, 11, 12]


@pytest.mark.parametrize("seed", range(4))
def test_drop_last_keeps_full_global_batches_only(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 200)
    samplers = make_ranks(n, 3, rng.randint(1, 6), seed=seed, drop_last=True)
    iters = [iter(s) for s in samplers]
    seen = []
    while True:
        size = samplers[0].batch_size
        batches = [next(it, None) for it in iters]
        if batches[0] is None:
            assert all(b is None for b in batches)
            break
        assert [len(b) for b in batches] == [size] * 3
        seen += [i for b in batches for i in b]
        if rng.random() < 0.4:
            new_size = rng.randint(1, 6)
            for s in samplers:
                s.set_batch_size(new_size)
    assert len(seen) == len(set(seen))
    assert n - len(seen) < 3 * samplers[0].batch_size  # only an incomplete tail is dropped


# ------------------------------------------------------------------------ epochs
def test_set_epoch_changes_order_deterministically():
    a, b = ResizableBatchSampler(50, 7, seed=3), ResizableBatchSampler(50, 7, seed=3)
    order = {}
    for epoch in (0, 1, 2):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        order[epoch] = [i for batch in a for i in batch]
        assert order[epoch] == [i for batch in b for i in batch]
        assert sorted(order[epoch]) == list(range(50))
    assert order[0] != order[1] != order[2]
    a.set_epoch(1)
    assert [i for batch in a for i in batch] == order[1]
    other_seed = ResizableBatchSampler(50, 7, seed=4)
    assert [i for batch in other_seed for i in batch] != order[0]
    unshuffled = ResizableBatchSampler(50, 7, shuffle=False)
    unshuffled.set_epoch(5)
    assert [i for batch in unshuffled for i in batch] == list(range(50))


def test_lightning_set_epoch_reaches_the_batch_sampler():
    # Lightning calls set_epoch on loader.sampler and loader.batch_sampler.sampler only.
    sampler = ResizableBatchSampler(10, 2)
    _set_sampler_epoch(DataLoader(range(10), batch_sampler=sampler), 3)
    assert sampler.epoch == 3 and sampler.sampler is sampler


def test_no_len_and_rejects_a_distributed_sampler():
    sampler = ResizableBatchSampler(10, 2)
    assert not hasattr(sampler, "__len__")
    with pytest.raises(TypeError):
        len(DataLoader(range(10), batch_sampler=sampler))
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        ResizableBatchSampler(SequentialSampler(range(10)), batch_size=2)


# ------------------------------------------------------------------------ resume
@pytest.mark.parametrize("seed", range(6))
def test_resume_gives_the_uninterrupted_batches(seed):
    rng = random.Random(seed)
    n, replicas, depth = rng.randint(20, 200), rng.choice([1, 3]), rng.randint(0, 3)
    batch_size = rng.randint(1, 6)
    schedule = random_schedule(rng)
    full = train(make_ranks(n, replicas, batch_size, seed=seed), schedule, depth=depth)
    stop = rng.randint(1, len(full))
    first = make_ranks(n, replicas, batch_size, seed=seed)
    head = train(first, schedule, depth=depth, stop=stop)
    states = [s.state_dict() for s in first]
    assert all(state == states[0] for state in states)  # global state: rank 0's is everyone's
    resumed = make_ranks(n, replicas, 1, seed=seed + 100, shuffle=False)  # all overwritten
    for s in resumed:
        s.load_state_dict(states[0])
        s.set_epoch(states[0]["epoch"])  # as Lightning does after loading: keeps the position
    tail = train(resumed, schedule, depth=depth, first_step=stop)
    if states[0]["epoch"] == 1:  # checkpoint after the epoch's last batch: next epoch
        assert stop == len(full) and states[0]["consumed"] == 0
    else:
        assert head + tail == full


def test_state_counts_trained_samples_not_yielded_ones():
    sampler = ResizableBatchSampler(30, 4, shuffle=False)
    it = iter(sampler)
    next(it), next(it), next(it)  # a prefetching loader asked for three batches
    sampler.advance()  # one was trained
    state = sampler.state_dict()
    assert (state["epoch"], state["consumed"], state["pending"]) == (0, 4, [8, 12])
    sampler.set_batch_size(5)
    resumed = ResizableBatchSampler(30, 1, shuffle=False)
    resumed.load_state_dict(sampler.state_dict())
    # the two prefetched batches come again at their old size, then the new size applies
    assert list(resumed)[:4] == [
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15, 16],
        [17, 18, 19, 20, 21],
    ]


def test_loading_the_state_being_served_again_is_a_no_op():
    # Lightning restores a ResizableDataLoader before creating the iterator; a callback that
    # restores the same state again in on_train_start must not disturb the live iterator.
    first = ResizableBatchSampler(30, 4, seed=2)
    steps = train([first], stop=3)
    state = first.state_dict()
    resumed = ResizableBatchSampler(30, 4, seed=2)
    resumed.load_state_dict(state)
    batches = iter(resumed)
    head = next(batches)
    resumed.load_state_dict(state)  # same state, nothing advanced: no-op
    resumed.advance()
    assert resumed.state_dict()["consumed"] == state["consumed"] + len(head)
    rest = [head, *batches]
    full = train([ResizableBatchSampler(30, 4, seed=2)])
    assert steps + [[b] for b in rest] == full
    resumed.load_state_dict(state)  # after progress it is a real reload
    assert resumed.consumed == state["consumed"]


def test_advance_by_count_and_consumed_setter():
    sampler = ResizableBatchSampler(12, 3, shuffle=False)
    batches = iter(sampler)
    next(batches), next(batches)
    sampler.advance(3)
    assert sampler.consumed == 3 and sampler.state_dict()["pending"] == [6]
    sampler.advance(3)
    assert sampler.state_dict()["pending"] == []
    sampler.consumed = 9
    assert list(sampler) == [[9, 10, 11]]  # the next iter() starts at the set position
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]  # then from 0 again


def test_finished_epoch_is_saved_as_the_next_epoch_start():
    sampler = ResizableBatchSampler(10, 4)
    sampler.set_epoch(2)
    for _ in sampler:
        sampler.advance()
    state = sampler.state_dict()
    assert (state["epoch"], state["consumed"], state["pending"]) == (3, 0, [])
    with_drop = ResizableBatchSampler(10, 4, drop_last=True)
    for _ in with_drop:
        with_drop.advance()
    assert with_drop.consumed == 8 and with_drop.state_dict()["epoch"] == 1


def test_stateful_loader_is_what_lightning_checkpoints():
    sampler = ResizableBatchSampler(10, 2)
    plain = DataLoader(range(10), batch_sampler=sampler)
    # FitLoop.on_save_checkpoint stores CombinedLoader._state_dicts(): loaders only
    assert not isinstance(plain, _Stateful)
    assert CombinedLoader(plain)._state_dicts() == []
    stateful = ResizableDataLoader(range(10), sampler)
    assert CombinedLoader(stateful)._state_dicts() == [sampler.state_dict()]


# ------------------------------------------------------------- Lightning resume
class _Indexed(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i, torch.tensor([i / self.n])


class _Recorder(pl.LightningModule):
    """Records (epoch, indices) of each trained batch."""

    N = 40

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.records: list[tuple[int, list[int]]] = []

    def train_dataloader(self):
        data = _Indexed(self.N)
        return ResizableDataLoader(data, ResizableBatchSampler(data, 3, seed=7))

    def training_step(self, batch, batch_idx):
        index, x = batch
        self.records.append((self.current_epoch, index.tolist()))
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Resizer(Callback):
    """What adabatch's callback does: advance the sampler, resize it by a schedule.

    A callback, not the module's ``on_train_batch_end``: Lightning runs callback hooks before
    the module's, and ModelCheckpoint last among callbacks, so a checkpoint saved at this batch
    sees the advanced count.
    """

    # by optimizer step: on resume from an epoch's last batch Lightning 2.6.6 numbers the next
    # epoch's batches on from the old batch_idx, so a batch_idx schedule would shift
    SCHEDULE = {2: 5, 5: 2, 15: 4, 17: 6}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sampler = trainer.train_dataloader.batch_sampler
        sampler.advance()
        size = self.SCHEDULE.get(trainer.global_step)
        if size is not None:
            sampler.set_batch_size(size)


def _fit(tmp: Path, ckpt_path=None, callbacks=()):
    module = _Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Resizer(), *callbacks],
        enable_checkpointing=bool(callbacks),
        default_root_dir=tmp,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module.records


def test_lightning_resume_mid_epoch_is_exact(tmp_path):
    steps = ModelCheckpoint(
        dirpath=tmp_path / "steps",
        filename="s{step}",
        every_n_train_steps=1,
        save_top_k=-1,
        auto_insert_metric_name=False,
    )
    ends = ModelCheckpoint(
        dirpath=tmp_path / "ends",
        filename="e{epoch}",
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        save_top_k=-1,
        auto_insert_metric_name=False,
    )
    full = _fit(tmp_path, callbacks=[steps, ends])
    for epoch in (0, 1):
        indices = [i for e, batch in full if e == epoch for i in batch]
        assert sorted(indices) == list(range(_Recorder.N))
    assert [r[1] for r in full if r[0] == 0] != [r[1] for r in full if r[0] == 1]  # set_epoch
    sizes = [len(batch) for e, batch in full if e == 0]
    assert sizes[:4] == [3, 3, 3, 5]  # a change at the end of batch 1 shows from batch 3

    saved = torch.load(tmp_path / "steps" / "s2.ckpt", weights_only=False)
    (state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (state["epoch"], state["consumed"], state["pending"]) == (0, 6, [9])

    last_of_epoch0 = sum(1 for r in full if r[0] == 0)
    cases = {
        "s2.ckpt": 2,  # right after a change, with a batch of the old size prefetched
        f"s{last_of_epoch0}.ckpt": last_of_epoch0,  # the epoch's last batch
    }
    for name, done in cases.items():
        resumed = _fit(tmp_path, ckpt_path=tmp_path / "steps" / name)
        assert resumed == full[done:], name
    # From an epoch-end checkpoint Lightning restores no loader state and sets the epoch after
    # prefetching from the fresh sampler: epoch 1 then runs in epoch 0's order, each sample once.
    resumed = _fit(tmp_path, ckpt_path=tmp_path / "ends" / "e0.ckpt")
    epoch0 = [i for e, batch in full if e == 0 for i in batch]
    assert [i for e, batch in resumed if e == 1 for i in batch] == epoch0
    assert len(resumed) == len(full) - last_of_epoch0


# ------------------------------------------------------------------ DDP (gloo)
def _load_script():
    spec = importlib.util.spec_from_file_location("ddp_sampler", SCRIPTS / "ddp_sampler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_two_processes_shard_disjoint_and_complete(tmp_path):
    script = _load_script()
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_sampler.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["sampler_num_replicas"], r["sampler_rank"]) for r in records] == [(2, 0), (2, 1)]
    n = script.NUM_SAMPLES
    for epoch in (0, 1):
        shards = [[b["indices"] for b in r["batches"] if b["epoch"] == epoch] for r in records]
        assert len(shards[0]) == len(shards[1])  # same batch count per rank
        seen = [i for shard in shards for batch in shard for i in batch]
        assert sorted(seen) == list(range(n))  # disjoint and complete

    # the run equals the single-process simulation of two ranks with Lightning's prefetch
    samplers = make_ranks(n, 2, script.BATCH_SIZE, seed=5)
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
            s.set_batch_size(script.BATCH_SIZE)
        expected = train(samplers, script.SCHEDULE, depth=1)
        for rank in range(2):
            got = [b["indices"] for b in records[rank]["batches"] if b["epoch"] == epoch]
            assert got == [batches[rank] for batches in expected]
    assert records[0]["state"] == records[1]["state"]


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data_source": 10, "batch_size": 0}, "batch_size=0"),
        ({"data_source": 10, "batch_size": 2.5}, "batch_size=2.5"),
        ({"data_source": 10, "batch_size": True}, "batch_size=True"),
        ({"data_source": 0, "batch_size": 2}, "data_source=0"),
        ({"data_source": [], "batch_size": 2}, "data_source=0"),
        ({"data_source": object(), "batch_size": 2}, "data_source=<object"),
        ({"data_source": 10, "batch_size": 2, "seed": "1"}, "seed='1'"),
        ({"data_source": 10, "batch_size": 2, "num_replicas": 0}, "num_replicas=0"),
        ({"data_source": 10, "batch_size": 2, "rank": -1}, "rank=-1"),
        ({"data_source": 10, "batch_size": 2, "num_replicas": 3, "rank": 3}, "rank=3"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResizableBatchSampler(**kwargs)


def test_bad_calls():
    sampler = ResizableBatchSampler(10, 2)
    with pytest.raises(ValueError, match="batch_size=0"):
        sampler.set_batch_size(0)
    with pytest.raises(ValueError, match="epoch=-1"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match="num_samples=-1"):
        sampler.advance(-1)
    with pytest.raises(ValueError, match="num_samples=None"):
        sampler.advance()  # nothing yielded yet
    with pytest.raises(ValueError, match="consumed=11"):
        sampler.consumed = 11
    with pytest.raises(ValueError, match="consumed=12"):
        sampler.advance(12)
    with pytest.raises(ValueError, match="num_samples=20"):
        sampler.load_state_dict({"num_samples": 20, "epoch": 0, "consumed": 0})
    with pytest.raises(ValueError, match="pending="):
        sampler.load_state_dict({"epoch": 0, "consumed": 4, "pending": [4]})
    only_rank = ResizableBatchSampler(10, 2, rank=2)  # no process group: one replica
    with pytest.raises(ValueError, match="rank=2"):
        iter(only_rank)
    with pytest.raises(ValueError, match="batch_sampler=BatchSampler"):
        ResizableDataLoader(range(10), torch.utils.data.BatchSampler(range(10), 2, False))


def _order(seed: int, epoch: int, n: int = 20) -> list[int]:
    sampler = ResizableBatchSampler(n, n, seed=seed)
    sampler.set_epoch(epoch)
    return next(iter(sampler))


def test_seeds_never_share_an_order_across_epochs():
    """seed + epoch made seed 0 epoch 1 equal seed 1 epoch 0: consecutive seeds shared data
    orders. Every (seed, epoch) pair of a 10 x 10 grid (and negative seeds) must differ."""
    assert _order(0, 1) != _order(1, 0)
    orders = {(s, e): tuple(_order(s, e)) for s in range(-2, 10) for e in range(10)}
    assert len(set(orders.values())) == len(orders)
    assert _order(3, 4) == _order(3, 4)  # still deterministic
