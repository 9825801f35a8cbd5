"""A user model that follows the contract but fails on loud input: the kind of fault a
real user checkpoint can have (NaNs, a bad custom op). Loaded through a manifest with
``torch_factory``, exactly as a user's own model would be."""

from __future__ import annotations

import torch
from torch import nn


class LoudFails(nn.Module):
    def __init__(self, out_of_memory: bool = False) -> None:
        super().__init__()
        self.out_of_memory = out_of_memory

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        if bool((mel.mean(dim=(1, 2, 3)) > -1.0).any()):
            if self.out_of_memory:
                # What torch raises when a CUDA allocation fails (a GPU under pressure).
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total "
                    "capacity; 78.5 GiB already allocated)")
            raise RuntimeError("this model cannot take loud input")
        return face[:, 3:]


def build(seed: int = 0, checkpoint: str | None = None) -> LoudFails:
    return LoudFails().eval()


def build_oom(seed: int = 0, checkpoint: str | None = None) -> LoudFails:
    """Runs out of device memory on loud input."""
    return LoudFails(out_of_memory=True).eval()
