"""
What only the PostgreSQL store does: several servers on one database, the
database's clock judging expiry, expiries announced to every server, and
schema creation by whichever server starts first.

These tests use the database's real clock (no injected L{Clock} in the
store), so their flights are the day after tomorrow in real time, and the
few that wait for a hold to expire use holds of one second.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, TestCase

from tests import pg
from tests.common import ALICE, BOB, FAST_HASHER, MINI
from vendepass.errors import AlreadyCancelled, HoldNotFound, SeatUnavailable, StorageUnavailable
from vendepass.fixtures import load
from vendepass.model import Network
from vendepass.schedule import flight_by_id
from vendepass.service import ReservationService, Session
from vendepass.store import InlineExecutor, LegRequest, ThreadExecutor
from vendepass.store import postgres
from vendepass.store.postgres import PostgresStore, prepare

MINUTES = 60.0


def _day_after_tomorrow() -> str:
    return (datetime.now(timezone.utc).date() + timedelta(days=2)).isoformat()


def _db_now(url: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        return float(conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()[0])  # type: ignore[index]


class Server:
    """
    One VendePass server's service and store on the shared database, with
    its own clock (which may be wrong).
    """

    def __init__(self, case: TestCase, url: str, skew: float, hold_seconds: float = 60) -> None:
        self.clock = Clock()
        self.clock.advance(time.time() + skew)
        self.store = PostgresStore.open(
            url, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash, reactor=reactor  # type: ignore[arg-type]
        )
        self.service = ReservationService(
            self.store, self.clock, FAST_HASHER, InlineExecutor(), hold_seconds=hold_seconds
        )
        self.service.startService()
        case.addCleanup(self.service.stopService)

    def session(self, user: tuple[str, str]) -> tuple[Session, list[tuple[str, dict[str, Any]]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        session = self.service.open_session(lambda name, data: events.append((name, data)))
        self.service.login(session, *user)
        return session, events


def _result(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has fired (the stores run inline).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


class DatabaseClockTests(TestCase):
    """
    Hold expiry is judged by the database's clock, whatever a server's own
    clock says: a server whose clock is minutes off can neither take a seat
    that is still held nor make a hold last longer.
    """

    def setUp(self) -> None:
        self.url = pg.fresh_url(self)
        self.flight = f"VP200-{_day_after_tomorrow()}"

    def test_fast_clock_cannot_steal(self) -> None:
        """
        A server whose clock is 10 minutes ahead sees a 60-second hold made
        on another server as held, cannot take its seat, and its sweep and
        its expiry check leave it alone.
        """
        right = Server(self, self.url, skew=0)
        fast = Server(self, self.url, skew=10 * MINUTES)
        alice, _ = right.session(ALICE)
        bob, _ = fast.session(BOB)
        hold = _result(right.service.hold(alice, [self.flight], ["1A"]))
        self.assertRaises(SeatUnavailable, _result, fast.service.hold(bob, [self.flight], ["1A"]))
        self.assertRaises(SeatUnavailable, _result, fast.service.buy(bob, flight_ids=[self.flight], seats=["1A"]))
        self.assertEqual(_result(fast.store.expired_holds()), [])
        self.assertEqual(_result(fast.store.expire_hold(hold.hold_id)), "active")
        states = _result(fast.store.seats(flight_by_id(fast.store.network(), self.flight)))
        self.assertEqual(states[0].status, "held")

    def test_skewed_clock_cannot_extend(self) -> None:
        """
        A hold made through a server whose clock is 10 minutes ahead (or
        behind) lasts its 60 seconds of database time, not of that server's
        time.
        """
        for skew in (10 * MINUTES, -10 * MINUTES):
            server = Server(self, self.url, skew=skew)
            bob, _ = server.session(BOB)
            before = _db_now(self.url)
            hold = _result(server.service.hold(bob, [self.flight], ["2C" if skew > 0 else "2D"]))
            after = _db_now(self.url)
            self.assertTrue(before + 60 <= hold.expires_at <= after + 60, (before, hold.expires_at, after))

    @inlineCallbacks
    def test_expires_by_database_clock_and_owner_hears(self) -> Any:
        """
        A one-second hold made through a server whose clock is 10 minutes
        behind is over one second later: another server takes the seat, and
        the owner's connection on the slow server gets its C{hold_expired}
        event, announced by the server that noticed.
        """
        slow = Server(self, self.url, skew=-10 * MINUTES, hold_seconds=1)
        right = Server(self, self.url, skew=0)
        alice, alice_events = slow.session(ALICE)
        bob, _ = right.session(BOB)
        hold = _result(slow.service.hold(alice, [self.flight], ["3D"]))
        yield deferLater(reactor, 1.2, lambda: None)  # type: ignore[arg-type]
        # The slow server's clock has not moved at all, yet the hold is over.
        ticket = _result(right.service.buy(bob, flight_ids=[self.flight], seats=["3D"]))
        self.assertEqual(ticket.legs[0].seat, "3D")
        for _ in range(100):
            if alice_events:
                break
            yield deferLater(reactor, 0.02, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(alice_events, [("hold_expired", {"hold_id": hold.hold_id})])


class SweepTests(TestCase):
    """
    Every server sweeps; two sweeps at once share the expired holds.
    """

    def setUp(self) -> None:
        self.url = pg.fresh_url(self)
        self.clock = Clock()
        self.clock.advance(time.time())

    def _store(self) -> PostgresStore:
        store = PostgresStore.open(self.url, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash, clock=self.clock)
        self.addCleanup(store.stop)
        return store

    def test_concurrent_sweeps_end_each_hold_once(self) -> None:
        """
        Two servers sweeping at the same moment end each expired hold once
        between them (the second skips the holds the first has locked).
        """
        first, second = self._store(), self._store()
        network = first.network()
        flight = flight_by_id(network, f"VP200-{_day_after_tomorrow()}")
        for n in range(20):
            _result(first.add_user(f"user{n}", "x"))
        held = [
            _result(first.hold(f"user{n}", "S1", [LegRequest(flight, f"{n + 1}A")], 30, lambda: True)).hold_id
            for n in range(20)
        ]
        self.clock.advance(31)
        results: list[list[tuple[str, str]]] = [[], []]

        def sweep(i: int, store: PostgresStore) -> None:
            results[i] = _result(store.expired_holds())

        threads = [threading.Thread(target=sweep, args=(i, s)) for i, s in enumerate((first, second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        ended = [hold_id for result in results for hold_id, _ in result]
        self.assertEqual(sorted(ended), sorted(held))
        with psycopg.connect(self.url, autocommit=True) as conn:
            expiries = conn.execute("SELECT COUNT(*) FROM audit WHERE action = 'expire'").fetchone()[0]  # type: ignore[index]
        self.assertEqual(expiries, 20)


class SchemaTests(TestCase):
    """
    The first server to start creates the schema; the others wait for it.
    """

    def test_servers_starting_at_once(self) -> None:
        """
        Four servers opening a new database at the same moment: one creates
        and loads it, none fails, and all read the same airline.
        """
        url = pg.fresh_url(self)
        networks: list[Network] = []
        errors: list[BaseException] = []

        def open_one() -> None:
            try:
                store = PostgresStore.open(url, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
                networks.append(store.network())
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=open_one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        self.assertEqual(errors, [])
        self.assertEqual(len(networks), 4)
        self.assertTrue(all(n == networks[0] for n in networks))
        with psycopg.connect(url, autocommit=True) as conn:
            users = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]  # type: ignore[index]
        self.assertEqual(users, 2)

    def test_newer_schema_refused(self) -> None:
        """
        A database written by a newer VendePass is not touched.
        """
        url = pg.fresh_url(self)
        prepare(url, lambda: load(MINI), FAST_HASHER.hash)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE vendepass_schema SET version = version + 1")
        self.assertRaises(RuntimeError, prepare, url, lambda: load(MINI), FAST_HASHER.hash)


class UnavailableTests(TestCase):
    """
    A database that cannot be reached is a refusal, not a crash.
    """

    def test_unreachable(self) -> Deferred[Any]:
        url = pg.fresh_url(self)
        clock: IReactorTime = Clock()
        store = PostgresStore.open(url, ThreadExecutor(reactor), lambda: load(MINI), FAST_HASHER.hash,  # type: ignore[arg-type]
                                   clock=clock)
        store.url = "postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=2"
        store.start()
        self.addCleanup(store.stop)
        return self.assertFailure(store.password_hash("alice"), StorageUnavailable)


class AdminTests(TestCase):
    def test_password_not_shown(self) -> None:
        """
        When the database cannot be read, C{vendepass-admin} says so without
        the password in the URL.
        """
        import io

        from vendepass.admin import main

        out = io.StringIO()
        code = main(["verify", "--db", "postgresql://vp:s3cret@127.0.0.1:1/vendepass"], out)
        self.assertEqual(code, 2)
        self.assertIn("postgresql://vp:***@127.0.0.1:1/vendepass", out.getvalue())
        self.assertNotIn("s3cret", out.getvalue())

    def test_audit_cannot_be_truncated(self) -> None:
        """
        The audit log is append-only: no UPDATE, DELETE or TRUNCATE.
        """
        url = pg.fresh_url(self)
        prepare(url, lambda: load(MINI), FAST_HASHER.hash)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO audit (at, username, action, seats) VALUES (0, 'alice', 'hold', '[]')"
            )
            for statement in ("UPDATE audit SET at = 1", "DELETE FROM audit", "TRUNCATE audit"):
                self.assertRaises(psycopg.errors.RaiseException, conn.execute, statement)
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0], 1)  # type: ignore[index]


class RetryTests(TestCase):
    """
    A transaction that loses a race is tried again from the start; one that
    keeps losing is refused with C{storage_unavailable}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.store = PostgresStore.open(
            pg.fresh_url(self), InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash, clock=self.clock
        )
        self.addCleanup(self.store.stop)
        self.flight = flight_by_id(self.store.network(), f"VP200-{_day_after_tomorrow()}")

    def hold(self, seat: str) -> Deferred[Any]:
        return self.store.hold("alice", "S1", [LegRequest(self.flight, seat)], 60, lambda: True)

    def test_unique_violation_retried(self) -> None:
        """
        A hold id that clashes with an existing one (a unique violation)
        makes the transaction start again, with a fresh id; nothing of the
        failed attempt remains.
        """
        first = _result(self.hold("1A"))
        # The function puts the minute (the same: the clock stands still)
        # before the random part it is given.
        codes = iter([first.hold_id[7:]])
        real = postgres.hold_random
        self.patch(postgres, "hold_random", lambda: next(codes, None) or real())
        second = _result(self.hold("1B"))
        self.assertNotEqual(second.hold_id, first.hold_id)
        self.assertEqual(self.store.retries, 1)
        with psycopg.connect(self.store.url, autocommit=True) as conn:
            audit = conn.execute("SELECT COUNT(*) FROM audit WHERE action = 'hold'").fetchone()[0]  # type: ignore[index]
        self.assertEqual(audit, 2)

    def test_serialization_failure_retried_then_refused(self) -> None:
        """
        A serialization failure is retried; after RETRIES of them the
        request is refused with C{storage_unavailable}, and nothing is held.
        """
        failures = [0]
        real = self.store._call

        def losing(cur: psycopg.Cursor[Any], sql: str, args: tuple[Any, ...]) -> dict[str, Any]:
            # The hold's one statement loses, instead of being sent.
            if sql == postgres.HOLD_CALL and failures[0] < limit[0]:
                failures[0] += 1
                raise psycopg.errors.SerializationFailure("could not serialize access")
            return real(cur, sql, args)

        limit = [2]
        self.patch(self.store, "_call", losing)
        self.assertEqual(_result(self.hold("2A")).legs[0].seat, "2A")
        self.assertEqual((failures[0], self.store.retries), (2, 2))
        limit[0] = 10**6
        self.assertRaises(StorageUnavailable, _result, self.hold("2B"))
        self.assertEqual(failures[0], 2 + postgres.RETRIES + 1)
        states = {s.seat: s.status for s in _result(self.store.seats(self.flight))}
        self.assertEqual((states["2A"], states["2B"]), ("held", "free"))


class RoundTripTests(TestCase):
    """
    How many times one request waits for the database: each C{execute} or
    C{executemany} of the store's cursors is a round trip (psycopg sends an
    C{executemany} as one pipeline).
    """

    def setUp(self) -> None:
        self.url = pg.fresh_url(self)
        self.calls = pg.count_round_trips(self)
        self.store = PostgresStore.open(self.url, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(self.store.stop)
        self.flight = flight_by_id(self.store.network(), f"VP200-{_day_after_tomorrow()}")
        # The connection's own set-up is not the request's.
        _result(self.store.seats(self.flight))

    def round_trips(self, call: Any) -> int:
        del self.calls[:]
        call()
        return len(self.calls)

    def test_one_step_buy(self) -> None:
        """
        A one-step purchase, picked or chosen seat, with or without a
        C{request_id}, and a refused one: one round trip each (before
        C{vendepass_buy}: 9, 12 and 5). A replay is two: the call, then
        reading the ticket it names (before: 5).
        """
        buy = self.store.buy
        self.assertEqual(self.round_trips(lambda: _result(buy("alice", [LegRequest(self.flight, None)]))), 1)
        self.assertEqual(self.round_trips(lambda: _result(buy("alice", [LegRequest(self.flight, "9C")], "r1"))), 1)
        self.assertEqual(
            self.round_trips(lambda: self.assertRaises(SeatUnavailable, _result, buy("bob", [LegRequest(self.flight, "9C")]))),
            1,
        )
        self.assertEqual(self.round_trips(lambda: _result(buy("alice", [LegRequest(self.flight, "9C")], "r1"))), 2)

    def test_changes_of_seat_state(self) -> None:
        """
        A hold, the purchase of a hold, a release and a cancellation, and
        their refusals: one round trip each (their function of migration
        4). A replay is one as well: the function reads what the request
        did (a hold, a ticket) itself.
        """
        store = self.store
        legs = [LegRequest(self.flight, "5A")]
        trips = self.round_trips

        def hold(user: str, legs: list[LegRequest], request_id: str | None = None) -> Any:
            return _result(store.hold(user, "S1", legs, 60, lambda: True, request_id))

        self.assertEqual(trips(lambda: hold("alice", legs)), 1)
        held = hold("alice", [LegRequest(self.flight, None)], "h1")
        self.assertEqual(trips(lambda: self.assertEqual(hold("alice", [LegRequest(self.flight, None)], "h1"), held)), 1)
        self.assertEqual(trips(lambda: self.assertRaises(SeatUnavailable, hold, "bob", legs)), 1)
        [first] = [h for h in _result(store.seats(self.flight)) if h.seat == "5A"]
        self.assertEqual(first.status, "held")
        ticket = _result(store.buy_hold(held.hold_id, "alice"))
        hold_id = hold("alice", [LegRequest(self.flight, "6A")]).hold_id
        self.assertEqual(trips(lambda: _result(store.buy_hold(hold_id, "alice", "b1"))), 1)
        self.assertEqual(trips(lambda: _result(store.buy_hold(hold_id, "alice", "b1"))), 1)
        self.assertEqual(trips(lambda: self.assertRaises(HoldNotFound, _result, store.buy_hold(hold_id, "alice"))), 1)
        hold_id = hold("alice", [LegRequest(self.flight, "7A")]).hold_id
        self.assertEqual(trips(lambda: _result(store.release(hold_id, "alice", "r1"))), 1)
        self.assertEqual(trips(lambda: _result(store.release(hold_id, "alice", "r1"))), 1)
        self.assertEqual(trips(lambda: self.assertRaises(HoldNotFound, _result, store.release(hold_id, "alice"))), 1)
        self.assertEqual(trips(lambda: _result(store.cancel(ticket.ticket_id, "alice", "c1"))), 1)
        self.assertEqual(trips(lambda: _result(store.cancel(ticket.ticket_id, "alice", "c1"))), 1)
        self.assertEqual(
            trips(lambda: self.assertRaises(AlreadyCancelled, _result, store.cancel(ticket.ticket_id, "alice"))), 1
        )

    def test_ending_holds(self) -> None:
        """
        Ending a closed connection's holds (C{release_session}), the
        expiry of one hold (C{expire_hold}) and the sweep
        (C{expired_holds}), whether they end holds or find none: one round
        trip each (their function of migration 6; before, through
        L{PostgresTx}: 11 to end a session's two holds, 3 when it had none;
        8 to expire a hold, 3 when it was ended already or is no hold; 15
        for a sweep that ended two, 5 for one that found none).
        """
        store = self.store
        trips = self.round_trips

        def hold(seat: str, session_id: str) -> str:
            return _result(store.hold("alice", session_id, [LegRequest(self.flight, seat)], 60, lambda: True)).hold_id

        first, second = hold("5A", "S1"), hold("5B", "S1")
        self.assertEqual(trips(lambda: self.assertEqual(_result(store.release_session("S1")), sorted([first, second]))), 1)
        self.assertEqual(trips(lambda: self.assertEqual(_result(store.release_session("S1")), [])), 1)
        expired = sorted([hold("6A", "S2"), hold("6B", "S2"), hold("6C", "S2")])
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("UPDATE holds SET expires_at = expires_at - 120 WHERE session_id = 'S2'")
        self.assertEqual(trips(lambda: self.assertEqual(_result(store.expire_hold(expired[0])), "expired")), 1)
        self.assertEqual(trips(lambda: self.assertEqual(_result(store.expire_hold(expired[0])), "expired")), 1)
        self.assertEqual(trips(lambda: self.assertIsNone(_result(store.expire_hold("H-none")))), 1)
        self.assertEqual(
            trips(lambda: self.assertEqual(_result(store.expired_holds()), [(h, "S2") for h in expired[1:]])), 1
        )
        self.assertEqual(trips(lambda: self.assertEqual(_result(store.expired_holds()), [])), 1)
        self.assertEqual([s for s in _result(store.seats(self.flight)) if s.status != "free"], [])

    def test_hold_without_descriptions(self) -> None:
        """
        A hold made without its flights' descriptions (by a server of
        schema version 3, which does not know the column) is bought all the
        same, in two round trips: the function asks for them, then buys.
        """
        hold = _result(self.store.hold("alice", "S1", [LegRequest(self.flight, "3C")], 60, lambda: True))
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("UPDATE hold_legs SET flight = NULL")
        tickets: list[Any] = []
        self.assertEqual(self.round_trips(lambda: tickets.append(_result(self.store.buy_hold(hold.hold_id, "alice")))), 2)
        [ticket] = tickets
        self.assertEqual(_result(self.store.tickets("alice")), [ticket])
        self.assertEqual((ticket.legs[0].seat, ticket.legs[0].departure), ("3C", self.flight.departure_iso))


class ManyFilesTests(TestCase):
    """
    A server with a thousand customers connected opens its database
    connections on descriptors above 1,023, where C{select()} cannot look:
    the store must still use them (it once refused every purchase there
    with an internal error).
    """

    def test_connection_on_a_high_descriptor(self) -> None:
        import os
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1200:
            raise SkipTest(f"the open-file limit ({hard}) is too low to open descriptors above 1,023")
        if soft != resource.RLIM_INFINITY and soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1200 if hard == resource.RLIM_INFINITY else min(hard, 1200), hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        url = pg.fresh_url(self)
        store = PostgresStore.open(url, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(store.stop)
        # Fill every free descriptor up to 1,030, so that the store's
        # connection (made at its first transaction) gets a higher one.
        filler = [os.open(os.devnull, os.O_RDONLY)]
        while filler[-1] < 1030:
            filler.append(os.dup(filler[0]))

        def close_filler() -> None:
            for fd in filler:
                os.close(fd)

        self.addCleanup(close_filler)
        flight = flight_by_id(store.network(), f"VP200-{_day_after_tomorrow()}")
        ticket = _result(store.buy("alice", [LegRequest(flight, None)]))
        self.assertEqual(ticket.status, "active")
        self.assertGreater(max(c.pgconn.socket for c in store._connections), 1023)
