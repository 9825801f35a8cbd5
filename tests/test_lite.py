"""rapido-lite: the parametric mouth renderer, checked on the real default avatar with
mels of synthetic speech (formant-synthesised vowels, noise fricatives, the bench's
speech-like signal) through both the project's exact Wav2Lip mel and a plain numpy one.

``python tests/test_lite.py [DIR]`` writes the gallery PNGs (default /tmp/lite_*.png).
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from rapido.gpu.models.lite import (
    MEL_OFFSET_FRAMES,
    LiteMouthModel,
    build_lite,
    export_onnx,
    mel_bin_centres,
    mouth_params,
)
from rapido.gpu.portrait import default_avatar
from rapido.pipeline.features import MelSpec, melspectrogram
from rapido.pipeline.speech import speech_like

SR = 16_000
FPS = 25
S = 96

# --------------------------------------------------------------------------- helpers


def _simple_mel(wav: np.ndarray) -> np.ndarray:
    """An independent, plain Wav2Lip-style mel (zero centre padding, as librosa >= 0.10),
    so the behaviour does not hinge on one implementation's details."""
    x = np.asarray(wav, np.float64)
    x = np.concatenate([x[:1], x[1:] - 0.97 * x[:-1]])
    x = np.pad(x, 400)
    n = 1 + (len(x) - 800) // 200
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(800) / 800)
    frames = np.stack([x[i * 200 : i * 200 + 800] * hann for i in range(n)])
    mag = np.abs(np.fft.rfft(frames, axis=1))
    fft_hz = np.linspace(0, SR / 2, 401)
    centres = mel_bin_centres()
    # Triangles between neighbouring centres (the first and last edge extend the spacing).
    lo = np.concatenate([[55.0], centres[:-1]])
    hi = np.concatenate([centres[1:], [7600.0]])
    up = (fft_hz[None] - lo[:, None]) / (centres - lo)[:, None]
    down = (hi[:, None] - fft_hz[None]) / (hi - centres)[:, None]
    fb = np.maximum(0, np.minimum(up, down)) * (2.0 / (hi - lo))[:, None]
    mel = mag @ fb.T
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * (db + 100) / 100 - 4, -4, 4).T.astype(np.float32)


def _exact_mel(wav: np.ndarray) -> np.ndarray:
    return melspectrogram(np.asarray(wav, np.float64))


MELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "features": _exact_mel,
    "simple": _simple_mel,
}


#: The windows the server gives this model: its manifest's offset.
SPEC = MelSpec(offset_frames=MEL_OFFSET_FRAMES)
#: Window frames that hold a video frame's own 40 ms (mel frames are 12.5 ms).
OWN = slice(-MEL_OFFSET_FRAMES * 16 // 5, -MEL_OFFSET_FRAMES * 16 // 5 + 4)


def _windows(mel: np.ndarray) -> torch.Tensor:
    """Per-video-frame model inputs [N, 1, 80, 16] as the server cuts them for this
    model (full windows, from the first frame whose window starts inside the audio)."""
    n = max(0, -MEL_OFFSET_FRAMES)
    out = []
    while SPEC.mel_start(n) + 16 <= mel.shape[1]:
        s = SPEC.mel_start(n)
        out.append(mel[:, s : s + 16])
        n += 1
    return torch.tensor(np.stack(out))[:, None]


# Formants (Hz) of a few vowels (Peterson & Barney, male speakers).
FORMANTS = {
    "aa": (730.0, 1090.0, 2440.0),
    "ee": (270.0, 2290.0, 3010.0),
    "oo": (300.0, 870.0, 2240.0),
    "oh": (570.0, 840.0, 2410.0),
    "eh": (530.0, 1840.0, 2480.0),
}


def _voice(formants: np.ndarray, level: np.ndarray, f0: float = 120.0) -> np.ndarray:
    """Harmonics of ``f0`` shaped by three resonances; ``formants`` [3] or [3, N] Hz,
    ``level`` the RMS (scalar or per sample)."""
    n = level.size if np.ndim(level) else formants.shape[-1]
    t = np.arange(n) / SR
    x = np.zeros(n)
    f_res = np.asarray(formants, np.float64).reshape(3, -1)
    for k in range(1, int(7800 / f0)):
        f = k * f0
        amp = np.full(f_res.shape[1], 1.0 / k)  # source and lip-radiation roll-off
        for fr, bw in zip(f_res, (80.0, 100.0, 120.0), strict=True):
            amp = amp * fr * fr / np.sqrt((fr * fr - f * f) ** 2 + (bw * f) ** 2)
        x += amp * np.sin(2 * np.pi * f * t + 0.3 * k * k)
    return x / np.sqrt(np.mean(x**2)) * level


def vowel(name: str, level: float = 0.1, seconds: float = 0.5) -> np.ndarray:
    n = int(seconds * SR)
    return _voice(np.array(FORMANTS[name])[:, None].repeat(n, 1), np.full(n, level))


def fricative(cut_hz: float = 3500.0, level: float = 0.05, seconds: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(1)
    n = int(seconds * SR)
    spec = np.fft.rfft(rng.normal(size=n))
    spec[np.fft.rfftfreq(n, 1 / SR) < cut_hz] *= 0.01
    x = np.fft.irfft(spec, n)
    return x / np.sqrt(np.mean(x**2)) * level


def _steady(wav: np.ndarray, mel: Callable[[np.ndarray], np.ndarray] = _exact_mel) -> torch.Tensor:
    """One mel window from the middle of a steady sound."""
    m = mel(wav)
    mid = m.shape[1] // 2 - 8
    return torch.tensor(m[:, mid : mid + 16])[None, None]


def _png(path: Path, rgb: np.ndarray) -> None:
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def reference_crop(frame: int = 0, size: int = S) -> torch.Tensor:
    """The face box of idle frame ``frame`` of the default avatar, area-resized, [1,3,S,S]."""
    av = default_avatar()
    x, y, w, h = (int(v) for v in av.face_boxes[frame])
    rgb = av.rgb(frame)[y : y + h, x : x + w].astype(np.float32) / 255.0
    return F.interpolate(torch.tensor(rgb).permute(2, 0, 1)[None], size=(size, size), mode="area")


def face_input(ref: torch.Tensor) -> torch.Tensor:
    """[B, 6, S, S]: the crop with its lower half zeroed, then the reference."""
    masked = ref.clone()
    masked[:, :, ref.shape[2] // 2 :] = 0.0
    return torch.cat([masked, ref], dim=1)


def silence(batch: int = 1) -> torch.Tensor:
    return torch.full((batch, 1, 80, 16), -4.0)


@pytest.fixture(scope="module")
def model() -> LiteMouthModel:
    return build_lite()


@pytest.fixture(scope="module")
def ref() -> torch.Tensor:
    return reference_crop()


def _mouth_region(m: LiteMouthModel, img: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = m.window
    return img[..., y0:y1, x0:x1]


def _luma(img: torch.Tensor) -> torch.Tensor:
    return 0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]


def _run(m: LiteMouthModel, mel: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(mel, face_input(ref.expand(mel.shape[0], -1, -1, -1)))


# --------------------------------------------------------------------------- output


def test_shape_and_range(model: LiteMouthModel, ref: torch.Tensor) -> None:
    rng = np.random.default_rng(0)
    mel = torch.tensor(rng.uniform(-4, 4, (5, 1, 80, 16)), dtype=torch.float32)
    out = _run(model, mel, ref)
    assert out.shape == (5, 3, S, S) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Out-of-contract values are clamped, not amplified.
    wild = _run(model, torch.full((1, 1, 80, 16), 50.0), ref)
    assert float(wild.min()) >= 0.0 and float(wild.max()) <= 1.0


def test_silence_is_the_idle_face(model: LiteMouthModel, ref: torch.Tensor) -> None:
    for frame in (0, 17, 40):  # the head sways and blinks; the mouth stays idle
        r = reference_crop(frame)
        out = _run(model, silence(), r)
        assert torch.allclose(out, r, atol=1e-6)
    # A quiet room (-60 dBFS hiss) keeps the mouth shut too.
    hiss = np.random.default_rng(2).normal(0, 0.001, SR)
    assert float(mouth_params(_steady(hiss))["opening"]) == 0.0


def test_only_the_mouth_window_changes_and_its_border_is_seamless(
    model: LiteMouthModel, ref: torch.Tensor
) -> None:
    x0, y0, x1, y1 = model.window
    worst_border = 0.0
    for o in (0.3, 1.0):
        for w, r in ((0.6, 1.0), (1.0, 0.0), (1.22, 0.0), (1.0, 1.0)):
            out = model.draw(ref, torch.tensor([o]), torch.tensor([w]), torch.tensor([r]))
            diff = (out - ref).abs()[0].amax(0)
            outside = diff.clone()
            outside[y0:y1, x0:x1] = 0
            assert float(outside.max()) == 0.0
            d = diff[y0:y1, x0:x1]
            border = torch.cat([d[0], d[-1], d[:, 0], d[:, -1]])
            worst_border = max(worst_border, float(border.max()))
    assert worst_border < 1.0 / 255  # no edge where the redrawn window meets the face


def test_loud_speech_opens_a_dark_mouth(model: LiteMouthModel, ref: torch.Tensor) -> None:
    mel = _steady(vowel("aa", level=0.3))  # -10 dBFS
    p = mouth_params(mel)
    assert float(p["opening"]) > 0.8
    out = _run(model, mel, ref)
    before, after = _mouth_region(model, ref), _mouth_region(model, out)
    assert float((after - before).abs().mean()) > 0.03
    # The interior is dark: many pixels far darker than anything in the idle mouth.
    idle_min = float(_luma(before).min())
    dark = _luma(after) < 0.25
    assert idle_min > 0.35 and int(dark.sum()) >= 25
    # ... and in the middle of the mouth, below the idle line.
    ys, xs = torch.nonzero(dark[0], as_tuple=True)
    u = model.u.flatten()[xs]
    v = model.v.flatten()[ys]
    assert abs(float(u.mean())) < 2.0 and 2.0 < float(v.mean()) < 16.0
    # Teeth: a light band at the top of the opening.
    assert int((_luma(after) > 0.9).sum()) >= 10


# --------------------------------------------------------------------------- parameters


def test_opening_is_monotonic_in_loudness() -> None:
    base = _steady(vowel("aa", level=0.1))
    shifts = torch.linspace(-4.0, 3.0, 57)
    mels = torch.clamp(base + shifts.reshape(-1, 1, 1, 1), -4.0, 4.0)
    p = mouth_params(mels)
    loud, opening = p["loudness"], p["opening"]
    assert torch.all(loud[1:] >= loud[:-1])
    assert torch.all(opening[1:] >= opening[:-1] - 1e-6)
    assert float(opening[0]) == 0.0 and float(opening[-1]) == 1.0
    # Strictly rising between the knee and full: the mouth tracks level, not a switch.
    mid = (opening > 0.02) & (opening < 0.98)
    assert int(mid.sum()) >= 10 and torch.all(torch.diff(opening[mid]) > 0)
    # Level in dBFS: the same vowel louder opens wider.
    ops = [
        float(mouth_params(_steady(vowel("aa", level=lv)))["opening"]) for lv in (0.03, 0.1, 0.3)
    ]
    assert ops[0] < ops[1] < ops[2]


@pytest.mark.parametrize("mel_name", sorted(MELS))
def test_width_and_rounding_follow_spectral_shape(mel_name: str) -> None:
    mel = MELS[mel_name]
    for level in (0.1, 0.3):  # -20 and -10 dBFS
        p = {
            name: {k: float(v) for k, v in mouth_params(_steady(vowel(name, level), mel)).items()}
            for name in FORMANTS
        }
        s = {k: float(v) for k, v in mouth_params(_steady(fricative(level=level / 2), mel)).items()}
        # "ee" and "s" spread the lips; "oo"/"oh" purse and round them; "aa" is neutral.
        assert p["ee"]["width"] > 1.15 and s["width"] > 1.15
        assert p["oo"]["width"] < 0.7 and p["oh"]["width"] < 0.7
        assert 0.95 <= p["aa"]["width"] <= 1.05
        assert p["oo"]["rounding"] > 0.9 and p["oh"]["rounding"] > 0.9
        for name in ("aa", "ee", "eh"):
            assert p[name]["rounding"] < 0.05
        assert s["rounding"] == 0.0
        # A fricative barely drops the jaw, unlike a vowel at the same loudness.
        assert s["opening"] < 0.5 * p["aa"]["opening"]


def test_bright_and_dark_synthetic_spectra() -> None:
    """Hand-made mel windows: energy tilted to the top bins vs kept in the bottom ones."""
    hz = torch.tensor(mel_bin_centres(), dtype=torch.float32).reshape(1, 1, 80, 1)
    bright = torch.where(hz > 2000, 1.0, -2.5).expand(1, 1, 80, 16)
    dark = torch.where(hz < 1000, 1.5, -3.5).expand(1, 1, 80, 16)
    flat = torch.full((1, 1, 80, 16), -0.8)
    pb, pd, pf = mouth_params(bright), mouth_params(dark), mouth_params(flat)
    assert float(pb["width"]) > float(pf["width"]) > float(pd["width"])
    assert float(pd["rounding"]) > 0.9 > 0.05 > float(pb["rounding"])
    # Silence is neutral: idle width, no rounding.
    ps = mouth_params(silence())
    assert float(ps["width"]) == 1.0 and float(ps["rounding"]) == 0.0


def test_mouth_params_match_the_model(model: LiteMouthModel) -> None:
    rng = np.random.default_rng(3)
    mel = torch.tensor(rng.uniform(-4, 2, (4, 1, 80, 16)), dtype=torch.float32)
    a, b = mouth_params(mel), model.params(mel)
    assert set(a) == {"loudness", "opening", "width", "rounding"}
    for k in a:
        assert a[k].shape == (4,)
        assert torch.allclose(a[k], b[k])


# --------------------------------------------------------------------------- timing


def _speech_and_silence(seconds_each: float = 0.6, cycles: int = 4) -> np.ndarray:
    speech = speech_like(seconds_each, rate=SR, seed=5).astype(np.float64) / 32768.0
    gap = np.zeros(int(0.4 * SR))
    return np.concatenate([np.concatenate([speech, gap]) for _ in range(cycles)])


@pytest.mark.parametrize("mel_name", sorted(MELS))
def test_mouth_change_follows_loudness(
    model: LiteMouthModel, ref: torch.Tensor, mel_name: str
) -> None:
    mel = MELS[mel_name](_speech_and_silence())
    windows = _windows(mel)
    out = _run(model, windows, ref)
    change = (_mouth_region(model, out) - _mouth_region(model, ref)).abs().mean(dim=(1, 2, 3))
    # Loudness of each video frame's own 40 ms (mel frames 3..6 of its window at -1).
    loud = ((windows[:, 0, :, OWN] + 4) / 8).mean(dim=(1, 2))
    r = np.corrcoef(change.numpy(), loud.numpy())[0, 1]
    assert r >= 0.8, r
    # Silent stretches show the idle face exactly; speech opens the mouth.
    assert float(change[loud == 0].max()) == 0.0
    assert float(change.max()) > 0.03


def test_parameters_move_smoothly_on_a_continuous_signal() -> None:
    """A voice gliding ee -> aa -> oo while swelling and fading: every parameter sweeps a
    wide range, but no frame jumps."""
    n = 3 * SR
    t = np.linspace(0.0, 1.0, n)
    path = np.array([FORMANTS["ee"], FORMANTS["aa"], FORMANTS["oo"]])  # [3 vowels, 3]
    seg = np.clip(t * 2, 0, 2)
    i = np.minimum(seg.astype(int), 1)
    frac = seg - i
    formants = (path[i] * (1 - frac)[:, None] + path[i + 1] * frac[:, None]).T
    level = 0.02 + 0.2 * np.sin(np.pi * t) ** 2
    p = mouth_params(_windows(_exact_mel(_voice(formants, level))))
    for key in ("opening", "width", "rounding"):
        x = p[key].numpy()
        span = float(x.max() - x.min())
        step = float(np.abs(np.diff(x)).max())
        assert span > 0.35, (key, span)
        assert step < 0.15 * max(span, 1.0), (key, step)


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_bytes(model: LiteMouthModel, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("lite") / "lite.onnx"
    export_onnx(model, path)
    return path.read_bytes()


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_matches_torch(
    model: LiteMouthModel, ref: torch.Tensor, onnx_bytes: bytes, batch: int
) -> None:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["mel", "face"]
    assert [o.name for o in sess.get_outputs()] == ["out"]
    rng = np.random.default_rng(batch)
    # Silence, speech and random windows, over crops from different idle frames.
    mel = rng.uniform(-4, 3, (batch, 1, 80, 16)).astype(np.float32)
    mel[0] = -4.0
    if batch > 1:
        mel[1] = _steady(vowel("oo", 0.2)).numpy()[0]
    refs = torch.cat([reference_crop(f) for f in range(0, 5 * batch, 5)])
    face = face_input(refs).numpy()
    (got,) = sess.run(["out"], {"mel": mel, "face": face})
    with torch.no_grad():
        want = model(torch.tensor(mel), torch.tensor(face)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_is_deterministic(model: LiteMouthModel, onnx_bytes: bytes, tmp_path: Path) -> None:
    again = tmp_path / "again.onnx"
    export_onnx(build_lite(), again)
    assert again.read_bytes() == onnx_bytes


def test_other_crop_sizes(ref: torch.Tensor) -> None:
    m = build_lite(128)
    r = reference_crop(size=128)
    assert torch.allclose(_run(m, silence(), r), r, atol=1e-6)
    out = _run(m, _steady(vowel("aa", 0.2)), r)
    assert out.shape == (1, 3, 128, 128)
    assert int((_luma(_mouth_region(m, out)) < 0.25).sum()) >= 45
    with pytest.raises(ValueError):
        build_lite(8)


# --------------------------------------------------------------------------- gallery

GALLERY = {
    "closed": (0.0, 1.0, 0.0),
    "half": (0.5, 1.0, 0.0),
    "open": (1.0, 1.0, 0.0),
    "round": (0.6, 0.62, 1.0),
    "wide": (0.35, 1.22, 0.0),
}


def save_gallery(out_dir: Path) -> list[Path]:
    """Render the gallery mouths and paste each into the full avatar frame the way the
    compositor does (upscaled into the face box, feathered blend around the mouth);
    writes ``lite_<name>.png`` and ``lite_montage.png`` (the faces side by side)."""
    av = default_avatar()
    m = build_lite()
    x, y, w, h = (int(v) for v in av.face_boxes[0])
    frame = av.rgb(0).astype(np.float32) / 255.0
    r = reference_crop()
    # Feathered mask around the redrawn window, in face-box pixels.
    x0, y0, x1, y1 = m.window
    mask = torch.zeros(1, 1, S, S)
    mask[..., y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = 1.0
    mask = F.avg_pool2d(mask, 3, 1, 1)
    mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    paths, faces = [], []
    for name, (o, wd, rd) in GALLERY.items():
        out = m.draw(r, torch.tensor([o]), torch.tensor([wd]), torch.tensor([rd]))
        up = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)[0]
        img = frame.copy()
        box = img[y : y + h, x : x + w]
        box += (up.permute(1, 2, 0).numpy() - box) * mask.numpy()[..., None]
        path = out_dir / f"lite_{name}.png"
        _png(path, np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
        paths.append(path)
        faces.append(img[y + 60 : y + h, x + 30 : x + w - 30])
    montage = out_dir / "lite_montage.png"
    zoomed = np.concatenate(faces, axis=1).repeat(2, 0).repeat(2, 1)
    _png(montage, np.clip(zoomed * 255 + 0.5, 0, 255).astype(np.uint8))
    return [*paths, montage]


def test_gallery_renders(tmp_path: Path) -> None:
    paths = save_gallery(tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


if __name__ == "__main__":
    for p in save_gallery(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")):
        print(p)
