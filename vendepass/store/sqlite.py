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
import functools
import sqlite3
import threading
from collections import deque
from typing import Any, Callable, Iterable, TypeVar, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vendepass.errors import StorageUnavailable, VendePassError
from vendepass.fixtures import Fixtures
from vendepass.model import Flight, Network
from vendepass.store import IExecutor, IStore, schema
from vendepass.store.common import booking_code, load_fixtures, read_network
from vendepass.store.memory import MARKED_OFF, MARKED_ON, Availability, SeatMemory
from vendepass.store.transactions import (
    HOLD_INSERT,
    Reads,
    HOLDS_BOUGHT,
    SEAT_INSERT,
    SEATS_SOLD,
    TICKET_ROW_INSERT,
    RulesStore,
    SeatRules,
    Tx,
)
from vendepass.store.writer import WriterProcess

T = TypeVar("T")

# Per flight: taken seats, and the (sorted) expiry times of its held seats.
_Refreshed = Availability
# A write's outcome in a batch: (True, result) or (False, failure).
_Outcome = tuple[bool, Any]
# A queued write: its work, its Deferred, and what it reads first.
_Queued = tuple[Callable[["Tx"], Any], Deferred[Any], Reads]


_SCHEMA_1 = schema.render(
    real="REAL",
    cents="INTEGER",
    holds_indexes="CREATE INDEX holds_active ON holds(state, expires_at);\n"
    "CREATE INDEX holds_session ON holds(session_id) WHERE state = 'active';\n",
    without_rowid=" WITHOUT ROWID",
)

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
# Version 5: the sweep forgets ended holds a day old without reading every hold.
_SCHEMA_5 = """
CREATE INDEX holds_ended ON holds(ended_at) WHERE state <> 'active';
"""

# Version 6: a page of a customer's active tickets reads only those.
_SCHEMA_6 = """
CREATE INDEX tickets_user_active ON tickets(username, bought_at) WHERE status = 'active';
"""

# Version 7: no index of seats by ticket. A purchase kept it up to date (one
# more page of a random place in the file per purchase, 1 of about 6.4 WAL
# frames), and only a cancellation used it, which now deletes its seats by
# their key from its legs.
_SCHEMA_7 = """
DROP INDEX seats_ticket;
"""

# Version 8: a customer's tickets indexed once per status, not also all
# together. A purchase kept both tickets_user and tickets_user_active up
# to date: two pages at random places in the file (6 each of the 37 WAL
# frames of a batch of 5 purchases). Now it writes one; a cancellation
# moves its ticket from one index to the other; a page of all tickets
# reads both and merges them.
_SCHEMA_8 = """
CREATE INDEX tickets_user_cancelled ON tickets(username, bought_at) WHERE status = 'cancelled';
DROP INDEX tickets_user;
"""

# Version 9: a ticket's legs keyed by its time of sale first. Keyed by the
# booking code, which is random, each ticket's legs went to a random page
# of the table (8 of the 30 WAL frames of a batch of 5 purchases); keyed by
# the time of sale, a batch's legs go together at the end. A ticket's legs
# are found from the ticket (its code and its time of sale) as before. The
# key's columns come first: SQLite 3.40's quick_check reports NULLs in a
# table WITHOUT ROWID whose key is in another order than its columns. The
# other columns are version 1's, in its order.
_LEG_COLUMNS = schema.TABLES.split("CREATE TABLE ticket_legs (\n", 1)[1].split("    PRIMARY KEY", 1)[0]
_SCHEMA_9 = f"""
CREATE TABLE ticket_legs_by_time (
    bought_at REAL NOT NULL,
{_LEG_COLUMNS.format(cents="INTEGER")}    PRIMARY KEY (bought_at, ticket_id, leg)
) WITHOUT ROWID;
INSERT INTO ticket_legs_by_time
    SELECT t.bought_at, l.ticket_id, l.leg, l.flight_id, l.number, l.origin, l.destination, l.departure,
           l.arrival, l.seat, l.price_cents
    FROM ticket_legs l JOIN tickets t ON t.ticket_id = l.ticket_id;
DROP TABLE ticket_legs;
ALTER TABLE ticket_legs_by_time RENAME TO ticket_legs;
"""

MIGRATIONS: list[str] = [
    _SCHEMA_1, _SCHEMA_2, _SCHEMA_3, _SCHEMA_4, _SCHEMA_5, _SCHEMA_6, _SCHEMA_7, _SCHEMA_8, _SCHEMA_9,
]
SCHEMA_VERSION = len(MIGRATIONS)


# Kept rows are inserted tickets and holds first, then seats (which refer to
# them), then the rest in the order they were first kept.
_KEPT_ORDER = {TICKET_ROW_INSERT: 0, HOLD_INSERT: 0, SEAT_INSERT: 1, SEATS_SOLD: 1}
# The statements of seats marked in memory already (L{SeatMemory.mark}).
_MARKED = (SEAT_INSERT, SEATS_SOLD)
# How many rows one statement of a bulk insert carries: as many as there are
# up to _EXACT_ROWS, else the smallest of _BULK_SIZES that holds them all
# (the rest padded with rows of NULLs, which it leaves out), or the largest,
# again and again. A statement of exactly its rows is a plain multi-row
# VALUES; padding needs a SELECT around them to leave the NULL rows out,
# which costs SQLite more than the rows themselves: 55 against 33 µs for
# four tickets (8 rows, 4 of them padding). Group commit batches are mostly
# small, and the statements of every size up to _EXACT_ROWS stay prepared
# (the connections' statement cache holds 512).
_EXACT_ROWS = 16
_BULK_SIZES = (64, 256)


def _statement_rows(rows: int) -> int:
    """
    How many rows a statement carrying C{rows} (at most the largest of
    L{_BULK_SIZES}) is made for.
    """
    if rows <= _EXACT_ROWS:
        return rows
    return next(size for size in _BULK_SIZES if size >= rows)


@functools.lru_cache(maxsize=512)
def _bulk_statement(sql: str, rows: int) -> tuple[str, int]:
    """
    C{sql} (C{INSERT INTO t (...) VALUES (...)}, or C{UPDATE ... FROM
    (VALUES (...)) AS v WHERE ... = v.column1}) made to insert or update
    with C{rows} rows given at once (L{_statement_rows}: an insert of more
    than L{_EXACT_ROWS} leaves out rows of padding), and how many values a
    row has.
    """
    if sql.startswith("UPDATE"):
        # A padding row's NULL first value matches no row.
        head, rest = sql.split("(VALUES ", 1)
        values, tail = rest.split(")", 1)
        values += ")"
        return f"{head}(VALUES {', '.join([values] * rows)}{tail}", values.count("?")
    head, values = sql.split(" VALUES ")
    if rows <= _EXACT_ROWS:
        return f"{head} VALUES {', '.join([values] * rows)}", values.count("?")
    return (
        f"{head} SELECT * FROM (VALUES {', '.join([values] * rows)}) WHERE column1 IS NOT NULL",
        values.count("?"),
    )


def insert_rows(execute: Callable[..., Any], sql: str, rows: list[tuple[Any, ...]]) -> int:
    """
    Insert C{rows} (whose first value is never C{NULL}) with C{sql} (or
    update with them), in as few statements as L{_statement_rows} allows,
    in order, rather than one step per row: each step lets the GIL go and must
    win it back, and while the reactor is busy that wait, not SQLite, is
    most of a row's cost. Returns how many rows the statements changed.
    """
    changed = 0
    largest = _BULK_SIZES[-1]
    for start in range(0, len(rows), largest):
        chunk = rows[start:start + largest]
        if any(row[0] is None for row in chunk):
            # It would be taken for padding and left out.
            raise ValueError(f"a row with NULL first for {sql!r}")
        size = _statement_rows(len(chunk))
        statement, width = _bulk_statement(sql, size)
        values = [value for row in chunk for value in row]
        values.extend([None] * (width * (size - len(chunk))))
        changed += execute(statement, values).rowcount
    return changed


class TicketCodes:
    """
    Booking codes drawn ahead and checked free in the database, many with
    one statement, for the writer's kept tickets (L{SQLiteTx.fresh_ticket});
    only the writer's thread uses them, and only the writer inserts tickets.
    """

    draw = 256

    def __init__(self) -> None:
        self._day: int | None = None
        self._free: list[str] = []

    def take(self, execute: Callable[..., Any], now: float) -> str:
        day = int(now // 86400)
        if day != self._day:
            # Codes start with their day.
            self._day, self._free = day, []
        if not self._free:
            drawn = list(dict.fromkeys(booking_code(now) for _ in range(self.draw)))
            taken = {
                code for (code,) in execute(
                    f"SELECT ticket_id FROM tickets WHERE ticket_id IN ({','.join('?' * len(drawn))})", drawn
                ).fetchall()
            }
            # Given out in the order drawn.
            self._free = [code for code in reversed(drawn) if code not in taken]
        return self._free.pop()


# A request's key, and its kind and outcome (None: not done yet).
_RequestKey = tuple[str, str]
_RequestOutcome = Union[tuple[str, str], None]


# What a batch reads ahead for its writes (Kept), each statement for many
# keys at once: {values} becomes the keys' VALUES rows.
_REQUESTS_AHEAD = (
    "SELECT r.username, r.request_id, r.kind, r.outcome FROM (VALUES {values}) v"
    " JOIN requests r ON r.username = v.column1 AND r.request_id = v.column2"
)
_HOLDS_AHEAD = (
    "SELECT h.hold_id, h.username, h.state, h.expires_at, l.flight_id, l.seat FROM (VALUES {values}) v"
    " JOIN holds h ON h.hold_id = v.column1 JOIN hold_legs l ON l.hold_id = h.hold_id ORDER BY h.hold_id, l.leg"
)
_HELD_AHEAD = (
    "SELECT h.username, h.expires_at, COUNT(*) FROM (VALUES {values}) v"
    " JOIN holds h INDEXED BY holds_user ON h.username = v.column1 AND h.state = 'active'"
    " JOIN hold_legs l ON l.hold_id = h.hold_id GROUP BY h.hold_id"
)


@functools.lru_cache(maxsize=128)
def _ahead_statement(template: str, width: int, rows: int) -> str:
    row = "(" + ", ".join(["?"] * width) + ")"
    return template.format(values=", ".join([row] * rows))


def _read_ahead(execute: Callable[..., Any], template: str, keys: list[tuple[str, ...]]) -> list[Any]:
    """
    The rows of C{template} for these keys (of one width), in as few
    statements as L{_statement_rows} allows, each padded with rows of
    NULLs (which match nothing) past L{_EXACT_ROWS}.
    """
    found: list[Any] = []
    largest = _BULK_SIZES[-1]
    width = len(keys[0]) if keys else 0
    for start in range(0, len(keys), largest):
        chunk = keys[start:start + largest]
        size = _statement_rows(len(chunk))
        values: list[str | None] = [value for key in chunk for value in key]
        values.extend([None] * (width * (size - len(chunk))))
        found.extend(execute(_ahead_statement(template, width, size), values).fetchall())
    return found


def read_requests(execute: Callable[..., Any], keys: list[_RequestKey]) -> dict[_RequestKey, _RequestOutcome]:
    """
    The outcome of each of these requests (C{(username, request_id)}):
    C{None} for those not done.
    """
    found: dict[_RequestKey, _RequestOutcome] = dict.fromkeys(keys)
    for username, request_id, kind, outcome in _read_ahead(execute, _REQUESTS_AHEAD, list(found)):
        found[(username, request_id)] = (str(kind), str(outcome))
    return found


def read_holds(execute: Callable[..., Any], hold_ids: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    """
    These holds and their legs, as L{Tx.hold_for_sale} reads one: no rows
    for a hold that is not.
    """
    found: dict[str, list[tuple[Any, ...]]] = {hold_id: [] for hold_id in hold_ids}
    for hold_id, *row in _read_ahead(execute, _HOLDS_AHEAD, [(hold_id,) for hold_id in found]):
        found[hold_id].append(tuple(row))
    return found


def read_held(execute: Callable[..., Any], usernames: list[str]) -> dict[str, list[tuple[float, int]]]:
    """
    The active holds of these customers, as C{(expires_at, seats)} (for
    L{Tx.held_seats}).
    """
    found: dict[str, list[tuple[float, int]]] = {username: [] for username in usernames}
    for username, expires_at, seats in _read_ahead(execute, _HELD_AHEAD, [(username,) for username in found]):
        found[username].append((float(expires_at), int(seats)))
    return found


class Kept:
    """
    The rows that a group commit's transactions keep to insert together
    before its COMMIT (L{SQLiteTx.append}, L{SQLiteTx.keep}), by statement,
    in order; the keys of what they hold that a statement of the batch may
    read back (L{Tx.keep}): a hook naming one of them inserts them all
    first; and what the batch's writes read first, read for all of them at
    once when it began.
    """

    def __init__(self, execute: Callable[..., Any] | None = None, reads: Reads = ()) -> None:
        self.rows: dict[str, list[tuple[Any, ...]]] = {}
        self.keys: set[tuple[str, ...]] = set()
        # How many seats the kept sales of holds (SEATS_SOLD) must move.
        self.sold = 0
        # What the batch's writes read first (their C{reads}), read for all
        # of them when it began, in a statement or so each; an entry is
        # forgotten once a write of the batch may have changed it: the
        # requests' outcomes, the holds bought, the customers' active holds.
        self.requests: dict[_RequestKey, _RequestOutcome] = {}
        self.holds: dict[str, list[tuple[Any, ...]]] = {}
        self.held: dict[str, list[tuple[float, int]]] = {}
        if execute is not None and reads:
            requests = [(key[1], key[2]) for key in reads if key[0] == "request"]
            holds = [key[1] for key in reads if key[0] == "hold"]
            users = [key[1] for key in reads if key[0] == "user"]
            if requests:
                self.requests = read_requests(execute, requests)
            if holds:
                self.holds = read_holds(execute, holds)
            if users:
                self.held = read_held(execute, users)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def forget(self, key: tuple[str, ...]) -> None:
        """
        Forget what was read ahead of C{key} (a key of L{Tx.keep}): a write
        of the batch may have changed it.
        """
        if key[0] == "request":
            self.requests.pop((key[1], key[2]), None)
        elif key[0] == "hold":
            self.holds.pop(key[1], None)
        elif key[0] == "user":
            self.held.pop(key[1], None)

    def forget_holds(self) -> None:
        """
        Forget every hold and customer's holds read ahead: a write of the
        batch ends holds whose customers are not known here.
        """
        self.holds.clear()
        self.held.clear()


class SQLiteTx(Tx):
    """
    A transaction on the store's one connection. SQLite has one writer at a
    time, so transactions are serial and lock nothing themselves.

    A write transaction of the store has its L{SeatMemory}: a claim's
    questions about seats are answered from it (a flight it does not know
    yet is read from the database, then known).
    """

    held_seats_index = " INDEXED BY seats_held"

    def __init__(
        self,
        db: sqlite3.Connection,
        now: float,
        seats: SeatMemory | None = None,
        later: Kept | None = None,
        codes: TicketCodes | None = None,
    ) -> None:
        super().__init__(now)
        # The connection's own methods: no Python frame per statement.
        self.execute = db.execute  # type: ignore[method-assign,assignment]
        self.executemany = db.executemany  # type: ignore[method-assign,assignment]
        self.seats = seats
        # What the batch keeps for later and read ahead (None: nothing kept).
        self.later = later
        self.codes = codes

    def append(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        later = self.later
        if later is None:
            super().append(sql, rows)
        elif sql in later.rows:
            later.rows[sql].extend(rows)
        else:
            later.rows[sql] = list(rows)

    def keep(self, sql: str, rows: list[tuple[Any, ...]], keys: Iterable[tuple[str, ...]]) -> None:
        self.append(sql, rows)
        later = self.later
        if later is not None:
            for key in keys:
                later.keys.add(key)
                later.forget(key)

    def request_outcome(self, username: str, request_id: str) -> tuple[str, str] | None:
        later = self.later
        if later is not None:
            try:
                return later.requests[(username, request_id)]
            except KeyError:
                pass
        return super().request_outcome(username, request_id)

    def _read_back(self, key: tuple[str, ...]) -> None:
        later = self.later
        if later is not None and key in later.keys:
            self.appended()

    def lock_request(self, username: str, request_id: str) -> None:
        self._read_back(("request", username, request_id))

    def lock_user(self, username: str) -> None:
        self._read_back(("user", username))

    def reading_hold(self, hold_id: str) -> None:
        later = self.later
        if later is not None:
            # It may change from now on, and so may its customer's (not
            # known here) active holds.
            later.forget(("hold", hold_id))
            later.held.clear()
        self._read_back(("hold", hold_id))

    def held_seats(self, username: str) -> int:
        later = self.later
        if later is not None:
            holds = later.held.get(username)
            if holds is not None:
                # Read when the batch began, and untouched by its writes since.
                return sum(seats for expires_at, seats in holds if expires_at > self.now)
        return super().held_seats(username)

    def ending_holds(self) -> None:
        if self.later is not None:
            self.later.forget_holds()
        self.appended()

    def hold_for_sale(self, hold_id: str) -> list[tuple[Any, ...]]:
        later = self.later
        if later is not None:
            rows = later.holds.pop(hold_id, None)
            if rows is not None:
                # Read when the batch began, and untouched by its writes since.
                return rows
        return super().hold_for_sale(hold_id)

    def appended(self) -> None:
        later = self.later
        if later:
            kept = later.rows
            for sql in sorted(kept, key=lambda sql: _KEPT_ORDER.get(sql, 2)):
                rows = kept[sql]
                if sql in _MARKED:
                    # Seats marked in memory already (L{insert_seats}, L{sell_hold}).
                    self.execute(MARKED_ON)
                    try:
                        changed = insert_rows(self.execute, sql, rows)
                    finally:
                        self.execute(MARKED_OFF)
                else:
                    changed = insert_rows(self.execute, sql, rows)
                if sql == SEATS_SOLD and changed != later.sold:
                    # Then the batch is done again, each transaction alone.
                    raise RuntimeError(f"the holds bought cover {changed} seats, expected {later.sold}")
            kept.clear()
            later.keys.clear()
            later.sold = 0

    def insert_seats(
        self, rows: list[tuple[str, str, str | None, str | None]], expires_at: float | None = None
    ) -> None:
        # A batch's seats are marked in memory (which claims ask) and
        # inserted with the batch's kept rows (after their tickets and
        # holds). A seat of a flight not known in memory goes in at once,
        # the triggers reporting it: the kept rows it refers to first.
        seats = self.seats
        if self.later is not None and seats is not None:
            marked = [
                row for row in rows
                if (row[3] is not None or expires_at is not None)
                and seats.mark(row[0], row[1], None if row[3] is not None else expires_at)
            ]
            if marked:
                self.append(SEAT_INSERT, marked)
            if len(marked) == len(rows):
                return
            rows = [row for row in rows if row not in marked]
            self.appended()
        super().insert_seats(rows)

    def sell_hold(self, hold_id: str, username: str, ticket_id: str, seats: list[tuple[str, str]]) -> None:
        later, memory = self.later, self.seats
        if later is None or memory is None or not all(flight_id in memory for flight_id, _ in seats):
            # At once: after what it refers to (the ticket may be kept).
            if later is not None:
                later.forget(("user", username))
            self.appended()
            super().sell_hold(hold_id, username, ticket_id, seats)
            return
        for flight_id, seat in seats:
            memory.mark(flight_id, seat, None)
        self.keep(SEATS_SOLD, [(hold_id, ticket_id)], [("hold", hold_id), ("user", username)])
        self.append(HOLDS_BOUGHT, [(hold_id, self.now)])
        later.sold += len(seats)

    def fresh_ticket(self, username: str, price_cents: int, currency: str) -> str | None:
        if self.later is None or self.codes is None:
            return None
        code = self.codes.take(self.execute, self.now)
        self.append(TICKET_ROW_INSERT, [(code, username, price_cents, currency, self.now)])
        return code

    def expiry_due(self, flights: list[Flight]) -> bool:
        if self.seats is None:
            return super().expiry_due(flights)
        return self.seats.expiry_due(self.execute, flights, self.now)

    def free_seat(self, flight: Flight, chosen: list[str]) -> str:
        if self.seats is None:
            return super().free_seat(flight, chosen)
        return self.seats.free_seat(self.execute, flight, chosen)

    def seat_claimant(self, flight: Flight, seat: str) -> tuple[object, float | None] | None:
        if self.seats is None:
            return super().seat_claimant(flight, seat)
        return self.seats.seat_claimant(self.execute, flight, seat)


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
    # Statement journals and transient tables in memory: a multi-row INSERT
    # of a batch needs a statement journal, which otherwise spills to a new
    # temporary file past 64 KiB (created, written and unlinked once per
    # batch: about 45 writes of a page and five system calls more).
    db.execute("PRAGMA temp_store=MEMORY")
    return db


# With a checkpointer (see SQLiteStore.open): once the WAL has this many
# frames, the writer copies what the checkpointer has not yet copied itself
# after its next COMMIT, so that the transaction after it starts the WAL
# from the beginning again (the checkpointer alone never gets there while
# the writer keeps writing). 8,192 frames: 32 MiB of 4 KiB pages.
WAL_RESTART_FRAMES = 8192
# A checkpoint starts at most this often (seconds): pages that batches write
# again and again (a flight's counts, the newest tickets) are copied once,
# and the checkpointer's writes to the disk leave the writer's fsyncs alone
# most of the time.
CHECKPOINT_INTERVAL = 0.25


def _connect_checkpointer(path: str) -> sqlite3.Connection:
    """
    The connection that copies the WAL into the database beside the writer
    (C{PRAGMA wal_checkpoint(PASSIVE)} takes no lock that a writer needs).
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _connect_reader(path: str) -> sqlite3.Connection:
    """
    A connection that only reads (C{query_only}): in WAL mode it reads the
    last committed state beside the writer, without waiting for it.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=512)
    db.execute("PRAGMA query_only=ON")
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA cache_size=-65536")
    db.execute("PRAGMA temp_store=MEMORY")
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
class SQLiteStore(RulesStore):
    """
    The SQLite store. Open it with L{SQLiteStore.open}.

    The seat rules are L{SeatRules}' (a subclass may put others in
    C{rules_class}); this class runs them: one connection, one writer
    thread, group commit, the writer's seats kept in memory (a
    C{seats_class}), and free seat counts kept in memory.
    """

    _log = Logger()
    rules_class: type[SeatRules] = SeatRules
    seats_class: type[SeatMemory] = SeatMemory

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
        self.max_batch = max_batch
        self._db = db
        self._clock = clock
        self._executor = executor
        # Group commit: writes wait here while a batch is in flight. The
        # reactor adds to it and the writer takes from it (see
        # L{_batch_job}): both under this lock, with C{_batching} (a batch is
        # being written, or its answers are still to go out).
        self._pending: deque[_Queued] = deque()
        self._queue_lock = threading.Lock()
        self._batching = False
        # Batches are numbered as they are taken; their answers go out in
        # that order (an executor that runs jobs inline may bring the next
        # batch's outcome first), the early ones waiting here.
        self._answered = 0
        self._early: dict[int, tuple[Any, list[_Queued]]] = {}
        self._watchers: list[Callable[[str, str], None]] = []
        self.batches = 0
        self.batched_writes = 0
        # The writer's copy of the seats (see L{vendepass.store.memory}),
        # owned by the writer thread: temporary triggers report every change
        # of a seat row to it, in the transaction that makes it.
        self._seats = self.seats_class()
        self._seats.install(db)
        self._codes = TicketCodes()
        # With group commit, free seat counts are answered from memory (on
        # the reactor thread): for each flight with taken seats, how many,
        # and when each of its held seats' holds expire. Just before a
        # batch's COMMIT, the writer's copy gives those of the flights whose
        # seats changed, and they are replaced here before any write of the
        # batch is answered. None (without group commit): counts come from
        # the database.
        self._availability: dict[str, tuple[int, tuple[float, ...]]] | None = None
        self._network = read_network(db)
        self.rules = self.rules_class(self._network, max_held_seats)
        # The read connection and its executor (see L{open}), if any.
        self._reader: sqlite3.Connection | None = None
        self._read_executor: IExecutor = executor
        # The checkpointer's connection and executor (see L{open}), if any:
        # whether a checkpoint is running, whether a batch committed since
        # the last one began, and whether the writer is to restart the WAL.
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_executor: IExecutor = executor
        self._checkpointing = False
        self._checkpoint_due = False
        self._last_checkpoint = float("-inf")
        self._checkpoint_call: IDelayedCall | None = None
        self._restart_wal = False
        self.checkpoints = 0
        self.wal_restarts = 0
        # The writer process (see L{open}), if the batches are written there.
        self._writer: WriterProcess | None = None

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
        read_executor: IExecutor | None = None,
        checkpoint_executor: IExecutor | None = None,
        writer_process: bool = False,
    ) -> SQLiteStore:
        """
        Open (creating, migrating and loading C{fixtures()} if new) the
        database at C{path}, and forget the holds of any earlier run: holds
        do not outlive their connections, and those connections are gone.

        C{max_batch} is how many writes may share one transaction (group
        commit); 1 gives every write a transaction of its own.

        With a C{read_executor} (one thread in production), reads (a
        customer's tickets, seat maps, password hashes) run there on a
        second connection: WAL lets it read beside the writer, so reads
        never wait in the writers' queue nor hold it up. (Not for an
        in-memory database, which a second connection cannot see.)

        With a C{checkpoint_executor} (one thread in production), the WAL is
        copied into the database there, beside the writer, instead of by
        the writer inside the COMMIT that fills it (SQLite's automatic
        checkpoint, a pause of a whole checkpoint for the batch that meets
        it); see L{_checkpointed}. (Not for an in-memory database.)

        With C{writer_process} (C{max_batch} above 1, a file, and a
        C{read_executor}), the batches are written by a process of its own
        (L{vendepass.store.writer}): the writer thread hands each batch to it
        and waits, holding no GIL, so that the reactor and the writer do not
        take turns at it. That process is started here.

        This blocks: call it before the reactor runs, or from a thread.
        """
        on_disk = path != ":memory:" and not path.startswith("file:")
        if writer_process and (max_batch <= 1 or read_executor is None or not on_disk):
            raise ValueError("a writer process needs max_batch above 1, a file and a read_executor")
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
            tx = SQLiteTx(db, clock.seconds())
            db.execute("BEGIN IMMEDIATE")
            for (hold_id,) in db.execute("SELECT hold_id FROM holds WHERE state = 'active'").fetchall():
                store.rules.end_hold(tx, hold_id, "released")
            db.execute("DELETE FROM holds WHERE state <> 'active' AND ended_at < ?", (tx.now - 86400,))
            db.execute("COMMIT")
            if max_batch > 1:
                store._availability = store._load_availability()
            if read_executor is not None and on_disk:
                store._reader = _connect_reader(path)
                store._read_executor = read_executor
            if checkpoint_executor is not None and on_disk:
                store._checkpointer = _connect_checkpointer(path)
                store._checkpoint_executor = checkpoint_executor
                db.execute("PRAGMA wal_autocheckpoint=0")
            if writer_process:
                store._writer = WriterProcess(path, store)
                # What the child reads is what was just read here.
                store._writer.start()
            return store
        except BaseException:
            db.close()
            raise

    def start(self) -> None:
        self._executor.start()
        if self._reader is not None:
            self._read_executor.start()
        if self._checkpointer is not None:
            self._checkpoint_executor.start()

    def stop(self) -> None:
        if self._checkpoint_call is not None and self._checkpoint_call.active():
            self._checkpoint_call.cancel()
        if self._checkpointer is not None:
            self._checkpoint_executor.stop()
            self._checkpointer.close()
            # Answers that come after (a checkpoint's, a batch's) start none.
            self._checkpointer = None
        if self._reader is not None:
            self._read_executor.stop()
            self._reader.close()
        self._executor.stop()
        if self._writer is not None:
            self._writer.stop()
        # Closing the last connection copies what the WAL still holds.
        self._db.close()

    # -- checkpoints ----------------------------------------------------------

    def _checkpoint(self) -> None:
        """
        On the reactor, after a batch committed: copy the WAL into the
        database on the checkpointer's thread, unless a checkpoint is
        running (then another runs when it ends).
        """
        if self._checkpointer is None:
            return
        if self._checkpointing:
            self._checkpoint_due = True
            return
        wait = self._last_checkpoint + CHECKPOINT_INTERVAL - self._clock.seconds()
        if wait > 0:
            self._checkpoint_due = True
            if self._checkpoint_call is None:
                self._checkpoint_call = self._clock.callLater(wait, self._checkpoint_later)
            return
        self._checkpointing = True
        self._checkpoint_due = False
        self._last_checkpoint = self._clock.seconds()
        checkpointer = self._checkpointer

        def job() -> tuple[int, int, int]:
            return tuple(checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())  # type: ignore[return-value]

        def done(result: tuple[int, int, int] | Failure) -> None:
            self._checkpointing = False
            self.checkpoints += 1
            if isinstance(result, Failure):
                self._log.failure("checkpointing the WAL", result)
            else:
                self._checkpointed(*result)
            if self._checkpoint_due:
                self._checkpoint()

        self._checkpoint_executor.submit(job).addBoth(done)

    def _checkpoint_later(self) -> None:
        self._checkpoint_call = None
        if self._checkpoint_due and not self._checkpointing:
            self._checkpoint()

    def _checkpointed(self, busy: int, frames: int, copied: int) -> None:
        """
        A checkpoint ended with the WAL C{frames} long, C{copied} of them in
        the database. The WAL starts again from the beginning only at a
        write transaction that begins when all of it is copied, which the
        checkpointer cannot see to while the writer writes on: once it is
        L{WAL_RESTART_FRAMES} long, the writer copies the rest (the last
        batch or so) itself after its next COMMIT.
        """
        if frames >= WAL_RESTART_FRAMES:
            self._restart_wal = True


    def network(self) -> Network:
        return self._network

    # -- transactions -------------------------------------------------------

    def _write(self, work: Callable[[Tx], T], reads: Reads = ()) -> Deferred[T]:
        """
        Run C{work(tx)} atomically in a write transaction on the executor,
        and fire with its outcome once that transaction is on disk.

        With C{max_batch} above 1 this is group commit: while one batch is
        being written, new writes queue up, and the next batch runs them all,
        in order, in one transaction (L{_run_batch}). One COMMIT (one fsync)
        then makes the whole batch durable, and only then does any of them
        get an answer. If the batch cannot commit, every write in it fails
        with L{StorageUnavailable}: none was acknowledged, so none is lost.
        """
        if self.max_batch > 1:
            d: Deferred[T] = Deferred()
            with self._queue_lock:
                self._pending.append((work, d, reads))
                if self._batching:
                    return d
                self._batching = True
                batch = self._take()
                number = self.batches
            self._submit(number, batch)
            return d
        return self._write_one(work)

    def _take(self) -> list[_Queued]:
        """
        Under C{_queue_lock}: the next batch, the oldest queued writes (up
        to C{max_batch}); empty if none is queued.
        """
        pending = self._pending
        batch = [pending.popleft() for _ in range(min(self.max_batch, len(pending)))]
        if batch:
            self.batches += 1
            self.batched_writes += len(batch)
        return batch

    def _submit(self, number: int, batch: list[_Queued]) -> None:
        """
        Send C{batch} (the C{number}th) to the executor as one transaction;
        L{_deliver} answers it on the reactor. Called on the reactor, or by
        the writer at the end of the batch before (L{_batch_job}).
        """
        works = [work for work, _, _ in batch]
        reads = tuple(key for _, _, keys in batch for key in keys)
        # A method and its arguments, not a closure: nothing here refers
        # back to itself, so a batch's Deferreds and works are freed as soon
        # as it is answered, not left to the garbage collector.
        self._executor.submit(functools.partial(self._batch_job, works, reads)).addBoth(self._deliver, number, batch)

    def _batch_job(
        self, works: list[Callable[[Tx], Any]], reads: Reads
    ) -> tuple[tuple[list[_Outcome], _Refreshed, list[tuple[str, str]]], bool]:
        """
        On the writer: write a batch (L{_run_batch}); then, if writes were
        queued meanwhile, send them as the next batch at once, so that the
        writer goes on with them while the reactor answers this one, with no
        round trip through the reactor between two batches. Returns the
        batch's outcome and whether it sent the next one.
        """
        if self._writer is not None:
            done = self._write_there(self._writer, works, reads)
        else:
            done = self._guarded(functools.partial(self._run_batch, works, reads))()
        with self._queue_lock:
            batch = self._take()
            number = self.batches
        if batch:
            self._submit(number, batch)
        return done, bool(batch)

    def _write_there(
        self, writer: WriterProcess, works: list[Callable[[Tx], Any]], reads: Reads
    ) -> tuple[list[_Outcome], _Refreshed, list[tuple[str, str]]]:
        """
        On the writer thread: have the writer process write a batch, at this
        process's time (read once for the batch, as it is sent).
        """
        restart_wal, self._restart_wal = self._restart_wal, False
        outcomes, refreshed, ended, restarted = writer.run(
            works, reads, self._clock.seconds(), restart_wal  # type: ignore[arg-type]
        )
        if restarted:
            self.wal_restarts += 1
        return [(True, value) if ok else (False, Failure(value)) for ok, value in outcomes], refreshed, ended

    def _deliver(
        self,
        done: tuple[tuple[list[_Outcome], _Refreshed, list[tuple[str, str]]], bool] | Failure,
        number: int,
        batch: list[_Queued],
    ) -> None:
        """
        On the reactor: answer the writes of the C{number}th batch once the
        batches before it are answered.
        """
        self._early[number] = (done, batch)
        while self._answered + 1 in self._early:
            self._answered += 1
            self._answer(*self._early.pop(self._answered))

    def _answer(
        self,
        done: tuple[tuple[list[_Outcome], _Refreshed, list[tuple[str, str]]], bool] | Failure,
        batch: list[_Queued],
    ) -> None:
        """
        On the reactor: answer the writes of a batch that was written. Unless
        it sent the next batch itself, writes queued since then (those that
        these answers' callbacks start among them, in order) go next.
        """
        chained = False
        try:
            if isinstance(done, Failure):
                for _, d, _ in batch:
                    d.errback(done)
                return
            (outcomes, refreshed, ended), chained = done
            self._checkpoint()
            if self._writer is not None and self._writer.restarted is not None:
                # A new writer process read the seats from the file again.
                restarted, self._writer.restarted = self._writer.restarted, None
                self._availability = dict(restarted)
            self._refreshed(refreshed)
            self._report(ended)
            for (ok, value), (_, d, _) in zip(outcomes, batch):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        finally:
            if not chained:
                with self._queue_lock:
                    following = self._take()
                    self._batching = bool(following)
                    number = self.batches
                if following:
                    self._submit(number, following)

    def _run_batch(
        self,
        works: list[Callable[[Tx], Any]],
        reads: Reads = (),
    ) -> tuple[list[_Outcome], _Refreshed, list[tuple[str, str]]]:
        """
        Run C{works} in one transaction and commit once. Returns C{(True,
        result)} or C{(False, failure)} per work, the availability of the
        flights whose seats changed, and the holds that were ended because
        their time was up.

        No savepoint per work: the rules refuse before they write (see
        L{vendepass.store.transactions}), so a refused work leaves only what
        is right to keep (holds it found expired, and ended). A work that
        fails in any other way (a bug, a constraint) may have written half
        of itself: the whole transaction is rolled back and run again
        without it, and it alone fails. A failure of the database itself
        fails the whole batch.
        """
        db = self._db
        seats = self._seats
        failed: dict[int, Failure] = {}
        # The audit rows and tickets' legs of the whole batch are inserted
        # together before its COMMIT (one executemany per statement) unless
        # that failed once: then each work inserts its own, so that the
        # failure is its alone.
        together = True
        while True:
            outcomes: list[_Outcome] = []
            ended: list[tuple[str, str]] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                later = Kept(db.execute, reads) if together else None
                seats.begun(self._clock.seconds())
                for i, work in enumerate(works):
                    if i in failed:
                        outcomes.append((False, failed[i]))
                        continue
                    tx = SQLiteTx(db, self._clock.seconds(), seats, later, self._codes)
                    try:
                        outcomes.append((True, work(tx)))
                    except VendePassError:
                        outcomes.append((False, Failure()))
                    except sqlite3.OperationalError:
                        raise
                    except Exception:
                        failed[i] = Failure()
                        break
                    ended.extend(tx.ended)
                else:
                    try:
                        SQLiteTx(db, 0.0, later=later).appended()
                    except sqlite3.OperationalError:
                        raise
                    except Exception:
                        together = False
                    else:
                        # Read inside the transaction: what it is about to commit.
                        refreshed = self._read_touched(db)
                        db.execute("COMMIT")
                        seats.committed()
                        if self._restart_wal:
                            self._restart_wal = False
                            # After the COMMIT: a failure here fails no write.
                            try:
                                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                            except sqlite3.Error:
                                self._log.failure("restarting the WAL")
                            else:
                                self.wal_restarts += 1
                        return outcomes, refreshed, ended
            except BaseException:
                self._rollback(db)
                # Whether it committed is not known for sure (a COMMIT that
                # failed): read the seats back from the file when next asked.
                seats.forget()
                raise
            self._rollback(db)
            seats.rolled_back()

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
            expiries: dict[str, list[float]] = {}
            for flight_id, expires_at in db.execute(
                "SELECT s.flight_id, h.expires_at FROM seats s INDEXED BY seats_hold JOIN holds h"
                " ON h.hold_id = s.hold_id WHERE s.hold_id IS NOT NULL"
            ):
                expiries.setdefault(flight_id, []).append(expires_at)
            self._seats.touched.clear()
        finally:
            db.execute("COMMIT")
        return {f: (n, tuple(sorted(expiries.get(f, ())))) for f, n in taken.items()}

    def _read_touched(self, db: sqlite3.Connection) -> _Refreshed:
        """
        In a write transaction, before its COMMIT: the availability of the
        flights it changed, as it is about to commit it.
        """
        if self.max_batch <= 1:
            self._seats.touched.clear()
            return {}
        return self._seats.availability(db.execute)

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

    def _write_one(self, work: Callable[[Tx], T]) -> Deferred[T]:
        """
        Run C{work(tx)} in a write transaction of its own.
        """

        def job() -> tuple[_Outcome, list[tuple[str, str]]]:
            outcomes, _, ended = self._run_batch([work])
            return outcomes[0], ended

        def answer(done: tuple[_Outcome, list[tuple[str, str]]]) -> Any:
            (ok, value), ended = done
            self._checkpoint()
            self._report(ended)
            return value  # a Failure goes down the errback chain

        return self._executor.submit(self._guarded(job)).addCallback(answer)

    def _guarded(self, job: Callable[[], T], db: sqlite3.Connection | None = None) -> Callable[[], T]:
        """
        C{job}, with the database's operational failures (disk full, locked,
        I/O error) turned into L{StorageUnavailable}. C{db}: the connection
        it runs on (the writer's by default).
        """

        def guarded() -> T:
            conn = self._db if db is None else db
            try:
                if conn.in_transaction:
                    # A failed COMMIT can leave a transaction open: end it,
                    # or nothing could ever start again.
                    self._log.warn("rolling back a transaction left open by a failure")
                    conn.execute("ROLLBACK")
                return job()
            except sqlite3.OperationalError as e:
                self._log.error("storage unavailable: {error}", error=str(e))
                raise StorageUnavailable() from e

        return guarded

    def _read(self, work: Callable[[Tx], T]) -> Deferred[T]:
        """
        Run C{work(tx)} in one read transaction (a consistent snapshot): on
        the read connection if the store has one (it sees every committed
        write, and never waits behind the writer's queue), else on the
        writer's.
        """
        if self._reader is not None:
            db, executor = self._reader, self._read_executor
        else:
            db, executor = self._db, self._executor

        def job() -> T:
            db.execute("BEGIN")
            try:
                result = work(SQLiteTx(db, self._clock.seconds()))
            except BaseException:
                self._rollback(db)
                raise
            db.execute("COMMIT")
            return result

        return executor.submit(self._guarded(job, db))

    # -- free seats ---------------------------------------------------------

    def free_seats(self, flights: list[Flight]) -> Deferred[dict[str, int]]:
        availability = self._availability
        if availability is None:
            return super().free_seats(flights)
        now = self._clock.seconds()
        free = {}
        for flight in flights:
            state = availability.get(flight.flight_id)
            if state is None:
                free[flight.flight_id] = flight.aircraft.capacity
            else:
                # Seats of holds whose time is up but that nobody has ended
                # yet are free.
                taken, expiries = state
                free[flight.flight_id] = flight.aircraft.capacity - taken + bisect.bisect_right(expiries, now)
        return succeed(free)
