"""Wav2Lip at 96x96: the reference architecture of the lip-sync contract.

Written from Prajwal et al., "A Lip Sync Expert Is All You Need for Speech to Lip
Generation In the Wild" (ACM MM 2020) and the structure of the public repository's
``models/wav2lip.py``: a face encoder (Conv2d+BatchNorm+ReLU blocks with residual
blocks, 96 -> 48 -> 24 -> 12 -> 6 -> 3 -> 1), an audio encoder taking the
``[B, 1, 80, 16]`` mel window down to ``[B, 512, 1, 1]``, and a decoder of transposed
convolutions that upsamples back to 96, concatenating the face encoder's features at
every scale (U-Net skips), then a 3x3 conv, a 1x1 conv to RGB and a sigmoid.

Size: 36,298,035 parameters; 7.93 GFLOPs per 96x96 frame, counting a multiply-add as 2
FLOPs (3.97 G multiply-adds), as ``torch.utils.flop_counter.FlopCounterMode`` counts.

Compatibility with the released checkpoints (``wav2lip.pth``, ``wav2lip_gan.pth``):

* module and attribute names follow the original, so state-dict keys match
  (``face_encoder_blocks.0.0.conv_block.0.weight``, ``audio_encoder.3.conv_block.1.
  running_mean``, ``face_decoder_blocks.6.2.conv_block.0.bias``,
  ``output_block.1.weight``, ...); :func:`load_checkpoint` strips DataParallel's
  ``module.`` prefix and unwraps ``{"state_dict": ...}``;
* the original was trained on OpenCV images, i.e. **BGR**. Our contract is RGB, so with
  ``bgr=True`` (the default) ``forward`` reorders the face channels on the way in and
  the output channels on the way out: a gather of 6 and 3 planes, nothing next to the
  convolutions, and it keeps the module's weights byte-identical to the checkpoint;
* ``forward(mel, face)`` takes one window per frame (4-D); the original also accepted
  5-D ``[B, T, ...]`` sequences for training, which serving never needs.

``python -m rapido.gpu.models.wav2lip --checkpoint wav2lip.pth --out models/wav2lip``
exports ``wav2lip.onnx`` and writes ``wav2lip.json`` next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rapido.gpu import models as _models
from rapido.gpu.manifest import ModelManifest, write_manifest

__all__ = [
    "CROP_SIZE",
    "FACTORY",
    "Wav2Lip96",
    "build",
    "count_flops",
    "count_parameters",
    "export_onnx",
    "load_checkpoint",
    "main",
    "write_wav2lip_manifest",
]

CROP_SIZE = 96
#: What a manifest's ``torch_factory`` names to build this model.
FACTORY = "rapido.gpu.models.wav2lip:build"


class Conv2d(nn.Module):
    """Conv + BatchNorm (+ identity) + ReLU. The class name and ``conv_block``/``act``
    attribute names are the original's, which is what makes checkpoint keys line up."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int | tuple[int, int],
                 padding: int, residual: bool = False) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x  # not in place: the original's `+=` breaks tracing/inference mode
        return self.act(out)


class Conv2dTranspose(nn.Module):
    """Transposed conv + BatchNorm + ReLU, the decoder's upsampling step."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int,
                 output_padding: int = 0) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _res(c: int) -> Conv2d:
    return Conv2d(c, c, 3, 1, 1, residual=True)


class Wav2Lip96(nn.Module):
    """Wav2Lip generator: ``forward(mel [B,1,80,16], face [B,6,96,96]) -> [B,3,96,96]``.

    ``face`` is the RGB contract layout; ``bgr=True`` converts to and from the BGR order
    the released checkpoints were trained on (see the module docstring)."""

    crop_size = CROP_SIZE
    _face_order: torch.Tensor
    _out_order: torch.Tensor

    def __init__(self, *, bgr: bool = True) -> None:
        super().__init__()
        self.bgr = bgr
        self.face_encoder_blocks = nn.ModuleList([
            nn.Sequential(Conv2d(6, 16, 7, 1, 3)),  # 96
            nn.Sequential(Conv2d(16, 32, 3, 2, 1), _res(32), _res(32)),  # 48
            nn.Sequential(Conv2d(32, 64, 3, 2, 1), _res(64), _res(64), _res(64)),  # 24
            nn.Sequential(Conv2d(64, 128, 3, 2, 1), _res(128), _res(128)),  # 12
            nn.Sequential(Conv2d(128, 256, 3, 2, 1), _res(256), _res(256)),  # 6
            nn.Sequential(Conv2d(256, 512, 3, 2, 1), _res(512)),  # 3
            nn.Sequential(Conv2d(512, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0)),  # 1
        ])
        # 80x16 mel window -> 27x16 -> 9x6 -> 3x3 -> 1x1
        self.audio_encoder = nn.Sequential(
            Conv2d(1, 32, 3, 1, 1), _res(32), _res(32),
            Conv2d(32, 64, 3, (3, 1), 1), _res(64), _res(64),
            Conv2d(64, 128, 3, 3, 1), _res(128), _res(128),
            Conv2d(128, 256, 3, (3, 2), 1), _res(256),
            Conv2d(256, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0),
        )
        # Input channels = previous output + the encoder feature concatenated at that scale.
        self.face_decoder_blocks = nn.ModuleList([
            nn.Sequential(Conv2d(512, 512, 1, 1, 0)),  # 1
            nn.Sequential(Conv2dTranspose(1024, 512, 3, 1, 0), _res(512)),  # 3
            nn.Sequential(Conv2dTranspose(1024, 512, 3, 2, 1, 1), _res(512), _res(512)),  # 6
            nn.Sequential(Conv2dTranspose(768, 384, 3, 2, 1, 1), _res(384), _res(384)),  # 12
            nn.Sequential(Conv2dTranspose(512, 256, 3, 2, 1, 1), _res(256), _res(256)),  # 24
            nn.Sequential(Conv2dTranspose(320, 128, 3, 2, 1, 1), _res(128), _res(128)),  # 48
            nn.Sequential(Conv2dTranspose(160, 64, 3, 2, 1, 1), _res(64), _res(64)),  # 96
        ])
        self.output_block = nn.Sequential(
            Conv2d(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())
        # Channel reorders as buffers so they follow .to(device); not persistent, so the
        # state dict keeps exactly the original checkpoint's keys.
        self.register_buffer("_face_order", torch.tensor([2, 1, 0, 5, 4, 3]),
                             persistent=False)
        self.register_buffer("_out_order", torch.tensor([2, 1, 0]), persistent=False)

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            face = face.index_select(1, self._face_order)
        audio = self.audio_encoder(mel)  # [B, 512, 1, 1]
        feats = []
        x = face
        for block in self.face_encoder_blocks:
            x = block(x)
            feats.append(x)
        x = audio
        for block in self.face_decoder_blocks:
            x = torch.cat((block(x), feats.pop()), dim=1)
        out: torch.Tensor = self.output_block(x)
        if self.bgr:
            out = out.index_select(1, self._out_order)
        return out


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a Wav2Lip checkpoint (``{"state_dict": ...}``, keys maybe ``module.``-
    prefixed); a :class:`~rapido.gpu.manifest.ModelError` lists missing/unexpected keys."""
    _models.load_checkpoint(model, path)


def _calibrate(model: Wav2Lip96, generator: torch.Generator, batch: int = 8) -> None:
    """Set every BatchNorm's running statistics from one seeded synthetic batch.

    With PyTorch's default init and BatchNorm's identity statistics the activations
    shrink layer by layer until the output is ~0.49 everywhere and the mel input changes
    it by ~1e-8: useless as a stand-in. Normalising each layer on a contract-shaped
    batch (mel uniform in Wav2Lip's [-4, 4], face uniform 0..1 with the lower half of
    the masked crop zeroed) gives unit-scale activations, outputs spread over 0..1 and a
    real dependence on both inputs, which benchmarks and backend-agreement tests need."""
    s = CROP_SIZE
    mel = torch.rand(batch, 1, 80, 16, generator=generator) * 8 - 4
    face = torch.rand(batch, 6, s, s, generator=generator)
    face[:, :3, s // 2:] = 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    with torch.no_grad():
        model(mel, face)
    for bn in bns:
        bn.momentum = 0.1  # PyTorch's default, as a fresh module would have
    model.eval()


def build(seed: int = 0, checkpoint: str | os.PathLike[str] | None = None, *,
          bgr: bool = True) -> Wav2Lip96:
    """A :class:`Wav2Lip96` in eval mode, gradients off.

    With ``checkpoint``, its weights. Without, a seeded random init whose BatchNorm
    statistics are calibrated on a seeded synthetic batch (see :func:`_calibrate`): the
    same seed gives the same weights on the same machine (across CPUs the calibrated
    statistics may differ by float rounding). The global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Lip96(bgr=bgr)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    else:
        _calibrate(model, torch.Generator().manual_seed(seed + 1))
    return model.eval().requires_grad_(False)


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, opset: int = 17) -> Path:
    """Export to ONNX: inputs ``mel``/``face``, output ``out``, dynamic batch axis.
    Deterministic: the same weights give the same bytes."""
    return _models.export_onnx(model, path, crop_size=CROP_SIZE, opset=opset)


def write_wav2lip_manifest(manifest_path: str | os.PathLike[str], *,
                           onnx_path: str | os.PathLike[str] | None = None,
                           checkpoint: str | os.PathLike[str] | None = None,
                           name: str = "wav2lip",
                           batch_sizes: tuple[int, ...] = (1, 2, 4, 8)) -> ModelManifest:
    """Write a manifest for Wav2Lip and return it. With ``onnx_path`` the manifest is
    format "onnx" (the torch factory and checkpoint are kept, so ``kind="torch"`` can
    serve the same model); without it, format "torch" built by :func:`build`."""
    m = ModelManifest(
        name=name,
        format="onnx" if onnx_path is not None else "torch",
        crop_size=CROP_SIZE,
        path=Path(onnx_path).resolve() if onnx_path is not None else None,
        torch_factory=FACTORY,
        checkpoint=Path(checkpoint).resolve() if checkpoint is not None else None,
        batch_sizes=batch_sizes,
        description="Wav2Lip generator (Prajwal et al. 2020), 96x96 crops"
                    + ("" if checkpoint is not None else ", random weights"),
    )
    dst = write_manifest(m, manifest_path)
    return dataclasses.replace(m, source=dst)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, batch: int = 1, crop_size: int = CROP_SIZE) -> int:
    """FLOPs of one forward pass (a multiply-add counts 2) by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    mel = torch.zeros(batch, 1, 80, 16)
    face = torch.zeros(batch, 6, crop_size, crop_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(mel, face)
    return int(counter.get_total_flops())


def main(argv: Sequence[str] | None = None) -> int:
    """Export a Wav2Lip checkpoint (or seeded random weights) to ONNX plus a manifest."""
    ap = argparse.ArgumentParser(prog="python -m rapido.gpu.models.wav2lip",
                                 description=main.__doc__)
    ap.add_argument("--checkpoint", help="wav2lip.pth / wav2lip_gan.pth (omit: random)")
    ap.add_argument("--seed", type=int, default=0, help="init seed without a checkpoint")
    ap.add_argument("--out", required=True, help="folder for wav2lip.onnx + wav2lip.json")
    ap.add_argument("--name", default="wav2lip")
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args(argv)
    out = Path(args.out)
    model = build(args.seed, args.checkpoint)
    onnx_path = export_onnx(model, out / f"{args.name}.onnx", opset=args.opset)
    m = write_wav2lip_manifest(out / f"{args.name}.json", onnx_path=onnx_path,
                               checkpoint=args.checkpoint, name=args.name)
    print(f"wrote {onnx_path} and {m.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
