"""Two-process gloo runs of the measurement cases (tests/measurement_cases.py): per-example
and micro-batch statistics, accumulation 1 and 4, in one launch.

Usage: python ddp_measurement.py OUT_DIR   (run by tests/test_callback_ddp.py); each rank
writes rank{r}.json: {case: summary}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from measurement_cases import make_run, summary

STEPS = 40  # per case; the last-step oracle is exact, the average has a 20% power bound
CASES = [("per_example", 1), ("per_example", 4), ("microbatch", 1), ("microbatch", 4)]


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    results = {}
    rank = 0
    for source, k in CASES:
        model, data, cb = make_run(source, k, world=2, steps=STEPS)
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                          accumulate_grad_batches=k, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb])
        trainer.fit(model, data)
        rank = trainer.global_rank
        results[f"{source}-{k}"] = summary(cb, model)
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
