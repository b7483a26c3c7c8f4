"""
The tables every store has, written once: each backend renders
L{TABLES} with its own column types and its own few differences (see
L{render}). Shipped migrations render to exactly the text they had when
they shipped (C{tests/test_store.py} checks it); a new table or index goes in
a new migration of each backend.
"""

from __future__ import annotations

# The schema of version 1 of the SQLite store, and of the first part of
# version 1 of the PostgreSQL store.
TABLES = """
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
    fare_cents {cents} NOT NULL CHECK (fare_cents >= 0)
);
CREATE TABLE users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at {real} NOT NULL
);
CREATE TABLE holds (
    hold_id TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username),
    session_id TEXT NOT NULL,
    created_at {real} NOT NULL,
    expires_at {real} NOT NULL,
    price_cents {cents} NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'expired', 'released', 'bought')),
    ended_at {real}
);
{holds_indexes}CREATE TABLE hold_legs (
    hold_id TEXT NOT NULL REFERENCES holds(hold_id) ON DELETE CASCADE,
    leg INTEGER NOT NULL,
    flight_id TEXT NOT NULL,
    seat TEXT NOT NULL,
    PRIMARY KEY (hold_id, leg)
){without_rowid};
CREATE TABLE tickets (
    ticket_id TEXT PRIMARY KEY,
{ticket_serial}    username TEXT NOT NULL REFERENCES users(username),
    status TEXT NOT NULL CHECK (status IN ('active', 'cancelled')),
    price_cents {cents} NOT NULL,
    currency TEXT NOT NULL,
    bought_at {real} NOT NULL,
    cancelled_at {real}
);
CREATE INDEX tickets_user ON tickets(username, bought_at{ticket_order});
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
    price_cents {cents} NOT NULL,
    PRIMARY KEY (ticket_id, leg)
){without_rowid};
CREATE TABLE seats (
    flight_id TEXT NOT NULL,
    seat TEXT NOT NULL,
    hold_id TEXT REFERENCES holds(hold_id),
    ticket_id TEXT REFERENCES tickets(ticket_id),
    PRIMARY KEY (flight_id, seat),
    CHECK ((hold_id IS NULL) <> (ticket_id IS NULL))
){without_rowid};
CREATE INDEX seats_hold ON seats(hold_id) WHERE hold_id IS NOT NULL;
CREATE INDEX seats_ticket ON seats(ticket_id) WHERE ticket_id IS NOT NULL;
"""


def render(
    real: str,
    cents: str,
    holds_indexes: str,
    without_rowid: str = "",
    ticket_serial: str = "",
    ticket_order: str = "",
) -> str:
    """
    L{TABLES} for one database: C{real} and C{cents} are its types for
    times and amounts of money, C{holds_indexes} the statements indexing
    C{holds}, C{without_rowid} what follows a table keyed by its primary
    key (SQLite: C{" WITHOUT ROWID"}), C{ticket_serial} a column line that
    numbers tickets in order of sale, and C{ticket_order} that column
    (C{", n"}) in the index of a customer's tickets.
    """
    return TABLES.format(
        real=real,
        cents=cents,
        holds_indexes=holds_indexes,
        without_rowid=without_rowid,
        ticket_serial=ticket_serial,
        ticket_order=ticket_order,
    )
