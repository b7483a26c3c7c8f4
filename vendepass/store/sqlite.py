"""
The embedded default store: one SQLite file in WAL mode with
C{synchronous=FULL}, so a transaction is on disk before its caller hears of
it. All work runs as jobs on an L{IExecutor} (one dedicated thread in
production: SQLite has a single writer anyway).

Seat state lives in table C{seats}: a row per seat that is held or sold
(free seats have no row), with C{PRIMARY KEY (flight_id, seat)} so no seat
can ever be claimed twice, and a CHECK that a row belongs to exactly one hold
or one ticket. A held seat whose hold has expired counts as free: every
transaction that looks at a seat ends such holds first, inside itself.
"""

from __future__ import annotations

import bisect
import json
import sqlite3
from collections import deque
from datetime import datetime
from typing import Any, Callable, Iterable, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vendepass.errors import (
    AlreadyCancelled,
    FlightDeparted,
    HoldExpired,
    HoldNotFound,
    SessionClosed,
    StorageUnavailable,
    TooManyHolds,
    InvalidRequest,
    TicketNotFound,
    UsernameTaken,
)
from vendepass.fixtures import Fixtures
from vendepass.model import (
    Flight,
    HeldSeat,
    Hold,
    Money,
    Network,
    SeatState,
    Ticket,
    TicketLeg,
)
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

# Per flight: taken seats, and the (sorted) expiry times of its held seats.
_Refreshed = dict[str, tuple[int, tuple[float, ...]]]


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
    fare_cents INTEGER NOT NULL CHECK (fare_cents >= 0)
);
CREATE TABLE users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE holds (
    hold_id TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username),
    session_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    price_cents INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'expired', 'released', 'bought')),
    ended_at REAL
);
CREATE INDEX holds_active ON holds(state, expires_at);
CREATE INDEX holds_session ON holds(session_id) WHERE state = 'active';
CREATE TABLE hold_legs (
    hold_id TEXT NOT NULL REFERENCES holds(hold_id) ON DELETE CASCADE,
    leg INTEGER NOT NULL,
    flight_id TEXT NOT NULL,
    seat TEXT NOT NULL,
    PRIMARY KEY (hold_id, leg)
) WITHOUT ROWID;
CREATE TABLE tickets (
    ticket_id TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username),
    status TEXT NOT NULL CHECK (status IN ('active', 'cancelled')),
    price_cents INTEGER NOT NULL,
    currency TEXT NOT NULL,
    bought_at REAL NOT NULL,
    cancelled_at REAL
);
CREATE INDEX tickets_user ON tickets(username, bought_at);
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
    price_cents INTEGER NOT NULL,
    PRIMARY KEY (ticket_id, leg)
) WITHOUT ROWID;
CREATE TABLE seats (
    flight_id TEXT NOT NULL,
    seat TEXT NOT NULL,
    hold_id TEXT REFERENCES holds(hold_id),
    ticket_id TEXT REFERENCES tickets(ticket_id),
    PRIMARY KEY (flight_id, seat),
    CHECK ((hold_id IS NULL) <> (ticket_id IS NULL))
) WITHOUT ROWID;
CREATE INDEX seats_hold ON seats(hold_id) WHERE hold_id IS NOT NULL;
CREATE INDEX seats_ticket ON seats(ticket_id) WHERE ticket_id IS NOT NULL;
"""

# Version 2: safe retries (the outcome of each request_id) and the
# append-only audit log of every change of seat state.
_SCHEMA_2 = """
CREATE TABLE requests (
    username TEXT NOT NULL,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (username, request_id)
) WITHOUT ROWID;
CREATE INDEX requests_age ON requests(created_at);
CREATE INDEX holds_user ON holds(username) WHERE state = 'active';
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('hold', 'release', 'expire', 'buy', 'cancel')),
    hold_id TEXT,
    ticket_id TEXT,
    seats TEXT NOT NULL
);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
INSERT INTO audit (at, username, action, ticket_id, seats)
    SELECT t.bought_at, t.username, 'buy', t.ticket_id,
           (SELECT json_group_array(l.flight_id || '/' || l.seat)
              FROM (SELECT flight_id, seat FROM ticket_legs WHERE ticket_id = t.ticket_id ORDER BY leg) l)
    FROM tickets t WHERE t.status = 'active' ORDER BY t.bought_at, t.rowid;
"""

# Version 3: finding a flight's expired holds visits its held seats only,
# not every sold one.
_SCHEMA_3 = """
CREATE INDEX seats_held ON seats(flight_id) WHERE hold_id IS NOT NULL;
"""

# Version 4: how many seats of each flight have a row (held or sold), kept
# by triggers in the same transaction as the seat rows themselves, so free
# seat counts for a search cost one lookup per flight however full it is.
_SCHEMA_4 = """
CREATE TABLE flight_taken (
    flight_id TEXT PRIMARY KEY,
    seats INTEGER NOT NULL CHECK (seats >= 0)
) WITHOUT ROWID;
INSERT INTO flight_taken (flight_id, seats) SELECT flight_id, COUNT(*) FROM seats GROUP BY flight_id;
CREATE TRIGGER seats_taken AFTER INSERT ON seats
BEGIN
    INSERT INTO flight_taken (flight_id, seats) VALUES (NEW.flight_id, 1)
        ON CONFLICT (flight_id) DO UPDATE SET seats = seats + 1;
END;
CREATE TRIGGER seats_freed AFTER DELETE ON seats
BEGIN
    UPDATE flight_taken SET seats = seats - 1 WHERE flight_id = OLD.flight_id;
END;
CREATE TRIGGER seats_stay_on_their_flight BEFORE UPDATE OF flight_id, seat ON seats
BEGIN SELECT RAISE(ABORT, 'a seat row never moves to another flight or seat'); END;
"""

# MIGRATIONS[n] takes a database from schema version n to n + 1 (PRAGMA
# user_version). Append to it; never edit a migration that has shipped.
MIGRATIONS: list[str] = [_SCHEMA_1, _SCHEMA_2, _SCHEMA_3, _SCHEMA_4]
SCHEMA_VERSION = len(MIGRATIONS)


def _audit(
    db: sqlite3.Connection,
    now: float,
    username: str,
    action: str,
    seats: Iterable[tuple[str, str]],
    hold_id: str | None = None,
    ticket_id: str | None = None,
) -> None:
    """
    Append one change of seat state to the audit log, in the transaction that makes it.
    """
    db.execute(
        "INSERT INTO audit (at, username, action, hold_id, ticket_id, seats) VALUES (?, ?, ?, ?, ?, ?)",
        (now, username, action, hold_id, ticket_id, json.dumps([f"{f}/{s}" for f, s in seats])),
    )


def _replay(db: sqlite3.Connection, username: str, request_id: str | None, kind: str) -> str | None:
    """
    The outcome recorded for C{request_id} of C{username}, if that request
    was already done: then it is answered again, not done twice.
    """
    if request_id is None:
        return None
    row = db.execute(
        "SELECT kind, outcome FROM requests WHERE username = ? AND request_id = ?", (username, request_id)
    ).fetchone()
    if row is None:
        return None
    if row[0] != kind:
        raise InvalidRequest(
            f"request_id {request_id!r} was already used for another operation ({row[0]}).", field="request_id"
        )
    return str(row[1])


def _remember(db: sqlite3.Connection, now: float, username: str, request_id: str | None, kind: str, outcome: str) -> None:
    if request_id is not None:
        db.execute(
            "INSERT INTO requests (username, request_id, kind, outcome, created_at) VALUES (?, ?, ?, ?, ?)",
            (username, request_id, kind, outcome, now),
        )


def _connect(path: str) -> sqlite3.Connection:
    # Every statement is prepared once and kept (the default cache holds 128).
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=512)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL in WAL mode: the WAL is fsynced at every commit, so an
    # acknowledged purchase survives a power loss, not only a crash.
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=5000")
    # 64 MiB of page cache (the default is 2 MiB): the indexes that every
    # purchase touches stay in memory as the database grows.
    db.execute("PRAGMA cache_size=-65536")
    return db


def migrate(db: sqlite3.Connection, start: int) -> None:
    """
    Apply the migrations from schema version C{start} on, inside the
    caller's transaction.
    """
    for migration in MIGRATIONS[start:]:
        statement = ""
        for line in migration.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                db.execute(statement)
                statement = ""
        assert not statement.strip(), statement
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")


def create(db: sqlite3.Connection, fixtures: Fixtures, hash_password: Callable[[str], str], now: float) -> None:
    """
    Create the schema in an empty database and load C{fixtures} into it, in
    one transaction.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        migrate(db, 0)
        load_fixtures(db.executemany, fixtures, hash_password, now)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@implementer(IStore)
class SQLiteStore:
    """
    The SQLite store. Open it with L{SQLiteStore.open}.
    """

    _log = Logger()

    def __init__(
        self,
        db: sqlite3.Connection,
        clock: IReactorTime,
        executor: IExecutor,
        max_held_seats: int = 9,
        max_batch: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_held_seats = max_held_seats
        self.max_batch = max_batch
        self._db = db
        self._clock = clock
        self._executor = executor
        # Group commit: writes wait here while a batch is in flight.
        self._pending: deque[tuple[Callable[[sqlite3.Connection, float], Any], Deferred[Any]]] = deque()
        self._batching = False
        # Holds ended because their time was up, by the transaction running
        # now (writer thread only), and who wants to hear of them.
        self._ended: list[tuple[str, str]] = []
        self._watchers: list[Callable[[str, str], None]] = []
        self.batches = 0
        self.batched_writes = 0
        # With group commit, free seat counts are answered from memory: for
        # each flight with taken seats, how many, and when each of its held
        # seats' holds expire. Temporary triggers note the flights whose
        # seats a transaction changes; just before its COMMIT those are read
        # back (in the writer) and replaced here (on the reactor thread) before
        # any write of the batch is answered. None (without group commit):
        # counts come from the database.
        self._availability: dict[str, tuple[int, tuple[float, ...]]] | None = None
        if max_batch > 1:
            db.execute("PRAGMA temp_store=MEMORY")
            db.execute("CREATE TEMP TABLE IF NOT EXISTS touched (flight_id TEXT PRIMARY KEY) WITHOUT ROWID")
            for event, row in (("INSERT", "NEW"), ("DELETE", "OLD"), ("UPDATE", "NEW")):
                db.execute(
                    f"CREATE TEMP TRIGGER IF NOT EXISTS touched_{event.lower()} AFTER {event} ON main.seats"
                    f" BEGIN INSERT OR IGNORE INTO touched (flight_id) VALUES ({row}.flight_id); END"
                )
        self._network = read_network(db)
        self._currency = self._network.currency

    @classmethod
    def open(
        cls,
        path: str,
        clock: IReactorTime,
        executor: IExecutor,
        fixtures: Callable[[], Fixtures],
        hash_password: Callable[[str], str],
        max_held_seats: int = 9,
        max_batch: int = 1,
    ) -> SQLiteStore:
        """
        Open (creating, migrating and loading C{fixtures()} if new) the
        database at C{path}, and forget the holds of any earlier run: holds
        do not outlive their connections, and those connections are gone.

        C{max_batch} is how many writes may share one transaction (group
        commit); 1 gives every write a transaction of its own.

        This blocks: call it before the reactor runs, or from a thread.
        """
        db = _connect(path)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                create(db, fixtures(), hash_password, clock.seconds())
            elif version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{path} has schema version {version}, newer than this VendePass ({SCHEMA_VERSION})"
                )
            elif version < SCHEMA_VERSION:
                db.execute("BEGIN IMMEDIATE")
                try:
                    migrate(db, version)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            store = cls(db, clock, executor, max_held_seats, max_batch)
            now = clock.seconds()
            db.execute("BEGIN IMMEDIATE")
            for (hold_id,) in db.execute("SELECT hold_id FROM holds WHERE state = 'active'").fetchall():
                store._end_hold(db, hold_id, "released", now)
            db.execute("DELETE FROM holds WHERE ended_at < ?", (now - 86400,))
            db.execute("COMMIT")
            if max_batch > 1:
                store._availability = store._load_availability()
            return store
        except BaseException:
            db.close()
            raise

    def start(self) -> None:
        self._executor.start()

    def stop(self) -> None:
        self._executor.stop()
        self._db.close()

    def network(self) -> Network:
        return self._network

    # -- transactions -------------------------------------------------------

    def _write(self, work: Callable[[sqlite3.Connection, float], T]) -> Deferred[T]:
        """
        Run C{work(db, now)} atomically in a write transaction on the
        executor, and fire with its outcome once that transaction is on disk.

        With C{max_batch} above 1 this is group commit: while one batch is
        being written, new writes queue up, and the next batch runs them all,
        in order, in one transaction, each inside a savepoint of its own, so
        a write that fails is rolled back alone. One COMMIT (one fsync) then
        makes the whole batch durable, and only then does any of them get an
        answer. If the batch cannot commit, every write in it fails with
        L{StorageUnavailable}: none was acknowledged, so none is lost.
        """
        if self.max_batch > 1:
            d: Deferred[T] = Deferred()
            self._pending.append((work, d))
            if not self._batching:
                self._next_batch()
            return d
        return self._write_one(work)

    def _next_batch(self) -> None:
        """
        Send the queued writes (up to C{max_batch}) to the executor as one transaction.
        """
        batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        if not batch:
            self._batching = False
            return
        self._batching = True
        self.batches += 1
        self.batched_writes += len(batch)
        works = [work for work, _ in batch]

        def deliver(done: tuple[list[tuple[bool, Any]], _Refreshed, list[tuple[str, str]]] | Failure) -> None:
            # Still "batching" while the answers go out: writes that their
            # callbacks start join the queue, in order, for the next batch.
            outcomes: list[tuple[bool, Any]] | Failure
            if isinstance(done, Failure):
                outcomes = done
            else:
                outcomes, refreshed, ended = done
                self._refreshed(refreshed)
                self._report(ended)
            try:
                for i, (_, d) in enumerate(batch):
                    if isinstance(outcomes, Failure):
                        d.errback(outcomes)
                    else:
                        ok, value = outcomes[i]
                        if ok:
                            d.callback(value)
                        else:
                            d.errback(value)
            finally:
                self._next_batch()

        self._executor.submit(self._guarded(lambda: self._run_batch(works))).addBoth(deliver)

    def _run_batch(
        self, works: list[Callable[[sqlite3.Connection, float], Any]]
    ) -> tuple[list[tuple[bool, Any]], _Refreshed, list[tuple[str, str]]]:
        """
        Run C{works} in one transaction, each in its own savepoint; commit
        once. Returns C{(True, result)} or C{(False, failure)} per work, the
        availability of the flights whose seats changed, and the holds that
        were ended because their time was up.
        """
        db = self._db
        outcomes: list[tuple[bool, Any]] = []
        self._ended.clear()
        db.execute("BEGIN IMMEDIATE")
        try:
            for work in works:
                mark = len(self._ended)
                db.execute("SAVEPOINT write")
                try:
                    result = work(db, self._clock.seconds())
                except _CommitThenRefuse as refusal:
                    db.execute("RELEASE write")
                    outcomes.append((False, Failure(refusal.error)))
                except sqlite3.OperationalError:
                    # The database itself failed: the whole batch goes.
                    raise
                except Exception:
                    outcomes.append((False, Failure()))
                    db.execute("ROLLBACK TO write")
                    db.execute("RELEASE write")
                    del self._ended[mark:]
                else:
                    db.execute("RELEASE write")
                    outcomes.append((True, result))
            # Read inside the transaction: what it is about to commit.
            refreshed = self._read_touched(db)
            db.execute("COMMIT")
        except BaseException:
            self._ended.clear()
            self._rollback(db)
            raise
        ended = self._ended[:]
        self._ended.clear()
        return outcomes, refreshed, ended

    # -- free seats from memory ---------------------------------------------

    def _load_availability(self) -> dict[str, tuple[int, tuple[float, ...]]]:
        """
        Every flight's taken seats and held seats' expiry times (blocking: at
        open, or as an executor job).
        """
        db = self._db
        db.execute("BEGIN")
        try:
            taken = dict(db.execute("SELECT flight_id, seats FROM flight_taken WHERE seats > 0").fetchall())
            expiries = self._held_expiries(db, "")
            db.execute("DELETE FROM temp.touched")
        finally:
            db.execute("COMMIT")
        return {f: (n, tuple(sorted(expiries.get(f, ())))) for f, n in taken.items()}

    def _held_expiries(self, db: sqlite3.Connection, where: str) -> dict[str, list[float]]:
        expiries: dict[str, list[float]] = {}
        for flight_id, expires_at in db.execute(
            "SELECT s.flight_id, h.expires_at FROM seats s INDEXED BY seats_hold JOIN holds h ON h.hold_id = s.hold_id"
            f" WHERE s.hold_id IS NOT NULL {where}"
        ):
            expiries.setdefault(flight_id, []).append(expires_at)
        return expiries

    def _read_touched(self, db: sqlite3.Connection) -> _Refreshed:
        """
        In a write transaction, before its COMMIT: the availability of the
        flights it changed, as it is about to commit it.
        """
        if self.max_batch <= 1:
            return {}
        touched = [row[0] for row in db.execute("SELECT flight_id FROM temp.touched")]
        if not touched:
            return {}
        taken = dict(
            db.execute(
                "SELECT t.flight_id, COALESCE(f.seats, 0) FROM temp.touched t"
                " LEFT JOIN flight_taken f ON f.flight_id = t.flight_id"
            ).fetchall()
        )
        expiries = self._held_expiries(db, "AND s.flight_id IN (SELECT flight_id FROM temp.touched)")
        db.execute("DELETE FROM temp.touched")
        return {f: (taken.get(f, 0), tuple(sorted(expiries.get(f, ())))) for f in touched}

    def _refreshed(self, refreshed: _Refreshed) -> None:
        """
        On the reactor thread: take in the availability a batch committed.
        """
        if self._availability is not None:
            for flight_id, state in refreshed.items():
                if state[0]:
                    self._availability[flight_id] = state
                else:
                    self._availability.pop(flight_id, None)

    def _rollback(self, db: sqlite3.Connection) -> None:
        """
        Roll back the open transaction, if any, after a failure.
        """
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                self._log.failure("rolling back")

    def _write_one(self, work: Callable[[sqlite3.Connection, float], T]) -> Deferred[T]:
        """
        Run C{work(db, now)} in a write transaction of its own.
        """

        ended: list[tuple[str, str]] = []

        def job() -> T:
            db = self._db
            self._ended.clear()
            db.execute("BEGIN IMMEDIATE")
            try:
                try:
                    result = work(db, self._clock.seconds())
                except _CommitThenRefuse as refusal:
                    db.execute("COMMIT")
                    ended.extend(self._ended)
                    raise refusal.error
                db.execute("COMMIT")
                ended.extend(self._ended)
            except BaseException:
                self._rollback(db)
                raise
            finally:
                self._ended.clear()
            return result

        def report(outcome: Any) -> Any:
            self._report(ended)
            return outcome

        return self._executor.submit(self._guarded(job)).addBoth(report)

    def watch_expiries(self, callback: Callable[[str, str], None]) -> None:
        self._watchers.append(callback)

    def _report(self, ended: list[tuple[str, str]]) -> None:
        """
        On the reactor thread, after the commit: tell the watchers of the
        holds that expired.
        """
        for hold_id, session_id in ended:
            for callback in self._watchers:
                try:
                    callback(hold_id, session_id)
                except Exception:
                    self._log.failure("reporting the expiry of hold {hold_id}", hold_id=hold_id)

    def _guarded(self, job: Callable[[], T]) -> Callable[[], T]:
        """
        C{job}, with the database's operational failures (disk full, locked,
        I/O error) turned into L{StorageUnavailable}.
        """

        def guarded() -> T:
            try:
                if self._db.in_transaction:
                    # A failed COMMIT can leave a transaction open: end it,
                    # or nothing could ever start again.
                    self._log.warn("rolling back a transaction left open by a failure")
                    self._db.execute("ROLLBACK")
                return job()
            except sqlite3.OperationalError as e:
                self._log.error("storage unavailable: {error}", error=str(e))
                raise StorageUnavailable() from e

        return guarded

    def _read(self, work: Callable[[sqlite3.Connection, float], T]) -> Deferred[T]:
        """
        Run C{work(db, now)} in one read transaction (a consistent snapshot).
        """

        def job() -> T:
            db = self._db
            db.execute("BEGIN")
            try:
                result = work(db, self._clock.seconds())
            except BaseException:
                self._rollback(db)
                raise
            db.execute("COMMIT")
            return result

        return self._executor.submit(self._guarded(job))

    # -- users --------------------------------------------------------------

    def add_user(self, username: str, password_hash: str) -> Deferred[None]:
        def work(db: sqlite3.Connection, now: float) -> None:
            try:
                db.execute(
                    "INSERT INTO users (username, password_hash, created_at) VALUES (?, ?, ?)",
                    (username, password_hash, now),
                )
            except sqlite3.IntegrityError:
                raise UsernameTaken(f"The username {username!r} is already taken.")

        return self._write(work)

    def password_hash(self, username: str) -> Deferred[str | None]:
        def work(db: sqlite3.Connection, now: float) -> str | None:
            row = db.execute("SELECT password_hash FROM users WHERE username = ?", (username,)).fetchone()
            return None if row is None else str(row[0])

        return self._read(work)

    # -- seats --------------------------------------------------------------

    def _end_hold(self, db: sqlite3.Connection, hold_id: str, state: str, now: float) -> None:
        """
        End an active hold (C{state} is C{"released"} or C{"expired"}) and free its seats.
        """
        seats = db.execute(
            "SELECT s.flight_id, s.seat FROM hold_legs l JOIN seats s"
            " ON s.flight_id = l.flight_id AND s.seat = l.seat AND s.hold_id = l.hold_id"
            " WHERE l.hold_id = ? ORDER BY l.leg",
            (hold_id,),
        ).fetchall()
        db.execute("DELETE FROM seats WHERE hold_id = ?", (hold_id,))
        ended = db.execute(
            "UPDATE holds SET state = ?, ended_at = ? WHERE hold_id = ? AND state = 'active'"
            " RETURNING username, session_id",
            (state, now, hold_id),
        ).fetchone()
        if ended is not None:
            action = "expire" if state == "expired" else "release"
            _audit(db, now, ended[0], action, seats, hold_id=hold_id)
            if state == "expired":
                self._ended.append((hold_id, ended[1]))

    def _end_expired_on(self, db: sqlite3.Connection, flight_id: str, now: float) -> None:
        expired = db.execute(
            "SELECT DISTINCT s.hold_id FROM seats s INDEXED BY seats_held JOIN holds h ON h.hold_id = s.hold_id"
            " WHERE s.flight_id = ? AND s.hold_id IS NOT NULL AND h.expires_at <= ?",
            (flight_id, now),
        ).fetchall()
        for (hold_id,) in expired:
            self._end_hold(db, hold_id, "expired", now)

    def _claim(
        self, db: sqlite3.Connection, now: float, legs: list[LegRequest], hold_id: str | None, ticket_id: str | None
    ) -> list[str]:
        """
        Claim one seat per leg for a hold or a ticket, or raise (and the
        caller's transaction rolls back, all or nothing).
        """
        seats: list[str] = []
        for leg in legs:
            flight = leg.flight
            if flight.departs_ts <= now:
                raise FlightDeparted(f"Flight {flight.flight_id} has already departed.", flight=flight.flight_id)
            self._end_expired_on(db, flight.flight_id, now)
            if leg.seat is None:
                # One string rather than a row per taken seat: much cheaper
                # once a flight fills up.
                (listed,) = db.execute(
                    "SELECT group_concat(seat, ' ') FROM seats WHERE flight_id = ?", (flight.flight_id,)
                ).fetchone()
                seat = first_free_seat(flight, set(listed.split()) if listed else set())
            else:
                seat = leg.seat
                check_seat(flight, seat)
                row = db.execute(
                    "SELECT s.ticket_id, h.expires_at FROM seats s LEFT JOIN holds h ON h.hold_id = s.hold_id"
                    " WHERE s.flight_id = ? AND s.seat = ?",
                    (flight.flight_id, seat),
                ).fetchone()
                if row is not None:
                    raise seat_taken(flight, seat, *row)
            db.execute(
                "INSERT INTO seats (flight_id, seat, hold_id, ticket_id) VALUES (?, ?, ?, ?)",
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

        def work(db: sqlite3.Connection, now: float) -> Hold:
            expires_at = now + seconds
            done = _replay(db, username, request_id, "hold")
            if done is not None:
                return self._hold_by_id(db, done)
            # Checked inside the transaction: a connection that closed while
            # this hold waited must not leave an orphaned hold behind.
            if not alive():
                raise SessionClosed()
            held = db.execute(
                "SELECT COUNT(*) FROM holds h JOIN hold_legs l ON l.hold_id = h.hold_id"
                " WHERE h.username = ? AND h.state = 'active' AND h.expires_at > ?",
                (username, now),
            ).fetchone()[0]
            if held + len(legs) > self.max_held_seats:
                raise TooManyHolds(
                    f"You may hold at most {self.max_held_seats} seats at once (you hold {held}).",
                    limit=self.max_held_seats,
                )
            hold_id = hold_code(now)
            db.execute(
                "INSERT INTO holds (hold_id, username, session_id, created_at, expires_at, price_cents, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'active')",
                (hold_id, username, session_id, now, expires_at, price.cents),
            )
            seats = self._claim(db, now, legs, hold_id, None)
            db.executemany(
                "INSERT INTO hold_legs (hold_id, leg, flight_id, seat) VALUES (?, ?, ?, ?)",
                [(hold_id, i, leg.flight.flight_id, seat) for i, (leg, seat) in enumerate(zip(legs, seats))],
            )
            _audit(db, now, username, "hold", [(leg.flight.flight_id, seat) for leg, seat in zip(legs, seats)],
                   hold_id=hold_id)
            _remember(db, now, username, request_id, "hold", hold_id)
            return Hold(
                hold_id=hold_id,
                username=username,
                legs=tuple(HeldSeat(leg.flight, seat) for leg, seat in zip(legs, seats)),
                expires_at=expires_at,
                price=price,
            )

        return self._write(work)

    def _hold_by_id(self, db: sqlite3.Connection, hold_id: str) -> Hold:
        username, expires_at, price = db.execute(
            "SELECT username, expires_at, price_cents FROM holds WHERE hold_id = ?", (hold_id,)
        ).fetchone()
        legs = tuple(
            HeldSeat(flight_by_id(self._network, flight_id), seat)
            for flight_id, seat in db.execute(
                "SELECT flight_id, seat FROM hold_legs WHERE hold_id = ? ORDER BY leg", (hold_id,)
            )
        )
        return Hold(hold_id, username, legs, expires_at, Money(price, self._currency))

    def _active_hold(self, db: sqlite3.Connection, hold_id: str, username: str, now: float) -> None:
        """
        Check that C{hold_id} is an active hold of C{username}, ending it if
        its time is up.
        """
        row = db.execute("SELECT username, state, expires_at FROM holds WHERE hold_id = ?", (hold_id,)).fetchone()
        if row is None or row[0] != username or row[1] in ("released", "bought"):
            raise HoldNotFound(f"No hold {hold_id!r}.", hold_id=hold_id)
        if row[1] == "expired" or row[2] <= now:
            self._end_hold(db, hold_id, "expired", now)
            raise _CommitThenRefuse(
                HoldExpired(f"Hold {hold_id} has expired; its seats are free again.", hold_id=hold_id)
            )

    def release(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[None]:
        def work(db: sqlite3.Connection, now: float) -> None:
            if _replay(db, username, request_id, "release") is not None:
                return
            self._active_hold(db, hold_id, username, now)
            self._end_hold(db, hold_id, "released", now)
            _remember(db, now, username, request_id, "release", hold_id)

        return self._write(work)

    def release_session(self, session_id: str) -> Deferred[list[str]]:
        def work(db: sqlite3.Connection, now: float) -> list[str]:
            holds = [
                row[0]
                for row in db.execute(
                    "SELECT hold_id FROM holds WHERE session_id = ? AND state = 'active'", (session_id,)
                )
            ]
            for hold_id in holds:
                self._end_hold(db, hold_id, "released", now)
            return holds

        return self._write(work)

    def expire_hold(self, hold_id: str) -> Deferred[str | None]:
        def work(db: sqlite3.Connection, now: float) -> str | None:
            row = db.execute("SELECT state, expires_at FROM holds WHERE hold_id = ?", (hold_id,)).fetchone()
            if row is None:
                return None
            state, expires_at = row
            if state == "active" and expires_at <= now:
                self._end_hold(db, hold_id, "expired", now)
                return "expired"
            return str(state)

        return self._write(work)

    def expired_holds(self) -> Deferred[list[tuple[str, str]]]:
        def work(db: sqlite3.Connection, now: float) -> list[tuple[str, str]]:
            rows = db.execute(
                "SELECT hold_id, session_id FROM holds WHERE state = 'active' AND expires_at <= ?", (now,)
            ).fetchall()
            for hold_id, _ in rows:
                self._end_hold(db, hold_id, "expired", now)
            # Retries are answered for at least REQUEST_RETENTION seconds.
            db.execute("DELETE FROM requests WHERE created_at < ?", (now - REQUEST_RETENTION,))
            return [(str(h), str(s)) for h, s in rows]

        return self._write(work)

    # -- tickets ------------------------------------------------------------

    def _new_ticket(self, db: sqlite3.Connection, username: str, now: float, flights: list[Flight]) -> str:
        """
        Insert a ticket (without its legs) and return its fresh booking code.
        """
        price = sum(flight.fare.cents for flight in flights)
        for attempt in range(16):
            # After a few clashes (a day of hundreds of millions of
            # sales), any free code will do.
            ticket_id = booking_code(now if attempt < 8 else None)
            if db.execute("SELECT 1 FROM tickets WHERE ticket_id = ?", (ticket_id,)).fetchone() is None:
                break
        else:
            raise RuntimeError("no free booking code found")
        db.execute(
            "INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)"
            " VALUES (?, ?, 'active', ?, ?, ?)",
            (ticket_id, username, price, self._currency, now),
        )
        return ticket_id

    def _ticket_legs(
        self, db: sqlite3.Connection, ticket_id: str, username: str, now: float, legs: list[tuple[Flight, str]]
    ) -> Ticket:
        """
        Record the legs of a new ticket and return it.
        """
        ticket_legs = new_ticket_legs(legs)
        db.executemany(TICKET_LEG_INSERT, ticket_leg_rows(ticket_id, ticket_legs))
        price = Money(sum(leg.price.cents for leg in ticket_legs), self._currency)
        return Ticket(ticket_id, username, "active", ticket_legs, price, now, None)

    def buy_hold(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        def work(db: sqlite3.Connection, now: float) -> Ticket:
            done = _replay(db, username, request_id, "buy")
            if done is not None:
                return self._ticket_as_bought(db, done)
            self._active_hold(db, hold_id, username, now)
            legs = []
            for flight_id, seat in db.execute(
                "SELECT flight_id, seat FROM hold_legs WHERE hold_id = ? ORDER BY leg", (hold_id,)
            ).fetchall():
                flight = flight_by_id(self._network, flight_id)
                if flight.departs_ts <= now:
                    raise FlightDeparted(f"Flight {flight_id} has already departed.", flight=flight_id)
                legs.append((flight, seat))
            ticket_id = self._new_ticket(db, username, now, [flight for flight, _ in legs])
            # The conditional update: only seats still claimed by this hold.
            changed = db.execute(
                "UPDATE seats SET hold_id = NULL, ticket_id = ? WHERE hold_id = ?", (ticket_id, hold_id)
            ).rowcount
            if changed != len(legs):
                raise RuntimeError(f"hold {hold_id} covers {changed} seats, expected {len(legs)}")
            db.execute(
                "UPDATE holds SET state = 'bought', ended_at = ? WHERE hold_id = ? AND state = 'active'",
                (now, hold_id),
            )
            _audit(db, now, username, "buy", [(f.flight_id, seat) for f, seat in legs], hold_id=hold_id,
                   ticket_id=ticket_id)
            _remember(db, now, username, request_id, "buy", ticket_id)
            return self._ticket_legs(db, ticket_id, username, now, legs)

        return self._write(work)

    def buy(self, username: str, legs: list[LegRequest], request_id: str | None = None) -> Deferred[Ticket]:
        def work(db: sqlite3.Connection, now: float) -> Ticket:
            done = _replay(db, username, request_id, "buy")
            if done is not None:
                return self._ticket_as_bought(db, done)
            ticket_id = self._new_ticket(db, username, now, [leg.flight for leg in legs])
            seats = self._claim(db, now, legs, None, ticket_id)
            _audit(db, now, username, "buy", [(leg.flight.flight_id, seat) for leg, seat in zip(legs, seats)],
                   ticket_id=ticket_id)
            _remember(db, now, username, request_id, "buy", ticket_id)
            return self._ticket_legs(db, ticket_id, username, now, [(leg.flight, seat) for leg, seat in zip(legs, seats)])

        return self._write(work)

    def tickets(self, username: str) -> Deferred[list[Ticket]]:
        def work(db: sqlite3.Connection, now: float) -> list[Ticket]:
            return self._tickets(db, "username = ?", (username,))

        return self._read(work)

    def _tickets(self, db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[Ticket]:
        rows = db.execute(
            "SELECT ticket_id, username, status, price_cents, currency, bought_at, cancelled_at FROM tickets"
            f" WHERE {where} ORDER BY bought_at, rowid",
            args,
        ).fetchall()
        result = []
        for ticket_id, username, status, price, currency, bought_at, cancelled_at in rows:
            legs = tuple(
                TicketLeg(flight_id, number, origin, destination, departure, arrival, seat, Money(cents, currency))
                for flight_id, number, origin, destination, departure, arrival, seat, cents in db.execute(
                    "SELECT flight_id, number, origin, destination, departure, arrival, seat, price_cents"
                    " FROM ticket_legs WHERE ticket_id = ? ORDER BY leg",
                    (ticket_id,),
                )
            )
            result.append(
                Ticket(ticket_id, username, status, legs, Money(price, currency), bought_at, cancelled_at)
            )
        return result

    def _ticket_as_bought(self, db: sqlite3.Connection, ticket_id: str) -> Ticket:
        """
        A ticket as its purchase was acknowledged (whatever happened to it since).
        """
        [ticket] = self._tickets(db, "ticket_id = ?", (ticket_id,))
        return attrs.evolve(ticket, status="active", cancelled_at=None)

    def cancel(self, ticket_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        def work(db: sqlite3.Connection, now: float) -> Ticket:
            done = _replay(db, username, request_id, "cancel")
            if done is not None:
                [cancelled] = self._tickets(db, "ticket_id = ?", (done,))
                return cancelled
            found = self._tickets(db, "ticket_id = ? AND username = ?", (ticket_id, username))
            if not found:
                raise TicketNotFound(f"No ticket {ticket_id!r}.", ticket_id=ticket_id)
            ticket = found[0]
            if ticket.status == "cancelled":
                raise AlreadyCancelled(f"Ticket {ticket_id} is already cancelled.", ticket_id=ticket_id)
            first = min(datetime.fromisoformat(leg.departure).timestamp() for leg in ticket.legs)
            if first <= now:
                raise FlightDeparted(
                    f"Ticket {ticket_id} cannot be cancelled: its first flight has departed.", ticket_id=ticket_id
                )
            db.execute(
                "UPDATE tickets SET status = 'cancelled', cancelled_at = ?"
                " WHERE ticket_id = ? AND username = ? AND status = 'active'",
                (now, ticket_id, username),
            )
            db.execute("DELETE FROM seats WHERE ticket_id = ?", (ticket_id,))
            _audit(db, now, username, "cancel", [(leg.flight_id, leg.seat) for leg in ticket.legs],
                   ticket_id=ticket_id)
            _remember(db, now, username, request_id, "cancel", ticket_id)
            return Ticket(ticket_id, username, "cancelled", ticket.legs, ticket.price, ticket.bought_at, now)

        return self._write(work)

    def seats(self, flight: Flight) -> Deferred[list[SeatState]]:
        def work(db: sqlite3.Connection, now: float) -> list[SeatState]:
            rows = db.execute(
                "SELECT s.seat, h.username, h.expires_at, t.username FROM seats s"
                " LEFT JOIN holds h ON h.hold_id = s.hold_id"
                " LEFT JOIN tickets t ON t.ticket_id = s.ticket_id WHERE s.flight_id = ?",
                (flight.flight_id,),
            )
            return seat_map(flight, rows, now)

        return self._read(work)

    def free_seats(self, flights: list[Flight]) -> Deferred[dict[str, int]]:
        availability = self._availability
        if availability is not None:
            now = self._clock.seconds()
            free = {}
            for flight in flights:
                state = availability.get(flight.flight_id)
                if state is None:
                    free[flight.flight_id] = flight.aircraft.capacity
                else:
                    # Seats of holds whose time is up but that nobody has
                    # ended yet are free.
                    taken, expiries = state
                    free[flight.flight_id] = flight.aircraft.capacity - taken + bisect.bisect_right(expiries, now)
            return succeed(free)

        def work(db: sqlite3.Connection, now: float) -> dict[str, int]:
            result = {flight.flight_id: flight.aircraft.capacity for flight in flights}
            for chunk in _chunks(list(result), 500):
                marks = ",".join("?" * len(chunk))
                for flight_id, taken in db.execute(
                    f"SELECT flight_id, seats FROM flight_taken WHERE flight_id IN ({marks})", chunk
                ):
                    result[flight_id] -= taken
            # Seats of holds whose time is up but that nobody has ended yet
            # (usually none: a timer ends each hold when it expires) are free.
            for flight_id, expired in db.execute(
                "SELECT s.flight_id, COUNT(*) FROM holds h INDEXED BY holds_active"
                " JOIN seats s INDEXED BY seats_hold ON s.hold_id = h.hold_id"
                " WHERE h.state = 'active' AND h.expires_at <= ? GROUP BY s.flight_id",
                (now,),
            ):
                if flight_id in result:
                    result[flight_id] += expired
            return result

        return self._read(work)


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
