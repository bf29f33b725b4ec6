"""Which PyTorch pair (torch + torchaudio) a machine needs, and installing the
project's dependencies around a pair other than the one chatterbox-tts pins.

    python script/torch_pair.py choose [--torch VERSION]
    python script/torch_pair.py install --torch VERSION [--torchaudio VERSION]
        [--index-url URL] [--extras dev] [--setup-cfg PATH]

`choose` asks the NVIDIA driver (`nvidia-smi`) for each GPU's compute capability
and prints `torch=`, `torchaudio=`, `pinned=` and `note=` (why) lines: the
pinned pair (setup.cfg) when its kernels cover every GPU or there is none, else
the first pair in BUILDS that covers them. `install` runs in the target venv:
the pair first, then chatterbox-tts without its dependencies (it pins torch
exactly), then everything else setup.cfg and chatterbox-tts ask for, with the
installed pair held as a constraint so that nothing can replace it. The project
itself is left to the caller (script/setup: editable; Dockerfile: its own layer).

Used by script/setup and by the Dockerfile's dependency layer; standard library
only, because `choose` runs before any venv exists.
"""

import argparse
import configparser
import dataclasses
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
PAIR = ("torch", "torchaudio")
CHATTERBOX = "chatterbox-tts"
Capability = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Build:
    """What one torch release on PyPI (Linux x86_64) was built with."""

    torch: str
    cuda: str
    # torch._C._cuda_getArchFlags() of the installed wheel, copied verbatim.
    kernels: str
    # NVIDIA's minimum Linux driver for full support of that CUDA release
    # (CUDA toolkit release notes, table 3).
    driver: str

    def covers(self, capability: Capability) -> bool:
        """A GPU runs code built for its own major version and an equal or
        lower minor version (no PTX in these wheels, so nothing newer)."""
        major, minor = capability
        return any(
            k_major == major and k_minor <= minor
            for k_major, k_minor in parse_kernels(self.kernels)
        )


# Ordered: `choose` takes the first that covers every GPU the driver reports.
BUILDS = (
    # chatterbox-tts 0.1.7's pin. Maxwell to Hopper; nothing for Blackwell.
    Build("2.6.0", "12.4", "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90", "550.54.15"),
    # The first PyPI torch built with CUDA 12.8 (Blackwell: sm_100, sm_120); it
    # has no Maxwell or Pascal code. torchaudio 2.8.0 is its pair.
    Build(
        "2.8.0",
        "12.8",
        "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120",
        "570.124.06",
    ),
)


def parse_kernels(kernels: str) -> List[Capability]:
    """'sm_50 sm_86 sm_120' -> [(5, 0), (8, 6), (12, 0)]."""
    found = []
    for digits in re.findall(r"sm_(\d+)", kernels):
        found.append((int(digits[:-1]), int(digits[-1])))
    return found


def parse_capability(text: str) -> Optional[Capability]:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def read_requirements(setup_cfg: Path, extras: Sequence[str] = ()) -> List[str]:
    """install_requires, then the requirements of each named extra."""
    config = configparser.ConfigParser()
    if not config.read(setup_cfg):
        raise SystemExit(f"{setup_cfg}: cannot read")
    blocks = [config["options"]["install_requires"]]
    blocks += [config["options.extras_require"][extra] for extra in extras]
    return [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def pinned_torch(setup_cfg: Path) -> str:
    """The torch version setup.cfg pins (the pair chatterbox-tts is built for)."""
    for line in read_requirements(setup_cfg):
        match = re.fullmatch(r"torch\s*==\s*([\w.+]+)", line)
        if match:
            return match.group(1)
    raise SystemExit(f"{setup_cfg}: install_requires has no torch==VERSION")


def build_for(version: str) -> Optional[Build]:
    return next((b for b in BUILDS if b.torch == version), None)


def gpu_capabilities() -> Tuple[List[Capability], str]:
    """Compute capability of each GPU the driver reports, and a note on how
    that was found. No nvidia-smi, or one that fails: no GPU."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return [], "no nvidia-smi on PATH: no NVIDIA GPU"
    command = [nvidia_smi, "--query-gpu=compute_cap", "--format=csv,noheader"]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return [], f"nvidia-smi did not answer ({err}): taken as no GPU"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    capabilities = [parse_capability(line) for line in lines]
    if done.returncode != 0 or not lines or None in capabilities:
        said = (done.stdout + done.stderr).strip().splitlines()[:1]
        return [], (
            f"nvidia-smi --query-gpu=compute_cap failed (exit {done.returncode}"
            f"{': ' + said[0] if said else ''}): taken as no GPU"
        )
    found = [c for c in capabilities if c is not None]
    shown = ", ".join(f"{major}.{minor}" for major, minor in found)
    return found, f"nvidia-smi: compute capability {shown}"


def choose(
    capabilities: Sequence[Capability], pinned: str, asked: Optional[str] = None
) -> Tuple[str, List[str]]:
    """The torch version to install, and why (lines for the user)."""

    def uncovered(build: Optional[Build]) -> List[str]:
        if build is None:
            return []
        return [f"{a}.{b}" for a, b in capabilities if not build.covers((a, b))]

    if asked:
        missing = uncovered(build_for(asked))
        why = [f"torch {asked}: asked for with --torch"]
        if missing:
            why.append(
                f"warning: torch {asked} has no kernels for compute capability "
                f"{', '.join(missing)}: the GPU will fail at its first operation"
            )
        return asked, why
    if not capabilities:
        return pinned, [f"torch {pinned}: chatterbox-tts's pin (no GPU to serve)"]
    if not uncovered(build_for(pinned)):
        return pinned, [f"torch {pinned}: chatterbox-tts's pin; it covers this GPU"]
    for build in BUILDS:
        if not uncovered(build):
            return build.torch, [
                f"torch {build.torch} (CUDA {build.cuda}): torch {pinned} has no "
                f"kernels for compute capability {', '.join(uncovered(build_for(pinned)))}",
                f"  needs an NVIDIA driver >= {build.driver}",
            ]
    # GPUs no single build covers (say Pascal beside Blackwell): the newest.
    newest = BUILDS[-1]
    return newest.torch, [
        f"torch {newest.torch}: no single pair covers every GPU here",
        f"warning: no kernels for compute capability {', '.join(uncovered(newest))}"
        "; use --device cuda:N on a GPU it covers",
    ]


def pip_install(*args: str, quiet: bool = False) -> None:
    print("+ pip install " + " ".join(args), flush=True)
    command = [sys.executable, "-m", "pip", "install", *(["--quiet"] if quiet else [])]
    subprocess.run([*command, *args], check=True)


def install(
    torch: str,
    torchaudio: str,
    setup_cfg: Path,
    extras: Sequence[str] = (),
    index_url: Optional[str] = None,
    quiet: bool = False,
) -> None:
    """The pair, chatterbox-tts without its dependencies, then the rest with the
    pair as a constraint. See the module docstring."""
    wanted = read_requirements(setup_cfg, extras)
    chatterbox = [line for line in wanted if requirement_name(line) == CHATTERBOX]
    if len(chatterbox) != 1:
        raise SystemExit(f"{setup_cfg}: install_requires names no {CHATTERBOX}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # triton (a torch dependency) wants setuptools; hold setup.cfg's bound
        # (resemble-perth needs < 81) from the first step on.
        bounds = [line for line in wanted if requirement_name(line) == "setuptools"]
        (work / "bounds.txt").write_text("".join(f"{b}\n" for b in bounds))
        index = ["--index-url", index_url] if index_url else []
        pip_install(
            f"torch=={torch}",
            f"torchaudio=={torchaudio}",
            "--constraint",
            str(work / "bounds.txt"),
            *index,
            quiet=quiet,
        )
        pip_install("--no-deps", chatterbox[0], quiet=quiet)
        rest = [
            line for line in wanted if requirement_name(line) not in (*PAIR, CHATTERBOX)
        ]
        for dependency in importlib.metadata.requires(CHATTERBOX) or []:
            # Its extras are not wanted; environment markers are left to pip.
            if (
                requirement_name(dependency) not in PAIR
                and "extra ==" not in dependency
            ):
                rest.append(dependency)
        (work / "requirements.txt").write_text("".join(f"{r}\n" for r in rest))
        # Exactly what was installed (a local version such as +cu128 included).
        held = [f"{p}=={importlib.metadata.version(p)}" for p in PAIR]
        (work / "constraints.txt").write_text("".join(f"{h}\n" for h in held))
        print("Held: " + ", ".join(held), flush=True)
        pip_install(
            "--requirement",
            str(work / "requirements.txt"),
            "--constraint",
            str(work / "constraints.txt"),
            quiet=quiet,
        )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chooser = commands.add_parser("choose", help="print the pair this machine needs")
    chooser.add_argument("--torch", help="this version instead (torchaudio: same)")
    chooser.add_argument("--setup-cfg", type=Path, default=REPO / "setup.cfg")
    installer = commands.add_parser("install", help="install around a pair")
    installer.add_argument("--torch", required=True)
    installer.add_argument("--torchaudio", help="default: the torch version")
    installer.add_argument("--index-url", help="index for torch and torchaudio only")
    installer.add_argument("--extras", action="append", default=[])
    installer.add_argument("--setup-cfg", type=Path, default=REPO / "setup.cfg")
    installer.add_argument("--quiet", action="store_true", help="pip --quiet")
    args = parser.parse_args(argv)

    if args.command == "choose":
        capabilities, found = gpu_capabilities()
        pinned = pinned_torch(args.setup_cfg)
        version, why = choose(capabilities, pinned, args.torch)
        for line in [found, *why]:
            print(f"note={line}")
        print(f"torch={version}\ntorchaudio={version}\npinned={pinned}")
    else:
        install(
            args.torch,
            args.torchaudio or args.torch,
            args.setup_cfg,
            args.extras,
            args.index_url or None,
            args.quiet,
        )


if __name__ == "__main__":
    main()
