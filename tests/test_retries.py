"""
Safe retries: a request repeated with the same request_id is answered with
the first outcome and done only once, even from a new connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.common import ALICE, BIG, BOB, START, TINY, LineClient, make_service


class RetryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(clock=self.clock)
        self.alice = self.connect(ALICE)

    def connect(self, user: tuple[str, str]) -> LineClient:
        client = LineClient(self.service)
        client.login(user)
        return client

    def count(self, sql: str, *args: Any) -> int:
        return int(self.service.store._db.execute(sql, args).fetchone()[0])  # type: ignore[attr-defined]

    def test_buy_twice_same_connection(self) -> None:
        first = self.alice.ok(3, {"flights": [TINY], "seats": ["1A"], "request_id": "buy-1"})
        again = self.alice.ok(3, {"flights": [TINY], "seats": ["1A"], "request_id": "buy-1"})
        self.assertEqual(first, again)
        self.assertEqual(len(self.alice.ok(4)["tickets"]), 1)
        self.assertEqual(self.count("SELECT COUNT(*) FROM seats WHERE ticket_id IS NOT NULL"), 1)

    def test_buy_retried_after_reconnect(self) -> None:
        """
        The answer was lost with the connection; the retry from a new one
        gets the same ticket and buys nothing more.
        """
        first = self.alice.ok(3, {"flights": [TINY, BIG], "request_id": "trip"})
        self.alice.disconnect()
        self.clock.advance(30)
        retry = self.connect(ALICE)
        self.assertEqual(retry.ok(3, {"flights": [TINY, BIG], "request_id": "trip"}), first)
        self.assertEqual([t["ticket_id"] for t in retry.ok(4)["tickets"]], [first["ticket"]["ticket_id"]])

    def test_buy_of_hold_retried(self) -> None:
        hold = self.alice.ok(6, {"flights": [TINY], "seats": ["2A"]})["hold"]
        first = self.alice.ok(3, {"hold_id": hold["hold_id"], "request_id": "pay"})
        self.assertEqual(self.alice.ok(3, {"hold_id": hold["hold_id"], "request_id": "pay"}), first)
        # Without the key, buying the same hold again is refused.
        self.assertEqual(self.alice.error(3, {"hold_id": hold["hold_id"]})["code"], "hold_not_found")

    def test_replay_shows_the_first_answer(self) -> None:
        """
        A purchase retried after the ticket was cancelled is answered as it was first.
        """
        first = self.alice.ok(3, {"flights": [TINY], "request_id": "b"})
        self.alice.ok(5, {"ticket_id": first["ticket"]["ticket_id"]})
        self.assertEqual(self.alice.ok(3, {"flights": [TINY], "request_id": "b"}), first)
        self.assertEqual(self.count("SELECT COUNT(*) FROM tickets"), 1)

    def test_hold_retried(self) -> None:
        first = self.alice.ok(6, {"flights": [TINY], "request_id": "h"})
        self.assertEqual(self.alice.ok(6, {"flights": [TINY], "request_id": "h"}), first)
        self.assertEqual(self.count("SELECT COUNT(*) FROM holds WHERE state = 'active'"), 1)
        self.assertEqual(self.count("SELECT COUNT(*) FROM seats"), 1)

    def test_cancel_retried(self) -> None:
        ticket = self.alice.ok(3, {"flights": [TINY]})["ticket"]
        first = self.alice.ok(5, {"ticket_id": ticket["ticket_id"], "request_id": "c"})
        self.assertEqual(self.alice.ok(5, {"ticket_id": ticket["ticket_id"], "request_id": "c"}), first)
        # A new key is a new request: the ticket is already cancelled.
        code = self.alice.error(5, {"ticket_id": ticket["ticket_id"], "request_id": "c2"})["code"]
        self.assertEqual(code, "already_cancelled")

    def test_release_retried(self) -> None:
        hold = self.alice.ok(6, {"flights": [TINY]})["hold"]
        self.assertEqual(self.alice.ok(7, {"hold_id": hold["hold_id"], "request_id": "r"}), {})
        self.assertEqual(self.alice.ok(7, {"hold_id": hold["hold_id"], "request_id": "r"}), {})
        self.assertEqual(self.alice.error(7, {"hold_id": hold["hold_id"]})["code"], "hold_not_found")

    def test_key_reused_for_another_operation(self) -> None:
        self.alice.ok(6, {"flights": [TINY], "request_id": "k"})
        error = self.alice.error(3, {"flights": [BIG], "request_id": "k"})
        self.assertEqual((error["code"], error["field"]), ("invalid_request", "request_id"))
        self.assertEqual(self.count("SELECT COUNT(*) FROM tickets"), 0)

    def test_keys_are_per_user(self) -> None:
        mine = self.alice.ok(3, {"flights": [TINY], "request_id": "same"})
        bob = self.connect(BOB)
        theirs = bob.ok(3, {"flights": [TINY], "request_id": "same"})
        self.assertNotEqual(mine["ticket"]["ticket_id"], theirs["ticket"]["ticket_id"])

    def test_refusal_not_recorded(self) -> None:
        """
        A refused request changed nothing, so its retry runs again.
        """
        bob = self.connect(BOB)
        bob_hold = bob.ok(6, {"flights": [TINY], "seats": ["1A"]})["hold"]
        refused = self.alice.error(3, {"flights": [TINY], "seats": ["1A"], "request_id": "x"})
        self.assertEqual(refused["code"], "seat_unavailable")
        bob.ok(7, {"hold_id": bob_hold["hold_id"]})
        ticket = self.alice.ok(3, {"flights": [TINY], "seats": ["1A"], "request_id": "x"})["ticket"]
        self.assertEqual(ticket["legs"][0]["seat"], "1A")

    def test_kept_a_day(self) -> None:
        """
        Outcomes are kept at least 24 hours; then the key may be reused.
        """
        self.alice.ok(3, {"flights": [BIG], "request_id": "old"})
        self.clock.advance(86399)
        self.service.sweep()
        self.assertEqual(self.count("SELECT COUNT(*) FROM requests"), 1)
        self.clock.advance(2)
        self.service.sweep()
        self.assertEqual(self.count("SELECT COUNT(*) FROM requests"), 0)

    def test_bad_request_id(self) -> None:
        for bad in ["", "with space", "x" * 129, 7, True]:
            error = self.alice.error(3, {"flights": [TINY], "request_id": bad})
            self.assertEqual((error["code"], error["field"]), ("invalid_request", "request_id"), bad)
        self.assertEqual(self.count("SELECT COUNT(*) FROM tickets"), 0)
