"""
Tests for C{twistd vendepass}'s options and service wiring.
"""

from __future__ import annotations

import json
from typing import Any
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.plugin import IPlugin, getPlugins
from twisted.python.usage import UsageError
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.common import MINI
from vendepass.protocol import VendePassFactory
from vendepass.service import ReservationService
from vendepass.tap import Options, makeService, with_backlog


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = str(Path(self.mktemp()).resolve())
        Path(self.db).parent.mkdir(parents=True, exist_ok=True)

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--db", self.db, *args])
        return options

    def test_defaults(self) -> None:
        options = Options()
        options.parseOptions(["--db", self.db])
        self.assertEqual(options["listen"], ["tcp:65432:backlog=4096"])
        self.assertEqual(options["max-batch"], 256)
        self.assertEqual(options["hold-seconds"], 300)
        self.assertEqual(options["sales-window"], 30)
        self.assertIsNone(options["fixtures"])
        # A new database: the bundled fixtures were checked already.
        assert options.fixtures is not None
        self.assertEqual(len(options.fixtures.network.airports), 10)

    def test_default_db_name(self) -> None:
        self.assertEqual(Options()["db"], "vendepass.sqlite3")

    def test_listen_repeatable(self) -> None:
        options = self.parse("--listen", "tcp:0:interface=127.0.0.1", "--listen", r"tcp:0:interface=\:\:1")
        self.assertEqual(
            options["listen"],
            ["tcp:0:interface=127.0.0.1:backlog=4096", r"tcp:0:interface=\:\:1:backlog=4096"],
        )

    def test_backlog(self) -> None:
        """
        --backlog applies to tcp, tcp6 and ssl endpoints that do not set their
        own, and to no other kind.
        """
        options = self.parse(
            "--backlog", "1000",
            "--listen", "tcp:0:interface=127.0.0.1",
            "--listen", "tcp:0:interface=127.0.0.1:backlog=7",
            "--listen", "unix:/tmp/vendepass-test.sock",
        )
        self.assertEqual(
            options["listen"],
            ["tcp:0:interface=127.0.0.1:backlog=1000", "tcp:0:interface=127.0.0.1:backlog=7",
             "unix:/tmp/vendepass-test.sock"],
        )
        self.assertEqual(with_backlog("ssl:443:privateKey=k.pem", 9), "ssl:443:privateKey=k.pem:backlog=9")
        self.assertEqual(with_backlog("TCP6:0", 9), "TCP6:0:backlog=9")
        for bad in ("0", "65536", "many"):
            self.assertRaises(UsageError, self.parse, "--backlog", bad)

    def test_backlog_behind_haproxy(self) -> None:
        """
        --backlog also applies to tcp, tcp6 and ssl endpoints wrapped for the
        PROXY protocol (haproxy:...): the backlog= added at the end reaches
        the endpoint that listens, inside the wrapper.
        """
        options = self.parse(
            "--backlog", "1000",
            "--listen", "haproxy:tcp:0:interface=127.0.0.1",
            "--listen", r"HAProxy:tcp6:0:interface=\:\:1",
            "--listen", "haproxy:tcp:0:backlog=7:interface=127.0.0.1",
            "--listen", "haproxy:unix:/tmp/vendepass-test.sock",
        )
        self.assertEqual(
            options["listen"],
            ["haproxy:tcp:0:interface=127.0.0.1:backlog=1000", r"HAProxy:tcp6:0:interface=\:\:1:backlog=1000",
             "haproxy:tcp:0:backlog=7:interface=127.0.0.1", "haproxy:unix:/tmp/vendepass-test.sock"],
        )
        self.assertEqual(with_backlog("haproxy:ssl:443:privateKey=k.pem", 9), "haproxy:ssl:443:privateKey=k.pem:backlog=9")
        self.assertEqual(with_backlog("haproxy:haproxy:tcp:1", 9), "haproxy:haproxy:tcp:1:backlog=9")
        self.assertEqual(with_backlog("haproxy:", 9), "haproxy:")
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
        from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

        # What Twisted builds from them (private attributes: the wrapper's
        # endpoint and the backlog it listens with are not public).
        for description, kind, backlog in zip(
            options["listen"][:3], [TCP4ServerEndpoint, TCP6ServerEndpoint, TCP4ServerEndpoint], [1000, 1000, 7]
        ):
            endpoint = serverFromString(reactor, description)
            self.assertIs(endpoint._wrapperFactory, HAProxyWrappingFactory)  # type: ignore[attr-defined]
            inner = endpoint._wrappedEndpoint  # type: ignore[attr-defined]
            self.assertIsInstance(inner, kind)
            self.assertEqual((inner._backlog, inner._port), (backlog, 0))

    def test_sqlite_writer(self) -> None:
        self.assertEqual(self.parse()["sqlite-writer"], "thread")
        self.assertEqual(self.parse("--sqlite-writer", "process")["sqlite-writer"], "process")
        self.assertRaises(UsageError, self.parse, "--sqlite-writer", "fork")

    def test_max_batch(self) -> None:
        self.assertEqual(self.parse("--max-batch", "1")["max-batch"], 1)
        for bad in ("0", "10001", "lots"):
            self.assertRaises(UsageError, self.parse, "--max-batch", bad)

    def test_purchase_caps(self) -> None:
        """
        --max-seats-per-flight (default 9) and --max-purchases-per-minute
        (default 120): 0 or more.
        """
        self.assertEqual(self.parse()["max-seats-per-flight"], 9)
        self.assertEqual(self.parse()["max-purchases-per-minute"], 120)
        for option in ("--max-seats-per-flight", "--max-purchases-per-minute"):
            self.assertEqual(self.parse(option, "0")[option[2:]], 0)
            for bad in ("-1", "lots"):
                self.assertRaises(UsageError, self.parse, option, bad)

    def test_bad_listen(self) -> None:
        """
        An endpoint string that does not parse is a usage error, not a traceback.
        """
        error = self.assertRaises(UsageError, self.parse, "--listen", "tcp:0:interface=::1")
        self.assertIn("not a valid endpoint", str(error))
        self.assertRaises(UsageError, self.parse, "--listen", "carrier-pigeon:65432")

    def test_unreadable_certificate(self) -> None:
        """
        An ssl: key or certificate file that is missing or not one is a
        one-line error naming it.
        """
        missing = str(Path(self.db).parent / "missing.pem")
        error = self.assertRaises(SystemExit, self.parse, "--listen", f"ssl:0:privateKey={missing}")
        self.assertEqual(str(error), f"vendepass: --listen ssl:0:privateKey={missing}:backlog=4096: cannot read {missing}: No such file or directory")
        junk = Path(self.db).parent / "junk.pem"
        junk.write_text("not a key\n")
        error = self.assertRaises(SystemExit, self.parse, "--listen", f"ssl:0:privateKey={junk}")
        self.assertIn("not a usable key or certificate", str(error))

    def test_hold_seconds(self) -> None:
        self.assertEqual(self.parse("--hold-seconds", "45")["hold-seconds"], 45)
        self.assertRaises(UsageError, self.parse, "--hold-seconds", "0")
        self.assertRaises(UsageError, self.parse, "--hold-seconds", "soon")

    def test_handshake_timeout(self) -> None:
        self.assertEqual(self.parse()["handshake-timeout"], 10)
        self.assertEqual(self.parse("--handshake-timeout", "3")["handshake-timeout"], 3)
        self.assertRaises(UsageError, self.parse, "--handshake-timeout", "-1")

    def test_sales_window(self) -> None:
        self.assertEqual(self.parse("--sales-window", "7")["sales-window"], 7)
        self.assertRaises(UsageError, self.parse, "--sales-window", "0")

    def test_bad_fixtures(self) -> None:
        """
        A bad fixtures file for a new database is a usage error naming the problem.
        """
        bad = Path(self.mktemp())
        bad.write_text(json.dumps({"format": 2}))
        error = self.assertRaises(UsageError, self.parse, "--fixtures", str(bad))
        self.assertIn("unsupported format", str(error))
        missing = self.assertRaises(UsageError, self.parse, "--fixtures", str(bad) + ".nope")
        self.assertIn("cannot read", str(missing))

    def test_existing_database_ignores_fixtures(self) -> None:
        """
        Fixtures are only read for a new database.
        """
        Path(self.db).write_bytes(b"not empty")
        options = self.parse("--fixtures", "/nonexistent.json")
        self.assertIsNone(options.fixtures)


class MakeServiceTests(TestCase):
    def endpoints(self, top: object) -> list[StreamServerEndpointService]:
        """
        The endpoint services of C{top}, listening already: they stop
        listening when the test ends.
        """
        endpoints = [s for s in top if isinstance(s, StreamServerEndpointService)]  # type: ignore[attr-defined]

        def stop() -> Deferred[list[object]]:
            return gatherResults([e.stopService() for e in endpoints])

        self.addCleanup(stop)
        return endpoints

    def test_sqlite_checkpointer(self) -> None:
        """
        The server's SQLite store copies its WAL on a checkpointer beside
        the writer: the writer's automatic checkpoint is off.
        """
        db = Path(self.mktemp()).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        options = Options()
        options.parseOptions(["--db", str(db), "--fixtures", str(MINI), "--listen", "tcp:0:interface=127.0.0.1"])
        top = makeService(options)
        self.endpoints(top)
        store: Any = next(s for s in top if isinstance(s, ReservationService)).store  # type: ignore[attr-defined]
        self.addCleanup(store.stop)
        self.assertIsNotNone(store._checkpointer)
        self.assertEqual(store._db.execute("PRAGMA wal_autocheckpoint").fetchone(), (0,))

    def test_sqlite_writer(self) -> None:
        """
        --sqlite-writer: the batches on a thread of the server's (the
        default) or in a writer process (with --max-batch above 1); nothing
        else is accepted.
        """
        db = Path(self.mktemp()).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        for args, process in (((), False), (("--sqlite-writer", "process"), True),
                              (("--sqlite-writer", "process", "--max-batch", "1"), False),
                              (("--sqlite-writer", "thread"), False)):
            options = Options()
            options.parseOptions(["--db", str(db), "--fixtures", str(MINI), "--listen", "tcp:0:interface=127.0.0.1", *args])
            top = makeService(options)
            self.endpoints(top)
            store: Any = next(s for s in top if isinstance(s, ReservationService)).store  # type: ignore[attr-defined]
            self.assertEqual(store._writer is not None, process, args)
            store.stop()

    def test_postgres_group_commit(self) -> None:
        """
        On PostgreSQL, one-step purchases go together, up to PG_MAX_BATCH
        in one call, at most PG_BATCH_SLOTS calls at once (fewer if
        --db-connections is smaller).
        """
        from tests.pg import fresh_url
        from vendepass.tap import PG_BATCH_SLOTS, PG_MAX_BATCH

        url = fresh_url(self)
        for connections, slots in (("8", PG_BATCH_SLOTS), ("1", 1)):
            options = Options()
            options.parseOptions(
                ["--db", url, "--db-connections", connections, "--fixtures", str(MINI),
                 "--listen", "tcp:0:interface=127.0.0.1"]
            )
            top = makeService(options)
            self.endpoints(top)
            store: Any = next(s for s in top if isinstance(s, ReservationService)).store  # type: ignore[attr-defined]
            self.addCleanup(store.stop)
            self.assertEqual((store.max_batch, store.batch_slots), (PG_MAX_BATCH, slots))
        self.assertEqual(PG_BATCH_SLOTS, 2)

    def test_services(self) -> None:
        """
        One reservation service, and one endpoint service per --listen, all
        sharing one factory.
        """
        db = Path(self.mktemp()).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        options = Options()
        options.parseOptions(
            ["--db", str(db), "--fixtures", str(MINI), "--hold-seconds", "90", "--handshake-timeout", "4",
             "--listen", "tcp:0:interface=127.0.0.1", "--listen", r"tcp:0:interface=\:\:1"]
        )
        top = makeService(options)
        services = list(top)  # type: ignore[call-overload]
        reservations = [s for s in services if isinstance(s, ReservationService)]
        endpoints = self.endpoints(top)
        self.assertEqual(len(reservations), 1)
        self.assertEqual(reservations[0].hold_seconds, 90)
        self.assertEqual(set(reservations[0].airports), {"SSA", "REC", "MAO"})
        self.assertEqual(len(endpoints), 2)
        factories = {id(e.factory) for e in endpoints}
        self.assertEqual(len(factories), 1)
        self.assertIsInstance(endpoints[0].factory, VendePassFactory)
        self.assertEqual(endpoints[0].factory.handshake_timeout, 4)
        self.assertTrue(db.exists())
        self.assertEqual(reservations[0].store.max_batch, 256)  # type: ignore[attr-defined]
        reservations[0].store.stop()

    def test_purchase_caps(self) -> None:
        """
        --max-seats-per-flight and --max-purchases-per-minute reach the
        store and the service; 0 is no limit.
        """
        db = Path(self.mktemp()).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        for args, seats, purchases in [((), 9, 120), (("--max-seats-per-flight", "0", "--max-purchases-per-minute", "5"), None, 5)]:
            options = Options()
            options.parseOptions(["--db", str(db), "--fixtures", str(MINI), "--listen", "tcp:0:interface=127.0.0.1", *args])
            top = makeService(options)
            [service] = [s for s in top if isinstance(s, ReservationService)]  # type: ignore[attr-defined]
            self.assertEqual(service.store.max_seats_per_flight, seats)  # type: ignore[attr-defined]
            self.assertEqual(service.max_purchases_per_minute, purchases)
            service.store.stop()
            self.endpoints(top)

    def test_haproxy_listener(self) -> None:
        """
        --listen haproxy:tcp:... is served by the same factory, behind
        Twisted's PROXY-protocol wrapper.
        """
        db = Path(self.mktemp()).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        options = Options()
        options.parseOptions(
            ["--db", str(db), "--fixtures", str(MINI), "--listen", "haproxy:tcp:0:interface=127.0.0.1",
             "--listen", "tcp:0:interface=127.0.0.1"]
        )
        self.assertEqual(options["listen"][0], "haproxy:tcp:0:interface=127.0.0.1:backlog=4096")
        top = makeService(options)
        services = list(top)  # type: ignore[call-overload]
        endpoints = self.endpoints(top)
        self.assertEqual(len(endpoints), 2)
        self.assertIs(endpoints[0].factory, endpoints[1].factory)
        self.assertIsInstance(endpoints[0].factory, VendePassFactory)
        from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

        self.assertIs(endpoints[0].endpoint._wrapperFactory, HAProxyWrappingFactory)  # type: ignore[attr-defined]
        [reservations] = [s for s in services if isinstance(s, ReservationService)]
        reservations.store.stop()  # type: ignore[attr-defined]

    def test_unopenable_database(self) -> None:
        options = Options()
        options.parseOptions(["--db", "/nonexistent/dir/vendepass.sqlite3", "--listen", "tcp:0:interface=127.0.0.1"])
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertIn("cannot open the database", str(error))

    def test_listens_before_opening_the_database(self) -> None:
        """
        The ports listen when the service is made, before the database is
        opened: a port in use is a one-line error, and no database is created.
        """
        import socket

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1]
        db = Path(self.mktemp()).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        options = Options()
        options.parseOptions(
            ["--db", str(db), "--fixtures", str(MINI),
             "--listen", "tcp:0:interface=127.0.0.1", "--listen", f"tcp:{number}:interface=127.0.0.1"]
        )
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertEqual(str(error), f"vendepass: cannot listen on 127.0.0.1:{number}: Address already in use")
        self.assertFalse(db.exists())


class PluginTests(SynchronousTestCase):
    def test_plugin_found(self) -> None:
        """
        twistd finds the vendepass plugin, pointing at vendepass.tap.
        """
        makers = [p for p in getPlugins(IPlugin) if getattr(p, "tapname", None) == "vendepass"]
        self.assertEqual(len(makers), 1)
        self.assertEqual(makers[0].module, "vendepass.tap")  # type: ignore[attr-defined]


class GarbageCollectorTuningTests(SynchronousTestCase):
    def test_tunes_while_running(self) -> None:
        """
        While the server runs, young collections are rarer and what start-up
        built is frozen; stopping puts both back.
        """
        import gc

        from vendepass.tap import GC_YOUNG_THRESHOLD, GarbageCollectorTuning

        before = gc.get_threshold()
        tuning = GarbageCollectorTuning()
        tuning.startService()
        try:
            self.assertEqual(gc.get_threshold(), (GC_YOUNG_THRESHOLD, *before[1:]))
            self.assertGreater(gc.get_freeze_count(), 0)
        finally:
            tuning.stopService()
        self.assertEqual(gc.get_threshold(), before)
        self.assertEqual(gc.get_freeze_count(), 0)
