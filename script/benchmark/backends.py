"""What runs in this process: the backends the bench serves, the recorder that
times their calls, and the real server around them on a free port.

The backends make speech as long as real speech of the text (TOKEN_RULE): the
fake by the length of its audio, Turbo and Nano by forcing their generation
lengths through the backend's `token_range` hook (random weights would stop after a
handful of tokens). The recorder wraps the backend's one hot method,
`speak(job)`, with the clock the client reads too.
"""

import asyncio
import contextlib
import dataclasses
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from wyoming_chatterbox.settings import FastPath, ModelSettings, Settings
from wyoming_chatterbox.speech import (
    Piece,
    SpeechBackend,
    SpeechJob,
    SynthesisCancelled,
    VoiceInfo,
)

from .client import BenchError

# How long real speech is: Chatterbox makes 25 speech tokens a second, and
# English is spoken at about 14-15 characters a second (~150 words a minute).
TOKENS_PER_SECOND = 25
CHARS_PER_SECOND = 14.5
TOKEN_RULE = (
    f"n = round(characters * {TOKENS_PER_SECOND} / {CHARS_PER_SECOND}) speech "
    f"tokens ({TOKENS_PER_SECOND} tokens a second of speech, {CHARS_PER_SECOND} "
    "characters of English a second), at least 1, at most 1000"
)
SAMPLE_RATE = 24000


def realistic_tokens(text: str) -> int:
    """Speech tokens that real speech of `text` takes (see TOKEN_RULE)."""
    n = round(len(text.strip()) * TOKENS_PER_SECOND / CHARS_PER_SECOND)
    return max(1, min(1000, n))


def speech_seconds(text: str) -> float:
    return realistic_tokens(text) / TOKENS_PER_SECOND


class RealisticFakeBackend(SpeechBackend):
    """Speaks as much audio as real speech of the text would last, after `delay`
    seconds per sentence group: with delay 0 every millisecond measured is the
    server's and the protocol's own. (tests/fakes.py's FakeBackend speaks a
    fixed number of samples per character and records its calls for tests.)"""

    sample_rate = SAMPLE_RATE
    model_name = "Fake (benchmark)"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        # A quiet voiced tone, so that the loudness stage has something to level.
        t = np.arange(SAMPLE_RATE * 60) / SAMPLE_RATE
        self._tone = (0.1 * np.sin(2 * np.pi * 140 * t)).astype(np.float32)
        self.device = "cpu"

    def load(self) -> None:
        pass

    def voices(self) -> List[VoiceInfo]:
        return [VoiceInfo(name="default", description="Fake voice", languages=["en"])]

    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        deadline = time.monotonic() + self.delay
        while time.monotonic() < deadline:
            if job.budget.should_stop():
                raise SynthesisCancelled()
            time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
        samples = int(speech_seconds(job.text) * SAMPLE_RATE)
        repeats = -(-samples // self._tone.size)
        audio = np.tile(self._tone, repeats)[:samples]
        yield Piece(audio=audio, tokens=realistic_tokens(job.text))


def make_turbo_backend(
    model_dir: Path, data_dir: Path, device: str, fast: FastPath
) -> SpeechBackend:
    """The real Turbo or Nano backend (whichever T3 the folder holds), each group
    as long as real speech of its text."""
    from wyoming_chatterbox.chatterbox.turbo import NanoBackend, TurboBackend
    from wyoming_chatterbox.chatterbox.turbo_load import NANO, variant_in

    base = NanoBackend if variant_in(model_dir) is NANO else TurboBackend

    class BenchBackend(base):  # type: ignore[valid-type,misc]
        """Realistic generation lengths for any checkpoint."""

        def token_range(self, text: str) -> Tuple[int, int]:
            n = realistic_tokens(text)
            return n, n

    return BenchBackend(
        ModelSettings(
            models=(base.kind,),
            model_dir=model_dir,
            data_dir=data_dir,
            device=device,
            fast=fast,
        )
    )


class CallRecorder:
    """Wraps a backend's `speak` to timestamp every call (time.monotonic, the
    clock the client uses too, in the same process). One-shot replies come
    through it as well, as jobs with `whole` set.

    Per call: when its body started, when it yielded its first piece, when it
    ended, and `busy_s`, the time spent inside the backend's own code (the
    engine interleaves streams piece by piece, so wall time from start to end
    would count other streams' work).
    """

    def __init__(self, backend: SpeechBackend) -> None:
        self.calls: List[Dict[str, Any]] = []
        self.sample_rate = backend.sample_rate
        speak = backend.speak
        # An instance attribute shadows the method: the engine calls this.
        backend.speak = lambda job: self._timed(speak, job)  # type: ignore[method-assign]

    def _timed(
        self, speak: Callable[[SpeechJob], Iterator[Piece]], job: SpeechJob
    ) -> Iterator[Piece]:
        record: Dict[str, Any] = {
            "chars": len(job.text.strip()),
            "intended_tokens": realistic_tokens(job.text),
            "whole": job.whole,
            "called": time.monotonic(),
            "first_piece": None,
            "end": None,
            "busy_s": 0.0,
            "audio_s": 0.0,
            "tokens": 0,
            "pieces": 0,
        }
        self.calls.append(record)
        inner = iter(speak(job))
        try:
            while True:
                step = time.monotonic()
                try:
                    piece = next(inner)
                except StopIteration:
                    record["busy_s"] += time.monotonic() - step
                    break
                now = time.monotonic()
                record["busy_s"] += now - step
                if piece.audio.size:  # else the worker's turn, not audio
                    if record["first_piece"] is None:
                        record["first_piece"] = now
                    record["pieces"] += 1
                    record["audio_s"] += piece.audio.size / self.sample_rate
                    record["tokens"] += piece.tokens
                yield piece
        finally:
            record["end"] = time.monotonic()
            close = getattr(inner, "close", None)
            if close is not None:
                close()

    def between(self, start: float, end: float) -> List[Dict[str, Any]]:
        """Calls that started in [start, end] and have ended."""
        return [
            c
            for c in self.calls
            if start <= c["called"] <= end and c["end"] is not None
        ]

    def attribute(self, sample: Dict[str, Any]) -> None:
        """Add to `sample` (one reply, the only one in flight: found by its
        time window) its backend calls and the server's overhead beside them."""
        calls = self.between(sample["t_start"], sample["t_done"])
        sample["calls"] = len(calls)
        if not calls:
            return
        first = min(calls, key=lambda c: c["called"])
        busy = sum(c["busy_s"] for c in calls)
        sample["backend_busy_s"] = busy
        sample["rtf_backend"] = (
            busy / sample["audio_s"] if sample["audio_s"] > 0 else None
        )
        sample["tokens"] = sum(c["tokens"] for c in calls)
        sample["intended_tokens"] = sum(c["intended_tokens"] for c in calls)
        if first["first_piece"] is not None:
            # First audio as the client saw it, minus the backend's own time to
            # its first piece; streamed, from when the text let the server
            # start (the splitter's wait for the sentence end is not overhead).
            t0 = sample.get("t_text_ready") or sample["t0"]
            model = first["first_piece"] - first["called"]
            heard = sample["t0"] + sample["first_audio_s"]
            sample["overhead_first_audio_s"] = heard - t0 - model
            sample["overhead_before_call_s"] = first["called"] - t0
            sample["overhead_after_piece_s"] = heard - first["first_piece"]
        if sample["case"] in ("a", "b"):
            # The text was complete at t0: the rest of the wait is model or us.
            sample["overhead_total_s"] = sample["total_s"] - busy
            sample["overhead_total_pct"] = 100.0 * (
                (sample["total_s"] - busy) / sample["total_s"]
            )


@dataclasses.dataclass
class Target:
    """Where the server listens and what the bench may know about its inside."""

    host: str
    port: int
    recorder: Optional[CallRecorder] = None
    backend: Optional[SpeechBackend] = None

    def group_stats(self) -> Optional[List[Any]]:
        """The backend's group_stats so far (None: it keeps none)."""
        stats = getattr(self.backend, "group_stats", None)
        return None if stats is None else list(stats)

    def new_group_stats(
        self, before: Optional[List[Any]]
    ) -> Optional[List[Dict[str, Any]]]:
        """GroupStats added since `before` (by identity: the deque may drop old
        ones), as dicts with ms_per_token."""
        after = self.group_stats()
        if after is None or before is None:
            return None
        seen = {id(entry) for entry in before}
        return [
            {**dataclasses.asdict(entry), "ms_per_token": entry.ms_per_token}
            for entry in after
            if id(entry) not in seen
        ]

    def reset_gpu_peak(self) -> None:
        device = self._cuda_device()
        if device is not None:
            import torch

            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def gpu_peak(self) -> Optional[float]:
        """GB of GPU memory at most allocated since the reset; None off CUDA."""
        device = self._cuda_device()
        if device is None:
            return None
        import torch

        return float(torch.cuda.max_memory_allocated(device)) / 1e9

    def _cuda_device(self) -> Optional[str]:
        device = str(getattr(self.backend, "device", ""))
        return device if device.startswith("cuda") else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve_in_process(
    backend: SpeechBackend, server: Dict[str, Any], body: Callable[[Target], Any]
) -> Tuple[Any, float]:
    """Start the real server (run_server) on a free port around `backend`, with
    the settings in `server` (Settings.of's names) over the defaults, run
    `body`, stop the server. Returns body's result and the load + warm-up time.
    """
    from wyoming_chatterbox.server import run_server

    recorder = CallRecorder(backend)
    port = free_port()
    settings = Settings.of(
        uri=f"tcp://127.0.0.1:{port}", default_voice="default", warm_up=True, **server
    )
    ready = asyncio.Event()
    stop = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    async def stop_signal() -> None:
        await stop.wait()

    started = time.monotonic()
    serving = asyncio.ensure_future(
        run_server(backend, settings, on_ready=on_ready, stop_signal=stop_signal)
    )
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        waiting.cancel()
        serving.result()  # raises the load error
        raise BenchError("the server stopped before it was ready")
    load_s = time.monotonic() - started
    try:
        result = await body(Target("127.0.0.1", port, recorder, backend))
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 30)
    return result, load_s
