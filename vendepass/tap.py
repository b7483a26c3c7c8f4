"""
C{twistd vendepass}: options and service wiring.
"""

from __future__ import annotations

import gc
import os
import resource
import sqlite3
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from vendepass.errors import FixturesError
from vendepass.fixtures import BUNDLED, Fixtures, load
from vendepass.protocol import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, VendePassFactory
from vendepass.service import DEFAULT_HOLD_SECONDS, DEFAULT_SALES_WINDOW_DAYS
from vendepass.store import IStore
from vendepass.throttle import DEFAULT_REGISTRATIONS_PER_HOUR, RegistrationThrottle

DEFAULT_LISTEN = "tcp:65432"
# A burst of thousands of customers connecting at once must not overflow the
# accept queue (Twisted's default is 50; overflowing SYNs are retried after
# 1 s, 3 s, 7 s...).
DEFAULT_BACKLOG = 4096
DEFAULT_MAX_BATCH = 256
# PostgreSQL connections (and threads). Chosen when a transaction was a
# dozen round trips (100 customers, one server: 2 connections 644
# purchases/s, 4: 688, 8: 803-851, 16: 812). Now each change of seat state is
# one call, and one-step purchases go in batches on at most PG_BATCH_SLOTS of
# these; the others run holds, ends of holds, reads and logins. Measured again
# on 2026-12-03 (100 customers, hold then buy): 4 connections 792 purchases/s,
# 8: 907 and 805, 16: 802, within the noise, so 8 stays.
DEFAULT_DB_CONNECTIONS = 8
# Files kept open for other things than customers' connections (listening
# sockets, the database and its journals, PostgreSQL connections, logs, the
# threads' wake-up pipes) and for connections being refused: at most
# --max-connections connections leave this many below the limit on open
# files.
RESERVED_FILES = 256
_log = Logger()


def fit_connection_limit(requested: int, soft: int, hard: int, reserved: int = RESERVED_FILES) -> tuple[int, int]:
    """
    How many customer connections fit under a limit on open files of
    C{soft} (which may be raised up to C{hard}; either may be
    C{resource.RLIM_INFINITY}), keeping C{reserved} for the rest:
    C{(connections, soft limit to set)}. C{requested} if it fits once the
    soft limit is raised as far as needed (or allowed), else fewer.
    """
    unlimited = resource.RLIM_INFINITY
    needed = requested + reserved
    if soft == unlimited or soft >= needed:
        return requested, soft
    target = needed if hard == unlimited else min(hard, needed)
    # A tiny limit: keep half of it for the rest.
    keep = min(reserved, target // 2)
    return max(1, min(requested, target - keep)), target


def connection_limit(requested: int) -> int:
    """
    C{--max-connections}, fitted to this process's limit on open files
    (raised if it must and may be): a server that runs out of file
    descriptors cannot open its database, nor refuse a connection with a
    reason. Logs a warning when fewer connections fit than asked for.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit, wanted = fit_connection_limit(requested, soft, hard)
    if wanted != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            limit, wanted = fit_connection_limit(requested, soft, soft)
        else:
            _log.info("raised the limit on open files from {soft} to {wanted}", soft=soft, wanted=wanted)
    if limit < requested:
        _log.warn(
            "--max-connections {requested} does not fit under the limit on open files ({files});"
            " at most {limit} connections will be accepted",
            requested=requested, files=wanted, limit=limit,
        )
    return limit


def with_backlog(description: str, backlog: int) -> str:
    """
    C{description} with C{backlog=} added if it is a tcp, tcp6 or ssl
    endpoint that does not set one, also when wrapped for the PROXY
    protocol (C{haproxy:tcp:65432}): Twisted's C{haproxy:} parser hands its
    arguments, C{backlog=} included, to the endpoint it wraps.
    """
    kind, _, rest = description.partition(":")
    while kind.strip().lower() == "haproxy":
        kind, _, rest = rest.partition(":")
    if kind.strip().lower() in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the VendePass ticket sales server. It speaks newline-delimited JSON "
        "(protocol v1, see docs/protocol.md) on every --listen endpoint."
    )
    optFlags = [
        ["log-requests", None, "Log a line per request, hold and sale (costly at high request rates)."],
    ]
    optParameters = [
        [
            "db", None, "vendepass.sqlite3",
            "The database: a SQLite file path, or postgresql://user@host:port/dbname for a PostgreSQL"
            " database shared by several servers; created and loaded with the fixtures if new.",
        ],
        [
            "db-connections", None, DEFAULT_DB_CONNECTIONS,
            "PostgreSQL only: how many connections (and threads) run this server's transactions.", int,
        ],
        ["fixtures", None, None, "Fixtures file to load into a new database (default: the bundled airline)."],
        ["hold-seconds", None, DEFAULT_HOLD_SECONDS, "How long a hold lasts, in seconds.", int],
        ["sales-window", None, DEFAULT_SALES_WINDOW_DAYS, "How many days ahead flights are sold.", int],
        ["idle-timeout", None, 900, "Close a connection after this many seconds without a request (0: never).", int],
        [
            "handshake-timeout", None, int(DEFAULT_HANDSHAKE_TIMEOUT),
            "Abort a TLS connection that has not finished its handshake this many seconds after connecting"
            " (0: never).", int,
        ],
        ["max-connections-per-ip", None, 50, "How many connections one address may have open at once.", int],
        [
            "max-connections", None, DEFAULT_MAX_CONNECTIONS,
            "How many connections may be open at once in all (lowered at start to fit the limit on open files).",
            int,
        ],
        ["max-held-seats", None, 9, "How many seats one customer may hold at once.", int],
        [
            "max-seats-per-flight", None, 9,
            "How many seats (held or bought) one customer may have on one flight (0: no limit).", int,
        ],
        [
            "max-purchases-per-minute", None, 120,
            "How many purchase requests one customer may make in any 60 seconds, on each server (0: no limit).", int,
        ],
        ["max-legs", None, 3, "How many flights one itinerary may have.", int],
        [
            "max-registrations-per-ip", None, DEFAULT_REGISTRATIONS_PER_HOUR,
            "How many registrations (taken names included) one address may try per hour (0: no limit).", int,
        ],
        [
            "backlog", None, DEFAULT_BACKLOG,
            "Listen backlog of tcp, tcp6 and ssl endpoints (also behind haproxy:) that do not set"
            " backlog= themselves (the kernel caps it at net.core.somaxconn).", int,
        ],
        [
            "max-batch", None, DEFAULT_MAX_BATCH,
            "Group commit: how many writes may share one durable transaction (1: one each).", int,
        ],
        [
            "sqlite-writer", None, "thread",
            "SQLite only: where the batches are written: 'thread' (a thread of the server's) or 'process' (a"
            " process of its own, with --max-batch above 1: more purchases per second with many customers at"
            " once, a longer wait with few; see docs/performance.md).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.fixtures: Fixtures | None = None

    def opt_listen(self, description: str) -> None:
        """
        Endpoint to listen on, e.g. tcp:65432 or tcp:0:interface=127.0.0.1 or
        ssl:65432:privateKey=key.pem:certKey=cert.pem, or haproxy:tcp:65432
        behind a load balancer sending the PROXY protocol (repeatable; default
        tcp:65432).
        """
        self["listen"].append(description)

    # --help wraps this text as it is: without the docstring's indentation.
    opt_listen.__doc__ = " ".join((opt_listen.__doc__ or "").split())

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        if not 1 <= self["backlog"] <= 65535:
            raise usage.UsageError("--backlog must be between 1 and 65535")
        if not 1 <= self["max-batch"] <= 10000:
            raise usage.UsageError("--max-batch must be between 1 and 10000")
        if self["sqlite-writer"] not in ("process", "thread"):
            raise usage.UsageError("--sqlite-writer must be 'process' or 'thread'")
        self["listen"] = [with_backlog(d, self["backlog"]) for d in self["listen"]]
        from OpenSSL import SSL, crypto

        for description in self["listen"]:
            try:
                serverFromString(reactor, description)
            # ssl: reads its key and certificate files here. A file that
            # cannot be read is no misuse of the options: a one-line error,
            # without the usage text twistd shows with a UsageError.
            except OSError as e:
                raise SystemExit(f"vendepass: --listen {description}: cannot read {e.filename}: {e.strerror}")
            except (crypto.Error, SSL.Error) as e:
                raise SystemExit(f"vendepass: --listen {description}: not a usable key or certificate: {e}")
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--listen {description!r} is not a valid endpoint: {e}")
        if not 1 <= self["hold-seconds"] <= 86400:
            raise usage.UsageError("--hold-seconds must be between 1 and 86400")
        if not 1 <= self["sales-window"] <= 366:
            raise usage.UsageError("--sales-window must be between 1 and 366 days")
        if self["idle-timeout"] < 0:
            raise usage.UsageError("--idle-timeout must be 0 (never) or more seconds")
        if self["handshake-timeout"] < 0:
            raise usage.UsageError("--handshake-timeout must be 0 (never) or more seconds")
        if self["max-connections-per-ip"] < 1:
            raise usage.UsageError("--max-connections-per-ip must be at least 1")
        if not 1 <= self["max-connections"] <= 1_000_000:
            raise usage.UsageError("--max-connections must be between 1 and 1000000")
        if not 1 <= self["max-held-seats"] <= 1000:
            raise usage.UsageError("--max-held-seats must be between 1 and 1000")
        if not 0 <= self["max-seats-per-flight"] <= 10000:
            raise usage.UsageError("--max-seats-per-flight must be between 0 (no limit) and 10000")
        if not 0 <= self["max-purchases-per-minute"] <= 1_000_000:
            raise usage.UsageError("--max-purchases-per-minute must be between 0 (no limit) and 1000000")
        if not 1 <= self["max-legs"] <= 6:
            raise usage.UsageError("--max-legs must be between 1 and 6")
        if self["max-registrations-per-ip"] < 0:
            raise usage.UsageError("--max-registrations-per-ip must be 0 (no limit) or more")
        if not 1 <= self["db-connections"] <= 64:
            raise usage.UsageError("--db-connections must be between 1 and 64")
        from vendepass.store.postgres import is_postgres_url

        if is_postgres_url(self["db"]) or not os.path.exists(self["db"]) or os.path.getsize(self["db"]) == 0:
            # A new database: check the fixtures now, so a bad file is a
            # clear error message rather than a traceback at start-up.
            try:
                self.fixtures = load(self["fixtures"] or BUNDLED)
            except FixturesError as e:
                raise usage.UsageError(str(e))


# How long a thread that wants the GIL waits before the running one is made
# to yield (Python's default is 5 ms). The reactor thread and the database
# writer hand the GIL to each other at every SQLite call; at 5 ms the writer
# spent half its time waiting for it (300 customers: 1,830 purchases/s at
# 5 ms, 2,540 at 1 ms). At 0.2 ms, 1,000 customers holding then buying:
# 2,155 and 1,809 purchases/s against 1,592 and 1,596 at 1 ms (two pairs);
# buying in one step, and 10 customers, no worse.
GIL_SWITCH_INTERVAL = 0.0002


def _open_sqlite(options: Options, fixtures: Callable[[], Fixtures], hash_password: Callable[[str], str]) -> IStore:
    from twisted.internet import reactor

    from vendepass.store import ThreadExecutor
    from vendepass.store.sqlite import SQLiteStore

    try:
        store = SQLiteStore.open(
            options["db"],
            reactor,  # type: ignore[arg-type]
            ThreadExecutor(reactor, "vendepass-db"),  # type: ignore[arg-type]
            fixtures,
            hash_password,
            max_held_seats=options["max-held-seats"],
            max_batch=options["max-batch"],
            # Reads beside the writer, never in its queue.
            read_executor=ThreadExecutor(reactor, "vendepass-db-read"),  # type: ignore[arg-type]
            # The WAL copied into the database beside the writer.
            checkpoint_executor=ThreadExecutor(reactor, "vendepass-db-checkpoint"),  # type: ignore[arg-type]
            # The writer and the reactor on a core each, not taking turns at the GIL.
            writer_process=options["sqlite-writer"] == "process" and options["max-batch"] > 1
            and options["db"] != ":memory:" and not options["db"].startswith("file:"),
        )
        store.max_seats_per_flight = options["max-seats-per-flight"] or None
        return store
    except (sqlite3.Error, OSError, RuntimeError, FixturesError) as e:
        raise SystemExit(f"vendepass: cannot open the database {options['db']}: {e}")


# The most one-step purchases one call of vendepass_buy_batch carries.
# Since PostgreSQL migration 7 writes a batch with one statement per table,
# a larger batch costs less per purchase. Measured on 2026-12-03, one
# server, 1,000 customers, one run each, interleaved: 32: 2,440, 2,406
# purchases/s (server CPU 250 us a purchase); 64: 2,911, 2,946, 2,988 (204
# us); 128: 2,951, 3,107 (201 us). Two servers: 64: 3,123; 128: 3,199.
PG_MAX_BATCH = 64
# How many of those calls run at once (each on one of the --db-connections):
# fewer, larger batches. Measured on 2026-12-03, one server, one run each:
# 100 customers, 2 at once 3,279 and 2,807 purchases/s (server CPU 4.4 and
# 4.7 s in 10 s, p99 55 and 61 ms) against 3,203 and 2,967 with 8 (5.9 s,
# 81 and 86 ms); 1,000 customers on two servers against one, 2 at once:
# 1.31, 1.21 and 1.35 x; 8 at once: 0.82 x (sixteen batches fighting over
# the same flights' locks).
PG_BATCH_SLOTS = 2


def _open_postgres(options: Options, fixtures: Callable[[], Fixtures], hash_password: Callable[[str], str]) -> IStore:
    import psycopg
    from twisted.internet import reactor

    from vendepass.store import ThreadExecutor
    from vendepass.store.postgres import PostgresStore

    try:
        store = PostgresStore.open(
            options["db"],
            ThreadExecutor(reactor, "vendepass-pg", threads=options["db-connections"]),  # type: ignore[arg-type]
            fixtures,
            hash_password,
            reactor=reactor,  # type: ignore[arg-type]
            max_held_seats=options["max-held-seats"],
            # Reads on connections of their own: never on the writers' threads.
            read_executor=ThreadExecutor(reactor, "vendepass-pg-read", threads=2),  # type: ignore[arg-type]
        )
        store.max_seats_per_flight = options["max-seats-per-flight"] or None
        # Group commit of one-step purchases: at most PG_BATCH_SLOTS calls
        # at once, each on a writer's connection.
        store.max_batch = PG_MAX_BATCH
        store.batch_slots = min(PG_BATCH_SLOTS, options["db-connections"])
        return store
    except (psycopg.Error, RuntimeError, FixturesError) as e:
        # The URL may hold a password: say where, not how.
        raise SystemExit(f"vendepass: cannot open the PostgreSQL database: {e}")


# Allocations (less deallocations) of container objects between two young
# garbage collections; Python's default is 700. Every request in flight
# holds a few dozen objects (Deferreds, coroutines, rows) for as long as its
# batch takes: with the default, nearly all of them lived through a young
# collection or two and reached the oldest generation, whose collections
# (every 1 to 2 s at 1,000 customers, 70 to 160 ms each, with every flight
# of the schedule to look at) took 20 % of the server's CPU. Measured in one
# run each, 1,000 customers: 1,149 purchases/s with the default, 1,317 with
# gc.freeze() at start-up alone, 1,399 with both (no collection of the old
# generation during the 10 s run).
GC_YOUNG_THRESHOLD = 100_000


class GarbageCollectorTuning(Service):
    """
    While the server runs: fewer, larger young collections, and what
    start-up built (the airline, its schedule, the database's statements)
    moved out of the collector's sight (it lives as long as the process).
    Stopping puts both back.
    """

    _saved: tuple[int, int, int] = (700, 10, 10)

    def startService(self) -> None:
        super().startService()
        self._saved = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *self._saved[1:])

    def stopService(self) -> None:
        super().stopService()
        gc.set_threshold(*self._saved)
        gc.unfreeze()


class _Pending(Factory):
    """
    What the ports serve from the time they listen, before the database is
    open, until makeService has built the factory that serves them: all
    that before the reactor runs, so before any connection is accepted.
    """

    noisy = False

    def __init__(self) -> None:
        self.factory: Factory | None = None

    def buildProtocol(self, addr: Any) -> Any:
        assert self.factory is not None, "a connection before the server was built"
        return self.factory.buildProtocol(addr)

    def logPrefix(self) -> str:
        # What the log's "... starting on PORT" names.
        return VendePassFactory.__name__


class ListeningService(StreamServerEndpointService):
    """
    An endpoint service whose endpoint was listened on when the service was
    made (before the database was opened): starting it does not listen
    again; stopping it stops listening.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, listening: Deferred[IListeningPort]) -> None:
        super().__init__(endpoint, factory)
        self._waitingForPort = listening

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)


def _listen(description: str, factory: Factory) -> tuple[IStreamServerEndpoint, Deferred[IListeningPort]]:
    """
    Listen on C{description} now: a port in use (or any other reason the
    endpoint cannot listen) is a one-line error, before anything is created.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(reactor, description)
    listening = endpoint.listen(factory)
    outcome: list[IListeningPort | Failure] = []

    def keep(result: IListeningPort | Failure) -> IListeningPort | Failure:
        outcome.append(result)
        return result

    listening.addBoth(keep)
    if outcome and isinstance(outcome[0], Failure):
        failure = outcome[0]
        listening.addErrback(lambda _: None)
        if failure.check(CannotListenError):
            error: CannotListenError = failure.value  # type: ignore[assignment]
            socket_error = error.socketError
            reason = getattr(socket_error, "strerror", None) or str(socket_error)
            raise SystemExit(f"vendepass: cannot listen on {error.interface or '*'}:{error.port}: {reason}")
        raise SystemExit(f"vendepass: cannot listen on {description}: {failure.getErrorMessage()}")
    return endpoint, listening


def makeService(options: Options) -> IService:
    import sys

    from twisted.internet import reactor

    from vendepass.passwords import ScryptHasher
    from vendepass.service import ReservationService
    from vendepass.store import ThreadExecutor
    from vendepass.store.postgres import is_postgres_url

    def fixtures() -> Fixtures:
        return options.fixtures or load(options["fixtures"] or BUNDLED)

    # Listen first: a port in use stops the server before it creates or
    # opens anything. What listens serves the factory made below.
    pending = _Pending()
    listening: list[tuple[IStreamServerEndpoint, Deferred[IListeningPort]]] = []
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    hasher = ScryptHasher()
    # Opening runs before the reactor does: creating, migrating and loading
    # the database is start-up work, not serving.
    opener = _open_postgres if is_postgres_url(options["db"]) else _open_sqlite
    try:
        for description in options["listen"]:
            listening.append(_listen(description, pending))
        store = opener(options, fixtures, hasher.hash)
    except BaseException:
        for _, port in listening:
            port.addCallback(lambda p: p.stopListening())
        raise
    service = ReservationService(
        store,
        reactor,  # type: ignore[arg-type]
        hasher,
        ThreadExecutor(reactor, "vendepass-hash", threads=2),  # type: ignore[arg-type]
        hold_seconds=options["hold-seconds"],
        sales_window_days=options["sales-window"],
        max_legs=options["max-legs"],
        registrations=RegistrationThrottle(reactor, options["max-registrations-per-ip"]),  # type: ignore[arg-type]
        max_purchases_per_minute=options["max-purchases-per-minute"] or None,
    )
    service.log_sales = bool(options["log-requests"])
    top = MultiService()
    service.setServiceParent(top)
    factory = VendePassFactory(
        service,
        reactor,  # type: ignore[arg-type]
        idle_timeout=options["idle-timeout"] or None,
        handshake_timeout=options["handshake-timeout"] or None,
        max_connections_per_ip=options["max-connections-per-ip"],
        log_requests=bool(options["log-requests"]),
        max_connections=connection_limit(options["max-connections"]),
    )
    pending.factory = factory
    for endpoint, port in listening:
        ListeningService(endpoint, factory, port).setServiceParent(top)
    # Last: it starts once everything above has been built and started.
    GarbageCollectorTuning().setServiceParent(top)
    return top


__all__: list[Any] = ["Options", "makeService"]
