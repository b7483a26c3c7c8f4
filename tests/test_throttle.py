"""
Login and registration throttling against hostile customers: a guesser
cannot lock the owner out, the throttle's memory stays bounded whatever
usernames are sent, and registering (which tells taken names) is limited
per address. Time is a L{Clock}.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

from attrs import field, frozen
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.common import ALICE, FAST_HASHER, MINI, START, LineClient, make_service
from vendepass.passwords import ScryptHasher
from vendepass.service import ReservationService
from vendepass.tap import Options, makeService
from vendepass.throttle import LoginThrottle


def at(service: ReservationService, address: str) -> LineClient:
    """
    A connection from C{address}.
    """
    client = LineClient(service)
    assert client.protocol.session is not None
    client.protocol.session.peer = address
    return client


def login(client: LineClient, username: str, password: str) -> dict[str, Any]:
    return client.request(1, {"username": username, "password": password})


def outcome(reply: dict[str, Any]) -> str:
    return "ok" if reply["ok"] else str(reply["error"]["code"])


class LockoutTests(SynchronousTestCase):
    """
    Failures are the guesser's: the username-wide brake applies only to the
    addresses that failed for that username.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(clock=self.clock)

    def test_distributed_guesses_do_not_lock_out_the_owner(self) -> None:
        """
        Five wrong passwords for alice from five addresses; the right one
        from a sixth gets in at once.
        """
        for i in range(5):
            self.assertEqual(outcome(login(at(self.service, f"203.0.113.{i}"), "alice", "wrong")), "bad_credentials")
        self.assertEqual(outcome(login(at(self.service, "198.51.100.1"), *ALICE)), "ok")

    def test_the_brake_holds_the_failing_addresses(self) -> None:
        """
        The username-wide count still brakes the addresses that failed for
        the username, even one that failed only once: guessing spread over
        many addresses gets one guess per new address while it holds.
        """
        guessers = [at(self.service, f"203.0.113.{i}") for i in range(6)]
        for guesser in guessers[:5]:
            login(guesser, "alice", "wrong")
        limited = login(guessers[0], *ALICE)["error"]
        self.assertEqual((limited["code"], limited["retry_after"]), ("rate_limited", 1))
        # A new address gets its one guess, and the brake grows.
        self.assertEqual(outcome(login(guessers[5], "alice", "wrong")), "bad_credentials")
        self.assertEqual(login(guessers[5], "alice", "wrong")["error"]["retry_after"], 2)
        self.clock.advance(2)
        self.assertEqual(outcome(login(guessers[0], *ALICE)), "ok")

    def test_owner_is_never_locked_out(self) -> None:
        """
        The attack that kept the owner out: one wrong guess from a fresh
        address each time the block ends, for 97 seconds, while the owner
        logs in every 2 seconds from home. Every one of the owner's logins
        succeeds.
        """
        owner = at(self.service, "198.51.100.1")
        fresh = 0
        owner_ok = owner_tries = 0
        for tick in range(97 * 4):
            guesser = at(self.service, f"10.{fresh // 256}.{fresh % 256}.1")
            reply = login(guesser, "alice", "wrong")
            if outcome(reply) == "bad_credentials":
                fresh += 1
            if tick % 8 == 0:
                owner_tries += 1
                owner_ok += outcome(login(owner, *ALICE)) == "ok"
            self.clock.advance(0.25)
        self.assertGreater(fresh, 5)
        self.assertEqual((owner_ok, owner_tries), (49, 49))

    def test_owner_who_mistypes_under_attack(self) -> None:
        """
        An address that has logged into the username is trusted: a typo
        there while the username is attacked does not bring its brake on.
        """
        owner = at(self.service, "198.51.100.1")
        owner.login(ALICE)
        owner.ok(9)
        for i in range(8):
            login(at(self.service, f"203.0.113.{i}"), "alice", "wrong")
        self.assertEqual(outcome(login(owner, "alice", "typo")), "bad_credentials")
        self.assertEqual(outcome(login(owner, *ALICE)), "ok")

    def evaluated(self, addresses: int, usernames: int, seconds: float = 900) -> int:
        """
        How many wrong passwords are evaluated (not refused as
        C{rate_limited}) in C{seconds} when C{addresses} guess
        C{usernames} in turn, each retrying exactly when allowed.
        """
        self.setUp()
        guessers = [at(self.service, f"203.0.113.{i}") for i in range(addresses)]
        # When each may try next, and when it last tried (the longest
        # waiting goes first among those ready).
        ready = [0.0] * addresses
        used = [-1] * addresses
        count = 0
        turn = 0
        while True:
            i = min(range(addresses), key=lambda a: (ready[a], used[a]))
            if ready[i] >= seconds:
                return count
            self.clock.advance(max(0.0, START + ready[i] - self.clock.seconds()))
            reply = login(guessers[i], f"user_{turn % usernames}", "wrong")
            used[i] = turn
            turn += 1
            if reply["ok"]:
                raise AssertionError(reply)
            if reply["error"]["code"] == "bad_credentials":
                count += 1
            else:
                ready[i] = self.clock.seconds() - START + reply["error"]["retry_after"]

    def test_one_address_gets_no_more_guesses(self) -> None:
        """
        One address guessing one username gets exactly the guesses it got
        before the username-wide brake changed: 5 free, then waits of 1, 2,
        4, ... 256 seconds, then 300: 15 in 15 minutes.
        """
        self.assertEqual(self.evaluated(addresses=1, usernames=1), 15)

    def test_one_address_many_usernames(self) -> None:
        """
        Spreading over usernames does not help one address either.
        """
        self.assertEqual(self.evaluated(addresses=1, usernames=50), 15)

    def test_many_addresses_one_username(self) -> None:
        """
        Many addresses on one username: each new address gets its one guess
        past the username's brake, then waits for the brake like the others.
        Ten get 15 in 15 minutes, as one does; 30 get their 30 first
        guesses, then the brake (at its ceiling of 5 minutes by then) lets
        one through at 300 s and one at 600 s; 60 get 60 + 2.
        """
        counts = {n: self.evaluated(addresses=n, usernames=1) for n in (10, 30, 60)}
        self.assertEqual(counts, {10: 15, 30: 32, 60: 62})


# One step of a throttle's life: who fails or succeeds, and how long until
# the next step.
STEPS = st.lists(
    st.tuples(
        st.booleans(),
        st.sampled_from(["alice", "bob", "carol_9", None]),
        st.integers(0, 7),
        st.sampled_from([0.0, 0.5, 2.0, 40.0, 400.0]),
    ),
    max_size=120,
)


class ThrottlePropertyTests(SynchronousTestCase):
    @given(STEPS, st.integers(1, 12))
    @settings(max_examples=200)
    def test_clean_address_and_bound(self, steps: list[tuple[bool, str | None, int, float]], most: int) -> None:
        """
        Whatever fails or succeeds from addresses 0 to 7, an address that
        never failed (8) may try any username at once; an address that
        never failed for a username waits no longer than its own address
        record says; and the table never holds more than its maximum.
        """
        clock = Clock()
        clock.advance(START)
        throttle = LoginThrottle(clock, max_entries=most)
        failed: set[tuple[str | None, str]] = set()
        for fails, username, address, advance in steps:
            peer = f"10.0.0.{address}"
            if fails or username is None:
                throttle.failed(username, peer)
                failed.add((username, peer))
            else:
                throttle.succeeded(username, peer)
            self.assertLessEqual(len(throttle), 2 * most)
            for name in ["alice", "bob", "carol_9"]:
                self.assertEqual(throttle.retry_after(name, "10.0.0.8"), 0)
                for other in range(8):
                    peer = f"10.0.0.{other}"
                    if (name, peer) not in failed:
                        self.assertEqual(throttle.retry_after(name, peer), throttle.retry_after(None, peer))
            clock.advance(advance)


@frozen
class CountingHasher(ScryptHasher):
    """
    The real hasher, counting the passwords it hashes.
    """

    hashed: list[str] = field(factory=list)

    def hash(self, password: str) -> str:
        self.hashed.append(password)
        return super().hash(password)


class MemoryTests(SynchronousTestCase):
    """
    The throttle's tables are bounded in count and bytes whatever the
    usernames sent.
    """

    def test_impossible_usernames_are_not_kept(self) -> None:
        """
        200 failed logins with 60,000-character usernames, from 200
        addresses, through the protocol: they are answered like any other
        failure, and keep under 1 MB (a username that breaks the rule is
        never a key: only its address is counted).
        """
        clock = Clock()
        clock.advance(START)
        service = make_service(clock=clock)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            client = at(service, f"10.0.{i}.1")
            self.assertEqual(outcome(login(client, "a" * 60_000 + str(i), "wrong")), "bad_credentials")
            client.disconnect()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(grown, 1_000_000)
        self.assertEqual(len(service.throttle), 200)  # type: ignore[arg-type]

    def test_bounded_count_and_bytes(self) -> None:
        """
        200,000 failures, each for another username from one of 1,000
        addresses in 100 seconds: the table fills up to its maximum within
        the first 50,000 (two records each, and one per address), taking
        some 300 bytes a record (about 30 MB for 100,000; under 40 MB
        asserted), and never holds more however many follow.
        """
        clock = Clock()
        clock.advance(START)
        throttle = LoginThrottle(clock)
        from vendepass.throttle import MAX_ENTRIES

        def fail(i: int) -> None:
            throttle.failed(f"user_{i}", f"10.0.{i % 1000 // 250}.{i % 250}")
            clock.advance(0.0005)

        # Traced while it fills up (tracing every allocation is slow).
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):
            fail(i)
        full = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        self.assertEqual(len(throttle), MAX_ENTRIES)
        self.assertLess(full, 40_000_000)
        self.assertLess(full / MAX_ENTRIES, 400)
        for i in range(50_000, 200_000):
            fail(i)
            if i % 1000 == 0:
                self.assertLessEqual(len(throttle), MAX_ENTRIES)
        self.assertEqual(len(throttle), MAX_ENTRIES)

    def test_forgotten_by_age(self) -> None:
        """
        Records are swept as they age, not only when the table is full:
        after 15 minutes without failures, one more failure leaves only
        its own records.
        """
        clock = Clock()
        clock.advance(START)
        throttle = LoginThrottle(clock)
        for i in range(5000):
            throttle.failed(f"user_{i}", f"10.0.{i // 250}.{i % 250}")
        self.assertEqual(len(throttle), 3 * 5000)
        clock.advance(901)
        throttle.failed("bob", "10.9.9.9")
        self.assertEqual(len(throttle), 3)


class RegistrationLimitTests(SynchronousTestCase):
    """
    Registering answers C{username_taken}, so it tells which names exist:
    registrations are limited per address, taken names counting like new
    accounts, and a taken name is refused before any password is hashed.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = make_service(clock=self.clock)

    def register(self, client: LineClient, username: str) -> dict[str, Any]:
        return client.request(10, {"username": username, "password": "a-good-password"})

    def test_limited_per_address(self) -> None:
        prober = at(self.service, "203.0.113.9")
        answers = [outcome(self.register(prober, name)) for name in ["alice", "bob"] * 5 + [f"new_{i}" for i in range(10)]]
        self.assertEqual(answers, ["username_taken"] * 10 + ["ok"] * 10)
        limited = self.register(prober, "carol")["error"]
        self.assertEqual((limited["code"], limited["retry_after"]), ("rate_limited", 3600))
        self.assertEqual(outcome(self.register(prober, "alice")), "rate_limited")
        # Another address is not limited; this one is again after the hour.
        self.assertEqual(outcome(self.register(at(self.service, "198.51.100.1"), "carol")), "ok")
        self.clock.advance(3600)
        self.assertEqual(outcome(self.register(prober, "dave")), "ok")

    def test_malformed_requests_do_not_count(self) -> None:
        """
        A refusal for the request's form tells nothing and costs nothing:
        it does not use up the address's registrations.
        """
        prober = at(self.service, "203.0.113.9")
        for _ in range(30):
            self.assertEqual(outcome(self.register(prober, "No Such Name")), "invalid_request")
        self.assertEqual(outcome(self.register(prober, "carol")), "ok")

    def test_taken_name_costs_no_hash(self) -> None:
        hasher = CountingHasher(n=FAST_HASHER.n, r=FAST_HASHER.r, p=FAST_HASHER.p)
        self.service._hasher = hasher
        client = at(self.service, "203.0.113.9")
        self.assertEqual(outcome(self.register(client, "alice")), "username_taken")
        self.assertEqual(hasher.hashed, [])
        self.assertEqual(outcome(self.register(client, "carol")), "ok")
        self.assertEqual(hasher.hashed, ["a-good-password"])


class RegistrationOptionTests(TestCase):
    def limit(self, *args: str) -> int:
        """
        The registration limit of the service that C{twistd vendepass} runs
        with C{args}.
        """
        db = Path(self.mktemp()).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        options = Options()
        options.parseOptions(["--db", str(db), "--fixtures", str(MINI), "--listen", "tcp:0:interface=127.0.0.1", *args])
        services = list(makeService(options))  # type: ignore[call-overload]
        listening = [s for s in services if isinstance(s, StreamServerEndpointService)]
        self.addCleanup(lambda: gatherResults([s.stopService() for s in listening]))
        [service] = [s for s in services if isinstance(s, ReservationService)]
        service.store.stop()
        self.assertEqual(service.registrations.window, 3600)
        return service.registrations.limit

    def test_option(self) -> None:
        """
        C{--max-registrations-per-ip} sets the limit: 20 an hour by
        default, 0 for none.
        """
        self.assertEqual(self.limit(), 20)
        self.assertEqual(self.limit("--max-registrations-per-ip", "3"), 3)
        self.assertEqual(self.limit("--max-registrations-per-ip", "0"), 0)
        self.assertRaises(UsageError, Options().parseOptions, ["--db", self.mktemp(), "--max-registrations-per-ip", "-1"])
