"""
kill -9 durability (reliability plan, T5).

A real C{twistd vendepass} subprocess on a loopback port and a temporary
database with the bundled airline. Each cycle: four client threads, each its
own customer, buy distinct seats as fast as they can with the one-step buy
(opcode 3 with C{flights} and explicit C{seats}); the server is killed with
SIGKILL at a random moment, U(150 ms, 600 ms) after the load started; it is
restarted on the same database and checked:

  - every acknowledged ticket is there for its customer, active, on the same
    flight and seat, as it was acknowledged (over the protocol and in the
    SQLite file);
  - a purchase that got no answer before the kill ("unknown") may or may not
    be there, but nothing else is: no ticket that nobody asked for;
  - no seat is in two active tickets, every active ticket's seats are sold to
    it in C{seats}, C{PRAGMA integrity_check} is ok;
  - every cycle acknowledged at least one purchase (a harness that stops
    buying proves nothing).

The kill times come from C{random.Random(seed)}; the seed is printed, and
C{VENDEPASS_CRASH_SEED} replays it. C{VENDEPASS_CRASH_CYCLES} sets the number
of cycles (default 10; the nightly profile raises it).

Real processes and sockets: every wait has a deadline. The only sleep is the
fault injection itself (the random delay before the kill), not a
synchronisation.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator


from tests.test_end_to_end import DEADLINE, UNCAPPED, Connection, ServerProcess, ServerTestCase

WORKERS = 4
DEFAULT_CYCLES = 10
# Cycles bought by the same customers before new ones take over.
GENERATION = 10
KILL_AFTER = (0.150, 0.600)
PASSWORD = "crash-test-password"
# Flights leaving sooner than this are left out of the seat pool, so none
# departs while a long (nightly) run is buying.
MARGIN = timedelta(hours=6)


class ServerGone(Exception):
    """
    The connection ended before a complete answer arrived.
    """


@dataclass(frozen=True)
class Purchase:
    """
    One one-step buy of one seat: acknowledged (C{ticket} is the answer's
    ticket) or unknown (C{ticket} is C{None}: no complete answer before the kill).
    """

    user: str
    flight: str
    seat: str
    ticket: dict[str, Any] | None = None


class SeatPool:
    """
    Distinct (flight, seat) pairs, never handed out twice, spread across
    flights: consecutive picks are on different flights.
    """

    def __init__(self, layouts: dict[str, list[str]]) -> None:
        self.size = sum(len(seats) for seats in layouts.values())
        self._picks = self._spread(layouts)
        self._lock = threading.Lock()
        self.taken = 0

    @staticmethod
    def _spread(layouts: dict[str, list[str]]) -> Iterator[tuple[str, str]]:
        flights = sorted(layouts)
        deepest = max((len(seats) for seats in layouts.values()), default=0)
        for index in range(deepest):
            for flight in flights:
                seats = layouts[flight]
                if index < len(seats):
                    yield flight, seats[index]

    def take(self) -> tuple[str, str] | None:
        with self._lock:
            pick = next(self._picks, None)
            if pick is not None:
                self.taken += 1
            return pick


def seat_layouts(connection: Connection, margin: timedelta = MARGIN) -> dict[str, list[str]]:
    """
    Every flight of the sales window departing after now + C{margin}, found
    with routes and a one-leg search per route, with its seats (from one
    seat map per aircraft type), front to back.
    """
    network = connection.call(2)
    earliest = datetime.now(timezone.utc) + margin
    aircraft_of: dict[str, str] = {}
    for route in network["routes"]:
        found = connection.call(
            2, {"origin": route["origin"], "destination": route["destination"], "max_legs": 1, "limit": 500}
        )
        for itinerary in found["itineraries"]:
            [leg] = itinerary["legs"]
            if datetime.fromisoformat(leg["departure"]) > earliest:
                aircraft_of[leg["flight"]] = leg["aircraft"]
    seats_of: dict[str, list[str]] = {}
    for flight, plane in sorted(aircraft_of.items()):
        if plane not in seats_of:
            seatmap = connection.call(8, {"flight": flight})
            seats_of[plane] = [s["seat"] for s in seatmap["seats"]]
    return {flight: seats_of[plane] for flight, plane in aircraft_of.items()}


def sign_in(port: int, username: str, register: bool, password: str = PASSWORD) -> Connection:
    """
    A new connection logged in as C{username} (registered first if C{register}).
    """
    connection = Connection(port)
    try:
        if register:
            connection.call(10, {"username": username, "password": password})
        connection.call(1, {"username": username, "password": password})
    except BaseException:
        connection.close()
        raise
    return connection


def sign_in_all(port: int, users: list[str], register: bool) -> dict[str, Connection]:
    """
    One logged-in connection per user, signed in in parallel (each login
    hashes a password on the server); raise the first failure.
    """
    sessions: dict[str, Connection] = {}
    failures: list[BaseException] = []

    def one(username: str) -> None:
        try:
            sessions[username] = sign_in(port, username, register)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=one, args=(username,), daemon=True) for username in users]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + DEADLINE
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if failures or len(sessions) != len(users):
        for connection in sessions.values():
            connection.close()
        raise AssertionError(f"could not sign in {len(users) - len(sessions)} of {users}: {failures[:1]}")
    return sessions


def request(connection: Connection, opcode: int, data: dict[str, Any]) -> dict[str, Any]:
    """
    Send one request and return its response (skipping events); raise
    L{ServerGone} if the connection ends first, with or without a partial line.
    """
    connection.next_id += 1
    try:
        connection.file.write(json.dumps({"opcode": opcode, "id": connection.next_id, "data": data}).encode() + b"\n")
        connection.file.flush()
        while True:
            line = connection.file.readline()
            if not line.endswith(b"\n"):
                raise ServerGone()
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                if message.get("id") != connection.next_id or message.get("opcode") != opcode:
                    raise AssertionError(f"answer {message} to request {connection.next_id} (opcode {opcode})")
                return message
    except OSError as e:
        raise ServerGone() from e


class Buyer(threading.Thread):
    """
    A customer, logged in on C{connection}, buying one seat after another
    with the one-step buy from the moment the barrier opens until the server
    goes away.
    """

    def __init__(self, connection: Connection, username: str, pool: SeatPool, barrier: threading.Barrier) -> None:
        super().__init__(name=f"buyer-{username}", daemon=True)
        self.connection = connection
        self.username = username
        self.pool = pool
        self.barrier = barrier
        self.acknowledged: list[Purchase] = []
        self.unknown: list[Purchase] = []
        self.problems: list[str] = []

    def run(self) -> None:
        try:
            self.barrier.wait(timeout=DEADLINE)
            self._buy()
        except threading.BrokenBarrierError:
            self.problems.append(f"{self.username}: the load never started")
        except BaseException as e:
            self.problems.append(f"{self.username}: {e!r}")
        finally:
            self.connection.close()

    def _buy(self) -> None:
        while True:
            pick = self.pool.take()
            if pick is None:
                self.problems.append(f"the seat pool ran out after {self.pool.taken} seats: the load stopped")
                return
            flight, seat = pick
            try:
                reply = request(self.connection, 3, {"flights": [flight], "seats": [seat]})
            except ServerGone:
                self.unknown.append(Purchase(self.username, flight, seat))
                return
            if not reply.get("ok"):
                # Every seat is asked for once only, on a flight far from
                # departure: a refusal is a bug (or a phantom sale).
                self.problems.append(f"{self.username}: buy {flight} {seat} refused: {reply.get('error')}")
                continue
            ticket = reply["data"]["ticket"]
            legs = [(leg["flight"], leg["seat"]) for leg in ticket["legs"]]
            if legs != [(flight, seat)] or ticket["status"] != "active":
                self.problems.append(f"{self.username}: buy {flight} {seat} acknowledged as {ticket}")
            self.acknowledged.append(Purchase(self.username, flight, seat, ticket))


@dataclass
class Ledger:
    """
    What the clients know: the tickets that must be there (acknowledged,
    or unknown and since seen after a restart), by ticket id.
    """

    durable: dict[str, Purchase] = field(default_factory=dict)
    acknowledged: int = 0
    unknown: int = 0
    unknown_present: int = 0
    checked: int = 0


def check_database(path: Path, ledger: Ledger) -> list[str]:
    """
    Check the SQLite file directly (the server is running on it, idle): its
    integrity, no seat sold twice, and its tickets are exactly the durable
    ones of the ledger (only this test's customers buy).
    """
    problems: list[str] = []
    db = sqlite3.connect(str(path), timeout=DEADLINE)
    try:
        integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            problems.append(f"PRAGMA integrity_check: {integrity[:10]}")
        for row in db.execute("SELECT flight_id, seat, COUNT(*) FROM seats GROUP BY 1, 2 HAVING COUNT(*) > 1"):
            problems.append(f"seat claimed {row[2]} times in seats: {row[0]} {row[1]}")
        for row in db.execute(
            "SELECT l.flight_id, l.seat, COUNT(*) FROM ticket_legs l JOIN tickets t ON t.ticket_id = l.ticket_id"
            " WHERE t.status = 'active' GROUP BY 1, 2 HAVING COUNT(*) > 1"
        ):
            problems.append(f"seat in {row[2]} active tickets: {row[0]} {row[1]}")
        for row in db.execute(
            "SELECT l.ticket_id, l.flight_id, l.seat FROM ticket_legs l JOIN tickets t ON t.ticket_id = l.ticket_id"
            " WHERE t.status = 'active' AND NOT EXISTS (SELECT 1 FROM seats s WHERE s.flight_id = l.flight_id"
            " AND s.seat = l.seat AND s.ticket_id = l.ticket_id)"
        ):
            problems.append(f"active ticket {row[0]}'s seat {row[1]} {row[2]} is not sold to it in seats")
        for row in db.execute(
            "SELECT s.flight_id, s.seat, s.ticket_id FROM seats s LEFT JOIN tickets t ON t.ticket_id = s.ticket_id"
            " WHERE s.ticket_id IS NOT NULL AND (t.ticket_id IS NULL OR t.status != 'active')"
        ):
            problems.append(f"seat {row[0]} {row[1]} sold to a ticket that is not active: {row[2]}")
        for row in db.execute(
            "SELECT t.ticket_id FROM tickets t WHERE NOT EXISTS (SELECT 1 FROM ticket_legs l WHERE l.ticket_id = t.ticket_id)"
        ):
            problems.append(f"ticket {row[0]} has no legs (a torn transaction)")
        stored: dict[str, tuple[str, str, list[tuple[str, str]]]] = {}
        for ticket_id, username, status, flight, seat in db.execute(
            "SELECT t.ticket_id, t.username, t.status, l.flight_id, l.seat FROM tickets t"
            " JOIN ticket_legs l ON l.ticket_id = t.ticket_id ORDER BY t.ticket_id, l.leg"
        ):
            stored.setdefault(ticket_id, (username, status, []))[2].append((flight, seat))
        for ticket_id, purchase in ledger.durable.items():
            row = stored.get(ticket_id)
            if row != (purchase.user, "active", [(purchase.flight, purchase.seat)]):
                problems.append(f"in the database, acknowledged ticket {ticket_id} ({purchase}) is {row}")
        for ticket_id in stored.keys() - ledger.durable.keys():
            problems.append(f"in the database, a ticket nobody bought: {ticket_id} {stored[ticket_id]}")
    finally:
        db.close()
    problems.extend(admin_verify(path))
    return problems


def admin_verify(path: Path) -> list[str]:
    """
    The installed C{vendepass-admin verify}: the audit log replayed against the database.
    """
    script = Path(sys.executable).parent / "vendepass-admin"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from vendepass.admin import run; run()"]
    result = subprocess.run([*command, "verify", "--db", str(path)], capture_output=True, timeout=DEADLINE)
    if result.returncode != 0:
        return [f"vendepass-admin verify exited {result.returncode}: {result.stdout.decode()[-2000:]}"]
    return []


def verify(server: ServerProcess, sessions: dict[str, Connection], ledger: Ledger, unknown: list[Purchase]) -> list[str]:
    """
    After a restart, over the protocol for the customers logged in on
    C{sessions} (listing their tickets) and in the database for everyone:
    every durable ticket is there as acknowledged; an unknown purchase that
    is there joins the durable ones; nothing else is there; no seat is sold
    twice. Returns the problems found.
    """
    problems: list[str] = []
    pending = {(p.user, p.flight, p.seat): p for p in unknown}
    active_seats: dict[tuple[str, str], str] = {}
    for username, connection in sessions.items():
        tickets = connection.every_ticket()
        listed = {t["ticket_id"]: t for t in tickets}
        if len(listed) != len(tickets):
            problems.append(f"{username}: a ticket id is listed twice")
        for ticket_id, purchase in ledger.durable.items():
            if purchase.user != username:
                continue
            ledger.checked += 1
            got = listed.pop(ticket_id, None)
            if got is None:
                problems.append(f"LOST: acknowledged ticket {ticket_id} of {username} ({purchase.flight} {purchase.seat})")
            elif got != purchase.ticket:
                problems.append(f"ticket {ticket_id} of {username} changed: acknowledged {purchase.ticket}, now {got}")
        for ticket_id, ticket in listed.items():
            legs = [(leg["flight"], leg["seat"]) for leg in ticket["legs"]]
            match = pending.pop((username, *legs[0]), None) if len(legs) == 1 else None
            if match is None or ticket["status"] != "active":
                problems.append(f"{username} has a ticket nobody bought (or not as asked): {ticket}")
                continue
            # An unknown purchase that committed: from now on it must stay.
            ledger.durable[ticket_id] = Purchase(username, match.flight, match.seat, ticket)
            ledger.unknown_present += 1
        for ticket in tickets:
            if ticket["status"] == "active":
                for leg in ticket["legs"]:
                    other = active_seats.setdefault((leg["flight"], leg["seat"]), ticket["ticket_id"])
                    if other != ticket["ticket_id"]:
                        problems.append(f"seat {leg['flight']} {leg['seat']} in tickets {other} and {ticket['ticket_id']}")
    problems.extend(check_database(server.directory / "vendepass.sqlite3", ledger))
    return problems


class KillNineTests(ServerTestCase):
    """
    Acknowledged purchases survive kill -9, cycle after cycle.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connections: list[Connection] = []
        self.addCleanup(self._close_connections)

    def _close_connections(self) -> None:
        for connection in self.connections:
            connection.close()

    def sign_in(self, server: ServerProcess, users: list[str], register: bool) -> dict[str, Connection]:
        sessions = sign_in_all(server.port, users, register)
        self.connections.extend(sessions.values())
        return sessions

    def test_acknowledged_purchases_survive_sigkill(self) -> None:
        """
        Over many kill -9 cycles under load, no acknowledged purchase is lost,
        no seat is sold twice and the database stays intact.
        """
        cycles = int(os.environ.get("VENDEPASS_CRASH_CYCLES", DEFAULT_CYCLES))
        self.assertGreaterEqual(cycles, 1, "VENDEPASS_CRASH_CYCLES must be at least 1")
        seed = int(os.environ.get("VENDEPASS_CRASH_SEED") or random.SystemRandom().randrange(2**32))
        rng = random.Random(seed)
        print(f"\n[T5] kill -9 durability: seed {seed} (VENDEPASS_CRASH_SEED={seed} replays it), {cycles} cycles")
        started = time.monotonic()

        server = self.start(*UNCAPPED)
        setup = Connection(server.port)
        try:
            pool = SeatPool(seat_layouts(setup))
        finally:
            setup.close()
        self.assertGreater(pool.size, 10_000, "too few seats to buy from")

        ledger = Ledger()
        everyone: list[str] = []
        sessions: dict[str, Connection] = {}
        for cycle in range(1, cycles + 1):
            delay = rng.uniform(*KILL_AFTER)
            # New customers every GENERATION cycles: listing their tickets
            # after each restart stays cheap however many cycles run. The
            # database check covers everyone's tickets after every restart,
            # and the last restart lists everyone's over the protocol too.
            users = [f"crash_g{(cycle - 1) // GENERATION}_{i}" for i in range(WORKERS)]
            if sorted(sessions) != users:
                for connection in sessions.values():
                    connection.close()
                sessions = self.sign_in(server, users, register=True)
                everyone.extend(users)
            barrier = threading.Barrier(WORKERS + 1)
            buyers = [Buyer(sessions[username], username, pool, barrier) for username in users]
            for buyer in buyers:
                buyer.start()
            try:
                barrier.wait(timeout=DEADLINE)
            except threading.BrokenBarrierError:
                pass
            load_started = time.monotonic()
            if not barrier.broken:
                # The fault injection: the load runs for a random time, then kill -9.
                threading.Event().wait(delay)
            alive = server.process.poll() is None
            killed_after = time.monotonic() - load_started
            server.kill()
            deadline = time.monotonic() + DEADLINE
            for buyer in buyers:
                buyer.join(timeout=max(0.0, deadline - time.monotonic()))
            stuck = [b.name for b in buyers if b.is_alive()]
            problems = [p for b in buyers for p in b.problems]
            if not alive or server.process.returncode != -signal.SIGKILL:
                problems.append(
                    f"the server had exited before the kill (status {server.process.returncode}):\n"
                    + "".join(server.output[-40:])
                )
            if stuck:
                problems.append(f"client threads still running after the kill: {stuck}")
            acknowledged = [p for b in buyers for p in b.acknowledged]
            unknown = [p for b in buyers for p in b.unknown]
            for purchase in acknowledged:
                assert purchase.ticket is not None
                ledger.durable[purchase.ticket["ticket_id"]] = purchase
            ledger.acknowledged += len(acknowledged)
            ledger.unknown += len(unknown)
            if not acknowledged:
                problems.append("no purchase was acknowledged in this cycle: the harness proves nothing")

            server = self.start(*UNCAPPED)
            last = cycle == cycles
            listed = self.sign_in(server, everyone if last else users, register=False)
            problems.extend(verify(server, listed, ledger, unknown))
            sessions = {username: listed[username] for username in users}
            print(
                f"[T5] cycle {cycle}/{cycles}: killed {killed_after * 1000:.0f} ms into the load"
                f" (planned {delay * 1000:.0f} ms), {len(acknowledged)} acknowledged, {len(unknown)} unknown;"
                f" after restart all {len(ledger.durable)} tickets checked in the database,"
                f" {sum(1 for p in ledger.durable.values() if p.user in listed)} over the protocol"
            )
            if problems:
                shown = "\n  ".join(problems[:30])
                more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
                self.fail(f"cycle {cycle} of seed {seed}: {len(problems)} problems:\n  {shown}{more}")

        lost = 0  # a lost ticket has failed the test above
        print(
            f"[T5] summary: {cycles} kill -9 cycles, {ledger.acknowledged} acknowledged purchases checked"
            f" after every restart, lost = {lost}; {ledger.unknown} unknown outcomes,"
            f" {ledger.unknown_present} of them committed; seed {seed}; {time.monotonic() - started:.1f} s"
        )


class WriterProcessKillNineTests(KillNineTests):
    """
    The same, with the batches written by a writer process (C{--sqlite-writer
    process}): killing the server kills its writer too, and what it
    acknowledged is on disk.
    """

    def start(self, *args: str, **kwargs: str) -> ServerProcess:
        return super().start(*args, "--sqlite-writer", "process", **kwargs)
