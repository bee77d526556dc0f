"""Smoke tests of the benchmark scripts (their ``--quick`` modes, in-process) and table
tests of the analysis helpers they share."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

common = importlib.import_module("common")
ttt = importlib.import_module("time_to_target")

OTHER = "<!-- other:start -->\nkept as is\n<!-- other:end -->"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Benchmark results\n\n{OTHER}\n")
    return path


def _section(path: Path, name: str) -> str:
    text = path.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, text
    assert OTHER in text, "another script's section was clobbered"
    return text[text.index(start): text.index(end)]


# ----------------------------------------------------------------------------- common
def test_write_section_creates_replaces_and_keeps_others(tmp_path):
    path = tmp_path / "sub" / "RESULTS.md"
    common.write_section(path, "a", "first")
    assert path.read_text().startswith("# Benchmark results\n")
    common.write_section(path, "b", "bee")
    common.write_section(path, "a", "second")
    text = path.read_text()
    assert "first" not in text and "second" in text and "bee" in text
    assert text.index("<!-- a:start -->") < text.index("<!-- b:start -->")


def test_geometric_schedule_is_dense_then_sparse():
    due = common.geometric_schedule(ratio=1.5, dense=3)
    steps = [s for s in range(1, 30) if due(s)]
    assert steps[:3] == [1, 2, 3]
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert len(steps) < 12


# ----------------------------------------------------------------------------- analysis
def test_pareto_and_frontier_interpolation():
    front = ttt.pareto([(100.0, 50.0), (200.0, 20.0), (150.0, 60.0), (400.0, 10.0),
                        (800.0, 10.0), (math.nan, 1.0)])
    assert front == [(100.0, 50.0), (200.0, 20.0), (400.0, 10.0)]
    # log-log midpoint between (200, 20) and (400, 10), no tolerance
    assert ttt.frontier_steps(front, 200 * math.sqrt(2), tol=0.0) == pytest.approx(
        20 / math.sqrt(2))
    # below the fewest samples: that point, plus the tolerance
    assert ttt.frontier_steps(front, 10.0, tol=0.0) == 50.0
    assert ttt.frontier_steps(front, 1e9, tol=0.0) == 10.0
    assert ttt.frontier_samples(front, 20.0) == pytest.approx(200.0)
    assert ttt.frontier_samples(front, 1.0) == 400.0


def test_mccandlish_fit_recovers_the_model():
    s_min, e_min = 30.0, 5000.0
    runs = [(b, s_min + e_min / b) for b in (8, 32, 128, 512, 2048)]
    fit = ttt.fit_mccandlish(runs)
    assert fit == pytest.approx((s_min, e_min), rel=1e-9)


def test_trajectory_model_gamma_and_p():
    rec = common.RunRecord()
    # B = c * B_noise along a growing B_noise: P = 1 (no saving), gamma < 1
    rec.gns = [10.0 * 1.1**i for i in range(60)]
    rec.batch = [max(1, round(0.5 * g)) for g in rec.gns]
    out = ttt.trajectory_model(rec)
    assert out["P"] == pytest.approx(1.0, abs=0.02)
    assert out["gamma"] < 0.9
    # constant B_noise: gamma = 1 whatever the batch
    rec.gns = [50.0] * 20
    rec.batch = [8] * 20
    assert ttt.trajectory_model(rec)["gamma"] == pytest.approx(1.0)
    assert ttt.predicted_saving(1.0, 2000.0, 1000.0) == pytest.approx(0.0)
    assert ttt.predicted_saving(0.5, 2000.0, 1000.0) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- scripts
def test_time_to_target_quick(results, tmp_path):
    outs = ttt.main(["--quick", "--results", str(results), "--figures", str(tmp_path / "fig")])
    section = _section(results, "time_to_target")
    assert "- command: `python benchmarks/time_to_target.py --quick" in section
    assert "- goal: synthetic" in section and ("**met**" in section or "**missed**" in section)
    assert "torch" in section and "lightning" in section
    (out,) = outs
    assert {r.kind for r in out["results"]} == {"fixed", "adaptive"}
    assert all(r.record.reached for r in out["results"] if r.kind == "fixed")
    assert (tmp_path / "fig" / "time_to_target_synthetic.png").stat().st_size > 0


def test_rule_fidelity_quick(results):
    rf = importlib.import_module("rule_fidelity")
    out = rf.main(["--quick", "--results", str(results)])
    section = _section(results, "rule_fidelity")
    assert section.count("- goal: ") == 2
    gap_on, gap_off = out["results"][("sgdFalse", 4, "on")][0], out["results"][
        ("sgdFalse", 4, "off")][0]
    assert gap_on < gap_off  # the linear rule must beat no rule even in the tiny setting


def test_overhead_quick(results):
    ov = importlib.import_module("overhead")
    out = ov.main(["--quick", "--results", str(results)])
    section = _section(results, "overhead")
    assert "micro-batch probe" in section and "per-example (torch)" in section
    assert all(s["n"] > 0 and s["median"] > 0 for s in out["stats"].values())


# ----------------------------------------------------------------------------- mutants
def test_every_mutant_applies_to_todays_code(tmp_path):
    """benchmarks/mutants.py is run by hand; this keeps its patches from drifting silently."""
    mutants = importlib.import_module("mutants")
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names)) >= 6
    root = Path(mutants.ROOT)
    for m in mutants.MUTANTS:
        target = tmp_path / m.name / m.path
        target.parent.mkdir(parents=True)
        target.write_text((root / m.path).read_text())
        mutants.apply(m, tmp_path / m.name)  # raises unless the old text occurs exactly once
        assert target.read_text() != (root / m.path).read_text()
        for test in m.tests:
            assert (root / test.split("::")[0]).is_file(), test
