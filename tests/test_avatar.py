from __future__ import annotations

import math

import av
import numpy as np
import pytest

from rapido.gpu.portrait import default_avatar, draw_default_avatar
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.media import VideoFrame, i420_to_rgb, rgb_to_i420


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return default_avatar()


def _luma(a: Avatar) -> np.ndarray:
    return a.frames_i420[:, : a.height].astype(np.int16)


def _crop(img: np.ndarray, box: np.ndarray, top: float = 0.0, bottom: float = 1.0) -> np.ndarray:
    x, y, w, h = (int(v) for v in box)
    return img[y + int(h * top) : y + int(h * bottom), x : x + w]


# Eyes sit in this horizontal band of the face box (the brows above, the nose below).
_EYE_BAND = (0.38, 0.58)


def _eye_dark_pixels(a: Avatar, luma: np.ndarray, i: int) -> int:
    # Iris, pupil and lid line are the only dark things in the band; a shut eye keeps
    # just the lid line, so this count collapses during a blink.
    return int((_crop(luma[i], a.face_boxes[i], *_EYE_BAND) < 90).sum())


def _lip_pixels(a: Avatar, luma: np.ndarray, i: int) -> int:
    # Lips (Y ~110) are much darker than skin (Y ~190); an opening mouth would add many.
    return int((_crop(luma[i], a.mouth_boxes[i]) < 150).sum())


def test_shapes_dtypes_and_read_only(avatar: Avatar) -> None:
    assert (avatar.width, avatar.height, avatar.fps) == (854, 480, 25)
    assert avatar.loop_frames == 75
    assert avatar.frames_i420.shape == (75, 720, 854)
    assert avatar.frames_i420.dtype == np.uint8
    assert avatar.face_boxes.shape == (75, 4) and avatar.face_boxes.dtype == np.int32
    assert avatar.mouth_boxes.shape == (75, 4) and avatar.mouth_boxes.dtype == np.int32
    for arr in (avatar.frames_i420, avatar.face_boxes, avatar.mouth_boxes):
        assert not arr.flags.writeable
    with pytest.raises(ValueError):
        avatar.idle_i420(0)[0, 0] = 1
    # The picture is not flat: a face, hair and a shirt span most of the range.
    y0 = avatar.idle_i420(0)[: avatar.height]
    assert int(y0.max()) - int(y0.min()) > 150


def test_idle_accessors_share_memory_and_wrap(avatar: Avatar) -> None:
    n = avatar.loop_frames
    assert avatar.idle_i420(3) is not None
    assert np.shares_memory(avatar.idle_i420(3), avatar.frames_i420)
    assert np.array_equal(avatar.idle_i420(3 + 2 * n), avatar.idle_i420(3))
    frame = avatar.idle_frame(5)
    assert isinstance(frame, VideoFrame)
    assert (frame.width, frame.height) == (854, 480)
    assert frame is avatar.idle_frame(5 + n)  # cached: no allocation per stream frame
    assert np.shares_memory(frame.data, avatar.frames_i420)
    assert not frame.data.flags.writeable
    rgb = avatar.rgb(5 + n)
    assert rgb.shape == (480, 854, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, avatar.rgb(5))


def test_loop_is_seamless(avatar: Avatar) -> None:
    y = _luma(avatar)
    n = avatar.loop_frames
    steps = np.array([np.abs(y[i + 1] - y[i]).mean() for i in range(n - 1)])
    seam = np.abs(y[0] - y[n - 1]).mean()
    far = max(np.abs(y[i] - y[0]).mean() for i in range(n))
    assert seam <= 2.0 * np.median(steps), (seam, np.median(steps))
    # ...while the loop does move: mid-loop frames are far from frame 0.
    assert far > 5.0 * seam, (far, seam)


def test_blink_changes_eyes_not_mouth(avatar: Avatar) -> None:
    y = _luma(avatar)
    n = avatar.loop_frames
    dark = np.array([_eye_dark_pixels(avatar, y, i) for i in range(n)])
    shut = int(np.argmin(dark))
    assert dark[0] > 100
    assert dark[shut] < 0.5 * dark[0], dark
    # A blink, not eyes shut for long: a few frames, and open at the loop seam.
    blinking = np.flatnonzero(dark < 0.8 * dark[0])
    assert 2 <= len(blinking) <= 8, blinking
    assert 0 not in blinking and n - 1 not in blinking

    eye0 = _crop(y[0], avatar.face_boxes[0], *_EYE_BAND)
    eye_diffs = np.array(
        [np.abs(_crop(y[i], avatar.face_boxes[i], *_EYE_BAND) - eye0).mean() for i in range(n)]
    )
    assert eye_diffs[shut] > 2.5 * np.median(eye_diffs), eye_diffs

    mouth0 = _crop(y[0], avatar.mouth_boxes[0])
    mouth_shut = _crop(y[shut], avatar.mouth_boxes[shut])
    assert np.abs(mouth_shut - mouth0).mean() < 0.4 * eye_diffs[shut]
    lips = np.array([_lip_pixels(avatar, y, i) for i in range(n)])
    assert lips.min() > 50  # the lip line is there...
    assert lips.max() < 1.3 * lips.min()  # ...and the mouth never opens


def test_head_moves_a_few_pixels_inside_frame(avatar: Avatar) -> None:
    for boxes in (avatar.face_boxes, avatar.mouth_boxes):
        x, y, w, h = boxes.T
        assert (x >= 0).all() and (y >= 0).all()
        assert (x + w <= avatar.width).all() and (y + h <= avatar.height).all()
        assert (w > 0).all() and (h > 0).all()
        assert 2 <= np.ptp(x) <= 20, np.ptp(x)
        assert 1 <= np.ptp(y) <= 12, np.ptp(y)
    fx, fy, fw, fh = avatar.face_boxes.T
    assert (abs(fw - fh) <= 0.2 * fw).all()  # square-ish, as Wav2Lip crops are
    assert 0.25 * avatar.height < fh.min() <= fh.max() < 0.6 * avatar.height
    mx, my, mw, mh = avatar.mouth_boxes.T
    assert (mx >= fx).all() and (mx + mw <= fx + fw).all()
    assert (my >= fy + fh // 2).all() and (my + mh <= fy + fh).all()  # lower half of face
    # The motion is smooth: the face box never jumps more than a pixel or two a frame.
    steps = np.abs(np.diff(avatar.face_boxes[:, :2], axis=0, append=avatar.face_boxes[:1, :2]))
    assert steps.max() <= 2


def test_colour_conversion_known_values() -> None:
    def i420_of(color: tuple[int, int, int]) -> tuple[int, int, int]:
        out = rgb_to_i420(np.full((2, 2, 3), color, dtype=np.uint8)).reshape(-1)
        return int(out[0]), int(out[4]), int(out[5])

    # BT.601 limited range, as ffmpeg converts.
    assert i420_of((255, 255, 255)) == (235, 128, 128)
    assert i420_of((0, 0, 0)) == (16, 128, 128)
    assert i420_of((255, 0, 0)) == (81, 90, 240)


def test_round_trip_is_close() -> None:
    rng = np.random.default_rng(1)
    # Constant 2x2 blocks: chroma subsampling then loses nothing, so only rounding is left.
    blocks = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    rgb = blocks.repeat(2, axis=0).repeat(2, axis=1)
    i420 = rgb_to_i420(rgb)
    assert i420.shape == (72, 80) and i420.dtype == np.uint8
    back = i420_to_rgb(i420, 80, 48)
    err = np.abs(back.astype(np.int16) - rgb)
    assert err.max() <= 3 and err.mean() < 1.0


def test_avatar_rgb_matches_its_i420(avatar: Avatar) -> None:
    for n in (0, 40):
        again = rgb_to_i420(avatar.rgb(n)).astype(np.int16)
        assert np.abs(again - avatar.idle_i420(n)).mean() < 1.0


def test_pyav_agrees(avatar: Avatar) -> None:
    frame = av.VideoFrame.from_ndarray(avatar.idle_i420(0), format="yuv420p")
    assert (frame.width, frame.height) == (854, 480)
    theirs = frame.to_ndarray(format="rgb24").astype(np.int16)
    ours = avatar.rgb(0)
    assert np.abs(theirs - ours).mean() < 2.0
    # And the forward direction: our conversion equals swscale's.
    enc = av.VideoFrame.from_ndarray(ours, format="rgb24").reformat(format="yuv420p")
    diff = np.abs(enc.to_ndarray().astype(np.int16) - rgb_to_i420(ours))
    assert diff[: avatar.height].mean() < 0.5 and diff.mean() < 1.0


def test_other_sizes_and_rates() -> None:
    a = draw_default_avatar(width=128, height=96, fps=10, loop_seconds=2.0)
    assert a.loop_frames == 20
    assert a.frames_i420.shape == (20, 144, 128)
    assert a.rgb(0).shape == (96, 128, 3)
    x, y, w, h = a.face_boxes.T
    assert (x >= 0).all() and (x + w <= 128).all() and (y >= 0).all() and (y + h <= 96).all()
    # Portrait frames keep the figure standing on the bottom edge: shirt, not wall, there.
    p = draw_default_avatar(width=96, height=160, fps=5, loop_seconds=1.0)
    bottom = p.rgb(0)[-1, p.width // 2].astype(int)
    top = p.rgb(0)[0, p.width // 2].astype(int)
    assert np.abs(bottom - top).sum() > 60


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 853},
        {"height": 481},
        {"width": 62},
        {"height": 32},
        {"fps": 0},
        {"fps": 61},
        {"loop_seconds": 0},
        {"loop_seconds": -1.0},
        {"loop_seconds": math.nan},
    ],
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        draw_default_avatar(**kwargs)  # type: ignore[arg-type]


def test_conversion_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="even"):
        rgb_to_i420(np.zeros((5, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="even"):
        rgb_to_i420(np.zeros((4, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        rgb_to_i420(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        i420_to_rgb(np.zeros((6, 4), dtype=np.uint8), 4, 6)


def test_default_avatar_is_cached(avatar: Avatar) -> None:
    assert default_avatar() is avatar
    assert default_avatar(854, 480, 25) is avatar
    assert default_avatar(width=854, fps=25) is avatar
    assert default_avatar(np.int64(854), 480, 25) is avatar  # type: ignore[arg-type]
    assert "frames_i420" not in repr(avatar)  # arrays stay out of logs
