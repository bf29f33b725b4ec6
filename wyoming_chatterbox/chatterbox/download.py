"""Find or download Chatterbox model files from Hugging Face.

Only the files the model opens are fetched (for Turbo, not the 1 GB
s3gen.safetensors that its repository also holds; for Multilingual, not the English
model that shares its repository). A cached copy is used without any network access.
"""

import logging
from pathlib import Path
from typing import Sequence

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


def ensure_model(
    data_dir: Path,
    repo_id: str = REPO_ID,
    files: Sequence[str] = tuple(ALLOW_PATTERNS),
) -> Path:
    """Return a folder with the model files, downloading them on first use.

    `files` are the names (or glob patterns) to fetch from `repo_id`; the defaults
    are Chatterbox Turbo's. The cache is data_dir/huggingface.
    """
    from huggingface_hub import snapshot_download

    cache_dir = data_dir / "huggingface"
    patterns = list(files)
    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=str(cache_dir),
                allow_patterns=patterns,
                local_files_only=True,
            )
        )
    except Exception:  # pylint: disable=broad-except
        _LOGGER.debug("No complete cached copy of %s in %s", repo_id, cache_dir)

    _LOGGER.info(
        "Downloading %s (about 3 GB, once) into %s", repo_id, cache_dir.resolve()
    )
    try:
        return Path(
            snapshot_download(
                repo_id, cache_dir=str(cache_dir), allow_patterns=patterns
            )
        )
    except Exception as err:
        raise ModelLoadError(
            f"Could not download the model {repo_id} from Hugging Face "
            f"({type(err).__name__}); connect this machine to the internet for the "
            "first run, or pass --model-dir with a folder that holds the model files."
        ) from err
