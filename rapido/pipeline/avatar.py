"""The avatar as data: a looping idle clip in I420 plus the face and mouth boxes of every
frame, and its file format (one ``.npz``).

Every stage agrees on this type: sessions and renderers read its idle frames, the model
layer crops its face, ``rapido avatar import`` and the drawn default
(:mod:`rapido.gpu.portrait`) make one. The clip is shared read-only by every stream: an
idle stream then costs no drawing or conversion.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rapido.pipeline.media import VideoFrame, check_even_size, i420_to_rgb

log = logging.getLogger(__name__)

__all__ = ["Avatar", "load_avatar", "save_avatar"]


@dataclass(frozen=True, eq=False)
class Avatar:
    """A looping idle clip plus where its face and mouth are in every frame.

    ``frames_i420`` is shared by every stream, so it is read-only; the boxes let a
    lip-sync model crop the face of idle frame ``n`` and paste a new mouth back."""

    name: str
    width: int
    height: int
    fps: int
    # (N, height * 3 // 2, width) uint8, packed I420, read-only
    frames_i420: np.ndarray = field(repr=False)
    face_boxes: np.ndarray = field(repr=False)  # (N, 4) int32 x, y, w, h
    mouth_boxes: np.ndarray = field(repr=False)  # (N, 4) int32 x, y, w, h
    _video_frames: tuple[VideoFrame, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_even_size(self.width, self.height)
        n = self.frames_i420.shape[0] if self.frames_i420.ndim == 3 else 0
        if n == 0 or self.frames_i420.shape[1:] != (self.height * 3 // 2, self.width):
            raise ValueError(
                f"frames_i420 must be (N>0, {self.height * 3 // 2}, {self.width}), "
                f"got {self.frames_i420.shape}"
            )
        if self.frames_i420.dtype != np.uint8:
            raise ValueError(f"frames_i420 must be uint8, got {self.frames_i420.dtype}")
        for label, boxes in (("face_boxes", self.face_boxes), ("mouth_boxes", self.mouth_boxes)):
            if boxes.shape != (n, 4):
                raise ValueError(f"{label} must be ({n}, 4), got {boxes.shape}")
        # Streams share these arrays; a sink writing into one would corrupt all of them.
        for arr in (self.frames_i420, self.face_boxes, self.mouth_boxes):
            arr.flags.writeable = False
        frames = tuple(VideoFrame(self.frames_i420[i], self.width, self.height) for i in range(n))
        object.__setattr__(self, "_video_frames", frames)

    @property
    def loop_frames(self) -> int:
        return int(self.frames_i420.shape[0])

    def idle_i420(self, n: int) -> np.ndarray:
        """Idle picture for stream frame ``n`` (the loop repeats); shared, read-only."""
        return self.frames_i420[n % self.loop_frames]

    def idle_frame(self, n: int) -> VideoFrame:
        return self._video_frames[n % self.loop_frames]

    def rgb(self, n: int) -> np.ndarray:
        """RGB of idle frame ``n``, converted from the I420 that viewers actually see, so
        a crop edited in RGB and converted back pastes in without a colour seam."""
        return i420_to_rgb(self.idle_i420(n), self.width, self.height)


def save_avatar(avatar: Avatar, path: str | Path) -> Path:
    """Write an avatar as one ``.npz`` (frames, boxes, size, fps); returns the path."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.npz")
    np.savez_compressed(
        tmp, frames_i420=avatar.frames_i420, face_boxes=avatar.face_boxes,
        mouth_boxes=avatar.mouth_boxes,
        meta=np.array([avatar.width, avatar.height, avatar.fps], dtype=np.int32))
    tmp.replace(dst)  # a reader never sees half a file
    return dst


def load_avatar_dir(root: Path) -> dict[str, Avatar]:
    """Every avatar file (``NAME.npz``) in ``root`` by name; an unusable one is logged
    and skipped, so one bad file does not keep a node from starting."""
    found: dict[str, Avatar] = {}
    if not root.is_dir():
        return found
    for path in sorted(root.glob("*.npz")):
        try:
            found[path.stem] = load_avatar(path)
        except (OSError, ValueError) as exc:
            log.error("avatar %s is unusable and was skipped: %s", path, exc)
    return found


def load_avatar(path: str | Path) -> Avatar:
    """Read an avatar written by :func:`save_avatar`; ValueError says what is wrong."""
    src = Path(path)
    try:
        with np.load(src, allow_pickle=False) as data:
            missing = {"frames_i420", "face_boxes", "mouth_boxes", "meta"} - set(data.files)
            if missing:
                raise ValueError(
                    f"{src}: not an avatar file (missing {', '.join(sorted(missing))})")
            width, height, fps = (int(v) for v in data["meta"])
            frames = np.array(data["frames_i420"])
            face = np.array(data["face_boxes"], dtype=np.int32)
            mouth = np.array(data["mouth_boxes"], dtype=np.int32)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{src}: cannot read avatar: {exc}") from None
    for label, boxes in (("face", face), ("mouth", mouth)):
        if boxes.ndim != 2 or boxes.shape[1:] != (4,):
            raise ValueError(f"{src}: {label} boxes must be (N, 4)")
        x, y, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
        if np.any(w <= 0) or np.any(h <= 0) or np.any(x < 0) or np.any(y < 0) \
                or np.any(x + w > width) or np.any(y + h > height):
            raise ValueError(f"{src}: a {label} box lies outside the {width}x{height} frame")
    return Avatar(name=src.stem, width=width, height=height, fps=fps, frames_i420=frames,
                  face_boxes=face, mouth_boxes=mouth)
