"""Exact resume: a run resumed from any checkpoint equals the uninterrupted run, bit for bit.

Checkpoints at an epoch's last batch, at an epoch's end (with ``max_epochs`` and with
``max_steps``, which Lightning 2.6 restarts differently), mid-epoch, and while a batch-size
change waits for an aligned boundary; both resize modes; starting accumulation 1..4.
"""

from __future__ import annotations

import pytest
import torch
from resume_run import checkpoint_step, fit


def _pending(path) -> bool:
    state = torch.load(path, weights_only=False)["callbacks"]
    (cb_state,) = [v for k, v in state.items() if k.startswith("AdaptiveBatchSize")]
    return cb_state["pending"] is not None


def _choose(root, full_rows):
    """Every epoch-end checkpoint, every epoch's-last-batch one, the pending ones, a few more."""
    last_batches = {r["step"] + 1 for r, nxt in zip(full_rows, full_rows[1:])
                    if nxt["epoch"] != r["epoch"]}
    end = full_rows[-1]["step"] + 1
    chosen = [p for p in root.glob("e*.ckpt") if checkpoint_step(p) < end]
    steps = sorted(root.glob("s*.ckpt"), key=checkpoint_step)
    pending = [p for p in steps if _pending(p)]
    chosen += [p for p in steps if checkpoint_step(p) in last_batches - {end}]
    chosen += pending[:1] + steps[3:4]
    return chosen, pending


def _assert_same(full, resumed, step, name):
    (model, cb, rec), (model2, cb2, rec2) = full, resumed
    assert rec2.rows == rec.rows[step:], name
    assert cb2.history == cb.history, name
    assert cb2.samples == cb.samples and cb2.steps == cb.steps, name
    assert torch.equal(model2.linear.weight, model.linear.weight), name


@pytest.mark.parametrize(("mode", "accumulation", "limit"), [
    ("accumulate", 1, "epochs"), ("accumulate", 2, "epochs"), ("accumulate", 3, "epochs"),
    ("accumulate", 4, "epochs"), ("sampler", 1, "epochs"), ("sampler", 2, "epochs"),
    # max_steps: Lightning keeps `restarting` after an epoch-end checkpoint (another path)
    ("accumulate", 3, "steps"), ("sampler", 1, "steps"),
])
def test_resume_from_any_checkpoint_is_exact(tmp_path, mode, accumulation, limit):
    kwargs = {"mode": mode, "accumulation": accumulation}
    kwargs.update({"max_epochs": 3} if limit == "epochs" else {"max_steps": 16})
    full = fit(tmp_path / "full", save=True, **kwargs)
    assert len(full[1].history) >= 2, "the test needs batch-size changes"
    chosen, pending = _choose(tmp_path / "full", full[2].rows)
    if mode == "accumulate" and accumulation > 1:
        assert pending, "the test needs a checkpoint with a change waiting to land"
    for path in chosen:
        step = checkpoint_step(path)
        resumed = fit(tmp_path / path.stem, ckpt_path=str(path), **kwargs)
        _assert_same(full, resumed, step, path.name)


def _ddp(out, mode, ckpt=None):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    path = os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")
    args = [sys.executable, str(here / "scripts" / "ddp_resume.py"), str(out), mode]
    proc = subprocess.run(args + ([str(ckpt)] if ckpt else []), capture_output=True, text=True,
                          timeout=240, env=env, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_resume_from_an_epochs_last_batch_is_exact(tmp_path):
    """2 gloo ranks, accumulate mode: resumed from the checkpoint at epoch 0's last batch
    (the case Lightning numbers on from the old batch_idx), both ranks equal the full run."""
    (tmp_path / "full").mkdir()
    full = _ddp(tmp_path / "full", "accumulate")
    rows = full[0]["rows"]
    assert full[0]["weight"] == full[1]["weight"] and len(full[0]["history"]) >= 1
    last = next(r["step"] + 1 for r, nxt in zip(rows, rows[1:]) if nxt["epoch"] != r["epoch"])
    (tmp_path / "resumed").mkdir()
    ckpt = tmp_path / "full" / "ckpt" / f"s{last}.ckpt"
    resumed = _ddp(tmp_path / "resumed", "accumulate", ckpt)
    for rank in (0, 1):  # rows are per rank (each its own shard)
        assert resumed[rank]["rows"] == full[rank]["rows"][last:]
        assert resumed[rank]["weight"] == full[0]["weight"]
        assert resumed[rank]["history"] == full[0]["history"]
