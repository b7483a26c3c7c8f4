"""
A smoke benchmark: C{vendepass-bench} against a real server (the installed
C{twistd vendepass} on a throwaway database of tests/data/mini.json) with
tiny numbers, and its invariant checks failing on a database where a double
sale, or a lost acknowledged purchase, was planted by hand.

No timing asserts: the figures are only checked for their shape.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests import pg
from tests.common import MINI
from tests.test_end_to_end import DEADLINE, Connection, ServerProcess, ServerTestCase
from vendepass.bench.checks import Ack, check_invariants, load_acks
from vendepass.bench.common import login_all
from vendepass.bench.generator import Fleet, Progress, Target

CUSTOMERS = 5
LATENCY_FIELDS = {"count", "p50", "p90", "p99", "max"}
PROTOCOL_CHECKS = {"seat_maps", "purchases_sold", "seat_once", "tickets_listed"}


def copy_ticket(db: sqlite3.Connection, ticket_id: str, new_id: str, username: str) -> None:
    """
    Insert a copy of a ticket and its legs under another id and owner (whatever columns the tables have).
    """
    for table, changes in (("tickets", {"ticket_id": new_id, "username": username}), ("ticket_legs", {"ticket_id": new_id})):
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        for row in db.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE ticket_id = ?", (ticket_id,)).fetchall():
            values = {**dict(zip(columns, row)), **changes}
            db.execute(
                f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})", list(values.values())
            )


class BenchTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.db = str(self.directory / "vendepass.sqlite3")

    def start(self, *args: str, **kwargs: str) -> ServerProcess:
        return super().start("--fixtures", str(MINI), *args, **kwargs)

    def bench(self, *args: str, expect: int = 0) -> dict[str, Any]:
        """
        Run C{python -m vendepass.bench ARGS --json -q}; its report, after checking its exit code.
        """
        result = subprocess.run(
            [sys.executable, "-m", "vendepass.bench", *args, "--json", "-q"], capture_output=True, timeout=DEADLINE * 2
        )
        self.assertEqual(result.returncode, expect, result.stdout + result.stderr)
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def buy(self, server: ServerProcess, *args: str, expect: int = 0) -> dict[str, Any]:
        return self.bench(
            "buy", "--connect", f"tcp:127.0.0.1:{server.port}", "-c", str(CUSTOMERS), "--db", self.db, *args, expect=expect
        )

    def check(self, server: ServerProcess, *args: str, expect: int) -> dict[str, dict[str, Any]]:
        report = self.bench("check", "--connect", f"tcp:127.0.0.1:{server.port}", "-c", str(CUSTOMERS), *args, expect=expect)
        self.assertEqual(report["ok"], expect == 0)
        return {check["name"]: check for check in report["checks"]}

    def assertChecksPassed(self, report: dict[str, Any], names: set[str]) -> None:
        checks = {check["name"]: check for check in report["checks"]}
        self.assertLessEqual(names, set(checks))
        self.assertEqual([c for c in checks.values() if not c["passed"]], [])
        self.assertTrue(report["ok"])

    def test_buy_one_step(self) -> None:
        """
        C{buy} makes exactly C{--count} purchases, reports them with their
        latencies, the server's memory (its pid found from its port) and the
        ceiling's ratios, and its invariant checks pass.
        """
        server = self.start()
        report = self.buy(server, "--count", "30", "--ceiling-duration", "0.2")
        self.assertEqual(report["scenario"], "buy")
        self.assertEqual((report["customers"], report["connected"], report["logged_in"]), (CUSTOMERS,) * 3)
        measure = report["measure"]
        self.assertEqual((measure["unit"], measure["operations"], measure["concurrency"]), ("purchases", 30, CUSTOMERS))
        self.assertEqual(set(measure["latency"]), LATENCY_FIELDS)
        self.assertEqual(measure["by_op"]["buy"]["count"], measure["requests"])
        self.assertEqual(set(measure["errors"]) - {"sold_out"}, set())
        self.assertEqual(report["server"]["pid"], server.process.pid)
        self.assertGreater(report["server"]["peak_rss_kb"], 0)
        self.assertGreater(report["ceiling"]["operations"], 0)
        self.assertEqual(set(report["ratios"]), {"throughput", "p99"})
        self.assertChecksPassed(report, PROTOCOL_CHECKS | {"admin_verify"})

    def test_two_servers_on_postgres(self) -> None:
        """
        With C{--also-connect}, customers are dealt out to two servers that
        share one PostgreSQL database, and the invariant checks (through
        both servers' data, and C{vendepass-admin verify} on the database)
        pass.
        """
        url = pg.fresh_url(self)
        first, second = self.start("--db", url), self.start("--db", url)
        report = self.bench(
            "buy", "--connect", f"tcp:127.0.0.1:{first.port}", "--also-connect", f"tcp:127.0.0.1:{second.port}",
            "-c", str(CUSTOMERS), "--db", url, "--count", "30", "--no-ceiling",
        )
        self.assertEqual(report["measure"]["operations"], 30, report["measure"])
        self.assertEqual(report["server"]["pid"], first.process.pid)
        self.assertChecksPassed(report, PROTOCOL_CHECKS | {"admin_verify"})

    def test_hold_buy_and_a_planted_double_sale(self) -> None:
        """
        After a clean C{buy --mode hold-buy}, a second active ticket planted
        in the database for a seat already sold makes C{check} fail (exit 1),
        naming the seat: through the protocol, and with vendepass-admin verify.
        """
        server = self.start()
        acks_file = str(self.directory / "acks.json")
        report = self.buy(server, "--count", "12", "--mode", "hold-buy", "--no-ceiling", "--save-acks", acks_file)
        self.assertEqual(report["measure"]["operations"], 12)
        self.assertEqual(report["measure"]["by_op"]["buy_hold"]["count"], 12)
        self.assertIsNone(report["ceiling"])
        self.assertChecksPassed(report, PROTOCOL_CHECKS | {"admin_verify"})
        acks = load_acks(acks_file)
        self.assertEqual(len(acks), 12)
        self.check(server, "--acks", acks_file, "--db", self.db, expect=0)

        server.kill()
        sold = acks[0]
        (flight, seat), = sold.seats
        thief = next(f"bench{i}" for i in range(CUSTOMERS) if f"bench{i}" != sold.username)
        with sqlite3.connect(self.db) as db:
            copy_ticket(db, sold.ticket_id, "PLANTED2", thief)
        server = self.start()

        checks = self.check(server, "--acks", acks_file, "--db", self.db, expect=1)
        self.assertFalse(checks["seat_once"]["passed"])
        self.assertIn(f"seat {seat} on {flight}", checks["seat_once"]["details"][0])
        self.assertIn("PLANTED2", checks["seat_once"]["details"][0])
        self.assertFalse(checks["admin_verify"]["passed"])
        self.assertIn(f"PLANTED2: seat {seat} on {flight}", "\n".join(checks["admin_verify"]["details"]))
        self.assertTrue(checks["tickets_listed"]["passed"])
        # Through the protocol alone too.
        self.assertFalse(self.check(server, expect=1)["seat_once"]["passed"])

    def test_a_lost_acknowledged_purchase(self) -> None:
        """
        An acknowledged purchase deleted from the database makes C{check
        --acks} fail (exit 1), naming the ticket and its seat.
        """
        server = self.start()
        acks_file = str(self.directory / "acks.json")
        self.buy(server, "--count", "10", "--no-ceiling", "--save-acks", acks_file)
        lost = load_acks(acks_file)[-1]
        (flight, seat), = lost.seats
        server.kill()
        with sqlite3.connect(self.db) as db:
            for table in ("seats", "ticket_legs", "tickets"):
                db.execute(f"DELETE FROM {table} WHERE ticket_id = ?", (lost.ticket_id,))
        server = self.start()

        checks = self.check(server, "--acks", acks_file, "--db", self.db, expect=1)
        self.assertIn(f"{lost.ticket_id} (seat {seat} on {flight}) is missing", checks["tickets_listed"]["details"][0])
        self.assertIn(f"seat {seat} on {flight} of acknowledged ticket {lost.ticket_id}", checks["purchases_sold"]["details"][0])
        self.assertIn("free", checks["purchases_sold"]["details"][0])
        self.assertFalse(checks["admin_verify"]["passed"])
        self.assertTrue(checks["seat_once"]["passed"])

    def test_flash_sale_sells_exactly_the_capacity(self) -> None:
        """
        20 customers racing for a 4-seat flight: 4 sold, 16 sold_out, everyone answered.
        """
        server = self.start()
        customer = Connection(server.port)
        self.addCleanup(customer.close)
        soon = datetime.now(timezone.utc) + timedelta(hours=3)
        itineraries = customer.call(2, {"origin": "SSA", "destination": "REC", "max_legs": 1, "limit": 500})["itineraries"]
        flight = next(
            i["legs"][0]["flight"] for i in itineraries
            if i["legs"][0]["aircraft"] == "TINY" and datetime.fromisoformat(i["departure"]) > soon
        )
        report = self.bench("flash-sale", "--connect", f"tcp:127.0.0.1:{server.port}", "-c", "20", "--flight", flight,
                            "--db", self.db, "--ceiling-duration", "0.2")
        figures = report["figures"]
        self.assertEqual(figures["flight"], flight)
        self.assertEqual((figures["capacity"], figures["free_before"], figures["sold"]), (4, 4, 4))
        self.assertEqual((figures["sent"], figures["answered"]), (20, 20))
        self.assertEqual(report["measure"]["errors"], {"sold_out": 16})
        self.assertIn("spread_ms", figures)
        self.assertChecksPassed(report, {"flash_sale_sold", "everyone_answered", "admin_verify"} | PROTOCOL_CHECKS)

    def test_ceiling(self) -> None:
        """
        C{ceiling} starts its own echo server and drives it with the same generator.
        """
        report = self.bench("ceiling", "-c", "5", "--count", "500")
        self.assertEqual(report["scenario"], "ceiling")
        self.assertEqual((report["measure"]["operations"], report["measure"]["requests"]), (500, 500))
        self.assertEqual(report["measure"]["errors"], {})
        self.assertGreater(report["server"]["rss_kb"], 0)
        self.assertEqual(report["checks"], [])

    def test_usage_and_connection_errors(self) -> None:
        """
        Exit code 2 for a bad option, and for a server that is not there.
        """
        result = subprocess.run([sys.executable, "-m", "vendepass.bench", "buy", "--mode", "twice"],
                                capture_output=True, timeout=DEADLINE)
        self.assertEqual(result.returncode, 2)
        server = self.start()
        port = server.port
        server.kill()
        report = self.bench("browse", "--connect", f"tcp:127.0.0.1:{port}", "-c", "2", expect=2)
        self.assertIn("connection_refused", report["error"])

    def test_seats_per_flight_cap(self) -> None:
        """
        Against a server that caps one customer's seats on a flight, a
        customer at the cap buys on another flight instead of asking again
        flat out: all of C{--count} is bought, every refusal is counted.
        """
        server = self.start("--max-seats-per-flight", "2")
        report = self.buy(server, "-c", "2", "--count", "12", "--no-ceiling", "--user-prefix", "capped")
        measure = report["measure"]
        self.assertEqual(measure["operations"], 12, measure)
        self.assertEqual(set(measure["errors"]) - {"sold_out", "purchase_limit"}, set())
        self.assertLess(measure["errors"].get("purchase_limit", 0), 100, measure)
        self.assertChecksPassed(report, PROTOCOL_CHECKS | {"admin_verify"})

    def test_registration_limit_is_named(self) -> None:
        """
        A server that limits registrations per address cannot give the bench
        its customers: exit code 2, saying which option to set, rather than
        a figure for fewer customers than asked.
        """
        server = self.start("--max-registrations-per-ip", "2")
        report = self.buy(server, "--count", "10", "--no-ceiling", "--user-prefix", "limited", expect=2)
        self.assertIn("could not register", report["error"])
        self.assertIn("--max-registrations-per-ip 0", report["error"])

    def test_check_function(self) -> Deferred[None]:
        """
        L{check_invariants} in process: an acknowledged purchase the server
        never made fails C{purchases_sold} and C{tickets_listed}.
        """
        server = self.start()

        async def run() -> None:
            fleet = Fleet(reactor, Target.parse(reactor, f"tcp:127.0.0.1:{server.port}"), Progress(reactor, enabled=False))
            self.addCleanup(fleet.close)
            customers = await login_all(fleet, await fleet.connect(2), "fn", "fn-password")
            self.assertEqual([c.username for c in customers], ["fn0", "fn1"])
            seatmap = await customers[0].ok(8, {"flight": f"VP200-{(datetime.now() + timedelta(days=2)):%Y-%m-%d}"})
            ghost = Ack("fn0", "GHOST123", ((seatmap["flight"]["flight"], "1A"),))
            checks = {c.name: c for c in await check_invariants(reactor, customers, [ghost], db=self.db)}
            self.assertFalse(checks["purchases_sold"].passed)
            self.assertIn("seat 1A on", checks["purchases_sold"].details[0])
            self.assertFalse(checks["tickets_listed"].passed)
            self.assertTrue(checks["seat_once"].passed)
            self.assertTrue(checks["admin_verify"].passed)

        return Deferred.fromCoroutine(run())


class TargetTests(SynchronousTestCase):
    def test_dealt_out(self) -> None:
        """
        Customers are dealt out to the targets in turn, each target
        spreading its own share over source addresses.
        """
        first = Target.parse(reactor, "tcp:127.0.0.1:1001", per_address=2)
        target = first.with_others([Target.parse(reactor, "tcp:127.0.0.1:1002", per_address=2)])
        endpoints = [target.endpoint(reactor, i) for i in range(6)]
        self.assertEqual([e._port for e in endpoints], [1001, 1002] * 3)  # type: ignore[attr-defined]
        self.assertEqual(
            [e._bindAddress[0] for e in endpoints],  # type: ignore[attr-defined]
            ["127.0.1.1", "127.0.1.1", "127.0.1.1", "127.0.1.1", "127.0.1.2", "127.0.1.2"],
        )


class ProcessStatusTests(SynchronousTestCase):
    """
    What the benchmark reads of a server from C{/proc}.
    """

    def test_children_counted(self) -> None:
        """
        A server's live descendants (the SQLite writer process) are part of
        it: their CPU time and memory are added in, and counted.
        """
        from vendepass.bench.procinfo import read_status

        alone = read_status(os.getpid())
        assert alone is not None
        # A child that burns a little CPU, then waits to be read.
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nt = time.process_time()\n"
             "while time.process_time() - t < 0.3: pass\nprint(flush=True)\nsys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdin.close)  # type: ignore[union-attr]
        child.stdout.readline()  # type: ignore[union-attr]
        both = read_status(os.getpid())
        assert both is not None
        self.assertEqual(both.processes, alone.processes + 1)
        self.assertGreaterEqual(both.cpu_seconds - alone.cpu_seconds, 0.25)
        self.assertGreater(both.rss_kb, alone.rss_kb)
        self.assertIsNone(read_status(None))
