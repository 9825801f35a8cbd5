"""Audio at the edge: parse what clients send (PCM, WAV, L16) and bring it to AUDIO_RATE.

Everything here validates and raises :class:`AudioFormatError` with a message meant for
the client; nothing here knows about HTTP.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator

import av
import numpy as np

from rapido.pipeline.media import AUDIO_RATE

MIN_RATE = 8_000
MAX_RATE = 48_000


class AudioFormatError(ValueError):
    """Audio a client sent that we cannot take; the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_rate(rate: object) -> int:
    if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFormatError(
            "invalid_sample_rate",
            f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {rate!r}",
        )
    return rate


def pcm_s16le(data: bytes) -> np.ndarray:
    """Mono s16le bytes -> int16 array (a read-only view, no copy)."""
    if len(data) % 2:
        raise AudioFormatError(
            "odd_length_pcm",
            f"PCM s16le needs an even number of bytes (2 per sample), got {len(data)}",
        )
    return np.frombuffer(data, dtype="<i2")


#: Taps per polyphase branch of the integer-ratio upsampler (at the input rate). With a
#: Kaiser window for 70 dB this gives a transition band of about 0.14 x the input rate,
#: centred on the input's Nyquist frequency.
_TAPS = 32
_STOP_DB = 70.0
#: Coefficients are rounded to multiples of 2**-_COEF_BITS: every product with an int16
#: sample and every partial sum is then an exact float64, so the result does not depend
#: on how a stream is chunked (or on the BLAS's summation order).
_COEF_BITS = 20


@functools.lru_cache(maxsize=8)
def _polyphase(ratio: int, taps: int = _TAPS) -> np.ndarray:
    """``(taps, ratio)`` float64: column ``p`` is output phase ``p``'s filter, row ``i``
    weighs input sample ``n - taps + 1 + i`` (oldest first). A Kaiser-windowed sinc with
    its cut-off at the input's Nyquist frequency, centred on a whole input sample, so it
    is a Nyquist filter: input samples pass through unchanged."""
    n = ratio * taps
    centre = n // 2  # a whole number of input samples (taps is even)
    j = np.arange(n)
    beta = 0.1102 * (_STOP_DB - 8.7)
    window = np.kaiser(n + 1, beta)[:n]  # tap n would be h[-centre]'s zero-valued partner
    h = np.sinc((j - centre) / ratio) * window
    # Each phase sums to 1 (DC gain 1 per output sample), then the exact-arithmetic grid.
    for p in range(ratio):
        h[p::ratio] /= h[p::ratio].sum()
    scale = float(1 << _COEF_BITS)
    h = np.round(h * scale) / scale
    # y[L*n + p] = sum_k h[p + L*k] * x[n - k]; row i holds x[n - (taps - 1 - i)].
    bank = np.empty((taps, ratio))
    for p in range(ratio):
        bank[:, p] = h[p::ratio][::-1]
    bank.flags.writeable = False
    return bank


class _IntegerUpsampler:
    """Streaming mono int16 upsampling by a whole factor: a polyphase FIR in numpy.

    Delay-compensated (the filter's group delay is dropped at the start and played out
    by :meth:`flush`), so ``n`` samples in give exactly ``ratio * n`` out over a flush,
    aligned with the input. Bit-exact whatever the chunking (see ``_COEF_BITS``)."""

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio
        self._bank = _polyphase(ratio)
        self._taps = self._bank.shape[0]
        self.reset()

    def reset(self) -> None:
        self._hist = np.zeros(self._taps - 1, dtype=np.float64)
        self._skip = self._taps // 2  # input samples whose outputs are the filter delay
        self._fed = False

    def push(self, samples: np.ndarray) -> np.ndarray:
        n = len(samples)
        if n == 0:
            return np.zeros(0, dtype=np.int16)
        self._fed = True
        k = self._taps - 1
        buf = np.empty(k + n, dtype=np.float64)
        buf[:k] = self._hist
        buf[k:] = samples
        self._hist = buf[n:]
        # Row i is the K input samples ending at new sample i (overlapping, no copy).
        windows = np.ndarray((n, self._taps), np.float64, buf, 0, (8, 8))
        out = windows.dot(self._bank)  # [n, ratio]: the outputs of each input sample
        if self._skip:
            drop = min(self._skip, n)
            out = out[drop:]
            self._skip -= drop
        return _to_int16(out.reshape(-1))

    def flush(self) -> np.ndarray:
        if not self._fed:
            return np.zeros(0, dtype=np.int16)
        # The tail: what the last input samples still owe, by feeding the delay in zeros.
        tail = self.push(np.zeros(self._taps // 2, dtype=np.int16))
        self.reset()
        return tail


_INT16_MIN = np.float64(-32768.0)
_INT16_MAX = np.float64(32767.0)


def _to_int16(x: np.ndarray) -> np.ndarray:
    np.rint(x, out=x)
    # The method with numpy scalars: on a stream's short blocks np.clip's Python wrapper
    # and a Python int's conversion cost more than the clipping (1.6 against 6 µs).
    x.clip(_INT16_MIN, _INT16_MAX, out=x)
    return x.astype(np.int16)


class Resampler:
    """Streaming mono s16 resampler to AUDIO_RATE.

    Whole ratios (8, 12, 16 and 24 kHz) take a polyphase FIR in numpy (passband flat to
    0.43 x the input rate, images 70 dB down); other rates take PyAV/libswresample. Both
    keep filter state between chunks, so chunk boundaries leave no clicks; ``flush`` at
    the end of an utterance returns the filter's tail so no sample is lost."""

    def __init__(self, in_rate: int) -> None:
        self.in_rate = check_rate(in_rate)
        self._r: av.AudioResampler | None = None
        self._passthrough = in_rate == AUDIO_RATE
        self._int: _IntegerUpsampler | None = None
        if not self._passthrough and AUDIO_RATE % in_rate == 0:
            self._int = _IntegerUpsampler(AUDIO_RATE // in_rate)

    def push(self, samples: np.ndarray) -> np.ndarray:
        if self._passthrough or len(samples) == 0:
            return samples
        if self._int is not None:
            return self._int.push(samples)
        if self._r is None:
            self._r = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1),
            format="s16", layout="mono",
        )
        frame.sample_rate = self.in_rate
        return _join(self._r.resample(frame))

    def flush(self) -> np.ndarray:
        """The filter's tail; the resampler starts afresh after this."""
        if self._int is not None:
            return self._int.flush()
        if self._r is None:
            return np.zeros(0, dtype=np.int16)
        out = _join(self._r.resample(None))
        self._r = None
        return out


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    r = Resampler(rate)
    head = r.push(samples)
    tail = r.flush()
    return np.concatenate([head, tail]) if len(tail) else head


def _join(frames: list[av.AudioFrame]) -> np.ndarray:
    if not frames:
        return np.zeros(0, dtype=np.int16)
    parts = [f.to_ndarray().reshape(-1) for f in frames]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# -- uploads: parsed at once, decoded and resampled block by block ---------------------

#: Input seconds decoded and resampled at a time: the working memory of an upload is
#: O(block) (the polyphase filter's strided product copies ~300 bytes per input sample).
BLOCK_S = 1.0
#: Chunks a WAV file may have before its data chunk. Real files carry a handful (fmt,
#: fact, LIST, bext, JUNK, ...); the walk runs on the event loop, so it is bounded.
MAX_WAV_CHUNKS = 64

#: numpy layouts of the sample formats we take: dtype of one raw sample, bytes per sample.
_FORMATS = {"u8": ("u1", 1), "s16le": ("<i2", 2), "s16be": (">i2", 2), "s24le": ("u1", 3),
            "s32le": ("<i4", 4), "f32le": ("<f4", 4)}


class Pcm:
    """Audio a client sent, checked but not decoded: the payload's bytes (a view, not a
    copy), their sample format, channels and rate.

    Its length is known from the header alone (:attr:`frames`, :attr:`samples48`), so a
    caller can refuse it before any decoding. :meth:`blocks48` then decodes and resamples
    it to mono int16 at AUDIO_RATE a block at a time, with one resampler carried across
    the blocks: the result equals the whole signal resampled at once."""

    def __init__(self, payload: bytes | bytearray | memoryview, fmt: str, channels: int,
                 rate: int) -> None:
        self.fmt = fmt
        self.channels = channels
        self.rate = check_rate(rate)
        self.block_align = _FORMATS[fmt][1] * channels
        view = memoryview(payload).cast("B")
        self.frames = len(view) // self.block_align
        self._data = view[: self.frames * self.block_align]

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate

    @property
    def samples48(self) -> int:
        """Mono samples at AUDIO_RATE it becomes (exact for whole ratios, else rounded)."""
        if AUDIO_RATE % self.rate == 0:
            return self.frames * (AUDIO_RATE // self.rate)
        return round(self.frames * AUDIO_RATE / self.rate)

    def _block_frames(self, block_s: float) -> int:
        return max(1, int(block_s * self.rate))

    def decode(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` as mono int16 at the input rate."""
        stop = self.frames if stop is None else min(stop, self.frames)
        raw = self._data[start * self.block_align : stop * self.block_align]
        return _decode_block(raw, self.fmt, self.channels)

    def check(self, block_s: float = BLOCK_S) -> None:
        """What the header cannot tell: float samples must be finite. Block by block."""
        if self.fmt != "f32le":
            return
        step = self._block_frames(block_s) * self.channels
        x = np.frombuffer(self._data, "<f4")
        for i in range(0, len(x), step):
            if not np.all(np.isfinite(x[i : i + step])):
                raise AudioFormatError("invalid_wav", "float WAV contains NaN or infinity")

    def compact(self, block_s: float = BLOCK_S) -> Pcm:
        """Checked (:meth:`check`) and at most 2 bytes a frame, so a queued upload never
        holds more than mono int16 at its own rate would: formats wider than that
        (stereo, 24/32-bit, float) are decoded to mono int16 here, block by block."""
        self.check(block_s)
        if self.block_align <= 2:
            return self
        out = np.empty(self.frames, dtype="<i2")
        step = self._block_frames(block_s)
        for start in range(0, self.frames, step):
            out[start : start + step] = self.decode(start, start + step)
        return Pcm(out.data, "s16le", 1, self.rate)

    def blocks48(self, block_s: float = BLOCK_S) -> Iterator[np.ndarray]:
        """Mono int16 at AUDIO_RATE, decoded and resampled ``block_s`` of input at a time
        (the last block carries the resampler's tail)."""
        r = Resampler(self.rate)
        step = self._block_frames(block_s)
        for start in range(0, self.frames, step):
            out = r.push(self.decode(start, start + step))
            if start + step >= self.frames:
                tail = r.flush()
                out = np.concatenate([out, tail]) if len(tail) else out
            if len(out):
                yield out

    def resampled(self) -> np.ndarray:
        """The whole of it at AUDIO_RATE (for tests and small inputs)."""
        parts = list(self.blocks48())
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def _decode_block(raw: memoryview, fmt: str, channels: int) -> np.ndarray:
    """Raw samples -> mono int16. Elementwise per frame, so blocks decode exactly as the
    whole would."""
    if fmt in ("s16le", "s16be") and channels == 1:
        return np.frombuffer(raw, _FORMATS[fmt][0]).astype(np.int16)  # exact, a copy
    if fmt == "u8":
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif fmt in ("s16le", "s16be"):
        x = np.frombuffer(raw, _FORMATS[fmt][0]).astype(np.float32) / 32768.0
    elif fmt == "s24le":
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif fmt == "f32le":
        x = np.frombuffer(raw, "<f4").astype(np.float32)
    else:
        x = np.frombuffer(raw, "<i4").astype(np.float64).astype(np.float32) / float(1 << 31)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


# -- WAV ------------------------------------------------------------------------------

_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


def parse_wav(data: bytes | bytearray | memoryview) -> Pcm:
    """A RIFF/WAVE file's header -> :class:`Pcm` over its data chunk (no copy, nothing
    decoded; at most :data:`MAX_WAV_CHUNKS` chunks are walked).

    Takes integer PCM of 8, 16, 24 or 32 bits and 32-bit float, 1..8 channels (mixed down
    to mono), 8..48 kHz. Anything else is refused with the reason."""
    view = memoryview(data).cast("B")
    if len(view) < 12 or view[:4] != b"RIFF" or view[8:12] != b"WAVE":
        raise AudioFormatError("invalid_wav", "not a WAV file (no RIFF/WAVE header)")
    pos = 12
    fmt: tuple[int, int, int, int] | None = None
    payload: memoryview | None = None
    for _ in range(MAX_WAV_CHUNKS):
        if pos + 8 > len(view):
            break
        cid, size = bytes(view[pos : pos + 4]), struct.unpack_from("<I", view, pos + 4)[0]
        body = view[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioFormatError("invalid_wav", "WAV fmt chunk is truncated")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack_from("<H", body, 24)[0]  # first two bytes of the GUID
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            payload = body  # a streamed WAV may claim more than it has: take what is there
            break
        pos += 8 + size + (size & 1)
    else:
        if pos + 8 <= len(view):
            raise AudioFormatError("invalid_wav", f"WAV file has more than {MAX_WAV_CHUNKS} "
                                   "chunks before its data chunk")
    if fmt is None:
        raise AudioFormatError("invalid_wav", "WAV file has no fmt chunk")
    if payload is None:
        raise AudioFormatError("invalid_wav", "WAV file has no data chunk")
    tag, channels, rate, bits = fmt
    if not 1 <= channels <= 8:
        raise AudioFormatError("unsupported_wav", f"WAV with {channels} channels; 1..8 allowed")
    if tag == _WAVE_FORMAT_PCM and bits in (8, 16, 24, 32):
        sample_fmt = {8: "u8", 16: "s16le", 24: "s24le", 32: "s32le"}[bits]
    elif tag == _WAVE_FORMAT_FLOAT and bits == 32:
        sample_fmt = "f32le"
    else:
        kind = {_WAVE_FORMAT_PCM: "PCM", _WAVE_FORMAT_FLOAT: "float"}.get(tag, f"format {tag}")
        raise AudioFormatError(
            "unsupported_wav",
            f"WAV {kind} with {bits} bits per sample is not supported; send integer PCM "
            "(8/16/24/32 bit) or 32-bit float",
        )
    return Pcm(payload, sample_fmt, channels, check_rate(rate))


def decode_wav(data: bytes | bytearray | memoryview) -> tuple[np.ndarray, int]:
    """A whole RIFF/WAVE file -> (mono int16 samples, sample rate); see :func:`parse_wav`."""
    pcm = parse_wav(data)
    pcm.check()
    return pcm.decode(), pcm.rate


def l16_rate(content_type: str) -> tuple[int, str]:
    """``audio/L16;rate=N[;channels=1][;endian=little]`` -> (rate, sample format).

    L16 is big-endian by RFC 3551; ``endian=little`` is accepted for senders that
    stream raw little-endian PCM."""
    params: dict[str, str] = {}
    for part in content_type.split(";")[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            params[k.strip().lower()] = v.strip().strip('"')
    if "rate" not in params:
        raise AudioFormatError("invalid_content_type", "audio/L16 needs a rate parameter")
    try:
        rate = int(params["rate"])
    except ValueError:
        raise AudioFormatError("invalid_sample_rate",
                               f"rate {params['rate']!r} is not an integer") from None
    check_rate(rate)
    if params.get("channels", "1") != "1":
        raise AudioFormatError("unsupported_channels", "audio/L16 must be mono (channels=1)")
    endian = params.get("endian", "big").lower()
    if endian not in ("big", "little"):
        raise AudioFormatError("invalid_content_type", "endian must be big or little")
    return rate, "s16be" if endian == "big" else "s16le"


def l16_pcm(content_type: str, data: bytes | bytearray | memoryview) -> Pcm:
    """An ``audio/L16`` body -> :class:`Pcm` (no copy, nothing decoded)."""
    rate, fmt = l16_rate(content_type)
    if len(data) % 2:
        raise AudioFormatError("odd_length_pcm",
                               f"L16 needs an even number of bytes, got {len(data)}")
    return Pcm(data, fmt, 1, rate)


def parse_l16(content_type: str, data: bytes | bytearray | memoryview
              ) -> tuple[np.ndarray, int]:
    """An ``audio/L16`` body -> (int16 mono, rate); see :func:`l16_rate`."""
    pcm = l16_pcm(content_type, data)
    return pcm.decode(), pcm.rate
