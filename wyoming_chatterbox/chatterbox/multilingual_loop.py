"""Chatterbox Multilingual speaking one sentence group, the library's steps.

`ChatterboxMultilingualTTS.generate` is not called: `generate` here runs the
same steps (punc_norm -> MTL tokenizer with the language tag -> T3 with
classifier-free guidance -> S3Gen -> watermark) with the voice's conditionals
as an argument (the shared `model.conds` is never read or written), a stop
check before every speech token and a token budget. docs/design.md lists how
the T3 loop differs from upstream's `T3.inference` (none changes the sampled
tokens; the tests compare both from the same seed). Worker thread only.
"""

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..audio import SAMPLE_RATE
from ..speech import Budget, SamplingParams
from .base import MAX_SPEECH_TOKENS, SPEECH_VOCAB_REAL, quiet
from .sampling import MULTILINGUAL_ORDER, logits_processors

_LOGGER = logging.getLogger(__name__)

# Upstream's alignment analyzer needs more text tokens than this (start and stop
# tokens included).
ANALYZER_MIN_TEXT_TOKENS = 8

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


# Long: the library's generate, step by step, in one piece to compare.
def generate(
    model: Any,
    conds: Any,
    text: str,
    language: str,
    params: SamplingParams,
    budget: Budget = Budget(),
) -> Tuple[np.ndarray, int, bool]:
    """Speak one sentence group in `language` with the voice `conds`.

    Returns (float32 mono audio at 24 kHz, watermarked; the number of speech tokens
    T3 generated, the stop token not counted; whether the budget's `max_tokens`
    cut the speech short). The audio has SAMPLES_PER_TOKEN (960) samples per
    generated token. Checks the budget before every speech token and once more before
    vocoding (SynthesisCancelled). `conds` is not modified. Empty text gives
    empty audio (upstream would speak a canned sentence).
    """
    import torch
    import torch.nn.functional as F
    from chatterbox.models.s3tokenizer import drop_invalid_tokens
    from chatterbox.mtl_tts import punc_norm

    language = _language_or_error(language)
    max_tokens = MAX_SPEECH_TOKENS if budget.max_tokens is None else budget.max_tokens
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
            t3, t3_cond, text_tokens, params, budget.check, max_tokens
        )
        budget.check()

        n_tokens = int(tokens.numel())
        speech = drop_invalid_tokens(tokens)
        speech = speech[speech < SPEECH_VOCAB_REAL]
        if speech.numel() == 0:
            return np.zeros(0, dtype=np.float32), n_tokens, truncated
        # S3Gen casts the reference dict's tensors in place: give it a copy.
        # It also print()s: keep that out of stdout.
        with quiet():
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


# Long: upstream's analyzer with its hooks kept removable.
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


# Long: upstream's T3.inference step by step, kept in one piece to compare.
def _speech_tokens(
    t3: Any,
    t3_cond: Any,
    text_tokens: Any,
    params: SamplingParams,
    check: Callable[[], None],
    max_tokens: int,
) -> Tuple[Any, bool]:
    """T3.inference's loop, with `check()` (which raises to stop) before every
    token, and at most `max_tokens` tokens.

    `text_tokens` is (1, L) with start and stop text tokens. Returns the generated
    speech tokens (1-D, the stop token not included) and whether the budget ended
    the loop before the model chose to stop.
    """
    import torch

    hp = t3.hp
    device = text_tokens.device
    cfg_weight = float(params.cfg_weight)
    # Row 0 conditional, row 1 without text (prepare_input_embeds zeroes it).
    batch = 2 if cfg_weight > 0 else 1
    text_tokens = text_tokens.expand(batch, -1)
    budget = min(max_tokens, hp.max_speech_tokens)

    processors = logits_processors(params, MULTILINGUAL_ORDER)
    temperature = float(params.temperature)

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
            check()
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
