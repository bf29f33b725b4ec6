"""CUDA set-up on the CPU: PyTorch's flags as decided, T3's precision per GPU,
and a GPU this PyTorch has no code for stopped at start-up."""

from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Tuple
from unittest import mock

import pytest
import torch

from wyoming_chatterbox.chatterbox.base import gpu_has_kernels, resolve_device
from wyoming_chatterbox.settings import FastPath, ModelSettings
from wyoming_chatterbox.speech import ModelLoadError


@pytest.fixture
def torch_flags() -> Iterator[None]:
    """PyTorch's global switches, put back after the test."""
    kept = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    ) = kept


def test_loading_on_cuda_leaves_cudnn_and_tf32_as_upstream_runs(
    tmp_path: Path, torch_flags: None
) -> None:
    """Through backend.load() with the device resolved to CUDA: cuDNN's
    benchmark mode ends off (it re-tunes every convolution for each new S3Gen
    length), float32 matmuls without TF32, convolutions as PyTorch has them
    (TF32 allowed): upstream's numbers, whatever the flags were before."""
    from wyoming_chatterbox.chatterbox import base, turbo

    for name in turbo.MODEL_FILES:
        (tmp_path / name).write_bytes(b"x")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False
    voice = SimpleNamespace(t3=SimpleNamespace(cond_prompt_speech_emb=torch.zeros(1)))
    backend = turbo.TurboBackend(
        ModelSettings(
            model_dir=tmp_path,
            data_dir=tmp_path,
            device="cuda",
            fast=FastPath(
                static_cache=False, stream_in_group=False, async_watermark=False
            ),
        )
    )
    with mock.patch.object(
        base, "resolve_device", return_value="cuda"
    ), mock.patch.object(
        turbo, "load_turbo_model", return_value=SimpleNamespace(conds=voice)
    ), mock.patch(
        "torch.cuda.get_device_capability", return_value=(8, 9)
    ):
        backend.load()
    assert backend.device == "cuda"
    assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True


@pytest.mark.parametrize(
    "capability, dtype",
    [
        ((12, 0), "bfloat16"),
        ((8, 0), "bfloat16"),
        ((7, 5), "float16"),
        ((7, 0), "float16"),
        ((6, 1), "float32"),
    ],
)
def test_t3_runs_in_bfloat16_only_where_the_gpu_has_it_fast(
    capability: Tuple[int, int], dtype: str
) -> None:
    fast = FastPath()
    assert fast.resolved_dtype("cuda:1", capability) == dtype
    assert fast.resolved_dtype("cpu") == "float32"
    assert FastPath(t3_dtype="float32").resolved_dtype("cuda", (9, 0)) == "float32"
    assert f"T3 in {dtype}" in fast.describe("cuda", capability)


TORCH_26 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
TORCH_28 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


@pytest.mark.parametrize(
    "arch_list, capability, runs",
    [
        (TORCH_26, (8, 9), True),  # Ada runs sm_86 code
        (TORCH_26, (12, 0), False),  # RTX 50xx on torch 2.6
        (TORCH_28, (12, 0), True),
        (TORCH_28, (6, 1), False),  # GTX 10xx on the CUDA 12.8 build
        (TORCH_26, (6, 1), True),
        (["sm_80", "compute_90"], (12, 0), True),  # PTX is compiled on the spot
        (["sm_80", "compute_90"], (8, 6), True),
        (["sm_90"], (8, 9), False),
        (["sm_90a"], (9, 0), False),  # code for the H100 alone: not counted
    ],
)
def test_a_gpu_runs_its_major_version_up_to_its_minor(
    arch_list: list, capability: tuple, runs: bool
) -> None:
    assert gpu_has_kernels(arch_list, capability) is runs


def test_a_gpu_without_kernels_stops_the_start_with_what_to_do() -> None:
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch(
        "torch.cuda.device_count", return_value=2
    ), mock.patch("torch.cuda.current_device", return_value=0), mock.patch(
        "torch.cuda.get_device_capability", return_value=(12, 0)
    ) as capability, mock.patch(
        "torch.cuda.get_arch_list", return_value=TORCH_26
    ), mock.patch(
        "torch.cuda.get_device_name", return_value="NVIDIA GeForce RTX 5090"
    ):
        for device in ("auto", "cuda", "cuda:1"):
            with pytest.raises(
                ModelLoadError, match="RTX 5090.*12.0.*TORCH_VERSION=2.8.0"
            ):
                resolve_device(device)
        assert capability.call_args_list[-1].args == (1,)
        capability.return_value = (8, 9)
        assert resolve_device("auto") == "cuda"
