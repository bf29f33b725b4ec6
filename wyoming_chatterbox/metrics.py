"""Prometheus metrics, served over HTTP with --metrics-port (off by default).

Every Metrics object has its own CollectorRegistry, never the global default one,
so tests and embedders can make as many as they like without name clashes.

prometheus_client metrics are thread-safe: the event loop records replies, the
engine's worker thread may set the queue depth, and scrapes are answered on the
HTTP server's own threads.
"""

import asyncio
import errno
import logging
import math
import socket
import threading
from typing import Callable, Iterable, List, Optional, Set, Tuple
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .speech import FastPathState

_LOGGER = logging.getLogger(__name__)

PREFIX = "wyoming_chatterbox"
OUTCOMES = ("done", "cancelled", "failed", "rejected")

# Time from the request to its first audio chunk: a sentence group on a GPU takes
# tenths of a second, a long first group or a CPU whole seconds.
FIRST_AUDIO_BUCKETS = (
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
)
# Time from the request to its last audio chunk: a word to several paragraphs.
SYNTHESIS_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
)

# Voices are the operator's clips plus built-ins, a small set, and a label on
# requests_total only. A rejected request may name any voice at all: it gets
# "other" unless that voice has been spoken before, and the number of voice label
# values is capped all the same.
MAX_VOICE_LABELS = 50
OTHER_VOICE = "other"


class _GpuMemoryCollector(Collector):
    """Reads the GPU's allocated bytes at scrape time; absent when unknown."""

    def __init__(self) -> None:
        self.callback: Optional[Callable[[], Optional[float]]] = None

    def describe(self) -> Iterable[Metric]:
        # Without describe(), register() would call collect() (and the callback).
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        callback = self.callback
        if callback is None:
            return []
        try:
            reading = callback()
            value = None if reading is None else float(reading)
        except Exception:  # pylint: disable=broad-except
            # A scrape must not fail because the GPU could not be asked.
            _LOGGER.debug("GPU memory callback failed", exc_info=True)
            return []
        if value is None or math.isnan(value):
            return []
        family = self._family()
        family.add_metric([], value)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_allocated_bytes",
            "Bytes allocated on the GPU by the model, read at scrape time; "
            "absent without a GPU.",
        )


class _FastPathCollector(Collector):
    """The model's speed-ups after its start-up self-check, read at scrape
    time (speech.FastPathState); absent while the model is not loaded."""

    def __init__(self) -> None:
        self.callback: Optional[Callable[[], Optional[FastPathState]]] = None

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        callback = self.callback
        try:
            state = callback() if callback is not None else None
        except Exception:  # pylint: disable=broad-except
            _LOGGER.debug("Fast path callback failed", exc_info=True)
            return []
        if state is None:
            return []
        parts, capture, memory = self._families()
        for part, on in sorted(
            {**state.parts, "self_check_passed": state.self_check == "passed"}.items()
        ):
            parts.add_metric([part, state.t3_dtype], 1.0 if on else 0.0)
        found: List[Metric] = [parts]
        if state.capture_s is not None:
            capture.add_metric([], state.capture_s)
            found.append(capture)
        for kind, value in (
            ("graphs", state.graph_bytes),
            ("kv_cache", state.cache_bytes),
        ):
            if value is not None:
                memory.add_metric([kind], float(value))
        if memory.samples:
            found.append(memory)
        return found

    @staticmethod
    def _families() -> List[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                f"{PREFIX}_fast_path",
                "1 if a part of the fast path is in use after the start-up "
                "self-check (part self_check_passed: 1 if it ran and turned "
                "nothing off), else 0; t3_dtype is T3's precision.",
                labels=["part", "t3_dtype"],
            ),
            GaugeMetricFamily(
                f"{PREFIX}_cuda_graphs_capture_seconds",
                "Time taken to capture T3's CUDA graphs at load.",
            ),
            GaugeMetricFamily(
                f"{PREFIX}_fast_path_memory_bytes",
                "GPU memory the fast path took at load: CUDA graphs, KV cache rows.",
                labels=["kind"],
            ),
        ]


class _ScrapeHooks(Collector):
    """Runs callbacks at the start of every scrape; yields no metrics itself.

    Registered before the other metrics: a registry collects in registration
    order, so gauges the hooks set are read afterwards in the same scrape.
    """

    def __init__(self) -> None:
        self.hooks: List[Callable[[], None]] = []

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        for hook in list(self.hooks):
            try:
                hook()
            except Exception:  # pylint: disable=broad-except
                _LOGGER.debug("Metrics scrape hook failed", exc_info=True)
        return []


class Metrics:
    """The server's metrics, in a registry of their own."""

    # Long: one declaration per metric.
    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            # The usual process_* (memory, CPU, open files) and python_* metrics,
            # in this registry; a registry passed in is left as it is.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self._hooks = _ScrapeHooks()
        self.registry.register(self._hooks)
        self._voice_lock = threading.Lock()
        self._voices: Set[str] = set()
        self._model = ""

        self._info = Info(PREFIX, "Server version and model.", registry=self.registry)
        self._set_info()
        self._requests = Counter(
            f"{PREFIX}_requests",
            "Synthesis requests by outcome (done, cancelled, failed, rejected) "
            "and voice.",
            ["outcome", "voice"],
            registry=self.registry,
        )
        self._first_audio = Histogram(
            f"{PREFIX}_first_audio_seconds",
            "Time from a request to its first audio chunk.",
            buckets=FIRST_AUDIO_BUCKETS,
            registry=self.registry,
        )
        self._synthesis = Histogram(
            f"{PREFIX}_synthesis_seconds",
            "Time from a request to its last audio chunk, for replies spoken "
            "to the end (outcome done).",
            buckets=SYNTHESIS_BUCKETS,
            registry=self.registry,
        )
        self._characters = Counter(
            f"{PREFIX}_characters",
            "Characters of text accepted for synthesis (all outcomes but rejected).",
            registry=self.registry,
        )
        self._audio = Counter(
            f"{PREFIX}_audio_seconds",
            "Seconds of audio generated.",
            registry=self.registry,
        )
        self._groups = Counter(
            f"{PREFIX}_sentence_groups",
            "Sentence groups synthesized.",
            registry=self.registry,
        )
        self._queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Sentence groups waiting in the engine.",
            registry=self.registry,
        )
        self._active = Gauge(
            f"{PREFIX}_active_replies",
            "Replies being synthesized or waiting to be.",
            registry=self.registry,
        )
        self._model_loaded = Gauge(
            f"{PREFIX}_model_loaded",
            "1 once the model is loaded and ready, else 0.",
            registry=self.registry,
        )
        self._refused = Counter(
            f"{PREFIX}_connections_refused",
            "Connections turned away, by the cap that was reached (server-full, "
            "client-limit) with no idle connection to evict.",
            ["reason"],
            registry=self.registry,
        )
        self._evicted = Counter(
            f"{PREFIX}_connections_evicted",
            "Idle connections closed to make room for a new one, by the cap "
            "that was reached (server-full, client-limit).",
            ["reason"],
            registry=self.registry,
        )
        self._stream_timeouts = Counter(
            f"{PREFIX}_stream_timeouts",
            "Streams ended because no event came for --stream-timeout.",
            registry=self.registry,
        )
        self._connections = Gauge(
            f"{PREFIX}_connections",
            "Connections open (sockets only).",
            registry=self.registry,
        )
        self._gpu = _GpuMemoryCollector()
        self.registry.register(self._gpu)
        self._fast_path = _FastPathCollector()
        self.registry.register(self._fast_path)

    def _set_info(self) -> None:
        self._info.info({"version": __version__, "model": self._model})

    def set_model_name(self, name: str) -> None:
        """The model named in the info metric (e.g. turbo, multilingual)."""
        self._model = name
        self._set_info()

    def _voice_label(self, voice: str, may_add: bool) -> str:
        with self._voice_lock:
            if voice in self._voices:
                return voice
            if may_add and len(self._voices) < MAX_VOICE_LABELS:
                self._voices.add(voice)
                return voice
        return OTHER_VOICE

    def reply_finished(
        self,
        *,
        outcome: str,
        first_audio_s: Optional[float],
        total_s: float,
        audio_s: float,
        chars: int,
        groups: int,
        voice: str,
    ) -> None:
        """Record one reply. Raises ValueError for an unknown outcome.

        first_audio_s is None when no audio was sent; total_s counts only for
        outcome done, where it is the whole reply's synthesis time.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        # Only a voice that was spoken (not a rejected request's, which may be
        # any string a client sent) becomes a label value of its own.
        label = self._voice_label(voice, may_add=outcome != "rejected")
        self._requests.labels(outcome=outcome, voice=label).inc()
        if first_audio_s is not None:
            self._first_audio.observe(max(0.0, first_audio_s))
        if outcome == "done":
            self._synthesis.observe(max(0.0, total_s))
        if outcome != "rejected":
            self._characters.inc(max(0, chars))
        self._audio.inc(max(0.0, audio_s))
        self._groups.inc(max(0, groups))

    def set_queue_depth(self, groups: int) -> None:
        """Sentence groups waiting in the engine; safe from the worker thread."""
        self._queue_depth.set(groups)

    def set_active_replies(self, n: int) -> None:
        self._active.set(n)

    def set_model_loaded(self, loaded: bool) -> None:
        self._model_loaded.set(1 if loaded else 0)

    def connection_refused(self, reason: str) -> None:
        self._refused.labels(reason=reason).inc()

    def connection_evicted(self, reason: str) -> None:
        self._evicted.labels(reason=reason).inc()

    def stream_timed_out(self) -> None:
        self._stream_timeouts.inc()

    def set_open_connections(self, n: int) -> None:
        self._connections.set(n)

    def set_gpu_memory_callback(self, fn: Callable[[], Optional[float]]) -> None:
        """fn() is called on every scrape, from the HTTP server's thread.

        It returns the GPU's allocated bytes, or None (then the metric is absent).
        An exception in fn() also leaves the metric out of that scrape.
        """
        self._gpu.callback = fn

    def set_fast_path_callback(self, fn: Callable[[], Optional[FastPathState]]) -> None:
        """fn() is called on every scrape (the HTTP server's thread) and
        returns the model's fast path state, or None (then it is absent)."""
        self._fast_path.callback = fn

    def add_scrape_hook(self, fn: Callable[[], None]) -> None:
        """fn() runs at the start of every scrape, on the scraping thread.

        For values that are cheaper to read than to push, e.g.
        ``lambda: metrics.set_queue_depth(engine.queue_depth())``. An exception
        in fn() is logged at DEBUG and the scrape goes on.
        """
        self._hooks.hooks.append(fn)

    def render(self) -> bytes:
        """The text exposition format, as a scrape gets it."""
        return generate_latest(self.registry)


class MetricsServerError(OSError):
    """The metrics HTTP server could not start; str() says why, for the CLI.

    errno is the underlying error's (e.g. errno.EADDRINUSE), or None.
    """

    def __init__(self, message: str, error_number: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = error_number  # type: ignore[assignment]


class MetricsServer:
    """A running metrics HTTP server. close() stops it and frees the port."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self._closed = False
        address = httpd.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        """Stop serving, join the thread and close the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        # shutdown() waits for serve_forever's poll (up to half a second).
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _start(
    metrics: Metrics, host: str, port: int
) -> Tuple[WSGIServer, threading.Thread]:
    try:
        return start_http_server(port, addr=host, registry=metrics.registry)
    except socket.gaierror as err:
        raise MetricsServerError(
            f"cannot serve metrics on {host}:{port}: unknown host ({err.strerror})"
        ) from err
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            reason = "the port is already in use; choose another --metrics-port"
        elif err.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need privileges)"
        elif err.errno == errno.EADDRNOTAVAIL:
            reason = "the address is not one of this machine's"
        else:
            reason = err.strerror or str(err)
        raise MetricsServerError(
            f"cannot serve metrics on {host}:{port}: {reason}", err.errno
        ) from err


async def start_metrics_server(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serve metrics.render() at http://host:port/ (any path) on a daemon thread.

    Port 0 picks a free port (see MetricsServer.port). Raises MetricsServerError
    with a message fit for the user when the address cannot be bound.
    """
    httpd, thread = await asyncio.to_thread(_start, metrics, host, port)
    server = MetricsServer(httpd, thread)
    _LOGGER.info("Serving metrics on %s", server.url)
    return server
