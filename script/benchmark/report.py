"""The printed report of one run: its header lines and Markdown tables (what
stdout shows), from the results dict alone.
"""

from typing import Any, Dict, List, Optional

from .machine import machine_label
from .stats import GROUP_FIGURES, quantile

# The rows of a case's table: key, label, unit.
CASE_ROWS = (
    ("first_audio_s", "first audio (from t0)", "s"),
    ("first_audio_after_first_sentence_s", "first audio after first sentence", "s"),
    ("first_audio_from_start_s", "first audio from synthesize-start", "s"),
    ("splitter_wait_s", "first sentence sent to first group released", "s"),
    ("first_audio_after_text_ready_s", "first audio after first group released", "s"),
    ("total_s", "total (from t0)", "s"),
    ("audio_s", "audio length", "s"),
    ("text_s", "text sending time", "s"),
    ("rtf_wall", "RTF, wall (reply time / audio)", "x"),
    ("rtf_backend", "RTF, backend (busy / audio)", "x"),
    ("max_gap_s", "longest silence beyond real time", "s"),
    ("total_gap_s", "all silences beyond real time", "s"),
    ("audible_gaps", "silences > 10 ms", ""),
    ("overhead_first_audio_s", "server overhead on first audio", "s"),
    ("overhead_before_call_s", "  of which: text ready to backend call", "s"),
    ("overhead_after_piece_s", "  of which: first piece to client", "s"),
    ("overhead_total_s", "server overhead on total", "s"),
    ("overhead_total_pct", "server overhead on total (%)", ""),
    ("tokens", "speech tokens made", ""),
    ("intended_tokens", "speech tokens intended (rule)", ""),
)


def fmt(value: Optional[float], unit: str) -> str:
    """A figure as the tables print it: seconds under 10 in ms, shares in %."""
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 10 else f"{value:.1f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "%":
        return f"{value * 100:.1f} %"
    if unit == "x":
        return f"{value:.3f}"
    if unit == "GB":
        return f"{value:.2f} GB"
    return f"{value:.1f}" if value != int(value) else f"{value:.0f}"


def pair(summary: Optional[Dict[str, Any]], unit: str, q: str = "p95") -> str:
    """The p50 and another figure of a summary, as "p50 / q"."""
    return f"{fmt(quantile(summary), unit)} / {fmt(quantile(summary, q), unit)}"


def _case_tables(results: Dict[str, Any]) -> List[str]:
    lines: List[str] = []
    for case, data in results["cases"].items():
        summary = data["summary"]
        lines += [
            "",
            f"**Case ({case})**, {summary['rounds']} rounds: {data['definition']}.",
            "",
            "| figure | p50 | p95 | max |",
            "|---|---|---|---|",
        ]
        for key, label, unit in CASE_ROWS:
            s = summary.get(key)
            if s and s.get("n"):
                lines.append(
                    f"| {label} | {fmt(s['p50'], unit)} | {fmt(s['p95'], unit)} "
                    f"| {fmt(s['max'], unit)} |"
                )
    return lines


def _sweep_table(results: Dict[str, Any]) -> List[str]:
    if not results["concurrency"]:
        return []
    case = next(iter(results["concurrency"].values()))["case"]
    lines = [
        "",
        f"**Concurrency**: N clients at once, each one reply of case ({case}).",
        "",
        "| N | streams | errors | first audio p50 / p95 | after 1st sentence "
        "p50 / p95 | RTF wall p50 / p95 | longest silence p50 / max | "
        "throughput (audio s / s) | engine busy | GPU peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level, data in results["concurrency"].items():
        s = data["summary"]
        busy = s.get("engine_busy_fraction")
        lines.append(
            f"| {level} | {s['streams']} | {s['errors']} "
            f"| {pair(s.get('first_audio_s'), 's')} "
            f"| {pair(s.get('first_audio_after_first_sentence_s'), 's')} "
            f"| {pair(s.get('rtf_wall'), 'x')} "
            f"| {pair(s.get('max_gap_s'), 's', 'max')} "
            f"| {s['throughput_audio_s_per_s']:.2f} "
            f"| {'n/a' if busy is None else f'{busy * 100:.0f} %'} "
            f"| {fmt(s.get('gpu_memory_peak_gb'), 'GB')} |"
        )
    return lines


def _inside_table(results: Dict[str, Any]) -> List[str]:
    inside = results.get("in_process")
    if not inside:
        return []
    stats = inside["group_stats"]
    lines = ["", "**Inside the backend** (backend.group_stats, cases above):", ""]
    if not stats.get("available"):
        lines.append("backend.group_stats: n/a (this backend does not keep it)")
    else:
        lines += [
            f"{stats['groups']} sentence groups.",
            "",
            "| figure | p50 | p95 | n |",
            "|---|---|---|---|",
        ]
        for key, label, unit in GROUP_FIGURES:
            s = stats.get(key, {})
            if s.get("n"):
                lines.append(
                    f"| {label} | {fmt(s['p50'], unit)} "
                    f"| {fmt(s['p95'], unit)} | {s['n']} |"
                )
            else:
                lines.append(f"| {label} | n/a | n/a | 0 |")
    memory = results.get("gpu_memory_one_stream_gb")
    if memory is not None:
        lines += ["", f"GPU memory peak, one stream: {memory:.2f} GB"]
    return lines


def _targets_table(results: Dict[str, Any]) -> List[str]:
    if not results.get("targets"):
        return []
    lines = ["", "**Targets** (not asserted):", "",
             "| target | figure | limit | status |", "|---|---|---|---|"]  # fmt: skip
    for t in results["targets"]:
        lines.append(
            f"| {t['label']} | {fmt(t['value'], t['unit'])} "
            f"| {fmt(t['limit'], t['unit'])} | {t['status']} |"
        )
    return lines


def markdown_tables(results: Dict[str, Any]) -> List[str]:
    """The figures as Markdown tables (what stdout shows)."""
    return (
        _case_tables(results)
        + _sweep_table(results)
        + _inside_table(results)
        + _targets_table(results)
    )


def header_lines(meta: Dict[str, Any]) -> List[str]:
    """What ran, where, how: the bullet list above the tables."""
    machine = meta["machine"]
    lines = [
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; GPU: "
        f"{machine['gpu'] or 'none'}; torch {machine['torch'] or 'not loaded'}; "
        f"Python {machine['python']}",
        f"- Commit: {meta['git']}",
        f"- Command: `{meta['command']}`",
        f"- Mode: {meta['mode']}; device: {meta['device']}",
        f"- Switches: {meta['switches']}",
    ]
    if meta.get("load_s") is not None:
        lines.append(f"- Load + warm-up: {meta['load_s']:.1f} s")
    lines.append(f"- Generation lengths: {meta['lengths']}")
    for note in meta.get("notes", []):
        lines.append(f"- Note: {note}")
    return lines


def t3_lines(run: Dict[str, Any]) -> List[str]:
    """A script/bench-t3 run as it prints: title, what ran, the table."""
    meta = run["meta"]
    start, end = meta["load_average"]
    lines = [
        f"## {meta['date']}, {machine_label(meta)}, T3 batching",
        "",
        f"- command: `{meta['command']}`",
        f"- git: {meta['git']}; torch {meta['torch']}, {meta['threads']} threads; "
        f"T3 {meta['t3_layers']} layers, width {meta['t3_width']}, {meta['dtype']}, "
        f"device {meta['device']}",
        f"- {meta['tokens']} tokens per group (forced), {meta['schedule']}; "
        f"best of {meta['repeats']} after a warm-up; load average {start} at "
        f"start, {end} at end; {meta['took_s']:.0f} s",
        "",
        "| groups | per step | wall | of which prefills | ms per step "
        "| ms per token, each group | tokens/s, all | first block, last group |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in run["rows"]:
        lines.append(
            f"| {row['groups']} | {row['batch']} | {row['wall_s']:.2f} s "
            f"| {row['prefill_s']:.2f} s | {row['ms_per_step']:.1f} "
            f"| {row['ms_per_token_per_group']:.1f} "
            f"| {row['tokens_per_s']:.1f} | {row['first_block_s_max']:.2f} s |"
        )
    return lines


# The figures compared side by side: label, where, key, unit.
_SIDE_BY_SIDE = (
    ("T3 per token (p50)", "inside", "ms_per_token", "ms"),
    ("T3 prefill (p50)", "inside", "prefill_s", "s"),
    ("S3Gen per call (p50)", "inside", "s3gen_s", "s"),
    ("watermark per call (p50)", "inside", "watermark_s", "s"),
    ("(a) total (p50)", "a", "total_s", "s"),
    ("(a) RTF, backend (p50)", "a", "rtf_backend", "x"),
    ("(b) first audio (p50)", "b", "first_audio_s", "s"),
    ("(b) RTF, backend (p50)", "b", "rtf_backend", "x"),
    ("(c) first audio after the first sentence (p50)", "c",
     "first_audio_after_first_sentence_s", "s"),
    ("(c) RTF, wall (p50)", "c", "rtf_wall", "x"),
)  # fmt: skip


def side_by_side(runs: List[Dict[str, Any]]) -> List[str]:
    """Several checkpoints' runs of one script/bench call in one table, with
    each run's figure as a share of the first's."""
    names = [
        f"{run['meta'].get('model') or '?'} ({run['meta'].get('checkpoint')})"
        for run in runs
    ]
    lines = [
        "",
        "## Side by side",
        "",
        "| figure | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{name.split()[0]} / {names[0].split()[0]}" for name in names[1:])
        + " |",
        "|---" * (2 * len(runs)) + "|",
    ]
    for label, where, key, unit in _SIDE_BY_SIDE:
        values = [_figure(run, where, key) for run in runs]
        if all(value is None for value in values):
            continue
        ratios = [
            f"{value / values[0]:.2f}" if value and values[0] else "n/a"
            for value in values[1:]
        ]
        lines.append(
            f"| {label} | "
            + " | ".join(fmt(value, unit) for value in values)
            + " | "
            + " | ".join(ratios)
            + " |"
        )
    loads = [
        " to ".join(str(x) for x in run["meta"].get("load_average", [])) for run in runs
    ]
    lines.append("| load average (1 min), start to end | " + " | ".join(loads) + " |")
    return lines


def _figure(run: Dict[str, Any], where: str, key: str) -> Optional[float]:
    if where == "inside":
        summary = run.get("in_process", {}).get("group_stats", {}).get(key)
    else:
        summary = run["cases"].get(where, {}).get("summary", {}).get(key)
    return quantile(summary) if summary and summary.get("n") else None
