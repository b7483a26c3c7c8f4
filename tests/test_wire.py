"""
The wire forms of values, and the search answer encoded from templates.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from vendepass import wire
from vendepass.fixtures import BUNDLED, load
from vendepass.model import (
    Aircraft,
    Flight,
    HeldSeat,
    Hold,
    Itinerary,
    Money,
    SeatMap,
    SeatState,
    Ticket,
    TicketLeg,
    iso_utc,
)
from vendepass.schedule import Schedule
from vendepass.service import SearchPage

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc).timestamp()
SCHEDULE = Schedule.build(load(BUNDLED).network, NOW, 30)
PATHS = [
    path
    for origin, destination in [("SSA", "MAO"), ("POA", "BEL"), ("GRU", "REC"), ("FOR", "CWB")]
    for path in SCHEDULE.search(origin, destination, NOW, None, 3)
]


class ItinerariesTests(SynchronousTestCase):
    @settings(max_examples=200)
    @given(
        st.lists(
            st.tuples(st.sampled_from(PATHS), st.lists(st.integers(0, 500), min_size=3, max_size=3)),
            max_size=20,
        )
    )
    def test_same_as_encoding_each(self, chosen: list[tuple[tuple, list[int]]]) -> None:  # type: ignore[type-arg]
        """
        The templated answer decodes to exactly what encoding each
        itinerary's wire form gives.
        """
        itineraries = [Itinerary(path, tuple(free[: len(path)])) for path, free in chosen]
        raw = wire.itineraries(itineraries)
        self.assertIsInstance(raw, wire.RawJSON)
        self.assertEqual(json.loads(raw), {"itineraries": [wire.itinerary(i) for i in itineraries]})

    @settings(max_examples=50)
    @given(
        st.lists(st.sampled_from(PATHS), max_size=5),
        st.one_of(st.none(), st.integers(1, 5000)),
        st.dates(date(2026, 1, 1), date(2027, 12, 31)),
    )
    def test_search_page(self, paths: list[tuple], next_offset: int | None, first: date) -> None:  # type: ignore[type-arg]
        """
        A search answer: its itineraries, the sales window, and
        C{next_offset} only when it was cut; encoded once.
        """
        itineraries = [Itinerary(path, (3, 2, 1)[: len(path)]) for path in paths]
        page = SearchPage(itineraries, next_offset, (first, first + timedelta(days=31)))
        raw = wire.search_page(page)
        self.assertIsInstance(raw, wire.RawJSON)
        expected: dict[str, object] = {
            "itineraries": [wire.itinerary(i) for i in itineraries],
            "sales_window": {"first": first.isoformat(), "last": (first + timedelta(days=31)).isoformat()},
        }
        if next_offset is not None:
            expected["next_offset"] = next_offset
        self.assertEqual(json.loads(raw), expected)
        self.assertIs(wire.search_page(page), raw)

    def test_every_leg_count(self) -> None:
        self.assertEqual({len(path) for path in PATHS}, {1, 2, 3})


class SeatMapTests(SynchronousTestCase):
    @settings(max_examples=100)
    @given(
        st.sampled_from(sorted(SCHEDULE.by_id)),
        st.lists(st.tuples(st.sampled_from(["free", "held", "sold"]), st.sampled_from([None, "alice", "bob"]))),
        st.sampled_from([None, "alice", "bob"]),
    )
    def test_same_as_encoding_each(
        self, flight_id: str, states: list[tuple[str, str | None]], username: str | None
    ) -> None:
        """
        The seat map assembled from cached parts decodes to exactly its
        documented form.
        """
        flight = SCHEDULE.by_id[flight_id]
        cabin = flight.aircraft.seats()
        seats = tuple(
            SeatState(seat, *states[i]) if i < len(states) and states[i][0] != "free" else SeatState(seat, "free")
            for i, seat in enumerate(cabin)
        )
        raw = wire.seatmap(SeatMap(flight, seats), username)
        self.assertIsInstance(raw, wire.RawJSON)
        self.assertEqual(
            json.loads(raw),
            {
                "flight": wire.flight(flight),
                "rows": flight.aircraft.rows,
                "letters": flight.aircraft.letters,
                "seats": [
                    {"seat": s.seat, "status": s.status, "mine": username is not None and s.owner == username}
                    for s in seats
                ],
            },
        )


class EncodedCacheTests(SynchronousTestCase):
    def test_bounded(self) -> None:
        """
        Encoded answers are kept up to ENCODED_BYTES of text, then forgotten;
        a list is only ever answered with its own encoding.
        """
        self.patch(wire, "ENCODED_BYTES", 10_000)
        self.patch(wire, "_ENCODED", {})
        self.patch(wire, "_encoded_bytes", 0)
        answers = [[Itinerary(path, (1, 1, 1)[: len(path)])] for path in PATHS[:50]]
        for answer in answers:
            raw = wire.itineraries(answer)
            self.assertIs(wire.itineraries(answer), raw)
            self.assertEqual(json.loads(raw)["itineraries"][0]["legs"][0]["flight"], answer[0].legs[0].flight_id)
        self.assertLessEqual(wire._encoded_bytes, 10_000)
        self.assertLessEqual(sum(len(raw) for _, raw in wire._ENCODED.values()), 10_000)


_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)


def _encoder_text(value: object) -> str:
    """
    The protocol encoder's text of a wire form.
    """
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class TimestampTests(SynchronousTestCase):
    @given(st.floats(min_value=-2e9, max_value=4e9, allow_nan=False))
    @settings(max_examples=500)
    def test_iso_utc_of_each_second(self, ts: float) -> None:
        """
        L{iso_utc}, which formats each second once, gives what a
        timestamp's own C{gmtime} gives: to the second, rounded down (before
        1970 too).
        """
        self.assertEqual(iso_utc(ts), datetime.fromtimestamp(ts // 1, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.assertEqual(iso_utc(1796320729.999999), "2026-12-03T17:58:49Z")
        self.assertEqual(iso_utc(-0.5), "1969-12-31T23:59:59Z")


class TicketJSONTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(
        st.builds(
            Ticket,
            ticket_id=_TEXT,
            username=_TEXT,
            status=st.sampled_from(["active", "cancelled"]),
            legs=st.lists(
                st.builds(
                    TicketLeg, _TEXT, _TEXT, _TEXT, _TEXT, _TEXT, _TEXT, _TEXT,
                    st.builds(Money, st.integers(0, 10**9), st.sampled_from(["BRL", "USD"])),
                ),
                max_size=3,
            ).map(tuple),
            price=st.builds(Money, st.integers(0, 10**9)),
            bought_at=st.integers(0, 2_000_000_000).map(float),
            cancelled_at=st.none() | st.integers(0, 2_000_000_000).map(float),
        )
    )
    def test_same_text_as_encoding(self, ticket: Ticket) -> None:
        """
        A ticket's pre-encoded JSON is byte for byte the protocol encoder's
        text of its wire form (quotes, escapes and non-ASCII included).
        """
        self.assertEqual(
            wire.ticket_json(ticket),
            _encoder_text(wire.ticket(ticket)),
        )


_ZONES = st.sampled_from([timezone.utc, timezone(timedelta(hours=-3)), timezone(timedelta(hours=5, minutes=30))])
_FLIGHTS = st.builds(
    Flight,
    flight_id=_TEXT,
    number=_TEXT,
    origin=_TEXT,
    destination=_TEXT,
    departure=st.datetimes(datetime(2000, 1, 1), datetime(2060, 1, 1), timezones=_ZONES),
    arrival=st.datetimes(datetime(2000, 1, 1), datetime(2060, 1, 1), timezones=_ZONES),
    aircraft=st.builds(Aircraft, _TEXT, _TEXT, st.integers(1, 60), st.sampled_from(["ABC", "ABCDEF"])),
    fare=st.builds(Money, st.integers(0, 10**9), st.sampled_from(["BRL", "USD"])),
)


class HoldJSONTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(
        st.builds(
            Hold,
            hold_id=_TEXT,
            username=_TEXT,
            legs=st.lists(st.builds(HeldSeat, _FLIGHTS, _TEXT), max_size=3).map(tuple),
            expires_at=st.integers(0, 2_000_000_000).map(float),
            price=st.builds(Money, st.integers(0, 10**9), st.sampled_from(["BRL", "USD"])),
        )
    )
    def test_same_text_as_encoding(self, hold: Hold) -> None:
        """
        A hold's pre-encoded JSON is byte for byte the protocol encoder's
        text of its wire form (quotes, escapes and non-ASCII included).
        """
        self.assertEqual(
            wire.hold_json(hold),
            _encoder_text(wire.hold(hold)),
        )

    def test_same_flight_other_seats(self) -> None:
        """
        The parts kept per flight carry no seat: two holds on one flight
        each say their own.
        """
        flight = SCHEDULE.by_id[sorted(SCHEDULE.by_id)[0]]
        for seat in ("1A", "2B", "1A"):
            hold = Hold("H1", "alice", (HeldSeat(flight, seat),), NOW, flight.fare)
            self.assertEqual(json.loads(wire.hold_json(hold))["legs"][0]["seat"], seat)
            self.assertEqual(json.loads(wire.hold_json(hold)), wire.hold(hold))
