import csv
import time
from argparse import Namespace

import pytest

from adabatch.cli import plot, sweep
from adabatch.cli.sweep import SweepError, error_summary, parse_grid, parse_range, parse_scalar

from .conftest import CONFIGS

pytest.importorskip("optuna")

# Tiny synthetic trials; the learning rate -1 fails at model construction.
TINY = ["--set", "data.fresh=false", "--set", "data.num_samples=256", "--set", "data.dim=4",
        "--set", "model.dim=4", "--set", "data.val_samples=64", "--set", "trainer.max_steps=3",
        "--set", "trainer.val_check_interval=3", "--set", "trainer.log_every_n_steps=1",
        "--set", "trainer.enable_model_summary=false", "--set", "adabatch.enabled=false"]


def test_parsing():
    assert parse_scalar("3") == 3 and parse_scalar("1e-3") == 0.001
    assert parse_scalar("true") is True and parse_scalar("null") is None
    assert parse_scalar("noise") == "noise"
    assert parse_grid("adabatch.policy=noise,fixed").choices == ["noise", "fixed"]
    p = parse_range("model.lr=1e-3:1e-1:log")
    assert (p.low, p.high, p.log, p.integer) == (1e-3, 1e-1, True, False)
    assert parse_range("data.batch_size=8:64:int").integer
    with pytest.raises(SweepError, match="low=2.0 must be < high=1.0"):
        parse_range("model.lr=2:1")
    with pytest.raises(SweepError, match="'model.lr'"):
        parse_grid("model.lr")
    log = ("Traceback\n  File x\nValueError: bad union\nErrors:\n  - lr=-1.0 must be > 0\n"
           "Given value: x")
    assert error_summary(log) == "ValueError: bad union | Errors: | - lr=-1.0 must be > 0"


def _ns(**kw):
    base = dict(sweep=None, config=[str(CONFIGS / "synthetic.yaml")], grid=[], range=[], set=[],
                sampler=None, n_trials=None, objective=None, direction=None, reduce=None,
                name=None, out=None, storage=None, jobs=None, timeout=None, seed=None)
    return Namespace(**{**base, **kw})


def test_spec_resolution_and_errors(tmp_path):
    spec = sweep.resolve_spec(_ns(grid=["model.lr=0.1,0.2"], range=[]))
    assert spec.sampler == "grid" and len(spec.grid()) == 2 and spec.name == "synthetic-sweep"
    spec = sweep.resolve_spec(_ns(sweep=str(CONFIGS / "sweeps" / "example.yaml"), config=None))
    assert spec.sampler == "tpe" and spec.n_trials == 6 and spec.configs
    assert {p.key for p in spec.params} == {"adabatch.policy.init_args.exponent", "model.lr"}
    with pytest.raises(SweepError, match="'model.lr'"):
        sweep.resolve_spec(_ns(range=["model.lr=0.1:1"], sampler="grid"))
    with pytest.raises(SweepError, match="empty"):
        sweep.resolve_spec(_ns())
    with pytest.raises(SweepError, match="missing.yaml"):
        sweep.resolve_spec(_ns(config=["missing.yaml"], grid=["model.lr=1"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("spaces: {}\n")
    with pytest.raises(SweepError, match="'spaces'"):
        sweep.resolve_spec(_ns(sweep=str(bad)))


def test_grid_sweep_records_a_failing_trial_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--config", str(CONFIGS / "synthetic.yaml"), "--grid", "model.lr=0.05,-1,0.1",
            *TINY, "--out", str(out), "--jobs", "2"]
    assert sweep.main(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert [r["rank"] for r in rows] == ["1", "2", ""]
    assert all(float(r["val_loss"]) > 0 and r["steps"] == "3" for r in rows[:2])
    assert float(rows[0]["val_loss"]) <= float(rows[1]["val_loss"])
    assert rows[2]["model.lr"] == "-1" and "lr=-1.0 must be > 0" in rows[2]["error"]
    table = capsys.readouterr().out
    assert "val_loss" in table and "FAIL" in table

    # Same study again (only finished grid points): nothing reruns, the table keeps them all.
    assert sweep.main([*args[:3], "model.lr=0.05,0.1", *args[4:]]) == 0
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 3
    assert "start" not in capsys.readouterr().out

    png = plot.plot_sweep(out, tmp_path / "sweep.png")
    _assert_png(png)


def _assert_png(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_ctrl_c_stops_running_trials_and_keeps_the_table(tmp_path, monkeypatch, capsys):
    calls = []
    real_sleep = time.sleep

    def interrupt(seconds):  # the sweep loop's first wait is "Ctrl-C"; later waits are real
        calls.append(seconds)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", interrupt)
    out = tmp_path / "sweep"
    code = sweep.main(["--config", str(CONFIGS / "synthetic.yaml"), "--grid", "model.lr=0.1,0.2",
                       *TINY, "--out", str(out), "--jobs", "2"])
    assert code == 130 and calls
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["state"], r["error"]) for r in rows] == [("FAIL", "interrupted")] * 2
    assert "interrupted" in capsys.readouterr().out
