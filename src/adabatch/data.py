"""`ResizableBatchSampler`: a sharded, stateful batch sampler whose batch size can change
mid-epoch, and `ResizableDataLoader`, the DataLoader that lets Lightning checkpoint it.

How Lightning 2.6 treats them (read in ``lightning/pytorch`` 2.6.6 and checked by
``tests/test_data.py``):

- Length: a batch sampler with ``__len__`` makes Lightning fix the epoch's batch count when the
  loader is set up (``FitLoop.setup_data``: ``max_batches = len(loader)``), so growing the batch
  mid-epoch would silently cut the epoch short or stop early. This sampler has no ``__len__``:
  the epoch runs to ``StopIteration``, and ``Trainer(limit_train_batches=...)`` must be an int or
  1.0 (a fraction needs a length).
- Epochs: ``lightning.fabric.utilities.data._set_sampler_epoch`` calls ``set_epoch`` on
  ``loader.sampler`` and on ``loader.batch_sampler.sampler`` -- not on the batch sampler itself.
  `ResizableBatchSampler.sampler` is therefore the sampler itself, so Lightning's call reaches
  `ResizableBatchSampler.set_epoch`.
- Checkpoints: ``FitLoop.on_save_checkpoint`` stores ``CombinedLoader._state_dicts()``, the
  ``state_dict()`` of every *loader* that has ``state_dict``/``load_state_dict``; a plain
  ``torch.utils.data.DataLoader`` has none, and Lightning never looks at its batch sampler. On
  resume ``FitLoop.setup_data`` calls the loaders' ``load_state_dict`` *before* it creates the
  epoch's iterator (and prefetches a batch from it). `ResizableDataLoader` exposes the
  sampler's state that way, which makes mid-epoch resume exact with no callback involved.
  State loaded later (e.g. by a callback in ``on_train_start``) is too late for the resumed
  epoch: its iterator already exists. From a checkpoint saved at an epoch's end
  (``FitLoop`` restart stage ``RESUMED_ON_EPOCH_END``, where ``restarting`` is False) Lightning
  restores no loader state at all and calls ``set_epoch`` after creating the iterator; see
  `ResizableBatchSampler.set_epoch` for what the sampler does then. It also numbers the next
  epoch's batches on from the old ``batch_idx`` after a checkpoint at an epoch's last batch
  (shifting accumulation windows). `adabatch.control.restart.repair_epoch_end_restart` (run by
  `AdaptiveBatchSize`, or `adabatch.control.restart.ExactEpochResume` without it) makes both
  exact.
- Prefetch: with no length Lightning's ``_PrefetchDataFetcher`` holds one batch ahead (to know
  which batch is the last), on top of the DataLoader's own ``prefetch_factor x num_workers``.
- DDP: with ``Trainer(use_distributed_sampler=True)`` (the default) Lightning re-creates a batch
  sampler around a ``DistributedSampler``; this sampler shards the data itself, so use
  ``use_distributed_sampler=False`` (the constructor rejects a sampler as ``data_source`` with
  a message saying so).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["ResizableBatchSampler", "ResizableDataLoader"]

_STATE_VERSION = 1


def permutation_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``(seed, epoch)``'s permutation: distinct pairs give unrelated
    seeds (``numpy.random.SeedSequence`` hashes the pair), unlike ``seed + epoch``, with which
    seed 0 epoch 1 and seed 1 epoch 0 shared an order. Negative seeds are allowed.

    Example::

        >>> permutation_seed(0, 1) != permutation_seed(1, 0)
        True
    """
    entropy = [seed % 2**64, seed < 0, epoch]  # SeedSequence takes non-negative ints only
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return value


class ResizableBatchSampler:
    """Batch sampler whose per-rank batch size can change at any batch, sharded across ranks.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` (or `ResizableDataLoader`, which
    makes Lightning checkpoint it). Each step takes the next ``batch_size * num_replicas``
    indices of the epoch's permutation (seeded by `permutation_seed` of ``(seed, epoch)``, the
    same on every rank) and
    gives rank ``r`` its contiguous slice, so across ranks every sample is seen exactly once per
    epoch whatever the batch-size changes, provided every rank makes the same changes at the
    same batches (adabatch's decisions are identical on every rank).

    End of an epoch: the last global batch may be short. Its samples are split as evenly as
    possible (per-rank sizes differ by at most one) and every rank yields the same number of
    batches, else DDP would deadlock. A remainder smaller than ``num_replicas`` (too few to give
    each rank a sample) is merged into the previous global batch, so a rank's final batch may
    hold one sample more than ``batch_size``. Only when an epoch (or a resumed epoch) starts
    with fewer samples left than ranks are samples repeated, to give each rank one (as
    ``DistributedSampler`` pads). ``drop_last=True`` instead drops an incomplete final global
    batch (fewer than ``batch_size * num_replicas`` samples), so every batch is exactly
    ``batch_size``.

    No ``__len__``: with one Lightning fixes the epoch's batch count at setup and silently
    truncates or drops data when the batch size changes. Epochs run to ``StopIteration``;
    ``Trainer(limit_train_batches=...)`` must be an int or 1.0.

    Batch-size changes: `set_batch_size` takes effect from the next batch this sampler yields.
    A DataLoader asks for index batches ahead of use: with ``num_workers=0`` the next batch it
    loads is the next one yielded; with workers ``prefetch_factor x num_workers`` batches are
    already requested, so the change reaches the consumer ``1 + prefetch_factor x num_workers``
    batches later. Lightning's fit loop holds one more batch (its fetcher prefetches one to find
    the last batch of a loader with no length): a change made in ``on_train_batch_end`` of
    batch ``k`` shows from batch ``k + 2 + prefetch_factor x num_workers``.

    Distributed: ``num_replicas`` and ``rank`` default to ``torch.distributed``'s world size and
    rank when a process group is initialised (else 1 and 0), resolved when an iterator is
    created, because the loader may be built before the process group exists. Under Lightning
    use ``Trainer(use_distributed_sampler=False)``.

    Epochs and state: ``iter()`` reads the epoch, seed and start position when it is called.
    Lightning calls `set_epoch` (through `sampler`). `state_dict` returns ``{"epoch",
    "consumed", "batch_size", "seed", "shuffle", "drop_last", "num_samples", ...}`` where
    ``consumed`` counts the global samples of the epoch *trained on*, as reported through
    `advance` -- not what was yielded, which runs ahead by the prefetch. A trainer-side caller
    must call ``advance()`` after each trained batch: adabatch's callback does, or your own
    ``Callback.on_train_batch_end`` (Lightning runs callbacks' hooks before the LightningModule's
    and ``ModelCheckpoint`` last, so a checkpoint saved at that batch counts it; the module's
    own ``on_train_batch_end`` runs after that checkpoint). With no calls ``consumed`` stays 0
    and a resumed epoch starts over. An epoch whose every batch was yielded and advanced is
    saved as ``(epoch + 1, consumed=0)``. After `load_state_dict` the next ``iter()`` skips
    the consumed part of that epoch's permutation, first yields again the batches that were
    yielded but not advanced (saved as ``pending``, with their sizes, so a change inside the
    prefetch window does not alter them), and then continues, so the remaining batches equal
    those of an uninterrupted run (for the same batch-size schedule). Lightning saves and
    restores this state only through a loader that has ``state_dict``/``load_state_dict``
    (`ResizableDataLoader`); it never calls a batch sampler's ``state_dict`` itself.

    Args:
        data_source: the dataset (anything with ``len``) or its number of samples.
        batch_size: samples per rank per batch.
        shuffle: permute the indices each epoch (seeded by `permutation_seed`); else in order.
        seed: base seed of the permutation; must be the same on every rank.
        drop_last: drop an incomplete final global batch instead of splitting it.
        num_replicas: number of ranks sharing the data (default: from ``torch.distributed``).
        rank: this process's rank (default: from ``torch.distributed``).

    Raises:
        ValueError: on a non-positive ``batch_size`` or ``num_replicas``, a non-int ``seed``,
            an empty or unsized ``data_source``, a ``torch.utils.data.Sampler`` as
            ``data_source``, or a ``rank`` outside ``[0, num_replicas)`` (checked again when
            an iterator resolves the defaults).

    Example::

        >>> sampler = ResizableBatchSampler(10, batch_size=4, shuffle=False)
        >>> batches = iter(sampler)
        >>> next(batches)
        [0, 1, 2, 3]
        >>> sampler.set_batch_size(2)
        >>> list(batches)
        [[4, 5], [6, 7], [8, 9]]
        >>> # three ranks, 7 samples: one global batch split 3/2/2 (the remainder 1 < 3 merged)
        >>> [list(ResizableBatchSampler(7, 2, shuffle=False, num_replicas=3, rank=r))
        ...  for r in range(3)]
        [[[0, 1, 2]], [[3, 4]], [[5, 6]]]
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(list(range(100, 106)),
        ...                     batch_sampler=ResizableBatchSampler(6, 3, shuffle=False))
        >>> [batch.tolist() for batch in loader]
        [[100, 101, 102], [103, 104, 105]]
    """

    def __init__(
        self,
        data_source: Sized | int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if isinstance(data_source, Sampler):
            raise ValueError(
                f"data_source={type(data_source).__name__} is a sampler: ResizableBatchSampler "
                "shards the data itself. Pass the dataset or its length. (Under DDP Lightning "
                "injects a DistributedSampler this way unless "
                "Trainer(use_distributed_sampler=False).)"
            )
        if isinstance(data_source, int) and not isinstance(data_source, bool):
            num_samples = data_source
        elif isinstance(data_source, Sized):
            num_samples = len(data_source)
        else:
            raise ValueError(
                f"data_source={data_source!r} must be a sized dataset or a number of samples"
            )
        self._num_samples = _check_int("number of samples in data_source", num_samples, 1)
        self._batch_size = _check_int("batch_size", batch_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an int")
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        if num_replicas is not None:
            _check_int("num_replicas", num_replicas, 1)
        if rank is not None:
            _check_int("rank", rank, 0)
            if num_replicas is not None and rank >= num_replicas:
                raise ValueError(f"rank={rank} must be < num_replicas={num_replicas}")
        self._num_replicas_arg = num_replicas
        self._rank_arg = rank

        self._epoch = 0
        self._order_epoch: int | None = None  # epoch whose permutation serves _epoch, if not it
        self._consumed = 0  # global samples of this epoch trained on (via advance)
        self._resume = False  # next iter() starts at _consumed instead of 0
        self._replay: list[int] = []  # ends of the batches a resumed iter() yields first
        self._ends: collections.deque[int] = collections.deque()  # yielded, not yet advanced
        self._exhausted = False  # the live iterator has yielded the whole epoch
        self._iter_token: object | None = None  # identifies the live iterator
        self._live_start = 0  # where the live iterator started
        self._live_key: tuple | None = None  # the loaded state the live iterator resumed
        self._resume_key: tuple | None = None  # the loaded state the next iter() resumes

    # ----------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        """Samples per rank in the batches yielded from now on."""
        return self._batch_size

    @property
    def num_samples(self) -> int:
        """Number of samples in the data source."""
        return self._num_samples

    @property
    def epoch(self) -> int:
        """The current epoch (set by `set_epoch` or `load_state_dict`)."""
        return self._epoch

    @property
    def num_replicas(self) -> int:
        """Number of ranks: the constructor's value, else ``torch.distributed``'s, else 1."""
        return self._resolve()[0]

    @property
    def rank(self) -> int:
        """This rank: the constructor's value, else ``torch.distributed``'s, else 0."""
        return self._resolve()[1]

    @property
    def sampler(self) -> ResizableBatchSampler:
        """This object: Lightning calls ``loader.batch_sampler.sampler.set_epoch(epoch)``."""
        return self

    @property
    def consumed(self) -> int:
        """Global samples of the current epoch trained on, as reported through `advance`.

        Setting it (``0 <= value <= num_samples``) makes the next ``iter()`` start there.
        """
        return self._consumed

    @consumed.setter
    def consumed(self, value: int) -> None:
        self._consumed = self._check_consumed(value)
        self._resume = True
        self._replay = []
        self._resume_key = None
        while self._ends and self._ends[0] <= self._consumed:
            self._ends.popleft()

    # ------------------------------------------------------------------- control
    def set_batch_size(self, batch_size: int) -> None:
        """Use ``batch_size`` samples per rank from the next batch yielded (see the prefetch lag
        in the class docstring). Call it identically on every rank."""
        self._batch_size = _check_int("batch_size", batch_size, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``iter()``; a different epoch starts from sample 0.

        Setting the current epoch again keeps a loaded resume position (Lightning calls
        ``set_epoch`` after ``load_state_dict`` on resume).

        A live iterator that started an epoch from its first sample and has no batch advanced
        yet is adopted by the new epoch: it keeps its permutation (recorded in the state as
        ``order_epoch``) and its counts. Lightning 2.6 needs this when it resumes from a
        checkpoint saved at an epoch's end: it creates the iterator and prefetches a batch
        *before* calling ``set_epoch`` and, there, restores no loader state; that epoch then
        runs in the previous epoch's order, each sample still once.
        """
        epoch = _check_int("epoch", epoch, 0)
        if epoch == self._epoch:
            return
        adopt = (
            self._iter_token is not None
            and not self._exhausted
            and self._live_start == 0
            and self._consumed == 0
        )
        if adopt:
            self._order_epoch = self._epoch if self._order_epoch is None else self._order_epoch
            self._live_key = None  # it no longer serves the state it was resumed from
        else:
            self._order_epoch = None
            self._detach_iterator()
        self._epoch = epoch
        self._consumed = 0
        self._resume = False
        self._replay = []

    def advance(self, num_samples: int | None = None) -> None:
        """Record trained samples of the current epoch (global, all ranks together).

        ``advance()`` marks the oldest yielded, not yet advanced batch as trained and adds its
        global size, exact even for the uneven final batch: call it once per trained batch.
        ``advance(n)`` adds ``n`` global samples, for callers that count them (e.g. once per
        optimizer step with the step's global batch). Call it on every rank (the count is
        global, so rank 0's state, which Lightning checkpoints, is everyone's).

        Raises:
            ValueError: on a negative ``num_samples``, a count past the end of the epoch, or
                ``advance()`` with no yielded batch left to mark.
        """
        if num_samples is None:
            while self._ends and self._ends[0] <= self._consumed:
                self._ends.popleft()
            if not self._ends:
                raise ValueError(
                    "advance() with num_samples=None needs a yielded batch not yet advanced; "
                    "none is left"
                )
            self._consumed = self._ends.popleft()
            return
        n = _check_int("num_samples", num_samples, 0)
        self._consumed = self._check_consumed(self._consumed + n)
        while self._ends and self._ends[0] <= self._consumed:
            self._ends.popleft()

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Position for exact resume.

        Keys: ``epoch``; ``order_epoch`` (the epoch whose permutation orders it, normally
        ``epoch``; see `set_epoch`); ``consumed`` (global samples of the epoch trained on, see
        `advance`);
        ``pending`` (end positions of the batches yielded but not yet advanced -- the loader's
        prefetch -- which a resumed iterator yields again with the same sizes, so a batch-size
        change inside the prefetch window does not alter them); ``batch_size``, ``seed``,
        ``shuffle``, ``drop_last``, ``num_samples``, ``num_replicas`` (informational) and
        ``version``.
        """
        epoch, consumed = self._epoch, self._consumed
        order = self._epoch if self._order_epoch is None else self._order_epoch
        pending = [end for end in self._ends if end > consumed]
        if consumed >= self._num_samples or (self._exhausted and not pending):
            # Every batch of the epoch was yielded and trained: the next data is the next
            # epoch's start. Lightning resumes from a checkpoint taken at the last batch into
            # the next epoch with the iterator it creates before calling set_epoch.
            epoch, order, consumed, pending = epoch + 1, epoch + 1, 0, []
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "order_epoch": order,
            "consumed": consumed,
            "pending": pending,
            "batch_size": self._batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_samples": self._num_samples,
            "num_replicas": self._resolve()[0],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict`: the next ``iter()`` continues that epoch after ``consumed``.

        Any live iterator stops updating this sampler's counters, except when it was itself
        started from this same state and nothing has been advanced since: then the call is a
        no-op (Lightning may have restored the state through `ResizableDataLoader` before a
        callback restores it again).

        Raises:
            ValueError: when the state's ``num_samples`` differs from this data source's, or on
                an inconsistent position.
        """
        n = state_dict.get("num_samples", self._num_samples)
        if n != self._num_samples:
            raise ValueError(
                f"num_samples={n} in the state differs from this data source's "
                f"{self._num_samples}: the saved position does not apply"
            )
        epoch = _check_int("epoch", state_dict.get("epoch", 0), 0)
        order = _check_int("order_epoch", state_dict.get("order_epoch", epoch), 0)
        batch_size = _check_int("batch_size", state_dict.get("batch_size", self._batch_size), 1)
        consumed = self._check_consumed(state_dict.get("consumed", 0))
        replay = [self._check_consumed(end) for end in state_dict.get("pending", [])]
        if any(b <= a for a, b in zip([consumed, *replay], replay)):
            raise ValueError(f"pending={replay} must be increasing and > consumed={consumed}")
        key = (epoch, order, consumed, tuple(replay))
        if self._iter_token is not None and self._live_key == key and self._consumed == consumed:
            return  # this very state is already being served
        self._epoch = epoch
        self._order_epoch = None if order == epoch else order
        self._batch_size = batch_size
        self.seed = int(state_dict.get("seed", self.seed))
        self.shuffle = bool(state_dict.get("shuffle", self.shuffle))
        self.drop_last = bool(state_dict.get("drop_last", self.drop_last))
        self._detach_iterator()
        self._consumed = consumed
        self._replay = replay
        self._resume = True
        self._resume_key = key

    # ----------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[list[int]]:
        num_replicas, rank = self._resolve()
        start = self._consumed if self._resume else 0
        replay = self._replay if self._resume else []
        live_key = self._resume_key if self._resume else None
        if not self._resume:
            self._order_epoch = None
        self._consumed = start
        self._resume = False
        self._replay = []
        self._detach_iterator()
        token = object()
        self._iter_token = token
        self._live_start = start
        self._live_key = live_key
        order = self._epoch if self._order_epoch is None else self._order_epoch
        perm = self._permutation(order)
        return self._batches(perm, start, replay, num_replicas, rank, token)

    def _batches(
        self,
        perm: list[int],
        pos: int,
        replay: list[int],
        num_replicas: int,
        rank: int,
        token: object,
    ) -> Iterator[list[int]]:
        n = len(perm)
        replay_ends = collections.deque(replay)
        while pos < n:
            left = n - pos
            step = self._batch_size * num_replicas
            if replay_ends:
                size = replay_ends.popleft() - pos  # a batch prefetched before the checkpoint
            elif left >= step:
                size = step
                if not self.drop_last and 0 < left - step < num_replicas:
                    size = left  # merge a remainder too small to give every rank a sample
            elif self.drop_last:
                break
            else:
                size = left
            if size < num_replicas:
                # Fewer samples left than ranks (only at the start of an epoch or of a resumed
                # one): every rank must still yield a batch, so repeat some.
                batch = [perm[pos + rank % size]]
            else:
                q, extra = divmod(size, num_replicas)
                lo = pos + rank * q + min(rank, extra)
                batch = perm[lo : lo + q + (rank < extra)]
            pos += size
            if token is self._iter_token:
                self._ends.append(pos)
            yield batch
        if token is self._iter_token:
            self._exhausted = True

    # ------------------------------------------------------------------- helpers
    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self._num_samples))
        generator = torch.Generator()
        generator.manual_seed(permutation_seed(self.seed, epoch))
        return torch.randperm(self._num_samples, generator=generator).tolist()

    def _resolve(self) -> tuple[int, int]:
        num_replicas, rank = self._num_replicas_arg, self._rank_arg
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        if rank >= num_replicas:
            raise ValueError(f"rank={rank} must be < num_replicas={num_replicas}")
        return num_replicas, rank

    def _check_consumed(self, value: Any) -> int:
        value = _check_int("consumed", value, 0)
        if value > self._num_samples:
            raise ValueError(f"consumed={value} must be <= num_samples={self._num_samples}")
        return value

    def _detach_iterator(self) -> None:
        self._iter_token = None
        self._live_key = None
        self._ends.clear()
        self._exhausted = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self._num_samples}, "
            f"batch_size={self._batch_size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"drop_last={self.drop_last}, num_replicas={self._num_replicas_arg}, "
            f"rank={self._rank_arg})"
        )


class ResizableDataLoader(DataLoader):
    """A ``DataLoader`` over a `ResizableBatchSampler` whose position Lightning checkpoints.

    Lightning saves the ``state_dict()`` of every train loader that has
    ``state_dict``/``load_state_dict`` (``FitLoop.on_save_checkpoint``) and, on resume, loads it
    before it creates the epoch's iterator. This loader forwards both to its batch sampler, so a
    run resumed mid-epoch continues with exactly the batches it would have seen. The sampler's
    ``consumed`` count must still be advanced after each trained batch (`advance`).

    Args:
        dataset: the map-style dataset.
        batch_sampler: the `ResizableBatchSampler` over ``dataset``.
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ...); not
            ``batch_size``, ``shuffle``, ``sampler`` or ``drop_last``, which the sampler owns.

    Raises:
        ValueError: when ``batch_sampler`` is not a `ResizableBatchSampler`.

    Example::

        >>> sampler = ResizableBatchSampler(6, batch_size=2, shuffle=False)
        >>> loader = ResizableDataLoader(list(range(6)), sampler)
        >>> batches = iter(loader)
        >>> next(batches).tolist()
        [0, 1]
        >>> sampler.advance()
        >>> state = loader.state_dict()
        >>> state["epoch"], state["consumed"]
        (0, 2)
        >>> resumed = ResizableDataLoader(list(range(6)), ResizableBatchSampler(6, 2))
        >>> resumed.load_state_dict(state)
        >>> [batch.tolist() for batch in resumed]
        [[2, 3], [4, 5]]
    """

    def __init__(self, dataset: Any, batch_sampler: ResizableBatchSampler, **kwargs: Any) -> None:
        if not isinstance(batch_sampler, ResizableBatchSampler):
            raise ValueError(
                f"batch_sampler={type(batch_sampler).__name__} must be a ResizableBatchSampler"
            )
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The batch sampler's `ResizableBatchSampler.state_dict`."""
        return self.batch_sampler.state_dict()  # type: ignore[union-attr]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the batch sampler's position (before an iterator is created)."""
        self.batch_sampler.load_state_dict(state_dict)  # type: ignore[union-attr]
