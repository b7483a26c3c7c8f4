"""
Limits and abuse: held seats per customer, legs per itinerary, login
throttling, idle connections, connections per address and in all, and
backpressure from clients that do not read; and a client that half-closes,
over a real loopback connection.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides

from tests.common import ALICE, BIG, BOB, START, TINY, LineClient, make_service
from tests.test_tls import make_ca, make_server_certificate
from vendepass.protocol import CLOSE_GRACE_SECONDS, VendePassFactory, VendePassProtocol
from vendepass.tap import RESERVED_FILES, Options, connection_limit, fit_connection_limit

INFINITY = resource.RLIM_INFINITY


def replies(transport: StringTransport) -> list[dict[str, Any]]:
    lines = transport.value().splitlines()
    transport.clear()
    return [json.loads(line) for line in lines]


class HeldSeatLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(clock=self.clock)
        self.service.store.max_held_seats = 3  # type: ignore[attr-defined]
        self.alice = LineClient(self.service)
        self.alice.login(ALICE)

    def test_limit(self) -> None:
        self.alice.ok(6, {"flights": [TINY, BIG]})
        first = self.alice.ok(6, {"flights": [BIG]})["hold"]
        error = self.alice.error(6, {"flights": [TINY]})
        self.assertEqual((error["code"], error["limit"]), ("too_many_holds", 3))
        # One-step purchases are not holds: they are not limited.
        self.alice.ok(3, {"flights": [TINY]})
        self.alice.ok(7, {"hold_id": first["hold_id"]})
        self.alice.ok(6, {"flights": [BIG]})

    def test_per_customer(self) -> None:
        for _ in range(3):
            self.alice.ok(6, {"flights": [BIG]})
        bob = LineClient(self.service)
        bob.login(BOB)
        bob.ok(6, {"flights": [BIG]})

    def test_expired_holds_do_not_count(self) -> None:
        for _ in range(3):
            self.alice.ok(6, {"flights": [BIG]})
        self.clock.advance(61)
        self.alice.ok(6, {"flights": [BIG]})


class LegLimitTests(SynchronousTestCase):
    def test_max_legs(self) -> None:
        service = make_service()
        service.max_legs = 1
        alice = LineClient(service)
        alice.login(ALICE)
        self.assertEqual(alice.error(6, {"flights": [TINY, BIG]})["code"], "invalid_itinerary")
        self.assertEqual(alice.error(2, {"origin": "SSA", "destination": "MAO", "max_legs": 2})["code"],
                         "invalid_request")
        alice.ok(6, {"flights": [TINY]})


class LoginThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(clock=self.clock)
        self.client = LineClient(self.service)

    def login(self, username: str, password: str) -> dict[str, Any]:
        return self.client.request(1, {"username": username, "password": password})

    def test_backs_off(self) -> None:
        for _ in range(5):
            self.assertEqual(self.login("alice", "wrong")["error"]["code"], "bad_credentials")
        # The fifth failure imposes a first wait of one second.
        limited = self.login("alice", "wrong")["error"]
        self.assertEqual((limited["code"], limited["retry_after"]), ("rate_limited", 1))
        # Even the right password waits: nothing is evaluated while throttled.
        self.assertEqual(self.login(*ALICE)["error"]["code"], "rate_limited")
        self.clock.advance(1)
        self.assertEqual(self.login("alice", "wrong")["error"]["code"], "bad_credentials")
        self.assertEqual(self.login("alice", "wrong")["error"]["retry_after"], 2)

    def test_never_locked_out_for_long(self) -> None:
        """
        However many failures, the wait never exceeds the ceiling, and the
        real customer gets in after it.
        """
        evaluated = 0
        for _ in range(200):
            reply = self.login("alice", "wrong")
            if reply["error"]["code"] == "bad_credentials":
                evaluated += 1
                continue
            self.assertLessEqual(reply["error"]["retry_after"], 300)
            self.clock.advance(reply["error"]["retry_after"])
        self.assertLessEqual(evaluated, 200)
        other = LineClient(self.service)
        assert other.protocol.session is not None
        other.protocol.session.peer = "10.9.8.7"
        self.clock.advance(300)
        other.login(ALICE)

    def test_unknown_user_looks_the_same(self) -> None:
        for _ in range(6):
            known = self.login("alice", "wrong")
            unknown = self.login("nobody_here", "wrong")
        self.assertEqual(known["error"], unknown["error"])

    def test_success_resets_the_customer(self) -> None:
        """
        A good login clears the customer's failures (not the address's: a
        guesser with an account of their own must not reset their count).
        """
        for _ in range(4):
            self.login("alice", "wrong")
        self.client.login(ALICE)
        elsewhere = LineClient(self.service)
        assert elsewhere.protocol.session is not None
        elsewhere.protocol.session.peer = "10.1.1.1"
        for _ in range(5):
            reply = elsewhere.request(1, {"username": "alice", "password": "wrong"})
            self.assertEqual(reply["error"]["code"], "bad_credentials")
        self.assertEqual(self.login("bob", "wrong")["error"]["code"], "bad_credentials")
        self.assertEqual(self.login("bob", "wrong")["error"]["code"], "rate_limited")


class IdleTimeoutTests(SynchronousTestCase):
    def connect(self, idle: float) -> tuple[VendePassProtocol, StringTransport, Clock]:
        clock = Clock()
        clock.advance(START)
        service = make_service(clock=clock)
        factory = VendePassFactory(service, clock, idle_timeout=idle)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        assert isinstance(protocol, VendePassProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        replies(transport)
        return protocol, transport, clock

    def test_idle_closed(self) -> None:
        protocol, transport, clock = self.connect(10)
        clock.advance(9)
        protocol.dataReceived(b'{"opcode": 0}\n')
        clock.advance(9.5)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.5)
        self.assertTrue(transport.disconnecting)
        events = [m for m in replies(transport) if "event" in m]
        self.assertEqual(events[-1], {"event": "idle_timeout", "data": {"seconds": 10}})

    def test_dribbler_closed(self) -> None:
        """
        Bytes that never make a line are no activity.
        """
        protocol, transport, clock = self.connect(10)
        for byte in b'{"opcode": 0':
            protocol.dataReceived(bytes([byte]))
            clock.advance(1)
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.seconds() - START, 10)


class ClosingTests(SynchronousTestCase):
    """
    A connection the server closes is gone: if a clean close does not finish
    (a TLS peer that never finishes its handshake, a peer that does not read),
    it is aborted; a TLS connection has a deadline for its handshake.
    """

    def connect(
        self, tls: bool = False, idle: float | None = 10, handshake: float | None = 3, per_ip: int = 50
    ) -> tuple[VendePassProtocol, StringTransport, Clock]:
        clock = Clock()
        clock.advance(START)
        service = make_service(clock=clock)
        factory = VendePassFactory(
            service, clock, idle_timeout=idle, handshake_timeout=handshake, max_connections_per_ip=per_ip
        )
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
        if tls:
            directlyProvides(transport, ISSLTransport)
        protocol.makeConnection(transport)
        return protocol, transport, clock

    def timers(self, clock: Clock, protocol: VendePassProtocol) -> list[Any]:
        """
        The calls C{protocol} has pending on C{clock}.
        """
        return [c for c in clock.getDelayedCalls() if getattr(getattr(c, "func", None), "__self__", None) is protocol]

    def test_idle_close_that_does_not_finish_is_aborted(self) -> None:
        """
        StringTransport's loseConnection never finishes, as a TLS one whose
        peer never answers does not: the grace period later, the
        connection is aborted.
        """
        protocol, transport, clock = self.connect(idle=10)
        clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        clock.advance(CLOSE_GRACE_SECONDS - 0.1)
        self.assertFalse(transport.disconnected)
        clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.timers(clock, protocol), [])

    def test_close_that_finishes_is_not_aborted(self) -> None:
        protocol, transport, clock = self.connect(idle=10)
        clock.advance(10)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.timers(clock, protocol), [])
        clock.advance(CLOSE_GRACE_SECONDS)
        self.assertFalse(transport.disconnected)

    def test_tls_handshake_deadline(self) -> None:
        """
        On a TLS transport a connection that has not finished its handshake
        within the deadline is aborted at once, whatever the idle timeout.
        """
        protocol, transport, clock = self.connect(tls=True, idle=None, handshake=3)
        clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_tls_handshake_completed(self) -> None:
        protocol, transport, clock = self.connect(tls=True, idle=None, handshake=3)
        clock.advance(1)
        protocol.handshakeCompleted()
        clock.advance(100)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.timers(clock, protocol), [])

    def test_tls_first_line_ends_deadline(self) -> None:
        """
        A complete line means the handshake is done, also where a wrapper
        in between does not pass handshakeCompleted on.
        """
        protocol, transport, clock = self.connect(tls=True, idle=None, handshake=3)
        protocol.dataReceived(b'{"opcode": 0, "id": 1}\n')
        clock.advance(100)
        self.assertFalse(transport.disconnecting)

    def test_no_deadline_without_tls(self) -> None:
        """
        A plain TCP connection that sends nothing is left to the idle timeout.
        """
        protocol, transport, clock = self.connect(tls=False, idle=None, handshake=3)
        clock.advance(100)
        self.assertFalse(transport.disconnecting)


class ConnectionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = make_service()
        self.factory = VendePassFactory(self.service, self.service.clock, max_connections_per_ip=2)

    def open(self, host: str = "192.0.2.1") -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", host, 5000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def close(self, protocol: Any) -> None:
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_limit_per_address(self) -> None:
        first, _ = self.open()
        self.open()
        third, transport = self.open()
        [refusal] = replies(transport)
        self.assertEqual(refusal["error"]["code"], "too_many_connections")
        self.assertTrue(transport.disconnecting)
        # Another address is not affected; a closed connection frees a place.
        _, other = self.open("198.51.100.7")
        self.assertEqual(replies(other)[0]["event"], "welcome")
        self.close(first)
        _, again = self.open()
        self.assertEqual(replies(again)[0]["event"], "welcome")

    def test_refused_connection_is_aborted(self) -> None:
        """
        A refused connection is not counted: it must not be able to stay
        open either, when its clean close does not finish.
        """
        self.open()
        self.open()
        _, transport = self.open()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.service.clock.advance(CLOSE_GRACE_SECONDS)  # type: ignore[attr-defined]
        self.assertTrue(transport.disconnected)

    def test_no_leak(self) -> None:
        for _ in range(10_000):
            protocol, _ = self.open()
            self.close(protocol)
        self.assertEqual(self.factory.open_per_address, {})
        self.assertEqual(self.factory.open_connections, 0)


def ping(protocol: VendePassProtocol, transport: StringTransport) -> dict[str, Any]:
    protocol.dataReceived(b'{"opcode": 0, "id": "p"}\n')
    [reply] = [m for m in replies(transport) if "event" not in m]
    return reply


class GlobalConnectionLimitTests(SynchronousTestCase):
    """
    --max-connections: past it, a new connection (from any address) gets
    C{too_many_connections} instead of the welcome and is closed; the open
    ones go on being served.
    """

    def setUp(self) -> None:
        self.service = make_service()
        self.factory = VendePassFactory(self.service, self.service.clock, max_connections=5)
        self.hosts = iter(f"192.0.2.{i}" for i in range(1, 255))

    def open(self) -> tuple[VendePassProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", next(self.hosts), 5000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_sixth_refused(self) -> None:
        opened = [self.open() for _ in range(5)]
        for _, transport in opened:
            self.assertEqual(replies(transport)[0]["event"], "welcome")
        refused, transport = self.open()
        [refusal] = replies(transport)
        self.assertEqual(refusal["error"]["code"], "too_many_connections")
        self.assertEqual(refusal["error"]["message"], "The server has as many connections as it may have; try again later.")
        self.assertTrue(transport.disconnecting)
        refused.connectionLost(Failure(ConnectionDone()))
        # The five are still served.
        for protocol, transport in opened:
            self.assertTrue(ping(protocol, transport)["ok"])
            self.assertFalse(transport.disconnecting)
        # One closes: a new one is accepted.
        opened[0][0].connectionLost(Failure(ConnectionDone()))
        _, again = self.open()
        self.assertEqual(replies(again)[0]["event"], "welcome")
        _, full = self.open()
        self.assertEqual(replies(full)[0]["error"]["code"], "too_many_connections")

    def test_refused_not_counted(self) -> None:
        for _ in range(5):
            self.open()
        for _ in range(100):
            refused, _ = self.open()
            refused.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.open_connections, 5)


class OpenFileLimitTests(SynchronousTestCase):
    """
    --max-connections is fitted, at start, under the limit on open files,
    leaving some for the database, the listening sockets and refusals.
    """

    def test_fits(self) -> None:
        self.assertEqual(fit_connection_limit(10_000, 65536, 65536), (10_000, 65536))
        self.assertEqual(fit_connection_limit(10_000, INFINITY, INFINITY), (10_000, INFINITY))

    def test_soft_limit_raised(self) -> None:
        self.assertEqual(fit_connection_limit(10_000, 1024, 524288), (10_000, 10_000 + RESERVED_FILES))
        self.assertEqual(fit_connection_limit(10_000, 1024, INFINITY), (10_000, 10_000 + RESERVED_FILES))

    def test_clamped_to_hard_limit(self) -> None:
        self.assertEqual(fit_connection_limit(10_000, 1024, 4096), (4096 - RESERVED_FILES, 4096))
        self.assertEqual(fit_connection_limit(10_000, 1024, 1024), (1024 - RESERVED_FILES, 1024))
        # A tiny limit keeps half for the rest.
        self.assertEqual(fit_connection_limit(10_000, 64, 64), (32, 64))

    def test_real_limit(self) -> None:
        """
        On this process's real limit: what is accepted leaves the reserve
        free under the soft limit as it is afterwards.
        """
        limit = connection_limit(1_000_000)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertGreaterEqual(limit, 1)
        if soft != INFINITY:
            self.assertLessEqual(limit + min(RESERVED_FILES, soft // 2), soft)
        self.assertEqual(connection_limit(10), 10)

    def test_option(self) -> None:
        db = str(Path(self.mktemp()).resolve())
        Path(db).parent.mkdir(parents=True, exist_ok=True)
        options = Options()
        options.parseOptions(["--db", db])
        self.assertEqual(options["max-connections"], 10_000)
        options = Options()
        options.parseOptions(["--db", db, "--max-connections", "5"])
        self.assertEqual(options["max-connections"], 5)
        for bad in ["0", "-1", "1000001"]:
            self.assertRaises(UsageError, Options().parseOptions, ["--db", db, "--max-connections", bad])


class BackpressureTests(SynchronousTestCase):
    def test_client_that_does_not_read(self) -> None:
        """
        When the transport's buffer is full it pauses the protocol: requests
        are no longer read (nor answered) until it drains; then every one is
        answered, in order.
        """
        client = LineClient(make_service())
        client.request(0)
        self.assertIs(client.transport.producer, client.protocol)
        client.protocol.pauseProducing()  # what a full TCP transport does
        self.assertEqual(client.transport.producerState, "paused")
        client.feed(b"".join(b'{"opcode": 0, "id": %d}\n' % i for i in range(50)))
        self.assertEqual([m for m in client.messages() if "id" in m], [])
        client.protocol.resumeProducing()
        answered = [m["id"] for m in client.messages() if "id" in m]
        self.assertEqual(answered, list(range(50)))


def half_closing_client(port: int, packet: bytes, tls: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """
    (In a thread.) Connect, send C{packet}, half-close (with C{tls}: the TCP
    connection under TLS, without TLS's close alert), and read until the
    server closes: C{(messages, closed)}; every wait bounded.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        sock = plain
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(plain, server_hostname="localhost")
        sock.sendall(packet)
        with socket.socket(fileno=os.dup(sock.fileno())) as same:
            same.shutdown(socket.SHUT_WR)
        received = b""
        for _ in range(1000):
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return [json.loads(m) for m in received.splitlines()], False
            if not chunk:
                return [json.loads(m) for m in received.splitlines()], True
            received += chunk
    return [json.loads(m) for m in received.splitlines()], False


PACKET = (
    b'{"opcode": 1, "id": 1, "data": {"username": "alice", "password": "alice-password"}}\n'
    + b'{"opcode": 3, "id": 2, "data": {"flights": ["%s"]}}\n' % TINY.encode()
    + b'{"opcode": 0, "id": 3}'
)


class HalfCloseLoopbackTests(TestCase):
    """
    C{shutdown(SHUT_WR)} after the requests, as C{nc -N} does, on a real
    loopback TCP connection: every request is answered, the last line even
    without its newline, and then the server closes.
    """

    async def test_answered_then_closed(self) -> None:
        service = make_service()
        self.addCleanup(service.stopService)
        factory = VendePassFactory(service, reactor)  # type: ignore[arg-type]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined, arg-type]
        self.addCleanup(port.stopListening)
        messages, closed = await deferToThread(half_closing_client, port.getHost().port, PACKET)  # type: ignore[attr-defined]
        self.assertEqual(messages[0]["event"], "welcome")
        self.assertEqual([(m["id"], m["ok"]) for m in messages[1:]], [(1, True), (2, True), (3, True)])
        self.assertTrue(closed)

    async def test_under_tls(self) -> None:
        """
        The same with TLS over the half-closed TCP connection: answered,
        then closed at once (the factory's clock is a Clock never advanced:
        no abort after the grace period closes it instead).
        """
        base = Path(self.mktemp()).resolve()
        ca_key, ca = make_ca(base / "ca", "VendePass Test CA")
        key_file, cert_file = make_server_certificate(base, ca_key, ca)
        service = make_service()
        self.addCleanup(service.stopService)
        endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={key_file}:certKey={cert_file}")
        factory = VendePassFactory(service, service.clock)
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        messages, closed = await deferToThread(half_closing_client, port.getHost().port, PACKET, True)  # type: ignore[attr-defined]
        self.assertEqual(messages[0]["event"], "welcome")
        self.assertEqual([(m["id"], m["ok"]) for m in messages[1:]], [(1, True), (2, True), (3, True)])
        self.assertTrue(closed)
        # The server's side is gone too (TLS would wait for the client's
        # close alert, which never comes), within two seconds.
        for _ in range(40):
            if factory.open_connections == 0:
                break
            await deferLater(reactor, 0.05)  # type: ignore[arg-type]
        self.assertEqual(factory.open_connections, 0)


def crowd(port: int, count: int) -> tuple[list[str], list[bool]]:
    """
    (In a thread.) Open C{count} connections one after the other, reading
    each one's first line; then ping on every one that was welcomed.
    C{(first events or error codes, whether each welcomed one answered)}.
    """
    sockets: list[socket.socket] = []
    firsts: list[str] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sockets.append(sock)
            first = json.loads(sock.makefile("rb").readline())
            firsts.append(first.get("event") or first["error"]["code"])
        answered = []
        for sock, first_seen in zip(sockets, firsts):
            if first_seen != "welcome":
                continue
            sock.sendall(b'{"opcode": 0, "id": "p"}\n')
            answered.append(json.loads(sock.makefile("rb").readline())["ok"])
        return firsts, answered
    finally:
        for sock in sockets:
            sock.close()


class GlobalConnectionLimitLoopbackTests(TestCase):
    async def test_refused_past_the_limit(self) -> None:
        """
        Over real loopback connections, max 20: the 21st to 25th get
        too_many_connections; the 20 are all still served.
        """
        service = make_service()
        self.addCleanup(service.stopService)
        factory = VendePassFactory(service, service.clock, max_connections=20)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined, arg-type]
        self.addCleanup(port.stopListening)
        firsts, answered = await deferToThread(crowd, port.getHost().port, 25)  # type: ignore[attr-defined]
        self.assertEqual(firsts, ["welcome"] * 20 + ["too_many_connections"] * 5)
        self.assertEqual(answered, [True] * 20)
