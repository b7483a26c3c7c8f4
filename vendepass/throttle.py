"""
Login and registration throttling.

Failed logins slow down the guesser, not the account's owner: failures are
counted per (username, address) and per address, each slowing down
exponentially up to a ceiling, and a username-wide count (against guessing
spread over many addresses) brakes only the addresses that have themselves
failed for that username and never logged into it. A correct password from
any other address gets in at once, however hard the username is attacked
elsewhere.

Registrations are limited per address and per hour, whatever their outcome.

Memory is bounded: records are keyed by a 16-byte digest (never by the
username as sent: the service passes no username that breaks the username
rule), kept in order of last use, swept by age as they are added (amortised
O(1) per failure), and the oldest dropped beyond a hard maximum count.
"""

from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

# The most records one table holds (about 270 bytes each: some 27 MB at
# most). The hashing threads evaluate some 40 failed logins a second, at most
# 3 records each: filling it takes longer than failures are remembered.
MAX_ENTRIES = 100_000
# How long an address that logged into a username stays exempt from that
# username's brake.
TRUST_SECONDS = 30 * 86400
DEFAULT_REGISTRATIONS_PER_HOUR = 20


def _key(*parts: str) -> bytes:
    return blake2b("\0".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


@define(slots=True)
class _Record:
    """
    @ivar last: when it was last counted (the start of the window for a
        registration record).
    """

    last: float
    count: int = 0
    blocked_until: float = 0.0


@define(eq=False)
class _Table:
    """
    Records by key, least recently touched first, none older than
    C{max_age} once swept, never more than C{max_entries}.
    """

    max_age: float
    max_entries: int
    _records: OrderedDict[bytes, _Record] = field(factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: bytes, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is None or now - record.last > self.max_age:
            return None
        return record

    def touch(self, key: bytes, now: float, move: bool = True) -> _Record:
        """
        The live record for C{key} (a new one if none), marked as used now
        (or, with C{move} false, left where it is: its age is its start);
        then the table is swept.
        """
        record = self.get(key, now)
        if record is None:
            self._records.pop(key, None)
            record = self._records[key] = _Record(now)
        elif move:
            record.last = now
            self._records.move_to_end(key)
        self.sweep(now)
        return record

    def pop(self, key: bytes) -> None:
        self._records.pop(key, None)

    def sweep(self, now: float) -> None:
        """
        Drop expired records from the old end, then the oldest beyond the
        maximum: each record is dropped once, so this costs O(1) per record
        added, amortised.
        """
        records = self._records
        while len(records) > self.max_entries:
            records.popitem(last=False)
        while records and now - next(iter(records.values())).last > self.max_age:
            records.popitem(last=False)


@define(eq=False)
class LoginThrottle:
    """
    @ivar free_attempts: failures allowed before any wait.
    @ivar base: the first wait, in seconds; it doubles with each failure.
    @ivar ceiling: the longest wait ever imposed.
    @ivar forget_after: failures are forgotten after this long without one.
    @ivar max_entries: the most failure records kept (and, apart, the most
        trusted (username, address) pairs).
    """

    clock: IReactorTime
    free_attempts: int = 5
    base: float = 1.0
    ceiling: float = 300.0
    forget_after: float = 900.0
    max_entries: int = MAX_ENTRIES
    trust_seconds: float = TRUST_SECONDS
    _failures: _Table = field(init=False)
    _trusted: _Table = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._failures = _Table(self.forget_after, self.max_entries)
        self._trusted = _Table(self.trust_seconds, self.max_entries)

    def __len__(self) -> int:
        """
        How many records it keeps (failures and trusted pairs).
        """
        return len(self._failures) + len(self._trusted)

    def retry_after(self, username: str | None, address: str) -> float:
        """
        Seconds to wait before this login may be tried; 0 if it may be now.

        @param username: C{None} for a username that breaks the username
            rule (it cannot log in: only its address counts).
        """
        now = self.clock.seconds()
        records = [self._failures.get(_key("address", address), now)]
        if username is not None:
            pair_key = _key("pair", username, address)
            pair = self._failures.get(pair_key, now)
            records.append(pair)
            # The username-wide brake: only for an address that has failed
            # for this username and never logged into it.
            if pair is not None and self._trusted.get(pair_key, now) is None:
                records.append(self._failures.get(_key("user", username), now))
        return max([0.0] + [r.blocked_until - now for r in records if r is not None])

    def failed(self, username: str | None, address: str) -> None:
        now = self.clock.seconds()
        keys = [_key("address", address)]
        if username is not None:
            keys += [_key("pair", username, address), _key("user", username)]
        for key in keys:
            record = self._failures.touch(key, now)
            record.count += 1
            over = record.count - self.free_attempts
            if over >= 0:
                record.blocked_until = now + min(self.ceiling, self.base * 2 ** min(over, 64))

    def succeeded(self, username: str, address: str) -> None:
        """
        A good login clears the username's failures (not the address's: a
        guesser with an account of their own must not reset their count),
        and the address is trusted for the username from now on.
        """
        pair = _key("pair", username, address)
        self._failures.pop(pair)
        self._failures.pop(_key("user", username))
        self._trusted.touch(pair, self.clock.seconds())


@define(eq=False)
class RegistrationThrottle:
    """
    At most C{limit} registrations (taken names and new accounts alike) per
    address in any C{window} seconds from the first of them; 0: no limit.
    """

    clock: IReactorTime
    limit: int = DEFAULT_REGISTRATIONS_PER_HOUR
    window: float = 3600.0
    max_entries: int = MAX_ENTRIES
    _attempts: _Table = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._attempts = _Table(self.window, self.max_entries)

    def __len__(self) -> int:
        return len(self._attempts)

    def retry_after(self, address: str) -> float:
        now = self.clock.seconds()
        record = self._attempts.get(_key("address", address), now)
        if not self.limit or record is None or record.count < self.limit:
            return 0.0
        return max(0.0, record.last + self.window - now)

    def attempted(self, address: str) -> None:
        if self.limit:
            self._attempts.touch(_key("address", address), self.clock.seconds(), move=False).count += 1
