"""Hugging Face's logits processors for a set of sampling parameters.

The library's decode loops (Turbo's and Multilingual's, each upstream's order)
build their sampler here; the fast decoder (t3_decoder) has its own on-device
sampler with Turbo's semantics and is checked against this one.
"""

from typing import Any, Dict, List, Sequence

from ..speech import SamplingParams

TURBO_ORDER = ("temperature", "top_k", "top_p", "repetition_penalty")
MULTILINGUAL_ORDER = ("repetition_penalty", "temperature", "top_k", "min_p", "top_p")


def logits_processors(params: SamplingParams, order: Sequence[str]) -> List[Any]:
    """The processors `params` asks for, in `order`; those that would do
    nothing (temperature 0 or 1, top-k 0, top-p 1, min-p 0, penalty 1) are
    left out. Each is called as processor(input_ids, scores)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    made: Dict[str, Any] = {}
    if params.temperature > 0 and params.temperature != 1.0:
        made["temperature"] = TemperatureLogitsWarper(float(params.temperature))
    if params.top_k > 0:
        made["top_k"] = TopKLogitsWarper(int(params.top_k))
    if params.top_p < 1.0:
        made["top_p"] = TopPLogitsWarper(float(params.top_p))
    if params.min_p > 0:
        made["min_p"] = MinPLogitsWarper(float(params.min_p))
    if params.repetition_penalty != 1.0:
        made["repetition_penalty"] = RepetitionPenaltyLogitsProcessor(
            float(params.repetition_penalty)
        )
    return [made[name] for name in order if name in made]
