"""
Storage faults: when the database cannot be written, requests get
storage_unavailable, nothing half done is acknowledged, and the server
recovers by itself when the fault clears.

Fault injection the way SQLite's own suite does it: a scripted session is
run once to count the store's database calls, then once more for every N,
with the N-th call failing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.common import ALICE, BIG, BOB, START, TINY, LineClient, make_service
from vendepass.admin import verify
from vendepass.service import ReservationService


class FaultyConnection:
    """
    A SQLite connection whose C{fail_at}-th call fails with a disk I/O error.
    """

    def __init__(self, db: sqlite3.Connection, fail_at: int | None = None) -> None:
        self.db = db
        self.fail_at = fail_at
        self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise sqlite3.OperationalError("disk I/O error (injected)")

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        self._call()
        return self.db.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any) -> sqlite3.Cursor:
        self._call()
        return self.db.executemany(sql, parameters)

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def close(self) -> None:
        self.db.close()


def scripted_session(service: ReservationService) -> list[dict[str, Any]]:
    """
    Every kind of request that touches the database; the replies, in order.
    """
    alice = LineClient(service)
    bob = LineClient(service)
    replies: list[dict[str, Any]] = []

    def call(client: LineClient, opcode: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = client.request(opcode, data)
        replies.append(reply)
        return reply

    call(alice, 1, {"username": ALICE[0], "password": ALICE[1]})
    call(bob, 1, {"username": BOB[0], "password": BOB[1]})
    call(alice, 10, {"username": "carol", "password": "carol-password"})
    bought = call(alice, 3, {"flights": [TINY, BIG], "seats": ["1A", "1A"], "request_id": "one"})
    hold = call(bob, 6, {"flights": [TINY], "seats": ["2A"]})
    if hold["ok"]:
        call(bob, 3, {"hold_id": hold["data"]["hold"]["hold_id"]})
    second = call(bob, 6, {"flights": [BIG]})
    if second["ok"]:
        call(bob, 7, {"hold_id": second["data"]["hold"]["hold_id"]})
    call(alice, 2, {"origin": "SSA", "destination": "MAO", "date": "2026-12-02"})
    call(alice, 8, {"flight": TINY})
    call(alice, 4)
    if bought["ok"]:
        call(alice, 5, {"ticket_id": bought["data"]["ticket"]["ticket_id"]})
    call(bob, 6, {"flights": [TINY]})
    bob.disconnect()
    return replies


class FaultInjectionTests(SynchronousTestCase):
    def run_with_fault(self, fail_at: int | None) -> tuple[ReservationService, FaultyConnection, list[dict[str, Any]]]:
        clock = Clock()
        clock.advance(START)
        service = make_service(clock=clock)
        store: Any = service.store
        faulty = FaultyConnection(store._db, fail_at)
        store._db = faulty
        return service, faulty, scripted_session(service)

    def test_every_call_fails_once(self) -> None:
        _, clean, expected = self.run_with_fault(None)
        total = clean.calls
        self.assertGreater(total, 50)
        refused = 0
        for n in range(1, total + 1):
            service, faulty, replies = self.run_with_fault(n)
            db = faulty.db
            unavailable = [r for r in replies if not r["ok"] and r["error"]["code"] == "storage_unavailable"]
            others = [r for r in replies if not r["ok"] and r["error"]["code"] != "storage_unavailable"]
            # The fault is seen by exactly one request, as storage_unavailable, never internal_error.
            self.assertLessEqual(len(unavailable), 1, (n, replies))
            self.assertFalse(any(r["error"]["code"] == "internal_error" for r in others), (n, others))
            refused += len(unavailable)
            # Nothing acknowledged that is not committed.
            for reply in replies:
                if reply["ok"] and reply["opcode"] == 3:
                    ticket_id = reply["data"]["ticket"]["ticket_id"]
                    self.assertEqual(
                        db.execute("SELECT COUNT(*) FROM tickets WHERE ticket_id = ?", (ticket_id,)).fetchone()[0],
                        1,
                        (n, reply),
                    )
            self.assertEqual(db.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            self.assertEqual(verify(db).findings, [], n)
            # The fault has cleared: the server is alive and the next request works.
            after = LineClient(service)
            after.login(ALICE)
            self.assertIn("tickets", after.ok(4))
        self.assertGreater(refused, total // 2)


class LockedDatabaseTests(SynchronousTestCase):
    def test_locked_then_recovers(self) -> None:
        """
        Another process holds the database locked: requests are refused with
        storage_unavailable until it lets go, then everything works again.
        """
        path = str(Path(self.mktemp()).resolve())
        service = make_service(path)
        store: Any = service.store
        store._db.execute("PRAGMA busy_timeout = 20")
        alice = LineClient(service)
        alice.login(ALICE)
        intruder = sqlite3.connect(path, isolation_level=None)
        intruder.execute("BEGIN EXCLUSIVE")
        error = alice.error(3, {"flights": [TINY], "seats": ["1A"]})
        self.assertEqual(error["code"], "storage_unavailable")
        # In WAL mode readers are not blocked by a writer.
        self.assertEqual(alice.ok(4), {"tickets": []})
        intruder.execute("ROLLBACK")
        intruder.close()
        ticket = alice.ok(3, {"flights": [TINY], "seats": ["1A"]})["ticket"]
        self.assertEqual([t["ticket_id"] for t in alice.ok(4)["tickets"]], [ticket["ticket_id"]])
