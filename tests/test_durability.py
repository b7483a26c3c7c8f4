"""
Power-loss durability: the fsync-before-ack audit (reliability plan, T6).

kill -9 cannot tell a purchase that is on disk from one that is only in the
operating system's page cache: both survive the death of the process. A
power loss keeps only what was fsynced. So this test runs a real
C{twistd vendepass} under C{strace}, makes a few hundred one-step purchases
from one client and checks in the trace that every purchase acknowledgement
(the write of C{"opcode":3,"ok":true} on that client's socket) comes after an
C{fsync}/C{fdatasync} of the database's WAL file that was issued after the
last write to the WAL before it.

A second test runs the same audit against a server whose database was
switched to C{synchronous=NORMAL} (a wrapper monkeypatches the store's
C{_connect}, in the writer process too; the server code is unchanged), and
requires the audit to fail:
proof that the check has teeth. (That mutant passes the kill -9 test.)

Skipped only when C{strace} is not installed or ptrace is not permitted.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from twisted.trial.unittest import SkipTest, TestCase

from tests.test_crash import SeatPool, seat_layouts
from tests.test_end_to_end import DEADLINE, UNCAPPED, Connection, ServerProcess, twistd

PURCHASES = 300
DATABASE = "vendepass.sqlite3"
TRACED = "write,pwrite64,pwritev,pwritev2,writev,fsync,fdatasync,sendto,sendmsg"

# The server with its database switched to synchronous=NORMAL after the
# store opens it: the mutant the audit must catch. The patch is applied here
# and, through a sitecustomize on the path that the server's processes
# inherit, in the SQLite writer process too (vendepass.store.writer), which
# opens the connection that writes. sys.argv is ["-c", <twistd
# arguments>...], as twistd expects.
NORMAL_PATCH = """
import vendepass.store.sqlite as store

original = store._connect


def _connect(path):
    db = original(path)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


store._connect = _connect
"""
NORMAL_MUTANT = f"""
import os
import sys
import tempfile

PATCH = {NORMAL_PATCH!r}
directory = tempfile.mkdtemp()
with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
    f.write(PATCH)
sys.path.insert(0, directory)
exec(PATCH)

from twisted.scripts.twistd import run

run()
"""


def strace_or_skip() -> str:
    """
    The path of C{strace}, or skip the test if it is missing or may not trace.
    """
    strace = shutil.which("strace")
    if strace is None:
        raise SkipTest("strace is not installed (CI installs it: apt-get install strace)")
    probe = subprocess.run(
        [strace, "-f", "-o", os.devnull, "--", sys.executable, "-c", "pass"],
        capture_output=True,
        timeout=DEADLINE,
    )
    if probe.returncode != 0:
        message = probe.stderr.decode("utf-8", "replace")
        if "ptrace" in message or "Operation not permitted" in message:
            raise SkipTest(f"ptrace is not permitted here: {message.strip()}")
        raise AssertionError(f"strace does not work: {message}")
    return strace


def children(pid: int) -> list[int]:
    """
    The processes whose parent is C{pid}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


class TracedServer(ServerProcess):
    """
    A C{twistd -n vendepass} subprocess (or C{server}, any command taking
    twistd's arguments) run under C{strace -f}, writing the trace to C{trace}.
    """

    def __init__(
        self, directory: Path, strace: str, trace: Path, server: list[str], options: tuple[str, ...] = ()
    ) -> None:
        self.directory = directory
        self.trace = trace
        self.process = subprocess.Popen(
            [
                strace, "-f", "-tt", "-yy", "-s", "64", "-e", f"trace={TRACED}", "-o", str(trace), "--",
                *server, "-n", "--logfile=-", "--pidfile=", "vendepass",
                "--listen", "tcp:0:interface=127.0.0.1", "--db", str(directory / DATABASE), *UNCAPPED,
                *options,
            ],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_for_port()

    def _signal_server(self, signum: int) -> None:
        for pid in children(self.process.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """
        Shut the server down cleanly and wait for strace to finish the trace.
        """
        self._signal_server(signal.SIGTERM)
        self.process.wait(timeout=DEADLINE)

    def kill(self) -> None:
        # Killing strace alone would leave the server running, detached.
        if self.process.poll() is None:
            self._signal_server(signal.SIGKILL)
        super().kill()


@dataclass
class Syscall:
    """
    One system call of the trace: where its entry and its exit are in the
    trace (the same line unless strace split it), and what it did.
    """

    entry: int
    exit: int
    pid: int
    name: str
    target: str
    text: str
    result: int | None


_LINE = re.compile(r"^(?P<pid>\d+)\s+\d\d:\d\d:\d\d\.\d+\s+(?P<rest>.*)$")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>(?P<text>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\((?P<text>.*)$")
_TARGET = re.compile(r"^(?P<fd>\d+)<(?P<target>TCP6?:\[[^\]]*\]|[^>]*)>")
_RESULT = re.compile(r"\)\s+=\s+(?P<result>-?\d+)[^=]*$")
_UNFINISHED = " <unfinished ...>"


def syscalls(trace: str) -> Iterator[Syscall]:
    """
    The system calls of an C{strace -f -tt -yy} trace, in order of entry.
    """
    pending: dict[int, Syscall] = {}
    done: list[Syscall] = []
    for index, line in enumerate(trace.splitlines()):
        match = _LINE.match(line)
        if match is None:
            continue
        pid, rest = int(match["pid"]), match["rest"]
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            call = pending.pop(pid, None)
            if call is None or call.name != resumed["name"]:
                raise AssertionError(f"line {index + 1}: a resumption without its start: {line}")
            call.exit = index
            call.text += resumed["text"]
            result = _RESULT.search(resumed["text"])
            call.result = None if result is None else int(result["result"])
            continue
        started = _CALL.match(rest)
        if started is None:
            continue  # "--- SIGTERM ... ---", "+++ exited with 0 +++"
        text = started["text"]
        target = _TARGET.match(text)
        call = Syscall(index, index, pid, started["name"], "" if target is None else target["target"], text, None)
        if text.endswith(_UNFINISHED):
            call.text = text[: -len(_UNFINISHED)]
            pending[pid] = call
        else:
            result = _RESULT.search(text)
            call.result = None if result is None else int(result["result"])
        done.append(call)
    return iter(sorted(done, key=lambda call: call.entry))


@dataclass
class Audit:
    acknowledgements: int = 0
    followed: int = 0
    # Acknowledgements with no write to the WAL since the one before: the
    # trace does not show their transaction, so they prove nothing.
    unwritten: int = 0
    wal_writes: int = 0
    wal_syncs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def figure(self) -> str:
        return f"{self.followed}/{self.acknowledgements} acknowledgements followed a WAL fsync"


def audit(trace: str, client_port: int) -> Audit:
    """
    Check that every purchase acknowledgement on the client's socket comes
    after an fsync/fdatasync of the WAL that started once every WAL write
    begun before the acknowledgement had completed.
    """
    socket_suffix = f"->127.0.0.1:{client_port}]"
    calls = list(syscalls(trace))
    # Each system call's entry and exit, in the order of the trace.
    events = sorted([(c.entry, 0, c) for c in calls] + [(c.exit, 1, c) for c in calls], key=lambda e: (e[0], e[1]))
    result = Audit()
    writes_begun = 0
    writes_done = 0
    covered = 0  # WAL writes covered by a completed fsync that began after they completed
    sync_covers: dict[int, int] = {}
    writes_at_last_ack = 0
    for _, is_exit, call in events:
        wal = call.target.endswith("-wal")
        if wal and call.name in ("write", "pwrite64", "pwritev", "pwritev2", "writev"):
            if is_exit:
                writes_done += 1
            else:
                writes_begun += 1
                result.wal_writes += 1
        elif wal and call.name in ("fsync", "fdatasync"):
            if not is_exit:
                sync_covers[id(call)] = writes_done
            elif call.result == 0:
                result.wal_syncs += 1
                covered = max(covered, sync_covers.pop(id(call)))
        elif (
            not is_exit
            and call.name in ("sendto", "write", "writev", "sendmsg")
            and call.target.endswith(socket_suffix)
            and '\\"opcode\\":3,\\"ok\\":true' in call.text
        ):
            result.acknowledgements += 1
            if writes_begun == writes_at_last_ack:
                result.unwritten += 1
            writes_at_last_ack = writes_begun
            if covered >= writes_begun:
                result.followed += 1
            else:
                result.problems.append(
                    f"trace line {call.entry + 1}: acknowledgement with {writes_begun - covered} WAL writes not"
                    f" fsynced since: {call.text[:80]}"
                )
    return result


class PowerLossAuditTests(TestCase):
    """
    Every purchase is acknowledged only after the WAL holding it is fsynced.
    """

    def setUp(self) -> None:
        try:
            import twisted.plugins.vendepass_plugin  # noqa: F401
        except ImportError:
            raise SkipTest("vendepass is not installed (pip install .)")
        self.strace = strace_or_skip()
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)

    def traced_purchases(self, server_command: list[str], options: tuple[str, ...] = ()) -> Audit:
        """
        Run the server under strace, make L{PURCHASES} one-step purchases
        from one client, one after another, stop the server and audit the trace.
        """
        trace = self.directory / "server.strace"
        server = TracedServer(self.directory, self.strace, trace, server_command, options)
        self.addCleanup(server.kill)
        customer = Connection(server.port)
        self.addCleanup(customer.close)
        client_port = customer.socket.getsockname()[1]
        customer.call(10, {"username": "audit_buyer", "password": "audit-password"})
        customer.call(1, {"username": "audit_buyer", "password": "audit-password"})
        pool = SeatPool(seat_layouts(customer))
        for _ in range(PURCHASES):
            pick = pool.take()
            assert pick is not None
            flight, seat = pick
            ticket = customer.call(3, {"flights": [flight], "seats": [seat]})["ticket"]
            self.assertEqual([(leg["flight"], leg["seat"]) for leg in ticket["legs"]], [(flight, seat)])
        customer.close()
        server.stop()
        result = audit(trace.read_text("utf-8", "replace"), client_port)
        self.assertEqual(
            result.acknowledgements,
            PURCHASES,
            f"the trace shows {result.acknowledgements} purchase acknowledgements, the client got {PURCHASES}",
        )
        return result

    def test_every_acknowledgement_follows_a_wal_fsync(self) -> None:
        """
        With the server as shipped (WAL, synchronous=FULL), every purchase
        acknowledgement follows an fsync of the WAL issued after its writes.
        """
        result = self.traced_purchases(twistd())
        print(
            f"\n[T6] synchronous=FULL (as shipped): {result.figure}"
            f" ({result.wal_writes} WAL writes, {result.wal_syncs} WAL fsyncs)"
        )
        self.assertEqual(result.unwritten, 0, "some acknowledgements had no WAL write in the trace before them")
        self.assertEqual(
            result.followed,
            result.acknowledgements,
            f"{result.figure}; acknowledged before the WAL was on disk:\n  " + "\n  ".join(result.problems[:20]),
        )

    def test_audit_catches_synchronous_normal(self) -> None:
        """
        The mutant: the same server with its database switched to
        synchronous=NORMAL (the WAL is fsynced only at checkpoints). Most of
        its acknowledgements come before the WAL is on disk, and the audit
        says so.
        """
        result = self.traced_purchases([sys.executable, "-c", NORMAL_MUTANT])
        print(
            f"\n[T6 mutant] synchronous=NORMAL: {result.figure}"
            f" ({result.wal_writes} WAL writes, {result.wal_syncs} WAL fsyncs): the audit fails it, as it must"
        )
        self.assertGreater(result.wal_writes, 0, "the trace shows no WAL write: the audit saw nothing")
        self.assertLess(
            result.followed,
            result.acknowledgements / 2,
            f"the audit did not catch synchronous=NORMAL: {result.figure}",
        )


class WriterProcessPowerLossAuditTests(PowerLossAuditTests):
    """
    The same audit, and the same mutant caught, with the batches written by
    a writer process (C{--sqlite-writer process}): its fsyncs are in the
    trace (C{strace -f}), and every acknowledgement, sent by the server's
    process, follows one.
    """

    def traced_purchases(self, server_command: list[str], options: tuple[str, ...] = ()) -> Audit:
        return super().traced_purchases(server_command, (*options, "--sqlite-writer", "process"))
