"""The HTTP side's flags: each mistake is one sentence and exit code 1, found
before the (slow) model load."""

import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    model_dir = tmp_path / "model"  # empty: a load would fail, differently
    model_dir.mkdir(exist_ok=True)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "wyoming_chatterbox",
            "--uri",
            "tcp://127.0.0.1:0",
            "--model-dir",
            str(model_dir),
            "--device",
            "cpu",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"},
    )


def one_error(result: subprocess.CompletedProcess) -> str:  # type: ignore[type-arg]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors: List[str] = [
        line for line in result.stderr.splitlines() if " ERROR " in line
    ]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--http-port", "8080", "--http-allow", "my-lan"],
            ["--http-allow my-lan", "192.168.1.0/24"],
        ),
        (["--http-port", "8080", "--http-cors", "evil"], ["--http-cors evil"]),
        (
            ["--http-port", "8080", "--http-cert", "c.pem"],
            ["--http-cert and --http-key"],
        ),
        (
            ["--http-port", "8080", "--http-token-file", "/nonexistent/token"],
            ["--http-token-file"],
        ),
        (
            [
                "--http-port",
                "0",
                "--http-cert",
                "/nonexistent/c.pem",
                "--http-key",
                "/nonexistent/k.pem",
            ],
            ["--http-cert", "cannot load"],
        ),
    ],
)
def test_bad_http_flags(tmp_path: Path, args: List[str], words: List[str]) -> None:
    if args[1] == "0":  # the CLI refuses port 0; any free port will do
        args = ["--http-port", str(_free_port()), *args[2:]]
    error = one_error(run(tmp_path, *args))
    for word in words:
        assert word in error, error


def test_a_taken_http_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = one_error(run(tmp_path, "--http-port", str(port)))
    assert f"--http-port {port}" in error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
