"""``adabatch fit|validate|test``: a `LightningCLI` with an ``adabatch:`` section.

The `AdaptiveBatchSize` callback is always built (``adabatch.enabled=false`` makes it a
no-op); a `CSVLogger` under ``runs/`` and `SummaryFile` (``summary.json``) are trainer
defaults.
With neither a config nor a model/data class the char-LM task runs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from adabatch.callback import AdaptiveBatchSize
from adabatch.cli.keys import misspelled
from adabatch.cli.main import SUBCOMMANDS, SUMMARY_FILE
from adabatch.summary import RunSummary, print_summary

# The tasks are imported so that their short class names resolve (``model: CharLM``).
from adabatch.tasks.charlm import CharLM, CharLMData
from adabatch.tasks.digits import DigitsCNN, DigitsData  # noqa: F401
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel  # noqa: F401


class SummaryFile(Callback):
    """Writes the fit's `RunSummary` to ``summary.json`` in the logger's directory (rank 0).

    The summary is the `AdaptiveBatchSize` callback's own (``run_summary``, which it also
    prints); with adabatch disabled it is built from the trainer here and printed, so a
    fixed-batch baseline reports the same fields. ``adabatch sweep`` reads the file.
    """

    def __init__(self) -> None:
        self._t0: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        cb = _adabatch_callback(trainer)
        summary = getattr(cb, "run_summary", None)
        if summary is None:  # disabled (or absent): the callback did nothing
            summary = RunSummary.from_trainer(trainer, cb, t_start=self._t0)
            print_summary(summary)
        if trainer.log_dir:
            path = Path(trainer.log_dir, SUMMARY_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


def _adabatch_callback(trainer: Trainer) -> AdaptiveBatchSize | None:
    for cb in trainer.callbacks:
        if isinstance(cb, AdaptiveBatchSize):
            return cb
    return None


class AdabatchCLI(LightningCLI):
    """`LightningCLI` with the `AdaptiveBatchSize` callback under a top-level ``adabatch:`` key.

    Any LightningModule/LightningDataModule can be selected with ``model:``/``data:``
    (``class_path`` or a short name of a built-in task); `cli_main` and `main` default to
    the char-LM task when neither a config nor a model/data class is given.
    Trainer defaults: a `CSVLogger` under ``runs/`` and `SummaryFile`. A misspelled key
    gets a "did you mean" line after jsonargparse's error (`cli.keys`).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(AdaptiveBatchSize, "adabatch")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except SystemExit as e:
            if e.code and isinstance(args, list) and args and args[0] in SUBCOMMANDS:
                sub = parser._subcommands_action._name_parser_map[args[0]]
                for hint in misspelled(sub, args[1:]):
                    sys.stderr.write(f"adabatch: {hint}\n")
            raise


class _ParserBuilt(Exception):
    def __init__(self, parser: LightningArgumentParser) -> None:
        self.parser = parser


class _ParserOnlyCLI(AdabatchCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raise _ParserBuilt(parser)


def build_parser() -> LightningArgumentParser:
    """The ``adabatch`` LightningCLI parser (with its subcommands), built but not used."""
    try:
        _ParserOnlyCLI(**_cli_kwargs(), args=["fit"], run=True)
    except _ParserBuilt as built:
        return built.parser
    raise RuntimeError("LightningCLI did not parse its arguments")  # pragma: no cover


DEFAULT_TASK = [
    f"--model={CharLM.__module__}.{CharLM.__qualname__}",
    f"--data={CharLMData.__module__}.{CharLMData.__qualname__}",
]


def with_default_task(args: Sequence[str]) -> list[str]:
    """Insert the char-LM task after the subcommand when no config, model or data is given.

    Not a parser default: jsonargparse carries a default class's ``init_args`` over to
    another class selected later (a digits config would inherit the char-LM's optimizer).
    """
    args = list(args)
    if not args or args[0] not in ("fit", "validate", "test"):
        return args
    chooses = ("-c", "--config", "--model", "--data", "--model.class_path", "--data.class_path")
    if any(a.split("=", 1)[0] in chooses for a in args[1:]):
        return args
    return [args[0], *DEFAULT_TASK, *args[1:]]


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> AdabatchCLI:
    """Build (and with ``run`` execute) the LightningCLI part of ``adabatch``.

    ``args`` None parses ``sys.argv``; a list is parsed instead (in-process use, sweeps and
    tests), with the char-LM task inserted when nothing selects one.
    """
    saved = sys.argv
    argv = list(sys.argv[1:] if args is None else args)
    sys.argv = sys.argv[:1]  # LightningCLI warns when both args and sys.argv hold arguments
    try:
        return AdabatchCLI(**_cli_kwargs(), args=with_default_task(argv), run=run)
    finally:
        sys.argv = saved


def _cli_kwargs() -> dict[str, Any]:
    return {
        "model_class": None,
        "datamodule_class": None,
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "seed_everything_default": 0,
        "trainer_defaults": {
            "logger": {"class_path": f"{CSVLogger.__module__}.CSVLogger",
                       "init_args": {"save_dir": "runs", "name": "adabatch"}},
            "callbacks": [SummaryFile()],
        },
        "save_config_kwargs": {"overwrite": True},
        "parser_kwargs": {"prog": "adabatch"},
    }
