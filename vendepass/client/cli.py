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
import sys
from datetime import date
from typing import Any, Callable, Mapping, TextIO

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import react

from vendepass import __version__
from vendepass.client import views
from vendepass.client.i18n import Texts, choose_language
from vendepass.client.protocol import DEFAULT_ENDPOINT, ConnectionLost, ServerError
from vendepass.client.reconnecting import ReconnectingClient

OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3

CONNECT_ERRORS = (net_error.ConnectError, net_error.DNSLookupError, ConnectionLost, net_error.ConnectionClosed)


class UsageProblem(Exception):
    """
    The command line is wrong (exit code 2).
    """


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
    )
    top.add_argument("--version", action="version", version=f"vendepass-client {__version__}")
    top.add_argument(
        "--connect",
        default=environ.get("VENDEPASS_CONNECT", DEFAULT_ENDPOINT),
        help=texts("server endpoint (default: {default})", default=DEFAULT_ENDPOINT),
    )
    top.add_argument("--lang", choices=["en", "pt_BR", "pt"], help=texts("language (default: from LANG)"))
    top.add_argument("--json", action="store_true", help=texts("print JSON for scripts"))
    top.add_argument(
        "--user",
        default=environ.get("VENDEPASS_USER"),
        help=texts("username (password from VENDEPASS_PASSWORD or a prompt)"),
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND")

    routes = commands.add_parser("routes", help=texts("the network, or itineraries from ORIGIN to DESTINATION"))
    routes.add_argument("origin", nargs="?", help=texts("city name or airport code"))
    routes.add_argument("destination", nargs="?", help=texts("city name or airport code"))
    routes.add_argument("--date", help=texts("departure date, YYYY-MM-DD"))
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
    seatmap.add_argument("flight", help=texts("flight id, e.g. VP1203-2026-12-01"))

    buy = commands.add_parser("buy", help=texts("buy seats on the flights of one itinerary"))
    buy.add_argument("flights", nargs="+", help=texts("flight ids of one itinerary, in order"))
    buy.add_argument(
        "--seat", action="append", dest="seats", help=texts("seat for each flight, in order (default: any)")
    )

    commands.add_parser("tickets", help=texts("list my tickets"))

    cancel = commands.add_parser("cancel", help=texts("cancel a ticket"))
    cancel.add_argument("ticket_id", help=texts("the ticket's booking code"))

    commands.add_parser("register", help=texts("create an account for --user"))
    return top


def _password(environ: Mapping[str, str], prompt: Callable[[str], str], texts: Texts) -> str:
    password = environ.get("VENDEPASS_PASSWORD")
    if password is None:
        password = prompt(texts("Password: "))
    return password


async def _command(
    client: ReconnectingClient,
    args: argparse.Namespace,
    texts: Texts,
    out: TextIO,
    environ: Mapping[str, str],
    prompt: Callable[[str], str],
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
            try:
                date.fromisoformat(args.date)
            except ValueError:
                raise UsageProblem(texts("The date must look like 2026-12-01."))
        airports = (await client.routes())["airports"]
        codes = []
        for typed in (args.origin, args.destination):
            airport = views.find_airport(airports, typed)
            if airport is None:
                raise UsageProblem(texts("Unknown city or airport: {name}", name=typed))
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
        data = await client.seatmap(args.flight)
        show(data, views.cabin(texts, data))
    elif args.command == "buy":
        seats = args.seats
        if seats is not None:
            if len(seats) != len(args.flights):
                raise UsageProblem(texts("Give one --seat per flight, or none."))
            seats = [None if s.lower() in ("any", "-") else s.upper() for s in seats]
        ticket = await client.buy(flights=args.flights, seats=seats, request_id=os.urandom(8).hex())
        show({"ticket": ticket}, views.ticket(texts, ticket))
    elif args.command == "tickets":
        found = await client.tickets()
        show({"tickets": found}, views.tickets(texts, found))
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

    if args.command is None:
        from vendepass.client.app import interactive

        return await interactive(reactor, args.connect, texts)

    try:
        # Scripts get safe retries: a purchase whose answer is lost with the
        # connection is resent on a new one and never done twice.
        client = ReconnectingClient(reactor, args.connect)
        await client.ping()
    except CONNECT_ERRORS as e:
        err.write(texts("Cannot reach the server at {endpoint}: {reason}", endpoint=args.connect, reason=e) + "\n")
        return UNREACHABLE
    try:
        await _command(client, args, texts, out, environ, prompt)
    except UsageProblem as e:
        err.write(f"vendepass-client: {e}\n")
        return USAGE
    except ServerError as e:
        if args.json:
            out.write(json.dumps({"error": {"code": e.code, "message": e.message, **e.details}}) + "\n")
        err.write(views.error(texts, e) + "\n")
        return REFUSED
    except ConnectionLost:
        err.write(texts("The connection to the server was lost.") + "\n")
        return UNREACHABLE
    finally:
        client.close()
    return OK


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
