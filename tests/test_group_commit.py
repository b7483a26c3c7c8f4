"""
Group commit in the SQLite store: writes that queue up while a transaction
is in flight share the next one, and none
is answered before the transaction that holds it is on disk.
"""

from __future__ import annotations

import sqlite3
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
from vendepass.errors import HoldExpired, SeatUnavailable, StorageUnavailable
from vendepass.fixtures import load
from vendepass.model import Ticket
from vendepass.schedule import flight_by_id
from vendepass.store import IExecutor, IStore, InlineExecutor, LegRequest
from vendepass.store.sqlite import SQLiteStore

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
        The tickets, sold seats, audit rows and tickets' legs of a batch's
        purchases are inserted by one multi-row statement each, before its
        COMMIT, tickets first, in order; a held seat goes in at once.
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
            [c for c in calls if not c[0].startswith("INSERT INTO holds") and not c[0].startswith("INSERT INTO hold_legs")],
            # The purchase in flight,
            [("INSERT INTO tickets", 1), ("INSERT INTO seats", 1), ("INSERT INTO audit", 1),
             ("INSERT INTO ticket_legs", 1),
             # then the batch of three: dave's held seat at once, then the
             # rows of the batch.
             ("INSERT INTO seats (many)", 1),
             ("INSERT INTO tickets", 2), ("INSERT INTO seats", 3), ("INSERT INTO audit", 3),
             ("INSERT INTO ticket_legs", 3)],
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
        Rows go in by statements of 8, 64 or 256 rows, padded with rows of
        NULLs that are left out, in order.
        """
        from vendepass.store.sqlite import insert_rows

        db = sqlite3.connect(":memory:")
        db.execute("CREATE TABLE t (n INTEGER NOT NULL, word TEXT)")
        sizes: list[int] = []

        def execute(sql: str, values: list[Any]) -> sqlite3.Cursor:
            sizes.append(len(values) // 2)
            return db.execute(sql, values)

        for count in (1, 8, 9, 256, 300):
            db.execute("DELETE FROM t")
            insert_rows(execute, "INSERT INTO t (n, word) VALUES (?, ?)", [(i, f"w{i}") for i in range(count)])
            self.assertEqual(db.execute("SELECT n, word FROM t ORDER BY rowid").fetchall(),
                             [(i, f"w{i}") for i in range(count)])
        self.assertEqual(sizes, [8, 8, 64, 256, 256, 64])

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
        rules draw another (a hold being bought inserts its ticket at once).
        """
        import vendepass.store.transactions as transactions

        first = self.successResultOf(self.store.buy("bob", [LegRequest(self.big, None)]))
        drawn = self.clashing(transactions, [first.ticket_id, first.ticket_id])
        hold = self.successResultOf(self.store.hold("bob", "S1", [LegRequest(self.big, None)], 30, lambda: True))
        second = self.successResultOf(self.store.buy_hold(hold.hold_id, "bob"))
        self.assertNotEqual(second.ticket_id, first.ticket_id)
        self.assertEqual(drawn, [START, START, START])

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
