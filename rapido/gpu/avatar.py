"""The default avatar: a cartoon tutor drawn by the project itself with numpy.

Shipping a drawn avatar means a fresh checkout streams a face without downloading any
asset, and tests get deterministic pixels. Every shape is a signed distance in *design
units* (the picture is laid out for a 480-pixel-high frame and scaled), turned into
anti-aliased coverage, so the avatar stays crisp at any even frame size.

The idle loop is pre-rendered once to packed I420, the layout sinks and PyAV take, and
shared read-only by every stream: an idle stream then costs no drawing or conversion.
"""

from __future__ import annotations

import functools
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rapido.pipeline.media import VideoFrame

__all__ = [
    "Avatar",
    "default_avatar",
    "draw_default_avatar",
    "i420_to_rgb",
    "load_avatar",
    "rgb_to_i420",
    "save_avatar",
]

# --------------------------------------------------------------------------- colour


def _check_even(width: int, height: int) -> None:
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
    _check_even(w, h)
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


def _i420_planes(i420: np.ndarray, width: int, height: int) -> tuple[np.ndarray, ...]:
    """Views of the Y, U and V planes of a packed I420 picture (no copy)."""
    _check_even(width, height)
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
    yp, up, vp = _i420_planes(i420, width, height)
    y = (yp.astype(np.float32) - 16.0) * 1.164384
    u = np.repeat(np.repeat(up.astype(np.float32) - 128.0, 2, axis=0), 2, axis=1)
    v = np.repeat(np.repeat(vp.astype(np.float32) - 128.0, 2, axis=0), 2, axis=1)
    out = np.empty((height, width, 3), dtype=np.float32)
    out[..., 0] = y + 1.596027 * v
    out[..., 1] = y - 0.391762 * u - 0.812968 * v
    out[..., 2] = y + 2.017232 * u
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- avatar


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
        _check_even(self.width, self.height)
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


# --------------------------------------------------------------------------- drawing

_Color = tuple[float, float, float]

# Palette: warm skin, dark-brown hair, a teal cardigan over a white shirt.
_BG_TOP: _Color = (226, 236, 244)
_BG_BOTTOM: _Color = (180, 200, 218)
_BG_GLOW: _Color = (246, 248, 250)
_SKIN: _Color = (241, 196, 160)
_SKIN_SHADE: _Color = (222, 168, 132)
_SKIN_LINE: _Color = (184, 122, 94)
_HAIR: _Color = (78, 52, 38)
_HAIR_LIGHT: _Color = (122, 86, 62)
_EYE_WHITE: _Color = (252, 252, 250)
_IRIS: _Color = (96, 66, 44)
_PUPIL: _Color = (28, 22, 20)
_LINE: _Color = (52, 36, 30)
_LIPS: _Color = (168, 84, 80)
_LIP_LOWER: _Color = (212, 128, 118)
_BLUSH: _Color = (236, 140, 128)
_SWEATER: _Color = (52, 118, 132)
_SWEATER_DARK: _Color = (38, 92, 104)
_SHIRT: _Color = (248, 248, 244)
_SHIRT_SHADE: _Color = (204, 210, 214)

# Layout in design units (x from the frame centre, y from the top of a 480-high frame).
_HEAD_Y = 210.0
_FACE_RX = 78.0
_FACE_RY = 97.0
_PIVOT_V = 95.0  # tilt pivots at the neck, below the head centre, like a real head
_EYE_DX = 30.0
_EYE_Y = 6.0
_MOUTH_Y = 56.0
_HEAD_EXTENT = (-104.0, 104.0, -118.0, 112.0)  # u0, u1, v0, v1 of everything on the head
_FACE_BOX = (-96.0, 96.0, -84.0, 108.0)  # forehead to below the chin, ear to ear
_MOUTH_BOX = (-32.0, 32.0, 38.0, 76.0)


@dataclass(frozen=True)
class _Pose:
    dx: float  # head offset, design units
    dy: float
    tilt: float  # radians, positive leans the head to the viewer's right
    eyes: float  # 1 open, 0 shut


@dataclass(frozen=True)
class _Layout:
    """Where design units land in the frame: scaled, centred, standing on the bottom."""

    width: int
    height: int
    scale: float  # pixels per design unit

    @property
    def top(self) -> float:
        # Anchor the design's bottom edge to the frame's, so in a portrait frame the
        # torso still reaches the bottom instead of floating.
        return self.height - 480.0 * self.scale

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return x * self.scale + self.width / 2, y * self.scale + self.top


class _Grid:
    """Pixel centres of a frame region in design units: frame coords (x, y) and, when a
    head pose is given, head-local coords (u, v) with the head centre at the origin."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, u: np.ndarray | None, v: np.ndarray | None
    ) -> None:
        self.x, self.y = x, y
        self._u, self._v = u, v

    @property
    def u(self) -> np.ndarray:
        assert self._u is not None, "shape uses head coordinates on a layer without a pose"
        return self._u

    @property
    def v(self) -> np.ndarray:
        assert self._v is not None, "shape uses head coordinates on a layer without a pose"
        return self._v

    def sub(self, rows: slice, cols: slice) -> _Grid:
        u = None if self._u is None else self._u[rows, cols]
        v = None if self._v is None else self._v[rows, cols]
        return _Grid(self.x[rows, cols], self.y[rows, cols], u, v)


class _Painter:
    """Blends anti-aliased shapes into a float RGB region of the frame."""

    def __init__(
        self, img: np.ndarray, x0: int, y0: int, layout: _Layout, pose: _Pose | None
    ) -> None:
        self.img = img
        self.x0, self.y0 = x0, y0
        self.layout = layout
        self.scale = layout.scale
        self.pose = pose
        h, w = img.shape[:2]
        xs = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5 - layout.width / 2) / layout.scale
        ys = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5 - layout.top) / layout.scale
        x, y = np.meshgrid(xs, ys)
        u = v = None
        if pose is not None:
            # Inverse of: frame = head_centre + pivot + R(tilt) (local - pivot).
            c, s = math.cos(pose.tilt), math.sin(pose.tilt)
            ax = x - pose.dx
            ay = y - (_HEAD_Y + pose.dy + _PIVOT_V)
            u = c * ax + s * ay
            v = -s * ax + c * ay + _PIVOT_V
        self.grid = _Grid(x, y, u, v)

    def to_frame(self, u: float, v: float) -> tuple[float, float]:
        """Head-local design point to frame pixels."""
        assert self.pose is not None
        c, s = math.cos(self.pose.tilt), math.sin(self.pose.tilt)
        lv = v - _PIVOT_V
        x = self.pose.dx + c * u - s * lv
        y = _HEAD_Y + self.pose.dy + _PIVOT_V + s * u + c * lv
        return self.layout.to_px(x, y)

    def _slices(self, box: tuple[float, float, float, float], local: bool) -> tuple[slice, slice]:
        u0, u1, v0, v1 = box
        if local:
            pts = [self.to_frame(a, b) for a in (u0, u1) for b in (v0, v1)]
        else:
            pts = [self.layout.to_px(a, b) for a in (u0, u1) for b in (v0, v1)]
        h, w = self.img.shape[:2]
        c0 = max(0, math.floor(min(p[0] for p in pts)) - 2 - self.x0)
        c1 = min(w, math.ceil(max(p[0] for p in pts)) + 3 - self.x0)
        r0 = max(0, math.floor(min(p[1] for p in pts)) - 2 - self.y0)
        r1 = min(h, math.ceil(max(p[1] for p in pts)) + 3 - self.y0)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def fill(
        self,
        sdf: Callable[[_Grid], np.ndarray],
        color: _Color,
        box: tuple[float, float, float, float],
        *,
        local: bool = True,
        alpha: float = 1.0,
        soft: float = 1.0,
        mask: Callable[[_Grid], np.ndarray] | None = None,
    ) -> None:
        """Paint where ``sdf`` < 0. ``box`` bounds the shape (design units, head-local or
        frame) so only those pixels are evaluated; ``soft`` widens the edge in pixels."""
        rows, cols = self._slices(box, local)
        if rows.start == rows.stop or cols.start == cols.stop:
            return
        g = self.grid.sub(rows, cols)
        cov = _coverage(sdf(g), self.scale, soft)
        if mask is not None:
            cov *= mask(g)
        if alpha != 1.0:
            cov *= alpha
        region = self.img[rows, cols]
        region += (np.asarray(color, dtype=np.float32) - region) * cov[..., None]

    def coverage(
        self, sdf: Callable[[_Grid], np.ndarray], g: _Grid, soft: float = 1.0
    ) -> np.ndarray:
        return _coverage(sdf(g), self.scale, soft)


def _coverage(d: np.ndarray, scale: float, soft: float) -> np.ndarray:
    # A signed distance of half a pixel either side of the edge ramps 0..1: box-filter AA.
    return np.clip(0.5 - d * (scale / soft), 0.0, 1.0)


# Signed distances (negative inside) in design units.


def _ellipse(
    px: np.ndarray, py: np.ndarray, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    dx, dy = px - cx, py - cy
    k = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    g = np.sqrt((dx / (rx * rx)) ** 2 + (dy / (ry * ry)) ** 2)
    # First-order distance (k - 1) / |grad k| is accurate near the edge, which is all AA
    # needs; deep inside it only has to stay clearly negative.
    d = k * (k - 1.0) / np.maximum(g, 1e-9)
    d = np.where(k < 0.5, (k - 1.0) * min(rx, ry), d)
    # Far from a thin ellipse (a closing eyelid) that estimate collapses toward zero and
    # would smear a line across the face; the bounding box distance is a lower bound.
    return np.maximum(d, np.maximum(np.abs(dx) - rx, np.abs(dy) - ry))


def _polygon(px: np.ndarray, py: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Exact distance to a convex polygon given clockwise on screen (y down)."""
    inside = np.full(px.shape, -np.inf, dtype=np.float32)
    outside = np.full(px.shape, np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(pts, pts[1:] + pts[:1], strict=True):
        ex, ey = bx - ax, by - ay
        length = math.hypot(ex, ey)
        wx, wy = px - ax, py - ay
        # Outward normal of a clockwise-on-screen edge is (ey, -ex) / length.
        inside = np.maximum(inside, (wx * ey - wy * ex) / length)
        t = np.clip((wx * ex + wy * ey) / (length * length), 0.0, 1.0)
        outside = np.minimum(outside, np.hypot(wx - t * ex, wy - t * ey))
    return np.where(inside > 0, outside, inside)


def _stroke(
    px: np.ndarray,
    py: np.ndarray,
    cx: float,
    cy: float,
    half: float,
    bend: float,
    thick: float,
    *,
    slope: float = 0.0,
    taper: float = 0.0,
) -> np.ndarray:
    """A curved line y = cy + slope*t + bend*(t/half)^2, t = x - cx in [-half, half],
    with round caps; ``taper`` thins it toward the ends (brows, lashes)."""
    t = px - cx
    tc = np.clip(t, -half, half)
    f = cy + slope * tc + bend * (tc / half) ** 2
    fp = slope + 2.0 * bend * tc / (half * half)
    width = thick * (1.0 - taper * (tc / half) ** 2)
    perp = np.abs(py - f) / np.sqrt(1.0 + fp * fp)
    beyond = np.abs(t) > half
    d = np.where(beyond, np.hypot(t - tc, py - f), perp)
    return d - width / 2


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# Builders turning shape parameters into grid -> distance functions. ``local`` picks
# head coordinates (moves with the head) or frame coordinates (static body).

_Sdf = Callable[[_Grid], np.ndarray]


def _xy(g: _Grid, local: bool) -> tuple[np.ndarray, np.ndarray]:
    return (g.u, g.v) if local else (g.x, g.y)


def _ell(cx: float, cy: float, rx: float, ry: float, *, local: bool = True) -> _Sdf:
    def sdf(g: _Grid) -> np.ndarray:
        px, py = _xy(g, local)
        return _ellipse(px, py, cx, cy, rx, ry)

    return sdf


def _poly(pts: list[tuple[float, float]], grow: float = 0.0, *, local: bool = False) -> _Sdf:
    """Convex polygon, its edge pushed out by ``grow`` (which also rounds the corners)."""

    def sdf(g: _Grid) -> np.ndarray:
        px, py = _xy(g, local)
        return _polygon(px, py, pts) - grow

    return sdf


def _curve(
    cx: float,
    cy: float,
    half: float,
    bend: float,
    thick: float,
    *,
    slope: float = 0.0,
    taper: float = 0.0,
    vertical: bool = False,
    local: bool = True,
) -> _Sdf:
    """A :func:`_stroke`; ``vertical`` swaps the axes so the line runs top to bottom
    (then ``cx`` is the middle y and ``cy`` the x it bows around)."""

    def sdf(g: _Grid) -> np.ndarray:
        px, py = _xy(g, local)
        if vertical:
            px, py = py, px
        return _stroke(px, py, cx, cy, half, bend, thick, slope=slope, taper=taper)

    return sdf


def _outline(shape: _Sdf, width: float) -> _Sdf:
    def sdf(g: _Grid) -> np.ndarray:
        return np.abs(shape(g)) - width / 2

    return sdf


def _face(g: _Grid) -> np.ndarray:
    # Narrow the jaw: squeeze u more the lower the point, giving a soft chin, not an egg.
    below = np.clip(g.v / _FACE_RY, 0.0, 1.0)
    squeeze = 1.0 - 0.2 * below**1.6
    return _ellipse(g.u / squeeze, g.v, 0.0, 0.0, _FACE_RX, _FACE_RY)


def _hairline(u: np.ndarray) -> np.ndarray:
    # Side parting at u = -24: the fringe sweeps from it down toward the viewer's right.
    return -60.0 + 0.0042 * (u + 24.0) ** 2 - 0.00003 * (u + 24.0) ** 3


def _front_hair(g: _Grid) -> np.ndarray:
    # The top of a hair ellipse, cut by the swept hairline (max of distances = intersection).
    return np.maximum(_ellipse(g.u, g.v, 0.0, -34.0, 81.0, 76.0), g.v - _hairline(g.u))


def _draw_background(p: _Painter) -> None:
    h = p.img.shape[0]
    t = (np.arange(h, dtype=np.float32) + 0.5) / h
    top, bottom = np.asarray(_BG_TOP, np.float32), np.asarray(_BG_BOTTOM, np.float32)
    p.img[:] = (top + (bottom - top) * t[:, None])[:, None, :]
    # A soft light behind the head, as from a window, lifts the face off the wall.
    g = p.grid
    r = np.hypot(g.x / 1.25, g.y - _HEAD_Y + 10.0)
    glow = np.clip(1.0 - r / 300.0, 0.0, 1.0) ** 2 * 0.8
    p.img += (np.asarray(_BG_GLOW, np.float32) - p.img) * glow[..., None]
    # A faint vignette keeps the eye on the centre.
    vig = np.clip((np.hypot(g.x / 1.6, (g.y - 240.0) * 0.9) - 200.0) / 260.0, 0.0, 1.0) * 0.18
    p.img *= (1.0 - vig)[..., None]


_NECK = [(-28.0, 250.0), (28.0, 250.0), (30.0, 372.0), (-30.0, 372.0)]
# Right half of the torso, neck to bottom (the last point runs off any portrait frame);
# mirrored so the outline stays symmetric and clockwise.
_TORSO_RIGHT = [(50.0, 368.0), (166.0, 396.0), (204.0, 440.0), (214.0, 520.0), (214.0, 4000.0)]
_TORSO = _TORSO_RIGHT + [(-x, y) for x, y in reversed(_TORSO_RIGHT)]
_V_NECK = [(-38.0, 350.0), (38.0, 350.0), (0.0, 430.0)]
_OPEN_COLLAR = [(-26.0, 340.0), (26.0, 340.0), (0.0, 384.0)]
_COLLAR_L = [(-40.0, 350.0), (-4.0, 382.0), (-18.0, 398.0), (-50.0, 362.0)]
_COLLAR_R = [(40.0, 350.0), (50.0, 362.0), (18.0, 398.0), (4.0, 382.0)]


def _draw_body(p: _Painter) -> None:
    """Neck, shirt and cardigan: they do not move, so they are drawn once."""
    neck = _poly(_NECK, 4.0)
    p.fill(neck, _SKIN, (-40, 40, 240, 380), local=False)
    # The jaw's shadow falls on the neck's upper part; a soft fade hides where it ends.
    p.fill(
        neck,
        _SKIN_SHADE,
        (-40, 40, 240, 380),
        local=False,
        mask=lambda g: 1.0 - _smoothstep(300.0, 330.0, g.y),
    )
    p.fill(_poly(_TORSO, 30.0), _SWEATER, (-260, 260, 330, 4000), local=False)
    # Arm creases: a darker band where the sleeves meet the body.
    for side in (-1.0, 1.0):
        p.fill(
            _curve(
                470.0, side * 170.0, 60.0, -side * 8.0, 4.0, taper=0.6, vertical=True, local=False
            ),
            _SWEATER_DARK,
            (side * 170 - 20, side * 170 + 20, 400, 540),
            local=False,
            alpha=0.35,
        )
    p.fill(_poly(_V_NECK), _SHIRT, (-45, 45, 340, 440), local=False)
    # The open collar shows a little skin below the neck.
    p.fill(_poly(_OPEN_COLLAR, 2.0), _SKIN, (-35, 35, 330, 400), local=False)
    # Shirt collar points over the neck base, then the cardigan's ribbed V edge.
    for pts in (_COLLAR_L, _COLLAR_R):
        collar = _poly(pts, 2.0)
        p.fill(collar, _SHIRT, (-60, 60, 340, 410), local=False)
        p.fill(_outline(collar, 1.4), _SHIRT_SHADE, (-60, 60, 340, 410), local=False)
    for side in (-1.0, 1.0):
        p.fill(
            _curve(
                395.0, side * 21.0, 45.0, 0.0, 7.0, slope=-side * 0.5, vertical=True, local=False
            ),
            _SWEATER_DARK,
            (side * 22 - 30, side * 22 + 30, 345, 445),
            local=False,
        )


def _draw_head(p: _Painter) -> None:
    assert p.pose is not None
    # Hair behind the head frames the face and shows around the temples.
    p.fill(_ell(0.0, -26.0, 86.0, 84.0), _HAIR, (-90, 90, -112, 60))
    for side in (-1.0, 1.0):
        ex = side * (_FACE_RX - 2.0)
        ear_box = (ex - 16, ex + 16, -16, 32)
        p.fill(_ell(ex, 8.0, 13.0, 22.0), _SKIN, ear_box)
        p.fill(
            _curve(8.0, ex + side * 3.0, 11.0, -side * 4.0, 3.0, taper=0.5, vertical=True),
            _SKIN_LINE,
            ear_box,
            alpha=0.7,
        )
    p.fill(_face, _SKIN, (-80, 80, -100, 100))
    # A soft outline reads as a drawn cartoon and separates chin from neck.
    p.fill(_outline(_face, 1.8), _SKIN_LINE, (-80, 80, -100, 100), alpha=0.55)
    p.fill(_front_hair, _HAIR, (-86, 86, -114, -10))
    p.fill(
        _curve(18.0, -88.0, 40.0, 10.0, 5.0, slope=-0.15, taper=0.8),
        _HAIR_LIGHT,
        (-30, 66, -104, -70),
        alpha=0.7,
    )
    # Cheeks: wide feathered blush.
    for side in (-1.0, 1.0):
        cx = side * 46.0
        p.fill(_ell(cx, 34.0, 14.0, 8.0), _BLUSH, (cx - 26, cx + 26, 20, 48), alpha=0.35, soft=10.0)
    for side in (-1.0, 1.0):
        bx = side * _EYE_DX
        _draw_eye(p, bx, _EYE_Y, p.pose.eyes, side)
        p.fill(
            _curve(bx + side, -22.0, 15.0, 5.0, 5.0, slope=side * 0.06, taper=0.55),
            _HAIR,
            (bx - 20, bx + 20, -34, -12),
        )
    # Nose: a short curve under the tip plus a soft shadow to one side.
    p.fill(_ell(3.0, 26.0, 7.0, 9.0), _SKIN_SHADE, (-8, 14, 14, 38), alpha=0.5, soft=5.0)
    p.fill(_curve(0.0, 34.0, 7.0, -3.0, 2.4, taper=0.5), _SKIN_LINE, (-10, 10, 28, 38))
    # Closed mouth: a gentle smile line and a hint of lower lip.
    p.fill(
        _curve(0.0, _MOUTH_Y + 2.0, 19.0, -5.0, 3.2, taper=0.45),
        _LIPS,
        (-24, 24, _MOUTH_Y - 8, _MOUTH_Y + 8),
    )
    p.fill(
        _curve(0.0, _MOUTH_Y + 9.0, 9.0, -1.5, 3.2, taper=0.6),
        _LIP_LOWER,
        (-14, 14, _MOUTH_Y + 2, _MOUTH_Y + 15),
        alpha=0.6,
        soft=2.0,
    )


def _draw_eye(p: _Painter, ex: float, ey: float, openness: float, side: float) -> None:
    rx, ry = 13.0, 11.0
    # The upper lid slides down over the eyeball while the lower lid rises a little; shut,
    # both meet on a shallow downward curve, the usual cartoon closed eye. Each lid is
    # half an ellipse of width rx about the eye's centre line; a negative height means
    # the lid has passed below that line.
    lid_ry = ry * (1.45 * openness - 0.45)
    bottom_ry = ry * (0.45 + 0.55 * openness)

    def below_lid(g: _Grid) -> np.ndarray:
        d_lid = _ellipse(g.u, g.v, ex, ey, rx, max(abs(lid_ry), 0.25))
        # Upper half: below an upper-arc lid means inside the lid ellipse; once the lid
        # passes the middle it is the lower arc, and below it means outside.
        if lid_ry >= 0:
            return np.where(g.v < ey, d_lid, -abs(lid_ry) - (g.v - ey))
        return np.where(g.v > ey, -d_lid, abs(lid_ry) + (ey - g.v))

    def opening(g: _Grid) -> np.ndarray:
        return np.maximum(_ellipse(g.u, g.v, ex, ey, rx, bottom_ry), below_lid(g))

    box = (ex - rx - 4, ex + rx + 4, ey - ry - 5, ey + ry + 4)
    if openness > 0.02:
        p.fill(opening, _EYE_WHITE, box)
        # Looking slightly inward and down reads as attending to the viewer.
        lx, ly = ex - side * 1.0, ey + 1.0
        clip = functools.partial(p.coverage, opening)
        p.fill(_ell(lx, ly, 8.0, 8.0), _IRIS, box, mask=clip)
        p.fill(_ell(lx, ly, 4.2, 4.2), _PUPIL, box, mask=clip)
        p.fill(_ell(lx - 2.8, ly - 3.0, 2.0, 2.0), _EYE_WHITE, box, mask=clip)

    def lid_line(g: _Grid) -> np.ndarray:
        d_lid = _ellipse(g.u, g.v, ex, ey, rx, max(abs(lid_ry), 0.25))
        upper = g.v < ey if lid_ry >= 0 else g.v > ey
        ends = np.hypot(np.abs(g.u - ex) - rx, g.v - ey)
        return np.where(upper, np.abs(d_lid), ends) - 1.6

    p.fill(lid_line, _LINE, box)
    # One lash flick at the outer corner keeps the eye readable when shut.
    ox = ex + side * rx
    p.fill(
        _curve(ox + side * 2.5, ey - 1.5 - openness, 3.0, 0.0, 2.0, slope=-side * 0.6, taper=0.5),
        _LINE,
        (ox - 8, ox + 8, ey - 10, ey + 6),
    )
    # Lid crease above an open eye.
    p.fill(
        _curve(ex, ey - ry - 4.0, rx * 0.8, 3.0, 1.4, taper=0.7),
        _SKIN_LINE,
        (ex - rx, ex + rx, ey - ry - 9, ey - ry + 2),
        alpha=0.5 * openness,
    )


# --------------------------------------------------------------------------- idle loop


def _blink_openness(n_frames: int, fps: int) -> np.ndarray:
    """Eye openness per loop frame: at least one blink, about one per 3.5 s of loop (people
    blink 15-20 times a minute), quick to close and slower to open, placed away from the
    loop seam so frame 0 and the last frame are open-eyed."""
    open_ = np.ones(n_frames, dtype=np.float32)
    length = max(3, round(0.16 * fps))  # ~160 ms, a relaxed human blink
    closing = max(1, length // 4)
    opening = max(1, length - closing - 1)
    profile = (
        [1.0 - (i + 1) / (closing + 1) for i in range(closing)]
        + [0.0]
        + [(j + 1) / (opening + 1) for j in range(opening)]
    )
    seconds = n_frames / fps
    blinks = max(1, round(seconds / 3.5))
    for b in range(blinks):
        start = int(n_frames * (b + 0.55) / blinks)
        for k, value in enumerate(profile):
            if 0 < start + k < n_frames:
                open_[start + k] = min(open_[start + k], value)
    return open_


def _pose(i: int, n: int, eyes: float, seconds: float) -> _Pose:
    # Whole periods per loop make frame N continue into frame 0 without a jump; more
    # periods for longer loops keep the sway slow and natural.
    cycles = max(1, round(seconds / 3.0))
    t = 2.0 * math.pi * cycles * i / n
    return _Pose(
        dx=3.0 * math.sin(t),
        dy=1.6 * math.sin(2.0 * t + 0.9),
        tilt=math.radians(1.6) * math.sin(t + 0.6),
        eyes=eyes,
    )


def _box_px(
    p: _Painter, box: tuple[float, float, float, float], width: int, height: int
) -> tuple[int, int, int, int]:
    u0, u1, v0, v1 = box
    cx, cy = p.to_frame((u0 + u1) / 2, (v0 + v1) / 2)
    w, h = (u1 - u0) * p.scale, (v1 - v0) * p.scale
    x, y = round(cx - w / 2), round(cy - h / 2)
    wi, hi = round(w), round(h)
    x = min(max(x, 0), width - 1)
    y = min(max(y, 0), height - 1)
    return x, y, min(wi, width - x), min(hi, height - y)


def _is_int(x: object) -> bool:
    # bool is an int subclass; fps=True is a bug, not a frame rate.
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _validate(width: int, height: int, fps: int, loop_seconds: float) -> None:
    if not _is_int(width) or not _is_int(height):
        raise ValueError(f"width and height must be ints, got {width!r}x{height!r}")
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise ValueError(f"avatar size must be even and at least 64x64, got {width}x{height}")
    if not _is_int(fps) or not 1 <= fps <= 60:
        raise ValueError(f"fps must be an int in 1..60, got {fps!r}")
    finite = (
        isinstance(loop_seconds, int | float | np.integer | np.floating)
        and not isinstance(loop_seconds, bool)
        and math.isfinite(loop_seconds)
    )
    if not finite or loop_seconds <= 0:
        raise ValueError(f"loop_seconds must be a positive number, got {loop_seconds!r}")


def draw_default_avatar(
    width: int = 854, height: int = 480, fps: int = 25, loop_seconds: float = 3.0
) -> Avatar:
    """Render the built-in cartoon tutor's idle loop (``round(fps * loop_seconds)`` frames)."""
    _validate(width, height, fps, loop_seconds)
    width, height, fps, loop_seconds = int(width), int(height), int(fps), float(loop_seconds)
    n = max(1, round(fps * loop_seconds))
    # Fit the height, unless the frame is so narrow that the shoulders would be cut
    # off well beyond the sleeves.
    layout = _Layout(width, height, min(height / 480.0, width / 854.0 * 1.2))

    # Static layers once: background, then the body, then to I420 for every frame.
    base = np.empty((height, width, 3), dtype=np.float32)
    body = _Painter(base, 0, 0, layout, None)
    _draw_background(body)
    _draw_body(body)
    base_i420 = rgb_to_i420(np.clip(base + 0.5, 0, 255).astype(np.uint8))
    frames = np.empty((n, height * 3 // 2, width), dtype=np.uint8)
    frames[:] = base_i420

    # Only the head moves, so each frame redraws just the head's bounding region, chosen
    # once over all poses and aligned to even pixels so its chroma blocks are whole.
    openness = _blink_openness(n, fps)
    poses = [_pose(i, n, float(openness[i]), loop_seconds) for i in range(n)]
    u0, u1, v0, v1 = _HEAD_EXTENT
    xs, ys = [], []
    for pose in poses:
        probe = _Painter(base[:1, :1], 0, 0, layout, pose)
        for a in (u0, u1):
            for b in (v0, v1):
                px, py = probe.to_frame(a, b)
                xs.append(px)
                ys.append(py)
    x0 = max(0, (math.floor(min(xs)) - 4) // 2 * 2)
    y0 = max(0, (math.floor(min(ys)) - 4) // 2 * 2)
    x1 = min(width, (math.ceil(max(xs)) + 6) // 2 * 2)
    y1 = min(height, (math.ceil(max(ys)) + 6) // 2 * 2)

    face_boxes = np.empty((n, 4), dtype=np.int32)
    mouth_boxes = np.empty((n, 4), dtype=np.int32)
    for i, pose in enumerate(poses):
        region = base[y0:y1, x0:x1].copy()
        painter = _Painter(region, x0, y0, layout, pose)
        _draw_head(painter)
        face_boxes[i] = _box_px(painter, _FACE_BOX, width, height)
        mouth_boxes[i] = _box_px(painter, _MOUTH_BOX, width, height)
        yuv = rgb_to_i420(np.clip(region + 0.5, 0, 255).astype(np.uint8))
        ry, ru, rv = _i420_planes(yuv, x1 - x0, y1 - y0)
        fy, fu, fv = _i420_planes(frames[i], width, height)
        fy[y0:y1, x0:x1] = ry
        fu[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = ru
        fv[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = rv

    return Avatar(
        name="default",
        width=width,
        height=height,
        fps=fps,
        frames_i420=frames,
        face_boxes=face_boxes,
        mouth_boxes=mouth_boxes,
    )


def default_avatar(width: int = 854, height: int = 480, fps: int = 25) -> Avatar:
    """The built-in avatar, drawn once per size and shared by every stream."""
    # Normalise before the cache: lru_cache keys ``f()`` and ``f(854, 480, 25)``
    # differently, and numpy ints would be yet another key for the same avatar.
    _validate(width, height, fps, 3.0)
    return _cached_default(int(width), int(height), int(fps))


@functools.lru_cache(maxsize=4)
def _cached_default(width: int, height: int, fps: int) -> Avatar:
    return draw_default_avatar(width, height, fps)


# --------------------------------------------------------------------------- files


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
