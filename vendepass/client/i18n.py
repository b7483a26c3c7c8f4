"""
The client speaks English and Brazilian Portuguese: gettext catalogs under
C{vendepass/client/locale}, chosen by C{--lang} or the environment.
"""

from __future__ import annotations

import gettext
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping

LOCALEDIR = Path(__file__).resolve().parent / "locale"
DOMAIN = "vendepass"
LANGUAGES = ("en", "pt_BR")


def choose_language(option: str | None, environ: Mapping[str, str]) -> str:
    """
    C{--lang} if given, else the first of C{LANGUAGE}, C{LC_ALL},
    C{LC_MESSAGES}, C{LANG} that is set: Portuguese for any C{pt*}, English
    otherwise.
    """
    if option:
        return "pt_BR" if option.lower().replace("-", "_").startswith("pt") else "en"
    for name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = environ.get(name)
        if value:
            first = value.split(":")[0]
            return "pt_BR" if first.lower().startswith("pt") else "en"
    return "en"


class Texts:
    """
    Translated messages and number formats for one language.
    """

    def __init__(self, language: str) -> None:
        self.language = language
        self._translation = gettext.translation(DOMAIN, LOCALEDIR, languages=[language], fallback=True)

    def __call__(self, msgid: str, /, **values: Any) -> str:
        """
        The translation of C{msgid}, formatted with C{values}.
        """
        text = self._translation.gettext(msgid)
        return text.format(**values) if values else text

    def plural(self, singular: str, plural: str, n: int, /, **values: Any) -> str:
        return self._translation.ngettext(singular, plural, n).format(n=n, **values)

    def money(self, price: Mapping[str, str]) -> str:
        """
        C{{"amount": "1079.70", "currency": "BRL"}} as C{R$ 1.079,70} (pt_BR)
        or C{R$ 1,079.70} (en).
        """
        amount = Decimal(price["amount"])
        text = f"{amount:,.2f}"
        if self.language == "pt_BR":
            text = text.replace(",", "_").replace(".", ",").replace("_", ".")
        symbol = {"BRL": "R$"}.get(price.get("currency", ""), price.get("currency", ""))
        return f"{symbol} {text}"
