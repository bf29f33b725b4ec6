"""Turbo's fast path, built for its device and proven there at start-up.

`prepare_fast_path(model, fast, device)` builds what the switches
(settings.FastPath) ask for and, on a GPU, checks each part against a slower
reference before any request can meet it:

1. the decoder's own step (t3_step, in its precision) against the library's
   float32 transformer: the final hidden states of a fixed prompt (the
   built-in voice and a fixed text) and of 24 forced speech tokens;
2. the CUDA graphs against the same step run eagerly: greedy, from the same
   state and seed, 24 steps over one row and over the largest batch; tokens,
   logits and the KV cache written must agree, and replays of one sampled
   step from one state must draw fresh random numbers;
3. S3Gen in pieces against one whole decode of the same tokens (the voice's
   prompt tokens) with the same noise.

A part that fails is turned off with one WARNING saying what and why: a
low-precision decoder falls back to float32, a wrong decoder to the library's
own loop, wrong graphs to the eager step, wrong pieces to one piece per group.
A failed capture is cleaned up (cuda_graphs) and the eager step used; if even
eager random draws fail after it, the load fails with a clear sentence, as
nothing could be spoken. The outcome is one INFO line and a FastPathState.
"""

import dataclasses
import logging
import math
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ..settings import FastPath
from ..speech import FastPathState, ModelLoadError, SamplingParams
from . import cuda_graphs
from .base import SPEECH_VOCAB_REAL
from .cuda_graphs import CaptureFailed
from .t3_decoder import T3Decoder
from .t3_sampler import param_values

_LOGGER = logging.getLogger(__name__)

CHECK_TEXT = "Hello, this is a self-check of the fast path."
CHECK_STEPS = 24
_SEED = 20260101
# Largest relative error (of a hidden state or a KV cache row, by L2 norm)
# allowed against the reference. The decoder against the library's float32
# transformer: measured on the CPU (tests/test_self_check.py, a tiny T3 with
# lively blocks) 4e-7 in float32, 0.4 % in bfloat16, 0.05 % in float16; a
# layer without its MLP or a doubled attention scale is off by 68 % and 35 %.
# A full-size T3 on a GPU adds rounding over 24 layers (not measured yet: the
# log line gives the figure). The graphs against the same step run eagerly:
# the same kernels on the same inputs, so the error should be 0.
DECODER_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.08, torch.float16: 0.05}
GRAPH_TOLERANCE = 1e-3
# S3Gen in pieces against a whole decode with the same noise: measured 35 dB
# on the CPU, 11 dB for the same decode with other noise (tests/test_s3stream).
PIECES_MIN_SNR_DB = 15.0


@dataclasses.dataclass
class Setup:
    """What the backend runs with: the decoder (None: the library's loop),
    whether a group's audio comes in pieces, and the outcome."""

    decoder: Optional[T3Decoder]
    pieces: bool
    state: FastPathState
    line: str


@dataclasses.dataclass
class _Outcome:
    """The self-check's findings, for the log line."""

    ran: bool = False
    figures: List[str] = dataclasses.field(default_factory=list)
    turned_off: List[str] = dataclasses.field(default_factory=list)

    def off(self, part: str, message: str, *args: Any) -> None:
        """One WARNING: which part was turned off, and why."""
        _LOGGER.warning(message, *args)
        self.turned_off.append(part)


def prepare_fast_path(model: Any, fast: FastPath, device: str) -> Setup:
    """Build the fast path for `device` and check it there (module doc)."""
    dev = torch.device(device)
    checks = cuda_graphs.CUDA.is_gpu(dev)
    capability = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    dtype = getattr(torch, fast.resolved_dtype(device, capability))
    outcome = _Outcome(ran=checks)
    decoder = None
    if fast.static_cache:
        decoder = _checked_decoder(model, fast, device, dtype, outcome)
    pieces = fast.streams_in_group(device)
    if pieces and checks:
        pieces = _checked_pieces(model, fast, outcome)
    state = FastPathState(
        parts={
            "static_cache": decoder is not None,
            "cuda_graphs": decoder is not None and decoder.cuda_graphs,
            "stream_in_group": pieces,
        },
        t3_dtype=str(decoder.dtype).replace("torch.", "") if decoder else "float32",
        self_check=(
            "not run" if not checks else "failed" if outcome.turned_off else "passed"
        ),
        capture_s=decoder.graphs.seconds if decoder and decoder.graphs else None,
        graph_bytes=decoder.graphs.memory if decoder and decoder.graphs else None,
        cache_bytes=decoder.slot_memory if decoder and decoder.slot_memory else None,
    )
    return Setup(decoder, pieces, state, _line(fast, state, capability, outcome))


def _checked_decoder(
    model: Any, fast: FastPath, device: str, dtype: torch.dtype, outcome: _Outcome
) -> Optional[T3Decoder]:
    """Our decoder, checked against the library's transformer (in float32
    if its precision fails, or None: the library's loop), with its graphs
    captured and checked; the reference weights freed if it no longer needs
    them."""

    def build(dtype: torch.dtype) -> T3Decoder:
        return T3Decoder(
            model.t3,
            device,
            dtype,
            max_batch=fast.batch,
            lead_tokens=fast.max_piece_tokens,
        )

    decoder = build(dtype)
    if outcome.ran:
        error = check_decoder(decoder, model)
        if error > DECODER_TOLERANCE[dtype] and dtype != torch.float32:
            decoder.close()
            outcome.off(
                f"T3 in {dtype}".replace("torch.", ""),
                "T3 in %s is off: it differs from the library's float32 "
                "transformer by %.1f%%; decoding in float32",
                str(dtype).replace("torch.", ""),
                100 * error,
            )
            decoder = build(torch.float32)
            error = check_decoder(decoder, model)
        if error > DECODER_TOLERANCE[decoder.dtype]:
            decoder.close()
            outcome.off(
                "T3's fast decoder",
                "T3's fast decoder is off: it differs from the library's "
                "transformer by %.1f%%; decoding with the library's loop (slower)",
                100 * error,
            )
            return None
        outcome.figures.append(f"decoder vs library {100 * error:.2f}%")
    _capture(decoder, fast.cuda_graphs, outcome)
    if decoder.graphs is not None and outcome.ran:
        problem = check_graphs(decoder, model)
        if problem is not None:
            decoder.drop_graphs()
            outcome.off(
                "CUDA graphs",
                "CUDA graphs are off: %s; decoding with the eager step (slower)",
                problem,
            )
        else:
            outcome.figures.append(
                f"graphs = eager over {CHECK_STEPS} steps, fresh draws"
            )
    if decoder.dtype != torch.float32:
        # The decoder holds T3's transformer in its own precision; the float32
        # copy would only take memory.
        decoder.release_reference_weights()
    return decoder


def _capture(decoder: T3Decoder, wanted: bool, outcome: _Outcome) -> None:
    try:
        decoder.prepare(graphs=wanted)
    except CaptureFailed as err:
        outcome.off(
            "CUDA graphs",
            "CUDA graphs are off: capturing T3's decode step failed (%s); "
            "decoding with the eager step (slower). Please report this; "
            "--no-cuda-graphs skips the attempt",
            err,
        )
    except RuntimeError as err:
        raise ModelLoadError(
            f"Capturing CUDA graphs failed and PyTorch could not recover ({err}); "
            "start with --no-cuda-graphs, and please report this."
        ) from err


def _checked_pieces(model: Any, fast: FastPath, outcome: _Outcome) -> bool:
    snr = check_pieces(model, fast.first_piece_tokens)
    if snr is None:
        return True
    if not snr >= PIECES_MIN_SNR_DB:  # NaN fails too
        outcome.off(
            "audio in pieces",
            "Audio in pieces within a sentence group is off: the pieces differ "
            "from a whole decode (%.1f dB, at least %.0f expected); one piece "
            "per group",
            snr,
            PIECES_MIN_SNR_DB,
        )
        return False
    outcome.figures.append(f"pieces vs whole {snr:.1f} dB")
    return True


# ------------------------------------------------------------------ checks


def _prompt(decoder: T3Decoder, model: Any) -> Tuple[Any, torch.Tensor, List[int]]:
    """The built-in voice, the check text's tokens, and forced speech tokens
    (the voice's own prompt tokens)."""
    cond = model.conds.t3
    text = model.tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    speech = cond.cond_prompt_speech_tokens.reshape(-1).tolist()
    forced = [t for t in speech if t < SPEECH_VOCAB_REAL][:CHECK_STEPS]
    return cond, text.to(decoder.device), forced


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest relative L2 error over the rows; inf if anything is not finite."""
    ours, reference = ours.float(), reference.float()
    if not bool(torch.isfinite(ours).all()):
        return math.inf
    rows = ours.reshape(ours.size(0), -1), reference.reshape(reference.size(0), -1)
    error = (rows[0] - rows[1]).norm(dim=-1) / rows[1].norm(dim=-1).clamp_min(1e-12)
    return float(error.max())


def check_decoder(decoder: T3Decoder, model: Any) -> float:
    """Relative error of the decoder's final hidden states against the
    library's float32 transformer on the same sequence (before the
    decoder's release_reference_weights)."""
    cond, text, forced = _prompt(decoder, model)
    ours = decoder.forced_states(decoder.prefix(cond), text, forced)
    t3 = model.t3
    with torch.inference_mode():
        speech = torch.tensor([[t3.hp.start_speech_token] + forced], device=text.device)
        embeds, _ = t3.prepare_input_embeds(
            t3_cond=dataclasses.replace(cond), text_tokens=text, speech_tokens=speech
        )
        out = t3.tfmr(inputs_embeds=embeds, use_cache=False)
        reference = out[0][0, -(len(forced) + 1) :]
    return _relative(ours, reference)


def check_graphs(decoder: T3Decoder, model: Any) -> Optional[str]:
    """What differs between the graphs and the eager step, or None."""
    pool, graphs = decoder.pool, decoder.graphs
    assert pool is not None and graphs is not None
    cond, text, _ = _prompt(decoder, model)
    prefix = decoder.prefix(cond)
    for n in sorted({1, pool.capacity}):
        eager = _greedy_run(decoder, prefix, text, n, graphs=False)
        replayed = _greedy_run(decoder, prefix, text, n, graphs=True)
        if replayed[0] != eager[0]:
            return (
                f"over {n} row(s) the graphs sampled other tokens than the eager step"
            )
        pairs = (("logits", replayed[1], eager[1]), ("KV cache", replayed[2], eager[2]))
        for what, ours, theirs in pairs:
            error = _relative(ours, theirs)
            if not error <= GRAPH_TOLERANCE:
                return f"over {n} row(s) their {what} differ by {100 * error:.2g}%"
    if not _fresh_draws(decoder, prefix, text):
        return "their replays drew the same random numbers each time"
    return None


def _greedy_run(
    decoder: T3Decoder, prefix: Any, text: torch.Tensor, n: int, graphs: bool
) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
    """CHECK_STEPS greedy steps of the prompt in row n - 1 alone, over rows
    [0, n): replayed graphs or the same step eagerly, from the same seed (so
    that even ties between logits break alike). Tokens, logits, cache."""
    pool, step = decoder.pool, decoder.step
    assert pool is not None and decoder.graphs is not None
    row = n - 1
    values = param_values(SamplingParams(top_k=1), step.vocab)
    dev = decoder.device
    with _own_random_numbers(dev), torch.inference_mode():
        torch.manual_seed(_SEED)
        step.prefill(pool, row, prefix.kv, prefix.length, text)
        pool.begin_row(row, values, CHECK_STEPS, decoder.start_token)
        prompt = int(pool.pos[row])
        # Nothing of the other run may stay: a graph that does nothing
        # must not find the eager run's tokens and keys in place.
        pool.out[row] = -1
        pool.cache[:, :, row, :, prompt:] = 0
        pool.active.zero_()
        pool.active[row] = True
        logits = []
        for t in range(CHECK_STEPS):
            span = step.span_for(prompt + t + 1)
            if not graphs:
                step.eager(pool, 0, n, span)
            elif not decoder.graphs.replay(n, span):
                raise RuntimeError(f"no graph for {n} rows and span {span}")
            logits.append(pool.logits[row].clone())
        pool.active[row] = False
        tokens = pool.out[row, :CHECK_STEPS].tolist()
        cache = pool.cache[:, :, row, :, : prompt + CHECK_STEPS].clone()
    return tokens, torch.stack(logits), cache


def _fresh_draws(decoder: T3Decoder, prefix: Any, text: torch.Tensor) -> bool:
    """Four replays of one sampled step from one state (uniform logits over
    the whole vocabulary) must not all draw the same token."""
    pool, step, graphs = decoder.pool, decoder.step, decoder.graphs
    assert pool is not None and graphs is not None
    values = param_values(
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0), step.vocab
    )
    drawn = set()
    with _own_random_numbers(decoder.device), torch.inference_mode():
        for _ in range(4):
            step.prefill(pool, 0, prefix.kv, prefix.length, text)
            pool.begin_row(0, values, 0, decoder.start_token)
            pool.logits[0] = 0.0
            pool.active.zero_()
            pool.active[0] = True
            graphs.replay(1, step.span_for(int(pool.pos[0]) + 1))
            drawn.add(int(pool.token[0]))
        pool.active[0] = False
    return len(drawn) > 1


def check_pieces(model: Any, first: int) -> Optional[float]:
    """SNR (dB) of S3Gen in pieces (first, 2 * first, the rest) against one
    whole decode of the same tokens with the same noise; None when the voice
    has too few prompt tokens to check with."""
    decoded = decode_pieces_and_whole(model, first)
    return None if decoded is None else pieces_snr(*decoded)


def decode_pieces_and_whole(
    model: Any, first: int
) -> Optional[Tuple[np.ndarray, List[np.ndarray]]]:
    """The voice's first 4 * `first` prompt tokens decoded whole, and in
    pieces of first, 2 * first and the rest, with the same noise."""
    from .s3stream import S3GenStreamer

    cond = model.conds
    tokens = [
        t
        for t in cond.t3.cond_prompt_speech_tokens.reshape(-1).tolist()
        if t < SPEECH_VOCAB_REAL
    ][: 4 * first]
    if len(tokens) < 4 * first:
        return None
    with torch.inference_mode():
        whole = S3GenStreamer(model.s3gen, cond.gen, seed=_SEED).finish(tokens)
        streamer = S3GenStreamer(model.s3gen, cond.gen, seed=_SEED)
        pieces = [
            streamer.push(tokens[:first]),
            streamer.push(tokens[first : 3 * first]),
            streamer.finish(tokens[3 * first :]),
        ]
    return whole, pieces


def pieces_snr(whole: np.ndarray, pieces: List[np.ndarray]) -> float:
    """SNR (dB) of the pieces joined against the whole decode; NaN if their
    lengths differ or a sample is not finite."""
    audio = np.concatenate(pieces)
    if len(audio) != len(whole) or not np.isfinite(audio).all():
        return math.nan
    error = float(np.sum((whole - audio) ** 2))
    return 10 * math.log10(float(np.sum(whole**2)) / max(error, 1e-20))


def _own_random_numbers(device: torch.device) -> Any:
    """The check's seeds without touching the server's random stream: the CPU
    and the device's generators are put back as they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _line(
    fast: FastPath,
    state: FastPathState,
    capability: Optional[Tuple[int, int]],
    outcome: _Outcome,
) -> str:
    """The one INFO line: what runs, its costs, and the self-check."""
    parts = state.parts
    words = ["static KV cache" if parts["static_cache"] else "library decode loop"]
    why = f" (compute capability {capability[0]}.{capability[1]})" if capability else ""
    words.append(f"T3 in {state.t3_dtype}{why}")
    if parts["cuda_graphs"]:
        words.append(
            f"CUDA graphs ({(state.capture_s or 0) * 1000:.0f} ms to capture, "
            f"{(state.graph_bytes or 0) / 1e6:.0f} MB)"
        )
    if state.cache_bytes:
        words.append(f"KV cache made at load ({state.cache_bytes / 1e9:.2f} GB)")
    if fast.batch > 1 and parts["static_cache"]:
        words.append(f"up to {fast.batch} groups per T3 step")
    if parts["stream_in_group"]:
        words.append(
            f"audio from the first {fast.first_piece_tokens} tokens of a group"
        )
    else:
        words.append("one piece per group")
    words.append(
        "watermark on its own thread" if fast.async_watermark else "watermark inline"
    )
    if not outcome.ran:
        check = "self-check: not run (no GPU)"
    elif outcome.turned_off:
        check = "self-check failed, turned off: " + "; ".join(outcome.turned_off)
    else:
        check = "self-check passed: " + ", ".join(outcome.figures)
    return ", ".join(words) + "; " + check
