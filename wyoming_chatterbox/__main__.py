"""Command line: settings -> backend -> engine -> Wyoming server.

The model is loaded before the server listens. A model that cannot be loaded ends
the process with exit code 1 and one sentence saying what to do.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Awaitable, Callable, Optional, Set, Tuple
from urllib.parse import urlparse

from wyoming.error import Error
from wyoming.event import async_get_stdin, async_write_event
from wyoming.server import AsyncServer, HandlerFactory

from . import __version__, fastpath
from .discovery import ZeroconfAdvertiser, advertised_address, default_service_name
from .engine import (
    EngineDied,
    EngineWorker,
    ModelLoadError,
    SamplingParams,
    SpeechBackend,
    UnknownVoice,
)
from .handler import ChatterboxEventHandler, Connections, ReplyRecord, ServerSettings
from .limits import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_TEXT_CHARS
from .metrics import Metrics, MetricsServer, MetricsServerError, start_metrics_server

# Not __name__: under `python -m` that is "__main__", outside our logger tree.
_LOGGER = logging.getLogger("wyoming_chatterbox.main")

DEFAULT_URI = "tcp://0.0.0.0:10200"
# Home Assistant opens one connection per request; satellites add a few each.
DEFAULT_MAX_CONNECTIONS = 64
MODELS = ("turbo", "multilingual")
DEFAULT_DATA_DIR = Path.home() / ".cache" / "wyoming-chatterbox"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def _float_in(
    low: float, high: float, low_open: bool = False
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if value > high or value < low or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"must be in {bracket}{low}, {high}], not {text}"
            )
        return value

    return parse


def _loudness(text: str) -> Optional[float]:
    if text.lower() in ("off", "none", "0"):
        return None
    value = float(text)
    if not -40.0 <= value <= -5.0:
        raise argparse.ArgumentTypeError(
            f"must be a loudness from -40 to -5 LUFS, or off; not {text}"
        )
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 5.0:
        raise argparse.ArgumentTypeError(f"must be 0 to 5 seconds, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = SamplingParams()
    parser = argparse.ArgumentParser(
        prog="wyoming_chatterbox",
        description="Wyoming text-to-speech server for Chatterbox Turbo",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="turbo",
        help="turbo: Chatterbox Turbo, English, fastest (default); multilingual: "
        "Chatterbox Multilingual, 23 languages",
    )
    parser.add_argument(
        "--uri",
        default=DEFAULT_URI,
        help=f"tcp://HOST:PORT, unix://PATH or stdio:// (default: {DEFAULT_URI})",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="folder with the model files; without it, the model is downloaded "
        "from Hugging Face on first run into --data-dir",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="downloaded models and prepared voices are kept here "
        f"(default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--voices-dir",
        type=Path,
        help="folder of reference clips (wav, flac, mp3, ogg; more than 5 s): each "
        "is a voice named after its file; rescanned on every Describe",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present, else CPU), cuda, cuda:N or cpu (default: auto)",
    )
    parser.add_argument(
        "--voice",
        default="default",
        help="voice used when a request names none (default: default, the model's "
        "built-in voice; with multilingual e.g. default@de for German)",
    )
    parser.add_argument(
        "--loudness",
        type=_loudness,
        default=-16.0,
        metavar="LUFS",
        help="bring every reply to this loudness, or 'off' (default: -16)",
    )
    parser.add_argument(
        "--sentence-silence",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="pause between sentence groups (default: 0)",
    )
    parser.add_argument(
        "--no-text-cleanup",
        action="store_true",
        help="speak the text as it comes: no Markdown, emoji or URL removal and no "
        "words for units",
    )
    parser.add_argument(
        "--samples-per-chunk",
        type=_positive_int,
        default=1024,
        help="audio samples per audio-chunk event (default: 1024)",
    )
    parser.add_argument(
        "--temperature",
        type=_float_in(0.0, 5.0, low_open=True),
        help=f"sampling temperature (default: {defaults.temperature})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        help="sample among the k likeliest tokens, 0 for all "
        f"(default: {defaults.top_k}; multilingual: 0)",
    )
    parser.add_argument(
        "--top-p",
        type=_float_in(0.0, 1.0, low_open=True),
        help=f"nucleus sampling mass (default: {defaults.top_p}; multilingual: 1.0)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=_float_in(1.0, 10.0),
        help="penalty for repeated speech tokens "
        f"(default: {defaults.repetition_penalty}; multilingual: 2.0)",
    )
    parser.add_argument(
        "--exaggeration",
        type=_float_in(0.0, 2.0),
        help="multilingual only: emotion intensity (default: 0.5)",
    )
    parser.add_argument(
        "--cfg-weight",
        type=_float_in(0.0, 2.0),
        help="multilingual only: classifier-free guidance weight; lower is slower "
        "and calmer (default: 0.5)",
    )
    parser.add_argument(
        "--no-streaming",
        action="store_true",
        help="do not advertise streaming; streamed text is spoken once it is complete",
    )
    parser.add_argument(
        "--no-early-release",
        action="store_true",
        help="in a stream, always wait for a sentence group to fill (up to three "
        "sentences) even if the listener runs out of audio meanwhile",
    )
    parser.add_argument(
        "--no-speculative-start",
        action="store_true",
        help="in a stream, begin the first sentence only once the next word has "
        "come (sure it has ended) rather than at its full stop (first audio a few "
        "tens of milliseconds later)",
    )
    parser.add_argument(
        "--idle-unload",
        type=_positive_float,
        metavar="SECONDS",
        help="free the model's (GPU) memory after this long without requests; the "
        "next request loads it again (default: keep it loaded)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the short generation after loading that makes the first "
        "request fast",
    )
    parser.add_argument(
        "--zeroconf",
        nargs="?",
        const="",
        metavar="NAME",
        help="announce the server to Home Assistant via zeroconf (mDNS) as NAME "
        f"(default: {default_service_name()}); tcp:// only",
    )
    parser.add_argument(
        "--zeroconf-host",
        metavar="IP",
        help="address to announce instead of the detected one, e.g. the host's LAN "
        "address when running in Docker (implies --zeroconf)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        help="address for --metrics-port (default: 0.0.0.0, all interfaces)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once; more get a too-many-connections error "
        f"(default: {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--max-text-chars",
        type=_positive_int,
        default=DEFAULT_MAX_TEXT_CHARS,
        metavar="N",
        help="longest text of one reply; longer ones get a text-too-long error "
        f"(default: {DEFAULT_MAX_TEXT_CHARS}, about 20 minutes of speech)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that sends nothing with no reply in progress, or "
        f"reads none of its audio, for this long (default: {DEFAULT_IDLE_TIMEOUT:g})",
    )
    fastpath.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="log DEBUG messages")
    parser.add_argument(
        "--log-format", default=LOG_FORMAT, help="format for log messages"
    )
    parser.add_argument("--version", action="version", version=__version__)
    return parser


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
    end their replies, then close.
    """

    def __init__(self, uri: str, max_connections: Optional[int] = None) -> None:
        parsed = urlparse(uri)
        self.uri = uri
        self.max_connections = max_connections
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
            if (
                self.max_connections is not None
                and len(self._tasks) >= self.max_connections
            ):
                await _turn_away(writer, self.max_connections)
                return
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


async def _turn_away(writer: asyncio.StreamWriter, limit: int) -> None:
    """One connection too many: say so, and close it."""
    _LOGGER.warning(
        "Refused a connection from %s: %s connections already open",
        writer.get_extra_info("peername"),
        limit,
    )
    error = Error(
        text=f"The server is busy: {limit} connections are open (--max-connections)",
        code="too-many-connections",
    )
    with contextlib.suppress(Exception):
        await asyncio.wait_for(async_write_event(error.event(), writer), 1.0)
    writer.close()


def check_uri(uri: str) -> None:
    """Raise ValueError for a URI the server cannot listen on."""
    if not uri.startswith("stdio://"):
        Listener(uri)


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
    backend: SpeechBackend,
    settings: ServerSettings,
    uri: str,
    on_ready: Optional[Callable[[], Awaitable[None]]] = None,
    stop_signal: Optional[Callable[[], Awaitable[None]]] = None,
    metrics: Optional[Metrics] = None,
    metrics_address: Optional[Tuple[str, int]] = None,
    advertiser: Optional[ZeroconfAdvertiser] = None,
) -> None:
    """Load the model, then serve until SIGTERM/SIGINT (or until `stop_signal`
    returns). Raises ModelLoadError.

    A stop ends well: no new connections, replies in progress get
    `settings.shutdown_grace` seconds to finish and are then cut short with an
    audio-stop, connections close, the model is released.
    """
    check_uri(uri)  # a bad URI fails before the slow model load
    engine = EngineWorker(
        backend,
        sentence_silence=settings.sentence_silence,
        target_lufs=settings.loudness,
        idle_unload=settings.idle_unload,
        warm_up=settings.warm_up,
    )
    connections = Connections()
    factory = partial(
        ChatterboxEventHandler,
        engine=engine,
        settings=settings,
        connections=connections,
    )
    listener: Optional[Listener] = None
    metrics_server: Optional[MetricsServer] = None
    advertising: "Optional[asyncio.Task[None]]" = None
    try:
        if metrics is not None:
            _watch(metrics, engine, connections)
            if metrics_address is not None:
                # Before the slow load: a taken port fails at once, and a scrape
                # shows the model loading.
                metrics_server = await start_metrics_server(metrics, *metrics_address)
                _LOGGER.info("Prometheus metrics on %s", metrics_server.url)
        await engine.start()
        voices = [voice.name for voice in backend.voices()]
        try:
            backend.resolve_voice(settings.default_voice, None)
        except UnknownVoice as err:
            raise ModelLoadError(
                f"--voice {settings.default_voice} is not a voice of this server; "
                f"choose one of: {', '.join(voices)}."
            ) from err

        if uri.startswith("stdio://"):
            _LOGGER.info("Ready on %s with voices: %s", uri, ", ".join(voices))
            if on_ready is not None:
                await on_ready()
            await StdioServer().run(factory)
            return

        listener = Listener(uri, settings.max_connections)
        await listener.start(factory)
        _LOGGER.info("Ready on %s with voices: %s", uri, ", ".join(voices))
        if advertiser is not None:
            # Only now: Home Assistant connects as soon as it sees the service.
            advertising = asyncio.create_task(_advertise(advertiser))
        if on_ready is not None:
            await on_ready()
        stopping = asyncio.ensure_future((stop_signal or _wait_for_stop_signal)())
        dying = asyncio.ensure_future(engine.died())
        await asyncio.wait([stopping, dying], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        dying.cancel()
        if dying.done() and not dying.cancelled():
            await _withdraw(advertising, advertiser)
            listener.stop_accepting()
            await connections.drain(1.0)  # their replies have failed already
            raise EngineDied(f"the speech engine stopped: {dying.result()}")

        _LOGGER.info("Stopping: letting replies in progress end")
        await _withdraw(advertising, advertiser)
        listener.stop_accepting()
        await connections.drain(settings.shutdown_grace)
    finally:
        await _withdraw(advertising, advertiser)
        if listener is not None:
            await listener.close()
        await engine.stop()
        if metrics_server is not None:
            await metrics_server.close()
        _LOGGER.info("Stopped")


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


def make_advertiser(args: argparse.Namespace) -> Optional[ZeroconfAdvertiser]:
    """The zeroconf announcement --zeroconf asks for; ValueError if impossible."""
    if args.zeroconf is None and args.zeroconf_host is None:
        return None
    uri = urlparse(args.uri)
    if uri.scheme != "tcp" or uri.port is None:
        raise ValueError(f"--zeroconf needs a tcp:// --uri, not {args.uri}")
    address = advertised_address(uri.hostname or "", args.zeroconf_host)
    return ZeroconfAdvertiser(
        args.zeroconf or default_service_name(), uri.port, address
    )


def _watch(metrics: Metrics, engine: EngineWorker, connections: Connections) -> None:
    """Feed the metrics: replies as they end, the rest read at scrape time."""
    metrics.set_model_name(engine.backend.model_name)

    def on_reply(record: ReplyRecord) -> None:
        metrics.reply_finished(
            outcome=record.outcome,
            first_audio_s=record.first_audio,
            total_s=record.total,
            audio_s=record.audio,
            chars=record.chars,
            groups=record.groups,
            voice=record.voice,
        )

    def on_scrape() -> None:
        metrics.set_queue_depth(engine.queue_depth())
        metrics.set_model_loaded(engine.model_loaded)
        metrics.set_active_replies(connections.active_replies())

    connections.on_reply = on_reply
    metrics.add_scrape_hook(on_scrape)
    gpu_memory = getattr(engine.backend, "gpu_memory", None)
    if gpu_memory is not None:
        metrics.set_gpu_memory_callback(gpu_memory)


def make_backend(args: argparse.Namespace) -> SpeechBackend:
    """The backend the flags ask for; ValueError for impossible speed flags."""
    # pylint: disable=import-outside-toplevel
    fast = fastpath.from_args(args)
    if args.model == "multilingual":
        from .multilingual import MultilingualBackend

        if fast != fastpath.FastPath():
            _LOGGER.warning(
                "The speed flags apply to Chatterbox Turbo only; the multilingual "
                "model uses the library's decode loop"
            )
        return MultilingualBackend(
            args.model_dir, args.data_dir, args.device, args.voices_dir
        )
    from .turbo import TurboBackend

    return TurboBackend(
        args.model_dir, args.data_dir, args.device, args.voices_dir, fast=fast
    )


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format=args.log_format
    )
    if not args.debug:
        # Library chatter that says nothing to a Home Assistant user.
        # Some libraries log through the root logger itself (logging.info()):
        # raise the root's level and keep ours.
        for name in ("root", "numba", "urllib3", "filelock", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("wyoming_chatterbox").setLevel(logging.INFO)
    # Chatterbox's progress bars; must be set before it is imported.
    os.environ.setdefault("TQDM_DISABLE", "1")

    if args.model_dir is not None and not args.model_dir.is_dir():
        _LOGGER.error("--model-dir %s is not a folder.", args.model_dir)
        sys.exit(1)
    if args.voices_dir is not None and not args.voices_dir.is_dir():
        _LOGGER.error("--voices-dir %s is not a folder.", args.voices_dir)
        sys.exit(1)

    try:
        advertiser = make_advertiser(args)  # a bad --zeroconf-host fails at once
    except ValueError as err:
        _LOGGER.error("%s", err)
        sys.exit(1)
    try:
        backend = make_backend(args)
    except ValueError as err:
        _LOGGER.error("%s", err)
        sys.exit(1)
    overrides = {
        name: getattr(args, name)
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "repetition_penalty",
            "exaggeration",
            "cfg_weight",
        )
        if getattr(args, name) is not None
    }
    settings = ServerSettings(
        default_voice=args.voice,
        params=dataclasses.replace(backend.default_params, **overrides),
        samples_per_chunk=args.samples_per_chunk,
        streaming=not args.no_streaming,
        early_release=not args.no_early_release,
        speculative_start=not args.no_speculative_start,
        clean_text=not args.no_text_cleanup,
        loudness=args.loudness,
        sentence_silence=args.sentence_silence,
        idle_unload=args.idle_unload,
        warm_up=not args.no_warmup,
        idle_timeout=args.idle_timeout,
        max_text_chars=args.max_text_chars,
        max_connections=args.max_connections,
    )
    metrics = Metrics() if args.metrics_port is not None else None
    metrics_address = (
        (args.metrics_host, args.metrics_port)
        if args.metrics_port is not None
        else None
    )
    try:
        asyncio.run(
            run_server(
                backend,
                settings,
                args.uri,
                metrics=metrics,
                metrics_address=metrics_address,
                advertiser=advertiser,
            )
        )
    except ModelLoadError as err:
        _LOGGER.error("%s", err)
        sys.exit(1)
    except MetricsServerError as err:
        _LOGGER.error("--metrics-port %s: %s", args.metrics_port, err)
        sys.exit(1)
    except EngineDied as err:
        _LOGGER.error("Exiting: %s (a supervisor such as Docker restarts it)", err)
        sys.exit(1)
    except ValueError as err:  # a malformed --uri
        _LOGGER.error("--uri %s: %s", args.uri, err)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
