"""
C{vendepass-client}: the terminal app (interactive without a subcommand)
and scriptable subcommands.

Exit codes: 0 success, 1 a refusal by the server, 2 a usage error, 3 the
server cannot be reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from datetime import date, timedelta
from typing import Any, Callable, Mapping, TextIO

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import react

from vendepass import __version__
from vendepass.client import views
from vendepass.client.dates import BadDate, format_date, has_passed, parse_date, server_today
from vendepass.client.i18n import Texts, choose_language
from vendepass.client.protocol import (
    DEFAULT_ENDPOINT,
    BadEndpoint,
    CertificateRefused,
    ConnectionLost,
    ServerError,
    client_endpoint,
    endpoint_string,
)
from vendepass.client.reconnecting import ReconnectingClient

OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3

CONNECT_ERRORS = (net_error.ConnectError, net_error.DNSLookupError, ConnectionLost, net_error.ConnectionClosed)


# A flight number without its date (docs/protocol.md: a flight id is
# <flight number>-<local departure date>).
FLIGHT_NUMBER = re.compile(r"[A-Za-z]{2}[0-9]{1,5}")


class UsageProblem(Exception):
    """
    The command line is wrong (exit code 2).

    @ivar code: a stable snake_case code, for C{--json}.
    """

    def __init__(self, message: str, code: str = "usage") -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """
    An argument parser that writes its messages to the given stream.
    """

    stream: TextIO | None = None

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (self.stream or file or sys.stderr).write(message)


def parser(texts: Texts, environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    _Parser.stream = stream
    top = _Parser(
        prog="vendepass-client",
        description=texts("Buy VendePass tickets. Without a command, starts the interactive app."),
        epilog=texts(
            "environment: VENDEPASS_CONNECT (default of --connect), VENDEPASS_USER (default of --user), "
            "VENDEPASS_PASSWORD (the password; otherwise it is asked on the terminal). "
            "Dates: YYYY-MM-DD, today, tomorrow or +N (in N days). "
            "Exit codes: 0 success, 1 refused by the server, 2 usage error, 3 cannot connect."
        ),
    )
    top.add_argument("--version", action="version", version=f"vendepass-client {__version__}")
    top.add_argument(
        "--connect",
        default=environ.get("VENDEPASS_CONNECT", DEFAULT_ENDPOINT),
        help=texts(
            "server endpoint: HOST:PORT or a Twisted endpoint such as tcp:host=HOST:port=PORT or "
            "tls:host=HOST:port=PORT (default: VENDEPASS_CONNECT or {default})",
            default=DEFAULT_ENDPOINT,
        ),
    )
    top.add_argument("--lang", choices=["en", "pt_BR", "pt"], help=texts("language (default: from LANG)"))
    top.add_argument("--json", action="store_true", help=texts("print JSON for scripts"))
    top.add_argument(
        "--user",
        default=environ.get("VENDEPASS_USER"),
        help=texts("username (default: VENDEPASS_USER; password from VENDEPASS_PASSWORD or a prompt)"),
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND")

    routes = commands.add_parser("routes", help=texts("the network, or itineraries from ORIGIN to DESTINATION"))
    routes.add_argument("origin", nargs="?", help=texts("city name or airport code"))
    routes.add_argument("destination", nargs="?", help=texts("city name or airport code"))
    routes.add_argument("--date", help=texts("departure date: YYYY-MM-DD, today, tomorrow or +N (in N days)"))
    routes.add_argument("--max-legs", type=int, choices=[1, 2, 3], help=texts("at most this many flights"))
    routes.add_argument("--include-sold-out", action="store_true", help=texts("also list full itineraries"))
    routes.add_argument("--limit", type=int, help=texts("at most this many itineraries"))
    routes.add_argument(
        "--sort",
        choices=["departure", "price", "duration"],
        help=texts("order of the itineraries (default: departure)"),
    )
    routes.add_argument("--offset", type=int, help=texts("skip this many itineraries (for the next page)"))

    seatmap = commands.add_parser("seatmap", help=texts("the seat map of a flight"))
    seatmap.add_argument("flight", help=texts("flight id, e.g. VP1203-2026-12-01, or a flight number with --date"))
    seatmap.add_argument("--date", help=texts("the departure date of a flight number: YYYY-MM-DD, today, tomorrow or +N"))

    buy = commands.add_parser("buy", help=texts("buy seats on the flights of one itinerary"))
    buy.add_argument(
        "flights", nargs="+", help=texts("flight ids of one itinerary, in order (or flight numbers with --date)")
    )
    buy.add_argument("--date", help=texts("the departure date of flight numbers: YYYY-MM-DD, today, tomorrow or +N"))
    buy.add_argument(
        "--seat", action="append", dest="seats", help=texts("seat for each flight, in order (default: any)")
    )

    tickets = commands.add_parser("tickets", help=texts("list my tickets, newest first"))
    tickets.add_argument("--limit", type=int, help=texts("how many tickets to show (the server's default: 50; at most 200)"))
    tickets.add_argument("--cursor", help=texts("show the tickets after an earlier answer's cursor"))
    tickets.add_argument("--all", action="store_true", help=texts("show every ticket, page after page"))
    tickets.add_argument("--active", action="store_true", help=texts("only active tickets"))

    cancel = commands.add_parser("cancel", help=texts("cancel a ticket"))
    cancel.add_argument("ticket_id", help=texts("the ticket's booking code"))

    commands.add_parser("register", help=texts("create an account for --user"))
    return top


def _password(environ: Mapping[str, str], prompt: Callable[[str], str], texts: Texts) -> str:
    password = environ.get("VENDEPASS_PASSWORD")
    if password is None:
        try:
            if prompt is getpass.getpass and not _terminal():
                # No terminal: a password piped on standard input, as
                # getpass would read it, without its warning.
                line = sys.stdin.readline() if sys.stdin is not None else ""
                if not line:
                    raise EOFError("no terminal")
                return line.rstrip("\r\n")
            password = prompt(texts("Password: "))
        except EOFError:
            raise UsageProblem(
                texts("A password is needed: set VENDEPASS_PASSWORD (there is no terminal to ask for it)."),
                "password_needed",
            )
    return password


def _terminal() -> bool:
    """
    Whether there is a terminal to ask for a password on (as L{getpass.getpass} would).
    """
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
        return True
    except OSError:
        return sys.stdin is not None and sys.stdin.isatty()


def _day(typed: str, now: str, texts: Texts) -> date:
    """
    The date C{typed} means (L{parse_date}), today being the server's.
    """
    try:
        day = parse_date(typed, server_today(now), texts.language)
    except BadDate as e:
        raise UsageProblem(str(e), "bad_date")
    if has_passed(day, now):
        raise UsageProblem(
            texts("{date} has passed: flights are on sale from today on.", date=format_date(day, texts.language)),
            "date_passed",
        )
    return day


def _flights(typed: list[str], day: str | None, now: str, texts: Texts) -> list[str]:
    """
    Flight ids: C{VP2301-2026-12-01} as is, a flight number C{VP2301} on the day of C{--date}.
    """
    if day is not None and not any(FLIGHT_NUMBER.fullmatch(t) for t in typed):
        raise UsageProblem(texts("--date goes with flight numbers (e.g. VP2301 --date tomorrow), not full flight ids."))
    flights = []
    iso: str | None = None  # --date, parsed at its first use
    for text in typed:
        if FLIGHT_NUMBER.fullmatch(text):
            if day is None:
                example = format_date(server_today(now) + timedelta(days=1), "en")
                raise UsageProblem(
                    texts(
                        "Flight number {number} needs --date (e.g. --date tomorrow), or give a flight id such as {number}-{example}.",
                        number=text.upper(),
                        example=example,
                    )
                )
            iso = iso or _day(day, now, texts).isoformat()
            text = f"{text.upper()}-{iso}"
        flights.append(text)
    return flights


async def _command(
    client: ReconnectingClient,
    args: argparse.Namespace,
    texts: Texts,
    out: TextIO,
    environ: Mapping[str, str],
    prompt: Callable[[str], str],
    now: str,
) -> None:
    def show(data: Any, text: str) -> None:
        out.write((json.dumps(data, ensure_ascii=False, indent=2) if args.json else text) + "\n")

    if args.command in ("buy", "tickets", "cancel", "register"):
        if not args.user:
            raise UsageProblem(texts("This command needs --user (or VENDEPASS_USER)."))
        password = _password(environ, prompt, texts)
        if args.command == "register":
            username = await client.register(args.user, password)
            show({"username": username}, texts("Account {username} created.", username=username))
            return
        await client.login(args.user, password)

    if args.command == "routes":
        searching = [args.date, args.max_legs, args.include_sold_out or None, args.limit, args.sort, args.offset]
        if args.origin is None and args.destination is None:
            if any(value is not None for value in searching):
                raise UsageProblem(texts("Give an origin and a destination to search."))
            data = await client.routes()
            show(data, views.network(texts, data))
            return
        if args.origin is None or args.destination is None:
            raise UsageProblem(texts("Give both an origin and a destination."))
        if args.date is not None:
            args.date = _day(args.date, now, texts).isoformat()
        airports = (await client.routes())["airports"]
        codes = []
        for typed in (args.origin, args.destination):
            airport = views.find_airport(airports, typed)
            if airport is None:
                raise UsageProblem(texts("Unknown city or airport: {name}", name=typed), "unknown_place")
            codes.append(airport["code"])
        if codes[0] == codes[1]:
            raise UsageProblem(texts("Origin and destination must differ."))
        answer = await client.search_page(
            codes[0], codes[1], args.date, args.max_legs, args.include_sold_out or None, args.limit, args.sort,
            args.offset,
        )
        found = answer["itineraries"]
        text = views.outside_window(texts, args.date, answer.get("sales_window")) if not found else None
        text = text or views.itineraries(texts, found, (args.offset or 0) + 1)
        if answer.get("next_offset") is not None:
            first = (args.offset or 0) + 1
            text += "\n" + texts(
                "Showing {first}–{last}; more with --offset {next}.",
                first=first, last=first + len(found) - 1, next=answer["next_offset"],
            )
        show(answer, text)
    elif args.command == "seatmap":
        [flight] = _flights([args.flight], args.date, now, texts)
        data = await client.seatmap(flight)
        show(data, views.cabin(texts, data))
    elif args.command == "buy":
        seats = args.seats
        if seats is not None:
            if len(seats) != len(args.flights):
                raise UsageProblem(texts("Give one --seat per flight, or none."))
            seats = [None if s.lower() in ("any", "-") else s.upper() for s in seats]
        flights = _flights(args.flights, args.date, now, texts)
        ticket = await client.buy(flights=flights, seats=seats, request_id=os.urandom(8).hex())
        show({"ticket": ticket}, views.ticket(texts, ticket))
    elif args.command == "tickets":
        if args.all:
            if args.limit is not None or args.cursor is not None:
                raise UsageProblem(texts("--all lists every ticket: give it without --limit or --cursor."))
            found = await client.tickets(active_only=args.active)
            show({"tickets": found}, views.tickets(texts, found))
            return
        page = await client.tickets_page(args.limit, args.cursor, args.active or None)
        text = views.tickets(texts, page["tickets"])
        if page.get("next_cursor"):
            text += "\n" + texts(
                "More tickets: add --cursor {cursor} for the next ones, or --all for every one.",
                cursor=page["next_cursor"],
            )
        show(page, text)
    elif args.command == "cancel":
        ticket = await client.cancel(args.ticket_id.upper(), request_id=os.urandom(8).hex())
        show({"ticket": ticket}, views.ticket(texts, ticket))


async def main(
    reactor: IReactorCore,
    argv: list[str],
    out: TextIO | None = None,
    err: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] = getpass.getpass,
) -> int:
    """
    Run C{vendepass-client} with C{argv}; return its exit code.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    environ = os.environ if environ is None else environ
    lang_option = None
    if "--lang" in argv[:-1]:
        lang_option = argv[argv.index("--lang") + 1]
    texts = Texts(choose_language(lang_option, environ))
    try:
        args = parser(texts, environ, err).parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    texts = Texts(choose_language(args.lang, environ))

    def fail(
        code: str, message: str, exit_code: int, details: Mapping[str, Any] | None = None, sentence: str | None = None
    ) -> int:
        # With --json every outcome is one JSON object on stdout; the
        # sentence (default: the message) also goes to stderr, for people.
        if args.json:
            error = {"code": code, "message": message, **(details or {})}
            out.write(json.dumps({"ok": False, "error": error}, ensure_ascii=False) + "\n")
        err.write((sentence or message) + "\n")
        return exit_code

    try:
        client_endpoint(reactor, args.connect)
    except BadEndpoint as e:
        message = _bad_endpoint(texts, e)
        return fail("bad_endpoint", message, USAGE, sentence=f"vendepass-client: {message}")
    endpoint = endpoint_string(args.connect)

    if args.command is None:
        from vendepass.client.app import interactive

        return await interactive(reactor, endpoint, texts)

    try:
        # Scripts get safe retries: a purchase whose answer is lost with the
        # connection is resent on a new one and never done twice.
        client = ReconnectingClient(reactor, endpoint)
        now = (await client.ping())["time"]
    except CertificateRefused as e:
        return fail("certificate_untrusted", views.certificate_refused(texts, args.connect, e), UNREACHABLE)
    except CONNECT_ERRORS as e:
        return fail("unreachable", texts(
            "Cannot reach the server at {endpoint}: {reason}", endpoint=args.connect, reason=e
        ), UNREACHABLE)
    try:
        await _command(client, args, texts, out, environ, prompt, now)
    except UsageProblem as e:
        return fail(e.code, str(e), USAGE, sentence=f"vendepass-client: {e}")
    except ServerError as e:
        return fail(e.code, e.message, REFUSED, e.details, views.error(texts, e))
    except (ConnectionLost, CertificateRefused):
        return fail("connection_lost", texts("The connection to the server was lost."), UNREACHABLE)
    finally:
        client.close()
    return OK


def _bad_endpoint(texts: Texts, problem: BadEndpoint) -> str:
    """
    Why an endpoint string cannot be used, in one sentence.
    """
    if problem.trust_roots is not None:
        return texts("trustRoots={path} is not a directory of CA certificates (PEM files).", path=problem.trust_roots)
    reason = problem.reason
    number = re.fullmatch(r"invalid literal for int\(\) with base 10: (.*)", reason)
    if number:
        reason = texts("a number was expected instead of {value}", value=number.group(1))
    return texts(
        "cannot use --connect {endpoint} ({reason}): give HOST:PORT or an endpoint such as tcp:host=HOST:port=PORT.",
        endpoint=problem.endpoint,
        reason=reason,
    )


def run() -> None:
    """
    The C{vendepass-client} console script.
    """

    async def start(reactor: IReactorCore) -> None:
        code = await main(reactor, sys.argv[1:])
        if code:
            raise SystemExit(code)

    from twisted.internet import reactor as running

    try:
        react(lambda reactor: Deferred.fromCoroutine(start(reactor)))
    except SystemExit as e:
        # Stopped by a signal (Ctrl-C: SIGINT): exit 128 + its number, as shells expect.
        signal_number = getattr(running, "_exitSignal", None)
        if not e.code and signal_number:
            raise SystemExit(128 + signal_number)
        raise
