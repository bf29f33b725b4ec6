"""The command line: parse the flags, build the settings, run the server.

Every default comes from settings.py; a flag that cannot work (a bad value, a
missing folder) ends the process with exit code 1 and one sentence.

Long (~550 lines): one declaration per flag, each with its help text.
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import __version__
from .discovery import default_service_name
from .settings import (
    BUILTIN_VOICE,
    DEFAULT_DATA_DIR,
    DEFAULT_DEVICE,
    DEFAULT_FIRST_PIECE_TOKENS,
    DEFAULT_HTTP_ALLOW,
    DEFAULT_HTTP_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LOUDNESS_LUFS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    DEFAULT_MAX_PIECE_TOKENS,
    DEFAULT_MAX_TEXT_CHARS,
    DEFAULT_METRICS_HOST,
    DEFAULT_MODEL,
    DEFAULT_MULTILINGUAL_VERSION,
    DEFAULT_SAMPLES_PER_CHUNK,
    DEFAULT_STREAM_TIMEOUT,
    DEFAULT_T3_BATCH,
    DEFAULT_URI,
    LOG_FORMAT,
    MODELS,
    MULTILINGUAL_VERSIONS,
    S3GEN_DTYPES,
    T3_DTYPES,
    FastPath,
    Settings,
)
from .speech import SamplingParams

# Not __name__: under `python -m` that is "__main__", outside our logger tree.
_LOGGER = logging.getLogger("wyoming_chatterbox.main")

# Flags that set sampling parameters (over the model's defaults).
PARAM_FLAGS = (
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "exaggeration",
    "cfg_weight",
)


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


def _models(text: str) -> List[str]:
    """turbo, or several: turbo,multilingual."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"choose from {', '.join(MODELS)} (several: turbo,multilingual); "
            f"not {text!r}"
        )
    return names


def _model_dir(text: str) -> Tuple[Optional[str], Path]:
    """DIR, or MODEL=DIR when several models are served."""
    key, sep, rest = text.partition("=")
    if sep and key.strip().lower() in MODELS:
        return key.strip().lower(), Path(rest)
    return None, Path(text)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 5.0:
        raise argparse.ArgumentTypeError(f"must be 0 to 5 seconds, not {text}")
    return value


# Long: one declaration per flag, in the order --help shows them.
def build_parser() -> argparse.ArgumentParser:
    defaults = SamplingParams()
    parser = argparse.ArgumentParser(
        prog="wyoming_chatterbox",
        description="Wyoming text-to-speech server for Chatterbox (Turbo, Nano, Multilingual)",
    )
    parser.add_argument(
        "--model",
        type=_models,
        action="append",
        metavar="MODEL",
        help="turbo: Chatterbox Turbo, English (default); nano: Chatterbox Nano, "
        "English, small and fast enough for a CPU; multilingual: Chatterbox "
        "Multilingual, 23 languages. Give two (--model turbo --model "
        "multilingual, or turbo,multilingual) to serve English on the English "
        "model and the other languages on the multilingual one",
    )
    parser.add_argument(
        "--multilingual-version",
        choices=MULTILINGUAL_VERSIONS,
        default=DEFAULT_MULTILINGUAL_VERSION,
        help="Chatterbox Multilingual's T3 weights: v3 (June 2026, recommended "
        "upstream; default) or v2",
    )
    parser.add_argument(
        "--uri",
        default=DEFAULT_URI,
        help=f"tcp://HOST:PORT, unix://PATH or stdio:// (default: {DEFAULT_URI})",
    )
    parser.add_argument(
        "--model-dir",
        type=_model_dir,
        action="append",
        metavar="[MODEL=]DIR",
        help="folder with the model files; without it, the model is downloaded "
        "from Hugging Face on first run into --data-dir. With several models, "
        "one per model: --model-dir multilingual=DIR",
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
        default=DEFAULT_DEVICE,
        help="auto (CUDA if present, else CPU), cuda, cuda:N or cpu (default: auto)",
    )
    parser.add_argument(
        "--voice",
        default=BUILTIN_VOICE,
        help="voice used when a request names none (default: default, the model's "
        "built-in voice; with multilingual e.g. default@de for German)",
    )
    parser.add_argument(
        "--loudness",
        type=_loudness,
        default=DEFAULT_LOUDNESS_LUFS,
        metavar="LUFS",
        help="bring every reply to this loudness, or 'off' "
        f"(default: {DEFAULT_LOUDNESS_LUFS:g})",
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
        default=DEFAULT_SAMPLES_PER_CHUNK,
        help="audio samples per audio-chunk event "
        f"(default: {DEFAULT_SAMPLES_PER_CHUNK})",
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
        default=DEFAULT_METRICS_HOST,
        help="address for --metrics-port (default: 0.0.0.0, all interfaces)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once; a new one beyond evicts the longest-idle "
        "connection not receiving audio, or gets a too-many-connections error "
        f"(default: {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--max-connections-per-client",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        metavar="N",
        help="connections one client address may hold, the same way "
        f"(default: {DEFAULT_MAX_CONNECTIONS_PER_CLIENT})",
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
    parser.add_argument(
        "--stream-timeout",
        type=_positive_float,
        default=DEFAULT_STREAM_TIMEOUT,
        metavar="SECONDS",
        help="end a stream that sends no event for this long: speak what came, "
        f"then close (default: {DEFAULT_STREAM_TIMEOUT:g})",
    )
    add_http_arguments(parser)
    add_speed_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="log DEBUG messages")
    parser.add_argument(
        "--log-format", default=LOG_FORMAT, help="format for log messages"
    )
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The web page and HTTP API (docs/http-api.md)."""
    group = parser.add_argument_group("web page and HTTP API")
    group.add_argument(
        "--http-port",
        type=_port,
        metavar="PORT",
        help="serve the web page, its API and an OpenAI-compatible speech API on "
        "this port (default: off)",
    )
    group.add_argument(
        "--http-host",
        default=DEFAULT_HTTP_HOST,
        help=f"address for --http-port (default: {DEFAULT_HTTP_HOST}, this machine "
        "only; 0.0.0.0 for all interfaces, with --http-allow)",
    )
    group.add_argument(
        "--http-allow",
        nargs="+",
        default=list(DEFAULT_HTTP_ALLOW),
        metavar="CIDR",
        help="networks whose clients may use the HTTP side, e.g. 127.0.0.1 "
        "192.168.1.0/24; replaces the default "
        f"({' '.join(DEFAULT_HTTP_ALLOW)}: this machine only)",
    )
    token = group.add_mutually_exclusive_group()
    token.add_argument(
        "--http-token",
        metavar="TOKEN",
        help="require this token (Authorization: Bearer TOKEN, or a login on the "
        "page) for the API, uploads and deletes",
    )
    token.add_argument(
        "--http-token-file",
        type=Path,
        metavar="PATH",
        help="read the token from this file (keeps it out of the process list)",
    )
    group.add_argument(
        "--http-cors",
        metavar="ORIGIN",
        help="let pages from this one other origin use the API from a browser, "
        "e.g. http://192.168.1.5:3000 (default: none)",
    )
    group.add_argument(
        "--http-cert",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with this certificate (PEM; the browser's microphone "
        "needs HTTPS except on localhost)",
    )
    group.add_argument(
        "--http-key", type=Path, metavar="FILE", help="the certificate's key (PEM)"
    )


def http_token(args: argparse.Namespace) -> Optional[str]:
    """--http-token, or the first line of --http-token-file; ValueError."""
    if args.http_token_file is None:
        return args.http_token
    try:
        text = args.http_token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--http-token-file {args.http_token_file}: {err}") from None
    if not text:
        raise ValueError(f"--http-token-file {args.http_token_file} is empty")
    return text.splitlines()[0].strip()


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The fast path's flags (shared by the server and script/bench)."""
    group = parser.add_argument_group("speed (Chatterbox Turbo and Nano)")
    group.add_argument(
        "--no-static-cache",
        action="store_true",
        help="decode T3 with the library's growing cache (slower; for comparison)",
    )
    group.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="do not replay T3's decode step as a CUDA graph",
    )
    group.add_argument(
        "--t3-dtype",
        choices=T3_DTYPES,
        default="auto",
        help="T3 precision (default: bfloat16 on GPUs of compute capability 8.0 "
        "and up, float16 on 7.x, float32 on older GPUs, int8 weights on the CPU)",
    )
    group.add_argument(
        "--s3gen-dtype",
        choices=S3GEN_DTYPES,
        default="auto",
        help="precision of S3Gen's flow (default: bfloat16 on CPUs that compute it "
        "natively, Intel AMX or AVX512-BF16; float32 elsewhere)",
    )
    group.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help="threads PyTorch uses on the CPU (default: one per core)",
    )
    streaming = group.add_mutually_exclusive_group()
    streaming.add_argument(
        "--no-stream-in-group",
        dest="stream_in_group",
        action="store_false",
        default=None,
        help="make each sentence group's audio in one piece (first audio later)",
    )
    streaming.add_argument(
        "--stream-in-group",
        dest="stream_in_group",
        action="store_true",
        help="make audio in pieces within a group on the CPU too (the default on "
        "CUDA; on a CPU first audio comes sooner but a group takes longer)",
    )
    group.add_argument(
        "--first-piece-tokens",
        type=int,
        default=DEFAULT_FIRST_PIECE_TOKENS,
        metavar="N",
        help="speech tokens (25 a second) before a group's first audio "
        f"(default: {DEFAULT_FIRST_PIECE_TOKENS})",
    )
    group.add_argument(
        "--t3-batch",
        type=int,
        default=DEFAULT_T3_BATCH,
        metavar="N",
        help="sentence groups (of all clients) T3 advances in one step; 1 turns "
        f"batching off (default: {DEFAULT_T3_BATCH})",
    )
    group.add_argument(
        "--no-async-watermark",
        action="store_true",
        help="watermark on the model's thread instead of its own",
    )


def fast_path(args: argparse.Namespace) -> FastPath:
    """The FastPath the flags ask for; raises ValueError with a clear message."""
    return FastPath(
        static_cache=not args.no_static_cache,
        cuda_graphs=not args.no_cuda_graphs,
        t3_dtype=args.t3_dtype,
        s3gen_dtype=args.s3gen_dtype,
        cpu_threads=args.cpu_threads,
        stream_in_group=args.stream_in_group,
        first_piece_tokens=args.first_piece_tokens,
        max_piece_tokens=max(DEFAULT_MAX_PIECE_TOKENS, args.first_piece_tokens),
        async_watermark=not args.no_async_watermark,
        t3_batch=args.t3_batch,
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings the flags ask for; ValueError for impossible ones."""
    params: Dict[str, Any] = {
        name: getattr(args, name)
        for name in PARAM_FLAGS
        if getattr(args, name) is not None
    }
    models, model_dir, model_dirs = _model_choice(args)
    return Settings.of(
        models=models,
        model_dir=model_dir,
        model_dirs=model_dirs,
        multilingual_version=args.multilingual_version,
        data_dir=args.data_dir,
        voices_dir=args.voices_dir,
        device=args.device,
        fast=fast_path(args),
        loudness=args.loudness,
        sentence_silence=args.sentence_silence,
        idle_unload=args.idle_unload,
        warm_up=not args.no_warmup,
        default_voice=args.voice,
        params=params,
        streaming=not args.no_streaming,
        early_release=not args.no_early_release,
        speculative_start=not args.no_speculative_start,
        clean_text=not args.no_text_cleanup,
        max_text_chars=args.max_text_chars,
        uri=args.uri,
        samples_per_chunk=args.samples_per_chunk,
        idle_timeout=args.idle_timeout,
        stream_timeout=args.stream_timeout,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        zeroconf=args.zeroconf,
        zeroconf_host=args.zeroconf_host,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        http_host=args.http_host,
        http_allow=tuple(args.http_allow),
        http_token=http_token(args),
        http_cors=args.http_cors,
        http_cert=args.http_cert,
        http_key=args.http_key,
    )


def _model_choice(
    args: argparse.Namespace,
) -> Tuple[Tuple[str, ...], Optional[Path], Dict[str, Path]]:
    """The models, the only one's folder, the folders by model; ValueError for
    a folder given twice or not said whose."""
    models = tuple(name for group in args.model or [[DEFAULT_MODEL]] for name in group)
    model_dir: Optional[Path] = None
    model_dirs: Dict[str, Path] = {}
    for key, folder in args.model_dir or []:
        if key is None and len(models) == 1:
            key = models[0]
        if key is None:
            raise ValueError(
                f"--model-dir {folder}: say which model's folder it is, e.g. "
                f"--model-dir {models[0]}={folder}"
            )
        if key in model_dirs:
            raise ValueError(f"--model-dir: {key}'s folder is given twice")
        model_dirs[key] = folder
    if len(models) == 1 and set(model_dirs) <= {models[0]}:
        model_dir = model_dirs.pop(models[0], None)
    return models, model_dir, model_dirs


def _setup_logging(args: argparse.Namespace) -> None:
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


def main(argv: Optional[list] = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    folders = [("--model-dir", folder) for _, folder in args.model_dir or []]
    for flag, folder in [*folders, ("--voices-dir", args.voices_dir)]:
        if folder is not None and not folder.is_dir():
            _LOGGER.error("%s %s is not a folder.", flag, folder)
            sys.exit(1)
    try:
        settings = settings_from(args)
    except ValueError as err:
        _LOGGER.error("%s", err)
        sys.exit(1)
    from .server import run  # pylint: disable=import-outside-toplevel

    sys.exit(run(settings))


if __name__ == "__main__":
    main()
