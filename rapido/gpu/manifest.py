"""Model manifests: a lip-sync model is a file plus a manifest.

The manifest is a small JSON file next to the model. JSON rather than TOML because the
standard library both reads and writes it (``write_manifest`` round-trips exactly) and
every exporter can produce it. Keys are the field names of :class:`ModelManifest`::

    {
      "name": "wav2lip",
      "format": "onnx",
      "path": "wav2lip.onnx",
      "crop_size": 96,
      "fps": 25,
      "audio_features": "mel80_16k_wav2lip",
      "mel_input": "mel",
      "face_input": "face",
      "output": "out",
      "value_range": [0.0, 1.0],
      "torch_factory": "rapido.gpu.models.wav2lip:build",
      "checkpoint": null,
      "batch_sizes": [1, 2, 4, 8],
      "blend": "lower_half",
      "mel_offset_frames": -1,
      "description": "Wav2Lip (Prajwal et al. 2020), 96x96"
    }

``blend`` says which part of the face the model redraws and the compositor pastes back:
``"lower_half"`` (Wav2Lip-style models, the default) or ``"mouth"`` (the built-in
``rapido-lite``, which draws only the mouth).

``mel_offset_frames`` says where video frame ``n``'s window of 16 mel frames starts, in
video frames relative to ``n``: the window begins at mel frame
``floor(80 / fps * (n + mel_offset_frames))``. Wav2Lip's training loader paired frame
``n`` with the window one frame earlier, so weights trained by it expect ``-1`` (audio
``[t - 40 ms, t + 160 ms]`` around the frame's time ``t``), the default; ``0`` is
Wav2Lip's inference script, which shows trained weights' mouth 40 ms early. The built-in
models state ``-1`` too. The pipeline follows it everywhere: the windows, the look-ahead
a frame waits for (135.6 ms at -1, 175.6 ms at 0) and the silence before an utterance's
first frames. A manifest of ``rapido-lite`` written before the field existed is read as
``0``, the window that graph was drawn for.

Only ``name``, ``format`` and ``crop_size`` are always required; ``path`` is required for
``format: "onnx"`` and ``torch_factory`` for ``format: "torch"``. Relative paths are
resolved against the manifest's own folder, so a model and its manifest move together.
Unknown keys are refused, so a typo (``"crop_szie"``) is an error, not a silent default.

The contract every model follows (Wav2Lip's):

* input ``mel``: float32 ``[B, 1, 80, 16]``, 16 kHz audio, n_fft 800, hop 200, 80 mels
  (fmin 55, fmax 7600), pre-emphasis 0.97, a window of 16 mel frames per video frame;
* input ``face``: float32 ``[B, 6, S, S]``: the face crop with its lower half zeroed, then
  the reference crop; RGB; values 0..1;
* output: float32 ``[B, 3, S, S]`` in 0..1.

Graph I/O may also be float16 (``check_onnx`` accepts it and the ONNX backend casts at the
boundary): fp16 exports are common for GPU deployment and the cast is cheap next to the
model. Any other element type is refused. The backends always speak float32 numpy.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rapido.pipeline.features import MAX_OFFSET_FRAMES

__all__ = [
    "AUDIO_FEATURES",
    "BLEND_REGIONS",
    "MEL_BINS",
    "MEL_FRAMES",
    "BlendRegion",
    "ModelError",
    "ModelFormat",
    "ModelManifest",
    "check_onnx",
    "import_factory",
    "load_manifest",
    "manifest_dict",
    "write_manifest",
]

log = logging.getLogger(__name__)

ModelFormat = Literal["onnx", "torch"]
#: The part of the face a model redraws (see ``rapido.gpu.compositor``).
BlendRegion = Literal["lower_half", "mouth"]
BLEND_REGIONS = ("lower_half", "mouth")

#: The one audio feature kind the pipeline produces (see the module docstring).
AUDIO_FEATURES = "mel80_16k_wav2lip"
MEL_BINS = 80
MEL_FRAMES = 16
FACE_CHANNELS = 6
OUT_CHANNELS = 3

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_MIN_CROP, _MAX_CROP = 16, 1024
_MAX_BATCH = 256


class ModelError(Exception):
    """A model or its manifest is unusable; the message says which field and why."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ModelManifest:
    """What the server needs to know to serve one lip-sync model.

    ``path`` and ``checkpoint`` are absolute once loaded. ``source`` (the manifest file a
    manifest was read from) is for messages only and takes no part in equality.
    """

    name: str
    format: ModelFormat
    crop_size: int
    path: Path | None = None
    fps: int = 25
    audio_features: str = AUDIO_FEATURES
    mel_input: str = "mel"
    face_input: str = "face"
    output: str = "out"
    value_range: tuple[float, float] = (0.0, 1.0)
    torch_factory: str | None = None
    checkpoint: Path | None = None
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    blend: BlendRegion = "lower_half"
    #: Where frame n's mel window starts, in frames from n (see the module docstring).
    mel_offset_frames: int = -1
    description: str = ""
    source: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Programmatic construction gets the same checks as a loaded file.
        _validate(self)

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)

    def where(self) -> str:
        """How messages name this manifest: its file when it has one."""
        return f"manifest {self.source}" if self.source else f"manifest {self.name!r}"


# --------------------------------------------------------------------------- validation

_FIELDS = {f.name for f in dataclasses.fields(ModelManifest)} - {"source"}
_REQUIRED = ("name", "format", "crop_size")


def _fail(where: str, name: str, problem: str) -> ModelError:
    return ModelError(f"{where}: {name}: {problem}", field=name)


def _is_int(v: object) -> bool:
    # bool is an int subclass; `"crop_size": true` is a mistake, not 1.
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(m: ModelManifest) -> None:
    w = m.where()
    if not isinstance(m.name, str) or not _NAME_RE.match(m.name):
        raise _fail(w, "name", f"must be 1-64 characters of letters, digits, '.', '_' or "
                               f"'-' (it shows in metrics and logs), got {m.name!r}")
    if m.format not in ("onnx", "torch"):
        raise _fail(w, "format", f"must be 'onnx' or 'torch', got {m.format!r}")
    if (not _is_int(m.crop_size) or not _MIN_CROP <= m.crop_size <= _MAX_CROP
            or m.crop_size % 2):
        raise _fail(w, "crop_size", f"must be an even integer from {_MIN_CROP} to "
                                    f"{_MAX_CROP} (the lower half is masked), "
                                    f"got {m.crop_size!r}")
    if m.path is not None and not isinstance(m.path, Path):
        raise _fail(w, "path", f"must be a Path, got {type(m.path).__name__}")
    if m.format == "onnx" and m.path is None:
        raise _fail(w, "path", "is required for format 'onnx' (the .onnx file)")
    if m.format == "torch" and m.path is not None:
        raise _fail(w, "path", "names an ONNX file, which needs format 'onnx'; a torch "
                               "model is built by torch_factory and loads 'checkpoint'")
    if not _is_int(m.fps) or not 1 <= m.fps <= 120:
        raise _fail(w, "fps", f"must be an integer from 1 to 120, got {m.fps!r}")
    if m.audio_features != AUDIO_FEATURES:
        raise _fail(w, "audio_features", f"must be {AUDIO_FEATURES!r} (the only audio "
                                         f"features the pipeline computes), "
                                         f"got {m.audio_features!r}")
    names = {}
    for key in ("mel_input", "face_input", "output"):
        v = getattr(m, key)
        if not isinstance(v, str) or not v or len(v) > 256:
            raise _fail(w, key, f"must be a non-empty tensor name, got {v!r}")
        names[key] = v
    if names["mel_input"] == names["face_input"]:
        raise _fail(w, "face_input", f"must differ from mel_input ({names['mel_input']!r})")
    vr = m.value_range
    if (not isinstance(vr, tuple) or len(vr) != 2
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vr)
            or tuple(float(x) for x in vr) != (0.0, 1.0)):
        # Declared so a model trained on another range is refused rather than served
        # wrong; rescaling in the backends would cost a copy on every batch.
        raise _fail(w, "value_range", f"only [0, 1] is supported, got {vr!r}")
    if m.torch_factory is not None and (not isinstance(m.torch_factory, str)
                                        or not _FACTORY_RE.match(m.torch_factory)):
        raise _fail(w, "torch_factory", f"must look like 'package.module:callable', "
                                        f"got {m.torch_factory!r}")
    if m.format == "torch" and m.torch_factory is None:
        raise _fail(w, "torch_factory", "is required for format 'torch'")
    if m.checkpoint is not None:
        if not isinstance(m.checkpoint, Path):
            raise _fail(w, "checkpoint", f"must be a Path, got {type(m.checkpoint).__name__}")
        if m.torch_factory is None:
            raise _fail(w, "checkpoint", "is loaded into the module torch_factory builds; "
                                         "set torch_factory too")
    bs = m.batch_sizes
    if (not isinstance(bs, tuple) or not bs or not all(_is_int(b) for b in bs)
            or not all(1 <= b <= _MAX_BATCH for b in bs)
            or list(bs) != sorted(set(bs))):
        raise _fail(w, "batch_sizes", f"must be a non-empty, strictly increasing list of "
                                      f"integers from 1 to {_MAX_BATCH}, got {bs!r}")
    if m.blend not in BLEND_REGIONS:
        raise _fail(w, "blend", f"must be one of {', '.join(BLEND_REGIONS)}, got {m.blend!r}")
    if not _is_int(m.mel_offset_frames) or abs(m.mel_offset_frames) > MAX_OFFSET_FRAMES:
        raise _fail(w, "mel_offset_frames", f"must be an integer from {-MAX_OFFSET_FRAMES} "
                                            f"to {MAX_OFFSET_FRAMES} (video frames), "
                                            f"got {m.mel_offset_frames!r}")
    if not isinstance(m.description, str):
        raise _fail(w, "description", f"must be a string, got {m.description!r}")


def _resolve(base: Path, value: object, key: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(where, key, f"must be a non-empty path string, got {value!r}")
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def load_manifest(path: str | os.PathLike[str]) -> ModelManifest:
    """Read and validate a JSON manifest; every problem is a :class:`ModelError`.

    Files named by ``path`` and ``checkpoint`` must exist. The model itself is not opened
    here (see :func:`check_onnx`): loading a manifest stays cheap."""
    src = Path(path).expanduser().resolve()
    where = f"manifest {src}"
    try:
        text = src.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelError(f"{where}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ModelError(f"{where}: not UTF-8 text ({e.reason})") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{where}: not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from e
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _fail(where, unknown[0], f"unknown key (known keys: {', '.join(sorted(_FIELDS))})")
    for key in _REQUIRED:
        if key not in raw:
            raise _fail(where, key, "is required")

    kw: dict[str, Any] = dict(raw)
    if "blend" not in kw and kw.get("name") == "rapido-lite":
        # Written before manifests stated their blend region (an exported rapido-lite
        # in a folder of its own): that model only ever redrew the mouth.
        kw["blend"] = "mouth"
    if "mel_offset_frames" not in kw and kw.get("name") == "rapido-lite":
        # Likewise before manifests stated their window: that graph read the window
        # starting at the frame itself.
        kw["mel_offset_frames"] = 0
    base = src.parent
    for key in ("path", "checkpoint"):
        if kw.get(key) is not None:
            p = _resolve(base, kw[key], key, where)
            if not p.is_file():
                raise _fail(where, key, f"file {p} does not exist")
            kw[key] = p
    for key in ("value_range", "batch_sizes"):
        if key in kw:
            if not isinstance(kw[key], list):
                raise _fail(where, key, f"must be a JSON list, got {kw[key]!r}")
            kw[key] = tuple(kw[key])
    try:
        return ModelManifest(**kw, source=src)
    except ModelError:
        raise
    except TypeError as e:  # pragma: no cover - every key was checked above
        raise ModelError(f"{where}: {e}") from e


def _rel(p: Path, base: Path) -> str:
    # Relative when possible so the manifest and its model can be moved together.
    try:
        return Path(os.path.relpath(p, base)).as_posix()
    except ValueError:  # another drive on Windows
        return str(p)


def write_manifest(manifest: ModelManifest, path: str | os.PathLike[str]) -> Path:
    """Write ``manifest`` as JSON at ``path`` (paths relative to its folder); returns the
    absolute path written. ``load_manifest`` of the result equals ``manifest``."""
    dst = Path(path).expanduser().resolve()
    out: dict[str, Any] = {}
    for f in dataclasses.fields(manifest):
        if f.name == "source":
            continue
        v = getattr(manifest, f.name)
        if isinstance(v, Path):
            v = _rel(v, dst.parent)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    tmp.replace(dst)  # never leave a half-written manifest behind
    return dst


def import_factory(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:callable"``; a :class:`ModelError` says what failed."""
    if not _FACTORY_RE.match(spec):
        raise ModelError(f"torch_factory: must look like 'package.module:callable', "
                         f"got {spec!r}", field="torch_factory")
    mod_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"torch_factory: cannot import module {mod_name!r}: {e}",
                         field="torch_factory") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ModelError(f"torch_factory: module {mod_name!r} has no callable {attr!r}",
                         field="torch_factory")
    return fn


# --------------------------------------------------------------------------- ONNX check

# numpy-free names for the ONNX element types we may meet in messages.
_ELEM_NAMES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
               9: "bool", 10: "float16", 11: "float64", 16: "bfloat16"}
_OK_ELEMS = (1, 10)  # float32, float16

Dim = int | str | None  # static size, symbolic name, or unknown


def _dims(vi: Any) -> tuple[int, list[Dim] | None]:
    """(element type, dims or None when the graph declares no shape)."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tt.elem_type, dims


def _check_tensor(kind: str, name: str, vi: Any, want: list[tuple[int, str, str]],
                  problems: list[str]) -> Dim:
    """Check one graph input/output; returns its batch dim. ``want`` is
    (size, what, whose) for dims 1..3, e.g. (6, "channels", "the contract")."""
    if vi.type.WhichOneof("value") != "tensor_type":
        problems.append(f"{kind} {name!r} is not a tensor")
        return None
    elem, dims = _dims(vi)
    if elem not in _OK_ELEMS:
        problems.append(f"{kind} {name!r} is {_ELEM_NAMES.get(elem, f'type {elem}')}, "
                        f"the contract wants float32 (or float16)")
    if dims is None:
        log.warning("%s %r declares no shape; its size is only checked at run time",
                    kind, name)
        return None
    if len(dims) != 4:
        problems.append(f"{kind} {name!r} has rank {len(dims)}, the contract wants 4 "
                        f"([batch, {', '.join(str(w[0]) for w in want)}])")
        return None
    for i, (size, what, whose) in enumerate(want, start=1):
        d = dims[i]
        # A symbolic dim is not a mismatch: the backend checks real sizes per batch.
        if isinstance(d, int) and d != size:
            problems.append(f"{kind} {name!r} has {d} {what} (dim {i}), {whose} wants {size}")
    return dims[0]


def check_onnx(manifest: ModelManifest) -> None:
    """Refuse an ONNX model that cannot serve ``manifest``: a missing, truncated or
    non-protobuf file, a graph the ONNX checker rejects, or inputs/outputs whose names,
    ranks, element types or static sizes differ from the contract. All mismatches are
    reported at once, each saying exactly what is wrong."""
    import onnx  # deferred: only ONNX models pay for importing it

    if manifest.format != "onnx" or manifest.path is None:
        raise ModelError(f"{manifest.where()}: format: check_onnx needs format 'onnx', "
                         f"got {manifest.format!r}", field="format")
    path = manifest.path
    where = f"{manifest.where()}: model {path}"
    if not path.is_file():
        raise ModelError(f"{where}: file does not exist", field="path")
    if path.stat().st_size == 0:
        raise ModelError(f"{where}: file is empty", field="path")
    try:
        # External weights are not needed to read the graph's interface.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, RuntimeWarning-as-error, ... all mean "corrupt"
        raise ModelError(f"{where}: not a readable ONNX file (truncated or not protobuf): "
                         f"{type(e).__name__}: {e}", field="path") from e
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.node:
        # Protobuf happily parses many byte strings as an empty or partial ModelProto.
        raise ModelError(f"{where}: not a readable ONNX file (no IR version or no graph; "
                         f"truncated or not an ONNX model)", field="path")
    try:
        # By path, so models over 2 GB and external data are checked too.
        onnx.checker.check_model(str(path))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{where}: the ONNX checker rejects the graph: {msg}",
                         field="path") from e

    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = {i.name: i for i in g.input if i.name not in inits}
    outputs = {o.name: o for o in g.output}
    problems: list[str] = []
    S = manifest.crop_size
    batches: dict[str, Dim] = {}
    for key, name, want in (
        ("mel_input", manifest.mel_input,
         [(1, "channels", "the contract"), (MEL_BINS, "mel bins", "the contract"),
          (MEL_FRAMES, "mel frames", "the contract")]),
        ("face_input", manifest.face_input,
         [(FACE_CHANNELS, "channels", "manifest"), (S, "rows", "manifest crop_size"),
          (S, "columns", "manifest crop_size")]),
    ):
        if name not in inputs:
            problems.append(f"input {name!r} ({key}) is not in the graph; graph inputs: "
                            f"{sorted(inputs)}")
        else:
            batches[name] = _check_tensor("input", name, inputs[name], want, problems)
    extra = sorted(set(inputs) - {manifest.mel_input, manifest.face_input})
    if extra:
        problems.append(f"graph has inputs the manifest does not feed: {extra}")
    if manifest.output not in outputs:
        problems.append(f"output {manifest.output!r} is not in the graph; graph outputs: "
                        f"{sorted(outputs)}")
    else:
        batches[manifest.output] = _check_tensor(
            "output", manifest.output, outputs[manifest.output],
            [(OUT_CHANNELS, "channels", "the contract"), (S, "rows", "manifest crop_size"),
             (S, "columns", "manifest crop_size")], problems)

    static = {n: b for n, b in batches.items() if isinstance(b, int)}
    if len(set(static.values())) > 1:
        problems.append(f"fixed batch sizes disagree between tensors: {static}")
    elif static:
        fixed = next(iter(static.values()))
        if manifest.batch_sizes != (fixed,):
            problems.append(f"the graph has a fixed batch of {fixed} (tensors {sorted(static)})"
                            f" but manifest batch_sizes is {list(manifest.batch_sizes)}; "
                            f"re-export with a dynamic batch axis or set batch_sizes to "
                            f"[{fixed}]")
    if problems:
        raise ModelError(f"{where}: does not match the manifest: " + "; ".join(problems),
                         field="path")


def manifest_dict(manifest: ModelManifest) -> Mapping[str, Any]:
    """A JSON-friendly view (absolute paths) for /ready and logs."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(manifest):
        v = getattr(manifest, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out
