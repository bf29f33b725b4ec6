"""Finding the model in the --data-dir cache without any network, and what is
downloaded: exactly the files each model's loader opens."""

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence, Set

import pytest

from tests.test_model import checkpoint  # noqa: F401
from tests.test_multilingual import mtl_checkpoint  # noqa: F401
from tests.test_nano import nano_checkpoint  # noqa: F401
from wyoming_chatterbox.chatterbox import multilingual
from wyoming_chatterbox.chatterbox.download import ensure_model
from wyoming_chatterbox.chatterbox.turbo_load import (
    ALLOW_PATTERNS,
    NANO,
    REPO_ID,
    TOKENIZER_FILES,
    TURBO,
)
from wyoming_chatterbox.settings import ModelSettings
from wyoming_chatterbox.speech import ModelLoadError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cached_snapshot(
    data_dir: Path,
    repo_id: str = REPO_ID,
    files: Sequence[str] = ("t3_turbo_v1.safetensors",),
    commit: str = COMMIT,
) -> Path:
    """Lay out a Hugging Face cache as a finished download leaves it."""
    repo = data_dir / "huggingface" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
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
    wanted = multilingual.allow_patterns("v3")
    snapshot = fake_cached_snapshot(tmp_path, multilingual.REPO_ID, wanted)
    assert ensure_model(tmp_path, multilingual.REPO_ID, wanted) == snapshot
    # The two models' caches do not stand in for each other.
    with pytest.raises(ModelLoadError, match="ResembleAI/chatterbox-turbo"):
        ensure_model(tmp_path, REPO_ID, ALLOW_PATTERNS)


def test_a_cached_v2_download_serves_when_v3_cannot_be_had(
    tmp_path: Path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    older = fake_cached_snapshot(
        tmp_path, multilingual.REPO_ID, multilingual.allow_patterns("v2")
    )
    backend = multilingual.MultilingualBackend(
        ModelSettings(models=("multilingual",), data_dir=tmp_path)
    )
    assert backend._find_model() == older
    v2 = multilingual.MultilingualBackend(
        ModelSettings(
            models=("multilingual",), data_dir=tmp_path, multilingual_version="v2"
        )
    )
    assert v2._find_model() == older
    # With v3 in the cache too, v3 is the one.
    newer = fake_cached_snapshot(
        tmp_path / "both", multilingual.REPO_ID, multilingual.allow_patterns("v3")
    )
    both = multilingual.MultilingualBackend(
        ModelSettings(models=("multilingual",), data_dir=tmp_path / "both")
    )
    assert both._find_model() == newer


def test_only_one_t3_version_is_downloaded() -> None:
    v2, v3 = multilingual.allow_patterns("v2"), multilingual.allow_patterns("v3")
    assert "t3_mtl23ls_v3.safetensors" in v3 and "t3_mtl23ls_v2.safetensors" in v2
    assert set(v2) ^ set(v3) == {
        "t3_mtl23ls_v2.safetensors",
        "t3_mtl23ls_v3.safetensors",
    }
    # Turbo and Nano: their own T3, never the repositories' unused s3gen.
    for variant in (TURBO, NANO):
        patterns = variant.allow_patterns
        assert variant.t3_weights in patterns
        assert "s3gen.safetensors" not in patterns
        assert not any("*" in pattern for pattern in patterns)
    assert NANO.repo_id == "ResembleAI/chatterbox-nano"
    assert NANO.t3_weights == "t3_nano_v1.safetensors"


def test_tokenizer_files_are_what_transformers_reads() -> None:
    """The GPT-2 tokenizer files Turbo and Nano download are the names
    transformers' AutoTokenizer looks for in a folder."""
    from transformers import GPT2TokenizerFast
    from transformers.tokenization_utils_base import (
        ADDED_TOKENS_FILE,
        FULL_TOKENIZER_FILE,
        SPECIAL_TOKENS_MAP_FILE,
        TOKENIZER_CONFIG_FILE,
    )

    expected = {
        ADDED_TOKENS_FILE,
        FULL_TOKENIZER_FILE,
        SPECIAL_TOKENS_MAP_FILE,
        TOKENIZER_CONFIG_FILE,
        *GPT2TokenizerFast.vocab_files_names.values(),
    }
    assert set(TOKENIZER_FILES) == expected


# --- what each loader opens, against what is downloaded -------------------------


def atime_moves_on_read(where: Path) -> bool:
    probe = where / "probe"
    probe.write_text("x")
    os.utime(probe, (0, probe.stat().st_mtime))
    probe.read_text()
    return probe.stat().st_atime > 0


def opened_by(folder: Path, load: Callable[[], Any]) -> Set[str]:
    """The files in `folder` that `load()` read: each file's access time is set
    to 1970 first (older than its modification time, so even a relatime mount
    moves it on the next read, whoever reads: safetensors and tokenizers read
    in Rust, out of Python's sight)."""
    for path in folder.iterdir():
        os.utime(path, (0, path.stat().st_mtime))
    load()
    return {path.name for path in folder.iterdir() if path.stat().st_atime > 0}


def allowed(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


# Files of the released repositories that the models never open.
DECOYS = ("s3gen.safetensors", "README.md", "t3_turbo_v1.yaml", "LICENSE")


@pytest.mark.model
@pytest.mark.parametrize("case", ["turbo", "nano", "multilingual", "multilingual v2"])
def test_each_loader_opens_exactly_what_is_downloaded(
    case: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A folder holding the checkpoint's files that the model's allow-list
    names, and decoys besides: the backend loads from it, reading every
    allowed file there and nothing else."""
    if not atime_moves_on_read(tmp_path):
        pytest.skip("file access times do not move on read here (noatime)")
    from wyoming_chatterbox.chatterbox import make_backend

    model = case.split()[0]
    source = request.getfixturevalue(
        {"turbo": "checkpoint", "nano": "nano_checkpoint"}.get(model, "mtl_checkpoint")
    )
    if model == "multilingual":
        version = "v2" if case.endswith("v2") else "v3"
        patterns = multilingual.allow_patterns(version)
        turbo_files = [name for name in ALLOW_PATTERNS if name != "conds.pt"]
        decoys = (*DECOYS, *turbo_files, "t3_mtl23ls_v2.safetensors")
    else:
        variant = NANO if model == "nano" else TURBO
        patterns = variant.allow_patterns
        other = TURBO if variant is NANO else NANO
        decoys = (*DECOYS, other.t3_weights, *multilingual.allow_patterns("v3"))
    folder = tmp_path / "model"
    folder.mkdir()
    for path in source.iterdir():
        name = path.name
        if case == "multilingual v2" and name.startswith("t3_mtl23ls_"):
            name = "t3_mtl23ls_v2.safetensors"  # a folder from before v3
        if allowed(name, patterns):
            (folder / name).symlink_to(path.resolve())
    for decoy in decoys:
        if not (folder / decoy).exists():
            (folder / decoy).write_bytes(b"")
    present = {path.name for path in folder.iterdir() if allowed(path.name, patterns)}
    weights = (
        multilingual.required_files(version)
        if model == "multilingual"
        else variant.model_files
    )
    assert {*weights, "conds.pt"} <= present

    backend = make_backend(
        ModelSettings(
            models=(model,), model_dir=folder, data_dir=tmp_path / "data", device="cpu"
        )
    )
    # (the package's logger: an earlier test may have left it above INFO)
    with caplog.at_level(logging.INFO, logger="wyoming_chatterbox"):
        opened = opened_by(folder, backend.load)
    try:
        assert opened == present
        v2_lines = [r for r in caplog.records if "v2 only" in r.getMessage()]
        assert len(v2_lines) == (1 if case == "multilingual v2" else 0)
        if case == "multilingual v2":
            assert v2_lines[0].levelno == logging.INFO
    finally:
        backend.close()
