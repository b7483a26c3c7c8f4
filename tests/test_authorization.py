"""
Object-level authorization (RELIABILITY-PLAN T12) and password hashing off the
reactor (T13).

The matrix: for every operation that takes an id (buy and release with
C{hold_id}, cancel with C{ticket_id}, seatmap with C{flight}), bob (and an
anonymous connection) try alice's ids in every state they can be in, a
missing but well-formed id, and ill-typed ids. Another user's id must get
exactly the reply a missing id gets (only the echoed id differs), ill-typed
ids an C{invalid_request} naming the field, and nothing of alice's may change.
C{tickets} never lists another user's ticket and the seat map's C{mine} never
marks another user's seat. Failures are collected per cell, so one run shows
the whole matrix.

The matrix runs on the synchronous harness of L{tests.common}. The heartbeat
test (T13) runs on the real reactor, with production-cost scrypt on a
two-thread executor, and uses real time only to measure.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from attrs import field, frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from tests.common import ALICE, BIG, BOB, MINI, START, TINY, LineClient, make_service
from vendepass.errors import BadCredentials, echo
from vendepass.fixtures import load
from vendepass.passwords import ScryptHasher
from vendepass.service import ReservationService
from vendepass.store import ThreadExecutor
from vendepass.store.sqlite import SQLiteStore

JSON = dict[str, Any]

HOLD_SECONDS = 600
CAROL = ("carol", "carol-password")
# TINY leaves Salvador at 08:00 (-03:00) on TOMORROW: 11:00 UTC, 26 h after START.
TINY_DEPARTS_IN = 26 * 3600.0

# Well-formed ids that name nothing: the shapes the server hands out
# (C{"H"} + 16 hex digits; 8 characters of the booking-code alphabet).
MISSING_HOLD = "H0123456789abcdef"
MISSING_TICKET = "ZZZZ2345"
MISSING_FLIGHTS = ["VP999-2026-12-02", "VP300-2026-12-02"]  # no such number; VP300 does not fly that day

# Strings that are the right type but name nothing. The server may treat them
# like a missing id, or refuse them as an invalid_request naming the field.
GARBAGE_STRINGS = [
    "",
    " ",
    "garbage-\u2708-\u00fcml\u00e4\u00fct-\U0001f600",
    "' OR '1'='1",
    "%",
    "\x00\x01\x7f",
    "x" * 1000,
]

# Values of the wrong JSON type: always invalid_request naming the field.
ILL_TYPED: list[Any] = [-1, 0, 10**30, -(10**30), 1.5, True, False, None, [], {}]

SENTINEL = "<ID>"


def ill_typed(real_id: str) -> list[Any]:
    """
    The ill-typed values, plus the real id wrapped in a list and an object.
    """
    return [*ILL_TYPED, [real_id], {"id": real_id}, {"hold_id": real_id, "ticket_id": real_id}]


def normalise(value: Any, ident: str) -> Any:
    """
    C{value} with every mention of C{ident} (as a whole string, its repr or
    its JSON form inside a longer string) replaced by L{SENTINEL}.
    """
    if isinstance(value, dict):
        return {k: normalise(v, ident) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, ident) for v in value]
    if isinstance(value, str):
        # (Errors echo a long id shortened: that form is the id too.)
        for shown in dict.fromkeys([ident, echo(ident)]):
            if value == shown:
                return SENTINEL
            for form in (repr(shown), json.dumps(shown), json.dumps(shown, ensure_ascii=False)):
                value = value.replace(form, SENTINEL)
            if shown.strip():
                value = value.replace(shown, SENTINEL)
        return value
    return value


def ask(client: LineClient, opcode: int, data: Any) -> JSON:
    """
    Send one request (always with id C{"q"}) and return its one response,
    without the echoed id.
    """
    raw = json.dumps({"id": "q", "opcode": opcode, "data": data}).encode() + b"\n"
    replies = [m for m in client.feed(raw) if "event" not in m]
    assert len(replies) == 1, replies
    reply = dict(replies[0])
    assert reply.pop("id") == "q", replies
    return reply


class Matrix(SynchronousTestCase):
    """
    alice and bob with holds and tickets in every state; carol with nothing.

    alice:
      - C{alice_live}: a live hold of TINY 1A (alice also sees it from her
        second connection);
      - C{alice_expired}: an expired hold (BIG 5A);
      - C{alice_bought}: a hold bought (BIG 2A, ticket C{alice_from_hold});
      - C{alice_released}: a released hold (BIG 2B);
      - C{alice_active}: an active ticket (BIG 1A);
      - C{alice_cancelled}: a cancelled ticket (BIG 1B).
    bob: a live hold of TINY 2A and an active ticket of BIG 3A.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(hold_seconds=HOLD_SECONDS, clock=self.clock)
        self.addCleanup(self.service.stopService)
        self.alice = self.connect(ALICE)
        self.alice2 = self.connect(ALICE)
        self.bob = self.connect(BOB)
        self.anon = self.connect()
        self.anon.ok(10, {"username": CAROL[0], "password": CAROL[1]})
        self.carol = self.connect(CAROL)

        self.alice_expired = self.hold(self.alice, BIG, "5A")
        self.clock.advance(HOLD_SECONDS + 1)
        self.assertEqual(
            self.alice.events("hold_expired"), [{"event": "hold_expired", "data": {"hold_id": self.alice_expired}}]
        )
        self.alice_live = self.hold(self.alice, TINY, "1A")
        self.alice_bought = self.hold(self.alice, BIG, "2A")
        self.alice_from_hold = self.alice.ok(3, {"hold_id": self.alice_bought})["ticket"]["ticket_id"]
        self.alice_released = self.hold(self.alice, BIG, "2B")
        self.alice.ok(7, {"hold_id": self.alice_released})
        self.alice_active = self.buy(self.alice, BIG, "1A")
        self.alice_cancelled = self.buy(self.alice, BIG, "1B")
        self.alice.ok(5, {"ticket_id": self.alice_cancelled})

        self.bob_live = self.hold(self.bob, TINY, "2A")
        self.bob_active = self.buy(self.bob, BIG, "3A")

        # Who has what: {flight: {seat: (status, owner)}}.
        self.truth: dict[str, dict[str, tuple[str, str]]] = {
            TINY: {"1A": ("held", "alice"), "2A": ("held", "bob")},
            BIG: {"1A": ("sold", "alice"), "2A": ("sold", "alice"), "3A": ("sold", "bob")},
        }
        self.alice_tickets = self.alice.ok(4)["tickets"]
        self.bob_tickets = self.bob.ok(4)["tickets"]
        self.assertEqual(
            [t["ticket_id"] for t in self.alice_tickets],
            [self.alice_cancelled, self.alice_active, self.alice_from_hold],  # newest first
        )
        self.assertEqual([t["ticket_id"] for t in self.bob_tickets], [self.bob_active])
        self.problems: list[str] = []

    # -- helpers --------------------------------------------------------------

    def connect(self, user: tuple[str, str] | None = None) -> LineClient:
        client = LineClient(self.service)
        client.messages()
        if user is not None:
            client.login(user)
        return client

    def hold(self, client: LineClient, flight: str, seat: str) -> str:
        hold_id: str = client.ok(6, {"flights": [flight], "seats": [seat]})["hold"]["hold_id"]
        return hold_id

    def buy(self, client: LineClient, flight: str, seat: str) -> str:
        ticket_id: str = client.ok(3, {"flights": [flight], "seats": [seat]})["ticket"]["ticket_id"]
        return ticket_id

    def problem(self, cell: str, text: str) -> None:
        self.problems.append(f"{cell}: {text}")

    def assertNoProblems(self) -> None:
        self.assertEqual(self.problems, [], "\n" + "\n".join(self.problems))

    def statuses(self, client: LineClient, flight: str) -> dict[str, tuple[str, bool]]:
        return {s["seat"]: (s["status"], s["mine"]) for s in client.ok(8, {"flight": flight})["seats"]}

    def check_untouched(self, cell: str) -> None:
        """
        (c), (d), (e): nothing of alice's or bob's changed, nobody lists
        another's ticket, nobody's seat map marks another's seat as theirs.
        """
        for client, name, expected in [
            (self.alice, "alice", self.alice_tickets),
            (self.alice2, "alice", self.alice_tickets),
            (self.bob, "bob", self.bob_tickets),
            (self.carol, "carol", []),
        ]:
            tickets = client.ok(4)["tickets"]
            if tickets != expected:
                self.problem(cell, f"{name}'s tickets changed: {tickets} != {expected}")
        for flight, seats in self.truth.items():
            viewers: list[tuple[LineClient, str | None]] = [
                (self.alice, "alice"),
                (self.alice2, "alice"),
                (self.bob, "bob"),
                (self.carol, "carol"),
                (self.anon, None),
            ]
            for client, viewer in viewers:
                seen = self.statuses(client, flight)
                for seat, (status, mine) in seen.items():
                    want_status, owner = seats.get(seat, ("free", None))
                    if status != want_status:
                        self.problem(cell, f"{flight} {seat} is {status} for {viewer}, not {want_status}")
                    if mine != (owner is not None and owner == viewer):
                        self.problem(cell, f"{flight} {seat} of {owner} has mine={mine} for {viewer}")

    # -- reply checks ------------------------------------------------------------

    def check_same(self, cell: str, reply: JSON, ident: str, reference: JSON, reference_id: str) -> None:
        """
        (a): C{reply} (for C{ident}) is C{reference} (for C{reference_id}),
        apart from the id itself.
        """
        if normalise(reply, ident) != normalise(reference, reference_id):
            self.problem(cell, f"reply {reply} differs from the missing id's {reference}")

    def check_invalid(self, cell: str, reply: JSON, field_name: str) -> None:
        """
        (b): an C{invalid_request} naming C{field_name}.
        """
        error = reply.get("error", {})
        if reply.get("ok") is not False or error.get("code") != "invalid_request" or error.get("field") != field_name:
            self.problem(cell, f"expected invalid_request naming {field_name!r}, got {reply}")

    def check_garbage(self, cell: str, reply: JSON, ident: str, reference: JSON, reference_id: str, name: str) -> None:
        """
        A well-typed id that names nothing: like a missing id, or an
        C{invalid_request} naming the field.
        """
        error = reply.get("error", {})
        if error.get("code") == "invalid_request" and error.get("field") == name:
            return
        self.check_same(cell, reply, ident, reference, reference_id)


class HoldIdTests(Matrix):
    """
    buy and release with C{hold_id}.
    """

    def test_other_users_holds(self) -> None:
        """
        alice's holds, live, expired, bought or released, are to bob what a
        hold that never existed is: C{hold_not_found}, the same words.
        """
        for opcode, name in [(3, "buy"), (7, "release")]:
            missing = ask(self.bob, opcode, {"hold_id": MISSING_HOLD})
            self.assertEqual(missing["ok"], False)
            self.assertEqual(
                (missing["error"]["code"], missing["error"].get("hold_id")), ("hold_not_found", MISSING_HOLD)
            )
            for state, hold_id in [
                ("live", self.alice_live),
                ("expired", self.alice_expired),
                ("bought", self.alice_bought),
                ("released", self.alice_released),
                ("live, upper case", self.alice_live.upper()),
                ("live, trailing space", self.alice_live + " "),
            ]:
                cell = f"bob {name} alice's {state} hold"
                self.check_same(cell, ask(self.bob, opcode, {"hold_id": hold_id}), hold_id, missing, MISSING_HOLD)
                self.check_untouched(cell)
            # The same through carol, who has never held anything.
            cell = f"carol {name} alice's live hold"
            carol_missing = ask(self.carol, opcode, {"hold_id": MISSING_HOLD})
            self.assertEqual(carol_missing, missing)
            self.check_same(cell, ask(self.carol, opcode, {"hold_id": self.alice_live}), self.alice_live, missing, MISSING_HOLD)
            self.check_untouched(cell)
        self.assertNoProblems()

    def test_bad_hold_ids(self) -> None:
        for opcode, name in [(3, "buy"), (7, "release")]:
            missing = ask(self.bob, opcode, {"hold_id": MISSING_HOLD})
            for garbage in GARBAGE_STRINGS:
                cell = f"bob {name} hold_id={garbage[:40]!r}"
                reply = ask(self.bob, opcode, {"hold_id": garbage})
                self.check_garbage(cell, reply, garbage, missing, MISSING_HOLD, "hold_id")
            for value in ill_typed(self.alice_live):
                cell = f"bob {name} hold_id={value!r}"
                self.check_invalid(cell, ask(self.bob, opcode, {"hold_id": value}), "hold_id")
                # From alice too: her own id in a list is no id.
                cell = f"alice {name} hold_id={value!r}"
                self.check_invalid(cell, ask(self.alice, opcode, {"hold_id": value}), "hold_id")
            self.check_untouched(f"after bad {name} hold ids")
        self.assertNoProblems()

    def test_anonymous(self) -> None:
        """
        Before login every id gets the same refusal, byte for byte.
        """
        for opcode in (3, 7):
            expected = ask(self.anon, opcode, {"hold_id": MISSING_HOLD})
            self.assertEqual(expected["error"]["code"], "not_logged_in")
            for value in [self.alice_live, self.alice_expired, self.bob_live, *GARBAGE_STRINGS, *ill_typed(self.alice_live)]:
                reply = ask(self.anon, opcode, {"hold_id": value})
                if reply != expected:
                    self.problem(f"anonymous opcode {opcode} hold_id={value!r}", f"{reply} != {expected}")
        self.check_untouched("anonymous")
        self.assertNoProblems()

    def test_owner_still_can(self) -> None:
        """
        After all of bob's attempts alice's live hold is still hers: she buys
        it from her second connection; bob's own hold still works for him.
        """
        for opcode in (3, 7):
            for value in [self.alice_live, self.alice_expired, *GARBAGE_STRINGS, *ill_typed(self.alice_live)]:
                ask(self.bob, opcode, {"hold_id": value})
        self.check_untouched("after every attempt")
        self.assertNoProblems()
        ticket = self.alice2.ok(3, {"hold_id": self.alice_live})["ticket"]
        self.assertEqual([(leg["flight"], leg["seat"]) for leg in ticket["legs"]], [(TINY, "1A")])
        self.assertEqual(self.bob.ok(7, {"hold_id": self.bob_live}), {})
        # Now bought: to bob, still the same as a missing hold.
        missing = ask(self.bob, 3, {"hold_id": MISSING_HOLD})
        reply = ask(self.bob, 3, {"hold_id": self.alice_live})
        self.assertEqual(normalise(reply, self.alice_live), normalise(missing, MISSING_HOLD))
        # For the owner, an expired hold says so (which bob must never learn).
        self.assertEqual(ask(self.alice, 7, {"hold_id": self.alice_expired})["error"]["code"], "hold_expired")


class TicketIdTests(Matrix):
    """
    cancel with C{ticket_id}.
    """

    def test_other_users_tickets(self) -> None:
        missing = ask(self.bob, 5, {"ticket_id": MISSING_TICKET})
        self.assertEqual(
            (missing["error"]["code"], missing["error"].get("ticket_id")), ("ticket_not_found", MISSING_TICKET)
        )
        for state, ticket_id in [
            ("active", self.alice_active),
            ("cancelled", self.alice_cancelled),
            ("bought from a hold", self.alice_from_hold),
            ("active, lower case", self.alice_active.lower()),
            ("active, trailing space", self.alice_active + " "),
        ]:
            for client, who in [(self.bob, "bob"), (self.carol, "carol")]:
                cell = f"{who} cancel alice's {state} ticket"
                reply = ask(client, 5, {"ticket_id": ticket_id})
                self.check_same(cell, reply, ticket_id, missing, MISSING_TICKET)
                self.check_untouched(cell)
        self.assertNoProblems()

    def test_bad_ticket_ids(self) -> None:
        missing = ask(self.bob, 5, {"ticket_id": MISSING_TICKET})
        for garbage in GARBAGE_STRINGS:
            cell = f"bob cancel ticket_id={garbage[:40]!r}"
            self.check_garbage(cell, ask(self.bob, 5, {"ticket_id": garbage}), garbage, missing, MISSING_TICKET, "ticket_id")
        for value in ill_typed(self.alice_active):
            for client, who in [(self.bob, "bob"), (self.alice, "alice")]:
                cell = f"{who} cancel ticket_id={value!r}"
                self.check_invalid(cell, ask(client, 5, {"ticket_id": value}), "ticket_id")
        self.check_untouched("after bad ticket ids")
        self.assertNoProblems()

    def test_anonymous(self) -> None:
        expected = ask(self.anon, 5, {"ticket_id": MISSING_TICKET})
        self.assertEqual(expected["error"]["code"], "not_logged_in")
        for value in [self.alice_active, self.alice_cancelled, self.bob_active, *GARBAGE_STRINGS, *ill_typed("x")]:
            reply = ask(self.anon, 5, {"ticket_id": value})
            if reply != expected:
                self.problem(f"anonymous cancel ticket_id={value!r}", f"{reply} != {expected}")
        self.check_untouched("anonymous")
        self.assertNoProblems()

    def test_departed(self) -> None:
        """
        Once a flight has departed its owner hears C{flight_departed}; bob
        still hears nothing but C{ticket_not_found}.
        """
        early = self.buy(self.alice, TINY, "2B")
        self.clock.advance(TINY_DEPARTS_IN)
        # Connections may have been closed for idleness meanwhile: new ones.
        self.alice, self.bob = self.connect(ALICE), self.connect(BOB)
        self.assertEqual(ask(self.alice, 5, {"ticket_id": early})["error"]["code"], "flight_departed")
        missing = ask(self.bob, 5, {"ticket_id": MISSING_TICKET})
        self.check_same("bob cancel alice's departed ticket", ask(self.bob, 5, {"ticket_id": early}), early, missing, MISSING_TICKET)
        self.assertNoProblems()
        self.assertEqual(
            [t["status"] for t in self.alice.ok(4)["tickets"]], ["active", "cancelled", "active", "active"]
        )
        self.assertEqual(self.bob.ok(4)["tickets"], self.bob_tickets)

    def test_owner_still_can(self) -> None:
        for value in [self.alice_active, self.alice_cancelled, *GARBAGE_STRINGS, *ill_typed(self.alice_active)]:
            ask(self.bob, 5, {"ticket_id": value})
        self.check_untouched("after every attempt")
        self.assertNoProblems()
        # The owner, from her other connection, can still cancel it and is
        # told when it is already cancelled (bob never is).
        self.assertEqual(self.alice2.ok(5, {"ticket_id": self.alice_active})["ticket"]["status"], "cancelled")
        self.assertEqual(ask(self.alice, 5, {"ticket_id": self.alice_active})["error"]["code"], "already_cancelled")
        self.assertEqual(self.bob.ok(5, {"ticket_id": self.bob_active})["ticket"]["status"], "cancelled")


class SeatmapTests(Matrix):
    """
    seatmap with C{flight}: flights are public, but C{mine} is personal.
    """

    def test_mine_is_personal(self) -> None:
        """
        Everyone sees the same statuses; C{mine} only on one's own seats.
        """
        self.check_untouched("seat maps")
        self.assertNoProblems()
        maps = {}
        for client, name in [(self.alice, "alice"), (self.bob, "bob"), (self.anon, "anonymous"), (self.carol, "carol")]:
            reply = ask(client, 8, {"flight": BIG})
            self.assertTrue(reply["ok"], reply)
            maps[name] = reply["data"]
        without_mine = {
            name: {**data, "seats": [{**s, "mine": None} for s in data["seats"]]} for name, data in maps.items()
        }
        self.assertEqual(without_mine["alice"], without_mine["bob"])
        self.assertEqual(without_mine["alice"], without_mine["anonymous"])
        self.assertEqual(without_mine["alice"], without_mine["carol"])
        mine = {name: sorted(s["seat"] for s in data["seats"] if s["mine"]) for name, data in maps.items()}
        self.assertEqual(mine, {"alice": ["1A", "2A"], "bob": ["3A"], "anonymous": [], "carol": []})

    def test_mine_follows_login(self) -> None:
        """
        A connection that switches user sees the new user's seats as its own,
        no longer the old user's.
        """
        self.bob.login(ALICE)
        self.truth[TINY].pop("2A")  # switching user released bob's hold
        statuses = self.statuses(self.bob, BIG)
        self.assertEqual(statuses["1A"], ("sold", True))
        self.assertEqual(statuses["3A"], ("sold", False))
        self.bob.ok(9)
        self.assertEqual(self.statuses(self.bob, BIG)["1A"], ("sold", False))

    def test_bad_flights(self) -> None:
        missing = ask(self.bob, 8, {"flight": MISSING_FLIGHTS[0]})
        self.assertEqual(
            (missing["error"]["code"], missing["error"].get("flight")), ("unknown_flight", MISSING_FLIGHTS[0])
        )
        for flight in MISSING_FLIGHTS[1:]:
            self.check_same(f"seatmap {flight}", ask(self.bob, 8, {"flight": flight}), flight, missing, MISSING_FLIGHTS[0])
        for garbage in GARBAGE_STRINGS:
            for client, who in [(self.bob, "bob"), (self.anon, "anonymous")]:
                cell = f"{who} seatmap flight={garbage[:40]!r}"
                reply = ask(client, 8, {"flight": garbage})
                self.check_garbage(cell, reply, garbage, missing, MISSING_FLIGHTS[0], "flight")
        for value in ill_typed(BIG):
            for client, who in [(self.bob, "bob"), (self.anon, "anonymous")]:
                self.check_invalid(f"{who} seatmap flight={value!r}", ask(client, 8, {"flight": value}), "flight")
        self.check_untouched("after bad flights")
        self.assertNoProblems()


class TicketListTests(Matrix):
    """
    (d) C{tickets} lists the caller's tickets only, whatever the request says.
    """

    def test_tickets_ignore_data(self) -> None:
        """
        The server acts as the user logged in, never as one named in the
        request.
        """
        for data in [
            {"username": "alice"},
            {"user": "alice"},
            {"ticket_id": self.alice_active},
            {"owner": "alice", "username": "alice", "as": "alice"},
        ]:
            self.assertEqual(self.bob.ok(4, data), {"tickets": self.bob_tickets})
            self.assertEqual(self.carol.ok(4, data), {"tickets": []})
        self.check_untouched("tickets with data")
        self.assertNoProblems()

    def test_acts_as_logged_in_user_only(self) -> None:
        """
        Naming alice in a buy, hold or cancel does not act as alice.
        """
        reply = ask(self.bob, 5, {"ticket_id": self.alice_active, "username": "alice"})
        self.assertEqual(reply["error"]["code"], "ticket_not_found")
        reply = ask(self.bob, 7, {"hold_id": self.alice_live, "username": "alice"})
        self.assertEqual(reply["error"]["code"], "hold_not_found")
        ticket = self.bob.ok(3, {"flights": [BIG], "seats": ["4A"], "username": "alice"})["ticket"]
        self.truth[BIG]["4A"] = ("sold", "bob")
        self.bob_tickets = [ticket, *self.bob_tickets]
        self.check_untouched("naming alice")
        self.assertNoProblems()


class RequestIdTests(Matrix):
    """
    C{request_id} keys are per user (docs/protocol.md, "Safe retries"): bob
    using alice's keys never replays her outcomes, nor learns she used them.
    """

    def test_keys_are_per_user(self) -> None:
        alice_ticket = self.alice.ok(3, {"flights": [BIG], "seats": ["6A"], "request_id": "k-buy"})["ticket"]
        alice_hold = self.alice.ok(6, {"flights": [BIG], "seats": ["6B"], "request_id": "k-hold"})["hold"]
        self.alice.ok(5, {"ticket_id": self.alice_active, "request_id": "k-cancel"})
        extra = self.hold(self.alice, BIG, "6C")
        self.alice.ok(7, {"hold_id": extra, "request_id": "k-release"})
        self.alice.ok(6, {"flights": [BIG], "seats": ["6D"], "request_id": "alice-only-hold"})
        self.alice.ok(3, {"flights": [BIG], "seats": ["6E"], "request_id": "alice-only-buy"})
        self.truth[BIG].update(
            {"6A": ("sold", "alice"), "6B": ("held", "alice"), "6D": ("held", "alice"), "6E": ("sold", "alice")}
        )
        self.truth[BIG].pop("1A")
        self.alice_tickets = self.alice.ok(4)["tickets"]
        self.check_untouched("alice's keyed requests")

        # Same keys, same kinds: bob's own outcomes.
        bob_ticket = self.bob.ok(3, {"flights": [BIG], "seats": ["7A"], "request_id": "k-buy"})["ticket"]
        self.assertNotEqual(bob_ticket["ticket_id"], alice_ticket["ticket_id"])
        self.assertEqual([(leg["flight"], leg["seat"]) for leg in bob_ticket["legs"]], [(BIG, "7A")])
        bob_hold = self.bob.ok(6, {"flights": [BIG], "seats": ["7B"], "request_id": "k-hold"})["hold"]
        self.assertNotEqual(bob_hold["hold_id"], alice_hold["hold_id"])
        self.truth[BIG].update({"7A": ("sold", "bob"), "7B": ("held", "bob")})
        self.bob_tickets = [bob_ticket, *self.bob_tickets]
        for opcode, data, reference in [
            (5, {"ticket_id": MISSING_TICKET, "request_id": "k-cancel"}, {"ticket_id": MISSING_TICKET}),
            (5, {"ticket_id": self.alice_active, "request_id": "k-cancel"}, {"ticket_id": MISSING_TICKET}),
            (7, {"hold_id": MISSING_HOLD, "request_id": "k-release"}, {"hold_id": MISSING_HOLD}),
            (7, {"hold_id": extra, "request_id": "k-release"}, {"hold_id": MISSING_HOLD}),
            # alice used these for other kinds of operation; bob never did
            # (his refused requests above recorded nothing).
            (5, {"ticket_id": MISSING_TICKET, "request_id": "alice-only-hold"}, {"ticket_id": MISSING_TICKET}),
            (7, {"hold_id": MISSING_HOLD, "request_id": "alice-only-buy"}, {"hold_id": MISSING_HOLD}),
            (3, {"hold_id": MISSING_HOLD, "request_id": "k-cancel"}, {"hold_id": MISSING_HOLD}),
            (5, {"ticket_id": MISSING_TICKET, "request_id": "k-release"}, {"ticket_id": MISSING_TICKET}),
        ]:
            cell = f"bob opcode {opcode} {data}"
            reply = ask(self.bob, opcode, data)
            expected = ask(self.carol, opcode, reference)
            [(name, value)] = [(k, v) for k, v in data.items() if k != "request_id"]
            self.check_same(cell, reply, value, expected, reference[name])
            self.check_untouched(cell)
        self.assertNoProblems()


class LoginEnumerationTests(SynchronousTestCase):
    """
    Login refusals do not tell an unknown user from a wrong password: the
    replies are the same bytes, attempt after attempt (also once a throttle,
    if any, engages).
    """

    ATTEMPTS = 8

    def attempts(self, username: str, password: str, logged_in: bool) -> list[bytes]:
        """
        The raw replies to L{ATTEMPTS} logins on a new service's connection.
        """
        clock = Clock()
        clock.advance(START)
        service = make_service(clock=clock)
        self.addCleanup(service.stopService)
        client = LineClient(service)
        client.messages()
        if logged_in:
            client.login(BOB)
        raw = json.dumps({"id": 7, "opcode": 1, "data": {"username": username, "password": password}})
        replies = []
        for _ in range(self.ATTEMPTS):
            client.protocol.dataReceived(raw.encode() + b"\n")
            replies.append(client.transport.value())
            client.transport.clear()
        return replies

    def test_byte_identical(self) -> None:
        cases = [
            ("wrong password", "alice", "bob-password"),
            ("wrong password, other user", "bob", "alice-password"),
            ("unknown user", "zelda", "alice-password"),
            ("unknown user, other password", "zelda", "bob-password"),
            ("malformed username", "Alice!", "alice-password"),
            ("long username", "a" * 40, "alice-password"),
            ("empty password", "alice", ""),
        ]
        replies = {
            f"{case} (logged in: {logged_in})": self.attempts(username, password, logged_in)
            for case, username, password in cases
            for logged_in in (False, True)
        }
        reference = replies["wrong password (logged in: False)"]
        different = {case: sequence for case, sequence in replies.items() if sequence != reference}
        self.assertEqual(different, {}, f"reference: {reference}")
        self.assertEqual(json.loads(reference[0])["error"]["code"], "bad_credentials")


# -- T13: hashing never blocks the reactor ----------------------------------------


class Gauge:
    """
    Counts the hashes running at once, the most at once, and those that ran on
    a given thread (the reactor's).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.calls = 0
        self.on_reactor = 0
        self.reactor_thread: int | None = None

    def reset(self, reactor_thread: int) -> None:
        with self._lock:
            self.current = self.peak = self.calls = self.on_reactor = 0
            self.reactor_thread = reactor_thread

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self.current += 1
            self.calls += 1
            self.peak = max(self.peak, self.current)
            if threading.get_ident() == self.reactor_thread:
                self.on_reactor += 1
        try:
            yield
        finally:
            with self._lock:
                self.current -= 1


@frozen
class CountingHasher(ScryptHasher):
    """
    The production scrypt, counted.
    """

    gauge: Gauge = field(factory=Gauge, eq=False, repr=False)

    def hash(self, password: str) -> str:
        with self.gauge.running():
            return ScryptHasher.hash(self, password)

    def verify(self, password: str, stored: str | None) -> bool:
        with self.gauge.running():
            return ScryptHasher.verify(self, password, stored)


LOGINS = 20
HASH_THREADS = 2
HEARTBEAT = 0.010
MAX_GAP = 0.100


class HeartbeatTests(unittest.TestCase):
    """
    A flood of logins with production-cost scrypt, on the real reactor: the
    reactor keeps its heartbeat, and at most two hashes run at once.
    """

    timeout = 30

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.hasher = CountingHasher()
        self.assertEqual((self.hasher.n, self.hasher.r), (ScryptHasher().n, ScryptHasher().r))
        store = SQLiteStore.open(":memory:", reactor, ThreadExecutor(reactor), lambda: load(MINI), self.hasher.hash)  # type: ignore[arg-type]
        self.service = ReservationService(
            store, reactor, self.hasher, ThreadExecutor(reactor, "hash", threads=HASH_THREADS)  # type: ignore[arg-type]
        )
        # The customers' hashes at creation are start-up work, not counted.
        self.hasher.gauge.reset(threading.get_ident())
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def test_login_flood(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._flood())

    async def _flood(self) -> None:
        beats: list[float] = []
        heartbeat = LoopingCall(lambda: beats.append(time.perf_counter()))
        heartbeat.clock = self.reactor
        heartbeat.start(HEARTBEAT)
        try:
            await deferLater(self.reactor, 0.05)
            attempts = [
                (ALICE[0], ALICE[1]) if i % 2 == 0 else (("alice", "wrong-password") if i % 4 == 1 else ("zelda", "zelda-password"))
                for i in range(LOGINS)
            ]
            sessions = [self.service.open_session(lambda name, data: None) for _ in attempts]
            started = time.perf_counter()
            results = await DeferredList(
                [self.service.login(s, u, p) for s, (u, p) in zip(sessions, attempts)], consumeErrors=True
            )
            flood = (started, time.perf_counter())
            await deferLater(self.reactor, 0.05)
        finally:
            heartbeat.stop()
        for (success, value), (username, password) in zip(results, attempts):
            if (username, password) == ALICE:
                self.assertEqual((success, value), (True, "alice"))
            else:
                self.assertFalse(success)
                assert isinstance(value, Failure), value
                self.assertIsInstance(value.value, BadCredentials)
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        during = [b for b in beats if flood[0] <= b <= flood[1]]
        figures = (
            f"{LOGINS} logins in {flood[1] - flood[0]:.3f} s, {len(beats)} beats ({len(during)} during the flood), "
            f"max gap {max(gaps) * 1000:.1f} ms, hashes {self.hasher.gauge.calls}, at once {self.hasher.gauge.peak}"
        )
        self.assertEqual(self.hasher.gauge.calls, LOGINS, figures)
        self.assertEqual(self.hasher.gauge.on_reactor, 0, figures)
        self.assertLessEqual(self.hasher.gauge.peak, HASH_THREADS, figures)
        self.assertGreaterEqual(self.hasher.gauge.peak, 1, figures)
        # The flood lasted long enough for the heartbeat to mean something.
        self.assertGreater(len(during), 5, figures)
        self.assertLess(max(gaps), MAX_GAP, figures)
        Logger().info("T13 heartbeat: {figures}", figures=figures)

