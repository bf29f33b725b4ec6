"""Cut text into sentence groups, each one call to the TTS model.

This module owns the text side of synthesis chunking: splitting text into
sentences (abbreviation-safe, via ``sentencex``), cutting sentences that are too
long for the model at clause boundaries, and packing sentences into groups.
Groups are what the synthesis code sends to Chatterbox one at a time.

Two entry points share one implementation so that they always agree:

* :func:`split_groups` for text known in full (a Home Assistant one-shot reply);
* :class:`IncrementalSplitter` for text streamed in fragments (an LLM reply).
  It returns each group as soon as no later text can change it, and for any
  fragmentation its output equals ``split_groups`` of the whole text.

Pure functions and one small class: no audio, no I/O, no asyncio.

Long (~600 lines): one algorithm (scan, cut, pack) that streaming and whole
text must share exactly.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

# Segmenter: sentencex (Wikimedia, Rust core) rather than pysbd, measured on
# this module's test cases.  Both handle titles, initials, e.g./i.e./etc./vs.,
# decimals, versions, quotes and CJK.  pysbd (0.3.4, unreleased since 2021)
# missed Hindi "।" and Arabic "؟" as "en", never split "on Main St. He is" or
# "the Dr. He said", cut a URL at its "?", and took ~200 µs per short text
# against ~1.5 µs; the streaming path below re-runs the segmenter often.
# pysbd did better on inline lists and single line breaks; both are handled
# around sentencex here instead, along with its other misses: the Greek ";",
# "…" (not a terminator to it), punctuation-only segments ("...", "🎉") and
# splits inside a word ("Hello.World").
import sentencex  # type: ignore[import-untyped,unused-ignore]

from .text import LINE_BREAK_RE, is_cjk

_LOGGER = logging.getLogger(__name__)

MAX_GROUP_CHARS = 300
MAX_GROUP_SENTENCES = 3

# Abbreviation lists come from this language; sentence terminators of other
# scripts (。 । ؟ ...) are recognised whatever the language.
_LANGUAGE = "en"


# A Greek ";" (or U+037E) is a question mark; sentencex only knows that when
# told the text is Greek, and we do not know the language of the text.
_GREEK_QUESTION_RE = re.compile("(?<=[\u0370-\u03ff\u1f00-\u1fff]);|\u037e")

# sentencex splits at "..." (unless a lowercase word follows) but never at "…";
# it is shown "..." so that both spellings split the same way.
_ELLIPSIS = "\u2026"

# Closing marks left at the start of the next segment ("**Bold.** Next").
_CLOSER_RUN_RE = re.compile(r"""[*_~"'”’»)\]}]+\s+""")

# A numbered list marker starting the unconsumed text: "1. Eggs", "2) Milk".
_LIST_START_RE = re.compile(r"\s*(\d{1,3})([.)])(?=\s)")

# "Steps: 1. ..." starts a list after a colon.
_COLON_LIST_RE = re.compile(r"(?<=[:：])\s+(1[.)])(?=\s)")

# Words a tentative sentence end is tried with: capitalised, as the next
# sentence's first word would be. A name is the harder test: sentencex then
# keeps "Dr.", "e.g.", "U.S.", "a.m." (which "The" would split after) joined.
_PROBE_WORDS = ("The", "Jones")

# Stands in for the "." of a list marker so sentencex does not end "1." there.
_MARKER_PLACEHOLDER = "\ue000"

# A too-long sentence is best cut after clause punctuation, else after a comma.
_STRONG_CLAUSE_CHARS = frozenset(";:—–；：")
_COMMA_CHARS = frozenset(",，、")
_CLOSING_CHARS = "\"'”’»)]}"

# Cutting costs, in units of one extra piece (one more model call): the DP
# weighs where to cut against how uneven the pieces get, short pieces most.
_PIECE_COST = 1.0
_UNEVEN_COST = 0.5
_SHORT_COST = 2.0
_STRONG_CUT_COST = 0.0
_COMMA_CUT_COST = 1.0
_SPACE_CUT_COST = 3.0
_HARD_CUT_COST = 10.0


def split_sentences(text: str, *, max_chars: int = MAX_GROUP_CHARS) -> list[str]:
    """Split text into sentences.

    Returns stripped, non-empty sentences with inner whitespace collapsed to
    single spaces.  A sentence longer than ``max_chars`` is cut into pieces of
    at most ``max_chars`` characters (see :func:`_cut_long_sentence`); each
    piece counts as a sentence.
    """
    _check_limits(max_chars, 1)
    scanner = _SentenceScanner()
    raw = scanner.feed(text) + scanner.finish()
    return [
        piece for sentence in raw for piece in _cut_long_sentence(sentence, max_chars)
    ]


def group_sentences(
    sentences: list[str],
    max_chars: int = MAX_GROUP_CHARS,
    max_sentences: int = MAX_GROUP_SENTENCES,
) -> list[str]:
    """Pack sentences into groups, each joined with single spaces.

    The first sentence is a group of its own so the first audio comes early.
    The rest are packed greedily: a group takes the next sentence while it has
    fewer than ``max_sentences`` sentences and stays within ``max_chars``.  A
    short last group (fewer than ``max_sentences``) is merged into the group
    before it when that is not the first group and the result fits
    ``max_chars``.  Blank sentences are ignored.
    """
    _check_limits(max_chars, max_sentences)
    kept = [sentence.strip() for sentence in sentences if sentence.strip()]
    if not kept:
        return []
    packed = _merge_last(
        _pack(kept[1:], max_chars, max_sentences), max_chars, max_sentences
    )
    return [kept[0]] + [" ".join(group) for group in packed]


def split_groups(
    text: str,
    max_chars: int = MAX_GROUP_CHARS,
    max_sentences: int = MAX_GROUP_SENTENCES,
) -> list[str]:
    """Split text known in full into groups (sentences, then grouping)."""
    return group_sentences(
        split_sentences(text, max_chars=max_chars), max_chars, max_sentences
    )


class IncrementalSplitter:
    """Turn a stream of text fragments into groups as early as possible.

    For any fragmentation of a text, the concatenation of every :meth:`feed`
    result and then :meth:`flush` equals ``split_groups(text, max_chars,
    max_sentences)``.  After :meth:`flush` the splitter is ready for a new text.
    """

    def __init__(
        self,
        max_chars: int = MAX_GROUP_CHARS,
        max_sentences: int = MAX_GROUP_SENTENCES,
    ) -> None:
        _check_limits(max_chars, max_sentences)
        self._max_chars = max_chars
        self._max_sentences = max_sentences
        self._scanner = _SentenceScanner()
        self._first_emitted = False
        # Completed sentences not yet in an emitted group; they always start
        # a greedy group, so packing them alone matches packing the whole text.
        self._pending: list[str] = []

    def feed(self, fragment: str) -> list[str]:
        """Add a fragment (cut anywhere); return the groups that became final."""
        return self._settle(self._scanner.feed(fragment), final=False)

    def flush(self) -> list[str]:
        """End of stream: return every remaining group and reset."""
        groups = self._settle(self._scanner.finish(), final=True)
        self._scanner = _SentenceScanner()
        self._first_emitted = False
        self._pending = []
        return groups

    @property
    def waiting(self) -> int:
        """Complete sentences held back to fill a group (not the one being written)."""
        return len(self._pending)

    def tentative_first(self) -> str | None:
        """The first sentence, when the text so far seems to end it but the word
        that would make that certain has not come yet.

        A guess to start speaking on (the word after a full stop takes an LLM a
        few tens of milliseconds): ``None`` once the first group was returned,
        or unless the segmenter would end a sentence here were a capitalised
        word to follow.  Check it with :meth:`first_still_possible`.
        """
        if self._first_emitted:
            return None
        return self._scanner.tentative(self._max_chars)

    def first_still_possible(self, guess: str) -> bool:
        """False once the text has shown that ``guess`` is not the first
        sentence (the first group differs from it, or a whole word came after
        it without ending it there)."""
        if self._first_emitted:
            return False
        tail = " ".join(self._scanner.tail.split())
        if not tail.startswith(guess):
            return False
        rest = tail[len(guess) :]
        return not rest or (rest[0] == " " and not _has_complete_word(rest))

    def release(self) -> list[str]:
        """Return the complete sentences held back, as groups, now.

        For a listener about to run out of audio: a smaller group spoken now
        beats a full one after a silence.  The text still being written stays;
        later sentences are packed afresh.  Output after a release no longer
        equals ``split_groups`` of the whole text.
        """
        groups = [
            " ".join(group)
            for group in _pack(self._pending, self._max_chars, self._max_sentences)
        ]
        self._pending = []
        return groups

    def _settle(self, sentences: list[str], final: bool) -> list[str]:
        out: list[str] = []
        for sentence in sentences:
            for piece in _cut_long_sentence(sentence, self._max_chars):
                if self._first_emitted:
                    self._pending.append(piece)
                else:
                    out.append(piece)
                    self._first_emitted = True

        packed = _pack(self._pending, self._max_chars, self._max_sentences)
        if final:
            packed = _merge_last(packed, self._max_chars, self._max_sentences)
            out.extend(" ".join(group) for group in packed)
            self._pending = []
            return out

        # Only the last two groups can still change: the last may grow, and
        # it may end up merged into the one before it.
        n_final = max(0, len(packed) - 2)
        if len(packed) >= 2 and not _can_merge(
            packed[-2], packed[-1], self._max_chars, self._max_sentences
        ):
            n_final = len(packed) - 1
        out.extend(" ".join(group) for group in packed[:n_final])
        self._pending = [sentence for group in packed[n_final:] for sentence in group]
        return out


class _SentenceScanner:
    """Find sentences in streamed text, deciding each boundary from a bounded window.

    Running sentencex on everything received so far would let later text undo
    an earlier boundary (an abbreviation, a quote closing) and costs O(n²).
    Instead, boundaries are looked for only at checkpoints: just after a word
    ends (non-space then space) or after a CJK character.  At a checkpoint the
    segmenter runs on the unconsumed line text up to the checkpoint, and every
    boundary followed by at least one complete word in that window is
    committed; the committed text leaves the buffer.  Each decision depends only
    on the text up to its checkpoint, so the result is the same however the
    text was fragmented; :func:`split_sentences` runs the same code on the whole
    text.  A line break commits the rest of its line.
    """

    def __init__(self) -> None:
        self._tail = ""  # unconsumed text of the current line
        self._scan_pos = 0  # index in _tail up to which checkpoints were looked for
        self._checkpoints: list[int] = []  # checkpoints in _tail so far
        self._list_next: tuple[int, str] | None = None  # next inline list marker

    def feed(self, fragment: str) -> list[str]:
        """Add text; return the sentences it completed."""
        out: list[str] = []
        lines = LINE_BREAK_RE.split(fragment)
        for line in lines[:-1]:
            self._tail += line
            self._scan(out)
            self._finish_line(out)
        self._tail += lines[-1]
        self._scan(out)
        return out

    @property
    def tail(self) -> str:
        """Text not yet returned as sentences."""
        return self._tail

    def tentative(self, max_chars: int) -> str | None:
        """See IncrementalSplitter.tentative_first."""
        text = self._tail.strip()
        if not text or len(text) > max_chars or LINE_BREAK_RE.search(text):
            return None
        if not _has_alnum(text) or not _has_trigger(text[-1]):
            return None
        for word in _PROBE_WORDS:
            probe = text + " " + word
            ends = _segment_ends(probe, final=False)
            if len(ends) < 2 or probe[: ends[0]].strip() != text:
                return None
        return " ".join(text.split())

    def finish(self) -> list[str]:
        """End of text: return the remaining sentences and reset."""
        out: list[str] = []
        self._finish_line(out)
        return out

    def _scan(self, out: list[str]) -> None:
        index = self._scan_pos
        while index < len(self._tail):
            char = self._tail[index]
            index += 1
            if not (
                (char.isspace() and index >= 2 and not self._tail[index - 2].isspace())
                or is_cjk(char)
            ):
                continue
            self._checkpoints.append(index)
            # A boundary is confirmed by the word after it, so punctuation must
            # sit in the last two words; otherwise skip the segmenter.  Keeps
            # long sentences cheap; depends on the text alone, like the rest.
            start = self._checkpoints[-3] if len(self._checkpoints) >= 3 else 0
            if not _has_trigger(self._tail[start:index]):
                continue
            if self._commit_window(index, out):
                index = 0  # the tail now starts after the committed text
        self._scan_pos = index

    def _commit_window(self, end: int, out: list[str]) -> bool:
        """Commit what the window ``_tail[:end]`` makes certain; True if any."""
        window = self._tail[:end]
        forced = self._forced_list_boundary(window)
        if forced is not None:
            self._commit(_segment_ends(self._tail[:forced], final=True), out)
            return True
        ends = _segment_ends(window, final=False)
        certain = [e for e in ends[:-1] if _has_complete_word(window[e:])]
        if not certain:
            return False
        self._commit([e for e in ends if e <= certain[-1]], out)
        return True

    def _finish_line(self, out: list[str]) -> None:
        while self._tail.strip():
            forced = self._forced_list_boundary(self._tail)
            cut = len(self._tail) if forced is None else forced
            self._commit(_segment_ends(self._tail[:cut], final=True), out)
        self._tail = ""
        self._scan_pos = 0
        self._checkpoints = []
        self._list_next = None

    def _commit(self, ends: list[int], out: list[str]) -> None:
        """Emit ``_tail`` up to each of ``ends`` as sentences; drop it from the tail."""
        marker = _LIST_START_RE.match(self._tail)
        if marker is not None:
            self._list_next = (int(marker.group(1)) + 1, marker.group(2))
        start = 0
        for end in ends:
            sentence = " ".join(self._tail[start:end].split())
            if sentence:
                out.append(sentence)
            start = end
        self._tail = self._tail[start:]
        self._scan_pos = 0
        self._checkpoints = []

    def _forced_list_boundary(self, text: str) -> int | None:
        """Index where an inline list item starts ("1. Eggs 2. Milk"), if any."""
        marker = _LIST_START_RE.match(text)
        expected = self._list_next
        search_from = 0
        if marker is not None:
            expected = (int(marker.group(1)) + 1, marker.group(2))
            search_from = marker.end()
        found: list[int] = []
        if expected is not None:
            number, mark = expected
            pattern = re.compile(rf"(?<=\s){number}{re.escape(mark)}(?=\s)")
            match = pattern.search(text, search_from)
            if match is not None:
                found.append(match.start())
        colon = _COLON_LIST_RE.search(text, search_from)
        if colon is not None:
            found.append(colon.start(1))
        found = [index for index in found if text[:index].strip()]
        return min(found) if found else None


def _segment_ends(text: str, final: bool) -> list[int]:
    """End offsets of the sentences sentencex finds in ``text`` (last == len).

    Segments without a letter or digit ("...", "🎉") join the next segment, or
    the previous one when ``final`` and they come last.
    """
    shown = _GREEK_QUESTION_RE.sub("?", text)
    marker = _LIST_START_RE.match(shown)
    if marker is not None and marker.group(2) == ".":
        dot = marker.start(2)
        shown = shown[:dot] + _MARKER_PLACEHOLDER + shown[dot + 1 :]
    # Map each offset of what sentencex sees back to an offset in ``text``.
    origin: list[int] | None = None
    if _ELLIPSIS in shown:
        origin = []
        for index, char in enumerate(shown):
            origin.extend(
                [index] if char != _ELLIPSIS else [index, index + 1, index + 1]
            )
        origin.append(len(shown))
        shown = shown.replace(_ELLIPSIS, "...")

    segments = [str(segment) for segment in sentencex.segment(_LANGUAGE, shown)]
    if "".join(segments) != shown:
        # Never seen; sentencex is lossless on single lines.  Keep the text.
        _LOGGER.debug("sentencex did not return its input, not splitting: %r", text)
        return [len(text)]
    raw_ends: list[int] = []
    offset = 0
    for segment in segments:
        offset += len(segment)
        end = offset if origin is None else origin[offset]
        if not raw_ends or end > raw_ends[-1]:
            raw_ends.append(end)

    ends: list[int] = []
    start = 0
    for end in raw_ends:
        if end < len(text):
            # "**Bold.** Next": closing marks belong to the sentence they close.
            closer = _CLOSER_RUN_RE.match(text, end)
            if closer is not None:
                end = closer.end()
        if end <= start or (
            end < len(text)
            and not (_is_word_break(text, end) and _has_alnum(text[start:end]))
        ):
            continue
        ends.append(end)
        start = end
    if final and len(ends) >= 2 and not _has_alnum(text[ends[-2] :]):
        del ends[-2]
    return ends or [len(text)]


def _cut_long_sentence(sentence: str, max_chars: int) -> list[str]:
    """Cut a sentence longer than ``max_chars`` into pieces of at most that.

    Cuts prefer clause punctuation (; : — –), then commas, then plain spaces,
    and pieces are kept near even; a dynamic programme picks the cheapest set of
    cuts.  Words are never cut, except a single word longer than ``max_chars``
    (a URL), which is cut into even chunks.
    """
    if len(sentence) <= max_chars:
        return [sentence]

    # Atoms are words, or chunks of an over-long word; a piece is a run of atoms.
    starts: list[int] = []
    stops: list[int] = []
    hard_before: list[bool] = []  # True: atom continues the previous atom's word
    for match in re.finditer(r"\S+", sentence):
        word_start, word_stop = match.span()
        n_chunks = math.ceil((word_stop - word_start) / max_chars)
        base, extra = divmod(word_stop - word_start, n_chunks)
        position = word_start
        for chunk in range(n_chunks):
            size = base + (1 if chunk < extra else 0)
            starts.append(position)
            stops.append(position + size)
            hard_before.append(chunk > 0)
            position += size

    n_atoms = len(starts)
    target = len(sentence) / math.ceil(len(sentence) / max_chars)
    best = [math.inf] * (n_atoms + 1)
    back = [0] * (n_atoms + 1)
    best[0] = 0.0
    for stop in range(1, n_atoms + 1):
        cut_cost = 0.0
        if stop < n_atoms:
            cut_cost = _cut_cost(
                sentence[starts[stop - 1] : stops[stop - 1]], hard_before[stop]
            )
        for start in range(stop - 1, -1, -1):
            length = stops[stop - 1] - starts[start]
            if length > max_chars:
                break
            weight = _UNEVEN_COST + (_SHORT_COST if length < target else 0.0)
            deviation = (length - target) / target
            cost = best[start] + _PIECE_COST + cut_cost + weight * deviation**2
            if cost < best[stop]:
                best[stop] = cost
                back[stop] = start

    pieces: list[str] = []
    stop = n_atoms
    while stop > 0:
        start = back[stop]
        pieces.append(sentence[starts[start] : stops[stop - 1]])
        stop = start
    pieces.reverse()
    return pieces


def _cut_cost(word_before: str, hard: bool) -> float:
    """Cost of cutting right after ``word_before``."""
    if hard:
        return _HARD_CUT_COST
    stripped = word_before.rstrip(_CLOSING_CHARS) or word_before
    if stripped[-1] in _STRONG_CLAUSE_CHARS:
        return _STRONG_CUT_COST
    if stripped[-1] in _COMMA_CHARS:
        return _COMMA_CUT_COST
    return _SPACE_CUT_COST


def _pack(
    sentences: Sequence[str], max_chars: int, max_sentences: int
) -> list[list[str]]:
    """Greedy packing: take sentences while under both limits."""
    groups: list[list[str]] = []
    current: list[str] = []
    length = 0
    for sentence in sentences:
        if current and (
            len(current) >= max_sentences or length + 1 + len(sentence) > max_chars
        ):
            groups.append(current)
            current = []
        length = len(sentence) if not current else length + 1 + len(sentence)
        current.append(sentence)
    if current:
        groups.append(current)
    return groups


def _merge_last(
    groups: list[list[str]], max_chars: int, max_sentences: int
) -> list[list[str]]:
    """Merge a short last group into the one before it when it fits."""
    if len(groups) >= 2 and _can_merge(
        groups[-2], groups[-1], max_chars, max_sentences
    ):
        return groups[:-2] + [groups[-2] + groups[-1]]
    return groups


def _can_merge(
    before: list[str], last: list[str], max_chars: int, max_sentences: int
) -> bool:
    return len(last) < max_sentences and _joined_len(before + last) <= max_chars


def _joined_len(sentences: list[str]) -> int:
    return sum(len(sentence) for sentence in sentences) + len(sentences) - 1


def _check_limits(max_chars: int, max_sentences: int) -> None:
    if max_chars < 1 or max_sentences < 1:
        raise ValueError(
            "max_chars and max_sentences must be >= 1, "
            f"got {max_chars} and {max_sentences}"
        )


def _is_word_break(text: str, index: int) -> bool:
    """Whether a sentence may end at ``index`` without cutting a word.

    sentencex also splits "Hello.World" and "Stop.:"; only CJK text, written
    without spaces, may end a sentence where there is no space.
    """
    before, after = text[index - 1], text[index]
    return before.isspace() or after.isspace() or _is_wide(before) or _is_wide(after)


def _is_wide(char: str) -> bool:
    """CJK characters and CJK or fullwidth punctuation (。！？)."""
    code = ord(char)
    return is_cjk(char) or 0x3000 <= code <= 0x303F or 0xFF00 <= code <= 0xFFEF


def _has_trigger(text: str) -> bool:
    """Whether text holds punctuation that could end a sentence or a list item."""
    return any(not (char.isalnum() or char.isspace() or char == ",") for char in text)


def _has_alnum(text: str) -> bool:
    return any(char.isalnum() for char in text)


def _has_complete_word(text: str) -> bool:
    """Whether text holds a word followed by whitespace, or a CJK character."""
    previous_is_word = False
    for char in text:
        if is_cjk(char):
            return True
        if char.isspace():
            if previous_is_word:
                return True
            previous_is_word = False
        else:
            previous_is_word = True
    return False
