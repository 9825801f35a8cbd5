"""Wiring: the Config mapped onto each part's own settings, one provider per sink name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rapido.config import Config, ConfigError
from rapido.livekit.publisher import LiveKitPublisher
from rapido.metrics import Metrics
from rapido.pipeline.sinks import SINK_NAMES
from rapido.wiring import (
    batch_settings,
    engine_settings,
    http_settings,
    load_regions,
    model_settings,
    sink_providers,
)


async def test_every_sink_name_has_a_provider() -> None:
    providers = sink_providers(Config(), Metrics())
    try:
        assert tuple(providers) == SINK_NAMES
        assert isinstance(providers["livekit"], LiveKitPublisher)
    finally:
        for p in providers.values():
            await p.aclose()


def test_settings_carry_the_configured_values() -> None:
    cfg = Config(max_streams=7, fps=20, jitter_target_ms=200, jitter_start_ms=150,
                 api_key="k", public_url="https://x.example", max_batch=4, model_dir="/m",
                 region="eu")
    e = engine_settings(cfg)
    assert (e.fps, e.max_streams) == (20, 7)
    assert (e.jitter.target_ms, e.jitter.start_ms) == (200.0, 150.0)
    assert e.jitter.frame_samples == 48_000 // 20  # the frame follows the fps
    h = http_settings(cfg)
    assert h.auth_required and h.public_url == "https://x.example" and h.region == "eu"
    assert not h.cluster_redirect and http_settings(Config(cluster_redirect=True)).cluster_redirect
    assert batch_settings(cfg).max_batch == 4
    assert model_settings(cfg).model_dir == Path("/m")
    # Every field of the defaults' settings comes from the Config's defaults.
    assert dataclasses.asdict(engine_settings(Config()))["jitter"]["target_ms"] == 160.0


def test_regions_from_the_url_or_a_file(tmp_path: Path) -> None:
    assert load_regions(Config()) == []
    (one,) = load_regions(Config(livekit_url="ws://127.0.0.1:7880", region="eu"))
    assert (one.name, one.url) == ("eu", "ws://127.0.0.1:7880")
    good = tmp_path / "regions.toml"
    good.write_text('[[regions]]\nname = "a"\nurl = "wss://a.example"\ncapacity = 5\n')
    assert [r.name for r in load_regions(Config(livekit_regions_file=str(good)))] == ["a"]


@pytest.mark.parametrize(("text", "fragment"), [
    (None, "cannot read"),
    ("[[regions]\n", "cannot read"),
    ('[[regions]]\nname = "a"\n', "url"),
])
def test_a_bad_regions_file_names_the_key(tmp_path: Path, text: str | None,
                                          fragment: str) -> None:
    path = tmp_path / "regions.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_regions(Config(livekit_regions_file=str(path)))
    assert str(info.value).startswith("livekit_regions_file:")
    assert fragment in str(info.value)
