"""Zeroconf discovery: the address advertised, and a real mDNS round trip.

mDNS must not leave this machine. The tests that send it (and the one that builds
interfaces) move the test's thread into a network namespace of its own that has
only `lo` (`private_network`: unshare(CLONE_NEWNET), lo up with multicast, and
setns() back afterwards). Namespaces belong to threads, and pytest-asyncio runs
the event loop in this same thread, so the server, the advertiser and the browser
all open their sockets inside the namespace, where no real interface exists.
Creating a namespace needs root (CAP_SYS_ADMIN); without it these tests skip, or
fail where CHATTERBOX_TEST_REQUIRE_NETNS is set.
"""

import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from typing import (
    Any,
    AsyncContextManager,
    AsyncIterator,
    Callable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

import ifaddr
import pytest
from wyoming.info import Describe, Info
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from tests.wyoming_client import Client
from wyoming_chatterbox import discovery
from wyoming_chatterbox.discovery import (
    SERVICE_TYPE,
    InterfaceAddress,
    ZeroconfAdvertiser,
    advertised_address,
    choose_address,
    default_service_name,
)

WAIT = 5.0  # seconds, for every wait on the network
# Set in CI (which runs as root): fail rather than skip without a namespace.
REQUIRE_NETNS = "CHATTERBOX_TEST_REQUIRE_NETNS"
LOOPBACK = ["127.0.0.1"]


# --- a network namespace for this thread ------------------------------------

_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_IFF_UP, _IFF_MULTICAST = 0x1, 0x1000


def _loopback_up() -> None:
    """`ip link set lo up multicast on`, without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        flags |= _IFF_UP | _IFF_MULTICAST
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags))


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def private_network() -> Iterator[None]:
    """This thread in a new network namespace with only `lo`; back after."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    assert threading.current_thread() is threading.main_thread()
    libc = ctypes.CDLL(None, use_errno=True)
    host_netns = _netns_inode()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(_CLONE_NEWNET) != 0:
            reason = (
                f"cannot create a network namespace ({os.strerror(ctypes.get_errno())})"
                ": needs root (CAP_SYS_ADMIN); mDNS must not be sent on real interfaces"
            )
            if os.environ.get(REQUIRE_NETNS):
                pytest.fail(f"{reason} ({REQUIRE_NETNS} is set)")
            pytest.skip(reason)
        try:
            assert _netns_inode() != host_netns
            _loopback_up()
            names = {adapter.name for adapter in ifaddr.get_adapters()}
            assert names == {"lo"}, f"not isolated: {names}"
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the host network")
    finally:
        os.close(home)
    assert _netns_inode() == host_netns


def _ip(*args: str) -> None:
    """Run iproute2 in this thread's namespace (the child inherits it)."""
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=WAIT)


# --- advertised_address: rules -----------------------------------------------


def test_override_wins() -> None:
    assert advertised_address("0.0.0.0", "192.168.1.50") == "192.168.1.50"
    assert advertised_address("10.0.0.5", "192.168.1.50") == "192.168.1.50"
    assert advertised_address("::", "[fd00::50]") == "fd00::50"
    assert advertised_address("0.0.0.0", " 2001:db8::50 ") == "2001:db8::50"


@pytest.mark.parametrize(
    "override", ["nas.local", "0.0.0.0", "::", "[::]", "224.0.0.251", "", "1.2.3"]
)
def test_override_must_be_an_address_to_connect_to(override: str) -> None:
    with pytest.raises(ValueError):
        advertised_address("0.0.0.0", override)


def test_loopback_override_is_kept_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="wyoming_chatterbox.discovery"):
        assert advertised_address("0.0.0.0", "127.0.0.1") == "127.0.0.1"
    assert "only Home Assistant on this machine" in caplog.text


@pytest.mark.parametrize(
    "bind, expected",
    [
        ("192.168.1.5", "192.168.1.5"),
        ("10.20.30.40", "10.20.30.40"),
        ("fd00::5", "fd00::5"),
        ("[fd00::5]", "fd00::5"),
        ("203.0.113.9", "203.0.113.9"),
    ],
)
def test_specific_bind_host_is_advertised(bind: str, expected: str) -> None:
    assert advertised_address(bind) == expected


def test_loopback_bind_is_kept_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="wyoming_chatterbox.discovery"):
        assert advertised_address("127.0.0.1") == "127.0.0.1"
        assert ipaddress.ip_address(advertised_address("localhost")).is_loopback
    assert "listens on 127.0.0.1 only" in caplog.text


def test_unresolvable_bind_host_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot resolve"):
        advertised_address("no-such-host.invalid")


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", ""])
def test_wildcard_bind_never_advertises_the_wildcard(bind: str) -> None:
    """On this machine, whatever its interfaces."""
    address = ipaddress.ip_address(advertised_address(bind))
    assert not address.is_unspecified
    assert not address.is_link_local
    if bind == "0.0.0.0":
        assert address.version == 4
    if bind == "::":
        assert address.version == 6


def test_address_detection_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("advertised_address sent a packet")

    for method in ("send", "sendto", "sendall", "sendmsg"):
        monkeypatch.setattr(socket.socket, method, refuse)
    for bind in ("0.0.0.0", "::", ""):
        advertised_address(bind)


# --- advertised_address: choice among interfaces (faked) ---------------------


def _fake_network(
    monkeypatch: pytest.MonkeyPatch,
    interfaces: Sequence[Tuple[str, str, Optional[bool]]],
    route: Sequence[str] = (),
) -> None:
    found = [
        InterfaceAddress(name, ipaddress.ip_address(text), up)
        for name, text, up in interfaces
    ]

    def default_route(family: socket.AddressFamily) -> Optional[str]:
        version = 4 if family == socket.AF_INET else 6
        matches = [r for r in route if ipaddress.ip_address(r).version == version]
        return matches[0] if matches else None

    monkeypatch.setattr(discovery, "_interface_addresses", lambda: list(found))
    monkeypatch.setattr(discovery, "_default_route_address", default_route)


HOME_SERVER = [
    ("lo", "127.0.0.1", True),
    ("lo", "::1", True),
    ("eth0", "fe80::1c2d:3e4f:5a6b:7c8d", True),
    ("eth0", "2a01:4f8::23", True),
    ("docker0", "172.17.0.1", True),
    ("wlan0", "169.254.10.20", True),
    ("eth0", "192.168.1.23", True),
]


def test_prefers_the_private_lan_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_network(monkeypatch, HOME_SERVER)
    assert advertised_address("0.0.0.0") == "192.168.1.23"
    assert advertised_address("") == "192.168.1.23"


def test_ipv6_only_bind_gets_an_ipv6_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio binds "::" IPv6-only: an IPv4 address could not be connected to."""
    _fake_network(monkeypatch, HOME_SERVER)
    assert advertised_address("::") == "2a01:4f8::23"
    _fake_network(
        monkeypatch, HOME_SERVER + [("eth0", "fd12:3456::23", True)], ["2a01:4f8::23"]
    )
    assert advertised_address("::") == "fd12:3456::23"


def test_skips_interfaces_that_are_down(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_network(
        monkeypatch,
        [("eth0", "192.168.1.23", False), ("wlan0", "10.0.0.8", True)],
        route=["192.168.1.23"],
    )
    assert advertised_address("0.0.0.0") == "10.0.0.8"


def test_container_bridge_only_when_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_network(monkeypatch, [("docker0", "172.17.0.1", None)])
    assert advertised_address("0.0.0.0") == "172.17.0.1"
    _fake_network(
        monkeypatch, [("docker0", "172.17.0.1", None), ("enp3s0", "10.1.2.3", None)]
    )
    assert advertised_address("0.0.0.0") == "10.1.2.3"


def test_private_before_public_then_default_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_network(
        monkeypatch,
        [("eth0", "81.2.69.160", True), ("eth1", "192.168.5.2", True)],
        route=["81.2.69.160"],
    )
    assert advertised_address("0.0.0.0") == "192.168.5.2"
    _fake_network(
        monkeypatch,
        [("eth0", "192.168.1.23", True), ("wlan0", "192.168.2.40", True)],
        route=["192.168.2.40"],
    )
    assert advertised_address("0.0.0.0") == "192.168.2.40"
    _fake_network(monkeypatch, [("eth0", "81.2.69.160", True)])
    assert advertised_address("0.0.0.0") == "81.2.69.160"


def test_default_route_address_counts_even_if_not_enumerated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_network(monkeypatch, [("lo", "127.0.0.1", True)], route=["192.168.7.7"])
    assert advertised_address("0.0.0.0") == "192.168.7.7"


@pytest.mark.parametrize(
    "bind, fallback", [("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "::1")]
)
def test_loopback_only_as_a_last_resort_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    bind: str,
    fallback: str,
) -> None:
    _fake_network(
        monkeypatch,
        [
            ("lo", "127.0.0.1", True),
            ("lo", "::1", True),
            ("eth0", "169.254.3.4", True),
            ("eth0", "fe80::1", True),
            ("eth1", "192.168.1.9", False),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="wyoming_chatterbox.discovery"):
        assert advertised_address(bind) == fallback
    assert "--zeroconf-host" in caplog.text


def test_choose_address_without_candidates() -> None:
    assert choose_address([]) is None


def test_default_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "nas.home.arpa")
    assert default_service_name() == "chatterbox-nas"
    monkeypatch.setattr(socket, "gethostname", lambda: "x" * 100)
    assert len(default_service_name().encode()) == 63
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert default_service_name() == "chatterbox"


@pytest.mark.parametrize(
    "name, port, address",
    [
        ("", 10200, "127.0.0.1"),
        ("a.b", 10200, "127.0.0.1"),
        ("x" * 64, 10200, "127.0.0.1"),
        ("ok", 0, "127.0.0.1"),
        ("ok", 10200, "0.0.0.0"),
        ("ok", 10200, "nas.local"),
    ],
)
def test_advertiser_rejects_bad_arguments(name: str, port: int, address: str) -> None:
    with pytest.raises(ValueError):
        ZeroconfAdvertiser(name, port, address)


async def test_stop_without_start_does_nothing() -> None:
    advertiser = ZeroconfAdvertiser("chatterbox-test", 10200, "127.0.0.1")
    await advertiser.stop()
    await advertiser.stop()
    assert not advertiser.registered


async def test_no_usable_interface_is_an_os_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What zeroconf raises with no interface to listen on (e.g. lo down)."""

    def no_interfaces(**kwargs: object) -> None:
        raise RuntimeError("No interfaces to listen on")

    monkeypatch.setattr(discovery, "AsyncZeroconf", no_interfaces)
    advertiser = ZeroconfAdvertiser("chatterbox-test", 10200, "127.0.0.1")
    with pytest.raises(OSError, match="No interfaces"):
        await advertiser.start()
    assert not advertiser.registered
    await advertiser.stop()


# --- real interfaces, in a namespace -----------------------------------------


def test_real_interfaces_in_a_namespace(private_network: None) -> None:
    """ifaddr, the up-and-running check and the route probe on kernel interfaces:
    a Docker bridge, a Wi-Fi without carrier, then a LAN with the default route
    (veth pairs stand for the cards; both ends stay in the namespace)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    try:
        _ip("link", "add", "docker0", "type", "bridge")
        _ip("link", "add", "wifi0", "type", "veth", "peer", "name", "wifi1")
        _ip("link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot create test interfaces: {err.stderr.decode().strip()}")
    assert advertised_address("0.0.0.0") == "127.0.0.1"  # only lo so far

    _ip("addr", "add", "172.17.0.1/16", "dev", "docker0")
    _ip("link", "set", "docker0", "up")
    _ip("addr", "add", "192.168.9.9/24", "dev", "wifi0")
    _ip("link", "set", "wifi0", "up")  # its peer is down: no carrier
    assert discovery._interface_up("wifi0") is False
    assert discovery._default_route_address(socket.AF_INET) is None
    assert advertised_address("0.0.0.0") == "172.17.0.1"

    _ip("addr", "add", "10.77.0.2/24", "dev", "lan0")
    _ip("link", "set", "lan1", "up")
    _ip("link", "set", "lan0", "up")
    _ip("route", "add", "default", "via", "10.77.0.1")
    assert discovery._interface_up("lan0") is True
    assert discovery._default_route_address(socket.AF_INET) == "10.77.0.2"
    assert advertised_address("0.0.0.0") == "10.77.0.2"
    assert advertised_address("") == "10.77.0.2"


# --- a real mDNS round trip, in a namespace -----------------------------------


class Browser:
    """What Home Assistant does: browse _wyoming._tcp.local., resolve, connect."""

    def __init__(self) -> None:
        self.aiozc = AsyncZeroconf(interfaces=LOOPBACK)
        self.changes: "asyncio.Queue[Tuple[str, ServiceStateChange]]" = asyncio.Queue()
        self.browser = AsyncServiceBrowser(
            self.aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        self.changes.put_nowait((name, state_change))

    async def next(self, state: ServiceStateChange) -> str:
        """The name of the next service that changed to `state`."""

        async def wait() -> str:
            while True:
                name, change = await self.changes.get()
                if change is state:
                    return name

        return await asyncio.wait_for(wait(), WAIT)

    async def resolve(self, name: str) -> Tuple[str, int]:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        assert await info.async_request(self.aiozc.zeroconf, int(WAIT * 1000))
        # Home Assistant's choice: the first address neither link-local nor
        # unspecified.
        hosts = [
            address
            for address in info.ip_addresses_by_version(IPVersion.All)
            if not (address.is_link_local or address.is_unspecified)
        ]
        assert hosts and info.port is not None
        return str(hosts[0]), info.port

    async def close(self) -> None:
        await self.browser.async_cancel()
        await self.aiozc.async_close()


@contextlib.asynccontextmanager
async def browsing() -> AsyncIterator[Browser]:
    browser = Browser()
    try:
        yield browser
    finally:
        await browser.close()


async def describe(host: str, port: int) -> Info:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), WAIT)
    client = Client(reader, writer)
    try:
        await client.send(Describe().event())
        event = await client.read(timeout=WAIT)
    finally:
        await client.close()
    assert event is not None and Info.is_type(event.type)
    return Info.from_event(event)


async def test_home_assistant_finds_describes_and_loses_the_server(
    private_network: None,
    serve: Callable[..., AsyncContextManager[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_chatterbox.discovery")
    async with browsing() as browser, serve() as server:
        address = advertised_address("127.0.0.1")  # what serve() is bound to
        advertiser = ZeroconfAdvertiser(
            # Nobody to listen for (test_a_taken_name_is_changed does).
            "chatterbox-test",
            server.port,
            address,
            interfaces=LOOPBACK,
            listen_s=0,
        )
        async with advertiser:
            assert advertiser.registered
            with pytest.raises(RuntimeError):
                await advertiser.start()
            name = await browser.next(ServiceStateChange.Added)
            assert name == "chatterbox-test._wyoming._tcp.local."
            assert name == advertiser.service_name

            host, port = await browser.resolve(name)
            assert (host, port) == ("127.0.0.1", server.port)
            info = await describe(host, port)
            assert info.tts and info.tts[0].name == "chatterbox"

        # Withdrawn: goodbye packets, so the browser drops it at once.
        assert await browser.next(ServiceStateChange.Removed) == name
        assert not advertiser.registered
        await advertiser.stop()  # twice is fine

    messages = [record.getMessage() for record in caplog.records]
    assert (
        f"Advertising chatterbox-test at 127.0.0.1:{server.port} via zeroconf"
        in messages
    )
    assert "Withdrew chatterbox-test from zeroconf" in messages
    assert sum("Withdrew" in message for message in messages) == 1


async def test_a_taken_name_is_changed(
    private_network: None, caplog: pytest.LogCaptureFixture
) -> None:
    async with browsing() as browser:
        # The first has nobody to listen for.
        first = ZeroconfAdvertiser(
            "chatterbox-twin", 10200, "127.0.0.1", LOOPBACK, listen_s=0
        )
        second = ZeroconfAdvertiser("chatterbox-twin", 10201, "127.0.0.1", LOOPBACK)
        async with first, second:
            assert first.name == "chatterbox-twin"
            assert second.name != first.name
            assert second.name.startswith("chatterbox-twin")
            found: List[str] = [
                await browser.next(ServiceStateChange.Added) for _ in range(2)
            ]
            assert sorted(found) == sorted([first.service_name, second.service_name])
            assert (await browser.resolve(second.service_name))[1] == 10201
    assert (
        f"Zeroconf name chatterbox-twin is taken on the network; using {second.name}"
        in caplog.text
    )


async def test_cancelled_start_leaves_nothing_behind(private_network: None) -> None:
    """A stop signal while start() still listens: no service, sockets closed."""
    async with browsing() as browser:
        advertiser = ZeroconfAdvertiser(
            "chatterbox-test", 10200, "127.0.0.1", LOOPBACK, listen_s=0.5
        )
        starting = asyncio.create_task(advertiser.start())
        await asyncio.sleep(0.2)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(starting, WAIT)
        assert not advertiser.registered
        await advertiser.stop()
        await advertiser.start()  # can start again after a cancelled start
        assert await browser.next(ServiceStateChange.Added) == advertiser.service_name
        await advertiser.stop()


# --- the server's own announcement: --zeroconf ----------------------------------


async def test_server_announces_itself_and_withdraws_on_stop(
    private_network: None,
) -> None:
    from tests.fakes import FakeBackend
    from tests.wyoming_client import free_port
    from wyoming_chatterbox.__main__ import build_parser
    from wyoming_chatterbox.server import make_advertiser, run_server
    from wyoming_chatterbox.settings import Settings

    port = free_port()
    args = build_parser().parse_args(
        ["--uri", f"tcp://127.0.0.1:{port}", "--zeroconf", "kitchen-tts"]
    )
    advertiser = make_advertiser(args)
    assert advertiser is not None and advertiser.name == "kitchen-tts"
    advertiser = ZeroconfAdvertiser(
        "kitchen-tts", port, "127.0.0.1", interfaces=LOOPBACK, listen_s=0
    )
    stop = asyncio.Event()
    async with browsing() as browser:
        task = asyncio.create_task(
            run_server(
                FakeBackend(),
                Settings.of(default_voice="default", uri=f"tcp://127.0.0.1:{port}"),
                stop_signal=stop.wait,
                advertiser=advertiser,
            )
        )
        name = await browser.next(ServiceStateChange.Added)
        assert name == "kitchen-tts._wyoming._tcp.local."
        host, resolved_port = await browser.resolve(name)
        info = await describe(host, resolved_port)
        assert [v.name for v in info.tts[0].voices] == ["default"]

        stop.set()  # what SIGTERM does
        assert await browser.next(ServiceStateChange.Removed) == name
        await asyncio.wait_for(task, WAIT)
    assert not advertiser.registered


@pytest.mark.parametrize(
    "argv, error",
    [
        (["--uri", "unix:///tmp/x.sock", "--zeroconf"], "needs a tcp:// --uri"),
        (["--zeroconf-host", "not-an-ip"], "not-an-ip"),
        (["--zeroconf-host", "0.0.0.0"], "0.0.0.0"),
    ],
)
def test_bad_zeroconf_options_are_refused(argv: List[str], error: str) -> None:
    from wyoming_chatterbox.__main__ import build_parser
    from wyoming_chatterbox.server import make_advertiser

    with pytest.raises(ValueError, match=error):
        make_advertiser(build_parser().parse_args(argv))


def test_zeroconf_options() -> None:
    from wyoming_chatterbox.__main__ import build_parser
    from wyoming_chatterbox.server import make_advertiser

    parse = build_parser().parse_args
    assert make_advertiser(parse([])) is None
    plain = make_advertiser(parse(["--zeroconf", "--uri", "tcp://127.0.0.1:10300"]))
    assert plain is not None
    assert (plain.name, plain.port) == (default_service_name(), 10300)
    host = make_advertiser(parse(["--zeroconf-host", "192.0.2.7"]))
    assert host is not None and (host.address, host.port) == ("192.0.2.7", 10200)
