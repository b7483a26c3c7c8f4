"""
Reading and validating a fixtures file (format documented in docs/fixtures.md).
"""

from __future__ import annotations

import json
import re
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from attrs import frozen

from vendepass.errors import FixturesError
from vendepass.model import Aircraft, Airport, Money, Network, TimetableEntry

BUNDLED = Path(__file__).resolve().parent / "data" / "airline.json"

_IATA = re.compile(r"[A-Z]{3}")
_FLIGHT = re.compile(r"[A-Z0-9]{2}[0-9]{1,4}")
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_LETTERS = re.compile(r"[A-Z]{1,10}")
USERNAME = re.compile(r"[a-z0-9_]{3,32}")


@frozen
class Customer:
    username: str
    password: str


@frozen
class Fixtures:
    network: Network
    customers: tuple[Customer, ...]


def _get(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise FixturesError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise FixturesError(f"{where}: field {key!r} must be {kind.__name__}")
    return value


def parse(document: Any) -> Fixtures:
    """
    Validate a decoded fixtures document.

    @raise FixturesError: naming the first problem found.
    """
    if not isinstance(document, dict):
        raise FixturesError("fixtures: the document must be a JSON object")
    if type(document.get("format")) is not int or document["format"] != 1:
        raise FixturesError("fixtures: unsupported format (expected \"format\": 1)")
    airline = _get(document, "airline", dict, "fixtures")
    code = _get(airline, "code", str, "airline")
    name = _get(airline, "name", str, "airline")
    currency = _get(airline, "currency", str, "airline")
    if not re.fullmatch(r"[A-Z]{3}", currency):
        raise FixturesError(f"airline: currency {currency!r} is not an ISO 4217 code")

    airports: dict[str, Airport] = {}
    for i, raw in enumerate(_get(document, "airports", list, "fixtures")):
        where = f"airports[{i}]"
        if not isinstance(raw, dict):
            raise FixturesError(f"{where}: must be an object")
        airport = Airport(
            code=_get(raw, "code", str, where),
            city=_get(raw, "city", str, where),
            name=_get(raw, "name", str, where),
            timezone=_get(raw, "timezone", str, where),
        )
        if not _IATA.fullmatch(airport.code):
            raise FixturesError(f"{where}: code {airport.code!r} is not a three-letter IATA code")
        if airport.code in airports:
            raise FixturesError(f"{where}: duplicate airport {airport.code}")
        try:
            ZoneInfo(airport.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise FixturesError(f"{where}: unknown time zone {airport.timezone!r}")
        airports[airport.code] = airport
    if not airports:
        raise FixturesError("fixtures: no airports")

    aircraft: dict[str, Aircraft] = {}
    for i, raw in enumerate(_get(document, "aircraft", list, "fixtures")):
        where = f"aircraft[{i}]"
        if not isinstance(raw, dict):
            raise FixturesError(f"{where}: must be an object")
        plane = Aircraft(
            type=_get(raw, "type", str, where),
            name=_get(raw, "name", str, where),
            rows=_get(raw, "rows", int, where),
            letters=_get(raw, "letters", str, where),
        )
        if plane.type in aircraft:
            raise FixturesError(f"{where}: duplicate aircraft type {plane.type}")
        if not 1 <= plane.rows <= 99:
            raise FixturesError(f"{where}: rows must be between 1 and 99")
        if not _LETTERS.fullmatch(plane.letters) or len(set(plane.letters)) != len(plane.letters):
            raise FixturesError(f"{where}: letters must be distinct capital letters")
        aircraft[plane.type] = plane

    timetable: list[TimetableEntry] = []
    numbers: set[str] = set()
    for i, raw in enumerate(_get(document, "timetable", list, "fixtures")):
        where = f"timetable[{i}]"
        if not isinstance(raw, dict):
            raise FixturesError(f"{where}: must be an object")
        number = _get(raw, "flight", str, where)
        where = f"timetable[{i}] ({number})"
        if not _FLIGHT.fullmatch(number):
            raise FixturesError(f"{where}: bad flight number")
        if number in numbers:
            raise FixturesError(f"{where}: duplicate flight number {number}")
        numbers.add(number)
        origin = _get(raw, "origin", str, where)
        destination = _get(raw, "destination", str, where)
        for airport_code in (origin, destination):
            if airport_code not in airports:
                raise FixturesError(f"{where}: unknown airport {airport_code!r}")
        if origin == destination:
            raise FixturesError(f"{where}: origin and destination are the same")
        departure = _get(raw, "departure", str, where)
        hhmm = _HHMM.fullmatch(departure)
        if hhmm is None:
            raise FixturesError(f"{where}: bad departure time {departure!r} (expected HH:MM)")
        duration = _get(raw, "duration_minutes", int, where)
        if not 10 <= duration <= 24 * 60:
            raise FixturesError(f"{where}: duration_minutes must be between 10 and 1440")
        days = _get(raw, "days", list, where)
        if not days or any(type(d) is not int or d not in range(1, 8) for d in days):
            raise FixturesError(f"{where}: days must list ISO weekdays 1 (Monday) to 7 (Sunday)")
        plane_type = _get(raw, "aircraft", str, where)
        if plane_type not in aircraft:
            raise FixturesError(f"{where}: unknown aircraft {plane_type!r}")
        try:
            fare = Money.parse(_get(raw, "fare", str, where), currency)
        except ValueError as e:
            raise FixturesError(f"{where}: {e}")
        timetable.append(
            TimetableEntry(
                flight=number,
                origin=origin,
                destination=destination,
                departure=time(int(hhmm.group(1)), int(hhmm.group(2))),
                duration_minutes=duration,
                days=frozenset(days),
                aircraft=plane_type,
                fare=fare,
            )
        )

    customers: list[Customer] = []
    raw_customers = document.get("customers", [])
    if not isinstance(raw_customers, list):
        raise FixturesError("fixtures: field 'customers' must be list")
    for i, raw in enumerate(raw_customers):
        where = f"customers[{i}]"
        if not isinstance(raw, dict):
            raise FixturesError(f"{where}: must be an object")
        customer = Customer(_get(raw, "username", str, where), _get(raw, "password", str, where))
        if not USERNAME.fullmatch(customer.username):
            raise FixturesError(f"{where}: bad username {customer.username!r}")
        if any(c.username == customer.username for c in customers):
            raise FixturesError(f"{where}: duplicate username {customer.username!r}")
        if not 8 <= len(customer.password) <= 256:
            raise FixturesError(f"{where}: password must have 8 to 256 characters")
        customers.append(customer)

    network = Network(
        airline_code=code,
        airline_name=name,
        currency=currency,
        airports=airports,
        aircraft=aircraft,
        timetable=tuple(timetable),
    )
    return Fixtures(network, tuple(customers))


def load(path: str | Path) -> Fixtures:
    """
    Read and validate a fixtures file.

    @raise FixturesError: if it cannot be read or is not valid.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FixturesError(f"cannot read fixtures file {path}: {e}")
    try:
        document = json.loads(text)
    except ValueError as e:
        raise FixturesError(f"fixtures file {path} is not valid JSON: {e}")
    return parse(document)
