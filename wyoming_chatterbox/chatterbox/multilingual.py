"""Chatterbox Multilingual (23 languages): load the model, prepare a voice, speak.

Model-level functions for a backend to build on; they run on the engine's worker
thread. As for Turbo, `ChatterboxMultilingualTTS.generate` is not called: `generate`
here runs the same steps (punc_norm -> MTL tokenizer with the language tag -> T3
with classifier-free guidance -> S3Gen -> watermark) with the voice's conditionals
as an argument (the shared `model.conds` is never read or written), a stop check
before every speech token and a token budget.

The T3 loop is upstream's `T3.inference` (chatterbox-tts 0.1.7) step by step, with
the same logits processors in the same order and its AlignmentStreamAnalyzer (the
guard that holds back the stop token until the text is spoken and forces it on
repetition). Differences, none of which changes the sampled tokens (the tests
compare both from the same seed):

- the analyzer's attention hooks are removed after each call (upstream adds three
  more hooks to the model on every call) and the switch to eager attention, which
  the hooks need, lasts only for the call; attentions of the other layers are not
  collected;
- processors that would do nothing (top_p 1.0, min_p 0, repetition penalty 1.0)
  are skipped; top_k > 0 (no upstream setting) is applied after the temperature;
  temperature <= 0 means greedy decoding (upstream would divide by zero);
- with cfg_weight 0 the unconditional batch row is not run (upstream runs it and
  multiplies its logits by 0; the results agree up to float rounding);
- the loop ends at the budget without the extra forward pass upstream makes after
  its last token; speech-token ids S3Gen cannot vocode are dropped (upstream would
  fail on them).

Importing this module is cheap: torch and chatterbox are imported inside functions.
"""

import contextlib
import dataclasses
import io
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .backend import (
    MAX_SPEECH_TOKENS,
    SAMPLE_RATE,
    SPEECH_VOCAB_REAL,
    ChatterboxBackend,
)
from .download import ensure_model
from .engine import ModelLoadError, SamplingParams, SynthesisCancelled

_LOGGER = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox"
T3_WEIGHTS = "t3_mtl23ls_v2.safetensors"
TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
# Character -> Cangjie code table that the tokenizer uses to spell Chinese text.
CANGJIE_FILE = "Cangjie5_TC.json"
BUILTIN_VOICE_FILE = "conds.pt"
# What ChatterboxMultilingualTTS.from_pretrained fetches; from_local reads them all
# (the tokenizer reads the Cangjie table for Chinese).
MODEL_FILES = (
    "ve.pt",
    T3_WEIGHTS,
    "s3gen.pt",
    TOKENIZER_FILE,
    CANGJIE_FILE,
    BUILTIN_VOICE_FILE,
)

# S3Gen makes 960 samples (40 ms at 24 kHz) per speech token.
SAMPLES_PER_TOKEN = 960
# Upstream's alignment analyzer needs more text tokens than this (start and stop
# tokens included).
ANALYZER_MIN_TEXT_TOKENS = 8
# Shorter reference clips are refused (upstream sets no minimum; S3Gen uses the
# first 10 s of a clip, T3's prompt the first 6 s).
MIN_CLIP_SECONDS = 1.0

# chatterbox.mtl_tts.SUPPORTED_LANGUAGES (a test checks that they agree).
LANGUAGES: Dict[str, str] = {
    "ar": "Arabic",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "ms": "Malay",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sv": "Swedish",
    "sw": "Swahili",
    "tr": "Turkish",
    "zh": "Chinese",
}
# Other codes for the same languages: Norwegian Bokmål / Nynorsk, old Hebrew,
# Mandarin, Standard Malay.
_ALIASES = {"nb": "no", "nn": "no", "iw": "he", "cmn": "zh", "zsm": "ms"}

# ChatterboxMultilingualTTS.generate's defaults; top_k is not used upstream (0: off).
DEFAULT_PARAMS = SamplingParams(
    temperature=0.8,
    top_k=0,
    top_p=1.0,
    repetition_penalty=2.0,
    min_p=0.05,
    exaggeration=0.5,
    cfg_weight=0.5,
)

# T3 size of the released weights (chatterbox's LLAMA_CONFIGS["Llama_520M"]).
_LLAMA_CONFIG_NAME = "Llama_520M"
_LOAD_LOCK = threading.Lock()


def normalise_language(code: str) -> Optional[str]:
    """The model's code for a language tag ("de", "DE", "de-DE", "de_DE", "nb-NO",
    "zh-Hans" ...), or None when the model does not speak it."""
    primary = code.strip().replace("_", "-").split("-", 1)[0].lower()
    primary = _ALIASES.get(primary, primary)
    return primary if primary in LANGUAGES else None


def _language_or_error(code: str) -> str:
    language = normalise_language(code)
    if language is None:
        raise ValueError(
            f"Chatterbox Multilingual cannot speak the language '{code}'; it speaks "
            f"{', '.join(sorted(LANGUAGES))}."
        )
    return language


# --- Loading ---------------------------------------------------------------------


@contextlib.contextmanager
def _t3_size_of(ckpt_dir: Path) -> Iterator[None]:
    """Make `from_local` build T3 at the size its weights have.

    from_local always builds the released Llama (30 layers, width 1024). A
    random-weight test checkpoint holds a smaller one; the tensors tell its size
    (layers from the key names, widths from the shapes). The head width is not in
    the shapes: it is 64 unless the file's metadata says otherwise ("head_dim").
    The shared config entry is swapped only while loading, under _LOAD_LOCK.
    """
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from safetensors import safe_open

    path = ckpt_dir / T3_WEIGHTS
    released = LLAMA_CONFIGS[_LLAMA_CONFIG_NAME]
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata() or {}
            hidden = f.get_slice("text_emb.weight").get_shape()[1]
            layer0 = "tfmr.layers.0."
            q_out = f.get_slice(layer0 + "self_attn.q_proj.weight").get_shape()[0]
            kv_out = f.get_slice(layer0 + "self_attn.k_proj.weight").get_shape()[0]
            ffn = f.get_slice(layer0 + "mlp.gate_proj.weight").get_shape()[0]
        layers = 1 + max(
            int(k.split(".")[2]) for k in keys if k.startswith("tfmr.layers.")
        )
        head_dim = int(metadata.get("head_dim", released["head_dim"]))
    except Exception as err:
        raise ModelLoadError(
            f"{path} is not a Chatterbox Multilingual T3 ({type(err).__name__}: "
            f"{err}); delete it to download again, or use another --model-dir."
        ) from err

    size = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": q_out // head_dim,
        "num_key_value_heads": kv_out // head_dim,
        "head_dim": head_dim,
    }
    if all(released[key] == value for key, value in size.items()):
        yield
        return
    _LOGGER.warning(
        "T3 in %s is not the released size (%s layers, width %s): "
        "this is a test checkpoint and will not speak words",
        ckpt_dir,
        layers,
        hidden,
    )
    LLAMA_CONFIGS[_LLAMA_CONFIG_NAME] = dict(released, **size)
    try:
        yield
    finally:
        LLAMA_CONFIGS[_LLAMA_CONFIG_NAME] = released


def _local_hub_file(
    repo_id: str, filename: str, cache_dir: Any = None, **_: Any
) -> str:
    """Stands in for hf_hub_download in the tokenizer while loading: the file from
    the model folder (the tokenizer passes that folder as cache_dir), no network."""
    path = Path(cache_dir or ".") / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return str(path)


def _chinese_segmenter(pkuseg_home: Optional[Path]) -> Any:
    """pkuseg's word segmenter for Chinese, or None (with a warning) when its model
    (spacy_ontonotes, fetched from GitHub on first use) cannot be had."""
    try:
        from huggingface_hub import constants
        from spacy_pkuseg import pkuseg
        from spacy_pkuseg.config import config
    except ImportError:
        _LOGGER.warning("spacy-pkuseg is not installed: Chinese words run together")
        return None
    home = str(pkuseg_home) if pkuseg_home is not None else config.pkuseg_home
    cached = os.path.isfile(os.path.join(home, "spacy_ontonotes.zip"))
    if not cached and constants.HF_HUB_OFFLINE:
        _LOGGER.warning(
            "Chinese word segmentation is off: its model is not in %s and "
            "HF_HUB_OFFLINE is set",
            home,
        )
        return None
    previous = config.pkuseg_home
    config.pkuseg_home = home
    try:
        return pkuseg()
    except Exception as err:  # pylint: disable=broad-except
        _LOGGER.warning(
            "Chinese word segmentation is off: pkuseg could not load its model "
            "into %s (%s: %s)",
            home,
            type(err).__name__,
            err,
        )
        return None
    finally:
        config.pkuseg_home = previous


@contextlib.contextmanager
def _tokenizer_offline(pkuseg_home: Optional[Path]) -> Iterator[None]:
    """While loading, make MTLTokenizer read the Cangjie table from the model folder
    instead of downloading it from the hub into a cache inside that folder, and make
    a missing pkuseg model a warning instead of a crash (upstream lets pkuseg's
    download error escape from from_local)."""
    from chatterbox.models.tokenizers import tokenizer as mtl_tokenizer

    converter = mtl_tokenizer.ChineseCangjieConverter
    saved = (mtl_tokenizer.hf_hub_download, converter._init_segmenter)

    def init_segmenter(self: Any) -> None:
        self.segmenter = _chinese_segmenter(pkuseg_home)

    mtl_tokenizer.hf_hub_download = _local_hub_file
    converter._init_segmenter = init_segmenter
    try:
        yield
    finally:
        mtl_tokenizer.hf_hub_download, converter._init_segmenter = saved


def load_multilingual_model(
    ckpt_dir: Path, device: str, pkuseg_home: Optional[Path] = None
) -> Any:
    """ChatterboxMultilingualTTS.from_local, at the T3 size the weights have.

    No network access: the Cangjie table comes from `ckpt_dir`. `pkuseg_home` is
    where the Chinese word segmenter's model is kept (default ~/.pkuseg, or
    $PKUSEG_HOME); without it, Chinese is spoken without word segmentation.
    The built-in voice (conds.pt) is left in `model.conds`, None when the folder
    has no conds.pt; every other file of MODEL_FILES must be there.
    """
    missing = [
        name
        for name in MODEL_FILES
        if name != BUILTIN_VOICE_FILE and not (ckpt_dir / name).is_file()
    ]
    if missing:
        raise ModelLoadError(
            f"The model folder {ckpt_dir} lacks {', '.join(missing)}; point "
            f"--model-dir at a complete copy of {REPO_ID} (multilingual files)."
        )
    from chatterbox.mtl_tts import ChatterboxMultilingualTTS

    # from_local and the watermarker print(); keep that out of stdout and the log.
    printed = io.StringIO()
    with _LOAD_LOCK, _t3_size_of(ckpt_dir), _tokenizer_offline(pkuseg_home):
        with contextlib.redirect_stdout(printed):
            model = ChatterboxMultilingualTTS.from_local(ckpt_dir, device)
    if printed.getvalue().strip():
        _LOGGER.debug("chatterbox said: %s", printed.getvalue().strip())
    return model


# --- Voices ----------------------------------------------------------------------


def prepare_conditionals(model: Any, clip_path: Path, exaggeration: float = 0.5) -> Any:
    """A voice from a reference clip: upstream's prepare_conditionals, returned as a
    new `chatterbox.mtl_tts.Conditionals` instead of stored in `model.conds`.

    Raises ValueError for a clip that cannot be read or is shorter than
    MIN_CLIP_SECONDS. Upstream sets no minimum (Turbo asks for more than 5 s); the
    first 6 s go into T3's prompt and the first 10 s into S3Gen, so 6-10 s of clean
    speech is what a good voice needs.
    """
    import librosa
    import torch
    from chatterbox.models.s3gen import S3GEN_SR
    from chatterbox.models.s3tokenizer import S3_SR
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.mtl_tts import Conditionals

    try:
        wav_24k, _ = librosa.load(str(clip_path), sr=S3GEN_SR)
    except Exception as err:
        raise ValueError(
            f"Could not read the voice clip {clip_path} ({type(err).__name__}: {err})"
        ) from err
    seconds = len(wav_24k) / S3GEN_SR
    if seconds < MIN_CLIP_SECONDS:
        raise ValueError(
            f"The voice clip {clip_path} is {seconds:.1f} s long; a voice needs at "
            f"least {MIN_CLIP_SECONDS:.0f} s of speech (6 to 10 s is best)."
        )
    wav_16k = librosa.resample(wav_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)

    device = model.device
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        gen = model.s3gen.embed_ref(
            wav_24k[: model.DEC_COND_LEN], S3GEN_SR, device=device
        )
        prompt_tokens = None
        prompt_len = model.t3.hp.speech_cond_prompt_len
        if prompt_len:
            prompt_tokens, _ = model.s3gen.tokenizer.forward(
                [wav_16k[: model.ENC_COND_LEN]], max_len=prompt_len
            )
            prompt_tokens = torch.atleast_2d(prompt_tokens).to(device)
        speaker = torch.from_numpy(
            model.ve.embeds_from_wavs([wav_16k], sample_rate=S3_SR)
        )
        speaker = speaker.mean(dim=0, keepdim=True).to(device)
        t3_cond = T3Cond(
            speaker_emb=speaker,
            cond_prompt_speech_tokens=prompt_tokens,
            emotion_adv=exaggeration * torch.ones(1, 1, 1),
        ).to(device=device)
    return Conditionals(t3_cond, gen)


# --- Speech ----------------------------------------------------------------------


def generate(
    model: Any,
    conds: Any,
    text: str,
    language: str,
    params: SamplingParams,
    should_stop: Callable[[], bool],
    max_tokens: int = MAX_SPEECH_TOKENS,
) -> Tuple[np.ndarray, int, bool]:
    """Speak one sentence group in `language` with the voice `conds`.

    Returns (float32 mono audio at 24 kHz, watermarked; the number of speech tokens
    T3 generated, the stop token not counted; whether the `max_tokens` budget cut
    the speech short). The audio has SAMPLES_PER_TOKEN samples per generated token.
    Calls `should_stop()` before every speech token and once more before vocoding;
    raises SynthesisCancelled when it returns true. `conds` is not modified.
    Empty text gives empty audio (upstream would speak a canned sentence).
    """
    import torch
    import torch.nn.functional as F
    from chatterbox.models.s3tokenizer import drop_invalid_tokens
    from chatterbox.mtl_tts import punc_norm

    language = _language_or_error(language)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    text = text.strip()
    if not text:
        return np.zeros(0, dtype=np.float32), 0, False

    t3 = model.t3
    hp = t3.hp
    with torch.inference_mode():
        text_tokens = model.tokenizer.text_to_tokens(
            punc_norm(text), language_id=language
        ).to(device=t3.device, dtype=torch.long)
        text_tokens = F.pad(text_tokens, (1, 0), value=hp.start_text_token)
        text_tokens = F.pad(text_tokens, (0, 1), value=hp.stop_text_token)
        if text_tokens.size(1) > hp.max_text_tokens + 2:
            raise ValueError(
                f"The text is {text_tokens.size(1)} tokens long; T3 takes at most "
                f"{hp.max_text_tokens + 2}: split it into shorter groups."
            )
        t3_cond = _t3_cond_for(conds.t3, params.exaggeration)
        tokens, truncated = _speech_tokens(
            t3, t3_cond, text_tokens, params, should_stop, max_tokens
        )
        if should_stop():
            raise SynthesisCancelled()

        n_tokens = int(tokens.numel())
        speech = drop_invalid_tokens(tokens)
        speech = speech[speech < SPEECH_VOCAB_REAL]
        if speech.numel() == 0:
            return np.zeros(0, dtype=np.float32), n_tokens, truncated
        # S3Gen casts the reference dict's tensors in place: give it a copy.
        # It also print()s: keep that out of stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            wav, _ = model.s3gen.inference(
                speech_tokens=speech, ref_dict=dict(conds.gen)
            )
        wav = wav.squeeze(0).detach().float().cpu().numpy()

    audio = model.watermarker.apply_watermark(wav, sample_rate=SAMPLE_RATE)
    return np.asarray(audio, dtype=np.float32), n_tokens, truncated


def _t3_cond_for(cond: Any, exaggeration: float) -> Any:
    """A copy of the voice's T3Cond with the emotion value asked for (upstream
    generate replaces the T3Cond when the value differs). T3 caches the prompt's
    speech embedding into the object it gets: the copy, not the voice."""
    import torch

    speaker = cond.speaker_emb
    emotion = float(exaggeration) * torch.ones(
        1, 1, 1, dtype=speaker.dtype, device=speaker.device
    )
    return dataclasses.replace(cond, emotion_adv=emotion)


@contextlib.contextmanager
def _alignment_analyzer(
    t3: Any, text_slice: Tuple[int, int]
) -> Iterator[Optional[Any]]:
    """Upstream's AlignmentStreamAnalyzer for one call, or None when T3 lacks the
    attention heads it watches (small test checkpoints).

    The analyzer reads attention maps through forward hooks, which only eager
    attention provides; eager is used for this call only and the hooks go away
    after it.
    """
    from chatterbox.models.t3.inference.alignment_stream_analyzer import (
        LLAMA_ALIGNED_HEADS,
        AlignmentStreamAnalyzer,
    )

    tfmr = t3.tfmr
    config = tfmr.config
    n_layers = len(tfmr.layers)
    n_heads = config.num_attention_heads
    if any(layer >= n_layers or head >= n_heads for layer, head in LLAMA_ALIGNED_HEADS):
        _LOGGER.debug(
            "T3 has %s layers and %s heads: no alignment analyzer", n_layers, n_heads
        )
        yield None
        return
    if text_slice[1] - text_slice[0] <= ANALYZER_MIN_TEXT_TOKENS:
        # Upstream's repetition check slices off the last 5 text tokens and
        # fails on what is left of a very short text ("Ja.", "Hallo!").
        _LOGGER.debug(
            "Text of %s tokens: no alignment analyzer", text_slice[1] - text_slice[0]
        )
        yield None
        return

    handles: List[Any] = []

    class Analyzer(AlignmentStreamAnalyzer):
        def _add_attention_spy(
            self, tfmr: Any, buffer_idx: int, layer_idx: int, head_idx: int
        ) -> None:
            # Upstream's hook, with a handle kept; config left alone.
            def hook(module: Any, args: Any, output: Any) -> None:
                if isinstance(output, tuple) and len(output) > 1:
                    if output[1] is not None:
                        weights = output[1][0, head_idx]  # (T0, Ti), batch row 0
                        self.last_aligned_attns[buffer_idx] = weights.cpu()

            attention = tfmr.layers[layer_idx].self_attn
            handles.append(attention.register_forward_hook(hook))

    implementation = config._attn_implementation
    try:
        config._attn_implementation = "eager"
        yield Analyzer(
            tfmr,
            None,
            text_tokens_slice=text_slice,
            alignment_layer_idx=9,
            eos_idx=t3.hp.stop_speech_token,
        )
    finally:
        for handle in handles:
            handle.remove()
        config._attn_implementation = implementation


def _speech_tokens(
    t3: Any,
    t3_cond: Any,
    text_tokens: Any,
    params: SamplingParams,
    should_stop: Callable[[], bool],
    max_tokens: int,
) -> Tuple[Any, bool]:
    """T3.inference's loop, with a stop check before every token and a budget.

    `text_tokens` is (1, L) with start and stop text tokens. Returns the generated
    speech tokens (1-D, the stop token not included) and whether the budget ended
    the loop before the model chose to stop.
    """
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    hp = t3.hp
    device = text_tokens.device
    cfg_weight = float(params.cfg_weight)
    # Row 0 conditional, row 1 without text (prepare_input_embeds zeroes it).
    batch = 2 if cfg_weight > 0 else 1
    text_tokens = text_tokens.expand(batch, -1)
    budget = min(max_tokens, hp.max_speech_tokens)

    processors: List[Any] = []
    if params.repetition_penalty != 1.0:
        processors.append(
            RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))
        )
    temperature = float(params.temperature)
    if temperature > 0 and temperature != 1.0:
        processors.append(lambda ids, scores: scores / temperature)
    if params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.min_p > 0:
        processors.append(MinPLogitsWarper(min_p=params.min_p))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=params.top_p))

    embeds, len_cond = t3.prepare_input_embeds(
        t3_cond=t3_cond,
        text_tokens=text_tokens,
        speech_tokens=hp.start_speech_token * torch.ones_like(text_tokens[:, :1]),
        cfg_weight=cfg_weight,
    )
    # Upstream appends a second start token (at speech position 0) after the one
    # prepare_input_embeds already put there.
    bos = torch.tensor([[hp.start_speech_token]], dtype=torch.long, device=device)
    bos_embed = t3.speech_emb(bos) + t3.speech_pos_emb.get_fixed_embedding(0)
    embeds = torch.cat([embeds, bos_embed.expand(batch, -1, -1)], dim=1)

    cfg = torch.as_tensor(cfg_weight, dtype=embeds.dtype, device=device)
    text_slice = (len_cond, len_cond + text_tokens.size(1))
    # What the repetition penalty and the analyzer see: start token + generated.
    generated = bos
    truncated = False
    with _alignment_analyzer(t3, text_slice) as analyzer:
        output = t3.tfmr(inputs_embeds=embeds, use_cache=True)
        past = output.past_key_values
        for step in range(budget):
            if should_stop():
                raise SynthesisCancelled()
            step_logits = t3.speech_head(output.last_hidden_state[:, -1, :])
            logits = step_logits[0:1]
            if batch == 2:
                logits = logits + cfg * (logits - step_logits[1:2])
            if analyzer is not None:
                try:
                    logits = analyzer.step(logits, next_token=int(generated[0, -1]))
                except (IndexError, RuntimeError) as err:
                    # A guard that fails must not fail the speech.
                    _LOGGER.debug("Alignment analyzer off for this group: %s", err)
                    analyzer = None
            for processor in processors:
                logits = processor(generated, logits)
            if temperature > 0:
                probs = torch.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1)
            else:
                next_token = logits.argmax(dim=-1, keepdim=True)
            if int(next_token) == hp.stop_speech_token:
                break
            generated = torch.cat([generated, next_token], dim=1)
            if step + 1 == budget:
                truncated = True
                break
            embed = t3.speech_emb(next_token)
            embed = embed + t3.speech_pos_emb.get_fixed_embedding(step + 1)
            output = t3.tfmr(
                inputs_embeds=embed.expand(batch, -1, -1),
                past_key_values=past,
                use_cache=True,
            )
            past = output.past_key_values
    # A cut is logged once, by the backend, with the text it was for.
    return generated[0, 1:], truncated


# --- Backend ---------------------------------------------------------------------


class MultilingualBackend(ChatterboxBackend):
    """Chatterbox Multilingual on one device: every voice in each of its languages.

    Home Assistant sends only a voice name, so each voice is listed once per
    language as VOICE@LANGUAGE; a voice's `languages` setting narrows the list.
    """

    kind = "multilingual"
    model_name = "Chatterbox Multilingual"
    model_files = MODEL_FILES
    languages = LANGUAGES
    default_params = DEFAULT_PARAMS

    def _find_model(self) -> Path:
        return ensure_model(self._data_dir, REPO_ID, MODEL_FILES)

    def _load_model(self, ckpt_dir: Path) -> Any:
        # Upstream's alignment guard warns on every repeated token it sees.
        if not _LOGGER.isEnabledFor(logging.DEBUG):
            logging.getLogger(
                "chatterbox.models.t3.inference.alignment_stream_analyzer"
            ).setLevel(logging.ERROR)
        return load_multilingual_model(
            ckpt_dir, self.device, pkuseg_home=self._data_dir / "pkuseg"
        )

    def _voice_languages(self, wanted: Optional[Sequence[str]]) -> List[str]:
        if not wanted:
            return list(LANGUAGES)
        codes: List[str] = []
        for code in wanted:
            language = normalise_language(code)
            if language is None:
                self._warn_once(
                    "Chatterbox Multilingual does not speak %r; it speaks %s",
                    code,
                    ", ".join(LANGUAGES),
                )
            elif language not in codes:
                codes.append(language)
        return codes or list(LANGUAGES)

    def _entry_name(self, voice: str, language: str) -> str:
        return f"{voice}@{language}"

    def _language_code(self, language: str) -> str:
        return normalise_language(language) or language

    def _compute_conditionals(self, clip: Path) -> Any:
        return prepare_conditionals(
            self._model, clip, exaggeration=DEFAULT_PARAMS.exaggeration
        )

    def _load_cached(self, path: Path) -> Any:
        from chatterbox.mtl_tts import Conditionals

        return Conditionals.load(path, map_location=self.device).to(self.device)

    def _speak(
        self,
        text: str,
        conds: Any,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        max_tokens: int,
    ) -> Tuple[np.ndarray, int, bool]:
        return generate(
            self._model, conds, text, language, params, should_stop, max_tokens
        )
