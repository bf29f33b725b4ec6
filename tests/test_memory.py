"""An idle unload gives the model's memory back to the system.

The RSS test loads the random-weight checkpoint (its S3Gen is full size, about
1.1 GB) in a child process of its own (tests/unload_memory.py), so that no
other test's memory is counted.
"""

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_model import ENV, ROOT, checkpoint  # noqa: F401
from wyoming_chatterbox import memory


def unload(checkpoint: Path, *flags: str) -> dict:  # noqa: F811
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "unload_memory.py"), str(checkpoint)]
        + list(flags),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.model
@pytest.mark.skipif(not memory.trim_heap(), reason="needs Linux with glibc")
def test_an_idle_unload_gives_most_of_the_model_back(
    checkpoint: Path,  # noqa: F811
) -> None:
    result = unload(checkpoint)
    model = result["model_bytes"]
    assert model > 1e9  # S3Gen's weights, whatever T3's size
    freed = result["rss_loaded"] - result["rss_unloaded"]
    # Without malloc_trim about a third of it comes back (tests/unload_memory.py
    # --no-trim shows it); docs/reliability.md has the figures.
    assert freed > 0.75 * model, result
    line = [line for line in result["log"] if line.startswith("Model unloaded")]
    assert len(line) == 1 and "MB before" in line[0] and "malloc_trim" in line[0]


def test_resident_memory_is_read_from_the_system() -> None:
    before = memory.resident_bytes()
    assert before is not None and before > 10 * 2**20
    block = bytearray(64 * 2**20)  # 64 MB, touched
    grown = memory.resident_bytes()
    assert grown is not None and grown - before > 60 * 2**20
    del block


def test_trimming_never_fails_the_unload(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert memory.trim_heap() is False
    assert memory.give_back(100 * 2**20).startswith("resident memory 100 MB before")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory.trim_heap() is False
    monkeypatch.setattr(memory, "resident_bytes", lambda: None)
    assert memory.give_back(None) == "resident memory unknown"
