"""
Isolation tests of the PostgreSQL store, in the manner of PostgreSQL's own
isolation tester (src/test/isolation): two concurrent transactions, A and B,
run the store's production statements against the real database in every
order in which they can interleave, and after each order the outcomes (one
winner, refusals with their stable error codes), the rows, and
C{vendepass-admin verify} are checked.

Sessions. Each of A and B is a store of its own on the same database (a
L{SteppedStore}: a L{PostgresStore} whose C{transaction_class}, set on the
instance, is L{SteppedTx}), driven by a worker thread of its own that makes
one store call (C{buy}, C{hold}, C{cancel}, ...) per permutation on an
L{InlineExecutor}. The worker keeps its thread, hence its store's
connection, from one permutation to the next. All three stores (A's, B's,
and the one that sets up the rows) read their time from one L{Clock}.

Steps. L{SteppedTx} stops its session before each statement that goes
through C{PostgresTx.execute}, C{executemany}, C{one} or C{all}, until the
scheduler lets it run; C{SteppedStore._attempt} wraps the transaction's
work so that the session stops once more after it: that last step is the
COMMIT (with the C{pg_notify} of any hold the transaction ended) or the
ROLLBACK of a refused or failed attempt. A step runs from one stop to the
next: its statement, plus the statements in L{PRIVATE}, which are not steps
of their own. Those are inserts of new rows under fresh random keys
(tickets, ticket_legs, holds, hold_legs): the other session can neither see
them before the commit nor wait for them, and they make it wait for nothing
(the rows their foreign keys lock, KEY SHARE, are the transaction's own new
rows or a users row, which the store only ever locks FOR NO KEY UPDATE), so
they commute with every statement of the other session and each place they
could take in a permutation gives the same schedule. (The audit insert is a
step: its sequence number orders the log that C{verify} replays.) So a
C{hold} is steps such as count held, lock flight, find expired holds,
look at seat (or pick seat), insert seats, insert audit, commit; with a
C{request_id}, replay first and remember before the commit.

A one-step C{buy} is one statement in production (C{vendepass_buy}, its
own transaction; see L{PostgresStore._call}), which the database cannot
interleave with anything finer than its lock waits; the stepped store
runs it inside a transaction of its own, as two steps: "buy" (the call,
which takes every lock of the purchase and does every write) and
"commit" (or "rollback" when the call failed). So two calls that
overlap wait on each other's locks inside the function, and are seen to
wait with C{pg_blocking_pids} like any statement.
L{IsolationTests.test_planted_bug_flight_lock_left_out} installs a
variant of the function without the flights' locks and checks that the
last-seat spec catches it. A batch of one-step purchases (group commit:
C{vendepass_buy_batch}, see L{PostgresStore._next_batch}) is stepped the
same way: "buy batch", then "commit"; the session's call queues its
purchases while every writer is busy and then lets one writer take them
all (L{_batch}), and its outcome is the list of what each purchase got.
Two such calls cannot overlap but by their lock waits, so a batch's lock
order is raced against a purchase stepped statement by statement
(L{SeatRules.buy} through L{PostgresTx}: the statements and lock order of
C{vendepass_buy}, with a step between the locks of its flights):
L{IsolationTests.test_planted_bug_batch_flight_locks_left_out} installs a
batch function without its flights' locks (since schema version 7 a
single purchase is a batch of one, and the batch takes no other locks), and
the checks see the batch sell seats whose locks the other purchase holds;
L{IsolationTests.test_planted_bug_batch_flight_locks_unsorted} one that
takes them in the order of its purchases, and the scheduler sees the
deadlock. Steps are named from their
statement (L{label}), and a failed check prints the permutation with those
names. With the environment variable C{VENDEPASS_ISOLATION_EVERY_STATEMENT}
set, every statement of the stepped transactions is a step (more
permutations, the same verdicts; a purchase's call stays one step).

Blocking. As in the isolation tester, when a step does not come back
because it waits for a lock of the other session (the other's backend pid
is in C{pg_blocking_pids} of this one's, polled every 2 ms while the step
has not come back), the session is marked waiting and the scheduler goes on
with the other one. After every step, each waiting session is looked at
again: it still waits, or its lock was granted (by the other's COMMIT or
ROLLBACK) and it is followed until it stops before its next step or
finishes. If both sessions wait for each other, the test fails at once with
the permutation so far: the store's lock order is meant to rule deadlocks
out.

Permutations. They are enumerated by a depth-first search over the points
where both sessions could take their next step: the first run picks A at
each such point, and each later run replays a prefix of an earlier run's
choices and then picks B where that run picked A. So every permutation of
the two sessions' steps runs exactly once, except those that would have a
session take a step while it waits for a lock (the isolation tester's
"invalid permutations"), which are the same schedule as one that runs.

Retries. An attempt that loses a race (unique violation, serialization
failure, deadlock) is rolled back and retried from the start by
C{PostgresStore._write}, after a short random pause. The retry is
stepped like the first attempt (its steps are named C{"replay #2"}, ...),
so its statements are interleaved with the other session's in every order
too; only the pause is not a step.

Each permutation starts from the same rows: the sales tables are emptied
(users and the timetable stay; when the test database's user is a superuser
by DELETE with C{session_replication_role = replica}, as the audit log's
trigger refuses DELETE, else with TRUNCATE for the audit log), the clock is
set back to C{START}, and the spec's setup runs on an ordinary store. Every
wait has a timeout (L{TIMEOUT}: 10 s): a scheduler bug fails the test
rather than hanging it. Nothing sleeps but the 2 ms polling.

Permutations per spec (each test checks a lower bound rather than the exact
count, which changes when the store gains or loses a statement), and with
every statement a step:
  - L{IsolationTests.test_two_buyers_one_seat}: 4 (12 when a purchase was
    stepped statement by statement);
  - L{IsolationTests.test_two_buyers_last_seat}: 4 (12), and its planted
    bug 4, 2 of them caught;
  - L{IsolationTests.test_buy_while_cancelled}: 21 (126);
  - L{IsolationTests.test_two_holders_one_seat}: 310 (1932);
  - L{IsolationTests.test_buy_expired_hold_against_buy}: 8 (91);
  - L{IsolationTests.test_same_request_id_picked_seat}: 4 (18);
  - L{IsolationTests.test_same_request_id_chosen_seat}: 4 (18; before the
    request's lock, which this test made necessary: 84, 82 of them wrong);
  - L{IsolationTests.test_same_request_id_hold}: 22 (before: 126, 124 wrong);
  - L{IsolationTests.test_two_buyers_two_flights_crosswise}: 4 (16);
  - L{IsolationTests.test_buy_hold_against_release}: 12;
  - L{IsolationTests.test_two_cancels}: 10;
  - L{IsolationTests.test_two_batches_crosswise}: 4;
  - L{IsolationTests.test_batch_against_buy}: 10, and its two planted
    bugs: the first caught in 24 of 26, the second stopped by the
    deadlock in the second;
  - L{IsolationTests.test_batch_against_hold}: 4;
  - L{IsolationTests.test_two_sweeps}: 6, and its two planted bugs 4
    each, 2 of them caught;
  - L{IsolationTests.test_expire_hold_against_sweep}: 5;
  - L{IsolationTests.test_release_session_against_buy_hold}: 4.
about 400 permutations in all, about 10 s.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from typing import Any, Callable, Iterable, TypeVar, cast

import attrs
import psycopg
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SynchronousTestCase

from tests import pg
from tests.common import ALICE, BIG, BOB, FAST_HASHER, MINI, START, TINY
from vendepass.admin import verify
from vendepass.errors import VendePassError
from vendepass.fixtures import load
from vendepass.model import Flight, Hold, Ticket, iso_utc
from vendepass.schedule import flight_by_id
from vendepass.store import InlineExecutor, LegRequest
from vendepass.store import postgres
from vendepass.store.postgres import PostgresStore, PostgresTx
from vendepass.store.transactions import Tx

T = TypeVar("T")
C = TypeVar("C")

# How long anything may wait (a session for its turn, the scheduler for a
# step to come back, a worker to stop) before the test fails.
TIMEOUT = 10.0
# How often a step that has not come back is checked for waiting on a lock.
POLL = 0.002
# At most this many permutations per spec: more means the search runs away.
MAX_PERMUTATIONS = 3000

HOLD_SECONDS = 60.0

# The tables emptied between permutations (users and the airline stay).
_TABLES = [
    "seats", "seats_freed", "seat_picks", "hold_legs", "ticket_legs", "requests", "holds", "tickets", "audit"
]

# Names of the statements whose table alone would not say what they do.
_NAMES = [
    ("pg_advisory_xact_lock", "lock flight"),
    ("INSERT INTO requests", "remember"),
    ("FROM requests", "replay"),
    ("SELECT DISTINCT s.hold_id", "find expired holds"),
    ("SELECT s.ticket_id, h.expires_at", "look at seat"),
    ("string_agg(seat", "pick seat"),
    ("SELECT COUNT(*) FROM holds", "count held"),
    ("vendepass_buy_batch", "buy batch"),
    ("vendepass_buy_hold", "buy hold"),
    ("vendepass_buy", "buy"),
    ("vendepass_hold", "hold"),
    ("vendepass_release_session", "release session"),
    ("vendepass_release", "release"),
    ("vendepass_cancel", "cancel"),
    ("vendepass_expire_hold", "expire hold"),
    ("vendepass_expired_holds", "sweep"),
]

# Statements that are not steps of their own but part of the step before
# them (or of the session's start): inserts of new rows under fresh random
# keys, which commute with every statement of the other session (see the
# module docstring).
PRIVATE = frozenset({"insert tickets", "insert ticket_legs", "insert holds", "insert hold_legs"})
# Set to make every statement a step all the same: many more permutations
# (4150, about 70 s), the same verdicts.
EVERY_STATEMENT = bool(os.environ.get("VENDEPASS_ISOLATION_EVERY_STATEMENT"))


def label(query: str) -> str:
    """
    A short name for a production statement: C{"lock flight"},
    C{"insert seats"}, C{"lock holds"} (a C{SELECT ... FOR UPDATE}), ...
    """
    for text, name in _NAMES:
        if text in query:
            return name
    match = re.match(r"\s*(INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)", query)
    if match:
        return f"{match.group(1).split()[0].lower()} {match.group(2)}"
    match = re.search(r"\bFROM\s+(\w+)", query)
    table = match.group(1) if match else "?"
    return f"{'lock' if re.search(r'FOR (NO KEY )?UPDATE', query) else 'select'} {table}"


class _Aborted(Exception):
    """
    The scheduler gave up on this permutation: the session stops at once.
    """


def summary(outcomes: dict[str, object]) -> str:
    return "; ".join(f"{name}: {describe(outcome)}" for name, outcome in sorted(outcomes.items()))


def describe(outcome: object) -> str:
    if isinstance(outcome, Ticket):
        return f"ticket {outcome.ticket_id} {outcome.status} ({', '.join(leg.seat for leg in outcome.legs)})"
    if isinstance(outcome, Hold):
        return f"hold {outcome.hold_id} ({', '.join(leg.seat for leg in outcome.legs)})"
    if isinstance(outcome, VendePassError):
        return outcome.code
    if isinstance(outcome, list):
        return f"[{', '.join(describe(each) for each in outcome)}]"
    return repr(outcome)


@attrs.define
class Run:
    """
    One permutation: the choices that made it, what happened, and what the
    checks found wrong with it.

    @ivar choices: the session that went at each point where both could.
    @ivar trace: the steps in the order they were taken (C{"A:lock flight"}),
        and C{"B waits"} / C{"B resumes"} when a step waited for a lock.
    @ivar outcomes: what each session's call returned or failed with.
    @ivar attempts: how many attempts each session's transaction took.
    """

    choices: list[str] = attrs.field(factory=list)
    trace: list[str] = attrs.field(factory=list)
    outcomes: dict[str, object] = attrs.field(factory=dict)
    attempts: dict[str, int] = attrs.field(factory=dict)
    problems: list[str] = attrs.field(factory=list)
    context: Any = None

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    def position(self, entry: str) -> int:
        """
        Where C{entry} first is in the trace (after everything if nowhere).
        """
        return self.trace.index(entry) if entry in self.trace else len(self.trace)

    def waited(self) -> bool:
        return any(entry.endswith(" waits") for entry in self.trace)

    def describe(self) -> str:
        return (
            f"  permutation: {' '.join(self.trace)}\n"
            f"  outcomes: {summary(self.outcomes)}\n"
            f"  problems: {'; '.join(self.problems)}"
        )


class SteppedTx(PostgresTx):
    """
    A transaction that stops before each statement (but the L{PRIVATE}
    ones) and waits for its session's turn.
    """

    session: Session | None = None

    def _before(self, query: str) -> None:
        if self.session is not None:
            self.session.statement(query)

    def execute(self, query: str, args: Any = None) -> psycopg.Cursor[Any]:
        self._before(query)
        return super().execute(query, args)

    def executemany(self, query: str, args: Iterable[Any]) -> None:
        self._before(query)
        super().executemany(query, args)

    def one(self, query: str, args: Any = None) -> Any:
        self._before(query)
        return super().one(query, args)

    def all(self, query: str, args: Any = None) -> list[Any]:
        self._before(query)
        return super().all(query, args)


class SteppedStore(PostgresStore):
    """
    A store whose transactions are stepped by its session: every statement,
    and the end of each attempt (its COMMIT or ROLLBACK), is a step.
    """

    session: Session | None = None

    def _attempt(self, work: Callable[[Tx], T], ended: list[tuple[str, str]]) -> T:
        session = self.session
        if session is None:
            return super()._attempt(work, ended)

        def stepped(tx: Tx) -> T:
            assert isinstance(tx, SteppedTx)
            tx.session = session
            session.begin(tx.cur.connection.info.backend_pid)
            rolls_back = True
            try:
                result = work(tx)
                rolls_back = False
                return result
            except VendePassError:
                # A refusal commits what the work did, then refuses.
                rolls_back = False
                raise
            finally:
                session.end("rollback" if rolls_back else "commit")

        return super()._attempt(stepped, ended)

    def _call(self, cur: psycopg.Cursor[Any], sql: str, args: tuple[Any, ...]) -> dict[str, Any]:
        """
        A statement that is its own transaction (a one-step purchase's
        C{vendepass_buy}) is stepped as two steps, inside a transaction of
        the session's: the call (which takes the function's locks and may
        wait for the other session's), then its COMMIT (or the ROLLBACK of
        a failed call).
        """
        return self._stepped(cur, sql, lambda: super(SteppedStore, self)._call(cur, sql, args))

    def _call_batch(self, cur: psycopg.Cursor[Any], calls: list[list[Any]]) -> list[dict[str, Any]]:
        """
        A batch of one-step purchases (C{vendepass_buy_batch}, its own
        transaction) is stepped as a one-step purchase is: the call, then
        its COMMIT.
        """
        return self._stepped(cur, postgres.BUY_BATCH_CALL, lambda: super(SteppedStore, self)._call_batch(cur, calls))

    def _stepped(self, cur: psycopg.Cursor[Any], sql: str, call: Callable[[], T]) -> T:
        """
        C{call()}, one statement that is its own transaction in
        production, as two steps inside a transaction of the session's.
        """
        session = self.session
        if session is None:
            return call()
        session.begin(cur.connection.info.backend_pid)
        cur.execute("BEGIN")
        try:
            session.statement(sql)
            answer = call()
        except BaseException:
            try:
                session.end("rollback")
            finally:
                if not cur.connection.closed:
                    cur.execute("ROLLBACK")
            raise
        session.end("commit")
        cur.execute("COMMIT")
        return answer


class _Worker:
    """
    A thread that runs one session's calls, one after another, so that the
    session's store keeps one connection (a store's connections are per
    thread) across permutations.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=6 * TIMEOUT)
            except queue.Empty:
                return  # abandoned: do not outlive the test for long
            if job is None:
                return
            job()

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def stop(self) -> bool:
        """
        Stop the thread; whether it stopped in time.
        """
        if self._thread is None:
            return True
        self._jobs.put(None)
        self._thread.join(TIMEOUT)
        return not self._thread.is_alive()


class Session:
    """
    One of the two concurrent transactions. Its state is read and written
    under the scheduler's condition: C{parked} is the label of the step it
    stopped before (C{None} while it runs or waits for a lock), C{go} the
    scheduler's permission to take that step, C{done} and C{outcome} the end
    of its call.
    """

    def __init__(self, name: str, scheduler: Scheduler, store: SteppedStore) -> None:
        self.name = name
        self.scheduler = scheduler
        self.store = store
        store.session = self
        store.transaction_class = SteppedTx
        self.worker = _Worker(f"isolation-{name}")
        self.pid: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.parked: str | None = None
        self.go = False
        self.done = False
        self.outcome: object = None
        self.waiting = False
        self.ending = False
        self.attempts = 0

    def start(self, call: Callable[[PostgresStore], Deferred[Any]]) -> None:
        """
        Make the call on the worker thread; it stops before its first step.
        """
        with self.scheduler.cv:
            self._reset()

        def job() -> None:
            outcome: object
            try:
                results: list[object] = []
                call(self.store).addBoth(results.append)
                outcome = results[0] if results else AssertionError("the store's Deferred did not fire")
                if isinstance(outcome, Failure):
                    outcome = outcome.value
            except Exception as e:
                outcome = e
            with self.scheduler.cv:
                self.outcome = outcome
                self.done = True
                self.scheduler.cv.notify_all()

        self.worker.submit(job)

    # -- on the worker thread -------------------------------------------------

    def begin(self, pid: int) -> None:
        with self.scheduler.cv:
            self.attempts += 1
            self.ending = False
            self.pid = pid

    def statement(self, query: str) -> None:
        step = label(query)
        if not self.ending and (EVERY_STATEMENT or step not in PRIVATE):
            self._gate(step)

    def end(self, step: str) -> None:
        try:
            self._gate(step)
        finally:
            # What the attempt runs from here on (pg_notify, then COMMIT or
            # ROLLBACK) belongs to this step.
            self.ending = True

    def _gate(self, step: str) -> None:
        if self.attempts > 1:
            step = f"{step} #{self.attempts}"
        cv = self.scheduler.cv
        with cv:
            if self.scheduler.aborted is not None:
                raise _Aborted(self.scheduler.aborted)
            self.parked = step
            cv.notify_all()
            # Longer than the scheduler waits for a step: if the scheduler
            # is stuck, it is the one that should say why.
            cv.wait_for(lambda: self.go or self.scheduler.aborted is not None, timeout=2 * TIMEOUT)
            self.parked = None
            if not self.go:
                if self.scheduler.aborted is None:
                    self.scheduler.aborted = f"session {self.name} waited {2 * TIMEOUT} s for its turn to {step}"
                    cv.notify_all()
                raise _Aborted(self.scheduler.aborted)
            self.go = False


class Scheduler:
    """
    Runs the two sessions' calls step by step, in every order.
    """

    def __init__(self, url: str, network: Any, clock: Clock, control: psycopg.Connection[Any]) -> None:
        self.cv = threading.Condition()
        self.aborted: str | None = None
        self.clock = clock
        self.control = control
        self.sessions = [
            Session(name, self, SteppedStore(url, network, InlineExecutor(), clock=clock)) for name in ("A", "B")
        ]
        self._run: Run | None = None
        # Emptying the tables: DELETE is much faster than TRUNCATE, but the
        # audit log's trigger refuses it, except to a superuser who turns
        # triggers off for this connection.
        try:
            control.execute("SET session_replication_role = replica")
            self._fast_reset = True
        except psycopg.errors.InsufficientPrivilege:
            self._fast_reset = False

    def _reset(self) -> None:
        with self.control.transaction():
            for table in _TABLES if self._fast_reset else _TABLES[:-1]:
                self.control.execute(f"DELETE FROM {table}")
            if not self._fast_reset:
                self.control.execute("TRUNCATE audit")
        self.clock.rightNow = START

    def close(self) -> None:
        with self.cv:
            if self.aborted is None:
                self.aborted = "the test is over"
            self.cv.notify_all()
        stuck = [s.name for s in self.sessions if not s.worker.stop()]
        for session in self.sessions:
            session.store.stop()
        assert not stuck, f"sessions {stuck} did not stop"

    # -- one permutation -------------------------------------------------------

    def run(
        self,
        prefix: list[str],
        setup: Callable[[], C],
        calls: list[Callable[[PostgresStore, C], Deferred[Any]]],
    ) -> Run:
        """
        One permutation: from fresh rows and C{setup()}, make the calls, A's
        and B's; where both sessions could go, take C{prefix} in order, and
        A once it runs out.
        """
        self._reset()
        context = setup()
        run = self._run = Run(context=context)

        def bind(call: Callable[[PostgresStore, C], Deferred[Any]]) -> Callable[[PostgresStore], Deferred[Any]]:
            return lambda store: call(store, context)

        for session, call in zip(self.sessions, calls):
            session.start(bind(call))
        for session in self.sessions:
            self._settle(session)
        while True:
            with self.cv:
                live = [s for s in self.sessions if not s.done]
                runnable = [s for s in live if s.parked is not None]
            if not live:
                break
            if not runnable:
                # Each waits for the other: the store's lock order should
                # make this impossible. (PostgreSQL would end one of them
                # after deadlock_timeout; which one is up to it, so the
                # search could not go on deterministically anyway.)
                self._abort("deadlock: each session waits for a lock of the other's")
            if len(runnable) > 1:
                k = len(run.choices)
                name = prefix[k] if k < len(prefix) else runnable[0].name
                picked = [s for s in runnable if s.name == name]
                if not picked:
                    self._abort(f"permutation {prefix} is not reproducible: {name} cannot go at choice {k}")
                run.choices.append(name)
                session = picked[0]
            else:
                session = runnable[0]
            self._step(session)
            for other in self.sessions:
                if other is not session and other.waiting:
                    self._settle(other)
        for session in self.sessions:
            run.outcomes[session.name] = session.outcome
            run.attempts[session.name] = session.attempts
        self._run = None
        return run

    def _step(self, session: Session) -> None:
        assert self._run is not None
        with self.cv:
            assert session.parked is not None and not session.go
            self._run.trace.append(f"{session.name}:{session.parked}")
            session.go = True
            self.cv.notify_all()
        self._settle(session)

    def _settle(self, session: Session) -> None:
        """
        Wait until C{session} stops before its next step or finishes, or
        waits for a lock held by the other session.
        """
        assert self._run is not None
        deadline = time.monotonic() + TIMEOUT
        while True:
            with self.cv:
                stopped = self.cv.wait_for(
                    lambda: self.aborted is not None or (not session.go and (session.parked is not None or session.done)),
                    timeout=POLL,
                )
                if self.aborted is not None:
                    self._abort(self.aborted)
                if stopped:
                    if session.waiting:
                        session.waiting = False
                        self._run.trace.append(f"{session.name} resumes")
                    return
            if self._blocked(session):
                if not session.waiting:
                    session.waiting = True
                    self._run.trace.append(f"{session.name} waits")
                return
            if time.monotonic() > deadline:
                self._abort(f"session {session.name}'s step took more than {TIMEOUT} s")

    def _blocked(self, session: Session) -> bool:
        """
        Whether C{session}'s backend waits for a lock of the other session's.
        """
        if session.pid is None:
            return False
        others = {s.pid for s in self.sessions if s is not session}
        row = self.control.execute("SELECT pg_blocking_pids(%s)", (session.pid,)).fetchone()
        return bool(row and set(row[0]) & others)


    def _abort(self, reason: str) -> None:
        """
        Give up: stop the sessions (cancelling their statements) and fail.
        """
        with self.cv:
            if self.aborted is None:
                self.aborted = reason
            self.cv.notify_all()
        for session in self.sessions:
            if session.pid is not None:
                self.control.execute("SELECT pg_cancel_backend(%s)", (session.pid,))
        trace = " ".join(self._run.trace) if self._run else ""
        raise FailTest(f"{reason}\n  permutation so far: {trace}")

    # -- every permutation ----------------------------------------------------

    def explore(
        self,
        setup: Callable[[], C],
        a: Callable[[PostgresStore, C], Deferred[Any]],
        b: Callable[[PostgresStore, C], Deferred[Any]],
        check: Callable[[Run, C], None],
    ) -> list[Run]:
        """
        Run every permutation (depth first over the points where both
        sessions could go), checking each with the common checks and
        C{check(run, context)}.
        """
        runs: list[Run] = []
        pending: list[list[str]] = [[]]
        while pending:
            prefix = pending.pop()
            run = self.run(prefix, setup, [a, b])
            self._check(run)
            check(run, run.context)
            runs.append(run)
            if len(runs) > MAX_PERMUTATIONS:
                raise FailTest(f"more than {MAX_PERMUTATIONS} permutations")
            # Then the schedules that differ from this one first at a later choice.
            for k in range(len(run.choices) - 1, len(prefix) - 1, -1):
                pending.append(run.choices[:k] + ["B" if run.choices[k] == "A" else "A"])
        traces = [" ".join(run.trace) for run in runs]
        if len(set(traces)) != len(traces):
            raise FailTest("a permutation was run twice")
        return runs

    def _check(self, run: Run) -> None:
        """
        What every permutation must satisfy, whatever the spec.
        """
        # (a batch of purchases answers the list of their outcomes)
        each = [
            (name, outcome)
            for name, outcomes in sorted(run.outcomes.items())
            for outcome in (outcomes if isinstance(outcomes, list) else [outcomes])
        ]
        for name, outcome in each:
            if isinstance(outcome, VendePassError):
                run.expect(
                    outcome.code not in ("internal_error", "storage_unavailable"),
                    f"{name} failed with {outcome.code}: {outcome!r}",
                )
            else:
                # (release answers None; the ends of holds, hold ids or
                # (hold, session) pairs, expire_hold a state)
                run.expect(
                    outcome is None or isinstance(outcome, (Ticket, Hold, str, tuple)),
                    f"{name} failed unexpectedly: {outcome!r}",
                )
        report = verify(self.control)
        run.expect(not report.findings, f"verify: {report.findings}")
        doubles = self.control.execute(
            "SELECT l.flight_id, l.seat, array_agg(t.ticket_id) FROM ticket_legs l JOIN tickets t USING (ticket_id)"
            " WHERE t.status = 'active' GROUP BY l.flight_id, l.seat HAVING COUNT(*) > 1"
        ).fetchall()
        run.expect(not doubles, f"seats with several active tickets: {doubles}")


def _legs(flight: Flight, *seats: str | None) -> list[LegRequest]:
    return [LegRequest(flight, seat) for seat in seats]


def _alive() -> bool:
    return True


def _statements_of(migration: str, function: str) -> list[str]:
    """
    The statements of C{migration} that create C{function}.
    """
    return [
        st
        for st in postgres._statements(migration)
        if st.startswith((f"CREATE FUNCTION {function}(", f"CREATE OR REPLACE FUNCTION {function}("))
    ]


def _batch(store: PostgresStore, buys: list[tuple[str, list[LegRequest]]]) -> Deferred[list[object]]:
    """
    One-step purchases that queue while every writer is busy, then go as
    one batch (one call of C{vendepass_buy_batch}) when one is free, as
    L{PostgresStore.buy} sends them under load: what each one got (a
    ticket or its refusal), in order.
    """
    store.max_batch = len(buys)
    store.batch_slots = 0  # every writer busy: the purchases wait
    ds = [store.buy(username, legs) for username, legs in buys]
    store.batch_slots = 1
    store._next_batch()  # a writer is free: it takes them all
    outcomes: list[object] = []
    for d in ds:
        d.addBoth(lambda outcome: outcomes.append(outcome.value if isinstance(outcome, Failure) else outcome))
    assert len(outcomes) == len(buys), "the batch's Deferreds did not fire"
    return succeed(outcomes)


class IsolationTests(SynchronousTestCase):
    """
    Two concurrent transactions of the PostgreSQL store, in every order.
    Each test is one spec, on a fresh schema; its docstring says what it
    races and how many permutations that makes.
    """

    def setUp(self) -> None:
        url = pg.fresh_url(self)
        self.clock = Clock()
        self.clock.advance(START)
        self.store = PostgresStore.open(url, InlineExecutor(), lambda: load(MINI), FAST_HASHER.hash, clock=self.clock)
        self.store.start()
        self.addCleanup(self.store.stop)
        self.tiny = flight_by_id(self.store.network(), TINY)
        self.big = flight_by_id(self.store.network(), BIG)
        self.db = psycopg.connect(url, autocommit=True)
        self.addCleanup(self.db.close)
        self.scheduler = Scheduler(url, self.store.network(), self.clock, self.db)
        self.addCleanup(self.scheduler.close)

    # -- helpers ----------------------------------------------------------------

    def ok(self, d: Deferred[T]) -> T:
        """
        The result of one of the setup store's calls (they run inline).
        """
        results: list[Any] = []
        d.addBoth(results.append)
        [result] = results
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def assertClean(self, runs: list[Run], at_least: int) -> None:
        """
        Every permutation passed its checks, and there were at least
        C{at_least} of them.
        """
        bad = [run for run in runs if run.problems]
        if bad:
            self.fail(
                f"{len(bad)} of {len(runs)} permutations went wrong; the first {min(3, len(bad))}:\n"
                + "\n".join(run.describe() for run in bad[:3])
            )
        self.assertGreaterEqual(len(runs), at_least)

    def seats(self) -> dict[str, tuple[str | None, str | None]]:
        """
        The claimed seats of TINY: seat -> (hold_id, ticket_id).
        """
        return {
            seat: (hold_id, ticket_id)
            for seat, hold_id, ticket_id in self.db.execute(
                "SELECT seat, hold_id, ticket_id FROM seats WHERE flight_id = %s", (TINY,)
            )
        }

    def tickets(self) -> dict[str, tuple[str, str]]:
        """
        Every ticket: ticket_id -> (username, status).
        """
        return {t: (u, s) for t, u, s in self.db.execute("SELECT ticket_id, username, status FROM tickets")}

    def holds(self) -> dict[str, tuple[str, str]]:
        """
        Every hold: hold_id -> (username, state).
        """
        return {h: (u, s) for h, u, s in self.db.execute("SELECT hold_id, username, state FROM holds")}

    def expired_hold(self) -> str:
        """
        Alice's hold of 1A, whose time is up (by the injected clock).
        """
        hold = self.ok(self.store.hold(ALICE[0], "session-a", _legs(self.tiny, "1A"), HOLD_SECONDS, _alive))
        self.clock.advance(HOLD_SECONDS + 1)
        return hold.hold_id

    def one_winner(self, run: Run, loser_code: str) -> tuple[str, Any, Any] | None:
        """
        Check that exactly one session got what it asked for and the other
        was refused with C{loser_code}; return (winner's name, its outcome,
        the loser's refusal), or C{None} when not so.
        """
        won = {n: o for n, o in run.outcomes.items() if isinstance(o, (Ticket, Hold))}
        lost = {n: o for n, o in run.outcomes.items() if isinstance(o, VendePassError)}
        run.expect(len(won) == 1 and len(lost) == 1, f"not exactly one winner: {summary(run.outcomes)}")
        if len(won) != 1 or len(lost) != 1:
            return None
        [(name, outcome)] = won.items()
        [refusal] = lost.values()
        run.expect(refusal.code == loser_code, f"the loser's refusal is {refusal.code}, not {loser_code}")
        return name, outcome, refusal

    # -- specs ------------------------------------------------------------------

    def test_two_buyers_one_seat(self) -> None:
        """
        Alice and Bob buy seat 1A of TINY at once (one-step C{buy}): in
        every order one gets a ticket for it, the other C{seat_unavailable}.
        4 permutations: the flight's advisory lock, taken inside the first
        buyer's call, makes the second buyer's call wait until the first
        one's commit.
        """
        def check(run: Run, _: None) -> None:
            result = self.one_winner(run, "seat_unavailable")
            if result is None:
                return
            winner, ticket, refusal = result
            run.expect([leg.seat for leg in ticket.legs] == ["1A"], f"the ticket is for {ticket.legs}")
            run.expect(refusal.details.get("seat") == "1A", f"the refusal names {refusal.details}")
            run.expect(self.seats() == {"1A": (None, ticket.ticket_id)}, f"seats: {self.seats()}")
            run.expect(
                self.tickets() == {ticket.ticket_id: (ticket.username, "active")}, f"tickets: {self.tickets()}"
            )

        runs = self.scheduler.explore(
            lambda: None,
            lambda store, _: store.buy(ALICE[0], _legs(self.tiny, "1A")),
            lambda store, _: store.buy(BOB[0], _legs(self.tiny, "1A")),
            check,
        )
        self.assertClean(runs, at_least=4)
        winners = {describe(run.outcomes["A"]) == "seat_unavailable" for run in runs}
        self.assertEqual(winners, {True, False}, "each buyer wins in some order")
        self.assertTrue(any(run.waited() for run in runs), "in some order one call waits for the other's lock")
        self.assertTrue(any(run.waited() for run in runs), "in some order a buyer waits for the other's lock")

    def _last_seat(self, hold: bool = False) -> list[Run]:
        """
        With three of TINY's four seats sold, Alice and Bob each buy a seat
        the server picks (C{LegRequest(flight, None)}): in every order one
        gets the last seat, the other C{sold_out}, and neither needed a
        second attempt (the flight's lock made the second buyer wait until
        the first one's commit, rather than lose a race on the seat's key).
        """
        seats = self.tiny.aircraft.seats()
        last = seats[-1]

        def setup() -> None:
            for seat in seats[:-1]:
                self.ok(self.store.buy(ALICE[0], _legs(self.tiny, seat)))

        def check(run: Run, _: None) -> None:
            run.expect(run.attempts == {"A": 1, "B": 1}, f"attempts: {run.attempts}")
            result = self.one_winner(run, "sold_out")
            if result is None:
                return
            winner, claimed, refusal = result
            run.expect([leg.seat for leg in claimed.legs] == [last], f"the claim is for {claimed.legs}")
            run.expect(refusal.details.get("flight") == TINY, f"the refusal names {refusal.details}")
            claim = (claimed.hold_id, None) if hold else (None, claimed.ticket_id)
            run.expect(self.seats().get(last) == claim, f"seats: {self.seats()}")
            run.expect(len(self.seats()) == len(seats), f"seats: {self.seats()}")
            run.expect(len(self.tickets()) == len(seats) - hold, f"tickets: {self.tickets()}")

        def claim(user: str) -> Callable[[PostgresStore, None], Deferred[Any]]:
            if hold:
                return lambda store, _: store.hold(user, f"session-{user}", _legs(self.tiny, None), HOLD_SECONDS, _alive)
            return lambda store, _: store.buy(user, _legs(self.tiny, None))

        return self.scheduler.explore(setup, claim(ALICE[0]), claim(BOB[0]), check)

    def test_two_buyers_last_seat(self) -> None:
        """
        L{_last_seat}: 4 permutations (each purchase is two steps, the
        call and its commit); in those where the second call starts
        before the first one's commit, it waits for the flight's lock.
        """
        runs = self._last_seat()
        self.assertClean(runs, at_least=4)
        winners = {describe(run.outcomes["A"]) == "sold_out" for run in runs}
        self.assertEqual(winners, {True, False}, "each buyer wins in some order")
        self.assertIn("A:buy B:buy B waits A:commit B resumes B:commit", [" ".join(run.trace) for run in runs])

    def test_planted_bug_flight_lock_left_out(self) -> None:
        """
        The planted bug: C{vendepass_buy} (a batch of one since schema
        version 7) without the flights' advisory locks, installed in this
        test's schema. L{_last_seat} catches it:
        where both calls overlap, the second picks the same last seat (the
        first one's is not committed), waits on the seat's key instead, and
        fails with a unique violation once the first commits; only its
        retry says C{sold_out}.
        """
        self.plant("vendepass_buy_batch", self._BATCH_FLIGHT_LOCKS, migration=7)
        runs = self._last_seat()
        caught = [run for run in runs if run.problems]
        self.assertTrue(caught, "the planted bug went unnoticed")
        self.assertIn("attempts: {'A': 1, 'B': 2}", [problem for run in caught for problem in run.problems])

    def test_two_holders_last_seat(self) -> None:
        """
        L{_last_seat} with holds (C{vendepass_hold}): 4 permutations.
        """
        runs = self._last_seat(hold=True)
        self.assertClean(runs, at_least=4)
        self.assertIn("A:hold B:hold B waits A:commit B resumes B:commit", [" ".join(run.trace) for run in runs])

    def plant(self, function: str, correct: str, bugged: str = "", migration: int = 4) -> None:
        """
        Install in this test's schema a planted bug: C{function} of
        C{migration} (4: the one from schema version 3 to 4) with
        C{correct} (which it must have) replaced.
        """
        [statement] = _statements_of(postgres.MIGRATIONS[migration - 1], function)
        self.assertIn(correct, statement)
        self.db.execute(
            statement.replace(correct, bugged).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
        )

    def test_planted_bug_hold_flight_lock_left_out(self) -> None:
        """
        The planted bug: the flights' advisory locks left out of
        C{vendepass_claim}, the claim of C{vendepass_hold}. L{_last_seat}
        with holds catches it: the second hold picks the same last seat,
        waits on its key and fails with a unique violation; only its
        retry says C{sold_out}.
        """
        self.plant("vendepass_claim", "    FOREACH k IN ARRAY p_flight_keys LOOP\n"
                   "        PERFORM pg_advisory_xact_lock(1448083457, k);\n    END LOOP;\n")
        caught = [run for run in self._last_seat(hold=True) if run.problems]
        self.assertTrue(caught, "the planted bug went unnoticed")
        self.assertIn("attempts: {'A': 1, 'B': 2}", [problem for run in caught for problem in run.problems])

    def test_planted_bug_hold_row_lock_left_out(self) -> None:
        """
        The planted bug: C{vendepass_active_hold} (of C{vendepass_buy_hold}
        and C{vendepass_release}) reads the hold without locking it.
        L{_buy_hold_against_release} catches it: both read the hold
        active, and both win (the release's conditional update, once the
        purchase committed, finds nothing to end and says nothing).
        """
        self.plant("vendepass_active_hold", " WHERE hold_id = p_hold_id FOR UPDATE;", " WHERE hold_id = p_hold_id;")
        caught = [run for run in self._buy_hold_against_release() if run.problems]
        self.assertTrue(caught, "the planted bug went unnoticed")

    def test_planted_bug_ticket_lock_left_out(self) -> None:
        """
        The planted bug: C{vendepass_cancel} reads the ticket without
        locking it. L{_two_cancels} catches it: both cancels find it
        active, and both answer a cancelled ticket.
        """
        self.plant("vendepass_cancel", " LIMIT 1 FOR UPDATE OF tk;", " LIMIT 1;")
        caught = [run for run in self._two_cancels() if run.problems]
        self.assertTrue(caught, "the planted bug went unnoticed")

    def test_planted_bug_request_lock_left_out(self) -> None:
        """
        The planted bug: C{vendepass_replay} (of every function of
        migration 4) without the request's advisory lock. The same hold
        twice at once (L{_same_request}) catches it: the second one finds
        no outcome to replay, waits for the customer's row, then finds 1A
        held by its own first try and refuses.
        """
        self.plant("vendepass_replay", "    PERFORM pg_advisory_xact_lock(1448083458, p_request_key);\n")
        runs = self._same_request(
            lambda store: store.hold(ALICE[0], "session-a", _legs(self.tiny, "1A"), HOLD_SECONDS, _alive,
                                     request_id="r-1"),
            Hold,
            0,
        )
        self.assertTrue([run for run in runs if run.problems], "the planted bug went unnoticed")

    def test_buy_while_cancelled(self) -> None:
        """
        Alice cancels her ticket for 1A while Bob buys 1A. The cancel always
        succeeds; Bob gets the seat exactly when the cancel had committed by
        the time his call ("buy") started, and C{seat_unavailable}
        otherwise (a READ COMMITTED statement, in the function too, sees
        what was committed when it started); never two active tickets for
        1A. 6 permutations: nothing here waits for a lock, so every
        interleaving of the cancel's 2 steps and the buy's 2 (each a
        call, then its commit) runs (21 when the cancel was stepped
        statement by statement: lock tickets, update tickets, delete
        seats, insert audit, commit).
        """
        def setup() -> str:
            return self.ok(self.store.buy(ALICE[0], _legs(self.tiny, "1A"))).ticket_id

        def check(run: Run, ticket_id: str) -> None:
            cancelled, bought = run.outcomes["A"], run.outcomes["B"]
            run.expect(
                isinstance(cancelled, Ticket) and cancelled.status == "cancelled",
                f"the cancel: {describe(cancelled)}",
            )
            committed_first = run.position("A:commit") < run.position("B:buy")
            seats = self.seats()
            if committed_first:
                run.expect(isinstance(bought, Ticket), f"Bob looked after the cancel committed: {describe(bought)}")
                if isinstance(bought, Ticket):
                    run.expect(seats == {"1A": (None, bought.ticket_id)}, f"seats: {seats}")
                    run.expect(
                        self.tickets() == {ticket_id: ("alice", "cancelled"), bought.ticket_id: ("bob", "active")},
                        f"tickets: {self.tickets()}",
                    )
            else:
                run.expect(
                    isinstance(bought, VendePassError) and bought.code == "seat_unavailable",
                    f"Bob looked before the cancel committed: {describe(bought)}",
                )
                run.expect(seats == {}, f"seats: {seats}")
                run.expect(self.tickets() == {ticket_id: ("alice", "cancelled")}, f"tickets: {self.tickets()}")

        runs = self.scheduler.explore(
            setup,
            lambda store, ticket_id: store.cancel(ticket_id, ALICE[0]),
            lambda store, _: store.buy(BOB[0], _legs(self.tiny, "1A")),
            check,
        )
        self.assertClean(runs, at_least=6)
        self.assertEqual(
            {isinstance(run.outcomes["B"], Ticket) for run in runs}, {True, False}, "Bob wins in some orders only"
        )

    def test_two_holders_one_seat(self) -> None:
        """
        Alice and Bob hold 1A at once: one hold, and C{seat_unavailable}
        (with C{held_until}) for the other. 4 permutations: each hold is
        one call (C{vendepass_hold}) that locks its own customer, counts
        her held seats, then takes the flight's lock, where the second
        waits for the first one's commit (310 when a hold was stepped
        statement by statement).
        """
        def check(run: Run, _: None) -> None:
            result = self.one_winner(run, "seat_unavailable")
            if result is None:
                return
            winner, hold, refusal = result
            run.expect([leg.seat for leg in hold.legs] == ["1A"], f"the hold is for {hold.legs}")
            run.expect(
                refusal.details.get("held_until") == iso_utc(START + HOLD_SECONDS),
                f"the refusal says {refusal.details}",
            )
            run.expect(self.seats() == {"1A": (hold.hold_id, None)}, f"seats: {self.seats()}")
            run.expect(self.holds() == {hold.hold_id: (hold.username, "active")}, f"holds: {self.holds()}")

        runs = self.scheduler.explore(
            lambda: None,
            lambda store, _: store.hold(ALICE[0], "session-a", _legs(self.tiny, "1A"), HOLD_SECONDS, _alive),
            lambda store, _: store.hold(BOB[0], "session-b", _legs(self.tiny, "1A"), HOLD_SECONDS, _alive),
            check,
        )
        self.assertClean(runs, at_least=4)
        self.assertTrue(any(run.waited() for run in runs), "in some order one hold waits for the other's lock")
        winners = {describe(run.outcomes["A"]) == "seat_unavailable" for run in runs}
        self.assertEqual(winners, {True, False}, "each holder wins in some order")

    def test_buy_expired_hold_against_buy(self) -> None:
        """
        Alice's hold of 1A has expired (by the injected clock); she buys it
        (C{buy_hold}) while Bob buys 1A. In every order Alice gets
        C{hold_expired} and Bob the seat; the hold is ended exactly once
        (by whichever transaction got to it first; the other one's
        conditional update finds it ended). 4 permutations (8 when the
        purchase of a hold was stepped statement by statement).
        """

        def check(run: Run, hold_id: str) -> None:
            refused, bought = run.outcomes["A"], run.outcomes["B"]
            run.expect(
                isinstance(refused, VendePassError) and refused.code == "hold_expired",
                f"Alice's buy_hold: {describe(refused)}",
            )
            run.expect(isinstance(bought, Ticket), f"Bob's buy: {describe(bought)}")
            if isinstance(bought, Ticket):
                run.expect(self.seats() == {"1A": (None, bought.ticket_id)}, f"seats: {self.seats()}")
                run.expect(self.tickets() == {bought.ticket_id: ("bob", "active")}, f"tickets: {self.tickets()}")
            run.expect(self.holds() == {hold_id: ("alice", "expired")}, f"holds: {self.holds()}")
            expiries = self.db.execute("SELECT COUNT(*) FROM audit WHERE action = 'expire'").fetchone()
            run.expect(expiries == (1,), f"the hold's expiry was audited {expiries} times")

        runs = self.scheduler.explore(
            self.expired_hold,
            lambda store, hold_id: store.buy_hold(hold_id, ALICE[0]),
            lambda store, _: store.buy(BOB[0], _legs(self.tiny, "1A")),
            check,
        )
        self.assertClean(runs, at_least=4)
        self.assertTrue(any(run.waited() for run in runs), "in some order one waits for the other's hold row")

    def _same_request(
        self, call: Callable[[PostgresStore], Deferred[Any]], kind: type[Ticket] | type[Hold], at_least: int
    ) -> list[Run]:
        """
        Alice makes the same request (C{request_id} "r-1") twice at once, as
        a client retrying on another server while its first try is still in
        flight: both answers must name the same ticket or hold, and only
        one exists. With C{at_least} 0 the runs are returned unjudged
        (a planted bug's).
        """
        def check(run: Run, _: None) -> None:
            a, b = run.outcomes["A"], run.outcomes["B"]
            run.expect(isinstance(a, kind) and isinstance(b, kind), f"not both {kind.__name__}s")
            if isinstance(a, Ticket) and isinstance(b, Ticket):
                run.expect(a.ticket_id == b.ticket_id, f"two tickets: {a.ticket_id}, {b.ticket_id}")
                run.expect(a.legs == b.legs, f"different seats: {a.legs}, {b.legs}")
                run.expect(self.tickets() == {a.ticket_id: ("alice", "active")}, f"tickets: {self.tickets()}")
                run.expect(self.seats() == {a.legs[0].seat: (None, a.ticket_id)}, f"seats: {self.seats()}")
            if isinstance(a, Hold) and isinstance(b, Hold):
                run.expect(a.hold_id == b.hold_id, f"two holds: {a.hold_id}, {b.hold_id}")
                run.expect(self.holds() == {a.hold_id: ("alice", "active")}, f"holds: {self.holds()}")
                run.expect(self.seats() == {a.legs[0].seat: (a.hold_id, None)}, f"seats: {self.seats()}")
            requests = self.db.execute("SELECT COUNT(*) FROM requests").fetchone()
            run.expect(requests == (1,), f"{requests} requests remembered")

        runs = self.scheduler.explore(lambda: None, lambda store, _: call(store), lambda store, _: call(store), check)
        if at_least:
            self.assertClean(runs, at_least=at_least)
        return runs

    def test_same_request_id_picked_seat(self) -> None:
        """
        The same one-step C{buy} of a seat the server picks, twice at once
        with one C{request_id}: the second call waits on the request's lock
        (the first the function takes) until the first commits, then
        replays its ticket. 4 permutations (all the others would need a
        blocked session to move).
        """
        self._same_request(lambda store: store.buy(ALICE[0], _legs(self.tiny, None), request_id="r-1"), Ticket, 4)

    def test_same_request_id_chosen_seat(self) -> None:
        """
        The same one-step C{buy} of seat 1A, twice at once with one
        C{request_id}: one ticket, answered to both. 4 permutations.

        Before the request's lock this failed in 82 of 84 permutations:
        when the second transaction read the requests before the first
        committed, it found nothing to replay, then found 1A sold (by this
        very request) and refused with C{seat_unavailable}.
        """
        self._same_request(lambda store: store.buy(ALICE[0], _legs(self.tiny, "1A"), request_id="r-1"), Ticket, 4)

    def test_same_request_id_hold(self) -> None:
        """
        The same C{hold} of seat 1A, twice at once with one C{request_id}:
        one hold, answered to both. 4 permutations (22 when a hold was
        stepped statement by statement; before the request's lock: 126, of
        which 124 refused the second with C{seat_unavailable}).
        """
        self._same_request(
            lambda store: store.hold(ALICE[0], "session-a", _legs(self.tiny, "1A"), HOLD_SECONDS, _alive,
                                     request_id="r-1"),
            Hold,
            4,
        )

    # -- more races ---------------------------------------------------------------

    def test_two_buyers_two_flights_crosswise(self) -> None:
        """
        Alice buys 1A on TINY and 1A on BIG, Bob the same two seats with
        the legs the other way round: the flights' locks are taken in one
        order whatever the order of the legs, so neither deadlocks; one
        gets both seats, the other C{seat_unavailable} and nothing.
        4 permutations.
        """
        def check(run: Run, _: None) -> None:
            result = self.one_winner(run, "seat_unavailable")
            if result is None:
                return
            winner, ticket, refusal = result
            run.expect(
                sorted((leg.flight_id, leg.seat) for leg in ticket.legs) == sorted([(TINY, "1A"), (BIG, "1A")]),
                f"the ticket is for {ticket.legs}",
            )
            sold = self.db.execute("SELECT flight_id, seat, ticket_id FROM seats ORDER BY flight_id").fetchall()
            run.expect(
                sold == sorted([(TINY, "1A", ticket.ticket_id), (BIG, "1A", ticket.ticket_id)]), f"seats: {sold}"
            )
            run.expect(self.tickets() == {ticket.ticket_id: (ticket.username, "active")}, f"tickets: {self.tickets()}")

        runs = self.scheduler.explore(
            lambda: None,
            lambda store, _: store.buy(ALICE[0], [LegRequest(self.tiny, "1A"), LegRequest(self.big, "1A")]),
            lambda store, _: store.buy(BOB[0], [LegRequest(self.big, "1A"), LegRequest(self.tiny, "1A")]),
            check,
        )
        self.assertClean(runs, at_least=4)
        winners = {describe(run.outcomes["A"]) == "seat_unavailable" for run in runs}
        self.assertEqual(winners, {True, False}, "each buyer wins in some order")

    def test_buy_hold_against_release(self) -> None:
        """
        Alice buys her hold of 1A (C{buy_hold}) while her other connection
        releases it: whichever locks the hold first wins, the other gets
        C{hold_not_found}. L{_buy_hold_against_release}: 4 permutations
        (12 when both were stepped statement by statement).
        """
        runs = self._buy_hold_against_release()
        self.assertClean(runs, at_least=4)
        self.assertEqual({isinstance(run.outcomes["A"], Ticket) for run in runs}, {True, False})
        self.assertTrue(any(run.waited() for run in runs), "in some order one waits for the other's hold row")

    def _buy_hold_against_release(self) -> list[Run]:
        """
        Alice buys her hold of 1A while her other connection releases it:
        one of them wins, the other gets C{hold_not_found}.
        """
        def setup() -> str:
            hold = self.ok(self.store.hold(ALICE[0], "session-a", _legs(self.tiny, "1A"), HOLD_SECONDS, _alive))
            return hold.hold_id

        def check(run: Run, hold_id: str) -> None:
            bought, released = run.outcomes["A"], run.outcomes["B"]
            if isinstance(bought, Ticket):
                run.expect(describe(released) == "hold_not_found", f"the release: {describe(released)}")
                run.expect(self.seats() == {"1A": (None, bought.ticket_id)}, f"seats: {self.seats()}")
                run.expect(self.holds() == {hold_id: ("alice", "bought")}, f"holds: {self.holds()}")
            else:
                run.expect(released is None, f"neither won: {summary(run.outcomes)}")
                run.expect(describe(bought) == "hold_not_found", f"the buy_hold: {describe(bought)}")
                run.expect(self.seats() == {}, f"seats: {self.seats()}")
                run.expect(self.holds() == {hold_id: ("alice", "released")}, f"holds: {self.holds()}")

        return self.scheduler.explore(
            setup,
            lambda store, hold_id: store.buy_hold(hold_id, ALICE[0]),
            lambda store, hold_id: store.release(hold_id, ALICE[0]),
            check,
        )

    def test_two_cancels(self) -> None:
        """
        Alice cancels the same ticket from two connections at once: one
        cancels it, the other gets C{already_cancelled}, and its seat is
        freed once. L{_two_cancels}: 4 permutations (10 when a cancel was
        stepped statement by statement).
        """
        runs = self._two_cancels()
        self.assertClean(runs, at_least=4)
        self.assertTrue(any(run.waited() for run in runs), "in some order one waits for the other's ticket row")

    def _two_cancels(self) -> list[Run]:
        """
        Alice cancels the same ticket from two connections at once.
        """
        def setup() -> str:
            return self.ok(self.store.buy(ALICE[0], _legs(self.tiny, "1A"))).ticket_id

        def check(run: Run, ticket_id: str) -> None:
            result = self.one_winner(run, "already_cancelled")
            if result is None:
                return
            winner, ticket, refusal = result
            run.expect(ticket.status == "cancelled", f"the cancel: {describe(ticket)}")
            run.expect(self.seats() == {}, f"seats: {self.seats()}")
            run.expect(self.tickets() == {ticket_id: ("alice", "cancelled")}, f"tickets: {self.tickets()}")

        return self.scheduler.explore(
            setup,
            lambda store, ticket_id: store.cancel(ticket_id, ALICE[0]),
            lambda store, ticket_id: store.cancel(ticket_id, ALICE[0]),
            check,
        )

    # -- group commit: batches of one-step purchases ------------------------------

    def _against_lock_order(self) -> list[Flight]:
        """
        TINY and BIG, the one whose flight lock key is the larger first:
        purchases made in this order take their flights' locks against
        the one lock order, unless the batch takes them first, sorted.
        """
        return sorted([self.tiny, self.big], key=lambda f: postgres._lock_key(f.flight_id), reverse=True)

    def batch_outcomes(self, run: Run, name: str) -> list[object]:
        outcomes = run.outcomes[name]
        run.expect(isinstance(outcomes, list), f"{name} is not a batch's outcomes: {describe(outcomes)}")
        return outcomes if isinstance(outcomes, list) else []

    def sold(self) -> list[tuple[str, str, str]]:
        """
        Every seat sold or held: (flight, seat, ticket or hold).
        """
        return [
            (f, s, t or h)
            for f, s, t, h in self.db.execute("SELECT flight_id, seat, ticket_id, hold_id FROM seats ORDER BY 1, 2")
        ]

    def test_two_batches_crosswise(self) -> None:
        """
        Two batches of one-step purchases at once, on two connections:
        Alice's buys 1A of TINY, then 1A of BIG; Bob's the same two seats
        the other way round. Each batch takes every flight's lock first,
        sorted by key, so neither deadlocks: in every order one batch
        gets both seats (two tickets), the other C{seat_unavailable} for
        both. 4 permutations (each batch is its call, then its commit);
        in some the second call waits for the first one's locks.
        """
        def check(run: Run, _: None) -> None:
            a, b = self.batch_outcomes(run, "A"), self.batch_outcomes(run, "B")
            won = [name for name, got in (("A", a), ("B", b)) if all(isinstance(t, Ticket) for t in got)]
            lost = [name for name, got in (("A", a), ("B", b)) if [describe(t) for t in got] == ["seat_unavailable"] * 2]
            run.expect(len(won) == 1 and len(lost) == 1, f"not one batch's two tickets: {summary(run.outcomes)}")
            tickets = [t for t in a + b if isinstance(t, Ticket)]
            expected = sorted((leg.flight_id, leg.seat, t.ticket_id) for t in tickets for leg in t.legs)
            run.expect(self.sold() == expected, f"seats: {self.sold()}")
            run.expect(
                sorted((f, s) for f, s, _ in self.sold()) == sorted([(TINY, "1A"), (BIG, "1A")]), f"seats: {self.sold()}"
            )

        runs = self.scheduler.explore(
            lambda: None,
            lambda store, _: _batch(store, [(ALICE[0], _legs(self.tiny, "1A")), (ALICE[0], _legs(self.big, "1A"))]),
            lambda store, _: _batch(store, [(BOB[0], _legs(self.big, "1A")), (BOB[0], _legs(self.tiny, "1A"))]),
            check,
        )
        self.assertClean(runs, at_least=4)
        self.assertEqual(
            {all(isinstance(t, Ticket) for t in cast(list, run.outcomes["A"])) for run in runs},
            {True, False},
            "each batch wins in some order",
        )
        self.assertTrue(any(run.waited() for run in runs), "in some order one batch waits for the other's locks")

    def _batch_against_buy(self) -> list[Run]:
        """
        Alice's batch buys 1A of each of two flights, in the order against
        the lock order (L{_against_lock_order}), while Bob buys both seats
        in one purchase stepped statement by statement (L{SeatRules.buy}
        through L{PostgresTx}: the statements and lock order of
        C{vendepass_buy}, with a step between its two flights' locks).
        Whoever takes a flight's lock first gets both seats; the other
        C{seat_unavailable} (both of the batch's purchases, or Bob's one).
        """
        flights = self._against_lock_order()

        def check(run: Run, _: None) -> None:
            batch, bought = self.batch_outcomes(run, "A"), run.outcomes["B"]
            batch_first = run.position("A:buy batch") < run.position("B:lock flight")
            if batch_first:
                run.expect(all(isinstance(t, Ticket) for t in batch), f"the batch went first: {describe(batch)}")
                run.expect(describe(bought) == "seat_unavailable", f"Bob's purchase: {describe(bought)}")
            else:
                run.expect(isinstance(bought, Ticket), f"Bob went first: {describe(bought)}")
                run.expect([describe(t) for t in batch] == ["seat_unavailable"] * 2, f"the batch: {describe(batch)}")
            run.expect(run.attempts == {"A": 1, "B": 1}, f"attempts: {run.attempts}")
            tickets = [t for t in [*batch, bought] if isinstance(t, Ticket)]
            expected = sorted((leg.flight_id, leg.seat, t.ticket_id) for t in tickets for leg in t.legs)
            run.expect(self.sold() == expected and len(expected) == 2, f"seats: {self.sold()}")

        def buy(store: PostgresStore, _: None) -> Deferred[Ticket]:
            legs = [LegRequest(self.tiny, "1A"), LegRequest(self.big, "1A")]
            return store._write(lambda tx: store.rules.buy(tx, BOB[0], legs))

        return self.scheduler.explore(
            lambda: None,
            lambda store, _: _batch(store, [(ALICE[0], _legs(flight, "1A")) for flight in flights]),
            buy,
            check,
        )

    def test_batch_against_buy(self) -> None:
        """
        L{_batch_against_buy}: every order clean, each side wins in some;
        in some the batch's call waits while Bob holds one flight's lock
        and not yet the other's (it holds none of its own meanwhile).
        """
        runs = self._batch_against_buy()
        self.assertClean(runs, at_least=8)
        self.assertEqual({isinstance(run.outcomes["B"], Ticket) for run in runs}, {True, False})
        self.assertTrue(
            any("B:lock flight A:buy batch A waits B:lock flight" in " ".join(run.trace) for run in runs),
            "the batch waits between Bob's two flights' locks",
        )

    _BATCH_FLIGHT_LOCKS = (
        "    FOR k IN SELECT DISTINCT f::int FROM jsonb_array_elements(p_buys) x,"
        " jsonb_array_elements_text(x->4) f ORDER BY 1\n"
        "    LOOP\n        PERFORM pg_advisory_xact_lock(1448083457, k);\n    END LOOP;\n"
    )

    def test_planted_bug_batch_flight_locks_left_out(self) -> None:
        """
        The planted bug: C{vendepass_buy_batch} without its flights' locks
        (since schema version 7 nothing else of the batch takes them).
        L{_batch_against_buy} catches it: the batch sells both seats while
        Bob holds his flights' locks (he took them first, so they should
        be his), and where Bob has written his seat first the batch waits
        on its key, fails with a unique violation and is run again.
        """
        self.plant("vendepass_buy_batch", self._BATCH_FLIGHT_LOCKS, migration=7)
        caught = [problem for run in self._batch_against_buy() for problem in run.problems]
        self.assertIn("Bob went first: seat_unavailable", caught)
        self.assertIn("attempts: {'A': 3, 'B': 1}", caught)

    def test_planted_bug_batch_flight_locks_unsorted(self) -> None:
        """
        The planted bug: C{vendepass_buy_batch} takes its flights' locks in
        the order of its purchases, not sorted by key. L{_batch_against_buy}
        catches it with a deadlock, as when they are left out.
        """
        self.plant(
            "vendepass_buy_batch",
            self._BATCH_FLIGHT_LOCKS,
            "    FOR k IN SELECT f::int FROM jsonb_array_elements(p_buys) WITH ORDINALITY AS e(x, o),"
            " jsonb_array_elements_text(x->4) f ORDER BY o\n"
            "    LOOP\n        PERFORM pg_advisory_xact_lock(1448083457, k);\n    END LOOP;\n",
            migration=7,
        )
        with self.assertRaises(FailTest) as caught:
            self._batch_against_buy()
        self.assertIn("deadlock", str(caught.exception))

    def test_batch_against_hold(self) -> None:
        """
        Alice's batch buys 1A and 1B of TINY while Bob holds 1A
        (C{vendepass_hold}): a refusal costs only its purchase. Whoever
        calls first gets 1A; the batch gets 1B in every order.
        4 permutations.
        """
        def check(run: Run, _: None) -> None:
            batch, held = self.batch_outcomes(run, "A"), run.outcomes["B"]
            batch_first = run.position("A:buy batch") < run.position("B:hold")
            run.expect(len(batch) == 2 and isinstance(batch[-1], Ticket), f"the batch: {describe(batch)}")
            if batch_first:
                run.expect(bool(batch) and isinstance(batch[0], Ticket), f"the batch went first: {describe(batch)}")
                run.expect(describe(held) == "seat_unavailable", f"Bob's hold: {describe(held)}")
            else:
                run.expect(isinstance(held, Hold), f"Bob went first: {describe(held)}")
                run.expect(bool(batch) and describe(batch[0]) == "seat_unavailable", f"the batch: {describe(batch)}")
            claims = {
                leg.seat: (t.hold_id, None) if isinstance(t, Hold) else (None, t.ticket_id)
                for t in [*batch, held]
                if isinstance(t, (Ticket, Hold))
                for leg in t.legs
            }
            run.expect(self.seats() == claims and set(claims) == {"1A", "1B"}, f"seats: {self.seats()}")

        runs = self.scheduler.explore(
            lambda: None,
            lambda store, _: _batch(store, [(ALICE[0], _legs(self.tiny, "1A")), (ALICE[0], _legs(self.tiny, "1B"))]),
            lambda store, _: store.hold(BOB[0], "session-b", _legs(self.tiny, "1A"), HOLD_SECONDS, _alive),
            check,
        )
        self.assertClean(runs, at_least=4)
        self.assertEqual({isinstance(run.outcomes["B"], Hold) for run in runs}, {True, False})

    # -- the ends of holds that no customer asked for (migration 6) --------------

    def _two_sweeps(self) -> list[Run]:
        """
        Three holds of TINY's seats have expired; two servers sweep at once,
        each at most two holds (C{expired_holds(limit=2)}). A sweep passes
        over the holds that the other is ending (C{FOR UPDATE SKIP
        LOCKED}): in every order each hold is ended once, by one sweep, the
        two sweeps' answers together are the three holds, and neither
        waits for the other.
        """
        def setup() -> list[str]:
            holds = [
                self.ok(self.store.hold(ALICE[0], "session-a", _legs(self.tiny, seat), HOLD_SECONDS, _alive)).hold_id
                for seat in ("1A", "1B", "2A")
            ]
            self.clock.advance(HOLD_SECONDS + 1)
            return sorted(holds)

        def check(run: Run, holds: list[str]) -> None:
            a, b = run.outcomes["A"], run.outcomes["B"]
            swept = [h for h, _ in (a if isinstance(a, list) else []) + (b if isinstance(b, list) else [])]
            run.expect(sorted(swept) == holds, f"the sweeps ended {summary(run.outcomes)}, not each of {holds} once")
            run.expect(not run.waited(), "a sweep waited for the other")
            run.expect(self.holds() == {h: ("alice", "expired") for h in holds}, f"holds: {self.holds()}")
            run.expect(self.seats() == {}, f"seats: {self.seats()}")
            expiries = self.db.execute("SELECT COUNT(*) FROM audit WHERE action = 'expire'").fetchone()
            run.expect(expiries == (3,), f"{expiries} expiries audited")

        def sweep(store: PostgresStore, _: list[str]) -> Deferred[list[tuple[str, str]]]:
            return store.expired_holds(limit=2)

        return self.scheduler.explore(setup, sweep, sweep, check)

    def test_two_sweeps(self) -> None:
        """
        L{_two_sweeps}: 4 permutations; where they overlap, the second
        sweep ends the one hold that the first passed over.
        """
        runs = self._two_sweeps()
        self.assertClean(runs, at_least=4)
        self.assertEqual({len(cast(list, run.outcomes["B"])) for run in runs}, {1, 2})

    def test_planted_bug_sweep_waits(self) -> None:
        """
        The planted bug: the sweep locks its holds C{FOR UPDATE} without
        C{SKIP LOCKED}. L{_two_sweeps} catches it: where the sweeps
        overlap, the second waits for the first's holds, and then finds
        them ended and ends none (the third hold is left to the next
        sweep).
        """
        self.plant("vendepass_expired_holds", " FOR UPDATE SKIP LOCKED) x;", " FOR UPDATE) x;", migration=6)
        caught = [run for run in self._two_sweeps() if run.problems]
        self.assertTrue(caught, "the planted bug went unnoticed")
        self.assertIn("a sweep waited for the other", [problem for run in caught for problem in run.problems])

    def test_planted_bug_sweep_row_lock_left_out(self) -> None:
        """
        The planted bug: the sweep reads the expired holds without locking
        them. L{_two_sweeps} catches it: where the sweeps overlap, both
        read the same two holds active; the second one's ends wait, find
        them ended, and it answers them all the same (each expiry would
        be reported twice).
        """
        self.plant("vendepass_expired_holds", " FOR UPDATE SKIP LOCKED) x;", ") x;", migration=6)
        caught = [run for run in self._two_sweeps() if run.problems]
        self.assertTrue(caught, "the planted bug went unnoticed")
        self.assertTrue(
            any("not each of" in problem for run in caught for problem in run.problems), "no hold ended twice"
        )

    def test_expire_hold_against_sweep(self) -> None:
        """
        Alice's hold's timer runs out on her server (C{expire_hold}) while
        another server sweeps: the hold is ended once, by whichever locks
        it first; C{expire_hold} answers C{"expired"} in every order, and
        the sweep names the hold only when it got there first.
        4 permutations.
        """

        def check(run: Run, hold_id: str) -> None:
            expired, swept = run.outcomes["A"], run.outcomes["B"]
            run.expect(expired == "expired", f"expire_hold: {describe(expired)}")
            sweep_first = run.position("B:sweep") < run.position("A:expire hold")
            run.expect(swept == ([(hold_id, "session-a")] if sweep_first else []), f"the sweep: {describe(swept)}")
            run.expect(self.holds() == {hold_id: ("alice", "expired")}, f"holds: {self.holds()}")
            run.expect(self.seats() == {}, f"seats: {self.seats()}")
            expiries = self.db.execute("SELECT COUNT(*) FROM audit WHERE action = 'expire'").fetchone()
            run.expect(expiries == (1,), f"the hold's expiry was audited {expiries} times")

        runs = self.scheduler.explore(
            self.expired_hold,
            lambda store, hold_id: store.expire_hold(hold_id),
            lambda store, _: store.expired_holds(),
            check,
        )
        self.assertClean(runs, at_least=4)
        self.assertTrue(any(run.waited() for run in runs), "in some order expire_hold waits for the sweep's lock")

    def test_release_session_against_buy_hold(self) -> None:
        """
        Alice's connection closes (C{release_session}) while she buys its
        hold of 1A on another connection: whichever locks the hold first
        wins; the other finds it ended (the purchase: C{hold_not_found};
        the release: no hold to end). 4 permutations.
        """
        def setup() -> str:
            return self.ok(self.store.hold(ALICE[0], "session-a", _legs(self.tiny, "1A"), HOLD_SECONDS, _alive)).hold_id

        def check(run: Run, hold_id: str) -> None:
            released, bought = run.outcomes["A"], run.outcomes["B"]
            if isinstance(bought, Ticket):
                run.expect(released == [], f"the release: {describe(released)}")
                run.expect(self.seats() == {"1A": (None, bought.ticket_id)}, f"seats: {self.seats()}")
                run.expect(self.holds() == {hold_id: ("alice", "bought")}, f"holds: {self.holds()}")
            else:
                run.expect(released == [hold_id], f"neither won: {summary(run.outcomes)}")
                run.expect(describe(bought) == "hold_not_found", f"the buy_hold: {describe(bought)}")
                run.expect(self.seats() == {}, f"seats: {self.seats()}")
                run.expect(self.holds() == {hold_id: ("alice", "released")}, f"holds: {self.holds()}")

        runs = self.scheduler.explore(
            setup,
            lambda store, _: store.release_session("session-a"),
            lambda store, hold_id: store.buy_hold(hold_id, ALICE[0]),
            check,
        )
        self.assertClean(runs, at_least=4)
        self.assertEqual({isinstance(run.outcomes["B"], Ticket) for run in runs}, {True, False})
        self.assertTrue(any(run.waited() for run in runs), "in some order one waits for the other's hold row")
