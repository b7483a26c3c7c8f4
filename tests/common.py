"""
Shared test harness: a real service on a real SQLite store, driven in memory
with a L{Clock} and an inline executor, and line-oriented test connections.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from vendepass.fixtures import load
from vendepass.passwords import ScryptHasher
from vendepass.protocol import VendePassFactory, VendePassProtocol
from vendepass.service import DEFAULT_SALES_WINDOW_DAYS, ReservationService
from vendepass.store import IExecutor, InlineExecutor
from vendepass.store.sqlite import SQLiteStore

HERE = Path(__file__).resolve().parent
MINI = HERE / "data" / "mini.json"

# Tuesday 1 December 2026, 09:00 UTC (06:00 in Salvador and Recife).
START = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc).timestamp()
TOMORROW = "2026-12-02"

# Real scrypt with cheap parameters, so tests that log in a lot stay fast.
FAST_HASHER = ScryptHasher(n=2**8, r=8, p=1)

# Demo customers of tests/data/mini.json.
ALICE = ("alice", "alice-password")
BOB = ("bob", "bob-password")

# Flights of tests/data/mini.json on TOMORROW.
TINY = f"VP100-{TOMORROW}"  # SSA -> REC, 2 rows x AB = 4 seats
BIG = f"VP200-{TOMORROW}"  # REC -> MAO, A320, 180 seats
# TOMORROW is a Wednesday; VP300 (SSA -> MAO, A320) flies Tue/Thu/Sat only.
DIRECT = "VP300-2026-12-03"
NO_SUCH_DAY = f"VP300-{TOMORROW}"


def make_service(
    path: str = ":memory:",
    fixtures: Path = MINI,
    hold_seconds: float = 60,
    clock: Clock | None = None,
    sales_window_days: int = DEFAULT_SALES_WINDOW_DAYS,
) -> ReservationService:
    """
    A started reservation service on a real SQLite store at C{path}; its
    clock (a L{Clock} starting at L{START}) is C{service.clock}.
    """
    if clock is None:
        clock = Clock()
        clock.advance(START)
    store = SQLiteStore.open(path, clock, InlineExecutor(), lambda: load(fixtures), FAST_HASHER.hash)
    service = ReservationService(
        store, clock, FAST_HASHER, InlineExecutor(), hold_seconds=hold_seconds, sales_window_days=sales_window_days
    )
    service.startService()
    return service


class LineClient:
    """
    One connection to a L{VendePassProtocol} over a L{StringTransport}.
    """

    def __init__(self, service: ReservationService) -> None:
        self.factory = VendePassFactory(service, service.clock)
        self.protocol: VendePassProtocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self._pending = b""
        self.received: list[dict[str, Any]] = []
        self.next_id = 0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """
        Deliver raw bytes to the server; return the messages it wrote since the last call.
        """
        self.protocol.dataReceived(data)
        return self.messages()

    def messages(self) -> list[dict[str, Any]]:
        self._pending += self.transport.value()
        self.transport.clear()
        *lines, self._pending = self._pending.split(b"\n")
        messages = [json.loads(line) for line in lines]
        self.received.extend(messages)
        return messages

    def request(self, opcode: int, data: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """
        Send one request and return its response (which must come at once:
        the store runs inline).
        """
        self.next_id += 1
        message: dict[str, Any] = {"opcode": opcode, "id": self.next_id, **extra}
        if data is not None:
            message["data"] = data
        replies = [m for m in self.feed(json.dumps(message).encode() + b"\n") if "event" not in m]
        assert len(replies) == 1, replies
        assert replies[0]["id"] == self.next_id, replies
        return replies[0]

    def ok(self, opcode: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.request(opcode, data)
        assert reply["ok"], reply
        return reply["data"]

    def error(self, opcode: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.request(opcode, data)
        assert not reply["ok"], reply
        return reply["error"]

    def login(self, user: tuple[str, str] = ALICE) -> None:
        self.ok(1, {"username": user[0], "password": user[1]})

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        self.messages()
        return [m for m in self.received if "event" in m and (name is None or m["event"] == name)]

    def disconnect(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.loseConnection()
        self.protocol.connectionLost(Failure(ConnectionDone()))


def brl(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "BRL"}


# The flights above as the wire shows them (docs/protocol.md, "Flight").
FLIGHTS: dict[str, dict[str, Any]] = {
    TINY: {
        "flight": TINY,
        "number": "VP100",
        "origin": "SSA",
        "destination": "REC",
        "departure": "2026-12-02T08:00:00-03:00",
        "arrival": "2026-12-02T09:15:00-03:00",
        "aircraft": "TINY",
        "price": brl("250.00"),
    },
    BIG: {
        "flight": BIG,
        "number": "VP200",
        "origin": "REC",
        "destination": "MAO",
        "departure": "2026-12-02T11:00:00-03:00",
        "arrival": "2026-12-02T14:00:00-04:00",
        "aircraft": "A320",
        "price": brl("599.90"),
    },
    DIRECT: {
        "flight": DIRECT,
        "number": "VP300",
        "origin": "SSA",
        "destination": "MAO",
        "departure": "2026-12-03T14:00:00-03:00",
        "arrival": "2026-12-03T16:30:00-04:00",
        "aircraft": "A320",
        "price": brl("749.50"),
    },
}


@implementer(IExecutor)
class QueueExecutor:
    """
    Runs nothing until the test says so: C{run_next} runs the oldest job.
    """

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def submit(self, job: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((job, d))
        return d

    def run_next(self) -> None:
        job, d = self.jobs.pop(0)
        try:
            result = job()
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass
