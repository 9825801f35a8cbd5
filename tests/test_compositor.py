"""Compositor: crops in, I420 frames out; the region outside the blend never changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rapido.gpu.compositor import Compositor, resize_matrix
from rapido.gpu.portrait import default_avatar
from rapido.pipeline.media import i420_to_rgb


@pytest.fixture(scope="module", params=["mouth", "lower_half"])
def comp(request: pytest.FixtureRequest) -> Compositor:
    return Compositor(default_avatar(), 96, request.param)


def test_resize_matrix_rows_sum_to_one() -> None:
    for n_out, n_in in ((96, 192), (192, 96), (7, 7), (5, 13)):
        m = resize_matrix(n_out, n_in)
        assert m.shape == (n_out, n_in)
        assert np.allclose(m.sum(axis=1), 1.0, atol=1e-5)
        assert (m >= 0).all()


def test_face_input_is_masked_then_reference(comp: Compositor) -> None:
    x = comp.face_input(3)
    assert x.shape == (6, 96, 96) and x.dtype == np.float32
    assert np.all(x[:3, 48:] == 0)
    assert np.array_equal(x[:3, :48], x[3:, :48])
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert x[3:, 48:].mean() > 0.3  # the reference keeps the mouth half
    with pytest.raises(ValueError):
        x[0, 0, 0] = 1.0  # shared by every stream: read-only


def test_reference_crop_back_changes_little_and_only_the_region(comp: Compositor) -> None:
    avatar = comp.avatar
    n = 10
    frame = comp.compose(n, comp.face_input(n)[3:])
    idle = avatar.idle_i420(n)
    assert frame.data.shape == idle.shape and not frame.data.flags.writeable
    diff = np.abs(frame.data.astype(int) - idle.astype(int))
    reg = comp.region(n)
    y = diff[: avatar.height]
    outside = y.copy()
    outside[reg.y : reg.y + reg.h, reg.x : reg.x + reg.w] = 0
    assert outside.max() == 0  # nothing outside the blend region moved
    assert y[reg.y : reg.y + reg.h, reg.x : reg.x + reg.w].mean() < 3.0  # resampling only


def test_a_red_crop_shows_in_the_middle_and_fades_at_the_edge(comp: Compositor) -> None:
    n = 0
    red = np.zeros((3, 96, 96), dtype=np.float32)
    red[0] = 1.0
    rgb = i420_to_rgb(comp.compose(n, red).data, comp.avatar.width, comp.avatar.height)
    idle = comp.avatar.rgb(n)
    reg = comp.region(n)
    cy, cx = reg.y + reg.h * 3 // 5, reg.x + reg.w // 2
    assert rgb[cy, cx, 0] > 200 and rgb[cy, cx, 1] < 80
    # The region's border pixels are (nearly) the idle picture: a feathered blend.
    edge = np.abs(rgb[reg.y, reg.x : reg.x + reg.w].astype(int)
                  - idle[reg.y, reg.x : reg.x + reg.w].astype(int))
    assert edge.mean() < 12


def test_torch_path_matches_numpy(comp: Compositor) -> None:
    rng = np.random.default_rng(0)
    crops = rng.random((3, 3, 96, 96), dtype=np.float32)
    frames = comp.compose_batch_torch([4, 5, 80], torch.as_tensor(crops))
    for k, n in enumerate([4, 5, 80]):
        want = comp.compose(n, crops[k]).data.astype(int)
        assert np.abs(frames[k].data.astype(int) - want).max() <= 1


def test_bad_crop_shape(comp: Compositor) -> None:
    with pytest.raises(ValueError, match=r"\[3, 96, 96\]"):
        comp.compose(0, np.zeros((3, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError):
        Compositor(default_avatar(), 8)
