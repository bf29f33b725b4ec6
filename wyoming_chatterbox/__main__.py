"""Command line: settings -> backend -> engine -> Wyoming server.

The model is loaded before the server listens. A model that cannot be loaded ends
the process with exit code 1 and one sentence saying what to do.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Awaitable, Callable, Optional

from wyoming.event import async_get_stdin
from wyoming.server import AsyncServer, HandlerFactory

from . import __version__
from .engine import EngineWorker, ModelLoadError, SamplingParams, SpeechBackend
from .handler import ChatterboxEventHandler, ServerSettings

_LOGGER = logging.getLogger(__name__)

DEFAULT_URI = "tcp://0.0.0.0:10200"
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


def build_parser() -> argparse.ArgumentParser:
    defaults = SamplingParams()
    parser = argparse.ArgumentParser(
        prog="wyoming_chatterbox",
        description="Wyoming text-to-speech server for Chatterbox Turbo",
    )
    parser.add_argument(
        "--uri",
        default=DEFAULT_URI,
        help=f"tcp://HOST:PORT, unix://PATH or stdio:// (default: {DEFAULT_URI})",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="folder with the model files; without it, ResembleAI/chatterbox-turbo "
        "is downloaded on first run into --data-dir",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"cache for downloaded models (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present, else CPU), cuda, cuda:N or cpu (default: auto)",
    )
    parser.add_argument(
        "--voice", default="default", help="voice used when a request names none"
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
        default=defaults.temperature,
        help=f"sampling temperature (default: {defaults.temperature})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=defaults.top_k,
        help=f"sample among the k likeliest tokens, 0 for all (default: {defaults.top_k})",
    )
    parser.add_argument(
        "--top-p",
        type=_float_in(0.0, 1.0, low_open=True),
        default=defaults.top_p,
        help=f"nucleus sampling mass (default: {defaults.top_p})",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=_float_in(1.0, 10.0),
        default=defaults.repetition_penalty,
        help=f"penalty for repeated speech tokens (default: {defaults.repetition_penalty})",
    )
    parser.add_argument(
        "--no-streaming",
        action="store_true",
        help="do not advertise streaming; streamed text is spoken once it is complete",
    )
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


def make_server(uri: str) -> AsyncServer:
    if uri.startswith("stdio://"):
        return StdioServer()
    return AsyncServer.from_uri(uri)


async def run_server(
    backend: SpeechBackend,
    settings: ServerSettings,
    uri: str,
    on_ready: Optional[Callable[[], Awaitable[None]]] = None,
) -> None:
    """Load the model, then serve until stopped. Raises ModelLoadError."""
    server = make_server(uri)  # a bad URI fails before the slow model load
    engine = EngineWorker(backend)
    try:
        await engine.start()
        voices = [voice.name for voice in backend.voices()]
        if settings.default_voice not in voices:
            raise ModelLoadError(
                f"--voice {settings.default_voice} is not a voice of this server; "
                f"choose one of: {', '.join(voices)}."
            )
        _LOGGER.info("Ready on %s with voices: %s", uri, ", ".join(voices))
        if on_ready is not None:
            await on_ready()
        await server.run(
            partial(ChatterboxEventHandler, engine=engine, settings=settings)
        )
    finally:
        await engine.stop()


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format=args.log_format
    )
    if not args.debug:
        # Library chatter that says nothing to a Home Assistant user.
        for name in ("root", "numba", "urllib3", "filelock", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # Chatterbox's progress bars; must be set before it is imported.
    os.environ.setdefault("TQDM_DISABLE", "1")

    settings = ServerSettings(
        default_voice=args.voice,
        params=SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
        ),
        samples_per_chunk=args.samples_per_chunk,
        streaming=not args.no_streaming,
    )
    if args.model_dir is not None and not args.model_dir.is_dir():
        _LOGGER.error("--model-dir %s is not a folder.", args.model_dir)
        sys.exit(1)

    from .turbo import TurboBackend  # pylint: disable=import-outside-toplevel

    backend = TurboBackend(args.model_dir, args.data_dir, args.device)
    try:
        asyncio.run(run_server(backend, settings, args.uri))
    except ModelLoadError as err:
        _LOGGER.error("%s", err)
        sys.exit(1)
    except ValueError as err:  # a malformed --uri
        _LOGGER.error("--uri %s: %s", args.uri, err)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
