"""script/bench in --fake mode: every case runs and its JSON and report are whole.

Not a speed test: it checks that the benchmark measures what it says (a sample
per round, p95 >= p50, audio as long as the text, the silence metric present)
and that --report appends to the file it is given, so a broken bench cannot
quietly publish empty or made-up figures.
"""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3
LEVELS = (1, 2)


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_script", REPO / "script" / "bench.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    report = tmp / "benchmarks.md"
    report.write_text("# Benchmarks\n\nIntro.\n")
    out = tmp / "bench.json"
    code = bench.main(
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
    return {"results": json.loads(out.read_text()), "report": report.read_text()}


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
            sample["chars"] / bench.CHARS_PER_SECOND, rel=0.2
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


def test_report_section_appended_to_the_given_file(run: dict) -> None:
    report = run["report"]
    assert report.startswith("# Benchmarks\n\nIntro.\n")
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert len(sections) == 1 and sections[0].endswith(", fake")
    assert "**Case (c)**" in report and "| 2 | 2 | 0 |" in report


def test_playback_gaps_count_only_silence_beyond_real_time() -> None:
    # 1 s chunks: the second arrives on time, the third 0.5 s late, then the
    # player goes on from there, so the fourth (on time for it) adds nothing.
    gaps = bench.playback_gaps([0.0, 1.0, 2.5, 3.4], [1.0, 1.0, 1.0, 1.0])
    assert gaps["max_gap_s"] == pytest.approx(0.5)
    assert gaps["total_gap_s"] == pytest.approx(0.5)
    assert gaps["audible_gaps"] == 1


def test_one_shot_calls_are_timed_whichever_method_serves_them() -> None:
    """The engine asks synthesize_whole for one-shot replies: a backend with its
    own (Turbo) must be timed there, one with the default through synthesize,
    and neither twice."""
    import numpy as np

    from wyoming_chatterbox.engine import Piece, SamplingParams

    class Plain(bench.SpeechBackend):  # type: ignore[name-defined,misc]
        sample_rate = 24000

        def load(self) -> None:
            pass

        def voices(self) -> list:
            return []

        def synthesize(self, text, voice, language, params, should_stop):  # type: ignore[no-untyped-def]
            yield Piece(np.zeros(2400, np.float32), tokens=3)

    class Own(Plain):
        def synthesize_whole(self, text, voice, language, params, should_stop):  # type: ignore[no-untyped-def]
            yield Piece(np.zeros(4800, np.float32), tokens=6)

    for cls, samples in [(Plain, 2400), (Own, 4800)]:
        backend = cls()
        recorder = bench.CallRecorder(backend)
        for speak in (backend.synthesize_whole, backend.synthesize):
            pieces = list(speak("Hi.", "v", "en", SamplingParams(), lambda: False))
            assert len(pieces) == 1
        assert len(recorder.calls) == 2, cls
        assert recorder.calls[0]["audio_s"] == samples / 24000
        assert recorder.calls[1]["audio_s"] == 0.1
