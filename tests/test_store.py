"""
Contract tests of L{IStore}, run against every backend (txacme style: the
mixin holds the tests, each backend's test case says how to make a store).

Everything here is synchronous: the store runs on an L{InlineExecutor}
and reads its time from a L{Clock}, so every Deferred has fired by the
time the call returns. (No L{ThreadExecutor} or real reactor is needed.)
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.common import ALICE, BIG, BOB, DIRECT, FAST_HASHER, MINI, START, TINY, QueueExecutor
from vendepass.errors import (
    AlreadyCancelled,
    FlightDeparted,
    HoldExpired,
    HoldNotFound,
    PurchaseLimit,
    SeatUnavailable,
    SessionClosed,
    SoldOut,
    TicketNotFound,
    UnknownSeat,
    UsernameTaken,
)
from vendepass.fixtures import Fixtures, load
from vendepass.model import Flight, Hold, Money, SeatState, Ticket, TicketPage, iso_utc
from vendepass.schedule import flight_by_id
from vendepass.store import IExecutor, IStore, InlineExecutor, LegRequest
from vendepass.store.postgres import PostgresStore
from vendepass.store.sqlite import SQLiteStore
from tests import pg

HOUR = 3600.0

# TINY (VP100 on 2026-12-02) leaves Salvador at 08:00 local, 11:00 UTC.
TINY_DEPARTS = START + 26 * HOUR


def _alive() -> bool:
    return True


def _dead() -> bool:
    return False


class StoreContractMixin:
    """
    The behaviour every L{IStore} must have. Mix into a
    L{SynchronousTestCase} and define L{make_store}.
    """

    # Provided by SynchronousTestCase.
    successResultOf: Callable[..., Any]
    failureResultOf: Callable[..., Any]
    addCleanup: Callable[..., Any]
    assertEqual: Callable[..., Any]
    assertTrue: Callable[..., Any]
    assertFalse: Callable[..., Any]
    assertIn: Callable[..., Any]
    assertIsNone: Callable[..., Any]
    assertIsInstance: Callable[..., Any]
    assertNotEqual: Callable[..., Any]
    assertNotIn: Callable[..., Any]
    assertRaises: Callable[..., Any]

    def make_store(self, clock: Clock) -> IStore:
        """
        A new, started store loaded with C{tests/data/mini.json}, whose
        time is C{clock}.
        """
        raise NotImplementedError(f"{type(self).__name__} must define make_store")

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = self.make_store(self.clock)
        self.network = self.store.network()
        self.tiny = flight_by_id(self.network, TINY)
        self.big = flight_by_id(self.network, BIG)
        self.direct = flight_by_id(self.network, DIRECT)

    # -- helpers ------------------------------------------------------------

    def ok(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)

    def refused(self, d: Deferred[Any], kind: type[BaseException]) -> Any:
        return self.failureResultOf(d, kind).value

    def hold(
        self,
        username: str,
        *legs: tuple[Flight, str | None],
        session: str = "S1",
        seconds: float = 60,
        alive: Callable[[], bool] = _alive,
    ) -> Deferred[Hold]:
        return self.store.hold(
            username,
            session,
            [LegRequest(flight, seat) for flight, seat in legs],
            seconds,
            alive,
        )

    def buy(self, username: str, *legs: tuple[Flight, str | None]) -> Deferred[Ticket]:
        return self.store.buy(username, [LegRequest(flight, seat) for flight, seat in legs])

    def state(self, flight: Flight, seat: str) -> SeatState:
        for state in self.ok(self.store.seats(flight)):
            if state.seat == seat:
                return state
        raise AssertionError(f"no seat {seat} on {flight.flight_id}")

    def free(self, flight: Flight) -> int:
        return self.ok(self.store.free_seats([flight]))[flight.flight_id]

    def taken(self, flight: Flight) -> dict[str, tuple[str, str | None]]:
        """
        The seats of C{flight} that are not free: seat -> (status, owner).
        """
        return {s.seat: (s.status, s.owner) for s in self.ok(self.store.seats(flight)) if s.status != "free"}

    # -- interface ----------------------------------------------------------

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))

    def test_network(self) -> None:
        """
        The store serves the airline it was loaded with.
        """
        self.assertEqual(self.network.airline_code, "VP")
        self.assertEqual(self.network.currency, "BRL")
        self.assertEqual(sorted(self.network.airports), ["MAO", "REC", "SSA"])
        self.assertEqual(self.network.airports["MAO"].timezone, "America/Manaus")
        self.assertEqual(self.network.aircraft["TINY"].capacity, 4)
        self.assertEqual([e.flight for e in self.network.timetable], ["VP100", "VP101", "VP200", "VP201", "VP300"])
        vp300 = self.network.timetable[-1]
        self.assertEqual(vp300.days, frozenset({2, 4, 6}))
        self.assertEqual(vp300.fare, Money(74950, "BRL"))
        self.assertEqual(vp300.departure.strftime("%H:%M"), "14:00")
        self.assertEqual(vp300.duration_minutes, 210)

    # -- users --------------------------------------------------------------

    def test_add_user(self) -> None:
        self.assertIsNone(self.ok(self.store.add_user("carol", "the-hash")))
        self.assertEqual(self.ok(self.store.password_hash("carol")), "the-hash")

    def test_username_taken(self) -> None:
        self.ok(self.store.add_user("carol", "first"))
        self.refused(self.store.add_user("carol", "second"), UsernameTaken)
        self.assertEqual(self.ok(self.store.password_hash("carol")), "first")

    def test_fixture_customer_taken(self) -> None:
        """
        The customers of the fixtures exist, with their passwords hashed.
        """
        self.refused(self.store.add_user("alice", "x"), UsernameTaken)
        stored = self.ok(self.store.password_hash("alice"))
        self.assertNotEqual(stored, ALICE[1])
        self.assertTrue(FAST_HASHER.verify(ALICE[1], stored))
        self.assertFalse(FAST_HASHER.verify(BOB[1], stored))

    def test_password_hash_unknown(self) -> None:
        self.assertIsNone(self.ok(self.store.password_hash("nobody")))

    # -- holds --------------------------------------------------------------

    def test_hold(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "2A"), (self.big, "10C"), seconds=60))
        self.assertEqual(hold.username, "alice")
        self.assertEqual([(leg.flight.flight_id, leg.seat) for leg in hold.legs], [(TINY, "2A"), (BIG, "10C")])
        self.assertEqual(hold.expires_at, START + 60)
        self.assertEqual(hold.price, Money(25000 + 59990, "BRL"))
        self.assertEqual(self.taken(self.tiny), {"2A": ("held", "alice")})
        self.assertEqual(self.taken(self.big), {"10C": ("held", "alice")})
        self.assertEqual(self.ok(self.store.expire_hold(hold.hold_id)), "active")

    def test_hold_ids_differ(self) -> None:
        first = self.ok(self.hold("alice", (self.tiny, None)))
        second = self.ok(self.hold("alice", (self.tiny, None)))
        self.assertNotEqual(first.hold_id, second.hold_id)

    def test_hold_all_or_nothing(self) -> None:
        """
        If the second leg's seat is taken, nothing of the first leg stays held.
        """
        self.ok(self.hold("bob", (self.big, "1A"), session="S2"))
        error = self.refused(self.hold("alice", (self.tiny, "1A"), (self.big, "1A")), SeatUnavailable)
        self.assertEqual(error.details["flight"], BIG)
        self.assertEqual(error.details["seat"], "1A")
        self.assertEqual(self.taken(self.tiny), {})
        self.assertEqual(self.free(self.tiny), 4)
        self.assertEqual(self.taken(self.big), {"1A": ("held", "bob")})
        # No hold of alice's was left behind on her session either.
        self.assertEqual(self.ok(self.store.release_session("S1")), [])
        # And the seat she asked for on the first leg is there for anyone.
        self.ok(self.hold("bob", (self.tiny, "1A"), session="S2"))

    def test_hold_all_or_nothing_auto_seat(self) -> None:
        """
        A sold-out later leg undoes an automatically picked earlier seat.
        """
        for _ in range(4):
            self.ok(self.buy("bob", (self.tiny, None)))
        self.refused(self.hold("alice", (self.direct, None), (self.tiny, None)), SoldOut)
        self.assertEqual(self.free(self.direct), self.direct.aircraft.capacity)

    def test_auto_seat(self) -> None:
        """
        Without a seat the store picks the first free one in seat map order.
        """
        self.ok(self.hold("bob", (self.tiny, "1A"), session="S2"))
        first = self.ok(self.hold("alice", (self.tiny, None)))
        self.assertEqual(first.legs[0].seat, "1B")
        self.ok(self.buy("bob", (self.tiny, "2A")))
        second = self.ok(self.hold("alice", (self.tiny, None)))
        self.assertEqual(second.legs[0].seat, "2B")

    def test_sold_out(self) -> None:
        for seat in ("1A", "1B", "2A"):
            self.ok(self.hold("bob", (self.tiny, seat), session="S2"))
        self.ok(self.buy("bob", (self.tiny, "2B")))
        error = self.refused(self.hold("alice", (self.tiny, None)), SoldOut)
        self.assertEqual(error.details, {"flight": TINY})
        self.refused(self.buy("alice", (self.tiny, None)), SoldOut)

    def test_seat_held(self) -> None:
        """
        A held seat is unavailable to everyone else (and to its holder),
        and the refusal says until when it is held.
        """
        self.ok(self.hold("bob", (self.tiny, "1A"), session="S2", seconds=90))
        for user in ("alice", "bob"):
            error = self.refused(self.hold(user, (self.tiny, "1A")), SeatUnavailable)
            self.assertEqual(
                error.details, {"flight": TINY, "seat": "1A", "held_until": iso_utc(START + 90)}
            )
            self.assertEqual(error.details["held_until"], "2026-12-01T09:01:30Z")
        self.refused(self.buy("alice", (self.tiny, "1A")), SeatUnavailable)

    def test_seat_sold(self) -> None:
        """
        A sold seat is unavailable, with no C{held_until}.
        """
        self.ok(self.buy("bob", (self.tiny, "1A")))
        error = self.refused(self.hold("alice", (self.tiny, "1A")), SeatUnavailable)
        self.assertEqual(error.details, {"flight": TINY, "seat": "1A"})
        self.refused(self.buy("alice", (self.tiny, "1A")), SeatUnavailable)

    def test_unknown_seat(self) -> None:
        """
        The store itself refuses a seat the aircraft does not have, whatever
        its caller checked, and holds nothing.
        """
        for seat in ("3A", "1C", "0A", "1A\n", "a1", ""):
            error = self.refused(self.hold("alice", (self.big, "1A"), (self.tiny, seat)), UnknownSeat)
            self.assertEqual(error.details, {"flight": TINY, "seat": seat})
            self.refused(self.buy("alice", (self.tiny, seat)), UnknownSeat)
        self.assertEqual(self.taken(self.big), {})
        self.assertEqual(self.free(self.tiny), 4)
        self.assertEqual(self.ok(self.store.tickets("alice")), [])

    def test_hold_departed(self) -> None:
        self.clock.advance(TINY_DEPARTS - self.clock.seconds())
        error = self.refused(self.hold("alice", (self.tiny, None)), FlightDeparted)
        self.assertEqual(error.details, {"flight": TINY})
        self.refused(self.buy("alice", (self.tiny, None)), FlightDeparted)
        self.assertEqual(self.taken(self.tiny), {})

    def test_hold_just_before_departure(self) -> None:
        self.clock.advance(TINY_DEPARTS - 1 - self.clock.seconds())
        self.ok(self.hold("alice", (self.tiny, None)))

    def test_session_closed(self) -> None:
        """
        If the session is gone when the transaction runs, nothing is held.
        """
        self.refused(self.hold("alice", (self.tiny, "1A"), (self.big, "1A"), alive=_dead), SessionClosed)
        self.assertEqual(self.taken(self.tiny), {})
        self.assertEqual(self.taken(self.big), {})
        self.assertEqual(self.ok(self.store.release_session("S1")), [])
        self.assertEqual(self.ok(self.store.expired_holds()), [])

    def test_alive_read_in_transaction(self) -> None:
        """
        C{alive} is called when the hold is made, not before.
        """
        calls: list[float] = []

        def alive() -> bool:
            calls.append(self.clock.seconds())
            return True

        self.ok(self.hold("alice", (self.tiny, None), alive=alive))
        self.assertEqual(calls, [START])

    # -- expiry -------------------------------------------------------------

    def test_expired_hold_is_free(self) -> None:
        """
        A hold whose time is up counts as free at once (exactly at
        C{expires_at}), and taking its seat ends it.
        """
        old = self.ok(self.hold("bob", (self.tiny, "1A"), (self.big, "1A"), session="S2", seconds=60))
        self.clock.advance(59.5)
        self.assertEqual(self.taken(self.tiny), {"1A": ("held", "bob")})
        self.assertEqual(self.free(self.tiny), 3)
        self.refused(self.hold("alice", (self.tiny, "1A")), SeatUnavailable)
        self.clock.advance(0.5)
        self.assertEqual(self.taken(self.tiny), {})
        self.assertEqual(self.free(self.tiny), 4)
        self.assertEqual(self.free(self.big), 180)
        new = self.ok(self.hold("alice", (self.tiny, "1A")))
        self.assertEqual(self.taken(self.tiny), {"1A": ("held", "alice")})
        # The old hold was ended, on both its legs.
        self.assertEqual(self.ok(self.store.expire_hold(old.hold_id)), "expired")
        self.assertEqual(self.taken(self.big), {})
        self.refused(self.store.buy_hold(old.hold_id, "bob"), HoldExpired)
        self.assertEqual(self.taken(self.tiny), {"1A": ("held", "alice")})
        self.ok(self.store.buy_hold(new.hold_id, "alice"))

    def test_expired_hold_auto_seat(self) -> None:
        self.ok(self.hold("bob", (self.tiny, "1A"), session="S2", seconds=10))
        self.clock.advance(10)
        self.assertEqual(self.ok(self.hold("alice", (self.tiny, None))).legs[0].seat, "1A")

    def test_expire_hold_states(self) -> None:
        self.assertIsNone(self.ok(self.store.expire_hold("Hnosuchhold")))
        due = self.ok(self.hold("alice", (self.tiny, "1A"), seconds=30))
        later = self.ok(self.hold("alice", (self.tiny, "1B"), seconds=300))
        released = self.ok(self.hold("alice", (self.tiny, "2A"), seconds=30))
        bought = self.ok(self.hold("alice", (self.tiny, "2B"), seconds=30))
        self.ok(self.store.release(released.hold_id, "alice"))
        self.ok(self.store.buy_hold(bought.hold_id, "alice"))
        self.assertEqual(self.ok(self.store.expire_hold(due.hold_id)), "active")
        self.assertEqual(self.taken(self.tiny)["1A"], ("held", "alice"))
        self.clock.advance(30)
        self.assertEqual(self.ok(self.store.expire_hold(due.hold_id)), "expired")
        self.assertEqual(self.ok(self.store.expire_hold(due.hold_id)), "expired")
        self.assertEqual(self.ok(self.store.expire_hold(later.hold_id)), "active")
        self.assertEqual(self.ok(self.store.expire_hold(released.hold_id)), "released")
        self.assertEqual(self.ok(self.store.expire_hold(bought.hold_id)), "bought")
        self.assertEqual(self.taken(self.tiny), {"1B": ("held", "alice"), "2B": ("sold", "alice")})
        # An expired hold is no longer active for its session.
        self.assertEqual(self.ok(self.store.release_session("S1")), [later.hold_id])

    def test_expired_holds(self) -> None:
        a = self.ok(self.hold("alice", (self.tiny, "1A"), session="S1", seconds=30))
        b = self.ok(self.hold("bob", (self.big, "1A"), (self.tiny, "1B"), session="S2", seconds=60))
        c = self.ok(self.hold("bob", (self.tiny, "2A"), session="S2", seconds=61))
        self.assertEqual(self.ok(self.store.expired_holds()), [])
        self.clock.advance(60)
        self.assertEqual(sorted(self.ok(self.store.expired_holds())), sorted([(a.hold_id, "S1"), (b.hold_id, "S2")]))
        self.assertEqual(self.taken(self.tiny), {"2A": ("held", "bob")})
        self.assertEqual(self.taken(self.big), {})
        self.assertEqual(self.ok(self.store.expire_hold(a.hold_id)), "expired")
        self.assertEqual(self.ok(self.store.expire_hold(b.hold_id)), "expired")
        # Each hold is reported once.
        self.assertEqual(self.ok(self.store.expired_holds()), [])
        self.clock.advance(1)
        self.assertEqual(self.ok(self.store.expired_holds()), [(c.hold_id, "S2")])

    def test_expired_holds_skips_ended(self) -> None:
        released = self.ok(self.hold("alice", (self.tiny, "1A"), seconds=30))
        bought = self.ok(self.hold("alice", (self.tiny, "1B"), seconds=30))
        self.ok(self.store.release(released.hold_id, "alice"))
        self.ok(self.store.buy_hold(bought.hold_id, "alice"))
        self.clock.advance(30)
        self.assertEqual(self.ok(self.store.expired_holds()), [])
        self.assertEqual(self.taken(self.tiny), {"1B": ("sold", "alice")})

    # -- release ------------------------------------------------------------

    def test_release(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "1A"), (self.big, "2B")))
        self.assertIsNone(self.ok(self.store.release(hold.hold_id, "alice")))
        self.assertEqual(self.taken(self.tiny), {})
        self.assertEqual(self.taken(self.big), {})
        self.assertEqual(self.ok(self.store.expire_hold(hold.hold_id)), "released")
        error = self.refused(self.store.release(hold.hold_id, "alice"), HoldNotFound)
        self.assertEqual(error.details, {"hold_id": hold.hold_id})
        self.refused(self.store.buy_hold(hold.hold_id, "alice"), HoldNotFound)
        self.ok(self.hold("bob", (self.tiny, "1A"), session="S2"))

    def test_release_other_users_hold(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "1A")))
        self.refused(self.store.release(hold.hold_id, "bob"), HoldNotFound)
        self.assertEqual(self.taken(self.tiny), {"1A": ("held", "alice")})
        self.assertEqual(self.ok(self.store.expire_hold(hold.hold_id)), "active")

    def test_release_unknown(self) -> None:
        self.refused(self.store.release("Hnosuchhold", "alice"), HoldNotFound)

    def test_release_expired(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "1A"), seconds=60))
        self.clock.advance(60)
        error = self.refused(self.store.release(hold.hold_id, "alice"), HoldExpired)
        self.assertEqual(error.details, {"hold_id": hold.hold_id})
        self.assertEqual(self.ok(self.store.expire_hold(hold.hold_id)), "expired")
        self.assertEqual(self.ok(self.store.expired_holds()), [])

    def test_release_bought(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "1A")))
        self.ok(self.store.buy_hold(hold.hold_id, "alice"))
        self.refused(self.store.release(hold.hold_id, "alice"), HoldNotFound)
        self.assertEqual(self.taken(self.tiny), {"1A": ("sold", "alice")})

    def test_release_session(self) -> None:
        a = self.ok(self.hold("alice", (self.tiny, "1A"), session="S1"))
        b = self.ok(self.hold("alice", (self.big, "1A"), session="S1"))
        c = self.ok(self.hold("alice", (self.tiny, "1B"), session="S2"))
        released = self.ok(self.hold("alice", (self.tiny, "2A"), session="S1"))
        self.ok(self.store.release(released.hold_id, "alice"))
        bought = self.ok(self.hold("alice", (self.tiny, "2B"), session="S1"))
        self.ok(self.store.buy_hold(bought.hold_id, "alice"))
        self.assertEqual(sorted(self.ok(self.store.release_session("S1"))), sorted([a.hold_id, b.hold_id]))
        self.assertEqual(self.taken(self.tiny), {"1B": ("held", "alice"), "2B": ("sold", "alice")})
        self.assertEqual(self.taken(self.big), {})
        self.assertEqual(self.ok(self.store.expire_hold(a.hold_id)), "released")
        self.assertEqual(self.ok(self.store.expire_hold(c.hold_id)), "active")
        self.assertEqual(self.ok(self.store.release_session("S1")), [])
        self.assertEqual(self.ok(self.store.release_session("S3")), [])

    # -- buying -------------------------------------------------------------

    def test_buy_hold(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "2A"), (self.big, "3C")))
        self.clock.advance(10)
        ticket = self.ok(self.store.buy_hold(hold.hold_id, "alice"))
        self.assertEqual(ticket.username, "alice")
        self.assertEqual(ticket.status, "active")
        self.assertEqual(ticket.price, Money(84990, "BRL"))
        self.assertEqual(ticket.bought_at, START + 10)
        self.assertIsNone(ticket.cancelled_at)
        self.assertEqual(len(ticket.ticket_id), 8)
        self.assertEqual(
            [(leg.flight_id, leg.number, leg.origin, leg.destination, leg.seat, leg.price) for leg in ticket.legs],
            [
                (TINY, "VP100", "SSA", "REC", "2A", Money(25000, "BRL")),
                (BIG, "VP200", "REC", "MAO", "3C", Money(59990, "BRL")),
            ],
        )
        self.assertEqual(ticket.legs[0].departure, "2026-12-02T08:00:00-03:00")
        self.assertEqual(ticket.legs[0].arrival, "2026-12-02T09:15:00-03:00")
        self.assertEqual(ticket.legs[1].arrival, "2026-12-02T14:00:00-04:00")
        self.assertEqual(self.taken(self.tiny), {"2A": ("sold", "alice")})
        self.assertEqual(self.taken(self.big), {"3C": ("sold", "alice")})
        self.assertEqual(self.ok(self.store.expire_hold(hold.hold_id)), "bought")
        self.assertEqual(self.ok(self.store.tickets("alice")), [ticket])
        # A sold seat stays sold after the hold's time would have run out.
        self.clock.advance(3600)
        self.assertEqual(self.ok(self.store.expired_holds()), [])
        self.assertEqual(self.taken(self.tiny), {"2A": ("sold", "alice")})
        self.refused(self.store.buy_hold(hold.hold_id, "alice"), HoldNotFound)
        self.assertEqual(len(self.ok(self.store.tickets("alice"))), 1)

    def test_buy_hold_wrong_owner(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "1A")))
        error = self.refused(self.store.buy_hold(hold.hold_id, "bob"), HoldNotFound)
        self.assertEqual(error.details, {"hold_id": hold.hold_id})
        self.assertEqual(self.taken(self.tiny), {"1A": ("held", "alice")})
        self.assertEqual(self.ok(self.store.tickets("bob")), [])
        self.ok(self.store.buy_hold(hold.hold_id, "alice"))

    def test_buy_hold_unknown(self) -> None:
        self.refused(self.store.buy_hold("Hnosuchhold", "alice"), HoldNotFound)

    def test_buy_hold_expired(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "1A"), (self.big, "1A"), seconds=60))
        self.clock.advance(60)
        error = self.refused(self.store.buy_hold(hold.hold_id, "alice"), HoldExpired)
        self.assertEqual(error.details, {"hold_id": hold.hold_id})
        self.assertEqual(self.ok(self.store.tickets("alice")), [])
        self.assertEqual(self.taken(self.tiny), {})
        self.assertEqual(self.taken(self.big), {})
        self.assertEqual(self.ok(self.store.expire_hold(hold.hold_id)), "expired")
        self.refused(self.store.buy_hold(hold.hold_id, "alice"), HoldExpired)

    def test_refusing_an_expired_hold_ends_it(self) -> None:
        """
        A buy or release refused with C{hold_expired} ends the hold (as its
        message says: "its seats are free again"), so it is not left active
        for the sweep to find later.
        """
        bought = self.ok(self.hold("alice", (self.tiny, "1A"), session="S1", seconds=60))
        released = self.ok(self.hold("alice", (self.tiny, "1B"), session="S2", seconds=60))
        self.clock.advance(60)
        self.refused(self.store.buy_hold(bought.hold_id, "alice"), HoldExpired)
        self.refused(self.store.release(released.hold_id, "alice"), HoldExpired)
        self.assertEqual(self.ok(self.store.release_session("S1")), [])
        self.assertEqual(self.ok(self.store.expired_holds()), [])

    def test_buy_hold_departed(self) -> None:
        """
        A hold that outlives its flight's departure cannot be bought.
        """
        hold = self.ok(self.hold("alice", (self.tiny, "1A"), seconds=3 * 86400))
        self.clock.advance(TINY_DEPARTS - self.clock.seconds())
        error = self.refused(self.store.buy_hold(hold.hold_id, "alice"), FlightDeparted)
        self.assertEqual(error.details, {"flight": TINY})
        self.assertEqual(self.ok(self.store.tickets("alice")), [])
        self.assertEqual(self.ok(self.store.expire_hold(hold.hold_id)), "active")

    def test_buy(self) -> None:
        self.clock.advance(5)
        ticket = self.ok(self.buy("alice", (self.tiny, None), (self.big, "30F")))
        self.assertEqual([(leg.flight_id, leg.seat) for leg in ticket.legs], [(TINY, "1A"), (BIG, "30F")])
        self.assertEqual(ticket.price, Money(84990, "BRL"))
        self.assertEqual(ticket.bought_at, START + 5)
        self.assertEqual(ticket.status, "active")
        self.assertEqual(self.taken(self.tiny), {"1A": ("sold", "alice")})
        self.assertEqual(self.taken(self.big), {"30F": ("sold", "alice")})
        self.assertEqual(self.ok(self.store.tickets("alice")), [ticket])
        # A one-step purchase leaves no hold behind.
        self.assertEqual(self.ok(self.store.release_session("S1")), [])

    def test_buy_all_or_nothing(self) -> None:
        self.ok(self.hold("bob", (self.big, "1A"), session="S2"))
        self.refused(self.buy("alice", (self.tiny, "1A"), (self.big, "1A")), SeatUnavailable)
        self.assertEqual(self.ok(self.store.tickets("alice")), [])
        self.assertEqual(self.taken(self.tiny), {})
        self.assertEqual(self.taken(self.big), {"1A": ("held", "bob")})

    def test_ticket_ids_differ(self) -> None:
        ids = {self.ok(self.buy("alice", (self.tiny, None))).ticket_id for _ in range(4)}
        self.assertEqual(len(ids), 4)
        for ticket_id in ids:
            self.assertTrue(set(ticket_id) <= set("ABCDEFGHJKMNPQRSTUVWXYZ23456789"), ticket_id)

    def test_tickets(self) -> None:
        """
        Each user sees their own tickets, oldest first, cancelled ones too.
        """
        self.assertEqual(self.ok(self.store.tickets("alice")), [])
        first = self.ok(self.buy("alice", (self.direct, None)))
        self.clock.advance(1)
        self.ok(self.buy("bob", (self.tiny, None)))
        self.clock.advance(1)
        second = self.ok(self.buy("alice", (self.tiny, None)))
        self.clock.advance(1)
        third = self.ok(self.buy("alice", (self.big, None)))
        self.clock.advance(1)
        cancelled = self.ok(self.store.cancel(second.ticket_id, "alice"))
        self.assertEqual(self.ok(self.store.tickets("alice")), [first, cancelled, third])
        self.assertEqual([t.username for t in self.ok(self.store.tickets("bob"))], ["bob"])
        self.assertEqual(self.ok(self.store.tickets("nobody")), [])

    def pages(self, username: str, limit: int, active_only: bool = False) -> list[list[Ticket]]:
        """
        Every page of C{username}'s tickets, following each page's C{after}
        (at most 100 pages).
        """
        pages: list[list[Ticket]] = []
        after = None
        for _ in range(100):
            page = self.ok(self.store.ticket_page(username, limit, after, active_only))
            self.assertIsInstance(page, TicketPage)
            pages.append(list(page.tickets))
            if page.after is None:
                return pages
            after = page.after
        raise AssertionError("more than 100 pages")

    def test_ticket_pages(self) -> None:
        """
        A customer's tickets come in pages of at most C{limit}, newest
        first (purchase time, then order of sale: tickets bought at the same
        time are neither lost nor repeated between pages), each naming where
        the next starts; the last names none.
        """
        bought = []
        for i in range(7):
            bought.append(self.ok(self.buy("alice", (self.big, None))))
            if i % 3 == 2:
                self.clock.advance(1)  # some share a purchase time, some do not
        self.ok(self.buy("bob", (self.big, None)))
        newest_first = list(reversed(self.ok(self.store.tickets("alice"))))
        self.assertEqual([t.ticket_id for t in newest_first], [t.ticket_id for t in reversed(bought)])
        for limit in (1, 2, 3, 7, 50):
            pages = self.pages("alice", limit)
            self.assertEqual([t for page in pages for t in page], newest_first, f"limit {limit}")
            self.assertTrue(all(1 <= len(page) <= limit for page in pages), f"limit {limit}: {pages}")
            self.assertEqual(len(pages), -(-7 // limit))
        self.assertEqual(self.ok(self.store.ticket_page("nobody", 10)), TicketPage(()))

    def test_ticket_page_active_only(self) -> None:
        """
        With C{active_only}, a page has only the active tickets, newest
        first; cancelled ones are skipped, however many.
        """
        tickets = []
        for _ in range(6):
            tickets.append(self.ok(self.buy("alice", (self.big, None))))
            self.clock.advance(1)
        for ticket in tickets[1::2]:
            self.ok(self.store.cancel(ticket.ticket_id, "alice"))
        pages = self.pages("alice", 2, active_only=True)
        self.assertEqual([t for page in pages for t in page], list(reversed(tickets[0::2])))
        self.assertEqual([len(page) for page in pages], [2, 1])
        everything = [t for page in self.pages("alice", 4) for t in page]
        self.assertEqual([t.status for t in everything], ["cancelled", "active"] * 3)

    def test_seats_per_flight(self) -> None:
        """
        With C{max_seats_per_flight}, a customer's held and bought seats on
        one flight stay within it: a hold or purchase that would pass it is
        refused (all legs of it), naming the limit and the flight; other
        customers and other flights are not affected; a cancelled ticket or
        an expired hold no longer counts.
        """
        self.store.max_seats_per_flight = 3  # type: ignore[attr-defined]
        self.ok(self.hold("alice", (self.big, "1A"), seconds=30))
        first = self.ok(self.buy("alice", (self.big, None)))
        self.ok(self.buy("alice", (self.big, None)))
        refused = self.refused(self.buy("alice", (self.big, None)), PurchaseLimit)
        self.assertEqual(refused.details, {"limit": 3, "flight": BIG})
        self.refused(self.hold("alice", (self.big, None)), PurchaseLimit)
        self.refused(self.buy("alice", (self.tiny, None), (self.big, None)), PurchaseLimit)
        self.assertEqual(self.taken(self.tiny), {})
        self.ok(self.buy("bob", (self.big, None)))
        self.ok(self.buy("alice", (self.tiny, None)))
        self.ok(self.store.cancel(first.ticket_id, "alice"))
        self.ok(self.buy("alice", (self.big, None)))
        self.refused(self.buy("alice", (self.big, None)), PurchaseLimit)
        self.clock.advance(31)  # the hold of 1A is over
        self.ok(self.buy("alice", (self.big, None)))

    # -- cancelling ---------------------------------------------------------

    def test_cancel(self) -> None:
        ticket = self.ok(self.buy("alice", (self.tiny, "1A"), (self.big, "1A")))
        self.clock.advance(100)
        cancelled = self.ok(self.store.cancel(ticket.ticket_id, "alice"))
        self.assertEqual(cancelled.status, "cancelled")
        self.assertEqual(cancelled.cancelled_at, START + 100)
        self.assertEqual(cancelled.ticket_id, ticket.ticket_id)
        self.assertEqual(cancelled.legs, ticket.legs)
        self.assertEqual(cancelled.price, ticket.price)
        self.assertEqual(cancelled.bought_at, ticket.bought_at)
        self.assertEqual(self.ok(self.store.tickets("alice")), [cancelled])
        # Its seats are free again at once.
        self.assertEqual(self.taken(self.tiny), {})
        self.assertEqual(self.taken(self.big), {})
        self.assertEqual(self.free(self.tiny), 4)
        self.ok(self.hold("bob", (self.tiny, "1A"), (self.big, "1A"), session="S2"))

    def test_cancel_other_users_ticket(self) -> None:
        ticket = self.ok(self.buy("alice", (self.tiny, "1A")))
        error = self.refused(self.store.cancel(ticket.ticket_id, "bob"), TicketNotFound)
        self.assertEqual(error.details, {"ticket_id": ticket.ticket_id})
        self.assertEqual(self.ok(self.store.tickets("alice")), [ticket])
        self.assertEqual(self.taken(self.tiny), {"1A": ("sold", "alice")})

    def test_cancel_unknown(self) -> None:
        self.refused(self.store.cancel("ABCDEFGH", "alice"), TicketNotFound)

    def test_already_cancelled(self) -> None:
        ticket = self.ok(self.buy("alice", (self.tiny, "1A")))
        first = self.ok(self.store.cancel(ticket.ticket_id, "alice"))
        # Someone else buys the freed seat; cancelling again must not free it.
        self.ok(self.buy("bob", (self.tiny, "1A")))
        self.clock.advance(10)
        error = self.refused(self.store.cancel(ticket.ticket_id, "alice"), AlreadyCancelled)
        self.assertEqual(error.details, {"ticket_id": ticket.ticket_id})
        self.assertEqual(self.ok(self.store.tickets("alice")), [first])
        self.assertEqual(self.taken(self.tiny), {"1A": ("sold", "bob")})

    def test_cancel_departed(self) -> None:
        ticket = self.ok(self.buy("alice", (self.tiny, "1A"), (self.big, "1A")))
        self.clock.advance(TINY_DEPARTS - self.clock.seconds())
        error = self.refused(self.store.cancel(ticket.ticket_id, "alice"), FlightDeparted)
        self.assertEqual(error.details, {"ticket_id": ticket.ticket_id})
        self.assertEqual(self.ok(self.store.tickets("alice")), [ticket])
        self.assertEqual(self.taken(self.big), {"1A": ("sold", "alice")})

    # -- seats --------------------------------------------------------------

    def test_seats(self) -> None:
        self.ok(self.hold("alice", (self.tiny, "2A")))
        self.ok(self.buy("bob", (self.tiny, "1B")))
        self.assertEqual(
            self.ok(self.store.seats(self.tiny)),
            [
                SeatState("1A", "free"),
                SeatState("1B", "sold", "bob"),
                SeatState("2A", "held", "alice"),
                SeatState("2B", "free"),
            ],
        )
        big = self.ok(self.store.seats(self.big))
        self.assertEqual([s.seat for s in big], list(self.big.aircraft.seats()))
        self.assertEqual({s.status for s in big}, {"free"})
        self.assertEqual(big[:7], [SeatState(s, "free") for s in ("1A", "1B", "1C", "1D", "1E", "1F", "2A")])

    def test_free_seats(self) -> None:
        self.assertEqual(
            self.ok(self.store.free_seats([self.tiny, self.big, self.direct])),
            {TINY: 4, BIG: 180, DIRECT: 180},
        )
        self.ok(self.hold("alice", (self.tiny, None), (self.big, None)))
        self.ok(self.buy("bob", (self.tiny, None)))
        self.ok(self.hold("alice", (self.tiny, None), seconds=10))
        self.assertEqual(
            self.ok(self.store.free_seats([self.tiny, self.big, self.direct])),
            {TINY: 1, BIG: 179, DIRECT: 180},
        )
        self.clock.advance(10)
        self.assertEqual(self.ok(self.store.free_seats([self.tiny])), {TINY: 2})
        self.assertEqual(self.ok(self.store.free_seats([])), {})

    def test_free_seats_many_flights(self) -> None:
        """
        Free seats of more flights than one SQL statement takes at once.
        """
        flights = [
            flight_by_id(self.network, f"{number}-{day}")
            for number in ("VP100", "VP101", "VP200", "VP201")
            for day in (f"2027-{m:02d}-{d:02d}" for m in range(1, 13) for d in range(1, 29))
        ]
        self.assertTrue(len(flights) > 1000)
        self.ok(self.buy("alice", (flights[-1], None)))
        free = self.ok(self.store.free_seats(flights))
        self.assertEqual(len(free), len(flights))
        self.assertEqual(free[flights[-1].flight_id], flights[-1].aircraft.capacity - 1)
        self.assertEqual(free[flights[0].flight_id], flights[0].aircraft.capacity)

    # -- a property ---------------------------------------------------------

    # The mixin's test runs on every backend's test case (each example makes
    # its own store with make_store), hence differing executors.
    @settings(max_examples=40, suppress_health_check=[HealthCheck.differing_executors])
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["hold", "buy", "release", "advance"]),
                st.sampled_from(["alice", "bob"]),
                st.sampled_from([None, "1A", "1B", "2A", "2B"]),
            ),
            max_size=25,
        )
    )
    def test_matches_model(self, steps: list[tuple[str, str, str | None]]) -> None:
        """
        Any sequence of holds, purchases, releases and waiting on the
        four-seat flight agrees with a simple model of who has which seat.
        """
        clock = Clock()
        clock.advance(START)
        store = self.make_store(clock)
        flight = flight_by_id(store.network(), TINY)
        # seat -> (status, owner, hold_id, expires_at)
        model: dict[str, tuple[str, str, str | None, float]] = {}
        holds: list[tuple[str, str]] = []

        def current() -> dict[str, tuple[str, str]]:
            now = clock.seconds()
            return {
                seat: (status, owner)
                for seat, (status, owner, _, expires) in model.items()
                if status == "sold" or expires > now
            }

        for action, user, seat in steps:
            if action == "advance":
                clock.advance(20)
            elif action in ("hold", "buy"):
                taken = current()
                want = seat if seat is not None else next((s for s in flight.aircraft.seats() if s not in taken), None)
                if action == "hold":
                    d: Deferred[Any] = store.hold(user, "S", [LegRequest(flight, seat)], 45, _alive)
                else:
                    d = store.buy(user, [LegRequest(flight, seat)])
                if want is None:
                    self.failureResultOf(d, SoldOut)
                elif want in taken:
                    self.failureResultOf(d, SeatUnavailable)
                else:
                    result = self.successResultOf(d)
                    if action == "hold":
                        self.assertEqual(result.legs[0].seat, want)
                        model[want] = ("held", user, result.hold_id, result.expires_at)
                        holds.append((result.hold_id, user))
                    else:
                        self.assertEqual(result.legs[0].seat, want)
                        model[want] = ("sold", user, None, 0.0)
            elif action == "release" and holds:
                hold_id, owner = holds.pop(0)
                entry = next((e for e in model.values() if e[2] == hold_id), None)
                d = store.release(hold_id, owner)
                if entry is not None and entry[3] > clock.seconds():
                    self.successResultOf(d)
                    model = {s: e for s, e in model.items() if e[2] != hold_id}
                else:
                    # Its time is up (and its seat may be someone else's by now).
                    self.failureResultOf(d, HoldExpired)
            seats = self.successResultOf(store.seats(flight))
            self.assertEqual({s.seat: (s.status, s.owner) for s in seats if s.status != "free"}, current())
            self.assertEqual(self.successResultOf(store.free_seats([flight])), {TINY: 4 - len(current())})


def _open(
    path: str,
    clock: Clock,
    fixtures: Callable[[], Fixtures] | None = None,
    executor: IExecutor | None = None,
    read_executor: IExecutor | None = None,
) -> SQLiteStore:
    store = SQLiteStore.open(
        path, clock, executor or InlineExecutor(), fixtures or (lambda: load(MINI)), FAST_HASHER.hash,
        read_executor=read_executor,
    )
    store.start()
    return store


class SQLiteMemoryStoreTests(StoreContractMixin, SynchronousTestCase):
    """
    The SQLite store in memory.
    """

    def make_store(self, clock: Clock) -> IStore:
        store = _open(":memory:", clock)
        self.addCleanup(store.stop)
        return store


class PostgresStoreTests(StoreContractMixin, SynchronousTestCase):
    """
    The PostgreSQL store, in a schema of its own, with time from the test's
    clock rather than the database's (see L{tests.test_postgres} for the
    database's clock).
    """

    def make_store(self, clock: Clock) -> IStore:
        # Reads on an executor of their own, as in production.
        store = PostgresStore.open(
            pg.fresh_url(self), InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash, clock=clock,
            read_executor=InlineExecutor(),
        )
        store.start()
        self.addCleanup(store.stop)
        return store


class SQLiteFileStoreTests(StoreContractMixin, SynchronousTestCase):
    """
    The SQLite store in a file, and what only a file can do: outlive the
    store that wrote it, and be read on a second connection beside the writer.
    """

    def make_store(self, clock: Clock) -> IStore:
        directory = Path(self.mktemp())
        directory.mkdir()
        self.path = str(directory / "vendepass.sqlite3")
        # Reads on a connection of their own, as in production.
        store = _open(self.path, clock, read_executor=InlineExecutor())
        self.addCleanup(self._stop, store)
        return store

    def _stop(self, store: SQLiteStore) -> None:
        try:
            store.stop()
        except sqlite3.ProgrammingError:
            pass

    def reopen(self, fixtures: Callable[[], Fixtures] | None = None) -> SQLiteStore:
        """
        Close the store (as the end of a run does) and open its file again.
        """
        self.store.stop()
        store = _open(self.path, self.clock, fixtures, read_executor=InlineExecutor())
        self.addCleanup(self._stop, store)
        self.store = store
        return store

    def test_transient_data_in_memory(self) -> None:
        """
        The writer's and the reader's statement journals and transient
        tables stay in memory (C{temp_store} 2): a batch's multi-row INSERT
        needs a statement journal, which would otherwise spill to a new
        temporary file, written and unlinked again, in every batch.
        """
        store = self.store
        assert isinstance(store, SQLiteStore) and store._reader is not None
        for db in (store._db, store._reader):
            self.assertEqual(db.execute("PRAGMA temp_store").fetchone(), (2,))

    def test_reads_beside_the_writer(self) -> None:
        """
        With a read executor, reads (tickets, seat maps, password hashes)
        run on the read connection: answered while every write waits in
        the writer's queue, or while a write transaction is open, and
        seeing exactly what is committed.
        """
        ticket = self.ok(self.buy("alice", (self.tiny, "1A")))
        self.store.stop()
        writer = QueueExecutor()
        store = _open(self.path, self.clock, executor=writer, read_executor=InlineExecutor())
        self.addCleanup(self._stop, store)
        queued = store.buy("alice", [LegRequest(self.big, "2B")])
        self.assertNoResult(queued)
        self.assertEqual(self.ok(store.ticket_page("alice", 10)).tickets, (ticket,))
        self.assertEqual(
            {s.seat for s in self.ok(store.seats(self.tiny)) if s.status != "free"}, {"1A"}
        )
        self.assertIsNotNone(self.ok(store.password_hash("alice")))
        writer.run_next()
        bought = self.ok(queued)
        self.assertEqual(self.ok(store.ticket_page("alice", 10)).tickets, (bought, ticket))
        # A write transaction left open does not stop a read either.
        store._db.execute("BEGIN IMMEDIATE")
        store._db.execute("UPDATE tickets SET status = 'cancelled' WHERE ticket_id = ?", (ticket.ticket_id,))
        self.assertEqual([t.status for t in self.ok(store.ticket_page("alice", 10)).tickets], ["active", "active"])
        store._db.execute("ROLLBACK")

    def test_ticket_survives_reopen(self) -> None:
        ticket = self.ok(self.buy("alice", (self.tiny, "1A"), (self.big, "2B")))
        held = self.ok(self.hold("bob", (self.tiny, "2A")))
        bought = self.ok(self.store.buy_hold(held.hold_id, "bob"))
        cancelled = self.ok(self.store.cancel(self.ok(self.buy("alice", (self.direct, "5C"))).ticket_id, "alice"))
        self.reopen()
        self.assertEqual(self.ok(self.store.tickets("alice")), [ticket, cancelled])
        self.assertEqual(self.ok(self.store.tickets("bob")), [bought])
        self.assertEqual(self.taken(self.tiny), {"1A": ("sold", "alice"), "2A": ("sold", "bob")})
        self.assertEqual(self.taken(self.big), {"2B": ("sold", "alice")})
        self.assertEqual(self.taken(self.direct), {})
        self.refused(self.buy("bob", (self.tiny, "1A")), SeatUnavailable)
        self.ok(self.store.cancel(ticket.ticket_id, "alice"))

    def test_ticket_visible_to_another_connection(self) -> None:
        """
        A purchase is committed by the time it is acknowledged: another
        connection to the file sees it while the store is still open.
        """
        ticket = self.ok(self.buy("alice", (self.tiny, "1A")))
        other = sqlite3.connect(self.path)
        self.addCleanup(other.close)
        rows = other.execute("SELECT ticket_id, username, status FROM tickets").fetchall()
        self.assertEqual(rows, [(ticket.ticket_id, "alice", "active")])

    def test_holds_gone_after_reopen(self) -> None:
        hold = self.ok(self.hold("alice", (self.tiny, "1A"), (self.big, "1A"), seconds=3600))
        self.reopen()
        self.assertEqual(self.taken(self.tiny), {})
        self.assertEqual(self.taken(self.big), {})
        self.assertEqual(self.free(self.tiny), 4)
        self.assertEqual(self.ok(self.store.expire_hold(hold.hold_id)), "released")
        self.refused(self.store.buy_hold(hold.hold_id, "alice"), HoldNotFound)
        self.assertEqual(self.ok(self.store.release_session("S1")), [])
        self.ok(self.hold("bob", (self.tiny, "1A"), (self.big, "1A"), session="S2"))

    def test_old_holds_forgotten_on_reopen(self) -> None:
        """
        Reopening deletes holds that ended more than a day ago, and keeps
        the more recent ones (as released).
        """
        old = self.ok(self.hold("alice", (self.tiny, "1A")))
        self.ok(self.store.release(old.hold_id, "alice"))
        self.clock.advance(86400 + 1)
        recent = self.ok(self.hold("alice", (self.big, "1A")))
        self.reopen()
        self.assertIsNone(self.ok(self.store.expire_hold(old.hold_id)))
        self.assertEqual(self.ok(self.store.expire_hold(recent.hold_id)), "released")

    def test_durable_pragmas(self) -> None:
        db = self.store._db  # type: ignore[attr-defined]
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0].lower(), "wal")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)
        self.assertEqual(db.execute("PRAGMA foreign_keys").fetchone()[0], 1)
        self.reopen()
        db = self.store._db  # type: ignore[attr-defined]
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0].lower(), "wal")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_second_open_keeps_data(self) -> None:
        """
        Opening an existing file does not load the fixtures again: users
        added later survive, and the stored hashes are the first ones.
        """
        alice_hash = self.ok(self.store.password_hash("alice"))
        self.ok(self.store.add_user("carol", "carol-hash"))
        loads: list[None] = []

        def fixtures() -> Fixtures:
            loads.append(None)
            return load(MINI)

        self.reopen(fixtures)
        self.assertEqual(loads, [])
        self.assertEqual(self.ok(self.store.password_hash("carol")), "carol-hash")
        self.assertEqual(self.ok(self.store.password_hash("alice")), alice_hash)
        self.refused(self.store.add_user("carol", "again"), UsernameTaken)
        self.assertEqual(sorted(self.store.network().airports), ["MAO", "REC", "SSA"])
        self.assertEqual(len(self.store.network().timetable), 5)


class SQLiteWriterProcessStoreTests(StoreContractMixin, SynchronousTestCase):
    """
    The SQLite store as C{twistd vendepass --sqlite-writer process} runs it:
    group commit, reads on a connection of their own, and the batches written
    by a writer process
    (L{vendepass.store.writer}). The executor runs jobs inline, so the test
    waits for the child's answer at each write.
    """

    def make_store(self, clock: Clock) -> IStore:
        directory = Path(self.mktemp())
        directory.mkdir()
        store = SQLiteStore.open(
            str(directory / "vendepass.sqlite3"), clock, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash,
            max_batch=4, read_executor=InlineExecutor(), writer_process=True,
        )
        store.start()
        self.addCleanup(store.stop)
        return store


class CodeTests(SynchronousTestCase):
    """
    Booking codes and hold ids: the right alphabet and length, made on one
    day (minute) next to each other in the indexes, random after that.
    """

    def test_booking_code(self) -> None:
        from collections import Counter

        from vendepass.store.common import _CODE_ALPHABET, booking_code

        day = START - START % 86400
        codes = [booking_code(day + i * 7.5) for i in range(3000)]
        self.assertTrue(all(len(c) == 8 and set(c) <= set(_CODE_ALPHABET) for c in codes))
        self.assertEqual({c[:2] for c in codes}, {codes[0][:2]})
        self.assertNotEqual(booking_code(day + 86400)[:2], codes[0][:2])
        # 8.9e8 codes a day: a clash among 3,000 has a chance of 0.5 % (the
        # store draws again when a code is taken), more than a few: never.
        self.assertGreaterEqual(len(set(codes)), 2995)
        # The random letters use the whole alphabet about evenly (expected
        # 3000 * 6 / 31 = 581 each; a fair die stays well inside this).
        letters = Counter("".join(c[2:] for c in codes))
        self.assertEqual(set(letters), set(_CODE_ALPHABET))
        self.assertTrue(all(400 < n < 780 for n in letters.values()), letters)
        untimed = {booking_code() for _ in range(300)}
        self.assertGreater(len({c[:2] for c in untimed}), 100)

    def test_random_bytes_given_out_once(self) -> None:
        """
        The randomness drawn ahead is given out once: across draws, in
        another thread, and in a forked child (which draws afresh).
        """
        import threading

        from vendepass.store import common

        self.patch(common, "_RANDOM_DRAW", 64)
        common._forget_random()
        drawn = [common.random_bytes(5) for _ in range(100)]
        self.assertEqual([len(b) for b in drawn], [5] * 100)
        other: list[bytes] = []
        thread = threading.Thread(target=lambda: other.extend(common.random_bytes(5) for _ in range(100)))
        thread.start()
        thread.join()
        chunks = drawn + other
        # 200 draws of 40 random bits: a repeat means bytes given out twice.
        self.assertEqual(len(set(chunks)), len(chunks))
        self.assertEqual(len(common.random_bytes(100)), 100)
        # Bytes left in this thread's draw when it forks.
        common.random_bytes(5)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.write(write, common.random_bytes(5))
            os._exit(0)
        os.close(write)
        child = os.read(read, 5)
        os.close(read)
        os.waitpid(pid, 0)
        self.assertEqual(len(child), 5)
        self.assertNotEqual(child, common.random_bytes(5))

    def test_hold_code(self) -> None:
        from vendepass.store.common import hold_code

        first, second = hold_code(START), hold_code(START + 59.9 - START % 60)
        self.assertRegex(first, r"^H[0-9a-f]{16}$")
        self.assertEqual(first[:7], second[:7])
        self.assertNotEqual(first, second)
        self.assertLess(first[:7], hold_code(START + 60)[:7])


class AuditTextTests(SynchronousTestCase):
    names = st.one_of(st.text(), st.text(alphabet='VP1A-/"\\ '), st.text(alphabet="VP1A-/\n\x7f\x00é"))

    @example([('VP1"', "1A")])
    @example([("VP1", "1A\\")])
    @example([("VP1\x7f", "1A"), ("VP1\n", "1A")])
    @given(st.lists(st.tuples(names, names), max_size=4))
    def test_seat_names_are_json(self, seats: list[tuple[str, str]]) -> None:
        """
        An audit row's seats are C{json.dumps}' text of their names, byte
        for byte, whatever the names (the direct path and the fallback).
        """
        import json

        from vendepass.store.transactions import _seat_names

        self.assertEqual(_seat_names(seats), json.dumps([f"{f}/{s}" for f, s in seats]))
        self.assertEqual(_seat_names([(f"VP1-{f}", "1A") for f, _ in seats]),
                         json.dumps([f"VP1-{f}/1A" for f, _ in seats]))


class ShippedMigrationTests(SynchronousTestCase):
    """
    A migration that has shipped is never edited: databases it already ran
    on would differ from new ones. Both backends render their first
    version from one template (L{vendepass.store.schema}); this pins what
    every shipped migration says, to the letter.
    """

    SHIPPED = {
        "sqlite": [
            "a3c7f82fc3378ee6c57860c4643a3ae922d6ebe20a865d356842195232be8e8d",
            "7a050f3a05ff4a7abe5f66316b8f8b2693bbbd15e3a4fc4faffa383608b9ea2b",
            "0f1fcefb81e32dd259332da6f67bd6fd9b5b84da7a43170870e4b304cd3f91a8",
            "1b9ff2f7c3ea72e97617cc8e154917ee7f8c31258f9a3aff02382dd5aaef6119",
            "45a19617cf352209754ad61be3cda892db120abdd265d28bc7f8b27a9a26a087",
            "57bcb6e40b1d1759b864aff33ae1b6f0b0232d7721812fae87802eb7d91aee15",
            "8b0d8c7fee245271be52e68675338c50d7074b2c6bd2732d8d17489ef1b6a458",
            "2a81b59d9711ecd29058d3b4a57c8725aec314a2c3f8f57f65c881b28ac9093f",
            "2dc350c63581abda5a0b17e557fb5ce710b7b284a54bdcc6743331be753a835d",
        ],
        "postgres": [
            "3f43835c81291776b4bf8c6a64698a13c38b04520641fb49dc0ee1a1bf8cbd69",
            "c74e6817742628f6053a097ce13e8f0e04a881d34aad4bd6029faca5e0a05c78",
            "05a71f8adaa8a28c8de1f579577f00d05f096b97e5bc63d73b0ab84491ce2cc9",
            "dfac7d72bfd0cfcb049ad5f462de8265f6067f9be6360beae3b438a142fdf9d9",
            "76a35a9b5bad97f11dd691da77d7dde1eb328b9878d34e988b7732e8d8232bcb",
            "d771acf84c668eb5417e2b8921b79ba050327dec215e12c3b30a8aefff5fa56e",
            "0ea0d19b091036450da546aeadb72392f00cb7b1080543ee6eb6a1a99668e27b",
        ],
    }

    def test_no_index_of_seats_by_ticket(self) -> None:
        """
        SQLite migration 7 drops the index of seats by ticket (a purchase
        kept it up to date; a cancellation finds its seats by their key).
        """
        from tests.common import FAST_HASHER, MINI
        from vendepass.fixtures import load
        from vendepass.store import InlineExecutor
        from vendepass.store.sqlite import SQLiteStore

        store = SQLiteStore.open(":memory:", Clock(), InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(store.stop)
        indexes = {name for (name,) in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        self.assertNotIn("seats_ticket", indexes)
        self.assertIn("seats_hold", indexes)

    def test_tickets_indexed_once_per_status(self) -> None:
        """
        SQLite migration 8: a customer's tickets have one index per status
        (a purchase writes one of them), and no index of all of them. A
        purchase is in the active one only, a cancellation moves it to the
        other, and every page and list of a customer's tickets is read on
        those two: none reads the whole table.
        """
        from tests.common import FAST_HASHER, MINI, TINY
        from vendepass.fixtures import load
        from vendepass.schedule import flight_by_id
        from vendepass.store import InlineExecutor, LegRequest
        from vendepass.store.sqlite import SQLiteStore

        clock = Clock()
        store = SQLiteStore.open(":memory:", clock, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(store.stop)
        db = store._db
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        self.assertNotIn("tickets_user", indexes)
        self.assertIn("tickets_user_active", indexes)
        self.assertIn("tickets_user_cancelled", indexes)

        def indexed(index: str) -> list[str]:
            return [t for (t,) in db.execute(f"SELECT ticket_id FROM tickets INDEXED BY {index} WHERE username = 'alice'"
                                             f" AND status = '{index.rsplit('_', 1)[1]}'")]

        tiny = flight_by_id(store.network(), TINY)
        first = self.successResultOf(store.buy("alice", [LegRequest(tiny, "1A")]))
        second = self.successResultOf(store.buy("alice", [LegRequest(tiny, "1B")]))
        self.assertEqual(sorted(indexed("tickets_user_active")), sorted([first.ticket_id, second.ticket_id]))
        self.assertEqual(indexed("tickets_user_cancelled"), [])
        self.successResultOf(store.cancel(first.ticket_id, "alice"))
        self.assertEqual(indexed("tickets_user_active"), [second.ticket_id])
        self.assertEqual(indexed("tickets_user_cancelled"), [first.ticket_id])

        statements: list[str] = []
        db.set_trace_callback(statements.append)
        self.assertEqual([t.ticket_id for t in self.successResultOf(store.tickets("alice"))],
                         [first.ticket_id, second.ticket_id])
        for active_only in (False, True):
            self.successResultOf(store.ticket_page("alice", 1, None, active_only))
        db.set_trace_callback(None)
        read = [sql for sql in statements if "FROM tickets" in sql]
        self.assertEqual(len(read), 6)
        plans = [str(row[-1]) for sql in read for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
        self.assertTrue(any("tickets_user_cancelled" in plan for plan in plans), plans)
        self.assertFalse([plan for plan in plans if plan.startswith("SCAN")], plans)

    def test_ticket_legs_keyed_by_time_of_sale(self) -> None:
        """
        SQLite migration 9: a ticket's legs are keyed by its time of sale
        first, so that later purchases' legs go after earlier ones in the
        table (not at the random places of their booking codes), and each
        ticket still has its legs.
        """
        from tests.common import BIG, FAST_HASHER, MINI
        from vendepass.fixtures import load
        from vendepass.schedule import flight_by_id
        from vendepass.store import InlineExecutor, LegRequest
        from vendepass.store.sqlite import SQLiteStore

        clock = Clock()
        clock.advance(START)
        store = SQLiteStore.open(":memory:", clock, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(store.stop)
        db = store._db
        key = sorted((pk, name) for _, name, _, _, _, pk in db.execute("PRAGMA table_info(ticket_legs)") if pk)
        self.assertEqual([name for _, name in key], ["bought_at", "ticket_id", "leg"])
        big = flight_by_id(store.network(), BIG)
        bought = []
        for _ in range(20):
            clock.advance(1)
            bought.append(self.successResultOf(store.buy("alice", [LegRequest(big, None)])).ticket_id)
        self.assertNotEqual(bought, sorted(bought), "the codes are random")
        self.assertEqual([t for (t,) in db.execute("SELECT ticket_id FROM ticket_legs")], bought)
        self.assertEqual(
            [(t.ticket_id, len(t.legs)) for t in self.successResultOf(store.tickets("alice"))],
            [(t, 1) for t in bought],
        )

    def test_unchanged(self) -> None:
        import hashlib

        from vendepass.store import postgres, sqlite

        for name, migrations in (("sqlite", sqlite.MIGRATIONS), ("postgres", postgres.MIGRATIONS)):
            digests = [hashlib.sha256(m.encode()).hexdigest() for m in migrations]
            shipped = self.SHIPPED[name]
            self.assertEqual(digests[: len(shipped)], shipped, f"a shipped {name} migration was edited")
