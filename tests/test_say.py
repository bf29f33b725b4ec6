"""wyoming-chatterbox-say against the real server (fake engine), run as the
user runs it: a subprocess. Its WAV holds exactly the Wyoming reply's audio;
Ctrl+C (SIGINT) mid-reply stops it and the server's generation; a machine
without PortAudio or an output device gets one clear sentence."""

import asyncio
import logging
import signal
import sys
import types
import wave
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
from wyoming.tts import Synthesize

from tests.fakes import FakeBackend, fake_samples
from tests.wyoming_client import connect
from wyoming_chatterbox import say
from wyoming_chatterbox.settings import Settings
from wyoming_chatterbox.speech import Piece

TEXT = (
    "The first sentence is short. Here is the second one. And a third to fill "
    "the group. A fourth sentence ends it. The fifth is here. And the sixth. "
    "The seventh ends the reply."
)


class TextBackend(FakeBackend):
    """Audio made of the text's letters (100 samples each), so that a reply
    sounds the same however its sentences were grouped (the plain fake's
    depends on how many groups it was asked for)."""

    def speak(self, job):  # type: ignore[no-untyped-def]
        for _ in super().speak(job):
            letters = [ord(char) / 512 for char in job.text if not char.isspace()]
            audio = np.repeat(np.array(letters, np.float32), 100)
            assert audio.size == fake_samples(job.text)
            yield Piece(audio=audio)


async def run_say(*args: str, stdin: bytes = b"") -> "tuple[int, str]":
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wyoming_chatterbox.say",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def settings(streaming: bool) -> Settings:
    return Settings.of(
        default_voice="default", streaming=streaming, loudness=None, clean_text=False
    )


@pytest.mark.parametrize("streaming", [True, False])
async def test_wav_output_is_the_wyoming_reply(serve_backend, tmp_path: Path, streaming: bool) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "reply.wav"
    async with serve_backend(TextBackend(), settings(streaming)) as server:
        async with connect(server.port) as client:
            await client.send(Synthesize(text=TEXT).event())
            reference = await client.read_reply()
        whole_before = len(server.backend.asked_whole)
        code, err = await run_say(
            "--uri", f"tcp://127.0.0.1:{server.port}", "--output", str(out), TEXT
        )
        whole_after = len(server.backend.asked_whole)
    assert code == 0, err
    # A one-shot synthesize is made whole; a stream (synthesize-start, used
    # when the server offers it) is not.
    assert (whole_after == whole_before) == streaming
    with wave.open(str(out)) as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (
            24000,
            2,
            1,
        )
        frames = wav.readframes(wav.getnframes())
    assert frames == reference.audio and len(frames) > 0


async def test_text_from_stdin_and_a_voice(serve_backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "reply.wav"
    async with serve_backend(TextBackend(), settings(True)) as server:
        uri = f"tcp://127.0.0.1:{server.port}"
        code, err = await run_say(
            "--uri",
            uri,
            "--output",
            str(out),
            "--voice",
            "default",
            stdin=b"Hello from stdin.",
        )
        assert code == 0, err
        with wave.open(str(out)) as wav:
            assert wav.getnframes() == fake_samples("Hello from stdin.")
        code, err = await run_say(
            "--uri", uri, "--output", str(out), "--voice", "nobody", "Hi."
        )
    assert code == 1 and "nobody" in err and "default" in err


async def test_ctrl_c_mid_reply_stops_the_servers_generation(serve_backend, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="wyoming_chatterbox")
    long_text = " ".join(f"Sentence number {i} is here." for i in range(30))
    backend = FakeBackend(delay=0.5)
    out = tmp_path / "reply.wav"
    async with serve_backend(backend, settings(True)) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wyoming_chatterbox.say",
            "--uri",
            f"tcp://127.0.0.1:{server.port}",
            "--output",
            str(out),
            long_text,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(500):
            if len(backend.finished) >= 1:
                break
            await asyncio.sleep(0.02)
        assert backend.finished, "no group was made"
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        for _ in range(100):
            if "Reply cancelled" in caplog.text:
                break
            await asyncio.sleep(0.02)
        asked = len(backend.asked)
        await asyncio.sleep(1.2)
        assert len(backend.asked) == asked  # nothing more is begun
    assert proc.returncode == say.EXIT_INTERRUPTED and "Stopped" in err.decode()
    assert "Reply cancelled" in caplog.text
    assert asked < 20
    with wave.open(str(out)) as wav:  # what came before Ctrl+C, as a good WAV
        assert wav.getnframes() > 0


async def test_no_server_is_one_sentence(tmp_path: Path) -> None:
    code, err = await run_say(
        "--uri", "tcp://127.0.0.1:1", "--output", str(tmp_path / "x.wav"), "Hi."
    )
    assert code == 1
    assert err.startswith("wyoming-chatterbox-say: cannot connect to tcp://127.0.0.1:1")
    assert len(err.strip().splitlines()) == 1


async def test_nothing_to_say() -> None:
    code, err = await run_say("--output", "x.wav", stdin=b"  \n")
    assert code == say.EXIT_USAGE and "nothing to say" in err


def _main_exit(
    monkeypatch: pytest.MonkeyPatch, module: Any, capsys: pytest.CaptureFixture
) -> "tuple[int, str]":
    monkeypatch.setitem(sys.modules, "sounddevice", module)
    with pytest.raises(SystemExit) as exited:
        say.main(["--uri", "tcp://127.0.0.1:1", "Hi."])
    return int(exited.value.code), capsys.readouterr().err  # type: ignore[arg-type]


def test_no_portaudio_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, err = _main_exit(monkeypatch, None, capsys)  # None: the import fails
    assert code == 1
    assert "PortAudio is not installed" in err and "--output" in err
    assert len(err.strip().splitlines()) == 1


def test_no_output_device_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_device(kind: str) -> None:
        raise RuntimeError("Error querying device -1")

    fake = types.SimpleNamespace(query_devices=no_device)
    code, err = _main_exit(monkeypatch, fake, capsys)
    assert code == 1 and "no audio output device" in err and "--output" in err


async def test_speakers_play_the_reply_as_it_comes(serve_backend) -> None:  # type: ignore[no-untyped-def]
    """With a stand-in for sounddevice: the chunks reach the output stream in
    order, and the stream is started, drained and closed."""
    played: List[bytes] = []
    calls: List[str] = []

    class Stream:
        def __init__(self, samplerate: int, channels: int, dtype: str) -> None:
            calls.append(f"open {samplerate} {channels} {dtype}")

        def start(self) -> None:
            calls.append("start")

        def write(self, data: bytes) -> None:
            played.append(bytes(data))

        def stop(self) -> None:
            calls.append("stop")

        def abort(self) -> None:
            calls.append("abort")

        def close(self) -> None:
            calls.append("close")

    fake = types.SimpleNamespace(query_devices=lambda kind: {}, RawOutputStream=Stream)
    async with serve_backend(TextBackend(), settings(True)) as server:
        async with connect(server.port) as client:
            await client.send(Synthesize(text=TEXT).event())
            reference = await client.read_reply()
        sink = say.Speakers(fake)
        await say.say(TEXT, f"tcp://127.0.0.1:{server.port}", None, sink)
    assert b"".join(played) == reference.audio
    assert calls[:2] == ["open 24000 1 int16", "start"] and "stop" in calls
