"""Anti-aliased shape painting for the drawn portrait (:mod:`rapido.gpu.portrait`).

Every shape is a signed distance in *design units* (the picture is laid out for a
480-pixel-high frame and scaled), turned into anti-aliased coverage, so a drawing stays
crisp at any even frame size. Shapes are either in frame coordinates (the static body) or
in head-local coordinates that follow a :class:`Pose` (offset and tilt about the neck).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Color = tuple[float, float, float]


@dataclass(frozen=True)
class Pose:
    dx: float  # head offset, design units
    dy: float
    tilt: float  # radians, positive leans the head to the viewer's right
    eyes: float  # 1 open, 0 shut


@dataclass(frozen=True)
class Layout:
    """Where design units land in the frame: scaled, centred, standing on the bottom; and
    where the head hangs, so a :class:`Pose` can move and tilt it."""

    width: int
    height: int
    scale: float  # pixels per design unit
    head_y: float  # the head centre's y at rest, design units from the top
    pivot_v: float  # how far below the head centre the tilt pivots (the neck)

    @property
    def top(self) -> float:
        # Anchor the design's bottom edge to the frame's, so in a portrait frame the
        # torso still reaches the bottom instead of floating.
        return self.height - 480.0 * self.scale

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return x * self.scale + self.width / 2, y * self.scale + self.top


class Grid:
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

    def sub(self, rows: slice, cols: slice) -> Grid:
        u = None if self._u is None else self._u[rows, cols]
        v = None if self._v is None else self._v[rows, cols]
        return Grid(self.x[rows, cols], self.y[rows, cols], u, v)


class Painter:
    """Blends anti-aliased shapes into a float RGB region of the frame."""

    def __init__(
        self, img: np.ndarray, x0: int, y0: int, layout: Layout, pose: Pose | None
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
            ay = y - (layout.head_y + pose.dy + layout.pivot_v)
            u = c * ax + s * ay
            v = -s * ax + c * ay + layout.pivot_v
        self.grid = Grid(x, y, u, v)

    def to_frame(self, u: float, v: float) -> tuple[float, float]:
        """Head-local design point to frame pixels."""
        assert self.pose is not None
        c, s = math.cos(self.pose.tilt), math.sin(self.pose.tilt)
        lv = v - self.layout.pivot_v
        x = self.pose.dx + c * u - s * lv
        y = self.layout.head_y + self.pose.dy + self.layout.pivot_v + s * u + c * lv
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
        sdf: Callable[[Grid], np.ndarray],
        color: Color,
        box: tuple[float, float, float, float],
        *,
        local: bool = True,
        alpha: float = 1.0,
        soft: float = 1.0,
        mask: Callable[[Grid], np.ndarray] | None = None,
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
        self, sdf: Callable[[Grid], np.ndarray], g: Grid, soft: float = 1.0
    ) -> np.ndarray:
        return _coverage(sdf(g), self.scale, soft)


def _coverage(d: np.ndarray, scale: float, soft: float) -> np.ndarray:
    # A signed distance of half a pixel either side of the edge ramps 0..1: box-filter AA.
    return np.clip(0.5 - d * (scale / soft), 0.0, 1.0)


# Signed distances (negative inside) in design units.


def ellipse(
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


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# Builders turning shape parameters into grid -> distance functions. ``local`` picks
# head coordinates (moves with the head) or frame coordinates (static body).

Sdf = Callable[[Grid], np.ndarray]


def _xy(g: Grid, local: bool) -> tuple[np.ndarray, np.ndarray]:
    return (g.u, g.v) if local else (g.x, g.y)


def ell(cx: float, cy: float, rx: float, ry: float, *, local: bool = True) -> Sdf:
    def sdf(g: Grid) -> np.ndarray:
        px, py = _xy(g, local)
        return ellipse(px, py, cx, cy, rx, ry)

    return sdf


def poly(pts: list[tuple[float, float]], grow: float = 0.0, *, local: bool = False) -> Sdf:
    """Convex polygon, its edge pushed out by ``grow`` (which also rounds the corners)."""

    def sdf(g: Grid) -> np.ndarray:
        px, py = _xy(g, local)
        return _polygon(px, py, pts) - grow

    return sdf


def curve(
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
) -> Sdf:
    """A :func:`_stroke`; ``vertical`` swaps the axes so the line runs top to bottom
    (then ``cx`` is the middle y and ``cy`` the x it bows around)."""

    def sdf(g: Grid) -> np.ndarray:
        px, py = _xy(g, local)
        if vertical:
            px, py = py, px
        return _stroke(px, py, cx, cy, half, bend, thick, slope=slope, taper=taper)

    return sdf


def outline(shape: Sdf, width: float) -> Sdf:
    def sdf(g: Grid) -> np.ndarray:
        return np.abs(shape(g)) - width / 2

    return sdf

