"""
The wire forms of values, and the search answer encoded from templates.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from vendepass import wire
from vendepass.fixtures import BUNDLED, load
from vendepass.model import Itinerary
from vendepass.schedule import Schedule

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

    def test_every_leg_count(self) -> None:
        self.assertEqual({len(path) for path in PATHS}, {1, 2, 3})
