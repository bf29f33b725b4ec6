"""Build the Docker image and prove that it serves: script/docker-check.

What it does, in order, failing at the first thing that is wrong:

1. the base image: the Dockerfile's own (pulled) or, where none can be pulled, a
   stand-in made from Debian's packages (debootstrap bookworm with python3, then
   `docker import`), kept for the next run;
2. `docker build` with the builder this Docker has (`--build-arg BASE_IMAGE` for
   the stand-in); layers stay cached, so a rerun without changes takes seconds;
3. a random-weight test checkpoint (script/test-checkpoint, ~1.1 GB, kept) and a
   voice clip, mounted read-only; a fresh named volume at /data;
4. the container with `--device cpu --model-dir /model`, until the image's
   HEALTHCHECK says healthy (run every few seconds here instead of 30 s);
5. Describe, then Synthesize over Wyoming with the built-in voice and with the
   clip's: audio-start, chunks, audio-stop, 24 kHz 16-bit mono, not empty;
6. everything in /data is owned by the container's user, which is not root;
7. `docker stop` within the grace period, exit code 0.

The container and the volume are removed whatever happens; images are kept.
Exit status: 0 passed, 1 failed, 77 cannot be checked here (no Docker daemon,
or no base image and no way to make one).
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "docker-check"
# The image it builds; another torch pair gets a tag of its own, so that checking
# one does not throw away the other's cache.
IMAGE = "wyoming-chatterbox:check"
STANDIN = "wyoming-chatterbox-standin:bookworm"
# What the stand-in needs of python:3.11-slim-bookworm: a python3 with venv, a
# `python` command, CA certificates, useradd.
STANDIN_PACKAGES = (
    "python3,python3-venv,python-is-python3,ca-certificates,passwd,netbase"
)
STANDIN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CANNOT = 77
SAMPLE_RATE, SAMPLE_WIDTH, CHANNELS = 24000, 2, 1
CLIP_VOICE = "docker_check"
CONTAINER_USER = "1000"


class CannotCheck(Exception):
    """Something this machine lacks, not something wrong with the image."""


class CheckFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"docker-check: {message}", flush=True)


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def image_exists(name: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", name], capture_output=True
        ).returncode
        == 0
    )


def image_id(name: str) -> str:
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", name],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def dockerfile_base() -> str:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    match = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.MULTILINE)
    if not match:
        raise CheckFailed("Dockerfile: no ARG BASE_IMAGE=... default")
    return match.group(1)


# --- 1. the base image ----------------------------------------------------------


def base_image(asked: Optional[str]) -> str:
    if asked:
        return asked
    real = dockerfile_base()
    if image_exists(real):
        return real
    pulled = subprocess.run(
        ["docker", "pull", "--quiet", real], capture_output=True, text=True
    )
    if pulled.returncode == 0:
        return real
    reason = (pulled.stderr.strip().splitlines() or ["?"])[-1]
    log(f"cannot pull {real} ({reason}); using a stand-in from Debian's packages")
    if not image_exists(STANDIN):
        make_standin()
    return STANDIN


def make_standin() -> None:
    """python:3.11-slim-bookworm's part that the Dockerfile relies on, from
    Debian's packages. The machine's CA bundle goes in, so that pip in the build
    trusts what this machine trusts (a proxy's certificate, say)."""
    if shutil.which("debootstrap") is None:
        raise CannotCheck(
            "no base image and no debootstrap to make one (apt-get install debootstrap)"
        )
    if os.geteuid() != 0:
        raise CannotCheck("making the stand-in base needs root (debootstrap)")
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "rootfs"
        mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
        run_logged(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={STANDIN_PACKAGES}",
                "bookworm",
                str(root),
                mirror,
            ],
            CACHE / "debootstrap.log",
        )
        if HOST_CA.is_file():
            shutil.copyfile(HOST_CA, root / str(HOST_CA).lstrip("/"))
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        env = {
            **STANDIN_ENV,
            "PIP_CERT": str(HOST_CA),
            "REQUESTS_CA_BUNDLE": str(HOST_CA),
            "SSL_CERT_FILE": str(HOST_CA),
        }
        changes: List[str] = []
        for key, value in env.items():
            changes += ["--change", f"ENV {key}={value}"]
        changes += ["--change", 'CMD ["python3"]']
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--numeric-owner", "-c", "."],
            stdout=subprocess.PIPE,
        )
        imported = subprocess.run(
            ["docker", "import", *changes, "-", STANDIN],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
        )
        tar.wait()
        if tar.returncode != 0 or imported.returncode != 0:
            raise CheckFailed(f"docker import: {imported.stderr.strip()}")
    log(f"stand-in base {STANDIN} made in {time.monotonic() - started:.0f} s")


def run_logged(command: List[str], log_path: Path, timeout: float = 3600) -> None:
    """Run with the output in a file; on failure show its end."""
    with open(log_path, "w", encoding="utf-8") as out:
        done = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    if done.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")
        print("\n".join(tail.splitlines()[-60:]), file=sys.stderr)
        raise CheckFailed(f"{command[0]} failed (exit {done.returncode}); {log_path}")


# --- 2. the build ---------------------------------------------------------------


def build(image: str, base: str, build_args: Dict[str, str]) -> float:
    args = ["docker", "build", "--network", "host", "--tag", image]
    if base != dockerfile_base():
        args += ["--build-arg", f"BASE_IMAGE={base}"]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    log_path = CACHE / "build.log"
    log(f"{' '.join(args[1:])} . (log: {log_path})")
    previous = image_id(image)
    run_logged([*args, str(REPO)], log_path)
    seconds = time.monotonic() - started
    if previous and previous != image_id(image):
        # The last build's image, now untagged: its layers that this build did
        # not reuse (all 6 GB of dependencies after a setup.cfg change) go.
        subprocess.run(["docker", "image", "rm", previous], capture_output=True)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if "GPU kernels for:" in line:
            log(f"image: {line.strip()}")
    cached = text.count("Using cache")
    log(f"built {image} in {seconds:.0f} s ({cached} steps from the cache)")
    return seconds


# --- 3. the inputs ----------------------------------------------------------------


def checkpoint(directory: Path) -> Path:
    if not (directory / "t3_turbo_v1.safetensors").is_file():
        started = time.monotonic()
        log(f"writing the test checkpoint to {directory}")
        subprocess.run(
            [str(REPO / "script" / "test-checkpoint"), str(directory)], check=True
        )
        log(f"test checkpoint written in {time.monotonic() - started:.0f} s")
    readable_by_all(directory)
    return directory


def voices(directory: Path) -> Path:
    clip = directory / f"{CLIP_VOICE}.wav"
    if not clip.is_file():
        import soundfile
        from make_test_checkpoint import SAMPLE_RATE as CLIP_RATE
        from make_test_checkpoint import synthetic_voice

        directory.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(clip), synthetic_voice(seconds=8.0, seed=3), CLIP_RATE)
    readable_by_all(directory)
    return directory


def readable_by_all(directory: Path) -> None:
    """The container's user (1000) reads the mounts; this machine's may not be."""
    for path in [directory, *directory.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | (0o555 if path.is_dir() else 0o444))


# --- 4.-7. the container ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def container(image: str, model: Path, clips: Path) -> Iterator[Dict[str, str]]:
    tag = f"wyoming-chatterbox-check-{os.getpid()}"
    port = free_port()
    docker("volume", "create", tag)
    try:
        docker(
            "run",
            "--detach",
            "--name",
            tag,
            # The image's health check command, asked every 3 s instead of 30 s.
            "--health-interval",
            "3s",
            "--publish",
            f"127.0.0.1:{port}:10200",
            "--volume",
            f"{model}:/model:ro",
            "--volume",
            f"{clips}:/voices:ro",
            "--volume",
            f"{tag}:/data",
            image,
            "--device",
            "cpu",
            "--model-dir",
            "/model",
        )
        yield {"name": tag, "port": str(port)}
    except BaseException:
        logs = subprocess.run(
            ["docker", "logs", "--tail", "60", tag], capture_output=True, text=True
        )
        print(logs.stdout + logs.stderr, file=sys.stderr)
        raise
    finally:
        subprocess.run(["docker", "rm", "--force", tag], capture_output=True)
        subprocess.run(["docker", "volume", "rm", tag], capture_output=True)


def state(name: str) -> dict:
    return json.loads(docker("inspect", "--format", "{{json .State}}", name))


def wait_healthy(name: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        now = state(name)
        health = (now.get("Health") or {}).get("Status")
        if not now.get("Running"):
            raise CheckFailed(f"the container stopped (exit {now.get('ExitCode')})")
        if health == "healthy":
            return time.monotonic() - started
        if health == "unhealthy":
            raise CheckFailed("the health check reports unhealthy")
        time.sleep(1)
    raise CheckFailed(f"not healthy after {timeout:.0f} s")


async def speak(port: int, text: str, voice: Optional[str]) -> Dict[str, float]:
    """One Synthesize; the reply's audio is checked and measured."""
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.error import Error
    from wyoming.tts import Synthesize, SynthesizeVoice

    started = time.monotonic()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        chosen = SynthesizeVoice(name=voice) if voice else None
        await client.write_event(Synthesize(text=text, voice=chosen).event())
        kinds: List[str] = []
        audio = bytearray()
        first: Optional[float] = None
        while True:
            event = await asyncio.wait_for(client.read_event(), 120)
            if event is None:
                raise CheckFailed(f"closed after {kinds}")
            kinds.append(event.type)
            if Error.is_type(event.type):
                raise CheckFailed(f"server error: {Error.from_event(event).text}")
            if AudioStart.is_type(event.type) or AudioChunk.is_type(event.type):
                form = (
                    AudioStart.from_event(event)
                    if AudioStart.is_type(event.type)
                    else AudioChunk.from_event(event)
                )
                got = (form.rate, form.width, form.channels)
                if got != (SAMPLE_RATE, SAMPLE_WIDTH, CHANNELS):
                    raise CheckFailed(f"{event.type}: rate/width/channels {got}")
            if AudioChunk.is_type(event.type):
                first = first or time.monotonic()
                audio += AudioChunk.from_event(event).audio
            if AudioStop.is_type(event.type):
                break
    chunks = kinds.count("audio-chunk")
    if kinds[0] != "audio-start" or chunks == 0 or kinds[-1] != "audio-stop":
        raise CheckFailed(f"events {kinds[0]}, {chunks} chunks, {kinds[-1]}")
    if not audio or len(audio) % SAMPLE_WIDTH or not any(audio):
        raise CheckFailed(f"audio: {len(audio)} bytes, silent or odd")
    assert first is not None
    return {
        "chunks": chunks,
        "audio_s": len(audio) / (SAMPLE_RATE * SAMPLE_WIDTH * CHANNELS),
        "first_audio_s": first - started,
        "total_s": time.monotonic() - started,
    }


async def voice_names(port: int) -> List[str]:
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 30)
            if event is None:
                raise CheckFailed("no answer to Describe")
            if Info.is_type(event.type):
                info = Info.from_event(event)
                return [v.name for p in info.tts for v in p.voices]


def check_data_owner(name: str) -> int:
    user = docker("exec", name, "id", "-u")
    if user != CONTAINER_USER:
        raise CheckFailed(f"the container runs as uid {user!r}, not {CONTAINER_USER}")
    files = docker("exec", name, "find", "/data", "-mindepth", "1", "-type", "f")
    if "/data/voices/" not in files:
        raise CheckFailed(f"no prepared voice under /data/voices; /data has:\n{files}")
    strangers = docker(
        "exec", name, "find", "/data", "(", "!", "-user", user, "-o",
        "!", "-group", user, ")", "-printf", "%u:%g %p\\n",
    )  # fmt: skip
    if strangers:
        raise CheckFailed(f"in /data, not owned by {user}:{user}:\n{strangers}")
    return len(files.splitlines())


def stop(name: str, grace: int) -> float:
    started = time.monotonic()
    docker("stop", "--time", str(grace), name, timeout=grace + 60)
    seconds = time.monotonic() - started
    now = state(name)
    if now.get("ExitCode") != 0 or now.get("OOMKilled"):
        raise CheckFailed(
            f"exit code {now.get('ExitCode')} after docker stop (0 wanted; 137 is "
            f"SIGKILL at the end of the {grace} s grace period)"
        )
    return seconds


# --- the whole check -------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    total = time.monotonic()
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise CannotCheck("no Docker daemon answers (docker info failed)")
    CACHE.mkdir(parents=True, exist_ok=True)
    base = base_image(args.base)
    build_args = {"TORCH_VERSION": args.torch} if args.torch else {}
    image = f"{IMAGE}-torch{args.torch}" if args.torch else IMAGE
    build(image, base, build_args)
    healthcheck = docker(
        "image", "inspect", "--format", "{{json .Config.Healthcheck}}", image
    )
    if "wyoming_chatterbox.health_check" not in healthcheck:
        raise CheckFailed(f"the image's HEALTHCHECK is {healthcheck}")
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image))
    log(f"image size {size / 1e9:.2f} GB")
    model = checkpoint(args.checkpoint)
    clips = voices(CACHE / "voices")

    with container(image, model, clips) as running:
        name, port = running["name"], int(running["port"])
        log(f"container {name} on 127.0.0.1:{port}")
        log(f"healthy after {wait_healthy(name, args.timeout):.1f} s")
        names = asyncio.run(voice_names(port))
        if "default" not in names or CLIP_VOICE not in names:
            raise CheckFailed(f"voices offered: {names}")
        for voice in ("default", CLIP_VOICE):
            got = asyncio.run(speak(port, "Turning on the kitchen lights now.", voice))
            log(
                f"voice {voice}: {got['chunks']} chunks, {got['audio_s']:.2f} s of "
                f"24 kHz 16-bit mono audio, first audio {got['first_audio_s']:.2f} s,"
                f" total {got['total_s']:.2f} s"
            )
        files = check_data_owner(name)
        log(f"/data: {files} files, all owned by uid {CONTAINER_USER} (not root)")
        log(f"stopped with exit code 0 in {stop(name, args.grace):.1f} s")
    log(f"passed in {time.monotonic() - total:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", help="build with this TORCH_VERSION")
    parser.add_argument("--base", help="base image (default: pull, else a stand-in)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=CACHE / "checkpoint",
        help="test checkpoint folder (written if missing)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="to healthy, s")
    parser.add_argument("--grace", type=int, default=10, help="docker stop --time")
    args = parser.parse_args()
    try:
        run(args)
    except CannotCheck as err:
        log(f"cannot check here: {err}")
        sys.exit(CANNOT)
    except (CheckFailed, subprocess.SubprocessError) as err:
        log(f"FAILED: {err}")
        sys.exit(1)


if __name__ == "__main__":
    main()
