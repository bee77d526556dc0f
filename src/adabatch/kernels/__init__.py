"""The single dispatch point for the per-example norm ops.

Callers (the ``noise/per_example/`` rules, the benchmarks) use these functions, never a backend
module directly (``benchmarks/kernels.py`` excepted: it times and tunes the kernels themselves).
Each function asks ``_backend`` which implementation serves its tensors and calls it; the names
and signatures are those of :mod:`adabatch.kernels.reference`.

Backends:

* ``"torch"``: the exact maths in :mod:`adabatch.kernels.reference` (any device and dtype).
* ``"triton"``: the fused kernels (``linear_norms``, ``ghost_norms``, ``norm_affine_norms``):
  float32/float16/bfloat16 tensors on a CUDA device, or on the CPU through Triton's
  interpreter when ``TRITON_INTERPRET=1`` (slow; for tests). Results are float32, like the
  reference's for those dtypes. ``embedding_sq_norms`` has no Triton kernel and always runs
  the torch implementation. The reference's ``max_chunk_elems`` bounds the torch path's
  temporaries; the kernels hold no per-example temporaries and ignore it.

``ADABATCH_KERNELS`` (read at every call) selects: ``auto`` (default; Triton where it can run,
torch elsewhere, e.g. for float64), ``torch``, or ``triton`` (raises ``RuntimeError`` saying
why when the kernels cannot run on the given tensors, never falls back).

``TRITON_INTERPRET`` is read by ``@triton.jit`` when a function is decorated, i.e. when
triton and the kernel modules are first imported, so it must be set before anything imports
triton (``lightning`` and ``torch._dynamo`` do); it is also read at each call here, to decide
whether CPU tensors may use the kernels.

Under ``torch.compile`` (or on fake/traced tensors) the calls go through the custom ops of
:mod:`adabatch.kernels.ops` (``torch.ops.adabatch.*``), which have fake implementations, so
tracing never reaches a Triton launcher.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType

import torch
from torch import Tensor

from adabatch.kernels import ops, reference

__all__ = [
    "bias_sq_norms",
    "embedding_sq_norms",
    "linear_sq_norms",
    "linear_weight_grad_and_sq_norms",
    "norm_affine_sq_norms",
]

_MODES = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRUE = ("1", "true", "on", "yes")  # what triton itself accepts for TRITON_INTERPRET


def _mode() -> str:
    mode = os.environ.get("ADABATCH_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(
            f"ADABATCH_KERNELS={os.environ['ADABATCH_KERNELS']!r} must be one of {_MODES}"
        )
    return mode


@functools.cache
def _import_triton() -> tuple[ModuleType | None, str]:
    try:
        import triton
    except Exception as err:  # ImportError, or a broken install raising anything else
        return None, f"triton cannot be imported ({type(err).__name__}: {err})"
    return triton, ""


def _triton_interpreted(triton: ModuleType) -> bool:
    """Whether triton was imported with TRITON_INTERPRET=1 (its own jit helpers tell)."""
    return not isinstance(triton.language.cdiv, triton.runtime.JITFunction)


def _triton_problem(tensors: tuple[Tensor, ...]) -> str | None:
    """Why the Triton kernels cannot serve ``tensors``, or None when they can."""
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        return f"the tensors are on different devices ({sorted(devices)})"
    device = devices.pop()
    interpret = os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE
    if device == "cpu" and not interpret:
        return (
            "the tensors are on the CPU and TRITON_INTERPRET is not 1 (the kernels compile for "
            "CUDA; the interpreter runs them on CPU tensors)"
        )
    if device not in ("cpu", "cuda"):
        return f"the Triton kernels run on CUDA tensors, got device type {device!r}"
    for t in tensors:
        if t.dtype not in _TRITON_DTYPES:
            return f"the Triton kernels support float32/float16/bfloat16, got {t.dtype}"
    triton, why = _import_triton()
    if triton is None:
        return f"{why}; install it with `pip install adabatch[kernels]`"
    if device == "cpu" and not _triton_interpreted(triton):
        return (
            "TRITON_INTERPRET=1 was set after triton had been imported (by lightning or "
            "torch._dynamo, say), so the kernels are compiled for CUDA; set it before the "
            "first import of triton"
        )
    return None


def _backend(*tensors: Tensor) -> str:
    """Name of the backend that serves ops on ``tensors``: ``"torch"`` or ``"triton"``."""
    mode = _mode()
    if mode == "torch":
        return "torch"
    problem = _triton_problem(tensors)
    if problem is None:
        return "triton"
    if mode == "triton":
        raise RuntimeError(f"ADABATCH_KERNELS=triton, but {problem}")
    return "torch"


def _kernel(name: str) -> ModuleType:
    """Import kernel module ``name`` decorated in the mode triton itself was imported in."""
    module = sys.modules.get(f"{__name__}.{name}")
    if module is not None:
        return module
    triton, _ = _import_triton()
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if _triton_interpreted(triton) else "0"
    try:
        return importlib.import_module(f"{__name__}.{name}")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _traced(t: Tensor) -> bool:
    """True under torch.compile or on fake/functional tensors: use the custom ops there."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _unknown(backend: str) -> ValueError:
    return ValueError(f"unknown kernel backend {backend!r}")


def linear_sq_norms(x: Tensor, g: Tensor, method: str = "auto", **kwargs) -> Tensor:
    """See :func:`adabatch.kernels.reference.linear_sq_norms`."""
    if _traced(x):  # the reference is traceable; the custom op hides the Triton launcher
        if kwargs:
            return reference.linear_sq_norms(x, g, method, **kwargs)
        return ops.linear_sq_norms(x, g, method)
    backend = _backend(x, g)
    if backend == "torch":
        return reference.linear_sq_norms(x, g, method, **kwargs)
    if backend == "triton":
        if method not in reference._METHODS:
            raise ValueError(f"method={method!r} must be one of {reference._METHODS}")
        reference._check_pair(x, g)
        if method == "auto":
            method = reference.choose_method(x.shape[1], x.shape[2], g.shape[2])
        if method == "ghost" or x.shape[1] == 1:
            return _kernel("ghost_norms").ghost_sq_norms(x, g)
        return _kernel("linear_norms").linear_weight_grad_and_sq_norms(x, g, write_dw=False)[1]
    raise _unknown(backend)


def linear_weight_grad_and_sq_norms(x: Tensor, g: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    """See :func:`adabatch.kernels.reference.linear_weight_grad_and_sq_norms`."""
    if _traced(x):
        if kwargs:
            return reference.linear_weight_grad_and_sq_norms(x, g, **kwargs)
        return ops.linear_weight_grad_and_sq_norms(x, g)
    backend = _backend(x, g)
    if backend == "torch":
        return reference.linear_weight_grad_and_sq_norms(x, g, **kwargs)
    if backend == "triton":
        reference._check_pair(x, g)
        return _kernel("linear_norms").linear_weight_grad_and_sq_norms(x, g)
    raise _unknown(backend)


def bias_sq_norms(g: Tensor) -> Tensor:
    """See :func:`adabatch.kernels.reference.bias_sq_norms`."""
    if _traced(g):
        return ops.bias_sq_norms(g)
    backend = _backend(g)
    if backend == "torch":
        return reference.bias_sq_norms(g)
    if backend == "triton":
        reference._check_float("g", g, 3)
        return _kernel("norm_affine_norms").norm_affine_sq_norms(None, g)[1]
    raise _unknown(backend)


def norm_affine_sq_norms(xhat: Tensor, g: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    """See :func:`adabatch.kernels.reference.norm_affine_sq_norms`."""
    if _traced(g):
        if kwargs:
            return reference.norm_affine_sq_norms(xhat, g, **kwargs)
        return ops.norm_affine_sq_norms(xhat, g)
    backend = _backend(xhat, g)
    if backend == "torch":
        return reference.norm_affine_sq_norms(xhat, g, **kwargs)
    if backend == "triton":
        reference._check_pair(xhat, g, "xhat", "g")
        return _kernel("norm_affine_norms").norm_affine_sq_norms(xhat, g)
    raise _unknown(backend)


def embedding_sq_norms(
    ids: Tensor, g: Tensor, padding_idx: int | None = None, **kwargs
) -> Tensor:
    """See :func:`adabatch.kernels.reference.embedding_sq_norms` (torch on every backend)."""
    if _traced(g):
        if kwargs:
            return reference.embedding_sq_norms(ids, g, padding_idx, **kwargs)
        return ops.embedding_sq_norms(ids, g, padding_idx)
    _mode()  # validate ADABATCH_KERNELS even though no Triton kernel exists for this op
    return reference.embedding_sq_norms(ids, g, padding_idx, **kwargs)
