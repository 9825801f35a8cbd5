"""Wav2Lip's mel features, computed incrementally for many streams at once.

The lip-sync model was trained on the mel spectrogram of Wav2Lip's ``audio.py`` and
``hparams.py``; any deviation in its math shifts the model's input distribution, so
:func:`melspectrogram` reproduces it (in float64):

* audio at 16 kHz, float in [-1, 1];
* pre-emphasis ``y[t] = x[t] - 0.97 x[t-1]`` (``lfilter([1, -0.97], [1], x)``, zero state);
* STFT, ``n_fft = win = 800``, ``hop = 200``, periodic Hann window, ``center=True``. The
  centre padding is ``mode='reflect'``: Wav2Lip pins librosa 0.7, whose ``stft`` default
  was ``pad_mode='reflect'`` (librosa 0.10 changed the default to ``'constant'``, which
  would change the first and last two frames of every utterance);
* magnitude, then librosa's Slaney mel filterbank (80 bands, 55 to 7600 Hz, Slaney area
  normalisation), rebuilt here from first principles;
* ``20 log10(max(1e-5, S)) - 20``, then the symmetric normalisation into [-4, 4].

For video frame ``n`` (25 fps) the model takes the 16 mel frames (200 ms) starting at mel
frame ``floor(80 / fps * (n + offset_frames))``. ``offset_frames`` is the model's own
(its manifest's ``mel_offset_frames``): Wav2Lip's training loader pairs frame ``n`` with
the window one frame earlier (-1: audio ``[t - 40 ms, t + 160 ms]`` around the frame's
time ``t``, mel frames centred on their hop), which is what trained weights expect; its
inference script starts the window at the frame itself (0), which shows their mouth 40 ms
early. Mel frames before an utterance's first are the silence floor (-4): the utterance
is preceded by silence. Near the end of an utterance Wav2Lip's inference uses the last 16
frames instead; :class:`MelStream` does the same.

Inside the pipeline audio is int16 at 48 kHz, so :class:`MelStream` first brings it to
16 kHz with a zero-phase (delay-compensated) Kaiser-windowed-sinc low-pass and decimation
by 3: 16 kHz sample ``i`` is the filtered 48 kHz signal at sample ``3 i``, so the 16 kHz
signal does not depend on how the audio was chunked. :func:`downsample_16k` is the same
filter applied in one go, written as a direct convolution so the streaming (FFT) path has
an independent reference.

Cost is what shapes :class:`MelStream`: ``feed48`` only buffers; :func:`compute_pending`
takes every stream's ready work and runs the filter and the STFT for all of them as a
handful of batched numpy calls, so a tick of ~100 streams costs a few calls, not a few
hundred. Every 48 kHz sample is filtered once and every STFT frame is computed once. The
batched stages write into per-thread scratch arrays that are reused from tick to tick:
on these VMs a fresh multi-megabyte array costs more in page faults than the FFT on it.
No BLAS call is made per tick (the mel filterbank is applied as a sparse sum), so the
cost does not depend on how many threads OpenBLAS decides to wake up.

One module, over 500 lines, on purpose: the reference (:func:`melspectrogram`) and the
streaming path (:class:`MelStream`, :func:`compute_pending`) share the filterbank, filter
and STFT helpers, and keeping them side by side is what keeps the two bit-compatible.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rapido.pipeline.media import AUDIO_RATE

# Low-pass filter for the 48 -> 16 kHz decimation, in taps per polyphase branch. With
# decimation by 3 the filter has 3 * 101 = 303 taps and is centred on its middle tap (151),
# which is also the lookahead, in 48 kHz samples (3.1 ms), that streaming costs.
_FIR_BRANCH_TAPS = 101
# Kaiser beta 7.5: passband flat to +-0.0013 dB up to fmax (7600 Hz) and >= 76 dB of
# attenuation from 8400 Hz, the lowest frequency whose alias (16000 - f) lands inside the
# mel range. Content between 7600 and 8400 Hz only aliases above 7600 Hz, where no mel band
# looks, so the transition band costs the features nothing.
_FIR_KAISER_BETA = 7.5
# A backlog is filtered in rows of at most this FFT size, so one stream's long burst does
# not blow every other stream's row up to its length.
_FIR_MAX_FFT = 1024
# At most this many 16 kHz samples (100 ms) per stream per batch and this many STFT frames
# per transform, which bound the scratch memory a burst of audio can claim (~10 MB for 100
# streams); the steady state is 640 samples and 3.2 frames per stream per 40 ms tick.
_MAX_OUT_PER_ROUND = 1_600
_MAX_FRAMES_PER_BATCH = 512
#: How far a model's window may sit from its frame, in video frames (+-320 ms at 25 fps):
#: further is a mistake in a manifest, not a model.
MAX_OFFSET_FRAMES = 8


@dataclass(frozen=True)
class MelSpec:
    """Wav2Lip's ``hparams.py`` audio settings plus the video rate and window length."""

    sample_rate: int = 16_000
    n_fft: int = 800
    hop: int = 200
    win: int = 800
    n_mels: int = 80
    fmin: float = 55.0
    fmax: float = 7600.0
    preemphasis: float = 0.97
    ref_level_db: float = 20.0
    min_level_db: float = -100.0
    max_abs_value: float = 4.0
    fps: int = 25
    window_frames: int = 16
    #: Where video frame n's window starts, in video frames relative to n (see the
    #: module docstring): the model's manifest says (``mel_offset_frames``).
    offset_frames: int = 0

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or AUDIO_RATE % self.sample_rate:
            raise ValueError(f"sample_rate {self.sample_rate} must divide {AUDIO_RATE}")
        if self.decimation % 2 == 0:
            # The zero-phase polyphase filter needs an odd length that the decimation
            # factor divides; 48 kHz -> 16 kHz (3) is the case the model needs.
            raise ValueError(f"decimation {self.decimation} must be odd")
        if self.win != self.n_fft or self.n_fft < 2 or self.n_fft % 2:
            raise ValueError("win must equal n_fft, and n_fft must be even")
        if self.hop <= 0 or self.sample_rate % self.hop:
            # An integer mel frame rate keeps mel_start exact integer arithmetic.
            raise ValueError(f"hop {self.hop} must divide sample_rate {self.sample_rate}")
        if self.fps <= 0 or AUDIO_RATE % self.fps:
            raise ValueError(f"fps {self.fps} must divide {AUDIO_RATE}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError("need 0 <= fmin < fmax <= sample_rate / 2")
        if self.window_frames < 1 or self.n_mels < 1:
            raise ValueError("window_frames and n_mels must be positive")
        if abs(self.offset_frames) > MAX_OFFSET_FRAMES:
            raise ValueError(f"offset_frames {self.offset_frames} is beyond "
                             f"+-{MAX_OFFSET_FRAMES} frames")
        if self.min_level_db >= 0 or self.max_abs_value <= 0:
            raise ValueError("need min_level_db < 0 and max_abs_value > 0")

    @property
    def decimation(self) -> int:
        return AUDIO_RATE // self.sample_rate

    @property
    def mel_fps(self) -> int:
        """Mel frames per second (80)."""
        return self.sample_rate // self.hop

    @property
    def frame_samples48(self) -> int:
        """48 kHz samples per video frame (1920 at 25 fps)."""
        return AUDIO_RATE // self.fps

    @property
    def fir_half(self) -> int:
        """Half-length of the decimation filter: the 48 kHz samples of lookahead it needs."""
        return (self.decimation * _FIR_BRANCH_TAPS - 1) // 2

    def mel_start(self, n: int) -> int:
        """First mel frame of video frame ``n``'s window: Wav2Lip's ``int(80./fps * n)``
        for ``offset_frames`` 0, ``floor(80./fps * (n + offset_frames))`` in general
        (negative for the first frames of an utterance with a negative offset).

        Integer arithmetic so it cannot drift on long streams; the tests check it equals
        the float expression for every ``n < 10**6``."""
        return (n + self.offset_frames) * self.mel_fps // self.fps

    def n_frames(self, n16: int) -> int:
        """Mel frames of an utterance of ``n16`` samples at 16 kHz (centred, as librosa)."""
        return 1 + n16 // self.hop if n16 > 0 else 0

    def n16(self, n48: int) -> int:
        """16 kHz samples of ``n48`` samples at 48 kHz (rounded up, as librosa resamples)."""
        return -(-n48 // self.decimation)

    def video_frames(self, n48: int) -> int:
        """Video frames that ``n48`` samples at 48 kHz span (counting a partial last one)."""
        return -(-n48 // self.frame_samples48)

    def samples48_needed(self, n: int) -> int:
        """48 kHz samples of the utterance that must have arrived for window ``n``.

        The window's last mel frame ``t`` is centred on 16 kHz sample ``t * hop`` and reads
        ``n_fft / 2`` samples past it (frame 0's reflected left pad reads sample
        ``n_fft / 2``); each 16 kHz sample needs ``fir_half`` 48 kHz samples of filter
        lookahead."""
        last = max(0, self.mel_start(n) + self.window_frames - 1)
        y_needed = max(last * self.hop + self.n_fft // 2, self.n_fft // 2 + 1)
        return self.decimation * (y_needed - 1) + self.fir_half + 1

    @property
    def lookahead_samples48(self) -> int:
        """Worst case over ``n`` of how many 48 kHz samples past the end of video frame
        ``n``'s audio must arrive before its window is complete: 8429 (175.6 ms) with the
        defaults (offset 0), 6509 (135.6 ms) with Wav2Lip's training offset (-1); 151 of
        them are the decimation filter's. The pattern repeats every
        ``fps / gcd(fps, mel_fps)`` frames; the first frames of an utterance, whose window
        starts before it with a negative offset, need no more than later ones."""
        period = self.fps // math.gcd(self.fps, self.mel_fps)
        first = max(0, -self.offset_frames)
        return max(
            self.samples48_needed(n) - (n + 1) * self.frame_samples48
            for n in range(first, first + period)
        )


DEFAULT_SPEC = MelSpec()


# --- filterbank, window, low-pass ----------------------------------------------------

_F_SP = 200.0 / 3  # Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(freq: np.ndarray | float) -> np.ndarray:
    """Slaney's auditory-toolbox mel scale (librosa's ``htk=False``): linear below 1 kHz,
    logarithmic above."""
    f = np.asarray(freq, dtype=np.float64)
    log = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, f / _F_SP)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    m = np.asarray(mel, dtype=np.float64)
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log, _F_SP * m)


@functools.cache
def mel_filterbank(spec: MelSpec = DEFAULT_SPEC) -> np.ndarray:
    """``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`` (htk=False, norm='slaney'):
    ``[n_mels, 1 + n_fft // 2]`` triangles spaced evenly in mel, each scaled to unit area
    in Hz (``2 / bandwidth``). float64; read-only because it is cached and shared."""
    fft_freqs = np.linspace(0.0, spec.sample_rate / 2, 1 + spec.n_fft // 2)
    edges = mel_to_hz(np.linspace(hz_to_mel(spec.fmin), hz_to_mel(spec.fmax), spec.n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    weights.flags.writeable = False
    return weights


@dataclass(frozen=True)
class _SparseMel:
    """The filterbank as a sparse sum: ``mel[:, i] = sum(mag[:, idx] * val)`` over filter
    i's run of entries (``starts``). Triangles overlap only pairwise, so this is ~750
    multiply-adds per frame instead of a dense 80 x 401 product."""

    lo: int  # first FFT bin any filter uses; mag is taken from here
    hi: int
    idx: np.ndarray  # bin - lo, filter after filter
    val: np.ndarray
    starts: np.ndarray


@functools.cache
def _sparse_mel(spec: MelSpec) -> _SparseMel:
    fb = mel_filterbank(spec)
    used = np.flatnonzero(fb.any(axis=0))
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
    idx: list[int] = []
    val: list[float] = []
    starts: list[int] = []
    for row in fb:
        starts.append(len(idx))
        nz = np.flatnonzero(row)
        # An empty filter still needs one entry: reduceat cannot sum an empty run.
        idx.extend((nz - lo).tolist() if nz.size else [0])
        val.extend(row[nz].tolist() if nz.size else [0.0])
    return _SparseMel(lo, hi, np.array(idx), np.array(val), np.array(starts))


@functools.cache
def hann_window(n: int) -> np.ndarray:
    """Periodic Hann (``scipy.signal.get_window('hann', n, fftbins=True)``)."""
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    w.flags.writeable = False
    return w


@functools.cache
def lowpass_taps(decimation: int = 3) -> np.ndarray:
    """Zero-phase anti-aliasing filter for decimation by ``decimation``: a Kaiser-windowed
    sinc cut off at the output Nyquist, ``decimation * 101`` taps centred on the middle
    one, unit DC gain."""
    n = decimation * _FIR_BRANCH_TAPS
    k = np.arange(n) - (n - 1) // 2
    h = np.sinc(k / decimation) / decimation * np.kaiser(n, _FIR_KAISER_BETA)
    h /= h.sum()
    h.flags.writeable = False
    return h


@functools.cache
def _poly_spectrum(decimation: int, nfft: int) -> np.ndarray:
    """``conj(rfft)`` of each polyphase branch of the low-pass, ``[decimation, nfft/2+1]``:
    multiplying by it turns an FFT product into the correlation the filter needs."""
    g = lowpass_taps(decimation).reshape(_FIR_BRANCH_TAPS, decimation).T
    return np.conj(np.fft.rfft(g, nfft, axis=1))


@functools.cache
def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: the sizes pocketfft transforms fastest."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class _Scratch(threading.local):
    """Grow-only scratch arrays, one set per thread, reused across calls."""

    def __init__(self) -> None:
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
        size = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = np.empty(max(size, 2 * buf.size if buf is not None else 0), dtype)
            self.bufs[name] = buf
        return buf[:size].reshape(shape)


_SCRATCH = _Scratch()


# --- the math shared by the reference and the streams --------------------------------


def _as_float(samples: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(samples, np.ndarray) or samples.ndim != 1:
        raise ValueError(f"{name} must be a 1-D numpy array")
    if samples.dtype.kind == "i" and samples.dtype.itemsize == 2:
        return samples.astype(np.float64) / 32768.0
    if samples.dtype.kind == "f":
        return samples.astype(np.float64, copy=False)
    raise ValueError(f"{name} must be int16 or float, got {samples.dtype}")


def _mel_rows(frames: np.ndarray, spec: MelSpec) -> np.ndarray:
    """STFT frames ``[N, n_fft]`` (unwindowed; overwritten) -> normalised mel
    ``[N, n_mels]`` float32, a scratch view valid until the next call on this thread."""
    n = frames.shape[0]
    sp = _sparse_mel(spec)
    np.multiply(frames, hann_window(spec.n_fft), out=frames)
    stft = np.fft.rfft(frames, axis=1, out=_SCRATCH.get("stft", (n, spec.n_fft // 2 + 1), complex))
    mag = np.abs(stft[:, sp.lo : sp.hi], out=_SCRATCH.get("mag", (n, sp.hi - sp.lo)))
    terms = np.take(mag, sp.idx, axis=1, out=_SCRATCH.get("terms", (n, sp.idx.size)))
    terms *= sp.val
    mel = np.add.reduceat(terms, sp.starts, axis=1, out=_SCRATCH.get("mel", (n, spec.n_mels)))
    # amp_to_db, minus ref_level_db, then _normalize (symmetric, clipped), as Wav2Lip.
    np.maximum(mel, 10.0 ** (spec.min_level_db / 20.0), out=mel)
    np.log10(mel, out=mel)
    mel *= 20.0
    mel -= spec.ref_level_db
    m = spec.max_abs_value
    mel -= spec.min_level_db
    mel *= 2.0 * m / -spec.min_level_db
    mel -= m
    np.clip(mel, -m, m, out=mel)
    out = _SCRATCH.get("rows", (n, spec.n_mels), np.float32)
    out[...] = mel
    return out


def _preemphasis(x: np.ndarray, prev: float, coef: float) -> np.ndarray:
    y = x.copy()
    if y.size:
        y[0] -= coef * prev
        y[1:] -= coef * x[:-1]
    return y


def downsample_16k(samples48: np.ndarray, spec: MelSpec = DEFAULT_SPEC) -> np.ndarray:
    """A whole utterance at 48 kHz (int16, or float in [-1, 1]) -> float64 at 16 kHz.

    ``ceil(len / 3)`` samples (librosa's resampled length); sample ``i`` is the zero-phase
    low-passed signal at 48 kHz sample ``3 i``, with silence before and after the
    utterance. A direct polyphase convolution: the reference for :class:`MelStream`."""
    x = _as_float(samples48, "samples48")
    d, half = spec.decimation, spec.fir_half
    n_out = spec.n16(x.size)
    y = np.zeros(n_out)
    if n_out == 0:
        return y
    padded = np.zeros(d * (n_out + _FIR_BRANCH_TAPS - 1))
    padded[half : half + x.size] = x
    g = lowpass_taps(d).reshape(_FIR_BRANCH_TAPS, d)
    rows = padded.reshape(-1, d)
    for p in range(d):
        y += np.correlate(rows[:, p], g[:, p], "valid")
    return y


def melspectrogram(wav16k: np.ndarray, spec: MelSpec = DEFAULT_SPEC) -> np.ndarray:
    """Wav2Lip's ``audio.melspectrogram`` of a whole utterance: ``[n_mels, T]`` float32,
    ``T = 1 + len // hop``. Takes float samples in [-1, 1] (int16 is scaled by 1/32768).
    An empty input gives ``[n_mels, 0]`` (Wav2Lip would fail on it)."""
    x = _as_float(wav16k, "wav16k")
    if x.size == 0:
        return np.zeros((spec.n_mels, 0), np.float32)
    y = _preemphasis(x, 0.0, spec.preemphasis)
    padded = np.pad(y, spec.n_fft // 2, mode="reflect")
    t = spec.n_frames(x.size)
    item = padded.itemsize
    frames = np.lib.stride_tricks.as_strided(
        padded, (t, spec.n_fft), (spec.hop * item, item), writeable=False
    )
    out = np.empty((spec.n_mels, t), np.float32)
    for a in range(0, t, _MAX_FRAMES_PER_BATCH):
        b = min(t, a + _MAX_FRAMES_PER_BATCH)
        block = _SCRATCH.get("frames", (b - a, spec.n_fft))
        block[...] = frames[a:b]
        out[:, a:b] = _mel_rows(block, spec).T
    return out


# --- streaming -----------------------------------------------------------------------


class MelStream:
    """One stream's mel features, one utterance at a time.

    ``feed48`` int16 48 kHz audio in playout order (utterance-relative), ``finish()`` at
    the end of the utterance, ask ``window(n)`` for video frame ``n``'s ``[80, 16]`` model
    input. The work happens in :func:`compute_pending`, which a server calls once per tick
    for all its streams (``window`` calls it for this stream alone when it must). Not
    thread-safe: one stream belongs to one thread at a time."""

    def __init__(self, spec: MelSpec = DEFAULT_SPEC) -> None:
        self.spec = spec
        # Plain attributes: the per-tick path reads these for every stream, and the
        # spec's properties recompute them.
        self._d = spec.decimation
        self._half = spec.fir_half
        self._hop = spec.hop
        self._nfft = spec.n_fft
        self.reset()

    def reset(self) -> None:
        """Forget everything and start a new utterance at its sample 0."""
        s = self.spec
        self._pending: list[np.ndarray] = []
        self._n48 = 0
        self._finished = False
        # Decimator: 48 kHz samples from absolute index _x_lo on, scaled to [-1, 1]. Silence
        # precedes the utterance, so the buffer starts with fir_half zeros.
        self._x = np.zeros(s.fir_half)
        self._x_lo = -s.fir_half
        self._i16 = 0  # next 16 kHz sample to produce
        self._prev16 = 0.0  # last 16 kHz sample, for pre-emphasis across batches
        # Framing: the centre-padded pre-emphasised signal from padded index _p_lo on.
        # Until n_fft/2 + 1 samples exist the reflected left pad cannot be built, so they
        # wait in _p unpadded.
        self._p = np.zeros(0)
        self._p_lo = 0
        self._padded_left = False
        self._padded_right = False
        self._next_t = 0  # next STFT frame to compute
        # Mel frames [t, n_mels] from absolute frame _mel_lo on; _mel_n frames computed.
        self._mel = np.empty((64, s.n_mels), np.float32)
        self._mel_lo = 0
        self._mel_n = 0
        #: STFT frames computed this utterance (instrumentation: ends equal to the
        #: utterance's frame count, so no frame is ever computed twice).
        self.stft_frames = 0
        #: 16 kHz samples that entered the framing buffer this utterance (each once).
        self.samples16 = 0

    # -- input --

    def feed48(self, samples: np.ndarray) -> None:
        """Buffer int16 48 kHz mono samples (copied: the caller may reuse its array)."""
        if not isinstance(samples, np.ndarray) or samples.ndim != 1:
            raise ValueError("feed48 takes a 1-D numpy array")
        if samples.dtype.kind != "i" or samples.dtype.itemsize != 2:
            raise ValueError(f"feed48 takes int16 samples, got {samples.dtype}")
        if self._finished:
            raise RuntimeError("utterance finished; reset() before feeding another")
        if samples.size:
            self._pending.append(samples.astype(np.int16, copy=True))
            self._n48 += samples.size

    def finish(self) -> None:
        """End of utterance: the tail frames get the STFT's end padding."""
        self._finished = True

    # -- state --

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def samples48(self) -> int:
        """48 kHz samples fed this utterance."""
        return self._n48

    @property
    def available_frames(self) -> int:
        """Mel frames computed so far (numbered from the utterance start)."""
        return self._mel_n

    @property
    def total_frames(self) -> int | None:
        """The utterance's mel frame count once finished, else None."""
        return self.spec.n_frames(self.spec.n16(self._n48)) if self._finished else None

    @property
    def video_frames(self) -> int:
        """Video frames the audio fed so far spans (the last one may be partial)."""
        return self.spec.video_frames(self._n48)

    def _end16(self) -> int:
        """16 kHz samples producible now: sample i needs 48 kHz samples up to 3i + half,
        or, once finished, whatever the utterance has (silence follows it)."""
        if self._finished:
            return -(-self._n48 // self._d)
        return max(0, (self._n48 - self._half + self._d - 1) // self._d)

    def _has_work(self) -> bool:
        return self._i16 < self._end16() or (self._finished and not self._padded_right)

    # -- output --

    def window(self, n: int, *, partial: bool = False) -> np.ndarray | None:
        """Video frame ``n``'s model input, ``[n_mels, window_frames]`` float32, or None
        while its mel frames still wait for audio. Once finished, windows that would run
        past the end are the utterance's last 16 frames, as in Wav2Lip's inference (an
        utterance shorter than 16 frames is right-padded with the silence floor, -4).
        With ``partial``, a window whose start is computed but whose end still waits for
        audio comes back with the missing frames repeating the last computed one."""
        if n < 0:
            raise ValueError(f"video frame {n} < 0")
        w = self.spec.window_frames
        start = self.spec.mel_start(n)
        if start + w > self._mel_n and self._has_work():
            compute_pending([self])
        total = self.total_frames
        # A window starting before the utterance (a negative offset, its first frames)
        # holds the silence floor there: silence precedes every utterance.
        lead = max(0, -start)
        first = start + lead
        out = np.full((self.spec.n_mels, w), -self.spec.max_abs_value, np.float32)
        if total is not None and self._mel_n == total and start + w > total:
            if start >= 0 or total >= w:
                start, lead, first = max(0, total - w), 0, max(0, total - w)
        elif start + w > self._mel_n:
            if not partial or first >= self._mel_n:
                return None
            # A live stream plays before all of the window's audio has arrived: the
            # frames still missing repeat the last one computed (speech rarely stops
            # exactly there, and the model weighs the window's start most).
            rows = self._mel[first - self._mel_lo : self._mel_n - self._mel_lo]
            out[:, lead : lead + rows.shape[0]] = rows.T
            out[:, lead + rows.shape[0] :] = rows[-1][:, None]
            return out
        if first < self._mel_lo:
            raise ValueError(f"window {n} was released")
        rows = self._mel[first - self._mel_lo : min(start + w, self._mel_n) - self._mel_lo]
        out[:, lead : lead + rows.shape[0]] = rows.T
        return out

    def release(self, n: int) -> None:
        """Windows of video frames before ``n`` will not be asked for again: free their
        mel frames. The last ``window_frames`` frames stay for the end-of-utterance
        windows."""
        keep = min(max(0, self.spec.mel_start(n)), self._mel_n - self.spec.window_frames)
        if keep > self._mel_lo:
            used = self._mel_n - self._mel_lo
            drop = keep - self._mel_lo
            self._mel[: used - drop] = self._mel[drop:used]
            self._mel_lo = keep

    # -- the stages compute_pending runs; each touches only this stream --

    def _take_decimation_work(self) -> tuple[np.ndarray, int]:
        """Absorb buffered input; return the 48 kHz segment to filter and how many 16 kHz
        samples it yields (sample i reads 48 kHz samples 3i - half .. 3i + half)."""
        d, half = self._d, self._half
        end = min(self._end16(), self._i16 + _MAX_OUT_PER_ROUND)
        n_out = end - self._i16
        if n_out <= 0:
            return self._x[:0], 0
        if self._pending:
            chunk = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            self._x = np.concatenate([self._x, chunk * (1.0 / 32768.0)])
        reach = d * (end - 1) + half + 1
        have = self._x_lo + self._x.size
        if have < reach:  # only once finished: silence follows the utterance
            self._x = np.concatenate([self._x, np.zeros(reach - have)])
        lo = d * self._i16 - half - self._x_lo
        return self._x[lo : lo + d * (n_out - 1) + 2 * half + 1], n_out

    def _push16(self, x16: np.ndarray, pre: np.ndarray) -> None:
        """Take new 16 kHz samples (and their pre-emphasised values); extend the centre
        padded signal; add the end padding once the utterance is complete."""
        pad = self._nfft // 2
        self._i16 += x16.size
        # Nothing before the next sample's filter reach is read again.
        drop = self._d * self._i16 - self._half - self._x_lo
        if drop > 0:
            self._x = self._x[drop:]
            self._x_lo += drop
        if x16.size:
            self._prev16 = float(x16[-1])
            self.samples16 += x16.size
            self._p = np.concatenate([self._p, pre])
        complete = self._finished and self._i16 == -(-self._n48 // self._d)
        if not self._padded_left:
            if complete:
                # The whole utterance arrived before any frame could be cut: pad both ends
                # with np.pad itself, which also reflects repeatedly when the utterance is
                # shorter than the pad, exactly as the whole-utterance STFT does.
                if self._p.size:
                    self._p = np.pad(self._p, pad, mode="reflect")
                self._padded_left = self._padded_right = True
            elif self._p.size > pad:
                self._p = np.concatenate([self._p[pad:0:-1], self._p])
                self._padded_left = True
        elif complete and not self._padded_right:
            if self._next_t < self.spec.n_frames(self.samples16):
                # Reflect the last n_fft/2 + 1 samples (excluding the edge); _store_frames
                # kept at least that much.
                self._p = np.concatenate([self._p, self._p[-2 : -pad - 2 : -1]])
            self._padded_right = True

    def _ready_frames(self) -> int:
        if not self._padded_left:
            return 0
        avail = self._p_lo + self._p.size
        return max(0, (avail - self._nfft) // self._hop + 1 - self._next_t)

    def _frames_view(self, k: int) -> np.ndarray:
        """The next ``k`` STFT frames, ``[k, n_fft]``, as a strided view of ``_p``."""
        item = self._p.itemsize
        return np.ndarray(
            (k, self._nfft),
            np.float64,
            self._p,
            (self._next_t * self._hop - self._p_lo) * item,
            (self._hop * item, item),
        )

    def _store_frames(self, rows: np.ndarray) -> None:
        k = rows.shape[0]
        if k:
            used = self._mel_n - self._mel_lo
            if used + k > self._mel.shape[0]:
                grown = np.empty((max(2 * self._mel.shape[0], used + k), rows.shape[1]), np.float32)
                grown[:used] = self._mel[:used]
                self._mel = grown
            self._mel[used : used + k] = rows
            self._mel_n += k
            self._next_t += k
            self.stft_frames += k
        if self._padded_left:
            # Frames before the next one are done. The end reflection reads the last
            # n_fft/2 + 1 samples; with hop < n_fft/2 the next frame already spans them, and
            # one hop of margin keeps that true for any hop.
            drop = (self._next_t - 1) * self._hop - self._p_lo
            if drop > 0:
                self._p = self._p[drop:]
                self._p_lo += drop


def compute_pending(streams: Sequence[MelStream]) -> None:
    """Run every given stream's ready work as one batch.

    Two batched transforms cover all streams: the 48 kHz segments ready for the low-pass
    go through one polyphase FFT filter, then every STFT frame that became complete goes
    through one ``rfft`` and one sparse mel sum; results are scattered back. Streams must
    share one :class:`MelSpec`. A burst longer than 0.5 s per stream is done in rounds."""
    todo: list[MelStream] = []
    seen: set[int] = set()
    for st in streams:
        if id(st) not in seen and st._has_work():
            seen.add(id(st))
            todo.append(st)
    if not todo:
        return
    spec = todo[0].spec
    if any(st.spec != spec for st in todo):
        raise ValueError("compute_pending needs streams with the same MelSpec")
    while todo:
        _round(todo, spec)
        todo = [st for st in todo if st._has_work()]


def _round(todo: Sequence[MelStream], spec: MelSpec) -> None:
    work = [st._take_decimation_work() for st in todo]
    x16 = _fir_batch(work, spec)
    coef = spec.preemphasis
    counts: list[int] = []
    for st, y in zip(todo, x16, strict=True):
        pre = y.copy()
        if y.size:
            pre[0] -= coef * st._prev16
            pre[1:] -= coef * y[:-1]
        st._push16(y, pre)
        counts.append(st._ready_frames())
    # Gather every stream's new frames into one matrix (in blocks of bounded size), run
    # the STFT and mel on it, scatter the rows back.
    cap = max(_MAX_FRAMES_PER_BATCH, max(counts, default=0))
    frames = _SCRATCH.get("frames", (min(cap, sum(counts)), spec.n_fft))
    block: list[tuple[MelStream, int]] = []
    at = 0
    for st, k in zip(todo, counts, strict=True):
        if at + k > frames.shape[0]:
            _flush_frames(block, frames[:at], spec)
            block, at = [], 0
        if k:
            frames[at : at + k] = st._frames_view(k)
            at += k
        block.append((st, k))
    _flush_frames(block, frames[:at], spec)


def _flush_frames(
    block: Sequence[tuple[MelStream, int]], frames: np.ndarray, spec: MelSpec
) -> None:
    rows = _mel_rows(frames, spec) if frames.shape[0] else np.zeros((0, spec.n_mels), np.float32)
    at = 0
    for st, k in block:
        st._store_frames(rows[at : at + k])
        at += k


def _fir_batch(work: Sequence[tuple[np.ndarray, int]], spec: MelSpec) -> list[np.ndarray]:
    """Filter-and-decimate every segment with the low-pass: output ``j`` of a segment is
    ``sum_k h[k] seg[d j + k]``; returns fresh arrays.

    Polyphase: split each segment into ``d`` branches (every d-th sample); each branch is
    a 101-tap correlation at the output rate, done as an FFT product, summed across
    branches before one inverse transform. Segments are cut into rows of at most
    ``rows_out`` outputs; a row holds ``rows_out + taps - 1`` input frames of ``d``
    samples, so the circular wrap never reaches the outputs kept."""
    d, m = spec.decimation, _FIR_BRANCH_TAPS
    n_outs = [n for _, n in work]
    longest = max(n_outs, default=0)
    if longest == 0:
        return [np.zeros(0) for _ in work]
    rows_out = min(longest, _FIR_MAX_FFT - m + 1)
    nfft = _fast_len(rows_out + m - 1)
    n_rows = sum(-(-n // rows_out) for n in n_outs)
    x = _SCRATCH.get("fir_in", (n_rows, d, nfft))
    r = 0
    for seg, n in work:
        if n == 0:
            continue
        frames = seg.reshape(-1, d)  # d * (n + m - 1) samples
        for start in range(0, n, rows_out):
            q = min(rows_out, n - start) + m - 1
            x[r, :, :q] = frames[start : start + q].T
            x[r, :, q:] = 0.0
            r += 1
    bins = nfft // 2 + 1
    spectrum = np.fft.rfft(x, axis=2, out=_SCRATCH.get("fir_spec", (n_rows, d, bins), complex))
    spectrum *= _poly_spectrum(d, nfft)
    summed = np.sum(spectrum, axis=1, out=_SCRATCH.get("fir_sum", (n_rows, bins), complex))
    y = np.fft.irfft(summed, nfft, axis=1, out=_SCRATCH.get("fir_out", (n_rows, nfft)))
    out: list[np.ndarray] = []
    r = 0
    for n in n_outs:
        k = -(-n // rows_out)
        out.append(y[r : r + k, :rows_out].reshape(-1)[:n].copy())
        r += k
    return out
