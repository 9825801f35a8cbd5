"""Where models come from: the built-ins are built by the project, never downloaded;
and how a node opens its model and the lip-sync renderer over it.

``rapido-lite`` (the parametric mouth renderer) and ``wav2lip-96`` (the reference
architecture, seeded random weights unless a checkpoint is given) are exported to ONNX
on first use into the model directory, with a manifest beside each; later starts reuse
the files. Anything else is a user's manifest file on disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rapido.gpu.backends import ModelBackend, make_backend
from rapido.gpu.batcher import BatcherSeries
from rapido.gpu.lipsync import SILENT_MEL, LipSyncRenderer
from rapido.gpu.manifest import (
    FACE_CHANNELS,
    MEL_BINS,
    MEL_FRAMES,
    ModelManifest,
    check_onnx,
    load_manifest,
    write_manifest,
)
from rapido.pipeline.features import MelSpec

log = logging.getLogger(__name__)

BUILTINS = ("rapido-lite", "wav2lip-96")
#: Bumped whenever a built-in's graph or manifest changes, so stale caches are rebuilt.
BUILD_VERSION = "3"  # 2: manifests state their blend region; 3: and their mel window


def default_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rapido" / "models"


def build_builtin(name: str, out_dir: Path) -> Path:
    """Export built-in ``name`` to ``out_dir/model.onnx`` + ``manifest.json``; returns the
    manifest path. Deterministic: the same version builds the same graph."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTINS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    if name == "rapido-lite":
        from rapido.gpu.models.lite import MEL_OFFSET_FRAMES as LITE_MEL_OFFSET
        from rapido.gpu.models.lite import build_lite
        from rapido.gpu.models.lite import export_onnx as export_lite

        lite = build_lite()
        export_lite(lite, onnx_path)
        manifest = ModelManifest(
            name="rapido-lite", format="onnx", path=onnx_path,
            crop_size=int(lite.crop_size),
            torch_factory="rapido.gpu.models.lite:build_lite", blend="mouth",
            mel_offset_frames=LITE_MEL_OFFSET,
            description="rapido-lite: a parametric mouth renderer for the default avatar "
                        "(not a trained network)")
    else:
        from rapido.gpu.models.wav2lip import build
        from rapido.gpu.models.wav2lip import export_onnx as export_w2l

        export_w2l(build(seed=0), onnx_path)
        manifest = ModelManifest(
            name="wav2lip-96", format="onnx", path=onnx_path, crop_size=96,
            torch_factory="rapido.gpu.models.wav2lip:build",
            # Wav2Lip's training alignment: what its released weights expect.
            mel_offset_frames=-1,
            description="Wav2Lip-96 reference architecture, seeded random weights")
    path = write_manifest(manifest, out_dir / "manifest.json")
    (out_dir / "VERSION").write_text(BUILD_VERSION + "\n")
    return path


def _built(root: Path) -> bool:
    """A complete build of this version is in ``root`` (the VERSION file is written last)."""
    version = root / "VERSION"
    return ((root / "manifest.json").is_file() and version.is_file()
            and version.read_text().strip() == BUILD_VERSION)


def resolve_model(model: str, model_dir: Path | None = None) -> ModelManifest:
    """A built-in by name (built into the cache on first use) or a manifest file."""
    if model in BUILTINS:
        root = (model_dir or default_model_dir()) / model
        manifest_path = root / "manifest.json"
        if not _built(root):
            root.parent.mkdir(parents=True, exist_ok=True)
            # Nodes sharing a model folder (one per GPU, or a test's nodes) start together:
            # one builds while the others wait on the lock, then find the model built. A
            # second build must never replace a complete one another process is reading.
            with open(root.parent / f".{model}.lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not _built(root):
                    log.info("building the built-in model %s into %s (first use)", model,
                             root)
                    # Build aside and move into place, so a crash never leaves half a model.
                    tmp = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=root.parent))
                    try:
                        build_builtin(model, tmp)
                        if root.exists():
                            shutil.rmtree(root)  # a stale build version
                        tmp.rename(root)
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
    else:
        manifest_path = Path(model)
    manifest = load_manifest(manifest_path)
    if manifest.format == "onnx":
        check_onnx(manifest)
    return manifest


@dataclass(frozen=True)
class ModelSettings:
    """Which lip-sync model a node serves, and on what."""

    model: str  # a built-in's name or a manifest file
    model_dir: Path | None  # where built-ins are built (default: the user cache)
    backend: str  # onnx | torch | auto
    device: str  # cpu | cuda | auto
    dtype: str  # GPU precision
    intra_op_threads: int
    trt_cache_dir: Path | None  # default: under model_dir


@dataclass(frozen=True)
class BatchSettings:
    """How the shared model is driven: the micro-batcher and the frame deadline."""

    max_batch: int
    max_wait_ms: float
    batch_workers: int  # batches in flight, where the backend allows several
    frame_budget_ms: float


def open_model(settings: ModelSettings, max_batch: int) -> tuple[ModelBackend, ModelManifest]:
    """Resolve, open and warm up the model (slow: run it off the event loop)."""
    model_dir = settings.model_dir or default_model_dir()
    manifest = resolve_model(settings.model, model_dir)
    backend = make_backend(
        manifest, kind=settings.backend, device=settings.device, dtype=settings.dtype,
        intra_op_threads=settings.intra_op_threads, max_batch=max_batch,
        trt_cache_dir=settings.trt_cache_dir or model_dir / "trt-cache")
    # The first runs of a session allocate and pick kernels (and on a GPU build engines
    # or capture graphs): do it now, not on the first speaking frames.
    s = backend.crop_size
    for size in sorted({b for b in backend.preferred_batch_sizes if b <= max_batch} | {1}):
        backend.run(np.full((size, 1, MEL_BINS, MEL_FRAMES), SILENT_MEL, np.float32),
                    np.zeros((size, FACE_CHANNELS, s, s), np.float32))
    return backend, manifest


#: Opens a model for a batch limit: :func:`open_model`, or the bench's free stand-in.
ModelOpener = Callable[[ModelSettings, int], tuple[ModelBackend, ModelManifest]]


def open_renderer(model: ModelSettings, batch: BatchSettings, *,
                  metrics: BatcherSeries | None = None,
                  on_quality: Callable[[float], None] | None = None,
                  opener: ModelOpener = open_model) -> LipSyncRenderer:
    """The lip-sync renderer over the configured model (slow: off the event loop)."""
    backend, manifest = opener(model, batch.max_batch)
    renderer = LipSyncRenderer(
        backend, blend=manifest.blend, max_batch=batch.max_batch,
        max_wait_ms=batch.max_wait_ms,
        # Several batches at once only where the backend allows it.
        batch_workers=batch.batch_workers if backend.thread_safe else 1,
        budget_ms=batch.frame_budget_ms, batcher_metrics=metrics,
        spec=MelSpec(offset_frames=manifest.mel_offset_frames),
        on_quality=on_quality, model_name=manifest.name)
    log.info("lip sync: model %s on %s", manifest.name, backend.name)
    return renderer
