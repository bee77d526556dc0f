"""``torch.ops.adabatch.*``: the per-example norm ops as opaque custom ops for ``torch.compile``.

A Triton launcher reads data pointers and picks block sizes in Python, which tracing with fake
tensors cannot run; the kernels also have no autograd formula (the norms are statistics of
gradients, not part of the graph). Wrapped as custom ops with fake (meta) implementations,
the calls trace as single graph nodes and run the normal dispatch (``adabatch.kernels``) at
execution time. ``adabatch.kernels`` routes here by itself when it is traced, so callers never
import this module.

Inputs are detached: calling an op on tensors that require grad does not record anything.

Example::

    >>> import torch
    >>> from adabatch.kernels import ops
    >>> x, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    >>> f = torch.compile(ops.linear_sq_norms, backend="eager", fullgraph=True)
    >>> torch.allclose(f(x, g, "ghost"), ops.linear_sq_norms(x, g, "materialize"))
    True
"""

# No `from __future__ import annotations`: torch.library infers each op's schema from the
# annotations, which must be real types.
import torch
from torch import Tensor

__all__ = [
    "bias_sq_norms",
    "embedding_sq_norms",
    "linear_sq_norms",
    "linear_weight_grad_and_sq_norms",
    "norm_affine_sq_norms",
]


def _out_dtype(*tensors: Tensor) -> torch.dtype:
    """The reference's rule: float64 in, float64 out; float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _kernels():
    import adabatch.kernels  # late: adabatch.kernels imports this module

    return adabatch.kernels


@torch.library.custom_op("adabatch::linear_sq_norms", mutates_args=())
def _linear_sq_norms(x: Tensor, g: Tensor, method: str) -> Tensor:
    return _kernels().linear_sq_norms(x, g, method)


@_linear_sq_norms.register_fake
def _(x, g, method):
    return x.new_empty((x.shape[0],), dtype=_out_dtype(x, g))


@torch.library.custom_op("adabatch::linear_weight_grad_and_sq_norms", mutates_args=())
def _linear_weight_grad_and_sq_norms(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    dw, sq = _kernels().linear_weight_grad_and_sq_norms(x, g)
    return dw, sq


@_linear_weight_grad_and_sq_norms.register_fake
def _(x, g):
    dt = _out_dtype(x, g)
    return x.new_empty((g.shape[-1], x.shape[-1]), dtype=dt), x.new_empty((x.shape[0],), dtype=dt)


@torch.library.custom_op("adabatch::bias_sq_norms", mutates_args=())
def _bias_sq_norms(g: Tensor) -> Tensor:
    return _kernels().bias_sq_norms(g)


@_bias_sq_norms.register_fake
def _(g):
    return g.new_empty((g.shape[0],), dtype=_out_dtype(g))


@torch.library.custom_op("adabatch::norm_affine_sq_norms", mutates_args=())
def _norm_affine_sq_norms(xhat: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    w_sq, b_sq = _kernels().norm_affine_sq_norms(xhat, g)
    if w_sq.untyped_storage().data_ptr() == b_sq.untyped_storage().data_ptr():
        # the Triton path returns two rows of one buffer; op outputs may not alias
        w_sq, b_sq = w_sq.clone(), b_sq.clone()
    return w_sq, b_sq


@_norm_affine_sq_norms.register_fake
def _(xhat, g):
    dt = _out_dtype(xhat, g)
    return g.new_empty((g.shape[0],), dtype=dt), g.new_empty((g.shape[0],), dtype=dt)


@torch.library.custom_op("adabatch::embedding_sq_norms", mutates_args=())
def _embedding_sq_norms(ids: Tensor, g: Tensor, padding_idx: int | None) -> Tensor:
    return _kernels().embedding_sq_norms(ids, g, padding_idx)


@_embedding_sq_norms.register_fake
def _(ids, g, padding_idx):
    return g.new_empty((g.shape[0],), dtype=_out_dtype(g))


def linear_sq_norms(x: Tensor, g: Tensor, method: str = "auto") -> Tensor:
    """``torch.ops.adabatch.linear_sq_norms`` on detached inputs."""
    return _linear_sq_norms(x.detach(), g.detach(), method)


def linear_weight_grad_and_sq_norms(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.ops.adabatch.linear_weight_grad_and_sq_norms`` on detached inputs."""
    return _linear_weight_grad_and_sq_norms(x.detach(), g.detach())


def bias_sq_norms(g: Tensor) -> Tensor:
    """``torch.ops.adabatch.bias_sq_norms`` on a detached input."""
    return _bias_sq_norms(g.detach())


def norm_affine_sq_norms(xhat: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.ops.adabatch.norm_affine_sq_norms`` on detached inputs."""
    return _norm_affine_sq_norms(xhat.detach(), g.detach())


def embedding_sq_norms(ids: Tensor, g: Tensor, padding_idx: int | None = None) -> Tensor:
    """``torch.ops.adabatch.embedding_sq_norms`` on detached inputs."""
    return _embedding_sq_norms(ids.detach(), g.detach(), padding_idx)
