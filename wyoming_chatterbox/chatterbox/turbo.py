"""Chatterbox Turbo as a SpeechBackend: load the model, speak a sentence group.

Instead of `ChatterboxTurboTTS.generate` it runs the same steps itself
(punc_norm -> tokenizer -> T3 -> S3Gen -> watermark) so that each call takes its
voice's conditionals as arguments (the shared `model.conds` is never used),
checks the stop flag before every speech token and can hand tokens to S3Gen in
pieces. The fast path (settings.FastPath) picks the parts: our static-cache T3
decoder (t3_decoder) or the library's loop (library_loop), S3Gen in pieces
(s3stream), the watermark on its own thread (watermark); self_check builds
them for the device and checks them there. Worker thread only.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Tuple

import numpy as np

from ..settings import BUILTIN_VOICE, ModelSettings
from ..speech import NOTHING_YET, FastPathState, GroupStats, Piece, SpeechJob
from ..voices import Languages
from .base import (
    MAX_SPEECH_TOKENS,
    SPEECH_VOCAB_REAL,
    ChatterboxBackend,
    llama_config_as,
    quiet,
)
from .download import ensure_model

_LOGGER = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox-turbo"
T3_WEIGHTS = "t3_turbo_v1.safetensors"
# Weights ChatterboxTurboTTS.from_local must find.
MODEL_FILES = ("ve.safetensors", T3_WEIGHTS, "s3gen_meanflow.safetensors")
BUILTIN_VOICE_FILE = "conds.pt"
# What to download: those, the built-in voice and the GPT-2 tokenizer files
# (vocab.json, merges.txt, *_config.json ...); not the repository's 1 GB
# s3gen.safetensors, which Turbo never opens.
ALLOW_PATTERNS = (*MODEL_FILES, BUILTIN_VOICE_FILE, "*.json", "*.txt", "*.model")
_GPT2_CONFIG = "GPT2_medium"


def _t3_size(ckpt_dir: Path) -> Dict[str, Any]:
    """T3's GPT-2 size from its weights: layers from the key names, width and
    positions from the position embedding; heads are 64 wide, as in GPT-2."""
    from safetensors import safe_open

    with safe_open(str(ckpt_dir / T3_WEIGHTS), framework="pt") as f:
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


def load_turbo_model(ckpt_dir: Path, device: str) -> Any:
    """ChatterboxTurboTTS.from_local, at the T3 size the weights have."""
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    with llama_config_as(_GPT2_CONFIG, _t3_size(ckpt_dir), ckpt_dir), quiet():
        return ChatterboxTurboTTS.from_local(ckpt_dir, device)


class EnglishOnly(Languages):
    """Turbo speaks English: a voice set to speak another language is warned
    about (once) and offered in English."""

    def for_voice(self, wanted: Optional[Sequence[str]]) -> List[str]:
        if wanted and not any(code.lower().startswith("en") for code in wanted):
            self.warn_once(
                "Chatterbox Turbo speaks English only, not %s; use --model "
                "multilingual for other languages",
                ", ".join(wanted),
            )
        return ["en"]


class TurboBackend(ChatterboxBackend):
    """Chatterbox Turbo (English) on one device."""

    kind = "turbo"
    model_name = "Chatterbox Turbo"
    repo_id = REPO_ID
    model_files = MODEL_FILES
    languages = {"en": "English"}

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(settings)
        self.fast = settings.fast
        self._decoder: Any = None
        # Voice prompt keys/values per voice: id(conds.t3) -> (conds.t3, prefix).
        self._prefixes: "collections.OrderedDict[int, Tuple[Any, Any]]" = (
            collections.OrderedDict()
        )
        self._marker: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # Audio in pieces within a group (the switch, unless the self-check
        # turned it off), and what runs, for the metrics.
        self._pieces = False
        self._fast_state: Optional[FastPathState] = None

    def _make_languages(self) -> Languages:
        return EnglishOnly(self.model_name, self.languages)

    def _find_model(self) -> Path:
        return ensure_model(self.settings.data_dir, REPO_ID, ALLOW_PATTERNS)

    def _load_model(self, ckpt_dir: Path) -> Any:
        from .self_check import prepare_fast_path

        model = load_turbo_model(ckpt_dir, self.device)
        # The decoder, its CUDA graphs, S3Gen in pieces: built and, on a GPU,
        # checked against the slower reference (self_check).
        setup = prepare_fast_path(model, self.fast, self.device)
        self._decoder, self._pieces = setup.decoder, setup.pieces
        self._fast_state = setup.state
        if self.fast.async_watermark:
            self._marker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="chatterbox-watermark"
            )
        _LOGGER.info("Speed settings: %s", setup.line)
        return model

    def fast_path(self) -> Optional[FastPathState]:
        return self._fast_state

    @property
    def batch_size(self) -> int:
        return self._decoder.max_batch if self._decoder is not None else 1

    def warm_up(self) -> None:
        super().warm_up()
        if self._pieces:
            # One-shot replies take the whole-group path (one S3Gen call).
            job = SpeechJob("Warming up.", BUILTIN_VOICE, "en", whole=True)
            for _ in self.speak(dataclasses.replace(job, params=self.default_params)):
                pass

    def close(self) -> None:
        self._fast_state = None
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._prefixes.clear()
        if self._marker is not None:
            self._marker.shutdown(wait=True)
            self._marker = None
        super().close()

    def _compute_conditionals(self, clip: Path) -> Any:
        model = self.model
        # The library's own steps (loudness normalisation included); its
        # result lands in model.conds, which nothing else reads.
        with quiet():
            model.prepare_conditionals(str(clip), exaggeration=0.0)
        conds, model.conds = model.conds, None
        return conds

    def _ready_conditionals(self, conds: Any) -> Any:
        """Precompute what T3 would otherwise cache into the conditionals on the
        first call, so that calls only read them."""
        import torch

        with torch.inference_mode():
            if conds.t3.cond_prompt_speech_emb is None:
                conds.t3.cond_prompt_speech_emb = self.model.t3.speech_emb(
                    conds.t3.cond_prompt_speech_tokens
                )
        return conds

    def _prefix_for(self, t3_cond: Any) -> Any:
        """The decoder's keys and values of a voice's prompt, made once."""
        entry = self._prefixes.get(id(t3_cond))
        if entry is not None and entry[0] is t3_cond:
            self._prefixes.move_to_end(id(t3_cond))
            return entry[1]
        prefix = self._decoder.prefix(t3_cond)
        self._prefixes[id(t3_cond)] = (t3_cond, prefix)
        while len(self._prefixes) > 8:  # ~37 MB each at full size in bf16
            self._prefixes.popitem(last=False)
        return prefix

    def _generation(self, job: SpeechJob, conds: Any, text_tokens: Any) -> Any:
        if self._decoder is not None:
            prefix = self._prefix_for(conds.t3)
            return self._decoder.generate(prefix, text_tokens, job.params, job.budget)
        from .library_loop import LibraryGeneration

        return LibraryGeneration(
            self.model.t3,
            dataclasses.replace(conds.t3),
            text_tokens,
            job.params,
            job.budget,
        )

    def _speak(
        self, job: SpeechJob, conds: Any, stats: GroupStats
    ) -> Generator[Piece, None, None]:
        import torch
        from chatterbox.tts_turbo import punc_norm

        with torch.inference_mode():
            text_tokens = self.model.tokenizer(
                punc_norm(job.text), return_tensors="pt", padding=True, truncation=True
            ).input_ids.to(self.device)
            generation = self._generation(job, conds, text_tokens)
        pieces: Optional[Generator[Piece, None, None]] = None
        try:
            # The prompt now, then the worker's turn: a group that waits may
            # begin too, and T3's next steps serve both (batch_size).
            generation.start()
            yield NOTHING_YET
            if not job.whole and self._pieces:
                pieces = self._stream_group(job, conds, generation, stats)
            else:
                pieces = self._whole_group(job, conds, generation, stats)
            yield from pieces
        finally:
            if pieces is not None:
                pieces.close()
            generation.close()
        stats.tokens = generation.n_tokens
        stats.cut = generation.cut
        stats.prefill_s = generation.prefill_s
        stats.decode_s = generation.decode_s
        if generation.steps:
            stats.t3_batch = generation.batched_steps / generation.steps

    def _s3gen(self, stats: GroupStats, step: Callable[[], Any], tokens: int) -> Any:
        """One S3Gen call, timed."""
        import torch

        started = time.monotonic()
        with torch.inference_mode():
            audio = step()
        stats.s3gen_s.append(time.monotonic() - started)
        stats.s3gen_tokens.append(tokens)
        return audio

    def _whole_group(
        self, job: SpeechJob, conds: Any, generation: Any, stats: GroupStats
    ) -> Generator[Piece, None, None]:
        """All the group's tokens, then S3Gen once, as upstream's generate."""
        import torch

        from .s3stream import S3GEN_SIL, SILENCE_TOKENS

        tokens: List[int] = []
        for block in generation:
            tokens.extend(t for t in block if t < SPEECH_VOCAB_REAL)
            yield NOTHING_YET  # other streams' work may go between T3 blocks
        job.budget.check()
        speech = tokens + [S3GEN_SIL] * SILENCE_TOKENS

        def decode() -> np.ndarray:
            # S3Gen casts the reference dict's tensors in place: give it a copy.
            # It also print()s a line per call: keep that out of the log.
            with quiet():
                wav, _ = self.model.s3gen.inference(
                    speech_tokens=torch.tensor(
                        speech, dtype=torch.long, device=self.device
                    ),
                    ref_dict=dict(conds.gen),
                    n_cfm_timesteps=2,
                )
            return wav.squeeze(0).detach().float().cpu().numpy()

        wav = self._s3gen(stats, decode, len(speech))
        started = time.monotonic()
        audio = self.model.watermarker.apply_watermark(
            wav, sample_rate=self.sample_rate
        )
        stats.watermark_s.append(time.monotonic() - started)
        yield Piece(audio=np.asarray(audio, dtype=np.float32), tokens=len(tokens))

    def _stream_group(
        self, job: SpeechJob, conds: Any, generation: Any, stats: GroupStats
    ) -> Generator[Piece, None, None]:
        """Audio while T3 goes on: S3Gen gets the first `first_piece_tokens`
        tokens, then pieces twice as long each time up to `max_piece_tokens`."""
        import torch

        from .s3stream import S3GenStreamer
        from .watermark import MarkingQueue, StreamWatermarker

        fast = self.fast
        with torch.inference_mode():
            streamer = S3GenStreamer(
                self.model.s3gen,
                conds.gen,
                n_cfm_timesteps=2,
                max_tokens=MAX_SPEECH_TOKENS,
            )
        marker = StreamWatermarker(self.model.watermarker, self.sample_rate)
        marks = MarkingQueue(marker, self._marker)
        pending: List[int] = []
        made = 0
        size = fast.first_piece_tokens
        due = size
        first = True
        for block in generation:
            made += len(block)
            pending.extend(t for t in block if t < SPEECH_VOCAB_REAL)
            if made >= due:
                batch, pending = pending, []
                job.budget.check()
                audio = self._s3gen(stats, lambda: streamer.push(batch), len(batch))
                size = min(2 * size, fast.max_piece_tokens)
                due = made + size
                if audio.size:
                    marks.push(audio, len(batch), final=False)
                    if first:
                        # The first audio is what the listener waits for: take
                        # it as soon as it is marked.
                        first = False
                        marks.wait_first()
            ready = marks.ready()
            for audio, tokens in ready:
                yield Piece(audio=audio, tokens=tokens)
            if not ready:
                yield NOTHING_YET  # other streams' work may go between T3 blocks
        job.budget.check()
        tail = self._s3gen(stats, lambda: streamer.finish(pending), len(pending) + 3)
        marks.push(tail, len(pending), final=True)
        for audio, tokens in marks.rest():
            yield Piece(audio=audio, tokens=tokens)
        stats.watermark_s = list(marker.stats)
