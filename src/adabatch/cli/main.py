"""The ``adabatch`` command: dispatches to fit/validate/test, sweep and plot.

- ``adabatch fit|validate|test [--config FILE] [--section.key=value ...]``: `cli.fit`, a
  `LightningCLI` with an ``adabatch:`` section. With no config it trains the char-LM task.
- ``adabatch sweep ...``: Optuna grid/random/TPE search over any config key (`cli.sweep`).
- ``adabatch plot ...``: PNG figures from a run's or a sweep's logs (`cli.plot`).

Each command imports only what it needs (``plot`` and the ``sweep`` driver never import
Lightning), so they start in a fraction of the time a training run does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

SUBCOMMANDS = ("fit", "validate", "test")
SUMMARY_FILE = "summary.json"  # written by `cli.fit.RunSummary`, read by `cli.sweep`

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adabatch`` command."""
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
    if command not in SUBCOMMANDS:
        sys.stderr.write(f"adabatch: unknown command {command!r}\n\n{USAGE}")
        return 2
    from adabatch.cli.fit import cli_main

    cli_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
