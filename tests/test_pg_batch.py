"""
PostgreSQL: the group commit of one-step purchases. Purchases that arrive
while every writer is busy wait, and the next free writer sends them as one
call of C{vendepass_buy_batch} (one transaction, one COMMIT). Each purchase
keeps its own outcome: a refusal, or an exception of one, costs the others
nothing; a connection lost during the batch's call leaves each purchase
outcome unknown, unless it has a C{request_id} (then it is run again).
"""

from __future__ import annotations

from typing import Any, cast

import psycopg
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests import pg
from tests.common import FAST_HASHER, MINI, QueueExecutor
from tests.test_pg_outcomes import _terminate
from tests.test_postgres import _day_after_tomorrow
from vendepass.errors import OutcomeUnknown, PurchaseLimit, SeatUnavailable, VendePassError
from vendepass.fixtures import load
from vendepass.model import Ticket
from vendepass.schedule import flight_by_id
from vendepass.store import LegRequest, postgres
from vendepass.store.postgres import PostgresRules, PostgresStore


class StepExecutor(QueueExecutor):
    """
    Runs the submitted jobs when the test says (L{run}), on the test's
    thread: a writer that stays busy until then.
    """

    def run(self) -> None:
        while self.jobs:
            self.run_next()


def _outcomes(ds: list[Deferred[Ticket]]) -> list[Any]:
    """
    What each Deferred fired with (a Failure's exception for an error).
    """
    out: list[Any] = []
    for d in ds:
        got: list[Any] = []
        d.addBoth(got.append)
        assert got, "the Deferred has not fired"
        out.append(got[0].value if isinstance(got[0], Failure) else got[0])
    return out


class GroupCommitTests(TestCase):
    def setUp(self) -> None:
        self.url = pg.fresh_url(self)
        self.calls = pg.count_round_trips(self)
        self.executor = StepExecutor()
        self.store = PostgresStore.open(self.url, self.executor, lambda: load(MINI), FAST_HASHER.hash)  # type: ignore[arg-type]
        self.store.max_batch = 32
        self.store.batch_slots = 1
        self.addCleanup(self.store.stop)
        self.flight = flight_by_id(self.store.network(), f"VP200-{_day_after_tomorrow()}")

    def buys(self, wanted: list[tuple[str, str | None, str | None]]) -> list[Any]:
        """
        Buy one seat of the flight for each C{(username, seat, request_id)},
        all asked while the one writer is busy; each one's outcome.
        """
        ds = [self.store.buy(user, [LegRequest(self.flight, seat)], request_id) for user, seat, request_id in wanted]
        del self.calls[:]
        self.executor.run()
        return _outcomes(ds)

    def seats_sold(self) -> list[str]:
        with psycopg.connect(self.url) as conn:
            return [r[0] for r in conn.execute("SELECT flight_id || '/' || seat FROM seats ORDER BY 1").fetchall()]

    def test_batched(self) -> None:
        """
        Five purchases asked at once with one writer: the first goes alone,
        the four that waited for it go as one call. Every seat once.
        """
        got = self.buys([("alice", None, None), ("bob", None, None), ("alice", "9C", "r1"), ("bob", None, "r2"), ("alice", None, None)])
        self.assertTrue(all(isinstance(t, Ticket) for t in got), got)
        self.assertEqual(self.calls.count(postgres.BUY_CALL), 1)
        self.assertEqual(self.calls.count(postgres.BUY_BATCH_CALL), 1)
        # Besides the new connection's set-up, nothing else.
        self.assertEqual(len([c for c in self.calls if not c.startswith("SET ")]), 2)
        seats = [leg.seat for t in got for leg in t.legs]
        self.assertEqual(len(set(seats)), 5)
        self.assertEqual(len(self.seats_sold()), 5)
        self.assertEqual((self.store.buy_batches, self.store.batched_buys), (1, 4))

    def test_refusal_is_its_own(self) -> None:
        """
        In a batch, a purchase refused (its seat taken by one before it in
        the same batch) is refused; the others commit.
        """
        got = self.buys([("alice", None, None), ("bob", "9C", None), ("alice", "9C", None), ("bob", "9A", None)])
        self.assertIsInstance(got[2], SeatUnavailable)
        for i in (0, 1, 3):
            self.assertIsInstance(got[i], Ticket)
        self.assertEqual(len(self.seats_sold()), 3)
        self.assertEqual(self.store.buy_batches, 1)
        self.assertEqual(self.calls.count(postgres.BUY_CALL), 1, "the batch was not run again alone")

    def test_raise_is_its_own(self) -> None:
        """
        A purchase of a batch that raises in the database (here: given no
        booking code to try) rolls the batch back; each purchase is then
        run alone: that one fails, the others commit, none twice.
        """
        rules = cast(PostgresRules, self.store.rules)
        real = rules.buy_call

        def buy_call(username: str, legs: list[LegRequest], request_id: str | None, now: float | None) -> tuple[Any, ...]:
            args = real(username, legs, request_id, now)
            return (*args[:8], []) if request_id == "bad" else args

        self.patch(rules, "buy_call", buy_call)
        got = self.buys([("alice", None, None), ("bob", None, "r1"), ("alice", None, "bad"), ("bob", None, None)])
        self.assertNotIsInstance(got[2], Ticket)
        for i in (0, 1, 3):
            self.assertIsInstance(got[i], Ticket)
        self.assertEqual(len(self.seats_sold()), 3)
        self.assertEqual(self.calls.count(postgres.BUY_BATCH_CALL), 1)

    def test_lost_during_batch(self) -> None:
        """
        The connection dies during the batch's call: a purchase without a
        C{request_id} is outcome unknown; one with is run again (alone, on
        a new connection) and gets its ticket; none is sold twice.
        """
        store = self.store
        real = store._call_batch

        def call_batch(cur: psycopg.Cursor[Any], calls: list[list[Any]]) -> Any:
            _terminate(self.url, [cur.connection.info.backend_pid])
            return real(cur, calls)

        self.patch(store, "_call_batch", call_batch)
        got = self.buys([("alice", None, None), ("bob", None, None), ("alice", None, "r1"), ("bob", None, None)])
        self.assertIsInstance(got[0], Ticket)
        self.assertIsInstance(got[1], OutcomeUnknown)
        self.assertIsInstance(got[2], Ticket)
        self.assertIsInstance(got[3], OutcomeUnknown)
        self.assertEqual(len(self.seats_sold()), 2)
        self.assertIsInstance(got[1], VendePassError)

    def test_same_request_twice_in_a_batch(self) -> None:
        """
        A purchase retried (the same C{request_id}) in the batch of its
        first try gets the first try's ticket: one ticket, one seat.
        """
        got = self.buys([("bob", None, None), ("bob", None, None), ("alice", None, "r1"), ("alice", None, "r1"),
                         ("alice", None, "r2")])
        self.assertTrue(all(isinstance(t, Ticket) for t in got), got)
        self.assertEqual(got[2].ticket_id, got[3].ticket_id)
        self.assertEqual(got[2].legs, got[3].legs)
        self.assertEqual(len({t.ticket_id for t in got}), 4)
        self.assertEqual(len(self.seats_sold()), 4)
        self.assertEqual(self.store.buy_batches, 1)

    def test_picked_in_seat_map_order(self) -> None:
        """
        Seats the server picks for purchases of one batch are the first
        free ones in seat map order, each once, passing over a seat chosen
        by an earlier purchase of the batch.
        """
        letters = self.flight.aircraft.letters
        got = self.buys([("bob", "9C", None), ("alice", None, None), ("bob", f"1{letters[1]}", None),
                         ("alice", None, None), ("bob", None, None)])
        self.assertTrue(all(isinstance(t, Ticket) for t in got), got)
        self.assertEqual([t.legs[0].seat for t in got[1:]], [f"1{letters[0]}", f"1{letters[1]}", f"1{letters[2]}",
                                                               f"1{letters[3]}"])
        self.assertEqual(self.calls.count(postgres.BUY_CALL), 1, "the batch was not run again alone")

    def test_picked_into_a_gap(self) -> None:
        """
        A seat freed before seats sold after it (a cancellation) is the
        first the server picks again, then the one after the last sold.
        """
        letters = self.flight.aircraft.letters
        first = self.buys([("bob", None, None), ("alice", None, None), ("bob", None, None), ("alice", None, None)])
        self.assertEqual([t.legs[0].seat for t in first], [f"1{x}" for x in letters[:4]])
        self.assertEqual(self.done(self.store.cancel(first[1].ticket_id, "alice")).status, "cancelled")
        got = self.buys([("bob", None, None), ("alice", None, None), ("bob", None, None)])
        self.assertEqual([t.legs[0].seat for t in got], [f"1{letters[1]}", f"1{letters[4]}", f"1{letters[5]}"])

    def done(self, d: Deferred[Any]) -> Any:
        got: list[Any] = []
        d.addBoth(got.append)
        self.executor.run()
        assert got, "the Deferred has not fired"
        if isinstance(got[0], Failure):
            got[0].raiseException()
        return got[0]

    def test_picked_past_holds_and_into_a_release(self) -> None:
        """
        A seat a hold took after the last pick is passed over (the next
        place is only a start); the seat of a hold released below it is
        the first picked again; what was freed and taken again is
        forgotten.
        """
        letters = self.flight.aircraft.letters
        first = self.buys([("bob", None, None), ("alice", None, None)])
        self.assertEqual([t.legs[0].seat for t in first], [f"1{x}" for x in letters[:2]])
        hold = self.done(self.store.hold("alice", "s1", [LegRequest(self.flight, None)], 60, lambda: True))
        self.assertEqual(hold.legs[0].seat, f"1{letters[2]}")
        got = self.buys([("bob", None, None), ("bob", None, None)])
        self.assertEqual([t.legs[0].seat for t in got], [f"1{x}" for x in letters[3:5]])
        self.done(self.store.release(hold.hold_id, "alice"))
        got = self.buys([("bob", None, None), ("alice", None, None)])
        self.assertEqual([t.legs[0].seat for t in got], [f"1{letters[2]}", f"1{letters[5]}"])
        with psycopg.connect(self.url) as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM seats_freed").fetchone(), (0,))
            self.assertEqual(
                conn.execute("SELECT next_place FROM seat_picks WHERE flight_id = %s", (self.flight.flight_id,)).fetchone(),
                (6,),
            )

    def test_freed_seat_taken_again_by_a_hold(self) -> None:
        """
        A seat freed, then held again (the hold's pick reads the flight),
        stays among the freed seats and is passed over while held; freed
        once more, it is the first picked again.
        """
        letters = self.flight.aircraft.letters
        first = self.buys([("bob", None, None), ("alice", None, None), ("bob", None, None)])
        self.done(self.store.cancel(first[1].ticket_id, "alice"))
        hold = self.done(self.store.hold("alice", "s1", [LegRequest(self.flight, None)], 60, lambda: True))
        self.assertEqual(hold.legs[0].seat, f"1{letters[1]}")
        got = self.buys([("bob", None, None), ("bob", None, None)])
        self.assertEqual([t.legs[0].seat for t in got], [f"1{x}" for x in letters[3:5]])
        self.done(self.store.release(hold.hold_id, "alice"))
        got = self.buys([("bob", None, None)])
        self.assertEqual(got[0].legs[0].seat, f"1{letters[1]}")

    def test_limit_counts_the_batch(self) -> None:
        """
        The seats-per-flight limit counts the customer's seats bought by
        earlier purchases of the same batch.
        """
        self.store.max_seats_per_flight = 2
        got = self.buys([("bob", None, None), ("alice", None, None), ("bob", None, None), ("alice", None, None),
                         ("alice", None, None)])
        self.assertEqual([type(t) for t in got], [Ticket, Ticket, Ticket, Ticket, PurchaseLimit])
        self.assertEqual(len(self.seats_sold()), 4)

    def test_booking_codes_taken(self) -> None:
        """
        A purchase whose first booking code is a ticket's already sold
        moves on to its next candidate that no purchase of the batch has:
        here the first purchase's second candidate is the second purchase's
        first, so it gets its third; the third purchase's first is the
        second's too, so it gets its second. One call, a code each, each
        with its seat and leg.
        """
        taken = self.buys([("bob", None, None)])[0].ticket_id
        day, real = taken[:2], postgres._codes
        candidates = iter([
            real(),  # the first goes alone
            [taken[2:], "QQQQQQ", "PPPPPP", *real()[3:]],
            ["QQQQQQ", *real()[1:]],
            ["QQQQQQ", "MMMMMM", *real()[2:]],
        ])
        self.patch(postgres, "_codes", lambda: next(candidates))
        got = self.buys([("bob", None, None), ("alice", None, None), ("bob", None, None), ("alice", None, None)])
        self.assertTrue(all(isinstance(t, Ticket) for t in got), got)
        self.assertEqual([t.ticket_id[2:] for t in got[1:]], ["PPPPPP", "QQQQQQ", "MMMMMM"])
        self.assertEqual({t.ticket_id[:2] for t in got}, {day})
        self.assertEqual(self.calls.count(postgres.BUY_BATCH_CALL), 1)
        with psycopg.connect(self.url) as conn:
            rows = conn.execute(
                "SELECT t.ticket_id, t.username, count(l.leg), count(s.seat) FROM tickets t"
                " JOIN ticket_legs l USING (ticket_id) JOIN seats s ON s.ticket_id = t.ticket_id GROUP BY 1, 2"
            ).fetchall()
        self.assertEqual(
            sorted(rows), sorted([(taken, "bob", 1, 1)] + [(t.ticket_id, t.username, 1, 1) for t in got])
        )
