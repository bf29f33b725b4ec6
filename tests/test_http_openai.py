"""OpenAI's speech API against the real server (fake engine): formats,
streaming, server-sent events, errors in OpenAI's shape, voices and models."""

import asyncio
import base64
import io

import numpy as np
import pytest
import soundfile

from tests.fakes import FakeBackend, fake_bytes
from tests.http_helpers import error_of, serve_http, session, sse_events
from wyoming_chatterbox.speech import Piece
from wyoming_chatterbox.web.audio_formats import is_mp3_tag_frame, mp3_frame_length

TEXT = (
    "The first sentence is short. Here is the second one. And a third to fill "
    "the group. A fourth sentence ends it. The fifth is here. And the sixth. "
    "The seventh ends the reply."
)
SAMPLES = fake_bytes(TEXT) // 2


class ToneBackend(FakeBackend):
    """The fake's lengths, but a 440 Hz tone: lossy codecs drop the plain
    fake's constant (DC) samples."""

    def speak(self, job):  # type: ignore[no-untyped-def]
        for piece in super().speak(job):
            t = np.arange(piece.audio.size) / self.sample_rate
            yield Piece(audio=(0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))


async def speech(server, **body):  # type: ignore[no-untyped-def]
    async with session() as client:
        async with client.post(f"{server.url}/v1/audio/speech", json=body) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


@pytest.mark.parametrize(
    "fmt, content_type",
    [
        ("wav", "audio/wav"),
        ("pcm", "audio/pcm"),
        ("mp3", "audio/mpeg"),
        ("opus", "audio/ogg; codecs=opus"),
        ("flac", "audio/flac"),
    ],
)
async def test_every_response_format_decodes_to_the_reply(
    fmt: str, content_type: str
) -> None:
    async with serve_http(ToneBackend()) as server:
        status, ctype, data = await speech(
            server, model="tts-1", input=TEXT, voice="default", response_format=fmt
        )
    assert status == 200 and ctype == content_type
    if fmt == "pcm":
        assert len(data) == 2 * SAMPLES
        return
    if fmt == "flac":
        # Streamed: the header's total length is 0 ("unknown"); libsndfile
        # reads it once the length is filled in.
        assert (
            data[:4] == b"fLaC"
            and int.from_bytes(data[21:26], "big") & 0xFFFFFFFFF == 0
        )
        patched = bytearray(data)
        patched[21:26] = (int.from_bytes(data[21:26], "big") | SAMPLES).to_bytes(
            5, "big"
        )
        data = bytes(patched)
    if fmt == "wav":
        data = (
            data[:4]
            + (len(data) - 8).to_bytes(4, "little")
            + data[8:40]
            + (len(data) - 44).to_bytes(4, "little")
            + data[44:]
        )
    audio, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == 24000
    if fmt in ("wav", "flac"):  # lossless: the fake's exact samples
        assert len(audio) == SAMPLES
    else:  # codecs add their delay and padding (< 0.1 s)
        assert SAMPLES <= len(audio) <= SAMPLES + 2400
        assert np.abs(audio).max() > 0.3  # the tone, not silence


async def test_mp3_is_sent_as_it_is_made() -> None:
    backend = FakeBackend(delay=0.3)
    async with serve_http(backend) as server, session() as client:
        body = {"input": TEXT, "voice": "default", "response_format": "mp3"}
        async with client.post(f"{server.url}/v1/audio/speech", json=body) as resp:
            first = await resp.content.readany()
            made_then = len(backend.finished)
            rest = await resp.read()
    # An MPEG-2 layer III frame of audio first: not the encoder's Xing/Info
    # tag frame (all zeros until the encoder fills it in at the end).
    length = mp3_frame_length(first)
    assert first[:2] == b"\xff\xf3" and length is not None
    assert not is_mp3_tag_frame(first[:length])
    assert b"Xing" not in first[:64] and b"Info" not in first[:64]
    assert made_then < 3
    audio, _ = soundfile.read(io.BytesIO(first + rest))
    assert SAMPLES <= len(audio) <= SAMPLES + 2400


async def test_sse_stream_format_is_openais() -> None:
    backend = FakeBackend(delay=0.2)
    async with serve_http(backend) as server, session() as client:
        body = {
            "input": TEXT,
            "voice": "default",
            "response_format": "pcm",
            "stream_format": "sse",
        }
        async with client.post(f"{server.url}/v1/audio/speech", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = [data async for _, data in sse_events(resp)]
    types = [event["type"] for event in events]
    assert types[-1] == "speech.audio.done" and set(types[:-1]) == {
        "speech.audio.delta"
    }
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(pcm) == 2 * SAMPLES
    usage = events[-1]["usage"]
    assert set(usage) == {"input_tokens", "output_tokens", "total_tokens"}


@pytest.mark.parametrize(
    "body, status, code, param",
    [
        ({"input": "", "voice": "default"}, 400, "empty_input", "input"),
        ({"voice": "default"}, 400, "invalid_type", "input"),
        ({"input": "Hi.", "voice": "alloy"}, 400, "unknown_voice", "voice"),
        ({"input": "x" * 101, "voice": "default"}, 413, "text_too_long", "input"),
        (
            {"input": "Hi.", "response_format": "aac"},
            400,
            "unsupported_format",
            "response_format",
        ),
        (
            {"input": "Hi.", "response_format": "ogg"},
            400,
            "unsupported_format",
            "response_format",
        ),
        ({"input": "Hi.", "speed": 9}, 400, "invalid_value", "speed"),
        (
            {"input": "Hi.", "stream_format": "chunks"},
            400,
            "invalid_value",
            "stream_format",
        ),
    ],
)
async def test_errors_in_openais_shape(body, status, code, param) -> None:  # type: ignore[no-untyped-def]
    backend = FakeBackend()
    async with serve_http(backend, max_text_chars=100) as server:
        got, ctype, data = await speech(server, **body)
    assert got == status and ctype.startswith("application/json")
    import json

    error = error_of(json.loads(data))
    assert error["code"] == code and error["param"] == param
    assert error["type"] == "invalid_request_error"
    if code == "unknown_voice":
        assert "alloy" in error["message"] and "default" in error["message"]
    assert backend.asked == []


async def test_speed_and_instructions_are_accepted() -> None:
    async with serve_http(FakeBackend()) as server:
        status, _, data = await speech(
            server,
            input="Hello.",
            response_format="pcm",
            speed=1.5,
            instructions="Cheerful.",
        )
    assert status == 200 and len(data) == fake_bytes("Hello.")


async def test_voices_and_models() -> None:
    async with serve_http(FakeBackend()) as server, session() as client:
        async with client.get(f"{server.url}/v1/audio/voices") as resp:
            assert await resp.json() == {
                "voices": [{"id": "default", "name": "Fake voice"}]
            }
        async with client.get(f"{server.url}/v1/models") as resp:
            models = await resp.json()
    assert models["object"] == "list"
    (model,) = models["data"]
    assert model["id"] == "chatterbox-turbo" and model["object"] == "model"
    assert model["owned_by"] == "resemble-ai" and isinstance(model["created"], int)


async def test_two_clients_at_once_each_get_their_whole_reply() -> None:
    async with serve_http(FakeBackend(delay=0.05)) as server:
        results = await asyncio.gather(
            *(speech(server, input=TEXT, response_format="pcm") for _ in range(3))
        )
    assert [len(data) for _, _, data in results] == [2 * SAMPLES] * 3
