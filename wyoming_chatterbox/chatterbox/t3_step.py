"""One decode step of Chatterbox Turbo's T3 (GPT-2) over a pool of slots.

`T3Step` holds the weights in the decoder's precision and runs the maths: a
forward over rows of a static KV cache (t3_slots.SlotPool) with fixed shapes
and no host read, so that the same step runs eagerly or as a CUDA graph
(cuda_graphs), and the on-device sampler (t3_sampler). Which slots step when
is t3_decoder's job.

Precision: matrix products, the KV cache and attention (SDPA) run in the
decoder's dtype; the residual stream, the layer norms and the logits stay in
float32, so bfloat16 loses little more than its matmul rounding.
"""

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import MAX_SPEECH_TOKENS
from .t3_sampler import draw, sampler_scores
from .t3_slots import SlotPool

# Room for text tokens in the default cache size; a sentence group is far
# shorter (the engine splits text into groups of a few sentences).
TEXT_TOKENS_ROOM = 512
_MARGIN = 16
# A captured step attends over a multiple of this many cache positions.
SPAN_STEP = 256

_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


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


class T3Step:
    """T3's weights and its decode step over the rows of a SlotPool."""

    def __init__(
        self,
        t3: Any,
        device: str,
        dtype: torch.dtype,
        max_positions: Optional[int] = None,
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
        self.t3 = t3
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_layer = cfg.n_layer
        self.width = cfg.n_embd
        self.n_head = cfg.n_head
        self.head_dim = self.width // self.n_head
        self.eps = cfg.layer_norm_epsilon
        self._act: Callable[[torch.Tensor], torch.Tensor]
        self._act = _ACTIVATIONS[cfg.activation_function]
        self.start_token = t3.hp.start_speech_token
        self.stop_token = t3.hp.stop_speech_token
        self.max_positions = self._positions_for(t3, max_positions)
        # The attention spans a captured step may have.
        self.spans = list(range(SPAN_STEP, self.max_positions, SPAN_STEP))
        self.spans.append(self.max_positions)
        with torch.inference_mode():
            self._load_weights(t3)
            self.positions = torch.arange(self.max_positions, device=self.device)
        self.vocab: int = int(self.head_w.size(0))

    @staticmethod
    def _positions_for(t3: Any, max_positions: Optional[int]) -> int:
        tfmr = t3.tfmr
        n_positions = min(tfmr.config.n_positions, tfmr.wpe.weight.size(0))
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
        return max_positions

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
        rows: slice,
        positions: torch.Tensor,
        span: int,
    ) -> torch.Tensor:
        """GPT-2 blocks over `x` (B, n, width) float32 input embeddings of the
        B rows `rows` of `cache` (layers, 2, rows, heads, positions, head_dim)
        at `positions` (B, n) long (position embeddings added here): writes
        each row's keys and values at its positions, attends causally over
        the first `span` cache positions (masked by the positions tensor, so
        each row sees only what it wrote) and returns the float32 final
        hidden state (B, width) of each row's last position.

        Fixed shapes and no host read of any tensor: what a CUDA graph holds,
        and the eager step too (one attention call for all rows, not one per
        row).
        """
        batch, n, _ = x.shape
        heads, hd, dt, width = self.n_head, self.head_dim, self.dtype, self.width
        x = x + self.wpe[positions]
        mask = (self.positions[:span] <= positions.unsqueeze(-1)).unsqueeze(1)
        where = positions.view(batch, 1, n, 1).expand(batch, heads, n, hd)
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, (width,), layer.ln_1[0], layer.ln_1[1], self.eps)
            qkv = torch.addmm(layer.attn_b, h.view(-1, width).to(dt), layer.attn_w)
            # Each (B, heads, n, head_dim).
            q, k, v = qkv.view(batch, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
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
            a = a.transpose(1, 2).reshape(batch * n, width)
            x = x + torch.addmm(layer.proj_b, a, layer.proj_w).float().view_as(x)
            h = F.layer_norm(x, (width,), layer.ln_2[0], layer.ln_2[1], self.eps)
            m = self._act(torch.addmm(layer.fc_b, h.view(-1, width).to(dt), layer.fc_w))
            x = x + torch.addmm(layer.mlp_b, m, layer.mlp_w).float().view_as(x)
        return F.layer_norm(x[:, -1], (width,), self.ln_f[0], self.ln_f[1], self.eps)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.head_b, hidden, self.head_w.t())

    def _sample(self, pool: SlotPool, idx: torch.Tensor) -> None:
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

    def _advance(self, pool: SlotPool, rows: slice, span: int) -> None:
        """Feed the rows' tokens at their positions; next logits into the rows.
        A row not active writes junk at its next position and keeps the rest."""
        active = pool.active[rows]
        pos = pool.pos[rows]
        x = self.speech_emb[pool.token[rows]].unsqueeze(1)
        # A finished row may sit at the end of the cache: its junk goes to the
        # last position, which it will not read again.
        at = pos.clamp(max=self.max_positions - 1).unsqueeze(1)
        logits = self._logits(self._forward(x, pool.cache, rows, at, span))
        pool.logits[rows] = torch.where(active.unsqueeze(1), logits, pool.logits[rows])
        pool.pos[rows] = pos + active

    def _step(self, pool: SlotPool, rows: slice, span: int) -> None:
        """One decode step of the active ones of `rows`: sample a token each,
        then feed it."""
        self._sample(pool, pool.rows[rows])
        self._advance(pool, rows, span)

    def span_for(self, length: int) -> int:
        """The attention span of a captured step that holds `length` positions."""
        return next(s for s in self.spans if s >= length)

    def eager(self, pool: SlotPool, lo: int, hi: int, span: int) -> None:
        """One step of rows [lo, hi) of the step pool, attending over `span`
        positions (at least the longest row's position + 1)."""
        self._step(pool, slice(lo, hi), span)

    def graph_body(self, pool: SlotPool, n: int, span: int) -> Callable[[], None]:
        """The step a CUDA graph holds: rows [0, n), attention over `span`."""
        rows = slice(0, n)
        return lambda: self._step(pool, rows, span)

    # --------------------------------------------------------------- prompt

    def prefix_kv(self, t3_cond: Any) -> Tuple[torch.Tensor, int]:
        """The keys and values of a voice's conditioning embeddings, and their
        length. `t3_cond` is not modified (a shallow copy goes to
        prepare_conditioning, which would otherwise cache the prompt embedding
        into it)."""
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
            positions = self.positions[:length].unsqueeze(0)
            self._forward(x, kv, slice(0, 1), positions, length)
        return kv, length

    def prefill(
        self,
        pool: SlotPool,
        row: int,
        kv: torch.Tensor,
        length: int,
        text_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Copy a voice prompt's keys and values (kv, length) into the row and
        run text + start token after it (eager); returns the row's final
        hidden state (1, width) and leaves its logits in the row."""
        pool.cache[:, :, row : row + 1, :, :length].copy_(kv)
        start = torch.full_like(text_tokens[:, :1], self.start_token)
        x = torch.cat(
            [self.t3.text_emb(text_tokens)[0].float(), self.speech_emb[start[0]]]
        ).to(self.device)
        n = x.size(0)
        positions = self.positions[length : length + n].unsqueeze(0)
        rows = slice(row, row + 1)
        hidden = self._forward(x.unsqueeze(0), pool.cache, rows, positions, length + n)
        pool.logits[row] = self._logits(hidden)[0]
        pool.pos[row] = length + n
        return hidden

    def forced(
        self,
        pool: SlotPool,
        row: int,
        kv: torch.Tensor,
        length: int,
        text_tokens: torch.Tensor,
        tokens: List[int],
    ) -> torch.Tensor:
        """Final hidden states (len(tokens) + 1, width) float32 of the prefill
        and of a step per forced speech token, through the decode step's own
        code (for tests and the start-up self-check)."""
        states = [self.prefill(pool, row, kv, length, text_tokens)]
        rows = slice(row, row + 1)
        pool.active[row] = True
        for n, token in enumerate(tokens):
            pool.token[row] = token
            span = length + text_tokens.size(1) + 2 + n
            x = self.speech_emb[pool.token[rows]].unsqueeze(1)
            at = pool.pos[rows].unsqueeze(1)
            states.append(self._forward(x, pool.cache, rows, at, span))
            pool.pos[row] += 1
        pool.active[row] = False
        return torch.cat(states)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Speech-token logits (B, vocab) float32 of final hidden states."""
        return self._logits(hidden)
