"""Smoke tests of the benchmark scripts (their ``--quick`` modes, in-process) and table
tests of the analysis helpers they share."""

from __future__ import annotations

import importlib
import json
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
    front = common.pareto([(100.0, 50.0), (200.0, 20.0), (150.0, 60.0), (400.0, 10.0),
                        (800.0, 10.0), (math.nan, 1.0)])
    assert front == [(100.0, 50.0), (200.0, 20.0), (400.0, 10.0)]
    # log-log midpoint between (200, 20) and (400, 10), no tolerance
    assert common.frontier_steps(front, 200 * math.sqrt(2), tol=0.0) == pytest.approx(
        20 / math.sqrt(2))
    # below the fewest samples: that point, plus the tolerance
    assert common.frontier_steps(front, 10.0, tol=0.0) == 50.0
    assert common.frontier_steps(front, 1e9, tol=0.0) == 10.0
    assert common.frontier_samples(front, 20.0) == pytest.approx(200.0)
    assert common.frontier_samples(front, 1.0) == 400.0


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
    out = common.trajectory_model(rec)
    assert out["P"] == pytest.approx(1.0, abs=0.02)
    assert out["gamma"] < 0.9
    # constant B_noise: gamma = 1 whatever the batch; each step is worth B / (B + B_noise)
    # minimal steps and B_noise times that in minimal samples
    rec.gns = [50.0] * 20
    rec.batch = [8] * 20
    out = common.trajectory_model(rec)
    assert out["gamma"] == pytest.approx(1.0)
    assert out["s_min"] == pytest.approx(20 * 8 / 58)
    assert out["e_min"] == pytest.approx(20 * 8 * 50 / 58)
    # B_noise 1 for half the progress and 100 for the other half: gamma = (5.5^2) / 50.5
    rec.gns = [1.0] * 10 + [100.0] * 10
    rec.batch = [1] * 10 + [100] * 10  # each step worth 1/2 a minimal step
    assert common.trajectory_model(rec)["gamma"] == pytest.approx(5.5**2 / 50.5)
    assert common.predicted_saving(1.0, 2000.0, 1000.0) == pytest.approx(0.0)
    assert common.predicted_saving(0.5, 2000.0, 1000.0) == pytest.approx(0.25)
    assert math.isnan(common.predicted_saving(0.5, 900.0, 1000.0))


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


# ----------------------------------------------------------------------------- equal_budget
eb = importlib.import_module("equal_budget")


def _point(steps: float, losses: list[float], kind: str = "fixed", seed0: int = 0) -> object:
    runs = [{"steps": steps, "final_loss": v, "wall": 0.0, "seed": seed0 + i}
            for i, v in enumerate(losses)]
    return eb.Point(f"{kind}{steps}", kind, 16, 0.1, runs)


def test_equal_budget_compare_savings_and_domination():
    fixed = [_point(100, [1.00, 1.02]), _point(50, [1.05, 1.06]), _point(25, [1.20, 1.25])]
    # loss equal to the best fixed batch's (overlapping, per-seed differences of both signs):
    # a saving against it, not dominated
    c = eb.compare(_point(60, [1.01, 1.01], "default"), fixed)
    assert c["best"] is fixed[0] and c["vs_best"] == pytest.approx(0.4)
    assert c["matched"] is fixed[0] and c["dominated_by"] == []
    assert c["paired"] == pytest.approx([0.01, -0.01])  # seed by seed
    # overlapping ranges but worse on every seed: worse beyond the (paired) spread
    c = eb.compare(_point(60, [1.01, 1.03], "default"), fixed)
    assert math.isnan(c["vs_best"]) and c["dominated_by"] == []
    # worse than the best beyond the spread: no saving against it; the 50-step batch is
    # better beyond the spread in fewer steps, so it dominates and is the matched one
    c = eb.compare(_point(60, [1.10, 1.12], "default"), fixed)
    assert math.isnan(c["vs_best"])
    assert c["matched"] is fixed[1] and c["vs_matched"] == pytest.approx(-0.2)
    assert c["dominated_by"] == [fixed[1]]
    # unpaired (other seeds): equal steps count as "as few steps"; touching ranges are not
    # "beyond the spread", disjoint ones are
    c = eb.compare(_point(50, [1.06, 1.08], "default", seed0=10), fixed)
    assert c["dominated_by"] == [] and c["matched"] is fixed[1]
    c = eb.compare(_point(50, [1.0601, 1.08], "default", seed0=10), fixed)
    assert c["dominated_by"] == [fixed[1]]
    # a diverged run has no saving
    c = eb.compare(_point(50, [math.inf, 1.0], "default"), fixed)
    assert math.isnan(c["vs_best"]) and c["matched"] is None


def test_equal_budget_quick(results, tmp_path):
    argv = ["--quick", "--results", str(results), "--figures", str(tmp_path / "fig"),
            "--data", str(tmp_path / "data")]
    (out,) = eb.main(argv)
    task = out["task"]
    section = _section(results, "equal_budget")
    assert "- command: `python benchmarks/equal_budget.py --quick" in section
    # not dominated, the three high-growth goals and the constant-lr check
    assert section.count("- goal: ") == 5
    runs = out["raw"]["tuning"] + out["raw"]["runs"] + [r for p in out["adaptive"]
                                                       for r in p.runs]
    # equal budget: every run stops at the first step that reaches N (or diverges: lr tuning)
    assert all(task.budget <= r["samples"] < task.budget + max(task.batches)
               for r in runs if not r["diverged"])
    assert sum(not r["diverged"] for r in runs) >= len(runs) - 2
    # the schedule is the closed form in samples, for fixed and adaptive runs alike
    assert out["schedule_error"] < 1e-6
    assert {r["kind"] for r in runs} == {"fixed", "default", "ramp"}
    fixed_steps = {p.batch: p.steps for p in out["fixed"]}
    assert fixed_steps == {b: task.budget / b for b in task.batches}
    assert (tmp_path / "fig" / f"equal_budget_{task.name}.png").stat().st_size > 0
    # the adaptive runs alone, against the cached fixed runs
    (again,) = eb.main(argv + ["--reuse-fixed", "--variants", "default"])
    assert again["raw"] == json.loads(json.dumps(out["raw"]))
    assert [p.kind for p in again["adaptive"]] == ["default"]
    # another evaluation seed: its fixed runs at the cached tuned lrs, no new tuning; the
    # cache keeps both seeds and a later run on seed 1 alone reads seed 1's runs only
    (more,) = eb.main(argv + ["--reuse-fixed", "--variants", "default", "--seeds", "1", "2"])
    raw = json.loads(json.dumps(out["raw"]))
    assert more["raw"]["tuning"] == raw["tuning"] and more["raw"]["best_lr"] == raw["best_lr"]
    added = [r for r in more["raw"]["runs"] if r["seed"] == 2]
    assert sorted((r["batch"], r["lr"]) for r in added) == sorted(
        (b, raw["best_lr"][str(b)]) for b in task.batches)
    assert {r["seed"] for p in more["adaptive"] for r in p.runs} == {1, 2}
    cached = json.loads((tmp_path / "data" / f"equal_budget_{task.name}.json").read_text())
    assert cached["fixed"]["seeds"] == [1, 2]
    assert [m["seeds"] for m in cached["fixed"]["more_seeds"]] == [[2]]  # provenance
    # re-analysed on seed 1 alone: the cached adaptive runs of seed 2 are left out too
    (only1,) = eb.main(argv + ["--reuse-fixed", "--reuse-adaptive", "--seeds", "1"])
    assert {r["seed"] for p in only1["adaptive"] for r in p.runs} == {1}
    assert {r["seed"] for r in only1["raw"]["runs"]} == {1}
    (back,) = eb.main(argv + ["--reuse-fixed", "--variants", "default"])
    assert back["raw"]["runs"] == raw["runs"] and back["raw"]["seeds"] == [1]
    # one variant run again, the others' cached runs kept, each with its own provenance
    (mixed,) = eb.main(argv + ["--reuse-fixed", "--replace-variants", "--variants", "ramp"])
    assert [p.kind for p in mixed["adaptive"]] == ["default", "ramp"]
    assert mixed["adaptive"][0].runs == json.loads(json.dumps(back["adaptive"][0].runs))
    cached = json.loads((tmp_path / "data" / f"equal_budget_{task.name}_adaptive.json")
                        .read_text())
    assert [m["variants"] for m in cached["measured"]] == [["default"], ["ramp"]]
    assert [m["variants"] for m in mixed["adaptive_measured"]] == [["default"]]


def test_doubling_ramp_spends_equal_samples_per_size():
    from adabatch.control.policy import BatchBounds, Observation

    ramp = eb.DoublingRamp(budget=700)
    ramp.bind(BatchBounds(16, 128, granularity=16))
    # 4 sizes (16, 32, 64, 128), each for 700 / 4 = 175 samples, then the top
    sizes = [ramp.target(Observation(s, 0, 16)) for s in (0, 174, 175, 349, 350, 525, 10_000)]
    assert sizes == [16.0, 16.0, 32.0, 32.0, 64.0, 128.0, 128.0]


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


def test_gns_tracking_quick():
    """The script runs, marks the callback's default window, and on its (seeded) run the
    sixteenth-of-the-samples window errs less than the quarter."""
    gt = importlib.import_module("gns_tracking")
    text = gt.main(["--quick"])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| lower bound")}
    assert set(rows) == {"lower bound, f = 1/4", "lower bound, f = 1/8",
                         "lower bound, f = 1/16 (default)"}
    assert float(rows["lower bound, f = 1/16 (default)"][6]) < float(
        rows["lower bound, f = 1/4"][6])


def test_equal_budget_cache_key_follows_the_data():
    """The cached runs are keyed by what each seed reads: the same data gives the same key,
    another order (seed) another fingerprint."""
    task = eb.get_task("noisefloor", True)
    assert eb.data_fingerprint(task) == eb.data_fingerprint(task)
    assert eb.data_fingerprint(task, seed=2) != eb.data_fingerprint(task, seed=1)
    assert task.config()["data"] == eb.data_fingerprint(task)


# ----------------------------------------------------------------------------- probe_trace
def test_probe_trace_rows_and_final_loss_critical_batch(tmp_path):
    """Each probe's row: r = branch / main progress, its error, and the B_crit the closed
    form gives at r - 2 s.e. (r = 0.75 - 2 x 0.0125, B = 100, k = 2: 100 x 0.45 / 0.275),
    ``inf`` once k B did as well, none without main progress or with an interval spanning
    every answer; the final-loss critical batch is the largest
    fixed batch within the spread of the best."""
    pt = importlib.import_module("probe_trace")
    probe = {"samples": 512, "batch_size": 100, "factor": 2, "gns": 50.0}
    out = {"seed": 1, "run": {"probes": [{**probe, "progress": 0.4, "branch_progress": 0.3,
                                          "ratio_std": 0.0125},
                                         {**probe, "progress": 0.4, "branch_progress": 0.5},
                                         {**probe, "progress": -0.1, "branch_progress": 0.2}]}}
    rows = pt.probe_rows(out)
    assert [r[4:7] for r in rows] == [["0.750", "0.013", "164"], ["1.250", "-", "inf"],
                                      ["-", "-", "none (no main progress)"]]
    wide = {"seed": 1, "run": {"probes": [{**probe, "progress": 0.4, "branch_progress": 0.3,
                                           "ratio_std": 0.2}]}}
    assert pt.probe_rows(wide)[0][6] == "none (interval spans every answer)"
    # a cache whose B=16 and B=32 tie and B=64 loses on every seed
    task = eb.get_task("noisefloor", True)
    runs = [{"kind": "fixed", "batch": b, "lr": 0.1, "seed": s, "steps": 64 // b,
             "final_loss": loss + 0.01 * s, "wall": 0.0}
            for b, loss in ((16, 1.0), (32, 1.0), (64, 1.5)) for s in (1, 2)]
    runs[2]["final_loss"] -= 0.001  # B=32 better on seed 1, worse on seed 2: within the
    runs[3]["final_loss"] += 0.002  # spread of B=16, the best by its median
    (tmp_path / f"equal_budget_{task.name}.json").write_text(json.dumps(
        {"key": eb.config_key(task), "fixed": {"seeds": [1, 2], "runs": runs}}))
    assert pt.final_loss_critical_batch(task, tmp_path) == {"best": "B=16",
                                                             "largest_equal": 32}
    assert pt.final_loss_critical_batch(task, tmp_path / "none") is None


# ----------------------------------------------------------------------------- follow_advice
def test_follow_advice_restarts_at_k_times_the_batch_while_every_seed_is_advised(monkeypatch):
    """The chain: from B0 at B0's lr; again from 2x the batch, the lr scaled by the plain rule
    (x2 SGD, x sqrt 2 Adam), only while every seed's run advised it; never past the largest
    fixed batch. Stand-in runs: lossless probes (r = 1) below B = 64, a lossy one at 64."""
    fa = importlib.import_module("follow_advice")
    seen = []

    def fake_run(job):
        seen.append((job.batch, job.lr, job.seed))
        r = 1.0 if job.batch < 64 else 0.6
        probe = {"samples": 100, "batch_size": job.batch, "factor": 2, "progress": 1.0,
                 "branch_progress": r, "ratio_std": 0.0}
        return {"steps": 1, "final_loss": 1.0, "batch_end": job.batch, "seed": job.seed,
                "probes": [probe, {**probe, "samples": 200}]}

    monkeypatch.setattr(fa.eb, "run_job", fake_run)
    task = fa.eb.get_task("noisefloor", True)
    task.batches = [16, 32, 64, 128]
    done = fa.rounds(task, [1, 2], lr0=0.1, max_rounds=6)
    assert [(r["batch"], r["advised"]) for r in done] == [(16, 2), (32, 2), (64, 0)]
    assert [lr for b, lr, s in seen if s == 1] == pytest.approx([0.1, 0.2, 0.4])
    assert fa.scaled_lr(0.1, 2, "adamw") == pytest.approx(0.1 * 2**0.5)
    task.batches = [16, 32]  # the largest fixed batch bounds the chain
    assert [r["batch"] for r in fa.rounds(task, [1], lr0=0.1, max_rounds=6)] == [16, 32]
    # one seed not advised stops it
    monkeypatch.setattr(fa, "advised", lambda run: run["seed"] == 1)
    task.batches = [16, 32, 64]
    assert [r["advised"] for r in fa.rounds(task, [1, 2], lr0=0.1, max_rounds=6)] == [1]
