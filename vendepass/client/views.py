"""
How the client shows things to people: tables, the cabin picture of a seat
map, tickets, and server errors as short sentences. Pure functions of the
protocol's values and a L{Texts}.
"""

from __future__ import annotations

import math
import os
import unicodedata
from datetime import date, datetime
from typing import Any, Sequence

from vendepass.client.dates import format_date
from vendepass.client.i18n import Texts
from vendepass.client.protocol import CertificateRefused, ServerError

FREE, HELD, SOLD, MINE = ".", "o", "x", "*"


def when(iso: str, local: bool = False, language: str = "en") -> str:
    """
    C{2026-12-01T07:30:00-03:00} as C{2026-12-01 07:30} (C{01/12/2026 07:30}
    in C{pt_BR}): the time where it was given (a flight's airport), or with
    C{local} in this computer's time zone.
    """
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    if local:
        moment = moment.astimezone()
    return f"{format_date(moment.date(), language)} {moment:%H:%M}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """
    A plain text table; columns whose index is in C{right} are right-aligned.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width) for i, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def route(legs: Sequence[dict[str, Any]]) -> str:
    return " > ".join([legs[0]["origin"], *(leg["destination"] for leg in legs)])


def itineraries(texts: Texts, found: Sequence[dict[str, Any]], first: int = 1) -> str:
    """
    A table of itineraries, numbered from C{first}.
    """
    if not found:
        return texts("No flights found.")
    rows = [
        [
            str(number),
            when(i["departure"], language=texts.language),
            when(i["arrival"], language=texts.language),
            route(i["legs"]),
            ", ".join(leg["number"] for leg in i["legs"]),
            str(i["free_seats"]),
            texts.money(i["price"]),
        ]
        for number, i in enumerate(found, first)
    ]
    headers = ["#", texts("Departure"), texts("Arrival"), texts("Route"), texts("Flights"), texts("Free"), texts("Price")]
    return table(headers, rows, right=(0, 5, 6))


def by_day(found: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Itineraries in departure order, regrouped the way customers look for
    them: by day of departure, direct flights first, then by departure.
    """
    return sorted(found, key=lambda i: (i["departure"][:10], len(i["legs"])))


def outside_window(texts: Texts, day: str | None, window: dict[str, str] | None) -> str | None:
    """
    If C{day} (C{YYYY-MM-DD}) is outside the sales window of a search
    answer, a sentence saying when flights are sold; else C{None}.
    """
    if day is None or not window or window["first"] <= day <= window["last"]:
        return None
    shown = {name: format_date(date.fromisoformat(value), texts.language)
             for name, value in [("day", day), ("first", window["first"]), ("last", window["last"])]}
    return texts("No flights on {day}: flights are sold from {first} to {last}.", **shown)


def certificate_refused(texts: Texts, endpoint: str, refused: CertificateRefused) -> str:
    """
    Why a server's certificate was refused, in plain words.
    """
    if refused.wrong_name is not None:
        return texts(
            "Cannot connect to {endpoint}: the server's certificate is not valid for {name}.",
            endpoint=endpoint, name=refused.wrong_name,
        )
    return texts(
        "Cannot connect to {endpoint}: the server's certificate is not trusted (issuer {issuer}).",
        endpoint=endpoint, issuer=refused.issuer or texts("unknown"),
    )


def network(texts: Texts, data: dict[str, Any]) -> str:
    airports = table(
        [texts("Code"), texts("City"), texts("Airport")],
        [[a["code"], a["city"], a["name"]] for a in data["airports"]],
    )
    direct: dict[str, list[str]] = {}
    for r in data["routes"]:
        direct.setdefault(r["origin"], []).append(r["destination"])
    routes = "\n".join(f"{origin} > {', '.join(sorted(dests))}" for origin, dests in sorted(direct.items()))
    return f"{airports}\n\n{texts('Direct flights:')}\n{routes}"


def seat_symbol(seat: dict[str, Any]) -> str:
    if seat["mine"]:
        return MINE
    return {"free": FREE, "held": HELD, "sold": SOLD}.get(seat["status"], "?")


def cabin(texts: Texts, seatmap: dict[str, Any], fit: os.terminal_size | None = None) -> str:
    """
    The seat map drawn as the cabin: one line per row, an aisle in the middle.
    With C{fit}, a terminal too short for the rows (and the prompt below
    them) gets them in two or more columns side by side, as its width allows.
    """
    letters: str = seatmap["letters"]
    half = (len(letters) + 1) // 2
    by_seat = {s["seat"]: s for s in seatmap["seats"]}
    flight = seatmap["flight"]

    def row_text(cells: Sequence[str]) -> str:
        return " ".join(cells[:half]) + "   " + " ".join(cells[half:])

    lines = [
        texts(
            "Flight {number} {origin} > {destination}, {departure}",
            number=flight["number"],
            origin=flight["origin"],
            destination=flight["destination"],
            departure=when(flight["departure"], language=texts.language),
        ),
        "     " + row_text(list(letters)),
    ]
    rows = []
    for row in range(1, seatmap["rows"] + 1):
        cells = [seat_symbol(by_seat[f"{row}{letter}"]) if f"{row}{letter}" in by_seat else " " for letter in letters]
        rows.append(f"{row:>3}  " + row_text(cells))
    # Below the picture: its legend, then the question and its answer.
    lines = [lines[0], *side_by_side([lines[1], *rows], fit, spare=4)]
    free = sum(1 for s in seatmap["seats"] if s["status"] == "free")
    lines.append(
        texts("{free} free", free=free)
        + f"   {FREE} {texts('free')}  {HELD} {texts('held')}  {SOLD} {texts('sold')}  {MINE} {texts('yours')}"
    )
    return "\n".join(lines)


def side_by_side(lines: list[str], fit: os.terminal_size | None, spare: int) -> list[str]:
    """
    C{lines} (a heading, then rows) as they are, or, when more than
    C{fit.lines - spare} lines in all, cut into columns side by side (each
    with the heading) -- as many as that height needs and the width allows.
    """
    heading, rows = lines[0], lines[1:]
    width = max(map(len, lines)) + 4
    columns = 1
    if fit is not None and rows:
        room = max(1, fit.lines - spare - 1)
        columns = min(max(1, math.ceil(len(rows) / room)), max(1, (fit.columns + 4) // width))
    if columns == 1:
        return lines
    tall = math.ceil(len(rows) / columns)
    parts = [[heading, *rows[i : i + tall]] for i in range(0, len(rows), tall)]
    return [
        "".join(part[i].ljust(width) if i < len(part) else " " * width for part in parts).rstrip()
        for i in range(tall + 1)
    ]


def ticket(texts: Texts, value: dict[str, Any]) -> str:
    status = texts("active") if value["status"] == "active" else texts("cancelled")
    lines = [
        texts("Ticket {ticket_id} ({status}), {price}", ticket_id=value["ticket_id"], status=status,
              price=texts.money(value["price"]))
    ]
    for leg in value["legs"]:
        lines.append(
            texts(
                "  {number} {origin} > {destination}  {departure} - {arrival}  seat {seat}",
                number=leg["number"],
                origin=leg["origin"],
                destination=leg["destination"],
                departure=when(leg["departure"], language=texts.language),
                arrival=when(leg["arrival"], language=texts.language),
                seat=leg["seat"],
            )
        )
    return "\n".join(lines)


def tickets(texts: Texts, values: Sequence[dict[str, Any]]) -> str:
    if not values:
        return texts("You have no tickets yet.")
    rows = [
        [
            t["ticket_id"],
            texts("active") if t["status"] == "active" else texts("cancelled"),
            route(t["legs"]),
            when(t["legs"][0]["departure"], language=texts.language),
            ", ".join(leg["seat"] for leg in t["legs"]),
            texts.money(t["price"]),
        ]
        for t in values
    ]
    headers = [texts("Ticket"), texts("Status"), texts("Route"), texts("Departure"), texts("Seats"), texts("Price")]
    return table(headers, rows, right=(5,))


def hold(texts: Texts, value: dict[str, Any]) -> str:
    seats = ", ".join(f"{leg['number']} {texts('seat')} {leg['seat']}" for leg in value["legs"])
    return texts("Held: {seats}, {price}.", seats=seats, price=texts.money(value["price"]))


def error(texts: Texts, failure: ServerError) -> str:
    """
    A server refusal as a short sentence in the user's language.
    """
    d = failure.details
    sentences = {
        "bad_credentials": texts("Wrong username or password."),
        "username_taken": texts("That username is already taken."),
        "not_logged_in": texts("Please log in first."),
        "unknown_airport": texts("Unknown airport."),
        "unknown_flight": texts("That flight does not exist or is not on sale."),
        "unknown_seat": texts("Seat {seat} does not exist on this flight.", seat=d.get("seat", "?")),
        "invalid_itinerary": texts("Those flights do not connect."),
        "sold_out": texts("Sorry, this flight is sold out."),
        "hold_not_found": texts("That hold no longer exists."),
        "hold_expired": texts("Your hold expired: the seats were released. Search again to choose new seats."),
        "ticket_not_found": texts("No such ticket."),
        "already_cancelled": texts("That ticket is already cancelled."),
        "flight_departed": texts("That flight has already departed."),
        "internal_error": texts("The server had a problem; nothing was changed. Please try again."),
        "too_many_holds": texts("You are holding too many seats; buy or release some first."),
        "rate_limited": texts("Too many attempts; wait {seconds} seconds and try again.",
                              seconds=d.get("retry_after", "?")),
        "too_many_connections": texts("Too many connections from your computer; close some and try again."),
        "storage_unavailable": texts("The ticket database is busy or unavailable; nothing was changed. Please try again shortly."),
        "outcome_unknown": texts(
            "The ticket database could not confirm whether this was done. Check your tickets before trying again."
        ),
        "line_too_long": texts("The request was too long."),
    }
    if failure.code == "seat_unavailable":
        if d.get("held_until"):
            return texts(
                "Seat {seat} is being bought by someone else (held until {until}).",
                seat=d.get("seat", "?"),
                until=when(d["held_until"], local=True, language=texts.language),
            )
        return texts("Seat {seat} is already taken.", seat=d.get("seat", "?"))
    if failure.code == "invalid_request":
        return texts("The server did not accept that: {message}", message=failure.message)
    return sentences.get(failure.code, failure.message)


def normalise(text: str) -> str:
    """
    Lower case without accents, to match what people type to city names.
    """
    decomposed = unicodedata.normalize("NFKD", text.strip().lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def find_airport(airports: Sequence[dict[str, Any]], typed: str) -> dict[str, Any] | None:
    """
    The airport whose code, or city name (ignoring case and accents, or a
    unique prefix of it), is C{typed}.
    """
    wanted = normalise(typed)
    if not wanted:
        return None
    for airport in airports:
        if airport["code"].lower() == wanted or normalise(airport["city"]) == wanted:
            return airport
    matches = [a for a in airports if normalise(a["city"]).startswith(wanted)]
    return matches[0] if len(matches) == 1 else None
