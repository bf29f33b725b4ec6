"""The server's models by key, and which one a request's voice belongs to.

A server runs one model or several (`--model turbo --model multilingual`),
each a SpeechBackend under its key. `ModelSet` merges their voices into the
one list Info shows (each model lists only the languages it serves:
chatterbox.make_backends shares them out) and resolves a request's voice to
the model that lists it. It calls only the backends' cheap methods (voices,
resolve_voice), so the event loop may use it; it never runs a model.
"""

import dataclasses
import logging
from typing import Dict, Iterator, List, Mapping, Optional, Set, Union

from .speech import (
    ResolvedVoice,
    SamplingParams,
    SpeechBackend,
    UnknownVoice,
    VoiceInfo,
)

_LOGGER = logging.getLogger(__name__)

# The key of a backend given alone without one (a test's fake, say).
SOLE_MODEL = "model"


def key_of(backend: SpeechBackend) -> str:
    """A backend's model key: its `kind` (turbo, nano, multilingual)."""
    return str(getattr(backend, "kind", "") or SOLE_MODEL)


class ModelSet(Mapping[str, SpeechBackend]):
    """The backends by model key, in the order they were given (the first
    is tried first for a voice name several models know)."""

    def __init__(
        self, backends: Union[SpeechBackend, Mapping[str, SpeechBackend]]
    ) -> None:
        if isinstance(backends, SpeechBackend):
            backends = {key_of(backends): backends}
        if not backends:
            raise ValueError("a server needs at least one model")
        self._backends: Dict[str, SpeechBackend] = dict(backends)
        rates = {backend.sample_rate for backend in self._backends.values()}
        if len(rates) > 1:
            raise ValueError(f"the models' sample rates differ: {sorted(rates)}")
        self.sample_rate: int = rates.pop()
        self._warned: Set[str] = set()

    def __getitem__(self, key: str) -> SpeechBackend:
        return self._backends[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._backends)

    def __len__(self) -> int:
        return len(self._backends)

    @property
    def first(self) -> str:
        return next(iter(self._backends))

    @property
    def model_name(self) -> str:
        """What Info calls the program: the models' names."""
        return " and ".join(b.model_name for b in self._backends.values())

    def default_params(self, key: str) -> SamplingParams:
        return self._backends[key].default_params

    def voices(self) -> List[VoiceInfo]:
        """Every model's voices, in model order; a name two models list is
        the first's (warned about once)."""
        seen: Dict[str, str] = {}
        merged: List[VoiceInfo] = []
        for key, backend in self._backends.items():
            for voice in backend.voices():
                if voice.name in seen:
                    self._warn_once(
                        f"Voice {voice.name} of {key} is also {seen[voice.name]}'s; "
                        f"{seen[voice.name]} speaks it"
                    )
                    continue
                seen[voice.name] = key
                merged.append(voice)
        return merged

    def resolve(self, name: str, language: Optional[str]) -> ResolvedVoice:
        """The voice a request names, with the key of the model that speaks it.

        A model that speaks the voice in the requested language wins; then
        the first model that knows the name (the English model lists plain
        names, the multilingual one VOICE@LANGUAGE). UnknownVoice names every
        voice of the server.
        """
        passes = (True, False) if language and len(self._backends) > 1 else (False,)
        refused: Optional[UnknownVoice] = None
        for strict in passes:
            for key, backend in self._backends.items():
                try:
                    resolved = backend.resolve_voice(name, language, strict=strict)
                except UnknownVoice as err:
                    refused = err
                    continue
                return dataclasses.replace(resolved, model=key)
        if len(self._backends) == 1 and refused is not None:
            raise refused  # the backend's own message names its voices
        raise UnknownVoice(
            f"Unknown voice {name!r}; available voices: "
            + ", ".join(voice.name for voice in self.voices())
        )

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            _LOGGER.warning("%s", message)
