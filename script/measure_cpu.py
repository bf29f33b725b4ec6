"""One sentence group through the Turbo or Nano backend on a CPU, under several
precision and thread settings, interleaved: what each CPU speed-up is worth.

Each setting is a backend of its own (T3 precision, S3Gen flow precision,
torch threads); the rounds take them in turn (A, B, C, A, B, C, ...) so that
other work on the machine weighs on each alike, and the best round of each is
kept. The group is forced to the length real speech of the text takes (as
script/bench does). A script, not a test: it asserts nothing.

    .venv/bin/python script/measure_cpu.py .cache/test-checkpoint-nano \\
        float32/float32/2 int8/float32/2 int8/bfloat16/2 int8/bfloat16/1
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = "The kitchen light is on, and the front door is locked now."
TOKENS_PER_SECOND = 25


def make(checkpoint: Path, setting: str, tokens: int) -> Any:
    from wyoming_chatterbox.chatterbox.turbo import NanoBackend, TurboBackend
    from wyoming_chatterbox.chatterbox.turbo_load import NANO, variant_in
    from wyoming_chatterbox.settings import FastPath, ModelSettings

    t3, s3gen, _ = setting.split("/")
    base = NanoBackend if variant_in(checkpoint) is NANO else TurboBackend

    class Forced(base):  # type: ignore[valid-type,misc]
        def token_range(self, text: str) -> Tuple[int, int]:
            return tokens, tokens

    fast = FastPath(
        t3_dtype=t3, s3gen_dtype=s3gen, stream_in_group=False, async_watermark=False
    )
    backend = Forced(
        ModelSettings(
            models=(base.kind,),
            model_dir=checkpoint,
            data_dir=Path("/tmp/measure-cpu"),
            device="cpu",
            fast=fast,
        )
    )
    backend.load()
    return backend


def one_group(backend: Any, threads: int) -> Dict[str, float]:
    import torch

    from wyoming_chatterbox.speech import SamplingParams, SpeechJob

    torch.set_num_threads(threads)
    started = time.perf_counter()
    job = SpeechJob(TEXT, "default", "en", SamplingParams(), whole=True)
    for _ in backend.speak(job):
        pass
    total = time.perf_counter() - started
    stats = backend.group_stats[-1]
    audio = (stats.tokens + 3) / TOKENS_PER_SECOND
    return {
        "total_s": total,
        "t3_ms": stats.ms_per_token or 0.0,
        "t3_s": stats.prefill_s + stats.decode_s,
        "s3gen_s": sum(stats.s3gen_s),
        "watermark_s": sum(stats.watermark_s),
        "rtf": total / audio,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument(
        "settings", nargs="+", metavar="T3/S3GEN/THREADS", help="e.g. int8/bfloat16/2"
    )
    parser.add_argument("--tokens", type=int, default=50, help="per group (2 s)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    backends = {s: make(args.checkpoint, s, args.tokens) for s in args.settings}
    best: Dict[str, Dict[str, float]] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for setting, backend in backends.items():
            figures = one_group(backend, int(setting.split("/")[2]))
            if round_ and (
                setting not in best or figures["total_s"] < best[setting]["total_s"]
            ):
                best[setting] = figures
    print(
        f"{args.checkpoint}, {args.tokens} speech tokens "
        f"({(args.tokens + 3) / TOKENS_PER_SECOND:.2f} s of audio), best of "
        f"{args.rounds} rounds; load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; {os.cpu_count()} cores\n"
    )
    print("| T3 / S3Gen flow / threads | T3 per token | T3 | S3Gen | watermark "
          "| group | RTF |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for setting, f in best.items():
        print(
            f"| {setting} | {f['t3_ms']:.1f} ms | {f['t3_s']:.2f} s "
            f"| {f['s3gen_s']:.2f} s | {f['watermark_s']:.2f} s "
            f"| {f['total_s']:.2f} s | {f['rtf']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
