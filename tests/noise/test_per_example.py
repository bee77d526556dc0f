"""PerExampleGradNorms against torch.func.vmap(grad(...)) with functional_call, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from per_example_oracles import loop_sq_norms, rowwise_sq_norms, vmap_sq_norms
from torch import nn
from torch.func import functional_call, grad, vmap

from adabatch import PerExampleGradNorms
from adabatch.noise import per_example

F64 = torch.float64
RTOL = 1e-6


# ------------------------------------------------------------------------------ oracle
def _mse(out, y):
    """Per-example loss: half the summed squared error of each example ([B])."""
    return 0.5 * (out - y).square().flatten(1).sum(1)


def oracle(model, loss_fn, x, y, names=None):
    """Per-example squared gradient norms over ``names`` (default: all trainable)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if names is not None:
        params = {n: params[n] for n in names}
    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        out = functional_call(model, ({**p}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return sum(v.flatten(1).square().sum(1) for v in g.values())


def probe_norms(model, loss_fn, x, y, reduction="mean", **kw):
    with PerExampleGradNorms(model, loss_reduction=reduction, **kw) as probe:
        per = loss_fn(model(x), y)
        (per.mean() if reduction == "mean" else per.sum()).backward()
    return probe


def check(model, x, y, loss_fn=_mse, expect_uncovered=(), **kw):
    model = model.to(F64)
    x = x.to(F64) if x.is_floating_point() else x
    y = y.to(F64) if y.is_floating_point() else y
    probe = probe_norms(model, loss_fn, x, y, **kw)
    assert sorted(probe.uncovered) == sorted(expect_uncovered), probe.uncovered_reasons
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert probe.covered == [n for n in trainable if n not in expect_uncovered]
    got = probe.sq_norms
    expected = oracle(model, loss_fn, x, y, probe.covered)
    assert got.dtype == F64 and got.shape == (x.shape[0],)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=0)
    return probe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Wrap(nn.Module):
    """A layer followed by tanh, so the loss is not quadratic in the layer's output."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch.tanh(self.layer(x))


# ------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize(
    "shape, bias",
    [((1, 5), True), ((4, 5), False), ((3, 1, 5), True), ((3, 7, 5), True), ((2, 2, 3, 5), True)],
)
def test_linear(shape, bias, method):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    check(Wrap(nn.Linear(5, 3, bias=bias)), x, torch.randn(*shape[:-1], 3), method=method)


def test_linear_called_twice_in_one_forward():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    check(Twice(), torch.randn(3, 2, 4), torch.randn(3, 2, 4))


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv1d(3, 4, 3), (1, 3, 7)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (3, 4, 11)),
        (nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect"), (2, 2, 9)),
        (nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), bias=False), (2, 2, 5, 6)),
        (nn.Conv2d(4, 4, (3, 2), dilation=(1, 2), groups=4, padding_mode="circular",
                   padding=1), (2, 4, 5, 7)),
        (nn.Conv3d(2, 2, 2, stride=(1, 2, 1)), (2, 2, 3, 4, 3)),
    ],
)
def test_conv(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    y = torch.randn_like(conv(x))
    check(Wrap(conv), x, y, max_chunk_elems=50)  # small budget: several example chunks


class EmbedSum(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, ids):
        return torch.tanh(self.emb(ids))


@pytest.mark.parametrize("padding_idx", [None, 0, 2])
@pytest.mark.parametrize("shape", [(1, 1), (4, 9), (3,), (2, 3, 4)])
def test_embedding_repeats_and_padding(padding_idx, shape):
    torch.manual_seed(0)
    emb = nn.Embedding(4, 5, padding_idx=padding_idx)
    ids = torch.randint(0, 4, shape)  # 4 ids over up to 24 positions: many repeats
    check(EmbedSum(emb), ids, torch.randn(*shape, 5))


def test_embedding_scale_grad_by_freq_is_uncovered():
    emb = nn.Embedding(4, 3, scale_grad_by_freq=True)
    probe = PerExampleGradNorms(EmbedSum(emb)).attach()
    assert probe.uncovered == ["emb.weight"]
    assert "scale_grad_by_freq" in probe.uncovered_reasons["emb.weight"]
    probe.detach()


@pytest.mark.parametrize(
    "norm, shape",
    [
        (nn.LayerNorm(5), (3, 5)),
        (nn.LayerNorm(7), (1, 4, 7)),
        (nn.LayerNorm((2, 3)), (2, 4, 2, 3)),
        (nn.LayerNorm(5, bias=False), (2, 3, 5)),
        (nn.RMSNorm(5), (3, 4, 5)),
        (nn.RMSNorm(3, eps=1e-3), (2, 3)),
        (nn.GroupNorm(3, 6), (2, 6, 5)),
        (nn.GroupNorm(2, 4), (3, 4, 3, 3)),
        (nn.GroupNorm(1, 3), (2, 3)),
    ],
)
def test_norm_layers(norm, shape):
    torch.manual_seed(0)
    with torch.no_grad():  # away from the default weight=1, bias=0
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    check(Wrap(norm), torch.randn(*shape), torch.randn(*shape))


class Attn(nn.Module):
    """Calls an nn.MultiheadAttention; masks are derived from x, so each example has its own."""

    def __init__(self, mha, use_weights=False, kpm=False, mask3d=False, **call_kw):
        super().__init__()
        self.mha, self.use_weights, self.call_kw = mha, use_weights, call_kw
        self.kpm, self.mask3d = kpm, mask3d

    def forward(self, x):
        kw = dict(self.call_kw)
        if self.kpm:  # pad where x[..., 0] > 0.3, never the first position
            pad = x[..., 0] > 0.3
            pad[:, 0] = False
            kw["key_padding_mask"] = pad
        if self.mask3d:  # a float mask per (example, head): [B * heads, L, S]
            h = self.mha.num_heads
            m = (x @ x.transpose(1, 2)).detach().tanh()
            kw["attn_mask"] = torch.stack([m * (k + 1) for k in range(h)], 1).flatten(0, 1)
        q = x if self.mha.batch_first else x.transpose(0, 1)
        kv = q[..., : self.mha.kdim] if self.mha.kdim != self.mha.embed_dim else q
        out, w = self.mha(q, kv, kv, **kw)
        out = out if self.mha.batch_first else out.transpose(0, 1)
        if self.use_weights:  # the attention weights enter the loss too
            w = w if w.dim() == 3 else w.mean(1)
            return out + w.mean(-1, keepdim=True)
        return out


B, L = 3, 5


@pytest.mark.parametrize(
    "mha, call_kw",
    [
        (nn.MultiheadAttention(6, 2, batch_first=True), {}),
        (nn.MultiheadAttention(6, 3), {"need_weights": False}),
        (nn.MultiheadAttention(6, 2, batch_first=True), {"use_weights": True}),
        (nn.MultiheadAttention(6, 2, batch_first=True),
         {"use_weights": True, "average_attn_weights": False}),
        (nn.MultiheadAttention(6, 2, batch_first=True, kdim=4, vdim=4), {}),
        (nn.MultiheadAttention(6, 2, add_bias_kv=True, add_zero_attn=True), {}),
        (nn.MultiheadAttention(6, 2, batch_first=True), {"kpm": True}),
        (nn.MultiheadAttention(6, 2), {"kpm": True, "mask3d": True}),
        (nn.MultiheadAttention(6, 2, batch_first=True),
         {"attn_mask": torch.triu(torch.ones(L, L, dtype=torch.bool), 1)}),
        (nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True),
         {"attn_mask": torch.triu(torch.ones(L, L, dtype=torch.bool), 1), "is_causal": True,
          "need_weights": False}),
        (nn.MultiheadAttention(6, 2, batch_first=True),
         {"attn_mask": torch.triu(torch.ones(L, L, dtype=torch.bool), 1), "is_causal": True,
          "kpm": True}),
    ],
)
def test_multihead_attention(mha, call_kw):
    torch.manual_seed(0)
    # a small chunk budget: the examples are processed in several chunks
    check(Attn(mha, **call_kw), torch.randn(B, L, 6), torch.randn(B, L, 6), max_chunk_elems=600)


def test_multihead_attention_called_twice_and_cross_attention():
    torch.manual_seed(0)

    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)

        def forward(self, x):
            h = self.mha(x, x, x, need_weights=False)[0]
            return self.mha(torch.tanh(h), x[:, :3], x[:, :3])[0]  # cross-attention, S != L

    check(TwoCalls(), torch.randn(B, L, 6), torch.randn(B, L, 6))


@pytest.mark.parametrize(
    "mha_kw, call_kw",
    [({}, {}), ({}, {"use_weights": True}), ({}, {"kpm": True}),
     ({"add_bias_kv": True, "add_zero_attn": True}, {}), ({"kdim": 4, "vdim": 4}, {})],
)
def test_multihead_attention_dropout_uses_the_forwards_masks(mha_kw, call_kw):
    # The rule reads the projections of the forward that ran, so the dropout masks are the
    # forward's own. Oracle: the same forward (same seed), one backward per example's loss.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 2, dropout=0.5, batch_first=True, **mha_kw)
    model = Attn(mha, **call_kw).to(F64)
    x, y = torch.randn(B, L, 6, dtype=F64), torch.randn(B, L, 6, dtype=F64)
    torch.manual_seed(1)
    probe = probe_norms(model, _mse, x, y)
    assert probe.uncovered == []
    torch.manual_seed(1)
    expected = rowwise_sq_norms(_mse(model(x), y), list(model.parameters()))
    torch.testing.assert_close(probe.sq_norms, expected, rtol=RTOL, atol=0)
    torch.manual_seed(2)  # other masks give other norms: the masks matter
    assert not torch.allclose(rowwise_sq_norms(_mse(model(x), y), list(model.parameters())),
                              expected)
    model.eval()  # eval mode: no dropout, exact
    check(model, x, y)


# ------------------------------------------------------------------------------ models
class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, d=12, heads=3, T=7, tied=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(T, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d + 1), nn.GELU(), nn.Linear(2 * d + 1, d))
        self.ln_f = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T, device=ids.device)).unsqueeze(0)
        a = self.ln1(h)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=ids.device), 1)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln_f(h))


def _lm_loss(logits, y):
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)


def test_tiny_transformer():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (4, 7))
    # pos is an nn.Embedding called with ids of shape [T] (no batch dim): per the capture
    # contract dim 0 must be the batch, so a positional table is given per-example ids here.
    model = TinyTransformer()
    model.forward = _batched_pos(model)
    check(model, ids, torch.randint(0, 11, (4, 7)), loss_fn=_lm_loss)


def _batched_pos(model):
    def forward(ids):
        B, T = ids.shape
        pos = torch.arange(T).expand(B, T)
        h = model.tok(ids) + model.pos(pos)
        a = model.ln1(h)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        h = h + model.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        h = h + model.mlp(model.ln2(h))
        return model.head(model.ln_f(h))

    return forward


def test_unbatched_positional_call_is_reported_not_wrong():
    torch.manual_seed(0)
    model = TinyTransformer().to(F64)
    ids = torch.randint(0, 11, (4, 7))
    probe = probe_norms(model, _lm_loss, ids, torch.randint(0, 11, (4, 7)))
    with pytest.raises(RuntimeError, match="different batch sizes"):
        probe.sq_norms  # noqa: B018


def test_small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, dilation=2, groups=2, padding=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 3, 3),
    )
    check(model, torch.randn(3, 2, 7, 5), torch.randn(3, 3))


def test_tied_weights_are_uncovered_and_the_rest_exact():
    torch.manual_seed(0)
    model = TinyTransformer(tied=True)
    model.forward = _batched_pos(model)
    probe = check(model, torch.randint(0, 11, (3, 7)), torch.randint(0, 11, (3, 7)),
                  loss_fn=_lm_loss, expect_uncovered=["tok.weight"])
    assert "tied" in probe.uncovered_reasons["tok.weight"]


def test_weight_also_used_functionally_is_detected_at_run_time():
    torch.manual_seed(0)

    class FunctionalHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.ln = nn.LayerNorm(4)

        def forward(self, ids):
            return F.linear(self.ln(self.emb(ids)), self.emb.weight)  # tied without a module

    model = FunctionalHead().to(F64)
    ids, y = torch.randint(0, 6, (3, 5)), torch.randint(0, 6, (3, 5))
    probe = probe_norms(model, _lm_loss, ids, y)
    got = probe.sq_norms
    assert probe.uncovered == ["emb.weight"]
    assert "used outside its module" in probe.uncovered_reasons["emb.weight"]
    torch.testing.assert_close(got, oracle(model, _lm_loss, ids, y, probe.covered), rtol=RTOL,
                               atol=0)


def test_unsupported_module_is_uncovered():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 3), Scale(), nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)  # frozen: neither covered nor uncovered
    torch.manual_seed(0)
    probe = check(model, torch.randn(4, 3), torch.randn(4, 2), expect_uncovered=["1.s"])
    assert "unsupported module type Scale" in probe.uncovered_reasons["1.s"]
    assert "2.weight" not in probe.covered + probe.uncovered


def test_overridden_forward_is_uncovered():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    probe = PerExampleGradNorms(nn.Sequential(MyLinear(2, 2))).attach()
    assert probe.uncovered == ["0.weight", "0.bias"]
    assert "overrides forward" in probe.uncovered_reasons["0.weight"]
    probe.detach()


# ------------------------------------------------------------------------------ semantics
def test_sum_and_mean_reduction_agree():
    torch.manual_seed(0)
    model = Wrap(nn.Linear(4, 3)).to(F64)
    x, y = torch.randn(5, 2, 4, dtype=F64), torch.randn(5, 2, 3, dtype=F64)
    mean = probe_norms(model, _mse, x, y, "mean").sq_norms
    summed = probe_norms(model, _mse, x, y, "sum").sq_norms
    torch.testing.assert_close(mean, summed, rtol=1e-12, atol=0)
    torch.testing.assert_close(mean, oracle(model, _mse, x, y), rtol=RTOL, atol=0)


def test_accumulation_with_grad_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    xs = [torch.randn(3, 4, dtype=F64) for _ in range(2)]
    ys = [torch.randn(3, 2, dtype=F64) for _ in range(2)]
    k = 2
    with PerExampleGradNorms(model) as probe:
        # micro-batch 1: Lightning's 1/k; micro-batch 2: an AMP-like loss scale on top.
        probe.grad_scale = 1 / k
        (_mse(model(xs[0]), ys[0]).mean() / k).backward()
        probe.grad_scale = 64.0 / k
        (_mse(model(xs[1]), ys[1]).mean() * 64.0 / k).backward()
    expected = torch.cat([oracle(model, _mse, x, y) for x, y in zip(xs, ys)])
    assert probe.sq_norms.shape == (6,)
    torch.testing.assert_close(probe.sq_norms, expected, rtol=RTOL, atol=0)
    assert probe.uncovered == []


def test_attach_detach_reset_long_lived():
    torch.manual_seed(0)
    model = Wrap(nn.Linear(3, 2)).to(F64)
    probe = PerExampleGradNorms(model).attach()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    _mse(model(x), y).mean().backward()
    assert probe.sq_norms.shape == (4,)
    probe.reset()
    assert probe.sq_norms.shape == (0,)
    _mse(model(x[:2]), y[:2]).mean().backward()
    torch.testing.assert_close(probe.sq_norms, oracle(model, _mse, x[:2], y[:2]), rtol=RTOL, atol=0)
    with torch.no_grad():  # validation-style forwards are ignored
        model(x)
    model(x)  # a forward whose output never gets a gradient: harmless
    probe.detach()
    assert probe.sq_norms.shape == (2,)
    assert not model.layer._forward_hooks


def test_eval_mode_with_dropout_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2)).eval()
    check(model, torch.randn(5, 4), torch.randn(5, 2))


def test_exception_inside_with_removes_hooks():
    model = Wrap(nn.Linear(3, 2))
    with pytest.raises(KeyError), PerExampleGradNorms(model):
        model(torch.randn(2, 3)).sum().backward()
        raise KeyError("boom")
    assert not model.layer._forward_hooks
    assert not model.layer.weight._backward_hooks


def test_bf16_autocast_within_a_loose_bound():
    torch.manual_seed(0)
    model = TinyTransformer(d=16, heads=2)
    model.forward = _batched_pos(model)
    ids, y = torch.randint(0, 11, (4, 7)), torch.randint(0, 11, (4, 7))
    with PerExampleGradNorms(model) as probe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        _lm_loss(logits.float(), y).mean().backward()
    got = probe.sq_norms
    assert got.dtype == torch.float32 and probe.uncovered == []
    model64 = model.to(F64)
    model64.forward = _batched_pos(model64)
    expected = oracle(model64, _lm_loss, ids, y)
    torch.testing.assert_close(got.double(), expected, rtol=0.1, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_reduction": "avg"}, "loss_reduction='avg'"),
        ({"method": "fast"}, "method='fast'"),
        ({"max_chunk_elems": 0}, "max_chunk_elems=0"),
        ({"grad_scale": 0.0}, "grad_scale=0.0"),
        ({"grad_scale": float("nan")}, "grad_scale=nan"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerExampleGradNorms(nn.Linear(2, 2), **kwargs)


def test_bad_model_and_double_attach():
    with pytest.raises(ValueError, match="got int"):
        PerExampleGradNorms(3)
    probe = PerExampleGradNorms(nn.Linear(2, 2)).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        probe.attach()
    probe.detach()


# ------------------------------------------------------------------------------ simultaneous
class MLPSeq(nn.Module):
    """Sequence MLP whose Linears take the simultaneous path (T >= 8, small i*o)."""

    def __init__(self, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(5, 6, bias=bias)
        self.act = nn.ReLU(inplace=True)  # in-place on the simultaneous output
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shape", [(3, 12, 5), (2, 3, 4, 5), (1, 9, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_simultaneous_linear_is_exact_and_leaves_gradients_unchanged(shape, bias, monkeypatch):
    calls = []
    apply = per_example._SimultaneousLinear.apply
    monkeypatch.setattr(per_example._SimultaneousLinear, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    model = MLPSeq(bias).to(F64)
    plain = MLPSeq(bias).to(F64)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    y = torch.randn(*shape[:-1], 3, dtype=F64)
    x_plain = x.detach().clone().requires_grad_()
    _mse(plain(x_plain), y).mean().backward()
    probe = check(model, x, y)
    assert calls, "the simultaneous path was not taken"
    expected = _grads(plain)
    model.zero_grad()
    x.grad = None
    with PerExampleGradNorms(model):
        _mse(model(x), y).mean().backward()
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, expected[n], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    assert probe.uncovered == [] and "forward" not in model.fc1.__dict__  # detached


def test_simultaneous_linear_called_twice_falls_back_exactly():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    check(Twice(), torch.randn(3, 10, 4), torch.randn(3, 10, 4))


def test_simultaneous_linear_under_create_graph():
    torch.manual_seed(0)
    model = MLPSeq().to(F64)
    plain = MLPSeq().to(F64)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 10, 5, dtype=F64)

    def penalty(m):  # a gradient penalty: differentiates through the weight gradient
        loss = m(x).square().sum()
        (g,) = torch.autograd.grad(loss, m.fc1.weight, create_graph=True)
        return g.square().sum()

    penalty(plain).backward()
    with PerExampleGradNorms(model, loss_reduction="sum") as probe:
        penalty(model).backward()
    for n, g in _grads(plain).items():
        torch.testing.assert_close(_grads(model)[n], g, rtol=1e-10, atol=1e-12)
    # The penalty's gradient is not a sum of per-example loss gradients: the second backward
    # reaches the layers' outputs again, and the probe says so instead of guessing.
    assert probe.covered == [] and "finalised" in probe.uncovered_reasons["fc1.weight"]


def test_simultaneous_bf16_autocast_gradients_close_to_plain():
    torch.manual_seed(0)
    model, plain = MLPSeq(), MLPSeq()
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 16, 5), torch.randn(4, 16, 3)
    for m, probe in ((plain, None), (model, PerExampleGradNorms(model).attach())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        _mse(out.float(), y).mean().backward()
        if probe is not None:
            got = probe.sq_norms
            probe.detach()
    for n, g in _grads(plain).items():
        torch.testing.assert_close(_grads(model)[n], g, rtol=2e-2, atol=2e-2)
    model64 = model.to(F64)
    expected = oracle(model64, _mse, x.double(), y.double())
    torch.testing.assert_close(got.double(), expected, rtol=0.1, atol=0)


def test_verify_every_paces_the_check():
    torch.manual_seed(0)
    model = Wrap(nn.Linear(3, 2)).to(F64)
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    probe = PerExampleGradNorms(model, verify_every=3).attach()
    checked = []
    for _ in range(7):
        _mse(model(x), y).mean().backward()
        checked.append(probe._check_now)
        probe.reset()
    probe.detach()
    assert checked == [True, True, False, True, False, False, True]


def test_deepcopy_while_attached_gives_an_independent_plain_model():
    import copy
    import pickle

    torch.manual_seed(0)
    model = MLPSeq().to(F64)
    x = torch.randn(2, 10, 5, dtype=F64)
    with PerExampleGradNorms(model):
        twin = copy.deepcopy(model)  # e.g. an EMA copy made while the probe is attached
        with torch.no_grad():
            twin.fc1.weight.mul_(2)
        assert not torch.allclose(twin(x), model(x))  # the copy uses its own weights
        with pytest.raises((TypeError, AttributeError)):  # hooks and patch: not picklable
            pickle.dumps(model)
    expected = MLPSeq().to(F64)
    expected.load_state_dict(twin.state_dict())
    torch.testing.assert_close(twin(x), expected(x))


# ------------------------------------------------------------------------------ layouts
def probe_at(model, loss_fn, x, y, bdim, batch_size):
    kw = {} if batch_size is None else {"batch_size": batch_size}
    with PerExampleGradNorms(model, **kw) as probe:
        out = model(x)
        loss_fn(out.movedim(bdim, 0), y.movedim(bdim, 0)).mean().backward()
    return probe


class SeqFirstLM(nn.Module):
    """Embedding, a Linear and a head on [T, B] ids: no module here has a batch_first."""

    def __init__(self, vocab=7, d=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.ln(torch.tanh(self.fc(self.tok(ids)))))


@pytest.mark.parametrize("batch_size", [None, 4])
def test_sequence_first_transformer_layer_with_T_equal_B_is_exact(batch_size):
    # T == B == 4: before the layout hint, the layer's Linears and LayerNorms took dim 0 (T)
    # as the batch and the norms were off by tens of percent with nothing reported.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0).to(F64)
    x, y = torch.randn(4, 4, 6, dtype=F64), torch.randn(4, 4, 6, dtype=F64)
    probe = probe_at(layer, _mse, x, y, 1, batch_size)
    assert probe.uncovered == [], probe.uncovered_reasons
    expected = vmap_sq_norms(layer, _mse, x, y, 1)
    torch.testing.assert_close(probe.sq_norms, expected, rtol=RTOL, atol=0)


def test_sequence_first_model_with_T_unequal_B_is_exact_when_told_the_batch_size():
    torch.manual_seed(0)
    model = SeqFirstLM().to(F64)
    ids, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5, 3))  # [T=5, B=3]
    probe = probe_at(model, _lm_loss_bf, ids, y, 1, batch_size=3)
    assert probe.uncovered == [], probe.uncovered_reasons
    expected = vmap_sq_norms(model, _lm_loss_bf, ids, y, 1)
    torch.testing.assert_close(probe.sq_norms, expected, rtol=RTOL, atol=0)


def test_sequence_first_model_with_T_equal_B_is_refused_not_guessed():
    torch.manual_seed(0)
    model = SeqFirstLM().to(F64)
    ids, y = torch.randint(0, 7, (4, 4)), torch.randint(0, 7, (4, 4))
    probe = probe_at(model, _lm_loss_bf, ids, y, 1, batch_size=4)
    names = [n for n, _ in model.named_parameters()]
    assert probe.uncovered == names and probe.covered == []
    assert "ambiguous layout" in probe.uncovered_reasons["fc.weight"]
    assert probe.sq_norms.numel() == 0


def test_layout_learned_on_an_unambiguous_pass_resolves_a_later_T_equal_B():
    torch.manual_seed(0)
    model = SeqFirstLM().to(F64)
    probe = PerExampleGradNorms(model).attach()
    for T, B in ((5, 3), (4, 4)):
        ids, y = torch.randint(0, 7, (T, B)), torch.randint(0, 7, (T, B))
        probe.batch_size = B
        _lm_loss_bf(model(ids).transpose(0, 1), y.transpose(0, 1)).mean().backward()
        got = probe.sq_norms
        probe.reset()
        assert probe.uncovered == [], probe.uncovered_reasons
        torch.testing.assert_close(got, vmap_sq_norms(model, _lm_loss_bf, ids, y, 1), rtol=RTOL,
                                   atol=0)
    probe.detach()


def test_no_dim_of_the_batch_size_is_refused_per_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(6, 3, dtype=F64)
    with PerExampleGradNorms(model, batch_size=5) as probe:  # told the wrong size
        model(x).square().mean().backward()
    assert probe.covered == [] and "batch size 5" in probe.uncovered_reasons["0.weight"]
    with pytest.raises(ValueError, match="batch_size=0"):
        probe.batch_size = 0


def test_gru_sequence_first_head_exact_and_rnn_uncovered():
    torch.manual_seed(0)

    class GRUHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model = GRUHead().to(F64)
    x, y = torch.randn(5, 3, 3, dtype=F64), torch.randn(5, 3, 2, dtype=F64)
    probe = probe_at(model, _mse, x, y, 1, batch_size=3)
    assert probe.covered == ["head.weight", "head.bias"]
    assert all("unsupported module type GRU" in r for r in probe.uncovered_reasons.values())
    expected = loop_sq_norms(model, _mse, x, y, 1, probe.covered)
    torch.testing.assert_close(probe.sq_norms, expected, rtol=RTOL, atol=0)


def _lm_loss_bf(logits, y):
    """``_lm_loss`` on batch-first logits [B, T, V] and targets [B, T]."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)


def test_multihead_attention_tap_is_removed_even_when_the_forward_raises():
    linear = F.linear
    mha = nn.MultiheadAttention(6, 2, batch_first=True)
    with PerExampleGradNorms(mha):
        with pytest.raises(AssertionError, match="does not match"):  # torch's own shape check
            mha(torch.randn(2, 4, 6), torch.randn(2, 3, 6), torch.randn(2, 5, 6))
        assert F.linear is linear
        mha(torch.randn(2, 4, 6), torch.randn(2, 3, 6), torch.randn(2, 3, 6))
        assert F.linear is linear


def test_custom_layer_inside_a_stock_encoder_gets_no_layout_hint():
    class MyLayer(nn.Module):  # sequence-first outside, batch-first inside
        def __init__(self):
            super().__init__()
            self.self_attn = nn.MultiheadAttention(6, 2)  # read by TransformerEncoder.forward
            self.fc = nn.Linear(6, 6)

        def forward(self, x, src_mask=None, is_causal=False, src_key_padding_mask=None):
            return torch.tanh(self.fc(x.transpose(0, 1))).transpose(0, 1)

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(MyLayer(), 1, enable_nested_tensor=False).to(F64)
    x, y = torch.randn(4, 4, 6, dtype=F64), torch.randn(4, 4, 6, dtype=F64)  # T == B
    probe = probe_at(enc, _mse, x, y, 1, batch_size=4)
    assert "ambiguous layout" in probe.uncovered_reasons["layers.0.fc.weight"]
    x, y = torch.randn(5, 4, 6, dtype=F64), torch.randn(5, 4, 6, dtype=F64)  # T != B: exact
    probe = probe_at(enc, _mse, x, y, 1, batch_size=4)
    assert probe.uncovered == [] and "layers.0.fc.weight" in probe.covered  # (self_attn unused)
    expected = vmap_sq_norms(enc, _mse, x, y, 1, probe.covered)
    torch.testing.assert_close(probe.sq_norms, expected, rtol=RTOL, atol=0)


def test_layout_memory_survives_detach_and_attach():
    """A batch dim resolved on an earlier pass decides a later pass with T == B, also after
    the probe was detached and attached again (the critical-batch probe pauses it so)."""
    emb = torch.nn.Embedding(50, 4)
    probe = PerExampleGradNorms(emb, loss_reduction="sum").attach()
    probe.batch_size = 8
    emb(torch.randint(0, 50, (8, 32))).sum().backward()
    probe.reset()
    probe.detach()
    probe.attach()
    probe.batch_size = 32
    ids = torch.randint(0, 50, (32, 32))
    emb(ids).square().sum().backward()
    assert probe.uncovered == []
    got = probe.sq_norms.clone()
    probe.detach()
    expected = []  # the oracle: one example at a time
    for i in range(32):
        emb.weight.grad = None
        emb(ids[i: i + 1]).square().sum().backward()
        expected.append(emb.weight.grad.square().sum())
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)
