"""``adabatch sweep``: grid, random or TPE search over any config key, with Optuna.

Every trial is one ``python -m adabatch.cli.main fit --config ... --KEY=VALUE ...`` subprocess
(isolation: a crash, a bad value or an out-of-memory kill fails one trial, not the sweep),
logging to its own directory with a `CSVLogger`. The objective is a metric read back from the
trial's ``metrics.csv``; steps, samples and wall time come from the run's ``summary.json``.

The study lives in an Optuna storage (default ``sqlite:///OUT/study.db``): rerunning the same
command resumes it (finished trials are kept; grid points and trial slots without a finished
trial run again), and ``--storage URL`` lets several machines work on one study. ``--jobs N``
keeps N trial processes running. Ctrl-C stops the running trials, records them as failed
(``interrupted``), and still prints the table.

Sweep file (``--sweep FILE``; command-line flags override it)::

    name: synthetic-lr               # study name, output dir runs/sweeps/<name>
    config: configs/synthetic.yaml   # one path or a list (relative to cwd or to this file)
    overrides: {trainer.max_steps: 200}          # fixed for every trial
    space:
      model.lr: {low: 0.003, high: 0.3, log: true}  # float range (int: true for integers)
      adabatch.policy: [noise, fixed]             # categorical (a grid axis)
    objective: {metric: val_loss, direction: minimize, reduce: last}  # reduce: last|min|max
    sampler: tpe                     # grid (categorical axes only), random, tpe
    n_trials: 8                      # ignored by grid (one trial per grid point)
    seed: 0
    jobs: 1
    timeout: null                    # seconds per trial
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adabatch.cli.main import SUMMARY_FILE
from adabatch.cli.metrics import Metrics

SAMPLERS = ("grid", "random", "tpe")
REDUCTIONS = ("last", "min", "max")
RESULTS_FILE = "results.csv"
SPEC_FILE = "sweep.json"


class SweepError(ValueError):
    """A sweep specification that cannot run; the message names the bad value."""


@dataclass
class Param:
    """One search-space axis: categorical ``choices`` or a numeric ``low..high`` range."""

    key: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def distribution(self) -> Any:
        import optuna.distributions as d

        if self.choices is not None:
            return d.CategoricalDistribution(self.choices)
        if self.integer:
            return d.IntDistribution(int(self.low), int(self.high), log=self.log)
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log)


@dataclass
class SweepSpec:
    """Everything a sweep needs, resolved from a sweep file and command-line flags."""

    name: str
    configs: list[str]
    params: list[Param]
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_loss"
    direction: str = "minimize"
    reduce: str = "last"
    sampler: str = "grid"
    n_trials: int | None = None
    seed: int = 0
    jobs: int = 1
    timeout: float | None = None
    out: str = ""
    storage: str | None = None
    command: str = "fit"

    def validate(self) -> None:
        if not self.params:
            raise SweepError("the search space is empty: give --grid/--range or `space:`")
        keys = [p.key for p in self.params]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise SweepError(f"parameter {dup[0]!r} is given more than once")
        if self.direction not in ("minimize", "maximize"):
            raise SweepError(f"direction={self.direction!r} must be 'minimize' or 'maximize'")
        if self.reduce not in REDUCTIONS:
            raise SweepError(f"reduce={self.reduce!r} must be one of {', '.join(REDUCTIONS)}")
        if self.sampler not in SAMPLERS:
            raise SweepError(f"sampler={self.sampler!r} must be one of {', '.join(SAMPLERS)}")
        if self.sampler == "grid":
            ranged = [p.key for p in self.params if p.choices is None]
            if ranged:
                raise SweepError(f"sampler='grid' needs a list of values for {ranged[0]!r}, "
                                 "not a range: use --grid, or --sampler random/tpe")
        elif self.n_trials is None or self.n_trials < 1:
            raise SweepError(f"n_trials={self.n_trials!r} must be >= 1 for "
                             f"sampler={self.sampler!r}")
        if self.jobs < 1:
            raise SweepError(f"jobs={self.jobs!r} must be >= 1")
        if self.timeout is not None and self.timeout <= 0:
            raise SweepError(f"timeout={self.timeout!r} must be > 0 seconds")
        for c in self.configs:
            if not Path(c).is_file():
                raise SweepError(f"config file {c!r} does not exist")

    def grid(self) -> list[dict[str, Any]]:
        """All grid points, in order (last parameter fastest)."""
        keys = [p.key for p in self.params]
        return [dict(zip(keys, values))
                for values in itertools.product(*(p.choices for p in self.params))]


# --- parsing ------------------------------------------------------------------------------


def parse_scalar(text: str) -> Any:
    """``'3'`` -> 3, ``'1e-3'`` -> 0.001, ``'true'`` -> True, ``'null'`` -> None, else str."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(t)
        except ValueError:
            pass
    return t


def _split_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not value.strip():
        raise SweepError(f"{flag} {text!r} must look like KEY=VALUE")
    return key, value


def parse_grid(text: str) -> Param:
    """``KEY=V1,V2,...`` -> a categorical `Param`."""
    key, values = _split_assignment(text, "--grid")
    choices = [parse_scalar(v) for v in values.split(",")]
    if any(isinstance(c, str) and not c for c in choices):
        raise SweepError(f"--grid {text!r} has an empty value")
    return Param(key, choices=choices)


def parse_range(text: str) -> Param:
    """``KEY=LOW:HIGH[:log][:int]`` -> a numeric `Param`."""
    key, value = _split_assignment(text, "--range")
    parts = value.split(":")
    flags = {p.strip().lower() for p in parts[2:]}
    if len(parts) < 2 or not flags <= {"log", "int"}:
        raise SweepError(f"--range {text!r} must look like KEY=LOW:HIGH[:log][:int]")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError as e:
        raise SweepError(f"--range {text!r}: LOW and HIGH must be numbers") from e
    return _range_param(key, low, high, "log" in flags, "int" in flags)


def _range_param(key: str, low: float, high: float, log: bool, integer: bool) -> Param:
    if not low < high:
        raise SweepError(f"range of {key!r}: low={low} must be < high={high}")
    if log and low <= 0:
        raise SweepError(f"range of {key!r}: low={low} must be > 0 on a log scale")
    if integer and (low != int(low) or high != int(high)):
        raise SweepError(f"range of {key!r}: low={low}, high={high} must be integers")
    return Param(key, low=low, high=high, log=log, integer=integer)


def _space_param(key: str, value: Any) -> Param:
    if isinstance(value, list):
        if not value:
            raise SweepError(f"space.{key} is an empty list")
        return Param(key, choices=[v if not isinstance(v, str) else parse_scalar(v)
                                   for v in value])
    if isinstance(value, dict):
        if "choices" in value:
            return _space_param(key, list(value["choices"]))
        unknown = set(value) - {"low", "high", "log", "int", "type"}
        if unknown or "low" not in value or "high" not in value:
            raise SweepError(f"space.{key}={value!r} must be a list of values or "
                             "{low, high, log?, int?}")
        integer = bool(value.get("int", False)) or value.get("type") == "int"
        try:
            low, high = float(value["low"]), float(value["high"])
        except (TypeError, ValueError) as e:
            raise SweepError(f"space.{key}: low/high must be numbers, got {value!r}") from e
        return _range_param(key, low, high, bool(value.get("log", False)), integer)
    raise SweepError(f"space.{key}={value!r} must be a list of values or {{low, high, ...}}")


def _resolve_path(path: str, base: Path | None) -> str:
    p = Path(path)
    if p.is_absolute() or p.exists() or base is None:
        return str(p)
    alt = base / p
    return str(alt) if alt.exists() else str(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``adabatch sweep`` argument parser."""
    p = argparse.ArgumentParser(
        prog="adabatch sweep",
        description="Search over any config key with Optuna; every trial is an "
                    "`adabatch fit` subprocess.",
        epilog="examples:\n"
               "  adabatch sweep --config configs/synthetic.yaml "
               "--grid adabatch.policy=noise,fixed --grid model.lr=0.01,0.03\n"
               "  adabatch sweep --sweep configs/sweeps/example.yaml --jobs 2\n"
               "  adabatch sweep --sweep configs/sweeps/example.yaml "
               "--storage postgresql://host/db   # share one study across machines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sweep", help="sweep file (YAML): base config, space, objective, ...")
    p.add_argument("-c", "--config", action="append", default=None,
                   help="base config file(s) for every trial (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="categorical axis (repeatable)")
    p.add_argument("--range", action="append", default=[], metavar="KEY=LOW:HIGH[:log][:int]",
                   help="numeric range for random/TPE sampling (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed override for every trial (repeatable)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="default: grid when all axes are --grid, else tpe")
    p.add_argument("--n-trials", type=int, help="trials for random/tpe (default 10)")
    p.add_argument("--objective", help="metric in metrics.csv (default val_loss)")
    p.add_argument("--direction", choices=("minimize", "maximize"))
    p.add_argument("--reduce", choices=REDUCTIONS,
                   help="how the metric's logged values become one number (default last)")
    p.add_argument("--name", help="study name (default: from the sweep/config file name)")
    p.add_argument("-o", "--out", help="output directory (default runs/sweeps/NAME)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    p.add_argument("--jobs", type=int, help="trial processes at once (default 1)")
    p.add_argument("--timeout", type=float, help="seconds before a trial is killed")
    p.add_argument("--seed", type=int, help="sampler seed (default 0)")
    return p


def resolve_spec(ns: argparse.Namespace) -> SweepSpec:
    """Merge a sweep file (if any) with command-line flags into a validated `SweepSpec`."""
    doc: dict[str, Any] = {}
    base: Path | None = None
    if ns.sweep:
        path = Path(ns.sweep)
        if not path.is_file():
            raise SweepError(f"sweep file {ns.sweep!r} does not exist")
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict):
            raise SweepError(f"sweep file {ns.sweep!r} must hold a mapping")
        known = {"name", "config", "overrides", "space", "objective", "sampler", "n_trials",
                 "seed", "jobs", "timeout", "out", "storage", "command"}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise SweepError(f"unknown key {unknown[0]!r} in sweep file {ns.sweep!r}; "
                             f"known: {', '.join(sorted(known))}")
        base = path.parent

    configs = ns.config if ns.config else doc.get("config") or []
    configs = [configs] if isinstance(configs, str) else list(configs)
    configs = [_resolve_path(c, base) for c in configs]

    params = [_space_param(str(k), v) for k, v in (doc.get("space") or {}).items()]
    cli_params = [parse_grid(g) for g in ns.grid] + [parse_range(r) for r in ns.range]
    cli_keys = {p.key for p in cli_params}
    params = [p for p in params if p.key not in cli_keys] + cli_params

    overrides = {str(k): v for k, v in (doc.get("overrides") or {}).items()}
    for s in ns.set:
        k, v = _split_assignment(s, "--set")
        overrides[k] = v

    objective = doc.get("objective") or {}
    if isinstance(objective, str):
        objective = {"metric": objective}
    sampler = ns.sampler or doc.get("sampler")
    if sampler is None:
        sampler = "grid" if all(p.choices is not None for p in params) else "tpe"
    n_trials = ns.n_trials if ns.n_trials is not None else doc.get("n_trials")
    if n_trials is None and sampler != "grid":
        n_trials = 10

    name = ns.name or doc.get("name")
    if not name:
        stem = Path(ns.sweep).stem if ns.sweep else (Path(configs[0]).stem if configs else "")
        name = f"{stem}-sweep" if stem else "sweep"
    out = ns.out or doc.get("out") or str(Path("runs", "sweeps", name))
    spec = SweepSpec(
        name=str(name), configs=configs, params=params, overrides=overrides,
        metric=str(ns.objective or objective.get("metric", "val_loss")),
        direction=str(ns.direction or objective.get("direction", "minimize")),
        reduce=str(ns.reduce or objective.get("reduce", "last")),
        sampler=str(sampler), n_trials=n_trials,
        seed=int(ns.seed if ns.seed is not None else doc.get("seed", 0)),
        jobs=int(ns.jobs if ns.jobs is not None else doc.get("jobs", 1)),
        timeout=ns.timeout if ns.timeout is not None else doc.get("timeout"),
        out=str(out), storage=ns.storage or doc.get("storage"),
        command=str(doc.get("command", "fit")),
    )
    if spec.command not in ("fit", "validate", "test"):
        raise SweepError(f"command={spec.command!r} must be fit, validate or test")
    spec.validate()
    return spec


# --- trials -------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A config value as jsonargparse reads it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value)
    return str(value)


def trial_command(spec: SweepSpec, params: dict[str, Any], trial_dir: Path) -> list[str]:
    """The ``python -m adabatch.cli.main fit ...`` command line of one trial."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(trial_dir), "name": "", "version": ""}}
    cmd = [sys.executable, "-m", "adabatch.cli.main", spec.command]
    for c in spec.configs:
        cmd += ["--config", c]
    for k, v in {**spec.overrides, **params}.items():
        cmd.append(f"--{k}={format_value(v)}")
    cmd += [f"--trainer.logger={json.dumps(logger)}", "--trainer.enable_progress_bar=false"]
    if spec.command == "fit":
        cmd.append("--trainer.enable_checkpointing=false")
    return cmd


def read_metric(metrics_csv: Path, metric: str, reduce: str = "last") -> float:
    """One number from a metric's logged values in a `CSVLogger` ``metrics.csv``."""
    m = Metrics(metrics_csv)
    if not m.has(metric):
        raise KeyError(f"metric {metric!r} has no values in {metrics_csv} "
                       f"(logged: {', '.join(m.names())})")
    values = m.series(metric, x="step")[1]
    if reduce == "min":
        return float(values.min())
    if reduce == "max":
        return float(values.max())
    return float(values[-1])


def error_summary(log_text: str) -> str:
    """What went wrong, from a failed run's output: the last exception and its detail lines.

    jsonargparse puts the useful part (``- lr=-1.0 must be > 0``) on the lines after the
    exception line, so those are kept up to the echo of the given value.
    """
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        head = lines[i].split(":", 1)[0]
        if lines[i].startswith("error:") or (
                " " not in head and head.endswith(("Error", "Exception", "Interrupt"))):
            detail = []
            for ln in lines[i:i + 8]:
                if ln.startswith(("Given value", "tip:")):
                    break
                detail.append(ln)
            return " | ".join(detail)[:1000]
    return lines[-1] if lines else "no output"


@dataclass
class Running:
    """A trial process in flight."""

    trial: Any
    params: dict[str, Any]
    proc: subprocess.Popen
    log: Any
    trial_dir: Path
    started: float


def _start(spec: SweepSpec, trial: Any, params: dict[str, Any], out: Path) -> Running:
    trial_dir = out / "trials" / f"trial_{trial.number:04d}"
    if trial_dir.exists():
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True)
    cmd = trial_command(spec, params, trial_dir)
    (trial_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    log = open(trial_dir / "log.txt", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # Ctrl-C is ours to forward
    trial.set_user_attr("trial_dir", str(trial_dir))
    print(f"[trial {trial.number}] start  {_fmt_params(params)}", flush=True)
    return Running(trial, params, proc, log, trial_dir, time.perf_counter())


def _finish(spec: SweepSpec, study: Any, r: Running, interrupted: bool = False,
            timed_out: bool = False) -> None:
    from optuna.trial import TrialState

    r.log.close()
    wall = time.perf_counter() - r.started
    trial = r.trial
    summary_path = r.trial_dir / SUMMARY_FILE
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        for key in ("steps", "samples", "wall_time_s", "train_loss", "val_loss"):
            if s.get(key) is not None:
                trial.set_user_attr(key, s[key])
    trial.set_user_attr("process_wall_s", round(wall, 2))
    error = None
    value = None
    if interrupted:
        error = "interrupted"
        trial.set_user_attr("interrupted", True)
    elif timed_out:
        error = f"timed out after {spec.timeout:g} s"
    elif r.proc.returncode != 0:
        log_text = (r.trial_dir / "log.txt").read_text(errors="replace")
        error = f"exit code {r.proc.returncode}: {error_summary(log_text)}"
    else:
        csvs = sorted(r.trial_dir.rglob("metrics.csv"))
        try:
            if not csvs:
                raise KeyError(f"no metrics.csv under {r.trial_dir}")
            value = read_metric(csvs[0], spec.metric, spec.reduce)
            if not math.isfinite(value):
                raise ValueError(f"{spec.metric}={value} is not finite")
        except (KeyError, ValueError, OSError) as e:
            error = str(e).strip("\"'")
    if error is not None:
        trial.set_user_attr("error", error[:2000])
        study.tell(trial, state=TrialState.FAIL)
        print(f"[trial {trial.number}] FAILED {_fmt_params(r.params)}: {error} "
              f"(log: {r.trial_dir / 'log.txt'})", flush=True)
    else:
        study.tell(trial, value)
        print(f"[trial {trial.number}] done   {_fmt_params(r.params)} -> "
              f"{spec.metric}={value:.6g} ({wall:.1f} s)", flush=True)


def _stop(r: Running) -> None:
    """Interrupt a trial process group: SIGINT, then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if r.proc.poll() is not None:
            return
        try:
            os.killpg(r.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            r.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else format_value(v)


class TrialSource:
    """Hands out the next trial to run: the next unfinished grid point, or a sampler draw."""

    def __init__(self, spec: SweepSpec, study: Any) -> None:
        self.spec = spec
        self.study = study
        self.distributions = {p.key: p.distribution() for p in spec.params}
        self.attempted: set[tuple] = set()  # grid points started by this process

    def _key(self, params: dict[str, Any]) -> tuple:
        return tuple(json.dumps(params.get(p.key), sort_keys=True) for p in self.spec.params)

    def next(self) -> tuple[Any, dict[str, Any]] | None:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        if self.spec.sampler == "grid":
            taken = {self._key(t.params) for t in trials
                     if t.state in (TrialState.COMPLETE, TrialState.RUNNING)}
            for point in self.spec.grid():
                key = self._key(point)
                if key not in taken and key not in self.attempted:
                    self.attempted.add(key)
                    self.study.enqueue_trial(point)
                    trial = self.study.ask(self.distributions)
                    return trial, dict(trial.params)
            return None
        counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)
                   or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]
        if len(counted) >= (self.spec.n_trials or 0):
            return None
        trial = self.study.ask(self.distributions)
        return trial, dict(trial.params)


def make_study(spec: SweepSpec) -> Any:
    """Create or load (resume) the sweep's Optuna study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = spec.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seed)
    else:  # grid points are enqueued; the random sampler only fills in unknown keys
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                               direction=spec.direction, load_if_exists=True)


def run_sweep(spec: SweepSpec) -> int:
    """Run (or resume) a sweep; returns the process exit code (130 after Ctrl-C)."""
    study = make_study(spec)
    out = Path(spec.out)
    (out / SPEC_FILE).write_text(json.dumps({
        "name": spec.name, "configs": spec.configs, "overrides": spec.overrides,
        "params": [p.key for p in spec.params], "metric": spec.metric,
        "direction": spec.direction, "reduce": spec.reduce, "sampler": spec.sampler,
    }, indent=2, default=str) + "\n")
    source = TrialSource(spec, study)
    running: list[Running] = []
    exhausted = False
    code = 0
    print(f"sweep {spec.name!r}: {len(spec.params)} parameter(s), sampler {spec.sampler}, "
          f"objective {spec.direction} {spec.metric}, {spec.jobs} job(s); output {out}",
          flush=True)
    try:
        while True:
            while not exhausted and len(running) < spec.jobs:
                nxt = source.next()
                if nxt is None:
                    exhausted = True
                    break
                running.append(_start(spec, nxt[0], nxt[1], out))
            if not running:
                break
            time.sleep(0.2)
            for r in list(running):
                timed_out = (spec.timeout is not None
                             and time.perf_counter() - r.started > spec.timeout)
                if timed_out:
                    _stop(r)
                if r.proc.poll() is not None:
                    running.remove(r)
                    _finish(spec, study, r, timed_out=timed_out)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping running trials (finished trials are kept)", flush=True)
        for r in running:
            _stop(r)
            _finish(spec, study, r, interrupted=True)
        code = 130
    rows = results_table(study, spec)
    write_results(rows, out / RESULTS_FILE)
    print()
    print(format_table(rows, spec))
    print(f"\nresults: {out / RESULTS_FILE}   plot: adabatch plot --sweep {out}")
    return code


# --- results ------------------------------------------------------------------------------


def results_table(study: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial, completed ones ranked best first, then the rest by number."""
    from optuna.trial import TrialState

    done, other = [], []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"rank": None, "trial": t.number, "state": t.state.name}
        row.update({p.key: t.params.get(p.key) for p in spec.params})
        row[spec.metric] = t.value if t.state == TrialState.COMPLETE else None
        for k in ("steps", "samples", "wall_time_s"):
            row[k] = t.user_attrs.get(k)
        row["error"] = t.user_attrs.get("error", "")
        row["trial_dir"] = t.user_attrs.get("trial_dir", "")
        (done if t.state == TrialState.COMPLETE else other).append(row)
    done.sort(key=lambda r: r[spec.metric], reverse=spec.direction == "maximize")
    for i, row in enumerate(done, 1):
        row["rank"] = i
    return done + sorted(other, key=lambda r: r["trial"])


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the results table as CSV."""
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict[str, Any]], spec: SweepSpec) -> str:
    """The results as an aligned text table."""
    if not rows:
        return "no trials"
    cols = ["rank", "trial", "state", *[p.key for p in spec.params], spec.metric,
            "steps", "samples", "wall_time_s", "error"]

    def cell(v: Any, col: str) -> str:
        if v is None or v == "":
            return "-"
        if col == "error":
            return str(v)[:60]
        return _fmt(v) if not isinstance(v, int) or isinstance(v, bool) else f"{v}"

    table = [cols] + [[cell(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adabatch sweep``."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        import optuna  # noqa: F401
    except ImportError:
        parser.error("adabatch sweep needs Optuna: pip install 'adabatch[sweep]'")
    try:
        spec = resolve_spec(ns)
    except SweepError as e:
        parser.error(str(e))
    return run_sweep(spec)
