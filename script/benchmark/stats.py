"""Summaries: percentiles of the samples, the silences a listener hears, and the
backend's own per-group figures. Pure functions of numbers; no I/O, no clock.
"""

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

# A silence shorter than this is jitter, not something a listener hears.
AUDIBLE_GAP_S = 0.010

# The figures of one reply that each case summarizes (those a sample has).
SAMPLE_FIGURES = (
    "first_audio_s",
    "first_audio_after_first_sentence_s",
    "first_audio_from_start_s",
    "first_audio_after_text_ready_s",
    "splitter_wait_s",
    "total_s",
    "audio_s",
    "text_s",
    "rtf_wall",
    "rtf_backend",
    "max_gap_s",
    "total_gap_s",
    "audible_gaps",
    "backend_busy_s",
    "overhead_first_audio_s",
    "overhead_before_call_s",
    "overhead_after_piece_s",
    "overhead_total_s",
    "overhead_total_pct",
    "tokens",
    "intended_tokens",
)

# The backend's per-group figures (GroupStats): key, label, unit.
GROUP_FIGURES = (
    ("prefill_s", "T3 prefill", "s"),
    ("ms_per_token", "T3 per token", "ms"),
    ("decode_s", "T3 decode loop", "s"),
    ("s3gen_s", "S3Gen per call", "s"),
    ("s3gen_tokens", "S3Gen tokens per call", ""),
    ("watermark_s", "watermark per call", "s"),
    ("first_piece_s", "synthesize() to first piece", "s"),
    ("total_s", "synthesize() total", "s"),
    ("tokens", "speech tokens per group", ""),
    ("pieces", "pieces per group", ""),
)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default): with few
    samples p95 is close to the maximum, which is the honest reading."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """n, p50, p95, min, max and mean of the values that exist."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not present:
        return {"n": 0}
    return {
        "n": len(present),
        "p50": percentile(present, 50),
        "p95": percentile(present, 95),
        "min": min(present),
        "max": max(present),
        "mean": sum(present) / len(present),
    }


def quantile(summary: Optional[Dict[str, Any]], key: str = "p50") -> Optional[float]:
    """One figure of a summary; None where nothing was measured."""
    if not summary or not summary.get("n"):
        return None
    value = summary.get(key)
    return None if value is None else float(value)


def playback_gaps(arrivals: Sequence[float], durations: Sequence[float]) -> Dict:
    """The silences a listener would hear if playback started at the first chunk.

    A player plays each chunk as soon as the one before it has ended; a chunk
    that arrives after that moment leaves a silence, and the player goes on from
    the chunk's arrival. Only the silences beyond real time count, so a reply
    produced faster than it is spoken has none.
    """
    clock: Optional[float] = None
    gaps: List[float] = []
    for arrival, seconds in zip(arrivals, durations):
        if clock is None:
            clock = arrival
        elif arrival > clock:
            gaps.append(arrival - clock)
            clock = arrival
        clock += seconds
    audible = [gap for gap in gaps if gap > AUDIBLE_GAP_S]
    return {
        "max_gap_s": max(gaps, default=0.0),
        "total_gap_s": sum(gaps),
        "audible_gaps": len(audible),
    }


def case_summary(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The rounds, and a summary of each figure the samples have."""
    summary: Dict[str, Any] = {"rounds": len(samples)}
    for key in SAMPLE_FIGURES:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            summary[key] = summarize(values)
    return summary


def public(sample: Dict[str, Any]) -> Dict[str, Any]:
    """A sample without its absolute clock readings."""
    return {k: v for k, v in sample.items() if not k.startswith("t_") and k != "t0"}


def summarize_groups(entries: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
    """p50/p95 of each group_stats figure; lists (one value per call) are pooled."""
    if entries is None:
        return {"available": False}
    out: Dict[str, Any] = {"available": True, "groups": len(entries)}
    for key, _, _ in GROUP_FIGURES:
        values: List[float] = []
        for entry in entries:
            value = entry.get(key)
            if isinstance(value, (list, tuple)):
                values.extend(float(v) for v in value)
            elif isinstance(value, (int, float)):
                values.append(float(value))
        out[key] = summarize(values)
    return out


def pooled_group_stats(parts: Dict[str, Any]) -> Dict[str, Any]:
    """summarize_groups over the entries of every case (or sweep level) in
    `parts`; unavailable when no part has backend figures."""
    if not any(part.get("group_stats") is not None for part in parts.values()):
        return summarize_groups(None)
    return summarize_groups(
        [entry for part in parts.values() for entry in (part.get("group_stats") or [])]
    )
