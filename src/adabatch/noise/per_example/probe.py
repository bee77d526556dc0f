"""The probe: hooks, pass bookkeeping, run-time verification; the maths is in the rule files."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch.kernels.reference import DEFAULT_CHUNK_ELEMS
from adabatch.noise.per_example.attention import _MultiheadAttentionRule
from adabatch.noise.per_example.base import (
    _LOW_PRECISION,
    _METHODS,
    _REDUCTIONS,
    _acc_dtype,
    _Call,
    _flat_outputs,
    _inside_backward,
    _inside_func_transform,
    _Refused,
    _Rule,
    _Unit,
)
from adabatch.noise.per_example.conv import _ConvRule
from adabatch.noise.per_example.embedding import _EmbeddingRule
from adabatch.noise.per_example.layout import _layout_hint, _Where
from adabatch.noise.per_example.linear import (
    _LinearRule,
    _PatchedLinearForward,
    _simultaneous_pays,
    _SimultaneousLinear,
    _Sink,
)
from adabatch.noise.per_example.norm import _BatchNormRule, _NormRule, _uses_batch_stats

__all__ = ["PerExampleGradNorms"]

_RULES: list[_Rule] = [
    _LinearRule(),
    _ConvRule(),
    _EmbeddingRule(),
    _NormRule(),
    _BatchNormRule(),
    _MultiheadAttentionRule(),
]


def _first_grad(hook: Callable) -> Callable:
    def prehook(grad_outputs: tuple) -> None:
        if grad_outputs and grad_outputs[0] is not None:
            hook(grad_outputs[0])

    return prehook


def _is_compiled(m: nn.Module) -> bool:
    """``torch.compile(m)`` (an OptimizedModule) or ``m.compile()``."""
    dynamo = getattr(torch, "_dynamo", None)
    eval_frame = getattr(dynamo, "eval_frame", None)
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return (optimized is not None and isinstance(m, optimized)) or (
        getattr(m, "_compiled_call_impl", None) is not None
    )


def _rule_for(module: nn.Module) -> _Rule | None:
    for rule in _RULES:
        if isinstance(module, rule.stock):
            return rule
    return None



# -------------------------------------------------------------------------------------- probe
class PerExampleGradNorms:
    """Exact per-example squared gradient norms of a model's parameters, from module hooks.

    After a forward and backward of a loss over B examples, ``sq_norms[b]`` is the squared norm
    of the gradient of example b's own loss with respect to the covered parameters, in
    per-example loss units. Supported layers, their cost and what is refused are described in
    the module docstring; ``covered``/``uncovered`` say which parameters are in the sum.

    Batch dim: with ``batch_size`` set, each call's batch dim is found from its shape (see
    ``batch_size``); unset, dim 0 of every captured tensor is the batch (``batch_first`` for
    ``nn.MultiheadAttention`` and inside stock ``nn.Transformer*`` modules). A module called
    several times in one forward is exact (its calls are concatenated along T). Each forward
    that follows a backward starts a new pass; passes are concatenated in ``sq_norms``. Read
    ``sq_norms`` and call ``reset()`` after a backward, not between a forward and its backward.
    Coverage is decided by ``attach()``: re-attach after changing ``requires_grad``. Memory:
    inputs of supported modules are held from their forward until their output-gradient arrives
    (autograd holds most of them anyway); a module with an output that never receives a gradient
    (e.g. unused attention weights) is finalised lazily, at its next forward or when
    ``sq_norms`` is read.

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
        batch_size: initial value of the ``batch_size`` attribute.

    Attributes:
        batch_size: the coming forward's micro-batch size (see the property), or None.
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
        batch_size: int | None = None,
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
        self.batch_size = batch_size
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
        self._unit_of: dict[int, _Unit] = {}
        self._mixers: list[tuple[str, nn.Module]] = []
        self._coupled: str | None = None
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
    def batch_size(self) -> int | None:
        """The micro-batch size of the coming forward, or None (then dim 0 is the batch).

        Set it before each forward (the callback sets ``extract_batch_size(batch)`` per
        micro-batch): each call's batch dim is then the one leading dim of that size, so
        sequence-first tensors ([T, B, ...]) are measured exactly. Where several dims have that
        size (T == B), the ``batch_first`` flag of the module (``nn.MultiheadAttention``) or of
        the stock ``nn.Transformer*`` module it sits in decides, or the dim resolved on an
        earlier pass; otherwise the module's parameters are refused (``uncovered_reasons``),
        never guessed.
        """
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"batch_size={value!r} must be None or an int >= 1")
        self._batch_size = value

    @property
    def covered(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the parameters in ``sq_norms``."""
        self._evaluate_checks()
        ids = [i for i in self._covered_ids if i not in self._runtime_reasons]
        return [self._names[i] for i in self._ordered(ids)]

    @property
    def coupled(self) -> str | None:
        """Why the examples of a batch are coupled (a train-mode BatchNorm), or None.

        Set at ``attach()`` or at the first forward that normalises with batch statistics;
        from then on every parameter is in ``uncovered`` with this reason and ``sq_norms`` is
        empty: per-example gradients do not exist, micro-batch statistics do.
        """
        return self._coupled

    @property
    def recorded(self) -> int:
        """How many backward passes since attach/``reset()`` gave norms (rows of ``sq_norms``).

        0 after a backward means nothing was measured (e.g. every module ran compiled, or all
        parameters are uncovered): the step must not reach the estimator.
        """
        return len(self._rows())

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
        rows = self._rows()
        if not rows:
            return torch.zeros(0)
        return torch.cat(rows)

    def _rows(self) -> list[Tensor]:
        """One [B] tensor per pass with results on covered parameters."""
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
        return rows

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> PerExampleGradNorms:
        """Decide coverage, register the hooks and start from empty results."""
        if self._attached:
            raise RuntimeError("PerExampleGradNorms is already attached; call detach() first")
        # The batch dims resolved on earlier passes describe the model, not one attachment:
        # keep them across detach()/attach() (a later pass with T == B relies on them).
        memos = {id(unit.module): unit.memo for unit in getattr(self, "_units", [])}
        self._analyse()
        for unit in self._units:
            unit.memo.update(memos.get(id(unit.module), {}))
        self._clear_results()
        self._runtime_reasons, self._coupled, self._unit_of = {}, None, {}
        self._passes, self._saw_grad, self._check_now = 0, False, False
        try:
            for unit in self._units:
                unit.handles.append(
                    unit.module.register_forward_hook(
                        self._make_forward_hook(unit), prepend=True, with_kwargs=True,
                        always_call=unit.rule.taps,
                    )
                )
                if unit.rule.taps:
                    pre = unit.module.register_forward_pre_hook(self._make_pre_hook(unit))
                    unit.handles.append(pre)
            if self.simultaneous:
                for unit in self._units:
                    if isinstance(unit.rule, _LinearRule) and "weight" in unit.params:
                        unit.module.forward = self._make_linear_forward(unit)
                        unit.patched = True
            for unit in self._units:
                for lname, p in unit.params.items():
                    if self.verify:
                        unit.vecs[lname] = self._vecs[id(p)] = self._random_vecs(p)
                    self._unit_of[id(p)] = unit
                    self._param_hooks.append(p.register_hook(self._make_param_hook(id(p))))
            for mname, m in self._mixers:
                if _uses_batch_stats(m):
                    self._set_coupled(mname, m)
                self._param_hooks.append(m.register_forward_hook(self._make_mixer_hook(mname)))
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
        self._mixers = [
            (mname, m) for mname, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        absorbed: set[int] = set()
        for mname, m in model.named_modules():
            if id(m) in absorbed:
                continue
            if _is_compiled(m):
                # Module hooks do not reliably run inside a compiled graph (measured: none of
                # them ran under torch.compile(model)): refuse instead of recording nothing.
                absorbed.update(id(sub) for sub in m.modules())
                for p in m.parameters():
                    if p.requires_grad:
                        self._static_reasons.setdefault(
                            id(p),
                            f"'{mname}' is compiled with torch.compile: module hooks do not "
                            "run inside a compiled graph (use micro-batch statistics)",
                        )
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
                self._units.append(_Unit(mname, m, rule, mine, hint=_layout_hint(model, mname)))
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

    def _make_pre_hook(self, unit: _Unit) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if module is unit.module and not unit.broken and not self._computing:
                if torch.is_grad_enabled() and not _inside_func_transform():
                    unit.tap = unit.rule.start(module)

        return hook

    def _on_forward(self, unit: _Unit, module, args, kwargs, output) -> None:
        tap, unit.tap = unit.tap, None
        if tap is not None:  # (an always_call hook: restored even if the forward raised)
            unit.rule.stop(tap)
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
        unit.last_pass = self._passes
        if unit.calls and unit.calls[0].gen != self._gen:
            self._finalize(unit)
        try:
            reason = unit.rule.refuse_call(module)
            if reason is not None:
                raise _Refused(reason)
            where = _Where(self._batch_size, unit.hint, unit.memo, len(unit.calls))
            extra = {"tap": tap, "output": outs[0]} if unit.rule.taps else {}
            captured, batch, out_bdim = unit.rule.capture(module, args, kwargs, where, **extra)
        except _Refused as exc:
            self._break(unit, str(exc))
            return
        if "_targets" in captured:  # the rule names what receives the output-gradients
            targets, meta = captured.pop("_targets"), captured.pop("_meta")
            if not targets:
                return
        else:
            targets = [outs[j] for j in index]
            meta = [(t.shape, t.dtype, t.device) for t in targets]
        captured = {k: v.detach() if isinstance(v, Tensor) else v for k, v in captured.items()}
        versions = [(v, v._version) for v in captured.values() if isinstance(v, Tensor)]
        call = _Call(
            gen=self._gen,
            batch=batch,
            captured=captured,
            versions=versions,
            out_meta=meta,
            out_index=index,
            out_bdim=out_bdim,
            grads=[None] * len(targets),
            grad_versions=[0] * len(targets),
            check=self._check_now,
        )
        unit.calls.append(call)
        if sink is not None:  # simultaneous Linear: its backward reports the output-grad
            sink.unit, sink.call = unit, call
            return
        for k, t in enumerate(targets):
            hook = self._make_grad_hook(unit, call, k)
            if isinstance(t, Tensor):
                t.register_hook(hook)
            else:  # an autograd node (bias_k's repeat): the gradient at its output
                t.register_prehook(_first_grad(hook))

    def _make_mixer_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._coupled is None and torch.is_grad_enabled() and _uses_batch_stats(module):
                if not _inside_func_transform():
                    self._set_coupled(name, module)

        return hook

    def _set_coupled(self, name: str, module: nn.Module) -> None:
        """A layer mixes the examples of a batch: no parameter has a per-example gradient."""
        self._coupled = (
            f"examples coupled: '{name}' ({type(module).__name__}) normalises with batch "
            "statistics, so every example's gradient depends on the others (use micro-batch "
            "statistics)"
        )
        for pid in self._covered_ids:
            self._runtime_reasons.setdefault(pid, self._coupled)

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
            and self._batch_dim_is_0(unit, input)
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

    def _batch_dim_is_0(self, unit: _Unit, input: Tensor) -> bool:
        """Whether the batch of this Linear call is dim 0 (the simultaneous path's layout)."""
        where = _Where(self._batch_size, unit.hint, dict(unit.memo), len(unit.calls))
        try:
            return where.pick(input.shape[:-1]) == 0
        except _Refused:
            return False  # the forward hook refuses it with the reason

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
        if pid in self._runtime_reasons:
            return
        unit = self._unit_of[pid]
        if unit.last_pass != self._passes and not unit.broken:
            # A gradient with no forward of its module in this pass: the module ran where the
            # hooks do not (compiled after attach()), or the parameter is used outside it.
            self._runtime_reasons[pid] = (
                "its gradient arrived in a pass in which its module's hooks never ran (compiled "
                "with torch.compile after attach(), or used outside its module)"
            )
            return
        if not self._check_now or g.is_sparse:
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
            if c.out_bdim:  # sequence-first: the batch to dim 0, as the rules expect
                c.grads = [g.movedim(c.out_bdim, 0) for g in c.grads]
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

