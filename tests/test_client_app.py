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
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SkipTest, TestCase

from vendepass.service import ReservationService

from tests.common import ALICE, BOB, START, TINY, TOMORROW, LineClient, make_service
from tests.test_client_cli import LiveServer, clock, serve

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


class ClientProcess(ProcessProtocol):
    """
    The app as a subprocess: what it prints, what we type, how it ended.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = ""
        self.errors = ""
        self.seen = 0
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._decode_errors = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._waiting: tuple[str, Deferred[str], IDelayedCall] | None = None
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
        text = f"{problem}\n--- {self.name}: output (>>> marks the last expect) ---\n"
        text += self.output[: self.seen] + ">>>" + self.output[self.seen :]
        if self.errors:
            text += f"\n--- stderr ---\n{self.errors}"
        if self.reason is not None:
            text += f"\n--- ended: {self.reason.getErrorMessage()}"
        return text

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

    # -- conversations ------------------------------------------------------

    async def log_in(self, app: ClientProcess, user: tuple[str, str] = ALICE) -> None:
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

    async def search_tiny(self, app: ClientProcess) -> str:
        """
        From the main menu to the seat prompt of the SSA > REC flight of
        TOMORROW; returns what was printed on the way (the cabin picture).
        """
        app.send("1")
        await app.expect("From (city or code, empty to go back): ")
        app.send("SSA")
        await app.expect("To (city or code): ")
        app.send("REC")
        await app.expect("Date (YYYY-MM-DD, empty for any day): ")
        app.send(TOMORROW)
        table = await app.expect("Itinerary number (empty to go back): ")
        self.assertIn(f"1  {TOMORROW} 08:00  {TOMORROW} 09:15  SSA > REC  VP100", table)
        app.send("1")
        return await app.expect("Seat on VP100 (e.g. 12A; empty: any free seat; q: back): ")

    async def hold_seat(self, app: ClientProcess, seat: str) -> str:
        """
        At the seat prompt: choose C{seat}, up to the question whether to buy.
        """
        app.send(seat)
        return await self.buy_question(app)

    async def buy_question(self, app: ClientProcess) -> str:
        """
        Up to the question whether to buy the hold (its countdown starts at
        10:00, and may have ticked once already).
        """
        held = await app.expect("Buy for R$ 250.00? (")
        held += await app.expect(" left) [y/n] ")
        self.assertRegex(held, r"Buy for R\$ 250\.00\? \((10:00|9:5\d) left\) \[y/n\] $")
        return held

    async def buy_tiny(self, app: ClientProcess, seat: str) -> str:
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
        await app.ended()
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
        menu = await app.expect("Choose: ")
        self.assertIn("Welcome to VendePass!", menu)
        self.assertIn("1) Log in", menu)
        # And the right one works.
        app.send("1")
        await app.expect("Username: ")
        app.send("alice")
        await app.expect("Password: ")
        app.send(ALICE[1])
        await app.expect("Hello, alice!")
        await app.expect("Choose: ")
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
