"""Wyoming events in, audio events out: one handler per connection.

Describe is answered at once. A reply (a one-shot `synthesize`, or a
`synthesize-start` ... `synthesize-stop` stream) is a `Reply` (reply.py) whose
audio is sent by a task of its own, so that events keep being read while it is
spoken: a stream's chunks arrive while earlier groups are spoken, and a client
that leaves is noticed at once and its work cancelled. A handler also tells the
listener's admission policy (admission.py) how idle it is, and can be evicted.
This module is the protocol only: text handling and scheduling live in reply.py
and engine.py.

Long (~490 lines): the protocol's branches and the one loop that keeps a
connection's clocks (idle, stream timeout, eviction); split, a connection's
life would be spread over two modules.
"""

import asyncio
import contextlib
import logging
import time
from typing import Callable, Dict, List, Optional, Set

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from . import __version__
from .admission import client_key
from .audio import CHANNELS, SAMPLE_WIDTH, iter_chunks
from .reply import Replies, Reply, TextTooLong
from .settings import ServerSettings
from .speech import EngineError, UnknownVoice, VoiceInfo
from .wire import (
    LINGER_SECONDS,
    MAX_REPLIES_PER_CONNECTION,
    IdleTimeout,
    ProtocolViolation,
    StreamTimeout,
    data_cap,
    deadline,
    linger,
    next_event,
)

_LOGGER = logging.getLogger(__name__)

# A piece's audio-chunk events are written in runs of this many (0.7 s of
# audio), with the event loop free between runs and after the first chunk.
YIELD_EVERY_CHUNKS = 16

# A connection whose audio waits this long for the client to read any of it is
# not producing audio, for the admission policy: its client has stopped
# reading (or vanished), and it may be evicted when the server is full. Home
# Assistant reads audio as it comes; a client playing in real time leaves a
# write blocked for well under a second at a time.
STALLED_WRITE_S = 5.0

ATTRIBUTION = Attribution(
    name="Resemble AI", url="https://github.com/resemble-ai/chatterbox"
)


def build_info(
    voices: List[VoiceInfo], streaming: bool, model_name: str = "Chatterbox Turbo"
) -> Info:
    return Info(
        tts=[
            TtsProgram(
                name="chatterbox",
                description=f"{model_name} text to speech by Resemble AI",
                attribution=ATTRIBUTION,
                installed=True,
                version=__version__,
                voices=[
                    TtsVoice(
                        name=voice.name,
                        description=voice.description,
                        attribution=ATTRIBUTION,
                        installed=True,
                        version=None,
                        languages=list(voice.languages),
                    )
                    for voice in voices
                ],
                supports_synthesize_streaming=streaming,
            )
        ]
    )


class Evicted(Exception):
    """Closed to make room for another connection (admission.py says which)."""

    code = "evicted"


class Connections:
    """The server's open connections, so that a shutdown can end them well and
    the listener can see who holds them."""

    def __init__(self) -> None:
        self.handlers: "Set[ChatterboxEventHandler]" = set()
        self.draining = False
        # Called with "stream-timeout" when a stream is ended for its silence.
        self.observers: List[Callable[[str], None]] = []

    def open(self) -> "List[ChatterboxEventHandler]":
        """The connections open now (not those closing)."""
        return list(self.handlers)

    def note(self, what: str) -> None:
        for observer in self.observers:
            observer(what)

    async def drain(self, grace: float) -> None:
        """Let replies in progress finish for up to `grace` seconds, cut the rest
        short (their audio ends with audio-stop), then close every connection."""
        self.draining = True
        handlers = list(self.handlers)
        await asyncio.gather(*(handler.drain(grace) for handler in handlers))


class ChatterboxEventHandler(AsyncEventHandler):
    """Speaks Synthesize requests and streams through the reply pipeline."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        replies: Replies,
        settings: ServerSettings,
        connections: Optional[Connections] = None,
    ) -> None:
        super().__init__(reader, writer)
        self._replies = replies
        self._settings = settings
        self._connections = connections or Connections()
        self._connections.handlers.add(self)
        self._stream: Optional[Reply] = None  # an open synthesize-start
        # Replies whose audio task has not ended, in order (spoken one by one).
        self._tasks: "Dict[Reply, asyncio.Task[None]]" = {}
        self._peer = writer.get_extra_info("peername")
        self._client = client_key(self._peer)
        self._idle_since = time.monotonic()  # last event in or out
        self._writes = 0  # writes waiting for the socket
        self._write_waits_since = 0.0
        self._evicted: "asyncio.Future[BaseException]" = (
            asyncio.get_running_loop().create_future()
        )

    # --- what the admission policy sees (admission.Connection) ---

    @property
    def client(self) -> Optional[str]:
        return self._client

    @property
    def idle_since(self) -> float:
        return self._idle_since

    @property
    def producing_audio(self) -> bool:
        stalled = (
            self._writes > 0
            and time.monotonic() - self._write_waits_since >= STALLED_WRITE_S
        )
        return not stalled and any(reply.speaking for reply in self._tasks)

    def evict(self, text: str) -> None:
        """Close this connection to make room for another: its work is
        cancelled, and it gets an `evicted` error saying why."""
        self._connections.handlers.discard(self)
        if not self._evicted.done():
            self._evicted.set_result(Evicted(text))

    # --- the connection ---

    async def run(self) -> None:
        """AsyncEventHandler.run, hardened against what any LAN device may send.

        Events are read with caps (wire.py); what breaks the protocol, or a
        reply's text over the limit, is answered with an error event naming the
        problem, its pending work is cancelled and the connection closed. A
        socket silent for `idle_timeout` with no reply in progress is closed,
        and one that reads none of its audio for as long is dropped. A stream
        with no event for `stream_timeout` is ended (_end_stream). An evicted
        connection gets an error saying why, and is closed.
        """
        self._is_running = True
        idle = self._idle_timeout()
        stream_timeout = None
        if self.writer.get_extra_info("socket") is not None:
            # Not stdio://: one parent process, as slow as it likes.
            stream_timeout = self._settings.stream_timeout
        caps = {"max_data": data_cap(self._replies.settings.max_text_chars)}
        close_on_client = False  # the server ends it: let the last events arrive

        def busy() -> "List[asyncio.Task[None]]":
            return list(self._tasks.values())

        try:
            while self._is_running:
                try:
                    event = await next_event(
                        self.reader,
                        idle,
                        busy,
                        stream_timeout=stream_timeout,
                        streaming=lambda: self._stream is not None,
                        interrupt=self._evicted,
                        **caps,
                    )
                    if event is None:
                        break
                    self._idle_since = time.monotonic()
                    self._check_queue(event)
                    if not await self.handle_event(event):
                        close_on_client = True
                        break
                except StreamTimeout as err:
                    await self._end_stream(err)
                    close_on_client = True
                    break
                except (ProtocolViolation, IdleTimeout, TextTooLong, Evicted) as err:
                    await self._refuse(err)
                    close_on_client = True
                    break
        except ConnectionError as err:
            _LOGGER.debug("Connection lost: %s", err)
        except Exception:  # pylint: disable=broad-except
            _LOGGER.exception("Unexpected error on a connection; closing it")
        finally:
            await self.disconnect()
            try:
                if close_on_client and self._is_running:
                    await linger(self.reader, self.writer)
            finally:
                self.writer.close()

    async def write_event(self, event: Event) -> None:
        """A socket client that reads nothing for `idle_timeout` while audio waits
        for it is gone: ConnectionResetError, and the connection is dropped."""
        timeout = self._idle_timeout()
        if self._writes == 0:
            self._write_waits_since = time.monotonic()
        self._writes += 1
        try:
            # Inline, not wait_for: a task per write could reorder the events.
            async with deadline(timeout):
                await super().write_event(event)
        except asyncio.TimeoutError:
            self.writer.transport.abort()
            raise ConnectionResetError(
                f"the client read nothing for {timeout} seconds"
            ) from None
        finally:
            self._writes -= 1
        self._idle_since = self._write_waits_since = time.monotonic()

    def _idle_timeout(self) -> Optional[float]:
        if self.writer.get_extra_info("socket") is None:
            return None  # stdio://: one parent process, silent as long as it likes
        return self._settings.idle_timeout or None

    def _check_queue(self, event: Event) -> None:
        """Refuse a new reply when this connection already has many waiting."""
        opens = SynthesizeStart.is_type(event.type) or (
            Synthesize.is_type(event.type) and self._stream is None
        )
        if opens and len(self._tasks) >= MAX_REPLIES_PER_CONNECTION:
            raise ProtocolViolation(
                f"Too many replies: {len(self._tasks)} are already waiting on this "
                f"connection (at most {MAX_REPLIES_PER_CONNECTION}); wait for their "
                "audio before sending more",
                "too-many-requests",
            )

    async def _refuse(self, err: Exception) -> None:
        """Cancel this connection's work, then say why it is being closed."""
        peer = self._peer
        if isinstance(err, IdleTimeout):
            _LOGGER.debug("Closing idle connection %s", peer)
            code = "idle-timeout"
        elif isinstance(err, Evicted):
            code = err.code  # logged by the admission policy, at most once a minute
        else:
            _LOGGER.warning("Refused a request from %s: %s", peer, err)
            code = getattr(err, "code", "bad-request")
        await self.disconnect()  # no audio of a cancelled reply after the error
        error = Error(text=str(err), code=code).event()
        with contextlib.suppress(
            ConnectionError, RuntimeError, OSError, asyncio.TimeoutError
        ):
            # A client that does not read cannot hold the connection open.
            async with deadline(LINGER_SECONDS):
                await self.write_event(error)

    async def _end_stream(self, err: StreamTimeout) -> None:
        """A stream that went silent: speak what came, answer it with
        synthesize-stopped (the reply's audio task does), then close."""
        assert self._stream is not None
        stream, self._stream = self._stream, None
        _LOGGER.warning(
            "No event for %g s in a stream from %s: speaking the %d characters it "
            "sent, then closing the connection (--stream-timeout)",
            err.seconds,
            self._peer,
            stream.chars,
        )
        self._connections.note("stream-timeout")
        stream.finish()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks)

    async def drain(self, grace: float) -> None:
        """Part of a shutdown: see Connections.drain."""
        if self._stream is not None:
            # The rest of the text will not be waited for.
            self._stream.finish()
            self._stream = None
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                for reply in list(self._tasks):
                    reply.cancel()
                await asyncio.wait(pending, timeout=2.0)
        with contextlib.suppress(Exception):
            await self.stop()

    async def disconnect(self) -> None:
        """The client left (Home Assistant's way to stop): abandon all its work."""
        self._connections.handlers.discard(self)
        current = asyncio.current_task()
        for reply, task in list(self._tasks.items()):
            reply.cancel()
            if task is not current:
                task.cancel()
        self._stream = None

    # --- the events ---

    async def handle_event(self, event: Event) -> bool:
        try:
            return await self._handle_event(event)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # An event of a known type but the wrong shape, e.g. no "text".
            _LOGGER.warning("Bad %s event: %r", event.type, err)
            await self._error(f"Malformed {event.type} event: {err!r}", "bad-request")
            return False

    async def _handle_event(self, event: Event) -> bool:
        opens = Synthesize.is_type(event.type) or SynthesizeStart.is_type(event.type)
        if opens and self._connections.draining:
            # Replies already under way on this connection still finish.
            await self._error(
                "The server is shutting down; try again in a moment.",
                "shutting-down",
            )
            return True
        if Describe.is_type(event.type):
            await self.write_event(self._info().event())
            return True
        if Synthesize.is_type(event.type):
            return await self._synthesize(Synthesize.from_event(event))
        if SynthesizeStart.is_type(event.type):
            return await self._start(SynthesizeStart.from_event(event))
        if SynthesizeChunk.is_type(event.type):
            self._chunk(SynthesizeChunk.from_event(event))
            return True
        if SynthesizeStop.is_type(event.type):
            await self._stop()
            return True
        _LOGGER.debug("Ignoring event: %s", event.type)
        return True

    def _info(self) -> Info:
        engine = self._replies.engine
        streaming = self._replies.settings.streaming
        return build_info(engine.voices(), streaming, engine.backend.model_name)

    async def _synthesize(self, synthesize: Synthesize) -> bool:
        if self._stream is not None:
            # Home Assistant repeats the whole text as synthesize inside a
            # stream for older servers; the stream's chunks already have it.
            _LOGGER.debug("Ignoring synthesize inside a stream")
            return True
        reply = await self._open(synthesize.voice, streamed=False)
        if reply is None:
            return False
        reply.feed(synthesize.text)
        reply.finish()
        return True

    async def _start(self, start: SynthesizeStart) -> bool:
        if self._stream is not None:
            _LOGGER.warning("synthesize-start inside a stream: ending that stream")
            self._stream.finish()
        self._stream = await self._open(start.voice, streamed=True)
        return self._stream is not None

    def _chunk(self, chunk: SynthesizeChunk) -> None:
        if self._stream is None:
            _LOGGER.warning("Ignoring synthesize-chunk outside a stream")
        else:
            self._stream.feed(chunk.text)

    async def _stop(self) -> None:
        if self._stream is None:
            # Nothing was started, but the client waits for this answer.
            await self.write_event(SynthesizeStopped().event())
        else:
            self._stream.finish()
            self._stream = None

    async def _error(self, text: str, code: str) -> None:
        await self.write_event(Error(text=text, code=code).event())

    # --- a reply ---

    async def _open(
        self, voice: Optional[SynthesizeVoice], streamed: bool
    ) -> Optional[Reply]:
        """Start a reply and its audio task; None (after an error event) for an
        unknown voice. Wyoming sends a voice name or a language, never both (a
        name overrides the language): a language alone means the default voice
        in that language. Home Assistant plays a one-shot reply only once all
        of it has come, a stream as it comes."""
        name = voice.name if voice is not None else None
        language = voice.language if voice is not None else None
        try:
            reply = self._replies.open(name, language, live=streamed)
        except UnknownVoice as err:
            _LOGGER.warning("Unknown voice requested: %r", name)
            await self._error(str(err), "unknown-voice")
            return None
        # Replies on one connection are spoken one after another, never mixed.
        previous = list(self._tasks.values())[-1] if self._tasks else None
        self._tasks[reply] = asyncio.create_task(self._send(reply, previous, streamed))
        return reply

    async def _send(
        self, reply: Reply, previous: "Optional[asyncio.Task[None]]", streamed: bool
    ) -> None:
        """Send the reply's audio: one audio-start, its chunks, one audio-stop
        (and synthesize-stopped after a stream)."""
        if previous is not None:
            await asyncio.wait([previous])
        rate = reply.sample_rate
        audio = {"rate": rate, "width": SAMPLE_WIDTH, "channels": CHANNELS}
        samples = 0
        delivered = False
        try:
            await self.write_event(AudioStart(**audio).event())
            async for pcm in reply.audio():
                chunks = iter_chunks(pcm, self._settings.samples_per_chunk)
                for index, chunk in enumerate(chunks):
                    timestamp = samples * 1000 // rate
                    await self.write_event(
                        AudioChunk(audio=chunk, timestamp=timestamp, **audio).event()
                    )
                    samples += len(chunk) // (SAMPLE_WIDTH * CHANNELS)
                    if index % YIELD_EVERY_CHUNKS == 0:
                        # A write the socket takes does not yield, and a long
                        # piece is hundreds of chunks: let other connections
                        # (and their first audio) go, after the first chunk.
                        await asyncio.sleep(0)
            await self.write_event(AudioStop(timestamp=samples * 1000 // rate).event())
            if streamed:
                await self.write_event(SynthesizeStopped().event())
            delivered = True
        except EngineError as err:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._error(str(err), "synthesis-failed")
            # Without a close, a client could wait for audio-stop forever.
            await self.stop()
        except (ConnectionError, RuntimeError) as err:
            _LOGGER.debug("Client gone while sending audio: %s", err)
        finally:
            # Cut short by a shutdown, the audio still ends with audio-stop,
            # and the reply counts as cancelled.
            reply.end(delivered)
            self._tasks.pop(reply, None)
