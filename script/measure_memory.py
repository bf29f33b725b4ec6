"""The memory each model, or pair of models, takes in a running server (CPU).

For each combination it starts the real server (`python -m wyoming_chatterbox`,
on 127.0.0.1, `--device cpu`, warm-up on), waits for "Ready", and reads the
process's resident memory (VmRSS) and its peak (VmHWM) from /proc. A script, not
a test: it measures and prints, and asserts nothing.

    .venv/bin/python script/measure_memory.py \\
        --model-dir turbo=.cache/full-checkpoint \\
        --model-dir nano=.cache/test-checkpoint-nano \\
        --model-dir multilingual=.cache/full-mtl

Use checkpoints of the released sizes (`script/test-checkpoint DIR --full`,
`--nano`, `--multilingual --full`): memory is set by the weights' shapes.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
COMBINATIONS = (
    ("turbo",),
    ("nano",),
    ("multilingual",),
    ("turbo", "multilingual"),
    ("nano", "multilingual"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_of(pid: int) -> Tuple[float, float]:
    """Resident and peak resident memory, in GB."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = {
        key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
        for key in ("VmRSS", "VmHWM")
    }
    return values["VmRSS"] / 1e6, values["VmHWM"] / 1e6


def measure(models: Tuple[str, ...], dirs: Dict[str, Path]) -> Dict[str, float]:
    args = [sys.executable, "-m", "wyoming_chatterbox", "--device", "cpu"]
    args += ["--uri", f"tcp://127.0.0.1:{free_port()}", "--model", ",".join(models)]
    for model in models:
        args += ["--model-dir", f"{model}={dirs[model]}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as data:
        args += ["--data-dir", data]
        started = time.monotonic()
        process = subprocess.Popen(
            args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
        )
        assert process.stderr is not None
        try:
            for line in process.stderr:
                if "Ready on" in line:
                    break
            else:
                raise RuntimeError(f"{models}: the server stopped before it was ready")
            ready_s = time.monotonic() - started
            rss, peak = memory_of(process.pid)
        finally:
            process.terminate()
            process.wait(60)
    return {"rss_gb": rss, "peak_gb": peak, "ready_s": ready_s}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", action="append", required=True, metavar="MODEL=DIR"
    )
    args = parser.parse_args(argv)
    dirs = {
        key: Path(folder)
        for key, _, folder in (item.partition("=") for item in args.model_dir)
    }
    print(f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores")
    print("| models | resident after load and warm-up | peak | ready after |")
    print("|---|---|---|---|")
    for models in COMBINATIONS:
        if not all(model in dirs for model in models):
            continue
        figures = measure(models, dirs)
        print(
            f"| {' + '.join(models)} | {figures['rss_gb']:.2f} GB "
            f"| {figures['peak_gb']:.2f} GB | {figures['ready_s']:.0f} s |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
