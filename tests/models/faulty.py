"""A user model that follows the contract but fails on loud input: the kind of fault a
real user checkpoint can have (NaNs, a bad custom op). Loaded through a manifest with
``torch_factory``, exactly as a user's own model would be."""

from __future__ import annotations

import torch
from torch import nn


class LoudFails(nn.Module):
    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        if bool((mel.mean(dim=(1, 2, 3)) > -1.0).any()):
            raise RuntimeError("this model cannot take loud input")
        return face[:, 3:]


def build(seed: int = 0, checkpoint: str | None = None) -> LoudFails:
    return LoudFails().eval()
