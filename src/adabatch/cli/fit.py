"""``adabatch fit|validate|test``: a `LightningCLI` with an ``adabatch:`` section.

The `AdaptiveBatchSize` callback is always built (``adabatch.enabled=false`` makes it a
no-op); a `CSVLogger` under ``runs/`` and the `RunSummary` callback are trainer defaults.
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
from adabatch.cli.main import SUMMARY_FILE

# The tasks are imported so that their short class names resolve (``model: CharLM``).
from adabatch.tasks.charlm import CharLM, CharLMData
from adabatch.tasks.digits import DigitsCNN, DigitsData  # noqa: F401
from adabatch.tasks.synthetic import LeastSquaresData, LeastSquaresModel  # noqa: F401


class RunSummary(Callback):
    """Tracks a fit's samples and global batch size and prints a closing summary.

    At the end of fit, rank 0 prints final losses, optimizer steps, samples, wall time and
    the batch-size history, and writes them to ``summary.json`` in the logger's directory
    (read by ``adabatch sweep``). The history is the `AdaptiveBatchSize` callback's
    ``history`` of decisions when it is enabled and has one; otherwise the global batch of
    each optimizer step as counted from the batches delivered between two steps (right under
    accumulation or a resizing sampler; an epoch's last step may be short, as Lightning
    steps on an epoch's last batch whatever the accumulation count).
    """

    def __init__(self) -> None:
        self.samples = 0
        self.history: list[dict[str, int]] = []
        self._pending = 0
        self._last_step = 0
        self._t0 = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # counts cover this fit call (a resumed run counts from its checkpoint's step on)
        self.samples, self.history, self._pending = 0, [], 0
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
            "batch_size_source": "counted",
            "log_dir": trainer.log_dir,
        }
        for cb in trainer.callbacks:
            if isinstance(cb, AdaptiveBatchSize):
                out["adabatch_enabled"] = bool(cb.enabled)
                decisions = getattr(cb, "history", None)
                if cb.enabled and isinstance(decisions, list):
                    # the starting batch as counted, then each decision of the callback
                    out["batch_size_history"] = self.history[:1] + _jsonable(decisions)
                    out["batch_size_source"] = "adabatch"
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
    def change(h: Any) -> str:
        if not isinstance(h, dict):  # a history entry of an unknown shape
            return str(h)
        samples = h.get("samples")
        samples = f"{samples:,.0f}" if isinstance(samples, (int, float)) else "?"
        return f"{h.get('batch_size', '?')} (step {h.get('step', '?')}, {samples} samples)"

    changes = " -> ".join("..." if h is None else change(h) for h in hist) or "n/a"
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
    """Build (and with ``run`` execute) the LightningCLI part of ``adabatch``.

    ``args`` None parses ``sys.argv``; a list is parsed instead (in-process use, sweeps and
    tests), with the char-LM task inserted when nothing selects one.
    """
    saved = sys.argv
    if args is not None:  # LightningCLI warns when both args and sys.argv hold arguments
        sys.argv = sys.argv[:1]
    try:
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
            parser_kwargs={"prog": "adabatch"},
            args=None if args is None else with_default_task(args),
            run=run,
        )
    finally:
        sys.argv = saved


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
    return json.loads(json.dumps(value, default=repr))

