"""The real chatterbox code path on a random-weight checkpoint, and startup errors.

The checkpoint comes from script/test-checkpoint (tiny T3, real S3Gen); its T3 ends
after a handful of speech tokens. Audio length is checked against the tokens:
S3Gen makes 960 samples (40 ms at 24 kHz) per token, including the 3 silence
tokens the engine appends to every group.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator, List

import aiohttp
import numpy as np
import pytest
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)

from tests.fakes import write_clip
from tests.wyoming_client import connect, free_port
from wyoming_chatterbox.sentences import split_groups
from wyoming_chatterbox.settings import ModelSettings
from wyoming_chatterbox.speech import (
    Budget,
    Piece,
    SamplingParams,
    SpeechJob,
    SynthesisCancelled,
)

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_TOKEN = 960
SILENCE_TOKENS = 3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """Built once and kept in .cache/ until the builder script changes."""
    builder = ROOT / "script" / "make_test_checkpoint.py"
    stamp = hashlib.sha256(builder.read_bytes()).hexdigest()
    out = ROOT / ".cache" / "test-checkpoint"
    if (out / "stamp").is_file() and (out / "stamp").read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        [str(ROOT / "script" / "test-checkpoint"), str(out)], check=True, env=ENV
    )
    (out / "stamp").write_text(stamp)
    return out


def audible(pieces: Iterable[Piece]) -> List[Piece]:
    """The audio pieces of a group: without the empty ones a backend yields
    between T3 blocks to give the worker its turn (engine.NOTHING_YET)."""
    return [piece for piece in pieces if piece.audio.size]


def first_audio(pieces: Iterable[Piece]) -> Piece:
    return next(iter(audible(pieces)))


@pytest.fixture(scope="module")
def backend(checkpoint: Path) -> Iterator:  # type: ignore[type-arg]
    from wyoming_chatterbox.chatterbox.turbo import TurboBackend

    backend = TurboBackend(
        ModelSettings(
            model_dir=checkpoint, data_dir=ROOT / ".cache" / "unused", device="cpu"
        )
    )
    backend.load()
    yield backend
    backend.close()


def test_backend_audio_matches_generated_tokens(backend) -> None:  # type: ignore[no-untyped-def]
    for text in ["Hello there.", "The kitchen light is on, and it is 21 degrees."]:
        pieces = audible(
            backend.speak(SpeechJob(text, "default", "en", SamplingParams()))
        )
        assert len(pieces) == 1
        piece = pieces[0]
        assert piece.audio.dtype == np.float32 and piece.audio.ndim == 1
        assert np.isfinite(piece.audio).all() and np.abs(piece.audio).max() <= 1.0
        assert 0 <= piece.tokens < 1000
        assert len(piece.audio) == SAMPLES_PER_TOKEN * (piece.tokens + SILENCE_TOKENS)


def test_backend_stops_within_tokens_when_asked(backend) -> None:  # type: ignore[no-untyped-def]
    checks: List[int] = []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) > 1  # stop before the second token

    with pytest.raises(SynthesisCancelled):
        list(
            backend.speak(
                SpeechJob(
                    "Stop me.", "default", "en", SamplingParams(), Budget(should_stop)
                )
            )
        )
    assert len(checks) == 2


def test_backend_does_not_speak_empty_text(backend) -> None:  # type: ignore[no-untyped-def]
    # Upstream's punc_norm would say "You need to add some text for me to talk."
    assert list(backend.speak(SpeechJob("  ", "default", "en", SamplingParams()))) == []


def test_builtin_voice_is_not_shared_state(backend) -> None:  # type: ignore[no-untyped-def]
    assert backend.model.conds is None  # calls pass their voice's conditionals
    gen = backend.conds["default"][1].gen
    before = {k: (v.dtype, v.clone()) for k, v in gen.items() if hasattr(v, "dtype")}
    list(backend.speak(SpeechJob("Once more.", "default", "en", SamplingParams())))
    for key, (dtype, value) in before.items():
        assert gen[key].dtype == dtype, key  # S3Gen's in-place casts hit a copy
        assert bool((gen[key] == value).all()), key


@pytest.fixture(scope="module")
def clip_backend(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:  # type: ignore[type-arg]
    """The real model with a voices folder: one good clip, one silent, one short."""
    from wyoming_chatterbox.chatterbox.turbo import TurboBackend

    root = tmp_path_factory.mktemp("clips")
    voices_dir = root / "voices"
    voices_dir.mkdir()
    write_clip(voices_dir / "alice.wav", seconds=6.0)
    write_clip(voices_dir / "quiet.wav", seconds=6.0, peak=0.0)
    write_clip(voices_dir / "short.wav", seconds=4.0)
    backend = TurboBackend(
        ModelSettings(
            model_dir=checkpoint,
            data_dir=root / "data",
            device="cpu",
            voices_dir=voices_dir,
        )
    )
    backend.load()
    yield backend
    backend.close()


def test_clip_voice_is_prepared_cached_and_spoken(
    clip_backend, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    from wyoming_chatterbox.chatterbox.turbo import TurboBackend

    assert [v.name for v in clip_backend.voices()] == ["default", "alice"]
    alice = clip_backend.conds["alice"][1]
    builtin = clip_backend.conds["default"][1]
    assert not bool((alice.t3.speaker_emb == builtin.t3.speaker_emb).all())
    piece = first_audio(
        clip_backend.speak(
            SpeechJob("Hello from Alice.", "alice", "en", SamplingParams())
        )
    )
    assert len(piece.audio) == SAMPLES_PER_TOKEN * (piece.tokens + SILENCE_TOKENS)

    cache = list((clip_backend.settings.data_dir / "voices").glob("turbo-*/*.pt"))
    assert len(cache) == 1
    again = TurboBackend(
        ModelSettings(
            model_dir=checkpoint,
            data_dir=clip_backend.settings.data_dir,
            device="cpu",
            voices_dir=clip_backend.settings.voices_dir,
        )
    )
    with caplog.at_level(logging.INFO):
        again.load()
    try:
        assert "Prepared voice" not in caplog.text  # read from the cache
        cached = again.conds["alice"][1]
        assert bool((cached.t3.speaker_emb == alice.t3.speaker_emb).all())
        assert bool(
            (
                cached.t3.cond_prompt_speech_tokens
                == alice.t3.cond_prompt_speech_tokens
            ).all()
        )
    finally:
        again.close()


def test_runaway_generation_stops_at_the_text_budget(
    clip_backend, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    import torch

    from wyoming_chatterbox.chatterbox.base import speech_token_budget

    head = clip_backend.model.t3.speech_head
    stop = clip_backend.model.t3.hp.stop_speech_token
    saved = head.bias.data[stop].item()
    head.bias.data[stop] = -1e9  # a model that never stops talking
    try:
        with caplog.at_level(logging.WARNING), torch.inference_mode():
            pieces = list(
                clip_backend.speak(SpeechJob("Hi.", "default", "en", SamplingParams()))
            )
    finally:
        head.bias.data[stop] = saved
    assert sum(p.tokens for p in pieces) == speech_token_budget("Hi.") < 100
    assert "Stopped a runaway generation" in caplog.text


@contextlib.asynccontextmanager
async def real_server(*args: str) -> AsyncIterator[int]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wyoming_chatterbox",
        "--uri",
        f"tcp://127.0.0.1:{port}",
        *args,
        env=ENV,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(1200):
            if process.returncode is not None:
                assert process.stderr is not None
                raise AssertionError((await process.stderr.read()).decode())
            try:
                async with connect(port) as client:
                    await client.send(Describe().event())
                    if await client.read(timeout=5) is not None:
                        break
            except OSError:
                await asyncio.sleep(0.1)
        yield port
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)


def tokens_in(audio: bytes, groups: int) -> int:
    samples = len(audio) // 2
    assert samples % SAMPLES_PER_TOKEN == 0, samples
    tokens = samples // SAMPLES_PER_TOKEN - SILENCE_TOKENS * groups
    assert tokens >= 0
    return tokens


async def test_real_server_one_shot_and_streaming(
    checkpoint: Path, tmp_path: Path
) -> None:
    text = "Good evening. The front door is locked. All the lights are off now."
    groups = len(split_groups(text))
    assert groups == 2
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    write_clip(voices_dir / "Alice.flac")
    http_port = free_port()
    async with real_server(
        "--model-dir",
        str(checkpoint),
        "--device",
        "cpu",
        "--data-dir",
        str(tmp_path / "data"),
        "--voices-dir",
        str(voices_dir),
        "--http-port",
        str(http_port),
    ) as port:
        async with connect(port) as client:
            await client.send(Describe().event())
            event = await client.read()
            assert event is not None
            voices = Info.from_event(event).tts[0].voices
            assert [v.name for v in voices] == ["default", "alice"]

            await client.send(
                Synthesize(text=text, voice=SynthesizeVoice(name="alice")).event()
            )
            one_shot = await client.read_reply(timeout=120)
            assert one_shot.compact_types() == [
                "audio-start",
                "audio-chunk",
                "audio-stop",
            ]
            tokens_in(one_shot.audio, groups)

            await client.send(SynthesizeStart().event())
            for i in range(0, len(text), 5):
                await client.send(SynthesizeChunk(text=text[i : i + 5]).event())
            await client.send(Synthesize(text=text).event(), SynthesizeStop().event())
            streamed = await client.read_reply(streaming=True, timeout=120)
            assert streamed.compact_types() == [
                "audio-start",
                "audio-chunk",
                "audio-stop",
                "synthesize-stopped",
            ]
            tokens_in(streamed.audio, groups)
            assert {(c.rate, c.width, c.channels) for c in streamed.chunks} == {
                (24000, 2, 1)
            }

        # The same model over HTTP: one streamed WAV, whole speech tokens.
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=180)
        ) as http:
            async with http.post(
                f"http://127.0.0.1:{http_port}/api/speak.wav",
                json={"text": "Hello there.", "voice": "alice"},
            ) as resp:
                assert resp.status == 200
                wav = await resp.read()
        assert wav[:4] == b"RIFF" and wav[36:40] == b"data"
        tokens_in(wav[44:], 1)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "wyoming_chatterbox",
            "--uri",
            "tcp://127.0.0.1:1",
            *args,
        ],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_clear_error(result: subprocess.CompletedProcess, *words: str) -> None:  # type: ignore[type-arg]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_startup_without_network_or_model_dir(tmp_path: Path) -> None:
    result = run_cli("--data-dir", str(tmp_path), "--device", "cpu")
    assert_one_clear_error(result, "Could not download", "--model-dir")


def test_startup_with_missing_model_dir(tmp_path: Path) -> None:
    result = run_cli("--model-dir", str(tmp_path / "nope"))
    assert_one_clear_error(result, "--model-dir", "not a folder")


def test_startup_with_incomplete_model_dir(tmp_path: Path) -> None:
    (tmp_path / "ve.safetensors").write_bytes(b"")
    result = run_cli("--model-dir", str(tmp_path), "--device", "cpu")
    assert_one_clear_error(
        result, "t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors"
    )


def test_startup_with_bad_device(checkpoint: Path) -> None:
    result = run_cli("--model-dir", str(checkpoint), "--device", "cuda:0")
    assert_one_clear_error(result, "cuda:0", "--device cpu")
    result = run_cli("--model-dir", str(checkpoint), "--device", "tpu")
    assert_one_clear_error(result, "tpu", "auto, cpu, cuda")


def test_startup_with_unknown_default_voice(checkpoint: Path) -> None:
    result = run_cli(
        "--model-dir", str(checkpoint), "--device", "cpu", "--voice", "zed"
    )
    assert_one_clear_error(result, "zed", "default")


def test_startup_with_missing_voices_dir(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli(
        "--model-dir", str(checkpoint), "--voices-dir", str(tmp_path / "x")
    )
    assert_one_clear_error(result, "--voices-dir", "not a folder")


def test_bad_options_are_refused() -> None:
    result = run_cli("--top-p", "1.5")
    assert result.returncode == 2 and "--top-p" in result.stderr
    result = run_cli("--samples-per-chunk", "0")
    assert result.returncode == 2 and "--samples-per-chunk" in result.stderr
    result = run_cli("--loudness", "3")
    assert result.returncode == 2 and "--loudness" in result.stderr
    result = run_cli("--sentence-silence", "-1")
    assert result.returncode == 2 and "--sentence-silence" in result.stderr
    result = run_cli("--model", "huge")
    assert result.returncode == 2 and "--model" in result.stderr


def test_unload_and_reload_keeps_the_voices(clip_backend, caplog) -> None:  # type: ignore[no-untyped-def]
    # What --idle-unload does to the real backend: close(), later load() again.
    clip_backend.close()
    assert clip_backend.model is None and clip_backend.conds == {}
    assert [v.name for v in clip_backend.voices()] == ["default", "alice"]
    with caplog.at_level(logging.INFO):
        clip_backend.load()
    assert "Prepared voice" not in caplog.text  # the clip came from the disk cache
    piece = first_audio(
        clip_backend.speak(SpeechJob("Back again.", "alice", "en", SamplingParams()))
    )
    assert len(piece.audio) == SAMPLES_PER_TOKEN * (piece.tokens + SILENCE_TOKENS)


async def test_real_engine_under_concurrent_clients(checkpoint: Path) -> None:
    """Issue 6's load test at a small scale with the real model: every reply
    complete and made of whole speech tokens, Describe answered throughout."""
    texts = [f"Client number {i} asks about the lights." for i in range(4)]
    async with real_server(
        "--model-dir", str(checkpoint), "--device", "cpu", "--no-warmup"
    ) as port:

        async def one(i: int) -> bytes:
            async with connect(port) as client:
                if i % 2:
                    await client.send(SynthesizeStart().event())
                    await client.send(SynthesizeChunk(text=texts[i]).event())
                    await client.send(SynthesizeStop().event())
                else:
                    await client.send(Synthesize(text=texts[i]).event())
                reply = await client.read_reply(streaming=bool(i % 2), timeout=120)
                return reply.audio

        describe_times: List[float] = []
        done = asyncio.Event()

        async def describer() -> None:
            async with connect(port) as client:
                while not done.is_set():
                    started = asyncio.get_running_loop().time()
                    await client.send(Describe().event())
                    assert await client.read(timeout=10) is not None
                    describe_times.append(asyncio.get_running_loop().time() - started)
                    await asyncio.sleep(0.05)

        watcher = asyncio.create_task(describer())
        audios = await asyncio.gather(*(one(i) for i in range(4)))
        done.set()
        await watcher
    for audio in audios:
        tokens_in(audio, 1)
    print(
        f"\nDescribe during real-engine load: max {max(describe_times) * 1000:.0f} ms"
    )
    assert describe_times and max(describe_times) < 1.0  # never behind the model
