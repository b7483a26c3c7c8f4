"""
End to end: the installed C{twistd vendepass} as a subprocess on a loopback
port, a purchase over a real socket, SIGKILL, restart, and the ticket is
still there.

These tests use real processes and sockets, so they wait with deadlines
(never fixed sleeps).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

DEADLINE = 60.0
# Server options for load tests whose few customers buy flat out: no purchase caps.
UNCAPPED = ("--max-seats-per-flight", "0", "--max-purchases-per-minute", "0")


def twistd() -> list[str]:
    """
    The installed C{twistd} beside this Python, or the same entry point run by it.
    """
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ServerProcess:
    """
    A C{twistd -n vendepass} subprocess listening on a free loopback port.
    """

    def __init__(self, directory: Path, *args: str, listen: str = "tcp:0:interface=127.0.0.1") -> None:
        self.directory = directory
        self.process = subprocess.Popen(
            [
                *twistd(),
                "-n",
                "--logfile=-",
                "--pidfile=",
                "vendepass",
                "--listen",
                listen,
                "--db",
                str(directory / "vendepass.sqlite3"),
                *args,
            ],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_for_port()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if line is None:
                break
            match = re.search(r"VendePassFactory(?: \((?:TLS|PROXY)\))? starting on (\d+)", line)
            if match:
                return int(match.group(1))
        self.kill()
        raise AssertionError("the server did not start listening:\n" + "".join(self.output))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=DEADLINE)
        if self.process.stdout is not None:
            self.process.stdout.close()


class Connection:
    """
    A blocking newline-delimited JSON connection, as any customer program could write it.
    """

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.file = self.socket.makefile("rwb")
        self.welcome = self.read()
        self.next_id = 0

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise AssertionError("the server closed the connection")
        result: dict[str, Any] = json.loads(line)
        return result

    def call(self, opcode: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        self.file.write(json.dumps({"opcode": opcode, "id": self.next_id, "data": data or {}}).encode() + b"\n")
        self.file.flush()
        while True:
            message = self.read()
            if "event" not in message:
                break
        if message["id"] != self.next_id or not message["ok"]:
            raise AssertionError(f"unexpected reply: {message}")
        data = message["data"]
        assert isinstance(data, dict)
        return data

    def every_ticket(self) -> list[dict[str, Any]]:
        """
        All the customer's tickets, newest first: every page of C{tickets}.
        """
        tickets: list[dict[str, Any]] = []
        data: dict[str, Any] = {"limit": 200}
        for _ in range(1000):
            page = self.call(4, data)
            tickets += page["tickets"]
            if page.get("next_cursor") is None:
                return tickets
            data = {"limit": 200, "cursor": page["next_cursor"]}
        raise AssertionError("more than 1,000 pages of tickets")

    def close(self) -> None:
        self.file.close()
        self.socket.close()


class ServerTestCase(TestCase):
    """
    Tests of the installed server, run as a process in a directory of its own.
    """

    def setUp(self) -> None:
        try:
            import twisted.plugins.vendepass_plugin  # noqa: F401
        except ImportError:
            raise SkipTest("vendepass is not installed (pip install .)")
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)

    def start(self, *args: str, **kwargs: str) -> ServerProcess:
        server = ServerProcess(self.directory, *args, **kwargs)
        self.addCleanup(server.kill)
        return server


class EndToEndTests(ServerTestCase):

    def connect(self, server: ServerProcess) -> Connection:
        connection = Connection(server.port)
        self.addCleanup(connection.close)
        return connection

    def test_purchase_survives_sigkill(self) -> None:
        """
        A ticket acknowledged over a real socket is there after the server is
        killed with SIGKILL and restarted on the same database.
        """
        server = self.start()
        customer = self.connect(server)
        self.assertEqual(customer.welcome["event"], "welcome")
        self.assertEqual(customer.welcome["data"]["protocol"], 1)
        customer.call(10, {"username": "e2e_buyer", "password": "correct horse"})
        customer.call(1, {"username": "e2e_buyer", "password": "correct horse"})
        network = customer.call(2)
        self.assertEqual(len(network["airports"]), 10)
        route = network["routes"][0]
        itineraries = customer.call(2, {"origin": route["origin"], "destination": route["destination"]})
        itinerary = itineraries["itineraries"][0]
        flights = [leg["flight"] for leg in itinerary["legs"]]
        ticket = customer.call(3, {"flights": flights})["ticket"]
        self.assertEqual(ticket["status"], "active")

        server.kill()
        self.assertEqual(server.process.returncode, -signal.SIGKILL)

        restarted = self.start()
        again = self.connect(restarted)
        again.call(1, {"username": "e2e_buyer", "password": "correct horse"})
        tickets = again.call(4)["tickets"]
        self.assertEqual(tickets, [ticket])
        seatmap = again.call(8, {"flight": flights[0]})
        sold = [s for s in seatmap["seats"] if s["status"] == "sold"]
        self.assertEqual(sold, [{"seat": ticket["legs"][0]["seat"], "status": "sold", "mine": True}])

    def test_demo_customer_and_options(self) -> None:
        """
        The bundled demo customers can log in; --hold-seconds reaches the welcome.
        """
        server = self.start("--hold-seconds", "42")
        customer = self.connect(server)
        self.assertEqual(customer.welcome["data"]["hold_seconds"], 42)
        from vendepass.fixtures import BUNDLED, load

        demo = load(BUNDLED).customers[0]
        self.assertEqual(customer.call(1, {"username": demo.username, "password": demo.password}), {"username": demo.username})

    def test_bad_fixtures_is_a_clear_error(self) -> None:
        """
        An invalid fixtures file stops the server at once with a message
        naming the problem, and leaves no database behind.
        """
        bad = self.directory / "bad.json"
        bad.write_text(json.dumps({"format": 1, "airline": {"code": "VP", "name": "X", "currency": "BRL"},
                                   "airports": [], "aircraft": [], "timetable": []}))
        result = subprocess.run(
            [*twistd(), "-n", "--logfile=-", "--pidfile=", "vendepass",
             "--db", str(self.directory / "new.sqlite3"), "--fixtures", str(bad)],
            cwd=self.directory, capture_output=True, timeout=DEADLINE,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"no airports", result.stdout + result.stderr)
        self.assertNotIn(b"Traceback", result.stdout + result.stderr)
        self.assertFalse(os.path.exists(self.directory / "new.sqlite3"))

    def run_server(self, *args: str) -> tuple[int, str]:
        """
        Run the installed server until it exits (it must, at once): its exit
        code and all it printed.
        """
        result = subprocess.run(
            [*twistd(), "-n", "--logfile=-", "--pidfile=", "vendepass", *args],
            cwd=self.directory, capture_output=True, timeout=DEADLINE,
        )
        return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")

    def test_port_in_use_is_a_clear_error(self) -> None:
        """
        A port another program listens on stops the server with one line
        saying so, before it creates its database.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1]
        db = self.directory / "x.sqlite3"
        code, output = self.run_server("--listen", f"tcp:{number}:interface=127.0.0.1", "--db", str(db))
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(
            output.strip().splitlines(), [f"vendepass: cannot listen on 127.0.0.1:{number}: Address already in use"]
        )
        self.assertFalse(db.exists())

    def test_missing_certificate_is_a_clear_error(self) -> None:
        db = self.directory / "x.sqlite3"
        code, output = self.run_server(
            "--listen", "ssl:0:interface=127.0.0.1:privateKey=missing.pem", "--db", str(db)
        )
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        [line] = output.strip().splitlines()
        self.assertIn(f"cannot read {self.directory / 'missing.pem'}: No such file or directory", line)
        self.assertFalse(db.exists())

    def test_tls_listener(self) -> None:
        """
        --listen ssl:... serves the same protocol over TLS, with the given certificate.
        """
        import datetime
        import ssl

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        key_file = self.directory / "key.pem"
        cert_file = self.directory / "cert.pem"
        key_file.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        server = self.start(listen=f"ssl:0:interface=127.0.0.1:privateKey={key_file}:certKey={cert_file}")

        context = ssl.create_default_context(cafile=str(cert_file))
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            stream = tls.makefile("rwb")
            welcome = json.loads(stream.readline())
            self.assertEqual(welcome["event"], "welcome")
            stream.write(b'{"opcode": 0, "id": "tls"}\n')
            stream.flush()
            reply = json.loads(stream.readline())
            self.assertEqual((reply["id"], reply["ok"]), ("tls", True))
