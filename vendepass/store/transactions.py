"""
The seat rules' transactions, written once for every store.

Each change of seat state (hold, release, expiry, purchase, cancellation)
is one method of L{SeatRules}, run by a store inside one transaction of its
own, through a L{Tx}: the transaction's statements, its time, and the few
things where databases truly differ (the dialect): how rows and flights are
locked, and one aggregate. Statements use C{?} as their placeholder; a
backend's L{Tx} adapts them to its driver.

The order of every transaction is the same, and the stores rely on it:

 1. checks that read (a request already done, the hold's owner and state,
    the customer's held seats, the seats' states), ending the holds they
    find whose time is up;
 2. then the writes, none of which can be refused.

So a refusal (a L{VendePassError} raised by the rules) never follows a
write that must be undone: what a refused transaction did before it is at
most the end of holds whose time was up, which is right whatever happens
next. A store commits what a refused transaction did (the SQLite store
needs no savepoint per write of a group commit; the PostgreSQL store's
COMMIT and ROLLBACK cost the same) and reports the expiries. Any other
exception is a failure, and the store rolls the transaction back.

Locks (PostgreSQL; SQLite has one writer, so its transactions are serial and
take none), always in this order, so that no two transactions deadlock: the
request (C{lock_request}), the customer (C{lock_user}), the flights
(C{lock_flights}, in one fixed order), then holds and tickets (C{SELECT ...
FOR UPDATE}, or the conditional C{UPDATE ... WHERE state = 'active'}, in
hold id order), then seats.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable, Iterable, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from vendepass.errors import (
    AlreadyCancelled,
    FlightDeparted,
    HoldExpired,
    HoldNotFound,
    InvalidRequest,
    PurchaseLimit,
    SeatUnavailable,
    SessionClosed,
    TicketNotFound,
    TooManyHolds,
    UsernameTaken,
    echo,
)
from vendepass.model import Flight, HeldSeat, Hold, Money, Network, SeatState, Ticket, TicketLeg, TicketPage
from vendepass.schedule import flight_by_id
from vendepass.store import LegRequest
from vendepass.store.common import (
    REQUEST_RETENTION,
    booking_code,
    check_seat,
    first_free_seat,
    hold_code,
    seat_map,
    seat_taken,
)

T = TypeVar("T")


class Tx:
    """
    One transaction as the rules see it. A backend subclasses it with its
    driver's statements and its dialect; this base class is the dialect of a
    database with one writer (SQLite): no locks are needed.

    @ivar now: the transaction's time (the store's clock, or the database's).
    @ivar ended: the holds this transaction ended because their time was
        up, as C{(hold_id, session_id)}: the store tells their sessions
        once it has committed.
    """

    # The seats of a flight as one string, separated by spaces.
    seat_list = "group_concat(seat, ' ')"
    # Which index finds a flight's held seats (SQLite's planner needs telling).
    held_seats_index = ""
    # The column that orders tickets bought at the same time.
    ticket_order = "rowid"
    # Whether a ticket's legs carry its time of sale, keyed by it first
    # (SQLite's migration 9), and how they (l) are found from the ticket (t).
    legs_by_time = True
    legs_of_ticket = "l.bought_at = t.bought_at AND l.ticket_id = t.ticket_id"

    def __init__(self, now: float) -> None:
        self.now = now
        self.ended: list[tuple[str, str]] = []

    def execute(self, sql: str, args: Iterable[Any] = ()) -> Any:
        """
        Run a statement; return its cursor (with C{rowcount}).
        """
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        raise NotImplementedError

    def one(self, sql: str, args: Iterable[Any] = ()) -> Any:
        """
        The first row of a statement's result, or C{None}.
        """
        return self.execute(sql, args).fetchone()

    def all(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        return list(self.execute(sql, args).fetchall())

    def for_update(self, table: str | None = None) -> str:
        """
        What a C{SELECT} ends with to lock the rows it reads (of C{table}
        only, in a join) until the transaction ends.
        """
        return ""

    def hold_order(self, holds: str, hold_id: str) -> str:
        """
        The order in which a transaction that ends several holds takes them
        (C{holds} names the holds table, C{hold_id} the selected hold id):
        here the order they were made in, so the same requests end the
        same holds in the same order (the simulation replays runs); where
        transactions lock holds, an order every transaction shares.
        """
        return f"{holds}.rowid"

    def skip_locked(self) -> str:
        """
        What a C{SELECT} ends with to lock the rows it reads, passing over
        rows another transaction has locked.
        """
        return ""

    def index_hint(self, index: str) -> str:
        """
        What follows a table's name to have the planner use C{index}
        (SQLite's planner needs telling; others plan well without).
        """
        return f" INDEXED BY {index}"

    def lock_request(self, username: str, request_id: str) -> None:
        """
        Take turns with any transaction doing the same request at once.
        """

    def lock_user(self, username: str) -> None:
        """
        Take turns with the customer's other claims (the limit on held seats).
        """

    def lock_flights(self, flight_ids: list[str]) -> None:
        """
        Take turns with every other claim of these flights.
        """

    def request_outcome(self, username: str, request_id: str) -> tuple[str, str] | None:
        """
        The kind and outcome recorded for a request, or C{None}: asked
        after L{lock_request}. A store may answer from what it read for
        many transactions at once.
        """
        row = self.one("SELECT kind, outcome FROM requests WHERE username = ? AND request_id = ?", (username, request_id))
        return None if row is None else (str(row[0]), str(row[1]))

    def held_seats(self, username: str) -> int:
        """
        How many seats C{username}'s active holds whose time is not up
        hold: asked after L{lock_user}. A store may answer from what it read
        for many transactions at once.
        """
        # By the customer's active holds: SQLite's planner would rather
        # read every active hold not yet expired, one per customer holding.
        (held,) = self.one(
            f"SELECT COUNT(*) FROM holds h{self.index_hint('holds_user')} JOIN hold_legs l ON l.hold_id = h.hold_id"
            " WHERE h.username = ? AND h.state = 'active' AND h.expires_at > ?",
            (username, self.now),
        )
        return int(held)

    def ending_holds(self) -> None:
        """
        The transaction is about to read, end or forget holds it finds by
        something else than their id (a session, their expiry): a store that
        keeps rows for later writes them now, and forgets what it read.
        """
        self.appended()

    def hold_for_sale(self, hold_id: str) -> list[tuple[Any, ...]]:
        """
        Hold C{hold_id} (locked) and its legs, in one statement: a row
        C{(username, state, expires_at, flight_id, seat)} per leg, in order;
        none if there is no such hold. A store may answer from what it read
        for many transactions at once.
        """
        self.reading_hold(hold_id)
        return self.all(
            "SELECT h.username, h.state, h.expires_at, l.flight_id, l.seat FROM holds h"
            " JOIN hold_legs l ON l.hold_id = h.hold_id"
            f" WHERE h.hold_id = ? ORDER BY l.leg{self.for_update('h')}",
            (hold_id,),
        )

    def reading_hold(self, hold_id: str) -> None:
        """
        The transaction is about to read or end hold C{hold_id}: a store
        that keeps a new hold's rows for later (L{keep}) writes them now.
        """

    def keep(self, sql: str, rows: list[tuple[Any, ...]], keys: Iterable[tuple[str, ...]]) -> None:
        """
        Insert rows that a statement reads back only after one of the hooks
        that C{keys} name, or after L{appended}: C{("request", username,
        request_id)} for L{lock_request}, C{("user", username)} for
        L{lock_user}, C{("hold", hold_id)} for L{reading_hold}. Here at
        once; a store may keep them as L{append} does, and insert them when
        such a hook is called.
        """
        self.append(sql, rows)

    def append(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """
        Insert rows that no statement reads back before L{appended} is
        called (the audit log, a new ticket's legs): here at once; a store
        may keep them, to insert those of every transaction of a group
        commit together, one C{executemany} per statement, before its
        COMMIT.
        """
        if len(rows) == 1:
            self.execute(sql, rows[0])
        else:
            self.executemany(sql, rows)

    def appended(self) -> None:
        """
        Insert what L{append} kept: a transaction calls this before it
        reads tickets' legs.
        """

    def insert_seats(
        self, rows: list[tuple[str, str, str | None, str | None]], expires_at: float | None = None
    ) -> None:
        """
        Insert seat rows C{(flight_id, seat, hold_id, ticket_id)} (all of a
        ticket, or all of a hold that runs until C{expires_at}, whose row
        L{keep} was given first): here at once. A store whose claims are
        answered from memory may keep them for L{appended} (marking them
        taken there first).
        """
        self.executemany(SEAT_INSERT, rows)

    def sell_hold(self, hold_id: str, username: str, ticket_id: str, seats: list[tuple[str, str]]) -> None:
        """
        Give the seats C{(flight_id, seat)} of active hold C{hold_id} (read
        locked) of C{username} to ticket C{ticket_id}, and end the hold as
        bought: here at once, checking that the hold claims exactly those
        seats. A store may keep this for L{appended} (marking the seats
        sold first), as L{keep} does.
        """
        changed = self.execute(
            "UPDATE seats SET hold_id = NULL, ticket_id = ? WHERE hold_id = ?", (ticket_id, hold_id)
        ).rowcount
        if changed != len(seats):
            raise RuntimeError(f"hold {hold_id} covers {changed} seats, expected {len(seats)}")
        self.execute(
            "UPDATE holds SET state = 'bought', ended_at = ? WHERE hold_id = ? AND state = 'active'", (self.now, hold_id)
        )

    def fresh_ticket(self, username: str, price_cents: int, currency: str) -> str | None:
        """
        Insert a new ticket (without its legs) under a booking code the
        store knows is free, and return the code; C{None} if the store has
        no such code to give (then the rules draw codes until one is free).
        """
        return None

    # -- the seats a claim looks at (a store may answer from memory) --------

    def expiry_due(self, flights: list[Flight]) -> bool:
        """
        Whether a held seat on these (locked) flights may belong to a hold
        whose time is up: then the claim looks for such holds and ends them.
        Here always (the database is asked).
        """
        return True

    def free_seat(self, flight: Flight, chosen: list[str]) -> str:
        """
        The first seat of C{flight}, in seat map order, that has no row and
        is not in C{chosen} (seats this claim picked already); or refuse
        with L{SoldOut}. Runs after the flight's expired holds were ended.
        """
        # One string rather than a row per taken seat: much cheaper once a
        # flight fills up.
        (listed,) = self.one(f"SELECT {self.seat_list} FROM seats WHERE flight_id = ?", (flight.flight_id,))
        taken = set(listed.split()) if listed else set()
        taken.update(chosen)
        return first_free_seat(flight, taken)

    def seat_claimant(self, flight: Flight, seat: str) -> tuple[object, float | None] | None:
        """
        Whether a seat has a row: C{None} if not, else C{(ticket_id, None)}
        for a sold seat or C{(None, expires_at)} for a held one.
        """
        row = self.one(
            "SELECT s.ticket_id, h.expires_at FROM seats s LEFT JOIN holds h ON h.hold_id = s.hold_id"
            " WHERE s.flight_id = ? AND s.seat = ?",
            (flight.flight_id, seat),
        )
        return None if row is None else (row[0], row[1])


# How many flights SeatRules.flight keeps made (a sales window has a few thousand).
FLIGHTS_KEPT = 65536


def _marks(n: int) -> str:
    return ",".join("?" * n)


TICKET_INSERT = (
    "INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)"
    " VALUES (?, ?, 'active', ?, ?, ?) ON CONFLICT (ticket_id) DO NOTHING RETURNING 1"
)
# A ticket under a code known to be free (Tx.fresh_ticket): a clash fails.
TICKET_ROW_INSERT = (
    "INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)"
    " VALUES (?, ?, 'active', ?, ?, ?)"
)
TICKET_LEG_INSERT = (
    "INSERT INTO ticket_legs (ticket_id, leg, flight_id, number, origin, destination, departure,"
    " arrival, seat, price_cents) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The same where a ticket's legs carry its time of sale: SQLite keys them by
# it (its migration 9), so that a batch's legs go at the end of the table.
TIMED_TICKET_LEG_INSERT = (
    "INSERT INTO ticket_legs (ticket_id, leg, flight_id, number, origin, destination, departure,"
    " arrival, seat, price_cents, bought_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SEAT_INSERT = "INSERT INTO seats (flight_id, seat, hold_id, ticket_id) VALUES (?, ?, ?, ?)"
AUDIT_INSERT = "INSERT INTO audit (at, username, action, hold_id, ticket_id, seats) VALUES (?, ?, ?, ?, ?, ?)"
REQUEST_INSERT = "INSERT INTO requests (username, request_id, kind, outcome, created_at) VALUES (?, ?, ?, ?, ?)"
HOLD_INSERT = (
    "INSERT INTO holds (hold_id, username, session_id, created_at, expires_at, price_cents, state)"
    " VALUES (?, ?, ?, ?, ?, ?, 'active')"
)
HOLD_LEG_INSERT = "INSERT INTO hold_legs (hold_id, leg, flight_id, seat) VALUES (?, ?, ?, ?)"
# A hold bought: its seats go to the ticket, and the hold is ended, for
# rows (hold_id, ticket_id) and (hold_id, ended_at): one statement each for
# many holds (the VALUES list repeated).
SEATS_SOLD = (
    "UPDATE seats SET hold_id = NULL, ticket_id = v.column2 FROM (VALUES (?, ?)) AS v"
    " WHERE seats.hold_id = v.column1"
)
HOLDS_BOUGHT = (
    "UPDATE holds SET state = 'bought', ended_at = v.column2 FROM (VALUES (?, ?)) AS v"
    " WHERE holds.hold_id = v.column1 AND holds.state = 'active'"
)


def new_ticket_legs(legs: Iterable[tuple[Flight, str]]) -> tuple[TicketLeg, ...]:
    return tuple(
        TicketLeg(
            flight_id=flight.flight_id,
            number=flight.number,
            origin=flight.origin,
            destination=flight.destination,
            departure=flight.departure_iso,
            arrival=flight.arrival_iso,
            seat=seat,
            price=flight.fare,
        )
        for flight, seat in legs
    )


def ticket_leg_rows(ticket_id: str, legs: tuple[TicketLeg, ...], bought_at: float | None) -> list[tuple[Any, ...]]:
    """
    The rows of a ticket's legs, with its time of sale last unless it is
    C{None} (a schema whose legs do not carry it).
    """
    rows = [
        (ticket_id, i, leg.flight_id, leg.number, leg.origin, leg.destination, leg.departure, leg.arrival,
         leg.seat, leg.price.cents)
        for i, leg in enumerate(legs)
    ]
    return rows if bought_at is None else [(*row, bought_at) for row in rows]


# The refusals the rules decide inside a transaction, said once (the
# PostgreSQL store's functions return which, and its details).

def request_reused(request_id: str, kind: str) -> InvalidRequest:
    return InvalidRequest(f"request_id {request_id!r} was already used for another operation ({kind}).", field="request_id")


def departed(flight: Flight) -> FlightDeparted:
    return FlightDeparted(f"Flight {flight.flight_id} has already departed.", flight=flight.flight_id)


def asked_twice(flight: Flight, seat: str) -> SeatUnavailable:
    return SeatUnavailable(
        f"Seat {seat} on flight {flight.flight_id} is asked for twice.", flight=flight.flight_id, seat=seat
    )


def over_limit(limit: int, flight_id: str, mine: int) -> PurchaseLimit:
    return PurchaseLimit(
        f"You may have at most {limit} seats on flight {flight_id} (you have {mine}).", limit=limit, flight=flight_id
    )


def hold_not_found(hold_id: str) -> HoldNotFound:
    return HoldNotFound(f"No hold {echo(hold_id)!r}.", hold_id=hold_id)


def hold_expired(hold_id: str) -> HoldExpired:
    return HoldExpired(f"Hold {hold_id} has expired; its seats are free again.", hold_id=hold_id)


def too_many_holds(limit: int, held: int) -> TooManyHolds:
    return TooManyHolds(f"You may hold at most {limit} seats at once (you hold {held}).", limit=limit)


def ticket_not_found(ticket_id: str) -> TicketNotFound:
    return TicketNotFound(f"No ticket {echo(ticket_id)!r}.", ticket_id=ticket_id)


def already_cancelled(ticket_id: str) -> AlreadyCancelled:
    return AlreadyCancelled(f"Ticket {ticket_id} is already cancelled.", ticket_id=ticket_id)


def ticket_departed(ticket_id: str) -> FlightDeparted:
    return FlightDeparted(f"Ticket {ticket_id} cannot be cancelled: its first flight has departed.", ticket_id=ticket_id)


def _seat_names(seats: Iterable[tuple[str, str]]) -> str:
    """
    The audit row's seats, C{["FLIGHT/SEAT", ...]}: C{json.dumps}'s text,
    written out directly when no name needs escaping (flight ids and seat
    names never do).
    """
    names = [f"{f}/{s}" for f, s in seats]
    text = "".join(names)
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '["' + '", "'.join(names) + '"]' if names else "[]"
    return json.dumps(names)


# A customer's tickets of each status, and the index of them (SQLite has one
# per status, so that a purchase writes one; PostgreSQL plans on its own).
_TICKET_INDEXES = (("active", "tickets_user_active"), ("cancelled", "tickets_user_cancelled"))


@attrs.define(eq=False)
class SeatRules:
    """
    The seat rules' transactions. Every method takes the L{Tx} it runs in;
    the store runs it, commits it, and tells the caller.
    """

    network: Network
    max_held_seats: int = 9
    # How many seats (held or bought) one customer may have on one flight;
    # None: no limit.
    max_seats_per_flight: int | None = None
    currency: str = attrs.field(init=False)
    # The flights of held seats, by id, as flight_by_id makes them.
    _flights: dict[str, Flight] = attrs.field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        self.currency = self.network.currency

    def flight(self, flight_id: str) -> Flight:
        """
        The flight C{flight_id} of the network (L{flight_by_id}), made once:
        a hold records its flights by id, and every purchase of a hold
        needs them again.
        """
        flight = self._flights.get(flight_id)
        if flight is None:
            flight = flight_by_id(self.network, flight_id)
            if len(self._flights) >= FLIGHTS_KEPT:
                self._flights.clear()
            self._flights[flight_id] = flight
        return flight

    # -- retries and the audit log ------------------------------------------

    def replay(self, tx: Tx, username: str, request_id: str | None, kind: str) -> str | None:
        """
        The outcome recorded for C{request_id} of C{username}, if that
        request was already done: then it is answered again, not done twice.
        The same request running at once on two connections (a client
        retrying through another server) takes turns on the request's lock,
        the first of its transaction: the second one finds the first one's
        outcome here.
        """
        if request_id is None:
            return None
        tx.lock_request(username, request_id)
        row = tx.request_outcome(username, request_id)
        if row is None:
            return None
        if row[0] != kind:
            raise request_reused(request_id, row[0])
        return row[1]

    def remember(self, tx: Tx, username: str, request_id: str | None, kind: str, outcome: str) -> None:
        # Two servers doing the same request at once: the second one's
        # insert fails with a unique violation, and its retry replays the
        # first one's outcome.
        if request_id is not None:
            tx.keep(REQUEST_INSERT, [(username, request_id, kind, outcome, tx.now)], [("request", username, request_id)])

    def audit(
        self,
        tx: Tx,
        username: str,
        action: str,
        seats: Iterable[tuple[str, str]],
        hold_id: str | None = None,
        ticket_id: str | None = None,
    ) -> None:
        """
        Append one change of seat state to the audit log.
        """
        tx.append(AUDIT_INSERT, [(tx.now, username, action, hold_id, ticket_id, _seat_names(seats))])

    # -- users --------------------------------------------------------------

    def add_user(self, tx: Tx, username: str, password_hash: str) -> None:
        row = tx.one(
            "INSERT INTO users (username, password_hash, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (username) DO NOTHING RETURNING 1",
            (username, password_hash, tx.now),
        )
        if row is None:
            raise UsernameTaken(f"The username {username!r} is already taken.")

    def password_hash(self, tx: Tx, username: str) -> str | None:
        row = tx.one("SELECT password_hash FROM users WHERE username = ?", (username,))
        return None if row is None else str(row[0])

    # -- holds ending ---------------------------------------------------------

    def end_hold(self, tx: Tx, hold_id: str, state: str) -> bool:
        """
        End an active hold (C{state} is C{"released"} or C{"expired"}) and
        free its seats; whether it was active. The conditional update locks
        the hold first: of two transactions ending it, the second finds it
        ended and does nothing.
        """
        tx.reading_hold(hold_id)
        ended = tx.one(
            "UPDATE holds SET state = ?, ended_at = ? WHERE hold_id = ? AND state = 'active'"
            " RETURNING username, session_id",
            (state, tx.now, hold_id),
        )
        if ended is None:
            return False
        seats = tx.all("SELECT flight_id, seat FROM hold_legs WHERE hold_id = ? ORDER BY leg", (hold_id,))
        tx.execute("DELETE FROM seats WHERE hold_id = ?", (hold_id,))
        self.audit(tx, ended[0], "expire" if state == "expired" else "release", seats, hold_id=hold_id)
        if state == "expired":
            tx.ended.append((hold_id, ended[1]))
        return True

    def end_expired_on(self, tx: Tx, flight_ids: list[str]) -> None:
        """
        End the holds on these flights whose time is up.
        """
        tx.ending_holds()
        for (hold_id,) in tx.all(
            f"SELECT DISTINCT s.hold_id FROM seats s{tx.held_seats_index} JOIN holds h ON h.hold_id = s.hold_id"
            f" WHERE s.flight_id IN ({_marks(len(flight_ids))}) AND s.hold_id IS NOT NULL AND h.state = 'active'"
            f" AND h.expires_at <= ? ORDER BY {tx.hold_order('h', 's.hold_id')}",
            (*flight_ids, tx.now),
        ):
            self.end_hold(tx, hold_id, "expired")

    def active_hold(self, tx: Tx, hold_id: str, username: str) -> None:
        """
        Lock C{hold_id} and check that it is an active hold of C{username};
        if its time is up, end it (that commits) and refuse.
        """
        tx.reading_hold(hold_id)
        row = tx.one(
            f"SELECT username, state, expires_at FROM holds WHERE hold_id = ?{tx.for_update()}", (hold_id,)
        )
        self.check_active(tx, hold_id, username, row)

    def check_active(self, tx: Tx, hold_id: str, username: str, row: tuple[Any, ...] | None) -> None:
        """
        Refuse unless C{row} (the hold's C{username, state, expires_at}, read
        locked; C{None}: no such hold) is an active hold of C{username}; if
        its time is up, end it (that commits) and refuse.
        """
        if row is None or row[0] != username or row[1] in ("released", "bought"):
            raise hold_not_found(hold_id)
        if row[1] == "expired" or row[2] <= tx.now:
            self.end_hold(tx, hold_id, "expired")
            raise hold_expired(hold_id)

    def release(self, tx: Tx, hold_id: str, username: str, request_id: str | None = None) -> None:
        if self.replay(tx, username, request_id, "release") is not None:
            return
        self.active_hold(tx, hold_id, username)
        self.end_hold(tx, hold_id, "released")
        self.remember(tx, username, request_id, "release", hold_id)

    def release_session(self, tx: Tx, session_id: str) -> list[str]:
        tx.ending_holds()
        holds = tx.all(
            f"SELECT hold_id FROM holds WHERE session_id = ? AND state = 'active' ORDER BY {tx.hold_order('holds', 'hold_id')}",
            (session_id,),
        )
        return [hold_id for (hold_id,) in holds if self.end_hold(tx, hold_id, "released")]

    def expire_hold(self, tx: Tx, hold_id: str) -> str | None:
        tx.reading_hold(hold_id)
        row = tx.one(f"SELECT state, expires_at FROM holds WHERE hold_id = ?{tx.for_update()}", (hold_id,))
        if row is None:
            return None
        state, expires_at = row
        if state == "active" and expires_at <= tx.now:
            self.end_hold(tx, hold_id, "expired")
            return "expired"
        return str(state)

    def expired_holds(self, tx: Tx, limit: int = 1000) -> list[tuple[str, str]]:
        """
        End up to C{limit} holds whose time is up (passing over those that
        another server's sweep is ending right now), and forget the
        requests and ended holds older than L{REQUEST_RETENTION}.
        """
        tx.ending_holds()
        rows = tx.all(
            "SELECT hold_id, session_id FROM holds WHERE state = 'active' AND expires_at <= ?"
            f" ORDER BY {tx.hold_order('holds', 'hold_id')} LIMIT {int(limit)}{tx.skip_locked()}",
            (tx.now,),
        )
        for hold_id, _ in rows:
            self.end_hold(tx, hold_id, "expired")
        tx.execute("DELETE FROM requests WHERE created_at < ?", (tx.now - REQUEST_RETENTION,))
        tx.execute("DELETE FROM holds WHERE state <> 'active' AND ended_at < ?", (tx.now - REQUEST_RETENTION,))
        return [(str(h), str(s)) for h, s in rows]

    # -- claims -------------------------------------------------------------

    def claim(self, tx: Tx, legs: list[LegRequest]) -> list[str]:
        """
        Choose one seat per leg, or refuse: lock the flights, end their
        expired holds, and check (or pick) each seat. Writes nothing else:
        the caller then takes the seats with L{take}.
        """
        for leg in legs:
            if leg.flight.departs_ts <= tx.now:
                raise departed(leg.flight)
        flight_ids = [leg.flight.flight_id for leg in legs]
        tx.lock_flights(flight_ids)
        flights = {leg.flight.flight_id: leg.flight for leg in legs}
        locked = sorted(flights)
        if tx.expiry_due([flights[flight_id] for flight_id in locked]):
            self.end_expired_on(tx, locked)
        seats: list[str] = []
        for leg in legs:
            flight = leg.flight
            if leg.seat is None:
                seat = tx.free_seat(flight, [s for f, s in zip(flight_ids, seats) if f == flight.flight_id])
            else:
                seat = leg.seat
                check_seat(flight, seat)
                if (flight.flight_id, seat) in zip(flight_ids, seats):
                    raise asked_twice(flight, seat)
                claimant = tx.seat_claimant(flight, seat)
                if claimant is not None:
                    raise seat_taken(flight, seat, *claimant)
            seats.append(seat)
        return seats

    def check_seats_per_flight(self, tx: Tx, username: str, legs: list[LegRequest]) -> None:
        """
        Refuse if C{legs} would give C{username} more than
        C{max_seats_per_flight} seats (held or in active tickets) on a
        flight. Runs after L{claim}, which locked the flights (and ended
        their expired holds): claims of the same flight take turns.
        """
        limit = self.max_seats_per_flight
        if limit is None:
            return
        # The seats and tickets kept for later are counted too.
        tx.appended()
        asked: dict[str, int] = {}
        for leg in legs:
            asked[leg.flight.flight_id] = asked.get(leg.flight.flight_id, 0) + 1
        for flight_id, more in sorted(asked.items()):
            (mine,) = tx.one(
                "SELECT COUNT(*) FROM seats s LEFT JOIN holds h ON h.hold_id = s.hold_id"
                " LEFT JOIN tickets t ON t.ticket_id = s.ticket_id"
                " WHERE s.flight_id = ? AND (t.username = ? OR h.username = ? AND h.expires_at > ?)",
                (flight_id, username, username, tx.now),
            )
            if mine + more > limit:
                raise over_limit(limit, flight_id, mine)

    def take(
        self,
        tx: Tx,
        legs: list[LegRequest],
        seats: list[str],
        hold_id: str | None,
        ticket_id: str | None,
        expires_at: float | None = None,
    ) -> None:
        """
        Claim the seats L{claim} chose for a hold (until C{expires_at}) or a
        ticket.
        """
        tx.insert_seats(
            [(leg.flight.flight_id, seat, hold_id, ticket_id) for leg, seat in zip(legs, seats)], expires_at
        )

    def hold(
        self,
        tx: Tx,
        username: str,
        session_id: str,
        legs: list[LegRequest],
        seconds: float,
        alive: Callable[[], bool],
        request_id: str | None = None,
    ) -> Hold:
        done = self.replay(tx, username, request_id, "hold")
        if done is not None:
            return self.hold_by_id(tx, done)
        # Checked inside the transaction: a connection that closed while
        # this hold waited must not leave an orphaned hold behind.
        if not alive():
            raise SessionClosed()
        # One hold at a time per customer, whichever server: the limit on
        # held seats cannot be passed by holding on two at once.
        tx.lock_user(username)
        held = tx.held_seats(username)
        if held + len(legs) > self.max_held_seats:
            raise too_many_holds(self.max_held_seats, held)
        seats = self.claim(tx, legs)
        self.check_seats_per_flight(tx, username, legs)
        hold_id = hold_code(tx.now)
        expires_at = tx.now + seconds
        price = Money(sum(leg.flight.fare.cents for leg in legs), self.currency)
        # Read back by its id, its customer's next hold, or its session's end.
        tx.keep(
            HOLD_INSERT,
            [(hold_id, username, session_id, tx.now, expires_at, price.cents)],
            [("hold", hold_id), ("user", username)],
        )
        self.take(tx, legs, seats, hold_id, None, expires_at)
        tx.keep(
            HOLD_LEG_INSERT,
            [(hold_id, i, leg.flight.flight_id, seat) for i, (leg, seat) in enumerate(zip(legs, seats))],
            [("hold", hold_id)],
        )
        self.audit(tx, username, "hold", [(leg.flight.flight_id, seat) for leg, seat in zip(legs, seats)],
                   hold_id=hold_id)
        self.remember(tx, username, request_id, "hold", hold_id)
        return Hold(
            hold_id=hold_id,
            username=username,
            legs=tuple(HeldSeat(leg.flight, seat) for leg, seat in zip(legs, seats)),
            expires_at=expires_at,
            price=price,
        )

    def hold_by_id(self, tx: Tx, hold_id: str) -> Hold:
        tx.reading_hold(hold_id)
        username, expires_at, price = tx.one(
            "SELECT username, expires_at, price_cents FROM holds WHERE hold_id = ?", (hold_id,)
        )
        legs = tuple(
            HeldSeat(self.flight(flight_id), seat)
            for flight_id, seat in tx.all("SELECT flight_id, seat FROM hold_legs WHERE hold_id = ? ORDER BY leg", (hold_id,))
        )
        return Hold(hold_id, username, legs, expires_at, Money(price, self.currency))

    # -- tickets ------------------------------------------------------------

    def new_ticket(self, tx: Tx, username: str, flights: list[Flight]) -> str:
        """
        Insert a ticket (without its legs) under a fresh booking code (the
        store may keep its row for later: L{Tx.fresh_ticket}).
        """
        price = sum(flight.fare.cents for flight in flights)
        fresh = tx.fresh_ticket(username, price, self.currency)
        if fresh is not None:
            return fresh
        for attempt in range(16):
            # After a few clashes (a day of hundreds of millions of sales),
            # any free code will do.
            ticket_id = booking_code(tx.now if attempt < 8 else None)
            if tx.one(TICKET_INSERT, (ticket_id, username, price, self.currency, tx.now)) is not None:
                return ticket_id
        raise RuntimeError("no free booking code found")

    def ticket_legs(self, tx: Tx, ticket_id: str, username: str, legs: list[tuple[Flight, str]]) -> Ticket:
        """
        Record the legs of a new ticket and return it.
        """
        ticket_legs = new_ticket_legs(legs)
        if tx.legs_by_time:
            tx.append(TIMED_TICKET_LEG_INSERT, ticket_leg_rows(ticket_id, ticket_legs, tx.now))
        else:
            tx.append(TICKET_LEG_INSERT, ticket_leg_rows(ticket_id, ticket_legs, None))
        return self.new_ticket_value(ticket_id, username, ticket_legs, tx.now)

    def new_ticket_value(self, ticket_id: str, username: str, legs: tuple[TicketLeg, ...], now: float) -> Ticket:
        """
        A ticket just bought, as its customer is told of it.
        """
        price = Money(sum(leg.price.cents for leg in legs), self.currency)
        return Ticket(ticket_id, username, "active", legs, price, now, None)

    def buy(self, tx: Tx, username: str, legs: list[LegRequest], request_id: str | None = None) -> Ticket:
        done = self.replay(tx, username, request_id, "buy")
        if done is not None:
            return self.ticket_as_bought(tx, done)
        seats = self.claim(tx, legs)
        self.check_seats_per_flight(tx, username, legs)
        ticket_id = self.new_ticket(tx, username, [leg.flight for leg in legs])
        self.take(tx, legs, seats, None, ticket_id)
        chosen = [(leg.flight, seat) for leg, seat in zip(legs, seats)]
        self.audit(tx, username, "buy", [(f.flight_id, seat) for f, seat in chosen], ticket_id=ticket_id)
        self.remember(tx, username, request_id, "buy", ticket_id)
        return self.ticket_legs(tx, ticket_id, username, chosen)

    def buy_hold(self, tx: Tx, hold_id: str, username: str, request_id: str | None = None) -> Ticket:
        done = self.replay(tx, username, request_id, "buy")
        if done is not None:
            return self.ticket_as_bought(tx, done)
        rows = tx.hold_for_sale(hold_id)
        self.check_active(tx, hold_id, username, rows[0][:3] if rows else None)
        legs = []
        for _, _, _, flight_id, seat in rows:
            flight = self.flight(flight_id)
            if flight.departs_ts <= tx.now:
                raise departed(flight)
            legs.append((flight, seat))
        ticket_id = self.new_ticket(tx, username, [flight for flight, _ in legs])
        tx.sell_hold(hold_id, username, ticket_id, [(flight.flight_id, seat) for flight, seat in legs])
        self.audit(tx, username, "buy", [(f.flight_id, seat) for f, seat in legs], hold_id=hold_id, ticket_id=ticket_id)
        self.remember(tx, username, request_id, "buy", ticket_id)
        return self.ticket_legs(tx, ticket_id, username, legs)

    def tickets(self, tx: Tx, username: str) -> list[Ticket]:
        # A customer's tickets by the index of each status (a purchase keeps
        # only one of them up to date: the active one).
        mine = " UNION ALL ".join(
            f"SELECT ticket_id FROM tickets{tx.index_hint(index)} WHERE username = ? AND status = '{status}'"
            for status, index in _TICKET_INDEXES
        )
        return self.find_tickets(tx, f"t.ticket_id IN ({mine})", (username,) * len(_TICKET_INDEXES))

    def ticket_page(
        self, tx: Tx, username: str, limit: int, after: tuple[float, int] | None = None, active_only: bool = False
    ) -> TicketPage:
        """
        At most C{limit} tickets of C{username}, newest first (by purchase
        time, then order of sale), starting after the key C{after}: a
        keyset page that reads at most C{limit} + 1 rows of the index of
        each status it shows, whatever the customer's history.
        """
        order = tx.ticket_order
        keys: list[tuple[Any, ...]] = []
        # One keyset read per status, each on its own index, merged: each
        # reads at most limit + 1 rows whatever the customer's history.
        for status, index in _TICKET_INDEXES[:1] if active_only else _TICKET_INDEXES:
            where = f"username = ? AND status = '{status}'"
            args: list[Any] = [username]
            if after is not None:
                where += f" AND (bought_at, {order}) < (?, ?)"
                args += list(after)
            keys += tx.all(
                f"SELECT ticket_id, bought_at, {order} FROM tickets{tx.index_hint(index)} WHERE {where}"
                f" ORDER BY bought_at DESC, {order} DESC LIMIT ?",
                (*args, limit + 1),
            )
        keys.sort(key=lambda key: (key[1], key[2]), reverse=True)
        more = len(keys) > limit
        keys = keys[:limit]
        if not keys:
            return TicketPage(())
        found = self.find_tickets(tx, f"t.ticket_id IN ({_marks(len(keys))})", tuple(k[0] for k in keys))
        found.reverse()
        last = keys[-1]
        return TicketPage(tuple(found), (last[1], last[2]) if more else None)

    def find_tickets(self, tx: Tx, where: str, args: tuple[Any, ...], lock: bool = False) -> list[Ticket]:
        """
        The tickets C{where} says (a condition on C{tickets t}), oldest first.
        """
        tx.appended()
        found: dict[str, tuple[Any, ...]] = {}
        legs: dict[str, list[TicketLeg]] = {}
        for (ticket_id, username, status, price, currency, bought_at, cancelled_at,
             flight_id, number, origin, destination, departure, arrival, seat, cents) in tx.all(
            "SELECT t.ticket_id, t.username, t.status, t.price_cents, t.currency, t.bought_at, t.cancelled_at,"
            " l.flight_id, l.number, l.origin, l.destination, l.departure, l.arrival, l.seat, l.price_cents"
            f" FROM tickets t JOIN ticket_legs l ON {tx.legs_of_ticket} WHERE {where}"
            f" ORDER BY t.bought_at, t.{tx.ticket_order}, l.leg" + (tx.for_update("t") if lock else ""),
            args,
        ):
            if ticket_id not in found:
                found[ticket_id] = (ticket_id, username, status, Money(price, currency), bought_at, cancelled_at)
                legs[ticket_id] = []
            legs[ticket_id].append(
                TicketLeg(flight_id, number, origin, destination, departure, arrival, seat, Money(cents, currency))
            )
        return [
            Ticket(ticket_id, username, status, tuple(legs[ticket_id]), price, bought_at, cancelled_at)
            for ticket_id, username, status, price, bought_at, cancelled_at in found.values()
        ]

    def ticket_as_bought(self, tx: Tx, ticket_id: str) -> Ticket:
        """
        A ticket as its purchase was acknowledged (whatever happened to it since).
        """
        [ticket] = self.find_tickets(tx, "t.ticket_id = ?", (ticket_id,))
        return attrs.evolve(ticket, status="active", cancelled_at=None)

    def cancel(self, tx: Tx, ticket_id: str, username: str, request_id: str | None = None) -> Ticket:
        done = self.replay(tx, username, request_id, "cancel")
        if done is not None:
            [cancelled] = self.find_tickets(tx, "t.ticket_id = ?", (done,))
            return cancelled
        found = self.find_tickets(tx, "t.ticket_id = ? AND t.username = ?", (ticket_id, username), lock=True)
        if not found:
            raise ticket_not_found(ticket_id)
        [ticket] = found
        if ticket.status == "cancelled":
            raise already_cancelled(ticket_id)
        first = min(datetime.fromisoformat(leg.departure).timestamp() for leg in ticket.legs)
        if first <= tx.now:
            raise ticket_departed(ticket_id)
        tx.execute(
            "UPDATE tickets SET status = 'cancelled', cancelled_at = ?"
            " WHERE ticket_id = ? AND username = ? AND status = 'active'",
            (tx.now, ticket_id, username),
        )
        # By the seats' own key, from the legs (no index on seats.ticket_id
        # is needed, and a purchase keeps one index fewer up to date).
        tx.executemany(
            "DELETE FROM seats WHERE flight_id = ? AND seat = ? AND ticket_id = ?",
            [(leg.flight_id, leg.seat, ticket_id) for leg in ticket.legs],
        )
        self.audit(tx, username, "cancel", [(leg.flight_id, leg.seat) for leg in ticket.legs], ticket_id=ticket_id)
        self.remember(tx, username, request_id, "cancel", ticket_id)
        return Ticket(ticket_id, username, "cancelled", ticket.legs, ticket.price, ticket.bought_at, tx.now)

    # -- reading seats ------------------------------------------------------

    def seats(self, tx: Tx, flight: Flight) -> list[SeatState]:
        tx.appended()
        rows = tx.all(
            "SELECT s.seat, h.username, h.expires_at, t.username FROM seats s"
            " LEFT JOIN holds h ON h.hold_id = s.hold_id"
            " LEFT JOIN tickets t ON t.ticket_id = s.ticket_id WHERE s.flight_id = ?",
            (flight.flight_id,),
        )
        return seat_map(flight, rows, tx.now)

    def free_seats(self, tx: Tx, flights: list[Flight]) -> dict[str, int]:
        """
        The free seats of each flight: its capacity less its sold seats and
        those of holds whose time is not up.
        """
        tx.appended()
        result = {flight.flight_id: flight.aircraft.capacity for flight in flights}
        ids = list(result)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for flight_id, taken in tx.all(
                "SELECT s.flight_id, COUNT(*) FROM seats s LEFT JOIN holds h ON h.hold_id = s.hold_id"
                f" WHERE s.flight_id IN ({_marks(len(chunk))}) AND (s.ticket_id IS NOT NULL OR h.expires_at > ?)"
                " GROUP BY s.flight_id",
                (*chunk, tx.now),
            ):
                result[flight_id] -= taken
        return result


# What a write reads first, named as Tx.keep's keys: ("request", username,
# request_id), ("hold", hold_id) (a hold bought), ("user", username) (the
# customer's held seats counted).
Reads = tuple[tuple[str, ...], ...]


@attrs.frozen
class Asked:
    """
    A callable argument of a L{Work} (a hold's C{alive}) as it answered when
    the work was shipped (L{Work.shipped}): a value that can travel.
    """

    answer: Any

    def __call__(self) -> Any:
        return self.answer


@attrs.frozen
class Work:
    """
    One transaction of the rules: which L{SeatRules} method (C{rule}) and
    its arguments after the transaction. Calling it with a L{Tx} runs it on
    C{rules}. A description rather than a closure, so that a store can run
    it in another process (L{vendepass.store.sqlite}'s writer process):
    there, C{rules} is that process's own copy (C{rules} pickles as a
    reference that the other side resolves, see L{Work.shipped}).
    """

    rules: SeatRules = attrs.field(eq=False, repr=False)
    rule: str
    args: tuple[Any, ...]

    def __call__(self, tx: Tx) -> Any:
        return getattr(self.rules, self.rule)(tx, *self.args)

    def shipped(self) -> Work:
        """
        This work as it can travel to another process: each callable
        argument (a hold's C{alive}) asked now and replaced by its answer.
        Asking before the transaction instead of inside it is as safe for
        C{alive}: a connection that closes after this releases its
        session's holds in a write queued after this one.
        """
        if not any(callable(arg) and not isinstance(arg, Asked) for arg in self.args):
            return self
        return attrs.evolve(
            self, args=tuple(arg if isinstance(arg, Asked) or not callable(arg) else Asked(arg()) for arg in self.args)
        )


def _request(username: str, request_id: str | None, *more: tuple[str, ...]) -> Reads:
    return more if request_id is None else (("request", username, request_id), *more)


class RulesStore:
    """
    The L{vendepass.store.IStore} methods that change or read seats, each
    one L{SeatRules} transaction: a backend gives C{rules} and its
    transaction runners, C{_write} (a transaction that may change state,
    answered once it is durable) and C{_read}.
    """

    rules: SeatRules
    _watchers: list[Callable[[str, str], None]]
    _log = Logger()

    def _write(self, work: Callable[[Tx], T], reads: Reads = ()) -> Deferred[T]:
        """
        C{reads}: what C{work} reads first (L{SeatRules.replay},
        L{Tx.hold_for_sale}, L{Tx.held_seats}), for a store that reads it
        for many writes at once.
        """
        raise NotImplementedError

    def _read(self, work: Callable[[Tx], T]) -> Deferred[T]:
        raise NotImplementedError

    @property
    def max_held_seats(self) -> int:
        return self.rules.max_held_seats

    @max_held_seats.setter
    def max_held_seats(self, limit: int) -> None:
        self.rules.max_held_seats = limit

    @property
    def max_seats_per_flight(self) -> int | None:
        return self.rules.max_seats_per_flight

    @max_seats_per_flight.setter
    def max_seats_per_flight(self, limit: int | None) -> None:
        self.rules.max_seats_per_flight = limit

    def watch_expiries(self, callback: Callable[[str, str], None]) -> None:
        self._watchers.append(callback)

    def _report(self, ended: list[tuple[str, str]]) -> None:
        """
        On the reactor thread, after the commit: tell the watchers of the
        holds that expired.
        """
        for hold_id, session_id in ended:
            for callback in self._watchers:
                try:
                    callback(hold_id, session_id)
                except Exception:
                    self._log.failure("reporting the expiry of hold {hold_id}", hold_id=hold_id)

    def add_user(self, username: str, password_hash: str) -> Deferred[None]:
        return self._write(Work(self.rules, "add_user", (username, password_hash)))

    def password_hash(self, username: str) -> Deferred[str | None]:
        return self._read(Work(self.rules, "password_hash", (username,)))

    def hold(
        self,
        username: str,
        session_id: str,
        legs: list[LegRequest],
        seconds: float,
        alive: Callable[[], bool],
        request_id: str | None = None,
    ) -> Deferred[Hold]:
        return self._write(
            Work(self.rules, "hold", (username, session_id, legs, seconds, alive, request_id)),
            _request(username, request_id, ("user", username)),
        )

    def release(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[None]:
        return self._write(
            Work(self.rules, "release", (hold_id, username, request_id)), _request(username, request_id)
        )

    def release_session(self, session_id: str) -> Deferred[list[str]]:
        return self._write(Work(self.rules, "release_session", (session_id,)))

    def expire_hold(self, hold_id: str) -> Deferred[str | None]:
        return self._write(Work(self.rules, "expire_hold", (hold_id,)))

    def expired_holds(self) -> Deferred[list[tuple[str, str]]]:
        return self._write(Work(self.rules, "expired_holds", ()))

    def buy_hold(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        return self._write(
            Work(self.rules, "buy_hold", (hold_id, username, request_id)),
            _request(username, request_id, ("hold", hold_id)),
        )

    def buy(self, username: str, legs: list[LegRequest], request_id: str | None = None) -> Deferred[Ticket]:
        return self._write(Work(self.rules, "buy", (username, legs, request_id)), _request(username, request_id))

    def tickets(self, username: str) -> Deferred[list[Ticket]]:
        return self._read(Work(self.rules, "tickets", (username,)))

    def ticket_page(
        self, username: str, limit: int, after: tuple[float, int] | None = None, active_only: bool = False
    ) -> Deferred[TicketPage]:
        return self._read(Work(self.rules, "ticket_page", (username, limit, after, active_only)))

    def cancel(self, ticket_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        return self._write(
            Work(self.rules, "cancel", (ticket_id, username, request_id)), _request(username, request_id)
        )

    def seats(self, flight: Flight) -> Deferred[list[SeatState]]:
        return self._read(Work(self.rules, "seats", (flight,)))

    def free_seats(self, flights: list[Flight]) -> Deferred[dict[str, int]]:
        return self._read(Work(self.rules, "free_seats", (flights,)))


__all__ = ["Asked", "RulesStore", "SeatRules", "Tx", "Work", "new_ticket_legs", "ticket_leg_rows"]
