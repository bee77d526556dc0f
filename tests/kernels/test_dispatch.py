"""adabatch.kernels: backend choice, forced-backend errors, custom ops, and the probe through it.

The Triton parts run on CUDA when there is one, else in Triton's interpreter, which needs
TRITON_INTERPRET=1 exported before pytest starts (pytest imports triton through lightning at
startup, see test_linear_norms.py): ``TRITON_INTERPRET=1 python -m pytest tests/kernels``.
"""

import importlib.util
import os
import sys

import pytest
import torch
from torch import nn

import adabatch.kernels as K
from adabatch.kernels import ops, reference

_CUDA = torch.cuda.is_available()
_SET = not _CUDA and "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
if _SET:  # first import of triton happens here: make it the interpreter's
    os.environ["TRITON_INTERPRET"] = "1"
try:
    _triton, _ = K._import_triton()
finally:
    if _SET:
        del os.environ["TRITON_INTERPRET"]

DEVICE = "cuda" if _CUDA else "cpu"
RUNNABLE = _triton is not None and (_CUDA or K._triton_interpreted(_triton))
needs_triton = pytest.mark.skipif(
    not RUNNABLE,
    reason="triton is not installed"
    if _triton is None
    else "no GPU, and triton was imported without TRITON_INTERPRET=1: run "
    "`TRITON_INTERPRET=1 python -m pytest tests/kernels`",
)


@pytest.fixture
def env(monkeypatch):
    """Set ADABATCH_KERNELS; on CPU also TRITON_INTERPRET, which lets the kernels run there."""

    def set_mode(mode, interpret=not _CUDA):
        monkeypatch.setenv("ADABATCH_KERNELS", mode)
        if interpret:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    return set_mode


def _data(B=3, T=5, d_in=17, d_out=9, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=gen, dtype=dtype).to(DEVICE)
    g = torch.randn(B, T, d_out, generator=gen, dtype=dtype).to(DEVICE)
    return x, g


# ---------------------------------------------------------------- backend choice and errors
def test_mode_is_validated(env):
    env("cuda")
    with pytest.raises(ValueError, match="ADABATCH_KERNELS='cuda' must be one of"):
        K._backend(torch.zeros(1))


def test_torch_mode_and_cpu_default_use_the_reference(env):
    x, _ = _data()
    env("torch")
    assert K._backend(x) == "torch"
    env("auto", interpret=False)
    assert K._backend(torch.zeros(2)) == "torch"  # CPU, no interpreter


@needs_triton
def test_auto_picks_triton_where_it_runs_and_torch_elsewhere(env):
    x, g = _data()
    env("auto")
    assert K._backend(x, g) == "triton"
    assert K._backend(x.double(), g.double()) == "torch"  # float64: the oracle dtype


@needs_triton
def test_forced_triton_explains_why_it_cannot_run(env, monkeypatch):
    x, g = _data()
    env("triton")
    with pytest.raises(RuntimeError, match="ADABATCH_KERNELS=triton, but .*float64"):
        K.linear_sq_norms(x.double(), g.double())
    env("triton", interpret=False)
    with pytest.raises(RuntimeError, match="on the CPU and TRITON_INTERPRET is not 1"):
        K.bias_sq_norms(torch.zeros(2, 3, 4))
    if not _CUDA:
        env("triton")
        monkeypatch.setattr(K, "_triton_interpreted", lambda triton: False)
        with pytest.raises(RuntimeError, match="set after triton had been imported"):
            K.bias_sq_norms(g)
    monkeypatch.setattr(K, "_import_triton", lambda: (None, "triton cannot be imported (x)"))
    env("triton")
    with pytest.raises(RuntimeError, match=r"pip install adabatch\[kernels\]"):
        K.norm_affine_sq_norms(x, x)
    env("auto")
    assert K._backend(x) == "torch"  # auto without triton: the reference


# ------------------------------------------------------------------- same results, both ways
def _both(env, fn):
    env("torch")
    expected = fn()
    env("triton")
    return fn(), expected


@needs_triton
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_linear_sq_norms_agree(env, T, method):
    x, g = _data(T=T, d_in=17, d_out=9)
    got, expected = _both(env, lambda: K.linear_sq_norms(x, g, method, max_chunk_elems=64))
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


@needs_triton
def test_fused_bias_norm_affine_and_embedding_agree(env):
    x, g = _data(T=33, d_in=17, d_out=17)
    ids = torch.randint(0, 5, (3, 33), device=DEVICE)
    got, expected = _both(
        env,
        lambda: (
            *K.linear_weight_grad_and_sq_norms(x, g),
            K.bias_sq_norms(g),
            *K.norm_affine_sq_norms(x, g),
            K.embedding_sq_norms(ids, g, padding_idx=0),  # torch on every backend
        ),
    )
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_triton
def test_half_inputs_through_dispatch(env):
    x, g = _data(T=33, dtype=torch.bfloat16)
    env("auto")
    assert K._backend(x, g) == "triton"
    got = K.linear_sq_norms(x, g)
    torch.testing.assert_close(got, reference.linear_sq_norms(x, g), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------- custom ops
@pytest.mark.parametrize("mode", ["torch", pytest.param("triton", marks=needs_triton)])
def test_custom_ops_pass_opcheck(env, mode):
    env(mode)
    x, g = _data(T=4, d_in=5, d_out=6)
    ids = torch.randint(0, 3, (3, 4), device=DEVICE)
    cases = [
        (torch.ops.adabatch.linear_sq_norms, (x, g, "ghost")),
        (torch.ops.adabatch.linear_weight_grad_and_sq_norms, (x, g)),
        (torch.ops.adabatch.bias_sq_norms, (g,)),
        (torch.ops.adabatch.norm_affine_sq_norms, (x, x)),
        (torch.ops.adabatch.embedding_sq_norms, (ids, g, None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mode", ["torch", pytest.param("triton", marks=needs_triton)])
def test_dispatch_under_torch_compile(env, mode):
    env(mode)
    x, g = _data(T=4, d_in=5, d_out=6)
    ids = torch.randint(0, 3, (3, 4), device=DEVICE)

    def fn(x, g, ids):
        dw, sq = K.linear_weight_grad_and_sq_norms(x, g)
        w_sq, b_sq = K.norm_affine_sq_norms(x, g[..., :5])
        norms = K.linear_sq_norms(x, g) + K.bias_sq_norms(g) + w_sq + b_sq
        return dw, sq, norms + K.embedding_sq_norms(ids, g, 0)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(x, g, ids), fn(x, g, ids)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ops_do_not_record_autograd():
    x, g = _data()
    x.requires_grad_(True)
    out = ops.linear_sq_norms(x, g)
    assert not out.requires_grad


# ---------------------------------------------------------------------- the probe through it
class _Block(nn.Module):
    def __init__(self, vocab=11, d=12, hidden=20):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d, bias=False)
        self.rms = nn.RMSNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.relu(self.up(self.ln(h))))
        return self.head(self.rms(h)).mean(1)


@needs_triton
@pytest.mark.skipif(
    importlib.util.find_spec("adabatch.noise.per_example") is None,
    reason="adabatch.noise.per_example does not exist yet",
)
def test_per_example_probe_same_norms_through_triton(env, monkeypatch):
    from adabatch import PerExampleGradNorms

    torch.manual_seed(0)
    model = _Block().to(DEVICE)
    ids = torch.randint(0, 11, (4, 9), device=DEVICE)
    y = torch.randn(4, 3, device=DEVICE)
    seen = []
    backend = K._backend
    monkeypatch.setattr(K, "_backend", lambda *t: seen.append(backend(*t)) or seen[-1])

    def norms(mode):
        env(mode)
        model.zero_grad()
        with PerExampleGradNorms(model) as probe:
            torch.nn.functional.mse_loss(model(ids), y).backward()
        assert probe.uncovered == [], probe.uncovered_reasons
        return probe.sq_norms

    expected = norms("torch")
    got = norms("triton")
    assert "triton" in seen
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
