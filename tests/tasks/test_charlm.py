import pytest
import torch
from torch import nn

from adabatch.tasks.charlm import (
    CharLM,
    CharLMData,
    is_val_file,
    read_corpus,
    stdlib_root,
)


def test_corpus_is_sorted_within_budget_and_skips_site_packages():
    files = read_corpus(max_bytes=50_000)
    paths = [p for p, _ in files]
    assert paths == sorted(paths)
    assert sum(len(d) for _, d in files) == 50_000
    assert not any("site-packages" in p or "dist-packages" in p for p in paths)
    assert files == read_corpus(max_bytes=50_000)


def test_split_is_by_file_and_independent_of_budget():
    small = {p for p, _ in read_corpus(max_bytes=100_000) if is_val_file(p, 0.1)}
    large = {p for p, _ in read_corpus(max_bytes=400_000) if is_val_file(p, 0.1)}
    assert small and small <= large
    paths = [p.relative_to(stdlib_root()).as_posix() for p in stdlib_root().glob("*.py")]
    frac = sum(is_val_file(p, 0.1) for p in paths) / len(paths)
    assert 0.03 < frac < 0.2


def test_datamodule_is_deterministic_and_shifted():
    a = CharLMData(batch_size=4, context=16, max_bytes=60_000, seed=0)
    b = CharLMData(batch_size=4, context=16, max_bytes=60_000, seed=0)
    c = CharLMData(batch_size=4, context=16, max_bytes=60_000, seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.train_set.offsets, b.train_set.offsets)
    assert not torch.equal(a.train_set.offsets, c.train_set.offsets)
    assert torch.equal(a.val_set.offsets, c.val_set.offsets)  # validation ignores the seed
    x, y = a.train_set[3]
    assert x.shape == y.shape == (16,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])
    assert len(a.train_set) == (a.train_set.tokens.numel() - 1) // 16
    xb, yb = next(iter(a.train_dataloader()))
    assert xb.shape == (4, 16) and int(xb.max()) < 256


def test_custom_root_and_clear_errors(tmp_path):
    for i in range(12):
        (tmp_path / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    dm = CharLMData(batch_size=2, context=8, root=str(tmp_path), val_fraction=0.3)
    dm.setup("fit")
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    with pytest.raises(FileNotFoundError, match="nope"):
        read_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="max_bytes=100"):
        CharLMData(context=64, max_bytes=100, root=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="batch_size=0"):
        CharLMData(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        CharLMData(val_fraction=1.5)


def test_model_shapes_causality_and_coverage():
    torch.manual_seed(0)
    m = CharLM(d_model=32, n_layers=2, n_heads=4, context=16)
    x = torch.randint(0, 256, (3, 16))
    out = m(x)
    assert out.shape == (3, 16, 256)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256
    assert torch.allclose(m(x2)[:, :10], out[:, :10], atol=1e-5)  # no look-ahead
    assert not torch.allclose(m(x2)[:, 10:], out[:, 10:])
    # every parameter sits in a layer type the per-example probes support
    owners = {name for mod_name, mod in m.named_modules()
              if isinstance(mod, (nn.Linear, nn.Embedding, nn.LayerNorm))
              for name in (f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False))}
    assert owners == {n for n, _ in m.named_parameters()}
    assert m.head.weight.data_ptr() != m.tok.weight.data_ptr()  # untied
    with pytest.raises(ValueError, match="sequence length 17"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="n_heads=3"):
        CharLM(d_model=32, n_heads=3)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    dm = CharLMData(batch_size=16, context=32, max_bytes=60_000)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    m = CharLM(d_model=32, n_layers=1, n_heads=2, context=32, lr=3e-3)
    opt = m.configure_optimizers()
    first = m.loss(batch).item()
    for _ in range(15):
        opt.zero_grad()
        m.loss(batch).backward()
        opt.step()
    assert m.loss(batch).item() < first - 0.5
