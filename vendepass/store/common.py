"""
What every store shares: booking codes and hold ids, the airline read back
from its tables, the seat refusals, and the seat map.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Iterable

from vendepass.errors import SeatUnavailable, SoldOut, UnknownSeat, echo
from vendepass.fixtures import Fixtures
from vendepass.model import (
    Aircraft,
    Airport,
    Flight,
    Money,
    Network,
    SeatState,
    TimetableEntry,
    iso_utc,
)

# How long the outcome of a request_id is kept for retries.
REQUEST_RETENTION = 86400.0

# Booking codes: 8 characters without look-alikes (no 0/O, 1/I/L): 31**8 ≈ 8.5e11.
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"


# Random bytes to letters: 248 = 8 * 31, so a byte below 248 taken modulo
# 31 is a uniformly random letter; the 8 bytes above are dropped.
_LETTER_OF_BYTE = bytes(_CODE_ALPHABET.encode("ascii")[b % len(_CODE_ALPHABET)] for b in range(256))
_UNEVEN_BYTES = bytes(range(256 - 256 % len(_CODE_ALPHABET), 256))


class _RandomBytes(threading.local):
    """
    A thread's bytes of the operating system's randomness, drawn ahead.
    """

    def __init__(self) -> None:
        self.drawn = b""
        self.used = 0


_RANDOM = _RandomBytes()
# How many bytes one draw takes.
_RANDOM_DRAW = 4096


def _forget_random() -> None:
    # A forked child must not give out its parent's bytes again.
    _RANDOM.drawn, _RANDOM.used = b"", 0


os.register_at_fork(after_in_child=_forget_random)


def random_bytes(n: int) -> bytes:
    """
    C{n} bytes of the operating system's randomness (C{os.urandom}, as
    C{secrets} uses), drawn 4 KiB at a time per thread: each draw is a
    system call that lets the GIL go and must win it back, which a busy
    database writer pays for dearly (one per hold id, one per booking code).
    Each byte is given out once.
    """
    r = _RANDOM
    if r.used + n > len(r.drawn):
        r.drawn, r.used = os.urandom(max(_RANDOM_DRAW, n)), 0
    start = r.used
    r.used += n
    return r.drawn[start:r.used]


def _random_code(length: int) -> str:
    """
    C{length} uniformly random letters of the booking code alphabet, from
    the operating system's randomness (L{random_bytes}).
    """
    while True:
        letters = random_bytes(length + 4).translate(_LETTER_OF_BYTE, _UNEVEN_BYTES)
        if len(letters) >= length:
            return letters[:length].decode("ascii")


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
    return f"H{int(now // 60) % 16**6:06x}{hold_random()}"


def hold_random() -> str:
    """
    The random part of a new hold id (the PostgreSQL store's hold function
    puts the minute of the database's clock before it).
    """
    return random_bytes(5).hex()


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




# -- what both stores do around their SQL -----------------------------------

FIXTURE_INSERTS = (
    ("airline", "INSERT INTO airline (code, name, currency) VALUES (?, ?, ?)"),
    ("airports", "INSERT INTO airports (code, city, name, timezone) VALUES (?, ?, ?, ?)"),
    ("aircraft", "INSERT INTO aircraft (type, name, rows, letters) VALUES (?, ?, ?, ?)"),
    (
        "timetable",
        "INSERT INTO timetable (flight, origin, destination, departure, duration_minutes, days,"
        " aircraft, fare_cents) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    ),
    ("users", "INSERT INTO users (username, password_hash, created_at) VALUES (?, ?, ?)"),
)


def load_fixtures(
    executemany: Callable[[str, list[tuple[Any, ...]]], Any],
    fixtures: Fixtures,
    hash_password: Callable[[str], str],
    now: float,
    mark: str = "?",
) -> None:
    """
    Insert the airline, its network and its customers with C{executemany}
    (statements use C{mark} as their placeholder), in the caller's transaction.
    """
    network = fixtures.network
    rows: dict[str, list[tuple[Any, ...]]] = {
        "airline": [(network.airline_code, network.airline_name, network.currency)],
        "airports": [(a.code, a.city, a.name, a.timezone) for a in network.airports.values()],
        "aircraft": [(a.type, a.name, a.rows, a.letters) for a in network.aircraft.values()],
        "timetable": [
            (
                e.flight,
                e.origin,
                e.destination,
                e.departure.strftime("%H:%M"),
                e.duration_minutes,
                "".join(str(d) for d in sorted(e.days)),
                e.aircraft,
                e.fare.cents,
            )
            for e in network.timetable
        ],
        "users": [(c.username, hash_password(c.password), now) for c in fixtures.customers],
    }
    for table, statement in FIXTURE_INSERTS:
        executemany(statement.replace("?", mark), rows[table])


def first_free_seat(flight: Flight, taken: set[str]) -> str:
    """
    The first seat of C{flight} in seat map order that is not C{taken}.
    """
    seat = next((s for s in flight.aircraft.seats() if s not in taken), None)
    if seat is None:
        raise sold_out(flight)
    return seat


def sold_out(flight: Flight) -> SoldOut:
    return SoldOut(f"Flight {flight.flight_id} is sold out.", flight=flight.flight_id)


def check_seat(flight: Flight, seat: str) -> None:
    if not flight.aircraft.has_seat(seat):
        raise UnknownSeat(f"Flight {flight.flight_id} has no seat {echo(seat)!r}.", flight=flight.flight_id, seat=seat)


def seat_taken(flight: Flight, seat: str, sold: object, held_until: float | None) -> SeatUnavailable:
    """
    The refusal for a seat that has a row: sold (C{sold} is not C{None}) or held.
    """
    if sold is not None:
        return SeatUnavailable(f"Seat {seat} on flight {flight.flight_id} is sold.", flight=flight.flight_id, seat=seat)
    assert held_until is not None, "a held seat's hold has an expiry"
    return SeatUnavailable(
        f"Seat {seat} on flight {flight.flight_id} is held until {iso_utc(held_until)}.",
        flight=flight.flight_id,
        seat=seat,
        held_until=iso_utc(held_until),
    )


def seat_map(flight: Flight, rows: Iterable[tuple[str, str | None, float | None, str | None]], now: float) -> list[SeatState]:
    """
    Every seat's state from the rows C{(seat, hold owner, hold expiry,
    ticket owner)} of the seats that have one; a hold whose time is up is free.
    """
    claimed: dict[str, SeatState] = {}
    for seat, hold_owner, expires_at, ticket_owner in rows:
        if ticket_owner is not None:
            claimed[seat] = SeatState(seat, "sold", ticket_owner)
        elif expires_at is not None and expires_at > now:
            claimed[seat] = SeatState(seat, "held", hold_owner)
    return [claimed.get(seat) or _free(seat) for seat in flight.aircraft.seats()]
