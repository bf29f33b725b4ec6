"""The server over stdio://, as a subprocess, with the fake backend."""

import asyncio
import sys
from pathlib import Path

from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from tests.fakes import fake_bytes
from tests.wyoming_client import Client

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello from the pipe. It carries events both ways! Does it work? It does."


async def test_stdio_describe_one_shot_and_stream_with_chatty_library() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "tests" / "fake_server.py"),
        "--uri",
        "stdio://",
        "--chatty",  # the backend print()s to stdout, as chatterbox does
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    client = Client(process.stdout, process.stdin)
    try:
        await client.send(Describe().event())
        event = await client.read()
        assert event is not None and Info.is_type(event.type)
        assert Info.from_event(event).tts[0].voices[0].name == "default"

        await client.send(Synthesize(text=TEXT).event())
        reply = await client.read_reply()
        assert reply.compact_types() == ["audio-start", "audio-chunk", "audio-stop"]
        assert len(reply.audio) == fake_bytes(TEXT)

        await client.send(SynthesizeStart().event())
        for i in range(0, len(TEXT), 3):
            await client.send(SynthesizeChunk(text=TEXT[i : i + 3]).event())
        await client.send(Synthesize(text=TEXT).event(), SynthesizeStop().event())
        streamed = await client.read_reply(streaming=True)
        assert streamed.types[-1] == "synthesize-stopped"
        assert len(streamed.audio) == fake_bytes(TEXT)
    finally:
        process.stdin.close()
        await asyncio.wait_for(process.wait(), 10)
    assert process.returncode == 0
    stderr = (await process.stderr.read()).decode()
    # What the library printed went to stderr, not into the event stream.
    assert "S3 Token -> Mel Inference..." in stderr
    assert "noise from C code" in stderr
