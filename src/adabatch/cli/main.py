"""The ``adabatch`` command.

- ``adabatch fit|validate|test [--config FILE] [--section.key=value ...]``: a `LightningCLI`
  with an ``adabatch:`` section (the `AdaptiveBatchSize` callback, always built;
  ``adabatch.enabled=false`` makes it a no-op). With no config it trains the char-LM task.
- ``adabatch sweep ...``: Optuna grid/random/TPE search over any config key (`cli.sweep`).
- ``adabatch plot ...``: PNG figures from a run's or a sweep's logs (`cli.plot`).
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

# The tasks are imported so that their short class names resolve (``model: CharLM``).
from adabatch.tasks.charlm import CharLM, CharLMData
from adabatch.tasks.digits import DigitsCNN, DigitsData  # noqa: F401
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel  # noqa: F401

USAGE = """\
usage: adabatch {fit,validate,test} [--config FILE] [--KEY=VALUE ...]
       adabatch sweep (--config FILE --grid KEY=V1,V2 ... | --sweep SWEEP.yaml) [options]
       adabatch plot RUN_DIR_OR_METRICS_CSV [-o OUT.png]
       adabatch plot --sweep SWEEP_DIR [-o OUT.png]

Adaptive batch size for PyTorch Lightning, driven by the gradient noise scale.

commands:
  fit        train (default task without --config: the char-LM on stdlib source)
  validate   run one validation epoch
  test       run one test epoch
  sweep      Optuna search over any config key (see `adabatch sweep --help`)
  plot       figures from a run's or a sweep's metrics (see `adabatch plot --help`)

examples:
  adabatch fit --config configs/charlm.yaml
  adabatch fit --config configs/digits.yaml --adabatch.enabled=false
  adabatch sweep --config configs/synthetic.yaml --grid model.lr=0.01,0.03
  adabatch plot runs/charlm/version_0 -o charlm.png
"""

SUMMARY_FILE = "summary.json"


class RunSummary(Callback):
    """Tracks a fit's samples and global batch size and prints a closing summary.

    The global batch of each optimizer step is counted from the batches delivered between
    two steps (so it is right with or without the adabatch callback, under gradient
    accumulation or a resizing sampler). At the end of fit, rank 0 prints final losses,
    optimizer steps, samples, wall time and the batch-size history, and writes them to
    ``summary.json`` in the logger's directory (read by ``adabatch sweep``).
    """

    def __init__(self) -> None:
        self.samples = 0
        self.history: list[dict[str, int]] = []
        self._pending = 0
        self._last_step = 0
        self._t0 = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        n = _batch_len(batch) * trainer.world_size
        self.samples += n
        self._pending += n
        if trainer.global_step != self._last_step:  # an optimizer step just happened
            if not self.history or self.history[-1]["batch_size"] != self._pending:
                self.history.append({"step": self._last_step,
                                     "samples": self.samples - self._pending,
                                     "batch_size": self._pending})
            self._pending = 0
            self._last_step = trainer.global_step

    def summary(self, trainer: Trainer) -> dict[str, Any]:
        """The run's closing numbers as a JSON-ready dict."""
        metrics = trainer.callback_metrics
        wall = time.perf_counter() - self._t0
        out: dict[str, Any] = {
            "train_loss": _scalar(metrics.get("train_loss")),
            "val_loss": _scalar(metrics.get("val_loss")),
            "steps": trainer.global_step,
            "samples": self.samples,
            "wall_time_s": round(wall, 3),
            "samples_per_s": round(self.samples / wall, 1) if wall > 0 else None,
            "batch_size_history": self.history,
            "log_dir": trainer.log_dir,
        }
        for cb in trainer.callbacks:
            if isinstance(cb, AdaptiveBatchSize):
                out["adabatch_enabled"] = bool(cb.enabled)
                history = getattr(cb, "history", None)
                if history is not None:
                    out["adabatch_history"] = _jsonable(history)
        return out

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        s = self.summary(trainer)
        if s["log_dir"]:
            path = Path(s["log_dir"], SUMMARY_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(s, indent=2) + "\n")
        print(format_summary(s), flush=True)


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable closing summary of a fit (see `RunSummary.summary`)."""

    def loss(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    hist = s["batch_size_history"]
    if len(hist) > 12:  # keep the first and last changes
        hist = hist[:6] + [None] + hist[-5:]
    changes = " -> ".join("..." if h is None else
                          f"{h['batch_size']} (step {h['step']}, {h['samples']:,} samples)"
                          for h in hist) or "n/a"
    rate = f", {s['samples_per_s']:,.0f} samples/s" if s["samples_per_s"] else ""
    lines = [
        "",
        "adabatch fit summary",
        f"  train_loss {loss(s['train_loss'])}   val_loss {loss(s['val_loss'])}",
        f"  optimizer steps {s['steps']:,}   samples {s['samples']:,}   "
        f"wall {s['wall_time_s']:.1f} s{rate}",
        f"  global batch size: {changes}",
    ]
    if "adabatch_enabled" in s:
        lines.append(f"  adabatch enabled: {s['adabatch_enabled']}")
    if s.get("log_dir"):
        lines.append(f"  logs: {s['log_dir']} (plot: adabatch plot {s['log_dir']})")
    return "\n".join(lines)


class AdabatchCLI(LightningCLI):
    """`LightningCLI` with the `AdaptiveBatchSize` callback under a top-level ``adabatch:`` key.

    Any LightningModule/LightningDataModule can be selected with ``model:``/``data:``
    (``class_path`` or a short name of a built-in task); `cli_main` and `main` default to
    the char-LM task when neither a config nor a model/data class is given.
    Trainer defaults: a `CSVLogger` under ``runs/`` and the `RunSummary` callback.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(AdaptiveBatchSize, "adabatch")


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
    """Build (and with ``run`` execute) the LightningCLI part of ``adabatch``."""
    return AdabatchCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={
            "logger": {"class_path": f"{CSVLogger.__module__}.CSVLogger",
                       "init_args": {"save_dir": "runs", "name": "adabatch"}},
            "callbacks": [RunSummary()],
        },
        save_config_kwargs={"overwrite": True},
        args=None if args is None else with_default_task(args),
        run=run,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adabatch`` command."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(USAGE)
        return 2
    command = argv[0]
    if command in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if command == "--version":
        from adabatch import __version__

        print(f"adabatch {__version__}")
        return 0
    if command == "sweep":
        from adabatch.cli.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if command == "plot":
        from adabatch.cli.plot import main as plot_main

        return plot_main(argv[1:])
    if command not in AdabatchCLI.subcommands() or command == "predict":
        sys.stderr.write(f"adabatch: unknown command {command!r}\n\n{USAGE}")
        return 2
    if from_sys:  # LightningCLI warns when given args while sys.argv has some: use sys.argv
        sys.argv[1:] = with_default_task(argv)
        cli_main(None)
    else:
        cli_main(argv)
    return 0


def _batch_len(batch: Any) -> int:
    first = batch
    while isinstance(first, (list, tuple)):
        first = first[0]
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(first.shape[0]) if hasattr(first, "shape") else len(first)


def _scalar(value: Any) -> float | None:
    return None if value is None else float(value)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


if __name__ == "__main__":
    sys.exit(main())
