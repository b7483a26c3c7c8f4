"""
Errors of the reservation service and of the wire protocol.

Every error a customer can see is a L{VendePassError} with a stable snake_case
C{code}; the protocol turns it into C{{"ok": false, "error": {"code", "message"}}}.
The codes are part of the public contract in docs/protocol.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

# Text a customer sent is echoed in errors (messages and fields) with at
# most this many characters.
ECHO_CHARACTERS = 64


def echo(value: str) -> str:
    """
    C{value}, sent by a customer, as an error may repeat it: whole if it
    has at most L{ECHO_CHARACTERS} characters, else its beginning and an
    ellipsis, L{ECHO_CHARACTERS} characters in all. Every echo of a
    customer's text in an error goes through here, so that no answer to a
    request grows with what the request held.
    """
    if len(value) <= ECHO_CHARACTERS:
        return value
    return value[: ECHO_CHARACTERS - 1] + "\u2026"


class VendePassError(Exception):
    """
    A refusal the customer should see, with a stable machine-readable code.

    @ivar code: the stable snake_case code sent on the wire.
    @ivar message: a sentence for humans.
    @ivar details: extra JSON-serialisable fields sent beside code and message.
    """

    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "Internal error."

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message if message is not None else self.default_message
        self.details = details
        super().__init__(self.message)

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        # A field naming what the request held (a flight, a seat, a hold id)
        # is echoed shortened.
        error.update((k, echo(v) if isinstance(v, str) else v) for k, v in self.details.items())
        return error


class MalformedJSON(VendePassError):
    code = "malformed_json"
    default_message = "The line is not valid UTF-8 JSON."


class InvalidRequest(VendePassError):
    code = "invalid_request"
    default_message = "The request is not valid."


class UnknownOpcode(VendePassError):
    code = "unknown_opcode"
    default_message = "Unknown opcode."


class LineTooLong(VendePassError):
    code = "line_too_long"
    default_message = "The line is longer than the limit; closing the connection."


class NotLoggedIn(VendePassError):
    code = "not_logged_in"
    default_message = "Log in first."


class BadCredentials(VendePassError):
    code = "bad_credentials"
    default_message = "Wrong username or password."


class UsernameTaken(VendePassError):
    code = "username_taken"
    default_message = "That username is already taken."


class UnknownAirport(VendePassError):
    code = "unknown_airport"
    default_message = "Unknown airport."


class UnknownFlight(VendePassError):
    code = "unknown_flight"
    default_message = "Unknown flight."


class UnknownSeat(VendePassError):
    code = "unknown_seat"
    default_message = "That seat does not exist on this flight."


class InvalidItinerary(VendePassError):
    code = "invalid_itinerary"
    default_message = "These flights do not form one itinerary."


class SeatUnavailable(VendePassError):
    code = "seat_unavailable"
    default_message = "That seat is not available."


class SoldOut(VendePassError):
    code = "sold_out"
    default_message = "No free seat left on this flight."


class HoldNotFound(VendePassError):
    code = "hold_not_found"
    default_message = "No such hold."


class HoldExpired(VendePassError):
    code = "hold_expired"
    default_message = "The hold has expired; its seats are free again."


class TicketNotFound(VendePassError):
    code = "ticket_not_found"
    default_message = "No such ticket."


class AlreadyCancelled(VendePassError):
    code = "already_cancelled"
    default_message = "This ticket is already cancelled."


class FlightDeparted(VendePassError):
    code = "flight_departed"
    default_message = "This flight has already departed."


class TooManyHolds(VendePassError):
    code = "too_many_holds"
    default_message = "You are holding too many seats; buy or release some first."


class PurchaseLimit(VendePassError):
    """
    A customer passed a purchase cap: seats on one flight (C{limit},
    C{flight}), or purchases in a time window (C{limit}, C{retry_after}).
    """

    code = "purchase_limit"
    default_message = "You have reached a purchase limit."


class TooManyConnections(VendePassError):
    code = "too_many_connections"
    default_message = "Too many connections from your address."


class RateLimited(VendePassError):
    code = "rate_limited"
    default_message = "Too many attempts; wait before trying again."


class StorageUnavailable(VendePassError):
    """
    The database could not be written or read (disk full, locked, I/O
    error). The request's transaction was rolled back; the server goes on
    and recovers by itself when the fault clears.
    """

    code = "storage_unavailable"
    default_message = "The ticket database is unavailable right now; nothing was changed. Please try again shortly."


class OutcomeUnknown(StorageUnavailable):
    """
    The connection to the database was lost at or after the request's
    COMMIT was sent: it may have been done or not, and the server could not
    find out. A retry with the same C{request_id} answers its real outcome
    (done once); a request without one should be checked (C{tickets})
    before it is tried again. A kind of L{StorageUnavailable} for the
    server's own retries (releases, expiries), never for the customer.
    """

    code = "outcome_unknown"
    default_message = (
        "The connection to the ticket database was lost while this request was being saved: it may or may not"
        " have been done. Retry with the same request_id to learn its outcome (or check your tickets)."
    )


class SessionClosed(VendePassError):
    """
    The connection that asked for this is gone: its work is undone.
    Never reaches a client (there is no one to send it to).
    """

    code = "session_closed"
    default_message = "The connection is closed."


class InternalError(VendePassError):
    code = "internal_error"
    default_message = "Internal error; the request had no effect."


class FixturesError(Exception):
    """
    A fixtures file is not valid; the message names the problem.
    """
