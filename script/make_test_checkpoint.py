"""Write a random-weight Chatterbox Turbo checkpoint that `--model-dir` loads.

For tests and benchmarks only: no download, no real voice. The checkpoint has every
file `ChatterboxTurboTTS.from_local` reads (ve, t3_turbo_v1, s3gen_meanflow, a GPT-2
style tokenizer, conds.pt), so the server runs the real chatterbox code on it.

- T3 is a tiny GPT-2 (2 layers, width 128) unless --full asks for GPT-2 medium. The
  server learns the size from the weights themselves.
- The speech head is zeroed and its bias set so that only a few speech tokens and the
  stop token survive top-p: every generation ends after a handful of tokens
  (geometric, mean about 8) instead of running to the 1000-token cap.
- conds.pt (the built-in voice) is computed by the real `prepare_conditionals` on a
  synthetic speech-like clip, so it matches the random weights.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

TINY = {"n_layer": 2, "n_embd": 128, "n_head": 2}
TEXT_VOCAB = 50276
SPEECH_VOCAB = 6563
STOP_SPEECH_TOKEN = 6562
# Speech tokens that stay possible; with equal logits for these and the stop token,
# P(stop) = 1 / (len + 1) per step.
LIVE_SPEECH_TOKENS = list(range(100, 6500, 800))  # 8 tokens
SAMPLE_RATE = 24000


def synthetic_voice(
    seconds: float = 8.0, sr: int = SAMPLE_RATE, seed: int = 0
) -> np.ndarray:
    """A speech-like signal: voiced harmonics with a wandering pitch, syllable-rate
    amplitude modulation and a little breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 25 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t) * 0.5 + 0.5, 0, 1) ** 1.5
    wav = 0.25 * voiced * envelope + 0.01 * rng.standard_normal(t.size)
    return (wav / np.max(np.abs(wav)) * 0.5).astype(np.float32)


def write_tokenizer(out: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Turn on the kitchen lights and set the thermostat to twenty one degrees.",
        "Good morning! The weather today is sunny with a high of 21 degrees.",
        "Hello, how can I help you? I have turned off the living room lamp.",
    ] * 20
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        corpus, vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "bos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "model_max_length": 1024,
            }
        )
    )


def build(out: Path, full: bool) -> None:
    import torch
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.voice_encoder import VoiceEncoder
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    medium = LLAMA_CONFIGS["GPT2_medium"]
    config = dict(medium)
    if not full:
        config.update(TINY, hidden_size=TINY["n_embd"])
    LLAMA_CONFIGS["GPT2_medium"] = config
    try:
        hp = T3Config(text_tokens_dict_size=TEXT_VOCAB)
        hp.llama_config_name = "GPT2_medium"
        hp.speech_tokens_dict_size = SPEECH_VOCAB
        hp.input_pos_emb = None
        hp.speech_cond_prompt_len = 375
        hp.use_perceiver_resampler = False
        hp.emotion_adv = False
        t3 = T3(hp)
    finally:
        LLAMA_CONFIGS["GPT2_medium"] = medium
    with torch.no_grad():
        t3.speech_head.weight.zero_()
        t3.speech_head.bias.fill_(-30.0)
        t3.speech_head.bias[LIVE_SPEECH_TOKENS] = 0.0
        t3.speech_head.bias[STOP_SPEECH_TOKEN] = 0.0
    save_file(
        {k: v.contiguous() for k, v in t3.state_dict().items()},
        str(out / "t3_turbo_v1.safetensors"),
    )
    del t3

    save_file(
        {k: v.contiguous() for k, v in VoiceEncoder().state_dict().items()},
        str(out / "ve.safetensors"),
    )
    s3gen = S3Gen(meanflow=True)
    # from_local loads strictly, so the file must hold exactly the state dict.
    save_file(
        {k: v.contiguous() for k, v in s3gen.state_dict().items()},
        str(out / "s3gen_meanflow.safetensors"),
    )
    del s3gen
    write_tokenizer(out)

    # The built-in voice, made by the real voice-preparation code on these weights.
    import soundfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wyoming_chatterbox.turbo import load_turbo_model

    model = load_turbo_model(out, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "voice.wav"
        soundfile.write(str(clip), synthetic_voice(), SAMPLE_RATE)
        model.prepare_conditionals(str(clip))
    model.conds.save(out / "conds.pt")
    print(
        f"Wrote a random-weight {'full-size' if full else 'tiny'} Chatterbox Turbo "
        f"checkpoint to {out} in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--full", action="store_true", help="full-size T3 (GPT-2 medium) for benchmarks"
    )
    args = parser.parse_args()
    build(args.directory, args.full)


if __name__ == "__main__":
    main()
