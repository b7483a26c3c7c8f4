"""
Tests of L{vendepass.fixtures}: validation of fixtures documents (each kind
of bad field gives a L{FixturesError} naming the problem), reading files, and
the bundled airline.
"""

from __future__ import annotations

import copy
import json
from datetime import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.common import FAST_HASHER, START
from vendepass.errors import FixturesError
from vendepass.fixtures import BUNDLED, Customer, load, parse
from vendepass.model import Money
from vendepass.schedule import Schedule
from vendepass.store import InlineExecutor
from vendepass.store.sqlite import SQLiteStore

# The minimal example of docs/fixtures.md.
EXAMPLE: dict[str, Any] = {
    "format": 1,
    "airline": {"code": "XY", "name": "Example Air", "currency": "BRL"},
    "airports": [
        {"code": "SSA", "city": "Salvador", "name": "Aeroporto de Salvador", "timezone": "America/Bahia"},
        {"code": "REC", "city": "Recife", "name": "Aeroporto do Recife", "timezone": "America/Recife"},
    ],
    "aircraft": [{"type": "E195", "name": "Embraer E195", "rows": 28, "letters": "ABCD"}],
    "timetable": [
        {"flight": "XY100", "origin": "SSA", "destination": "REC", "departure": "08:00", "duration_minutes": 75,
         "days": [1, 2, 3, 4, 5, 6, 7], "aircraft": "E195", "fare": "249.90"},
        {"flight": "XY101", "origin": "REC", "destination": "SSA", "departure": "18:00", "duration_minutes": 75,
         "days": [1, 2, 3, 4, 5], "aircraft": "E195", "fare": "249.90"},
    ],
    "customers": [{"username": "demo", "password": "demo-password"}],
}


def example() -> dict[str, Any]:
    return copy.deepcopy(EXAMPLE)


REMOVE = object()


def with_(path: str, value: Any) -> dict[str, Any]:
    """
    The example with the field at C{path} (C{"timetable.0.days"}) set to
    C{value}, or removed if C{value} is L{REMOVE}.
    """
    document = example()
    *parents, last = path.split(".")
    target: Any = document
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    key: Any = int(last) if isinstance(target, list) else last
    if value is REMOVE:
        del target[key]
    else:
        target[key] = value
    return document



class ParseTests(SynchronousTestCase):
    def assertRejected(self, document: Any, message: str) -> None:
        """
        C{document} is refused with a L{FixturesError} whose message is
        exactly C{message}.
        """
        error = self.assertRaises(FixturesError, parse, document)
        self.assertEqual(str(error), message)

    def test_example(self) -> None:
        fixtures = parse(example())
        network = fixtures.network
        self.assertEqual((network.airline_code, network.airline_name, network.currency), ("XY", "Example Air", "BRL"))
        self.assertEqual(list(network.airports), ["SSA", "REC"])
        self.assertEqual(network.airports["REC"].timezone, "America/Recife")
        self.assertEqual(network.aircraft["E195"].capacity, 112)
        first, second = network.timetable
        self.assertEqual(first.flight, "XY100")
        self.assertEqual(first.departure, time(8, 0))
        self.assertEqual(first.days, frozenset(range(1, 8)))
        self.assertEqual(second.days, frozenset(range(1, 6)))
        self.assertEqual(first.fare, Money(24990, "BRL"))
        self.assertEqual(fixtures.customers, (Customer("demo", "demo-password"),))

    def test_limits_accepted(self) -> None:
        document = example()
        document["aircraft"] = [
            {"type": "ONE", "name": "One", "rows": 1, "letters": "A"},
            {"type": "BIG", "name": "Big", "rows": 99, "letters": "ABCDEFGHJK"},
        ]
        document["timetable"][0].update(departure="00:00", duration_minutes=10, aircraft="ONE", fare="0")
        document["timetable"][1].update(departure="23:59", duration_minutes=1440, aircraft="BIG", fare="12.5", days=[7])
        document["customers"] = [{"username": "abc", "password": "p" * 8}, {"username": "x" * 32, "password": "p" * 256}]
        document["unknown_field"] = "ignored"
        network = parse(document).network
        self.assertEqual(network.aircraft["BIG"].capacity, 990)
        self.assertEqual(network.timetable[0].fare, Money(0, "BRL"))
        self.assertEqual(network.timetable[1].fare, Money(1250, "BRL"))
        self.assertEqual(network.timetable[1].departure, time(23, 59))

    def test_customers_optional(self) -> None:
        document = example()
        del document["customers"]
        self.assertEqual(parse(document).customers, ())

    def test_document(self) -> None:
        self.assertRejected([], "fixtures: the document must be a JSON object")
        self.assertRejected("fixtures", "fixtures: the document must be a JSON object")
        self.assertRejected(None, "fixtures: the document must be a JSON object")

    def test_format(self) -> None:
        unsupported = 'fixtures: unsupported format (expected "format": 1)'
        self.assertRejected(with_("format", REMOVE), unsupported)
        self.assertRejected(with_("format", 2), unsupported)
        self.assertRejected(with_("format", "1"), unsupported)

    def test_format_must_be_the_integer_1(self) -> None:
        """
        "Integer" means a JSON integer, not a boolean or a float.
        """
        unsupported = 'fixtures: unsupported format (expected "format": 1)'
        self.assertRejected(with_("format", True), unsupported)
        self.assertRejected(with_("format", 1.0), unsupported)

    def test_airline(self) -> None:
        self.assertRejected(with_("airline", REMOVE), "fixtures: missing field 'airline'")
        self.assertRejected(with_("airline", ["XY"]), "fixtures: field 'airline' must be dict")
        self.assertRejected(with_("airline.code", REMOVE), "airline: missing field 'code'")
        self.assertRejected(with_("airline.name", 7), "airline: field 'name' must be str")
        self.assertRejected(with_("airline.currency", REMOVE), "airline: missing field 'currency'")
        for currency in ("brl", "REAL", "R$", ""):
            self.assertRejected(
                with_("airline.currency", currency), f"airline: currency {currency!r} is not an ISO 4217 code"
            )

    def test_airports(self) -> None:
        self.assertRejected(with_("airports", REMOVE), "fixtures: missing field 'airports'")
        self.assertRejected(with_("airports", {"SSA": {}}), "fixtures: field 'airports' must be list")
        self.assertRejected(with_("airports.1", "REC"), "airports[1]: must be an object")
        for name in ("code", "city", "name", "timezone"):
            self.assertRejected(with_(f"airports.1.{name}", REMOVE), f"airports[1]: missing field {name!r}")
            self.assertRejected(with_(f"airports.0.{name}", None), f"airports[0]: field {name!r} must be str")
        for code in ("ssa", "SS", "SSAX", "S1A", ""):
            self.assertRejected(
                with_("airports.0.code", code), f"airports[0]: code {code!r} is not a three-letter IATA code"
            )
        self.assertRejected(with_("airports.1.code", "SSA"), "airports[1]: duplicate airport SSA")
        for zone in ("America/Natal", "Mars/Olympus", "", "../etc/passwd"):
            self.assertRejected(with_("airports.0.timezone", zone), f"airports[0]: unknown time zone {zone!r}")

    def test_no_airports(self) -> None:
        document = with_("airports", [])
        document["timetable"] = []
        self.assertRejected(document, "fixtures: no airports")

    def test_time_zone_directory(self) -> None:
        """
        A time zone name that is a directory of the zone database (or too
        long to be a file name) is an unknown time zone too, not a crash.
        """
        self.assertRejected(with_("airports.0.timezone", "America"), "airports[0]: unknown time zone 'America'")
        long_name = "A" * 300
        self.assertRejected(with_("airports.0.timezone", long_name), f"airports[0]: unknown time zone {long_name!r}")

    def test_aircraft(self) -> None:
        self.assertRejected(with_("aircraft", REMOVE), "fixtures: missing field 'aircraft'")
        self.assertRejected(with_("aircraft", "E195"), "fixtures: field 'aircraft' must be list")
        self.assertRejected(with_("aircraft.0", ["E195"]), "aircraft[0]: must be an object")
        for name in ("type", "name", "rows", "letters"):
            self.assertRejected(with_(f"aircraft.0.{name}", REMOVE), f"aircraft[0]: missing field {name!r}")
        for rows in ("28", 28.0, True, None):
            self.assertRejected(with_("aircraft.0.rows", rows), "aircraft[0]: field 'rows' must be int")
        for rows in (0, -1, 100):
            self.assertRejected(with_("aircraft.0.rows", rows), "aircraft[0]: rows must be between 1 and 99")
        for letters in ("", "abcd", "ABCA", "AB CD", "ABCDEFGHIJK", "A1"):
            self.assertRejected(
                with_("aircraft.0.letters", letters), "aircraft[0]: letters must be distinct capital letters"
            )
        document = example()
        document["aircraft"].append(dict(document["aircraft"][0]))
        self.assertRejected(document, "aircraft[1]: duplicate aircraft type E195")

    def test_timetable(self) -> None:
        self.assertRejected(with_("timetable", REMOVE), "fixtures: missing field 'timetable'")
        self.assertRejected(with_("timetable", {}), "fixtures: field 'timetable' must be list")
        self.assertRejected(with_("timetable.0", "XY100"), "timetable[0]: must be an object")
        self.assertRejected(with_("timetable.0.flight", REMOVE), "timetable[0]: missing field 'flight'")
        self.assertRejected(with_("timetable.0.flight", 100), "timetable[0]: field 'flight' must be str")
        for name in ("origin", "destination", "departure", "duration_minutes", "days", "aircraft", "fare"):
            self.assertRejected(
                with_(f"timetable.1.{name}", REMOVE), f"timetable[1] (XY101): missing field {name!r}"
            )

    def test_flight_number(self) -> None:
        for number in ("xy100", "X", "XY12345", "XY", "XY-100", "XYZ100", "X1Y00", ""):
            self.assertRejected(
                with_("timetable.0.flight", number), f"timetable[0] ({number}): bad flight number"
            )
        self.assertRejected(
            with_("timetable.1.flight", "XY100"), "timetable[1] (XY100): duplicate flight number XY100"
        )

    def test_airports_of_flight(self) -> None:
        self.assertRejected(with_("timetable.0.origin", "SAA"), "timetable[0] (XY100): unknown airport 'SAA'")
        self.assertRejected(
            with_("timetable.1.destination", "GRU"), "timetable[1] (XY101): unknown airport 'GRU'"
        )
        self.assertRejected(with_("timetable.0.origin", ["SSA"]), "timetable[0] (XY100): field 'origin' must be str")
        self.assertRejected(
            with_("timetable.0.destination", "SSA"), "timetable[0] (XY100): origin and destination are the same"
        )

    def test_departure(self) -> None:
        for departure in ("8:00", "24:00", "12:60", "08:00:00", "0800", "08h00", ""):
            self.assertRejected(
                with_("timetable.0.departure", departure),
                f"timetable[0] (XY100): bad departure time {departure!r} (expected HH:MM)",
            )
        self.assertRejected(with_("timetable.0.departure", 800), "timetable[0] (XY100): field 'departure' must be str")

    def test_duration(self) -> None:
        for minutes in (9, 0, -75, 1441):
            self.assertRejected(
                with_("timetable.0.duration_minutes", minutes),
                "timetable[0] (XY100): duration_minutes must be between 10 and 1440",
            )
        for wrong in ("75", 75.0, True):
            self.assertRejected(
                with_("timetable.0.duration_minutes", wrong),
                "timetable[0] (XY100): field 'duration_minutes' must be int",
            )

    def test_days(self) -> None:
        message = "timetable[0] (XY100): days must list ISO weekdays 1 (Monday) to 7 (Sunday)"
        for days in ([], [0], [8], [1, 8], [True], ["1"], [None], [[1]]):
            self.assertRejected(with_("timetable.0.days", days), message)
        self.assertRejected(with_("timetable.0.days", "1234567"), "timetable[0] (XY100): field 'days' must be list")

    def test_days_must_be_integers(self) -> None:
        """
        C{1.0} is not an integer weekday. (Accepted, it would be stored as
        the text "1.0" and make the new database unreadable.)
        """
        message = "timetable[0] (XY100): days must list ISO weekdays 1 (Monday) to 7 (Sunday)"
        self.assertRejected(with_("timetable.0.days", [1.0, 2]), message)

    def test_flight_aircraft(self) -> None:
        self.assertRejected(
            with_("timetable.0.aircraft", "B737"), "timetable[0] (XY100): unknown aircraft 'B737'"
        )

    def test_fare(self) -> None:
        for number in (249.9, 249, None):
            self.assertRejected(with_("timetable.0.fare", number), "timetable[0] (XY100): field 'fare' must be str")
        for fare in ("249.999", "-1.00", "NaN", "Infinity", "-0.01"):
            self.assertRejected(
                with_("timetable.0.fare", fare),
                f"timetable[0] (XY100): not an amount with at most two decimals: {fare!r}",
            )
        for fare in ("abc", "", "1,00", "R$1"):
            self.assertRejected(
                with_("timetable.0.fare", fare), f"timetable[0] (XY100): not a decimal amount: {fare!r}"
            )

    def test_customers(self) -> None:
        self.assertRejected(with_("customers.0", "demo"), "customers[0]: must be an object")
        self.assertRejected(with_("customers.0.username", REMOVE), "customers[0]: missing field 'username'")
        self.assertRejected(with_("customers.0.password", 12345678), "customers[0]: field 'password' must be str")
        for username in ("Demo", "de", "d" * 33, "de mo", "demo!", "démo"):
            self.assertRejected(with_("customers.0.username", username), f"customers[0]: bad username {username!r}")
        for password in ("", "short", "p" * 257):
            self.assertRejected(
                with_("customers.0.password", password), "customers[0]: password must have 8 to 256 characters"
            )
        document = example()
        document["customers"].append({"username": "demo", "password": "other-password"})
        self.assertRejected(document, "customers[1]: duplicate username 'demo'")

    def test_customers_must_be_a_list(self) -> None:
        """
        C{customers}, if present, is an array: anything else is refused with
        a FixturesError (not a crash, and not silently ignored).
        """
        problems = []
        for customers in (5, None, {}, {"username": "demo"}, True):
            try:
                parse(with_("customers", customers))
            except FixturesError as e:
                if "customers" not in str(e):
                    problems.append(f"{customers!r}: FixturesError not naming customers: {e}")
            except Exception as e:
                problems.append(f"{customers!r}: {type(e).__name__}: {e}")
            else:
                problems.append(f"{customers!r}: accepted")
        self.assertEqual(problems, [])

    def test_no_trailing_newline(self) -> None:
        """
        A pattern-checked field with a trailing newline is refused: C{$} in a
        Python pattern matches before a final newline, which must not let
        C{"SSA\\n"} pass for an IATA code.
        """
        problems = []
        for path, value in [
            ("airline.currency", "BRL\n"),
            ("airports.0.code", "SSA\n"),
            ("aircraft.0.letters", "ABCD\n"),
            ("timetable.0.flight", "XY100\n"),
            ("timetable.0.departure", "08:00\n"),
            ("customers.0.username", "demo\n"),
        ]:
            try:
                parse(with_(path, value))
            except FixturesError:
                continue
            problems.append(f"{path} = {value!r} accepted")
        self.assertEqual(problems, [])

    @settings(max_examples=200)
    @given(
        path=st.sampled_from(
            [
                "format",
                "airline",
                "airline.code",
                "airline.currency",
                "airports",
                "airports.0",
                "airports.0.code",
                "airports.0.timezone",
                "aircraft",
                "aircraft.0",
                "aircraft.0.rows",
                "aircraft.0.letters",
                "timetable",
                "timetable.0",
                "timetable.0.flight",
                "timetable.0.origin",
                "timetable.0.departure",
                "timetable.0.duration_minutes",
                "timetable.0.days",
                "timetable.0.fare",
                "customers.0",
                "customers.0.username",
                "customers.0.password",
            ]
        ),
        value=st.recursive(
            st.none() | st.booleans() | st.integers(-10, 2000) | st.text(max_size=12),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=6,
        ),
    )
    def test_any_bad_value_is_a_fixtures_error(self, path: str, value: Any) -> None:
        """
        Whatever JSON value a field holds, parsing either succeeds or raises
        FixturesError (never another exception). (C{customers} itself is
        covered by L{test_customers_must_be_a_list}.)
        """
        try:
            parse(with_(path, value))
        except FixturesError:
            pass


class LoadTests(SynchronousTestCase):
    def write(self, content: bytes) -> Path:
        path = Path(self.mktemp())
        path.write_bytes(content)
        return path

    def test_load(self) -> None:
        path = self.write(json.dumps(EXAMPLE).encode("utf-8"))
        self.assertEqual(load(path), parse(example()))
        self.assertEqual(load(str(path)), parse(example()))

    def test_missing_file(self) -> None:
        path = Path(self.mktemp())
        error = self.assertRaises(FixturesError, load, path)
        self.assertIn(f"cannot read fixtures file {path}", str(error))

    def test_directory(self) -> None:
        path = Path(self.mktemp())
        path.mkdir()
        error = self.assertRaises(FixturesError, load, path)
        self.assertIn("cannot read fixtures file", str(error))

    def test_not_utf8(self) -> None:
        error = self.assertRaises(FixturesError, load, self.write(b'{"format": 1, "x": "\xff"}'))
        self.assertIn("cannot read fixtures file", str(error))

    def test_not_json(self) -> None:
        path = self.write(b'{"format": 1,')
        error = self.assertRaises(FixturesError, load, path)
        self.assertIn(f"fixtures file {path} is not valid JSON", str(error))

    def test_invalid_content(self) -> None:
        document = with_("timetable.0.origin", "SAA")
        error = self.assertRaises(FixturesError, load, self.write(json.dumps(document).encode()))
        self.assertEqual(str(error), "timetable[0] (XY100): unknown airport 'SAA'")


class BundledTests(SynchronousTestCase):
    """
    The airline shipped with VendePass.
    """

    def setUp(self) -> None:
        if not BUNDLED.exists():
            raise SkipTest(f"the bundled fixtures file {BUNDLED} is not there (yet)")
        self.fixtures = load(BUNDLED)
        self.network = self.fixtures.network

    def test_ten_airports(self) -> None:
        self.assertEqual(len(self.network.airports), 10)
        self.assertEqual(len({a.city for a in self.network.airports.values()}), 10)
        self.assertIn("MAO", self.network.airports)
        self.assertEqual(self.network.airports["MAO"].timezone, "America/Manaus")

    def test_every_airport_flown(self) -> None:
        origins = {e.origin for e in self.network.timetable}
        destinations = {e.destination for e in self.network.timetable}
        self.assertEqual(origins, set(self.network.airports))
        self.assertEqual(destinations, set(self.network.airports))

    def test_every_pair_connected(self) -> None:
        """
        Every ordered pair of cities has at least one itinerary of at most
        three legs within a week.
        """
        schedule = Schedule.build(self.network, START, 7)
        missing = []
        for origin in self.network.airports:
            for destination in self.network.airports:
                if origin == destination:
                    continue
                path = next(iter(schedule.search(origin, destination, START, None, 3)), None)
                if path is None:
                    missing.append(f"{origin}->{destination}")
                else:
                    schedule.itinerary([f.flight_id for f in path], START, 3)
        self.assertEqual(missing, [])

    def test_opens_as_a_store(self) -> None:
        clock = Clock()
        clock.advance(START)
        store = SQLiteStore.open(":memory:", clock, InlineExecutor(), lambda: self.fixtures, FAST_HASHER.hash)
        self.addCleanup(store.stop)
        self.assertEqual(store.network().timetable, self.network.timetable)
        self.assertEqual(sorted(store.network().airports), sorted(self.network.airports))
        for customer in self.fixtures.customers:
            stored = self.successResultOf(store.password_hash(customer.username))
            self.assertTrue(FAST_HASHER.verify(customer.password, stored))

