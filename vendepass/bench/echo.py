"""
The C{ceiling}: a bare Twisted JSON-lines echo server, what Twisted itself
can do on this machine. It greets like VendePass, then answers each line
with C{json.loads} and C{json.dumps}: C{{"id", "opcode", "ok": true, "data"}}
with the request's own id, opcode and data.

C{python -m vendepass.bench.echo} listens on 127.0.0.1, on a free port, and
prints the port on stdout; it stops when its stdin closes (its parent,
C{vendepass-bench}, is gone) or on SIGTERM.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.stdio import StandardIO
from twisted.python.failure import Failure

WELCOME = json.dumps({"event": "welcome", "data": {"protocol": 1, "server": "echo", "hold_seconds": 0}}).encode() + b"\n"
BACKLOG = 4096

_dumps = json.dumps
_loads = json.loads


class Echo(Protocol):
    def __init__(self) -> None:
        self._buffer = b""

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.transport.write(WELCOME)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        write = self.transport.write  # type: ignore[union-attr]
        for line in lines:
            request = _loads(line)
            write(
                _dumps({"id": request.get("id"), "opcode": request.get("opcode"), "ok": True, "data": request.get("data")})
                .encode()
                + b"\n"
            )


class _StopWhenParentGoes(Protocol):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self.reactor.running:
            self.reactor.stop()


def main() -> None:
    from twisted.internet import reactor

    def listening(port: Any) -> None:
        sys.stdout.write(f"{port.getHost().port}\n")
        sys.stdout.flush()

    def failed(failure: Failure) -> None:
        sys.stderr.write(f"echo: cannot listen: {failure.value}\n")
        reactor.stop()  # type: ignore[attr-defined]

    endpoint = TCP4ServerEndpoint(reactor, 0, backlog=BACKLOG, interface="127.0.0.1")  # type: ignore[arg-type]
    endpoint.listen(Factory.forProtocol(Echo)).addCallbacks(listening, failed)
    StandardIO(_StopWhenParentGoes(reactor))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
