"""``rapido bench`` end to end: the CLI as a subprocess, its JSON, --compare, --http
against a real server, --plot, the cost figure, Ctrl-C and bad arguments."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rapido.bench import report
from rapido.gpu.registry import resolve_model

# 3 s: the measured window (0.5-3.5 s) holds the second utterance's onset (utterances
# are 3 s; onsets count those begun in the window).
SMOKE = ["--streams", "2", "--duration", "3", "--warmup", "0.5"]


@pytest.fixture(scope="module")
def bench_env(model_dir: Path) -> dict[str, str]:
    """The environment of every bench subprocess: one model cache for the module (the
    built-in model is built here, once, not by racing subprocesses)."""
    resolve_model("rapido-lite", model_dir)
    env = dict(os.environ)
    env.update(RAPIDO_MODEL_DIR=str(model_dir), RAPIDO_LOG_LEVEL="warning",
               PYTHONUNBUFFERED="1")
    return env


def _bench(env: dict[str, str], *args: str, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapido", "bench", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _bench_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = _bench(env, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def _check_run(r: dict[str, Any], streams: int) -> None:
    assert r["streams"] == streams
    assert 24.0 <= r["fps_min"] <= r["fps_median"] <= 26.0
    for q in ("p50", "p95", "p99"):
        assert r[f"lateness_{q}_ms"] >= 0
        assert r[f"lateness_exact_{q}_ms"] >= 0
    assert r["lateness_exact_p50_ms"] <= r["lateness_exact_p95_ms"] <= r["lateness_exact_p99_ms"]
    # The histogram figure is a bucket's upper bound: never below the exact quantile.
    assert r["lateness_exact_p99_ms"] <= r["lateness_p99_ms"] + 1e-6
    assert r["frames_sampled"] > 0
    assert r["onsets"] >= 1
    assert 0 < r["onset_p50_ms"] < 2000 and r["onset_p50_ms"] <= r["onset_p95_ms"]
    assert r["underruns"] >= 0 and len(r["underruns_by_session"]) == streams
    assert all(u >= 0 for u in r["underruns_by_session"])
    assert r["underruns_per_session"] >= 0
    assert r["cpu_percent"] > 0 and r["cpu_ms_per_stream_second"] > 0
    # The loop thread's share is part of the process's, and it did the streams' work.
    assert 0 < r["loop_cpu_percent"] <= r["cpu_percent"] + 1.0
    assert r["loop_cpu_us_per_speaking_frame"] > 0
    assert r["batches"] > 0
    assert sum(r["batch_hist"].values()) == r["batches"]
    assert 1 <= r["batch_mean"] <= r["max_batch"]
    assert r["queue_wait_mean_ms"] is not None and r["queue_wait_mean_ms"] >= 0
    assert r["queue_wait_p95_ms"] is not None and r["queue_wait_p95_ms"] >= 0
    assert r["deadline_misses"] >= 0
    assert 0 <= r["first_frame_p50_ms"] <= r["first_frame_max_ms"] < 2000
    assert "gpu_util_percent" in r and "gpu_mem_used_mb" in r
    assert r["partial"] is False
    assert "lipsync_lag_ms" in r and "lipsync_corr" in r and "lipsync_margin" in r
    # The collector in the window (gc_freeze is on by default).
    assert r["gc_freeze"] is True
    assert r["gc_pause_max_ms"] >= 0 and r["gc_full_collections"] >= 0
    assert r["gc_ms_per_second"] >= 0
    for key in ("duration_s", "speech_duty", "sink", "late_frames", "tick_p99_ms",
                "realtime", "model", "jitter", "max_wait_ms"):
        assert key in r


@pytest.fixture(scope="module")
def smoke(bench_env: dict[str, str]) -> dict[str, Any]:
    """The smoke run (null sink, moderate jitter): its JSON is checked field by field,
    and it is the baseline the webrtc sink's run is compared with."""
    return _bench_json(bench_env, *SMOKE, "--jitter", "moderate")


@pytest.mark.slow
def test_bench_json_has_every_field(smoke: dict[str, Any]) -> None:
    doc = smoke
    assert doc["interrupted"] is False and doc["capacity"] is None
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu_model"]
    [run] = doc["runs"]
    _check_run(run, 2)
    assert run["jitter"] == "moderate" and run["model"] == "rapido-lite"
    # The frame hook's lip-sync measurement: rapido-lite's mouth is on its sound.
    assert run["lipsync_margin"] is not None and run["lipsync_margin"] > 0.1, run
    assert abs(run["lipsync_lag_ms"]) <= 40.0, run


def test_webrtc_sink_encodes_every_picture_without_viewers(bench_env: dict[str, str],
                                                           smoke: dict[str, Any]) -> None:
    # One stream: this is about warm encoders keeping up, not about capacity (which a
    # busy CI machine could shave). The same jitter profile as the smoke run it is
    # compared with.
    doc = _bench_json(bench_env, "--streams", "1", "--duration", "2", "--warmup", "0.5",
                      "--jitter", "moderate", "--sink", "webrtc")
    [run] = doc["runs"]
    assert run["sink"] == "webrtc" and run["adaptive"] is False
    # Warm encoders: each stream's H.264 ran on every picture with nobody watching.
    assert run["encoded_fps_min"] is not None and 24.0 <= run["encoded_fps_min"] <= 26.0
    assert run["sink_dropped"] == 0 and run["quality_score"] == 1.0
    # The null sink encodes nothing and has no publisher quality.
    [plain] = smoke["runs"]
    assert plain["sink"] == "null"
    assert plain["encoded_fps_min"] is None and plain["quality_score"] is None
    # Encoding costs CPU: the same streams use clearly more of it.
    assert run["cpu_ms_per_stream_second"] > plain["cpu_ms_per_stream_second"] * 1.2


@pytest.mark.slow
def test_compare_batching_gives_two_rows_and_ratios(bench_env: dict[str, str]) -> None:
    doc = _bench_json(bench_env, "--streams", "2", "--duration", "1", "--warmup", "0.3",
                      "--compare", "batching", "--max-batch", "4")
    batched, unbatched = doc["runs"]
    assert (batched["max_batch"], unbatched["max_batch"]) == (4, 1)
    assert batched["streams"] == unbatched["streams"] == 2
    assert set(unbatched["batch_hist"]) == {"1"}
    comp = doc["comparison"]
    assert comp["cpu_per_stream_ratio"] == pytest.approx(
        batched["cpu_ms_per_stream_second"] / unbatched["cpu_ms_per_stream_second"],
        abs=1e-3)
    assert comp["lateness_p99_ratio"] is None or comp["lateness_p99_ratio"] > 0


@pytest.mark.slow
def test_compare_stretch_gives_an_off_and_an_on_row(bench_env: dict[str, str]) -> None:
    doc = _bench_json(bench_env, "--streams", "2", "--duration", "1", "--warmup", "0.3",
                      "--compare", "stretch", "--jitter", "heavy")
    off, on = doc["runs"]
    assert (off["stretch"], on["stretch"]) == (False, True)
    assert off["jitter"] == on["jitter"] == "heavy"
    assert off["accelerated_ms"] == off["decelerated_ms"] == 0.0  # off is off
    assert on["accelerated_ms"] >= 0.0 and on["decelerated_ms"] >= 0.0
    for r in (off, on):
        assert r["buffer_delay_ms"] is not None and r["buffer_delay_ms"] > 0
    assert doc["comparison"] is None


@pytest.mark.slow
def test_capacity_plot_and_cost(bench_env: dict[str, str], tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    doc = _bench_json(bench_env, "--streams", "1", "--duration", "1", "--warmup", "0.3",
                      "--capacity", "--max-streams-search", "2",
                      "--gpu-cost-per-hour", "2.5", "--plot", str(png))
    assert [r["streams"] for r in doc["runs"]][:2] == [1, 2]
    capacity = doc["capacity"]
    assert capacity == max([0] + [r["streams"] for r in doc["runs"] if r["realtime"]])
    cost = doc["cost"]
    assert cost["capacity"] == capacity
    if capacity:
        assert cost["cost_per_stream_month"] == pytest.approx(2.5 * 730 / capacity, abs=1e-3)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert doc["plot"] == str(png)


def test_cost_formula() -> None:
    assert report.cost_per_stream_month(3.0, 12) == pytest.approx(3.0 * 730 / 12)
    assert report.cost_per_stream_month(3.0, 0) is None
    c = report.cost_json(1.2, 5, "capacity search")
    assert c["cost_per_stream_month"] == pytest.approx(1.2 * 730 / 5, abs=1e-4)
    assert "per concurrent stream per month" in report.cost_line(c)


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(report.PlotUnavailable, match="pip install matplotlib"):
        report.plot([], tmp_path / "x.png", fps=25, machine={})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(bench_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    env = dict(bench_env, RAPIDO_RECORDINGS_DIR=str(tmp_path / "rec"),
               RAPIDO_AVATARS_DIR=str(tmp_path / "avatars"))
    proc = subprocess.Popen([sys.executable, "-m", "rapido", "serve", "--port", str(port),
                             "--model", "none"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(url + "/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_http_mode_reports_client_side_figures(bench_env: dict[str, str], server: str
                                               ) -> None:
    doc = _bench_json(bench_env, "--http", server, "--streams", "2", "--duration", "2",
                      "--warmup", "0.5", "--ramp", "0.5")
    [r] = doc["runs"]
    assert r["mode"] == "http" and r["sessions_created"] == 2
    assert r["errors"] == 0, r["error_samples"]
    assert len(r["fps_by_session"]) == 2
    assert 24.0 <= r["fps_min"] <= r["fps_median"] <= 26.0
    assert r["onsets"] >= 2 and 0 < r["onset_p50_ms"] < 2000
    assert r["playback_started"] >= 2
    assert r["underruns"] >= 0 and len(r["underruns_by_session"]) == 2
    # The client's own punctuality, to tell its late speech from the node's underruns.
    assert 0 <= r["client_send_late_p99_ms"] <= r["client_send_late_max_ms"]
    # Its collector: the heap frozen before anything is timed (gc_freeze, on by default)
    # is one full collection, timed like every other.
    assert r["client_gc_full_collections"] >= 1 and r["client_gc_pause_max_ms"] > 0
    # The sessions were deleted at the end.
    with urllib.request.urlopen(server + "/api/sessions", timeout=5) as resp:
        listed = json.loads(resp.read())
    sessions = listed.get("sessions", listed) if isinstance(listed, dict) else listed
    assert not sessions


@pytest.mark.slow
def test_http_viewers_hear_each_utterance(bench_env: dict[str, str], server: str) -> None:
    """--viewers: real aiortc WHEP viewers on a real node hear every utterance, and the
    bench reads when: speech to first audible audio, beside the node's own onset."""
    doc = _bench_json(bench_env, "--http", server, "--streams", "2", "--sink", "webrtc",
                      "--viewers", "2", "--duration", "6", "--warmup", "0.5",
                      "--ramp", "0.5", "--speech", "0.86")
    [r] = doc["runs"]
    assert r["errors"] == 0, r["error_samples"]
    assert r["viewers"] == 2
    # 3 s utterances with 0.5 s pauses over ~7 s: two each, those in the last second
    # not judged.
    assert r["viewer_onsets"] >= 2 and r["viewer_onsets_missed"] == 0, r
    # Heard after the node said it started playing (the encoder, the network and the
    # viewer's jitter buffer come after), and not a second late.
    assert r["onset_p50_ms"] < r["viewer_onset_p50_ms"] < 1000, r
    # Its packets came before aiortc's jitter buffer let the sound out.
    assert 0 < r["viewer_arrival_onset_p50_ms"] < r["viewer_onset_p50_ms"], r
    print(f"onset p50 {r['onset_p50_ms']} ms at the node, "
          f"{r['viewer_arrival_onset_p50_ms']} ms at the viewer's socket, "
          f"{r['viewer_onset_p50_ms']} ms out of its decoder")


@pytest.mark.slow
def test_ctrl_c_prints_what_was_measured(bench_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rapido", "bench", "--streams", "1", "--duration", "30",
         "--warmup", "0.2", "--json", "--progress", "on"],
        env=bench_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    # Wait for the measured phase (the bar's label loses "starting"), then interrupt.
    seen = b""
    deadline = time.monotonic() + 30
    while b"(max_batch 8)" not in seen and time.monotonic() < deadline:
        chunk = os.read(proc.stderr.fileno(), 256)
        if not chunk:
            break
        seen += chunk
    time.sleep(0.8)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    doc = json.loads(out)
    assert doc["interrupted"] is True
    [r] = doc["runs"]
    assert r["partial"] is True and r["realtime"] is False
    assert 0.5 < r["duration_s"] < 10 and r["fps_min"] > 20


BAD_ARGS = [
    (["--streams", "-1"], "--streams must be >= 1"),
    (["--jitter", "bumpy"], "unknown profile 'bumpy'"),
    (["--http", "http://192.0.2.1:8080"], "not a loopback address"),
    (["--http", "http://example.com/"], "not a loopback address"),
    (["--speech", "1.5"], "--speech must be within 0..1"),
    (["--model", "standin", "--standin-latency-ms", "-1"],
     "--standin-latency-ms must be within 0..1000"),
    (["--model", "standin", "--http", "http://127.0.0.1:9"],
     "--model standin runs in-process"),
    (["--profile", "p.txt", "--capacity"], "--profile records one in-process run"),
    (["--viewers", "1"], "it needs --http and --sink webrtc"),
    (["--http", "http://127.0.0.1:9", "--viewers", "1"], "it needs --http and --sink webrtc"),
    (["--http", "http://127.0.0.1:9", "--sink", "webrtc", "--streams", "2", "--viewers", "3"],
     "--viewers must be within 1..min(--streams, 16)"),
    (["--http", "http://127.0.0.1:9", "--sink", "webrtc", "--viewers", "-1"],
     "--viewers must be within 1..min(--streams, 16)"),
]


def test_bad_arguments_exit_2_with_one_line(bench_env: dict[str, str]) -> None:
    # All at once: each is a fresh interpreter, and they refuse before measuring anything.
    procs = [subprocess.Popen([sys.executable, "-m", "rapido", "bench", *args],
                              env=bench_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args, _ in BAD_ARGS]
    for proc, (args, message) in zip(procs, BAD_ARGS, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, err)
        assert out == ""
