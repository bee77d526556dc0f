"""Two-process gloo run of the critical-batch probe; each rank writes what it measured.

Usage: python ddp_branch.py OUT_DIR   (run by tests/test_branch.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lit_helpers import SamplerData, model_near_optimum

from adabatch import AdaptiveBatchSize
from adabatch.control.critical import CriticalBatchProbe
from adabatch.control.policy import CriticalBatchPolicy


class Dump(Callback):
    def __init__(self, out: Path, cb: AdaptiveBatchSize) -> None:
        self.out, self.cb = out, cb

    def on_train_end(self, trainer, pl_module) -> None:
        result = {
            "history": self.cb.history,
            "results": [r.to_dict() for r in self.cb.policy.results],
            "spent": self.cb._branch.spent,
            "samples": self.cb.samples,
            "weight": pl_module.linear.weight.detach().flatten().tolist(),
        }
        for r in result["results"]:
            r.pop("seconds")  # wall-clock: differs between ranks
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    out = Path(sys.argv[1])
    seed_everything(0)
    torch.set_num_threads(1)
    model = model_near_optimum(offset=0.3, dim=8, lr=0.01)
    data = SamplerData(dim=8, batch_size=2, num_samples=4096)
    probe = CriticalBatchProbe(window_steps=8, eval_samples=64, max_overhead=0.3)
    cb = AdaptiveBatchSize(policy=CriticalBatchPolicy(probe=probe), ref_batch_size=4,
                           half_life_samples=500, max_batch_size=64)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=300,
                      use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb, Dump(out, cb)])
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
