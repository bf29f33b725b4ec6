"""Where each T3 generation's decode state lives: the rows of the slot pools.

`SlotPool` is the device state of several slots, one row each: KV cache,
logits, token, position, sampled tokens, sampler state. `Slots` says which
generation holds which row. The first `step_rows` rows (the step pool) are the
only ones a decode step runs over, and the only ones its CUDA graphs know; a
generation held beyond them waits in a parking pool grown on demand and is
moved in before it steps. `pack()` moves a step's generations into the lowest
rows, so that a step over k generations runs over the k (rounded up to a
power of two) lowest rows whoever finished before: a group left alone after
the others ended runs at batch 1.

Threads: the worker, except `release`, which may come from whichever thread
collects a generation: it takes the lock and changes only the bookkeeping.
"""

import heapq
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    from .t3_step import T3Step

_LOGGER = logging.getLogger(__name__)

# Per-row state besides the KV cache, all of shape (rows, ...).
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


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(0, n - 1).bit_length()


class SlotPool:
    """Every slot's device state, one row per slot.

    A step leaves the rows it does not advance as they were, but for junk in
    their cache at their next position, which their own next step writes
    before it reads. Each tensor keeps its address for the pool's life (CUDA
    graphs read and write them in place): a larger pool is a new one, with the
    old rows copied in.
    """

    def __init__(
        self, dec: "T3Step", capacity: int, old: "Optional[SlotPool]" = None
    ) -> None:
        dev = dec.device

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.capacity = capacity
        self.cache = zeros(
            dec.n_layer,
            2,
            capacity,
            dec.n_head,
            dec.max_positions,
            dec.head_dim,
            dtype=dec.dtype,
        )
        self.logits = zeros(capacity, dec.vocab, dtype=torch.float32)
        self.token = zeros(capacity)
        self.pos = zeros(capacity)
        self.step = zeros(capacity)
        self.out = zeros(capacity, dec.max_positions)
        self.seen = zeros(capacity, dec.vocab, dtype=torch.bool)
        # Sampling parameters (see t3_sampler.param_values).
        self.temperature = torch.ones((capacity, 1), device=dev)
        self.kth = zeros(capacity, 1)
        self.top_p_cut = torch.full((capacity, 1), -1.0, device=dev)
        self.penalty = torch.ones((capacity, 1), device=dev)
        self.min_tokens = zeros(capacity)
        self.active = zeros(capacity, dtype=torch.bool)
        self.rows = torch.arange(capacity, device=dev)
        if old is not None:
            with torch.inference_mode():
                self.cache[:, :, : old.capacity].copy_(old.cache)
                for name in _ROW_STATE:
                    getattr(self, name)[: old.capacity].copy_(getattr(old, name))

    @staticmethod
    def row_bytes(dec: "T3Step") -> int:
        """Device memory of one slot (its KV cache; the rest is small)."""
        itemsize = torch.empty(0, dtype=dec.dtype).element_size()
        cache = dec.n_layer * 2 * dec.n_head * dec.max_positions * dec.head_dim
        return cache * itemsize + 8 * dec.max_positions + (1 + 4) * dec.vocab

    def begin_row(
        self, row: int, values: List[float], min_tokens: int, start_token: int
    ) -> None:
        """A row's sampler state for a new generation (after its prefill)."""
        temperature, kth, top_p_cut, penalty = values
        self.temperature[row] = temperature
        self.kth[row] = int(kth)
        self.top_p_cut[row] = top_p_cut
        self.penalty[row] = penalty
        self.min_tokens[row] = max(0, min_tokens)
        self.step[row] = 0
        self.seen[row] = False
        self.seen[row, start_token] = True

    @staticmethod
    def swap(
        a: "SlotPool", i: int, b: "SlotPool", j: int, length: int, move: bool = False
    ) -> None:
        """Exchange row i of `a` and row j of `b` (only the first `length`
        cache positions: nothing past them is read); `move`: copy i to j only
        (j held no generation)."""
        with torch.inference_mode():
            pairs = [(a.cache[:, :, i, :, :length], b.cache[:, :, j, :, :length])]
            pairs += [(getattr(a, n)[i], getattr(b, n)[j]) for n in _ROW_STATE]
            for first, second in pairs:
                if move:
                    second.copy_(first)
                else:
                    kept = second.clone()
                    second.copy_(first)
                    first.copy_(kept)


class Slots:
    """Which generation (an `owner`, any hashable object) holds which row.

    Rows [0, step_rows) are the step pool's; higher rows are parked. The step
    pool grows (doubling) up to step_rows as rows are needed, or is made whole
    at once by `reserve()` (for CUDA graphs, which must know its tensors).
    `length_of(owner)` is the cache positions an owner has written: what a
    move copies.
    """

    def __init__(
        self, step: "T3Step", step_rows: int, length_of: Callable[[Any], int]
    ) -> None:
        self._step = step
        self.step_rows = step_rows
        self._length_of = length_of
        self.pool: Optional[SlotPool] = None
        self._parking: Optional[SlotPool] = None
        self._free: List[int] = []  # rows made and not held, a heap
        self.made = 0  # rows made
        self._row: Dict[Any, int] = {}
        self._owner: Dict[int, Any] = {}
        self._lock = threading.RLock()
        self._closed = False

    @property
    def free(self) -> int:
        """Rows made and not held."""
        return len(self._free)

    def reserve(self, rows: int) -> SlotPool:
        """Make the step pool `rows` rows now (fewer than step_rows where
        memory is short: then step_rows shrinks to it)."""
        with self._lock:
            if self._row:
                raise RuntimeError("reserve() comes before any row is held")
            self.step_rows = rows
            self.pool = self._parking = None  # what was made before goes
            self.pool = SlotPool(self._step, rows)
            self._free = list(range(rows))
            self.made = rows
            return self.pool

    def acquire(self, owner: Any) -> int:
        """A free row for `owner` (the lowest: steps stay short)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the T3 decoder is closed")
            if self._free:
                row = heapq.heappop(self._free)
            else:
                row = self.made
                self.made += 1
                self._grow(row)
            self._row[owner] = row
            self._owner[row] = owner
            return row

    def release(self, owner: Any) -> None:
        """The owner's row is free again (any thread; once is enough)."""
        with self._lock:
            row = self._row.pop(owner, None)
            if row is None or self._closed:
                return
            del self._owner[row]
            heapq.heappush(self._free, row)

    def row_of(self, owner: Any) -> int:
        return self._row[owner]

    def locate(self, owner: Any) -> Tuple[SlotPool, int]:
        """The pool and the row in it that hold `owner`'s state."""
        row = self._row[owner]
        if row < self.step_rows:
            assert self.pool is not None
            return self.pool, row
        assert self._parking is not None
        return self._parking, row - self.step_rows

    def pack(self, owners: List[Any], low: bool) -> Tuple[int, int]:
        """Move `owners` (a step's generations) into the step pool, within
        the first pow2_at_least(len(owners)) rows if `low` (a graph runs over
        rows [0, n)) or else wherever their span stays that short. Returns
        the rows [lo, hi) the step runs over."""
        room = pow2_at_least(len(owners))
        with self._lock:
            rows = [self._row[owner] for owner in owners]
            lo, hi = min(rows), max(rows) + 1
            if hi <= room or (not low and hi <= self.step_rows and hi - lo <= room):
                return lo, hi
            # Rows below `room` that no owner of this step holds (as many as
            # its owners above it, all made), free ones first: a move copies
            # one row, a swap two.
            targets = [r for r in range(room) if self._owner.get(r) not in owners]
            targets.sort(key=lambda r: r in self._owner)
            for owner in owners:
                if self._row[owner] >= room:
                    self._exchange(owner, targets.pop(0))
            rows = [self._row[owner] for owner in owners]
            return min(rows), max(rows) + 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._free.clear()
            self._row.clear()
            self._owner.clear()
            self.pool = self._parking = None

    # ------------------------------------------------------------ the rest

    def _grow(self, row: int) -> None:
        """Make room for `row`: the step pool doubles up to step_rows; past
        it, the parking pool doubles."""
        if row < self.step_rows:
            pool = self.pool
            if pool is None or row >= pool.capacity:
                capacity = min(self.step_rows, pow2_at_least(row + 1))
                self.pool = SlotPool(self._step, capacity, pool)
            return
        parked = row - self.step_rows
        parking = self._parking
        if parking is None or parked >= parking.capacity:
            capacity = pow2_at_least(parked + 1)
            _LOGGER.info(
                "%s T3 generations held at once: %s rows more wait beside the %s "
                "a step serves",
                row + 1,
                capacity,
                self.step_rows,
            )
            self._parking = SlotPool(self._step, capacity, parking)

    def _exchange(self, owner: Any, row: int) -> None:
        """Put `owner` in step row `row`; whoever held it takes owner's row."""
        assert self.pool is not None
        old = self._row[owner]
        other = self._owner.get(row)
        lengths = [self._length_of(owner)]
        if other is not None:
            lengths.append(self._length_of(other))
        src, i = self.locate(owner)
        SlotPool.swap(src, i, self.pool, row, max(lengths), move=other is None)
        self._row[owner], self._owner[row] = row, owner
        if other is None:
            del self._owner[old]
            if row in self._free:
                self._free.remove(row)
                self._free.append(old)
                heapq.heapify(self._free)
        else:
            self._row[other], self._owner[old] = old, other
