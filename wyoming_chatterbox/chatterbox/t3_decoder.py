"""A fast speech-token decoder for Chatterbox Turbo's T3: who steps when.

Why not the library's loop (library_loop): it calls Hugging Face's GPT2Model
with a growing cache, samples with torch.multinomial and reads every token back
to the host, a sync or a reallocation per token. Here (the maths in t3_step):

- every generation holds a slot, a row of a pool of static device state
  (t3_slots), so a step over rows [0, n) has fixed shapes and can be a CUDA
  graph replay (cuda_graphs: all captured by `prepare()`, at load); before
  each block the generations it serves are packed into the lowest rows, so
  a step costs what it serves, not what ran before;
- several generations advance in one step (`max_batch`): T3 reads its weights
  once per step whoever the step serves, so a generation asked for its next
  tokens takes the other running ones along, unless they are `lead_tokens`
  ahead of their readers;
- the voice prompt's keys and values are computed once per voice (`prefix`);
- the host reads the sampled tokens every `sync_every` steps only.

Threads: one (the engine's worker), except that a generation collected by the
garbage collector gives its slot back from whichever thread collects it; that
touches only the slots' bookkeeping, under their lock.

Long (~500 lines): a generation's whole life in the decoder.
"""

import dataclasses
import logging
import time
import weakref
from typing import Any, Iterator, List, Optional

import torch

from ..speech import Budget, SamplingParams, SynthesisCancelled
from . import cuda_graphs
from .base import MAX_SPEECH_TOKENS
from .cuda_graphs import StepGraphs, capture_steps
from .t3_sampler import param_values
from .t3_slots import SlotPool, Slots, pow2_at_least
from .t3_step import T3Step

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prefix:
    """A voice prompt's keys and values for every layer, made by T3Decoder.prefix.

    Read only: generate() copies it into a slot's cache and never writes to it,
    so the caller can keep one per voice and share it between streams.
    """

    kv: torch.Tensor  # (layers, 2, 1, heads, length, head_dim), decoder's dtype
    length: int
    decoder_id: int


@dataclasses.dataclass(eq=False)  # compared by identity (`in`, `not in`)
class _Member:
    """One generation's state in the decoder; only T3Decoder reads or writes
    it (a Generation only reads its results)."""

    prefix: Prefix
    text_tokens: torch.Tensor
    values: List[float]  # t3_sampler.param_values
    budget: Budget
    max_tokens: int
    prompt: int  # positions before the first speech token
    started: bool = False
    finished: bool = False  # no more steps: the stop token or max_tokens
    done: bool = False  # nothing more to return
    ran: int = 0  # decode steps run
    read: int = 0  # steps whose tokens the host has read
    buffer: List[int] = dataclasses.field(default_factory=list)
    finalizer: Optional[Any] = None
    # Results:
    cut: bool = False
    n_tokens: int = 0  # tokens returned
    prefill_s: float = 0.0
    decode_s: float = 0.0  # seconds of the steps it took part in
    batched_steps: int = 0  # sum over its steps of the generations in each


class T3Decoder:
    """Static-cache GPT-2 decoding of T3's speech tokens (see the module doc)."""

    def __init__(
        self,
        t3: Any,
        device: str,
        dtype: torch.dtype,
        max_positions: Optional[int] = None,
        sync_every: int = 8,
        max_batch: int = 1,
        lead_tokens: int = 160,
    ) -> None:
        if sync_every < 1:
            raise ValueError("sync_every must be at least 1")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.step = T3Step(t3, device, dtype, max_positions)
        self.device = self.step.device
        self.dtype = dtype
        self.max_positions = self.step.max_positions
        self.start_token = self.step.start_token
        self.stop_token = self.step.stop_token
        self.sync_every = sync_every
        self.max_batch = max_batch
        # A running generation joins another's steps while fewer than this
        # many of its tokens wait for its reader.
        self.lead_tokens = lead_tokens
        self.steps_run = 0  # decode steps, each for one generation or several
        self._slots = Slots(self.step, pow2_at_least(max_batch), self._length_of)
        self.graphs: Optional[StepGraphs] = None
        self.slot_memory = 0  # bytes of the step pool made by prepare()
        # Started generations that may still step, in the order they started.
        self._running: List[_Member] = []
        self._closed = False

    @property
    def pool(self) -> Optional[SlotPool]:
        """The step pool: the rows a decode step runs over."""
        return self._slots.pool

    @property
    def cuda_graphs(self) -> bool:
        return self.graphs is not None

    @property
    def free_slots(self) -> int:
        """Slots made and not held by a generation (for tests and logs)."""
        return self._slots.free

    @property
    def n_slots(self) -> int:
        return self._slots.made

    # ------------------------------------------------------------------- API

    def prepare(self, graphs: bool, memory_share: float = 0.5) -> None:
        """Ready the decoder before the first generation. With `graphs` on a
        GPU: the step pool made at once, at max_batch rows (rounded up to a
        power of two; fewer where they would take more than `memory_share`
        of the free GPU memory, and max_batch with them), and every decode
        step captured as a CUDA graph. Elsewhere rows are made as needed.

        Raises CaptureFailed when a capture fails (graphs stay off, the eager
        step works), RuntimeError when even recovery failed.
        """
        if not graphs or not cuda_graphs.CUDA.is_gpu(self.device):
            return
        per_row = SlotPool.row_bytes(self.step)
        rows = self._slots.step_rows
        free = cuda_graphs.CUDA.free_memory(self.device)
        while rows > 1 and rows * per_row > memory_share * free:
            rows //= 2
        if rows < self._slots.step_rows:
            _LOGGER.warning(
                "T3 steps serve up to %s groups, not %s: %s GB of GPU memory are "
                "free and each group's cache takes %.2f GB (--t3-batch)",
                rows,
                self.max_batch,
                round(free / 1e9, 1),
                per_row / 1e9,
            )
        pool = self._slots.reserve(rows)
        self.max_batch = min(self.max_batch, rows)
        self.slot_memory = rows * per_row
        sizes = [1 << i for i in range(rows.bit_length())]
        with torch.inference_mode():
            self.graphs = capture_steps(
                lambda n, span: self.step.graph_body(pool, n, span),
                sizes,
                self.step.spans,
                self.device,
            )

    def drop_graphs(self) -> None:
        """Step eagerly from now on (the self-check found the graphs wrong)."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    def prefix(self, t3_cond: Any) -> Prefix:
        """The conditioning embeddings' keys and values, once per voice."""
        kv, length = self.step.prefix_kv(t3_cond)
        return Prefix(kv=kv, length=length, decoder_id=id(self))

    def generate(
        self,
        prefix: Prefix,
        text_tokens: torch.Tensor,
        params: SamplingParams,
        budget: Budget = Budget(),
    ) -> "Generation":
        """Speech tokens for `text_tokens` (1, T) in the voice of `prefix`.

        Nothing runs until the Generation is started or iterated. Raises
        ValueError when the prompt does not fit in the cache; when prompt +
        max_tokens does not, the generation is cut (cut=True) where it ends.
        """
        if self._closed:
            raise RuntimeError("the T3 decoder is closed")
        if prefix.decoder_id != id(self):
            raise ValueError("this prefix was made by another T3Decoder")
        if text_tokens.dim() != 2 or text_tokens.size(0) != 1:
            raise ValueError("text_tokens must be one row (1, T)")
        values = param_values(params, self.step.vocab)
        prompt = prefix.length + text_tokens.size(1) + 1
        room = self.max_positions - prompt
        if room < 1:
            raise ValueError(
                f"the prompt ({prefix.length} voice + {text_tokens.size(1)} text "
                f"positions) does not fit in the decoder's {self.max_positions} "
                "positions: split the text"
            )
        wanted = MAX_SPEECH_TOKENS if budget.max_tokens is None else budget.max_tokens
        max_tokens = max(0, min(wanted, MAX_SPEECH_TOKENS))
        if max_tokens > room:
            _LOGGER.warning(
                "Only %s of %s speech tokens fit after a %s-position prompt",
                room,
                max_tokens,
                prompt,
            )
            max_tokens = room
        member = _Member(prefix, text_tokens, values, budget, max_tokens, prompt)
        return Generation(self, member)

    def release_reference_weights(self) -> None:
        """Free the storage of `t3.tfmr`'s parameters (the float32 transformer):
        the decoder has its own copy, and only it may be used afterwards. In
        float32 on T3's own device the decoder's weights are the same tensors,
        so this frees nothing then (but still makes t3.tfmr unusable)."""
        with torch.no_grad():
            for param in self.step.t3.tfmr.parameters():
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def close(self) -> None:
        """Drop the slots and their graphs; later generate() calls fail."""
        self._closed = True
        self._running.clear()
        self.drop_graphs()
        self._slots.close()

    def forced_states(
        self, prefix: Prefix, text_tokens: torch.Tensor, forced: List[int]
    ) -> torch.Tensor:
        """Final hidden states (len(forced) + 1, width) float32 of the prefill
        and of a step per forced speech token, through the decode step's own
        code (for tests and the start-up self-check)."""
        owner = object()
        with torch.inference_mode():
            self._slots.acquire(owner)
            try:
                self._slots.pack([owner], low=True)
                pool, row = self._slots.locate(owner)
                kv, length = prefix.kv, prefix.length
                return self.step.forced(pool, row, kv, length, text_tokens, forced)
            finally:
                self._slots.release(owner)

    def forced_logits(
        self, prefix: Prefix, text_tokens: torch.Tensor, forced: List[int]
    ) -> torch.Tensor:
        """The logits (len(forced) + 1, vocab) of forced_states (a test hook)."""
        with torch.inference_mode():
            return self.step.logits(self.forced_states(prefix, text_tokens, forced))

    # ------------------------------------------------- a generation's life

    def start(self, member: _Member, handle: "Generation") -> None:
        """Take a slot and run the prompt (eager); the slot goes back when the
        member finishes or is closed, or when `handle` is collected."""
        if self._closed:
            raise RuntimeError("the T3 decoder is closed")
        started = time.monotonic()
        self._slots.acquire(member)
        member.finalizer = weakref.finalize(handle, self._abandon, member)
        pool, row = self._slots.locate(member)
        prefix = member.prefix
        self.step.prefill(pool, row, prefix.kv, prefix.length, member.text_tokens)
        pool.begin_row(row, member.values, member.budget.min_tokens, self.start_token)
        member.prefill_s = time.monotonic() - started
        member.started = True
        self._running.append(member)

    def next_block(self, member: _Member) -> List[int]:
        """The member's next tokens: those other generations' steps made for
        it, or else up to sync_every steps of its own (with companions)."""
        while True:
            if member.buffer:
                block, member.buffer = member.buffer, []
                member.n_tokens += len(block)
                if member.finished:
                    member.done = True
                return block
            if member.finished:
                self.finish(member)
                raise StopIteration
            if member.ran >= member.max_tokens:
                self._end(member, cut=True)
                continue
            if self._run_block(member):
                raise SynthesisCancelled()

    def finish(self, member: _Member) -> None:
        """No more of it: the slot goes back, it yields nothing more."""
        member.done = True
        member.finished = True
        member.buffer = []
        self._free_slot(member)

    def _end(self, member: _Member, cut: bool) -> None:
        """No more steps: the slot goes back now, the tokens read stay."""
        member.cut = cut
        member.finished = True
        self._free_slot(member)

    def _free_slot(self, member: _Member) -> None:
        if member.finalizer is not None:
            member.finalizer()  # runs once: releases the slot
            member.finalizer = None

    def _abandon(self, member: _Member) -> None:
        member.finished = True
        self._slots.release(member)

    def _length_of(self, owner: Any) -> int:
        """Cache positions an owner's slot has written (what a move copies)."""
        if isinstance(owner, _Member):
            return min(self.max_positions, owner.prompt + owner.ran + 1)
        return self.max_positions

    def _take(self, member: _Member, tokens: List[int]) -> None:
        """The tokens of the member's latest steps, read back."""
        member.read = member.ran
        if self.stop_token in tokens:
            tokens = tokens[: tokens.index(self.stop_token)]
            self._end(member, cut=False)
        elif member.ran >= member.max_tokens:
            self._end(member, cut=True)
        member.buffer.extend(tokens)

    # ------------------------------------------------------------- stepping

    def _companions(self, primary: _Member) -> List[_Member]:
        """Running generations to take along in `primary`'s steps: those not
        far ahead of their readers, at most max_batch - 1, the earliest begun
        first (one whose stop flag is up drops out before the first step)."""
        found: List[_Member] = []
        self._running = [m for m in self._running if not m.finished]
        for other in self._running:
            if (
                other is primary
                or len(found) + 1 >= self.max_batch
                or len(other.buffer) >= self.lead_tokens
                or other.ran >= other.max_tokens
            ):
                continue
            found.append(other)
        return found

    def _run(self, pool: SlotPool, lo: int, hi: int, length: int) -> None:
        """One step of the step pool's rows [lo, hi) (the active ones), the
        longest at `length` positions: a graph over rows [0, n) if captured,
        else the same step eagerly."""
        graphs = self.graphs
        if graphs is not None and graphs.replay(
            pow2_at_least(hi), self.step.span_for(length)
        ):
            return
        self.step.eager(pool, lo, hi, length)

    # Long: one block is one loop; splitting it would scatter its state.
    def _run_block(self, primary: _Member) -> bool:
        """Up to sync_every steps of `primary`, with its companions in the same
        steps, then one read of all their new tokens. Each one's stop flag is
        read before each of its steps; True if `primary`'s turned true."""
        members = [primary] + (self._companions(primary) if self.max_batch > 1 else [])
        budget = {id(m): min(self.sync_every, m.max_tokens - m.ran) for m in members}
        # Into the lowest rows: the steps run over as few rows as they serve.
        lo, hi = self._slots.pack(members, low=self.graphs is not None)
        pool = self._slots.pool
        assert pool is not None
        row = {id(m): self._slots.row_of(m) for m in members}
        mask = torch.zeros(pool.capacity, dtype=torch.bool)
        mask[[row[id(m)] for m in members]] = True
        pool.active.copy_(mask)
        live = members
        cancelled = False
        started = time.monotonic()
        for n in range(self.sync_every):
            going = []
            for m in live:
                if n >= budget[id(m)]:
                    continue
                if m.budget.should_stop():
                    cancelled = cancelled or m is primary
                    continue
                going.append(m)
            for m in live:
                if m not in going:
                    pool.active[row[id(m)]] = False
            live = going
            if primary not in live:
                break
            self.steps_run += 1
            self._run(pool, lo, hi, max(m.prompt + m.ran + 1 for m in live))
            for m in live:
                m.ran += 1
                m.batched_steps += len(live)
        took = time.monotonic() - started
        start = min(m.read for m in members)
        end = max(m.ran for m in members)
        rows = torch.tensor([row[id(m)] for m in members], device=self.device)
        sampled = pool.out[rows, start:end].tolist()
        for m, tokens in zip(members, sampled):
            m.decode_s += took
            self._take(m, tokens[m.read - start : m.ran - start])
        return cancelled


class Generation:
    """Blocks of new speech tokens (stop token excluded) as they become known.

    Each `next()` returns the tokens that other generations' steps already
    made for it, or else runs up to `sync_every` decode steps (taking other
    running generations along) and reads their tokens back once. The slot
    goes back when the last step is known, or when the generation is closed,
    cancelled or garbage collected. inference_mode is entered per block, not
    held across a yield: other work runs on this thread between blocks.
    """

    def __init__(self, decoder: T3Decoder, member: _Member) -> None:
        self._decoder = decoder
        self._member = member

    @property
    def cut(self) -> bool:
        return self._member.cut

    @property
    def n_tokens(self) -> int:
        return self._member.n_tokens

    @property
    def prefill_s(self) -> float:
        return self._member.prefill_s

    @property
    def decode_s(self) -> float:
        return self._member.decode_s

    @property
    def batched_steps(self) -> int:
        return self._member.batched_steps

    @property
    def steps(self) -> int:
        """Decode steps run (tokens sampled, a stop token included)."""
        return self._member.ran

    @property
    def done(self) -> bool:
        return self._member.done

    def __iter__(self) -> Iterator[List[int]]:
        return self

    def __next__(self) -> List[int]:
        if self._member.done:
            raise StopIteration
        try:
            with torch.inference_mode():
                if not self._member.started:
                    self._decoder.start(self._member, self)
                return self._decoder.next_block(self._member)
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        """Take a slot and run the prompt now (the first next() otherwise does):
        a group begun this way joins the next step of any running generation,
        so a crowd of new groups all get the prompt done before the first of
        them takes its steps."""
        if not self._member.started and not self._member.done:
            with torch.inference_mode():
                self._decoder.start(self._member, self)

    def close(self) -> None:
        """Give the slot back; the generation yields nothing more."""
        self._decoder.finish(self._member)
