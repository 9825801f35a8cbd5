"""The backend contract: what the batcher drives, and the checks every backend makes.

Its own module so the backends (``backends.py`` for ONNX Runtime and the choice of one,
``torch_backend.py``) share it without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from rapido.gpu.manifest import FACE_CHANNELS, MEL_BINS, MEL_FRAMES

if TYPE_CHECKING:
    import torch

TorchDtype = Literal["float32", "float16", "bfloat16"]

DEFAULT_BATCH_SIZES = (1, 2, 4, 8)


@runtime_checkable
class ModelBackend(Protocol):
    """What the batcher drives. ``run`` is synchronous; it is called from one thread
    unless the backend is ``thread_safe``, in which case up to ``batch_workers``
    batches may run at once, each from its own thread."""

    thread_safe: bool
    name: str
    device: str
    crop_size: int
    preferred_batch_sizes: tuple[int, ...]

    def run(self, mel: np.ndarray, face: np.ndarray) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@runtime_checkable
class DeviceOutput(Protocol):
    """A backend that can leave a batch's crops on its device: ``run_device`` returns a
    float32 torch tensor ``[B, 3, S, S]`` where the model ran, so compositing and the
    colour conversion run there too and the pictures come down once per batch."""

    device: str

    def run_device(self, mel: np.ndarray, face: np.ndarray) -> torch.Tensor: ...


def check_batch(mel: object, face: object, crop_size: int, max_batch: int) -> int:
    """Validate one batch against the contract; returns B. Costs a few attribute reads."""
    for arg, x, tail in (("mel", mel, (1, MEL_BINS, MEL_FRAMES)),
                         ("face", face, (FACE_CHANNELS, crop_size, crop_size))):
        if not isinstance(x, np.ndarray):
            raise ValueError(f"{arg} must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != tail:
            want = ", ".join(map(str, tail))
            raise ValueError(f"{arg} must be float32 [B, {want}], "
                             f"got {x.dtype} {list(x.shape)}")
    assert isinstance(mel, np.ndarray) and isinstance(face, np.ndarray)
    b = mel.shape[0]
    if face.shape[0] != b:
        raise ValueError(f"mel has batch {b} but face has batch {face.shape[0]}")
    if not 1 <= b <= max_batch:
        raise ValueError(f"batch of {b} is outside 1..{max_batch} for this backend")
    return int(b)


def check_output_shape(shape: tuple[int, ...], b: int, crop_size: int) -> None:
    want = (b, 3, crop_size, crop_size)
    if shape != want:
        # The model broke the contract; say so rather than hand garbage to compositing.
        raise RuntimeError(f"model returned {list(shape)}, the contract wants {list(want)}")


def check_output(out: np.ndarray, b: int, crop_size: int) -> np.ndarray:
    """The model's output for a batch of ``b``, checked against the contract (float32)."""
    check_output_shape(tuple(out.shape), b, crop_size)
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    return out


def batch_sizes_for(sizes: Sequence[int], max_batch: int) -> tuple[int, ...]:
    """The manifest's sizes up to ``max_batch``, plus ``max_batch`` itself: the operator's
    limit is a size the backend must serve (and, on torch/CUDA, a graph bucket)."""
    return tuple(sorted({b for b in sizes if 1 <= b <= max_batch} | {max_batch}))
