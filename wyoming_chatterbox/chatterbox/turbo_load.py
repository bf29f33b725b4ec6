"""Loading Chatterbox Turbo and Nano: their files, and the model from a folder.

Turbo and Nano are the same model but for T3's size (GPT-2 medium, GPT-2 small)
and files; a `Variant` says which. chatterbox 0.1.7's from_local knows only
Turbo, so `load_turbo_model` runs its steps itself for either, at the T3 size
the weights have (a random-weight test checkpoint is smaller). What to download
(`Variant.allow_patterns`) is exactly what the loader opens.
"""

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .base import quiet
from .loading import llama_config_as, load_weights, no_random_init

# Files every GPT-2 Chatterbox (Turbo, Nano) opens besides its T3 weights.
VOICE_ENCODER_FILE = "ve.safetensors"
S3GEN_FILE = "s3gen_meanflow.safetensors"
BUILTIN_VOICE_FILE = "conds.pt"
# What AutoTokenizer.from_pretrained may read from a GPT-2 tokenizer folder
# (the released repositories hold all but tokenizer.json; the test checkpoint
# has tokenizer.json and tokenizer_config.json). tests/test_download.py checks
# these against transformers' own names.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
)
TEXT_VOCAB = 50276


@dataclasses.dataclass(frozen=True)
class Variant:
    """What tells the GPT-2 Chatterboxes apart: the repository, T3's weights and
    T3's released size; everything else (S3Gen, the voice encoder, the
    tokenizer, the built-in voice) is the same kind of file."""

    kind: str  # --model
    model_name: str
    repo_id: str
    t3_weights: str
    config_name: str  # the LLAMA_CONFIGS entry T3Config names
    size: Tuple[Tuple[str, int], ...]  # over GPT-2 medium's config

    @property
    def model_files(self) -> Tuple[str, ...]:
        """The weights the loader must find."""
        return (VOICE_ENCODER_FILE, self.t3_weights, S3GEN_FILE)

    @property
    def allow_patterns(self) -> Tuple[str, ...]:
        """What to download: exactly what load_turbo_model opens. Not the
        repositories' 1 GB s3gen.safetensors, which these models never open."""
        return (*self.model_files, BUILTIN_VOICE_FILE, *TOKENIZER_FILES)

    def released_config(self) -> Optional[Dict[str, Any]]:
        """T3's GPT-2 config as released, where chatterbox 0.1.7's table lacks
        it (it knows GPT-2 medium only: Nano's GPT-2 small is medium's with its
        own size); None: the table's own."""
        from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

        if not self.size:
            return None
        size = dict(self.size)
        if "n_embd" in size:
            size["hidden_size"] = size["n_embd"]
        return dict(LLAMA_CONFIGS["GPT2_medium"], **size)


TURBO = Variant(
    "turbo",
    "Chatterbox Turbo",
    "ResembleAI/chatterbox-turbo",
    "t3_turbo_v1.safetensors",
    "GPT2_medium",
    (),
)
# Nano (July 2026): Turbo with GPT-2 small (12 layers, width 768, 12 heads).
NANO = Variant(
    "nano",
    "Chatterbox Nano",
    "ResembleAI/chatterbox-nano",
    "t3_nano_v1.safetensors",
    "GPT2_small",
    (("n_layer", 12), ("n_embd", 768), ("n_head", 12)),
)
VARIANTS = (TURBO, NANO)
# The Turbo names other modules and older callers use.
REPO_ID = TURBO.repo_id
T3_WEIGHTS = TURBO.t3_weights
MODEL_FILES = TURBO.model_files
ALLOW_PATTERNS = TURBO.allow_patterns


def variant_in(ckpt_dir: Path) -> Variant:
    """The variant whose T3 weights the folder holds (Turbo's first)."""
    for variant in VARIANTS:
        if (ckpt_dir / variant.t3_weights).is_file():
            return variant
    return TURBO


def _t3_size(path: Path) -> Dict[str, Any]:
    """T3's GPT-2 size from its weights: layers from the key names, width and
    positions from the position embedding; heads are 64 wide, as in GPT-2."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        n_positions, n_embd = f.get_slice("tfmr.wpe.weight").get_shape()
    n_layer = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("tfmr.h."))
    return {
        "n_layer": n_layer,
        "n_embd": n_embd,
        "hidden_size": n_embd,
        "n_head": max(1, n_embd // 64),
        "n_positions": n_positions,
        "n_ctx": n_positions,
    }


def load_turbo_model(
    ckpt_dir: Path, device: str, variant: Optional[Variant] = None
) -> Any:
    """A ChatterboxTurboTTS from a folder of Turbo's or Nano's files (default:
    whichever T3 the folder holds), at the T3 size the weights have.

    The steps of ChatterboxTurboTTS.from_local (chatterbox 0.1.7), which knows
    only Turbo's T3 file and size; the built-in voice (conds.pt) is left in
    `model.conds`, None when the folder has none.
    """
    variant = variant or variant_in(ckpt_dir)
    t3_path = ckpt_dir / variant.t3_weights
    with llama_config_as(
        variant.config_name, _t3_size(t3_path), ckpt_dir, variant.released_config()
    ), quiet():
        return _from_local(ckpt_dir, device, variant)


def _from_local(ckpt_dir: Path, device: str, variant: Variant) -> Any:
    import torch
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.tts_turbo import ChatterboxTurboTTS, Conditionals
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    hp = T3Config(text_tokens_dict_size=TEXT_VOCAB)
    hp.llama_config_name = variant.config_name
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    with no_random_init():
        ve, t3, s3gen = VoiceEncoder(), T3(hp), S3Gen(meanflow=True)
    load_weights(ve, load_file(ckpt_dir / VOICE_ENCODER_FILE))
    ve.to(device).eval()
    t3_state: Any = load_file(ckpt_dir / variant.t3_weights)
    if "model" in t3_state:
        t3_state = t3_state["model"][0]
    load_weights(t3, t3_state)
    del t3.tfmr.wte  # T3 embeds text and speech itself
    t3.to(device).eval()
    load_weights(s3gen, load_file(ckpt_dir / S3GEN_FILE))
    s3gen.to(device).eval()

    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    conds = None
    builtin_voice = ckpt_dir / BUILTIN_VOICE_FILE
    if builtin_voice.exists():
        map_location = torch.device("cpu") if device == "cpu" else None
        conds = Conditionals.load(builtin_voice, map_location=map_location)
        conds = conds.to(device)
    return ChatterboxTurboTTS(t3, s3gen, ve, tokenizer, device, conds=conds)
