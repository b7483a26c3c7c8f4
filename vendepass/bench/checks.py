"""
The invariants, checked at the end of a run through the protocol, and in
the database with C{vendepass-admin verify} when its path is known:

- C{seat_maps}: every seat map is well formed and sells at most its capacity;
- C{purchases_sold}: every acknowledged purchase, and every active ticket the
  bench customers list, has its seats sold on its flights' seat maps;
- C{seat_once}: no (flight, seat) is in two active tickets;
- C{tickets_listed}: each customer's C{tickets} lists every purchase
  acknowledged to them, active, with the same seats;
- C{admin_verify}: the audit log replayed against the database finds nothing.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.utils import getProcessOutputAndValue

from vendepass.bench.common import OP_SEATMAP, OP_TICKETS
from vendepass.bench.generator import BenchError, Customer, Message, error_code
from vendepass.bench.report import CheckResult
from vendepass.client.protocol import TICKET_PAGE_LIMIT

Seat = tuple[str, str]  # (flight id, seat)
UNAVAILABLE = ("flight_departed", "unknown_flight")


@frozen
class Ack:
    """
    A purchase the server acknowledged to a bench customer.
    """

    username: str
    ticket_id: str
    seats: tuple[Seat, ...]

    @classmethod
    def of(cls, username: str, ticket: Message) -> Ack:
        return cls(username, ticket["ticket_id"], _seats_of(ticket))


def save_acks(path: str, acks: Iterable[Ack]) -> None:
    Path(path).write_text(
        json.dumps([{"username": a.username, "ticket_id": a.ticket_id, "seats": a.seats} for a in acks]) + "\n"
    )


def load_acks(path: str) -> list[Ack]:
    try:
        saved = json.loads(Path(path).read_text())
        return [Ack(a["username"], a["ticket_id"], tuple((f, s) for f, s in a["seats"])) for a in saved]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"cannot read the acknowledged purchases in {path}: {e!r}")


def _seats_of(ticket: Message) -> tuple[Seat, ...]:
    return tuple((leg["flight"], leg["seat"]) for leg in ticket["legs"])


async def seat_maps(customers: Sequence[Customer], flights: Iterable[str]) -> dict[str, Message]:
    """
    The seat map of each flight (or the refusal), spread over the connections and pipelined.
    """
    wanted = sorted(set(flights))
    answers = await gatherResults(
        [customers[i % len(customers)].call(OP_SEATMAP, {"flight": f}) for i, f in enumerate(wanted)]
    )
    return dict(zip(wanted, answers))


# The pages a check reads of one customer's tickets, at most (200,000 tickets).
BENCH_TICKET_PAGES = 1000


async def _every_ticket(customer: Customer) -> Message:
    """
    The customer's C{tickets} answer with every page's tickets (or the
    first refusal): the cursors followed, at most 1,000 pages.
    """
    tickets: list[Message] = []
    data: Message = {"limit": TICKET_PAGE_LIMIT}
    for _ in range(BENCH_TICKET_PAGES):
        answer = await customer.call(OP_TICKETS, data)
        if not answer.get("ok"):
            return answer
        tickets += answer["data"]["tickets"]
        cursor = answer["data"].get("next_cursor")
        if cursor is None:
            break
        data = {"limit": TICKET_PAGE_LIMIT, "cursor": cursor}
    return {"ok": True, "data": {"tickets": tickets}}


async def check_invariants(
    reactor: Any,
    customers: Sequence[Customer],
    acks: Sequence[Ack],
    *,
    flights: Iterable[str] = (),
    db: str | None = None,
) -> list[CheckResult]:
    """
    Check the invariants through C{customers} (connections; those logged in
    list their tickets), for the purchases C{acks} acknowledged to them, on
    the seat maps of C{flights} and of every flight of those tickets; and
    in the database at C{db} when given.
    """
    results = []
    listed: dict[str, list[Message]] = {}
    logged_in = [c for c in customers if c.username is not None]
    answers: list[Message] = await gatherResults([Deferred.fromCoroutine(_every_ticket(c)) for c in logged_in])
    problems = []
    for customer, answer in zip(logged_in, answers):
        assert customer.username is not None
        if answer.get("ok"):
            listed[customer.username] = answer["data"]["tickets"]
        else:
            problems.append(f"cannot list the tickets of {customer.username}: {error_code(answer)}")

    # Every active ticket we know of: acknowledged, or listed by its owner.
    active: dict[str, tuple[str, tuple[Seat, ...]]] = {a.ticket_id: (a.username, a.seats) for a in acks}
    for username, tickets in listed.items():
        for ticket in tickets:
            if ticket["status"] == "active":
                active.setdefault(ticket["ticket_id"], (username, _seats_of(ticket)))

    maps = await seat_maps(customers, [*flights, *(f for _, seats in active.values() for f, _ in seats)])
    status: dict[Seat, str] = {}
    map_problems, skipped, sold, capacity = [], 0, 0, 0
    for flight, answer in maps.items():
        if not answer.get("ok"):
            if error_code(answer) in UNAVAILABLE:
                skipped += 1
            else:
                map_problems.append(f"seat map of {flight}: {error_code(answer)}")
            continue
        data = answer["data"]
        labels = Counter(s["seat"] for s in data["seats"])
        expected = data["rows"] * len(data["letters"])
        flight_sold = sum(s["status"] == "sold" for s in data["seats"])
        for label, n in labels.items():
            if n > 1:
                map_problems.append(f"seat {label} on {flight} appears {n} times in its seat map")
        if len(labels) != expected or flight_sold > expected:
            map_problems.append(f"{flight}: {flight_sold} sold of {len(labels)} seats, capacity {expected}")
        sold, capacity = sold + flight_sold, capacity + expected
        status.update(((flight, s["seat"]), s["status"]) for s in data["seats"])
    results.append(CheckResult.of(
        "seat_maps", f"{len(maps) - skipped:,} flights, {sold:,} seats sold of {capacity:,}"
        + (f"; {skipped} departed, not checked" if skipped else ""), problems + map_problems))

    acked = {a.ticket_id for a in acks}
    mapped = {flight for flight, answer in maps.items() if answer.get("ok")}
    unsold = []
    for ticket_id, (username, seats) in sorted(active.items()):
        for flight, seat in seats:
            state = status.get((flight, seat), "missing from its seat map")
            if flight in mapped and state != "sold":
                what = "acknowledged ticket" if ticket_id in acked else "active ticket"
                unsold.append(f"seat {seat} on {flight} of {what} {ticket_id} ({username}) is {state}")
    results.append(CheckResult.of(
        "purchases_sold", f"{len(acks):,} acknowledged purchases, {len(active):,} active tickets", unsold))

    owners: defaultdict[Seat, list[str]] = defaultdict(list)
    for ticket_id, (username, seats) in active.items():
        for place in seats:
            owners[place].append(f"{ticket_id} ({username})")
    twice = [f"seat {seat} on {flight} is in {len(t)} active tickets: {', '.join(sorted(t))}"
             for (flight, seat), t in sorted(owners.items()) if len(t) > 1]
    results.append(CheckResult.of("seat_once", f"{len(owners):,} seats in active tickets", twice))

    if acks:
        missing = []
        for ack in acks:
            if ack.username not in listed:
                missing.append(f"acknowledged ticket {ack.ticket_id}: the tickets of {ack.username} are not listed")
                continue
            found = [t for t in listed[ack.username] if t["ticket_id"] == ack.ticket_id]
            where = " ".join(f"seat {s} on {f}" for f, s in ack.seats)
            if not found:
                missing.append(f"acknowledged ticket {ack.ticket_id} ({where}) is missing from the tickets of {ack.username}")
            elif found[0]["status"] != "active" or _seats_of(found[0]) != ack.seats:
                missing.append(f"acknowledged ticket {ack.ticket_id} ({where}) of {ack.username} is listed as"
                               f" {found[0]['status']} with {_seats_of(found[0])}")
        results.append(CheckResult.of("tickets_listed", f"{len(acks):,} acknowledged purchases of {len(listed):,} customers", missing))
    if db is not None:
        results.append(await admin_verify(reactor, db))
    return results


def admin_command() -> tuple[str, list[str]]:
    """
    C{vendepass-admin} beside this Python, or the same entry point run by it.
    """
    script = Path(sys.executable).parent / "vendepass-admin"
    if script.exists():
        return str(script), []
    return sys.executable, ["-c", "from vendepass.admin import run; run()"]


async def admin_verify(reactor: Any, db: str) -> CheckResult:
    """
    C{vendepass-admin verify --db PATH --json}, as a check.
    """
    executable, prefix = admin_command()
    out, err, code = await getProcessOutputAndValue(
        executable, [*prefix, "verify", "--db", db, "--json"], env=dict(os.environ), reactor=reactor
    )
    try:
        result = json.loads(out)
        summary = (f"{result['events']:,} audit events replayed, {result['tickets']:,} tickets,"
                   f" {result['sold']:,} seats sold, {result['held']:,} held")
        findings = [str(f) for f in result["findings"]] or ([] if code == 0 else [f"exit code {code}"])
    except (ValueError, KeyError, TypeError):
        summary, findings = f"{db} could not be verified (exit code {code})", [(out + err).decode("utf-8", "replace").strip()]
    return CheckResult.of("admin_verify", summary, findings)
