"""
Group commit in the SQLite store: writes that queue up while a transaction
is in flight share the next one, and none
is answered before the transaction that holds it is on disk.
"""

from __future__ import annotations

import shutil
import sqlite3
import struct
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.common import BIG, FAST_HASHER, MINI, START, TINY, QueueExecutor
from tests.test_storage_faults import FaultyConnection
from tests.test_store import SQLiteMemoryStoreTests
from vendepass.admin import verify
from vendepass.errors import HoldExpired, HoldNotFound, SeatUnavailable, StorageUnavailable, TooManyHolds
from vendepass.fixtures import load
from vendepass.model import Ticket
from vendepass.schedule import flight_by_id
from vendepass.store import IExecutor, IStore, InlineExecutor, LegRequest
from vendepass.store import sqlite as sqlite_store
from vendepass.store.sqlite import CHECKPOINT_INTERVAL, SQLiteStore

T = TypeVar("T")


class SQLiteGroupCommitStoreTests(SQLiteMemoryStoreTests):
    """
    The whole store contract again, with group commit switched on.
    """

    def make_store(self, clock: Clock) -> IStore:
        store = SQLiteStore.open(
            ":memory:", clock, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash, max_batch=16
        )
        store.start()
        self.addCleanup(store.stop)
        return store


class GroupCommitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.executor = QueueExecutor()
        self.store = SQLiteStore.open(
            ":memory:", self.clock, self.executor, lambda: load(MINI), FAST_HASHER.hash, max_batch=4
        )
        self.addCleanup(self.store.stop)
        self.store._db.executemany(
            "INSERT OR IGNORE INTO users (username, password_hash, created_at) VALUES (?, 'x', 0)",
            [(name,) for name in ("alice", "bob", "carol", "dave", "erin")],
        )
        network = self.store.network()
        self.tiny = flight_by_id(network, TINY)
        self.big = flight_by_id(network, BIG)

    def buy(self, username: str, *legs: tuple[Any, str | None]) -> Deferred[Ticket]:
        return self.store.buy(username, [LegRequest(flight, seat) for flight, seat in legs])

    def tickets_in_db(self) -> int:
        return int(self.store._db.execute("SELECT COUNT(*) FROM tickets").fetchone()[0])

    def test_queued_writes_share_one_transaction(self) -> None:
        """
        While the first write is in flight, the next ones queue; they then
        run together in one transaction, and none is answered before it
        commits.
        """
        first = self.buy("alice", (self.big, None))
        queued = [self.buy("bob", (self.big, None)) for _ in range(3)]
        self.assertEqual(len(self.executor.jobs), 1)
        self.executor.run_next()
        self.successResultOf(first)
        self.assertEqual(len(self.executor.jobs), 1, "the queued writes go as one job")
        self.assertEqual([d.called for d in queued], [False] * 3)
        self.assertEqual(self.tickets_in_db(), 1)
        self.executor.run_next()
        seats = [self.successResultOf(d).legs[0].seat for d in queued]
        self.assertEqual(len(set(seats)), 3)
        self.assertEqual((self.store.batches, self.store.batched_writes), (2, 4))
        self.assertEqual(self.tickets_in_db(), 4)
        self.assertEqual(self.executor.jobs, [])

    def test_batches_are_bounded(self) -> None:
        first = self.buy("alice", (self.big, None))
        rest = [self.buy("bob", (self.big, None)) for _ in range(6)]
        while self.executor.jobs:
            self.executor.run_next()
        self.successResultOf(first)
        for d in rest:
            self.successResultOf(d)
        # 1, then 4 (max_batch), then 2.
        self.assertEqual((self.store.batches, self.store.batched_writes), (3, 7))

    def test_failed_write_rolls_back_alone(self) -> None:
        """
        A write that fails in a batch leaves no trace, even of the changes it
        made before failing; the writes around it commit.
        """
        self.buy("alice", (self.big, "1A"))
        before = self.buy("bob", (self.big, "2A"))
        # Claims 3A on BIG, then finds TINY 1A taken by "before"'s neighbour.
        self.buy("carol", (self.tiny, "1A"))
        clash = self.buy("dave", (self.big, "3A"), (self.tiny, "1A"))
        after = self.buy("erin", (self.big, "3A"))
        while self.executor.jobs:
            self.executor.run_next()
        self.successResultOf(before)
        self.failureResultOf(clash, SeatUnavailable)
        self.assertEqual(self.successResultOf(after).legs[0].seat, "3A")
        rows = self.store._db.execute(
            "SELECT t.username, l.flight_id, l.seat FROM tickets t JOIN ticket_legs l USING (ticket_id)"
            " ORDER BY t.rowid, l.leg"
        ).fetchall()
        self.assertEqual(
            rows,
            [("alice", BIG, "1A"), ("bob", BIG, "2A"), ("carol", TINY, "1A"), ("erin", BIG, "3A")],
        )
        self.assertFalse(self.store._db.in_transaction)

    def test_refusal_that_commits(self) -> None:
        """
        A buy of an expired hold ends the hold (that part commits) and is
        refused; the other writes of its batch are not disturbed.
        """
        hold_d = self.store.hold("alice", "S1", [LegRequest(self.big, "5C")], 30, lambda: True)
        self.executor.run_next()
        hold = self.successResultOf(hold_d)
        self.clock.advance(31)
        self.buy("bob", (self.big, None))
        late = self.store.buy_hold(hold.hold_id, "alice")
        other = self.buy("carol", (self.big, "5C"))
        while self.executor.jobs:
            self.executor.run_next()
        self.failureResultOf(late, HoldExpired)
        self.assertEqual(self.successResultOf(other).legs[0].seat, "5C")
        state = self.store._db.execute("SELECT state FROM holds WHERE hold_id = ?", (hold.hold_id,)).fetchone()
        self.assertEqual(state, ("expired",))

    def test_commit_fails(self) -> None:
        """
        If the batch's COMMIT fails, every write in it fails with
        storage_unavailable and none of them is in the database; the store
        then carries on.
        """
        self.buy("alice", (self.big, None))
        queued = [self.buy("bob", (self.big, None)) for _ in range(3)]
        self.executor.run_next()
        real = self.store._db
        faulty = FaultyConnection(real)
        self.store._db = faulty  # type: ignore[assignment]
        # The batch of 3: BEGIN, then each write's statements...
        # fail the very last call, the COMMIT.
        calls: list[str] = []
        execute = faulty.execute

        def spy(sql: str, parameters: Any = ()) -> sqlite3.Cursor:
            calls.append(sql)
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return execute(sql, parameters)

        faulty.execute = spy  # type: ignore[method-assign]
        self.executor.run_next()
        for d in queued:
            self.failureResultOf(d, StorageUnavailable)
        self.assertEqual(calls.count("COMMIT"), 1)
        self.store._db = real
        self.assertEqual(self.tickets_in_db(), 1)
        self.assertFalse(real.in_transaction)
        again = self.buy("bob", (self.big, None))
        self.executor.run_next()
        # The seats the failed batch picked are free again for the writer
        # too: the next purchase gets the first of them.
        self.assertEqual(self.successResultOf(again).legs[0].seat, "1B")
        self.assertEqual(self.tickets_in_db(), 2)
        self.assertSeatsInMemory(self.store)

    def test_every_failure_point(self) -> None:
        """
        A disk error at any call of a batch of three purchases fails the
        whole batch (nothing half-done is committed, nothing is answered as
        done) or, if it struck after the commit, none at all.
        """
        for fail_at in range(1, 60):
            store = SQLiteStore.open(
                ":memory:", self.clock, self.executor, lambda: load(MINI), FAST_HASHER.hash, max_batch=4
            )
            real = store._db
            real.execute("INSERT OR IGNORE INTO users (username, password_hash, created_at) VALUES ('bob', 'x', 0)")
            first = store.buy("alice", [LegRequest(self.big, None)])
            rest = [store.buy("bob", [LegRequest(self.big, None)]) for _ in range(3)]
            store._db = real
            self.executor.run_next()
            self.successResultOf(first)
            store._db = FaultyConnection(real, fail_at)  # type: ignore[assignment]
            self.executor.run_next()
            outcomes: list[Any] = [d.result for d in rest]
            for d in rest:
                d.addErrback(lambda f: None)
            failed = [isinstance(o, Failure) for o in outcomes]
            sold = real.execute("SELECT COUNT(*) FROM tickets").fetchone()[0]
            if any(failed):
                self.assertEqual(failed, [True] * 3, f"fail_at={fail_at}")
                for o in outcomes:
                    self.assertIsInstance(o.value, StorageUnavailable)
                self.assertEqual(sold, 1, f"fail_at={fail_at}")
            else:
                self.assertEqual(sold, 4, f"fail_at={fail_at}")
            self.assertFalse(real.in_transaction)
            store._db = real
            # The free seat counts in memory are those of what committed.
            self.assertEqual(self.successResultOf(store.free_seats([self.big])), {BIG: 180 - sold})
            # And so are the writer's seats: the next purchase gets the
            # first free seat.
            after = store.buy("bob", [LegRequest(self.big, None)])
            self.executor.run_next()
            self.assertEqual(self.successResultOf(after).legs[0].seat, self.big.aircraft.seats()[sold], fail_at)
            self.assertSeatsInMemory(store)
            store.stop()

    # -- the writer's seats in memory (vendepass.store.memory) -------------

    def assertSeatsInMemory(self, store: SQLiteStore) -> None:
        """
        The writer's copy of the seats of every flight it knows is the
        database's.
        """
        db = store._db
        self.assertFalse(db.in_transaction)
        self.assertEqual(store._seats.snapshot(), store._seats.read_back(db.execute))

    def test_seats_in_memory_roll_back_with_a_failed_write(self) -> None:
        """
        A write that fails after taking a seat is rolled back, and so is
        the writer's copy of that seat: the batch runs again without it and
        its neighbours get the seats they would have had without it.
        """
        # In flight while the next three queue: they share the next batch.
        self.buy("alice", (self.big, "9A"))
        first = self.buy("alice", (self.big, None))

        def fails(tx: Any) -> None:
            tx.execute("INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)"
                       " VALUES ('BROKEN01', 'bob', 'active', 1, 'BRL', 0)")
            tx.execute("INSERT INTO seats (flight_id, seat, ticket_id) VALUES (?, '1B', 'BROKEN01')", (BIG,))
            raise RuntimeError("a bug after a write")

        broken = self.store._write(fails)
        second = self.buy("carol", (self.big, None))
        self.executor.run_next()
        self.executor.run_next()
        self.assertEqual(self.store.batches, 2)
        self.failureResultOf(broken, RuntimeError)
        self.assertEqual([self.successResultOf(d).legs[0].seat for d in (first, second)], ["1A", "1B"])
        self.assertSeatsInMemory(self.store)

    def test_seats_in_memory_follow_every_change(self) -> None:
        """
        Holds, their purchase, release, expiry and cancellation all change
        the writer's copy as they change the file; a hold whose time is up
        counts as free (and is ended) when a claim on its flight comes.
        """
        ended: list[str] = []
        self.store.watch_expiries(lambda hold_id, session_id: ended.append(hold_id))

        def run(d: Deferred[T]) -> T:
            while self.executor.jobs:
                self.executor.run_next()
            return self.successResultOf(d)

        short = run(self.store.hold("alice", "S1", [LegRequest(self.big, None)], 30, lambda: True))
        self.assertEqual(short.legs[0].seat, "1A")
        kept = run(self.store.hold("bob", "S2", [LegRequest(self.big, None), LegRequest(self.tiny, None)], 300,
                                   lambda: True))
        self.assertEqual([leg.seat for leg in kept.legs], ["1B", "1A"])
        refused = self.buy("carol", (self.big, "1A"))
        while self.executor.jobs:
            self.executor.run_next()
        self.assertIn("held until", str(self.failureResultOf(refused, SeatUnavailable).value))
        self.assertSeatsInMemory(self.store)
        self.clock.advance(31)
        # 1A's hold is up: it is ended, and 1A is the first free seat.
        self.assertEqual(run(self.buy("carol", (self.big, None))).legs[0].seat, "1A")
        self.assertEqual(ended, [short.hold_id])
        bought = run(self.store.buy_hold(kept.hold_id, "bob"))
        self.assertSeatsInMemory(self.store)
        self.clock.advance(600)
        # Bought, not held: no longer ends with time.
        self.assertEqual(run(self.buy("dave", (self.big, None))).legs[0].seat, "1C")
        run(self.store.cancel(bought.ticket_id, "bob"))
        self.assertSeatsInMemory(self.store)
        self.assertEqual(run(self.buy("dave", (self.big, None))).legs[0].seat, "1B")
        self.assertEqual(run(self.buy("dave", (self.tiny, None))).legs[0].seat, "1A")
        released = run(self.store.hold("erin", "S3", [LegRequest(self.tiny, None)], 300, lambda: True))
        self.assertEqual(released.legs[0].seat, "1B")
        run(self.store.release(released.hold_id, "erin"))
        self.assertEqual(run(self.buy("erin", (self.tiny, None))).legs[0].seat, "1B")
        self.assertSeatsInMemory(self.store)

    def test_seats_in_memory_read_back_after_a_restart(self) -> None:
        """
        A store opened on a file knows the seats the file has: sold seats
        stay taken, the holds of the run before are gone.
        """
        path = self.mktemp()

        def open_store() -> SQLiteStore:
            return SQLiteStore.open(path, self.clock, self.executor, lambda: load(MINI), FAST_HASHER.hash, max_batch=4)

        def run(store: SQLiteStore, d: Deferred[T]) -> T:
            while self.executor.jobs:
                self.executor.run_next()
            return self.successResultOf(d)

        store = open_store()
        for _ in range(2):
            run(store, store.buy("alice", [LegRequest(self.big, None)]))
        run(store, store.hold("bob", "S1", [LegRequest(self.big, None)], 300, lambda: True))
        store.stop()
        store = open_store()
        self.addCleanup(store.stop)
        self.assertEqual(run(store, store.buy("bob", [LegRequest(self.big, None)])).legs[0].seat, "1C")
        self.assertEqual(run(store, store.buy("bob", [LegRequest(self.big, None)])).legs[0].seat, "1D")
        sold = store.buy("bob", [LegRequest(self.big, "1A")])
        while self.executor.jobs:
            self.executor.run_next()
        self.assertIn("is sold", str(self.failureResultOf(sold, SeatUnavailable).value))
        self.assertSeatsInMemory(store)

    # -- rows inserted together (Tx.append) --------------------------------

    def queue_behind_one(self, *writes: Callable[[], Deferred[Any]]) -> list[Deferred[Any]]:
        """
        Start C{writes} behind a purchase in flight, so that they share
        the next batch; run both batches.
        """
        self.buy("alice", (self.big, "30A"))
        started = [write() for write in writes]
        while self.executor.jobs:
            self.executor.run_next()
        return started

    def test_batch_inserts_its_rows_together(self) -> None:
        """
        The tickets, holds, seats, audit rows, tickets' and holds' legs of a
        batch's purchases and holds are inserted by one multi-row statement
        each, before its COMMIT, tickets and holds first, in order.
        """
        calls: list[tuple[str, int]] = []
        real = self.store._db
        faulty = FaultyConnection(real)
        execute, executemany = faulty.execute, faulty.executemany

        def spy(sql: str, parameters: Any = ()) -> sqlite3.Cursor:
            if sql.startswith("INSERT INTO") and "temp." not in sql:
                # Rows given, less those padding the statement (NULL first).
                values = list(parameters)
                width = len(values) // (sql.count("), (") + 1)
                calls.append((sql.split("(")[0].strip(), sum(v is not None for v in values[::width])))
            return execute(sql, parameters)

        def spy_many(sql: str, parameters: Any) -> sqlite3.Cursor:
            rows = list(parameters)
            calls.append((sql.split("(")[0].strip() + " (many)", len(rows)))
            return executemany(sql, rows)

        faulty.execute = spy  # type: ignore[method-assign]
        faulty.executemany = spy_many  # type: ignore[method-assign]
        self.store._db = faulty  # type: ignore[assignment]
        *bought, hold = self.queue_behind_one(
            lambda: self.buy("bob", (self.big, None)),
            lambda: self.buy("carol", (self.big, None), (self.tiny, None)),
            lambda: self.store.hold("dave", "S1", [LegRequest(self.big, None)], 30, lambda: True),
        )
        self.store._db = real
        self.assertEqual(
            calls,
            # The purchase in flight,
            [("INSERT INTO tickets", 1), ("INSERT INTO seats", 1), ("INSERT INTO audit", 1),
             ("INSERT INTO ticket_legs", 1),
             # then the batch of three, dave's hold with the rest.
             ("INSERT INTO tickets", 2), ("INSERT INTO holds", 1), ("INSERT INTO seats", 4),
             ("INSERT INTO audit", 3), ("INSERT INTO ticket_legs", 3), ("INSERT INTO hold_legs", 1)],
        )
        self.successResultOf(hold)
        tickets = [self.successResultOf(d).ticket_id for d in bought]
        self.assertEqual(
            real.execute("SELECT action, ticket_id FROM audit ORDER BY seq").fetchall()[-3:],
            [("buy", tickets[0]), ("buy", tickets[1]), ("hold", None)],
        )
        self.assertEqual(verify(real).findings, [])

    def test_bulk_insert_sizes(self) -> None:
        """
        Up to 16 rows go in by one plain multi-row statement of exactly
        their number; more by statements of 64 or 256 rows, padded with rows
        of NULLs that are left out; in order.
        """
        from vendepass.store.sqlite import insert_rows

        db = sqlite3.connect(":memory:")
        db.execute("CREATE TABLE t (n INTEGER NOT NULL, word TEXT)")
        sizes: list[int] = []
        padded: list[bool] = []

        def execute(sql: str, values: list[Any]) -> sqlite3.Cursor:
            sizes.append(len(values) // 2)
            padded.append("IS NOT NULL" in sql)
            return db.execute(sql, values)

        for count in (1, 4, 16, 17, 256, 300):
            db.execute("DELETE FROM t")
            insert_rows(execute, "INSERT INTO t (n, word) VALUES (?, ?)", [(i, f"w{i}") for i in range(count)])
            self.assertEqual(db.execute("SELECT n, word FROM t ORDER BY rowid").fetchall(),
                             [(i, f"w{i}") for i in range(count)])
        self.assertEqual(sizes, [1, 4, 16, 64, 256, 256, 64])
        self.assertEqual(padded, [False, False, False, True, True, True, True])
        # A row that would be taken for padding is refused, not dropped,
        # whatever the statement's size.
        for count in (1, 17):
            rows: list[tuple[Any, ...]] = [(i, "w") for i in range(count - 1)] + [(None, "x")]
            self.assertRaises(ValueError, insert_rows, execute, "INSERT INTO t (n, word) VALUES (?, ?)", rows)

    def test_replay_in_the_same_batch_sees_the_legs(self) -> None:
        """
        A retry that reaches the same batch as its first attempt answers
        with the ticket the first one bought, legs and all.
        """
        first, retry = self.queue_behind_one(
            lambda: self.store.buy("bob", [LegRequest(self.big, None)], "k1"),
            lambda: self.store.buy("bob", [LegRequest(self.big, None)], "k1"),
        )
        ticket = self.successResultOf(first)
        self.assertEqual(self.successResultOf(retry), ticket)
        self.assertEqual(ticket.legs[0].seat, "1A")

    def test_failed_kept_row_fails_its_write_alone(self) -> None:
        """
        A row kept for the batch's insert that the database refuses makes
        the batch run again with each write inserting its own rows: only
        the write that appended it fails.
        """
        from vendepass.store.transactions import AUDIT_INSERT

        def bad_row(tx: Any) -> None:
            tx.append(AUDIT_INSERT, [(tx.now, "bob", "no such action", None, None, "[]")])

        before, broken, after = self.queue_behind_one(
            lambda: self.buy("bob", (self.big, None)),
            lambda: self.store._write(bad_row),
            lambda: self.buy("carol", (self.big, None)),
        )
        self.failureResultOf(broken, sqlite3.IntegrityError)
        self.assertEqual([self.successResultOf(d).legs[0].seat for d in (before, after)], ["1A", "1B"])
        self.assertEqual(verify(self.store._db).findings, [])
        self.assertSeatsInMemory(self.store)

    # -- kept rows read back in their batch (Tx.keep) ----------------------

    def hold(self, username: str, *flights: Any, request_id: str | None = None, session: str = "S1") -> Deferred[Any]:
        legs = [LegRequest(flight, None) for flight in flights]
        return self.store.hold(username, session, legs, 30, lambda: True, request_id)

    def test_next_hold_of_a_customer_counts_a_kept_hold(self) -> None:
        """
        A customer's second hold in the batch that keeps the first one's
        rows counts the first one's seats against the limit.
        """
        self.store.max_held_seats = 1
        first, second = self.queue_behind_one(lambda: self.hold("dave", self.big), lambda: self.hold("dave", self.tiny))
        self.successResultOf(first)
        self.assertEqual(self.failureResultOf(second, TooManyHolds).value.code, "too_many_holds")
        self.assertEqual(verify(self.store._db).findings, [])
        self.assertSeatsInMemory(self.store)

    def test_session_end_releases_a_kept_hold(self) -> None:
        """
        A session that ends in the batch that keeps its hold's rows releases
        that hold, and its seat is free again.
        """
        held, released = self.queue_behind_one(
            lambda: self.hold("dave", self.big, self.tiny), lambda: self.store.release_session("S1")
        )
        hold = self.successResultOf(held)
        self.assertEqual(self.successResultOf(released), [hold.hold_id])
        self.assertEqual(
            self.store._db.execute("SELECT state FROM holds WHERE hold_id = ?", (hold.hold_id,)).fetchone(), ("released",)
        )
        self.assertEqual(self.store._db.execute("SELECT COUNT(*) FROM seats WHERE hold_id IS NOT NULL").fetchone(), (0,))
        self.assertEqual(verify(self.store._db).findings, [])
        self.assertSeatsInMemory(self.store)

    def test_hold_retried_in_its_batch(self) -> None:
        """
        A hold's retry in the batch that keeps the first attempt's rows
        answers with that hold, legs and all, and holds nothing more.
        """
        first, retry = self.queue_behind_one(
            lambda: self.hold("dave", self.big, self.tiny, request_id="h1"),
            lambda: self.hold("dave", self.big, self.tiny, request_id="h1"),
        )
        self.assertEqual(self.successResultOf(retry), self.successResultOf(first))
        self.assertEqual(self.store._db.execute("SELECT COUNT(*) FROM holds").fetchone(), (1,))
        self.assertSeatsInMemory(self.store)

    def held(self, username: str, *flights: Any) -> Any:
        """
        A hold made in a batch of its own.
        """
        d = self.hold(username, *flights)
        self.executor.run_next()
        return self.successResultOf(d)

    def test_hold_bought_twice_in_a_batch(self) -> None:
        """
        Of two purchases of one hold in a batch (the first one's sale kept
        for the batch's end), the second finds it bought: one ticket, and a
        release after them in the batch finds no hold either.
        """
        hold = self.held("dave", self.big, self.tiny)
        first, second, release = self.queue_behind_one(
            lambda: self.store.buy_hold(hold.hold_id, "dave"),
            lambda: self.store.buy_hold(hold.hold_id, "dave"),
            lambda: self.store.release(hold.hold_id, "dave"),
        )
        ticket = self.successResultOf(first)
        self.assertEqual([leg.seat for leg in ticket.legs], [leg.seat for leg in hold.legs])
        self.failureResultOf(second, HoldNotFound)
        self.failureResultOf(release, HoldNotFound)
        self.assertEqual(
            self.store._db.execute("SELECT COUNT(*) FROM seats WHERE ticket_id = ?", (ticket.ticket_id,)).fetchone(), (2,)
        )
        self.assertEqual(verify(self.store._db).findings, [])
        self.assertSeatsInMemory(self.store)

    def test_hold_ended_then_bought_in_a_batch(self) -> None:
        """
        A hold that a write of the batch releases, or whose session ends,
        before its purchase in the same batch is not sold: the purchase
        does not answer from the hold as the batch first read it.
        """
        released = self.held("dave", self.big)
        ended = self.held("erin", self.tiny)
        release, buy, session, buy_ended = self.queue_behind_one(
            lambda: self.store.release(released.hold_id, "dave"),
            lambda: self.store.buy_hold(released.hold_id, "dave"),
            lambda: self.store.release_session("S1"),
            lambda: self.store.buy_hold(ended.hold_id, "erin"),
        )
        self.successResultOf(release)
        self.successResultOf(session)
        self.failureResultOf(buy, HoldNotFound)
        self.failureResultOf(buy_ended, HoldNotFound)
        self.assertEqual(self.store._db.execute("SELECT COUNT(*) FROM seats").fetchone(), (1,))
        self.assertEqual(verify(self.store._db).findings, [])
        self.assertSeatsInMemory(self.store)

    def test_held_seats_counted_after_changes_in_the_batch(self) -> None:
        """
        A customer's held seats, read for the batch when it began, are
        counted again after a write of the batch bought or released one of
        their holds, and a hold whose time is up counts for nothing.
        """
        self.store.max_held_seats = 1
        bought, released = self.held("dave", self.big), self.held("erin", self.big)
        # Its time is up, but no claim of its flight ends it before carol's
        # next hold counts it.
        short = self.store.hold("carol", "S2", [LegRequest(self.tiny, None)], 5, lambda: True)
        self.executor.run_next()
        self.successResultOf(short)
        self.clock.advance(10)
        # The first four share a batch, carol's hold is the next one's.
        writes = self.queue_behind_one(
            lambda: self.store.buy_hold(bought.hold_id, "dave"),
            lambda: self.hold("dave", self.big),
            lambda: self.store.release(released.hold_id, "erin"),
            lambda: self.hold("erin", self.big),
            lambda: self.hold("carol", self.big),
        )
        for d in writes:
            self.successResultOf(d)
        self.assertEqual(verify(self.store._db).findings, [])
        self.assertSeatsInMemory(self.store)

    def test_requests_read_ahead_in_chunks(self) -> None:
        """
        A batch's requests are read ahead by statements of up to 256 keys
        (padded with keys of NULLs, which match nothing): each found, or
        C{None}.
        """
        db = self.store._db
        db.executemany(
            "INSERT INTO requests (username, request_id, kind, outcome, created_at) VALUES ('bob', ?, 'buy', ?, 0)",
            [(f"r{i}", f"T{i}") for i in range(0, 300, 7)],
        )
        found = sqlite_store.read_requests(db.execute, [("bob", f"r{i}") for i in range(300)] + [("bob", "r7")])
        self.assertEqual(found, {("bob", f"r{i}"): ("buy", f"T{i}") if i % 7 == 0 else None for i in range(300)})

    def test_kept_sale_of_a_hold_checked(self) -> None:
        """
        A kept sale of a hold whose seat rows are not what the hold says
        (planted: one deleted behind the rules' back) is caught when the
        batch's sales are written: the batch runs again with each write on
        its own, and only that purchase fails; the hold keeps its seats.
        """
        hold = self.held("dave", self.big, self.tiny)
        self.store._db.execute("DELETE FROM seats WHERE hold_id = ? AND flight_id = ?", (hold.hold_id, TINY))
        before, bought, after = self.queue_behind_one(
            lambda: self.buy("bob", (self.big, None)),
            lambda: self.store.buy_hold(hold.hold_id, "dave"),
            lambda: self.buy("carol", (self.big, None)),
        )
        self.failureResultOf(bought, RuntimeError)
        self.successResultOf(before)
        self.successResultOf(after)
        self.assertEqual(
            self.store._db.execute("SELECT COUNT(*) FROM seats WHERE hold_id = ?", (hold.hold_id,)).fetchone(), (1,)
        )
        self.assertEqual(
            self.store._db.execute("SELECT state FROM holds WHERE hold_id = ?", (hold.hold_id,)).fetchone(), ("active",)
        )
        self.assertSeatsInMemory(self.store)

    def test_callbacks_join_the_next_batch_in_order(self) -> None:
        """
        Writes started by the callbacks of a batch's answers queue behind the
        writes already waiting: first come, first served.
        """
        order: list[str] = []

        def then(ticket: Ticket) -> None:
            order.append("first answered")
            self.buy("carol", (self.big, None)).addCallback(lambda t: order.append("carol"))

        self.buy("alice", (self.big, None)).addCallback(then)
        self.buy("bob", (self.big, None)).addCallback(lambda t: order.append("bob"))
        while self.executor.jobs:
            self.executor.run_next()
        self.assertEqual(order, ["first answered", "bob", "carol"])



class WriterSendsNextBatchTests(SynchronousTestCase):
    """
    The writer sends the writes that queued while it wrote a batch as the
    next batch itself, before the reactor answers the first: no round trip
    through the reactor between two batches, answers still in order.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.executor = SplitExecutor()
        self.store = SQLiteStore.open(
            ":memory:", self.clock, self.executor, lambda: load(MINI), FAST_HASHER.hash, max_batch=2
        )
        self.addCleanup(self.store.stop)
        self.store._db.executemany(
            "INSERT OR IGNORE INTO users (username, password_hash, created_at) VALUES (?, 'x', 0)",
            [(name,) for name in ("alice", "bob", "carol", "dave", "erin")],
        )
        self.big = flight_by_id(self.store.network(), BIG)

    def buy(self, username: str) -> Deferred[Ticket]:
        return self.store.buy(username, [LegRequest(self.big, None)])

    def test_next_batch_sent_by_the_writer(self) -> None:
        order: list[str] = []
        def answered(ticket: Ticket, name: str) -> None:
            order.append(f"{name} {ticket.legs[0].seat}")

        for name in ("alice", "bob", "carol", "dave", "erin"):
            self.buy(name).addCallback(answered, name)
        self.assertEqual(len(self.executor.jobs), 1, "alice alone; the others queue")
        self.executor.run_job()
        self.assertEqual(len(self.executor.jobs), 1, "bob and carol sent by the writer, before any answer")
        self.assertEqual(order, [])
        self.executor.run_job()
        self.assertEqual(len(self.executor.jobs), 1, "then dave and erin")
        self.executor.run_job()
        self.assertEqual(self.executor.jobs, [])
        self.assertEqual(order, [])
        for _ in range(3):
            self.executor.answer()
        self.assertEqual(order, ["alice 1A", "bob 1B", "carol 1C", "dave 1D", "erin 1E"])
        self.assertEqual((self.store.batches, self.store.batched_writes), (3, 5))
        self.assertEqual(self.executor.jobs, [])

    def test_answers_in_order_on_an_inline_executor(self) -> None:
        """
        On an executor that runs jobs at once, a batch sent by the writer
        runs (and its outcome arrives) inside the job before it: its answers
        still wait for those of the batch before.
        """
        executor = FirstHeldExecutor()
        store = SQLiteStore.open(":memory:", self.clock, executor, lambda: load(MINI), FAST_HASHER.hash, max_batch=2)
        self.addCleanup(store.stop)
        store._db.execute("INSERT OR IGNORE INTO users (username, password_hash, created_at) VALUES ('alice', 'x', 0)")
        order: list[str] = []
        for _ in range(6):
            store.buy("alice", [LegRequest(self.big, None)]).addCallback(lambda t: order.append(t.legs[0].seat))
        self.assertEqual(order, [])
        executor.release()
        self.assertEqual(order, ["1A", "1B", "1C", "1D", "1E", "1F"])
        self.assertEqual((store.batches, store.batched_writes), (4, 6))
        self.assertEqual(executor.nested, 3, "each batch sent by the job before it, inside it")

    def test_writes_after_the_writer_found_none(self) -> None:
        """
        A write that queues after the writer found no more to send goes
        next when the reactor answers the batch, as do the writes that the
        answers' callbacks start, behind it.
        """
        order: list[str] = []

        def then(ticket: Ticket) -> None:
            order.append("alice")
            self.buy("carol").addCallback(lambda t: order.append("carol"))

        self.buy("alice").addCallback(then)
        self.executor.run_job()
        self.assertEqual(self.executor.jobs, [])
        self.buy("bob").addCallback(lambda t: order.append("bob"))
        self.assertEqual(self.executor.jobs, [], "a batch is still to be answered")
        self.executor.answer()
        self.assertEqual(order, ["alice"])
        self.assertEqual(len(self.executor.jobs), 1)
        self.executor.run_job()
        self.executor.answer()
        self.assertEqual(order, ["alice", "bob", "carol"])
        self.assertEqual((self.store.batches, self.store.batched_writes), (2, 3))
        # Nothing is waiting: the next write starts a batch at once.
        self.buy("dave")
        self.assertEqual(len(self.executor.jobs), 1)

    def test_failed_batch_then_the_queued_ones(self) -> None:
        """
        A batch that cannot commit sends nothing after it: its answer (a
        failure for each of its writes) does, and the queued writes commit.
        """
        first = self.buy("alice")
        queued = self.buy("bob")
        real = self.store._db
        faulty = FaultyConnection(real)
        execute = faulty.execute

        def fail_commit(sql: str, parameters: Any = ()) -> sqlite3.Cursor:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return execute(sql, parameters)

        faulty.execute = fail_commit  # type: ignore[method-assign]
        self.store._db = faulty  # type: ignore[assignment]
        self.executor.run_job()
        self.store._db = real
        self.assertEqual(self.executor.jobs, [], "a failed batch sends no next batch")
        self.executor.answer()
        self.failureResultOf(first, StorageUnavailable)
        self.assertEqual(len(self.executor.jobs), 1, "the queued write goes once the failure is answered")
        self.assertNoResult(queued)
        self.executor.run_job()
        self.executor.answer()
        self.assertEqual(self.successResultOf(queued).legs[0].seat, "1A")


class BookingCodeClashTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        clock.advance(START)
        self.store = SQLiteStore.open(":memory:", clock, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(self.store.stop)
        self.big = flight_by_id(self.store.network(), BIG)

    def clashing(self, module: Any, codes: list[str]) -> list[float | None]:
        """
        Have C{module}'s booking codes be C{codes}, then random ones.
        """
        real = module.booking_code
        drawn: list[float | None] = []

        def clashing(now: float | None = None) -> str:
            drawn.append(now)
            return codes[len(drawn) - 1] if len(drawn) <= len(codes) else real(now)

        self.patch(module, "booking_code", clashing)
        return drawn

    def test_taken_code_drawn_again(self) -> None:
        """
        A booking code that is already taken is never given out twice: the
        rules draw another (in a transaction that keeps no rows for later,
        as when a batch is done again transaction by transaction).
        """
        import vendepass.store.transactions as transactions
        from vendepass.store.sqlite import SQLiteTx

        first = self.successResultOf(self.store.buy("bob", [LegRequest(self.big, None)]))
        drawn = self.clashing(transactions, [first.ticket_id, first.ticket_id])
        db = self.store._db
        db.execute("BEGIN IMMEDIATE")
        second = self.store.rules.new_ticket(SQLiteTx(db, START), "bob", [self.big])
        db.execute("COMMIT")
        self.assertNotEqual(second, first.ticket_id)
        self.assertEqual(drawn, [START, START, START])
        self.assertEqual(db.execute("SELECT COUNT(*) FROM tickets").fetchone(), (2,))

    def test_codes_drawn_ahead_are_checked_free(self) -> None:
        """
        The codes a batch's kept tickets get are drawn ahead, many at once,
        and those already taken (or drawn twice) are left out.
        """
        import vendepass.store.sqlite as sqlite

        self.patch(sqlite.TicketCodes, "draw", 3)
        self.clashing(sqlite, ["AAAAAAAA", "BBBBBBBB", "AAAAAAAA", "AAAAAAAA", "BBBBBBBB", "CCCCCCCC"])
        bought = [self.successResultOf(self.store.buy("bob", [LegRequest(self.big, None)])).ticket_id for _ in range(3)]
        self.assertEqual(bought, ["AAAAAAAA", "BBBBBBBB", "CCCCCCCC"])


class FirstHeldExecutor(InlineExecutor):
    """
    An L{InlineExecutor} that holds its first job until C{release}: the
    jobs it then submits run at once, inside it.
    """

    def __init__(self) -> None:
        self.held: tuple[Callable[[], Any], Deferred[Any]] | None = None
        self.running = 0
        self.nested = 0

    def submit(self, job: Callable[[], T]) -> Deferred[T]:
        if self.held is None and not self.running:
            d: Deferred[T] = Deferred()
            self.held = (job, d)
            return d
        self.nested += bool(self.running)
        self.running += 1
        try:
            return super().submit(job)
        finally:
            self.running -= 1

    def release(self) -> None:
        assert self.held is not None
        job, d = self.held
        self.running += 1
        try:
            result = job()
        finally:
            self.running -= 1
        d.callback(result)


class SplitExecutor(QueueExecutor):
    """
    A L{QueueExecutor} whose jobs can run (as on their thread) apart from
    being answered (as the reactor does later): C{run_job}, then C{answer}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[tuple[Deferred[Any], Any]] = []

    def run_job(self) -> None:
        job, d = self.jobs.pop(0)
        result: Any
        try:
            result = job()
        except BaseException:
            result = Failure()
        self.ran.append((d, result))

    def answer(self) -> None:
        d, result = self.ran.pop(0)
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


def wal_index(path: str) -> tuple[int, int]:
    """
    How many frames the WAL of the database at C{path} has, and how many of
    them are copied into the database, as its wal-index (the -shm file; see
    https://www.sqlite.org/walformat.html) says. Read from the file, not
    through a connection: a connection would checkpoint, or start a
    transaction, itself.
    """
    with open(path + "-shm", "rb") as f:
        head = f.read(136)
    (version,) = struct.unpack_from("=I", head, 0)
    assert version == 3007000, version
    (frames,) = struct.unpack_from("=I", head, 16)
    (copied,) = struct.unpack_from("=I", head, 96)
    return frames, copied


class CheckpointerTests(SynchronousTestCase):
    """
    The WAL copied into the database by a checkpointer beside the writer
    (C{SQLiteStore.open(..., checkpoint_executor=...)}).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.writer = SplitExecutor()
        self.checkpointer = SplitExecutor()
        self.path = self.mktemp()

    def open_store(self, path: str | None = None, max_batch: int = 4, checkpointer: bool = True) -> SQLiteStore:
        store = SQLiteStore.open(
            self.path if path is None else path,
            self.clock,
            self.writer,
            lambda: load(MINI),
            FAST_HASHER.hash,
            max_batch=max_batch,
            checkpoint_executor=self.checkpointer if checkpointer else None,
        )
        store.start()
        self.addCleanup(store.stop)
        self.big = flight_by_id(store.network(), BIG)
        return store

    def buy(self, store: SQLiteStore, username: str = "alice") -> Ticket:
        """
        Buy a seat on BIG and run the writer until it is answered.
        """
        d = store.buy(username, [LegRequest(self.big, None)])
        while self.writer.jobs:
            self.writer.run_next()
        return self.successResultOf(d)

    def assertStoppedWithTwoTickets(self) -> None:
        """
        After stop(): no checkpoint starts however long the clock runs, and
        the file holds the two tickets bought, verified clean.
        """
        self.clock.advance(CHECKPOINT_INTERVAL * 2)
        self.assertEqual(self.checkpointer.jobs, [])
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("SELECT COUNT(*) FROM tickets").fetchone(), (2,))
        self.assertEqual(verify(db).findings, [])

    def run_checkpoint(self) -> None:
        self.checkpointer.run_job()
        self.checkpointer.answer()

    def autocheckpoint(self, store: SQLiteStore) -> int:
        return int(store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    def test_writer_does_not_checkpoint(self) -> None:
        """
        With a checkpointer, the writer's connection never checkpoints by
        itself (C{wal_autocheckpoint} is 0); without one, or in memory, it
        keeps SQLite's default and there is no checkpointer connection.
        """
        store = self.open_store()
        self.assertEqual(self.autocheckpoint(store), 0)
        self.assertIsNotNone(store._checkpointer)

        plain = self.open_store(path=self.mktemp(), checkpointer=False)
        self.assertEqual(self.autocheckpoint(plain), 1000)
        self.assertIsNone(plain._checkpointer)

        memory = self.open_store(path=":memory:")
        self.assertEqual(self.autocheckpoint(memory), 1000)
        self.assertIsNone(memory._checkpointer)
        jobs = len(self.checkpointer.jobs)
        self.buy(memory)
        self.assertEqual(len(self.checkpointer.jobs), jobs, "no checkpoint for a database in memory")

    def checkpoint_after_a_purchase(self, max_batch: int) -> None:
        store = self.open_store(max_batch=max_batch)
        self.assertEqual(self.checkpointer.jobs, [])
        self.buy(store)
        self.assertEqual(len(self.checkpointer.jobs), 1)
        frames, copied = wal_index(self.path)
        self.assertLess(copied, frames, "the purchase is in the WAL only")
        self.assertEqual(store.checkpoints, 0)

        self.run_checkpoint()
        self.assertEqual(store.checkpoints, 1)
        self.assertEqual(wal_index(self.path), (frames, frames), "the whole WAL is copied")
        # The database file alone (without its WAL) has the ticket.
        copy = self.mktemp()
        shutil.copyfile(self.path, copy)
        alone = sqlite3.connect(copy)
        self.addCleanup(alone.close)
        self.assertEqual(alone.execute("SELECT COUNT(*) FROM tickets").fetchone(), (1,))
        # So a checkpoint now finds nothing left to copy.
        fresh = sqlite3.connect(self.path)
        self.addCleanup(fresh.close)
        self.assertEqual(fresh.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone(), (0, frames, frames))
        self.assertEqual(self.checkpointer.jobs, [])
        self.assertEqual(store.wal_restarts, 0)

    def test_checkpoint_after_a_batch(self) -> None:
        """
        After a batch commits, one checkpoint is queued on the checkpoint
        executor; it copies the WAL into the database.
        """
        self.checkpoint_after_a_purchase(max_batch=4)

    def test_checkpoint_after_a_write_of_its_own(self) -> None:
        """
        The same without group commit (a write answered by C{_write_one}).
        """
        self.checkpoint_after_a_purchase(max_batch=1)

    def test_at_most_one_checkpoint_per_interval(self) -> None:
        """
        A batch within C{CHECKPOINT_INTERVAL} of the last checkpoint's start
        queues none; one is queued once the interval is over.
        """
        store = self.open_store()
        self.buy(store)
        self.run_checkpoint()
        self.clock.advance(CHECKPOINT_INTERVAL / 2)
        self.buy(store)
        self.assertEqual(self.checkpointer.jobs, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.buy(store, "bob")
        self.assertEqual(self.checkpointer.jobs, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one later checkpoint for both")
        self.clock.advance(CHECKPOINT_INTERVAL / 4)
        self.assertEqual(self.checkpointer.jobs, [])
        self.clock.advance(CHECKPOINT_INTERVAL / 2)
        self.assertEqual(len(self.checkpointer.jobs), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.run_checkpoint()
        self.assertEqual(store.checkpoints, 2)
        frames, copied = wal_index(self.path)
        self.assertEqual(copied, frames)
        # Nothing committed since: nothing more to do.
        self.clock.advance(CHECKPOINT_INTERVAL / 2)
        self.assertEqual((self.checkpointer.jobs, self.clock.getDelayedCalls()), ([], []))
        # The next batch too soon waits for the end of this interval.
        self.buy(store)
        self.assertEqual(self.checkpointer.jobs, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(CHECKPOINT_INTERVAL / 2)
        self.assertEqual(len(self.checkpointer.jobs), 1)
        self.run_checkpoint()
        self.assertEqual(store.checkpoints, 3)
        self.clock.advance(CHECKPOINT_INTERVAL * 4)
        self.assertEqual((self.checkpointer.jobs, self.clock.getDelayedCalls()), ([], []))

    def test_one_checkpoint_at_a_time(self) -> None:
        """
        No checkpoint starts while one runs, even once the interval is
        over; the batches committed meanwhile get one when it ends.
        """
        store = self.open_store()
        self.buy(store)
        self.assertEqual(len(self.checkpointer.jobs), 1)
        self.clock.advance(CHECKPOINT_INTERVAL * 2)
        self.buy(store)
        self.buy(store, "bob")
        self.assertEqual(len(self.checkpointer.jobs), 1)
        self.checkpointer.run_job()
        self.buy(store)
        self.assertEqual(self.checkpointer.jobs, [])
        self.checkpointer.answer()
        self.assertEqual(len(self.checkpointer.jobs), 1, "the one due starts as the last ends")
        self.run_checkpoint()
        self.assertEqual(store.checkpoints, 2)
        frames, copied = wal_index(self.path)
        self.assertEqual(copied, frames)

    def checkpoint_during_next_batch(self, store: SQLiteStore) -> None:
        """
        Buy a seat while the queued checkpoint runs beside the writer: the
        checkpoint runs (on its thread) just before the batch's COMMIT, and
        is answered after it, as it is when the store is busy.
        """
        real = store._db
        faulty = FaultyConnection(real)
        execute = faulty.execute

        def commit_beside_a_checkpoint(sql: str, parameters: Any = ()) -> sqlite3.Cursor:
            if sql == "COMMIT" and self.checkpointer.jobs:
                self.checkpointer.run_job()
            return execute(sql, parameters)

        faulty.execute = commit_beside_a_checkpoint  # type: ignore[method-assign]
        store._db = faulty  # type: ignore[assignment]
        try:
            self.buy(store)
        finally:
            store._db = real
        self.checkpointer.answer()

    def busy_store(self) -> tuple[SQLiteStore, list[int]]:
        """
        A store that writes on while its checkpointer copies the WAL, so
        that no write transaction starts with all of the WAL copied (when
        SQLite would start the WAL again by itself); the WAL's length after
        each purchase.
        """
        store = self.open_store()
        lengths = []
        self.buy(store)
        lengths.append(wal_index(self.path)[0])
        for _ in range(4):
            self.checkpoint_during_next_batch(store)
            lengths.append(wal_index(self.path)[0])
            self.clock.advance(CHECKPOINT_INTERVAL)
            self.assertEqual(len(self.checkpointer.jobs), 1)
        return store, lengths

    def test_wal_grows_while_busy(self) -> None:
        """
        Short of C{WAL_RESTART_FRAMES}, the writer never restarts the WAL,
        and a busy store's WAL only grows (which the next test's restart
        is for).
        """
        store, lengths = self.busy_store()
        self.assertEqual(store.wal_restarts, 0)
        self.assertEqual(lengths, sorted(set(lengths)))
        frames, copied = wal_index(self.path)
        self.assertLess(copied, frames)

    def test_writer_restarts_a_long_wal(self) -> None:
        """
        Once a checkpoint finds the WAL C{WAL_RESTART_FRAMES} long, the
        writer copies the rest of it right after its next COMMIT, and the
        write transaction after that writes the WAL from its beginning.
        """
        self.patch(sqlite_store, "WAL_RESTART_FRAMES", 1)
        store = self.open_store()
        self.buy(store)
        first, _ = wal_index(self.path)
        self.checkpoint_during_next_batch(store)
        self.assertEqual(store.checkpoints, 1)
        self.assertEqual(store.wal_restarts, 0)
        frames, copied = wal_index(self.path)
        self.assertLess(copied, frames)
        # The checkpoint reported the WAL long enough: the next batch's
        # writer copies all of it after its COMMIT.
        self.clock.advance(CHECKPOINT_INTERVAL)
        self.checkpoint_during_next_batch(store)
        self.assertEqual(store.wal_restarts, 1)
        before, copied = wal_index(self.path)
        self.assertEqual(copied, before)
        # The purchase after it writes the WAL from the start: the WAL is
        # shorter than it was even after the first purchase.
        self.buy(store, "bob")
        after, _ = wal_index(self.path)
        self.assertLess(after, before)
        self.assertLess(after, first)
        # A restart is for one checkpoint's report: with none reported since
        # the last one, the writer copies nothing after its COMMIT.
        restarts = store.wal_restarts
        self.buy(store, "bob")
        self.assertEqual(store.wal_restarts, restarts)
        self.assertEqual(wal_index(self.path)[1], 0)
        self.assertEqual(store._db.execute("SELECT COUNT(*) FROM tickets").fetchone(), (5,))
        self.assertEqual(verify(store._db).findings, [])

    def test_stop_cancels_a_later_checkpoint(self) -> None:
        """
        stop() cancels a checkpoint waiting for its interval, closes the
        checkpointer's connection, and leaves every purchase in the file.
        """
        store = self.open_store()
        self.buy(store)
        self.run_checkpoint()
        self.buy(store)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        checkpointer = store._checkpointer
        assert checkpointer is not None
        store.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(sqlite3.ProgrammingError, checkpointer.execute, "SELECT 1")
        self.assertRaises(sqlite3.ProgrammingError, store._db.execute, "SELECT 1")
        self.assertStoppedWithTwoTickets()

    def test_checkpoint_answered_after_stop(self) -> None:
        """
        A checkpoint running at stop() (its thread ends it before stop()
        returns; the reactor gets its answer later), and a batch committed
        meanwhile, start no checkpoint after stop().
        """
        store = self.open_store()
        self.buy(store)
        self.checkpointer.run_job()
        bought = store.buy("bob", [LegRequest(self.big, None)])
        self.writer.run_job()
        store.stop()
        self.writer.answer()
        self.successResultOf(bought)
        self.checkpointer.answer()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertStoppedWithTwoTickets()

    def test_failed_restart_fails_no_write(self) -> None:
        """
        The writer's own checkpoint comes after its batch's COMMIT: if it
        fails, the batch's writes are still done (they are in the
        database), not failed.
        """
        self.patch(sqlite_store, "WAL_RESTART_FRAMES", 1)
        store = self.open_store()
        self.buy(store)
        self.checkpoint_during_next_batch(store)
        self.assertTrue(store._restart_wal)
        real = store._db
        faulty = FaultyConnection(real)
        execute = faulty.execute

        def spy(sql: str, parameters: Any = ()) -> sqlite3.Cursor:
            if sql.startswith("PRAGMA wal_checkpoint"):
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return execute(sql, parameters)

        faulty.execute = spy  # type: ignore[method-assign]
        store._db = faulty  # type: ignore[assignment]
        try:
            ticket = self.buy(store, "bob")
        finally:
            store._db = real
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertEqual(store.wal_restarts, 0)
        self.assertEqual(real.execute("SELECT COUNT(*) FROM tickets").fetchone(), (3,))
        owner = real.execute("SELECT username FROM tickets WHERE ticket_id = ?", (ticket.ticket_id,)).fetchone()
        self.assertEqual(owner, ("bob",))
        # The next batch's writer does not try again before a checkpoint
        # reports the WAL long again; the store carries on.
        self.buy(store)
        self.assertEqual(store.wal_restarts, 0)
        self.assertEqual(verify(real).findings, [])
