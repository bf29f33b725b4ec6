# syntax=docker/dockerfile:1
# Wyoming Chatterbox: text to speech for Home Assistant on an NVIDIA GPU.
#
#   docker build -t wyoming-chatterbox .
#   docker run -d --name chatterbox --gpus all -p 10200:10200 \
#       -v chatterbox-data:/data -v "$PWD/voices:/voices:ro" wyoming-chatterbox
#
# Building needs Docker 23 or newer (BuildKit); running needs the NVIDIA Container
# Toolkit and a driver >= 550.54.15. docker-compose.yml and docs/docker.md have the
# rest: GPUs and drivers, newer GPUs, Home Assistant discovery.
#
# Base: slim Python, not nvidia/cuda. PyPI's torch wheels bring the CUDA runtime,
# cuBLAS and cuDNN as pip packages (2.7 GB); a CUDA base image would add a second,
# unused copy. The driver (libcuda) always comes from the host, put into the
# container by the toolkit. Every dependency is a binary wheel (soundfile's bundles
# libsndfile 1.2, which reads mp3), so no compiler or apt package is needed.
FROM python:3.11.14-slim-bookworm

# The PyTorch pair. Defaults: what chatterbox-tts 0.1.7 pins and the tests run with
# (CUDA 12.4; GPUs from Maxwell to Hopper, sm_50 to sm_90). Blackwell (RTX 50xx,
# sm_120) needs a CUDA 12.8 build, e.g. PyPI's 2.8.0:
#   docker build --build-arg TORCH_VERSION=2.8.0 -t wyoming-chatterbox .
# or 2.7.1 from PyTorch's own index:
#   --build-arg TORCH_VERSION=2.7.1 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Any pair but the default overrides chatterbox-tts's pin: not what upstream tested.
ARG TORCH_VERSION=2.6.0
# Empty: the same version as torch (as for every release since 2.1).
ARG TORCHAUDIO_VERSION=
# Empty: PyPI. Otherwise the index that torch and torchaudio (only) come from.
ARG TORCH_INDEX=

SHELL ["/bin/bash", "-o", "errexit", "-o", "nounset", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# 1. Dependencies, in a layer of their own that depends on setup.cfg alone: changing
#    the code does not download 3 GB again. The torch pair comes first; then
#    chatterbox-tts without its dependencies (it pins torch==2.6.0 exactly); then
#    everything else that setup.cfg and chatterbox-tts ask for, with the installed
#    pair as a constraint, so that a dependency wanting another torch fails the build
#    instead of replacing it. With the default pair this installs what
#    `pip install .` does.
RUN --mount=type=bind,source=setup.cfg,target=/tmp/setup.cfg <<'EOF'
python -m venv "${VIRTUAL_ENV}"
mkdir /tmp/deps
printf 'torch==%s\ntorchaudio==%s\n' \
    "${TORCH_VERSION}" "${TORCHAUDIO_VERSION:-${TORCH_VERSION}}" > /tmp/deps/torch.txt
if [ -n "${TORCH_INDEX:-}" ]; then
    printf -- '--index-url %s\n' "${TORCH_INDEX}" >> /tmp/deps/torch.txt
fi
cat /tmp/deps/torch.txt
pip install --requirement /tmp/deps/torch.txt
python - <<'PY'
import configparser
import importlib.metadata
import re
import subprocess
import sys

PAIR = ("torch", "torchaudio")


def name(requirement):
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


config = configparser.ConfigParser()
config.read("/tmp/setup.cfg")
wanted = [
    line.strip()
    for line in config["options"]["install_requires"].splitlines()
    if line.strip()
]
if not any(name(line) == "chatterbox-tts" for line in wanted):
    sys.exit("setup.cfg: [options] install_requires names no chatterbox-tts")
requirements = []
for line in wanted:
    if name(line) in PAIR:
        continue
    if name(line) != "chatterbox-tts":
        requirements.append(line)
        continue
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", line]
    subprocess.run(pip, check=True)
    for dependency in importlib.metadata.requires("chatterbox-tts") or []:
        # Its extras are not wanted; environment markers are left to pip.
        if name(dependency) not in PAIR and "extra ==" not in dependency:
            requirements.append(dependency)
with open("/tmp/deps/requirements.txt", "w", encoding="utf-8") as out:
    out.write("\n".join(requirements) + "\n")
with open("/tmp/deps/constraints.txt", "w", encoding="utf-8") as out:
    for package in PAIR:
        out.write(f"{package}=={importlib.metadata.version(package)}\n")
PY
cat /tmp/deps/requirements.txt /tmp/deps/constraints.txt
pip install --requirement /tmp/deps/requirements.txt \
    --constraint /tmp/deps/constraints.txt
rm -r /tmp/deps
EOF

# 2. The server itself (small; redone when the code changes). Then checks that fail
#    the build rather than the first request: no conflicting requirements (except
#    the torch pins, when another pair was chosen above), the watermarker loads
#    (resemble-perth needs setuptools < 81) and the model code imports.
RUN --mount=type=bind,target=/tmp/src,rw <<'EOF'
pip install --no-deps /tmp/src
wyoming-chatterbox --version
python - <<'PY'
import re
import subprocess
import sys

import perth
import torch
import torchaudio

import chatterbox.tts_turbo  # noqa: F401
import wyoming_chatterbox.__main__  # noqa: F401

check = subprocess.run(
    [sys.executable, "-m", "pip", "check"], capture_output=True, text=True
)
torch_pin = re.compile(r" has requirement torch(audio)?[=<>!~ ;]")
broken = [
    line
    for line in check.stdout.splitlines()
    if line.strip() and "No broken" not in line and not torch_pin.search(line)
]
print(check.stdout, end="")
if broken:
    sys.exit("pip check: conflicting requirements:\n" + "\n".join(broken))
if perth.PerthImplicitWatermarker is None:
    sys.exit("resemble-perth cannot load its watermarker (setuptools >= 81?)")
arch = getattr(torch._C, "_cuda_getArchFlags", lambda: "none")()
print(
    f"torch {torch.__version__}, torchaudio {torchaudio.__version__}, "
    f"CUDA {torch.version.cuda}, GPU kernels for: {arch}"
)
PY
EOF

# Everything the server writes goes to /data: the model (/data/huggingface), the
# prepared voices, pkuseg's Chinese dictionary (multilingual model) and librosa's
# compiled functions (numba; saves ~9 s at the first voice of every start). HF_HOME
# puts the rest of Hugging Face's state there too: the xet download cache and a
# token saved with `hf auth login`.
# The NVIDIA_* variables tell the Container Toolkit what to mount (nvidia/cuda images
# set them; a plain image must): with `--gpus all` Docker names the devices itself,
# but the default capabilities differ between toolkit versions (some give only
# `utility`, i.e. no libcuda), and `runtime: nvidia` setups without --gpus need both.
ENV HF_HOME=/data/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NUMBA_CACHE_DIR=/data/numba \
    TQDM_DISABLE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A fixed, numeric, unprivileged user: chown a bind-mounted /data to 1000:1000, or
# run with `--user UID:GID` of anyone who can write it.
RUN useradd --no-log-init --create-home --uid 1000 --user-group chatterbox \
    && mkdir -p /data /voices \
    && chown 1000:1000 /data /voices
USER 1000:1000
VOLUME ["/data", "/voices"]
EXPOSE 10200

# Healthy once the model is loaded and answers a Describe. The first start downloads
# about 3 GB before it listens, hence the long start period. A different --uri port
# needs a matching health check (see docs/docker.md).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["python", "-m", "wyoming_chatterbox.health_check", "--uri", "tcp://127.0.0.1:10200"]

# `docker stop` sends SIGTERM, on which the server lets replies in progress end.
# Arguments after the image name (compose: `command:`) are appended to these; an
# option given again wins, e.g. `--device cpu`, `--voice alice`, `--zeroconf`.
# --device cuda: with no GPU visible, stop with a message that says so instead of
# running on the CPU, tens of times slower.
ENTRYPOINT ["wyoming-chatterbox", \
            "--uri", "tcp://0.0.0.0:10200", \
            "--data-dir", "/data", \
            "--voices-dir", "/voices", \
            "--device", "cuda"]
CMD []
