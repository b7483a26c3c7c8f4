"""
C{vendepass-bench}: the command line. Exit codes: 0 when the invariant
checks hold, 1 when one fails, 2 on a usage or connection error (or the
hard C{--timeout}).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
from typing import Any, Sequence, TextIO

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from vendepass.bench.common import Settings
from vendepass.bench.generator import DEFAULT_CONNECT, PER_ADDRESS, BenchError, Progress, Target
from vendepass.bench.report import Report
from vendepass.bench.scenarios import SCENARIOS, Bench

# Per scenario: (help, default customers, default duration, duration help).
COMMANDS = {
    "buy": ("customers log in and buy seats across the flights of the sales window", 1000, 10.0,
            "stop buying after this many seconds"),
    "flash-sale": ("customers log in, then all buy on one flight at the same moment", 2000, 30.0,
                   "wait at most this long for the answers"),
    "browse": ("route searches over the whole sales window, and seat maps", 100, 10.0,
               "stop after this many seconds"),
    "idle": ("open idle connections and report the server's memory per connection", 10000, 5.0,
             "hold the connections open this long"),
    "ceiling": ("drive a bare Twisted JSON-lines echo server (started here) with the same generator", 1000, 10.0,
                "stop after this many seconds"),
    "check": ("check the invariants of a server (and its database with --db)", 0, 10.0, "unused"),
}
PREFIX = re.compile(r"[a-z0-9_]{1,24}")


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="vendepass-bench",
        description="Drive a running VendePass server with many concurrent simulated customers.",
        epilog="Exit codes: 0 invariants hold, 1 an invariant check failed, 2 usage or connection error.",
    )
    commands = top.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, (help_text, customers, duration, duration_help) in COMMANDS.items():
        p = commands.add_parser(name, help=help_text, description=help_text + ".")
        if name != "ceiling":
            p.add_argument("--connect", default=DEFAULT_CONNECT, metavar="ENDPOINT",
                           help=f"the server, as a Twisted client endpoint string (default {DEFAULT_CONNECT})")
            p.add_argument("--also-connect", action="append", default=[], metavar="ENDPOINT",
                           help="another server sharing the same database (repeatable): customers are dealt"
                                " out to --connect and these in turn; the server figures are --connect's")
        what = "connections" if name == "idle" else "bench accounts to log in" if name == "check" else "customers"
        p.add_argument("-c", "--customers", type=int, default=customers, metavar="N",
                       help=f"{what}, one connection each (default {customers:,})")
        if name != "check":
            p.add_argument("--duration", type=_positive(float), default=duration, metavar="SECONDS",
                           help=f"{duration_help} (default {duration:g})")
        if name in ("buy", "browse", "ceiling"):
            p.add_argument("--count", type=_positive(int), default=1_000_000, metavar="N",
                           help="stop after this many operations (purchases, requests) (default 1,000,000)")
        p.add_argument("--timeout", type=_positive(float), default=600.0, metavar="SECONDS",
                       help="hard limit on the whole run; exit 2 when reached (default 600)")
        if name == "buy":
            p.add_argument("--mode", choices=("one-step", "hold-buy", "mixed"), default="one-step",
                           help="one-step: buy with the server picking the seat; hold-buy: hold then buy the hold;"
                                " mixed: either, at random (default one-step)")
        if name == "flash-sale":
            p.add_argument("--flight", metavar="ID",
                           help="the flight to sell (default: the first future flight with the most free seats)")
        if name == "browse":
            p.add_argument("--seatmaps-per-search", type=int, default=1, metavar="N",
                           help="seat maps each customer asks for after each search (default 1)")
        if name in ("buy", "flash-sale", "browse"):
            p.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                           help="do not also run the ceiling at the same concurrency")
            p.add_argument("--ceiling-duration", type=_positive(float), metavar="SECONDS",
                           help="how long the ceiling runs (default: --duration, at most 5)")
        if name in ("buy", "flash-sale"):
            p.add_argument("--no-check", dest="check", action="store_false",
                           help="skip the invariant checks at the end")
            p.add_argument("--save-acks", metavar="FILE",
                           help="write the acknowledged purchases to FILE (JSON), for a later `check --acks FILE`")
        if name in ("buy", "flash-sale", "check"):
            p.add_argument("--db", metavar="PATH",
                           help="the server's SQLite database: also run vendepass-admin verify on it")
        if name == "check":
            p.add_argument("--acks", metavar="FILE",
                           help="acknowledged purchases saved by --save-acks: check that each is still there")
        if name != "ceiling":
            p.add_argument("--server-pid", type=int, metavar="PID",
                           help="the server's pid, to read its memory (default: the process listening on the loopback port)")
        p.add_argument("--no-spread", dest="spread", action="store_false",
                       help="do not spread loopback connections over many source addresses 127.0.x.y")
        p.add_argument("--per-address", type=_positive(int), default=PER_ADDRESS, metavar="N",
                       help=f"connections per source address when spreading (default {PER_ADDRESS})")
        p.add_argument("--connect-concurrency", type=int, default=0, metavar="N",
                       help="connections being opened at once (default 0: all at once)")
        p.add_argument("--user-prefix", dest="prefix", default="bench",
                       help="bench accounts are PREFIX0, PREFIX1, ... (default bench)")
        p.add_argument("--password", default="bench-password", help="their password (default bench-password)")
        p.add_argument("--seed", type=int, default=1, help="seed of the random choices (default 1)")
        p.add_argument("--json", action="store_true", help="print the report as one JSON object")
        p.add_argument("-q", "--quiet", dest="progress", action="store_false", help="no progress line on stderr")
    # Run by vendepass.bench.prefill.main (see run): listed here for --help.
    commands.add_parser("prefill", add_help=False,
                        help="add sold tickets on departed flights to a stopped server's database (prefill --help)")
    return top


def settings(argv: Sequence[str] | None) -> Settings:
    top = parser()
    args = top.parse_args(argv)
    fields = {a.name: getattr(args, a.name) for a in Settings.__attrs_attrs__ if hasattr(args, a.name)}
    if not PREFIX.fullmatch(args.prefix):
        top.error("--user-prefix must be 1 to 24 lowercase letters, digits or _")
    if not 8 <= len(args.password) <= 256:
        top.error("--password must have 8 to 256 characters")
    if args.customers < (0 if args.scenario == "check" else 1):
        top.error("--customers must be at least 1")
    if args.scenario == "check" and args.customers == 0 and not args.acks and not args.db:
        sys.stderr.write("vendepass-bench: checking the seat maps only (no --customers, --acks or --db)\n")
    return Settings(**fields)


def raise_file_limit() -> None:
    """
    Raise the soft limit of open files to the hard one: one per connection.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def run(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prefill"]:
        from vendepass.bench.prefill import main as prefill

        return prefill(argv[1:], out, err)
    s = settings(argv)
    raise_file_limit()
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(err), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    from twisted.internet import reactor

    outcome: list[Report | Failure] = []
    progress = Progress(reactor, err, s.progress)

    def start() -> None:
        try:
            target = Target.parse(reactor, s.connect, s.spread, s.per_address).with_others(
                [Target.parse(reactor, other, s.spread, s.per_address) for other in s.also_connect]
            )
            bench = Bench(reactor, s, target, progress)
        except BenchError as e:
            finish(Failure(e))
            return
        d = Deferred.fromCoroutine(SCENARIOS[s.scenario](bench))
        d.addTimeout(s.timeout, reactor)
        d.addBoth(finish)

    def finish(result: Report | Failure) -> None:
        outcome.append(result)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    result = outcome[0] if outcome else Failure(BenchError("interrupted"))
    if isinstance(result, Failure):
        progress.stop()
        if result.check(BenchError):
            message = str(result.value)
        elif result.check(TimeoutError):
            message = f"timed out after {s.timeout:g} s (--timeout)"
        else:
            message = result.getTraceback()
        err.write(f"vendepass-bench: {message}\n")
        if s.json:
            out.write(json.dumps({"scenario": s.scenario, "ok": False, "error": message}) + "\n")
        return 2
    out.write(json.dumps(result.to_json()) + "\n" if s.json else result.render())
    out.flush()
    return 0 if result.ok else 1


def main() -> None:
    sys.exit(run())
