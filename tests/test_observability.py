"""What a running server tells its operator: one log line per reply, and the
Prometheus metrics, fed by real requests."""

import asyncio
import contextlib
import logging
import re
import urllib.request
from typing import AsyncIterator, Dict, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from wyoming.tts import Synthesize, SynthesizeVoice

from tests.fakes import FakeBackend, fake_samples
from tests.wyoming_client import connect, free_port
from wyoming_chatterbox.metrics import Metrics
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.settings import Settings

P = "wyoming_chatterbox"


@contextlib.asynccontextmanager
async def metered_server(
    backend: FakeBackend,
) -> AsyncIterator[Tuple[int, int]]:
    port, metrics_port = free_port(), free_port()
    ready = asyncio.Event()
    stop = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(
        run_server(
            backend,
            Settings.of(
                default_voice="default",
                loudness=None,
                clean_text=False,
                uri=f"tcp://127.0.0.1:{port}",
                metrics_host="127.0.0.1",
                metrics_port=metrics_port,
            ),
            on_ready=on_ready,
            stop_signal=stop.wait,
            metrics=Metrics(),
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield port, metrics_port
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def scrape(port: int) -> Dict[str, float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    values: Dict[str, float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


async def test_metrics_follow_the_replies(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(delay=0.05)
    with caplog.at_level(logging.INFO, logger="wyoming_chatterbox"):
        async with metered_server(backend) as (port, metrics_port):
            before = await scrape(metrics_port)
            assert before[f"{P}_model_loaded{{model=model}}"] == 1
            assert before[f"{P}_active_replies{{}}"] == 0
            async with connect(port) as client:
                await client.send(Synthesize(text="One. Two sentences here.").event())
                await client.read_reply()
            async with connect(port) as client:
                await client.send(
                    Synthesize(text="Hi.", voice=SynthesizeVoice(name="zed")).event()
                )
                await client.read()
            async with connect(port) as client:  # leaves mid-reply
                backend.delay = 2.0
                backend.started.clear()
                await client.send(Synthesize(text="Never mind.").event())
                await asyncio.to_thread(backend.started.wait, 5)
            for _ in range(100):
                after = await scrape(metrics_port)
                if after.get(
                    f"{P}_requests_total{{model=model,outcome=cancelled,voice=default}}"
                ):
                    break
                await asyncio.sleep(0.05)

    assert after[f"{P}_requests_total{{model=model,outcome=done,voice=default}}"] == 1
    assert after[f"{P}_requests_total{{model=,outcome=rejected,voice=other}}"] == 1
    assert (
        after[f"{P}_requests_total{{model=model,outcome=cancelled,voice=default}}"] == 1
    )
    assert after[f"{P}_first_audio_seconds_count{{model=model}}"] == 1
    assert 0 < after[f"{P}_first_audio_seconds_sum{{model=model}}"] < 2
    assert after[f"{P}_synthesis_seconds_count{{model=model}}"] == 1
    assert after[f"{P}_sentence_groups_total{{}}"] == 3
    assert after[f"{P}_audio_seconds_total{{}}"] == pytest.approx(
        fake_samples("One. Two sentences here.") / 24000, abs=0.01
    )
    assert after[f"{P}_queue_depth{{}}"] == 0

    lines = [r.getMessage() for r in caplog.records if "Reply " in r.getMessage()]
    assert len(lines) == 2  # the rejected request has no reply line
    done = re.fullmatch(
        r"Reply done: model=model voice=default language=en chars=24 groups=2 "
        r"first_audio=\d\.\d{3}s total=\d\.\d\ds audio=0\.09s rtf=\d+\.\d\d",
        lines[0],
    )
    assert done, lines[0]
    assert lines[1].startswith(
        "Reply cancelled: model=model voice=default language=en chars=11"
    )
    assert "first_audio=- " in lines[1]


async def test_metrics_port_in_use_is_a_clear_startup_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="already in use"):
            await run_server(
                FakeBackend(),
                Settings.of(
                    default_voice="default",
                    uri=f"tcp://127.0.0.1:{free_port()}",
                    metrics_host="127.0.0.1",
                    metrics_port=port,
                ),
                metrics=Metrics(),
            )
