"""Speech over HTTP against the real server (fake engine): the page's
/api/speak (server-sent events) and /api/speak.wav, /api/stop, the model's
load and unload, /health and /api/status."""

import asyncio
import base64
import contextlib
import json
import logging
import socket
import struct
import threading
from typing import Any, Iterator

import aiohttp
import numpy as np
import pytest
from wyoming.tts import Synthesize

from tests.fakes import FakeBackend, fake_bytes
from tests.http_helpers import error_of, http_settings, serve_http, session, sse_events
from tests.wyoming_client import connect, free_port
from wyoming_chatterbox import __version__
from wyoming_chatterbox.sentences import split_groups
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.speech import Piece, SpeechJob

# Seven sentences: three groups (the first is one sentence, then threes).
TEXT = (
    "The first sentence is short. Here is the second one. And a third to fill "
    "the group. A fourth sentence ends it. The fifth is here. And the sixth. "
    "The seventh ends the reply."
)


def groups_of(text: str) -> int:
    return len(split_groups(text))


async def test_speak_streams_pieces_as_they_are_made() -> None:
    backend = FakeBackend(delay=0.3)
    assert groups_of(TEXT) == 3
    async with serve_http(backend) as server, session() as client:
        async with client.post(f"{server.url}/api/speak", json={"text": TEXT}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = []
            finished_at_first_audio = None
            async for name, data in sse_events(resp):
                if name == "audio" and finished_at_first_audio is None:
                    finished_at_first_audio = len(backend.finished)
                events.append((name, data))
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done"
    assert set(names[1:-1]) == {"audio"}
    assert events[0][1] == {"sample_rate": 24000, "channels": 1, "format": "s16le"}
    # The first piece came while later groups were still being made.
    assert finished_at_first_audio is not None and finished_at_first_audio < 3
    audio = [data for name, data in events if name == "audio"]
    assert [piece["index"] for piece in audio] == list(range(len(audio)))
    pcm = b"".join(base64.b64decode(piece["pcm"]) for piece in audio)
    assert len(pcm) == fake_bytes(TEXT)
    assert all(
        piece["samples"] * 2 == len(base64.b64decode(piece["pcm"])) for piece in audio
    )
    assert all(piece["groups"] == 3 for piece in audio)
    done_counts = [piece["groups_done"] for piece in audio]
    # Counted as groups are made: by the last piece, the first two are done.
    assert done_counts == sorted(done_counts) and 2 <= done_counts[-1] <= 3
    done = events[-1][1]
    assert done["outcome"] == "done" and done["groups"] == 3
    assert done["chars"] == len(TEXT)
    assert done["audio_s"] == pytest.approx(len(pcm) / 2 / 24000, abs=1e-3)
    assert 0 < done["first_audio_s"] <= done["total_s"]


async def test_speak_wav_is_one_streamed_wav() -> None:
    backend = FakeBackend(delay=0.3)
    async with serve_http(backend) as server, session() as client:
        async with client.post(
            f"{server.url}/api/speak.wav", json={"text": TEXT}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "audio/wav"
            header = await resp.content.readexactly(44)
            first = await resp.content.readexactly(2)
            groups_made_then = len(backend.finished)
            rest = await resp.read()
    assert header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", header[4:8])[0] == 0xFFFFFFFF  # length unknown
    assert header[36:40] == b"data" and header[40:44] == b"\xff\xff\xff\xff"
    channels, rate, _, _, bits = struct.unpack("<HIIHH", header[22:36])
    assert (channels, rate, bits) == (1, 24000, 16)
    assert groups_made_then < 3  # audio before the reply was complete
    assert len(first + rest) == fake_bytes(TEXT)


async def test_closing_the_request_cancels_the_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_chatterbox")
    backend = FakeBackend(delay=0.4)
    long_text = " ".join(f"Sentence number {i} is here." for i in range(30))
    async with serve_http(backend) as server:
        async with session() as client:
            async with client.post(
                f"{server.url}/api/speak", json={"text": long_text}
            ) as resp:
                async for name, _ in sse_events(resp):
                    if name == "audio":
                        break  # the page's Stop: the request is closed
        for _ in range(200):
            if "Reply cancelled" in caplog.text:
                break
            await asyncio.sleep(0.02)
        asked = len(backend.asked)
        await asyncio.sleep(1.0)
        assert len(backend.asked) == asked  # nothing more was begun
    assert "Reply cancelled" in caplog.text
    assert asked < groups_of(long_text)
    assert backend.cancelled or len(backend.finished) < asked + 1


async def test_leaving_before_the_first_audio_stops_the_group_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No audio has been written yet, so only the closed socket tells: the
    group being made stops at once (within the fake's 2 ms check)."""
    caplog.set_level(logging.INFO, logger="wyoming_chatterbox")
    backend = FakeBackend(delay=3.0)
    async with serve_http(backend) as server:
        async with session() as client:
            request = asyncio.ensure_future(
                client.post(f"{server.url}/api/speak.wav", json={"text": TEXT})
            )
            await asyncio.to_thread(backend.started.wait, 10)
            request.cancel()  # the client goes away mid-request
            with contextlib.suppress(asyncio.CancelledError):
                await request
        for _ in range(100):
            if backend.cancelled:
                break
            await asyncio.sleep(0.02)
        assert backend.cancelled == [split_groups(TEXT)[0]]
        assert backend.finished == []
    assert "Reply cancelled" in caplog.text


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"text": ""}, 400, "empty_input"),
        ({"text": "   \n"}, 400, "empty_input"),
        ({}, 400, "invalid_type"),
        ({"text": 5}, 400, "invalid_type"),
        ({"text": "Hi.", "voice": "nobody"}, 400, "unknown_voice"),
        ({"text": "Hi.", "temperature": 99}, 400, "invalid_value"),
        ({"text": "Hi.", "top_k": "many"}, 400, "invalid_value"),
        ({"text": "x" * 101}, 413, "text_too_long"),
    ],
)
async def test_bad_speech_requests_get_json_errors(body, status, code) -> None:  # type: ignore[no-untyped-def]
    backend = FakeBackend()
    async with serve_http(backend, max_text_chars=100) as server, session() as client:
        for path in ("/api/speak", "/api/speak.wav"):
            async with client.post(f"{server.url}{path}", json=body) as resp:
                assert resp.status == status
                error = error_of(await resp.json())
                assert error["code"] == code
    assert backend.asked == []


async def test_unknown_voice_error_names_the_voices() -> None:
    async with serve_http(FakeBackend()) as server, session() as client:
        async with client.post(
            f"{server.url}/api/speak", json={"text": "Hi.", "voice": "nobody"}
        ) as resp:
            message = error_of(await resp.json())["message"]
    assert "nobody" in message and "default" in message


async def test_body_that_is_not_json_or_too_large() -> None:
    async with serve_http(
        FakeBackend(), max_text_chars=100
    ) as server, session() as client:
        async with client.post(f"{server.url}/api/speak", data=b"{not json") as resp:
            assert resp.status == 400
            assert error_of(await resp.json())["code"] == "invalid_json"
        async with client.post(f"{server.url}/api/speak", data=b"[1, 2]") as resp:
            assert resp.status == 400
        huge = b'{"text": "' + b"a" * 2_000_000 + b'"}'
        async with client.post(f"{server.url}/api/speak", data=huge) as resp:
            assert resp.status == 413
            assert error_of(await resp.json())["code"] == "body_too_large"
        async with client.get(f"{server.url}/api/nothing") as resp:
            assert resp.status == 404
            error_of(await resp.json())
        async with client.get(f"{server.url}/api/speak") as resp:
            assert resp.status == 405
            error_of(await resp.json())


async def test_no_clips_with_built_in_voices_only() -> None:
    async with serve_http(FakeBackend()) as server, session() as client:
        async with client.get(f"{server.url}/api/voices") as resp:
            listed = await resp.json()
        assert listed["voices"][0]["builtin"] is True and not listed["can_upload"]
        async with client.get(f"{server.url}/api/voices/default/clip") as resp:
            assert error_of(await resp.json())["code"] == "no_clip"
        async with client.get(f"{server.url}/api/voices/nobody/clip") as resp:
            assert resp.status == 404
            assert error_of(await resp.json())["code"] == "voice_not_found"


async def test_sampling_settings_reach_the_engine() -> None:
    class Recording(FakeBackend):
        def speak(self, job):  # type: ignore[no-untyped-def]
            self.params = job.params
            return super().speak(job)

    backend = Recording()
    async with serve_http(backend) as server, session() as client:
        body = {"text": "Hello there.", "temperature": 0.5, "top_k": 50}
        async with client.post(f"{server.url}/api/speak.wav", json=body) as resp:
            assert resp.status == 200
            await resp.read()
    assert backend.params.temperature == 0.5 and backend.params.top_k == 50


async def test_stop_cancels_every_reply_of_every_front_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_chatterbox")
    backend = FakeBackend(delay=0.5)
    long_text = " ".join(f"Sentence number {i} is here." for i in range(30))
    async with serve_http(backend) as server, session() as client, connect(
        server.port
    ) as wyoming:
        await wyoming.send(Synthesize(text=long_text).event())
        async with client.post(
            f"{server.url}/api/speak.wav", json={"text": long_text}
        ) as resp:
            await resp.content.readexactly(44)
            async with client.post(f"{server.url}/api/stop") as stop:
                assert stop.status == 200
                assert await stop.json() == {"cancelled": 2}
            rest = await resp.read()  # the WAV ends where the reply stopped
        reply = await wyoming.read_reply()  # and the Wyoming reply ends too
        assert reply.compact_types()[-1] == "audio-stop"
    assert len(rest) < fake_bytes(long_text)
    assert caplog.text.count("Reply cancelled") == 2


async def test_requests_over_the_connection_cap_are_turned_away() -> None:
    backend = FakeBackend(delay=0.5)
    async with serve_http(backend, max_connections=1) as server, session() as client:
        async with client.post(
            f"{server.url}/api/speak.wav", json={"text": TEXT}
        ) as busy:
            await busy.content.readexactly(44)
            async with client.get(f"{server.url}/api/status") as resp:
                assert resp.status == 503
                assert error_of(await resp.json())["code"] == "too_many_requests"
            await busy.read()
        async with client.get(f"{server.url}/api/status") as resp:
            assert resp.status == 200  # free again


async def test_health_and_status() -> None:
    backend = FakeBackend()
    async with serve_http(backend) as server, session() as client:
        async with client.get(f"{server.url}/health") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok", "model_loaded": True}
        async with client.get(f"{server.url}/api/status") as resp:
            status = await resp.json()
    assert status["version"] == __version__
    assert status["device"] == "cpu"
    assert status["models"] == [
        {"name": "Chatterbox Turbo", "id": "chatterbox-turbo", "loaded": True}
    ]
    assert status["gpu_memory_bytes"] is None
    assert status["replies_in_progress"] == 0 and status["queue_depth"] == 0
    assert status["voices_dir_writable"] is False
    assert status["token_required"] is False


async def test_unload_and_load_the_model() -> None:
    backend = FakeBackend(delay=0.5)
    async with serve_http(backend) as server, session() as client:
        async with client.post(f"{server.url}/api/model/unload") as resp:
            assert resp.status == 200 and await resp.json() == {"loaded": False}
        assert backend.closes == 1 and not backend.loaded
        async with client.get(f"{server.url}/health") as resp:
            # Unloaded, but the next request loads it again: healthy.
            assert resp.status == 200
            assert await resp.json() == {"status": "ok", "model_loaded": False}
        async with client.post(f"{server.url}/api/model/load") as resp:
            assert resp.status == 200 and await resp.json() == {"loaded": True}
        assert backend.loads == 2 and backend.loaded
        # While a reply runs, unloading is refused and the reply goes on.
        async with client.post(
            f"{server.url}/api/speak.wav", json={"text": TEXT}
        ) as speaking:
            await speaking.content.readexactly(44)
            async with client.post(f"{server.url}/api/model/unload") as resp:
                assert resp.status == 409
                assert error_of(await resp.json())["code"] == "replies_in_progress"
            async with client.get(f"{server.url}/api/status") as resp:
                assert (await resp.json())["replies_in_progress"] == 1
            rest = await speaking.read()
        assert len(rest) == fake_bytes(TEXT)
        assert backend.loaded and backend.closes == 1


async def test_a_reply_after_an_unload_loads_the_model_again() -> None:
    backend = FakeBackend()
    async with serve_http(backend) as server, session() as client:
        async with client.post(f"{server.url}/api/model/unload") as resp:
            assert resp.status == 200
        async with client.post(
            f"{server.url}/api/speak.wav", json={"text": "Hello."}
        ) as resp:
            assert len(await resp.read()) == 44 + fake_bytes("Hello.")
    assert backend.loads == 2


async def test_the_http_side_answers_while_the_model_loads() -> None:
    """It listens before the (slow) first load: /health says 503 until the
    model is there, and a reply asked for meanwhile waits for it."""
    gate = threading.Event()

    class SlowLoad(FakeBackend):
        def load(self) -> None:
            gate.wait(10)
            super().load()

    backend = SlowLoad()
    port, http_port = free_port(), free_port()
    settings = http_settings(uri=f"tcp://127.0.0.1:{port}", http_port=http_port)
    task = asyncio.create_task(run_server(backend, settings))
    url = f"http://127.0.0.1:{http_port}"
    try:
        async with session() as client:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with client.get(f"{url}/health") as resp:
                        assert resp.status == 503
                        assert error_of(await resp.json())["code"] == "engine_stopped"
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the HTTP side did not listen during the load")

            async def speak() -> bytes:
                body = {"text": "Hello."}
                async with client.post(f"{url}/api/speak.wav", json=body) as resp:
                    return await resp.read()

            speaking = asyncio.ensure_future(speak())
            await asyncio.sleep(0.2)
            assert not speaking.done() and backend.asked == []
            gate.set()
            assert len(await speaking) == 44 + fake_bytes("Hello.")
            async with client.get(f"{url}/health") as resp:
                assert resp.status == 200
    finally:
        gate.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _raw_request(port: int, head: bytes, rcvbuf: int = 0) -> Any:
    """(reader, writer) of a plain socket that sent `head`; a small `rcvbuf`
    makes a client that stops reading fill up at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(head)
    await writer.drain()
    return reader, writer


async def test_a_body_that_stalls_gets_408() -> None:
    backend = FakeBackend()
    async with serve_http(backend, idle_timeout=0.5) as server:
        reader, writer = await _raw_request(
            server.http_port,
            b"POST /api/speak HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"text": "Hel',
        )
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert b'"code": "timeout"' in answer or b'"code":"timeout"' in answer
    assert backend.asked == []


class LoudBackend(FakeBackend):
    """Twenty seconds of audio per group, at once: a reply is far more than
    socket buffers hold (Linux's grow to 4 MiB), so a client that reads
    nothing stalls the server's writes."""

    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        for piece in super().speak(job):
            yield Piece(audio=np.full(480_000, 0.1, np.float32), tokens=piece.tokens)


@pytest.mark.parametrize("path", ["/api/speak", "/api/speak.wav", "/v1/audio/speech"])
async def test_a_client_that_reads_nothing_is_dropped_and_its_reply_cancelled(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_chatterbox")
    text = " ".join(f"Sentence number {i} is here." for i in range(30))
    body = json.dumps({"text": text, "input": text, "response_format": "pcm"})
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        f"{body}"
    ).encode()
    async with serve_http(LoudBackend(), idle_timeout=0.5) as server:
        reader, writer = await _raw_request(server.http_port, head, rcvbuf=4096)
        try:
            for _ in range(250):  # reads nothing meanwhile
                if "Reply cancelled" in caplog.text:
                    break
                await asyncio.sleep(0.02)
            assert "Reply cancelled" in caplog.text
            # The server cut the connection: what it had sent, then no end of
            # the chunked body, so the client cannot take it for a whole reply.
            sent = b""
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                    sent += chunk
            assert sent.startswith(b"HTTP/1.1 200")
            assert not sent.endswith(b"\r\n0\r\n\r\n")
            assert len(sent) < len(split_groups(text)) * 960_000
        finally:
            writer.close()
        async with session() as client:  # and it serves others
            async with client.get(f"{server.url}/api/status") as resp:
                assert (await resp.json())["replies_in_progress"] == 0
