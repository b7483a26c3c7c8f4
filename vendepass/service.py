"""
The reservation rules: search, hold, buy, cancel, expiry, sessions.

Knows nothing of sockets: the protocol opens a L{Session} per connection and
calls the methods here, which return Deferreds. Time comes from an injected
L{IReactorTime}; the durable state lives in an L{IStore}.
"""

from __future__ import annotations

import bisect
import itertools
import math
import secrets
from collections import deque
from datetime import date, datetime, time, timezone
from typing import Any, Callable, Coroutine, Sequence, TypeVar
from zoneinfo import ZoneInfo

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from vendepass.errors import (
    BadCredentials,
    InvalidRequest,
    NotLoggedIn,
    PurchaseLimit,
    RateLimited,
    SessionClosed,
    StorageUnavailable,
    UnknownAirport,
    UsernameTaken,
    echo,
)
from vendepass.fixtures import USERNAME
from vendepass.model import Airport, Flight, Hold, Itinerary, Network, SeatMap, Ticket, TicketPage
from vendepass.passwords import ScryptHasher
from vendepass.schedule import Schedule
from vendepass.store import IExecutor, IStore, LegRequest
from vendepass.store.common import check_seat
from vendepass.throttle import LoginThrottle, RegistrationThrottle

T = TypeVar("T")

DEFAULT_HOLD_SECONDS = 300
DEFAULT_SALES_WINDOW_DAYS = 30
MAX_LEGS = 3
SEARCH_LIMIT = 50
MAX_SEARCH_LIMIT = 500
# Route search stops generating candidates after this many, so its work and
# memory are bounded whatever the network looks like.
MAX_CANDIDATES = 5000
# How many (origin, destination, date, legs) searches are kept worked out.
ROUTES_CACHED = 4096
# The orders a search answer may be in: by departure (the default), by
# price, by duration; ties by departure, then fewer legs, then flight ids.
SORTS = ("departure", "price", "duration")
# How many answers (of at most SEARCH_LIMIT itineraries) are kept for reuse.
ANSWERS_CACHED = 1024
SWEEP_SECONDS = 60.0
# A page of a customer's tickets: how many by default, and at most.
TICKETS_LIMIT = 50
MAX_TICKETS_LIMIT = 200
# The window of the per-customer purchase rate (max_purchases_per_minute).
PURCHASE_WINDOW_SECONDS = 60.0
RELEASE_ATTEMPTS = 5
# When a hold's timer finds it still active (the store's time runs a little
# behind), how soon it looks again.
EXPIRY_RECHECK_SECONDS = 0.25

Notify = Callable[[str, dict[str, Any]], None]


@frozen
class _Routes:
    """
    The itineraries between two airports, in answer order, and the departure
    time of the first leg of each (ascending).
    """

    paths: tuple[tuple[Flight, ...], ...]
    departs: tuple[float, ...]


_Paths = tuple[tuple[Flight, ...], ...]


def _order(path: tuple[Flight, ...]) -> tuple[Any, ...]:
    # What breaks ties in every order: departure, fewer legs, flight ids.
    return (path[0].departs_ts, len(path), tuple(f.flight_id for f in path))


_SORT_KEYS: dict[str, Callable[[tuple[Flight, ...]], tuple[Any, ...]]] = {
    "departure": lambda p: (p[0].departs_ts, p[-1].arrives_ts, sum(f.fare.cents for f in p), *_order(p)[1:]),
    "price": lambda p: (sum(f.fare.cents for f in p), *_order(p)),
    "duration": lambda p: (p[-1].arrives_ts - p[0].departs_ts, *_order(p)),
}


@frozen
class SearchPage:
    """
    One answer to a search: its itineraries, where the next page starts if
    the answer was cut at its limit (else C{None}), and the first and last
    local dates at the origin on which flights are sold now.
    """

    itineraries: list[Itinerary]
    next_offset: int | None
    sales_window: tuple[date, date]


@define(eq=False, repr=False)
class Session:
    """
    What the service knows of one connection: who is logged in on it, and
    the holds it made (they end when it closes).

    @ivar notify: called with an event name and its data, to push an event
        to this connection.
    @ivar alive: false from the moment the connection closes.
    @ivar holding: how many of its holds are on their way to or from the
        store right now.
    """

    session_id: str
    notify: Notify
    peer: str = ""
    username: str | None = None
    alive: bool = True
    holds: set[str] = field(factory=set)
    holding: int = 0

    def __repr__(self) -> str:
        return f"<Session {self.session_id} {self.username or '-'}@{self.peer}>"


def _run(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coroutine)


def _session_closed(_: object) -> Hold:
    raise SessionClosed()


class ReservationService(Service):
    """
    The seat-selling rules. Every public method returns a Deferred that fails
    with a L{vendepass.errors.VendePassError} for a refusal.
    """

    _log = Logger()

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        hasher: ScryptHasher,
        cpu: IExecutor,
        hold_seconds: float = DEFAULT_HOLD_SECONDS,
        sales_window_days: int = DEFAULT_SALES_WINDOW_DAYS,
        max_legs: int = MAX_LEGS,
        throttle: LoginThrottle | None = None,
        registrations: RegistrationThrottle | None = None,
        max_purchases_per_minute: int | None = None,
    ) -> None:
        """
        @param cpu: where password hashing runs (never the reactor thread).
        @param throttle: slows down repeated failed logins.
        @param registrations: limits registrations per address.
        @param max_purchases_per_minute: how many purchase requests (one
            step or of a hold, granted or refused) one customer may make
            in any 60 seconds on this server; C{None}: no limit. (Seats per
            customer per flight are capped in the store's transaction, so
            that cap holds across servers: L{SeatRules.max_seats_per_flight}.)
        """
        self.throttle = throttle if throttle is not None else LoginThrottle(clock)
        self.registrations = registrations if registrations is not None else RegistrationThrottle(clock)
        # Log every hold and sale (at thousands a second, the log would cost
        # more than the sales; the audit table records each of them anyway).
        self.log_sales = False
        self.store = store
        self.clock = clock
        self.hold_seconds = hold_seconds
        self.sales_window_days = sales_window_days
        self.max_legs = max_legs
        self.max_purchases_per_minute = max_purchases_per_minute
        # Per customer: when their purchase requests of the last window came.
        self._purchases: dict[str, deque[float]] = {}
        # Per customer reading their tickets now: their reads take turns.
        self._ticket_reads: dict[str, DeferredLock] = {}
        self._hasher = hasher
        self._cpu = cpu
        self._network: Network = store.network()
        self._schedule = Schedule.build(self._network, clock.seconds(), sales_window_days)
        self._schedule_day = (0.0, 0.0)
        self._routes_schedule: Schedule | None = None
        self._routes_cache: dict[tuple[str, str, date | None, int], _Routes] = {}
        # The last answer to each search, with the free seats it was made from.
        self._answers: dict[tuple[Any, ...], tuple[list[tuple[int, ...]], SearchPage]] = {}
        # The itineraries of a search in another order than departure: all
        # of them, and those not departed yet (with how many had departed
        # in departure order when they were picked out).
        self._orders: dict[tuple[Any, ...], tuple[_Paths, _Paths, int, _Paths]] = {}
        # Each airport's local day, and when it starts and ends.
        self._local_days: dict[str, tuple[float, float, date]] = {}
        self._sessions: dict[str, Session] = {}
        self._timers: dict[str, tuple[IDelayedCall, Session]] = {}
        self._sweeper: LoopingCall | None = None
        store.watch_expiries(self._expired_elsewhere)
        routes = sorted({(e.origin, e.destination) for e in self._network.timetable})
        self.routes: tuple[tuple[str, str], ...] = tuple(routes)

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.store.start()
        self._cpu.start()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(SWEEP_SECONDS, now=False).addErrback(
            lambda f: self._log.failure("hold sweeper stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for call, _ in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        self._cpu.stop()
        self.store.stop()

    @property
    def airports(self) -> dict[str, Airport]:
        return self._network.airports

    def schedule(self) -> Schedule:
        """
        The schedule of the current sales window, rebuilt when the day changes.
        """
        now = self.clock.seconds()
        # The UTC day the schedule is for, worked out once a day (every
        # request asks).
        start, end = self._schedule_day
        if not start <= now < end:
            today = datetime.fromtimestamp(now, timezone.utc).date()
            if self._schedule.first_day != date.fromordinal(today.toordinal() - 1):
                self._schedule = Schedule.build(self._network, now, self.sales_window_days)
            midnight = datetime(today.year, today.month, today.day, tzinfo=timezone.utc).timestamp()
            self._schedule_day = (midnight, midnight + 86400)
        return self._schedule

    # -- sessions -----------------------------------------------------------

    def open_session(self, notify: Notify, peer: str = "") -> Session:
        session = Session("S" + secrets.token_hex(8), notify, peer)
        self._sessions[session.session_id] = session
        return session

    def close_session(self, session: Session) -> Deferred[None]:
        """
        The connection is gone: from now on nothing may be held for it, and
        every hold it made is released at once (and again later if the
        database cannot be written now; expiry ends them in any case).
        """
        session.alive = False
        self._sessions.pop(session.session_id, None)
        return self._release_all(session).addErrback(self._retry_release, session, 1)

    def _retry_release(self, failure: Failure, session: Session, attempt: int) -> None:
        failure.trap(StorageUnavailable)
        if attempt > RELEASE_ATTEMPTS:
            self._log.warn("gave up releasing the holds of {session}; they will expire", session=session)
            return
        self._log.warn("cannot release the holds of {session} yet; trying again", session=session)

        def again() -> None:
            self.store.release_session(session.session_id).addErrback(self._retry_release, session, attempt + 1)

        self.clock.callLater(attempt * 1.0, again)

    def _release_all(self, session: Session) -> Deferred[None]:
        if not session.holds and not session.holding:
            # Nothing held, nothing on its way: no transaction (most
            # connections, health checks among them, never hold a seat).
            return succeed(None)
        for hold_id in session.holds:
            self._cancel_timer(hold_id)
        session.holds.clear()

        async def release() -> None:
            released = await self.store.release_session(session.session_id)
            for hold_id in released:
                self._log.info("released hold {hold_id} of {session}", hold_id=hold_id, session=session)

        return _run(release())

    # -- accounts -----------------------------------------------------------

    def register(self, username: str, password: str, peer: str = "") -> Deferred[str]:
        """
        @param peer: the address asking: at most so many registrations per
            address and hour, a taken name counting like a new account (so
            finding out which names are taken is as slow as registering).
        """

        async def register() -> str:
            if not USERNAME.fullmatch(username):
                raise InvalidRequest(
                    "A username has 3 to 32 characters: lowercase letters, digits and _.", field="username"
                )
            if not 8 <= len(password) <= 256:
                raise InvalidRequest("A password has 8 to 256 characters.", field="password")
            wait = self.registrations.retry_after(peer)
            if wait > 0:
                raise RateLimited(
                    f"Too many registrations from your address; try again in {math.ceil(wait)} seconds.",
                    retry_after=math.ceil(wait),
                )
            self.registrations.attempted(peer)
            # A taken name is refused before any hashing: it costs the
            # server nothing, and says no more than the answer itself.
            if await self.store.password_hash(username) is not None:
                raise UsernameTaken(f"The username {username!r} is already taken.")
            hashed = await self._cpu.submit(lambda: self._hasher.hash(password))
            await self.store.add_user(username, hashed)
            self._log.info("registered {username}", username=username)
            return username

        return _run(register())

    def login(self, session: Session, username: str, password: str) -> Deferred[str]:
        async def login() -> str:
            # A username that breaks the rule cannot exist: only the
            # address's failures count for it, and it is never stored.
            known = username if USERNAME.fullmatch(username) else None
            wait = self.throttle.retry_after(known, session.peer)
            if wait > 0:
                raise RateLimited(
                    f"Too many failed logins; try again in {math.ceil(wait)} seconds.", retry_after=math.ceil(wait)
                )
            stored = await self.store.password_hash(known) if known is not None else None
            # Verify even for an unknown user, so both take the same time.
            ok = await self._cpu.submit(lambda: self._hasher.verify(password, stored))
            if not ok:
                self.throttle.failed(known, session.peer)
                self._log.info("failed login for {username} from {peer}", username=username[:64], peer=session.peer)
                raise BadCredentials()
            assert known is not None
            self.throttle.succeeded(known, session.peer)
            if session.username != known:
                if session.username is not None:
                    await self._release_all(session)
                session.username = known
            return known

        return _run(login())

    def logout(self, session: Session) -> Deferred[None]:
        async def logout() -> None:
            self._user(session)
            session.username = None
            await self._release_all(session)

        return _run(logout())

    def _log_sale(self, format: str, id: str, username: str, seats: list[tuple[str, str]]) -> None:
        if self.log_sales:
            self._log.info(format, id=id, username=username, seats=[f"{f}/{s}" for f, s in seats])

    def _user(self, session: Session) -> str:
        if session.username is None:
            raise NotLoggedIn()
        return session.username

    # -- searching ----------------------------------------------------------

    def search(self, origin: str, destination: str, *args: Any, **kwargs: Any) -> Deferred[list[Itinerary]]:
        """
        The itineraries of L{search_page} (with the same arguments).
        """
        page = self.search_page(origin, destination, *args, **kwargs)
        return page.addCallback(lambda found: found.itineraries)

    def search_page(
        self,
        origin: str,
        destination: str,
        on: date | None = None,
        max_legs: int | None = None,
        include_sold_out: bool = False,
        limit: int = SEARCH_LIMIT,
        sort: str = "departure",
        offset: int = 0,
    ) -> Deferred[SearchPage]:
        """
        Up to C{limit} itineraries with free seats (or all, with
        C{include_sold_out}) from C{origin} to C{destination}, in the order
        C{sort} (one of L{SORTS}) over all the candidates, skipping the
        first C{offset} of them.
        """

        async def search() -> SearchPage:
            for code in (origin, destination):
                if code not in self._network.airports:
                    raise UnknownAirport(f"Unknown airport {echo(code)!r}.", airport=code)
            if sort not in SORTS:
                raise InvalidRequest(f"Field 'sort' must be one of {', '.join(SORTS)}.", field="sort")
            if not 0 <= offset <= MAX_CANDIDATES:
                raise InvalidRequest(f"Field 'offset' must be between 0 and {MAX_CANDIDATES}.", field="offset")
            legs = self.max_legs if max_legs is None else max_legs
            routes = self._routes(origin, destination, on, legs)
            now = self.clock.seconds()
            # The paths are in departure order already (the other orders are
            # worked out once, without the departed ones): skip the departed
            # ones, then ask the store for free seats a page at a time until
            # C{offset + limit} itineraries with seats are found.
            start = position = bisect.bisect_right(routes.departs, now)
            candidates: Sequence[tuple[Flight, ...]] = routes.paths
            if sort != "departure":
                candidates = self._in_order((origin, destination, on, legs, sort), routes, start, now)
                position = 0
            wanted = offset + limit
            today = self._local_day(origin, now)
            # The same question, over the same flights, with the same free
            # seats on each: the same answer, made (and encoded) once.
            key = (origin, destination, on, legs, include_sold_out, limit, start, sort, offset, today)
            answer = self._answers.get(key)
            found: list[Itinerary] = []
            pages: list[tuple[int, ...]] = []
            unused: list[tuple[Sequence[tuple[Flight, ...]], dict[str, int]]] = []
            more = False
            while len(found) < wanted and position < len(candidates):
                page = candidates[position : position + wanted]
                position += len(page)
                flights = list({f.flight_id: f for path in page for f in path}.values())
                free = await self.store.free_seats(flights)
                pages.append(tuple(free[f.flight_id] for f in flights))
                unused.append((page, free))
                if answer is not None and answer[0][: len(pages)] == pages:
                    if len(pages) == len(answer[0]):
                        return answer[1]
                    continue
                answer = None
                for page, free in unused:
                    for i, path in enumerate(page):
                        seats = tuple(free[f.flight_id] for f in path)
                        if include_sold_out or min(seats) > 0:
                            found.append(Itinerary(path, seats))
                            if len(found) == wanted:
                                # Cut, if one more of this page would be
                                # listed, or candidates are left unasked.
                                more = position < len(candidates) or any(
                                    include_sold_out or min(free[f.flight_id] for f in later) > 0
                                    for later in page[i + 1 :]
                                )
                                break
                    if len(found) == wanted:
                        break
                unused = []
            schedule = self.schedule()
            result = SearchPage(
                found[offset:] if offset else found,
                wanted if more else None,
                (max(today, schedule.first_day), schedule.last_day),
            )
            if limit <= SEARCH_LIMIT and wanted <= MAX_SEARCH_LIMIT:
                if len(self._answers) >= ANSWERS_CACHED:
                    self._answers.clear()
                self._answers[key] = (pages, result)
            return result

        return _run(search())

    def _local_day(self, airport: str, now: float) -> date:
        """
        Today at C{airport} (the first day of its sales window), worked out
        once a day there.
        """
        start, end, day = self._local_days.get(airport, (0.0, 0.0, date.min))
        if not start <= now < end:
            zone = ZoneInfo(self._network.airports[airport].timezone)
            day = datetime.fromtimestamp(now, zone).date()
            start = datetime.combine(day, time(), zone).timestamp()
            end = datetime.combine(date.fromordinal(day.toordinal() + 1), time(), zone).timestamp()
            self._local_days[airport] = (start, end, day)
        return day

    def _in_order(
        self, key: tuple[Any, ...], routes: _Routes, start: int, now: float
    ) -> _Paths:
        """
        The itineraries of C{routes} not departed by C{now} (C{start} of
        them have, in departure order), in the order C{key[-1]}.
        """
        kept = self._orders.get(key)
        if kept is None or kept[0] is not routes.paths:
            if len(self._orders) >= ROUTES_CACHED:
                self._orders.clear()
            ordered = tuple(sorted(routes.paths, key=_SORT_KEYS[key[-1]]))
            kept = (routes.paths, ordered, -1, ())
        if kept[2] != start:
            kept = (kept[0], kept[1], start, tuple(p for p in kept[1] if p[0].departs_ts > now))
            self._orders[key] = kept
        return kept[3]

    def _routes(self, origin: str, destination: str, on: date | None, max_legs: int) -> _Routes:
        """
        Every itinerary between two airports in the current schedule, worked
        out once per schedule (the timetable does not change while it
        stands) and kept in answer order: by departure, then arrival, then
        price.
        """
        schedule = self.schedule()
        if schedule is not self._routes_schedule:
            self._routes_schedule = schedule
            self._routes_cache = {}
            self._answers = {}
            self._orders = {}
        key = (origin, destination, on, max_legs)
        routes = self._routes_cache.get(key)
        if routes is None:
            paths = list(itertools.islice(schedule.search(origin, destination, -math.inf, on, max_legs), MAX_CANDIDATES))
            paths.sort(key=_SORT_KEYS["departure"])
            routes = _Routes(tuple(paths), tuple(p[0].departs_ts for p in paths))
            if len(self._routes_cache) >= ROUTES_CACHED:
                self._routes_cache.clear()
            self._routes_cache[key] = routes
        return routes

    def seatmap(self, session: Session, flight_id: str) -> Deferred[SeatMap]:
        async def seatmap() -> SeatMap:
            flight = self.schedule().flight(flight_id, self.clock.seconds())
            return SeatMap(flight, tuple(await self.store.seats(flight)))

        return _run(seatmap())

    # -- holding and buying -------------------------------------------------

    def _legs(self, flight_ids: list[str], seats: list[str | None] | None) -> list[LegRequest]:
        flights = self.schedule().itinerary(flight_ids, self.clock.seconds(), self.max_legs)
        if seats is None:
            seats = [None] * len(flights)
        if len(seats) != len(flights):
            raise InvalidRequest("Give one seat (or null) per flight in 'seats'.", field="seats")
        for flight, seat in zip(flights, seats):
            if seat is not None:
                check_seat(flight, seat)
        return [LegRequest(flight, seat) for flight, seat in zip(flights, seats)]

    def hold(
        self,
        session: Session,
        flight_ids: list[str],
        seats: list[str | None] | None = None,
        request_id: str | None = None,
    ) -> Deferred[Hold]:
        """
        Hold seats on the flights of one itinerary. With a C{request_id}
        already used by this user, the first hold is answered again.
        """

        try:
            username = self._user(session)
            legs = self._legs(flight_ids, seats)
        except Exception:
            return fail()
        asked = self.clock.seconds()
        session.holding += 1
        # No coroutine: this is the path of every purchase made in two steps.
        try:
            held = self.store.hold(
                username, session.session_id, legs, self.hold_seconds, lambda: session.alive, request_id
            )
        except Exception:
            held = fail()
        return held.addBoth(self._hold_back, session).addCallback(self._held, session, username, asked)

    def _hold_back(self, result: Any, session: Session) -> Any:
        # The hold's answer (or failure) is back from the store.
        session.holding -= 1
        return result

    def _held(self, result: Hold, session: Session, username: str, asked: float) -> Hold | Deferred[Hold]:
        if not session.alive:
            # Closed while the answer travelled back: nobody may keep it.
            return self.store.release_session(session.session_id).addCallback(_session_closed)
        if result.hold_id in self._timers:
            return result  # a retry of a hold this server already tracks
        session.holds.add(result.hold_id)
        # The hold lasts hold_seconds of the store's time from a moment
        # after `asked` (for a shared database, the database's clock,
        # which this server's clock may disagree with): look then. If
        # that is a little early, the store says it is still active.
        delay = max(0.0, asked + self.hold_seconds - self.clock.seconds())
        self._timers[result.hold_id] = (self.clock.callLater(delay, self._expire, result.hold_id, session), session)
        if self.log_sales:
            self._log_sale("hold {id} by {username}: {seats}", result.hold_id, username,
                           [(leg.flight.flight_id, leg.seat) for leg in result.legs])
        return result

    def release(self, session: Session, hold_id: str, request_id: str | None = None) -> Deferred[None]:
        try:
            username = self._user(session)
        except Exception:
            return fail()
        return self.store.release(hold_id, username, request_id).addCallback(self._released, hold_id, username)

    def _released(self, _: None, hold_id: str, username: str) -> None:
        self._forget(hold_id)
        self._log.info("released hold {hold_id} by {username}", hold_id=hold_id, username=username)

    def buy(
        self,
        session: Session,
        hold_id: str | None = None,
        flight_ids: list[str] | None = None,
        seats: list[str | None] | None = None,
        request_id: str | None = None,
    ) -> Deferred[Ticket]:
        """
        Buy a hold (C{hold_id}) or, in one step, seats on C{flight_ids}.
        With a C{request_id} already used by this user, the first purchase is
        answered again and nothing is bought twice.
        """

        try:
            username = self._user(session)
            self._count_purchase(username)
            if hold_id is not None:
                bought = self.store.buy_hold(hold_id, username, request_id)
                bought.addCallback(self._bought_hold, hold_id)
            else:
                assert flight_ids is not None
                bought = self.store.buy(username, self._legs(flight_ids, seats), request_id)
        except Exception:
            return fail()
        if self.log_sales:
            bought.addCallback(self._log_ticket, username)
        # No coroutine: this is every purchase's path.
        return bought

    def _count_purchase(self, username: str) -> None:
        """
        Count a purchase request of C{username}, or refuse it with
        L{PurchaseLimit} (and when to try again) if they made
        C{max_purchases_per_minute} in the last window already.

        Kept in this server's memory: buying is free, so the cap is a brake
        on churn (a history grown by buy and cancel, a flight's seats taken
        in a burst), not an accounting; several servers each apply it, and
        the seats one customer may have on a flight are capped in the
        store across all of them.
        """
        limit = self.max_purchases_per_minute
        if limit is None:
            return
        now = self.clock.seconds()
        times = self._purchases.get(username)
        if times is None:
            times = self._purchases[username] = deque()
        while times and times[0] <= now - PURCHASE_WINDOW_SECONDS:
            times.popleft()
        if len(times) >= limit:
            retry_after = max(1, math.ceil(times[0] + PURCHASE_WINDOW_SECONDS - now))
            raise PurchaseLimit(
                f"You may make at most {limit} purchases a minute; try again in {retry_after} s.",
                limit=limit,
                retry_after=retry_after,
            )
        times.append(now)

    def _forget_purchases(self) -> None:
        """
        Drop the customers with no purchase in the last window (at each
        sweep): the table holds only recent buyers.
        """
        old = self.clock.seconds() - PURCHASE_WINDOW_SECONDS
        for username in [u for u, times in self._purchases.items() if not times or times[-1] <= old]:
            del self._purchases[username]

    def _bought_hold(self, ticket: Ticket, hold_id: str) -> Ticket:
        self._forget(hold_id)
        return ticket

    def _log_ticket(self, ticket: Ticket, username: str) -> Ticket:
        self._log_sale("sold {id} to {username}: {seats}", ticket.ticket_id, username,
                       [(leg.flight_id, leg.seat) for leg in ticket.legs])
        return ticket

    def tickets(
        self,
        session: Session,
        limit: int = TICKETS_LIMIT,
        after: tuple[float, int] | None = None,
        active_only: bool = False,
    ) -> Deferred[TicketPage]:
        """
        A page of at most C{limit} (1 to L{MAX_TICKETS_LIMIT}) of the
        customer's tickets, newest first, after the key C{after} of the
        previous page.

        One customer's reads take turns, whatever connections they come
        on: a customer asking on many connections at once gets one read's
        share of the store and the reactor, not one per connection.
        """

        async def tickets() -> TicketPage:
            username = self._user(session)
            if not 1 <= limit <= MAX_TICKETS_LIMIT:
                raise InvalidRequest(f"Field 'limit' must be between 1 and {MAX_TICKETS_LIMIT}.", field="limit")
            turn = self._ticket_reads.get(username)
            if turn is None:
                turn = self._ticket_reads[username] = DeferredLock()
            await turn.acquire()
            try:
                return await self.store.ticket_page(username, limit, after, active_only)
            finally:
                turn.release()
                if not turn.locked and not turn.waiting:
                    del self._ticket_reads[username]

        return _run(tickets())

    def cancel(self, session: Session, ticket_id: str, request_id: str | None = None) -> Deferred[Ticket]:
        async def cancel() -> Ticket:
            username = self._user(session)
            ticket = await self.store.cancel(ticket_id, username, request_id)
            self._log.info("cancelled {ticket_id} of {username}", ticket_id=ticket_id, username=username)
            return ticket

        return _run(cancel())

    # -- expiry -------------------------------------------------------------

    def _cancel_timer(self, hold_id: str) -> None:
        entry = self._timers.pop(hold_id, None)
        if entry is not None and entry[0].active():
            entry[0].cancel()

    def _forget(self, hold_id: str) -> None:
        entry = self._timers.get(hold_id)
        self._cancel_timer(hold_id)
        if entry is not None:
            entry[1].holds.discard(hold_id)

    def _expire(self, hold_id: str, session: Session) -> None:
        self._timers.pop(hold_id, None)

        def done(state: str | None) -> None:
            if state == "active":
                # The store's time is a little behind: look again shortly.
                self._timers[hold_id] = (
                    self.clock.callLater(EXPIRY_RECHECK_SECONDS, self._expire, hold_id, session),
                    session,
                )
            elif state == "expired":
                self._expired(hold_id, session)

        def failed(failure: Failure) -> None:
            if failure.check(StorageUnavailable):
                # The database will be back: look again shortly.
                self._timers[hold_id] = (self.clock.callLater(1.0, self._expire, hold_id, session), session)
            else:
                self._log.failure("expiring hold {hold_id}", failure, hold_id=hold_id)

        self.store.expire_hold(hold_id).addCallbacks(done, failed)

    def _expired_elsewhere(self, hold_id: str, session_id: str) -> None:
        """
        The store ended a hold whose time was up (maybe on another server).
        """
        session = self._sessions.get(session_id)
        if session is not None and hold_id in session.holds:
            self._cancel_timer(hold_id)
            self._expired(hold_id, session)

    def _expired(self, hold_id: str, session: Session) -> None:
        if hold_id not in session.holds:
            return
        session.holds.discard(hold_id)
        self._log.info("hold {hold_id} of {session} expired", hold_id=hold_id, session=session)
        if session.alive:
            session.notify("hold_expired", {"hold_id": hold_id})

    def sweep(self) -> Deferred[None]:
        """
        End every hold whose time is up, whatever its timer did, and tell
        their connections.
        """
        self._forget_purchases()

        def done(expired: list[tuple[str, str]]) -> None:
            for hold_id, session_id in expired:
                self._cancel_timer(hold_id)
                session = self._sessions.get(session_id)
                if session is not None:
                    self._expired(hold_id, session)

        def failed(failure: Failure) -> None:
            if failure.check(StorageUnavailable):
                self._log.warn("cannot sweep expired holds now: the database is unavailable")
            else:
                self._log.failure("sweeping expired holds", failure)

        return self.store.expired_holds().addCallbacks(done, failed)
