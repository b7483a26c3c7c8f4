"""
What every store shares: booking codes and hold ids, the airline read back
from its tables, and the refusal that commits first.
"""

from __future__ import annotations

import functools
import secrets
from typing import Any

from vendepass.model import Aircraft, Airport, Money, Network, SeatState, TimetableEntry

# How long the outcome of a request_id is kept for retries.
REQUEST_RETENTION = 86400.0

# Booking codes: 8 characters without look-alikes (no 0/O, 1/I/L): 31**8 ≈ 8.5e11.
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"


def _random_code(length: int) -> str:
    """
    C{length} uniformly random letters of the booking code alphabet (one
    call for randomness, not one per letter).
    """
    space = len(_CODE_ALPHABET) ** length
    bits = space.bit_length()
    while True:
        number = secrets.randbits(bits)
        if number < space:
            break
    letters = []
    for _ in range(length):
        number, digit = divmod(number, len(_CODE_ALPHABET))
        letters.append(_CODE_ALPHABET[digit])
    return "".join(letters)


def booking_code(now: float | None = None) -> str:
    """
    A new booking code: 8 letters. Given the time, the first two letters
    are the day (cycling every 961 days) and the other six random (8.9e8 a
    day): codes made on one day sit together in the ticket indexes, so a
    purchase touches a few hot index pages rather than a random page of an
    index that grows with every ticket ever sold. Without it, all 8 are
    random.
    """
    if now is None:
        return _random_code(8)
    day = int(now // 86400) % len(_CODE_ALPHABET) ** 2
    return _CODE_ALPHABET[day // len(_CODE_ALPHABET)] + _CODE_ALPHABET[day % len(_CODE_ALPHABET)] + _random_code(6)


def hold_code(now: float) -> str:
    """
    A new hold id: "H", the minute in 6 hex digits (cycling every 31 years),
    then 10 random hex digits; time-ordered for the same reason as
    L{booking_code}.
    """
    return f"H{int(now // 60) % 16**6:06x}{secrets.token_hex(5)}"


class _CommitThenRefuse(Exception):
    """
    Raised by a transaction's work to commit what it did so far (say, ending
    an expired hold) and then refuse the request with C{error}.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def read_network(db: Any) -> Network:
    """
    The airline stored in a database (any DB-API connection whose
    C{execute} returns an iterable cursor: SQLite or psycopg).
    """
    from datetime import time as clock_time

    code, name, currency = db.execute("SELECT code, name, currency FROM airline").fetchone()
    airports = {
        row[0]: Airport(*row)
        for row in db.execute("SELECT code, city, name, timezone FROM airports ORDER BY code")
    }
    aircraft = {
        row[0]: Aircraft(*row) for row in db.execute("SELECT type, name, rows, letters FROM aircraft ORDER BY type")
    }
    timetable = tuple(
        TimetableEntry(
            flight=flight,
            origin=origin,
            destination=destination,
            departure=clock_time(int(departure[:2]), int(departure[3:5])),
            duration_minutes=duration,
            days=frozenset(int(d) for d in days),
            aircraft=plane,
            fare=Money(fare, currency),
        )
        for flight, origin, destination, departure, duration, days, plane, fare in db.execute(
            "SELECT flight, origin, destination, departure, duration_minutes, days, aircraft, fare_cents"
            " FROM timetable ORDER BY flight"
        )
    )
    return Network(code, name, currency, airports, aircraft, timetable)


@functools.lru_cache(maxsize=4096)
def _free(seat: str) -> SeatState:
    """
    A free seat's state: values are immutable, so one per seat name will do.
    """
    return SeatState(seat, "free")


