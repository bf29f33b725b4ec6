"""GPU figures script/gpu-check collects that neither the tests nor script/bench
give: what packing rows saves, S3Gen piece times with cuDNN's benchmark mode
and TF32 on and off, and memory after warm-up and under 16 groups.

    .venv/bin/python script/gpu_measure.py CHECKPOINT OUT.json [--device cuda]

Prints one line per figure and writes them all to OUT.json. Not a test: it
asserts nothing.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ms(device: str, run: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of run() (the device synchronised around each)."""
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - started))
    return sorted(times)[len(times) // 2]


def replay_costs(model: Any, device: str, dtype: str) -> Dict[str, float]:
    """ms per decode step replayed over n rows (one of them live) at spans
    512 and 1536: what a group left alone in row n - 1 would pay unpacked."""
    import torch

    from wyoming_chatterbox.chatterbox.t3_decoder import T3Decoder

    decoder = T3Decoder(model.t3, device, getattr(torch, dtype), max_batch=16)
    decoder.prepare(graphs=True)
    assert decoder.graphs is not None
    out = {
        "capture_s": decoder.graphs.seconds,
        "graph_mb": decoder.graphs.memory / 1e6,
        "cache_gb": decoder.slot_memory / 1e9,
        "graphs": len(decoder.graphs),
    }
    for span in (512, 1536):
        for n in (1, 2, 4, 8, 16):
            span_at = decoder.step.span_for(span)
            out[f"replay_ms_n{n}_span{span_at}"] = _ms(
                device, lambda: decoder.graphs.replay(n, span_at), 50
            )
    decoder.close()
    return out


def left_alone(model: Any, device: str, dtype: str, pack: bool) -> float:
    """ms per token of a group that goes on alone (in row 2) after the two
    groups begun before it ended: packed (moved to row 0) or not."""
    import torch

    from wyoming_chatterbox.chatterbox import t3_slots
    from wyoming_chatterbox.speech import Budget, SamplingParams

    decoder = t3_decoder_with_graphs(model, device, dtype)
    original = t3_slots.Slots.pack
    if not pack:
        t3_slots.Slots.pack = lambda self, owners, low: original(self, owners, False)
    try:
        prefix = decoder.prefix(model.conds.t3)
        text = model.tokenizer("Hello there.", return_tensors="pt").input_ids
        text = text.to(device)
        generations = [
            decoder.generate(
                prefix, text, SamplingParams(), Budget(min_tokens=n, max_tokens=n)
            )
            for n in (8, 8, 408)
        ]
        for generation in generations:
            generation.start()
        next(generations[2])  # all three together for one block
        for generation in generations[:2]:
            list(generation)
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        tokens = sum(len(block) for block in generations[2])
        torch.cuda.synchronize(device)
        return 1000 * (time.perf_counter() - started) / tokens
    finally:
        t3_slots.Slots.pack = original
        decoder.close()


def t3_decoder_with_graphs(model: Any, device: str, dtype: str) -> Any:
    import torch

    from wyoming_chatterbox.chatterbox.t3_decoder import T3Decoder

    decoder = T3Decoder(model.t3, device, getattr(torch, dtype), max_batch=16)
    decoder.prepare(graphs=True)
    return decoder


def piece_times(model: Any, device: str) -> Dict[str, List[float]]:
    """S3Gen ms per piece (20, 40, 80, 160 tokens, then the end) for a fresh
    group, twice (the first meets every new length), with cuDNN's benchmark
    mode and TF32 on and off."""
    import torch

    from wyoming_chatterbox.chatterbox.s3stream import S3GenStreamer

    tokens = [int(t) for t in torch.randint(0, 6561, (300,), generator=None)]
    out: Dict[str, List[float]] = {}
    for benchmark in (False, True):
        for tf32 in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for attempt in (1, 2):
                streamer = S3GenStreamer(model.s3gen, model.conds.gen, seed=1)
                times, at = [], 0
                for size in (20, 40, 80, 160):
                    piece = tokens[at : at + size]
                    times.append(_ms(device, lambda: streamer.push(piece), 1))
                    at += size
                times.append(_ms(device, lambda: streamer.finish(), 1))
                key = f"benchmark={benchmark} tf32={tf32} run={attempt}"
                out[key] = [round(t, 1) for t in times]
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def memory(checkpoint: Path, device: str) -> Dict[str, float]:
    """GB allocated / reserved / peak after load and warm-up, and the peak
    while 16 groups are spoken at once (their T3 steps shared)."""
    import torch

    from wyoming_chatterbox.chatterbox.turbo import TurboBackend
    from wyoming_chatterbox.settings import ModelSettings
    from wyoming_chatterbox.speech import SpeechJob

    backend = TurboBackend(
        ModelSettings(
            model_dir=checkpoint, data_dir=Path("/tmp/gpu-measure"), device=device
        )
    )
    backend.load()
    backend.warm_up()
    gb = 1e9
    out = {
        "after_warm_up_allocated_gb": torch.cuda.memory_allocated(device) / gb,
        "after_warm_up_reserved_gb": torch.cuda.memory_reserved(device) / gb,
        "after_warm_up_peak_gb": torch.cuda.max_memory_allocated(device) / gb,
    }
    torch.cuda.reset_peak_memory_stats(device)
    text = "The kitchen light is on, and the front door is locked for the night."
    groups = [backend.speak(SpeechJob(text, "default", "en")) for _ in range(16)]
    while groups:
        for group in list(groups):
            try:
                next(group)
            except StopIteration:
                groups.remove(group)
    out["16_groups_peak_gb"] = torch.cuda.max_memory_allocated(device) / gb
    out["16_groups_reserved_gb"] = torch.cuda.memory_reserved(device) / gb
    backend.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    import torch

    from wyoming_chatterbox.chatterbox.turbo import load_turbo_model
    from wyoming_chatterbox.settings import FastPath

    capability = torch.cuda.get_device_capability(args.device)
    dtype = FastPath().resolved_dtype(args.device, capability)
    results: Dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(args.device),
        "torch": torch.__version__,
        "t3_dtype": dtype,
    }
    with torch.inference_mode():
        model = load_turbo_model(args.checkpoint, args.device)
        results["replay"] = replay_costs(model, args.device, dtype)
        for pack in (True, False):
            key = f"left_alone_ms_per_token_{'packed' if pack else 'unpacked'}"
            results[key] = left_alone(model, args.device, dtype, pack)
        results["s3gen_piece_ms"] = piece_times(model, args.device)
        del model
    torch.cuda.empty_cache()
    results["memory"] = memory(args.checkpoint, args.device)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
