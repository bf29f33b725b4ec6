"""Load the random-weight checkpoint in an engine, let it unload when idle, and
print the resident memory loaded and unloaded as JSON (a child process of
tests/test_model.py, so that no other test's memory is counted):

    python tests/unload_memory.py CHECKPOINT [--no-trim]

--no-trim leaves out malloc_trim, to show what it is for.
"""

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wyoming_chatterbox import memory  # noqa: E402
from wyoming_chatterbox.chatterbox.turbo import TurboBackend  # noqa: E402
from wyoming_chatterbox.engine import EngineWorker  # noqa: E402
from wyoming_chatterbox.settings import EngineSettings, ModelSettings  # noqa: E402


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def model_bytes(backend: TurboBackend) -> int:
    """Bytes of the loaded model's parameters and buffers."""
    model = backend.model
    total = 0
    for part in (model.t3, model.s3gen, model.ve):
        for tensor in list(part.parameters()) + list(part.buffers()):
            total += tensor.numel() * tensor.element_size()
    return total


async def measure(checkpoint: Path, lines: Lines) -> Dict[str, Any]:
    backend = TurboBackend(
        ModelSettings(
            model_dir=checkpoint, data_dir=checkpoint / "unused", device="cpu"
        )
    )
    engine = EngineWorker(backend, EngineSettings(idle_unload=1.0, loudness=None))
    await engine.start()  # loads and warms up
    result: Dict[str, Any] = {"model_bytes": model_bytes(backend)}
    result["rss_loaded"] = memory.resident_bytes()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the line comes once it is all done
        if any(line.startswith("Model unloaded") for line in lines.lines):
            break
        await asyncio.sleep(0.1)
    result["rss_unloaded"] = memory.resident_bytes()
    await engine.stop()
    return result


def main() -> None:
    if "--no-trim" in sys.argv:
        memory.trim_heap = lambda: False  # type: ignore[assignment]
    lines = Lines()
    logging.getLogger("wyoming_chatterbox").addHandler(lines)
    logging.getLogger("wyoming_chatterbox").setLevel(logging.INFO)
    result = asyncio.run(measure(Path(sys.argv[1]), lines))
    result["log"] = lines.lines
    print(json.dumps(result))


if __name__ == "__main__":
    main()
