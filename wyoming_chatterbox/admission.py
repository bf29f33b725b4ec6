"""Who gets a connection: the caps in all and per client, and who makes room.

A new connection is let in while its client (an address; an IPv6 client's /64)
holds fewer than `max_per_client` and the server fewer than `max_connections`.
Otherwise the longest-idle connection that is not producing audio is evicted for
it: one of the newcomer's own when its client is at the cap, else one of the
client holding the most connections. Only when every such connection is sending
audio, or was active within the last MIN_IDLE_S, is the newcomer turned away.
So held, silent or half-open connections cannot shut Home Assistant out, and a
client cannot take more than its share. Refusals and evictions are counted
(observers) and logged at most once per client a minute. Policy only: the
listener (server.py) closes and refuses.
"""

import collections
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

_LOGGER = logging.getLogger(__name__)

# A connection this fresh is never evicted: it has just been let in and not
# yet had time to send its request (Home Assistant sends at once). Without it,
# many clients reconnecting in a loop would evict each newcomer at once.
MIN_IDLE_S = 1.0
LOG_INTERVAL_S = 60.0
# Clients the log throttle remembers; beyond, new ones share one entry.
MAX_LOGGED_CLIENTS = 1024
OTHER_CLIENTS = "other clients"

SERVER_FULL = "server-full"
CLIENT_LIMIT = "client-limit"


class Connection(Protocol):
    """What the policy needs of an open connection (handler.py's handler)."""

    @property
    def client(self) -> Optional[str]:
        """client_key of its peer."""

    @property
    def idle_since(self) -> float:
        """When it last received an event or sent one (time.monotonic)."""

    @property
    def producing_audio(self) -> bool:
        """Whether a reply's audio is being made or sent for it."""

    def evict(self, text: str) -> None:
        """Close it with an error event saying `text`."""


def client_key(peername: Any) -> Optional[str]:
    """The client a connection counts against: its IPv4 address, or the /64 of
    its IPv6 address (one device has a whole /64); None where there is none to
    tell clients apart (unix://, stdio://)."""
    if not isinstance(peername, (tuple, list)) or not peername:
        return None
    try:
        address = ipaddress.ip_address(str(peername[0]).split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class Decision:
    """Let the newcomer in, after evicting `evict` if set; or turn it away
    when `refused`. `text` is for the error event of the one that goes."""

    refused: bool = False
    evict: Optional[Connection] = None
    text: str = ""
    reason: str = ""  # SERVER_FULL or CLIENT_LIMIT when not simply let in


# What the one that goes is told: (evicted, refused) by the cap that applied.
_TEXTS = {
    SERVER_FULL: (
        "The server is full: this connection was idle longest and is closed to "
        "make room for another (--max-connections)",
        "The server is busy: {limit} connections are open, none of them idle "
        "(--max-connections)",
    ),
    CLIENT_LIMIT: (
        "Your address opened more connections than it may hold: its "
        "longest-idle one is closed (--max-connections-per-client)",
        "Too many connections from your address: {limit} are open, none of them "
        "idle (--max-connections-per-client)",
    ),
}


class Admission:
    """The policy above, for one server's connections."""

    def __init__(
        self,
        max_connections: Optional[int],
        max_per_client: Optional[int],
        clock: Callable[[], float] = time.monotonic,
        log_interval: float = LOG_INTERVAL_S,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.clock = clock
        # Called with ("refused" or "evicted", reason) for the metrics.
        self.observers: List[Callable[[str, str], None]] = []
        self._log = LogThrottle(log_interval, clock)

    def decide(self, client: Optional[str], open_: Sequence[Connection]) -> Decision:
        """What to do with a connection from `client`, `open_` being the
        connections open now (not those already closing)."""
        mine = [c for c in open_ if client is not None and c.client == client]
        if self.max_per_client is not None and len(mine) >= self.max_per_client:
            reason, limit, among = CLIENT_LIMIT, self.max_per_client, mine
        elif self.max_connections is not None and len(open_) >= self.max_connections:
            reason, limit, among = SERVER_FULL, self.max_connections, list(open_)
        else:
            return Decision()
        held = collections.Counter(c.client for c in open_)
        victim = self._idlest(among, held)
        evicted, refused = _TEXTS[reason]
        if victim is not None:
            self._note("evicted", reason, victim.client, client)
            return Decision(evict=victim, text=evicted, reason=reason)
        self._note("refused", reason, client, client)
        return Decision(refused=True, text=refused.format(limit=limit), reason=reason)

    def _idlest(
        self, among: Sequence[Connection], held: "collections.Counter[Optional[str]]"
    ) -> Optional[Connection]:
        """Of the connections not producing audio and idle long enough, one of
        the client holding the most, the one idle longest."""
        now = self.clock()
        idle = [
            c
            for c in among
            if not c.producing_audio and now - c.idle_since >= MIN_IDLE_S
        ]
        if not idle:
            return None
        return min(idle, key=lambda c: (-held[c.client], c.idle_since))

    def _note(
        self, what: str, reason: str, whose: Optional[str], newcomer: Optional[str]
    ) -> None:
        for observer in self.observers:
            observer(what, reason)
        key = whose or "local"
        held_back = self._log.allow(key, what)
        if held_back is None:
            return
        limit = "--max-connections-per-client"
        if reason == SERVER_FULL:
            limit = "--max-connections"
        if what == "refused":
            line = f"Refused a connection from {key}: no room ({limit})"
        else:
            line = (
                f"Closed an idle connection of {key} to make room for one from "
                f"{newcomer or 'local'} ({limit})"
            )
        if held_back:
            line += "; since the last such line: " + ", ".join(
                f"{count} more {kind}" for kind, count in sorted(held_back.items())
            )
        _LOGGER.warning("%s (said at most once a minute per client)", line)


class LogThrottle:
    """At most one line per key per interval; counts what it held back."""

    def __init__(
        self, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        # key -> (when its last line was logged, what was held back since)
        self._keys: Dict[str, Tuple[float, "collections.Counter[str]"]] = {}

    def allow(self, key: str, kind: str) -> "Optional[collections.Counter[str]]":
        """None: do not log now (counted as `kind`). Else log, and here is what
        was held back for the key since its last line."""
        now = self.clock()
        if key not in self._keys and len(self._keys) >= MAX_LOGGED_CLIENTS:
            self._forget(now)
            if len(self._keys) >= MAX_LOGGED_CLIENTS:
                key = OTHER_CLIENTS
        entry = self._keys.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1][kind] += 1
            return None
        self._keys[key] = (now, collections.Counter())
        return entry[1] if entry is not None else collections.Counter()

    def _forget(self, now: float) -> None:
        """Drop the keys whose interval is over (their next line is due anyway;
        what they held back is not reported then)."""
        for key, (when, _) in list(self._keys.items()):
            if now - when >= self.interval:
                del self._keys[key]
