"""S3GenStreamer and StreamWatermarker on the test checkpoint (real-size S3Gen).

The speech tokens come from S3Gen's own tokenizer on a real speech clip (shipped
with s3tokenizer), so the audio has the structure of speech, not of random
tokens. The "whole" decode is `S3GenStreamer.finish(all_tokens)`: one flow pass
with finalize and one HiFT call, i.e. upstream's `inference` with the same noise
(test_flow_matches_upstream shows the flow step is upstream's, bit for bit).
Each S3Gen call costs about a second here, so decodes are shared by fixtures.
"""

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch

from tests.test_model import checkpoint  # noqa: F401
from wyoming_chatterbox.chatterbox.base import SAMPLES_PER_TOKEN
from wyoming_chatterbox.chatterbox.s3stream import (
    S3GEN_SIL,
    S3GenStreamer,
    _cast_ref,
    flow_mel,
)
from wyoming_chatterbox.chatterbox.watermark import StreamWatermarker

pytestmark = pytest.mark.model

SEED = 1
CLIP = (
    Path(__file__).resolve().parents[1]
    / ".venv/lib/python3.11/site-packages/s3tokenizer/assets/BAC009S0764W0121.wav"
)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Any:  # noqa: F811
    from wyoming_chatterbox.chatterbox.turbo_load import load_turbo_model

    return load_turbo_model(checkpoint, "cpu")


@pytest.fixture(scope="module")
def tokens(model: Any) -> List[int]:
    """100 speech tokens of a real 4 s clip (4 s of audio with the silence)."""
    import soundfile
    import torchaudio

    if CLIP.is_file():
        wav, rate = soundfile.read(str(CLIP), dtype="float32")
    else:  # a synthetic voiced clip
        rate = 16000
        t = np.arange(4 * rate) / rate
        wav = 0.3 * np.sin(2 * np.pi * 140 * t) * np.sin(2 * np.pi * 3 * t) ** 2
    audio = torch.tensor(wav, dtype=torch.float32)[None]
    if rate != 16000:
        audio = torchaudio.functional.resample(audio, rate, 16000)
    with torch.inference_mode():
        found, _ = model.s3gen.tokenizer(audio)
    return [int(t) for t in found[0, :100]]


def stream(
    model: Any, tokens: Sequence[int], schedule: Sequence[int], **kwargs: Any
) -> Tuple[np.ndarray, List[int], S3GenStreamer]:
    """Push `schedule` pieces, finish with the rest: (audio, join offsets)."""
    streamer = S3GenStreamer(
        model.s3gen, model.conds.gen, max_tokens=200, seed=SEED, **kwargs
    )
    pieces, i = [], 0
    for n in schedule:
        pieces.append(streamer.push(tokens[i : i + n]))
        i += n
    pieces.append(streamer.finish(tokens[i:]))
    ends = np.cumsum([len(p) for p in pieces])
    joins = sorted({int(e) for e in ends[:-1] if 0 < e < ends[-1]})
    return np.concatenate(pieces), joins, streamer


@pytest.fixture(scope="module")
def whole(model: Any, tokens: List[int]) -> np.ndarray:
    audio, _, _ = stream(model, tokens, [])
    return audio


@pytest.fixture(scope="module")
def streamed(model: Any, tokens: List[int]) -> Tuple[np.ndarray, List[int]]:
    """20 tokens, then 40, then the rest with finish: the backend's schedule."""
    audio, joins, streamer = stream(model, tokens, [20, 40])
    assert len(streamer.stats) == 3  # one S3Gen call per piece
    return audio, joins


def log_mel(audio: np.ndarray) -> np.ndarray:
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(
        24000, n_fft=1024, hop_length=240, n_mels=80
    )(torch.from_numpy(audio))
    return np.log10(mel.numpy() + 1e-5)


def mel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute log10-mel difference (0.1 = 2 dB)."""
    return float(np.abs(log_mel(a) - log_mel(b)).mean())


def snr(reference: np.ndarray, audio: np.ndarray) -> float:
    error = np.sum((reference - audio) ** 2)
    return float(10 * np.log10(np.sum(reference**2) / max(error, 1e-20)))


def check_format(audio: np.ndarray, n_tokens: int) -> None:
    assert audio.dtype == np.float32
    assert len(audio) == SAMPLES_PER_TOKEN * (n_tokens + 3)
    assert np.isfinite(audio).all()
    assert np.abs(audio).max() <= 1.0


def test_flow_matches_upstream(model: Any, tokens: List[int]) -> None:
    """Our flow step is upstream's flow_inference when given the same noise
    (upstream draws the tokens' noise, then the full-length noise, and puts
    the first over the second's tail)."""
    s3gen, ref = model.s3gen, model.conds.gen
    group = torch.tensor(tokens[:30] + [S3GEN_SIL] * 3)
    prompt = ref["prompt_feat"].shape[1]
    with torch.inference_mode():
        torch.manual_seed(5)
        upstream = s3gen.flow_inference(
            group, ref_dict=dict(ref), n_cfm_timesteps=2, finalize=True
        )
        torch.manual_seed(5)
        tail = torch.randn(1, 80, 2 * len(group))
        noise = torch.randn(1, 80, prompt + 2 * len(group))
        noise[..., prompt:] = tail
        ours = flow_mel(
            s3gen, _cast_ref(ref, "cpu", torch.float32), group, noise, finalize=True
        )
        # Not final: the look-ahead frames (and their mask) are cut.
        partial = flow_mel(
            s3gen, _cast_ref(ref, "cpu", torch.float32), group, noise, finalize=False
        )
    assert torch.allclose(ours, upstream, atol=1e-5)
    assert partial.shape[2] == 2 * (len(group) - 3)


def test_lengths_and_format(
    model: Any, tokens: List[int], whole: np.ndarray, streamed: Tuple
) -> None:
    check_format(whole, len(tokens))
    check_format(streamed[0], len(tokens))
    short = tokens[:10]
    # One push of everything, then finish (a second decode with finalize).
    one, _, _ = stream(model, short, [len(short)])
    check_format(one, len(short))
    # Pushes of one token: most release nothing and run no model.
    ones, joins, streamer = stream(model, short, [1] * len(short))
    check_format(ones, len(short))
    assert len(streamer.stats) < len(short)
    assert len(joins) >= 2
    # No tokens at all: the 3 silence tokens.
    empty = S3GenStreamer(model.s3gen, model.conds.gen, seed=SEED).finish()
    check_format(empty, 0)


def test_push_without_release_is_quick(model: Any, tokens: List[int]) -> None:
    streamer = S3GenStreamer(model.s3gen, model.conds.gen, seed=SEED)
    assert streamer.push(tokens[:4]).size == 0  # all inside the look-ahead
    assert streamer.stats == []
    with pytest.raises(ValueError):
        streamer.push([6561])


def test_streamed_matches_whole(
    model: Any, tokens: List[int], whole: np.ndarray, streamed: Tuple
) -> None:
    """Streamed vs whole with the same noise: measured 0.016 log-mel distance
    and 35 dB SNR. The same decode with other noise differs by 0.24 / 11 dB,
    so the thresholds (0.05 / 25 dB) separate "same audio" from "other audio"."""
    audio, _ = streamed
    other = S3GenStreamer(model.s3gen, model.conds.gen, seed=SEED + 1)
    baseline = other.finish(tokens)
    assert mel_distance(whole, audio) < 0.05
    assert snr(whole, audio) > 25
    assert mel_distance(whole, baseline) > 0.1
    assert snr(whole, baseline) < 20


def local_snr(reference: np.ndarray, audio: np.ndarray, at: int) -> float:
    """SNR against the whole decode in the 20 ms around a join."""
    span = slice(at - 240, at + 240)
    return snr(reference[span], audio[span])


def test_joins_are_seamless(
    model: Any, tokens: List[int], whole: np.ndarray, streamed: Tuple
) -> None:
    """At each join the streamed audio still follows the whole decode closely
    (measured 25 dB in ±10 ms; 14 dB for pieces vocoded without overlap,
    context or crossfade), and the sample step there is ordinary."""
    audio, joins = streamed
    assert len(joins) == 2
    steps = np.abs(np.diff(audio))
    for at in joins:
        assert local_snr(whole, audio, at) > 19
        assert abs(audio[at] - audio[at - 1]) <= np.percentile(steps, 99.5)
    # The baseline: hard cuts between pieces fail the same check.
    cut, cut_joins, _ = stream(
        model, tokens, [20], context_frames=0, crossfade_ms=0.01, hold_frames=1
    )
    assert min(local_snr(whole, cut, at) for at in cut_joins) < 17


def test_watermark_streamed(model: Any, streamed: Tuple) -> None:
    """Marking the pieces as they come equals marking the whole (measured: the
    difference is 60 dB below the mark), keeps the length, and is detected."""
    audio, joins = streamed
    watermarker = model.watermarker
    marker = StreamWatermarker(watermarker, 24000)
    pieces = []
    for a, b in zip([0] + joins, joins + [len(audio)]):
        pieces.append(marker.push(audio[a:b]))
    pieces.append(marker.finish())
    marked = np.concatenate(pieces)
    assert len(marked) == len(audio) and marked.dtype == np.float32
    assert len(marker.stats) >= 2
    whole_marked = np.asarray(watermarker.apply_watermark(audio, sample_rate=24000))
    mark = whole_marked - audio
    error = whole_marked - marked
    assert 10 * np.log10(np.sum(mark**2) / np.sum(error**2)) > 30
    found = watermarker.get_watermark(marked, 24000, round=False)
    expected = watermarker.get_watermark(whole_marked, 24000, round=False)
    plain = watermarker.get_watermark(audio, 24000, round=False)
    assert np.mean(found) > 0.9 and np.mean(expected) > 0.9
    assert abs(np.mean(found) - np.mean(expected)) < 0.05
    assert np.mean(plain) < 0.2
    # Short input and an empty finish work.
    small = StreamWatermarker(watermarker, 24000)
    assert small.push(audio[:480]).size == 0
    assert len(small.finish()) == 480
    assert small.finish().size == 0


def test_ref_dict_untouched(model: Any, tokens: List[int]) -> None:
    ref: Dict[str, Any] = model.conds.gen
    before = {k: (v.clone(), v.dtype) for k, v in ref.items() if torch.is_tensor(v)}
    keys = list(ref)
    stream(model, tokens[:8], [8])
    assert list(ref) == keys
    for key, (value, dtype) in before.items():
        assert ref[key].dtype == dtype
        assert torch.equal(ref[key], value)
