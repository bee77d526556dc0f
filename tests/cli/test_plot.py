import matplotlib.image
import pytest

from adabatch.cli.plot import Metrics, main, plot_run

HEADER = ("adabatch/batch_size,adabatch/gns,adabatch/lr_factor,adabatch/samples,epoch,step,"
          "train_loss,val_loss,synthetic/exact_gns\n")


def _write_run(path):
    lines = [HEADER]
    samples, batch = 0, 16
    for step in range(0, 40):
        samples += batch
        lines.append(f"{batch},{10 + 3 * step},{batch / 16},{samples},0,{step},"
                     f"{2.0 / (1 + step)},,{12 + 3 * step}\n")
        if step % 10 == 9:
            lines.append(f",,,,0,{step},,{2.2 / (1 + step)},\n")
            batch *= 2
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text("".join(lines))


def test_samples_axis_interpolates_validation_rows(tmp_path):
    _write_run(tmp_path / "run" / "version_0")
    m = Metrics(tmp_path / "run" / "version_0" / "metrics.csv")
    x, y, label = m.series("val_loss")
    assert label == "samples" and len(x) == 4
    assert x[0] == 160  # step 9 is at 10 x 16 samples
    assert m.series("val_loss", x="step")[2] == "optimizer step"


def test_run_plot_is_a_png(tmp_path, capsys):
    _write_run(tmp_path / "run" / "version_0")
    out = plot_run(tmp_path / "run", tmp_path / "out.png")  # finds metrics.csv below
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert main([str(tmp_path / "run" / "version_0" / "metrics.csv"), "-o",
                 str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_missing_input_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--sweep", str(tmp_path)])
    assert "sweep.json" in capsys.readouterr().err
