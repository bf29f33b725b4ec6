"""The voices folder: scanning, sidecars, conditionals cache, per-language entries.

The catalogue and cache are the real ones (ChatterboxBackend); the model is fake
(tests/fakes.py), so these run in milliseconds. The real model's conditionals
are tested in test_model.py.
"""

import json
import logging
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import soundfile

from tests.fakes import FakeClipBackend, FakeMultilingualBackend, write_clip
from wyoming_chatterbox.chatterbox.base import speech_token_budget
from wyoming_chatterbox.settings import ModelSettings
from wyoming_chatterbox.speech import Piece, SamplingParams, SpeechJob, UnknownVoice
from wyoming_chatterbox.voices import VoiceLibrary, sanitise_name


def names(voices: List) -> List[str]:  # type: ignore[type-arg]
    return [voice.name for voice in voices]


def make_backend(tmp_path: Path, cls=FakeClipBackend):  # type: ignore[no-untyped-def]
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir(exist_ok=True)
    backend = cls(
        ModelSettings(data_dir=tmp_path / "data", device="cpu", voices_dir=voices_dir)
    )
    return backend, voices_dir


def speak(backend, text: str, voice: str, language: str = "en"):  # type: ignore[no-untyped-def]
    return list(backend.speak(SpeechJob(text, voice, language, SamplingParams())))


@pytest.mark.parametrize(
    "stem, name",
    [
        ("alice", "alice"),
        ("Alice Smith (calm)", "alice_smith_calm"),
        ("Zoë", "zoe"),
        ("../../etc/passwd", "etc_passwd"),
        ("my.voice.v2", "my_voice_v2"),
        ("__x__", "x"),
        ("日本語", ""),
        ("a" * 100, "a" * 64),
        ("bob-2", "bob-2"),
    ],
)
def test_sanitise_name(stem: str, name: str) -> None:
    assert sanitise_name(stem) == name


def test_scan_finds_every_format_and_skips_what_is_not_a_voice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ["wav_voice.wav", "flac_voice.flac", "ogg_voice.ogg", "Mp3 Voice.MP3"]:
        write_clip(tmp_path / name)
    write_clip(tmp_path / ".hidden.wav")
    (tmp_path / "notes.txt").write_text("not a voice")
    (tmp_path / "sub").mkdir()
    write_clip(tmp_path / "sub" / "nested.wav")
    write_clip(tmp_path / "short.wav", seconds=3.0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (tmp_path / "日本語.wav").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        clips = VoiceLibrary(tmp_path).scan()
    assert sorted(clips) == ["flac_voice", "mp3_voice", "ogg_voice", "wav_voice"]
    assert clips["mp3_voice"].duration == pytest.approx(6.0, abs=0.1)
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "short.wav left out: it is 3.0 s long" in warnings
    assert "broken.wav left out: not a readable audio file" in warnings
    assert "日本語.wav left out: its name has no usable letters" in warnings
    assert "nested" not in warnings and "hidden" not in warnings


def test_warnings_are_logged_once_per_file_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_clip(tmp_path / "short.wav", seconds=2.0)
    library = VoiceLibrary(tmp_path)
    with caplog.at_level(logging.WARNING):
        library.scan()
        library.scan()
        assert len(caplog.records) == 1
        write_clip(tmp_path / "short.wav", seconds=4.0)
        os.utime(tmp_path / "short.wav", ns=(1, 1))  # a new version, surely
        library.scan()
    assert len(caplog.records) == 2
    assert "4.0 s long" in caplog.records[1].getMessage()


def test_symlinks_may_not_leave_the_folder(tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    voices.mkdir()
    outside = write_clip(tmp_path / "secret.wav")
    write_clip(voices / "inside.wav")
    os.symlink(outside, voices / "sneaky.wav")
    os.symlink(voices / "inside.wav", voices / "alias.wav")
    assert sorted(VoiceLibrary(voices).scan()) == ["alias", "inside"]


def test_name_clashes_and_reserved_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_clip(tmp_path / "Alice.wav")
    write_clip(tmp_path / "alice.flac")
    write_clip(tmp_path / "default.wav")
    with caplog.at_level(logging.WARNING):
        clips = VoiceLibrary(tmp_path, reserved=("default",)).scan()
    assert list(clips) == ["alice"] and clips["alice"].path.name == "Alice.wav"
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "alice.flac left out: the name 'alice' is taken by Alice.wav" in warnings
    assert "default.wav left out: the name 'default' belongs to a built-in" in warnings


def test_sidecars_set_description_languages_and_sampling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ["alice", "bob", "carol", "dave"]:
        write_clip(tmp_path / f"{name}.wav")
    (tmp_path / "voices.yaml").write_text(
        "alice:\n  description: Alice, calm\n  languages: [en, de]\n"
        "  temperature: 0.6\n"
        "bob:\n  description: from yaml\n  top_p: 2.5\n"
        "carol:\n  description: Carol\n  exaggeration: 0.7\n  colour: blue\n"
    )
    (tmp_path / "bob.json").write_text(json.dumps({"description": "Bob from json"}))
    (tmp_path / "dave.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        clips = VoiceLibrary(tmp_path).scan()
    alice = clips["alice"].settings
    assert alice.description == "Alice, calm"
    assert alice.languages == ("en", "de")
    assert dict(alice.params) == {"temperature": 0.6}
    # The voice's own file wins over voices.yaml (whose bob entry was bad anyway).
    assert clips["bob"].settings.description == "Bob from json"
    assert dict(clips["carol"].settings.params) == {"exaggeration": 0.7}
    assert clips["dave"].settings.description is None
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "top_p must be a number from 0.01 to 1.0, not 2.5" in warnings
    assert "unknown settings" in warnings and "colour" in warnings
    assert "dave.json" in warnings


def test_rescan_sees_new_changed_and_deleted_clips(tmp_path: Path) -> None:
    backend, voices_dir = make_backend(tmp_path)
    write_clip(voices_dir / "alice.wav")
    backend.load()
    assert names(backend.voices()) == ["default", "alice"]
    assert backend.computed == ["alice.wav"]

    write_clip(voices_dir / "bob.wav", peak=0.4)
    assert names(backend.voices()) == ["default", "alice", "bob"]  # listed at once
    assert backend.background_work() is True  # prepared in the background
    assert backend.background_work() is False
    assert backend.computed == ["alice.wav", "bob.wav"]

    write_clip(voices_dir / "alice.wav", peak=0.25)
    os.utime(voices_dir / "alice.wav", ns=(1, 1))
    backend.voices()
    assert speak(backend, "Hi there.", "alice")
    assert backend.spoken[-1][1] == {"voice": "alice", "peak": 0.25}

    (voices_dir / "bob.wav").unlink()
    assert names(backend.voices()) == ["default", "alice"]
    with pytest.raises(UnknownVoice, match="available voices: default, alice"):
        backend.resolve_voice("bob", None)


def test_conditionals_are_cached_on_disk_by_content_and_model(tmp_path: Path) -> None:
    backend, voices_dir = make_backend(tmp_path)
    write_clip(voices_dir / "alice.wav")
    backend.load()
    assert backend.computed == ["alice.wav"]
    cached = list((tmp_path / "data" / "voices").glob("fake-*/*.pt"))
    assert len(cached) == 1

    again, _ = make_backend(tmp_path)
    again.load()
    assert again.computed == []  # a restart reads the cache
    speak(again, "Hello.", "alice")
    assert again.spoken[-1][1] == {"voice": "alice", "peak": 0.5}

    # The same clip under another name shares the cache entry.
    (voices_dir / "alice.wav").rename(voices_dir / "alicia.wav")
    renamed, _ = make_backend(tmp_path)
    renamed.load()
    assert renamed.computed == [] and "alicia" in names(renamed.voices())

    # Another model never reads these conditionals.
    class OtherModel(FakeClipBackend):
        kind = "other"

    other, _ = make_backend(tmp_path, OtherModel)
    other.load()
    assert other.computed == ["alicia.wav"]


def test_unwritable_cache_costs_only_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from wyoming_chatterbox.chatterbox.base import ChatterboxBackend

    class Unwritable(FakeClipBackend):
        _save_cached = ChatterboxBackend._save_cached  # the real one

        def _compute_conditionals(self, clip: Path):  # type: ignore[no-untyped-def]
            super()._compute_conditionals(clip)
            return object()  # has no save(): the write fails

    backend, voices_dir = make_backend(tmp_path, Unwritable)
    write_clip(voices_dir / "alice.wav")
    with caplog.at_level(logging.WARNING):
        backend.load()
    assert "alice" in names(backend.voices())
    assert "Could not cache voice conditionals" in caplog.text
    assert not list((tmp_path / "data").rglob("*.tmp"))  # no temporary files left


def test_silent_or_undecodable_clips_are_left_out_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend, voices_dir = make_backend(tmp_path)
    write_clip(voices_dir / "quiet.wav", peak=0.0)
    write_clip(voices_dir / "fine.wav")
    with caplog.at_level(logging.WARNING):
        backend.load()
    assert names(backend.voices()) == ["default", "fine"]
    assert "quiet.wav left out: it is silent" in caplog.text
    # Fixed in place: the new version is tried again.
    write_clip(voices_dir / "quiet.wav", peak=0.3)
    os.utime(voices_dir / "quiet.wav", ns=(1, 1))
    backend.voices()
    while backend.background_work():
        pass
    assert names(backend.voices()) == ["default", "fine", "quiet"]


def test_a_request_for_a_voice_that_turns_out_bad_fails_clearly(
    tmp_path: Path,
) -> None:
    backend, voices_dir = make_backend(tmp_path)
    backend.load()
    write_clip(voices_dir / "quiet.wav", peak=0.0)
    resolved = backend.resolve_voice("quiet", None)  # listed: the header is fine
    with pytest.raises(Exception, match="The voice quiet cannot be used: it is silent"):
        speak(backend, "Hello.", resolved.name)
    assert names(backend.voices()) == ["default"]


def test_resolve_gives_the_voice_settings(tmp_path: Path) -> None:
    backend, voices_dir = make_backend(tmp_path)
    write_clip(voices_dir / "alice.wav")
    (voices_dir / "alice.json").write_text(json.dumps({"temperature": 0.5}))
    backend.load()
    backend.voices()
    resolved = backend.resolve_voice("alice", None)
    assert (resolved.name, resolved.language) == ("alice", "en")
    assert dict(resolved.params) == {"temperature": 0.5}
    assert dict(backend.resolve_voice("default", "de").params) == {}
    # Turbo-like: English only, a requested language it lacks is not an error.
    assert backend.resolve_voice("default", "de").language == "en"


def test_multilingual_voices_are_listed_per_language(tmp_path: Path) -> None:
    backend, voices_dir = make_backend(tmp_path, FakeMultilingualBackend)
    write_clip(voices_dir / "alice.wav")
    write_clip(voices_dir / "hans.wav")
    (voices_dir / "hans.json").write_text(
        json.dumps({"description": "Hans", "languages": ["de"]})
    )
    backend.load()
    voices = backend.voices()
    assert names(voices) == [
        "default@en",
        "default@de",
        "default@fr",
        "alice@en",
        "alice@de",
        "alice@fr",
        "hans@de",
    ]
    by_name = {voice.name: voice for voice in voices}
    assert by_name["alice@de"].languages == ["de"]
    assert by_name["alice@de"].description == "Alice (German)"
    assert by_name["hans@de"].description == "Hans (German)"

    def resolve(name: str, language: "str | None" = None):  # type: ignore[no-untyped-def]
        resolved = backend.resolve_voice(name, language)
        return resolved.name, resolved.language

    assert resolve("alice@de") == ("alice", "de")
    assert resolve("alice@de", "fr-FR") == ("alice", "fr")  # the request wins
    assert resolve("alice") == ("alice", "en")  # a plain name: its first language
    assert resolve("hans", "FR") == ("hans", "de")  # hans speaks German only
    assert resolve("default", "de_DE") == ("default", "de")
    with pytest.raises(UnknownVoice, match="hans@de"):
        backend.resolve_voice("hans@fr", None)

    speak(backend, "Guten Tag.", "alice", "de")
    assert backend.spoken[-1][2] == "de"


@pytest.mark.parametrize(
    "text, low, high",
    [
        ("Hi.", 25, 40),
        ("The kitchen light is on.", 100, 125),
        ("[laugh] That is funny.", 100, 200),
        ("今日は晴れです。", 150, 200),
        ("x" * 5000, 1000, 1000),
    ],
)
def test_speech_token_budget(text: str, low: int, high: int) -> None:
    budget = speech_token_budget(text)
    assert low <= budget <= high
    # Always enough for slow speech: 8 characters a second, 25 tokens a second.
    assert budget >= min(1000, len(text) / 8 * 25)


def test_runaway_generation_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Babbler(FakeClipBackend):
        def _speak(self, job, conds, stats):  # type: ignore[no-untyped-def]
            max_tokens = job.budget.max_tokens
            self.budgets = getattr(self, "budgets", []) + [max_tokens]
            stats.tokens, stats.cut = max_tokens, True
            yield Piece(audio=np.zeros(960 * max_tokens, np.float32), tokens=max_tokens)

    backend, _ = make_backend(tmp_path, Babbler)
    backend.load()
    with caplog.at_level(logging.WARNING):
        pieces = speak(backend, "Hello there.", "default")
    assert backend.budgets == [speech_token_budget("Hello there.")]
    assert pieces[0].tokens == backend.budgets[0]
    assert "Stopped a runaway generation at" in caplog.text


def test_engine_error_for_a_vanished_voice(tmp_path: Path) -> None:
    backend, voices_dir = make_backend(tmp_path)
    write_clip(voices_dir / "alice.wav")
    backend.load()
    (voices_dir / "alice.wav").unlink()
    backend.voices()
    with pytest.raises(Exception, match="gone from the voices folder"):
        speak(backend, "Hello.", "alice")


def test_clip_soundfile_roundtrip_sanity(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "x.flac", seconds=5.5, peak=0.4)
    audio, rate = soundfile.read(str(path))
    assert rate == 24000 and abs(np.abs(audio).max() - 0.4) < 0.01


def test_languages_a_model_cannot_speak_are_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The real backends' language rules; listing voices needs no model.
    from wyoming_chatterbox.chatterbox.multilingual import (
        LANGUAGES,
        MultilingualBackend,
    )
    from wyoming_chatterbox.chatterbox.turbo import TurboBackend

    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    write_clip(voices_dir / "anna.wav")
    (voices_dir / "anna.json").write_text(json.dumps({"languages": ["xx", "de-AT"]}))
    turbo = TurboBackend(
        ModelSettings(data_dir=tmp_path, device="cpu", voices_dir=voices_dir)
    )
    mtl = MultilingualBackend(
        ModelSettings(data_dir=tmp_path, device="cpu", voices_dir=voices_dir)
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert names(turbo.voices()) == ["default", "anna"]
            voices = mtl.voices()
    assert [v for v in names(voices) if v.startswith("anna")] == ["anna@de"]
    assert len(voices) == len(LANGUAGES) + 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "Turbo speaks English only, not xx, de-AT" in messages[0]
    assert "does not speak 'xx'" in messages[1]
