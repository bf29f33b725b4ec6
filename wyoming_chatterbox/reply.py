"""The reply pipeline, free of any protocol: text in, PCM out.

A front end (the Wyoming handler, an HTTP endpoint) opens a `Reply` from
`Replies`, feeds it text (whole, or in fragments as an LLM writes it), and
reads 16-bit PCM as the engine makes it: text -> cleanup (text.py) -> sentence
groups (sentences.py) -> an engine stream (engine.py) -> loudness-normalised
audio -> PCM. Streamed text is split as it arrives; held-back sentences are
released early when the listener would run dry, and the first sentence is
begun on a guess at its full stop. Every reply ends with one `ReplyRecord`
(the log line and the metrics). Nothing here knows Wyoming or HTTP.
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, List, Mapping, Optional, Set, Tuple

from .audio import CHANNELS, SAMPLE_WIDTH, float_to_pcm16
from .engine import EngineWorker
from .sentences import IncrementalSplitter, split_groups
from .settings import ReplySettings
from .speech import EngineError, UnknownVoice
from .stream import SynthesisStream
from .text import TextCleaner

_LOGGER = logging.getLogger(__name__)


class TextTooLong(Exception):
    """A reply's text went over the server's limit (counted as it arrives)."""

    code = "text-too-long"

    def __init__(self, chars: int, limit: int) -> None:
        super().__init__(
            f"Text too long: this reply has {chars} characters and the limit is "
            f"{limit} characters per reply; send a shorter text"
        )
        self.chars = chars
        self.limit = limit


@dataclass(frozen=True)
class ReplyRecord:
    """What one reply did: for the log line and the metrics."""

    outcome: str  # done, cancelled, failed, rejected
    voice: str
    language: str
    chars: int
    groups: int
    first_audio: Optional[float]  # seconds from request to first audio
    total: float
    audio: float  # seconds of audio sent
    model: str = ""  # the key of the model that spoke it (rejected: none)


def log_reply(record: ReplyRecord) -> None:
    """One line per reply, with what a user tuning the server wants to know."""
    _LOGGER.info(
        "Reply %s: model=%s voice=%s language=%s chars=%s groups=%s "
        "first_audio=%s total=%.2fs audio=%.2fs rtf=%s",
        record.outcome,
        record.model or "-",
        record.voice,
        record.language,
        record.chars,
        record.groups,
        f"{record.first_audio:.3f}s" if record.first_audio is not None else "-",
        record.total,
        record.audio,
        f"{record.total / record.audio:.2f}" if record.audio else "-",
    )


class Replies:
    """Opens replies on one engine and keeps count of those in progress."""

    def __init__(self, engine: EngineWorker, settings: ReplySettings) -> None:
        self.engine = engine
        self.settings = settings
        self._active: Set["Reply"] = set()
        # Called with every reply's record as it ends (metrics).
        self.observers: List[Callable[[ReplyRecord], None]] = []

    def open(
        self,
        voice: Optional[str],
        language: Optional[str],
        live: bool,
        overrides: Optional[Mapping[str, float]] = None,
    ) -> "Reply":
        """A new reply in `voice` (None: the default voice) and `language`.

        `live`: the listener plays audio as it comes (a stream); otherwise it
        waits for all of it (one piece per group is less work then).
        `overrides`: this request's sampling settings, over the voice's and
        the server's (checked by the caller). Raises UnknownVoice, after recording the
        refusal.
        """
        name = voice or self.settings.default_voice
        try:
            resolved = self.engine.resolve_voice(name, language)
        except UnknownVoice:
            # Counted, not logged as a reply: the caller logs the refusal.
            self._notify(ReplyRecord("rejected", name, "", 0, 0, None, 0.0, 0.0))
            raise
        model = resolved.model  # the engine's models say which speaks the voice
        params = dataclasses.replace(
            self.engine.models.default_params(model),
            **{**self.settings.params, **resolved.params, **(overrides or {})},  # type: ignore[arg-type]
        )
        stream = self.engine.open_stream(
            resolved.name, params, resolved.language, whole=not live, model=model
        )

        def speculate() -> SynthesisStream:
            return self.engine.open_stream(
                resolved.name, params, resolved.language, model=model
            )

        reply = Reply(
            self,
            stream,
            incremental=live and self.settings.streaming,
            speculate=speculate if self.settings.speculative_start else None,
        )
        self._active.add(reply)
        return reply

    def active(self) -> int:
        """Replies being spoken or waiting their turn."""
        return len(self._active)

    def cancel_all(self) -> int:
        """Cancel every reply in progress; returns how many there were."""
        replies = list(self._active)
        for reply in replies:
            reply.cancel()
        return len(replies)

    def ended(self, reply: "Reply", record: ReplyRecord) -> None:
        """Called once by each reply as it ends."""
        self._active.discard(reply)
        log_reply(record)
        self._notify(record)

    def _notify(self, record: ReplyRecord) -> None:
        for observer in self.observers:
            observer(record)


class Reply:
    """One reply's text on its way to the engine, and its audio back."""

    def __init__(
        self,
        replies: Replies,
        stream: SynthesisStream,
        incremental: bool,
        speculate: Optional[Callable[[], SynthesisStream]] = None,
    ) -> None:
        settings = replies.settings
        self._replies = replies
        self.stream = stream
        self.sample_rate = replies.engine.sample_rate
        self.max_chars = settings.max_text_chars
        self.chars = 0
        self.groups = 0
        self.started = time.monotonic()
        self.first_audio: Optional[float] = None
        self.samples = 0
        self._failed = False
        self._ended = False
        self._splitter: Optional[IncrementalSplitter] = (
            IncrementalSplitter() if incremental else None
        )
        self._buffer: List[str] = []
        self._cleaner: Optional[TextCleaner] = (
            TextCleaner(stream.language) if settings.clean_text else None
        )
        # Streamed text: hands held-back sentences to the engine early when the
        # listener would otherwise run out of audio (see _release_early).
        self._early = settings.early_release
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

    # --- text in ---

    def feed(self, text: str) -> None:
        """More of the reply's text. Raises TextTooLong, with nothing of `text`
        queued, past the limit."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, not {type(text).__name__}")
        chars = self.chars + len(text)
        if chars > self.max_chars:
            raise TextTooLong(chars, self.max_chars)
        self.chars = chars
        if self._cleaner is not None:
            text = self._cleaner.feed(text)
        self._feed_clean(text)

    def finish(self) -> None:
        """The text is complete: what is held back goes to the engine."""
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

    def _feed_clean(self, text: str) -> None:
        if self._splitter is None:
            self._buffer.append(text)
            return
        self._submit(self._splitter.feed(text))
        self._speculate_first()
        if self._early and self._splitter.waiting:
            if self._watcher is None:
                self.stream.on_idle(self._wake.set)
                self._watcher = asyncio.create_task(self._release_early())
            self._wake.set()

    def _submit(self, groups: List[str]) -> None:
        for group in groups:
            if not any(char.isalnum() for char in group):
                continue  # "...", "?!", a lone emoji: nothing a voice can say
            self.groups += 1
            if not self._first.done():
                self._first_group(group)
            else:
                self.stream.add_group(group)

    # --- the first sentence on a guess ---

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
        stream.on_idle(self._wake.set)
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

    # --- early release ---

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
        # Not `while True`: asyncio.wait_for (Python < 3.12) can swallow the
        # cancel of a watch woken at that moment; the flag ends it anyway.
        while self._early:
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
        self.stream.on_idle(None)
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    # --- audio out ---

    async def audio(self) -> AsyncIterator[bytes]:
        """The reply's audio as 16-bit mono PCM at `sample_rate`, a piece at a
        time, as made; ends when the reply does (or is cancelled). Raises
        EngineError if synthesis failed."""
        # The reply's clock starts when its audio is wanted: replies queued on
        # one connection do not count their wait for the one before.
        self.started = time.monotonic()
        try:
            first = await self._first
            streams = [self.stream] if first is None else [first, self.stream]
            for stream in streams:
                async for piece in stream.pieces():
                    pcm = float_to_pcm16(piece.audio)
                    if self.first_audio is None:
                        self.first_audio = time.monotonic()
                    self.samples += len(pcm) // (SAMPLE_WIDTH * CHANNELS)
                    yield pcm
        except EngineError:
            self._failed = True
            raise

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    @property
    def groups_done(self) -> int:
        """Sentence groups whose audio is all made, of `groups` so far."""
        first = self._first.result() if self._first.done() else None
        return self.stream.groups_made + (first.groups_made if first else 0)

    @property
    def speaking(self) -> bool:
        """Whether some of the text it was given is still to be heard: being
        made, or its audio not yet all read. A stream waiting for more text (an
        LLM still writing, or a client gone silent) is not speaking."""
        if self._ended or self.cancelled:
            return False
        heard = self.stream.groups_heard
        if self._first.done():
            first = self._first.result()
            heard += first.groups_heard if first is not None else 0
        return self._guess is not None or self.groups > heard

    def cancel(self) -> None:
        """Abandon the reply: no more audio, the engine stops its work."""
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

    def end(self, delivered: bool) -> ReplyRecord:
        """The front end is done with the reply (`delivered`: all its audio
        reached the listener). Cancels what is left; records it once."""
        outcome = "cancelled"
        if self._failed:
            outcome = "failed"
        elif delivered and not self.cancelled:
            outcome = "done"
        self.cancel()
        record = ReplyRecord(
            outcome=outcome,
            voice=self.stream.voice,
            language=self.stream.language,
            chars=self.chars,
            groups=self.groups,
            first_audio=(self.first_audio - self.started if self.first_audio else None),
            total=time.monotonic() - self.started,
            audio=self.samples / self.sample_rate,
            model=self.stream.model,
        )
        if not self._ended:
            self._ended = True
            self._replies.ended(self, record)
        return record
