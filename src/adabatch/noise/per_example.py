"""Per-example squared gradient norms from module hooks, one exact norm rule per layer type.

A forward hook on each supported module keeps the module's inputs; a tensor hook on its
output receives the output-gradient during backward. As soon as every forward call a module
made in this pass has its output-gradient, the module's rule computes each example's squared
gradient norm for the module's parameters and the held tensors are released. The maths lives
in :mod:`adabatch.kernels` (formulas and citations in ``kernels/reference.py``); this file only
captures, reshapes and bookkeeps.

Rules (B examples, T positions per example; cost per example on top of the training step):

* ``nn.Linear`` (any input rank; middle dims flattened to T): ghost norm ``<XX^T, GG^T>``
  (~2T^2(i+o) flops, T^2 memory) or materialised ``G^T X`` (~2T*i*o flops, i*o memory),
  the cheaper one per call (``method="auto"``); bias ``|sum_t g_t|^2``. Where neither is
  cheap relative to the layer (T >= 8 and both > 25% of its forward+backward flops), the
  layer's forward is swapped while attached for an ``autograd.Function`` that computes dW
  from the per-example products and the norms in the same pass (Gray et al. 2024's
  simultaneous method: no extra GEMM, the per-example products of a chunk of examples held
  at a time).
* ``nn.Conv1d/2d/3d`` (stride, padding incl. ``"same"`` and non-zero padding modes, dilation,
  groups): the input is unfolded (im2col, T = output positions, C*K/groups features per group,
  memory T*C*K per example, processed in chunks of examples) and each group is the Linear case.
* ``nn.Embedding``: ``sum_{t,s}[x_t = x_s] g_t.g_s`` with ``padding_idx`` positions excluded
  (sort + scatter-add, ~T*d).
* ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``: ``xhat`` is recomputed from the captured
  input with the module's eps (one extra normalisation, ~T*d), then ``|sum_t xhat_t g_t|^2``
  and ``|sum_t g_t|^2``. Recomputing avoids holding a second copy of the activations.
* ``nn.MultiheadAttention``: its ``in_proj_weight`` is used by a functional call, not by a
  submodule, so the module is recomputed per example with ``torch.func.vmap(grad(...))`` over
  the captured inputs and output-gradients (one more forward+backward of the module, per-example
  gradients of its 4E^2 parameters held for a chunk of examples at a time). Refused while
  ``dropout > 0`` in train mode (a recomputation would draw other masks).

Anything else is reported, never guessed: parameters of unsupported modules, parameters
registered in two modules (tied weights need a cross term), modules whose ``forward`` is
overridden by a subclass, and, at run time, parameters whose actual gradient disagrees with
what the rule saw (e.g. a weight also used functionally elsewhere) land in ``uncovered`` with a
reason in ``uncovered_reasons`` and are excluded from ``sq_norms`` for every pass.

The run-time check (``verify=True``) compares, per parameter and backward, a random rank-one
projection ``u^T dW v`` of the real gradient (a tensor hook on the parameter) with the same
projection of the sum of the rule's per-example gradients. It costs O(numel) per parameter
plus O(T(i+o)) per example, and no host sync until ``sq_norms`` is read; it runs on the first
two passes after ``attach()`` and every ``verify_every``-th pass (a parameter used outside its
module is a property of the model's code, so sampling finds it at the first pass).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from adabatch import kernels
from adabatch.kernels.reference import DEFAULT_CHUNK_ELEMS

__all__ = ["PerExampleGradNorms"]

_REDUCTIONS = ("mean", "sum")
_METHODS = ("auto", "ghost", "materialize")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Refused(Exception):
    """A module call the rules cannot handle exactly; the message is the reason."""


def _inside_backward() -> bool:
    """True while the autograd engine runs (e.g. activation-checkpoint recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _inside_func_transform() -> bool:
    """True inside torch.func transforms (vmap, grad, ...), whose tensors must not be kept."""
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _flat_outputs(output: Any) -> list[Any]:
    if isinstance(output, (tuple, list)):
        return [o for item in output for o in _flat_outputs(item)]
    return [output]


def _cat_t(tensors: list[Tensor]) -> Tensor:
    """Concatenate calls along T (dim 1); a single call is returned as is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def _first_arg(args: tuple, kwargs: dict, name: str) -> Tensor:
    x = args[0] if args else kwargs.get(name)
    if not isinstance(x, Tensor):
        raise _Refused(f"expected a tensor as {name!r}, got {type(x).__name__}")
    return x


@dataclass(eq=False)
class _Call:
    """One forward call of a covered module, waiting for its output-gradients."""

    gen: int
    batch: int
    captured: dict[str, Any]
    versions: list[tuple[Tensor, int]]
    out_meta: list[tuple[torch.Size, torch.dtype, torch.device]]
    out_index: list[int]
    grads: list[Tensor | None] = field(default_factory=list)
    grad_versions: list[int] = field(default_factory=list)
    factor: float = 1.0
    done: bool = False
    check: bool = False  # run the projection check on this pass
    fused_sq: Tensor | None = None  # simultaneous Linear: per-example norms from backward
    fused_proj: Tensor | None = None

    @property
    def complete(self) -> bool:
        return all(g is not None for g in self.grads)

    @property
    def any_grad(self) -> bool:
        return any(g is not None for g in self.grads)

    def release(self) -> None:
        self.done = True
        self.captured, self.versions, self.grads = {}, [], [None] * len(self.grads)


# --------------------------------------------------------------------------------------- rules
class _Rule:
    """Norm rule of one layer type: what to capture, and the per-parameter maths."""

    kind = "module"
    stock: tuple[type, ...] = ()

    def refuse(self, module: nn.Module) -> str | None:
        """A reason the module cannot be covered at all, or None."""
        if "forward" in module.__dict__:
            return f"{type(module).__name__} has its forward replaced on the instance"
        for base in self.stock:
            if isinstance(module, base) and type(module).forward is not base.forward:
                return (
                    f"{type(module).__name__} overrides forward; only the stock forward of "
                    f"nn.{base.__name__} is supported"
                )
        return None

    def refuse_call(self, module: nn.Module) -> str | None:
        """A reason this call (in the module's current mode) cannot be handled, or None."""
        return None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, int]:
        """Tensors to keep (detached) and the batch size; raises `_Refused`."""
        raise NotImplementedError

    def compute(
        self, unit: _Unit, calls: list[_Call], probe: PerExampleGradNorms
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Per covered parameter (local name): (raw sq norms [B], sum-of-gradients projection)."""
        raise NotImplementedError


def _proj_dense(vecs: tuple[Tensor, Tensor], total: Tensor) -> Tensor:
    """``u^T M v`` with M the [n0, rest] view of a dense summed gradient."""
    u, v = vecs
    return u @ total.reshape(u.shape[0], -1).to(u.dtype) @ v


class _LinearRule(_Rule):
    kind = "linear"
    stock = (nn.Linear,)

    def capture(self, module, args, kwargs):
        x = _first_arg(args, kwargs, "input")
        if x.dim() < 2:
            raise _Refused(f"unbatched input of shape {tuple(x.shape)}: no batch dim")
        return {"x": x}, x.shape[0]

    def compute(self, unit, calls, probe):
        m = unit.module
        B = calls[0].batch
        i, o = m.in_features, m.out_features
        dt = _acc_dtype(*(c.captured["x"] for c in calls), *(c.grads[0] for c in calls))
        g = _cat_t([c.grads[0].reshape(B, -1, o).to(dt) for c in calls])
        out = {}
        if len(calls) == 1 and calls[0].fused_sq is not None:
            # simultaneous path: the backward already produced dW and the norms together
            out["weight"] = (calls[0].fused_sq, calls[0].fused_proj)
        elif "weight" in unit.params:
            x = _cat_t([c.captured["x"].reshape(B, -1, i).to(dt) for c in calls])
            sq = kernels.linear_sq_norms(x, g, probe.method, max_chunk_elems=probe.max_chunk_elems)
            proj = None
            if probe._verify_now:
                u, v = unit.vecs["weight"]
                proj = torch.linalg.vecdot((g @ u).flatten(), (x @ v).flatten())
            out["weight"] = (sq, proj)
        if "bias" in unit.params:
            proj = _proj_dense(unit.vecs["bias"], g.sum((0, 1))) if probe._verify_now else None
            out["bias"] = (kernels.bias_sq_norms(g), proj)
        return out


def _simultaneous_pays(T: int, i: int, o: int) -> bool:
    """Whether replacing autograd's dW by per-example products (plus their squares) is cheaper.

    Relative to a Linear's forward+backward (6T*i*o flops per example) the ghost norm costs
    T(i+o)/(3*i*o) and the materialised one 1/3; the simultaneous method costs no extra flops
    but runs dW as B small GEMMs and adds two passes over B*i*o products: measured 5-33% on
    CPU (benchmarks/RESULTS.md). So it is used when the cheaper norm method costs > 25% and
    T >= 8 (for T=1 the ghost norm |x|^2|g|^2 is nearly free).
    """
    return T >= 8 and min(T * (i + o) / (3 * i * o), 1 / 3) > 0.25


class _SimultaneousLinear(torch.autograd.Function):
    """``F.linear`` whose backward computes dW from per-example products, with their norms.

    Gray et al. 2024's simultaneous method: the per-example products ``G_b^T X_b`` are formed
    once (in chunks), square-summed into the norms and summed into dW, replacing the layer's
    own weight-gradient GEMM. dX and db are what autograd computes for ``F.linear``. Under
    autocast the inputs are cast as ``F.linear`` would be and dW is accumulated in float32 from
    the cast values. With ``create_graph=True`` dW is computed differentiably and the norms
    come from the ordinary rule.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, batch, sink):
        # x is [N, i] with N = batch * T (flattened outside, so the output is not a view and
        # in-place ops after the layer stay allowed).
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dt = torch.get_autocast_dtype(device)

            def cast(t):
                ok = t is not None and t.is_floating_point() and t.dtype != torch.float64
                return t.to(dt) if ok else t

            xc, wc, bc = cast(x), cast(weight), cast(bias)
        else:
            xc, wc, bc = x, weight, bias
        with torch.autocast(device, enabled=False):
            out = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.sink, ctx.batch = sink, batch
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        xc, wc = ctx.saved_tensors
        dx = dw = db = None
        o, i = wc.shape
        if ctx.needs_input_grad[0]:
            dx = g @ wc
        sq = None
        if ctx.needs_input_grad[1]:
            x3, g3 = xc.reshape(ctx.batch, -1, i), g.reshape(ctx.batch, -1, o)
            if torch.is_grad_enabled():  # create_graph: a differentiable dW
                dw = g3.flatten(0, 1).transpose(0, 1) @ x3.flatten(0, 1)
            else:
                dw, sq = kernels.linear_weight_grad_and_sq_norms(
                    x3, g3, max_chunk_elems=ctx.sink.max_chunk_elems
                )
            dw = dw.to(ctx.w_dtype)
        if ctx.needs_input_grad[2]:
            db = g.sum(0).to(ctx.b_dtype)
        ctx.sink(g, sq, dw)
        return dx, dw, db, None, None


class _Sink:
    """Where a simultaneous backward reports: the call its forward hook recorded."""

    __slots__ = ("probe", "max_chunk_elems", "unit", "call")

    def __init__(self, probe: PerExampleGradNorms) -> None:
        self.probe, self.max_chunk_elems = probe, probe.max_chunk_elems
        self.unit: _Unit | None = None
        self.call: _Call | None = None

    def __call__(self, g: Tensor, sq: Tensor | None, dw: Tensor | None) -> None:
        if self.unit is not None and self.call is not None:
            self.probe._on_simultaneous_grad(self.unit, self.call, g, sq, dw)


class _PatchedLinearForward:
    """The instance ``forward`` of a covered nn.Linear while a probe is attached.

    A deep copy of the module (an EMA model, say) gets a plain ``F.linear`` forward bound to
    the copy, never this probe's; pickling the module while attached is refused.
    """

    def __init__(self, probe: PerExampleGradNorms, unit: _Unit) -> None:
        self.probe, self.unit = probe, unit

    def __call__(self, input: Tensor) -> Tensor:
        return self.probe._linear_forward(self.unit, input)

    def __deepcopy__(self, memo: dict) -> Any:
        copy_of_module = memo.get(id(self.unit.module))
        return self if copy_of_module is None else _PlainLinearForward(copy_of_module)

    def __reduce__(self):
        raise TypeError(
            "a module with an attached PerExampleGradNorms probe cannot be pickled; call "
            "probe.detach() first (state_dict() is fine)"
        )


class _PlainLinearForward:
    """``F.linear`` with the module's own parameters (what a copied patched module gets)."""

    def __init__(self, module: nn.Linear) -> None:
        self.module = module

    def __call__(self, input: Tensor) -> Tensor:
        return F.linear(input, self.module.weight, self.module.bias)


def _unfold(x: Tensor, m: nn.modules.conv._ConvNd) -> Tensor:
    """im2col for any spatial rank: [c, C, *S] -> [c, T, C * prod(kernel)] (channel-major)."""
    pad = m._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, pad, mode=mode)
    n = len(m.kernel_size)
    for d, (k, s, dil) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
        x = x.unfold(2 + d, (k - 1) * dil + 1, s)  # window appended as the last dim
        if dil > 1:
            x = x[..., ::dil]
    c, C = x.shape[:2]
    perm = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    return x.permute(perm).reshape(c, -1, C * math.prod(m.kernel_size))


class _ConvRule(_Rule):
    kind = "conv"
    stock = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def capture(self, module, args, kwargs):
        x = _first_arg(args, kwargs, "input")
        if x.dim() != module.weight.dim():
            raise _Refused(f"unbatched input of shape {tuple(x.shape)}: no batch dim")
        return {"x": x}, x.shape[0]

    def compute(self, unit, calls, probe):
        m = unit.module
        B, G = calls[0].batch, m.groups
        n_out = m.out_channels
        dt = _acc_dtype(*(c.captured["x"] for c in calls), *(c.grads[0] for c in calls))
        K = math.prod(m.kernel_size)
        T_total = sum(c.grads[0][0].numel() // n_out for c in calls)
        step = max(1, probe.max_chunk_elems // max(1, T_total * m.in_channels * K))
        want_w, want_b = "weight" in unit.params, "bias" in unit.params
        w_sq = torch.empty(B, dtype=dt, device=m.weight.device)
        b_sq = torch.empty(B, dtype=dt, device=m.weight.device)
        w_proj = torch.zeros((), dtype=dt, device=m.weight.device)
        b_total = torch.zeros(n_out, dtype=dt, device=m.weight.device)
        for s in range(0, B, step):
            xs, gs = [], []
            for c in calls:
                xs.append(_unfold(c.captured["x"][s : s + step].to(dt), m))
                g = c.grads[0][s : s + step].to(dt)
                gs.append(g.reshape(g.shape[0], n_out, -1).transpose(1, 2))
            x, g = _cat_t(xs), _cat_t(gs)  # [c, T, C*K], [c, T, n_out]
            n, T = x.shape[:2]
            if want_w:
                xg = x.view(n, T, G, -1).transpose(1, 2).reshape(n * G, T, -1)
                gg = g.view(n, T, G, -1).transpose(1, 2).reshape(n * G, T, -1)
                sq = kernels.linear_sq_norms(
                    xg, gg, probe.method, max_chunk_elems=probe.max_chunk_elems
                )
                w_sq[s : s + n] = sq.view(n, G).sum(1)
                if probe._verify_now:
                    u, v = unit.vecs["weight"]
                    gu = torch.einsum("ntgo,go->ntg", g.view(n, T, G, -1), u.view(G, -1))
                    w_proj += torch.linalg.vecdot(gu.flatten(), (x.view(n, T, G, -1) @ v).flatten())
            if want_b:
                b_sq[s : s + n] = kernels.bias_sq_norms(g)
                b_total += g.sum((0, 1))
        out = {}
        if want_w:
            out["weight"] = (w_sq, w_proj if probe._verify_now else None)
        if want_b:
            proj = _proj_dense(unit.vecs["bias"], b_total) if probe._verify_now else None
            out["bias"] = (b_sq, proj)
        return out


class _EmbeddingRule(_Rule):
    kind = "embedding"
    stock = (nn.Embedding,)

    def refuse(self, module):
        if module.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True divides gradients by batch-wide token counts, so a "
                "per-example gradient is not defined"
            )
        return super().refuse(module)

    def capture(self, module, args, kwargs):
        ids = _first_arg(args, kwargs, "input")
        if ids.dim() < 1:
            raise _Refused("a 0-dim index has no batch dim")
        return {"ids": ids}, ids.shape[0]

    def compute(self, unit, calls, probe):
        m = unit.module
        B, d = calls[0].batch, m.embedding_dim
        ids = _cat_t([c.captured["ids"].reshape(B, -1) for c in calls])
        dt = _acc_dtype(*(c.grads[0] for c in calls))
        g = _cat_t([c.grads[0].reshape(B, -1, d).to(dt) for c in calls])
        sq = kernels.embedding_sq_norms(
            ids, g, m.padding_idx, max_chunk_elems=probe.max_chunk_elems
        )
        proj = None
        if probe._verify_now:
            u, v = unit.vecs["weight"]
            terms = u[ids] * (g @ v)
            if m.padding_idx is not None:
                terms = terms.masked_fill(ids == m.padding_idx, 0)
            proj = terms.sum()
        return {"weight": (sq, proj)}


class _NormRule(_Rule):
    """LayerNorm / RMSNorm / GroupNorm: recompute xhat, then |sum_t xhat*g|^2, |sum_t g|^2."""

    kind = "norm"
    stock = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)

    def capture(self, module, args, kwargs):
        x = _first_arg(args, kwargs, "input")
        lead = 1 if isinstance(module, nn.GroupNorm) else len(module.normalized_shape)
        if x.dim() <= lead:
            raise _Refused(f"unbatched input of shape {tuple(x.shape)}: no batch dim")
        return {"x": x}, x.shape[0]

    @staticmethod
    def xhat_and_layout(m: nn.Module, x: Tensor, g: Tensor, dt: torch.dtype):
        """Normalised input and output-grad, both as [B, T, d] with d the affine dims."""
        B = x.shape[0]
        xf = x.to(dt)
        # torch's own kernels without the affine part give xhat exactly as the forward did
        # (and ~6x faster on CPU than var_mean + arithmetic).
        if isinstance(m, nn.GroupNorm):
            C = x.shape[1]
            xhat = F.group_norm(xf, m.num_groups, None, None, m.eps)
            layout = (B, C, -1)
            return xhat.reshape(layout).transpose(1, 2), g.to(dt).reshape(layout).transpose(1, 2)
        if isinstance(m, nn.RMSNorm):
            # eps=None means finfo(input dtype).eps: the dtype the forward saw, not dt.
            eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            xhat = F.rms_norm(xf, m.normalized_shape, None, eps)
        else:
            xhat = F.layer_norm(xf, m.normalized_shape, None, None, m.eps)
        d = math.prod(m.normalized_shape)
        return xhat.reshape(B, -1, d), g.to(dt).reshape(B, -1, d)

    def compute(self, unit, calls, probe):
        m = unit.module
        dt = _acc_dtype(*(c.captured["x"] for c in calls), *(c.grads[0] for c in calls))
        pairs = [self.xhat_and_layout(m, c.captured["x"], c.grads[0], dt) for c in calls]
        xhat = _cat_t([p[0] for p in pairs])
        g = _cat_t([p[1] for p in pairs])
        w_sq, b_sq = kernels.norm_affine_sq_norms(xhat, g, max_chunk_elems=probe.max_chunk_elems)
        out = {}
        if "weight" in unit.params:
            proj = None
            if probe._verify_now:
                u, v = unit.vecs["weight"]
                r = torch.outer(u, v).flatten()
                proj = torch.linalg.vecdot(xhat.flatten(), (g * r).flatten())
            out["weight"] = (w_sq, proj)
        if "bias" in unit.params:
            proj = _proj_dense(unit.vecs["bias"], g.sum((0, 1))) if probe._verify_now else None
            out["bias"] = (b_sq, proj)
        return out


def _canonical_mask(mask: Tensor | None, dt: torch.dtype) -> Tensor | None:
    """A boolean mask as an additive float mask (True -> -inf), as nn.MultiheadAttention does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dt, device=mask.device).masked_fill_(mask, -math.inf)
    return mask.to(dt)


class _MultiheadAttentionRule(_Rule):
    """Exact rule for nn.MultiheadAttention, whose projections are bare Parameters.

    ``recompute="decomposed"`` (default): the module's attention is recomputed batched from the
    captured inputs, with the q/k/v projection outputs (and the repeated bias_k/bias_v) as
    autograd leaves; one backward from the captured output-gradient gives each example's
    gradient with respect to them, and every weight is then a linear map with known inputs
    and output-gradients: in_proj rows q|k|v from (query|key|value, dq|dk|dv), out_proj from
    (attention context, output-grad). Cost: the q/k/v projections and the attention forward
    and backward once more (no weight-gradient GEMMs), plus ghost/materialised norms; memory:
    the attention activations of a chunk of examples.

    ``recompute="vmap"``: the generic exact rule, the module re-run per example with
    ``torch.func.vmap(grad(...))`` over its inputs and output-gradients (per-example gradients
    of all its parameters held for a chunk of examples). Slower; kept as a cross-check.
    """

    kind = "multihead_attention"
    stock = (nn.MultiheadAttention,)
    recompute = "decomposed"
    _signature = inspect.signature(nn.MultiheadAttention.forward)

    def refuse_call(self, module):
        if module.training and module.dropout > 0:
            return (
                f"dropout={module.dropout} in train mode: recomputing the module per example "
                "would draw different dropout masks"
            )
        return None

    def refuse(self, module):
        return super().refuse(module) or self.refuse_call(module)

    def capture(self, module, args, kwargs):
        bound = self._signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        bdim = 0 if module.batch_first else 1
        for name in ("query", "key", "value"):
            if not isinstance(a[name], Tensor) or a[name].dim() != 3:
                raise _Refused(f"unbatched {name} of shape {tuple(a[name].shape)}: no batch dim")
        B = a["query"].shape[bdim]
        # Self-attention (one tensor as query, key and value): in_proj is then one [3E, E]
        # linear map of one input, so its three row blocks share one Gram matrix.
        a["_self_attention"] = a["query"] is a["key"] and a["key"] is a["value"]
        mask = a["attn_mask"]
        if isinstance(mask, Tensor) and mask.dim() == 3:
            a["attn_mask"] = mask.reshape(B, module.num_heads, *mask.shape[1:])
        return a, B

    def _in_dims(self, module, a: dict) -> dict[str, int | None]:
        bdim = 0 if module.batch_first else 1
        dims: dict[str, int | None] = {}
        for name, value in a.items():
            if not isinstance(value, Tensor):
                dims[name] = None
            elif name in ("query", "key", "value"):
                dims[name] = bdim
            elif name == "key_padding_mask" or (name == "attn_mask" and value.dim() == 4):
                dims[name] = 0
            else:
                dims[name] = None
        return dims

    def compute(self, unit, calls, probe):
        if self.recompute == "vmap":
            return self._compute_vmap(unit, calls, probe)
        return self._compute_decomposed(unit, calls, probe)

    # ---- decomposed: batched recompute with the projection outputs as leaves
    def _intermediates(self, m, P: dict, call: _Call, s: int, e: int, dt) -> dict[str, Tensor]:
        """Batch-first inputs, per-example output-grads of the projections, for examples s:e."""
        a, bf = call.captured, m.batch_first
        E, H = m.embed_dim, m.num_heads
        hd, c = E // H, e - s

        def seq_first(t: Tensor) -> Tensor:
            t = (t[s:e] if bf else t[:, s:e]).to(dt)
            return t.transpose(0, 1) if bf else t

        query, key, value = (seq_first(a[n]) for n in ("query", "key", "value"))
        L = query.shape[0]
        if m._qkv_same_embed_dim:
            wq, wk, wv = P["in_proj_weight"].chunk(3)
        else:
            wq, wk, wv = P["q_proj_weight"], P["k_proj_weight"], P["v_proj_weight"]
        bq = bk = bv = None
        if m.in_proj_bias is not None:
            bq, bk, bv = P["in_proj_bias"].chunk(3)
        q = F.linear(query, wq, bq).requires_grad_()  # leaves: computed under no_grad
        k = F.linear(key, wk, bk).requires_grad_()
        v = F.linear(value, wv, bv).requires_grad_()
        leaves = [q, k, v]

        # Masks, following F.multi_head_attention_forward step by step.
        kpm = a["key_padding_mask"]
        kpm = _canonical_mask(None if kpm is None else kpm[s:e], dt)
        sdpa_causal = a["is_causal"] and kpm is None and not a["need_weights"]
        mask = None
        if not sdpa_causal and a["attn_mask"] is not None:
            mask = _canonical_mask(a["attn_mask"], dt)
            # 2-D [L, S] broadcasts; the capture stored a 3-D mask as [B, heads, L, S].
            mask = mask.unsqueeze(0) if mask.dim() == 2 else mask[s:e].flatten(0, 1)
        with torch.enable_grad():
            k_all, v_all = k, v
            if m.bias_k is not None and m.bias_v is not None:
                bk_rep = P["bias_k"].repeat(1, c, 1).requires_grad_()
                bv_rep = P["bias_v"].repeat(1, c, 1).requires_grad_()
                leaves += [bk_rep, bv_rep]
                k_all, v_all = torch.cat([k, bk_rep]), torch.cat([v, bv_rep])
                mask = None if mask is None else F.pad(mask, (0, 1))
                kpm = None if kpm is None else F.pad(kpm, (0, 1))
            qh = q.reshape(L, c * H, hd).transpose(0, 1)
            kh = k_all.reshape(k_all.shape[0], c * H, hd).transpose(0, 1)
            vh = v_all.reshape(v_all.shape[0], c * H, hd).transpose(0, 1)
            if m.add_zero_attn:
                zeros = torch.zeros(c * H, 1, hd, dtype=dt, device=qh.device)
                kh, vh = torch.cat([kh, zeros], 1), torch.cat([vh, zeros], 1)
                mask = None if mask is None else F.pad(mask, (0, 1))
                kpm = None if kpm is None else F.pad(kpm, (0, 1))
            S = kh.shape[1]
            if kpm is not None:
                kpm = kpm.view(c, 1, 1, S).expand(-1, H, -1, -1).reshape(c * H, 1, S)
                mask = kpm if mask is None else mask + kpm
            if sdpa_causal:  # scaled_dot_product_attention(is_causal=True): top-left causal
                causal = torch.ones(L, S, dtype=torch.bool, device=qh.device).triu(1)
                mask = _canonical_mask(causal, dt).unsqueeze(0)
            q_scaled = qh * math.sqrt(1.0 / hd)
            kt = kh.transpose(-2, -1)
            scores = torch.bmm(q_scaled, kt) if mask is None else torch.baddbmm(mask, q_scaled, kt)
            weights = torch.softmax(scores, dim=-1)
            ctx = torch.bmm(weights, vh).view(c, H, L, hd).permute(0, 2, 1, 3).reshape(c, L, E)
            cots = dict(zip(call.out_index, call.grads))
            g_out = cots.get(0)
            g_out = (
                torch.zeros(c, L, E, dtype=dt, device=ctx.device) if g_out is None
                else (g_out[s:e] if bf else g_out[:, s:e].transpose(0, 1)).to(dt)
            )
            terms = (ctx * (g_out @ P["out_proj.weight"])).sum()
            if 1 in cots:
                w = weights.view(c, H, L, S)
                w = w.mean(1) if a["average_attn_weights"] else w
                terms = terms + (w * cots[1][s:e].to(dt)).sum()
            grads = torch.autograd.grad(terms, leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        out = {
            "x_q": query.transpose(0, 1), "x_k": key.transpose(0, 1),
            "x_v": value.transpose(0, 1), "d_q": grads[0].transpose(0, 1),
            "d_k": grads[1].transpose(0, 1), "d_v": grads[2].transpose(0, 1),
            "ctx": ctx.detach(), "g_out": g_out,
        }
        if len(grads) == 5:
            out["d_bias_k"], out["d_bias_v"] = grads[3][0], grads[4][0]
        return out

    def _compute_decomposed(self, unit, calls, probe):
        m = unit.module
        B, E = calls[0].batch, m.embed_dim
        dt = _acc_dtype(*unit.params.values())
        P = {n: t.detach().to(dt) for n, t in m.named_parameters()}
        device = calls[0].grads[0].device
        names = list(unit.params)
        sq = {n: torch.zeros(B, dtype=dt, device=device) for n in names}
        proj = {n: torch.zeros((), dtype=dt, device=device) for n in names}
        dense = {n: torch.zeros_like(P[n]) for n in names if n in _DENSE_MHA}
        seq = 1 if m.batch_first else 0
        per_example = sum(  # attention scores/weights (+ grads) and ~12 [T, E] tensors per call
            4 * m.num_heads * c.captured["query"].shape[seq] * (c.captured["key"].shape[seq] + 2)
            + 12 * E * (c.captured["query"].shape[seq] + c.captured["key"].shape[seq])
            for c in calls
        )
        step = max(1, probe.max_chunk_elems // max(1, per_example))
        blocks = {  # parameter -> (rows of it, input key, grad key) per linear block
            "in_proj_weight": [(slice(0, E), "x_q", "d_q"), (slice(E, 2 * E), "x_k", "d_k"),
                               (slice(2 * E, 3 * E), "x_v", "d_v")],
            "q_proj_weight": [(slice(0, E), "x_q", "d_q")],
            "k_proj_weight": [(slice(0, E), "x_k", "d_k")],
            "v_proj_weight": [(slice(0, E), "x_v", "d_v")],
            "out_proj.weight": [(slice(0, E), "ctx", "g_out")],
        }
        biases = {"in_proj_bias": ["d_q", "d_k", "d_v"], "out_proj.bias": ["g_out"]}
        if all(c.captured["_self_attention"] for c in calls):
            blocks["in_proj_weight"] = [(slice(0, 3 * E), "x_q", "d_qkv")]
        for s in range(0, B, step):
            e = min(B, s + step)
            parts = [self._intermediates(m, P, c, s, e, dt) for c in calls]
            if "in_proj_weight" in names and blocks["in_proj_weight"][0][2] == "d_qkv":
                for p in parts:
                    p["d_qkv"] = torch.cat([p["d_q"], p["d_k"], p["d_v"]], dim=-1)

            def cat(key: str, parts=parts) -> Tensor:
                return _cat_t([p[key] for p in parts])

            for n in names:
                if n in blocks:
                    for rows, xk, gk in blocks[n]:
                        x, g = cat(xk), cat(gk)
                        sq[n][s:e] += kernels.linear_sq_norms(
                            x, g, probe.method, max_chunk_elems=probe.max_chunk_elems
                        )
                        if probe._verify_now:
                            u, v = unit.vecs[n]
                            proj[n] += torch.linalg.vecdot(
                                (g @ u[rows]).flatten(), (x @ v).flatten()
                            )
                elif n in biases:
                    gs = [cat(k) for k in biases[n]]
                    sq[n][s:e] = sum(kernels.bias_sq_norms(g) for g in gs)
                    dense[n] += torch.cat([g.sum((0, 1)) for g in gs])
                else:  # bias_k / bias_v: per-example gradients summed over calls
                    g = sum(p["d_" + n] for p in parts)
                    sq[n][s:e] = torch.linalg.vecdot(g, g)
                    dense[n] += g.sum(0).view_as(dense[n])
        if probe._verify_now:
            for n in dense:
                proj[n] = _proj_dense(unit.vecs[n], dense[n])
        return {n: (sq[n], proj[n] if probe._verify_now else None) for n in names}

    # ---- generic: per-example recompute with torch.func
    def _compute_vmap(self, unit, calls, probe):
        m = unit.module
        B = calls[0].batch
        names = list(unit.params)
        dt = _acc_dtype(*unit.params.values())
        state = {n: t.detach().to(dt) for n, t in m.named_parameters()}
        state.update({n: t.detach().to(dt) for n, t in m.named_buffers()})
        diff = {n: state[n] for n in names}
        bdim_out = 0 if m.batch_first else 1
        n_params = sum(p.numel() for p in diff.values())

        def per_call_grad(call: _Call) -> tuple[Callable, list[str]]:
            keys = [k for k, v in call.captured.items() if isinstance(v, Tensor)]
            static = {
                k: v for k, v in call.captured.items()
                if not isinstance(v, Tensor) and not k.startswith("_")
            }
            # need_weights=True selects the explicit softmax path, which has vmap batching
            # rules (scaled_dot_product_attention on CPU has none and would loop per example);
            # the maths is the same and an extra weights output gets no cotangent. Not when
            # is_causal makes need_weights=False use SDPA's own causal mask instead of attn_mask.
            if not (static["is_causal"] and call.captured["key_padding_mask"] is None):
                static["need_weights"] = True
            out_index = call.out_index

            def scalar(p: dict, tensors: tuple, cots: tuple) -> Tensor:
                # Per example the inputs are unbatched ([L, E]; attn_mask [heads, L, S]),
                # a form nn.MultiheadAttention accepts.
                a = {**static, **dict(zip(keys, tensors))}
                outs = _flat_outputs(functional_call(m, {**state, **p}, (), a))
                return sum((outs[j] * cot).sum() for j, cot in zip(out_index, cots))

            dims = self._in_dims(m, call.captured)
            in_dims = (None, tuple(dims[k] for k in keys), tuple(_out_dims(call, bdim_out)))
            return vmap(grad(scalar), in_dims=in_dims, randomness="error"), keys

        sq = {n: torch.empty(B, dtype=dt, device=calls[0].grads[0].device) for n in names}
        totals = {n: torch.zeros_like(diff[n]) for n in names}
        act = sum(
            v.numel() // B for c in calls for v in (*c.captured.values(), *c.grads)
            if isinstance(v, Tensor)
        )
        step = max(1, probe.max_chunk_elems // max(1, 2 * n_params + 8 * act))
        fns = [per_call_grad(c) for c in calls]
        dims_all = [self._in_dims(m, c.captured) for c in calls]
        for s in range(0, B, step):
            acc: dict[str, Tensor] | None = None
            for c, (fn, keys), dims in zip(calls, fns, dims_all):
                tensors = tuple(
                    _slice(c.captured[k], dims[k], s, step, dt) for k in keys
                )
                cots = tuple(
                    _slice(g, d, s, step, dt) for g, d in zip(c.grads, _out_dims(c, bdim_out))
                )
                gr = fn(diff, tensors, cots)
                acc = gr if acc is None else {n: acc[n] + gr[n] for n in names}
            assert acc is not None  # calls is never empty here
            for n in names:
                sq[n][s : s + step] = torch.linalg.vecdot(acc[n].flatten(1), acc[n].flatten(1))
                totals[n] += acc[n].sum(0)
        return {
            n: (sq[n], _proj_dense(unit.vecs[n], totals[n]) if probe._verify_now else None)
            for n in names
        }


_DENSE_MHA = ("in_proj_bias", "out_proj.bias", "bias_k", "bias_v")


def _out_dims(call: _Call, bdim_out: int) -> list[int]:
    # MultiheadAttention returns (attn_output [batch at bdim_out], attn_weights [batch first]).
    return [bdim_out if j == 0 else 0 for j in call.out_index]


def _slice(t: Tensor, dim: int | None, s: int, step: int, dt: torch.dtype) -> Tensor:
    if dim is None:
        return t.to(dt) if t.is_floating_point() else t
    t = t.narrow(dim, s, min(step, t.shape[dim] - s))
    return t.to(dt) if t.is_floating_point() else t


_RULES: list[_Rule] = [
    _LinearRule(),
    _ConvRule(),
    _EmbeddingRule(),
    _NormRule(),
    _MultiheadAttentionRule(),
]


def _rule_for(module: nn.Module) -> _Rule | None:
    for rule in _RULES:
        if isinstance(module, rule.stock):
            return rule
    return None


@dataclass(eq=False)
class _Unit:
    """A covered module: its rule, covered parameters (local names) and pending calls."""

    name: str
    module: nn.Module
    rule: _Rule
    params: dict[str, nn.Parameter]
    vecs: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    calls: list[_Call] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    broken: bool = False
    patched: bool = False  # forward replaced by the simultaneous Linear


# -------------------------------------------------------------------------------------- probe
class PerExampleGradNorms:
    """Exact per-example squared gradient norms of a model's parameters, from module hooks.

    After a forward and backward of a loss over B examples, ``sq_norms[b]`` is the squared norm
    of the gradient of example b's own loss with respect to the covered parameters, in
    per-example loss units. Supported layers, their cost and what is refused are described in
    the module docstring; ``covered``/``uncovered`` say which parameters are in the sum.

    Capture contract: dim 0 of every captured tensor is the batch (``nn.MultiheadAttention``:
    dim 1 unless ``batch_first``). A module called several times in one forward is exact (its
    calls are concatenated along T). Each forward that follows a backward starts a new pass;
    passes are concatenated in ``sq_norms``. Read ``sq_norms`` and call ``reset()`` after a
    backward, not between a forward and its backward. Coverage is decided by ``attach()``:
    re-attach after changing ``requires_grad``. Memory: inputs of supported modules are held
    from their forward until their output-gradient arrives (autograd holds most of them
    anyway); a module with an output that never receives a gradient (e.g. unused attention
    weights) is finalised lazily, at its next forward or when ``sq_norms`` is read.

    Args:
        model: the module whose parameters are measured.
        loss_reduction: ``"mean"`` if the loss averages over the B examples (output-gradients
            are multiplied by B), ``"sum"`` if it sums them.
        method: linear-layer method, ``"auto"`` (cheaper per call), ``"ghost"`` or
            ``"materialize"``.
        simultaneous: let covered ``nn.Linear`` layers compute their weight gradient and the
            norms in one pass where that is cheaper (Gray et al. 2024): the layer's forward is
            replaced, while attached, by an ``autograd.Function`` with the same forward, dX and
            db, whose dW is the sum of the per-example products (same value up to float
            rounding; float32 accumulation under autocast). ``False`` leaves autograd alone.
        verify: check that each covered parameter's real gradient matches what its rule saw
            (catches weights also used outside their module), on the first two passes after
            ``attach()`` and every ``verify_every``-th pass after that.
        verify_every: spacing of the checked passes.
        max_chunk_elems: bound on the elements of per-chunk temporaries.
        grad_scale: initial value of the ``grad_scale`` attribute.

    Attributes:
        grad_scale: factor the loss carried beyond the plain reduction, read when each
            output-gradient arrives: ``1/k`` under Lightning's accumulation over k batches,
            ``S`` under an AMP loss scale S. Norms are divided by ``grad_scale**2``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with PerExampleGradNorms(model) as probe:
        ...     nn.functional.mse_loss(model(x), y).backward()
        >>> probe.sq_norms.shape
        torch.Size([8])
        >>> probe.covered
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> model[0].weight = model[2].weight = nn.Parameter(torch.ones(4, 4))
        >>> probe = PerExampleGradNorms(model).attach()
        >>> probe.uncovered_reasons["0.weight"]
        "shared by modules '0' and '2' (tied weights need a cross term)"
        >>> probe.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str = "mean",
        *,
        method: str = "auto",
        simultaneous: bool = True,
        verify: bool = True,
        verify_every: int = 64,
        max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        grad_scale: float = 1.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r} must be one of {_REDUCTIONS}")
        if method not in _METHODS:
            raise ValueError(f"method={method!r} must be one of {_METHODS}")
        if isinstance(max_chunk_elems, bool) or not isinstance(max_chunk_elems, int):
            raise ValueError(f"max_chunk_elems={max_chunk_elems!r} must be an int >= 1")
        if max_chunk_elems < 1:
            raise ValueError(f"max_chunk_elems={max_chunk_elems!r} must be an int >= 1")
        if isinstance(verify_every, bool) or not isinstance(verify_every, int) or verify_every < 1:
            raise ValueError(f"verify_every={verify_every!r} must be an int >= 1")
        self.model = model
        self.loss_reduction = loss_reduction
        self.method = method
        self.simultaneous = bool(simultaneous)
        self.verify = bool(verify)
        self.verify_every = verify_every
        self.max_chunk_elems = max_chunk_elems
        self.grad_scale = grad_scale
        self._attached = False
        self._computing = False
        self._verify_now = self._check_now = self._saw_grad = False
        self._passes = 0  # passes since attach (not reset by reset()): paces the check
        self._fused_sinks: dict[int, _Sink] = {}
        self._units: list[_Unit] = []
        self._names: dict[int, str] = {}
        self._static_reasons: dict[int, str] = {}
        self._runtime_reasons: dict[int, str] = {}
        self._covered_ids: list[int] = []
        self._param_by_id: dict[int, nn.Parameter] = {}
        self._param_hooks: list[Any] = []
        self._vecs: dict[int, tuple[Tensor, Tensor]] = {}
        self._clear_results()

    # ------------------------------------------------------------------ public state
    @property
    def grad_scale(self) -> float:
        return self._grad_scale

    @grad_scale.setter
    def grad_scale(self, value: float) -> None:
        try:
            scale = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"grad_scale={value!r} must be a positive finite number") from None
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"grad_scale={value!r} must be a positive finite number")
        self._grad_scale = scale

    @property
    def covered(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the parameters in ``sq_norms``."""
        self._evaluate_checks()
        ids = [i for i in self._covered_ids if i not in self._runtime_reasons]
        return [self._names[i] for i in self._ordered(ids)]

    @property
    def uncovered(self) -> list[str]:
        """Names of trainable parameters excluded from ``sq_norms`` (see ``uncovered_reasons``)."""
        return list(self.uncovered_reasons)

    @property
    def uncovered_reasons(self) -> dict[str, str]:
        """Why each uncovered parameter is excluded."""
        self._evaluate_checks()
        reasons = {**self._static_reasons, **self._runtime_reasons}
        return {self._names[i]: reasons[i] for i in self._ordered(reasons)}

    @property
    def sq_norms(self) -> Tensor:
        """Per-example squared gradient norms over ``covered``, every pass since attach/reset.

        Raises:
            RuntimeError: if modules disagree on the batch size within one pass (a tensor whose
                dim 0 is not the batch, e.g. a Linear applied to ``x.view(-1, d)``).
        """
        self._finalize_all()
        self._evaluate_checks()
        covered = set(self._covered_ids)
        rows = []
        for gen in sorted(self._results):
            per = {
                pid: sq for pid, sq in self._results[gen].items()
                if pid in covered and pid not in self._runtime_reasons
            }
            if not per:
                continue
            sizes = {self._names[pid]: sq.shape[0] for pid, sq in per.items()}
            if len(set(sizes.values())) > 1:
                raise RuntimeError(
                    f"parameters saw different batch sizes in one pass: {sizes}; dim 0 of every "
                    "input to a covered module must be the batch (e.g. index a positional "
                    "embedding with arange(T).expand(B, T), not arange(T))"
                )
            device = next(iter(per.values())).device
            rows.append(sum(sq.to(device) for sq in per.values()))
        if not rows:
            return torch.zeros(0)
        return torch.cat(rows)

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> PerExampleGradNorms:
        """Decide coverage, register the hooks and start from empty results."""
        if self._attached:
            raise RuntimeError("PerExampleGradNorms is already attached; call detach() first")
        self._analyse()
        self._clear_results()
        self._runtime_reasons = {}
        self._passes, self._saw_grad, self._check_now = 0, False, False
        try:
            for unit in self._units:
                unit.handles.append(
                    unit.module.register_forward_hook(
                        self._make_forward_hook(unit), prepend=True, with_kwargs=True
                    )
                )
            if self.simultaneous:
                for unit in self._units:
                    if isinstance(unit.rule, _LinearRule) and "weight" in unit.params:
                        unit.module.forward = self._make_linear_forward(unit)
                        unit.patched = True
            if self.verify:
                for unit in self._units:
                    for lname, p in unit.params.items():
                        unit.vecs[lname] = self._vecs[id(p)] = self._random_vecs(p)
                        self._param_hooks.append(p.register_hook(self._make_param_hook(id(p))))
        except BaseException:
            self._remove_hooks()
            raise
        self._attached = True
        return self

    def detach(self) -> None:
        """Finalise pending passes and remove every hook; results stay readable."""
        try:
            self._finalize_all()
        finally:
            self._remove_hooks()
            self._attached = False

    def reset(self) -> None:
        """Forget the passes measured so far (call it after a backward, before a forward)."""
        self._finalize_all()
        self._evaluate_checks()
        self._clear_results()

    def __enter__(self) -> PerExampleGradNorms:
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for unit in self._units:
                for c in unit.calls:
                    c.release()
                unit.calls = []
            self._remove_hooks()
            self._attached = False
        else:
            self.detach()

    # ------------------------------------------------------------------ coverage
    def _analyse(self) -> None:
        model = self.model
        self._names = {}
        for name, p in model.named_parameters():
            self._names.setdefault(id(p), name)
        self._param_by_id = {id(p): p for p in model.parameters()}
        owners: dict[int, list[str]] = {}
        for mname, m in model.named_modules():
            for p in m._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), []).append(mname)
        self._units, self._static_reasons, covered = [], {}, []
        absorbed: set[int] = set()
        for mname, m in model.named_modules():
            if id(m) in absorbed:
                continue
            rule = _rule_for(m)
            if isinstance(rule, _MultiheadAttentionRule):
                absorbed.update(id(sub) for sub in m.modules())
                params = dict(m.named_parameters())
            else:
                params = {n: p for n, p in m._parameters.items() if p is not None}
            params = {n: p for n, p in params.items() if p.requires_grad}
            if not params:
                continue
            reason = rule.refuse(m) if rule is not None else (
                f"unsupported module type {type(m).__name__} ('{mname}')"
            )
            mine = {}
            for lname, p in params.items():
                pid = id(p)
                if reason is not None:
                    self._static_reasons.setdefault(pid, reason)
                elif len(owners[pid]) > 1:
                    who = " and ".join(f"'{o}'" for o in owners[pid])
                    self._static_reasons[pid] = (
                        f"shared by modules {who} (tied weights need a cross term)"
                    )
                else:
                    mine[lname] = p
            if mine:
                assert rule is not None
                self._units.append(_Unit(mname, m, rule, mine))
                covered.extend(id(p) for p in mine.values())
        self._covered_ids = [pid for pid in covered if pid not in self._static_reasons]

    def _ordered(self, ids) -> list[int]:
        order = {pid: k for k, pid in enumerate(self._names)}
        return sorted(ids, key=order.__getitem__)

    @staticmethod
    def _random_vecs(p: Tensor) -> tuple[Tensor, Tensor]:
        # Fixed per parameter, from a private generator: the user's RNG stream is untouched.
        gen = torch.Generator().manual_seed(len(p.shape) * 7919 + p.numel())
        n0 = p.shape[0] if p.dim() else 1
        dt = _acc_dtype(p)
        u = torch.randn(n0, generator=gen, dtype=dt)
        v = torch.randn(max(1, p.numel() // max(1, n0)), generator=gen, dtype=dt)
        return u.to(p.device), v.to(p.device)

    # ------------------------------------------------------------------ hooks
    def _make_forward_hook(self, unit: _Unit) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._on_forward(unit, module, args, kwargs, output)

        return hook

    def _on_forward(self, unit: _Unit, module, args, kwargs, output) -> None:
        sink = self._fused_sinks.pop(id(module), None)
        if module is not unit.module:
            return  # a deep copy of the module carries the hook dict along: not ours
        if unit.broken or self._computing or not torch.is_grad_enabled():
            return  # (a rule's own recomputation calls the module too)
        if _inside_func_transform():
            return  # the user's own torch.func code (e.g. a vmap(grad) oracle): not a pass
        outs = _flat_outputs(output)
        index = [j for j, o in enumerate(outs) if isinstance(o, Tensor) and o.requires_grad]
        if not index:
            return
        if not _inside_backward() and (self._saw_grad or not self._passes):
            # First forward after a backward: a new pass. (A forward during backward is an
            # activation-checkpoint recomputation and belongs to the running pass.)
            if self._saw_grad:
                self._gen += 1
            self._saw_grad = False
            self._passes += 1
            k = self._passes - 1
            self._check_now = self.verify and (k < 2 or k % self.verify_every == 0)
        if unit.calls and unit.calls[0].gen != self._gen:
            self._finalize(unit)
        try:
            reason = unit.rule.refuse_call(module)
            if reason is not None:
                raise _Refused(reason)
            captured, batch = unit.rule.capture(module, args, kwargs)
        except _Refused as exc:
            self._break(unit, str(exc))
            return
        captured = {k: v.detach() if isinstance(v, Tensor) else v for k, v in captured.items()}
        versions = [(v, v._version) for v in captured.values() if isinstance(v, Tensor)]
        call = _Call(
            gen=self._gen,
            batch=batch,
            captured=captured,
            versions=versions,
            out_meta=[(outs[j].shape, outs[j].dtype, outs[j].device) for j in index],
            out_index=index,
            grads=[None] * len(index),
            grad_versions=[0] * len(index),
            check=self._check_now,
        )
        unit.calls.append(call)
        if sink is not None:  # simultaneous Linear: its backward reports the output-grad
            sink.unit, sink.call = unit, call
            return
        for k, j in enumerate(index):
            outs[j].register_hook(self._make_grad_hook(unit, call, k))

    def _make_linear_forward(self, unit: _Unit) -> Callable:
        return _PatchedLinearForward(self, unit)

    def _linear_forward(self, unit: _Unit, input: Tensor) -> Tensor:
        module = unit.module
        w = module.weight
        if (
            not unit.broken
            and not self._computing
            and torch.is_grad_enabled()
            and w.requires_grad
            and input.dim() >= 2
            and input.shape[0] > 0
            and not _inside_func_transform()
            and not _inside_backward()
            and _simultaneous_pays(
                input.numel() // (input.shape[0] * w.shape[1]), w.shape[1], w.shape[0]
            )
        ):
            sink = _Sink(self)
            x2 = input.reshape(-1, w.shape[1])
            out = _SimultaneousLinear.apply(x2, w, module.bias, input.shape[0], sink)
            self._fused_sinks[id(module)] = sink  # the forward hook picks it up
            return out.view(*input.shape[:-1], w.shape[0])
        return F.linear(input, w, module.bias)

    def _on_simultaneous_grad(
        self, unit: _Unit, call: _Call, g: Tensor, sq: Tensor | None, dw: Tensor | None
    ) -> None:
        if sq is not None and not call.done and not unit.broken:
            call.fused_sq = sq
            if call.check and "weight" in unit.vecs and dw is not None:
                u, v = unit.vecs["weight"]
                call.fused_proj = u @ dw.to(u.dtype) @ v
        self._on_grad(unit, call, 0, g)

    def _make_grad_hook(self, unit: _Unit, call: _Call, k: int) -> Callable:
        def hook(g: Tensor) -> None:
            self._on_grad(unit, call, k, g)

        return hook

    def _on_grad(self, unit: _Unit, call: _Call, k: int, g: Tensor) -> None:
        self._saw_grad = True
        if unit.broken:
            return
        if call.done:
            self._break(
                unit,
                "an output-gradient arrived after its pass was finalised (backward through "
                "the same graph twice, or sq_norms/reset() read between forward and backward)",
            )
            return
        if call.grads[k] is not None:
            self._break(unit, "an output received two gradients in one pass")
            return
        call.grads[k] = g.detach()
        call.grad_versions[k] = g._version
        batch_factor = call.batch if self.loss_reduction == "mean" else 1
        call.factor = batch_factor / self._grad_scale
        if all(c.complete for c in unit.calls):
            self._finalize(unit)

    def _make_param_hook(self, pid: int) -> Callable:
        def hook(g: Tensor) -> None:
            self._on_param_grad(pid, g)

        return hook

    def _on_param_grad(self, pid: int, g: Tensor) -> None:
        self._saw_grad = True
        if not self._check_now or g.is_sparse or pid in self._runtime_reasons:
            return
        u, v = self._vecs[pid]
        with torch.no_grad():
            proj = u @ g.reshape(u.shape[0], -1).to(u.dtype) @ v
            norm_sq = torch.linalg.vecdot(g.flatten().to(u.dtype), g.flatten().to(u.dtype))
        key = (self._gen, pid)
        tol = 6e-2 if g.dtype in _LOW_PRECISION else (1e-6 if g.dtype == torch.float64 else 1e-2)
        prev = self._hook_proj.get(key)
        if prev is not None:
            proj, norm_sq, tol = proj + prev[0], norm_sq + prev[1], max(tol, prev[2])
        self._hook_proj[key] = (proj, norm_sq, tol)

    # ------------------------------------------------------------------ finalisation
    def _finalize(self, unit: _Unit) -> None:
        calls, unit.calls = unit.calls, []
        try:
            self._finalize_calls(unit, calls)
        finally:
            # The grad-hook closures stay on the autograd graph until it is freed; emptying
            # the calls lets their tensors go now.
            for c in calls:
                c.release()

    def _finalize_calls(self, unit: _Unit, calls: list[_Call]) -> None:
        for c in calls:
            c.done = True
        calls = [c for c in calls if c.any_grad]
        if not calls or unit.broken:
            return
        gen = calls[0].gen
        for c in calls:
            stale = any(t._version != v for t, v in c.versions) or any(
                g is not None and g._version != v for g, v in zip(c.grads, c.grad_versions)
            )
            if stale:
                self._break(unit, "a captured input or gradient was modified in place")
                return
        if len({c.batch for c in calls}) > 1:
            sizes = sorted({c.batch for c in calls})
            self._break(unit, f"calls in one pass had different batch sizes {sizes}")
            return
        factors = [c.factor for c in calls]
        verify = self.verify and calls[0].check
        if any(f != factors[0] for f in factors):
            # grad_scale changed between calls of one pass: rescale to the first call's units;
            # the projection check would compare rescaled against raw gradients, so skip it.
            for c in calls:
                c.grads = [g * (c.factor / factors[0]) if g is not None else None for g in c.grads]
            verify = False
        for c in calls:
            c.grads = [
                g if g is not None else torch.zeros(shape, dtype=dt, device=dev)
                for g, (shape, dt, dev) in zip(c.grads, c.out_meta)
            ]
        low = any(
            t.dtype in _LOW_PRECISION
            for c in calls
            for t in (*c.grads, *(v for v in c.captured.values() if isinstance(v, Tensor)))
        )
        device = calls[0].grads[0].device
        self._computing, self._verify_now = True, verify
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                results = unit.rule.compute(unit, calls, self)
        except Exception as exc:  # never break the user's backward; report instead
            warnings.warn(
                f"adabatch: per-example norm rule for {unit.name!r} failed: {exc!r}", stacklevel=2
            )
            self._break(unit, f"norm rule failed: {exc!r}")
            return
        finally:
            self._computing = self._verify_now = False
        scale = factors[0] ** 2
        for lname, (sq, proj) in results.items():
            p = unit.params[lname]
            if not p.requires_grad:
                continue
            pid = id(p)
            self._results.setdefault(gen, {})[pid] = sq * scale
            if verify and proj is not None:
                self._ours_proj[(gen, pid)] = (proj, sq.sum(), 6e-2 if low else 0.0)

    def _finalize_all(self) -> None:
        for unit in self._units:
            if unit.calls:
                self._finalize(unit)

    def _evaluate_checks(self) -> None:
        """Compare the rules' gradient projections with the real ones (one host sync)."""
        keys = list(self._hook_proj)
        if not keys:
            self._ours_proj = {}
            return
        stacked, tols = [], []
        for key in keys:
            h_proj, h_norm_sq, h_tol = self._hook_proj[key]
            zero = torch.zeros((), dtype=torch.float64, device=h_proj.device)
            o_proj, o_sq, o_tol = self._ours_proj.get(key, (zero, zero, 0.0))
            vals = [t.to(h_proj.device, torch.float64) for t in (h_proj, o_proj, h_norm_sq, o_sq)]
            stacked.append(torch.stack(vals).cpu())
            tols.append(max(h_tol, o_tol))
        self._hook_proj, self._ours_proj = {}, {}
        table = torch.stack(stacked).tolist()  # the one host sync
        for (_, pid), (h_proj, o_proj, h_norm_sq, o_sq), tol in zip(keys, table, tols):
            if pid in self._runtime_reasons:
                continue
            if not all(math.isfinite(v) for v in (h_proj, o_proj, h_norm_sq, o_sq)):
                continue  # AMP overflow step: nothing to compare
            scale = math.sqrt(h_norm_sq) + math.sqrt(max(o_sq, 0.0))
            if abs(h_proj - o_proj) > tol * scale + 1e-30:
                self._runtime_reasons[pid] = (
                    "its gradient differs from what its module's rule saw (projection "
                    f"{h_proj:.4g} vs {o_proj:.4g}): the parameter is also used outside its "
                    "module, or its gradient is modified by a hook"
                )

    # ------------------------------------------------------------------ helpers
    def _break(self, unit: _Unit, reason: str) -> None:
        unit.broken = True
        for c in unit.calls:
            c.release()
        unit.calls = []
        for p in unit.params.values():
            self._runtime_reasons.setdefault(id(p), f"{unit.name!r}: {reason}")
        for h in unit.handles:
            h.remove()
        unit.handles = []
        if unit.patched:
            unit.module.__dict__.pop("forward", None)
            unit.patched = False

    def _remove_hooks(self) -> None:
        for unit in self._units:
            for h in unit.handles:
                h.remove()
            unit.handles = []
            if unit.patched:
                unit.module.__dict__.pop("forward", None)
                unit.patched = False
        self._fused_sinks = {}
        for h in self._param_hooks:
            h.remove()
        self._param_hooks = []

    def _clear_results(self) -> None:
        self._gen = 0
        self._results: dict[int, dict[int, Tensor]] = {}
        self._ours_proj: dict[tuple[int, int], tuple[Tensor, Tensor, float]] = {}
        self._hook_proj: dict[tuple[int, int], tuple[Tensor, Tensor, float]] = {}

