"""What the bench asks of the server: the replies, cases (a)-(c), and the
concurrency sweep; `run_bench` runs them all against one server and keeps every
sample with its summary.

- (a) a one-shot `synthesize` of a short reply (< 60 characters: HA sends those
  one-shot and plays nothing until audio-stop);
- (b) a one-sentence reply (> 60 characters) streamed: synthesize-start, a few
  synthesize-chunk, HA's compatibility `synthesize`, synthesize-stop;
- (c) a five-sentence reply streamed as small LLM-like fragments, with the
  longest silence a listener would hear;
- the sweep: N clients at once, each one reply of (c) (or (b)).
"""

import argparse
import asyncio
import logging
import random
import time
from typing import Any, Dict, List, Set

from .backends import Target
from .client import one_shot, streamed
from .stats import case_summary, public

_LOGGER = logging.getLogger("bench")

# Replies like a voice assistant's. (a): under 60 characters, so HA sends them
# one-shot. (b): one sentence over 60. (c): five sentences, as an LLM writes.
SHORT_REPLIES = [
    "Turning on the kitchen lights now.",
    "The front door is locked.",
    "Your timer is set for ten minutes.",
    "It is twenty one degrees in the living room.",
    "Playing some jazz in the bedroom.",
]
SENTENCE_REPLIES = [
    "The weather today is mostly sunny with a high of twenty four degrees and "
    "a light breeze from the west.",
    "I have turned off all the lights downstairs and locked the back door for "
    "the night.",
    "Your next appointment is a dentist visit on Thursday at half past nine in "
    "the morning.",
]
LONG_REPLIES = [
    "Good morning! It is a bright day outside, with clear skies until the late "
    "afternoon. The temperature should reach about twenty two degrees by noon. "
    "There is a small chance of rain this evening, so take an umbrella if you go "
    "out. Your first meeting starts at ten, and traffic on the way looks light.",
    "I found three recipes that use the chicken and peppers you have. The "
    "quickest one is a stir fry that takes about twenty minutes. You would also "
    "need some rice, soy sauce and a little garlic. The oven is free if you would "
    "rather roast everything together. Shall I read out the first recipe step by "
    "step?",
    "The washing machine finished its cycle a few minutes ago. The dryer is "
    "still running and should be done in half an hour. Energy use today is a bit "
    "lower than yesterday, mostly thanks to the sunshine. The solar panels have "
    "made eleven kilowatt hours so far. The battery is at eighty percent and "
    "still charging.",
]
REPLIES = {"a": SHORT_REPLIES, "b": SENTENCE_REPLIES, "c": LONG_REPLIES}

CASE_T0 = {
    "a": "t0 = the one-shot synthesize was sent; first audio = first audio-chunk, "
    "total = audio-stop (what HA waits for before it plays anything)",
    "b": "t0 = synthesize-stop was sent (the text was complete); first audio = "
    "first audio-chunk, total = synthesize-stopped",
    "c": "t0 = the first text fragment was sent; first audio also from the moment "
    "the fragment ending the first sentence was sent, and from the fragment after "
    "which the server's sentence splitter releases the first group (replayed in "
    "the bench); total = synthesize-stopped",
}


def llm_fragments(text: str, rng: random.Random) -> List[str]:
    """Cut `text` into 2-6 character pieces, anywhere (mid-word too), as an
    LLM's deltas come."""
    pieces: List[str] = []
    i = 0
    while i < len(text):
        n = rng.randint(2, 6)
        pieces.append(text[i : i + n])
        i += n
    return pieces


def few_chunks(text: str, count: int = 4) -> List[str]:
    """`text` in `count` nearly equal pieces, cut anywhere."""
    size = -(-len(text) // count)
    return [text[i : i + size] for i in range(0, len(text), size)]


class Bench:
    """Runs the cases against one server and keeps every sample."""

    def __init__(self, args: argparse.Namespace, target: Target) -> None:
        self.args = args
        self.target = target
        self.rng = random.Random(args.seed)
        self.results: Dict[str, Any] = {"cases": {}, "concurrency": {}}

    async def run_one(self, case: str, i: int) -> Dict[str, Any]:
        args, target = self.args, self.target
        text = REPLIES[case][i % len(REPLIES[case])]
        if case == "a":
            return await one_shot(
                target.host, target.port, text, args.voice, args.timeout
            )
        if case == "b":
            fragments, interval = few_chunks(text), 0.0
        else:
            fragments, interval = llm_fragments(text, self.rng), args.fragment_interval
        return await streamed(
            target.host,
            target.port,
            text,
            fragments,
            interval,
            args.voice,
            args.timeout,
            case,
        )

    async def run_case(self, case: str) -> None:
        """--warmup unmeasured rounds, then --rounds measured ones, one reply at
        a time."""
        args, target = self.args, self.target
        _LOGGER.info(
            "Case (%s): %s warm-up + %s measured rounds", case, args.warmup, args.rounds
        )
        for i in range(args.warmup):
            await self.run_one(case, i)
        stats_before = target.group_stats()
        samples = []
        for i in range(args.rounds):
            sample = await self.run_one(case, args.warmup + i)
            if target.recorder is not None:
                target.recorder.attribute(sample)
            samples.append(sample)
        self.results["cases"][case] = {
            "definition": CASE_T0[case],
            "samples": [public(s) for s in samples],
            "summary": case_summary(samples),
            "group_stats": target.new_group_stats(stats_before),
        }

    async def _sweep_round(
        self, level: int, r: int, samples: List[Dict[str, Any]], errors: List[str]
    ) -> "Set[asyncio.Task[Dict[str, Any]]]":
        """`level` replies at once; the replies cut off (cancelled)."""
        args = self.args
        tasks = [
            asyncio.ensure_future(self.run_one(args.sweep_case, r * level + i))
            for i in range(level)
        ]
        done, pending = await asyncio.wait(tasks, timeout=args.sweep_timeout)
        for task in pending:
            task.cancel()
            errors.append("timed out")
        for task in done:
            err = task.exception()
            if err is not None:
                errors.append(f"{type(err).__name__}: {err}")
            else:
                samples.append(task.result())
        return pending

    async def run_sweep(self, level: int) -> None:
        """`level` clients at once, each one reply of the sweep case, for
        `--sweep-rounds` rounds; a round that runs past `--sweep-timeout` is
        cut off and reported so."""
        args, target = self.args, self.target
        samples: List[Dict[str, Any]] = []
        errors: List[str] = []
        wall_total = busy_total = 0.0
        stats_before = target.group_stats()
        target.reset_gpu_peak()
        for r in range(args.sweep_rounds):
            started = time.monotonic()
            cut_off = await self._sweep_round(level, r, samples, errors)
            wall = time.monotonic() - started
            wall_total += wall
            if target.recorder is not None:
                busy_total += sum(
                    c["busy_s"]
                    for c in target.recorder.between(started, started + wall)
                )
            if cut_off:
                await asyncio.wait(cut_off)
                break
        audio = sum(s["audio_s"] for s in samples)
        summary = case_summary(samples)
        summary["throughput_audio_s_per_s"] = audio / wall_total if wall_total else 0
        summary["wall_s"] = wall_total
        summary["streams"] = len(samples)
        summary["errors"] = len(errors)
        if target.recorder is not None and wall_total:
            summary["engine_busy_fraction"] = busy_total / wall_total
        peak = target.gpu_peak()
        if peak is not None:
            summary["gpu_memory_peak_gb"] = peak
        self.results["concurrency"][str(level)] = {
            "clients": level,
            "case": args.sweep_case,
            "samples": [public(s) for s in samples],
            "errors": errors,
            "summary": summary,
            "group_stats": target.new_group_stats(stats_before),
        }


async def run_bench(args: argparse.Namespace, target: Target) -> Dict[str, Any]:
    """Every case asked for, one reply at a time, then each concurrency level."""
    bench = Bench(args, target)
    target.reset_gpu_peak()
    for case in args.cases:
        await bench.run_case(case)
    bench.results["gpu_memory_one_stream_gb"] = target.gpu_peak()
    for level in args.concurrency:
        _LOGGER.info(
            "Concurrency %s: %s round(s) of case (%s)",
            level,
            args.sweep_rounds,
            args.sweep_case,
        )
        await bench.run_sweep(level)
    if target.recorder is not None:
        calls = [c for c in target.recorder.calls if c["end"] is not None]
        bench.results["backend_calls"] = len(calls)
    return bench.results
