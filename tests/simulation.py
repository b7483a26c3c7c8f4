"""
A deterministic simulation of many customers against the real VendePass
server (protocol, service and SQLite store), in the spirit of FoundationDB's
simulator and TigerBeetle's VOPR.

Everything is in memory and single-threaded: connections are
L{twisted.test.iosim} transport pairs pumped explicitly, time is a
L{Clock}, and the store runs its transactions on a L{ManualExecutor} that
only queues them, so the simulation decides which transaction commits next
and when its caller hears of it. A Hypothesis L{RuleBasedStateMachine}
(L{Simulation}) chooses every step: K customer connections send requests
(hold, buy in one step, buy a hold, release, cancel, with a C{request_id}
sometimes; tickets; seat map; garbage), the network is pumped, a queued job
commits, the clock moves, connections drop and come back (and log in again).

After every step a checker compares what the clients were told with the
database and a model of those answers:

 - no seat is held or sold twice (among the claims the clients may rely on,
   and in the database itself);
 - every acknowledged purchase is in the database with its seats, unless its
   owner has asked to cancel it (answered or not);
 - a live hold (acknowledged, unexpired, neither released nor bought, its
   connection open) is still in the database with its seats: never stolen;
 - no hold commits for a connection the server already saw close, and once
   every queued job has run, no hold of a closed connection is left;
 - no reply is an C{internal_error} (or another code a client must not
   see), every request gets exactly one reply, in order, and nothing is
   logged as a failure;
 - replies that list tickets or seats agree with what was acknowledged
   before the request was sent.

The run keeps a hash of everything that happened (steps, the messages the
clients got with ids renamed in order of creation, commits, the seats
table), so the same seed must give the same hash (plan T17).

L{MUTANTS} are known bugs that exist only here (subclasses of the real
store), to prove the checker catches them (plan T18).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections import Counter, deque
from datetime import datetime
from typing import Any, Callable, ClassVar, Iterable, TypeVar

from attrs import define, field, frozen
from hypothesis import currently_in_test_context, event, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from tests.common import ALICE, BIG, BOB, FAST_HASHER, MINI, START, TINY
from vendepass import errors
from vendepass.errors import AlreadyCancelled, FlightDeparted, SeatUnavailable, SoldOut, TicketNotFound
from vendepass.fixtures import load
from vendepass.model import Flight, Hold, Ticket
from vendepass.protocol import VendePassFactory, VendePassProtocol
from vendepass.service import ReservationService
from vendepass.store import IExecutor, InlineExecutor, LegRequest
from vendepass.store.common import booking_code
from vendepass.store.sqlite import SQLiteStore
from vendepass.store.memory import SeatMemory
from vendepass.store.transactions import SeatRules, Tx

T = TypeVar("T")

# Short holds (the service default is 300 s), so they expire within an example.
HOLD_SECONDS = 30

# K customer connections, one per slot, each always logged in as its slot's
# customer: two connections per customer, so customers race each other and
# a customer's connections share holds and tickets.
USERS: dict[str, str] = dict([ALICE, BOB])
SLOT_USERS: tuple[str, ...] = ("alice", "bob", "alice", "bob")
K = len(SLOT_USERS)

# Itineraries the customers ask for: TINY alone (4 seats), or TINY then BIG.
ITINERARIES: dict[str, tuple[str, ...]] = {"TINY": (TINY,), "TINY+BIG": (TINY, BIG)}
# The contended seats of TINY: each example draws M in 2..3 and customers
# choose among TINY's first M seats (or None: the first free seat).
TINY_SEATS = ("1A", "1B", "2A")
BIG_SEATS: tuple[str | None, ...] = ("1A", None)

LOGIN, BUY, TICKETS, CANCEL, HOLD, RELEASE, SEATMAP = 1, 3, 4, 5, 6, 7, 8


def _codes() -> set[str]:
    found: set[str] = set()
    todo: list[type[errors.VendePassError]] = [errors.VendePassError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo.extend(cls.__subclasses__())
    return found


# Codes a client may see. internal_error is a bug; session_closed must never
# reach a client; no storage fault is injected here, so storage_unavailable
# would be a bug too.
KNOWN_CODES = _codes() - {"internal_error", "session_closed", "storage_unavailable"}

# Coverage of the whole test run (module level, so a test can run the
# machine and then read what it exercised).
COUNTS: Counter[str] = Counter()
# Per-example flags counted by the coverage gate (plan T3).
FLAGS = (
    "bought",
    "seat_unavailable",
    "expiry",
    "disconnect released a live hold",
)

# When not None, each example appends (log hash, actions) here (plan T17).
RECORDING: list[tuple[str, int, list[Action]]] | None = None
# The first violation of a run: (examples finished before it, its step, its message).
FIRST_VIOLATION: list[tuple[int, int, str]] = []


class Violation(AssertionError):
    """
    What the clients saw contradicts the database or the model.
    """


# -- the executor --------------------------------------------------------------


@define(eq=False)
class QueuedJob:
    number: int
    job: Callable[[], Any]
    deferred: Deferred[Any]


@define(eq=False)
class Outcome:
    job: QueuedJob
    result: Any
    failure: Failure | None


@implementer(IExecutor)
class ManualExecutor:
    """
    An executor that runs nothing by itself. Submitted jobs (each one
    database transaction) wait in C{queue}; L{run} runs the one the test
    chooses, which commits (or fails) at once; its outcome then waits in
    C{done} until L{deliver} fires the submitter's Deferred, in commit order
    (as a single database thread hands results back to the reactor).
    """

    def __init__(self) -> None:
        self.queue: list[QueuedJob] = []
        self.done: deque[Outcome] = deque()
        self.submitted = 0
        self.ran = 0
        # Called after each job, before its outcome is delivered.
        self.after_run: Callable[[QueuedJob, Outcome], None] | None = None
        self._capturing: list[Callable[[], Any]] | None = None

    def submit(self, job: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        if self._capturing is not None:
            self._capturing.append(job)
            return d
        self.submitted += 1
        self.queue.append(QueuedJob(self.submitted, job, d))
        return d

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def capture(self, submit: Callable[[], object]) -> Callable[[], Any]:
        """
        Call C{submit}, which must submit exactly one job, and return that
        job instead of queueing it (for mutants that run a job their own way).
        """
        self._capturing = []
        try:
            submit()
        finally:
            captured, self._capturing = self._capturing, None
        [job] = captured
        return job

    @property
    def idle(self) -> bool:
        return not self.queue and not self.done

    def run(self, index: int) -> QueuedJob:
        """
        Run queued job C{index}: its transaction commits (or fails) now.
        """
        queued = self.queue.pop(index)
        outcome: Outcome
        try:
            outcome = Outcome(queued, queued.job(), None)
        except BaseException:
            outcome = Outcome(queued, None, Failure())
        self.ran += 1
        self.done.append(outcome)
        if self.after_run is not None:
            self.after_run(queued, outcome)
        return queued

    def deliver(self) -> bool:
        """
        Hand the oldest undelivered outcome to its submitter; whether there was one.
        """
        if not self.done:
            return False
        outcome = self.done.popleft()
        if outcome.failure is not None:
            outcome.job.deferred.errback(outcome.failure)
        else:
            outcome.job.deferred.callback(outcome.result)
        return True


# -- mutants (plan T18): known bugs, only ever switched on by tests -------------


class MutantStore(SQLiteStore):
    manual: ManualExecutor


class TrustingRules(SeatRules):
    """
    Mutant 1's rules: a claim trusts the seats it is given (checked in an
    earlier transaction) and takes them with an upsert.
    """

    def claim(self, tx: Tx, legs: list[LegRequest]) -> list[str]:
        for leg in legs:
            assert leg.seat is not None
            self.end_expired_on(tx, [leg.flight.flight_id])
        return [leg.seat for leg in legs if leg.seat is not None]

    def take(self, tx: Tx, legs: list[LegRequest], seats: list[str], *claimant: Any) -> None:
        hold_id, ticket_id = claimant[:2]
        # Its rows refer to the hold's, which the store may have kept.
        tx.appended()
        tx.executemany(
            "INSERT OR REPLACE INTO seats (flight_id, seat, hold_id, ticket_id) VALUES (?, ?, ?, ?)",
            [(leg.flight.flight_id, seat, hold_id, ticket_id) for leg, seat in zip(legs, seats)],
        )


class CheckThenActStore(MutantStore):
    """
    Mutant 1: a hold or a purchase checks that its seats are free in one
    transaction and claims them in another, trusting the check (an upsert).
    """

    rules_class = TrustingRules

    def _pick(self, tx: Tx, legs: list[LegRequest]) -> list[str]:
        now = tx.now
        seats = []
        for leg in legs:
            flight = leg.flight
            if flight.departs_ts <= now:
                raise FlightDeparted(flight=flight.flight_id)
            taken = {
                seat
                for seat, ticket_id, expires_at in tx.execute(
                    "SELECT s.seat, s.ticket_id, h.expires_at FROM seats s LEFT JOIN holds h ON h.hold_id = s.hold_id"
                    " WHERE s.flight_id = ?",
                    (flight.flight_id,),
                )
                if ticket_id is not None or expires_at > now
            }
            if leg.seat is None:
                seat = next((s for s in flight.aircraft.seats() if s not in taken), None)
                if seat is None:
                    raise SoldOut(flight=flight.flight_id)
            elif leg.seat in taken:
                raise SeatUnavailable(flight=flight.flight_id, seat=leg.seat)
            else:
                seat = leg.seat
            seats.append(seat)
        return seats

    def _checked(self, legs: list[LegRequest], act: Callable[[list[LegRequest]], Deferred[T]]) -> Deferred[T]:
        def then(seats: list[str]) -> Deferred[T]:
            return act([LegRequest(leg.flight, seat) for leg, seat in zip(legs, seats)])

        checked: Deferred[list[str]] = self._read(lambda tx: self._pick(tx, legs))
        return checked.addCallback(then)

    def hold(
        self,
        username: str,
        session_id: str,
        legs: list[LegRequest],
        seconds: float,
        alive: Callable[[], bool],
        request_id: str | None = None,
    ) -> Deferred[Hold]:
        return self._checked(
            legs, lambda chosen: SQLiteStore.hold(self, username, session_id, chosen, seconds, alive, request_id)
        )

    def buy(self, username: str, legs: list[LegRequest], request_id: str | None = None) -> Deferred[Ticket]:
        return self._checked(legs, lambda chosen: SQLiteStore.buy(self, username, chosen, request_id))


class ForcedTicketRules(SeatRules):
    """
    Mutant 2's rules: a purchase takes the booking code it is told to, if any.
    """

    forced_ticket: str | None = None

    def new_ticket(self, tx: Tx, username: str, flights: list[Flight]) -> str:
        if self.forced_ticket is None:
            return super().new_ticket(tx, username, flights)
        tx.execute(
            "INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)"
            " VALUES (?, ?, 'active', ?, ?, ?)",
            (self.forced_ticket, username, sum(f.fare.cents for f in flights), self.currency, tx.now),
        )
        return self.forced_ticket


class AckBeforeCommitStore(MutantStore):
    """
    Mutant 2: a purchase is answered before it commits. A first job works
    the purchase out on a copy of the database and answers with it; the
    commit is queued as a second job, which may run late or fail.
    """

    rules_class = ForcedTicketRules
    rules: ForcedTicketRules

    def _answer_first(self, submit: Callable[[], object]) -> Deferred[Ticket]:
        job = self.manual.capture(submit)
        ticket_id = booking_code()

        def run() -> Ticket:
            self.rules.forced_ticket = ticket_id
            try:
                result: Ticket = job()
                return result
            finally:
                self.rules.forced_ticket = None

        def predict() -> Ticket:
            real = self._db
            scratch = sqlite3.connect(":memory:", isolation_level=None)
            real.backup(scratch)
            self._db = scratch
            try:
                return run()
            finally:
                self._db = real
                scratch.close()

        def commit_later(ticket: Ticket) -> Ticket:
            self.manual.submit(run).addErrback(lambda f: None)
            return ticket

        answer: Deferred[Ticket] = self.manual.submit(predict)
        return answer.addCallback(commit_later)

    def buy(self, username: str, legs: list[LegRequest], request_id: str | None = None) -> Deferred[Ticket]:
        return self._answer_first(lambda: SQLiteStore.buy(self, username, legs, request_id))

    def buy_hold(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        return self._answer_first(lambda: SQLiteStore.buy_hold(self, hold_id, username, request_id))


class OwnerBlindRules(SeatRules):
    """
    Mutant 3's rules: cancel finds the ticket by its id alone.
    """

    def cancel(self, tx: Tx, ticket_id: str, username: str, request_id: str | None = None) -> Ticket:
        row = tx.one("SELECT status FROM tickets WHERE ticket_id = ?", (ticket_id,))
        if row is None:
            raise TicketNotFound(ticket_id=ticket_id)
        if row[0] == "cancelled":
            raise AlreadyCancelled(ticket_id=ticket_id)
        tx.execute("UPDATE tickets SET status = 'cancelled', cancelled_at = ? WHERE ticket_id = ?", (tx.now, ticket_id))
        tx.execute("DELETE FROM seats WHERE ticket_id = ?", (ticket_id,))
        [ticket] = self.find_tickets(tx, "t.ticket_id = ?", (ticket_id,))
        return ticket


class CancelAnyTicketStore(MutantStore):
    """
    Mutant 3: cancel finds the ticket by its id alone (C{UPDATE ... WHERE
    ticket_id = ?}, no owner check).
    """

    rules_class = OwnerBlindRules


class HoldIgnoresCloseStore(MutantStore):
    """
    Mutant 4: a hold does not look, inside its transaction, whether its
    connection closed while it waited; the release made on disconnect can
    overtake it.
    """

    def hold(
        self,
        username: str,
        session_id: str,
        legs: list[LegRequest],
        seconds: float,
        alive: Callable[[], bool],
        request_id: str | None = None,
    ) -> Deferred[Hold]:
        return super().hold(username, session_id, legs, seconds, lambda: True, request_id)


class FreesUnseenMemory(SeatMemory):
    """
    Mutant 5's copy of the seats: it misses seats coming free.
    """

    def _freed_row(self, flight_id: str, seat: str) -> None:
        pass


class MemoryMissesFreesStore(MutantStore):
    """
    Mutant 5: the writer's seats in memory do not follow a seat that
    comes free (a release, an expiry, a cancellation), so claims pass over
    free seats.
    """

    seats_class = FreesUnseenMemory


MUTANTS: dict[str, type[MutantStore]] = {
    "check_then_act": CheckThenActStore,
    "ack_before_commit": AckBeforeCommitStore,
    "cancel_without_owner": CancelAnyTicketStore,
    "hold_ignores_close": HoldIgnoresCloseStore,
    "memory_misses_frees": MemoryMissesFreesStore,
}


@implementer(ILogObserver)
class FailureLog:
    """
    Collects the failures the server logs (each one is a bug here).
    """

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, log_event: LogEvent) -> None:
        failure = log_event.get("log_failure")
        if failure is not None:
            self.failures.append(f"{log_event.get('log_format')}: {failure.getErrorMessage()}")


# -- the clients ------------------------------------------------------------------


class SimClient(LineReceiver):
    """
    A JSON-lines customer connection: hands every line it receives to the
    simulation.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, received: Callable[[bytes], None]) -> None:
        self.received = received
        self.lost = False

    def lineReceived(self, line: bytes) -> None:
        self.received(line)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True

    def write(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + b"\n")


@define(eq=False)
class HoldModel:
    """
    A hold as the clients know it.
    """

    hold_id: str
    user: str
    conn: Conn
    seats: tuple[tuple[str, str], ...]
    expires_at: float
    # Something may have ended it: its user asked to buy or release it, it
    # was announced expired, or it was answered to a retry on another
    # connection than the one that made it.
    doubtful: bool = False

    def live(self, now: float) -> bool:
        return not self.doubtful and not self.conn.closing and now < self.expires_at


@define(eq=False)
class TicketModel:
    """
    A ticket as the clients know it.
    """

    ticket_id: str
    user: str
    seats: tuple[tuple[str, str], ...]
    # Its owner asked to cancel it (answered or not).
    cancel_sent: bool = False

    def standing(self) -> bool:
        return not self.cancel_sent


@define(eq=False)
class Sent:
    """
    A request a client sent, waiting for its reply.
    """

    kind: str
    id: int | None
    step: int
    request_id: str | None = None
    seats: tuple[str | None, ...] = ()
    hold: HoldModel | None = None
    # For tickets and seatmap: what was acknowledged before it was sent.
    tickets_before: tuple[TicketModel, ...] = ()
    holds_before: tuple[HoldModel, ...] = ()


@define(eq=False)
class Conn:
    """
    One customer connection (a slot has a new one after each reconnect).
    """

    number: int
    slot: int
    user: str
    client: SimClient
    server: VendePassProtocol
    client_io: FakeTransport
    server_io: FakeTransport
    pump: IOPump
    session_id: str
    pending: deque[Sent] = field(factory=deque)
    next_id: int = 0
    # The client hung up (its holds may be released any time now).
    closing: bool = False

    @property
    def server_closed(self) -> bool:
        """
        Whether the server saw this connection close (iosim calls the
        server's connectionLost when it marks the client side disconnected).
        """
        return bool(self.client_io.disconnected)


# -- the steps --------------------------------------------------------------------


class Action:
    """
    One step of the simulation.
    """

    def run(self, sim: Simulation) -> None:
        raise NotImplementedError()


@frozen
class HoldSeats(Action):
    client: int
    itinerary: str
    seats: tuple[str | None, ...]
    request_id: str | None = None

    def run(self, sim: Simulation) -> None:
        sim.send_claim(self.client, "hold", self.itinerary, self.seats, self.request_id)


@frozen
class BuySeats(Action):
    """
    Buy in one step.
    """

    client: int
    itinerary: str
    seats: tuple[str | None, ...]
    request_id: str | None = None

    def run(self, sim: Simulation) -> None:
        sim.send_claim(self.client, "buy", self.itinerary, self.seats, self.request_id)


@frozen
class BuyHold(Action):
    """
    Buy a hold: C{pick} 0 is this slot's latest hold, then any hold acknowledged to anyone.
    """

    client: int
    pick: int
    request_id: str | None = None

    def run(self, sim: Simulation) -> None:
        sim.send_hold_use(self.client, "buy_hold", self.pick, self.request_id)


@frozen
class Release(Action):
    client: int
    pick: int
    request_id: str | None = None

    def run(self, sim: Simulation) -> None:
        sim.send_hold_use(self.client, "release", self.pick, self.request_id)


@frozen
class Cancel(Action):
    """
    Cancel a ticket: C{pick} counts through this customer's tickets (latest
    first), then every ticket acknowledged to anyone.
    """

    client: int
    pick: int
    request_id: str | None = None

    def run(self, sim: Simulation) -> None:
        sim.send_cancel(self.client, self.pick, self.request_id)


@frozen
class ListTickets(Action):
    client: int

    def run(self, sim: Simulation) -> None:
        sim.send_tickets(self.client)


@frozen
class SeatMap(Action):
    client: int

    def run(self, sim: Simulation) -> None:
        sim.send_seatmap(self.client)


@frozen
class Garbage(Action):
    client: int
    line: bytes

    def run(self, sim: Simulation) -> None:
        sim.send_garbage(self.client, self.line)


@frozen
class Pump(Action):
    """
    Move bytes once each way on one connection (C{client}) or on every one (C{None}).
    """

    client: int | None = None

    def run(self, sim: Simulation) -> None:
        sim.pump(self.client)


@frozen
class Commit(Action):
    """
    Run queued job number C{pick} (modulo the queue's length); with
    C{deliver}, hand every outcome so far to its submitter.
    """

    pick: int = 0
    deliver: bool = True

    def run(self, sim: Simulation) -> None:
        sim.commit(self.pick, self.deliver)


@frozen
class Deliver(Action):
    """
    Hand the oldest committed outcome to its submitter.
    """

    def run(self, sim: Simulation) -> None:
        sim.executor.deliver()


@frozen
class Settle(Action):
    """
    Pump, commit (oldest first) and deliver until nothing moves.
    """

    def run(self, sim: Simulation) -> None:
        sim.settle()


@frozen
class Advance(Action):
    seconds: int

    def run(self, sim: Simulation) -> None:
        sim.clock.advance(self.seconds)


@frozen
class Disconnect(Action):
    """
    The client hangs up: politely (what it sent still arrives), or
    C{abrupt}ly (bytes in flight either way are lost).
    """

    client: int
    abrupt: bool = False

    def run(self, sim: Simulation) -> None:
        sim.disconnect(self.client, self.abrupt)


@frozen
class DropHolder(Action):
    """
    A targeted fault: of the connections with a live hold (or, if none has
    one, of those with a hold or purchase in flight), number C{pick}
    (modulo) hangs up.
    """

    pick: int = 0
    abrupt: bool = False

    def run(self, sim: Simulation) -> None:
        now = sim.clock.seconds()
        open_conns = [conn for conn in sim.slots if conn is not None and not conn.closing]
        holders = [conn.slot for conn in open_conns if any(h.live(now) for h in sim.slot_holds[conn.slot])]
        if not holders:
            holders = [
                conn.slot
                for conn in open_conns
                if any(sent.kind in ("hold", "buy", "buy_hold") for sent in conn.pending)
            ]
        if holders:
            sim.disconnect(holders[self.pick % len(holders)], self.abrupt)


GARBAGE: tuple[bytes, ...] = (
    b"",
    b"not json",
    b"[]",
    b"{}",
    b'{"opcode": "6"}',
    b'{"opcode": 99, "id": 1}',
    b'{"opcode": 6, "id": true}',
    b'{"opcode": 6, "id": "g", "data": {"flights": "x"}}',
    b'{"opcode": 3, "id": "g", "data": {"hold_id": 7}}',
    b'{"opcode": 5, "id": "g", "data": {"ticket_id": ["x"]}}',
    b'{"opcode": 7, "id": null, "data": {"hold_id": null}}',
    b'{"opcode": 6, "id": 0, "data": {"flights": ["VP100-2026-12-02"], "seats": ["9Z"]}}',
    b'{"opcode": 3, "id": 0, "data": {"flights": ["VP100-2026-12-02"], "request_id": "has space"}}',
    b"\xff\xfe\x00",
    b'{"opcode": 8, "data": {"flight": "\\ud800"}}',
)

CONTENDED = st.shared(st.integers(2, 3), key="vendepass-simulation-contended-seats")


def _claims(action: type[HoldSeats] | type[BuySeats], kind: str) -> st.SearchStrategy[Action]:
    """
    A hold or a one-step purchase: TINY alone (3 times in 4) or TINY then
    BIG, choosing on TINY one of its M contended seats or None.
    """
    clients = st.integers(0, K - 1)

    def for_contended(m: int) -> st.SearchStrategy[Action]:
        tiny = st.sampled_from((*TINY_SEATS[:m], None))
        alone = st.builds(
            action, client=clients, itinerary=st.just("TINY"), seats=st.tuples(tiny), request_id=_request_ids(kind)
        )
        both = st.builds(
            action,
            client=clients,
            itinerary=st.just("TINY+BIG"),
            seats=st.tuples(tiny, st.sampled_from(BIG_SEATS)),
            request_id=_request_ids(kind),
        )
        return st.one_of(alone, alone, alone, both)

    return CONTENDED.flatmap(for_contended)


def _request_ids(kind: str) -> st.SearchStrategy[str | None]:
    # Mostly none; some reused (a retry, or a key reused for another
    # operation: "any" is shared by every kind).
    return st.sampled_from((None, None, None, f"{kind}-1", f"{kind}-2", "any"))


def actions() -> st.SearchStrategy[Action]:
    """
    One step, weighted so that requests get sent, delivered, committed and
    answered often, and disruptions happen every few steps.
    """
    clients = st.integers(0, K - 1)
    pick = st.integers(0, 5)
    weighted: list[tuple[int, st.SearchStrategy[Action]]] = [
        (10, st.builds(Pump)),
        (16, st.builds(Commit, pick=st.integers(0, 7), deliver=st.sampled_from((True,) * 7 + (False,)))),
        (1, st.builds(Pump, client=clients)),
        (1, st.builds(Deliver)),
        (2, st.builds(Settle)),
        (6, _claims(HoldSeats, "hold")),
        (3, _claims(BuySeats, "buy")),
        (3, st.builds(BuyHold, client=clients, pick=pick, request_id=_request_ids("buy"))),
        (1, st.builds(Release, client=clients, pick=pick, request_id=_request_ids("release"))),
        (2, st.builds(Cancel, client=clients, pick=pick, request_id=_request_ids("cancel"))),
        (1, st.builds(ListTickets, client=clients)),
        (1, st.builds(SeatMap, client=clients)),
        (1, st.builds(Garbage, client=clients, line=st.sampled_from(GARBAGE))),
        (1, st.builds(Advance, seconds=st.integers(1, HOLD_SECONDS - 1))),
        (2, st.builds(Advance, seconds=st.integers(HOLD_SECONDS, HOLD_SECONDS + 40))),
        (1, st.builds(Disconnect, client=clients, abrupt=st.booleans())),
        (3, st.builds(DropHolder, pick=st.integers(0, 3), abrupt=st.booleans())),
    ]
    choices = [strategy for weight, strategy in weighted for _ in range(weight)]
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _legs(data: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((leg["flight"], leg["seat"]) for leg in data["legs"])


_HOLD_ID = re.compile(r"H[0-9a-f]{16}")


# -- the machine ------------------------------------------------------------------


class Simulation(RuleBasedStateMachine):
    """
    K customers contending for M seats through the real server; see the
    module docstring.
    """

    # Set by a mutant's subclass: the name of a L{MUTANTS} store.
    mutant: ClassVar[str | None] = None
    # Group commit: how many writes may share one transaction (the mutants
    # need 1: they capture one transaction per store call).
    max_batch: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(START)
        self.executor = ManualExecutor()
        store_class: type[SQLiteStore] = SQLiteStore if self.mutant is None else MUTANTS[self.mutant]
        self.store = store_class.open(
            ":memory:", self.clock, self.executor, lambda: load(MINI), FAST_HASHER.hash, max_batch=self.max_batch
        )
        if isinstance(self.store, MutantStore):
            self.store.manual = self.executor
        self.db: sqlite3.Connection = self.store._db
        self.service = ReservationService(
            self.store, self.clock, FAST_HASHER, InlineExecutor(), hold_seconds=HOLD_SECONDS
        )
        self.service.startService()
        self.factory = VendePassFactory(self.service, self.clock)

        self.contended = 0
        self.step_number = 0
        self.actions: list[Action] = []
        self.violations: list[str] = []
        self.flags: set[str] = set()
        self.counts: Counter[str] = Counter()
        self._counted = False
        self._log = hashlib.sha256()
        self._names: dict[str, str] = {}
        self._unknown_names = 0

        self.slots: list[Conn | None] = [None] * K
        self.conns: list[Conn] = []
        self.sessions: dict[str, Conn] = {}
        self.holds: dict[str, HoldModel] = {}
        self.tickets: dict[str, TicketModel] = {}
        self.slot_holds: dict[int, list[HoldModel]] = {slot: [] for slot in range(K)}
        # Live holds of connections that hung up: they must end up released.
        self.watch_release: set[str] = set()
        self.last_hold_rowid = self.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM holds").fetchone()[0]
        self.executor.after_run = self._after_job

        self._failures = FailureLog()
        globalLogPublisher.addObserver(self._failures)
        try:
            for slot in range(K):
                self.open_conn(slot)
            self.settle()
            self.check()
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self._failures)
        try:
            for row in self.db.execute("SELECT rowid, state FROM holds ORDER BY rowid"):
                self.record(f"hold {row}")
            for row in self.db.execute("SELECT rowid, status FROM tickets ORDER BY rowid"):
                self.record(f"ticket {row}")
        except sqlite3.ProgrammingError:
            pass  # torn down already
        if self.service.running:
            self.service.stopService()
        if not self._counted:
            self._counted = True
            COUNTS["examples"] += 1
            COUNTS["steps"] += self.step_number
            COUNTS["jobs committed"] += self.executor.ran
            COUNTS["batches"] += self.store.batches
            COUNTS["batched writes"] += self.store.batched_writes
            COUNTS.update(self.counts)
            for flag in FLAGS:
                COUNTS[f"examples: {flag}"] += flag in self.flags
                if flag in self.flags and currently_in_test_context():
                    event(f"example: {flag}")
            if RECORDING is not None:
                RECORDING.append((self.log_hash(), self.contended, list(self.actions)))

    # -- the event log ----------------------------------------------------------

    def record(self, line: str) -> None:
        self._log.update(line.encode("utf-8", "backslashreplace") + b"\n")

    def log_hash(self) -> str:
        return self._log.hexdigest()

    def name(self, kind: str, ident: str) -> str:
        """
        A run-independent name for a hold or ticket id: its rowid, in order of creation.
        """
        if ident not in self._names:
            table, column = ("holds", "hold_id") if kind == "H" else ("tickets", "ticket_id")
            row = self.db.execute(f"SELECT rowid FROM {table} WHERE {column} = ?", (ident,)).fetchone()
            if row is None:
                self._unknown_names += 1
                return f"{kind}?{self._unknown_names}"
            self._names[ident] = f"{kind}{row[0]}"
        return self._names[ident]

    def canonical(self, text: str, message: Any) -> str:
        def ticket_ids(value: Any) -> Iterable[str]:
            if isinstance(value, dict):
                for key, item in value.items():
                    if key == "ticket_id" and isinstance(item, str):
                        yield item
                    else:
                        yield from ticket_ids(item)
            elif isinstance(value, list):
                for item in value:
                    yield from ticket_ids(item)

        for ticket_id in set(ticket_ids(message)):
            text = text.replace(ticket_id, self.name("T", ticket_id))
        return _HOLD_ID.sub(lambda m: self.name("H", m.group()), text)

    # -- steps -------------------------------------------------------------------

    @initialize(contended=CONTENDED)
    def setup(self, contended: int) -> None:
        """
        M, the number of contended seats of TINY (the actions draw the same M).
        """
        self.contended = contended
        self.record(f"contended {contended}")
        if currently_in_test_context():
            event(f"contended seats: {contended}")

    @rule(action=actions())
    def step(self, action: Action) -> None:
        self.step_number += 1
        self.actions.append(action)
        self.record(f"step {self.step_number}: {action!r}")
        action.run(self)

    def violation(self, message: str) -> None:
        self.violations.append(f"step {self.step_number}: {message}")

    def open_conn(self, slot: int) -> Conn:
        """
        The slot's open connection; a new one (logged in) if it has none.
        """
        conn = self.slots[slot]
        if conn is not None and not conn.closing:
            return conn
        server = self.factory.buildProtocol(None)
        number = len(self.conns)
        client = SimClient(lambda line: self.received(self.conns[number], line))
        client_io = FakeTransport(client, isServer=False)
        server_io = FakeTransport(server, isServer=True)
        pump = connect(server, server_io, client, client_io, greet=False, clock=self.clock)
        assert server.session is not None
        user = SLOT_USERS[slot]
        conn = Conn(number, slot, user, client, server, client_io, server_io, pump, server.session.session_id)
        self.conns.append(conn)
        self.sessions[conn.session_id] = conn
        self.slots[slot] = conn
        self.slot_holds[slot] = []
        self.record(f"connect c{number} slot {slot}")
        if number >= K:
            self.counts["reconnects"] += 1
        self.send(conn, "login", LOGIN, {"username": user, "password": USERS[user]})
        return conn

    def send(self, conn: Conn, kind: str, opcode: int, data: dict[str, Any], **details: Any) -> Sent:
        conn.next_id += 1
        sent = Sent(kind, conn.next_id, self.step_number, **details)
        message = {"opcode": opcode, "id": conn.next_id, "data": data}
        conn.client.write(json.dumps(message).encode())
        conn.pending.append(sent)
        self.counts[f"sent {kind}"] += 1
        self.transmit(conn)
        return sent

    def transmit(self, conn: Conn) -> None:
        """
        Deliver what the client wrote to the server at once. (A request
        held up on its way is the same as one sent later, which the
        simulation also does; replies on their way back wait for a L{Pump}.)
        """
        data = conn.client_io.getOutBuffer()
        if data:
            conn.server_io.bufferReceived(data)

    def send_claim(
        self, slot: int, kind: str, itinerary: str, seats: tuple[str | None, ...], request_id: str | None
    ) -> None:
        conn = self.open_conn(slot)
        data: dict[str, Any] = {"flights": list(ITINERARIES[itinerary]), "seats": list(seats)}
        if request_id is not None:
            data["request_id"] = request_id
        self.send(conn, kind, HOLD if kind == "hold" else BUY, data, request_id=request_id, seats=seats)

    def send_hold_use(self, slot: int, kind: str, pick: int, request_id: str | None) -> None:
        conn = self.open_conn(slot)
        candidates = list(reversed(self.slot_holds[slot])) + list(self.holds.values())
        hold = candidates[pick % len(candidates)] if candidates else None
        data: dict[str, Any] = {"hold_id": hold.hold_id if hold is not None else "H" + "0" * 16}
        if request_id is not None:
            data["request_id"] = request_id
        if hold is not None and hold.user == conn.user:
            hold.doubtful = True
        self.send(conn, kind, BUY if kind == "buy_hold" else RELEASE, data, request_id=request_id, hold=hold)

    def send_cancel(self, slot: int, pick: int, request_id: str | None) -> None:
        conn = self.open_conn(slot)
        mine = [t for t in self.tickets.values() if t.user == conn.user]
        candidates = list(reversed(mine)) + list(self.tickets.values())
        ticket = candidates[pick % len(candidates)] if candidates else None
        data: dict[str, Any] = {"ticket_id": ticket.ticket_id if ticket is not None else "ZZZZZZZZ"}
        if request_id is not None:
            data["request_id"] = request_id
        if ticket is not None and ticket.user == conn.user:
            ticket.cancel_sent = True
        if ticket is not None and ticket.user != conn.user:
            self.counts["cancel of another customer's ticket sent"] += 1
        self.send(conn, "cancel", CANCEL, data, request_id=request_id)

    def send_tickets(self, slot: int) -> None:
        conn = self.open_conn(slot)
        before = tuple(t for t in self.tickets.values() if t.user == conn.user)
        self.send(conn, "tickets", TICKETS, {}, tickets_before=before)

    def send_seatmap(self, slot: int) -> None:
        conn = self.open_conn(slot)
        self.send(
            conn,
            "seatmap",
            SEATMAP,
            {"flight": TINY},
            tickets_before=tuple(self.tickets.values()),
            holds_before=tuple(self.holds.values()),
        )

    def send_garbage(self, slot: int, line: bytes) -> None:
        conn = self.open_conn(slot)
        conn.client.write(line)
        conn.pending.append(Sent("garbage", None, self.step_number))
        self.counts["sent garbage"] += 1
        self.transmit(conn)

    def pump(self, slot: int | None) -> None:
        for conn in self.slots if slot is None else [self.slots[slot]]:
            if conn is not None:
                conn.pump.pump()

    def commit(self, pick: int, deliver: bool) -> None:
        if self.executor.queue:
            index = pick % len(self.executor.queue)
            if len(self.executor.queue) > 1:
                self.counts["commits choosing among 2+ queued jobs"] += 1
            if index:
                self.counts["commits overtaking an older job"] += 1
            self.executor.run(index)
        if deliver:
            while self.executor.deliver():
                pass

    def settle(self) -> None:
        for _ in range(10000):
            moved = False
            for conn in self.slots:
                if conn is not None and conn.pump.pump():
                    moved = True
            if moved or self.executor.deliver():
                continue
            if self.executor.queue:
                self.executor.run(0)
                continue
            return
        raise Violation("the simulation does not settle")

    def disconnect(self, slot: int, abrupt: bool) -> None:
        conn = self.slots[slot]
        if conn is None or conn.closing:
            return
        live = [h for h in self.slot_holds[slot] if h.live(self.clock.seconds())]
        self.watch_release.update(h.hold_id for h in live)
        self.counts["disconnects with a live hold" if live else "disconnects without a live hold"] += 1
        conn.closing = True
        if abrupt:
            conn.client_io.stream = []
            conn.server_io.stream = []
        conn.client_io.loseConnection()
        conn.pump.flush()
        assert conn.server_closed and conn.client.lost, conn

    # -- what the clients get ------------------------------------------------------

    def received(self, conn: Conn, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.violation(f"c{conn.number} got a line that is not JSON: {line!r}")
            return
        self.record(f"c{conn.number} <- {self.canonical(line.decode('utf-8', 'backslashreplace'), message)}")
        if not isinstance(message, dict):
            self.violation(f"c{conn.number} got {message!r}")
        elif "event" in message:
            self.received_event(conn, message)
        elif not conn.pending:
            self.violation(f"c{conn.number} got a reply to nothing: {message}")
        else:
            self.received_reply(conn, conn.pending.popleft(), message)

    def received_event(self, conn: Conn, message: dict[str, Any]) -> None:
        name = message["event"]
        if name == "welcome":
            if message["data"].get("hold_seconds") != HOLD_SECONDS:
                self.violation(f"c{conn.number} welcome: {message}")
        elif name == "hold_expired":
            hold = self.holds.get(message["data"]["hold_id"])
            self.flags.add("expiry")
            self.counts["hold_expired events"] += 1
            if hold is not None:
                if self.clock.seconds() < hold.expires_at:
                    self.violation(f"c{conn.number} told hold {hold.hold_id} expired before {hold.expires_at}")
                hold.doubtful = True
        else:
            self.violation(f"c{conn.number} got an unknown event {message}")

    def received_reply(self, conn: Conn, sent: Sent, reply: dict[str, Any]) -> None:
        if sent.id is not None and reply.get("id") != sent.id:
            self.violation(f"c{conn.number} sent {sent.kind} id {sent.id}, the reply is {reply}")
        if not reply.get("ok"):
            code = reply.get("error", {}).get("code")
            self.counts[f"{sent.kind}: {code}"] += 1
            if code not in KNOWN_CODES:
                self.violation(f"c{conn.number} {sent.kind}: {reply}")
            if code == "seat_unavailable":
                self.flags.add("seat_unavailable")
            if code == "hold_expired":
                self.flags.add("expiry")
            if sent.kind == "login":
                self.violation(f"c{conn.number} login refused: {reply}")
            return
        self.counts[f"{sent.kind}: ok"] += 1
        data = reply.get("data")
        if not isinstance(data, dict):
            self.violation(f"c{conn.number} {sent.kind}: {reply}")
            return
        handler = getattr(self, f"ok_{sent.kind}", None)
        if handler is not None:
            handler(conn, sent, data)

    def ok_hold(self, conn: Conn, sent: Sent, data: dict[str, Any]) -> None:
        wire = data["hold"]
        hold_id = wire["hold_id"]
        seats = _legs(wire)
        if sent.request_id is None and any(
            want is not None and want != got for want, (_, got) in zip(sent.seats, seats)
        ):
            self.violation(f"c{conn.number} asked to hold {sent.seats}, was given {seats}")
        known = self.holds.get(hold_id)
        if known is not None:
            if known.seats != seats:
                self.violation(f"hold {hold_id} acknowledged with {known.seats}, then {seats}")
            self.counts["hold answered again"] += 1
            return
        row = self.db.execute("SELECT session_id, state FROM holds WHERE hold_id = ?", (hold_id,)).fetchone()
        if row is None:
            self.violation(f"c{conn.number} acknowledged hold {hold_id}, which is not in the database")
            return
        owner = self.sessions.get(row[0])
        if owner is None:
            self.violation(f"hold {hold_id} of unknown session {row[0]}")
            return
        hold = HoldModel(hold_id, conn.user, owner, seats, _parse_time(wire["expires_at"]))
        if owner is not conn:
            # A retry answered with the hold another connection made: it lives
            # and dies with that connection, whatever this one was told.
            hold.doubtful = True
            self.counts["retried hold answered with another connection's hold"] += 1
            if row[1] != "active":
                self.counts[f"retried hold answered with a hold no longer active ({row[1]})"] += 1
        else:
            self.slot_holds[conn.slot].append(hold)
        self.holds[hold_id] = hold

    def _ticket(self, conn: Conn, data: dict[str, Any]) -> TicketModel | None:
        wire = data["ticket"]
        ticket_id = wire["ticket_id"]
        if wire["status"] != "active":
            self.violation(f"c{conn.number} bought ticket {ticket_id} in status {wire['status']}")
        seats = _legs(wire)
        known = self.tickets.get(ticket_id)
        if known is not None:
            if known.seats != seats or known.user != conn.user:
                self.violation(f"ticket {ticket_id} acknowledged as {known}, then {seats} to {conn.user}")
            self.counts["purchase answered again"] += 1
            return known
        ticket = TicketModel(ticket_id, conn.user, seats)
        self.tickets[ticket_id] = ticket
        self.flags.add("bought")
        self.counts["acknowledged purchases"] += 1
        return ticket

    def ok_buy(self, conn: Conn, sent: Sent, data: dict[str, Any]) -> None:
        ticket = self._ticket(conn, data)
        if ticket is not None and sent.request_id is None and any(
            want is not None and want != got for want, (_, got) in zip(sent.seats, ticket.seats)
        ):
            self.violation(f"c{conn.number} asked to buy {sent.seats}, was sold {ticket.seats}")

    def ok_buy_hold(self, conn: Conn, sent: Sent, data: dict[str, Any]) -> None:
        ticket = self._ticket(conn, data)
        # (With a request_id, the answer may be an earlier purchase's.)
        if sent.hold is not None and sent.request_id is None and sent.hold.user != conn.user:
            self.violation(f"c{conn.number} ({conn.user}) bought {sent.hold.user}'s hold {sent.hold.hold_id}")
        if ticket is not None and sent.hold is not None and sent.request_id is None and ticket.seats != sent.hold.seats:
            self.violation(f"hold {sent.hold.hold_id} of {sent.hold.seats} bought as {ticket.seats}")

    def ok_release(self, conn: Conn, sent: Sent, data: dict[str, Any]) -> None:
        if sent.hold is not None and sent.request_id is None and sent.hold.user != conn.user:
            self.violation(f"c{conn.number} ({conn.user}) released {sent.hold.user}'s hold {sent.hold.hold_id}")

    def ok_cancel(self, conn: Conn, sent: Sent, data: dict[str, Any]) -> None:
        wire = data["ticket"]
        ticket = self.tickets.get(wire["ticket_id"])
        if wire["status"] != "cancelled":
            self.violation(f"c{conn.number} cancel answered {wire}")
        if ticket is None:
            self.violation(f"c{conn.number} cancelled ticket {wire['ticket_id']}, never acknowledged to anyone")
        elif ticket.user != conn.user:
            self.violation(f"c{conn.number} ({conn.user}) cancelled {ticket.user}'s ticket {ticket.ticket_id}")
        elif not ticket.cancel_sent:
            self.violation(f"ticket {ticket.ticket_id} cancelled without a cancel from its owner")

    def ok_tickets(self, conn: Conn, sent: Sent, data: dict[str, Any]) -> None:
        listed = {t["ticket_id"]: _legs(t) for t in data["tickets"]}
        for ticket in sent.tickets_before:
            if listed.get(ticket.ticket_id) != ticket.seats:
                self.violation(
                    f"c{conn.number}'s tickets list {ticket.ticket_id} as {listed.get(ticket.ticket_id)},"
                    f" acknowledged with {ticket.seats}"
                )
        for ticket_id in listed:
            known = self.tickets.get(ticket_id)
            if known is not None and known.user != conn.user:
                self.violation(f"c{conn.number} ({conn.user}) is shown {known.user}'s ticket {ticket_id}")

    def ok_seatmap(self, conn: Conn, sent: Sent, data: dict[str, Any]) -> None:
        shown = {s["seat"]: (s["status"], s["mine"]) for s in data["seats"]}
        now = self.clock.seconds()
        claims: list[tuple[tuple[tuple[str, str], ...], str, str]] = [
            (t.seats, "sold", t.user) for t in sent.tickets_before if t.standing()
        ]
        claims += [(h.seats, "held", h.user) for h in sent.holds_before if h.live(now)]
        for seats, status, owner in claims:
            for flight, seat in seats:
                if flight == TINY and shown.get(seat) != (status, owner == conn.user):
                    self.violation(
                        f"c{conn.number}'s seat map shows {seat} as {shown.get(seat)}, the clients were told"
                        f" {status} to {owner}"
                    )

    # -- the checker ------------------------------------------------------------------

    def _after_job(self, job: QueuedJob, outcome: Outcome) -> None:
        """
        Right after a transaction: no hold may have committed for a
        connection the server already saw close.
        """
        self.record(
            f"commit job {job.number}: "
            + ("ok" if outcome.failure is None else f"failed {type(outcome.failure.value).__name__}")
        )
        for rowid, hold_id, session_id in self.db.execute(
            "SELECT rowid, hold_id, session_id FROM holds WHERE rowid > ? ORDER BY rowid", (self.last_hold_rowid,)
        ).fetchall():
            self.last_hold_rowid = rowid
            conn = self.sessions.get(session_id)
            if conn is None:
                self.violation(f"hold {hold_id} committed for unknown session {session_id}")
            elif conn.server_closed:
                self.violation(f"hold {hold_id} committed for c{conn.number} after the server saw it close")

    @invariant()
    def check(self) -> None:
        now = self.clock.seconds()
        db = self.db
        seats_rows = db.execute(
            "SELECT s.flight_id, s.seat, s.hold_id, s.ticket_id, h.rowid, t.rowid FROM seats s"
            " LEFT JOIN holds h ON h.hold_id = s.hold_id LEFT JOIN tickets t ON t.ticket_id = s.ticket_id"
            " ORDER BY s.flight_id, s.seat"
        ).fetchall()
        self.record("seats " + " ".join(f"{f}/{s}:{h or ''}{'T' + str(t) if t else ''}" for f, s, _, _, h, t in seats_rows))
        owner_of = {(f, s): (hold_id, ticket_id) for f, s, hold_id, ticket_id, _, _ in seats_rows}

        # What the clients may rely on: live holds and standing tickets.
        claimed: dict[tuple[str, str], str] = {}
        live = [h for h in self.holds.values() if h.live(now)]
        standing = [t for t in self.tickets.values() if t.standing()]
        for what, seats in [(f"hold {h.hold_id}", h.seats) for h in live] + [
            (f"ticket {t.ticket_id}", t.seats) for t in standing
        ]:
            for leg in seats:
                if leg in claimed:
                    self.violation(f"{leg[0]}/{leg[1]} acknowledged to {claimed[leg]} and to {what}")
                claimed[leg] = what

        # Never stolen: every live hold is active, on its connection, with its seats.
        for h in live:
            row = db.execute(
                "SELECT username, session_id, expires_at, state FROM holds WHERE hold_id = ?", (h.hold_id,)
            ).fetchone()
            if row is None or row[3] != "active":
                self.violation(f"live hold {h.hold_id} of c{h.conn.number} is {row and row[3]} in the database")
                continue
            if (row[0], row[1], row[2]) != (h.user, h.conn.session_id, h.expires_at):
                self.violation(f"live hold {h.hold_id} is {row} in the database, acknowledged as {h}")
            for leg in h.seats:
                if owner_of.get(leg, (None, None))[0] != h.hold_id:
                    self.violation(f"live hold {h.hold_id}'s seat {leg} belongs to {owner_of.get(leg)}")

        # Never lost: every acknowledged purchase is committed with its seats.
        for t in standing:
            row = db.execute("SELECT username, status FROM tickets WHERE ticket_id = ?", (t.ticket_id,)).fetchone()
            if row is None or row[1] != "active":
                self.violation(f"acknowledged ticket {t.ticket_id} of {t.user} is {row and row[1]} in the database")
                continue
            if row[0] != t.user:
                self.violation(f"acknowledged ticket {t.ticket_id} of {t.user} belongs to {row[0]}")
            legs = tuple(
                db.execute(
                    "SELECT flight_id, seat FROM ticket_legs WHERE ticket_id = ? ORDER BY leg", (t.ticket_id,)
                ).fetchall()
            )
            if legs != t.seats:
                self.violation(f"acknowledged ticket {t.ticket_id} has {legs}, acknowledged {t.seats}")
            for leg in t.seats:
                if owner_of.get(leg, (None, None))[1] != t.ticket_id:
                    self.violation(f"ticket {t.ticket_id}'s seat {leg} belongs to {owner_of.get(leg)}")

        self._check_database()

        # The writer's seats in memory (between jobs: committed) are the file's.
        memory = self.store._seats
        if not db.in_transaction and memory.snapshot() != memory.read_back(db.execute):
            self.violation(f"the writer's seats in memory {memory.snapshot()} differ from the file's"
                           f" {memory.read_back(db.execute)}")

        # Holds of closed connections: released, once the queued work is done.
        for hold_id in sorted(self.watch_release):
            (state,) = db.execute("SELECT state FROM holds WHERE hold_id = ?", (hold_id,)).fetchone()
            if state != "active":
                self.watch_release.discard(hold_id)
                self.counts[f"live holds of closed connections {state}"] += 1
                if state == "released":
                    self.flags.add("disconnect released a live hold")
        if self.executor.idle:
            for hold_id, session_id in db.execute(
                "SELECT hold_id, session_id FROM holds WHERE state = 'active'"
            ).fetchall():
                conn = self.sessions.get(session_id)
                if conn is None or conn.server_closed:
                    self.violation(
                        f"orphaned hold {hold_id}: its connection c{conn and conn.number} is closed and"
                        " nothing is left to run"
                    )

        for failure in self._failures.failures:
            self.violation(f"logged failure: {failure}")
        self._failures.failures.clear()
        if self.violations:
            if not FIRST_VIOLATION:
                FIRST_VIOLATION.append((COUNTS["examples"], self.step_number, self.violations[0]))
            raise Violation("\n".join(self.violations))

    def _check_database(self) -> None:
        """
        The database on its own: each seat belongs to one active hold or one
        active ticket that lists it; every active hold and ticket has all its
        seats; no two active tickets list the same seat.
        """
        db = self.db
        for flight_id, seat, hold_id, ticket_id in db.execute(
            "SELECT flight_id, seat, hold_id, ticket_id FROM seats"
        ).fetchall():
            if (hold_id is None) == (ticket_id is None):
                self.violation(f"seat {flight_id}/{seat} row ({hold_id}, {ticket_id})")
            elif hold_id is not None:
                state = db.execute("SELECT state FROM holds WHERE hold_id = ?", (hold_id,)).fetchone()
                if state is None or state[0] != "active":
                    self.violation(f"{flight_id}/{seat} belongs to hold {hold_id} in state {state}")
            else:
                status = db.execute("SELECT status FROM tickets WHERE ticket_id = ?", (ticket_id,)).fetchone()
                if status is None or status[0] != "active":
                    self.violation(f"{flight_id}/{seat} belongs to ticket {ticket_id} in status {status}")
        for what, query in [
            (
                "active holds lost seats",
                "SELECT h.hold_id, l.flight_id, l.seat FROM holds h JOIN hold_legs l ON l.hold_id = h.hold_id"
                " WHERE h.state = 'active' AND NOT EXISTS (SELECT 1 FROM seats s WHERE s.hold_id = h.hold_id"
                " AND s.flight_id = l.flight_id AND s.seat = l.seat)",
            ),
            (
                "active tickets lost seats",
                "SELECT t.ticket_id, l.flight_id, l.seat FROM tickets t JOIN ticket_legs l"
                " ON l.ticket_id = t.ticket_id WHERE t.status = 'active' AND NOT EXISTS (SELECT 1 FROM seats s"
                " WHERE s.ticket_id = t.ticket_id AND s.flight_id = l.flight_id AND s.seat = l.seat)",
            ),
            (
                "seats sold twice",
                "SELECT l.flight_id, l.seat, COUNT(*) FROM tickets t JOIN ticket_legs l ON l.ticket_id = t.ticket_id"
                " WHERE t.status = 'active' GROUP BY l.flight_id, l.seat HAVING COUNT(*) > 1",
            ),
        ]:
            rows = db.execute(query).fetchall()
            if rows:
                self.violation(f"{what}: {rows}")


def play(machine_class: type[Simulation], contended: int, steps: Iterable[Action]) -> Simulation:
    """
    Run C{steps} on a fresh machine outside Hypothesis, checking after each
    as Hypothesis does; return the machine, torn down.
    """
    machine = machine_class()
    try:
        machine.setup(contended)
        machine.check()
        for action in steps:
            machine.step(action)
            machine.check()
    finally:
        machine.teardown()
    return machine


def replay(machine_class: type[Simulation], contended: int, steps: Iterable[Action]) -> str:
    """
    The hash of the event log of C{steps} (plan T17: the same steps give the same run).
    """
    return play(machine_class, contended, steps).log_hash()


class GroupCommitSimulation(Simulation):
    """
    The simulation with group commit: up to 8 writes share a transaction.
    """

    max_batch = 8


def mutant_machine(name: str) -> type[Simulation]:
    """
    The simulation with mutant C{name} switched on.
    """
    camel = "".join(part.title() for part in name.split("_"))
    return type(f"{camel}Mutant", (Simulation,), {"mutant": name, "__module__": __name__})
