"""
Dates as people type and read them: C{2026-12-01} everywhere, C{01/12/2026}
under Brazilian Portuguese, and relative days (C{today}, C{tomorrow}, C{+3};
C{hoje}, C{amanhã} too under Portuguese).

"Today" is the server's clock (from a ping) in this computer's time zone, so
that a client with a wrong clock still means the server's days.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

from vendepass.client.i18n import Texts

# Relative days accepted in every language, and those of Portuguese only.
RELATIVE = {"today": 0, "tomorrow": 1}
RELATIVE_PT = {"hoje": 0, "amanha": 1, "amanhã": 1}

# How far ahead "+N" may reach (no sales window is longer than a year).
MAX_DAYS_AHEAD = 366

# The earliest civil time zone: a date before its today has passed everywhere.
EARLIEST = timezone(timedelta(hours=-12))

_ISO = re.compile(r"\d{4}-\d{2}-\d{2}")
_BRAZILIAN = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")
_AHEAD = re.compile(r"\+(\d{1,3})")


class BadDate(ValueError):
    """
    Text that is not a date; its message is a sentence in the user's language.
    """


def format_date(day: date, language: str) -> str:
    """
    C{day} as people of C{language} read it: C{01/12/2026} (pt_BR) or C{2026-12-01}.
    """
    if language == "pt_BR":
        return day.strftime("%d/%m/%Y")
    return day.isoformat()


def parse_date(text: str, today: date, language: str) -> date:
    """
    The date C{text} means, C{today} being C{today}: C{YYYY-MM-DD}, C{today},
    C{tomorrow} or C{+N} (in N days) in every language; also C{DD/MM/AAAA},
    C{hoje} and C{amanhã} under C{pt_BR}.

    @raise BadDate: C{text} is none of those.
    """
    typed = text.strip().lower()
    relative = {**RELATIVE, **(RELATIVE_PT if language == "pt_BR" else {})}
    try:
        if typed in relative:
            return today + timedelta(days=relative[typed])
        ahead = _AHEAD.fullmatch(typed)
        if ahead and int(ahead.group(1)) <= MAX_DAYS_AHEAD:
            return today + timedelta(days=int(ahead.group(1)))
        if _ISO.fullmatch(typed):
            return date.fromisoformat(typed)
        brazilian = _BRAZILIAN.fullmatch(typed)
        if brazilian and language == "pt_BR":
            day, month, year = (int(part) for part in brazilian.groups())
            return date(year, month, day)
    except ValueError:
        pass
    texts = Texts(language)
    raise BadDate(
        texts(
            "The date must look like {example}, today, tomorrow or +3 (in 3 days).",
            example=format_date(today + timedelta(days=1), language),
        )
    )


def server_today(time: str) -> date:
    """
    Today in this computer's time zone, by the server's clock (C{ping}'s C{time}).
    """
    return datetime.fromisoformat(time.replace("Z", "+00:00")).astimezone().date()


def has_passed(day: date, time: str) -> bool:
    """
    Whether C{day} is over in every time zone, by the server's clock.
    """
    return day < datetime.fromisoformat(time.replace("Z", "+00:00")).astimezone(EARLIEST).date()
