"""The running server: load the model, listen, announce, stop well.

Owns the listeners (tcp://, unix://, stdio://), acting on the admission policy
(admission.py: caps, evictions), the start-up order (metrics port, model load,
listen, zeroconf), shutdown on SIGTERM/SIGINT and the metrics wiring. It knows
nothing of a reply's content (reply.py) or of the models (chatterbox/, made
through chatterbox.make_backends).
"""

import asyncio
import contextlib
import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Awaitable,
    Callable,
    List,
    Mapping,
    Optional,
    Set,
    Union,
)
from urllib.parse import urlparse

from wyoming.error import Error
from wyoming.event import async_get_stdin, async_write_event
from wyoming.server import AsyncServer, HandlerFactory

from .admission import Admission, client_key
from .discovery import ZeroconfAdvertiser, advertised_address, default_service_name
from .engine import EngineWorker
from .handler import ChatterboxEventHandler, Connections
from .metrics import Metrics, MetricsServer, MetricsServerError, start_metrics_server
from .reply import Replies, ReplyRecord
from .settings import ServerSettings, Settings
from .speech import EngineDied, ModelLoadError, SpeechBackend, UnknownVoice
from .web import HttpStartError

if TYPE_CHECKING:
    from .web.app import HttpServer

_LOGGER = logging.getLogger(__name__)


class StdioServer(AsyncServer):
    """stdio:// that keeps the protocol on the original stdout.

    Libraries print(); here anything written to file descriptor 1 afterwards goes
    to stderr instead of into the event stream. At end of input the handler's
    disconnect() runs, as for a socket, so pending work is abandoned.
    """

    async def run(self, handler_factory: HandlerFactory) -> None:
        loop = asyncio.get_running_loop()
        reader = await async_get_stdin()
        protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, protocol_out
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        loop.add_signal_handler(signal.SIGTERM, reader.feed_eof)
        try:
            await handler_factory(reader, writer).run()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)


class Listener:
    """Accepts tcp:// or unix:// connections, each served by a handler task.

    Unlike wyoming's AsyncServer (whose SIGTERM handling closes every connection
    at once, mid-reply), stopping is in steps: stop accepting, let the handlers
    end their replies, then close. A new connection is let in, let in after
    another is evicted, or turned away, as `admission` decides.
    """

    def __init__(
        self,
        uri: str,
        admission: Optional[Admission] = None,
        connections: Optional[Connections] = None,
    ) -> None:
        parsed = urlparse(uri)
        self.uri = uri
        self.admission = admission or Admission(None, None)
        self.connections = connections or Connections()
        self._unix_path: Optional[Path] = None
        if parsed.scheme == "tcp":
            if parsed.hostname is None or parsed.port is None:
                raise ValueError("a tcp:// URI needs a host and a port")
            self.host: Optional[str] = parsed.hostname
            self.port: Optional[int] = parsed.port
        elif parsed.scheme == "unix":
            self.host, self.port = None, None
            self._unix_path = Path(parsed.path)
        else:
            raise ValueError("use tcp://HOST:PORT, unix://PATH or stdio://")
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: "Set[asyncio.Task[None]]" = set()

    async def start(self, handler_factory: HandlerFactory) -> None:
        async def on_connect(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            client = client_key(writer.get_extra_info("peername"))
            decision = self.admission.decide(client, self.connections.open())
            if decision.refused:
                await _turn_away(writer, decision.text)
                return
            if decision.evict is not None:
                decision.evict.evict(decision.text)
            handler = handler_factory(reader, writer)
            task = asyncio.create_task(handler.run(), name="wyoming connection")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if self._unix_path is not None:
            self._unix_path.unlink(missing_ok=True)
            self._server = await asyncio.start_unix_server(
                on_connect, path=str(self._unix_path)
            )
        else:
            self._server = await asyncio.start_server(
                on_connect, host=self.host, port=self.port
            )

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._unix_path is not None:
            self._unix_path.unlink(missing_ok=True)

    async def close(self) -> None:
        """Stop accepting and end every connection's task."""
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)


async def _turn_away(writer: asyncio.StreamWriter, text: str) -> None:
    """One connection too many: say so, and close it (the admission policy
    has logged it)."""
    error = Error(text=text, code="too-many-connections")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(async_write_event(error.event(), writer), 1.0)
    writer.close()


def check_uri(uri: str) -> None:
    """Raise ValueError for a URI the server cannot listen on."""
    if not uri.startswith("stdio://"):
        Listener(uri)


def make_advertiser(settings: ServerSettings) -> Optional[ZeroconfAdvertiser]:
    """The zeroconf announcement the settings ask for; ValueError if impossible."""
    if settings.zeroconf is None and settings.zeroconf_host is None:
        return None
    uri = urlparse(settings.uri)
    if uri.scheme != "tcp" or uri.port is None:
        raise ValueError(f"--zeroconf needs a tcp:// --uri, not {settings.uri}")
    address = advertised_address(uri.hostname or "", settings.zeroconf_host)
    return ZeroconfAdvertiser(
        settings.zeroconf or default_service_name(), uri.port, address
    )


async def _wait_for_stop_signal() -> None:
    """Until SIGTERM or SIGINT (Docker's stop, Ctrl+C)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def run_server(
    backend: Union[SpeechBackend, Mapping[str, SpeechBackend]],
    settings: Settings,
    on_ready: Optional[Callable[[], Awaitable[None]]] = None,
    stop_signal: Optional[Callable[[], Awaitable[None]]] = None,
    metrics: Optional[Metrics] = None,
    advertiser: Optional[ZeroconfAdvertiser] = None,
) -> None:
    """Load the model (or the models, by key), then serve until SIGTERM/SIGINT
    (or until `stop_signal` returns). Raises ModelLoadError,
    MetricsServerError, HttpStartError, EngineDied.

    A stop ends well: no new connections, replies in progress get
    `shutdown_grace` seconds to finish and are then cut short with an
    audio-stop, connections close, the model is released.
    """
    server = settings.server
    check_uri(server.uri)  # a bad URI fails before the slow model load
    engine = EngineWorker(backend, settings.engine)
    replies = Replies(engine, settings.reply)
    connections = Connections()
    admission = Admission(server.max_connections, server.max_connections_per_client)
    factory = partial(
        ChatterboxEventHandler,
        replies=replies,
        settings=server,
        connections=connections,
    )
    listener: Optional[Listener] = None
    metrics_server: Optional[MetricsServer] = None
    http: "Optional[HttpServer]" = None
    advertising: "Optional[asyncio.Task[None]]" = None
    try:
        # Before the slow load: a taken port fails at once, and a scrape shows
        # the model loading.
        metrics_server = await _serve_metrics(
            metrics, replies, server, connections, admission
        )
        # Also before the load: a taken port or a bad certificate fails at
        # once, and /health says 503 while the model loads.
        http = await _serve_http(replies, settings)
        await engine.start()
        voices = _check_default_voice(engine, settings.reply.default_voice)

        if server.uri.startswith("stdio://"):
            _LOGGER.info("Ready on %s with voices: %s", server.uri, ", ".join(voices))
            if on_ready is not None:
                await on_ready()
            await StdioServer().run(factory)
            return

        listener = Listener(server.uri, admission, connections)
        await listener.start(factory)
        _LOGGER.info("Ready on %s with voices: %s", server.uri, ", ".join(voices))
        if advertiser is not None:
            # Only now: Home Assistant connects as soon as it sees the service.
            advertising = asyncio.create_task(_advertise(advertiser))
        if on_ready is not None:
            await on_ready()
        died = await _until_stopped(engine, stop_signal)
        await _withdraw(advertising, advertiser)
        listener.stop_accepting()
        if died is not None:
            await connections.drain(1.0)  # their replies have failed already
            raise EngineDied(f"the speech engine stopped: {died}")
        await connections.drain(server.shutdown_grace)
    finally:
        await _withdraw(advertising, advertiser)
        if http is not None:
            await http.stop()
        if listener is not None:
            await listener.close()
        await engine.stop()
        if metrics_server is not None:
            await metrics_server.close()
        _LOGGER.info("Stopped")


async def _serve_metrics(
    metrics: Optional[Metrics],
    replies: Replies,
    server: ServerSettings,
    connections: Connections,
    admission: Admission,
) -> Optional[MetricsServer]:
    """Feed `metrics` (made if --metrics-port asks for them) and serve them."""
    if metrics is None and server.metrics_port is not None:
        metrics = Metrics()
    if metrics is None:
        return None
    _watch(metrics, replies)
    _watch_connections(metrics, connections, admission)
    if server.metrics_port is None:
        return None
    metrics_server = await start_metrics_server(
        metrics, server.metrics_host, server.metrics_port
    )
    _LOGGER.info("Prometheus metrics on %s", metrics_server.url)
    return metrics_server


async def _serve_http(replies: Replies, settings: Settings) -> "Optional[HttpServer]":
    """The web page and HTTP API, if --http-port asks for them."""
    if settings.http.http_port is None:
        return None
    from .web.app import HttpServer  # pylint: disable=import-outside-toplevel

    http = HttpServer(replies, settings)
    await http.start()
    return http


def _check_default_voice(engine: EngineWorker, default_voice: str) -> List[str]:
    """The voices' names; ModelLoadError if --voice names none of them."""
    voices = [voice.name for voice in engine.voices()]
    try:
        engine.resolve_voice(default_voice, None)
    except UnknownVoice as err:
        raise ModelLoadError(
            f"--voice {default_voice} is not a voice of this server; "
            f"choose one of: {', '.join(voices)}."
        ) from err
    return voices


async def _until_stopped(
    engine: EngineWorker, stop_signal: Optional[Callable[[], Awaitable[None]]]
) -> Optional[BaseException]:
    """Wait for a stop signal; the worker's error if it died first."""
    stopping = asyncio.ensure_future((stop_signal or _wait_for_stop_signal)())
    dying = asyncio.ensure_future(engine.died())
    await asyncio.wait([stopping, dying], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    dying.cancel()
    if dying.done() and not dying.cancelled():
        return dying.result()
    _LOGGER.info("Stopping: letting replies in progress end")
    return None


async def _advertise(advertiser: ZeroconfAdvertiser) -> None:
    try:
        await advertiser.start()
    except OSError as err:
        _LOGGER.error(
            "Zeroconf discovery is off (%s); add the server in Home Assistant by "
            "host and port",
            err,
        )


async def _withdraw(
    advertising: "Optional[asyncio.Task[None]]",
    advertiser: Optional[ZeroconfAdvertiser],
) -> None:
    if advertising is not None:
        advertising.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await advertising
    if advertiser is not None:
        await advertiser.stop()


def _watch(metrics: Metrics, replies: Replies) -> None:
    """Feed the metrics: replies as they end, the rest read at scrape time."""
    engine = replies.engine
    metrics.set_model_name(engine.model_name)

    def on_reply(record: ReplyRecord) -> None:
        metrics.reply_finished(
            outcome=record.outcome,
            first_audio_s=record.first_audio,
            total_s=record.total,
            audio_s=record.audio,
            chars=record.chars,
            groups=record.groups,
            voice=record.voice,
            model=record.model,
        )

    def on_scrape() -> None:
        metrics.set_queue_depth(engine.queue_depth())
        for model, loaded in engine.loaded().items():
            metrics.set_model_loaded(loaded, model)
        metrics.set_active_replies(replies.active())

    replies.observers.append(on_reply)
    metrics.add_scrape_hook(on_scrape)
    # The models share one device: any of them reads its memory in use.
    for backend in engine.models.values():
        gpu_memory = getattr(backend, "gpu_memory", None)
        if gpu_memory is not None:
            metrics.set_gpu_memory_callback(gpu_memory)
            break
    # The fast path's state: the English model's (Turbo or Nano; Multilingual
    # has none), while it is loaded.
    backends = list(engine.models.values())
    metrics.set_fast_path_callback(
        lambda: next(
            (s for s in (b.fast_path() for b in backends) if s is not None), None
        )
    )


def _watch_connections(
    metrics: Metrics, connections: Connections, admission: Admission
) -> None:
    """Count refusals, evictions and stream timeouts; open connections at
    scrape time."""

    def on_admission(what: str, reason: str) -> None:
        if what == "evicted":
            metrics.connection_evicted(reason)
        else:
            metrics.connection_refused(reason)

    def on_connection(what: str) -> None:
        if what == "stream-timeout":
            metrics.stream_timed_out()

    admission.observers.append(on_admission)
    connections.observers.append(on_connection)
    metrics.add_scrape_hook(
        lambda: metrics.set_open_connections(len(connections.open()))
    )


def run(settings: Settings) -> int:
    """Serve with the settings until stopped; the process's exit code. Every
    failure a user can fix is one logged sentence and exit code 1."""
    # pylint: disable=import-outside-toplevel
    from .chatterbox import make_backends

    try:
        advertiser = make_advertiser(settings.server)  # fails at once, not later
        backends = make_backends(settings.model)
    except ValueError as err:
        _LOGGER.error("%s", err)
        return 1
    try:
        asyncio.run(run_server(backends, settings, advertiser=advertiser))
    except ModelLoadError as err:
        _LOGGER.error("%s", err)
        return 1
    except MetricsServerError as err:
        _LOGGER.error("--metrics-port %s: %s", settings.server.metrics_port, err)
        return 1
    except HttpStartError as err:
        _LOGGER.error("%s", err)
        return 1
    except EngineDied as err:
        _LOGGER.error("Exiting: %s (a supervisor such as Docker restarts it)", err)
        return 1
    except ValueError as err:  # a malformed --uri
        _LOGGER.error("--uri %s: %s", settings.server.uri, err)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
