"""The command line of script/bench: flags, the run in the mode asked for, what
it prints and writes. Modes: `--checkpoint DIR` (the real Turbo backend in this
process), `--fake` (a stand-in backend whose audio is as long as real speech:
the server's own overhead), `--uri tcp://HOST:PORT` (a server already running).
"""

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from wyoming_chatterbox.__main__ import add_speed_arguments, fast_path
from wyoming_chatterbox.settings import DEFAULT_LOUDNESS_LUFS, FastPath
from wyoming_chatterbox.speech import ModelLoadError, SpeechBackend

from . import runs
from .backends import (
    TOKEN_RULE,
    RealisticFakeBackend,
    Target,
    make_turbo_backend,
    serve_in_process,
)
from .client import BenchError
from .machine import git_commit, load_average, machine_info, machine_label
from .report import header_lines, markdown_tables
from .stats import pooled_group_stats
from .targets import evaluate_targets
from .workloads import run_bench

_LOGGER = logging.getLogger("bench")


def _csv_cases(text: str) -> List[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("a", "b", "c")]
    if bad:
        raise argparse.ArgumentTypeError(f"cases are a, b, c; not {', '.join(bad)}")
    return cases


def _csv_levels(text: str) -> List[int]:
    if text.strip() in ("", "0", "none"):
        return []
    levels = [int(c) for c in text.split(",") if c.strip()]
    if any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be 1 or more")
    return levels


def _loudness(text: str) -> Optional[float]:
    return None if text.lower() in ("off", "none") else float(text)


def _add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--checkpoint", type=Path, metavar="DIR", help="the real Turbo backend"
    )
    mode.add_argument(
        "--fake", action="store_true", help="a fake backend: the server's overhead"
    )
    mode.add_argument("--uri", help="tcp://HOST:PORT of a server already running")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument(
        "--fake-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="--fake: seconds each sentence group takes (default: 0)",
    )
    parser.add_argument(
        "--no-early-release",
        action="store_true",
        help="in-process server: streams wait for full sentence groups even when "
        "the listener runs dry (the server's --no-early-release)",
    )
    parser.add_argument(
        "--no-speculative-start",
        action="store_true",
        help="in-process server: a stream's first sentence begins only once the "
        "next word confirms its end (the server's --no-speculative-start)",
    )


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=_csv_cases, default=["a", "b", "c"])
    parser.add_argument("--rounds", type=int, help="measured rounds (default 10)")
    parser.add_argument("--warmup", type=int, help="unmeasured rounds (default 2)")
    parser.add_argument(
        "--concurrency",
        type=_csv_levels,
        help="clients at once, comma separated, or none (default 1,4,8,16)",
    )
    parser.add_argument(
        "--sweep-case", choices=("b", "c"), default="c", help="(default: c)"
    )
    parser.add_argument(
        "--sweep-rounds", type=int, help="rounds per concurrency level (default 2)"
    )
    parser.add_argument(
        "--sweep-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a sweep round running longer is cut off (default: 600)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 warm-up, 2 rounds, concurrency 1,2, 1 sweep round (unless given)",
    )
    parser.add_argument(
        "--fragment-interval",
        type=float,
        default=0.02,
        metavar="S",
        help="case (c): seconds between 2-6 character fragments (default: 0.02, "
        "an LLM at ~50 tokens/s)",
    )
    parser.add_argument("--voice", help="voice name to ask for (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="script/bench",
        description="Latency and throughput as Home Assistant sees them "
        "(see docs/benchmarks.md)",
    )
    _add_mode_arguments(parser)
    _add_workload_arguments(parser)
    parser.add_argument(
        "--loudness",
        type=_loudness,
        default=DEFAULT_LOUDNESS_LUFS,
        help="in-process server: target LUFS or off (default: -16, the server's)",
    )
    parser.add_argument("--samples-per-chunk", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=300.0, help="per reply")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write all samples")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="PATH",
        help="keep this run in PATH's folder under bench-runs/ and rewrite PATH's "
        "latest figures from the runs kept there (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="the server's INFO log too"
    )
    add_speed_arguments(parser)
    return parser


def resolve_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    if args.rounds is None:
        args.rounds = 2 if quick else 10
    if args.warmup is None:
        args.warmup = 1 if quick else 2
    if args.concurrency is None:
        args.concurrency = [1, 2] if quick else [1, 4, 8, 16]
    if args.sweep_rounds is None:
        args.sweep_rounds = 1 if quick else 2
    if args.rounds < 1 or args.warmup < 0 or args.sweep_rounds < 1:
        raise SystemExit("--rounds and --sweep-rounds must be 1 or more")


class OncePerMessage(logging.Filter):
    """Lets each distinct log message (by its format string) through once and
    counts the repeats: a runaway-cut warning per group would flood the output."""

    def __init__(self) -> None:
        super().__init__()
        self.repeats: Dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "bench":
            return True
        key = f"{record.name}: {record.msg}"
        if key in self.repeats:
            self.repeats[key] += 1
            return False
        self.repeats[key] = 0
        return True


def setup_logging(verbose: bool) -> OncePerMessage:
    once = OncePerMessage()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(once)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("bench").setLevel(logging.INFO)
    logging.getLogger("wyoming_chatterbox").setLevel(
        logging.INFO if verbose else logging.WARNING
    )
    logging.captureWarnings(True)
    # Libraries' deprecation notices say nothing about speed.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", ResourceWarning)
    return once


async def _remote(args: argparse.Namespace, meta: Dict[str, Any]) -> Dict[str, Any]:
    parsed = args.uri.split("://", 1)
    if parsed[0] != "tcp" or ":" not in parsed[-1]:
        raise SystemExit("--uri must be tcp://HOST:PORT")
    host, port = parsed[1].rsplit(":", 1)
    results = await run_bench(args, Target(host, int(port)))
    meta["lengths"] = "whatever the remote server's model makes"
    return results


def _backend(args: argparse.Namespace, meta: Dict[str, Any]) -> SpeechBackend:
    """The backend of --fake or --checkpoint; says in `meta` how long it speaks."""
    if args.fake:
        meta["lengths"] = f"fake audio as long as real speech ({TOKEN_RULE})"
        meta["notes"].append(
            f"fake backend, {args.fake_delay:g} s per group: the speed switches "
            "do not apply"
        )
        return RealisticFakeBackend(args.fake_delay)
    import torch

    torch.manual_seed(args.seed)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    meta["lengths"] = f"forced by the backend's token_range hook: {TOKEN_RULE}"
    return make_turbo_backend(args.checkpoint, data_dir, args.device, meta["fast"])


async def _run(args: argparse.Namespace, meta: Dict[str, Any]) -> Dict[str, Any]:
    if args.uri:
        return await _remote(args, meta)
    backend = _backend(args, meta)
    server = {
        "samples_per_chunk": args.samples_per_chunk,
        "loudness": args.loudness,
        "early_release": not args.no_early_release,
        "speculative_start": not args.no_speculative_start,
        "max_connections": max(64, max(args.concurrency or [1]) + 8),
        "max_connections_per_client": None,  # every client is 127.0.0.1
    }
    states: List[Any] = []

    async def body(target: Any) -> Any:
        states.append(backend.fast_path())  # what runs, after the self-check
        return await run_bench(args, target)

    results, load_s = await serve_in_process(backend, server, body)
    if states and states[0] is not None:
        meta["fast_path"] = dataclasses.asdict(states[0])
    meta["load_s"] = load_s
    meta["device"] = getattr(backend, "device", "cpu")
    results["in_process"] = {"group_stats": pooled_group_stats(results["cases"])}
    return results


def _as_run(state: Optional[Dict[str, Any]]) -> str:
    """What ran after the backend's start-up self-check, if it turned a part
    off or chose another precision than the switches say."""
    if not state:
        return ""
    off = [part for part, on in state["parts"].items() if not on]
    return (
        f" (as run: T3 in {state['t3_dtype']}, self-check {state['self_check']}"
        + (f", off: {', '.join(off)}" if off else "")
        + ")"
    )


def _switches(
    args: argparse.Namespace, fast: FastPath, device: str, meta: Dict[str, Any]
) -> str:
    """The speed and server switches of the run, in words."""
    if args.uri:
        return "those of the remote server (the flags here are unused)"
    return (
        fast.describe(device)
        + _as_run(meta.get("fast_path"))
        + (
            "; streams wait for full groups (--no-early-release)"
            if args.no_early_release
            else "; early release of held sentences"
        )
        + (
            "; first sentence begun only once certain (--no-speculative-start)"
            if args.no_speculative_start
            else "; first sentence begun at its full stop"
        )
    )


def _print(results: Dict[str, Any], args: argparse.Namespace) -> None:
    """The report on stdout; the JSON and the docs' run file if asked for."""
    meta = results["meta"]
    print(f"\n# script/bench, {meta['date']}, {machine_label(meta)}, {meta['mode']}\n")
    print("\n".join(header_lines(meta)))
    print("\n".join(markdown_tables(results)))
    for message, count in results["suppressed_log_repeats"].items():
        print(f"\n(log: {count} more of {message[:100]!r})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"\nSamples and summaries: {args.json}")
    if args.report:
        path = runs.write_run(args.report, runs.server_run(results))
        runs.refresh(args.report)
        print(f"Kept the run in {path}; refreshed the latest figures in {args.report}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_defaults(args)
    try:
        fast = fast_path(args)
    except ValueError as err:
        parser.error(str(err))
    once = setup_logging(args.verbose)
    mode = "remote" if args.uri else "fake" if args.fake else "checkpoint"
    meta: Dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "script/bench " + shlex.join(argv),
        "git": git_commit(),
        "mode": mode,
        "device": "remote" if args.uri else args.device,
        "fast": fast,
        "notes": [],
        "token_rule": TOKEN_RULE,
    }
    load_before = load_average()
    started = time.monotonic()
    try:
        results = asyncio.run(_run(args, meta))
    except (ModelLoadError, BenchError, OSError) as err:
        _LOGGER.error("%s: %s", type(err).__name__, err)
        return 1
    meta["bench_s"] = time.monotonic() - started
    # Other work on the machine skews every figure: say how busy it was.
    meta["notes"].append(
        f"load average (1 min) {load_before} at start, {load_average()} at end, "
        f"{os.cpu_count()} cores; the run took {meta['bench_s']:.0f} s"
    )
    meta["machine"] = machine_info()
    device = str(meta["device"])
    meta["switches"] = _switches(
        args, fast, device if device != "remote" else "cuda", meta
    )
    meta["fast"] = dataclasses.asdict(fast)
    results["meta"] = meta
    results["targets"] = evaluate_targets(results, on_gpu=device.startswith("cuda"))
    results["suppressed_log_repeats"] = {k: v for k, v in once.repeats.items() if v}
    _print(results, args)
    return 0
