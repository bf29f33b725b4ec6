"""The runs kept for the docs, and the latest figures built from them.

`--report PATH` (script/bench and script/bench-t3) keeps the run as
PATH's folder/bench-runs/DATE-WHAT.json (its summaries and meta; `--json` keeps
every sample) and rewrites the part of PATH between BEGIN and END (added at
the end if missing) from all the runs kept there: per setup (mode, backend,
device, machine), the newest figures of each case and sweep level; runs with a
speed or server switch changed each get one row apart. Nothing else in PATH
is touched.
"""

import json
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .machine import machine_label
from .report import fmt, pair, t3_lines
from .stats import quantile

BEGIN = (
    "<!-- BEGIN latest figures: written by script/bench --report from "
    "bench-runs/*.json; edits here are lost -->"
)
END = "<!-- END latest figures -->"
RUNS_DIR = "bench-runs"

# Flags that say how much was run or where it was written, not what ran.
NOT_SETUP = {
    "--json", "--report", "--rounds", "--warmup", "--quick", "--concurrency",
    "--sweep-case", "--sweep-rounds", "--sweep-timeout", "--cases", "--timeout",
    "--verbose", "--seed", "--levels", "--tokens", "--repeats",
}  # fmt: skip
# Flags that name the setup itself (its title).
SETUP = {"--fake", "--fake-delay", "--checkpoint", "--uri", "--device", "--dtype"}
CASES = ("a", "b", "c")


def server_run(results: Dict[str, Any]) -> Dict[str, Any]:
    """What the docs keep of a script/bench run: all but the samples and the
    backend's raw per-group entries (their summaries stay)."""
    run = dict(results)
    for part in ("cases", "concurrency"):
        run[part] = {
            name: {k: v for k, v in data.items() if k not in ("samples", "group_stats")}
            for name, data in results[part].items()
        }
    return run


def flags(command: str) -> List[Tuple[str, str]]:
    """The (flag, value) pairs of a command line ("" for a switch)."""
    words = shlex.split(command)[1:]
    out: List[Tuple[str, str]] = []
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name, _, value = word.partition("=")
        if not value and i + 1 < len(words) and not words[i + 1].startswith("--"):
            value = words[i + 1]
        out.append((name, value))
    return out


def changed_switches(meta: Dict[str, Any]) -> str:
    """The flags of the run that change what runs ("" for the defaults)."""
    return " ".join(
        f"{name} {value}".strip()
        for name, value in flags(meta["command"])
        if name not in NOT_SETUP | SETUP
    )


def setup_title(run: Dict[str, Any]) -> str:
    meta = run["meta"]
    given = dict(flags(meta["command"]))
    machine = machine_label(meta)
    if "rows" in run:
        switches = changed_switches(meta)
        return (
            f"T3 alone (script/bench-t3), checkpoint {given.get('--checkpoint')} "
            f"on {meta['device']}, {meta['dtype']}, {machine}"
            + (f", `{switches}`" if switches else "")
        )
    if meta["mode"] == "fake":
        delay = float(given.get("--fake-delay") or 0)
        return f"Fake backend, {delay:g} s per group, {machine}"
    if meta["mode"] == "checkpoint":
        checkpoint = meta.get("checkpoint") or given.get("--checkpoint")
        model = f" ({meta['model']})" if meta.get("model") else ""
        return f"Checkpoint {checkpoint}{model} on {meta['device']}, {machine}"
    return f"Server at {given.get('--uri')}"


def run_name(run: Dict[str, Any]) -> str:
    """DATE-WHAT: e.g. 2026-11-25-0621-checkpoint-cpu-no-static-cache."""
    meta = run["meta"]
    words = [meta["date"].replace(" ", "-").replace(":", "")]
    if "rows" in run:
        words.append("t3-batching")
    else:
        words.append(meta["mode"])
    if meta.get("model"):
        words.append(str(meta["model"]))
    if meta.get("mode") != "fake":
        words.append(str(meta["device"]).replace(":", ""))
    given = dict(flags(meta["command"]))
    if given.get("--fake-delay"):
        words.append(f"delay-{given['--fake-delay']}")
    switches = changed_switches(meta).replace("--", "").split()
    words += switches
    name = "-".join(words)
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name)[:120]


def write_run(report: Path, run: Dict[str, Any]) -> Path:
    """Keep `run` beside `report`, under bench-runs/; the file written."""
    folder = report.parent / RUNS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = run_name(run)
    path = folder / f"{name}.json"
    n = 2
    while path.exists():
        path = folder / f"{name}-{n}.json"
        n += 1
    path.write_text(json.dumps(run, indent=1, default=str) + "\n")
    return path


def load_runs(folder: Path) -> List[Dict[str, Any]]:
    """Every run kept in `folder`, oldest first, each with its file name."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        run["file"] = f"{RUNS_DIR}/{path.name}"
        runs.append(run)
    return sorted(runs, key=lambda run: (run["meta"]["date"], run["file"]))


def refresh(report: Path) -> None:
    """Rewrite the latest figures in `report` from its bench-runs/."""
    block = latest_block(load_runs(report.parent / RUNS_DIR))
    text = report.read_text() if report.exists() else "# Benchmarks\n"
    # The markers by their first words, so that rewording them keeps one block.
    found = re.search(
        "^<!-- BEGIN latest figures.*?^<!-- END latest figures.*?$",
        text,
        re.MULTILINE | re.DOTALL,
    )
    if found:
        text = text[: found.start()] + block + text[found.end() :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    report.write_text(text)


def latest_block(runs: List[Dict[str, Any]]) -> str:
    """The block between BEGIN and END: a section per setup, newest first."""
    setups: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        setups.setdefault(setup_title(run), []).append(run)
    lines = [
        BEGIN,
        "## Latest figures",
        "",
        "The newest figures of each case, per setup, from the runs kept in "
        f"[{RUNS_DIR}/]({RUNS_DIR}/) (p50 / p95 unless said; *Figures* below "
        "defines them). Runs with a switch changed are listed apart. Each figure "
        "names its run; the run names its command, commit and machine.",
    ]
    ordered = sorted(setups.items(), key=lambda item: item[1][-1]["meta"]["date"])
    for title, members in reversed(ordered):
        lines += ["", f"### {title}", ""]
        if "rows" in members[-1]:
            lines += _t3_section(members[-1])
        else:
            lines += _setup_section(members)
    return "\n".join(lines + [END])


class _Refs:
    """Numbers the runs a section cites, in the order first cited."""

    def __init__(self) -> None:
        self.runs: List[Dict[str, Any]] = []

    def __call__(self, run: Dict[str, Any]) -> str:
        for i, cited in enumerate(self.runs, 1):
            if cited is run:
                return f"[{i}]"
        self.runs.append(run)
        return f"[{len(self.runs)}]"

    def lines(self) -> List[str]:
        return [
            f"- [{i}] {run['meta']['date']}, commit {run['meta']['git']}: "
            f"`{run['meta']['command']}` ([{Path(run['file']).name}]({run['file']}))"
            for i, run in enumerate(self.runs, 1)
        ]


def _newest(runs: Iterable[Dict[str, Any]], has: Any) -> Optional[Dict[str, Any]]:
    found = [run for run in runs if has(run)]
    return found[-1] if found else None


def _setup_section(members: List[Dict[str, Any]]) -> List[str]:
    defaults = [run for run in members if not changed_switches(run["meta"])]
    refs = _Refs()
    lines = _case_table(defaults, refs) + _sweep_rows(defaults, refs)
    lines += _inside_line(defaults, refs)
    lines += _variants(members, refs)
    return lines + [""] + refs.lines()


# Rows of a setup's case table: label, summary key, unit, what of it.
_CASE_FIGURES = (
    ("first audio", "first_audio_s", "s", "pair"),
    ("first audio after the first sentence", "first_audio_after_first_sentence_s",
     "s", "pair"),
    ("total", "total_s", "s", "pair"),
    ("longest silence beyond real time, max", "max_gap_s", "s", "max"),
    ("RTF, backend (p50)", "rtf_backend", "x", "p50"),
    ("RTF, wall (p50)", "rtf_wall", "x", "p50"),
    ("server overhead on first audio", "overhead_first_audio_s", "s", "pair"),
    ("server overhead on total (p50, %)", "overhead_total_pct", "", "p50"),
)  # fmt: skip


def _cell(summary: Dict[str, Any], key: str, unit: str, what: str) -> str:
    figure = summary.get(key)
    if not figure or not figure.get("n"):
        return "–"
    if what == "pair":
        return pair(figure, unit)
    return fmt(quantile(figure, what), unit)


def _case_table(runs: List[Dict[str, Any]], refs: _Refs) -> List[str]:
    newest: Dict[str, Dict[str, Any]] = {}
    for run in runs:  # oldest first: the newest stays
        for case in run["cases"]:
            newest[case] = run
    cases = [case for case in CASES if case in newest]
    if not cases:
        return ["No run with the default switches yet."]
    summaries = {case: newest[case]["cases"][case]["summary"] for case in cases}
    lines = [
        "| figure | " + " | ".join(f"({case})" for case in cases) + " |",
        "|---" * (len(cases) + 1) + "|",
    ]
    for label, key, unit, what in _CASE_FIGURES:
        cells = [_cell(summaries[case], key, unit, what) for case in cases]
        if any(cell != "–" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| rounds | " + " | ".join(str(summaries[c]["rounds"]) for c in cases) + " |"
    )
    lines.append("| run | " + " | ".join(refs(newest[c]) for c in cases) + " |")
    return lines


def _sweep_rows(runs: List[Dict[str, Any]], refs: _Refs) -> List[str]:
    newest: Dict[Tuple[int, str], Dict[str, Any]] = {}
    for run in runs:  # oldest first: the newest stays
        for level, data in run["concurrency"].items():
            newest[(int(level), data["case"])] = run
    if not newest:
        return []
    lines = [
        "",
        "| clients x case | streams | errors | first audio | after the first "
        "sentence | longest silence p50 / max | throughput (audio s / s) | "
        "engine busy | GPU peak | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (level, case), run in sorted(newest.items()):
        s = run["concurrency"][str(level)]["summary"]
        busy = s.get("engine_busy_fraction")
        lines.append(
            f"| {level} x ({case}) | {s['streams']} | {s['errors']} "
            f"| {pair(s.get('first_audio_s'), 's')} "
            f"| {pair(s.get('first_audio_after_first_sentence_s'), 's')} "
            f"| {pair(s.get('max_gap_s'), 's', 'max')} "
            f"| {s['throughput_audio_s_per_s']:.2f} "
            f"| {'n/a' if busy is None else f'{busy * 100:.0f} %'} "
            f"| {fmt(s.get('gpu_memory_peak_gb'), 'GB')} | {refs(run)} |"
        )
    return lines


def _inside_line(runs: List[Dict[str, Any]], refs: _Refs) -> List[str]:
    run = _newest(
        runs, lambda r: r.get("in_process", {}).get("group_stats", {}).get("available")
    )
    if run is None:
        return []
    stats = run["in_process"]["group_stats"]
    parts = [
        f"{label} {fmt(quantile(stats.get(key)), unit)}"
        for label, key, unit in (
            ("T3 per token", "ms_per_token", "ms"),
            ("T3 prefill", "prefill_s", "s"),
            ("S3Gen per call", "s3gen_s", "s"),
            ("watermark per call", "watermark_s", "s"),
        )
    ]
    memory = run.get("gpu_memory_one_stream_gb")
    if memory is not None:
        parts.append(f"GPU memory peak, one stream {memory:.2f} GB")
    groups = stats["groups"]
    return [
        "",
        f"Inside the backend {refs(run)}, p50 over {groups} sentence "
        f"group{'' if groups == 1 else 's'}: {', '.join(parts)}.",
    ]


def _variants(members: List[Dict[str, Any]], refs: _Refs) -> List[str]:
    newest: Dict[str, Dict[str, Any]] = {}
    for run in members:
        switches = changed_switches(run["meta"])
        if switches:
            newest[switches] = run
    if not newest:
        return []
    lines = [
        "",
        "With a switch changed (the newest run of each; p50):",
        "",
        "| switches | (a) total | (b) first audio | (c) first audio after the "
        "first sentence | (c) longest silence, max | T3 per token | most "
        "clients: first audio p95 ((c): after the first sentence), throughput "
        "| run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for switches, run in sorted(newest.items()):
        cases = run["cases"]

        def cell(case: str, key: str, unit: str, q: str = "p50") -> str:
            summary = cases.get(case, {}).get("summary", {})
            return fmt(quantile(summary.get(key), q), unit)

        stats = run.get("in_process", {}).get("group_stats", {})
        lines.append(
            f"| `{switches}` | {cell('a', 'total_s', 's')} "
            f"| {cell('b', 'first_audio_s', 's')} "
            f"| {cell('c', 'first_audio_after_first_sentence_s', 's')} "
            f"| {cell('c', 'max_gap_s', 's', 'max')} "
            f"| {fmt(quantile(stats.get('ms_per_token')), 'ms')} "
            f"| {_most_clients(run)} | {refs(run)} |"
        )
    return lines


def _most_clients(run: Dict[str, Any]) -> str:
    """The sweep's largest level: first audio p95 (after the first sentence
    for (c)) and throughput."""
    if not run["concurrency"]:
        return "–"
    level = max(run["concurrency"], key=int)
    data = run["concurrency"][level]
    s = data["summary"]
    key = (
        "first_audio_after_first_sentence_s" if data["case"] == "c" else "first_audio_s"
    )
    return (
        f"{level} x ({data['case']}): {fmt(quantile(s.get(key), 'p95'), 's')}, "
        f"{s['throughput_audio_s_per_s']:.2f} audio s / s"
    )


def _t3_section(run: Dict[str, Any]) -> List[str]:
    """The newest script/bench-t3 run of a setup as it prints, but for its
    title (the section's), and where it is kept."""
    lines = t3_lines(run)[2:]
    kept = f"- kept in [{Path(run['file']).name}]({run['file']})"
    return lines[:3] + [kept] + lines[3:]


if __name__ == "__main__":
    # After copying run files into docs/bench-runs/ by hand:
    #   PYTHONPATH=script .venv/bin/python -m benchmark.runs docs/benchmarks.md
    import sys

    for name in sys.argv[1:]:
        refresh(Path(name))
        print(f"Refreshed the latest figures in {name}")
