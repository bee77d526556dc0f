"""Apply the scaling rules to a torch optimizer around ``optimizer.step`` only.

The factors are multiplied into each param group just before the update and taken out right
after it, so a user's LR scheduler (which runs after ``optimizer.step``) only ever sees and
writes its own values. Writing the factors permanently fights chainable schedulers:
``ExponentialLR`` multiplies the group's current lr, so a permanent x5 compounds to
1, 5, 25, 125 (measured, docs/DESIGN.md).

In a Lightning callback::

    on_before_optimizer_step:  scaler.apply(kappa, gain)   # inside optimizer.step's closure
    (the update runs with the scaled values)
    step post-hook:            scaler.restore()            # registered by OptimizerScaler
    on_train_batch_start:      scaler.restore()            # defensive: an AMP-skipped step
                                                           # skips the post-hook

No Lightning import here: only torch optimizer hooks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import SGD, Adam, Adamax, AdamW, NAdam, Optimizer, RAdam

from adabatch.control import rules

__all__ = ["ADAM_FAMILY", "SGD_FAMILY", "OptimizerScaler", "optimizer_family"]

#: Optimizers whose learning rate follows the linear rule. Only torch's SGD: its update is
#: ``lr * (momentum-filtered gradient)``, for which Goyal et al. 2017 verified linear scaling
#: with a fixed momentum. Subclasses are included (``isinstance``).
SGD_FAMILY: tuple[type[Optimizer], ...] = (SGD,)

#: Optimizers with Adam's ``(lr, betas, eps)`` semantics: square-root rule for lr, betas to
#: the power kappa, eps over sqrt(kappa). ``AdamW`` subclasses ``Adam`` in recent torch; it is
#: listed for older versions.
ADAM_FAMILY: tuple[type[Optimizer], ...] = (Adam, AdamW, NAdam, RAdam, Adamax)

#: ``lr_rule="auto"``: the AdaScale gain (SGD) or its square root (Adam family). The gain
#: ``r = (tr(Sigma)/B_ref + |G|^2) / (tr(Sigma)/B + |G|^2)`` equals the linear rule's kappa
#: while the gradient is all noise and saturates at ``1 + B_noise / B_ref`` as the batch
#: passes the noise scale: the linear rule alone overshot there (tuned fixed LRs at
#: B = 512-1024 were 4x below it, and a linear ramp diverged, on a user's MLP).
_AUTO_RULE = {"sgd": "adascale", "adam": "adascale_sqrt"}
#: ``lr_rule="kappa"``: the unsaturated rules of kappa alone.
_KAPPA_RULE = {"sgd": "linear", "adam": "sqrt"}


def optimizer_family(optimizer: Optimizer) -> str | None:
    """``"sgd"``, ``"adam"`` or ``None`` (not known), from the optimizer's class.

    Example::

        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> optimizer_family(torch.optim.AdamW(p)), optimizer_family(torch.optim.SGD(p, lr=1))
        ('adam', 'sgd')
        >>> optimizer_family(torch.optim.Adagrad(p)) is None
        True
    """
    if isinstance(optimizer, SGD_FAMILY):
        return "sgd"
    if isinstance(optimizer, ADAM_FAMILY):
        return "adam"
    return None


class OptimizerScaler:
    """Scales an optimizer's hyperparameters by ``kappa = B / B_ref`` around its step.

    ``apply(kappa)`` multiplies each param group's lr by the rule's factor and sets betas,
    eps and (decoupled) weight decay from the values found in the group *at apply time*, so a
    scheduler that changed them between steps keeps its own trajectory (``OneCycleLR`` cycles
    lr and Adam's beta1 / SGD's momentum). The values found are remembered and
    :meth:`restore` puts the very same objects back. A step post-hook registered on the
    optimizer calls :meth:`restore` right after ``optimizer.step``; :meth:`close` removes it.

    What is scaled, by optimizer family (``isinstance``, so subclasses count):

    - SGD: lr (the AdaScale gain for ``lr_rule="auto"``: the linear rule, saturated by the
      measured noise; ``"kappa"`` for the plain linear rule). Momentum is kept (Goyal et al. 2017).
      Weight decay is L2 inside the gradient, so the decay per step is ``lr * wd``: it
      already follows the lr, and under the linear rule the decay per sample is unchanged.
    - Adam family (Adam, AdamW, NAdam, RAdam, Adamax): lr (``sqrt(gain)`` for ``"auto"``,
      ``sqrt(kappa)`` for ``"kappa"``),
      ``betas -> beta ** kappa``, ``eps -> eps / sqrt(kappa)``, and weight decay by
      ``kappa / lr_factor`` (Power Lines) *only* where it is decoupled (AdamW, or a group
      with ``decoupled_weight_decay=True``). Adam's L2 decay passes through the adaptive
      normalisation, so it has no timescale ``B / (lr * wd)`` to keep; it is left alone.
    - Any other optimizer: lr only, and only with an explicit ``lr_rule``. Betas, eps and
      weight decay are skipped (their meaning is not known).

    Not scaled: NAdam's ``momentum_decay`` schedule and RAdam's rectification, both
    counted in steps.

    Args:
        optimizer: a plain torch optimizer (Lightning's wrapper: pass ``.optimizer``).
        lr_rule: ``"auto"`` (saturating: AdaScale gain for SGD, sqrt(gain) for the Adam
            family; ``apply`` then reads ``gain``, and without one keeps the lr), ``"kappa"``
            (linear for SGD, sqrt for the Adam family), ``"adascale"`` (the same as
            ``"auto"``, by name), or any name in :data:`adabatch.control.rules.LR_RULES`.
        scale_betas: scale Adam's betas.
        scale_eps: scale Adam's eps.
        scale_weight_decay: scale decoupled weight decay.
        max_lr_factor: a hard cap on the lr factor (``None``: none).

    Raises:
        ValueError: on an unknown ``lr_rule``, ``max_lr_factor < 1``, or a rule that needs
            the family (``"auto"``, ``"adascale"``, ``"kappa"``) with an optimizer of
            unknown family.

    Example::

        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        >>> scaler = OptimizerScaler(opt, lr_rule="kappa")
        >>> info = scaler.apply(4.0)           # e.g. in on_before_optimizer_step
        >>> opt.param_groups[0]["lr"], info["lr_factor"], info["weight_decay_factor"]
        (0.002, 2.0, 2.0)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step()                         # the post-hook restores
        >>> opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
        (0.001, (0.9, 0.999))
        >>> scaler.close()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_rule: str = "auto",
        scale_betas: bool = True,
        scale_eps: bool = True,
        scale_weight_decay: bool = True,
        max_lr_factor: float | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(
                f"optimizer={type(optimizer).__name__} is not a torch.optim.Optimizer "
                "(with Lightning, pass the wrapped one: lightning_optimizer.optimizer)"
            )
        valid = ("auto", "kappa", *rules.LR_RULES)
        if lr_rule not in valid:
            raise ValueError(f"lr_rule={lr_rule!r} is not one of {list(valid)}")
        if max_lr_factor is not None and (
            isinstance(max_lr_factor, bool)
            or not isinstance(max_lr_factor, (int, float))
            or not math.isfinite(max_lr_factor)
            or max_lr_factor < 1
        ):
            raise ValueError(f"max_lr_factor={max_lr_factor!r} must be a finite number >= 1")
        self.max_lr_factor = None if max_lr_factor is None else float(max_lr_factor)
        self.optimizer = optimizer
        self.family = optimizer_family(optimizer)
        if lr_rule in ("auto", "adascale", "kappa"):
            if self.family is None:
                raise ValueError(
                    f"lr_rule={lr_rule!r} needs a known optimizer family, but "
                    f"{type(optimizer).__name__} is neither SGD-like "
                    f"({', '.join(c.__name__ for c in SGD_FAMILY)}) nor Adam-like "
                    f"({', '.join(c.__name__ for c in ADAM_FAMILY)}); pass an explicit "
                    f"lr_rule, one of {list(rules.LR_RULES)}"
                )
            table = _KAPPA_RULE if lr_rule == "kappa" else _AUTO_RULE
            lr_rule = table[self.family]
        self.lr_rule = lr_rule
        adam = self.family == "adam"
        self.scale_betas = bool(scale_betas) and adam
        self.scale_eps = bool(scale_eps) and adam
        self.scale_weight_decay = bool(scale_weight_decay) and adam
        self._saved: list[dict[str, Any]] | None = None
        self._handle = optimizer.register_step_post_hook(self._post_step)

    @property
    def needs_gain(self) -> bool:
        """Whether :meth:`apply` uses the AdaScale gain (the noise statistics)."""
        return self.lr_rule in ("adascale", "adascale_sqrt")

    @property
    def applied(self) -> bool:
        """Whether scaled values are in the optimizer now."""
        return self._saved is not None

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return isinstance(self.optimizer, AdamW) or bool(group.get("decoupled_weight_decay"))

    def apply(self, kappa: float, gain: float | None = None) -> dict[str, float]:
        """Scale every param group for ``kappa = B / B_ref``; returns what was set.

        Each group is scaled from its own current values. Calling ``apply`` while already
        applied first restores (never compounds).

        Args:
            kappa: ``B / B_ref``, finite and > 0.
            gain: the AdaScale gain (:func:`adabatch.control.rules.adascale_gain`), used by
                the AdaScale rules. ``None`` there means "no statistics yet" and counts as
                ``1.0`` (no lr change), like the guard in ``adascale_gain``: a missing
                estimate must not stop training.

        Returns:
            ``kappa``, ``lr_factor`` and the first group's scaled ``lr``; with betas scaled
            ``beta1``/``beta2`` (first group, scaled), with eps scaled ``eps_factor``, with
            decoupled weight decay in some group ``weight_decay_factor``.

        Raises:
            ValueError: on a bad ``kappa`` or a non-finite / non-positive ``gain`` (see
                :func:`adabatch.control.rules.lr_factor`).
        """
        self.restore()
        if gain is None and self.lr_rule in ("adascale", "adascale_sqrt"):
            gain = 1.0
        lr_f = rules.lr_factor(kappa, self.lr_rule, gain)
        if self.max_lr_factor is not None:
            lr_f = min(lr_f, self.max_lr_factor)
        kappa = float(kappa)
        eps_f = 1.0 / math.sqrt(kappa)
        wd_f = rules.weight_decay_factor(kappa, lr_f)
        info: dict[str, float] = {"kappa": kappa, "lr_factor": lr_f}
        saved: list[dict[str, Any]] = []
        # compute everything first, then write: a ValueError leaves the optimizer untouched
        updates: list[dict[str, Any]] = []
        for group in self.optimizer.param_groups:
            old: dict[str, Any] = {"lr": group["lr"]}
            new: dict[str, Any] = {"lr": group["lr"] * lr_f}
            if self.scale_betas and "betas" in group:
                old["betas"] = group["betas"]
                new["betas"] = _as_type(group["betas"], rules.scale_betas(group["betas"], kappa))
            if self.scale_eps and "eps" in group and group["eps"] is not None:
                old["eps"] = group["eps"]
                new["eps"] = rules.scale_eps(group["eps"], kappa)
            if self.scale_weight_decay and self._decoupled(group) and "weight_decay" in group:
                old["weight_decay"] = group["weight_decay"]
                new["weight_decay"] = group["weight_decay"] * wd_f
                info["weight_decay_factor"] = wd_f
            saved.append(old)
            updates.append(new)
        for group, new in zip(self.optimizer.param_groups, updates):
            group.update(new)
        self._saved = saved
        if updates:
            info["lr"] = float(updates[0]["lr"])
            if "betas" in updates[0]:
                for i, beta in enumerate(updates[0]["betas"][:2]):
                    info[f"beta{i + 1}"] = float(beta)
        if self.scale_eps:
            info["eps_factor"] = eps_f
        return info

    def restore(self) -> None:
        """Put back the exact values found by the last :meth:`apply`.

        Idempotent, and a no-op when nothing is applied. Param groups added after
        :meth:`apply` are left as they are.
        """
        saved, self._saved = self._saved, None
        if saved is None:
            return
        for group, old in zip(self.optimizer.param_groups, saved):
            group.update(old)

    def close(self) -> None:
        """Restore and remove the step post-hook. Idempotent."""
        self.restore()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.optimizer).__name__}, lr_rule={self.lr_rule!r}, "
            f"scale_betas={self.scale_betas}, scale_eps={self.scale_eps}, "
            f"scale_weight_decay={self.scale_weight_decay})"
        )


def _as_type(like: Any, values: tuple[float, ...]) -> Any:
    """Keep the container type of ``betas`` (tuple or list); tensors stay tensors."""
    out = [
        torch.as_tensor(v, dtype=b.dtype, device=b.device) if isinstance(b, torch.Tensor) else v
        for b, v in zip(like, values)
    ]
    return list(out) if isinstance(like, list) else tuple(out)
