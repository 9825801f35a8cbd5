"""The default avatar: a cartoon tutor drawn by the project itself with numpy.

Shipping a drawn avatar means a fresh checkout streams a face without downloading any
asset, and tests get deterministic pixels. The shapes are painted with
:mod:`rapido.gpu.paint` (signed distances in design units, anti-aliased at any even
frame size); this module holds the tutor's design, the blink and head sway of the idle
loop, and :func:`default_avatar`.

The idle loop is pre-rendered once to packed I420, the layout sinks and PyAV take, and
shared read-only by every stream: an idle stream then costs no drawing or conversion.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from rapido.gpu.paint import (
    Color,
    Grid,
    Layout,
    Painter,
    Pose,
    curve,
    ell,
    ellipse,
    outline,
    poly,
    smoothstep,
)
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.media import i420_planes, rgb_to_i420

__all__ = ["default_avatar", "draw_default_avatar"]


# Palette: warm skin, dark-brown hair, a teal cardigan over a white shirt.
_BG_TOP: Color = (226, 236, 244)
_BG_BOTTOM: Color = (180, 200, 218)
_BG_GLOW: Color = (246, 248, 250)
_SKIN: Color = (241, 196, 160)
_SKIN_SHADE: Color = (222, 168, 132)
_SKIN_LINE: Color = (184, 122, 94)
_HAIR: Color = (78, 52, 38)
_HAIR_LIGHT: Color = (122, 86, 62)
_EYE_WHITE: Color = (252, 252, 250)
_IRIS: Color = (96, 66, 44)
_PUPIL: Color = (28, 22, 20)
_LINE: Color = (52, 36, 30)
_LIPS: Color = (168, 84, 80)
_LIP_LOWER: Color = (212, 128, 118)
_BLUSH: Color = (236, 140, 128)
_SWEATER: Color = (52, 118, 132)
_SWEATER_DARK: Color = (38, 92, 104)
_SHIRT: Color = (248, 248, 244)
_SHIRT_SHADE: Color = (204, 210, 214)

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


def _face(g: Grid) -> np.ndarray:
    # Narrow the jaw: squeeze u more the lower the point, giving a soft chin, not an egg.
    below = np.clip(g.v / _FACE_RY, 0.0, 1.0)
    squeeze = 1.0 - 0.2 * below**1.6
    return ellipse(g.u / squeeze, g.v, 0.0, 0.0, _FACE_RX, _FACE_RY)


def _hairline(u: np.ndarray) -> np.ndarray:
    # Side parting at u = -24: the fringe sweeps from it down toward the viewer's right.
    return -60.0 + 0.0042 * (u + 24.0) ** 2 - 0.00003 * (u + 24.0) ** 3


def _front_hair(g: Grid) -> np.ndarray:
    # The top of a hair ellipse, cut by the swept hairline (max of distances = intersection).
    return np.maximum(ellipse(g.u, g.v, 0.0, -34.0, 81.0, 76.0), g.v - _hairline(g.u))


def _draw_background(p: Painter) -> None:
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


def _draw_body(p: Painter) -> None:
    """Neck, shirt and cardigan: they do not move, so they are drawn once."""
    neck = poly(_NECK, 4.0)
    p.fill(neck, _SKIN, (-40, 40, 240, 380), local=False)
    # The jaw's shadow falls on the neck's upper part; a soft fade hides where it ends.
    p.fill(
        neck,
        _SKIN_SHADE,
        (-40, 40, 240, 380),
        local=False,
        mask=lambda g: 1.0 - smoothstep(300.0, 330.0, g.y),
    )
    p.fill(poly(_TORSO, 30.0), _SWEATER, (-260, 260, 330, 4000), local=False)
    # Arm creases: a darker band where the sleeves meet the body.
    for side in (-1.0, 1.0):
        p.fill(
            curve(
                470.0, side * 170.0, 60.0, -side * 8.0, 4.0, taper=0.6, vertical=True, local=False
            ),
            _SWEATER_DARK,
            (side * 170 - 20, side * 170 + 20, 400, 540),
            local=False,
            alpha=0.35,
        )
    p.fill(poly(_V_NECK), _SHIRT, (-45, 45, 340, 440), local=False)
    # The open collar shows a little skin below the neck.
    p.fill(poly(_OPEN_COLLAR, 2.0), _SKIN, (-35, 35, 330, 400), local=False)
    # Shirt collar points over the neck base, then the cardigan's ribbed V edge.
    for pts in (_COLLAR_L, _COLLAR_R):
        collar = poly(pts, 2.0)
        p.fill(collar, _SHIRT, (-60, 60, 340, 410), local=False)
        p.fill(outline(collar, 1.4), _SHIRT_SHADE, (-60, 60, 340, 410), local=False)
    for side in (-1.0, 1.0):
        p.fill(
            curve(
                395.0, side * 21.0, 45.0, 0.0, 7.0, slope=-side * 0.5, vertical=True, local=False
            ),
            _SWEATER_DARK,
            (side * 22 - 30, side * 22 + 30, 345, 445),
            local=False,
        )


def _draw_head(p: Painter) -> None:
    assert p.pose is not None
    # Hair behind the head frames the face and shows around the temples.
    p.fill(ell(0.0, -26.0, 86.0, 84.0), _HAIR, (-90, 90, -112, 60))
    for side in (-1.0, 1.0):
        ex = side * (_FACE_RX - 2.0)
        ear_box = (ex - 16, ex + 16, -16, 32)
        p.fill(ell(ex, 8.0, 13.0, 22.0), _SKIN, ear_box)
        p.fill(
            curve(8.0, ex + side * 3.0, 11.0, -side * 4.0, 3.0, taper=0.5, vertical=True),
            _SKIN_LINE,
            ear_box,
            alpha=0.7,
        )
    p.fill(_face, _SKIN, (-80, 80, -100, 100))
    # A soft outline reads as a drawn cartoon and separates chin from neck.
    p.fill(outline(_face, 1.8), _SKIN_LINE, (-80, 80, -100, 100), alpha=0.55)
    p.fill(_front_hair, _HAIR, (-86, 86, -114, -10))
    p.fill(
        curve(18.0, -88.0, 40.0, 10.0, 5.0, slope=-0.15, taper=0.8),
        _HAIR_LIGHT,
        (-30, 66, -104, -70),
        alpha=0.7,
    )
    # Cheeks: wide feathered blush.
    for side in (-1.0, 1.0):
        cx = side * 46.0
        p.fill(ell(cx, 34.0, 14.0, 8.0), _BLUSH, (cx - 26, cx + 26, 20, 48), alpha=0.35, soft=10.0)
    for side in (-1.0, 1.0):
        bx = side * _EYE_DX
        _draw_eye(p, bx, _EYE_Y, p.pose.eyes, side)
        p.fill(
            curve(bx + side, -22.0, 15.0, 5.0, 5.0, slope=side * 0.06, taper=0.55),
            _HAIR,
            (bx - 20, bx + 20, -34, -12),
        )
    # Nose: a short curve under the tip plus a soft shadow to one side.
    p.fill(ell(3.0, 26.0, 7.0, 9.0), _SKIN_SHADE, (-8, 14, 14, 38), alpha=0.5, soft=5.0)
    p.fill(curve(0.0, 34.0, 7.0, -3.0, 2.4, taper=0.5), _SKIN_LINE, (-10, 10, 28, 38))
    # Closed mouth: a gentle smile line and a hint of lower lip.
    p.fill(
        curve(0.0, _MOUTH_Y + 2.0, 19.0, -5.0, 3.2, taper=0.45),
        _LIPS,
        (-24, 24, _MOUTH_Y - 8, _MOUTH_Y + 8),
    )
    p.fill(
        curve(0.0, _MOUTH_Y + 9.0, 9.0, -1.5, 3.2, taper=0.6),
        _LIP_LOWER,
        (-14, 14, _MOUTH_Y + 2, _MOUTH_Y + 15),
        alpha=0.6,
        soft=2.0,
    )


def _draw_eye(p: Painter, ex: float, ey: float, openness: float, side: float) -> None:
    rx, ry = 13.0, 11.0
    # The upper lid slides down over the eyeball while the lower lid rises a little; shut,
    # both meet on a shallow downward curve, the usual cartoon closed eye. Each lid is
    # half an ellipse of width rx about the eye's centre line; a negative height means
    # the lid has passed below that line.
    lid_ry = ry * (1.45 * openness - 0.45)
    bottom_ry = ry * (0.45 + 0.55 * openness)

    def below_lid(g: Grid) -> np.ndarray:
        d_lid = ellipse(g.u, g.v, ex, ey, rx, max(abs(lid_ry), 0.25))
        # Upper half: below an upper-arc lid means inside the lid ellipse; once the lid
        # passes the middle it is the lower arc, and below it means outside.
        if lid_ry >= 0:
            return np.where(g.v < ey, d_lid, -abs(lid_ry) - (g.v - ey))
        return np.where(g.v > ey, -d_lid, abs(lid_ry) + (ey - g.v))

    def opening(g: Grid) -> np.ndarray:
        return np.maximum(ellipse(g.u, g.v, ex, ey, rx, bottom_ry), below_lid(g))

    box = (ex - rx - 4, ex + rx + 4, ey - ry - 5, ey + ry + 4)
    if openness > 0.02:
        p.fill(opening, _EYE_WHITE, box)
        # Looking slightly inward and down reads as attending to the viewer.
        lx, ly = ex - side * 1.0, ey + 1.0
        clip = functools.partial(p.coverage, opening)
        p.fill(ell(lx, ly, 8.0, 8.0), _IRIS, box, mask=clip)
        p.fill(ell(lx, ly, 4.2, 4.2), _PUPIL, box, mask=clip)
        p.fill(ell(lx - 2.8, ly - 3.0, 2.0, 2.0), _EYE_WHITE, box, mask=clip)

    def lid_line(g: Grid) -> np.ndarray:
        d_lid = ellipse(g.u, g.v, ex, ey, rx, max(abs(lid_ry), 0.25))
        upper = g.v < ey if lid_ry >= 0 else g.v > ey
        ends = np.hypot(np.abs(g.u - ex) - rx, g.v - ey)
        return np.where(upper, np.abs(d_lid), ends) - 1.6

    p.fill(lid_line, _LINE, box)
    # One lash flick at the outer corner keeps the eye readable when shut.
    ox = ex + side * rx
    p.fill(
        curve(ox + side * 2.5, ey - 1.5 - openness, 3.0, 0.0, 2.0, slope=-side * 0.6, taper=0.5),
        _LINE,
        (ox - 8, ox + 8, ey - 10, ey + 6),
    )
    # Lid crease above an open eye.
    p.fill(
        curve(ex, ey - ry - 4.0, rx * 0.8, 3.0, 1.4, taper=0.7),
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


def _pose(i: int, n: int, eyes: float, seconds: float) -> Pose:
    # Whole periods per loop make frame N continue into frame 0 without a jump; more
    # periods for longer loops keep the sway slow and natural.
    cycles = max(1, round(seconds / 3.0))
    t = 2.0 * math.pi * cycles * i / n
    return Pose(
        dx=3.0 * math.sin(t),
        dy=1.6 * math.sin(2.0 * t + 0.9),
        tilt=math.radians(1.6) * math.sin(t + 0.6),
        eyes=eyes,
    )


def _box_px(
    p: Painter, box: tuple[float, float, float, float], width: int, height: int
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
    layout = Layout(width, height, min(height / 480.0, width / 854.0 * 1.2), _HEAD_Y, _PIVOT_V)

    # Static layers once: background, then the body, then to I420 for every frame.
    base = np.empty((height, width, 3), dtype=np.float32)
    body = Painter(base, 0, 0, layout, None)
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
        probe = Painter(base[:1, :1], 0, 0, layout, pose)
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
        painter = Painter(region, x0, y0, layout, pose)
        _draw_head(painter)
        face_boxes[i] = _box_px(painter, _FACE_BOX, width, height)
        mouth_boxes[i] = _box_px(painter, _MOUTH_BOX, width, height)
        yuv = rgb_to_i420(np.clip(region + 0.5, 0, 255).astype(np.uint8))
        ry, ru, rv = i420_planes(yuv, x1 - x0, y1 - y0)
        fy, fu, fv = i420_planes(frames[i], width, height)
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

