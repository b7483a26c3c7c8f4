"""
Protocol v1 over in-memory transports: L{StringTransport} (through
L{tests.common.LineClient}) and L{twisted.test.iosim} connections, a real
service on a real in-memory SQLite store, time driven by a L{Clock}.

Nothing here sleeps, opens a socket or touches the global reactor.
"""

from __future__ import annotations

import gc
import json
import re
import socket
import struct
from typing import Any, Callable, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from vendepass import __version__
from vendepass import wire
from vendepass.protocol import MAX_LINE_BYTES, READ_AHEAD, VendePassFactory, VendePassProtocol, _encode
from vendepass.service import ReservationService

from tests.common import (
    ALICE,
    BIG,
    BOB,
    DIRECT,
    FLIGHTS,
    NO_SUCH_DAY,
    START,
    TINY,
    TOMORROW,
    LineClient,
    brl,
    make_service,
)

JSON = dict[str, Any]

# -- the airline of tests/data/mini.json, as the wire shows it ---------------

HOLD_SECONDS = 60
NOW_ISO = "2026-12-01T09:00:00Z"  # START
HELD_UNTIL_ISO = "2026-12-01T09:01:00Z"  # START + HOLD_SECONDS
# The sales window of a search from START: the local day at the origin to 30 days after the UTC day.
WINDOW = {"first": "2026-12-01", "last": "2026-12-31"}
# TINY leaves Salvador at 08:00 (-03:00) on TOMORROW: 11:00 UTC, 26 h after START.
TINY_DEPARTS_IN = 26 * 3600.0
RETURN = f"VP101-{TOMORROW}"  # REC -> SSA, 18:00
BIG_NEXT_DAY = "VP200-2026-12-03"  # REC -> MAO, a day after TINY lands
TINY_SEATS = ("1A", "1B", "2A", "2B")

ALICE_LOGIN = {"username": ALICE[0], "password": ALICE[1]}

TICKET_ID = re.compile(r"^[ABCDEFGHJKMNPQRSTUVWXYZ23456789]{8}$")
HOLD_ID = re.compile(r"^H[0-9a-f]{16}$")


def _pick(flight_id: str, *keys: str) -> JSON:
    return {key: FLIGHTS[flight_id][key] for key in keys}


def ticket_leg(flight_id: str, seat: str) -> JSON:
    """
    A leg of a hold or a ticket on the wire: the flight number, no aircraft.
    """
    leg = _pick(flight_id, "flight", "number", "origin", "destination", "departure", "arrival", "price")
    leg["seat"] = seat
    return leg


hold_leg = ticket_leg


def error(code: str, message: str, **details: Any) -> JSON:
    """
    The C{error} object of a refusal.
    """
    return {"code": code, "message": message, **details}


def success(request_id: Any, opcode: int, data: JSON) -> JSON:
    """
    A whole successful response.
    """
    return {"id": request_id, "opcode": opcode, "ok": True, "data": data}


def refusal(request_id: Any, opcode: Any, refused: JSON) -> JSON:
    """
    A whole refusal response.
    """
    return {"id": request_id, "opcode": opcode, "ok": False, "error": refused}


def hold_not_found(hold_id: str) -> JSON:
    return error("hold_not_found", f"No hold {hold_id!r}.", hold_id=hold_id)


def ticket_not_found(ticket_id: str) -> JSON:
    return error("ticket_not_found", f"No ticket {ticket_id!r}.", ticket_id=ticket_id)


INTERNAL_ERROR = error("internal_error", "Internal error; the request had no effect.")
BAD_USERNAME = "A username has 3 to 32 characters: lowercase letters, digits and _."
BAD_DATE = "Field 'date' must be a date like 2026-12-01."


def welcome(hold_seconds: float = HOLD_SECONDS) -> JSON:
    return {
        "event": "welcome",
        "data": {"protocol": 1, "server": f"vendepass/{__version__}", "hold_seconds": hold_seconds},
    }


# -- talking to the server ----------------------------------------------------


def line(message: Any, ending: bytes = b"\n") -> bytes:
    """
    C{message} as one request line.
    """
    return json.dumps(message).encode() + ending


def replies(messages: list[JSON]) -> list[JSON]:
    """
    The responses among C{messages}, without the events.
    """
    return [m for m in messages if "event" not in m]


def send(client: LineClient, data: bytes) -> list[JSON]:
    """
    Deliver raw bytes; return the responses (not the events) they caused.
    """
    return replies(client.feed(data))


def hold(client: LineClient, flights: list[str], seats: list[str | None] | None = None) -> JSON:
    data: JSON = {"flights": flights}
    if seats is not None:
        data["seats"] = seats
    result: JSON = client.ok(6, data)["hold"]
    return result


def buy(client: LineClient, flights: list[str], seats: list[str | None] | None = None) -> JSON:
    data: JSON = {"flights": flights}
    if seats is not None:
        data["seats"] = seats
    result: JSON = client.ok(3, data)["ticket"]
    return result


def buy_hold(client: LineClient, hold_id: str) -> JSON:
    result: JSON = client.ok(3, {"hold_id": hold_id})["ticket"]
    return result


def seat_statuses(client: LineClient, flight_id: str) -> dict[str, tuple[str, bool]]:
    """
    C{{seat: (status, mine)}} from the seat map of a flight.
    """
    return {s["seat"]: (s["status"], s["mine"]) for s in client.ok(8, {"flight": flight_id})["seats"]}


class JSONLineClient(LineReceiver):
    """
    A minimal protocol v1 client for L{twisted.test.iosim} connections.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self) -> None:
        self.received: list[JSON] = []
        self.lost: Failure | None = None
        self._next_id = 0

    def lineReceived(self, line: bytes) -> None:
        self.received.append(json.loads(line))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost = reason

    def send(self, opcode: int, data: JSON | None = None) -> int:
        """
        Send a request; return its id.
        """
        self._next_id += 1
        message: JSON = {"id": self._next_id, "opcode": opcode}
        if data is not None:
            message["data"] = data
        self.sendLine(json.dumps(message).encode())
        return self._next_id

    def reply(self, request_id: int) -> JSON:
        [found] = [m for m in self.received if "event" not in m and m["id"] == request_id]
        return found

    def events(self) -> list[JSON]:
        return [m for m in self.received if "event" in m]


def connect_pump(service: ReservationService) -> tuple[JSONLineClient, VendePassProtocol, IOPump]:
    """
    Connect a L{JSONLineClient} to the server over iosim; the welcome is
    delivered already.
    """
    factory = VendePassFactory(service, service.clock)
    return connectedServerAndClient(lambda: factory.buildProtocol(None), JSONLineClient)


def call(client: JSONLineClient, pump: IOPump, opcode: int, data: JSON | None = None) -> JSON:
    """
    Send one request over iosim, pump, and return its response.
    """
    request_id = client.send(opcode, data)
    pump.flush()
    return client.reply(request_id)


class Stalled:
    """
    Stands in for a store method: each call returns a Deferred that fires
    only when the test says so, with what the real method gives.
    """

    def __init__(self, real: Callable[..., Deferred[Any]]) -> None:
        self._real = real
        self.calls: list[tuple[Deferred[Any], tuple[Any, ...]]] = []

    def __call__(self, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, args))
        return d

    def proceed(self) -> None:
        d, args = self.calls.pop(0)
        self._real(*args).chainDeferred(d)


class ProtocolTestCase(SynchronousTestCase):
    """
    A fresh service (on its own in-memory database and L{Clock}) per test.
    """

    hold_seconds: float = HOLD_SECONDS

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(hold_seconds=self.hold_seconds, clock=self.clock)
        self.addCleanup(self.service.stopService)

    def connect(self, user: tuple[str, str] | None = None) -> LineClient:
        """
        A new connection, its welcome consumed, logged in as C{user} if given.
        """
        client = LineClient(self.service)
        [welcome] = client.messages()
        self.assertEqual(welcome["event"], "welcome")
        if user is not None:
            client.login(user)
        return client

    def stall(self, method: str) -> Stalled:
        """
        Make store method C{method} wait for L{Stalled.proceed}, for this test.
        """
        stalled = Stalled(getattr(self.service.store, method))
        self.patch(self.service.store, method, stalled)
        return stalled

    def assertRefused(self, client: LineClient, opcode: int, data: JSON | None, expected: JSON) -> None:
        """
        Send a request; its response must be exactly this refusal.
        """
        reply = client.request(opcode, data)
        self.assertEqual(reply, refusal(client.next_id, opcode, expected))

    def assertOpen(self, client: LineClient) -> None:
        """
        The connection is still open and still answers.
        """
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(set(client.ok(0)), {"time"})


# -- tests ----------------------------------------------------------------------


class WelcomeTests(ProtocolTestCase):
    """
    The server speaks first.
    """

    def test_welcome(self) -> None:
        client = LineClient(self.service)
        self.assertEqual(client.transport.value(), json.dumps(welcome(), separators=(",", ":")).encode() + b"\n")
        self.assertEqual(client.messages(), [welcome()])

    def test_hold_seconds(self) -> None:
        """
        The welcome announces the configured hold time.
        """
        service = make_service(hold_seconds=900)
        self.addCleanup(service.stopService)
        self.assertEqual(LineClient(service).messages(), [welcome(900)])

    def test_welcome_over_iosim(self) -> None:
        client, server, pump = connect_pump(self.service)
        self.assertEqual(client.received, [welcome()])


class PingLoginLogoutRegisterTests(ProtocolTestCase):
    """
    Opcodes 0, 1, 9 and 10.
    """

    def test_ping(self) -> None:
        client = self.connect()
        self.assertEqual(client.request(0), success(1, 0, {"time": NOW_ISO}))
        self.clock.advance(90.5)
        self.assertEqual(client.ok(0), {"time": "2026-12-01T09:01:30Z"})

    def test_login(self) -> None:
        client = self.connect()
        self.assertEqual(
            client.request(1, ALICE_LOGIN),
            success(1, 1, {"username": "alice"}),
        )
        self.assertEqual(client.ok(4), {"tickets": []})

    def test_logout(self) -> None:
        client = self.connect(ALICE)
        self.assertEqual(client.request(9), success(2, 9, {}))
        self.assertRefused(client, 4, None, error("not_logged_in", "Log in before tickets."))

    def test_register_then_login(self) -> None:
        client = self.connect()
        self.assertEqual(
            client.request(10, {"username": "carla_99", "password": "carla-password"}),
            success(1, 10, {"username": "carla_99"}),
        )
        # Registering does not log in.
        self.assertRefused(client, 4, None, error("not_logged_in", "Log in before tickets."))
        other = self.connect()
        carla = {"username": "carla_99", "password": "carla-password"}
        self.assertEqual(other.ok(1, carla), {"username": "carla_99"})
        self.assertEqual(other.ok(4), {"tickets": []})
        self.assertEqual(buy(other, [TINY])["legs"], [ticket_leg(TINY, "1A")])

    def test_login_again_as_same_user(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY])
        client.login(ALICE)
        self.assertEqual(seat_statuses(client, TINY)["1A"], ("held", True))
        self.assertEqual(buy_hold(client, held["hold_id"])["legs"], [ticket_leg(TINY, "1A")])


class RoutesTests(ProtocolTestCase):
    """
    Opcode 2: the network, and itineraries.
    """

    AIRPORTS = [
        {"code": "MAO", "city": "Manaus", "name": "Aeroporto Internacional Eduardo Gomes"},
        {"code": "REC", "city": "Recife", "name": "Aeroporto Internacional do Recife"},
        {"code": "SSA", "city": "Salvador", "name": "Aeroporto Internacional de Salvador"},
    ]
    ROUTES = [
        {"origin": "MAO", "destination": "REC"},
        {"origin": "REC", "destination": "MAO"},
        {"origin": "REC", "destination": "SSA"},
        {"origin": "SSA", "destination": "MAO"},
        {"origin": "SSA", "destination": "REC"},
    ]

    def test_network(self) -> None:
        client = self.connect()
        expected = {"airports": self.AIRPORTS, "routes": self.ROUTES}
        self.assertEqual(client.request(2), success(1, 2, expected))
        self.assertEqual(client.ok(2, {}), expected)

    def test_multi_leg(self) -> None:
        """
        No direct flight on Wednesdays: Salvador to Manaus goes through Recife.
        """
        client = self.connect()
        data = client.ok(2, {"origin": "SSA", "destination": "MAO", "date": TOMORROW})
        self.assertEqual(
            data,
            {
                "itineraries": [
                    {
                        "origin": "SSA",
                        "destination": "MAO",
                        "departure": "2026-12-02T08:00:00-03:00",
                        "arrival": "2026-12-02T14:00:00-04:00",
                        "duration_minutes": 420,
                        "legs": [{**FLIGHTS[TINY], "free_seats": 4}, {**FLIGHTS[BIG], "free_seats": 180}],
                        "free_seats": 4,
                        "price": brl("849.90"),
                    }
                ],
                "sales_window": WINDOW,
            },
        )

    def test_free_seats_follow_sales(self) -> None:
        client = self.connect(ALICE)
        buy(client, [TINY])
        hold(client, [TINY, BIG])
        [itinerary] = client.ok(2, {"origin": "SSA", "destination": "MAO", "date": TOMORROW})["itineraries"]
        self.assertEqual([leg["free_seats"] for leg in itinerary["legs"]], [2, 179])
        self.assertEqual(itinerary["free_seats"], 2)

    def test_direct_and_connection(self) -> None:
        """
        On Thursday both the direct flight and the connection fly, earliest
        departure first; C{max_legs} 1 keeps only the direct one.
        """
        client = self.connect()
        itineraries = client.ok(2, {"origin": "SSA", "destination": "MAO", "date": "2026-12-03"})["itineraries"]
        self.assertEqual(
            [[leg["flight"] for leg in i["legs"]] for i in itineraries],
            [["VP100-2026-12-03", BIG_NEXT_DAY], [DIRECT]],
        )
        [direct] = client.ok(2, {"origin": "SSA", "destination": "MAO", "date": "2026-12-03", "max_legs": 1})[
            "itineraries"
        ]
        self.assertEqual(direct["legs"], [{**FLIGHTS[DIRECT], "free_seats": 180}])
        self.assertEqual(direct["duration_minutes"], 210)
        self.assertEqual(direct["price"], brl("749.50"))

    def test_lowercase_codes(self) -> None:
        client = self.connect()
        upper = client.ok(2, {"origin": "SSA", "destination": "REC", "date": TOMORROW})
        self.assertEqual(client.ok(2, {"origin": "ssa", "destination": "rec", "date": TOMORROW}), upper)

    def test_without_date(self) -> None:
        """
        Without a date, every itinerary of the sales window, in order.
        """
        client = self.connect()
        itineraries = client.ok(2, {"origin": "SSA", "destination": "REC", "limit": 3})["itineraries"]
        self.assertEqual(
            [i["legs"][0]["flight"] for i in itineraries],
            ["VP100-2026-12-01", TINY, "VP100-2026-12-03"],
        )

    def test_sold_out_hidden_unless_asked(self) -> None:
        client = self.connect(ALICE)
        for _ in TINY_SEATS:
            buy(client, [TINY])
        query = {"origin": "SSA", "destination": "REC", "date": TOMORROW}
        self.assertEqual(client.ok(2, query), {"itineraries": [], "sales_window": WINDOW})
        [itinerary] = client.ok(2, {**query, "include_sold_out": True})["itineraries"]
        self.assertEqual(itinerary["free_seats"], 0)

    def test_search_fields_without_cities(self) -> None:
        """
        A search field without origin and destination is refused, not ignored.
        """
        client = self.connect()
        for name, value in [
            ("date", TOMORROW), ("max_legs", 1), ("include_sold_out", True), ("limit", 3), ("sort", "price"),
            ("offset", 1),
        ]:
            self.assertRefused(
                client, 2, {name: value},
                error("invalid_request", f"Field {name!r} needs 'origin' and 'destination'.", field=name),
            )

    def test_sort(self) -> None:
        """
        C{sort}: by departure (the default), by price or by duration, over
        the whole window: the direct flights (cheaper and shorter) first.
        """
        client = self.connect()
        query = {"origin": "SSA", "destination": "MAO", "limit": 3}

        def flights(data: JSON) -> list[list[str]]:
            return [[leg["flight"] for leg in i["legs"]] for i in data["itineraries"]]

        by_departure = client.ok(2, query)
        self.assertEqual(client.ok(2, {**query, "sort": "departure"}), by_departure)
        self.assertEqual(
            flights(by_departure),
            [["VP100-2026-12-01", "VP200-2026-12-01"], ["VP300-2026-12-01"], [TINY, "VP200-2026-12-02"]],
        )
        direct = [["VP300-2026-12-01"], [DIRECT], ["VP300-2026-12-05"]]
        by_price = client.ok(2, {**query, "sort": "price"})
        self.assertEqual(flights(by_price), direct)
        self.assertEqual([i["price"] for i in by_price["itineraries"]], [brl("749.50")] * 3)
        self.assertEqual(flights(client.ok(2, {**query, "sort": "duration"})), direct)

    def test_offset_and_next_offset(self) -> None:
        """
        An answer cut at its limit says where the next page starts
        (C{next_offset}); the last page does not.
        """
        client = self.connect()
        query = {"origin": "SSA", "destination": "MAO", "sort": "price"}
        whole = client.ok(2, {**query, "limit": 500})
        self.assertNotIn("next_offset", whole)
        first = client.ok(2, {**query, "limit": 10})
        self.assertEqual(first["next_offset"], 10)
        self.assertEqual(first["itineraries"], whole["itineraries"][:10])
        rest = client.ok(2, {**query, "limit": 500, "offset": 10})
        self.assertNotIn("next_offset", rest)
        self.assertEqual(rest["itineraries"], whole["itineraries"][10:])
        self.assertEqual(client.ok(2, {**query, "offset": 5000}), {"itineraries": [], "sales_window": WINDOW})

    def test_bad_sort_and_offset(self) -> None:
        client = self.connect()
        query = {"origin": "SSA", "destination": "MAO"}
        sorts = "Field 'sort' must be one of departure, price, duration."
        offsets = "Field 'offset' must be between 0 and 5000."
        for name, value, message in [
            ("sort", "cheapest", sorts),
            ("sort", "", sorts),
            ("sort", 1, "Field 'sort' must be a string."),
            ("offset", -1, offsets),
            ("offset", 5001, offsets),
            ("offset", "10", "Field 'offset' must be an integer."),
            ("offset", True, "Field 'offset' must be an integer."),
            ("offset", 1.5, "Field 'offset' must be an integer."),
        ]:
            self.assertRefused(client, 2, {**query, name: value}, error("invalid_request", message, field=name))

    def test_sales_window(self) -> None:
        """
        Every itinerary answer tells the sales window: the first and last
        local days at the origin with flights on sale. A date outside it
        finds nothing, and the answer says why.
        """
        client = self.connect()
        self.assertEqual(
            client.ok(2, {"origin": "SSA", "destination": "REC", "date": "2027-02-01"}),
            {"itineraries": [], "sales_window": WINDOW},
        )
        self.clock.advance(86400)
        data = client.ok(2, {"origin": "SSA", "destination": "REC", "date": "2026-12-01"})
        self.assertEqual(data, {"itineraries": [], "sales_window": {"first": TOMORROW, "last": "2027-01-01"}})

    def test_same_origin_and_destination(self) -> None:
        self.assertRefused(
            self.connect(), 2, {"origin": "SSA", "destination": "ssa"},
            error("invalid_request", "'origin' and 'destination' must differ.", field="destination"),
        )


class BuyingTests(ProtocolTestCase):
    """
    Opcodes 3 to 8: hold, release, buy, tickets, cancel, seat map.
    """

    def test_buy_one_step(self) -> None:
        client = self.connect(ALICE)
        reply = client.request(3, {"flights": [TINY], "request_id": "r-1"})
        self.assertEqual((reply["id"], reply["opcode"], reply["ok"]), (2, 3, True))
        ticket = reply["data"]["ticket"]
        self.assertRegex(ticket["ticket_id"], TICKET_ID)
        self.assertEqual(
            ticket,
            {
                "ticket_id": ticket["ticket_id"],
                "status": "active",
                "legs": [ticket_leg(TINY, "1A")],
                "price": brl("250.00"),
                "bought_at": NOW_ISO,
                "cancelled_at": None,
            },
        )

    def test_buy_multi_leg_with_seats(self) -> None:
        client = self.connect(ALICE)
        ticket = buy(client, [TINY, BIG], ["2B", None])
        self.assertEqual(ticket["legs"], [ticket_leg(TINY, "2B"), ticket_leg(BIG, "1A")])
        self.assertEqual(ticket["price"], brl("849.90"))

    def test_hold(self) -> None:
        client = self.connect(ALICE)
        reply = client.request(6, {"flights": [TINY, BIG], "seats": ["2A", "30F"]})
        self.assertEqual((reply["id"], reply["opcode"], reply["ok"]), (2, 6, True))
        held = reply["data"]["hold"]
        self.assertRegex(held["hold_id"], HOLD_ID)
        self.assertEqual(
            held,
            {
                "hold_id": held["hold_id"],
                "expires_at": HELD_UNTIL_ISO,
                "legs": [hold_leg(TINY, "2A"), hold_leg(BIG, "30F")],
                "price": brl("849.90"),
            },
        )

    def test_buy_hold(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY], ["1B"])
        self.clock.advance(30)
        ticket = buy_hold(client, held["hold_id"])
        self.assertEqual(ticket["legs"], [ticket_leg(TINY, "1B")])
        self.assertEqual(ticket["bought_at"], "2026-12-01T09:00:30Z")
        self.assertEqual(seat_statuses(client, TINY)["1B"], ("sold", True))
        # A bought hold does not expire later.
        self.clock.advance(HOLD_SECONDS * 3)
        self.assertEqual(client.events("hold_expired"), [])
        self.assertEqual(seat_statuses(client, TINY)["1B"], ("sold", True))

    def test_release(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY], ["1A"])
        self.assertEqual(client.request(7, {"hold_id": held["hold_id"]}), success(3, 7, {}))
        self.assertEqual(seat_statuses(client, TINY)["1A"], ("free", False))
        self.clock.advance(HOLD_SECONDS * 3)
        self.assertEqual(client.events("hold_expired"), [])

    def test_tickets(self) -> None:
        client = self.connect(ALICE)
        self.assertEqual(client.request(4), success(2, 4, {"tickets": []}))
        first = buy(client, [TINY])
        self.clock.advance(1)
        second = buy(client, [TINY, BIG])
        # Newest first.
        self.assertEqual(client.ok(4), {"tickets": [second, first]})
        # Only one's own tickets.
        self.assertEqual(self.connect(BOB).ok(4), {"tickets": []})

    def test_tickets_same_instant_in_purchase_order(self) -> None:
        """
        Tickets bought in the same clock tick are listed newest first: in
        the reverse of the order they were bought.
        """
        client = self.connect(ALICE)
        bought = [buy(client, [BIG])["ticket_id"] for _ in range(8)]
        self.assertEqual([t["ticket_id"] for t in client.ok(4)["tickets"]], bought[::-1])

    def test_tickets_in_pages(self) -> None:
        """
        C{tickets} answers a page of at most C{limit} tickets (default 50),
        newest first, with a C{next_cursor} while more follow; following
        the cursors lists every ticket once. A client that sends no
        C{limit} gets the first page and the cursor.
        """
        client = self.connect(ALICE)
        bought = []
        for i in range(53):
            bought.append(buy(client, [BIG])["ticket_id"])
            self.clock.advance(0.5 * (i % 2))
        newest_first = bought[::-1]
        old_client = client.ok(4)
        self.assertEqual([t["ticket_id"] for t in old_client["tickets"]], newest_first[:50])
        self.assertIsInstance(old_client["next_cursor"], str)
        rest = client.ok(4, {"cursor": old_client["next_cursor"]})
        self.assertEqual(rest, {"tickets": rest["tickets"]})  # the last page: no cursor
        self.assertEqual([t["ticket_id"] for t in rest["tickets"]], newest_first[50:])
        listed, cursor = [], None
        for _ in range(20):
            page = client.ok(4, {"limit": 7} if cursor is None else {"limit": 7, "cursor": cursor})
            self.assertLessEqual(len(page["tickets"]), 7)
            listed += [t["ticket_id"] for t in page["tickets"]]
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        self.assertEqual(listed, newest_first)
        # Another customer's cursor shows only one's own tickets.
        self.assertEqual(self.connect(BOB).ok(4, {"cursor": old_client["next_cursor"]}), {"tickets": []})

    def test_tickets_active_only(self) -> None:
        client = self.connect(ALICE)
        first = buy(client, [BIG])
        self.clock.advance(1)
        second = buy(client, [BIG])
        client.ok(5, {"ticket_id": second["ticket_id"]})
        self.assertEqual(client.ok(4, {"active_only": True}), {"tickets": [first]})
        self.assertEqual([t["status"] for t in client.ok(4, {"active_only": False})["tickets"]], ["cancelled", "active"])

    def test_tickets_refuses_bad_paging(self) -> None:
        """
        A C{limit} outside 1 to 200, a cursor that no answer gave, or a
        field of the wrong type is refused with C{invalid_request} naming
        the field.
        """
        client = self.connect(ALICE)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"limit": 0}, "limit"),
            ({"limit": 201}, "limit"),
            ({"limit": "5"}, "limit"),
            ({"limit": True}, "limit"),
            ({"cursor": "not a cursor"}, "cursor"),
            ({"cursor": "t1." + "A" * 97}, "cursor"),
            ({"cursor": "t1.bmFuIDE"}, "cursor"),  # "nan 1"
            ({"cursor": "t1.MS41IC0z"}, "cursor"),  # "1.5 -3"
            ({"cursor": 12}, "cursor"),
            ({"active_only": "yes"}, "active_only"),
        ]
        for data, field in cases:
            reply = client.request(4, data)
            self.assertFalse(reply["ok"], data)
            self.assertEqual((reply["error"]["code"], reply["error"]["field"]), ("invalid_request", field), data)
        self.assertEqual(client.ok(4, {"limit": 200}), {"tickets": []})

    def test_cancel(self) -> None:
        client = self.connect(ALICE)
        ticket = buy(client, [TINY])
        self.clock.advance(60)
        reply = client.request(5, {"ticket_id": ticket["ticket_id"], "request_id": "c-1"})
        cancelled = {**ticket, "status": "cancelled", "cancelled_at": "2026-12-01T09:01:00Z"}
        self.assertEqual(reply, success(3, 5, {"ticket": cancelled}))
        self.assertEqual(client.ok(4), {"tickets": [cancelled]})
        self.assertEqual(seat_statuses(client, TINY)["1A"], ("free", False))

    def test_seatmap(self) -> None:
        alice = self.connect(ALICE)
        bob = self.connect(BOB)
        hold(alice, [TINY], ["1A"])
        buy(alice, [TINY], ["1B"])
        buy(bob, [TINY], ["2A"])
        reply = alice.request(8, {"flight": TINY})
        seatmap = {
            "flight": FLIGHTS[TINY],
            "rows": 2,
            "letters": "AB",
            "seats": [
                {"seat": "1A", "status": "held", "mine": True},
                {"seat": "1B", "status": "sold", "mine": True},
                {"seat": "2A", "status": "sold", "mine": False},
                {"seat": "2B", "status": "free", "mine": False},
            ],
        }
        self.assertEqual(reply, success(4, 8, seatmap))
        self.assertEqual(
            seat_statuses(bob, TINY),
            {"1A": ("held", False), "1B": ("sold", False), "2A": ("sold", True), "2B": ("free", False)},
        )
        # No login needed; nothing is anyone's.
        self.assertEqual(
            seat_statuses(self.connect(), TINY),
            {"1A": ("held", False), "1B": ("sold", False), "2A": ("sold", False), "2B": ("free", False)},
        )

    def test_seatmap_big(self) -> None:
        data = self.connect().ok(8, {"flight": BIG})
        self.assertEqual((data["rows"], data["letters"], len(data["seats"])), (30, "ABCDEF", 180))
        self.assertEqual([s["seat"] for s in data["seats"][:7]], ["1A", "1B", "1C", "1D", "1E", "1F", "2A"])

    def test_over_iosim(self) -> None:
        """
        A whole purchase over an iosim connection.
        """
        client, server, pump = connect_pump(self.service)
        self.assertEqual(call(client, pump, 1, ALICE_LOGIN), success(1, 1, {"username": "alice"}))
        held = call(client, pump, 6, {"flights": [TINY]})["data"]["hold"]
        reply = call(client, pump, 3, {"hold_id": held["hold_id"]})
        self.assertEqual(reply["data"]["ticket"]["legs"], [ticket_leg(TINY, "1A")])
        self.assertEqual(call(client, pump, 4)["data"]["tickets"], [reply["data"]["ticket"]])


class RequestErrorTests(ProtocolTestCase):
    """
    Lines that are not valid requests: refused, the connection stays open.
    """

    def test_bad_json(self) -> None:
        client = self.connect()
        [reply] = send(client, b'{"opcode": 0,\n')
        message = "The line is not valid JSON: a member name in double quotes was expected at character 14."
        self.assertEqual(reply, refusal(None, None, error("malformed_json", message)))
        self.assertOpen(client)

    def test_invalid_utf8(self) -> None:
        client = self.connect()
        [reply] = send(client, b'{"opcode": 0, "id": "\xff\xfe"}\n')
        self.assertEqual(reply, refusal(None, None, error("malformed_json", "The line is not valid UTF-8.")))
        self.assertOpen(client)

    def test_empty_lines(self) -> None:
        client = self.connect()
        answers = send(client, b"\n\r\n   \n")
        self.assertEqual(len(answers), 3)
        for reply in answers:
            self.assertEqual((reply["id"], reply["opcode"], reply["ok"]), (None, None, False))
            self.assertEqual(reply["error"]["code"], "malformed_json")
        self.assertOpen(client)

    def test_deeply_nested_json(self) -> None:
        """
        JSON nested deeper than the parser's recursion limit is malformed
        JSON to us, not an internal error (json.loads raises RecursionError).
        """
        client = self.connect()
        for bad in [b"[" * 5000, b'{"id":1,"opcode":0,"data":{"a":' + b"[" * 3000 + b"]" * 3000 + b"}}"]:
            [reply] = send(client, bad + b"\n")
            self.assertEqual(reply["error"]["code"], "malformed_json")
        self.assertOpen(client)

    def test_not_an_object(self) -> None:
        client = self.connect()
        for value in [[], [{"opcode": 0}], 1, "ping", None, True]:
            [reply] = send(client, line(value))
            self.assertEqual(reply, refusal(None, None, error("invalid_request", "A request is a JSON object.")))
        self.assertOpen(client)

    def test_missing_opcode(self) -> None:
        client = self.connect()
        expected = refusal("x", None, error("invalid_request", "Field 'opcode' must be an integer.", field="opcode"))
        self.assertEqual(send(client, line({"id": "x", "data": {}})), [expected])

    def test_ill_typed_opcode(self) -> None:
        """
        Booleans are not integers, nor are floats or strings.
        """
        client = self.connect()
        expected = refusal(5, None, error("invalid_request", "Field 'opcode' must be an integer.", field="opcode"))
        for opcode in [True, False, 0.0, "0", [0], None]:
            self.assertEqual(send(client, line({"id": 5, "opcode": opcode})), [expected])
        self.assertOpen(client)

    def test_bad_id(self) -> None:
        """
        An id of the wrong type is refused and not echoed; the opcode still is.
        """
        client = self.connect()
        bad_id = error("invalid_request", "Field 'id' must be a string or an integer.", field="id")
        expected = refusal(None, 0, bad_id)
        for request_id in [1.5, True, [], {}, 1e400]:
            self.assertEqual(send(client, line({"id": request_id, "opcode": 0})), [expected])
        self.assertOpen(client)

    def test_data_not_an_object(self) -> None:
        client = self.connect()
        expected = refusal(1, 0, error("invalid_request", "Field 'data' must be an object.", field="data"))
        for data in [[], "x", 1, True]:
            self.assertEqual(send(client, line({"id": 1, "opcode": 0, "data": data})), [expected])
        # Null data is no data.
        [reply] = send(client, line({"id": 2, "opcode": 0, "data": None}))
        self.assertTrue(reply["ok"])

    def test_missing_field(self) -> None:
        client = self.connect()
        missing: list[JSON] = [{"username": "alice"}, {"username": "alice", "password": None}]
        for data in missing:
            self.assertRefused(
                client, 1, data, error("invalid_request", "Field 'password' is required.", field="password")
            )
        self.assertRefused(client, 8, {}, error("invalid_request", "Field 'flight' is required.", field="flight"))

    def test_ill_typed_fields(self) -> None:
        client = self.connect(ALICE)
        route = {"origin": "SSA", "destination": "REC"}
        seat_list = "Field 'seats' must list one seat (a string) or null per flight."
        flight_list = "Field 'flights' must be a non-empty list of flight ids."
        seat_count = "Give one seat (or null) per flight in 'seats'."
        cases: list[tuple[int, JSON, str, str]] = [
            (1, {"username": 5, "password": "x"}, "username", "Field 'username' must be a string."),
            (8, {"flight": [TINY]}, "flight", "Field 'flight' must be a string."),
            (6, {"flights": TINY}, "flights", "Field 'flights' must be a list."),
            (6, {"flights": []}, "flights", flight_list),
            (6, {"flights": [1]}, "flights", flight_list),
            (6, {"flights": [TINY], "seats": "1A"}, "seats", "Field 'seats' must be a list."),
            (6, {"flights": [TINY], "seats": [1]}, "seats", seat_list),
            (6, {"flights": [TINY], "seats": ["1A", None]}, "seats", seat_count),
            (7, {"hold_id": 7}, "hold_id", "Field 'hold_id' must be a string."),
            (3, {"hold_id": True}, "hold_id", "Field 'hold_id' must be a string."),
            (3, {"flights": [TINY], "request_id": 1}, "request_id", "Field 'request_id' must be a string."),
            (5, {"ticket_id": 12345678}, "ticket_id", "Field 'ticket_id' must be a string."),
            (5, {"ticket_id": "X", "request_id": []}, "request_id", "Field 'request_id' must be a string."),
            (2, {"origin": "SSA"}, "destination", "Give both 'origin' and 'destination' (missing 'destination')."),
            (2, {"destination": "SSA"}, "origin", "Give both 'origin' and 'destination' (missing 'origin')."),
            (2, {"origin": 1, "destination": "REC"}, "origin", "Field 'origin' must be a string."),
            (2, {**route, "date": "2/12/2026"}, "date", BAD_DATE),
            (2, {**route, "date": "20261202"}, "date", BAD_DATE),
            (2, {**route, "date": 20261202}, "date", "Field 'date' must be a string."),
            (2, {**route, "max_legs": 0}, "max_legs", "Field 'max_legs' must be between 1 and 3."),
            (2, {**route, "max_legs": 4}, "max_legs", "Field 'max_legs' must be between 1 and 3."),
            (2, {**route, "max_legs": True}, "max_legs", "Field 'max_legs' must be an integer."),
            (2, {**route, "limit": 0}, "limit", "Field 'limit' must be between 1 and 500."),
            (2, {**route, "limit": 501}, "limit", "Field 'limit' must be between 1 and 500."),
            (2, {**route, "limit": 1.0}, "limit", "Field 'limit' must be an integer."),
            (2, {**route, "include_sold_out": 1}, "include_sold_out", "Field 'include_sold_out' must be a boolean."),
            (10, {"username": "Carla", "password": "carla-password"}, "username", BAD_USERNAME),
            (10, {"username": "ca", "password": "carla-password"}, "username", BAD_USERNAME),
            (10, {"username": "carla", "password": "short"}, "password", "A password has 8 to 256 characters."),
        ]
        for opcode, data, field, message in cases:
            self.assertRefused(client, opcode, data, error("invalid_request", message, field=field))
        self.assertOpen(client)

    def test_week_date(self) -> None:
        """
        C{date} is C{"YYYY-MM-DD"}; an ISO week date is not one.

        Currently FAILS: date.fromisoformat (Python 3.11) also parses ISO
        week dates, and C{"2026-W49-3"} has the checked length of 10, so it
        is taken as 2026-12-02.
        """
        self.assertRefused(
            self.connect(),
            2,
            {"origin": "SSA", "destination": "MAO", "date": "2026-W49-3"},
            error("invalid_request", BAD_DATE, field="date"),
        )

    def test_buy_hold_and_flights(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY])
        self.assertRefused(
            client,
            3,
            {"hold_id": held["hold_id"], "flights": [TINY]},
            error("invalid_request", "Give either 'hold_id' or 'flights', not both.", field="flights"),
        )
        self.assertRefused(
            client,
            3,
            {},
            error("invalid_request", "Give 'hold_id', or 'flights' to hold and buy in one step.", field="hold_id"),
        )
        # Neither refusal touched the hold.
        self.assertEqual(buy_hold(client, held["hold_id"])["legs"], [ticket_leg(TINY, "1A")])

    def test_unknown_opcode(self) -> None:
        client = self.connect(ALICE)
        for opcode in [11, -1, 99, 2**70]:
            expected = error("unknown_opcode", f"Unknown opcode {opcode}.", opcode=opcode)
            self.assertRefused(client, opcode, None, expected)
        self.assertOpen(client)

    def test_not_logged_in(self) -> None:
        client = self.connect()
        names = {3: "buy", 4: "tickets", 5: "cancel", 6: "hold", 7: "release", 9: "logout"}
        for opcode, name in names.items():
            # Login is checked before the data.
            self.assertRefused(client, opcode, {}, error("not_logged_in", f"Log in before {name}."))
        self.assertOpen(client)

    def test_no_login_needed(self) -> None:
        client = self.connect()
        self.assertTrue(client.request(0)["ok"])
        self.assertTrue(client.request(2)["ok"])
        self.assertTrue(client.request(8, {"flight": TINY})["ok"])
        self.assertTrue(client.request(10, {"username": "dora", "password": "dora-password"})["ok"])

    def test_after_logout(self) -> None:
        client = self.connect(ALICE)
        client.ok(9)
        self.assertRefused(client, 9, None, error("not_logged_in", "Log in before logout."))

    def test_lone_surrogate_echoed(self) -> None:
        """
        A request whose id (or a field the error echoes) holds a lone UTF-16
        surrogate (valid JSON: C{"\\ud800"}) still gets an answer, and the
        connection keeps working.

        Currently FAILS: the response cannot be encoded as UTF-8, _answer
        raises UnicodeEncodeError (an unhandled error in a Deferred), nothing
        is sent, and the protocol stays paused: it never answers again.
        """
        # The failed Deferred is collected later; log its error in this test.
        self.addCleanup(gc.collect)
        client = self.connect()
        [reply] = send(client, b'{"id": "\\ud800", "opcode": 0}\n')
        self.assertTrue(reply["ok"])
        [reply] = send(client, b'{"id": 2, "opcode": 8, "data": {"flight": "\\udfff"}}\n')
        self.assertEqual((reply["error"]["code"], reply["error"]["field"]), ("invalid_request", "flight"))
        self.assertOpen(client)

    def test_invalid_requests_never_close(self) -> None:
        """
        A burst of every kind of bad line, in one packet: one refusal each,
        and the connection is still open.
        """
        client = self.connect()
        bad = [
            b"{",
            b"\xc3\x28",
            b"",
            b"[]",
            b'{"opcode": "0"}',
            b'{"opcode": 0, "id": 1.5}',
            b'{"opcode": 0, "data": []}',
            b'{"opcode": 42}',
            b'{"opcode": 4}',
            b'{"opcode": 1, "data": {"username": "alice", "password": "nope-nope"}}',
            b'{"opcode": 3, "data": {}}',
        ]
        answers = send(client, b"\n".join(bad) + b"\n")
        self.assertEqual(
            [a["error"]["code"] for a in answers],
            [
                "malformed_json",
                "malformed_json",
                "malformed_json",
                "invalid_request",
                "invalid_request",
                "invalid_request",
                "invalid_request",
                "unknown_opcode",
                "not_logged_in",
                "bad_credentials",
                "not_logged_in",
            ],
        )
        self.assertOpen(client)


class LineTooLongTests(ProtocolTestCase):
    """
    The one error that closes the connection.
    """

    TOO_LONG = refusal(
        None, None, error("line_too_long", f"A line may have at most {MAX_LINE_BYTES} bytes; closing the connection.")
    )

    def test_long_line(self) -> None:
        client = self.connect()
        self.assertEqual(MAX_LINE_BYTES, 64 * 1024)
        answers = send(client, b"x" * (MAX_LINE_BYTES + 1) + b"\n" + line({"id": 1, "opcode": 0}))
        # The request after the long line is not answered.
        self.assertEqual(answers, [self.TOO_LONG])
        self.assertTrue(client.transport.disconnecting)

    def test_long_request(self) -> None:
        """
        A well-formed request that is too long is refused as too long.
        """
        client = self.connect()
        padded = {"id": 1, "opcode": 0, "data": {"pad": "p" * MAX_LINE_BYTES}}
        self.assertEqual(send(client, line(padded)), [self.TOO_LONG])
        self.assertTrue(client.transport.disconnecting)

    def test_endless_line(self) -> None:
        """
        A client cannot make us buffer a line without end.
        """
        client = self.connect()
        self.assertEqual(send(client, b"y" * MAX_LINE_BYTES), [])
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(send(client, b"y" * 1024), [self.TOO_LONG])
        self.assertTrue(client.transport.disconnecting)

    def test_longest_line(self) -> None:
        """
        A line of exactly the limit is a request like any other.
        """
        client = self.connect()
        request = b'{"id": 1, "opcode": 0}'
        padded = request + b" " * (MAX_LINE_BYTES - len(request))
        [reply] = send(client, padded + b"\n")
        self.assertEqual(reply, success(1, 0, {"time": NOW_ISO}))
        self.assertFalse(client.transport.disconnecting)

    def test_longest_line_crlf(self) -> None:
        """
        The limit does not count the line ending, C{\\r\\n} included
        (docs/protocol.md: "at most 65,536 bytes (64 KiB, without the line
        ending)").

        Currently FAILS: LineReceiver splits on C{\\n} only, so the C{\\r}
        counts towards MAX_LENGTH and this line gets line_too_long and the
        connection is closed.
        """
        client = self.connect()
        request = b'{"id": 1, "opcode": 0}'
        padded = request + b" " * (MAX_LINE_BYTES - len(request))
        [reply] = send(client, padded + b"\r\n")
        self.assertEqual(reply, success(1, 0, {"time": NOW_ISO}))
        self.assertFalse(client.transport.disconnecting)

    def test_after_good_requests(self) -> None:
        """
        Requests before the long line in the same packet are answered first.
        """
        client = self.connect()
        answers = send(client, line({"id": 1, "opcode": 0}) + b"z" * (MAX_LINE_BYTES + 10) + b"\n")
        self.assertEqual([a["id"] for a in answers], [1, None])
        self.assertEqual(answers[1], self.TOO_LONG)

    def test_over_iosim(self) -> None:
        client, server, pump = connect_pump(self.service)
        assert client.transport is not None
        client.transport.write(b"x" * (MAX_LINE_BYTES + 100) + b"\n")
        pump.flush()
        self.assertEqual(client.received[1:], [self.TOO_LONG])
        self.assertIsNotNone(client.lost)


class AccountErrorTests(ProtocolTestCase):
    """
    bad_credentials and username_taken.
    """

    BAD = error("bad_credentials", "Wrong username or password.")

    def test_bad_credentials(self) -> None:
        """
        A wrong password and an unknown user look the same.
        """
        client = self.connect()
        self.assertRefused(client, 1, {"username": "alice", "password": "bob-password"}, self.BAD)
        self.assertRefused(client, 1, {"username": "zelda", "password": "alice-password"}, self.BAD)
        self.assertRefused(client, 1, {"username": "Not A User!", "password": "alice-password"}, self.BAD)
        self.assertRefused(client, 4, None, error("not_logged_in", "Log in before tickets."))

    def test_failed_login_keeps_session(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY])
        self.assertRefused(client, 1, {"username": "bob", "password": "wrong-password"}, self.BAD)
        self.assertEqual(seat_statuses(client, TINY)["1A"], ("held", True))
        self.assertEqual(buy_hold(client, held["hold_id"])["legs"], [ticket_leg(TINY, "1A")])

    def test_username_taken(self) -> None:
        client = self.connect()
        self.assertRefused(
            client,
            10,
            {"username": "alice", "password": "another-password"},
            error("username_taken", "The username 'alice' is already taken."),
        )
        client.ok(10, {"username": "carla", "password": "carla-password"})
        self.assertRefused(
            client,
            10,
            {"username": "carla", "password": "carla-password"},
            error("username_taken", "The username 'carla' is already taken."),
        )
        # The original password still works.
        client.login(ALICE)

    def test_username_with_newline(self) -> None:
        """
        A username cannot end with a newline (it would look like another).

        Currently FAILS: USERNAME.match with C{$} accepts C{"alice\\n"}, so a
        second account that prints as "alice" can be registered.
        """
        self.assertRefused(
            self.connect(),
            10,
            {"username": "alice\n", "password": "another-password"},
            error("invalid_request", BAD_USERNAME, field="username"),
        )


class FlightErrorTests(ProtocolTestCase):
    """
    unknown_flight, unknown_seat, unknown_airport, invalid_itinerary.
    """

    def test_unknown_flight(self) -> None:
        client = self.connect(ALICE)
        for flight in [NO_SUCH_DAY, "VP999-2026-12-02", "VP100", "", "VP100-2027-06-01", "VP100-2026-12-2"]:
            expected = error("unknown_flight", f"Unknown flight {flight!r}.", flight=flight)
            self.assertRefused(client, 8, {"flight": flight}, expected)
            self.assertRefused(client, 6, {"flights": [flight]}, expected)
            self.assertRefused(client, 3, {"flights": [flight]}, expected)
        expected = error("unknown_flight", f"Unknown flight {NO_SUCH_DAY!r}.", flight=NO_SUCH_DAY)
        self.assertRefused(client, 6, {"flights": [TINY, NO_SUCH_DAY]}, expected)
        # All or nothing: the first leg was not held.
        self.assertEqual(seat_statuses(client, TINY)["1A"], ("free", False))

    def test_unknown_seat(self) -> None:
        client = self.connect(ALICE)
        for seat in ["9Z", "3A", "1C", "1a", "0A", "A1", ""]:
            self.assertRefused(
                client,
                6,
                {"flights": [TINY], "seats": [seat]},
                error("unknown_seat", f"Flight {TINY} has no seat {seat!r}.", flight=TINY, seat=seat),
            )
        self.assertRefused(
            client,
            3,
            {"flights": [TINY, BIG], "seats": [None, "31A"]},
            error("unknown_seat", f"Flight {BIG} has no seat '31A'.", flight=BIG, seat="31A"),
        )
        self.assertEqual(client.ok(4), {"tickets": []})

    def test_seat_with_newline(self) -> None:
        """
        C{"1A\\n"} is no seat; it must not be sold beside C{"1A"}.

        Currently FAILS: the seat pattern ends with C{$}, which matches before
        a final newline, so C{"1A\\n"} is accepted as a distinct seat: 1A is
        sold twice, five tickets are sold on a four-seat plane, and routes
        reports -1 free seats.
        """
        alice = self.connect(ALICE)
        buy(alice, [TINY], ["1A"])
        self.assertRefused(
            alice,
            3,
            {"flights": [TINY], "seats": ["1A\n"]},
            error("unknown_seat", f"Flight {TINY} has no seat '1A\\n'.", flight=TINY, seat="1A\n"),
        )

    def test_unknown_airport(self) -> None:
        client = self.connect()
        self.assertRefused(
            client,
            2,
            {"origin": "XXX", "destination": "MAO"},
            error("unknown_airport", "Unknown airport 'XXX'.", airport="XXX"),
        )
        self.assertRefused(
            client,
            2,
            {"origin": "SSA", "destination": "gru", "date": TOMORROW},
            error("unknown_airport", "Unknown airport 'GRU'.", airport="GRU"),
        )

    def test_invalid_itinerary(self) -> None:
        client = self.connect(ALICE)
        cases = [
            ([TINY, DIRECT], f"Flight {DIRECT} leaves from SSA, not from REC."),
            ([TINY, RETURN], "An itinerary cannot pass through the same airport twice."),
            (
                [TINY, BIG_NEXT_DAY],
                f"The connection from {TINY} to {BIG_NEXT_DAY} must be between 45 minutes and 12 hours.",
            ),
            ([TINY, BIG, "VP201-2026-12-03", RETURN], "An itinerary has at most 3 flights."),
        ]
        for flights, message in cases:
            for opcode in (6, 3):
                self.assertRefused(client, opcode, {"flights": flights}, error("invalid_itinerary", message))
        self.assertEqual(seat_statuses(client, TINY), {seat: ("free", False) for seat in TINY_SEATS})


class SeatErrorTests(ProtocolTestCase):
    """
    seat_unavailable and sold_out.
    """

    def test_seat_sold(self) -> None:
        buy(self.connect(ALICE), [TINY], ["1A"])
        bob = self.connect(BOB)
        expected = error("seat_unavailable", f"Seat 1A on flight {TINY} is sold.", flight=TINY, seat="1A")
        self.assertRefused(bob, 3, {"flights": [TINY], "seats": ["1A"]}, expected)
        self.assertRefused(bob, 6, {"flights": [TINY], "seats": ["1A"]}, expected)

    def test_seat_held(self) -> None:
        hold(self.connect(ALICE), [TINY], ["2B"])
        bob = self.connect(BOB)
        self.clock.advance(10)
        expected = error(
            "seat_unavailable",
            f"Seat 2B on flight {TINY} is held until {HELD_UNTIL_ISO}.",
            flight=TINY,
            seat="2B",
            held_until=HELD_UNTIL_ISO,
        )
        self.assertRefused(bob, 6, {"flights": [TINY], "seats": ["2B"]}, expected)
        self.assertRefused(bob, 3, {"flights": [TINY], "seats": ["2B"]}, expected)

    def test_own_hold_blocks_too(self) -> None:
        alice = self.connect(ALICE)
        hold(alice, [TINY], ["1B"])
        self.assertRefused(
            alice,
            3,
            {"flights": [TINY], "seats": ["1B"]},
            error(
                "seat_unavailable",
                f"Seat 1B on flight {TINY} is held until {HELD_UNTIL_ISO}.",
                flight=TINY,
                seat="1B",
                held_until=HELD_UNTIL_ISO,
            ),
        )

    def test_multi_leg_all_or_nothing(self) -> None:
        buy(self.connect(BOB), [BIG], ["5C"])
        alice = self.connect(ALICE)
        self.assertRefused(
            alice,
            6,
            {"flights": [TINY, BIG], "seats": ["1A", "5C"]},
            error("seat_unavailable", f"Seat 5C on flight {BIG} is sold.", flight=BIG, seat="5C"),
        )
        self.assertEqual(seat_statuses(alice, TINY)["1A"], ("free", False))

    def test_sold_out(self) -> None:
        alice = self.connect(ALICE)
        tickets = [buy(alice, [TINY]) for _ in TINY_SEATS]
        self.assertEqual([t["legs"][0]["seat"] for t in tickets], list(TINY_SEATS))
        expected = error("sold_out", f"Flight {TINY} is sold out.", flight=TINY)
        self.assertRefused(alice, 3, {"flights": [TINY]}, expected)
        self.assertRefused(self.connect(BOB), 6, {"flights": [TINY]}, expected)
        # All or nothing: no seat taken on the second leg.
        self.assertRefused(alice, 6, {"flights": [TINY, BIG]}, expected)
        self.assertEqual(seat_statuses(alice, BIG)["1A"], ("free", False))

    def test_sold_out_by_holds(self) -> None:
        bob = self.connect(BOB)
        for _ in TINY_SEATS:
            hold(bob, [TINY])
        self.assertRefused(
            self.connect(ALICE), 3, {"flights": [TINY]}, error("sold_out", f"Flight {TINY} is sold out.", flight=TINY)
        )


class HoldErrorTests(ProtocolTestCase):
    """
    hold_not_found and hold_expired.
    """

    def assertBuyAndReleaseRefused(self, client: LineClient, hold_id: str, expected: JSON) -> None:
        self.assertRefused(client, 3, {"hold_id": hold_id}, expected)
        self.assertRefused(client, 7, {"hold_id": hold_id}, expected)

    def test_unknown_hold(self) -> None:
        client = self.connect(ALICE)
        for hold_id in ["H0000000000000000", ""]:
            self.assertBuyAndReleaseRefused(client, hold_id, hold_not_found(hold_id))

    def test_other_users_hold(self) -> None:
        alice = self.connect(ALICE)
        held = hold(alice, [TINY])
        bob = self.connect(BOB)
        self.assertBuyAndReleaseRefused(bob, held["hold_id"], hold_not_found(held["hold_id"]))
        # Alice still has it.
        self.assertEqual(buy_hold(alice, held["hold_id"])["legs"], [ticket_leg(TINY, "1A")])

    def test_released_hold(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY])
        client.ok(7, {"hold_id": held["hold_id"]})
        self.assertBuyAndReleaseRefused(client, held["hold_id"], hold_not_found(held["hold_id"]))

    def test_bought_hold(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY])
        buy_hold(client, held["hold_id"])
        self.assertBuyAndReleaseRefused(client, held["hold_id"], hold_not_found(held["hold_id"]))
        self.assertEqual(len(client.ok(4)["tickets"]), 1)

    def test_hold_expired(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY], ["1A"])
        self.clock.advance(HOLD_SECONDS + 1)
        expected = error(
            "hold_expired", f"Hold {held['hold_id']} has expired; its seats are free again.", hold_id=held["hold_id"]
        )
        self.assertBuyAndReleaseRefused(client, held["hold_id"], expected)
        self.assertEqual(client.ok(4), {"tickets": []})
        self.assertEqual(seat_statuses(client, TINY)["1A"], ("free", False))

    def test_just_before_expiry(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY])
        self.clock.advance(HOLD_SECONDS - 1)
        self.assertEqual(buy_hold(client, held["hold_id"])["legs"], [ticket_leg(TINY, "1A")])


class TicketErrorTests(ProtocolTestCase):
    """
    ticket_not_found and already_cancelled.
    """

    def test_unknown_ticket(self) -> None:
        client = self.connect(ALICE)
        for ticket_id in ["ABCDEFGH", "", "abcdefgh"]:
            self.assertRefused(client, 5, {"ticket_id": ticket_id}, ticket_not_found(ticket_id))

    def test_other_users_ticket(self) -> None:
        """
        Another customer's ticket is as unknown as a ticket that never was:
        the replies differ only by the ticket id.
        """
        alice = self.connect(ALICE)
        ticket = buy(alice, [TINY])
        bob = self.connect(BOB)
        theirs = bob.request(5, {"ticket_id": ticket["ticket_id"]})
        nobodys = bob.request(5, {"ticket_id": "ZZZZZZZZ"})
        self.assertEqual(theirs["error"], ticket_not_found(ticket["ticket_id"]))
        self.assertEqual(
            json.dumps(theirs).replace(ticket["ticket_id"], "ZZZZZZZZ"),
            json.dumps({**nobodys, "id": theirs["id"]}),
        )
        self.assertEqual(alice.ok(4)["tickets"], [ticket])

    def test_already_cancelled(self) -> None:
        client = self.connect(ALICE)
        ticket = buy(client, [TINY])
        client.ok(5, {"ticket_id": ticket["ticket_id"]})
        self.assertRefused(
            client,
            5,
            {"ticket_id": ticket["ticket_id"]},
            error(
                "already_cancelled",
                f"Ticket {ticket['ticket_id']} is already cancelled.",
                ticket_id=ticket["ticket_id"],
            ),
        )


class FlightDepartedTests(ProtocolTestCase):
    """
    flight_departed: holds last long enough here to outlive a departure.
    """

    hold_seconds = 3 * 86400

    def departed(self) -> JSON:
        return error("flight_departed", f"Flight {TINY} has already departed.", flight=TINY)

    def test_book_departed(self) -> None:
        client = self.connect(ALICE)
        self.clock.advance(TINY_DEPARTS_IN)
        for opcode in (3, 6):
            self.assertRefused(client, opcode, {"flights": [TINY]}, self.departed())
            self.assertRefused(client, opcode, {"flights": [TINY, BIG]}, self.departed())
        self.assertRefused(client, 8, {"flight": TINY}, self.departed())

    def test_just_before_departure(self) -> None:
        client = self.connect(ALICE)
        self.clock.advance(TINY_DEPARTS_IN - 1)
        self.assertEqual(buy(client, [TINY])["legs"], [ticket_leg(TINY, "1A")])

    def test_search_leaves_departed_out(self) -> None:
        client = self.connect()
        self.clock.advance(TINY_DEPARTS_IN)
        self.assertEqual(
            client.ok(2, {"origin": "SSA", "destination": "REC", "date": TOMORROW}),
            {"itineraries": [], "sales_window": {"first": TOMORROW, "last": "2027-01-01"}},
        )

    def test_buy_hold_departed(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY])
        self.clock.advance(TINY_DEPARTS_IN + 60)
        self.assertRefused(client, 3, {"hold_id": held["hold_id"]}, self.departed())

    def test_cancel_departed(self) -> None:
        client = self.connect(ALICE)
        ticket = buy(client, [TINY, BIG])
        self.clock.advance(TINY_DEPARTS_IN + 1)
        self.assertRefused(
            client,
            5,
            {"ticket_id": ticket["ticket_id"]},
            error(
                "flight_departed",
                f"Ticket {ticket['ticket_id']} cannot be cancelled: its first flight has departed.",
                ticket_id=ticket["ticket_id"],
            ),
        )
        self.assertEqual(client.ok(4)["tickets"][0]["status"], "active")


class InternalErrorTests(ProtocolTestCase):
    """
    An unexpected exception is answered, logged, and survived.
    """

    def setUp(self) -> None:
        super().setUp()
        self.logged: list[LogEvent] = []
        observer = cast(ILogObserver, self.logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def failures(self) -> list[LogEvent]:
        return [e for e in self.logged if "log_failure" in e]

    def test_store_fails(self) -> None:
        client = self.connect(ALICE)

        def broken(username: str, *args: Any) -> Deferred[Any]:
            return fail(RuntimeError("disk on fire"))

        self.patch(self.service.store, "ticket_page", broken)
        self.assertRefused(client, 4, None, INTERNAL_ERROR)
        [event] = self.failures()
        self.assertEqual((event["opcode"], event["name"]), (4, "tickets"))
        self.assertIsInstance(event["log_failure"].value, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # Still serving, on this connection and others.
        self.assertOpen(client)
        self.assertEqual(buy(client, [TINY])["legs"], [ticket_leg(TINY, "1A")])
        self.assertTrue(self.connect(BOB).request(0)["ok"])

    def test_store_raises(self) -> None:
        """
        Also when the store raises instead of failing its Deferred.
        """
        client = self.connect(ALICE)

        def broken(*args: Any) -> Deferred[Any]:
            raise ZeroDivisionError()

        self.patch(self.service.store, "hold", broken)
        packet = line({"id": "a", "opcode": 6, "data": {"flights": [TINY]}}) + line({"id": "b", "opcode": 0})
        answers = send(client, packet)
        self.assertEqual(answers[0], refusal("a", 6, INTERNAL_ERROR))
        self.assertEqual((answers[1]["id"], answers[1]["ok"]), ("b", True))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertOpen(client)


class FramingTests(ProtocolTestCase):
    """
    Lines, ids, ordering.
    """

    def test_byte_by_byte(self) -> None:
        client = self.connect()
        request = line({"id": "slow", "opcode": 2, "data": {"origin": "SSA", "destination": "MAO", "date": TOMORROW}})
        for i in range(len(request) - 1):
            self.assertEqual(send(client, request[i : i + 1]), [])
        [reply] = send(client, request[-1:])
        self.assertEqual((reply["id"], reply["opcode"], reply["ok"]), ("slow", 2, True))
        self.assertEqual(len(reply["data"]["itineraries"]), 1)

    def test_several_in_one_packet(self) -> None:
        client = self.connect()
        packet = b"".join(
            [
                line({"id": 1, "opcode": 0}),
                line({"id": 2, "opcode": 1, "data": ALICE_LOGIN}),
                line({"id": 3, "opcode": 3, "data": {"flights": [TINY]}}),
                line({"id": 4, "opcode": 4}),
            ]
        )
        answers = send(client, packet)
        self.assertEqual([(a["id"], a["opcode"]) for a in answers], [(1, 0), (2, 1), (3, 3), (4, 4)])
        self.assertTrue(all(a["ok"] for a in answers))
        self.assertEqual(answers[3]["data"]["tickets"], [answers[2]["data"]["ticket"]])

    def test_split_across_packets(self) -> None:
        client = self.connect()
        packet = line({"id": 1, "opcode": 0}) + line({"id": 2, "opcode": 0})
        self.assertEqual(send(client, packet[:5]), [])
        self.assertEqual([a["id"] for a in send(client, packet[5:30])], [1])
        self.assertEqual([a["id"] for a in send(client, packet[30:])], [2])

    def test_crlf(self) -> None:
        client = self.connect()
        packet = line({"id": 1, "opcode": 0}, b"\r\n") + line({"id": 2, "opcode": 99}, b"\r\n")
        answers = send(client, packet)
        self.assertEqual(answers[0], success(1, 0, {"time": NOW_ISO}))
        self.assertEqual(answers[1]["error"]["code"], "unknown_opcode")

    def test_ids_echoed(self) -> None:
        client = self.connect()
        for request_id in ["abc", "", "ünïcödé ✈", 0, -7, 2**80]:
            [reply] = send(client, line({"id": request_id, "opcode": 0}))
            self.assertEqual((reply["id"], reply["opcode"]), (request_id, 0))
            [reply] = send(client, line({"id": request_id, "opcode": 4}))
            self.assertEqual((reply["id"], reply["opcode"], reply["ok"]), (request_id, 4, False))
        for message in [{"opcode": 0}, {"id": None, "opcode": 0}]:
            [reply] = send(client, line(message))
            self.assertEqual((reply["id"], reply["opcode"], reply["ok"]), (None, 0, True))

    def test_pipelined_in_order(self) -> None:
        """
        Requests sent together are answered once each, in order, even when an
        early one waits on the store.
        """
        client = self.connect(ALICE)
        stalled = self.stall("ticket_page")
        packet = b"".join(
            [
                line({"id": "t", "opcode": 4}),
                line({"id": "p", "opcode": 0}),
                line({"id": "h", "opcode": 6, "data": {"flights": [TINY]}}),
            ]
        )
        self.assertEqual(send(client, packet), [])
        # While a request is in flight, the next ones wait unread.
        self.assertEqual(len(stalled.calls), 1)
        stalled.proceed()
        answers = client.messages()
        self.assertEqual([(a["id"], a["ok"]) for a in answers], [("t", True), ("p", True), ("h", True)])
        self.assertEqual(answers[0]["data"], {"tickets": []})
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(client.messages(), [])

    def test_read_ahead_is_bounded(self) -> None:
        """
        While a request is in flight the socket is still read, but only up to
        READ_AHEAD bytes; past that reading stops until the request is
        answered, and then every waiting request is answered in order.
        """
        client = self.connect(ALICE)
        stalled = self.stall("ticket_page")
        send(client, line({"id": "t", "opcode": 4}))
        self.assertEqual(client.transport.producerState, "producing")
        pings = [line({"id": i, "opcode": 0}) for i in range(READ_AHEAD // 20)]
        send(client, b"".join(pings))
        self.assertGreater(sum(map(len, pings)), READ_AHEAD)
        self.assertEqual(client.transport.producerState, "paused")
        stalled.proceed()
        answers = client.messages()
        self.assertEqual([a["id"] for a in answers], ["t", *range(len(pings))])
        self.assertEqual(client.transport.producerState, "producing")

    def test_long_line_while_busy(self) -> None:
        """
        A line over the limit that arrives while a request is in flight is
        not read past READ_AHEAD; once the request is answered, the line is
        refused as too long and the connection closed.
        """
        client = self.connect(ALICE)
        stalled = self.stall("ticket_page")
        send(client, line({"id": "t", "opcode": 4}))
        send(client, b"x" * (MAX_LINE_BYTES + 10))
        self.assertEqual(client.transport.producerState, "paused")
        self.assertFalse(client.transport.disconnecting)
        stalled.proceed()
        answers = client.messages()
        self.assertEqual(answers[0]["id"], "t")
        self.assertEqual(answers[-1]["error"]["code"], "line_too_long")
        self.assertTrue(client.transport.disconnecting)

    def test_pipelined_over_iosim(self) -> None:
        client, server, pump = connect_pump(self.service)
        assert client.transport is not None
        client.transport.write(b"".join(line({"id": i, "opcode": op}) for i, op in enumerate([0, 4, 42, 2, 0])))
        client.transport.write(b"{bad\n")
        pump.flush()
        answers = client.received[1:]
        self.assertEqual(
            [(a["id"], a["opcode"], a["ok"]) for a in answers],
            [(0, 0, True), (1, 4, False), (2, 42, False), (3, 2, True), (4, 0, True), (None, None, False)],
        )
        self.assertIsNone(client.lost)


class EventTests(ProtocolTestCase):
    """
    Pushed events, and holds ending with their connections and logins.
    """

    def test_hold_expired_event(self) -> None:
        alice = self.connect(ALICE)
        bob = self.connect(BOB)
        other_alice = self.connect(ALICE)
        held = hold(alice, [TINY], ["1A"])
        self.clock.advance(HOLD_SECONDS - 1)
        self.assertEqual(alice.messages(), [])
        self.clock.advance(1)
        self.assertEqual(alice.messages(), [{"event": "hold_expired", "data": {"hold_id": held["hold_id"]}}])
        # Once, and only to the connection that made the hold.
        self.clock.advance(HOLD_SECONDS * 5)
        self.assertEqual(alice.messages(), [])
        self.assertEqual(bob.messages(), [])
        self.assertEqual(other_alice.messages(), [])
        # The seat is free for anyone.
        self.assertEqual(buy(bob, [TINY], ["1A"])["legs"], [ticket_leg(TINY, "1A")])

    def test_events_are_not_responses(self) -> None:
        alice = self.connect(ALICE)
        first = hold(alice, [TINY])
        second = hold(alice, [BIG])
        self.clock.advance(HOLD_SECONDS)
        events = alice.events("hold_expired")
        self.assertEqual(sorted(e["data"]["hold_id"] for e in events), sorted([first["hold_id"], second["hold_id"]]))
        for event in events:
            self.assertEqual(set(event), {"event", "data"})
            self.assertEqual(event["event"], "hold_expired")

    def test_hold_expired_over_iosim(self) -> None:
        client, server, pump = connect_pump(self.service)
        call(client, pump, 1, ALICE_LOGIN)
        held = call(client, pump, 6, {"flights": [TINY]})["data"]["hold"]
        self.clock.advance(HOLD_SECONDS + 5)
        pump.flush()
        self.assertEqual(client.events(), [welcome(), {"event": "hold_expired", "data": {"hold_id": held["hold_id"]}}])

    def test_close_releases_holds(self) -> None:
        alice = self.connect(ALICE)
        bob = self.connect(BOB)
        hold(alice, [TINY, BIG], ["1A", "1A"])
        self.assertEqual(bob.request(6, {"flights": [TINY], "seats": ["1A"]})["error"]["held_until"], HELD_UNTIL_ISO)
        alice.disconnect()
        # At once: no clock advance.
        held = hold(bob, [TINY, BIG], ["1A", "1A"])
        self.assertEqual(held["legs"], [hold_leg(TINY, "1A"), hold_leg(BIG, "1A")])

    def test_close_over_iosim(self) -> None:
        client, server, pump = connect_pump(self.service)
        call(client, pump, 1, ALICE_LOGIN)
        self.assertTrue(call(client, pump, 6, {"flights": [TINY], "seats": ["2A"]})["ok"])
        bob = self.connect(BOB)
        self.assertEqual(seat_statuses(bob, TINY)["2A"], ("held", False))
        assert client.transport is not None
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(seat_statuses(bob, TINY)["2A"], ("free", False))
        self.assertEqual(buy(bob, [TINY], ["2A"])["legs"], [ticket_leg(TINY, "2A")])

    def test_close_keeps_tickets(self) -> None:
        alice = self.connect(ALICE)
        ticket = buy(alice, [TINY])
        alice.disconnect()
        self.assertEqual(self.connect(ALICE).ok(4), {"tickets": [ticket]})

    def test_login_as_other_user_releases(self) -> None:
        client = self.connect(ALICE)
        held = hold(client, [TINY], ["1B"])
        client.login(BOB)
        self.assertEqual(seat_statuses(client, TINY)["1B"], ("free", False))
        self.assertRefused(client, 3, {"hold_id": held["hold_id"]}, hold_not_found(held["hold_id"]))
        client.login(ALICE)
        self.assertRefused(client, 3, {"hold_id": held["hold_id"]}, hold_not_found(held["hold_id"]))
        self.clock.advance(HOLD_SECONDS * 2)
        self.assertEqual(client.events("hold_expired"), [])

    def test_logout_releases(self) -> None:
        client = self.connect(ALICE)
        hold(client, [TINY], ["2B"])
        client.ok(9)
        self.assertEqual(seat_statuses(client, TINY)["2B"], ("free", False))
        self.clock.advance(HOLD_SECONDS * 2)
        self.assertEqual(client.events("hold_expired"), [])

    def test_close_during_hold(self) -> None:
        """
        A connection that closes while its hold is being made leaves no hold
        behind, and nothing is sent to it.
        """
        client = self.connect(ALICE)
        stalled = self.stall("hold")
        self.assertEqual(send(client, line({"id": 1, "opcode": 6, "data": {"flights": [TINY]}})), [])
        client.disconnect()
        stalled.proceed()
        self.assertEqual(client.messages(), [])
        self.assertEqual(seat_statuses(self.connect(), TINY)["1A"], ("free", False))
        # An ordinary race, not a crash: nothing is logged as an error (trial
        # fails the test if anything is).

    def test_no_events_after_close(self) -> None:
        client = self.connect(ALICE)
        hold(client, [TINY])
        client.disconnect()
        self.clock.advance(HOLD_SECONDS * 2)
        self.assertEqual(client.transport.value(), b"")


# -- property ---------------------------------------------------------------------

FIELDS = [
    "username", "password", "origin", "destination", "date", "max_legs", "include_sold_out", "limit",
    "sort", "offset", "flight", "flights", "seats", "hold_id", "ticket_id", "request_id",
]
# Values that can make a request succeed, or fail for a business reason.
PLAUSIBLE = [
    TINY, BIG, DIRECT, NO_SUCH_DAY, RETURN, "SSA", "REC", "MAO", "ssa", "XXX", "alice", "alice-password",
    "bob", "1A", "2B", "9Z", TOMORROW, "2026-12-03", "H0000000000000000", "ABCDEFGH", 1, 2, 3, True,
    "price", "duration", "departure",
]
PLAUSIBLE_LISTS = [[TINY], [BIG], [TINY, BIG], [DIRECT], [TINY, RETURN], ["1A"], ["2B"], [None, "1A"], ["1A", None]]
LOGIN = line({"id": "login", "opcode": 1, "data": ALICE_LOGIN}, b"")

# st.text() never draws lone surrogates, so "\ud800" escapes are left to
# RequestErrorTests.test_lone_surrogate_echoed (a known bug would fail every run).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(
    st.sampled_from(PLAUSIBLE),
    st.sampled_from(PLAUSIBLE_LISTS),
    st.lists(st.none() | st.sampled_from(PLAUSIBLE), min_size=1, max_size=4),
    json_values,
)
request_data = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=5)
# A valid request of each opcode, for near-valid requests to start from.
TEMPLATES: dict[int, JSON] = {
    0: {},
    1: ALICE_LOGIN,
    2: {"origin": "SSA", "destination": "MAO", "date": TOMORROW},
    3: {"flights": [TINY]},
    4: {},
    5: {"ticket_id": "ABCDEFGH"},
    6: {"flights": [TINY, BIG], "seats": ["1A", None]},
    7: {"hold_id": "H0000000000000000"},
    8: {"flight": TINY},
    9: {},
    10: {"username": "carla", "password": "carla-password"},
}
_ABSENT = object()


def _mostly(draw: st.DrawFn, *strategies: st.SearchStrategy[Any]) -> Any:
    """
    Draw from the first strategy about half the time, else from another.
    """
    weights = [len(strategies) - 1] + [1] * (len(strategies) - 1)
    index = draw(st.sampled_from([i for i, weight in enumerate(weights) for _ in range(weight)]))
    return draw(strategies[index])


@st.composite
def near_valid(draw: st.DrawFn) -> JSON:
    """
    A request object that is valid, or nearly: a valid request of a random
    opcode with fields added, replaced or mistyped, or random everything.
    """
    opcode = _mostly(draw, st.sampled_from(sorted(TEMPLATES)), st.integers(-1, 12), json_values)
    template = TEMPLATES.get(opcode, {}) if type(opcode) is int else {}
    message: JSON = {"opcode": opcode}
    request_id = _mostly(draw, st.integers() | st.text(max_size=8), st.just(_ABSENT), json_values)
    if request_id is not _ABSENT:
        message["id"] = request_id
    data = _mostly(
        draw,
        st.just(template) | request_data.map(lambda changes: {**template, **changes}),
        request_data,
        json_values,
        st.just(_ABSENT),
    )
    if data is not _ABSENT:
        message["data"] = data
    return message


@st.composite
def request_lines(draw: st.DrawFn) -> tuple[bytes, Any]:
    """
    One line (without its newline) and the id its response must echo, or
    C{...} when that is not known in advance.
    """
    kind = draw(st.sampled_from(["binary", "json", "request", "request", "request"]))
    if kind == "binary":
        return draw(st.binary(max_size=64)).replace(b"\n", b""), ...
    ascii_only = draw(st.booleans())
    if kind == "json":
        return json.dumps(draw(json_values), ensure_ascii=ascii_only).encode(), ...
    message = draw(near_valid())
    request_id = message.get("id")
    valid_id = isinstance(request_id, (str, int)) and not isinstance(request_id, bool)
    return json.dumps(message, ensure_ascii=ascii_only).encode(), request_id if valid_id else None


class FuzzTests(SynchronousTestCase):
    """
    Whatever the lines, one answer each, never a crash, never a hang-up.
    """

    @given(
        lines=st.lists(request_lines(), min_size=1, max_size=8),
        logged_in=st.booleans(),
        cuts=st.lists(st.integers(min_value=0), max_size=6),
        crlf=st.booleans(),
    )
    def test_arbitrary_lines(
        self, lines: list[tuple[bytes, Any]], logged_in: bool, cuts: list[int], crlf: bool
    ) -> None:
        if logged_in:
            lines = [(LOGIN, "login"), *lines]
        service = make_service()
        try:
            client = LineClient(service)
            client.messages()
            ending = b"\r\n" if crlf else b"\n"
            packet = b"".join(raw + ending for raw, _ in lines)
            # Deliver the packet in arbitrary pieces.
            points = sorted({0, len(packet), *(c % (len(packet) + 1) for c in cuts)})
            answers: list[JSON] = []
            for start, end in zip(points, points[1:]):
                answers.extend(send(client, packet[start:end]))
            self.assertEqual(len(answers), len(lines))
            for answer, (raw, expected_id) in zip(answers, lines):
                self.assertIn(answer["ok"], (True, False))
                self.assertIn("opcode", answer)
                if expected_id is not ...:
                    self.assertEqual(answer["id"], expected_id)
                if not answer["ok"]:
                    self.assertNotEqual(answer["error"]["code"], "internal_error", raw)
            self.assertFalse(client.transport.disconnecting)
        finally:
            service.stopService()


class RequestLogTests(ProtocolTestCase):
    def observe(self) -> list[dict[str, Any]]:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        def observer(event: dict[str, Any]) -> None:
            if "opcode" in event and "ms" in event:
                events.append(event)

        globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, observer)  # type: ignore[arg-type]
        return events

    def test_off_by_default(self) -> None:
        events = self.observe()
        self.connect(ALICE).ok(0)
        self.assertEqual(events, [])

    def test_on(self) -> None:
        """
        With log_requests, every request gets one debug event: who, what,
        outcome and time taken.
        """
        events = self.observe()
        client = self.connect()
        client.factory.log_requests = True
        client.protocol.log_requests = True
        client.login(ALICE)
        client.request(42)
        self.assertEqual(
            [(e["opcode"], e["outcome"], e["user"]) for e in events],
            [(1, "ok", "alice"), (42, "unknown_opcode", "alice")],
        )


# -- behind HAProxy: the PROXY protocol -------------------------------------------

HAPROXY = IPv4Address("TCP", "10.0.0.1", 40000)


def proxy_v1(source: str, port: int = 51000) -> bytes:
    """
    A PROXY protocol v1 header: a customer at C{source} connected to HAProxy.
    """
    return f"PROXY TCP4 {source} 10.0.0.2 {port} 65432\r\n".encode()


def proxy_v2(source: str | None, port: int = 51000) -> bytes:
    """
    A PROXY protocol v2 header (what C{send-proxy-v2} sends): a customer at
    C{source} connected to HAProxy, or, for C{None}, the LOCAL command of
    HAProxy's own health checks (no address).
    """
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    if source is None:
        return signature + b"\x20\x00" + struct.pack("!H", 0)
    addresses = socket.inet_aton(source) + socket.inet_aton("10.0.0.2") + struct.pack("!HH", port, 65432)
    return signature + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


class ProxiedClient(LineClient):
    """
    A connection through HAProxy to a server listening with C{--listen
    haproxy:...}: Twisted's PROXY-protocol wrapper (what the C{haproxy:}
    endpoint puts around the factory) over a L{StringTransport} whose peer
    is HAProxy. Bytes fed go to the wrapper, PROXY header first.
    """

    def __init__(self, factory: VendePassFactory) -> None:
        self.factory = factory
        self.wrapper = HAProxyWrappingFactory(factory).buildProtocol(HAPROXY)
        self.transport = StringTransport(peerAddress=HAPROXY)
        self.wrapper.makeConnection(self.transport)
        protocol = self.wrapper.wrappedProtocol
        assert isinstance(protocol, VendePassProtocol)
        self.protocol = protocol
        self._pending = b""
        self.received = []
        self.next_id = 0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.wrapper.dataReceived(data)
        return self.messages()

    @property
    def peer(self) -> str:
        assert self.protocol.session is not None
        return self.protocol.session.peer


class ProxyProtocolTests(ProtocolTestCase):
    """
    Behind HAProxy (C{send-proxy-v2}) a server listening with C{--listen
    haproxy:tcp:...} learns each customer's address from the PROXY header,
    and login throttling counts failures per customer address, not per
    HAProxy.
    """

    def setUp(self) -> None:
        super().setUp()
        self.factory = VendePassFactory(self.service, self.clock, max_connections_per_ip=1000)

    def proxied(self, header: bytes) -> ProxiedClient:
        client = ProxiedClient(self.factory)
        # The welcome is sent at once, before the PROXY header is read.
        [welcome] = client.messages()
        self.assertEqual(welcome["event"], "welcome")
        self.assertEqual(client.peer, "10.0.0.1")
        if header:
            self.assertEqual(client.feed(header), [])
        return client

    def test_peer_is_the_header_source(self) -> None:
        """
        At login the session's peer is the PROXY header's source address,
        v1 or v2, whether the header comes alone or with the first request.
        """
        v1 = self.proxied(proxy_v1("203.0.113.7"))
        v1.login(ALICE)
        self.assertEqual(v1.peer, "203.0.113.7")
        v2 = self.proxied(b"")
        [reply] = v2.feed(proxy_v2("198.51.100.9") + line({"opcode": 1, "id": 1, "data": ALICE_LOGIN}))
        self.assertEqual(reply, success(1, 1, {"username": "alice"}))
        self.assertEqual(v2.peer, "198.51.100.9")
        self.assertEqual(v2.transport.getPeer(), HAPROXY)

    def test_throttling_is_per_customer_address(self) -> None:
        """
        Failed logins from one customer behind HAProxy throttle that
        customer's address only: a customer at another address, through the
        same HAProxy, logs in at once.
        """
        guesser = self.proxied(proxy_v2("203.0.113.7"))
        for _ in range(5):
            self.assertEqual(guesser.error(1, {"username": "nobody_here", "password": "guess"})["code"],
                             "bad_credentials")
        limited = guesser.error(1, ALICE_LOGIN)
        self.assertEqual((limited["code"], limited["retry_after"]), ("rate_limited", 1))
        # Another connection from the guesser's address is throttled too.
        again = self.proxied(proxy_v2("203.0.113.7", port=51001))
        self.assertEqual(again.error(1, ALICE_LOGIN)["code"], "rate_limited")
        # A customer elsewhere is not.
        other = self.proxied(proxy_v2("198.51.100.9"))
        other.login(ALICE)
        self.assertEqual(other.ok(4), {"tickets": []})

    def test_health_check(self) -> None:
        """
        HAProxy's health checks (C{check-send-proxy}) send the LOCAL command,
        without an address: they get the welcome, and the session keeps the
        connection's own peer.
        """
        check = self.proxied(proxy_v2(None))
        self.assertEqual(set(check.ok(0)), {"time"})
        self.assertEqual(check.peer, "10.0.0.1")
        self.assertFalse(check.transport.disconnecting)

    def test_no_header(self) -> None:
        """
        A connection that does not start with a PROXY header (a customer
        reaching the server around HAProxy) is closed at its first bytes:
        the welcome was sent, but no request is answered.
        """
        direct = self.proxied(b"")
        self.assertEqual(direct.feed(line({"opcode": 0, "id": 1})), [])
        self.assertTrue(direct.transport.disconnecting)

    def test_connection_limit_counts_haproxy(self) -> None:
        """
        The per-address connection limit is applied when the connection is
        accepted, before its PROXY header is read: it counts HAProxy's
        connections (hence a high --max-connections-per-ip behind HAProxy,
        which limits each customer address itself).
        """
        self.factory.max_connections_per_ip = 2
        self.proxied(proxy_v2("203.0.113.7"))
        self.proxied(proxy_v2("198.51.100.9"))
        third = ProxiedClient(self.factory)
        [refused] = third.messages()
        self.assertEqual(refused["error"]["code"], "too_many_connections")
        self.assertTrue(third.transport.disconnecting)

    def test_half_close_through_the_wrapper(self) -> None:
        """
        Twisted's PROXY-protocol wrapper passes a half-close on (by
        adaptation) to the protocol inside: answered, then closed. A
        protocol that does not take half-closes is not made to.
        """
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from twisted.internet.protocol import Factory, Protocol

        client = self.proxied(proxy_v2("203.0.113.7"))
        answers = replies(client.feed(line({"id": 1, "opcode": 0}) + b'{"id": 2, "opcode": 0}'))
        self.assertEqual([m["id"] for m in answers], [1])
        half = IHalfCloseableProtocol(client.wrapper, None)
        assert half is not None
        half.readConnectionLost()
        self.assertEqual([m["id"] for m in replies(client.messages())], [2])
        self.assertTrue(client.transport.disconnecting)
        other = HAProxyWrappingFactory(Factory.forProtocol(Protocol)).buildProtocol(HAPROXY)
        self.assertIsNone(IHalfCloseableProtocol(other, None))

    def test_plain_listener_keeps_its_peer(self) -> None:
        """
        Without the wrapper nothing changes: the peer read at connection
        stays the session's (and one set on the session stays too).
        """
        client = LineClient(self.service)
        assert client.protocol.session is not None
        client.protocol.session.peer = "10.9.8.7"
        client.login(ALICE)
        self.assertEqual(client.protocol.session.peer, "10.9.8.7")
        plain = LineClient(self.service)
        plain.login(BOB)
        assert plain.protocol.session is not None
        self.assertEqual(plain.protocol.session.peer, "192.168.1.1")  # StringTransport's peer


# -- issue 16 item 5: half-close, bounded echoes, our own error messages ---------


class HalfCloseTests(ProtocolTestCase):
    """
    A client that sends its requests and then closes its sending side (a TCP
    half-close, C{nc -N}, C{shutdown(SHUT_WR)}) gets every answer, then the
    server closes. The transport calls C{readConnectionLost} (not
    C{connectionLost}) because the protocol provides IHalfCloseableProtocol.
    """

    def test_provides_half_close(self) -> None:
        from twisted.internet.interfaces import IHalfCloseableProtocol

        self.assertTrue(IHalfCloseableProtocol.providedBy(self.connect().protocol))

    def test_answers_then_closes(self) -> None:
        client = self.connect()
        answers = send(client, line({"id": 1, "opcode": 0}) + line({"id": 2, "opcode": 1, "data": ALICE_LOGIN}))
        self.assertEqual([a["id"] for a in answers], [1, 2])
        self.assertFalse(client.transport.disconnecting)
        client.protocol.readConnectionLost()  # type: ignore[attr-defined]
        self.assertTrue(client.transport.disconnecting)

    def test_pending_requests_answered_first(self) -> None:
        """
        A buy waiting for the store when the client half-closes is answered,
        and so are the requests queued behind it; only then is the
        connection closed.
        """
        client = self.connect(ALICE)
        stalled = self.stall("buy")
        packet = line({"id": "b", "opcode": 3, "data": {"flights": [TINY]}}) + line({"id": "p", "opcode": 0})
        self.assertEqual(send(client, packet), [])
        client.protocol.readConnectionLost()  # type: ignore[attr-defined]
        self.assertFalse(client.transport.disconnecting)
        stalled.proceed()
        answers = client.messages()
        self.assertEqual([(a["id"], a["ok"]) for a in answers], [("b", True), ("p", True)])
        self.assertEqual(answers[0]["data"]["ticket"]["legs"], [ticket_leg(TINY, "1A")])
        self.assertTrue(client.transport.disconnecting)

    def test_partial_last_line_is_a_line(self) -> None:
        """
        A last line without its newline is handled as a line: nothing more
        can come to finish it.
        """
        client = self.connect()
        answers = send(client, line({"id": 1, "opcode": 0}) + b'{"id": "last", "opcode": 0}')
        self.assertEqual([a["id"] for a in answers], [1])
        client.protocol.readConnectionLost()  # type: ignore[attr-defined]
        [answer] = replies(client.messages())
        self.assertEqual((answer["id"], answer["ok"]), ("last", True))
        self.assertTrue(client.transport.disconnecting)

    def test_nothing_sent(self) -> None:
        client = self.connect()
        client.protocol.readConnectionLost()  # type: ignore[attr-defined]
        self.assertEqual(client.messages(), [])
        self.assertTrue(client.transport.disconnecting)

    def test_client_not_reading(self) -> None:
        """
        A client that half-closes but does not read: its requests wait for
        the send buffer to drain, are answered, and then it is closed.
        """
        client = self.connect()
        client.request(0)
        client.protocol.pauseProducing()  # the send buffer is full
        send(client, b"".join(line({"id": i, "opcode": 0}) for i in range(3)))
        client.protocol.readConnectionLost()  # type: ignore[attr-defined]
        self.assertFalse(client.transport.disconnecting)
        client.protocol.resumeProducing()
        self.assertEqual([a["id"] for a in replies(client.messages())], [0, 1, 2])
        self.assertTrue(client.transport.disconnecting)

    def test_holds_released_after_close(self) -> None:
        """
        The session lives until the answers are out: a hold answered after
        the half-close is released when the connection is then lost.
        """
        client = self.connect(ALICE)
        send(client, line({"id": "h", "opcode": 6, "data": {"flights": [TINY]}}))
        client.protocol.readConnectionLost()  # type: ignore[attr-defined]
        client.protocol.connectionLost(Failure(ConnectionError()))
        self.assertEqual(seat_statuses(self.connect(), TINY)["1A"], ("free", False))


# The internals of Python that must never reach a customer.
INTERNALS = re.compile(
    r"sys\.|Traceback|int_max_str_digits|Exceeds the limit|[A-Za-z]+(Error|Exception)\b|line \d+ column \d+"
    r"|\(char \d+\)|File \"|0x[0-9a-f]{6,}"
)


class ErrorMessageTests(ProtocolTestCase):
    """
    Error messages are ours: no text of a Python exception reaches the wire.
    """

    def assertOwnMessage(self, reply: JSON, code: str) -> str:
        self.assertEqual(reply["error"]["code"], code)
        message: str = reply["error"]["message"]
        self.assertIsNone(INTERNALS.search(message), message)
        return message

    def test_bad_json_position(self) -> None:
        client = self.connect()
        [reply] = send(client, b'{"opcode": 0,\n')
        message = self.assertOwnMessage(reply, "malformed_json")
        self.assertEqual(message, "The line is not valid JSON: a member name in double quotes was expected at character 14.")

    def test_huge_integer(self) -> None:
        """
        Python refuses to read integers of more than 4,300 digits with a
        message about sys.set_int_max_str_digits().
        """
        client = self.connect(ALICE)
        for raw in [
            b'{"id": 1, "opcode": 2, "data": {"limit": ' + b"9" * 5000 + b"}}",
            b'{"id": 1, "opcode": ' + b"1" * 4301 + b"}",
            b"-" + b"7" * 20000,
        ]:
            [reply] = send(client, raw + b"\n")
            message = self.assertOwnMessage(reply, "malformed_json")
            self.assertEqual(message, "The line is not valid JSON: a number has more than 4300 digits.")
        self.assertOpen(client)

    def test_other_syntax_errors(self) -> None:
        client = self.connect()
        for raw in [b"{", b'{"a": 1,}', b'{"a" 1}', b'{"a": "x', b'{"a": "\\q"}', b'{"a": "\x01"}', b"{} {}", b"nul"]:
            [reply] = send(client, raw + b"\n")
            self.assertOwnMessage(reply, "malformed_json")

    def test_huge_opcode_not_echoed(self) -> None:
        """
        An unknown opcode of thousands of digits is named shortened in the
        message, and not repeated in the error's C{opcode} field.
        """
        client = self.connect()
        opcode = int("9" * 4000)
        [reply] = send(client, line({"id": 1, "opcode": opcode}))
        self.assertOwnMessage(reply, "unknown_opcode")
        self.assertNotIn("opcode", reply["error"], str(reply)[:300])
        self.assertLess(len(json.dumps(reply["error"])), 300, str(reply)[:300])
        [reply] = send(client, line({"id": 1, "opcode": 11}))
        self.assertEqual(reply["error"], error("unknown_opcode", "Unknown opcode 11.", opcode=11))


# What the error of a reply may weigh, whatever the request held.
ERROR_BYTES = 600


class EchoTests(ProtocolTestCase):
    """
    What a request held is echoed in errors shortened to at most 64
    characters (the last an ellipsis), in the message and in the fields.
    """

    LONG = "V" * 60_000

    def assertSmall(self, client: LineClient, opcode: int, data: JSON, code: str) -> JSON:
        raw = line({"id": 1, "opcode": opcode, "data": data})
        client.protocol.dataReceived(raw)
        written = client.transport.value()
        [reply] = replies(client.messages())
        self.assertEqual(reply["error"]["code"], code)
        self.assertLess(len(json.dumps(reply["error"], ensure_ascii=False).encode()), ERROR_BYTES, str(reply)[:300])
        self.assertLess(len(written), ERROR_BYTES + 40)
        return dict(reply["error"])

    def test_unknown_flight(self) -> None:
        client = self.connect(ALICE)
        short = "V" * 63 + "…"
        cases: list[tuple[int, JSON]] = [(8, {"flight": self.LONG}), (6, {"flights": [self.LONG]}), (3, {"flights": [self.LONG]})]
        for opcode, data in cases:
            refused = self.assertSmall(client, opcode, data, "unknown_flight")
            self.assertEqual(refused, error("unknown_flight", f"Unknown flight {short!r}.", flight=short))

    def test_every_echo(self) -> None:
        client = self.connect(ALICE)
        long = self.LONG
        self.assertSmall(client, 6, {"flights": [TINY], "seats": [long]}, "unknown_seat")
        self.assertSmall(client, 7, {"hold_id": long}, "hold_not_found")
        self.assertSmall(client, 3, {"hold_id": long}, "hold_not_found")
        self.assertSmall(client, 5, {"ticket_id": long}, "ticket_not_found")
        self.assertSmall(client, 2, {"origin": long, "destination": "MAO"}, "unknown_airport")
        self.assertSmall(client, 2, {"origin": "SSA", "destination": long}, "unknown_airport")
        self.assertSmall(client, 10, {"username": long, "password": "x" * 20}, "invalid_request")

    def test_short_values_whole(self) -> None:
        """
        64 characters are echoed whole.
        """
        client = self.connect(ALICE)
        flight = "V" * 64
        refused = self.assertSmall(client, 8, {"flight": flight}, "unknown_flight")
        self.assertEqual(refused, error("unknown_flight", f"Unknown flight {flight!r}.", flight=flight))


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.characters(blacklist_categories=["Cs"]), max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


class AnswerEncodingTests(SynchronousTestCase):
    @given(
        st.none() | st.integers() | st.text(st.characters(blacklist_categories=["Cs"]), max_size=8),
        st.integers(0, 10**6),
        _JSON_VALUES,
    )
    def test_pre_encoded_answer(self, request_id: Any, opcode: int, value: Any) -> None:
        """
        An answer whose data was encoded ahead of time is byte for byte
        what the protocol's encoder makes of the same answer, whatever its id.
        """
        raw = wire.RawJSON(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        expected = json.dumps(
            {"id": request_id, "opcode": opcode, "ok": True, "data": value}, ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8") + b"\n"
        self.assertEqual(_encode({"id": request_id, "opcode": opcode, "ok": True, "data": raw}), expected)
