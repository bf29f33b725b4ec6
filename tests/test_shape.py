"""The torch boundary: only chatterbox/ may import torch, and most of it lazily."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import wyoming_chatterbox

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchaudio", "chatterbox", "transformers"}
# The modules that run the model's maths import torch at module level; they
# are imported only once a model is loaded.
TORCH_AT_IMPORT = {
    "wyoming_chatterbox.chatterbox.cuda_graphs",
    "wyoming_chatterbox.chatterbox.s3stream",
    "wyoming_chatterbox.chatterbox.self_check",
    "wyoming_chatterbox.chatterbox.t3_decoder",
    "wyoming_chatterbox.chatterbox.t3_sampler",
    "wyoming_chatterbox.chatterbox.t3_slots",
    "wyoming_chatterbox.chatterbox.t3_step",
}


def _modules() -> list:
    found = [
        info.name
        for info in pkgutil.walk_packages(
            wyoming_chatterbox.__path__, "wyoming_chatterbox."
        )
    ]
    return sorted(set(found) - TORCH_AT_IMPORT)


def test_every_module_but_the_models_maths_imports_without_torch() -> None:
    modules = _modules()
    assert "wyoming_chatterbox.server" in modules
    assert "wyoming_chatterbox.chatterbox.turbo" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(set({sorted(HEAVY)!r}) & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_the_models_maths_does_import_torch() -> None:
    # The list above is not an excuse: each named module really needs torch.
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(TORCH_AT_IMPORT)!r}:\n"
        "    importlib.import_module(name)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == "True"
