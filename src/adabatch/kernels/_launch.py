"""Launcher helpers shared by the Triton kernel files: shapes, device checks, SM count."""

from __future__ import annotations

import torch
import triton


def as_3d(t: torch.Tensor, name: str) -> torch.Tensor:
    """``[B, d] -> [B, 1, d]``; ``[B, ..., d] -> [B, T, d]`` with the middle dims as T."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape [B, T, d] or [B, d], got {tuple(t.shape)}")
    return t if t.dim() == 3 else t.flatten(1, -2)


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """Refuse CPU tensors for a kernel compiled for the GPU, saying what to do instead."""
    if not is_interpreted(kernel) and any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError(
            "the Triton kernels were compiled for the GPU but got "
            f"{[str(t.device) for t in tensors]} tensors; run CPU tensors with TRITON_INTERPRET=1 "
            "set before adabatch.kernels is imported, or use ADABATCH_KERNELS=torch"
        )


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a few under the interpreter, so that the
    split/reduce paths are exercised on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
