"""
The load generator: one lean L{Customer} protocol per simulated customer,
each doing its own newline splitting with C{json.loads}/C{json.dumps}, in a
single process on Twisted's default (epoll) reactor.

A customer sends a request with a callback; answers come back in order
(docs/protocol.md), so the pending requests are a FIFO, and the latency of
each is measured with C{time.perf_counter()} from its send to its answer and
recorded, by operation name, in the fleet's current L{Recorder}.
"""

from __future__ import annotations

import ipaddress
import json
import math
import sys
import time
from collections import defaultdict, deque
from typing import IO, Any, Callable

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, connectProtocol
from twisted.internet.error import ConnectError, ConnectionRefusedError, TimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

Message = dict[str, Any]
Callback = Callable[["Customer", Message], None]

DEFAULT_CONNECT = "tcp:127.0.0.1:65432"
# The server allows 50 connections per address by default; stay under it.
PER_ADDRESS = 40

_dumps = json.dumps
_loads = json.loads
_clock = time.perf_counter

OPNAMES = {0: "ping", 1: "login", 2: "routes", 3: "buy", 4: "tickets", 5: "cancel", 6: "hold", 7: "release",
           8: "seatmap", 9: "logout", 10: "register"}


class BenchError(Exception):
    """
    A usage or connection problem: the benchmark cannot run (exit code 2).
    """


class Refused(Exception):
    """
    The server refused the connection (e.g. C{too_many_connections}).
    """

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def error_code(message: Message) -> str:
    error = message.get("error")
    return str(error.get("code")) if isinstance(error, dict) else "no_error_code"


def connection_lost() -> Message:
    return {"ok": False, "error": {"code": "connection_lost"}}


class Recorder:
    """
    Latencies (seconds) by operation name, and refusals by error code, of one phase.
    """

    def __init__(self) -> None:
        self.samples: defaultdict[str, list[float]] = defaultdict(list)
        self.errors: defaultdict[str, int] = defaultdict(int)

    def error(self, message: Message) -> str:
        code = error_code(message)
        self.errors[code] += 1
        return code


@frozen
class Latency:
    """
    Latency percentiles in milliseconds (nearest rank).
    """

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: list[float]) -> Latency:
        ordered = sorted(samples)
        n = len(ordered)

        def rank(p: float) -> float:
            return round(ordered[min(n - 1, max(0, math.ceil(p * n) - 1))] * 1000, 3) if n else 0.0

        return cls(count=n, p50=rank(0.5), p90=rank(0.9), p99=rank(0.99), max=rank(1.0))


class Customer(Protocol):
    """
    One simulated customer on one connection.
    """

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.username: str | None = None
        self.connected = False
        self.welcomed: Deferred[Customer] = Deferred()
        self.state: Any = None  # the scenario's per-customer state
        self._buffer = b""
        self._pending: deque[tuple[int, str, float, Callback]] = deque()
        self._next_id = 0

    def connectionMade(self) -> None:
        self.connected = True
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            message = _loads(line)
            if "event" in message:
                self._event(message)
            elif self._pending:
                ident, op, started, callback = self._pending.popleft()
                self.fleet.recorder.samples[op].append(_clock() - started)
                if message.get("id") != ident:
                    message = {"ok": False, "error": {"code": "id_mismatch"}}
                callback(self, message)
            elif not self.welcomed.called:
                self.welcomed.errback(Refused(error_code(message)))
            else:
                self.fleet.recorder.errors["unsolicited"] += 1

    def _event(self, message: Message) -> None:
        name = str(message.get("event"))
        if name == "welcome" and not self.welcomed.called:
            self.welcomed.callback(self)
        else:
            self.fleet.events[name] += 1

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.connected = False
        if not self.welcomed.called:
            self.welcomed.errback(reason)
        while self._pending:
            _, _, _, callback = self._pending.popleft()
            callback(self, connection_lost())

    def request(self, opcode: int, data: Message, callback: Callback, op: str) -> None:
        """
        Send a request; C{callback(self, answer)} gets its answer (or a
        C{connection_lost} error). A callback may send the next request.
        """
        if not self.connected:
            callback(self, connection_lost())
            return
        self._next_id += 1
        ident = self._next_id
        self._pending.append((ident, op, _clock(), callback))
        self.transport.write(_dumps({"opcode": opcode, "id": ident, "data": data}).encode() + b"\n")  # type: ignore[union-attr]

    def call(self, opcode: int, data: Message | None = None) -> Deferred[Message]:
        """
        L{request} as a Deferred, for the phases that are not measured.
        """
        answer: Deferred[Message] = Deferred()
        self.request(opcode, data or {}, lambda _, message: answer.callback(message), OPNAMES.get(opcode, str(opcode)))
        return answer

    async def ok(self, opcode: int, data: Message | None = None) -> Message:
        """
        The data of a successful answer; L{BenchError} for a refusal.
        """
        message = await self.call(opcode, data)
        if not message.get("ok"):
            raise BenchError(f"{OPNAMES.get(opcode)} {data or {}} was refused: {message.get('error')}")
        result: Message = message["data"]
        return result

    def close(self) -> None:
        if self.connected and self.transport is not None:
            self.transport.loseConnection()


def source_address(index: int) -> str:
    """
    The C{index}-th loopback source address, from 127.0.1.1 on (Linux routes
    all of 127.0.0.0/8 to the loopback interface), skipping .0 and .255.
    """
    rest, last = divmod(index, 250)
    high, middle = divmod(rest + 1, 256)
    return f"127.{high}.{middle}.{last + 1}"


@frozen
class Target:
    """
    Where to connect: any client endpoint string. Loopback TCP targets can
    spread the connections over many source addresses.
    """

    description: str
    host: str | None  # an IPv4 loopback address, else None
    port: int | None
    spread: bool
    per_address: int
    # More servers of the same airline (on one database): customers are
    # dealt out to this target and these in turn.
    others: tuple[Target, ...] = ()

    @classmethod
    def parse(cls, reactor: Any, description: str, spread: bool = True, per_address: int = PER_ADDRESS) -> Target:
        try:
            endpoint = clientFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise BenchError(f"--connect {description!r} is not a valid client endpoint: {e}")
        host = port = None
        if isinstance(endpoint, TCP4ClientEndpoint):
            host, port = getattr(endpoint, "_host", None), getattr(endpoint, "_port", None)
            if host == "localhost":
                host = "127.0.0.1"
            try:
                loopback = host is not None and ipaddress.IPv4Address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                host = None
        return cls(description, host, port if host else None, spread, per_address)

    def with_others(self, others: list[Target]) -> Target:
        return attrs.evolve(self, others=tuple(others))

    def endpoint(self, reactor: Any, index: int) -> IStreamClientEndpoint:
        if self.others:
            targets = (self, *self.others)
            target = attrs.evolve(targets[index % len(targets)], others=())
            return target.endpoint(reactor, index // len(targets))
        if not self.spread or self.host is None or self.port is None:
            return clientFromString(reactor, self.description)
        return TCP4ClientEndpoint(
            reactor, self.host, self.port, timeout=30, bindAddress=(source_address(index // self.per_address), 0)
        )


def failure_code(failure: Failure) -> str:
    if failure.check(Refused):
        return str(failure.value.code)  # type: ignore[union-attr]
    if failure.check(ConnectionRefusedError):
        return "connection_refused"
    if failure.check(TimeoutError):
        return "connect_timeout"
    if failure.check(ConnectError):
        return "connect_error"
    return type(failure.value).__name__


class Progress:
    """
    A progress line on stderr about once a second: C{\\r buy: 12,345 done, 8,100/s, errors 0}.
    """

    def __init__(self, reactor: Any, stream: IO[str] | None = None, enabled: bool = True) -> None:
        self.reactor = reactor
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._loop: LoopingCall | None = None

    def start(self, label: str, counts: Callable[[], tuple[int, int]], total: int | None = None) -> None:
        self.stop()
        if not self.enabled:
            return
        start = _clock()
        last = [0, start]

        def show(final: bool = False) -> None:
            done, errors = counts()
            now = _clock()
            rate = (done - last[0]) / max(now - last[1], 1e-9) if not final else done / max(now - start, 1e-9)
            last[:] = [done, now]
            of = f"/{total:,}" if total else ""
            self.stream.write(f"\r {label}: {done:,}{of} done, {rate:,.0f}/s, errors {errors:,}   ")
            self.stream.flush()

        self._show = show
        self._loop = LoopingCall(show)
        self._loop.clock = self.reactor
        self._loop.start(1.0, now=False)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._show(True)
            self.stream.write("\n")
            self.stream.flush()
            self._loop = None


class Fleet:
    """
    The customers' connections to one target, and the current phase's L{Recorder}.
    """

    def __init__(self, reactor: Any, target: Target, progress: Progress) -> None:
        self.reactor = reactor
        self.target = target
        self.progress = progress
        self.recorder = Recorder()
        self.events: defaultdict[str, int] = defaultdict(int)
        self.customers: list[Customer] = []
        self.connect_errors: defaultdict[str, int] = defaultdict(int)

    async def connect(self, n: int, concurrency: int = 0, label: str = "connect") -> list[Customer]:
        """
        Open C{n} connections (at most C{concurrency} in progress at once,
        0: all at once) and wait for each welcome; return those that got one.
        """
        first = len(self.customers)
        limit = DeferredSemaphore(concurrency) if concurrency > 0 else None
        welcomed: list[Customer] = []

        def one(index: int) -> Deferred[None]:
            customer = Customer(self, index)
            d = connectProtocol(self.target.endpoint(self.reactor, index), customer)
            d.addCallback(lambda _: customer.welcomed)
            d.addCallbacks(welcomed.append, lambda f: self._connect_failed(f, customer))
            return d

        attempts = []
        self.progress.start(label, lambda: (len(welcomed), sum(self.connect_errors.values())), n)
        for index in range(first, first + n):
            attempts.append(limit.run(one, index) if limit else one(index))
        await DeferredList(attempts)
        self.progress.stop()
        welcomed.sort(key=lambda c: c.index)
        self.customers.extend(welcomed)
        return welcomed

    def _connect_failed(self, failure: Failure, customer: Customer) -> None:
        self.connect_errors[failure_code(failure)] += 1
        customer.close()

    def close(self) -> None:
        for customer in self.customers:
            customer.close()
