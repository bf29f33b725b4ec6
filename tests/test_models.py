"""Several models in one server (`--model turbo --model multilingual`): the
flags, one voice list, each request on its voice's model, and each model
cancelled, batched and idle-unloaded on its own. Fast fakes stand in for the
models; tests/test_model.py runs the real pair."""

import asyncio
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from tests.fakes import (
    FakeBackend,
    FakeClipBackend,
    FakeMultilingualBackend,
    write_clip,
)
from tests.wyoming_client import connect
from wyoming_chatterbox.__main__ import build_parser, settings_from
from wyoming_chatterbox.chatterbox import share_languages
from wyoming_chatterbox.engine import EngineWorker
from wyoming_chatterbox.models import ModelSet
from wyoming_chatterbox.settings import EngineSettings, ModelSettings, Settings
from wyoming_chatterbox.speech import (
    NOTHING_YET,
    Piece,
    SamplingParams,
    SpeechJob,
    UnknownVoice,
    VoiceInfo,
)

# --- the flags -------------------------------------------------------------------


def parse(*argv: str) -> ModelSettings:
    return settings_from(build_parser().parse_args(list(argv))).model


def test_one_model_or_two_by_flag() -> None:
    assert parse().models == ("turbo",)
    assert parse("--model", "nano").models == ("nano",)
    assert parse("--model", "turbo", "--model", "multilingual").models == (
        "turbo",
        "multilingual",
    )
    two = parse(
        "--model",
        "nano,multilingual",
        "--model-dir",
        "multilingual=/m",
        "--model-dir",
        "nano=/n",
    )
    assert two.models == ("nano", "multilingual")
    assert two.model_dir is None
    assert two.for_model("nano").model_dir == Path("/n")
    assert two.for_model("multilingual").model_dir == Path("/m")
    assert two.for_model("nano").models == ("nano",)
    # One model: a plain folder, or named.
    assert parse("--model-dir", "/t").for_model("turbo").model_dir == Path("/t")
    assert parse("--model-dir", "turbo=/t").model_dir == Path("/t")
    assert parse("--model", "multilingual").multilingual_version == "v3"
    assert parse("--multilingual-version", "v2").multilingual_version == "v2"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "turbo,nano"], ["turbo and nano", "choose one"]),
        (["--model", "turbo", "--model", "turbo"], ["once"]),
        (["--model", "turbo,multilingual", "--model-dir", "/x"], ["turbo=/x"]),
        (["--model-dir", "nano=/x"], ["nano is not one of the models"]),
        (
            ["--model", "nano,multilingual", "--model-dir", "nano=/a"]
            + ["--model-dir", "nano=/b"],
            ["twice"],
        ),
    ],
)
def test_impossible_model_choices_say_why(argv: List[str], words: List[str]) -> None:
    with pytest.raises(ValueError) as caught:
        parse(*argv)
    for word in words:
        assert word in str(caught.value)


def test_unknown_model_names_are_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        parse("--model", "turbo,huge")


# --- one voice list ---------------------------------------------------------------


@pytest.fixture
def clip_pair(tmp_path: Path) -> Iterator[Dict[str, Any]]:
    """An English model and a multilingual one (en, de, fr) over the same voices
    folder, as make_backends pairs them."""
    voices = tmp_path / "voices"
    voices.mkdir()
    for name in ("alice", "bob", "carol"):
        write_clip(voices / f"{name}.wav")
    (voices / "voices.yaml").write_text(
        "bob:\n  languages: [de]\ncarol:\n  languages: [en]\n"
    )
    settings = ModelSettings(data_dir=tmp_path / "data", voices_dir=voices)

    class English(FakeClipBackend):
        kind = "turbo"
        model_name = "English model"

    class Many(FakeMultilingualBackend):
        kind = "multilingual"
        model_name = "Many-language model"

    english, many = English(settings), Many(settings)
    share_languages([english, many])
    for backend in (english, many):
        backend.load()
    yield {"turbo": english, "multilingual": many}
    for backend in (english, many):
        backend.close()


def test_each_language_is_listed_once_by_the_model_that_serves_it(
    clip_pair: Dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        voices = {v.name: v for v in ModelSet(clip_pair).voices()}
    # English on the English model, by plain name; the rest as VOICE@LANG on
    # the multilingual one; no VOICE@en twice over; bob (German only) is not
    # offered in English, carol (English only) not in German or French.
    assert list(voices) == [
        "default",
        "alice",
        "carol",
        "default@de",
        "default@fr",
        "alice@de",
        "alice@fr",
        "bob@de",
    ]
    assert voices["carol"].languages == ["en"]
    assert voices["bob@de"].languages == ["de"]
    assert "speaks English only" not in caplog.text  # bob is the other model's


def test_a_voice_goes_to_the_model_that_lists_it(clip_pair: Dict[str, Any]) -> None:
    models = ModelSet(clip_pair)
    models.voices()
    cases = [
        (("alice", None), ("turbo", "alice", "en")),
        (("alice@de", None), ("multilingual", "alice", "de")),
        (("default@fr", None), ("multilingual", "default", "fr")),
        # A client that names a language (Home Assistant never does).
        (("alice", "de-DE"), ("multilingual", "alice", "de")),
        (("alice", "en"), ("turbo", "alice", "en")),
        (("carol", "de"), ("turbo", "carol", "en")),  # nobody speaks it in German
    ]
    for (name, language), expected in cases:
        resolved = models.resolve(name, language)
        assert (resolved.model, resolved.name, resolved.language) == expected, name
    with pytest.raises(UnknownVoice) as caught:
        models.resolve("default@en", None)  # English is the English model's
    assert "default@de" in str(caught.value) and "alice" in str(caught.value)


# --- the server ------------------------------------------------------------------


class Model(FakeBackend):
    """A fake model with its own voices (VoiceInfo name, language)."""

    def __init__(self, kind: str, voices: List[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind = kind
        self.model_name = f"Fake {kind}"
        self._voices = voices

    def voices(self) -> List[VoiceInfo]:
        return [
            VoiceInfo(name, name, [name.partition("@")[2] or "en"])
            for name in self._voices
        ]


def pair(**kwargs: Any) -> Dict[str, Model]:
    return {
        "turbo": Model("turbo", ["default"], **kwargs),
        "multilingual": Model("multilingual", ["default@de", "default@fr"], **kwargs),
    }


def settings(**values: Any) -> Settings:
    return Settings.of(default_voice="default", loudness=None, **values)


async def test_describe_lists_both_models_and_each_reply_runs_on_its_own(
    serve_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backends = pair()
    with caplog.at_level(logging.INFO, logger="wyoming_chatterbox"):
        async with serve_backend(backends, settings()) as server:
            async with connect(server.port) as client:
                await client.send(Describe().event())
                event = await client.read()
                assert event is not None
                program = Info.from_event(event).tts[0]
                assert [v.name for v in program.voices] == [
                    "default",
                    "default@de",
                    "default@fr",
                ]
                assert "Fake turbo and Fake multilingual" in (program.description or "")
                for name, text in (("default@de", "Hallo."), ("default", "Hello.")):
                    voice = SynthesizeVoice(name=name)
                    await client.send(Synthesize(text=text, voice=voice).event())
                    reply = await client.read_reply()
                    assert len(reply.audio) > 0
    assert backends["multilingual"].asked == ["Hallo."]
    assert backends["turbo"].asked == ["Hello."]
    lines = [r.getMessage() for r in caplog.records if "Reply done" in r.getMessage()]
    assert lines[0].startswith("Reply done: model=multilingual voice=default@de ")
    assert lines[1].startswith("Reply done: model=turbo voice=default ")


async def test_a_cancelled_reply_stops_its_model_only(serve_backend: Any) -> None:
    backends = pair(delay=0.5)
    async with serve_backend(backends, settings()) as server:
        async with connect(server.port) as staying:
            async with connect(server.port) as leaving:
                german = SynthesizeVoice(name="default@de")
                await leaving.send(Synthesize(text="Nein.", voice=german).event())
                await staying.send(Synthesize(text="Hello.").event())
                await asyncio.to_thread(backends["multilingual"].started.wait, 5)
            reply = await staying.read_reply(timeout=10)  # `leaving` hung up
            assert len(reply.audio) > 0
    assert backends["multilingual"].cancelled == ["Nein."]
    assert backends["multilingual"].finished == []
    assert backends["turbo"].finished == ["Hello."]


async def test_each_model_is_unloaded_after_its_own_idle_time() -> None:
    backends = pair()
    worker = EngineWorker(backends, EngineSettings(idle_unload=0.4, warm_up=False))
    await worker.start()
    try:
        english, many = backends["turbo"], backends["multilingual"]
        # English keeps being asked for; German is not.
        for _ in range(8):
            stream = worker.open_stream("default", SamplingParams(), model="turbo")
            stream.add_group("Still here.")
            stream.close()
            assert [p async for p in stream.pieces()]
            await asyncio.sleep(0.1)
        assert many.closes == 1 and not many.loaded
        assert english.closes == 0 and english.loaded
        assert worker.loaded() == {"turbo": True, "multilingual": False}
        # A German request loads it again; English was never unloaded.
        stream = worker.open_stream(
            "default@de", SamplingParams(), model="multilingual"
        )
        stream.add_group("Wieder da.")
        stream.close()
        assert [p async for p in stream.pieces()]
        assert many.loads == 2 and english.loads == 1
    finally:
        await worker.stop()


class Batching(Model):
    """A model that advances up to two groups in one step: each group begins
    (NOTHING_YET: its prompt, then the worker's turn), then yields its audio."""

    batch_size = 2

    def __init__(self, kind: str, voices: List[str], log: List[str]) -> None:
        super().__init__(kind, voices)
        self.log = log

    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        self.log.append(f"begin {job.text}")
        yield NOTHING_YET
        self.log.append(f"audio {job.text}")
        yield Piece(audio=np.full(100, 0.1, np.float32))


async def test_each_model_batches_its_own_groups() -> None:
    """Two English groups and a German one wait: the English model begins both
    of its groups before either speaks (its batch has room for two), and the
    German model begins its group at once too, although two English groups are
    running (the models' batches are their own)."""
    log: List[str] = []
    backends: Dict[str, Model] = {
        "turbo": Batching("turbo", ["default"], log),
        "multilingual": Batching("multilingual", ["default@de"], log),
    }
    worker = EngineWorker(backends, EngineSettings(warm_up=False))
    await worker.start()
    try:
        streams = [
            worker.open_stream("default", SamplingParams(), model="turbo"),
            worker.open_stream("default", SamplingParams(), model="turbo"),
            worker.open_stream("default@de", SamplingParams(), model="multilingual"),
        ]
        for i, stream in enumerate(streams):
            stream.add_group(f"group {i}")
            stream.close()
        for stream in streams:
            assert [p async for p in stream.pieces()]
    finally:
        await worker.stop()
    assert sorted(log[:3]) == ["begin group 0", "begin group 1", "begin group 2"]
    assert sorted(log[3:]) == ["audio group 0", "audio group 1", "audio group 2"]
