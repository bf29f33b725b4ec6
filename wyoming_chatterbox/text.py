"""Turn an LLM reply (Markdown, emoji, symbols) into text that TTS reads well.

`clean_text` cleans a whole reply; `TextCleaner` cleans a reply streamed in
fragments cut anywhere and returns the cleaned text as early as it is certain.
Both are one streaming machine, so for any cutting of the input the fragments'
results joined equal `clean_text(text)` (tested with hypothesis). Pure: no I/O,
no audio. docs/design.md holds the stages and every decision (URLs, tables,
times, money, symbols, other languages).

Long (~550 lines): one streaming machine; its three stages share their patterns.
"""

from __future__ import annotations

import html
import re

import regex

from .english import DIGIT_STAR_RE, ENGLISH_GATE_RE, say_english

__all__ = [
    "TextCleaner",
    "clean_text",
    "PARALINGUISTIC_TAGS",
    "LINE_BREAKS",
    "LINE_BREAK_RE",
    "SYLLABIC_RE",
    "is_cjk",
]

# Chatterbox Turbo's paralinguistic tags: kept (lower case), everything else in
# square brackets loses its brackets.
PARALINGUISTIC_TAGS = (
    "laugh",
    "chuckle",
    "sigh",
    "cough",
    "gasp",
    "groan",
    "sniff",
    "shush",
    "clear throat",
)

# Line breaks (the cleaner keeps each; the sentence splitter ends a sentence
# at each: LLM replies use them for structure, not to wrap running text).
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
LINE_BREAK_RE = re.compile(f"[{LINE_BREAKS}]")

# Han and kana: scripts written without spaces, so each character is a word.
_CJK_RANGES = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF66, 0xFF9D),  # Halfwidth Katakana
    (0x20000, 0x3134F),  # CJK Extensions B-G
)
# Scripts in which one character is a syllable or more: those and Hangul.
SYLLABIC_RE = re.compile(
    "["
    + "".join(f"{chr(low)}-{chr(high)}" for low, high in _CJK_RANGES)
    + "\uac00-\ud7af]"
)


def is_cjk(char: str) -> bool:
    """Whether the character is Han or kana (see _CJK_RANGES)."""
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


# ---------------------------------------------------------------------------
# Block stage patterns
# ---------------------------------------------------------------------------

# Characters that may still turn a line start into a marker or a rule line.
_NOT_HOLD_RE = re.compile(r"[^ \t\-*_=|:+~#>`.)0-9]")
# A line of these alone carries no words: rules, separator rows, empty markers.
_SYMBOL_LINE_RE = re.compile(r"[ \t\-*_=|:+~#>`]*")
# Block markers at a line start, nested in any order ("> - ", "## 1. ").
_MARKERS_RE = re.compile(
    r"(?:[ \t]*(?:>|[-*+](?=[ \t])|\d{1,3}[.)](?=[ \t])|#{1,6}(?=[ \t]|\Z)))*"
)
_FENCE_RE = re.compile(r"[ \t]*(`{3,}|~{3,})")
_NOT_FENCE_CHAR_RE = {
    "`": re.compile(r"[^ \t`]"),
    "~": re.compile(r"[^ \t~]"),
}

_LINE_START = 0  # holding the start of a line
_CONTENT = 1  # passing the rest of a line through
_FENCE_INFO = 2  # holding a ``` line to its end (a backtick in it: not a fence)
_FENCE_START = 3  # in a code block, holding a line start (closing fence?)
_FENCE_SKIP = 4  # in a code block, dropping the rest of a line


# ---------------------------------------------------------------------------
# Inline stage patterns
# ---------------------------------------------------------------------------

_SEPARATOR_RE = re.compile(r"[\s|]+")
_WHITESPACE_SPLIT_RE = re.compile(r"(\s+)")

# A unit may take the next token when its last token ends like this.
_EXTEND_ALWAYS_RE = re.compile(r"(?i)\[clear\Z")
_EXTEND_ENGLISH_RE = re.compile(
    r"\d[*_~`]*\Z|\A(?:[$€£°]|No\.|no\.|Nr\.|nr\.|[*×=<>~≈≤≥/–-]|<=|>=|==)\Z"
)
_OPEN_TAG_RE = re.compile(r"<[A-Za-z/!][^<>]*\Z")
_MAX_UNIT_TOKENS = 12

# Tokens that need no cleaning: ASCII words with at most one trailing mark.
_PLAIN_RE = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*[.,;:!?)\"”]?")
_PLAIN_BUT_SPECIAL = frozenset({"vs", "vs.", "approx", "approx."})

# Emoji: pictographs with their modifiers, variation selectors, keycaps, flags
# (regional indicators, tag sequences) and the zero-width joiners between them.
_EMOJI_ATOM = (
    r"(?:[0-9#*]\uFE0F?\u20E3|[\p{Extended_Pictographic}\p{Emoji_Modifier}"
    r"\p{Regional_Indicator}\uFE0E\uFE0F\u20E3\U000E0020-\U000E007F])"
)
_EMOJI_RE = regex.compile(rf"\u200D*{_EMOJI_ATOM}(?:\u200D*{_EMOJI_ATOM})*\u200D*")
# Other symbols (So: ✓ ★ ™ ─ ...), controls, format, private use, unassigned;
# the degree signs stay (units), and so do the joiners scripts need.
_OTHER_SYMBOL_RE = regex.compile(
    r"(?![°℃℉\u200C\u200D])[\p{So}\p{Cc}\p{Cf}\p{Co}\p{Cs}\p{Cn}]"
)
# A joiner stays only inside a word (Indic scripts); checked last, once every
# neighbour is final.
_LOOSE_JOINER_RE = regex.compile(
    r"(?<![\p{L}\p{M}])[\u200C\u200D]|[\u200C\u200D](?!\p{L})"
)

_ENTITY_RE = re.compile(
    r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
)

_TAG_NAMES = "|".join(tag.replace(" ", r"\s+") for tag in PARALINGUISTIC_TAGS)
# [text](url): the destination (one level of parentheses); [text][label]: the
# label (unless it is a tag: "[chuckle][gasp]").
_LINK_TARGET_RE = re.compile(
    r"\]\((?:[^()\s]|\([^()\s]*\))*\)" rf"|\]\[(?!(?i:{_TAG_NAMES})\])[^\[\]\s]*\]"
)
_AUTOLINK_RE = re.compile(r"<((?:https?|ftp)://[^\s<>]*|mailto:[^\s<>]*)>", re.I)
_HTML_COMMENT_RE = re.compile(r"<!--.*?-->")
_HTML_TAG_RE = re.compile(r"</?([A-Za-z][A-Za-z0-9:-]*)(?:\s[^<>]*)?/?>|<![^<>]*>")
_HTML_BREAK_TAGS = frozenset(
    {"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "hr"}
)
_URL_RE = re.compile(
    r"(?<![\w@/])(?:[Hh][Tt][Tt][Pp][Ss]?://|[Ww]{3}\.(?=\w))[^\s<>\[\]\"'`]*"
)
_URL_TRAILING = ".,;:!?'\"*_~)"

_ARROW_RE = re.compile(r"-+>|=+>|[→⟶⇒⟹]")
_TAG_OR_BRACKET_RE = re.compile(
    rf"(?<!\S)\[[xX]\](?!\S)|(?<!\S)!(?=\[)|\[({_TAG_NAMES})\]|[\[\]{{}}]",
    re.I,
)
_EMPTY_PARENS_RE = re.compile(r"\(\s*\)")

# Emphasis, code and stray symbols.  An underscore inside a word (snake_case)
# stays; "*" between digits is multiplication.
_SYMBOL_RE = regex.compile(
    r"[`*~#\\]+|(?<![\p{L}\p{M}\p{N}])_+|_+(?![\p{L}\p{M}\p{N}])|[\^<>=|{}]"
)
_PUNCT_RUN_RE = re.compile(r"[!?]{2,}|,{2,}|\.{4,}|;{2,}|:{2,}|-{2,}|—{2,}|…{2,}")

# ---------------------------------------------------------------------------
# Cleaning one unit (one token, or a few that belong together)
# ---------------------------------------------------------------------------


def _domain(url: str) -> str:
    """``https://www.Example.com:8123/a?b`` -> ``example.com``."""
    rest = url.split("://", 1)[-1]
    host = re.split(r"[/?#]", rest, maxsplit=1)[0].rsplit("@", 1)[-1]
    host = host.split(":", 1)[0].lower()
    if host.startswith("www."):
        host = host[4:]
    return host.strip(".-")


def _url(match: re.Match[str]) -> str:
    url = match.group()
    trailing = ""
    while url and url[-1] in _URL_TRAILING:
        if url[-1] == ")" and url.count("(") >= url.count(")"):
            break
        trailing = url[-1] + trailing
        url = url[:-1]
    return _domain(url) + trailing


def _html_tag(match: re.Match[str]) -> str:
    name = match.group(1)
    return "\n" if name and name.lower() in _HTML_BREAK_TAGS else " "


def _tag_or_bracket(match: re.Match[str]) -> str:
    tag = match.group(1)
    if tag:
        return "[" + " ".join(tag.lower().split()) + "]"
    return ""


def _symbol(match: re.Match[str]) -> str:
    return " " if match.group()[0] in "^<>=|{}" else ""


def _punct_run(match: re.Match[str]) -> str:
    run = match.group()
    if run[0] in "!?":
        return "?" if "?" in run else "!"
    if run[0] == ".":
        return "..."
    if run[0] == "-":
        return "—"
    return run[0]


def _clean_unit(unit: str, english: bool) -> str:
    """Clean one unit of text (no line breaks); may return "" or several words."""
    if _PLAIN_RE.fullmatch(unit) and not (
        english and unit.lower() in _PLAIN_BUT_SPECIAL
    ):
        return unit
    text = unit
    if "&" in text:
        text = _ENTITY_RE.sub(lambda m: html.unescape(m.group()), text)
    if not text.isascii() or not text.isprintable():
        text = _EMOJI_RE.sub("", text)
        text = _OTHER_SYMBOL_RE.sub("", text)
    if "](" in text or "][" in text:
        text = _LINK_TARGET_RE.sub("", text)
    if "<" in text:
        text = _AUTOLINK_RE.sub(lambda m: " " + _domain(m.group(1)) + " ", text)
        text = _HTML_COMMENT_RE.sub(" ", text)
        text = _HTML_TAG_RE.sub(_html_tag, text)
    if "/" in text or "w" in text or "W" in text:
        text = _URL_RE.sub(_url, text)
    if ">" in text or "→" in text or "⟶" in text or "⇒" in text or "⟹" in text:
        text = _ARROW_RE.sub(" — ", text)
    if "[" in text or "]" in text or "{" in text or "}" in text:
        text = _TAG_OR_BRACKET_RE.sub(_tag_or_bracket, text)
    if "(" in text:
        text = _EMPTY_PARENS_RE.sub("", text)
    if english and ENGLISH_GATE_RE.search(text):
        text = say_english(text)
    elif "*" in text or "×" in text:
        text = DIGIT_STAR_RE.sub(" × ", text)
    text = _SYMBOL_RE.sub(_symbol, text)
    text = _PUNCT_RUN_RE.sub(_punct_run, text)
    if "\u200c" in text or "\u200d" in text:
        text = _LOOSE_JOINER_RE.sub("", text)
    return text


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


class _Emitter:
    """Whitespace: one space between words, ", " for a cell border, one line break."""

    __slots__ = ("_out", "_last", "_pending")

    _ATTACHING = ",;:!?)"

    def __init__(self) -> None:
        self._out: list[str] = []
        self._last = ""  # last character written ("" before any)
        self._pending = ""  # separator to write before the next word

    def separator(self, chars: str) -> None:
        for char in chars:
            if char in LINE_BREAKS:
                if self._last and self._last != "\n":
                    self._out.append("\n")
                    self._last = "\n"
                self._pending = ""
            elif self._last and self._last != "\n":
                if char == "|":
                    self._pending = ", "
                elif not self._pending:
                    self._pending = " "

    def write(self, text: str) -> None:
        """Write cleaned text: words and the whitespace between them."""
        if not text:
            return
        for index, piece in enumerate(_WHITESPACE_SPLIT_RE.split(text)):
            if index % 2:
                self.separator(piece)
            elif piece:
                self._word(piece)

    def _word(self, word: str) -> None:
        if self._pending:
            first = word[0]
            if first in self._ATTACHING or (
                first in ".…" and not any(char.isalnum() for char in word)
            ):
                pass  # "on 🎉." -> "on.", but "use .NET" keeps its space
            elif self._pending == ", " and self._last in ",;:.!?":
                self._out.append(" ")
            else:
                self._out.append(self._pending)
            self._pending = ""
        self._out.append(word)
        self._last = word[-1]

    def take(self) -> str:
        text = "".join(self._out)
        self._out.clear()
        return text

    def reset(self) -> None:
        self._out.clear()
        self._last = ""
        self._pending = ""


class _InlineStage:
    """Tokens -> units -> cleaned words, through the emitter."""

    def __init__(self, english: bool) -> None:
        self._english = english
        self._emitter = _Emitter()
        self._partial: list[str] = []  # pieces of the token being received
        self._unit: list[str] = []  # complete tokens of a unit that may grow
        self._unit_has_lt = False
        self._held_separator = ""  # blanks after the open unit's last token

    def feed(self, text: str) -> str:
        position = 0
        for match in _SEPARATOR_RE.finditer(text):
            token = text[position : match.start()]
            if self._partial:
                token = "".join(self._partial) + token
                self._partial.clear()
            if token:
                self._push(token)
            self._separator(match.group())
            position = match.end()
        if position < len(text):
            self._partial.append(text[position:])
        return self._emitter.take()

    def flush(self) -> str:
        if self._partial:
            self._push("".join(self._partial))
            self._partial.clear()
        if self._unit:
            self._finish_unit()
        text = self._emitter.take()
        self._emitter.reset()
        return text

    def _push(self, token: str) -> None:
        self._unit.append(token)
        self._held_separator = ""
        if "<" in token:
            self._unit_has_lt = True
        if not self._wants_more():
            self._finish_unit()

    def _wants_more(self) -> bool:
        unit = self._unit
        if len(unit) >= _MAX_UNIT_TOKENS:
            return False
        last = unit[-1]
        if self._english and _EXTEND_ENGLISH_RE.search(last):
            return True
        if "[" in last and _EXTEND_ALWAYS_RE.search(last):
            return True
        return self._unit_has_lt and bool(_OPEN_TAG_RE.search(" ".join(unit)))

    def _separator(self, separator: str) -> None:
        if self._unit:
            if "|" not in separator and not LINE_BREAK_RE.search(separator):
                self._held_separator = " "  # blanks only: one is as good as many
                return
            self._finish_unit()
        self._emitter.separator(separator)

    def _finish_unit(self) -> None:
        text = " ".join(self._unit)
        self._unit = []
        self._unit_has_lt = False
        self._emitter.write(_clean_unit(text, self._english))
        if self._held_separator:
            self._emitter.separator(self._held_separator)
            self._held_separator = ""


class _BlockStage:
    """Line starts: drop block markers, rule lines and fenced code blocks."""

    def __init__(self) -> None:
        self._mode = _LINE_START
        self._held: list[str] = []  # the held start of a line, in pieces
        self._fence_char = ""
        self._fence_length = 0

    def feed(self, text: str) -> str:
        out: list[str] = []
        position, length = 0, len(text)
        while position < length:
            mode = self._mode
            if mode == _CONTENT:
                match = LINE_BREAK_RE.search(text, position)
                if match is None:
                    out.append(text[position:])
                    break
                out.append(text[position : match.start()] + "\n")
                position = match.end()
                self._mode = _LINE_START
            elif mode == _LINE_START:
                match = _NOT_HOLD_RE.search(text, position)
                if match is None:
                    self._held.append(text[position:])
                    break
                end = match.start()
                if text[end] in LINE_BREAKS:
                    out.append(self._end_line(self._take(text[position:end]), True))
                else:
                    out.append(self._start_line(self._take(text[position : end + 1])))
                position = end + 1
            elif mode == _FENCE_INFO:
                match = LINE_BREAK_RE.search(text, position)
                if match is None:
                    self._held.append(text[position:])
                    break
                line = self._take(text[position : match.start()])
                out.append(self._end_line(line, True))
                position = match.end()
            elif mode == _FENCE_START:
                match = _NOT_FENCE_CHAR_RE[self._fence_char].search(text, position)
                if match is None:
                    self._held.append(text[position:])
                    break
                end = match.start()
                line = self._take(text[position:end])
                if text[end] in LINE_BREAKS:
                    if re.fullmatch(
                        rf"[ \t]*{re.escape(self._fence_char)}{{{self._fence_length},}}[ \t]*",
                        line,
                    ):
                        self._mode = _LINE_START
                else:
                    self._mode = _FENCE_SKIP
                position = end + 1
            else:  # _FENCE_SKIP
                match = LINE_BREAK_RE.search(text, position)
                if match is None:
                    break
                position = match.end()
                self._mode = _FENCE_START
        return "".join(out)

    def flush(self) -> str:
        text = ""
        held = self._take("")
        if self._mode in (_LINE_START, _FENCE_INFO) and held:
            text = self._end_line(held, False)
        self._mode = _LINE_START
        return text

    def _take(self, more: str) -> str:
        """The held text followed by ``more``; nothing is held afterwards."""
        if not self._held:
            return more
        self._held.append(more)
        text = "".join(self._held)
        self._held.clear()
        return text

    def _start_line(self, start: str) -> str:
        """A line start is decided: ``start`` ends with its first non-marker char."""
        fence = _FENCE_RE.match(start)
        if fence is not None:
            if fence.group(1)[0] == "`":
                self._held.append(start)  # a backtick later on the line: code span
                self._mode = _FENCE_INFO
                return ""
            self._open_fence(fence.group(1))
            self._mode = _FENCE_SKIP
            return ""
        self._mode = _CONTENT
        return _strip_markers(start)

    def _end_line(self, line: str, line_break: bool) -> str:
        """A whole line held (only marker characters, or a ``` line)."""
        self._mode = _LINE_START
        fence = _FENCE_RE.match(line)
        if fence is not None and (
            fence.group(1)[0] == "~" or "`" not in line[fence.end() :]
        ):
            self._open_fence(fence.group(1))
            return ""
        if _SYMBOL_LINE_RE.fullmatch(line):
            return ""
        return _strip_markers(line) + ("\n" if line_break else "")

    def _open_fence(self, run: str) -> None:
        self._fence_char = run[0]
        self._fence_length = len(run)
        self._mode = _FENCE_START


def _strip_markers(line: str) -> str:
    """Drop the block markers starting a line ("> - ", "## ", "1. ")."""
    match = _MARKERS_RE.match(line)
    return line[match.end() :] if match else line


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


class TextCleaner:
    """Clean a streamed LLM reply for speech, returning text as soon as it is final.

    For any cutting of a text into fragments, the concatenation of every
    :meth:`feed` result and then :meth:`flush` equals ``clean_text(text,
    language)``.  After :meth:`flush` the cleaner is ready for a new text.
    """

    def __init__(self, language: str = "en") -> None:
        self.language = language
        english = re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0] == "en"
        self._block = _BlockStage()
        self._inline = _InlineStage(english)

    def feed(self, chunk: str) -> str:
        """Add a fragment (cut anywhere); return the cleaned text now final."""
        return self._inline.feed(self._block.feed(chunk))

    def flush(self) -> str:
        """End of text: return the rest, and reset for a new text."""
        tail = self._inline.feed(self._block.flush())
        return tail + self._inline.flush()


def clean_text(text: str, language: str = "en") -> str:
    """Clean a whole LLM reply for speech (see :class:`TextCleaner`).

    The result has no leading whitespace, single spaces between words and one
    ``\n`` between lines; it never ends in a space (it may end in ``\n``).
    """
    cleaner = TextCleaner(language)
    return cleaner.feed(text) + cleaner.flush()
