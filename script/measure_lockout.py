#!/usr/bin/env python3
"""Can held connections lock Home Assistant out? Figures for docs/reliability.md.

Starts the real server (`python -m wyoming_chatterbox`, the random-weight test
checkpoint, CPU, loopback), and for each case has clients on 127.0.1.x hold its
connections in one pattern, and meanwhile, once a second, a newcomer on
127.0.0.2 asks for a Describe and a short one-shot Synthesize. Reports how many
connections the pattern held, what the newcomer got and after how long it was
first served, and how the held connections ended. Extra arguments go to the
server, e.g. the timeouts:

    .venv/bin/python script/measure_lockout.py --deadline 45 -- \
        --idle-timeout 10 --stream-timeout 20
"""

import argparse
import asyncio
import collections
import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Counter, Dict, List, Optional, Tuple

from wyoming.error import Error
from wyoming.event import async_read_event, async_write_event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeStart

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / ".cache" / "test-checkpoint"
NEWCOMER = "127.0.0.2"

# name: (what each connection does, client addresses, connections per address,
# whether a closed or refused connection is opened again at once)
CASES: Dict[str, Tuple[str, int, int, bool]] = {
    "nothing-held": ("nothing", 0, 0, False),  # the baseline
    "silent-streams": ("stream", 8, 8, False),
    "half-open": ("nothing", 8, 8, False),
    "half-streams-half-open": ("mixed", 8, 8, False),
    "one-client-reconnecting": ("stream", 1, 64, True),
    "many-clients-reconnecting": ("stream", 16, 4, True),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Holder:
    """The connections of one pattern, and how each ended."""

    def __init__(self, port: int, kind: str, reconnect: bool) -> None:
        self.port = port
        self.kind = kind
        self.reconnect = reconnect
        self.open = 0
        self.most_open = 0
        self.ends: Counter[str] = collections.Counter()
        self.first_end: Dict[str, float] = {}
        self.started = time.monotonic()

    async def hold(self, address: str, index: int) -> None:
        while True:
            await self._one(address, index)
            if not self.reconnect:
                return
            await asyncio.sleep(0.1)

    async def _one(self, address: str, index: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.port, local_addr=(address, 0)
            )
        except OSError:
            self._ended("connect failed")
            return
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            stream = self.kind == "stream" or (self.kind == "mixed" and index % 2)
            if stream:
                await async_write_event(SynthesizeStart().event(), writer)
            self._ended(await self._until_closed(reader))
        finally:
            self.open -= 1
            writer.close()

    async def _until_closed(self, reader: asyncio.StreamReader) -> str:
        seen: List[str] = []
        try:
            while (event := await async_read_event(reader)) is not None:
                if Error.is_type(event.type):
                    seen.append(f"error {Error.from_event(event).code}")
                elif event.type in ("synthesize-stopped", "audio-stop"):
                    seen.append(event.type)
        except (ConnectionError, asyncio.IncompleteReadError):
            seen.append("reset")
        return ", ".join(seen) or "closed"

    def _ended(self, how: str) -> None:
        self.ends[how] += 1
        self.first_end.setdefault(how, time.monotonic() - self.started)


async def hold(port: int, name: str, deadline: float, stop: Any) -> Dict[str, object]:
    """The held connections of case `name`, until they have all ended, the
    deadline or `stop` is set."""
    kind, addresses, per_address, reconnect = CASES[name]
    holder = Holder(port, kind, reconnect)
    tasks = [
        asyncio.create_task(holder.hold(f"127.0.1.{a + 1}", i))
        for a in range(addresses)
        for i in range(per_address)
    ]
    await asyncio.sleep(1.0)
    held = holder.open
    while tasks and time.monotonic() - holder.started < deadline:
        if stop.is_set():
            break
        _, pending = await asyncio.wait(tasks, timeout=0.2)
        if not pending:
            break
    still = holder.open
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "held after 1 s": held,
        "most held at once": holder.most_open,
        "held connections ended": {
            how: f"{count} (first at {holder.first_end[how]:.1f} s)"
            for how, count in holder.ends.items()
        },
        "still open when the case ended": still,
    }


def hold_in_child(port: int, name: str, deadline: float, pipes: Tuple) -> None:
    """hold(), in a process of its own: a reconnect loop keeps an event loop
    busy, and the newcomer must not wait for it in the same one."""
    stop, done, out = pipes
    result = asyncio.run(hold(port, name, deadline, stop))
    done.set()
    out.put(result)


async def newcomer(port: int) -> Tuple[str, float, float]:
    """('ok' or what the newcomer got instead, seconds to its Info, seconds
    from its Synthesize to the audio-stop)."""
    describe_s = synthesize_s = 0.0
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(NEWCOMER, 0)
        )
    except OSError as err:
        return f"connect failed ({err})", describe_s, synthesize_s
    try:
        await async_write_event(Describe().event(), writer)
        event = await asyncio.wait_for(async_read_event(reader), 5)
        describe_s = time.monotonic() - started
        if event is None or not Info.is_type(event.type):
            return _what(event, "Describe"), describe_s, synthesize_s
        started = time.monotonic()
        await async_write_event(Synthesize(text="Hello there.").event(), writer)
        while True:
            event = await asyncio.wait_for(async_read_event(reader), 120)
            synthesize_s = time.monotonic() - started
            if event is None or Error.is_type(event.type):
                return _what(event, "Synthesize"), describe_s, synthesize_s
            if event.type == "audio-stop":
                return "ok", describe_s, synthesize_s
    except (ConnectionError, asyncio.TimeoutError) as err:
        return f"{type(err).__name__}", describe_s, synthesize_s
    finally:
        writer.close()


def _what(event: Any, request: str) -> str:
    if event is None:
        return f"{request}: closed"
    if Error.is_type(event.type):
        return f"{request}: error {Error.from_event(event).code}"
    return f"{request}: {event.type}"


async def run_case(name: str, port: int, deadline: float) -> Dict[str, object]:
    reconnect = CASES[name][3]
    stop, done, out = (
        multiprocessing.Event(),
        multiprocessing.Event(),
        multiprocessing.Queue(),
    )
    child = multiprocessing.Process(
        target=hold_in_child, args=(port, name, deadline, (stop, done, out))
    )
    started = time.monotonic()
    child.start()
    await asyncio.sleep(1.0)
    tries: Counter[str] = collections.Counter()
    described: Optional[float] = None
    served: Optional[Tuple[float, float, float]] = None
    oks = 0
    while time.monotonic() - started < deadline:
        tried = time.monotonic()
        outcome, describe_s, synthesize_s = await newcomer(port)
        tries[outcome] += 1
        if described is None and (outcome == "ok" or outcome.startswith("Synth")):
            described = tried + describe_s - started
        if outcome == "ok":
            oks += 1
            if served is None:
                served = (time.monotonic() - started, describe_s, synthesize_s)
        if oks and (done.is_set() or (reconnect and oks >= 3)):
            break
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tried)))
    result: Dict[str, object] = {
        "newcomer's Describe first answered after": _after(described, deadline),
        "newcomer's Synthesize first done after": _after(
            served[0] if served else None, deadline
        ),
        "that Describe and Synthesize took": (
            f"{served[1] * 1000:.0f} ms, {served[2]:.1f} s" if served else "-"
        ),
        "newcomer tries": dict(tries),
    }
    stop.set()  # a reconnect loop would go on to the deadline
    result.update(out.get(timeout=deadline + 10))
    child.join()
    return result


def _after(seconds: Optional[float], deadline: float) -> str:
    return f"{seconds:.1f} s" if seconds is not None else f"never in {deadline:g} s"


@contextlib.contextmanager
def server(port: int, extra: List[str], log: Path):  # type: ignore[no-untyped-def]
    command = [
        sys.executable,
        "-m",
        "wyoming_chatterbox",
        "--model-dir",
        str(CHECKPOINT),
        "--device",
        "cpu",
        "--uri",
        f"tcp://127.0.0.1:{port}",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out
        )
    try:
        while "Ready on" not in log.read_text():
            if process.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def warnings_since(log: Path, seen: int) -> Tuple[int, Dict[str, int]]:
    """Lines in the log now, and its WARNING lines after the first `seen`, by
    their first words."""
    lines = log.read_text().splitlines()
    counted = collections.Counter(
        " ".join(line.split()[4:7]) for line in lines[seen:] if " WARNING " in line
    )
    return len(lines), dict(counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--deadline", type=float, default=45.0)
    parser.add_argument("server_args", nargs="*")
    args = parser.parse_args()
    print(f"server args: {args.server_args}")
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    with server(port, args.server_args, log):
        seen, _ = warnings_since(log, 0)
        for name in args.cases:
            print(f"{name} (load average {os.getloadavg()[0]:.2f}):")
            result = asyncio.run(run_case(name, port, args.deadline))
            for key, value in result.items():
                print(f"  {key}: {value}")
            time.sleep(3.0)  # the server notices the closed connections
            seen, warnings = warnings_since(log, seen)
            print(f"  server warnings: {warnings}")
    print(f"server log: {log}")


if __name__ == "__main__":
    main()
