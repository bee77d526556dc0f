"""Two-process gloo run of tests/resume_run.py's set-up, from scratch (saving checkpoints) or
resumed from one; each rank writes its per-step rows and final weights.

Usage: python ddp_resume.py OUT_DIR MODE [CKPT]   (run by tests/test_resume.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import torch  # noqa: E402
from resume_run import fit  # noqa: E402


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    model, cb, rec = fit(out / "ckpt", mode=mode, accumulation=1, max_epochs=3,
                         ckpt_path=ckpt, save=ckpt is None, devices=2, strategy="ddp",
                         use_distributed_sampler=False)
    rank = model.trainer.global_rank
    result = {"rows": rec.rows, "history": cb.history, "samples": cb.samples,
              "weight": model.linear.weight.detach().flatten().tolist()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
