"""Tests for LLM-reply cleanup (Markdown, emoji, symbols, English numbers)."""

from __future__ import annotations

import time

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wyoming_chatterbox.text import PARALINGUISTIC_TAGS, TextCleaner, clean_text

# (input, expected output) for language "en"
CASES: list[tuple[str, str]] = [
    # Realistic Home Assistant replies
    (
        "The living room is **21°C** 🌡️ and the lights are *on*.",
        "The living room is 21 degrees Celsius and the lights are on.",
    ),
    (
        "Sure! 😊 I've turned **off** the *kitchen* lights. Anything else? 💡",
        "Sure! I've turned off the kitchen lights. Anything else?",
    ),
    (
        "## Weather today\nIt's **sunny** ☀️ with a high of 24°C and a 10% chance of "
        "rain.\n- Wind: 12 km/h\n- Humidity: 45%",
        "Weather today\nIt's sunny with a high of 24 degrees Celsius and a 10 percent "
        "chance of rain.\nWind: 12 kilometers per hour\nHumidity: 45 percent",
    ),
    (
        "Your solar panels produced **12 kWh** today; the house used 9.5 kWh at "
        "€0.25/kWh.",
        "Your solar panels produced 12 kilowatt hours today; the house used 9.5 "
        "kilowatt hours at 25 cents per kilowatt hour.",
    ),
    (
        "The alarm is set for 07:00 and the heating starts at 18:30.",
        "The alarm is set for seven AM and the heating starts at six thirty PM.",
    ),
    # Emphasis, strike, inline code
    ("**Bold** and __bold__ text.", "Bold and bold text."),
    ("*Italic* and _italic_ text.", "Italic and italic text."),
    ("~~Old~~ new price.", "Old new price."),
    ("***Very*** important.", "Very important."),
    ("Use `light.turn_on` now.", "Use light.turn_on now."),
    ("Set ``a `b` c`` here.", "Set a b c here."),
    ("Check my_sensor_temp and snake_case.", "Check my_sensor_temp and snake_case."),
    ("__init__ is special.", "init is special."),
    ("It is 2 * 3 = 6.", "It is 2 times 3 equals 6."),
    ("Compute 4*5 quickly.", "Compute 4 times 5 quickly."),
    # Headings, lists, blockquotes, rules
    ("# Title\nText here.", "Title\nText here."),
    ("### Summary ###\nDone.", "Summary\nDone."),
    ("#hashtag is not a heading", "hashtag is not a heading"),
    ("- Eggs\n- Milk\n- Bread", "Eggs\nMilk\nBread"),
    ("* One\n+ Two", "One\nTwo"),
    ("1. First\n2. Second\n10) Tenth", "First\nSecond\nTenth"),
    ("  - Nested item\n    1. Deeper", "Nested item\nDeeper"),
    ("- **Kitchen**: on\n- **Hall**: off", "Kitchen: on\nHall: off"),
    ("> Quoted text\n> > nested", "Quoted text\nnested"),
    ("Above\n---\nBelow\n***\nEnd", "Above\nBelow\nEnd"),
    ("Setext title\n===\nBody", "Setext title\nBody"),
    ("-5 is negative", "-5 is negative"),
    ("- [ ] Buy milk\n- [x] Done", "Buy milk\nDone"),
    # Code blocks
    ("Here:\n```python\nprint('hi')\n```\nDone!", "Here:\nDone!"),
    ("Here:\n~~~\ncode * here\n~~~\nDone.", "Here:\nDone."),
    ("Start\n```\nnever closed", "Start\n"),
    ("```inline``` code", "inline code"),
    ("Text\n````\n```\nstill code\n````\nAfter", "Text\nAfter"),
    # Links, images, URLs, HTML
    ("See [the docs](https://example.com/docs) now.", "See the docs now."),
    ("![A cat](https://x.com/cat.png) Cute.", "A cat Cute."),
    (
        "More at https://www.home-assistant.io/integrations/hue/ today.",
        "More at home-assistant.io today.",
    ),
    ("Visit www.Example.com.", "Visit example.com."),
    ("Visit <https://example.org/x>.", "Visit example.org."),
    (
        "Read (https://en.wikipedia.org/wiki/Foo_(bar)).",
        "Read (en.wikipedia.org).",
    ),
    ("Line one<br>Line two<br/>three", "Line one\nLine two\nthree"),
    ('<b>Bold</b> and <span class="x">span</span>.', "Bold and span."),
    ("Tom &amp; Jerry&nbsp;rule", "Tom and Jerry rule"),
    ("Footnote[1] and [see here].", "Footnote1 and see here."),
    # Tables
    (
        "| Room | Temp |\n|---|:---:|\n| Kitchen | 21 °C |\n| Bath | 23°C |",
        "Room, Temp\nKitchen, 21 degrees Celsius\nBath, 23 degrees Celsius",
    ),
    ("| a | | b |", "a, b"),
    # Emoji and pictographs
    ("Party 🎉🎉 time", "Party time"),
    ("Family 👨\u200d👩\u200d👧 and 👍🏽 thumbs", "Family and thumbs"),
    (
        "Flags 🇩🇪 🇺🇸 and 🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
        "Flags and",
    ),
    ("Keycaps 1️⃣ #️⃣ *️⃣ done", "Keycaps done"),
    ("Love ❤️ and ☀︎ ✓ ★ © ™", "Love and"),
    ("on 🎉.", "on."),
    # Stray symbols and punctuation
    ("Wow!!! Really?!? Hmm... wait.... ok,,", "Wow! Really? Hmm... wait... ok,"),
    ("Kitchen → 21°C", "Kitchen — 21 degrees Celsius"),
    ("Heating -> on", "Heating — on"),
    ("Well -- maybe", "Well — maybe"),
    ("a ^ b \\ c { d }", "a b c d"),
    ("x = y", "x equals y"),
    ("Ok #1 and C# and # alone", "Ok number 1 and C and alone"),
    ("A | B | C", "A, B, C"),
    ("Hello   \t world", "Hello world"),
    ("\n\n  Leading and trailing  \n\n", "Leading and trailing\n"),
    ("Paragraph one.\n\n\nParagraph two.", "Paragraph one.\nParagraph two."),
    ("use .NET now", "use .NET now"),
    # Paralinguistic tags
    ("[laugh] That's funny!", "[laugh] That's funny!"),
    ("Ahem [Clear Throat] listen [SIGH].", "Ahem [clear throat] listen [sigh]."),
    (
        "[chuckle][gasp] [groan] [sniff] [shush] [cough]",
        "[chuckle][gasp] [groan] [sniff] [shush] [cough]",
    ),
    ("[note] is not a tag", "note is not a tag"),
    # English numbers, units, times, money
    ("It is 21°C or 70°F.", "It is 21 degrees Celsius or 70 degrees Fahrenheit."),
    (
        "Outside -3 °C, 1°C at night, 21℃ inside.",
        "Outside minus 3 degrees Celsius, 1 degree Celsius at night, 21 degrees Celsius inside.",
    ),
    ("Turn it 90°.", "Turn it 90 degrees."),
    ("It is 21 ° C, spaced.", "It is 21 degrees Celsius, spaced."),
    ("Highs of 20-22°C.", "Highs of 20 to 22 degrees Celsius."),
    ("Battery at 45% and 100 %.", "Battery at 45 percent and 100 percent."),
    (
        "Wind 5 km/h, 3 mph, 2 m/s.",
        "Wind 5 kilometers per hour, 3 miles per hour, 2 meters per second.",
    ),
    (
        "Using 3 kW, 500 W, 230 V, 16 A.",
        "Using 3 kilowatts, 500 watts, 230 volts, 16 amps.",
    ),
    (
        "1013 hPa, 5 mm rain, 1 km away.",
        "1013 hectopascals, 5 millimeters rain, 1 kilometer away.",
    ),
    (
        "PM2.5 is 12 µg/m³ and CO2 400 ppm.",
        "PM2.5 is 12 micrograms per cubic meter and CO2 400 parts per million.",
    ),
    ("Wait 5 min or 2 h.", "Wait 5 minutes or 2 hours."),
    (
        "At 3:45 pm, 3:45PM or 3 p.m., then",
        "At three forty-five PM, three forty-five PM or three PM, then",
    ),
    ("Dinner is at 6 p.m.", "Dinner is at six PM."),
    (
        "Meet at 10:00, 9:05 or 12:30.",
        "Meet at ten o'clock, nine oh five or twelve thirty.",
    ),
    (
        "Quiet from 00:30 to 23:59.",
        "Quiet from twelve thirty AM to eleven fifty-nine PM.",
    ),
    ("Open 10:00-11:30 daily.", "Open ten o'clock to eleven thirty daily."),
    ("Not times: 25:00, 3:45:10, 2:1.", "Not times: 25:00, 3:45:10, 2:1."),
    ("It costs $5.99 or $1.", "It costs 5 dollars and 99 cents or 1 dollar."),
    ("Only $0.50, €10 and £2.01.", "Only 50 cents, 10 euros and 2 pounds and 1 penny."),
    (
        "Pay 20€ or 15 EUR, $2.5 million total.",
        "Pay 20 euros or 15 euros, 2.5 million dollars total.",
    ),
    ("About 1,000 or 1,234,567 people.", "About 1000 or 1234567 people."),
    ("Tom & Jerry, R&D.", "Tom and Jerry, R and D."),
    ("Fruit, e.g. apples, i.e. food.", "Fruit, for example apples, that is food."),
    (
        "Lakers vs. Celtics, approx. 5 hours.",
        "Lakers versus Celtics, approximately 5 hours.",
    ),
    ("See No. 5 and ~10 minutes.", "See Number 5 and about 10 minutes."),
    ("Keep it < 20 and > 5.", "Keep it less than 20 and more than 5."),
    ("No. I won't.", "No. I won't."),
    # Degenerate input
    ("", ""),
    ("   \n\n", ""),
    ("🎉", ""),
    ("**", ""),
    ("---", ""),
]

# (input, language, expected output): only language-neutral cleanup
OTHER_LANGUAGE_CASES: list[tuple[str, str, str]] = [
    (
        "Im Wohnzimmer sind **21°C** 🌡️ und 45%.",
        "de",
        "Im Wohnzimmer sind 21°C und 45%.",
    ),
    ("## Liste\n- Eins\n- Zwei 👍", "de", "Liste\nEins\nZwei"),
    ("Voir [la doc](https://example.fr/doc) & 3:45 pm", "fr", "Voir la doc & 3:45 pm"),
    ("Il fait 2 * 3 = 6 [laugh]", "fr", "Il fait 2 3 6 [laugh]"),
    ("It is 21°C.", "en-US", "It is 21 degrees Celsius."),
]

TAG_RE = regex.compile(
    r"\[(?:" + "|".join(regex.escape(tag) for tag in PARALINGUISTIC_TAGS) + r")\]"
)
# Characters that must never survive (outside the tags above).
REMOVED_RE = regex.compile(
    r"[*`#|~^\\<>={}\[\]]"
    r"|(?<![\p{L}\p{M}\p{N}])_|_(?![\p{L}\p{M}\p{N}])"
    r"|[\p{Extended_Pictographic}\p{Emoji_Modifier}\p{Regional_Indicator}"
    r"\uFE0E\uFE0F\u20E3\U000E0020-\U000E007F]"
    r"|(?<![\p{L}\p{M}])\u200D|\u200D(?!\p{L})"
    r"|(?!°)\p{So}"
)


def stream(text: str, pieces: list[str], language: str = "en") -> str:
    cleaner = TextCleaner(language)
    return "".join(cleaner.feed(piece) for piece in pieces) + cleaner.flush()


def cut(text: str, cuts: list[int]) -> list[str]:
    points = sorted({point % (len(text) + 1) for point in cuts})
    bounds = [0, *points, len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


def assert_clean(text: str) -> None:
    rest = TAG_RE.sub("", text)
    match = REMOVED_RE.search(rest)
    assert match is None, (text, match)
    assert "  " not in text and " \n" not in text and "\n " not in text
    assert "\n\n" not in text
    assert not text.startswith((" ", "\n")) and not text.endswith(" ")


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------


def test_table_is_large() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_clean_text(text: str, expected: str) -> None:
    assert clean_text(text) == expected
    assert_clean(expected)


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_table_char_by_char(text: str, expected: str) -> None:
    assert stream(text, list(text)) == expected


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_table_word_by_word(text: str, expected: str) -> None:
    pieces = regex.findall(r"\S+|\s+", text)
    assert stream(text, pieces) == expected


@pytest.mark.parametrize(("text", "language", "expected"), OTHER_LANGUAGE_CASES)
def test_other_languages(text: str, language: str, expected: str) -> None:
    assert clean_text(text, language) == expected
    assert stream(text, list(text), language) == expected


def test_line_breaks_are_normalised() -> None:
    assert clean_text("One\r\nTwo\rThree\u2028Four") == "One\nTwo\nThree\nFour"


def test_flush_resets_for_next_text() -> None:
    cleaner = TextCleaner()
    assert cleaner.feed("```\ncode") == ""
    assert cleaner.flush() == ""
    assert cleaner.feed("**Next** reply 21") == "Next reply"
    assert cleaner.flush() == " 21"
    assert cleaner.feed("- Again") + cleaner.flush() == "Again"


# ---------------------------------------------------------------------------
# Latency: only the partial word and open constructs are held
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fed", "released"),
    [
        ("Hello there. How", "Hello there."),
        ("Hello there. How ", "Hello there. How"),
        ("**Bold text** and the rest", "Bold text and the"),
        ("*Open emphasis that never", "Open emphasis that"),
        ("- Item one\n- Item", "Item one\n"),
        ("# Heading\nBody", "Heading\n"),
        ("Here is the code:\n```python\nprint(1)\n", "Here is the code:\n"),
        ("It is 21 °C and", "It is 21 degrees Celsius"),
        ("It is 21 ", "It is"),
        ("See https://example.com/some/long/path and", "See example.com"),
        ("Ha [laugh] funny", "Ha [laugh]"),
        ("Please [clear ", "Please"),
        ("| Room | Temp |\n|---", "Room, Temp\n"),
        ("Text\n--", "Text\n"),
    ],
)
def test_latency(fed: str, released: str) -> None:
    cleaner = TextCleaner()
    assert cleaner.feed(fed) == released
    cleaner = TextCleaner()
    assert "".join(cleaner.feed(char) for char in fed) == released


def test_long_reply_streams_word_by_word() -> None:
    words = ["word"] * 200
    cleaner = TextCleaner()
    out = ""
    for index, word in enumerate(words):
        out += cleaner.feed(word + " ")
        assert out.count("word") == index + 1
    assert out + cleaner.flush() == " ".join(words)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

ATOMS = [
    "Hello",
    "world",
    "the",
    "lights",
    "21",
    "5",
    "1",
    "3:45",
    " pm",
    "07:00",
    "°C",
    "°F",
    "%",
    "$",
    "€",
    "5.99",
    "km/h",
    "kWh",
    "1,000",
    "e.g.",
    "No.",
    "vs.",
    "&",
    "**",
    "*",
    "_",
    "__",
    "~~",
    "~",
    "`",
    "```",
    "~~~",
    "```python",
    "\n",
    "\n",
    "\r\n",
    " ",
    " ",
    "  ",
    "\t",
    "# ",
    "## ",
    "- ",
    "* ",
    "+ ",
    "1. ",
    "2) ",
    "> ",
    "[",
    "]",
    "](",
    "(",
    ")",
    "![",
    "http://x.com/a_b",
    "https://www.Ex.com/p?q=1",
    "www.",
    "<br>",
    "<b>",
    "</b>",
    '<a href="x">',
    "<",
    ">",
    "|",
    "---",
    "|---|",
    "🎉",
    "👨\u200d👩\u200d👧",
    "🇩🇪",
    "1️⃣",
    "👍🏽",
    "❤️",
    "©",
    "[laugh]",
    "[clear",
    " throat]",
    "[Sigh]",
    "&amp;",
    "!!!",
    "...",
    "?!",
    ".",
    ",",
    ":",
    "=",
    "#",
    "^",
    "\\",
    "{",
    "}",
    "snake_case",
    "-",
    "--",
    "->",
    "→",
    "é",
    "日本",
]
markdownish = st.lists(st.sampled_from(ATOMS), max_size=40).map("".join)
cut_points = st.lists(st.integers(min_value=0, max_value=1000), max_size=12)


@given(markdownish, cut_points)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_chunking_matches_whole(text: str, cuts: list[int]) -> None:
    assert stream(text, cut(text, cuts)) == clean_text(text)


@given(st.text(max_size=120), cut_points)
@settings(max_examples=200, deadline=None)
def test_arbitrary_text_never_crashes_and_streams_alike(
    text: str, cuts: list[int]
) -> None:
    whole = clean_text(text)
    assert stream(text, cut(text, cuts)) == whole
    assert stream(text, list(text), "de") == clean_text(text, "de")


@given(markdownish)
@settings(max_examples=300, deadline=None)
def test_no_markers_or_emoji_survive(text: str) -> None:
    assert_clean(clean_text(text))
    assert_clean(clean_text(text, "de"))


VOCABULARY = [
    "the",
    "kitchen",
    "light",
    "is",
    "on",
    "Hello",
    "world",
    "temperature",
    "door",
    "locked",
    "I",
    "turned",
    "off",
    "you",
    "Sure",
    "anything",
    "else",
    "don't",
    "living",
    "room",
    "bedroom",
    "at",
    "a",
    "it",
    "and",
    "or",
]
plain_word = st.sampled_from(VOCABULARY) | st.from_regex(r"[a-z]{3,8}", fullmatch=True)
gap = st.sampled_from([" ", "  ", ", ", ". ", "! ", "? ", "; ", ": ", "\n", " (", ") "])


@given(st.lists(st.tuples(plain_word, gap), max_size=30), cut_points)
@settings(max_examples=300, deadline=None)
def test_plain_words_are_kept_in_order(
    pairs: list[tuple[str, str]], cuts: list[int]
) -> None:
    text = "".join(word + separator for word, separator in pairs)
    words = [word for word, _ in pairs]
    out = clean_text(text)
    assert regex.findall(r"[\w']+", out) == words
    assert stream(text, cut(text, cuts)) == out


# ---------------------------------------------------------------------------
# Speed: a few microseconds per chunk, linear in the text
# ---------------------------------------------------------------------------

REPLY = (
    "The living room is **21°C** 🌡️ and the lights are *on*. The front door is "
    "locked. Tomorrow will be sunny with a high of 24°C and a 10% chance of rain.\n"
    "## Devices\n- **Kitchen light**: off\n- **Bedroom**: on at 45%\n"
    "Check [the docs](https://www.home-assistant.io/docs/) for more. 🎉\n"
)


def test_short_chunks_are_fast() -> None:
    chunks = [REPLY[i : i + 4] for i in range(0, len(REPLY), 4)]
    rounds = 50
    start = time.perf_counter()
    for _ in range(rounds):
        cleaner = TextCleaner()
        for chunk in chunks:
            cleaner.feed(chunk)
        cleaner.flush()
    per_chunk = (time.perf_counter() - start) / (rounds * len(chunks))
    assert per_chunk < 100e-6  # measured ~4 µs; generous for slow CI machines


@pytest.mark.parametrize(
    "text",
    [
        "a" * 100_000,  # one endless word
        "1" * 100_000,  # a line start that could still be a list marker
        "word " * 20_000,
        "```\n" + "code line\n" * 10_000,
        "https://example.com/" + "a" * 100_000,
        "<a " * 30_000,
    ],
    ids=["word", "digits", "words", "fence", "url", "open-tags"],
)
def test_char_by_char_is_linear(text: str) -> None:
    cleaner = TextCleaner()
    start = time.perf_counter()
    for char in text:
        cleaner.feed(char)
    cleaner.flush()
    assert time.perf_counter() - start < 3.0  # ~0.1 s; quadratic would take minutes
