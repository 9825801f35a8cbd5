"""Synthetic speech: what the demo speaks and the bench and tests feed in.

Not a voice, but speech-like where it matters to the pipeline: harmonics of a gliding
pitch, amplitude-modulated at syllable rate, so the jitter buffer sees utterance-shaped
energy and the mouth of a lip-sync model opens and closes. Deterministic per ``seed``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SPEECH_RATE", "speech_like", "syllables"]

#: The default sample rate, what TTS voices commonly deliver (the bench's input rate).
SPEECH_RATE = 16_000


def speech_like(seconds: float, rate: int = SPEECH_RATE, seed: int = 0) -> np.ndarray:
    """Syllable-rate amplitude-modulated harmonics: speech-like energy and spectrum."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    noise = rng.normal(0, 0.05, len(t))
    x = (voice * 0.25 + noise) * envelope
    return (np.clip(x, -1, 1) * 20000).astype(np.int16)


def syllables(seconds: float, rate: int = SPEECH_RATE, seed: int = 0) -> np.ndarray:
    """Speech-like audio whose syllables (90-220 ms) and gaps (30-160 ms) have random
    lengths: the same voice as :func:`speech_like`, but an envelope with no period, so a
    lip-sync measurement (:mod:`rapido.pipeline.lipsync_lag`) finds one lag, not one per
    syllable period. Gaps stay shorter than the model's 200 ms window, so every frame
    still runs the model, as with :func:`speech_like`."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.zeros(n)
    at = int(rng.uniform(0.03, 0.16) * rate)
    while at < n:
        length = int(rng.uniform(0.09, 0.22) * rate)
        # A half sine, square-rooted like speech_like's: quick onset, quick release.
        bump = np.sin(np.pi * np.arange(length) / length) ** 0.5 * rng.uniform(0.6, 1.0)
        end = min(n, at + length)
        envelope[at:end] = bump[: end - at]
        at = end + int(rng.uniform(0.03, 0.16) * rate)
    noise = rng.normal(0, 0.05, n)
    x = (voice * 0.25 + noise) * envelope
    return (np.clip(x, -1, 1) * 20000).astype(np.int16)
