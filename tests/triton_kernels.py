"""Import a Triton kernel module for the tests, or skip them with the reason.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. ``@triton.jit`` reads
TRITON_INTERPRET when a function is decorated, so triton must first be imported with it set:
tests/conftest.py does that at session start (pytest imports lightning, hence triton, early).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def kernel_module(name: str) -> ModuleType:
    """``adabatch.kernels.<name>``, skipping the calling test module when it cannot run."""
    pytest.importorskip("triton", reason="triton is not installed")
    from adabatch.kernels._launch import is_interpreted

    module = importlib.import_module(f"adabatch.kernels.{name}")
    kernel = getattr(module, f"_{name}_kernel")
    if not CUDA and not is_interpreted(kernel):
        pytest.skip(
            "no GPU, and triton was imported without TRITON_INTERPRET=1: run "
            "`TRITON_INTERPRET=1 python -m pytest tests/kernels`",
            allow_module_level=True,
        )
    return module
