"""
Tests of L{vendepass.schedule}: flight instances from the timetable, their
local times, itinerary rules and route search.
"""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.common import BIG, DIRECT, MINI, NO_SUCH_DAY, START, TINY
from vendepass.errors import FlightDeparted, InvalidItinerary, UnknownFlight
from vendepass.fixtures import load, parse
from vendepass.model import Flight, Network
from vendepass.schedule import MAX_CONNECTION, MIN_CONNECTION, Schedule, flight_by_id

MINI_NETWORK = load(MINI).network

EVERY_DAY = [1, 2, 3, 4, 5, 6, 7]


def _entry(flight: str, origin: str, destination: str, departure: str, minutes: int, days: list[int] = EVERY_DAY) -> dict[str, Any]:
    return {
        "flight": flight,
        "origin": origin,
        "destination": destination,
        "departure": departure,
        "duration_minutes": minutes,
        "days": days,
        "aircraft": "E195",
        "fare": "100.00",
    }


# Connections at REC around the 45-minute and 12-hour limits. XY1 lands in
# Recife at 09:15 local every day.
EDGES: dict[str, Any] = {
    "format": 1,
    "airline": {"code": "XY", "name": "Edge Air", "currency": "BRL"},
    "airports": [
        {"code": "SSA", "city": "Salvador", "name": "Salvador", "timezone": "America/Bahia"},
        {"code": "REC", "city": "Recife", "name": "Recife", "timezone": "America/Recife"},
        {"code": "MAO", "city": "Manaus", "name": "Manaus", "timezone": "America/Manaus"},
        {"code": "GRU", "city": "São Paulo", "name": "Guarulhos", "timezone": "America/Sao_Paulo"},
        {"code": "FOR", "city": "Fortaleza", "name": "Fortaleza", "timezone": "America/Fortaleza"},
    ],
    "aircraft": [{"type": "E195", "name": "Embraer E195", "rows": 28, "letters": "ABCD"}],
    "timetable": [
        _entry("XY1", "SSA", "REC", "08:00", 75),
        _entry("XY2", "REC", "MAO", "09:59", 240),  # 44 minutes after XY1
        _entry("XY3", "REC", "MAO", "10:00", 240),  # 45 minutes
        _entry("XY4", "REC", "FOR", "21:15", 60),  # 12 hours
        _entry("XY5", "REC", "GRU", "21:16", 180),  # 12 hours and a minute
        _entry("XY6", "GRU", "MAO", "19:30", 240),  # the example of docs/fixtures.md
        _entry("XY7", "GRU", "MAO", "23:00", 180),  # lands the next day
        _entry("XY8", "MAO", "SSA", "18:00", 200),
        _entry("XY9", "FOR", "MAO", "23:30", 180),
    ],
}
EDGES_NETWORK = parse(copy.deepcopy(EDGES)).network


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=timezone.utc).timestamp()


class FlightInstanceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.schedule = Schedule.build(MINI_NETWORK, START, 30)

    def test_window(self) -> None:
        """
        The window runs from the day before today (UTC) to 30 days after.
        """
        self.assertEqual(self.schedule.first_day, date(2026, 11, 30))
        self.assertEqual(self.schedule.last_day, date(2026, 12, 31))
        for flight_id in ("VP100-2026-11-30", "VP100-2026-12-01", TINY, "VP100-2026-12-31"):
            self.assertIn(flight_id, self.schedule.by_id)
        for flight_id in ("VP100-2026-11-29", "VP100-2027-01-01", NO_SUCH_DAY):
            self.assertNotIn(flight_id, self.schedule.by_id)
        self.assertEqual(len([f for f in self.schedule.by_id if f.startswith("VP100-")]), 32)

    def test_window_moves(self) -> None:
        later = Schedule.build(MINI_NETWORK, at(2026, 12, 2), 30)
        self.assertEqual(later.first_day, date(2026, 12, 1))
        self.assertIn("VP100-2027-01-01", later.by_id)
        self.assertNotIn("VP100-2026-11-30", later.by_id)
        short = Schedule.build(MINI_NETWORK, START, 7)
        self.assertEqual(short.last_day, date(2026, 12, 8))

    def test_ids(self) -> None:
        """
        A flight id is its number and its local departure date at the origin.
        """
        for flight_id, flight in self.schedule.by_id.items():
            self.assertEqual(flight.flight_id, flight_id)
            self.assertEqual(flight_id, f"{flight.number}-{flight.departure.date().isoformat()}")

    def test_local_times(self) -> None:
        """
        Departures are local times at the origin (Salvador UTC-3, Manaus UTC-4).
        """
        tiny = self.schedule.by_id[TINY]
        self.assertEqual(tiny.departure.isoformat(), "2026-12-02T08:00:00-03:00")
        self.assertEqual(tiny.departure.utcoffset(), timedelta(hours=-3))
        self.assertEqual(tiny.departs_ts, at(2026, 12, 2, 11))
        manaus = self.schedule.by_id["VP201-2026-12-02"]
        self.assertEqual(manaus.origin, "MAO")
        self.assertEqual(manaus.departure.isoformat(), "2026-12-02T07:00:00-04:00")
        self.assertEqual(manaus.departure.utcoffset(), timedelta(hours=-4))
        self.assertEqual(manaus.departs_ts, at(2026, 12, 2, 11))
        # Same local clock time, one hour apart in absolute time.
        self.assertEqual(
            self.schedule.by_id["VP300-2026-12-03"].departure.astimezone(timezone.utc),
            datetime(2026, 12, 3, 17, tzinfo=timezone.utc),
        )

    def test_arrival(self) -> None:
        """
        Arrival is departure plus the duration, in the destination's zone.
        """
        big = self.schedule.by_id[BIG]
        self.assertEqual(big.departure.isoformat(), "2026-12-02T11:00:00-03:00")
        self.assertEqual(big.arrival.isoformat(), "2026-12-02T14:00:00-04:00")
        direct = self.schedule.by_id[DIRECT]
        self.assertEqual(direct.arrival.isoformat(), "2026-12-03T16:30:00-04:00")
        self.assertEqual(self.schedule.by_id[TINY].arrival.isoformat(), "2026-12-02T09:15:00-03:00")
        durations = {e.flight: e.duration_minutes for e in MINI_NETWORK.timetable}
        zones = {code: a.timezone for code, a in MINI_NETWORK.airports.items()}
        for flight in self.schedule.by_id.values():
            self.assertEqual(flight.arrival - flight.departure, timedelta(minutes=durations[flight.number]))
            self.assertEqual(flight.arrives_ts - flight.departs_ts, 60 * durations[flight.number])
            self.assertEqual(str(flight.departure.tzinfo), zones[flight.origin])
            self.assertEqual(str(flight.arrival.tzinfo), zones[flight.destination])

    def test_arrival_examples(self) -> None:
        schedule = Schedule.build(EDGES_NETWORK, START, 30)
        # GRU (UTC-3) 19:30 + 240 minutes = 22:30 in Manaus (UTC-4).
        self.assertEqual(schedule.by_id["XY6-2026-12-02"].arrival.isoformat(), "2026-12-02T22:30:00-04:00")
        # GRU 23:00 + 180 minutes = 01:00 the next day in Manaus.
        self.assertEqual(schedule.by_id["XY7-2026-12-02"].arrival.isoformat(), "2026-12-03T01:00:00-04:00")

    def test_weekdays(self) -> None:
        """
        A flight exists only on the weekdays of its timetable entry (of
        its local departure date).
        """
        vp300 = [f for f in self.schedule.by_id.values() if f.number == "VP300"]
        self.assertEqual({f.departure.isoweekday() for f in vp300}, {2, 4, 6})
        # December 2026: five Tuesdays, five Thursdays, four Saturdays.
        self.assertEqual(len(vp300), 14)
        self.assertIn("VP300-2026-12-01", self.schedule.by_id)
        self.assertNotIn("VP300-2026-11-30", self.schedule.by_id)
        self.assertNotIn("VP300-2026-12-06", self.schedule.by_id)

    def test_by_origin_sorted(self) -> None:
        for code, flights in self.schedule.by_origin.items():
            self.assertEqual({f.origin for f in flights}, {code})
            times = [f.departs_ts for f in flights]
            self.assertEqual(times, sorted(times))
            self.assertEqual(tuple(times), self.schedule.departures[code])
        self.assertEqual(
            sum(len(flights) for flights in self.schedule.by_origin.values()), len(self.schedule.by_id)
        )

    def test_flight(self) -> None:
        self.assertEqual(self.schedule.flight(TINY, START).flight_id, TINY)
        error = self.assertRaises(UnknownFlight, self.schedule.flight, "VP100-2027-01-01", START)
        self.assertEqual(error.details, {"flight": "VP100-2027-01-01"})
        self.assertRaises(UnknownFlight, self.schedule.flight, NO_SUCH_DAY, START)
        tiny = self.schedule.by_id[TINY]
        self.schedule.flight(TINY, tiny.departs_ts - 1)
        error = self.assertRaises(FlightDeparted, self.schedule.flight, TINY, tiny.departs_ts)
        self.assertEqual(error.details, {"flight": TINY})
        self.assertRaises(FlightDeparted, self.schedule.flight, "VP100-2026-11-30", START)


class FlightByIdTests(SynchronousTestCase):
    def test_in_window(self) -> None:
        schedule = Schedule.build(MINI_NETWORK, START, 30)
        for flight_id in (TINY, BIG, DIRECT, "VP201-2026-12-31"):
            self.assertEqual(flight_by_id(MINI_NETWORK, flight_id), schedule.by_id[flight_id])

    def test_any_date(self) -> None:
        """
        Outside the sales window too (a ticket's flight, years later).
        """
        flight = flight_by_id(MINI_NETWORK, "VP300-2030-06-01")
        self.assertEqual(flight.departure.isoformat(), "2030-06-01T14:00:00-03:00")
        self.assertEqual(flight.departure.isoweekday(), 6)
        self.assertEqual(flight.arrival.isoformat(), "2030-06-01T16:30:00-04:00")

    def test_unknown(self) -> None:
        for flight_id in (
            NO_SUCH_DAY,  # VP300 does not fly on Wednesdays
            "VP999-2026-12-02",
            "VP100",
            "VP100-",
            "",
            "VP100-2026-02-30",
            "VP100-2026-12-2",
            "VP100-20261202",
            "VP100-2026-12-02T08:00",
            "VP100-2026-12-02x",
            "vp100-2026-12-02",
            "VP100-2026-W49-3",
        ):
            error = self.assertRaises(UnknownFlight, flight_by_id, MINI_NETWORK, flight_id)
            self.assertEqual(error.details, {"flight": flight_id})

    @given(st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 12, 31)))
    def test_weekday_property(self, day: date) -> None:
        flight_id = f"VP300-{day.isoformat()}"
        if day.isoweekday() in (2, 4, 6):
            flight = flight_by_id(MINI_NETWORK, flight_id)
            self.assertEqual(flight.departure.date(), day)
            self.assertEqual(flight.departure.strftime("%H:%M"), "14:00")
            self.assertEqual(flight.arrival - flight.departure, timedelta(minutes=210))
        else:
            self.assertRaises(UnknownFlight, flight_by_id, MINI_NETWORK, flight_id)


class ItineraryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.schedule = Schedule.build(MINI_NETWORK, START, 30)
        self.edges = Schedule.build(EDGES_NETWORK, START, 30)

    def test_valid(self) -> None:
        legs = self.schedule.itinerary([TINY, BIG], START, 3)
        self.assertEqual(legs, (self.schedule.by_id[TINY], self.schedule.by_id[BIG]))
        self.assertEqual(self.schedule.itinerary([DIRECT], START, 1), (self.schedule.by_id[DIRECT],))

    def test_empty(self) -> None:
        self.assertRaises(InvalidItinerary, self.schedule.itinerary, [], START, 3)

    def test_too_many_legs(self) -> None:
        self.assertRaises(InvalidItinerary, self.schedule.itinerary, [TINY, BIG], START, 1)
        # Checked before anything else: even unknown flights.
        self.assertRaises(InvalidItinerary, self.schedule.itinerary, ["X-1", "X-2", "X-3", "X-4"], START, 3)
        four = ["XY1-2026-12-02", "XY4-2026-12-02", "XY9-2026-12-02", "XY8-2026-12-04"]
        self.assertRaises(InvalidItinerary, self.edges.itinerary, four, START, 3)

    def test_disconnected(self) -> None:
        # BIG lands in Manaus; DIRECT leaves Salvador.
        error = self.assertRaises(InvalidItinerary, self.schedule.itinerary, [BIG, DIRECT], START, 3)
        self.assertIn("leaves from SSA, not from MAO", error.message)
        self.assertRaises(InvalidItinerary, self.schedule.itinerary, [BIG, TINY], START, 3)

    def test_connection_too_short(self) -> None:
        error = self.assertRaises(
            InvalidItinerary, self.edges.itinerary, ["XY1-2026-12-02", "XY2-2026-12-02"], START, 3
        )
        self.assertIn("45 minutes", error.message)
        legs = self.edges.itinerary(["XY1-2026-12-02", "XY3-2026-12-02"], START, 3)
        self.assertEqual(legs[1].departure - legs[0].arrival, MIN_CONNECTION)

    def test_connection_too_long(self) -> None:
        legs = self.edges.itinerary(["XY1-2026-12-02", "XY4-2026-12-02"], START, 3)
        self.assertEqual(legs[1].departure - legs[0].arrival, MAX_CONNECTION)
        self.assertRaises(
            InvalidItinerary, self.edges.itinerary, ["XY1-2026-12-02", "XY5-2026-12-02"], START, 3
        )
        # The next day's flight is more than 12 hours later.
        self.assertRaises(InvalidItinerary, self.schedule.itinerary, ["VP100-2026-12-01", BIG], START, 3)

    def test_connection_backwards(self) -> None:
        """
        The next leg cannot leave before the previous one lands.
        """
        self.assertRaises(InvalidItinerary, self.schedule.itinerary, ["VP100-2026-12-03", BIG], START, 3)

    def test_same_airport_twice(self) -> None:
        # SSA -> REC at 08:00, REC -> SSA at 18:00: a round trip, not an itinerary.
        error = self.assertRaises(
            InvalidItinerary, self.schedule.itinerary, [TINY, "VP101-2026-12-02"], START, 3
        )
        self.assertIn("same airport twice", error.message)
        # SSA -> REC -> FOR -> MAO is fine; ... -> MAO -> SSA would come back.
        self.edges.itinerary(["XY1-2026-12-02", "XY4-2026-12-02", "XY9-2026-12-02"], START, 3)
        error = self.assertRaises(
            InvalidItinerary,
            self.edges.itinerary,
            ["XY1-2026-12-02", "XY3-2026-12-02", "XY8-2026-12-02"],
            START,
            3,
        )
        self.assertIn("same airport twice", error.message)
        # Without its last leg it is fine.
        self.edges.itinerary(["XY1-2026-12-02", "XY3-2026-12-02"], START, 3)

    def test_unknown_and_departed_legs(self) -> None:
        self.assertRaises(UnknownFlight, self.schedule.itinerary, [TINY, NO_SUCH_DAY], START, 3)
        self.assertRaises(
            FlightDeparted, self.schedule.itinerary, [TINY, BIG], self.schedule.by_id[TINY].departs_ts, 3
        )


def _brute_force(schedule: Schedule, origin: str, destination: str, now: float, on: date | None, max_legs: int) -> set[tuple[str, ...]]:
    """
    Every itinerary by enumeration, each checked by L{Schedule.itinerary}.
    """
    found: set[tuple[str, ...]] = set()
    flights = list(schedule.by_id.values())

    def walk(path: list[Flight]) -> Iterator[list[Flight]]:
        yield path
        if len(path) < max_legs:
            for flight in flights:
                if flight.origin == path[-1].destination:
                    yield from walk(path + [flight])

    for first in flights:
        if first.origin != origin or first.departs_ts <= now:
            continue
        if on is not None and first.departure.date() != on:
            continue
        for path in walk([first]):
            if path[-1].destination != destination:
                continue
            ids = [f.flight_id for f in path]
            try:
                schedule.itinerary(ids, now, max_legs)
            except (InvalidItinerary, FlightDeparted):
                continue
            found.add(tuple(ids))
    return found


class SearchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.schedule = Schedule.build(MINI_NETWORK, START, 30)

    def ids(self, *args: Any) -> list[tuple[str, ...]]:
        return [tuple(f.flight_id for f in path) for path in self.schedule.search(*args)]

    def test_direct_and_via_hub(self) -> None:
        self.assertEqual(
            self.ids("SSA", "MAO", START, date(2026, 12, 3), 3),
            [("VP100-2026-12-03", "VP200-2026-12-03"), ("VP300-2026-12-03",)],
        )
        self.assertEqual(self.ids("SSA", "MAO", START, date(2026, 12, 3), 1), [("VP300-2026-12-03",)])
        self.assertEqual(self.ids("SSA", "MAO", START, date(2026, 12, 2), 3), [(TINY, BIG)])

    def test_departed_not_offered(self) -> None:
        today = date(2026, 12, 1)
        self.assertEqual(len(self.ids("SSA", "MAO", START, today, 3)), 2)
        tiny_today = self.schedule.by_id["VP100-2026-12-01"]
        self.assertEqual(self.ids("SSA", "MAO", tiny_today.departs_ts, today, 3), [("VP300-2026-12-01",)])

    def test_order(self) -> None:
        paths = list(self.schedule.search("SSA", "MAO", START, None, 3))
        self.assertTrue(len(paths) > 30)
        firsts = [path[0].departs_ts for path in paths]
        self.assertEqual(firsts, sorted(firsts))

    def test_no_round_trips(self) -> None:
        self.assertEqual(self.ids("SSA", "SSA", START, None, 3), [])

    @settings(max_examples=60)
    @given(
        network=st.sampled_from([MINI_NETWORK, EDGES_NETWORK]),
        pair=st.tuples(st.sampled_from(["SSA", "REC", "MAO", "GRU", "FOR"]), st.sampled_from(["SSA", "REC", "MAO", "GRU", "FOR"])),
        hours=st.integers(min_value=0, max_value=60),
        on=st.one_of(st.none(), st.dates(min_value=date(2026, 11, 30), max_value=date(2026, 12, 5))),
        max_legs=st.integers(min_value=1, max_value=3),
    )
    def test_search_finds_exactly_the_valid_itineraries(
        self, network: Network, pair: tuple[str, str], hours: int, on: date | None, max_legs: int
    ) -> None:
        """
        Search finds every valid itinerary (as enumerated by brute force and
        checked by L{Schedule.itinerary}) and nothing else, first legs in
        order of departure.
        """
        origin, destination = pair
        if origin not in network.airports or destination not in network.airports:
            return
        schedule = Schedule.build(network, START, 4)
        now = START + hours * 3600
        paths = list(schedule.search(origin, destination, now, on, max_legs))
        ids = [tuple(f.flight_id for f in path) for path in paths]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(set(ids), _brute_force(schedule, origin, destination, now, on, max_legs))
        firsts = [path[0].departs_ts for path in paths]
        self.assertEqual(firsts, sorted(firsts))
