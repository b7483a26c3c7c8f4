"""
Stateful property tests: several customers race for the few seats of
tests/data/mini.json through the real protocol, service and store, on each
backend: SQLite (L{SeatSales}) and PostgreSQL (L{PostgresSeatSales}, the same
machine on a fresh schema per example).

A Hypothesis L{RuleBasedStateMachine} drives 2 to 4 customer connections (at
the start alice twice, bob and carol; dave and carol are registered in setup),
plus read-only auditor connections, doing holds, buys, releases, cancels,
disconnects, reconnects, logins, logouts and clock advances. The machine keeps a model
of what the clients were told (tickets and their seats, live holds per
connection) and predicts the outcome of every request from it; after every
step the invariants compare the model, the protocol's view (seatmap, routes,
tickets) and the database itself (through a L{Reader}: the SQLite store's own
connection, or a connection of the test's own to the PostgreSQL schema).

Everything is synchronous: a L{Clock}, an inline executor, in-memory
transports.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import attr
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests import pg
from tests.common import (
    ALICE,
    BIG,
    BOB,
    FAST_HASHER,
    MINI,
    START,
    TINY,
    TOMORROW,
    LineClient,
    make_service,
)
from vendepass import errors
from vendepass.fixtures import load
from vendepass.service import ReservationService
from vendepass.store import InlineExecutor

# Short holds (the service default is 300 s), so that holds often expire
# within an example's 40 steps.
HOLD_SECONDS = 30

# Customers: the two demo customers of mini.json and two registered in setup.
CAROL = ("carol", "carol-password")
DAVE = ("dave", "dave-password")
USERS = {name: password for name, password in (ALICE, BOB, CAROL, DAVE)}
USERNAMES = sorted(USERS)

# What the customers may ask for: two flights and a two-leg itinerary.
ITINERARIES: tuple[tuple[str, ...], ...] = ((TINY,), (BIG,), (TINY, BIG))
# Seats a customer may choose (None: let the server pick the first free one).
# TINY has only 4 seats; on BIG customers all want the front row.
CHOSEN_SEATS = {TINY: ("1A", "1B", "2A", "2B"), BIG: ("1A", "1B", "1C")}
FLIGHTS = (TINY, BIG)

MIN_CONNECTIONS = 2
MAX_CONNECTIONS = 4

# Opcodes (docs/protocol.md).
LOGIN, ROUTES, BUY, TICKETS, CANCEL, HOLD, RELEASE, SEATMAP, LOGOUT, REGISTER = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10


def _codes() -> set[str]:
    found: set[str] = set()
    todo = [errors.VendePassError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo.extend(cls.__subclasses__())
    return found


# Error codes a client may legitimately see. internal_error is a bug, and
# session_closed must never reach a client.
KNOWN_CODES = _codes() - {"internal_error", "session_closed"}

# Coverage of the whole test run, by outcome (module level, so a test can
# run the machine and then look at what it exercised).
COUNTS: Counter[str] = Counter()


def note(what: str) -> None:
    """
    Record one occurrence of C{what}: in Hypothesis' statistics and in L{COUNTS}.
    """
    event(what)
    COUNTS[what] += 1


def seat_requests() -> st.SearchStrategy[tuple[tuple[str, ...], tuple[str | None, ...]]]:
    """
    An itinerary and, per leg, a chosen seat or None.
    """

    def seats_for(flights: tuple[str, ...]) -> st.SearchStrategy[tuple[tuple[str, ...], tuple[str | None, ...]]]:
        per_leg = [st.sampled_from((None, *CHOSEN_SEATS[flight])) for flight in flights]
        # No .map(lambda ...): Hypothesis would print the lambda's source,
        # not the flights, in a failing example.
        return st.tuples(st.just(flights), st.tuples(*per_leg))

    return st.sampled_from(ITINERARIES).flatmap(seats_for)


@attr.s(eq=False, repr=False)
class Conn:
    """
    One customer connection, as the model knows it.
    """

    number: int = attr.ib()
    # None once logged out
    user: str | None = attr.ib()
    client: LineClient = attr.ib(repr=False)
    open: bool = attr.ib(default=True)
    # hold ids whose hold_expired event this connection must have received
    expected_expired: list[str] = attr.ib(factory=list, repr=False)

    @property
    def session_id(self) -> str:
        assert self.client.protocol.session is not None
        return self.client.protocol.session.session_id

    def __repr__(self) -> str:
        return f"<conn {self.number} {self.user or 'logged out'}{'' if self.open else ' closed'}>"


@attr.s(eq=False)
class HoldModel:
    hold_id: str = attr.ib()
    owner: str = attr.ib()
    conn: Conn = attr.ib()
    legs: tuple[tuple[str, str], ...] = attr.ib()
    expires_at: float = attr.ib()
    # active (acknowledged and live), expired, released or bought
    state: str = attr.ib(default="active")


@attr.s(eq=False)
class TicketModel:
    ticket_id: str = attr.ib()
    owner: str = attr.ib()
    legs: tuple[tuple[str, str], ...] = attr.ib()
    status: str = attr.ib(default="active")


class UnexpectedResponse(AssertionError):
    pass


class Reader:
    """
    Read-only SQL on a store's database, for the invariants. Queries are
    written once, with sqlite3's C{?} placeholders; on a driver whose
    placeholders are C{%s} (psycopg) they are translated (so no query may
    have a literal C{?} of its own).

    @param conn: a DB-API connection whose C{execute(sql, params)} returns a
        cursor (sqlite3's, or psycopg's in autocommit mode, which sees every
        committed transaction of the store).
    """

    def __init__(self, conn: Any, format_placeholders: bool = False) -> None:
        self._conn = conn
        self._format = format_placeholders

    def _execute(self, sql: str, params: Sequence[Any]) -> Any:
        if self._format:
            sql = sql.replace("%", "%%").replace("?", "%s")
        return self._conn.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """
        Every row, as tuples.
        """
        return [tuple(row) for row in self._execute(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """
        The first row, or C{None}.
        """
        row = self._execute(sql, params).fetchone()
        return None if row is None else tuple(row)


class SeatSales(RuleBasedStateMachine):
    """
    Customers contending for the seats of TINY and BIG.
    """

    conns = Bundle("conns")
    holds = Bundle("holds")
    tickets = Bundle("tickets")

    def __init__(self) -> None:
        super().__init__()
        self.service, self.clock, self.db = self.open_service()
        now = self.clock.seconds()
        schedule = self.service.schedule()
        self.seat_order = {f: schedule.flight(f, now).aircraft.seats() for f in FLIGHTS}
        self.capacity = {f: schedule.flight(f, now).aircraft.capacity for f in FLIGHTS}
        self.next_conn = 0
        self.all_conns: list[Conn] = []
        self.model_holds: dict[str, HoldModel] = {}
        self.model_tickets: dict[str, TicketModel] = {}
        self.contended = False
        self.expired_any = False
        self.bought_any = False

        # Read-only auditors: one anonymous connection (seat maps, routes)
        # and one per customer (their tickets). They never hold anything.
        self.anonymous = LineClient(self.service)
        for username, password in (CAROL, DAVE):
            self.expect_ok(self.anonymous, REGISTER, {"username": username, "password": password})
        self.auditors: dict[str, LineClient] = {}
        for name in USERNAMES:
            auditor = LineClient(self.service)
            self.expect_ok(auditor, LOGIN, {"username": name, "password": USERS[name]})
            self.auditors[name] = auditor
        welcome = self.anonymous.received[0]
        assert welcome["event"] == "welcome" and welcome["data"]["hold_seconds"] == HOLD_SECONDS, welcome

    def open_service(self) -> tuple[ReservationService, Clock, Reader]:
        """
        A started service on a new, empty store (fixtures loaded), its
        clock, and a reader of its database. Subclasses change the backend.
        """
        service = make_service(hold_seconds=HOLD_SECONDS)
        # make_service's clock is a twisted.internet.task.Clock.
        clock: Clock = service.clock  # type: ignore[assignment]
        return service, clock, Reader(service.store._db)  # type: ignore[attr-defined]

    def close_service(self) -> None:
        self.service.stopService()

    def teardown(self) -> None:
        COUNTS["examples"] += 1
        COUNTS["examples with contention (seat_unavailable or sold_out)"] += self.contended
        COUNTS["examples with a bought ticket"] += self.bought_any
        COUNTS["examples with an expired hold"] += self.expired_any
        self.close_service()

    # -- talking to the server ----------------------------------------------

    def call(self, client: LineClient, opcode: int, data: dict[str, Any]) -> dict[str, Any]:
        """
        One request; the response must be ok or carry a known error code.
        """
        reply = client.request(opcode, data)
        if not reply["ok"]:
            code = reply["error"]["code"]
            if code not in KNOWN_CODES:
                raise UnexpectedResponse(f"opcode {opcode} {data}: unknown or internal error {reply}")
        return reply

    def expect_ok(self, client: LineClient, opcode: int, data: dict[str, Any]) -> dict[str, Any]:
        reply = self.call(client, opcode, data)
        if not reply["ok"]:
            raise UnexpectedResponse(f"opcode {opcode} {data}: expected success, got {reply}")
        data_out: dict[str, Any] = reply["data"]
        return data_out

    def check_outcome(self, what: str, reply: dict[str, Any], expected: str) -> None:
        """
        The outcome (C{"ok"} or an error code) must be the one the model predicts.
        """
        outcome = "ok" if reply["ok"] else reply["error"]["code"]
        note(f"{what}: {outcome}")
        if outcome != expected:
            raise UnexpectedResponse(f"{what}: the model expected {expected!r}, the server said {reply}")

    def connect(self, user: str) -> Conn:
        client = LineClient(self.service)
        self.expect_ok(client, LOGIN, {"username": user, "password": USERS[user]})
        conn = Conn(self.next_conn, user, client)
        self.next_conn += 1
        self.all_conns.append(conn)
        return conn

    # -- the model ----------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def open_conns(self) -> list[Conn]:
        return [c for c in self.all_conns if c.open]

    def live_holds(self) -> list[HoldModel]:
        return [h for h in self.model_holds.values() if h.state == "active"]

    def taken(self) -> dict[tuple[str, str], tuple[str, str, str]]:
        """
        Every claimed seat: C{(flight, seat) -> ("held" | "sold", id, owner)}.
        """
        claimed: dict[tuple[str, str], tuple[str, str, str]] = {}
        for h in self.live_holds():
            for leg in h.legs:
                assert leg not in claimed, (leg, claimed[leg], h)
                claimed[leg] = ("held", h.hold_id, h.owner)
        for t in self.model_tickets.values():
            if t.status == "active":
                for leg in t.legs:
                    assert leg not in claimed, (leg, claimed[leg], t)
                    claimed[leg] = ("sold", t.ticket_id, t.owner)
        return claimed

    def predict_claim(
        self, user: str | None, flights: tuple[str, ...], seats: tuple[str | None, ...]
    ) -> tuple[str, tuple[tuple[str, str], ...]]:
        """
        What holding (or buying) C{seats} on C{flights} must do now: C{("ok",
        legs)} or C{(error code, ())}. Legs are claimed in order; the first
        that fails decides.
        """
        if user is None:
            return "not_logged_in", ()
        claimed = self.taken()
        legs = []
        for flight, seat in zip(flights, seats):
            if seat is None:
                seat = next((s for s in self.seat_order[flight] if (flight, s) not in claimed), None)
                if seat is None:
                    return "sold_out", ()
            elif (flight, seat) in claimed:
                state, _, owner = claimed[(flight, seat)]
                note(f"contention: wanted a seat {state} by {'myself' if owner == user else 'another customer'}")
                return "seat_unavailable", ()
            legs.append((flight, seat))
        return "ok", tuple(legs)

    def predict_hold_use(self, conn: Conn, hold: HoldModel) -> str:
        """
        What buying or releasing C{hold} on C{conn} must answer.
        """
        if conn.user is None:
            return "not_logged_in"
        if hold.owner != conn.user or hold.state in ("released", "bought"):
            return "hold_not_found"
        if hold.state == "expired":
            return "hold_expired"
        return "ok"

    def release_conn_holds(self, conn: Conn) -> int:
        released = 0
        for h in self.live_holds():
            if h.conn is conn:
                h.state = "released"
                released += 1
        return released

    def expire_holds(self) -> None:
        now = self.now()
        for h in self.live_holds():
            if h.expires_at <= now:
                h.state = "expired"
                h.conn.expected_expired.append(h.hold_id)
                self.expired_any = True
                note("hold expired (clock passed hold_seconds)")

    # -- rules --------------------------------------------------------------

    @initialize(target=conns)
    def connect_customers(self) -> Any:
        """
        alice, bob, carol, and alice again on a second connection.
        """
        return multiple(*[self.connect(user) for user in ("alice", "bob", "carol", "alice")])

    def _request(self, flights: tuple[str, ...], seats: tuple[str | None, ...]) -> dict[str, Any]:
        data: dict[str, Any] = {"flights": list(flights)}
        if any(seat is not None for seat in seats):
            data["seats"] = list(seats)
        return data

    def _note_contention(self, expected: str) -> None:
        if expected in ("seat_unavailable", "sold_out"):
            self.contended = True

    @rule(target=holds, conn=conns, request=seat_requests())
    def hold(self, conn: Conn, request: tuple[tuple[str, ...], tuple[str | None, ...]]) -> Any:
        flights, seats = request
        expected, legs = self.predict_claim(conn.user, flights, seats)
        self._note_contention(expected)
        reply = self.call(conn.client, HOLD, self._request(flights, seats))
        self.check_outcome("hold", reply, expected)
        if not reply["ok"]:
            return multiple()
        wire = reply["data"]["hold"]
        got = tuple((leg["flight"], leg["seat"]) for leg in wire["legs"])
        assert got == legs, (got, legs)
        assert conn.user is not None
        h = HoldModel(wire["hold_id"], conn.user, conn, legs, self.now() + HOLD_SECONDS)
        assert h.hold_id not in self.model_holds, h
        self.model_holds[h.hold_id] = h
        return h

    def _ticket(self, user: str, reply: dict[str, Any], legs: tuple[tuple[str, str], ...]) -> TicketModel:
        wire = reply["data"]["ticket"]
        got = tuple((leg["flight"], leg["seat"]) for leg in wire["legs"])
        assert got == legs, (got, legs)
        assert wire["status"] == "active", wire
        t = TicketModel(wire["ticket_id"], user, legs)
        assert t.ticket_id not in self.model_tickets, t
        self.model_tickets[t.ticket_id] = t
        self.bought_any = True
        note("bought")
        return t

    @rule(target=tickets, conn=conns, request=seat_requests())
    def buy_now(self, conn: Conn, request: tuple[tuple[str, ...], tuple[str | None, ...]]) -> Any:
        """
        Hold and buy in one step.
        """
        flights, seats = request
        expected, legs = self.predict_claim(conn.user, flights, seats)
        self._note_contention(expected)
        reply = self.call(conn.client, BUY, self._request(flights, seats))
        self.check_outcome("buy in one step", reply, expected)
        if not reply["ok"]:
            return multiple()
        assert conn.user is not None
        return self._ticket(conn.user, reply, legs)

    def asker(self, conn: Conn, own: bool, hold: HoldModel | None = None, owner: str | None = None) -> Conn:
        """
        The connection that asks: C{conn}, or (if C{own}) the open connection
        that made C{hold} or one logged in as C{owner}, when there is one.
        """
        if own:
            if hold is not None and hold.conn.open:
                return hold.conn
            mine = [c for c in self.open_conns() if c.user == (owner or (hold and hold.owner))]
            if mine:
                return mine[0]
        return conn

    @rule(target=tickets, conn=conns, hold=holds, own=st.booleans())
    def buy_hold(self, conn: Conn, hold: HoldModel, own: bool) -> Any:
        """
        Buy a hold (on the connection that made it, if C{own} and it is open).
        """
        conn = self.asker(conn, own, hold=hold)
        expected = self.predict_hold_use(conn, hold)
        if expected == "ok" and hold.conn is not conn:
            note("bought a hold made on another connection")
        reply = self.call(conn.client, BUY, {"hold_id": hold.hold_id})
        self.check_outcome("buy hold", reply, expected)
        if not reply["ok"]:
            return multiple()
        hold.state = "bought"
        assert conn.user is not None
        return self._ticket(conn.user, reply, hold.legs)

    def latest_hold(self, conn: Conn) -> HoldModel | None:
        mine = [h for h in self.model_holds.values() if h.conn is conn]
        return mine[-1] if mine else None

    @rule(target=tickets, conn=conns)
    def buy_latest_hold(self, conn: Conn) -> Any:
        """
        Buy the hold this connection made last (as a customer would: hold,
        then buy), whatever became of it since.
        """
        hold = self.latest_hold(conn)
        if hold is None:
            note("no hold to buy on this connection")
            return multiple()
        return self.buy_hold(conn, hold, own=True)

    @rule(conn=conns)
    def release_latest_hold(self, conn: Conn) -> None:
        hold = self.latest_hold(conn)
        if hold is None:
            note("no hold to release on this connection")
            return
        self.release(conn, hold, own=True)

    @rule(conn=conns, hold=holds, own=st.booleans())
    def release(self, conn: Conn, hold: HoldModel, own: bool) -> None:
        conn = self.asker(conn, own, hold=hold)
        expected = self.predict_hold_use(conn, hold)
        reply = self.call(conn.client, RELEASE, {"hold_id": hold.hold_id})
        self.check_outcome("release", reply, expected)
        if reply["ok"]:
            hold.state = "released"

    @rule(conn=conns, ticket=tickets, own=st.booleans())
    def cancel(self, conn: Conn, ticket: TicketModel, own: bool) -> None:
        """
        Cancel a ticket (as its owner, if C{own} and the owner is connected).
        """
        conn = self.asker(conn, own, owner=ticket.owner)
        if conn.user is None:
            expected = "not_logged_in"
        elif ticket.owner != conn.user:
            expected = "ticket_not_found"
        elif ticket.status == "cancelled":
            expected = "already_cancelled"
        else:
            expected = "ok"
        reply = self.call(conn.client, CANCEL, {"ticket_id": ticket.ticket_id})
        self.check_outcome("cancel", reply, expected)
        if reply["ok"]:
            wire = reply["data"]["ticket"]
            assert wire["ticket_id"] == ticket.ticket_id and wire["status"] == "cancelled", wire
            assert tuple((leg["flight"], leg["seat"]) for leg in wire["legs"]) == ticket.legs, wire
            ticket.status = "cancelled"

    @precondition(lambda self: len(self.open_conns()) > MIN_CONNECTIONS)
    @rule(conn=consumes(conns))
    def disconnect(self, conn: Conn) -> None:
        conn.client.disconnect()
        conn.open = False
        released = self.release_conn_holds(conn)
        note("disconnect released a live hold" if released else "disconnect without live holds")

    @precondition(lambda self: len(self.open_conns()) < MAX_CONNECTIONS)
    @rule(target=conns, user=st.sampled_from(USERNAMES))
    def reconnect(self, user: str) -> Conn:
        note("reconnect")
        return self.connect(user)

    @rule(conn=conns, user=st.sampled_from(USERNAMES))
    def login_again(self, conn: Conn, user: str) -> None:
        """
        Log in on an open connection, as the same customer or another one
        (which releases the holds made on it).
        """
        self.expect_ok(conn.client, LOGIN, {"username": user, "password": USERS[user]})
        if conn.user is None:
            note("login after logout")
            conn.user = user
        elif user != conn.user:
            released = self.release_conn_holds(conn)
            note("login as another customer released a live hold" if released else "login as another customer")
            conn.user = user
        else:
            note("login again as the same customer")

    @rule(conn=conns)
    def logout(self, conn: Conn) -> None:
        """
        Log out (which releases the holds made on this connection).
        """
        reply = self.call(conn.client, LOGOUT, {})
        self.check_outcome("logout", reply, "not_logged_in" if conn.user is None else "ok")
        if reply["ok"]:
            released = self.release_conn_holds(conn)
            if released:
                note("logout released a live hold")
            conn.user = None

    @rule(seconds=st.integers(1, HOLD_SECONDS - 1))
    def advance_a_little(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self.expire_holds()

    @rule(seconds=st.integers(HOLD_SECONDS, HOLD_SECONDS + 30))
    def advance_past_hold(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self.expire_holds()

    # -- invariants: the database -------------------------------------------

    @invariant()
    def seats_table_is_consistent(self) -> None:
        """
        At most one row per seat, each belonging to exactly one active hold
        or one active ticket that lists that seat; and every active hold or
        ticket has all its seats.
        """
        db = self.db
        dupes = db.query(
            "SELECT flight_id, seat, COUNT(*) FROM seats GROUP BY flight_id, seat HAVING COUNT(*) > 1"
        )
        assert not dupes, f"seats claimed twice: {dupes}"
        for flight_id, seat, hold_id, ticket_id in db.query("SELECT flight_id, seat, hold_id, ticket_id FROM seats"):
            assert (hold_id is None) != (ticket_id is None), (flight_id, seat, hold_id, ticket_id)
            if hold_id is not None:
                (state,) = db.one("SELECT state FROM holds WHERE hold_id = ?", (hold_id,)) or (None,)
                assert state == "active", f"{flight_id}/{seat} belongs to hold {hold_id} in state {state}"
                leg = db.one(
                    "SELECT 1 FROM hold_legs WHERE hold_id = ? AND flight_id = ? AND seat = ?",
                    (hold_id, flight_id, seat),
                )
                assert leg is not None, f"{flight_id}/{seat} claimed by hold {hold_id}, which does not list it"
            else:
                (status,) = db.one("SELECT status FROM tickets WHERE ticket_id = ?", (ticket_id,)) or (None,)
                assert status == "active", f"{flight_id}/{seat} belongs to ticket {ticket_id} ({status})"
                leg = db.one(
                    "SELECT 1 FROM ticket_legs WHERE ticket_id = ? AND flight_id = ? AND seat = ?",
                    (ticket_id, flight_id, seat),
                )
                assert leg is not None, f"{flight_id}/{seat} claimed by ticket {ticket_id}, which does not list it"
        missing_hold_seats = db.query(
            "SELECT h.hold_id, l.flight_id, l.seat FROM holds h JOIN hold_legs l ON l.hold_id = h.hold_id"
            " WHERE h.state = 'active' AND NOT EXISTS (SELECT 1 FROM seats s WHERE s.hold_id = h.hold_id"
            " AND s.flight_id = l.flight_id AND s.seat = l.seat)"
        )
        assert not missing_hold_seats, f"active holds lost seats: {missing_hold_seats}"
        missing_ticket_seats = db.query(
            "SELECT t.ticket_id, l.flight_id, l.seat FROM tickets t JOIN ticket_legs l ON l.ticket_id = t.ticket_id"
            " WHERE t.status = 'active' AND NOT EXISTS (SELECT 1 FROM seats s WHERE s.ticket_id = t.ticket_id"
            " AND s.flight_id = l.flight_id AND s.seat = l.seat)"
        )
        assert not missing_ticket_seats, f"active tickets lost seats: {missing_ticket_seats}"

    @invariant()
    def no_orphaned_hold(self) -> None:
        """
        No active hold in the database belongs to a closed connection.
        """
        open_sessions = {c.session_id for c in self.open_conns()}
        closed = {c.session_id: c for c in self.all_conns if not c.open}
        for hold_id, session_id in self.db.query("SELECT hold_id, session_id FROM holds WHERE state = 'active'"):
            assert session_id not in closed, f"orphaned hold {hold_id} of closed {closed[session_id]}"
            assert session_id in open_sessions, f"hold {hold_id} of unknown session {session_id}"

    @invariant()
    def live_holds_are_never_stolen(self) -> None:
        """
        Every live hold acknowledged to a client is still active in the
        database, with its seats, on its connection; and the database has no
        other active hold (expired ones were ended when their time came).
        """
        db_holds = {
            hold_id: (username, session_id, expires_at)
            for hold_id, username, session_id, expires_at in self.db.query(
                "SELECT hold_id, username, session_id, expires_at FROM holds WHERE state = 'active'"
            )
        }
        for h in self.live_holds():
            assert h.conn.open, h
            assert h.hold_id in db_holds, f"live hold {h.hold_id} of {h.conn} is gone from the database"
            username, session_id, expires_at = db_holds[h.hold_id]
            assert (username, session_id, expires_at) == (h.owner, h.conn.session_id, h.expires_at), (
                h,
                db_holds[h.hold_id],
            )
            seats = tuple(
                self.db.query(
                    "SELECT l.flight_id, l.seat FROM hold_legs l JOIN seats s ON s.hold_id = l.hold_id"
                    " AND s.flight_id = l.flight_id AND s.seat = l.seat WHERE l.hold_id = ? ORDER BY l.leg",
                    (h.hold_id,),
                )
            )
            assert seats == h.legs, f"live hold {h.hold_id} holds {seats}, acknowledged {h.legs}"
        # (Holds of closed connections are no_orphaned_hold's business.)
        open_sessions = {c.session_id for c in self.open_conns()}
        extra = {hold_id for hold_id, (_, session_id, _) in db_holds.items() if session_id in open_sessions}
        extra -= {h.hold_id for h in self.live_holds()}
        assert not extra, f"active holds the clients do not know as live: {extra}"

    @invariant()
    def database_tickets_are_the_acknowledged_ones(self) -> None:
        db_tickets = {
            ticket_id: (username, status)
            for ticket_id, username, status in self.db.query("SELECT ticket_id, username, status FROM tickets")
        }
        model = {t.ticket_id: (t.owner, t.status) for t in self.model_tickets.values()}
        assert db_tickets == model, (db_tickets, model)

    # -- invariants: what the protocol shows ---------------------------------

    @invariant()
    def seat_maps_add_up(self) -> None:
        """
        For each flight: free + held + sold = capacity; the seat map shows
        exactly the model's held and sold seats; search shows as many free
        seats as the seat map.
        """
        claimed = self.taken()
        free_count = {}
        for flight in FLIGHTS:
            seatmap = self.expect_ok(self.anonymous, SEATMAP, {"flight": flight})
            statuses = Counter(s["status"] for s in seatmap["seats"])
            assert set(statuses) <= {"free", "held", "sold"}, statuses
            assert statuses["free"] + statuses["held"] + statuses["sold"] == self.capacity[flight], statuses
            assert [s["seat"] for s in seatmap["seats"]] == list(self.seat_order[flight])
            for s in seatmap["seats"]:
                want = claimed.get((flight, s["seat"]), ("free",))[0]
                assert s["status"] == want, f"{flight}/{s['seat']} is {s['status']}, the clients were told {want}"
            free_count[flight] = statuses["free"]
        found = self.expect_ok(
            self.anonymous,
            ROUTES,
            {"origin": "SSA", "destination": "MAO", "date": TOMORROW, "include_sold_out": True},
        )
        via_rec = [i for i in found["itineraries"] if [leg["flight"] for leg in i["legs"]] == [TINY, BIG]]
        assert len(via_rec) == 1, found
        search_free = {leg["flight"]: leg["free_seats"] for leg in via_rec[0]["legs"]}
        assert search_free == free_count, (search_free, free_count)

    @invariant()
    def seat_maps_show_whose_seats(self) -> None:
        """
        On TINY's seat map, each customer sees as "mine" exactly the seats
        the model says they hold or bought (anonymous readers own nothing).
        """
        claimed = self.taken()
        for user, client in [(None, self.anonymous), *self.auditors.items()]:
            seatmap = self.expect_ok(client, SEATMAP, {"flight": TINY})
            mine = {s["seat"] for s in seatmap["seats"] if s["mine"]}
            want = {seat for (flight, seat), (_, _, owner) in claimed.items() if flight == TINY and owner == user}
            assert mine == want, f"{user or 'anonymous'} sees {sorted(mine)} on {TINY} as theirs, expected {sorted(want)}"

    @invariant()
    def owners_read_their_tickets(self) -> None:
        """
        Every acknowledged ticket is readable by its owner, with the same
        seats, and active unless its owner cancelled it; nobody sees tickets
        the clients were not told about.
        """
        for user, auditor in self.auditors.items():
            wire = self.expect_ok(auditor, TICKETS, {})["tickets"]
            seen = {
                t["ticket_id"]: (tuple((leg["flight"], leg["seat"]) for leg in t["legs"]), t["status"]) for t in wire
            }
            assert len(seen) == len(wire), wire
            model = {t.ticket_id: (t.legs, t.status) for t in self.model_tickets.values() if t.owner == user}
            assert seen == model, f"{user} reads {seen}, was told {model}"

    @invariant()
    def expiry_is_announced_once(self) -> None:
        """
        Each open connection got one hold_expired event per hold of its that
        expired, and no other.
        """
        for conn in self.open_conns():
            got = sorted(m["data"]["hold_id"] for m in conn.client.events("hold_expired"))
            assert got == sorted(conn.expected_expired), (
                f"{conn} got hold_expired for {got}, expected {sorted(conn.expected_expired)}"
            )


class PostgresSeatSales(SeatSales):
    """
    The same machine, rules and invariants on the PostgreSQL store: each
    example gets a new schema of the per-process test database (L{tests.pg}),
    created and loaded with the fixtures when the example starts and dropped
    when it ends. The store's time is the machine's L{Clock} (C{clock=}), as
    in the store contract tests, so holds expire exactly as on SQLite. The
    invariants read the schema on a connection of their own, in autocommit
    mode: the store commits each request before replying.
    """

    def open_service(self) -> tuple[ReservationService, Clock, Reader]:
        from vendepass.store.postgres import PostgresStore

        self._cleanups: list[Callable[[], object]] = []
        try:
            url = pg.fresh_url(self)
            clock = Clock()
            clock.advance(START)
            store = PostgresStore.open(url, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash, clock=clock)
            # As make_service does, on this store.
            service = ReservationService(store, clock, FAST_HASHER, InlineExecutor(), hold_seconds=HOLD_SECONDS)
            service.startService()
            self.addCleanup(service.stopService)
            import psycopg

            conn = psycopg.connect(store.url, autocommit=True)
            self.addCleanup(conn.close)
        except BaseException:
            self._run_cleanups()
            raise
        return service, clock, Reader(conn, format_placeholders=True)

    def addCleanup(self, cleanup: Callable[[], object]) -> None:
        """
        Do C{cleanup()} when the example ends (last added, first done), like
        L{SynchronousTestCase.addCleanup}: L{pg.fresh_url} drops its schema
        this way.
        """
        self._cleanups.append(cleanup)

    def _run_cleanups(self) -> None:
        while self._cleanups:
            self._cleanups.pop()()

    def close_service(self) -> None:
        # The service (and its store's connections), the reader's
        # connection, then the schema.
        self._run_cleanups()


# About 200 examples of 40 steps on the derandomized "ci" profile.
SETTINGS = settings(settings.get_profile("ci"), max_examples=200, stateful_step_count=40)

TestCase = SeatSales.TestCase
TestCase.settings = SETTINGS
TestCase.__module__ = __name__
# trial collects only test* methods; Hypothesis names its method runTest.
TestCase.test_seat_sales = TestCase.runTest  # type: ignore[attr-defined]


# Each PostgreSQL example creates and drops a schema and makes a round trip
# to the server per request and invariant query: fewer examples than on
# SQLite (the same first ones, derandomized).
POSTGRES_SETTINGS = settings(settings.get_profile("ci"), max_examples=40, stateful_step_count=40)


class PostgresSeatSalesTests(SynchronousTestCase):
    """
    L{PostgresSeatSales}: the stateful test on the PostgreSQL store, with
    L{POSTGRES_SETTINGS} (40 examples of 40 steps, against 200 on SQLite).
    Skipped without a PostgreSQL server (see L{tests.pg}).
    """

    def test_seat_sales(self) -> None:
        pg.database()  # skips (or fails, if PostgreSQL is required) without a server
        COUNTS.clear()
        run_state_machine_as_test(PostgresSeatSales, settings=POSTGRES_SETTINGS)
        # Not vacuous: the examples bought and let holds expire here too.
        self.assertGreater(COUNTS["examples"], 0)
        self.assertGreaterEqual(COUNTS["bought"], 1)
        self.assertGreaterEqual(COUNTS["hold expired (clock passed hold_seconds)"], 1)
        self.assertGreaterEqual(COUNTS["hold: seat_unavailable"] + COUNTS["buy in one step: seat_unavailable"], 1)


class CoverageTests(SynchronousTestCase):
    """
    The machine really makes customers contend: across a run, some examples
    meet taken seats, some buy, some let holds expire.
    """

    def test_contention_happens(self) -> None:
        COUNTS.clear()
        run_state_machine_as_test(
            SeatSales, settings=settings(settings.get_profile("ci"), max_examples=60, stateful_step_count=40)
        )
        examples = COUNTS["examples"]
        summary = "\n".join(f"  {count:6d}  {what}" for what, count in sorted(COUNTS.items()))
        print(f"\nstateful coverage over {examples} examples:\n{summary}")
        self.assertGreater(examples, 0)
        self.assertGreaterEqual(COUNTS["hold: seat_unavailable"] + COUNTS["buy in one step: seat_unavailable"], 1)
        self.assertGreaterEqual(COUNTS["bought"], 1)
        self.assertGreaterEqual(COUNTS["hold expired (clock passed hold_seconds)"], 1)
        # A reasonable share of the examples contend and buy. (Hypothesis
        # disables a random subset of the rules in each example, "swarm
        # testing", so the share varies with the draw: over 60 examples,
        # seen 14-63% with contention, 28-80% with a ticket and 7-26 with
        # an expired hold; ask for a tenth, a tenth and one.)
        self.assertGreaterEqual(COUNTS["examples with contention (seat_unavailable or sold_out)"], examples // 10)
        self.assertGreaterEqual(COUNTS["examples with a bought ticket"], examples // 10)
        self.assertGreaterEqual(COUNTS["examples with an expired hold"], 1)
