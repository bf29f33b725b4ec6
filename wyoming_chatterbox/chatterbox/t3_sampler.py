"""T3's sampler on the device: Hugging Face's warpers as tensor maths.

Temperature, top-k, top-p and the repetition penalty in the reference's order
and semantics, with every parameter a device tensor (so one captured CUDA graph
serves every parameter set), and a multinomial draw without a host sync. Pure
functions of tensors; the slots that hold the state live in t3_step.
"""

import math
from typing import List

import torch

from ..speech import SamplingParams


def param_values(params: SamplingParams, vocab: int) -> List[float]:
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
