"""T3 alone: what decoding several sentence groups in one step is worth.

A script, not a test: it measures and reports, and asserts nothing about speed.
For each number N of groups decoding at the same time (several clients'
replies), it runs N generations of the same forced length through
t3_decoder.T3Decoder, all begun (their prompts run) and then pulled a block
at a time round-robin, as the engine's worker does, twice: one group per step (`--t3-batch 1`) and all N in each step. Reported:
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

from bench import _load_average, git_commit, machine_info  # noqa: E402

from wyoming_chatterbox.engine import SamplingParams  # noqa: E402

TEXT = "The kitchen light is on, and the front door is locked."


def _levels(text: str) -> List[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are whole numbers, 1 or more")
    return levels


def run_level(
    model: Any, args: argparse.Namespace, groups: int, batch: int
) -> Dict[str, Any]:
    """`groups` generations of args.tokens tokens, `batch` per step at most."""
    import torch

    from wyoming_chatterbox.t3_decoder import T3Decoder

    dtype = getattr(torch, args.dtype)
    decoder = T3Decoder(
        model.t3,
        args.device,
        dtype,
        cuda_graphs=args.device.startswith("cuda") and not args.no_cuda_graphs,
        max_batch=batch,
    )
    decoder.warm_up()
    prefix = decoder.prefix(model.conds.t3)
    text = model.tokenizer(TEXT, return_tensors="pt").input_ids.to(args.device)
    params = SamplingParams()

    def run() -> Dict[str, Any]:
        steps_before = decoder.steps_run
        generations = [
            decoder.generate(
                prefix, text, params, lambda: False, args.tokens, args.tokens
            )
            for _ in range(groups)
        ]
        first: List[Optional[float]] = [None] * groups
        started = time.perf_counter()
        for generation in generations:
            generation.start()  # the engine begins waiting groups first
        alive = list(range(groups))
        while alive:
            for i in list(alive):
                try:
                    next(generations[i])
                except StopIteration:
                    alive.remove(i)
                    continue
                if first[i] is None:
                    first[i] = time.perf_counter() - started
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
            "first_block_s_max": max(f for f in first if f is not None),
            "prefill_s": sum(g.prefill_s for g in generations),
        }

    run()  # warm-up: kernels, graphs, allocations
    result = min((run() for _ in range(args.repeats)), key=lambda r: r["wall_s"])
    decoder.close()
    result.update(groups=groups, batch=batch)
    return result


def main(argv: Optional[List[str]] = None) -> int:
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
    parser.add_argument("--report", type=Path, metavar="PATH")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)

    import torch

    from wyoming_chatterbox.turbo import load_turbo_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    torch.manual_seed(0)
    load_before = _load_average()
    model = load_turbo_model(args.checkpoint, args.device)
    layers = len(model.t3.tfmr.h)
    width = model.t3.tfmr.config.n_embd
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
    took = time.monotonic() - started
    machine = machine_info()
    label = (
        str(machine["gpu"])
        if args.device.startswith("cuda") and machine["gpu"]
        else f"{machine['cpu']} ({machine['cores']} cores)"
    )
    lines = [
        "",
        f"## {datetime.datetime.now():%Y-%m-%d %H:%M}, {label}, T3 batching",
        "",
        f"- command: `script/bench-t3 {shlex.join(argv)}`",
        f"- git: {git_commit()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; T3 {layers} layers, width {width}, "
        f"{args.dtype}, device {args.device}",
        f"- {args.tokens} tokens per group (forced), all prompts first, then "
        "blocks pulled round-robin; "
        f"best of {args.repeats} after a warm-up; load average {load_before} at "
        f"start, {_load_average()} at end; {took:.0f} s",
        "",
        "| groups | per step | wall | of which prefills | ms per step "
        "| ms per token, each group | tokens/s, all | first block, last group |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['groups']} | {row['batch']} | {row['wall_s']:.2f} s "
            f"| {row['prefill_s']:.2f} s | {row['ms_per_step']:.1f} "
            f"| {row['ms_per_token_per_group']:.1f} "
            f"| {row['tokens_per_s']:.1f} | {row['first_block_s_max']:.2f} s |"
        )
    print("\n".join(lines))
    if args.report:
        with open(args.report, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"Appended a section to {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
