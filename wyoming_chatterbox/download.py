"""Find or download the Chatterbox Turbo model files from Hugging Face.

Only the files the Turbo model opens are fetched (not the 1 GB s3gen.safetensors
that the repository also holds). A cached copy is used without any network access.
"""

import logging
from pathlib import Path

from .engine import ModelLoadError

_LOGGER = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox-turbo"
# Weights ChatterboxTurboTTS.from_local must find.
MODEL_FILES = (
    "ve.safetensors",
    "t3_turbo_v1.safetensors",
    "s3gen_meanflow.safetensors",
)
BUILTIN_VOICE_FILE = "conds.pt"
# Plus the GPT-2 tokenizer files (vocab.json, merges.txt, *_config.json, ...).
ALLOW_PATTERNS = [*MODEL_FILES, BUILTIN_VOICE_FILE, "*.json", "*.txt", "*.model"]


def ensure_model(data_dir: Path) -> Path:
    """Return a folder with the model files, downloading them on first use."""
    from huggingface_hub import snapshot_download

    cache_dir = data_dir / "huggingface"
    try:
        return Path(
            snapshot_download(
                REPO_ID,
                cache_dir=str(cache_dir),
                allow_patterns=ALLOW_PATTERNS,
                local_files_only=True,
            )
        )
    except Exception:  # pylint: disable=broad-except
        _LOGGER.debug("No complete cached copy of %s in %s", REPO_ID, cache_dir)

    _LOGGER.info(
        "Downloading %s (about 3 GB, once) into %s", REPO_ID, cache_dir.resolve()
    )
    try:
        return Path(
            snapshot_download(
                REPO_ID, cache_dir=str(cache_dir), allow_patterns=ALLOW_PATTERNS
            )
        )
    except Exception as err:
        raise ModelLoadError(
            f"Could not download the model {REPO_ID} from Hugging Face "
            f"({type(err).__name__}); connect this machine to the internet for the "
            "first run, or pass --model-dir with a folder that holds the model files."
        ) from err
