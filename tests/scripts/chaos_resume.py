"""Chaos resume: a run SIGKILLed at random points and resumed each time equals the
uninterrupted run (batch sizes, LRs, data order, bit-identical final weights on CPU).

Usage: python chaos_resume.py OUT_DIR MODE KILLS SEED   (run by tests/test_chaos.py)

The parent imports everything once and forks one child per segment; a child trains from the
newest checkpoint (or, at random, one of the few before it, each a valid restart point) and
kills itself with SIGKILL at a random (step, hook) ahead: before a batch, inside a step
(after backward, before the update), at an epoch's end before its checkpoint, or at the next
epoch's start after it. Forking keeps 30+ segments to a few seconds each instead of paying
the imports every time. Prints one JSON line: {"kills": ..., "ok": bool, "diff": ...}.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: resume_run, lit_helpers

import torch  # noqa: E402
from resume_run import checkpoint_step, fit  # noqa: E402

MAX_EPOCHS = 8


def _child(out: Path, ckpt_dir: str, mode: str, ckpt: Path | None,
           kill: tuple[int, str] | None) -> None:
    torch.set_num_threads(1)
    (out / ckpt_dir).mkdir(parents=True, exist_ok=True)
    model, cb, rec = fit(out / ckpt_dir, mode=mode, accumulation=1, max_epochs=MAX_EPOCHS,
                         ckpt_path=None if ckpt is None else str(ckpt), save=kill is not None,
                         kill=kill, journal=out / ckpt_dir / "journal.jsonl")
    result = {"rows": rec.rows, "history": cb.history, "samples": cb.samples}
    (out / "result.json").write_text(json.dumps(result))
    torch.save(model.linear.weight.detach(), out / "weight.pt")


def _segment(out: Path, ckpt_dir: str, mode: str, ckpt: Path | None,
             kill: tuple[int, str] | None) -> int:
    """Run one child (its checkpoints in ``out/ckpt_dir``) to the end or to its kill; return
    the signal that ended it (0: none)."""
    out.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            import logging

            logging.disable(logging.WARNING)
            _child(out, ckpt_dir, mode, ckpt, kill)
        except BaseException as err:  # the parent reports it
            (out / "error.txt").write_text(repr(err))
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    if os.WEXITSTATUS(status):
        raise RuntimeError((out / "error.txt").read_text())
    return 0


def _events(rows: list[dict]) -> list[tuple[int, str]]:
    """The (global_step, hook) points of the reference run, in the order they happen."""
    events: list[tuple[int, str]] = []
    epoch = None
    for row in rows:
        if row["epoch"] != epoch:
            if epoch is not None:
                events.append((row["step"], "on_train_epoch_end"))
            events.append((row["step"], "on_train_epoch_start"))
            epoch = row["epoch"]
        events += [(row["step"], "on_train_batch_start"),
                   (row["step"], "on_before_optimizer_step")]
    events.append((len(rows), "on_train_epoch_end"))
    return events


def _position(events: list[tuple[int, str]], ckpt: Path, cache: dict) -> int:
    """Index of the first event after the moment ``ckpt`` was saved (the killer records the
    last event it passed in every checkpoint)."""
    if ckpt not in cache:
        last = torch.load(ckpt, weights_only=False)["chaos_event"]
        pos = 0 if last is None else events.index(tuple(last)) + 1
        if pos < len(events) and events[pos][1] == "on_train_epoch_end":
            # saved at an epoch's last batch: Lightning resumes into the next epoch and does
            # not run the finished epoch's end hooks again (it does the same with a length)
            pos += 1
        cache[ckpt] = pos
    return cache[ckpt]


def main() -> None:
    out, mode, kills, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    _segment(out / "ref", "ckpt", mode, None, None)
    ref = json.loads((out / "ref" / "result.json").read_text())
    total = len(ref["rows"])
    events = _events(ref["rows"])

    run = out / "chaos"
    ckpt: Path | None = None
    pos = done = 0  # next event, and steps the checkpoint holds
    kinds: set[str] = set()
    cache: dict[Path, int] = {}
    killed = segments = 0
    checked: set[int] = set()  # steps whose rows a segment reproduced
    while killed < kills:
        segments += 1
        index = rng.randint(pos, pos + 4)
        if rng.random() < 0.3:  # epoch boundaries are rarer than steps: aim at the next one
            index = next((i for i in range(pos, len(events)) if "epoch" in events[i][1]), index)
        if index >= len(events) - 1:  # near the end: rewind to an older checkpoint instead
            ckpt = rng.choice(sorted(run.glob("*/*.ckpt")))
            pos, done = _position(events, ckpt, cache), checkpoint_step(ckpt)
            continue
        if os.environ.get("CHAOS_DEBUG"):
            print(segments, ckpt and ckpt.name, events[index], file=sys.stderr)
        sig = _segment(run, f"seg{segments}", mode, ckpt, events[index])
        if sig != signal.SIGKILL:
            raise RuntimeError(f"segment {segments} from {ckpt} was not killed at "
                               f"{events[index]}")
        killed += 1
        kinds.add(events[index][1])
        rows = _rows(run / f"seg{segments}" / "journal.jsonl")
        expected = ref["rows"][done: done + len(rows)]
        if rows != expected:  # fail at the first segment that diverges
            bad = next(i for i, (r, s) in enumerate(zip(rows, expected)) if r != s)
            print(json.dumps({"ok": False, "segment": segments, "from": str(ckpt),
                              "kill": events[index], "got": rows[bad],
                              "expected": expected[bad]}))
            return
        checked.update(r["step"] for r in rows)
        saved = sorted(run.glob("*/*.ckpt"), key=lambda p: _position(events, p, cache))
        if saved:
            newest = _position(events, saved[-1], cache)
            # the newest, or one of a few before it (any saved point is a valid restart)
            back = rng.choice((0, 0, 6))
            pool = [p for p in saved if _position(events, p, cache) >= newest - back]
            ckpt = rng.choice(pool)
            pos, done = _position(events, ckpt, cache), checkpoint_step(ckpt)
    _segment(run, "last", mode, ckpt, None)
    got = json.loads((run / "result.json").read_text())
    rows = got["rows"]
    checked.update(r["step"] for r in rows)
    same_weights = torch.equal(torch.load(run / "weight.pt"), torch.load(out / "ref" / "weight.pt"))
    ok = (same_weights and got["history"] == ref["history"] and got["samples"] == ref["samples"]
          and rows == ref["rows"][done:] and checked == set(range(total)))
    diff = None
    if not ok:
        bad = [i for i, (r, s) in enumerate(zip(rows, ref["rows"][done:])) if r != s][:1]
        diff = {"weights": same_weights, "history": got["history"] == ref["history"],
                "unchecked": sorted(set(range(total)) - checked),
                "first_bad": [(rows[i], ref["rows"][done + i]) for i in bad]}
    print(json.dumps({"kills": killed, "hooks": sorted(kinds), "steps": total,
                      "changes": len(ref["history"]), "segments": segments, "ok": ok,
                      "diff": diff}))


def _rows(journal: Path) -> list[dict]:
    if not journal.exists():
        return []
    return [json.loads(line) for line in journal.read_text().splitlines()]


if __name__ == "__main__":
    main()
