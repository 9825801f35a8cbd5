"""Synthetic speech: what the demo speaks and the bench and tests feed in.

Not a voice, but speech-like where it matters to the pipeline: harmonics of a gliding
pitch, amplitude-modulated at syllable rate, so the jitter buffer sees utterance-shaped
energy and the mouth of a lip-sync model opens and closes. Deterministic per ``seed``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SPEECH_RATE", "speech_like"]

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
