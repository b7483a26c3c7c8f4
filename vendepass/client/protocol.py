"""
The client side of protocol v1: one Deferred-returning method per operation.

    protocol = await connect(reactor, "tcp:host=localhost:port=65432", on_event)
    await protocol.login("maria", "maria123")
    itineraries = await protocol.search("THE", "CWB", date="2026-12-01")

Server refusals fail the Deferred with L{ServerError} (carrying the error
code); a dropped connection fails every pending call with L{ConnectionLost}.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IReactorCore, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

EventCallback = Callable[[str, dict[str, Any]], None]

DEFAULT_ENDPOINT = "tcp:host=localhost:port=65432"

# Opcodes of protocol v1 (docs/protocol.md).
PING, LOGIN, ROUTES, BUY, TICKETS, CANCEL, HOLD, RELEASE, SEATMAP, LOGOUT, REGISTER = range(11)


def new_request_id() -> str:
    """
    A fresh key for a changing request: resending it can never do it twice.
    """
    return uuid.uuid4().hex


class ServerError(Exception):
    """
    The server refused a request.

    @ivar code: the stable error code (C{"seat_unavailable"}, ...).
    @ivar message: the server's sentence for humans (English).
    @ivar details: the other fields of the error (C{"seat"}, C{"held_until"}, ...).
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class ConnectionLost(Exception):
    """
    The connection to the server closed before the answer came.
    """


class CertificateRefused(Exception):
    """
    The server's TLS certificate is not trusted: retrying cannot help.

    @ivar issuer: who signed the server's certificate (C{"CN=Some CA"}), or C{None}.
    @ivar wrong_name: the name that was asked for, when the certificate is
        trusted but names another server; else C{None}.
    """

    def __init__(self, issuer: str | None, wrong_name: str | None = None) -> None:
        if wrong_name is None:
            super().__init__(f"the server's certificate is not trusted (issuer {issuer or 'unknown'})")
        else:
            super().__init__(f"the server's certificate is not valid for {wrong_name}")
        self.issuer = issuer
        self.wrong_name = wrong_name


class BadEndpoint(ValueError):
    """
    An endpoint string the client cannot use.

    @ivar endpoint: the string as given.
    @ivar trust_roots: the C{trustRoots=} path, when that is what is wrong.
    """

    def __init__(self, endpoint: str, reason: str, trust_roots: str | None = None) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.trust_roots = trust_roots


# host:port (a name or an IPv4 address), shorthand for tcp:host=HOST:port=PORT.
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9.-]+):(?P<port>[0-9]+)")
_TRUST_ROOTS = re.compile(r"(?:^|:)trustRoots=((?:[^:\\]|\\.)*)")
_ENDPOINT_TYPES = {"tcp", "tcp6", "tls", "ssl", "unix"}


def endpoint_string(text: str) -> str:
    """
    C{text} as a Twisted client endpoint string: C{host:port} becomes
    C{tcp:host=host:port=port}; anything else is kept.
    """
    short = _HOST_PORT.fullmatch(text.strip())
    if short and short["host"].lower() not in _ENDPOINT_TYPES:
        return f"tcp:host={short['host']}:port={short['port']}"
    return text


def client_endpoint(reactor: IReactorCore, text: str) -> IStreamClientEndpoint:
    """
    The client endpoint C{text} names (see L{endpoint_string}).

    @raise BadEndpoint: C{text} names none.
    """
    try:
        return clientFromString(reactor, endpoint_string(text))
    except OSError as e:  # twisted.python.filepath.UnlistableError: trustRoots= is no directory
        roots = _TRUST_ROOTS.search(text)
        raise BadEndpoint(text, str(e) or "not a directory", roots.group(1) if roots else None) from e
    except (ValueError, TypeError, KeyError) as e:
        raise BadEndpoint(text, str(e)) from e


def _untrusted_issuer(transport: Any) -> str | None:
    """
    Who signed the certificate a TLS transport refused.
    """
    try:
        chain = transport.getHandle().get_peer_cert_chain()
        return str(chain[0].to_cryptography().issuer.rfc4514_string()) if chain else None
    except Exception:
        return None


def _certificate_refused(reason: Failure, transport: Any) -> CertificateRefused | None:
    """
    The L{CertificateRefused} a lost connection means, if its reason is a
    certificate that failed verification.
    """
    try:
        from OpenSSL.SSL import Error as TLSError
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover: no TLS support installed
        return None
    if reason.check(TLSError) and "certificate verify failed" in str(reason.value):
        return CertificateRefused(_untrusted_issuer(transport))
    if isinstance(reason.value, VerificationError):
        # Trusted, but issued to another name than the one connected to.
        wanted = [str(getattr(error.mismatched_id, "hostname", None) or getattr(error.mismatched_id, "ip", ""))
                  for error in reason.value.errors]
        return CertificateRefused(_untrusted_issuer(transport), ", ".join(wanted) or "this server")
    return None


class VendePassClientProtocol(LineReceiver):
    """
    A connection to a VendePass server. Requests may be pipelined: each call
    gets its own Deferred, matched to its response by id.
    """

    delimiter = b"\n"
    # Answers can be large (a whole sales window of itineraries).
    MAX_LENGTH = 16 * 1024 * 1024
    _log = Logger()

    def __init__(self, on_event: EventCallback | None = None) -> None:
        self.on_event = on_event
        self.welcome: dict[str, Any] | None = None
        self._next_id = 0
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}
        self._welcome_waiters: list[Deferred[dict[str, Any]]] = []
        self._lost: Failure | None = None

    # -- connection ---------------------------------------------------------

    def when_welcomed(self) -> Deferred[dict[str, Any]]:
        """
        Fires with the server's welcome data (at once if it came already);
        fails with L{ConnectionLost} once the connection is gone.
        """
        d: Deferred[dict[str, Any]] = Deferred()
        if self._lost is not None:
            d.errback(self._lost)
        elif self.welcome is not None:
            d.callback(self.welcome)
        else:
            self._welcome_waiters.append(d)
        return d

    def connectionLost(self, reason: Failure = Failure(ConnectionLost())) -> None:
        refused = _certificate_refused(reason, self.transport)
        if refused is not None:
            self._lost = Failure(refused)
        else:
            self._lost = Failure(ConnectionLost(f"The connection to the server was lost: {reason.getErrorMessage()}"))
        pending, self._pending = self._pending, {}
        waiters, self._welcome_waiters = self._welcome_waiters, []
        for d in [*pending.values(), *waiters]:
            d.errback(self._lost)
        if self.on_event is not None:
            self.on_event("connection_lost", {"reason": reason.getErrorMessage()})

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            self._log.warn("unreadable line from the server: {line!r}", line=line[:200])
            return
        if "event" in message:
            data = message.get("data")
            if not isinstance(data, dict):
                data = {}
            if message["event"] == "welcome" and self.welcome is None:
                self.welcome = data
                waiters, self._welcome_waiters = self._welcome_waiters, []
                for waiter in waiters:
                    waiter.callback(data)
            if self.on_event is not None:
                self.on_event(message["event"], data)
            return
        request_id = message.get("id")
        d: Deferred[dict[str, Any]] | None = None
        if isinstance(request_id, int):
            d = self._pending.pop(request_id, None)
        error = message.get("error")
        if not isinstance(error, dict):
            error = {"code": "internal_error", "message": f"Unreadable error from the server: {error!r}"}
        if d is None:
            if not message.get("ok", True):
                self._log.warn("server error: {code}: {message}", code=error.get("code"), message=error.get("message"))
                if self.on_event is not None:
                    self.on_event("error", error)
            return
        if message.get("ok"):
            data = message.get("data")
            d.callback(data if isinstance(data, dict) else {})
        else:
            error = dict(error)
            code = str(error.pop("code", "internal_error"))
            text = str(error.pop("message", code))
            d.errback(ServerError(code, text, error))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._log.error("the server sent a line longer than {limit} bytes", limit=self.MAX_LENGTH)
        if self.transport is not None:
            self.transport.loseConnection()

    # -- requests -----------------------------------------------------------

    def call(self, opcode: int, data: dict[str, Any] | None = None) -> Deferred[dict[str, Any]]:
        """
        Send one request; fires with the result data, or fails with
        L{ServerError} or L{ConnectionLost}.
        """
        d: Deferred[dict[str, Any]] = Deferred()
        if self._lost is not None or self.transport is None:
            d.errback(self._lost or Failure(ConnectionLost("Not connected.")))
            return d
        self._next_id += 1
        request_id = self._next_id
        self._pending[request_id] = d
        message: dict[str, Any] = {"opcode": opcode, "id": request_id}
        if data:
            message["data"] = {k: v for k, v in data.items() if v is not None}
        self.transport.write(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")
        return d

    def _get(self, opcode: int, key: str, data: dict[str, Any] | None = None) -> Deferred[Any]:
        return self.call(opcode, data).addCallback(lambda result: result[key])

    def ping(self) -> Deferred[dict[str, Any]]:
        return self.call(PING)

    def login(self, username: str, password: str) -> Deferred[str]:
        return self._get(LOGIN, "username", {"username": username, "password": password})

    def register(self, username: str, password: str) -> Deferred[str]:
        return self._get(REGISTER, "username", {"username": username, "password": password})

    def logout(self) -> Deferred[dict[str, Any]]:
        return self.call(LOGOUT)

    def routes(self) -> Deferred[dict[str, Any]]:
        """
        The network: C{{"airports": [...], "routes": [...]}}.
        """
        return self.call(ROUTES)

    def search(self, origin: str, destination: str, *args: Any, **kwargs: Any) -> Deferred[list[dict[str, Any]]]:
        """
        The itineraries of L{search_page} (with the same arguments).
        """
        return self.search_page(origin, destination, *args, **kwargs).addCallback(lambda data: data["itineraries"])

    def search_page(
        self,
        origin: str,
        destination: str,
        date: str | None = None,
        max_legs: int | None = None,
        include_sold_out: bool | None = None,
        limit: int | None = None,
        sort: str | None = None,
        offset: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        Itineraries from C{origin} to C{destination} (IATA codes): the
        server's answer, with C{itineraries}, C{sales_window}, and
        C{next_offset} when there are more (docs/protocol.md).
        """
        return self.call(
            ROUTES,
            {
                "origin": origin,
                "destination": destination,
                "date": date,
                "max_legs": max_legs,
                "include_sold_out": include_sold_out,
                "limit": limit,
                "sort": sort,
                "offset": offset,
            },
        )

    def seatmap(self, flight: str) -> Deferred[dict[str, Any]]:
        return self.call(SEATMAP, {"flight": flight})

    def hold(
        self, flights: list[str], seats: list[str | None] | None = None, request_id: str | None = None
    ) -> Deferred[dict[str, Any]]:
        return self._get(HOLD, "hold", {"flights": flights, "seats": seats, "request_id": request_id or new_request_id()})

    def release(self, hold_id: str, request_id: str | None = None) -> Deferred[dict[str, Any]]:
        return self.call(RELEASE, {"hold_id": hold_id, "request_id": request_id or new_request_id()})

    def buy(
        self,
        hold_id: str | None = None,
        flights: list[str] | None = None,
        seats: list[str | None] | None = None,
        request_id: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        Buy a hold, or (with C{flights}) hold and buy in one step; fires with the ticket.
        """
        data = {"hold_id": hold_id, "flights": flights, "seats": seats, "request_id": request_id or new_request_id()}
        return self._get(BUY, "ticket", data)

    def tickets_page(
        self, limit: int | None = None, cursor: str | None = None, active_only: bool | None = None
    ) -> Deferred[dict[str, Any]]:
        """
        One page of my tickets, newest first: the server's answer, with
        C{tickets} and, when more follow, C{next_cursor} (docs/protocol.md).
        """
        return self.call(TICKETS, {"limit": limit, "cursor": cursor, "active_only": active_only})

    def tickets(self, active_only: bool = False) -> Deferred[list[dict[str, Any]]]:
        """
        All my tickets (only the active ones if C{active_only}), newest
        first: every page, following the cursors (at most L{MAX_TICKET_PAGES}).
        """
        return Deferred.fromCoroutine(every_ticket(self.tickets_page, active_only))

    def cancel(self, ticket_id: str, request_id: str | None = None) -> Deferred[dict[str, Any]]:
        return self._get(CANCEL, "ticket", {"ticket_id": ticket_id, "request_id": request_id or new_request_id()})


# Following cursors stops after this many pages (of TICKET_PAGE_LIMIT).
MAX_TICKET_PAGES = 500
TICKET_PAGE_LIMIT = 200


async def every_ticket(
    page: Callable[[int | None, str | None, bool | None], Deferred[dict[str, Any]]], active_only: bool = False
) -> list[dict[str, Any]]:
    """
    Every ticket C{page(limit, cursor, active_only)} lists, following its
    cursors, newest first.
    """
    found: list[dict[str, Any]] = []
    cursor = None
    for _ in range(MAX_TICKET_PAGES):
        answer = await page(TICKET_PAGE_LIMIT, cursor, active_only or None)
        found += answer["tickets"]
        cursor = answer.get("next_cursor")
        if cursor is None:
            break
    return found


async def connect(
    reactor: IReactorCore, endpoint: str = DEFAULT_ENDPOINT, on_event: EventCallback | None = None
) -> VendePassClientProtocol:
    """
    Connect to a server with a client endpoint string (or C{host:port}) and
    wait for its welcome.

    @raise BadEndpoint: C{endpoint} is not a usable endpoint string.
    @raise CertificateRefused: the server's TLS certificate is not trusted.
    """
    protocol = VendePassClientProtocol(on_event)
    await connectProtocol(client_endpoint(reactor, endpoint), protocol)
    await protocol.when_welcomed()
    return protocol
