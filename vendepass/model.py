"""
Value objects of VendePass: frozen, validated attrs classes.

Times inside the service are POSIX timestamps (float seconds, as
C{IReactorTime.seconds()} gives them); flight times are also kept as aware
datetimes in the local time zone of their airport, which is how they are shown.
"""

from __future__ import annotations

import functools

import re
from datetime import datetime, time
from decimal import Decimal, InvalidOperation
from time import gmtime as _gmtime, strftime as _strftime

import attrs
from attrs import field, frozen

_SEAT = re.compile(r"([1-9][0-9]{0,2})([A-Z])")


def iso_utc(ts: float) -> str:
    """
    A POSIX timestamp as ISO 8601 in UTC: C{2026-12-01T10:30:00Z}.
    """
    # This runs for every ticket and hold answered, and the tickets of a
    # batch were sold in the same second: each second is formatted once
    # (gmtime floors a timestamp to its second, as here).
    return _iso_second(int(ts // 1))


@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    # time.strftime over gmtime: half the cost of a datetime's isoformat.
    return _strftime("%Y-%m-%dT%H:%M:%SZ", _gmtime(second))


@frozen(order=True)
class Money:
    """
    An amount of money in cents of C{currency}.
    """

    cents: int
    currency: str = "BRL"

    @classmethod
    def parse(cls, text: str, currency: str) -> Money:
        """
        Parse a decimal string such as C{"349.90"}.

        @raise ValueError: if it is not a non-negative amount with at most two decimals.
        """
        try:
            amount = Decimal(text)
        except (InvalidOperation, TypeError):
            raise ValueError(f"not a decimal amount: {text!r}")
        if not amount.is_finite() or amount < 0 or amount != amount.quantize(Decimal("0.01")):
            raise ValueError(f"not an amount with at most two decimals: {text!r}")
        return cls(int(amount * 100), currency)

    def amount(self) -> str:
        return f"{self.cents // 100}.{self.cents % 100:02d}"

    def __add__(self, other: Money) -> Money:
        if other.currency != self.currency:
            raise ValueError("cannot add different currencies")
        return Money(self.cents + other.cents, self.currency)


def total(prices: list[Money], currency: str) -> Money:
    result = Money(0, currency)
    for price in prices:
        result = result + price
    return result


@frozen
class Airport:
    code: str
    city: str
    name: str
    timezone: str


@functools.lru_cache(maxsize=256)
def _cabin(rows: int, letters: str) -> tuple[str, ...]:
    return tuple(f"{row}{letter}" for row in range(1, rows + 1) for letter in letters)


@frozen
class Aircraft:
    """
    An aircraft type and its cabin: rows numbered 1..rows, seats lettered.
    """

    type: str
    name: str
    rows: int
    letters: str

    @property
    def capacity(self) -> int:
        return self.rows * len(self.letters)

    def seats(self) -> tuple[str, ...]:
        """
        Every seat, front to back, left to right: C{("1A", "1B", ...)}.
        """
        return _cabin(self.rows, self.letters)

    def has_seat(self, seat: str) -> bool:
        match = _SEAT.fullmatch(seat)
        if match is None:
            return False
        return 1 <= int(match.group(1)) <= self.rows and match.group(2) in self.letters


@frozen
class TimetableEntry:
    """
    One line of the timetable: a flight number flown on some weekdays.

    @ivar departure: local time at the origin airport.
    @ivar days: ISO weekdays (1 = Monday ... 7 = Sunday).
    """

    flight: str
    origin: str
    destination: str
    departure: time
    duration_minutes: int
    days: frozenset[int]
    aircraft: str
    fare: Money


@frozen
class Network:
    """
    The airline: airports, aircraft and timetable, as loaded from fixtures.
    """

    airline_code: str
    airline_name: str
    currency: str
    airports: dict[str, Airport] = field(eq=False)
    aircraft: dict[str, Aircraft] = field(eq=False)
    timetable: tuple[TimetableEntry, ...]


# Flights are dictionary keys in hot paths (route answers): hash them once.
@frozen(cache_hash=True)
class Flight:
    """
    One bookable flight instance, e.g. C{VP1203-2026-12-01}.
    """

    flight_id: str
    number: str
    origin: str
    destination: str
    departure: datetime
    arrival: datetime
    aircraft: Aircraft
    fare: Money
    # POSIX times of departure and arrival, worked out once: they are read
    # in every search and every sale.
    departs_ts: float = field(init=False, eq=False, repr=False)
    arrives_ts: float = field(init=False, eq=False, repr=False)
    # The same as ISO 8601 text, as tickets record them: worked out once,
    # not at every sale.
    departure_iso: str = field(init=False, eq=False, repr=False)
    arrival_iso: str = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "departs_ts", self.departure.timestamp())
        object.__setattr__(self, "arrives_ts", self.arrival.timestamp())
        object.__setattr__(self, "departure_iso", self.departure.isoformat())
        object.__setattr__(self, "arrival_iso", self.arrival.isoformat())


@frozen
class Itinerary:
    """
    One way to travel: consecutive legs, each with its free seats.
    """

    legs: tuple[Flight, ...]
    free_seats: tuple[int, ...]

    @property
    def price(self) -> Money:
        return total([leg.fare for leg in self.legs], self.legs[0].fare.currency)


@frozen
class HeldSeat:
    flight: Flight
    seat: str


@frozen
class Hold:
    hold_id: str
    username: str
    legs: tuple[HeldSeat, ...]
    expires_at: float
    price: Money


@frozen
class TicketLeg:
    """
    A leg of a ticket, copied from the flight when it was sold, so a ticket
    reads the same whatever later happens to the timetable.
    """

    flight_id: str
    number: str
    origin: str
    destination: str
    departure: str
    arrival: str
    seat: str
    price: Money


@frozen
class Ticket:
    ticket_id: str
    username: str
    status: str = field(validator=attrs.validators.in_(("active", "cancelled")))
    legs: tuple[TicketLeg, ...] = ()
    price: Money = Money(0)
    bought_at: float = 0.0
    cancelled_at: float | None = None


@frozen
class TicketPage:
    """
    One page of a customer's tickets, newest first.

    @ivar after: where the next page starts (the C{(bought_at, order)} key
        of this page's last ticket), or C{None} if this is the last page.
    """

    tickets: tuple[Ticket, ...]
    after: tuple[float, int] | None = None


@frozen
class SeatState:
    """
    @ivar status: C{"free"}, C{"held"} or C{"sold"}.
    @ivar owner: the username holding or owning the seat, if any.
    """

    seat: str
    status: str
    owner: str | None = None


@frozen
class SeatMap:
    flight: Flight
    seats: tuple[SeatState, ...]
