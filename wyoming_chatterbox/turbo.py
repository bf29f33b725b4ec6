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
from typing import Any, Callable, Dict, Iterator, List, Optional

from .download import MODEL_FILES, ensure_model
from .engine import (
    ModelLoadError,
    Piece,
    SamplingParams,
    SpeechBackend,
    SynthesisCancelled,
    VoiceInfo,
)

_LOGGER = logging.getLogger(__name__)

BUILTIN_VOICE = "default"
SAMPLE_RATE = 24000
# T3's own hard cap (tqdm(range(1000)) upstream): about 40 s of speech per group.
MAX_SPEECH_TOKENS = 1000
# S3Gen speech-token ids at or above this are special (start 6561, stop 6562).
SPEECH_VOCAB_REAL = 6561
_CONFIG_LOCK = threading.Lock()


def resolve_device(requested: str) -> str:
    """auto -> cuda if available, else cpu; check that a named device exists."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {requested} was asked for, but PyTorch sees no CUDA GPU "
                "here; use --device cpu, or check the NVIDIA driver (and --gpus all "
                "in Docker)."
            )
        if requested.startswith("cuda:"):
            index_text = requested.split(":", 1)[1]
            count = torch.cuda.device_count()
            if not index_text.isdigit() or int(index_text) >= count:
                raise ModelLoadError(
                    f"--device {requested} does not exist: this machine has {count} "
                    f"CUDA device(s), cuda:0 to cuda:{count - 1}."
                )
        return requested
    raise ModelLoadError(
        f"--device {requested} is not known; use auto, cpu, cuda or cuda:N."
    )


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


class TurboBackend(SpeechBackend):
    """Chatterbox Turbo (English) on one device."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model_dir: Optional[Path],
        data_dir: Path,
        device: str = "auto",
    ) -> None:
        self._model_dir = model_dir
        self._data_dir = data_dir
        self._device_request = device
        self.device = "cpu"
        self._model: Any = None
        self._voices: Dict[str, Any] = {}  # name -> Conditionals

    def load(self) -> None:
        import torch

        started = time.monotonic()
        self.device = resolve_device(self._device_request)
        ckpt_dir = self._model_dir or ensure_model(self._data_dir)
        try:
            self._model = load_turbo_model(ckpt_dir, self.device)
        except ModelLoadError:
            raise
        except Exception as err:
            raise ModelLoadError(
                f"Could not load the Chatterbox Turbo model from {ckpt_dir} "
                f"({type(err).__name__}: {err}); the files may be damaged: delete "
                "them to download again, or use another --model-dir."
            ) from err

        conds = self._model.conds
        if conds is None:
            raise ModelLoadError(
                f"The model folder {ckpt_dir} has no conds.pt (the built-in voice); "
                "use a complete copy of ResembleAI/chatterbox-turbo."
            )
        # Nothing reads the shared model.conds: every call passes its voice's own.
        self._model.conds = None
        self._voices[BUILTIN_VOICE] = self._prepare_voice(conds)

        if self.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        _LOGGER.info(
            "Loaded Chatterbox Turbo from %s on %s in %.1f s",
            ckpt_dir,
            self.device,
            time.monotonic() - started,
        )

    def _prepare_voice(self, conds: Any) -> Any:
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

    def voices(self) -> List[VoiceInfo]:
        return [
            VoiceInfo(
                name=BUILTIN_VOICE,
                description="Chatterbox Turbo built-in voice",
                languages=["en"],
            )
        ]

    def close(self) -> None:
        import torch

        self._model = None
        self._voices.clear()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def synthesize(
        self,
        text: str,
        voice: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[Piece]:
        import torch
        from chatterbox.models.s3gen.const import S3GEN_SIL
        from chatterbox.tts_turbo import punc_norm

        model = self._model
        conds = self._voices[voice]
        text = text.strip()
        if not text:
            # punc_norm would speak a canned sentence for empty text.
            return

        with torch.inference_mode():
            text_tokens = model.tokenizer(
                punc_norm(text), return_tensors="pt", padding=True, truncation=True
            ).input_ids.to(self.device)
            started = time.monotonic()
            speech_tokens = self._generate_speech_tokens(
                dataclasses.replace(conds.t3), text_tokens, params, should_stop
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
        yield Piece(audio=audio.astype("float32", copy=False), tokens=n_tokens)

    def _generate_speech_tokens(
        self,
        t3_cond: Any,
        text_tokens: Any,
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Any:
        """T3.inference_turbo's loop, with a stop check before every token."""
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
        for _ in range(MAX_SPEECH_TOKENS):
            if should_stop():
                raise SynthesisCancelled()
            scores = processors(history, logits[:, -1, :])
            next_token = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1)
            if int(next_token) == stop_token:
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
        else:
            _LOGGER.warning(
                "Speech for a group reached the %s-token cap", MAX_SPEECH_TOKENS
            )
        return generated[0]
