"""
The SQLite store's writer in a process of its own.

In one process, the reactor thread and the writer thread share the GIL, and
C{sqlite3} lets it go around every step of a statement: measured on
2026-12-04 (docs/performance.md, seventh round), a quarter of a purchase's
server CPU was the GIL passing between them. Here the writer's connection,
its seats in memory (L{vendepass.store.memory.SeatMemory}) and its booking
codes live in a child process, which runs each group-commit batch exactly
as the writer thread would (L{vendepass.store.sqlite.SQLiteStore._run_batch},
on an L{SQLiteStore} of its own). The parent's writer thread sends it a
batch as one message and waits for one answer: two blocking calls a batch,
during which it holds no GIL. Reads and checkpoints stay in the parent, on
connections of their own: WAL lets several processes share the file.

What travels: the batch's L{Work}s (a rule's name and its arguments), what
they read first, the parent's time, whether to restart the WAL and the
rules' limits; back: each work's result or refusal (frozen C{attrs} values
and L{VendePassError}s), the availability of the flights it changed, and
the holds it ended. A L{Flight} travels as its id, and the rules as a
reference to the other side's own (both are read from the same file).

The child is started by C{python -m vendepass.store.writer FD}, with
nothing inherited but one end of a socket pair (C{close_fds}): no SQLite
connection crosses a fork. It exits when that socket closes, and on Linux
it is killed when the server's process ends (C{PR_SET_PDEATHSIG}), so it
never writes after the server is gone. (That signal follows the thread
that started it: a child started again by the writer thread is killed when
that thread ends, at the store's stop, after its last batch is answered.)
"""

from __future__ import annotations

import copyreg
import functools
import io
import operator
import os
import pickle
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.logger import Logger
from twisted.python.failure import Failure

from vendepass.errors import StorageUnavailable, VendePassError
from vendepass.model import Flight, HeldSeat, Hold, Money, SeatState, Ticket, TicketLeg
from vendepass.store import LegRequest
from vendepass.store.transactions import Asked, Reads, SeatRules, Work

if TYPE_CHECKING:
    from vendepass.store.sqlite import SQLiteStore

# Per flight: taken seats, and the sorted expiry times of its held seats.
Availability = dict[str, tuple[int, tuple[float, ...]]]
# A batch's answer: per work (True, result) or (False, exception), the
# availability of the flights it changed, the holds it ended, and whether
# it restarted the WAL.
Answer = tuple[list[tuple[bool, Any]], Availability, list[tuple[str, str]], bool]

# This module's name, also in the child (which runs it as __main__).
_MODULE = "vendepass.store.writer"

# How long the parent waits for a child to start, and to stop (seconds).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def _flight(flight_id: str) -> Flight:  # pragma: no cover - resolved by _Unpickler.find_class
    raise RuntimeError("a flight travels only between a store and its writer process")


def _rules() -> SeatRules:  # pragma: no cover - resolved by _Unpickler.find_class
    raise RuntimeError("the rules travel only between a store and its writer process")


def _reduce_flight(flight: Flight) -> tuple[Callable[[str], Flight], tuple[str]]:
    return _flight, (flight.flight_id,)


def _reduce_rules(rules: SeatRules) -> tuple[Callable[[], SeatRules], tuple[()]]:
    return _rules, ()


def _reducer(cls: type) -> Callable[[Any], tuple[type, tuple[Any, ...]]]:
    """
    A frozen C{attrs} value as its class and its fields in order: half the
    time of C{attrs}' own C{__getstate__} (a comprehension per value) to
    pickle, and to load (measured: four tickets in 27 against 50 µs).
    """
    fields = operator.attrgetter(*(field.name for field in attrs.fields(cls)))
    single = len(attrs.fields(cls)) == 1
    if single:
        return lambda value: (cls, (fields(value),))
    return lambda value: (cls, fields(value))


# The values that travel, each by its fields (see _reducer).
_VALUES: dict[type, Callable[[Any], Any]] = {
    cls: _reducer(cls)
    for cls in (Money, HeldSeat, Hold, TicketLeg, Ticket, SeatState, LegRequest, Asked, Work)
}


def dumps(value: Any, rules: SeatRules) -> bytes:
    """
    C{value} pickled for the other side of a store and its writer process:
    flights as their ids and C{rules} as a reference (see L{loads}). The
    reducers are looked up by type in C, so nothing else costs a Python
    call.
    """
    out = io.BytesIO()
    pickler = pickle.Pickler(out, pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _dispatch_table(type(rules))
    pickler.dump(value)
    return out.getvalue()


# The reducers of dumps per rules class, each table made once.
_TABLES: dict[type, dict[type, Callable[[Any], Any]]] = {}


def _dispatch_table(rules_class: type) -> dict[type, Callable[[Any], Any]]:
    """
    The reducers of L{dumps} for rules of C{rules_class}.
    """
    table = _TABLES.get(rules_class)
    if table is None:
        table = dict(copyreg.dispatch_table)
        table.update(_VALUES)
        table[Flight] = _reduce_flight
        table[rules_class] = _reduce_rules
        _TABLES[rules_class] = table
    return table


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, rules: SeatRules) -> None:
        super().__init__(io.BytesIO(data))
        self._rules = rules

    def find_class(self, module: str, name: str) -> Any:
        if module == _MODULE and name == "_flight":
            return self._rules.flight
        if module == _MODULE and name == "_rules":
            return lambda: self._rules
        return super().find_class(module, name)


def loads(data: bytes, rules: SeatRules) -> Any:
    """
    What L{dumps} pickled, its flights and rules this side's own.
    """
    return _Unpickler(data, rules).load()


def _travelling(failure: Failure) -> BaseException:
    """
    A failure as it can travel back: a refusal as it is, anything else (a
    bug) as a C{RuntimeError} that carries its traceback.
    """
    if isinstance(failure.value, VendePassError):
        return failure.value
    return RuntimeError(f"in the writer process: {failure.getTraceback()}")


class WriterProcess:
    """
    The parent's side of the writer process: start it, hand it batches (from
    one thread, the store's writer), stop it. A child that dies or cannot be
    reached fails the batch in flight with L{StorageUnavailable}; the next
    batch starts a new one, which reads the seats from the file again.

    @ivar restarted: the availability of every flight with taken seats, as
        a new child read it, when a child was started again (for the store
        to take in on the reactor); C{None} otherwise.
    @ivar starts: how many children were started.
    """

    _log = Logger()

    def __init__(self, path: str, store: SQLiteStore, python: str = sys.executable) -> None:
        self._path = path
        self._store = store
        self._python = python
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.restarted: Availability | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> Availability:
        """
        Start a child and wait until it has opened the database (blocking).
        Returns the availability it read.
        """
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [self._python, "-m", _MODULE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # It imports what this process imports (the store's classes
                # may be where only this process looks: a test's planted bugs).
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(os.path.abspath(entry) for entry in sys.path)),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        store = self._store
        try:
            conn.send_bytes(pickle.dumps((self._path, type(store), store.rules.max_held_seats, store.max_batch)))
            if not conn.poll(START_TIMEOUT):
                raise RuntimeError(f"the writer process did not start in {START_TIMEOUT} s")
            ready = loads(conn.recv_bytes(), store.rules)
            if isinstance(ready, BaseException):
                raise ready
        except BaseException:
            conn.close()
            _end(process)
            raise
        self._process, self._conn = process, conn
        self.starts += 1
        self._log.info("writer process {pid} started", pid=process.pid)
        availability: Availability = ready
        return availability

    def run(self, works: list[Work], reads: Reads, now: float, restart_wal: bool) -> Answer:
        """
        On the store's writer thread: have the child write a batch, and
        return its answer. A child that is gone is started first.
        """
        store = self._store
        rules = store.rules
        if self._conn is None:
            try:
                self.restarted = self.start()
            except Exception as e:
                self._log.error("cannot start the writer process: {error}", error=str(e))
                raise StorageUnavailable() from e
        conn = self._conn
        assert conn is not None
        message = dumps(
            ([work.shipped() for work in works], reads, now, restart_wal,
             rules.max_held_seats, rules.max_seats_per_flight),
            rules,
        )
        try:
            conn.send_bytes(message)
            answer = loads(conn.recv_bytes(), rules)
        except (EOFError, OSError) as e:
            self._log.error("the writer process is gone: {error}", error=str(e))
            self._lost()
            raise StorageUnavailable() from e
        if isinstance(answer, BaseException):
            raise answer
        result: Answer = answer
        return result

    def _lost(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()
        if process is not None:
            _end(process)

    def stop(self) -> None:
        """
        Close the child's socket and wait for it to finish (blocking): it
        closes its connection, which copies what the WAL holds.
        """
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()
        if process is not None:
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._log.warn("the writer process {pid} did not stop; killing it", pid=process.pid)
                _end(process)


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


class _FixedClock:
    """
    The child's clock: the time that came with the batch (the parent's).
    """

    now = 0.0

    def seconds(self) -> float:
        return self.now


def serve(conn: Connection) -> None:
    """
    The child: open the database, then write the batches that come until
    the socket closes.
    """
    from vendepass.store import InlineExecutor
    from vendepass.store.sqlite import _connect

    setup = pickle.loads(conn.recv_bytes())
    path, store_class, max_held_seats, max_batch = setup
    clock = _FixedClock()
    try:
        db = _connect(path)
        store: SQLiteStore = store_class(db, clock, InlineExecutor(), max_held_seats, max_batch)  # type: ignore[arg-type]
        availability = store._load_availability()
    except BaseException:
        conn.send_bytes(pickle.dumps(_travelling(Failure())))
        return
    rules = store.rules
    conn.send_bytes(dumps(availability, rules))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            break
        try:
            works, reads, now, restart_wal, rules.max_held_seats, rules.max_seats_per_flight = loads(data, rules)
            clock.now = now
            store._restart_wal = restart_wal
            restarts = store.wal_restarts
            outcomes, refreshed, ended = store._guarded(functools.partial(store._run_batch, works, reads))()
            answer: Any = (
                [(True, value) if ok else (False, _travelling(value)) for ok, value in outcomes],
                refreshed,
                ended,
                store.wal_restarts != restarts,
            )
        except BaseException:
            answer = _travelling(Failure())
        conn.send_bytes(dumps(answer, rules))
    db.close()


def _die_with_parent() -> None:
    """
    On Linux: be killed the moment the server's process ends (a crash, a
    kill -9), not after the batch being written. The server that starts
    next then never meets a commit of this one's after it has read the
    file. (Without it, the child still ends when its socket closes.)
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        # The parent was gone before the call.
        os._exit(1)


def main() -> None:
    from twisted.logger import globalLogBeginner, textFileLogObserver

    _die_with_parent()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    conn = Connection(int(sys.argv[1]))
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    # This module's own copy, not __main__: what it pickles names it so.
    from vendepass.store import writer

    writer.main()
