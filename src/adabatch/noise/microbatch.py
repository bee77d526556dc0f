"""Micro-batch probe: the squared norm of each backward pass's local gradient.

A tensor hook on a leaf parameter (``param.register_hook``) receives the gradient that one
backward pass computes for it, before it is accumulated into ``.grad`` and before DDP's
all-reduce (DDP's reducer runs after accumulation). Summing ``|grad|^2`` over the parameters
of one backward pass therefore gives that micro-batch's squared gradient norm on this rank:
the small-batch statistic ``|g_b|^2`` with ``b`` = micro-batch size per rank.

Ending a backward pass: the first hook that fires in a backward (autograd graph task) opens
an accumulator and queues a callback on the autograd engine
(``Variable._execution_engine.queue_callback``, the mechanism DDP itself uses) that runs when
that backward finishes and records the value. So parameters that receive no gradient in a
backward (unused branches, routed experts, frozen parts) need no special handling, and a
parameter used twice in one forward (tied weights) is seen once with its summed gradient.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

__all__ = ["MicroBatchGradNorms"]


def _graph_task_id() -> int:
    # -1 outside a backward pass. Private but long-standing (used by torch's own multi-grad
    # hooks); fall back to a single shared id if it ever disappears.
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn() if fn is not None else 0


class MicroBatchGradNorms:
    """Records the squared norm of every backward pass's gradient, one value per backward.

    After each backward pass (``loss.backward()``, ``manual_backward``, ``torch.autograd.grad``
    on the watched parameters) it records ``sum_p |grad_p|^2 / grad_scale**2`` over the watched
    parameters that received a gradient in that pass. The sum is accumulated in float32, or in
    float64 when any watched parameter is float64, and stays on the device (no host sync)
    until :attr:`sq_norms` is read.

    ``grad_scale`` is the factor the backward's loss carries beyond the plain mean loss over the
    micro-batch (``1/k`` under Lightning's gradient accumulation over ``k`` micro-batches, times
    the AMP loss scale), so the recorded values are in per-example loss units. It is read when
    a backward ends; set it before the backward it applies to.

    Limitations:
        - Reentrant activation checkpointing (``use_reentrant=True``) runs nested backward
          passes. Nested passes that start while the outer pass is open are merged into it;
          a nested pass that runs before any outer parameter received its gradient is recorded
          as a separate value (a warning is issued). Use ``use_reentrant=False``.
        - Extra gradient computations on the watched parameters (e.g. a gradient penalty with
          ``torch.autograd.grad``) are backward passes too: :meth:`detach` around them.
        - A backward that raises leaves a partial value, dropped when :attr:`sq_norms` is read;
          call :meth:`reset` after catching such an exception (e.g. an OOM retry) so that the
          next passes are not merged into it.

    Args:
        model_or_params: an ``nn.Module`` (its parameters with ``requires_grad``) or an
            iterable of leaf tensors; duplicates are watched once.
        grad_scale: positive float (or a tensor, e.g. an AMP scale kept on device).

    Raises:
        ValueError: if there is no trainable parameter, a tensor is not a leaf, or
            ``grad_scale`` is not a finite number ``> 0``.

    Example::

        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with MicroBatchGradNorms(model, grad_scale=0.5) as probe:
        ...     for xb, yb in zip(x.split(4), y.split(4)):
        ...         loss = 0.5 * nn.functional.mse_loss(model(xb), yb)  # accumulation, k=2
        ...         loss.backward()
        ...     norms = probe.sq_norms
        >>> norms.shape
        torch.Size([2])
        >>> probe.attached
        False
    """

    def __init__(
        self, model_or_params: nn.Module | Iterable[Tensor], grad_scale: float | Tensor = 1.0
    ) -> None:
        raw = (model_or_params.parameters() if isinstance(model_or_params, nn.Module)
               else model_or_params)
        if isinstance(raw, Tensor):
            raw = [raw]
        params: list[Tensor] = []
        seen: set[int] = set()
        for p in raw:
            if not isinstance(p, Tensor):
                raise ValueError(f"model_or_params must hold tensors, got {type(p).__name__}")
            if not p.requires_grad or id(p) in seen:
                continue
            if not p.is_leaf:
                raise ValueError(f"tensor of shape {tuple(p.shape)} is not a leaf tensor; "
                                 "the probe watches parameters")
            seen.add(id(p))
            params.append(p)
        if not params:
            raise ValueError("model_or_params has no parameter with requires_grad=True")
        self._params = params
        self.grad_scale = grad_scale
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self._records: list[Tensor] = []
        self._open: dict[int, list[Tensor]] = {}  # graph task id -> norms (insertion order)
        self._warned_nested = False

    # -- configuration -----------------------------------------------------------------
    @property
    def grad_scale(self) -> float | Tensor:
        """Loss factor beyond the plain mean loss; recorded norms are divided by its square."""
        return self._grad_scale

    @grad_scale.setter
    def grad_scale(self, value: float | Tensor) -> None:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"grad_scale must be a scalar, got shape {tuple(value.shape)}")
            self._grad_scale: float | Tensor = value.detach()
            return
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"grad_scale={value!r} must be a number > 0") from None
        if not (v > 0 and v != float("inf")):
            raise ValueError(f"grad_scale={value!r} must be a finite number > 0")
        self._grad_scale = v

    @property
    def params(self) -> list[Tensor]:
        """The watched parameters."""
        return list(self._params)

    # -- hooks -------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> MicroBatchGradNorms:
        """Register the hooks (no-op if attached). Returns ``self``."""
        if not self._handles:
            self._handles = [p.register_hook(self._hook) for p in self._params]
        return self

    def detach(self) -> None:
        """Remove the hooks (no-op if detached). Recorded values are kept."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> MicroBatchGradNorms:
        self.reset()
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def _hook(self, grad: Tensor) -> None:
        # Per parameter: one norm kernel and a list append; the squares are summed once per
        # backward in _close (measured: benchmarks/overhead.py, RESULTS.md).
        if grad.is_sparse:
            grad = grad.coalesce().values()
        norm = torch.linalg.vector_norm(
            grad, dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32
        )
        task = _graph_task_id()
        norms = self._open.get(task)
        if norms is None:
            norms = self._open_pass(task)
        norms.append(norm)

    def _open_pass(self, task: int) -> list[Tensor]:
        with self._lock:
            if self._open and not self._warned_nested:
                # Only a nested (reentrant) backward, or a pass that died with an
                # exception, opens while another is open.
                self._warned_nested = True
                warnings.warn(
                    "MicroBatchGradNorms: a backward pass started inside another one "
                    "(reentrant activation checkpointing?); nested passes are merged into "
                    "the enclosing one when it is already open. Prefer use_reentrant=False. "
                    "(Or an earlier backward raised: call reset() after catching it.)",
                    stacklevel=3,
                )
            norms: list[Tensor] = []
            self._open[task] = norms
        Variable._execution_engine.queue_callback(lambda: self._close(task))
        return norms

    def _close(self, task: int) -> None:
        with self._lock:
            norms = self._open.pop(task, None)
            if not norms:
                return
            if self._open:
                # A nested (reentrant) pass: fold it into the most recent enclosing pass.
                self._open[next(reversed(self._open))].extend(norms)
                return
            acc = _sum_of_squares(norms)
            scale = self._grad_scale
            if isinstance(scale, Tensor):
                scale = scale.to(device=acc.device, dtype=acc.dtype)
            self._records.append(acc / (scale * scale))

    # -- read-outs ---------------------------------------------------------------------
    def _drop_unfinished(self) -> None:
        # Outside a backward, an open accumulator belongs to a pass that raised: its value
        # is partial, so it is dropped.
        if self._open and _graph_task_id() == -1:
            with self._lock:
                self._open.clear()

    @property
    def sq_norms(self) -> Tensor:
        """1-D tensor, one squared norm per finished backward since :meth:`reset`.

        On the device of the gradients (no host sync), float32 (float64 for float64 params).
        """
        self._drop_unfinished()
        with self._lock:
            records = list(self._records)
        if not records:
            dtype = (torch.float64 if any(p.dtype == torch.float64 for p in self._params)
                     else torch.float32)
            return torch.zeros(0, dtype=dtype, device=self._params[0].device)
        device = records[0].device
        dtype = torch.float64 if any(r.dtype == torch.float64 for r in records) else torch.float32
        return torch.stack([r.to(device=device, dtype=dtype) for r in records])

    @property
    def num_backwards(self) -> int:
        """Number of finished backward passes recorded since :meth:`reset`."""
        return len(self._records)

    def reset(self) -> None:
        """Forget recorded values (and any unfinished pass)."""
        with self._lock:
            self._records = []
            self._open.clear()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(params={len(self._params)}, attached={self.attached}, "
                f"num_backwards={self.num_backwards})")


def _sum_of_squares(norms: list[Tensor]) -> Tensor:
    """``sum |g|^2`` from per-parameter norms: one stack per device (usually one)."""
    device = norms[0].device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    if all(n.device == device and n.dtype == dtype for n in norms):
        return torch.stack(norms).square().sum()
    return torch.stack([n.to(device, dtype) for n in norms]).square().sum()
