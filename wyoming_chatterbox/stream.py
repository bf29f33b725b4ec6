"""A reply's stream in the engine: the handle the event loop holds, and the
state the worker keeps.

`SynthesisStream` is what a reply uses on the event loop: groups in, audio
pieces out, cancel. Each of its requests goes to the EngineWorker, which alone
reads and writes the stream's `StreamState`. Nothing here runs the model.
"""

import asyncio
import threading
from collections import deque
from typing import TYPE_CHECKING, AsyncIterator, Callable, Deque, Iterator, Optional

from .loudness import LoudnessNormalizer
from .speech import Piece, SpeechJob

if TYPE_CHECKING:
    from .engine import EngineWorker

# Markers on a stream's queue, besides pieces and exceptions.
GROUP_END = object()
STREAM_END = object()


class StreamState:
    """One reply's scheduling state; only the EngineWorker reads or writes it
    (on its thread, or under its lock in the methods a handle calls)."""

    def __init__(
        self,
        job: SpeechJob,
        cancel: threading.Event,
        put: Callable[[object], None],
        now: float,
        model: str = "",
    ) -> None:
        self.job = job  # the reply's voice, language, params; text set per group
        self.model = model  # the key of the model that speaks it
        self.cancel = cancel
        self.put = put  # to the handle's queue, from either thread, in order
        # Guarded by the worker's lock:
        self.pending: Deque[str] = deque()
        self.closed = False
        self.in_flight = False
        self.failed = False
        self.ahead = 0  # groups begun by the worker, not yet taken by the reader
        self.ended = False  # _STREAM_END was put
        self.after: Optional["StreamState"] = None  # see SynthesisStream.follow
        self.on_idle: Optional[Callable[[], None]] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        # Worker thread only:
        self.groups_done = 0
        self.loudness: Optional[LoudnessNormalizer] = None
        self.group: Optional[Iterator[Piece]] = None  # the group being spoken
        self.group_text = ""
        self.group_pieces = 0
        self.group_started = 0.0
        # When the listener would run out of audio: the first piece's time plus
        # the audio made since; before any audio, when the stream opened.
        self.deadline = now
        self.audio_started = False

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def waits_for_before(self) -> bool:
        """Whether the stream it follows is still speaking."""
        before = self.after
        return (
            before is not None
            and not before.cancelled
            and not before.failed
            and (before.in_flight or bool(before.pending))
        )

    def done(self) -> bool:
        return (
            self.closed
            and not self.pending
            and not self.in_flight
            and not self.cancelled
            and not self.failed
        )


class SynthesisStream:
    """The handle of one reply, used on the event loop: groups in, pieces out."""

    def __init__(self, worker: "EngineWorker", job: SpeechJob, model: str = "") -> None:
        self._worker = worker
        self.model = model  # the key of the model that speaks it
        self.voice = job.voice
        self.language = job.language
        self.params = job.params
        self._cancel = threading.Event()
        self._queue: "asyncio.Queue[object]" = asyncio.Queue()
        self.groups_heard = 0  # groups whose audio has all been read
        loop = asyncio.get_running_loop()
        # Groups whose audio has all come from the worker (read or not yet):
        # a front end's progress display.
        self.groups_made = 0

        def put(item: object) -> None:
            loop.call_soon_threadsafe(self._arrive, item)

        self._state = StreamState(job, self._cancel, put, worker.clock(), model)
        self._state.loop = loop

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _arrive(self, item: object) -> None:
        if item is GROUP_END:
            self.groups_made += 1
        self._queue.put_nowait(item)

    def add_group(self, text: str) -> None:
        """Queue a sentence group for synthesis."""
        self._worker.add(self._state, text)

    def close(self) -> None:
        """No more groups will come: the audio ends after the queued ones."""
        self._worker.close_stream(self._state)

    def cancel(self) -> None:
        """Abandon the reply: pending groups are dropped, the group in flight stops."""
        self._worker.cancel(self._state)

    def follow(self, before: "SynthesisStream") -> None:
        """This stream's audio continues `before`'s (a first sentence begun in a
        stream of its own before its text was certain): its groups begin only
        once `before` has spoken, and carry on its loudness gain, its listener's
        clock and its pauses between groups. Call before adding any group."""
        self._worker.follow(self._state, before._state)

    def on_idle(self, callback: Optional[Callable[[], None]]) -> None:
        """Call `callback` on the event loop whenever the worker has none of
        this stream's text left to speak (None: stop calling)."""
        self._worker.set_on_idle(self._state, callback)

    def starving_in(self) -> Optional[float]:
        """Seconds left to hand the worker more text before the listener hears
        a silence; <= 0: now. None while more audio is on its way (ask again
        after on_idle), and once the stream is closed or cancelled."""
        return self._worker.starving_in(self._state)

    async def pieces(self) -> AsyncIterator[Piece]:
        """Audio pieces in order; ends after close() and the last group.

        Raises EngineError if synthesis failed.
        """
        while True:
            item = await self._queue.get()
            if item is GROUP_END:
                self.groups_heard += 1
                self._worker.taken(self._state)
            elif item is STREAM_END:
                return
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, Piece)
                yield item
