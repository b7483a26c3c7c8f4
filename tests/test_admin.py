"""
The audit log and C{vendepass-admin verify}.
"""

from __future__ import annotations

import json
import sqlite3
from io import StringIO
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.common import ALICE, BIG, BOB, FAST_HASHER, MINI, START, TINY, LineClient, make_service
from vendepass.admin import main, verify
from vendepass.fixtures import load
from vendepass.service import ReservationService
from vendepass.store import InlineExecutor
from vendepass.store.sqlite import MIGRATIONS, SQLiteStore, create


class VerifyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = str(Path(self.mktemp()).resolve())
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(self.path, clock=self.clock)
        self.db: sqlite3.Connection = self.service.store._db  # type: ignore[attr-defined]

    def busy_day(self) -> dict[str, str]:
        """
        Holds, purchases, a release by disconnect, an expiry and a cancellation.
        """
        alice = LineClient(self.service)
        alice.login(ALICE)
        bob = LineClient(self.service)
        bob.login(BOB)
        kept = alice.ok(3, {"flights": [TINY, BIG], "seats": ["1A", "10C"]})["ticket"]
        hold = alice.ok(6, {"flights": [TINY]})["hold"]
        alice.ok(3, {"hold_id": hold["hold_id"]})
        gone = bob.ok(3, {"flights": [BIG]})["ticket"]
        bob.ok(5, {"ticket_id": gone["ticket_id"]})
        bob.ok(6, {"flights": [TINY]})
        bob.disconnect()
        alice.ok(6, {"flights": [BIG], "seats": ["30F"]})
        self.clock.advance(61)
        alice.ok(6, {"flights": [BIG], "seats": ["29F"]})
        return {"kept": kept["ticket_id"]}

    def test_clean(self) -> None:
        self.busy_day()
        report = verify(self.db)
        self.assertEqual(report.findings, [])
        actions = [row[0] for row in self.db.execute("SELECT action FROM audit ORDER BY seq")]
        self.assertEqual(
            actions, ["buy", "hold", "buy", "buy", "cancel", "hold", "release", "hold", "expire", "hold"]
        )
        self.assertEqual((report.sold, report.held), (3, 1))

    def test_restart_releases_are_audited(self) -> None:
        self.busy_day()
        self.service.stopService()
        reopened = SQLiteStore.open(self.path, Clock(), InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(reopened.stop)
        last = reopened._db.execute("SELECT action FROM audit ORDER BY seq DESC LIMIT 1").fetchone()[0]
        self.assertEqual(last, "release")
        self.assertEqual(verify(reopened._db).findings, [])

    def test_append_only(self) -> None:
        self.busy_day()
        self.assertRaises(sqlite3.IntegrityError, self.db.execute, "DELETE FROM audit")
        self.assertRaises(sqlite3.IntegrityError, self.db.execute, "UPDATE audit SET username = 'mallory'")

    def test_seat_sold_twice(self) -> None:
        """
        A seat given to a second ticket behind the service's back is found.
        """
        kept = self.busy_day()["kept"]
        self.db.execute(
            "INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)"
            " VALUES ('DOUBLE22', 'bob', 'active', 100, 'BRL', 0)"
        )
        self.db.execute(
            "INSERT INTO ticket_legs (ticket_id, leg, flight_id, number, origin, destination, departure, arrival,"
            " seat, price_cents, bought_at) VALUES ('DOUBLE22', 0, ?, 'VP100', 'SSA', 'REC', '', '', '1A', 100, 0)",
            (TINY,),
        )
        self.db.execute("UPDATE seats SET ticket_id = 'DOUBLE22' WHERE flight_id = ? AND seat = '1A'", (TINY,))
        findings = verify(self.db).findings
        self.assertIn(f"seat 1A on {TINY} is sold to DOUBLE22 but the audit log says {kept}", findings)
        self.assertIn(f"ticket {kept}: seat 1A on {TINY} is not sold to it", findings)

    def test_ticket_without_its_seat(self) -> None:
        kept = self.busy_day()["kept"]
        self.db.execute("DELETE FROM seats WHERE ticket_id = ? AND seat = '10C'", (kept,))
        findings = verify(self.db).findings
        self.assertIn(f"ticket {kept}: seat 10C on {BIG} is not sold to it", findings)

    def test_leg_under_another_time_of_sale(self) -> None:
        """
        SQLite finds a ticket's legs by its time of sale: a leg filed under
        another one would be lost to its ticket, and is found.
        """
        kept = self.busy_day()["kept"]
        self.db.execute("UPDATE ticket_legs SET bought_at = bought_at + 1 WHERE ticket_id = ?", (kept,))
        findings = verify(self.db).findings
        self.assertIn(f"ticket {kept}: leg 0 is filed under another time of sale than its ticket's", findings)

    def test_sold_seat_without_ticket(self) -> None:
        kept = self.busy_day()["kept"]
        self.db.execute("UPDATE tickets SET status = 'cancelled' WHERE ticket_id = ?", (kept,))
        findings = verify(self.db).findings
        self.assertIn(f"seat 10C on {BIG} is sold without an active ticket ({kept})", findings)

    def test_seat_count_out_of_step(self) -> None:
        """
        The per-flight count of taken seats (kept by triggers) must agree
        with the seats; seat rows never move.
        """
        self.busy_day()
        self.assertEqual(verify(self.db).findings, [])
        self.db.execute("UPDATE flight_taken SET seats = seats + 1 WHERE flight_id = ?", (BIG,))
        findings = verify(self.db).findings
        [finding] = [f for f in findings if "seat count" in f]
        self.assertIn(f"flight {BIG}: the seat count says", finding)
        self.assertRaises(
            sqlite3.IntegrityError, self.db.execute, "UPDATE seats SET seat = '30F' WHERE flight_id = ?", (BIG,)
        )

    def test_double_sale_in_the_log(self) -> None:
        """
        Two purchases of one seat in the audit log itself are found.
        """
        self.busy_day()
        self.db.execute(
            "INSERT INTO audit (at, username, action, ticket_id, seats) VALUES (0, 'bob', 'buy', 'ZZZZ', ?)",
            (json.dumps([f"{TINY}/1A"]),),
        )
        self.assertTrue(any("sold twice" in f for f in verify(self.db).findings))

    def test_command(self) -> None:
        self.busy_day()
        out = StringIO()
        self.assertEqual(main(["verify", "--db", self.path], out), 0)
        self.assertIn("0 findings", out.getvalue())
        out = StringIO()
        self.assertEqual(main(["verify", "--db", self.path, "--json"], out), 0)
        self.assertTrue(json.loads(out.getvalue())["clean"])
        self.db.execute("DELETE FROM seats")
        out = StringIO()
        self.assertEqual(main(["verify", "--db", self.path], out), 1)
        self.assertIn("FINDING:", out.getvalue())

    def test_summary_plurals(self) -> None:
        """
        The summary line counts in the singular when there is one.
        """
        alice = LineClient(self.service)
        alice.login(ALICE)
        alice.ok(3, {"flights": [TINY], "seats": ["1A"]})
        out = StringIO()
        self.assertEqual(main(["verify", "--db", self.path], out), 0)
        self.assertEqual(out.getvalue(), "1 audit event replayed; 1 ticket, 1 seat sold, 0 held; 0 findings\n")
        self.db.execute("UPDATE flight_taken SET seats = seats + 1 WHERE flight_id = ?", (TINY,))
        out = StringIO()
        self.assertEqual(main(["verify", "--db", self.path], out), 1)
        self.assertEqual(out.getvalue().splitlines()[-1], "1 audit event replayed; 1 ticket, 1 seat sold, 0 held; 1 finding")

    def test_unreadable(self) -> None:
        out = StringIO()
        self.assertEqual(main(["verify", "--db", self.path + ".missing"], out), 2)
        self.assertIn("cannot read", out.getvalue())


class MigrationTests(SynchronousTestCase):
    def test_tickets_of_version_1_are_audited(self) -> None:
        """
        A database made by schema version 1 (no audit log) is migrated, its
        tickets entered in the new audit log, and it verifies clean.
        """
        path = str(Path(self.mktemp()).resolve())
        db = sqlite3.connect(path, isolation_level=None)
        current = MIGRATIONS[:]
        MIGRATIONS[1:] = []
        try:
            create(db, load(MINI), FAST_HASHER.hash, START)
        finally:
            MIGRATIONS[:] = current
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 1)
        db.execute("INSERT INTO tickets VALUES ('OLDTICKT', 'alice', 'active', 25000, 'BRL', ?, NULL)", (START,))
        db.execute("INSERT INTO ticket_legs VALUES ('OLDTICKT', 0, ?, 'VP100', 'SSA', 'REC', '', '', '2B', 25000)",
                   (TINY,))
        db.execute("INSERT INTO seats VALUES (?, '2B', NULL, 'OLDTICKT')", (TINY,))
        db.close()

        clock = Clock()
        clock.advance(START)
        store = SQLiteStore.open(path, clock, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash)
        self.addCleanup(store.stop)
        self.assertEqual(store._db.execute("PRAGMA user_version").fetchone()[0], len(MIGRATIONS))
        self.assertEqual(verify(store._db).findings, [])
        service = ReservationService(store, clock, FAST_HASHER, InlineExecutor())
        alice = LineClient(service)
        alice.login(ALICE)
        self.assertEqual([t["ticket_id"] for t in alice.ok(4)["tickets"]], ["OLDTICKT"])
