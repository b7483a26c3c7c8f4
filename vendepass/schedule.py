"""
Flight instances generated from the timetable, and route search over them.

Flight instances are not stored: they follow from the timetable and a date,
so C{VP1203-2026-12-01} means "timetable entry VP1203 departing on 1 December
2026, local time at its origin". The schedule only offers flights inside the
rolling sales window; flights that have departed are never offered.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from typing import Iterator
from zoneinfo import ZoneInfo

from attrs import frozen

from vendepass.errors import FlightDeparted, InvalidItinerary, UnknownFlight, echo
from vendepass.model import Flight, Network, TimetableEntry

MIN_CONNECTION = timedelta(minutes=45)
MAX_CONNECTION = timedelta(hours=12)


def _instance(network: Network, entry: TimetableEntry, day: date) -> Flight:
    origin = network.airports[entry.origin]
    destination = network.airports[entry.destination]
    departure = datetime.combine(day, entry.departure, tzinfo=ZoneInfo(origin.timezone))
    arrival = (departure + timedelta(minutes=entry.duration_minutes)).astimezone(
        ZoneInfo(destination.timezone)
    )
    return Flight(
        flight_id=f"{entry.flight}-{day.isoformat()}",
        number=entry.flight,
        origin=entry.origin,
        destination=entry.destination,
        departure=departure,
        arrival=arrival,
        aircraft=network.aircraft[entry.aircraft],
        fare=entry.fare,
    )


def flight_by_id(network: Network, flight_id: str) -> Flight:
    """
    The flight instance named C{flight_id} (C{<number>-<YYYY-MM-DD>}), on any
    date on which its timetable entry flies, inside the sales window or not.

    @raise UnknownFlight: if the timetable has no such flight on that date.
    """
    number, _, day_text = flight_id.partition("-")
    try:
        day = date.fromisoformat(day_text)
    except ValueError:
        raise UnknownFlight(f"Unknown flight {echo(flight_id)!r}.", flight=flight_id)
    for entry in network.timetable:
        if entry.flight == number and day.isoweekday() in entry.days and day.isoformat() == day_text:
            return _instance(network, entry, day)
    raise UnknownFlight(f"Unknown flight {echo(flight_id)!r}.", flight=flight_id)


@frozen
class Schedule:
    """
    The bookable flights of a sales window: from the day before C{start}
    (time zones) to C{days} days after it.

    Build it with L{Schedule.build}; rebuild it as time goes by.
    """

    network: Network
    first_day: date
    last_day: date
    by_id: dict[str, Flight]
    by_origin: dict[str, tuple[Flight, ...]]
    departures: dict[str, tuple[float, ...]]

    @classmethod
    def build(cls, network: Network, now: float, days: int) -> Schedule:
        today = datetime.fromtimestamp(now, timezone.utc).date()
        first_day = today - timedelta(days=1)
        last_day = today + timedelta(days=days)
        by_id: dict[str, Flight] = {}
        by_origin: dict[str, list[Flight]] = defaultdict(list)
        day = first_day
        while day <= last_day:
            for entry in network.timetable:
                if day.isoweekday() in entry.days:
                    flight = _instance(network, entry, day)
                    by_id[flight.flight_id] = flight
                    by_origin[flight.origin].append(flight)
            day += timedelta(days=1)
        origins = {code: tuple(sorted(flights, key=lambda f: f.departs_ts)) for code, flights in by_origin.items()}
        return cls(
            network=network,
            first_day=first_day,
            last_day=last_day,
            by_id=by_id,
            by_origin=origins,
            departures={code: tuple(f.departs_ts for f in flights) for code, flights in origins.items()},
        )

    def flight(self, flight_id: str, now: float) -> Flight:
        """
        A bookable flight.

        @raise UnknownFlight: if there is no such flight in the sales window.
        @raise FlightDeparted: if it has departed.
        """
        flight = self.by_id.get(flight_id)
        if flight is None:
            raise UnknownFlight(f"Unknown flight {echo(flight_id)!r}.", flight=flight_id)
        if flight.departs_ts <= now:
            raise FlightDeparted(f"Flight {flight_id} has already departed.", flight=flight_id)
        return flight

    def itinerary(self, flight_ids: list[str], now: float, max_legs: int) -> tuple[Flight, ...]:
        """
        Check that C{flight_ids} form one itinerary: bookable flights, each
        leaving from where the previous one landed, with at least
        L{MIN_CONNECTION} and at most L{MAX_CONNECTION} between them.
        """
        if not flight_ids:
            raise InvalidItinerary("An itinerary needs at least one flight.")
        if len(flight_ids) > max_legs:
            raise InvalidItinerary(f"An itinerary has at most {max_legs} flights.")
        legs = tuple(self.flight(flight_id, now) for flight_id in flight_ids)
        visited = {legs[0].origin}
        for previous, leg in zip(legs, legs[1:]):
            if leg.origin != previous.destination:
                raise InvalidItinerary(
                    f"Flight {leg.flight_id} leaves from {leg.origin}, not from {previous.destination}."
                )
            gap = leg.departure - previous.arrival
            if not MIN_CONNECTION <= gap <= MAX_CONNECTION:
                raise InvalidItinerary(
                    f"The connection from {previous.flight_id} to {leg.flight_id} must be between "
                    f"{int(MIN_CONNECTION.total_seconds() // 60)} minutes and "
                    f"{int(MAX_CONNECTION.total_seconds() // 3600)} hours."
                )
            if previous.destination in visited:
                raise InvalidItinerary("An itinerary cannot pass through the same airport twice.")
            visited.add(previous.destination)
        if legs[-1].destination in visited:
            raise InvalidItinerary("An itinerary cannot pass through the same airport twice.")
        return legs

    def _leaving(self, airport: str, after: float, before: float) -> Iterator[Flight]:
        flights = self.by_origin.get(airport, ())
        times = self.departures.get(airport, ())
        start = bisect.bisect_right(times, after)
        for i in range(start, len(flights)):
            if times[i] > before:
                break
            yield flights[i]

    def search(
        self, origin: str, destination: str, now: float, on: date | None, max_legs: int
    ) -> Iterator[tuple[Flight, ...]]:
        """
        Every itinerary from C{origin} to C{destination} of at most
        C{max_legs} legs whose first flight departs after C{now} (and on
        local date C{on} at the origin, if given), in order of departure.
        """
        first_legs = (f for f in self.by_origin.get(origin, ()) if f.departs_ts > now)
        if on is not None:
            first_legs = (f for f in first_legs if f.departure.date() == on)
        min_gap = MIN_CONNECTION.total_seconds()
        max_gap = MAX_CONNECTION.total_seconds()

        def extend(path: tuple[Flight, ...], visited: frozenset[str]) -> Iterator[tuple[Flight, ...]]:
            last = path[-1]
            if last.destination == destination:
                yield path
                return
            if len(path) == max_legs:
                return
            arrival = last.arrives_ts
            for leg in self._leaving(last.destination, arrival + min_gap - 1e-6, arrival + max_gap):
                if leg.destination not in visited:
                    yield from extend(path + (leg,), visited | {leg.destination})

        for first in first_legs:
            if first.destination == origin:
                continue
            yield from extend((first,), frozenset((origin, first.destination)))
