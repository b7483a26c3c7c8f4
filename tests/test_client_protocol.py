"""
The client library (L{vendepass.client.protocol}) against the real server
protocol and reservation service, over L{twisted.test.iosim} in-memory
connections: a real service on a real in-memory SQLite store, time driven by
a L{Clock}.

Nothing here sleeps, opens a socket or touches the global reactor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from vendepass import __version__
from vendepass.client.protocol import ConnectionLost, ServerError, VendePassClientProtocol
from vendepass.protocol import MAX_LINE_BYTES, VendePassFactory, VendePassProtocol
from vendepass.service import ReservationService

from tests.common import ALICE, BIG, BOB, DIRECT, FLIGHTS, START, TINY, TOMORROW, brl, make_service

JSON = dict[str, Any]

# -- the airline of tests/data/mini.json, as the client sees it --------------

HOLD_SECONDS = 60
NOW_ISO = "2026-12-01T09:00:00Z"  # START
HELD_UNTIL_ISO = "2026-12-01T09:01:00Z"  # START + HOLD_SECONDS
THURSDAY = "2026-12-03"  # VP300 (DIRECT) flies; so do VP100 and VP200

TICKET_ID = re.compile(r"^[ABCDEFGHJKMNPQRSTUVWXYZ23456789]{8}$")
HOLD_ID = re.compile(r"^H[0-9a-f]{16}$")

WELCOME: JSON = {"protocol": 1, "server": f"vendepass/{__version__}", "hold_seconds": HOLD_SECONDS}


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


def leg(flight_id: str, seat: str) -> JSON:
    """
    A leg of a hold or a ticket: the flight without its aircraft, and the seat.
    """
    fields = {k: v for k, v in FLIGHTS[flight_id].items() if k != "aircraft"}
    return {**fields, "seat": seat}


# -- connecting the client to the real server --------------------------------


class EventRecorder:
    """
    An C{on_event} callback that remembers what it was given.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def __call__(self, name: str, data: JSON) -> None:
        self.events.append((name, data))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def named(self, name: str) -> list[Any]:
        return [data for event, data in self.events if event == name]


class TappedTransport(FakeTransport):
    """
    An iosim transport that also keeps what its protocol wrote, so tests can
    see the requests the client put on the wire.
    """

    def __init__(self, protocol: VendePassClientProtocol, isServer: bool = False) -> None:
        super().__init__(protocol, isServer)
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        super().write(data)

    def requests(self) -> list[JSON]:
        """
        Every request written so far, decoded.
        """
        return [json.loads(raw) for raw in b"".join(self.written).splitlines()]


@dataclass
class Connection:
    """
    One client connected to the real server over iosim.
    """

    client: VendePassClientProtocol
    server: VendePassProtocol
    pump: IOPump
    recorder: EventRecorder
    wire: TappedTransport

    def flush(self) -> None:
        self.pump.flush()

    def close_from_server(self) -> None:
        """
        The server drops the connection; deliver the close to both ends.
        """
        assert self.server.transport is not None
        self.server.transport.loseConnection()
        self.pump.flush()

    def close_from_client(self) -> None:
        assert self.client.transport is not None
        self.client.transport.loseConnection()
        self.pump.flush()


def connect(service: ReservationService, greet: bool = True) -> Connection:
    """
    Connect a L{VendePassClientProtocol} to a real L{VendePassProtocol} of
    C{service}; with C{greet}, the welcome is delivered already.
    """
    factory = VendePassFactory(service, service.clock)
    recorder = EventRecorder()
    wires: list[TappedTransport] = []

    def tapped(protocol: VendePassClientProtocol) -> TappedTransport:
        wire = TappedTransport(protocol)
        wires.append(wire)
        return wire

    clock = service.clock
    client, server, pump = connectedServerAndClient(
        lambda: factory.buildProtocol(None),
        lambda: VendePassClientProtocol(on_event=recorder),
        clientTransportFactory=tapped,
        greet=greet,
        clock=clock if isinstance(clock, Clock) else None,
    )
    return Connection(client, server, pump, recorder, wires[0])


def detached_client() -> tuple[VendePassClientProtocol, StringTransport, EventRecorder]:
    """
    A client on a L{StringTransport}: the test plays the server, line by line.
    """
    recorder = EventRecorder()
    client = VendePassClientProtocol(on_event=recorder)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, recorder


def line(message: Any) -> bytes:
    """
    C{message} as one line from "the server".
    """
    return json.dumps(message).encode() + b"\n"


def written_requests(transport: StringTransport) -> list[JSON]:
    return [json.loads(raw) for raw in transport.value().splitlines()]


class ClientTestCase(SynchronousTestCase):
    """
    A fresh service (its own in-memory database and L{Clock}) per test, and
    helpers to run client calls to completion.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(hold_seconds=HOLD_SECONDS, clock=self.clock)
        self.addCleanup(self.service.stopService)

    def connect(self, user: tuple[str, str] | None = None, greet: bool = True) -> Connection:
        """
        A new client connection, logged in as C{user} if given.
        """
        conn = connect(self.service, greet=greet)
        if user is not None:
            self.assertEqual(self.result(conn, conn.client.login(*user)), user[0])
        return conn

    def result(self, conn: Connection, d: Deferred[Any]) -> Any:
        """
        Pump C{conn} and return what C{d} fired with.
        """
        conn.flush()
        return self.successResultOf(d)

    def refusal(self, conn: Connection, d: Deferred[Any]) -> ServerError:
        """
        Pump C{conn} and return the L{ServerError} C{d} failed with.
        """
        conn.flush()
        return self.serverErrorOf(d)

    def serverErrorOf(self, d: Deferred[Any]) -> ServerError:
        """
        The L{ServerError} C{d} failed with (already).
        """
        error = self.failureResultOf(d, ServerError).value
        assert isinstance(error, ServerError)
        return error

    def assertServerError(self, error: ServerError, code: str, message: str, **details: Any) -> None:
        self.assertEqual((error.code, error.message, error.details), (code, message, details))
        self.assertEqual(str(error), f"{code}: {message}")

    def assertRefused(self, conn: Connection, d: Deferred[Any], code: str, message: str, **details: Any) -> None:
        self.assertServerError(self.refusal(conn, d), code, message, **details)

    def seats(self, conn: Connection, flight: str) -> dict[str, tuple[str, bool]]:
        """
        C{{seat: (status, mine)}} from the seat map of C{flight}, as C{conn} sees it.
        """
        seatmap = self.result(conn, conn.client.seatmap(flight))
        return {s["seat"]: (s["status"], s["mine"]) for s in seatmap["seats"]}

    def assertConnectionLost(self, d: Deferred[Any]) -> ConnectionLost:
        error = self.failureResultOf(d, ConnectionLost).value
        assert isinstance(error, ConnectionLost)
        return error

    def feed(self, client: VendePassClientProtocol, raw: bytes) -> None:
        """
        Deliver raw bytes from "the server" to C{client}; a client that raises
        (and so, on a real transport, loses its connection) fails the test.
        """
        try:
            client.dataReceived(raw)
        except Exception as e:
            self.fail(f"the client crashed on {raw[:60]!r}: {e!r}")


# -- the welcome ----------------------------------------------------------------


class WelcomeTests(ClientTestCase):
    """
    C{when_welcomed()}, the C{welcome} attribute and the welcome event.
    """

    def test_when_welcomed_before_the_welcome(self) -> None:
        conn = self.connect(greet=False)
        first, second = conn.client.when_welcomed(), conn.client.when_welcomed()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertIsNone(conn.client.welcome)
        conn.flush()
        self.assertEqual(self.successResultOf(first), WELCOME)
        self.assertEqual(self.successResultOf(second), WELCOME)
        self.assertEqual(conn.client.welcome, WELCOME)

    def test_when_welcomed_after_the_welcome(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.client.welcome, WELCOME)
        self.assertEqual(self.successResultOf(conn.client.when_welcomed()), WELCOME)
        # Again: each call gets its own Deferred, fired at once.
        self.assertEqual(self.successResultOf(conn.client.when_welcomed()), WELCOME)

    def test_welcome_event(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.recorder.events, [("welcome", WELCOME)])

    def test_hold_seconds_from_the_server(self) -> None:
        clock = Clock()
        clock.advance(START)
        service = make_service(hold_seconds=300, clock=clock)
        self.addCleanup(service.stopService)
        conn = connect(service)
        self.assertEqual(self.successResultOf(conn.client.when_welcomed())["hold_seconds"], 300)

    def test_second_welcome_keeps_the_first(self) -> None:
        """
        A second welcome event does not replace the first, but is still an event.
        """
        conn = self.connect()
        self.feed(conn.client, b'{"event":"welcome","data":{"protocol":2}}\n')
        self.assertEqual(conn.client.welcome, WELCOME)
        self.assertEqual(conn.recorder.events, [("welcome", WELCOME), ("welcome", {"protocol": 2})])

    def test_welcome_then_calls(self) -> None:
        """
        Calls made before the welcome arrived are answered after it.
        """
        conn = self.connect(greet=False)
        welcomed = conn.client.when_welcomed()
        pinged = conn.client.ping()
        conn.flush()
        self.assertEqual(self.successResultOf(welcomed), WELCOME)
        self.assertEqual(self.successResultOf(pinged), {"time": NOW_ISO})


# -- one test class per group of methods --------------------------------------


class PingAndAccountTests(ClientTestCase):
    """
    ping, register, login, logout.
    """

    def test_ping(self) -> None:
        conn = self.connect()
        self.assertEqual(self.result(conn, conn.client.ping()), {"time": NOW_ISO})
        self.clock.advance(90.5)
        self.assertEqual(self.result(conn, conn.client.ping()), {"time": "2026-12-01T09:01:30Z"})

    def test_register_then_login(self) -> None:
        conn = self.connect()
        self.assertEqual(self.result(conn, conn.client.register("carla", "carla-password")), "carla")
        # register does not log in.
        self.assertRefused(conn, conn.client.tickets(), "not_logged_in", "Log in before tickets.")
        self.assertEqual(self.result(conn, conn.client.login("carla", "carla-password")), "carla")
        self.assertEqual(self.result(conn, conn.client.tickets()), [])

    def test_register_refused(self) -> None:
        conn = self.connect()
        self.assertRefused(
            conn, conn.client.register("alice", "whatever-password"),
            "username_taken", "The username 'alice' is already taken.",
        )
        self.assertRefused(
            conn, conn.client.register("X", "carla-password"),
            "invalid_request", "A username has 3 to 32 characters: lowercase letters, digits and _.",
            field="username",
        )
        self.assertRefused(
            conn, conn.client.register("carla", "short"),
            "invalid_request", "A password has 8 to 256 characters.", field="password",
        )

    def test_bad_credentials(self) -> None:
        conn = self.connect()
        for username, password in [("alice", "bob-password"), ("nobody", "alice-password")]:
            self.assertRefused(
                conn, conn.client.login(username, password), "bad_credentials", "Wrong username or password."
            )
        self.assertRefused(conn, conn.client.tickets(), "not_logged_in", "Log in before tickets.")

    def test_logout(self) -> None:
        conn = self.connect(ALICE)
        self.assertEqual(self.result(conn, conn.client.logout()), {})
        self.assertRefused(conn, conn.client.tickets(), "not_logged_in", "Log in before tickets.")
        self.assertRefused(conn, conn.client.logout(), "not_logged_in", "Log in before logout.")

    def test_login_switches_user(self) -> None:
        conn = self.connect(ALICE)
        self.assertEqual(self.result(conn, conn.client.login(*BOB)), "bob")
        self.result(conn, conn.client.buy(flights=[TINY]))
        alice = self.connect(ALICE)
        self.assertEqual(self.result(alice, alice.client.tickets()), [])


class RoutesTests(ClientTestCase):
    """
    routes (the network) and search (itineraries).
    """

    def test_routes(self) -> None:
        conn = self.connect()
        self.assertEqual(self.result(conn, conn.client.routes()), {"airports": AIRPORTS, "routes": ROUTES})

    def test_search_with_date(self) -> None:
        conn = self.connect()
        itineraries = self.result(conn, conn.client.search("SSA", "MAO", date=TOMORROW))
        self.assertEqual(
            itineraries,
            [
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
        )

    def test_search_max_legs(self) -> None:
        conn = self.connect()
        both = self.result(conn, conn.client.search("SSA", "MAO", date=THURSDAY))
        self.assertEqual(
            [[leg["flight"] for leg in i["legs"]] for i in both],
            [["VP100-2026-12-03", "VP200-2026-12-03"], [DIRECT]],
        )
        [direct] = self.result(conn, conn.client.search("SSA", "MAO", date=THURSDAY, max_legs=1))
        self.assertEqual(direct["legs"], [{**FLIGHTS[DIRECT], "free_seats": 180}])
        self.assertEqual((direct["duration_minutes"], direct["price"]), (210, brl("749.50")))

    def test_search_include_sold_out(self) -> None:
        conn = self.connect(ALICE)
        for _ in range(4):
            self.result(conn, conn.client.buy(flights=[TINY]))
        self.assertEqual(self.result(conn, conn.client.search("SSA", "REC", date=TOMORROW)), [])
        self.assertEqual(
            self.result(conn, conn.client.search("SSA", "REC", date=TOMORROW, include_sold_out=False)), []
        )
        [sold_out] = self.result(conn, conn.client.search("SSA", "REC", date=TOMORROW, include_sold_out=True))
        self.assertEqual((sold_out["free_seats"], sold_out["legs"][0]["flight"]), (0, TINY))

    def test_search_limit_without_date(self) -> None:
        conn = self.connect()
        itineraries = self.result(conn, conn.client.search("SSA", "REC", limit=3))
        self.assertEqual(
            [i["legs"][0]["flight"] for i in itineraries],
            ["VP100-2026-12-01", TINY, "VP100-2026-12-03"],
        )

    def test_search_sort_and_offset(self) -> None:
        """
        C{sort} and C{offset} reach the server; L{search_page} gives the
        whole answer, with C{next_offset} when it was cut.
        """
        conn = self.connect()
        by_price = self.result(conn, conn.client.search("SSA", "MAO", limit=2, sort="price"))
        self.assertEqual([i["legs"][0]["flight"] for i in by_price], ["VP300-2026-12-01", DIRECT])
        page = self.result(conn, conn.client.search_page("SSA", "MAO", limit=2, sort="price", offset=1))
        self.assertEqual([i["legs"][0]["flight"] for i in page["itineraries"]], [DIRECT, "VP300-2026-12-05"])
        self.assertEqual(page["next_offset"], 3)
        self.assertEqual(page["sales_window"], {"first": "2026-12-01", "last": "2026-12-31"})
        whole = self.result(conn, conn.client.search_page("SSA", "MAO", limit=500))
        self.assertNotIn("next_offset", whole)

    def test_search_refused(self) -> None:
        conn = self.connect()
        self.assertRefused(
            conn, conn.client.search("SSA", "XXX"), "unknown_airport", "Unknown airport 'XXX'.", airport="XXX"
        )
        self.assertRefused(
            conn, conn.client.search("SSA", "ssa"),
            "invalid_request", "'origin' and 'destination' must differ.", field="destination",
        )
        self.assertRefused(
            conn, conn.client.search("SSA", "REC", limit=0),
            "invalid_request", "Field 'limit' must be between 1 and 500.", field="limit",
        )


class SeatmapTests(ClientTestCase):
    def test_seatmap(self) -> None:
        conn = self.connect()
        self.assertEqual(
            self.result(conn, conn.client.seatmap(TINY)),
            {
                "flight": FLIGHTS[TINY],
                "rows": 2,
                "letters": "AB",
                "seats": [{"seat": s, "status": "free", "mine": False} for s in ["1A", "1B", "2A", "2B"]],
            },
        )

    def test_seatmap_mine(self) -> None:
        alice = self.connect(ALICE)
        bob = self.connect(BOB)
        self.result(alice, alice.client.hold([TINY], ["1A"]))
        self.result(bob, bob.client.buy(flights=[TINY], seats=["2B"]))
        self.assertEqual(
            self.seats(alice, TINY),
            {"1A": ("held", True), "1B": ("free", False), "2A": ("free", False), "2B": ("sold", False)},
        )
        self.assertEqual(
            self.seats(bob, TINY),
            {"1A": ("held", False), "1B": ("free", False), "2A": ("free", False), "2B": ("sold", True)},
        )

    def test_unknown_flight(self) -> None:
        conn = self.connect()
        self.assertRefused(
            conn, conn.client.seatmap("VP999-2026-12-02"),
            "unknown_flight", "Unknown flight 'VP999-2026-12-02'.", flight="VP999-2026-12-02",
        )


class HoldTests(ClientTestCase):
    """
    hold (chosen seats and server-picked) and release.
    """

    def test_hold_chosen_seats(self) -> None:
        conn = self.connect(ALICE)
        held = self.result(conn, conn.client.hold([TINY, BIG], ["2B", "30F"]))
        self.assertRegex(held["hold_id"], HOLD_ID)
        self.assertEqual(
            held,
            {
                "hold_id": held["hold_id"],
                "expires_at": HELD_UNTIL_ISO,
                "legs": [leg(TINY, "2B"), leg(BIG, "30F")],
                "price": brl("849.90"),
            },
        )
        self.assertEqual(self.seats(conn, TINY)["2B"], ("held", True))

    def test_hold_server_picks(self) -> None:
        conn = self.connect(ALICE)
        first = self.result(conn, conn.client.hold([TINY]))
        self.assertEqual(first["legs"], [leg(TINY, "1A")])
        # None in seats: the server picks that leg's seat.
        second = self.result(conn, conn.client.hold([TINY, BIG], [None, "5C"]))
        self.assertEqual(second["legs"], [leg(TINY, "1B"), leg(BIG, "5C")])
        self.assertNotEqual(first["hold_id"], second["hold_id"])

    def test_seat_unavailable(self) -> None:
        alice = self.connect(ALICE)
        bob = self.connect(BOB)
        self.result(alice, alice.client.hold([TINY], ["2B"]))
        self.clock.advance(10)
        error = self.refusal(bob, bob.client.hold([TINY], ["2B"]))
        self.assertServerError(
            error,
            "seat_unavailable",
            f"Seat 2B on flight {TINY} is held until {HELD_UNTIL_ISO}.",
            flight=TINY,
            seat="2B",
            held_until=HELD_UNTIL_ISO,
        )
        self.assertEqual(error.details["seat"], "2B")
        self.assertEqual(error.details["held_until"], HELD_UNTIL_ISO)

    def test_hold_needs_login(self) -> None:
        conn = self.connect()
        self.assertRefused(conn, conn.client.hold([TINY]), "not_logged_in", "Log in before hold.")

    def test_sold_out(self) -> None:
        conn = self.connect(ALICE)
        for _ in range(4):
            self.result(conn, conn.client.hold([TINY]))
        self.assertRefused(conn, conn.client.hold([TINY]), "sold_out", f"Flight {TINY} is sold out.", flight=TINY)

    def test_release(self) -> None:
        conn = self.connect(ALICE)
        held = self.result(conn, conn.client.hold([TINY], ["1B"]))
        self.assertEqual(self.result(conn, conn.client.release(held["hold_id"])), {})
        self.assertEqual(self.seats(conn, TINY)["1B"], ("free", False))
        self.assertRefused(
            conn, conn.client.release(held["hold_id"]),
            "hold_not_found", f"No hold {held['hold_id']!r}.", hold_id=held["hold_id"],
        )
        # Released, so no hold_expired event later.
        self.clock.advance(HOLD_SECONDS * 2)
        conn.flush()
        self.assertEqual(conn.recorder.named("hold_expired"), [])


class BuyTests(ClientTestCase):
    """
    buy (a hold, or in one step), tickets and cancel.
    """

    def test_buy_hold(self) -> None:
        conn = self.connect(ALICE)
        held = self.result(conn, conn.client.hold([TINY, BIG], ["1A", "1A"]))
        self.clock.advance(30)
        ticket = self.result(conn, conn.client.buy(hold_id=held["hold_id"]))
        self.assertRegex(ticket["ticket_id"], TICKET_ID)
        self.assertEqual(
            ticket,
            {
                "ticket_id": ticket["ticket_id"],
                "status": "active",
                "legs": [leg(TINY, "1A"), leg(BIG, "1A")],
                "price": brl("849.90"),
                "bought_at": "2026-12-01T09:00:30Z",
                "cancelled_at": None,
            },
        )
        self.assertEqual(self.seats(conn, TINY)["1A"], ("sold", True))
        # Bought: no longer a hold.
        self.assertRefused(
            conn, conn.client.buy(hold_id=held["hold_id"]),
            "hold_not_found", f"No hold {held['hold_id']!r}.", hold_id=held["hold_id"],
        )

    def test_buy_in_one_step(self) -> None:
        conn = self.connect(ALICE)
        picked = self.result(conn, conn.client.buy(flights=[DIRECT]))
        self.assertEqual(picked["legs"], [leg(DIRECT, "1A")])
        self.assertEqual(picked["price"], brl("749.50"))
        chosen = self.result(conn, conn.client.buy(flights=[TINY, BIG], seats=["2A", None]))
        self.assertEqual(chosen["legs"], [leg(TINY, "2A"), leg(BIG, "1A")])
        self.assertEqual(self.result(conn, conn.client.tickets()), [chosen, picked])

    def test_request_id_passes_through(self) -> None:
        conn = self.connect(ALICE)
        ticket = self.result(conn, conn.client.buy(flights=[TINY], request_id="buy-1"))
        self.result(conn, conn.client.cancel(ticket["ticket_id"], request_id="cancel-1"))
        self.result(conn, conn.client.buy(flights=[TINY]))
        buy_1, cancel_1, buy_2 = conn.wire.requests()[-3:]
        self.assertEqual(buy_1["data"], {"flights": [TINY], "request_id": "buy-1"})
        self.assertEqual(cancel_1["data"], {"ticket_id": ticket["ticket_id"], "request_id": "cancel-1"})
        # No request_id given: the library makes a fresh one for every changing call.
        self.assertEqual(set(buy_2["data"]), {"flights", "request_id"})
        self.assertRegex(buy_2["data"]["request_id"], r"^[0-9a-f]{32}$")
        self.assertNotIn(buy_2["data"]["request_id"], {"buy-1", "cancel-1"})

    def test_buy_refused(self) -> None:
        alice = self.connect(ALICE)
        bob = self.connect(BOB)
        self.result(alice, alice.client.buy(flights=[TINY], seats=["1A"]))
        self.assertRefused(
            bob, bob.client.buy(flights=[TINY], seats=["1A"]),
            "seat_unavailable", f"Seat 1A on flight {TINY} is sold.", flight=TINY, seat="1A",
        )
        self.assertRefused(
            bob, bob.client.buy(hold_id="H0000000000000000", flights=[TINY]),
            "invalid_request", "Give either 'hold_id' or 'flights', not both.", field="flights",
        )
        self.assertRefused(
            bob, bob.client.buy(),
            "invalid_request", "Give 'hold_id', or 'flights' to hold and buy in one step.", field="hold_id",
        )
        logged_out = self.connect()
        self.assertRefused(logged_out, logged_out.client.buy(flights=[TINY]), "not_logged_in", "Log in before buy.")

    def test_buy_expired_hold(self) -> None:
        conn = self.connect(ALICE)
        held = self.result(conn, conn.client.hold([TINY]))
        self.clock.advance(HOLD_SECONDS + 1)
        self.assertRefused(
            conn, conn.client.buy(hold_id=held["hold_id"]),
            "hold_expired", f"Hold {held['hold_id']} has expired; its seats are free again.", hold_id=held["hold_id"],
        )

    def test_tickets_and_cancel(self) -> None:
        conn = self.connect(ALICE)
        self.assertEqual(self.result(conn, conn.client.tickets()), [])
        ticket = self.result(conn, conn.client.buy(flights=[TINY]))
        self.assertEqual(self.result(conn, conn.client.tickets()), [ticket])
        self.clock.advance(60)
        cancelled = self.result(conn, conn.client.cancel(ticket["ticket_id"]))
        self.assertEqual(cancelled, {**ticket, "status": "cancelled", "cancelled_at": "2026-12-01T09:01:00Z"})
        self.assertEqual(self.result(conn, conn.client.tickets()), [cancelled])
        self.assertEqual(self.seats(conn, TINY)["1A"], ("free", False))
        # Tickets belong to the user: seen from any connection.
        other = self.connect(ALICE)
        self.assertEqual(self.result(other, other.client.tickets()), [cancelled])

    def test_tickets_follow_cursors(self) -> None:
        """
        C{tickets()} follows the server's cursors (pages of 200) and lists
        every ticket, newest first; C{active_only} leaves out cancelled
        ones; C{tickets_page} is one answer, with its C{next_cursor}.
        """
        conn = self.connect(ALICE)
        bought = []
        for _ in range(203):
            ticket = self.result(conn, conn.client.buy(flights=[BIG]))
            self.result(conn, conn.client.cancel(ticket["ticket_id"]))
            bought.append(ticket["ticket_id"])
        active = self.result(conn, conn.client.buy(flights=[BIG]))["ticket_id"]
        listed = self.result(conn, conn.client.tickets())
        self.assertEqual([t["ticket_id"] for t in listed], [active, *bought[::-1]])
        self.assertEqual([t["ticket_id"] for t in self.result(conn, conn.client.tickets(active_only=True))], [active])
        page = self.result(conn, conn.client.tickets_page(limit=2))
        self.assertEqual([t["ticket_id"] for t in page["tickets"]], [active, bought[-1]])
        page = self.result(conn, conn.client.tickets_page(limit=2, cursor=page["next_cursor"]))
        self.assertEqual([t["ticket_id"] for t in page["tickets"]], bought[-2:-4:-1])

    def test_cancel_refused(self) -> None:
        alice = self.connect(ALICE)
        bob = self.connect(BOB)
        ticket = self.result(alice, alice.client.buy(flights=[TINY]))
        ticket_id = ticket["ticket_id"]
        # Bob may not learn that Alice's ticket exists.
        self.assertRefused(
            bob, bob.client.cancel(ticket_id), "ticket_not_found", f"No ticket {ticket_id!r}.", ticket_id=ticket_id
        )
        self.assertRefused(
            alice, alice.client.cancel("ABCDEFGH"), "ticket_not_found", "No ticket 'ABCDEFGH'.", ticket_id="ABCDEFGH"
        )
        self.result(alice, alice.client.cancel(ticket_id))
        self.assertRefused(
            alice, alice.client.cancel(ticket_id),
            "already_cancelled", f"Ticket {ticket_id} is already cancelled.", ticket_id=ticket_id,
        )


# -- pipelining ---------------------------------------------------------------------


class PipeliningTests(ClientTestCase):
    """
    Several calls in flight at once, each answered with its own result.
    """

    def test_pipelined_calls(self) -> None:
        conn = self.connect()
        client = conn.client
        login = client.login(*ALICE)
        ping = client.ping()
        tiny = client.seatmap(TINY)
        big = client.seatmap(BIG)
        held = client.hold([TINY], ["1A"])
        taken = client.hold([TINY], ["1A"])  # own hold blocks too
        unknown = client.seatmap("VP999-2026-12-02")
        bought = client.buy(flights=[TINY, BIG], seats=["2A", "2A"])
        tickets = client.tickets()
        bad_cancel = client.cancel("ABCDEFGH")
        search = client.search("SSA", "MAO", date=TOMORROW)
        for d in [login, ping, tiny, big, held, taken, unknown, bought, tickets, bad_cancel, search]:
            self.assertNoResult(d)
        conn.flush()

        self.assertEqual(self.successResultOf(login), "alice")
        self.assertEqual(self.successResultOf(ping), {"time": NOW_ISO})
        self.assertEqual(self.successResultOf(tiny)["flight"], FLIGHTS[TINY])
        self.assertEqual(self.successResultOf(big)["flight"], FLIGHTS[BIG])
        hold_result = self.successResultOf(held)
        self.assertEqual(hold_result["legs"], [leg(TINY, "1A")])
        self.assertServerError(
            self.serverErrorOf(taken),
            "seat_unavailable",
            f"Seat 1A on flight {TINY} is held until {HELD_UNTIL_ISO}.",
            flight=TINY,
            seat="1A",
            held_until=HELD_UNTIL_ISO,
        )
        self.assertEqual(self.serverErrorOf(unknown).code, "unknown_flight")
        ticket = self.successResultOf(bought)
        self.assertEqual(ticket["legs"], [leg(TINY, "2A"), leg(BIG, "2A")])
        self.assertEqual(self.successResultOf(tickets), [ticket])
        self.assertEqual(self.serverErrorOf(bad_cancel).code, "ticket_not_found")
        [itinerary] = self.successResultOf(search)
        # One seat held and one sold on TINY by the calls before.
        self.assertEqual([leg["free_seats"] for leg in itinerary["legs"]], [2, 179])

    def test_ids_on_the_wire(self) -> None:
        """
        Each request carries its own id; requests without arguments carry no data.
        """
        conn = self.connect()
        for d in [conn.client.ping(), conn.client.routes(), conn.client.seatmap(TINY)]:
            self.result(conn, d)
        requests = conn.wire.requests()
        self.assertEqual([r["opcode"] for r in requests], [0, 2, 8])
        self.assertEqual(len({r["id"] for r in requests}), 3)
        self.assertEqual([sorted(r) for r in requests], [["id", "opcode"], ["id", "opcode"], ["data", "id", "opcode"]])

    def test_answers_matched_by_id_not_order(self) -> None:
        """
        The real server answers in order; answers out of order still reach
        the right Deferreds, because they are matched by id.
        """
        client, transport, recorder = detached_client()
        first, second, third = client.ping(), client.tickets(), client.seatmap(TINY)
        ids = [r["id"] for r in written_requests(transport)]
        self.assertEqual(len(set(ids)), 3)
        self.feed(client, line({"id": ids[2], "opcode": 8, "ok": True, "data": {"flight": "third"}}))
        boom = {"code": "internal_error", "message": "boom"}
        self.feed(client, line({"id": ids[0], "opcode": 0, "ok": False, "error": boom}))
        self.assertNoResult(second)
        self.feed(client, line({"id": ids[1], "opcode": 4, "ok": True, "data": {"tickets": ["t"]}}))
        self.assertEqual(self.successResultOf(third), {"flight": "third"})
        self.assertEqual(self.serverErrorOf(first).code, "internal_error")
        self.assertEqual(self.successResultOf(second), ["t"])
        self.assertEqual(recorder.events, [])

    def test_answer_to_no_call_is_ignored(self) -> None:
        conn = self.connect()
        pinged = conn.client.ping()
        self.feed(conn.client, b'{"id":999,"opcode":0,"ok":true,"data":{"time":"never asked"}}\n')
        self.feed(conn.client, b'{"id":"1","opcode":0,"ok":true,"data":{"time":"a string id"}}\n')
        self.assertNoResult(pinged)
        self.assertEqual(self.result(conn, pinged), {"time": NOW_ISO})
        self.assertEqual(conn.recorder.names(), ["welcome"])


# -- events -----------------------------------------------------------------------


class EventTests(ClientTestCase):
    """
    Events pushed by the server reach C{on_event}.
    """

    def test_hold_expired(self) -> None:
        conn = self.connect(ALICE)
        held = self.result(conn, conn.client.hold([TINY], ["1A"]))
        self.clock.advance(HOLD_SECONDS - 1)
        conn.flush()
        self.assertEqual(conn.recorder.named("hold_expired"), [])
        self.clock.advance(1)
        conn.flush()
        self.assertEqual(conn.recorder.events, [("welcome", WELCOME), ("hold_expired", {"hold_id": held["hold_id"]})])
        # Once only.
        self.clock.advance(HOLD_SECONDS * 5)
        conn.flush()
        self.assertEqual(len(conn.recorder.named("hold_expired")), 1)
        # The seat is free, and the hold cannot be bought.
        other = self.connect(BOB)
        self.assertEqual(self.seats(other, TINY)["1A"], ("free", False))
        self.assertRefused(
            conn, conn.client.buy(hold_id=held["hold_id"]),
            "hold_expired", f"Hold {held['hold_id']} has expired; its seats are free again.", hold_id=held["hold_id"],
        )

    def test_event_between_answers(self) -> None:
        """
        An event arriving while calls are in flight does not disturb them.
        """
        conn = self.connect(ALICE)
        held = self.result(conn, conn.client.hold([TINY]))
        pinged = conn.client.ping()
        self.clock.advance(HOLD_SECONDS)
        self.assertEqual(self.result(conn, pinged), {"time": HELD_UNTIL_ISO})
        self.assertEqual(conn.recorder.named("hold_expired"), [{"hold_id": held["hold_id"]}])

    def test_only_the_holding_connection(self) -> None:
        alice = self.connect(ALICE)
        other_alice = self.connect(ALICE)
        self.result(alice, alice.client.hold([TINY]))
        self.clock.advance(HOLD_SECONDS)
        alice.flush()
        other_alice.flush()
        self.assertEqual(len(alice.recorder.named("hold_expired")), 1)
        self.assertEqual(other_alice.recorder.names(), ["welcome"])

    def test_without_on_event(self) -> None:
        """
        Without an C{on_event} callback, events are simply dropped.
        """
        factory = VendePassFactory(self.service, self.clock)
        client, server, pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), VendePassClientProtocol, clock=self.clock
        )
        self.assertEqual(self.successResultOf(client.when_welcomed()), WELCOME)
        login = client.login(*ALICE)
        hold = client.hold([TINY])
        pump.flush()
        self.successResultOf(login)
        self.successResultOf(hold)
        self.clock.advance(HOLD_SECONDS)
        pump.flush()
        self.feed(client, b'{"id":null,"opcode":null,"ok":false,"error":{"code":"x","message":"y"}}\n')
        assert server.transport is not None
        server.transport.loseConnection()
        pump.flush()
        self.assertConnectionLost(client.ping())


# -- losing the connection ------------------------------------------------------------


class ConnectionLostTests(ClientTestCase):
    """
    A dropped connection fails what is pending, and everything after.
    """

    def test_server_closes_with_calls_pending(self) -> None:
        conn = self.connect(ALICE)
        pending: list[Deferred[Any]] = [
            conn.client.ping(),
            conn.client.tickets(),
            conn.client.hold([TINY]),
            conn.client.seatmap("nope"),
        ]
        # The requests reach the server, but the answers are lost with the connection.
        conn.close_from_server()
        errors = [self.assertConnectionLost(d) for d in pending]
        self.assertIn("The connection to the server was lost", str(errors[0]))
        self.assertEqual(conn.recorder.names(), ["welcome", "connection_lost"])
        [lost] = conn.recorder.named("connection_lost")
        self.assertEqual(set(lost), {"reason"})
        self.assertIsInstance(lost["reason"], str)
        self.assertIn(lost["reason"], str(errors[0]))

    def test_calls_after_the_loss_fail_at_once(self) -> None:
        conn = self.connect()
        conn.close_from_server()
        client = conn.client
        calls: list[Deferred[Any]] = [
            client.ping(),
            client.login(*ALICE),
            client.register("carla", "carla-password"),
            client.logout(),
            client.routes(),
            client.search("SSA", "REC"),
            client.seatmap(TINY),
            client.hold([TINY]),
            client.release("H0000000000000000"),
            client.buy(flights=[TINY]),
            client.tickets(),
            client.cancel("ABCDEFGH"),
        ]
        for d in calls:
            self.assertConnectionLost(d)
        # Nothing more was written, and on_event heard of the loss once.
        self.assertEqual(conn.wire.requests(), [])
        self.assertEqual(conn.recorder.names(), ["welcome", "connection_lost"])

    def test_client_closes(self) -> None:
        conn = self.connect()
        self.result(conn, conn.client.ping())
        conn.close_from_client()
        self.assertEqual(conn.recorder.names(), ["welcome", "connection_lost"])
        self.assertConnectionLost(conn.client.ping())

    def test_when_welcomed_before_welcome_then_lost(self) -> None:
        client, transport, recorder = detached_client()
        welcomed = client.when_welcomed()
        pinged = client.ping()
        client.connectionLost(Failure(ConnectionDone()))
        self.assertConnectionLost(welcomed)
        self.assertConnectionLost(pinged)
        # Later waiters fail at once too.
        self.assertConnectionLost(client.when_welcomed())
        self.assertIsNone(client.welcome)
        self.assertEqual(recorder.names(), ["connection_lost"])

    def test_when_welcomed_after_the_loss(self) -> None:
        """
        After the loss, when_welcomed() fails with ConnectionLost, even though
        the welcome came before it.
        """
        conn = self.connect()
        conn.close_from_server()
        self.assertConnectionLost(conn.client.when_welcomed())

    def test_never_connected(self) -> None:
        client = VendePassClientProtocol()
        error = self.assertConnectionLost(client.ping())
        self.assertEqual(str(error), "Not connected.")

    def test_close_releases_holds(self) -> None:
        alice = self.connect(ALICE)
        bob = self.connect(BOB)
        held = self.result(alice, alice.client.hold([TINY, BIG], ["2A", "2A"]))
        self.assertEqual(self.seats(bob, TINY)["2A"], ("held", False))
        self.assertEqual(self.seats(bob, BIG)["2A"], ("held", False))
        alice.close_from_client()
        # At once: no clock advance.
        self.assertEqual(self.seats(bob, TINY)["2A"], ("free", False))
        self.assertEqual(self.seats(bob, BIG)["2A"], ("free", False))
        self.assertEqual(self.result(bob, bob.client.hold([TINY], ["2A"]))["legs"], [leg(TINY, "2A")])
        # The closed connection's hold is gone for Alice's other connections too.
        other = self.connect(ALICE)
        self.assertRefused(
            other, other.client.buy(hold_id=held["hold_id"]),
            "hold_not_found", f"No hold {held['hold_id']!r}.", hold_id=held["hold_id"],
        )
        # And it never expires onto the closed connection.
        self.clock.advance(HOLD_SECONDS * 2)
        alice.flush()
        self.assertEqual(alice.recorder.names(), ["welcome", "connection_lost"])

    def test_server_closes_after_line_too_long(self) -> None:
        """
        The server's line_too_long error (id null) reaches on_event("error"),
        then the connection closes: the call sent before the long line was
        answered, the ones after it fail with ConnectionLost.
        """
        conn = self.connect()
        pinged = conn.client.ping()
        assert conn.client.transport is not None
        conn.client.transport.write(b"x" * (MAX_LINE_BYTES + 10) + b"\n")
        after = conn.client.tickets()
        conn.flush()
        self.assertEqual(self.successResultOf(pinged), {"time": NOW_ISO})
        self.assertConnectionLost(after)
        self.assertEqual(conn.recorder.names(), ["welcome", "error", "connection_lost"])
        self.assertEqual(
            conn.recorder.named("error"),
            [
                {
                    "code": "line_too_long",
                    "message": f"A line may have at most {MAX_LINE_BYTES} bytes; closing the connection.",
                }
            ],
        )
        self.assertConnectionLost(conn.client.ping())

    def test_answer_longer_than_the_client_allows(self) -> None:
        """
        An answer longer than the client's MAX_LENGTH closes the connection,
        failing the call.
        """
        conn = self.connect()
        conn.client.MAX_LENGTH = 200
        network = conn.client.routes()
        conn.flush()
        self.assertConnectionLost(network)
        self.assertEqual(conn.recorder.names(), ["welcome", "connection_lost"])

    def test_errback_may_call_again(self) -> None:
        """
        A pending call's errback that makes a new call gets ConnectionLost at
        once, not a hang.
        """
        conn = self.connect()
        retried: list[Deferred[JSON]] = []

        def retry(failure: Failure) -> Failure:
            retried.append(conn.client.ping())
            return failure

        first = conn.client.ping()
        first.addErrback(retry)
        conn.close_from_server()
        self.assertConnectionLost(first)
        [again] = retried
        self.assertConnectionLost(again)


# -- what the server should never send -------------------------------------------------


class UnreadableLineTests(ClientTestCase):
    """
    Lines the client cannot use are ignored; the connection goes on.
    """

    def assertStillWorks(self, conn: Connection) -> None:
        self.assertEqual(self.result(conn, conn.client.ping()), {"time": NOW_ISO})

    def test_garbage_lines(self) -> None:
        conn = self.connect()
        pending = conn.client.ping()
        for raw in [
            b"{bad\n",
            b"\xff\xfe not utf-8\n",
            b"\n",
            b"\r\n",
            b"[1, 2]\n",
            b'"a string"\n',
            b"null\n",
            b"42\n",
        ]:
            self.feed(conn.client, raw)
        self.assertNoResult(pending)
        self.assertEqual(self.result(conn, pending), {"time": NOW_ISO})
        self.assertEqual(conn.recorder.names(), ["welcome"])
        self.assertStillWorks(conn)

    def test_unsolicited_error(self) -> None:
        conn = self.connect()
        pending = conn.client.ping()
        error = {"code": "malformed_json", "message": "The line is not valid JSON."}
        self.feed(conn.client, line({"id": None, "opcode": None, "ok": False, "error": error}))
        self.assertEqual(conn.recorder.events, [("welcome", WELCOME), ("error", error)])
        self.assertNoResult(pending)
        self.assertEqual(self.result(conn, pending), {"time": NOW_ISO})

    def test_unsolicited_error_from_the_server(self) -> None:
        """
        A request the client library did not send (written raw) gets an
        error with id null; it reaches on_event, and pending calls go on.
        """
        conn = self.connect()
        assert conn.client.transport is not None
        conn.client.transport.write(b"{not json\n")
        pinged = conn.client.ping()
        conn.flush()
        [error] = conn.recorder.named("error")
        self.assertEqual(error["code"], "malformed_json")
        self.assertEqual(self.successResultOf(pinged), {"time": NOW_ISO})

    def test_deeply_nested_json(self) -> None:
        conn = self.connect()
        self.feed(conn.client, b"[" * 100_000 + b"\n")
        self.assertStillWorks(conn)

    def test_unhashable_id(self) -> None:
        """
        A response whose id is a list or an object, while a call is pending.
        """
        conn = self.connect()
        pending = conn.client.ping()
        self.feed(conn.client, b'{"id":[1],"opcode":0,"ok":true,"data":{}}\n')
        self.feed(conn.client, b'{"id":{"a":1},"opcode":0,"ok":false,"error":{"code":"x","message":"y"}}\n')
        self.assertEqual(self.result(conn, pending), {"time": NOW_ISO})

    def test_error_not_an_object(self) -> None:
        """
        A refusal whose C{error} is not an object still fails its call (with
        a ServerError), rather than crashing the client and leaving the call
        hanging.
        """
        client, transport, recorder = detached_client()
        pending = client.ping()
        [request] = written_requests(transport)
        self.feed(client, line({"id": request["id"], "opcode": 0, "ok": False, "error": "boom"}))
        self.assertIsInstance(self.failureResultOf(pending).value, ServerError)

    def test_unsolicited_error_not_an_object(self) -> None:
        client, transport, recorder = detached_client()
        pending = client.ping()
        self.feed(client, line({"id": None, "opcode": None, "ok": False, "error": "boom"}))
        [request] = written_requests(transport)
        self.feed(client, line({"id": request["id"], "opcode": 0, "ok": True, "data": {"time": NOW_ISO}}))
        self.assertEqual(self.successResultOf(pending), {"time": NOW_ISO})
