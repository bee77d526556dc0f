"""The schema of `AdaptiveBatchSize`'s checkpoint state, checked in one place.

`validate_state` is called by ``AdaptiveBatchSize.load_state_dict``, before anything is
applied: a state it cannot use is refused with a ValueError naming the field and its value,
never half-applied. Later versions add keys read with defaults; a version newer than this
code's is refused (its meaning is unknown here).
"""

from __future__ import annotations

import math
from typing import Any

from adabatch.noise.estimator import GNSEstimator

__all__ = ["STATE_VERSION", "validate_state"]

#: Version written by ``AdaptiveBatchSize.state_dict``. 2: the decider lives in the policy's
#: state (``policy.decider``) and the critical-batch probe's state is under ``branch``.
STATE_VERSION = 2

_HISTORY_KEYS = ("step", "samples", "batch_size", "from")
# Estimator fields: (name, minimum or None, NaN allowed). ``last_*`` are NaN before any update.
_ESTIMATOR_FLOATS = (
    ("weight", 0.0, False),
    ("weight_sq", 0.0, False),
    ("mean_grad_sq", None, False),
    ("mean_trace_sigma", None, False),
    ("m2_grad_sq", 0.0, False),
    ("m2_trace_sigma", 0.0, False),
    ("c2_grad_sq_trace_sigma", None, False),
    ("last_grad_sq", None, True),
    ("last_trace_sigma", None, True),
    ("samples", 0.0, False),
    ("half_life_samples", None, True),
)
_ESTIMATOR_COUNTS = ("num_updates", "num_skipped")


def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"adabatch checkpoint state: {field}={value!r} {why}")


def _int(field: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(field, value, f"must be an int >= {minimum}" + (" or None" if optional else ""))
    return value


def _float(field: str, value: Any, minimum: float | None, nan_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(field, value, "must be a number")
    value = float(value)
    if math.isnan(value):
        if nan_ok:
            return value
        raise _bad(field, value, "must not be NaN")
    if math.isinf(value):
        raise _bad(field, value, "must be finite")
    if minimum is not None and value < minimum:
        raise _bad(field, value, f"must be >= {minimum}")
    return value


def _split(field: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _bad(field, value, "must be [micro_batch, accumulation] or None")
    return [_int(f"{field}[0] (micro-batch)", value[0], 1),
            _int(f"{field}[1] (accumulation)", value[1], 1)]


def _dict(field: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _bad(field, value, "must be a dict")
    return value


def _estimator(state: dict) -> dict:
    out = dict(state)
    version = _int("estimator.version", state.get("version", 1), 1)
    if version > GNSEstimator._STATE_VERSION:
        raise _bad("estimator.version", version,
                   f"is newer than this adabatch reads ({GNSEstimator._STATE_VERSION})")
    for name, minimum, nan_ok in _ESTIMATOR_FLOATS:
        if name in state:
            out[name] = _float(f"estimator.{name}", state[name], minimum, nan_ok)
    for name in _ESTIMATOR_COUNTS:
        if name in state:
            out[name] = _int(f"estimator.{name}", state[name], 0)
    if out.get("weight_sq", 0.0) > out.get("weight", 0.0) ** 2 * (1 + 1e-9) + 1e-300:
        raise _bad("estimator.weight_sq", out["weight_sq"],
                   f"must be <= weight**2 = {out.get('weight', 0.0) ** 2} (a sum of squared "
                   "weights below 1 each)")
    return out


def validate_state(state: Any) -> dict[str, Any]:
    """Check an `AdaptiveBatchSize` state dict field by field; return a checked copy.

    Raises:
        ValueError: naming the first field whose type, range or version is unusable.

    Example::

        >>> validate_state({"version": 1, "samples": 64, "split": [4, 2]})["split"]
        [4, 2]
        >>> validate_state({"split": [0, 2]})
        Traceback (most recent call last):
        ...
        ValueError: adabatch checkpoint state: split[0] (micro-batch)=0 must be an int >= 1
    """
    state = dict(_dict("state", state))
    version = _int("version", state.get("version", STATE_VERSION), 1)
    if version > STATE_VERSION:
        raise _bad("version", version, f"is newer than this adabatch reads ({STATE_VERSION})")
    for name in ("samples", "steps"):
        state[name] = _int(name, state.get(name, 0), 0)
    for name in ("micro0", "start", "ref_batch_size", "target"):
        state[name] = _int(name, state.get(name), 1, optional=True)
    micro0, start = state["micro0"], state["start"]
    if micro0 is not None and start is not None and start % micro0:
        raise _bad("start", start, f"must be a multiple of micro0={micro0}")
    for name in ("split", "pending"):
        state[name] = _split(name, state.get(name))
    if state["split"] is None and state["pending"] is not None:
        raise _bad("pending", state["pending"], "needs a split in force (split is None)")
    history = state.get("history", [])
    if not isinstance(history, list):
        raise _bad("history", history, "must be a list")
    for i, change in enumerate(history):
        _dict(f"history[{i}]", change)
        for key in _HISTORY_KEYS:
            _int(f"history[{i}].{key}", change.get(key), 0 if key in ("step", "samples") else 1)
    state["history"] = [dict(change) for change in history]
    if "estimator" in state:
        state["estimator"] = _estimator(_dict("estimator", state["estimator"]))
    if "decider" in state:
        decider = dict(_dict("decider", state["decider"]))
        for key in ("last_change_samples", "num_changes"):
            if key in decider:
                decider[key] = _int(f"decider.{key}", decider[key], 0)
        state["decider"] = decider
    if "branch" in state:
        state["branch"] = dict(_dict("branch", state["branch"]))  # BranchRunner checks it
    if "policy" in state:
        state["policy"] = dict(_dict("policy", state["policy"]))
        if state["policy"].get("decider") is not None:
            decider = dict(_dict("policy.decider", state["policy"]["decider"]))
            for key in ("last_change_samples", "num_changes"):
                if key in decider:
                    decider[key] = _int(f"policy.decider.{key}", decider[key], 0)
            state["policy"]["decider"] = decider
        for i, row in enumerate(state["policy"].get("step_time", [])):  # the goodput policy's
            if not isinstance(row, (list, tuple)) or len(row) != 2:
                raise _bad(f"policy.step_time[{i}]", row, "must be [batch_size, seconds]")
            _int(f"policy.step_time[{i}][0]", row[0], 1)
            _float(f"policy.step_time[{i}][1]", row[1], 0.0, False)
    return state
