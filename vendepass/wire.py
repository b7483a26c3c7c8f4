"""
How the values of VendePass look on the wire (protocol v1, docs/protocol.md).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import json.encoder
import math
import re
from typing import TYPE_CHECKING, Any, Callable

from vendepass.model import Flight, HeldSeat, Hold, Itinerary, Money, SeatMap, Ticket, TicketLeg, iso_utc

if TYPE_CHECKING:
    from vendepass.service import SearchPage

PROTOCOL_VERSION = 1


def money(value: Money) -> dict[str, str]:
    return {"amount": value.amount(), "currency": value.currency}


def flight(value: Flight) -> dict[str, Any]:
    return {
        "flight": value.flight_id,
        "number": value.number,
        "origin": value.origin,
        "destination": value.destination,
        "departure": value.departure_iso,
        "arrival": value.arrival_iso,
        "aircraft": value.aircraft.type,
        "price": money(value.fare),
    }


def itinerary(value: Itinerary) -> dict[str, Any]:
    legs = []
    for leg, free in zip(value.legs, value.free_seats):
        wire = flight(leg)
        wire["free_seats"] = free
        legs.append(wire)
    first, last = value.legs[0], value.legs[-1]
    return {
        "origin": first.origin,
        "destination": last.destination,
        "departure": first.departure_iso,
        "arrival": last.arrival_iso,
        "duration_minutes": int((last.arrives_ts - first.departs_ts) // 60),
        "legs": legs,
        "free_seats": min(value.free_seats),
        "price": money(value.price),
    }


class RawJSON(str):
    """
    Text that is JSON already: a part of a message encoded ahead of time.
    """


# The JSON of a string (no ASCII escaping, as the protocol's encoder).
_string = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _compact(value: Any) -> str:
    """
    The JSON text the protocol's encoder makes of C{value}, for parts
    encoded ahead of time.
    """
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# Stand-ins for the free seat counts while an itinerary's template is made.
_FREE_MARK = 7_340_000_000_000_000


@functools.lru_cache(maxsize=32768)
def _itinerary_template(legs: tuple[Flight, ...]) -> str:
    """
    The JSON of an itinerary over C{legs}, with C{%d} where the free seat
    counts go (each leg's, then the smallest): most of a search answer is
    the same from one search to the next, so it is encoded once.
    """
    marks = tuple(_FREE_MARK + i for i in range(len(legs)))
    text = _compact(itinerary(Itinerary(legs, marks)))
    text = text.replace("%", "%%")
    # In the text: each leg's count in order, then the smallest (the first
    # mark again): "%d" for each, in that order.
    for mark in marks:
        text = text.replace(str(mark), "%d")
    assert text.count("%d") == len(legs) + 1, text
    return text


# The last answers encoded, by the identity of the list encoded (kept here,
# so the identity cannot be reused while the entry lives), up to
# ENCODED_BYTES of text in all.
_ENCODED: dict[int, tuple[object, RawJSON]] = {}
ENCODED_BYTES = 16 * 2**20
_encoded_bytes = 0


def itineraries(values: list[Itinerary]) -> RawJSON:
    """
    C{{"itineraries": [...]}} as JSON text, from the templates. The service
    hands out the same (never modified) list for the same answer, and that
    answer is encoded once.
    """
    return _encoded(values, lambda: _encode_itineraries(values))


def search_page(value: SearchPage) -> RawJSON:
    """
    A search answer: C{{"itineraries": [...], "sales_window": {...}}}, and
    C{"next_offset"} if it was cut. Encoded once, as L{itineraries}.
    """

    def encode() -> RawJSON:
        first, last = value.sales_window
        tail = f',"sales_window":{{"first":"{first.isoformat()}","last":"{last.isoformat()}"}}'
        if value.next_offset is not None:
            tail += f',"next_offset":{value.next_offset:d}'
        return RawJSON(_encode_itineraries(value.itineraries)[:-1] + tail + "}")

    return _encoded(value, encode)


def _encoded(value: object, encode: Callable[[], RawJSON]) -> RawJSON:
    kept = _ENCODED.get(id(value))
    if kept is not None and kept[0] is value:
        return kept[1]
    global _encoded_bytes
    raw = encode()
    if _encoded_bytes + len(raw) > ENCODED_BYTES:
        _ENCODED.clear()
        _encoded_bytes = 0
    _ENCODED[id(value)] = (value, raw)
    _encoded_bytes += len(raw)
    return raw


def _encode_itineraries(values: list[Itinerary]) -> RawJSON:
    parts = []
    for value in values:
        seats = value.free_seats
        parts.append(_itinerary_template(value.legs) % (*seats, min(seats)))
    return RawJSON('{"itineraries":[' + ",".join(parts) + "]}")


def _hold_leg(leg: HeldSeat) -> dict[str, Any]:
    return {
        "flight": leg.flight.flight_id,
        "number": leg.flight.number,
        "seat": leg.seat,
        "origin": leg.flight.origin,
        "destination": leg.flight.destination,
        "departure": leg.flight.departure_iso,
        "arrival": leg.flight.arrival_iso,
        "price": money(leg.flight.fare),
    }


def hold(value: Hold) -> dict[str, Any]:
    return {
        "hold_id": value.hold_id,
        "expires_at": iso_utc(value.expires_at),
        "legs": [_hold_leg(leg) for leg in value.legs],
        "price": money(value.price),
    }


def _ticket_leg(leg: TicketLeg) -> dict[str, Any]:
    return {
        "flight": leg.flight_id,
        "number": leg.number,
        "origin": leg.origin,
        "destination": leg.destination,
        "departure": leg.departure,
        "arrival": leg.arrival,
        "seat": leg.seat,
        "price": money(leg.price),
    }


def ticket(value: Ticket) -> dict[str, Any]:
    return {
        "ticket_id": value.ticket_id,
        "status": value.status,
        "legs": [_ticket_leg(leg) for leg in value.legs],
        "price": money(value.price),
        "bought_at": iso_utc(value.bought_at),
        "cancelled_at": None if value.cancelled_at is None else iso_utc(value.cancelled_at),
    }


@functools.lru_cache(maxsize=1024)
def _money_json(value: Money) -> str:
    return _compact(money(value))


@functools.lru_cache(maxsize=65536)
def _ticket_leg_parts(
    flight_id: str, number: str, origin: str, destination: str, departure: str, arrival: str, price: Money
) -> tuple[str, str]:
    """
    A ticket leg's JSON before and after its seat: the same for every seat
    sold on a flight, so encoded once.
    """
    leg = TicketLeg(flight_id, number, origin, destination, departure, arrival, "", price)
    text = _compact(_ticket_leg(leg))
    head, tail = text.split('"seat":"",', 1)
    return head + '"seat":', "," + tail


def ticket_json(value: Ticket) -> RawJSON:
    """
    The JSON text of L{ticket}C{(value)}, byte for byte what the protocol's
    encoder makes of it, from per-flight parts encoded once: a purchase's
    answer is mostly its flights' fixed text.
    """
    legs = []
    for leg in value.legs:
        head, tail = _ticket_leg_parts(
            leg.flight_id, leg.number, leg.origin, leg.destination, leg.departure, leg.arrival, leg.price
        )
        legs.append(head + _string(leg.seat) + tail)
    return RawJSON(
        '{"ticket_id":' + _string(value.ticket_id)
        + ',"status":' + _string(value.status)
        + ',"legs":[' + ",".join(legs)
        + '],"price":' + _money_json(value.price)
        + ',"bought_at":' + _string(iso_utc(value.bought_at))
        + ',"cancelled_at":' + ("null" if value.cancelled_at is None else _string(iso_utc(value.cancelled_at)))
        + "}"
    )


@functools.lru_cache(maxsize=65536)
def _hold_leg_parts(value: Flight) -> tuple[str, str]:
    """
    A hold leg's JSON before and after its seat: the same for every seat
    held on a flight, so encoded once.
    """
    text = _compact(_hold_leg(HeldSeat(value, "")))
    head, tail = text.split(',"seat":"",', 1)
    return head + ',"seat":', "," + tail


def hold_json(value: Hold) -> RawJSON:
    """
    The JSON text of L{hold}C{(value)}, byte for byte what the protocol's
    encoder makes of it, from per-flight parts encoded once (as
    L{ticket_json}).
    """
    legs = []
    for leg in value.legs:
        head, tail = _hold_leg_parts(leg.flight)
        legs.append(head + _string(leg.seat) + tail)
    return RawJSON(
        '{"hold_id":' + _string(value.hold_id)
        + ',"expires_at":' + _string(iso_utc(value.expires_at))
        + ',"legs":[' + ",".join(legs)
        + '],"price":' + _money_json(value.price)
        + "}"
    )


_CURSOR = re.compile(r"t1\.[A-Za-z0-9_-]{1,96}")


def ticket_cursor(after: tuple[float, int]) -> str:
    """
    The opaque C{next_cursor} of a page of tickets: where the next page starts.
    """
    bought_at, order = after
    text = f"{bought_at!r} {order}".encode("ascii")
    return "t1." + base64.urlsafe_b64encode(text).decode("ascii").rstrip("=")


def parse_ticket_cursor(cursor: str) -> tuple[float, int]:
    """
    The key a L{ticket_cursor} stands for.

    @raise ValueError: if C{cursor} is not one.
    """
    if not _CURSOR.fullmatch(cursor):
        raise ValueError(cursor)
    body = cursor[3:]
    try:
        text = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError(cursor)
    bought_at_text, _, order_text = text.partition(" ")
    if not order_text.isdigit() or len(order_text) > 19:
        raise ValueError(cursor)
    bought_at = float(bought_at_text)
    if not math.isfinite(bought_at):
        raise ValueError(cursor)
    return bought_at, int(order_text)


def seatmap(value: SeatMap, username: str | None) -> RawJSON:
    """
    The seat map as JSON text: C{{"flight", "rows", "letters", "seats"}}.
    Most of it is the same from one request to the next (the flight, and
    every free seat's entry), so those parts are encoded once.
    """
    seats = ",".join(
        _seat_json(s.seat, s.status, username is not None and s.owner == username) for s in value.seats
    )
    return RawJSON(_seatmap_head(value.flight) + seats + "]}")


@functools.lru_cache(maxsize=8192)
def _seatmap_head(value: Flight) -> str:
    head = _compact(
        {"flight": flight(value), "rows": value.aircraft.rows, "letters": value.aircraft.letters, "seats": []}
    )
    assert head.endswith("[]}")
    return head[: -len("]}")]


@functools.lru_cache(maxsize=65536)
def _seat_json(seat: str, status: str, mine: bool) -> str:
    return _compact({"seat": seat, "status": status, "mine": mine})
