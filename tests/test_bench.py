"""script/bench in --fake mode: every case runs and its JSON and report are whole.

Not a speed test: it checks that the benchmark measures what it says (a sample
per round, p95 >= p50, audio as long as the text, the silence metric present)
and that --report keeps the run beside the file it is given and rewrites only
its latest figures, so a broken bench cannot quietly publish empty or made-up
figures.
"""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "script"))

from benchmark import backends, cli, runs, stats  # noqa: E402

ROUNDS = 3
LEVELS = (1, 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    report = tmp / "benchmarks.md"
    report.write_text("# Benchmarks\n\nIntro.\n")
    out = tmp / "bench.json"
    code = cli.main(
        [
            "--fake",
            "--fake-delay",
            "0.05",
            "--rounds",
            str(ROUNDS),
            "--warmup",
            "1",
            "--concurrency",
            ",".join(str(n) for n in LEVELS),
            "--sweep-rounds",
            "1",
            "--fragment-interval",
            "0.005",
            "--json",
            str(out),
            "--report",
            str(report),
        ]
    )
    assert code == 0
    return {
        "results": json.loads(out.read_text()),
        "report": report.read_text(),
        "path": report,
        "kept": sorted((tmp / runs.RUNS_DIR).glob("*.json")),
    }


def _check_summary(summary: dict, key: str, n: int) -> None:
    figure = summary[key]
    assert figure["n"] == n, key
    assert 0 < figure["p50"] <= figure["p95"] <= figure["max"], (key, figure)


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_every_case_has_one_sane_sample_per_round(run: dict, case: str) -> None:
    data = run["results"]["cases"][case]
    samples = data["samples"]
    assert len(samples) == ROUNDS
    summary = data["summary"]
    assert summary["rounds"] == ROUNDS
    for key in ("first_audio_s", "total_s", "audio_s", "rtf_wall"):
        _check_summary(summary, key, ROUNDS)
    for sample in samples:
        assert sample["first_audio_s"] <= sample["total_s"]
        # The fake speaks as long as real speech of the text would last.
        assert sample["audio_s"] == pytest.approx(
            sample["chars"] / backends.CHARS_PER_SECOND, rel=0.2
        )
        assert sample["max_gap_s"] >= 0 and "audible_gaps" in sample
        # In this process the backend's calls are timed: overhead is known,
        # and at least the fake's delay went to the model, not to overhead.
        assert sample["calls"] >= 1
        assert sample["backend_busy_s"] >= 0.05 * sample["calls"] * 0.9
        assert sample["overhead_first_audio_s"] < sample["first_audio_s"]
        assert sample["tokens"] == sample["intended_tokens"]
    if case == "c":
        _check_summary(summary, "first_audio_after_first_sentence_s", ROUNDS)
        assert summary["max_gap_s"]["n"] == ROUNDS
    else:
        _check_summary(summary, "overhead_total_s", ROUNDS)


def test_concurrency_levels_have_every_stream(run: dict) -> None:
    sweep = run["results"]["concurrency"]
    assert sorted(int(level) for level in sweep) == list(LEVELS)
    for level in LEVELS:
        data = sweep[str(level)]
        assert data["errors"] == []
        assert len(data["samples"]) == level
        summary = data["summary"]
        _check_summary(summary, "first_audio_s", level)
        assert summary["throughput_audio_s_per_s"] > 0
        assert 0 < summary["engine_busy_fraction"] <= 1


def test_meta_and_targets_are_reported(run: dict) -> None:
    results = run["results"]
    meta = results["meta"]
    assert meta["mode"] == "fake"
    assert meta["command"].startswith("script/bench --fake")
    assert meta["fast"]["static_cache"] is True
    statuses = {t["key"]: t["status"] for t in results["targets"]}
    assert statuses["total_a"] == "not judged (not a GPU run)"
    assert statuses["overhead_first_audio_a"] in ("met", "missed")
    assert results["in_process"]["group_stats"] == {"available": False}


def test_report_keeps_the_run_and_rewrites_only_its_latest_figures(
    run: dict,
) -> None:
    report, results = run["report"], run["results"]
    assert report.startswith("# Benchmarks\n\nIntro.\n")
    assert report.count(runs.BEGIN) == 1 and report.count(runs.END) == 1
    # The run is kept beside the report: its summaries, not its samples.
    assert len(run["kept"]) == 1
    kept = json.loads(run["kept"][0].read_text())
    assert kept["meta"]["command"] == results["meta"]["command"]
    assert kept["cases"]["c"]["summary"] == results["cases"]["c"]["summary"]
    assert "samples" not in kept["cases"]["c"]
    # --fragment-interval changes case (c): a run apart from the defaults'.
    assert "### Fake backend, 0.05 s per group, " in report
    assert "No run with the default switches yet." in report
    assert "| `--fragment-interval 0.005` |" in report
    assert f"`{results['meta']['command']}`" in report
    assert f"({runs.RUNS_DIR}/{run['kept'][0].name})" in report
    # Refreshing again changes nothing: the block is replaced, not appended.
    runs.refresh(run["path"])
    assert run["path"].read_text() == report


def test_latest_figures_take_each_case_from_its_newest_default_run(
    run: dict, tmp_path: Path
) -> None:
    kept = json.loads(run["kept"][0].read_text())
    older = json.loads(json.dumps(kept))
    older["meta"]["command"] = "script/bench --fake --fake-delay 0.05 --quick"
    newer = json.loads(json.dumps(older))
    newer["meta"]["date"] = "2999-01-01 00:00"
    newer["meta"]["command"] += " --cases c"
    del newer["cases"]["a"], newer["cases"]["b"]
    newer["cases"]["c"]["summary"]["rounds"] = 7
    report = tmp_path / "benchmarks.md"
    for one in (older, newer):
        runs.write_run(report, one)
    runs.refresh(report)
    text = report.read_text()
    assert text.startswith("# Benchmarks\n")
    assert f"| rounds | {ROUNDS} | {ROUNDS} | 7 |" in text
    assert "| run | [1] | [1] | [2] |" in text
    assert "- [2] 2999-01-01 00:00" in text


def test_playback_gaps_count_only_silence_beyond_real_time() -> None:
    # 1 s chunks: the second arrives on time, the third 0.5 s late, then the
    # player goes on from there, so the fourth (on time for it) adds nothing.
    gaps = stats.playback_gaps([0.0, 1.0, 2.5, 3.4], [1.0, 1.0, 1.0, 1.0])
    assert gaps["max_gap_s"] == pytest.approx(0.5)
    assert gaps["total_gap_s"] == pytest.approx(0.5)
    assert gaps["audible_gaps"] == 1


def test_speak_calls_are_timed_once_each_whole_or_streamed() -> None:
    """One-shot replies reach speak() as whole jobs, streamed groups as parts:
    the recorder times both, neither twice, and counts only pieces of audio."""
    import numpy as np

    from wyoming_chatterbox.speech import NOTHING_YET, Piece, SpeechBackend, SpeechJob

    class Plain(SpeechBackend):
        sample_rate = 24000

        def load(self) -> None:
            pass

        def voices(self) -> list:
            return []

        def speak(self, job: SpeechJob):  # type: ignore[no-untyped-def]
            yield NOTHING_YET
            yield Piece(np.zeros(4800 if job.whole else 2400, np.float32), tokens=3)

    backend = Plain()
    recorder = backends.CallRecorder(backend)
    for whole in (True, False):
        pieces = list(backend.speak(SpeechJob("Hi.", "v", "en", whole=whole)))
        assert len(pieces) == 2
    assert [call["whole"] for call in recorder.calls] == [True, False]
    assert [call["audio_s"] for call in recorder.calls] == [0.2, 0.1]
    assert all(call["pieces"] == 1 for call in recorder.calls)
    assert all(call["tokens"] == 3 for call in recorder.calls)
