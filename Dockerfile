# Wyoming Chatterbox: text to speech for Home Assistant on an NVIDIA GPU.
#
#   docker build -t wyoming-chatterbox .
#   docker run -d --name chatterbox --gpus all -p 10200:10200 \
#       -v chatterbox-data:/data -v "$PWD/voices:/voices:ro" wyoming-chatterbox
#
# Builds with the classic builder and with BuildKit alike (Docker 20.10 or newer):
# no heredocs, no RUN --mount, no `# syntax=` line, so no frontend image is pulled.
# Running needs the NVIDIA Container Toolkit and a driver >= 570.124.06 (see the
# torch pair below). docker-compose.yml and docs/docker.md have the rest: GPUs and
# drivers, older GPUs, Home Assistant discovery, what was verified and how.
#
# Base: slim Python, not nvidia/cuda. PyPI's torch wheels bring the CUDA runtime,
# cuBLAS and cuDNN as pip packages (2.7 GB); a CUDA base image would add a second,
# unused copy. The driver (libcuda) always comes from the host, put into the
# container by the toolkit. Every dependency is a binary wheel (soundfile's bundles
# libsndfile 1.2, which reads mp3), so no compiler or apt package is needed.
# BASE_IMAGE exists for machines that cannot pull it: script/docker-check builds on
# a stand-in made from Debian's packages there (python3 from bookworm).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

# The PyTorch pair. Default: 2.8.0 (PyPI: CUDA 12.8; kernels sm_70 to sm_120). Both
# it and chatterbox-tts 0.1.7's pin, 2.6.0 (CUDA 12.4; sm_50 to sm_90), run Volta to
# Hopper (V100, RTX 20xx to 40xx, H100); beyond that 2.6.0 runs Maxwell and Pascal
# (2014-2016, frozen since CUDA 12.8) and 2.8.0 runs Blackwell (RTX 50xx, B200: what is
# sold now). 2.8.0 is installed around chatterbox-tts's torch pin; this project's
# tests pass on both (docs/docker.md, "GPUs and drivers", has the reasons and
# figures). For GTX 900, GTX 10xx, P40 or P100, or a driver older than 570, build:
#   docker build --build-arg TORCH_VERSION=2.6.0 -t wyoming-chatterbox .
ARG TORCH_VERSION=2.8.0
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

# 1. Dependencies, in a layer of their own that depends on setup.cfg and
#    script/torch_pair.py alone: changing the code does not download 3 GB again.
#    torch_pair.py (shared with script/setup) installs the torch pair first, then
#    chatterbox-tts without its dependencies (it pins torch==2.6.0 exactly), then
#    everything else that setup.cfg and chatterbox-tts ask for, with the installed
#    pair as a constraint, so that a dependency wanting another torch fails the
#    build instead of replacing it. The venv's python by path: bash remembers where
#    it found `python` before the venv existed.
COPY setup.cfg script/torch_pair.py /tmp/deps/
RUN python -m venv "${VIRTUAL_ENV}" \
    && "${VIRTUAL_ENV}/bin/python" /tmp/deps/torch_pair.py install \
        --setup-cfg /tmp/deps/setup.cfg --torch "${TORCH_VERSION}" \
        --torchaudio "${TORCHAUDIO_VERSION}" --index-url "${TORCH_INDEX}" \
    && rm -r /tmp/deps

# 2. The server itself (small; redone when the code changes). Then checks that fail
#    the build rather than the first request (script/check_install.py): no
#    conflicting requirements (except the torch pins, when a pair other than
#    chatterbox-tts's is installed), the watermarker loads (resemble-perth needs
#    setuptools < 81), the model code imports; it prints the GPU kernels.
COPY pyproject.toml setup.cfg README.md /tmp/src/
COPY wyoming_chatterbox /tmp/src/wyoming_chatterbox
COPY script/check_install.py /tmp/src/script/
RUN pip install --no-deps /tmp/src \
    && wyoming-chatterbox --version \
    && python /tmp/src/script/check_install.py \
    && rm -r /tmp/src

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
