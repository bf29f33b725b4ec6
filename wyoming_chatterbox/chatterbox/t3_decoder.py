"""A fast speech-token decoder for Chatterbox Turbo's T3 (GPT-2 medium).

Why not the library's loop (turbo._EagerGeneration): it calls Hugging Face's
GPT2Model with a growing cache, samples with torch.multinomial and reads every
token back to the host. Each of these costs a host sync or a reallocation per
token, and the cache API changes between transformers versions. This module
runs its own GPT-2 forward over the same weights with:

- a static KV cache: every generation holds a slot, one row of a pool of
  preallocated device state (cache, logits, position, sampler state); a
  decode step writes at positions held in device tensors, so a step over rows
  [0, n) has fixed shapes, needs no host sync and can be captured as a CUDA
  graph, one per (n, attention span) and captured on first use;
- several generations in one step (`max_batch`): T3 reads its 0.6 GB of
  weights once per step whoever the step serves, so the running generations
  (several clients' sentence groups) advance together. A generation asked for
  its next tokens takes the others along in the same steps, as long as they
  are not far ahead of their own readers (`lead_tokens`); their tokens wait
  for them. On 2 CPU cores at full size, 16 generations in each step made 4
  times the tokens per second of one a step (`script/bench-t3`);
- attention over only as many cache positions as the step needs: on the
  eager path each row's own length, in a graph the smallest multiple of
  `SPAN_STEP` that holds the batch's longest;
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

Threads: everything runs on one thread (the engine's worker), except that a
generation collected by the garbage collector gives its slot back from
whichever thread collects it; that touches only the host's free list.
"""

import dataclasses
import heapq
import logging
import math
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .backend import MAX_SPEECH_TOKENS
from .engine import SamplingParams, SynthesisCancelled

_LOGGER = logging.getLogger(__name__)

# Room for text tokens in the default cache size; a sentence group is far
# shorter (the engine splits text into groups of a few sentences).
TEXT_TOKENS_ROOM = 512
_MARGIN = 16
# A captured step attends over a multiple of this many cache positions.
SPAN_STEP = 256
# Slots beyond this many alive are logged: the engine begins at most 16 groups.
_MANY_SLOTS = 16

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


class _Pool:
    """Every slot's device state, one row per slot.

    A slot is what one generation needs on the device: its KV cache, its last
    logits and token, its position, the tokens it sampled, its sampler state
    and parameters, and whether it takes part in the next step (`active`).
    Rows sit side by side so that one step can serve several generations. A
    step leaves the rows it does not advance as they were, but for junk in
    their cache at their next position, which their own next step writes
    before it reads. Each tensor keeps its address for the pool's life (the
    CUDA graphs read and write them in place): a larger pool is a new one,
    with the old rows copied in and its graphs captured anew.
    """

    def __init__(self, dec: "T3Decoder", capacity: int, old: "Optional[_Pool]") -> None:
        dev = dec.device
        positions = dec.max_positions

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.capacity = capacity
        self.cache = zeros(
            dec.n_layer,
            2,
            capacity,
            dec.n_head,
            positions,
            dec.head_dim,
            dtype=dec.dtype,
        )
        self.logits = zeros(capacity, dec.vocab, dtype=torch.float32)
        self.token = zeros(capacity)
        self.pos = zeros(capacity)
        self.step = zeros(capacity)
        self.out = zeros(capacity, positions)
        self.seen = zeros(capacity, dec.vocab, dtype=torch.bool)
        # Sampling parameters (see _param_values).
        self.temperature = torch.ones((capacity, 1), device=dev)
        self.kth = zeros(capacity, 1)
        self.top_p_cut = torch.full((capacity, 1), -1.0, device=dev)
        self.penalty = torch.ones((capacity, 1), device=dev)
        self.min_tokens = zeros(capacity)
        self.active = zeros(capacity, dtype=torch.bool)
        self.rows = torch.arange(capacity, device=dev)
        # (rows, attention span) -> captured step over rows [0, rows)
        self.graphs: Dict[Tuple[int, int], Any] = {}
        if old is not None:
            with torch.inference_mode():
                self.cache[:, :, : old.capacity].copy_(old.cache)
                for name in _ROW_STATE:
                    getattr(self, name)[: old.capacity].copy_(getattr(old, name))


_ROW_STATE = (
    "logits",
    "token",
    "pos",
    "step",
    "out",
    "seen",
    "temperature",
    "kth",
    "top_p_cut",
    "penalty",
    "min_tokens",
    "active",
)

# Rows of the pool a step runs over: a list (the eager path, each row with its
# own attention length) or a slice of rows side by side (the graph shape).
_Rows = Union[List[int], slice]


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
        max_batch: int = 1,
        lead_tokens: int = 160,
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
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.t3 = t3
        self.device = torch.device(device)
        self.dtype = dtype
        self.sync_every = sync_every
        self.max_batch = max_batch
        # A running generation joins another's steps while fewer than this
        # many of its tokens wait for its reader.
        self.lead_tokens = lead_tokens
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
        # The attention spans a captured step may have.
        self.spans = list(range(SPAN_STEP, max_positions, SPAN_STEP))
        self.spans.append(max_positions)

        with torch.inference_mode():
            self._load_weights(t3)
            self._positions = torch.arange(max_positions, device=self.device)
        self.vocab: int = int(self.head_w.size(0))
        self.steps_run = 0  # decode steps, each for one generation or several
        self._pool: Optional[_Pool] = None
        self._free: List[int] = []  # rows made and not held, a heap
        self._n_slots = 0  # rows made
        # Started generations that may still step, in the order they started.
        self._running: List["weakref.ref[Generation]"] = []
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
        cache: torch.Tensor,
        rows: _Rows,
        positions: torch.Tensor,
        lengths: Union[List[int], int],
    ) -> torch.Tensor:
        """GPT-2 blocks over `x` (B, n, width) float32 input embeddings of B
        rows of `cache` (layers, 2, rows, heads, positions, head_dim), at
        `positions` (B, n) long (position embeddings added here): writes each
        row's keys and values at its positions, attends causally, returns the
        float32 logits (B, vocab) of each row's last position.

        `rows` a list: row b attends over its first `lengths[b]` positions,
        known to the host, so nothing past what it has written is read.
        `rows` a slice (B rows side by side): one attention over the first
        `lengths` (an int) positions of every row, masked by the positions
        tensor: fixed shapes and no host-known length, what a graph holds.
        """
        batch, n, _ = x.shape
        heads, hd, dt, width = self.n_head, self.head_dim, self.dtype, self.width
        x = x + self.wpe[positions]
        if isinstance(rows, slice):
            assert isinstance(lengths, int)
            span = lengths
            mask = (self._positions[:span] <= positions.unsqueeze(-1)).unsqueeze(1)
            where = positions.view(batch, 1, n, 1).expand(batch, heads, n, hd)
        else:
            assert isinstance(lengths, list)
            row_lengths = lengths
            masks = [
                self._positions[:length] <= positions[b].unsqueeze(-1)
                for b, length in enumerate(row_lengths)
            ]
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (width,), layer.ln_1[0], layer.ln_1[1], self.eps)
            qkv = torch.addmm(layer.attn_b, h.view(-1, width).to(dt), layer.attn_w)
            # Each (B, heads, n, head_dim).
            q, k, v = qkv.view(batch, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
            if isinstance(rows, slice):
                cache_k, cache_v = cache[i, 0, rows], cache[i, 1, rows]
                cache_k.scatter_(2, where, k)
                cache_v.scatter_(2, where, v)
                a = F.scaled_dot_product_attention(
                    q,
                    cache_k[:, :, :span],
                    cache_v[:, :, :span],
                    attn_mask=mask,
                    scale=layer.scale,
                )
            else:
                parts = []
                for b, row in enumerate(rows):
                    cache_k, cache_v = cache[i, 0, row], cache[i, 1, row]
                    cache_k.index_copy_(1, positions[b], k[b])
                    cache_v.index_copy_(1, positions[b], v[b])
                    length = row_lengths[b]
                    parts.append(
                        F.scaled_dot_product_attention(
                            q[b : b + 1],
                            cache_k[:, :length].unsqueeze(0),
                            cache_v[:, :length].unsqueeze(0),
                            attn_mask=masks[b],
                            scale=layer.scale,
                        )
                    )
                a = parts[0] if batch == 1 else torch.cat(parts)
            a = a.transpose(1, 2).reshape(batch * n, width)
            x = x + torch.addmm(layer.proj_b, a, layer.proj_w).float().view_as(x)
            h = F.layer_norm(x, (width,), layer.ln_2[0], layer.ln_2[1], self.eps)
            m = self._act(torch.addmm(layer.fc_b, h.view(-1, width).to(dt), layer.fc_w))
            x = x + torch.addmm(layer.mlp_b, m, layer.mlp_w).float().view_as(x)
        h = F.layer_norm(x[:, -1], (width,), self.ln_f[0], self.ln_f[1], self.eps)
        return torch.addmm(self.head_b, h, self.head_w.t())

    def _sample(self, pool: _Pool, idx: torch.Tensor) -> None:
        """Draw from the rows' logits into their token and out[step]; rows not
        active keep their state (but for out[step], not read before written)."""
        active = pool.active[idx]
        step = pool.step[idx]
        held = self.stop_mask & (step < pool.min_tokens[idx]).unsqueeze(1)
        scores = sampler_scores(
            pool.logits[idx].masked_fill(held, -math.inf),
            pool.temperature[idx],
            pool.kth[idx],
            pool.top_p_cut[idx],
            pool.penalty[idx],
            pool.seen[idx],
        )
        token = torch.where(active, draw(scores.softmax(dim=-1)), pool.token[idx])
        pool.token[idx] = token
        pool.out[idx, step] = token
        # The penalty saw the start token only at the first step.
        seen = pool.seen[idx]
        updated = seen & (step != 0).unsqueeze(1)
        updated.scatter_(1, token.unsqueeze(1), True)
        pool.seen[idx] = torch.where(active.unsqueeze(1), updated, seen)
        pool.step[idx] = step + active

    def _advance(
        self,
        pool: _Pool,
        idx: torch.Tensor,
        rows: _Rows,
        lengths: Union[List[int], int],
    ) -> None:
        """Feed the rows' tokens at their positions; next logits into the rows.
        A row not active writes junk at its next position and keeps the rest."""
        active = pool.active[idx]
        pos = pool.pos[idx]
        x = self.speech_emb[pool.token[idx]].unsqueeze(1)
        # A finished row may sit at the end of the cache: its junk goes to the
        # last position, which it will not read again.
        at = pos.clamp(max=self.max_positions - 1).unsqueeze(1)
        logits = self._forward(x, pool.cache, rows, at, lengths)
        pool.logits[idx] = torch.where(active.unsqueeze(1), logits, pool.logits[idx])
        pool.pos[idx] = pos + active

    def _step(
        self,
        pool: _Pool,
        idx: torch.Tensor,
        rows: _Rows,
        lengths: Union[List[int], int],
    ) -> None:
        """One decode step of the active ones of `rows` (`idx` the same rows as
        a device tensor): sample a token each, then feed it."""
        self._sample(pool, idx)
        self._advance(pool, idx, rows, lengths)

    def _graph_body(self, pool: _Pool, n: int, span: int) -> Callable[[], None]:
        """The step a graph holds: rows [0, n), attention over `span` positions."""
        idx = pool.rows[:n]
        rows = slice(0, n)
        return lambda: self._step(pool, idx, rows, span)

    def _run_step(
        self, rows: List[int], lengths: List[int], idx: Optional[torch.Tensor] = None
    ) -> None:
        """One step of the slots `rows`, each with its host-known attention
        length (its position + 1); the rows must be the active ones. `idx`:
        the rows as a device tensor, if the caller has it already."""
        pool = self._pool
        assert pool is not None
        self.steps_run += 1
        if self.cuda_graphs:
            n = 1 << max(rows).bit_length()  # rows [0, n): a power of two
            span = next(s for s in self.spans if s >= max(lengths))
            graph = self._graph(pool, n, span)
            if graph is not None:
                graph.replay()
                return
        if idx is None:
            idx = torch.tensor(rows, device=self.device)
        self._step(pool, idx, rows, lengths)

    def _graph(self, pool: _Pool, n: int, span: int) -> Optional[Any]:
        """The captured step for (n, span), captured now if it is new; None if
        capture fails (then the decoder goes on without graphs)."""
        graph = pool.graphs.get((n, span))
        if graph is not None or not self.cuda_graphs:
            return graph
        try:
            graph = self._capture(pool, n, span)
        except Exception:  # pylint: disable=broad-except
            # Capture depends on the GPU, driver and PyTorch at hand; slower
            # speech beats none.
            _LOGGER.warning(
                "Could not capture T3's decode step as a CUDA graph; decoding "
                "without graphs from now on (slower). Please report this with "
                "the error below. --no-cuda-graphs skips the attempt.",
                exc_info=True,
            )
            self.cuda_graphs = False
            return None
        pool.graphs[(n, span)] = graph
        return graph

    def _capture(self, pool: _Pool, n: int, span: int) -> Any:
        """Capture the step over rows [0, n) as a CUDA graph, after warm-up
        steps on a side stream as PyTorch requires. No row is active meanwhile,
        so the rows of running generations keep their state."""
        body = self._graph_body(pool, n, span)
        active = pool.active.clone()
        pool.active.zero_()
        try:
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
        finally:
            pool.active.copy_(active)
        return graph

    # ----------------------------------------------------------------- slots

    def _acquire(self) -> int:
        """A free row of the pool (the lowest: batches stay short), the pool
        made or doubled when all its rows are held."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the T3 decoder is closed")
            if self._free:
                return heapq.heappop(self._free)
            row = self._n_slots
            self._n_slots += 1
            if self._n_slots > _MANY_SLOTS:
                _LOGGER.warning("%s T3 decoder slots alive", self._n_slots)
        pool = self._pool
        if pool is None or row >= pool.capacity:
            capacity = 1 if pool is None else 2 * pool.capacity
            while capacity <= row:
                capacity *= 2
            self._pool = _Pool(self, capacity, pool)
        return row

    def _release(self, row: int) -> None:
        with self._lock:
            if self._closed:
                return
            heapq.heappush(self._free, row)

    @property
    def free_slots(self) -> int:
        """Slots in the pool, not held by a generation (for tests and logs)."""
        return len(self._free)

    def _companions(self, primary: "Generation") -> List["Generation"]:
        """Running generations to take along in `primary`'s steps: those not
        far ahead of their readers, at most max_batch - 1, the earliest begun
        first (one whose stop flag is up drops out before the first step)."""
        found: List[Generation] = []
        running: List["weakref.ref[Generation]"] = []
        for ref in self._running:
            other = ref()
            if other is None or other._finished:
                continue
            running.append(ref)
            if (
                other is primary
                or len(found) + 1 >= self.max_batch
                or len(other._buffer) >= self.lead_tokens
                or other._ran >= other._max_tokens
            ):
                continue
            found.append(other)
        self._running = running
        return found

    def _run_block(self, primary: "Generation") -> bool:
        """Up to sync_every steps of `primary`, with its companions in the same
        steps, then one read of all their new tokens. Each one's stop flag is
        read before each of its steps; True if `primary`'s turned true."""
        pool = self._pool
        assert pool is not None
        members = [primary] + (self._companions(primary) if self.max_batch > 1 else [])
        budget = {id(g): min(self.sync_every, g._max_tokens - g._ran) for g in members}
        mask = torch.zeros(pool.capacity, dtype=torch.bool)
        mask[[g._row for g in members]] = True
        pool.active.copy_(mask)
        live = members
        # The rows as a device tensor for the eager step, made again only when
        # a member drops out (not once per token).
        live_rows = [g._row for g in live]
        live_idx = torch.tensor(live_rows, device=self.device)
        cancelled = False
        started = time.monotonic()
        for n in range(self.sync_every):
            going = []
            for g in live:
                if n >= budget[id(g)]:
                    continue
                if g._should_stop():
                    cancelled = cancelled or g is primary
                    continue
                going.append(g)
            if len(going) < len(live):
                for g in live:
                    if g not in going:
                        pool.active[g._row] = False
                live = going
                live_rows = [g._row for g in live]
                live_idx = torch.tensor(live_rows, device=self.device)
            if primary not in live:
                break
            self._run_step(live_rows, [g._prompt + g._ran + 1 for g in live], live_idx)
            for g in live:
                g._ran += 1
                g.batched_steps += len(live)
        took = time.monotonic() - started
        start = min(g._read for g in members)
        end = max(g._ran for g in members)
        rows = torch.tensor([g._row for g in members], device=self.device)
        sampled = pool.out[rows, start:end].tolist()
        for g, tokens in zip(members, sampled):
            g.decode_s += took
            g._take(tokens[g._read - start : g._ran - start])
        return cancelled

    # ------------------------------------------------------------------- API

    def prefix(self, t3_cond: Any) -> Prefix:
        """The conditioning embeddings' keys and values, once per voice.

        `t3_cond` is not modified (a shallow copy goes to prepare_conditioning,
        which would otherwise cache the prompt embedding into it).
        """
        with torch.inference_mode():
            cond = self.t3.prepare_conditioning(dataclasses.replace(t3_cond))
            if cond.size(0) != 1:
                raise ValueError("T3Decoder.prefix takes one voice (batch 1)")
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
            x = cond.to(device=self.device, dtype=torch.float32)
            self._forward(x, kv, [0], self._positions[:length].unsqueeze(0), [length])
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
        """Make the pool's first slot and, on CUDA, capture the one-row steps
        ahead of the first call (steps of several rows are captured the first
        time that many generations run together)."""
        with torch.inference_mode():
            row = self._acquire()
            try:
                pool = self._pool
                assert pool is not None
                for span in self.spans:
                    if not self.cuda_graphs:
                        break
                    self._graph(pool, 1, span)
            finally:
                self._release(row)

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
            self._running.clear()
            self._pool = None

    # ------------------------------------------------------------ test hooks

    def forced_logits(
        self, prefix: Prefix, text_tokens: torch.Tensor, forced: List[int]
    ) -> torch.Tensor:
        """Logits (len(forced) + 1, vocab) float32 of the prefill and of a step
        per forced speech token, through the same code as the decode step."""
        with torch.inference_mode():
            row = self._acquire()
            try:
                pool = self._pool
                assert pool is not None
                rows = [self._prefill(row, prefix, text_tokens).clone()]
                idx = torch.tensor([row], device=self.device)
                pool.active[row] = True
                for token in forced:
                    pool.token[row] = token
                    length = int(pool.pos[row]) + 1
                    self._advance(pool, idx, [row], [length])
                    rows.append(pool.logits[row : row + 1].clone())
                pool.active[row] = False
                return torch.cat(rows)
            finally:
                self._release(row)

    def _prefill(
        self, row: int, prefix: Prefix, text_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Copy the prefix into the row, run text + start token after it (eager);
        returns the row's logits (1, vocab)."""
        pool = self._pool
        assert pool is not None
        length = prefix.length
        pool.cache[:, :, row : row + 1, :, :length].copy_(prefix.kv)
        start = torch.full_like(text_tokens[:, :1], self.start_token)
        x = torch.cat(
            [self.t3.text_emb(text_tokens)[0].float(), self.speech_emb[start[0]]]
        ).to(self.device)
        n = x.size(0)
        positions = self._positions[length : length + n].unsqueeze(0)
        pool.logits[row] = self._forward(
            x.unsqueeze(0), pool.cache, [row], positions, [length + n]
        )[0]
        pool.pos[row] = length + n
        return pool.logits[row : row + 1]


class Generation:
    """Blocks of new speech tokens (stop token excluded) as they become known.

    Iterate it in steps: each `next()` returns the tokens that other
    generations' steps already made for it, or else runs up to `sync_every`
    decode steps (taking other running generations along) and reads their
    tokens back once. The slot goes back to the pool when the last step is
    known, or when the generation is closed, cancelled or garbage collected.
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
        self.n_tokens = 0  # tokens returned
        self.prefill_s = 0.0
        # Seconds of the decode steps this generation took part in.
        self.decode_s = 0.0
        # Sum over its steps of the generations in each: / steps = mean batch.
        self.batched_steps = 0
        self._decoder = decoder
        self._prefix = prefix
        self._text_tokens = text_tokens
        self._values = values
        self._should_stop = should_stop
        self._min_tokens = max(0, min_tokens)
        self._max_tokens = max_tokens
        self._row = -1
        self._started = False
        self._finished = False  # no more steps: the stop token or max_tokens
        self._done = False  # nothing more to return
        self._ran = 0  # decode steps run
        self._read = 0  # steps whose tokens the host has read
        self._buffer: List[int] = []  # tokens read, not yet returned
        self._prompt = prefix.length + text_tokens.size(1) + 1
        self._finalizer: Optional[Any] = None

    @property
    def steps(self) -> int:
        """Decode steps run (tokens sampled, a stop token included)."""
        return self._ran

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
        self._finished = True
        self._buffer = []
        self._free_slot()

    def _free_slot(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs once: releases the slot
            self._finalizer = None

    def start(self) -> None:
        """Take a slot and run the prompt now (the first next() otherwise does):
        a group begun this way joins the next step of any running generation,
        so a crowd of new groups all get the prompt done before the first of
        them takes its steps."""
        if not self._started and not self._done:
            with torch.inference_mode():
                self._start()

    def _start(self) -> None:
        dec = self._decoder
        started = time.monotonic()
        row = dec._acquire()
        self._row = row
        # Released when finished or closed, or when this object is collected.
        self._finalizer = weakref.finalize(self, dec._release, row)
        dec._prefill(row, self._prefix, self._text_tokens)
        pool = dec._pool
        assert pool is not None
        temperature, kth, top_p_cut, penalty = self._values
        pool.temperature[row] = temperature
        pool.kth[row] = int(kth)
        pool.top_p_cut[row] = top_p_cut
        pool.penalty[row] = penalty
        pool.min_tokens[row] = self._min_tokens
        pool.step[row] = 0
        pool.seen[row] = False
        pool.seen[row, dec.start_token] = True
        self.prefill_s = time.monotonic() - started
        self._started = True
        dec._running.append(weakref.ref(self))

    def _next_block(self) -> List[int]:
        if not self._started:
            self._start()
        while True:
            if self._buffer:
                block, self._buffer = self._buffer, []
                self.n_tokens += len(block)
                if self._finished:
                    self._done = True
                return block
            if self._finished:
                self.close()
                raise StopIteration
            if self._ran >= self._max_tokens:
                self._end(cut=True)
                continue
            if self._decoder._run_block(self):
                raise SynthesisCancelled()

    def _take(self, tokens: List[int]) -> None:
        """The tokens of its latest steps, read back by the decoder."""
        self._read = self._ran
        stop = self._decoder.stop_token
        if stop in tokens:
            tokens = tokens[: tokens.index(stop)]
            self._end(cut=False)
        elif self._ran >= self._max_tokens:
            self._end(cut=True)
        self._buffer.extend(tokens)

    def _end(self, cut: bool) -> None:
        """No more steps: the slot goes back now, the tokens read stay."""
        self.cut = cut
        self._finished = True
        self._free_slot()
