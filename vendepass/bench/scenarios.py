"""
The scenarios: C{buy}, C{flash-sale}, C{browse}, C{idle}, C{ceiling} and
C{check}. Each is a coroutine taking a L{Bench} and returning a L{Report}.

The measured phases are closed loops (L{Loop}): each customer sends its next
request from the callback of its previous answer, until C{count} operations
or C{duration} seconds, whichever comes first; then the loop waits for the
requests in flight.
"""

from __future__ import annotations

import os
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Coroutine

from attrs import define
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from vendepass.bench.checks import Ack, check_invariants, load_acks, save_acks, seat_maps
from vendepass.bench.common import (
    OP_BUY,
    OP_HOLD,
    OP_LOGIN,
    OP_ROUTES,
    OP_SEATMAP,
    FlightInfo,
    Settings,
    discover,
    login_all,
    server_pid,
)
from vendepass.bench.generator import BenchError, Customer, Fleet, Message, Progress, Recorder, Target, error_code
from vendepass.bench.procinfo import ProcessStatus, read_status
from vendepass.bench.report import CheckResult, Phase, Ratios, Report

_clock = time.perf_counter
# Flights leaving sooner than this are not used: they could depart mid-run.
MARGIN = timedelta(hours=1)
SOLD_OUT = ("sold_out", "flight_departed", "unknown_flight")
UNLIMITED = 10**12


@define
class Bench:
    """
    One run: the reactor, the settings, the target and the progress line.
    """

    reactor: Any
    settings: Settings
    target: Target
    progress: Progress

    def fleet(self, target: Target | None = None) -> Fleet:
        return Fleet(self.reactor, target or self.target, self.progress)

    async def measure(self, fleet: Fleet, loop: Loop, unit: str, pid: int | None) -> Phase:
        """
        Run C{loop} as the measured phase, with a fresh recorder.
        """
        fleet.recorder = Recorder()
        before, cpu, started = read_status(pid), time.process_time(), _clock()
        self.progress.start(loop.label, loop.counts)
        await loop.run()
        self.progress.stop()
        seconds = loop.seconds if loop.seconds is not None else _clock() - started
        after = read_status(pid)
        return Phase.of(
            fleet.recorder,
            unit=unit,
            concurrency=len(loop.customers),
            seconds=seconds,
            operations=loop.completed,
            server_cpu_seconds=after.cpu_seconds - before.cpu_seconds if before and after else None,
            generator_cpu_seconds=time.process_time() - cpu,
        )

    async def customers(self, fleet: Fleet, login: bool) -> tuple[list[Customer], float]:
        """
        Connect C{--customers} customers (and log them in): those ready, and how long it took.
        """
        s = self.settings
        started = _clock()
        customers = await fleet.connect(s.customers, s.connect_concurrency)
        if not customers:
            raise BenchError(f"cannot connect to {s.connect}: {dict(fleet.connect_errors)}")
        if login:
            customers = await login_all(fleet, customers, s.prefix, s.password)
            limited = fleet.connect_errors.get("register_rate_limited", 0)
            if limited:
                # A figure for fewer customers than asked would mislead.
                raise BenchError(
                    f"{limited:,} customers could not register: the server limits registrations per address;"
                    " run the server under test with --max-registrations-per-ip 0 (and, to measure sales,"
                    " --max-purchases-per-minute 0 --max-seats-per-flight 0), or reuse accounts made before"
                )
            if not customers:
                raise BenchError(f"no customer could log in: {dict(fleet.connect_errors)}")
        return customers, _clock() - started

    async def with_ceiling(self, measured: Phase) -> tuple[Phase | None, Ratios | None]:
        if not self.settings.ceiling:
            return None, None
        duration = self.settings.ceiling_duration or min(self.settings.duration, 5.0)
        ceiling, _ = await run_ceiling(self, measured.concurrency, duration, UNLIMITED)
        return ceiling, Ratios.of(measured, ceiling)

    async def checks(self, customers: list[Customer], acks: list[Ack], extra: list[CheckResult]) -> tuple[CheckResult, ...]:
        s = self.settings
        if s.save_acks:
            save_acks(s.save_acks, acks)
        if not s.check:
            return tuple(extra)
        if s.progress:
            self.progress.stream.write(" checking the invariants...\n")
        return tuple(extra) + tuple(await check_invariants(self.reactor, customers, acks, db=s.db))


class Loop:
    """
    A closed loop over C{customers}: subclasses send each customer's next
    request in L{step}, after calling L{may_start} (which parks the customer
    once the loop is done), and count finished operations in C{completed}
    (by default L{answered}: the successful answers).
    """

    label = "run"

    def __init__(self, bench: Bench, customers: list[Customer], count: int, duration: float) -> None:
        self.reactor = bench.reactor
        self.customers = customers
        self.count = count
        self.duration = duration
        self.rng = random.Random(bench.settings.seed)
        self.completed = 0
        self.inflight = 0
        self.stopping = False
        self.seconds: float | None = None
        self.done: Deferred[None] = Deferred()
        self.recorder = Recorder()
        self._active = 0
        self._timer: IDelayedCall | None = None

    def counts(self) -> tuple[int, int]:
        return self.completed, sum(self.recorder.errors.values())

    def run(self) -> Deferred[None]:
        if self.customers:
            self.recorder = self.customers[0].fleet.recorder
        self._active = len(self.customers)
        self._timer = self.reactor.callLater(self.duration, self.stop)
        for customer in list(self.customers):
            self.step(customer)
        if not self._active and not self.done.called:
            self._finish()
        return self.done

    def stop(self) -> None:
        self.stopping = True

    def may_start(self, customer: Customer) -> bool:
        if self.stopping or not customer.connected or self.completed + self.inflight >= self.count:
            self._active -= 1
            if self._active == 0:
                self._finish()
            return False
        return True

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.done.callback(None)

    def step(self, customer: Customer) -> None:
        raise NotImplementedError()

    def answered(self, customer: Customer, answer: Message) -> None:
        self.inflight -= 1
        if answer.get("ok"):
            self.completed += 1
        else:
            self.recorder.error(answer)
        self.step(customer)


class BuyLoop(Loop):
    """
    Buy one seat at a time (the server picks it) on the customer's flight;
    on C{sold_out} the flight is dropped and the customer moves to another.
    """

    label = "buy"

    def __init__(self, bench: Bench, customers: list[Customer], flights: list[str]) -> None:
        s = bench.settings
        super().__init__(bench, customers, s.count, s.duration)
        self.mode = s.mode
        self.live = list(flights)
        self.acks: list[Ack] = []
        for customer in customers:
            customer.state = flights[customer.index % len(flights)]

    def step(self, customer: Customer) -> None:
        if not self.live:
            self.stopping = True
        if not self.may_start(customer):
            return
        self.inflight += 1
        data = {"flights": [customer.state]}
        if self.mode == "one-step" or (self.mode == "mixed" and self.rng.random() < 0.5):
            customer.request(OP_BUY, data, self.bought, "buy")
        else:
            customer.request(OP_HOLD, data, self.held, "hold")

    def held(self, customer: Customer, answer: Message) -> None:
        if answer.get("ok"):
            customer.request(OP_BUY, {"hold_id": answer["data"]["hold"]["hold_id"]}, self.bought, "buy_hold")
        else:
            self.bought(customer, answer)

    def bought(self, customer: Customer, answer: Message) -> None:
        self.inflight -= 1
        if answer.get("ok"):
            self.completed += 1
            self.acks.append(Ack.of(customer.username or "", answer["data"]["ticket"]))
        else:
            code = self.recorder.error(answer)
            if code in SOLD_OUT:
                if customer.state in self.live:
                    self.live.remove(customer.state)
                if self.live:
                    customer.state = self.live[self.rng.randrange(len(self.live))]
            elif code == "purchase_limit":
                # This customer may buy no more now: on this flight (it has
                # as many seats as one customer may), or for a while (its
                # purchases per minute). A real customer goes elsewhere, or
                # waits; it does not ask again at once, flat out.
                retry_after = (answer.get("error") or {}).get("retry_after")
                if isinstance(retry_after, (int, float)) and not self.stopping:
                    self.reactor.callLater(max(float(retry_after), 0.1), self.step, customer)
                    return
                if self.live:
                    customer.state = self.live[self.rng.randrange(len(self.live))]
        self.step(customer)


class BrowseLoop(Loop):
    """
    A route search between two random airports over the whole sales window,
    then C{seatmaps_per_search} seat maps of random flights, and again.
    """

    label = "browse"

    def __init__(self, bench: Bench, customers: list[Customer], airports: list[str], flights: list[str]) -> None:
        s = bench.settings
        super().__init__(bench, customers, s.count, s.duration)
        self.airports, self.flights, self.cycle = airports, flights, 1 + s.seatmaps_per_search
        for customer in customers:
            customer.state = 0

    def step(self, customer: Customer) -> None:
        if not self.may_start(customer):
            return
        self.inflight += 1
        position, customer.state = customer.state, (customer.state + 1) % self.cycle
        if position == 0:
            origin, destination = self.rng.sample(self.airports, 2)
            customer.request(OP_ROUTES, {"origin": origin, "destination": destination}, self.answered, "routes")
        else:
            customer.request(OP_SEATMAP, {"flight": self.rng.choice(self.flights)}, self.answered, "seatmap")


class EchoLoop(Loop):
    """
    The ceiling: the same closed loop, against the echo server.
    """

    label = "ceiling"
    PAYLOAD = {"flights": ["VP1203-2026-12-01"]}

    def step(self, customer: Customer) -> None:
        if self.may_start(customer):
            self.inflight += 1
            customer.request(OP_BUY, self.PAYLOAD, self.answered, "echo")


class FlashLoop(Loop):
    """
    Every customer sends one buy for the same flight at the same moment
    (the writes leave in one reactor iteration); wait for every answer, or
    for C{duration} seconds.
    """

    label = "flash-sale"

    def __init__(self, bench: Bench, customers: list[Customer], flight: str) -> None:
        super().__init__(bench, customers, len(customers), bench.settings.duration)
        self.flight = flight
        self.acks: list[Ack] = []  # completed counts the answers, acks the sales
        self.lost = 0  # connections lost before their answer
        self.sent_at = self.first = self.last = 0.0

    def run(self) -> Deferred[None]:
        self.recorder = self.customers[0].fleet.recorder
        self._timer = self.reactor.callLater(self.duration, self._finish)
        self.sent_at = _clock()
        for customer in self.customers:
            customer.request(OP_BUY, {"flights": [self.flight]}, self.answer, "buy")
        return self.done

    def answer(self, customer: Customer, answer: Message) -> None:
        if not answer.get("ok") and self.recorder.error(answer) == "connection_lost":
            self.lost += 1
        else:
            now = _clock()
            self.first = self.first or now
            self.last = now
            self.completed += 1
            if answer.get("ok"):
                self.acks.append(Ack.of(customer.username or "", answer["data"]["ticket"]))
        if self.completed + self.lost == len(self.customers) and not self.done.called:
            self.seconds = self.last - self.sent_at
            self._finish()

    def _finish(self) -> None:
        if not self.done.called:
            super()._finish()


def _future(flights: list[FlightInfo]) -> list[FlightInfo]:
    soon = datetime.now(timezone.utc) + MARGIN
    return [f for f in flights if f.departure > soon]


def _report(bench: Bench, fleet: Fleet | None, **fields: Any) -> Report:
    fields.setdefault("customers", bench.settings.customers)
    fields.setdefault("connected", len(fleet.customers) if fleet else 0)
    fields.setdefault("connect_errors", dict(sorted(fleet.connect_errors.items())) if fleet else {})
    for name in ("logged_in", "setup_seconds", "measure", "server", "ceiling", "ratios"):
        fields.setdefault(name, None)
    fields.setdefault("figures", {})
    if fleet is not None and fleet.events:
        fields["figures"]["events"] = ", ".join(f"{name} {n:,}" for name, n in sorted(fleet.events.items()))
    fields.setdefault("checks", ())
    if fields["setup_seconds"] is not None:
        fields["setup_seconds"] = round(fields["setup_seconds"], 3)
    fields.setdefault("target", bench.settings.connect)
    return Report(scenario=bench.settings.scenario, **fields)


async def buy(bench: Bench) -> Report:
    s = bench.settings
    fleet = bench.fleet()
    pid = server_pid(s, bench.target.port)
    customers, setup = await bench.customers(fleet, login=True)
    _, flights = await discover(customers[0])
    live = [f.flight for f in _future(flights) if f.free_seats > 0]
    if not live:
        raise BenchError("no flight of the sales window has a free seat")
    loop = BuyLoop(bench, customers, live)
    measured = await bench.measure(fleet, loop, "purchases", pid)
    server = read_status(pid)
    checks = await bench.checks(customers, loop.acks, [])
    fleet.close()
    ceiling, ratios = await bench.with_ceiling(measured)
    figures = {"mode": s.mode, "flights": len(live), "flights_sold_out": len(live) - len(loop.live)}
    return _report(bench, fleet, logged_in=len(customers), setup_seconds=setup, measure=measured, figures=figures,
                   server=server, ceiling=ceiling, ratios=ratios, checks=checks)


async def flash_sale(bench: Bench) -> Report:
    s = bench.settings
    fleet = bench.fleet()
    pid = server_pid(s, bench.target.port)
    customers, setup = await bench.customers(fleet, login=True)
    flight = s.flight
    if flight is None:
        _, flights = await discover(customers[0])
        candidates = sorted(_future(flights), key=lambda f: (-f.free_seats, f.departure))
        if not candidates or not candidates[0].free_seats:
            raise BenchError("no flight of the sales window has a free seat")
        flight = candidates[0].flight
    before = await customers[0].ok(OP_SEATMAP, {"flight": flight})
    free_before = sum(seat["status"] == "free" for seat in before["seats"])
    sold_before = sum(seat["status"] == "sold" for seat in before["seats"])
    loop = FlashLoop(bench, customers, flight)
    measured = await bench.measure(fleet, loop, "answers", pid)
    server = read_status(pid)
    after = (await seat_maps(customers, [flight]))[flight]
    sold_after = sum(seat["status"] == "sold" for seat in after["data"]["seats"]) if after.get("ok") else None
    sold, answered, sent = len(loop.acks), loop.completed, len(customers)
    expected = min(sent, free_before)
    checks = [
        CheckResult.of("flash_sale_sold", f"{sold:,} sold to {sent:,} customers, {free_before:,} seats free before",
                       [] if sold == expected and sold_after == sold_before + sold else
                       [f"{sold:,} acknowledged and {sold_after} sold on the seat map (before: {sold_before:,});"
                        f" expected {expected:,}"]),
        CheckResult.of("everyone_answered", f"{answered:,} of {sent:,} answered",
                       [] if answered == sent else [f"{sent - answered:,} never answered"]),
    ]
    all_checks = await bench.checks(customers, loop.acks, checks)
    fleet.close()
    ceiling, ratios = await bench.with_ceiling(measured)
    ms = 1000.0
    figures = {
        "flight": flight,
        "capacity": len(before["seats"]),
        "free_before": free_before,
        "sent": sent,
        "answered": answered,
        "sold": sold,
        "refused": ", ".join(f"{c} {n:,}" for c, n in measured.errors.items()) or "none",
        "first_answer_ms": round((loop.first - loop.sent_at) * ms, 3) if loop.first else None,
        "last_answer_ms": round((loop.last - loop.sent_at) * ms, 3) if loop.last else None,
        "spread_ms": round((loop.last - loop.first) * ms, 3),
    }
    return _report(bench, fleet, logged_in=len(customers), setup_seconds=setup, measure=measured, figures=figures,
                   server=server, ceiling=ceiling, ratios=ratios, checks=all_checks)


async def browse(bench: Bench) -> Report:
    fleet = bench.fleet()
    pid = server_pid(bench.settings, bench.target.port)
    customers, setup = await bench.customers(fleet, login=False)
    airports, flights = await discover(customers[0])
    future = [f.flight for f in _future(flights)]
    if len(airports) < 2 or not future:
        raise BenchError("the airline has no flights to browse")
    loop = BrowseLoop(bench, customers, airports, future)
    measured = await bench.measure(fleet, loop, "requests", pid)
    server = read_status(pid)
    fleet.close()
    ceiling, ratios = await bench.with_ceiling(measured)
    figures = {f"{name}_per_second": measured.by_op[op].per_second if op in measured.by_op else 0.0
               for op, name in (("routes", "searches"), ("seatmap", "seatmaps"))}
    return _report(bench, fleet, setup_seconds=setup, measure=measured, figures=figures, server=server,
                   ceiling=ceiling, ratios=ratios)


async def idle(bench: Bench) -> Report:
    s = bench.settings
    fleet = bench.fleet()
    pid = server_pid(s, bench.target.port)
    before = read_status(pid)
    started = _clock()
    customers = await fleet.connect(s.customers, s.connect_concurrency, label="idle connect")
    setup = _clock() - started
    if not customers:
        raise BenchError(f"cannot connect to {s.connect}: {dict(fleet.connect_errors)}")
    if s.progress:
        bench.progress.stream.write(f" holding {len(customers):,} idle connections for {s.duration:g} s\n")
    await deferLater(bench.reactor, s.duration, lambda: None)
    after = read_status(pid)
    still_open = sum(c.connected for c in customers)
    fleet.close()
    figures: dict[str, Any] = {"hold_seconds": s.duration, "open_after_hold": still_open}
    if before and after:
        figures.update(
            rss_before_kb=before.rss_kb,
            rss_after_kb=after.rss_kb,
            bytes_per_connection=round((after.rss_kb - before.rss_kb) * 1024 / len(customers)),
            peak_rss_kb=after.peak_rss_kb,
            threads_before=before.threads,
            threads_after=after.threads,
        )
    else:
        figures["bytes_per_connection"] = "unknown (no readable server pid: --server-pid)"
    return _report(bench, fleet, setup_seconds=setup, figures=figures, server=after)


async def ceiling(bench: Bench) -> Report:
    s = bench.settings
    phase, echo = await run_ceiling(bench, s.customers, s.duration, s.count)
    return _report(bench, None, connected=phase.concurrency, measure=phase, server=echo,
                   target="the echo server (python -m vendepass.bench.echo)")


async def check(bench: Bench) -> Report:
    """
    C{vendepass-bench check}: log in as the bench customers (C{--customers}
    of them, and the owners of C{--acks}), check the invariants on the seat
    maps of every flight of the sales window, and the database with C{--db}.
    """
    s = bench.settings
    acks = load_acks(s.acks) if s.acks else []
    users = sorted({a.username for a in acks} | {f"{s.prefix}{i}" for i in range(s.customers)})
    fleet = bench.fleet()
    customers = await fleet.connect(max(1, len(users)), s.connect_concurrency)
    if not customers:
        raise BenchError(f"cannot connect to {s.connect}: {dict(fleet.connect_errors)}")
    answers = await gatherResults(
        [c.call(OP_LOGIN, {"username": u, "password": s.password}) for c, u in zip(customers, users)]
    )
    refused = [f"{username} cannot log in: no connection" for username in users[len(customers):]]
    for customer, username, answer in zip(customers, users, answers):
        if answer.get("ok"):
            customer.username = username
        else:
            refused.append(f"{username} cannot log in: {error_code(answer)}")
    _, flights = await discover(customers[0], include_sold_out=True)
    checks = [CheckResult.of("logins", f"{len(users) - len(refused):,} of {len(users):,} customers logged in", refused)]
    checks += await check_invariants(bench.reactor, customers, acks, flights=[f.flight for f in flights], db=s.db)
    fleet.close()
    return _report(bench, fleet, customers=len(users), logged_in=len(users) - len(refused), checks=tuple(checks),
                   server=read_status(server_pid(s, bench.target.port)))


class _EchoProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.port: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"\n" in self._out and not self.port.called:
            self.port.callback(int(self._out.split(b"\n")[0]))

    def errReceived(self, data: bytes) -> None:
        self._err += data

    def processEnded(self, reason: Failure) -> None:
        if not self.port.called:
            self.port.errback(BenchError(f"the echo server did not start: {self._err.decode(errors='replace')}"))
        self.ended.callback(None)


async def run_ceiling(bench: Bench, concurrency: int, duration: float, count: int) -> tuple[Phase, ProcessStatus | None]:
    """
    Start the echo server (C{python -m vendepass.bench.echo}), drive it with
    C{concurrency} customers through the same generator, and stop it: the
    measured phase, and the echo server's status at its end.
    """
    echo = _EchoProcess()
    process = bench.reactor.spawnProcess(
        echo, sys.executable, [sys.executable, "-m", "vendepass.bench.echo"], env=dict(os.environ)
    )
    try:
        port = await echo.port
        target = Target(f"tcp:127.0.0.1:{port}", "127.0.0.1", port, bench.target.spread, bench.target.per_address)
        fleet = bench.fleet(target)
        customers = await fleet.connect(concurrency, bench.settings.connect_concurrency, label="ceiling connect")
        if not customers:
            raise BenchError(f"cannot connect to the echo server: {dict(fleet.connect_errors)}")
        loop = EchoLoop(bench, customers, count, duration)
        phase = await bench.measure(fleet, loop, "requests", process.pid)
        status = read_status(process.pid)
        fleet.close()
        return phase, status
    finally:
        if not echo.ended.called:
            process.signalProcess("TERM")
        await echo.ended


SCENARIOS: dict[str, Callable[[Bench], Coroutine[Any, Any, Report]]] = {
    "buy": buy,
    "flash-sale": flash_sale,
    "browse": browse,
    "idle": idle,
    "ceiling": ceiling,
    "check": check,
}
