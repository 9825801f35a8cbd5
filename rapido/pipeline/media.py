"""The media units every stage agrees on: the audio clock and the video frame.

Audio is the master clock. Inside the pipeline all audio is mono s16 at
``AUDIO_RATE``; video frame ``n`` covers audio ``[n * frame_ms, (n + 1) * frame_ms)``
and carries that timestamp.

Pictures are packed I420; :func:`rgb_to_i420` and :func:`i420_to_rgb` convert to and
from RGB (BT.601 limited range, what ffmpeg assumes for untagged yuv420p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Internal audio rate. 48 kHz is what WebRTC (Opus) and LiveKit publish natively, so
#: output sinks never resample; the model's 16 kHz features are derived from it.
AUDIO_RATE = 48_000

DEFAULT_FPS = 25
DEFAULT_WIDTH = 854
DEFAULT_HEIGHT = 480


def frame_samples(fps: int, rate: int = AUDIO_RATE) -> int:
    """Audio samples covered by one video frame; rejects rates that do not divide evenly."""
    if fps <= 0 or rate % fps:
        raise ValueError(f"fps {fps} does not divide the audio rate {rate}")
    return rate // fps


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One I420 picture. ``data`` is ``(height * 3 // 2, width)`` uint8: the Y plane,
    then U and V (each ``height/2 x width/2``) packed row after row, the layout that
    ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` takes. Idle frames are shared
    between streams, so the array is read-only and sinks must never write into it."""

    data: np.ndarray
    width: int
    height: int

    @property
    def y(self) -> np.ndarray:
        return self.data[: self.height]


@dataclass(frozen=True, slots=True)
class MediaChunk:
    """What a stream hands its sink once per frame: picture and audio share ``index``."""

    index: int  # video frame number since the stream started
    video: VideoFrame
    audio: np.ndarray  # int16, exactly one frame's worth of samples at AUDIO_RATE
    speaking: bool

    def pts_ms(self, fps: int) -> int:
        return self.index * 1000 // fps


# --------------------------------------------------------------------------- colour


def check_even_size(width: int, height: int) -> None:
    """I420 halves both dimensions for chroma: they must be positive and even."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"I420 needs a positive even width and height, got {width}x{height}")


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB to packed I420 ``(h * 3 // 2, w)`` uint8.

    BT.601 limited range, what ffmpeg assumes for untagged yuv420p, so browsers and
    PyAV show the colours we drew. Chroma is the mean of each 2x2 block (the conversion
    is linear, so averaging RGB first equals averaging U and V)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) RGB array, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    check_even_size(w, h)
    f = rgb.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    out = np.empty((h * 3 // 2, w), dtype=np.uint8)
    flat = out.reshape(-1)
    y = 16.5 + 0.256788 * r + 0.504129 * g + 0.097906 * b  # +0.5 rounds on the cast
    flat[: h * w] = np.clip(y, 0, 255).astype(np.uint8).reshape(-1)
    q = f.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    qr, qg, qb = q[..., 0], q[..., 1], q[..., 2]
    u = 128.5 - 0.148223 * qr - 0.290993 * qg + 0.439216 * qb
    v = 128.5 + 0.439216 * qr - 0.367788 * qg - 0.071427 * qb
    c = (h // 2) * (w // 2)
    flat[h * w : h * w + c] = np.clip(u, 0, 255).astype(np.uint8).reshape(-1)
    flat[h * w + c :] = np.clip(v, 0, 255).astype(np.uint8).reshape(-1)
    return out


def i420_planes(i420: np.ndarray, width: int, height: int) -> tuple[np.ndarray, ...]:
    """Views of the Y, U and V planes of a packed I420 picture (no copy)."""
    check_even_size(width, height)
    if i420.shape != (height * 3 // 2, width) or i420.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 I420 of shape {(height * 3 // 2, width)}, "
            f"got {i420.dtype} {i420.shape}"
        )
    flat = i420.reshape(-1)
    n = width * height
    c = n // 4
    return (
        flat[:n].reshape(height, width),
        flat[n : n + c].reshape(height // 2, width // 2),
        flat[n + c :].reshape(height // 2, width // 2),
    )


def i420_to_rgb(i420: np.ndarray, width: int, height: int) -> np.ndarray:
    """Packed I420 to ``(height, width, 3)`` uint8 RGB (BT.601 limited, nearest chroma)."""
    yp, up, vp = i420_planes(i420, width, height)
    y = (yp.astype(np.float32) - 16.0) * 1.164384
    u = np.repeat(np.repeat(up.astype(np.float32) - 128.0, 2, axis=0), 2, axis=1)
    v = np.repeat(np.repeat(vp.astype(np.float32) - 128.0, 2, axis=0), 2, axis=1)
    out = np.empty((height, width, 3), dtype=np.float32)
    out[..., 0] = y + 1.596027 * v
    out[..., 1] = y - 0.391762 * u - 0.812968 * v
    out[..., 2] = y + 2.017232 * u
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)

