"""
Tests for the client's translations: the Brazilian Portuguese catalog covers
every message of the code, keeps its placeholders, and its committed C{.mo}
is the compilation of its C{.po}; and for C{tools/i18n.py} itself.
"""

from __future__ import annotations

import configparser
import gettext
import io
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tools.i18n import (
    Message,
    client_sources,
    compile_po,
    extract_messages,
    format_po,
    merge,
    placeholders,
    read_po,
)
from vendepass.client.i18n import DOMAIN, LOCALEDIR, Texts, choose_language

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "vendepass" / "client"
PO = CLIENT / "locale" / "pt_BR" / "LC_MESSAGES" / "vendepass.po"
MO = PO.with_suffix(".mo")

BRL = {"amount": "1079.70", "currency": "BRL"}


def forms(message: Message) -> list[tuple[str, str]]:
    """
    Each translation of C{message} with the msgid it translates.
    """
    if message.msgid_plural is None:
        return [(message.msgid, message.msgstr[0])]
    return [
        (message.msgid if index == 0 else message.msgid_plural, text) for index, text in enumerate(message.msgstr)
    ]


class CatalogTests(SynchronousTestCase):
    """
    The committed pt_BR catalog against the client code.
    """

    def setUp(self) -> None:
        self.catalog = read_po(PO)
        self.messages = {key: message for key, message in self.catalog.items() if key}

    def test_sourcesFound(self) -> None:
        """
        The extractor reads the client's modules and finds their messages.
        """
        names = {path.name for path in client_sources()}
        self.assertTrue({"app.py", "cli.py", "views.py"} <= names, names)
        self.assertIn("Choose: ", extract_messages(client_sources()))

    def test_messagesAreLiterals(self) -> None:
        """
        Every translation call in the client has string literals as its
        messages, so that the extractor (and this test) can see them.
        """
        problems: list[str] = []
        extract_messages(client_sources(), problems)
        self.assertEqual(problems, [])

    def test_everyMessageTranslated(self) -> None:
        """
        Every message the client code uses is in the pt_BR catalog, with a
        translation that is neither empty nor fuzzy.
        """
        used = extract_messages(client_sources())
        missing = sorted(set(used) - set(self.catalog))
        self.assertEqual(missing, [], "run `python tools/i18n.py extract` and translate the new messages")
        untranslated = sorted(key for key in used if not self.catalog[key].translated)
        self.assertEqual(untranslated, [], "translate these (and remove any fuzzy flag)")
        for key, message in used.items():
            self.assertEqual(self.catalog[key].msgid_plural, message.msgid_plural, key)

    def test_header(self) -> None:
        """
        The catalog declares its language, encoding and plural forms.
        """
        header = self.catalog[""].msgstr[0]
        self.assertIn("Language: pt_BR\n", header)
        self.assertIn("Content-Type: text/plain; charset=UTF-8\n", header)
        self.assertIn("Plural-Forms: nplurals=2; plural=(n > 1);\n", header)
        self.assertNotIn("fuzzy", self.catalog[""].flags)

    def test_placeholders(self) -> None:
        """
        Every translation has exactly the C{{placeholders}} of its msgid, so
        C{str.format} neither fails nor drops a value.
        """
        for message in self.messages.values():
            for msgid, text in forms(message):
                if not text:
                    continue
                try:
                    found = placeholders(text)
                except ValueError as e:
                    self.fail(f"{text!r}: {e}")
                wanted = placeholders(msgid)
                if message.msgid_plural is not None and msgid == message.msgid:
                    # The singular form may leave the count out ("one seat").
                    self.assertLessEqual(found - {"n"}, wanted | {"n"}, msgid)
                else:
                    self.assertEqual(found, wanted, msgid)

    def test_spacing(self) -> None:
        """
        Translations keep the leading and trailing spaces of their msgid: a
        prompt's trailing space separates it from what is typed, table lines
        are indented.
        """
        for message in self.messages.values():
            for msgid, text in forms(message):
                if not text:
                    continue
                self.assertEqual(len(text) - len(text.rstrip()), len(msgid) - len(msgid.rstrip()), msgid)
                self.assertEqual(len(text) - len(text.lstrip()), len(msgid) - len(msgid.lstrip()), msgid)

    def test_yesNoAnswers(self) -> None:
        """
        Questions that take C{y/n} ask for C{s/n} in Portuguese, which the app
        accepts.
        """
        from vendepass.client.app import NO, YES

        self.assertIn("s", YES)
        self.assertIn("n", NO)
        questions = [m for m in self.messages.values() if "[y/n]" in m.msgid]
        self.assertTrue(questions)
        for message in questions:
            self.assertIn("[s/n]", message.msgstr[0], message.msgid)

    def test_moUpToDate(self) -> None:
        """
        Every committed C{.mo} is the compilation of the C{.po} beside it, so
        a catalog edited but not compiled fails here.
        """
        catalogs = sorted((CLIENT / "locale").glob("*/LC_MESSAGES/*.po"))
        self.assertIn(PO, catalogs)
        for po in catalogs:
            mo = po.with_suffix(".mo")
            self.assertTrue(mo.exists(), f"{mo} is missing: run `python tools/i18n.py compile`")
            self.assertTrue(
                mo.read_bytes() == compile_po(po),
                f"{mo} is stale: run `python tools/i18n.py compile` and commit it",
            )

    def test_packageData(self) -> None:
        """
        The compiled catalog is where C{setup.cfg}'s package data installs it
        from, and where L{Texts} looks for it.
        """
        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg", encoding="utf-8")
        patterns = [
            pattern.strip()
            for pattern in config["options.package_data"]["vendepass.client"].replace("\n", ",").split(",")
            if pattern.strip()
        ]
        installed = {path for pattern in patterns for path in CLIENT.glob(pattern)}
        self.assertIn(MO, installed)
        self.assertEqual(LOCALEDIR.resolve() / "pt_BR" / "LC_MESSAGES" / f"{DOMAIN}.mo", MO)


class TextsTests(SynchronousTestCase):
    """
    L{Texts} with the committed catalogs.
    """

    def test_translates(self) -> None:
        texts = Texts("pt_BR")
        self.assertEqual(texts("Choose: "), "Escolha: ")
        self.assertEqual(texts("Log in"), "Entrar")
        self.assertEqual(texts("Seat {seat} is already taken.", seat="12A"), "O assento 12A já está ocupado.")
        self.assertEqual(texts("Choose other seats? [y/n] "), "Escolher outros assentos? [s/n] ")

    def test_english(self) -> None:
        """
        English is the msgids themselves.
        """
        texts = Texts("en")
        self.assertEqual(texts("Choose: "), "Choose: ")
        self.assertEqual(texts("Seat {seat} is already taken.", seat="12A"), "Seat 12A is already taken.")

    def test_money(self) -> None:
        self.assertEqual(Texts("pt_BR").money(BRL), "R$ 1.079,70")
        self.assertEqual(Texts("en").money(BRL), "R$ 1,079.70")
        self.assertEqual(Texts("pt_BR").money({"amount": "89.9", "currency": "BRL"}), "R$ 89,90")


class ChooseLanguageTests(SynchronousTestCase):
    def test_portuguese(self) -> None:
        self.assertEqual(choose_language(None, {"LANG": "pt_BR.UTF-8"}), "pt_BR")
        self.assertEqual(choose_language(None, {"LANGUAGE": "pt_BR:en", "LANG": "C"}), "pt_BR")
        self.assertEqual(choose_language("pt", {}), "pt_BR")
        self.assertEqual(choose_language("pt_BR", {"LANG": "C"}), "pt_BR")

    def test_english(self) -> None:
        self.assertEqual(choose_language(None, {"LANG": "C"}), "en")
        self.assertEqual(choose_language(None, {}), "en")
        self.assertEqual(choose_language(None, {"LANG": "en_US.UTF-8"}), "en")

    def test_optionFirst(self) -> None:
        """
        C{--lang} wins over the environment.
        """
        self.assertEqual(choose_language("en", {"LANG": "pt_BR.UTF-8"}), "en")
        self.assertEqual(choose_language("pt", {"LANG": "C"}), "pt_BR")


class ToolTests(SynchronousTestCase):
    """
    C{tools/i18n.py} on made-up files.
    """

    def write(self, name: str, text: str) -> Path:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        path = directory / name
        path.write_text(text, encoding="utf-8")
        return path

    def test_extract(self) -> None:
        """
        The messages of C{texts(...)}, C{self._(...)}, C{_(...)} and the
        plural calls, in source order with their lines; non-literals are
        reported.
        """
        path = self.write(
            "views.py",
            "def f(texts, name):\n"
            "    texts('One')\n"
            "    return f\"{texts('Two {x}', x=1)}\"\n"
            "class A:\n"
            "    def g(self):\n"
            "        self._('Three')\n"
            "        self._.plural('{n} seat', '{n} seats', 2)\n"
            "        texts('One')\n"
            "        _(name)\n"
            "        other('Not a message')\n",
        )
        problems: list[str] = []
        messages = extract_messages([path], problems)
        self.assertEqual(list(messages), ["One", "Two {x}", "Three", "{n} seat"])
        self.assertEqual([r.rsplit(":", 1)[1] for r in messages["One"].references], ["2", "8"])
        self.assertEqual(messages["{n} seat"].msgid_plural, "{n} seats")
        self.assertEqual(messages["Two {x}"].flags, ["python-brace-format"])
        self.assertEqual(len(problems), 1)
        self.assertIn(":9: ", problems[0])

    def test_roundTrip(self) -> None:
        """
        L{format_po} writes what L{read_po} reads back, wrapping long lines.
        """
        messages = [
            Message("", msgstr=["Language: pt_BR\nContent-Type: text/plain; charset=UTF-8\n"]),
            Message("Quote \" and \\ and tab\t", msgstr=["Aspas \" e \\ e tab\t"], comments=["a note"]),
            Message("word " * 30, msgstr=["palavra " * 30], references=["a.py:1", "b.py:2"], flags=["fuzzy"]),
            Message("{n} seat", "{n} seats", msgstr=["{n} assento", "{n} assentos"]),
            Message("Open", msgctxt="menu", msgstr=["Abrir"]),
        ]
        text = format_po(messages)
        self.assertTrue(all(len(line) <= 79 for line in text.splitlines()), text)
        back = read_po(self.write("x.po", text))
        self.assertEqual(list(back.values()), messages)
        self.assertIn("menu\x04Open", back)

    def test_merge(self) -> None:
        """
        Merging keeps translations and translator comments, adds new messages
        untranslated, and drops messages no longer used.
        """
        existing = {
            "": Message("", msgstr=["Plural-Forms: nplurals=2; plural=(n > 1);\n"]),
            "Kept": Message("Kept", msgstr=["Mantido"], comments=["careful"], references=["old.py:1"]),
            "Gone": Message("Gone", msgstr=["Sumiu"]),
        }
        template = [
            Message("", msgstr=["template header"]),
            Message("New", references=["new.py:3"]),
            Message("Kept", references=["new.py:4"]),
            Message("{n} day", "{n} days"),
        ]
        merged = {m.key: m for m in merge(template, existing)}
        self.assertEqual(list(merged), ["", "New", "Kept", "{n} day"])
        self.assertEqual(merged[""], existing[""])
        self.assertEqual(merged["Kept"].msgstr, ["Mantido"])
        self.assertEqual(merged["Kept"].comments, ["careful"])
        self.assertEqual(merged["Kept"].references, ["new.py:4"])
        self.assertEqual(merged["New"].msgstr, [""])
        self.assertEqual(merged["{n} day"].msgstr, ["", ""])
        self.assertEqual(merged["Kept"].flags, [])

    def test_mergeCloseMessage(self) -> None:
        """
        A new message very close to one no longer used gets its translation,
        marked fuzzy (so it is not compiled until someone reviews it).
        """
        existing = {"The seat was sold.": Message("The seat was sold.", msgstr=["O assento foi vendido."])}
        template = [Message("The seat was sold!", flags=["python-brace-format"]), Message("Unrelated")]
        merged = {m.key: m for m in merge(template, existing)}
        self.assertEqual(list(merged), ["The seat was sold!", "Unrelated"])
        self.assertEqual(merged["The seat was sold!"].msgstr, ["O assento foi vendido."])
        self.assertEqual(merged["The seat was sold!"].flags, ["fuzzy", "python-brace-format"])
        self.assertFalse(merged["The seat was sold!"].translated)
        self.assertEqual(merged["Unrelated"].msgstr, [""])

    def test_compile(self) -> None:
        """
        The C{.mo} has the header, translated messages and plural forms; it
        leaves out fuzzy and untranslated messages; gettext reads it.
        """
        po = self.write(
            "x.po",
            'msgid ""\n'
            'msgstr ""\n'
            '"Language: pt_BR\\n"\n'
            '"Content-Type: text/plain; charset=UTF-8\\n"\n'
            '"Plural-Forms: nplurals=2; plural=(n > 1);\\n"\n'
            "\n"
            'msgid "Yes"\n'
            'msgstr "Sim"\n'
            "\n"
            "#, fuzzy\n"
            'msgid "Maybe"\n'
            'msgstr "Talvez"\n'
            "\n"
            'msgid "Later"\n'
            'msgstr ""\n'
            "\n"
            'msgid "{n} seat"\n'
            'msgid_plural "{n} seats"\n'
            'msgstr[0] "{n} assento"\n'
            'msgstr[1] "{n} assentos"\n'
            "\n"
            'msgctxt "menu"\n'
            'msgid "Open"\n'
            'msgstr "Abrir"\n'
            "\n"
            "#~ msgid \"Old\"\n"
            "#~ msgstr \"Velho\"\n",
        )
        data = compile_po(po)
        self.assertEqual(data, compile_po(po))
        self.assertEqual(data[:4], b"\xde\x12\x04\x95")
        translation = gettext.GNUTranslations(io.BytesIO(data))
        self.assertEqual(translation.gettext("Yes"), "Sim")
        self.assertEqual(translation.gettext("Maybe"), "Maybe")
        self.assertEqual(translation.gettext("Later"), "Later")
        self.assertEqual(translation.gettext("Old"), "Old")
        self.assertEqual(translation.ngettext("{n} seat", "{n} seats", 1), "{n} assento")
        self.assertEqual(translation.ngettext("{n} seat", "{n} seats", 0), "{n} assento")
        self.assertEqual(translation.ngettext("{n} seat", "{n} seats", 2), "{n} assentos")
        self.assertEqual(translation.pgettext("menu", "Open"), "Abrir")
        self.assertEqual(translation.info()["language"], "pt_BR")
