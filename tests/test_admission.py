"""The admission policy on its own: who is let in, who makes room, what is logged.

Connections are fakes with a fake clock; tests/test_lockout.py runs the same
cases against the real server over loopback.
"""

import logging
from dataclasses import dataclass
from typing import List, Optional

import pytest

from wyoming_chatterbox.admission import (
    CLIENT_LIMIT,
    MAX_LOGGED_CLIENTS,
    MIN_IDLE_S,
    SERVER_FULL,
    Admission,
    LogThrottle,
    client_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class Conn:
    client: Optional[str]
    idle_since: float
    producing_audio: bool = False
    evicted_with: Optional[str] = None

    def evict(self, text: str) -> None:
        self.evicted_with = text


def admission(clock: Clock, total: Optional[int] = 4, per_client: Optional[int] = 2):
    policy = Admission(total, per_client, clock=clock)
    seen: List[tuple] = []
    policy.observers.append(lambda what, reason: seen.append((what, reason)))
    return policy, seen


def test_room_lets_a_connection_in() -> None:
    clock = Clock()
    policy, seen = admission(clock)
    decision = policy.decide("10.0.0.1", [Conn("10.0.0.1", 0.0)])
    assert not decision.refused and decision.evict is None and seen == []


def test_a_client_at_its_cap_makes_room_from_its_own_idlest() -> None:
    clock = Clock()
    policy, seen = admission(clock)
    old, new = Conn("10.0.0.1", 900.0), Conn("10.0.0.1", 950.0)
    others = [Conn("10.0.0.2", 100.0)]  # idler, but another client's
    decision = policy.decide("10.0.0.1", [new, old, *others])
    assert decision.evict is old and not decision.refused
    assert decision.reason == CLIENT_LIMIT and "per-client" in decision.text
    assert seen == [("evicted", CLIENT_LIMIT)]


def test_a_client_whose_connections_all_speak_is_refused() -> None:
    clock = Clock()
    policy, seen = admission(clock)
    mine = [Conn("10.0.0.1", 0.0, producing_audio=True) for _ in range(2)]
    decision = policy.decide("10.0.0.1", [*mine, Conn("10.0.0.2", 0.0)])
    assert decision.refused and decision.evict is None
    assert "2 are open" in decision.text
    assert seen == [("refused", CLIENT_LIMIT)]


def test_a_full_server_evicts_from_the_client_holding_most() -> None:
    clock = Clock()
    policy, seen = admission(clock, total=4, per_client=None)
    home_assistant = Conn("10.0.0.9", 100.0)  # the idlest of all
    flood = [Conn("10.0.0.5", 500.0 + i) for i in range(3)]
    decision = policy.decide("10.0.0.2", [home_assistant, *flood])
    assert decision.evict is flood[0]  # the flood's idlest
    assert decision.reason == SERVER_FULL
    assert seen == [("evicted", SERVER_FULL)]


def test_a_full_server_never_evicts_one_producing_audio() -> None:
    clock = Clock()
    policy, seen = admission(clock, total=3, per_client=None)
    speaking = Conn("10.0.0.1", 0.0, producing_audio=True)  # idlest by far
    idle = Conn("10.0.0.2", 500.0)
    decision = policy.decide("10.0.0.3", [speaking, idle, Conn("10.0.0.4", 600.0)])
    assert decision.evict is idle
    everyone_speaks = [Conn(f"10.0.0.{i}", 0.0, True) for i in range(3)]
    refused = policy.decide("10.0.0.3", everyone_speaks)
    assert refused.refused and refused.evict is None
    assert "3 connections are open" in refused.text
    assert seen == [("evicted", SERVER_FULL), ("refused", SERVER_FULL)]


def test_a_connection_just_let_in_is_not_evicted() -> None:
    clock = Clock()
    policy, _ = admission(clock, total=2, per_client=None)
    fresh = [Conn("10.0.0.1", clock.now - MIN_IDLE_S / 2) for _ in range(2)]
    assert policy.decide("10.0.0.2", fresh).refused
    clock.now += MIN_IDLE_S
    assert policy.decide("10.0.0.2", fresh).evict is fresh[0]


def test_without_caps_everyone_is_let_in() -> None:
    policy, _ = admission(Clock(), total=None, per_client=None)
    many = [Conn("10.0.0.1", 0.0) for _ in range(1000)]
    assert policy.decide("10.0.0.1", many).evict is None


def test_refusals_and_evictions_are_logged_once_per_client_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    policy, seen = admission(clock, total=None, per_client=1)
    speaking = [Conn("10.0.0.1", 0.0, True), Conn("10.0.0.2", 0.0, True)]
    caplog.set_level(logging.WARNING, "wyoming_chatterbox.admission")
    for _ in range(100):
        assert policy.decide("10.0.0.1", speaking).refused
        clock.now += 0.5  # 50 s in all
    assert policy.decide("10.0.0.2", speaking).refused  # another client
    assert len(seen) == 101
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "10.0.0.1" in lines[0] and "10.0.0.2" in lines[1]
    assert "at most once a minute" in lines[0]

    clock.now += 10.0  # a minute after the first line
    idle = [Conn("10.0.0.1", 0.0)]
    assert policy.decide("10.0.0.1", idle).evict is idle[0]
    assert len(caplog.records) == 3
    last = caplog.records[-1].getMessage()
    assert "Closed an idle connection of 10.0.0.1" in last
    assert "99 more refused" in last


def test_the_log_throttle_remembers_a_bounded_number_of_clients() -> None:
    clock = Clock()
    throttle = LogThrottle(60.0, clock)
    allowed = sum(
        throttle.allow(f"client {i}", "refused") is not None
        for i in range(MAX_LOGGED_CLIENTS * 3)
    )
    # Past the bound, new clients share one entry: one more line, not 2,048.
    assert allowed == MAX_LOGGED_CLIENTS + 1
    clock.now += 60.0
    assert throttle.allow("client 5", "refused") is not None


@pytest.mark.parametrize(
    "peer, key",
    [
        (("192.168.1.5", 40000), "192.168.1.5"),
        (("2001:db8:1:2:aaaa::1", 4000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::7", 4000, 0, 0), "2001:db8:1:2::/64"),
        (("::ffff:10.0.0.7", 4000, 0, 0), "10.0.0.7"),
        (("fe80::1%eth0", 4000, 0, 2), "fe80::/64"),
        ("", None),  # unix://
        (None, None),  # stdio://
    ],
)
def test_client_key(peer: object, key: Optional[str]) -> None:
    assert client_key(peer) == key
