import csv

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel, LeastSquaresProblem


def test_fixed_and_fresh_data_are_deterministic():
    a, b = LeastSquaresData(dim=4, num_samples=64), LeastSquaresData(dim=4, num_samples=64)
    a.setup()
    b.setup()
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert a.train_set.tensors[0].shape == (64, 4)
    f = LeastSquaresData(dim=4, num_samples=10_000, fresh=True)
    f.setup()
    assert len(f.train_set) == 10_000
    x0, y0 = f.train_set[5]
    assert torch.equal(f.train_set[5][0], x0) and not torch.equal(f.train_set[6][0], x0)
    x, y = next(iter(f.train_dataloader()))
    assert x.shape == (32, 4) and y.shape == (32,) and x.dtype == torch.float32


def test_model_loss_matches_the_population_loss():
    torch.manual_seed(0)
    m = LeastSquaresModel(dim=4, init_scale=1.0)
    x, y = m.problem.sample(200_000, torch.Generator().manual_seed(1))
    empirical = m.loss((x.float(), y.float())).item()
    assert empirical == pytest.approx(m.problem.loss(m.linear.weight).item(), rel=0.02)


def test_fit_logs_exact_gns_and_reduces_loss(tmp_path):
    torch.manual_seed(0)
    data = LeastSquaresData(dim=4, batch_size=16, num_samples=512)
    model = LeastSquaresModel(dim=4, lr=0.1)
    w0 = model.linear.weight.detach().clone()
    trainer = Trainer(max_steps=30, logger=CSVLogger(tmp_path, name="", version=""),
                      log_every_n_steps=1, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      limit_val_batches=1, val_check_interval=10)
    trainer.fit(model, datamodule=data)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    gns = [float(r["synthetic/exact_gns"]) for r in rows if r.get("synthetic/exact_gns")]
    assert len(gns) >= 20 and gns[-1] > gns[0] > 1.0  # the noise scale grows as d shrinks
    assert any(r.get("val_loss") for r in rows) and any(r.get("train_loss") for r in rows)
    p = model.problem
    assert p.loss(model.linear.weight) < 0.5 * p.loss(w0)
    assert gns[0] == pytest.approx(p.exact_stats(w0)["gns"].item(), rel=1e-5)


def test_problem_mismatch_is_named(tmp_path):
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="noise_std"):
        trainer.fit(LeastSquaresModel(dim=4, noise_std=2.0),
                    datamodule=LeastSquaresData(dim=4, noise_std=1.0, num_samples=64))
    assert LeastSquaresProblem(dim=4) == LeastSquaresModel(dim=4).problem
