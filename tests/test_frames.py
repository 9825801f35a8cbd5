"""Pictures into PyAV frames: exact for every even size, zero-copy where possible."""

from __future__ import annotations

import numpy as np
import pytest

from rapido.pipeline.media import VideoFrame
from rapido.pipeline.sinks.frames import to_av_frame


@pytest.mark.parametrize(("width", "height"), [(854, 480), (480, 270), (64, 54), (64, 48)])
def test_every_even_size_round_trips_exactly(width: int, height: int) -> None:
    rng = np.random.default_rng(width * height)
    data = rng.integers(0, 256, (height * 3 // 2, width), dtype=np.uint8)
    frame = to_av_frame(VideoFrame(data, width, height))
    assert (frame.width, frame.height) == (width, height)
    assert np.array_equal(frame.to_ndarray(format="yuv420p"), data)


def test_the_frame_keeps_its_buffer_alive() -> None:
    data = np.full((720, 854), 77, np.uint8)
    frame = to_av_frame(VideoFrame(data, 854, 480))
    del data  # PyAV holds its own reference to the wrapped array
    assert int(frame.to_ndarray(format="yuv420p").mean()) == 77
