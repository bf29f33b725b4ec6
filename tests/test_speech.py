"""Voices, text cleanup, loudness and pauses, seen by a client of the real server.

The backends are fakes (tests/fakes.py) around the real voice catalogue, engine
and handler.
"""

import asyncio
from pathlib import Path
from typing import List

import numpy as np
import pyloudnorm
import pytest
from wyoming.error import Error
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)

from tests.fakes import (
    FakeClipBackend,
    FakeMultilingualBackend,
    fake_bytes,
    fake_samples,
    write_clip,
)
from tests.wyoming_client import Client, connect
from wyoming_chatterbox.sentences import split_groups
from wyoming_chatterbox.settings import ModelSettings, Settings
from wyoming_chatterbox.speech import Piece, SamplingParams

RATE = 24000


async def describe(client: Client) -> Info:
    await client.send(Describe().event())
    event = await client.read()
    assert event is not None and Info.is_type(event.type)
    return Info.from_event(event)


def voice_names(info: Info) -> List[str]:
    return [voice.name for voice in info.tts[0].voices]


def settings(**kwargs) -> Settings:  # type: ignore[no-untyped-def]
    # No warm-up (as the old ServerSettings' default): tests count what is spoken.
    base = dict(default_voice="default", loudness=None, clean_text=False, warm_up=False)
    base.update(kwargs)
    return Settings.of(**base)  # type: ignore[arg-type]


async def test_clips_are_voices_and_new_ones_appear_without_restart(
    serve_backend, tmp_path: Path
) -> None:
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    write_clip(voices_dir / "Alice.wav")
    (voices_dir / "alice.json").write_text('{"description": "Alice, calm"}')
    backend = FakeClipBackend(
        ModelSettings(data_dir=tmp_path / "data", device="cpu", voices_dir=voices_dir)
    )
    async with serve_backend(backend, settings()) as server, connect(
        server.port
    ) as client:
        info = await describe(client)
        assert voice_names(info) == ["default", "alice"]
        alice = info.tts[0].voices[1]
        assert alice.description == "Alice, calm" and alice.languages == ["en"]

        write_clip(voices_dir / "bob.flac", peak=0.3)
        assert voice_names(await describe(client)) == ["default", "alice", "bob"]
        # Prepared in the background, with no request for it.
        for _ in range(200):
            if "bob.flac" in backend.computed:
                break
            await asyncio.sleep(0.01)
        assert backend.computed == ["Alice.wav", "bob.flac"]

        await client.send(
            Synthesize(text="Hello there.", voice=SynthesizeVoice(name="bob")).event()
        )
        reply = await client.read_reply()
        assert len(reply.audio) == fake_bytes("Hello there.")
        assert backend.spoken[-1][1] == {"voice": "bob", "peak": 0.3}


async def test_unknown_voice_error_names_the_voices(
    serve_backend, tmp_path: Path
) -> None:
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    write_clip(voices_dir / "alice.wav")
    backend = FakeClipBackend(
        ModelSettings(data_dir=tmp_path / "data", device="cpu", voices_dir=voices_dir)
    )
    async with serve_backend(backend, settings()) as server, connect(
        server.port
    ) as client:
        await client.send(
            Synthesize(text="Hi.", voice=SynthesizeVoice(name="../alice")).event()
        )
        event = await client.read()
        assert event is not None and Error.is_type(event.type)
        error = Error.from_event(event)
        assert error.code == "unknown-voice"
        assert (
            error.text == "Unknown voice '../alice'; available voices: default, alice"
        )
        assert await client.read() is None  # closed


async def test_per_language_voices_and_language_in_request(
    serve_backend, tmp_path: Path
) -> None:
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    write_clip(voices_dir / "alice.wav")
    backend = FakeMultilingualBackend(
        ModelSettings(data_dir=tmp_path / "data", device="cpu", voices_dir=voices_dir)
    )
    async with serve_backend(
        backend, settings(default_voice="default@de")
    ) as server, connect(server.port) as client:
        info = await describe(client)
        assert "alice@fr" in voice_names(info)
        assert {lang for v in info.tts[0].voices for lang in v.languages} == {
            "en",
            "de",
            "fr",
        }
        for voice, expected in [
            (None, ("default", "de")),  # --voice default@de
            (SynthesizeVoice(name="alice@fr"), ("alice", "fr")),
            (SynthesizeVoice(name="alice"), ("alice", "en")),
            # A language without a name: the default voice in that language.
            (SynthesizeVoice(language="fr-FR"), ("default", "fr")),
            # One it does not speak: the default voice's own language.
            (SynthesizeVoice(language="ja"), ("default", "de")),
        ]:
            await client.send(Synthesize(text="Bonjour.", voice=voice).event())
            await client.read_reply()
            text, conds, language = backend.spoken[-1]
            assert (conds["voice"], language) == expected


async def test_voice_settings_reach_the_model(serve_backend, tmp_path: Path) -> None:
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    write_clip(voices_dir / "alice.wav")
    (voices_dir / "voices.yaml").write_text("alice:\n  temperature: 0.3\n")
    seen: List[SamplingParams] = []

    class Recording(FakeClipBackend):
        def _speak(self, job, conds, stats):  # type: ignore[no-untyped-def]
            seen.append(job.params)
            return super()._speak(job, conds, stats)

    backend = Recording(
        ModelSettings(data_dir=tmp_path / "data", device="cpu", voices_dir=voices_dir)
    )
    # The command line's settings, over the model's defaults.
    server_params = {"temperature": 0.9, "top_p": 0.5}
    async with serve_backend(
        backend, settings(params=server_params)
    ) as server, connect(server.port) as client:
        for name in ["alice", "default"]:
            await client.send(
                Synthesize(text="Hi.", voice=SynthesizeVoice(name=name)).event()
            )
            await client.read_reply()
    assert (seen[0].temperature, seen[0].top_p) == (0.3, 0.5)
    assert (seen[1].temperature, seen[1].top_p) == (0.9, 0.5)


async def test_llm_markdown_is_cleaned_before_splitting(serve) -> None:
    text = "## Weather\n\nIt is **21°C** 🌡️ outside. See [the map](https://x.io/m)."
    async with serve(clean_text=True) as server, connect(server.port) as client:
        await client.send(SynthesizeStart().event())
        for i in range(0, len(text), 3):
            await client.send(SynthesizeChunk(text=text[i : i + 3]).event())
        await client.send(SynthesizeStop().event())
        await client.read_reply(streaming=True)
        asked = server.backend.asked
    spoken = " ".join(asked)
    for gone in ["#", "*", "🌡", "https", "(", "["]:
        assert gone not in spoken
    assert "Weather" in asked[0] and "21 degrees Celsius" in spoken
    assert "the map" in spoken


async def test_cleanup_off_speaks_text_as_sent(serve) -> None:
    async with serve(clean_text=False) as server, connect(server.port) as client:
        await client.send(Synthesize(text="It is **warm**.").event())
        await client.read_reply()
        assert server.backend.asked == ["It is **warm**."]


async def test_sentence_silence_between_groups_only(serve) -> None:
    text = "First sentence here. Second one follows. And a third to end it."
    groups = split_groups(text)
    assert len(groups) >= 2
    async with serve(sentence_silence=0.25) as server, connect(server.port) as client:
        await client.send(Synthesize(text=text).event())
        reply = await client.read_reply()
    pause = int(0.25 * RATE) * 2
    assert len(reply.audio) == fake_bytes(text) + pause * (len(groups) - 1)
    samples = np.frombuffer(reply.audio, np.int16)
    first = fake_samples(groups[0])
    assert (samples[first : first + pause // 2] == 0).all()
    assert samples[first + pause // 2] != 0
    assert samples[-1] != 0  # no pause at the end


def speech_like(seconds: float, lufs: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    voiced = np.sin(2 * np.pi * 150 * t) + 0.4 * np.sin(2 * np.pi * 450 * t)
    audio = voiced * (0.3 + 0.7 * np.sin(2 * np.pi * 3 * t) ** 2)
    audio = audio + 0.05 * rng.standard_normal(len(t))
    meter = pyloudnorm.Meter(RATE)
    gain = 10 ** ((lufs - meter.integrated_loudness(audio)) / 20)
    return (audio * gain).astype(np.float32)


@pytest.mark.parametrize("target", [-16.0, -20.0])
async def test_replies_come_at_the_target_loudness(
    serve_backend, tmp_path: Path, target: float
) -> None:
    class Quiet(FakeClipBackend):
        calls = 0

        def _speak(self, job, conds, stats):  # type: ignore[no-untyped-def]
            Quiet.calls += 1
            stats.tokens = 25
            audio = speech_like(1.0 + 0.5 * Quiet.calls, -27.0, Quiet.calls)
            yield Piece(audio=audio, tokens=25)

    backend = Quiet(ModelSettings(data_dir=tmp_path / "data", device="cpu"))
    text = "One sentence here. Then another one. And a third one to finish."
    async with serve_backend(backend, settings(loudness=target)) as server, connect(
        server.port
    ) as client:
        await client.send(Synthesize(text=text).event())
        reply = await client.read_reply()
    audio = np.frombuffer(reply.audio, np.int16).astype(np.float64) / 32768
    loudness = pyloudnorm.Meter(RATE).integrated_loudness(audio)
    assert abs(loudness - target) < 1.0
    assert np.abs(audio).max() < 0.9  # no clipping


async def test_loudness_off_leaves_audio_alone(serve_backend, tmp_path: Path) -> None:
    class Quiet(FakeClipBackend):
        def _speak(self, job, conds, stats):  # type: ignore[no-untyped-def]
            stats.tokens = 25
            yield Piece(audio=speech_like(2.0, -27.0), tokens=25)

    backend = Quiet(ModelSettings(data_dir=tmp_path / "data", device="cpu"))
    async with serve_backend(backend, settings(loudness=None)) as server, connect(
        server.port
    ) as client:
        await client.send(Synthesize(text="Hello.").event())
        reply = await client.read_reply()
    audio = np.frombuffer(reply.audio, np.int16).astype(np.float64) / 32768
    assert abs(pyloudnorm.Meter(RATE).integrated_loudness(audio) + 27.0) < 0.5
