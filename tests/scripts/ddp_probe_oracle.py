"""Two-process gloo run of the probe's closed-form oracle (`probe_oracle`); each rank writes
its probes and its |w|^2 trajectory.

Usage: python ddp_probe_oracle.py OUT_DIR   (run by tests/test_branch.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import probe_oracle
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, DistributedSampler


class Dump(Callback):
    def __init__(self, out: Path, cb, rec) -> None:  # noqa: ANN001
        self.out, self.cb, self.rec = out, cb, rec

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        result = {"results": [r.to_dict() for r in self.cb.policy.results],
                  "sq_norms": self.rec.sq_norms}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    cb, rec = probe_oracle.callback("per_example"), probe_oracle.WeightRecorder()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                      max_steps=probe_oracle.MAX_STEPS, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[cb, rec, Dump(out, cb, rec)])
    # two ranks x micro-batch 2 = the global batch; rank r reads the examples r, r + 2, ...
    # in order, so the first ZEROS of them (all z = 0) are the probe set
    data = probe_oracle.dataset()
    sampler = DistributedSampler(data, num_replicas=2, rank=trainer.global_rank, shuffle=False)
    loader = DataLoader(data, batch_size=probe_oracle.BATCH // 2, sampler=sampler)
    trainer.fit(probe_oracle.QuadraticOnAxes(), loader)


if __name__ == "__main__":
    main()
