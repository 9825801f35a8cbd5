"""Peak-RSS growth of a node from maximum-size audio uploads (BENCHMARKS.md, item 1).

For each format, a fresh node (``python -m rapido serve``, ``max_queued_audio_s=3600`` so
the upload is accepted) with an honest neighbour speaking in real time: one upload, 1.5 s
of playback, then the node's VmHWM growth (and the peak over the RSS just before the
upload, which a start-up peak cannot hide), the time to the answer, and the neighbour's
lowest fps. ``--ten``: ten 8-bit uploads at once to ten sessions instead.

    PYTHONPATH=$PWD python scripts/upload_rss.py [--ten] [--kinds wav-u8,l16]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.test_abuse import (
    UPLOAD_KINDS,
    create,
    honest_neighbour,
    max_upload,
    start_node,
    stop_node,
    upload,
)


async def one(kind: str, ten: bool, models: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        node = await start_node(Path(tmp), models, max_queued_audio_s=3600,
                                max_concurrent_uploads=10)
        try:
            body, ctype = max_upload(kind)
            async with aiohttp.ClientSession() as http, \
                    honest_neighbour(node, http) as honest:
                sids = [await create(http, node.url, f"u{i}") for i in range(10 if ten else 1)]
                t0 = honest.mark()
                base, rss = node.status_kb("VmHWM"), node.status_kb("VmRSS")
                start = time.monotonic()
                answers = await asyncio.gather(*(upload(http, node.url, s, body, ctype)
                                                 for s in sids))
                took = time.monotonic() - start
                await asyncio.sleep(1.5)
                peak = node.status_kb("VmHWM")
                growth, over_rss = (peak - base) / 1024, (peak - rss) / 1024
                await asyncio.sleep(2.0)
                fps = honest.fps_since(t0)
            statuses = sorted({status for status, _ in answers})
            return (f"{'10 x ' if ten else ''}{kind}: VmHWM {base / 1024:.0f} MiB "
                    f"+{growth:.0f} MiB (peak {over_rss:.0f} MiB over the RSS before, "
                    f"{rss / 1024:.0f} MiB), answered {statuses} in {took:.2f} s, "
                    f"neighbour min fps {min(fps):.1f}")
        finally:
            stop_node(node)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ten", action="store_true")
    ap.add_argument("--kinds", default=",".join(UPLOAD_KINDS))
    args = ap.parse_args()
    models = Path(tempfile.gettempdir()) / "rapido-upload-rss-models"
    kinds = ["wav-u8"] if args.ten else args.kinds.split(",")
    for kind in kinds:
        print(await one(kind, args.ten, models), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
