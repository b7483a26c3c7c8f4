"""
Login throttling: repeated bad passwords for one username, or from one
address, slow down exponentially, up to a ceiling, so an attacker can
neither guess fast nor lock a real customer out for long.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.interfaces import IReactorTime


@define
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


@define(eq=False)
class LoginThrottle:
    """
    @ivar free_attempts: failures allowed before any wait.
    @ivar base: the first wait, in seconds; it doubles with each failure.
    @ivar ceiling: the longest wait ever imposed.
    @ivar forget_after: failures are forgotten after this long without one.
    """

    clock: IReactorTime
    free_attempts: int = 5
    base: float = 1.0
    ceiling: float = 300.0
    forget_after: float = 900.0
    _failures: dict[str, _Failures] = field(factory=dict)

    def _keys(self, username: str, address: str) -> list[str]:
        return [f"user:{username}", f"address:{address}"]

    def retry_after(self, username: str, address: str) -> float:
        """
        Seconds to wait before this login may be tried; 0 if it may be now.
        """
        now = self.clock.seconds()
        wait = 0.0
        for key in self._keys(username, address):
            record = self._failures.get(key)
            if record is None:
                continue
            if now - record.last > self.forget_after:
                del self._failures[key]
                continue
            wait = max(wait, record.blocked_until - now)
        return wait

    def failed(self, username: str, address: str) -> None:
        now = self.clock.seconds()
        for key in self._keys(username, address):
            record = self._failures.setdefault(key, _Failures())
            record.count += 1
            record.last = now
            over = record.count - self.free_attempts
            if over >= 0:
                record.blocked_until = now + min(self.ceiling, self.base * 2**over)
        if len(self._failures) > 100_000:
            self._forget_old(now)

    def succeeded(self, username: str, address: str) -> None:
        self._failures.pop(f"user:{username}", None)

    def _forget_old(self, now: float) -> None:
        for key in [k for k, r in self._failures.items() if now - r.last > self.forget_after]:
            del self._failures[key]
