"""
Protocol v1 (docs/protocol.md): newline-delimited JSON over TCP.

The factory holds what connections share (the reservation service and the
clock); each protocol instance holds one connection's session. Requests on a
connection are handled one at a time, in order: while one is in flight the
protocol stops reading, which also bounds what a client can make us buffer.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import date
from typing import Any, Awaitable, Callable

from attrs import frozen
from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from zope.interface import implementer

from vendepass import __version__, wire
from vendepass.errors import (
    InternalError,
    InvalidRequest,
    LineTooLong,
    MalformedJSON,
    NotLoggedIn,
    SessionClosed,
    TooManyConnections,
    UnknownOpcode,
    VendePassError,
    echo,
)
from vendepass.model import Hold, Ticket, iso_utc
from vendepass.service import (
    MAX_SEARCH_LIMIT,
    MAX_TICKETS_LIMIT,
    SEARCH_LIMIT,
    TICKETS_LIMIT,
    ReservationService,
    Session,
)

MAX_LINE_BYTES = 64 * 1024
# While a request is in flight, at most this much of what follows is read
# ahead before the socket stops being read.
READ_AHEAD = MAX_LINE_BYTES + 2
DEFAULT_IDLE_TIMEOUT = 15 * 60.0
# A TLS connection must finish its handshake this soon after connecting.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# A connection being closed that is not gone this long after (a TLS peer
# that never finishes its handshake or its close, a peer that does not read
# what is left to send) is aborted.
CLOSE_GRACE_SECONDS = 5.0
DEFAULT_MAX_CONNECTIONS_PER_IP = 50
# Connections open at once over all addresses (see tap.fit_connection_limit
# for how it is kept below the limit on open files).
DEFAULT_MAX_CONNECTIONS = 10_000

Handler = Callable[["VendePassProtocol", dict[str, Any]], Awaitable[dict[str, Any]]]  # a coroutine or a Deferred

_MISSING = object()


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    """
    Read field C{name} of a request's data, checking its JSON type.

    @raise InvalidRequest: naming the field, if it is missing or ill-typed.
    """
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise InvalidRequest(f"Field {name!r} is required.", field=name)
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise InvalidRequest(f"Field {name!r} must be {names}.", field=name)
    if isinstance(value, str) and not _is_unicode(value):
        raise InvalidRequest(f"Field {name!r} is not valid Unicode text.", field=name)
    return value


def _host(address: IAddress) -> str:
    """
    What identifies a peer for connection limits, login throttling and
    logs: its IP address (any port), or the whole address if it has none.
    """
    return str(getattr(address, "host", address))


def _is_unicode(text: str) -> bool:
    """
    Whether C{text} is real Unicode text: JSON's C{"\\ud800"} escapes can
    smuggle in lone surrogates, which are not.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The members of an answer, in the order the protocol sends them.
_ANSWER_KEYS = ("id", "opcode", "ok", "data")


def _encode(message: dict[str, Any]) -> bytes:
    data = message.get("data")
    if isinstance(data, wire.RawJSON):
        # Encoded ahead of time: put it in place of the last member.
        request_id = message.get("id")
        if (
            tuple(message) == _ANSWER_KEYS and message["ok"] is True and type(message["opcode"]) is int
            and (request_id is None or type(request_id) is int)
        ):
            # The answer of every sale: its head without json's encoder.
            id_text = "null" if request_id is None else f"{request_id:d}"
            return f'{{"id":{id_text},"opcode":{message["opcode"]:d},"ok":true,"data":{data}}}\n'.encode("utf-8")
        head = _encode({**message, "data": None})
        assert head.endswith(b'"data":null}\n'), head
        return head[: -len(b"null}\n")] + data.encode("utf-8") + b"}\n"
    try:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        # An echoed id held a lone surrogate: send it escaped, as JSON allows.
        return json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"


# What json's messages say, in our words.
_JSON_REASONS = {
    "Expecting value": "a value was expected",
    "Expecting property name enclosed in double quotes": "a member name in double quotes was expected",
    "Expecting ':' delimiter": "':' was expected",
    "Expecting ',' delimiter": "',' was expected",
    "Unterminated string starting at": "a string does not end",
    "Invalid control character at": "a string holds a control character",
    "Invalid \\escape": "a string holds an invalid escape",
    "Invalid \\uXXXX escape": "a string holds an invalid escape",
    "Extra data": "more follows the value",
    "Illegal trailing comma before end of object": "a comma ends an object",
    "Illegal trailing comma before end of array": "a comma ends a list",
}


def write_now(transport: ITransport, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it at once when it can go.

    Twisted's TCP transport buffers every write until the reactor's next
    turn: it asks epoll to watch the socket for writing, wakes up for it,
    sends, and asks epoll to stop watching (Twisted issue #5303, open since
    2011). An answer is one line, written when it is ready: on a plain TCP
    connection with nothing waiting in its buffer, it is sent now (as
    asyncio's transports do), and only what the socket does not take, or an
    error, goes to the transport's buffer, which keeps the order and
    reports the error as it always does. Any other transport (TLS, a
    wrapper, a test's) is written to as usual.
    """
    if (
        type(transport) is tcp.Server
        and transport.connected
        and not transport.disconnecting
        # Read with defaults that mean "write as usual", in case a later
        # Twisted renames them: not TLS (startTLS), not aborted...
        and not getattr(transport, "TLS", True)
        and not getattr(transport, "_aborting", True)
        and not getattr(transport, "_writeDisconnected", True)
        # ...and nothing buffered in either of its buffers, so nothing to
        # overtake.
        and not getattr(transport, "_tempDataBuffer", True)
        and not getattr(transport, "dataBuffer", True)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Full (EAGAIN) or failing: the transport's own write sees to it.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _json_error(error: ValueError) -> str:
    """
    Why a line is not JSON, in a sentence of ours, never Python's.
    """
    if isinstance(error, json.JSONDecodeError):
        reason = _JSON_REASONS.get(error.msg, "the text is not JSON")
        return f"The line is not valid JSON: {reason} at character {error.pos + 1}."
    # json.loads raises a plain ValueError for an integer longer than
    # Python's limit on converting digits (sys.get_int_max_str_digits()).
    return f"The line is not valid JSON: a number has more than {_MAX_DIGITS} digits."


_MAX_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


_JSON_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}


def _flight_list(data: dict[str, Any]) -> list[str]:
    flights = _field(data, "flights", list)
    if not flights or not all(isinstance(f, str) and _is_unicode(f) for f in flights):
        raise InvalidRequest("Field 'flights' must be a non-empty list of flight ids.", field="flights")
    return flights


_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def _request_id(data: dict[str, Any]) -> str | None:
    """
    The optional client-chosen key that makes a retry safe.
    """
    request_id = _field(data, "request_id", str, required=False)
    if request_id is not None and not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequest(
            "Field 'request_id' must have 1 to 128 printable ASCII characters, without spaces.", field="request_id"
        )
    return request_id


def _seat_list(data: dict[str, Any]) -> list[str | None] | None:
    seats = _field(data, "seats", list, required=False)
    if seats is not None and not all(s is None or isinstance(s, str) and _is_unicode(s) for s in seats):
        raise InvalidRequest("Field 'seats' must list one seat (a string) or null per flight.", field="seats")
    return seats


def _ticket_answer(ticket: Ticket) -> wire.RawJSON:
    # Encoded ahead of time (wire.ticket_json): the same text as
    # {"ticket": wire.ticket(ticket)} would make, for less.
    return wire.RawJSON('{"ticket":' + wire.ticket_json(ticket) + "}")


def _hold_answer(hold: Hold) -> wire.RawJSON:
    # Encoded ahead of time (wire.hold_json), as a ticket is.
    return wire.RawJSON('{"hold":' + wire.hold_json(hold) + "}")


def _nothing(_: object) -> dict[str, Any]:
    return {}


@frozen
class Opcode:
    number: int
    name: str
    needs_login: bool
    handler: Handler


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class VendePassProtocol(LineReceiver):
    """
    One customer connection.

    Every way this side closes a connection (idle, refused, a line too long)
    is clean if it can be: the rest of what was written is sent first, and on
    TLS a close alert. A connection still open L{CLOSE_GRACE_SECONDS} later
    is aborted. On a TLS transport, a connection whose handshake has not
    finished within C{handshake_timeout} seconds is aborted.

    A client that closes its sending side (a TCP half-close) gets the answers
    to everything it sent, a last line without its newline included, and
    then the connection is closed (L{IHalfCloseableProtocol}).
    """

    delimiter = b"\n"
    # One more for the "\r" of a "\r\n" ending; lineReceived checks the rest.
    MAX_LENGTH = MAX_LINE_BYTES + 1
    _log = Logger()

    def __init__(
        self,
        service: ReservationService,
        clock: IReactorTime,
        idle_timeout: float | None = None,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.service = service
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.session: Session | None = None
        # Nothing more is sent once closing has begun...
        self._closed = False
        # ...and the transport has called connectionLost.
        self._lost = False
        # The client has closed its sending side: nothing more to read.
        self._read_closed = False
        self._handshake_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        # Requests are handled one at a time (answers in order): while one
        # is in flight, later lines wait in the buffer. Reading from the
        # socket stops only when that buffer passes READ_AHEAD bytes, or
        # while the transport's write buffer is full (a client that does not
        # read its answers cannot make the server buffer without bound).
        # Not pausing the socket for every request saves two epoll_ctl calls
        # per request.
        self._busy = False
        self._write_blocked = False
        self._transport_paused = False
        self._producing = False
        self._idle_call: IDelayedCall | None = None
        # The address the factory counted this connection under.
        self._counted_host: str | None = None
        # The customer's address as the session knows it (see _learn_peer).
        self._peer_host: str | None = None
        # Set when the connection is refused at once (with this error).
        self.refusal: VendePassError | None = None
        # Log a line per request (at debug level)?
        self.log_requests = False

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.handshake_timeout is not None and ISSLTransport.providedBy(self.transport):
            self._handshake_call = self.clock.callLater(self.handshake_timeout, self._handshake_timed_out)
        if self.refusal is not None:
            self.transport.write(_encode({"id": None, "opcode": None, "ok": False, "error": self.refusal.to_wire()}))
            self._closed = True
            self._close()
            return
        peer: IAddress = self.transport.getPeer()
        self._peer_host = _host(peer)
        self.session = self.service.open_session(self._event, self._peer_host)
        self._log.debug("connection from {peer}", peer=peer)
        self._reset_idle()
        self._send(
            {
                "event": "welcome",
                "data": {
                    "protocol": wire.PROTOCOL_VERSION,
                    "server": f"vendepass/{__version__}",
                    "hold_seconds": self.service.hold_seconds,
                },
            }
        )

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._closed = True
        self._lost = True
        for call in (self._idle_call, self._handshake_call, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._handshake_call = self._abort_call = None
        if self._counted_host is not None:
            self.factory.disconnected(self._counted_host)  # type: ignore[attr-defined]
            self._counted_host = None
        if self.session is not None:
            self.service.close_session(self.session).addErrback(
                lambda f: self._log.failure("releasing the holds of {session}", f, session=self.session)
            )

    def _send(self, message: dict[str, Any]) -> None:
        if not self._closed and self.transport is not None:
            write_now(self.transport, _encode(message))

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self._send({"event": name, "data": data})

    # -- flow control and idleness --------------------------------------------

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is full: stop reading requests.
        """
        self._write_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """
        The transport's write buffer has drained: read again.
        """
        self._write_blocked = False
        self._update_reading()

    def dataReceived(self, data: bytes) -> None:
        LineReceiver.dataReceived(self, data)
        if self.paused and not self._transport_paused and len(self._buffer) > READ_AHEAD:
            self._update_reading()

    def _update_reading(self) -> None:
        if self._closed or self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        stop_socket = self._write_blocked or (self._busy and len(self._buffer) > READ_AHEAD)
        # (Once the client has closed its side, reading the socket again
        # would only find its end again.)
        if stop_socket != self._transport_paused and not self._read_closed:
            self._transport_paused = stop_socket
            if stop_socket:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]
        stop_lines = self._busy or self._write_blocked
        if stop_lines and not self.paused:
            self.paused = True
        elif not stop_lines and self.paused:
            self.paused = False
            # Handle the lines that arrived meanwhile.
            self.dataReceived(b"")
        self._finish_reading()

    def readConnectionLost(self) -> None:
        """
        The client closed its sending side (L{IHalfCloseableProtocol}): answer
        what it sent, then close.
        """
        if not self._read_closed:
            self._read_closed = True
            self._update_reading()

    def writeConnectionLost(self) -> None:
        """
        Our sending side is closed (L{IHalfCloseableProtocol}): never by us
        alone, as this protocol only closes whole connections.
        """

    def _finish_reading(self) -> None:
        """
        After the client closed its side: once every request it sent is
        answered, close. A last line without its newline is a line.
        """
        if not self._read_closed or self._closed or self._busy or self.paused:
            return
        if self.delimiter in self._buffer:
            # Whole lines still to handle: dataReceived does, and this is
            # called again after each one's answer.
            if not self._busyReceiving:
                self.dataReceived(b"")
            return
        if self._buffer:
            last, self._buffer = self._buffer, b""
            self.lineReceived(last)
            return
        self._log.debug("{session} closed its side; closing", session=self.session)
        if self._producing and self.transport is not None:
            # Nothing more to produce; and a TLS layer sends its close alert
            # only once no producer is registered.
            self._producing = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
        self._close()
        beneath = getattr(self.transport, "transport", None)
        if ISSLTransport.providedBy(self.transport) and beneath is not None:
            # A TCP half-close under TLS, without TLS's own close alert: the
            # client will not answer ours, for which the TLS layer would
            # wait. The connection beneath closes once all is sent.
            beneath.loseConnection()

    def _learn_peer(self) -> None:
        """
        Read the customer's address again, at the first request.

        Behind a PROXY-protocol listener (C{--listen haproxy:tcp:...}), this
        protocol is connected, and greets, before the PROXY header has been
        read: until then the transport's peer is the proxy's address. No
        request reaches this protocol before the header has been read, so
        from the first one on, the transport's peer is the customer's, and
        that is the address the session's login throttling and logs use.
        On any other listener the peer does not change, and the session's
        is left as it is.
        """
        if self.session is None or self.transport is None:
            return
        peer = self.transport.getPeer()
        host = _host(peer)
        if host != self._peer_host:
            self._log.debug(
                "connection of {session} is from {peer} (PROXY header)", session=self.session, peer=peer
            )
            self._peer_host = host
            self.session.peer = host

    def _reset_idle(self) -> None:
        if self.idle_timeout is None or self._closed:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._event("idle_timeout", {"seconds": self.idle_timeout})
        self._log.debug("closing idle connection of {session}", session=self.session)
        self._close()

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done (L{IHandshakeListener}): no more deadline
        but the idle timeout.
        """
        self._handshake_done()

    def _handshake_done(self) -> None:
        if self._handshake_call is not None:
            if self._handshake_call.active():
                self._handshake_call.cancel()
            self._handshake_call = None

    def _handshake_timed_out(self) -> None:
        self._handshake_call = None
        self._log.debug(
            "aborting the connection from {peer}: no TLS handshake within {seconds} s",
            peer=self.transport.getPeer() if self.transport is not None else None,
            seconds=self.handshake_timeout,
        )
        self._abort()

    def _close(self) -> None:
        """
        Close the connection: cleanly if that is done within
        L{CLOSE_GRACE_SECONDS}, by aborting it otherwise.
        """
        if self.transport is None or self._lost:
            return
        self.transport.loseConnection()
        # (Some transports are lost at once.)
        if self._abort_call is None and not self._lost:
            self._abort_call = self.clock.callLater(CLOSE_GRACE_SECONDS, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        self._closed = True
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- requests -----------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        error = LineTooLong(f"A line may have at most {MAX_LINE_BYTES} bytes; closing the connection.")
        self._send({"id": None, "opcode": None, "ok": False, "error": error.to_wire()})
        self._close()

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_LINE_BYTES:
            self.lineLengthExceeded(line)
            return
        # Only whole lines count as activity: a client dribbling bytes is idle.
        self._reset_idle()
        # A line came through: the TLS handshake, if any, is done (a wrapper
        # between, such as the PROXY protocol's, may not pass on the news).
        self._handshake_done()
        if not self._producing and self.transport is not None:
            # Become the transport's producer at the first request, not on
            # connect: a TLS transport pauses its producer until the
            # handshake is done, and pausing our reading then would stall
            # the handshake itself.
            self._producing = True
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
            self._learn_peer()
        # One request at a time: stop reading until this one is answered.
        self._busy = True
        self._update_reading()
        started = self.clock.seconds()
        request: dict[str, Any] = {"id": None, "opcode": None}
        try:
            d = self._handle(line, request)
        except Exception:
            d = fail()
        d.addCallback(lambda data: {"id": request["id"], "opcode": request["opcode"], "ok": True, "data": data})
        d.addErrback(self._failed, request)
        d.addCallback(self._answer, request, started)

    def _handle(self, line: bytes, request: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """
        Decode a request and start its handler: a coroutine, or (for the
        requests every sale makes) a plain method returning a Deferred, which
        saves a coroutine per request.
        """
        try:
            message = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise MalformedJSON("The line is not valid UTF-8.")
        except ValueError as e:
            # Our own words: Python's words name its internals (line and column,
            # "use sys.set_int_max_str_digits()").
            raise MalformedJSON(_json_error(e))
        except RecursionError:
            raise MalformedJSON("The line is not valid JSON: nested too deeply.")
        if not isinstance(message, dict):
            raise InvalidRequest("A request is a JSON object.")
        opcode = message.get("opcode")
        if isinstance(opcode, int) and not isinstance(opcode, bool):
            request["opcode"] = opcode
        request_id = message.get("id")
        if request_id is None or isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
            request["id"] = request_id
        else:
            raise InvalidRequest("Field 'id' must be a string or an integer.", field="id")
        if request["opcode"] is None:
            raise InvalidRequest("Field 'opcode' must be an integer.", field="opcode")
        entry = OPCODES.get(request["opcode"])
        if entry is None:
            named = echo(str(opcode))
            # The field only for an opcode that fits (whole) in an echo.
            raise UnknownOpcode(f"Unknown opcode {named}.", **({"opcode": opcode} if named == str(opcode) else {}))
        request["name"] = entry.name
        data = message.get("data")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InvalidRequest("Field 'data' must be an object.", field="data")
        assert self.session is not None
        if entry.needs_login and self.session.username is None:
            raise NotLoggedIn(f"Log in before {entry.name}.")
        started = entry.handler(self, data)
        if isinstance(started, Deferred):
            return started
        return Deferred.fromCoroutine(started)  # type: ignore[arg-type]

    def _failed(self, failure: Failure, request: dict[str, Any]) -> dict[str, Any]:
        error: VendePassError
        if failure.check(SessionClosed):
            # The connection is gone; this answer goes nowhere.
            error = failure.value  # type: ignore[assignment]
        elif failure.check(VendePassError):
            error = failure.value  # type: ignore[assignment]
        else:
            self._log.failure(
                "request {opcode} ({name}) from {session} failed",
                failure,
                opcode=request["opcode"],
                name=request.get("name"),
                session=self.session,
            )
            error = InternalError()
        return {"id": request["id"], "opcode": request["opcode"], "ok": False, "error": error.to_wire()}

    def _answer(self, response: dict[str, Any], request: dict[str, Any], started: float) -> None:
        if self.log_requests:
            self._log_request(response, request, started)
        try:
            self._send(response)
        finally:
            # Whatever happened, go on with the next request.
            self._busy = False
            self._reset_idle()
            self._update_reading()

    def _log_request(self, response: dict[str, Any], request: dict[str, Any], started: float) -> None:
        self._log.debug(
            "{peer} {user} opcode {opcode} ({name}): {outcome} in {ms:.1f} ms",
            peer=self.session.peer if self.session else None,
            user=self.session.username if self.session else None,
            opcode=request["opcode"],
            name=request.get("name"),
            outcome="ok" if response["ok"] else response["error"]["code"],
            ms=(self.clock.seconds() - started) * 1000,
        )

    # -- opcodes ------------------------------------------------------------

    async def _ping(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"time": iso_utc(self.clock.seconds())}

    async def _login(self, data: dict[str, Any]) -> dict[str, Any]:
        username = _field(data, "username", str)
        password = _field(data, "password", str)
        assert self.session is not None
        return {"username": await self.service.login(self.session, username, password)}

    async def _register(self, data: dict[str, Any]) -> dict[str, Any]:
        username = _field(data, "username", str)
        password = _field(data, "password", str)
        assert self.session is not None
        return {"username": await self.service.register(username, password, self.session.peer)}

    async def _logout(self, data: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        await self.service.logout(self.session)
        return {}

    async def _routes(self, data: dict[str, Any]) -> dict[str, Any]:
        origin = _field(data, "origin", str, required=False)
        destination = _field(data, "destination", str, required=False)
        if origin is None and destination is None:
            for name in ("date", "max_legs", "include_sold_out", "limit", "sort", "offset"):
                if data.get(name) is not None:
                    raise InvalidRequest(f"Field {name!r} needs 'origin' and 'destination'.", field=name)
            return {
                "airports": [
                    {"code": a.code, "city": a.city, "name": a.name} for a in self.service.airports.values()
                ],
                "routes": [{"origin": o, "destination": d} for o, d in self.service.routes],
            }
        if origin is None or destination is None:
            missing = "origin" if origin is None else "destination"
            raise InvalidRequest(f"Give both 'origin' and 'destination' (missing {missing!r}).", field=missing)
        if origin.upper() == destination.upper():
            raise InvalidRequest("'origin' and 'destination' must differ.", field="destination")
        day_text = _field(data, "date", str, required=False)
        day = None
        if day_text is not None:
            try:
                if not _DATE.fullmatch(day_text):
                    raise ValueError(day_text)
                day = date.fromisoformat(day_text)
            except ValueError:
                raise InvalidRequest("Field 'date' must be a date like 2026-12-01.", field="date")
        max_legs = _field(data, "max_legs", int, required=False)
        if max_legs is not None and not 1 <= max_legs <= self.service.max_legs:
            raise InvalidRequest(f"Field 'max_legs' must be between 1 and {self.service.max_legs}.", field="max_legs")
        include_sold_out = _field(data, "include_sold_out", bool, required=False) or False
        limit = _field(data, "limit", int, required=False)
        if limit is None:
            limit = SEARCH_LIMIT
        elif not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise InvalidRequest(f"Field 'limit' must be between 1 and {MAX_SEARCH_LIMIT}.", field="limit")
        sort = _field(data, "sort", str, required=False)
        offset = _field(data, "offset", int, required=False)
        page = await self.service.search_page(
            origin.upper(), destination.upper(), day, max_legs, include_sold_out, limit,
            "departure" if sort is None else sort, 0 if offset is None else offset,
        )
        return wire.search_page(page)  # type: ignore[return-value]

    async def _seatmap(self, data: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        seatmap = await self.service.seatmap(self.session, _field(data, "flight", str))
        return wire.seatmap(seatmap, self.session.username)  # type: ignore[return-value]

    def _hold(self, data: dict[str, Any]) -> Deferred[Any]:
        assert self.session is not None
        flights = _flight_list(data)
        seats = _seat_list(data)
        request_id = _request_id(data)
        return self.service.hold(self.session, flights, seats, request_id).addCallback(_hold_answer)

    def _release(self, data: dict[str, Any]) -> Deferred[Any]:
        assert self.session is not None
        hold_id = _field(data, "hold_id", str)
        return self.service.release(self.session, hold_id, _request_id(data)).addCallback(_nothing)

    def _buy(self, data: dict[str, Any]) -> Deferred[Any]:
        assert self.session is not None
        request_id = _request_id(data)
        hold_id = _field(data, "hold_id", str, required=False)
        if hold_id is not None:
            if data.get("flights") is not None:
                raise InvalidRequest("Give either 'hold_id' or 'flights', not both.", field="flights")
            bought = self.service.buy(self.session, hold_id=hold_id, request_id=request_id)
        elif data.get("flights") is not None:
            bought = self.service.buy(
                self.session, flight_ids=_flight_list(data), seats=_seat_list(data), request_id=request_id
            )
        else:
            raise InvalidRequest("Give 'hold_id', or 'flights' to hold and buy in one step.", field="hold_id")
        return bought.addCallback(_ticket_answer)

    async def _tickets(self, data: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        limit = _field(data, "limit", int, required=False)
        if limit is not None and not 1 <= limit <= MAX_TICKETS_LIMIT:
            raise InvalidRequest(f"Field 'limit' must be between 1 and {MAX_TICKETS_LIMIT}.", field="limit")
        cursor = _field(data, "cursor", str, required=False)
        after = None
        if cursor is not None:
            try:
                after = wire.parse_ticket_cursor(cursor)
            except ValueError:
                raise InvalidRequest("Field 'cursor' must be a 'next_cursor' from an earlier answer.", field="cursor")
        active_only = _field(data, "active_only", bool, required=False) or False
        page = await self.service.tickets(self.session, TICKETS_LIMIT if limit is None else limit, after, active_only)
        answer: dict[str, Any] = {"tickets": [wire.ticket(t) for t in page.tickets]}
        if page.after is not None:
            # Only when more follow: a history of one page answers as before.
            answer["next_cursor"] = wire.ticket_cursor(page.after)
        return answer

    async def _cancel(self, data: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        request_id = _request_id(data)
        ticket = await self.service.cancel(self.session, _field(data, "ticket_id", str), request_id)
        return {"ticket": wire.ticket(ticket)}


OPCODES: dict[int, Opcode] = {
    op.number: op
    for op in [
        Opcode(0, "ping", False, VendePassProtocol._ping),
        Opcode(1, "login", False, VendePassProtocol._login),
        Opcode(2, "routes", False, VendePassProtocol._routes),
        Opcode(3, "buy", True, VendePassProtocol._buy),
        Opcode(4, "tickets", True, VendePassProtocol._tickets),
        Opcode(5, "cancel", True, VendePassProtocol._cancel),
        Opcode(6, "hold", True, VendePassProtocol._hold),
        Opcode(7, "release", True, VendePassProtocol._release),
        Opcode(8, "seatmap", False, VendePassProtocol._seatmap),
        Opcode(9, "logout", True, VendePassProtocol._logout),
        Opcode(10, "register", False, VendePassProtocol._register),
    ]
}


@implementer(IHalfCloseableProtocol)
class _HalfCloseThrough:
    """
    A TCP half-close, passed on through a wrapper (TLS, the PROXY protocol)
    to the half-closeable protocol inside.
    """

    def __init__(self, inner: IHalfCloseableProtocol) -> None:
        self._inner = inner

    def readConnectionLost(self) -> None:
        self._inner.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self._inner.writeConnectionLost()


def _half_close_through(wrapper: ProtocolWrapper) -> _HalfCloseThrough | None:
    """
    Twisted's TCP transport asks its protocol for L{IHalfCloseableProtocol}
    by adaptation; its protocol wrappers (TLS, the PROXY protocol of
    C{haproxy:} listeners: both L{ProtocolWrapper}s) do not provide it, so a
    half-close would close the whole connection, answers unsent. Adapted
    here, a wrapper passes it on, but only to a protocol (or a further
    wrapper) that takes it: any other protocol is closed as before.
    """
    inner = IHalfCloseableProtocol(wrapper.wrappedProtocol, None)
    return None if inner is None else _HalfCloseThrough(inner)


registerAdapter(_half_close_through, ProtocolWrapper, IHalfCloseableProtocol)


class VendePassFactory(Factory):
    """
    Shared by every connection: the reservation service, the clock, and the
    connection limits.

    @ivar idle_timeout: seconds without a complete request before a
        connection is closed (C{None}: never).
    @ivar handshake_timeout: seconds a TLS connection has to finish its
        handshake before it is aborted (C{None}: no limit).
    @ivar max_connections_per_ip: connections one address may have open at once.
    @ivar max_connections: connections open at once in all; past it a new
        connection is refused as one past the per-address limit is.
    @ivar open_connections: how many are open (refused ones not counted).
    @ivar log_requests: log one (debug) event per request; off by default, as
        at thousands of requests a second the log would cost more than the
        requests (the audit table records every change of seat state anyway).
    """

    protocol = VendePassProtocol  # type: ignore[assignment]
    _log = Logger()

    def __init__(
        self,
        service: ReservationService,
        clock: IReactorTime,
        idle_timeout: float | None = None,
        max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
        log_requests: bool = False,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.open_connections = 0
        self.log_requests = log_requests
        self.service = service
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_connections_per_ip = max_connections_per_ip
        self.open_per_address: dict[str, int] = {}

    def buildProtocol(self, addr: IAddress | None) -> VendePassProtocol:
        host = str(getattr(addr, "host", addr))
        protocol = VendePassProtocol(self.service, self.clock, self.idle_timeout, self.handshake_timeout)
        protocol.factory = self
        protocol.log_requests = self.log_requests
        if self.open_connections >= self.max_connections:
            self._log.info("refused a connection from {host}: the server has too many", host=host)
            protocol.refusal = TooManyConnections(
                "The server has as many connections as it may have; try again later."
            )
        elif self.open_per_address.get(host, 0) >= self.max_connections_per_ip:
            self._log.info("refused a connection from {host}: too many", host=host)
            protocol.refusal = TooManyConnections(
                f"At most {self.max_connections_per_ip} connections from one address."
            )
        else:
            self.open_per_address[host] = self.open_per_address.get(host, 0) + 1
            self.open_connections += 1
            protocol._counted_host = host
            if self.open_connections == self.max_connections:
                self._log.warn(
                    "{count} connections open, the most allowed (--max-connections): refusing new ones",
                    count=self.open_connections,
                )
        return protocol

    def disconnected(self, host: str) -> None:
        self.open_connections -= 1
        left = self.open_per_address.get(host, 0) - 1
        if left > 0:
            self.open_per_address[host] = left
        else:
            self.open_per_address.pop(host, None)

    def __repr__(self) -> str:
        return "<VendePassFactory>"
