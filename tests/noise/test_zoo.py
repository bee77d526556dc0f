"""A model zoo: every architecture is either exact on its covered parameters or flagged.

Each case runs one training forward+backward with the probe attached (told the batch size, as
the callback does), then the same forward again (same seed, so the same dropout masks) for the
oracle: one autograd backward per example loss, in float64. The test asserts, per case, exactly
which parameters are uncovered and why, and that the covered ones match the oracle to 1e-6
(bf16 autocast: to bf16 rounding). Shapes are tiny: the file runs in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from per_example_oracles import rowwise_sq_norms
from torch import nn

from adabatch import PerExampleGradNorms

F64 = torch.float64
B = 3


def mse(out, y):
    return 0.5 * (out - y).square().flatten(1).sum(1)


def lm(logits, y):
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: object = mse
    bdim: int = 0  # batch dim of x, y and the model's output
    uncovered: dict[str, str] = field(default_factory=dict)  # name -> reason substring
    coupled: bool = False
    autocast: bool = False


def _x(*shape):
    return torch.randn(*shape, dtype=F64)


class Block(nn.Module):
    """ResNet basic block with GroupNorm."""

    def __init__(self, c=4):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)

    def forward(self, x):
        return F.relu(x + self.n2(self.c2(F.relu(self.n1(self.c1(x))))))


class TiedLM(nn.Module):
    def __init__(self, vocab=9, d=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids):
        return self.head(self.ln(self.tok(ids)))


class PosLM(nn.Module):
    """A positional table indexed by arange(T): no batch dim, refused when told B."""

    def __init__(self, vocab=9, d=6, T=5):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))))


class GPTBlock(nn.Module):
    """Pre-norm causal block with raw nn.Parameter residual scales (as in some GPT variants)."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.gamma1 = nn.Parameter(torch.full((d,), 0.5))
        self.gamma2 = nn.Parameter(torch.full((d,), 0.7))

    def forward(self, x):
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        a = self.ln1(x)
        x = x + self.gamma1 * self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return x + self.gamma2 * self.mlp(self.ln2(x))


class RNNHead(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(rnn.hidden_size, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class ConvSeq(nn.Module):
    """Conv1d over [B, C, T], then a per-position Linear on [B, T, C]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).transpose(1, 2))


class Transformer(nn.Module):
    """nn.Transformer (sequence-first, dropout on) on [S, B, d] and [T, B, d]."""

    def __init__(self, d=8, dropout=0.2):
        super().__init__()
        self.t = nn.Transformer(d, 2, 1, 1, dim_feedforward=12, dropout=dropout)

    def forward(self, x):
        return self.t(x, x[:4])


class LightningDemo(nn.Module):
    """Lightning's demo Transformer (``lightning.pytorch.demos``), unmodified, dropout on."""

    def __init__(self, vocab=11):
        super().__init__()
        from lightning.pytorch.demos.transformer import Transformer as Demo

        self.m, self.vocab = Demo(vocab, ninp=8, nhead=2, nhid=12, nlayers=1, dropout=0.2), vocab

    def forward(self, ids):
        log_probs = self.m(ids, ids)  # [B*T, V] log-probabilities
        return log_probs.view(*ids.shape, self.vocab)


def nll(log_probs, y):
    return F.nll_loss(log_probs.transpose(1, 2), y, reduction="none").sum(1)


def _all(model, reason):
    return {n: reason for n, p in model.named_parameters() if p.requires_grad}


def _mha(prefix, reason):
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    return {f"{prefix}.{n}": reason for n in names}


def cases():  # noqa: C901 - one table
    torch.manual_seed(0)
    c = {}
    c["mlp"] = Case(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), _x(B, 4), _x(B, 2))
    c["cnn_groupnorm"] = Case(
        nn.Sequential(nn.Conv2d(2, 4, 3, stride=2), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 2 * 2, 2)), _x(B, 2, 5, 5), _x(B, 2))
    bn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                       nn.Linear(4 * 3 * 3, 2))
    c["cnn_batchnorm_train"] = Case(bn, _x(B, 2, 5, 5), _x(B, 2), coupled=True)
    bn_plain = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Tanh(),
                             nn.Linear(6, 2))
    c["mlp_batchnorm_no_affine_train"] = Case(bn_plain, _x(B, 4), _x(B, 2), coupled=True)
    bn_eval = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 3 * 3, 2))
    with torch.no_grad():
        bn_eval[1].running_mean.uniform_(-1, 1)
        bn_eval[1].running_var.uniform_(0.5, 2)
        bn_eval[1].weight.uniform_(0.5, 1.5)
    c["cnn_batchnorm_eval"] = Case(bn_eval.eval(), _x(B, 2, 5, 5), _x(B, 2))
    c["resnet_block"] = Case(Block(), _x(B, 4, 4, 4), _x(B, 4, 4, 4))
    c["embedding_tied_head"] = Case(
        TiedLM(), torch.randint(0, 9, (B, 5)), torch.randint(0, 9, (B, 5)), loss=lm,
        uncovered={"tok.weight": "tied weights"})
    c["positional_arange"] = Case(
        PosLM(), torch.randint(0, 9, (B, 5)), torch.randint(0, 9, (B, 5)), loss=lm,
        uncovered={"pos.weight": "batch size 3"})
    c["encoder_layer_batch_first"] = Case(
        nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True), _x(B, 5, 8),
        _x(B, 5, 8))
    c["encoder_layer_seq_first"] = Case(
        nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0), _x(5, B, 8), _x(5, B, 8), bdim=1)
    c["encoder_layer_seq_first_T_eq_B"] = Case(
        nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, norm_first=True), _x(B, B, 8),
        _x(B, B, 8), bdim=1)
    tr = Transformer()
    c["transformer_dropout"] = Case(tr, _x(5, B, 8), _x(4, B, 8), bdim=1)
    c["gpt_block_raw_scales"] = Case(
        GPTBlock(), _x(B, 5, 8), _x(B, 5, 8),
        uncovered={"gamma1": "unsupported module type GPTBlock",
                   "gamma2": "unsupported module type GPTBlock"})
    gru = RNNHead(nn.GRU(3, 4))
    c["gru_seq_first"] = Case(gru, _x(5, B, 3), _x(5, B, 2), bdim=1,
                              uncovered={n: "unsupported module type GRU"
                                         for n, _ in gru.rnn.named_parameters(prefix="rnn")})
    lstm = RNNHead(nn.LSTM(3, 4, batch_first=True))
    c["lstm_batch_first"] = Case(lstm, _x(B, 5, 3), _x(B, 5, 2),
                                 uncovered={n: "unsupported module type LSTM"
                                            for n, _ in lstm.rnn.named_parameters(prefix="rnn")})
    frozen = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))
    for p in (*frozen[0].parameters(), *frozen[1].parameters()):
        p.requires_grad_(False)
    c["frozen_backbone"] = Case(frozen, _x(B, 4), _x(B, 2))
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    compiled = torch.compile(mlp, backend="aot_eager")
    c["compiled_mlp"] = Case(  # refused at attach (the static reason), not only after a pass
        compiled, _x(B, 4), _x(B, 2), uncovered=_all(compiled, "is compiled with torch.compile"))
    c["bf16_autocast_mlp_seq"] = Case(
        nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 2)),
        _x(B, 9, 4), _x(B, 9, 2), autocast=True)
    c["conv1d_sequence"] = Case(ConvSeq(), _x(B, 3, 7), _x(B, 7, 2))
    c["lightning_demo_transformer"] = Case(
        LightningDemo(), torch.randint(0, 11, (B, 6)), torch.randint(0, 11, (B, 6)), loss=nll)
    for case in c.values():
        case.model.to(F64)
    return c


CASES = cases()


@pytest.mark.parametrize("name", list(CASES))
def test_zoo(name):
    case = CASES[name]
    model, bdim = case.model, case.bdim
    model.train(model.training)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    def losses():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.autocast):
            out = model(case.x)
        out = out.float() if case.autocast else out
        return case.loss(out.movedim(bdim, 0), case.y.movedim(bdim, 0))

    torch.manual_seed(1)
    with PerExampleGradNorms(model, batch_size=case.x.shape[bdim]) as probe:
        losses().mean().backward()
    got = probe.sq_norms

    if case.coupled:
        assert "examples coupled" in (probe.coupled or "")
        assert probe.covered == [] and probe.uncovered == trainable
        assert probe.recorded == 0 and got.numel() == 0
        return
    assert probe.coupled is None
    reasons = probe.uncovered_reasons
    assert sorted(reasons) == sorted(case.uncovered), reasons
    for n, why in case.uncovered.items():
        assert why in reasons[n], (n, reasons[n])
    assert probe.covered == [n for n in trainable if n not in case.uncovered]
    if not probe.covered:
        assert probe.recorded == 0 and got.numel() == 0
        return
    assert probe.recorded == 1 and got.shape == (case.x.shape[bdim],)
    named = dict(model.named_parameters())
    torch.manual_seed(1)  # the same dropout masks as the probe's forward
    expected = rowwise_sq_norms(losses(), [named[n] for n in probe.covered])
    rtol = 3e-2 if case.autocast else 1e-6
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=0)
    assert math.isfinite(float(got.sum()))


def test_zoo_is_large_enough():
    assert len(CASES) >= 15


def test_compiling_after_attach_is_detected_not_silent():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).to(F64)
    probe = PerExampleGradNorms(mlp, batch_size=B).attach()
    compiled = torch.compile(mlp, backend="aot_eager")
    mse(compiled(_x(B, 4)), _x(B, 2)).mean().backward()
    assert probe.recorded == 0 and probe.sq_norms.numel() == 0
    assert probe.covered == []
    assert all("hooks never ran" in r for r in probe.uncovered_reasons.values())
    probe.detach()


def test_batchnorm_switched_to_train_after_attach_is_coupled_at_its_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).to(F64).eval()
    probe = PerExampleGradNorms(model, batch_size=B).attach()
    assert probe.coupled is None and probe.uncovered == []  # eval BatchNorm: covered
    model.train()
    mse(model(_x(B, 4)), _x(B, 2)).mean().backward()
    assert "examples coupled" in probe.coupled and probe.covered == []
    assert probe.recorded == 0
    probe.detach()
