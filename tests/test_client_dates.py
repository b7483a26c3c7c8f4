"""
L{vendepass.client.dates}: what people type as a date, and how dates are shown.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from vendepass.client.dates import MAX_DAYS_AHEAD, BadDate, format_date, has_passed, parse_date, server_today
from vendepass.client.i18n import LANGUAGES

days = st.dates(min_value=date(1000, 1, 1), max_value=date(9999, 12, 31))
languages = st.sampled_from(LANGUAGES)
TODAY = date(2026, 12, 1)


class ParseDateTests(SynchronousTestCase):
    @given(days, days, languages)
    def test_round_trip(self, day: date, today: date, language: str) -> None:
        """
        A date shown in a language reads back as itself in that language.
        """
        self.assertEqual(parse_date(format_date(day, language), today, language), day)

    @given(days, days)
    def test_iso_everywhere(self, day: date, today: date) -> None:
        for language in LANGUAGES:
            self.assertEqual(parse_date(day.isoformat(), today, language), day)

    @given(days.filter(lambda d: d < date(9999, 1, 1)), st.integers(0, MAX_DAYS_AHEAD), languages)
    def test_days_ahead(self, today: date, ahead: int, language: str) -> None:
        self.assertEqual(parse_date(f"+{ahead}", today, language), today + timedelta(days=ahead))

    def test_words(self) -> None:
        for typed, language, expected in [
            ("today", "en", TODAY),
            ("Tomorrow", "en", date(2026, 12, 2)),
            ("tomorrow", "pt_BR", date(2026, 12, 2)),
            ("hoje", "pt_BR", TODAY),
            ("amanhã", "pt_BR", date(2026, 12, 2)),
            ("AMANHÃ", "pt_BR", date(2026, 12, 2)),
            ("amanha", "pt_BR", date(2026, 12, 2)),
            ("1/2/2027", "pt_BR", date(2027, 2, 1)),
            ("31/12/2026", "pt_BR", date(2026, 12, 31)),
        ]:
            self.assertEqual(parse_date(typed, TODAY, language), expected, (typed, language))

    def test_not_dates(self) -> None:
        for typed, language in [
            ("hoje", "en"),
            ("amanhã", "en"),
            ("01/12/2026", "en"),
            ("31/02/2026", "pt_BR"),
            ("2026-02-31", "en"),
            ("12/31/2026", "pt_BR"),
            ("+", "en"),
            ("-1", "en"),
            (f"+{MAX_DAYS_AHEAD + 1}", "en"),
            ("", "pt_BR"),
            ("yesterday", "en"),
        ]:
            self.assertRaises(BadDate, parse_date, typed, TODAY, language)

    def test_messages(self) -> None:
        """
        The refusal says what a date looks like, in the user's language.
        """
        error = self.assertRaises(BadDate, parse_date, "x", TODAY, "en")
        self.assertEqual(str(error), "The date must look like 2026-12-02, today, tomorrow or +3 (in 3 days).")
        error = self.assertRaises(BadDate, parse_date, "x", TODAY, "pt_BR")
        self.assertEqual(str(error), "A data deve ser como 02/12/2026, hoje, amanhã ou +3 (daqui a 3 dias).")


class FormatDateTests(SynchronousTestCase):
    def test_languages(self) -> None:
        self.assertEqual(format_date(date(2026, 12, 1), "en"), "2026-12-01")
        self.assertEqual(format_date(date(2026, 12, 1), "pt_BR"), "01/12/2026")


class ServerClockTests(SynchronousTestCase):
    def test_passed(self) -> None:
        """
        A day has passed once it is over in every time zone (UTC-12 the last).
        """
        self.assertTrue(has_passed(date(2026, 11, 30), "2026-12-01T12:00:01Z"))
        self.assertFalse(has_passed(date(2026, 11, 30), "2026-12-01T11:59:59Z"))
        self.assertFalse(has_passed(date(2026, 12, 1), "2026-12-01T23:00:00Z"))

    def test_today(self) -> None:
        """
        Today is the server's moment as a date of this computer's time zone.
        """
        moment = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
        self.assertEqual(server_today("2026-12-01T09:00:00Z"), datetime.fromtimestamp(moment.timestamp()).date())
        self.assertEqual(server_today("2026-12-01T06:00:00-03:00"), datetime.fromtimestamp(moment.timestamp()).date())
