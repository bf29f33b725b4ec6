"""What a run ran on and at which commit, for every report (script/bench and
script/bench-t3). Reads the system; changes nothing.
"""

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

from . import REPO


def machine_info() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: Dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": None,
        "torch": None,
    }
    # Importing torch costs seconds: the fake mode leaves it out.
    if "torch" in sys.modules:
        with contextlib.suppress(Exception):
            import torch

            info["torch"] = torch.__version__
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_label(meta: Dict[str, Any]) -> str:
    """The GPU on CUDA runs, else the CPU and its cores."""
    machine = meta["machine"]
    if machine["gpu"] and str(meta["device"]).startswith("cuda"):
        return str(machine["gpu"])
    return f"{machine['cpu']} ({machine['cores']} cores)"


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}{' (uncommitted changes)' if dirty else ''}"


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"
