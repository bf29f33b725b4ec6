# Wyoming Chatterbox: text to speech for Home Assistant on an NVIDIA GPU.
#   docker build -t wyoming-chatterbox .
#   docker run --gpus all -p 10200:10200 -v chatterbox-data:/data wyoming-chatterbox
# PyPI's torch 2.6.0 wheel brings its own CUDA 12.4 runtime, so a slim Python base
# is enough: the NVIDIA Container Toolkit supplies the driver at run time.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TQDM_DISABLE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /app
COPY pyproject.toml setup.cfg README.md ./
COPY wyoming_chatterbox ./wyoming_chatterbox
RUN pip install "setuptools<81" wheel \
    && pip install . \
    && python -c "import perth; assert perth.PerthImplicitWatermarker is not None"

RUN useradd --create-home --uid 1000 chatterbox \
    && mkdir -p /data \
    && chown chatterbox /data
USER chatterbox
VOLUME /data
EXPOSE 10200

# The first start downloads about 3 GB into /data; later starts load in seconds.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "-m", "wyoming_chatterbox.health_check", "--uri", "tcp://127.0.0.1:10200"]

# Extra arguments to `docker run ... wyoming-chatterbox` are appended here.
ENTRYPOINT ["python", "-m", "wyoming_chatterbox", "--uri", "tcp://0.0.0.0:10200", "--data-dir", "/data"]
