"""A fast speech-token decoder for Chatterbox Turbo's T3 (GPT-2 medium).

Why not the library's loop (turbo._EagerGeneration): it calls Hugging Face's
GPT2Model with a growing cache, samples with torch.multinomial and reads every
token back to the host. Each of these costs a host sync or a reallocation per
token, and the cache API changes between transformers versions. This module
runs its own GPT-2 forward over the same weights with:

- a static KV cache per slot, (layers, key/value, 1, heads, positions, head_dim):
  one decode step writes at a position held in a device tensor and attends over
  the whole buffer with a mask built from it, so the step has fixed shapes and no
  host sync and can be captured as a CUDA graph (one per slot, captured lazily);
- the voice prompt (speaker embedding + prompt speech tokens, independent of the
  text) computed once per voice: `prefix()` returns its keys and values, which
  `generate()` copies into the slot before prefilling only text + start token;
- sampling on the device, with the semantics and order of the reference
  (temperature, top-k, top-p, repetition penalty as in Hugging Face's warpers;
  the penalty sees the start token at the first step, then the generated tokens)
  and the exponential-race draw `argmax(p / Exp(1))`, which is distributed as
  multinomial(p) but needs no host sync; parameters live in device tensors that
  the captured graph reads, so one graph serves every parameter set;
- the host reading the sampled tokens only every `sync_every` steps, looking for
  the stop token there and dropping what was sampled after it.

Which parts of T3 are still used after `release_reference_weights()`:
`prepare_conditioning` (cond_enc, and speech_emb for an uncached voice prompt)
and `text_emb` (prefill). Copies of `speech_emb`, `speech_head` and the
position table `wpe` are kept by the decoder (float32), and the transformer
blocks in the decoder's dtype; `t3.tfmr` itself is never called.

Precision: matrix products, the KV cache and attention (SDPA) run in the
decoder's dtype; the residual stream, the layer norms and the logits stay in
float32, so bfloat16 loses little more than its matmul rounding.
"""

import dataclasses
import logging
import math
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from .backend import MAX_SPEECH_TOKENS
from .engine import SamplingParams, SynthesisCancelled

_LOGGER = logging.getLogger(__name__)

# Room for text tokens in the default cache size; a sentence group is far
# shorter (the engine splits text into groups of a few sentences).
TEXT_TOKENS_ROOM = 512
_MARGIN = 16

_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclasses.dataclass(frozen=True)
class Prefix:
    """A voice prompt's keys and values for every layer, made by T3Decoder.prefix.

    Read only: generate() copies it into a slot's cache and never writes to it,
    so the caller can keep one per voice and share it between streams.
    """

    kv: torch.Tensor  # (layers, 2, 1, heads, length, head_dim), decoder's dtype
    length: int
    decoder_id: int


@dataclasses.dataclass
class _Layer:
    ln_1: torch.Tensor  # (2, width) weight, bias; float32
    ln_2: torch.Tensor
    attn_w: torch.Tensor  # Conv1D layout (in, out): y = x @ W + b
    attn_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    mlp_w: torch.Tensor
    mlp_b: torch.Tensor
    scale: float


class _Slot:
    """One generation's device state: cache, sampler state, output buffer.

    Every tensor here has a fixed address for the slot's lifetime, because the
    slot's CUDA graph reads and writes them in place.
    """

    def __init__(self, dec: "T3Decoder") -> None:
        dev = dec.device
        vocab = dec.vocab
        self.cache = torch.zeros(
            (dec.n_layer, 2, 1, dec.n_head, dec.max_positions, dec.head_dim),
            dtype=dec.dtype,
            device=dev,
        )
        self.logits = torch.zeros((1, vocab), dtype=torch.float32, device=dev)
        self.token = torch.zeros((1,), dtype=torch.long, device=dev)
        self.pos = torch.zeros((1,), dtype=torch.long, device=dev)
        self.step = torch.zeros((1,), dtype=torch.long, device=dev)
        self.out = torch.zeros((dec.max_positions,), dtype=torch.long, device=dev)
        self.seen = torch.zeros((1, vocab), dtype=torch.bool, device=dev)
        # Sampling parameters (see _param_values).
        self.temperature = torch.ones((1, 1), dtype=torch.float32, device=dev)
        self.kth = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.top_p_cut = torch.full((1, 1), -1.0, dtype=torch.float32, device=dev)
        self.penalty = torch.ones((1, 1), dtype=torch.float32, device=dev)
        self.min_tokens = torch.zeros((1,), dtype=torch.long, device=dev)
        self.graph: Optional[Any] = None


def _param_values(params: SamplingParams, vocab: int) -> List[float]:
    """The sampler's device parameters for `params`, as the reference picks its
    processors: each one that the reference would leave out becomes a no-op
    (temperature 1, kth index 0 = keep all, top-p cut -1 = keep all, penalty 1).
    """
    if params.top_p <= 0:
        raise ValueError(f"top_p must be above 0, not {params.top_p}")
    if params.repetition_penalty <= 0:
        raise ValueError(
            f"repetition_penalty must be above 0, not {params.repetition_penalty}"
        )
    temperature = params.temperature
    if not (temperature > 0 and temperature != 1.0):
        temperature = 1.0
    top_k = int(params.top_k)
    kth = vocab - min(max(top_k, 1), vocab) if top_k > 0 else 0
    top_p_cut = 1.0 - params.top_p if params.top_p < 1.0 else -1.0
    return [temperature, float(kth), top_p_cut, params.repetition_penalty]


def sampler_scores(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    kth: torch.Tensor,
    top_p_cut: torch.Tensor,
    penalty: torch.Tensor,
    seen: torch.Tensor,
) -> torch.Tensor:
    """Hugging Face's Temperature -> TopK -> TopP -> RepetitionPenalty, in that
    order, with every parameter a device tensor (graph-safe: no host reads).

    logits (B, V) float32; temperature, top_p_cut, penalty (1 or B, 1) float32;
    kth (1 or B, 1) long, the ascending-sort index of the k-th largest score
    (V - k; 0 keeps all); seen (1 or B, V) bool, the tokens the penalty hits.
    One ascending sort serves top-k and top-p: masking the scores below the
    k-th leaves the sorted order valid.
    """
    scores = logits / temperature
    ascending, order = torch.sort(scores, dim=-1)
    kth_value = ascending.gather(-1, kth.expand(scores.size(0), 1))
    scores = scores.masked_fill(scores < kth_value, -math.inf)
    ascending = ascending.masked_fill(ascending < kth_value, -math.inf)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= top_p_cut
    remove[..., -1] = False
    scores = scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row, distributed as multinomial(probs), without a host sync:
    the first of independent exponential clocks with rates p_i to ring is token i.
    Uses the device's default generator, so torch.manual_seed applies.
    """
    clocks = torch.empty_like(probs).exponential_().clamp_min_(1e-30)
    return torch.argmax(probs / clocks, dim=-1)


class T3Decoder:
    """Static-cache GPT-2 decoding of T3's speech tokens (see the module doc)."""

    def __init__(
        self,
        t3: Any,
        device: str,
        dtype: torch.dtype,
        cuda_graphs: bool = True,
        max_positions: Optional[int] = None,
        sync_every: int = 8,
    ) -> None:
        tfmr = t3.tfmr
        cfg = tfmr.config
        if getattr(cfg, "model_type", "gpt2") != "gpt2" or not t3.is_gpt:
            raise ValueError("T3Decoder handles GPT-2 T3 (Chatterbox Turbo) only")
        if t3.hp.input_pos_emb == "learned":
            raise ValueError("T3Decoder does not handle learned text/speech positions")
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("T3Decoder does not handle cross-attention")
        if cfg.activation_function not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {cfg.activation_function}")
        if sync_every < 1:
            raise ValueError("sync_every must be at least 1")
        self.t3 = t3
        self.device = torch.device(device)
        self.dtype = dtype
        self.sync_every = sync_every
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.n_layer = cfg.n_layer
        self.width = cfg.n_embd
        self.n_head = cfg.n_head
        self.head_dim = self.width // self.n_head
        self.eps = cfg.layer_norm_epsilon
        self._act: Callable[[torch.Tensor], torch.Tensor]
        self._act = _ACTIVATIONS[cfg.activation_function]
        self.start_token = t3.hp.start_speech_token
        self.stop_token = t3.hp.stop_speech_token

        n_positions = min(cfg.n_positions, tfmr.wpe.weight.size(0))
        if max_positions is None:
            # Voice prompt + text + start token + the speech tokens, rounded up
            # to a multiple of 64 (aligned rows suit the attention kernels).
            prompt = 1 + t3.hp.speech_cond_prompt_len + (1 if t3.hp.emotion_adv else 0)
            wanted = prompt + TEXT_TOKENS_ROOM + 1 + MAX_SPEECH_TOKENS + _MARGIN
            max_positions = min(n_positions, -(-wanted // 64) * 64)
        if not 1 <= max_positions <= n_positions:
            raise ValueError(
                f"max_positions must be 1 to {n_positions} (the model's positions)"
            )
        self.max_positions = max_positions

        with torch.inference_mode():
            self._load_weights(t3)
            self._positions = torch.arange(max_positions, device=self.device)
        self.vocab: int = int(self.head_w.size(0))
        self._free: List[_Slot] = []
        self._n_slots = 0
        # Reentrant: a Generation collected by the GC inside _acquire releases
        # its slot from the same thread.
        self._lock = threading.RLock()
        self._closed = False

    def _load_weights(self, t3: Any) -> None:
        """Copies (or, in float32 on the same device, views) of T3's weights."""
        dev, dt = self.device, self.dtype
        cfg = t3.tfmr.config

        def f32(p: torch.Tensor) -> torch.Tensor:
            return p.detach().to(device=dev, dtype=torch.float32)

        def low(p: torch.Tensor) -> torch.Tensor:
            return p.detach().to(device=dev, dtype=dt).contiguous()

        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= math.sqrt(self.head_dim)
        self.layers: List[_Layer] = []
        for i, block in enumerate(t3.tfmr.h):
            layer_scale = scale
            if cfg.scale_attn_by_inverse_layer_idx:
                layer_scale /= float(i + 1)
            self.layers.append(
                _Layer(
                    ln_1=torch.stack([f32(block.ln_1.weight), f32(block.ln_1.bias)]),
                    ln_2=torch.stack([f32(block.ln_2.weight), f32(block.ln_2.bias)]),
                    attn_w=low(block.attn.c_attn.weight),
                    attn_b=low(block.attn.c_attn.bias),
                    proj_w=low(block.attn.c_proj.weight),
                    proj_b=low(block.attn.c_proj.bias),
                    fc_w=low(block.mlp.c_fc.weight),
                    fc_b=low(block.mlp.c_fc.bias),
                    mlp_w=low(block.mlp.c_proj.weight),
                    mlp_b=low(block.mlp.c_proj.bias),
                    scale=layer_scale,
                )
            )
        self.ln_f = torch.stack([f32(t3.tfmr.ln_f.weight), f32(t3.tfmr.ln_f.bias)])
        self.wpe = f32(t3.tfmr.wpe.weight)
        self.speech_emb = f32(t3.speech_emb.weight)
        self.head_w = f32(t3.speech_head.weight)
        head_b = t3.speech_head.bias
        self.head_b = (
            f32(head_b)
            if head_b is not None
            else torch.zeros(self.head_w.size(0), device=dev)
        )
        self.stop_mask = torch.zeros((1, self.head_w.size(0)), dtype=torch.bool)
        self.stop_mask[0, self.stop_token] = True
        self.stop_mask = self.stop_mask.to(dev)

    # ----------------------------------------------------------------- model

    def _forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        length: Optional[int] = None,
    ) -> torch.Tensor:
        """GPT-2 blocks over `x` (n, width) float32 input embeddings (position
        embeddings added here) at `positions` (n,) long: writes their keys and
        values into `cache` at those positions, attends over the whole cache with
        a causal mask from the positions, returns float32 logits (n, vocab).
        Fixed shapes for a fixed n: the decode step captures it as it is.
        `length`, known to the host when no graph runs, limits attention to the
        cache's first `length` positions (the rest are masked anyway): the same
        result without reading the unused part of the cache.
        """
        n = x.size(0)
        heads, hd, dt = self.n_head, self.head_dim, self.dtype
        x = x + self.wpe.index_select(0, positions)
        if length is None:
            length = cache.size(-2)
        mask = self._positions[:length].unsqueeze(0) <= positions.unsqueeze(1)
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (self.width,), layer.ln_1[0], layer.ln_1[1], self.eps)
            qkv = torch.addmm(layer.attn_b, h.to(dt), layer.attn_w)
            q, k, v = qkv.view(n, 3, heads, hd).permute(1, 2, 0, 3).unsqueeze(1)
            cache_k, cache_v = cache[i, 0], cache[i, 1]
            cache_k.index_copy_(2, positions, k)
            cache_v.index_copy_(2, positions, v)
            a = F.scaled_dot_product_attention(
                q,
                cache_k[:, :, :length],
                cache_v[:, :, :length],
                attn_mask=mask,
                scale=layer.scale,
            )
            a = a[0].transpose(0, 1).reshape(n, self.width)
            x = x + torch.addmm(layer.proj_b, a, layer.proj_w).float()
            h = F.layer_norm(x, (self.width,), layer.ln_2[0], layer.ln_2[1], self.eps)
            m = self._act(torch.addmm(layer.fc_b, h.to(dt), layer.fc_w))
            x = x + torch.addmm(layer.mlp_b, m, layer.mlp_w).float()
        h = F.layer_norm(x, (self.width,), self.ln_f[0], self.ln_f[1], self.eps)
        return torch.addmm(self.head_b, h, self.head_w.t())

    def _advance(self, slot: _Slot, length: Optional[int] = None) -> None:
        """Feed slot.token at slot.pos; the next logits land in slot.logits."""
        x = self.speech_emb.index_select(0, slot.token)
        slot.logits.copy_(self._forward(x, slot.pos, slot.cache, length)[-1:])
        slot.pos.add_(1)

    def _sample(self, slot: _Slot) -> None:
        """Draw from slot.logits into slot.token and slot.out[slot.step]."""
        logits = slot.logits.masked_fill(
            self.stop_mask & (slot.step < slot.min_tokens), -math.inf
        )
        scores = sampler_scores(
            logits, slot.temperature, slot.kth, slot.top_p_cut, slot.penalty, slot.seen
        )
        token = draw(scores.softmax(dim=-1))
        slot.token.copy_(token)
        slot.out.index_copy_(0, slot.step, token)
        # The penalty saw the start token only at the first step.
        slot.seen.logical_and_(slot.step != 0)
        slot.seen.index_fill_(1, token, True)
        slot.step.add_(1)

    def _step(self, slot: _Slot, length: Optional[int] = None) -> None:
        """One decode step: what the slot's CUDA graph holds (length None)."""
        self._sample(slot)
        self._advance(slot, length)

    def _run_step(self, slot: _Slot, length: int) -> None:
        """A step whose token goes to position length - 1 (host-known)."""
        if slot.graph is not None:
            slot.graph.replay()
        else:
            self._step(slot, length)

    def _capture(self, slot: _Slot) -> None:
        """Capture the slot's step as a CUDA graph (warm-up on a side stream
        first, as PyTorch requires). The slot's state is junk afterwards: the
        caller sets it up before use."""
        slot.pos.zero_()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(slot)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        slot.pos.zero_()
        slot.step.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(slot)
        slot.graph = graph

    # ----------------------------------------------------------------- slots

    def _acquire(self) -> _Slot:
        with self._lock:
            if self._closed:
                raise RuntimeError("the T3 decoder is closed")
            if self._free:
                return self._free.pop()
            self._n_slots += 1
            if self._n_slots > 8:
                _LOGGER.warning("%s T3 decoder slots alive", self._n_slots)
        slot = _Slot(self)
        if self.cuda_graphs:
            try:
                self._capture(slot)
            except Exception:  # pylint: disable=broad-except
                # Capture depends on the GPU, driver and PyTorch at hand; slower
                # speech beats none. The slot is set up afresh before use.
                _LOGGER.warning(
                    "Could not capture T3's decode step as a CUDA graph; decoding "
                    "without graphs from now on (slower). Please report this with "
                    "the error below. --no-cuda-graphs skips the attempt.",
                    exc_info=True,
                )
                self.cuda_graphs = False
                slot.graph = None
        return slot

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            if self._closed:
                return
            self._free.append(slot)

    @property
    def free_slots(self) -> int:
        """Slots in the pool, not held by a generation (for tests and logs)."""
        return len(self._free)

    # ------------------------------------------------------------------- API

    def prefix(self, t3_cond: Any) -> Prefix:
        """The conditioning embeddings' keys and values, once per voice.

        `t3_cond` is not modified (a shallow copy goes to prepare_conditioning,
        which would otherwise cache the prompt embedding into it).
        """
        with torch.inference_mode():
            cond = self.t3.prepare_conditioning(dataclasses.replace(t3_cond))
            if cond.size(0) != 1:
                raise ValueError("T3Decoder decodes one stream at a time (batch 1)")
            length = cond.size(1)
            if length + 2 > self.max_positions:
                raise ValueError(
                    f"the voice prompt ({length} positions) does not fit in the "
                    f"decoder's {self.max_positions} positions"
                )
            kv = torch.zeros(
                (self.n_layer, 2, 1, self.n_head, length, self.head_dim),
                dtype=self.dtype,
                device=self.device,
            )
            x = cond[0].to(device=self.device, dtype=torch.float32)
            self._forward(x, self._positions[:length], kv)
        return Prefix(kv=kv, length=length, decoder_id=id(self))

    def generate(
        self,
        prefix: Prefix,
        text_tokens: torch.Tensor,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        min_tokens: int = 0,
        max_tokens: int = MAX_SPEECH_TOKENS,
    ) -> "Generation":
        """Speech tokens for `text_tokens` (1, T) in the voice of `prefix`.

        Nothing runs until the Generation is iterated. Raises ValueError when the
        prompt does not fit in the cache; when prompt + max_tokens does not, the
        generation is cut (cut=True) where the cache ends.
        """
        if self._closed:
            raise RuntimeError("the T3 decoder is closed")
        if prefix.decoder_id != id(self):
            raise ValueError("this prefix was made by another T3Decoder")
        if text_tokens.dim() != 2 or text_tokens.size(0) != 1:
            raise ValueError("text_tokens must be one row (1, T)")
        values = _param_values(params, self.vocab)
        prompt = prefix.length + text_tokens.size(1) + 1
        room = self.max_positions - prompt
        if room < 1:
            raise ValueError(
                f"the prompt ({prefix.length} voice + {text_tokens.size(1)} text "
                f"positions) does not fit in the decoder's {self.max_positions} "
                "positions: split the text"
            )
        max_tokens = max(0, min(max_tokens, MAX_SPEECH_TOKENS))
        if max_tokens > room:
            _LOGGER.warning(
                "Only %s of %s speech tokens fit after a %s-position prompt",
                room,
                max_tokens,
                prompt,
            )
            max_tokens = room
        return Generation(
            self, prefix, text_tokens, values, should_stop, min_tokens, max_tokens
        )

    def warm_up(self) -> None:
        """Make one slot (and on CUDA capture its graph) ahead of the first call."""
        with torch.inference_mode():
            self._release(self._acquire())

    def release_reference_weights(self) -> None:
        """Free the storage of `t3.tfmr`'s parameters (the float32 transformer):
        the decoder has its own copy, and only it may be used afterwards. In
        float32 on T3's own device the decoder's weights are the same tensors,
        so this frees nothing then (but still makes t3.tfmr unusable)."""
        with torch.no_grad():
            for param in self.t3.tfmr.parameters():
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def close(self) -> None:
        """Drop the slots and their graphs; later generate() calls fail."""
        with self._lock:
            self._closed = True
            self._free.clear()

    # ------------------------------------------------------------ test hooks

    def forced_logits(
        self, prefix: Prefix, text_tokens: torch.Tensor, forced: List[int]
    ) -> torch.Tensor:
        """Logits (len(forced) + 1, vocab) float32 of the prefill and of a step
        per forced speech token, through the same code as the decode step."""
        with torch.inference_mode():
            slot = self._acquire()
            try:
                rows = [self._prefill(slot, prefix, text_tokens).clone()]
                for token in forced:
                    slot.token.fill_(token)
                    self._advance(slot)
                    rows.append(slot.logits.clone())
                return torch.cat(rows)
            finally:
                self._release(slot)

    def _prefill(
        self, slot: _Slot, prefix: Prefix, text_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Copy the prefix in, run text + start token after it (eager)."""
        length = prefix.length
        slot.cache[:, :, :, :, :length].copy_(prefix.kv)
        start = torch.full_like(text_tokens[:, :1], self.start_token)
        x = torch.cat(
            [self.t3.text_emb(text_tokens)[0].float(), self.speech_emb[start[0]]]
        ).to(self.device)
        n = x.size(0)
        positions = self._positions[length : length + n]
        slot.logits.copy_(self._forward(x, positions, slot.cache)[-1:])
        slot.pos.fill_(length + n)
        return slot.logits


class Generation:
    """Blocks of new speech tokens (stop token excluded) as they become known.

    Iterate it in steps: each `next()` runs up to `sync_every` decode steps and
    reads their tokens back once. The slot goes back to the pool when the
    generation ends, is closed, is cancelled or is garbage collected.
    inference_mode is entered per block, not held across a yield: other work
    runs on this thread between blocks.
    """

    def __init__(
        self,
        decoder: T3Decoder,
        prefix: Prefix,
        text_tokens: torch.Tensor,
        values: List[float],
        should_stop: Callable[[], bool],
        min_tokens: int,
        max_tokens: int,
    ) -> None:
        self.cut = False
        self.n_tokens = 0
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self._decoder = decoder
        self._prefix = prefix
        self._text_tokens = text_tokens
        self._values = values
        self._should_stop = should_stop
        self._min_tokens = max(0, min_tokens)
        self._max_tokens = max_tokens
        self._slot: Optional[_Slot] = None
        self._started = False
        self._done = False
        self._ran = 0  # decode steps run
        self._read = 0  # steps whose tokens the host has read
        self._prompt = prefix.length + text_tokens.size(1) + 1
        self._finalizer: Optional[Any] = None

    def __iter__(self) -> Iterator[List[int]]:
        return self

    def __next__(self) -> List[int]:
        if self._done:
            raise StopIteration
        try:
            with torch.inference_mode():
                return self._next_block()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give the slot back; the generation yields nothing more."""
        self._done = True
        if self._finalizer is not None:
            self._finalizer()  # runs once: releases the slot
            self._finalizer = None
        self._slot = None

    def _start(self) -> _Slot:
        dec = self._decoder
        started = time.monotonic()
        slot = dec._acquire()
        self._slot = slot
        # Released when closed or when this object is collected unclosed.
        self._finalizer = weakref.finalize(self, dec._release, slot)
        dec._prefill(slot, self._prefix, self._text_tokens)
        temperature, kth, top_p_cut, penalty = self._values
        slot.temperature.fill_(temperature)
        slot.kth.fill_(int(kth))
        slot.top_p_cut.fill_(top_p_cut)
        slot.penalty.fill_(penalty)
        slot.min_tokens.fill_(self._min_tokens)
        slot.step.zero_()
        slot.seen.zero_()
        slot.seen[0, dec.start_token] = True
        self.prefill_s = time.monotonic() - started
        self._started = True
        return slot

    def _next_block(self) -> List[int]:
        dec = self._decoder
        slot = self._slot if self._started else self._start()
        assert slot is not None
        while True:
            started = time.monotonic()
            target = min(self._read + dec.sync_every, self._max_tokens)
            while self._ran < target:
                if self._should_stop():
                    self.decode_s += time.monotonic() - started
                    raise SynthesisCancelled()
                dec._run_step(slot, self._prompt + self._ran + 1)
                self._ran += 1
            block = slot.out[self._read : self._ran].tolist()
            self._read = self._ran
            self.decode_s += time.monotonic() - started
            if dec.stop_token in block:
                block = block[: block.index(dec.stop_token)]
                self.close()
            elif self._ran >= self._max_tokens:
                self.cut = True
                self.close()
            self.n_tokens += len(block)
            if block:
                return block
            if self._done:
                raise StopIteration
