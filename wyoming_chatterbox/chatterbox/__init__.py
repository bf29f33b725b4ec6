"""Everything that imports torch or chatterbox: the model backends.

Importing this package is cheap; `make_backends` imports the models' modules.
"""

import logging
from typing import Dict, List

from ..settings import FastPath, ModelSettings
from ..speech import SpeechBackend
from .base import ChatterboxBackend

_LOGGER = logging.getLogger(__name__)


def make_backend(settings: ModelSettings) -> ChatterboxBackend:
    """The backend of `settings.model` (not loaded yet)."""
    # pylint: disable=import-outside-toplevel
    if settings.model == "multilingual":
        from .multilingual import MultilingualBackend

        if settings.fast != FastPath():
            _LOGGER.warning(
                "The speed flags apply to Chatterbox Turbo and Nano only; the "
                "multilingual model uses the library's decode loop"
            )
        return MultilingualBackend(settings)
    from .turbo import NanoBackend, TurboBackend

    if settings.model == "nano":
        return NanoBackend(settings)
    return TurboBackend(settings)


def make_backends(settings: ModelSettings) -> Dict[str, SpeechBackend]:
    """The backends of every model the settings name, by key, in order (not
    loaded yet), each offering the languages it serves best."""
    backends = [make_backend(settings.for_model(key)) for key in settings.models]
    share_languages(backends)
    return {backend.kind: backend for backend in backends}


def share_languages(backends: List[ChatterboxBackend]) -> None:
    """Each language goes to the model that speaks the fewest languages (the
    specialist: Turbo or Nano for English, which speak it better and faster);
    the others leave it out of their voice lists."""
    owner: Dict[str, ChatterboxBackend] = {}
    for backend in sorted(backends, key=lambda b: len(b.languages)):
        for code in backend.languages:
            owner.setdefault(code, backend)
    for backend in backends:
        backend.leave_languages(
            {code for code, speaker in owner.items() if speaker is not backend}
        )
