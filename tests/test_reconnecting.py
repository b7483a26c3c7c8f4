"""
The reconnecting client: a call whose answer is lost with the connection is
resent on a new one, and the server's request_id makes that safe.

A real server listens on a loopback port (the service runs inline on a
Clock); a test protocol drops the connection instead of sending chosen
answers, or answers C{outcome_unknown} or C{storage_unavailable} instead,
after the work is committed: the worst moment for a client.
"""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.trial.unittest import TestCase

from tests.common import ALICE, BIG, TINY, make_service
from tests.test_client_app import AppTestCase
from vendepass.client import cli
from vendepass.client.reconnecting import ReconnectingClient, ServerError
from vendepass.errors import OutcomeUnknown
from vendepass.protocol import VendePassFactory, VendePassProtocol
from vendepass.service import ReservationService


class DroppingProtocol(VendePassProtocol):
    def _send(self, message: dict[str, Any]) -> None:
        drops: dict[int, int] = self.factory.drops  # type: ignore[attr-defined]
        opcode = message.get("opcode")
        if "ok" in message and drops.get(opcode, 0) > 0:  # type: ignore[arg-type]
            drops[opcode] -= 1  # type: ignore[index]
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        errors: dict[int, list[str]] = self.factory.errors  # type: ignore[attr-defined]
        if "ok" in message and errors.get(opcode):  # type: ignore[arg-type]
            code = errors[opcode].pop(0)  # type: ignore[index]
            message = {**message, "ok": False, "error": {"code": code, "message": code}}
            message.pop("data", None)
        super()._send(message)


class DroppingFactory(VendePassFactory):
    def __init__(self, service: ReservationService) -> None:
        super().__init__(service, service.clock)
        self.drops: dict[int, int] = {}
        # Error codes to answer instead of the next answers to an opcode.
        self.errors: dict[int, list[str]] = {}

    def buildProtocol(self, addr: IAddress | None) -> VendePassProtocol:
        protocol = DroppingProtocol(self.service, self.clock)
        protocol.factory = self
        return protocol


class ServerTestCase(TestCase):
    def setUp(self) -> None:
        self.service = make_service()
        self.factory = DroppingFactory(self.service)
        self.port: IListeningPort = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(self.port.stopListening)
        self.endpoint = endpoint = f"tcp:host=127.0.0.1:port={self.port.getHost().port}"  # type: ignore[attr-defined]
        self.client = ReconnectingClient(reactor, endpoint, backoff=0.01)  # type: ignore[arg-type]
        self.addCleanup(self.client.close)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return list(self.service.store._db.execute(sql))  # type: ignore[attr-defined]


class ReconnectingTests(ServerTestCase):

    async def test_buy_answer_lost(self) -> None:
        await self.client.login(*ALICE)
        self.factory.drops[3] = 1
        ticket = await self.client.buy(flights=[TINY, BIG], seats=["1A", None])
        self.assertEqual(self.client.reconnections, 1)
        self.assertEqual(self.rows("SELECT ticket_id FROM tickets"), [(ticket["ticket_id"],)])
        self.assertEqual(len(self.rows("SELECT * FROM seats")), 2)
        self.assertEqual([t["ticket_id"] for t in await self.client.tickets()], [ticket["ticket_id"]])

    async def test_buy_of_hold_answer_lost(self) -> None:
        """
        The purchase committed before the drop: the retry gets the ticket,
        although the drop would have released the hold otherwise.
        """
        await self.client.login(*ALICE)
        hold = await self.client.hold([TINY])
        self.factory.drops[3] = 1
        ticket = await self.client.buy(hold_id=hold["hold_id"])
        self.assertEqual(ticket["legs"][0]["seat"], hold["legs"][0]["seat"])
        self.assertEqual(len(self.rows("SELECT * FROM tickets")), 1)

    async def test_cancel_answer_lost(self) -> None:
        await self.client.login(*ALICE)
        ticket = await self.client.buy(flights=[TINY])
        self.factory.drops[5] = 1
        cancelled = await self.client.cancel(ticket["ticket_id"])
        self.assertEqual(cancelled["status"], "cancelled")
        self.assertEqual(self.rows("SELECT * FROM seats"), [])

    async def test_hold_answer_lost(self) -> None:
        """
        The lost hold died with its connection; the retry makes a new one.
        """
        await self.client.login(*ALICE)
        self.factory.drops[6] = 1
        hold = await self.client.hold([TINY], ["2B"])
        active = self.rows("SELECT hold_id FROM holds WHERE state = 'active'")
        self.assertEqual(active, [(hold["hold_id"],)])
        self.assertEqual(self.rows("SELECT seat FROM seats"), [("2B",)])

    async def test_release_answer_lost(self) -> None:
        await self.client.login(*ALICE)
        hold = await self.client.hold([TINY])
        self.factory.drops[7] = 1
        self.assertEqual(await self.client.release(hold["hold_id"]), {})
        self.assertEqual(self.rows("SELECT * FROM seats"), [])

    async def test_gives_up(self) -> None:
        """
        With the server gone, a call fails after its attempts.
        """
        await self.client.login(*ALICE)
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped
        self.factory.drops[0] = 100
        self.client.close()
        with self.assertRaises(ConnectError):
            await self.client.ping()
        self.assertEqual(self.client.reconnections, self.client.attempts - 1)


class StorageErrorTests(ServerTestCase):
    """
    The server answers C{outcome_unknown} or C{storage_unavailable}: the
    client waits and sends the call again with the same C{request_id}, so
    a change that was done is answered, not done twice.
    """

    async def test_buy_outcome_unknown(self) -> None:
        await self.client.login(*ALICE)
        self.factory.errors[3] = ["outcome_unknown", "storage_unavailable"]
        ticket = await self.client.buy(flights=[TINY], seats=["1A"])
        self.assertEqual((self.client.resends, self.client.reconnections), (2, 0))
        self.assertEqual(self.rows("SELECT ticket_id FROM tickets"), [(ticket["ticket_id"],)])
        self.assertEqual(len(self.rows("SELECT * FROM requests")), 1)

    async def test_buy_of_hold_then_cancel(self) -> None:
        await self.client.login(*ALICE)
        hold = await self.client.hold([TINY])
        self.factory.errors[3] = ["outcome_unknown"]
        self.factory.errors[5] = ["storage_unavailable"]
        ticket = await self.client.buy(hold_id=hold["hold_id"])
        cancelled = await self.client.cancel(ticket["ticket_id"])
        self.assertEqual((cancelled["ticket_id"], cancelled["status"]), (ticket["ticket_id"], "cancelled"))
        self.assertEqual(ticket["legs"][0]["seat"], hold["legs"][0]["seat"])
        self.assertEqual(self.rows("SELECT status FROM tickets"), [("cancelled",)])
        self.assertEqual(self.client.resends, 2)

    async def test_hold_outcome_unknown(self) -> None:
        """
        The hold was made on a connection that is still open: the resend
        gets that hold, not a second one.
        """
        await self.client.login(*ALICE)
        self.factory.errors[6] = ["outcome_unknown"]
        hold = await self.client.hold([TINY])
        self.assertEqual(self.rows("SELECT hold_id FROM holds WHERE state = 'active'"), [(hold["hold_id"],)])

    async def test_release_outcome_unknown(self) -> None:
        await self.client.login(*ALICE)
        hold = await self.client.hold([TINY])
        self.factory.errors[7] = ["outcome_unknown"]
        self.assertEqual(await self.client.release(hold["hold_id"]), {})
        self.assertEqual(self.rows("SELECT * FROM seats"), [])

    async def test_gives_up_on_storage(self) -> None:
        await self.client.login(*ALICE)
        self.factory.errors[3] = ["storage_unavailable"] * 10
        with self.assertRaises(ServerError) as raised:
            await self.client.buy(flights=[TINY])
        self.assertEqual((raised.exception.code, self.client.resends), ("storage_unavailable", self.client.attempts - 1))

    async def test_register_not_resent_when_unknown(self) -> None:
        """
        Registration has no request_id: after C{outcome_unknown} a resend
        could only say the username is taken, so the client says unknown.
        """
        self.factory.errors[10] = ["outcome_unknown"]
        with self.assertRaises(ServerError) as raised:
            await self.client.register("carol", "carol-password")
        self.assertEqual((raised.exception.code, self.client.resends), ("outcome_unknown", 0))

    async def test_cli_buy(self) -> None:
        """
        C{vendepass-client buy} resends its purchase with the same request_id.
        """
        out, err = StringIO(), StringIO()
        self.factory.errors[3] = ["outcome_unknown"]
        code = await cli.main(
            reactor,  # type: ignore[arg-type]
            ["--connect", self.endpoint, "--lang", "en", "--user", ALICE[0], "--json", "buy", TINY, "--seat", "2A"],
            out=out, err=err, environ={"VENDEPASS_PASSWORD": ALICE[1]},
        )
        self.assertEqual((code, err.getvalue()), (0, ""))
        ticket = json.loads(out.getvalue())["ticket"]
        self.assertEqual(self.rows("SELECT ticket_id FROM tickets"), [(ticket["ticket_id"],)])
        self.assertEqual(self.factory.errors[3], [])

    async def test_cli_cancel(self) -> None:
        await self.client.login(*ALICE)
        ticket = await self.client.buy(flights=[TINY])
        out, err = StringIO(), StringIO()
        self.factory.errors[5] = ["storage_unavailable", "outcome_unknown"]
        code = await cli.main(
            reactor,  # type: ignore[arg-type]
            ["--connect", self.endpoint, "--lang", "en", "--user", ALICE[0], "cancel", ticket["ticket_id"]],
            out=out, err=err, environ={"VENDEPASS_PASSWORD": ALICE[1]},
        )
        self.assertEqual((code, err.getvalue()), (0, ""))
        self.assertEqual(self.rows("SELECT status FROM tickets"), [("cancelled",)])


class AppStorageErrorTests(AppTestCase):
    """
    The interactive app's purchase, answered C{outcome_unknown} although it
    was done: the app's client sends it again with the same request_id and
    shows the one ticket.
    """

    async def test_buy_done_but_unknown(self) -> None:
        store = self.service.store
        real = store.buy_hold
        unknown = [OutcomeUnknown()]

        def buy_hold(hold_id: str, username: str, request_id: str | None = None) -> Deferred[Any]:
            requests.append(request_id)
            done = real(hold_id, username, request_id)
            if unknown:
                # Done and committed, but the answer says it is not known.
                return done.addCallback(lambda _: fail(unknown.pop()))
            return done

        requests: list[str | None] = []
        self.patch(store, "buy_hold", buy_hold)
        app = self.in_process(terminal=False)
        await self.log_in(app)
        ticket_id = await self.buy_tiny(app, "2B")
        [ticket] = self.tickets()
        self.assertEqual(ticket["ticket_id"], ticket_id)
        self.assertEqual(len(requests), 2)
        self.assertIsNotNone(requests[0])
        self.assertEqual(requests[0], requests[1])
