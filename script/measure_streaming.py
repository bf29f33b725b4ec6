#!/usr/bin/env python3
"""Measure in-group streaming (s3stream) against the whole-group decode.

For one group of speech tokens (S3Gen's tokenizer on a real speech clip, or
seeded random tokens): time to first audio, S3Gen seconds streamed vs whole, the
match (log-mel distance, SNR) streamed-vs-whole and the same figures between two
whole decodes with different noise (the baseline), and watermark seconds per
piece vs whole. Usage:

    .venv/bin/python script/measure_streaming.py --checkpoint .cache/test-checkpoint
"""

import argparse
import sys
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIPS = sorted(
    (ROOT / ".venv/lib/python3.11/site-packages/s3tokenizer/assets").glob("*.wav")
)


def speech_tokens(model, count: int, seed: int) -> List[int]:  # type: ignore[no-untyped-def]
    """`count` tokens of real speech clips, else seeded random tokens."""
    import soundfile
    import torch
    import torchaudio

    found: List[int] = []
    for clip in CLIPS:
        wav, rate = soundfile.read(str(clip), dtype="float32")
        audio = torchaudio.functional.resample(torch.tensor(wav)[None], rate, 16000)
        with torch.inference_mode():
            tokens, _ = model.s3gen.tokenizer(audio)
        found += [int(t) for t in tokens[0]]
    if len(found) < count:
        rng = np.random.default_rng(seed)
        found += rng.integers(0, 6561, count - len(found)).tolist()
    return found[:count]


def log_mel(audio: np.ndarray) -> np.ndarray:
    import torch
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(
        24000, n_fft=1024, hop_length=240, n_mels=80
    )(torch.from_numpy(audio))
    return np.log10(mel.numpy() + 1e-5)


def match(a: np.ndarray, b: np.ndarray) -> Tuple[float, float]:
    distance = float(np.abs(log_mel(a) - log_mel(b)).mean())
    snr = 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2))
    return distance, float(snr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument(
        "--schedule",
        default="20,40,80",
        help="tokens per push (the rest goes with finish)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    import torch

    from wyoming_chatterbox.chatterbox.s3stream import S3GenStreamer
    from wyoming_chatterbox.chatterbox.turbo_load import load_turbo_model
    from wyoming_chatterbox.chatterbox.watermark import StreamWatermarker

    torch.manual_seed(args.seed)
    model = load_turbo_model(args.checkpoint, args.device)
    tokens = speech_tokens(model, args.tokens, args.seed)
    schedule: Sequence[int] = [int(n) for n in args.schedule.split(",") if n]

    def new(seed: int) -> S3GenStreamer:
        return S3GenStreamer(model.s3gen, model.conds.gen, max_tokens=1000, seed=seed)

    new(args.seed).finish(tokens[:10])  # warm-up
    whole_streamer = new(args.seed)
    started = time.monotonic()
    whole = whole_streamer.finish(tokens)
    whole_s = time.monotonic() - started
    other = new(args.seed + 1).finish(tokens)

    streamer = new(args.seed)
    pieces, first_audio, i = [], None, 0
    started = time.monotonic()
    for n in schedule:
        piece = streamer.push(tokens[i : i + n])
        i += n
        if piece.size and first_audio is None:
            first_audio = (time.monotonic() - started, i, len(piece))
        pieces.append(piece)
    pieces.append(streamer.finish(tokens[i:]))
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(whole) == 960 * (len(tokens) + 3)

    marker = StreamWatermarker(model.watermarker, 24000)
    marked = [marker.push(p) for p in pieces if p.size] + [marker.finish()]
    started = time.monotonic()
    whole_marked = model.watermarker.apply_watermark(streamed, sample_rate=24000)
    mark_whole_s = time.monotonic() - started
    mark_error = 10 * np.log10(
        np.sum((whole_marked - streamed) ** 2)
        / np.sum((whole_marked - np.concatenate(marked)) ** 2)
    )

    rows = [
        ("group", f"{len(tokens)} tokens ({len(whole) / 24000:.2f} s audio)"),
        ("schedule", f"{','.join(map(str, schedule))} + finish({len(tokens) - i})"),
        (
            "first audio",
            (
                f"{first_audio[0]:.2f} s after {first_audio[1]} tokens "
                f"({first_audio[2] / 24000:.2f} s of audio)"
                if first_audio
                else "only at finish"
            ),
        ),
        (
            "S3Gen streamed",
            f"{sum(s for _, s in streamer.stats):.2f} s in {len(streamer.stats)} "
            "calls: " + ", ".join(f"{n}t {s:.2f}s" for n, s in streamer.stats),
        ),
        ("S3Gen whole", f"{whole_s:.2f} s (1 call)"),
        ("streamed vs whole", "log-mel %.4f, SNR %.1f dB" % match(whole, streamed)),
        ("other noise vs whole", "log-mel %.4f, SNR %.1f dB" % match(whole, other)),
        (
            "watermark streamed",
            f"{sum(marker.stats):.2f} s in {len(marker.stats)} calls: "
            + ", ".join(f"{s:.2f}" for s in marker.stats),
        ),
        ("watermark whole", f"{mark_whole_s:.2f} s"),
        ("mark / (streamed - whole)", f"{mark_error:.1f} dB"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
