"""The CPU speed options, each behind its flag: `--t3-dtype` (int8 by default on
a CPU), `--s3gen-dtype` (bfloat16 where the CPU computes it natively) and
`--cpu-threads`; "auto" decided per device, refused where it cannot run. No
model is loaded here: the audio of each option against float32 is tested on
real weights in tests/test_nano.py (int8 T3, Nano's shapes) and
tests/test_fastpath.py (S3Gen's flow in bfloat16, the two through the backend).
"""

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator
from unittest import mock

import pytest
import torch

from wyoming_chatterbox.__main__ import build_parser, settings_from
from wyoming_chatterbox.chatterbox import loading
from wyoming_chatterbox.settings import FastPath, ModelSettings
from wyoming_chatterbox.speech import ModelLoadError


def parse_fast(*argv: str) -> FastPath:
    return settings_from(build_parser().parse_args(list(argv))).model.fast


def test_each_cpu_speed_option_has_its_flag() -> None:
    default = parse_fast()
    assert (default.t3_dtype, default.s3gen_dtype, default.cpu_threads) == (
        "auto",
        "auto",
        None,
    )
    off = parse_fast(
        "--t3-dtype", "float32", "--s3gen-dtype", "float32", "--cpu-threads", "1"
    )
    assert (off.t3_dtype, off.s3gen_dtype, off.cpu_threads) == ("float32", "float32", 1)
    assert parse_fast("--t3-dtype", "int8").t3_dtype == "int8"
    with pytest.raises(ValueError, match="--cpu-threads must be 1 to 256"):
        parse_fast("--cpu-threads", "0")


def test_auto_on_a_cpu_is_int8_t3_and_bfloat16_flow_where_native(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def resolved(fast: FastPath, device: str = "cpu") -> Any:
        done = loading.resolved_fast_path(fast, device)
        return done.t3_dtype, done.s3gen_dtype

    monkeypatch.setattr(loading, "native_bfloat16", lambda: True)
    assert resolved(FastPath()) == ("int8", "bfloat16")
    assert resolved(FastPath(t3_dtype="float32", s3gen_dtype="float32")) == (
        "float32",
        "float32",
    )
    monkeypatch.setattr(loading, "native_bfloat16", lambda: False)
    assert resolved(FastPath()) == ("int8", "float32")  # emulated bfloat16 is slower
    assert resolved(FastPath(s3gen_dtype="bfloat16")) == ("int8", "bfloat16")
    # On a GPU the self-check decides T3's precision (by compute capability).
    assert resolved(FastPath(), "cuda") == ("auto", "float32")


def test_a_cpu_without_int8_kernels_runs_t3_in_float32(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loading, "_int8_linear_supported", lambda: False)
    with caplog.at_level(logging.WARNING):
        fast = loading.resolved_fast_path(FastPath(s3gen_dtype="float32"), "cpu")
    assert fast.t3_dtype == "float32"
    assert "no int8 kernels" in caplog.text


def test_int8_t3_on_a_gpu_is_refused_with_a_sentence() -> None:
    with pytest.raises(ModelLoadError, match="CPU only"):
        loading.resolved_fast_path(FastPath(t3_dtype="int8"), "cuda")
    from wyoming_chatterbox.chatterbox.t3_step import T3Step

    gpt2 = SimpleNamespace(
        tfmr=SimpleNamespace(config=SimpleNamespace(activation_function="gelu_new")),
        is_gpt=True,
        hp=SimpleNamespace(input_pos_emb=None),
    )
    with pytest.raises(ValueError, match="int8 T3 runs on the CPU"):
        T3Step(gpt2, "cpu", torch.bfloat16, int8=True)


@pytest.fixture
def torch_threads() -> Iterator[int]:
    kept = torch.get_num_threads()
    yield kept
    torch.set_num_threads(kept)


def test_cpu_threads_are_set_when_the_model_loads(
    tmp_path: Path, torch_threads: int
) -> None:
    from wyoming_chatterbox.chatterbox import turbo

    for name in turbo.TurboBackend.model_files:
        (tmp_path / name).write_bytes(b"x")
    wanted = 2 if torch_threads == 1 else 1
    voice = SimpleNamespace(t3=SimpleNamespace(cond_prompt_speech_emb=torch.zeros(1)))
    fast = FastPath(
        static_cache=False,
        stream_in_group=False,
        async_watermark=False,
        s3gen_dtype="float32",
        cpu_threads=wanted,
    )
    backend = turbo.TurboBackend(
        ModelSettings(model_dir=tmp_path, data_dir=tmp_path, device="cpu", fast=fast)
    )
    with mock.patch.object(
        turbo, "load_turbo_model", return_value=SimpleNamespace(conds=voice)
    ):
        backend.load()
    try:
        assert torch.get_num_threads() == wanted
    finally:
        backend.close()
