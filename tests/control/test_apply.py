"""OptimizerScaler: factors around optimizer.step only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.optim import lr_scheduler

from adabatch.control.apply import OptimizerScaler, optimizer_family
from adabatch.control.rules import lr_factor

KAPPAS = [1.0, 2.0, 4.0, 0.5, 3.0, 8.0]


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return model.double()


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(
        8, 2, generator=g, dtype=torch.float64
    )


def _step(opt, model, step, scaler=None, kappa=1.0, gain=None):
    """One optimizer step in Lightning's order: apply inside the closure, after backward."""
    x, y = _data(step)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if scaler is not None:
            scaler.apply(kappa, gain)  # on_before_optimizer_step
        return loss

    opt.step(closure)


def _groups(model, **second):
    """Two param groups: the second with its own hyperparameters."""
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), **second}]


_HP = ("lr", "momentum", "betas", "eps", "weight_decay")


def _snapshot(opt):
    return [{k: g[k] for k in _HP if k in g} for g in opt.param_groups]


# --------------------------------------------------------------------------- schedulers

SCHEDULERS = {
    "lambda": lambda opt: lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s)),
    "exponential": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.7),
    "cosine": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=1e-4),
    "onecycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=12),
}

OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(_groups(m, lr=0.02), lr=0.05, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(_groups(m, lr=0.002, betas=(0.8, 0.99)), lr=0.001),
    "adamw": lambda m: torch.optim.AdamW(_groups(m, weight_decay=0.3), lr=0.001),
}


def _run_scheduled(opt_name, sched_name, use_scaler, steps=12):
    model = _model()
    opt = OPTIMIZERS[opt_name](model)
    in_step: list = []
    # registered before the scaler's hook, so it sees the values the update used
    opt.register_step_post_hook(lambda o, a, k: in_step.append(_snapshot(o)))
    scaler = OptimizerScaler(opt, lr_rule="kappa") if use_scaler else None
    sched = SCHEDULERS[sched_name](opt)
    before, after, last_lr = [], [], []
    for t in range(steps):
        before.append(_snapshot(opt))
        _step(opt, model, t, scaler, KAPPAS[t % len(KAPPAS)])
        sched.step()
        after.append(_snapshot(opt))
        last_lr.append(sched.get_last_lr())
    return before, in_step, after, last_lr, scaler


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_scheduler_trajectory_untouched_and_step_sees_scaled(opt_name, sched_name):
    ref_before, _, ref_after, ref_last, _ = _run_scheduled(opt_name, sched_name, False)
    before, in_step, after, last, scaler = _run_scheduled(opt_name, sched_name, True)
    # the scheduler's trajectory (lr, and momentum/betas that OneCycleLR cycles) is identical
    assert after == ref_after
    assert last == ref_last
    assert before == ref_before
    # inside the step: the group's own scheduled values, scaled
    adam = opt_name != "sgd"
    for t, (sched_vals, used) in enumerate(zip(before, in_step)):
        kappa = KAPPAS[t % len(KAPPAS)]
        f = lr_factor(kappa, "sqrt" if adam else "linear")
        for g_sched, g_used in zip(sched_vals, used):
            assert g_used["lr"] == pytest.approx(g_sched["lr"] * f, rel=1e-14)
            if adam:
                b1, b2 = g_sched["betas"]
                assert g_used["betas"] == pytest.approx((b1**kappa, b2**kappa), rel=1e-14)
                assert g_used["eps"] == pytest.approx(g_sched["eps"] / math.sqrt(kappa))
            else:
                assert g_used["momentum"] == g_sched["momentum"]  # momentum kept
            if opt_name == "adamw":
                assert g_used["weight_decay"] == pytest.approx(
                    g_sched["weight_decay"] * kappa / f, rel=1e-14
                )
            else:
                assert g_used["weight_decay"] == g_sched["weight_decay"]
    assert not scaler.applied


def test_onecycle_cycles_adam_beta1():
    # sanity for the test above: OneCycleLR really moves betas, so the check is not vacuous
    _, _, after, _, _ = _run_scheduled("adam", "onecycle", False)
    assert len({a[0]["betas"][0] for a in after}) > 3


def test_user_pre_hook_sees_unscaled_values():
    # torch's step pre-hooks run before the closure, i.e. before on_before_optimizer_step
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    _step(opt, model, 0, scaler, 4.0)
    assert seen == [0.1]


# --------------------------------------------------------------------------- updates


@pytest.mark.parametrize("kappa", [0.5, 4.0])
def test_sgd_update_is_lr_times_kappa_by_hand(kappa):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    x, y = _data(0)
    p0 = [p.detach().clone() for p in model.parameters()]
    loss = ((model(x) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    _step(opt, model, 0, scaler, kappa)
    for p, q, g in zip(model.parameters(), p0, grads):
        torch.testing.assert_close(p.detach(), q - 0.1 * kappa * g, rtol=0, atol=1e-15)
    assert opt.param_groups[0]["lr"] == 0.1


REFERENCES = {
    # optimizer made by the scaler at kappa vs the hand-scaled optimizer
    "sgd": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda m, k: torch.optim.SGD(m.parameters(), lr=0.05 * k, momentum=0.9, weight_decay=0.01),
    ),
    "adam": (
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.01),
        lambda m, k: torch.optim.Adam(
            m.parameters(), lr=1e-2 * k**0.5, betas=(0.9**k, 0.999**k), eps=1e-8 / k**0.5,
            weight_decay=0.01,  # L2: not scaled
        ),
    ),
    "adamw": (
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
        lambda m, k: torch.optim.AdamW(
            m.parameters(), lr=1e-2 * k**0.5, betas=(0.9**k, 0.999**k), eps=1e-8 / k**0.5,
            weight_decay=0.1 * k**0.5,
        ),
    ),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_parameter_trajectory_equals_hand_scaled_optimizer(name):
    make, make_ref = REFERENCES[name]
    kappa = 4.0
    model = _model()
    ref = copy.deepcopy(model)
    opt, opt_ref = make(model), make_ref(ref, kappa)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    for t in range(5):
        _step(opt, model, t, scaler, kappa)
        _step(opt_ref, ref, t)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _decay_after(samples, batch, ref_batch, scale):
    """AdamW with zero gradients: only the decoupled decay acts. Returns p / p0."""
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1)
    scaler = OptimizerScaler(opt, lr_rule="kappa", scale_weight_decay=scale)
    for _ in range(samples // batch):
        p.grad = torch.zeros_like(p)
        scaler.apply(batch / ref_batch)
        opt.step()
    return p.item()


def test_adamw_weight_decay_timescale_in_samples_preserved():
    ref = _decay_after(6400, 64, 64, True)  # 100 steps at B_ref
    scaled = _decay_after(6400, 256, 64, True)  # 25 steps at 4 B_ref
    assert math.log(scaled) == pytest.approx(math.log(ref), rel=1e-3)
    unscaled = _decay_after(6400, 256, 64, False)  # wd fixed: lr*wd only x sqrt(4)
    assert math.log(unscaled) == pytest.approx(math.log(ref) / 2, rel=1e-3)


# --------------------------------------------------------------------------- groups & state


def test_each_group_scaled_from_its_own_values_and_restored_exactly():
    model = _model()
    opt = torch.optim.AdamW(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 0.5, "betas": (0.5, 0.9), "eps": 1e-3,
             "weight_decay": 0.0},
        ],
        lr=0.01, weight_decay=0.2,
    )
    original = _snapshot(opt)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    info = scaler.apply(4.0)
    g0, g1 = opt.param_groups
    assert (g0["lr"], g1["lr"]) == (0.02, 1.0)
    assert g0["betas"] == pytest.approx((0.9**4, 0.999**4))
    assert g1["betas"] == pytest.approx((0.5**4, 0.9**4))
    assert (g0["eps"], g1["eps"]) == pytest.approx((5e-9, 5e-4))
    assert (g0["weight_decay"], g1["weight_decay"]) == pytest.approx((0.4, 0.0))
    assert info == pytest.approx({"kappa": 4.0, "lr_factor": 2.0, "lr": 0.02, "beta1": 0.9**4,
                                  "beta2": 0.999**4, "eps_factor": 0.5,
                                  "weight_decay_factor": 2.0})
    scaler.restore()
    assert _snapshot(opt) == original
    assert all(type(g["betas"]) is tuple for g in opt.param_groups)


def test_restore_idempotent_and_safe_without_apply():
    opt = torch.optim.Adam(_model().parameters(), lr=0.01)
    original = _snapshot(opt)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    scaler.restore()
    assert _snapshot(opt) == original
    scaler.apply(2.0)
    scaler.restore()
    scaler.restore()
    assert _snapshot(opt) == original


def test_skipped_step_restored_defensively_and_apply_never_compounds():
    # AMP skips optimizer.step on inf grads: the post-hook does not fire
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    scaler.apply(4.0)
    scaler.apply(4.0)  # again, without a step in between: from the original values
    assert opt.param_groups[0]["lr"] == 0.4
    scaler.restore()  # next on_train_batch_start
    assert opt.param_groups[0]["lr"] == 0.1 and not scaler.applied


def test_bad_kappa_leaves_optimizer_untouched():
    opt = torch.optim.Adam(_model().parameters(), lr=0.01)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    for kappa in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="kappa="):
            scaler.apply(kappa)
        assert opt.param_groups[0]["lr"] == 0.01 and not scaler.applied


def test_close_removes_hook():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    scaler.close()
    scaler.close()
    scaler.apply(2.0)
    _step(opt, model, 0)
    assert opt.param_groups[0]["lr"] == 0.2  # no hook: still scaled
    scaler.restore()
    assert opt.param_groups[0]["lr"] == 0.1


def test_tensor_lr_restored_as_same_object():
    p = torch.nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.01)
    opt = torch.optim.Adam([p], lr=lr, foreach=False)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    p.grad = torch.ones(3)
    info = scaler.apply(4.0)
    assert info["lr"] == pytest.approx(0.02)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)


# --------------------------------------------------------------------------- families & rules


class MyAdamW(torch.optim.AdamW):
    pass


class Custom(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr, "betas": (0.9, 0.99), "eps": 1e-8})

    def step(self, closure=None):
        return None


@pytest.mark.parametrize(
    ("make", "family", "rule"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), "sgd", "linear"),
        (lambda p: torch.optim.Adam(p), "adam", "sqrt"),
        (lambda p: torch.optim.AdamW(p), "adam", "sqrt"),
        (lambda p: torch.optim.NAdam(p), "adam", "sqrt"),
        (lambda p: torch.optim.RAdam(p), "adam", "sqrt"),
        (lambda p: torch.optim.Adamax(p), "adam", "sqrt"),
        (lambda p: MyAdamW(p), "adam", "sqrt"),
    ],
)
def test_auto_rule_by_family(make, family, rule):
    opt = make(_model().parameters())
    assert optimizer_family(opt) == family
    assert OptimizerScaler(opt, lr_rule="kappa").lr_rule == rule
    saturating = {"linear": "adascale", "sqrt": "adascale_sqrt"}[rule]
    assert OptimizerScaler(opt).lr_rule == saturating  # the default, "auto"


def test_auto_rule_saturates_at_the_measured_noise_scale():
    # B_noise = tr(Sigma)/|G|^2 = 64, B_ref = 8: the linear rule would give kappa = 128 at
    # B = 1024; the gain saturates at 1 + B_noise / B_ref = 9.
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    scaler = OptimizerScaler(opt)
    from adabatch.control.rules import adascale_gain

    gain = adascale_gain(trace_sigma=64.0, grad_sq=1.0, batch_size=1024, ref_batch_size=8)
    assert 8.4 < gain < 9.0
    assert scaler.apply(128.0, gain=gain)["lr_factor"] == pytest.approx(gain)
    scaler.restore()
    assert scaler.apply(128.0)["lr_factor"] == 1.0  # no statistics: the tuned lr
    scaler.close()
    capped = OptimizerScaler(opt, lr_rule="kappa", max_lr_factor=4.0)
    assert capped.apply(128.0)["lr_factor"] == 4.0
    capped.close()
    with pytest.raises(ValueError, match="max_lr_factor=0.5"):
        OptimizerScaler(opt, max_lr_factor=0.5)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda p: torch.optim.Adagrad(p), "Adagrad"),
        (lambda p: torch.optim.LBFGS(p), "LBFGS"),
        (lambda p: Custom(p), "Custom"),
    ],
)
@pytest.mark.parametrize("rule", ["auto", "adascale", "kappa"])
def test_unknown_optimizer_error_names_rule_and_class(make, name, rule):
    opt = make(_model().parameters())
    with pytest.raises(ValueError, match=rf"lr_rule='{rule}'.*{name}.*explicit lr_rule"):
        OptimizerScaler(opt, lr_rule=rule)


def test_unknown_optimizer_with_explicit_rule_scales_lr_only():
    opt = Custom(_model().parameters())
    scaler = OptimizerScaler(opt, lr_rule="sqrt")
    info = scaler.apply(4.0)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"]) == (0.2, (0.9, 0.99), 1e-8)
    assert set(info) == {"kappa", "lr_factor", "lr"}


def test_sgd_skips_betas_eps_weight_decay():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    scaler = OptimizerScaler(opt, lr_rule="kappa")
    assert not (scaler.scale_betas or scaler.scale_eps or scaler.scale_weight_decay)
    scaler.apply(4.0)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.4, 0.9, 0.1)


@pytest.mark.parametrize(
    ("make", "scaled"),
    [
        (lambda p: torch.optim.Adam(p, weight_decay=0.1), False),  # L2
        (lambda p: torch.optim.Adam(p, weight_decay=0.1, decoupled_weight_decay=True), True),
        (lambda p: torch.optim.AdamW(p, weight_decay=0.1), True),
        (lambda p: MyAdamW(p, weight_decay=0.1), True),
    ],
)
def test_weight_decay_scaled_only_when_decoupled(make, scaled):
    opt = make(_model().parameters())
    OptimizerScaler(opt, lr_rule="kappa").apply(4.0)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.2 if scaled else 0.1)


def test_switches_off():
    opt = torch.optim.AdamW(_model().parameters(), lr=0.01, weight_decay=0.1)
    OptimizerScaler(opt, lr_rule="kappa", scale_betas=False, scale_eps=False,
                    scale_weight_decay=False).apply(4.0)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (0.02, (0.9, 0.999), 1e-8, 0.1)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: torch.optim.SGD(p, lr=0.1), 0.1 * 2.5),
    (lambda p: torch.optim.Adam(p, lr=0.1), 0.1 * 2.5**0.5),
])
def test_adascale_rule(make, expected):
    opt = make(_model().parameters())
    scaler = OptimizerScaler(opt, lr_rule="adascale")
    scaler.apply(4.0, gain=2.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    scaler.restore()
    scaler.apply(4.0)  # no statistics yet: gain 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    scaler.restore()
    with pytest.raises(ValueError, match="gain=0.0"):
        scaler.apply(4.0, gain=0.0)


def test_constructor_rejects():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr_rule='cubic'"):
        OptimizerScaler(opt, lr_rule="cubic")
    with pytest.raises(ValueError, match="optimizer=Linear"):
        OptimizerScaler(torch.nn.Linear(1, 1))
