"""Audio as HTTP answers carry it: PCM pieces in, bytes out, as they come.

`wav_header` starts a WAV of unknown length (the sizes 0xFFFFFFFF, as streaming
players expect); `make_encoder(name)` gives an `Encoder` for one answer:
wav and pcm pass the PCM through, mp3, opus (in Ogg) and flac are encoded by
libsndfile (bundled in the soundfile wheel: no ffmpeg). Each hands on bytes
as soon as the codec has them:
- mp3: constant bitrate frames, which join end to end; the encoder's leading
  Xing/Info frame (a length table, zeros until it is filled in at the end) is
  left out, since it would be sent before the length is known;
- opus: Ogg pages, sent as libsndfile completes them (about one a second);
- flac: frames as they are made, the header's total length and checksum left
  at 0 ("unknown", as the FLAC format allows for streams).
libsndfile has no AAC encoder, so aac is refused (UnsupportedFormat).
"""

from typing import Dict, Optional, Tuple

import numpy as np

from ..audio import CHANNELS, SAMPLE_WIDTH

UNKNOWN_SIZE = 0xFFFFFFFF

# response_format -> (Content-Type, libsndfile format and subtype or None).
FORMATS: Dict[str, Tuple[str, Optional[Tuple[str, str]]]] = {
    "wav": ("audio/wav", None),
    "pcm": ("audio/pcm", None),
    "mp3": ("audio/mpeg", ("MP3", "MPEG_LAYER_III")),
    "opus": ("audio/ogg; codecs=opus", ("OGG", "OPUS")),
    "flac": ("audio/flac", ("FLAC", "PCM_16")),
}
# OpenAI's formats this server cannot make, and why.
UNSUPPORTED = {"aac": "no AAC encoder is available without ffmpeg"}
# MP3: constant bitrate (frames of one size join and seek well); libsndfile's
# compression level 0.5 gives 80 kbit/s at 24 kHz mono, plenty for speech.
MP3_COMPRESSION = 0.5


class UnsupportedFormat(ValueError):
    """A response_format this server cannot make; the text lists those it can."""


def wav_header(rate: int, channels: int = CHANNELS, width: int = SAMPLE_WIDTH) -> bytes:
    """A 44-byte PCM WAV header whose sizes say "unknown" (0xFFFFFFFF)."""
    block = channels * width
    return b"".join(
        (
            b"RIFF",
            UNKNOWN_SIZE.to_bytes(4, "little"),
            b"WAVEfmt ",
            (16).to_bytes(4, "little"),
            (1).to_bytes(2, "little"),  # PCM
            channels.to_bytes(2, "little"),
            rate.to_bytes(4, "little"),
            (rate * block).to_bytes(4, "little"),
            block.to_bytes(2, "little"),
            (8 * width).to_bytes(2, "little"),
            b"data",
            UNKNOWN_SIZE.to_bytes(4, "little"),
        )
    )


class Encoder:
    """PCM (16-bit mono) in, the answer's bytes out; this one passes it on."""

    # encode() costs real CPU time: run it off the event loop.
    slow = False

    def __init__(self, content_type: str, header: bytes = b"") -> None:
        self.content_type = content_type
        self._header = header

    def encode(self, pcm: bytes) -> bytes:
        header, self._header = self._header, b""
        return header + pcm

    def finish(self) -> bytes:
        return self.encode(b"")


class _StreamSink:
    """A file for libsndfile to write into that hands on what is appended.

    Writes over bytes already handed on (a header finished at the end) are
    dropped: those bytes are on their way to the client already.
    """

    def __init__(self) -> None:
        self.pos = 0
        self.size = 0
        self._out = bytearray()

    def write(self, data: bytes) -> int:
        data = bytes(data)
        end = self.pos + len(data)
        if end > self.size:
            new = data[max(0, self.size - self.pos) :]
            self._out += new
            self.size = end
        self.pos = end
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, self.size)[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out


class SoundfileEncoder(Encoder):
    """mp3, opus or flac through libsndfile, written as the PCM comes."""

    slow = True

    def __init__(self, content_type: str, kind: Tuple[str, str], rate: int) -> None:
        import soundfile  # pylint: disable=import-outside-toplevel

        super().__init__(content_type)
        self._sink = _StreamSink()
        extra = {}
        self._mp3 = kind[0] == "MP3"
        if self._mp3:
            extra = {"bitrate_mode": "CONSTANT", "compression_level": MP3_COMPRESSION}
        self._file = soundfile.SoundFile(
            self._sink,
            "w",
            samplerate=rate,
            channels=CHANNELS,
            format=kind[0],
            subtype=kind[1],
            **extra,
        )
        self._held = b""  # mp3: until the first frame is known to be a tag or not
        self._first_frame_done = not self._mp3

    def encode(self, pcm: bytes) -> bytes:
        if pcm:
            self._file.write(np.frombuffer(pcm, dtype="<i2"))
        return self._pass(self._sink.take())

    def finish(self) -> bytes:
        self._file.close()
        return self._pass(self._sink.take(), final=True)

    def _pass(self, data: bytes, final: bool = False) -> bytes:
        """mp3: hold the output until its first frame is whole, and drop that
        frame if it is the Xing/Info tag."""
        if self._first_frame_done:
            return data
        self._held += data
        length = mp3_frame_length(self._held)
        whole = length is not None and len(self._held) >= length
        if not final and not whole and (length is not None or len(self._held) < 4):
            return b""
        self._first_frame_done = True
        held, self._held = self._held, b""
        if whole and length is not None and is_mp3_tag_frame(held[:length]):
            return held[length:]
        return held


def make_encoder(name: str, rate: int) -> Encoder:
    """The encoder for an OpenAI `response_format`; UnsupportedFormat."""
    if name in UNSUPPORTED:
        raise UnsupportedFormat(
            f"response_format {name} is not supported here ({UNSUPPORTED[name]}); "
            f"use one of: {', '.join(FORMATS)}"
        )
    if name not in FORMATS:
        raise UnsupportedFormat(
            f"Unknown response_format {name!r}; use one of: {', '.join(FORMATS)}"
        )
    content_type, kind = FORMATS[name]
    if kind is not None:
        return SoundfileEncoder(content_type, kind, rate)
    return Encoder(content_type, wav_header(rate) if name == "wav" else b"")


# MPEG audio layer III bit rates (kbit/s) by index: MPEG-1, and MPEG-2/2.5.
_MPEG1_L3 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MPEG2_L3 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def mp3_frame_length(data: bytes) -> Optional[int]:
    """Bytes in the layer III frame that `data` starts with; None if it does
    not start with one."""
    if len(data) < 4 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return None
    version = (data[1] >> 3) & 3
    layer = (data[1] >> 1) & 3
    bitrate_index = data[2] >> 4
    rate_index = (data[2] >> 2) & 3
    if layer != 1 or version == 1 or rate_index == 3 or bitrate_index in (0, 15):
        return None
    padding = (data[2] >> 1) & 1
    rate = _RATES[version][rate_index]
    if version == 3:
        return 144000 * _MPEG1_L3[bitrate_index] // rate + padding
    return 72000 * _MPEG2_L3[bitrate_index] // rate + padding


def is_mp3_tag_frame(frame: bytes) -> bool:
    """Whether a frame is a Xing/Info (LAME) tag rather than audio: its
    markers, or the zeros LAME writes in its place until the end."""
    body = frame[4:]
    return b"Xing" in body[:64] or b"Info" in body[:64] or not body.strip(b"\0")
