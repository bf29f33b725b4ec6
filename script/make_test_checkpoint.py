"""Write a random-weight Chatterbox Turbo checkpoint that `--model-dir` loads.

For tests and benchmarks only: no download, no real voice. The checkpoint has every
file the server's loader reads (ve, t3_turbo_v1, s3gen_meanflow, a GPT-2 style
tokenizer, conds.pt), so the server runs the real chatterbox code on it. With
--nano it is a Chatterbox Nano checkpoint (t3_nano_v1, GPT-2 small: Nano's released
size, small enough for tests); with --multilingual a Chatterbox Multilingual one
(see `build_multilingual`).

- T3 is a tiny GPT-2 (2 layers, width 128) unless --full asks for GPT-2 medium. The
  server learns the size from the weights themselves.
- --shared-from DIR (a checkpoint this script wrote) links the files that do not
  depend on T3 (ve, s3gen_meanflow, the tokenizer, conds.pt) instead of making them:
  a Nano checkpoint beside a Turbo one costs only its T3.
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


# Files of a Turbo or Nano checkpoint that do not depend on T3.
SHARED_FILES = ("ve.safetensors", "s3gen_meanflow.safetensors", "conds.pt")


def write_t3(out: Path, full: bool, nano: bool) -> None:
    """T3 at the size asked for, with the speech head that ends generations."""
    import torch
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wyoming_chatterbox.chatterbox.turbo_load import NANO, TURBO

    variant = NANO if nano else TURBO
    config = variant.released_config() or dict(LLAMA_CONFIGS["GPT2_medium"])
    if not full and not nano:
        config.update(TINY, hidden_size=TINY["n_embd"])
    saved = LLAMA_CONFIGS.get(variant.config_name)
    LLAMA_CONFIGS[variant.config_name] = config
    try:
        hp = T3Config(text_tokens_dict_size=TEXT_VOCAB)
        hp.llama_config_name = variant.config_name
        hp.speech_tokens_dict_size = SPEECH_VOCAB
        hp.input_pos_emb = None
        hp.speech_cond_prompt_len = 375
        hp.use_perceiver_resampler = False
        hp.emotion_adv = False
        t3 = T3(hp)
    finally:
        if saved is None:
            del LLAMA_CONFIGS[variant.config_name]
        else:
            LLAMA_CONFIGS[variant.config_name] = saved
    with torch.no_grad():
        t3.speech_head.weight.zero_()
        t3.speech_head.bias.fill_(-30.0)
        t3.speech_head.bias[LIVE_SPEECH_TOKENS] = 0.0
        t3.speech_head.bias[STOP_SPEECH_TOKEN] = 0.0
    save_file(
        {k: v.contiguous() for k, v in t3.state_dict().items()},
        str(out / variant.t3_weights),
    )


def link_shared(out: Path, source: Path) -> None:
    """The T3-independent files of the checkpoint in `source`, as links."""
    source = source.resolve()
    names = [*SHARED_FILES, "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        if not (source / name).is_file():
            raise SystemExit(f"{source} lacks {name}: not a checkpoint of this script")
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(source / name)


def build(
    out: Path, full: bool, nano: bool = False, shared_from: "Path | None" = None
) -> None:
    import torch
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.voice_encoder import VoiceEncoder
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    write_t3(out, full, nano)
    what = f"{'Nano' if nano else 'full-size' if full else 'tiny'} Chatterbox"
    if shared_from is not None:
        link_shared(out, shared_from)
        print(
            f"Wrote a random-weight {what} checkpoint to {out} (sharing "
            f"{shared_from}'s other files) in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
        return

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
    from wyoming_chatterbox.chatterbox.turbo_load import load_turbo_model

    model = load_turbo_model(out, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "voice.wav"
        soundfile.write(str(clip), synthetic_voice(), SAMPLE_RATE)
        model.prepare_conditionals(str(clip))
    model.conds.save(out / "conds.pt")
    print(
        f"Wrote a random-weight {what} checkpoint to {out} in "
        f"{time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )


# --- Chatterbox Multilingual ---------------------------------------------------
# T3 is a Llama. Width 1024 is fixed: chatterbox builds the perceiver that resamples
# the voice prompt at 1024. 14 layers and 16 heads so that the heads the alignment
# analyzer watches (layers 9, 12, 13; heads up to 15) exist; heads 4 wide and a
# 64-wide MLP keep it at ~39M parameters. The loader reads the head width from the
# file's metadata.
MTL_TINY = {
    "num_hidden_layers": 14,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 4,
    "intermediate_size": 64,
}
MTL_TEXT_VOCAB = 2454
MTL_STOP_SPEECH_TOKEN = 6562
# Dimension 0 of every speech-token embedding is this large, so after T3's final RMS
# norm it is about sqrt(1024) = 32 at every speech position, whatever the random
# layers add: the speech head's column 0 then acts as the bias Llama's head lacks.
MTL_CONSTANT_CHANNEL = 300.0
# The built-in voice's clip. S3Gen re-encodes the voice's reference with every call
# and runs 10 flow-matching steps over it: on 2 CPU cores a call takes ~2.5 s with a
# 2 s reference and ~7.5 s with the 8 s one Turbo's checkpoint uses.
MTL_VOICE_SECONDS = 2.0
MTL_CORPUS = [
    "Guten Morgen! Das Licht in der Küche ist an, und es sind 21 Grad.",
    "Bonjour, la lumière du salon est éteinte. Il fait beau aujourd'hui.",
    "Good evening. The front door is locked and all the lights are off.",
    "Buenos días, la puerta está cerrada. ¿Quieres música?",
    "Buongiorno, la luce della cucina è accesa. Che tempo fa?",
    "Hallo, hoe gaat het? Het is twintig graden in de woonkamer.",
    "Dzień dobry, światło w kuchni jest włączone. Już gotowe.",
    "Bom dia, a porta da frente está trancada. Ótimo.",
    "God morgon, lampan i köket är tänd. Vädret är fint.",
    "Günaydın, mutfak ışığı açık. Hava çok güzel.",
]
# Character -> Cangjie code, in the format MTLTokenizer parses (a JSON list of
# "character<TAB>code" lines); the codes are the real ones.
MTL_CANGJIE = [
    "你\tonf",
    "好\tvnd",
    "今\toin",
    "天\tmk",
    "很\thoav",
    "中\tl",
    "文\tyk",
    "開\tanmt",
    "燈\tfnot",
    "我\thqi",
]


def write_mtl_tokenizer(out: Path) -> None:
    """A small grapheme BPE that MTLTokenizer accepts: its special tokens, a tag per
    language ([de], ...), the Cangjie letters ([cj_a], ...) and the characters of a
    little lowercased, NFKD-normalised text in a few languages."""
    import unicodedata

    from chatterbox.models.tokenizers.tokenizer import SPECIAL_TOKENS
    from chatterbox.mtl_tts import SUPPORTED_LANGUAGES
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = [
        *SPECIAL_TOKENS,
        *(f"[{code}]" for code in SUPPORTED_LANGUAGES),
        *(f"[cj_{letter}]" for letter in "abcdefghijklmnopqrstuvwxyz."),
    ]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=600, min_frequency=1, special_tokens=specials
    )
    corpus = [unicodedata.normalize("NFKD", line.lower()) for line in MTL_CORPUS]
    tok.train_from_iterator(corpus * 5, trainer)
    assert tok.get_vocab_size() <= MTL_TEXT_VOCAB, tok.get_vocab_size()
    tok.save(str(out / "grapheme_mtl_merged_expanded_v1.json"))
    (out / "Cangjie5_TC.json").write_text(
        json.dumps(MTL_CANGJIE, ensure_ascii=False), encoding="utf-8"
    )


def build_multilingual(out: Path, full: bool, version: str = "v3") -> None:
    """Every file the multilingual loader reads: ve.pt, t3_mtl23ls_VERSION.safetensors
    (tiny Llama unless --full), s3gen.pt (S3Gen without
    meanflow, full size: it cannot be shrunk), the grapheme tokenizer, the Cangjie
    table and conds.pt (by the real prepare_conditionals on a 2 s synthetic clip).

    The speech head lets only LIVE_SPEECH_TOKENS and the stop token through, with
    equal logits in both CFG rows (so guidance changes nothing). The alignment
    analyzer holds the stop token back until it thinks the text is spoken and
    forces it when a token repeats, so a generation ends after a handful of tokens.
    """
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

    released = LLAMA_CONFIGS["Llama_520M"]
    if not full:
        LLAMA_CONFIGS["Llama_520M"] = dict(released, **MTL_TINY)
    try:
        t3 = T3(T3Config.multilingual())
    finally:
        LLAMA_CONFIGS["Llama_520M"] = released
    with torch.no_grad():
        t3.speech_emb.weight[:, 0] = MTL_CONSTANT_CHANNEL
        t3.speech_head.weight.zero_()
        t3.speech_head.weight[:, 0] = -1.0  # logit about -32
        t3.speech_head.weight[LIVE_SPEECH_TOKENS, 0] = 0.0
        t3.speech_head.weight[MTL_STOP_SPEECH_TOKEN, 0] = 0.0
    metadata = {} if full else {"head_dim": str(MTL_TINY["head_dim"])}
    save_file(
        {k: v.contiguous() for k, v in t3.state_dict().items()},
        str(out / f"t3_mtl23ls_{version}.safetensors"),
        metadata=metadata,
    )
    del t3

    torch.save(VoiceEncoder().state_dict(), out / "ve.pt")
    s3gen = S3Gen()
    torch.save(s3gen.state_dict(), out / "s3gen.pt")
    del s3gen
    write_mtl_tokenizer(out)

    # The built-in voice, made by the real voice-preparation code on these weights.
    import soundfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wyoming_chatterbox.chatterbox.multilingual import load_multilingual_model

    model = load_multilingual_model(out, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "voice.wav"
        soundfile.write(
            str(clip), synthetic_voice(seconds=MTL_VOICE_SECONDS), SAMPLE_RATE
        )
        model.prepare_conditionals(str(clip))
    model.conds.save(out / "conds.pt")
    print(
        f"Wrote a random-weight {'full-size' if full else 'tiny'} Chatterbox "
        f"Multilingual checkpoint to {out} in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--full",
        action="store_true",
        help="full-size T3 (GPT-2 medium; the released Llama with --multilingual) "
        "for benchmarks",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--multilingual",
        action="store_true",
        help="a Chatterbox Multilingual checkpoint (ResembleAI/chatterbox files)",
    )
    kind.add_argument(
        "--nano",
        action="store_true",
        help="a Chatterbox Nano checkpoint (ResembleAI/chatterbox-nano files), "
        "T3 at Nano's released size (GPT-2 small)",
    )
    parser.add_argument(
        "--multilingual-version",
        choices=("v2", "v3"),
        default="v3",
        help="with --multilingual: the T3 file's version (default: v3)",
    )
    parser.add_argument(
        "--shared-from",
        type=Path,
        metavar="DIR",
        help="Turbo or Nano: link the files that do not depend on T3 from the "
        "checkpoint in DIR instead of making them",
    )
    args = parser.parse_args()
    if args.multilingual:
        build_multilingual(args.directory, args.full, args.multilingual_version)
    else:
        build(args.directory, args.full, args.nano, args.shared_from)


if __name__ == "__main__":
    main()
