"""
Bad input never hurts the server (RELIABILITY-PLAN T11).

Hypothesis (the derandomized "ci" profile of tests/__init__.py) sends

  - arbitrary bytes, split into lines by whatever newlines they hold;
  - requests of every opcode (0-10 and random integers) whose documented
    fields hold arbitrary JSON values;
  - both, delivered in random chunks;

and a fixed-seed batch of 10,000 random lines, valid and invalid mixed, goes
through one connection. Every complete line gets exactly one response, in
order, echoing the request's id; every response is C{ok} or carries an error
code documented in docs/protocol.md, never C{internal_error}; the connection
stays open and a final ping still answers.

Also: every error code documented is expected by some test, and every code
the server defines is documented.

Everything is synchronous: a L{Clock}, an inline executor, a
L{StringTransport} per connection (L{tests.common.LineClient}).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tests.common import ALICE, BIG, BOB, DIRECT, NO_SUCH_DAY, START, TINY, TOMORROW, LineClient, make_service
from vendepass.protocol import MAX_LINE_BYTES
from vendepass.service import ReservationService

JSON = dict[str, Any]

HERE = Path(__file__).resolve().parent
PROTOCOL_DOC = HERE.parent / "docs" / "protocol.md"
ERRORS_MODULE = HERE.parent / "vendepass" / "errors.py"

HOLD_SECONDS = 60
RETURN = f"VP101-{TOMORROW}"  # REC -> SSA
BIG_NEXT_DAY = "VP200-2026-12-03"


def documented_codes() -> list[str]:
    """
    The codes of the "Error codes" table of docs/protocol.md, in order.
    """
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    match = re.search(r"^## Error codes\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match is not None, "docs/protocol.md has no '## Error codes' section"
    codes = re.findall(r"^\|\s*`([a-z0-9_]+)`\s*\|", match.group(1), re.M)
    assert codes, "the error code table of docs/protocol.md is empty"
    return codes


DOCUMENTED = frozenset(documented_codes())
# What a response may carry: a documented code, but never internal_error.
ALLOWED = DOCUMENTED - {"internal_error"}

# The search fields of routes (its row in the opcode table says "see below").
ROUTES_FIELDS = ("origin", "destination", "date", "max_legs", "include_sold_out", "limit")


def documented_fields() -> dict[int, tuple[str, ...]]:
    """
    The fields of each opcode's data, from the opcode table of
    docs/protocol.md (routes: L{ROUTES_FIELDS}, checked against its section).
    """
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    match = re.search(r"^## Opcodes\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match is not None, "docs/protocol.md has no '## Opcodes' section"
    fields: dict[int, tuple[str, ...]] = {}
    for number, data in re.findall(r"^\|\s*(\d+)\s*\|\s*\w+\s*\|[^|]*\|([^|]*)\|", match.group(1), re.M):
        fields[int(number)] = tuple(dict.fromkeys(re.findall(r"`([a-z_]+)`", data)))
    for name in ROUTES_FIELDS:
        assert f"`{name}`" in match.group(1), name
    fields[2] = ROUTES_FIELDS
    return fields


FIELDS = documented_fields()
ALL_FIELDS = tuple(sorted({name for names in FIELDS.values() for name in names}))

# Placeholders replaced, in the bytes of a request, by ids made in each
# example's setup: alice's and bob's live hold and active ticket.
PLACEHOLDERS = ("@alice_hold", "@alice_ticket", "@bob_hold", "@bob_ticket")
# Values that can make a request succeed, or fail for a business reason.
PLAUSIBLE: list[Any] = [
    TINY, BIG, DIRECT, NO_SUCH_DAY, RETURN, BIG_NEXT_DAY, "SSA", "REC", "MAO", "ssa", "GRU", "XXX",
    "alice", "alice-password", "bob", "bob-password", "1A", "2B", "30F", "31A", "0A", "9Z",
    TOMORROW, "2026-12-03", "9999-12-31", "0001-01-01", "2026-02-30", "H0000000000000000", "ABCDEFGH",
    "r1", "r2", 0, 1, 2, 3, 4, 500, 501, -1, True, False, None, *PLACEHOLDERS,
]
PLAUSIBLE_LISTS: list[Any] = [
    [TINY], [BIG], [TINY, BIG], [DIRECT], [TINY, RETURN], [BIG, TINY], [TINY, BIG, RETURN],
    ["1A"], ["2B"], [None, "1A"], ["1A", None], [None], [], ["@alice_hold"],
]

# Text, sometimes with lone surrogates (st.text() never draws them): they
# reach the server as "\\udXXX" escapes, or as invalid UTF-8.
texts = st.text(max_size=12) | st.text(st.characters(categories=["Cs", "Ll", "Nd", "Zs", "Cc", "So"]), max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=6,
)
field_values = st.one_of(
    json_values,
    json_values,
    st.sampled_from(PLAUSIBLE),
    st.sampled_from(PLAUSIBLE_LISTS),
    st.lists(st.sampled_from(PLAUSIBLE), min_size=1, max_size=4),
)
_ABSENT = object()


@st.composite
def fuzz_requests(draw: st.DrawFn) -> Any:
    """
    A request object: an opcode (0-10, or any integer, or now and then any
    JSON value), an id of any kind, and C{data} with the opcode's documented
    fields holding arbitrary JSON values (or C{data} itself anything).
    """
    opcode = draw(st.one_of(st.integers(0, 10), st.integers(0, 10), st.integers(0, 10), st.integers(), json_values))
    names = FIELDS.get(opcode, ALL_FIELDS) if type(opcode) is int else ALL_FIELDS
    names = names or ALL_FIELDS
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=min(len(names), 4)))
    data: Any = {name: draw(field_values) for name in chosen}
    kind = draw(st.sampled_from(["fields"] * 6 + ["extra", "absent", "null", "any"]))
    if kind == "extra":
        data.update(draw(st.dictionaries(st.sampled_from(ALL_FIELDS) | texts, field_values, max_size=3)))
    elif kind == "absent":
        data = _ABSENT
    elif kind == "null":
        data = None
    elif kind == "any":
        data = draw(json_values)
    message: JSON = {"opcode": opcode}
    request_id = draw(st.one_of(st.just(_ABSENT), st.integers(), texts, json_values))
    if request_id is not _ABSENT:
        message["id"] = request_id
    if data is not _ABSENT:
        message["data"] = data
    if draw(st.integers(0, 19)) == 0:
        # Now and then, a request that is not an object at all.
        return draw(st.sampled_from([[message], message.get("data"), opcode]))
    return message


def encode(message: Any, ascii_only: bool) -> bytes:
    """
    A JSON line (without its ending). Non-ASCII text with lone surrogates
    becomes invalid UTF-8 ("surrogatepass"), which the server must refuse.
    """
    return json.dumps(message, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def expected_echo(raw: bytes) -> tuple[Any, Any]:
    """
    The C{(id, opcode)} a response to line C{raw} must echo (docs: C{null}
    when the request had none or they could not be read).
    """
    try:
        message = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, None
    if not isinstance(message, dict):
        return None, None

    def readable(value: Any, *kinds: type) -> bool:
        return isinstance(value, kinds) and not isinstance(value, bool)

    request_id = message.get("id")
    opcode = message.get("opcode")
    return (request_id if readable(request_id, str, int) else None), (opcode if readable(opcode, int) else None)


def cut(packet: bytes, cuts: list[int]) -> Iterator[bytes]:
    """
    C{packet} in pieces, split at C{cuts} (taken modulo its length).
    """
    points = sorted({0, len(packet), *(c % (len(packet) + 1) for c in cuts)})
    for start, end in zip(points, points[1:]):
        yield packet[start:end]


class Conversation:
    """
    A fresh service and one connection to it, optionally logged in as alice;
    with C{objects}, alice (if logged in) and bob each have a live hold and an
    active ticket, whose ids replace the placeholders in the requests.
    """

    def __init__(self, logged_in: bool, objects: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service: ReservationService = make_service(hold_seconds=HOLD_SECONDS, clock=self.clock)
        self.ids = {
            "@bob_hold": "H00000000000000b0",
            "@bob_ticket": "BBBBBBBB",
            "@alice_hold": "H00000000000000a0",
            "@alice_ticket": "AAAAAAAA",
        }
        if objects:
            bob = LineClient(self.service)
            bob.messages()
            bob.login(BOB)
            self.ids["@bob_hold"] = bob.ok(6, {"flights": [BIG], "seats": ["9A"]})["hold"]["hold_id"]
            self.ids["@bob_ticket"] = bob.ok(3, {"flights": [BIG], "seats": ["9B"]})["ticket"]["ticket_id"]
        self.client = LineClient(self.service)
        self.client.messages()
        if logged_in:
            self.client.login(ALICE)
            if objects:
                self.ids["@alice_hold"] = self.client.ok(6, {"flights": [BIG], "seats": ["8A"]})["hold"]["hold_id"]
                self.ids["@alice_ticket"] = self.client.ok(3, {"flights": [BIG], "seats": ["8B"]})["ticket"]["ticket_id"]
        self.client.messages()

    def fill(self, raw: bytes) -> bytes:
        """
        C{raw} with the placeholders replaced by real ids.
        """
        for placeholder, real in self.ids.items():
            raw = raw.replace(placeholder.encode(), real.encode())
        return raw

    def feed(self, data: bytes) -> list[JSON]:
        """
        Deliver bytes; the responses (not the events) they caused.
        """
        return [m for m in self.client.feed(data) if "event" not in m]

    def stop(self) -> None:
        self.service.stopService()


def needs_objects(lines: list[bytes]) -> bool:
    """
    Whether C{lines} use placeholders (making the objects costs time).
    """
    return any(placeholder.encode() in raw for raw in lines for placeholder in PLACEHOLDERS)


def reply_problems(reply: JSON, raw: bytes) -> list[tuple[str, str]]:
    """
    What is wrong with C{reply} as the response to line C{raw}: C{(kind,
    detail)} pairs; none if it echoes the line's id and opcode and is C{ok}
    or carries a documented error code other than C{internal_error}.
    """
    problems: list[tuple[str, str]] = []
    detail = f"{raw[:200]!r} -> {reply}"
    if type(reply.get("ok")) is not bool:
        return [("no ok", detail)]
    echo = expected_echo(raw.removesuffix(b"\r"))
    if (reply.get("id"), reply.get("opcode")) != echo:
        problems.append(("wrong echo", f"expected {echo}: {detail}"))
    if reply["ok"]:
        if set(reply) != {"id", "opcode", "ok", "data"} or not isinstance(reply["data"], dict):
            problems.append(("bad success", detail))
        return problems
    error = reply.get("error")
    if set(reply) != {"id", "opcode", "ok", "error"} or not isinstance(error, dict):
        return [*problems, ("bad refusal", detail)]
    code = error.get("code")
    if code == "internal_error":
        problems.append(("internal_error", detail))
    elif code not in ALLOWED:
        problems.append((f"undocumented code {code!r}", detail))
    if not isinstance(error.get("message"), str):
        problems.append(("no message", detail))
    if "field" in error and not isinstance(error["field"], str):
        problems.append(("bad field", detail))
    return problems


class FuzzTestCase(SynchronousTestCase):
    def checkReplies(self, replies: list[JSON], lines: list[bytes]) -> None:
        """
        One response per line, in order, each echoing its line's id and
        opcode, each C{ok} or a documented error code other than
        C{internal_error}.
        """
        self.assertEqual(len(replies), len(lines), (lines, replies))
        for reply, raw in zip(replies, lines):
            self.checkReply(reply, raw)

    def checkReply(self, reply: JSON, raw: bytes) -> None:
        self.assertEqual(reply_problems(reply, raw), [])

    def assertStillServing(self, conversation: Conversation) -> None:
        """
        The connection is open and a ping answers.
        """
        self.assertFalse(conversation.client.transport.disconnecting)
        [reply] = conversation.feed(b'{"id": "last", "opcode": 0}\n')
        self.assertEqual((reply["id"], reply["ok"], set(reply["data"])), ("last", True, {"time"}))
        self.assertFalse(conversation.client.transport.disconnecting)


def _lines(packet: bytes) -> list[bytes]:
    """
    The complete lines of C{packet} (without their C{\\n}).
    """
    return packet.split(b"\n")[:-1]


class ArbitraryBytesTests(FuzzTestCase):
    """
    (a) Bytes of any kind, split into lines by the newlines they hold.
    """

    @settings(max_examples=500)
    @given(
        pieces=st.lists(st.binary(max_size=80), max_size=10),
        endings=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r\r\n", b"\n\n"]), min_size=10, max_size=10),
        tail=st.binary(max_size=40),
        logged_in=st.booleans(),
        cuts=st.lists(st.integers(min_value=0), max_size=8),
    )
    def test_arbitrary_bytes(
        self, pieces: list[bytes], endings: list[bytes], tail: bytes, logged_in: bool, cuts: list[int]
    ) -> None:
        conversation = Conversation(logged_in, objects=False)
        try:
            packet = b"".join(piece + ending for piece, ending in zip(pieces, endings)) + tail
            replies: list[JSON] = []
            for chunk in cut(packet, cuts):
                replies.extend(conversation.feed(chunk))
            # One response per complete line: as many as there are newlines.
            self.assertEqual(len(replies), packet.count(b"\n"))
            self.checkReplies(replies, _lines(packet))
            self.assertFalse(conversation.client.transport.disconnecting)
            # The unfinished last line is a line once it ends.
            rest = packet.rsplit(b"\n", 1)[-1]
            self.checkReplies(conversation.feed(b"\n"), [rest])
            self.assertStillServing(conversation)
        finally:
            conversation.stop()


class FieldValueTests(FuzzTestCase):
    """
    (b) Every field of every opcode's request, with arbitrary JSON values.
    """

    @settings(max_examples=2000)
    @given(
        messages=st.lists(st.tuples(fuzz_requests(), st.booleans(), st.sampled_from([b"\n", b"\r\n"])), min_size=1, max_size=2),
        logged_in=st.booleans(),
        cuts=st.lists(st.integers(min_value=0), max_size=4),
    )
    def test_arbitrary_field_values(
        self, messages: list[tuple[Any, bool, bytes]], logged_in: bool, cuts: list[int]
    ) -> None:
        encoded = [encode(message, ascii_only) for message, ascii_only, _ in messages]
        conversation = Conversation(logged_in, objects=needs_objects(encoded))
        try:
            lines = [conversation.fill(raw) for raw in encoded]
            packet = b"".join(raw + ending for raw, (_, _, ending) in zip(lines, messages))
            replies: list[JSON] = []
            for chunk in cut(packet, cuts):
                replies.extend(conversation.feed(chunk))
            self.checkReplies(replies, lines)
            self.assertStillServing(conversation)
        finally:
            conversation.stop()


def summary(reply: JSON) -> tuple[Any, ...]:
    """
    What must not depend on how the bytes were chunked (hold and ticket ids
    are random, so not those).
    """
    return (reply["id"], reply["opcode"], reply["ok"], None if reply["ok"] else reply["error"]["code"])


any_line = st.one_of(
    st.tuples(fuzz_requests(), st.booleans()).map(lambda pair: encode(*pair)),
    st.binary(max_size=40).map(lambda raw: raw.replace(b"\n", b"")),
)


class ChunkingTests(FuzzTestCase):
    """
    (c) How the bytes are cut into chunks changes nothing.
    """

    @settings(max_examples=200)
    @given(
        lines=st.lists(any_line, min_size=1, max_size=8),
        crlf=st.booleans(),
        logged_in=st.booleans(),
        cuts=st.lists(st.integers(min_value=0), max_size=12),
    )
    def test_chunking_is_invisible(self, lines: list[bytes], crlf: bool, logged_in: bool, cuts: list[int]) -> None:
        ending = b"\r\n" if crlf else b"\n"
        results = []
        for chunked in (False, True):
            conversation = Conversation(logged_in, objects=needs_objects(lines))
            try:
                filled = [conversation.fill(raw) for raw in lines]
                packet = b"".join(raw + ending for raw in filled)
                chunks = list(cut(packet, cuts)) if chunked else [packet]
                replies: list[JSON] = []
                for chunk in chunks:
                    replies.extend(conversation.feed(chunk))
                self.checkReplies(replies, filled)
                self.assertStillServing(conversation)
                results.append([summary(reply) for reply in replies])
            finally:
                conversation.stop()
        self.assertEqual(results[0], results[1])

    def test_byte_by_byte(self) -> None:
        """
        A session delivered one byte at a time is answered as if whole.
        """
        conversation = Conversation(logged_in=False)
        try:
            requests = [
                {"id": 1, "opcode": 1, "data": {"username": "alice", "password": "alice-password"}},
                {"id": 2, "opcode": 6, "data": {"flights": [TINY, BIG], "seats": ["1A", None]}},
                {"id": "\u2708", "opcode": 8, "data": {"flight": TINY}},
                {"id": 4, "opcode": 42},
                {"id": 5, "opcode": 3, "data": {"flights": [BIG]}},
            ]
            lines = [json.dumps(r, ensure_ascii=False).encode() for r in requests] + [b"{oops", b"\xff\xfe", b""]
            packet = b"\r\n".join(lines) + b"\r\n"
            replies: list[JSON] = []
            for i in range(len(packet)):
                replies.extend(conversation.feed(packet[i : i + 1]))
            self.checkReplies(replies, lines)
            self.assertEqual(
                [summary(r) for r in replies],
                [
                    (1, 1, True, None),
                    (2, 6, True, None),
                    ("\u2708", 8, True, None),
                    (4, 42, False, "unknown_opcode"),
                    (5, 3, True, None),
                    (None, None, False, "malformed_json"),
                    (None, None, False, "malformed_json"),
                    (None, None, False, "malformed_json"),
                ],
            )
            self.assertStillServing(conversation)
        finally:
            conversation.stop()


# -- hostile input: the errors stay ours, small and documented (issue 16 item 5) -----

# What of Python must never reach a customer: its exception messages, their
# advice ("use sys.set_int_max_str_digits()"), json's positions, class names.
PYTHON_INTERNALS = re.compile(
    r"sys\.|Traceback|int_max_str_digits|Exceeds the limit|[A-Za-z]+(Error|Exception)\b"
    r"|line \d+ column \d+|\(char \d+\)|File \"|object at 0x|<class "
)
# What the error object of any reply may weigh (the id is the client's own):
# 64 characters echoed in the message and in a field, each at worst an
# escape of some 11 bytes in the message ("\\U000e0001") and 6 in the field.
HOSTILE_ERROR_BYTES = 1500

digits = st.integers(1, 9).map(str)
huge_integers = st.builds(
    lambda sign, first, n: sign + first + "7" * n, st.sampled_from(["", "-"]), digits, st.integers(4290, 20_000)
)
hostile_values = st.one_of(
    huge_integers,
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e99999", "1" + "0" * 5000 + ".5", "-0", "1E-99999"]),
    # Deep nesting, closed or not.
    st.builds(lambda n, closed: "[" * n + ("]" * n if closed else ""), st.integers(500, 20_000), st.booleans()),
    st.builds(lambda n: '{"a":' * n + "1" + "}" * n, st.integers(500, 10_000)),
    # Long text of every kind, and lone surrogates.
    st.builds(lambda c, n: json.dumps(c * n), st.sampled_from(["V", "\u2708", "\\", '"', "\n", "\x00"]), st.integers(60, 20_000)),
    st.sampled_from(['"\\ud800"', '"\\udfff\\ud800"', '"\\u00"', '"\\x41"', '"abc', "tru", "nul", "01", "1.", ".5", "+1"]),
    # Lists of long flight ids, seats.
    st.builds(lambda n, k: json.dumps(["F" * n] * k), st.integers(60, 5000), st.integers(1, 3)),
)
invalid_utf8 = st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xc0\xaf"])


@st.composite
def hostile_lines(draw: st.DrawFn) -> bytes:
    """
    A line with a hostile value somewhere: in a field of an opcode's data,
    as the id, the opcode, the data or the whole line; or a request with
    invalid UTF-8 spliced in, or cut short.
    """
    opcode = draw(st.integers(0, 10))
    name = draw(st.sampled_from(FIELDS.get(opcode) or ALL_FIELDS))
    value = draw(hostile_values)
    where = draw(st.sampled_from(["field", "field", "field", "id", "opcode", "data", "line", "utf8", "cut"]))
    template = {"id": "h", "opcode": opcode, "data": {name: "@@"}}
    if where == "id":
        template = {"id": "@@", "opcode": opcode}
    elif where == "opcode":
        template = {"id": "h", "opcode": "@@"}
    elif where == "data":
        template = {"id": "h", "opcode": opcode, "data": "@@"}
    raw = json.dumps(template).replace('"@@"', value).encode()
    if where == "line":
        raw = value.encode()
    elif where == "utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(invalid_utf8) + raw[at:]
    elif where == "cut":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    return raw[: MAX_LINE_BYTES - 2].replace(b"\n", b"")


class HostileInputTests(FuzzTestCase):
    """
    (e) Huge integers, deep nesting, invalid UTF-8, NaN and Infinity, huge
    floats, long text anywhere: every reply carries a documented code, a
    message of ours (nothing of Python's internals) and an error object of
    bounded size, whatever the request held.
    """

    @settings(max_examples=300)
    @given(lines=st.lists(hostile_lines(), min_size=1, max_size=3), logged_in=st.booleans())
    def test_errors_are_ours(self, lines: list[bytes], logged_in: bool) -> None:
        conversation = Conversation(logged_in, objects=False)
        try:
            replies = conversation.feed(b"".join(raw + b"\n" for raw in lines))
            self.checkReplies(replies, lines)
            for reply in replies:
                if reply["ok"]:
                    continue
                message = reply["error"]["message"]
                self.assertIsNone(PYTHON_INTERNALS.search(message), message[:300])
                size = len(json.dumps(reply["error"], ensure_ascii=False).encode())
                self.assertLess(size, HOSTILE_ERROR_BYTES, str(reply)[:300])
            self.assertStillServing(conversation)
        finally:
            conversation.stop()


# -- 10,000 lines through one connection ---------------------------------------------

SEED = 1234
BATCH_LINES = 10_000
LINES_PER_PACKET = 50
AIRPORTS = ["SSA", "REC", "MAO", "ssa", "GRU", "XXX", "", "SS"]
DATES = [TOMORROW, "2026-12-03", "2026-12-01", "2026-11-30", "2027-01-15", "9999-12-31", "0001-01-01",
         "2026-13-01", "2026-02-30", "20261202", "2026-W49-3", ""]
FLIGHT_IDS = [TINY, BIG, RETURN, DIRECT, BIG_NEXT_DAY, NO_SUCH_DAY, "VP201-2026-12-02", "VP100-2026-12-31",
              "VP100-2027-01-15", "VP100-2026-11-30", "vp100-2026-12-02", ""]
ITINERARIES = [[TINY], [BIG], [TINY, BIG], [DIRECT], [TINY, RETURN], [BIG_NEXT_DAY], [RETURN], [BIG, TINY],
               [TINY, BIG, BIG_NEXT_DAY], [TINY, TINY], [], [NO_SUCH_DAY], ["VP100-2026-12-03", BIG_NEXT_DAY]]
SEATS = ["1A", "1B", "2A", "2B", "3C", "30F", "31A", "0A", "1G", "a1", None]
USERS = [ALICE, BOB, ("alice", "wrong-password"), ("zelda", "zelda-password"), ("Alice!", "x")]


class RandomLines:
    """
    A fixed-seed stream of request lines, valid and invalid mixed, that
    reuses the hold and ticket ids the server handed out.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.holds: list[str] = ["H0000000000000000"]
        self.tickets: list[str] = ["ABCDEFGH"]
        self.count = 0

    def harvest(self, replies: list[JSON]) -> None:
        for reply in replies:
            data = reply.get("data") or {}
            if "hold" in data:
                self.holds.append(data["hold"]["hold_id"])
            if "ticket" in data:
                self.tickets.append(data["ticket"]["ticket_id"])
            for ticket in data.get("tickets", []):
                self.tickets.append(ticket["ticket_id"])
        del self.holds[:-50], self.tickets[:-50]

    def json_value(self, depth: int = 0) -> Any:
        rng = self.rng
        kind = rng.randrange(9 if depth < 3 else 7)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.choice([0, -1, 1, 2**31, -(2**63), 10**30, rng.randint(-1000, 1000)])
        if kind == 3:
            return rng.choice([0.5, -0.0, 1e308, float("nan"), float("inf"), 1.0])
        if kind in (4, 5):
            return rng.choice(["", " ", "x", "\u2708", "\ud800", "\x00", "a" * 300, *FLIGHT_IDS[:3], *AIRPORTS[:3]])
        if kind == 6:
            return rng.choice(PLAUSIBLE)
        if kind == 7:
            return [self.json_value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice([*ALL_FIELDS, "", "x"]): self.json_value(depth + 1) for _ in range(rng.randrange(4))}

    def valid(self) -> JSON:
        """
        A well-formed request of a random opcode with sensible arguments.
        """
        rng = self.rng
        opcode = rng.choice([0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5, 5, 6, 6, 6, 6, 7, 7, 8, 8, 10] * 2 + [9])
        data: JSON = {}
        if opcode == 1:
            # Mostly right: failed logins may be throttled, and then even
            # right ones fail for a while.
            username, password = rng.choice(USERS) if rng.random() < 0.3 else rng.choice(USERS[:2])
            data = {"username": username, "password": password}
        elif opcode == 10:
            name = rng.choice(["alice", "zz", "A_b", "x" * 33, "user%d" % rng.randrange(100000)])
            data = {"username": name, "password": rng.choice(["password-%d" % rng.randrange(10**6), "short", "p" * 257])}
        elif opcode == 2:
            if rng.random() < 0.8:
                data = {"origin": rng.choice(AIRPORTS), "destination": rng.choice(AIRPORTS)}
                options: list[tuple[str, list[Any]]] = [
                    ("date", DATES),
                    ("max_legs", [0, 1, 2, 3, 4]),
                    ("include_sold_out", [True, False]),
                    ("limit", [0, 1, 2, 50, 500, 501]),
                ]
                for name, values in options:
                    if rng.random() < 0.4:
                        data[name] = rng.choice(values)
        elif opcode == 8:
            data = {"flight": rng.choice(FLIGHT_IDS)}
        elif opcode in (3, 6):
            if opcode == 3 and rng.random() < 0.5:
                data = {"hold_id": rng.choice(self.holds)}
            else:
                flights = list(rng.choice(ITINERARIES))
                data = {"flights": flights}
                if rng.random() < 0.5:
                    data["seats"] = [rng.choice(SEATS) for _ in range(len(flights) + (rng.random() < 0.1))]
        elif opcode == 7:
            data = {"hold_id": rng.choice(self.holds)}
        elif opcode == 5:
            data = {"ticket_id": rng.choice(self.tickets)}
        if opcode in (3, 5, 6, 7) and rng.random() < 0.3:
            # A small pool, so keys are reused: replays, and reuse for
            # another kind of operation.
            data["request_id"] = rng.choice(["r%d" % rng.randrange(30), "", "with space", "\u2708", "r" * 129])
        message: JSON = {"opcode": opcode}
        if rng.random() < 0.9:
            message["data"] = data
        return message

    def mutate(self, message: JSON) -> Any:
        """
        A near-valid request: one thing in it wrong.
        """
        rng = self.rng
        data = message.get("data")
        kind = rng.randrange(8)
        if kind == 0 and isinstance(data, dict) and data:
            data.pop(rng.choice(sorted(data)))
        elif kind in (1, 2) and isinstance(data, dict):
            data[rng.choice([*sorted(data), *ALL_FIELDS])] = self.json_value()
        elif kind == 3:
            message["opcode"] = rng.choice([-1, 11, 255, 2**64, "1", 1.0, True, None, [1], {}])
        elif kind == 4:
            message["id"] = rng.choice([1.5, True, None, [], {}, "ok", 2**70])
        elif kind == 5:
            message["data"] = rng.choice([[], "data", 1, True, [data]])
        elif kind == 6:
            message.pop("opcode")
        else:
            return rng.choice([[message], "request", 7, None])
        return message

    def junk(self) -> bytes:
        """
        A line that is not a request at all.
        """
        rng = self.rng
        kind = rng.randrange(12)
        if kind == 0:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(60))).replace(b"\n", b"")
        if kind == 1:
            whole = json.dumps(self.valid()).encode()
            return whole[: rng.randrange(len(whole))]
        if kind == 2:
            return rng.choice([b"", b" ", b"\t", b"\r", b"\x00"])
        if kind == 3:
            return rng.choice([b"\xff", b"\xc3\x28", b'{"opcode": 0, "id": "\xed\xa0\x80"}', b"\xef\xbb\xbf{}"])
        if kind == 4:
            depth = rng.choice([50, 1000, 20000])
            return b"[" * depth + b"]" * depth
        if kind == 5:
            return b'{"opcode": 0, "id": ' + b"9" * rng.choice([100, 4300, 5000]) + b"}"
        if kind == 6:
            return rng.choice([b'{"opcode": NaN}', b'{"opcode": 0, "id": Infinity}', b'{"opcode": 0} {"opcode": 0}'])
        if kind == 7:
            return rng.choice([b'{"id": "\\ud800", "opcode": 0}', b'{"opcode": 8, "data": {"flight": "\\udfff"}}'])
        if kind == 8:
            return json.dumps(self.json_value()).encode()
        if kind == 9:
            return b'{"opcode": 0, "opcode": 4, "id": 1, "id": "dup"}'
        if kind == 10:
            return b'{"opcode": 2, "data": {"origin": "SSA", "destination": "MAO", "pad": "' + b"p" * 60000 + b'"}}'
        return json.dumps(self.valid(), ensure_ascii=False).encode().upper()

    def line(self) -> bytes:
        """
        The next line (without its ending).
        """
        self.count += 1
        roll = self.rng.random()
        if roll < 0.5:
            message = self.valid()
        elif roll < 0.85:
            message = self.mutate(self.valid())
        else:
            return self.junk()
        if isinstance(message, dict) and self.rng.random() < 0.9:
            message["id"] = self.rng.choice([self.count, f"n{self.count}"])
        return encode(message, self.rng.random() < 0.5)


class RandomLinesTests(FuzzTestCase):
    """
    A fixed-seed batch of 10,000 random lines through one connection.
    """

    def test_ten_thousand_lines(self) -> None:
        """
        Problems are collected rather than failing at the first, so that one
        run shows all of them (a count per kind and a few examples each).
        """
        conversation = Conversation(logged_in=False)
        try:
            source = RandomLines(SEED)
            rng = source.rng
            codes: Counter[str] = Counter()
            problems: Counter[str] = Counter()
            examples: dict[str, list[str]] = {}
            sent = answered = keepalives = 0

            def deliver(lines: list[bytes], endings: list[bytes]) -> None:
                nonlocal sent, answered
                packet = b"".join(raw + ending for raw, ending in zip(lines, endings))
                replies: list[JSON] = []
                position = 0
                while position < len(packet):
                    step = rng.choice([1, 7, 100, 1000, 4096, len(packet)])
                    replies.extend(conversation.feed(packet[position : position + step]))
                    position += step
                sent += len(lines)
                answered += len(replies)
                if len(replies) != len(lines):
                    self.fail(f"{len(lines)} lines, {len(replies)} replies: {lines} {replies}")
                for reply, raw in zip(replies, lines):
                    codes["ok" if reply.get("ok") else reply.get("error", {}).get("code")] += 1
                    for kind, detail in reply_problems(reply, raw):
                        problems[kind] += 1
                        examples.setdefault(kind, [])
                        if len(examples[kind]) < 3:
                            examples[kind].append(detail)
                self.assertFalse(conversation.client.transport.disconnecting)
                source.harvest(replies)

            packets = BATCH_LINES // LINES_PER_PACKET
            for packet_number in range(packets):
                lines = [conversation.fill(source.line()) for _ in range(LINES_PER_PACKET)]
                self.assertTrue(all(len(raw) < MAX_LINE_BYTES for raw in lines))
                deliver(lines, [rng.choice([b"\n", b"\n", b"\n", b"\r\n"]) for _ in lines])
                # Time passes: holds expire.
                conversation.clock.advance(rng.uniform(0, 60))
                if packet_number == packets // 2:
                    # Half-way, the first flights depart. Pings every ten
                    # minutes keep the connection from being closed as idle.
                    for _ in range(26 * 6):
                        conversation.clock.advance(600)
                        deliver([b'{"opcode": 0, "id": "keepalive"}'], [b"\n"])
                        keepalives += 1
            Logger().info(
                "T11 batch: {sent} lines ({keepalives} keep-alive pings), {answered} replies, codes {codes}",
                sent=sent, keepalives=keepalives, answered=answered, codes=dict(codes.most_common()),
            )
            self.assertEqual((sent, answered), (BATCH_LINES + keepalives, BATCH_LINES + keepalives))
            self.assertStillServing(conversation)
            report = "\n".join(
                f"{count} x {kind}, e.g.\n    " + "\n    ".join(examples[kind]) for kind, count in problems.most_common()
            )
            self.assertEqual(problems, Counter(), f"\n{report}\ncodes: {codes}")
            # The batch reached the business rules, not only the parser.
            self.assertGreater(codes["ok"], BATCH_LINES // 10, codes)
            expected = {
                "malformed_json", "invalid_request", "unknown_opcode", "not_logged_in", "bad_credentials",
                "username_taken", "unknown_airport", "unknown_flight", "unknown_seat", "invalid_itinerary",
                "hold_not_found", "ticket_not_found", "already_cancelled", "flight_departed",
            }
            self.assertEqual(expected - set(codes), set(), codes)
        finally:
            conversation.stop()


# -- the error codes: documented, produced, tested --------------------------------------


class ErrorCodeDocumentationTests(SynchronousTestCase):
    def test_every_error_code_documented_is_produced(self) -> None:
        """
        Each code of the table in docs/protocol.md is expected (as a quoted
        string) by at least one test module other than this one.
        """
        sources = {
            path.name: path.read_text(encoding="utf-8")
            for path in sorted(HERE.glob("test_*.py"))
            if path.name != Path(__file__).name
        }
        untested = [
            code
            for code in documented_codes()
            if not any(f'"{code}"' in text or f"'{code}'" in text for text in sources.values())
        ]
        self.assertEqual(untested, [], f"documented codes no test expects (searched {sorted(sources)})")

    def test_every_error_code_defined_is_documented(self) -> None:
        """
        Every C{code = "..."} of vendepass/errors.py, but C{session_closed}
        (which never reaches a client), is in the table of docs/protocol.md.
        """
        defined = re.findall(
            r'^\s+code(?:\s*:\s*[^=]+)?\s*=\s*"([^"]+)"', ERRORS_MODULE.read_text(encoding="utf-8"), re.M
        )
        self.assertIn("hold_not_found", defined)
        undocumented = sorted(set(defined) - {"session_closed"} - DOCUMENTED)
        self.assertEqual(undocumented, [])

    def test_opcode_table_parsed(self) -> None:
        self.assertEqual(sorted(FIELDS), list(range(11)))
        self.assertEqual(FIELDS[1], ("username", "password"))
        self.assertEqual(FIELDS[5][0], "ticket_id")
        self.assertIn("hold_id", FIELDS[3])

    def test_table_parsed(self) -> None:
        codes = documented_codes()
        self.assertEqual(len(codes), len(set(codes)))
        self.assertIn("malformed_json", codes)
        self.assertIn("internal_error", codes)
        self.assertGreaterEqual(len(codes), 15)
