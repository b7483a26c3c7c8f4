"""
Tests of L{ReservationService}: the reservation rules on a real SQLite store
in memory, driven by a L{Clock} (no sleeps, no reactor).

Most tests run the store on an L{InlineExecutor}. The race tests run it on a
L{QueueExecutor}, which only queues jobs, so a test can run them in the
order it chooses.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable

from attrs import define, field
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.common import ALICE, BIG, BOB, DIRECT, FAST_HASHER, MINI, NO_SUCH_DAY, START, TINY, make_service
from vendepass.errors import (
    PurchaseLimit,
    AlreadyCancelled,
    BadCredentials,
    FlightDeparted,
    HoldExpired,
    HoldNotFound,
    InvalidItinerary,
    InvalidRequest,
    NotLoggedIn,
    SeatUnavailable,
    SessionClosed,
    TicketNotFound,
    UnknownAirport,
    UnknownFlight,
    UnknownSeat,
    UsernameTaken,
)
from vendepass.fixtures import Fixtures, load, parse
from vendepass.model import Hold, Itinerary, Money
from vendepass.service import SORTS, ReservationService, SearchPage, Session
from vendepass.store import IExecutor, InlineExecutor
from vendepass.store.sqlite import SQLiteStore

HOUR = 3600.0
DAY = 86400.0
# TINY (VP100 on 2026-12-02) leaves Salvador at 08:00 local, 11:00 UTC.
TINY_DEPARTS = START + 26 * HOUR
# Midnight UTC at the end of START's day.
MIDNIGHT = datetime(2026, 12, 2, tzinfo=timezone.utc).timestamp()


@define
class _Job:
    job: Callable[[], Any]
    deferred: Deferred[Any]


@implementer(IExecutor)
@define
class QueueExecutor:
    """
    An executor that runs nothing by itself: jobs wait in C{queue} until the
    test runs them, in the order it likes. L{execute} runs a job without
    delivering its result, so a test can also choose when the caller hears
    of it.
    """

    queue: list[_Job] = field(factory=list)

    def submit(self, job: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append(_Job(job, d))
        return d

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def execute(self, index: int = 0) -> Callable[[], None]:
        """
        Run queued job C{index} now; return a function that delivers its
        result (or exception) to whoever submitted it.
        """
        pending = self.queue.pop(index)
        try:
            result = pending.job()
        except BaseException:
            failure = Failure()
            return lambda: pending.deferred.errback(failure)
        return lambda: pending.deferred.callback(result)

    def run(self, index: int = 0) -> None:
        """
        Run queued job C{index} and deliver its result at once.
        """
        self.execute(index)()

    def run_all(self) -> None:
        """
        Run jobs in order until none is left (including jobs queued by the
        callbacks of earlier ones).
        """
        while self.queue:
            self.run(0)


def build(
    fixtures: Callable[[], Fixtures] = lambda: load(MINI),
    executor: IExecutor | None = None,
    hold_seconds: float = 60,
) -> ReservationService:
    """
    A started service on an in-memory SQLite store whose jobs run on
    C{executor}; its clock starts at L{START}.
    """
    clock = Clock()
    clock.advance(START)
    store = SQLiteStore.open(":memory:", clock, executor or InlineExecutor(), fixtures, FAST_HASHER.hash)
    service = ReservationService(store, clock, FAST_HASHER, InlineExecutor(), hold_seconds=hold_seconds)
    service.startService()
    return service


class Notifications:
    """
    A session's notify callback that records the events pushed to it.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((name, data))


class ServiceTestMixin:
    successResultOf: Callable[..., Any]
    failureResultOf: Callable[..., Any]
    addCleanup: Callable[..., Any]

    service: ReservationService
    clock: Clock

    def use(self, service: ReservationService) -> None:
        self.service = service
        self.clock = service.clock  # type: ignore[assignment]
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.service.running:
            self.service.stopService()

    def ok(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)

    def refused(self, d: Deferred[Any], kind: type[BaseException]) -> Any:
        return self.failureResultOf(d, kind).value

    def session(self, user: tuple[str, str] | None = ALICE) -> tuple[Session, Notifications]:
        events = Notifications()
        session = self.service.open_session(events, "test")
        if user is not None:
            self.ok(self.service.login(session, *user))
        return session, events

    def seats(self, flight_id: str) -> dict[str, tuple[str, str | None]]:
        """
        The taken seats of a flight: seat -> (status, owner).
        """
        flight = self.service.schedule().by_id[flight_id]
        return {
            s.seat: (s.status, s.owner) for s in self.ok(self.service.store.seats(flight)) if s.status != "free"
        }

    def hold_state(self, hold: Hold) -> str | None:
        return self.ok(self.service.store.expire_hold(hold.hold_id))

    def active_holds(self) -> int:
        """
        How many holds the database has in state C{active}.
        """
        db = self.service.store._db  # type: ignore[attr-defined]
        return int(db.execute("SELECT COUNT(*) FROM holds WHERE state = 'active'").fetchone()[0])


class HoldLifecycleTests(ServiceTestMixin, SynchronousTestCase):
    """
    Holds expire, and end with their session or their user.
    """

    def setUp(self) -> None:
        self.use(make_service(hold_seconds=60))

    def test_hold(self) -> None:
        session, events = self.session()
        hold = self.ok(self.service.hold(session, [TINY, BIG], ["2A", None]))
        self.assertEqual(hold.username, "alice")
        self.assertEqual([(leg.flight.flight_id, leg.seat) for leg in hold.legs], [(TINY, "2A"), (BIG, "1A")])
        self.assertEqual(hold.expires_at, START + 60)
        self.assertEqual(hold.price, Money(84990, "BRL"))
        self.assertEqual(session.holds, {hold.hold_id})
        self.assertEqual(self.seats(TINY), {"2A": ("held", "alice")})
        self.assertEqual(events.events, [])

    def test_hold_needs_login(self) -> None:
        session, _ = self.session(None)
        self.refused(self.service.hold(session, [TINY]), NotLoggedIn)
        self.assertEqual(self.seats(TINY), {})

    def test_hold_expires_exactly_on_time(self) -> None:
        """
        A hold ends exactly C{hold_seconds} after it was made, not before,
        and its session is told with a C{hold_expired} event.
        """
        session, events = self.session()
        hold = self.ok(self.service.hold(session, [TINY], ["1A"]))
        self.clock.advance(59.75)
        self.assertEqual(events.events, [])
        self.assertEqual(self.seats(TINY), {"1A": ("held", "alice")})
        self.assertEqual(session.holds, {hold.hold_id})
        self.clock.advance(0.25)
        self.assertEqual(events.events, [("hold_expired", {"hold_id": hold.hold_id})])
        self.assertEqual(session.holds, set())
        self.assertEqual(self.seats(TINY), {})
        self.assertEqual(self.hold_state(hold), "expired")
        # Told once, whatever comes later.
        self.clock.advance(300)
        self.ok(self.service.sweep())
        self.assertEqual(len(events.events), 1)

    def test_hold_seconds(self) -> None:
        """
        The hold time is the service's C{hold_seconds}.
        """
        self.use(make_service(hold_seconds=300))
        session, events = self.session()
        hold = self.ok(self.service.hold(session, [TINY]))
        self.assertEqual(hold.expires_at, START + 300)
        self.clock.advance(299.5)
        self.assertEqual(events.events, [])
        self.clock.advance(0.5)
        self.assertEqual(events.events, [("hold_expired", {"hold_id": hold.hold_id})])

    def test_buy_late(self) -> None:
        session, events = self.session()
        hold = self.ok(self.service.hold(session, [TINY, BIG]))
        self.clock.advance(60)
        error = self.refused(self.service.buy(session, hold_id=hold.hold_id), HoldExpired)
        self.assertEqual(error.details, {"hold_id": hold.hold_id})
        self.assertEqual(list(self.ok(self.service.tickets(session)).tickets), [])
        self.assertEqual(self.seats(TINY), {})
        self.assertEqual(self.seats(BIG), {})

    def test_buy_late_before_timer(self) -> None:
        """
        Even if the timer has not run yet (the clock jumped), a hold whose
        time is up cannot be bought.
        """
        session, _ = self.session()
        hold = self.ok(self.service.hold(session, [TINY]))
        self.clock.rightNow += 60
        self.refused(self.service.buy(session, hold_id=hold.hold_id), HoldExpired)
        self.assertEqual(self.seats(TINY), {})

    def test_buy_own_hold(self) -> None:
        session, events = self.session()
        hold = self.ok(self.service.hold(session, [TINY, BIG], ["1B", "7D"]))
        self.clock.advance(30)
        ticket = self.ok(self.service.buy(session, hold_id=hold.hold_id))
        self.assertEqual(ticket.username, "alice")
        self.assertEqual(ticket.status, "active")
        self.assertEqual([(leg.flight_id, leg.seat) for leg in ticket.legs], [(TINY, "1B"), (BIG, "7D")])
        self.assertEqual(ticket.price, hold.price)
        self.assertEqual(ticket.bought_at, START + 30)
        self.assertEqual(session.holds, set())
        self.assertEqual(self.seats(TINY), {"1B": ("sold", "alice")})
        self.assertEqual(list(self.ok(self.service.tickets(session)).tickets), [ticket])
        # The hold's timer is gone: no expiry event, the seat stays sold.
        self.clock.advance(120)
        self.assertEqual(events.events, [])
        self.assertEqual(self.seats(TINY), {"1B": ("sold", "alice")})
        self.refused(self.service.buy(session, hold_id=hold.hold_id), HoldNotFound)

    def test_buy_other_users_hold(self) -> None:
        alice, _ = self.session(ALICE)
        bob, _ = self.session(BOB)
        hold = self.ok(self.service.hold(alice, [TINY]))
        self.refused(self.service.buy(bob, hold_id=hold.hold_id), HoldNotFound)
        self.refused(self.service.release(bob, hold.hold_id), HoldNotFound)
        self.assertEqual(self.seats(TINY), {"1A": ("held", "alice")})
        self.assertEqual(list(self.ok(self.service.tickets(bob)).tickets), [])

    def test_buy_own_hold_from_another_session(self) -> None:
        """
        A hold belongs to its user: another connection of the same user can
        buy it, and the first one then hears nothing about it expiring.
        """
        first, first_events = self.session()
        second, _ = self.session()
        hold = self.ok(self.service.hold(first, [TINY]))
        self.ok(self.service.buy(second, hold_id=hold.hold_id))
        self.assertEqual(first.holds, set())
        self.clock.advance(120)
        self.assertEqual(first_events.events, [])

    def test_buy_in_one_step(self) -> None:
        session, _ = self.session()
        ticket = self.ok(self.service.buy(session, flight_ids=[TINY, BIG], seats=[None, "30F"]))
        self.assertEqual([(leg.flight_id, leg.seat) for leg in ticket.legs], [(TINY, "1A"), (BIG, "30F")])
        self.assertEqual(session.holds, set())
        self.assertEqual(self.seats(BIG), {"30F": ("sold", "alice")})

    def test_seat_unavailable(self) -> None:
        alice, _ = self.session(ALICE)
        bob, _ = self.session(BOB)
        self.ok(self.service.hold(alice, [TINY], ["2B"]))
        error = self.refused(self.service.hold(bob, [TINY], ["2B"]), SeatUnavailable)
        self.assertEqual(error.details["held_until"], "2026-12-01T09:01:00Z")
        self.refused(self.service.buy(bob, flight_ids=[TINY], seats=["2B"]), SeatUnavailable)

    def test_release(self) -> None:
        session, events = self.session()
        hold = self.ok(self.service.hold(session, [TINY]))
        self.assertIsNone(self.ok(self.service.release(session, hold.hold_id)))
        self.assertEqual(session.holds, set())
        self.assertEqual(self.seats(TINY), {})
        self.clock.advance(120)
        self.assertEqual(events.events, [])
        self.refused(self.service.release(session, hold.hold_id), HoldNotFound)

    def test_close_without_holds_costs_nothing(self) -> None:
        """
        A connection that holds nothing (most of them: browsing customers,
        a load balancer's health checks) closes without a transaction; one
        that holds a seat has its holds released.
        """
        released: list[str] = []
        real = self.service.store.release_session

        def release_session(session_id: str) -> Deferred[list[str]]:
            released.append(session_id)
            return real(session_id)

        self.patch(self.service.store, "release_session", release_session)
        browsing, _ = self.session()
        self.ok(self.service.close_session(browsing))
        holding, _ = self.session(BOB)
        self.ok(self.service.hold(holding, [TINY], ["1A"]))
        self.ok(self.service.close_session(holding))
        self.assertEqual(released, [holding.session_id])
        self.assertEqual(self.seats(TINY), {})

    def test_close_session_releases(self) -> None:
        """
        Closing a session frees its seats at once, and its holds never send
        an event to the dead connection.
        """
        session, events = self.session()
        other, other_events = self.session(BOB)
        hold = self.ok(self.service.hold(session, [TINY, BIG], ["1A", "1A"]))
        kept = self.ok(self.service.hold(other, [TINY], ["2A"]))
        calls = len(self.clock.getDelayedCalls())
        self.ok(self.service.close_session(session))
        self.assertFalse(session.alive)
        self.assertEqual(self.seats(TINY), {"2A": ("held", "bob")})
        self.assertEqual(self.seats(BIG), {})
        self.assertEqual(self.hold_state(hold), "released")
        self.assertEqual(len(self.clock.getDelayedCalls()), calls - 1)
        self.clock.advance(59)
        self.ok(self.service.sweep())
        self.clock.advance(120)
        self.assertEqual(events.events, [])
        # The other session's hold lives on and expires normally.
        self.assertEqual(other_events.events, [("hold_expired", {"hold_id": kept.hold_id})])

    def test_closed_session_cannot_hold(self) -> None:
        session, _ = self.session()
        self.ok(self.service.close_session(session))
        self.refused(self.service.hold(session, [TINY]), SessionClosed)
        self.assertEqual(self.seats(TINY), {})
        self.assertEqual(self.active_holds(), 0)

    def test_login_switch_releases(self) -> None:
        """
        Logging in as another user on a session releases the holds made on it.
        """
        session, events = self.session(ALICE)
        hold = self.ok(self.service.hold(session, [TINY], ["1A"]))
        self.assertEqual(self.ok(self.service.login(session, *BOB)), "bob")
        self.assertEqual(session.username, "bob")
        self.assertEqual(session.holds, set())
        self.assertEqual(self.seats(TINY), {})
        self.assertEqual(self.hold_state(hold), "released")
        self.clock.advance(120)
        self.assertEqual(events.events, [])
        # Now the session acts for bob.
        self.ok(self.service.hold(session, [TINY], ["1A"]))
        self.assertEqual(self.seats(TINY), {"1A": ("held", "bob")})

    def test_login_same_user_keeps_holds(self) -> None:
        session, events = self.session(ALICE)
        hold = self.ok(self.service.hold(session, [TINY], ["1A"]))
        self.assertEqual(self.ok(self.service.login(session, *ALICE)), "alice")
        self.assertEqual(session.holds, {hold.hold_id})
        self.assertEqual(self.seats(TINY), {"1A": ("held", "alice")})
        self.assertEqual(self.hold_state(hold), "active")
        self.ok(self.service.buy(session, hold_id=hold.hold_id))
        self.assertEqual(self.seats(TINY), {"1A": ("sold", "alice")})

    def test_failed_login_keeps_user_and_holds(self) -> None:
        session, _ = self.session(ALICE)
        hold = self.ok(self.service.hold(session, [TINY], ["1A"]))
        self.refused(self.service.login(session, "bob", "wrong-password"), BadCredentials)
        self.assertEqual(session.username, "alice")
        self.assertEqual(session.holds, {hold.hold_id})
        self.assertEqual(self.hold_state(hold), "active")

    def test_logout_releases(self) -> None:
        session, events = self.session(ALICE)
        hold = self.ok(self.service.hold(session, [TINY, BIG]))
        self.assertIsNone(self.ok(self.service.logout(session)))
        self.assertIsNone(session.username)
        self.assertEqual(session.holds, set())
        self.assertEqual(self.seats(TINY), {})
        self.assertEqual(self.seats(BIG), {})
        self.assertEqual(self.hold_state(hold), "released")
        self.clock.advance(120)
        self.assertEqual(events.events, [])
        self.refused(self.service.hold(session, [TINY]), NotLoggedIn)
        self.refused(self.service.tickets(session), NotLoggedIn)
        self.refused(self.service.logout(session), NotLoggedIn)

    def test_sweep(self) -> None:
        """
        The sweep ends every hold whose time is up, even when its timer has
        not run (here the clock jumps without running timers), and tells
        each live session once.
        """
        alice, alice_events = self.session(ALICE)
        bob, bob_events = self.session(BOB)
        gone, gone_events = self.session(ALICE)
        idle = len(self.clock.getDelayedCalls())
        first = self.ok(self.service.hold(alice, [TINY], ["1A"]))
        second = self.ok(self.service.hold(bob, [BIG], ["1A"]))
        self.clock.rightNow += 30
        later = self.ok(self.service.hold(bob, [TINY], ["2A"]))
        self.clock.rightNow += 30
        self.ok(self.service.sweep())
        self.assertEqual(alice_events.events, [("hold_expired", {"hold_id": first.hold_id})])
        self.assertEqual(bob_events.events, [("hold_expired", {"hold_id": second.hold_id})])
        self.assertEqual(alice.holds, set())
        self.assertEqual(bob.holds, {later.hold_id})
        self.assertEqual(self.seats(TINY), {"2A": ("held", "bob")})
        self.assertEqual(self.seats(BIG), {})
        self.assertEqual(self.hold_state(first), "expired")
        # The swept holds' timers were cancelled: only the later hold's is
        # left, and running the clock now sends nothing twice.
        self.assertEqual(len(self.clock.getDelayedCalls()), idle + 1)
        self.clock.advance(0)
        self.assertEqual(len(alice_events.events), 1)
        self.assertEqual(len(bob_events.events), 1)
        self.clock.advance(30)
        self.assertEqual(bob_events.events[1:], [("hold_expired", {"hold_id": later.hold_id})])
        self.assertEqual(gone_events.events, [])
        self.assertEqual(self.active_holds(), 0)
        self.ok(self.service.close_session(gone))

    def test_sweeper_runs(self) -> None:
        """
        The service sweeps on its own every minute.
        """
        session, events = self.session()
        hold = self.ok(self.service.hold(session, [TINY]))
        # Cancel the hold's own timer through a private door, so that only
        # the periodic sweep can end it.
        timer, _ = self.service._timers[hold.hold_id]
        timer.cancel()
        self.clock.advance(60)
        self.assertEqual(events.events, [("hold_expired", {"hold_id": hold.hold_id})])
        self.assertEqual(self.seats(TINY), {})

    def test_stop_cancels_timers(self) -> None:
        session, _ = self.session()
        self.ok(self.service.hold(session, [TINY]))
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RaceTests(ServiceTestMixin, SynchronousTestCase):
    """
    A hold whose session closes while the hold is on its way through the
    store must not stay held, whatever the order the jobs run in.
    """

    def setUp(self) -> None:
        self.executor = QueueExecutor()
        self.use(build(executor=self.executor))
        self.session_, self.events = self.session_in_queue()
        self.idle_calls = len(self.clock.getDelayedCalls())

    def session_in_queue(self) -> tuple[Session, Notifications]:
        events = Notifications()
        session = self.service.open_session(events, "test")
        d = self.service.login(session, *ALICE)
        self.executor.run_all()
        self.ok(d)
        return session, events

    def settle(self) -> None:
        """
        Check that nothing is held, nothing will expire, nothing was told.
        """
        self.executor.run_all()
        self.assertEqual(self.active_holds(), 0)
        flight = self.service.schedule().by_id[TINY]
        d = self.service.store.free_seats([flight])
        self.executor.run_all()
        self.assertEqual(self.ok(d), {TINY: 4})
        self.assertEqual(self.session_.holds, set())
        self.assertEqual(len(self.clock.getDelayedCalls()), self.idle_calls)
        self.clock.advance(120)
        self.executor.run_all()
        self.assertEqual(self.events.events, [])

    def test_release_job_first(self) -> None:
        """
        The session closes while its hold job waits; the release job runs
        first (finding nothing), then the hold job: it must not hold.
        """
        d = self.service.hold(self.session_, [TINY], ["1A"])
        self.assertEqual(len(self.executor.queue), 1)
        self.service.close_session(self.session_)
        self.assertEqual(len(self.executor.queue), 2)
        self.executor.run(1)
        self.executor.run(0)
        self.refused(d, SessionClosed)
        self.settle()

    def test_hold_job_first(self) -> None:
        """
        The session closes while its hold job waits; the hold job runs
        first, then the release job.
        """
        d = self.service.hold(self.session_, [TINY], ["1A"])
        self.service.close_session(self.session_)
        self.executor.run(0)
        self.refused(d, SessionClosed)
        self.executor.run(0)
        self.settle()

    def test_closed_after_hold_committed(self) -> None:
        """
        The hold commits while the session is alive; the session closes
        before the answer arrives; the release job runs, then the answer
        arrives.
        """
        d = self.service.hold(self.session_, [TINY], ["1A"])
        deliver = self.executor.execute(0)
        self.assertEqual(self.active_holds(), 1)
        close = self.service.close_session(self.session_)
        self.executor.run(0)
        self.ok(close)
        deliver()
        self.executor.run_all()
        self.refused(d, SessionClosed)
        self.settle()

    def test_answer_before_release_job(self) -> None:
        """
        The hold commits while the session is alive; the session closes;
        the answer arrives before the release job runs.
        """
        d = self.service.hold(self.session_, [TINY], ["1A"])
        deliver = self.executor.execute(0)
        close = self.service.close_session(self.session_)
        deliver()
        self.assertEqual(self.active_holds(), 1)
        self.executor.run_all()
        self.ok(close)
        self.refused(d, SessionClosed)
        self.settle()

    def test_other_sessions_hold_survives(self) -> None:
        """
        Closing one session releases only its own holds, even in a race.
        """
        bob = self.service.open_session(Notifications(), "bob")
        login = self.service.login(bob, *BOB)
        self.executor.run_all()
        self.ok(login)
        kept = self.service.hold(bob, [TINY], ["2A"])
        d = self.service.hold(self.session_, [TINY], ["1A"])
        self.service.close_session(self.session_)
        self.executor.run(2)
        self.executor.run_all()
        self.refused(d, SessionClosed)
        self.ok(kept)
        self.assertEqual(self.active_holds(), 1)
        self.assertEqual(self.seats_in_queue(), {"2A": ("held", "bob")})

    def seats_in_queue(self) -> dict[str, tuple[str, str | None]]:
        flight = self.service.schedule().by_id[TINY]
        d = self.service.store.seats(flight)
        self.executor.run_all()
        return {s.seat: (s.status, s.owner) for s in self.ok(d) if s.status != "free"}


class AccountTests(ServiceTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.use(make_service())

    def test_register_and_login(self) -> None:
        self.assertEqual(self.ok(self.service.register("carol_99", "carol-password")), "carol_99")
        stored = self.ok(self.service.store.password_hash("carol_99"))
        self.assertNotIn("carol-password", stored)
        session, _ = self.session(None)
        self.assertIsNone(session.username)
        self.assertEqual(self.ok(self.service.login(session, "carol_99", "carol-password")), "carol_99")
        self.assertEqual(session.username, "carol_99")

    def test_register_taken(self) -> None:
        self.refused(self.service.register("alice", "another-password"), UsernameTaken)
        self.ok(self.service.register("carol", "carol-password"))
        self.refused(self.service.register("carol", "carol-password"), UsernameTaken)
        # The first password still works.
        session, _ = self.session(ALICE)
        self.assertEqual(session.username, "alice")

    def test_register_bad_username(self) -> None:
        for username in ("ab", "a" * 33, "Carol", "carol!", "ca rol", "carol-x", "", "çarol"):
            error = self.refused(self.service.register(username, "good-password"), InvalidRequest)
            self.assertEqual(error.details, {"field": "username"}, username)
            self.assertIsNone(self.ok(self.service.store.password_hash(username)))

    def test_register_username_trailing_newline(self) -> None:
        """
        A username is only lowercase letters, digits and _: not even a final
        newline (which C{$} in a Python pattern lets through).
        """
        error = self.refused(self.service.register("carol\n", "good-password"), InvalidRequest)
        self.assertEqual(error.details, {"field": "username"})
        self.assertIsNone(self.ok(self.service.store.password_hash("carol\n")))

    def test_register_username_limits(self) -> None:
        for username in ("abc", "a" * 32, "x_1"):
            self.assertEqual(self.ok(self.service.register(username, "good-password")), username)

    def test_register_bad_password(self) -> None:
        for password in ("", "short", "7chars!", "p" * 257):
            error = self.refused(self.service.register("carol", password), InvalidRequest)
            self.assertEqual(error.details, {"field": "password"})
        self.assertIsNone(self.ok(self.service.store.password_hash("carol")))

    def test_register_password_limits(self) -> None:
        self.ok(self.service.register("carol", "8 chars!"))
        self.ok(self.service.register("dave", "p" * 256))
        session, _ = self.session(None)
        self.ok(self.service.login(session, "dave", "p" * 256))

    def test_login(self) -> None:
        session, _ = self.session(None)
        self.assertEqual(self.ok(self.service.login(session, *ALICE)), "alice")
        self.assertEqual(session.username, "alice")

    def test_bad_credentials(self) -> None:
        session, _ = self.session(None)
        for username, password in [
            ("alice", "bob-password"),
            ("alice", ""),
            ("nobody", "alice-password"),
            ("Alice", "alice-password"),
            ("al", "alice-password"),
        ]:
            error = self.refused(self.service.login(session, username, password), BadCredentials)
            self.assertEqual(error.code, "bad_credentials")
            self.assertIsNone(session.username)

    def test_tickets_need_login(self) -> None:
        session, _ = self.session(None)
        self.refused(self.service.tickets(session), NotLoggedIn)
        self.refused(self.service.buy(session, flight_ids=[TINY]), NotLoggedIn)
        self.refused(self.service.cancel(session, "ABCDEFGH"), NotLoggedIn)
        self.refused(self.service.release(session, "H0"), NotLoggedIn)


class PurchaseCapTests(ServiceTestMixin, SynchronousTestCase):
    """
    One customer cannot take a flight's seats in a burst (purchase requests
    per customer per minute, seats per customer per flight), nor crowd
    others out with reads of their tickets.
    """

    def setUp(self) -> None:
        self.use(make_service())

    def test_purchases_per_minute(self) -> None:
        """
        Past C{max_purchases_per_minute} purchase requests (one step or of
        a hold, granted or refused) in any 60 s, a customer's next is
        refused with C{purchase_limit} and when to try again, and buys
        nothing; other customers are not slowed; the window slides.
        """
        self.service.max_purchases_per_minute = 3
        alice, _ = self.session(ALICE)
        bob, _ = self.session(BOB)
        self.ok(self.service.buy(alice, flight_ids=[BIG]))
        self.clock.advance(10)
        hold = self.ok(self.service.hold(alice, [BIG]))
        self.ok(self.service.buy(alice, hold_id=hold.hold_id))
        self.clock.advance(10)
        # A refused purchase counts too (1A is taken).
        self.refused(self.service.buy(alice, flight_ids=[BIG], seats=["1A"]), SeatUnavailable)
        refused = self.refused(self.service.buy(alice, flight_ids=[BIG]), PurchaseLimit)
        self.assertEqual(refused.details, {"limit": 3, "retry_after": 40})
        self.assertEqual(refused.code, "purchase_limit")
        self.assertEqual(len(self.ok(self.service.tickets(alice)).tickets), 2)
        self.ok(self.service.buy(bob, flight_ids=[BIG]))
        self.clock.advance(39)
        self.refused(self.service.buy(alice, flight_ids=[BIG]), PurchaseLimit)
        self.clock.advance(1)  # the first purchase is 60 s old
        self.ok(self.service.buy(alice, flight_ids=[BIG]))
        # The table forgets customers with no purchase in the last minute.
        self.clock.advance(120)
        self.ok(self.service.sweep())
        self.assertEqual(self.service._purchases, {})

    def test_ticket_reads_take_turns(self) -> None:
        """
        One customer's C{tickets} reads on several connections run one at
        a time; another customer's do not wait for them.
        """
        started: list[tuple[str, Deferred[Any]]] = []
        real = self.service.store.ticket_page

        def page(username: str, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            started.append((username, d))
            return d

        self.patch(self.service.store, "ticket_page", page)
        first, _ = self.session(ALICE)
        second, _ = self.session(ALICE)
        bob, _ = self.session(BOB)
        reads = [self.service.tickets(first), self.service.tickets(second), self.service.tickets(bob)]
        self.assertEqual([u for u, _ in started], ["alice", "bob"])
        answer = self.ok(real("alice", 1))
        started[0][1].callback(answer)
        self.assertEqual([u for u, _ in started], ["alice", "bob", "alice"])
        self.assertIs(self.ok(reads[0]), answer)
        started[2][1].callback(answer)
        started[1][1].callback(answer)
        self.assertIs(self.ok(reads[1]), answer)
        self.assertIs(self.ok(reads[2]), answer)
        self.assertEqual(self.service._ticket_reads, {})

    def test_seats_per_flight(self) -> None:
        """
        The seats one customer may have on a flight (held or bought) are
        capped: one account cannot buy a whole flight in one-step
        purchases, while other customers still can buy.
        """
        self.service.store.max_seats_per_flight = 9  # type: ignore[attr-defined]
        alice, _ = self.session(ALICE)
        bob, _ = self.session(BOB)
        for _ in range(9):
            self.ok(self.service.buy(alice, flight_ids=[BIG]))
        refused = self.refused(self.service.buy(alice, flight_ids=[BIG]), PurchaseLimit)
        self.assertEqual(refused.details, {"limit": 9, "flight": BIG})
        self.refused(self.service.hold(alice, [BIG]), PurchaseLimit)
        self.ok(self.service.buy(bob, flight_ids=[BIG]))
        self.assertEqual(len(self.ok(self.service.tickets(alice)).tickets), 9)


class FlightRulesTests(ServiceTestMixin, SynchronousTestCase):
    """
    Which flights can be sold: the sales window, departures, itineraries.
    """

    def setUp(self) -> None:
        self.use(make_service())

    def test_unknown_flights(self) -> None:
        session, _ = self.session()
        for flight_id in (NO_SUCH_DAY, "VP999-2026-12-02", "VP100", "VP100-2026-13-01", "VP100-20261202"):
            error = self.refused(self.service.hold(session, [flight_id]), UnknownFlight)
            self.assertEqual(error.details, {"flight": flight_id})
            self.refused(self.service.seatmap(session, flight_id), UnknownFlight)

    def test_bad_seats(self) -> None:
        session, _ = self.session()
        error = self.refused(self.service.hold(session, [TINY], ["3A"]), UnknownSeat)
        self.assertEqual(error.details, {"flight": TINY, "seat": "3A"})
        self.refused(self.service.hold(session, [TINY], ["1C"]), UnknownSeat)
        self.refused(self.service.buy(session, flight_ids=[TINY], seats=["a1"]), UnknownSeat)
        error = self.refused(self.service.hold(session, [TINY, BIG], ["1A"]), InvalidRequest)
        self.assertEqual(error.details, {"field": "seats"})
        self.assertEqual(self.seats(TINY), {})

    def test_seat_with_trailing_newline(self) -> None:
        """
        C{"1A\n"} is not a seat: taking it must not sell seat 1A a second time.
        """
        alice, _ = self.session(ALICE)
        bob, _ = self.session(BOB)
        self.ok(self.service.hold(alice, [TINY], ["1A"]))
        error = self.refused(self.service.buy(bob, flight_ids=[TINY], seats=["1A\n"]), UnknownSeat)
        self.assertEqual(error.details, {"flight": TINY, "seat": "1A\n"})
        self.refused(self.service.hold(bob, [TINY], ["2B\n"]), UnknownSeat)
        self.assertEqual(list(self.ok(self.service.tickets(bob)).tickets), [])
        flight = self.service.schedule().by_id[TINY]
        self.assertEqual(self.ok(self.service.store.free_seats([flight])), {TINY: 3})

    def test_invalid_itinerary(self) -> None:
        session, _ = self.session()
        # BIG leaves Recife, DIRECT leaves Salvador.
        self.refused(self.service.hold(session, [BIG, DIRECT]), InvalidItinerary)
        self.refused(self.service.buy(session, flight_ids=[]), InvalidItinerary)
        self.refused(self.service.hold(session, [TINY, "VP101-2026-12-02"]), InvalidItinerary)
        self.assertEqual(self.seats(TINY), {})

    def test_sales_window(self) -> None:
        """
        Flights are sold 30 days ahead; the window moves at midnight UTC.
        """
        session, _ = self.session()
        last = "VP100-2026-12-31"
        beyond = "VP100-2027-01-01"
        self.assertEqual(self.ok(self.service.seatmap(session, last)).flight.flight_id, last)
        error = self.refused(self.service.seatmap(session, beyond), UnknownFlight)
        self.assertEqual(error.details, {"flight": beyond})
        self.refused(self.service.hold(session, [beyond]), UnknownFlight)
        self.refused(self.service.buy(session, flight_ids=[beyond]), UnknownFlight)
        self.clock.advance(MIDNIGHT - 1 - self.clock.seconds())
        self.refused(self.service.seatmap(session, beyond), UnknownFlight)
        self.clock.advance(1)
        self.assertEqual(self.ok(self.service.seatmap(session, beyond)).flight.flight_id, beyond)
        hold = self.ok(self.service.hold(session, [beyond]))
        self.assertEqual(hold.legs[0].flight.flight_id, beyond)
        self.refused(self.service.seatmap(session, "VP100-2027-01-02"), UnknownFlight)
        self.assertEqual(
            [i.legs[0].flight_id for i in self.ok(self.service.search("SSA", "REC", on=date(2027, 1, 1)))],
            [beyond],
        )
        self.assertEqual(self.ok(self.service.search("SSA", "REC", on=date(2027, 1, 2))), [])

    def test_schedule_rolls_days_later(self) -> None:
        session, _ = self.session()
        self.clock.advance(10 * DAY)
        self.ok(self.service.seatmap(session, "VP100-2027-01-10"))
        self.refused(self.service.seatmap(session, "VP100-2027-01-11"), UnknownFlight)
        # The window keeps yesterday's flights (time zones): departed, not unknown.
        self.refused(self.service.seatmap(session, "VP100-2026-12-10"), FlightDeparted)
        self.refused(self.service.seatmap(session, "VP100-2026-12-05"), UnknownFlight)

    def test_departed(self) -> None:
        session, _ = self.session()
        self.clock.advance(TINY_DEPARTS - 1 - self.clock.seconds())
        self.ok(self.service.seatmap(session, TINY))
        self.clock.advance(1)
        error = self.refused(self.service.hold(session, [TINY]), FlightDeparted)
        self.assertEqual(error.details, {"flight": TINY})
        self.assertEqual(error.code, "flight_departed")
        self.refused(self.service.buy(session, flight_ids=[TINY]), FlightDeparted)
        self.refused(self.service.seatmap(session, TINY), FlightDeparted)
        self.refused(self.service.hold(session, [TINY, BIG]), FlightDeparted)
        # A later flight of the same itinerary is still for sale.
        self.ok(self.service.hold(session, [BIG]))

    def test_buy_hold_after_departure(self) -> None:
        self.use(make_service(hold_seconds=2 * DAY))
        session, _ = self.session()
        hold = self.ok(self.service.hold(session, [TINY, BIG]))
        self.clock.advance(TINY_DEPARTS - self.clock.seconds())
        self.refused(self.service.buy(session, hold_id=hold.hold_id), FlightDeparted)
        self.assertEqual(list(self.ok(self.service.tickets(session)).tickets), [])

    def test_cancel(self) -> None:
        alice, _ = self.session(ALICE)
        bob, _ = self.session(BOB)
        ticket = self.ok(self.service.buy(alice, flight_ids=[TINY, BIG], seats=["1A", "1A"]))
        self.refused(self.service.cancel(bob, ticket.ticket_id), TicketNotFound)
        self.assertEqual(self.seats(TINY), {"1A": ("sold", "alice")})
        cancelled = self.ok(self.service.cancel(alice, ticket.ticket_id))
        self.assertEqual(cancelled.status, "cancelled")
        self.assertEqual(self.seats(TINY), {})
        self.refused(self.service.cancel(alice, ticket.ticket_id), AlreadyCancelled)
        self.assertEqual(list(self.ok(self.service.tickets(alice)).tickets), [cancelled])
        self.ok(self.service.hold(bob, [TINY, BIG], ["1A", "1A"]))

    def test_cancel_after_departure(self) -> None:
        session, _ = self.session()
        ticket = self.ok(self.service.buy(session, flight_ids=[TINY, BIG]))
        self.clock.advance(TINY_DEPARTS - self.clock.seconds())
        error = self.refused(self.service.cancel(session, ticket.ticket_id), FlightDeparted)
        self.assertEqual(error.details, {"ticket_id": ticket.ticket_id})
        self.assertEqual([t.status for t in list(self.ok(self.service.tickets(session)).tickets)], ["active"])

    def test_tickets_across_sessions(self) -> None:
        first, _ = self.session()
        ticket = self.ok(self.service.buy(first, flight_ids=[DIRECT]))
        self.ok(self.service.close_session(first))
        second, _ = self.session()
        self.assertEqual(list(self.ok(self.service.tickets(second)).tickets), [ticket])
        bob, _ = self.session(BOB)
        self.assertEqual(list(self.ok(self.service.tickets(bob)).tickets), [])


# A network with a hub (REC) for the search tests. On any day:
#   VP1  SSA 08:00 -> REC 09:15                  (2 seats)
#   VP2  REC 09:59 -> MAO   connection of 44 minutes: too short
#   VP3  REC 10:00 -> MAO   45 minutes: just enough; arrives 13:00 Manaus
#   VP8  REC 10:00 -> MAO   same times as VP3, cheaper
#   VP5  REC 10:30 -> FOR 11:30, VP6 FOR 13:00 -> MAO 15:00 Manaus (3 legs)
#   VP4  SSA 12:00 -> MAO 14:00 Manaus (direct)
#   VP9  MAO 22:30 -> REC (02:30 UTC the next day)
#   VP7  SSA 06:00 -> REC, Saturdays only
HUB: dict[str, Any] = {
    "format": 1,
    "airline": {"code": "VP", "name": "Hub Test Air", "currency": "BRL"},
    "airports": [
        {"code": "SSA", "city": "Salvador", "name": "Salvador", "timezone": "America/Bahia"},
        {"code": "REC", "city": "Recife", "name": "Recife", "timezone": "America/Recife"},
        {"code": "FOR", "city": "Fortaleza", "name": "Fortaleza", "timezone": "America/Fortaleza"},
        {"code": "MAO", "city": "Manaus", "name": "Manaus", "timezone": "America/Manaus"},
    ],
    "aircraft": [
        {"type": "TWO", "name": "Two seats", "rows": 1, "letters": "AB"},
        {"type": "A320", "name": "Airbus A320", "rows": 30, "letters": "ABCDEF"},
    ],
    "timetable": [
        {"flight": "VP1", "origin": "SSA", "destination": "REC", "departure": "08:00", "duration_minutes": 75,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "TWO", "fare": "100.00"},
        {"flight": "VP2", "origin": "REC", "destination": "MAO", "departure": "09:59", "duration_minutes": 240,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "A320", "fare": "100.00"},
        {"flight": "VP3", "origin": "REC", "destination": "MAO", "departure": "10:00", "duration_minutes": 240,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "A320", "fare": "500.00"},
        {"flight": "VP8", "origin": "REC", "destination": "MAO", "departure": "10:00", "duration_minutes": 240,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "A320", "fare": "400.00"},
        {"flight": "VP5", "origin": "REC", "destination": "FOR", "departure": "10:30", "duration_minutes": 60,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "A320", "fare": "50.00"},
        {"flight": "VP6", "origin": "FOR", "destination": "MAO", "departure": "13:00", "duration_minutes": 180,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "A320", "fare": "50.00"},
        {"flight": "VP4", "origin": "SSA", "destination": "MAO", "departure": "12:00", "duration_minutes": 180,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "A320", "fare": "900.00"},
        {"flight": "VP9", "origin": "MAO", "destination": "REC", "departure": "22:30", "duration_minutes": 200,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "A320", "fare": "300.00"},
        {"flight": "VP7", "origin": "SSA", "destination": "REC", "departure": "06:00", "duration_minutes": 75,
         "days": [6], "aircraft": "A320", "fare": "80.00"},
    ],
    "customers": [
        {"username": "alice", "password": "alice-password"},
        {"username": "bob", "password": "bob-password"},
    ],
}

WEDNESDAY = date(2026, 12, 2)


def numbers(itineraries: list[Itinerary]) -> list[tuple[str, ...]]:
    return [tuple(leg.number for leg in i.legs) for i in itineraries]


class SearchTests(ServiceTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.use(build(lambda: parse(json.loads(json.dumps(HUB)))))

    def search(self, origin: str = "SSA", destination: str = "MAO", **kwargs: Any) -> list[Itinerary]:
        return self.ok(self.service.search(origin, destination, **kwargs))

    def test_via_hub(self) -> None:
        """
        One day's itineraries: direct, through the hub with at least 45
        minutes to connect (44 is not enough), and with three legs; sorted by
        departure, then arrival, then price.
        """
        found = self.search(on=WEDNESDAY)
        self.assertEqual(numbers(found), [("VP1", "VP8"), ("VP1", "VP3"), ("VP1", "VP5", "VP6"), ("VP4",)])
        for itinerary in found:
            self.assertEqual({leg.flight_id[-10:] for leg in itinerary.legs}, {"2026-12-02"})
        via = found[0]
        self.assertEqual(via.legs[1].departure - via.legs[0].arrival, timedelta(minutes=45))
        self.assertEqual(via.price, Money(50000, "BRL"))
        self.assertEqual(found[1].price, Money(60000, "BRL"))
        self.assertEqual(via.free_seats, (2, 180))
        self.assertEqual(found[3].free_seats, (180,))

    def test_sorted_by_departure(self) -> None:
        found = self.search(limit=500)
        self.assertTrue(len(found) > 100, len(found))
        keys = [(i.legs[0].departs_ts, i.legs[-1].arrives_ts, i.price.cents) for i in found]
        self.assertEqual(keys, sorted(keys))
        self.assertTrue(all(key[0] > self.clock.seconds() for key in keys))
        self.assertNotIn(("VP1", "VP2"), numbers(found))

    def test_date_filter(self) -> None:
        """
        The date is the local date of departure at the origin.
        """
        saturday = date(2026, 12, 5)
        self.assertEqual(numbers(self.search("SSA", "REC", on=saturday, max_legs=1)), [("VP7",), ("VP1",)])
        self.assertEqual(numbers(self.search("SSA", "REC", on=WEDNESDAY, max_legs=1)), [("VP1",)])
        # Via Manaus: VP4 lands at 14:00, VP9 leaves at 22:30 the same day.
        self.assertEqual(
            numbers(self.search("SSA", "REC", on=WEDNESDAY)), [("VP1",), ("VP4", "VP9")]
        )
        late = self.search("MAO", "REC", on=WEDNESDAY, max_legs=1)
        self.assertEqual([i.legs[0].flight_id for i in late], ["VP9-2026-12-02"])
        # 22:30 in Manaus is already the next day in UTC.
        self.assertEqual(late[0].legs[0].departure.astimezone(timezone.utc).date(), date(2026, 12, 3))
        self.assertEqual(self.search(on=date(2027, 2, 1)), [])

    def test_max_legs(self) -> None:
        self.assertEqual(numbers(self.search(on=WEDNESDAY, max_legs=1)), [("VP4",)])
        self.assertEqual(
            numbers(self.search(on=WEDNESDAY, max_legs=2)), [("VP1", "VP8"), ("VP1", "VP3"), ("VP4",)]
        )
        self.assertEqual(len(self.search(on=WEDNESDAY, max_legs=3)), 4)

    def test_limit(self) -> None:
        everything = self.search()
        self.assertEqual(len(everything), 50)
        self.assertEqual(self.search(limit=5), everything[:5])
        self.assertEqual(len(self.search(limit=1)), 1)
        self.assertEqual(self.search(limit=0), [])

    def test_sold_out_hidden(self) -> None:
        session, _ = self.session()
        self.ok(self.service.buy(session, flight_ids=["VP1-2026-12-02"]))
        self.ok(self.service.hold(session, ["VP1-2026-12-02"]))
        self.assertEqual(numbers(self.search(on=WEDNESDAY)), [("VP4",)])
        shown = self.search(on=WEDNESDAY, include_sold_out=True)
        self.assertEqual(numbers(shown), [("VP1", "VP8"), ("VP1", "VP3"), ("VP1", "VP5", "VP6"), ("VP4",)])
        self.assertEqual(shown[0].free_seats, (0, 180))
        # The answer is made a page of paths at a time: with a page of one,
        # three sold-out pages are passed over before VP4.
        paged = self.search(on=WEDNESDAY, limit=1)
        self.assertEqual(numbers(paged), [("VP4",)])
        self.assertIs(self.search(on=WEDNESDAY, limit=1), paged)
        self.assertEqual(numbers(self.search(on=WEDNESDAY, limit=2)), [("VP4",)])
        # Another day's VP1 is not affected.
        self.assertEqual(len(self.search(on=date(2026, 12, 3))), 4)
        # When the hold expires, its seat is free again.
        self.clock.advance(60)
        self.assertEqual(
            [i.free_seats for i in self.search(on=WEDNESDAY)], [(1, 180), (1, 180), (1, 180, 180), (180,)]
        )

    def test_answer_made_once(self) -> None:
        """
        Asked again with the same free seats on its flights, a search gives
        the answer it made before; once a seat on one of them is sold, a new
        one.
        """
        first = self.search(on=WEDNESDAY)
        self.assertIs(self.search(on=WEDNESDAY), first)
        self.assertIsNot(self.search(on=WEDNESDAY, limit=2), first)
        session, _ = self.session()
        self.ok(self.service.buy(session, flight_ids=["VP4-2026-12-02"]))
        again = self.search(on=WEDNESDAY)
        self.assertIsNot(again, first)
        self.assertEqual([i.free_seats for i in again][-1], (first[-1].free_seats[0] - 1,))
        self.assertIs(self.search(on=WEDNESDAY), again)
        # Only answers of up to SEARCH_LIMIT itineraries are kept.
        self.assertIsNot(self.search(limit=500), self.search(limit=500))

    def test_departed_not_listed(self) -> None:
        today = date(2026, 12, 1)
        self.assertEqual(numbers(self.search(on=today)), [("VP1", "VP8"), ("VP1", "VP3"), ("VP1", "VP5", "VP6"), ("VP4",)])
        # VP1 leaves Salvador at 08:00 local, 11:00 UTC.
        self.clock.advance(2 * HOUR)
        self.assertEqual(numbers(self.search(on=today)), [("VP4",)])

    def test_hold_too_short_connection(self) -> None:
        session, _ = self.session()
        self.refused(self.service.hold(session, ["VP1-2026-12-02", "VP2-2026-12-02"]), InvalidItinerary)
        self.ok(self.service.hold(session, ["VP1-2026-12-02", "VP3-2026-12-02"]))

    def test_unknown_airport(self) -> None:
        for origin, destination in (("XXX", "MAO"), ("SSA", "GRU"), ("ssa", "MAO")):
            bad = destination if origin == "SSA" else origin
            error = self.refused(self.service.search(origin, destination), UnknownAirport)
            self.assertEqual(error.details, {"airport": bad})

    def test_same_airport(self) -> None:
        self.assertEqual(self.search("SSA", "SSA"), [])

    def test_routes(self) -> None:
        self.assertEqual(
            self.service.routes,
            (
                ("FOR", "MAO"),
                ("MAO", "REC"),
                ("REC", "FOR"),
                ("REC", "MAO"),
                ("SSA", "MAO"),
                ("SSA", "REC"),
            ),
        )


def ids(itinerary: Itinerary) -> tuple[str, ...]:
    return tuple(leg.flight_id for leg in itinerary.legs)


class SearchOrderTests(ServiceTestMixin, SynchronousTestCase):
    """
    A search in another order (price, duration), a page at a time
    (C{offset}), saying when it was cut (C{next_offset}) and what the sales
    window is.
    """

    def setUp(self) -> None:
        self.use(build(lambda: parse(json.loads(json.dumps(HUB)))))

    def page(self, origin: str = "SSA", destination: str = "MAO", **kwargs: Any) -> SearchPage:
        return self.ok(self.service.search_page(origin, destination, **kwargs))

    def test_by_price(self) -> None:
        """
        By price over the whole window, not the first page: the Saturday
        VP7 (R$ 180) through Recife, then SSA-REC-FOR-MAO (R$ 200) of every
        day; at the same price and departure, fewer legs first.
        """
        found = self.page(sort="price", limit=40).itineraries
        self.assertEqual(len(found), 40)
        self.assertEqual([i.price.cents for i in found], sorted(i.price.cents for i in found))
        self.assertEqual(numbers(found[:8]), [("VP7", "VP2"), ("VP7", "VP5", "VP6")] * 4)
        self.assertEqual([ids(i)[0] for i in found[:8:2]], [f"VP7-2026-12-{day}" for day in ("05", "12", "19", "26")])
        self.assertEqual(numbers(found[8:39]), [("VP1", "VP5", "VP6")] * 31)
        self.assertEqual([ids(i)[0] for i in found[8:39]], [f"VP1-2026-12-{day:02d}" for day in range(1, 32)])
        self.assertEqual(ids(found[39]), ("VP7-2026-12-05", "VP8-2026-12-05"))
        self.assertEqual(found[39].price, Money(48000, "BRL"))

    def test_by_duration(self) -> None:
        """
        By duration: the direct VP4 (3 h) of every day, by departure.
        """
        found = self.page(sort="duration", limit=32).itineraries
        self.assertEqual(numbers(found[:31]), [("VP4",)] * 31)
        self.assertEqual(ids(found[0]), ("VP4-2026-12-01",))
        self.assertEqual(ids(found[30]), ("VP4-2026-12-31",))
        # Next: the two-leg ones through Recife (VP1 then VP3 or VP8, the
        # same times): the same departure and legs, so by flight id.
        self.assertEqual(ids(found[31]), ("VP1-2026-12-01", "VP3-2026-12-01"))

    def test_departure_is_default(self) -> None:
        everything = self.page(limit=500).itineraries
        self.assertEqual(self.page(sort="departure", limit=500).itineraries, everything)
        self.assertEqual(numbers(everything[:4]), [("VP1", "VP8"), ("VP1", "VP3"), ("VP1", "VP5", "VP6"), ("VP4",)])

    def test_departed_left_out(self) -> None:
        """
        In any order, itineraries whose first flight has left are not listed.
        """
        self.clock.advance(2 * HOUR)  # VP1 of today has left, VP4 not yet
        for sort in ("price", "duration"):
            found = self.page(sort=sort, limit=500).itineraries
            self.assertTrue(all(i.legs[0].departs_ts > self.clock.seconds() for i in found))
            self.assertNotIn("VP1-2026-12-01", {leg.flight_id for i in found for leg in i.legs})
            self.assertIn(("VP4-2026-12-01",), [ids(i) for i in found])

    def test_cut_says_so(self) -> None:
        """
        C{next_offset} is where the next page starts when the answer was
        cut at its limit; C{None} when nothing more would be listed.
        """
        self.assertEqual(self.page().next_offset, 50)
        self.assertEqual(self.page(limit=500).next_offset, None)
        self.assertEqual(self.page(on=WEDNESDAY).next_offset, None)
        self.assertEqual(self.page(on=WEDNESDAY, limit=4).next_offset, None)
        self.assertEqual(self.page(on=WEDNESDAY, limit=3).next_offset, 3)
        self.assertEqual(self.page(on=WEDNESDAY, limit=1, offset=2).next_offset, 3)
        self.assertEqual(self.page(on=WEDNESDAY, sort="price", limit=3).next_offset, 3)

    def test_cut_not_claimed_for_sold_out(self) -> None:
        """
        Itineraries that would not be listed (sold out) do not make an
        answer cut.
        """
        session, _ = self.session()
        self.ok(self.service.buy(session, flight_ids=["VP1-2026-12-02"]))
        self.ok(self.service.buy(session, flight_ids=["VP1-2026-12-02"]))
        self.assertEqual(numbers(self.page(on=WEDNESDAY).itineraries), [("VP4",)])
        # The last one listed is the last candidate.
        self.assertEqual(self.page(on=WEDNESDAY, limit=1).next_offset, None)
        # By duration VP4 comes first; the sold-out ones after it were not
        # asked about (a page is offset + limit candidates), so there may be
        # more: the next page says there is not.
        self.assertEqual(self.page(on=WEDNESDAY, limit=1, sort="duration").next_offset, 1)
        after = self.page(on=WEDNESDAY, limit=1, sort="duration", offset=1)
        self.assertEqual((after.itineraries, after.next_offset), ([], None))
        self.assertEqual(self.page(on=WEDNESDAY, limit=1, include_sold_out=True).next_offset, 1)

    def test_offset(self) -> None:
        day = self.page(on=WEDNESDAY).itineraries
        self.assertEqual(self.page(on=WEDNESDAY, offset=1).itineraries, day[1:])
        self.assertEqual(self.page(on=WEDNESDAY, offset=2, limit=1).itineraries, day[2:3])
        self.assertEqual(self.page(on=WEDNESDAY, offset=4).itineraries, [])
        self.assertEqual(self.page(on=WEDNESDAY, offset=5000).itineraries, [])
        by_price = self.page(sort="price", limit=60).itineraries
        self.assertEqual(self.page(sort="price", offset=50, limit=10).itineraries, by_price[50:])

    def test_offset_counts_listed_itineraries(self) -> None:
        """
        C{offset} skips itineraries that would be listed: sold-out ones
        (not listed) do not count.
        """
        session, _ = self.session()
        for _ in range(2):
            self.ok(self.service.buy(session, flight_ids=["VP1-2026-12-02"]))
        self.assertEqual(numbers(self.page(on=WEDNESDAY, offset=0, limit=1).itineraries), [("VP4",)])
        self.assertEqual(self.page(on=WEDNESDAY, offset=1).itineraries, [])
        listed = self.page(on=WEDNESDAY, offset=1, include_sold_out=True).itineraries
        self.assertEqual(numbers(listed), [("VP1", "VP3"), ("VP1", "VP5", "VP6"), ("VP4",)])

    def test_bad_values(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"sort": "cheapest"}, "sort"),
            ({"sort": "Price"}, "sort"),
            ({"offset": -1}, "offset"),
            ({"offset": 5001}, "offset"),
        ]
        for kwargs, name in cases:
            error = self.refused(self.service.search_page("SSA", "MAO", **kwargs), InvalidRequest)
            self.assertEqual(error.details, {"field": name})
        error = self.refused(self.service.search("SSA", "MAO", sort="cheapest"), InvalidRequest)
        self.assertEqual(str(error), "Field 'sort' must be one of departure, price, duration.")

    def test_answers_kept_per_order_and_offset(self) -> None:
        """
        Each order and offset has its own answer, kept while the free seats
        stay the same.
        """
        answers = {
            (sort, offset): self.page(on=WEDNESDAY, sort=sort, offset=offset)
            for sort in ("departure", "price", "duration")
            for offset in (0, 1)
        }
        for (sort, offset), page in answers.items():
            self.assertIs(self.page(on=WEDNESDAY, sort=sort, offset=offset), page)
        self.assertEqual(numbers(answers["departure", 0].itineraries)[0], ("VP1", "VP8"))
        self.assertEqual(numbers(answers["price", 0].itineraries)[0], ("VP1", "VP5", "VP6"))
        self.assertEqual(numbers(answers["duration", 0].itineraries)[0], ("VP4",))
        self.assertEqual(answers["price", 1].itineraries, answers["price", 0].itineraries[1:])
        session, _ = self.session()
        self.ok(self.service.buy(session, flight_ids=["VP6-2026-12-02"]))
        again = self.page(on=WEDNESDAY, sort="price")
        self.assertIsNot(again, answers["price", 0])
        self.assertEqual(again.itineraries[0].free_seats, (2, 180, 179))

    def test_sales_window(self) -> None:
        """
        The first and last local days at the origin on which flights are
        sold: from today there to 30 days after today in UTC.
        """
        self.assertEqual(self.page().sales_window, (date(2026, 12, 1), date(2026, 12, 31)))
        self.assertEqual(self.page(on=date(2027, 2, 1)).sales_window, (date(2026, 12, 1), date(2026, 12, 31)))
        # 03:30 UTC on 2 December: 00:30 in Salvador, 23:30 on the 1st in Manaus.
        self.clock.advance(MIDNIGHT + 3.5 * HOUR - self.clock.seconds())
        self.assertEqual(self.page("SSA", "MAO").sales_window, (date(2026, 12, 2), date(2027, 1, 1)))
        self.assertEqual(self.page("MAO", "REC").sales_window, (date(2026, 12, 1), date(2027, 1, 1)))
        # The same search half an hour later, the same flights and seats: a
        # new day in Manaus.
        self.clock.advance(HOUR)
        self.assertEqual(self.page("MAO", "REC").sales_window, (date(2026, 12, 2), date(2027, 1, 1)))

    @given(
        sort=st.sampled_from(SORTS),
        size=st.integers(min_value=1, max_value=60),
        max_legs=st.sampled_from([None, 1, 2, 3]),
        include_sold_out=st.booleans(),
        later=st.floats(min_value=0, max_value=3 * DAY),
    )
    @settings(max_examples=40)
    def test_pages_make_the_whole(
        self, sort: str, size: int, max_legs: int | None, include_sold_out: bool, later: float
    ) -> None:
        """
        Paging with C{offset} over all the pages lists the same itineraries,
        in the same order, as one big page; by price, prices never go down.
        """
        # A service of its own for each example, with VP1 of 3 December
        # sold out.
        self.use(build(lambda: parse(json.loads(json.dumps(HUB)))))
        self.addCleanup(self.service.stopService)
        session, _ = self.session()
        for _ in range(2):
            self.ok(self.service.buy(session, flight_ids=["VP1-2026-12-03"]))
        self.clock.advance(later)
        whole = self.page(sort=sort, limit=500, max_legs=max_legs, include_sold_out=include_sold_out)
        self.assertIsNone(whole.next_offset)
        paged: list[Itinerary] = []
        offset: int | None = 0
        for _ in range(len(whole.itineraries) + 1):
            if offset is None:
                break
            page = self.page(
                sort=sort, limit=size, offset=offset, max_legs=max_legs, include_sold_out=include_sold_out
            )
            self.assertLessEqual(len(page.itineraries), size)
            paged += page.itineraries
            offset = page.next_offset
        self.assertIsNone(offset)
        self.assertEqual([ids(i) for i in paged], [ids(i) for i in whole.itineraries])
        if sort == "price":
            prices = [i.price.cents for i in paged]
            self.assertEqual(prices, sorted(prices))
        keys = [(i.legs[0].departs_ts, len(i.legs), ids(i)) for i in paged]
        self.assertEqual(len(set(keys)), len(keys))


