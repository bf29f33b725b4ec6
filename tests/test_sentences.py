"""Tests for sentence splitting, grouping and incremental (streamed) grouping."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wyoming_chatterbox.sentences import (
    MAX_GROUP_CHARS,
    MAX_GROUP_SENTENCES,
    IncrementalSplitter,
    group_sentences,
    split_groups,
    split_sentences,
)

# (text, expected sentences)
SENTENCE_CASES: list[tuple[str, list[str]]] = [
    # Titles and other abbreviations
    (
        "Mr. Smith met Mrs. Jones and Dr. Brown. Prof. White lives on Main St. "
        "near the park.",
        [
            "Mr. Smith met Mrs. Jones and Dr. Brown.",
            "Prof. White lives on Main St. near the park.",
        ],
    ),
    (
        "He lives on Main St. He is nice.",
        ["He lives on Main St.", "He is nice."],
    ),
    (
        "The U.S. economy grew. The U.K. did not. The F.B.I. agent left.",
        ["The U.S. economy grew.", "The U.K. did not.", "The F.B.I. agent left."],
    ),
    (
        "She moved to the U.S. in 2010 and loves it.",
        ["She moved to the U.S. in 2010 and loves it."],
    ),
    (
        "Bring fruit, e.g. apples or pears. Also bring tools, i.e. hammers. "
        "And snacks etc. Then leave.",
        [
            "Bring fruit, e.g. apples or pears.",
            "Also bring tools, i.e. hammers.",
            "And snacks etc.",
            "Then leave.",
        ],
    ),
    (
        "Bring fruit, e.g., apples or pears. Also bring tools, i.e., hammers.",
        ["Bring fruit, e.g., apples or pears.", "Also bring tools, i.e., hammers."],
    ),
    (
        "It was Lakers vs. Celtics tonight. Great game.",
        ["It was Lakers vs. Celtics tonight.", "Great game."],
    ),
    (
        "The meeting is at 9 a.m. tomorrow. Lunch is at 1 p.m. and dinner at "
        "7 p.m. Goodnight.",
        [
            "The meeting is at 9 a.m. tomorrow.",
            "Lunch is at 1 p.m. and dinner at 7 p.m.",
            "Goodnight.",
        ],
    ),
    (
        "See you at 7 a.m. Have a nice evening.",
        ["See you at 7 a.m.", "Have a nice evening."],
    ),
    (
        "Open until 5 p.m. Monday to Friday.",
        ["Open until 5 p.m. Monday to Friday."],
    ),
    (
        "J. R. R. Tolkien wrote books. He was British.",
        ["J. R. R. Tolkien wrote books.", "He was British."],
    ),
    # Decimals, money, temperatures, versions, addresses
    (
        "Pi is about 3.14 today. The price is $4.99 now. It is 21.5°C outside.",
        ["Pi is about 3.14 today.", "The price is $4.99 now.", "It is 21.5°C outside."],
    ),
    (
        "Update to v1.2.3 now. Then restart.",
        ["Update to v1.2.3 now.", "Then restart."],
    ),
    (
        "Battery is at 45.5%. It costs $1,234.56 total.",
        ["Battery is at 45.5%.", "It costs $1,234.56 total."],
    ),
    (
        "Visit example.com. Then log in at https://a.b.com/x?y=1. Done.",
        ["Visit example.com.", "Then log in at https://a.b.com/x?y=1.", "Done."],
    ),
    # Ellipses: a sentence ends at "..." or "…" unless a lowercase word follows.
    ("Wait... what? I don't know...", ["Wait... what?", "I don't know..."]),
    ("Wait... What is that?", ["Wait...", "What is that?"]),
    ("Hmm… okay.", ["Hmm… okay."]),
    ("Hmm… Okay.", ["Hmm…", "Okay."]),
    ("...and then it ended. Ok.", ["...and then it ended.", "Ok."]),
    # Quotes and brackets
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    (
        'She asked, "Are you coming?" He nodded.',
        ['She asked, "Are you coming?"', "He nodded."],
    ),
    ("'Really?' she said. 'Yes.'", ["'Really?' she said.", "'Yes.'"]),
    # Sentences inside one quotation are split too (fine for speech): the
    # decision is made one word after the boundary, before the quote closes.
    (
        'She said "I will go. You stay." Then she left.',
        ['She said "I will go.', 'You stay."', "Then she left."],
    ),
    (
        "Turn it off (the heater). Then sleep.",
        ["Turn it off (the heater).", "Then sleep."],
    ),
    # Numbered and bulleted lists
    ("1. Eggs 2. Milk 3. Bread", ["1. Eggs", "2. Milk", "3. Bread"]),
    (
        "Shopping list:\n1. Eggs\n2. Milk\n3. Bread",
        ["Shopping list:", "1. Eggs", "2. Milk", "3. Bread"],
    ),
    (
        "You need: 1. Eggs 2. Milk 3. Bread",
        ["You need:", "1. Eggs", "2. Milk", "3. Bread"],
    ),
    ("Steps: 1) open 2) close. Done.", ["Steps:", "1) open", "2) close.", "Done."]),
    (
        "There are 2 steps. 1. Open the door. 2. Close it.",
        ["There are 2 steps.", "1. Open the door.", "2. Close it."],
    ),
    ("1. Buy 2 apples. 2. Eat them.", ["1. Buy 2 apples.", "2. Eat them."]),
    (
        "Options:\n\n- one\n- two\n* three",
        ["Options:", "- one", "- two", "* three"],
    ),
    # No punctuation at all
    (
        "turn on the kitchen lights and set them to fifty percent",
        ["turn on the kitchen lights and set them to fifty percent"],
    ),
    # Line breaks: every line break ends a sentence.
    (
        "First paragraph without a period\n\nSecond paragraph here",
        ["First paragraph without a period", "Second paragraph here"],
    ),
    ("Line one\nline two continues", ["Line one", "line two continues"]),
    ("Line one.\r\nLine two.", ["Line one.", "Line two."]),
    ("Hi.\r\n\r\n...\n🎉", ["Hi.", "...", "🎉"]),
    # Whitespace inside a sentence is collapsed.
    ("  Hello\tthere.  Big   gap.  ", ["Hello there.", "Big gap."]),
    # Non-Latin scripts
    ("你好。今天天气很好！你要去哪里？", ["你好。", "今天天气很好！", "你要去哪里？"]),
    (
        "こんにちは。元気ですか？はい、元気です！",
        ["こんにちは。", "元気ですか？", "はい、元気です！"],
    ),
    ("नमस्ते। आप कैसे हैं? मैं ठीक हूँ।", ["नमस्ते।", "आप कैसे हैं?", "मैं ठीक हूँ।"]),
    ("Привет. Как дела? Всё хорошо!", ["Привет.", "Как дела?", "Всё хорошо!"]),
    ("Γεια σου. Τι κάνεις; Καλά είμαι.", ["Γεια σου.", "Τι κάνεις;", "Καλά είμαι."]),
    ("مرحبا. كيف حالك؟ أنا بخير.", ["مرحبا.", "كيف حالك؟", "أنا بخير."]),
    (
        "The word 你好 means hello. 你好。Ok.",
        ["The word 你好 means hello.", "你好。", "Ok."],
    ),
    # English ";" is not a sentence end.
    ("I came; I saw. I left.", ["I came; I saw.", "I left."]),
    # Punctuation-only pieces stay with a neighbour; no split inside a word.
    ("Great job! 🎉", ["Great job! 🎉"]),
    (
        "**Bold text.** Next sentence. *Italic!* Ok.",
        ["**Bold text.**", "Next sentence.", "*Italic!*", "Ok."],
    ),
    ("Hello.World is a test. Ok.", ["Hello.World is a test.", "Ok."]),
    ("Wow!!! Amazing?! Yes.", ["Wow!!!", "Amazing?!", "Yes."]),
]

EMPTY_TEXTS = ["", " ", "\n\n", " \t \r\n "]


def _case_id(case: tuple[str, list[str]]) -> str:
    return case[0][:30]


@pytest.mark.parametrize("text,expected", SENTENCE_CASES, ids=_case_id)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


@pytest.mark.parametrize("text", EMPTY_TEXTS)
def test_empty_text(text: str) -> None:
    assert split_sentences(text) == []
    assert split_groups(text) == []
    splitter = IncrementalSplitter()
    assert splitter.feed(text) == []
    assert splitter.flush() == []


def test_constants() -> None:
    assert MAX_GROUP_CHARS == 300
    assert MAX_GROUP_SENTENCES == 3


# --- grouping ---------------------------------------------------------------


def _sentence(tag: str, length: int) -> str:
    """A sentence of exactly ``length`` characters starting with ``tag``."""
    body = (tag + " " + "x" * length)[: length - 1]
    return body + "."


S = [f"S{i}." for i in range(1, 10)]


@pytest.mark.parametrize(
    "sentences,expected",
    [
        ([], []),
        (["  ", ""], []),
        (["Only one."], ["Only one."]),
        # The first sentence is always alone.
        (S[:2], ["S1.", "S2."]),
        (S[:3], ["S1.", "S2. S3."]),
        (S[:4], ["S1.", "S2. S3. S4."]),
        # The short last group [S5] is merged into [S2 S3 S4]: that group is
        # not the first group and the merge fits.
        (S[:5], ["S1.", "S2. S3. S4. S5."]),
        (S[:6], ["S1.", "S2. S3. S4. S5. S6."]),
        # A full last group (3 sentences) is never merged.
        (S[:7], ["S1.", "S2. S3. S4.", "S5. S6. S7."]),
        (S[:8], ["S1.", "S2. S3. S4.", "S5. S6. S7. S8."]),
        # Blank entries are ignored.
        (["S1.", " ", "S2."], ["S1.", "S2."]),
    ],
)
def test_group_sentences_counts(sentences: list[str], expected: list[str]) -> None:
    assert group_sentences(sentences) == expected


def test_group_char_cap() -> None:
    a, b, c = _sentence("A", 150), _sentence("B", 150), _sentence("C", 149)
    groups = group_sentences(["First.", a, b, c])
    # a + b = 301 > 300, so b starts a new group; b + c = 300 fits exactly.
    # [b c] is then not merged into [a]: 451 > 300.
    assert groups == ["First.", a, f"{b} {c}"]
    assert [len(g) for g in groups] == [6, 150, 300]


def test_group_cap_is_inclusive() -> None:
    a, b = _sentence("A", 149), _sentence("B", 149)
    c = _sentence("C", 150)
    assert len(f"{a} {b}") == 299
    assert group_sentences(["First.", a, b]) == ["First.", f"{a} {b}"]
    assert group_sentences(["First.", a, c]) == ["First.", f"{a} {c}"]
    assert len(f"{a} {c}") == 300


def test_last_group_not_merged_into_first_group() -> None:
    assert group_sentences(["First.", "Second."]) == ["First.", "Second."]


def test_last_group_not_merged_when_too_long() -> None:
    g = [_sentence(tag, 90) for tag in ("A", "B", "C")]
    last = _sentence("D", 40)
    groups = group_sentences(["First."] + g + [last])
    assert groups == ["First.", " ".join(g), last]
    assert len(" ".join(g)) + 1 + len(last) == 313


def test_last_group_merged_when_it_fits() -> None:
    g = [_sentence(tag, 80) for tag in ("A", "B", "C")]
    last = [_sentence("D", 20), _sentence("E", 10)]
    groups = group_sentences(["First."] + g + last)
    assert groups == ["First.", " ".join(g + last)]
    assert len(groups[1]) == 274


def test_group_custom_limits() -> None:
    assert group_sentences(S[:6], max_sentences=2) == [
        "S1.",
        "S2. S3.",
        "S4. S5. S6.",
    ]
    assert group_sentences(S[:6], max_chars=7) == ["S1.", "S2. S3.", "S4. S5.", "S6."]


@pytest.mark.parametrize("max_chars,max_sentences", [(0, 3), (300, 0), (-1, -1)])
def test_invalid_limits(max_chars: int, max_sentences: int) -> None:
    with pytest.raises(ValueError):
        group_sentences(["A."], max_chars, max_sentences)
    with pytest.raises(ValueError):
        IncrementalSplitter(max_chars, max_sentences)


def test_split_groups_is_split_then_group() -> None:
    text = "Hello there. How are you? I am fine. Thanks. Bye. See you."
    assert split_groups(text) == [
        "Hello there.",
        "How are you? I am fine. Thanks. Bye. See you.",
    ]
    assert split_groups(text) == group_sentences(split_sentences(text))


@given(
    st.lists(
        st.text(alphabet="ab .", min_size=1, max_size=120).filter(str.strip),
        max_size=30,
    ),
    st.integers(min_value=1, max_value=4),
)
@settings(max_examples=150, deadline=None)
def test_group_sentences_properties(sentences: list[str], max_sentences: int) -> None:
    sentences = [s.strip() for s in sentences]
    groups = group_sentences(sentences, MAX_GROUP_CHARS, max_sentences)
    assert " ".join(groups) == " ".join(sentences)
    if sentences:
        assert groups[0] == sentences[0]
    for group in groups[1:]:
        assert len(group) <= MAX_GROUP_CHARS or group in sentences


# --- cutting long sentences -------------------------------------------------

WORDS = ["lights", "kitchen", "temperature", "is", "set", "to", "the", "degrees"]


def _long_sentence(n_chars: int) -> str:
    words: list[str] = []
    index = 0
    while sum(len(w) + 1 for w in words) < n_chars:
        words.append(WORDS[index % len(WORDS)] + str(index))
        index += 1
    return " ".join(words) + "."


def test_2000_char_sentence() -> None:
    sentence = _long_sentence(2000)
    assert 2000 <= len(sentence) <= 2030
    pieces = split_sentences(sentence)
    assert len(pieces) == 7
    assert all(len(piece) <= MAX_GROUP_CHARS for piece in pieces)
    assert " ".join(pieces).split() == sentence.split()
    groups = split_groups(sentence)
    assert all(len(group) <= MAX_GROUP_CHARS for group in groups)
    assert " ".join(groups).split() == sentence.split()
    # Pieces are near even: none below 80% of the average.
    average = len(sentence) / len(pieces)
    assert min(len(piece) for piece in pieces) >= 0.8 * average


def test_sentence_at_limit_is_not_cut() -> None:
    sentence = _sentence("A", 300)
    assert split_sentences(sentence) == [sentence]
    longer = "word " * 60 + "end."
    assert len(longer) == 304
    pieces = split_sentences(longer)
    assert [len(p) for p in pieces] == [154, 149]
    assert " ".join(pieces) == longer


def test_cut_prefers_clause_punctuation() -> None:
    left = " ".join(["alpha"] * 28)  # 167 chars
    right = " ".join(["beta"] * 40)  # 199 chars
    sentence = f"{left}; {right}, {left}."  # 538 chars
    # Three clauses rather than two even pieces cut mid-clause at a space.
    pieces = split_sentences(sentence)
    assert pieces == [f"{left};", f"{right},", f"{left}."]


def test_cut_prefers_comma_over_space() -> None:
    left = " ".join(["alpha"] * 30)  # 179 chars
    right = " ".join(["beta"] * 38)  # 189 chars
    sentence = f"{left}, {right}."
    assert split_sentences(sentence) == [f"{left},", f"{right}."]


def test_cut_prefers_even_pieces_over_far_clause() -> None:
    # The only semicolon would leave a 16-char piece: cut at a space instead.
    sentence = "short part here; " + " ".join(["gamma"] * 70) + "."
    pieces = split_sentences(sentence)
    assert [len(p) for p in pieces] == [220, 216]
    assert " ".join(pieces) == sentence


def test_cut_after_dash() -> None:
    left = " ".join(["alpha"] * 28)
    right = " ".join(["beta"] * 40)
    sentence = f"{left} — {right}."
    assert split_sentences(sentence) == [f"{left} —", f"{right}."]


def test_overlong_word_is_hard_cut() -> None:
    url = "https://example.com/" + "a" * 680  # 700 chars
    pieces = split_sentences(f"See {url} now.")
    assert [len(p) for p in pieces] == [238, 233, 238]
    assert pieces[0].startswith("See https://")
    assert pieces[2].endswith(" now.")
    assert "".join(pieces).replace(" ", "") == f"See{url}now."


def test_custom_max_chars_cuts_sentences() -> None:
    sentence = _long_sentence(400)
    pieces = split_sentences(sentence, max_chars=100)
    assert all(len(p) <= 100 for p in pieces)
    assert len(pieces) == 5
    assert " ".join(pieces) == sentence


# --- incremental ------------------------------------------------------------

LONG_REPLY = (
    "Sure! Here's what I found about the weather in St. Louis today. It's about "
    "21.5°C with light winds from the N.W., and Dr. Smith's forecast, e.g. from "
    "the U.S. weather service, says rain is likely after 3 p.m. You might want "
    "to bring an umbrella; the humidity is high. Also, don't forget: 1. Keys "
    "2. Wallet 3. Phone.\n\n"
) * 6 + _long_sentence(1000)

STREAM_TEXTS = [case[0] for case in SENTENCE_CASES] + [
    LONG_REPLY,
    _long_sentence(2000),
    "A. B. C. D. E. F. G. H.",
    "One.\n\nTwo three four.\nFive",
    "no punctuation here at all but quite a few words in a row",
]


def _stream(
    fragments: list[str], splitter: IncrementalSplitter | None = None
) -> list[str]:
    splitter = splitter or IncrementalSplitter()
    groups: list[str] = []
    for fragment in fragments:
        groups.extend(splitter.feed(fragment))
    groups.extend(splitter.flush())
    return groups


@pytest.mark.parametrize("text", STREAM_TEXTS, ids=lambda t: t[:30])
def test_incremental_char_by_char(text: str) -> None:
    assert _stream(list(text)) == split_groups(text)


@pytest.mark.parametrize("text", STREAM_TEXTS, ids=lambda t: t[:30])
def test_incremental_word_by_word(text: str) -> None:
    # LLM-style tokens: leading whitespace attached to the word.
    tokens = re.findall(r"\s*\S+|\s+", text)
    assert "".join(tokens) == text
    assert _stream(tokens) == split_groups(text)


def test_incremental_whole_text_in_one_feed() -> None:
    assert _stream([LONG_REPLY]) == split_groups(LONG_REPLY)


def test_first_group_emitted_one_word_after_boundary() -> None:
    splitter = IncrementalSplitter()
    assert splitter.feed("Hello there.") == []
    assert splitter.feed(" How") == []  # "How" may still be "However,"...
    assert splitter.feed(" ") == ["Hello there."]
    assert splitter.feed("are you? I am fine. ") == []
    assert splitter.flush() == ["How are you? I am fine."]


def test_abbreviation_not_emitted_early() -> None:
    splitter = IncrementalSplitter()
    assert splitter.feed("Call Dr. ") == []
    assert splitter.feed("Smith now. ") == []
    assert splitter.feed("Thanks ") == ["Call Dr. Smith now."]
    assert splitter.flush() == ["Thanks"]


def test_first_group_emitted_before_end_of_long_stream() -> None:
    splitter = IncrementalSplitter()
    fed = 0
    first: list[str] = []
    for char in LONG_REPLY:
        fed += 1
        first = splitter.feed(char)
        if first:
            break
    assert first == ["Sure!"]
    assert fed == len("Sure! Here's ")
    rest = list(LONG_REPLY[fed:])
    assert first + _stream(rest, splitter) == split_groups(LONG_REPLY)


def test_groups_settle_as_early_as_allowed() -> None:
    splitter = IncrementalSplitter()
    assert splitter.feed("First one. Second ") == ["First one."]
    assert splitter.feed("one. Third one. Fourth ") == []
    assert splitter.feed("one. Fifth ") == []
    # [2 3 4] is full, but [5] could still be merged into it at the end.
    assert splitter.feed("one. Sixth ") == []
    assert splitter.feed("one. Seventh ") == []
    # [5 6 7] is full, so it can no longer be merged into [2 3 4].
    assert splitter.feed("one. Eighth ") == ["Second one. Third one. Fourth one."]
    assert splitter.flush() == ["Fifth one. Sixth one. Seventh one. Eighth"]


def test_group_settles_when_merge_would_exceed_cap() -> None:
    long_a = _sentence("Alpha", 200)
    long_b = _sentence("Bravo", 200)
    splitter = IncrementalSplitter()
    assert splitter.feed(f"Hi there. {long_a} ") == ["Hi there."]
    assert splitter.feed(f"{long_b} Next ") == [long_a]
    assert splitter.flush() == [f"{long_b} Next"]


def test_flush_resets_for_next_text() -> None:
    splitter = IncrementalSplitter()
    assert _stream(["One. Two. Three."], splitter) == ["One.", "Two. Three."]
    assert _stream(["Four. Five."], splitter) == ["Four.", "Five."]


def test_incremental_custom_limits() -> None:
    text = " ".join(f"Sentence number {i}." for i in range(12))
    splitter = IncrementalSplitter(max_chars=60, max_sentences=2)
    assert _stream(list(text), splitter) == split_groups(text, 60, 2)
    assert all(len(g) <= 60 for g in split_groups(text, 60, 2))


def test_buffer_holds_only_the_unconsumed_tail() -> None:
    splitter = IncrementalSplitter()
    longest = 0
    for char in LONG_REPLY:
        splitter.feed(char)
        longest = max(longest, len(splitter._scanner._tail))
    # Bounded by the longest sentence plus one word, not by the text.
    assert longest <= 1000 + 30
    assert len(LONG_REPLY) > 2500


# Tricky tokens for random texts (one "word" each), plus one over-long word.
TOKENS = """
Mr. Dr. St. U.S. e.g. i.e. etc. vs. a.m. p.m. 3.14 $4.99 21.5°C v1.2.3 Wait... what?
Stop. "Stop." 'Really?' (the heater). 1. 2. 3. 1) 2) Eggs Milk the quick Brown fox.
Hello! How are you? you I don't know… 你好。 今天天气很好！ नमस्ते। Привет. Как дела?
Τι κάνεις; Καλά. — – ; : , - * ** 🎉 https://example.com/a?b=1. [1] « » “ ”
""".split() + [
    "x" * 310
]
SEPARATORS = [" ", " ", " ", "", "\n", "\n\n", "  ", "\t"]

texts = st.lists(
    st.tuples(st.sampled_from(TOKENS), st.sampled_from(SEPARATORS)), max_size=60
).map(lambda pairs: "".join(token + sep for token, sep in pairs))


def _fragments(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:])]


@given(texts, st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_incremental_random_fragmentation(text: str, cuts: list[int]) -> None:
    assert _stream(_fragments(text, cuts)) == split_groups(text)


@given(st.text(max_size=200), st.lists(st.integers(min_value=0, max_value=400)))
@settings(max_examples=100, deadline=None)
def test_incremental_random_unicode(text: str, cuts: list[int]) -> None:
    groups = split_groups(text)
    assert _stream(_fragments(text, cuts)) == groups
    assert "".join(text.split()) == "".join("".join(groups).split())


def _is_wide(char: str) -> bool:
    return 0x3000 <= ord(char) <= 0x9FFF or 0xFF00 <= ord(char) <= 0xFFEF


@given(texts)
@settings(max_examples=150, deadline=None)
def test_no_text_lost_or_duplicated(text: str) -> None:
    groups = split_groups(text)
    assert all(len(group) <= MAX_GROUP_CHARS for group in groups)
    if any(len(word) > MAX_GROUP_CHARS for word in text.split()):
        # An over-long word is hard-cut: compare the characters instead.
        assert "".join(" ".join(groups).split()) == "".join(text.split())
    elif any(_is_wide(char) for char in text):
        # CJK sentences end without a space, which adds one between them.
        assert "".join(" ".join(groups).split()) == "".join(text.split())
    else:
        assert " ".join(groups).split() == text.split()


@pytest.mark.parametrize("text,expected", SENTENCE_CASES, ids=_case_id)
def test_no_words_lost_in_table(text: str, expected: list[str]) -> None:
    if not any(_is_wide(char) for char in text):
        assert " ".join(split_groups(text)).split() == text.split()
