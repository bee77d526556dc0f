"""Gradient noise scale estimators: pure maths, an EMA shell and a torchmetrics Metric.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", App. A.1): with a
small batch of size ``b`` and a big batch of size ``B > b``, ``S`` the mean over the small
batches of ``|g_b|^2`` and ``Gb = |g_B|^2`` (all in per-example loss units),

    E[|g_b|^2] = |G|^2 + tr(Sigma) / b,

so solving the two equations for the two unknowns gives unbiased per-step estimates

    |G|^2     ~ (B * Gb - b * S) / (B - b)
    tr(Sigma) ~ (S - Gb) / (1/b - 1/B)

and the simple noise scale ``B_simple = tr(Sigma) / |G|^2`` is the ratio of their averages.
Per-step estimates are noisy and can be negative; they are averaged raw (clipping a single
step biases the average) and only the final ratio guards a non-positive denominator.

Layout (functional core, thin stateful shell):

- :func:`grad_sq_estimate`, :func:`trace_sigma_estimate`, :func:`gns_estimates`: pure functions
  on floats or tensors.
- :func:`small_batch_payload`, :func:`reduce_small_batch_stats`, :func:`torch_distributed_sum`:
  the one small cross-rank reduction (no Lightning, ``torch.distributed`` optional).
- :class:`GNSEstimator`: EMAs in samples (half-life ``H``), debiased, with an uncertainty.
- :class:`GradientNoiseScale`: a ``torchmetrics.Metric`` holding sum-reduced states.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

Number = float | int
Value = float | int | Tensor

__all__ = [
    "GNSEstimator",
    "GradientNoiseScale",
    "gns_estimates",
    "grad_sq_estimate",
    "reduce_small_batch_stats",
    "small_batch_payload",
    "torch_distributed_sum",
    "trace_sigma_estimate",
]


# --------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------


def _as_number(name: str, value: Any) -> float:
    """A batch size as a python float (0-d tensors accepted); ValueError if not finite."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}={value!r} must be finite")
    return out


def _check_sizes(b: Any, B: Any) -> tuple[float, float]:
    b_f = _as_number("b", b)
    B_f = _as_number("B", B)
    if b_f < 1:
        raise ValueError(f"b={b!r} must be >= 1")
    if B_f <= b_f:
        raise ValueError(f"B={B!r} must be > b={b!r}")
    return b_f, B_f


def grad_sq_estimate(small_sq: Value, b: Number, big_sq: Value, B: Number) -> Value:
    """Unbiased estimate of ``|G|^2`` from one (small, big) batch pair.

    ``(B * big_sq - b * small_sq) / (B - b)``.

    Args:
        small_sq: mean over the small batches of their squared gradient norm ``|g_b|^2``
            (per-example loss units). Float or tensor (computed elementwise).
        b: small-batch size, ``>= 1``.
        big_sq: squared norm of the big-batch gradient ``|g_B|^2``.
        B: big-batch size, ``> b``.

    Raises:
        ValueError: if ``b < 1`` or ``B <= b`` (or either is not a finite number).

    Example::

        >>> grad_sq_estimate(small_sq=3.0, b=1, big_sq=1.5, B=4)
        1.0
    """
    b_f, B_f = _check_sizes(b, B)
    return (B_f * big_sq - b_f * small_sq) / (B_f - b_f)


def trace_sigma_estimate(small_sq: Value, b: Number, big_sq: Value, B: Number) -> Value:
    """Unbiased estimate of ``tr(Sigma)`` (per-example covariance) from one batch pair.

    ``(small_sq - big_sq) / (1/b - 1/B)``; arguments as in :func:`grad_sq_estimate`.

    Raises:
        ValueError: if ``b < 1`` or ``B <= b`` (or either is not a finite number).

    Example::

        >>> trace_sigma_estimate(small_sq=3.0, b=1, big_sq=1.5, B=4)
        2.0
    """
    b_f, B_f = _check_sizes(b, B)
    # (1/b - 1/B) = (B - b) / (b B): written this way it is exact for integer sizes.
    return (small_sq - big_sq) * (b_f * B_f) / (B_f - b_f)


def gns_estimates(small_sq: Value, b: Number, big_sq: Value, B: Number) -> tuple[Value, Value]:
    """Both per-step estimates ``(|G|^2, tr(Sigma))``; see :func:`grad_sq_estimate`."""
    return grad_sq_estimate(small_sq, b, big_sq, B), trace_sigma_estimate(small_sq, b, big_sq, B)


# --------------------------------------------------------------------------------------
# Cross-rank reduction of the small-batch statistics
# --------------------------------------------------------------------------------------


def small_batch_payload(sum_sq: Value, count: Value) -> Tensor:
    """The tensor to all-reduce (sum) across ranks: ``[sum of |g_b|^2, number of small batches]``.

    float64, on ``sum_sq``'s device when it is a tensor (NCCL needs a CUDA tensor, gloo a CPU
    one: pass ``sum_sq`` on the device your backend uses).

    Example::

        >>> small_batch_payload(torch.tensor([1.0, 3.0]).sum(), 2)
        tensor([4., 2.], dtype=torch.float64)
    """
    device = sum_sq.device if isinstance(sum_sq, Tensor) else None
    parts = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
             for v in (sum_sq, count)]
    return torch.stack(parts)


def torch_distributed_sum(payload: Tensor) -> Tensor:
    """Sum ``payload`` over all ranks with ``torch.distributed`` when a group is initialised.

    Identity in a single process (or when ``torch.distributed`` is unavailable). Every rank
    must call it (it is a collective).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(payload, op=dist.ReduceOp.SUM)
    return payload


def reduce_small_batch_stats(
    sum_sq: Value,
    count: Value,
    all_reduce_fn: Callable[[Tensor], Tensor | None] | None = None,
    *,
    extra: Tensor | None = None,
) -> Any:
    """Global mean small-batch squared norm ``S`` and global small-batch count.

    Each rank holds its own small batches (its micro-batches or examples), while the big-batch
    gradient is identical on every rank after DDP's all-reduce. Summing ``(sum_sq, count)``
    over ranks therefore gives every rank the same ``S``, so every rank calls
    :meth:`GNSEstimator.update` with identical numbers and holds identical state. This is the
    one cross-rank reduction of the library: the callback's step statistics
    (:func:`adabatch.noise.step_stats.reduce_step_stats`) ride on it through ``extra``.

    Args:
        sum_sq: this rank's sum of small-batch squared norms (per-example units).
        count: this rank's number of small batches.
        all_reduce_fn: sums a tensor over ranks, in place (returning ``None``, like
            ``torch.distributed.all_reduce``) or returning the result (like Lightning's
            ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``).
            ``None``: no reduction (single process); :func:`torch_distributed_sum` uses
            ``torch.distributed`` when it is initialised.
        extra: further values (1-D) to sum over ranks in the same all-reduce.

    Returns:
        ``(mean_sq, count)`` as 0-d float64 tensors (``mean_sq`` is NaN when the global count
        is 0, which :meth:`GNSEstimator.update` skips); with ``extra``, ``(mean_sq, count,
        extra_sums)``. No host sync happens here.

    Example::

        >>> norms = torch.tensor([1.0, 2.0, 6.0])
        >>> mean_sq, n = reduce_small_batch_stats(norms.sum(), norms.numel())
        >>> float(mean_sq), int(n)
        (3.0, 3)
        >>> _, _, sums = reduce_small_batch_stats(norms.sum(), 3, extra=torch.tensor([8.0]))
        >>> sums.tolist()
        [8.0]
    """
    payload = small_batch_payload(sum_sq, count)
    if extra is not None:
        payload = torch.cat([payload, extra.to(payload.device, torch.float64).reshape(-1)])
    if all_reduce_fn is not None:
        out = all_reduce_fn(payload)
        if isinstance(out, Tensor):
            payload = out
    total, n = payload[0], payload[1]
    if extra is None:
        return total / n, n
    return total / n, n, payload[2:]


# --------------------------------------------------------------------------------------
# EMA shell
# --------------------------------------------------------------------------------------


class GNSEstimator:
    """Online gradient noise scale: debiased EMAs in samples of the per-step estimates.

    Each accepted :meth:`update` turns ``(S, b, |g_B|^2, B)`` into per-step estimates
    ``g_t ~ |G|^2`` and ``s_t ~ tr(Sigma)`` and folds them into exponential moving averages
    whose per-step decay is ``beta_t = 2 ** (-B_t / half_life_samples)``: the weight of old
    data halves every ``half_life_samples`` examples, whatever the batch sizes were. The EMA
    is debiased like Adam, by dividing by the accumulated weight ``W_t = 1 - prod(beta)``
    (tracked directly, so a batch-size change mid-run is handled exactly); the first update
    therefore returns the raw per-step values. Internally the EMA is kept as an exponentially
    weighted mean with a West/Welford update, which equals ``EMA_t / W_t`` and also gives the
    weighted (co)variances without cancellation.

    Properties (``None`` before the first accepted update):

    - ``grad_sq``, ``trace_sigma``: debiased EMAs of the per-step estimates.
    - ``gns``: ``B_simple = EMA[tr(Sigma)] / EMA[|G|^2]`` (ratio of EMAs, never the EMA of a
      ratio); ``None`` while the ``|G|^2`` EMA is ``<= 0``.
    - ``gns_rel_std``: estimated relative standard error of ``gns`` due to the sampling noise
      of the per-step estimates: the delta method applied to the ratio of the two weighted
      means, with their (co)variances estimated from the weighted spread of the per-step
      values divided by ``effective_sample_size - 1`` (``ESS = W^2 / sum w^2``). It assumes
      steps are independent draws around a stationary value, so it does not include the lag
      of the EMA behind a drifting truth. ``None`` until ``ESS > 1`` and ``gns`` is defined.
    - ``effective_sample_size``: ``ESS`` in steps.
    - ``num_updates``, ``num_skipped``, ``samples`` (sum of ``B`` over accepted updates).

    Args:
        half_life_samples: half-life of the EMAs in examples (``> 0``). A longer half-life
            averages more steps (lower variance) but lags a changing noise scale more.

    Raises:
        ValueError: if ``half_life_samples`` is not a finite number ``> 0``.

    Example::

        >>> est = GNSEstimator(half_life_samples=1000)
        >>> est.gns is None
        True
        >>> est.update(small_sq=3.0, b=1, big_sq=1.5, B=4)
        True
        >>> est.grad_sq, est.trace_sigma, est.gns
        (1.0, 2.0, 2.0)
        >>> est.update(small_sq=float("nan"), b=1, big_sq=1.5, B=4), est.num_skipped
        (False, 1)
    """

    _STATE_VERSION = 1

    def __init__(self, half_life_samples: float) -> None:
        self.half_life_samples = half_life_samples
        self.reset()

    # -- configuration -----------------------------------------------------------------
    @property
    def half_life_samples(self) -> float:
        """EMA half-life in examples; may be changed between updates."""
        return self._half_life

    @half_life_samples.setter
    def half_life_samples(self, value: float) -> None:
        try:
            h = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"half_life_samples={value!r} must be a number > 0") from None
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"half_life_samples={value!r} must be > 0")
        self._half_life = h

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all data (the half-life is kept)."""
        self._weight = 0.0  # W = sum of EMA weights = 1 - prod(beta)
        self._weight_sq = 0.0  # sum of squared EMA weights (for the effective sample size)
        self._mean_g = 0.0  # weighted mean of per-step |G|^2 estimates (= debiased EMA)
        self._mean_s = 0.0  # weighted mean of per-step tr(Sigma) estimates
        self._m2_gg = 0.0  # weighted sums of centred squares / cross-products
        self._m2_ss = 0.0
        self._m2_gs = 0.0
        self._last_g = math.nan
        self._last_s = math.nan
        self._num_updates = 0
        self._num_skipped = 0
        self._samples = 0.0

    def update(self, small_sq: Value, b: Number, big_sq: Value, B: Number) -> bool:
        """Fold one optimizer step into the EMAs.

        Args:
            small_sq: mean over the small batches of ``|g_b|^2`` (per-example loss units);
                a float or a one-element tensor (read with one host sync).
            b: small-batch size (``>= 1``).
            big_sq: ``|g_B|^2`` of the big-batch gradient.
            B: big-batch size in examples (``> b``); also the step's length for the decay.

        Returns:
            ``True`` if the step was used; ``False`` if an input or estimate was not finite
            (the step is skipped, counted in ``num_skipped`` and leaves the state unchanged).

        Raises:
            ValueError: if ``b < 1`` or ``B <= b``, or a value is a multi-element tensor.
        """
        b_f, B_f = _check_sizes(b, B)
        s_sq = _as_float("small_sq", small_sq)
        g_sq = _as_float("big_sq", big_sq)
        g_t, s_t = gns_estimates(s_sq, b_f, g_sq, B_f)
        if not (math.isfinite(g_t) and math.isfinite(s_t)):
            self._num_skipped += 1
            return False

        beta = 2.0 ** (-B_f / self._half_life)
        a = 1.0 - beta  # weight of the new step, relative to the decayed old ones
        # Decay the old weights, then add the new point with weight a (West 1979).
        self._weight *= beta
        self._weight_sq *= beta * beta
        self._m2_gg *= beta
        self._m2_ss *= beta
        self._m2_gs *= beta
        self._weight += a
        self._weight_sq += a * a
        frac = a / self._weight
        dg = g_t - self._mean_g
        ds = s_t - self._mean_s
        self._mean_g += frac * dg
        self._mean_s += frac * ds
        self._m2_gg += a * dg * (g_t - self._mean_g)
        self._m2_ss += a * ds * (s_t - self._mean_s)
        self._m2_gs += a * dg * (s_t - self._mean_s)

        self._last_g, self._last_s = g_t, s_t
        self._num_updates += 1
        self._samples += B_f
        return True

    def record_skip(self) -> None:
        """Count a step that could not be measured (e.g. the probe recorded no norms).

        It leaves the estimate unchanged and is counted in ``num_skipped``, like a
        non-finite step.
        """
        self._num_skipped += 1

    # -- read-outs ---------------------------------------------------------------------
    @property
    def grad_sq(self) -> float | None:
        """Debiased EMA of the ``|G|^2`` estimates (``None`` before the first update)."""
        return self._mean_g if self._num_updates else None

    @property
    def trace_sigma(self) -> float | None:
        """Debiased EMA of the ``tr(Sigma)`` estimates (``None`` before the first update)."""
        return self._mean_s if self._num_updates else None

    @property
    def gns(self) -> float | None:
        """``B_simple`` = EMA[tr Sigma] / EMA[|G|^2]; ``None`` if no data or EMA[|G|^2] <= 0."""
        if not self._num_updates or self._mean_g <= 0:
            return None
        return self._mean_s / self._mean_g

    @property
    def effective_sample_size(self) -> float:
        """Effective number of steps in the EMA, ``W^2 / sum w^2`` (0 before any update)."""
        if self._weight_sq <= 0:
            return 0.0
        return self._weight * self._weight / self._weight_sq

    @property
    def gns_rel_std(self) -> float | None:
        """Relative standard error of :attr:`gns` from the step-to-step noise (delta method).

        ``None`` while ``gns`` is undefined or zero, or the effective sample size is ``<= 1``.
        """
        gns = self.gns
        ess = self.effective_sample_size
        if gns is None or gns == 0 or ess <= 1.0:
            return None
        # Weighted (biased) variances of the per-step values; their means' covariance matrix
        # is ~ var / (ESS - 1) (reliability-weights correction folded in).
        scale = 1.0 / (self._weight * (ess - 1.0))
        var_g = self._m2_gg * scale
        var_s = self._m2_ss * scale
        cov = self._m2_gs * scale
        mg, ms = self._mean_g, self._mean_s
        rel_var = var_s / (ms * ms) + var_g / (mg * mg) - 2.0 * cov / (ms * mg)
        return math.sqrt(max(rel_var, 0.0))

    @property
    def last_grad_sq(self) -> float | None:
        """The last accepted per-step ``|G|^2`` estimate (raw, for logging)."""
        return None if math.isnan(self._last_g) else self._last_g

    @property
    def last_trace_sigma(self) -> float | None:
        """The last accepted per-step ``tr(Sigma)`` estimate (raw, for logging)."""
        return None if math.isnan(self._last_s) else self._last_s

    @property
    def num_updates(self) -> int:
        """Number of accepted updates since construction or :meth:`reset`."""
        return self._num_updates

    @property
    def num_skipped(self) -> int:
        """Steps skipped: a non-finite input or estimate, or :meth:`record_skip`."""
        return self._num_skipped

    @property
    def samples(self) -> float:
        """Examples folded into the estimate: the sum of ``B`` over accepted updates."""
        return self._samples

    # -- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, float | int]:
        """Plain python floats/ints; the half-life is saved for reference only."""
        return {
            "version": self._STATE_VERSION,
            "half_life_samples": self._half_life,
            "weight": self._weight,
            "weight_sq": self._weight_sq,
            "mean_grad_sq": self._mean_g,
            "mean_trace_sigma": self._mean_s,
            "m2_grad_sq": self._m2_gg,
            "m2_trace_sigma": self._m2_ss,
            "c2_grad_sq_trace_sigma": self._m2_gs,
            "last_grad_sq": self._last_g,
            "last_trace_sigma": self._last_s,
            "num_updates": self._num_updates,
            "num_skipped": self._num_skipped,
            "samples": self._samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; missing (later) keys fall back to defaults.

        The half-life is not restored: the value given to the constructor (the current
        configuration) wins, so a resumed run may change it.
        """
        self.reset()
        self._weight = float(state.get("weight", 0.0))
        self._weight_sq = float(state.get("weight_sq", 0.0))
        self._mean_g = float(state.get("mean_grad_sq", 0.0))
        self._mean_s = float(state.get("mean_trace_sigma", 0.0))
        self._m2_gg = float(state.get("m2_grad_sq", 0.0))
        self._m2_ss = float(state.get("m2_trace_sigma", 0.0))
        self._m2_gs = float(state.get("c2_grad_sq_trace_sigma", 0.0))
        self._last_g = float(state.get("last_grad_sq", math.nan))
        self._last_s = float(state.get("last_trace_sigma", math.nan))
        self._num_updates = int(state.get("num_updates", 0))
        self._num_skipped = int(state.get("num_skipped", 0))
        self._samples = float(state.get("samples", 0.0))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(half_life_samples={self._half_life:g}, "
                f"num_updates={self._num_updates}, gns={self.gns})")


def _as_float(name: str, value: Value) -> float:
    """A statistic as a python float (NaN/inf allowed: the caller skips them)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number") from None


# --------------------------------------------------------------------------------------
# torchmetrics Metric
# --------------------------------------------------------------------------------------


class GradientNoiseScale(Metric):
    """``B_simple`` as a torchmetrics Metric: unweighted average over updates since reset.

    Each :meth:`update` computes the per-step estimates of ``|G|^2`` and ``tr(Sigma)`` (the
    same functions as :class:`GNSEstimator`) and adds them to sum-reduced states, so
    :meth:`compute` returns ``sum(tr Sigma estimates) / sum(|G|^2 estimates)``: the ratio of
    the *unweighted* averages over all updates since the last ``reset()`` (all ranks together
    after sync). For an average that forgets old steps use :class:`GNSEstimator` (the EMA).
    Non-finite steps are skipped on device (no host sync) and counted in ``num_skipped``.

    Under DDP each rank may update with its own small-batch norms and the (shared) big-batch
    norm: every per-rank estimate is unbiased, and summing them over ranks equals one update
    with all small batches pooled when ranks hold equally many small batches.

    ``compute()`` returns NaN before any finite update or while the summed ``|G|^2`` estimate
    is ``<= 0``. States are float64.

    Example::

        >>> metric = GradientNoiseScale()
        >>> metric.update(torch.tensor([2.0, 4.0]), b=1, big_sq=torch.tensor(1.5), B=4)
        >>> metric.compute()
        tensor(2., dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    grad_sq_sum: Tensor
    trace_sigma_sum: Tensor
    num_steps: Tensor
    num_skipped: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("grad_sq_sum", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("trace_sigma_sum", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("num_steps", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("num_skipped", default=zero.clone(), dist_reduce_fx="sum")

    def update(self, small_sq: Tensor, b: Number, big_sq: Value, B: Number) -> None:
        """Add one step.

        Args:
            small_sq: squared norms ``|g_b|^2`` of this step's small batches (any shape; their
                mean is used), per-example loss units.
            b: small-batch size (``>= 1``).
            big_sq: ``|g_B|^2`` of the big-batch gradient (float or one-element tensor).
            B: big-batch size (``> b``).

        Raises:
            ValueError: if ``b < 1``, ``B <= b`` or ``small_sq`` is empty.
        """
        b_f, B_f = _check_sizes(b, B)
        small = torch.as_tensor(small_sq, device=self.grad_sq_sum.device)
        if small.numel() == 0:
            raise ValueError("small_sq is empty: need at least one small-batch squared norm")
        small_mean = small.to(torch.float64).mean()
        big = torch.as_tensor(big_sq, dtype=torch.float64, device=small_mean.device).reshape(())
        g_t, s_t = gns_estimates(small_mean, b_f, big, B_f)
        ok = torch.isfinite(g_t) & torch.isfinite(s_t)
        zero = torch.zeros((), dtype=torch.float64, device=g_t.device)
        self.grad_sq_sum += torch.where(ok, g_t, zero)
        self.trace_sigma_sum += torch.where(ok, s_t, zero)
        self.num_steps += ok.to(torch.float64)
        self.num_skipped += (~ok).to(torch.float64)

    def compute(self) -> Tensor:
        """``sum(tr Sigma) / sum(|G|^2)`` over the updates since reset; NaN if undefined."""
        nan = torch.full_like(self.grad_sq_sum, math.nan)
        valid = (self.num_steps > 0) & (self.grad_sq_sum > 0)
        safe_den = torch.where(valid, self.grad_sq_sum, torch.ones_like(self.grad_sq_sum))
        return torch.where(valid, self.trace_sigma_sum / safe_den, nan)
