"""
Simulation tests (reliability plan T1-T4, T17, T18): many customers against
the real protocol, service and SQLite store, all in memory, with Hypothesis
choosing sends, network pumps, which queued database transaction commits
next, clock jumps, garbage, disconnects and reconnects; a checker compares
what the clients were told with the database after every step. The harness
is L{tests.simulation}.

Profiles (VENDEPASS_SIMULATION):

 - C{ci} (the default): 200 examples of 60 steps, derandomized (the same
   examples every run).
 - C{long}: 10,000 examples of 100 steps, with a seed that changes every
   day (or VENDEPASS_SIMULATION_SEED); the nightly run::

     VENDEPASS_SIMULATION=long .venv/bin/python -m twisted.trial tests.test_simulation.SimulationTests

Measured on the 2-core CI machine: the ci profile runs in about 12 s (the
whole module in about 17 s); the long profile at about 0.09 s an example,
some 16 minutes. Across 8 seeds at 200 x 60 the coverage gate's figures
ranged over 62-82% of examples buying, 62-78% seeing seat_unavailable,
26-63% seeing an expiry and 18-44% seeing a disconnect release a live hold
(gates: 50%, 20%, 10%, 10%). Each mutant dies within a dozen examples.

A failure prints the shrunk steps (C{state.setup(contended=...)},
C{state.step(action=...)}); to run them again outside Hypothesis, pass the
same values to L{tests.simulation.play}, e.g.::

    play(Simulation, 2, [HoldSeats(client=0, itinerary="TINY", seats=("1A",)), Settle()])

To run the whole simulation with one known bug switched on (and watch it
fail), set VENDEPASS_MUTANT to one of L{tests.simulation.MUTANTS}, e.g.
C{VENDEPASS_MUTANT=check_then_act}.
"""

from __future__ import annotations

import os
import re
import time
from datetime import date
from typing import Callable

from hypothesis import HealthCheck, Phase, Verbosity, seed, settings
from hypothesis.stateful import run_state_machine_as_test
from twisted.trial.unittest import SynchronousTestCase

from tests import simulation
from tests.simulation import (
    COUNTS,
    FLAGS,
    MUTANTS,
    Action,
    Advance,
    BuyHold,
    BuySeats,
    Commit,
    Disconnect,
    HoldSeats,
    Pump,
    Settle,
    GroupCommitSimulation,
    Simulation,
    Violation,
    mutant_machine,
    play,
    replay,
)

PROFILE = os.environ.get("VENDEPASS_SIMULATION", "ci")
MUTANT = os.environ.get("VENDEPASS_MUTANT") or None

BASE = settings(
    settings.get_profile("ci"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

if PROFILE == "long":
    EXAMPLES, STEPS = 10_000, 100
    SEED: int | None = int(os.environ.get("VENDEPASS_SIMULATION_SEED") or date.today().strftime("%Y%m%d"))
    RUN_SETTINGS = settings(BASE, max_examples=EXAMPLES, stateful_step_count=STEPS, derandomize=False)
elif PROFILE == "ci":
    EXAMPLES, STEPS = 200, 60
    SEED = None
    RUN_SETTINGS = settings(BASE, max_examples=EXAMPLES, stateful_step_count=STEPS)
else:
    raise ValueError(f"VENDEPASS_SIMULATION={PROFILE!r}: use ci or long")

# The coverage gate (plan T3): the share of examples that must do each thing.
REQUIRED_SHARE = {
    "bought": 0.5,
    "seat_unavailable": 0.2,
    "expiry": 0.1,
    "disconnect released a live hold": 0.1,
}

# Mutants must be caught within this many (derandomized) examples.
MUTANT_EXAMPLES = 500
MUTANT_STEPS = 60


def machine() -> type[Simulation]:
    return Simulation if MUTANT is None else mutant_machine(MUTANT)


def summary() -> str:
    examples = COUNTS["examples"]
    lines = [f"  {count:8d}  {what}" for what, count in sorted(COUNTS.items())]
    shares = [f"  {COUNTS[f'examples: {flag}'] / max(examples, 1):8.1%}  of examples: {flag}" for flag in FLAGS]
    return "\n".join(lines + shares)


def _shape(message: str) -> str:
    """
    C{message} without its random hold and ticket ids.
    """
    return re.sub(r"\bH[0-9a-f]{16}\b|\b[A-Z2-9]{8}\b", "<id>", message)


class SimulationTests(SynchronousTestCase):
    """
    T1-T4: the simulation finds no violation, and its generator really makes
    customers buy, contend, expire and drop live holds.
    """

    def test_simulation(self) -> None:
        COUNTS.clear()
        run = machine()
        test: Callable[[], None] = lambda: run_state_machine_as_test(run, settings=RUN_SETTINGS)
        if SEED is not None:
            print(f"\nsimulation seed {SEED}")
            factory: Callable[[], Simulation] = lambda: run()
            run_seeded = seed(SEED)(factory)
            test = lambda: run_state_machine_as_test(run_seeded, settings=RUN_SETTINGS)  # type: ignore[arg-type]
        started = time.perf_counter()
        test()
        elapsed = time.perf_counter() - started
        examples = COUNTS["examples"]
        print(
            f"\nsimulation ({PROFILE}): {examples} examples, {COUNTS['steps']} steps"
            f" ({EXAMPLES} x {STEPS} asked), {COUNTS['jobs committed']} transactions,"
            f" {COUNTS['acknowledged purchases']} acknowledged purchases checked, 0 lost,"
            f" 0 violations, in {elapsed:.1f} s:\n{summary()}"
        )
        self.assertGreaterEqual(examples, EXAMPLES)
        for flag, share in REQUIRED_SHARE.items():
            self.assertGreaterEqual(
                COUNTS[f"examples: {flag}"], share * examples, f"coverage gate: too few examples with {flag!r}"
            )


class GroupCommitSimulationTests(SynchronousTestCase):
    """
    The same simulation with group commit: writes that queue up while a
    transaction is in flight share the next one, in one transaction.
    """

    def test_simulation(self) -> None:
        COUNTS.clear()
        run_state_machine_as_test(GroupCommitSimulation, settings=settings(RUN_SETTINGS, max_examples=EXAMPLES // 2))
        print(
            f"\ngroup-commit simulation: {COUNTS['examples']} examples, {COUNTS['steps']} steps,"
            f" {COUNTS['jobs committed']} transactions, {COUNTS['batched writes']} writes,"
            f" 0 violations"
        )
        self.assertGreaterEqual(COUNTS["examples"], EXAMPLES // 2)
        # Group commit really happened: transactions of several writes.
        self.assertGreater(COUNTS["batched writes"], COUNTS["batches"])
        for flag, share in REQUIRED_SHARE.items():
            self.assertGreaterEqual(
                COUNTS[f"examples: {flag}"], share * COUNTS["examples"], f"coverage gate: too few examples with {flag!r}"
            )


class ReproducibilityTests(SynchronousTestCase):
    """
    T17: one seed gives one run.
    """

    def record(self, run: Callable[[], None]) -> list[tuple[str, int, list[Action]]]:
        simulation.RECORDING = []
        try:
            run()
            return simulation.RECORDING
        finally:
            simulation.RECORDING = None

    def test_same_seed_same_run(self) -> None:
        """
        The same seed twice gives the same examples, event for event.
        """
        factory: Callable[[], Simulation] = lambda: Simulation()
        seeded = seed(20261201)(factory)
        options = settings(BASE, max_examples=20, stateful_step_count=60, derandomize=False)
        first = self.record(lambda: run_state_machine_as_test(seeded, settings=options))  # type: ignore[arg-type]
        second = self.record(lambda: run_state_machine_as_test(seeded, settings=options))  # type: ignore[arg-type]
        self.assertGreaterEqual(len(first), 20)
        self.assertEqual([h for h, _, _ in first], [h for h, _, _ in second])
        self.assertGreater(len({h for h, _, _ in first}), 1)

    def test_replay_steps(self) -> None:
        """
        Replaying the recorded steps of an example, outside Hypothesis,
        gives its event log again.
        """
        options = settings(BASE, max_examples=5, stateful_step_count=60)
        recorded = self.record(lambda: run_state_machine_as_test(Simulation, settings=options))
        log_hash, contended, steps = max(recorded, key=lambda r: len(r[2]))
        self.assertGreater(len(steps), 10)
        self.assertEqual(replay(Simulation, contended, steps), log_hash)

    def test_scripted_race(self) -> None:
        """
        A fixed script, replayed twice: alice's hold and bob's purchase race
        for 1A and the purchase commits first; alice's hold is refused, her
        second hold wins 1B, bob hangs up abruptly, the clock passes the
        hold time, everything settles.
        """
        script: list[Action] = [
            HoldSeats(0, "TINY", ("1A",)),
            BuySeats(1, "TINY", ("1A",)),
            Commit(1),
            Commit(0),
            Pump(),
            HoldSeats(0, "TINY", ("1B",)),
            Commit(0),
            Pump(),
            Disconnect(1, abrupt=True),
            Advance(45),
            Settle(),
        ]
        first = play(Simulation, 2, script)
        self.assertEqual(first.counts["buy: ok"], 1)
        self.assertEqual(first.counts["hold: seat_unavailable"], 1)
        self.assertEqual(first.counts["hold: ok"], 1)
        self.assertEqual(first.counts["hold_expired events"], 1)
        self.assertEqual(first.log_hash(), replay(Simulation, 2, script))

class MutantTests(SynchronousTestCase):
    """
    T18: with each known bug switched on, the simulation fails.
    """

    def killed(self, name: str) -> None:
        COUNTS.clear()
        del simulation.FIRST_VIOLATION[:]
        # No shrinking: it would take minutes, and only the kill matters here.
        options = settings(
            BASE,
            max_examples=MUTANT_EXAMPLES,
            stateful_step_count=MUTANT_STEPS,
            phases=[Phase.generate],
            print_blob=False,
            verbosity=Verbosity.quiet,
        )
        started = time.perf_counter()
        with self.assertRaises(Violation) as caught:
            run_state_machine_as_test(mutant_machine(name), settings=options)
        elapsed = time.perf_counter() - started
        self.flushLoggedErrors()
        examples, step, message = simulation.FIRST_VIOLATION[0]
        print(f"\nmutant {name}: killed in example {examples + 1} at step {step} ({elapsed:.1f} s): {message}")
        self.assertLessEqual(examples + 1, MUTANT_EXAMPLES)
        # Hypothesis raised when it ran the example again: the same violation
        # (with other random ids).
        self.assertIn(_shape(message), _shape(str(caught.exception)))

    def test_check_then_act(self) -> None:
        self.killed("check_then_act")

    def test_ack_before_commit(self) -> None:
        self.killed("ack_before_commit")

    def test_cancel_without_owner(self) -> None:
        self.killed("cancel_without_owner")

    def test_hold_ignores_close(self) -> None:
        self.killed("hold_ignores_close")

    def test_memory_misses_frees(self) -> None:
        self.killed("memory_misses_frees")

    def test_every_mutant_tested(self) -> None:
        tested = {name[len("test_") :] for name in dir(self) if name.startswith("test_")} - {"every_mutant_tested"}
        self.assertEqual(tested, set(MUTANTS))
