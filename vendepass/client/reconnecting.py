"""
A client that survives a dropped connection.

    client = ReconnectingClient(reactor, "tcp:host=localhost:port=65432")
    await client.login("maria", "maria123")
    ticket = await client.buy(flights=["VP2301-2026-12-01"])

When the connection drops while a call is in flight, the client reconnects,
logs in again and resends the call; when the server answers
C{storage_unavailable} or C{outcome_unknown}, it waits and resends it too.
Every changing call carries a C{request_id} chosen before its first attempt
and kept for every resend, so the server answers a resent purchase or
cancellation with the first outcome and never does it twice
(docs/protocol.md, "Safe retries").
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import deferLater

from vendepass.client.protocol import (
    DEFAULT_ENDPOINT,
    ConnectionLost,
    EventCallback,
    ServerError,
    VendePassClientProtocol,
    connect,
    every_ticket,
    new_request_id,
)

T = TypeVar("T")

RETRYABLE = (ConnectionLost, net_error.ConnectError, net_error.DNSLookupError, net_error.ConnectionClosed)
# The server's answers that a resend (with the same request_id) may change:
# nothing was done, or whether it was is unknown.
RETRYABLE_CODES = frozenset({"storage_unavailable", "outcome_unknown"})


class ReconnectingClient:
    """
    The operations of L{VendePassClientProtocol}, with reconnection and
    safe retries.

    @ivar attempts: how many times a call is tried in all.
    @ivar backoff: seconds to wait before the first reconnection; doubled each time.
    """

    def __init__(
        self,
        reactor: IReactorCore,
        endpoint: str = DEFAULT_ENDPOINT,
        on_event: EventCallback | None = None,
        attempts: int = 4,
        backoff: float = 0.25,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.on_event = on_event
        self.attempts = attempts
        self.backoff = backoff
        self.protocol: VendePassClientProtocol | None = None
        self.reconnections = 0
        # Calls sent again because the server could not say they were done.
        self.resends = 0
        self._credentials: tuple[str, str] | None = None

    @property
    def connected(self) -> bool:
        """
        Whether a connection is open now (a call would not reconnect first).
        """
        return self.protocol is not None and self.protocol.transport is not None and self.protocol._lost is None

    async def _connected(self) -> VendePassClientProtocol:
        if not self.connected:
            self.protocol = await connect(self.reactor, self.endpoint, self.on_event)
            if self._credentials is not None:
                await self.protocol.login(*self._credentials)
        assert self.protocol is not None
        return self.protocol

    async def _call(
        self,
        call: Callable[[VendePassClientProtocol], Awaitable[T]],
        after_drop: Callable[[], Awaitable[T]] | None = None,
        on_drop: Callable[[], None] | None = None,
        codes: frozenset[str] = RETRYABLE_CODES,
    ) -> T:
        """
        Run C{call} on a live connection, reconnecting and retrying when it
        drops, and retrying on the same connection when the server answers
        one of C{codes}. C{after_drop}, if given, is what to do instead once
        a drop happened; C{on_drop}, what to do when one happens.
        """
        dropped = False
        for attempt in range(self.attempts):
            try:
                protocol = await self._connected()
                if dropped and after_drop is not None:
                    return await after_drop()
                return await call(protocol)
            except RETRYABLE:
                dropped = True
                self.protocol = None
                if attempt + 1 == self.attempts:
                    raise
                self.reconnections += 1
                if on_drop is not None:
                    on_drop()
            except ServerError as e:
                if e.code not in codes or attempt + 1 == self.attempts:
                    raise
                self.resends += 1
            clock: IReactorTime = self.reactor  # type: ignore[assignment]
            await deferLater(clock, self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()

    # -- operations ---------------------------------------------------------

    def _run(self, coroutine: Awaitable[T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coroutine)  # type: ignore[arg-type]

    def ping(self) -> Deferred[dict[str, Any]]:
        return self._run(self._call(lambda p: p.ping()))

    def login(self, username: str, password: str) -> Deferred[str]:
        async def login() -> str:
            result = await self._call(lambda p: p.login(username, password))
            self._credentials = (username, password)
            return result

        return self._run(login())

    def register(self, username: str, password: str) -> Deferred[str]:
        # Registration has no request_id: after outcome_unknown, a resend
        # could only say that the (maybe new) username is taken.
        return self._run(self._call(lambda p: p.register(username, password), codes=frozenset({"storage_unavailable"})))

    def logout(self) -> Deferred[dict[str, Any]]:
        self._credentials = None
        return self._run(self._call(lambda p: p.logout()))

    def routes(self) -> Deferred[dict[str, Any]]:
        return self._run(self._call(lambda p: p.routes()))

    def search(self, origin: str, destination: str, *args: Any, **kwargs: Any) -> Deferred[list[dict[str, Any]]]:
        return self._run(self._call(lambda p: p.search(origin, destination, *args, **kwargs)))

    def search_page(self, origin: str, destination: str, *args: Any, **kwargs: Any) -> Deferred[dict[str, Any]]:
        return self._run(self._call(lambda p: p.search_page(origin, destination, *args, **kwargs)))

    def seatmap(self, flight: str) -> Deferred[dict[str, Any]]:
        return self._run(self._call(lambda p: p.seatmap(flight)))

    def tickets_page(
        self, limit: int | None = None, cursor: str | None = None, active_only: bool | None = None
    ) -> Deferred[dict[str, Any]]:
        return self._run(self._call(lambda p: p.tickets_page(limit, cursor, active_only)))

    def tickets(self, active_only: bool = False) -> Deferred[list[dict[str, Any]]]:
        # Page by page: a drop costs a page, not the whole list.
        return Deferred.fromCoroutine(every_ticket(self.tickets_page, active_only))

    def hold(self, flights: list[str], seats: list[str | None] | None = None) -> Deferred[dict[str, Any]]:
        key = [new_request_id()]

        def renew() -> None:
            # A hold lives as long as its connection: after a drop the server
            # has released it anyway, so the retry asks for a new hold.
            key[0] = new_request_id()

        return self._run(self._call(lambda p: p.hold(flights, seats, key[0]), on_drop=renew))

    def release(self, hold_id: str) -> Deferred[dict[str, Any]]:
        request_id = new_request_id()

        async def released() -> dict[str, Any]:
            # The drop itself released every hold of that connection.
            return {}

        return self._run(self._call(lambda p: p.release(hold_id, request_id), after_drop=released))

    def buy(
        self,
        hold_id: str | None = None,
        flights: list[str] | None = None,
        seats: list[str | None] | None = None,
        request_id: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        key = request_id or new_request_id()
        return self._run(self._call(lambda p: p.buy(hold_id, flights, seats, key)))

    def cancel(self, ticket_id: str, request_id: str | None = None) -> Deferred[dict[str, Any]]:
        key = request_id or new_request_id()
        return self._run(self._call(lambda p: p.cancel(ticket_id, key)))


__all__ = ["ReconnectingClient", "ServerError"]
