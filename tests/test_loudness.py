"""Loudness normalisation: one gain per reply, on target, limited below -1 dBFS."""

from typing import List, Optional

import numpy as np
import pyloudnorm
import pytest

from wyoming_chatterbox.loudness import (
    CEILING,
    GATE_LUFS,
    LIMITER_THRESHOLD,
    MAX_GAIN_DB,
    MIN_GAIN_DB,
    LoudnessNormalizer,
    _integrated,
    measure_lufs,
)

SR = 24000
METER = pyloudnorm.Meter(SR)


def lufs(audio: np.ndarray) -> float:
    """Reference loudness, straight from pyloudnorm (independent of the module)."""
    return float(METER.integrated_loudness(np.asarray(audio, dtype=np.float64)))


def speech_like(seconds: float, seed: int = 0, depth: float = 1.0) -> np.ndarray:
    """A voiced, speech-like test signal (float64, unscaled).

    A 120 Hz sawtooth-like harmonic tone with slow pitch drift, a little seeded
    noise, a 4 Hz syllable envelope of the given modulation depth and words of
    0.6..1.4 s separated by 0.1..0.3 s pauses.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    f0 = 120.0 * (1.0 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 25))
    noise = 0.09 * rng.standard_normal(n)
    syllables = 1.0 - depth + depth * np.sin(np.pi * 4.0 * t + rng.uniform(0, 6)) ** 2
    words = np.ones(n)
    pos = 0.0
    while pos < seconds:
        word, pause = rng.uniform(0.6, 1.4), rng.uniform(0.1, 0.3)
        words[int((pos + word) * SR) : int((pos + word + pause) * SR)] = 0.0
        pos += word + pause
    signal: np.ndarray = (voiced + noise) * syllables * words
    return signal


def at_lufs(audio: np.ndarray, target: float) -> np.ndarray:
    scaled: np.ndarray = (audio * 10 ** ((target - lufs(audio)) / 20)).astype(
        np.float32
    )
    return scaled


def db(gain: float) -> float:
    return float(10 ** (gain / 20))


def away_from_peaks(audio: np.ndarray, gain_db: float) -> np.ndarray:
    """Audible samples more than 10 ms from any the gain takes over the threshold."""
    loud = np.abs(audio) * db(gain_db) > LIMITER_THRESHOLD
    near_loud = np.convolve(loud, np.ones(2 * int(0.01 * SR) + 1), "same") > 0
    far: np.ndarray = ~near_loud & (np.abs(audio) > 1e-3)
    return far


def process_all(norm: LoudnessNormalizer, pieces: List[np.ndarray]) -> List[np.ndarray]:
    outs = []
    for piece in pieces:
        out = norm.process(piece)
        assert out.dtype == np.float32
        assert out.shape == piece.shape
        assert np.all(np.isfinite(out))
        assert np.max(np.abs(out), initial=0.0) <= CEILING
        outs.append(out)
    return outs


@pytest.mark.parametrize("target", [-20.0, -16.0, -12.0])
def test_single_piece_reaches_target(target: float) -> None:
    audio = at_lufs(speech_like(8.0, seed=1, depth=0.5), -27.0)
    norm = LoudnessNormalizer(SR, target)
    assert norm.gain_db is None
    out = norm.process(audio)
    assert norm.gain_db == pytest.approx(target + 27.0, abs=0.01)
    assert lufs(out) == pytest.approx(target, abs=0.5)


def test_default_target_is_minus_16() -> None:
    audio = at_lufs(speech_like(5.0, seed=2), -25.0)
    norm = LoudnessNormalizer(SR)
    out = norm.process(audio)
    assert norm.target_lufs == -16.0
    assert lufs(out) == pytest.approx(-16.0, abs=0.5)


def test_streamed_reply_keeps_one_gain() -> None:
    # Five sentence groups at slightly different levels (as a voice varies):
    # one gain for all, decided by the first, so their differences survive.
    signal = speech_like(20.0, seed=3)
    cuts = [int(s * SR) for s in (0.0, 3.1, 7.4, 11.0, 15.2, 20.0)]
    offsets = [0.0, -1.0, 1.5, -2.0, 0.5]
    pieces = [
        at_lufs(signal[a:b], -27.0 + off) for a, b, off in zip(cuts, cuts[1:], offsets)
    ]
    norm = LoudnessNormalizer(SR, -16.0)
    outs = []
    for piece in pieces:
        outs.extend(process_all(norm, [piece]))
        assert norm.gain_db == pytest.approx(11.0, abs=0.01)
    # Every sample the limiter leaves alone shows the same gain in every piece.
    ratios = []
    for piece, out in zip(pieces, outs):
        unlimited = away_from_peaks(piece, norm.gain_db or 0.0)
        assert np.count_nonzero(unlimited) > piece.shape[0] // 2
        ratio = out[unlimited] / piece[unlimited]
        assert np.allclose(ratio, ratio[0], rtol=1e-5)
        ratios.append(float(ratio[0]))
    assert np.allclose(ratios, db(11.0), rtol=1e-5)
    # The level differences between pieces are kept (no per-piece levelling).
    for piece, out, off in zip(pieces, outs, offsets):
        assert lufs(out) == pytest.approx(-16.0 + off, abs=0.2)
    assert lufs(np.concatenate(outs)) == pytest.approx(-16.0, abs=1.0)


def loud_signal() -> np.ndarray:
    """Speech at -22 LUFS with a few plosive-like bursts peaking at 0.99."""
    audio = at_lufs(speech_like(6.0, seed=4), -22.0).astype(np.float64)
    rng = np.random.default_rng(5)
    burst_len = int(0.004 * SR)
    window = np.hanning(burst_len)
    for start in rng.integers(0, audio.shape[0] - burst_len, size=12):
        burst = rng.standard_normal(burst_len) * window
        audio[start : start + burst_len] += 0.99 * burst / np.abs(burst).max()
    audio *= 0.99 / np.abs(audio).max()
    return audio.astype(np.float32)


def test_limiter_keeps_peaks_below_ceiling_without_clipping() -> None:
    audio = loud_signal()
    target = lufs(audio) + 20 * np.log10(2.0 / 0.99)  # peaks would reach 2.0
    norm = LoudnessNormalizer(SR, target)
    out = norm.process(audio)
    gain = db(norm.gain_db or 0.0)
    assert np.abs(audio).max() * gain == pytest.approx(2.0, rel=1e-3)

    assert np.all(np.isfinite(out))
    assert np.abs(out).max() <= CEILING + 1e-6
    # Soft knee: nothing sits on the ceiling, no flat-topped (clipped) runs.
    assert np.count_nonzero(np.abs(out) >= np.float32(CEILING)) == 0
    over = np.count_nonzero(np.abs(audio) * gain > CEILING)
    assert over > 50
    near_top = np.count_nonzero(np.abs(out) > np.abs(out).max() - 1e-4)
    assert near_top <= 3
    # The peaks were lowered a lot, the loudness hardly.
    assert lufs(out) == pytest.approx(target, abs=1.5)

    # Samples away from the loud ones keep exactly the reply gain.
    far = away_from_peaks(audio, norm.gain_db or 0.0)
    assert np.count_nonzero(far) > audio.shape[0] // 4
    assert np.allclose(out[far] / audio[far], gain, rtol=1e-5)


def test_limiter_is_smooth_not_a_waveshaper() -> None:
    # A loud 200 Hz sine: a waveshaper would flatten each crest; the limiter's
    # gain is smooth, so the output stays (nearly) a scaled sine.
    t = np.arange(SR) / SR
    sine = (0.9 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    norm = LoudnessNormalizer(SR, lufs(sine) + 6.0)
    out = norm.process(sine)
    middle = slice(SR // 4, 3 * SR // 4)
    assert np.abs(out).max() <= CEILING
    scale = np.abs(out[middle]).max() / np.abs(sine[middle]).max()
    assert np.allclose(out[middle], sine[middle] * scale, atol=1e-3)


def test_off_returns_input_unchanged() -> None:
    audio = at_lufs(speech_like(3.0, seed=6), -27.0)
    audio[100] = 0.999
    norm = LoudnessNormalizer(SR, None)
    for piece in (audio, audio[:1000], np.zeros(0, dtype=np.float32)):
        out = norm.process(piece)
        assert out.dtype == np.float32
        assert np.array_equal(out, piece)
    assert norm.gain_db is None
    assert norm.target_lufs is None


def test_silence_decides_nothing_and_stays_silent() -> None:
    norm = LoudnessNormalizer(SR, -16.0)
    zeros = np.zeros(SR, dtype=np.float32)
    out = norm.process(zeros)
    assert np.array_equal(out, zeros)
    assert norm.gain_db is None
    # Faint hiss below the gate: no gain decided, passed at 0 dB.
    hiss = (1e-3 * np.random.default_rng(7).standard_normal(SR)).astype(np.float32)
    hiss_lufs = measure_lufs(hiss, SR)
    assert hiss_lufs is not None and hiss_lufs < GATE_LUFS
    out = norm.process(hiss)
    assert norm.gain_db is None
    assert np.allclose(out, hiss, rtol=1e-6, atol=0)
    # The first piece with speech decides.
    speech = at_lufs(speech_like(3.0, seed=8), -26.0)
    out = norm.process(speech)
    assert norm.gain_db == pytest.approx(10.0, abs=0.01)
    assert lufs(out) == pytest.approx(-16.0, abs=0.5)


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.05, 0.1, 0.2])
def test_very_short_pieces_are_safe(seconds: float) -> None:
    n = int(seconds * SR)
    norm = LoudnessNormalizer(SR, -16.0)
    for piece in (
        np.zeros(n, dtype=np.float32),
        np.full(n, 1e-9, dtype=np.float32),
        speech_like(1.0, seed=9)[:n].astype(np.float32) * 0.05,
        np.ones(n, dtype=np.float32),
    ):
        out = norm.process(piece)
        assert out.shape == piece.shape and out.dtype == np.float32
        assert np.all(np.isfinite(out))
        assert np.max(np.abs(out), initial=0.0) <= CEILING
        assert norm.gain_db is None or MIN_GAIN_DB <= norm.gain_db <= MAX_GAIN_DB


def test_nan_and_inf_give_finite_output() -> None:
    audio = at_lufs(speech_like(1.0, seed=10), -27.0)
    audio[[10, 500, 9000]] = [np.nan, np.inf, -np.inf]
    out = LoudnessNormalizer(SR, -16.0).process(audio)
    assert np.all(np.isfinite(out))
    assert np.abs(out).max() <= CEILING
    assert out[10] == 0.0


def short_first_reply(first_seconds: float, initial: Optional[float]) -> tuple:
    signal = at_lufs(speech_like(12.0, seed=11), -27.0)
    cut = int(first_seconds * SR)
    pieces = [signal[:cut], signal[cut : cut + 5 * SR], signal[cut + 5 * SR :]]
    norm = LoudnessNormalizer(SR, -16.0, initial_gain_db=initial)
    outs = []
    gains = []
    for piece in pieces:
        outs.extend(process_all(norm, [piece]))
        gains.append(norm.gain_db)
    return pieces, outs, gains


def test_short_first_piece_decides_from_an_estimate() -> None:
    pieces, outs, gains = short_first_reply(0.3, None)
    # Decided by the 0.3 s piece (100 ms blocks), then never changed.
    assert gains[0] is not None
    assert gains == [gains[0]] * 3
    assert gains[0] == pytest.approx(11.0, abs=2.0)
    for piece, out in zip(pieces, outs):
        unlimited = away_from_peaks(piece, gains[0])
        assert np.count_nonzero(unlimited) > piece.shape[0] // 2
        ratio = out[unlimited] / piece[unlimited]
        assert np.allclose(ratio, db(gains[0]), rtol=1e-5)
    assert lufs(np.concatenate(outs)) == pytest.approx(-16.0, abs=2.0)


def test_short_first_piece_uses_initial_gain() -> None:
    _, outs, gains = short_first_reply(0.3, 10.5)
    assert gains == [10.5, 10.5, 10.5]
    assert lufs(np.concatenate(outs)) == pytest.approx(-16.5, abs=0.5)
    # A first piece long enough to measure wins over the initial gain.
    _, _, gains = short_first_reply(2.0, 5.0)
    assert gains[0] == pytest.approx(
        -16.0 - lufs(at_lufs(speech_like(12.0, seed=11), -27.0)[: 2 * SR]), abs=0.01
    )


def test_silent_short_lead_in_leaves_the_decision_to_speech() -> None:
    speech = at_lufs(speech_like(6.0, seed=12), -27.0)
    norm = LoudnessNormalizer(SR, -16.0)
    lead = norm.process(np.zeros(int(0.3 * SR), dtype=np.float32))
    assert norm.gain_db is None and not np.any(lead)
    out = norm.process(speech)
    assert norm.gain_db == pytest.approx(11.0, abs=0.01)
    assert lufs(out) == pytest.approx(-16.0, abs=0.5)


def test_gain_is_clamped() -> None:
    # A near-silent (but above the gate) first piece: +29 dB wanted, +20 given.
    quiet = at_lufs(speech_like(3.0, seed=13), -45.0)
    norm = LoudnessNormalizer(SR, -16.0)
    out = norm.process(quiet)
    assert norm.gain_db == MAX_GAIN_DB
    assert lufs(out) == pytest.approx(-25.0, abs=0.5)
    # The rest of the reply gets the same clamped gain, not more.
    normal = at_lufs(speech_like(3.0, seed=14), -35.0)
    out = norm.process(normal)
    assert norm.gain_db == MAX_GAIN_DB
    assert lufs(out) == pytest.approx(-15.0, abs=0.5)
    # Too loud for the target: -18 dB wanted, -10 given.
    loud = at_lufs(speech_like(3.0, seed=15), -12.0)
    norm = LoudnessNormalizer(SR, -30.0)
    out = norm.process(loud)
    assert norm.gain_db == MIN_GAIN_DB
    assert lufs(out) == pytest.approx(-22.0, abs=0.5)
    # A caller's initial gain is clamped too.
    norm = LoudnessNormalizer(SR, -16.0, initial_gain_db=40.0)
    norm.process(quiet[: int(0.2 * SR)])
    assert norm.gain_db == MAX_GAIN_DB


def test_measure_lufs() -> None:
    audio = at_lufs(speech_like(4.0, seed=16), -23.0)
    assert measure_lufs(audio, SR) == pytest.approx(-23.0, abs=0.01)
    assert measure_lufs(audio[: int(0.39 * SR)], SR) is None
    assert measure_lufs(np.zeros(SR, dtype=np.float32), SR) is None
    bad = audio.copy()
    bad[5] = np.nan
    assert measure_lufs(bad, SR) is None


@pytest.mark.parametrize("block_s", [0.4, 0.1])
def test_the_meter_is_pyloudnorms_to_the_last_digit(block_s: float) -> None:
    # measure_lufs sums the gating blocks at once; pyloudnorm loops over them.
    rng = np.random.default_rng(5)
    meter = pyloudnorm.Meter(SR, block_size=block_s)
    for trial in range(60):
        n = int(rng.integers(int(block_s * SR), 20 * SR))
        audio = rng.normal(0.0, 10 ** rng.uniform(-4, 0), n)
        if trial % 3 == 0:  # a silent stretch: some blocks under the gates
            start = int(rng.integers(0, n))
            audio[start : start + int(rng.integers(0, n))] = 0.0
        expected = float(meter.integrated_loudness(audio))
        ours = _integrated(audio, SR, block_s)
        if ours is None:
            assert not np.isfinite(expected)
        else:
            assert ours == pytest.approx(expected, abs=1e-9)


def test_random_inputs_stay_bounded() -> None:
    rng = np.random.default_rng(17)
    for _ in range(40):
        norm = LoudnessNormalizer(SR, float(rng.uniform(-30, -6)))
        for _ in range(3):
            n = int(rng.integers(0, SR))
            piece = rng.standard_normal(n) * float(rng.uniform(0, 2))
            piece[rng.integers(0, max(n, 1), size=min(n, 3))] = 1.0
            out = norm.process(piece.astype(np.float32))
            assert np.all(np.isfinite(out))
            assert np.max(np.abs(out), initial=0.0) <= CEILING
            assert np.count_nonzero(np.abs(out) >= np.float32(CEILING)) == 0
