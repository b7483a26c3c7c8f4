"""
The interactive C{vendepass-client} app driven end to end: a real server on a
loopback port in this process (time on the service's L{Clock}, so a test
expires holds by advancing it), and the installed console script as a
subprocess on pipes, typed to line by line.

Every wait has a deadline (never a fixed sleep); a wait that times out fails
with the transcript of the session.
"""

from __future__ import annotations

import codecs
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, cast

from hypothesis import given, strategies as st

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase as SyncTestCase, TestCase

from vendepass.client import views
from vendepass.client.app import App, Console
from vendepass.client.i18n import Texts
from vendepass.service import ReservationService

from tests.common import ALICE, BIG, BOB, START, TINY, TOMORROW, LineClient, make_service
from tests.test_client_cli import LiveServer, clock, core, serve, stop_listening

JSON = dict[str, Any]

CLIENT = Path(sys.executable).parent / "vendepass-client"

# Seconds one expect() waits for its text.
DEADLINE = 20.0

# Long enough that the app's own reminders (60 and 10 s before the end, on
# the real clock) never fire during a test; holds expire when a test
# advances the service's clock.
HOLD_SECONDS = 600

# Opcodes of protocol v1, for the other customers on in-memory connections.
BUY, TICKETS, SEATMAP = 3, 4, 8

TICKET_LINE = re.compile(r"Ticket ([A-Z0-9]{8}) \(active\), R\$ 250\.00")


class Expecting:
    """
    What the app printed so far, and waiting (with a deadline) for a text in it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = ""
        self.seen = 0
        self._waiting: tuple[str, Deferred[str], IDelayedCall] | None = None

    @property
    def running(self) -> bool:
        return True

    def send(self, line: str) -> None:
        """
        Type C{line} and Enter.
        """
        raise NotImplementedError()

    def transcript(self, problem: str) -> str:
        text = f"{problem}\n--- {self.name}: output (>>> marks the last expect) ---\n"
        return text + self.output[: self.seen] + ">>>" + self.output[self.seen :]

    def expect(self, text: str, timeout: float = DEADLINE) -> Deferred[str]:
        """
        Fires with the output from the last expect up to the end of C{text},
        once C{text} appears in it; fails after C{timeout} seconds, or if the
        app ends first, with the transcript.
        """
        assert self._waiting is None, "one expect at a time"
        d: Deferred[str] = Deferred()

        def late() -> None:
            assert self._waiting is not None
            self._waiting = None
            d.errback(FailTest(self.transcript(f"no {text!r} within {timeout} s")))

        self._waiting = (text, d, clock().callLater(timeout, late))
        self._check()
        if not self.running:
            self._fail_waiting()
        return d

    def _fail_waiting(self) -> None:
        """
        The app ended: what we wait for will never come.
        """
        if self._waiting is not None:
            text, d, timer = self._waiting
            self._waiting = None
            timer.cancel()
            d.errback(FailTest(self.transcript(f"the app ended before printing {text!r}")))

    def _check(self) -> None:
        if self._waiting is None:
            return
        text, d, timer = self._waiting
        found = self.output.find(text, self.seen)
        if found == -1:
            return
        self._waiting = None
        timer.cancel()
        end = found + len(text)
        chunk, self.seen = self.output[self.seen : end], end
        d.callback(chunk)

    def since(self) -> str:
        """
        The output after the last expect (without waiting).
        """
        return self.output[self.seen :]

    def taken(self) -> str:
        """
        The output after the last expect, which counts as expected now.
        """
        text, self.seen = self.since(), len(self.output)
        return text


class ClientProcess(Expecting, ProcessProtocol):
    """
    The app as a subprocess: what it prints, what we type, how it ended.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.errors = ""
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._decode_errors = codecs.getincrementaldecoder("utf-8")("replace").decode
        self.reason: Failure | None = None
        self._ended: list[Deferred[None]] = []

    # -- ProcessProtocol ----------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        self.output += self._decode(data)
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.errors += self._decode_errors(data)

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self._fail_waiting()
        ended, self._ended = self._ended, []
        for waiter in ended:
            waiter.callback(None)

    # -- the test's side ----------------------------------------------------

    @property
    def process(self) -> IProcessTransport:
        return cast(IProcessTransport, self.transport)

    @property
    def running(self) -> bool:
        return self.reason is None

    def transcript(self, problem: str) -> str:
        text = super().transcript(problem)
        if self.errors:
            text += f"\n--- stderr ---\n{self.errors}"
        if self.reason is not None:
            text += f"\n--- ended: {self.reason.getErrorMessage()}"
        return text

    def send(self, line: str) -> None:
        self.process.write(line.encode("utf-8") + b"\n")

    def ended(self, timeout: float = DEADLINE) -> Deferred[int]:
        """
        Fires with the exit code once the app ends (fails on a signal or
        after C{timeout} seconds).
        """
        d: Deferred[None] = Deferred()
        if self.running:
            self._ended.append(d)
        else:
            d.callback(None)

        def late() -> None:
            if not d.called:
                self._ended.remove(d)
                d.errback(FailTest(self.transcript(f"the app did not end within {timeout} s")))

        timer = clock().callLater(timeout, late)

        def code(_: None) -> int:
            if timer.active():
                timer.cancel()
            assert self.reason is not None
            if self.reason.check(ProcessDone):
                return 0
            value = self.reason.value
            assert isinstance(value, ProcessTerminated), self.reason
            if value.signal is not None:
                raise FailTest(self.transcript(f"the app was killed by signal {value.signal}"))
            return int(value.exitCode)

        def cancel_timer(failure: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            return failure

        return d.addCallbacks(code, cancel_timer)


class Screen(Expecting, StringTransport):
    """
    The app in this process, its console on a string transport: what it
    writes is the output, the countdown runs on L{clock}, the server is real.
    """

    def __init__(self, name: str, endpoint: str, terminal: bool, language: str = "en", lines: int = 40) -> None:
        Expecting.__init__(self, name)
        StringTransport.__init__(self)
        self.console = Console(terminal=terminal, size=lambda: os.terminal_size((80, lines)))
        self.console.makeConnection(self)
        self.clock = Clock()
        self.texts = Texts(language)
        self.app = App(core(), self.console, self.texts, clock=self.clock)
        self.done = Deferred.fromCoroutine(self.app.run(endpoint))
        self.done.addBoth(self._ended)

    def _ended(self, result: Any) -> Any:
        self._check()
        self._fail_waiting()
        return result

    @property
    def running(self) -> bool:
        return not self.done.called

    def write(self, data: bytes) -> None:
        StringTransport.write(self, data)
        self.output += data.decode("utf-8")
        # Not at once: the app, in the middle of asking, goes on first.
        clock().callLater(0, self._check)

    def send(self, line: str) -> None:
        self.console.dataReceived(line.encode("utf-8") + b"\n")

    async def end(self) -> int:
        """
        Close the input (Ctrl-D) if the app still runs; its exit code.
        """
        if self.running:
            self.console.connectionLost()
        return int(await self.done.addTimeout(DEADLINE, clock()))


class AppTestCase(TestCase):
    """
    A server with an in-memory service, and the app connected to it.
    """

    def setUp(self) -> None:
        if not CLIENT.exists():
            raise SkipTest(f"{CLIENT} is not installed")
        # The server's time: holds expire when a test advances it.
        self.clock = Clock()
        self.clock.advance(START)
        self.service: ReservationService = make_service(hold_seconds=HOLD_SECONDS, clock=self.clock)
        self.server: LiveServer = serve(self, self.service)

    def start(self, lang: str = "en") -> ClientProcess:
        app = ClientProcess(self.id().rsplit(".", 1)[-1])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VENDEPASS_", "LC_", "LANG"))}
        env.pop("PYTHONPATH", None)
        cast(IReactorProcess, _reactor).spawnProcess(
            app,
            str(CLIENT),
            [str(CLIENT), "--lang", lang, "--connect", self.server.endpoint],
            env=env,
        )

        async def stop() -> None:
            if app.running:
                app.process.signalProcess("KILL")
                try:
                    await app.ended()
                except FailTest:
                    pass

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return app

    def in_process(self, terminal: bool, language: str = "en", lines: int = 40) -> Screen:
        """
        The app in this process (see L{Screen}); ended by the cleanup.
        """
        screen = Screen(self.id().rsplit(".", 1)[-1], self.server.endpoint, terminal, language, lines)
        self.addCleanup(screen.end)
        return screen

    # -- conversations ------------------------------------------------------

    async def log_in(self, app: Expecting, user: tuple[str, str] = ALICE) -> None:
        await app.expect("Welcome to VendePass!")
        await app.expect("Choose: ")
        app.send("1")
        await app.expect("Username: ")
        app.send(user[0])
        await app.expect("Password: ")
        app.send(user[1])
        await app.expect(f"Hello, {user[0]}!")
        await app.expect(f"Logged in as {user[0]}.")
        await app.expect("Choose: ")

    async def search_tiny(self, app: Expecting, destination: str = "REC") -> str:
        """
        From the main menu to the seat prompt of the SSA > REC flight of
        TOMORROW; returns what was printed on the way (the cabin picture).
        With C{destination} C{"MAO"}: of its first leg, then VP200 REC > MAO.
        """
        app.send("1")
        await app.expect("From (city or code, empty to go back): ")
        app.send("SSA")
        await app.expect("To (city or code): ")
        app.send(destination)
        await app.expect("Date (YYYY-MM-DD, empty for any day): ")
        app.send(TOMORROW)
        table = await app.expect("Itinerary number (empty to go back): ")
        self.assertIn(f"1  {TOMORROW} 08:00  {TOMORROW} 09:15  SSA > REC  VP100" if destination == "REC"
                      else f"1  {TOMORROW} 08:00  {TOMORROW} 14:00  SSA > REC > MAO  VP100, VP200", table)
        app.send("1")
        return await app.expect("Seat on VP100 (e.g. 12A; empty: any free seat; q: back): ")

    async def hold_seat(self, app: Expecting, seat: str) -> str:
        """
        At the seat prompt: choose C{seat}, up to the question whether to buy.
        """
        app.send(seat)
        return await self.buy_question(app)

    async def buy_question(self, app: Expecting) -> str:
        """
        Up to the question whether to buy the hold (its countdown starts at
        10:00, and may have ticked once already).
        """
        held = await app.expect("Buy for R$ 250.00? (")
        held += await app.expect(" left) [y/n] ")
        self.assertRegex(held, r"Buy for R\$ 250\.00\? \((10:00|9:5\d) left\) \[y/n\] $")
        return held

    async def buy_tiny(self, app: Expecting, seat: str) -> str:
        """
        From the main menu: buy C{seat} on the flight; returns the ticket id.
        """
        await self.search_tiny(app)
        await self.hold_seat(app, seat)
        app.send("y")
        await app.expect("Done! Your ticket:")
        ticket = await app.expect(f"seat {seat}")
        match = TICKET_LINE.search(ticket)
        if match is None:
            self.fail(app.transcript("no ticket line"))
        await app.expect("Choose: ")
        return match.group(1)

    async def quit(self, app: ClientProcess) -> None:
        """
        Choose Quit in the menu shown now; the app ends with exit code 0.
        """
        app.send("0")
        code = await app.ended()
        self.assertEqual(code, 0, app.transcript("exit code"))

    def assertGoodbye(self, app: ClientProcess) -> None:
        """
        The app, which has ended, said goodbye last.
        """
        self.assertTrue(
            app.output.rstrip().endswith("Goodbye!"), app.transcript("the app did not say Goodbye! before it ended")
        )

    # -- the server, seen by other customers --------------------------------

    def customer(self, user: tuple[str, str] | None = None) -> LineClient:
        return self.server.customer(user)

    def seats(self, flight: str = TINY) -> dict[str, tuple[str, bool]]:
        """
        Each seat's status, seen from a connection that holds nothing.
        """
        seatmap = self.customer().ok(SEATMAP, {"flight": flight})
        return {s["seat"]: (s["status"], s["mine"]) for s in seatmap["seats"]}

    def status(self, seat: str, flight: str = TINY) -> str:
        return self.seats(flight)[seat][0]

    def tickets(self, user: tuple[str, str] = ALICE) -> list[JSON]:
        return cast(list[JSON], self.customer(user).ok(TICKETS)["tickets"])


class PurchaseTests(AppTestCase):
    async def test_whole_purchase(self) -> None:
        app = self.start()
        await app.expect("VendePass - cheap flights across Brazil")
        await self.log_in(app)
        cabin = await self.search_tiny(app)
        self.assertIn(f"Flight VP100 SSA > REC, {TOMORROW} 08:00\n     A   B\n  1  .   .\n  2  .   .\n4 free", cabin)

        app.send("2B")
        held = await self.buy_question(app)
        self.assertIn("Held: VP100 seat 2B, R$ 250.00.", held)
        self.assertRegex(held, r"These seats are yours for (10:00|9:5\d) while you decide\.")
        self.assertEqual(self.status("2B"), "held")
        self.assertEqual(self.tickets(), [])

        app.send("y")
        done = await app.expect("seat 2B")
        self.assertIn("Done! Your ticket:", done)
        match = TICKET_LINE.search(done)
        if match is None:
            self.fail(app.transcript("no ticket line"))
        ticket_id = match.group(1)
        self.assertIn(f"  VP100 SSA > REC  {TOMORROW} 08:00 - {TOMORROW} 09:15  seat 2B", app.output)
        [ticket] = self.tickets()
        self.assertEqual((ticket["ticket_id"], ticket["status"]), (ticket_id, "active"))
        self.assertEqual(self.status("2B"), "sold")

        await app.expect("Choose: ")
        app.send("2")
        listed = await app.expect("Choose: ")
        self.assertRegex(listed, rf"{ticket_id}  active  SSA > REC  {TOMORROW} 08:00  2B\s+R\$ 250\.00")
        await self.quit(app)

    async def test_decline(self) -> None:
        """
        Answering n releases the hold at once.
        """
        app = self.start()
        await self.log_in(app)
        await self.search_tiny(app)
        await self.hold_seat(app, "1B")
        self.assertEqual(self.status("1B"), "held")
        app.send("n")
        await app.expect("Seats released.")
        await app.expect("Choose: ")
        self.assertEqual(self.status("1B"), "free")
        self.assertEqual(self.tickets(), [])
        await self.quit(app)

    async def test_lost_race(self) -> None:
        """
        Another customer buys the seat while the app shows the cabin: the
        server refuses it, and the app offers to choose again.
        """
        app = self.start()
        await self.log_in(app)
        cabin = await self.search_tiny(app)
        self.assertIn("  1  .   .", cabin)

        self.customer(BOB).ok(BUY, {"flights": [TINY], "seats": ["1A"]})
        app.send("1A")
        refused = await app.expect("Choose other seats? [y/n] ")
        self.assertIn("Seat 1A is already taken.", refused)
        self.assertEqual(self.status("1A"), "sold")

        app.send("y")
        cabin = await app.expect("Seat on VP100 (e.g. 12A; empty: any free seat; q: back): ")
        self.assertIn("  1  x   .", cabin)
        app.send("1A")
        await app.expect("Seat 1A is already taken.")
        await app.expect("Seat on VP100")
        await self.hold_seat(app, "1B")
        app.send("y")
        await app.expect("Done! Your ticket:")
        await app.expect("seat 1B")
        self.assertEqual([[leg["seat"] for leg in t["legs"]] for t in self.tickets()], [["1B"]])
        await app.expect("Choose: ")
        await self.quit(app)

    async def test_hold_expiry(self) -> None:
        """
        The server expires the hold while the app waits for an answer: the
        app says so at once, without any input, and a late y buys nothing.
        """
        app = self.start()
        await self.log_in(app)
        await self.search_tiny(app)
        await self.hold_seat(app, "2A")
        self.assertEqual(self.status("2A"), "held")

        self.clock.advance(HOLD_SECONDS + 1)
        expired = await app.expect("Your hold expired")
        self.assertNotIn("Done!", expired)
        self.assertEqual(self.status("2A"), "free")
        # "Buy it?" is withdrawn: the app goes straight back to the menu.
        back = await app.expect("Choose: ")
        self.assertIn("the seats were released. Search again to choose new seats.", back)
        self.assertNotIn("[y/n]", back)
        self.assertIn("1) Search flights and buy", back)

        # A late "y" is just an unknown menu choice: nothing is bought.
        app.send("y")
        await app.expect("Please choose one of")
        self.assertNotIn("Done!", app.output)
        self.assertEqual(self.tickets(), [])
        self.assertEqual(self.status("2A"), "free")
        await self.quit(app)

    async def test_cancel(self) -> None:
        app = self.start()
        await self.log_in(app)
        ticket_id = await self.buy_tiny(app, "2B")
        self.assertEqual(self.status("2B"), "sold")

        app.send("3")
        listed = await app.expect("Ticket to cancel (empty to go back): ")
        self.assertIn(f"{ticket_id}  active", listed)
        app.send(ticket_id.lower())
        await app.expect(f"Cancel ticket {ticket_id}? This cannot be undone. [y/n] ")
        app.send("y")
        await app.expect(f"Ticket {ticket_id} cancelled.")
        await app.expect("Choose: ")
        [ticket] = self.tickets()
        self.assertEqual(ticket["status"], "cancelled")
        self.assertEqual(self.status("2B"), "free")

        app.send("3")
        await app.expect("You have no active tickets.")
        await app.expect("Choose: ")
        await self.quit(app)

    async def test_long_history(self) -> None:
        """
        With more tickets than a page, "My tickets" shows the most recent
        page and says how to see every one; the cancel list has every
        active ticket, and only those, however many were cancelled.
        """
        alice = self.customer(ALICE)
        bought = [alice.ok(BUY, {"flights": [BIG]})["ticket"]["ticket_id"] for _ in range(55)]
        for ticket_id in bought[1:-2]:
            alice.ok(5, {"ticket_id": ticket_id})
        screen = self.in_process(terminal=False)
        await self.log_in(screen)
        screen.send("2")
        listed = await screen.expect("Choose: ")
        self.assertIn("These are your most recent tickets; vendepass-client tickets --all lists every one.", listed)
        self.assertIn(bought[-1], listed)
        self.assertNotIn(bought[0], listed)
        screen.send("3")
        listed = await screen.expect("Ticket to cancel (empty to go back): ")
        self.assertEqual([t for t in bought if t in listed], [bought[0], bought[-2], bought[-1]])
        screen.send("")
        await screen.expect("Choose: ")
        screen.send("0")
        self.assertEqual(await screen.end(), 0, screen.transcript("exit code"))


class FrictionTests(AppTestCase):
    async def test_back_one_leg(self) -> None:
        """
        q at the second leg's seat goes back to the first leg's seat, not to the menu.
        """
        app = self.start()
        await self.log_in(app)
        await self.search_tiny(app, "MAO")
        app.send("1A")
        await app.expect("Seat on VP200 (e.g. 12A; empty: any free seat; q: back): ")
        app.send("q")
        back = await app.expect("Seat on VP100 (e.g. 12A; empty: any free seat; q: back): ")
        self.assertNotIn("Choose: ", back)
        self.assertIn("Flight VP100 SSA > REC", back)
        # Another seat for the first leg, and the second leg is asked again.
        app.send("2B")
        self.assertIn("Flight VP200 REC > MAO", await app.expect("Seat on VP200"))
        app.send("3C")
        self.assertIn("Held: VP100 seat 2B, VP200 seat 3C", await app.expect(" left) [y/n] "))
        self.assertEqual((self.status("1A"), self.status("2B")), ("free", "held"))
        await self.quit_after_no(app)

    async def test_back_to_itineraries(self) -> None:
        """
        q at the first leg's seat goes back to the itineraries found, not to
        the menu; another itinerary can be chosen at once.
        """
        app = self.start()
        await self.log_in(app)
        await self.search_tiny(app, "MAO")
        app.send("q")
        back = await app.expect("Itinerary number (empty to go back): ")
        self.assertNotIn("Choose: ", back)
        self.assertIn("SSA > REC > MAO", back)
        app.send("1")
        await app.expect("Seat on VP100 (e.g. 12A; empty: any free seat; q: back): ")
        app.send("2B")
        await app.expect("Seat on VP200")
        app.send("2B")
        self.assertIn("Held: VP100 seat 2B, VP200 seat 2B", await app.expect(" left) [y/n] "))
        await self.quit_after_no(app)

    async def quit_after_no(self, app: ClientProcess) -> None:
        app.send("n")
        await app.expect("Seats released.")
        await app.expect("Choose: ")
        await self.quit(app)

    async def test_cancel_unknown_code(self) -> None:
        """
        A code that is not one of the customer's tickets is refused at once,
        without asking to confirm it, and the question is asked again.
        """
        app = self.start()
        await self.log_in(app)
        ticket_id = await self.buy_tiny(app, "1A")
        app.send("3")
        await app.expect("Ticket to cancel (empty to go back): ")
        app.send("zzzz9999")
        refused = await app.expect("Ticket to cancel (empty to go back): ")
        self.assertIn("ZZZZ9999 is not one of your active tickets.", refused)
        self.assertNotIn("[y/n]", refused)
        app.send(ticket_id)
        await app.expect(f"Cancel ticket {ticket_id}? This cannot be undone. [y/n] ")
        app.send("n")
        await app.expect("Nothing was cancelled.")
        await app.expect("Choose: ")
        self.assertEqual([t["status"] for t in self.tickets()], ["active"])
        await self.quit(app)


class LeavingTests(AppTestCase):
    async def test_end_of_input(self) -> None:
        """
        Ctrl-D at a question leaves cleanly, releases the hold, and says goodbye.
        """
        app = self.start()
        await self.log_in(app)
        await self.search_tiny(app)
        await self.hold_seat(app, "1A")
        self.assertEqual(self.status("1A"), "held")
        app.process.closeStdin()
        self.assertEqual(await app.ended(), 0, app.transcript("exit code"))
        self.assertEqual(self.status("1A"), "free")
        self.assertEqual(self.tickets(), [])
        self.assertNotIn("Traceback", app.errors + app.output)
        self.assertGoodbye(app)

    async def test_end_of_input_at_menu(self) -> None:
        app = self.start()
        await app.expect("Choose: ")
        app.process.closeStdin()
        self.assertEqual(await app.ended(), 0, app.transcript("exit code"))
        self.assertGoodbye(app)

    async def test_quit(self) -> None:
        """
        Quit in the menu: exit code 0, after saying goodbye.
        """
        app = self.start()
        await self.log_in(app)
        await self.quit(app)
        self.assertGoodbye(app)

    async def test_interrupt(self) -> None:
        """
        SIGINT while holding a seat: the app releases the hold before it
        exits (by its own handler, not killed by the signal).
        """
        from twisted.logger import ILogObserver, globalLogPublisher
        from zope.interface import provider

        released: list[str] = []

        @provider(ILogObserver)
        def observe(event: dict[str, object]) -> None:
            # The app's own release request, not the server's clean-up on close.
            if event.get("log_format") == "released hold {hold_id} by {username}":
                released.append(str(event["hold_id"]))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        app = self.start()
        await self.log_in(app)
        await self.search_tiny(app)
        await self.hold_seat(app, "1A")
        self.assertEqual(self.status("1A"), "held")
        app.process.signalProcess("INT")
        # 128 + SIGINT, as shells report an interrupted program.
        self.assertEqual(await app.ended(), 130, app.transcript("exit code"))
        self.assertEqual(self.status("1A"), "free")
        self.assertEqual(self.tickets(), [])
        self.assertEqual(len(released), 1)
        self.assertIn("Seats released.", app.output)
        self.assertTrue(app.output.rstrip().endswith("Goodbye!"), app.output[-300:])
        self.assertNotIn("Traceback", app.errors + app.output)


class AccountTests(AppTestCase):
    async def test_wrong_password(self) -> None:
        app = self.start()
        await app.expect("Choose: ")
        app.send("1")
        await app.expect("Username: ")
        app.send("alice")
        await app.expect("Password: ")
        app.send("not-her-password")
        refused = await app.expect("Wrong username or password.")
        self.assertNotIn("Hello", refused)
        # The password is asked again in place, not from the menu.
        again = await app.expect("Password (empty to go back): ")
        self.assertNotIn("Welcome to VendePass!", again)
        self.assertNotIn("Username: ", again)
        app.send(ALICE[1])
        await app.expect("Hello, alice!")
        await app.expect("Logged in as alice.")
        await app.expect("Choose: ")
        await self.quit(app)

    async def test_wrong_password_then_back(self) -> None:
        """
        An empty answer after a wrong password goes back to the menu.
        """
        app = self.start()
        await app.expect("Choose: ")
        app.send("1")
        await app.expect("Username: ")
        app.send("alice")
        await app.expect("Password: ")
        app.send("not-her-password")
        await app.expect("Password (empty to go back): ")
        app.send("")
        menu = await app.expect("Choose: ")
        self.assertIn("1) Log in", menu)
        self.assertNotIn("Hello", menu)
        await self.quit(app)

    async def test_register(self) -> None:
        app = self.start()
        await app.expect("Choose: ")
        app.send("2")
        await app.expect("Username: ")
        app.send("carol")
        await app.expect("Password: ")
        app.send("carol-password")
        await app.expect("Account carol created.")
        await app.expect("Hello, carol!")
        await app.expect("Logged in as carol.")
        await app.expect("Choose: ")
        await self.quit(app)
        self.assertEqual(self.tickets(("carol", "carol-password")), [])


class CountdownTests(AppTestCase):
    """
    The question whether to buy shows the time the hold has left, on the
    app's clock: redrawn in place each second on a terminal, and with each
    reminder everywhere.
    """

    async def buy_question_typed(self, screen: Screen) -> Callable[[str], str]:
        """
        Log in, search and hold seat 1A, everything typed ahead (whatever the
        language); returns the question whether to buy, given the time left.
        """
        screen.send("\n".join(["1", *ALICE, "1", "SSA", "REC", TOMORROW, "1", "1A"]))
        price = screen.texts.money({"amount": "250.00", "currency": "BRL"})

        def question(left: str) -> str:
            return screen.texts("Buy for {price}? ({time} left) [y/n] ", price=price, time=left)

        await screen.expect(question("10:00"))
        return question

    async def test_terminal(self) -> None:
        screen = self.in_process(terminal=True)
        question = await self.buy_question_typed(screen)
        for left in ("9:59", "9:58"):
            screen.clock.advance(1)
            self.assertEqual(screen.taken(), "\r\x1b[2K" + question(left))
        screen.clock.advance(537)
        self.assertEqual(screen.taken(), "\r\x1b[2K" + question("1:01"))
        screen.clock.advance(1)
        self.assertIn("\nHurry: your hold ends in 60 seconds.\n" + question("1:00"), screen.taken())
        screen.send("n")
        await screen.expect("Seats released.")
        # The countdown stopped with the question.
        screen.clock.advance(1)
        self.assertNotIn("left)", screen.since())
        self.assertEqual(self.status("1A"), "free")

    async def test_not_a_terminal_portuguese(self) -> None:
        """
        Not on a terminal, nothing is redrawn; the reminders show the time left.
        """
        screen = self.in_process(terminal=False, language="pt_BR")
        question = await self.buy_question_typed(screen)
        self.assertIn("(restam 10:00) [s/n]", question("10:00"))
        screen.clock.advance(1)
        self.assertEqual(screen.since(), "")
        screen.clock.advance(539)
        self.assertEqual(screen.taken(), "\nCorra: sua reserva termina em 60 segundos.\n" + question("1:00"))
        screen.clock.advance(45)
        screen.send("talvez")
        self.assertEqual(screen.taken(), "Responda s (sim) ou n (não).\n" + question("0:15"))
        screen.clock.advance(5)
        self.assertEqual(screen.taken(), "\nCorra: sua reserva termina em 10 segundos.\n" + question("0:10"))
        screen.send("s")
        await screen.expect(screen.texts("Done! Your ticket:"))
        self.assertEqual(self.status("1A"), "sold")


class ReconnectTests(AppTestCase):
    """
    The server closes an idle connection (after an C{idle_timeout} event):
    the app says why, keeps its place, and reconnects and logs in by itself.
    """

    def setUp(self) -> None:
        super().setUp()
        # Shorter than the holds, on the server's clock.
        self.server.factory.idle_timeout = 300

    async def test_idle_at_menu(self) -> None:
        screen = self.in_process(terminal=False)
        await self.log_in(screen)
        self.clock.advance(301)
        said = await screen.expect("you stay logged in as alice.")
        self.assertIn("The server closed the connection after 5 minutes without activity.", said)
        self.assertNotIn("Goodbye", said)
        # The same question, asked again.
        await screen.expect("Choose: ")
        screen.send("2")
        listed = await screen.expect("Choose: ")
        self.assertIn("You have no tickets yet.", listed)
        self.assertIn("Logged in as alice.", listed)
        await self.quit_screen(screen)

    async def quit_screen(self, screen: Screen) -> None:
        screen.send("0")
        self.assertEqual(await screen.end(), 0, screen.transcript("exit code"))

    async def test_idle_holding(self) -> None:
        """
        The hold ends with the connection: the app says so plainly and goes
        back to the menu; buying again works, logged in again.
        """
        screen = self.in_process(terminal=False)
        await self.log_in(screen)
        await self.search_tiny(screen)
        await self.hold_seat(screen, "1A")
        self.assertEqual(self.status("1A"), "held")
        self.clock.advance(301)
        said = await screen.expect("Search again to choose new seats.")
        self.assertIn("The server closed the connection after 5 minutes without activity.", said)
        self.assertIn("Your hold ended with the connection: the seats were released.", said)
        back = await screen.expect("Choose: ")
        self.assertNotIn("[y/n]", back)
        self.assertIn("1) Search flights and buy", back)
        self.assertEqual(self.status("1A"), "free")
        await self.buy_tiny(screen, "1A")
        self.assertEqual([t["status"] for t in self.tickets()], ["active"])
        await self.quit_screen(screen)


class ServerGoneTests(AppTestCase):
    async def test_cannot_reconnect(self) -> None:
        """
        The server is gone for good: the next step tries to reconnect, then
        the app says it cannot reach the server and ends with exit code 3.
        """
        screen = self.in_process(terminal=False)
        await self.log_in(screen)
        endpoint = self.server.endpoint
        await stop_listening(self.server.port)
        await self.server.factory.close_all(grace=0)
        said = await screen.expect("you stay logged in as alice.")
        self.assertIn("The connection to the server was lost.", said)
        await screen.expect("Choose: ")
        screen.send("2")
        gone = await screen.expect("Goodbye!")
        self.assertIn(f"Cannot reach the server at {endpoint}", gone)
        self.assertEqual(await screen.end(), 3)


class CabinFitTests(AppTestCase):
    async def test_short_terminal(self) -> None:
        """
        The 30 rows of an A320 on a 30-line terminal: two columns side by
        side, the whole picture and the question within the screen.
        """
        screen = self.in_process(terminal=True, lines=30)
        await self.log_in(screen)
        screen.send("\n".join(["1", "REC", "MAO", TOMORROW, "1"]))
        await screen.expect("Flight VP200 REC > MAO")
        picture = await screen.expect("Seat on VP200 (e.g. 12A; empty: any free seat; q: back): ")
        self.assertLessEqual(picture.count("\n") + 2, 30, picture)
        self.assertIn("     A B C   D E F         A B C   D E F\n  1  . . .   . . .     16  . . .   . . .\n", picture)
        self.assertIn(" 15  . . .   . . .     30  . . .   . . .\n180 free", picture)


def seatmap(rows: int, letters: str = "ABCDEF") -> JSON:
    flight = {"number": "VP1", "origin": "SSA", "destination": "REC", "departure": "2026-12-02T08:00:00-03:00"}
    seats = [{"seat": f"{r}{x}", "status": "free", "mine": False} for r in range(1, rows + 1) for x in letters]
    return {"flight": flight, "rows": rows, "letters": letters, "seats": seats}


class CabinFitPropertyTests(SyncTestCase):
    @given(st.integers(1, 60), st.integers(12, 60), st.integers(20, 200), st.sampled_from(["AB", "ABCD", "ABCDEF"]))
    def test_fits(self, rows: int, lines: int, columns: int, letters: str) -> None:
        """
        Every row is drawn once; the picture and a prompt fit the height
        whenever the width leaves room for enough columns, and one column
        is used when it fits anyway.
        """
        texts = Texts("en")
        whole = views.cabin(texts, seatmap(rows, letters)).split("\n")
        picture = views.cabin(texts, seatmap(rows, letters), os.terminal_size((columns, lines))).split("\n")
        drawn = sorted(int(m) for line in picture for m in re.findall(r"(?:^|\s)(\d+)  [.]", line))
        self.assertEqual(drawn, list(range(1, rows + 1)))
        if len(whole) + 3 <= lines:
            self.assertEqual(picture, whole)
        width = max(map(len, whole)) + 4
        if (columns + 4) // width * (lines - 5) >= rows:
            self.assertLessEqual(len(picture) + 1, lines)
            self.assertLessEqual(max(map(len, picture)), columns)


class SearchOrderTests(AppTestCase):
    """
    The itineraries of a search come by day, direct flights first; p sorts
    them by price, d by day again, m shows the next page when there is one.
    """

    async def search(
        self, app: ClientProcess, day: str = "", until: str = "Itinerary number (empty to go back): "
    ) -> str:
        """
        From the main menu: search Salvador to Manaus on C{day} (empty: any
        day); returns what was printed up to C{until} (the itinerary prompt).
        """
        app.send("1")
        for prompt, typed in [("From (city or code, empty to go back): ", "SSA"), ("To (city or code): ", "MAO"), ("Date (", day)]:
            await app.expect(prompt)
            app.send(typed)
        return await app.expect(until)

    def rows(self, listed: str) -> list[str]:
        return [line for line in listed.splitlines() if re.match(r"\s*\d+  ", line)]

    async def again(self, app: ClientProcess, typed: str) -> tuple[str, list[str]]:
        """
        At the itinerary prompt, type C{typed}: what is listed up to the
        prompt again, and its rows.
        """
        app.send(typed)
        listed = await app.expect("Itinerary number (empty to go back): ")
        return listed, self.rows(listed)

    async def test_by_day_direct_first_then_by_price(self) -> None:
        app = self.start()
        await self.log_in(app)
        listed = await self.search(app)
        rows = self.rows(listed)
        # On Tuesday 1 December the direct VP300 (14:00) comes before the
        # connection that leaves at 08:00; Wednesday has no direct flight.
        self.assertRegex(rows[0], r"^ *1  2026-12-01 14:00 .* SSA > MAO +VP300 ")
        self.assertRegex(rows[1], r"^ *2  2026-12-01 08:00 .* SSA > REC > MAO +VP100, VP200 ")
        self.assertRegex(rows[2], r"^ *3  2026-12-02 08:00 .* VP100, VP200 ")
        self.assertIn("Sorted by day, direct flights first; p: by price.", listed)
        self.assertNotIn("m: more", listed)
        listed, rows = await self.again(app, "p")
        self.assertIn("Sorted by price; d: by day.", listed)
        self.assertRegex(rows[0], r"^ *1  2026-12-01 14:00 .* VP300 .*R\$ 749\.50$")
        self.assertRegex(rows[1], r"^ *2  2026-12-03 14:00 .* VP300 .*R\$ 749\.50$")
        listed, rows = await self.again(app, "d")
        self.assertRegex(rows[1], r"^ *2  2026-12-01 08:00 .* VP100, VP200 ")
        app.send("m")
        await app.expect("Please type a number from 1 to ")
        await app.expect("Itinerary number (empty to go back): ")
        app.send("1")
        await app.expect("Seat on VP300 (")
        await app.expect(": ")
        app.send("q")
        # Back to the same list, in the same order.
        listed = await app.expect("Itinerary number (empty to go back): ")
        self.assertRegex(self.rows(listed)[1], r"^ *2  2026-12-01 08:00 .* VP100, VP200 ")
        app.send("")
        await app.expect("Choose: ")
        await self.quit(app)

    async def test_more(self) -> None:
        """
        Cut answers say so: m shows the next page.
        """
        self.service = make_service(hold_seconds=HOLD_SECONDS, clock=self.clock, sales_window_days=60)
        self.server = serve(self, self.service)
        app = self.start()
        await self.log_in(app)
        listed = await self.search(app)
        first = self.rows(listed)
        self.assertEqual(len(first), 50)
        self.assertIn("Sorted by day, direct flights first; p: by price. m: more itineraries.", listed)
        listed, second = await self.again(app, "m")
        self.assertNotIn("m: more", listed)
        self.assertRegex(second[0], r"^ *1  ")
        day = re.compile(r"\d{4}-\d\d-\d\d")
        last_day = cast(re.Match[str], day.search(first[-1])).group()
        self.assertGreaterEqual(cast(re.Match[str], day.search(second[0])).group(), last_day)
        self.assertEqual(len(first) + len(second), len(self.service_search()))
        app.send("")
        await app.expect("Choose: ")
        await self.quit(app)

    def service_search(self) -> list[JSON]:
        return cast(list[JSON], self.customer().ok(2, {"origin": "SSA", "destination": "MAO", "limit": 500})["itineraries"])

    async def test_outside_the_sales_window(self) -> None:
        app = self.start()
        await self.log_in(app)
        await self.search(app, "2027-02-01", "No flights on 2027-02-01: flights are sold from 2026-12-01 to 2026-12-31.")
        await app.expect("Choose: ")
        await self.quit(app)

