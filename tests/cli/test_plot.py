import matplotlib.image
import numpy as np
import pytest

from adabatch.cli.metrics import Metrics, load_run
from adabatch.cli.plot import PANELS, build_run_figure, main, plot_run

HEADER = ("adabatch/batch_size,adabatch/gns,adabatch/lr_factor,adabatch/samples,"
          "adabatch/target_batch_size,epoch,step,train_loss,val_loss,synthetic/exact_gns\n")


def _write_run(path):
    """An adaptive run: the batch doubles every 10 steps, the target leads it by 16."""
    lines = [HEADER]
    samples, batch = 0, 16
    for step in range(0, 40):
        samples += batch
        lines.append(f"{batch},{10 + 3 * step},{batch / 16},{samples},{batch + 16},0,{step},"
                     f"{2.0 / (1 + step)},,{12 + 3 * step}\n")
        if step % 10 == 9:
            lines.append(f",,,,,0,{step},,{2.2 / (1 + step)},\n")
            batch *= 2
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text("".join(lines))


def _write_fixed_run(path, batch=8, accumulation=2):
    """A run with adabatch disabled: losses only, the batch in LightningCLI's config.yaml."""
    path.mkdir(parents=True)
    rows = ["epoch,step,train_loss\n"] + [f"0,{s},{1.0 / (1 + s)}\n" for s in range(0, 30, 3)]
    (path / "metrics.csv").write_text("".join(rows))
    (path / "config.yaml").write_text(
        f"trainer:\n  accumulate_grad_batches: {accumulation}\n  devices: auto\n"
        f"data:\n  class_path: x.Data\n  init_args:\n    batch_size: {batch}\n")


def test_samples_axis_interpolates_validation_rows(tmp_path):
    _write_run(tmp_path / "run" / "version_0")
    m = Metrics(tmp_path / "run" / "version_0" / "metrics.csv")
    x, y, label = m.series("val_loss")
    assert label == "samples" and len(x) == 4
    assert x[0] == 160  # step 9 is at 10 x 16 samples
    assert m.series("val_loss", x="step")[2] == "step"


def test_a_fixed_run_is_put_on_samples_by_its_configured_batch(tmp_path):
    _write_fixed_run(tmp_path / "fixed")
    m = load_run(tmp_path / "fixed")
    assert m.batch_size == 16  # micro-batch 8 x accumulation 2
    x, y, name = m.series("train_loss")
    assert name == "samples"
    np.testing.assert_array_equal(x, np.arange(0, 30, 3) * 16)


def test_tensorboard_events_read_like_the_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    written = {s: (2.0 / (1 + s), 8.0 * (s + 1)) for s in range(0, 20, 2)}
    for step, (loss, samples) in written.items():
        logger.log_metrics({"train_loss": loss, "adabatch/samples": samples}, step=step)
    logger.finalize("success")
    m = load_run(tmp_path / "tb")  # finds the event file below
    x, y, name = m.series("train_loss")
    assert name == "samples"
    np.testing.assert_allclose(x, [samples for _, samples in written.values()])
    np.testing.assert_allclose(y, [loss for loss, _ in written.values()], rtol=1e-6)


def _lines(ax):
    return {line.get_label(): line for line in ax.lines}


def test_overlay_labels_every_axis_and_draws_target_and_baseline(tmp_path):
    _write_run(tmp_path / "ada")
    _write_fixed_run(tmp_path / "fixed")
    fig = build_run_figure([load_run(tmp_path / "ada"), load_run(tmp_path / "fixed")],
                           ["adaptive", "fixed"])
    axes = np.array(fig.axes).reshape(len(PANELS), 2)
    for (_title, y_label, _), row in zip(PANELS, axes):
        for ax, x_label in zip(row, ("samples (training examples seen)", "optimizer steps")):
            assert ax.get_ylabel() == y_label and "(" in y_label  # units given
            assert ax.get_xlabel() == x_label
    loss_vs_samples = _lines(axes[0][0])
    fixed = loss_vs_samples["fixed: train_loss"]
    np.testing.assert_array_equal(fixed.get_xdata(), np.arange(0, 30, 3) * 16)
    assert "adaptive: val_loss" in loss_vs_samples
    batch = _lines(axes[2][0])
    target = batch["adaptive: policy target"]
    np.testing.assert_array_equal(target.get_ydata(), _lines(axes[2][1])[
        "adaptive: policy target"].get_ydata())
    assert target.get_ydata()[0] == 32 and target.get_linestyle() == ":"
    assert "fixed: fixed 16 (config)" in batch
    assert "not logged" not in [t.get_text() for t in axes[1][0].texts]  # the adaptive gns


def test_run_plot_is_a_png(tmp_path, capsys):
    _write_run(tmp_path / "run" / "version_0")
    out = plot_run(tmp_path / "run", tmp_path / "out.png")  # finds metrics.csv below
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 300
    _write_fixed_run(tmp_path / "fixed")
    assert main([str(tmp_path / "run" / "version_0" / "metrics.csv"), str(tmp_path / "fixed"),
                 "--label", "a", "--label", "b", "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_missing_input_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--sweep", str(tmp_path)])
    assert "sweep.json" in capsys.readouterr().err
    _write_fixed_run(tmp_path / "fixed")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "fixed"), "--label", "a", "--label", "b"])
    assert "2 --label value(s) for 1 run(s)" in capsys.readouterr().err
