"""Chatterbox Multilingual (23 languages) as a SpeechBackend: its languages,
loading with no network access, voices from clips; speaking is in
multilingual_loop. Worker thread only; importing this module is cheap (torch
and chatterbox are imported inside functions).
"""

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, Generator, Iterator, Optional, Tuple

from ..settings import ModelSettings
from ..speech import GroupStats, ModelLoadError, Piece, SamplingParams, SpeechJob
from ..voices import Languages
from .base import ChatterboxBackend, quiet
from .download import cached_model, ensure_model
from .loading import llama_config_as, load_weights, no_random_init
from .multilingual_loop import LANGUAGES, generate, normalise_language

_LOGGER = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox"
# T3's weights by version: v3 (June 2026, same architecture) has fewer
# hallucinations and closer voices than v2, upstream says.
T3_BY_VERSION = {
    "v2": "t3_mtl23ls_v2.safetensors",
    "v3": "t3_mtl23ls_v3.safetensors",
}
VOICE_ENCODER_FILE = "ve.pt"
S3GEN_FILE = "s3gen.pt"
TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
# Character -> Cangjie code table that the tokenizer uses to spell Chinese text.
CANGJIE_FILE = "Cangjie5_TC.json"
BUILTIN_VOICE_FILE = "conds.pt"


def required_files(version: str) -> Tuple[str, ...]:
    """What the loader must find (the tokenizer reads the Cangjie table for
    Chinese); the built-in voice, conds.pt, is checked on its own."""
    return (
        VOICE_ENCODER_FILE,
        T3_BY_VERSION[version],
        S3GEN_FILE,
        TOKENIZER_FILE,
        CANGJIE_FILE,
    )


def allow_patterns(version: str) -> Tuple[str, ...]:
    """What to download: exactly what load_multilingual_model opens (one T3
    version, not the repository's others nor its Turbo-era files)."""
    return (*required_files(version), BUILTIN_VOICE_FILE)


# ChatterboxMultilingualTTS.generate's defaults; top_k is not used upstream (0: off).
DEFAULT_PARAMS = SamplingParams(
    temperature=0.8,
    top_k=0,
    top_p=1.0,
    repetition_penalty=2.0,
    min_p=0.05,
    exaggeration=0.5,
    cfg_weight=0.5,
)

# T3 size of the released weights (chatterbox's LLAMA_CONFIGS["Llama_520M"]).
_LLAMA_CONFIG_NAME = "Llama_520M"
_LOAD_LOCK = threading.Lock()


# --- Loading ---------------------------------------------------------------------


def _t3_size(path: Path) -> Dict[str, Any]:
    """T3's Llama size from its weights: layers from the key names, widths from
    the shapes. The head width is not in the shapes: it is 64 unless the
    file's metadata says otherwise ("head_dim")."""
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from safetensors import safe_open

    released = LLAMA_CONFIGS[_LLAMA_CONFIG_NAME]
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata() or {}
            hidden = f.get_slice("text_emb.weight").get_shape()[1]
            layer0 = "tfmr.layers.0."
            q_out = f.get_slice(layer0 + "self_attn.q_proj.weight").get_shape()[0]
            kv_out = f.get_slice(layer0 + "self_attn.k_proj.weight").get_shape()[0]
            ffn = f.get_slice(layer0 + "mlp.gate_proj.weight").get_shape()[0]
        layers = 1 + max(
            int(k.split(".")[2]) for k in keys if k.startswith("tfmr.layers.")
        )
        head_dim = int(metadata.get("head_dim", released["head_dim"]))
    except Exception as err:
        raise ModelLoadError(
            f"{path} is not a Chatterbox Multilingual T3 ({type(err).__name__}: "
            f"{err}); delete it to download again, or use another --model-dir."
        ) from err
    return {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": q_out // head_dim,
        "num_key_value_heads": kv_out // head_dim,
        "head_dim": head_dim,
    }


def _local_hub_file(
    repo_id: str, filename: str, cache_dir: Any = None, **_: Any
) -> str:
    """Stands in for hf_hub_download in the tokenizer while loading: the file from
    the model folder (the tokenizer passes that folder as cache_dir), no network."""
    path = Path(cache_dir or ".") / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return str(path)


def _chinese_segmenter(pkuseg_home: Optional[Path]) -> Any:
    """pkuseg's word segmenter for Chinese, or None (with a warning) when its model
    (spacy_ontonotes, fetched from GitHub on first use) cannot be had."""
    try:
        from huggingface_hub import constants
        from spacy_pkuseg import pkuseg
        from spacy_pkuseg.config import config
    except ImportError:
        _LOGGER.warning("spacy-pkuseg is not installed: Chinese words run together")
        return None
    home = str(pkuseg_home) if pkuseg_home is not None else config.pkuseg_home
    cached = os.path.isfile(os.path.join(home, "spacy_ontonotes.zip"))
    if not cached and constants.HF_HUB_OFFLINE:
        _LOGGER.warning(
            "Chinese word segmentation is off: its model is not in %s and "
            "HF_HUB_OFFLINE is set",
            home,
        )
        return None
    previous = config.pkuseg_home
    config.pkuseg_home = home
    try:
        return pkuseg()
    except Exception as err:  # pylint: disable=broad-except
        _LOGGER.warning(
            "Chinese word segmentation is off: pkuseg could not load its model "
            "into %s (%s: %s)",
            home,
            type(err).__name__,
            err,
        )
        return None
    finally:
        config.pkuseg_home = previous


@contextlib.contextmanager
def _tokenizer_offline(pkuseg_home: Optional[Path]) -> Iterator[None]:
    """While loading, make MTLTokenizer read the Cangjie table from the model folder
    instead of downloading it from the hub into a cache inside that folder, and make
    a missing pkuseg model a warning instead of a crash (upstream lets pkuseg's
    download error escape from from_local)."""
    from chatterbox.models.tokenizers import tokenizer as mtl_tokenizer

    converter = mtl_tokenizer.ChineseCangjieConverter
    saved = (mtl_tokenizer.hf_hub_download, converter._init_segmenter)

    def init_segmenter(self: Any) -> None:
        self.segmenter = _chinese_segmenter(pkuseg_home)

    mtl_tokenizer.hf_hub_download = _local_hub_file
    converter._init_segmenter = init_segmenter
    try:
        yield
    finally:
        mtl_tokenizer.hf_hub_download, converter._init_segmenter = saved


def version_in(ckpt_dir: Path) -> str:
    """The newest T3 version the folder holds (v3 if none)."""
    for version in sorted(T3_BY_VERSION, reverse=True):
        if (ckpt_dir / T3_BY_VERSION[version]).is_file():
            return version
    return "v3"


def load_multilingual_model(
    ckpt_dir: Path,
    device: str,
    pkuseg_home: Optional[Path] = None,
    version: Optional[str] = None,
) -> Any:
    """ChatterboxMultilingualTTS from a folder, with T3 `version` (default:
    the newest the folder holds), at the T3 size the weights have.

    The steps of upstream's from_local (chatterbox 0.1.7), which knows only
    v2's file. No network access: the Cangjie table comes from `ckpt_dir`.
    `pkuseg_home` is where the Chinese word segmenter's model is kept
    (default ~/.pkuseg, or $PKUSEG_HOME); without it, Chinese is spoken
    without word segmentation. The built-in voice (conds.pt) is left in
    `model.conds`, None when the folder has no conds.pt.
    """
    t3_path = ckpt_dir / T3_BY_VERSION[version or version_in(ckpt_dir)]
    size = _t3_size(t3_path)
    with _LOAD_LOCK, _tokenizer_offline(pkuseg_home):
        with llama_config_as(_LLAMA_CONFIG_NAME, size, ckpt_dir), quiet():
            return _from_local(ckpt_dir, device, t3_path)


def _from_local(ckpt_dir: Path, device: str, t3_path: Path) -> Any:
    import torch
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.tokenizers import MTLTokenizer
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.mtl_tts import ChatterboxMultilingualTTS, Conditionals
    from safetensors.torch import load_file

    map_location = torch.device("cpu") if device == "cpu" else None

    def weights(name: str) -> Any:
        return torch.load(ckpt_dir / name, map_location=map_location, weights_only=True)

    with no_random_init():
        ve, t3, s3gen = VoiceEncoder(), T3(T3Config.multilingual()), S3Gen()
    load_weights(ve, weights(VOICE_ENCODER_FILE))
    ve.to(device).eval()
    t3_state: Any = load_file(t3_path)
    if "model" in t3_state:
        t3_state = t3_state["model"][0]
    load_weights(t3, t3_state)
    t3.to(device).eval()
    load_weights(s3gen, weights(S3GEN_FILE))
    s3gen.to(device).eval()
    tokenizer = MTLTokenizer(str(ckpt_dir / TOKENIZER_FILE))
    conds = None
    builtin_voice = ckpt_dir / BUILTIN_VOICE_FILE
    if builtin_voice.exists():
        conds = Conditionals.load(builtin_voice, map_location=map_location)
        conds = conds.to(device)
    return ChatterboxMultilingualTTS(t3, s3gen, ve, tokenizer, device, conds=conds)


# --- Voices ----------------------------------------------------------------------


def prepare_conditionals(model: Any, clip_path: Path, exaggeration: float = 0.5) -> Any:
    """A voice from a reference clip: upstream's prepare_conditionals, returned as a
    new `chatterbox.mtl_tts.Conditionals` instead of stored in `model.conds`.

    Raises ValueError for a clip that cannot be read. The first 6 s go into T3's
    prompt and the first 10 s into S3Gen (the voices folder takes clips of more
    than 5 s).
    """
    import librosa
    import torch
    from chatterbox.models.s3gen import S3GEN_SR
    from chatterbox.models.s3tokenizer import S3_SR
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.mtl_tts import Conditionals

    try:
        wav_24k, _ = librosa.load(str(clip_path), sr=S3GEN_SR)
    except Exception as err:
        raise ValueError(
            f"Could not read the voice clip {clip_path} ({type(err).__name__}: {err})"
        ) from err
    wav_16k = librosa.resample(wav_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)

    device = model.device
    with torch.no_grad(), quiet():
        gen = model.s3gen.embed_ref(
            wav_24k[: model.DEC_COND_LEN], S3GEN_SR, device=device
        )
        prompt_tokens = None
        prompt_len = model.t3.hp.speech_cond_prompt_len
        if prompt_len:
            prompt_tokens, _ = model.s3gen.tokenizer.forward(
                [wav_16k[: model.ENC_COND_LEN]], max_len=prompt_len
            )
            prompt_tokens = torch.atleast_2d(prompt_tokens).to(device)
        speaker = torch.from_numpy(
            model.ve.embeds_from_wavs([wav_16k], sample_rate=S3_SR)
        )
        speaker = speaker.mean(dim=0, keepdim=True).to(device)
        t3_cond = T3Cond(
            speaker_emb=speaker,
            cond_prompt_speech_tokens=prompt_tokens,
            emotion_adv=exaggeration * torch.ones(1, 1, 1),
        ).to(device=device)
    return Conditionals(t3_cond, gen)


# --- Backend ---------------------------------------------------------------------


class MultilingualLanguages(Languages):
    """Its 23 languages, also by their other codes (nb, iw, cmn ...)."""

    def code(self, tag: str) -> Optional[str]:
        return normalise_language(tag)


class MultilingualBackend(ChatterboxBackend):
    """Chatterbox Multilingual on one device: every voice in each of its languages.

    Home Assistant sends only a voice name, so each voice is listed once per
    language as VOICE@LANGUAGE; a voice's `languages` setting narrows the list.
    """

    kind = "multilingual"
    model_name = "Chatterbox Multilingual"
    repo_id = f"{REPO_ID} (multilingual files)"
    languages = LANGUAGES
    default_params = DEFAULT_PARAMS

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(settings)
        self.version = settings.multilingual_version
        self.model_files = required_files(self.version)

    def _make_languages(self) -> Languages:
        return MultilingualLanguages(self.model_name, self.languages)

    def _find_model(self) -> Path:
        data_dir = self.settings.data_dir
        try:
            return ensure_model(data_dir, REPO_ID, allow_patterns(self.version))
        except ModelLoadError:
            # No network for v3, but v2 from before: better than nothing
            # (_use_folder says so).
            older = cached_model(data_dir, REPO_ID, allow_patterns("v2"))
            if self.version != "v3" or older is None:
                raise
            return older

    def _use_folder(self, ckpt_dir: Path) -> None:
        """A folder with v2's T3 but not v3's (an older download or copy)
        still loads, with v2."""
        wanted = T3_BY_VERSION[self.version]
        older = T3_BY_VERSION["v2"]
        if (
            self.version == "v3"
            and not (ckpt_dir / wanted).is_file()
            and (ckpt_dir / older).is_file()
        ):
            _LOGGER.info(
                "%s holds Chatterbox Multilingual v2 only (no %s): speaking with "
                "v2; upstream recommends v3 (fewer hallucinations, closer voices)",
                ckpt_dir,
                wanted,
            )
            self.version = "v2"
            self.model_files = required_files("v2")

    def _load_model(self, ckpt_dir: Path) -> Any:
        # Upstream's alignment guard warns on every repeated token it sees.
        if not _LOGGER.isEnabledFor(logging.DEBUG):
            logging.getLogger(
                "chatterbox.models.t3.inference.alignment_stream_analyzer"
            ).setLevel(logging.ERROR)
        return load_multilingual_model(
            ckpt_dir,
            self.device,
            pkuseg_home=self.settings.data_dir / "pkuseg",
            version=self.version,
        )

    def _compute_conditionals(self, clip: Path) -> Any:
        return prepare_conditionals(
            self.model, clip, exaggeration=DEFAULT_PARAMS.exaggeration
        )

    def _load_cached(self, path: Path) -> Any:
        from chatterbox.mtl_tts import Conditionals

        return Conditionals.load(path, map_location=self.device).to(self.device)

    def _speak(
        self, job: SpeechJob, conds: Any, stats: GroupStats
    ) -> Generator[Piece, None, None]:
        audio, stats.tokens, stats.cut = generate(
            self.model, conds, job.text, job.language, job.params, job.budget
        )
        yield Piece(audio=audio, tokens=stats.tokens)
