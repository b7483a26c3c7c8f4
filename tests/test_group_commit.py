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
        self.successResultOf(again)
        self.assertEqual(self.tickets_in_db(), 2)

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
            store.stop()

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
    def test_taken_code_drawn_again(self) -> None:
        """
        A booking code that is already taken is never given out twice: the
        store draws another.
        """
        import vendepass.store.transactions as transactions

        real = transactions.booking_code
        drawn: list[float | None] = []

        def clashing(now: float | None = None) -> str:
            drawn.append(now)
            return "AAAAAAAA" if len(drawn) <= 2 else real(now)

        self.patch(transactions, "booking_code", clashing)
        clock = Clock()
        clock.advance(START)
        store = SQLiteStore.open(":memory:", clock, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(store.stop)
        big = flight_by_id(store.network(), BIG)
        first = self.successResultOf(store.buy("bob", [LegRequest(big, None)]))
        second = self.successResultOf(store.buy("bob", [LegRequest(big, None)]))
        self.assertEqual(first.ticket_id, "AAAAAAAA")
        self.assertNotEqual(second.ticket_id, "AAAAAAAA")
        self.assertEqual(drawn, [START, START, START])
