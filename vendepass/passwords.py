"""
Password hashing: salted scrypt from the standard library, compared in
constant time. Hashing is slow on purpose, so the service runs it off the
reactor thread.

Stored form: C{scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from attrs import frozen

_KEY_BYTES = 32


@frozen
class ScryptHasher:
    """
    @ivar n: the scrypt CPU/memory cost (a power of two). The default, 2**14
        with r=8, uses 16 MiB and takes tens of milliseconds.
    """

    n: int = 2**14
    r: int = 8
    p: int = 1

    def hash(self, password: str) -> str:
        salt = secrets.token_bytes(16)
        key = self._derive(password, salt, self.n, self.r, self.p)
        return "$".join(
            [
                "scrypt",
                str(self.n),
                str(self.r),
                str(self.p),
                base64.b64encode(salt).decode("ascii"),
                base64.b64encode(key).decode("ascii"),
            ]
        )

    def verify(self, password: str, stored: str | None) -> bool:
        """
        Whether C{password} matches C{stored}. With C{stored} None (no such
        user) a hash is still computed, so the answer takes as long either way.
        """
        if stored is None:
            self._derive(password, b"\0" * 16, self.n, self.r, self.p)
            return False
        try:
            scheme, n, r, p, salt, key = stored.split("$")
            if scheme != "scrypt":
                return False
            expected = base64.b64decode(key)
            actual = self._derive(password, base64.b64decode(salt), int(n), int(r), int(p))
        except ValueError:
            return False
        return hmac.compare_digest(expected, actual)

    @staticmethod
    def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        return hashlib.scrypt(
            password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=_KEY_BYTES
        )
