"""The targets the fast path was planned against, each judged beside the figure
it is about: met, missed, or why it was not judged. Never asserted.
"""

from typing import Any, Dict, List, Optional

from .stats import AUDIBLE_GAP_S, percentile, pooled_group_stats, quantile

# (key, label, limit, unit, where). "any": the server's own overhead, on any
# machine; "gpu": an H100 figure, judged on CUDA runs only.
TARGETS = [
    ("overhead_first_audio_a", "server overhead on first audio, (a) p50", 0.020,
     "s", "any"),
    ("overhead_first_audio_b", "server overhead on first audio, (b) p50", 0.020,
     "s", "any"),
    ("overhead_first_audio_c", "server overhead on first audio, (c) p50", 0.020,
     "s", "any"),
    ("overhead_total_a", "server overhead on total, (a) p50", 0.05, "%", "any"),
    ("overhead_total_b", "server overhead on total, (b) p50", 0.05, "%", "any"),
    ("first_audio_b", "first audio p50, (b)", 0.150, "s", "gpu"),
    ("first_audio_c", "first audio after first sentence p50, (c)", 0.150, "s",
     "gpu"),
    ("total_a", "total p50, (a)", 0.250, "s", "gpu"),
    ("gap_c", "longest silence beyond real time, (c) max", 0.0, "s", "gpu"),
    ("rtf", "real-time factor p50", 0.05, "x", "gpu"),
    ("t3_ms_per_token", "T3 ms per token p50", 1.5, "ms", "gpu"),
    ("first_audio_16", "16 streams: first audio after first sentence p95", 0.400,
     "s", "gpu"),
    ("gpu_memory_one_stream", "GPU memory peak, one stream", 3.0, "GB", "gpu"),
]  # fmt: skip


def _figure(results: Dict[str, Any], case: str, key: str, q: str = "p50") -> Any:
    return quantile(results["cases"].get(case, {}).get("summary", {}).get(key), q)


def _pct(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / 100.0


def _rtf(results: Dict[str, Any]) -> Optional[float]:
    """The backend's RTF over (a) and (b); remote runs: the wall RTF of (a)."""
    values = [
        s["rtf_backend"]
        for case in ("a", "b")
        for s in results["cases"].get(case, {}).get("samples", [])
        if s.get("rtf_backend") is not None
    ]
    if not values:
        values = [
            s["rtf_wall"]
            for s in results["cases"].get("a", {}).get("samples", [])
            if s.get("rtf_wall") is not None
        ]
    return percentile(values, 50) if values else None


def target_figures(results: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Each target's figure, by its key (None: not measured)."""
    pooled = pooled_group_stats(results["cases"])
    level16 = results["concurrency"].get("16", {}).get("summary", {})
    return {
        "overhead_first_audio_a": _figure(results, "a", "overhead_first_audio_s"),
        "overhead_first_audio_b": _figure(results, "b", "overhead_first_audio_s"),
        "overhead_first_audio_c": _figure(results, "c", "overhead_first_audio_s"),
        "overhead_total_a": _pct(_figure(results, "a", "overhead_total_pct")),
        "overhead_total_b": _pct(_figure(results, "b", "overhead_total_pct")),
        "first_audio_b": _figure(results, "b", "first_audio_s"),
        "first_audio_c": _figure(results, "c", "first_audio_after_first_sentence_s"),
        "total_a": _figure(results, "a", "total_s"),
        "gap_c": _figure(results, "c", "max_gap_s", "max"),
        "rtf": _rtf(results),
        "t3_ms_per_token": quantile(pooled.get("ms_per_token")),
        "first_audio_16": quantile(
            level16.get("first_audio_after_first_sentence_s"), "p95"
        ),
        "gpu_memory_one_stream": results.get("gpu_memory_one_stream_gb"),
    }


def evaluate_targets(results: Dict[str, Any], on_gpu: bool) -> List[Dict[str, Any]]:
    """Each target beside the figure it is about: met, missed, or why not judged."""
    figures = target_figures(results)
    busy = {case: _figure(results, case, "backend_busy_s") for case in ("a", "b")}
    out = []
    for key, label, limit, unit, where in TARGETS:
        value = figures.get(key)
        if value is None:
            status = "n/a (not measured)"
        elif where == "gpu" and not on_gpu:
            status = "not judged (not a GPU run)"
        elif key.startswith("overhead_total") and (busy.get(key[-1]) or 0) < 0.05:
            # A share of nearly nothing: the overhead in ms is the figure then.
            status = "not judged (backend takes ~0 s)"
        else:
            # gap target 0: allow jitter below an audible silence.
            slack = AUDIBLE_GAP_S if key == "gap_c" else 0.0
            status = "met" if value <= limit + slack else "missed"
        out.append(
            {
                "key": key,
                "label": label,
                "value": value,
                "limit": limit,
                "unit": unit,
                "where": where,
                "status": status,
            }
        )
    return out
