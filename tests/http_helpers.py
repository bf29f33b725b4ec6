"""The real server with its HTTP side on 127.0.0.1, for API tests.

`serve_http(backend, **settings)` runs run_server in this process (the Wyoming
listener and the HTTP app on one loop, as in production) and yields where
both listen; `sse_events` reads a text/event-stream answer as it comes.
"""

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import aiohttp

from tests.wyoming_client import free_port
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.settings import Settings
from wyoming_chatterbox.speech import SpeechBackend


@dataclass
class HttpServer:
    port: int  # Wyoming
    http_port: int
    backend: Any
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"


def http_settings(**values: Any) -> Settings:
    """The test server's settings: exact fake audio (no loudness, no text
    cleanup) unless asked."""
    defaults: Dict[str, Any] = {
        "default_voice": "default",
        "loudness": None,
        "clean_text": False,
    }
    return Settings.of(**{**defaults, **values})


@contextlib.asynccontextmanager
async def serve_http(
    backend: SpeechBackend, scheme: str = "http", **values: Any
) -> AsyncIterator[HttpServer]:
    port, http_port = free_port(), free_port()
    settings = http_settings(
        uri=f"tcp://127.0.0.1:{port}", http_port=http_port, **values
    )
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(run_server(backend, settings, on_ready=on_ready))
    done, _ = await asyncio.wait(
        [task, asyncio.ensure_future(ready.wait())],
        timeout=30,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if task in done:
        task.result()  # raises why it did not start
    try:
        yield HttpServer(port, http_port, backend, scheme)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def sse_events(
    response: aiohttp.ClientResponse,
) -> AsyncIterator[Tuple[str, Dict[str, Any]]]:
    """(event name, data) per server-sent event, as each arrives."""
    name = "message"
    data: List[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def error_of(body: Dict[str, Any]) -> Dict[str, Any]:
    """The error object of an answer, checked to be in OpenAI's shape."""
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    return error


def session(
    local_addr: Optional[Tuple[str, int]] = None, timeout: float = 30, **kwargs: Any
) -> aiohttp.ClientSession:
    """A client session; `local_addr` binds its sockets (e.g. 127.0.0.2)."""
    options: Dict[str, Any] = {"local_addr": local_addr, "force_close": True}
    if "ssl" in kwargs:
        options["ssl"] = kwargs.pop("ssl")
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(**options),
        timeout=aiohttp.ClientTimeout(total=timeout),
        # Keep cookies from 127.0.0.1 as a browser does (aiohttp's jar would not).
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        **kwargs,
    )
