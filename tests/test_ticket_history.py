"""
One customer's long ticket history must not stall anyone else's sale
(issue 16, item 1): the installed C{twistd vendepass} on a loopback port, a
customer with 20,000 tickets asking for them on 20 connections as fast as
the server answers, and another customer's one-step purchases timed
meanwhile.

Loops are bounded in count and time; the figures are asserted as generous
bounds that hold on a slow shared machine, and printed.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineReceiver

from tests.common import ALICE, BOB, MINI
from tests.test_end_to_end import DEADLINE, ServerProcess, ServerTestCase

HISTORY = 20_000
CONNECTIONS = 20
PURCHASES = 100
# How long the purchases may take in all before the test gives up.
BUDGET = 30.0


def _line(opcode: int, data: dict[str, Any] | None = None, request_id: int = 0) -> bytes:
    return json.dumps({"opcode": opcode, "id": request_id, "data": data or {}}).encode() + b"\n"


class HistoryReader(Protocol):
    """
    A customer who logs in and then asks for C{tickets} (as an old client
    does: no limit, no cursor) again the moment each answer ends. Counts
    lines, not parses them: the reader's own cost stays small.
    """

    def __init__(self, logged_in: Deferred[None]) -> None:
        self.logged_in = logged_in
        self.lines = 0
        self.answers: list[tuple[int, float]] = []  # (bytes, seconds)
        self._size = 0
        self._asked = 0.0
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(_line(1, {"username": ALICE[0], "password": ALICE[1]}))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._size += len(data) - start
                return
            self._size += end + 1 - start
            start = end + 1
            self._line_done()

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)

    def _line_done(self) -> None:
        self.lines += 1
        if self.lines == 1:  # the welcome
            self._size = 0
            return
        if self.lines == 2:  # logged in
            self.logged_in.callback(None)
        else:
            self.answers.append((self._size, time.monotonic() - self._asked))
        self._size = 0
        self._asked = time.monotonic()
        self.transport.write(_line(4))  # type: ignore[union-attr]


class Buyer(LineReceiver):
    """
    A customer who sends one request at a time and waits for its answer.
    """

    MAX_LENGTH = 1 << 20
    delimiter = b"\n"

    def __init__(self) -> None:
        self._waiting: Deferred[dict[str, Any]] | None = None
        self._next = 0
        self.welcomed: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        if "event" in message:
            if message["event"] == "welcome":
                self.welcomed.callback(None)
            return
        waiting, self._waiting = self._waiting, None
        assert waiting is not None, message
        waiting.callback(message)

    async def call(self, opcode: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next += 1
        self._waiting = Deferred()
        self.sendLine(_line(opcode, data, self._next).rstrip(b"\n"))
        message = await self._waiting
        assert message["ok"], message
        data = message["data"]
        assert isinstance(data, dict)
        return data


def _p99(samples: list[float]) -> float:
    return sorted(samples)[math.ceil(0.99 * len(samples)) - 1]


class TicketHistoryTests(ServerTestCase):
    timeout = 180

    def prefill(self) -> None:
        """
        Start the server once to create its database, then give alice
        HISTORY bought-and-cancelled tickets directly in it (in one
        transaction, as 20,000 purchases and cancellations would leave them).
        """
        self.start("--fixtures", str(MINI)).kill()
        tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
        now = time.time()
        rows: list[tuple[Any, ...]] = []
        legs: list[tuple[Any, ...]] = []
        codes: set[str] = set()
        while len(codes) < HISTORY:
            codes.add("".join(secrets.choice("ABCDEFGHJKMNPQRSTUVWXYZ23456789") for _ in range(8)))
        for i, code in enumerate(sorted(codes)):
            at = now - HISTORY + i
            rows.append((code, ALICE[0], 59990, "BRL", at, at + 0.5))
            legs.append((code, 0, f"VP200-{tomorrow}", "VP200", "REC", "MAO", f"{tomorrow}T11:00:00-03:00",
                         f"{tomorrow}T15:00:00-04:00", f"{1 + i % 30}{'ABCDEF'[i % 6]}", 59990, at))
        db = sqlite3.connect(str(self.directory / "vendepass.sqlite3"), isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at, cancelled_at)"
                " VALUES (?, ?, 'cancelled', ?, ?, ?, ?)",
                rows,
            )
            db.executemany(
                "INSERT INTO ticket_legs (ticket_id, leg, flight_id, number, origin, destination, departure,"
                " arrival, seat, price_cents, bought_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                legs,
            )
            db.execute("COMMIT")
        finally:
            db.close()

    def disconnect(self, readers: list[HistoryReader], buyer: Buyer) -> Deferred[list[None]]:
        """
        Drop every connection that was made, and wait until each is gone.
        """
        protocols: list[HistoryReader | Buyer] = [*readers, buyer]
        for protocol in protocols:
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        return gatherResults([p.lost for p in protocols if p.transport is not None])

    async def test_history_does_not_stall_sales(self) -> None:
        """
        While alice's 20 connections loop on C{tickets} over her 20,000
        tickets, bob's one-step purchases stay fast (p99 under 50 ms), and
        no answer to alice grows with her history.
        """
        self.prefill()
        server: ServerProcess = self.start()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port, timeout=DEADLINE)

        readers: list[HistoryReader] = []
        logged_in = []
        buyer = Buyer()
        self.addCleanup(self.disconnect, readers, buyer)
        for _ in range(CONNECTIONS):
            d: Deferred[None] = Deferred()
            logged_in.append(d)
            reader = HistoryReader(d)
            readers.append(reader)
            await connectProtocol(endpoint, reader)
        await connectProtocol(endpoint, buyer)
        await buyer.welcomed
        await buyer.call(1, {"username": BOB[0], "password": BOB[1]})
        await gatherResults(logged_in)

        found = await buyer.call(2, {"origin": "REC", "destination": "MAO", "max_legs": 1, "limit": 1})
        [itinerary] = found["itineraries"]
        flights = [leg["flight"] for leg in itinerary["legs"]]

        buys: list[float] = []
        pings: list[float] = []
        stop = time.monotonic() + BUDGET
        while len(buys) < PURCHASES and time.monotonic() < stop:
            started = time.monotonic()
            ticket = (await buyer.call(3, {"flights": flights}))["ticket"]
            buys.append(time.monotonic() - started)
            await buyer.call(5, {"ticket_id": ticket["ticket_id"]})
            started = time.monotonic()
            await buyer.call(0)
            pings.append(time.monotonic() - started)
        answers = [a for reader in readers for a in reader.answers]
        sizes = [size for size, _ in answers]
        times = [seconds for _, seconds in answers]
        figures = (
            f"{len(buys)} purchases: p99 {_p99(buys) * 1000:.1f} ms, max {max(buys) * 1000:.1f} ms;"
            f" ping p99 {_p99(pings) * 1000:.1f} ms;"
            f" {len(answers)} tickets answers: max {max(sizes, default=0):,} bytes,"
            f" median {sorted(times)[len(times) // 2] * 1000 if times else 0:.1f} ms"
        )
        print("\n" + figures)
        self.assertEqual(len(buys), PURCHASES, f"purchases not done in {BUDGET} s: {figures}")
        self.assertLess(_p99(buys), 0.050, figures)
        self.assertGreater(len(answers), CONNECTIONS, figures)
        # A page, whatever the history: 50 tickets of about 450 bytes.
        self.assertLess(max(sizes), 64 * 1024, figures)
