"""Everything that imports torch or chatterbox: the model backends.

Importing this package is cheap; `make_backend` imports the model's module.
"""

import logging

from ..settings import FastPath, ModelSettings
from ..speech import SpeechBackend

_LOGGER = logging.getLogger(__name__)


def make_backend(settings: ModelSettings) -> SpeechBackend:
    """The backend the settings ask for (not loaded yet)."""
    # pylint: disable=import-outside-toplevel
    if settings.model == "multilingual":
        from .multilingual import MultilingualBackend

        if settings.fast != FastPath():
            _LOGGER.warning(
                "The speed flags apply to Chatterbox Turbo only; the multilingual "
                "model uses the library's decode loop"
            )
        return MultilingualBackend(settings)
    from .turbo import TurboBackend

    return TurboBackend(settings)
