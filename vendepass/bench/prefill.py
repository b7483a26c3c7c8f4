"""
C{vendepass-bench prefill}: give a database a history, so a benchmark can show
that the cost of selling does not grow with the data.

It writes N tickets for flights that have already flown (day after day back
from the start of the sales window, every seat sold), with their seats,
legs and audit events, exactly as the server would have written them, so
C{vendepass-admin verify} stays clean. The database is created (with the
fixtures) if it does not exist; it must not be in use by a server.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import TextIO

from attrs import frozen
from twisted.internet.task import Clock

from vendepass.fixtures import BUNDLED, load
from vendepass.passwords import ScryptHasher
from vendepass.schedule import _instance
from vendepass.store import InlineExecutor
from vendepass.store.common import booking_code
from vendepass.store.sqlite import SQLiteStore
from vendepass.store.transactions import TICKET_ROW_INSERT, TIMED_TICKET_LEG_INSERT

# Rows written per transaction.
CHUNK = 20_000


@frozen
class Prefilled:
    tickets: int
    users: int
    flights: int
    first_day: str
    last_day: str
    seconds: float
    size_bytes: int


def prefill(
    path: str,
    tickets: int,
    users: int = 10_000,
    fixtures: str | None = None,
    now: float | None = None,
    progress: TextIO | None = None,
) -> Prefilled:
    """
    Add C{tickets} sold tickets on departed flights to the database at C{path}.
    """
    started = time.monotonic()
    now = time.time() if now is None else now
    clock = Clock()
    clock.advance(now)
    hasher = ScryptHasher()
    store = SQLiteStore.open(path, clock, InlineExecutor(), lambda: load(fixtures or BUNDLED), hasher.hash)
    network = store.network()
    store.stop()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # A bulk load: durability per row is not needed, only at the end.
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")
        # Nobody logs in as these customers: one hash of a random password will do.
        password_hash = hasher.hash(secrets.token_urlsafe(24))
        names = [f"history{i:06d}" for i in range(users)]
        db.execute("BEGIN")
        db.executemany(
            "INSERT OR IGNORE INTO users (username, password_hash, created_at) VALUES (?, ?, ?)",
            [(name, password_hash, now - 400 * 86400) for name in names],
        )
        db.execute("COMMIT")
        codes = {row[0] for row in db.execute("SELECT ticket_id FROM tickets")}
        # The schedule starts the day before today: history ends the day before that.
        day = datetime.fromtimestamp(now, timezone.utc).date() - timedelta(days=2)
        last_day = day
        written = flights = 0
        batch: dict[str, list[tuple[object, ...]]] = {"tickets": [], "legs": [], "seats": [], "audit": []}

        def flush() -> None:
            db.execute("BEGIN")
            db.executemany(TICKET_ROW_INSERT, batch["tickets"])
            db.executemany(TIMED_TICKET_LEG_INSERT, batch["legs"])
            db.executemany("INSERT INTO seats (flight_id, seat, ticket_id) VALUES (?, ?, ?)", batch["seats"])
            db.executemany(
                "INSERT INTO audit (at, username, action, ticket_id, seats) VALUES (?, ?, 'buy', ?, ?)",
                batch["audit"],
            )
            db.execute("COMMIT")
            for rows in batch.values():
                rows.clear()

        while written < tickets:
            for entry in network.timetable:
                if written >= tickets:
                    break
                if day.isoweekday() not in entry.days:
                    continue
                flight = _instance(network, entry, day)
                taken = {row[0] for row in db.execute("SELECT seat FROM seats WHERE flight_id = ?", (flight.flight_id,))}
                flights += 1
                departure, arrival = flight.departure.isoformat(), flight.arrival.isoformat()
                bought_at = flight.departs_ts - 7 * 86400
                for seat in flight.aircraft.seats():
                    if written >= tickets:
                        break
                    if seat in taken:
                        continue
                    code = booking_code(bought_at)
                    while code in codes:
                        code = booking_code(bought_at)
                    codes.add(code)
                    username = names[written % users]
                    cents = flight.fare.cents
                    batch["tickets"].append((code, username, cents, network.currency, bought_at))
                    batch["legs"].append(
                        (code, 0, flight.flight_id, flight.number, flight.origin, flight.destination, departure,
                         arrival, seat, cents, bought_at)
                    )
                    batch["seats"].append((flight.flight_id, seat, code))
                    batch["audit"].append((bought_at, username, code, json.dumps([f"{flight.flight_id}/{seat}"])))
                    written += 1
                    if len(batch["tickets"]) >= CHUNK:
                        flush()
                        if progress is not None:
                            progress.write(f"\rprefill: {written:,} of {tickets:,} tickets, back to {day}")
                            progress.flush()
            day -= timedelta(days=1)
            if day.year < 1900:
                raise RuntimeError("the timetable has no flights to fill")
        flush()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if progress is not None:
            progress.write("\n")
    finally:
        db.close()
    return Prefilled(
        tickets=written,
        users=users,
        flights=flights,
        first_day=str(day + timedelta(days=1)),
        last_day=str(last_day),
        seconds=round(time.monotonic() - started, 1),
        size_bytes=os.path.getsize(path),
    )


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="vendepass-bench prefill",
        description="Add sold tickets on departed flights to a VendePass SQLite database (stop the server first).",
    )
    parser.add_argument("--db", required=True, help="the SQLite database (created if missing)")
    parser.add_argument("--tickets", type=int, default=1_000_000, help="how many tickets to add (default 1,000,000)")
    parser.add_argument("--users", type=int, default=10_000, help="how many customers own them (default 10,000)")
    parser.add_argument("--fixtures", help="fixtures for a new database (default: the bundled airline)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.tickets < 0 or args.users < 1:
        parser.error("--tickets must be 0 or more and --users at least 1")
    try:
        result = prefill(args.db, args.tickets, args.users, args.fixtures, progress=None if args.json else err)
    except (sqlite3.Error, OSError, RuntimeError) as e:
        err.write(f"vendepass-bench prefill: {e}\n")
        return 2
    if args.json:
        out.write(json.dumps({"tickets": result.tickets, "users": result.users, "flights": result.flights,
                              "first_day": result.first_day, "last_day": result.last_day,
                              "seconds": result.seconds, "size_bytes": result.size_bytes}) + "\n")
    else:
        out.write(
            f"prefill: {result.tickets:,} tickets of {result.users:,} customers on {result.flights:,} departed"
            f" flights ({result.first_day} to {result.last_day}) in {result.seconds} s;"
            f" database {result.size_bytes / 2**20:.0f} MiB\n"
        )
    return 0
