"""Zeroconf (mDNS) discovery: Home Assistant finds the server by itself.

`ZeroconfAdvertiser` announces `_wyoming._tcp.local.` once the server listens
and withdraws it on stop; `advertised_address` chooses the one address Home
Assistant will connect to (--zeroconf-host, the bound address, or the best LAN
address, found without sending anything). docs/design.md says how it chooses
and why wyoming's own helper is not used.
"""

import asyncio
import ipaddress
import logging
import socket
import struct
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import List, Optional, Sequence, Tuple, Type, Union

import ifaddr
from zeroconf import DNSQuestionType, InterfaceChoice, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
WILDCARD_HOSTS = ("", "0.0.0.0", "::")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Documentation addresses (never routed): connect() looks up the route to them,
# which is the default route, and sends nothing.
_ROUTE_PROBES = {
    socket.AF_INET: ("198.51.100.1", 9),
    socket.AF_INET6: ("2001:db8::1", 9),
}

# Interfaces that are rarely where Home Assistant is: container and VM bridges,
# VPNs and overlays. Used only to rank, never to exclude.
_VIRTUAL_PREFIXES = (
    "docker",
    "br-",
    "veth",
    "virbr",
    "vnet",
    "vmnet",
    "vboxnet",
    "lxc",
    "lxd",
    "cni",
    "flannel",
    "cali",
    "podman",
    "tun",
    "tap",
    "wg",
    "tailscale",
    "zt",
    "utun",
)

# Linux <linux/sockios.h>, <net/if.h>
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_IFREQ = "16sH14x"

# A DNS label: the instance part of NAME._wyoming._tcp.local.
_MAX_NAME_BYTES = 63


@dataclass(frozen=True)
class InterfaceAddress:
    """One address of one network interface."""

    interface: str
    address: IPAddress
    # None: the platform cannot tell (not Linux), assume it is usable.
    up: Optional[bool] = None


# Long: the address rules in the order docs/design.md gives them.
def advertised_address(bind_host: str, override: Optional[str] = None) -> str:
    """The address Home Assistant should connect to; see the module docstring.

    Raises ValueError for an override that is not a usable IP address, or a bind
    host name that does not resolve.
    """
    if override is not None:
        address = parse_address(override)
        if address.is_loopback:
            _LOGGER.warning(
                "Advertising the loopback address %s: only Home Assistant on this "
                "machine can connect to it",
                address,
            )
        return str(address)

    host = bind_host.strip().strip("[]")
    if host not in WILDCARD_HOSTS:
        address = _resolve_bind_host(host)
        if address.is_loopback:
            _LOGGER.warning(
                "The server listens on %s only: Home Assistant on another machine "
                "cannot connect to it",
                address,
            )
        return str(address)

    # asyncio binds "::" with IPV6_V6ONLY, "0.0.0.0" is IPv4 only, "" is both.
    versions: Tuple[int, ...] = {"0.0.0.0": (4,), "::": (6,)}.get(host, (4, 6))
    candidates = _interface_addresses()
    route: List[IPAddress] = []
    for version in versions:
        found = _default_route_address(
            socket.AF_INET if version == 4 else socket.AF_INET6
        )
        if found is not None:
            route.append(ipaddress.ip_address(found.split("%")[0]))
    # The kernel knows an address that the enumeration missed: still a candidate.
    candidates += [
        InterfaceAddress("", address)
        for address in route
        if all(address != candidate.address for candidate in candidates)
    ]
    chosen = choose_address(candidates, route, versions)
    if chosen is not None:
        _LOGGER.debug(
            "Zeroconf address %s, chosen from %s (default route: %s)",
            chosen,
            ", ".join(f"{c.address}@{c.interface}" for c in candidates) or "none",
            ", ".join(str(address) for address in route) or "none",
        )
        return str(chosen)

    fallback = "127.0.0.1" if 4 in versions else "::1"
    _LOGGER.warning(
        "No network address found to advertise; advertising %s, which only Home "
        "Assistant on this machine can reach. Set --zeroconf-host to the address "
        "Home Assistant should use.",
        fallback,
    )
    return fallback


def parse_address(text: str) -> IPAddress:
    """An IP address that can be advertised; ValueError otherwise."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address (zeroconf advertises addresses, not "
            "host names)"
        ) from None
    if address.is_unspecified or address.is_multicast:
        raise ValueError(f"{text!r} is not an address a client can connect to")
    return address


def choose_address(
    candidates: Sequence[InterfaceAddress],
    route: Sequence[IPAddress] = (),
    versions: Sequence[int] = (4, 6),
) -> Optional[IPAddress]:
    """The best LAN address of `candidates`, or None; pure, for the ranking."""
    usable = [
        (index, candidate)
        for index, candidate in enumerate(candidates)
        if candidate.address.version in versions
        and candidate.up is not False
        and not (
            candidate.address.is_loopback
            or candidate.address.is_link_local
            or candidate.address.is_unspecified
            or candidate.address.is_multicast
        )
    ]
    if not usable:
        return None

    def rank(item: Tuple[int, InterfaceAddress]) -> Tuple[int, bool, bool, bool, int]:
        index, candidate = item
        return (
            versions.index(candidate.address.version),
            candidate.interface.startswith(_VIRTUAL_PREFIXES),
            not candidate.address.is_private,
            candidate.address not in route,
            index,
        )

    return min(usable, key=rank)[1].address


def _resolve_bind_host(host: str) -> IPAddress:
    """A bind host as an address: an IP as is, a name as asyncio would resolve it
    (IPv4 first)."""
    try:
        return parse_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as err:
        raise ValueError(f"cannot resolve the server's host {host!r}: {err}") from err
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    addresses.sort(key=lambda address: address.version)
    return addresses[0]


def _default_route_address(family: socket.AddressFamily) -> Optional[str]:
    """Source address of the default route for `family`; sends nothing."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(_ROUTE_PROBES[family])
            return str(sock.getsockname()[0])
    except OSError:  # no route (no network, or no default gateway)
        return None


def _interface_addresses() -> List[InterfaceAddress]:
    """All addresses of all interfaces, in the system's order."""
    found: List[InterfaceAddress] = []
    for adapter in ifaddr.get_adapters():
        name = str(adapter.name)
        up = _interface_up(name)
        for ip in adapter.ips:
            # IPv6 comes as (address, flowinfo, scope_id).
            text = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                address = ipaddress.ip_address(str(text).split("%")[0])
            except ValueError:
                continue
            found.append(InterfaceAddress(name, address, up))
    return found


def _interface_up(name: str) -> Optional[bool]:
    """Whether an interface is up and running (Linux); None where unknown.

    Asks the kernel with SIOCGIFFLAGS on a socket, not /sys/class/net, so that it
    answers for the network namespace of the calling thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import fcntl  # pylint: disable=import-outside-toplevel

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack(_IFREQ, name.encode()[:15], 0)
            flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
    except (OSError, UnicodeError):
        return None
    return bool(flags & _IFF_UP) and bool(flags & _IFF_RUNNING)


def default_service_name() -> str:
    """``chatterbox-<host name>``: stable across restarts, as Home Assistant's
    unique id for a discovered server includes it."""
    label = socket.gethostname().split(".")[0].strip()
    name = f"chatterbox-{label}" if label else "chatterbox"
    return name.encode()[:_MAX_NAME_BYTES].decode(errors="ignore")


class ZeroconfAdvertiser:
    """Advertises ``NAME._wyoming._tcp.local.`` at one address and port.

    ``start()`` opens the mDNS sockets, listens for services of the same type
    (``listen_s``), probes the name (a name already taken becomes ``NAME-2``,
    ...: ``name`` is then the registered one) and announces it; about 2 s.
    ``stop()`` withdraws it (goodbye packets, so browsers drop it at once) and
    closes the sockets. Also an async context manager.

    ``interfaces``: the interfaces to answer on, as IP addresses of them (or
    indexes); None for all. start() raises OSError when the sockets cannot be
    opened.

    Why listen first: zeroconf's own name probes ask for unicast answers, and
    every mDNS responder on a host binds port 5353 with SO_REUSEPORT, so the
    kernel hands a unicast answer to one of them, often not the one that asked:
    a second server on the same host (say turbo and multilingual side by side)
    then misses the first one's answer half of the time and takes the same name.
    Answers to a multicast query reach every listener, and zeroconf's probe
    finds them in its cache.
    """

    def __init__(
        self,
        name: str,
        port: int,
        address: str,
        interfaces: Optional[list] = None,
        listen_s: float = 1.0,
    ) -> None:
        if not name or "." in name or len(name.encode()) > _MAX_NAME_BYTES:
            raise ValueError(
                f"zeroconf name {name!r} must be 1 to {_MAX_NAME_BYTES} bytes "
                "without dots"
            )
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not a TCP port")
        self.name = name
        self.port = port
        self.address = str(parse_address(address))
        self.interfaces = interfaces
        self.listen_s = listen_s
        self._aiozc: Optional[AsyncZeroconf] = None
        self._info: Optional[AsyncServiceInfo] = None

    @property
    def service_name(self) -> str:
        """``NAME._wyoming._tcp.local.``"""
        return f"{self.name}.{SERVICE_TYPE}"

    @property
    def registered(self) -> bool:
        return self._info is not None

    async def start(self) -> None:
        if self._aiozc is not None:
            raise RuntimeError("zeroconf advertiser already started")
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            addresses=[ipaddress.ip_address(self.address).packed],
            port=self.port,
        )
        try:
            self._aiozc = AsyncZeroconf(
                interfaces=(
                    InterfaceChoice.All if self.interfaces is None else self.interfaces
                )
            )
        except (OSError, RuntimeError) as err:  # RuntimeError: no usable interface
            raise OSError(f"cannot open the mDNS sockets: {err}") from err
        try:
            await self._listen(self._aiozc)
            # Returns after probing the name; the announcements follow.
            announce = await self._aiozc.async_register_service(
                info, allow_name_change=True
            )
            self._info = info
            registered = info.name[: -len(SERVICE_TYPE) - 1]
            if registered != self.name:
                _LOGGER.warning(
                    "Zeroconf name %s is taken on the network; using %s",
                    self.name,
                    registered,
                )
                self.name = registered
            host = f"[{self.address}]" if ":" in self.address else self.address
            _LOGGER.info(
                "Advertising %s at %s:%s via zeroconf", self.name, host, self.port
            )
            await announce
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, aiozc: AsyncZeroconf) -> None:
        """Fill zeroconf's cache with the services of our type already there."""

        def ignore(
            zeroconf: Zeroconf,
            service_type: str,
            name: str,
            state_change: ServiceStateChange,
        ) -> None:
            pass

        if self.listen_s <= 0:
            return
        browser = AsyncServiceBrowser(
            aiozc.zeroconf,
            SERVICE_TYPE,
            handlers=[ignore],
            question_type=DNSQuestionType.QM,
        )
        try:
            await asyncio.sleep(self.listen_s)
        finally:
            await browser.async_cancel()

    async def stop(self) -> None:
        """Withdraw the service and close; does nothing when not started."""
        aiozc, info = self._aiozc, self._info
        self._aiozc = None
        if aiozc is None:
            return
        try:
            if info is not None:
                goodbye = await aiozc.async_unregister_service(info)
                await goodbye
                _LOGGER.info("Withdrew %s from zeroconf", self.name)
        finally:
            self._info = None
            await aiozc.async_close()

    async def __aenter__(self) -> "ZeroconfAdvertiser":
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        await self.stop()
