"""benchmarks/readme_commands.py: its RESULTS section from two runs' summaries."""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
rc = importlib.import_module("readme_commands")


def _row(name, wall, samples, steps, sizes, reason):
    hist = [{"step": 0, "samples": 0, "batch_size": b} for b in sizes]
    return {"name": name, "wall_s": wall,
            "summary": {"samples": samples, "steps": steps, "samples_per_s": samples / wall,
                        "val_loss": 1.5, "batch_size_history": hist, "stop_reason": reason}}


def test_report_quotes_each_run_and_the_wall_time_ratio():
    text = rc.report([_row("adaptive", 58.0, 40000, 2400, [8, 16, 24], "max_samples"),
                      _row("fixed", 36.0, 40000, 5000, [8], "max_steps")], ["--x"], "1/1/1")
    assert "| adaptive | 58.0 | 40,000 | 2,400 | 690 | 1.500 | 8 -> 16 -> 24 | max_samples |" \
        in text
    assert "| fixed | 36.0 | 40,000 | 5,000 | 1111 | 1.500 | 8 | max_steps |" in text
    assert "adaptive / fixed wall time: 1.61x" in text
    assert "`python benchmarks/readme_commands.py --x`" in text
