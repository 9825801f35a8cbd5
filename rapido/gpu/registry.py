"""Where models come from: the built-ins are built by the project, never downloaded.

``rapido-lite`` (the parametric mouth renderer) and ``wav2lip-96`` (the reference
architecture, seeded random weights unless a checkpoint is given) are exported to ONNX
on first use into the model directory, with a manifest beside each; later starts reuse
the files. Anything else is a user's manifest file on disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from rapido.gpu.manifest import ModelManifest, check_onnx, load_manifest, write_manifest

log = logging.getLogger(__name__)

BUILTINS = ("rapido-lite", "wav2lip-96")
#: Bumped whenever a built-in's graph changes, so stale caches are rebuilt.
BUILD_VERSION = "1"


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
        from rapido.gpu.models.lite import build_lite
        from rapido.gpu.models.lite import export_onnx as export_lite

        lite = build_lite()
        export_lite(lite, onnx_path)
        manifest = ModelManifest(
            name="rapido-lite", format="onnx", path=onnx_path,
            crop_size=int(lite.crop_size),
            torch_factory="rapido.gpu.models.lite:build_lite",
            description="rapido-lite: a parametric mouth renderer for the default avatar "
                        "(not a trained network)")
    else:
        from rapido.gpu.models.wav2lip import build
        from rapido.gpu.models.wav2lip import export_onnx as export_w2l

        export_w2l(build(seed=0), onnx_path)
        manifest = ModelManifest(
            name="wav2lip-96", format="onnx", path=onnx_path, crop_size=96,
            torch_factory="rapido.gpu.models.wav2lip:build",
            description="Wav2Lip-96 reference architecture, seeded random weights")
    path = write_manifest(manifest, out_dir / "manifest.json")
    (out_dir / "VERSION").write_text(BUILD_VERSION + "\n")
    return path


def resolve_model(model: str, model_dir: Path | None = None) -> ModelManifest:
    """A built-in by name (built into the cache on first use) or a manifest file."""
    if model in BUILTINS:
        root = (model_dir or default_model_dir()) / model
        manifest_path = root / "manifest.json"
        version = root / "VERSION"
        if not (manifest_path.is_file() and version.is_file()
                and version.read_text().strip() == BUILD_VERSION):
            log.info("building the built-in model %s into %s (first use)", model, root)
            root.parent.mkdir(parents=True, exist_ok=True)
            # Build aside and move into place, so a crash or a second process never sees
            # half a model.
            tmp = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=root.parent))
            try:
                build_builtin(model, tmp)
                if root.exists():
                    shutil.rmtree(root)
                tmp.rename(root)
            except OSError:
                # Another instance (one per GPU, starting together) may have moved its
                # build into place first: use it if it is complete.
                shutil.rmtree(tmp, ignore_errors=True)
                if not (manifest_path.is_file() and version.is_file()):
                    raise
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    else:
        manifest_path = Path(model)
    manifest = load_manifest(manifest_path)
    if manifest.format == "onnx":
        check_onnx(manifest)
    return manifest
