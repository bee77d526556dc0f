"""``adabatch sweep``: grid, random or TPE search over any config key, with Optuna.

Every trial is one ``python -m adabatch.cli.main fit --config ... --KEY=VALUE ...`` subprocess
(isolation: a crash, a bad value or an out-of-memory kill fails one trial, not the sweep),
logging to its own directory with a `CSVLogger`. The objective is a metric read back from the
trial's ``metrics.csv``; steps, samples and wall time come from the run's ``summary.json``.

Before any trial starts, every swept and fixed key is checked against the ``adabatch fit``
parser ("did you mean" for a misspelled one) and every grid point parsed (`check_trials`).

The study lives in an Optuna storage (default ``sqlite:///OUT/study.db``): rerunning the same
command resumes it, and ``--storage URL`` lets several machines work on one study. Each
trial's parameters are stored before it runs (grid points enqueued, sampled points asked),
so a resumed sweep never reruns a point that has a trial: completed and failed points are
kept (a failed one is not retried: fix it and sweep under a new ``--name``), interrupted ones
are re-queued with their parameters (`TrialSource`). ``--jobs N`` keeps N trial processes
running. Ctrl-C stops the running trials, records them as failed (``interrupted``) and
re-queued, and still prints the table. The exit code is 1 when no trial completed.

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
import contextlib
import csv
import inspect
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
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


def trial_args(spec: SweepSpec, params: dict[str, Any]) -> list[str]:
    """``--KEY=VALUE`` arguments of one trial: the fixed overrides, then its parameters."""
    return [f"--{k}={format_value(v)}" for k, v in {**spec.overrides, **params}.items()]


def trial_command(spec: SweepSpec, params: dict[str, Any], trial_dir: Path) -> list[str]:
    """The ``python -m adabatch.cli.main fit ...`` command line of one trial."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(trial_dir), "name": "", "version": ""}}
    cmd = [sys.executable, "-m", "adabatch.cli.main", spec.command]
    for c in spec.configs:
        cmd += ["--config", c]
    cmd += trial_args(spec, params)
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
    beat: float = -math.inf  # last heartbeat (perf_counter)


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
        error = "interrupted (re-queued: rerun the command to resume)"
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
        if interrupted:
            retry_later(study, trial)
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


HEARTBEAT_S = 10  # a trial whose driver stopped beating for 3x this is failed and retried


class TrialSource:
    """Hands out the next trial to run, with Optuna's own bookkeeping.

    Every trial's parameters are in the storage before it runs: grid points are enqueued
    up front (``enqueue_trial(..., skip_if_exists=True)``: a resumed sweep skips points that
    already have a trial), sampled trials are recorded by ``study.ask``. A trial that was
    interrupted (Ctrl-C here, or a driver killed: its heartbeat goes stale) is failed and
    re-enqueued with the same parameters by Optuna's `RetryHeartbeatStaleTrialCallback`, so
    a resumed sweep re-runs it rather than drawing a new point. ``n_trials`` counts
    completed, running, waiting and failed trials, less those superseded by a retry.
    """

    def __init__(self, spec: SweepSpec, study: Any) -> None:
        import optuna

        self.spec = spec
        self.study = study
        self.distributions = {p.key: p.distribution() for p in spec.params}
        with _quiet():
            optuna.storages.fail_stale_trials(study)  # trials of a killed driver: fail, retry
        if spec.sampler == "grid":
            for point in spec.grid():
                study.enqueue_trial(point, skip_if_exists=True)

    def counted(self) -> int:
        """Trials that use up ``n_trials``."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        with _quiet():  # retry_history is marked experimental
            retried = {n for t in trials for n in _retry_callback().retry_history(t)}
        return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))

    def next(self) -> tuple[Any, dict[str, Any]] | None:
        from optuna.trial import TrialState

        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and (self.spec.sampler == "grid"
                            or self.counted() >= (self.spec.n_trials or 0)):
            return None
        with warnings.catch_warnings():  # heartbeats are meant for study.optimize; we beat
            warnings.simplefilter("ignore")
            try:
                trial = self.study.ask(self.distributions)
            except ValueError as e:  # a resumed study whose search space changed
                raise SweepError(f"study {self.spec.name!r} in {self.spec.out} was run with "
                                 f"another search space ({e}); use a new --name or --out") from e
        return trial, dict(trial.params)


def _retry_callback() -> Any:
    """Optuna's retry callback class (renamed in Optuna 4.9)."""
    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback as retry
    except ImportError:  # pragma: no cover - Optuna < 4.9
        from optuna.storages import RetryFailedTrialCallback as retry
    return retry


def retry_later(study: Any, trial: Any) -> None:
    """Enqueue an interrupted trial again, with its parameters (Optuna's retry callback)."""
    with _quiet():
        _retry_callback()()(study, study._storage.get_trial(trial._trial_id))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Optuna's "experimental" warnings (heartbeats, retries) for one block."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def make_study(spec: SweepSpec) -> Any:
    """Create or load (resume) the sweep's Optuna study.

    The storage records a heartbeat of each running trial, so a trial whose driver was
    killed is failed and retried (`TrialSource`). A resumed study's sampler is seeded with
    ``seed`` + the trials it already holds: the same seed would replay the first session's
    draws (TPE's and random's start-up draws), re-running finished points.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    url = spec.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = url
    if url.startswith(("sqlite", "postgresql", "mysql")):
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        name = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params
                else "failed_trial_callback")  # renamed in Optuna 4.9
        with _quiet():
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S,
                **{name: _retry_callback()()})
    try:
        existing = len(optuna.load_study(study_name=spec.name, storage=storage).trials)
    except KeyError:
        existing = 0
    seed = spec.seed + existing
    if spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed)
    else:  # grid points are enqueued; the random sampler only fills in unknown keys
        sampler = optuna.samplers.RandomSampler(seed=seed)
    return optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                               direction=spec.direction, load_if_exists=True)


def check_trials(spec: SweepSpec) -> None:
    """Refuse a sweep whose trials cannot parse, before any trial starts.

    Every swept and fixed key must be one the ``adabatch fit`` parser knows (with "did you
    mean" suggestions), and every grid point (or both ends of each range) must parse. This
    imports Lightning once (a few seconds); values that only fail when a class is built
    (``model.lr=-1``) still fail their own trial.
    """
    from jsonargparse import ArgumentError

    from adabatch.cli.keys import is_known, known_keys_for, subcommand_parser, unknown_key_message

    sub = subcommand_parser(spec.command)
    base = [a for c in spec.configs for a in ("--config", c)]
    first = {p.key: (p.choices[0] if p.choices is not None else p.low) for p in spec.params}
    try:
        known = known_keys_for(sub, base + trial_args(spec, first))
    except (ArgumentError, SystemExit) as e:
        raise SweepError(f"the base config does not parse: {e}") from e
    keys = [*spec.overrides, *(p.key for p in spec.params)]
    bad = [unknown_key_message(k, known) for k in keys if not is_known(k, known)]
    if bad:
        raise SweepError("; ".join(bad))
    points = spec.grid()[:256] if spec.sampler == "grid" else [
        {**first, **{p.key: v for p in spec.params if p.choices is None
                     for v in [int(p.high) if p.integer else p.high]}}, first]
    if spec.sampler != "grid":
        points += [{**first, p.key: c} for p in spec.params if p.choices for c in p.choices]
    saved = sub.exit_on_error
    sub.exit_on_error = False
    try:
        for point in points:
            args = trial_args(spec, point)
            try:
                sub.parse_args(base + args)
            except (ArgumentError, SystemExit) as e:
                raise SweepError(f"trial arguments {' '.join(args)} do not parse: "
                                 f"{str(e).strip()[:1500]}") from e
    finally:
        sub.exit_on_error = saved


def run_sweep(spec: SweepSpec) -> int:
    """Run (or resume) a sweep; returns the exit code: 0, 1 when no trial completed (every
    trial failed), 130 after Ctrl-C."""
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
            _beat(study, running)
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
    if code == 0 and not any(r["state"] == "COMPLETE" for r in rows):
        code = 1
    write_results(rows, out / RESULTS_FILE)
    print()
    print(format_table(rows, spec))
    if code == 1:
        print(f"\nno trial completed: every trial failed (errors above and in "
              f"{out / RESULTS_FILE})", flush=True)
    else:
        print(f"\nresults: {out / RESULTS_FILE}   plot: adabatch plot --sweep {out}")
    return code


def _beat(study: Any, running: list[Running]) -> None:
    """Record a heartbeat of each running trial every `HEARTBEAT_S` seconds."""
    storage = study._storage
    if not hasattr(storage, "record_heartbeat") or not storage.get_heartbeat_interval():
        return
    now = time.perf_counter()
    for r in running:
        if now - r.beat >= HEARTBEAT_S:
            storage.record_heartbeat(r.trial._trial_id)
            r.beat = now


# --- results ------------------------------------------------------------------------------


def results_table(study: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial, completed ones ranked best first, then the rest by number."""
    from optuna.trial import TrialState

    done, other = [], []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"rank": None, "trial": t.number, "state": t.state.name}
        params = t.params or t.system_attrs.get("fixed_params", {})  # queued: enqueued params
        row.update({p.key: params.get(p.key) for p in spec.params})
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
        check_trials(spec)
        return run_sweep(spec)
    except SweepError as e:
        parser.error(str(e))
