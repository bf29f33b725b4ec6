"""Loudness normalisation of one spoken reply, piece by piece, with a peak limiter.

Every reply is brought to a target loudness (ITU-R BS.1770-4, default -16 LUFS)
with ONE gain, decided from its first measurable piece, and kept below -1 dBFS
by a smooth soft-knee limiter. One `LoudnessNormalizer` per reply, used from one
thread at a time. docs/design.md says how the first pieces decide and how the
limiter works.
"""

import functools
import math
from typing import Optional

import numpy as np
import pyloudnorm
from scipy.ndimage import minimum_filter1d, uniform_filter1d

from .settings import DEFAULT_LOUDNESS_LUFS

# BS.1770's absolute gate: blocks quieter than this are not counted.
ABSOLUTE_GATE_LUFS = -70.0
#: Sample peaks after gain and limiter stay strictly below this (-1 dBFS).
CEILING = 10.0 ** (-1.0 / 20.0)
#: Samples below this magnitude (-3 dBFS) pass the limiter's curve unchanged.
LIMITER_THRESHOLD = 10.0 ** (-3.0 / 20.0)
#: Half-width of the limiter's running minimum and of its triangular smoothing.
LIMITER_HALF_WINDOW_S = 0.002
#: The reply gain is clamped to this range, dB.
MIN_GAIN_DB = -10.0
MAX_GAIN_DB = 20.0
#: A piece measuring below this (LUFS) counts as silence and decides no gain.
GATE_LUFS = -50.0
#: BS.1770 gating block; pieces shorter than this cannot be measured properly.
BLOCK_S = 0.4
#: Gating block for the estimate of a first piece shorter than `BLOCK_S`.
SHORT_BLOCK_S = 0.1


@functools.lru_cache(maxsize=16)
def _meter(sample_rate: int, block_size: float) -> pyloudnorm.Meter:
    """A shared BS.1770 meter (K-weighting, 75 % block overlap)."""
    return pyloudnorm.Meter(sample_rate, block_size=block_size)


def _integrated(
    audio: np.ndarray, sample_rate: int, block_size: float
) -> Optional[float]:
    """Gated loudness with `block_size` blocks; None if too short, silent or not finite.

    pyloudnorm's integrated_loudness, with its K-weighting filters and its cut
    of the 75 %-overlapping blocks, but the blocks' energies summed at once
    (a cumulative sum) instead of in a Python loop: the same figure (to 1e-9
    LU, tested) in half the time, which the first piece of every reply waits
    for.
    """
    samples = np.asarray(audio, dtype=np.float64).reshape(-1)
    if sample_rate <= 0 or samples.shape[0] < block_size * sample_rate:
        return None
    if not np.any(samples):
        return None
    meter = _meter(sample_rate, block_size)
    for stage in meter._filters.values():  # pylint: disable=protected-access
        samples = stage.apply_filter(samples)
    step = 1.0 - meter.overlap
    seconds = samples.shape[0] / sample_rate
    blocks = int(np.round((seconds - block_size) / (block_size * step))) + 1
    index = np.arange(blocks)
    lower = (block_size * (index * step) * sample_rate).astype(np.int64)
    upper = (block_size * (index * step + 1) * sample_rate).astype(np.int64)
    energy = np.concatenate(([0.0], np.cumsum(np.square(samples))))
    n = samples.shape[0]
    power = (energy[np.minimum(upper, n)] - energy[np.minimum(lower, n)]) / (
        block_size * sample_rate
    )
    power = np.maximum(power, 0.0)  # a cumulative sum's rounding, never below 0
    with np.errstate(divide="ignore", invalid="ignore"):
        loudness = -0.691 + 10.0 * np.log10(power)
        gated = power[loudness >= ABSOLUTE_GATE_LUFS]
        if gated.size == 0:
            return None
        relative = -0.691 + 10.0 * np.log10(gated.mean()) - 10.0
        kept = power[(loudness > relative) & (loudness > ABSOLUTE_GATE_LUFS)]
        if kept.size == 0:
            return None
        lufs = float(-0.691 + 10.0 * np.log10(kept.mean()))
    return lufs if math.isfinite(lufs) else None


def measure_lufs(audio: np.ndarray, sample_rate: int) -> Optional[float]:
    """Integrated loudness (ITU-R BS.1770-4, LUFS) of mono `audio`.

    None when the audio is shorter than one 400 ms block, silent (every block
    below the standard's -70 LUFS absolute gate) or contains NaN/inf.
    """
    return _integrated(audio, sample_rate, BLOCK_S)


def _clamp_gain(gain_db: float) -> float:
    return min(MAX_GAIN_DB, max(MIN_GAIN_DB, gain_db))


def _soft_knee(magnitude: np.ndarray) -> np.ndarray:
    """Largest allowed output magnitude for each input magnitude (>= 0)."""
    span = CEILING - LIMITER_THRESHOLD
    z = np.maximum(magnitude - LIMITER_THRESHOLD, 0.0) / span
    knee = LIMITER_THRESHOLD + span * z / np.sqrt(1.0 + z * z)
    return np.where(magnitude > LIMITER_THRESHOLD, knee, magnitude)


def _limit(samples: np.ndarray, half_window: int) -> np.ndarray:
    """Apply the smooth soft-knee limiter to float64 `samples` (see module doc).

    Returns `samples` itself when no sample exceeds the threshold, else a new
    array.
    """
    loud_at = np.flatnonzero(np.abs(samples) > LIMITER_THRESHOLD)
    if loud_at.shape[0] == 0:
        return samples
    # Running minimum over +-2r, then two +-r boxes (a +-2r triangle): each
    # curve value is an average of minima over windows holding its own sample,
    # so it never exceeds that sample's allowed gain. The curve is below 1 only
    # within `reach` samples of a loud sample, so only those stretches are
    # filtered: gathered end to end, each keeps >= `reach` samples of gain 1 on
    # both sides (or meets the piece's edge), so the result is the same as
    # filtering the whole piece, at a fraction of the cost.
    radius = max(1, half_window // 2)
    reach = 4 * radius
    breaks = np.flatnonzero(np.diff(loud_at) > 2 * reach)
    starts = np.maximum(loud_at[np.concatenate(([0], breaks + 1))] - reach, 0)
    ends = np.minimum(
        loud_at[np.concatenate((breaks, [loud_at.shape[0] - 1]))] + reach + 1,
        samples.shape[0],
    )
    lengths = ends - starts
    offsets = np.cumsum(lengths) - lengths
    at = np.arange(int(lengths.sum())) + np.repeat(starts - offsets, lengths)
    magnitude = np.abs(samples[at])
    loud = magnitude > LIMITER_THRESHOLD
    allowed = np.ones_like(magnitude)
    allowed[loud] = _soft_knee(magnitude[loud]) / magnitude[loud]
    curve = minimum_filter1d(allowed, size=4 * radius + 1, mode="nearest")
    for _ in range(2):
        curve = uniform_filter1d(curve, size=2 * radius + 1, mode="nearest")
    limited = samples.copy()
    limited[at] *= np.minimum(curve, allowed)
    return limited


class LoudnessNormalizer:
    """Bring one reply to `target_lufs` with one gain, limited below -1 dBFS.

    Feed the reply's pieces to `process` in order; the first measurable piece
    decides the gain (`gain_db`), which then holds for the rest of the reply.
    With ``target_lufs=None`` the normaliser is off and `process` returns its
    input unchanged. See the module docstring for the design.

    Not thread-safe: it holds one reply's state, so use one instance per reply,
    from one thread or task at a time.
    """

    def __init__(
        self,
        sample_rate: int,
        target_lufs: Optional[float] = DEFAULT_LOUDNESS_LUFS,
        initial_gain_db: Optional[float] = None,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError("sample_rate must be positive")
        if target_lufs is not None and not math.isfinite(target_lufs):
            raise ValueError("target_lufs must be finite or None")
        if initial_gain_db is not None and not math.isfinite(initial_gain_db):
            raise ValueError("initial_gain_db must be finite or None")
        self._sample_rate = sample_rate
        self._target_lufs = target_lufs
        self._initial_gain_db = (
            None if initial_gain_db is None else _clamp_gain(initial_gain_db)
        )
        self._gain_db: Optional[float] = None
        self._half_window = max(1, round(LIMITER_HALF_WINDOW_S * sample_rate))
        if target_lufs is not None:
            # Build the meters now, not while the first piece waits to be sent.
            _meter(sample_rate, BLOCK_S)
            _meter(sample_rate, SHORT_BLOCK_S)

    @property
    def target_lufs(self) -> Optional[float]:
        """Target loudness in LUFS; None when normalisation is off."""
        return self._target_lufs

    @property
    def gain_db(self) -> Optional[float]:
        """The reply's gain in dB once decided (clamped), else None."""
        return self._gain_db

    def _decide(self, samples: np.ndarray) -> Optional[float]:
        """Gain decided by this piece, or None if it cannot decide (silence)."""
        assert self._target_lufs is not None
        lufs = _integrated(samples, self._sample_rate, BLOCK_S)
        if lufs is not None:
            return None if lufs < GATE_LUFS else self._target_lufs - lufs
        lufs = _integrated(samples, self._sample_rate, SHORT_BLOCK_S)
        if lufs is None or lufs < GATE_LUFS:
            return None  # silent, or under 100 ms
        if self._initial_gain_db is not None:
            return self._initial_gain_db
        return self._target_lufs - lufs

    def process(self, audio: np.ndarray) -> np.ndarray:
        """Return the next piece of the reply with the reply gain and limiter applied.

        Output is float32, finite and within [-CEILING, CEILING], with the same
        shape as `audio`; NaN becomes 0 and +-inf become +-1 before the gain.
        With normalisation off, `audio` is returned unchanged (as float32).
        """
        if self._target_lufs is None:
            return np.asarray(audio, dtype=np.float32)
        shape = np.shape(audio)
        samples = np.asarray(audio, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(samples)):
            samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
        if self._gain_db is None:
            decided = self._decide(samples)
            if decided is not None:
                self._gain_db = _clamp_gain(decided)
        gain_db = self._gain_db
        if gain_db is None:
            gain_db = (
                self._initial_gain_db if self._initial_gain_db is not None else 0.0
            )
        if gain_db != 0.0:
            samples = samples * (10.0 ** (gain_db / 20.0))
        samples = _limit(samples, self._half_window)
        out = samples.astype(np.float32)
        np.clip(out, -CEILING, CEILING, out=out)  # float32 rounding only
        return out.reshape(shape)
