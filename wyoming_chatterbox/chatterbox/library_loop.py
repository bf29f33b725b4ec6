"""T3.inference_turbo's decode loop on the library's own transformer.

The reference the fast decoder (t3_decoder) is checked against, and the path
behind --no-static-cache: Hugging Face's GPT-2 with its growing cache, the
library's logits processors, torch.multinomial. Same interface as
t3_decoder.Generation. Worker thread only.
"""

import time
from typing import Any, Generator, Iterator, List, Optional

from ..speech import Budget, SamplingParams
from .base import MAX_SPEECH_TOKENS
from .sampling import TURBO_ORDER, logits_processors


class LibraryGeneration:
    """Blocks of new speech tokens as they come, a stop check before every
    token, at most the budget's `max_tokens`, and the stop token held back
    for its `min_tokens`."""

    def __init__(
        self,
        t3: Any,
        t3_cond: Any,
        text_tokens: Any,
        params: SamplingParams,
        budget: Budget,
        block: int = 8,
    ) -> None:
        self.cut = False
        self.n_tokens = 0
        self.steps = 0  # decode steps run (tokens sampled, a stop token included)
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self._args = (t3, t3_cond, text_tokens, params)
        self._budget = budget
        self._max_tokens = min(
            budget.max_tokens or MAX_SPEECH_TOKENS, MAX_SPEECH_TOKENS
        )
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

    def _prefill(self) -> Any:
        """The prompt through the transformer: (history, past, logits)."""
        import torch

        t3, t3_cond, text_tokens, _ = self._args
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
            logits = t3.speech_head(outputs[0][:, -1:])
        self.prefill_s = time.monotonic() - started
        return history, outputs.past_key_values, logits

    def _run(self) -> Generator[List[int], None, None]:
        import torch
        import torch.nn.functional as F

        t3, _, text_tokens, params = self._args
        processors = logits_processors(params, TURBO_ORDER)
        stop_token = t3.hp.stop_speech_token
        # No inference_mode across a yield: another stream's group runs on this
        # thread in between, and the mode is a per-thread setting.
        history, past, logits = self._prefill()
        # `history` is what the repetition penalty sees: the start token at the
        # first step, then the generated tokens only, as upstream.
        generated = torch.zeros((1, 0), dtype=torch.long, device=text_tokens.device)
        block: List[int] = []
        self.cut = True
        for step in range(self._max_tokens):
            self._budget.check()
            started = time.monotonic()
            with torch.inference_mode():
                scores = logits[:, -1, :]
                if step < self._budget.min_tokens:
                    scores = scores.clone()
                    scores[:, stop_token] = -float("inf")
                for processor in processors:
                    scores = processor(history, scores)
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
