"""Tests for adabatch.noise.microbatch against torch.autograd.grad of each micro-batch's loss."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adabatch.noise.microbatch import MicroBatchGradNorms

F64 = torch.float64


def _mlp(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _data(n=12, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def _oracle(model, loss_fn, batches):
    """|grad of each micro-batch's plain (mean) loss|^2 via torch.autograd.grad on a copy."""
    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters() if p.requires_grad]
    out = []
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(ref, *batch), params, allow_unused=True)
        out.append(sum(g.double().square().sum() for g in grads if g is not None))
    return torch.stack(out)


def _mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize(("dtype", "rtol"), [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_accumulation_matches_oracle(dtype, rtol, scale_kind):
    """3 micro-batches with Lightning-style 1/k loss scaling and an AMP-like factor 1024."""
    model = _mlp(dtype)
    x, y = _data(dtype=dtype)
    batches = list(zip(x.split(4), y.split(4)))
    expected = _oracle(model, _mse, batches)
    k, amp = 3, 1024.0
    scale = 1 / k * amp
    grad_scale = torch.tensor(scale, dtype=dtype) if scale_kind == "tensor" else scale
    with MicroBatchGradNorms(model, grad_scale=grad_scale) as probe:
        for xb, yb in batches:
            (_mse(model, xb, yb) * scale).backward()
        got = probe.sq_norms
    assert got.dtype == dtype and got.device == x.device and got.shape == (3,)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=0)
    # the hooks do not change what is accumulated into .grad
    ref = copy.deepcopy(_mlp(dtype))
    for xb, yb in batches:
        (_mse(ref, xb, yb) * scale).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_tied_parameter():
    """A weight used twice in one forward (tied embedding / head): one summed gradient."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6, dtype=F64)
            self.mid = nn.Linear(6, 6, dtype=F64)

        def forward(self, ids):
            h = torch.tanh(self.mid(self.emb(ids)))
            return h @ self.emb.weight.T  # head tied to the embedding

    torch.manual_seed(0)
    model = Tied()
    ids = torch.randint(0, 11, (6, 4))
    targets = torch.randint(0, 11, (6, 4))
    loss_fn = lambda m, i, t: nn.functional.cross_entropy(m(i).reshape(-1, 11), t.reshape(-1))
    batches = list(zip(ids.split(2), targets.split(2)))
    expected = _oracle(model, loss_fn, batches)
    with MicroBatchGradNorms(model) as probe:
        for i, t in batches:
            loss_fn(model, i, t).backward()
    torch.testing.assert_close(probe.sq_norms, expected, rtol=1e-12, atol=0)


class _Routed(nn.Module):
    """Shared trunk + two experts; the expert used depends on the call (conditional graph)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(5, 4, dtype=F64)
        self.experts = nn.ModuleList([nn.Linear(4, 3, dtype=F64) for _ in range(2)])
        self.unused = nn.Linear(2, 2, dtype=F64)
        self.route = 0

    def forward(self, x):
        return self.experts[self.route](torch.relu(self.trunk(x)))


def test_parameters_without_grad_and_changing_graphs():
    torch.manual_seed(0)
    model = _Routed()
    x, y = _data(n=9)
    batches = list(zip(x.split(3), y.split(3)))
    routes = [0, 1, 1]

    def loss_fn(m, xb, yb):
        return _mse(m, xb, yb)

    expected = []
    for r, batch in zip(routes, batches):
        model.route = r
        expected.append(_oracle(model, loss_fn, [batch])[0])
    with MicroBatchGradNorms(model) as probe:
        for r, (xb, yb) in zip(routes, batches):
            model.route = r
            _mse(model, xb, yb).backward()
        got = probe.sq_norms
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-12, atol=0)
    # a backward that reaches only an expert (trunk frozen in this pass) is still one value
    with MicroBatchGradNorms(model) as probe:
        h = torch.relu(model.trunk(x)).detach()
        model.experts[1](h).square().mean().backward()
        model.experts[0](h).square().mean().backward()
    assert probe.num_backwards == 2


def test_frozen_params_and_param_list():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    probe = MicroBatchGradNorms(model)
    assert len(probe.params) == 3
    ps = [model[2].weight, model[2].weight, model[2].bias]
    assert len(MicroBatchGradNorms(ps).params) == 2
    x, y = _data(n=4)
    with MicroBatchGradNorms(ps) as probe:
        _mse(model, x, y).backward()
    expected = model[2].weight.grad.square().sum() + model[2].bias.grad.square().sum()
    torch.testing.assert_close(probe.sq_norms, expected.reshape(1), rtol=1e-12, atol=0)


def test_non_reentrant_checkpoint_is_one_pass():
    model = _mlp()
    x, y = _data(n=4)
    expected = _oracle(model, _mse, [(x, y)])

    with MicroBatchGradNorms(model) as probe, warnings.catch_warnings():
        warnings.simplefilter("error")  # no nested-pass warning
        h = checkpoint(lambda t: torch.tanh(model[0](t)), x, use_reentrant=False)
        nn.functional.mse_loss(model[2](h), y).backward()
    torch.testing.assert_close(probe.sq_norms, expected, rtol=1e-12, atol=0)


def test_reentrant_checkpoint_merged_when_outer_opens_first():
    model = _mlp()
    x, y = _data(n=4)
    x = x.requires_grad_(True)  # reentrant checkpoint needs an input that requires grad
    expected = _oracle(model, _mse, [(x.detach(), y)])
    with MicroBatchGradNorms(model) as probe, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h = checkpoint(lambda t: torch.tanh(model[0](t)), x, use_reentrant=True)
        nn.functional.mse_loss(model[2](h), y).backward()  # head (outer) fires first
    assert any("reentrant" in str(m.message) for m in w)
    torch.testing.assert_close(probe.sq_norms, expected, rtol=1e-12, atol=0)


def test_context_manager_removes_hooks_on_exception_and_attach_idempotent():
    model = _mlp()
    x, y = _data(n=4)
    probe = MicroBatchGradNorms(model)
    with pytest.raises(RuntimeError, match="boom"), probe:
        assert probe.attached
        raise RuntimeError("boom")
    assert not probe.attached
    _mse(model, x, y).backward()
    assert probe.num_backwards == 0  # nothing recorded while detached
    probe.attach()
    probe.attach()  # no duplicate hooks
    _mse(model, x, y).backward()
    expected = _oracle(model, _mse, [(x, y)])
    torch.testing.assert_close(probe.sq_norms, expected, rtol=1e-12, atol=0)
    probe.detach()
    probe.detach()
    assert repr(probe).startswith("MicroBatchGradNorms(params=4")


class _Explode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward failed")


def test_failed_backward_is_dropped():
    model = _mlp()
    x, y = _data(n=4)
    with MicroBatchGradNorms(model) as probe:
        # the head's params get their grads, then the backward raises before the trunk
        h = _Explode.apply(torch.tanh(model[0](x)))
        with pytest.raises(RuntimeError, match="backward failed"):
            nn.functional.mse_loss(model[2](h), y).backward()
        assert probe.sq_norms.numel() == 0  # the partial value is not reported
        probe.reset()
        _mse(model, x, y).backward()
        torch.testing.assert_close(probe.sq_norms, _oracle(model, _mse, [(x, y)]),
                                   rtol=1e-12, atol=0)


def test_autograd_grad_counts_and_reset():
    model = _mlp()
    x, y = _data(n=4)
    with MicroBatchGradNorms(model) as probe:
        grads = torch.autograd.grad(_mse(model, x, y), list(model.parameters()))
        assert probe.num_backwards == 1
        torch.testing.assert_close(probe.sq_norms[0], sum(g.square().sum() for g in grads))
        probe.reset()
        assert probe.sq_norms.shape == (0,) and probe.sq_norms.dtype == F64


def test_grad_scale_setter_applies_at_end_of_backward():
    model = _mlp()
    x, y = _data(n=4)
    expected = _oracle(model, _mse, [(x, y)])[0]
    with MicroBatchGradNorms(model) as probe:
        probe.grad_scale = 2.0
        (2.0 * _mse(model, x, y)).backward()
        probe.grad_scale = 0.5
        (0.5 * _mse(model, x, y)).backward()
    torch.testing.assert_close(probe.sq_norms, expected.repeat(2), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(grad_scale=0), "grad_scale=0 must be a finite number > 0"),
     (dict(grad_scale=-1.0), "grad_scale=-1.0"),
     (dict(grad_scale=float("nan")), "grad_scale=nan"),
     (dict(grad_scale=float("inf")), "grad_scale=inf"),
     (dict(grad_scale="x"), "grad_scale='x'"),
     (dict(grad_scale=torch.ones(2)), "grad_scale must be a scalar")],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MicroBatchGradNorms(_mlp(), **kwargs)


def test_validation_params():
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        MicroBatchGradNorms(frozen)
    leaf = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"shape \(3,\) is not a leaf"):
        MicroBatchGradNorms([leaf * 2])
    with pytest.raises(ValueError, match="must hold tensors, got int"):
        MicroBatchGradNorms([1, 2])


def test_public_export():
    import adabatch

    assert adabatch.MicroBatchGradNorms is MicroBatchGradNorms
