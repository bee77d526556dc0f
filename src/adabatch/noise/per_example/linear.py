"""nn.Linear: ghost or materialised norms, or the simultaneous autograd Function.

Any input rank, middle dims flattened to T: ghost norm ``<XX^T, GG^T>`` (~2T^2(i+o) flops, T^2
memory) or materialised ``G^T X`` (~2T*i*o flops, i*o memory), the cheaper per call; bias
``|sum_t g_t|^2``. Where neither is cheap relative to the layer, the layer's forward is swapped
while attached for an ``autograd.Function`` that computes dW from the per-example products and
the norms in the same pass (Gray et al. 2024's simultaneous method).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch import kernels
from adabatch.noise.per_example.base import (
    _acc_dtype,
    _cat_t,
    _first_arg,
    _proj_dense,
    _Refused,
    _Rule,
)

if TYPE_CHECKING:
    from adabatch.noise.per_example.base import _Call, _Unit
    from adabatch.noise.per_example.probe import PerExampleGradNorms


class _LinearRule(_Rule):
    kind = "linear"
    stock = (nn.Linear,)

    def capture(self, module, args, kwargs, where):
        x = _first_arg(args, kwargs, "input")
        if x.dim() < 2:
            raise _Refused(f"unbatched input of shape {tuple(x.shape)}: no batch dim")
        d = where.pick(x.shape[:-1])
        return {"x": x if d == 0 else x.movedim(d, 0)}, x.shape[d], d

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

