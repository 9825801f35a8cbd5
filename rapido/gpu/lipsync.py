"""LipSyncRenderer: speaking frames of every stream through one shared, batched model.

Per clock tick the engine hands over one job per stream. Silent frames are answered at
once with the avatar's idle frame (silence costs no model time). Speaking frames are
gathered for the tick, their mel windows computed in one vectorised pass over all
streams, and submitted to the :class:`MicroBatcher`; the batch runs the model and the
compositor in the batcher's worker thread, so the event loop only moves references. The
worker only computes; per-stream state (mel streams, the crop a half-rate frame repeats)
is read and written on the loop alone.

Faults stay local: a failed batch or a missed deadline shows idle frames for the frames
it held (counted, logged), and the streams go on. When misses rise the renderer degrades
on purpose instead of letting every stream stutter: speaking frames run the model at half
rate and repeat the previous crop in between, reported in ``video_quality_score``.

On a GPU the batch stays on the device (a backend with ``run_device``,
:class:`~rapido.gpu.contract.DeviceOutput`): the crops, the blending and the colour
conversion are computed there and the finished pictures come down once per batch
(:meth:`Compositor.compose_batch_torch`); a crop kept for repeating stays there too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rapido.gpu.backends import ModelBackend
from rapido.gpu.batcher import BatcherSeries, MicroBatcher
from rapido.gpu.compositor import Blend, Compositor, compositor_for
from rapido.gpu.contract import DeviceOutput
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.features import MelSpec, MelStream, compute_pending
from rapido.pipeline.media import VideoFrame
from rapido.pipeline.render import FrameJob

log = logging.getLogger(__name__)

#: Fraction of model requests missing their deadline (over the last second) above which
#: the renderer degrades, and below which it recovers.
DEGRADE_AT = 0.01
#: Wav2Lip's normalised mel floor (digital silence) and how far above it still counts as
#: silence (about -95 dB against the mel's reference level).
SILENT_MEL = -4.0
SILENCE_MARGIN = 0.2
RECOVER_AT = 0.001


@dataclass(slots=True)
class _Stream:
    mel: MelStream
    utterance: int | None = None
    fed: int = 0  # samples of the utterance already given to the mel stream
    last_window: np.ndarray | None = None
    last_crop: Crop | None = None  # read and written on the event loop only
    last_crop_index: int = -1  # with several batches in flight, keep the newest crop
    finished: bool = False
    #: Bumped whenever the crop state is reset (a new utterance): a result that comes back
    #: from an older epoch belongs to speech that is no longer playing.
    epoch: int = 0


@dataclass(slots=True)
class _Request:
    job: FrameJob
    compositor: Compositor
    mel: np.ndarray | None  # [1, 80, 16]; None when the crop is repeated (degraded)
    repeat: Crop | None = None  # the crop to repeat instead of running the model
    stream: _Stream | None = None
    epoch: int = 0  # ``stream.epoch`` when the request was made


#: A model crop ``[3, S, S]``: a numpy array, or a torch tensor on the model's device
#: when the batch stays there.
Crop = Any
#: What the worker hands back per request: the frame, and the model's crop (None for a
#: repeated crop) for the loop to keep as the stream's latest.
_Result = tuple[VideoFrame, Crop | None]


@dataclass
class _Window:
    """Requests and misses over the last second, for the degrade decision."""

    events: deque[tuple[float, bool]] = field(default_factory=deque)
    misses: int = 0  # among ``events``, kept as a running count: this runs per frame

    def add(self, now: float, missed: bool) -> None:
        self.events.append((now, missed))
        self.misses += missed
        while self.events and now - self.events[0][0] > 1.0:
            self.misses -= self.events.popleft()[1]

    def miss_rate(self) -> float:
        if not self.events:
            return 0.0
        return self.misses / len(self.events)


class LipSyncRenderer:
    def __init__(
        self,
        backend: ModelBackend,
        *,
        blend: Blend = "lower_half",
        max_batch: int = 8,
        max_wait_ms: float = 30.0,
        budget_ms: float = 120.0,
        spec: MelSpec | None = None,
        batcher_metrics: BatcherSeries | None = None,
        on_quality: Any = None,
        model_name: str = "model",
        batch_workers: int = 1,
        device_compositing: bool | None = None,
    ) -> None:
        """``device_compositing``: None (the default) keeps the batch on the device when
        the backend runs on CUDA and can (:class:`DeviceOutput`); True forces it (tests
        run it on CPU tensors); False never."""
        self.backend = backend
        if device_compositing is None:
            device_compositing = (isinstance(backend, DeviceOutput)
                                  and backend.device.startswith("cuda"))
        if device_compositing and not isinstance(backend, DeviceOutput):
            raise ValueError(f"backend {backend.name} cannot leave its output on a device")
        self._device: DeviceOutput | None = (
            backend if device_compositing and isinstance(backend, DeviceOutput) else None)
        self.spec = spec or MelSpec()
        self.lookahead_samples = self.spec.lookahead_samples48
        self.blend = blend
        self.budget_s = budget_ms / 1000.0
        self._streams: dict[str, _Stream] = {}
        self._pending: list[FrameJob] = []
        self._flush_scheduled = False
        self._window = _Window()
        self.degraded = False
        self.frames_model = 0
        self.frames_repeated = 0
        self.frames_failed = 0
        self._on_quality = on_quality
        self.batcher: MicroBatcher[_Request, _Result] = MicroBatcher(
            self._run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms,
            preferred_batch_sizes=tuple(s for s in backend.preferred_batch_sizes
                                        if s <= max_batch),
            name=model_name, metrics=batcher_metrics, max_in_flight=batch_workers)

    # -- the renderer seam ---------------------------------------------------------------

    def compositor(self, avatar: Avatar) -> Compositor:
        return compositor_for(avatar, self.backend.crop_size, self.blend)

    def prepare(self, avatar: Avatar) -> None:
        """Build the avatar's compositor now (it takes a moment), not on a first frame."""
        self.compositor(avatar)

    def submit(self, job: FrameJob) -> None:
        if not job.speaking:
            job.video = job.avatar.idle_frame(job.index)
            job.done()
            return
        self._pending.append(job)
        if not self._flush_scheduled:
            # Every stream ticks in the same pass: gather the pass, then do one
            # vectorised feature step for all of them.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def close_stream(self, stream: str) -> None:
        self._streams.pop(stream, None)

    # -- per tick ------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        jobs, self._pending = self._pending, []
        states = [self._feed(job) for job in jobs]
        compute_pending([s.mel for s in states])
        half_rate = self.degraded
        for job, st in zip(jobs, states, strict=True):
            comp = self.compositor(job.avatar)
            n = job.utt_pos // self.spec.frame_samples48
            if half_rate and n % 2 == 1 and st.last_crop is not None:
                req = _Request(job, comp, None, repeat=st.last_crop, stream=st)
            else:
                window = st.mel.window(n, partial=True)
                if window is None:  # not enough speech has arrived yet: hold the last
                    window = st.last_window
                if window is None:
                    window = np.full((80, 16), SILENT_MEL, dtype=np.float32)
                st.last_window = window
                if float(window.max()) <= SILENT_MEL + SILENCE_MARGIN:
                    # Nothing audible in the window: the mouth is closed, which is the
                    # idle picture. Costs no model time and shows no resampling blur.
                    job.video = job.avatar.idle_frame(job.index)
                    job.done()
                    continue
                req = _Request(job, comp, window[None], stream=st, epoch=st.epoch)
            self.batcher.submit_nowait(req, deadline=job.due + self.budget_s,
                                       callback=self._on_result)
        # That was every stream of this tick: nothing more comes for a frame interval, so
        # waiting max_wait for a fuller batch would only add latency.
        self.batcher.flush()

    def _feed(self, job: FrameJob) -> _Stream:
        st = self._streams.get(job.stream)
        if st is None:
            st = self._streams[job.stream] = _Stream(MelStream(self.spec))
        if st.utterance != job.utterance:
            st.mel.reset()
            st.utterance, st.fed, st.finished = job.utterance, 0, False
            st.last_window = st.last_crop = None
            st.last_crop_index = -1
            st.epoch += 1
        start = job.utt_pos
        ahead = job.lookahead if job.lookahead is not None else job.audio[:0]
        end = start + job.real_samples + len(ahead)
        if end > st.fed and not st.finished:
            speech = np.concatenate([job.audio[: job.real_samples], ahead])
            st.mel.feed48(speech[max(0, st.fed - start):])
            st.fed = end
        if job.utt_complete and not st.finished:
            st.mel.finish()
            st.finished = True
        return st

    # -- in the batcher's worker thread -----------------------------------------------------
    # Computes only: per-stream state belongs to the loop (see _keep_crop).

    def _run_batch(self, reqs: list[_Request]) -> list[_Result]:
        frames, model_crops = self._render(reqs)
        return list(zip(frames, model_crops, strict=True))

    def _render(self, reqs: list[_Request]
                ) -> tuple[list[VideoFrame], list[Crop | None]]:
        """The batch's frames, and per request the model's crop (None where repeated)."""
        crops: list[Crop | None] = [r.repeat for r in reqs]
        model_crops: list[Crop | None] = [None] * len(reqs)
        model = [k for k, r in enumerate(reqs) if r.mel is not None]
        device = self._device
        out: Crop | None = None
        if model:
            mel = np.stack([reqs[k].mel for k in model])  # type: ignore[misc]
            face = np.stack([reqs[k].compositor.face_input(reqs[k].job.index)
                             for k in model])
            out = (device.run_device(mel, face) if device is not None
                   else self.backend.run(mel, face))
            if len(out) != len(model):
                raise RuntimeError(f"the model returned {len(out)} crops for "
                                   f"{len(model)} frames")
            for k, crop in zip(model, out, strict=True):
                crops[k] = model_crops[k] = crop
        ready: list[Crop] = []
        for crop in crops:
            assert crop is not None  # a request without a mel carries its repeat crop
            ready.append(crop)
        if device is not None:
            import torch  # the device path exists only with a torch backend

            stack: Any = torch.stack

            def compose(comp: Compositor, idx: list[int], batch: Crop) -> list[VideoFrame]:
                assert device is not None
                return comp.compose_batch_torch(idx, batch, device.device)
        else:
            stack = np.stack

            def compose(comp: Compositor, idx: list[int], batch: Crop) -> list[VideoFrame]:
                return comp.compose_batch(idx, batch)
        comp = reqs[0].compositor
        if all(r.compositor is comp for r in reqs):
            # The usual case: one avatar, so the whole batch composites in one pass.
            batch = out if out is not None and len(model) == len(reqs) else stack(ready)
            return compose(comp, [r.job.index for r in reqs], batch), model_crops
        frames: list[VideoFrame | None] = [None] * len(reqs)
        groups: dict[int, list[int]] = {}
        for k, r in enumerate(reqs):
            groups.setdefault(id(r.compositor), []).append(k)
        for ks in groups.values():
            done = compose(reqs[ks[0]].compositor, [reqs[k].job.index for k in ks],
                           stack([ready[k] for k in ks]))
            for k, frame in zip(ks, done, strict=True):
                frames[k] = frame
        return frames, model_crops  # type: ignore[return-value]

    # -- back on the loop ------------------------------------------------------------------

    def _on_result(self, req: _Request, result: _Result | BaseException) -> None:
        job = req.job
        now = time.monotonic()
        if isinstance(result, BaseException):
            job.video = job.avatar.idle_frame(job.index)
            job.degraded = True
            self.frames_failed += 1
            self._window.add(now, True)
            log.debug("frame %d of %s shown idle: %s", job.index, job.stream, result)
        else:
            job.video, crop = result
            if req.mel is None:
                self.frames_repeated += 1
                job.degraded = True
            else:
                self.frames_model += 1
                self._keep_crop(req, crop)
            self._window.add(now, False)
        self._update_mode()
        job.done()

    def _keep_crop(self, req: _Request, crop: Crop | None) -> None:
        """Remember the model's crop as the stream's latest, for half-rate frames to repeat;
        unless the stream has since moved on to a new utterance: the crop of old speech
        must not come back as the mouth of the new."""
        st = req.stream
        if crop is None or st is None or st.epoch != req.epoch:
            return
        if req.job.index > st.last_crop_index:
            st.last_crop, st.last_crop_index = crop, req.job.index

    def _update_mode(self) -> None:
        rate = self._window.miss_rate()
        if not self.degraded and rate > DEGRADE_AT:
            self.degraded = True
            log.warning("model misses %.1f %% of deadlines: half-rate lip sync until it "
                        "recovers", 100 * rate)
        elif self.degraded and rate < RECOVER_AT:
            self.degraded = False
            log.info("model keeps up again: full-rate lip sync")
        if self._on_quality is not None:
            self._on_quality(self.quality())

    def quality(self) -> float:
        """1.0 at full quality; lower while frames are repeated or shown idle."""
        total = self.frames_model + self.frames_repeated + self.frames_failed
        if not total or not self._window.events:
            return 1.0
        miss = self._window.miss_rate()
        return max(0.0, 1.0 - miss - (0.5 if self.degraded else 0.0) * (1 - miss))

    # -- lifecycle and reporting ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"renderer": "lipsync", "backend": self.backend.info(),
                "degraded": self.degraded, "frames_model": self.frames_model,
                "frames_repeated": self.frames_repeated, "frames_failed": self.frames_failed,
                "batcher": self.batcher.stats()}

    async def aclose(self) -> None:
        await self.batcher.aclose()
        self.backend.close()

