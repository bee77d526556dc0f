"""Learning-rate schedules in samples: pure ``f(samples) -> factor`` functions.

When the batch grows, a schedule written in optimizer steps is compressed in data: a cosine
over 10,000 steps planned at B = 64 (640k samples) is over after 160k samples if the batch
grows to 256 at once, and ends wherever the step budget hits. A schedule in samples keeps its
shape in data seen, whatever the batch does (Megatron-LM and OLMo schedule in samples/tokens
for this reason). The factor multiplies the base learning rate; the batch-size rule
(:mod:`adabatch.control.rules`) is applied on top, around the step only.

Warm-up is linear from 0 at sample 0 (as in Megatron-LM); the first step therefore runs at
factor 0 when it is evaluated at ``samples = 0``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "SCHEDULES",
    "SampleCounter",
    "SampleSchedule",
    "constant",
    "sample_lambda_lr",
    "warmup_cosine",
    "warmup_linear",
    "warmup_stable_decay",
]


def _check(samples: float, warmup_samples: float, total_samples: float, final_factor: float):
    for name, value in (("samples", samples), ("warmup_samples", warmup_samples)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    if not math.isfinite(total_samples) or total_samples <= 0:
        raise ValueError(f"total_samples={total_samples!r} must be a finite number > 0")
    if warmup_samples > total_samples:
        raise ValueError(
            f"warmup_samples={warmup_samples!r} must be <= total_samples={total_samples!r}"
        )
    if not 0.0 <= final_factor <= 1.0:
        raise ValueError(f"final_factor={final_factor!r} must be in [0, 1]")


def _warmup(samples: float, warmup_samples: float) -> float | None:
    """Linear warm-up factor while ``samples < warmup_samples``, else ``None``."""
    if samples < warmup_samples:
        return samples / warmup_samples
    return None


def constant(samples: float, warmup_samples: float = 0, total_samples: float = math.inf) -> float:
    """Linear warm-up to 1, then 1.

    Raises:
        ValueError: on negative ``samples`` or ``warmup_samples``.

    Example::

        >>> constant(50, warmup_samples=100), constant(5000, warmup_samples=100)
        (0.5, 1.0)
    """
    for name, value in (("samples", samples), ("warmup_samples", warmup_samples)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    w = _warmup(samples, warmup_samples)
    return 1.0 if w is None else w


def warmup_cosine(
    samples: float, warmup_samples: float, total_samples: float, final_factor: float = 0.0
) -> float:
    """Linear warm-up to 1, cosine decay to ``final_factor`` at ``total_samples``, then flat.

    ``f = final + (1 - final) * (1 + cos(pi * p)) / 2`` with
    ``p = (samples - warmup) / (total - warmup)`` (Loshchilov & Hutter 2017, one cycle).

    Raises:
        ValueError: on negative ``samples``/``warmup_samples``, ``total_samples <= 0``,
            ``warmup_samples > total_samples`` or ``final_factor`` outside ``[0, 1]``.

    Example::

        >>> [round(warmup_cosine(s, 100, 1100, final_factor=0.1), 4) for s in (0, 50, 100, 600,
        ...                                                                     1100, 5000)]
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """
    _check(samples, warmup_samples, total_samples, final_factor)
    w = _warmup(samples, warmup_samples)
    if w is not None:
        return w
    if samples >= total_samples:
        return final_factor
    p = (samples - warmup_samples) / (total_samples - warmup_samples)
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * p))


def warmup_linear(
    samples: float, warmup_samples: float, total_samples: float, final_factor: float = 0.0
) -> float:
    """Linear warm-up to 1, then linear decay to ``final_factor`` (default 0) at the end.

    Raises:
        ValueError: as :func:`warmup_cosine`.

    Example::

        >>> [warmup_linear(s, 100, 1100) for s in (0, 50, 100, 600, 1100, 5000)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    _check(samples, warmup_samples, total_samples, final_factor)
    w = _warmup(samples, warmup_samples)
    if w is not None:
        return w
    if samples >= total_samples:
        return final_factor
    p = (samples - warmup_samples) / (total_samples - warmup_samples)
    return final_factor + (1.0 - final_factor) * (1.0 - p)


_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_stable_decay(
    samples: float,
    warmup_samples: float,
    total_samples: float,
    decay_fraction: float = 0.2,
    final_factor: float = 0.0,
    shape: str = "linear",
) -> float:
    """Warm-up, stable at 1, then decay over the last ``decay_fraction`` of the samples.

    WSD (Hu et al. 2024, MiniCPM; Hägele et al. 2024 found the ``"1-sqrt"`` decay
    ``1 - sqrt(p)`` best). The decay runs from ``total * (1 - decay_fraction)`` to
    ``total``; it may not start before the warm-up ends.

    Args:
        shape: decay shape, ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.

    Raises:
        ValueError: as :func:`warmup_cosine`, plus ``decay_fraction`` outside ``[0, 1]``,
            a decay that would start inside the warm-up, or an unknown ``shape``.

    Example::

        >>> [warmup_stable_decay(s, 100, 1000) for s in (50, 100, 700, 800, 900, 1000)]
        [0.5, 1.0, 1.0, 1.0, 0.5, 0.0]
        >>> warmup_stable_decay(900, 100, 1000, shape="1-sqrt", final_factor=0.5)
        0.6464466094067263
    """
    _check(samples, warmup_samples, total_samples, final_factor)
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction={decay_fraction!r} must be in [0, 1]")
    if shape not in _WSD_SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {list(_WSD_SHAPES)}")
    decay_start = total_samples * (1.0 - decay_fraction)
    if decay_start < warmup_samples:
        raise ValueError(
            f"the decay would start at {decay_start} samples, inside the warm-up "
            f"(warmup_samples={warmup_samples!r}); lower decay_fraction={decay_fraction!r}"
        )
    w = _warmup(samples, warmup_samples)
    if w is not None:
        return w
    if samples >= total_samples:
        return final_factor
    if samples < decay_start:
        return 1.0
    p = (samples - decay_start) / (total_samples - decay_start)
    if shape == "linear":
        d = 1.0 - p
    elif shape == "cosine":
        d = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        d = 1.0 - math.sqrt(p)
    return final_factor + (1.0 - final_factor) * d


#: Schedules by name, for :class:`SampleSchedule`.
SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "warmup_cosine": warmup_cosine,
    "warmup_linear": warmup_linear,
    "warmup_stable_decay": warmup_stable_decay,
}


class SampleSchedule:
    """A named schedule with its arguments bound: ``factor(samples) -> float``.

    The arguments are checked at construction (by evaluating the schedule at sample 0).

    Args:
        name: one of :data:`SCHEDULES`.
        **kwargs: the schedule's arguments other than ``samples``.

    Raises:
        ValueError: on an unknown name (listing the valid ones), an argument the schedule
            does not take, a missing one, or a bad value.

    Example::

        >>> s = SampleSchedule("warmup_cosine", warmup_samples=100, total_samples=1100)
        >>> s.factor(100), s(600)
        (1.0, 0.5)
    """

    def __init__(self, name: str, **kwargs: Any) -> None:
        fn = SCHEDULES.get(name)
        if fn is None:
            raise ValueError(f"schedule name={name!r} is not one of {list(SCHEDULES)}")
        params = inspect.signature(fn).parameters
        takes = [p for p in params if p != "samples"]
        unknown = sorted(set(kwargs) - set(takes))
        if unknown:
            raise ValueError(f"schedule {name!r} does not take {unknown}; it takes {takes}")
        missing = [
            p for p in takes if params[p].default is inspect.Parameter.empty and p not in kwargs
        ]
        if missing:
            raise ValueError(f"schedule {name!r} needs {missing}")
        self.name = name
        self.kwargs = dict(kwargs)
        self._fn = fn
        self.factor(0)

    def factor(self, samples: float) -> float:
        """The learning-rate factor after ``samples`` samples."""
        return self._fn(samples, **self.kwargs)

    __call__ = factor

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"{type(self).__name__}({self.name!r}{args})"


class SampleCounter:
    """A mutable count of samples trained on, to drive :func:`sample_lambda_lr`.

    Example::

        >>> c = SampleCounter()
        >>> c.add(64); c.add(128); c.samples
        192
    """

    def __init__(self, samples: int = 0) -> None:
        if samples < 0:
            raise ValueError(f"samples={samples!r} must be >= 0")
        self.samples = samples

    def add(self, n: int) -> None:
        """Count ``n`` more samples."""
        if n < 0:
            raise ValueError(f"n={n!r} must be >= 0")
        self.samples += n

    def state_dict(self) -> dict[str, Any]:
        """``{"samples": ...}``."""
        return {"samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.samples = state.get("samples", 0)


class _HasSamples(Protocol):
    samples: int


def sample_lambda_lr(
    optimizer: Optimizer,
    schedule: SampleSchedule | Callable[[float], float],
    counter: _HasSamples | Callable[[], float],
) -> LambdaLR:
    """A ``LambdaLR`` whose factor is ``schedule(samples)``, read from ``counter``.

    ``LambdaLR`` calls its lambda with its own step count; this one ignores it and reads the
    samples from ``counter`` (an object with ``.samples``, e.g. :class:`SampleCounter` or the
    adabatch callback, or a zero-argument callable). Step the scheduler as usual (every
    optimizer step); advance the counter *before* it steps -- in Lightning the step-interval
    scheduler runs before ``on_train_batch_end``, so count samples in
    ``on_before_optimizer_step`` or a step post-hook, or the schedule lags one step.
    `AdaptiveBatchSize` counts them there, so with ``counter=<the callback>`` the LR of each
    step is ``schedule(samples trained before it)`` exactly, whatever the batch does (run
    under Lightning by ``test_the_callback_as_counter_has_no_lag`` in
    ``tests/control/test_schedules.py``)::

        class Model(LightningModule):
            def configure_optimizers(self):
                opt = torch.optim.SGD(self.parameters(), lr=0.1)
                sched = sample_lambda_lr(opt, SampleSchedule("warmup_cosine",
                                         warmup_samples=10_000, total_samples=1_000_000),
                                         counter=self.adabatch)  # the callback instance
                return {"optimizer": opt,
                        "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    The lambda is a plain function, so the scheduler's ``state_dict`` does not try to save the
    counter; checkpoint the counter itself (the callback's ``samples`` is in its state).

    Raises:
        ValueError: when ``counter`` has no ``samples`` and is not callable.

    Example::

        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> counter = SampleCounter()
        >>> sched = sample_lambda_lr(opt, SampleSchedule("warmup_linear", warmup_samples=100,
        ...                                              total_samples=1100), counter)
        >>> for batch in (50, 50, 500):
        ...     opt.step(); counter.add(batch); sched.step()
        ...     print(opt.param_groups[0]["lr"])
        0.5
        1.0
        0.5
    """
    if hasattr(counter, "samples"):
        def get_samples() -> float:
            return counter.samples  # type: ignore[union-attr]
    elif callable(counter):
        get_samples = counter  # type: ignore[assignment]
    else:
        raise ValueError(
            f"counter={counter!r} must have a .samples attribute or be a callable"
        )
    fn = schedule.factor if isinstance(schedule, SampleSchedule) else schedule

    def lr_lambda(_step: int) -> float:
        return fn(get_samples())

    return LambdaLR(optimizer, lr_lambda)
