"""Wyoming events in, audio events out: one handler per connection.

Describe is answered at once. A reply (a one-shot `synthesize`, or a
`synthesize-start` ... `synthesize-stop` stream) runs as a task of its own, so that
events keep being read while its audio is produced: the chunks of a stream arrive
while earlier groups are spoken, and a client that leaves is noticed at once and
its pending work is cancelled. Nothing here touches torch.
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, List, Optional, Set, Tuple

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
from .audio import CHANNELS, SAMPLE_WIDTH, float_to_pcm16, iter_chunks
from .engine import (
    EngineError,
    EngineWorker,
    Piece,
    SamplingParams,
    SynthesisStream,
    UnknownVoice,
    VoiceInfo,
)
from .limits import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_TEXT_CHARS,
    LINGER_SECONDS,
    MAX_REPLIES_PER_CONNECTION,
    IdleTimeout,
    ProtocolViolation,
    check_text_length,
    data_cap,
    deadline,
    linger,
    next_event,
)
from .sentences import IncrementalSplitter, split_groups
from .text import TextCleaner

_LOGGER = logging.getLogger(__name__)

ATTRIBUTION = Attribution(
    name="Resemble AI", url="https://github.com/resemble-ai/chatterbox"
)


@dataclass(frozen=True)
class ServerSettings:
    """What every connection's handler needs to know."""

    default_voice: str
    params: SamplingParams = field(default_factory=SamplingParams)
    samples_per_chunk: int = 1024
    streaming: bool = True
    # Streams: hand held-back sentences over before the listener runs dry.
    early_release: bool = True
    # Streams: begin the first sentence before the word confirming its end.
    speculative_start: bool = True
    clean_text: bool = True  # strip Markdown, emoji, URLs; say units in words
    loudness: Optional[float] = -16.0  # target LUFS of every reply; None: off
    sentence_silence: float = 0.0  # seconds of silence between groups
    idle_unload: Optional[float] = None  # seconds idle before freeing the model
    warm_up: bool = False  # one short generation before listening
    shutdown_grace: float = 5.0  # seconds replies get to finish on SIGTERM
    # Sockets only (not stdio://): close a connection silent this long with no
    # reply in progress, or that reads none of its audio this long; None: never.
    idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS  # per reply; more: text-too-long
    max_connections: Optional[int] = 64  # served at once; more are turned away


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


class _Reply:
    """Text of one reply on its way to the engine, and what it has produced."""

    def __init__(
        self,
        stream: SynthesisStream,
        streaming: bool,
        incremental: bool,
        clean: bool = True,
        max_chars: Optional[int] = None,
        early_release: bool = True,
        speculate: Optional[Callable[[], SynthesisStream]] = None,
    ):
        self.stream = stream
        self.max_chars = max_chars
        self.streaming = streaming
        self.chars = 0
        self.groups = 0
        self.task: "Optional[asyncio.Task[None]]" = None
        self._splitter: Optional[IncrementalSplitter] = (
            IncrementalSplitter() if incremental else None
        )
        self._buffer: List[str] = []
        self._cleaner: Optional[TextCleaner] = (
            TextCleaner(stream.language) if clean else None
        )
        # Streamed text: hands held-back sentences to the engine early when the
        # listener would otherwise run out of audio (see _release_early).
        self._early = early_release
        self._watcher: "Optional[asyncio.Task[None]]" = None
        self._wake = asyncio.Event()
        self.early_releases = 0
        # Streamed text: the first sentence begun on a guess, in a stream of its
        # own, before the word that confirms its end has come (see _speculate).
        self._speculate = speculate if self._splitter is not None else None
        self._guess: Optional[Tuple[str, SynthesisStream]] = None
        self._first: "asyncio.Future[Optional[SynthesisStream]]" = (
            asyncio.get_running_loop().create_future()
        )
        self.guesses = 0  # first sentences begun on a guess
        self.wrong_guesses = 0
        if self._speculate is None:
            self._first.set_result(None)

    def feed(self, text: str) -> None:
        """Raises TextTooLong, with nothing of `text` queued, past max_chars."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, not {type(text).__name__}")
        check_text_length(self.chars + len(text), self.max_chars)
        self.chars += len(text)
        if self._cleaner is not None:
            text = self._cleaner.feed(text)
        self._feed_clean(text)

    def _feed_clean(self, text: str) -> None:
        if self._splitter is None:
            self._buffer.append(text)
            return
        self._submit(self._splitter.feed(text))
        self._speculate_first()
        if self._early and self._splitter.waiting:
            if self._watcher is None:
                self.stream.on_idle = self._wake.set
                self._watcher = asyncio.create_task(self._release_early())
            self._wake.set()

    def _speculate_first(self) -> None:
        """Begin the first sentence as soon as the text seems to end it.

        The splitter is sure of a sentence end only once a whole word of the
        next sentence has come (an abbreviation is not an end): an LLM takes
        a few tens of milliseconds for that, which the engine spends making
        the first audio instead. The guess goes to a stream of its own whose
        audio is played only if the splitter's first group is the same text;
        otherwise that stream is cancelled, unheard.
        """
        if self._speculate is None or self._first.done():
            return
        assert self._splitter is not None
        if self._guess is not None:
            if self._splitter.first_still_possible(self._guess[0]):
                return
            self._drop_guess()
        guess = self._splitter.tentative_first()
        if guess is None or not any(char.isalnum() for char in guess):
            return
        stream = self._speculate()
        stream.add_group(guess)
        stream.close()
        stream.on_idle = self._wake.set
        self._guess = (guess, stream)
        self.guesses += 1
        _LOGGER.debug("Beginning the first sentence on a guess: %r", guess)

    def _drop_guess(self) -> None:
        if self._guess is not None:
            _LOGGER.debug("The first sentence was not %r", self._guess[0])
            self._guess[1].cancel()
            self._guess = None
            self.wrong_guesses += 1

    def _first_group(self, group: str) -> None:
        """The splitter's first group: play the guess if it was this group."""
        guess = self._guess
        self._guess = None
        if guess is not None and guess[0] == group:
            self.stream.follow(guess[1])
            self._first.set_result(guess[1])
            return
        if guess is not None:
            self._guess = guess
            self._drop_guess()
        self.stream.add_group(group)
        self._first.set_result(None)

    async def pieces(self) -> AsyncIterator[Piece]:
        """The reply's audio pieces, in order (see SynthesisStream.pieces)."""
        first = await self._first
        if first is not None:
            async for piece in first.pieces():
                yield piece
        async for piece in self.stream.pieces():
            yield piece

    async def _release_early(self) -> None:
        """Hand the sentences the splitter holds back (to fill a group of three)
        to the engine as soon as waiting for more would leave a silence.

        A short first sentence ("Sure!") is spoken in a moment, and the next
        group may take the LLM seconds to complete: rather than a gap, the
        sentences already complete go now, as a smaller group.  Runs until the
        reply's text ends; woken by new text and by the engine going idle.
        """
        splitter = self._splitter
        assert splitter is not None
        while True:
            self._wake.clear()
            due: Optional[float] = None
            if splitter.waiting:
                due = self.stream.starving_in()
                if due is not None and due <= 0:
                    groups = splitter.release()
                    self.early_releases += 1
                    _LOGGER.debug("Listener about to run dry: speaking %r now", groups)
                    self._submit(groups)
                    continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), due)

    def _stop_watching(self) -> None:
        self._early = False
        self.stream.on_idle = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def cancel(self) -> None:
        """Abandon the reply (see SynthesisStream.cancel)."""
        self._stop_watching()
        if self._guess is not None:
            self._guess[1].cancel()
            self._guess = None
        if self._first.done():
            first = self._first.result()
            if first is not None:
                first.cancel()
        else:
            self._first.set_result(None)
        self.stream.cancel()

    def finish(self) -> None:
        self._stop_watching()
        if self._cleaner is not None:
            self._feed_clean(self._cleaner.flush())
        if self._splitter is None:
            self._submit(split_groups("".join(self._buffer)))
        else:
            self._submit(self._splitter.flush())
        if not self._first.done():  # no speakable text at all
            self._drop_guess()
            self._first.set_result(None)
        self.stream.close()

    def _submit(self, groups: List[str]) -> None:
        for group in groups:
            if not any(char.isalnum() for char in group):
                continue  # "...", "?!", a lone emoji: nothing a voice can say
            self.groups += 1
            if not self._first.done():
                self._first_group(group)
            else:
                self.stream.add_group(group)


class Connections:
    """The server's open connections, so that a shutdown can end them well."""

    def __init__(self) -> None:
        self.handlers: "Set[ChatterboxEventHandler]" = set()
        self.draining = False
        self.on_reply: Optional[Callable[[ReplyRecord], None]] = None

    async def drain(self, grace: float) -> None:
        """Let replies in progress finish for up to `grace` seconds, cut the rest
        short (their audio ends with audio-stop), then close every connection."""
        self.draining = True
        handlers = list(self.handlers)
        await asyncio.gather(*(handler.drain(grace) for handler in handlers))

    def active_replies(self) -> int:
        """Replies being spoken or waiting their turn, over all connections."""
        return sum(len(handler._replies) for handler in list(self.handlers))

    def rejected(self, voice: str, chars: int) -> None:
        """A request refused before any work (e.g. an unknown voice)."""
        record = ReplyRecord("rejected", voice, "", chars, 0, None, 0.0, 0.0)
        if self.on_reply is not None:
            self.on_reply(record)


@dataclass(frozen=True)
class ReplyRecord:
    """What one reply did: for the log line and the metrics."""

    outcome: str  # done, cancelled, failed, rejected
    voice: str
    language: str
    chars: int
    groups: int
    first_audio: Optional[float]  # seconds from request to first audio chunk
    total: float
    audio: float  # seconds of audio sent


class ChatterboxEventHandler(AsyncEventHandler):
    """Speaks Synthesize requests and streams with the engine."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        engine: EngineWorker,
        settings: ServerSettings,
        connections: Optional[Connections] = None,
    ) -> None:
        super().__init__(reader, writer)
        self._engine = engine
        self._settings = settings
        self._connections = connections or Connections()
        self._connections.handlers.add(self)
        self._stream_reply: Optional[_Reply] = None  # an open synthesize-start
        self._replies: List[_Reply] = []  # replies whose task has not ended

    async def run(self) -> None:
        """AsyncEventHandler.run, hardened against what any LAN device may send.

        Events are read with caps (wyoming_chatterbox.limits); what breaks the
        protocol, or a reply's text over the limit, is answered with an error event
        naming the problem, its pending work is cancelled and the connection closed.
        A socket silent for `idle_timeout` with no reply in progress is closed, and
        one that reads none of its audio for as long is dropped (write_event).
        """
        self._is_running = True
        idle = self._idle_timeout()
        caps = {"max_data": data_cap(self._settings.max_text_chars)}
        close_on_client = False  # the server ends it: let the last events arrive
        try:
            while self._is_running:
                try:
                    event = await next_event(self.reader, idle, self._busy, **caps)
                    if event is None:
                        break
                    self._check_queue(event)
                    if not await self.handle_event(event):
                        close_on_client = True
                        break
                except (ProtocolViolation, IdleTimeout) as err:
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
        try:
            # Inline, not wait_for: a task per write could reorder the events.
            async with deadline(timeout):
                await super().write_event(event)
        except asyncio.TimeoutError:
            self.writer.transport.abort()
            raise ConnectionResetError(
                f"the client read nothing for {timeout} seconds"
            ) from None

    def _idle_timeout(self) -> Optional[float]:
        if self.writer.get_extra_info("socket") is None:
            return None  # stdio://: one parent process, silent as long as it likes
        return self._settings.idle_timeout or None

    def _busy(self) -> "List[asyncio.Task[None]]":
        return [reply.task for reply in self._replies if reply.task is not None]

    def _check_queue(self, event: Event) -> None:
        """Refuse a new reply when this connection already has many waiting."""
        opens = SynthesizeStart.is_type(event.type) or (
            Synthesize.is_type(event.type) and self._stream_reply is None
        )
        if opens and len(self._replies) >= MAX_REPLIES_PER_CONNECTION:
            raise ProtocolViolation(
                f"Too many replies: {len(self._replies)} are already waiting on this "
                f"connection (at most {MAX_REPLIES_PER_CONNECTION}); wait for their "
                "audio before sending more",
                "too-many-requests",
            )

    async def _refuse(self, err: Exception) -> None:
        """Cancel this connection's work, then say why it is being closed."""
        peer = self.writer.get_extra_info("peername")
        if isinstance(err, IdleTimeout):
            _LOGGER.debug("Closing idle connection %s", peer)
            code = "idle-timeout"
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

    async def drain(self, grace: float) -> None:
        """Part of a shutdown: see Connections.drain."""
        if self._stream_reply is not None:
            # The rest of the text will not be waited for.
            self._stream_reply.finish()
            self._stream_reply = None
        tasks = [reply.task for reply in self._replies if reply.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                for reply in list(self._replies):
                    reply.cancel()
                await asyncio.wait(pending, timeout=2.0)
        with contextlib.suppress(Exception):
            await self.stop()

    async def handle_event(self, event: Event) -> bool:
        try:
            return await self._handle_event(event)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # An event of a known type but the wrong shape, e.g. no "text".
            _LOGGER.warning("Bad %s event: %r", event.type, err)
            await self.write_event(
                Error(
                    text=f"Malformed {event.type} event: {err!r}", code="bad-request"
                ).event()
            )
            return False

    async def _handle_event(self, event: Event) -> bool:
        if self._connections.draining and (
            Synthesize.is_type(event.type) or SynthesizeStart.is_type(event.type)
        ):
            # Replies already under way on this connection still finish.
            await self.write_event(
                Error(
                    text="The server is shutting down; try again in a moment.",
                    code="shutting-down",
                ).event()
            )
            return True
        if Describe.is_type(event.type):
            info = build_info(
                self._engine.voices(),
                self._settings.streaming,
                self._engine.backend.model_name,
            )
            await self.write_event(info.event())
            return True

        if Synthesize.is_type(event.type):
            if self._stream_reply is not None:
                # Home Assistant repeats the whole text as synthesize inside a
                # stream for older servers; the stream's chunks already have it.
                _LOGGER.debug("Ignoring synthesize inside a stream")
                return True
            synthesize = Synthesize.from_event(event)
            reply = await self._open_reply(synthesize.voice, streaming=False)
            if reply is None:
                return False
            reply.feed(synthesize.text)
            reply.finish()
            return True

        if SynthesizeStart.is_type(event.type):
            if self._stream_reply is not None:
                _LOGGER.warning("synthesize-start inside a stream: ending that stream")
                self._stream_reply.finish()
                self._stream_reply = None
            start = SynthesizeStart.from_event(event)
            self._stream_reply = await self._open_reply(start.voice, streaming=True)
            return self._stream_reply is not None

        if SynthesizeChunk.is_type(event.type):
            if self._stream_reply is None:
                _LOGGER.warning("Ignoring synthesize-chunk outside a stream")
            else:
                self._stream_reply.feed(SynthesizeChunk.from_event(event).text)
            return True

        if SynthesizeStop.is_type(event.type):
            if self._stream_reply is None:
                # Nothing was started, but the client waits for this answer.
                await self.write_event(SynthesizeStopped().event())
            else:
                self._stream_reply.finish()
                self._stream_reply = None
            return True

        _LOGGER.debug("Ignoring event: %s", event.type)
        return True

    async def disconnect(self) -> None:
        """The client left (Home Assistant's way to stop): abandon all its work."""
        self._connections.handlers.discard(self)
        current = asyncio.current_task()
        for reply in list(self._replies):
            reply.cancel()
            if reply.task is not None and reply.task is not current:
                reply.task.cancel()
        self._stream_reply = None

    async def _open_reply(
        self, voice: Optional[SynthesizeVoice], streaming: bool
    ) -> Optional[_Reply]:
        """Start a reply task; None (after an error event) for an unknown voice."""
        name = (
            voice.name if voice is not None else None
        ) or self._settings.default_voice
        # Wyoming sends a name or a language, never both (a name overrides the
        # language): a language alone means the default voice in that language.
        language = voice.language if voice is not None else None
        try:
            resolved = self._engine.backend.resolve_voice(name, language)
        except UnknownVoice as err:
            _LOGGER.warning("Unknown voice requested: %r", name)
            self._connections.rejected(name, 0)
            await self.write_event(Error(text=str(err), code="unknown-voice").event())
            return None

        params = dataclasses.replace(
            self._settings.params, **resolved.params  # type: ignore[arg-type]
        )
        # Home Assistant plays a one-shot reply only once all of it has come.
        stream = self._engine.open_stream(
            resolved.name, params, resolved.language, whole=not streaming
        )
        reply = _Reply(
            stream,
            streaming=streaming,
            incremental=streaming and self._settings.streaming,
            clean=self._settings.clean_text,
            max_chars=self._settings.max_text_chars,
            early_release=self._settings.early_release,
            speculate=(
                (
                    lambda: self._engine.open_stream(
                        resolved.name, params, resolved.language
                    )
                )
                if self._settings.speculative_start
                else None
            ),
        )
        # Replies on one connection are spoken one after another, never mixed.
        previous = self._replies[-1].task if self._replies else None
        self._replies.append(reply)
        reply.task = asyncio.create_task(self._speak(reply, previous))
        return reply

    async def _speak(
        self, reply: _Reply, previous: "Optional[asyncio.Task[None]]"
    ) -> None:
        """Send the reply's audio: one audio-start, its chunks, one audio-stop."""
        if previous is not None:
            await asyncio.wait([previous])
        rate = self._engine.sample_rate
        started = time.monotonic()
        first_audio: Optional[float] = None
        samples = 0
        outcome = "cancelled"
        try:
            await self.write_event(
                AudioStart(rate=rate, width=SAMPLE_WIDTH, channels=CHANNELS).event()
            )
            async for piece in reply.pieces():
                pcm = float_to_pcm16(piece.audio)
                for chunk in iter_chunks(pcm, self._settings.samples_per_chunk):
                    await self.write_event(
                        AudioChunk(
                            rate=rate,
                            width=SAMPLE_WIDTH,
                            channels=CHANNELS,
                            audio=chunk,
                            timestamp=samples * 1000 // rate,
                        ).event()
                    )
                    if first_audio is None:
                        first_audio = time.monotonic()
                    samples += len(chunk) // (SAMPLE_WIDTH * CHANNELS)
            await self.write_event(AudioStop(timestamp=samples * 1000 // rate).event())
            if reply.streaming:
                await self.write_event(SynthesizeStopped().event())
            # Cut short by a shutdown, the audio still ends with audio-stop.
            outcome = "cancelled" if reply.stream.cancelled else "done"
        except EngineError as err:
            outcome = "failed"
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.write_event(
                    Error(text=str(err), code="synthesis-failed").event()
                )
            # Without a close, a client could wait for audio-stop forever.
            await self.stop()
        except (ConnectionError, RuntimeError) as err:
            _LOGGER.debug("Client gone while sending audio: %s", err)
        finally:
            reply.cancel()
            self._replies.remove(reply)
            record = ReplyRecord(
                outcome=outcome,
                voice=reply.stream.voice,
                language=reply.stream.language,
                chars=reply.chars,
                groups=reply.groups,
                first_audio=first_audio - started if first_audio else None,
                total=time.monotonic() - started,
                audio=samples / rate,
            )
            log_reply(record)
            if self._connections.on_reply is not None:
                self._connections.on_reply(record)


def log_reply(record: ReplyRecord) -> None:
    """One line per reply, with what a user tuning the server wants to know."""
    _LOGGER.info(
        "Reply %s: voice=%s language=%s chars=%s groups=%s first_audio=%s "
        "total=%.2fs audio=%.2fs rtf=%s",
        record.outcome,
        record.voice,
        record.language,
        record.chars,
        record.groups,
        f"{record.first_audio:.3f}s" if record.first_audio is not None else "-",
        record.total,
        record.audio,
        f"{record.total / record.audio:.2f}" if record.audio else "-",
    )
