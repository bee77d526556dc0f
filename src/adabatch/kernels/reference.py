"""Exact per-example squared gradient norms in plain torch.

This file is three things at once: the CPU path, the oracle the Triton kernels are tested
against, and the baseline the benchmarks time. Every function takes tensors whose dim 0 is
the batch (B examples) and returns one value per example.

Shapes: ``x[B, T, i]`` a layer's inputs, ``g[B, T, o]`` the gradient of the loss with respect
to its outputs, T positions per example (tokens, output pixels; T = 1 for a 2-D input). The
per-example weight gradient of a linear map is ``sum_t g_t x_t^T = G^T X``, so

* T = 1: ``|G^T X|_F^2 = |x|^2 |g|^2`` (Goodfellow 2015, "Efficient Per-Example Gradient
  Computations");
* ghost norm: ``|G^T X|_F^2 = <X X^T, G G^T>``, two T x T Gram matrices, cost ~ 2T^2(i + o)
  per example (Li et al. 2022, "Large Language Models Can Be Strong Differentially Private
  Learners", ghost clipping);
* materialised: ``G^T X`` per example, cost ~ 2T i o, memory i*o per example, chunked;
* simultaneous: the materialised products also sum to the weight gradient dW, so norms and
  dW come out of one pass (Gray et al. 2024, "Normalization Layer Per-Example Gradients are
  Sufficient to Predict Gradient Noise Scale in Transformers").

Precision: float64 inputs are computed and returned in float64 (the test oracles); float16,
bfloat16 and float32 inputs are accumulated and returned in float32. Inputs are cast chunk by
chunk, so a low-precision input is never copied whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "bias_sq_norms",
    "choose_method",
    "embedding_sq_norms",
    "linear_sq_norms",
    "linear_weight_grad_and_sq_norms",
    "norm_affine_sq_norms",
]

#: Elements (not bytes) one chunk of temporaries may hold: 2**23 floats = 32 MiB in float32.
DEFAULT_CHUNK_ELEMS = 1 << 23

_METHODS = ("auto", "ghost", "materialize")


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float(name: str, t: Tensor, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype={t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape={tuple(t.shape)}")


def _check_pair(x: Tensor, g: Tensor, x_name: str = "x", g_name: str = "g") -> None:
    _check_float(x_name, x, 3)
    _check_float(g_name, g, 3)
    if x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"{x_name} and {g_name} must agree on [B, T], got {x_name}.shape={tuple(x.shape)} "
            f"and {g_name}.shape={tuple(g.shape)}"
        )


def _check_budget(max_chunk_elems: int) -> None:
    if not isinstance(max_chunk_elems, int) or max_chunk_elems < 1:
        raise ValueError(f"max_chunk_elems={max_chunk_elems!r} must be an int >= 1")


def _step(per_example: int, max_chunk_elems: int) -> int:
    """Examples per chunk so that a chunk's temporaries hold <= max_chunk_elems elements."""
    return max(1, max_chunk_elems // max(1, per_example))


def _sq(t: Tensor) -> Tensor:
    """Row-wise squared norm of a [c, ...] tensor without a squared temporary."""
    flat = t.reshape(t.shape[0], -1)
    return torch.linalg.vecdot(flat, flat)


def choose_method(T: int, i: int, o: int) -> str:
    """The cheaper exact method for a [T, i] -> [T, o] layer: ghost if T(i + o) <= i*o.

    That is the comparison of the two costs per example, ghost ~2T^2(i + o) against
    materialise ~2T*i*o (docs/DESIGN.md; its first draft's "2T^2 <= i*o" was looser); the
    CPU timings in benchmarks/norm_overhead.py follow this flop count.
    """
    return "ghost" if T * (i + o) <= i * o else "materialize"


def linear_sq_norms(
    x: Tensor,
    g: Tensor,
    method: str = "auto",
    *,
    max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Tensor:
    """Per-example ``|sum_t g_t x_t^T|_F^2`` for a linear map without bias.

    Args:
        x: inputs ``[B, T, i]``.
        g: output-gradients ``[B, T, o]``.
        method: ``"ghost"`` (``<X X^T, G G^T>``, cost ~2T^2(i+o) per example),
            ``"materialize"`` (``G^T X`` per example, cost ~2T*i*o) or ``"auto"`` (the
            cheaper of the two: ghost when T(i + o) <= i*o). T = 1 always uses ``|x|^2 |g|^2``.
        max_chunk_elems: bound on the elements of the per-chunk temporaries (T x T Gram
            matrices or o x i products); examples are processed in chunks that fit.

    Returns:
        ``[B]`` squared norms, float64 for float64 inputs, else float32.

    Example::

        >>> x, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
        >>> ghost = linear_sq_norms(x, g, "ghost")
        >>> torch.allclose(ghost, linear_sq_norms(x, g, "materialize"))
        True
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r} must be one of {_METHODS}")
    _check_pair(x, g)
    _check_budget(max_chunk_elems)
    dt = _acc_dtype(x, g)
    B, T, i = x.shape
    o = g.shape[2]
    if T == 1:
        return _sq(x.to(dt)) * _sq(g.to(dt))
    if method == "auto":
        method = choose_method(T, i, o)
    out = torch.empty(B, dtype=dt, device=x.device)
    if method == "ghost":
        step = _step(2 * T * T, max_chunk_elems)
        for s in range(0, B, step):
            xc, gc = x[s : s + step].to(dt), g[s : s + step].to(dt)
            xx = torch.bmm(xc, xc.transpose(1, 2))
            gg = torch.bmm(gc, gc.transpose(1, 2))
            out[s : s + step] = torch.linalg.vecdot(xx.flatten(1), gg.flatten(1))
    else:
        step = _step(i * o, max_chunk_elems)
        for s in range(0, B, step):
            dw = torch.bmm(g[s : s + step].to(dt).transpose(1, 2), x[s : s + step].to(dt))
            out[s : s + step] = _sq(dw)
    return out


def linear_weight_grad_and_sq_norms(
    x: Tensor, g: Tensor, *, max_chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> tuple[Tensor, Tensor]:
    """Weight gradient and per-example squared norms from one pass (simultaneous method).

    Per chunk of examples the products ``G_b^T X_b`` are formed once, square-summed into the
    per-example norms and summed into ``dW = sum_b G_b^T X_b``, which is the weight gradient
    of a summed loss, the same thing autograd computes for ``F.linear`` (Gray et al. 2024).

    Args:
        x: inputs ``[B, T, i]``.
        g: output-gradients ``[B, T, o]``.
        max_chunk_elems: bound on the elements of one chunk of ``[c, o, i]`` products.

    Returns:
        ``(dW[o, i], sq[B])``, float64 for float64 inputs, else float32.

    Example::

        >>> x, g = torch.randn(4, 3, 2), torch.randn(4, 3, 5)
        >>> dw, sq = linear_weight_grad_and_sq_norms(x, g)
        >>> torch.allclose(dw, g.flatten(0, 1).T @ x.flatten(0, 1), atol=1e-5)
        True
    """
    _check_pair(x, g)
    _check_budget(max_chunk_elems)
    dt = _acc_dtype(x, g)
    B, _, i = x.shape
    o = g.shape[2]
    dw_total = torch.zeros(o, i, dtype=dt, device=x.device)
    sq = torch.empty(B, dtype=dt, device=x.device)
    step = _step(i * o, max_chunk_elems)
    for s in range(0, B, step):
        dw = torch.bmm(g[s : s + step].to(dt).transpose(1, 2), x[s : s + step].to(dt))
        sq[s : s + step] = _sq(dw)
        dw_total += dw.sum(0)
    return dw_total, sq


def bias_sq_norms(g: Tensor) -> Tensor:
    """Per-example ``|sum_t g_t|^2``: the squared norm of a bias gradient.

    Args:
        g: output-gradients ``[B, T, o]``.

    Returns:
        ``[B]``, float64 for float64 input, else float32.

    Example::

        >>> bias_sq_norms(torch.ones(2, 3, 4))
        tensor([36., 36.])
    """
    _check_float("g", g, 3)
    return _sq(g.to(_acc_dtype(g)).sum(1))


def norm_affine_sq_norms(
    xhat: Tensor, g: Tensor, *, max_chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> tuple[Tensor, Tensor]:
    """Per-example squared norms of a normalisation layer's weight and bias gradients.

    ``out = xhat * w + b`` gives per-example gradients ``sum_t xhat_t * g_t`` (weight) and
    ``sum_t g_t`` (bias).

    Args:
        xhat: normalised inputs ``[B, T, d]``.
        g: output-gradients ``[B, T, d]``.
        max_chunk_elems: bound on the elements of one chunk's ``xhat * g`` temporary.

    Returns:
        ``(w_sq[B], b_sq[B])``, float64 for float64 inputs, else float32.

    Example::

        >>> w_sq, b_sq = norm_affine_sq_norms(torch.ones(2, 3, 4), torch.ones(2, 3, 4))
        >>> w_sq, b_sq
        (tensor([36., 36.]), tensor([36., 36.]))
    """
    _check_pair(xhat, g, "xhat", "g")
    if xhat.shape != g.shape:
        raise ValueError(
            f"xhat and g must have the same shape, got {tuple(xhat.shape)} and {tuple(g.shape)}"
        )
    _check_budget(max_chunk_elems)
    dt = _acc_dtype(xhat, g)
    B, T, d = xhat.shape
    w_sq = torch.empty(B, dtype=dt, device=g.device)
    step = _step(T * d, max_chunk_elems)
    for s in range(0, B, step):
        w_sq[s : s + step] = _sq((xhat[s : s + step].to(dt) * g[s : s + step].to(dt)).sum(1))
    return w_sq, bias_sq_norms(g)


def embedding_sq_norms(
    ids: Tensor,
    g: Tensor,
    padding_idx: int | None = None,
    *,
    max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Tensor:
    """Per-example squared norm of an embedding table's gradient.

    Example b's gradient has row ``v`` equal to ``sum_{t: ids_t = v} g_t``, so its squared norm
    is ``sum_{t,s} [ids_t = ids_s] g_t . g_s``; positions holding ``padding_idx`` get no
    gradient and are excluded. Computed without a T x T x d tensor: ids are sorted within each
    example, equal ids form segments, g is scatter-added into one row per segment (memory and
    cost ~ T*d per example, plus a sort of T ids).

    Args:
        ids: integer token ids ``[B, T]``.
        g: output-gradients ``[B, T, d]``.
        padding_idx: id whose positions are excluded, or None.
        max_chunk_elems: bound on the elements of one chunk's ``[c*T, d]`` row buffer.

    Returns:
        ``[B]``, float64 for float64 ``g``, else float32.

    Example::

        >>> ids = torch.tensor([[3, 3, 0]])
        >>> g = torch.ones(1, 3, 2)
        >>> embedding_sq_norms(ids, g), embedding_sq_norms(ids, g, padding_idx=0)
        (tensor([10.]), tensor([8.]))
    """
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise ValueError(f"ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids))}")
    if ids.dim() != 2:
        raise ValueError(f"ids must have 2 dims [B, T], got shape={tuple(ids.shape)}")
    _check_float("g", g, 3)
    if g.shape[:2] != ids.shape:
        raise ValueError(
            f"ids and g must agree on [B, T], got ids.shape={tuple(ids.shape)} and "
            f"g.shape={tuple(g.shape)}"
        )
    bad_padding = isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
    if padding_idx is not None and bad_padding:
        raise ValueError(f"padding_idx={padding_idx!r} must be an int or None")
    _check_budget(max_chunk_elems)
    dt = _acc_dtype(g)
    B, T, d = g.shape
    out = torch.empty(B, dtype=dt, device=g.device)
    step = _step(T * d, max_chunk_elems)
    for s in range(0, B, step):
        out[s : s + step] = _embedding_chunk(ids[s : s + step], g[s : s + step].to(dt), padding_idx)
    return out


def _embedding_chunk(ids: Tensor, g: Tensor, padding_idx: int | None) -> Tensor:
    c, T, d = g.shape
    if padding_idx is not None:
        g = g.masked_fill((ids == padding_idx).unsqueeze(-1), 0)
    sorted_ids, order = ids.sort(dim=1)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    # Segment index of each sorted position; every example starts a new segment, so no
    # segment spans two examples. At most c*T segments, so the row buffer needs no host sync.
    seg_sorted = starts.flatten().cumsum(0) - 1
    seg = torch.empty_like(seg_sorted).view(c, T).scatter_(1, order, seg_sorted.view(c, T))
    rows = torch.zeros(c * T, d, dtype=g.dtype, device=g.device)
    rows.index_add_(0, seg.flatten(), g.reshape(c * T, d))
    example = torch.arange(c, device=g.device).repeat_interleave(T)
    seg_example = torch.zeros_like(seg_sorted).scatter_(0, seg_sorted, example)
    out = torch.zeros(c, dtype=g.dtype, device=g.device)
    return out.index_add_(0, seg_example, torch.linalg.vecdot(rows, rows))
