"""
Translation catalogs of the VendePass client, with the standard library only
(CI may have no GNU gettext):

    python tools/i18n.py extract   # code -> locale/vendepass.pot -> every .po
    python tools/i18n.py compile   # every locale/*/LC_MESSAGES/*.po -> .mo

C{extract} finds the messages in C{vendepass/client/*.py}: the first argument,
a string literal, of C{texts(...)}, C{self._(...)} and C{_(...)}, and both
literals of C{texts.plural(...)} and C{self._.plural(...)}. It writes the
template, then merges it into each language's catalog: translations are kept,
new messages added untranslated (or, when a message no longer used is very
close, with its translation marked fuzzy), messages no longer used dropped.

C{compile} writes GNU C{.mo} files as CPython's C{Tools/i18n/msgfmt.py} does:
the header entry, then the translated, non-fuzzy messages sorted by msgid,
plural forms joined with NUL, no hash table, little-endian. The output depends
only on the C{.po}, so the committed C{.mo} can be checked against it.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import string
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "vendepass" / "client"
LOCALEDIR = SOURCES / "locale"
DOMAIN = "vendepass"
TEMPLATE = LOCALEDIR / f"{DOMAIN}.pot"
DEFAULT_LANGUAGES = ("pt_BR",)

WIDTH = 79
CONTEXT_SEPARATOR = "\x04"

TEMPLATE_HEADER = (
    "Project-Id-Version: VendePass\n"
    "Report-Msgid-Bugs-To: \n"
    "Language: \n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "Plural-Forms: nplurals=INTEGER; plural=EXPRESSION;\n"
)

PLURAL_FORMS = {"pt_BR": "nplurals=2; plural=(n > 1);"}


@dataclass
class Message:
    """
    One catalog entry. C{msgstr} has one string, or one per plural form.
    """

    msgid: str
    msgid_plural: str | None = None
    msgctxt: str | None = None
    msgstr: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """
        The msgid as gettext looks it up: C{context\\x04msgid} with a context.
        """
        return self.msgid if self.msgctxt is None else self.msgctxt + CONTEXT_SEPARATOR + self.msgid

    @property
    def fuzzy(self) -> bool:
        return "fuzzy" in self.flags

    @property
    def translated(self) -> bool:
        """
        Every form has a translation and none of it is fuzzy.
        """
        return bool(self.msgstr) and all(self.msgstr) and not self.fuzzy


# -- extraction -----------------------------------------------------------------


def _is_texts(node: ast.expr) -> bool:
    """
    C{texts}, C{_} or C{self._}: the callable L{vendepass.client.i18n.Texts}.
    """
    if isinstance(node, ast.Name):
        return node.id in ("texts", "_")
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "_"
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _literal(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _reference(path: Path, line: int) -> str:
    resolved = path.resolve()
    try:
        name = resolved.relative_to(ROOT).as_posix()
    except ValueError:
        name = path.as_posix()
    return f"{name}:{line}"


def _calls(tree: ast.AST) -> Iterator[tuple[ast.Call, bool]]:
    """
    The translation calls in C{tree} in source order, each with whether it
    is a plural one.
    """
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if _is_texts(func):
            found.append((node, False))
        elif isinstance(func, ast.Attribute) and func.attr == "plural" and _is_texts(func.value):
            found.append((node, True))
    found.sort(key=lambda item: (item[0].lineno, item[0].col_offset))
    return iter(found)


def placeholders(text: str) -> set[str]:
    """
    The C{str.format} fields of C{text}: C{{"seat"}} for C{"Seat {seat}"}.
    Raises C{ValueError} for unbalanced braces.
    """
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def extract_messages(paths: Iterable[Path | str], problems: list[str] | None = None) -> dict[str, Message]:
    """
    The messages of the Python files C{paths}, keyed by msgid, in the order
    they first appear (files in the order given). Calls whose msgid is not a
    string literal cannot be extracted: they are reported in C{problems} if
    given, else on standard error.
    """
    messages: dict[str, Message] = {}

    def problem(text: str) -> None:
        if problems is None:
            print(f"warning: {text}", file=sys.stderr)
        else:
            problems.append(text)

    for path in map(Path, paths):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call, plural in _calls(tree):
            where = _reference(path, call.lineno)
            wanted = 2 if plural else 1
            if len(call.args) < wanted:
                problem(f"{where}: the message must be the first argument{'s' if plural else ''}")
                continue
            texts = [_literal(arg) for arg in call.args[:wanted]]
            if any(text is None for text in texts):
                problem(f"{where}: the message is not a string literal, so it cannot be translated")
                continue
            msgid = texts[0] or ""
            msgid_plural = texts[1] if plural else None
            if msgid == "":
                problem(f"{where}: the empty string is the catalog header, not a message")
                continue
            try:
                fields = placeholders(msgid) | placeholders(msgid_plural or "")
            except ValueError as e:
                problem(f"{where}: bad format string: {e}")
                continue
            message = messages.get(msgid)
            if message is None:
                message = messages[msgid] = Message(msgid, msgid_plural)
                if fields:
                    message.flags.append("python-brace-format")
            elif message.msgid_plural != msgid_plural:
                problem(f"{where}: {msgid!r} is used both with plural {message.msgid_plural!r} and {msgid_plural!r}")
            if where not in message.references:
                message.references.append(where)
    return messages


def client_sources() -> list[Path]:
    return sorted(SOURCES.glob("*.py"))


# -- reading and writing PO files -----------------------------------------------

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v", '"': '"', "\\": "\\"}


def _unquote(text: str, where: str) -> str:
    text = text.strip()
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError(f"{where}: expected a quoted string, got {text!r}")

    def escape(match: re.Match[str]) -> str:
        sequence = match.group(1)
        if sequence in _ESCAPES:
            return _ESCAPES[sequence]
        if sequence.startswith("x"):
            return chr(int(sequence[1:], 16))
        if sequence[0] in "01234567":
            return chr(int(sequence, 8))
        raise ValueError(f"{where}: unknown escape \\{sequence}")

    return re.sub(r'\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)', escape, text[1:-1])


def read_po(path: Path | str) -> dict[str, Message]:
    """
    The entries of a PO (or POT) file keyed by L{Message.key}; the header
    is the entry with key C{""}. Obsolete (C{#~}) entries are left out.
    """
    path = Path(path)
    messages: dict[str, Message] = {}
    message: Message | None = None
    pending: dict[str, list[str]] = {"references": [], "flags": [], "comments": [], "extracted": []}
    section: tuple[str, int] | None = None  # what continuation lines extend
    has_msgstr = False

    def finish() -> None:
        nonlocal message, has_msgstr
        if message is not None:
            if not has_msgstr:
                raise ValueError(f"{path}: {message.msgid!r} has no msgstr")
            if message.key in messages:
                raise ValueError(f"{path}: duplicate message {message.msgid!r}")
            messages[message.key] = message
        message = None
        has_msgstr = False

    def start() -> Message:
        nonlocal message
        if message is not None and has_msgstr:
            finish()
        if message is None:
            message = Message(msgid="")
            for name, values in pending.items():
                setattr(message, name, values)
            for name in pending:
                pending[name] = []
        return message

    keyword = re.compile(r'^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+(".*)$')
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        where = f"{path}:{number}"
        line = raw.strip()
        if not line:
            if message is not None:
                finish()
            section = None
            continue
        if line.startswith("#"):
            if message is not None and has_msgstr:
                finish()
            section = None
            if line.startswith("#~"):
                continue
            if line.startswith("#,"):
                pending["flags"] += [flag.strip() for flag in line[2:].split(",") if flag.strip()]
            elif line.startswith("#:"):
                pending["references"] += line[2:].split()
            elif line.startswith("#."):
                pending["extracted"].append(line[2:].strip())
            elif line.startswith("#|"):
                pass  # previous msgid of a fuzzy entry: not kept
            else:
                pending["comments"].append(line[1:].removeprefix(" "))
            continue
        match = keyword.match(line)
        if match:
            name, index, rest = match.group(1), match.group(2), match.group(3)
            value = _unquote(rest, where)
            if name == "msgctxt":
                if message is not None and not has_msgstr:
                    raise ValueError(f"{where}: msgctxt inside an entry")
                start().msgctxt = value
                section = ("msgctxt", 0)
            elif name == "msgid":
                if message is not None and not has_msgstr and section != ("msgctxt", 0):
                    raise ValueError(f"{where}: msgid without msgstr before it")
                start().msgid = value
                section = ("msgid", 0)
            elif message is None:
                raise ValueError(f"{where}: {name} before msgid")
            elif name == "msgid_plural":
                message.msgid_plural = value
                section = ("msgid_plural", 0)
            else:
                position = 0 if index is None else int(index)
                if position != len(message.msgstr):
                    raise ValueError(f"{where}: {name} out of order")
                message.msgstr.append(value)
                has_msgstr = True
                section = ("msgstr", position)
            continue
        if line.startswith('"') and message is not None and section is not None:
            value = _unquote(line, where)
            name, position = section
            if name == "msgstr":
                message.msgstr[position] += value
            elif name == "msgid_plural":
                message.msgid_plural = (message.msgid_plural or "") + value
            elif name == "msgctxt":
                message.msgctxt = (message.msgctxt or "") + value
            else:
                message.msgid += value
            continue
        raise ValueError(f"{where}: cannot read {raw!r}")
    finish()
    return messages


def _escape(text: str) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\{ord(m.group()):03o}", text)


def _string(keyword: str, text: str) -> list[str]:
    """
    C{keyword "text"}, wrapped like GNU gettext: after newlines, and at
    spaces to keep lines within L{WIDTH} columns.
    """
    escaped = _escape(text)
    pieces = re.findall(r".*?\\n|.+$", escaped) or [""]
    if len(pieces) == 1 and len(keyword) + len(escaped) + 3 <= WIDTH:
        return [f'{keyword} "{escaped}"']
    lines = [f'{keyword} ""']
    for piece in pieces:
        current = ""
        for word in re.findall(r"[^ ]* *", piece):
            if not word:
                continue
            if current and len(current) + len(word) + 2 > WIDTH:
                lines.append(f'"{current}"')
                current = ""
            current += word
        if current:
            lines.append(f'"{current}"')
    return lines


def _comment(prefix: str, items: Sequence[str], separator: str) -> list[str]:
    """
    C{#: a:1 b:2}-style lines within L{WIDTH} columns.
    """
    lines: list[str] = []
    current = ""
    for item in items:
        if current and len(prefix) + 1 + len(current) + len(separator) + len(item) > WIDTH:
            lines.append(f"{prefix} {current}")
            current = ""
        current = f"{current}{separator}{item}" if current else item
    if current:
        lines.append(f"{prefix} {current}")
    return lines


def format_po(messages: Iterable[Message], preamble: Sequence[str] = ()) -> str:
    """
    The text of a PO file with C{messages} in the order given.
    """
    blocks = []
    for message in messages:
        lines = []
        if message.msgid == "" and message.msgctxt is None:
            lines += [f"# {comment}".rstrip() for comment in preamble]
        lines += [f"# {comment}".rstrip() for comment in message.comments]
        lines += [f"#. {comment}" for comment in message.extracted]
        lines += _comment("#:", message.references, " ")
        if message.flags:
            lines.append("#, " + ", ".join(message.flags))
        if message.msgctxt is not None:
            lines += _string("msgctxt", message.msgctxt)
        lines += _string("msgid", message.msgid)
        if message.msgid_plural is None:
            lines += _string("msgstr", message.msgstr[0] if message.msgstr else "")
        else:
            lines += _string("msgid_plural", message.msgid_plural)
            for index, text in enumerate(message.msgstr or ["", ""]):
                lines += _string(f"msgstr[{index}]", text)
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def header_field(header: Message | None, name: str) -> str | None:
    if header is None or not header.msgstr:
        return None
    for line in header.msgstr[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


# -- extract --------------------------------------------------------------------


def template(messages: dict[str, Message]) -> list[Message]:
    header = Message("", msgstr=[TEMPLATE_HEADER], flags=["fuzzy"])
    return [header, *messages.values()]


def merge(template_messages: Sequence[Message], existing: dict[str, Message]) -> list[Message]:
    """
    The catalog C{existing} brought up to date with the template: its header,
    its translations, translator comments and flags for the messages still
    used, the template's references and order, and new messages untranslated
    (or, like GNU msgmerge, with the translation of a message no longer used
    whose msgid is very close, marked fuzzy for review); messages no longer
    used are dropped.
    """
    header = existing.get("")
    plurals = 2
    forms = header_field(header, "Plural-Forms") or ""
    match = re.search(r"nplurals\s*=\s*(\d+)", forms)
    if match:
        plurals = int(match.group(1))
    wanted = {new.key for new in template_messages}
    unused = {
        key: message
        for key, message in sorted(existing.items())
        if key and key not in wanted and message.msgstr and any(message.msgstr)
    }
    merged: list[Message] = [header] if header is not None else []
    for new in template_messages:
        if new.key == "":
            continue
        blank = [""] if new.msgid_plural is None else [""] * plurals
        message = Message(
            new.msgid,
            new.msgid_plural,
            new.msgctxt,
            msgstr=list(blank),
            references=list(new.references),
            flags=list(new.flags),
            extracted=list(new.extracted),
        )
        old = existing.get(new.key)
        fuzzy = False
        if old is None:
            close = difflib.get_close_matches(new.key, list(unused), n=1, cutoff=0.8)
            if close:
                old, fuzzy = unused[close[0]], True
        if old is not None and (old.msgid_plural is None) == (new.msgid_plural is None):
            message.comments = list(old.comments)
            message.msgstr = (old.msgstr + blank)[: len(blank)] if old.msgstr else list(blank)
            fuzzy = fuzzy or old.fuzzy or old.msgid_plural != new.msgid_plural
        if fuzzy:
            message.flags.insert(0, "fuzzy")
        merged.append(message)
    return merged


def new_catalog_header(language: str) -> Message:
    forms = PLURAL_FORMS.get(language, "nplurals=2; plural=(n != 1);")
    text = (
        TEMPLATE_HEADER.replace("Language: \n", f"Language: {language}\n")
        .replace("Plural-Forms: nplurals=INTEGER; plural=EXPRESSION;\n", f"Plural-Forms: {forms}\n")
    )
    return Message("", msgstr=[text])


def catalogs() -> list[Path]:
    """
    The C{.po} files under L{LOCALEDIR}.
    """
    return sorted(LOCALEDIR.glob("*/LC_MESSAGES/*.po"))


def extract() -> int:
    problems: list[str] = []
    messages = extract_messages(client_sources(), problems)
    for text in problems:
        print(f"warning: {text}", file=sys.stderr)
    entries = template(messages)
    preamble = [
        "Messages of the VendePass client. Made by `python tools/i18n.py extract`:",
        "do not edit by hand.",
    ]
    LOCALEDIR.mkdir(parents=True, exist_ok=True)
    _write(TEMPLATE, format_po(entries, preamble))
    print(f"{TEMPLATE.relative_to(ROOT)}: {len(messages)} messages")

    paths = catalogs()
    for language in DEFAULT_LANGUAGES:
        path = LOCALEDIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"
        if path not in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(format_po([new_catalog_header(language)]), encoding="utf-8")
            paths.append(path)
    for path in sorted(paths):
        existing = read_po(path)
        merged = merge(entries, existing)
        dropped = sorted(key for key in existing if key and key not in messages)
        _write(path, format_po(merged))
        untranslated = sum(1 for m in merged if m.msgid and not m.translated)
        print(f"{path.relative_to(ROOT)}: {untranslated} to translate, {len(dropped)} dropped")
        for key in dropped:
            print(f"  dropped: {key!r}")
    return 0


# -- compile --------------------------------------------------------------------


def compile_po(path: Path | str) -> bytes:
    """
    The GNU C{.mo} of the PO file C{path}: the header, then the translated
    and not fuzzy messages (the header is kept even if fuzzy, as GNU msgfmt
    does), keys sorted as bytes, no hash table, little-endian.
    """
    messages = read_po(path)
    header = messages.get("")
    charset = "utf-8"
    content_type = header_field(header, "Content-Type") or ""
    match = re.search(r"charset=([\w.-]+)", content_type)
    if match and match.group(1).upper() != "CHARSET":
        charset = match.group(1)
    table: dict[bytes, bytes] = {}
    for key, message in messages.items():
        if key == "":
            if message.msgstr and message.msgstr[0]:
                table[b""] = message.msgstr[0].encode(charset)
            continue
        if not message.translated:
            continue
        msgid = key if message.msgid_plural is None else key + "\0" + message.msgid_plural
        table[msgid.encode(charset)] = "\0".join(message.msgstr).encode(charset)

    keys = sorted(table)
    ids = strs = b""
    offsets = []
    for raw in keys:
        offsets.append((len(ids), len(raw), len(strs), len(table[raw])))
        ids += raw + b"\0"
        strs += table[raw] + b"\0"
    keystart = 7 * 4 + 16 * len(keys)
    valuestart = keystart + len(ids)
    key_index: list[int] = []
    value_index: list[int] = []
    for id_offset, id_length, str_offset, str_length in offsets:
        key_index += [id_length, id_offset + keystart]
        value_index += [str_length, str_offset + valuestart]
    output = struct.pack(
        "<7I",
        0x950412DE,  # magic
        0,  # revision
        len(keys),
        7 * 4,  # start of the key index
        7 * 4 + len(keys) * 8,  # start of the value index
        0,  # size of the hash table
        0,  # and its offset
    )
    output += struct.pack(f"<{len(key_index) + len(value_index)}I", *key_index, *value_index)
    return output + ids + strs


def compile_all() -> int:
    for path in catalogs():
        target = path.with_suffix(".mo")
        data = compile_po(path)
        messages = read_po(path)
        translated = sum(1 for key, m in messages.items() if key and m.translated)
        changed = _write_bytes(target, data)
        state = "written" if changed else "up to date"
        print(f"{target.relative_to(ROOT)}: {translated} of {len(messages) - ('' in messages)} messages, {state}")
    return 0


# -- files and command line -----------------------------------------------------


def _write(path: Path, text: str) -> bool:
    return _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> bool:
    """
    Write C{data} unless the file already holds it; whether it was written.
    """
    if path.exists() and path.read_bytes() == data:
        return False
    path.write_bytes(data)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/i18n.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("extract", help="update locale/vendepass.pot and every .po from the code")
    commands.add_parser("compile", help="compile every .po into its .mo")
    args = parser.parse_args(argv)
    return extract() if args.command == "extract" else compile_all()


if __name__ == "__main__":
    sys.exit(main())
