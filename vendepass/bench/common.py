"""
What the scenarios share: the settings of a run, logging the bench
customers in, and finding the flights of the sales window through the
protocol.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, gatherResults

from vendepass.bench.generator import DEFAULT_CONNECT, PER_ADDRESS, BenchError, Customer, Fleet, error_code
from vendepass.bench.procinfo import find_listener

OP_LOGIN, OP_ROUTES, OP_BUY, OP_TICKETS, OP_HOLD, OP_SEATMAP, OP_REGISTER = 1, 2, 3, 4, 6, 8, 10


@frozen
class Settings:
    """
    The options of one run (see C{vendepass-bench --help} and docs/performance.md).
    """

    scenario: str
    connect: str = DEFAULT_CONNECT
    also_connect: list[str] = attrs.field(factory=list)
    customers: int = 1000
    count: int = 1_000_000
    duration: float = 10.0
    timeout: float = 600.0
    mode: str = "one-step"
    flight: str | None = None
    ceiling: bool = True
    ceiling_duration: float | None = None
    check: bool = True
    db: str | None = None
    acks: str | None = None
    save_acks: str | None = None
    server_pid: int | None = None
    spread: bool = True
    per_address: int = PER_ADDRESS
    connect_concurrency: int = 0
    prefix: str = "bench"
    password: str = "bench-password"
    seed: int = 1
    seatmaps_per_search: int = 1
    json: bool = False
    progress: bool = True


@frozen
class FlightInfo:
    flight: str
    origin: str
    destination: str
    departure: datetime
    aircraft: str
    free_seats: int


async def login_all(fleet: Fleet, customers: list[Customer], prefix: str, password: str) -> list[Customer]:
    """
    Log customer I{i} in as C{<prefix><i>}, registering the account first
    when it does not exist yet, so that repeated runs reuse the accounts.

    Registering costs the server a password hash even for a taken name, so
    which accounts exist is found with a few registrations: the bench
    creates accounts in order, so they are C{<prefix>0} up to some index,
    which a binary search finds (a probe that creates an account answers
    "did not exist"). Failed logins are not used: they are rate limited per
    address.
    """
    done = [0]
    failures: dict[str, int] = fleet.connect_errors

    def credentials(customer: Customer) -> dict[str, Any]:
        return {"username": f"{prefix}{customer.index}", "password": password}

    created: set[int] = set()

    async def existed(position: int) -> bool:
        customer = customers[position]
        answer = await customer.call(OP_REGISTER, credentials(customer))
        if answer.get("ok"):
            created.add(customer.index)
        return error_code(answer) == "username_taken"

    # customers[:known] have accounts; customers[unknown:] had none.
    known, unknown = 0, len(customers)
    if customers and not await existed(unknown - 1):
        unknown -= 1
        while known < unknown:
            middle = (known + unknown) // 2
            if await existed(middle):
                known = middle + 1
            else:
                unknown = middle
    else:
        known = unknown
    fresh = {c.index for c in customers[known:]} - created

    async def one(customer: Customer) -> None:
        login = credentials(customer)
        if customer.index in fresh:
            registered = await customer.call(OP_REGISTER, login)
            if not registered.get("ok") and error_code(registered) != "username_taken":
                failures[f"register_{error_code(registered)}"] += 1
                return
        answer = await customer.call(OP_LOGIN, login)
        if customer.index not in fresh and error_code(answer) == "bad_credentials":
            # The accounts were not a prefix after all.
            await customer.call(OP_REGISTER, login)
            answer = await customer.call(OP_LOGIN, login)
        if not answer.get("ok"):
            failures[f"login_{error_code(answer)}"] += 1
            return
        customer.username = login["username"]
        done[0] += 1

    label = "login" + (f" ({len(fresh):,} new accounts registered first)" if fresh else "")
    fleet.progress.start(label, lambda: (done[0], sum(failures.values())), len(customers))
    await gatherResults([Deferred.fromCoroutine(one(c)) for c in customers])
    fleet.progress.stop()
    return [c for c in customers if c.username is not None]


async def discover(customer: Customer, include_sold_out: bool = False) -> tuple[list[str], list[FlightInfo]]:
    """
    The airports, and every flight of the sales window: a direct search
    (C{max_legs} 1, no date: the whole window) for each city pair of the
    network, pipelined on one connection.
    """
    network = await customer.ok(OP_ROUTES)
    airports = [a["code"] for a in network["airports"]]
    answers = await gatherResults(
        [
            customer.call(
                OP_ROUTES,
                {"origin": r["origin"], "destination": r["destination"], "max_legs": 1, "limit": 500,
                 "include_sold_out": include_sold_out},
            )
            for r in network["routes"]
        ]
    )
    flights: dict[str, FlightInfo] = {}
    for answer in answers:
        if not answer.get("ok"):
            raise BenchError(f"route search refused: {answer.get('error')}")
        for itinerary in answer["data"]["itineraries"]:
            leg = itinerary["legs"][0]
            flights[leg["flight"]] = FlightInfo(
                flight=leg["flight"],
                origin=leg["origin"],
                destination=leg["destination"],
                departure=datetime.fromisoformat(leg["departure"]),
                aircraft=leg["aircraft"],
                free_seats=leg["free_seats"],
            )
    return airports, sorted(flights.values(), key=lambda f: (f.departure, f.flight))


def server_pid(settings: Settings, port: int | None) -> int | None:
    if settings.server_pid is not None:
        return settings.server_pid
    return find_listener(port) if port is not None else None
