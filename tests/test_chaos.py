"""Chaos resume: SIGKILL at 32 random points (20 in accumulate mode, 12 in sampler mode),
resume from the newest (or a recent) checkpoint each time; the stitched run must equal the
uninterrupted one step by step (samples, micro-batches, data order, LR) and in its final
weights, bit for bit. See tests/scripts/chaos_resume.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "chaos_resume.py"


@pytest.mark.parametrize(("mode", "kills", "seed"), [("accumulate", 20, 0), ("sampler", 12, 1)])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, mode, kills, seed):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), mode, str(kills),
                             str(seed)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"], report
    assert report["kills"] == kills and report["changes"] >= 2
    assert len(report["hooks"]) >= 3, report["hooks"]  # before, inside and between steps
