"""Two-process gloo run of AdaptiveBatchSize; each rank writes what it decided and saw.

Usage: python ddp_callback.py OUT_DIR RESIZE   (run by tests/test_callback_ddp.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lit_helpers import SamplerData, StepRecorder

from adabatch import AdaptiveBatchSize
from adabatch.control.policy import NoisePolicy
from adabatch.tasks.synthetic import LeastSquaresModel


class IndexedModel(LeastSquaresModel):
    """Records which examples this rank trained on (the x rows identify them)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch[0][:, 0].tolist())
        return super().training_step(batch, batch_idx)


class Dump(Callback):
    def __init__(self, out: Path, cb: AdaptiveBatchSize, rec: StepRecorder) -> None:
        self.out, self.cb, self.rec = out, cb, rec

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        result = {
            "history": self.cb.history,
            "batches": [r["batch"] for r in self.rec.rows],
            "lrs": [r["lr"] for r in self.rec.rows],
            "estimator": self.cb.estimator.state_dict(),
            "seen": pl_module.seen,
            "weight": pl_module.linear.weight.detach().flatten().tolist(),
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    out, resize = Path(sys.argv[1]), sys.argv[2]
    seed_everything(0)
    torch.set_num_threads(1)
    model = IndexedModel(dim=4, lr=0.2, init_scale=1.0)
    data = SamplerData(dim=4, batch_size=2, num_samples=600)
    policy = NoisePolicy(scale=4.0, hysteresis=0.1, confidence=0.0, never_decrease=False)
    cb = AdaptiveBatchSize(noise="auto", policy=policy, resize=resize, half_life_samples=100,
                           min_batch_size=4, max_batch_size=64, ref_batch_size=4)
    rec = StepRecorder()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                      use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb, rec, Dump(out, cb, rec)])
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
