"""Bring your own avatar: an image or a short video becomes a looping idle clip.

``python -m rapido avatar import photo.png --face-box x,y,w,h --name tutor`` scales the
picture to cover the stream's frame size (centre crop, aspect kept), maps the face box
along, and saves ``avatars/tutor.npz``; sessions then ask for ``"avatar": "tutor"``. A
video loops forwards and backwards so the seam never jumps.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import av
import numpy as np

from rapido.pipeline.avatar import Avatar, save_avatar
from rapido.pipeline.media import rgb_to_i420

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_SECONDS = 5.0


class AvatarImportError(ValueError):
    """The file or the face box cannot make an avatar; the message says why."""


def parse_box(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        x, y, w, h = (int(p.strip()) for p in parts)
    except ValueError:
        raise AvatarImportError(
            f"face box must be four integers x,y,w,h (pixels of the source), got {text!r}"
        ) from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise AvatarImportError(f"face box {text!r} needs x, y >= 0 and w, h > 0")
    return x, y, w, h


def _decode(path: Path, fps: int, max_seconds: float) -> list[np.ndarray]:
    """RGB frames at ``fps`` (an image gives one frame)."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise AvatarImportError(f"{path}: not a readable image or video ({exc})") from None
    frames: list[np.ndarray] = []
    with container:
        if not container.streams.video:
            raise AvatarImportError(f"{path}: holds no picture")
        stream = container.streams.video[0]
        next_t = 0.0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else next_t
                if t + 1e-6 < next_t:
                    continue  # resample to the stream's rate by dropping surplus frames
                frames.append(frame.to_ndarray(format="rgb24"))
                next_t += 1.0 / fps
                if next_t >= max_seconds:
                    break
        except av.error.FFmpegError as exc:
            if not frames:
                raise AvatarImportError(f"{path}: cannot decode: {exc}") from None
    if not frames:
        raise AvatarImportError(f"{path}: no frame could be decoded")
    return frames


def import_avatar(source: str | Path, face_box: tuple[int, int, int, int], name: str, *,
                  width: int = 854, height: int = 480, fps: int = 25,
                  max_seconds: float = MAX_SECONDS) -> Avatar:
    if not NAME.fullmatch(name):
        raise AvatarImportError("name must be 1-64 characters of A-Z a-z 0-9 _ . -")
    if name == "default":
        raise AvatarImportError("'default' is the built-in avatar; choose another name")
    path = Path(source)
    if not path.is_file():
        raise AvatarImportError(f"{path}: no such file")
    frames = _decode(path, fps, max_seconds)
    sh, sw = frames[0].shape[:2]
    x, y, w, h = face_box
    if x + w > sw or y + h > sh:
        raise AvatarImportError(
            f"face box {x},{y},{w},{h} lies outside the {sw}x{sh} picture")
    # Cover the target frame, keeping the aspect; centre crop what sticks out.
    scale = max(width / sw, height / sh)
    cw, ch = math.ceil(sw * scale), math.ceil(sh * scale)
    ox, oy = (cw - width) // 2, (ch - height) // 2
    bx, by = round(x * scale) - ox, round(y * scale) - oy
    bw, bh = max(2, round(w * scale)) // 2 * 2, max(2, round(h * scale)) // 2 * 2
    if bx < 0 or by < 0 or bx + bw > width or by + bh > height:
        raise AvatarImportError(
            f"the face box falls outside the {width}x{height} frame after scaling and "
            "centre-cropping the picture; choose a picture where the face is nearer the "
            "middle")
    if bw < 32 or bh < 32:
        raise AvatarImportError(f"the face is only {bw}x{bh} pixels at {width}x{height}; "
                                "it needs at least 32x32")
    out = []
    for rgb in frames:
        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        big = f.reformat(width=cw, height=ch, format="rgb24").to_ndarray()
        out.append(rgb_to_i420(np.ascontiguousarray(big[oy : oy + height, ox : ox + width])))
    if len(out) > 2:
        out = out + out[-2:0:-1]  # forwards, then backwards: no jump at the loop seam
    n = len(out)
    face = np.tile(np.array([bx, by, bw, bh], dtype=np.int32), (n, 1))
    # Where the mouth usually sits in a face box: the lower middle.
    mouth = np.tile(np.array([bx + bw // 4, by + bh * 5 // 8, bw // 2, bh // 4],
                             dtype=np.int32), (n, 1))
    return Avatar(name=name, width=width, height=height, fps=fps,
                  frames_i420=np.stack(out), face_boxes=face, mouth_boxes=mouth)


def import_to_dir(source: str | Path, face_box: tuple[int, int, int, int], name: str,
                  avatars_dir: str | Path, *, width: int = 854, height: int = 480,
                  fps: int = 25) -> Path:
    avatar = import_avatar(source, face_box, name, width=width, height=height, fps=fps)
    return save_avatar(avatar, Path(avatars_dir) / f"{name}.npz")
