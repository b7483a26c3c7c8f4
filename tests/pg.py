"""
PostgreSQL for the tests: each test process creates a database of its own
on the server at C{VENDEPASS_TEST_POSTGRES} (default: the local one, trust
authentication), gives each test a fresh schema in it, and drops the
database when it exits.

Without a reachable server the PostgreSQL tests are skipped, unless
C{VENDEPASS_REQUIRE_POSTGRES} is set (CI sets it): then they fail.
"""

from __future__ import annotations

import atexit
import os
import secrets
from typing import Any
from urllib.parse import quote

from twisted.trial.unittest import SkipTest

ADMIN_URL = os.environ.get("VENDEPASS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

_database: str | None = None
_unavailable: str | None = None


def _base(database: str) -> str:
    head, _, _ = ADMIN_URL.rpartition("/")
    return f"{head}/{database}"


def _admin() -> Any:
    import psycopg

    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


def database() -> str:
    """
    The URL of this process's test database, created on first use.
    """
    global _database, _unavailable
    if _database is None:
        if _unavailable is None:
            try:
                name = f"vendepass_test_{os.getpid()}_{secrets.token_hex(3)}"
                with _admin() as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                _database = name
                atexit.register(_drop, name)
            except Exception as e:  # no driver, no server: say why
                _unavailable = f"PostgreSQL is not available at {ADMIN_URL}: {e}"
        if _unavailable is not None:
            if os.environ.get("VENDEPASS_REQUIRE_POSTGRES"):
                raise RuntimeError(_unavailable)
            raise SkipTest(_unavailable)
    assert _database is not None
    return _base(_database)


def _drop(name: str) -> None:
    try:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:
        pass


def fresh_url(case: Any) -> str:
    """
    A URL whose connections work in a new, empty schema of the test
    database, dropped when C{case} ends.
    """
    import psycopg

    url = database()
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")

    case.addCleanup(drop)
    return f"{url}?options={quote(f'-csearch_path={schema}')}"


def count_round_trips(case: Any) -> list[str]:
    """
    Have every connection the PostgreSQL store makes from now on (in test
    C{case}) count its round trips: each C{execute} or C{executemany} of its
    cursors (psycopg sends an C{executemany} as one pipeline) appends its
    statement to the list returned.
    """
    import psycopg

    from vendepass.store import postgres

    calls: list[str] = []

    class CountingCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
            calls.append(str(query))
            return super().execute(query, params, **kwargs)

        def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:  # type: ignore[override]
            calls.append(str(query))
            super().executemany(query, params_seq, **kwargs)

    real = postgres.connect

    def connect(url: str) -> psycopg.Connection[Any]:
        conn = real(url)
        conn.cursor_factory = CountingCursor
        return conn

    case.patch(postgres, "connect", connect)
    return calls
