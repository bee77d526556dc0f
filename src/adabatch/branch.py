"""Runs the branched critical-batch probe inside a Lightning fit (see
:mod:`adabatch.control.critical` for the method and its maths).

:class:`BranchRunner` is driven by the callback:

- ``collect_eval(batch)`` keeps the first micro-batches of training as the fixed probe set;
- ``open(...)`` at an optimizer step: snapshot of weights, buffers and optimizer state, and
  ``L0`` on the probe set (per batch);
- ``record(batch, lrs)`` keeps every micro-batch (and the step's learning rates) of the
  window's ``window_steps`` main-run steps;
- ``close(...)``: ``L_main``; load the snapshot; replay the same micro-batches as
  ``window_steps / k`` steps at ``k x B`` (hyperparameters from the callback's
  ``apply_factors``: the rules at ``k x B``, the lr ``k`` x the main run's, ``sqrt(k)`` x for
  Adam, under a saturating AdaScale gain); ``L_branch``;
  put the main run's state back exactly (weights, buffers, optimizer state, RNG).

The main run is untouched: it sees its data once, in its order, and the probe restores the
global RNG, so the main run's numbers do not depend on whether a probe ran in between (a
test checks this bit for bit). Under DDP each rank replays its own shard of the window and
the branch's gradients are averaged over ranks, as DDP would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.data import extract_batch_size

from adabatch.control.critical import CriticalBatchProbe, ProbeResult

__all__ = ["BranchRunner"]


def _loss_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        loss = output.get("loss")
        if isinstance(loss, torch.Tensor):
            return loss
    if output is None:
        return None
    raise ValueError(
        f"training_step returned {type(output).__name__}; the critical-batch probe needs a "
        "loss tensor (or a dict with 'loss')"
    )


@contextlib.contextmanager
def _muted(pl_module: Any) -> Iterator[None]:
    """``self.log`` calls of a replayed training_step must not reach the main run's logs."""
    saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    pl_module.log = lambda *a, **k: None
    pl_module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = value


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


class _Snapshot:
    """Weights, buffers and optimizer state, copied; ``load`` writes them back in place."""

    def __init__(self, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self.model = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.optim = [_copy(dict(optimizer.state[p])) if p in optimizer.state else None
                      for p in params]
        self.groups = [{k: _copy(v) for k, v in g.items() if k != "params"}
                       for g in optimizer.param_groups]

    def load(self, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        pl_module.load_state_dict(self.model)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        optimizer.state.clear()
        for p, state in zip(params, self.optim):
            if state is not None:
                optimizer.state[p] = _copy(state)
        for group, saved in zip(optimizer.param_groups, self.groups):
            group.update(_copy(saved))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model, "optim": self.optim, "groups": self.groups}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Snapshot:
        if not isinstance(state, dict) or set(state) != {"model", "optim", "groups"}:
            raise ValueError("probe window snapshot must hold model, optim and groups")
        snap = cls.__new__(cls)
        snap.model, snap.optim, snap.groups = state["model"], state["optim"], state["groups"]
        return snap


class BranchRunner:
    """The probe's run-time state within one fit (one per rank)."""

    def __init__(self, config: CriticalBatchProbe, world_size: int = 1) -> None:
        self.config = config
        self.world_size = world_size
        self.eval_batches: list[Any] = []
        self._eval_count = 0
        self.window: dict[str, Any] | None = None
        self.spent = 0.0  # sample-equivalents of forward+backward
        self.seconds = 0.0
        self.last: ProbeResult | None = None  # the last window's result, conclusive or not

    @property
    def eval_ready(self) -> bool:
        return self._eval_count * self.world_size >= self.config.eval_samples

    def collect_eval(self, batch: Any) -> None:
        """Keep ``batch`` in the probe set until it holds ``eval_samples`` (global)."""
        if not self.eval_ready:
            self.eval_batches.append(_copy(batch))
            self._eval_count += extract_batch_size(batch)

    # ---------------------------------------------------------------- the window
    def open(self, pl_module: Any, optimizer: Any, trainer: Any, batch_size: int) -> None:
        t0 = time.perf_counter()
        l0 = self._batch_losses(pl_module, trainer)
        self.window = {
            "snapshot": _Snapshot(pl_module, optimizer),
            "l0": l0,
            "batch_size": batch_size,
            "steps": [],  # per main step: {"batches": [...], "lrs": [...]}
        }
        self.seconds += time.perf_counter() - t0

    def record(self, batch: Any, optimizer: Any, new_step: bool) -> None:
        """Keep a micro-batch of the window (``new_step``: the first of an optimizer step)."""
        if self.window is None:
            return
        steps = self.window["steps"]
        if new_step or not steps:
            steps.append({"batches": [], "lrs": [g["lr"] for g in optimizer.param_groups]})
        steps[-1]["batches"].append(_copy(batch))

    @property
    def full(self) -> bool:
        return self.window is not None and len(self.window["steps"]) >= self.config.window_steps

    def abandon(self) -> None:
        self.window = None

    def close(
        self,
        pl_module: Any,
        optimizer: Any,
        trainer: Any,
        apply_factors: Callable[[int], None],
        samples: int,
        gns: float | None,
        gns_rel_std: float | None,
    ) -> ProbeResult:
        """Replay the window at ``k x B`` and compare; the main run's state is put back.

        ``apply_factors(batch)`` scales the optimizer for a step at global ``batch``
        (the step post-hook restores it).
        """
        assert self.window is not None
        t0 = time.perf_counter()
        window, self.window = self.window, None
        k = self.config.factor
        batch = window["batch_size"]
        l_main = self._batch_losses(pl_module, trainer)
        main = _Snapshot(pl_module, optimizer)
        with torch.random.fork_rng(devices=_rng_devices()):
            window["snapshot"].load(pl_module, optimizer)
            steps = window["steps"][: self.config.window_steps]
            for j in range(0, len(steps), k):
                group = steps[j: j + k]
                for g, lr in zip(optimizer.param_groups, group[0]["lrs"]):
                    g["lr"] = lr
                self._branch_step(pl_module, optimizer, trainer,
                                  [b for s in group for b in s["batches"]])
                apply_factors(k * batch)
                optimizer.step()
            l_branch = self._batch_losses(pl_module, trainer)
        main.load(pl_module, optimizer)
        optimizer.zero_grad(set_to_none=True)
        cost = self.config.cost(batch)
        self.spent += cost
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        progress, branch_progress, ratio_std = self._compare(
            trainer, window["l0"], l_main, l_branch
        )
        result = ProbeResult(
            samples=samples,
            batch_size=batch,
            factor=k,
            progress=progress,
            branch_progress=branch_progress,
            ratio_std=ratio_std,
            gns=gns,
            gns_rel_std=gns_rel_std,
            tolerance=self.config.tolerance,
            cost=cost,
            seconds=seconds,
        )
        # An inconclusive window (no progress on the probe set) times the next one as a
        # conclusive one would: reopened at once it would face the same noise.
        self.last = result
        return result

    @staticmethod
    def _compare(trainer: Any, l0: torch.Tensor, l_main: torch.Tensor,
                 l_branch: torch.Tensor) -> tuple[float, float, float | None]:
        """Progress of the main run and of the branch on the probe set (all ranks), and the
        standard error of their ratio ``r`` over the probe set's batches.

        With per-batch progress ``c_i`` (main) and ``a_i`` (branch) and batch sizes ``n_i``,
        ``r = sum n a / sum n c`` and, treating the batches as independent draws (the delta
        method), ``var(r) = sum n^2 (a - r c)^2 / (sum n c)^2``: how much the ratio would
        move with another probe set of the same size. ``None`` with fewer than two batches
        or no main progress.
        """
        n = l0[:, 1]
        c = l0[:, 0] - l_main[:, 0]
        a = l0[:, 0] - l_branch[:, 0]
        one = torch.ones((), dtype=torch.float64, device=n.device)
        sums = trainer.strategy.reduce(
            torch.stack([n.sum(), (n * c).sum(), (n * a).sum(), one * len(n)]), reduce_op="sum")
        total, sc, sa, count = (float(v) for v in sums)
        progress, branch_progress = sc / max(total, 1.0), sa / max(total, 1.0)
        if count < 2 or not sc > 0:
            return progress, branch_progress, None
        r = sa / sc
        spread = trainer.strategy.reduce((n * (a - r * c)).square().sum(), reduce_op="sum")
        return progress, branch_progress, float(spread) ** 0.5 / sc

    def _branch_step(self, pl_module: Any, optimizer: Any, trainer: Any,
                     batches: list[Any]) -> None:
        """Gradient of the mean loss over ``batches`` (this rank's), averaged over ranks."""
        optimizer.zero_grad(set_to_none=True)
        total = sum(extract_batch_size(b) for b in batches)
        model = trainer.strategy.model
        no_sync = getattr(model, "no_sync", None)
        with _muted(pl_module), (no_sync() if no_sync is not None else contextlib.nullcontext()):
            for b in batches:
                with trainer.precision_plugin.forward_context():
                    loss = _loss_of(pl_module.training_step(b, 0))
                if loss is not None:
                    (loss * (extract_batch_size(b) / total)).backward()
        if self.world_size > 1:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad = trainer.strategy.reduce(p.grad, reduce_op="mean")
        clip = trainer.gradient_clip_val
        if clip:
            params = [p for p in pl_module.parameters() if p.grad is not None]
            if trainer.gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip)

    def _batch_losses(self, pl_module: Any, trainer: Any) -> torch.Tensor:
        """``(mean loss, size)`` of each of this rank's probe-set batches, float64."""
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        losses, sizes = [], []
        try:
            with torch.no_grad(), _muted(pl_module):
                for b in self.eval_batches:
                    with trainer.precision_plugin.forward_context():
                        loss = _loss_of(pl_module.training_step(b, 0))
                    if loss is not None:
                        losses.append(loss.detach().double().reshape(()).to(pl_module.device))
                        sizes.append(float(extract_batch_size(b)))
        finally:
            for m, training in modes.items():
                m.training = training
        size = torch.tensor(sizes, dtype=torch.float64, device=pl_module.device)
        if not losses:
            return torch.zeros(0, 2, dtype=torch.float64, device=pl_module.device)
        return torch.stack([torch.stack(losses), size], 1)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        window = None
        if self.window is not None:
            window = dict(self.window)
            window["snapshot"] = self.window["snapshot"].state_dict()
        return {
            "eval_batches": self.eval_batches,
            "eval_count": self._eval_count,
            "window": window,
            "spent": self.spent,
            "seconds": self.seconds,
            "last": None if self.last is None else self.last.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: naming a field of the wrong type.
        """
        if not isinstance(state, dict):
            raise ValueError(f"probe state={type(state).__name__} must be a dict")
        batches = state.get("eval_batches", [])
        if not isinstance(batches, list):
            raise ValueError("probe.eval_batches must be a list of batches")
        for key in ("eval_count",):
            v = state.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"probe.{key}={v!r} must be an int >= 0")
        for key in ("spent", "seconds"):
            v = state.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"probe.{key}={v!r} must be a number >= 0")
        window = state.get("window")
        if window is not None:
            if not isinstance(window, dict) or set(window) != {"snapshot", "l0", "batch_size",
                                                                "steps"}:
                raise ValueError("probe.window must hold snapshot, l0, batch_size and steps")
            window = dict(window)
            window["snapshot"] = _Snapshot.from_state(window["snapshot"])
            l0 = window["l0"]
            if not (isinstance(l0, torch.Tensor) and l0.ndim == 2 and l0.shape[1] == 2):
                window = None  # a window saved without per-batch losses: probe again later
        self.eval_batches = batches
        self._eval_count = int(state.get("eval_count", 0))
        self.window = window
        last = state.get("last")
        self.last = None if last is None else ProbeResult.from_dict(last)
        self.spent = float(state.get("spent", 0.0))
        self.seconds = float(state.get("seconds", 0.0))


def _rng_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []
