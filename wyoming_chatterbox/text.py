"""Turn an LLM reply (Markdown, emoji, symbols) into text that TTS reads well.

Home Assistant hands the TTS what its LLM wrote: Markdown with bold words, lists,
headings, links, tables, code blocks, emoji and units like ``21°C``.  Read as is,
the model would say "asterisk", read URLs letter by letter or stumble on emoji.
:func:`clean_text` cleans a whole reply; :class:`TextCleaner` cleans a reply
streamed in fragments cut anywhere (mid-word, mid-markup, one character at a
time) and returns the cleaned text as early as it is certain.

Design: one streaming machine, three stages
-------------------------------------------
:func:`clean_text` *is* the streaming machine fed the whole text at once, so the
two can never disagree.  For any cutting of the input into fragments, the
concatenation of every :meth:`TextCleaner.feed` result and :meth:`TextCleaner.flush`
equals ``clean_text(text)``: each stage below decides only from text it has
seen, and holds text back exactly while a later character could change the
decision.  Each stage is chunking-independent on its own, so their chain is.

1. **Block stage** (line starts).  Markdown's block syntax lives at the start of
   a line: headings (``#``), list markers (``-``, ``*``, ``+``, ``1.``, ``1)``),
   blockquotes (``>``), code fences (`````` ``` `````` / ``~~~``), horizontal rules
   and table separator rows.  The start of a line is held while it holds only
   characters that could still form such a marker (``- * _ = | : + ~ # > ` . )``,
   digits, blanks), then the markers are removed and the rest of the line passes
   straight through.  A line made only of those symbols (``---``, ``|---|---|``,
   ``***``, ``===``) is dropped.  Fenced code blocks are dropped entirely, fences
   included: code is not speakable.  Every line break is passed on as ``\\n``, so
   headings, list items and table rows stay on lines of their own (the sentence
   splitter ends a sentence at a line break).

2. **Inline stage** (words).  The line text is cut into tokens at whitespace and
   ``|`` (a table cell border).  A token is cleaned once it is complete (followed
   by a separator).  A few constructs span tokens, so a token can be held until
   the next one is complete: in English a number (``21 °C``, ``3:45 pm``, ``5
   km/h``, ``10 €``), an operator (``2 * 3``, ``< 5``), a lone currency sign and
   ``No.``; in any language ``[clear`` (of ``[clear throat]``) and an HTML tag
   still open (``<a href="x">``); a unit takes at most 12 tokens.  These tokens
   form one *unit*, cleaned by one pure function (:func:`_clean_unit`): emoji,
   links, URLs, HTML, entities, paralinguistic tags, English number rules,
   emphasis markers and stray symbols, punctuation runs.  A unit never spans a
   line break or a table cell border.

3. **Emitter** (whitespace).  Runs of blanks become one space, a table cell
   border becomes ``", "``, and line breaks become one ``\\n`` (blank lines and
   lines that cleaned to nothing disappear).  A space is written only when the
   next word arrives, so the output never ends in a space and no space is left
   before punctuation whose word cleaned away (``"on 🎉."`` -> ``"on."``); a line
   break is written at once, so the sentence splitter can close a line without
   waiting for more text.

What is held back, and why: the partial last word (it may still grow into a
URL, a unit or a tag); a number's next word (``21`` may be followed by ``°C``);
the start of a line while it may still become a marker; an open HTML tag; a
code block (dropped).  Emphasis is *not* held: markers are removed where they
stand, without pairing ``**`` with its closer, so ``**Bold`` streams at once;
the result is the same for speech and no open ``**`` can hold back a sentence.
Feeding ``"Hello there. How"`` returns ``"Hello there."`` (the space follows
with the next word).

Libraries
---------
``regex`` (a dependency of ``transformers``, hence of chatterbox) for
``\\p{Extended_Pictographic}`` and other Unicode properties the standard ``re``
lacks; emoji ranges written by hand go stale with each Unicode release.
``markdown-it-py`` is not used: it parses whole documents, so streaming with it
would mean re-parsing the accumulated text on every fragment (quadratic), and a
prefix can parse differently once more text arrives (setext headings, lazy
continuation lines, reference links), so nothing could be emitted early with
certainty.  Speech only needs markers removed, not a document tree.
``num2words`` is not installed; times are spelled out by a small converter
(hours and minutes only need 0-59).

Decisions
---------
* URLs (``http://``, ``https://``, ``www.``, ``<https://...>``) become their
  domain, lower case and without ``www.``: ``https://www.home-assistant.io/x`` ->
  ``home-assistant.io``.  ``[text](url)`` -> ``text``; ``![alt](url)`` -> ``alt``.
* Fenced code blocks are dropped; inline code keeps its text.
* Table rows become their cells joined by ``", "``, one row per line.
* Times (English): ``3:45 pm`` -> ``three forty-five PM``; ``10:00`` -> ``ten
  o'clock``; a 24-hour time (``07:00``, ``18:30``) -> ``seven AM``, ``six thirty PM``.
* Money (English): ``$5.99`` -> ``5 dollars and 99 cents``; ``€0.25/kWh`` -> ``25
  cents per kilowatt hour``; other numbers stay digits (the model reads those).
* HTML tags are stripped (``<br>``, ``<p>``, ``<li>``... end the line), entities
  decoded.  Brackets that are not a tag or a link lose their brackets.
* Symbols: an underscore inside a word stays (``snake_case``, entity ids);
  ``!!!`` -> ``!``, ``?!`` -> ``?``, ``....`` -> ``...``, ``--`` -> ``—``, arrows
  (``->``, ``→``) -> ``—``.  In English ``&`` -> ``and``, ``=`` -> ``equals``, ``*``
  between numbers -> ``times``, ``< 5`` -> ``less than 5``, ``~5`` -> ``about 5``,
  ``#1`` / ``No. 1`` -> ``number 1``, ``1,000`` -> ``1000``, ``e.g.``, ``i.e.``,
  ``vs.``, ``approx.`` spelled out; other ``* _ ~ ` # ^ \\ < > = { } |`` go.
* Other languages get only the language-neutral cleanup (Markdown, emoji, URLs,
  symbols); ``°C`` and ``%`` are left as they are.
"""

from __future__ import annotations

import html
import re

import regex

__all__ = ["TextCleaner", "clean_text", "PARALINGUISTIC_TAGS"]

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

# Line breaks, as the sentence splitter counts them.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAK_RE = re.compile(f"[{_LINE_BREAKS}]")

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
_DIGIT_STAR_RE = re.compile(r"(?<=\d)\s?[*×]\s?(?=\d)")
_SYMBOL_RE = regex.compile(
    r"[`*~#\\]+|(?<![\p{L}\p{M}\p{N}])_+|_+(?![\p{L}\p{M}\p{N}])|[\^<>=|{}]"
)
_PUNCT_RUN_RE = re.compile(r"[!?]{2,}|,{2,}|\.{4,}|;{2,}|:{2,}|-{2,}|—{2,}|…{2,}")

# ---------------------------------------------------------------------------
# English rules
# ---------------------------------------------------------------------------

_ENGLISH_GATE_RE = re.compile(r"[\d&=$€£]|(?i:vs|approx|e\.\s?g|i\.\s?e)")

_UNITS: dict[str, tuple[str, str]] = {
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "mph": ("mile per hour", "miles per hour"),
    "m/s": ("meter per second", "meters per second"),
    "kWh": ("kilowatt hour", "kilowatt hours"),
    "MWh": ("megawatt hour", "megawatt hours"),
    "Wh": ("watt hour", "watt hours"),
    "kW": ("kilowatt", "kilowatts"),
    "W": ("watt", "watts"),
    "V": ("volt", "volts"),
    "mA": ("milliamp", "milliamps"),
    "A": ("amp", "amps"),
    "Hz": ("hertz", "hertz"),
    "hPa": ("hectopascal", "hectopascals"),
    "mbar": ("millibar", "millibars"),
    "km": ("kilometer", "kilometers"),
    "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"),
    "m²": ("square meter", "square meters"),
    "m³": ("cubic meter", "cubic meters"),
    "m": ("meter", "meters"),
    "mi": ("mile", "miles"),
    "ft": ("foot", "feet"),
    "kg": ("kilogram", "kilograms"),
    "g": ("gram", "grams"),
    "lbs": ("pound", "pounds"),
    "lb": ("pound", "pounds"),
    "L": ("liter", "liters"),
    "ml": ("milliliter", "milliliters"),
    "mL": ("milliliter", "milliliters"),
    "µg/m³": ("microgram per cubic meter", "micrograms per cubic meter"),
    "μg/m³": ("microgram per cubic meter", "micrograms per cubic meter"),
    "ppm": ("part per million", "parts per million"),
    "dB": ("decibel", "decibels"),
    "lx": ("lux", "lux"),
    "GB": ("gigabyte", "gigabytes"),
    "MB": ("megabyte", "megabytes"),
    "TB": ("terabyte", "terabytes"),
    "Mbps": ("megabit per second", "megabits per second"),
    "min": ("minute", "minutes"),
    "sec": ("second", "seconds"),
    "hrs": ("hour", "hours"),
    "hr": ("hour", "hours"),
    "h": ("hour", "hours"),
}
_UNIT_ALT = "|".join(re.escape(unit) for unit in sorted(_UNITS, key=len, reverse=True))
_UNIT_END = r"(?![\w/²³])"
_NUMBER = r"\d+(?:\.\d+)?"

_THOUSANDS_RE = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?!\d|,\d)")
_CURRENCIES: dict[str, tuple[str, str, str, str]] = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "USD": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "EUR": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "GBP": ("pound", "pounds", "penny", "pence"),
}
_MAGNITUDE = r"(?:\s?(thousand|million|billion|trillion)\b)?"
_PER_UNIT = r"(?:\s?/\s?([A-Za-zµμ²³/]+))?"
_MONEY_PREFIX_RE = re.compile(
    rf"(?<![\w.])([$€£])\s?(\d+)(?:\.(\d+))?{_MAGNITUDE}{_PER_UNIT}"
)
_MONEY_SUFFIX_RE = re.compile(
    rf"(?<![\w.])(\d+)(?:\.(\d+))?{_MAGNITUDE}\s?([$€£]|EUR\b|USD\b|GBP\b){_PER_UNIT}"
)
_TIME_RANGE_RE = re.compile(r"(?<=\d:\d\d)\s?[-–]\s?(?=\d{1,2}:\d\d)")
_TIME_12_RE = re.compile(
    r"(?<![\w:.,])(\d{1,2})(?:[:.](\d{2}))?\s?([AaPp])\.?[Mm](?!\w)(?:\.(?=[,;:!?)]))?"
)
_TIME_24_RE = re.compile(r"(?<![\w:.,])(\d{1,2}):(\d{2})(?![\w:]|[.,]\d)")
_RANGE_RE = re.compile(
    rf"(?<![\w.])({_NUMBER})\s?[-–]\s?({_NUMBER})"
    rf"(?=\s?(?:[°℃℉%]|(?:{_UNIT_ALT}){_UNIT_END}))"
)
_MINUS_RE = re.compile(rf"(?<![\w.])[-−–](?={_NUMBER}\s?(?:°|℃|℉))")
_TEMPERATURE_RE = re.compile(
    rf"(?<![\w.])({_NUMBER})\s?(?:°\s?([CcFf])|(℃)|(℉)|°)(?![A-Za-z])"
)
_PERCENT_RE = re.compile(rf"({_NUMBER})\s?%")
_UNIT_RE = re.compile(rf"(?<![\w.])({_NUMBER})\s?({_UNIT_ALT}){_UNIT_END}")

_ENGLISH_WORDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?<![\w.])[~≈]\s?(?=\d)"), "about "),
    (re.compile(r"(?<![\w#])#(?=\d)"), "number "),
    (re.compile(r"(?<![\w.])N[or]\.\s?(?=\d)"), "Number "),
    (re.compile(r"(?<![\w.])n[or]\.\s?(?=\d)"), "number "),
    (re.compile(r"(?:<=|≤)\s?(?=\d)"), " at most "),
    (re.compile(r"(?:>=|≥)\s?(?=\d)"), " at least "),
    (re.compile(r"<\s?(?=\d)"), " less than "),
    (re.compile(r">\s?(?=\d)"), " more than "),
    (_DIGIT_STAR_RE, " times "),
    (re.compile(r"(?<![=<>!])==?(?!=)"), " equals "),
    (re.compile(r"&"), " and "),
    (re.compile(r"(?<![\w.])e\.\s?g\.(?!\w)"), "for example"),
    (re.compile(r"(?<![\w.])E\.\s?g\.(?!\w)"), "For example"),
    (re.compile(r"(?<![\w.])i\.\s?e\.(?!\w)"), "that is"),
    (re.compile(r"(?<![\w.])I\.\s?e\.(?!\w)"), "That is"),
    (re.compile(r"(?<![\w.])(?:vs|VS|Vs)\.?(?!\w)"), "versus"),
    (re.compile(r"(?<![\w.])approx\.?(?!\w)"), "approximately"),
    (re.compile(r"(?<![\w.])Approx\.?(?!\w)"), "Approximately"),
]

_SMALL_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve "
    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty"}


def _number_words(number: int) -> str:
    """Spell out 0-59 (all that hours and minutes need)."""
    if number < 20:
        return _SMALL_NUMBERS[number]
    tens, ones = divmod(number, 10)
    return _TENS[tens] + ("-" + _SMALL_NUMBERS[ones] if ones else "")


def _say_time(hour: int, minute: int, suffix: str) -> str:
    """``_say_time(3, 45, "PM")`` -> ``"three forty-five PM"``."""
    words = _number_words(hour)
    if minute:
        words += " " + (
            _number_words(minute) if minute >= 10 else "oh " + _number_words(minute)
        )
    elif not suffix:
        words += " o'clock"
    return words + (" " + suffix if suffix else "")


def _time_12(match: re.Match[str]) -> str:
    hour = int(match.group(1))
    minute = int(match.group(2) or 0)
    if not 1 <= hour <= 12 or minute > 59:
        return match.group()
    return _say_time(hour, minute, match.group(3).upper() + "M")


def _time_24(match: re.Match[str]) -> str:
    hour_text = match.group(1)
    hour, minute = int(hour_text), int(match.group(2))
    if hour > 23 or minute > 59:
        return match.group()
    if hour == 0 or hour >= 13 or hour_text.startswith("0"):
        return _say_time(hour % 12 or 12, minute, "AM" if hour < 12 else "PM")
    return _say_time(hour, minute, "")


def _unit_name(unit: str, number: str) -> str:
    singular, plural = _UNITS[unit]
    return singular if number == "1" else plural


def _per_unit(unit: str | None) -> str:
    if not unit:
        return ""
    return " per " + (_UNITS[unit][0] if unit in _UNITS else unit)


def _say_money(
    symbol: str,
    whole: str,
    decimals: str | None,
    magnitude: str | None,
    per: str | None,
) -> str:
    one, many, cent, cents = _CURRENCIES[symbol]
    if magnitude:
        number = whole + ("." + decimals if decimals else "")
        said = f"{number} {magnitude} {many}"
    elif decimals is not None and len(decimals) == 2:
        amount, fraction = int(whole), int(decimals)
        fraction_said = f"{fraction} {cent if fraction == 1 else cents}"
        whole_said = f"{whole} {one if amount == 1 else many}"
        if amount == 0:
            said = fraction_said
        elif fraction == 0:
            said = whole_said
        else:
            said = f"{whole_said} and {fraction_said}"
    else:
        number = whole + ("." + decimals if decimals else "")
        said = f"{number} {one if number == '1' else many}"
    return said + _per_unit(per)


def _money_prefix(match: re.Match[str]) -> str:
    symbol, whole, decimals, magnitude, per = match.groups()
    return _say_money(symbol, whole, decimals, magnitude, per)


def _money_suffix(match: re.Match[str]) -> str:
    whole, decimals, magnitude, symbol, per = match.groups()
    return _say_money(symbol, whole, decimals, magnitude, per)


def _temperature(match: re.Match[str]) -> str:
    number, scale, celsius, fahrenheit = match.groups()
    degrees = "degree" if number == "1" else "degrees"
    if celsius or (scale and scale in "Cc"):
        return f"{number} {degrees} Celsius"
    if fahrenheit or scale:
        return f"{number} {degrees} Fahrenheit"
    return f"{number} {degrees}"


def _unit(match: re.Match[str]) -> str:
    number, unit = match.groups()
    return f"{number} {_unit_name(unit, number)}"


def _english(text: str) -> str:
    """Numbers, units, times, money and abbreviations, for English."""
    if "," in text:
        text = _THOUSANDS_RE.sub(lambda m: m.group().replace(",", ""), text)
    text = _MONEY_PREFIX_RE.sub(_money_prefix, text)
    text = _MONEY_SUFFIX_RE.sub(_money_suffix, text)
    if ":" in text:
        text = _TIME_RANGE_RE.sub(" to ", text)
    text = _TIME_12_RE.sub(_time_12, text)
    if ":" in text:
        text = _TIME_24_RE.sub(_time_24, text)
    text = _RANGE_RE.sub(r"\1 to \2", text)
    if "°" in text or "℃" in text or "℉" in text:
        text = _MINUS_RE.sub("minus ", text)
        text = _TEMPERATURE_RE.sub(_temperature, text)
    if "%" in text:
        text = _PERCENT_RE.sub(r"\1 percent", text)
    text = _UNIT_RE.sub(_unit, text)
    for pattern, replacement in _ENGLISH_WORDS:
        text = pattern.sub(replacement, text)
    return text


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
    if english and _ENGLISH_GATE_RE.search(text):
        text = _english(text)
    elif "*" in text or "×" in text:
        text = _DIGIT_STAR_RE.sub(" × ", text)
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
            if char in _LINE_BREAKS:
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
            if "|" not in separator and not _LINE_BREAK_RE.search(separator):
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
                match = _LINE_BREAK_RE.search(text, position)
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
                if text[end] in _LINE_BREAKS:
                    out.append(self._end_line(self._take(text[position:end]), True))
                else:
                    out.append(self._start_line(self._take(text[position : end + 1])))
                position = end + 1
            elif mode == _FENCE_INFO:
                match = _LINE_BREAK_RE.search(text, position)
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
                if text[end] in _LINE_BREAKS:
                    if re.fullmatch(
                        rf"[ \t]*{re.escape(self._fence_char)}{{{self._fence_length},}}[ \t]*",
                        line,
                    ):
                        self._mode = _LINE_START
                else:
                    self._mode = _FENCE_SKIP
                position = end + 1
            else:  # _FENCE_SKIP
                match = _LINE_BREAK_RE.search(text, position)
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
