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

Every change of seat state is one statement, a
function of the database sent in autocommit (see L{PostgresRules} and
L{PostgresStore._attempt_call}): one round trip, with the same locks in the
same order inside it. A one-step purchase is C{vendepass_buy} (migration
3); a hold, the purchase of a hold, a release and a cancellation are
C{vendepass_hold}, C{vendepass_buy_hold}, C{vendepass_release} and
C{vendepass_cancel} (migration 4). Each does what its L{SeatRules} method
does, statement for statement, and returns its refusals (so that what came
before them, the end of expired holds, commits). Ending a closed
connection's holds, C{expire_hold} and the sweep are
C{vendepass_release_session}, C{vendepass_expire_hold} and
C{vendepass_expired_holds} (migration 6). Only the reads (and C{add_user})
still run L{SeatRules} through L{PostgresTx}.

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
from typing import Any, Callable, Iterable, NoReturn, TypeVar, cast

import attrs
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

from vendepass.errors import OutcomeUnknown, SessionClosed, SoldOut, StorageUnavailable, VendePassError
from vendepass.fixtures import Fixtures
from vendepass.model import Flight, HeldSeat, Hold, Money, Network, Ticket, TicketLeg
from vendepass.schedule import flight_by_id
from vendepass.store import IExecutor, IStore, LegRequest, schema
from vendepass.store.common import (
    REQUEST_RETENTION,
    _random_code,
    check_seat,
    hold_random,
    load_fixtures,
    read_network,
    seat_taken,
)
from vendepass.store.transactions import (
    Reads,
    RulesStore,
    SeatRules,
    Tx,
    already_cancelled,
    asked_twice,
    departed,
    hold_expired,
    hold_not_found,
    new_ticket_legs,
    over_limit,
    request_reused,
    ticket_departed,
    ticket_not_found,
    too_many_holds,
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

# Version 4: every other change of seat state as one function too, called
# in one round trip, each doing what its L{SeatRules} method does,
# statement for statement, with the same locks in the same order (request,
# user, flights, holds and tickets in hold id order, seats):
# C{vendepass_hold}, C{vendepass_buy_hold}, C{vendepass_release},
# C{vendepass_cancel}. Helpers: C{vendepass_replay} (the request's lock and
# what it did), C{vendepass_end_hold} (with its audit row and, for an
# expiry, its NOTIFY), C{vendepass_end_expired_on}, C{vendepass_claim}
# (departures, flights' locks, expired holds, seats, the seats-per-flight
# limit: as L{SeatRules.claim} and L{SeatRules.check_seats_per_flight}),
# C{vendepass_active_hold}, C{vendepass_new_ticket} and C{vendepass_ticket}
# (a ticket as JSON). Refusals are returned, not raised: what was done
# before them (the end of expired holds) commits. A hold's legs keep their
# flight's description (C{hold_legs.flight}, the JSON of a purchase's legs)
# for the purchase of the hold, which has no other way to know them; a hold
# made without one (by a server of schema version 3) is answered with
# C{describe}, and the store calls again with the descriptions.
_SCHEMA_4 = """
ALTER TABLE hold_legs ADD COLUMN flight JSONB;
CREATE FUNCTION vendepass_replay(p_username TEXT, p_request_id TEXT, p_request_key INTEGER, p_kind TEXT)
RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    r RECORD;
BEGIN
    IF p_request_id IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1448083458, p_request_key);
    SELECT kind, outcome INTO r FROM requests WHERE username = p_username AND request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF r.kind <> p_kind THEN
        RETURN jsonb_build_object('refused', 'request_kind', 'kind', r.kind, 'ended', '[]'::jsonb);
    END IF;
    RETURN jsonb_build_object('outcome', r.outcome);
END $$;
CREATE FUNCTION vendepass_end_hold(p_hold_id TEXT, p_state TEXT, p_t DOUBLE PRECISION)
RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    v_user TEXT;
    v_session TEXT;
    v_names TEXT;
BEGIN
    UPDATE holds SET state = p_state, ended_at = p_t WHERE hold_id = p_hold_id AND state = 'active'
        RETURNING username, session_id INTO v_user, v_session;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(to_jsonb(array_agg(flight_id || '/' || seat ORDER BY leg)), '[]'::jsonb)::text INTO v_names
        FROM hold_legs WHERE hold_id = p_hold_id;
    DELETE FROM seats WHERE hold_id = p_hold_id;
    INSERT INTO audit (at, username, action, hold_id, ticket_id, seats)
        VALUES (p_t, v_user, CASE WHEN p_state = 'expired' THEN 'expire' ELSE 'release' END, p_hold_id, NULL, v_names);
    IF p_state = 'expired' THEN
        PERFORM pg_notify('vendepass_expired', p_hold_id || ' ' || v_session);
    END IF;
    RETURN v_session;
END $$;
CREATE FUNCTION vendepass_end_expired_on(p_flights TEXT[], p_t DOUBLE PRECISION)
RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    v_ended JSONB := '[]';
    v_session TEXT;
    r RECORD;
BEGIN
    FOR r IN SELECT DISTINCT st.hold_id FROM seats st JOIN holds h ON h.hold_id = st.hold_id
        WHERE st.flight_id = ANY(p_flights) AND st.hold_id IS NOT NULL AND h.state = 'active' AND h.expires_at <= p_t
        ORDER BY st.hold_id
    LOOP
        v_session := vendepass_end_hold(r.hold_id, 'expired', p_t);
        IF v_session IS NOT NULL THEN
            v_ended := v_ended || jsonb_build_array(jsonb_build_array(r.hold_id, v_session));
        END IF;
    END LOOP;
    RETURN v_ended;
END $$;
CREATE FUNCTION vendepass_claim(
    p_username TEXT, p_flight_keys INTEGER[], p_legs JSONB, p_max_per_flight INTEGER, p_t DOUBLE PRECISION
) RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    v_count INTEGER := jsonb_array_length(p_legs);
    v_ended JSONB := '[]';
    v_flights TEXT[];
    v_chosen TEXT[] := '{}';
    v_names TEXT[] := '{}';
    v_mine BIGINT;
    lg JSONB;
    f TEXT;
    s TEXT;
    k INTEGER;
    nl INTEGER;
    places INTEGER[];
    r RECORD;
BEGIN
    FOR i IN 0 .. v_count - 1 LOOP
        IF (p_legs->i->>'departs')::float8 <= p_t THEN
            RETURN jsonb_build_object('refused', 'flight_departed', 'leg', i, 'ended', v_ended);
        END IF;
    END LOOP;
    FOREACH k IN ARRAY p_flight_keys LOOP
        PERFORM pg_advisory_xact_lock(1448083457, k);
    END LOOP;
    SELECT array_agg(DISTINCT l->>'flight') INTO v_flights FROM jsonb_array_elements(p_legs) l;
    v_ended := vendepass_end_expired_on(v_flights, p_t);
    FOR i IN 0 .. v_count - 1 LOOP
        lg := p_legs->i;
        f := lg->>'flight';
        s := lg->>'seat';
        IF s IS NULL THEN
            -- As vendepass_buy: the first place of the seat map that
            -- neither a seat row nor this claim has taken.
            nl := length(lg->>'letters');
            SELECT array_agg(ix ORDER BY ix) INTO places FROM (
                SELECT (left(st.seat, -1)::int - 1) * nl + strpos(lg->>'letters', right(st.seat, 1)) - 1 AS ix
                    FROM seats st WHERE st.flight_id = f
                UNION ALL
                SELECT (left(c.seat, -1)::int - 1) * nl + strpos(lg->>'letters', right(c.seat, 1)) - 1
                    FROM (SELECT substr(nm, length(f) + 2) AS seat FROM unnest(v_names) nm
                        WHERE left(nm, length(f) + 1) = f || '/') c
            ) x;
            k := coalesce(
                (SELECT min(g - 1) FROM generate_subscripts(places, 1) g WHERE places[g] <> g - 1),
                coalesce(array_length(places, 1), 0));
            IF k >= (lg->>'rows')::int * nl THEN
                RETURN jsonb_build_object('refused', 'sold_out', 'leg', i, 'ended', v_ended);
            END IF;
            s := (k / nl + 1)::text || substr(lg->>'letters', k % nl + 1, 1);
        ELSE
            IF s !~ '^[1-9][0-9]{0,2}[A-Z]$' OR substring(s FROM '^[0-9]+')::int > (lg->>'rows')::int
                OR strpos(lg->>'letters', right(s, 1)) = 0 THEN
                RETURN jsonb_build_object('refused', 'unknown_seat', 'leg', i, 'ended', v_ended);
            END IF;
            IF f || '/' || s = ANY(v_names) THEN
                RETURN jsonb_build_object('refused', 'asked_twice', 'leg', i, 'ended', v_ended);
            END IF;
            SELECT st.ticket_id, h.expires_at INTO r FROM seats st LEFT JOIN holds h ON h.hold_id = st.hold_id
                WHERE st.flight_id = f AND st.seat = s;
            IF FOUND THEN
                RETURN jsonb_build_object('refused', 'seat_taken', 'leg', i, 'sold', r.ticket_id IS NOT NULL,
                    'held_until', r.expires_at, 'ended', v_ended);
            END IF;
        END IF;
        v_chosen := v_chosen || s;
        v_names := v_names || (f || '/' || s);
    END LOOP;
    IF p_max_per_flight IS NOT NULL THEN
        FOR r IN SELECT l->>'flight' AS flight, COUNT(*) AS more FROM jsonb_array_elements(p_legs) l
            GROUP BY 1 ORDER BY (l->>'flight') COLLATE "C"
        LOOP
            SELECT COUNT(*) INTO v_mine FROM seats st LEFT JOIN holds h ON h.hold_id = st.hold_id
                LEFT JOIN tickets tk ON tk.ticket_id = st.ticket_id
                WHERE st.flight_id = r.flight
                    AND (tk.username = p_username OR h.username = p_username AND h.expires_at > p_t);
            IF v_mine + r.more > p_max_per_flight THEN
                RETURN jsonb_build_object('refused', 'purchase_limit', 'flight', r.flight, 'mine', v_mine,
                    'ended', v_ended);
            END IF;
        END LOOP;
    END IF;
    RETURN jsonb_build_object('seats', to_jsonb(v_chosen), 'names', to_jsonb(v_names), 'ended', v_ended);
END $$;
CREATE FUNCTION vendepass_active_hold(p_hold_id TEXT, p_username TEXT, p_t DOUBLE PRECISION)
RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    v_session TEXT;
    r RECORD;
BEGIN
    SELECT username, state, expires_at INTO r FROM holds WHERE hold_id = p_hold_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('refused', 'hold_not_found', 'ended', '[]'::jsonb);
    END IF;
    IF r.username <> p_username OR r.state IN ('released', 'bought') THEN
        RETURN jsonb_build_object('refused', 'hold_not_found', 'ended', '[]'::jsonb);
    END IF;
    IF r.state = 'expired' OR r.expires_at <= p_t THEN
        v_session := vendepass_end_hold(p_hold_id, 'expired', p_t);
        RETURN jsonb_build_object('refused', 'hold_expired', 'ended', CASE WHEN v_session IS NULL
            THEN '[]'::jsonb ELSE jsonb_build_array(jsonb_build_array(p_hold_id, v_session)) END);
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION vendepass_new_ticket(
    p_username TEXT, p_price BIGINT, p_currency TEXT, p_codes TEXT[], p_t DOUBLE PRECISION
) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    alphabet CONSTANT TEXT := 'ABCDEFGHJKMNPQRSTUVWXYZ23456789';
    v_day BIGINT := floor(p_t / 86400)::bigint % 961;
    v_code TEXT;
BEGIN
    FOR a IN 1 .. array_length(p_codes, 1) LOOP
        v_code := p_codes[a];
        IF length(v_code) = 6 THEN
            v_code := substr(alphabet, (v_day / 31)::int + 1, 1) || substr(alphabet, (v_day % 31)::int + 1, 1) || v_code;
        END IF;
        INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)
            VALUES (v_code, p_username, 'active', p_price, p_currency, p_t) ON CONFLICT (ticket_id) DO NOTHING;
        IF FOUND THEN
            RETURN v_code;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'no free booking code found';
END $$;
CREATE FUNCTION vendepass_ticket(p_ticket_id TEXT) RETURNS JSONB LANGUAGE sql AS $$
    SELECT jsonb_build_object('ticket_id', tk.ticket_id, 'username', tk.username, 'status', tk.status,
        'price', tk.price_cents, 'currency', tk.currency, 'bought_at', tk.bought_at,
        'cancelled_at', tk.cancelled_at, 'legs', (
            SELECT jsonb_agg(jsonb_build_array(l.flight_id, l.number, l.origin, l.destination, l.departure,
                l.arrival, l.seat, l.price_cents) ORDER BY l.leg)
            FROM ticket_legs l WHERE l.ticket_id = tk.ticket_id))
    FROM tickets tk WHERE tk.ticket_id = p_ticket_id
$$;
CREATE FUNCTION vendepass_hold(
    p_username TEXT, p_session_id TEXT, p_request_id TEXT, p_request_key INTEGER, p_now DOUBLE PRECISION,
    p_alive BOOLEAN, p_flight_keys INTEGER[], p_legs JSONB, p_seconds DOUBLE PRECISION, p_max_held INTEGER,
    p_max_per_flight INTEGER, p_random TEXT
) RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION := coalesce(p_now, extract(epoch FROM now())::float8);
    v_done JSONB;
    v_held BIGINT;
    v_claim JSONB;
    v_hold TEXT;
BEGIN
    v_done := vendepass_replay(p_username, p_request_id, p_request_key, 'hold');
    IF v_done ? 'refused' THEN
        RETURN v_done;
    END IF;
    IF v_done IS NOT NULL THEN
        RETURN jsonb_build_object('replay', (
            SELECT jsonb_build_object('hold_id', h.hold_id, 'username', h.username, 'expires_at', h.expires_at,
                'price', h.price_cents, 'legs', (
                    SELECT jsonb_agg(jsonb_build_array(l.flight_id, l.seat) ORDER BY l.leg)
                    FROM hold_legs l WHERE l.hold_id = h.hold_id))
            FROM holds h WHERE h.hold_id = v_done->>'outcome'), 'ended', '[]'::jsonb);
    END IF;
    IF NOT p_alive THEN
        RETURN jsonb_build_object('refused', 'session_closed', 'ended', '[]'::jsonb);
    END IF;
    PERFORM 1 FROM users WHERE username = p_username FOR NO KEY UPDATE;
    SELECT COUNT(*) INTO v_held FROM holds h JOIN hold_legs l ON l.hold_id = h.hold_id
        WHERE h.username = p_username AND h.state = 'active' AND h.expires_at > t;
    IF v_held + jsonb_array_length(p_legs) > p_max_held THEN
        RETURN jsonb_build_object('refused', 'too_many_holds', 'held', v_held, 'ended', '[]'::jsonb);
    END IF;
    v_claim := vendepass_claim(p_username, p_flight_keys, p_legs, p_max_per_flight, t);
    IF v_claim ? 'refused' THEN
        RETURN v_claim;
    END IF;
    v_hold := 'H' || lpad(to_hex(floor(t / 60)::bigint % 16777216), 6, '0') || p_random;
    INSERT INTO holds (hold_id, username, session_id, created_at, expires_at, price_cents, state)
        SELECT v_hold, p_username, p_session_id, t, t + p_seconds, sum((l->>'fare')::bigint), 'active'
        FROM jsonb_array_elements(p_legs) l;
    INSERT INTO seats (flight_id, seat, hold_id, ticket_id)
        SELECT l->>'flight', v_claim->'seats'->>(o - 1)::int, v_hold, NULL
        FROM jsonb_array_elements(p_legs) WITH ORDINALITY AS e(l, o) ORDER BY o;
    INSERT INTO hold_legs (hold_id, leg, flight_id, seat, flight)
        SELECT v_hold, o - 1, l->>'flight', v_claim->'seats'->>(o - 1)::int, l - 'seat'
        FROM jsonb_array_elements(p_legs) WITH ORDINALITY AS e(l, o);
    INSERT INTO audit (at, username, action, hold_id, ticket_id, seats)
        VALUES (t, p_username, 'hold', v_hold, NULL, (v_claim->'names')::text);
    IF p_request_id IS NOT NULL THEN
        INSERT INTO requests (username, request_id, kind, outcome, created_at)
            VALUES (p_username, p_request_id, 'hold', v_hold, t);
    END IF;
    RETURN jsonb_build_object('hold', v_hold, 'seats', v_claim->'seats', 'expires_at', t + p_seconds,
        'ended', v_claim->'ended');
END $$;
CREATE FUNCTION vendepass_buy_hold(
    p_username TEXT, p_hold_id TEXT, p_request_id TEXT, p_request_key INTEGER, p_now DOUBLE PRECISION,
    p_flights JSONB, p_currency TEXT, p_codes TEXT[]
) RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION := coalesce(p_now, extract(epoch FROM now())::float8);
    v_done JSONB;
    v_legs JSONB := '[]';
    v_code TEXT;
    v_changed BIGINT;
    r RECORD;
BEGIN
    v_done := vendepass_replay(p_username, p_request_id, p_request_key, 'buy');
    IF v_done ? 'refused' THEN
        RETURN v_done;
    END IF;
    IF v_done IS NOT NULL THEN
        RETURN jsonb_build_object('replay', vendepass_ticket(v_done->>'outcome'), 'ended', '[]'::jsonb);
    END IF;
    v_done := vendepass_active_hold(p_hold_id, p_username, t);
    IF v_done IS NOT NULL THEN
        RETURN v_done;
    END IF;
    FOR r IN SELECT l.flight_id, l.seat, coalesce(l.flight, p_flights->l.flight_id) AS described
        FROM hold_legs l WHERE l.hold_id = p_hold_id ORDER BY l.leg
    LOOP
        IF r.described IS NULL THEN
            RETURN jsonb_build_object('describe', (SELECT jsonb_agg(DISTINCT flight_id) FROM hold_legs
                WHERE hold_id = p_hold_id), 'ended', '[]'::jsonb);
        END IF;
        IF (r.described->>'departs')::float8 <= t THEN
            RETURN jsonb_build_object('refused', 'flight_departed', 'flight', r.flight_id, 'ended', '[]'::jsonb);
        END IF;
        v_legs := v_legs || jsonb_build_array(r.described || jsonb_build_object('flight', r.flight_id, 'seat', r.seat));
    END LOOP;
    v_code := vendepass_new_ticket(p_username,
        (SELECT sum((l->>'fare')::bigint) FROM jsonb_array_elements(v_legs) l)::bigint, p_currency, p_codes, t);
    -- The conditional update: only seats still claimed by this hold.
    UPDATE seats SET hold_id = NULL, ticket_id = v_code WHERE hold_id = p_hold_id;
    GET DIAGNOSTICS v_changed = ROW_COUNT;
    IF v_changed <> jsonb_array_length(v_legs) THEN
        RAISE EXCEPTION 'hold % covers % seats, expected %', p_hold_id, v_changed, jsonb_array_length(v_legs);
    END IF;
    UPDATE holds SET state = 'bought', ended_at = t WHERE hold_id = p_hold_id AND state = 'active';
    INSERT INTO audit (at, username, action, hold_id, ticket_id, seats)
        SELECT t, p_username, 'buy', p_hold_id, v_code,
            to_jsonb(array_agg((l->>'flight') || '/' || (l->>'seat') ORDER BY o))::text
        FROM jsonb_array_elements(v_legs) WITH ORDINALITY AS e(l, o);
    IF p_request_id IS NOT NULL THEN
        INSERT INTO requests (username, request_id, kind, outcome, created_at)
            VALUES (p_username, p_request_id, 'buy', v_code, t);
    END IF;
    INSERT INTO ticket_legs (ticket_id, leg, flight_id, number, origin, destination, departure, arrival, seat, price_cents)
        SELECT v_code, o - 1, l->>'flight', l->>'number', l->>'origin', l->>'destination', l->>'departure',
            l->>'arrival', l->>'seat', (l->>'fare')::bigint
        FROM jsonb_array_elements(v_legs) WITH ORDINALITY AS e(l, o);
    RETURN jsonb_build_object('ticket', v_code, 'legs', (SELECT jsonb_agg(jsonb_build_array(l->>'flight', l->>'seat'))
        FROM jsonb_array_elements(v_legs) l), 'now', t, 'ended', '[]'::jsonb);
END $$;
CREATE FUNCTION vendepass_release(
    p_username TEXT, p_hold_id TEXT, p_request_id TEXT, p_request_key INTEGER, p_now DOUBLE PRECISION
) RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION := coalesce(p_now, extract(epoch FROM now())::float8);
    v_done JSONB;
BEGIN
    v_done := vendepass_replay(p_username, p_request_id, p_request_key, 'release');
    IF v_done ? 'refused' THEN
        RETURN v_done;
    END IF;
    IF v_done IS NOT NULL THEN
        RETURN jsonb_build_object('released', p_hold_id, 'ended', '[]'::jsonb);
    END IF;
    v_done := vendepass_active_hold(p_hold_id, p_username, t);
    IF v_done IS NOT NULL THEN
        RETURN v_done;
    END IF;
    PERFORM vendepass_end_hold(p_hold_id, 'released', t);
    IF p_request_id IS NOT NULL THEN
        INSERT INTO requests (username, request_id, kind, outcome, created_at)
            VALUES (p_username, p_request_id, 'release', p_hold_id, t);
    END IF;
    RETURN jsonb_build_object('released', p_hold_id, 'ended', '[]'::jsonb);
END $$;
CREATE FUNCTION vendepass_cancel(
    p_username TEXT, p_ticket_id TEXT, p_request_id TEXT, p_request_key INTEGER, p_now DOUBLE PRECISION
) RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION := coalesce(p_now, extract(epoch FROM now())::float8);
    v_done JSONB;
    v_status TEXT;
BEGIN
    v_done := vendepass_replay(p_username, p_request_id, p_request_key, 'cancel');
    IF v_done ? 'refused' THEN
        RETURN v_done;
    END IF;
    IF v_done IS NOT NULL THEN
        RETURN jsonb_build_object('ticket', vendepass_ticket(v_done->>'outcome'), 'ended', '[]'::jsonb);
    END IF;
    SELECT tk.status INTO v_status FROM tickets tk JOIN ticket_legs l ON l.ticket_id = tk.ticket_id
        WHERE tk.ticket_id = p_ticket_id AND tk.username = p_username ORDER BY l.leg LIMIT 1 FOR UPDATE OF tk;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('refused', 'ticket_not_found', 'ended', '[]'::jsonb);
    END IF;
    IF v_status = 'cancelled' THEN
        RETURN jsonb_build_object('refused', 'already_cancelled', 'ended', '[]'::jsonb);
    END IF;
    IF (SELECT min(extract(epoch FROM departure::timestamptz)) FROM ticket_legs WHERE ticket_id = p_ticket_id) <= t THEN
        RETURN jsonb_build_object('refused', 'ticket_departed', 'ended', '[]'::jsonb);
    END IF;
    UPDATE tickets SET status = 'cancelled', cancelled_at = t
        WHERE ticket_id = p_ticket_id AND username = p_username AND status = 'active';
    DELETE FROM seats WHERE ticket_id = p_ticket_id;
    INSERT INTO audit (at, username, action, hold_id, ticket_id, seats)
        SELECT t, p_username, 'cancel', NULL, p_ticket_id, to_jsonb(array_agg(flight_id || '/' || seat ORDER BY leg))::text
        FROM ticket_legs WHERE ticket_id = p_ticket_id;
    IF p_request_id IS NOT NULL THEN
        INSERT INTO requests (username, request_id, kind, outcome, created_at)
            VALUES (p_username, p_request_id, 'cancel', p_ticket_id, t);
    END IF;
    RETURN jsonb_build_object('ticket', vendepass_ticket(p_ticket_id), 'ended', '[]'::jsonb);
END $$;
"""

# MIGRATIONS[n] takes a database from schema version n to n + 1. Append to
# it; never edit a migration that has shipped.
# Version 5: group commit of one-step purchases (see L{PostgresStore._next_batch}):
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

# Version 6: the holds' other ends as one function each too, called in one
# round trip, each doing what its L{SeatRules} method does, statement for
# statement, with the same locks in the same order, and ending each hold
# with migration 4's C{vendepass_end_hold}: C{vendepass_release_session}
# (the active holds of a closed connection, in hold id order, each locked
# by its conditional update), C{vendepass_expire_hold} (the hold locked,
# then ended if its time is up) and C{vendepass_expired_holds} (the sweep:
# up to C{p_limit} holds whose time is up, locked C{FOR UPDATE SKIP
# LOCKED} in hold id order, passing over those another transaction holds;
# then the requests and ended holds older than C{p_retention} forgotten).
_SCHEMA_6 = """
CREATE FUNCTION vendepass_release_session(p_session_id TEXT, p_now DOUBLE PRECISION)
RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION := coalesce(p_now, extract(epoch FROM now())::float8);
    v_released JSONB := '[]';
    r RECORD;
BEGIN
    FOR r IN SELECT hold_id FROM holds WHERE session_id = p_session_id AND state = 'active' ORDER BY hold_id LOOP
        IF vendepass_end_hold(r.hold_id, 'released', t) IS NOT NULL THEN
            v_released := v_released || to_jsonb(r.hold_id);
        END IF;
    END LOOP;
    RETURN jsonb_build_object('released', v_released, 'ended', '[]'::jsonb);
END $$;
CREATE FUNCTION vendepass_expire_hold(p_hold_id TEXT, p_now DOUBLE PRECISION)
RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION := coalesce(p_now, extract(epoch FROM now())::float8);
    r RECORD;
BEGIN
    SELECT state, expires_at INTO r FROM holds WHERE hold_id = p_hold_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('state', NULL, 'ended', '[]'::jsonb);
    END IF;
    IF r.state = 'active' AND r.expires_at <= t THEN
        -- Locked and active: its end ends it.
        RETURN jsonb_build_object('state', 'expired',
            'ended', jsonb_build_array(jsonb_build_array(p_hold_id, vendepass_end_hold(p_hold_id, 'expired', t))));
    END IF;
    RETURN jsonb_build_object('state', r.state, 'ended', '[]'::jsonb);
END $$;
CREATE FUNCTION vendepass_expired_holds(p_limit INTEGER, p_retention DOUBLE PRECISION, p_now DOUBLE PRECISION)
RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION := coalesce(p_now, extract(epoch FROM now())::float8);
    v_ended JSONB;
    e JSONB;
BEGIN
    SELECT coalesce(jsonb_agg(jsonb_build_array(x.hold_id, x.session_id) ORDER BY x.hold_id), '[]'::jsonb) INTO v_ended
        FROM (SELECT hold_id, session_id FROM holds WHERE state = 'active' AND expires_at <= t
            ORDER BY hold_id LIMIT p_limit FOR UPDATE SKIP LOCKED) x;
    FOR e IN SELECT y FROM jsonb_array_elements(v_ended) y LOOP
        PERFORM vendepass_end_hold(e->>0, 'expired', t);
    END LOOP;
    DELETE FROM requests WHERE created_at < t - p_retention;
    DELETE FROM holds WHERE state <> 'active' AND ended_at < t - p_retention;
    RETURN jsonb_build_object('ended', v_ended);
END $$;
"""

# Version 7: the batch of one-step purchases decides each purchase first
# and writes the batch's rows after, one statement per table for the whole
# batch (before: some ten statements per purchase, each paying for its own
# plan and executor). The locks and their order are those of version 5:
# every request advisory lock sorted by key, then every flight advisory
# lock sorted by key, all before anything is read. Then, for each purchase
# in order, what L{SeatRules.buy} decides, in its order: the request's
# replay (one of an earlier purchase of the batch too), the departures, the
# end of its flights' expired holds (written at once, with their audit rows
# and NOTIFYs: migration 4's C{vendepass_end_expired_on}), each seat looked at or picked, the
# seats-per-flight limit; the seats of the batch's earlier purchases count
# as taken, and as the customer's. A refusal is that purchase's answer
# only; a purchase that is not refused gets a booking code (its first
# candidate that no purchase of the batch has). Then the writes, in the
# order of a single purchase's and in purchase order within each: the
# tickets (a code found taken by a ticket already in the database moves to
# its purchase's next candidate, alone), the seats, the audit rows, the
# requests, the ticket legs. C{vendepass_buy} is now a batch of one: the
# rules of a one-step purchase are written once.
#
# The first free seat of a flight, in seat map order, without reading its
# taken seats: C{seat_picks} keeps, per flight, a next place, written only
# under the flight's advisory lock (by this function), such that every
# place before it is taken or in C{seats_freed}; C{seats_freed} gets every
# seat deleted from C{seats}, by any path (a statement trigger: releases,
# expiries and cancellations take no flight lock, and only insert there,
# so no lock is added to their order). The pick is the first place of a
# freed seat before the next place that is free now, else the first free
# place from the next place on (holds and chosen seats may have taken some:
# each is looked up); the next place moves past a seat picked there. A
# flight never picked on starts at place 0. The batch forgets the freed
# seats it sells; one a hold took again stays (at most one row a seat),
# passed over while it is taken.
_SCHEMA_7 = """
CREATE TABLE seat_picks (
    flight_id TEXT PRIMARY KEY,
    next_place INTEGER NOT NULL
);
CREATE TABLE seats_freed (
    flight_id TEXT NOT NULL,
    seat TEXT NOT NULL,
    PRIMARY KEY (flight_id, seat)
);
CREATE FUNCTION vendepass_seats_freed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seats_freed (flight_id, seat) SELECT flight_id, seat FROM gone ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER seats_freed AFTER DELETE ON seats REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION vendepass_seats_freed();
CREATE OR REPLACE FUNCTION vendepass_buy_batch(p_buys JSONB) RETURNS JSONB LANGUAGE plpgsql AS $$
DECLARE
    alphabet CONSTANT TEXT := 'ABCDEFGHJKMNPQRSTUVWXYZ23456789';
    answers JSONB[] := '{}';
    -- The purchases to be sold (w_), their seats (s_) and their requests (r_).
    w_buy INTEGER[] := '{}';
    w_user TEXT[] := '{}';
    w_request TEXT[] := '{}';
    w_code TEXT[] := '{}';
    w_try INTEGER[] := '{}';
    w_price BIGINT[] := '{}';
    w_currency TEXT[] := '{}';
    w_t DOUBLE PRECISION[] := '{}';
    w_names TEXT[] := '{}';
    w_chosen JSONB[] := '{}';
    w_ended JSONB[] := '{}';
    s_w INTEGER[] := '{}';
    s_leg INTEGER[] := '{}';
    s_flight TEXT[] := '{}';
    s_seat TEXT[] := '{}';
    s_user TEXT[] := '{}';
    s_name TEXT[] := '{}';
    r_request TEXT[] := '{}';
    r_w INTEGER[] := '{}';
    -- The next place of each flight the batch picked on (n_), and this
    -- purchase's (my_), kept if it is sold.
    n_flight TEXT[] := '{}';
    n_next INTEGER[] := '{}';
    my_flight TEXT[];
    my_next INTEGER[];
    v_next INTEGER;
    v_at INTEGER;
    b JSONB;
    legs JSONB;
    lg JSONB;
    u TEXT;
    rid TEXT;
    t DOUBLE PRECISION;
    v_count INTEGER;
    ended JSONB;
    flights TEXT[];
    chosen TEXT[];
    names TEXT[];
    v_flight TEXT;
    v_seat TEXT;
    k INTEGER;
    nl INTEGER;
    r RECORD;
    mine BIGINT;
    price BIGINT;
    day BIGINT;
    code TEXT;
    got TEXT[];
    w INTEGER;
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
    <<buys>>
    FOR b IN SELECT x FROM jsonb_array_elements(p_buys) x LOOP
        u := b->>0;
        rid := b->>1;
        t := coalesce((b->>3)::float8, extract(epoch FROM now())::float8);
        legs := b->5;
        v_count := jsonb_array_length(legs);
        ended := '[]';
        chosen := '{}';
        names := '{}';
        flights := '{}';
        my_flight := '{}';
        my_next := '{}';
        price := 0;
        IF rid IS NOT NULL THEN
            w := r_w[array_position(r_request, jsonb_build_array(u, rid)::text)];
            IF w IS NOT NULL THEN
                -- The same request as an earlier purchase of the batch: its replay.
                answers := answers || jsonb_build_object('replay_of', w, 'now', t, 'ended', ended);
                CONTINUE buys;
            END IF;
            SELECT kind, outcome INTO r FROM requests WHERE username = u AND request_id = rid;
            IF FOUND THEN
                IF r.kind <> 'buy' THEN
                    answers := answers || jsonb_build_object('refused', 'request_kind', 'kind', r.kind, 'ended', ended);
                ELSE
                    answers := answers || jsonb_build_object('replay', r.outcome, 'now', t, 'ended', ended);
                END IF;
                CONTINUE buys;
            END IF;
        END IF;
        FOR i IN 0 .. v_count - 1 LOOP
            IF (legs->i->>'departs')::float8 <= t THEN
                answers := answers || jsonb_build_object('refused', 'flight_departed', 'leg', i, 'ended', ended);
                CONTINUE buys;
            END IF;
            flights := flights || (legs->i->>'flight');
        END LOOP;
        ended := vendepass_end_expired_on(flights, t);
        FOR i IN 0 .. v_count - 1 LOOP
            lg := legs->i;
            v_flight := lg->>'flight';
            v_seat := lg->>'seat';
            IF v_seat IS NULL THEN
                -- The first free seat in seat map order (see above): one freed
                -- below the flight's next place and still free, else the
                -- first free from the next place on.
                nl := length(lg->>'letters');
                v_at := array_position(n_flight, v_flight);
                IF v_at IS NOT NULL THEN
                    v_next := n_next[v_at];
                ELSE
                    v_next := coalesce((SELECT next_place FROM seat_picks WHERE flight_id = v_flight), 0);
                END IF;
                SELECT min(p.place) INTO k FROM (
                    SELECT (left(fr.seat, -1)::int - 1) * nl + strpos(lg->>'letters', right(fr.seat, 1)) - 1 AS place, fr.seat
                        FROM seats_freed fr WHERE fr.flight_id = v_flight) p
                    WHERE p.place < v_next AND v_flight || '/' || p.seat <> ALL(s_name || names)
                        AND NOT EXISTS (SELECT 1 FROM seats st WHERE st.flight_id = v_flight AND st.seat = p.seat);
                IF k IS NULL THEN
                    k := v_next;
                    LOOP
                        EXIT WHEN k >= (lg->>'rows')::int * nl;
                        v_seat := (k / nl + 1)::text || substr(lg->>'letters', k % nl + 1, 1);
                        EXIT WHEN v_flight || '/' || v_seat <> ALL(s_name || names)
                            AND NOT EXISTS (SELECT 1 FROM seats st WHERE st.flight_id = v_flight AND st.seat = v_seat);
                        k := k + 1;
                    END LOOP;
                    my_flight := my_flight || v_flight;
                    my_next := my_next || (k + 1);
                END IF;
                IF k >= (lg->>'rows')::int * nl THEN
                    answers := answers || jsonb_build_object('refused', 'sold_out', 'leg', i, 'ended', ended);
                    CONTINUE buys;
                END IF;
                v_seat := (k / nl + 1)::text || substr(lg->>'letters', k % nl + 1, 1);
            ELSE
                IF v_seat !~ '^[1-9][0-9]{0,2}[A-Z]$' OR substring(v_seat FROM '^[0-9]+')::int > (lg->>'rows')::int
                    OR strpos(lg->>'letters', right(v_seat, 1)) = 0 THEN
                    answers := answers || jsonb_build_object('refused', 'unknown_seat', 'leg', i, 'ended', ended);
                    CONTINUE buys;
                END IF;
                IF v_flight || '/' || v_seat = ANY(names) THEN
                    answers := answers || jsonb_build_object('refused', 'asked_twice', 'leg', i, 'ended', ended);
                    CONTINUE buys;
                END IF;
                IF v_flight || '/' || v_seat = ANY(s_name) THEN
                    -- Sold by an earlier purchase of the batch.
                    answers := answers || jsonb_build_object('refused', 'seat_taken', 'leg', i, 'sold', true,
                        'held_until', NULL, 'ended', ended);
                    CONTINUE buys;
                END IF;
                SELECT st.ticket_id, h.expires_at INTO r FROM seats st LEFT JOIN holds h ON h.hold_id = st.hold_id
                    WHERE st.flight_id = v_flight AND st.seat = v_seat;
                IF FOUND THEN
                    answers := answers || jsonb_build_object('refused', 'seat_taken', 'leg', i, 'sold', r.ticket_id IS NOT NULL,
                        'held_until', r.expires_at, 'ended', ended);
                    CONTINUE buys;
                END IF;
            END IF;
            chosen := chosen || v_seat;
            price := price + (lg->>'fare')::bigint;
            names := names || (v_flight || '/' || v_seat);
        END LOOP;
        IF b->>6 IS NOT NULL THEN
            FOR r IN SELECT l->>'flight' AS flight, COUNT(*) AS more FROM jsonb_array_elements(legs) l
                GROUP BY 1 ORDER BY (l->>'flight') COLLATE "C"
            LOOP
                SELECT COUNT(*) INTO mine FROM seats st LEFT JOIN holds h ON h.hold_id = st.hold_id
                    LEFT JOIN tickets tk ON tk.ticket_id = st.ticket_id
                    WHERE st.flight_id = r.flight AND (tk.username = u OR h.username = u AND h.expires_at > t);
                mine := mine + (SELECT COUNT(*) FROM unnest(s_user, s_flight) x(su, sf) WHERE su = u AND sf = r.flight);
                IF mine + r.more > (b->>6)::int THEN
                    answers := answers || jsonb_build_object('refused', 'purchase_limit', 'flight', r.flight, 'mine', mine,
                        'ended', ended);
                    CONTINUE buys;
                END IF;
            END LOOP;
        END IF;
        -- Sold: its first booking code that no purchase of the batch has.
        day := floor(t / 86400)::bigint % 961;
        code := NULL;
        FOR a IN 0 .. coalesce(jsonb_array_length(b->8), 0) - 1 LOOP
            code := b->8->>a;
            IF length(code) = 6 THEN
                code := substr(alphabet, (day / 31)::int + 1, 1) || substr(alphabet, (day % 31)::int + 1, 1) || code;
            END IF;
            k := a;
            EXIT WHEN code <> ALL(w_code);
            code := NULL;
        END LOOP;
        IF code IS NULL THEN
            RAISE EXCEPTION 'no free booking code found';
        END IF;
        w := coalesce(array_length(w_buy, 1), 0) + 1;
        w_buy := w_buy || coalesce(array_length(answers, 1), 0) + 1;
        w_user := w_user || u;
        w_request := w_request || rid;
        w_code := w_code || code;
        w_try := w_try || k;
        w_price := w_price || price;
        w_currency := w_currency || (b->>7);
        w_t := w_t || t;
        w_names := w_names || to_jsonb(names)::text;
        w_chosen := w_chosen || to_jsonb(chosen);
        w_ended := w_ended || ended;
        FOR i IN 0 .. v_count - 1 LOOP
            s_w := s_w || w;
            s_leg := s_leg || i;
            s_flight := s_flight || (legs->i->>'flight');
            s_seat := s_seat || chosen[i + 1];
            s_user := s_user || u;
        END LOOP;
        s_name := s_name || names;
        FOR a IN 1 .. coalesce(array_length(my_flight, 1), 0) LOOP
            v_at := array_position(n_flight, my_flight[a]);
            IF v_at IS NULL THEN
                n_flight := n_flight || my_flight[a];
                n_next := n_next || my_next[a];
            ELSE
                n_next[v_at] := greatest(n_next[v_at], my_next[a]);
            END IF;
        END LOOP;
        IF rid IS NOT NULL THEN
            r_request := r_request || jsonb_build_array(u, rid)::text;
            r_w := r_w || w;
        END IF;
        answers := answers || NULL::jsonb;
    END LOOP;
    IF w_buy = '{}' THEN
        RETURN to_jsonb(answers);
    END IF;
    WITH sold AS (
        INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)
            SELECT c, su, 'active', pr, cu, st FROM unnest(w_code, w_user, w_price, w_currency, w_t) WITH ORDINALITY
                AS x(c, su, pr, cu, st, o) ORDER BY o
            ON CONFLICT (ticket_id) DO NOTHING RETURNING ticket_id)
    SELECT array_agg(ticket_id) INTO got FROM sold;
    IF coalesce(array_length(got, 1), 0) < array_length(w_buy, 1) THEN
        -- A code taken by a ticket already sold: that purchase's next candidates, alone.
        FOR v IN 1 .. array_length(w_buy, 1) LOOP
            CONTINUE WHEN w_code[v] = ANY(got);
            b := p_buys->(w_buy[v] - 1);
            day := floor(w_t[v] / 86400)::bigint % 961;
            code := NULL;
            FOR a IN w_try[v] + 1 .. coalesce(jsonb_array_length(b->8), 0) - 1 LOOP
                code := b->8->>a;
                IF length(code) = 6 THEN
                    code := substr(alphabet, (day / 31)::int + 1, 1) || substr(alphabet, (day % 31)::int + 1, 1) || code;
                END IF;
                IF code <> ALL(w_code) THEN
                    INSERT INTO tickets (ticket_id, username, status, price_cents, currency, bought_at)
                        VALUES (code, w_user[v], 'active', w_price[v], w_currency[v], w_t[v]) ON CONFLICT (ticket_id) DO NOTHING;
                    EXIT WHEN FOUND;
                END IF;
                code := NULL;
            END LOOP;
            IF code IS NULL THEN
                RAISE EXCEPTION 'no free booking code found';
            END IF;
            w_code[v] := code;
        END LOOP;
    END IF;
    INSERT INTO seats (flight_id, seat, hold_id, ticket_id)
        SELECT sf, ss, NULL, w_code[sw] FROM unnest(s_flight, s_seat, s_w) AS x(sf, ss, sw);
    INSERT INTO audit (at, username, action, hold_id, ticket_id, seats)
        SELECT st, su, 'buy', NULL, c, nm FROM unnest(w_t, w_user, w_code, w_names) WITH ORDINALITY
            AS x(st, su, c, nm, o) ORDER BY o;
    INSERT INTO requests (username, request_id, kind, outcome, created_at)
        SELECT su, sr, 'buy', c, st FROM unnest(w_user, w_request, w_code, w_t) AS x(su, sr, c, st) WHERE sr IS NOT NULL;
    INSERT INTO ticket_legs (ticket_id, leg, flight_id, number, origin, destination, departure, arrival, seat, price_cents)
        SELECT w_code[sw], sl, l->>'flight', l->>'number', l->>'origin', l->>'destination', l->>'departure', l->>'arrival',
            ss, (l->>'fare')::bigint
        FROM unnest(s_w, s_leg, s_seat) AS x(sw, sl, ss), LATERAL (SELECT p_buys->(w_buy[sw] - 1)->5->sl AS l) y;
    IF n_flight <> '{}' THEN
        INSERT INTO seat_picks (flight_id, next_place) SELECT * FROM unnest(n_flight, n_next)
            ON CONFLICT (flight_id) DO UPDATE SET next_place = greatest(seat_picks.next_place, excluded.next_place);
    END IF;
    -- Only the seats it sold: a seat it saw taken may be freed meanwhile by
    -- a transaction that its statement does not see.
    DELETE FROM seats_freed fr USING unnest(s_flight, s_seat) AS x(sf, ss) WHERE fr.flight_id = x.sf AND fr.seat = x.ss;
    FOR v IN 1 .. array_length(w_buy, 1) LOOP
        answers[w_buy[v]] := jsonb_build_object('ticket', w_code[v], 'seats', w_chosen[v], 'now', w_t[v], 'ended', w_ended[v]);
    END LOOP;
    FOR v IN 1 .. coalesce(array_length(answers, 1), 0) LOOP
        IF answers[v] ? 'replay_of' THEN
            answers[v] := jsonb_build_object('replay', w_code[(answers[v]->>'replay_of')::int], 'now', answers[v]->'now',
                'ended', answers[v]->'ended');
        END IF;
    END LOOP;
    RETURN to_jsonb(answers);
END $$;
CREATE OR REPLACE FUNCTION vendepass_buy(
    p_username TEXT, p_request_id TEXT, p_request_key INTEGER, p_now DOUBLE PRECISION,
    p_flight_keys INTEGER[], p_legs JSONB, p_max_per_flight INTEGER, p_currency TEXT, p_codes TEXT[]
) RETURNS JSONB LANGUAGE sql AS $$
SELECT vendepass_buy_batch(jsonb_build_array(jsonb_build_array(p_username, p_request_id, p_request_key, p_now,
    to_jsonb(p_flight_keys), p_legs, p_max_per_flight, p_currency, to_jsonb(p_codes))))->0
$$;
"""

MIGRATIONS: list[str] = [_SCHEMA_1, _SCHEMA_2, _SCHEMA_3, _SCHEMA_4, _SCHEMA_BUY_BATCH, _SCHEMA_6, _SCHEMA_7]
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


# A flight's key, remembered: the flights of the sales window are few, and
# each purchase and hold asks for its flights' keys.
_flight_key = functools.lru_cache(maxsize=1 << 16)(_lock_key)


def _flight_keys(flight_ids: list[str]) -> list[int]:
    """
    The advisory lock keys of flights, in the one order every server takes them.
    """
    return sorted({_flight_key(f) for f in flight_ids})


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
    legs_by_time = False
    legs_of_ticket = "l.ticket_id = t.ticket_id"

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


# The one statement of each change of seat state: a one-step purchase
# (migration 3), the others (migration 4).
BUY_CALL = "SELECT vendepass_buy(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
HOLD_CALL = "SELECT vendepass_hold(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
BUY_HOLD_CALL = "SELECT vendepass_buy_hold(%s, %s, %s, %s, %s, %s, %s, %s)"
RELEASE_CALL = "SELECT vendepass_release(%s, %s, %s, %s, %s)"
CANCEL_CALL = "SELECT vendepass_cancel(%s, %s, %s, %s, %s)"
# And of each end of holds but by a customer's release (migration 6).
RELEASE_SESSION_CALL = "SELECT vendepass_release_session(%s, %s)"
EXPIRE_HOLD_CALL = "SELECT vendepass_expire_hold(%s, %s)"
EXPIRED_HOLDS_CALL = "SELECT vendepass_expired_holds(%s, %s, %s)"
CALLS = (
    BUY_CALL, HOLD_CALL, BUY_HOLD_CALL, RELEASE_CALL, CANCEL_CALL,
    RELEASE_SESSION_CALL, EXPIRE_HOLD_CALL, EXPIRED_HOLDS_CALL,
)

# A statement and its arguments.
Call = tuple[str, tuple[Any, ...]]


def _described(flight: Flight) -> dict[str, Any]:
    """
    What the functions need to know of a flight (they cannot read the
    timetable as L{Flight} has it): the JSON of a purchase's or a hold's leg
    without its seat.
    """
    return {
        "flight": flight.flight_id,
        "departs": flight.departs_ts,
        "rows": flight.aircraft.rows,
        "letters": flight.aircraft.letters,
        "number": flight.number,
        "origin": flight.origin,
        "destination": flight.destination,
        "departure": flight.departure_iso,
        "arrival": flight.arrival_iso,
        "fare": flight.fare.cents,
    }


def _request(username: str, request_id: str | None) -> tuple[str | None, int | None]:
    """
    A request's C{request_id} and the key of its advisory lock, as the
    functions take them.
    """
    return request_id, None if request_id is None else _request_key(username, request_id)


# The one statement of a batch of them (migration 5).
BUY_BATCH_CALL = "SELECT vendepass_buy_batch(%s)"


class PostgresRules(SeatRules):
    """
    The seat rules, with every change of seat state done by one function of
    the database in one round trip: C{vendepass_buy} (migration 3),
    C{vendepass_hold}, C{vendepass_buy_hold}, C{vendepass_release} and
    C{vendepass_cancel} (migration 4). The C{..._call} methods are their
    arguments; the others say what their answers mean. Each function does
    what its L{SeatRules} method does (the SQLite store runs those), and
    returns the same refusals, raised here by L{refuse} with the same
    helpers.
    """

    def buy_call(
        self, username: str, legs: list[LegRequest], request_id: str | None, now: float | None
    ) -> tuple[Any, ...]:
        """
        The arguments of C{vendepass_buy} for this purchase (C{now}: the
        injected clock's time, or C{None} for the database's).
        """
        # As SeatRules.new_ticket: 8 codes that begin with the day (the
        # database's: it adds those two letters), then 8 wholly random.
        return (
            username,
            *_request(username, request_id),
            now,
            _flight_keys([leg.flight.flight_id for leg in legs]),
            Jsonb([{**_described(leg.flight), "seat": leg.seat} for leg in legs]),
            self.max_seats_per_flight,
            self.currency,
            _codes(),
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
        self.refuse(answer, legs=legs, request_id=request_id)

    def hold_call(
        self,
        username: str,
        session_id: str,
        legs: list[LegRequest],
        seconds: float,
        alive: bool,
        request_id: str | None,
        now: float | None,
    ) -> tuple[Any, ...]:
        return (
            username,
            session_id,
            *_request(username, request_id),
            now,
            alive,
            _flight_keys([leg.flight.flight_id for leg in legs]),
            Jsonb([{**_described(leg.flight), "seat": leg.seat} for leg in legs]),
            seconds,
            self.max_held_seats,
            self.max_seats_per_flight,
            hold_random(),
        )

    def held(self, username: str, legs: list[LegRequest], request_id: str | None, answer: dict[str, Any]) -> Hold:
        """
        The hold C{vendepass_hold} made, or found made by the same request.
        """
        if "hold" in answer:
            return Hold(
                hold_id=answer["hold"],
                username=username,
                legs=tuple(HeldSeat(leg.flight, seat) for leg, seat in zip(legs, answer["seats"])),
                expires_at=answer["expires_at"],
                price=Money(sum(leg.flight.fare.cents for leg in legs), self.currency),
            )
        if "replay" in answer:
            done = answer["replay"]
            return Hold(
                done["hold_id"],
                done["username"],
                tuple(HeldSeat(flight_by_id(self.network, f), seat) for f, seat in done["legs"]),
                done["expires_at"],
                Money(done["price"], self.currency),
            )
        self.refuse(answer, legs=legs, request_id=request_id)

    def buy_hold_call(
        self, hold_id: str, username: str, request_id: str | None, now: float | None, flights: dict[str, Any]
    ) -> tuple[Any, ...]:
        """
        The arguments of C{vendepass_buy_hold}; C{flights}: the descriptions
        of the hold's flights, when the function asked for them.
        """
        return (username, hold_id, *_request(username, request_id), now, Jsonb(flights), self.currency, _codes())

    def bought_hold(
        self, hold_id: str, username: str, request_id: str | None, answer: dict[str, Any], flights: dict[str, Any]
    ) -> Ticket:
        """
        The ticket C{vendepass_buy_hold} answered with. Asked to describe
        the hold's flights (a hold made without their descriptions), put
        them in C{flights} and raise L{_CallAgain}.
        """
        if "ticket" in answer:
            legs = [(flight_by_id(self.network, f), seat) for f, seat in answer["legs"]]
            return self.new_ticket_value(answer["ticket"], username, new_ticket_legs(legs), answer["now"])
        if "replay" in answer:
            return attrs.evolve(_ticket(answer["replay"]), status="active", cancelled_at=None)
        if "describe" in answer:
            missing = [f for f in answer["describe"] if f not in flights]
            if not missing:
                raise RuntimeError(f"vendepass_buy_hold asked again for {answer['describe']}")
            flights.update((f, _described(flight_by_id(self.network, f))) for f in missing)
            raise _CallAgain()
        self.refuse(answer, hold_id=hold_id, request_id=request_id)

    def released(self, hold_id: str, request_id: str | None, answer: dict[str, Any]) -> None:
        if "released" not in answer:
            self.refuse(answer, hold_id=hold_id, request_id=request_id)

    def cancelled(self, ticket_id: str, request_id: str | None, answer: dict[str, Any]) -> Ticket:
        if "ticket" in answer:
            return _ticket(answer["ticket"])
        self.refuse(answer, ticket_id=ticket_id, request_id=request_id)

    def refuse(
        self,
        answer: dict[str, Any],
        legs: list[LegRequest] = (),  # type: ignore[assignment]
        request_id: str | None = None,
        hold_id: str = "",
        ticket_id: str = "",
    ) -> NoReturn:
        """
        Raise the refusal a function returned: the error its L{SeatRules}
        method raises, made by the same helper. C{legs}, C{hold_id},
        C{ticket_id}: what was asked for, which the answer's details refer to.
        """
        refused = answer["refused"]
        if refused == "request_kind":
            assert request_id is not None
            raise request_reused(request_id, answer["kind"])
        if refused == "session_closed":
            raise SessionClosed()
        if refused == "too_many_holds":
            raise too_many_holds(self.max_held_seats, answer["held"])
        if refused == "purchase_limit":
            assert self.max_seats_per_flight is not None
            raise over_limit(self.max_seats_per_flight, answer["flight"], answer["mine"])
        if refused == "hold_not_found":
            raise hold_not_found(hold_id)
        if refused == "hold_expired":
            raise hold_expired(hold_id)
        if refused == "ticket_not_found":
            raise ticket_not_found(ticket_id)
        if refused == "already_cancelled":
            raise already_cancelled(ticket_id)
        if refused == "ticket_departed":
            raise ticket_departed(ticket_id)
        if refused == "flight_departed":
            leg_flight = legs[answer["leg"]].flight if "leg" in answer else flight_by_id(self.network, answer["flight"])
            raise departed(leg_flight)
        leg = legs[answer["leg"]]
        if refused == "sold_out":
            raise SoldOut(f"Flight {leg.flight.flight_id} is sold out.", flight=leg.flight.flight_id)
        assert leg.seat is not None
        if refused == "unknown_seat":
            check_seat(leg.flight, leg.seat)
        elif refused == "asked_twice":
            raise asked_twice(leg.flight, leg.seat)
        elif refused == "seat_taken":
            raise seat_taken(leg.flight, leg.seat, answer["sold"] or None, answer["held_until"])
        raise RuntimeError(f"a function of the store answered {answer!r}")


def _codes() -> list[str]:
    """
    As L{SeatRules.new_ticket}: 8 booking codes that begin with the day (the
    database's: the function adds those two letters), then 8 wholly random.
    """
    letters = _random_code(6 * 8 + 8 * 8)  # one draw for all 16: each draw costs a call
    return [letters[i : i + 6] for i in range(0, 48, 6)] + [letters[i : i + 8] for i in range(48, 112, 8)]


def _ticket(row: dict[str, Any]) -> Ticket:
    """
    A ticket from C{vendepass_ticket}'s JSON.
    """
    currency = row["currency"]
    legs = tuple(
        TicketLeg(flight_id, number, origin, destination, departure, arrival, seat, Money(cents, currency))
        for flight_id, number, origin, destination, departure, arrival, seat, cents in row["legs"]
    )
    cancelled_at = row["cancelled_at"]
    return Ticket(
        row["ticket_id"],
        row["username"],
        row["status"],
        legs,
        Money(row["price"], currency),
        float(row["bought_at"]),
        None if cancelled_at is None else float(cancelled_at),
    )


class _CallAgain(Exception):
    """
    A function asked for more than it was given (and did nothing): call it
    again, now with it.
    """


def _idle_and_alive(conn: psycopg.Connection[Any]) -> bool:
    """
    Whether an idle connection still looks alive, without a round trip: an
    idle connection has nothing to read, unless its server said goodbye
    (a terminated backend sends its last error and closes). Nothing to read
    does not prove it alive; something to read makes it suspect, and it is
    replaced (an unasked notice is rare: that costs a new connection).
    C{poll}, not C{select}: a server with a thousand customers connected
    opens its database connections on descriptors above 1,023, which
    C{select} cannot look at.
    """
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    return not poller.poll(0)


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

    def _write(self, work: Callable[[Tx], T], reads: Reads = ()) -> Deferred[T]:
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
        work, or L{_attempt_call}) until it is done or refused:
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

    # -- changes of seat state: one function call each ----------------------

    @property
    def _rules(self) -> PostgresRules:
        return cast(PostgresRules, self.rules)  # rules_class is one

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
        rules = self._rules
        return self._function(
            lambda now: (BUY_CALL, rules.buy_call(username, legs, request_id, now)),
            lambda tx, answer: rules.bought(tx, username, legs, request_id, answer),
            request_id,
        )

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
        rules = self._rules
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
        One purchase of a batch, run alone (L{_attempt_call} under L{_job}).
        C{unknown}: an earlier attempt may have committed, so "storage
        unavailable" (nothing changed) becomes "outcome unknown".
        """
        try:
            return True, self._job(
                lambda: self._attempt_call(
                    lambda now: (BUY_CALL, rules.buy_call(username, legs, request_id, now)),
                    lambda tx, answer: rules.bought(tx, username, legs, request_id, answer),
                    request_id is not None,
                    ended,
                )
            )
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
        Each answer is read as L{_attempt_call} reads its one; a replay
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

    def hold(
        self,
        username: str,
        session_id: str,
        legs: list[LegRequest],
        seconds: float,
        alive: Callable[[], bool],
        request_id: str | None = None,
    ) -> Deferred[Hold]:
        """
        A hold: one round trip (C{vendepass_hold}). Whether the session is
        still open is looked at just before the call is sent, and the
        function refuses after its replay, as L{SeatRules.hold} does; a
        closed session's hold without a C{request_id} is refused without
        asking the database (it would do nothing but refuse).
        """
        rules = self._rules

        def call(now: float | None) -> Call:
            open_ = alive()
            if not open_ and request_id is None:
                raise SessionClosed()
            return HOLD_CALL, rules.hold_call(username, session_id, legs, seconds, open_, request_id, now)

        return self._function(call, lambda tx, answer: rules.held(username, legs, request_id, answer), request_id)

    def buy_hold(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        """
        The purchase of a hold: one round trip (C{vendepass_buy_hold}); two
        for a hold made without its flights' descriptions.
        """
        rules = self._rules
        flights: dict[str, Any] = {}
        return self._function(
            lambda now: (BUY_HOLD_CALL, rules.buy_hold_call(hold_id, username, request_id, now, flights)),
            lambda tx, answer: rules.bought_hold(hold_id, username, request_id, answer, flights),
            request_id,
        )

    def release(self, hold_id: str, username: str, request_id: str | None = None) -> Deferred[None]:
        rules = self._rules
        return self._function(
            lambda now: (RELEASE_CALL, (username, hold_id, *_request(username, request_id), now)),
            lambda tx, answer: rules.released(hold_id, request_id, answer),
            request_id,
        )

    def cancel(self, ticket_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        rules = self._rules
        return self._function(
            lambda now: (CANCEL_CALL, (username, ticket_id, *_request(username, request_id), now)),
            lambda tx, answer: rules.cancelled(ticket_id, request_id, answer),
            request_id,
        )

    def release_session(self, session_id: str) -> Deferred[list[str]]:
        """
        End a closed connection's holds: one round trip
        (C{vendepass_release_session}).
        """
        return self._function(
            lambda now: (RELEASE_SESSION_CALL, (session_id, now)), lambda tx, answer: list(answer["released"]), None
        )

    def expire_hold(self, hold_id: str) -> Deferred[str | None]:
        """
        A hold's timer ran out: one round trip (C{vendepass_expire_hold}).
        """
        return self._function(lambda now: (EXPIRE_HOLD_CALL, (hold_id, now)), lambda tx, answer: answer["state"], None)

    def expired_holds(self, limit: int = 1000) -> Deferred[list[tuple[str, str]]]:
        """
        The sweep: one round trip (C{vendepass_expired_holds}).
        """
        return self._function(
            lambda now: (EXPIRED_HOLDS_CALL, (limit, REQUEST_RETENTION, now)),
            lambda tx, answer: [(hold_id, session_id) for hold_id, session_id in answer["ended"]],
            None,
        )

    def _function(
        self,
        call: Callable[[float | None], Call],
        answered: Callable[[Tx, dict[str, Any]], T],
        request_id: str | None,
    ) -> Deferred[T]:
        """
        A change of seat state that is one function call: C{call(now)} is
        its statement, C{answered(tx, answer)} what its answer means (a
        replay may read on C{tx}). Run under L{_job}'s rules, as a
        transaction of L{_write}.
        """
        ended: list[tuple[str, str]] = []
        return self._submit(lambda: self._attempt_call(call, answered, request_id is not None, ended), ended)

    def _attempt_call(
        self,
        call: Callable[[float | None], Call],
        answered: Callable[[Tx, dict[str, Any]], T],
        replayable: bool,
        ended: list[tuple[str, str]],
    ) -> T:
        """
        One attempt of a function call: its one statement, in autocommit (a
        transaction of its own, durable when it returns). A connection
        found dead before the statement is sent loses nothing; one that dies
        while it runs leaves its outcome unknown, unless the request is
        C{replayable} (it has a C{request_id}: see L{_job}). A function that
        asks for more (L{_CallAgain}) did nothing, and is called again.
        """
        conn = self._connection()
        if not _idle_and_alive(conn):
            self._drop_connection()
            raise _Lost(False, replayable)
        now = None if self._clock is None else self._clock.seconds()
        with conn.cursor() as cur:
            while True:
                sql, args = call(now)
                try:
                    answer = self._call(cur, sql, args)
                except psycopg.OperationalError as e:
                    if not (conn.closed or conn.broken):
                        raise
                    self._drop_connection()
                    raise _Lost(True, replayable) from e
                ended.extend((hold_id, session_id) for hold_id, session_id in answer["ended"])
                try:
                    return answered(self.transaction_class(cur, answer.get("now", 0.0)), answer)
                except _CallAgain:
                    continue
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
