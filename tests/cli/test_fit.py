import csv
import json

import pytest

from adabatch.cli.fit import DEFAULT_TASK, with_default_task
from adabatch.cli.main import main


def _metrics(tmp_path):
    with open(tmp_path / "run" / "v" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_fit_disabled_logs_losses_and_summary(tiny_charlm, tmp_path, capsys):
    assert main([*tiny_charlm, "--adabatch.enabled=false"]) == 0
    rows = _metrics(tmp_path)
    columns = set(rows[0])
    assert {"train_loss", "val_loss"} <= columns
    assert not any(c.startswith("adabatch/") for c in columns)
    summary = json.loads((tmp_path / "run" / "v" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples"] == 16
    assert summary["batch_size_history"] == [{"step": 0, "samples": 0, "batch_size": 4}]
    assert summary["enabled"] is False and summary["stop_reason"] == "max_steps"
    out = capsys.readouterr()
    assert "adabatch run summary" in out.out and "disabled" in out.out


def test_fit_enabled_logs_adabatch_metrics(tiny_charlm, tmp_path):
    assert main([*tiny_charlm, "--adabatch.enabled=true"]) == 0
    columns = set(_metrics(tmp_path)[0])
    assert {"adabatch/gns", "adabatch/batch_size", "adabatch/samples"} <= columns, sorted(columns)
    summary = json.loads((tmp_path / "run" / "v" / "summary.json").read_text())
    assert summary["enabled"] is True and summary["stop_reason"] == "max_steps"
    assert summary["steps"] == 4 and summary["samples"] == 16
    assert summary["batch_size_history"][0] == {"step": 0, "samples": 0, "batch_size": 4}
    assert summary["noise_source"] in ("per_example", "microbatch")


def test_no_config_defaults_to_the_charlm_task(capsys):
    assert with_default_task(["fit"]) == ["fit", *DEFAULT_TASK]
    assert with_default_task(["fit", "--model.lr=0.1"]) == ["fit", *DEFAULT_TASK, "--model.lr=0.1"]
    for chosen in (["--config", "x.yaml"], ["-c=x.yaml"], ["--model=DigitsCNN"]):
        assert with_default_task(["fit", *chosen]) == ["fit", *chosen]
    with pytest.raises(SystemExit) as e:
        main(["fit", "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "adabatch.tasks.charlm.CharLM" in out and "adabatch.tasks.charlm.CharLMData" in out
    assert "adabatch:" in out and "enabled: true" in out


@pytest.mark.parametrize("flag, names", [
    ("--model.not_an_arg=1", ["not_an_arg"]),
    ("--adabatch.policy=sometimes", ["adabatch.policy", "sometimes"]),
    ("--adabatch.no_such_key=1", ["no_such_key"]),
])
def test_bad_key_or_value_names_it(tiny_charlm, capsys, flag, names):
    with pytest.raises(SystemExit) as e:
        main([*tiny_charlm, flag])
    assert e.value.code != 0
    err = capsys.readouterr().err
    for name in names:
        assert name in err


def test_bad_task_value_names_it(tiny_charlm):
    with pytest.raises(ValueError, match=r"lr=-1.0 must be > 0"):
        main([*tiny_charlm, "--model.lr=-1"])


def test_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "adabatch sweep" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2


def test_a_users_policy_subclass_is_selected_by_class_path(tiny_charlm, tmp_path, monkeypatch):
    """The LightningCLI section takes any Policy subclass by class_path, with its own and the
    base class's arguments (the discipline), and the run uses it."""
    (tmp_path / "my_policy.py").write_text(
        "from adabatch import Policy\n"
        "class Doubling(Policy):\n"
        "    def __init__(self, every: int = 8, **discipline):\n"
        "        super().__init__(**discipline)\n"
        "        self.every = every\n"
        "    def target(self, obs):\n"
        "        return self.bounds.lo * 2 ** (obs.samples // self.every)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    main([*tiny_charlm, "--adabatch.policy=my_policy.Doubling",
          "--adabatch.policy.every=8", "--adabatch.policy.hysteresis=0.0",
          "--adabatch.policy.min_samples_between_changes=0",  # the config sets 2000
          "--adabatch.max_batch_size=16", "--trainer.max_steps=6"])
    import json

    summary = json.loads((tmp_path / "run" / "v" / "summary.json").read_text())
    sizes = [h["batch_size"] for h in summary["batch_size_history"]]
    assert max(sizes) > 4, sizes
