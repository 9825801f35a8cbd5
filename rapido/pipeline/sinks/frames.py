"""Pictures into PyAV frames for the encoders."""

from __future__ import annotations

import av
import numpy as np

from rapido.pipeline.media import VideoFrame


def to_av_frame(picture: VideoFrame) -> av.VideoFrame:
    """An I420 picture as an ``av.VideoFrame``, without copying where PyAV allows it.

    ``from_ndarray`` copies the picture while holding the GIL, which, with a dozen
    encoding streams, holds up the event loop. ``from_numpy_buffer`` wraps the array
    instead (PyAV keeps a reference; the encoders copy their input), but for yuv420p it
    derives the height as ``rows // 6 * 4``: right only when the height is a multiple
    of 4, so other even heights take the copying path."""
    data = picture.data
    if picture.height % 4 == 0:
        return av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(data), format="yuv420p",
                                               width=picture.width)
    return av.VideoFrame.from_ndarray(data, format="yuv420p")
