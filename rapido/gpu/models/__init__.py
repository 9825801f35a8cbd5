"""Torch lip-sync models and the helpers every contract model shares.

A contract model is an ``nn.Module`` with ``forward(mel, face) -> out``: ``mel``
``[B, 1, 80, 16]``, ``face`` ``[B, 6, S, S]`` (masked crop, then reference crop, RGB,
0..1), ``out`` ``[B, 3, S, S]`` in 0..1 (see :mod:`rapido.gpu.manifest`). The helpers
here work for any of them: :func:`export_onnx` (what the ONNX backend serves) and
:func:`load_checkpoint` (state dicts as training code saves them).

Submodules import torch; this package imports it only when a helper is called, so code
that only reads manifests stays light.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from rapido.gpu.manifest import MEL_BINS, MEL_FRAMES, ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["export_onnx", "load_checkpoint", "state_dict_from"]

log = logging.getLogger(__name__)

_SHOWN = 8  # how many key names a checkpoint error lists before "and N more"


def _some(keys: list[str]) -> str:
    head = ", ".join(keys[:_SHOWN])
    return head + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def state_dict_from(obj: object, *, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside what ``torch.load`` returned: either a state dict or a dict
    holding one under ``"state_dict"`` (Wav2Lip's training loop saves
    ``{"state_dict", "optimizer", "global_step", ...}``), with a DataParallel
    ``"module."`` prefix stripped from every key that has it."""
    import torch

    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{where}: holds no state dict (expected a dict of tensors or "
                         f"{{'state_dict': ...}}, got {type(obj).__name__})",
                         field="checkpoint")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ModelError(f"{where}: entry {k!r} is {type(v).__name__}, not a tensor",
                             field="checkpoint")
        out[k.removeprefix("module.")] = v
    return out


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a checkpoint file into ``model`` strictly, explaining any mismatch.

    The file is read with ``weights_only=True``: a checkpoint is data, and unpickling
    arbitrary objects from a user-supplied file would run arbitrary code. Missing
    ``num_batches_tracked`` buffers are tolerated (old checkpoints lack them and eval
    mode never reads them); any other missing, unexpected or mis-shaped key is a
    :class:`ModelError` listing them."""
    import torch

    p = Path(path)
    where = f"checkpoint {p}"
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ModelError(f"{where}: file does not exist", field="checkpoint") from e
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"{where}: cannot be read as a torch checkpoint of plain tensors: "
                         f"{type(e).__name__}: {first}", field="checkpoint") from e
    sd = state_dict_from(obj, where=where)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_some(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_some(shapes)}")
    if problems:
        raise ModelError(f"{where}: does not fit {type(model).__name__}: "
                         + "; ".join(problems), field="checkpoint")
    model.load_state_dict(sd, strict=False)  # strictness was checked above, with reasons
    log.info("loaded %s (%d tensors) into %s", p, len(sd), type(model).__name__)


def export_onnx(model: torch.nn.Module, path: str | os.PathLike[str], *, crop_size: int,
                opset: int = 17, mel_input: str = "mel", face_input: str = "face",
                output: str = "out") -> Path:
    """Export a contract model to ONNX with a dynamic batch axis; returns the path.

    Uses the TorchScript exporter (``dynamo=False``): it needs no onnxscript, folds
    BatchNorm into the convolutions in eval mode, and writes the same bytes for the same
    weights, so an export is reproducible. The example input is fixed (zeros) for the
    same reason. The model is exported in eval mode on CPU in float32."""
    import torch

    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    params = list(model.parameters())
    if params and (params[0].device.type != "cpu" or params[0].dtype != torch.float32):
        raise ValueError("export_onnx wants the model on CPU in float32; "
                         "call model.float().cpu() first")
    mel = torch.zeros(2, 1, MEL_BINS, MEL_FRAMES)
    face = torch.zeros(2, 6, crop_size, crop_size)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream; we choose it knowingly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                model, (mel, face), str(dst), dynamo=False, opset_version=opset,
                input_names=[mel_input, face_input], output_names=[output],
                dynamic_axes={mel_input: {0: "batch"}, face_input: {0: "batch"},
                              output: {0: "batch"}},
                do_constant_folding=True, export_params=True,
            )
    return dst
