"""Two-process DDP (gloo, CPU) run of `ResizableBatchSampler` under Lightning.

Run by ``tests/test_data.py`` as ``python ddp_sampler.py OUT_DIR`` (``strategy="ddp"`` relaunches
this script for rank 1; inside pytest it would relaunch pytest). The module changes the
sampler's batch size in ``on_train_batch_end`` and records, per rank, each trained batch's
epoch and dataset indices; each rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from adabatch.data import ResizableBatchSampler, ResizableDataLoader

NUM_SAMPLES = 61
BATCH_SIZE = 4
# batch index (within the epoch) at whose end the per-rank batch size changes -> new size
SCHEDULE = {1: 7, 3: 3}


class Indexed(Dataset):
    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.tensor([float(i) / NUM_SAMPLES])


class Recorder(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = nn.Linear(1, 1)
        self.batches: list[dict] = []

    def train_dataloader(self) -> ResizableDataLoader:
        sampler = ResizableBatchSampler(Indexed(), batch_size=BATCH_SIZE, seed=5)
        return ResizableDataLoader(Indexed(), sampler)

    def training_step(self, batch, batch_idx):
        index, x = batch
        self.batches.append({"epoch": self.current_epoch, "indices": index.tolist()})
        return self.layer(x).pow(2).mean()

    def on_train_epoch_start(self) -> None:
        self.trainer.train_dataloader.batch_sampler.set_batch_size(BATCH_SIZE)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        sampler = self.trainer.train_dataloader.batch_sampler
        sampler.advance()
        if batch_idx in SCHEDULE:
            sampler.set_batch_size(SCHEDULE[batch_idx])

    def on_train_end(self) -> None:
        sampler = self.trainer.train_dataloader.batch_sampler
        record = {
            "rank": self.global_rank,
            "world_size": self.trainer.world_size,
            "sampler_num_replicas": sampler.num_replicas,
            "sampler_rank": sampler.rank,
            "state": sampler.state_dict(),
            "batches": self.batches,
        }
        path = os.path.join(self.out_dir, f"rank{self.global_rank}.json")
        with open(path, "w") as f:
            json.dump(record, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Recorder(out_dir))


if __name__ == "__main__":
    main(sys.argv[1])
