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

A one-step purchase is one statement, the C{vendepass_buy} function of
migration 3 (see L{PostgresRules}), sent in autocommit: one round trip, with
the same locks in the same order inside it.

A connection that dies is replaced. What it was doing is done again on the
new one if its COMMIT had not been sent, or if it has a C{request_id} (it
then finds its first outcome); otherwise its outcome is unknown, and it is
refused with C{outcome_unknown}, never with C{storage_unavailable} (which
says that nothing changed). See L{PostgresStore._job}.

Expired holds are ended by whichever transaction looks at their seats, by
C{expire_hold}, and by every server's sweep (C{FOR UPDATE SKIP LOCKED}, so
sweeps share the work). Each such expiry is announced with
C{NOTIFY vendepass_expired}; every server listens, so the owner's connection
hears of it whichever server noticed.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import random
import select
import threading
import time
from typing import Any, Callable, Iterable, TypeVar, cast

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vendepass.errors import OutcomeUnknown, SoldOut, StorageUnavailable, VendePassError
from vendepass.fixtures import Fixtures
from vendepass.model import Money, Network, Ticket
from vendepass.store import IExecutor, IStore, LegRequest, schema
from vendepass.store.common import _random_code, check_seat, load_fixtures, read_network, seat_taken
from vendepass.store.transactions import (
    RulesStore,
    SeatRules,
    Tx,
    asked_twice,
    departed,
    new_ticket_legs,
    over_limit,
    request_reused,
)

T = TypeVar("T")

# The channel on which expiries are announced to every server.
EXPIRED_CHANNEL = "vendepass_expired"
# How many times a transaction that lost a race (serialization failure,
# deadlock, unique violation) is tried again before the request is refused.
RETRIES = 8
# How many times a transaction whose connection died is tried again on a
# new one before the request is refused.
RECONNECTS = 3
# Advisory lock keys: the first of the two 32-bit halves says what is locked.
_SCHEMA_LOCK = (0x56500000, 0)
_FLIGHT_LOCK = 0x56500001
_REQUEST_LOCK = 0x56500002

_SCHEMA_1 = schema.render(
    real="DOUBLE PRECISION",
    cents="BIGINT",
    holds_indexes="CREATE INDEX holds_active ON holds(expires_at) WHERE state = 'active';\n"
    "CREATE INDEX holds_session ON holds(session_id) WHERE state = 'active';\n"
    "CREATE INDEX holds_user ON holds(username) WHERE state = 'active';\n"
    "CREATE INDEX holds_ended ON holds(ended_at) WHERE state <> 'active';\n",
    ticket_serial="    n BIGINT GENERATED ALWAYS AS IDENTITY,\n",
    ticket_order=", n",
) + """CREATE TABLE requests (
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

# Version 2: a page of a customer's active tickets reads only those.
_SCHEMA_2 = """
CREATE INDEX tickets_user_active ON tickets(username, bought_at, n) WHERE status = 'active';
"""

# Version 3: a one-step purchase as one function, called in one round trip
# (see L{PostgresRules}). It does what L{SeatRules.buy} does, statement for
# statement, in the same lock order: the request's advisory lock (key
# 0x56500002) and its replay, the departures, the flights' advisory locks
# (key 0x56500001, in the order given: sorted by L{_lock_key}), the end of
# their expired holds in hold id order (with their audit rows and
# NOTIFYs), each seat looked at or picked, the seats-per-flight limit;
# then, once nothing can be refused, the writes: ticket (under the first
# free booking code), seats, audit, request, ticket legs. A refusal is
# returned, not raised: what was done before it (the end of expired holds)
# commits, as L{SeatRules} has it. Legs are a JSON array of
# {flight, seat (null: pick), departs, rows, letters, number, origin,
# destination, departure, arrival, fare}.
_SCHEMA_3 = """
CREATE FUNCTION vendepass_buy(
    p_username TEXT, p_request_id TEXT, p_request_key INTEGER, p_now DOUBLE PRECISION,
    p_flight_keys INTEGER[], p_legs JSONB, p_max_per_flight INTEGER, p_currency TEXT, p_codes TEXT[]
) RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION := coalesce(p_now, extract(epoch FROM now())::float8);
    n INTEGER := jsonb_array_length(p_legs);
    alphabet CONSTANT TEXT := 'ABCDEFGHJKMNPQRSTUVWXYZ23456789';
    ended JSONB := '[]';
    flights TEXT[];
    chosen TEXT[] := '{}';
    names TEXT[] := '{}';
    lg JSONB;
    f TEXT;
    s TEXT;
    k INTEGER;
    nl INTEGER;
    places INTEGER[];
    r RECORD;
    mine BIGINT;
    day BIGINT;
    code TEXT;
    price BIGINT;
BEGIN
    IF p_request_id IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(1448083458, p_request_key);
        SELECT kind, outcome INTO r FROM requests WHERE username = p_username AND request_id = p_request_id;
        IF FOUND THEN
            IF r.kind <> 'buy' THEN
                RETURN jsonb_build_object('refused', 'request_kind', 'kind', r.kind, 'ended', ended);
            END IF;
            RETURN jsonb_build_object('replay', r.outcome, 'now', t, 'ended', ended);
        END IF;
    END IF;
    FOR i IN 0 .. n - 1 LOOP
        IF (p_legs->i->>'departs')::float8 <= t THEN
            RETURN jsonb_build_object('refused', 'flight_departed', 'leg', i, 'ended', ended);
        END IF;
    END LOOP;
    FOREACH k IN ARRAY p_flight_keys LOOP
        PERFORM pg_advisory_xact_lock(1448083457, k);
    END LOOP;
    SELECT array_agg(DISTINCT l->>'flight') INTO flights FROM jsonb_array_elements(p_legs) l;
    FOR r IN SELECT DISTINCT st.hold_id FROM seats st JOIN holds h ON h.hold_id = st.hold_id
        WHERE st.flight_id = ANY(flights) AND st.hold_id IS NOT NULL AND h.state = 'active' AND h.expires_at <= t
        ORDER BY st.hold_id
    LOOP
        UPDATE holds SET state = 'expired', ended_at = t WHERE hold_id = r.hold_id AND state = 'active'
            RETURNING username, session_id INTO f, s;
        IF FOUND THEN
            INSERT INTO audit (at, username, action, hold_id, ticket_id, seats)
                SELECT t, f, 'expire', r.hold_id, NULL, to_jsonb(array_agg(flight_id || '/' || seat ORDER BY leg))::text
                FROM hold_legs WHERE hold_id = r.hold_id;
            DELETE FROM seats WHERE hold_id = r.hold_id;
            ended := ended || jsonb_build_array(jsonb_build_array(r.hold_id, s));
            PERFORM pg_notify('vendepass_expired', r.hold_id || ' ' || s);
        END IF;
    END LOOP;
    FOR i IN 0 .. n - 1 LOOP
        lg := p_legs->i;
        f := lg->>'flight';
        s := lg->>'seat';
        IF s IS NULL THEN
            -- The first free seat in seat map order: the taken seats (and
            -- those this purchase took on the flight) as their places in
            -- the seat map, sorted; the first place missing is free.
            nl := length(lg->>'letters');
            SELECT array_agg(ix ORDER BY ix) INTO places FROM (
                SELECT (left(st.seat, -1)::int - 1) * nl + strpos(lg->>'letters', right(st.seat, 1)) - 1 AS ix
                    FROM seats st WHERE st.flight_id = f
                UNION ALL
                SELECT (left(c.seat, -1)::int - 1) * nl + strpos(lg->>'letters', right(c.seat, 1)) - 1
                    FROM (SELECT substr(nm, length(f) + 2) AS seat FROM unnest(names) nm
                        WHERE left(nm, length(f) + 1) = f || '/') c
            ) x;
            k := coalesce(
                (SELECT min(g - 1) FROM generate_subscripts(places, 1) g WHERE places[g] <> g - 1),
                coalesce(array_length(places, 1), 0));
            IF k >= (lg->>'rows')::int * nl THEN
                RETURN jsonb_build_object('refused', 'sold_out', 'leg', i, 'ended', ended);
            END IF;
            s := (k / nl + 1)::text || substr(lg->>'letters', k % nl + 1, 1);
        ELSE
            IF s !~ '^[1-9][0-9]{0,2}[A-Z]$' OR substring(s FROM '^[0-9]+')::int > (lg->>'rows')::int
                OR strpos(lg->>'letters', right(s, 1)) = 0 THEN
                RETURN jsonb_build_object('refused', 'unknown_seat', 'leg', i, 'ended', ended);
            END IF;
            IF f || '/' || s = ANY(names) THEN
                RETURN jsonb_build_object('refused', 'asked_twice', 'leg', i, 'ended', ended);
            END IF;
            SELECT st.ticket_id, h.expires_at INTO r FROM seats st LEFT JOIN holds h ON h.hold_id = st.hold_id
                WHERE st.flight_id = f AND st.seat = s;
            IF FOUND THEN
                RETURN jsonb_build_object('refused', 'seat_taken', 'leg', i, 'sold', r.ticket_id IS NOT NULL,
                    'held_until', r.expires_at, 'ended', ended);
            END IF;
        END IF;
        chosen := chosen || s;
        names := names || (f || '/' || s);
    END LOOP;
    IF p_max_per_flight IS NOT NULL THEN
        FOR r IN SELECT l->>'flight' AS flight, COUNT(*) AS more FROM jsonb_array_elements(p_legs) l
            GROUP BY 1 ORDER BY (l->>'flight') COLLATE "C"
        LOOP
            SELECT COUNT(*) INTO mine FROM seats st LEFT JOIN holds h ON h.hold_id = st.hold_id
                LEFT JOIN tickets tk ON tk.ticket_id = st.ticket_id
                WHERE st.flight_id = r.flight AND (tk.username = p_username OR h.username = p_username AND h.expires_at > t);
            IF mine + r.more > p_max_per_flight THEN
                RETURN jsonb_build_object('refused', 'purchase_limit', 'flight', r.flight, 'mine', mine, 'ended', ended);
            END IF;
        END LOOP;
    END IF;
    SELECT sum((l->>'fare')::bigint) INTO price FROM jsonb_array_elements(p_legs) l;
    day := floor(t / 86400)::bigint % 961;
    FOR a IN 1 .. array_length(p_codes, 1) LOOP
        code := p_codes[a];
        IF length(code) = 6 THEN
            code := substr(alphabet, (day / 31)::int + 1, 1) || substr(alphabet, (day % 31)::int + 1, 1) || code;
        END IF;
        INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)
            VALUES (code, p_username, 'active', price, p_currency, t) ON CONFLICT (ticket_id) DO NOTHING;
        EXIT WHEN FOUND;
        code := NULL;
    END LOOP;
    IF code IS NULL THEN
        RAISE EXCEPTION 'no free booking code found';
    END IF;
    FOR i IN 0 .. n - 1 LOOP
        INSERT INTO seats (flight_id, seat, hold_id, ticket_id) VALUES (p_legs->i->>'flight', chosen[i + 1], NULL, code);
    END LOOP;
    INSERT INTO audit (at, username, action, hold_id, ticket_id, seats)
        VALUES (t, p_username, 'buy', NULL, code, to_jsonb(names)::text);
    IF p_request_id IS NOT NULL THEN
        INSERT INTO requests (username, request_id, kind, outcome, created_at)
            VALUES (p_username, p_request_id, 'buy', code, t);
    END IF;
    INSERT INTO ticket_legs (ticket_id, leg, flight_id, number, origin, destination, departure, arrival, seat, price_cents)
        SELECT code, i, l->>'flight', l->>'number', l->>'origin', l->>'destination', l->>'departure', l->>'arrival',
            chosen[i + 1], (l->>'fare')::bigint
        FROM jsonb_array_elements(p_legs) WITH ORDINALITY AS e(l, o), LATERAL (SELECT (o - 1)::int AS i) x;
    RETURN jsonb_build_object('ticket', code, 'seats', to_jsonb(chosen), 'now', t, 'ended', ended);
END $$;
"""

# MIGRATIONS[n] takes a database from schema version n to n + 1. Append to
# it; never edit a migration that has shipped.
# Group commit of one-step purchases (see L{PostgresStore._next_batch}):
# one call, one transaction, one COMMIT for several purchases. The lock
# order of a single purchase, for the whole batch: every request advisory
# lock first, sorted by key; then every flight advisory lock, sorted by
# key; then each purchase is L{vendepass_buy} (migration 3), whose own
# advisory locks are already held (they are re-entrant in a transaction).
# A refusal is that purchase's answer only: L{vendepass_buy} refuses before
# it writes. An exception rolls the whole batch back (the store then runs
# each purchase alone). C{p_buys}: a JSON array of
# [username, request_id, request key, now, flight keys, legs, max per
# flight, currency, codes], as L{vendepass_buy}'s arguments; answers: the
# array of L{vendepass_buy}'s answers, in order.
_SCHEMA_BUY_BATCH = """
CREATE FUNCTION vendepass_buy_batch(p_buys JSONB) RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    answers JSONB := '[]';
    b JSONB;
    k INTEGER;
BEGIN
    FOR k IN SELECT DISTINCT (x->>2)::int FROM jsonb_array_elements(p_buys) x
        WHERE x->>2 IS NOT NULL ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(1448083458, k);
    END LOOP;
    FOR k IN SELECT DISTINCT f::int FROM jsonb_array_elements(p_buys) x, jsonb_array_elements_text(x->4) f ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(1448083457, k);
    END LOOP;
    FOR b IN SELECT x FROM jsonb_array_elements(p_buys) x LOOP
        answers := answers || jsonb_build_array(vendepass_buy(
            b->>0, b->>1, (b->>2)::int, (b->>3)::float8,
            ARRAY(SELECT jsonb_array_elements_text(b->4)::int), b->5, (b->>6)::int, b->>7,
            ARRAY(SELECT jsonb_array_elements_text(b->8))));
    END LOOP;
    RETURN answers;
END $$;
"""

MIGRATIONS: list[str] = [_SCHEMA_1, _SCHEMA_2, _SCHEMA_3, _SCHEMA_BUY_BATCH]
SCHEMA_VERSION = len(MIGRATIONS)


def _lock_key(name: str) -> int:
    """
    The advisory lock key of a flight or a request: the same on every server.
    """
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big", signed=True)


def _request_key(username: str, request_id: str) -> int:
    """
    The advisory lock key of a customer's C{request_id}.
    """
    return _lock_key(f"{username}/{request_id}")


def _flight_keys(flight_ids: list[str]) -> list[int]:
    """
    The advisory lock keys of flights, in the one order every server takes them.
    """
    return sorted({_lock_key(f) for f in flight_ids})


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


@functools.lru_cache(maxsize=1024)
def _pg(sql: str) -> str:
    """
    A statement of the rules (C{?} placeholders) in psycopg's style.
    """
    return sql.replace("?", "%s")


class PostgresTx(Tx):
    """
    One transaction on one connection: its cursor and its time (the
    database's, or the injected clock's in tests). Claims and changes take
    row and advisory locks (see L{vendepass.store.transactions}).
    """

    seat_list = "string_agg(seat, ' ')"
    ticket_order = "n"

    def __init__(self, cur: psycopg.Cursor[Any], now: float) -> None:
        super().__init__(now)
        self.cur = cur
        # Whether a statement changed rows: if not, a lost COMMIT lost nothing.
        self.wrote = False
        # Whether the transaction is a request with a request_id: done again,
        # it finds its first outcome (replay), so it may be run again when
        # whether its COMMIT happened is unknown.
        self.replayable = False

    def _statement(self, sql: str) -> str:
        if not self.wrote and not sql.startswith("SELECT"):
            self.wrote = True
        return _pg(sql)

    def execute(self, sql: str, args: Iterable[Any] = ()) -> psycopg.Cursor[Any]:
        return self.cur.execute(self._statement(sql), args)  # type: ignore[call-overload]

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        self.cur.executemany(self._statement(sql), rows)  # type: ignore[arg-type]

    def one(self, sql: str, args: Iterable[Any] = ()) -> Any:
        return self.cur.execute(self._statement(sql), args).fetchone()  # type: ignore[call-overload]

    def all(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        return self.cur.execute(self._statement(sql), args).fetchall()  # type: ignore[call-overload]

    def for_update(self, table: str | None = None) -> str:
        return " FOR UPDATE" if table is None else f" FOR UPDATE OF {table}"

    def skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def index_hint(self, index: str) -> str:
        return ""

    def hold_order(self, holds: str, hold_id: str) -> str:
        # The lock order of holds: by id.
        return hold_id

    def lock_request(self, username: str, request_id: str) -> None:
        self.replayable = True
        self.execute("SELECT pg_advisory_xact_lock(?, ?)", (_REQUEST_LOCK, _request_key(username, request_id)))

    def lock_user(self, username: str) -> None:
        self.execute("SELECT 1 FROM users WHERE username = ? FOR NO KEY UPDATE", (username,))

    def lock_flights(self, flight_ids: list[str]) -> None:
        # In one order on every server: claims of the same flight take
        # turns, and claims of several never deadlock.
        for key in _flight_keys(flight_ids):
            self.execute("SELECT pg_advisory_xact_lock(?, ?)", (_FLIGHT_LOCK, key))


# The one statement of a one-step purchase (migration 3).
BUY_CALL = "SELECT vendepass_buy(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
# The one statement of a batch of them (migration 4).
BUY_BATCH_CALL = "SELECT vendepass_buy_batch(%s)"


class PostgresRules(SeatRules):
    """
    The seat rules, with the one-step purchase done by the database's
    C{vendepass_buy} function (migration 3) in one round trip: L{buy_call}
    is its statement, L{bought} what its answer means. The function does
    what L{SeatRules.buy} does (the SQLite store runs that), and answers
    with the same refusals, made here by the same helpers.
    """

    def buy_call(
        self, username: str, legs: list[LegRequest], request_id: str | None, now: float | None
    ) -> tuple[Any, ...]:
        """
        The arguments of C{vendepass_buy} for this purchase (C{now}: the
        injected clock's time, or C{None} for the database's).
        """
        described = [
            {
                "flight": leg.flight.flight_id,
                "seat": leg.seat,
                "departs": leg.flight.departs_ts,
                "rows": leg.flight.aircraft.rows,
                "letters": leg.flight.aircraft.letters,
                "number": leg.flight.number,
                "origin": leg.flight.origin,
                "destination": leg.flight.destination,
                "departure": leg.flight.departure_iso,
                "arrival": leg.flight.arrival_iso,
                "fare": leg.flight.fare.cents,
            }
            for leg in legs
        ]
        # As SeatRules.new_ticket: 8 codes that begin with the day (the
        # database's: it adds those two letters), then 8 wholly random.
        codes = [_random_code(6) for _ in range(8)] + [_random_code(8) for _ in range(8)]
        return (
            username,
            request_id,
            None if request_id is None else _request_key(username, request_id),
            now,
            _flight_keys([leg.flight.flight_id for leg in legs]),
            Jsonb(described),
            self.max_seats_per_flight,
            self.currency,
            codes,
        )

    def bought(
        self, tx: Tx, username: str, legs: list[LegRequest], request_id: str | None, answer: dict[str, Any]
    ) -> Ticket:
        """
        The ticket C{vendepass_buy} answered with, or the refusal it
        returned, raised. A replay reads the ticket (a second round trip,
        on C{tx}, after the function's commit).
        """
        if "ticket" in answer:
            chosen = list(zip([leg.flight for leg in legs], answer["seats"]))
            return self.new_ticket_value(answer["ticket"], username, new_ticket_legs(chosen), answer["now"])
        if "replay" in answer:
            return self.ticket_as_bought(tx, answer["replay"])
        refused = answer["refused"]
        if refused == "request_kind":
            assert request_id is not None
            raise request_reused(request_id, answer["kind"])
        if refused == "purchase_limit":
            assert self.max_seats_per_flight is not None
            raise over_limit(self.max_seats_per_flight, answer["flight"], answer["mine"])
        leg = legs[answer["leg"]]
        if refused == "flight_departed":
            raise departed(leg.flight)
        if refused == "sold_out":
            raise SoldOut(f"Flight {leg.flight.flight_id} is sold out.", flight=leg.flight.flight_id)
        assert leg.seat is not None
        if refused == "unknown_seat":
            check_seat(leg.flight, leg.seat)
        elif refused == "asked_twice":
            raise asked_twice(leg.flight, leg.seat)
        elif refused == "seat_taken":
            raise seat_taken(leg.flight, leg.seat, answer["sold"] or None, answer["held_until"])
        raise RuntimeError(f"vendepass_buy answered {answer!r}")


def _idle_and_alive(conn: psycopg.Connection[Any]) -> bool:
    """
    Whether an idle connection still looks alive, without a round trip: an
    idle connection has nothing to read, unless its server said goodbye
    (a terminated backend sends its last error and closes). Nothing to read
    does not prove it alive; something to read makes it suspect, and it is
    replaced (an unasked notice is rare: that costs a new connection).
    """
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    return not readable


class _Fallback(Exception):
    """
    A batch of purchases raised (a conflict, a constraint, a bug): it was
    rolled back whole, and each of its purchases is to be run alone.
    """


class _LostBatch(Exception):
    """
    A batch of purchases' connection died while its call ran: whether it
    committed is unknown.
    """


class _Lost(Exception):
    """
    An attempt's connection died. C{committing}: at or after its COMMIT was
    sent (its outcome is unknown); else nothing of it was committed.
    C{replayable}: it is a request with a C{request_id}.
    """

    def __init__(self, committing: bool, replayable: bool) -> None:
        super().__init__(committing, replayable)
        self.committing = committing
        self.replayable = replayable


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
    for migration in MIGRATIONS:
        for statement in _statements(migration):
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
class PostgresStore(RulesStore):
    """
    The PostgreSQL store. Open it with L{PostgresStore.open}.
    """

    _log = Logger()
    # What each transaction runs its statements through (tests that step
    # through the production statements one at a time put theirs here).
    transaction_class: type[PostgresTx] = PostgresTx
    rules_class: type[PostgresRules] = PostgresRules

    # Group commit of one-step purchases (L{_next_batch}): at most
    # C{max_batch} in one call (1: each purchase alone), and at most
    # C{batch_slots} calls at once (the writers' connections).
    max_batch = 1
    batch_slots = 8

    def __init__(
        self,
        url: str,
        network: Network,
        executor: IExecutor,
        reactor: IReactorThreads | None = None,
        clock: IReactorTime | None = None,
        max_held_seats: int = 9,
        read_executor: IExecutor | None = None,
    ) -> None:
        """
        @param reactor: where announced expiries are delivered; C{None}: the
            store does not listen for other servers' expiries.
        @param read_executor: where reads run (see L{_read}); C{None}: with
            the writes.
        @param clock: C{None} (production): the database's clock is the
            store's time. Tests that drive time with a L{Clock} pass it.
        """
        self.url = url
        self.rules = self.rules_class(network, max_held_seats)
        self._network = network
        self._currency = network.currency
        self._executor = executor
        self._read_executor = read_executor
        self._reactor = reactor
        self._clock = clock
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Any]] = []
        self._own_pids: set[int] = set()
        self._watchers: list[Callable[[str, str], None]] = []
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self.retries = 0
        self._buys: collections.deque[tuple[str, list[LegRequest], str | None, Deferred[Ticket]]] = collections.deque()
        self._batches = 0
        # Calls of vendepass_buy_batch, and the purchases they carried.
        self.buy_batches = 0
        self.batched_buys = 0
        # Attempts run again on a new connection because theirs had died.
        self.reconnects = 0

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
        read_executor: IExecutor | None = None,
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
        return cls(url, network, executor, reactor, clock, max_held_seats, read_executor)

    def start(self) -> None:
        self._stopping.clear()
        self._executor.start()
        if self._read_executor is not None:
            self._read_executor.start()
        if self._reactor is not None and self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="vendepass-pg-listen", daemon=True)
            self._listener.start()

    def stop(self) -> None:
        self._stopping.set()
        self._executor.stop()
        if self._read_executor is not None:
            self._read_executor.stop()
        if self._listener is not None:
            self._listener.join(timeout=5)
            self._listener = None
        for conn in self._connections:
            conn.close()
        self._connections.clear()

    def network(self) -> Network:
        return self._network

    # -- connections and transactions ----------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """
        This thread's connection (each executor thread has its own).
        """
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                self._drop_connection()
            conn = connect(self.url)
            try:
                # Durable: a COMMIT returns once it is flushed to disk, whatever
                # the database's default (an acknowledged purchase is never lost).
                conn.execute("SET synchronous_commit TO on")
            except psycopg.OperationalError as e:
                # Connected, then lost at once: try another.
                conn.close()
                raise _Lost(False, False) from e
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

    def _write(self, work: Callable[[Tx], T]) -> Deferred[T]:
        """
        Run C{work(tx)} in one transaction on the executor, retrying it from
        the start when it lost a race; fire with its outcome once committed.
        Reads run the same way (L{_read}): at C{READ COMMITTED} a read-only
        transaction costs nothing more.

        A connection that turns out dead (PostgreSQL restarted, its backend
        terminated) is replaced, and what it was doing is judged by when it
        died (see L{_job}).
        """
        ended: list[tuple[str, str]] = []
        return self._submit(lambda: self._attempt(work, ended), ended)

    def _submit(self, attempt: Callable[[], T], ended: list[tuple[str, str]]) -> Deferred[T]:
        """
        Run C{attempt} on the writers' executor under L{_job}'s rules, then
        report the holds it C{ended}, whatever its outcome.
        """

        def report(outcome: Any) -> Any:
            self._report(ended)
            return outcome

        return self._executor.submit(lambda: self._job(attempt)).addBoth(report)

    def _read(self, work: Callable[[Tx], T]) -> Deferred[T]:
        """
        Run C{work(tx)}, which only reads, in one transaction: on the read
        executor if the store has one (its own threads and connections, so
        a flood of reads never takes the writers' threads), else as a write.
        At C{READ COMMITTED} a read loses no race; a dead connection is
        replaced and the read done again on a new one, as a write's (L{_job}).
        """
        if self._read_executor is None:
            return self._write(work)
        return self._read_executor.submit(lambda: self._job(lambda: self._attempt(work, [])))

    def _job(self, attempt: Callable[[], T]) -> T:
        """
        Run C{attempt} (one attempt of a transaction: L{_attempt} of some
        work, or L{_attempt_buy}) until it is done or refused:
          - lost a race: again from the start, up to L{RETRIES} times;
          - the connection died before COMMIT was sent: nothing was
            committed, so again on a new connection, up to L{RECONNECTS}
            times (after a backend is killed, the next request on each
            pooled connection finds it dead: that costs no request);
          - the connection died at or after COMMIT was sent: its outcome is
            unknown. A request with a C{request_id} is run again on a new
            connection, where it finds its first outcome if that committed
            (replay) and is done now if it did not; any other is refused
            with L{OutcomeUnknown}, never with L{StorageUnavailable}, which
            says that nothing was changed.
        """
        conflicts = reconnects = 0
        unknown = False  # whether an earlier attempt's COMMIT may have happened

        def give_up() -> StorageUnavailable:
            return OutcomeUnknown() if unknown else StorageUnavailable()

        while True:
            try:
                return attempt()
            except (pgerrors.SerializationFailure, pgerrors.DeadlockDetected, pgerrors.UniqueViolation) as e:
                if conflicts == RETRIES:
                    self._log.warn("gave up after {n} conflicting attempts: {error}", n=conflicts + 1, error=e)
                    raise give_up() from e
                conflicts += 1
                self.retries += 1
                # A short random pause, so two rivals do not meet again.
                time.sleep(random.uniform(0, 0.002 * conflicts))
            except _Lost as lost:
                error = lost.__cause__
                if lost.committing:
                    if not lost.replayable:
                        self._log.error("connection lost during COMMIT, outcome unknown: {error}", error=str(error))
                        raise OutcomeUnknown() from error
                    unknown = True
                if reconnects == RECONNECTS:
                    self._log.error("storage unavailable: {error}", error=str(error))
                    raise give_up() from error
                reconnects += 1
                self.reconnects += 1
            except psycopg.OperationalError as e:
                # No connection could be made, or the server refused the
                # statement or the COMMIT (then it rolled the transaction back).
                self._log.error("storage unavailable: {error}", error=str(e))
                self._drop_connection()
                raise give_up() from e

    def _attempt(self, work: Callable[[Tx], T], ended: list[tuple[str, str]]) -> T:
        conn = self._connection()
        refusal: VendePassError | None = None
        committing = False
        tx: PostgresTx | None = None
        with conn.cursor() as cur:
            try:
                if self._clock is None:
                    # One round trip: BEGIN, and the transaction's time.
                    cur.execute("BEGIN; SELECT extract(epoch FROM now())::float8")
                    cur.nextset()
                    now = cur.fetchone()[0]  # type: ignore[index]
                else:
                    cur.execute("BEGIN")
                    now = self._clock.seconds()
                tx = self.transaction_class(cur, now)
                try:
                    result = work(tx)
                except VendePassError as e:
                    # A refusal comes before any write that would need
                    # undoing: what it did (end expired holds) commits.
                    refusal = e
                for hold_id, session_id in tx.ended:
                    tx.execute("SELECT pg_notify(?, ?)", (EXPIRED_CHANNEL, f"{hold_id} {session_id}"))
                committing = True
                cur.execute("COMMIT")
            except psycopg.OperationalError as e:
                if not (conn.closed or conn.broken):
                    self._rollback(conn, cur)
                    raise
                # The connection is dead: its transaction ended with it, or
                # (the COMMIT was sent) maybe committed first.
                self._drop_connection()
                if not (committing and tx is not None and (refusal is not None or not tx.wrote)):
                    raise _Lost(committing, tx is not None and tx.replayable) from e
                # Whether the COMMIT happened changes nothing the customer
                # is told: a refusal stands (what it did is at most the end
                # of expired holds), and so does what a read read.
            except BaseException:
                self._rollback(conn, cur)
                raise
        ended.extend(tx.ended)
        if refusal is not None:
            raise refusal
        return result

    def buy(self, username: str, legs: list[LegRequest], request_id: str | None = None) -> Deferred[Ticket]:
        """
        A one-step purchase: one round trip (C{vendepass_buy}, see
        L{PostgresRules}).
        """
        if self.max_batch > 1:
            d: Deferred[Ticket] = Deferred()
            self._buys.append((username, legs, request_id, d))
            if self._batches < self.batch_slots:
                self._next_batch()
            return d
        ended: list[tuple[str, str]] = []
        rules = cast(PostgresRules, self.rules)  # rules_class is one
        return self._submit(lambda: self._attempt_buy(rules, username, legs, request_id, ended), ended)

    def _next_batch(self) -> None:
        """
        Group commit (on the reactor thread): send the queued one-step
        purchases, up to L{max_batch}, to a writer as one call of
        C{vendepass_buy_batch} (L{_run_buys}). Purchases that arrive while
        L{batch_slots} calls are running wait for the next free one; a
        purchase that finds a slot free goes at once, alone.
        """
        batch = [self._buys.popleft() for _ in range(min(self.max_batch, len(self._buys)))]
        if not batch:
            return
        self._batches += 1
        ended: list[tuple[str, str]] = []
        rules = cast(PostgresRules, self.rules)
        buys = [(username, legs, request_id) for username, legs, request_id, _ in batch]

        def deliver(done: list[tuple[bool, Any]] | Failure) -> None:
            self._batches -= 1
            try:
                self._report(ended)
                for i, (_, _, _, d) in enumerate(batch):
                    if isinstance(done, Failure):
                        d.errback(done)
                    elif done[i][0]:
                        d.callback(done[i][1])
                    else:
                        d.errback(done[i][1])
            finally:
                while self._buys and self._batches < self.batch_slots:
                    self._next_batch()

        self._executor.submit(lambda: self._run_buys(rules, buys, ended)).addBoth(deliver)

    def _run_buys(
        self, rules: PostgresRules, buys: list[tuple[str, list[LegRequest], str | None]], ended: list[tuple[str, str]]
    ) -> list[tuple[bool, Any]]:
        """
        On a writer: one-step purchases, as one call if there are several
        (L{_attempt_buys}, under L{_job}'s rules for a connection found
        dead before the call), else alone. Each purchase's outcome is
        C{(True, ticket)} or C{(False, failure)}. A batch that raised is
        run again, each purchase alone (L{_Fallback}); a batch whose
        connection died during its call leaves each purchase outcome
        unknown, except those with a C{request_id}, run again alone.
        """
        outcomes: list[tuple[bool, Any] | None] = [None] * len(buys)
        unknown = False
        if len(buys) > 1:
            try:
                outcomes = self._job(lambda: self._attempt_buys(rules, buys, ended))
            except _Fallback:
                pass
            except _LostBatch as e:
                unknown = True
                for i, (_, _, request_id) in enumerate(buys):
                    if request_id is None:
                        outcomes[i] = (False, Failure(OutcomeUnknown()))
                self._log.error("connection lost during a batch of purchases, outcome unknown: {error}", error=str(e.__cause__))
            except VendePassError:
                return [(False, Failure())] * len(buys)
        done: list[tuple[bool, Any]] = []
        for outcome, (username, legs, request_id) in zip(outcomes, buys):
            if outcome is None:
                outcome = self._buy_alone(rules, username, legs, request_id, ended, unknown)
            done.append(outcome)
        return done

    def _buy_alone(
        self,
        rules: PostgresRules,
        username: str,
        legs: list[LegRequest],
        request_id: str | None,
        ended: list[tuple[str, str]],
        unknown: bool,
    ) -> tuple[bool, Any]:
        """
        One purchase of a batch, run alone (L{_attempt_buy} under L{_job}).
        C{unknown}: an earlier attempt may have committed, so "storage
        unavailable" (nothing changed) becomes "outcome unknown".
        """
        try:
            return True, self._job(lambda: self._attempt_buy(rules, username, legs, request_id, ended))
        except StorageUnavailable as e:
            if unknown and not isinstance(e, OutcomeUnknown):
                return False, Failure(OutcomeUnknown())
            return False, Failure()
        except Exception:
            return False, Failure()

    def _attempt_buys(
        self, rules: PostgresRules, buys: list[tuple[str, list[LegRequest], str | None]], ended: list[tuple[str, str]]
    ) -> list[tuple[bool, Any] | None]:
        """
        One attempt of a batch of one-step purchases: one call of
        C{vendepass_buy_batch}, in autocommit (one transaction, one COMMIT).
        Each answer is read as L{_attempt_buy} reads its one; a replay
        whose ticket cannot be read (the connection died after the COMMIT)
        is left C{None}: to be run again alone.
        """
        conn = self._connection()
        if not _idle_and_alive(conn):
            self._drop_connection()
            raise _Lost(False, True)  # nothing was sent: again on a new connection
        now = None if self._clock is None else self._clock.seconds()
        calls = []
        for username, legs, request_id in buys:
            args = list(rules.buy_call(username, legs, request_id, now))
            args[5] = args[5].obj  # the legs, inside the batch's one JSON argument
            calls.append(args)
        self.buy_batches += 1
        self.batched_buys += len(buys)
        with conn.cursor() as cur:
            try:
                answers = self._call_batch(cur, calls)
            except psycopg.OperationalError as e:
                if not (conn.closed or conn.broken):
                    raise _Fallback() from e
                self._drop_connection()
                raise _LostBatch() from e
            except psycopg.Error as e:
                raise _Fallback() from e
            outcomes: list[tuple[bool, Any] | None] = []
            for (username, legs, request_id), answer in zip(buys, answers):
                ended.extend((hold_id, session_id) for hold_id, session_id in answer["ended"])
                try:
                    tx = self.transaction_class(cur, answer.get("now", 0.0))
                    outcomes.append((True, rules.bought(tx, username, legs, request_id, answer)))
                except VendePassError:
                    outcomes.append((False, Failure()))
                except psycopg.Error:
                    # A replay (it has a request_id): run again alone.
                    outcomes.append(None)
            return outcomes

    def _call_batch(self, cur: psycopg.Cursor[Any], calls: list[list[Any]]) -> list[dict[str, Any]]:
        """
        Run C{vendepass_buy_batch} (its own transaction: the connection is
        in autocommit) and return its answers.
        """
        row = cur.execute(BUY_BATCH_CALL, (Jsonb(calls),)).fetchone()
        assert row is not None
        answers: list[dict[str, Any]] = row[0]
        return answers

    def _attempt_buy(
        self,
        rules: PostgresRules,
        username: str,
        legs: list[LegRequest],
        request_id: str | None,
        ended: list[tuple[str, str]],
    ) -> Ticket:
        """
        One attempt of a one-step purchase: its one statement, in autocommit
        (a transaction of its own, durable when it returns). A connection
        found dead before the statement is sent loses nothing; one that dies
        while it runs leaves its outcome unknown (see L{_job}).
        """
        conn = self._connection()
        if not _idle_and_alive(conn):
            self._drop_connection()
            raise _Lost(False, request_id is not None)
        now = None if self._clock is None else self._clock.seconds()
        with conn.cursor() as cur:
            try:
                answer = self._call(cur, BUY_CALL, rules.buy_call(username, legs, request_id, now))
            except psycopg.OperationalError as e:
                if not (conn.closed or conn.broken):
                    raise
                self._drop_connection()
                raise _Lost(True, request_id is not None) from e
            ended.extend((hold_id, session_id) for hold_id, session_id in answer["ended"])
            try:
                return rules.bought(self.transaction_class(cur, answer.get("now", 0.0)), username, legs, request_id, answer)
            except psycopg.OperationalError as e:
                # Reading a replayed ticket: nothing was being changed.
                if not (conn.closed or conn.broken):
                    raise
                self._drop_connection()
                raise _Lost(False, True) from e

    def _call(self, cur: psycopg.Cursor[Any], sql: str, args: tuple[Any, ...]) -> dict[str, Any]:
        """
        Run one statement that is its own transaction (the connection is in
        autocommit) and return the JSON object it answers. The isolation
        tests step it inside a transaction of their own.
        """
        row = cur.execute(sql, args).fetchone()  # type: ignore[call-overload]
        assert row is not None
        answer: dict[str, Any] = row[0]
        return answer

    def _rollback(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> None:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                cur.execute("ROLLBACK")
            except psycopg.Error:
                self._drop_connection()

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


__all__ = ["MIGRATIONS", "PostgresStore", "SCHEMA_VERSION", "is_postgres_url", "prepare"]
