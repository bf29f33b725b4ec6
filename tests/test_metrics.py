"""Prometheus metrics: what a reply records, gauges, scrape-time GPU memory, HTTP."""

import asyncio
import errno
import math
import socket
import threading
import urllib.request
from typing import Dict, FrozenSet, List, Optional, Tuple

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from wyoming_chatterbox import __version__
from wyoming_chatterbox.metrics import (
    FIRST_AUDIO_BUCKETS,
    MAX_VOICE_LABELS,
    SYNTHESIS_BUCKETS,
    Metrics,
    MetricsServerError,
    start_metrics_server,
)

P = "wyoming_chatterbox"
Key = Tuple[str, FrozenSet[Tuple[str, str]]]


def parse(text: str) -> Dict[Key, float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(metrics: Metrics) -> Dict[Key, float]:
    return parse(metrics.render().decode())


def value(samples: Dict[Key, float], name: str, **labels: str) -> Optional[float]:
    return samples.get((name, frozenset(labels.items())))


def family_types(metrics: Metrics) -> Dict[str, str]:
    return {
        family.name: family.type
        for family in text_string_to_metric_families(metrics.render().decode())
    }


def reply(metrics: Metrics, **overrides: object) -> None:
    fields: Dict[str, object] = dict(
        outcome="done",
        first_audio_s=0.3,
        total_s=4.0,
        audio_s=6.5,
        chars=120,
        groups=3,
        voice="default",
    )
    fields.update(overrides)
    metrics.reply_finished(**fields)  # type: ignore[arg-type]


def test_names_types_and_info() -> None:
    metrics = Metrics()
    types = family_types(metrics)
    assert types[f"{P}_requests"] == "counter"
    assert types[f"{P}_characters"] == "counter"
    assert types[f"{P}_audio_seconds"] == "counter"
    assert types[f"{P}_sentence_groups"] == "counter"
    assert types[f"{P}_first_audio_seconds"] == "histogram"
    assert types[f"{P}_synthesis_seconds"] == "histogram"
    assert types[f"{P}_queue_depth"] == "gauge"
    assert types[f"{P}_active_replies"] == "gauge"
    assert types[f"{P}_model_loaded"] == "gauge"
    # The text format has no info type: a gauge named *_info, always 1.
    assert types[f"{P}_info"] == "gauge"
    assert "process_resident_memory_bytes" in types or "python_info" in types

    samples = scrape(metrics)
    assert value(samples, f"{P}_info", version=__version__, model="") == 1.0
    metrics.set_model_name("turbo")
    samples = scrape(metrics)
    assert value(samples, f"{P}_info", version=__version__, model="turbo") == 1.0
    assert value(samples, f"{P}_info", version=__version__, model="") is None


def test_a_finished_reply_updates_histograms_and_counters() -> None:
    metrics = Metrics()
    reply(metrics, first_audio_s=0.3, total_s=4.0, audio_s=6.5, chars=120, groups=3)
    reply(metrics, first_audio_s=1.2, total_s=0.8, audio_s=1.5, chars=20, groups=1)
    samples = scrape(metrics)

    assert (
        value(samples, f"{P}_requests_total", outcome="done", voice="default", model="")
        == 2
    )
    assert value(samples, f"{P}_characters_total") == 140
    assert value(samples, f"{P}_audio_seconds_total") == 8.0
    assert value(samples, f"{P}_sentence_groups_total") == 4

    first = f"{P}_first_audio_seconds"
    assert value(samples, f"{first}_count", model="") == 2
    assert value(samples, f"{first}_sum", model="") == pytest.approx(1.5)
    assert value(samples, f"{first}_bucket", le="0.2", model="") == 0
    assert value(samples, f"{first}_bucket", le="0.3", model="") == 1  # le is inclusive
    assert value(samples, f"{first}_bucket", le="1.0", model="") == 1
    assert value(samples, f"{first}_bucket", le="1.5", model="") == 2
    assert value(samples, f"{first}_bucket", le="+Inf", model="") == 2
    assert [
        float(le)
        for (name, labels) in samples
        if name == f"{first}_bucket"
        for (key, le) in labels
        if key == "le" and le != "+Inf"
    ] == sorted(FIRST_AUDIO_BUCKETS)

    synthesis = f"{P}_synthesis_seconds"
    assert value(samples, f"{synthesis}_count", model="") == 2
    assert value(samples, f"{synthesis}_sum", model="") == pytest.approx(4.8)
    assert value(samples, f"{synthesis}_bucket", le="0.5", model="") == 0
    assert value(samples, f"{synthesis}_bucket", le="1.0", model="") == 1
    assert value(samples, f"{synthesis}_bucket", le="5.0", model="") == 2
    assert SYNTHESIS_BUCKETS[0] == 0.1 and SYNTHESIS_BUCKETS[-1] == 60.0


def test_outcomes_and_what_each_records() -> None:
    metrics = Metrics()
    reply(metrics, outcome="cancelled", first_audio_s=None, total_s=0.2, chars=50)
    reply(metrics, outcome="failed", first_audio_s=0.4, total_s=1.0, chars=30)
    reply(
        metrics,
        outcome="rejected",
        first_audio_s=None,
        total_s=0.0,
        audio_s=0.0,
        chars=9999,
        groups=0,
    )
    samples = scrape(metrics)

    for outcome in ("cancelled", "failed", "rejected"):
        assert (
            value(
                samples,
                f"{P}_requests_total",
                outcome=outcome,
                voice="default",
                model="",
            )
            == 1
        )
    assert (
        value(samples, f"{P}_requests_total", outcome="done", voice="default", model="")
        is None
    )
    # first_audio_s None is not observed; the failed reply's 0.4 is.
    assert value(samples, f"{P}_first_audio_seconds_count", model="") == 1
    assert value(samples, f"{P}_first_audio_seconds_sum", model="") == pytest.approx(
        0.4
    )
    # Synthesis time is a whole reply's: only outcome done.
    assert value(samples, f"{P}_synthesis_seconds_count", model="") is None
    # A rejected request's text was never synthesized.
    assert value(samples, f"{P}_characters_total") == 80

    with pytest.raises(ValueError, match="outcome"):
        reply(metrics, outcome="finished")


def test_voice_label_is_bounded() -> None:
    metrics = Metrics()
    # A rejected request's voice is any string a client sent: not a label of its own.
    reply(metrics, outcome="rejected", voice="no-such-voice")
    samples = scrape(metrics)
    assert (
        value(
            samples, f"{P}_requests_total", outcome="rejected", voice="other", model=""
        )
        == 1
    )

    # A rejected request for a voice spoken before keeps that voice.
    reply(metrics, voice="alice")
    reply(metrics, outcome="rejected", voice="alice")
    samples = scrape(metrics)
    assert (
        value(
            samples, f"{P}_requests_total", outcome="rejected", voice="alice", model=""
        )
        == 1
    )

    for n in range(MAX_VOICE_LABELS + 10):
        reply(metrics, voice=f"v{n}")
    samples = scrape(metrics)
    voices = {
        dict(labels)["voice"]
        for (name, labels) in samples
        if name == f"{P}_requests_total"
    }
    assert len(voices) == MAX_VOICE_LABELS + 1  # the cap and "other"
    assert "alice" in voices and "other" in voices
    assert (
        value(samples, f"{P}_requests_total", outcome="done", voice="other", model="")
        == 11
    )


def test_gauges() -> None:
    metrics = Metrics()
    samples = scrape(metrics)
    assert value(samples, f"{P}_queue_depth") == 0
    assert value(samples, f"{P}_active_replies") == 0
    assert value(samples, f"{P}_model_loaded", model="turbo") is None  # unknown yet

    metrics.set_model_loaded(True, "turbo")
    metrics.set_model_loaded(False, "multilingual")
    metrics.set_active_replies(2)
    # The engine's worker thread sets the queue depth.
    worker = threading.Thread(target=metrics.set_queue_depth, args=(5,))
    worker.start()
    worker.join()
    samples = scrape(metrics)
    assert value(samples, f"{P}_queue_depth") == 5
    assert value(samples, f"{P}_active_replies") == 2
    assert value(samples, f"{P}_model_loaded", model="turbo") == 1
    assert value(samples, f"{P}_model_loaded", model="multilingual") == 0

    metrics.set_model_loaded(False, "turbo")
    metrics.set_active_replies(0)
    metrics.set_queue_depth(0)
    samples = scrape(metrics)
    assert value(samples, f"{P}_queue_depth") == 0
    assert value(samples, f"{P}_active_replies") == 0
    assert value(samples, f"{P}_model_loaded", model="turbo") == 0


def test_replies_are_counted_per_model() -> None:
    metrics = Metrics()
    reply(metrics, model="turbo", first_audio_s=0.2)
    reply(metrics, model="multilingual", first_audio_s=1.5)
    reply(metrics, model="multilingual", outcome="cancelled", first_audio_s=None)
    reply(metrics, model="multilingual", outcome="rejected", voice="zed")
    samples = scrape(metrics)
    requests = f"{P}_requests_total"
    assert value(samples, requests, outcome="done", voice="default", model="turbo") == 1
    assert (
        value(samples, requests, outcome="done", voice="default", model="multilingual")
        == 1
    )
    assert (
        value(
            samples,
            requests,
            outcome="cancelled",
            voice="default",
            model="multilingual",
        )
        == 1
    )
    # A rejected request reached no model.
    assert value(samples, requests, outcome="rejected", voice="other", model="") == 1
    first = f"{P}_first_audio_seconds"
    assert value(samples, f"{first}_sum", model="turbo") == pytest.approx(0.2)
    assert value(samples, f"{first}_sum", model="multilingual") == pytest.approx(1.5)
    assert value(samples, f"{P}_synthesis_seconds_count", model="multilingual") == 1


def test_gpu_memory_is_read_at_scrape_time() -> None:
    metrics = Metrics()
    name = f"{P}_gpu_memory_allocated_bytes"
    assert value(scrape(metrics), name) is None  # no callback: absent

    reading: List[Optional[float]] = [1_000_000.0]
    calls = []

    def allocated() -> Optional[float]:
        calls.append(1)
        return reading[0]

    metrics.set_gpu_memory_callback(allocated)
    assert not calls  # not read until scraped
    assert value(scrape(metrics), name) == 1_000_000
    reading[0] = 3_500_000_000.0
    assert value(scrape(metrics), name) == 3_500_000_000
    assert len(calls) == 2

    reading[0] = None  # no GPU: absent, not 0
    text = metrics.render().decode()
    assert name not in text
    reading[0] = math.nan
    assert name not in metrics.render().decode()

    def broken() -> Optional[float]:
        raise RuntimeError("CUDA error")

    metrics.set_gpu_memory_callback(broken)
    text = metrics.render().decode()  # the scrape still succeeds
    assert name not in text and f"{P}_queue_depth" in text


def test_scrape_hooks_run_before_the_gauges_are_read() -> None:
    metrics = Metrics()
    depth = [4]
    metrics.add_scrape_hook(lambda: metrics.set_queue_depth(depth[0]))
    metrics.add_scrape_hook(lambda: metrics.set_model_loaded(depth[0] > 0, "turbo"))
    assert value(scrape(metrics), f"{P}_queue_depth") == 4
    depth[0] = 0
    samples = scrape(metrics)
    assert value(samples, f"{P}_queue_depth") == 0
    assert value(samples, f"{P}_model_loaded", model="turbo") == 0

    def broken() -> None:
        raise RuntimeError("engine gone")

    metrics.add_scrape_hook(broken)
    depth[0] = 2
    assert value(scrape(metrics), f"{P}_queue_depth") == 2  # the scrape goes on

    # Also with a registry passed in.
    other = Metrics(CollectorRegistry())
    other.add_scrape_hook(lambda: other.set_active_replies(3))
    assert value(scrape(other), f"{P}_active_replies") == 3


def test_two_instances_do_not_share_state() -> None:
    first, second = Metrics(), Metrics(CollectorRegistry())
    reply(first)
    first.set_queue_depth(7)
    first.set_gpu_memory_callback(lambda: 42.0)
    first.set_model_name("turbo")
    samples = scrape(second)
    assert (
        value(samples, f"{P}_requests_total", outcome="done", voice="default", model="")
        is None
    )
    assert value(samples, f"{P}_characters_total") == 0
    assert value(samples, f"{P}_queue_depth") == 0
    assert value(samples, f"{P}_gpu_memory_allocated_bytes") is None
    assert value(samples, f"{P}_info", version=__version__, model="") == 1
    # A registry passed in gets only this server's metrics.
    assert "process_" not in second.render().decode()


def test_concurrent_updates_all_count() -> None:
    metrics = Metrics()

    def work() -> None:
        for _ in range(200):
            reply(metrics, chars=1, audio_s=0.5, groups=1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = scrape(metrics)
    assert (
        value(samples, f"{P}_requests_total", outcome="done", voice="default", model="")
        == 1600
    )
    assert value(samples, f"{P}_characters_total") == 1600
    assert value(samples, f"{P}_first_audio_seconds_count", model="") == 1600


def http_get(url: str) -> Tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return (
            response.status,
            response.headers.get("Content-Type", ""),
            response.read().decode(),
        )


async def test_serves_metrics_over_http() -> None:
    metrics = Metrics()
    metrics.set_model_name("turbo")
    reply(metrics)
    server = await start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        status, content_type, body = await asyncio.to_thread(http_get, server.url)
        assert status == 200
        assert content_type.startswith("text/plain")
        samples = parse(body)
        assert value(samples, f"{P}_info", version=__version__, model="turbo") == 1
        assert (
            value(
                samples,
                f"{P}_requests_total",
                outcome="done",
                voice="default",
                model="",
            )
            == 1
        )
        # Later updates show in the next scrape.
        metrics.set_queue_depth(3)
        _, _, body = await asyncio.to_thread(http_get, server.url)
        assert value(parse(body), f"{P}_queue_depth") == 3
    finally:
        await server.close()


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsServerError) as caught:
            await start_metrics_server(Metrics(), "127.0.0.1", port)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "already in use" in message and "--metrics-port" in message
    assert caught.value.errno == errno.EADDRINUSE
    assert isinstance(caught.value, OSError)


async def test_second_server_on_same_port_fails() -> None:
    server = await start_metrics_server(Metrics(), "127.0.0.1", 0)
    try:
        with pytest.raises(MetricsServerError, match="already in use"):
            await start_metrics_server(Metrics(), "127.0.0.1", server.port)
    finally:
        await server.close()


async def test_unknown_host_is_a_clear_error() -> None:
    with pytest.raises(MetricsServerError, match="cannot serve metrics on"):
        await start_metrics_server(Metrics(), "no-such-host.invalid", 0)


async def test_close_stops_the_thread_and_frees_the_port() -> None:
    server = await start_metrics_server(Metrics(), "127.0.0.1", 0)
    port = server.port
    thread = server._thread
    assert thread.is_alive() and thread.daemon
    await asyncio.to_thread(http_get, server.url)
    await server.close()
    await server.close()  # idempotent
    assert not thread.is_alive()
    with pytest.raises(OSError):
        await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")

    # The port can be bound again: a restarted server serves on it.
    again = await start_metrics_server(Metrics(), "127.0.0.1", port)
    try:
        assert again.port == port
        status, _, _ = await asyncio.to_thread(http_get, again.url)
        assert status == 200
    finally:
        await again.close()


async def test_close_without_scrapes_frees_the_port_for_anyone() -> None:
    server = await start_metrics_server(Metrics(), "127.0.0.1", 0)
    port = server.port
    await server.close()
    # No connection was made, so nothing lingers in TIME_WAIT: a plain bind works.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
