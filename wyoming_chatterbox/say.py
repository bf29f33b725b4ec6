"""wyoming-chatterbox-say: speak a text through any Wyoming TTS server.

    wyoming-chatterbox-say "Hello there."            # plays on this machine
    echo "Hello." | wyoming-chatterbox-say --output hello.wav

Connects (--uri, default tcp://127.0.0.1:10200), asks the server (Describe)
whether it takes streamed text, sends the text (synthesize-start, -chunk,
-stop if so, else one synthesize) and plays the audio on the local speakers
as it arrives (sounddevice, on its own thread), or writes it to --output as a
WAV. Ctrl+C stops at once: playback is dropped and the connection closed,
which is how a Wyoming server learns to stop generating. A check of a server
without Home Assistant; it needs nothing of this package but `wyoming`.
"""

import argparse
import asyncio
import contextlib
import queue
import signal
import sys
import threading
import wave
from pathlib import Path
from typing import Any, List, Optional

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

DEFAULT_URI = "tcp://127.0.0.1:10200"
CONNECT_TIMEOUT_S = 10.0  # to connect and to get the Describe answer
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl+C


class SayError(Exception):
    """Something the user can fix; the text is one sentence."""


class WavFile:
    """Writes the reply to a WAV file as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wav: Optional[wave.Wave_write] = None

    def start(self, rate: int, width: int, channels: int) -> None:
        try:
            wav = wave.open(str(self.path), "wb")  # pylint: disable=consider-using-with
        except OSError as err:
            raise SayError(f"cannot write {self.path}: {err.strerror}") from None
        wav.setframerate(rate)
        wav.setsampwidth(width)
        wav.setnchannels(channels)
        self._wav = wav

    def write(self, audio: bytes) -> None:
        assert self._wav is not None
        self._wav.writeframes(audio)

    async def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None


class Speakers:
    """Plays the reply on the default output device as it comes: chunks go
    to a thread that feeds PortAudio, so the socket is read meanwhile."""

    def __init__(self, sounddevice: Any) -> None:
        self._sd = sounddevice
        self._stream: Any = None
        self._chunks: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def start(self, rate: int, width: int, channels: int) -> None:
        dtype = {1: "int8", 2: "int16", 4: "int32"}.get(width)
        if dtype is None:
            raise SayError(
                f"the server sent {8 * width}-bit audio, which cannot be played"
            )
        try:
            self._stream = self._sd.RawOutputStream(
                samplerate=rate, channels=channels, dtype=dtype
            )
            self._stream.start()
        except Exception as err:  # PortAudioError: no device, busy, bad rate
            raise SayError(f"cannot play audio: {err}; use --output FILE.wav") from None
        self._thread = threading.Thread(
            target=self._play, name="say-playback", daemon=True
        )
        self._thread.start()

    def _play(self) -> None:
        while True:
            chunk = self._chunks.get()
            if chunk is None:
                return
            try:
                self._stream.write(chunk)
            except Exception:  # pylint: disable=broad-except
                return  # aborted (Ctrl+C) or the device went away

    def write(self, audio: bytes) -> None:
        self._chunks.put(audio)

    async def finish(self) -> None:
        """Wait until everything queued has been played."""
        if self._thread is None:
            return
        self._chunks.put(None)
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self._stream.stop)  # plays out the device buffer

    def close(self) -> None:
        """Stop now, dropping what is not yet played."""
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.abort()
            with contextlib.suppress(Exception):
                self._stream.close()
            self._stream = None
        self._chunks.put(None)


def open_speakers() -> Speakers:
    """The local speakers; SayError when PortAudio or an output is missing."""
    try:
        import sounddevice  # pylint: disable=import-outside-toplevel
    except (ImportError, OSError):
        raise SayError(
            "cannot play audio here: PortAudio is not installed (on Debian or "
            "Ubuntu: sudo apt install libportaudio2); or write a file with "
            "--output reply.wav"
        ) from None
    try:
        sounddevice.query_devices(kind="output")
    except Exception:  # pylint: disable=broad-except
        raise SayError(
            "no audio output device found; write a file with --output reply.wav"
        ) from None
    return Speakers(sounddevice)


async def _connect(uri: str) -> AsyncClient:
    try:
        client = AsyncClient.from_uri(uri)
    except ValueError as err:
        raise SayError(f"--uri {uri}: {err}") from None
    try:
        await asyncio.wait_for(client.connect(), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as err:
        reason = getattr(err, "strerror", None) or "no answer"
        raise SayError(f"cannot connect to {uri}: {reason}") from None
    return client


async def _streams(client: AsyncClient) -> bool:
    """Whether the server's TTS program takes streamed text (Describe)."""
    await client.write_event(Describe().event())

    async def info() -> Info:
        while True:
            event = await client.read_event()
            if event is None:
                raise SayError(
                    "the server closed the connection (is it a Wyoming server?)"
                )
            if Info.is_type(event.type):
                return Info.from_event(event)

    try:
        described = await asyncio.wait_for(info(), CONNECT_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise SayError("the server did not answer Describe") from None
    if not described.tts:
        raise SayError("this Wyoming server has no text-to-speech program")
    return bool(getattr(described.tts[0], "supports_synthesize_streaming", False))


async def say(text: str, uri: str, voice: Optional[str], sink: Any) -> None:
    """Speak `text` through the server at `uri` into `sink` (WavFile or
    Speakers). Cancelling it (Ctrl+C) closes the connection at once."""
    client = await _connect(uri)
    try:
        streaming = await _streams(client)
        wanted = SynthesizeVoice(name=voice) if voice else None
        if streaming:
            await client.write_event(SynthesizeStart(voice=wanted).event())
            await client.write_event(SynthesizeChunk(text=text).event())
            await client.write_event(SynthesizeStop().event())
        else:
            await client.write_event(Synthesize(text=text, voice=wanted).event())
        await _receive(client, sink, streaming)
        await sink.finish()
    finally:
        sink.close()
        with contextlib.suppress(Exception):
            await client.disconnect()


async def _receive(client: AsyncClient, sink: Any, streaming: bool) -> None:
    """Audio into the sink until the reply ends."""
    started = False
    while True:
        event = await client.read_event()
        if event is None:
            raise SayError("the server closed the connection before the audio ended")
        if Error.is_type(event.type):
            raise SayError(f"the server said: {Error.from_event(event).text}")
        if AudioStart.is_type(event.type) and not started:
            start = AudioStart.from_event(event)
            sink.start(start.rate, start.width, start.channels)
            started = True
        elif AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            if not started:
                sink.start(chunk.rate, chunk.width, chunk.channels)
                started = True
            sink.write(chunk.audio)
        elif AudioStop.is_type(event.type) and not streaming:
            return
        elif SynthesizeStopped.is_type(event.type):
            return


async def _run(text: str, args: argparse.Namespace, sink: Any) -> int:
    """say() until done or Ctrl+C (SIGINT cancels it, closing the socket)."""
    task = asyncio.ensure_future(say(text, args.uri, args.voice, sink))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        print("Stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wyoming-chatterbox-say",
        description="Speak a text through a Wyoming text-to-speech server, on this "
        "machine's speakers or into a WAV file.",
    )
    parser.add_argument("text", nargs="*", help="what to say (default: read stdin)")
    parser.add_argument(
        "--uri", default=DEFAULT_URI, help=f"the server (default: {DEFAULT_URI})"
    )
    parser.add_argument("--voice", help="voice name (default: the server's)")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE.wav",
        help="write a WAV file instead of playing",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    text = " ".join(args.text) if args.text else sys.stdin.read()
    if not text.strip():
        print("wyoming-chatterbox-say: nothing to say", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        sink = WavFile(args.output) if args.output else open_speakers()
        sys.exit(asyncio.run(_run(text, args, sink)))
    except SayError as err:
        print(f"wyoming-chatterbox-say: {err}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
