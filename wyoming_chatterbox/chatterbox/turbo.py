"""Chatterbox Turbo as a SpeechBackend: load the model, speak a sentence group.

Runs only on the engine's worker thread. Instead of `ChatterboxTurboTTS.generate`
it calls the same steps itself (punc_norm -> tokenizer -> T3 -> S3Gen -> watermark)
so that each call takes its voice's conditionals as arguments (the shared
`model.conds` is never used), checks the stop flag before every speech token, and
counts the tokens it generated. Loading uses the library's own `from_local`.

The fast path (see fastpath.FastPath; each part can be switched off):
- T3 decodes with our own static-cache decoder (t3_decoder.T3Decoder): the voice
  prompt's keys and values are computed once per voice, sampling stays on the
  device, and on CUDA each step is one graph replay in bfloat16.
- Speech tokens go to S3Gen in pieces while T3 goes on (s3stream.S3GenStreamer):
  a group's first audio comes after `first_piece_tokens` tokens.
- Each piece is watermarked on a thread of its own (s3stream.StreamWatermarker),
  so T3 does not wait for it; the piece is handed on once it is marked.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import threading
import time
from pathlib import Path
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Generator,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

import numpy as np

from .backend import (
    BUILTIN_VOICE,
    MAX_SPEECH_TOKENS,
    SPEECH_VOCAB_REAL,
    ChatterboxBackend,
)
from .download import MODEL_FILES, ensure_model
from .engine import (
    NOTHING_YET,
    ModelLoadError,
    Piece,
    SamplingParams,
    SynthesisCancelled,
)
from .fastpath import FastPath

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


class _EagerGeneration:
    """T3.inference_turbo's loop on the library's transformer and its growing
    cache: the reference the fast decoder is checked against, and the path
    behind --no-static-cache. Same interface as t3_decoder.Generation: blocks
    of new tokens as they come, a stop check before every token, at most
    `max_tokens` tokens, and the stop token held back for `min_tokens`.
    """

    def __init__(
        self,
        t3: Any,
        t3_cond: Any,
        text_tokens: Any,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        min_tokens: int = 0,
        max_tokens: int = MAX_SPEECH_TOKENS,
        block: int = 8,
    ) -> None:
        self.cut = False
        self.n_tokens = 0
        self.steps = 0  # decode steps run (tokens sampled, a stop token included)
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self._args = (t3, t3_cond, text_tokens, params, should_stop)
        self._min_tokens = min_tokens
        self._max_tokens = min(max_tokens, MAX_SPEECH_TOKENS)
        self._block = block
        self._iterator: Optional[Generator[List[int], None, None]] = None

    @property
    def batched_steps(self) -> int:
        return self.steps  # one generation a step, always

    def start(self) -> None:
        """Nothing to do ahead: the prompt runs with the first block."""

    def __iter__(self) -> Iterator[List[int]]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()

    def _run(self) -> Generator[List[int], None, None]:
        import torch
        import torch.nn.functional as F
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        t3, t3_cond, text_tokens, params, should_stop = self._args
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

        # No inference_mode across a yield: another stream's group runs on this
        # thread in between, and the mode is a per-thread setting.
        started = time.monotonic()
        with torch.inference_mode():
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
        self.prefill_s = time.monotonic() - started

        # `history` is what the repetition penalty sees: the start token at the
        # first step, then the generated tokens only, as upstream.
        generated = torch.zeros((1, 0), dtype=torch.long, device=text_tokens.device)
        block: List[int] = []
        self.cut = True
        for step in range(self._max_tokens):
            if should_stop():
                raise SynthesisCancelled()
            started = time.monotonic()
            with torch.inference_mode():
                step_logits = logits[:, -1, :]
                if step < self._min_tokens:
                    step_logits = step_logits.clone()
                    step_logits[:, stop_token] = -float("inf")
                scores = processors(history, step_logits)
                next_token = torch.multinomial(F.softmax(scores, dim=-1), 1)
                self.steps += 1
                token = int(next_token)
                if token != stop_token:
                    generated = torch.cat([generated, next_token], dim=1)
                    history = generated
                    outputs = t3.tfmr(
                        inputs_embeds=t3.speech_emb(next_token),
                        past_key_values=past,
                        use_cache=True,
                    )
                    past = outputs.past_key_values
                    logits = t3.speech_head(outputs[0])
            self.decode_s += time.monotonic() - started
            if token == stop_token:
                self.cut = False
                break
            block.append(token)
            self.n_tokens += 1
            if len(block) >= self._block:
                yield block
                block = []
        if block:
            yield block


class TurboBackend(ChatterboxBackend):
    """Chatterbox Turbo (English) on one device."""

    kind = "turbo"
    model_name = "Chatterbox Turbo"
    model_files = MODEL_FILES
    languages = {"en": "English"}

    def __init__(self, *args: Any, fast: Optional[FastPath] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fast = fast if fast is not None else FastPath()
        # One record per sentence group, for script/bench and the debug log.
        self.group_stats: Deque[Dict[str, Any]] = collections.deque(maxlen=1000)
        self._decoder: Any = None
        # Voice prompt keys/values per voice: id(conds.t3) -> (conds.t3, prefix).
        self._prefixes: "collections.OrderedDict[int, Tuple[Any, Any]]" = (
            collections.OrderedDict()
        )
        self._marker: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def _find_model(self) -> Path:
        return ensure_model(self._data_dir)

    def _load_model(self, ckpt_dir: Path) -> Any:
        import torch

        model = load_turbo_model(ckpt_dir, self.device)
        if self.device.startswith("cuda"):
            # S3Gen's input length changes with every piece: cuDNN's benchmark
            # mode would tune its convolutions again for each new length.
            torch.backends.cudnn.benchmark = False
        if self.fast.static_cache:
            from .t3_decoder import T3Decoder

            dtype = getattr(torch, self.fast.resolved_dtype(self.device))
            self._decoder = T3Decoder(
                model.t3,
                self.device,
                dtype,
                cuda_graphs=self.fast.uses_graphs(self.device),
                max_batch=self.fast.batch(self.device),
                lead_tokens=self.fast.max_piece_tokens,
            )
            if dtype != torch.float32:
                # The decoder holds T3's transformer in its own precision; the
                # float32 copy would only take memory.
                self._decoder.release_reference_weights()
        if self.fast.async_watermark:
            self._marker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="chatterbox-watermark"
            )
        _LOGGER.info("Speed settings: %s", self.fast.describe(self.device))
        return model

    @property
    def batch_size(self) -> int:
        return self._decoder.max_batch if self._decoder is not None else 1

    def warm_up(self) -> None:
        if self._decoder is not None:
            self._decoder.warm_up()
        super().warm_up()
        if self.fast.streams_in_group(self.device):
            # One-shot replies take the whole-group path (one S3Gen call).
            for _ in self.synthesize_whole(
                "Warming up.", BUILTIN_VOICE, "en", self.default_params, lambda: False
            ):
                pass

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._prefixes.clear()
        if self._marker is not None:
            self._marker.shutdown(wait=True)
            self._marker = None
        super().close()

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

    def _generation(
        self,
        conds: Any,
        text_tokens: Any,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        min_tokens: int,
        max_tokens: int,
    ) -> Any:
        if self._decoder is not None:
            return self._decoder.generate(
                self._prefix_for(conds.t3),
                text_tokens,
                params,
                should_stop,
                min_tokens=min_tokens,
                max_tokens=min(max_tokens, MAX_SPEECH_TOKENS),
            )
        return _EagerGeneration(
            self._model.t3,
            dataclasses.replace(conds.t3),
            text_tokens,
            params,
            should_stop,
            min_tokens,
            max_tokens,
        )

    def _speak(
        self,
        text: str,
        conds: Any,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        max_tokens: int,
    ) -> Tuple[np.ndarray, int, bool]:
        """The whole group in one piece (the ChatterboxBackend contract)."""
        pieces = list(
            self._speak_pieces(
                text, conds, language, params, should_stop, 0, max_tokens
            )
        )
        audio = np.concatenate([p.audio for p in pieces]) if pieces else np.zeros(0)
        stats = self.group_stats[-1]
        return audio.astype(np.float32), stats["tokens"], stats["cut"]

    def _speak_pieces(
        self,
        text: str,
        conds: Any,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        min_tokens: int,
        max_tokens: int,
        whole: bool = False,
    ) -> Iterator[Piece]:
        import torch
        from chatterbox.tts_turbo import punc_norm

        started = time.monotonic()
        stats: Dict[str, Any] = {
            "chars": len(text),
            "s3gen_s": [],
            "s3gen_tokens": [],
            "watermark_s": [],
            "pieces": 0,
            "first_piece_s": None,
        }
        with torch.inference_mode():
            text_tokens = self._model.tokenizer(
                punc_norm(text), return_tensors="pt", padding=True, truncation=True
            ).input_ids.to(self.device)
            generation = self._generation(
                conds, text_tokens, params, should_stop, min_tokens, max_tokens
            )
        pieces: Optional[Generator[Piece, None, None]] = None
        try:
            # The prompt now, then the worker's turn: a group that waits may
            # begin too, and T3's next steps serve both (batch_size).
            generation.start()
            yield NOTHING_YET
            if not whole and self.fast.streams_in_group(self.device):
                pieces = self._stream_group(conds, generation, should_stop, stats)
            else:
                pieces = self._whole_group(conds, generation, should_stop, stats)
            for piece in pieces:
                if not piece.audio.size:
                    yield piece  # the worker's turn between T3 blocks
                    continue
                if stats["first_piece_s"] is None:
                    stats["first_piece_s"] = time.monotonic() - started
                stats["pieces"] += 1
                yield piece
        finally:
            if pieces is not None:
                pieces.close()
            generation.close()
        tokens = generation.n_tokens
        stats.update(
            tokens=tokens,
            cut=generation.cut,
            prefill_s=generation.prefill_s,
            decode_s=generation.decode_s,
            ms_per_token=1000 * generation.decode_s / tokens if tokens else None,
            # Groups per T3 step, on average over this group's steps.
            t3_batch=(
                generation.batched_steps / generation.steps
                if generation.steps
                else None
            ),
            total_s=time.monotonic() - started,
        )
        self.group_stats.append(stats)
        if generation.cut and min_tokens < max_tokens:  # not a forced length
            self._log_runaway(text, tokens)
        _LOGGER.debug(
            "Group of %s chars: %s speech tokens (%.1f ms each), %s pieces, "
            "first after %.0f ms, all in %.2f s",
            len(text),
            tokens,
            stats["ms_per_token"] or 0.0,
            stats["pieces"],
            1000 * (stats["first_piece_s"] or 0.0),
            stats["total_s"],
        )

    def _whole_group(
        self,
        conds: Any,
        generation: Any,
        should_stop: Callable[[], bool],
        stats: Dict[str, Any],
    ) -> Generator[Piece, None, None]:
        """All the group's tokens, then S3Gen once, as upstream's generate."""
        import torch
        from chatterbox.models.s3gen.const import S3GEN_SIL

        tokens: List[int] = []
        for block in generation:
            tokens.extend(t for t in block if t < SPEECH_VOCAB_REAL)
            yield NOTHING_YET  # other streams' work may go between T3 blocks
        if should_stop():
            raise SynthesisCancelled()
        started = time.monotonic()
        with torch.inference_mode():
            speech_tokens = torch.tensor(
                tokens + [S3GEN_SIL] * 3, dtype=torch.long, device=self.device
            )
            # S3Gen casts the reference dict's tensors in place: give it a copy.
            # It also print()s a line per call: keep that out of the log.
            with contextlib.redirect_stdout(io.StringIO()):
                wav, _ = self._model.s3gen.inference(
                    speech_tokens=speech_tokens,
                    ref_dict=dict(conds.gen),
                    n_cfm_timesteps=2,
                )
            wav = wav.squeeze(0).detach().float().cpu().numpy()
        stats["s3gen_s"].append(time.monotonic() - started)
        stats["s3gen_tokens"].append(len(tokens) + 3)
        started = time.monotonic()
        audio = self._model.watermarker.apply_watermark(
            wav, sample_rate=self.sample_rate
        )
        stats["watermark_s"].append(time.monotonic() - started)
        yield Piece(audio=np.asarray(audio, dtype=np.float32), tokens=len(tokens))

    def _stream_group(
        self,
        conds: Any,
        generation: Any,
        should_stop: Callable[[], bool],
        stats: Dict[str, Any],
    ) -> Generator[Piece, None, None]:
        """Audio while T3 goes on: S3Gen gets the first `first_piece_tokens`
        tokens, then pieces twice as long each time up to `max_piece_tokens`."""
        import torch

        from .s3stream import S3GenStreamer, StreamWatermarker

        fast = self.fast
        with torch.inference_mode():
            streamer = S3GenStreamer(
                self._model.s3gen,
                conds.gen,
                n_cfm_timesteps=2,
                max_tokens=MAX_SPEECH_TOKENS,
            )
        marker = StreamWatermarker(self._model.watermarker, self.sample_rate)
        marks: Deque["concurrent.futures.Future[Tuple[np.ndarray, int]]"] = (
            collections.deque()
        )
        last_mark: List[Optional[concurrent.futures.Future]] = [None]

        def mark(audio: np.ndarray, tokens: int, final: bool) -> None:
            # Pieces are marked one after another (the marker keeps context
            # across joins), on the watermark thread unless told otherwise.
            previous = last_mark[0]

            def run() -> Tuple[np.ndarray, int]:
                if previous is not None:
                    previous.result()
                out = marker.push(audio) if audio.size else np.zeros(0, np.float32)
                if final:
                    out = np.concatenate([out, marker.finish()])
                return out, tokens

            future: "concurrent.futures.Future[Tuple[np.ndarray, int]]"
            if self._marker is not None and not (final and previous is None):
                future = self._marker.submit(run)
            else:
                future = concurrent.futures.Future()
                future.set_result(run())
            last_mark[0] = future
            marks.append(future)

        def s3gen(step: Callable[[], np.ndarray], tokens: int) -> np.ndarray:
            if should_stop():
                raise SynthesisCancelled()
            started = time.monotonic()
            with torch.inference_mode():
                audio = step()
            stats["s3gen_s"].append(time.monotonic() - started)
            stats["s3gen_tokens"].append(tokens)
            return audio

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
                audio = s3gen(lambda: streamer.push(batch), len(batch))
                size = min(2 * size, fast.max_piece_tokens)
                due = made + size
                if audio.size:
                    mark(audio, len(batch), final=False)
                    if first:
                        # The first audio is what the listener waits for: take
                        # it as soon as it is marked.
                        first = False
                        marks[0].result()
            gave = False
            while marks and marks[0].done():
                audio, tokens = marks.popleft().result()
                gave = True
                yield Piece(audio=audio, tokens=tokens)
            if not gave:
                yield NOTHING_YET  # other streams' work may go between T3 blocks
        batch = pending
        mark(s3gen(lambda: streamer.finish(batch), len(batch) + 3), len(batch), True)
        while marks:
            audio, tokens = marks.popleft().result()
            yield Piece(audio=audio, tokens=tokens)
        stats["watermark_s"] = list(marker.stats)
