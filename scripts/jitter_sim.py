#!/usr/bin/env python3
"""The jitter buffer in the trace simulation: underruns, onset and delay per profile.

Plays sessions (a minute each by default) of the bench's arrival traces
(``rapido.bench.traces``) through
:class:`rapido.pipeline.jitter.AudioJitterBuffer` as a session drives it (one pull per
40 ms frame at its own tick phase, the model's look-ahead read after every speaking
frame, speech-like audio), optionally from a client up to ``--late-ms`` unpunctual, and
prints what the listener would get. ``--tail-factor`` and ``--tail-max-frac`` set the
start level's delay-tail rule (``_TAIL_FACTOR``, ``_TAIL_MAX_FRAC``; factor 0 turns it
off) to compare rules side by side on the same traces::

    python scripts/jitter_sim.py --profile moderate --sessions 400 --late-ms 5
    python scripts/jitter_sim.py --profile moderate --sessions 400 --late-ms 5 --tail-factor 0
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from rapido.bench.traces import PROFILES, make_trace, play_trace, unpunctual
from rapido.pipeline import jitter as jitter_module
from rapido.pipeline.jitter import AudioJitterBuffer, JitterConfig, PlaybackStarted, PullResult
from rapido.pipeline.speech import speech_like

#: The model's look-ahead a session reads after every speaking frame (rapido-lite's).
LOOKAHEAD_SAMPLES = 6509


class _SessionBuffer(AudioJitterBuffer):
    def pull(self, now: float) -> PullResult:
        result = super().pull(now)
        if result.speaking and result.utterance is not None:
            self.lookahead(result.utterance, LOOKAHEAD_SAMPLES)
        return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=PROFILES, default="moderate")
    ap.add_argument("--sessions", type=int, default=100, help="sessions (default 100)")
    ap.add_argument("--session-s", type=float, default=60.0,
                    help="each session's length in seconds (default 60)")
    ap.add_argument("--utterance-s", type=float, default=3.0, help="default 3")
    ap.add_argument("--pause-s", type=float, default=0.5,
                    help="silence between utterances (default 0.5)")
    ap.add_argument("--seed", type=int, default=1000, help="the first session's trace seed")
    ap.add_argument("--late-ms", type=float, default=0.0,
                    help="each chunk up to this late on top of the profile (the client)")
    ap.add_argument("--tail-factor", type=float, default=jitter_module._TAIL_FACTOR)
    ap.add_argument("--tail-max-frac", type=float, default=jitter_module._TAIL_MAX_FRAC)
    args = ap.parse_args(argv)
    if args.sessions < 1:
        ap.error("--sessions must be >= 1")
    if not (args.session_s > 0 and args.utterance_s > 0 and args.pause_s >= 0):
        ap.error("--session-s and --utterance-s must be > 0, --pause-s >= 0")
    if not 0 <= args.late_ms < 1000:
        ap.error("--late-ms must be in [0, 1000)")
    if args.tail_factor < 0 or not 0 <= args.tail_max_frac <= 1:
        ap.error("--tail-factor must be >= 0 and --tail-max-frac in [0, 1]")
    jitter_module._TAIL_FACTOR = args.tail_factor
    jitter_module._TAIL_MAX_FRAC = args.tail_max_frac

    audio = speech_like(7.0, rate=48_000, seed=1)
    underruns = 0
    onsets: list[float] = []
    delays: list[float] = []
    for seed in range(args.sessions):
        trace = make_trace(args.profile, duration_s=args.session_s,
                           utterance_s=args.utterance_s, pause_s=args.pause_s,
                           seed=args.seed + seed)
        trace = unpunctual(trace, args.late_ms / 1000.0, seed)
        r = play_trace(_SessionBuffer(JitterConfig()), trace, audio=audio,
                       phase_s=(seed * 0.0037) % 0.04)
        underruns += r.underruns
        delays.append(r.stats.mean_delay_ms)
        firsts = [a.t for i, a in enumerate(trace)
                  if not a.end and (i == 0 or trace[i - 1].end)]
        starts = [e.t for e in r.of_type(PlaybackStarted)]
        onsets.extend(1000.0 * (s - f) for f, s in zip(firsts, starts, strict=False))
        if (seed + 1) % max(1, args.sessions // 10) == 0:
            print(f"\r{seed + 1}/{args.sessions} sessions", end="", file=sys.stderr,
                  flush=True)
    print(file=sys.stderr)
    minutes = args.sessions * args.session_s / 60.0
    print(f"{args.profile}, {minutes:g} min, client <= {args.late_ms:g} ms late, tail "
          f"{args.tail_factor:g}x up to {args.tail_max_frac:g} of the target: "
          f"underruns {underruns}, onset p50/p95 {np.percentile(onsets, 50):.0f}/"
          f"{np.percentile(onsets, 95):.0f} ms, mean delay {np.mean(delays):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
