"""Bad input named at the CLI: misspelled keys, counts written as 1e6, bounds that cannot hold."""

import pytest
from jsonargparse import ArgumentError, ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException

from adabatch.cli.keys import is_known, known_keys, suggestions
from adabatch.cli.main import main
from adabatch.types import Count


def test_misspelled_key_gets_did_you_mean(tiny_charlm, capsys):
    with pytest.raises(SystemExit) as e:
        main([*tiny_charlm, "--adabatch.max_batchsize=4", "--print_config"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "did you mean 'adabatch.max_batch_size'?" in err


def test_model_keys_are_known_in_short_and_long_form(tmp_path):
    from jsonargparse import Namespace

    cfg = Namespace()
    cfg["model.class_path"] = "x.M"
    cfg["model.init_args.lr"] = 0.1
    cfg["trainer.max_steps"] = 3
    known = known_keys(cfg)
    assert is_known("model.lr", known) and is_known("model.init_args.lr", known)
    assert not is_known("model.lrr", known) and suggestions("model.lrr", known) == ["model.lr"]
    assert is_known("trainer.logger.init_args.save_dir", known | {"trainer.logger"})
    assert suggestions("zzz", known) == []


class _Budget:
    def __init__(self, max_samples: Count | None = None, steps: Count = 1) -> None:
        self.max_samples, self.steps = max_samples, steps


@pytest.mark.parametrize("text, value", [("1e6", 1_000_000), ("2.5e3", 2500), ("1_000", 1000),
                                         ("40000", 40_000), ("null", None)])
def test_count_accepts_scientific_integers(text, value):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(_Budget, "b")
    got = parser.parse_args([f"--b.max_samples={text}"]).b.max_samples
    assert got == value and (value is None or type(got) is Count)


@pytest.mark.parametrize("text", ["1.5", "1e-3", "true", "inf", "ten"])
def test_count_refuses_non_integers_naming_the_value(text):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(_Budget, "b")
    with pytest.raises(ArgumentError, match=repr(text).replace(".", r"\.")):
        parser.parse_args([f"--b.steps={text}"])


def test_max_samples_1e6_on_the_command_line(tiny_charlm, capsys):
    with pytest.raises(SystemExit) as e:
        main([*tiny_charlm, "--adabatch.max_samples=1e6", "--print_config"])
    assert e.value.code == 0 and "max_samples: 1000000" in capsys.readouterr().out


def test_a_bound_below_the_starting_batch_is_refused(tiny_charlm):
    # tiny_charlm starts at batch 4; a maximum of 2 cannot be honoured.
    try:
        main([*tiny_charlm, "--adabatch.max_batch_size=2"])
    except MisconfigurationException as e:
        assert "max_batch_size=2" in str(e)
        return
    raise AssertionError("max_batch_size=2 below the starting batch 4 was accepted")
