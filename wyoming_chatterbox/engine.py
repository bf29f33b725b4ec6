"""The one owner of the model: a worker thread that runs synthesis jobs.

The event loop never runs the model. A reply opens a `SynthesisStream`: sentence
groups go in, audio pieces come out, in order. The worker thread loads the backend,
then runs one group at a time, taking turns between the streams that have work, and
generates at most `max_groups_ahead` groups beyond what a stream has taken, so a
client that reads slowly holds back only its own work and memory stays bounded.

Cancelling a stream drops its pending groups at once; the group in flight stops at
the backend's next `should_stop()` check (per token for the Chatterbox backend).

This module knows nothing about torch or Wyoming.
"""

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import (
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Union,
)

import numpy as np

from .loudness import LoudnessNormalizer

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of the speech-token model (Chatterbox Turbo's defaults).

    `exaggeration`, `cfg_weight` and `min_p` are read by the multilingual model
    only; Turbo has no emotion control or classifier-free guidance.
    """

    temperature: float = 0.8
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    min_p: float = 0.05
    exaggeration: float = 0.5
    cfg_weight: float = 0.5


@dataclass(frozen=True)
class VoiceInfo:
    """A voice the backend can speak with, as advertised in Info."""

    name: str
    description: str
    languages: List[str]


@dataclass(frozen=True)
class ResolvedVoice:
    """What a request's voice name (and language) mean for the backend."""

    name: str  # the backend's own voice key
    language: str
    params: Mapping[str, float] = field(default_factory=dict)  # per-voice settings


@dataclass
class Piece:
    """A piece of generated audio: float32 mono samples in [-1, 1].

    A piece with no samples is not audio: a backend yields one (NOTHING_YET)
    between model steps to hand the worker back, which may then go on with
    another stream's work first.
    """

    audio: np.ndarray
    tokens: int = 0  # speech tokens behind this piece, for logs and tests


NOTHING_YET = Piece(audio=np.zeros(0, dtype=np.float32))


class SynthesisCancelled(Exception):
    """Raised inside a backend when `should_stop()` turned true."""


class EngineError(Exception):
    """Synthesis failed; the text is safe to show to the client."""


class EngineDied(Exception):
    """The model's worker thread died; the server cannot speak any more."""


class ModelLoadError(Exception):
    """The model could not be loaded; the text says what to do about it."""


class UnknownVoice(Exception):
    """A request named a voice (or language) this server does not have; the text
    names the voices it has."""


class SpeechBackend(ABC):
    """A text-to-speech model, driven only from the worker thread."""

    sample_rate: int = 24000
    model_name: str = "Chatterbox Turbo"
    # Sampling settings when neither the command line nor the voice sets them.
    default_params: SamplingParams = SamplingParams()

    @abstractmethod
    def load(self) -> None:
        """Load the model. Raise ModelLoadError with a clear sentence on failure."""

    @abstractmethod
    def voices(self) -> List[VoiceInfo]:
        """The voices this backend can speak with (available after load)."""

    def resolve_voice(self, name: str, language: Optional[str]) -> ResolvedVoice:
        """The voice a request names; raise UnknownVoice if there is none.

        Called on the event loop: must be cheap. This default accepts the names
        voices() lists, each speaking its first language.
        """
        voices = self.voices()
        for voice in voices:
            if voice.name == name:
                return ResolvedVoice(
                    name, voice.languages[0] if voice.languages else ""
                )
        raise UnknownVoice(
            f"Unknown voice {name!r}; available voices: "
            + ", ".join(voice.name for voice in voices)
        )

    @abstractmethod
    def synthesize(
        self,
        text: str,
        voice: str,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[Piece]:
        """Speak one sentence group; raise SynthesisCancelled when should_stop().

        Pieces with no samples (NOTHING_YET) may come between the audio: the
        worker takes its turns between streams there.
        """

    def synthesize_whole(
        self,
        text: str,
        voice: str,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[Piece]:
        """Speak one group for a listener who plays nothing before the reply
        ends (Home Assistant's one-shot synthesize): pieces within the group
        would only add work. By default the same as synthesize()."""
        return self.synthesize(text, voice, language, params, should_stop)

    @property
    def batch_size(self) -> int:
        """How many sentence groups the model advances in one step. Above 1,
        the worker begins waiting groups before it goes on with begun ones
        (each then costs little more than its prompt: it joins the others'
        steps), as long as fewer than this many are begun."""
        return 1

    def warm_up(self) -> None:
        """One short generation after load, so the first request is not slow."""

    def background_work(self) -> bool:
        """Do one small piece of deferred work (e.g. prepare a new voice) when the
        worker has nothing else to do; return True if there may be more."""
        return False

    def close(self) -> None:
        """Release the model."""


# Markers on a stream's queue, besides pieces and exceptions.
_GROUP_END = object()
_STREAM_END = object()
_QueueItem = Union[Piece, BaseException, object]


class SynthesisStream:
    """One reply: groups of text in, audio pieces out, in order.

    Methods are called from the event loop; the worker reaches the consumer only
    through `loop.call_soon_threadsafe`, so everything put on the queue keeps the
    order in which it was decided under the worker's lock.
    """

    def __init__(
        self,
        worker: "EngineWorker",
        voice: str,
        language: str,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        whole: bool = False,
    ) -> None:
        self.voice = voice
        # The listener plays nothing before the end (a one-shot reply): each
        # group in one piece (SpeechBackend.synthesize_whole).
        self.whole = whole
        self.language = language
        self.params = params
        self._worker = worker
        self._loop = loop
        self._queue: "asyncio.Queue[_QueueItem]" = asyncio.Queue()
        self._cancel_event = threading.Event()
        # Guarded by the worker's lock:
        self._pending: Deque[str] = deque()
        self._closed = False
        self._in_flight = False
        self._failed = False
        self._ahead = 0  # groups started by the worker, not yet taken by the reader
        self._ended = False  # _STREAM_END was put
        # Worker thread only:
        self._groups_done = 0
        self._loudness: Optional[LoudnessNormalizer] = None
        self._group: Optional[Iterator[Piece]] = None  # the group being spoken
        self._group_text = ""
        self._group_pieces = 0
        # When the listener would run out of audio: the first piece's time plus
        # the audio made since; before any audio, when the stream opened.
        self._deadline = worker._clock()
        self._audio_started = False
        self._group_started = 0.0  # when the worker began the group being spoken
        # The stream whose audio comes before this one's (see follow); the
        # worker begins this one's groups only after that one has spoken.
        self._after: Optional["SynthesisStream"] = None
        # Called on the event loop when the worker has no more of this stream's
        # text to speak (set by whoever feeds it; see starving_in).
        self.on_idle: Optional[Callable[[], None]] = None

    @property
    def cancelled(self) -> bool:
        return self._cancel_event.is_set()

    def add_group(self, text: str) -> None:
        """Queue a sentence group for synthesis."""
        self._worker._add(self, text)

    def close(self) -> None:
        """No more groups will come: the audio ends after the queued ones."""
        self._worker._close(self)

    def cancel(self) -> None:
        """Abandon the reply: pending groups are dropped, the group in flight stops."""
        self._worker._cancel(self)

    def follow(self, before: "SynthesisStream") -> None:
        """This stream's audio continues `before`'s (a first sentence begun in a
        stream of its own before its text was certain): its groups begin only
        once `before` has spoken, and carry on its loudness gain, its listener's
        clock and its pauses between groups. Call before adding any group."""
        with self._worker._cond:
            self._after = before

    def starving_in(self) -> Optional[float]:
        """Seconds left to hand the worker more text before the listener hears
        a silence; <= 0: now.

        The listener is assumed to play the audio in real time from its first
        piece; the worker needs a lead (`EngineWorker.release_lead`) to make
        the first piece of a new group.  None while the worker still has text
        of this stream, in flight or queued (more audio is on its way: ask
        again after `on_idle`), and once the stream is closed or cancelled.
        """
        worker = self._worker
        with worker._cond:
            if (
                self._pending
                or self._in_flight
                or self._closed
                or self._failed
                or self.cancelled
            ):
                return None
            source = self
            if not self._audio_started and self._after is not None:
                source = self._after  # this stream's audio follows that one's
                if source._pending or source._in_flight:
                    return None
            if not source._audio_started:
                return 0.0  # nothing spoken yet (the first group was unspeakable)
            return source._deadline - worker._clock() - worker.release_lead()

    async def pieces(self) -> AsyncIterator[Piece]:
        """Audio pieces in order; ends after close() and the last group.

        Raises EngineError if synthesis failed.
        """
        while True:
            item = await self._queue.get()
            if item is _GROUP_END:
                self._worker._taken(self)
            elif item is _STREAM_END:
                return
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, Piece)
                yield item

    def _put(self, item: _QueueItem) -> None:
        # Called under the worker's lock, from either thread; FIFO either way.
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)


class EngineWorker:
    """Owns a SpeechBackend on one thread and runs its jobs."""

    def __init__(
        self,
        backend: SpeechBackend,
        max_groups_ahead: int = 2,
        sentence_silence: float = 0.0,
        target_lufs: Optional[float] = None,
        idle_unload: Optional[float] = None,
        warm_up: bool = False,
        clock: Callable[[], float] = time.monotonic,
        max_active_groups: int = 16,
    ) -> None:
        self.backend = backend
        # Groups begun and not finished, over all streams: each holds model
        # state (a KV cache slot, ~0.2 GB on a GPU), so a crowd waits its turn
        # to begin rather than filling the GPU.
        self.max_active_groups = max_active_groups
        self.idle_unload = idle_unload
        self.warm_up = warm_up
        self._clock = clock
        self._last_active = clock()
        # Whether the backend holds its model now (False after an idle unload).
        self.model_loaded = False
        self.max_groups_ahead = max_groups_ahead
        self.sentence_silence = sentence_silence
        self.target_lufs = target_lufs
        # Last reply's loudness gain per voice: the start for a reply whose first
        # piece is too short to measure. Worker thread only.
        self._voice_gain: Dict[str, float] = {}
        self._cond = threading.Condition()
        self._streams: Deque[SynthesisStream] = deque()
        # Cancelled streams, which may have left a group half-spoken: the worker
        # closes it (its backend state, e.g. a KV cache slot, is the worker's).
        self._abandoned: List[SynthesisStream] = []
        self._stopping = False
        # Seconds from beginning a group to its first piece, smoothed: how long
        # ahead a listener's new text must reach the worker (release_lead).
        self._first_piece_s: Optional[float] = None
        self._background_due = True  # backend.background_work may have work
        self._thread: Optional[threading.Thread] = None
        self._loaded: "Optional[asyncio.Future[None]]" = None
        self._died: "Optional[asyncio.Future[BaseException]]" = None

    @property
    def sample_rate(self) -> int:
        return self.backend.sample_rate

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

    def voices(self) -> List[VoiceInfo]:
        """The backend's voices, after a fresh look for new ones; new voices are
        then prepared in the background."""
        voices = self.backend.voices()
        self.wake()
        return voices

    def open_stream(
        self,
        voice: str,
        params: SamplingParams,
        language: str = "",
        whole: bool = False,
    ) -> SynthesisStream:
        """A new reply; `whole` when its listener waits for all of it before
        playing (a one-shot synthesize), so pieces within a group are no use."""
        stream = SynthesisStream(
            self, voice, language, params, asyncio.get_running_loop(), whole
        )
        with self._cond:
            self._streams.append(stream)
            self._last_active = self._clock()
            self._cond.notify_all()
        return stream

    # --- called by SynthesisStream, on the event loop ---

    def _add(self, stream: SynthesisStream, text: str) -> None:
        with self._cond:
            if stream.cancelled or stream._closed or stream._failed:
                return
            stream._pending.append(text)
            self._cond.notify_all()

    def _close(self, stream: SynthesisStream) -> None:
        with self._cond:
            if stream._closed:
                return
            stream._closed = True
            self._end_if_done_locked(stream)

    def _cancel(self, stream: SynthesisStream) -> None:
        with self._cond:
            self._cancel_locked(stream)
            self._cond.notify_all()

    def wake(self) -> None:
        """Look for work again (e.g. backend.background_work after a rescan)."""
        with self._cond:
            self._background_due = True
            self._cond.notify_all()

    def _taken(self, stream: SynthesisStream) -> None:
        with self._cond:
            stream._ahead -= 1
            self._cond.notify_all()

    # --- worker side ---

    def _cancel_locked(self, stream: SynthesisStream) -> None:
        stream._cancel_event.set()
        stream._pending.clear()
        self._abandoned.append(stream)
        if stream in self._streams:
            self._streams.remove(stream)
            self._last_active = self._clock()
        if not stream._ended:
            # A reader still waiting sees the end: the audio stops where it is.
            stream._ended = True
            stream._put(_STREAM_END)

    def _end_if_done_locked(self, stream: SynthesisStream) -> None:
        if (
            stream._closed
            and not stream._pending
            and not stream._in_flight
            and not stream.cancelled
            and not stream._failed
        ):
            if stream in self._streams:
                self._streams.remove(stream)
                self._last_active = self._clock()
            stream._ended = True
            stream._put(_STREAM_END)

    def _next_job_locked(self) -> Optional[SynthesisStream]:
        """The stream whose listener runs out of audio first, among those with a
        group half-spoken or a pending group and room ahead.

        Work goes one piece (or one model step) at a time, so a long reply
        cannot hold the model while a short one waits: a new reply (no audio
        yet) goes before replies whose listeners still have audio buffered,
        and those are served in the order their buffers run dry. Ties keep
        the streams' order of arrival. A backend that steps several groups at
        once (batch_size) gets groups to begin first, while it has room.
        """
        best: Optional[SynthesisStream] = None
        best_key = (True, 0.0)
        active = sum(1 for stream in self._streams if stream._group is not None)
        room = active < self.max_active_groups
        admit = active < self.backend.batch_size
        for stream in self._streams:
            begins = (
                stream._group is None
                and room
                and bool(stream._pending)
                and stream._ahead < self.max_groups_ahead
                and not self._waits_for_before(stream)
            )
            if stream._group is None and not begins:
                continue
            key = (not (admit and begins), stream._deadline)
            if best is None or key < best_key:
                best, best_key = stream, key
        return best

    @staticmethod
    def _waits_for_before(stream: SynthesisStream) -> bool:
        """Whether the stream it follows is still speaking (see follow)."""
        before = stream._after
        return (
            before is not None
            and not before.cancelled
            and not before._failed
            and (before._in_flight or bool(before._pending))
        )

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._loaded is not None
        loaded = self._loaded
        try:
            self.backend.load()
            self.model_loaded = True
            if self.warm_up:
                self.backend.warm_up()
        except BaseException as err:  # pylint: disable=broad-except
            loop.call_soon_threadsafe(loaded.set_exception, err)
            return
        with self._cond:
            self._last_active = self._clock()  # idle counts from now, not from start
        loop.call_soon_threadsafe(loaded.set_result, None)

        try:
            while True:
                unload = False
                with self._cond:
                    while True:
                        stream = self._next_job_locked()
                        if stream is not None or self._stopping:
                            break
                        if self._background_due and self.model_loaded:
                            break
                        wait = self._idle_wait_locked()
                        if wait is not None and wait <= 0:
                            unload = True
                            break
                        self._cond.wait(wait)
                    if stream is None and self._stopping:
                        break
                    text: Optional[str] = None
                    if stream is not None and stream._group is None:
                        text = stream._pending.popleft()
                        stream._in_flight = True
                        stream._ahead += 1
                    elif stream is None and not unload:
                        self._background_due = False
                    abandoned, self._abandoned = self._abandoned, []
                self._close_groups(abandoned)
                if unload:
                    self._unload()
                    continue
                if text is not None and not self.model_loaded:
                    self._reload()
                if stream is None:
                    # Nothing to speak: the backend's deferred work, one step.
                    if self._background_step():
                        with self._cond:
                            self._background_due = True
                    continue
                self._step(stream, text)
        except BaseException as err:  # pylint: disable=broad-except
            # A bug, not a synthesis failure (those end only their stream): no
            # stream can be served any more, so say so to all and to the server.
            _LOGGER.critical("The model worker died", exc_info=True)
            with self._cond:
                for stream in list(self._streams):
                    stream._failed = True
                    stream._put(EngineError(f"The speech engine stopped: {err}"))
                self._streams.clear()
            loop.call_soon_threadsafe(self._set_died, err)
        finally:
            with self._cond:
                abandoned = self._abandoned + list(self._streams)
                self._abandoned = []
            self._close_groups(abandoned)
            self.backend.close()

    def _close_groups(self, streams: List[SynthesisStream]) -> None:
        """Close the streams' half-spoken groups, so that the backend frees what
        they hold. Worker thread only (nothing else touches `_group`)."""
        for stream in streams:
            group, stream._group = stream._group, None
            close = getattr(group, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception:  # pylint: disable=broad-except
                _LOGGER.exception("Closing a cancelled group failed")

    def _idle_wait_locked(self) -> Optional[float]:
        """Seconds until an idle unload is due; None when none is."""
        if self.idle_unload is None or not self.model_loaded or self._streams:
            return None
        return self._last_active + self.idle_unload - self._clock()

    def _unload(self) -> None:
        _LOGGER.info(
            "Idle for %.0f s: unloading the model to free its memory", self.idle_unload
        )
        self.model_loaded = False
        try:
            self.backend.close()
        except Exception:  # pylint: disable=broad-except
            _LOGGER.exception("Unloading the model failed")

    def _reload(self) -> None:
        """Load the model again for a request; a failure fails that group."""
        _LOGGER.info("A request came after an idle unload: loading the model again")
        started = self._clock()
        try:
            self.backend.load()
        except Exception:  # pylint: disable=broad-except
            _LOGGER.exception("Loading the model again failed")
            return
        self.model_loaded = True
        with self._cond:
            self._last_active = self._clock()
        _LOGGER.info("Model back in %.1f s", self._clock() - started)

    # release_lead = RELEASE_LEAD_FACTOR * (time to a group's first piece) +
    # RELEASE_MARGIN_S: early rather than late, since late is a silence and
    # early only a smaller group.
    RELEASE_LEAD_FACTOR = 2.0
    RELEASE_MARGIN_S = 0.25
    FIRST_PIECE_GUESS_S = 0.5  # before any group has been spoken

    def release_lead(self) -> float:
        """Seconds of audio a listener should still have when new text is handed
        to the worker, for its first piece to come before the audio runs out."""
        first_piece = self._first_piece_s
        if first_piece is None:
            first_piece = self.FIRST_PIECE_GUESS_S
        return self.RELEASE_LEAD_FACTOR * first_piece + self.RELEASE_MARGIN_S

    def queue_depth(self) -> int:
        """Sentence groups waiting for the model, over all streams."""
        with self._cond:
            return sum(len(stream._pending) for stream in self._streams)

    def _background_step(self) -> bool:
        """One piece of the backend's deferred work; True if there may be more."""
        try:
            return self.backend.background_work()
        except Exception:  # pylint: disable=broad-except
            _LOGGER.exception("Background work failed")
            return False

    def _step(self, stream: SynthesisStream, text: Optional[str]) -> None:
        """One piece of a stream's audio: start the group `text`, or go on with
        the group it is speaking."""
        should_stop = stream._cancel_event.is_set
        error: Optional[BaseException] = None
        try:
            if text is not None:
                if not self.model_loaded:
                    raise EngineError(
                        "the model could not be loaded again; see the log"
                    )
                speak = (
                    self.backend.synthesize_whole
                    if stream.whole
                    else self.backend.synthesize
                )
                stream._group = iter(
                    speak(
                        text, stream.voice, stream.language, stream.params, should_stop
                    )
                )
                stream._group_text = text
                stream._group_pieces = 0
                before = stream._after
                if before is not None and stream._groups_done == 0:
                    # Carry on from the audio that comes before (worker-owned
                    # state; that stream has finished speaking).
                    stream._loudness = before._loudness
                    stream._deadline = before._deadline
                    stream._audio_started = before._audio_started
                    stream._groups_done = before._groups_done
                stream._group_started = self._clock()
            assert stream._group is not None
            piece = next(stream._group)
        except StopIteration:
            pass
        except SynthesisCancelled:
            _LOGGER.debug("Group cancelled: %r", stream._group_text[:60])
        except Exception as err:  # pylint: disable=broad-except
            _LOGGER.exception("Synthesis failed for %r", stream._group_text[:60])
            error = err
        else:
            if not should_stop():
                if piece.audio.size:
                    self._emit(stream, piece)
                return
        self._end_group(stream, error)

    def _emit(self, stream: SynthesisStream, piece: Piece) -> None:
        if (
            stream._group_pieces == 0
            and stream._groups_done
            and self.sentence_silence > 0
        ):
            # A pause between groups, never before the first or at the end.
            silence = np.zeros(
                int(self.sentence_silence * self.sample_rate), np.float32
            )
            self._put_audio(stream, Piece(audio=silence))
        if stream._group_pieces == 0:
            took = self._clock() - stream._group_started
            last = self._first_piece_s
            self._first_piece_s = took if last is None else 0.7 * last + 0.3 * took
        stream._group_pieces += 1
        self._put_audio(stream, self._level(stream, piece))

    def _put_audio(self, stream: SynthesisStream, piece: Piece) -> None:
        now = self._clock()
        seconds = piece.audio.size / self.sample_rate
        if not stream._audio_started:
            stream._audio_started = True
            stream._deadline = now
        # A listener who ran dry starts again from now.
        stream._deadline = max(stream._deadline, now) + seconds
        with self._cond:
            stream._put(piece)

    def _end_group(
        self, stream: SynthesisStream, error: Optional[BaseException]
    ) -> None:
        self._close_groups([stream])
        with self._cond:
            stream._in_flight = False
            stream._groups_done += 1
            self._last_active = self._clock()
            if stream.cancelled:
                return
            if error is not None:
                stream._failed = True
                stream._pending.clear()
                if stream in self._streams:
                    self._streams.remove(stream)
                stream._put(EngineError(f"Speech synthesis failed: {error}"))
                return
            stream._put(_GROUP_END)
            self._end_if_done_locked(stream)
            on_idle = stream.on_idle
            if on_idle is not None and not stream._pending and not stream._ended:
                stream._loop.call_soon_threadsafe(on_idle)

    def _level(self, stream: SynthesisStream, piece: Piece) -> Piece:
        """Bring the piece to the target loudness with the reply's one gain."""
        if self.target_lufs is None or piece.audio.size == 0:
            return piece
        if stream._loudness is None:
            stream._loudness = LoudnessNormalizer(
                self.sample_rate,
                self.target_lufs,
                initial_gain_db=self._voice_gain.get(stream.voice),
            )
        audio = stream._loudness.process(piece.audio)
        gain = stream._loudness.gain_db
        if gain is not None:
            self._voice_gain[stream.voice] = gain
        return Piece(audio=audio, tokens=piece.tokens)
