"""The scheduler: one worker thread owns the models and runs every reply's groups.

The event loop never runs a model. A reply opens a `SynthesisStream` on one
model (its voice's: models.ModelSet): sentence groups go in, audio pieces come
out, in order. The worker takes turns between the streams with work, one piece
(or one model step) at a time, whatever their models, and makes at most
`max_groups_ahead` groups beyond what a stream's reader has taken. Each model
is loaded, batched, idle-unloaded and reloaded on its own.

Each stream's scheduling state is one `StreamState` that only the worker touches (on
its thread, or under its lock in the methods a handle calls). This module knows
nothing about torch, Wyoming or text; it must not block the event loop.

Long (~650 lines): the worker's scheduling and the models' lives (load, warm-up,
idle unload, reload, load and unload on request) share one lock and one thread.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .loudness import LoudnessNormalizer
from .memory import give_back, resident_bytes
from .models import ModelSet
from .settings import EngineSettings
from .speech import (
    Budget,
    EngineError,
    Piece,
    ResolvedVoice,
    SamplingParams,
    SpeechBackend,
    SpeechJob,
    SynthesisCancelled,
    VoiceInfo,
)
from .stream import GROUP_END, STREAM_END, StreamState, SynthesisStream

_LOGGER = logging.getLogger(__name__)

# What the event loop may ask the worker to do with the model (model_request).
LOAD = "load"
UNLOAD = "unload"


class EngineBusy(Exception):
    """The model cannot be unloaded now: replies are in progress."""


class EngineWorker:
    """Owns the SpeechBackends (one per model) on one thread and runs their
    jobs."""

    # release_lead = RELEASE_LEAD_FACTOR * (time to a group's first piece) +
    # RELEASE_MARGIN_S: early rather than late, since late is a silence and
    # early only a smaller group.
    RELEASE_LEAD_FACTOR = 2.0
    RELEASE_MARGIN_S = 0.25
    FIRST_PIECE_GUESS_S = 0.5  # before any group has been spoken

    def __init__(
        self,
        backends: Union[SpeechBackend, Mapping[str, SpeechBackend]],
        settings: EngineSettings = EngineSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = ModelSet(backends)
        # The first model's backend (the only one, for most servers).
        self.backend = self.models[self.models.first]
        self.settings = settings
        self.clock = clock
        # Per model: when it last served, and whether it holds its weights now
        # (False after an idle unload).
        self._last_active = {key: clock() for key in self.models}
        self._resident = {key: False for key in self.models}
        # Last reply's loudness gain per (model, voice): the start for a reply
        # whose first piece is too short to measure. Worker thread only.
        self._voice_gain: Dict[Tuple[str, str], float] = {}
        self._cond = threading.Condition()
        self._streams: Deque[StreamState] = deque()
        # Cancelled streams, which may have left a group half-spoken: the worker
        # closes it (its backend state, e.g. a KV cache slot, is the worker's).
        self._abandoned: List[StreamState] = []
        self._stopping = False
        # Seconds from beginning a group to its first piece, smoothed, per
        # model: how long ahead a listener's new text must reach the worker.
        self._first_piece_s: Dict[str, float] = {}
        self._background_due = True  # backend.background_work may have work
        self._thread: Optional[threading.Thread] = None
        self._loaded: "Optional[asyncio.Future[None]]" = None
        self._died: "Optional[asyncio.Future[BaseException]]" = None
        # Load/unload requests from the event loop, served between pieces.
        self._requests: Deque[Tuple[str, "asyncio.Future[None]"]] = deque()

    @property
    def sample_rate(self) -> int:
        return self.models.sample_rate

    @property
    def model_name(self) -> str:
        return self.models.model_name

    @property
    def model_loaded(self) -> bool:
        """Whether every model holds its weights now."""
        return all(self._resident.values())

    def loaded(self) -> Dict[str, bool]:
        """Per model, whether it holds its weights now."""
        return dict(self._resident)

    @property
    def max_groups_ahead(self) -> int:
        return self.settings.max_groups_ahead

    # --- lifecycle (event loop) ---

    async def start(self) -> None:
        """Start the worker thread and wait until the backend has loaded.

        Raises whatever the backend's load() raised.
        """
        loop = asyncio.get_running_loop()
        self._loaded = loop.create_future()
        self._died = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop,), name="chatterbox-worker", daemon=True
        )
        self._thread.start()
        await self._loaded

    def _set_died(self, err: BaseException) -> None:
        if self._died is not None and not self._died.done():
            self._died.set_result(err)

    async def died(self) -> BaseException:
        """Returns (the error) only if the worker thread dies; then the process
        should exit non-zero for its supervisor to restart it."""
        assert self._died is not None, "start() first"
        return await asyncio.shield(self._died)

    async def stop(self) -> None:
        """Cancel every stream, stop the thread and release the model."""
        with self._cond:
            self._stopping = True
            for stream in list(self._streams):
                self._cancel_locked(stream)
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    @property
    def running(self) -> bool:
        """Whether the worker serves requests: its first load done, not
        stopped or dead (the model may be unloaded: a request reloads it)."""
        thread, loaded = self._thread, self._loaded
        return (
            thread is not None
            and thread.is_alive()
            and not self._stopping
            and loaded is not None
            and loaded.done()
            and not loaded.cancelled()
            and loaded.exception() is None
        )

    async def model_request(self, what: str) -> None:
        """LOAD or UNLOAD the model now, on the worker, between two pieces of
        work; returns once done. UNLOAD raises EngineBusy while any reply is in
        progress; LOAD raises what the backend's load() raised. A speech
        request after an UNLOAD loads the model again by itself."""
        future = asyncio.get_running_loop().create_future()
        with self._cond:
            if what == UNLOAD and self._streams:
                raise EngineBusy(self._busy_message_locked())
            if not self.running:
                raise EngineError("the speech engine is not running")
            self._requests.append((what, future))
            self._cond.notify_all()
        await future

    def _busy_message_locked(self) -> str:
        return (
            f"{len(self._streams)} replies are in progress; stop them or wait "
            "before unloading the model"
        )

    def voices(self) -> List[VoiceInfo]:
        """Every model's voices, after a fresh look for new ones; new voices are
        then prepared in the background."""
        voices = self.models.voices()
        self.wake()
        return voices

    def resolve_voice(self, name: str, language: Optional[str]) -> ResolvedVoice:
        """The voice a request names, and which model speaks it (UnknownVoice
        if none)."""
        return self.models.resolve(name, language)

    def open_stream(
        self,
        voice: str,
        params: SamplingParams,
        language: str = "",
        whole: bool = False,
        model: Optional[str] = None,
    ) -> SynthesisStream:
        """A new reply on `model` (None: the first); `whole` when its listener
        waits for all of it before playing (a one-shot synthesize), so pieces
        within a group are no use."""
        key = self.models.first if model is None else model
        if key not in self.models:
            raise KeyError(f"no model {key!r} on this server")
        stream = SynthesisStream(
            self, SpeechJob("", voice, language, params, whole=whole), key
        )
        with self._cond:
            self._streams.append(stream._state)
            self._last_active[key] = self.clock()
            self._cond.notify_all()
        return stream

    def wake(self) -> None:
        """Look for work again (e.g. backend.background_work after a rescan)."""
        with self._cond:
            self._background_due = True
            self._cond.notify_all()

    def queue_depth(self) -> int:
        """Sentence groups waiting for the model, over all streams."""
        with self._cond:
            return sum(len(stream.pending) for stream in self._streams)

    def release_lead(self, model: Optional[str] = None) -> float:
        """Seconds of audio a listener should still have when new text is handed
        to the worker, for its first piece (on `model`: None, the first) to
        come before the audio runs out."""
        first_piece = self._first_piece_s.get(
            self.models.first if model is None else model, self.FIRST_PIECE_GUESS_S
        )
        return self.RELEASE_LEAD_FACTOR * first_piece + self.RELEASE_MARGIN_S

    # --- what a SynthesisStream asks for (event loop; under the lock) ---

    def add(self, stream: StreamState, text: str) -> None:
        with self._cond:
            if stream.cancelled or stream.closed or stream.failed:
                return
            stream.pending.append(text)
            self._cond.notify_all()

    def close_stream(self, stream: StreamState) -> None:
        with self._cond:
            if stream.closed:
                return
            stream.closed = True
            self._end_if_done_locked(stream)

    def cancel(self, stream: StreamState) -> None:
        with self._cond:
            self._cancel_locked(stream)
            self._cond.notify_all()

    def follow(self, stream: StreamState, before: StreamState) -> None:
        with self._cond:
            stream.after = before

    def set_on_idle(
        self, stream: StreamState, callback: Optional[Callable[[], None]]
    ) -> None:
        with self._cond:
            stream.on_idle = callback

    def taken(self, stream: StreamState) -> None:
        with self._cond:
            stream.ahead -= 1
            self._cond.notify_all()

    def starving_in(self, stream: StreamState) -> Optional[float]:
        """See SynthesisStream.starving_in. The listener is assumed to play the
        audio in real time from its first piece; the worker needs a lead
        (release_lead) to make the first piece of a new group."""
        with self._cond:
            if (
                stream.pending
                or stream.in_flight
                or stream.closed
                or stream.failed
                or stream.cancelled
            ):
                return None
            source = stream
            if not stream.audio_started and stream.after is not None:
                source = stream.after  # this stream's audio follows that one's
                if source.pending or source.in_flight:
                    return None
            if not source.audio_started:
                return 0.0  # nothing spoken yet (the first group was unspeakable)
            lead = self.release_lead(stream.model)
            return source.deadline - self.clock() - lead

    # --- the worker thread ---

    def _cancel_locked(self, stream: StreamState) -> None:
        stream.cancel.set()
        stream.pending.clear()
        self._abandoned.append(stream)
        self._drop_locked(stream)
        if not stream.ended:
            # A reader still waiting sees the end: the audio stops where it is.
            stream.ended = True
            stream.put(STREAM_END)

    def _drop_locked(self, stream: StreamState) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
            self._last_active[stream.model] = self.clock()

    def _end_if_done_locked(self, stream: StreamState) -> None:
        if stream.done():
            self._drop_locked(stream)
            stream.ended = True
            stream.put(STREAM_END)

    def _next_job_locked(self) -> Optional[StreamState]:
        """The stream whose listener runs out of audio first, among those with a
        group half-spoken or a pending group and room ahead.

        Work goes one piece (or one model step) at a time, so a long reply
        cannot hold the model while a short one waits: a new reply (no audio
        yet) goes before replies whose listeners still have audio buffered,
        and those are served in the order their buffers run dry. Ties keep
        the streams' order of arrival. A backend that steps several groups at
        once (batch_size) gets groups to begin first, while it has room.
        """
        best: Optional[StreamState] = None
        best_key = (True, 0.0)
        active: Dict[str, int] = {key: 0 for key in self.models}
        for stream in self._streams:
            if stream.group is not None:
                active[stream.model] += 1
        room = sum(active.values()) < self.settings.max_active_groups
        for stream in self._streams:
            begins = (
                stream.group is None
                and room
                and bool(stream.pending)
                and stream.ahead < self.settings.max_groups_ahead
                and not stream.waits_for_before()
            )
            if stream.group is None and not begins:
                continue
            # Each model batches its own groups.
            admit = active[stream.model] < self.models[stream.model].batch_size
            key = (not (admit and begins), stream.deadline)
            if best is None or key < best_key:
                best, best_key = stream, key
        return best

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._loaded is not None
        loaded = self._loaded
        try:
            for key, backend in self.models.items():
                backend.load()
                self._resident[key] = True
                if self.settings.warm_up:
                    backend.warm_up()
        except BaseException as err:  # pylint: disable=broad-except
            self._close_models()
            loop.call_soon_threadsafe(loaded.set_exception, err)
            return
        with self._cond:
            # Idle counts from now, not from start.
            self._last_active = {key: self.clock() for key in self.models}
        loop.call_soon_threadsafe(loaded.set_result, None)

        try:
            while self._serve_once():
                pass
        except BaseException as err:  # pylint: disable=broad-except
            # A bug, not a synthesis failure (those end only their stream): no
            # stream can be served any more, so say so to all and to the server.
            _LOGGER.critical("The model worker died", exc_info=True)
            with self._cond:
                for stream in list(self._streams):
                    stream.failed = True
                    stream.put(EngineError(f"The speech engine stopped: {err}"))
                self._streams.clear()
            loop.call_soon_threadsafe(self._set_died, err)
        finally:
            with self._cond:
                abandoned = self._abandoned + list(self._streams)
                self._abandoned = []
                requests, self._requests = list(self._requests), deque()
            for _, future in requests:
                self._answer(future, EngineError("the speech engine stopped"))
            self._close_groups(abandoned)
            self._close_models()

    def _close_models(self) -> None:
        for key, backend in self.models.items():
            self._resident[key] = False
            try:
                backend.close()
            except Exception:  # pylint: disable=broad-except
                _LOGGER.exception("Releasing %s failed", key)

    def _serve_once(self) -> bool:
        """Wait for something to do and do one piece of it; False to stop."""
        if self._serve_request():
            return True
        unload: Optional[str] = None
        text: Optional[str] = None
        with self._cond:
            while True:
                if self._requests and not self._stopping:
                    return True  # served first, by the next call
                stream = self._next_job_locked()
                if stream is not None or self._stopping:
                    break
                if self._background_due and any(self._resident.values()):
                    break
                wait, idle = self._idle_wait_locked()
                if idle is not None and wait is not None and wait <= 0:
                    unload = idle
                    break
                self._cond.wait(wait)
            if stream is None and self._stopping:
                return False
            if stream is not None and stream.group is None:
                text = stream.pending.popleft()
                stream.in_flight = True
                stream.ahead += 1
            elif stream is None and unload is None:
                self._background_due = False
            abandoned, self._abandoned = self._abandoned, []
        self._close_groups(abandoned)
        if unload is not None:
            self._unload(
                unload,
                f"Idle for {self.settings.idle_unload:.0f} s: unloading "
                f"{self._name(unload)} to free its memory",
            )
        elif stream is None:
            # Nothing to speak: the backends' deferred work, one step.
            if self._background_step():
                with self._cond:
                    self._background_due = True
        else:
            if text is not None and not self._resident[stream.model]:
                self._reload(
                    stream.model,
                    "A request came after an unload: loading "
                    f"{self._name(stream.model)} again",
                )
            self._step(stream, text)
        return True

    def _close_groups(self, streams: List[StreamState]) -> None:
        """Close the streams' half-spoken groups, so that the backend frees what
        they hold. Worker thread only (nothing else touches `group`)."""
        for stream in streams:
            group, stream.group = stream.group, None
            close = getattr(group, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception:  # pylint: disable=broad-except
                _LOGGER.exception("Closing a cancelled group failed")

    def _idle_wait_locked(self) -> Tuple[Optional[float], Optional[str]]:
        """Seconds until the next idle unload is due, and of which model (a
        loaded one no open stream uses); (None, None) when none is."""
        idle_unload = self.settings.idle_unload
        if idle_unload is None:
            return None, None
        busy = {stream.model for stream in self._streams}
        due = [
            (self._last_active[key] + idle_unload - self.clock(), key)
            for key, resident in self._resident.items()
            if resident and key not in busy
        ]
        if not due:
            return None, None
        wait, key = min(due)
        return wait, key

    def _serve_request(self) -> bool:
        """Serve one load/unload request (model_request), if one waits: it
        unloads, or loads, every model."""
        with self._cond:
            if not self._requests or self._stopping:
                return False
            what, future = self._requests.popleft()
            busy = what == UNLOAD and bool(self._streams)
            message = self._busy_message_locked() if busy else ""
        error: Optional[BaseException] = None
        if busy:
            error = EngineBusy(message)
        for key in self.models:
            if error is not None:
                break
            if what == UNLOAD and self._resident[key]:
                self._unload(key, f"Unloading {self._name(key)} on request")
            elif what == LOAD and not self._resident[key]:
                error = self._reload(key, f"Loading {self._name(key)} on request")
        self._answer(future, error)
        return True

    @staticmethod
    def _answer(future: "asyncio.Future[None]", error: Optional[BaseException]) -> None:
        """Settle a request's future on its event loop (it may have gone)."""

        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        try:
            future.get_loop().call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed
            pass

    def _unload(self, key: str, reason: str) -> None:
        _LOGGER.info("%s", reason)
        self._resident[key] = False
        before = resident_bytes()
        try:
            self.models[key].close()
        except Exception:  # pylint: disable=broad-except
            _LOGGER.exception("Unloading %s failed", self._name(key))
        # The allocator keeps what the model freed unless told to give it back.
        _LOGGER.info("Model unloaded (%s): %s", self._name(key), give_back(before))

    def _reload(self, key: str, reason: str) -> Optional[Exception]:
        """Load a model again; the error if that failed (a request that needed
        it fails)."""
        name = self._name(key)
        _LOGGER.info("%s", reason)
        started = self.clock()
        try:
            self.models[key].load()
        except Exception as err:  # pylint: disable=broad-except
            _LOGGER.exception("Loading %s again failed", name)
            return err
        self._resident[key] = True
        with self._cond:
            self._last_active[key] = self.clock()
        _LOGGER.info("%s back in %.1f s", name, self.clock() - started)
        return None

    def _name(self, key: str) -> str:
        return self.models[key].model_name or key

    def _background_step(self) -> bool:
        """One piece of the loaded backends' deferred work; True if there may
        be more."""
        more = False
        for key, backend in self.models.items():
            if not self._resident[key]:
                continue
            try:
                more = backend.background_work() or more
            except Exception:  # pylint: disable=broad-except
                _LOGGER.exception("Background work failed")
        return more

    def _step(self, stream: StreamState, text: Optional[str]) -> None:
        """One piece of a stream's audio: begin the group `text`, or go on with
        the group it is speaking."""
        error: Optional[BaseException] = None
        try:
            if text is not None:
                self._begin(stream, text)
            assert stream.group is not None
            piece = next(stream.group)
        except StopIteration:
            pass
        except SynthesisCancelled:
            _LOGGER.debug("Group cancelled: %r", stream.group_text[:60])
        except Exception as err:  # pylint: disable=broad-except
            _LOGGER.exception("Synthesis failed for %r", stream.group_text[:60])
            error = err
        else:
            if not stream.cancelled:
                if piece.audio.size:
                    self._emit(stream, piece)
                return
        self._end_group(stream, error)

    def _begin(self, stream: StreamState, text: str) -> None:
        if not self._resident[stream.model]:
            raise EngineError("the model could not be loaded again; see the log")
        job = stream.job
        budget = Budget(should_stop=stream.cancel.is_set)
        stream.group = iter(
            self.models[stream.model].speak(
                SpeechJob(text, job.voice, job.language, job.params, budget, job.whole)
            )
        )
        stream.group_text = text
        stream.group_pieces = 0
        before = stream.after
        if before is not None and stream.groups_done == 0:
            # Carry on from the audio that comes before (that stream has
            # finished speaking).
            stream.loudness = before.loudness
            stream.deadline = before.deadline
            stream.audio_started = before.audio_started
            stream.groups_done = before.groups_done
        stream.group_started = self.clock()

    def _emit(self, stream: StreamState, piece: Piece) -> None:
        silence = self.settings.sentence_silence
        if stream.group_pieces == 0 and stream.groups_done and silence > 0:
            # A pause between groups, never before the first or at the end.
            pause = np.zeros(int(silence * self.sample_rate), np.float32)
            self._put_audio(stream, Piece(audio=pause))
        if stream.group_pieces == 0:
            took = self.clock() - stream.group_started
            last = self._first_piece_s.get(stream.model)
            self._first_piece_s[stream.model] = (
                took if last is None else 0.7 * last + 0.3 * took
            )
        stream.group_pieces += 1
        self._put_audio(stream, self._level(stream, piece))

    def _put_audio(self, stream: StreamState, piece: Piece) -> None:
        now = self.clock()
        seconds = piece.audio.size / self.sample_rate
        if not stream.audio_started:
            stream.audio_started = True
            stream.deadline = now
        # A listener who ran dry starts again from now.
        stream.deadline = max(stream.deadline, now) + seconds
        with self._cond:
            stream.put(piece)

    def _end_group(self, stream: StreamState, error: Optional[BaseException]) -> None:
        self._close_groups([stream])
        with self._cond:
            stream.in_flight = False
            stream.groups_done += 1
            self._last_active[stream.model] = self.clock()
            if stream.cancelled:
                return
            if error is not None:
                stream.failed = True
                stream.pending.clear()
                self._drop_locked(stream)
                stream.put(EngineError(f"Speech synthesis failed: {error}"))
                return
            stream.put(GROUP_END)
            self._end_if_done_locked(stream)
            on_idle, loop = stream.on_idle, stream.loop
            if on_idle is not None and loop is not None and not stream.pending:
                if not stream.ended:
                    loop.call_soon_threadsafe(on_idle)

    def _level(self, stream: StreamState, piece: Piece) -> Piece:
        """Bring the piece to the target loudness with the reply's one gain."""
        target = self.settings.loudness
        if target is None or piece.audio.size == 0:
            return piece
        voice = (stream.model, stream.job.voice)
        if stream.loudness is None:
            stream.loudness = LoudnessNormalizer(
                self.sample_rate, target, initial_gain_db=self._voice_gain.get(voice)
            )
        audio = stream.loudness.process(piece.audio)
        gain = stream.loudness.gain_db
        if gain is not None:
            self._voice_gain[voice] = gain
        return Piece(audio=audio, tokens=piece.tokens)
