"""T3 alone: what decoding several sentence groups in one step is worth.

A script, not a test: it measures and reports, and asserts nothing about speed.
For each number N of groups decoding at the same time (several clients'
replies), it runs N generations of the same forced length through
t3_decoder.T3Decoder, all begun (their prompts run) and then pulled a block
at a time round-robin, as the engine's worker does, twice: one group per step
(`--t3-batch 1`) and all N in each step. Reported:
the wall time (the groups' prompts included), milliseconds per decode step
(wall / steps), each group's milliseconds per token (what its listener
waits), and tokens per second over all groups.

Run it on the full-size checkpoint (`script/test-checkpoint DIR --full`): the
test checkpoint's tiny T3 says nothing about the real model's step cost.
"""

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "script"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmark import runs  # noqa: E402
from benchmark.machine import git_commit, load_average, machine_info  # noqa: E402
from benchmark.report import t3_lines  # noqa: E402

from wyoming_chatterbox.speech import Budget, SamplingParams  # noqa: E402

TEXT = "The kitchen light is on, and the front door is locked."


def _levels(text: str) -> List[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are whole numbers, 1 or more")
    return levels


def _pull_round_robin(generations: List[Any], started: float) -> List[float]:
    """Begin every generation, then take a block from each in turn, as the
    engine's worker does; when each got its first block (from `started`)."""
    first: List[Optional[float]] = [None] * len(generations)
    for generation in generations:
        generation.start()  # the engine begins waiting groups first
    alive = list(range(len(generations)))
    while alive:
        for i in list(alive):
            try:
                next(generations[i])
            except StopIteration:
                alive.remove(i)
                continue
            if first[i] is None:
                first[i] = time.perf_counter() - started
    return [f for f in first if f is not None]


def run_level(
    model: Any, args: argparse.Namespace, groups: int, batch: int
) -> Dict[str, Any]:
    """`groups` generations of args.tokens tokens, `batch` per step at most."""
    import torch

    from wyoming_chatterbox.chatterbox.t3_decoder import T3Decoder

    dtype = getattr(torch, args.dtype)
    decoder = T3Decoder(model.t3, args.device, dtype, max_batch=batch)
    decoder.prepare(graphs=args.device.startswith("cuda") and not args.no_cuda_graphs)
    prefix = decoder.prefix(model.conds.t3)
    text = model.tokenizer(TEXT, return_tensors="pt").input_ids.to(args.device)
    params = SamplingParams()
    budget = Budget(min_tokens=args.tokens, max_tokens=args.tokens)

    def run() -> Dict[str, Any]:
        steps_before = decoder.steps_run
        generations = [
            decoder.generate(prefix, text, params, budget) for _ in range(groups)
        ]
        started = time.perf_counter()
        first = _pull_round_robin(generations, started)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        steps = decoder.steps_run - steps_before
        return {
            "wall_s": wall,
            "tokens": groups * args.tokens,
            "tokens_per_s": groups * args.tokens / wall,
            "ms_per_token_per_group": 1000 * wall / args.tokens,
            "decode_steps": steps,
            "ms_per_step": 1000 * wall / steps,
            "first_block_s_max": max(first),
            "prefill_s": sum(g.prefill_s for g in generations),
        }

    run()  # warm-up: kernels, graphs, allocations
    result = min((run() for _ in range(args.repeats)), key=lambda r: r["wall_s"])
    decoder.close()
    result.update(groups=groups, batch=batch)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="script/bench-t3", description="T3 decoding, one group a step or several"
    )
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--dtype", default=None, help="float32 or bfloat16 (default: as the server)"
    )
    parser.add_argument("--levels", type=_levels, default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=64, help="per group (default 64)")
    parser.add_argument("--repeats", type=int, default=1, help="best of (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="PATH",
        help="keep this run in PATH's folder under bench-runs/ and rewrite PATH's "
        "latest figures from the runs kept there (docs/benchmarks.md)",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    import torch

    from wyoming_chatterbox.chatterbox.turbo import load_turbo_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:  # as the server picks it
        from wyoming_chatterbox.settings import FastPath

        capability = None
        if args.device.startswith("cuda"):
            capability = torch.cuda.get_device_capability(args.device)
        args.dtype = FastPath().resolved_dtype(args.device, capability)
    torch.manual_seed(0)
    load_before = load_average()
    model = load_turbo_model(args.checkpoint, args.device)
    rows = []
    started = time.monotonic()
    with torch.inference_mode():
        for groups in args.levels:
            for batch in sorted({1, groups}):
                row = run_level(model, args, groups, batch)
                rows.append(row)
                print(
                    f"{groups} groups, {batch} a step: {row['wall_s']:.2f} s, "
                    f"{row['ms_per_step']:.1f} ms/step, "
                    f"{row['ms_per_token_per_group']:.1f} ms/token per group, "
                    f"{row['tokens_per_s']:.1f} tokens/s",
                    flush=True,
                )
    meta = {
        "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        "command": f"script/bench-t3 {shlex.join(argv)}",
        "git": git_commit(),
        "machine": machine_info(),
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "t3_layers": len(model.t3.tfmr.h),
        "t3_width": model.t3.tfmr.config.n_embd,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "schedule": "all prompts first, then blocks pulled round-robin",
        "load_average": [load_before, load_average()],
        "took_s": time.monotonic() - started,
    }
    run = {"meta": meta, "rows": rows}
    print("\n".join([""] + t3_lines(run)))
    if args.report:
        path = runs.write_run(args.report, run)
        runs.refresh(args.report)
        print(f"Kept the run in {path}; refreshed the latest figures in {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
