"""script/setup picks the torch pair whose kernels cover the GPU the driver reports.

Each case runs the real script with --dry-run and a fake `nvidia-smi` on a PATH
that has nothing else of the machine's (so a real GPU or driver cannot leak in);
the dry run prints the plan and must create and install nothing.
"""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "script" / "setup"
# What script/setup itself runs besides bash builtins and Python.
TOOLS = ("bash", "dirname", "realpath", "sed")


def _load_torch_pair() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "torch_pair_script", REPO / "script" / "torch_pair.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


torch_pair = _load_torch_pair()


def dry_run(
    tmp_path: Path, nvidia_smi: Optional[str], *args: str
) -> "subprocess.CompletedProcess[str]":
    """script/setup --dry-run with `nvidia_smi` as the fake driver's script body
    (None: no nvidia-smi at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\n" + nvidia_smi + "\n")
        fake.chmod(0o755)
    env = {"PATH": str(bin_dir), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    venv = tmp_path / "venv"
    done = subprocess.run(
        [str(SETUP), "--dry-run", "--venv", str(venv), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert not venv.exists(), "a dry run created the venv"
    return done


def plain_install(out: str) -> bool:
    return "pip install -e " in out and "torch_pair.py install" not in out


@pytest.mark.parametrize(
    "answer, torch",
    [
        ("echo 12.0", "2.8.0"),  # RTX 50xx (Blackwell)
        ("echo 10.0", "2.8.0"),  # B200
        ("echo 8.6", "2.6.0"),  # RTX 30xx
        ("echo 8.9", "2.6.0"),  # RTX 40xx: sm_86 code runs on 8.9
        ("echo 6.1", "2.6.0"),  # GTX 10xx: 2.8.0 has no Pascal code
        ("printf '8.6\\n12.0\\n'", "2.8.0"),  # one GPU needs the newer pair
    ],
)
def test_the_pair_follows_the_compute_capability(
    tmp_path: Path, answer: str, torch: str
) -> None:
    done = dry_run(tmp_path, answer, "--dev")
    assert done.returncode == 0, done.stderr
    assert f"Torch pair: torch {torch}, torchaudio {torch}" in done.stdout
    if torch == "2.6.0":
        assert plain_install(done.stdout)
        assert "[dev]" in done.stdout
    else:
        # chatterbox-tts pins torch 2.6.0: installed around the pair, not over it.
        assert f"torch_pair.py install --torch {torch} --torchaudio {torch}" in (
            done.stdout
        )
        assert "--extras dev" in done.stdout
        assert "--no-deps" in done.stdout
        assert "needs an NVIDIA driver >= 570" in done.stdout


def test_no_driver_means_the_pinned_pair_as_before(tmp_path: Path) -> None:
    done = dry_run(tmp_path, None)
    assert done.returncode == 0, done.stderr
    assert "Torch pair: torch 2.6.0, torchaudio 2.6.0" in done.stdout
    assert "no nvidia-smi" in done.stdout
    assert plain_install(done.stdout)
    assert "[dev]" not in done.stdout


def test_a_failing_driver_counts_as_no_gpu(tmp_path: Path) -> None:
    failing = (
        "echo 'NVIDIA-SMI has failed because it could not communicate with the "
        "NVIDIA driver.'; exit 9"
    )
    done = dry_run(tmp_path, failing)
    assert done.returncode == 0, done.stderr
    assert "Torch pair: torch 2.6.0" in done.stdout
    assert "exit 9" in done.stdout and "NVIDIA-SMI has failed" in done.stdout


def test_an_old_driver_without_compute_cap_counts_as_no_gpu(tmp_path: Path) -> None:
    old = "echo 'Field \"compute_cap\" is not a valid field to query.'"
    done = dry_run(tmp_path, old)
    assert done.returncode == 0, done.stderr
    assert "Torch pair: torch 2.6.0" in done.stdout
    assert "taken as no GPU" in done.stdout


def test_torch_by_hand_wins_and_warns_when_it_cannot_serve_the_gpu(
    tmp_path: Path,
) -> None:
    done = dry_run(tmp_path, "echo 12.0", "--torch", "2.6.0")
    assert done.returncode == 0, done.stderr
    assert "Torch pair: torch 2.6.0, torchaudio 2.6.0" in done.stdout
    assert plain_install(done.stdout)
    assert "warning: torch 2.6.0 has no kernels for compute capability 12.0" in (
        done.stdout
    )


def test_any_version_by_hand(tmp_path: Path) -> None:
    done = dry_run(tmp_path, None, "--torch", "2.7.1")
    assert done.returncode == 0, done.stderr
    assert "Torch pair: torch 2.7.1, torchaudio 2.7.1" in done.stdout
    assert "torch_pair.py install --torch 2.7.1 --torchaudio 2.7.1" in done.stdout


@pytest.mark.parametrize("args", [("--torch",), ("--cuda",), ("--venv",)])
def test_bad_arguments_are_refused(tmp_path: Path, args: tuple) -> None:
    done = subprocess.run(
        [str(SETUP), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "usage: script/setup" in done.stderr


def test_the_pinned_torch_is_a_build_the_rules_know() -> None:
    """Bumping torch in setup.cfg needs its kernels in torch_pair.BUILDS."""
    pinned = torch_pair.pinned_torch(REPO / "setup.cfg")
    assert torch_pair.build_for(pinned) is torch_pair.BUILDS[0]


def test_the_installed_torch_has_the_kernels_the_rules_claim() -> None:
    """Run on each pair that is shipped, this ties BUILDS to the wheels."""
    torch = pytest.importorskip("torch")
    build = torch_pair.build_for(torch.__version__.split("+")[0])
    if build is None or torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a build in torch_pair.BUILDS")
    assert torch._C._cuda_getArchFlags() == build.kernels
    assert torch.version.cuda == build.cuda


def test_a_gpu_runs_kernels_of_its_major_version_up_to_its_minor() -> None:
    old, new = torch_pair.BUILDS
    assert old.covers((8, 9)) and new.covers((8, 9))  # Ada runs sm_86 code
    assert old.covers((6, 1)) and not new.covers((6, 1))  # Pascal
    assert not old.covers((12, 0)) and new.covers((12, 0))  # Blackwell
    assert not old.covers((3, 7)) and not new.covers((3, 7))  # Kepler
