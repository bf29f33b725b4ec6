"""Reading Wyoming events with caps, and the time a connection may stay idle.

While it waits for an event, `next_event` also keeps the connection's clocks: the
idle timeout, the stream timeout, and an interruption (an eviction).

Every length a client's header announces is checked before anything is read,
nothing larger than the caps is ever buffered, and what is refused raises
ProtocolViolation (its message and code become an `error` event). docs/design.md
says why each cap is what it is.
"""

import asyncio
import contextlib
import json
import re
from typing import Any, Callable, List, Optional, Sequence, cast

from wyoming.event import Event

MAX_HEADER_BYTES = 64 * 1024
MAX_DATA_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024

# Replies queued on one connection (each spoken after the one before). Home
# Assistant sends one per connection; without a bound, a client pipelining
# synthesize events would queue text (and engine work) without end.
MAX_REPLIES_PER_CONNECTION = 16

# After an error the server closes the connection. Closing a socket with unread
# input makes the kernel send a reset, which can destroy the error event on its
# way; so the server first half-closes and drops what still comes, this much.
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 1.0

# An astral character's JSON escape is a surrogate pair: 12 bytes.
_MAX_JSON_BYTES_PER_CHAR = 12

# A \u escape of a surrogate: the only way a lone surrogate (text that cannot be
# UTF-8) gets into a str that json.loads returns from valid UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

_TYPE = "type"
_DATA = "data"
_DATA_LENGTH = "data_length"
_PAYLOAD_LENGTH = "payload_length"


class ProtocolViolation(Exception):
    """What a client sent is not a Wyoming event this server accepts.

    str(err) says what was wrong for a person; `code` is short, for the `error`
    event: "bad-request" (malformed) or "too-large" (over a cap).
    """

    code = "bad-request"

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class IdleTimeout(Exception):
    """No event came for the idle timeout while the connection had nothing to do."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"No event for {seconds:g} seconds while idle: closing the connection"
        )
        self.seconds = seconds


class StreamTimeout(Exception):
    """No event came for the stream timeout while a stream was open."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"No event for {seconds:g} seconds in a stream")
        self.seconds = seconds


def _never() -> bool:
    return False


def data_cap(max_text_chars: Optional[int]) -> int:
    """The extra-data cap that lets a text of `max_text_chars` through."""
    if max_text_chars is None:
        return MAX_DATA_BYTES
    return max(MAX_DATA_BYTES, _MAX_JSON_BYTES_PER_CHAR * max_text_chars + 64 * 1024)


def deadline(seconds: Optional[float]) -> "contextlib.AbstractAsyncContextManager[Any]":
    """asyncio.timeout(seconds): asyncio.TimeoutError once they have passed, in the
    task itself (wait_for runs the awaitable as a task of its own, which can reorder
    writes). Python 3.10 has no asyncio.timeout: there, async_timeout's, which
    asyncio.timeout was made from (without it, no idle timeout would apply)."""
    if seconds is None:
        return contextlib.nullcontext()
    timeout = getattr(asyncio, "timeout", None)
    if timeout is None:  # Python 3.10
        import async_timeout  # pylint: disable=import-outside-toplevel

        timeout = async_timeout.timeout
    return cast("contextlib.AbstractAsyncContextManager[Any]", timeout(seconds))


async def read_event_capped(
    reader: asyncio.StreamReader,
    *,
    max_header: int = MAX_HEADER_BYTES,
    max_data: int = MAX_DATA_BYTES,
    max_payload: int = MAX_PAYLOAD_BYTES,
) -> Optional[Event]:
    """One event, as wyoming's async_read_event reads it; None at end of input.

    A JSON header line (its "data" object, if any, merged with `data_length` bytes
    of extra data, a JSON object) and `payload_length` bytes of payload. Raises
    ProtocolViolation for anything else, and for a header, data or payload over
    its cap: both lengths are checked before either is read, and the header line
    is read in pieces of at most the reader's limit, so no more than the caps is
    ever held. Input that ends in the middle of an event is the end of input.
    """
    line = await _read_line(reader, max_header)
    if line is None:
        return None
    header = _parse_json(line, "header")
    if not isinstance(header, dict):
        raise ProtocolViolation(
            f"The event header must be a JSON object, not {_json_kind(header)}"
        )
    event_type = header.get(_TYPE)
    if not isinstance(event_type, str):
        raise ProtocolViolation('The event header has no "type" string')
    data = header.get(_DATA)
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise ProtocolViolation(
            f'The "data" of a {event_type} event must be a JSON object, '
            f"not {_json_kind(data)}"
        )
    data_length = _length(header, _DATA_LENGTH, max_data)
    payload_length = _length(header, _PAYLOAD_LENGTH, max_payload)

    try:
        if data_length > 0:
            extra = _parse_json(await reader.readexactly(data_length), "data")
            if not isinstance(extra, dict):
                raise ProtocolViolation(
                    f"The data of a {event_type} event must be a JSON object, "
                    f"not {_json_kind(extra)}"
                )
            data.update(extra)
        payload: Optional[bytes] = None
        if payload_length > 0:
            payload = await reader.readexactly(payload_length)
    except asyncio.IncompleteReadError:
        return None  # the client left in the middle of an event
    return Event(type=event_type, data=data, payload=payload)


async def next_event(
    reader: asyncio.StreamReader,
    idle_timeout: Optional[float],
    busy: Callable[[], "Sequence[asyncio.Future[Any]]"],
    *,
    stream_timeout: Optional[float] = None,
    streaming: Callable[[], bool] = _never,
    interrupt: "Optional[asyncio.Future[BaseException]]" = None,
    **caps: int,
) -> Optional[Event]:
    """read_event_capped, but raise IdleTimeout after `idle_timeout` seconds
    without a complete event during which `busy()` (the replies in progress) was
    empty: a client listening to a long reply is silent, and is not idle. Raise
    StreamTimeout after `stream_timeout` seconds without one while `streaming()`
    (a stream is open, busy or not), and the exception `interrupt` is set to as
    soon as it is.
    """
    read = asyncio.ensure_future(read_event_capped(reader, **caps))
    loop = asyncio.get_running_loop()
    called = idle_since = loop.time()
    others: "List[asyncio.Future[Any]]" = [] if interrupt is None else [interrupt]
    try:
        while not read.done():
            if interrupt is not None and interrupt.done():
                raise interrupt.result()
            now = loop.time()
            limits: List[float] = []
            if stream_timeout and streaming():
                limits.append(called + stream_timeout - now)
                if limits[-1] <= 0:
                    raise StreamTimeout(stream_timeout)
            working = [task for task in busy() if not task.done()]
            if idle_timeout and not working:
                limits.append(idle_since + idle_timeout - now)
                if limits[-1] <= 0:
                    raise IdleTimeout(idle_timeout)
            await asyncio.wait(
                [read, *others, *working],
                timeout=min(limits, default=None),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if working:
                idle_since = loop.time()
        return read.result()
    finally:
        if not read.done():
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read


async def linger(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    max_bytes: int = LINGER_BYTES,
    timeout: float = LINGER_SECONDS,
) -> None:
    """Before closing a socket on the client: send end-of-file after what was
    written, and drop what the client still sends (bounded), so that the close does
    not become a reset that loses the last events. Sockets only; never raises."""
    if writer.get_extra_info("socket") is None or writer.is_closing():
        return

    async def drop() -> None:
        left = max_bytes
        while left > 0:
            chunk = await reader.read(min(64 * 1024, left))
            if not chunk:
                return
            left -= len(chunk)

    with contextlib.suppress(Exception):
        if not writer.can_write_eof():
            return
        writer.write_eof()
        await asyncio.wait_for(drop(), timeout)


async def _read_line(reader: asyncio.StreamReader, limit: int) -> Optional[bytes]:
    """A line of at most `limit` bytes (newline not counted); None at end of input.

    readline() cannot be used: over the reader's limit it throws the buffer away
    and raises a ValueError that cannot be told from other ones. readuntil() keeps
    the buffer and says how much of it has no newline; that part is taken, at most
    `limit` in all, and the search goes on. A last line without a newline at end
    of input is returned, as readline() does.
    """
    parts = bytearray()
    while True:
        try:
            chunk = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as err:
            parts += err.partial
            if len(parts) > limit:
                raise _header_too_long(limit) from None
            return bytes(parts) if parts else None
        except asyncio.LimitOverrunError as err:
            if err.consumed <= 0 or len(parts) + err.consumed > limit:
                raise _header_too_long(limit) from None
            parts += await reader.readexactly(err.consumed)
            continue
        if len(parts) + len(chunk) - 1 > limit:
            raise _header_too_long(limit)
        if not parts:
            return chunk
        parts += chunk
        return bytes(parts)


def _header_too_long(limit: int) -> ProtocolViolation:
    return ProtocolViolation(
        f"The event header line is longer than {limit} bytes (or has no newline)",
        "too-large",
    )


def _length(header: "dict[str, Any]", key: str, cap: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolViolation(f"{key} must be a whole number, not {value!r:.40}")
    if value < 0:
        raise ProtocolViolation(f"{key} must not be negative ({value})")
    if value > cap:
        raise ProtocolViolation(
            f"{key} {value} is more than this server accepts ({cap} bytes)",
            "too-large",
        )
    return value


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolViolation(
            f"The event {what} is not valid UTF-8 (byte {err.start})"
        ) from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ProtocolViolation(f"The event {what} is nested too deeply") from None
    except ValueError as err:
        raise ProtocolViolation(f"The event {what} is not valid JSON: {err}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise ProtocolViolation(
            f"The event {what} has a \\u escape of a lone surrogate, which is not "
            "valid UTF-8 text"
        )
    return value


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "an object"
