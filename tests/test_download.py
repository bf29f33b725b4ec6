"""Finding the model in the --data-dir cache without any network."""

from pathlib import Path
from typing import Sequence

import pytest

from wyoming_chatterbox.chatterbox import multilingual
from wyoming_chatterbox.chatterbox.download import ensure_model
from wyoming_chatterbox.chatterbox.turbo import ALLOW_PATTERNS, REPO_ID
from wyoming_chatterbox.speech import ModelLoadError


def fake_cached_snapshot(
    data_dir: Path,
    repo_id: str = REPO_ID,
    files: Sequence[str] = ("t3_turbo_v1.safetensors",),
) -> Path:
    """Lay out a Hugging Face cache as a finished download leaves it."""
    repo = data_dir / "huggingface" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_bytes(b"")
    return snapshot


def test_cached_model_is_used_offline(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_cached_snapshot(tmp_path)
    assert ensure_model(tmp_path, REPO_ID, ALLOW_PATTERNS) == snapshot


def test_no_cache_and_no_network_says_what_to_do(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="--model-dir"):
        ensure_model(tmp_path, REPO_ID, ALLOW_PATTERNS)


def test_cached_multilingual_model_is_used_offline(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_cached_snapshot(
        tmp_path, multilingual.REPO_ID, multilingual.MODEL_FILES
    )
    found = ensure_model(tmp_path, multilingual.REPO_ID, multilingual.MODEL_FILES)
    assert found == snapshot
    # The two models' caches do not stand in for each other.
    with pytest.raises(ModelLoadError, match="ResembleAI/chatterbox-turbo"):
        ensure_model(tmp_path, REPO_ID, ALLOW_PATTERNS)
