"""
C{vendepass-admin}: tools for the people who run VendePass.

C{vendepass-admin verify --db PATH-OR-URL} replays the audit log (every hold,
release, expiry, purchase and cancellation, in order) and compares it with
the seats, holds and tickets in the database. It reports any seat sold twice,
any ticket whose seats are not sold to it, any sold seat without a ticket,
and any difference between the replay and the database; it exits 1 on any
finding (0 when clean, 2 on a usage error). It only reads: it is safe to run
against the database of a running server.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
from typing import Any, TextIO

from attrs import define, field

Seat = tuple[str, str]


@define
class Report:
    findings: list[str] = field(factory=list)
    events: int = 0
    tickets: int = 0
    sold: int = 0
    held: int = 0

    def find(self, text: str) -> None:
        self.findings.append(text)


def _seats(text: str) -> list[Seat]:
    seats = []
    for item in json.loads(text):
        flight, _, seat = str(item).rpartition("/")
        seats.append((flight, seat))
    return seats


def verify(db: Any) -> Report:
    """
    Check a VendePass database (a SQLite connection, or a psycopg one in
    autocommit mode) against its audit log, in one read transaction: one
    snapshot of the database, even while servers keep selling.
    """
    report = Report()
    postgres = not isinstance(db, sqlite3.Connection)
    db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if postgres else "BEGIN")
    try:
        held: dict[Seat, str] = {}
        sold: dict[Seat, str] = {}
        for seq, action, hold_id, ticket_id, seats_text in db.execute(
            "SELECT seq, action, hold_id, ticket_id, seats FROM audit ORDER BY seq"
        ):
            report.events += 1
            for seat in _seats(seats_text):
                where = f"audit #{seq} ({action}): seat {seat[1]} on {seat[0]}"
                if action == "hold":
                    if seat in sold or seat in held:
                        report.find(f"{where} held while already {'sold' if seat in sold else 'held'}")
                    held[seat] = hold_id
                elif action in ("release", "expire"):
                    if held.get(seat) != hold_id:
                        report.find(f"{where} was not held by hold {hold_id}")
                    held.pop(seat, None)
                elif action == "buy":
                    if seat in sold:
                        report.find(f"{where} sold twice (tickets {sold[seat]} and {ticket_id})")
                    if hold_id is not None:
                        if held.get(seat) != hold_id:
                            report.find(f"{where} bought without being held by hold {hold_id}")
                        held.pop(seat, None)
                    elif seat in held:
                        report.find(f"{where} sold while held by hold {held[seat]}")
                    sold[seat] = ticket_id
                elif action == "cancel":
                    if sold.get(seat) != ticket_id:
                        report.find(f"{where} cancelled but not sold to ticket {ticket_id}")
                    sold.pop(seat, None)

        rows = db.execute("SELECT flight_id, seat, hold_id, ticket_id FROM seats").fetchall()
        db_sold = {(f, s): t for f, s, h, t in rows if t is not None}
        db_held = {(f, s): h for f, s, h, t in rows if h is not None}
        report.sold, report.held = len(db_sold), len(db_held)
        for seat, ticket_id in sorted(db_sold.items()):
            if sold.get(seat) != ticket_id:
                report.find(f"seat {seat[1]} on {seat[0]} is sold to {ticket_id} but the audit log says {sold.get(seat)}")
        for seat, ticket_id in sorted(sold.items()):
            if seat not in db_sold:
                report.find(f"seat {seat[1]} on {seat[0]} was sold to {ticket_id} but is not sold in the database")
        for seat, hold_id in sorted(db_held.items()):
            if held.get(seat) != hold_id:
                report.find(f"seat {seat[1]} on {seat[0]} is held by {hold_id} but the audit log says {held.get(seat)}")

        active = {
            ticket_id: status for ticket_id, status in db.execute("SELECT ticket_id, status FROM tickets")
        }
        report.tickets = len(active)
        for ticket_id, flight_id, seat in db.execute(
            "SELECT l.ticket_id, l.flight_id, l.seat FROM ticket_legs l JOIN tickets t ON t.ticket_id = l.ticket_id"
            " WHERE t.status = 'active'"
        ):
            if db_sold.get((flight_id, seat)) != ticket_id:
                report.find(f"ticket {ticket_id}: seat {seat} on {flight_id} is not sold to it")
        if not postgres and "bought_at" in {row[1] for row in db.execute("PRAGMA table_info(ticket_legs)")}:
            # SQLite finds a ticket's legs by its time of sale (migration 9).
            for ticket_id, leg in db.execute(
                "SELECT l.ticket_id, l.leg FROM ticket_legs l JOIN tickets t ON t.ticket_id = l.ticket_id"
                " WHERE l.bought_at IS NOT t.bought_at ORDER BY l.ticket_id, l.leg"
            ):
                report.find(f"ticket {ticket_id}: leg {leg} is filed under another time of sale than its ticket's")
        for seat, ticket_id in sorted(db_sold.items()):
            if active.get(ticket_id) != "active":
                report.find(f"seat {seat[1]} on {seat[0]} is sold without an active ticket ({ticket_id})")
        for hold_id, state in db.execute(
            "SELECT DISTINCT h.hold_id, h.state FROM seats s JOIN holds h ON h.hold_id = s.hold_id"
        ):
            if state != "active":
                report.find(f"hold {hold_id} is {state} but still claims seats")
        counted: dict[str, int] = {}
        for flight_id, *_ in rows:
            counted[flight_id] = counted.get(flight_id, 0) + 1
        if not postgres and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'flight_taken'").fetchone():
            kept = {f: n for f, n in db.execute("SELECT flight_id, seats FROM flight_taken") if n}
            for flight_id in sorted(set(kept) | set(counted)):
                if kept.get(flight_id, 0) != counted.get(flight_id, 0):
                    report.find(
                        f"flight {flight_id}: the seat count says {kept.get(flight_id, 0)} taken,"
                        f" the seats say {counted.get(flight_id, 0)}"
                    )
        if not postgres:
            integrity = db.execute("PRAGMA quick_check").fetchone()[0]
            if integrity != "ok":
                report.find(f"SQLite quick_check: {integrity}")
    finally:
        db.execute("COMMIT")
    return report


def open_read_only(path: str) -> Any:
    """
    The database at C{path} (a SQLite file) or a C{postgresql://} URL, to read.
    """
    from vendepass.store.postgres import connect, is_postgres_url

    if is_postgres_url(path):
        return connect(path)
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)


def _redacted(db: str) -> str:
    """
    C{db} without the password a database URL may hold.
    """
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", db)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="vendepass-admin", description="Tools for VendePass administrators.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("verify", help="replay the audit log against the database; exit 1 on any finding")
    check.add_argument(
        "--db", default="vendepass.sqlite3",
        help="the SQLite database, or a postgresql://user@host:port/dbname URL (default: vendepass.sqlite3)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        db = open_read_only(args.db)
        report = verify(db)
    except Exception as e:
        import psycopg

        if not isinstance(e, (sqlite3.Error, psycopg.Error)):
            raise
        out.write(f"vendepass-admin: cannot read {_redacted(args.db)}: {e}\n")
        return 2
    if args.json:
        out.write(json.dumps({"clean": not report.findings, "findings": report.findings, "events": report.events,
                              "tickets": report.tickets, "sold": report.sold, "held": report.held}) + "\n")
    else:
        for finding in report.findings:
            out.write(f"FINDING: {finding}\n")
        out.write(
            f"{_count(report.events, 'audit event')} replayed; {_count(report.tickets, 'ticket')},"
            f" {_count(report.sold, 'seat')} sold, {report.held} held; {_count(len(report.findings), 'finding')}\n"
        )
    return 1 if report.findings else 0


def _count(number: int, noun: str) -> str:
    """
    C{number} and C{noun}, in the plural unless there is one.
    """
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def run() -> None:
    sys.exit(main())
