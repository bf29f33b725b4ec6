"""The fast path's switches: one place for the server's and the benchmark's flags.

Every part is on by default where it helps (CUDA) and can be turned off alone, so
that a regression can be found by bisecting the switches and the benchmark can
measure each part's worth.
"""

import argparse
import dataclasses
from typing import Optional

# Speech tokens T3 must produce before the first audio of a group is made, and
# how the later pieces grow: 25 tokens are one second of speech.
DEFAULT_FIRST_PIECE_TOKENS = 20
DEFAULT_MAX_PIECE_TOKENS = 160
T3_DTYPES = ("auto", "float32", "bfloat16", "float16")
# A T3 step reads all its weights whoever it serves, so several groups in one
# step cost little more than one: on 2 CPU cores at full size, 16 groups a step
# made 4.0 times the tokens per second of one group a step (docs/benchmarks.md,
# script/bench-t3); a GPU step is bound by those reads at any small batch. 16
# is the most groups the engine begins at once.
DEFAULT_T3_BATCH = 16


@dataclasses.dataclass(frozen=True)
class FastPath:
    """Which speed-ups the Turbo backend uses."""

    # T3 decoding with a preallocated (static) KV cache, the voice prompt's keys
    # and values computed once per voice, and sampling on the device. Off: the
    # library's own transformer with a growing cache (the reference path).
    static_cache: bool = True
    # Replay each decode step as one CUDA graph (CUDA only; needs static_cache).
    cuda_graphs: bool = True
    # T3's precision: auto is bfloat16 on CUDA, float32 on the CPU. S3Gen stays
    # in float32.
    t3_dtype: str = "auto"
    # Hand speech tokens to S3Gen in pieces within a sentence group, so the
    # first audio comes after `first_piece_tokens` tokens, not the whole group.
    # Each piece decodes the group's mel so far again: about 3 times S3Gen's
    # work per group (measured on CPU), nothing to a GPU but too much for a
    # CPU, where S3Gen alone is near real time. None: on CUDA only.
    stream_in_group: Optional[bool] = None
    first_piece_tokens: int = DEFAULT_FIRST_PIECE_TOKENS
    max_piece_tokens: int = DEFAULT_MAX_PIECE_TOKENS
    # Watermark each piece on its own thread while the model goes on, instead of
    # on the worker thread between the model's steps.
    async_watermark: bool = True
    # Sentence groups (of any clients) T3 advances in one decode step (needs
    # static_cache); 1: one at a time. None: DEFAULT_T3_BATCH.
    t3_batch: Optional[int] = None

    def __post_init__(self) -> None:
        if self.t3_dtype not in T3_DTYPES:
            raise ValueError(f"--t3-dtype must be one of {', '.join(T3_DTYPES)}")
        if not 4 <= self.first_piece_tokens <= 1000:
            raise ValueError("--first-piece-tokens must be 4 to 1000")
        if self.max_piece_tokens < self.first_piece_tokens:
            raise ValueError("the largest piece must be at least the first")
        if self.t3_batch is not None and not 1 <= self.t3_batch <= 64:
            raise ValueError("--t3-batch must be 1 to 64")

    def resolved_dtype(self, device: str) -> str:
        if self.t3_dtype != "auto":
            return self.t3_dtype
        return "bfloat16" if device.startswith("cuda") else "float32"

    def streams_in_group(self, device: str) -> bool:
        if self.stream_in_group is None:
            return device.startswith("cuda")
        return self.stream_in_group

    def batch(self, device: str) -> int:
        """Groups per T3 step (1 without the static cache)."""
        if not self.static_cache:
            return 1
        if self.t3_batch is not None:
            return self.t3_batch
        return DEFAULT_T3_BATCH

    def uses_graphs(self, device: str) -> bool:
        return self.static_cache and self.cuda_graphs and device.startswith("cuda")

    def describe(self, device: str) -> str:
        """One line for the startup log."""
        parts = [
            ("static KV cache" if self.static_cache else "library decode loop"),
            # The library's loop runs T3 as loaded: float32.
            f"T3 in {self.resolved_dtype(device) if self.static_cache else 'float32'}",
        ]
        if self.uses_graphs(device):
            parts.append("CUDA graphs")
        if self.batch(device) > 1:
            parts.append(f"up to {self.batch(device)} groups per T3 step")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fast path's flags (shared by the server and script/bench)."""
    group = parser.add_argument_group("speed (Chatterbox Turbo)")
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
        help="T3 precision (default: bfloat16 on CUDA, float32 on the CPU)",
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
        default=None,
        metavar="N",
        help="sentence groups (of all clients) T3 advances in one step; 1 turns "
        f"batching off (default: {DEFAULT_T3_BATCH})",
    )
    group.add_argument(
        "--no-async-watermark",
        action="store_true",
        help="watermark on the model's thread instead of its own",
    )


def from_args(args: argparse.Namespace) -> FastPath:
    """The FastPath the flags ask for; raises ValueError with a clear message."""
    return FastPath(
        static_cache=not args.no_static_cache,
        cuda_graphs=not args.no_cuda_graphs,
        t3_dtype=args.t3_dtype,
        stream_in_group=args.stream_in_group,
        first_piece_tokens=args.first_piece_tokens,
        max_piece_tokens=max(DEFAULT_MAX_PIECE_TOKENS, args.first_piece_tokens),
        async_watermark=not args.no_async_watermark,
        t3_batch=args.t3_batch,
    )
