from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def tiny_charlm(tmp_path):
    """`adabatch fit` arguments for a seconds-long char-LM run logging under tmp_path."""
    return [
        "fit", "--config", str(CONFIGS / "charlm.yaml"),
        "--model.d_model=16", "--model.n_layers=1", "--model.n_heads=2",
        "--model.context=16", "--data.context=16", "--data.batch_size=4",
        "--data.max_bytes=30000", "--data.max_val_windows=8",
        "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=run",
        "--trainer.logger.version=v",
    ]
