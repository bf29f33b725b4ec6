"""The HTTP side over the real model code: the tiny random-weight Turbo
checkpoint (tests/test_model.py builds it), served end to end on the CPU."""

import io
import logging
from pathlib import Path

import pytest
import soundfile

from tests.http_helpers import serve_http, session
from tests.test_model import checkpoint  # noqa: F401  (the session fixture)
from wyoming_chatterbox.settings import ModelSettings


async def test_speak_wav_with_the_real_model(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    from wyoming_chatterbox.chatterbox.turbo import TurboBackend

    caplog.set_level(logging.INFO, logger="wyoming_chatterbox")
    backend = TurboBackend(
        ModelSettings(model_dir=checkpoint, data_dir=tmp_path / "data", device="cpu")
    )
    async with serve_http(backend, loudness=-16.0, warm_up=False) as server:
        async with session(timeout=180) as client:  # the CPU, a loaded machine
            body = {"input": "Hello there.", "response_format": "wav"}
            async with client.post(f"{server.url}/v1/audio/speech", json=body) as resp:
                assert resp.status == 200
                data = await resp.read()
    # A streamed WAV: its sizes say "unknown"; give them to read it back.
    fixed = data[:4] + (len(data) - 8).to_bytes(4, "little") + data[8:40]
    fixed += (len(data) - 44).to_bytes(4, "little") + data[44:]
    audio, rate = soundfile.read(io.BytesIO(fixed), dtype="float32")
    assert rate == 24000 and audio.ndim == 1
    assert 0.1 < len(audio) / rate < 60 and abs(audio).max() > 0
    assert "Reply done" in caplog.text
