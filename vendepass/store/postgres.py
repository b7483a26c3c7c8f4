"""
The PostgreSQL store: several VendePass servers share one database, and the
database is the only source of truth for seats, holds and their expiry.

Every method is one transaction, run on a thread of the store's executor
with a connection of its own (psycopg 3; no call ever blocks the reactor).
Time inside a transaction is the database's C{now()}: a hold lasts its
duration of database time, and whether it has expired is judged by the
database's clock, so a server whose own clock is off can neither steal a
hold nor extend one.

Concurrency, at C{READ COMMITTED}:
  - no seat is ever claimed twice: C{PRIMARY KEY (flight_id, seat)} on
    C{seats};
  - claims (hold, one-step buy) lock their customer's row (holds only) and
    then their flights, with transaction-scoped advisory locks taken in one
    fixed order (by lock key), so two claims on a flight run one after the
    other and never deadlock;
  - a hold or ticket row is locked (C{FOR UPDATE}, or the conditional
    C{UPDATE ... WHERE state = 'active'}) before its seats change; a
    transaction that ends several holds locks them in hold id order;
  - a request with a C{request_id} first locks that request (so that the
    same request sent twice at once is done once and replayed once);
  - the lock order is therefore request, user, flights, holds and
    tickets, seats;
    should PostgreSQL still report a serialization failure, a deadlock or a
    unique violation (two servers doing the same request_id at once), the
    transaction is retried from the start, a few times, and then refused
    with C{storage_unavailable}.

Expired holds are ended by whichever transaction looks at their seats, by
C{expire_hold}, and by every server's sweep (C{FOR UPDATE SKIP LOCKED}, so
sweeps share the work). Each such expiry is announced with
C{NOTIFY vendepass_expired}; every server listens, so the owner's connection
hears of it whichever server noticed.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from datetime import datetime
from typing import Any, Callable, Iterable, TypeVar

import attrs
import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vendepass.errors import (
    AlreadyCancelled,
    FlightDeparted,
    HoldExpired,
    HoldNotFound,
    InvalidRequest,
    SessionClosed,
    StorageUnavailable,
    TicketNotFound,
    TooManyHolds,
    UsernameTaken,
)
from vendepass.fixtures import Fixtures
from vendepass.model import Flight, HeldSeat, Hold, Money, Network, SeatState, Ticket, TicketLeg
from vendepass.schedule import flight_by_id
from vendepass.store import IExecutor, IStore, LegRequest
from vendepass.store.common import (
    REQUEST_RETENTION,
    TICKET_LEG_INSERT,
    _CommitThenRefuse,
    booking_code,
    check_seat,
    first_free_seat,
    hold_code,
    load_fixtures,
    new_ticket_legs,
    read_network,
    seat_map,
    seat_taken,
    ticket_leg_rows,
)

T = TypeVar("T")

# The channel on which expiries are announced to every server.
EXPIRED_CHANNEL = "vendepass_expired"
# How many times a transaction that lost a race (serialization failure,
# deadlock, unique violation) is tried again before the request is refused.
RETRIES = 8
# Advisory lock keys: the first of the two 32-bit halves says what is locked.
_SCHEMA_LOCK = (0x56500000, 0)
_FLIGHT_LOCK = 0x56500001
_REQUEST_LOCK = 0x56500002

_SCHEMA_1 = """
CREATE TABLE airline (
    code TEXT NOT NULL,
    name TEXT NOT NULL,
    currency TEXT NOT NULL
);
CREATE TABLE airports (
    code TEXT PRIMARY KEY,
    city TEXT NOT NULL,
    name TEXT NOT NULL,
    timezone TEXT NOT NULL
);
CREATE TABLE aircraft (
    type TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    rows INTEGER NOT NULL CHECK (rows > 0),
    letters TEXT NOT NULL
);
CREATE TABLE timetable (
    flight TEXT PRIMARY KEY,
    origin TEXT NOT NULL REFERENCES airports(code),
    destination TEXT NOT NULL REFERENCES airports(code),
    departure TEXT NOT NULL,
    duration_minutes INTEGER NOT NULL,
    days TEXT NOT NULL,
    aircraft TEXT NOT NULL REFERENCES aircraft(type),
    fare_cents BIGINT NOT NULL CHECK (fare_cents >= 0)
);
CREATE TABLE users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE holds (
    hold_id TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username),
    session_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    price_cents BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'expired', 'released', 'bought')),
    ended_at DOUBLE PRECISION
);
CREATE INDEX holds_active ON holds(expires_at) WHERE state = 'active';
CREATE INDEX holds_session ON holds(session_id) WHERE state = 'active';
CREATE INDEX holds_user ON holds(username) WHERE state = 'active';
CREATE INDEX holds_ended ON holds(ended_at) WHERE state <> 'active';
CREATE TABLE hold_legs (
    hold_id TEXT NOT NULL REFERENCES holds(hold_id) ON DELETE CASCADE,
    leg INTEGER NOT NULL,
    flight_id TEXT NOT NULL,
    seat TEXT NOT NULL,
    PRIMARY KEY (hold_id, leg)
);
CREATE TABLE tickets (
    ticket_id TEXT PRIMARY KEY,
    n BIGINT GENERATED ALWAYS AS IDENTITY,
    username TEXT NOT NULL REFERENCES users(username),
    status TEXT NOT NULL CHECK (status IN ('active', 'cancelled')),
    price_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    bought_at DOUBLE PRECISION NOT NULL,
    cancelled_at DOUBLE PRECISION
);
CREATE INDEX tickets_user ON tickets(username, bought_at, n);
CREATE TABLE ticket_legs (
    ticket_id TEXT NOT NULL REFERENCES tickets(ticket_id),
    leg INTEGER NOT NULL,
    flight_id TEXT NOT NULL,
    number TEXT NOT NULL,
    origin TEXT NOT NULL,
    destination TEXT NOT NULL,
    departure TEXT NOT NULL,
    arrival TEXT NOT NULL,
    seat TEXT NOT NULL,
    price_cents BIGINT NOT NULL,
    PRIMARY KEY (ticket_id, leg)
);
CREATE TABLE seats (
    flight_id TEXT NOT NULL,
    seat TEXT NOT NULL,
    hold_id TEXT REFERENCES holds(hold_id),
    ticket_id TEXT REFERENCES tickets(ticket_id),
    PRIMARY KEY (flight_id, seat),
    CHECK ((hold_id IS NULL) <> (ticket_id IS NULL))
);
CREATE INDEX seats_hold ON seats(hold_id) WHERE hold_id IS NOT NULL;
CREATE INDEX seats_ticket ON seats(ticket_id) WHERE ticket_id IS NOT NULL;
CREATE TABLE requests (
    username TEXT NOT NULL,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (username, request_id)
);
CREATE INDEX requests_age ON requests(created_at);
CREATE TABLE audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('hold', 'release', 'expire', 'buy', 'cancel')),
    hold_id TEXT,
    ticket_id TEXT,
    seats TEXT NOT NULL
);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
"""

# MIGRATIONS[n] takes a database from schema version n to n + 1. Append to
# it; never edit a migration that has shipped.
MIGRATIONS: list[str] = [_SCHEMA_1]
SCHEMA_VERSION = len(MIGRATIONS)


def _lock_key(name: str) -> int:
    """
    The advisory lock key of a flight or a request: the same on every server.
    """
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big", signed=True)


def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


# Seconds to wait for the database to answer a connection attempt, unless
# the URL says (libpq's default is to wait as long as TCP does).
CONNECT_TIMEOUT = 10


def connect(url: str) -> psycopg.Connection[Any]:
    """
    A connection in autocommit mode (transactions are explicit).
    """
    params = conninfo_to_dict(url)
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return psycopg.connect(make_conninfo("", **params), autocommit=True)


@attrs.define
class _Tx:
    """
    One transaction: its cursor, its time (the database's, or the injected
    clock's in tests), and the holds it ended because their time was up.
    """

    cur: psycopg.Cursor[Any]
    now: float
    ended: list[tuple[str, str]] = attrs.field(factory=list)

    def execute(self, query: str, args: Any = None) -> psycopg.Cursor[Any]:
        return self.cur.execute(query, args)  # type: ignore[arg-type]

    def executemany(self, query: str, args: Iterable[Any]) -> None:
        self.cur.executemany(query, args)  # type: ignore[arg-type]

    def one(self, query: str, args: Any = None) -> Any:
        return self.cur.execute(query, args).fetchone()  # type: ignore[arg-type]

    def all(self, query: str, args: Any = None) -> list[Any]:
        return self.cur.execute(query, args).fetchall()  # type: ignore[arg-type]


def _audit(
    tx: _Tx,
    username: str,
    action: str,
    seats: Iterable[tuple[str, str]],
    hold_id: str | None = None,
    ticket_id: str | None = None,
) -> None:
    tx.execute(
        "INSERT INTO audit (at, username, action, hold_id, ticket_id, seats) VALUES (%s, %s, %s, %s, %s, %s)",
        (tx.now, username, action, hold_id, ticket_id, json.dumps([f"{f}/{s}" for f, s in seats])),
    )


def _replay(tx: _Tx, username: str, request_id: str | None, kind: str) -> str | None:
    """
    The outcome recorded for C{request_id} of C{username}, if that request
    was already done. The same request running at once on two connections
    (a client retrying through another server) takes turns on a lock, the
    first lock of its transaction: the second one waits for the first to
    commit, then finds its outcome here and answers it again.
    """
    if request_id is None:
        return None
    tx.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_REQUEST_LOCK, _lock_key(f"{username}/{request_id}")))
    row = tx.one("SELECT kind, outcome FROM requests WHERE username = %s AND request_id = %s", (username, request_id))
    if row is None:
        return None
    if row[0] != kind:
        raise InvalidRequest(
            f"request_id {request_id!r} was already used for another operation ({row[0]}).", field="request_id"
        )
    return str(row[1])


def _remember(tx: _Tx, username: str, request_id: str | None, kind: str, outcome: str) -> None:
    # Two servers doing the same request at once: the second one's insert
    # fails with a unique violation, and its retry replays the first outcome.
    if request_id is not None:
        tx.execute(
            "INSERT INTO requests (username, request_id, kind, outcome, created_at) VALUES (%s, %s, %s, %s, %s)",
            (username, request_id, kind, outcome, tx.now),
        )


def _statements(script: str) -> list[str]:
    """
    The statements of a migration script (split on lines ending with C{;},
    except inside a dollar-quoted function body).
    """
    statements, current, quoted = [], "", False
    for line in script.splitlines(keepends=True):
        current += line
        quoted ^= line.count("$$") % 2 == 1
        if not quoted and line.rstrip().endswith(";"):
            statements.append(current.strip())
            current = ""
    assert not current.strip(), current
    return statements


def _create(conn: psycopg.Connection[Any], fixtures: Fixtures, hash_password: Callable[[str], str]) -> None:
    """
    In the caller's transaction: create the schema and load C{fixtures}.
    """
    for statement in _statements(_SCHEMA_1):
        conn.execute(statement)  # type: ignore[arg-type]
    now = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()[0]  # type: ignore[index]
    with conn.cursor() as cur:
        load_fixtures(cur.executemany, fixtures, hash_password, now, mark="%s")  # type: ignore[arg-type]


def prepare(
    url: str, fixtures: Callable[[], Fixtures], hash_password: Callable[[str], str]
) -> None:
    """
    Create (and load with C{fixtures()}) or migrate the database at C{url}.
    Servers starting at once take turns (an advisory lock), so exactly one
    of them creates it. This blocks.
    """
    with connect(url) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _SCHEMA_LOCK)
            conn.execute("CREATE TABLE IF NOT EXISTS vendepass_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM vendepass_schema").fetchone()
            if row is None:
                _create(conn, fixtures(), hash_password)
                conn.execute("INSERT INTO vendepass_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
                return
            version = row[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the database has schema version {version}, newer than this VendePass ({SCHEMA_VERSION})"
                )
            for migration in MIGRATIONS[version:]:
                for statement in _statements(migration):
                    conn.execute(statement)  # type: ignore[arg-type]
            conn.execute("UPDATE vendepass_schema SET version = %s", (SCHEMA_VERSION,))


@implementer(IStore)
class PostgresStore:
    """
    The PostgreSQL store. Open it with L{PostgresStore.open}.
    """

    _log = Logger()
    # What each transaction runs its statements through (tests that step
    # through the production statements one at a time put theirs here).
    transaction_class: type[_Tx] = _Tx

    def __init__(
        self,
        url: str,
        network: Network,
        executor: IExecutor,
        reactor: IReactorThreads | None = None,
        clock: IReactorTime | None = None,
        max_held_seats: int = 9,
    ) -> None:
        """
        @param reactor: where announced expiries are delivered; C{None}: the
            store does not listen for other servers' expiries.
        @param clock: C{None} (production): the database's clock is the
            store's time. Tests that drive time with a L{Clock} pass it.
        """
        self.url = url
        self.max_held_seats = max_held_seats
        self._network = network
        self._currency = network.currency
        self._executor = executor
        self._reactor = reactor
        self._clock = clock
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Any]] = []
        self._own_pids: set[int] = set()
        self._watchers: list[Callable[[str, str], None]] = []
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self.retries = 0

    @classmethod
    def open(
        cls,
        url: str,
        executor: IExecutor,
        fixtures: Callable[[], Fixtures],
        hash_password: Callable[[str], str],
        reactor: IReactorThreads | None = None,
        clock: IReactorTime | None = None,
        max_held_seats: int = 9,
    ) -> PostgresStore:
        """
        Open (creating, migrating and loading C{fixtures()} if new) the
        database at C{url}. Unlike the SQLite store it does not end the
        holds it finds: other servers' connections may still own them.
        Holds of a server that died end when their time is up.

        This blocks: call it before the reactor runs, or from a thread.
        """
        prepare(url, fixtures, hash_password)
        with connect(url) as conn:
            network = read_network(conn)
        return cls(url, network, executor, reactor, clock, max_held_seats)

    def start(self) -> None:
        self._stopping.clear()
        self._executor.start()
        if self._reactor is not None and self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="vendepass-pg-listen", daemon=True)
            self._listener.start()

    def stop(self) -> None:
        self._stopping.set()
        self._executor.stop()
        if self._listener is not None:
            self._listener.join(timeout=5)
            self._listener = None
        for conn in self._connections:
            conn.close()
        self._connections.clear()

    def network(self) -> Network:
        return self._network

    def watch_expiries(self, callback: Callable[[str, str], None]) -> None:
        self._watchers.append(callback)

    # -- connections and transactions ----------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """
        This thread's connection (each executor thread has its own).
        """
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connect(self.url)
            # Durable: a COMMIT returns once it is flushed to disk, whatever
            # the database's default (an acknowledged purchase is never lost).
            conn.execute("SET synchronous_commit TO on")
            self._local.conn = conn
            self._connections.append(conn)
            self._own_pids.add(conn.info.backend_pid)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                self._connections.remove(conn)
            except ValueError:
                pass
            conn.close()

    def _transact(self, work: Callable[[_Tx], T]) -> Deferred[T]:
        """
        Run C{work(tx)} in one transaction on the executor, retrying it from
        the start when it lost a race; fire with its outcome once committed.
        """
        ended: list[tuple[str, str]] = []

        def job() -> T:
            for attempt in range(RETRIES + 1):
                try:
                    return self._attempt(work, ended)
                except (pgerrors.SerializationFailure, pgerrors.DeadlockDetected, pgerrors.UniqueViolation) as e:
                    if attempt == RETRIES:
                        self._log.warn("gave up after {n} conflicting attempts: {error}", n=attempt + 1, error=e)
                        raise StorageUnavailable() from e
                    self.retries += 1
                    # A short random pause, so two rivals do not meet again.
                    time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                except psycopg.OperationalError as e:
                    # The connection is gone or the server refuses: if a
                    # COMMIT was under way its outcome is unknown, so do not
                    # do it again (a request_id makes the client's retry safe).
                    self._log.error("storage unavailable: {error}", error=str(e))
                    self._drop_connection()
                    raise StorageUnavailable() from e
            raise AssertionError("unreachable")

        def report(outcome: Any) -> Any:
            self._report(ended)
            return outcome

        return self._executor.submit(job).addBoth(report)

    def _attempt(self, work: Callable[[_Tx], T], ended: list[tuple[str, str]]) -> T:
        conn = self._connection()
        refusal: Exception | None = None
        with conn.cursor() as cur:
            if self._clock is None:
                # One round trip: BEGIN, and the transaction's time.
                cur.execute("BEGIN; SELECT extract(epoch FROM now())::float8")
                cur.nextset()
                now = cur.fetchone()[0]  # type: ignore[index]
            else:
                cur.execute("BEGIN")
                now = self._clock.seconds()
            try:
                tx = self.transaction_class(cur, now)
                try:
                    result = work(tx)
                except _CommitThenRefuse as e:
                    refusal = e.error
                for hold_id, session_id in tx.ended:
                    tx.execute("SELECT pg_notify(%s, %s)", (EXPIRED_CHANNEL, f"{hold_id} {session_id}"))
                cur.execute("COMMIT")
            except BaseException:
                if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                    try:
                        cur.execute("ROLLBACK")
                    except psycopg.Error:
                        self._drop_connection()
                raise
        ended.extend(tx.ended)
        if refusal is not None:
            raise refusal
        return result

    def _report(self, ended: list[tuple[str, str]]) -> None:
        """
        On the reactor thread: tell the watchers of holds that expired.
        """
        for hold_id, session_id in ended:
            for callback in self._watchers:
                try:
                    callback(hold_id, session_id)
                except Exception:
                    self._log.failure("reporting the expiry of hold {hold_id}", hold_id=hold_id)

    def _listen(self) -> None:
        """
        The listener thread: hear every server's expiries and hand them to
        the reactor. Reconnects after a failure (expiries announced
        meanwhile still reach their sessions through timers and sweeps).
        """
        assert self._reactor is not None
        while not self._stopping.is_set():
            try:
                with connect(self.url) as conn:
                    conn.execute(f"LISTEN {EXPIRED_CHANNEL}")
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=0.5):
                            if note.pid in self._own_pids:
                                continue  # this process reported it already
                            hold_id, _, session_id = note.payload.partition(" ")
                            self._reactor.callFromThread(self._report, [(hold_id, session_id)])
            except psycopg.Error as e:
                if not self._stopping.is_set():
                    self._log.warn("listening for expiries failed ({error}); again in 1 s", error=str(e))
                    self._stopping.wait(1.0)

    # -- users --------------------------------------------------------------

    def add_user(self, username: str, password_hash: str) -> Deferred[None]:
        def work(tx: _Tx) -> None:
            row = tx.one(
                "INSERT INTO users (username, password_hash, created_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (username) DO NOTHING RETURNING 1",
                (username, password_hash, tx.now),
            )
            if row is None:
                raise UsernameTaken(f"The username {username!r} is already taken.")

        return self._transact(work)

    def password_hash(self, username: str) -> Deferred[str | None]:
        def work(tx: _Tx) -> str | None:
            row = tx.one("SELECT password_hash FROM users WHERE username = %s", (username,))
            return None if row is None else str(row[0])

        return self._transact(work)

    # -- seats --------------------------------------------------------------

    def _end_hold(self, tx: _Tx, hold_id: str, state: str) -> bool:
        """
        End an active hold (C{state} is C{"released"} or C{"expired"}) and
        free its seats. The conditional update locks the hold first: of two
        transactions ending it, the second finds it ended and does nothing.
        """
        ended = tx.one(
            "UPDATE holds SET state = %s, ended_at = %s WHERE hold_id = %s AND state = 'active'"
            " RETURNING username, session_id",
            (state, tx.now, hold_id),
        )
        if ended is None:
            return False
        seats = tx.all(
            "DELETE FROM seats s USING hold_legs l WHERE s.hold_id = %s AND l.hold_id = s.hold_id"
            " AND l.flight_id = s.flight_id AND l.seat = s.seat RETURNING l.leg, s.flight_id, s.seat",
            (hold_id,),
        )
        seats.sort()
        _audit(tx, ended[0], "expire" if state == "expired" else "release",
               [(f, s) for _, f, s in seats], hold_id=hold_id)
        if state == "expired":
            tx.ended.append((hold_id, ended[1]))
        return True

    def _end_expired_on(self, tx: _Tx, flight_ids: list[str]) -> None:
        for (hold_id,) in tx.all(
            "SELECT DISTINCT s.hold_id FROM seats s JOIN holds h ON h.hold_id = s.hold_id"
            " WHERE s.flight_id = ANY(%s) AND s.hold_id IS NOT NULL AND h.state = 'active'"
            " AND h.expires_at <= %s ORDER BY s.hold_id",
            (flight_ids, tx.now),
        ):
            self._end_hold(tx, hold_id, "expired")

    def _claim(self, tx: _Tx, legs: list[LegRequest], hold_id: str | None, ticket_id: str | None) -> list[str]:
        """
        Claim one seat per leg for a hold or a ticket, or raise (and the
        transaction rolls back, all or nothing).
        """
        for leg in legs:
            if leg.flight.departs_ts <= tx.now:
                raise FlightDeparted(
                    f"Flight {leg.flight.flight_id} has already departed.", flight=leg.flight.flight_id
                )
        flight_ids = [leg.flight.flight_id for leg in legs]
        # The flights' locks, in one order on every server: claims of the
        # same flight take turns, and claims of several never deadlock.
        for key in sorted({_lock_key(f) for f in flight_ids}):
            tx.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_FLIGHT_LOCK, key))
        self._end_expired_on(tx, sorted(set(flight_ids)))
        seats: list[str] = []
        for leg in legs:
            flight = leg.flight
            if leg.seat is None:
                taken = {row[0] for row in tx.all("SELECT seat FROM seats WHERE flight_id = %s", (flight.flight_id,))}
                taken.update(s for (f, s) in zip(flight_ids, seats) if f == flight.flight_id)
                seat = first_free_seat(flight, taken)
            else:
                seat = leg.seat
                check_seat(flight, seat)
                row = tx.one(
                    "SELECT s.ticket_id, h.expires_at FROM seats s LEFT JOIN holds h ON h.hold_id = s.hold_id"
                    " WHERE s.flight_id = %s AND s.seat = %s",
                    (flight.flight_id, seat),
                )
                if row is not None:
                    raise seat_taken(flight, seat, *row)
            tx.execute(
                "INSERT INTO seats (flight_id, seat, hold_id, ticket_id) VALUES (%s, %s, %s, %s)",
                (flight.flight_id, seat, hold_id, ticket_id),
            )
            seats.append(seat)
        return seats

    def hold(
        self,
        username: str,
        session_id: str,
        legs: list[LegRequest],
        seconds: float,
        alive: Callable[[], bool],
        request_id: str | None = None,
    ) -> Deferred[Hold]:
        price = Money(sum(leg.flight.fare.cents for leg in legs), self._currency)

        def work(tx: _Tx) -> Hold:
            done = _replay(tx, username, request_id, "hold")
            if done is not None:
                return self._hold_by_id(tx, done)
            if not alive():
                raise SessionClosed()
            # One hold at a time per customer, whichever server: the limit
            # on held seats cannot be passed by holding on two at once.
            tx.execute("SELECT 1 FROM users WHERE username = %s FOR NO KEY UPDATE", (username,))
            held = tx.one(
                "SELECT COUNT(*) FROM holds h JOIN hold_legs l ON l.hold_id = h.hold_id"
                " WHERE h.username = %s AND h.state = 'active' AND h.expires_at > %s",
                (username, tx.now),
            )[0]
            if held + len(legs) > self.max_held_seats:
                raise TooManyHolds(
                    f"You may hold at most {self.max_held_seats} seats at once (you hold {held}).",
                    limit=self.max_held_seats,
                )
            hold_id = hold_code(tx.now)
            expires_at = tx.now + seconds
            tx.execute(
                "INSERT INTO holds (hold_id, username, session_id, created_at, expires_at, price_cents, state)"
                " VALUES (%s, %s, %s, %s, %s, %s, 'active')",
                (hold_id, username, session_id, tx.now, expires_at, price.cents),
            )
            seats = self._claim(tx, legs, hold_id, None)
            tx.executemany(
                "INSERT INTO hold_legs (hold_id, leg, flight_id, seat) VALUES (%s, %s, %s, %s)",
                [(hold_id, i, leg.flight.flight_id, seat) for i, (leg, seat) in enumerate(zip(legs, seats))],
            )
            _audit(tx, username, "hold", [(leg.flight.flight_id, seat) for leg, seat in zip(legs, seats)],
                   hold_id=hold_id)
            _remember(tx, username, request_id, "hold", hold_id)
            return Hold(
                hold_id=hold_id,
                username=username,
                legs=tuple(HeldSeat(leg.flight, seat) for leg, seat in zip(legs, seats)),
                expires_at=expires_at,
                price=price,
            )

        return self._transact(work)

    def _hold_by_id(self, tx: _Tx, hold_id: str) -> Hold:
        username, expires_at, price = tx.one(
            "SELECT username, expires_at, price_cents FROM holds WHERE hold_id = %s", (hold_id,)
        )
        legs = tuple(
            HeldSeat(flight_by_id(self._network, flight_id), seat)
            for flight_id, seat in tx.all(
                "SELECT flight_id, seat FROM hold_legs WHERE hold_id = %s ORDER BY leg", (hold_id,)
            )
        )
        return Hold(hold_id, username, legs, expires_at, Money(price, self._currency))

    def _active_hold(self, tx: _Tx, hold_id: str, username: str) -> None:
        """
        Lock C{hold_id} and check that it is an active hold of C{username},
        ending it if its time is up.
        """
        row = tx.one("SELECT username, state, expires_at FROM holds WHERE hold_id = %s FOR UPDATE", (hold_id,))
        if row is None or row[0] != username or row[1] in ("released", "bought"):
            raise HoldNotFound(f"No hold {hold_id!r}.", hold_id=hold_id)
        if row[1] == "expired" or row[2] <= tx.now:
            self._end_hold(tx, hold_id, "expired")
            raise _CommitThenRefuse(
                HoldExpired(f"Hold {hold_id} has expired; its seats are free again.", hold_id=hold_id)
            )

    def release(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[None]:
        def work(tx: _Tx) -> None:
            if _replay(tx, username, request_id, "release") is not None:
                return
            self._active_hold(tx, hold_id, username)
            self._end_hold(tx, hold_id, "released")
            _remember(tx, username, request_id, "release", hold_id)

        return self._transact(work)

    def release_session(self, session_id: str) -> Deferred[list[str]]:
        def work(tx: _Tx) -> list[str]:
            holds = [
                row[0]
                for row in tx.all(
                    "SELECT hold_id FROM holds WHERE session_id = %s AND state = 'active' ORDER BY hold_id",
                    (session_id,),
                )
            ]
            return [hold_id for hold_id in holds if self._end_hold(tx, hold_id, "released")]

        return self._transact(work)

    def expire_hold(self, hold_id: str) -> Deferred[str | None]:
        def work(tx: _Tx) -> str | None:
            row = tx.one("SELECT state, expires_at FROM holds WHERE hold_id = %s FOR UPDATE", (hold_id,))
            if row is None:
                return None
            state, expires_at = row
            if state == "active" and expires_at <= tx.now:
                self._end_hold(tx, hold_id, "expired")
                return "expired"
            return str(state)

        return self._transact(work)

    def expired_holds(self) -> Deferred[list[tuple[str, str]]]:
        def work(tx: _Tx) -> list[tuple[str, str]]:
            # Holds another server's sweep is ending right now are skipped.
            rows = tx.all(
                "SELECT hold_id, session_id FROM holds WHERE state = 'active' AND expires_at <= %s"
                " ORDER BY hold_id LIMIT 1000 FOR UPDATE SKIP LOCKED",
                (tx.now,),
            )
            for hold_id, _ in rows:
                self._end_hold(tx, hold_id, "expired")
            tx.execute("DELETE FROM requests WHERE created_at < %s", (tx.now - REQUEST_RETENTION,))
            tx.execute(
                "DELETE FROM holds WHERE state <> 'active' AND ended_at < %s", (tx.now - REQUEST_RETENTION,)
            )
            return [(str(h), str(s)) for h, s in rows]

        return self._transact(work)

    # -- tickets ------------------------------------------------------------

    def _new_ticket(self, tx: _Tx, username: str, flights: list[Flight]) -> str:
        price = sum(flight.fare.cents for flight in flights)
        for attempt in range(16):
            ticket_id = booking_code(tx.now if attempt < 8 else None)
            if tx.one(
                "INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)"
                " VALUES (%s, %s, 'active', %s, %s, %s) ON CONFLICT (ticket_id) DO NOTHING RETURNING 1",
                (ticket_id, username, price, self._currency, tx.now),
            ):
                return ticket_id
        raise RuntimeError("no free booking code found")

    def _ticket_legs(self, tx: _Tx, ticket_id: str, username: str, legs: list[tuple[Flight, str]]) -> Ticket:
        ticket_legs = new_ticket_legs(legs)
        tx.executemany(TICKET_LEG_INSERT.replace("?", "%s"), ticket_leg_rows(ticket_id, ticket_legs))
        price = Money(sum(leg.price.cents for leg in ticket_legs), self._currency)
        return Ticket(ticket_id, username, "active", ticket_legs, price, tx.now, None)

    def buy_hold(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        def work(tx: _Tx) -> Ticket:
            done = _replay(tx, username, request_id, "buy")
            if done is not None:
                return self._ticket_as_bought(tx, done)
            self._active_hold(tx, hold_id, username)
            legs = []
            for flight_id, seat in tx.all(
                "SELECT flight_id, seat FROM hold_legs WHERE hold_id = %s ORDER BY leg", (hold_id,)
            ):
                flight = flight_by_id(self._network, flight_id)
                if flight.departs_ts <= tx.now:
                    raise FlightDeparted(f"Flight {flight_id} has already departed.", flight=flight_id)
                legs.append((flight, seat))
            ticket_id = self._new_ticket(tx, username, [flight for flight, _ in legs])
            # The conditional update: only seats still claimed by this hold.
            changed = tx.execute(
                "UPDATE seats SET hold_id = NULL, ticket_id = %s WHERE hold_id = %s", (ticket_id, hold_id)
            ).rowcount
            if changed != len(legs):
                raise RuntimeError(f"hold {hold_id} covers {changed} seats, expected {len(legs)}")
            tx.execute(
                "UPDATE holds SET state = 'bought', ended_at = %s WHERE hold_id = %s AND state = 'active'",
                (tx.now, hold_id),
            )
            _audit(tx, username, "buy", [(f.flight_id, seat) for f, seat in legs], hold_id=hold_id,
                   ticket_id=ticket_id)
            _remember(tx, username, request_id, "buy", ticket_id)
            return self._ticket_legs(tx, ticket_id, username, legs)

        return self._transact(work)

    def buy(self, username: str, legs: list[LegRequest], request_id: str | None = None) -> Deferred[Ticket]:
        def work(tx: _Tx) -> Ticket:
            done = _replay(tx, username, request_id, "buy")
            if done is not None:
                return self._ticket_as_bought(tx, done)
            ticket_id = self._new_ticket(tx, username, [leg.flight for leg in legs])
            seats = self._claim(tx, legs, None, ticket_id)
            _audit(tx, username, "buy", [(leg.flight.flight_id, seat) for leg, seat in zip(legs, seats)],
                   ticket_id=ticket_id)
            _remember(tx, username, request_id, "buy", ticket_id)
            return self._ticket_legs(tx, ticket_id, username, [(leg.flight, seat) for leg, seat in zip(legs, seats)])

        return self._transact(work)

    def tickets(self, username: str) -> Deferred[list[Ticket]]:
        def work(tx: _Tx) -> list[Ticket]:
            return self._tickets(tx, "username = %s", (username,))

        return self._transact(work)

    def _tickets(self, tx: _Tx, where: str, args: tuple[Any, ...], lock: bool = False) -> list[Ticket]:
        rows = tx.all(
            "SELECT ticket_id, username, status, price_cents, currency, bought_at, cancelled_at FROM tickets"
            f" WHERE {where} ORDER BY bought_at, n" + (" FOR UPDATE" if lock else ""),
            args,
        )
        legs: dict[str, list[TicketLeg]] = {row[0]: [] for row in rows}
        if rows:
            currency_of = {row[0]: row[4] for row in rows}
            for ticket_id, flight_id, number, origin, destination, departure, arrival, seat, cents in tx.all(
                "SELECT ticket_id, flight_id, number, origin, destination, departure, arrival, seat, price_cents"
                " FROM ticket_legs WHERE ticket_id = ANY(%s) ORDER BY ticket_id, leg",
                (list(legs),),
            ):
                legs[ticket_id].append(
                    TicketLeg(flight_id, number, origin, destination, departure, arrival, seat,
                              Money(cents, currency_of[ticket_id]))
                )
        return [
            Ticket(ticket_id, username, status, tuple(legs[ticket_id]), Money(price, currency), bought_at, cancelled_at)
            for ticket_id, username, status, price, currency, bought_at, cancelled_at in rows
        ]

    def _ticket_as_bought(self, tx: _Tx, ticket_id: str) -> Ticket:
        [ticket] = self._tickets(tx, "ticket_id = %s", (ticket_id,))
        return attrs.evolve(ticket, status="active", cancelled_at=None)

    def cancel(self, ticket_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        def work(tx: _Tx) -> Ticket:
            done = _replay(tx, username, request_id, "cancel")
            if done is not None:
                [cancelled] = self._tickets(tx, "ticket_id = %s", (done,))
                return cancelled
            found = self._tickets(tx, "ticket_id = %s AND username = %s", (ticket_id, username), lock=True)
            if not found:
                raise TicketNotFound(f"No ticket {ticket_id!r}.", ticket_id=ticket_id)
            ticket = found[0]
            if ticket.status == "cancelled":
                raise AlreadyCancelled(f"Ticket {ticket_id} is already cancelled.", ticket_id=ticket_id)
            first = min(datetime.fromisoformat(leg.departure).timestamp() for leg in ticket.legs)
            if first <= tx.now:
                raise FlightDeparted(
                    f"Ticket {ticket_id} cannot be cancelled: its first flight has departed.", ticket_id=ticket_id
                )
            tx.execute(
                "UPDATE tickets SET status = 'cancelled', cancelled_at = %s"
                " WHERE ticket_id = %s AND username = %s AND status = 'active'",
                (tx.now, ticket_id, username),
            )
            tx.execute("DELETE FROM seats WHERE ticket_id = %s", (ticket_id,))
            _audit(tx, username, "cancel", [(leg.flight_id, leg.seat) for leg in ticket.legs], ticket_id=ticket_id)
            _remember(tx, username, request_id, "cancel", ticket_id)
            return Ticket(ticket_id, username, "cancelled", ticket.legs, ticket.price, ticket.bought_at, tx.now)

        return self._transact(work)

    def seats(self, flight: Flight) -> Deferred[list[SeatState]]:
        def work(tx: _Tx) -> list[SeatState]:
            rows = tx.all(
                "SELECT s.seat, h.username, h.expires_at, t.username FROM seats s"
                " LEFT JOIN holds h ON h.hold_id = s.hold_id"
                " LEFT JOIN tickets t ON t.ticket_id = s.ticket_id WHERE s.flight_id = %s",
                (flight.flight_id,),
            )
            return seat_map(flight, rows, tx.now)

        return self._transact(work)

    def free_seats(self, flights: list[Flight]) -> Deferred[dict[str, int]]:
        def work(tx: _Tx) -> dict[str, int]:
            result = {flight.flight_id: flight.aircraft.capacity for flight in flights}
            # Seats of holds whose time is up but that nobody has ended yet are free.
            for flight_id, taken in tx.all(
                "SELECT s.flight_id, COUNT(*) FROM seats s LEFT JOIN holds h ON h.hold_id = s.hold_id"
                " WHERE s.flight_id = ANY(%s) AND (s.ticket_id IS NOT NULL OR h.expires_at > %s)"
                " GROUP BY s.flight_id",
                (list(result), tx.now),
            ):
                result[flight_id] -= taken
            return result

        return self._transact(work)


__all__ = ["MIGRATIONS", "PostgresStore", "SCHEMA_VERSION", "is_postgres_url", "prepare"]
