"""``rapido-lite``: the built-in lip-sync "model", a parametric mouth renderer in torch.

This is **not a trained network** and has no weights to download. It reads loudness and
spectral shape from the Wav2Lip mel window, turns them into three mouth parameters
(opening, width, rounding) and draws a cartoon mouth for the default avatar with
anti-aliased signed-distance shapes over the reference crop. It follows the same
contract as a learned lip-sync model, so the serving path (batching, ONNX Runtime,
compositing) is exercised end to end on any machine, and it is cheap enough for 100+
speaking streams on two CPU cores.

Contract (shared with learned models)::

    mel   float32 [B, 1, 80, 16]  Wav2Lip mel in [-4, 4] (-4 is silence); 16 frames at
                                  80 frames/s starting one video frame before the
                                  frame (MEL_OFFSET_FRAMES, Wav2Lip's training window)
    face  float32 [B, 6, S, S]    0-2: face crop with the lower half zeroed (unused here:
                                  the renderer needs no masked input); 3-5: reference crop
    out   float32 [B, 3, S, S]    the reference crop with the mouth drawn, 0..1

Everything in ``forward`` is elementwise arithmetic, sigmoid, clamp, pow/sqrt, where,
one small matmul and static slices and concats: no data-dependent control flow, so the
ONNX graph is the same for every input and exports with a dynamic batch axis. Only a
small window around the mouth is computed; the rest of the output is the reference.

One module, a little over 500 lines, on purpose: the audio features, the mouth drawing
and the ONNX export are one model whose parts are tuned against each other (the tests
check them together).
"""

from __future__ import annotations

import functools
import itertools
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rapido.gpu.portrait import default_avatar
from rapido.pipeline.avatar import Avatar

__all__ = [
    "MEL_OFFSET_FRAMES",
    "MODEL_NAME",
    "LiteMouthModel",
    "build_lite",
    "export_onnx",
    "mel_bin_centres",
    "mouth_params",
]

MODEL_NAME = "rapido-lite"
#: Where frame n's window starts, in video frames from n (its manifest's
#: ``mel_offset_frames``): -1, the window Wav2Lip's weights were trained on, so this model
#: takes the same serving path as a trained one and waits for 40 ms less audio than with
#: the inference script's window (0). The kernel below is placed to match.
MEL_OFFSET_FRAMES = -1

# --------------------------------------------------------------------------- audio

_MEL_BINS = 80
_MEL_FRAMES = 16
_FMIN, _FMAX = 55.0, 7600.0  # Wav2Lip's mel range

# Temporal kernel over the 16 mel frames (12.5 ms each, centred on their hop). Window
# frame k is centred 12.5 k ms after the window's start, which is MEL_OFFSET_FRAMES video
# frames (3.2 mel frames each) before the frame's own start, give or take the 0-10 ms
# that Wav2Lip's integer window index rounds away (5 ms on average). The Gaussian sits
# 2.0 mel frames (25 ms) after the frame's nominal start: with that rounding, the middle
# of the 40 ms of sound played with the frame, so the mouth shows what is heard with it
# (measured: rapido.pipeline.lipsync_lag, within a few ms). Sigma 2 frames covers ~0-80
# ms; consecutive video frames shift the window by 4 mel frames = 2 sigma, so
# neighbouring kernels overlap and the mouth moves smoothly instead of snapping to each
# 40 ms slice. The kernel reads window frames ~0-11 only, the frames that at offset -1
# have arrived 40 ms earlier than at 0.
_KERNEL_CENTRE = 2.0 - MEL_OFFSET_FRAMES * 80.0 / 25.0
_KERNEL_SIGMA = 2.0

# Loudness is the mean of (mel + 4) / 8 over bins. Digital silence is 0; speech at
# -20 dBFS reads about 0.16 ("oo") to 0.26 ("eh"), at -10 dBFS 0.22-0.34 (Wav2Lip's
# normalisation maps 100 dB to 0..1). A -60 dBFS hiss reads about 0.13, so the knee
# sits there and the mouth stays shut on a quiet line. A smoothstep between knee and
# full eases the mouth open and shut instead of switching it.
_LOUD_KNEE = 0.13
_LOUD_FULL = 0.34
# Shape cues only count once there is something to hear, so silence is a neutral mouth.
_AUDIBLE = (0.02, 0.18)

# Four bands (Hz). "oo"/"o" keep F1 and F2 below 1 kHz; "aa" has F2 near 1.1 kHz in the
# second band; "ee" has F2/F3 at 2.3-3 kHz in the third; fricatives ("s", "sh", "f")
# fill the fourth. Band levels are means of (mel + 4) / 8 over the band's bins.
_BAND_EDGES = (0.0, 1000.0, 1900.0, 3500.0, 8000.0)

# Cue = band level difference -> 0..1 through a smoothstep between these points,
# calibrated on formant-synthesised vowels and noise fricatives through the Wav2Lip mel
# at -10, -20 and -30 dBFS (see tests/test_lite.py):
#   hiss:  top - lowest band: vowels -0.5..-0.2, "s"/"sh" +0.45..+0.6
#   front: third - second band: "aa" -0.23, "eh" -0.1, "ee" +0.06
#   round: lowest band over the larger of the next two: "oo"/"oh" 0.22-0.24, others < 0.08
_HISS = (-0.10, 0.30)
_FRONT = (-0.12, 0.04)
_ROUND = (0.09, 0.21)

# Natural ranges: "oo" purses to ~0.6 of the idle width, a broad "ee" grin reaches 1.22.
_WIDTH_MIN, _WIDTH_MAX = 0.6, 1.22


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's mel scale (librosa's default, which Wav2Lip uses): linear below 1 kHz.
    lin = 3.0 * f / 200.0
    log = 15.0 + 27.0 * np.log(np.maximum(f, 1e-9) / 1000.0) / math.log(6.4)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    lin = 200.0 * m / 3.0
    log = 1000.0 * np.exp(math.log(6.4) * (m - 15.0) / 27.0)
    return np.where(m >= 15.0, log, lin)


def mel_bin_centres() -> np.ndarray:
    """Centre frequency (Hz) of each of Wav2Lip's 80 mel bins."""
    edges = np.linspace(_hz_to_mel(np.array(_FMIN)), _hz_to_mel(np.array(_FMAX)), _MEL_BINS + 2)
    return np.asarray(_mel_to_hz(edges[1:-1]), dtype=np.float64)


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    t = torch.clamp(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ramp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """0 below ``lo``, 1 above ``hi``, a smoothstep between: a soft knee and a soft top."""
    return _smoothstep((x - lo) * (1.0 / (hi - lo)))


def _audio_weights() -> np.ndarray:
    """[80 * 16, 5] weights: the flattened level window times this gives the loudness and
    the four band levels, each already averaged over the temporal kernel."""
    t = np.arange(_MEL_FRAMES, dtype=np.float64)
    kernel = np.exp(-0.5 * ((t - _KERNEL_CENTRE) / _KERNEL_SIGMA) ** 2)
    kernel /= kernel.sum()
    centres = mel_bin_centres()
    cols = [np.full(_MEL_BINS, 1.0 / _MEL_BINS)]
    for lo, hi in itertools.pairwise(_BAND_EDGES):
        sel = ((centres >= lo) & (centres < hi)).astype(np.float64)
        cols.append(sel / sel.sum())
    per_bin = np.stack(cols, 1)  # [80, 5]
    # Everything is linear in the level, so kernel and band means fold into one matmul.
    return (per_bin[:, None, :] * kernel[None, :, None]).reshape(_MEL_BINS * _MEL_FRAMES, 5)


class _MouthFromAudio(nn.Module):
    """Mel window -> per-item mouth parameters, each [B] in a natural range."""

    weights: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(_audio_weights(), dtype=torch.float32))

    def forward(self, mel: torch.Tensor) -> dict[str, torch.Tensor]:
        level = torch.clamp(mel.reshape(-1, _MEL_BINS * _MEL_FRAMES) * 0.125 + 0.5, 0.0, 1.0)
        loud, b0, b1, b2, b3 = torch.matmul(level, self.weights).unbind(dim=1)
        audible = _ramp(loud, *_AUDIBLE)
        hiss = _ramp(b3 - b0, *_HISS) * audible
        rounding = _ramp(torch.minimum(b0 - b1, b0 - b2), *_ROUND) * audible * (1.0 - hiss)
        front = _ramp(b2 - b1, *_FRONT) * audible * (1.0 - rounding)
        # Fricatives are made with the teeth nearly together: they spread the lips but
        # barely drop the jaw, however loud the hiss.
        opening = _ramp(loud, _LOUD_KNEE, _LOUD_FULL) * (1.0 - 0.65 * hiss)
        # Bright spectra stretch the lips wide and flat; rounding purses them.
        wide = torch.maximum(front, hiss)
        width = torch.clamp(1.0 + 0.22 * wide - 0.4 * rounding, _WIDTH_MIN, _WIDTH_MAX)
        return {"loudness": loud, "opening": opening, "width": width, "rounding": rounding}


@functools.lru_cache(maxsize=1)
def _audio_module() -> _MouthFromAudio:
    return _MouthFromAudio().eval()


def mouth_params(mel: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mouth parameters ``rapido-lite`` draws for each mel window ``[B, 1, 80, 16]``.

    ``opening`` 0 (closed: the idle mouth) .. 1 (jaw fully dropped), from loudness with a
    soft knee, held low for hiss; ``width`` ~0.6 (pursed "oo") .. 1.22 (broad "ee"/"s")
    times the idle mouth's width, from brightness and rounding; ``rounding`` 0..1, from
    low-band dominance ("oo", "oh"). ``loudness`` is the kernel-weighted mean level in
    0..1 that drives the opening. Each is a float32 tensor [B]."""
    with torch.no_grad():
        return _audio_module()(mel.to(torch.float32))


# --------------------------------------------------------------------------- drawing

# The default avatar is laid out in design units; its mouth box is 64 x 38 units, so
# crop pixels per design unit = mouth box size in the crop / (64, 38). Shapes below are
# in design units relative to the idle smile line's centre, which sits 1 unit below the
# mouth box centre (avatar: smile at _MOUTH_Y + 2, box centred on _MOUTH_Y + 1).
_MOUTH_BOX_UNITS = (64.0, 38.0)
_LINE_BELOW_BOX_CENTRE = 1.0

# The idle mouth: a smile line 19 units either side, 3.2 thick, corners 5 units up.
_IDLE_HALF = 19.0
_IDLE_THICK = 3.2
_IDLE_SMILE = 5.0

# Region the renderer touches (u left, right, v top, bottom) in design units around the
# line: the widest, most open mouth and the erase patch with their soft edges fit inside.
# Outside it the output is the reference crop, bit for bit.
_WINDOW = (-32.0, 32.0, -16.0, 30.0)

# Patch hiding the idle mouth once the mouth opens: a rounded rectangle (superellipse)
# over the idle line and lower-lip hint with a margin for the head's sway.
_ERASE = (27.0, 13.0, 3.0)  # half width, half height, centre v
_ERASE_FEATHER_PX = 2.0

# Skin for that patch is sampled from the reference at plain-skin points beside and
# below the mouth (clear of the blush, nose shadow and chin line).
_SKIN_POINTS = ((-33.0, 9.0), (33.0, 9.0), (0.0, 27.0))

# Palette (RGB 0..255): the avatar's lip colour, a lower lip between its lip and
# lower-lip-hint colours, and a cartoon mouth interior.
_LIP_UPPER = (168.0, 84.0, 80.0)
_LIP_LOWER = (196.0, 106.0, 100.0)
_INTERIOR = (84.0, 30.0, 36.0)
_TEETH = (250.0, 248.0, 242.0)
_TONGUE = (206.0, 98.0, 104.0)

_EDGE_PX = 0.32  # anti-aliasing softness in crop pixels (sigmoid scale)


def _colour(rgb: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).reshape(1, 3, 1, 1) / 255.0


def _lens_sdf(
    u: torch.Tensor,
    yy: torch.Tensor,
    slope: torch.Tensor,
    a: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    n: torch.Tensor,
) -> torch.Tensor:
    """Approximate signed distance (design units, negative inside) to a mouth-like lens:
    half-width ``a``, reaching ``up`` above and ``down`` below a centre curve with slope
    ``slope``; ``yy`` is the vertical offset from that curve, ``n`` >= 2 squares the
    corners off. Shapes: ``u``/``slope`` [*, 1, 1, W], ``yy`` [*, 1, H, W], rest [B, 1, 1, 1].

    k = (|u/a|^n + (yy/b)^2)^0.5 is 1 on the outline; (k - 1) / |grad k| is the distance
    to first order, exact enough within the pixel or two that anti-aliasing looks at.
    Terms that depend on u alone stay one row wide, which keeps the per-pixel work small."""
    au = torch.abs(u) / a
    p = torch.pow(au, n)
    gu0 = 0.5 * n * torch.pow(au, n - 1.0) * torch.sign(u) / a
    inv_b = torch.where(yy < 0, 1.0 / up, 1.0 / down)
    q = yy * inv_b
    k = torch.sqrt(p + q * q)
    # k * grad k, with the chain rule through the centre curve (yy depends on u).
    gu = gu0 - q * inv_b * slope
    gv = q * inv_b
    g = torch.sqrt(gu * gu + gv * gv)
    d = k * (k - 1.0) / torch.clamp(g, min=1e-6)
    # Near the centre the estimate degenerates (0/0) but only has to stay clearly
    # negative; far out a thin lens' estimate collapses, and the distance to the
    # bounding box is a lower bound.
    d = torch.where(k < 0.5, (k - 1.0) * torch.minimum(a, torch.minimum(up, down)), d)
    box = torch.maximum(torch.abs(u) - a, torch.maximum(-yy - up, yy - down))
    return torch.maximum(d, box)


class LiteMouthModel(nn.Module):
    """``rapido-lite``: mel + face crops -> face crops with a drawn mouth (see module doc).

    The mouth's place in the crop is baked in by :func:`build_lite`: buffers hold the
    design-unit coordinates of the small window around the mouth that is redrawn."""

    u: torch.Tensor
    v: torch.Tensor
    erase: torch.Tensor
    lip_upper: torch.Tensor
    lip_lower: torch.Tensor
    interior: torch.Tensor
    teeth: torch.Tensor
    tongue: torch.Tensor

    def __init__(
        self,
        crop_size: int,
        window: tuple[int, int, int, int],
        u: np.ndarray,
        v: np.ndarray,
        px_per_unit: float,
        skin_patches: tuple[tuple[int, int], ...],
    ) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.window = window  # x0, y0, x1, y1 in crop pixels
        self.px_per_unit = px_per_unit
        self.skin_patches = skin_patches  # top-left (x, y) of 2x2 pixel patches
        self.audio = _MouthFromAudio()
        # Pixel centres of the window in design units: u across, v down.
        self.register_buffer("u", torch.tensor(u, dtype=torch.float32).reshape(1, 1, 1, -1))
        self.register_buffer("v", torch.tensor(v, dtype=torch.float32).reshape(1, 1, -1, 1))
        # The erase patch never moves, so its coverage is computed once here.
        hw, hh, cv = _ERASE
        uu, vv = u[None, :], v[:, None]
        ke = (np.abs(uu / hw) ** 4 + np.abs((vv - cv) / hh) ** 4) ** 0.25
        te = np.clip(0.5 - (ke - 1.0) * hh * (px_per_unit / _ERASE_FEATHER_PX), 0.0, 1.0)
        # Smoothstep feather: exactly 1 over the idle mouth, exactly 0 a little outside,
        # so it hides the idle mouth completely yet leaves the reference untouched.
        erase = te * te * (3.0 - 2.0 * te)
        self.register_buffer("erase", torch.tensor(erase, dtype=torch.float32)[None, None])
        for name, rgb in (
            ("lip_upper", _LIP_UPPER),
            ("lip_lower", _LIP_LOWER),
            ("interior", _INTERIOR),
            ("teeth", _TEETH),
            ("tongue", _TONGUE),
        ):
            self.register_buffer(name, _colour(rgb))

    def params(self, mel: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same as :func:`mouth_params`, with this model's buffers (traceable)."""
        out: dict[str, torch.Tensor] = self.audio(mel)
        return out

    def _cov(self, d: torch.Tensor, soft_px: float = _EDGE_PX) -> torch.Tensor:
        """Anti-aliased coverage of a shape from its signed distance in design units."""
        return torch.sigmoid(d * (-self.px_per_unit / soft_px))

    def draw(
        self,
        ref: torch.Tensor,
        opening: torch.Tensor,
        width: torch.Tensor,
        rounding: torch.Tensor,
    ) -> torch.Tensor:
        """Draw a mouth with the given parameters ([B] each) over reference crops
        [B, 3, S, S] in 0..1 and return the full crops; ``opening`` 0 returns ``ref``."""
        return self._render(ref, 0, opening, width, rounding)

    def _render(
        self,
        src: torch.Tensor,
        c0: int,
        opening: torch.Tensor,
        width: torch.Tensor,
        rounding: torch.Tensor,
    ) -> torch.Tensor:
        # ``src`` channels c0..c0+2 are the reference. Reading the pieces straight from
        # the input (not from a sliced copy of the reference) saves a full-crop copy.
        c1 = c0 + 3
        x0, y0, x1, y1 = self.window
        win = src[:, c0:c1, y0:y1, x0:x1]
        o = opening.reshape(-1, 1, 1, 1)
        r = rounding.reshape(-1, 1, 1, 1)
        w = width.reshape(-1, 1, 1, 1)
        wide = torch.clamp((w - 1.0) * (1.0 / (_WIDTH_MAX - 1.0)), 0.0, 1.0)
        u, v = self.u, self.v

        # Geometry in design units. The jaw drops the lower edge far more than the upper
        # lip rises; a wide mouth is flatter; rounding evens top and bottom and pouts the
        # lips; opening pulls the corners in a little and relaxes the smile.
        half = _IDLE_HALF * w * (1.0 - 0.08 * o)
        smile = _IDLE_SMILE * (1.0 - 0.55 * o) * (1.0 - r)
        drop = o * 19.0 * (1.0 - 0.5 * wide)
        rise = o * (3.5 + 3.5 * r)
        lip_top = _IDLE_THICK / 2 + o * (0.9 + 1.4 * r)
        lip_bottom = _IDLE_THICK / 2 + o * (3.2 + 1.2 * r)
        cap = _IDLE_THICK / 2 + o * (0.6 + 1.6 * r)
        # Lens exponents: squarer corners for a closed or wide mouth (the closed lens then
        # matches the idle line's blunt ends), an ellipse for "oo".
        n_mouth = 2.4 - 0.4 * r
        n_lips = 3.0 - 1.0 * r

        # Centre curve: the idle smile parabola, flat past the corners. [B, 1, 1, W]
        t = torch.clamp(u / half, -1.0, 1.0)
        centre = -smile * t * t
        slope = torch.where(torch.abs(u) < half, -2.0 * smile * t / half, torch.zeros_like(t))
        yy = v - centre  # [B, 1, H, W]

        # A closed opening is a hairline, not 0/0; it is invisible then anyway.
        rise_g = torch.clamp(rise, min=0.2)
        drop_g = torch.clamp(drop, min=0.2)
        mouth = _lens_sdf(u, yy, slope, half, rise_g, drop_g, n_mouth)
        lips = _lens_sdf(u, yy, slope, half + cap, rise + lip_top, drop + lip_bottom, n_lips)
        # Upper teeth: a band under the top edge of the opening, following its curve.
        top_edge = -rise * torch.sqrt(torch.clamp(1.0 - torch.pow(torch.abs(t), n_mouth), 0.0))
        teeth_h = torch.clamp(0.4 * (rise + drop), max=5.5)
        teeth = yy - (top_edge + teeth_h)
        # Tongue: a low ellipse resting on the lower edge, clipped by the opening.
        t_rx = 0.62 * half
        t_ry = 0.5 * drop_g
        ty = (yy - drop) / t_ry
        tongue = (torch.sqrt((u / t_rx) ** 2 + ty * ty) - 1.0) * torch.minimum(t_rx, t_ry)

        # Everything fades in over the first few percent of opening, where the lens
        # still looks like the idle line, so a mouth closing to silence never pops.
        in_mouth = self._cov(mouth)
        a_erase = self.erase * _ramp(o, 0.0, 0.25)
        a_lips = self._cov(lips) * _ramp(o, 0.0, 0.05)
        a_mouth = in_mouth * _ramp(o, 0.0, 0.12)
        a_teeth = in_mouth * self._cov(teeth) * (_ramp(o, 0.1, 0.35) * (1.0 - 0.8 * r))
        a_tongue = in_mouth * self._cov(tongue, 0.6) * _ramp(o, 0.25, 0.6)

        # Upper lip in the avatar's lip colour; the lower lip lightens as it fills out.
        lower = self.lip_upper + (self.lip_lower - self.lip_upper) * _ramp(o, 0.0, 0.3)
        lip_colour = torch.where(yy < 0, self.lip_upper, lower)
        skin = torch.cat(
            [src[:, c0:c1, y : y + 2, x : x + 2] for x, y in self.skin_patches], dim=3
        ).mean(dim=(2, 3), keepdim=True)
        out = win
        for alpha, colour in (
            (a_erase, skin),
            (a_lips, lip_colour),
            (a_mouth, self.interior),
            (a_teeth, self.teeth),
            (a_tongue, self.tongue),
        ):
            out = out + alpha * (colour - out)
        return self._paste(src, c0, out)

    def _paste(self, src: torch.Tensor, c0: int, win: torch.Tensor) -> torch.Tensor:
        """The reference (``src`` channels c0..c0+2) with the window replaced, as slices
        and concats: static shapes and no in-place scatter in the graph. Empty border
        strips are left out at trace time."""
        c1 = c0 + 3
        x0, y0, x1, y1 = self.window
        s = self.crop_size
        row = [src[:, c0:c1, y0:y1, :x0]] if x0 > 0 else []
        row += [win] + ([src[:, c0:c1, y0:y1, x1:]] if x1 < s else [])
        band = torch.cat(row, dim=3) if len(row) > 1 else win
        rows = [src[:, c0:c1, :y0]] if y0 > 0 else []
        rows += [band] + ([src[:, c0:c1, y1:]] if y1 < s else [])
        return torch.cat(rows, dim=2) if len(rows) > 1 else band

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        p = self.audio(mel)
        # Channels 0-2 (the masked crop) carry nothing the renderer needs; 3-5 are the
        # reference it draws over.
        return self._render(face, 3, p["opening"], p["width"], p["rounding"])


def build_lite(crop_size: int = 96, avatar: Avatar | None = None) -> LiteMouthModel:
    """Build ``rapido-lite`` for ``crop_size`` x ``crop_size`` crops of ``avatar``'s face
    box (the default avatar when None). The mouth box of idle frame 0, relative to its
    face box, fixes where the mouth is drawn: the head sways a few pixels but both boxes
    move together, so the mouth keeps its place in the crop. Shapes are sized in the
    default avatar's design units (its mouth box is 64 x 38 of them), so another avatar
    gets the default's mouth fitted to its mouth box."""
    if not isinstance(crop_size, int) or isinstance(crop_size, bool) or crop_size < 32:
        raise ValueError(f"crop_size must be an int >= 32, got {crop_size!r}")
    av = avatar if avatar is not None else default_avatar()
    fx, fy, fw, fh = (float(x) for x in av.face_boxes[0])
    mx, my, mw, mh = (float(x) for x in av.mouth_boxes[0])
    sx, sy = crop_size / fw, crop_size / fh
    # Crop pixels per design unit across and down (equal for the default's square box).
    px_u, px_v = mw * sx / _MOUTH_BOX_UNITS[0], mh * sy / _MOUTH_BOX_UNITS[1]
    cx = (mx + mw / 2 - fx) * sx
    cy = (my + mh / 2 - fy) * sy + _LINE_BELOW_BOX_CENTRE * px_v

    def to_px(uu: float, vv: float) -> tuple[float, float]:
        return cx + uu * px_u, cy + vv * px_v

    (wx0, wy0), (wx1, wy1) = to_px(_WINDOW[0], _WINDOW[2]), to_px(_WINDOW[1], _WINDOW[3])
    x0, y0 = max(0, math.floor(wx0)), max(0, math.floor(wy0))
    x1, y1 = min(crop_size, math.ceil(wx1)), min(crop_size, math.ceil(wy1))
    if x1 - x0 < 4 or y1 - y0 < 4:
        raise ValueError(f"the mouth box {av.mouth_boxes[0]} is outside the face box")
    u = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx) / px_u
    v = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy) / px_v
    patches = []
    for pu, pv in _SKIN_POINTS:
        px, py = to_px(pu, pv)
        patches.append(
            (min(max(round(px) - 1, 0), crop_size - 2), min(max(round(py) - 1, 0), crop_size - 2))
        )
    ppu = math.sqrt(px_u * px_v)  # sets the anti-aliasing width
    return LiteMouthModel(crop_size, (x0, y0, x1, y1), u, v, ppu, tuple(patches)).eval()


def export_onnx(model: LiteMouthModel, path: str | Path, opset: int = 17) -> None:
    """Write ``model`` as ONNX: inputs "mel" [B, 1, 80, 16] and "face" [B, 6, S, S],
    output "out" [B, 3, S, S], batch dynamic; legacy TorchScript exporter.

    The bytes are the same for every export of the same model: the traced graph is
    deterministic, and the proto is re-serialised with its producer fields pinned (they
    would otherwise carry the torch version) and deterministic map ordering."""
    import onnx

    model = model.eval()

    s = model.crop_size
    # Batch 2 for tracing, so no size-1 axis can be mistaken for a broadcast.
    mel = torch.full((2, 1, _MEL_BINS, _MEL_FRAMES), -4.0)
    face = torch.zeros(2, 6, s, s)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "lite.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter is chosen on purpose (the dynamo one needs onnxscript and
            # gains nothing on this elementwise graph), so its deprecation notice and its
            # note that it cannot fold sliced constants are expected.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (mel, face),
                raw,
                input_names=["mel", "face"],
                output_names=["out"],
                dynamic_axes={"mel": {0: "batch"}, "face": {0: "batch"}, "out": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(raw)
    proto.producer_name = MODEL_NAME
    proto.producer_version = "1"
    proto.doc_string = f"{MODEL_NAME}: parametric mouth renderer (not a trained network)"
    onnx.checker.check_model(proto)
    Path(path).write_bytes(proto.SerializeToString(deterministic=True))
