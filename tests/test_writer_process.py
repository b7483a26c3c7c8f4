"""
The SQLite store's writer process (L{vendepass.store.writer}): what travels
to it and back, a batch of several writes written there, a planted rule
that runs there, and a child that dies. The contract tests run against a
store with a writer process too (L{tests.test_store}).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.common import FAST_HASHER, MINI, START, TINY, QueueExecutor
from vendepass.errors import SeatUnavailable, StorageUnavailable, TooManyHolds
from vendepass.fixtures import load
from vendepass.model import Hold, Ticket
from vendepass.schedule import flight_by_id
from vendepass.store import InlineExecutor, IExecutor, LegRequest
from vendepass.store.sqlite import SQLiteStore
from vendepass.store.transactions import Asked, SeatRules, Tx, Work
from vendepass.store.writer import dumps, loads


class PlantedRules(SeatRules):
    """
    Rules with a bug: a purchase of seat 1A fails as a bug would.
    """

    def buy(self, tx: Tx, username: str, legs: list[LegRequest], request_id: str | None = None) -> Ticket:
        if any(leg.seat == "1A" for leg in legs):
            raise ZeroDivisionError("planted")
        return super().buy(tx, username, legs, request_id)


class PlantedStore(SQLiteStore):
    rules_class = PlantedRules


def _alive() -> bool:
    return True


class WriterProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        directory = Path(self.mktemp())
        directory.mkdir()
        self.path = str(directory / "vendepass.sqlite3")

    def open(self, executor: IExecutor | None = None, cls: type[SQLiteStore] = SQLiteStore) -> SQLiteStore:
        store = cls.open(
            self.path, self.clock, executor or InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash,
            max_batch=4, read_executor=InlineExecutor(), writer_process=True,
        )
        store.start()
        self.addCleanup(store.stop)
        self.tiny = flight_by_id(store.network(), TINY)
        return store

    def test_needs_group_commit_a_file_and_a_reader(self) -> None:
        """
        A writer process is refused without group commit, for a database in
        memory, and without a read executor (its reads need a connection of
        their own).
        """
        for path, batch, reader in ((self.path, 1, True), (":memory:", 4, True), (self.path, 4, False)):
            with self.assertRaises(ValueError):
                SQLiteStore.open(
                    path, self.clock, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash,
                    max_batch=batch, read_executor=InlineExecutor() if reader else None, writer_process=True,
                )

    def test_values_travel(self) -> None:
        """
        Flights travel as their ids and come back as the receiving side's
        own; the rules as a reference to the other side's; refusals with
        their details; a work's callable arguments as their answers.
        """
        store = self.open()
        rules = store.rules
        other = SeatRules(store.network(), 3)
        work = Work(rules, "hold", ("alice", "S1", [LegRequest(self.tiny, "1A")], 60.0, _alive, None))
        refusal = TooManyHolds(limit=9, held=9)
        back = loads(dumps((work.shipped(), refusal), rules), other)
        shipped, error = back
        self.assertIs(shipped.rules, other)
        self.assertEqual(shipped.rule, "hold")
        leg = shipped.args[2][0]
        self.assertIs(leg.flight, other.flight(TINY))
        self.assertEqual(shipped.args[4], Asked(True))
        self.assertTrue(shipped.args[4]())
        self.assertIsInstance(error, TooManyHolds)
        self.assertEqual(error.to_wire(), refusal.to_wire())
        # Only answers are left to travel; shipped twice, or without a
        # callable argument, a work is itself.
        self.assertEqual([type(arg) for arg in work.shipped().args if callable(arg)], [Asked])
        once = work.shipped()
        self.assertIs(once.shipped(), once)
        plain = Work(rules, "buy", ("alice", [], None))
        self.assertIs(plain.shipped(), plain)

    def test_a_batch_written_there(self) -> None:
        """
        Several writes queued behind one go to the child as one batch: each
        gets its own answer, a refusal among them refuses only its own.
        """
        writer = QueueExecutor()
        store = self.open(writer)
        first = store.buy("alice", [LegRequest(self.tiny, "1A")])
        bought = store.buy("bob", [LegRequest(self.tiny, "1B")])
        taken = store.buy("alice", [LegRequest(self.tiny, "1B")])
        held = store.hold("bob", "S2", [LegRequest(self.tiny, "2A")], 60, _alive)
        writer.run_next()
        writer.run_next()
        self.assertEqual(store.batches, 2)
        self.assertEqual(store.batched_writes, 4)
        self.assertIsInstance(self.successResultOf(first), Ticket)
        self.assertEqual([leg.seat for leg in self.successResultOf(bought).legs], ["1B"])
        self.failureResultOf(taken, SeatUnavailable)
        hold = self.successResultOf(held)
        self.assertIsInstance(hold, Hold)
        self.assertIs(hold.legs[0].flight, store.rules.flight(TINY))
        # Counted in this process from what the child committed.
        self.assertEqual(self.successResultOf(store.free_seats([self.tiny]))[TINY], self.tiny.aircraft.capacity - 3)
        self.assertEqual({s.seat for s in self.successResultOf(store.seats(self.tiny)) if s.status != "free"},
                         {"1A", "1B", "2A"})

    def test_planted_rules_run_there(self) -> None:
        """
        A store's own rules (the simulation's planted bugs) are what the
        child runs; a bug there fails its work alone, with its traceback.
        """
        store = self.open(cls=PlantedStore)
        failure = self.failureResultOf(store.buy("alice", [LegRequest(self.tiny, "1A")]), RuntimeError)
        self.assertIn("ZeroDivisionError: planted", str(failure.value))
        self.assertIsInstance(self.successResultOf(store.buy("alice", [LegRequest(self.tiny, "1B")])), Ticket)

    def test_a_dead_child_is_replaced(self) -> None:
        """
        A child killed between batches fails the next batch with
        L{StorageUnavailable} (nothing of it was acknowledged); the batch
        after starts a new child, which reads the seats from the file: what
        was sold stays sold, and the counts are right.
        """
        store = self.open()
        self.successResultOf(store.buy("alice", [LegRequest(self.tiny, "1A")]))
        writer = store._writer
        assert writer is not None and writer.pid is not None
        first = writer.pid
        os.kill(first, signal.SIGKILL)
        self.failureResultOf(store.buy("bob", [LegRequest(self.tiny, "1B")]), StorageUnavailable)
        self.failureResultOf(store.buy("bob", [LegRequest(self.tiny, "1A")]), SeatUnavailable)
        self.assertNotEqual(writer.pid, first)
        self.assertEqual(writer.starts, 2)
        self.successResultOf(store.buy("bob", [LegRequest(self.tiny, "1B")]))
        self.assertEqual(self.successResultOf(store.free_seats([self.tiny]))[TINY], self.tiny.aircraft.capacity - 2)

    def test_child_ends_with_the_store(self) -> None:
        """
        Stopping the store stops its child, which closes its connection.
        """
        store = self.open()
        writer = store._writer
        assert writer is not None
        process = writer._process
        assert process is not None
        store.stop()
        self.assertIsNotNone(process.poll())
        self.assertEqual(process.returncode, 0)
