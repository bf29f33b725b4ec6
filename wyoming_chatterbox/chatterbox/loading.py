"""What every model loader shares: the device, the model folder's files, T3's
size from its weights, and building modules for weights about to be loaded.

Worker thread (or a script); torch and chatterbox are imported inside the
functions, so importing this module is cheap.
"""

import contextlib
import dataclasses
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from ..settings import FastPath
from ..speech import ModelLoadError

_LOGGER = logging.getLogger(__name__)

# Loaders build T3 from chatterbox's shared config table; a load swaps an entry.
_CONFIG_LOCK = threading.Lock()


def resolve_device(requested: str) -> str:
    """auto -> cuda if available, else cpu; check that a named device exists."""
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        requested = "cuda"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {requested} was asked for, but PyTorch sees no CUDA GPU "
                "here; use --device cpu, or check the NVIDIA driver (and --gpus all "
                "in Docker)."
            )
        if requested.startswith("cuda:"):
            index_text = requested.split(":", 1)[1]
            count = torch.cuda.device_count()
            if not index_text.isdigit() or int(index_text) >= count:
                raise ModelLoadError(
                    f"--device {requested} does not exist: this machine has {count} "
                    f"CUDA device(s), cuda:0 to cuda:{count - 1}."
                )
        check_gpu_kernels(requested)
        return requested
    raise ModelLoadError(
        f"--device {requested} is not known; use auto, cpu, cuda or cuda:N."
    )


def gpu_has_kernels(arch_list: Sequence[str], capability: Tuple[int, int]) -> bool:
    """A GPU runs code built for its own major version and an equal or lower
    minor one (sm_XY), or PTX of an equal or lower capability (compute_XY),
    which the driver compiles on the spot."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue  # e.g. sm_90a: code for that exact GPU only
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == major and built[1] <= minor:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def check_gpu_kernels(device: str) -> None:
    """Stop at start-up, saying what to do, where this PyTorch has no code for
    the GPU (Blackwell on torch 2.6; Maxwell or Pascal on the CUDA 12.8
    builds), rather than at the first request with "no kernel image is
    available for execution on the device"."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    capability = torch.cuda.get_device_capability(index)
    arch_list = torch.cuda.get_arch_list()
    if not arch_list or gpu_has_kernels(arch_list, capability):
        return
    raise ModelLoadError(
        f"{torch.cuda.get_device_name(index)} (compute capability "
        f"{capability[0]}.{capability[1]}) cannot run PyTorch {torch.__version__}, "
        f"which has code for {' '.join(arch_list)} only. Run script/setup again (it "
        "installs the PyTorch this GPU needs), or build the Docker image with "
        "--build-arg TORCH_VERSION=2.8.0 (Blackwell) or 2.6.0 (Maxwell, Pascal); "
        "--device cpu runs without the GPU."
    )


def check_model_files(ckpt_dir: Path, files: Sequence[str], model: str) -> None:
    """ModelLoadError naming the files of `files` missing from the folder."""
    missing = [name for name in files if not (ckpt_dir / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"The model folder {ckpt_dir} lacks {', '.join(missing)}; point "
            f"--model-dir at a complete copy of {model}."
        )


def model_fingerprint(ckpt_dir: Path, files: Sequence[str]) -> str:
    """A short identity of a model's files: names, sizes and their first and last
    MiB (not the whole gigabytes, which would take seconds to hash)."""
    digest = hashlib.sha256()
    for name in files:
        path = ckpt_dir / name
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(1 << 20)
                f.seek(max(0, size - (1 << 20)))
                tail = f.read(1 << 20)
        except OSError:
            continue
        digest.update(f"{name}\0{size}\0".encode())
        digest.update(head)
        digest.update(tail)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def llama_config_as(
    name: str,
    size: Dict[str, Any],
    where: Path,
    released: Optional[Dict[str, Any]] = None,
) -> Iterator[None]:
    """While loading, make chatterbox's LLAMA_CONFIGS[name] the T3 size read
    from the weights in `where` (from_local always builds the released size;
    a random-weight test checkpoint holds a smaller T3). `released` is the
    released model's config where the library's table lacks it (Nano's GPT-2
    small is newer than chatterbox 0.1.7): a T3 of that size is the released
    model, any other a test checkpoint. The shared table is changed only for
    the load, under a lock."""
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    with _CONFIG_LOCK:
        saved = LLAMA_CONFIGS.get(name)
        base = released if released is not None else saved
        assert base is not None, f"no T3 config {name}"
        config = base
        if not all(base.get(key) == value for key, value in size.items()):
            _LOGGER.warning(
                "T3 in %s is not the released size (%s layers, width %s): "
                "this is a test checkpoint and will not speak words",
                where,
                size.get("n_layer", size.get("num_hidden_layers")),
                size.get("n_embd", size.get("hidden_size")),
            )
            config = dict(base, **size)
        if config is saved:
            yield
            return
        LLAMA_CONFIGS[name] = config
        try:
            yield
        finally:
            if saved is None:
                del LLAMA_CONFIGS[name]
            else:
                LLAMA_CONFIGS[name] = saved


@contextlib.contextmanager
def no_random_init() -> Iterator[None]:
    """Modules built here for weights about to be loaded skip their random
    initialisation (seconds of a load on a CPU); load them with load_weights,
    which fills every parameter."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def load_weights(module: Any, state: Dict[str, Any]) -> None:
    """Every weight of `module` from `state` (strict), taking the loaded tensors
    as they are instead of copying them."""
    module.load_state_dict(state, strict=True, assign=True)


def resolved_fast_path(fast: FastPath, device: str) -> FastPath:
    """The fast path with its "auto" precisions decided for this CPU (on a
    GPU, T3's stays "auto": the self-check decides it from the GPU's compute
    capability). ModelLoadError for int8 on a GPU."""
    t3 = fast.resolved_dtype(device) if device == "cpu" else fast.t3_dtype
    if t3 == "int8" and device != "cpu":
        raise ModelLoadError(
            "--t3-dtype int8 runs on a CPU only; on a GPU use the default (bfloat16)"
        )
    if t3 == "int8" and fast.t3_dtype == "auto" and not _int8_linear_supported():
        _LOGGER.warning("PyTorch has no int8 kernels for this CPU: T3 in float32")
        t3 = "float32"
    s3gen = fast.s3gen_dtype
    if s3gen == "auto":
        s3gen = "bfloat16" if device == "cpu" and native_bfloat16() else "float32"
    return dataclasses.replace(fast, t3_dtype=t3, s3gen_dtype=s3gen)


def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (Intel AMX or
    AVX512-BF16); elsewhere bfloat16 is emulated and slower than float32."""
    import torch

    try:
        return bool(
            torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        )
    except AttributeError:  # a PyTorch without these checks
        return False


def _int8_linear_supported() -> bool:
    import torch

    return any(
        engine != "none" for engine in torch.backends.quantized.supported_engines
    )
