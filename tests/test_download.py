"""Finding the model in the --data-dir cache without any network."""

from pathlib import Path

import pytest

from wyoming_chatterbox.download import REPO_ID, ensure_model
from wyoming_chatterbox.engine import ModelLoadError


def fake_cached_snapshot(data_dir: Path) -> Path:
    """Lay out a Hugging Face cache as a finished download leaves it."""
    repo = data_dir / "huggingface" / ("models--" + REPO_ID.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "t3_turbo_v1.safetensors").write_bytes(b"")
    return snapshot


def test_cached_model_is_used_offline(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_cached_snapshot(tmp_path)
    assert ensure_model(tmp_path) == snapshot


def test_no_cache_and_no_network_says_what_to_do(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="--model-dir"):
        ensure_model(tmp_path)
