"""Chatterbox Turbo as a SpeechBackend: load the model, speak a sentence group.

Runs only on the engine's worker thread. Instead of `ChatterboxTurboTTS.generate`
it calls the same steps itself (punc_norm -> tokenizer -> T3 -> S3Gen -> watermark)
so that each call takes its voice's conditionals as arguments (the shared
`model.conds` is never used), checks the stop flag before every speech token, and
counts the tokens it generated. Loading uses the library's own `from_local`.
"""

import contextlib
import dataclasses
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .backend import MAX_SPEECH_TOKENS, SPEECH_VOCAB_REAL, ChatterboxBackend
from .download import MODEL_FILES, ensure_model
from .engine import ModelLoadError, SamplingParams, SynthesisCancelled

_LOGGER = logging.getLogger(__name__)

_CONFIG_LOCK = threading.Lock()


@contextlib.contextmanager
def _t3_size_of(ckpt_dir: Path) -> Iterator[None]:
    """Make `from_local` build T3 at the size its weights have.

    from_local always builds GPT-2 medium; a random-weight test checkpoint may hold
    a smaller T3. The weights tell the size: layers from the key names, width and
    positions from the position embedding; heads are 64 wide as in every GPT-2.
    The shared config entry is swapped only while loading, under a lock.
    """
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from safetensors import safe_open

    with safe_open(str(ckpt_dir / "t3_turbo_v1.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        n_positions, n_embd = f.get_slice("tfmr.wpe.weight").get_shape()
    n_layer = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("tfmr.h."))

    with _CONFIG_LOCK:
        medium = LLAMA_CONFIGS["GPT2_medium"]
        size = (medium["n_layer"], medium["n_embd"], medium["n_positions"])
        if (n_layer, n_embd, n_positions) == size:
            yield
            return
        _LOGGER.warning(
            "T3 in %s is not the released size (%s layers, width %s): "
            "this is a test checkpoint and will not speak words",
            ckpt_dir,
            n_layer,
            n_embd,
        )
        LLAMA_CONFIGS["GPT2_medium"] = dict(
            medium,
            n_layer=n_layer,
            n_embd=n_embd,
            hidden_size=n_embd,
            n_head=max(1, n_embd // 64),
            n_positions=n_positions,
            n_ctx=n_positions,
        )
        try:
            yield
        finally:
            LLAMA_CONFIGS["GPT2_medium"] = medium


def load_turbo_model(ckpt_dir: Path, device: str) -> Any:
    """ChatterboxTurboTTS.from_local, at the T3 size the weights have."""
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    missing = [name for name in MODEL_FILES if not (ckpt_dir / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"The model folder {ckpt_dir} lacks {', '.join(missing)}; point "
            "--model-dir at a complete copy of ResembleAI/chatterbox-turbo."
        )
    # from_local and the watermarker print(); keep that out of stdout and the log.
    printed = io.StringIO()
    with _t3_size_of(ckpt_dir), contextlib.redirect_stdout(printed):
        model = ChatterboxTurboTTS.from_local(ckpt_dir, device)
    if printed.getvalue().strip():
        _LOGGER.debug("chatterbox said: %s", printed.getvalue().strip())
    return model


class TurboBackend(ChatterboxBackend):
    """Chatterbox Turbo (English) on one device."""

    kind = "turbo"
    model_name = "Chatterbox Turbo"
    model_files = MODEL_FILES
    languages = {"en": "English"}

    def _find_model(self) -> Path:
        return ensure_model(self._data_dir)

    def _load_model(self, ckpt_dir: Path) -> Any:
        return load_turbo_model(ckpt_dir, self.device)

    def _voice_languages(self, wanted: Optional[Sequence[str]]) -> List[str]:
        if wanted and not any(code.lower().startswith("en") for code in wanted):
            self._warn_once(
                "Chatterbox Turbo speaks English only, not %s; use --model "
                "multilingual for other languages",
                ", ".join(wanted),
            )
        return ["en"]

    def _compute_conditionals(self, clip: Path) -> Any:
        model = self._model
        # The library's own steps (loudness normalisation included); its
        # result lands in model.conds, which nothing else reads.
        with contextlib.redirect_stdout(io.StringIO()):
            model.prepare_conditionals(str(clip), exaggeration=0.0)
        conds, model.conds = model.conds, None
        return conds

    def _ready_conditionals(self, conds: Any) -> Any:
        """Precompute what T3 would otherwise cache into the conditionals on the
        first call, so that calls only read them."""
        import torch

        t3 = self._model.t3
        with torch.inference_mode():
            if conds.t3.cond_prompt_speech_emb is None:
                conds.t3.cond_prompt_speech_emb = t3.speech_emb(
                    conds.t3.cond_prompt_speech_tokens
                )
        return conds

    def _speak(
        self,
        text: str,
        conds: Any,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        max_tokens: int,
    ) -> Tuple[np.ndarray, int, bool]:
        import torch
        from chatterbox.models.s3gen.const import S3GEN_SIL
        from chatterbox.tts_turbo import punc_norm

        model = self._model
        with torch.inference_mode():
            text_tokens = model.tokenizer(
                punc_norm(text), return_tensors="pt", padding=True, truncation=True
            ).input_ids.to(self.device)
            started = time.monotonic()
            speech_tokens, cut = self._generate_speech_tokens(
                dataclasses.replace(conds.t3),
                text_tokens,
                params,
                should_stop,
                max_tokens,
            )
            t3_seconds = time.monotonic() - started
            if should_stop():
                raise SynthesisCancelled()

            n_tokens = int(speech_tokens.numel())
            speech_tokens = speech_tokens[speech_tokens < SPEECH_VOCAB_REAL]
            silence = torch.full(
                (3,), S3GEN_SIL, dtype=torch.long, device=speech_tokens.device
            )
            speech_tokens = torch.cat([speech_tokens, silence])
            # S3Gen casts the reference dict's tensors in place: give it a copy.
            # It also print()s a line per call: keep that out of the log.
            with contextlib.redirect_stdout(io.StringIO()):
                wav, _ = model.s3gen.inference(
                    speech_tokens=speech_tokens,
                    ref_dict=dict(conds.gen),
                    n_cfm_timesteps=2,
                )
            wav = wav.squeeze(0).detach().float().cpu().numpy()

        audio = model.watermarker.apply_watermark(wav, sample_rate=self.sample_rate)
        _LOGGER.debug(
            "Group of %s chars: %s speech tokens in %.2f s, %.2f s of audio",
            len(text),
            n_tokens,
            t3_seconds,
            len(audio) / self.sample_rate,
        )
        return audio, n_tokens, cut

    def _generate_speech_tokens(
        self,
        t3_cond: Any,
        text_tokens: Any,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        max_tokens: int = MAX_SPEECH_TOKENS,
    ) -> Tuple[Any, bool]:
        """T3.inference_turbo's loop, with a stop check before every token and
        at most `max_tokens` tokens; also says whether that cap cut it short."""
        import torch
        import torch.nn.functional as F
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        t3 = self._model.t3
        processors = LogitsProcessorList()
        if params.temperature > 0 and params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.repetition_penalty != 1.0:
            processors.append(
                RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
            )

        stop_token = t3.hp.stop_speech_token
        history = t3.hp.start_speech_token * torch.ones_like(text_tokens[:, :1])
        embeds, _ = t3.prepare_input_embeds(
            t3_cond=t3_cond,
            text_tokens=text_tokens,
            speech_tokens=history,
            cfg_weight=0.0,
        )
        outputs = t3.tfmr(inputs_embeds=embeds, use_cache=True)
        past = outputs.past_key_values
        logits = t3.speech_head(outputs[0][:, -1:])

        # `history` is what the repetition penalty sees: the start token at the
        # first step, then the generated tokens only, as upstream.
        generated = torch.zeros((1, 0), dtype=torch.long, device=text_tokens.device)
        cut = True
        for _ in range(min(max_tokens, MAX_SPEECH_TOKENS)):
            if should_stop():
                raise SynthesisCancelled()
            scores = processors(history, logits[:, -1, :])
            next_token = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1)
            if int(next_token) == stop_token:
                cut = False
                break
            generated = torch.cat([generated, next_token], dim=1)
            history = generated
            outputs = t3.tfmr(
                inputs_embeds=t3.speech_emb(next_token),
                past_key_values=past,
                use_cache=True,
            )
            past = outputs.past_key_values
            logits = t3.speech_head(outputs[0])
        return generated[0], cut
