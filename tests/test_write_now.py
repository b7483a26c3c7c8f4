"""
L{vendepass.protocol.write_now}: an answer on a plain TCP connection is sent
at once, not on the reactor's next turn; what the socket does not take goes
to Twisted's buffer, in order; every other transport is written as before.

Real loopback sockets on the real reactor, waited for with deadlines.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.common import make_service
from vendepass import protocol
from vendepass.protocol import VendePassFactory, write_now

DEADLINE = 30.0


class Recorder(Protocol):
    def __init__(self) -> None:
        self.made: Deferred[Recorder] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """
    (In a thread.) Read C{size} bytes, or what came before the deadline.
    """
    sock.settimeout(1.0)
    chunks: list[bytes] = []
    got = 0
    deadline = time.monotonic() + DEADLINE
    while got < size and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class WriteNowTests(TestCase):
    async def connected(self, receive_buffer: int | None = None) -> tuple[Recorder, socket.socket]:
        """
        A server-side protocol on a real loopback connection, and the
        client's blocking socket.
        """
        protocols: list[Recorder] = []

        def build() -> Recorder:
            protocols.append(Recorder())
            return protocols[-1]

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")  # type: ignore[attr-defined, arg-type]
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        if receive_buffer is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        # A loopback connect completes in the kernel; the reactor accepts it.
        client.connect(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
        for _ in range(int(DEADLINE / 0.01)):
            if protocols:
                break
            await deferLater(reactor, 0.01)  # type: ignore[arg-type]
        server = await protocols[0].made
        self.addCleanup(lambda: server.transport.abortConnection() if server.transport.connected else None)  # type: ignore[union-attr]
        return server, client

    async def test_sent_at_once(self) -> None:
        """
        On a plain TCP connection with an empty buffer, the line leaves at
        once: nothing is buffered and the reactor is not asked to watch the
        socket for writing (as it is after a plain C{write}).
        """
        server, client = await self.connected()
        transport = server.transport
        write_now(transport, b'{"ok": true}\n')  # type: ignore[arg-type]
        self.assertNotIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        self.assertEqual(transport._tempDataBuffer, [])  # type: ignore[union-attr]
        self.assertEqual(await deferToThread(read_exactly, client, 13), b'{"ok": true}\n')
        # The transport's own write, for contrast, waits for the reactor.
        transport.write(b"later\n")  # type: ignore[union-attr]
        self.assertIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        self.assertEqual(await deferToThread(read_exactly, client, 6), b"later\n")

    async def test_partly_sent_kept_in_order(self) -> None:
        """
        What the socket does not take goes to the transport's buffer; lines
        written after it wait behind it: the client reads every byte, in
        the order written.
        """
        server, client = await self.connected(receive_buffer=4096)
        transport = server.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
        lines = [b"%05d:" % i + bytes([65 + i % 26]) * 5000 + b"\n" for i in range(200)]
        buffered = []
        for line in lines:
            write_now(transport, line)  # type: ignore[arg-type]
            buffered.append(bool(transport._tempDataBuffer or transport.dataBuffer))  # type: ignore[union-attr]
        # Some went at once, and the socket filled up before the end.
        self.assertFalse(buffered[0])
        self.assertTrue(buffered[-1])
        # The client takes some of it, so the socket has room again, before
        # the reactor's next turn: a line written now must still wait
        # behind what is buffered, not overtake it.
        client.settimeout(DEADLINE)
        early = client.recv(65536)
        last = b"last line\n"
        write_now(transport, last)  # type: ignore[arg-type]
        self.assertTrue(transport._tempDataBuffer or transport.dataBuffer)  # type: ignore[union-attr]
        expected = b"".join(lines) + last
        rest = await deferToThread(read_exactly, client, len(expected) - len(early))
        self.assertEqual(early + rest, expected)

    async def test_reset_connection(self) -> None:
        """
        A connection the client reset: writing does not raise, and the
        transport reports the connection lost as usual.
        """
        server, client = await self.connected()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        for _ in range(int(DEADLINE / 0.01)):
            if server.lost.called:
                break
            write_now(server.transport, b"x" * 1000 + b"\n")  # type: ignore[arg-type]
            await deferLater(reactor, 0.01)  # type: ignore[arg-type]
        await server.lost

    def test_other_transports(self) -> None:
        """
        A transport that is not a plain TCP connection gets a plain write.
        """
        transport = StringTransport()
        write_now(transport, b"line\n")
        self.assertEqual(transport.value(), b"line\n")


def ping_once(port: int) -> list[dict[str, Any]]:
    """
    (In a thread.) Connect, read the welcome, ping, read the answer.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        lines = sock.makefile("rb")
        welcome = json.loads(lines.readline())
        sock.sendall(b'{"opcode": 0, "id": "p"}\n')
        return [welcome, json.loads(lines.readline())]


class ServerWritesNowTests(TestCase):
    async def test_answers_and_events_written_now(self) -> None:
        """
        The server's welcome event and its answers go through L{write_now},
        on the plain TCP transport.
        """
        written: list[tuple[type, bytes]] = []
        real = protocol.write_now

        def recording(transport: Any, data: bytes) -> None:
            written.append((type(transport), data))
            real(transport, data)

        self.patch(protocol, "write_now", recording)
        service = make_service()
        self.addCleanup(service.stopService)
        port = reactor.listenTCP(0, VendePassFactory(service, reactor), interface="127.0.0.1")  # type: ignore[attr-defined, arg-type]
        self.addCleanup(port.stopListening)
        welcome, answer = await deferToThread(ping_once, port.getHost().port)  # type: ignore[attr-defined]
        self.assertEqual((welcome["event"], answer["id"], answer["ok"]), ("welcome", "p", True))
        self.assertEqual([kind for kind, _ in written], [tcp.Server, tcp.Server])
        self.assertEqual([json.loads(data) for _, data in written], [welcome, answer])
