"""
HAProxy in front of two servers: Debian's C{haproxy}, run in the foreground
with the project's C{deploy/haproxy.cfg} (its addresses given through the
environment variables it reads), balances customers over two installed
C{twistd vendepass} processes sharing one PostgreSQL schema; when one server
dies, its customers are disconnected, its health checks take it out, and
new customers land on the other. HAProxy sends the PROXY protocol and the
servers listen with C{--listen haproxy:tcp:...}, so they know each
customer's address: failed logins from one customer do not throttle the
others.

Skipped when haproxy is not installed (C{apt-get install haproxy}).
"""

from __future__ import annotations

import csv
import io
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.threads import deferToThread
from twisted.python import log
from twisted.trial.unittest import SkipTest

from tests.test_end_to_end import ServerProcess
from tests.test_multiserver import (
    DEADLINE,
    OP_BUY,
    OP_LOGIN,
    OP_TICKETS,
    PASSWORD,
    Customer,
    MultiServerTestCase,
    add_users,
    connect,
    direct_flights,
    gather,
    run,
    sleep,
    wait_for,
)

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
# The servers are told apart by the hold time their welcome announces.
HOLD_SECONDS = {1: 301, 2: 302}


# What HAProxy's health checks send first with send-proxy-v2 and
# check-send-proxy: a PROXY protocol v2 header with the LOCAL command.
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def haproxy() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if found is None:
        raise SkipTest("haproxy is not installed (Debian: apt-get install haproxy)")
    return found


def free_port() -> int:
    """
    A loopback port free right now (HAProxy binds it a moment later).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ProxiedServerProcess(ServerProcess):
    """
    A server listening with Twisted's PROXY-protocol wrapper, as behind
    HAProxy in production: C{--listen haproxy:tcp:0:interface=127.0.0.1}.
    """

    def __init__(self, directory: Path, *args: str, listen: str = "haproxy:tcp:0:interface=127.0.0.1") -> None:
        super().__init__(directory, *args, listen=listen)


class HAProxyProcess:
    """
    C{haproxy -f deploy/haproxy.cfg -db} in the foreground, its addresses set
    through the environment, its output kept.
    """

    def __init__(self, servers: list[ServerProcess]) -> None:
        self.port = free_port()
        self.stats = free_port()
        env = {
            **os.environ,
            "VENDEPASS_LISTEN": f"127.0.0.1:{self.port}",
            "VENDEPASS_STATS": f"127.0.0.1:{self.stats}",
            "VENDEPASS_MAXCONN": "1000",
            **{f"VENDEPASS_SERVER_{i}": f"127.0.0.1:{s.port}" for i, s in enumerate(servers, 1)},
        }
        self.process = subprocess.Popen(
            [haproxy(), "-f", str(CONFIG), "-db"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.output.append(raw.decode("utf-8", "replace"))
        self.output.append("(haproxy exited)\n")

    def status(self) -> dict[str, str]:
        """
        The status (UP, DOWN, ...) of each server of the vendepass backend,
        from the stats page as CSV. This blocks (briefly).
        """
        if self.process.poll() is not None:
            raise AssertionError("haproxy exited:\n" + "".join(self.output))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.stats}/;csv", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "vendepass"}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=DEADLINE)
        if self.process.stdout is not None:
            self.process.stdout.close()


class HAProxyTests(MultiServerTestCase):

    timeout = 90

    def setUp(self) -> None:
        haproxy()
        super().setUp()

    # Servers listen for HAProxy's PROXY protocol.
    server_process = ProxiedServerProcess

    async def status(self, proxy: HAProxyProcess) -> dict[str, str]:
        status: dict[str, str] = await deferToThread(proxy.status)
        return status

    async def until(self, proxy: HAProxyProcess, wanted: dict[str, str]) -> float:
        """
        Wait until HAProxy reports the servers in C{wanted} with that status;
        how long that took.
        """

        async def reached() -> bool:
            status = await self.status(proxy)
            return all(status.get(name, "").startswith(state) for name, state in wanted.items())

        try:
            return await wait_for(reached, DEADLINE, f"haproxy to see {wanted}", every=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}; it sees {await self.status(proxy)}:\n" + "".join(proxy.output[-30:]))

    async def through(self, proxy: HAProxyProcess, username: str) -> tuple[int, Customer]:
        """
        A customer connected through HAProxy and logged in as C{username};
        which server it reached.
        """
        customer = await connect(proxy.port)
        self.customers.append(customer)
        [server] = [i for i, seconds in HOLD_SECONDS.items() if seconds == customer.greeting["hold_seconds"]]
        await customer.login(username)
        return server, customer

    def test_spread_and_failover(self) -> Deferred[None]:
        """
        Customers connecting through HAProxy are spread over both servers
        and log in and buy; one address gets at most 50 connections (the
        servers' own default limit, kept by HAProxy since the servers count
        connections before the PROXY header gives them the customer's
        address); after one server is killed, its customers are
        disconnected, HAProxy marks it down within a few seconds, and new
        customers (even right after the kill) reach the other one and buy.
        """
        return run(self._spread_and_failover())

    async def _spread_and_failover(self) -> None:
        began = time.monotonic()
        servers = await self.start_servers(
            2,
            # Behind HAProxy every connection is counted under HAProxy's address.
            "--max-connections-per-ip", "1000",
            each=lambda i: ["--hold-seconds", str(HOLD_SECONDS[i + 1])],
        )
        proxy = HAProxyProcess(servers)
        self.addCleanup(proxy.kill)
        await self.until(proxy, {"vendepass1": "UP", "vendepass2": "UP"})
        usernames = [f"proxied{i}" for i in range(60)]
        add_users(self.url, usernames)
        # Through HAProxy: a server listening for the PROXY protocol closes
        # a connection that does not start with a PROXY header.
        finder = await connect(proxy.port)
        [flight, *_] = [leg["flight"] for leg in await direct_flights(finder, "GRU", "GIG")]
        await finder.close()

        # 40 customers at once: spread over both servers, all can buy.
        first = await gather([run(self.through(proxy, u)) for u in usernames[:40]])
        spread = {i: sum(1 for server, _ in first if server == i) for i in HOLD_SECONDS}
        self.assertGreaterEqual(min(spread.values()), 10, spread)
        tickets = await gather([run(c.ok(OP_BUY, {"flights": [flight]})) for _, c in first])
        self.assertEqual(len({t["ticket"]["legs"][0]["seat"] for t in tickets}), 40)

        # HAProxy keeps the servers' per-address limit: 50 connections from one address, not 51.
        crowd = await gather([run(connect(proxy.port, source="127.0.3.1")) for _ in range(50)])
        self.customers.extend(crowd)
        try:
            extra = await connect(proxy.port, source="127.0.3.1")
        except (ConnectError, ConnectionDone, ConnectionLost):
            pass
        else:
            self.customers.append(extra)
            self.fail("a 51st connection from one address was let through")
        await gather([c.close() for c in crowd])

        # Server 2 dies: its customers' connections through HAProxy close.
        servers[1].kill()
        killed = time.monotonic()
        orphaned = [c for server, c in first if server == 2]
        await gather([c.closed for c in orphaned])
        # New customers right away: a connection HAProxy tries on the dead
        # server is refused, tried again, and redispatched to the live one.
        right_away = await gather([run(self.through(proxy, u)) for u in usernames[40:50]])
        right_away_in = time.monotonic() - killed
        down_in = await self.until(proxy, {"vendepass1": "UP", "vendepass2": "DOWN"}) + right_away_in
        later = await gather([run(self.through(proxy, u)) for u in usernames[50:60]])
        self.assertEqual({server for server, _ in right_away + later}, {1})
        more = await gather([run(c.ok(OP_BUY, {"flights": [flight]})) for _, c in right_away + later])
        self.assertEqual(len(more), 20)

        # The customers of the dead server find their tickets through the live one.
        again = await gather([run(self.through(proxy, c.username or "")) for c in orphaned[:10]])
        for (server, customer), gone in zip(again, orphaned):
            self.assertEqual(server, 1)
            listed = (await customer.ok(OP_TICKETS))["tickets"]
            [bought] = [t["ticket"] for (_, c), t in zip(first, tickets) if c is gone]
            self.assertEqual(listed, [bought])
        report = await self.assert_verified()
        self.assertEqual(report["sold"], 60)

        log.msg(
            f"haproxy: spread {spread}; after the kill, 10 new customers served in {right_away_in:.2f} s,"
            f" server marked DOWN {down_in:.2f} s after it; verify {report};"
            f" whole test {time.monotonic() - began:.1f} s"
        )

    def test_a_server_that_does_not_welcome_is_down(self) -> Deferred[None]:
        """
        The health check wants the welcome line, not just a connection: a
        "server" whose port accepts connections (the kernel completes them)
        but never answers, like a blocked process, is marked down, and every
        customer goes to the live server.
        """
        return run(self._no_welcome())

    async def _no_welcome(self) -> None:
        [server] = await self.start_servers(1, "--hold-seconds", str(HOLD_SECONDS[1]))
        with socket.socket() as mute:
            mute.bind(("127.0.0.1", 0))
            mute.listen(64)
            proxy = HAProxyProcess([server, MuteServer(mute.getsockname()[1])])  # type: ignore[list-item]
            self.addCleanup(proxy.kill)
            down_in = await self.until(proxy, {"vendepass1": "UP", "vendepass2": "DOWN"})
            usernames = [f"careful{i}" for i in range(10)]
            add_users(self.url, usernames)
            reached = await gather([run(self.through(proxy, u)) for u in usernames])
            self.assertEqual({server for server, _ in reached}, {1})
        log.msg(f"haproxy: a server that does not welcome is DOWN after {down_in:.2f} s")


    def test_throttling_is_per_customer_address(self) -> Deferred[None]:
        """
        Through HAProxy, failed logins from one customer address throttle
        that address (even for another account's right password), and not
        a customer at another address on the same server: the server reads
        each customer's address from HAProxy's PROXY header, and logs it.
        """
        return run(self._throttling())

    async def _throttling(self) -> None:
        began = time.monotonic()
        [server] = await self.start_servers(1)
        # Both of HAProxy's servers are this one: every connection lands on
        # it, and its login throttle (in its memory) sees them all.
        proxy = HAProxyProcess([server, server])
        self.addCleanup(proxy.kill)
        await self.until(proxy, {"vendepass1": "UP", "vendepass2": "UP"})
        add_users(self.url, ["victim", "bystander"])

        async def login(customer: Customer, username: str, password: str = PASSWORD) -> dict[str, Any]:
            reply = await customer.request(OP_LOGIN, {"username": username, "password": password})
            return cast(dict[str, Any], reply)

        guesser = await connect(proxy.port, source="127.0.1.5")
        self.customers.append(guesser)
        # Five failures (each for another username: the address is what
        # they share), then a first wait of one second for the address.
        for i in range(5):
            reply = await login(guesser, f"guess{i}", "wrong password")
            self.assertEqual(reply["error"]["code"], "bad_credentials", reply)
        reply = await login(guesser, "victim")
        self.assertEqual((reply["error"]["code"], reply["error"]["retry_after"]), ("rate_limited", 1), reply)
        # Once more after the wait: two seconds now, a margin for what follows.
        await sleep(1.05)
        reply = await login(guesser, "guess5", "wrong password")
        self.assertEqual(reply["error"]["code"], "bad_credentials", reply)
        throttled_at = time.monotonic()

        # Another customer address, through the same HAProxy to the same server.
        bystander = await connect(proxy.port, source="127.0.1.6")
        self.customers.append(bystander)
        started = time.monotonic()
        reply = await login(bystander, "bystander")
        self.assertTrue(reply["ok"], reply)
        bystander_in = time.monotonic() - started
        # The failing address is still throttled, for any account, from any
        # of its connections.
        again = await connect(proxy.port, source="127.0.1.5")
        self.customers.append(again)
        reply = await login(again, "victim")
        self.assertEqual(reply["error"]["code"], "rate_limited", reply)
        self.assertLess(time.monotonic() - throttled_at, 2, "too slow for the 2 s throttle window")
        # The victim's account itself is not throttled, from elsewhere.
        reply = await login(bystander, "victim")
        self.assertTrue(reply["ok"], reply)

        # The server logged the customer's address, not HAProxy's.
        failed = [line for line in server.output if "failed login for guess" in line]
        self.assertEqual(len(failed), 6, "".join(server.output[-20:]))
        self.assertTrue(all(line.rstrip().endswith("from 127.0.1.5") for line in failed), failed)
        log.msg(
            f"haproxy: a login from another address {bystander_in * 1000:.1f} ms after 6 failures;"
            f" whole test {time.monotonic() - began:.1f} s"
        )

    def test_health_checks_send_the_proxy_header(self) -> Deferred[None]:
        """
        HAProxy's health checks start with a PROXY header (v2, LOCAL), like
        every connection to a server: a "server" that welcomes only
        connections starting with one stays up after several checks.
        """
        return run(self._checks_send_the_header())

    async def _checks_send_the_header(self) -> None:
        backend = HeaderFirstServer()
        self.addCleanup(backend.close)
        proxy = HAProxyProcess([backend, backend])  # type: ignore[list-item]
        self.addCleanup(proxy.kill)

        async def checked() -> bool:
            return len(backend.received) >= 6

        await wait_for(checked, DEADLINE, "six health checks")
        status = await self.status(proxy)
        self.assertEqual((status.get("vendepass1"), status.get("vendepass2")), ("UP", "UP"), status)
        self.assertEqual(set(backend.received), {PROXY_V2_LOCAL})


class HeaderFirstServer:
    """
    A "server" that sends the welcome line only once a connection has sent a
    PROXY protocol v2 header (and keeps what each connection sent first).
    """

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port: int = self.socket.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                first = b""
                try:
                    while len(first) < len(PROXY_V2_LOCAL):
                        chunk = connection.recv(len(PROXY_V2_LOCAL) - len(first))
                        if not chunk:
                            break
                        first += chunk
                    self.received.append(first)
                    if first.startswith(PROXY_V2_LOCAL[:12]):
                        connection.sendall(b'{"event":"welcome","data":{}}\n')
                        connection.recv(1)
                except OSError:
                    self.received.append(first)

    def close(self) -> None:
        self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()
        self._thread.join(DEADLINE)


class MuteServer:
    """
    Where HAProxy is told a server listens: a socket that never accepts.
    """

    def __init__(self, port: int) -> None:
        self.port = port
