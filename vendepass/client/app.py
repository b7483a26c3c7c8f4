"""
The interactive terminal app: menus on standard input and output, driven by
the reactor (C{twisted.internet.stdio}), so server events such as an expired
hold are shown at once, even while the app waits for the customer to type.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import termios
from collections import deque
from datetime import date
from typing import Any, Callable

from twisted.internet import stdio
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from vendepass.client import views
from vendepass.client.dates import BadDate, parse_date, server_today
from vendepass.client.i18n import Texts
from vendepass.client.protocol import CertificateRefused, ServerError
from vendepass.client.reconnecting import RETRYABLE, ReconnectingClient

YES = {"y", "yes", "s", "sim"}
NO = {"n", "no", "nao", "não"}


class EndOfInput(Exception):
    """
    The customer closed standard input (Ctrl-D).
    """


class QuestionWithdrawn(Exception):
    """
    The question no longer makes sense (say, the hold it was about expired).
    """


@implementer(IHalfCloseableProtocol)
class Console(LineReceiver):
    """
    Line input and text output on standard I/O, one question at a time.
    """

    delimiter = b"\n"

    def __init__(
        self, terminal: bool = False, size: Callable[[], os.terminal_size] = shutil.get_terminal_size
    ) -> None:
        # Whether the output is a terminal: only there is a line redrawn in place.
        self.terminal = terminal
        self._size = size
        self._lines: deque[str] = deque()
        self._waiter: Deferred[str] | None = None
        self._prompt = ""
        self._echo_off: list[Any] | None = None
        self.closed = False
        # Once the app is leaving, no question is asked again.
        self.leaving = False
        self._gone: list[Deferred[None]] = []

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            self.restore_echo()
            waiter.callback(text)
        else:
            self._lines.append(text)

    def readConnectionLost(self) -> None:
        self.closed = True
        self.restore_echo()
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            self.write("\n")
            waiter.errback(EndOfInput())

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(EndOfInput())) -> None:
        self.readConnectionLost()
        gone, self._gone = self._gone, []
        for d in gone:
            d.callback(None)

    def close(self, clock: IReactorTime, timeout: float = 5.0) -> Deferred[None]:
        """
        Close standard I/O once everything written is flushed; fires when done.
        """
        d: Deferred[None] = Deferred()
        if self.transport is None:
            d.callback(None)
            return d
        self._gone.append(d)
        self.transport.loseConnection()
        return d.addTimeout(timeout, clock).addErrback(lambda f: None)

    def withdraw(self) -> None:
        """
        Take back the question being asked: its Deferred fails with L{QuestionWithdrawn}.
        """
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            self.restore_echo()
            self.write("\n")
            waiter.errback(QuestionWithdrawn())

    def write(self, text: str) -> None:
        if self.transport is not None:
            self.transport.write(text.encode("utf-8"))

    def say(self, text: str, reprompt: bool = True) -> None:
        """
        Print C{text}; if a question is waiting for an answer, ask it again
        below (unless C{reprompt} is false).
        """
        if self._waiter is not None and (self.leaving or not reprompt):
            self.write("\n" + text + "\n")
        elif self._waiter is not None:
            self.write("\n" + text + "\n" + self._prompt)
        else:
            self.write(text + "\n")

    def retitle(self, prompt: str, redraw: bool = True) -> None:
        """
        Change the prompt of the question waiting for an answer (so that a
        reprint shows it); on a terminal, with C{redraw}, rewrite its line now.
        """
        if self._waiter is None:
            return
        self._prompt = prompt
        if redraw and self.terminal:
            # Carriage return, clear the line, the new prompt.
            self.write("\r\x1b[2K" + prompt)

    def size(self) -> os.terminal_size | None:
        """
        The terminal's size, or C{None} when the output is not a terminal.
        """
        return self._size() if self.terminal else None

    def ask(self, prompt: str, secret: bool = False) -> Deferred[str]:
        """
        Ask a question; fires with the answer, or fails with L{EndOfInput}.
        """
        self._prompt = prompt
        self.write(prompt)
        if self._lines:
            return succeed(self._lines.popleft())
        if self.closed:
            self.write("\n")
            return fail(EndOfInput())
        if secret:
            self._hide_echo()
        self._waiter = Deferred()
        return self._waiter

    def _hide_echo(self) -> None:
        try:
            fd = sys.stdin.fileno()
            if not os.isatty(fd):
                return
            attributes = termios.tcgetattr(fd)
            hidden = list(attributes)
            hidden[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, hidden)
            self._echo_off = attributes
        except (OSError, ValueError, termios.error):
            self._echo_off = None

    def restore_echo(self) -> None:
        if self._echo_off is not None:
            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._echo_off)
            except (OSError, ValueError, termios.error):
                pass
            self._echo_off = None
            self.write("\n")


class App:
    """
    The menus, and what the customer holds right now.
    """

    def __init__(self, reactor: IReactorCore, console: Console, texts: Texts, clock: IReactorTime | None = None) -> None:
        self.reactor = reactor
        # The countdown's time (the reactor's unless given).
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.console = console
        self._ = texts
        # Reconnects (and logs in again) by itself when the connection drops.
        self.client: ReconnectingClient | None = None
        # Why the server is about to close the connection, if it said so.
        self._closing: str | None = None
        self.username: str | None = None
        self.hold: dict[str, Any] | None = None
        self.hold_deadline = 0.0
        self.hold_seconds = 300
        self._reminders: list[IDelayedCall] = []
        self._network: dict[str, Any] | None = None
        self._leaving = False
        self._confirming: str | None = None
        # The prompt of the question about the hold, computed afresh (its countdown).
        self._question: Callable[[], str] | None = None

    # -- plumbing -----------------------------------------------------------

    def say(self, text: str) -> None:
        self.console.say(text)

    async def ask(self, prompt: str, secret: bool = False) -> str:
        return (await self.console.ask(prompt, secret)).strip()

    async def confirm(self, prompt: str | Callable[[], str]) -> bool:
        while True:
            answer = (await self.ask(prompt if isinstance(prompt, str) else prompt())).lower()
            if answer in YES:
                return True
            if answer in NO or answer == "":
                return False
            self.say(self._("Please answer y (yes) or n (no)."))

    def event(self, name: str, data: dict[str, Any]) -> None:
        if name == "hold_expired" and self.hold is not None and data.get("hold_id") == self.hold["hold_id"]:
            self._end_hold()
            confirming = self._confirming == data.get("hold_id")
            self.console.say(self._("Your hold expired: the seats were released. Search again to choose new seats."),
                             reprompt=not confirming)
            if confirming:
                # "Buy it?" has no object any more.
                self.console.withdraw()
        elif name == "idle_timeout":
            seconds = int(data.get("seconds") or 0)
            if seconds >= 60 and seconds % 60 == 0:
                self._closing = self._.plural(
                    "The server closed the connection after {n} minute without activity.",
                    "The server closed the connection after {n} minutes without activity.",
                    seconds // 60,
                )
            else:
                self._closing = self._.plural(
                    "The server closed the connection after {n} second without activity.",
                    "The server closed the connection after {n} seconds without activity.",
                    seconds,
                )
        elif name == "connection_lost" and not self._leaving:
            self._connection_lost()

    def _connection_lost(self) -> None:
        """
        Say why, and what the drop took: the place in the menus stays, the
        next request reconnects (and logs in again) by itself.
        """
        why, self._closing = self._closing or self._("The connection to the server was lost."), None
        if self.username is not None:
            why += " " + self._("The app reconnects when you go on; you stay logged in as {username}.",
                                username=self.username)
        else:
            why += " " + self._("The app reconnects when you go on.")
        if self.hold is None:
            self.say(why)
            return
        # The server released the hold with the connection.
        self._end_hold()
        confirming = self._confirming is not None
        self.console.say(why + "\n" + self._("Your hold ended with the connection: the seats were released. "
                                             "Search again to choose new seats."), reprompt=not confirming)
        if confirming:
            self.console.withdraw()

    @property
    def api(self) -> ReconnectingClient:
        assert self.client is not None
        return self.client

    # -- holds --------------------------------------------------------------

    def _start_hold(self, hold: dict[str, Any]) -> None:
        self.hold = hold
        self.hold_deadline = self.clock.seconds() + self.hold_seconds
        for before in (60, 10):
            if self.hold_seconds > before:
                self._reminders.append(self.clock.callLater(self.hold_seconds - before, self._remind, before))

    def _remind(self, left: int) -> None:
        if self.hold is not None:
            if self._question is not None:
                # Reprinted below the reminder with the time left now.
                self.console.retitle(self._question(), redraw=False)
            self.say(self._("Hurry: your hold ends in {left} seconds.", left=left))

    def _tick(self) -> None:
        if self._question is not None:
            self.console.retitle(self._question())

    def _end_hold(self) -> None:
        self.hold = None
        for call in self._reminders:
            if call.active():
                call.cancel()
        self._reminders = []

    def remaining(self) -> str:
        seconds = max(0, math.ceil(self.hold_deadline - self.clock.seconds()))
        return f"{seconds // 60}:{seconds % 60:02d}"

    async def release_hold(self) -> None:
        if self.hold is not None:
            hold_id = self.hold["hold_id"]
            self._end_hold()
            try:
                await self.api.release(hold_id)
            except ServerError:
                pass

    # -- the whole session --------------------------------------------------

    async def run(self, endpoint: str) -> int:
        self.say(self._("VendePass - cheap flights across Brazil"))
        try:
            self.client = ReconnectingClient(self.reactor, endpoint, self.event)
            await self.client.ping()
        except CertificateRefused as e:
            self.say(views.certificate_refused(self._, endpoint, e))
            return 3
        except Exception as e:
            self.say(self._("Cannot reach the server at {endpoint}: {reason}", endpoint=endpoint, reason=e))
            return 3
        assert self.client.protocol is not None
        self.hold_seconds = int((self.client.protocol.welcome or {}).get("hold_seconds", 300))
        trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._on_shutdown)
        try:
            return await self._session()
        finally:
            self.reactor.removeSystemEventTrigger(trigger)

    async def _session(self) -> int:
        code = 0
        try:
            while True:
                if self.username is None:
                    if not await self.account_menu():
                        break
                elif not await self.main_menu():
                    break
        except EndOfInput:
            pass
        except RETRYABLE as e:
            # Reconnecting failed too.
            self.say(self._("Cannot reach the server at {endpoint}: {reason}", endpoint=self.api.endpoint, reason=e))
            code = 3
        await self.leave()
        self.say(self._("Goodbye!"))
        return code

    def _on_shutdown(self) -> Deferred[None] | None:
        """
        Ctrl-C: release what we hold before the reactor stops.
        """
        self.console.restore_echo()
        if self._leaving:
            return None

        async def interrupted() -> None:
            held = self.hold is not None
            self.console.leaving = True
            await self.leave()
            if held:
                self.say(self._("Seats released."))
            self.say(self._("Goodbye!"))
            await self.console.close(self.clock)

        return Deferred.fromCoroutine(interrupted())

    async def leave(self) -> None:
        if self._leaving:
            return
        self._leaving = True
        try:
            # Not worth a new connection: the server ends a dropped one's holds and session.
            if self.client is not None and self.client.connected:
                await self.release_hold()
                if self.username is not None:
                    await self.api.logout()
        except (ServerError, *RETRYABLE):
            pass
        finally:
            if self.client is not None:
                self.client.close()

    # -- menus --------------------------------------------------------------

    async def menu(self, title: str, options: list[tuple[str, str]]) -> str:
        self.say("")
        self.say(title)
        for key, label in options:
            self.say(f"  {key}) {label}")
        keys = {key for key, _ in options}
        while True:
            choice = (await self.ask(self._("Choose: "))).lower()
            if choice in keys:
                return choice
            self.say(self._("Please choose one of: {keys}", keys=", ".join(k for k, _ in options)))

    async def account_menu(self) -> bool:
        choice = await self.menu(
            self._("Welcome to VendePass!"),
            [("1", self._("Log in")), ("2", self._("Create an account")), ("0", self._("Quit"))],
        )
        if choice == "0":
            return False
        username = await self.ask(self._("Username: "))
        password = await self.ask(self._("Password: "), secret=True)
        while True:
            try:
                if choice == "2":
                    await self.api.register(username, password)
                    self.say(self._("Account {username} created.", username=username))
                self.username = await self.api.login(username, password)
                self.say(self._("Hello, {username}!", username=self.username))
            except ServerError as e:
                self.say(views.error(self._, e))
                if e.code == "bad_credentials" and choice == "1":
                    # A typo: ask again in place, not from the menu.
                    password = await self.ask(self._("Password (empty to go back): "), secret=True)
                    if password:
                        continue
            return True

    async def main_menu(self) -> bool:
        choice = await self.menu(
            self._("Logged in as {username}.", username=self.username),
            [
                ("1", self._("Search flights and buy")),
                ("2", self._("My tickets")),
                ("3", self._("Cancel a ticket")),
                ("4", self._("Log out")),
                ("0", self._("Quit")),
            ],
        )
        try:
            if choice == "1":
                await self.search()
            elif choice == "2":
                page = await self.api.tickets_page()
                self.say(views.tickets(self._, page["tickets"]))
                if page.get("next_cursor"):
                    self.say(self._("These are your most recent tickets; vendepass-client tickets --all lists every one."))
            elif choice == "3":
                await self.cancel()
            elif choice == "4":
                await self.release_hold()
                await self.api.logout()
                self.username = None
                self.say(self._("Logged out."))
            else:
                return False
        except ServerError as e:
            self.say(views.error(self._, e))
        return True

    # -- searching and buying -----------------------------------------------

    async def ask_airport(self, prompt: str) -> dict[str, Any] | None:
        assert self._network is not None
        while True:
            typed = await self.ask(prompt)
            if not typed:
                return None
            airport = views.find_airport(self._network["airports"], typed)
            if airport is not None:
                return airport
            self.say(self._("Unknown city or airport: {name}", name=typed))

    async def search(self) -> None:
        if self._network is None:
            self._network = await self.api.routes()
        self.say(
            self._("Airports: {airports}", airports=", ".join(
                f"{a['code']} {a['city']}" for a in self._network["airports"]))
        )
        origin = await self.ask_airport(self._("From (city or code, empty to go back): "))
        if origin is None:
            return
        destination = await self.ask_airport(self._("To (city or code): "))
        if destination is None:
            return
        if destination["code"] == origin["code"]:
            self.say(self._("Origin and destination must differ."))
            return
        today: date | None = None
        while True:
            day = await self.ask(self._("Date (YYYY-MM-DD, empty for any day): "))
            try:
                if day:
                    # YYYY-MM-DD, today, tomorrow, +N; DD/MM/AAAA, hoje, amanhã in pt_BR.
                    # Today is the server's: asked once, not at every date typed.
                    today = today or server_today((await self.api.ping())["time"])
                    day = parse_date(day, today, self._.language).isoformat()
                break
            except BadDate as e:
                self.say(str(e))
        # By day, direct flights first (or by price); p, d and m change the
        # order or show the next page.
        sort, offset = "departure", 0
        while True:
            answer = await self.api.search_page(
                origin["code"], destination["code"], day or None, sort=sort, offset=offset
            )
            found = answer["itineraries"]
            if sort == "departure":
                found = views.by_day(found)
            self.say(views.outside_window(self._, day or None, answer.get("sales_window"))
                     or views.itineraries(self._, found))
            if not found:
                return
            more: int | None = answer.get("next_offset")
            hints = [self._("Sorted by day, direct flights first; p: by price.") if sort == "departure"
                     else self._("Sorted by price; d: by day.")]
            if more is not None:
                hints.append(self._("m: more itineraries."))
            self.say(" ".join(hints))
            while True:
                choice = (await self.ask(self._("Itinerary number (empty to go back): "))).lower()
                if not choice:
                    return
                if choice in ("p", "d") or choice == "m" and more is not None:
                    break
                if choice.isdigit() and 1 <= int(choice) <= len(found):
                    if not await self.buy(found[int(choice) - 1]):
                        return
                    # Back from the first seat: the same list again.
                    break
                self.say(self._("Please type a number from 1 to {last}.", last=len(found)))
            if choice == "m" and more is not None:
                offset = more
            elif choice in ("p", "d"):
                sort, offset = "price" if choice == "p" else "departure", 0

    async def pick_seats(self, legs: list[dict[str, Any]]) -> list[str | None] | None:
        seats: list[str | None] = []
        while len(seats) < len(legs):
            leg = legs[len(seats)]
            seatmap = await self.api.seatmap(leg["flight"])
            self.say(views.cabin(self._, seatmap, self.console.size()))
            statuses = {s["seat"]: s["status"] for s in seatmap["seats"]}
            while True:
                typed = (await self.ask(
                    self._("Seat on {number} (e.g. 12A; empty: any free seat; q: back): ", number=leg["number"])
                )).upper()
                if typed == "Q":
                    if not seats:
                        return None
                    # One step back: the seat of the leg before.
                    seats.pop()
                    break
                if not typed:
                    seats.append(None)
                    break
                if typed not in statuses:
                    self.say(self._("Seat {seat} does not exist on this flight.", seat=typed))
                elif statuses[typed] != "free":
                    self.say(self._("Seat {seat} is already taken.", seat=typed))
                else:
                    seats.append(typed)
                    break
        return seats

    async def buy(self, itinerary: dict[str, Any]) -> bool:
        """
        Choose seats, hold them and offer to buy them. C{True} when the
        customer went back from the first seat (to the itineraries).
        """
        legs = itinerary["legs"]
        flights = [leg["flight"] for leg in legs]
        while True:
            seats = await self.pick_seats(legs)
            if seats is None:
                return True
            try:
                hold = await self.api.hold(flights, seats)
                break
            except ServerError as e:
                self.say(views.error(self._, e))
                if e.code not in ("seat_unavailable", "sold_out") or not await self.confirm(
                    self._("Choose other seats? [y/n] ")
                ):
                    return False
        self._start_hold(hold)
        self.say(views.hold(self._, hold))
        self.say(self._("These seats are yours for {time} while you decide.", time=self.remaining()))
        self._confirming = hold["hold_id"]

        def question() -> str:
            return self._("Buy for {price}? ({time} left) [y/n] ", price=self._.money(hold["price"]), time=self.remaining())

        self._question = question
        # On a terminal the countdown runs in the prompt, redrawn each second.
        ticker = LoopingCall(self._tick)
        ticker.clock = self.clock
        if self.console.terminal:
            ticker.start(1, now=False)
        try:
            wanted = await self.confirm(question)
        except QuestionWithdrawn:
            return False
        finally:
            self._confirming = None
            self._question = None
            if ticker.running:
                ticker.stop()
        if not wanted:
            await self.release_hold()
            self.say(self._("Seats released."))
            return False
        if self.hold is None or self.hold["hold_id"] != hold["hold_id"]:
            self.say(self._("Your hold expired: the seats were released. Search again to choose new seats."))
            return False
        try:
            ticket = await self.api.buy(hold_id=hold["hold_id"], request_id=os.urandom(8).hex())
        except ServerError as e:
            self._end_hold()
            self.say(views.error(self._, e))
            return False
        self._end_hold()
        self.say(self._("Done! Your ticket:"))
        self.say(views.ticket(self._, ticket))
        return False

    async def cancel(self) -> None:
        active = await self.api.tickets(active_only=True)
        if not active:
            self.say(self._("You have no active tickets."))
            return
        self.say(views.tickets(self._, active))
        typed = (await self.ask(self._("Ticket to cancel (empty to go back): "))).upper()
        while typed not in {t["ticket_id"] for t in active}:
            if not typed:
                return
            self.say(self._("{ticket_id} is not one of your active tickets.", ticket_id=typed))
            typed = (await self.ask(self._("Ticket to cancel (empty to go back): "))).upper()
        if not await self.confirm(self._("Cancel ticket {ticket_id}? This cannot be undone. [y/n] ", ticket_id=typed)):
            self.say(self._("Nothing was cancelled."))
            return
        ticket = await self.api.cancel(typed, request_id=os.urandom(8).hex())
        self.say(self._("Ticket {ticket_id} cancelled.", ticket_id=ticket["ticket_id"]))


async def interactive(reactor: IReactorCore, endpoint: str, texts: Texts) -> int:
    """
    Run the interactive app on standard I/O until the customer quits.
    """
    try:
        terminal = os.isatty(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        terminal = False
    console = Console(terminal=terminal)
    stdio.StandardIO(console, reactor=reactor)  # type: ignore[arg-type]
    app = App(reactor, console, texts)
    try:
        return await app.run(endpoint)
    finally:
        # Let the last words reach the terminal before the reactor stops.
        await console.close(reactor)  # type: ignore[arg-type]
