"""
The SQLite store's copy of its seats in memory, so that a claim picks its
seat, and sees that no hold on its flight has run out, without a statement.

The file stays the durable record, and the database's C{PRIMARY KEY
(flight_id, seat)} still guards every claim; this copy only answers the
questions a claim asks (L{vendepass.store.transactions.Tx.free_seat},
L{vendepass.store.transactions.Tx.seat_claimant},
L{vendepass.store.transactions.Tx.expiry_due}), and only on the writer's
connection, whose thread owns it. It follows the database rather than the
rules: temporary triggers on C{seats} call L{SeatMemory.taken} and
L{SeatMemory.freed} for every row a statement inserts, updates or deletes,
whichever code wrote it, inside the same transaction. So it holds what the
open transaction would commit; every change is logged, and undone if the
transaction rolls back (L{rolled_back}); a transaction whose outcome is not
known (a failed COMMIT, a storage failure) makes it L{stale}, and the next
transaction rebuilds it from the file (L{load}), as opening the store does.

See docs/reliability.md ("The seats in memory").
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Union

from vendepass.model import Flight
from vendepass.store.common import sold_out

# A seat's state: absent (free), sold, or held until an expiry time.
_ABSENT = object()
_SOLD = object()
_State = Union[object, float]

# Per flight: (taken seats, or 0 when it has none; its held seats' sorted expiries).
Availability = dict[str, tuple[int, tuple[float, ...]]]

# While temp.vp_marked has a row, inserting or updating a seat reports
# nothing: the writer's bulk statements for seats it marked itself
# (L{SeatMemory.mark}) call no Python function per row.
MARKED_TABLE = "CREATE TEMP TABLE IF NOT EXISTS vp_marked (marked INTEGER)"
MARKED_ON = "INSERT INTO temp.vp_marked VALUES (1)"
MARKED_OFF = "DELETE FROM temp.vp_marked"

TRIGGERS = (
    "CREATE TEMP TRIGGER IF NOT EXISTS vp_seat_inserted AFTER INSERT ON main.seats"
    " WHEN NOT EXISTS (SELECT 1 FROM temp.vp_marked) BEGIN"
    " SELECT vp_seat_taken(NEW.flight_id, NEW.seat, NEW.ticket_id IS NOT NULL,"
    " (SELECT expires_at FROM main.holds WHERE hold_id = NEW.hold_id)); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS vp_seat_updated AFTER UPDATE ON main.seats"
    " WHEN NOT EXISTS (SELECT 1 FROM temp.vp_marked) BEGIN"
    " SELECT vp_seat_taken(NEW.flight_id, NEW.seat, NEW.ticket_id IS NOT NULL,"
    " (SELECT expires_at FROM main.holds WHERE hold_id = NEW.hold_id)); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS vp_seat_deleted AFTER DELETE ON main.seats BEGIN"
    " SELECT vp_seat_freed(OLD.flight_id, OLD.seat); END",
)


def _flight_rows(execute: Callable[..., Any], flight_id: str) -> list[tuple[str, float | None]]:
    """
    A flight's taken seats as the open transaction sees them: C{(seat,
    expires_at)}, C{None} for a sold seat.
    """
    return list(
        execute(
            "SELECT s.seat, h.expires_at FROM seats s LEFT JOIN holds h ON h.hold_id = s.hold_id"
            " AND s.ticket_id IS NULL WHERE s.flight_id = ?",
            (flight_id,),
        ).fetchall()
    )


class SeatMemory:
    """
    The taken seats (sold, or held until when) of the flights that claims
    have asked about, read from the database the first time (so a new
    store, after a restart, starts empty and reads each flight back from
    the file once).

    @ivar touched: the flights whose seats changed since L{availability}
        was last asked for.
    """

    def __init__(self) -> None:
        # flight -> seats with a row (a key for every flight known here);
        # flight -> its held seats' expiries; flight -> when it departs.
        self._taken: dict[str, set[str]] = {}
        self._held: dict[str, dict[str, float]] = {}
        self._departs: dict[str, float] = {}
        # flight -> an index of its seat map before which no seat is free.
        self._low: dict[str, int] = {}
        # The open transaction's changes, (flight, seat, state before), and
        # the flights it read from the database.
        self._undo: list[tuple[str, str, _State]] = []
        self._loaded: list[str] = []
        self.touched: set[str] = set()
        self._next_prune = 0.0

    # -- following the database -------------------------------------------

    def install(self, db: sqlite3.Connection) -> None:
        """
        Have C{db}'s changes of C{seats} reported here.
        """
        db.create_function("vp_seat_taken", 4, self._taken_row)
        db.create_function("vp_seat_freed", 2, self._freed_row)
        db.execute(MARKED_TABLE)
        for trigger in TRIGGERS:
            db.execute(trigger)

    def _taken_row(self, flight_id: str, seat: str, sold: int, expires_at: float | None) -> None:
        self._set(flight_id, seat, _SOLD if sold or expires_at is None else float(expires_at))

    def _freed_row(self, flight_id: str, seat: str) -> None:
        self._set(flight_id, seat, _ABSENT)

    def __contains__(self, flight_id: object) -> bool:
        """
        Whether flight C{flight_id}'s seats are known here.
        """
        return flight_id in self._taken

    def mark(self, flight_id: str, seat: str, expires_at: float | None) -> bool:
        """
        Mark a seat sold (C{expires_at} C{None}) or held until C{expires_at}
        ahead of its row, which the open transaction inserts later between
        L{MARKED_ON} and L{MARKED_OFF}; C{False} (and nothing marked) if the
        flight is not known here: insert it at once.
        """
        if flight_id not in self._taken:
            return False
        self._set(flight_id, seat, _SOLD if expires_at is None else float(expires_at))
        return True

    def _known(self, execute: Callable[..., Any], flight: Flight) -> set[str]:
        """
        The flight's taken seats, read from the database if not known yet.
        """
        flight_id = flight.flight_id
        taken = self._taken.get(flight_id)
        if taken is not None:
            return taken
        taken = set()
        held: dict[str, float] = {}
        for seat, expires_at in _flight_rows(execute, flight_id):
            taken.add(seat)
            if expires_at is not None:
                held[seat] = float(expires_at)
        self._taken[flight_id] = taken
        if held:
            self._held[flight_id] = held
        self._departs[flight_id] = flight.departs_ts
        self._loaded.append(flight_id)
        return taken

    def _state(self, flight_id: str, seat: str) -> _State:
        taken = self._taken.get(flight_id)
        if taken is None or seat not in taken:
            return _ABSENT
        return self._held.get(flight_id, {}).get(seat, _SOLD)

    def _set(self, flight_id: str, seat: str, state: _State, log: bool = True) -> None:
        self.touched.add(flight_id)
        taken = self._taken.get(flight_id)
        if taken is None:
            # Not known here: read from the database when first asked.
            return
        if log:
            self._undo.append((flight_id, seat, self._state(flight_id, seat)))
        held = self._held.get(flight_id)
        if held is not None:
            held.pop(seat, None)
            if not held:
                del self._held[flight_id]
        if state is _ABSENT:
            taken.discard(seat)
            # A seat came free: look from the front again.
            self._low.pop(flight_id, None)
            return
        taken.add(seat)
        if state is not _SOLD:
            assert isinstance(state, float)
            self._held.setdefault(flight_id, {})[seat] = state

    def _forget(self, flight_id: str) -> None:
        self._taken.pop(flight_id, None)
        self._held.pop(flight_id, None)
        self._departs.pop(flight_id, None)
        self._low.pop(flight_id, None)

    # -- the transaction ----------------------------------------------------

    def begun(self, now: float) -> None:
        """
        A transaction starts: what came before it is committed. Now and
        then, forget the flights that have departed (no claim asks of them).
        """
        self._undo = []
        self._loaded = []
        if now >= self._next_prune:
            self._next_prune = now + 600.0
            for flight_id in [f for f, departs in self._departs.items() if departs <= now]:
                self._forget(flight_id)

    def committed(self) -> None:
        self._undo = []
        self._loaded = []

    def rolled_back(self) -> None:
        """
        The open transaction rolled back: undo its changes, newest first,
        and forget the flights it read (it may have read its own writes).
        """
        undo, self._undo = self._undo, []
        for flight_id, seat, state in reversed(undo):
            self._set(flight_id, seat, state, log=False)
        loaded, self._loaded = self._loaded, []
        for flight_id in loaded:
            self._forget(flight_id)

    def forget(self) -> None:
        """
        Forget everything (after a transaction whose outcome is not known):
        each flight is read back from the file when next asked about.
        """
        self.touched.update(self._taken)
        for flight_id in list(self._taken):
            self._forget(flight_id)
        self._undo = []
        self._loaded = []

    # -- answering claims ---------------------------------------------------

    def expiry_due(self, execute: Callable[..., Any], flights: list[Flight], now: float) -> bool:
        for flight in flights:
            self._known(execute, flight)
            held = self._held.get(flight.flight_id)
            if held is not None and min(held.values()) <= now:
                return True
        return False

    def free_seat(self, execute: Callable[..., Any], flight: Flight, chosen: list[str]) -> str:
        flight_id = flight.flight_id
        taken = self._known(execute, flight)
        seats = flight.aircraft.seats()
        low = None
        for i in range(self._low.get(flight_id, 0), len(seats)):
            seat = seats[i]
            if seat in taken:
                continue
            if low is None:
                low = i
            if seat not in chosen:
                self._low[flight_id] = low
                return seat
        raise sold_out(flight)

    def seat_claimant(self, execute: Callable[..., Any], flight: Flight, seat: str) -> tuple[object, float | None] | None:
        self._known(execute, flight)
        state = self._state(flight.flight_id, seat)
        if state is _ABSENT:
            return None
        if state is _SOLD:
            return (True, None)
        assert isinstance(state, float)
        return (None, state)

    # -- for the free seat counts and the tests ------------------------------

    def availability(self, execute: Callable[..., Any]) -> Availability:
        """
        In the open transaction: the taken seats and held seats' expiries
        of the flights touched since the last call (C{(0, ())} for a flight
        with none left), read from the database for those not known here.
        """
        touched, self.touched = self.touched, set()
        found: Availability = {}
        for flight_id in touched:
            taken = self._taken.get(flight_id)
            if taken is not None:
                found[flight_id] = (len(taken), tuple(sorted(self._held.get(flight_id, {}).values())))
            else:
                rows = _flight_rows(execute, flight_id)
                found[flight_id] = (len(rows), tuple(sorted(e for _, e in rows if e is not None)))
        return found

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        """
        The known flights' taken seats: each one's hold's expiry, or
        C{None} if sold.
        """
        return {
            flight_id: {seat: self._held.get(flight_id, {}).get(seat) for seat in taken}
            for flight_id, taken in self._taken.items()
        }

    def read_back(self, execute: Callable[..., Any]) -> dict[str, dict[str, float | None]]:
        """
        The same flights as L{snapshot}, as the database has them.
        """
        return {flight_id: dict(_flight_rows(execute, flight_id)) for flight_id in self._taken}
