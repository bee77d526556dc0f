"""Every figure the README's commands draw, drawn by those commands on tiny runs."""

from pathlib import Path

import matplotlib.image
import numpy as np

from adabatch.cli.main import main
from adabatch.cli.metrics import load_run
from adabatch.cli.plot import build_run_figure

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
COMPARE = ("adabatch plot runs/charlm/version_0 runs/charlm/version_1 --label adaptive "
           "--label fixed -o compare.png")


def test_the_readme_compare_plot_on_a_tiny_adaptive_run_and_its_baseline(tiny_charlm, tmp_path):
    assert COMPARE in README  # the command tested here is the one the README shows
    runs = tmp_path / "run"
    assert main([*tiny_charlm, "--trainer.logger.version=version_0"]) == 0
    assert main([*tiny_charlm, "--trainer.logger.version=version_1",
                 "--adabatch.enabled=false"]) == 0
    args = COMPARE.split()[2:]
    args = [str(runs / Path(a).name) if a.startswith("runs/") else a for a in args]
    args[args.index("-o") + 1] = str(tmp_path / "compare.png")
    assert main(["plot", *args]) == 0
    img = matplotlib.image.imread(tmp_path / "compare.png")
    assert img.shape[0] > 500 and img.shape[1] > 500

    fig = build_run_figure([load_run(runs / "version_0"), load_run(runs / "version_1")],
                           ["adaptive", "fixed"])
    loss_vs_samples, batch_vs_samples = fig.axes[0], fig.axes[4]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    labels = {line.get_label(): line for line in loss_vs_samples.lines}
    # the baseline (no adabatch/samples logged) is on the samples axis: steps x batch 4
    fixed = labels["fixed: train_loss"]
    assert np.all(np.diff(fixed.get_xdata()) > 0) and fixed.get_xdata().max() <= 16
    assert "adaptive: train_loss" in labels
    batch = {line.get_label() for line in batch_vs_samples.lines}
    assert {"adaptive: adabatch/batch_size", "adaptive: policy target",
            "fixed: fixed 4 (config)"} <= batch
