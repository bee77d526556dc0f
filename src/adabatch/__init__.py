"""adabatch: adaptive batch size for PyTorch Lightning, driven by the gradient noise scale.

Public names are imported lazily so that ``import adabatch`` stays cheap and optional
dependencies (Triton, Optuna, matplotlib) are only needed by the parts that use them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdaptiveBatchSize": "adabatch.callback",
    "Policy": "adabatch.control.policy",
    "CriticalBatchPolicy": "adabatch.control.policy",
    "NoisePolicy": "adabatch.control.policy",
    "GoodputPolicy": "adabatch.control.policy",
    "RampPolicy": "adabatch.control.policy",
    "SeesawPolicy": "adabatch.control.policy",
    "FixedPolicy": "adabatch.control.policy",
    "CriticalBatchProbe": "adabatch.control.critical",
    "ScalingRules": "adabatch.control.rules",
    "GradientNoiseScale": "adabatch.noise.estimator",
    "GNSEstimator": "adabatch.noise.estimator",
    "PerExampleGradNorms": "adabatch.noise.per_example",
    "MicroBatchGradNorms": "adabatch.noise.microbatch",
    "ResizableBatchSampler": "adabatch.data",
    "ResizableDataLoader": "adabatch.data",
    "EMA": "adabatch.ema",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adabatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
