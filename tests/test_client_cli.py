"""
The scriptable subcommands of C{vendepass-client}: L{cli.main} run in this
process against a real server listening on a loopback port (the real
reactor, a real socket, a real service on a real SQLite store whose time is
a L{Clock}).

Output is asserted in English (C{--lang en}); one check of Brazilian
Portuguese looks only at number formats, which do not depend on the
translation catalog.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, datetime
from io import StringIO
from pathlib import Path
from typing import Any, cast

from attrs import frozen
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorCore, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from vendepass.client import cli
from vendepass.protocol import VendePassFactory, VendePassProtocol
from vendepass.service import ReservationService

from tests.common import ALICE, BIG, BOB, DIRECT, START, TINY, TOMORROW, LineClient, make_service
from tests.test_end_to_end import DEADLINE, ServerProcess

JSON = dict[str, Any]

# Opcodes of protocol v1 (docs/protocol.md), for the in-memory second customer.
HOLD, BUY, SEATMAP = 6, 3, 8

# Seconds a cleanup waits for the server's connections to close on their own
# before it aborts them.
CLOSE_GRACE = 10.0


def tcp() -> IReactorTCP:
    return cast(IReactorTCP, _reactor)


def clock() -> IReactorTime:
    return cast(IReactorTime, _reactor)


def core() -> IReactorCore:
    return cast(IReactorCore, _reactor)


# -- a real server on a loopback port ----------------------------------------


class TrackedProtocol(VendePassProtocol):
    """
    A server connection that tells its factory when it closes.
    """

    factory: TrackingFactory

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.forget(self)


class TrackingFactory(VendePassFactory):
    """
    The server's factory, knowing its open connections, so a test can wait
    until all of them are closed (no socket outlives the test).
    """

    def __init__(self, service: ReservationService) -> None:
        super().__init__(service, service.clock)
        self.connections: set[TrackedProtocol] = set()
        self._idle: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> VendePassProtocol:
        protocol = TrackedProtocol(self.service, self.clock, self.idle_timeout)
        protocol.factory = self
        self.connections.add(protocol)
        return protocol

    def forget(self, protocol: TrackedProtocol) -> None:
        self.connections.discard(protocol)
        if not self.connections:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """
        Fires once no connection is open.
        """
        d: Deferred[None] = Deferred()
        if not self.connections:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    async def close_all(self, grace: float = CLOSE_GRACE) -> None:
        """
        Wait for the connections to close; abort those still open after C{grace} seconds.
        """

        def abort() -> None:
            for protocol in list(self.connections):
                if protocol.transport is not None:
                    protocol.transport.abortConnection()  # type: ignore[attr-defined]

        timer = clock().callLater(grace, abort)
        try:
            await self.when_idle()
        finally:
            if timer.active():
                timer.cancel()


@frozen
class LiveServer:
    """
    A real VendePass server listening on a loopback port of the real reactor.
    """

    service: ReservationService
    factory: TrackingFactory
    port: IListeningPort

    @property
    def port_number(self) -> int:
        return int(self.port.getHost().port)  # type: ignore[attr-defined]

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port_number}"

    def customer(self, user: tuple[str, str] | None = None) -> LineClient:
        """
        Another customer, on an in-memory connection to the same service.
        """
        other = LineClient(self.service)
        if user is not None:
            other.login(user)
        return other


def serve(test: TestCase, service: ReservationService | None = None) -> LiveServer:
    """
    Start a server for C{service} (default: L{make_service}()) on a free
    loopback port; the test's cleanup stops it and waits for its
    connections to close.
    """
    if service is None:
        service = make_service()
    factory = TrackingFactory(service)
    port = tcp().listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]

    async def stop() -> None:
        await stop_listening(port)
        await factory.close_all()
        service.stopService()

    test.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return LiveServer(service, factory, port)


async def closed_port() -> int:
    """
    A loopback port number on which nothing listens: opened, then closed.
    """
    factory = ServerFactory()
    factory.protocol = Protocol
    port = tcp().listenTCP(0, factory, interface="127.0.0.1")
    number = int(port.getHost().port)  # type: ignore[attr-defined]
    await stop_listening(port)
    return number


async def stop_listening(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


# -- running the command line --------------------------------------------------


@frozen
class Run:
    """
    What one C{vendepass-client} command did.
    """

    code: int
    out: str
    err: str
    prompts: list[str]
    argv: tuple[str, ...] = ()

    def json(self) -> Any:
        return json.loads(self.out)


def no_prompt(text: str) -> str:
    raise AssertionError(f"the client prompted {text!r} but was not expected to")


def assertJSONError(test: TestCase, run: Run, code: str | None) -> JSON:
    """
    C{run} printed one JSON object, C{{"ok": false, "error": {"code", "message", ...}}}.
    """
    test.assertEqual(run.out.count("\n"), 1, run.out)
    answer = run.json()
    test.assertEqual(answer["ok"], False, answer)
    error: JSON = answer["error"]
    test.assertIsInstance(error["code"], str)
    test.assertIsInstance(error["message"], str)
    if code is not None:
        test.assertEqual(error["code"], code)
    return error


class CLITestCase(TestCase):
    """
    Runs L{cli.main} against a real server on a loopback port.
    """

    def setUp(self) -> None:
        # The parser reads defaults for --user and --connect from the real
        # environment: keep the developer's own settings out of the tests.
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("VENDEPASS_")})
        self.server = serve(self)

    async def cli(
        self,
        *argv: str,
        environ: dict[str, str] | None = None,
        password: str | None = None,
        lang: str | None = "en",
        endpoint: str | None = None,
    ) -> Run:
        """
        Run C{vendepass-client --connect ENDPOINT --lang LANG ARGV...}.

        @param password: what the password prompt answers (default: prompting fails the test).
        """
        prompts: list[str] = []

        def prompt(text: str) -> str:
            prompts.append(text)
            if password is None:
                return no_prompt(text)
            return password

        out, err = StringIO(), StringIO()
        args = ["--connect", endpoint or self.server.endpoint]
        if lang is not None:
            args += ["--lang", lang]
        code = await cli.main(core(), [*args, *argv], out=out, err=err, environ=environ or {}, prompt=prompt)
        return Run(code, out.getvalue(), err.getvalue(), prompts, tuple(argv))

    async def as_alice(self, *argv: str, **kwargs: Any) -> Run:
        return await self.cli("--user", ALICE[0], *argv, environ={"VENDEPASS_PASSWORD": ALICE[1]}, **kwargs)

    def assertOK(self, run: Run) -> None:
        self.assertEqual((run.code, run.err), (0, ""), run)

    def assertRefused(self, run: Run, code: str, sentence: str) -> JSON:
        """
        Exit code 1, the human sentence on stderr; with --json, the error on stdout.
        """
        self.assertEqual(run.code, 1, run)
        self.assertIn(sentence, run.err)
        self.assertNotIn(code, run.err, "stderr shows the sentence, not the code")
        if "--json" in run.argv:
            return assertJSONError(self, run, code)
        self.assertEqual(run.out, "")
        return {}

    def assertUsage(self, run: Run, sentence: str, code: str | None = None) -> None:
        """
        Exit code 2, one line on stderr; with --json, the error on stdout.
        """
        self.assertEqual(run.code, 2, run)
        self.assertIn(sentence, run.err)
        self.assertTrue(run.err.startswith("vendepass-client: "), run.err)
        self.assertEqual(run.err.count("\n"), 1, run.err)
        if "--json" in run.argv:
            error = assertJSONError(self, run, code)
            self.assertIn(sentence, error["message"])
        else:
            self.assertEqual(run.out, "")

    def seat_status(self, flight: str, seat: str) -> str:
        seatmap = self.server.customer().ok(SEATMAP, {"flight": flight})
        [status] = [s["status"] for s in seatmap["seats"] if s["seat"] == seat]
        return cast(str, status)


class RoutesTests(CLITestCase):
    async def test_network_json(self) -> None:
        run = await self.cli("--json", "routes")
        self.assertOK(run)
        data = run.json()
        self.assertEqual(
            sorted((a["code"], a["city"]) for a in data["airports"]),
            [("MAO", "Manaus"), ("REC", "Recife"), ("SSA", "Salvador")],
        )
        self.assertEqual(
            sorted((r["origin"], r["destination"]) for r in data["routes"]),
            [("MAO", "REC"), ("REC", "MAO"), ("REC", "SSA"), ("SSA", "MAO"), ("SSA", "REC")],
        )

    async def test_network_table(self) -> None:
        run = await self.cli("routes")
        self.assertOK(run)
        lines = run.out.splitlines()
        self.assertIn("SSA   Salvador  Aeroporto Internacional de Salvador", lines)
        self.assertIn("MAO   Manaus    Aeroporto Internacional Eduardo Gomes", lines)
        self.assertIn("Direct flights:", lines)
        self.assertIn("SSA > MAO, REC", lines)
        self.assertIn("REC > MAO, SSA", lines)
        self.assertIn("MAO > REC", lines)

    async def test_itineraries_json(self) -> None:
        """
        On a Wednesday Salvador to Manaus is a connection in Recife (the
        direct flight flies Tue/Thu/Sat only).
        """
        run = await self.cli("--json", "routes", "SSA", "MAO", "--date", TOMORROW)
        self.assertOK(run)
        [itinerary] = run.json()["itineraries"]
        self.assertEqual([leg["flight"] for leg in itinerary["legs"]], [TINY, BIG])
        self.assertEqual((itinerary["origin"], itinerary["destination"]), ("SSA", "MAO"))
        self.assertEqual(itinerary["departure"], f"{TOMORROW}T08:00:00-03:00")
        self.assertEqual(itinerary["price"], {"amount": "849.90", "currency": "BRL"})
        self.assertEqual(itinerary["free_seats"], 4)

    async def test_city_names(self) -> None:
        """
        Cities may be typed by name, in any case.
        """
        run = await self.cli("--json", "routes", "salvador", "Recife", "--date", TOMORROW)
        self.assertOK(run)
        [itinerary] = run.json()["itineraries"]
        self.assertEqual([leg["flight"] for leg in itinerary["legs"]], [TINY])
        run = await self.cli("--json", "routes", "RECIFE", "manaus", "--date", TOMORROW)
        self.assertOK(run)
        self.assertEqual([[leg["flight"] for leg in i["legs"]] for i in run.json()["itineraries"]], [[BIG]])

    async def test_itineraries_table(self) -> None:
        run = await self.cli("routes", "SSA", "MAO", "--date", TOMORROW)
        self.assertOK(run)
        header, rule, row, *rest = run.out.splitlines()
        self.assertEqual(header.split(), ["#", "Departure", "Arrival", "Route", "Flights", "Free", "Price"])
        self.assertTrue(set(rule) <= {"-", " "}, rule)
        self.assertEqual(
            row.split(),
            ["1", TOMORROW, "08:00", TOMORROW, "14:00", "SSA", ">", "REC", ">", "MAO", "VP100,", "VP200", "4", "R$", "849.90"],
        )
        self.assertEqual(rest, [])

    async def test_no_itineraries(self) -> None:
        run = await self.cli("routes", "MAO", "SSA", "--date", TOMORROW, "--max-legs", "1")
        self.assertOK(run)
        self.assertEqual(run.out, "No flights found.\n")

    async def test_portuguese_numbers(self) -> None:
        """
        Portuguese from C{LANG} (or C{--lang pt_BR}) formats prices as
        C{R$ 849,90}; C{--lang en} wins over C{LANG}. (Only the number
        format is checked: it does not depend on the translation catalog.)
        """
        run = await self.cli("routes", "SSA", "MAO", "--date", TOMORROW, lang=None, environ={"LANG": "pt_BR.UTF-8"})
        self.assertEqual(run.code, 0, run)
        self.assertIn("R$ 849,90", run.out)
        run = await self.cli("routes", "SSA", "MAO", "--date", TOMORROW, lang="pt_BR")
        self.assertEqual(run.code, 0, run)
        self.assertIn("R$ 849,90", run.out)
        run = await self.cli("routes", "SSA", "MAO", "--date", TOMORROW, environ={"LANG": "pt_BR.UTF-8"})
        self.assertOK(run)
        self.assertIn("R$ 849.90", run.out)
        self.assertIn("Departure", run.out)

    async def test_one_place_only(self) -> None:
        self.assertUsage(await self.cli("--json", "routes", "SSA"), "Give both an origin and a destination.")

    async def test_bad_date(self) -> None:
        """
        Not a date: a usage error saying what a date looks like. C{DD/MM/AAAA}
        and C{amanhã} are Portuguese only.
        """
        for typed in ["2026-13-01", "02/12/2026", "amanhã", "+x", "yesterday", "31/02/2026"]:
            run = await self.cli("--json", "routes", "SSA", "MAO", "--date", typed)
            self.assertUsage(run, "The date must look like ", "bad_date")
            self.assertIn(", today, tomorrow or +3 (in 3 days).", run.err)

    async def test_unknown_city(self) -> None:
        self.assertUsage(await self.cli("routes", "Atlantis", "MAO"), "Unknown city or airport: Atlantis")
        self.assertUsage(await self.cli("routes", "SSA", "XYZ"), "Unknown city or airport: XYZ")
        run = await self.cli("--json", "routes", "Atlantis", "MAO")
        self.assertUsage(run, "Unknown city or airport: Atlantis", "unknown_place")
        self.assertEqual(
            run.json(), {"ok": False, "error": {"code": "unknown_place", "message": "Unknown city or airport: Atlantis"}}
        )

    async def test_argparse_usage(self) -> None:
        """
        A choice out of range is a usage error (exit code 2) found by the
        parser, before connecting.
        """
        stderr = StringIO()
        self.patch(sys, "stderr", stderr)
        run = await self.cli("routes", "SSA", "MAO", "--max-legs", "5")
        self.assertEqual(run.code, 2, run)
        self.assertIn("--max-legs", run.err + stderr.getvalue())
        self.assertEqual(run.out, "")


class RoutesPagingTests(CLITestCase):
    """
    C{routes} without a date: cut at --limit (saying so and how to see
    more), --offset for the next page, --sort for the order.
    """

    def rows(self, run: Run) -> list[list[str]]:
        return [line.split() for line in run.out.splitlines()[2:] if line[:1] == " " or line[:1].isdigit()]

    async def test_cut_says_how_to_see_more(self) -> None:
        run = await self.cli("routes", "SSA", "MAO", "--limit", "5")
        self.assertOK(run)
        self.assertEqual([row[0] for row in self.rows(run)], ["1", "2", "3", "4", "5"])
        self.assertEqual(run.out.splitlines()[-1], "Showing 1–5; more with --offset 5.")
        run = await self.cli("routes", "SSA", "MAO", "--limit", "5", "--offset", "5")
        self.assertOK(run)
        self.assertEqual([row[0] for row in self.rows(run)], ["6", "7", "8", "9", "10"])
        self.assertEqual(run.out.splitlines()[-1], "Showing 6–10; more with --offset 10.")
        whole = await self.cli("routes", "SSA", "MAO", "--limit", "500")
        self.assertOK(whole)
        self.assertNotIn("Showing", whole.out)
        self.assertNotIn("--offset", whole.out)
        self.assertEqual(self.rows(whole)[5][1:], self.rows(run)[0][1:])

    async def test_cut_in_portuguese(self) -> None:
        run = await self.cli("routes", "SSA", "MAO", "--limit", "5", lang="pt_BR")
        self.assertEqual(run.code, 0, run)
        self.assertEqual(run.out.splitlines()[-1], "Mostrando 1–5; veja mais com --offset 5.")

    async def test_json_says_cut(self) -> None:
        data = (await self.cli("--json", "routes", "SSA", "MAO", "--limit", "5")).json()
        self.assertEqual(len(data["itineraries"]), 5)
        self.assertEqual(data["next_offset"], 5)
        self.assertEqual(data["sales_window"], {"first": "2026-12-01", "last": "2026-12-31"})
        data = (await self.cli("--json", "routes", "SSA", "MAO", "--limit", "500")).json()
        self.assertNotIn("next_offset", data)

    async def test_sort(self) -> None:
        """
        By price (or duration), the direct flights come first: R$ 749.50
        against R$ 849.90 through Recife.
        """
        for order in ("price", "duration"):
            run = await self.cli("routes", "SSA", "MAO", "--sort", order, "--limit", "3")
            self.assertOK(run)
            rows = self.rows(run)
            self.assertEqual([row[5:] for row in rows], [["SSA", ">", "MAO", "VP300", "180", "R$", "749.50"]] * 3)
            self.assertEqual([row[1] for row in rows], ["2026-12-01", "2026-12-03", "2026-12-05"])
        run = await self.cli("routes", "SSA", "MAO", "--sort", "departure", "--limit", "3")
        self.assertEqual([row[-1] for row in self.rows(run)], ["849.90", "749.50", "849.90"])

    async def test_bad_options(self) -> None:
        stderr = StringIO()
        self.patch(sys, "stderr", stderr)
        run = await self.cli("routes", "SSA", "MAO", "--sort", "cheapest")
        self.assertEqual(run.code, 2, run)
        self.assertIn("--sort", run.err + stderr.getvalue())
        for option in (["--sort", "price"], ["--offset", "5"]):
            self.assertUsage(await self.cli("routes", *option), "Give an origin and a destination to search.")
        run = await self.cli("routes", "SSA", "MAO", "--offset", "-1")
        self.assertRefused(run, "invalid_request", "must be between 0 and 5000")


class SalesWindowTests(CLITestCase):
    """
    A date outside the sales window says when flights are sold, instead
    of "No flights found."
    """

    async def test_after_the_window(self) -> None:
        run = await self.cli("routes", "SSA", "MAO", "--date", "2027-02-01")
        self.assertOK(run)
        self.assertEqual(
            run.out, "No flights on 2027-02-01: flights are sold from 2026-12-01 to 2026-12-31.\n"
        )

    async def test_before_the_window(self) -> None:
        run = await self.cli("routes", "SSA", "MAO", "--date", "2026-11-30", lang="pt_BR")
        self.assertEqual(run.code, 0, run)
        self.assertEqual(
            run.out, "Nenhum voo em 30/11/2026: as passagens estão à venda de 01/12/2026 a 31/12/2026.\n"
        )

    async def test_inside_the_window(self) -> None:
        run = await self.cli("routes", "MAO", "SSA", "--date", "2026-12-31", "--max-legs", "1")
        self.assertOK(run)
        self.assertEqual(run.out, "No flights found.\n")

    async def test_json(self) -> None:
        run = await self.cli("--json", "routes", "SSA", "MAO", "--date", "2027-02-01")
        self.assertOK(run)
        self.assertEqual(
            run.json(), {"itineraries": [], "sales_window": {"first": "2026-12-01", "last": "2026-12-31"}}
        )


class SeatmapTests(CLITestCase):
    async def test_json(self) -> None:
        run = await self.cli("--json", "seatmap", TINY)
        self.assertOK(run)
        data = run.json()
        self.assertEqual(data["flight"]["flight"], TINY)
        self.assertEqual((data["rows"], data["letters"]), (2, "AB"))
        self.assertEqual(
            [(s["seat"], s["status"], s["mine"]) for s in data["seats"]],
            [("1A", "free", False), ("1B", "free", False), ("2A", "free", False), ("2B", "free", False)],
        )

    async def test_cabin(self) -> None:
        """
        The cabin picture: a line per row, the aisle in the middle; sold
        seats are C{x}, held ones C{o}.
        """
        bob = self.server.customer(BOB)
        bob.ok(BUY, {"flights": [TINY], "seats": ["1A"]})
        bob.ok(HOLD, {"flights": [TINY], "seats": ["2B"]})
        run = await self.cli("seatmap", TINY)
        self.assertOK(run)
        self.assertEqual(
            run.out.splitlines(),
            [
                f"Flight VP100 SSA > REC, {TOMORROW} 08:00",
                "     A   B",
                "  1  x   .",
                "  2  .   o",
                "2 free   . free  o held  x sold  * yours",
            ],
        )

    async def test_unknown_flight(self) -> None:
        run = await self.cli("--json", "seatmap", "VP999-2026-12-02")
        error = self.assertRefused(run, "unknown_flight", "That flight does not exist or is not on sale.")
        self.assertEqual(error["flight"], "VP999-2026-12-02")
        run = await self.cli("seatmap", "VP999-2026-12-02")
        self.assertRefused(run, "unknown_flight", "That flight does not exist or is not on sale.")
        self.assertEqual(run.out, "")


class BuyTests(CLITestCase):
    async def test_one_flight(self) -> None:
        run = await self.as_alice("--json", "buy", TINY, "--seat", "2b")
        self.assertOK(run)
        self.assertEqual(run.prompts, [])
        ticket = run.json()["ticket"]
        self.assertEqual(ticket["status"], "active")
        self.assertRegex(ticket["ticket_id"], r"^[A-Z0-9]{8}$")
        self.assertEqual([(leg["flight"], leg["seat"]) for leg in ticket["legs"]], [(TINY, "2B")])
        self.assertEqual(ticket["price"], {"amount": "250.00", "currency": "BRL"})
        self.assertEqual(self.seat_status(TINY, "2B"), "sold")

    async def test_two_flights(self) -> None:
        """
        One C{--seat} per flight; C{any} lets the server choose.
        """
        run = await self.as_alice("--json", "buy", TINY, BIG, "--seat", "1B", "--seat", "any")
        self.assertOK(run)
        ticket = run.json()["ticket"]
        self.assertEqual([leg["flight"] for leg in ticket["legs"]], [TINY, BIG])
        self.assertEqual(ticket["legs"][0]["seat"], "1B")
        picked = ticket["legs"][1]["seat"]
        self.assertRegex(picked, r"^\d+[A-F]$")
        self.assertEqual(ticket["price"], {"amount": "849.90", "currency": "BRL"})
        self.assertEqual(self.seat_status(TINY, "1B"), "sold")
        self.assertEqual(self.seat_status(BIG, picked), "sold")

    async def test_any_seats(self) -> None:
        """
        Without C{--seat} the server picks every seat.
        """
        run = await self.as_alice("--json", "buy", TINY, BIG)
        self.assertOK(run)
        legs = run.json()["ticket"]["legs"]
        self.assertEqual([leg["flight"] for leg in legs], [TINY, BIG])
        self.assertEqual(self.seat_status(TINY, legs[0]["seat"]), "sold")

    async def test_table(self) -> None:
        run = await self.as_alice("buy", TINY, "--seat", "2B")
        self.assertOK(run)
        first, leg = run.out.splitlines()
        self.assertRegex(first, r"^Ticket [A-Z0-9]{8} \(active\), R\$ 250\.00$")
        self.assertEqual(leg, f"  VP100 SSA > REC  {TOMORROW} 08:00 - {TOMORROW} 09:15  seat 2B")

    async def test_seat_sold(self) -> None:
        """
        A seat sold to someone else: exit code 1, a sentence on stderr, the
        error code on stdout with --json; nothing bought.
        """
        self.server.customer(BOB).ok(BUY, {"flights": [TINY], "seats": ["1A"]})
        run = await self.as_alice("--json", "buy", TINY, "--seat", "1A")
        error = self.assertRefused(run, "seat_unavailable", "Seat 1A is already taken.")
        self.assertEqual((error["flight"], error["seat"]), (TINY, "1A"))
        run = await self.as_alice("buy", TINY, "--seat", "1A")
        self.assertRefused(run, "seat_unavailable", "Seat 1A is already taken.")
        self.assertEqual(run.out, "")
        self.assertEqual((await self.as_alice("--json", "tickets")).json(), {"tickets": []})

    async def test_seat_held(self) -> None:
        """
        A seat another customer holds: the sentence says so.
        """
        bob = self.server.customer(BOB)
        bob.ok(HOLD, {"flights": [TINY], "seats": ["1A"]})
        run = await self.as_alice("--json", "buy", TINY, "--seat", "1A")
        error = self.assertRefused(run, "seat_unavailable", "Seat 1A is being bought by someone else")
        self.assertEqual(error["held_until"], "2026-12-01T09:01:00Z")

    async def test_unknown_seat(self) -> None:
        run = await self.as_alice("--json", "buy", TINY, "--seat", "9Z")
        self.assertRefused(run, "unknown_seat", "Seat 9Z does not exist on this flight.")

    async def test_not_an_itinerary(self) -> None:
        run = await self.as_alice("--json", "buy", BIG, TINY)
        self.assertRefused(run, "invalid_itinerary", "Those flights do not connect.")

    async def test_wrong_password(self) -> None:
        run = await self.cli("--json", "--user", "alice", "buy", TINY, environ={"VENDEPASS_PASSWORD": "nope-nope"})
        self.assertRefused(run, "bad_credentials", "Wrong username or password.")
        self.assertEqual(self.seat_status(TINY, "1A"), "free")
        run = await self.cli("--user", "alice", "tickets", environ={"VENDEPASS_PASSWORD": "nope-nope"})
        self.assertRefused(run, "bad_credentials", "Wrong username or password.")
        self.assertEqual(run.out, "")

    async def test_needs_user(self) -> None:
        run = await self.cli("--json", "buy", TINY, environ={"VENDEPASS_PASSWORD": ALICE[1]})
        self.assertUsage(run, "This command needs --user (or VENDEPASS_USER).")
        self.assertEqual(self.seat_status(TINY, "1A"), "free")

    async def test_seat_count(self) -> None:
        """
        Not one C{--seat} per flight: a usage error, and nothing is bought.
        """
        for seats in (["--seat", "1A"], ["--seat", "1A", "--seat", "2A", "--seat", "3A"]):
            run = await self.as_alice("--json", "buy", TINY, BIG, *seats)
            self.assertUsage(run, "Give one --seat per flight, or none.")
        self.assertEqual((await self.as_alice("--json", "tickets")).json(), {"tickets": []})


class PasswordTests(CLITestCase):
    async def test_from_environment(self) -> None:
        run = await self.cli("--user", "alice", "tickets", environ={"VENDEPASS_PASSWORD": ALICE[1]})
        self.assertOK(run)
        self.assertEqual(run.prompts, [])

    async def test_from_prompt(self) -> None:
        run = await self.cli("--json", "--user", "alice", "tickets", password=ALICE[1])
        self.assertOK(run)
        self.assertEqual(run.prompts, ["Password: "])
        self.assertEqual(run.json(), {"tickets": []})

    async def test_environment_wins(self) -> None:
        run = await self.cli(
            "--user", "alice", "tickets", environ={"VENDEPASS_PASSWORD": ALICE[1]}, password="the-wrong-one"
        )
        self.assertOK(run)
        self.assertEqual(run.prompts, [])

    async def test_never_from_argv(self) -> None:
        """
        There is no option to give a password on the command line.
        """
        stderr = StringIO()
        self.patch(sys, "stderr", stderr)
        run = await self.cli("--user", "alice", "--password", ALICE[1], "tickets", password=ALICE[1])
        self.assertEqual(run.code, 2, run)
        self.assertEqual(run.prompts, [])
        self.assertEqual(run.out, "")
        self.assertIn("usage: vendepass-client", run.err + stderr.getvalue())

    async def test_routes_needs_no_password(self) -> None:
        run = await self.cli("--user", "alice", "routes")
        self.assertOK(run)
        self.assertEqual(run.prompts, [])


class TicketsTests(CLITestCase):
    async def test_list(self) -> None:
        self.assertEqual((await self.as_alice("tickets")).out, "You have no tickets yet.\n")
        first = (await self.as_alice("--json", "buy", TINY, "--seat", "2B")).json()["ticket"]
        second = (await self.as_alice("--json", "buy", TINY, BIG, "--seat", "1A", "--seat", "3C")).json()["ticket"]
        self.server.customer(BOB).ok(BUY, {"flights": [TINY], "seats": ["2A"]})

        run = await self.as_alice("--json", "tickets")
        self.assertOK(run)
        # Newest first.
        self.assertEqual(run.json(), {"tickets": [second, first]})

        run = await self.as_alice("tickets")
        self.assertOK(run)
        header, rule, *rows = run.out.splitlines()
        self.assertEqual(header.split(), ["Ticket", "Status", "Route", "Departure", "Seats", "Price"])
        self.assertEqual(
            [row.split() for row in rows],
            [
                [second["ticket_id"], "active", "SSA", ">", "REC", ">", "MAO", TOMORROW, "08:00", "1A,", "3C", "R$", "849.90"],
                [first["ticket_id"], "active", "SSA", ">", "REC", TOMORROW, "08:00", "2B", "R$", "250.00"],
            ],
        )

    async def test_pages(self) -> None:
        """
        C{tickets} shows one page (C{--limit}) and says how to see the
        next (C{--cursor}) or every one (C{--all}); C{--active} leaves out
        cancelled tickets.
        """
        bought = []
        for seat in ("1A", "1B", "2A"):
            bought.append((await self.as_alice("--json", "buy", TINY, "--seat", seat)).json()["ticket"]["ticket_id"])
        await self.as_alice("cancel", bought[0])
        newest_first = bought[::-1]

        run = await self.as_alice("tickets", "--limit", "2")
        self.assertOK(run)
        *rows, more = run.out.splitlines()[2:]
        self.assertEqual([row.split()[0] for row in rows], newest_first[:2])
        page = (await self.as_alice("--json", "tickets", "--limit", "2")).json()
        cursor = page["next_cursor"]
        self.assertEqual(more, f"More tickets: add --cursor {cursor} for the next ones, or --all for every one.")

        run = await self.as_alice("--json", "tickets", "--limit", "2", "--cursor", cursor)
        self.assertEqual([t["ticket_id"] for t in run.json()["tickets"]], newest_first[2:])
        self.assertNotIn("next_cursor", run.json())
        run = await self.as_alice("--json", "tickets", "--all")
        self.assertEqual([t["ticket_id"] for t in run.json()["tickets"]], newest_first)
        run = await self.as_alice("--json", "tickets", "--all", "--active")
        self.assertEqual([t["ticket_id"] for t in run.json()["tickets"]], newest_first[:2])

        run = await self.as_alice("tickets", "--all", "--limit", "2")
        self.assertEqual(run.code, 2, run)
        run = await self.as_alice("tickets", "--cursor", "nonsense")
        self.assertEqual(run.code, 1, run)
        self.assertIn("cursor", run.err)


class CancelTests(CLITestCase):
    async def test_cancel(self) -> None:
        ticket = (await self.as_alice("--json", "buy", TINY, "--seat", "2B")).json()["ticket"]
        self.assertEqual(self.seat_status(TINY, "2B"), "sold")
        # Booking codes are case-insensitive for people.
        run = await self.as_alice("--json", "cancel", ticket["ticket_id"].lower())
        self.assertOK(run)
        cancelled = run.json()["ticket"]
        self.assertEqual((cancelled["ticket_id"], cancelled["status"]), (ticket["ticket_id"], "cancelled"))
        self.assertIsNotNone(cancelled["cancelled_at"])
        self.assertEqual(self.seat_status(TINY, "2B"), "free")

        run = await self.as_alice("tickets")
        self.assertIn(f"{ticket['ticket_id']}  cancelled", run.out)

        run = await self.as_alice("--json", "cancel", ticket["ticket_id"])
        self.assertRefused(run, "already_cancelled", "That ticket is already cancelled.")

    async def test_table(self) -> None:
        ticket = (await self.as_alice("--json", "buy", TINY, "--seat", "2B")).json()["ticket"]
        run = await self.as_alice("cancel", ticket["ticket_id"])
        self.assertOK(run)
        self.assertTrue(run.out.startswith(f"Ticket {ticket['ticket_id']} (cancelled), R$ 250.00\n"), run.out)

    async def test_someone_elses(self) -> None:
        """
        Another customer's ticket cannot be cancelled, and is not revealed.
        """
        bobs = self.server.customer(BOB).ok(BUY, {"flights": [TINY], "seats": ["1A"]})["ticket"]
        run = await self.as_alice("--json", "cancel", bobs["ticket_id"])
        self.assertRefused(run, "ticket_not_found", "No such ticket.")
        self.assertEqual(self.seat_status(TINY, "1A"), "sold")

    async def test_needs_user(self) -> None:
        self.assertUsage(await self.cli("cancel", "K7QX3MZP"), "This command needs --user")


class RegisterTests(CLITestCase):
    async def test_register(self) -> None:
        run = await self.cli("--json", "--user", "carol", "register", password="carol-password")
        self.assertOK(run)
        self.assertEqual(run.json(), {"username": "carol"})
        self.assertEqual(run.prompts, ["Password: "])
        run = await self.cli("--user", "carol", "tickets", environ={"VENDEPASS_PASSWORD": "carol-password"})
        self.assertOK(run)
        self.assertEqual(run.out, "You have no tickets yet.\n")

    async def test_table(self) -> None:
        run = await self.cli("--user", "dave_2", "register", environ={"VENDEPASS_PASSWORD": "dave-password"})
        self.assertOK(run)
        self.assertEqual(run.out, "Account dave_2 created.\n")

    async def test_taken(self) -> None:
        run = await self.cli("--json", "--user", "alice", "register", environ={"VENDEPASS_PASSWORD": "whatever-123"})
        self.assertRefused(run, "username_taken", "That username is already taken.")
        # alice's password is unchanged.
        self.assertOK(await self.as_alice("tickets"))

    async def test_invalid(self) -> None:
        run = await self.cli("--json", "--user", "erin", "register", environ={"VENDEPASS_PASSWORD": "short"})
        error = self.assertRefused(run, "invalid_request", "The server did not accept that:")
        self.assertEqual(error["field"], "password")

    async def test_needs_user(self) -> None:
        self.assertUsage(await self.cli("register", password="x" * 10), "This command needs --user")


class UnreachableTests(TestCase):
    """
    Nothing listens: exit code 3 and a sentence naming the endpoint.
    """

    async def test_nothing_listens(self) -> None:
        port = await closed_port()
        endpoint = f"tcp:host=127.0.0.1:port={port}"
        for argv in (["routes"], ["--json", "seatmap", TINY], ["--user", "alice", "buy", TINY]):
            out, err = StringIO(), StringIO()
            code = await cli.main(
                core(),
                ["--connect", endpoint, "--lang", "en", *argv],
                out=out,
                err=err,
                environ={"VENDEPASS_PASSWORD": ALICE[1]},
                prompt=no_prompt,
            )
            self.assertEqual(code, 3, (argv, err.getvalue()))
            self.assertIn(f"Cannot reach the server at {endpoint}", err.getvalue())
            if "--json" in argv:
                error = assertJSONError(self, Run(code, out.getvalue(), err.getvalue(), [], tuple(argv)), "unreachable")
                self.assertIn(f"Cannot reach the server at {endpoint}", error["message"])
            else:
                self.assertEqual(out.getvalue(), "")


def local_date(timestamp: float) -> date:
    return datetime.fromtimestamp(timestamp).date()


class RelativeDateTests(CLITestCase):
    """
    C{--date} takes relative days, and Portuguese dates under pt_BR; "today"
    is the server's clock (the service's L{Clock}, at L{START}) in this
    computer's time zone.
    """

    def setUp(self) -> None:
        super().setUp()
        if local_date(START) != date(2026, 12, 1):
            raise SkipTest("this computer's time zone is too far from UTC for the fixture's day")

    async def flights(self, *argv: str, lang: str = "en") -> list[list[str]]:
        run = await self.cli("--json", "routes", "SSA", "MAO", *argv, lang=lang)
        self.assertOK(run)
        return [[leg["flight"] for leg in i["legs"]] for i in run.json()["itineraries"]]

    async def test_relative(self) -> None:
        expected = await self.flights("--date", TOMORROW)
        self.assertEqual(expected, [[TINY, BIG]])
        for typed in ["tomorrow", "+1", "TOMORROW", " +1 "]:
            self.assertEqual(await self.flights("--date", typed), expected, typed)
        self.assertIn([DIRECT], await self.flights("--date", "+2"))
        self.assertEqual(await self.flights("--date", "today"), await self.flights("--date", "2026-12-01"))

    async def test_portuguese(self) -> None:
        expected = await self.flights("--date", TOMORROW)
        for typed in ["amanhã", "amanha", "02/12/2026", "2/12/2026", "tomorrow", "+1", TOMORROW]:
            self.assertEqual(await self.flights("--date", typed, lang="pt_BR"), expected, typed)
        self.assertEqual(await self.flights("--date", "hoje", lang="pt_BR"), await self.flights("--date", "today"))
        self.assertEqual(
            await self.flights("--date", "03/12/2026", lang="pt_BR"), await self.flights("--date", "2026-12-03")
        )
        run = await self.cli("routes", "SSA", "MAO", "--date", "03/12/2026")
        self.assertUsage(run, "The date must look like ")
        run = await self.cli("routes", "SSA", "MAO", "--date", "31/02/2026", lang="pt_BR")
        self.assertEqual((run.code, run.err), (2, "vendepass-client: A data deve ser como 02/12/2026, hoje, amanhã ou +3 (daqui a 3 dias).\n"))

    async def test_passed(self) -> None:
        """
        A day that is over everywhere is refused as such, not "No flights found."
        """
        run = await self.cli("--json", "routes", "SSA", "MAO", "--date", "2026-11-29")
        self.assertUsage(run, "2026-11-29 has passed: flights are on sale from today on.", "date_passed")
        run = await self.cli("routes", "SSA", "MAO", "--date", "29/11/2026", lang="pt_BR")
        self.assertEqual(run.code, 2, run)
        self.assertIn("29/11/2026", run.err)

    async def test_portuguese_display(self) -> None:
        """
        Under pt_BR, dates are shown as DD/MM/AAAA.
        """
        run = await self.cli("seatmap", TINY, lang="pt_BR")
        self.assertEqual(run.code, 0, run)
        self.assertIn("02/12/2026 08:00", run.out.splitlines()[0])
        self.assertNotIn(TOMORROW, run.out)
        run = await self.cli("routes", "SSA", "MAO", "--date", "amanhã", lang="pt_BR")
        self.assertEqual(run.code, 0, run)
        self.assertIn("02/12/2026 08:00", run.out)
        self.assertIn("02/12/2026 14:00", run.out)


class FlightNumberTests(CLITestCase):
    """
    A flight is its id (C{VP100-2026-12-02}) or its number with C{--date}.
    """

    def setUp(self) -> None:
        super().setUp()
        if local_date(START) != date(2026, 12, 1):
            raise SkipTest("this computer's time zone is too far from UTC for the fixture's day")

    async def test_seatmap(self) -> None:
        by_id = await self.cli("--json", "seatmap", TINY)
        self.assertOK(by_id)
        for argv in (["VP100", "--date", "tomorrow"], ["vp100", "--date", TOMORROW]):
            run = await self.cli("--json", "seatmap", *argv)
            self.assertOK(run)
            self.assertEqual(run.json(), by_id.json())

    async def test_buy(self) -> None:
        run = await self.as_alice("--json", "buy", "VP100", "VP200", "--date", "tomorrow", "--seat", "2B", "--seat", "any")
        self.assertOK(run)
        self.assertEqual([leg["flight"] for leg in run.json()["ticket"]["legs"]], [TINY, BIG])
        self.assertEqual(self.seat_status(TINY, "2B"), "sold")

    async def test_number_needs_date(self) -> None:
        run = await self.cli("--json", "seatmap", "VP100")
        self.assertUsage(run, "Flight number VP100 needs --date (e.g. --date tomorrow)")
        self.assertIn(f"VP100-{TOMORROW}", run.err)

    async def test_date_needs_number(self) -> None:
        run = await self.cli("seatmap", TINY, "--date", "tomorrow")
        self.assertUsage(run, "--date goes with flight numbers")


class EndpointTests(CLITestCase):
    """
    C{--connect}: C{host:port} is short for C{tcp:host=...:port=...}; a
    string that is no endpoint is a one-line usage error (exit code 2).
    """

    async def test_host_port(self) -> None:
        run = await self.cli("--json", "routes", endpoint=f"127.0.0.1:{self.server.port_number}")
        self.assertOK(run)
        self.assertIn("airports", run.json())

    async def test_bad(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        a_file = directory.child("ca.pem")
        a_file.setContent(b"not a directory")
        missing = directory.child("missing")
        cases = {
            "bogus:xyz": "cannot use --connect bogus:xyz (Unknown endpoint type: 'bogus')",
            "127.0.0.1:port": "cannot use --connect 127.0.0.1:port",
            f"tcp:host=127.0.0.1:port={self.server.port_number}:timeout=abc": "a number was expected instead of 'abc'",
            f"tls:host=localhost:port=1:trustRoots={missing.path}":
                f"trustRoots={missing.path} is not a directory of CA certificates (PEM files).",
            f"tls:host=localhost:port=1:trustRoots={a_file.path}":
                f"trustRoots={a_file.path} is not a directory of CA certificates (PEM files).",
        }
        for endpoint, sentence in cases.items():
            run = await self.cli("routes", endpoint=endpoint)
            self.assertUsage(run, sentence)
            run = await self.cli("--json", "seatmap", TINY, endpoint=endpoint)
            self.assertUsage(run, sentence, "bad_endpoint")


class NoTerminalTests(TestCase):
    """
    The installed C{vendepass-client} with no terminal and its standard input
    closed, against the installed C{twistd vendepass}.
    """

    def run_client(
        self, *argv: str, environ: dict[str, str] | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        script = Path(sys.executable).parent / "vendepass-client"
        base = {k: v for k, v in os.environ.items() if not k.startswith("VENDEPASS_")}
        return subprocess.run(
            [str(script), "--lang", "en", *argv],
            env={**base, **(environ or {})},
            **({"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin}),  # type: ignore[arg-type]
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            start_new_session=True,
        )

    def test_password_needed(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        server = ServerProcess(directory)
        self.addCleanup(server.kill)
        endpoint = f"127.0.0.1:{server.port}"
        for json_option in ([], ["--json"]):
            done = self.run_client("--connect", endpoint, *json_option, "--user", "maria", "tickets")
            sentence = "A password is needed: set VENDEPASS_PASSWORD (there is no terminal to ask for it)."
            self.assertEqual((done.returncode, done.stderr.splitlines()[-1:]), (2, [f"vendepass-client: {sentence}"]), done)
            self.assertNotIn("Traceback", done.stderr)
            if json_option:
                self.assertEqual(
                    json.loads(done.stdout), {"ok": False, "error": {"code": "password_needed", "message": sentence}}
                )
        done = self.run_client("--connect", endpoint, "--user", "maria", "tickets", environ={"VENDEPASS_PASSWORD": "maria123"})
        self.assertEqual((done.returncode, done.stderr), (0, ""), done)
        # Piped on standard input, as getpass would read it without a terminal.
        done = self.run_client("--connect", endpoint, "--user", "maria", "--json", "tickets", stdin="maria123\n")
        self.assertEqual((done.returncode, done.stderr), (0, ""), done)
        self.assertIn("tickets", json.loads(done.stdout))

    def test_bad_endpoint(self) -> None:
        done = self.run_client("--connect", "bogus:xyz", "routes")
        self.assertEqual(done.returncode, 2, done)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_help_names_the_environment(self) -> None:
        done = self.run_client("--help")
        self.assertEqual(done.returncode, 0, done)
        for name in ("VENDEPASS_CONNECT", "VENDEPASS_USER", "VENDEPASS_PASSWORD", "tomorrow", "HOST:PORT"):
            self.assertIn(name, done.stdout + done.stderr)
