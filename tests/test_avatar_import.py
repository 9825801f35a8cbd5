"""Bring your own avatar: image or video in, a looping avatar out; bad input refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from rapido.gpu.avatar_import import AvatarImportError, import_avatar, parse_box
from rapido.pipeline.avatar import load_avatar, save_avatar


def write_png(path: Path, rgb: np.ndarray) -> Path:
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def portrait(w: int = 640, h: int = 480, shade: int = 0) -> np.ndarray:
    img = np.full((h, w, 3), 200, np.uint8)
    img[150:350, 220:420] = (230, 180, 150)  # the "face"
    img[300:320, 280:360] = (150 + shade, 60, 60)  # the "mouth"
    return img


def test_image_becomes_an_avatar(tmp_path: Path) -> None:
    src = write_png(tmp_path / "me.png", portrait())
    a = import_avatar(src, (220, 150, 200, 200), "me")
    assert (a.width, a.height, a.fps, a.loop_frames) == (854, 480, 25, 1)
    # 640x480 covers 854x480 at scale 854/640: the box scales and shifts with the crop.
    x, y, w, h = (int(v) for v in a.face_boxes[0])
    assert abs(w - 266) <= 2 and abs(h - 266) <= 2
    assert 0 <= x and x + w <= 854 and 0 <= y and y + h <= 480
    rgb = a.rgb(0)
    assert abs(int(rgb[y + h // 2, x + w // 2, 0]) - 230) < 12  # the face is inside the box
    saved = save_avatar(a, tmp_path / "avatars" / "me.npz")
    b = load_avatar(saved)
    assert b.name == "me" and np.array_equal(a.frames_i420, b.frames_i420)
    assert np.array_equal(a.face_boxes, b.face_boxes)


def test_video_loops_forwards_and_back(tmp_path: Path) -> None:
    frames = [portrait(shade=i * 8) for i in range(10)]
    src = write_video(tmp_path / "me.mp4", frames)
    a = import_avatar(src, (220, 150, 200, 200), "vid")
    assert a.loop_frames == 10 + 8  # 0..9 then 8..1: the seam never jumps
    assert np.array_equal(a.frames_i420[9 + 1], a.frames_i420[8])


@pytest.mark.parametrize(("box", "fragment"), [
    ((600, 150, 200, 200), "outside the 640x480 picture"),
    ((0, 0, 100, 100), "outside the 854x480 frame"),  # the centre crop cuts it off
])
def test_box_outside(tmp_path: Path, box: tuple[int, int, int, int], fragment: str) -> None:
    src = write_png(tmp_path / "p.png", portrait(w=400, h=480) if "854" in fragment
                    else portrait())
    with pytest.raises(AvatarImportError, match=fragment):
        import_avatar(src, box, "x")


def test_bad_files_names_and_boxes(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a picture")
    with pytest.raises(AvatarImportError, match=r"junk\.png"):
        import_avatar(junk, (0, 0, 10, 10), "x")
    with pytest.raises(AvatarImportError, match="no such file"):
        import_avatar(tmp_path / "missing.png", (0, 0, 10, 10), "x")
    src = write_png(tmp_path / "ok.png", portrait())
    for bad in ("has space", "", "default"):
        with pytest.raises(AvatarImportError):
            import_avatar(src, (220, 150, 200, 200), bad)
    for text in ("1,2,3", "a,b,c,d", "-1,0,10,10", "0,0,0,10"):
        with pytest.raises(AvatarImportError):
            parse_box(text)
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, something=np.zeros(3))
    with pytest.raises(ValueError, match="not an avatar file"):
        load_avatar(bad_npz)


def test_cli_import_and_errors(tmp_path: Path) -> None:
    src = write_png(tmp_path / "me.png", portrait())
    ok = subprocess.run([sys.executable, "-m", "rapido", "avatar", "import", str(src),
                         "--face-box", "220,150,200,200", "--name", "tutor",
                         "--avatars-dir", str(tmp_path / "av")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "av" / "tutor.npz").is_file()
    bad = subprocess.run([sys.executable, "-m", "rapido", "avatar", "import", str(src),
                          "--face-box", "620,150,200,200", "--name", "tutor2",
                          "--avatars-dir", str(tmp_path / "av")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "outside" in bad.stderr
    assert not (tmp_path / "av" / "tutor2.npz").exists()
