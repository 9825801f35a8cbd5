"""Full garbage collections while a node serves: ``rapido serve`` (``gc_freeze`` on or off),
8 lessons speaking, N short sessions made and closed beside them (20 open at a time), then
the node's own ``gc_pause_seconds{generation="2"}`` and frame lateness over the churn, from
its /metrics. The figures in BENCHMARKS.md ("Full collections while serving").

    .venv/bin/python scripts/gc_churn.py --freeze 0 --sink webrtc --sessions 400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rapido.pipeline.speech import speech_like  # noqa: E402


def _grab(text: str, name: str) -> dict[str, float]:
    return {ln.split(" ")[0]: float(ln.split(" ")[1])
            for ln in text.splitlines() if ln.startswith(name)}


def start_node(freeze: int) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "RAPIDO_PORT": "0", "RAPIDO_GC_FREEZE": str(freeze),
           "RAPIDO_LOG_LEVEL": "warning", "RAPIDO_MAX_STREAMS": "200"}
    p = subprocess.Popen([sys.executable, "-m", "rapido", "serve"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    url = None
    while url is None:
        line = p.stdout.readline()
        if not line:
            raise SystemExit("the node exited before serving")
        m = re.search(r"serving at (http://\S+?)/ ", line)
        url = m.group(1) if m else None
    return p, url


async def churn(url: str, sink: str, sessions: int) -> tuple[str, str, float]:
    pcm = speech_like(30.0, rate=16000, seed=1).astype("<i2").tobytes()
    async with aiohttp.ClientSession() as http:
        for i in range(8):
            async with http.post(f"{url}/api/sessions",
                                 json={"lesson_id": f"s{i}", "sample_rate": 16000}) as r:
                sid = (await r.json())["session_id"]
            async with http.post(f"{url}/api/sessions/{sid}/audio", data=pcm,
                                 headers={"Content-Type": "audio/L16; rate=16000"}) as r:
                assert r.status == 202, await r.text()
        async with http.get(f"{url}/metrics") as r:
            before = await r.text()
        t0 = time.monotonic()
        live: list[str] = []
        for k in range(sessions):
            async with http.post(f"{url}/api/sessions", json={
                    "lesson_id": f"c{k}", "sample_rate": 16000, "sink": sink}) as r:
                live.append((await r.json())["session_id"])
            if len(live) > 20:
                async with http.delete(f"{url}/api/sessions/{live.pop(0)}") as r:
                    await r.read()
            await asyncio.sleep(0.03)
        dt = time.monotonic() - t0
        async with http.get(f"{url}/metrics") as r:
            after = await r.text()
    return before, after, dt


def main(freeze: int, sink: str, sessions: int) -> None:
    p, url = start_node(freeze)
    try:
        before, after, dt = asyncio.run(churn(url, sink, sessions))
    finally:
        p.terminate()
        p.wait()
    g0, g1 = _grab(before, "gc_pause_seconds"), _grab(after, "gc_pause_seconds")
    lat = "frame_processing_latency_seconds_bucket"
    l0, l1 = _grab(before, lat), _grab(after, lat)
    count, total = 'gc_pause_seconds_count{generation="2"}', 'gc_pause_seconds_sum{generation="2"}'
    n2, t2 = g1.get(count, 0) - g0.get(count, 0), g1.get(total, 0) - g0.get(total, 0)
    frames = l1[lat + '{le="+Inf"}'] - l0[lat + '{le="+Inf"}']
    late = frames - (l1[lat + '{le="0.08"}'] - l0[lat + '{le="0.08"}'])
    print(f"gc_freeze={freeze} sink={sink} {sessions} sessions in {dt:.1f} s: full collections "
          f"{n2:.0f}, {1e3 * t2:.1f} ms in all; frames {frames:.0f}, over 80 ms late {late:.0f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--freeze", type=int, choices=(0, 1), default=1)
    ap.add_argument("--sink", default="webrtc", choices=("null", "webrtc", "record"))
    ap.add_argument("--sessions", type=int, default=400)
    a = ap.parse_args()
    main(a.freeze, a.sink, a.sessions)
