"""Find or download a Chatterbox model's files from Hugging Face.

Only the files a model opens are fetched (each model module names them); a
cached copy is used without any network access.
"""

import logging
from pathlib import Path
from typing import Optional, Sequence

from ..speech import ModelLoadError

_LOGGER = logging.getLogger(__name__)


def cached_model(
    data_dir: Path, repo_id: str, patterns: Sequence[str]
) -> Optional[Path]:
    """The folder of a complete cached download with these files, or None;
    no network access."""
    from huggingface_hub import snapshot_download

    cache_dir = data_dir / "huggingface"
    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=str(cache_dir),
                allow_patterns=list(patterns),
                local_files_only=True,
            )
        )
    except Exception:  # pylint: disable=broad-except
        _LOGGER.debug("No complete cached copy of %s in %s", repo_id, cache_dir)
        return None


def ensure_model(data_dir: Path, repo_id: str, patterns: Sequence[str]) -> Path:
    """Return a folder with the model files, downloading them on first use.

    `patterns` are the names (or glob patterns) to fetch from `repo_id`. The
    cache is data_dir/huggingface.
    """
    from huggingface_hub import snapshot_download

    cached = cached_model(data_dir, repo_id, patterns)
    if cached is not None:
        return cached
    cache_dir = data_dir / "huggingface"
    _LOGGER.info(
        "Downloading %s (a few GB, once) into %s", repo_id, cache_dir.resolve()
    )
    try:
        return Path(
            snapshot_download(
                repo_id, cache_dir=str(cache_dir), allow_patterns=list(patterns)
            )
        )
    except Exception as err:
        raise ModelLoadError(
            f"Could not download the model {repo_id} from Hugging Face "
            f"({type(err).__name__}); connect this machine to the internet for the "
            "first run, or pass --model-dir with a folder that holds the model files."
        ) from err
