"""
Seat storage: one interface, one module per backend.

Every change of seat state is one atomic transaction with conditional
updates; the store runs its blocking work on an L{IExecutor}, never on the
reactor thread.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from vendepass.model import Flight, Hold, Network, SeatState, Ticket, TicketPage

T = TypeVar("T")


class IExecutor(Interface):
    """
    Runs blocking jobs (database transactions) away from the reactor.
    """

    def submit(job: Callable[[], T]) -> Deferred[T]:
        """
        Run C{job}; the Deferred fires (on the reactor thread) with its result
        or fails with its exception.

        A job may itself submit the job to run after it (the SQLite writer
        sends its next batch so).
        """

    def start() -> None:
        """
        Start accepting jobs.
        """

    def stop() -> None:
        """
        Finish the queued jobs and stop.
        """


@implementer(IExecutor)
class ThreadExecutor:
    """
    Runs jobs on dedicated threads. With one thread (the default) jobs run
    one at a time and in order: the single writer of an embedded database.
    """

    def __init__(self, reactor: IReactorThreads, name: str = "vendepass-db", threads: int = 1) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=threads, maxthreads=threads, name=name)

    def submit(self, job: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, job)

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()


@implementer(IExecutor)
class InlineExecutor:
    """
    Runs each job at once on the calling thread. For tools that have no
    reactor running, and for tests that drive a real store synchronously.
    """

    def submit(self, job: Callable[[], T]) -> Deferred[T]:
        try:
            result = job()
        except BaseException:
            return fail(Failure())
        return succeed(result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@frozen
class LegRequest:
    """
    One leg of a hold or purchase: a flight and a chosen seat, or C{None} to
    let the store pick the first free seat.
    """

    flight: Flight
    seat: str | None


class IStore(Interface):
    """
    The durable state of VendePass. Methods return Deferreds; the ones that
    change seats are each one atomic transaction. C{now} in the store is the
    time of the injected clock read inside the transaction; with the SQLite
    writer in a process of its own, read when its batch is sent to it (see
    docs/reliability.md, "The writer in a process of its own").
    """

    def start() -> None:
        """
        Start the store's executor.
        """

    def stop() -> None:
        """
        Stop the store after its queued work.
        """

    def network() -> Network:
        """
        The airline loaded at creation (synchronous: read once at open).
        """

    def add_user(username: str, password_hash: str) -> Deferred[None]:
        """
        Create a customer account. Fails with L{vendepass.errors.UsernameTaken}.
        """

    def password_hash(username: str) -> Deferred[str | None]:
        """
        The stored password hash of C{username}, or C{None} if there is no such user.
        """

    def hold(
        username: str,
        session_id: str,
        legs: list[LegRequest],
        seconds: float,
        alive: Callable[[], bool],
        request_id: str | None = None,
    ) -> Deferred[Hold]:
        """
        Hold a seat on every leg, all or nothing, for C{seconds} of the
        store's time: the hold expires C{seconds} after the store's C{now}
        in the transaction that makes it (the database's clock, for a
        store shared by several servers).

        Every changing method takes an optional C{request_id}: if
        C{username} already did that request, it is not done again and the
        first outcome is returned. Refusals are not recorded (they changed
        nothing). Reusing a C{request_id} for another kind of operation fails
        with L{vendepass.errors.InvalidRequest}. Fails with
        L{vendepass.errors.SeatUnavailable}, L{vendepass.errors.SoldOut},
        L{vendepass.errors.FlightDeparted}, or L{vendepass.errors.SessionClosed}
        if C{alive()} is false when the transaction runs.
        """

    def release(hold_id: str, username: str, request_id: str | None = None) -> Deferred[None]:
        """
        Release an active hold of C{username}. Fails with
        L{vendepass.errors.HoldNotFound} or L{vendepass.errors.HoldExpired}.
        """

    def release_session(session_id: str) -> Deferred[list[str]]:
        """
        Release every active hold made on a session; fires with their ids.
        """

    def expire_hold(hold_id: str) -> Deferred[str | None]:
        """
        End the hold if its time is up; fires with its state afterwards
        (C{"expired"}, C{"active"}, C{"bought"}, C{"released"}) or C{None}
        if there is no such hold.
        """

    def expired_holds() -> Deferred[list[tuple[str, str]]]:
        """
        End every hold whose time is up; fires with C{(hold_id, session_id)} pairs.
        """

    def buy_hold(hold_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        """
        Turn an active, unexpired hold of C{username} into a ticket. Fails with
        L{vendepass.errors.HoldNotFound}, L{vendepass.errors.HoldExpired} or
        L{vendepass.errors.FlightDeparted}.
        """

    def buy(username: str, legs: list[LegRequest], request_id: str | None = None) -> Deferred[Ticket]:
        """
        Hold and buy in one step, all or nothing; fails like L{IStore.hold}.
        """

    def tickets(username: str) -> Deferred[list[Ticket]]:
        """
        Every ticket of C{username}, oldest first (for tools and tests: a
        customer's request reads a L{ticket_page}).
        """

    def ticket_page(
        username: str, limit: int, after: tuple[float, int] | None = None, active_only: bool = False
    ) -> Deferred[TicketPage]:
        """
        At most C{limit} tickets of C{username} (only active ones if
        C{active_only}), newest first: by purchase time, then order of sale.
        C{after} is the C{after} of the previous page. A read: it never
        waits behind purchases (a store with one writer reads on a
        connection of its own).
        """

    def cancel(ticket_id: str, username: str, request_id: str | None = None) -> Deferred[Ticket]:
        """
        Cancel an active ticket of C{username} and free its seats. Fails with
        L{vendepass.errors.TicketNotFound} (also for another user's ticket),
        L{vendepass.errors.AlreadyCancelled} or L{vendepass.errors.FlightDeparted}.
        """

    def seats(flight: Flight) -> Deferred[list[SeatState]]:
        """
        The state of every seat of a flight, in seat map order.
        """

    def free_seats(flights: list[Flight]) -> Deferred[dict[str, int]]:
        """
        The number of free seats of each flight, by flight id.
        """

    def watch_expiries(callback: Callable[[str, str], None]) -> None:
        """
        Call C{callback(hold_id, session_id)} on the reactor thread after
        each transaction that ended a hold because its time was up, wherever
        that was noticed: by this process or, for a shared database, by any
        server. A hold may be reported more than once.
        """



__all__ = ["IExecutor", "IStore", "InlineExecutor", "LegRequest", "ThreadExecutor"]
