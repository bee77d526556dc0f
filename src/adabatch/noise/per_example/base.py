"""What every layer rule shares: the call record, the rule interface, small tensor helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from adabatch.noise.per_example.layout import _Where
    from adabatch.noise.per_example.probe import PerExampleGradNorms

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
    out_bdim: int = 0  # batch dim of the outputs (gradients are moved to dim 0)
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


class _Rule:
    """Norm rule of one layer type: what to capture, and the per-parameter maths."""

    kind = "module"
    stock: tuple[type, ...] = ()
    taps = False  # True: start(module) before the forward, stop(tap) after (see attention.py)

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

    def capture(
        self, module: nn.Module, args: tuple, kwargs: dict, where: _Where
    ) -> tuple[dict, int, int]:
        """Tensors to keep (detached, batch moved to dim 0), the batch size, and the batch dim
        of the module's outputs (their gradients are moved the same way); raises `_Refused`."""
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
    hint: int | None = None  # batch dim from an enclosing stock nn.Transformer* module
    memo: dict[int, int] = field(default_factory=dict)  # call index -> resolved batch dim
    last_pass: int | None = None  # the pass of the module's last forward with grad
    tap: Any = None  # the rule's recorder while the module's forward runs (taps rules)

