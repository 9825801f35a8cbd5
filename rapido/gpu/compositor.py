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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rapido.gpu.manifest import BlendRegion
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.media import VideoFrame, i420_to_rgb

if TYPE_CHECKING:
    import torch

Blend = BlendRegion  # the part of the face a model redraws (its manifest says which)

# BT.601 limited range, as rapido.pipeline.media.rgb_to_i420 (ffmpeg's default for yuv420p).
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
        self._prepare_folded(s)
        self._lock = threading.Lock()
        self._torch: _TorchState | None = None
        # Pinned host buffers by batch shape, per thread (batches may run in several).
        self._host_bufs = threading.local()

    def _prepare_folded(self, s: int) -> None:
        """The per-frame maths with everything avatar-only folded in ahead of time.

        Blend and colour conversion are linear, so for the model's crop ``c``::

            Y = 255 m * (Ry (Yw . c) Rx^T) + [Yw . (1 - m) base + 16.5]
            U = 255 m2 * (Ry2 (Uw . c) Rx2^T) + [mean2x2(Uw . (1 - m) base) + 128.5]

        The bracketed parts depend only on the avatar frame and are stored per loop frame;
        ``Ry2``/``Rx2`` are the region's resize matrices already averaged over row/column
        pairs (the 2x2 chroma mean) and ``m2`` is the mask's 2x2 mean. Only the crop rows
        and columns the region reads are kept. Per frame that leaves one 3x3 colour matrix
        on the crop, two small matrix products per plane and a multiply-add."""
        ry, rx, mask = self._ry, self._rx, self._mask_roi
        rows = np.flatnonzero(ry.any(axis=0))
        cols = np.flatnonzero(rx.any(axis=0))
        self._crop_rows = slice(int(rows[0]), int(rows[-1]) + 1)
        self._crop_cols = slice(int(cols[0]), int(cols[-1]) + 1)
        ry = ry[:, self._crop_rows]
        rx = rx[:, self._crop_cols]
        self._ry_y = np.ascontiguousarray(ry)
        self._rxt_y = np.ascontiguousarray(rx.T)
        self._ry_c = np.ascontiguousarray((ry[0::2] + ry[1::2]) * 0.5)
        self._rxt_c = np.ascontiguousarray(((rx[0::2] + rx[1::2]) * 0.5).T)
        self._colour = np.stack([_Y, _U, _V]).astype(np.float32)  # [3, 3]
        m2 = (mask[0::2, 0::2] + mask[1::2, 0::2] + mask[0::2, 1::2] + mask[1::2, 1::2]) / 4
        self._m255_y = (255.0 * mask).astype(np.float32)
        self._m255_c = (255.0 * m2).astype(np.float32)
        keep = self._base_roi * (1.0 - mask)  # [n, 3, h, w]: what stays of the idle frame
        self._y_base = (np.einsum("c,nchw->nhw", _Y, keep) + 16.5).astype(np.float32)
        uv = np.einsum("kc,nchw->nkhw", self._colour[1:], keep)
        self._uv_base = ((uv[..., 0::2, 0::2] + uv[..., 1::2, 0::2] + uv[..., 0::2, 1::2]
                          + uv[..., 1::2, 1::2]) * 0.25 + 128.5).astype(np.float32)
        # Where the region goes in a flat I420 frame, per loop frame.
        av = self.avatar
        w, h = av.width, av.height
        rx0, ry0, rx1, ry1 = self._rel
        self._paste: list[tuple[slice, slice, slice, slice]] = []
        for i in range(av.loop_frames):
            x, y = (int(v) for v in av.face_boxes[i][:2])
            x0, y0 = x + rx0, y + ry0
            self._paste.append((slice(y0, y0 + ry1 - ry0), slice(x0, x0 + rx1 - rx0),
                                slice(y0 // 2, y0 // 2 + (ry1 - ry0) // 2),
                                slice(x0 // 2, x0 // 2 + (rx1 - rx0) // 2)))
        self._y_size, self._c_size = w * h, (w // 2) * (h // 2)

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
        return self.compose_batch([n], crop[None])[0]

    def compose_batch(self, indices: Sequence[int], crops: np.ndarray) -> list[VideoFrame]:
        """``crops[k]`` (``[B, 3, S, S]``, 0..1) blended into idle frame ``indices[k]``:
        the whole batch in a handful of numpy calls (see :meth:`_prepare_folded`)."""
        s = self.crop_size
        if crops.ndim != 4 or crops.shape[0] != len(indices) or crops.shape[1:] != (3, s, s):
            raise ValueError(f"crops must be [{len(indices)}, 3, {s}, {s}], "
                             f"got {list(crops.shape)}")
        loop = self.avatar.loop_frames
        idx = [n % loop for n in indices]
        c = crops[:, :, self._crop_rows, self._crop_cols].astype(np.float32, copy=False)
        b, _, ch, cw = c.shape
        # Colour first (it commutes with the resize): [3,3] @ [B, 3, ch*cw].
        yuv = (self._colour @ c.reshape(b, 3, ch * cw)).reshape(b, 3, ch, cw)
        y = self._ry_y @ yuv[:, 0] @ self._rxt_y
        y *= self._m255_y
        y += self._y_base[idx]
        uv = self._ry_c @ yuv[:, 1:] @ self._rxt_c
        uv *= self._m255_c
        uv += self._uv_base[idx]
        y8 = np.clip(y, 0, 255, out=y).astype(np.uint8)
        uv8 = np.clip(uv, 0, 255, out=uv).astype(np.uint8)
        return [self._paste_planes(i, y8[k], uv8[k]) for k, i in enumerate(idx)]

    # -- the same on a torch device ------------------------------------------------------

    def compose_batch_torch(self, indices: list[int], crops: torch.Tensor | np.ndarray,
                            device: str = "cpu") -> list[VideoFrame]:
        """Blend a batch of crops (a torch tensor ``[B,3,S,S]``, best already on
        ``device``) on the device, colour conversion included; the finished regions of
        the whole batch come down in one copy, into a pinned host buffer on CUDA (reused
        batch to batch, per thread), so the copy is a DMA that needs no staging."""
        import torch  # loads only where a torch backend runs (rapido.gpu.backends)

        st = self._torch_state(device)
        crops_t = crops if isinstance(crops, torch.Tensor) else torch.as_tensor(crops)
        crops_t = crops_t.to(st.device, torch.float32)
        loop = self.avatar.loop_frames
        idx_list = [i % loop for i in indices]
        idx = torch.as_tensor(idx_list, device=st.device)
        c = crops_t[:, :, self._crop_rows, self._crop_cols]
        yuv = torch.einsum("kc,bchw->bkhw", st.colour, c)
        yv = torch.clamp(st.ry_y @ yuv[:, 0] @ st.rxt_y * st.m255_y + st.y_base[idx], 0, 255
                         ).to(torch.uint8)
        uv = torch.clamp(st.ry_c @ yuv[:, 1:] @ st.rxt_c * st.m255_c + st.uv_base[idx], 0,
                         255).to(torch.uint8)
        b = len(idx_list)
        planes = torch.cat([yv.reshape(b, -1), uv.reshape(b, -1)], dim=1)
        host = self._download(planes)
        n_y = yv[0].numel()
        y_host = host[:, :n_y].reshape(yv.shape)
        uv_host = host[:, n_y:].reshape(uv.shape)
        return [self._paste_planes(i, y_host[k], uv_host[k]) for k, i in enumerate(idx_list)]

    def _download(self, planes: torch.Tensor) -> np.ndarray:
        """One device-to-host copy of a batch's planes (the pasting copies out of it)."""
        import torch

        if planes.device.type != "cuda":
            return planes.numpy()
        bufs: dict[tuple[int, ...], torch.Tensor] = self._host_bufs.__dict__.setdefault(
            "by_shape", {})
        host = bufs.get(tuple(planes.shape))
        if host is None:
            host = bufs[tuple(planes.shape)] = torch.empty(
                planes.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(planes, non_blocking=True)
        torch.cuda.current_stream(planes.device).synchronize()
        return host.numpy()

    def _paste_planes(self, i: int, y: np.ndarray, uv: np.ndarray) -> VideoFrame:
        av = self.avatar
        w, h = av.width, av.height
        ys, xs, cys, cxs = self._paste[i]
        out = av.frames_i420[i].copy()
        flat = out.reshape(-1)
        n_y, n_c = self._y_size, self._c_size
        flat[:n_y].reshape(h, w)[ys, xs] = y
        flat[n_y : n_y + n_c].reshape(h // 2, w // 2)[cys, cxs] = uv[0]
        flat[n_y + n_c :].reshape(h // 2, w // 2)[cys, cxs] = uv[1]
        out.flags.writeable = False
        return VideoFrame(out, w, h)

    def _torch_state(self, device: str) -> _TorchState:
        import torch

        with self._lock:
            if self._torch is None or str(self._torch.device) != str(torch.device(device)):
                dev = torch.device(device)
                self._torch = _TorchState(
                    device=dev,
                    colour=torch.as_tensor(self._colour, device=dev),
                    ry_y=torch.as_tensor(self._ry_y, device=dev),
                    rxt_y=torch.as_tensor(self._rxt_y, device=dev),
                    ry_c=torch.as_tensor(self._ry_c, device=dev),
                    rxt_c=torch.as_tensor(self._rxt_c, device=dev),
                    m255_y=torch.as_tensor(self._m255_y, device=dev),
                    m255_c=torch.as_tensor(self._m255_c, device=dev),
                    y_base=torch.as_tensor(self._y_base, device=dev),
                    uv_base=torch.as_tensor(self._uv_base, device=dev),
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
    colour: torch.Tensor
    ry_y: torch.Tensor
    rxt_y: torch.Tensor
    ry_c: torch.Tensor
    rxt_c: torch.Tensor
    m255_y: torch.Tensor
    m255_c: torch.Tensor
    y_base: torch.Tensor
    uv_base: torch.Tensor


def region_rgb(frame: VideoFrame, x: int, y: int, w: int, h: int) -> np.ndarray:
    """RGB of a region of an I420 frame (for tests and the lip-sync check)."""
    rgb = i420_to_rgb(frame.data, frame.width, frame.height)
    return rgb[y : y + h, x : x + w]
