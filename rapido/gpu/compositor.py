"""Compositor: model crops in, finished I420 frames out.

Everything that depends only on the avatar is computed once per (avatar, crop size) and
shared by every stream that shows it: the face crops the model takes (masked ‖
reference), a feathered blend mask, the base pixels under it, and the base frames
already in I420. Per frame only the blend region is resized, blended and converted; the
rest of the picture is a copy of the pre-converted base frame.

Two implementations of the per-frame step with the same maths: numpy (the CPU default,
cheap for small regions) and torch (on the model's device, so on a GPU the crop never
leaves it until the finished region is copied back once).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rapido.gpu.avatar import Avatar, i420_to_rgb
from rapido.pipeline.media import VideoFrame

Blend = Literal["lower_half", "mouth"]

# BT.601 limited range, as rapido.gpu.avatar.rgb_to_i420 (ffmpeg's default for yuv420p).
_Y = np.array([0.256788, 0.504129, 0.097906], dtype=np.float32)
_U = np.array([-0.148223, -0.290993, 0.439216], dtype=np.float32)
_V = np.array([0.439216, -0.367788, -0.071427], dtype=np.float32)


def resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of a triangle (bilinear) filter, widened by the scale
    factor when shrinking so it averages instead of aliasing (what PIL's BILINEAR does).
    Resizing an image is then two small matrix products."""
    if n_out <= 0 or n_in <= 0:
        raise ValueError("sizes must be positive")
    scale = n_in / n_out
    support = max(1.0, scale)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    src = np.arange(n_in)
    w = np.clip(1.0 - np.abs(src[None, :] - centres[:, None]) / support, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


@dataclass(frozen=True)
class _Region:
    """The part of the face box that is blended: even-aligned, in frame coordinates."""

    x: int
    y: int
    w: int
    h: int


class Compositor:
    def __init__(self, avatar: Avatar, crop_size: int, blend: Blend = "lower_half",
                 feather: float = 0.12) -> None:
        if crop_size < 16:
            raise ValueError("crop_size must be >= 16")
        if blend not in ("lower_half", "mouth"):
            raise ValueError(f"blend must be 'lower_half' or 'mouth', got {blend!r}")
        self.avatar = avatar
        self.crop_size = s = crop_size
        self.blend = blend
        n = avatar.loop_frames
        boxes = avatar.face_boxes
        if len({(int(b[2]), int(b[3])) for b in boxes}) != 1:
            raise ValueError("the avatar's face boxes must all have one size")
        fw, fh = int(boxes[0][2]), int(boxes[0][3])
        self._fw, self._fh = fw, fh
        # The blend region inside the face box (box-relative), even-aligned so chroma
        # rows and columns are whole.
        rx0, ry0, rx1, ry1 = self._region_in_box(avatar, blend)
        self._rel = (rx0, ry0, rx1, ry1)
        mask = self._mask(fw, fh, rx0, ry0, rx1, ry1, blend, feather)
        self._mask_roi = np.ascontiguousarray(mask[ry0:ry1, rx0:rx1], dtype=np.float32)
        # crop (S x S) -> region: rows/cols of the box resize matrices inside the region.
        self._ry = resize_matrix(fh, s)[ry0:ry1]
        self._rx = resize_matrix(fw, s)[rx0:rx1]
        down_y, down_x = resize_matrix(s, fh), resize_matrix(s, fw)
        self._inputs = np.empty((n, 6, s, s), dtype=np.float32)
        # Planar [3, h, w]: every per-frame step below is then a contiguous plane op.
        self._base_roi = np.empty((n, 3, ry1 - ry0, rx1 - rx0), dtype=np.float32)
        for i in range(n):
            x, y = int(boxes[i][0]), int(boxes[i][1])
            rgb = avatar.rgb(i)
            face = rgb[y : y + fh, x : x + fw].astype(np.float32) / 255.0
            ref = np.einsum("sh,hwc,tw->cst", down_y, face, down_x, optimize=True)
            self._inputs[i, 3:] = ref
            self._inputs[i, :3] = ref
            self._inputs[i, :3, s // 2 :] = 0.0  # the mouth half is what the model draws
            self._base_roi[i] = rgb[y + ry0 : y + ry1, x + rx0 : x + rx1].transpose(2, 0, 1)
        self._inputs.flags.writeable = False
        self._lock = threading.Lock()
        self._torch: _TorchState | None = None

    # -- what the model takes ----------------------------------------------------------

    def face_input(self, n: int) -> np.ndarray:
        """``[6, S, S]`` float32 for idle frame ``n``: masked crop ‖ reference crop."""
        return self._inputs[n % self.avatar.loop_frames]

    # -- per frame ---------------------------------------------------------------------

    def region(self, n: int) -> _Region:
        x, y = (int(v) for v in self.avatar.face_boxes[n % self.avatar.loop_frames][:2])
        rx0, ry0, rx1, ry1 = self._rel
        return _Region(x + rx0, y + ry0, rx1 - rx0, ry1 - ry0)

    def compose(self, n: int, crop: np.ndarray) -> VideoFrame:
        """The model's ``[3, S, S]`` crop (0..1) blended into idle frame ``n``."""
        if crop.shape != (3, self.crop_size, self.crop_size):
            raise ValueError(f"crop must be [3, {self.crop_size}, {self.crop_size}], "
                             f"got {list(crop.shape)}")
        i = n % self.avatar.loop_frames
        # [3,S,S] -> region [3, h, w] in 0..1: two small matrix products per channel.
        up = self._ry @ crop.astype(np.float32, copy=False) @ self._rx.T
        base = self._base_roi[i]
        rgb = (up * 255.0 - base) * self._mask_roi + base
        r, g, b = rgb[0], rgb[1], rgb[2]
        y = _Y[0] * r + _Y[1] * g + _Y[2] * b + 16.5
        # 2x2 means of each channel, by strided sums (far cheaper than a reshape-mean).
        q = (rgb[:, 0::2, 0::2] + rgb[:, 1::2, 0::2] + rgb[:, 0::2, 1::2]
             + rgb[:, 1::2, 1::2]) * 0.25
        qr, qg, qb = q[0], q[1], q[2]
        u = _U[0] * qr + _U[1] * qg + _U[2] * qb + 128.5
        v = _V[0] * qr + _V[1] * qg + _V[2] * qb + 128.5
        planes = [np.clip(p, 0, 255).astype(np.uint8) for p in (y, u, v)]
        return self._paste_planes(i, planes[0], np.stack(planes[1:]))

    # -- the same on a torch device ------------------------------------------------------

    def compose_batch_torch(self, indices: list[int], crops: torch.Tensor | np.ndarray,
                            device: str = "cpu") -> list[VideoFrame]:
        """Blend a batch of crops (a torch tensor ``[B,3,S,S]`` already on ``device``) on
        the device; one device-to-host copy per frame for the finished region."""
        st = self._torch_state(device)
        crops_t = crops if isinstance(crops, torch.Tensor) else torch.as_tensor(crops)
        crops_t = crops_t.to(st.device, torch.float32)
        up = st.ry @ crops_t @ st.rx.T  # [B, 3, h, w]
        idx = torch.as_tensor([i % self.avatar.loop_frames for i in indices],
                              device=st.device)
        base = st.base_roi[idx]
        rgb = (up * 255.0 - base) * st.mask + base
        yv = torch.clamp(torch.einsum("bchw,c->bhw", rgb, st.y) + 16.5, 0, 255
                         ).to(torch.uint8)
        q = (rgb[:, :, 0::2, 0::2] + rgb[:, :, 1::2, 0::2] + rgb[:, :, 0::2, 1::2]
             + rgb[:, :, 1::2, 1::2]) * 0.25
        uv = torch.clamp(torch.stack([torch.einsum("bchw,c->bhw", q, st.u),
                                      torch.einsum("bchw,c->bhw", q, st.v)], dim=1) + 128.5,
                         0, 255).to(torch.uint8)
        y_host, uv_host = yv.cpu().numpy(), uv.cpu().numpy()
        frames = []
        for k, n in enumerate(indices):
            frames.append(self._paste_planes(n % self.avatar.loop_frames, y_host[k],
                                             uv_host[k]))
        return frames

    def _paste_planes(self, i: int, y: np.ndarray, uv: np.ndarray) -> VideoFrame:
        av = self.avatar
        reg = self.region(i)
        out = av.frames_i420[i].copy()
        w, h = av.width, av.height
        flat = out.reshape(-1)
        flat[: w * h].reshape(h, w)[reg.y : reg.y + reg.h, reg.x : reg.x + reg.w] = y
        cy, cx, ch, cw = reg.y // 2, reg.x // 2, reg.h // 2, reg.w // 2
        flat[w * h : w * h + w * h // 4].reshape(h // 2, w // 2)[
            cy : cy + ch, cx : cx + cw] = uv[0]
        flat[w * h + w * h // 4 :].reshape(h // 2, w // 2)[cy : cy + ch, cx : cx + cw] = uv[1]
        out.flags.writeable = False
        return VideoFrame(out, w, h)

    def _torch_state(self, device: str) -> _TorchState:
        with self._lock:
            if self._torch is None or str(self._torch.device) != str(torch.device(device)):
                dev = torch.device(device)
                self._torch = _TorchState(
                    device=dev,
                    ry=torch.as_tensor(self._ry, device=dev),
                    rx=torch.as_tensor(self._rx, device=dev),
                    mask=torch.as_tensor(self._mask_roi, device=dev),
                    base_roi=torch.as_tensor(self._base_roi, device=dev),
                    y=torch.as_tensor(_Y, device=dev),
                    u=torch.as_tensor(_U, device=dev),
                    v=torch.as_tensor(_V, device=dev),
                )
            return self._torch

    # -- geometry ------------------------------------------------------------------------

    @staticmethod
    def _region_in_box(avatar: Avatar, blend: Blend) -> tuple[int, int, int, int]:
        fx, fy, fw, fh = (int(v) for v in avatar.face_boxes[0])
        if blend == "lower_half":
            x0, y0, x1, y1 = 0, fh // 2 - fh // 16, fw, fh
        else:
            mx, my, mw, mh = (int(v) for v in avatar.mouth_boxes[0])
            # The mouth opens downwards and widens: leave it room, then some feather.
            cx, cy = mx - fx + mw / 2, my - fy + mh / 2
            half_w, half_h = mw * 0.75, mh * 1.25
            x0, x1 = int(cx - half_w), int(np.ceil(cx + half_w))
            y0, y1 = int(cy - half_h * 0.8), int(np.ceil(cy + half_h * 1.2))
        x0, y0 = max(0, x0 - x0 % 2), max(0, y0 - y0 % 2)
        x1, y1 = min(fw - fw % 2, x1 + x1 % 2), min(fh - fh % 2, y1 + y1 % 2)
        return x0, y0, x1, y1

    @staticmethod
    def _mask(fw: int, fh: int, x0: int, y0: int, x1: int, y1: int, blend: Blend,
              feather: float) -> np.ndarray:
        yy, xx = np.mgrid[0:fh, 0:fw].astype(np.float32) + 0.5
        if blend == "lower_half":
            f = max(2.0, feather * fh)
            top = np.clip((yy - y0) / f, 0, 1)
            side = np.clip(np.minimum(xx - x0, x1 - xx) / f, 0, 1)
            bottom = np.clip((y1 - yy) / (f / 2), 0, 1)
            m = top * side * bottom
        else:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ax, ay = (x1 - x0) / 2, (y1 - y0) / 2
            r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
            # 1 inside, falling smoothly to 0 at the region's edge.
            t = np.clip((1.0 - r) / max(feather * 2, 1e-3), 0, 1)
            m = t * t * (3 - 2 * t)
        return m.astype(np.float32)

    def idle_rgb_region(self, n: int) -> np.ndarray:
        """The base pixels under the blend region (for tests and tools)."""
        return self._base_roi[n % self.avatar.loop_frames]


@functools.lru_cache(maxsize=16)
def compositor_for(avatar: Avatar, crop_size: int, blend: Blend = "lower_half") -> Compositor:
    """One compositor per (avatar, crop size, blend), shared by every renderer of the
    process: it only derives read-only data from the avatar, so sharing is safe."""
    return Compositor(avatar, crop_size, blend)


@dataclass
class _TorchState:
    device: torch.device
    ry: torch.Tensor
    rx: torch.Tensor
    mask: torch.Tensor
    base_roi: torch.Tensor
    y: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def region_rgb(frame: VideoFrame, x: int, y: int, w: int, h: int) -> np.ndarray:
    """RGB of a region of an I420 frame (for tests and the lip-sync check)."""
    rgb = i420_to_rgb(frame.data, frame.width, frame.height)
    return rgb[y : y + h, x : x + w]
