"""A mutation check of the measurement: named wrong versions of the code, each of which some
test must fail.

Each mutant is one textual replacement in one file. For each, the script copies ``src/`` and
``tests/`` to a temporary directory, applies the replacement there (the working tree is never
touched), runs the mutant's tests with that copy first on the path, and records whether they
failed ("killed") or passed ("survived"). Not part of the test suite (minutes, not seconds);
``tests/test_benchmarks.py`` checks that every mutant still applies to today's code.

    python benchmarks/mutants.py                 # all but the DDP mutants, writes RESULTS.md
    python benchmarks/mutants.py --ddp           # also the ones whose tests launch 2 ranks
    python benchmarks/mutants.py --only mb_b_is_one --no-write
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "mutants"

E2E = "tests/test_measurement_e2e.py"
STATS = "tests/noise/test_step_stats.py"
MICRO = "tests/noise/test_microbatch.py"
DDP = "tests/test_callback_ddp.py::test_two_ranks_measure_the_exact_statistics"
SHORT_WINDOW = "tests/test_callback.py::test_a_short_last_accumulation_window_is_measured_exactly"
ORACLE = "tests/test_branch.py::test_the_probe_reports_the_closed_form_critical_batch"
ORACLE_DDP = "tests/test_branch.py::test_two_ranks_report_the_closed_form_critical_batch"
RULES = "tests/control/test_rules.py"
POLICY = "tests/control/test_policy.py"
SEESAW_E2E = ("tests/test_callback.py::"
              "test_seesaw_turns_a_schedule_drop_into_a_batch_increase_at_the_peak_lr")
SEESAW_RESUME = "tests/test_callback.py::test_seesaw_resume_keeps_the_schedules_peak"
SUMMARY = "tests/test_summary.py"
BRANCH_LR = ("tests/test_branch.py::"
             "test_the_branch_lr_is_k_times_the_main_runs_under_the_saturating_gain")


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]
    ddp: bool = False


MUTANTS: tuple[Mutant, ...] = (
    # -- the six of issue 10 --------------------------------------------------------------
    Mutant("mb_b_is_one", "the micro-batch's small-batch size b taken as 1",
           "src/adabatch/noise/step_stats.py",
           "b = samples / count_f if count_f > 0 else math.nan", "b = 1.0", (E2E, STATS)),
    Mutant("loss_scale_not_squared", "micro-batch norm divided by the loss scale, not its square",
           "src/adabatch/noise/microbatch.py",
           "acc / (scale * scale)", "acc / scale", (E2E, MICRO)),
    Mutant("settled_gate_removed", "policy trusts the spread of fewer than 8 effective steps",
           "src/adabatch/callback.py",
           "settled = est.effective_sample_size >= _MIN_EFFECTIVE_STEPS", "settled = True",
           (E2E,)),
    Mutant("ema_not_notified", "weight averaging not told the measured global batch",
           "src/adabatch/callback.py",
           "self._notify_ema(trainer, batch)\n", "pass\n", (E2E,)),
    Mutant("adamw_wd_divided", "AdamW weight decay divided by its factor instead of multiplied",
           "src/adabatch/control/apply.py",
           'group["weight_decay"] * wd_f', 'group["weight_decay"] / wd_f', (E2E,)),
    Mutant("no_1_over_k", "the probes not told Lightning's 1/k loss scaling",
           "src/adabatch/callback.py",
           "scale = 1.0 / trainer.accumulate_grad_batches", "scale = 1.0", (E2E,)),
    # -- more -----------------------------------------------------------------------------
    Mutant("no_window_rescale", "a short last accumulation window not rescaled",
           "src/adabatch/noise/step_stats.py",
           "window = accumulation / max(local_batches, 1)", "window = 1.0",
           (E2E, STATS, SHORT_WINDOW)),
    Mutant("window_not_squared", "the short-window factor applied to |g|^2 once, not squared",
           "src/adabatch/noise/step_stats.py",
           "big_sq.to(torch.float64) * (window * window)", "big_sq.to(torch.float64) * window",
           (E2E, STATS)),
    Mutant("empty_steps_reach_estimator", "a step with no recorded norms fed to the estimator",
           "src/adabatch/noise/step_stats.py",
           "if count_f == 0:\n        skip: str | None = SKIP_NO_NORMS",
           "if False:\n        skip: str | None = SKIP_NO_NORMS", (E2E, STATS)),
    Mutant("count_mismatch_accepted", "norms for fewer small batches than the step holds accepted",
           "src/adabatch/noise/step_stats.py",
           "elif count_f != expected:", "elif False:", (STATS,)),
    Mutant("big_sq_over_all_params", "|g_B|^2 over every parameter while S covers a subset",
           "src/adabatch/callback.py",
           "covered = tuple(self._probe.covered)  # type: ignore[union-attr]",
           "covered = tuple(n for n, p in pl_module.named_parameters() if p.requires_grad)",
           (E2E,)),
    Mutant("no_compile_fallback", "auto keeps the per-example probe on a compiled module",
           "src/adabatch/callback.py",
           "            if compiled:\n                # Module hooks",
           "            if False:\n                # Module hooks", (E2E,)),
    Mutant("no_amp_scale", "the probes not told the AMP loss scale",
           "src/adabatch/callback.py",
           "scale *= float(amp_scaler.get_scale())", "pass", (E2E,)),
    Mutant("step_time_summed", "the step time summed over ranks instead of averaged",
           "src/adabatch/noise/step_stats.py",
           "step_time = time_sum / world_size if", "step_time = time_sum if", (STATS,)),
    Mutant("mb_norm_not_squared", "micro-batch |g| summed instead of |g|^2",
           "src/adabatch/noise/microbatch.py",
           "return torch.stack(norms).square().sum()", "return torch.stack(norms).sum()",
           (MICRO, E2E)),
    Mutant("skip_not_counted", "an unmeasured step not counted as skipped",
           "src/adabatch/callback.py",
           "self._estimator.record_skip()  # never", "pass  # never", (E2E,)),
    Mutant("ema_told_decided_batch", "weight averaging told the decided, not the measured batch",
           "src/adabatch/callback.py",
           "self._notify_ema(trainer, batch)\n",
           "self._notify_ema(trainer, self._target or batch)\n", (E2E,)),
    Mutant("no_all_reduce", "ranks keep their own small-batch statistics",
           "src/adabatch/callback.py",
           'all_reduce_fn=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),',
           "all_reduce_fn=None,", (DDP,), ddp=True),
    # -- the decision's inputs: the probe's critical batch and the lr gain ---------------
    Mutant("branch_lr_unscaled", "the probe's branch at k x B run with B's hyperparameters",
           "src/adabatch/branch.py",
           "                apply_factors(k * batch)", "                apply_factors(batch)",
           (ORACLE,)),
    Mutant("branch_lr_saturating", "the branch's lr from the AdaScale gain at k x B (the probe "
           "measures B_simple again)", "src/adabatch/callback.py",
           "            gain *= batch_size / main\n", "            gain = self._gain(batch_size)\n",
           (ORACLE, BRANCH_LR)),
    Mutant("branch_gain_from_ref", "the branch's lr k x B_ref's, not k x the main run's",
           "src/adabatch/callback.py", "        gain = self._gain(main)\n",
           "        gain = None if self._gain(main) is None else 1.0\n", (BRANCH_LR,)),
    Mutant("ratio_std_unweighted", "the ratio's standard error without the batch sizes",
           "src/adabatch/branch.py",
           "spread = trainer.strategy.reduce((n * (a - r * c)).square().sum(), reduce_op=\"sum\")",
           "spread = trainer.strategy.reduce((a - r * c).square().sum(), reduce_op=\"sum\")",
           ("tests/test_branch.py::test_the_ratio_error_is_the_delta_method_over_probe_batches",)),
    Mutant("probe_credited_at_r", "a probe credited at its measured ratio, not its lower bound",
           "src/adabatch/control/policy.py",
           "crit = result.critical_batch_lower(self.confidence)",
           "crit = result.critical_batch", (POLICY,)),
    Mutant("advice_on_any_probe", "the larger-start advice when any probe, not every one, "
           "lost nothing", "src/adabatch/control/critical.py",
           "return len(conclusive) >= 2 and all(c >= top for c, top in conclusive)",
           "return len(conclusive) >= 2 and any(c >= top for c, top in conclusive)", (SUMMARY,)),
    Mutant("advice_at_measured_r", "the larger-start advice judged at r, not its lower bound",
           "src/adabatch/control/critical.py",
           "    crits = [(r.critical_batch_lower(z), r.resolvable) for r in results]",
           "    crits = [(r.critical_batch, r.resolvable) for r in results]", (SUMMARY,)),
    Mutant("wide_interval_credited", "a probe whose interval spans every answer credited",
           "src/adabatch/control/critical.py",
           "if r - z * std <= 1.0 / self.factor and", "if False and", (POLICY, SUMMARY)),
    Mutant("branch_window_off_by_one", "the branch replays one main step too few",
           "src/adabatch/branch.py",
           'steps = window["steps"][: self.config.window_steps]',
           'steps = window["steps"][: self.config.window_steps - 1]', (ORACLE,)),
    Mutant("half_life_quarter", "the estimator's default window a quarter of the samples",
           "src/adabatch/callback.py",
           "DEFAULT_HALF_LIFE_FRACTION = 0.0625", "DEFAULT_HALF_LIFE_FRACTION = 0.25",
           ("tests/test_callback.py::"
            "test_the_default_half_life_tracks_the_noise_scale_to_the_noise_floor",)),
    Mutant("gain_falls_back_to_one", "AdaScale gain 1 (B_ref's lr) when |G|^2 is estimated <= 0",
           "src/adabatch/control/rules.py",
           "        return float(batch_size) / float(ref_batch_size)", "        return 1.0",
           (RULES,)),
    Mutant("branch_grads_summed", "the branch's gradients summed over ranks, not averaged",
           "src/adabatch/branch.py",
           'p.grad = trainer.strategy.reduce(p.grad, reduce_op="mean")',
           'p.grad = trainer.strategy.reduce(p.grad, reduce_op="sum")', (ORACLE_DDP,), ddp=True),
    Mutant("seesaw_initial_lr", "SeesawPolicy relative to the first lr, not its peak so far",
           "src/adabatch/control/policy.py",
           "if self._lr_peak is None or lr > self._lr_peak:", "if self._lr_peak is None:",
           (POLICY,)),
    Mutant("seesaw_sqrt_trade", "SeesawPolicy grows the batch by 1/sqrt(s), not 1/s",
           "src/adabatch/control/policy.py",
           "want = self.bounds.lo / s if s > 0 else math.inf",
           "want = self.bounds.lo / math.sqrt(s) if s > 0 else math.inf", (POLICY, SEESAW_E2E)),
    Mutant("seesaw_peak_only_in_target", "SeesawPolicy's peak missed on steps the discipline "
           "holds", "src/adabatch/control/policy.py",
           "        self.schedule_factor(obs)\n        return super().decide(obs, current)",
           "        return super().decide(obs, current)", (POLICY,)),
    Mutant("seesaw_peak_not_saved", "SeesawPolicy's lr peak left out of the checkpoint",
           "src/adabatch/control/policy.py",
           'state["lr_peak"] = self._lr_peak', 'state["lr_peak"] = None', (SEESAW_RESUME,)),
    Mutant("schedule_not_observed", "the callback does not hand the lr schedule to the policy",
           "src/adabatch/callback.py",
           "lr_factor=float(lr) / self._lr0 if self._lr0 else None,", "lr_factor=None,",
           (SEESAW_E2E,)),
    Mutant("mb_count_per_rank", "micro-batch count checked against one rank's batches",
           "src/adabatch/noise/step_stats.py",
           "expected = batches", "expected = batches / world_size", (E2E, DDP), ddp=True),
    Mutant("probe_inconclusive_reopens", "an inconclusive probe window reopens at once",
           "src/adabatch/branch.py", "        self.last = result\n        return result",
           "        if result.critical_batch is not None:\n            self.last = result\n"
           "        return result",
           ("tests/test_branch.py::test_an_inconclusive_window_delays_the_next_as_a_"
            "conclusive_one_would",)),
)


CONTROL = Mutant("control", "no mutation: the tests must pass, or every 'killed' is void",
                 "", "", "", ())


def apply(mutant: Mutant, root: Path) -> None:
    """Apply ``mutant`` to the tree at ``root`` (ValueError unless ``old`` occurs once)."""
    if not mutant.path:  # the control run
        return
    path = root / mutant.path
    text = path.read_text()
    if text.count(mutant.old) != 1:
        raise ValueError(f"mutant {mutant.name}: {mutant.old!r} occurs {text.count(mutant.old)} "
                         f"times in {mutant.path}, expected once")
    path.write_text(text.replace(mutant.old, mutant.new))


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """(killed | survived | error, seconds, last line of pytest's output)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        work = Path(tmp)
        for sub in ("src", "tests"):
            shutil.copytree(ROOT / sub, work / sub,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        apply(mutant, work)
        env = dict(os.environ, PYTHONPATH=str(work / "src"))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                 *mutant.tests], cwd=work, env=env, capture_output=True, text=True,
                timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.perf_counter() - t0, "timeout"
        seconds = time.perf_counter() - t0
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        last = lines[-1] if lines else proc.stderr[-200:]
        if proc.returncode == 0:
            return "survived", seconds, last
        if proc.returncode == 1:
            return "killed", seconds, last
        return f"error (pytest exit {proc.returncode})", seconds, last


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ddp", action="store_true", help="also the mutants needing 2-rank runs")
    ap.add_argument("--only", nargs="*", default=None, help="mutant names to run")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--results", type=Path, default=common.DEFAULT_RESULTS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    load_before = common.load_average()
    t0 = time.perf_counter()
    chosen = [m for m in MUTANTS
              if (args.only is None or m.name in args.only) and (args.ddp or not m.ddp
                                                                 or args.only)]
    rows, outcomes = [], []
    tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    control = Mutant(CONTROL.name, CONTROL.what, CONTROL.path, "", "", tests)
    for m in [control, *chosen]:
        outcome, seconds, last = run(m, args.timeout)
        if m is control:
            if outcome != "survived":
                raise SystemExit(f"the unmutated tests fail ({last}): fix them first")
            outcome = "passed"
        print(f"{m.name}: {outcome} ({seconds:.0f} s) {last}", flush=True)
        outcomes.append((m.name, outcome))
        where = m.path.removeprefix("src/adabatch/") or "-"
        rows.append([f"`{m.name}`", m.what.replace("|", r"\|"), f"`{where}`", outcome,
                     last.replace("|", "/"), ", ".join(f"`{t}`" for t in m.tests)])
    skipped = [m.name for m in MUTANTS if m not in chosen]
    lines = [f"## {SECTION}: named mutants of the measurement, and which tests kill them", ""]
    lines += common.context_lines("mutants.py", argv, load_before)
    lines += [f"- wall time: {time.perf_counter() - t0:.0f} s",
              "- each mutant: one textual replacement in a copy of src/ and tests/, then "
              "`pytest -x` on the listed tests; killed = some test failed; the control row "
              "runs every listed test on the unmutated copy first"]
    if skipped:
        lines.append(f"- not run this time: {', '.join(skipped)}")
    lines += ["", common.md_table(["mutant", "wrong code", "file", "outcome", "pytest",
                                   "tests run"], rows)]
    text = "\n".join(lines)
    common.publish(text, None if args.no_write or args.only is not None else args.results,
                   SECTION)
    return outcomes


if __name__ == "__main__":
    main()
