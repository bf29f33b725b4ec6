"""Every setting of the server and its default, once.

The command line (__main__.py) reads its defaults from here and builds one
frozen `Settings`; each part of the server gets the part it needs. Plain data:
nothing here does I/O or imports torch.
"""

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

MODELS = ("turbo", "nano", "multilingual")
DEFAULT_MODEL = "turbo"
# The English models (one a server: they would list the same voices).
ENGLISH_MODELS = ("turbo", "nano")
MULTILINGUAL_VERSIONS = ("v2", "v3")
# Upstream recommends v3 (June 2026): fewer hallucinations, closer voices.
DEFAULT_MULTILINGUAL_VERSION = "v3"
DEFAULT_URI = "tcp://0.0.0.0:10200"
DEFAULT_DATA_DIR = Path.home() / ".cache" / "wyoming-chatterbox"
DEFAULT_DEVICE = "auto"
# The model's built-in voice (a voices-folder clip cannot take this name).
BUILTIN_VOICE = "default"
DEFAULT_LOUDNESS_LUFS = -16.0
DEFAULT_SAMPLES_PER_CHUNK = 1024
# Home Assistant opens one connection per request; satellites add a few each.
DEFAULT_MAX_CONNECTIONS = 64
# Connections one client address may hold (an IPv6 client: its /64). Home
# Assistant needs one per reply in progress plus its Describe: a home has a
# few at once. Well below the total, so no single device can take every slot.
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 8
# Speech runs at about 15 characters a second (150 words a minute), so 20,000
# characters are some 20 minutes of audio, and as long for the one model worker.
# Home Assistant's notifications and announcements are a sentence or two, and an
# LLM's spoken reply a few hundred to about 2,000 characters: ten times the
# longest real reply, while a single request cannot keep the model busy for hours.
DEFAULT_MAX_TEXT_CHARS = 20_000
# Seconds without a complete event, while no reply is in progress, after which a
# connection is closed; and seconds a client may leave its audio unread. Home
# Assistant opens a connection per request, sends it at once and reads the audio
# as it comes; what stays silent or stalled this long is a dead peer or a probe.
DEFAULT_IDLE_TIMEOUT = 60.0
# Seconds a started stream may go without an event before it is ended (what
# came is spoken, synthesize-stopped sent, the connection closed): an LLM that
# pauses for a tool call or a slow search resumes well within two minutes; a
# client that crashed mid-reply never does, and would hold its slot for ever.
DEFAULT_STREAM_TIMEOUT = 120.0
DEFAULT_SHUTDOWN_GRACE = 5.0
DEFAULT_METRICS_HOST = "0.0.0.0"
# The web page and HTTP API (--http-port): this machine only unless opened.
DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_ALLOW = ("127.0.0.0/8", "::1/128")
# An uploaded voice clip: 20 s of 48 kHz 16-bit stereo WAV is under 4 MB, so
# 20 MB is room for any sensible clip (and minutes of MP3).
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Speech tokens T3 must produce before the first audio of a group is made, and
# how the later pieces grow: 25 tokens are one second of speech.
DEFAULT_FIRST_PIECE_TOKENS = 20
DEFAULT_MAX_PIECE_TOKENS = 160
T3_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
S3GEN_DTYPES = ("auto", "float32", "bfloat16")
# Sentence groups T3 advances in one step; 16 is the most groups the engine
# begins at once (docs/design.md says why batching pays).
DEFAULT_T3_BATCH = 16
DEFAULT_MAX_ACTIVE_GROUPS = 16
DEFAULT_MAX_GROUPS_AHEAD = 2


@dataclass(frozen=True)
class FastPath:
    """Which speed-ups the Turbo backend uses; each can be switched off alone,
    so that a regression can be found by bisecting the switches and the
    benchmark can measure each part's worth."""

    # T3 decoding with a preallocated (static) KV cache, the voice prompt's keys
    # and values computed once per voice, and sampling on the device. Off: the
    # library's own transformer with a growing cache (the reference path).
    static_cache: bool = True
    # Replay each decode step as one CUDA graph (CUDA only; needs static_cache).
    cuda_graphs: bool = True
    # T3's precision: auto is bfloat16 on a GPU that runs it fast, float16 on
    # Volta and Turing, float32 on older GPUs (resolved_dtype); int8 on the CPU
    # (int8 weights for the transformer's matrices, float32 activations: 1.7
    # times the tokens a second of float32 on 2 cores, docs/benchmarks.md).
    t3_dtype: str = "auto"
    # The precision of S3Gen's flow (its encoder and flow-matching decoder,
    # most of its work): bfloat16 runs their matrix products in bfloat16
    # (autocast: weights, norms and the vocoder stay float32). auto: bfloat16 on
    # a CPU that computes in bfloat16 natively (Intel AMX or AVX512-BF16),
    # float32 elsewhere (chatterbox decides: it needs torch to ask the CPU).
    s3gen_dtype: str = "auto"
    # Threads PyTorch uses for one operation on the CPU (torch.set_num_threads,
    # process-wide); None: PyTorch's default, one per core.
    cpu_threads: Optional[int] = None
    # Hand speech tokens to S3Gen in pieces within a sentence group, so the
    # first audio comes after `first_piece_tokens` tokens, not the whole group.
    # Each piece decodes the group's mel so far again: about 3 times S3Gen's
    # work per group, nothing to a GPU but too much for a CPU, where S3Gen
    # alone is near real time. None: on CUDA only.
    stream_in_group: Optional[bool] = None
    first_piece_tokens: int = DEFAULT_FIRST_PIECE_TOKENS
    max_piece_tokens: int = DEFAULT_MAX_PIECE_TOKENS
    # Watermark each piece on its own thread while the model goes on, instead of
    # on the worker thread between the model's steps.
    async_watermark: bool = True
    # Sentence groups (of any clients) T3 advances in one decode step (needs
    # static_cache); 1: one at a time.
    t3_batch: int = DEFAULT_T3_BATCH

    def __post_init__(self) -> None:
        if self.t3_dtype not in T3_DTYPES:
            raise ValueError(f"--t3-dtype must be one of {', '.join(T3_DTYPES)}")
        if self.s3gen_dtype not in S3GEN_DTYPES:
            raise ValueError(f"--s3gen-dtype must be one of {', '.join(S3GEN_DTYPES)}")
        if self.cpu_threads is not None and not 1 <= self.cpu_threads <= 256:
            raise ValueError("--cpu-threads must be 1 to 256")
        if not 4 <= self.first_piece_tokens <= 1000:
            raise ValueError("--first-piece-tokens must be 4 to 1000")
        if self.max_piece_tokens < self.first_piece_tokens:
            raise ValueError("the largest piece must be at least the first")
        if not 1 <= self.t3_batch <= 64:
            raise ValueError("--t3-batch must be 1 to 64")

    def resolved_dtype(
        self, device: str, capability: Optional[Tuple[int, int]] = None
    ) -> str:
        """T3's precision on `device`, a GPU of compute `capability`: bfloat16
        from 8.0 (Ampere and later have bfloat16 tensor cores), float16 on
        7.x (Volta, Turing: tensor cores for float16 only), float32 below
        (Pascal's float16 is slow); int8 weights on the CPU."""
        if self.t3_dtype != "auto":
            return self.t3_dtype
        if not device.startswith("cuda"):
            return "int8"
        if capability is None or capability >= (8, 0):
            return "bfloat16"
        return "float16" if capability >= (7, 0) else "float32"

    def streams_in_group(self, device: str) -> bool:
        if self.stream_in_group is None:
            return device.startswith("cuda")
        return self.stream_in_group

    @property
    def batch(self) -> int:
        """Groups per T3 step (1 without the static cache)."""
        return self.t3_batch if self.static_cache else 1

    def uses_graphs(self, device: str) -> bool:
        return self.static_cache and self.cuda_graphs and device.startswith("cuda")

    def describe(
        self, device: str, capability: Optional[Tuple[int, int]] = None
    ) -> str:
        """The switches in words (before the start-up self-check, which may
        turn parts off: see the backend's own line)."""
        dtype = self.resolved_dtype(device, capability)
        parts = [
            ("static KV cache" if self.static_cache else "library decode loop"),
            # The library's loop runs T3 as loaded: float32.
            f"T3 in {dtype if self.static_cache else 'float32'}",
        ]
        if self.s3gen_dtype == "auto" and not device.startswith("cuda"):
            parts.append("S3Gen's flow in bfloat16 if the CPU has it natively")
        elif self.s3gen_dtype != "float32":
            parts.append(f"S3Gen's flow in {self.s3gen_dtype}")
        if self.cpu_threads is not None and not device.startswith("cuda"):
            parts.append(f"{self.cpu_threads} CPU thread(s)")
        if self.uses_graphs(device):
            parts.append("CUDA graphs")
        if self.batch > 1:
            parts.append(f"up to {self.batch} groups per T3 step")
        if self.streams_in_group(device):
            parts.append(
                f"audio from the first {self.first_piece_tokens} tokens of a group"
            )
        else:
            parts.append("one piece per group")
        parts.append(
            "watermark on its own thread"
            if self.async_watermark
            else "watermark inline"
        )
        return ", ".join(parts)


@dataclass(frozen=True)
class ModelSettings:
    """Which models, from where, on which device.

    A server runs one model or several (an English one and the multilingual
    one); each backend gets `for_model(key)`, the settings of its model alone.
    """

    models: Tuple[str, ...] = (DEFAULT_MODEL,)
    model_dir: Optional[Path] = None  # None: download into data_dir
    # Folders of several models by key (--model-dir KEY=DIR); model_dir is the
    # folder of the only model.
    model_dirs: Mapping[str, Path] = field(default_factory=dict)
    data_dir: Path = DEFAULT_DATA_DIR
    voices_dir: Optional[Path] = None
    device: str = DEFAULT_DEVICE
    fast: FastPath = field(default_factory=FastPath)
    multilingual_version: str = DEFAULT_MULTILINGUAL_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.models, str):  # Settings.of(models="turbo")
            object.__setattr__(self, "models", (self.models,))
        models = self.models
        unknown = [m for m in models if m not in MODELS]
        if not models or unknown:
            raise ValueError(
                f"--model must be one of {', '.join(MODELS)}, not "
                f"{', '.join(unknown) or 'nothing'}"
            )
        if len(set(models)) < len(models):
            raise ValueError("--model names each model once")
        english = [m for m in models if m in ENGLISH_MODELS]
        if len(english) > 1:
            raise ValueError(
                f"--model {' and '.join(english)}: both speak English with the same "
                "voices; choose one (nano is smaller and faster, turbo sounds better)"
            )
        if self.model_dir is not None and len(models) > 1:
            raise ValueError(
                f"--model-dir {self.model_dir}: say which model's folder it is, "
                f"e.g. --model-dir {models[0]}={self.model_dir}"
            )
        stray = [key for key in self.model_dirs if key not in models]
        if stray:
            raise ValueError(
                f"--model-dir {stray[0]}=...: {stray[0]} is not one of the models "
                f"served ({', '.join(models)})"
            )
        if self.multilingual_version not in MULTILINGUAL_VERSIONS:
            raise ValueError(
                "--multilingual-version must be one of "
                + ", ".join(MULTILINGUAL_VERSIONS)
            )

    @property
    def model(self) -> str:
        """The first model (the only one, for a backend's own settings)."""
        return self.models[0]

    def for_model(self, key: str) -> "ModelSettings":
        """The settings of one of the models alone."""
        folder = self.model_dirs.get(key)
        if folder is None and len(self.models) == 1:
            folder = self.model_dir
        return dataclasses.replace(self, models=(key,), model_dir=folder, model_dirs={})


@dataclass(frozen=True)
class EngineSettings:
    """How the worker schedules replies and shapes their audio."""

    loudness: Optional[float] = DEFAULT_LOUDNESS_LUFS  # target LUFS; None: off
    sentence_silence: float = 0.0  # seconds of silence between groups
    idle_unload: Optional[float] = None  # seconds idle before freeing the model
    warm_up: bool = True  # one short generation before listening
    max_groups_ahead: int = DEFAULT_MAX_GROUPS_AHEAD
    max_active_groups: int = DEFAULT_MAX_ACTIVE_GROUPS


@dataclass(frozen=True)
class ReplySettings:
    """How a reply's text becomes sentence groups."""

    default_voice: str = BUILTIN_VOICE
    # Sampling settings from the command line, over the model's defaults (a
    # voice's own settings override both).
    params: Mapping[str, float] = field(default_factory=dict)
    # Streamed text is split into groups as it arrives (and Info advertises
    # streaming); False: it is spoken once complete.
    streaming: bool = True
    # Streams: hand held-back sentences over before the listener runs dry.
    early_release: bool = True
    # Streams: begin the first sentence before the word confirming its end.
    speculative_start: bool = True
    clean_text: bool = True  # strip Markdown, emoji, URLs; say units in words
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS  # per reply; more: text-too-long


@dataclass(frozen=True)
class ServerSettings:
    """Where and how the server listens."""

    uri: str = DEFAULT_URI
    samples_per_chunk: int = DEFAULT_SAMPLES_PER_CHUNK
    # Sockets only (not stdio://): close a connection silent this long with no
    # reply in progress, or that reads none of its audio this long; None: never.
    idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT
    # Sockets only: end a stream (synthesize-start) with no event for this long.
    stream_timeout: Optional[float] = DEFAULT_STREAM_TIMEOUT
    # Beyond it a newcomer evicts the longest-idle connection that is not
    # receiving audio, or is turned away if every one is.
    max_connections: Optional[int] = DEFAULT_MAX_CONNECTIONS
    # The same per client address (evicting that client's own idlest first).
    max_connections_per_client: Optional[int] = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE  # seconds replies get on SIGTERM
    zeroconf: Optional[str] = None  # service name to announce ("": default); None: off
    zeroconf_host: Optional[str] = None  # address to announce instead of the detected
    metrics_port: Optional[int] = None
    metrics_host: str = DEFAULT_METRICS_HOST


@dataclass(frozen=True)
class HttpSettings:
    """The web page and HTTP API (web/): off unless a port is given."""

    http_port: Optional[int] = None
    http_host: str = DEFAULT_HTTP_HOST
    # Networks whose clients may use it (CIDR); the list replaces the default.
    http_allow: Tuple[str, ...] = DEFAULT_HTTP_ALLOW
    http_token: Optional[str] = None  # Bearer token for /api/* and /v1/*
    http_cors: Optional[str] = None  # the one foreign origin allowed (CORS)
    http_cert: Optional[Path] = None  # HTTPS: certificate chain (PEM)
    http_key: Optional[Path] = None  # HTTPS: its private key (PEM)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES

    def __post_init__(self) -> None:
        if (self.http_cert is None) != (self.http_key is None):
            raise ValueError("--http-cert and --http-key go together")
        if self.http_token is not None and not self.http_token.strip():
            raise ValueError("--http-token must not be empty")
        self.allowed_networks()
        self.cors_origin()

    def allowed_networks(
        self,
    ) -> List[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]]:
        """--http-allow as networks; ValueError naming an entry that is not one."""
        networks = []
        for cidr in self.http_allow:
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"--http-allow {cidr}: not a network; write e.g. 192.168.1.0/24 "
                    "or 192.168.1.20"
                ) from None
        return networks

    def cors_origin(self) -> Optional[str]:
        """--http-cors as scheme://host[:port]; ValueError if it is not one."""
        if self.http_cors is None:
            return None
        parts = urlsplit(self.http_cors.strip())
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.username
        ):
            raise ValueError(
                f"--http-cors {self.http_cors}: give an origin such as "
                "http://192.168.1.5:3000"
            )
        return f"{parts.scheme}://{parts.netloc.lower()}"


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    reply: ReplySettings = field(default_factory=ReplySettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    http: HttpSettings = field(default_factory=HttpSettings)

    @classmethod
    def of(cls, **values: object) -> "Settings":
        """Settings from field names, each given to the part that has it (the
        parts' field names are unique): Settings.of(uri=..., loudness=None)."""
        parts: Dict[str, Any] = {}
        for part in dataclasses.fields(cls):
            part_type: Any = part.default_factory
            names = {f.name for f in dataclasses.fields(part_type)}
            parts[part.name] = part_type(
                **{k: v for k, v in values.items() if k in names}
            )
            values = {k: v for k, v in values.items() if k not in names}
        if values:
            raise TypeError(f"unknown settings: {', '.join(sorted(values))}")
        return cls(**parts)  # type: ignore[arg-type]

    def replace(self, **parts: object) -> "Settings":
        """A copy with fields of the parts changed: replace(reply={...})."""
        changed = {
            name: dataclasses.replace(getattr(self, name), **values)  # type: ignore[arg-type]
            for name, values in parts.items()
        }
        return dataclasses.replace(self, **changed)
