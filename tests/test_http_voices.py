"""Voices over HTTP against the real server and the real voice catalogue (a
fake model): upload, list, play, delete; every bad upload is refused with
nothing written, and a new voice is in Home Assistant's next Describe."""

import io
import os
from pathlib import Path
from typing import List

import aiohttp
import numpy as np
import pytest
import soundfile
from wyoming.info import Describe, Info

from tests.fakes import FakeClipBackend, FakeMultilingualBackend, write_clip
from tests.http_helpers import error_of, serve_http, session
from tests.wyoming_client import connect
from wyoming_chatterbox.settings import ModelSettings


def clip_backend(tmp_path: Path, cls=FakeClipBackend):  # type: ignore[no-untyped-def]
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir(exist_ok=True)
    backend = cls(
        ModelSettings(data_dir=tmp_path / "data", device="cpu", voices_dir=voices_dir)
    )
    return backend, voices_dir


def clip_bytes(
    tmp_path: Path, seconds: float = 6.0, suffix: str = ".wav", peak: float = 0.5
) -> bytes:
    path = write_clip(tmp_path / f"upload{suffix}", seconds=seconds, peak=peak)
    data = path.read_bytes()
    path.unlink()
    return data


def form(name: str, data: bytes, filename: str = "clip.wav") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field("name", name)
    body.add_field("file", data, filename=filename, content_type="audio/wav")
    return body


def folder(voices_dir: Path) -> List[str]:
    """Everything in the folder, hidden files too."""
    return sorted(os.listdir(voices_dir))


async def described(port: int) -> List[str]:
    async with connect(port) as wyoming:
        await wyoming.send(Describe().event())
        event = await wyoming.read()
    assert event is not None
    return [voice.name for voice in Info.from_event(event).tts[0].voices]


async def test_upload_play_and_delete_a_voice(tmp_path: Path) -> None:
    backend, voices_dir = clip_backend(tmp_path)
    data = clip_bytes(tmp_path, seconds=6.0)
    async with serve_http(backend) as server, session() as client:
        async with client.get(f"{server.url}/api/voices") as resp:
            listed = await resp.json()
        assert listed == {
            "voices": [
                {
                    "name": "default",
                    "description": "Fake Chatterbox built-in voice",
                    "languages": ["en"],
                    "builtin": True,
                    "clip": False,
                }
            ],
            "can_upload": True,
        }
        async with client.post(
            f"{server.url}/api/voices", data=form("Alice Smith", data)
        ) as resp:
            assert resp.status == 201
            created = await resp.json()
        assert created == {
            "voice": {
                "name": "alice_smith",
                "description": "Alice Smith",
                "languages": ["en"],
                "builtin": False,
                "clip": True,
            }
        }
        assert folder(voices_dir) == ["alice_smith.wav"]
        assert (voices_dir / "alice_smith.wav").read_bytes() == data
        async with client.get(f"{server.url}/api/voices") as resp:
            names = [voice["name"] for voice in (await resp.json())["voices"]]
        assert names == ["default", "alice_smith"]
        assert await described(server.port) == ["default", "alice_smith"]
        async with client.get(f"{server.url}/api/voices/alice_smith/clip") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
            assert await resp.read() == data
        async with client.post(
            f"{server.url}/api/speak.wav",
            json={"text": "Hi there.", "voice": "alice_smith"},
        ) as resp:
            assert resp.status == 200
            await resp.read()
        assert backend.spoken[-1][1]["voice"] == "alice_smith"  # its own conditionals
        (voices_dir / "alice_smith.json").write_text('{"description": "Alice"}')
        async with client.delete(f"{server.url}/api/voices/alice_smith") as resp:
            assert resp.status == 204
        assert folder(voices_dir) == []  # the clip and its settings
        assert await described(server.port) == ["default"]
        async with client.get(f"{server.url}/api/voices/alice_smith/clip") as resp:
            assert resp.status == 404


async def test_a_clip_in_every_readable_format(tmp_path: Path) -> None:
    backend, voices_dir = clip_backend(tmp_path)
    async with serve_http(backend) as server, session() as client:
        for suffix in (".flac", ".ogg", ".mp3"):
            data = clip_bytes(tmp_path, seconds=7.0, suffix=suffix)
            async with client.post(
                f"{server.url}/api/voices",
                data=form(f"v{suffix[1:]}", data, f"x{suffix}"),
            ) as resp:
                assert resp.status == 201, await resp.text()
    assert folder(voices_dir) == ["vflac.flac", "vmp3.mp3", "vogg.ogg"]


async def test_the_file_name_names_the_voice_when_no_name_is_given(
    tmp_path: Path,
) -> None:
    backend, voices_dir = clip_backend(tmp_path)
    body = aiohttp.FormData()
    body.add_field("file", clip_bytes(tmp_path), filename="Bob Jones.wav")
    async with serve_http(backend) as server, session() as client:
        async with client.post(f"{server.url}/api/voices", data=body) as resp:
            assert resp.status == 201
            assert (await resp.json())["voice"]["name"] == "bob_jones"
    assert folder(voices_dir) == ["bob_jones.wav"]


@pytest.mark.parametrize(
    "name, make, status, code",
    [
        ("short", lambda tmp: clip_bytes(tmp, seconds=4.0), 400, "invalid_clip"),
        ("silent", lambda tmp: clip_bytes(tmp, peak=0.0), 400, "invalid_clip"),
        ("text", lambda tmp: b"this is not audio at all " * 100, 400, "invalid_clip"),
        ("aiff", lambda tmp: _aiff(tmp), 400, "invalid_clip"),
        ("../../evil", lambda tmp: clip_bytes(tmp), 400, "invalid_name"),
        ("/etc/evil", lambda tmp: clip_bytes(tmp), 400, "invalid_name"),
        ("..", lambda tmp: clip_bytes(tmp), 400, "invalid_name"),
        ("日本語", lambda tmp: clip_bytes(tmp), 400, "invalid_name"),
        ("Default", lambda tmp: clip_bytes(tmp), 409, "name_taken"),
        ("big", lambda tmp: clip_bytes(tmp, seconds=30.0), 413, "file_too_large"),
    ],
)
async def test_bad_uploads_are_refused_and_nothing_is_written(tmp_path: Path, name, make, status, code) -> None:  # type: ignore[no-untyped-def]
    backend, voices_dir = clip_backend(tmp_path)
    write_clip(voices_dir / "kept.wav")
    before = folder(voices_dir)
    parent_before = sorted(set(os.listdir(tmp_path)) | {"data"})  # data: the cache
    async with serve_http(
        backend, max_upload_bytes=1_000_000
    ) as server, session() as client:
        async with client.post(
            f"{server.url}/api/voices", data=form(name, make(tmp_path))
        ) as resp:
            assert resp.status == status
            assert error_of(await resp.json())["code"] == code
        assert folder(voices_dir) == before
        assert sorted(set(os.listdir(tmp_path)) | {"data"}) == parent_before
        assert await described(server.port) == ["default", "kept"]


def _aiff(tmp_path: Path) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(24000 * 6, np.float32) + 0.1, 24000, format="AIFF")
    return buffer.getvalue()


async def test_a_taken_name_is_refused(tmp_path: Path) -> None:
    backend, voices_dir = clip_backend(tmp_path)
    write_clip(voices_dir / "Alice.flac")
    before = {p.name: p.read_bytes() for p in voices_dir.iterdir()}
    async with serve_http(backend) as server, session() as client:
        async with client.post(
            f"{server.url}/api/voices", data=form("alice", clip_bytes(tmp_path))
        ) as resp:
            assert resp.status == 409
            assert error_of(await resp.json())["code"] == "name_taken"
    assert {p.name: p.read_bytes() for p in voices_dir.iterdir()} == before


async def test_a_body_over_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    backend, voices_dir = clip_backend(tmp_path)
    async with serve_http(
        backend, max_upload_bytes=100_000
    ) as server, session() as client:
        huge = b"\0" * 5_000_000
        async with client.post(
            f"{server.url}/api/voices", data=form("huge", huge)
        ) as resp:
            assert resp.status == 413
    assert folder(voices_dir) == []


async def test_a_streamed_body_is_cut_off_at_the_cap(tmp_path: Path) -> None:
    """No Content-Length (chunked): the cap is counted as the clip streams in."""
    backend, voices_dir = clip_backend(tmp_path)
    writer = aiohttp.MultipartWriter("form-data")
    writer.append("big").set_content_disposition("form-data", name="name")
    part = writer.append(b"\0" * 2_000_000, {"Content-Type": "audio/wav"})
    part.set_content_disposition("form-data", name="file", filename="big.wav")
    buffer = io.BytesIO()

    class Sink:
        async def write(self, data: bytes) -> None:
            buffer.write(data)

    await writer.write(Sink())  # type: ignore[arg-type]
    body = buffer.getvalue()

    async def chunks():  # type: ignore[no-untyped-def]
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    headers = {"Content-Type": f"multipart/form-data; boundary={writer.boundary}"}
    async with serve_http(
        backend, max_upload_bytes=100_000
    ) as server, session() as client:
        async with client.post(
            f"{server.url}/api/voices", data=chunks(), headers=headers
        ) as resp:
            assert resp.status == 413
            assert error_of(await resp.json())["code"] == "file_too_large"
    assert folder(voices_dir) == []


async def test_a_form_that_is_not_multipart_or_has_other_fields(tmp_path: Path) -> None:
    backend, voices_dir = clip_backend(tmp_path)
    async with serve_http(backend) as server, session() as client:
        async with client.post(f"{server.url}/api/voices", json={"name": "x"}) as resp:
            assert resp.status == 400
        body = form("x", clip_bytes(tmp_path))
        body.add_field("path", "/etc/passwd")
        async with client.post(f"{server.url}/api/voices", data=body) as resp:
            assert resp.status == 400
        body = form("x", clip_bytes(tmp_path))
        body.add_field("file", b"more", filename="second.wav")
        async with client.post(f"{server.url}/api/voices", data=body) as resp:
            assert resp.status == 400
        body = aiohttp.FormData(default_to_multipart=True)
        body.add_field("name", "nofile")
        async with client.post(f"{server.url}/api/voices", data=body) as resp:
            assert resp.status == 400
            assert error_of(await resp.json())["code"] == "no_file"
    assert folder(voices_dir) == []


async def test_deleting_what_is_not_an_uploaded_voice(tmp_path: Path) -> None:
    backend, voices_dir = clip_backend(tmp_path)
    outside = tmp_path / "outside.wav"
    write_clip(outside)
    (voices_dir / "link.wav").symlink_to(outside)  # points outside: not a voice
    async with serve_http(backend) as server, session() as client:
        async with client.delete(f"{server.url}/api/voices/default") as resp:
            assert resp.status == 400
            assert error_of(await resp.json())["code"] == "builtin_voice"
        for name in ("nobody", "..%2Foutside", "link", "%2E%2E"):
            async with client.delete(f"{server.url}/api/voices/{name}") as resp:
                assert resp.status == 404, name
        async with client.get(f"{server.url}/api/voices/default/clip") as resp:
            assert resp.status == 404
    assert outside.exists() and (voices_dir / "link.wav").is_symlink()


async def test_no_voices_folder_no_uploads(tmp_path: Path) -> None:
    backend = FakeClipBackend(ModelSettings(data_dir=tmp_path / "data", device="cpu"))
    async with serve_http(backend) as server, session() as client:
        async with client.get(f"{server.url}/api/voices") as resp:
            assert (await resp.json())["can_upload"] is False
        async with client.post(
            f"{server.url}/api/voices", data=form("x", clip_bytes(tmp_path))
        ) as resp:
            assert resp.status == 403
            assert error_of(await resp.json())["code"] == "uploads_disabled"


async def test_multilingual_voices_are_listed_per_language(tmp_path: Path) -> None:
    backend, voices_dir = clip_backend(tmp_path, FakeMultilingualBackend)
    async with serve_http(
        backend, default_voice="default@en"
    ) as server, session() as client:
        async with client.post(
            f"{server.url}/api/voices", data=form("alice", clip_bytes(tmp_path))
        ) as resp:
            voice = (await resp.json())["voice"]
        assert voice["name"] == "alice" and voice["languages"] == ["de", "en", "fr"]
        async with client.get(f"{server.url}/api/voices") as resp:
            listed = (await resp.json())["voices"]
        assert [v["name"] for v in listed if v["clip"]] == [
            "alice@en",
            "alice@de",
            "alice@fr",
        ]
        async with client.delete(f"{server.url}/api/voices/alice@de") as resp:
            assert resp.status == 204
    assert folder(voices_dir) == []
