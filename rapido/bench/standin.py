"""A free-model stand-in for the bench (``bench --model standin``): what a GPU host faces.

On a GPU the model costs the process's CPU almost nothing: the batch is handed to the
device, the thread waits on it with the GIL released, and the result comes back. What
then limits one process is everything around the model (feeds, jitter buffers, mel,
batch assembly, compositing, sinks, the clock). :class:`StandinBackend` behaves like that
device call: it checks the batch against the contract, sleeps ``latency_ms`` per batch
(``time.sleep`` releases the GIL, as a CUDA synchronise does) and returns the reference
half of the face input as the mouth (a view: no work). The manifest is ``rapido-lite``'s
(crop size, blend region, mel window), renamed, so everything else runs exactly as
it does for the real model.

The bench only: ``Config`` refuses ``model = "standin"``, so ``serve`` cannot run it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from rapido.gpu.contract import DEFAULT_BATCH_SIZES, batch_sizes_for, check_batch
from rapido.gpu.manifest import ModelManifest
from rapido.gpu.registry import ModelSettings, default_model_dir, resolve_model

#: ``bench --model standin``: the name the bench takes and reports.
STANDIN = "standin"
#: The manifest whose geometry the stand-in borrows.
BORROWED = "rapido-lite"


class StandinBackend:
    """A :class:`rapido.gpu.contract.ModelBackend` whose model costs only ``latency_ms``
    of waiting per batch, with the GIL released."""

    #: Like a device with streams: several batches may wait at once.
    thread_safe = True
    device = "none"

    def __init__(self, crop_size: int, latency_ms: float, max_batch: int) -> None:
        if not (latency_ms >= 0 and np.isfinite(latency_ms)):
            raise ValueError(f"latency_ms must be a number >= 0, got {latency_ms!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.crop_size = crop_size
        self.latency_s = latency_ms / 1000.0
        self.max_batch = max_batch
        self.preferred_batch_sizes = batch_sizes_for(DEFAULT_BATCH_SIZES, max_batch)
        self.name = f"standin/{latency_ms:g}ms"
        self.batches = 0

    def run(self, mel: np.ndarray, face: np.ndarray) -> np.ndarray:
        check_batch(mel, face, self.crop_size, self.max_batch)
        if self.latency_s:
            time.sleep(self.latency_s)
        self.batches += 1
        # The reference face (channels 3..5) as the "generated" mouth: no arithmetic.
        return face[:, 3:]

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "crop_size": self.crop_size,
                "latency_ms": self.latency_s * 1000.0, "max_batch": self.max_batch,
                "preferred_batch_sizes": list(self.preferred_batch_sizes)}

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class StandinModel:
    """A :data:`rapido.gpu.registry.ModelOpener` for the stand-in."""

    latency_ms: float
    name: str = STANDIN

    def __call__(self, settings: ModelSettings, max_batch: int
                 ) -> tuple[StandinBackend, ModelManifest]:
        borrowed = resolve_model(BORROWED, settings.model_dir or default_model_dir())
        manifest = dataclasses.replace(
            borrowed, name=STANDIN,
            description=f"the bench's free-model stand-in ({self.latency_ms:g} ms a batch, "
                        f"the geometry of {BORROWED})")
        return StandinBackend(manifest.crop_size, self.latency_ms, max_batch), manifest
