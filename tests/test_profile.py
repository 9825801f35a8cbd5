"""``bench --profile``: stacks given to stages, the GIL table, the flame graph, and a real
py-spy recording of a bench run."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from rapido.bench.profile import (
    LOOP,
    classify,
    flame_svg,
    gil_table,
    parse_collapsed,
    table_text,
)
from rapido.bench.run import run_once
from rapido.bench.standin import StandinModel
from rapido.config import Config

R = "/work/x/rapido"
RUN = "_run_module_as_main (<frozen runpy>:198);Runner.run (/usr/lib/asyncio/runners.py:118)"


@pytest.mark.parametrize(("inner", "stage"), [
    (f"AudioJitterBuffer.pull ({R}/pipeline/jitter.py:210)", "jitter pull"),
    (f"MelStream.window ({R}/pipeline/features.py:400)", "mel"),
    (f"Compositor.compose_batch ({R}/gpu/compositor.py:180)", "compositing"),
    (f"rgb_to_i420 ({R}/pipeline/media.py:80)", "colour conversion"),
    (f"VideoFrame.y ({R}/pipeline/media.py:45)", "clock pass"),
    (f"StreamSession.enqueue_utterance ({R}/pipeline/session.py:230)", "feed/resample"),
    (f"StreamSession.tick ({R}/pipeline/session.py:330)", "clock pass"),
    (f"StandinBackend.run ({R}/bench/standin.py:60)", "model call"),
    (f"MicroBatcher._serve ({R}/gpu/batcher.py:250)", "batch assembly"),
    (f"WebRtcSink.write ({R}/webrtc/sink.py:300)", "sink hand-off"),
    (f"Engine._tick ({R}/engine.py:200)", "clock pass"),
    (f"_drive ({R}/bench/run.py:190)", "bench driver"),
    (f"wire ({R}/wiring.py:10)", "other rapido"),
])
def test_the_innermost_rapido_frame_names_the_stage(inner: str, stage: str) -> None:
    # Library frames inside it (numpy, asyncio) do not change the stage.
    assert classify(f"{RUN};{inner};sum (/venv/lib/python3.11/site-packages/numpy/x.py:3)"
                    ) == stage


def test_stacks_without_rapido_are_the_event_loop() -> None:
    assert classify(f"{RUN};select (/usr/lib/python3.11/selectors.py:468)") == LOOP
    # A package of the same name installed elsewhere is not ours.
    assert classify("f (/venv/lib/python3.11/site-packages/x/rapido/engine.py:1)") == LOOP
    assert classify("garbled") == LOOP


def test_collapsed_stacks_are_counted_per_stage_and_bad_lines_refused() -> None:
    text = (f"{RUN};A.pull ({R}/pipeline/jitter.py:1) 7\n"
            f"{RUN};B.window ({R}/pipeline/features.py:2) 3\n\n"
            f"{RUN};A.pull ({R}/pipeline/jitter.py:9) 2\n"
            f"{RUN} 4\n")
    assert parse_collapsed(text) == Counter({"jitter pull": 9, "mel": 3, LOOP: 4})
    with pytest.raises(ValueError, match="line 1 is not 'stack count'"):
        parse_collapsed("no count here\n")


def test_the_table_is_gil_time_per_speaking_stream_frame() -> None:
    rows = gil_table(Counter({"mel": 30, LOOP: 10}), rate_hz=100, speaking_frames=2000)
    by = {r.stage: r for r in rows}
    assert [r.stage for r in rows] == ["mel", LOOP, "total"]
    assert by["mel"].gil_ms == 300.0 and by["mel"].share == 0.75
    assert by["mel"].us_per_speaking_frame == 150.0  # 0.3 s over 2000 frames
    assert by["total"].samples == 40 and by["total"].us_per_speaking_frame == 200.0
    assert gil_table(Counter({"mel": 1}), rate_hz=100, speaking_frames=0
                     )[-1].us_per_speaking_frame is None
    assert "µs / speaking stream-frame" in table_text(rows)


def test_the_flame_graph_is_an_svg_with_a_tooltip_per_frame(tmp_path: Path) -> None:
    text = (f"main (/m.py:1);A.pull ({R}/pipeline/jitter.py:1) 600\n"
            f"main (/m.py:1);B.window ({R}/pipeline/features.py:2) 399\n"
            f"main (/m.py:1);tiny (/t.py:3) 1\n")
    svg = flame_svg(text, tmp_path / "f.svg", title="GIL <held>")
    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    tips = [t.text or "" for t in root.iter(f"{ns}title")]
    assert any(t.startswith("main (/m.py:1): 1000 samples, 100.0 %") for t in tips)
    assert any("A.pull" in t and "600 samples, 60.0 %" in t for t in tips)
    assert not any("tiny" in t for t in tips)  # under 0.3 %: left out
    assert "GIL <held> (1000 samples)" in "".join(root.itertext())


async def test_a_bench_run_records_where_the_gil_went(model_dir: Path, tmp_path: Path
                                                      ) -> None:
    config = dataclasses.replace(Config(), model_dir=str(model_dir),
                                 recordings_dir=str(tmp_path / "rec"),
                                 avatars_dir=str(tmp_path / "avatars"), log_level="warning")
    out = tmp_path / "gil.txt"
    r = await run_once(config, 2, 2.0, 0.5, 1.0, "null", standin=StandinModel(2.0),
                       profile=out)
    assert r.gil_stages is not None and r.gil_us_per_speaking_frame is not None
    total = r.gil_stages[-1]
    assert total["stage"] == "total" and total["samples"] > 0
    assert sum(g["samples"] for g in r.gil_stages[:-1]) == total["samples"]
    assert sum(parse_collapsed(out.read_text()).values()) == total["samples"]
    # The streams' own work shows up: the clock pass, the mel, the jitter buffer.
    stages = {g["stage"] for g in r.gil_stages}
    assert stages & {"clock pass", "mel", "jitter pull", "batch assembly"}, stages
