"""
TLS: the server listens with --listen ssl:..., and the client connects with
tls:... and verifies the server's certificate against a CA made here.
"""

from __future__ import annotations

import datetime
import json
import socket
import time
from io import StringIO
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.trial.unittest import TestCase

from tests.common import ALICE, make_service
from tests.test_client_app import Screen
from vendepass.client import cli
from vendepass.client.protocol import CertificateRefused, connect
from vendepass.client.reconnecting import ReconnectingClient
from vendepass.protocol import CLOSE_GRACE_SECONDS, VendePassFactory, VendePassProtocol


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key, certificate


def make_server_certificate(
    directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key_file = directory / "server-key.pem"
    cert_file = directory / "server-cert.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_file.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    return key_file, cert_file


class CountingFactory(VendePassFactory):
    """
    The server's factory, counting the connections it accepts.
    """

    accepted = 0

    def buildProtocol(self, addr: IAddress | None) -> VendePassProtocol:
        self.accepted += 1
        return super().buildProtocol(addr)


class TLSTests(TestCase):
    async def asyncSetUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        self.trusted = base / "trusted"
        self.stranger = base / "stranger"
        ca_key, ca = make_ca(self.trusted, "VendePass Test CA")
        make_ca(self.stranger, "Some Other CA")
        key_file, cert_file = make_server_certificate(base, ca_key, ca)
        self.service = make_service()
        endpoint = serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={key_file}:certKey={cert_file}"
        )
        self.factory = CountingFactory(self.service, self.service.clock)
        self.port: IListeningPort = await endpoint.listen(self.factory)
        self.addCleanup(self.port.stopListening)
        self.number = self.port.getHost().port  # type: ignore[attr-defined]

    async def test_verified(self) -> None:
        await self.asyncSetUp()
        lost: Deferred[None] = Deferred()

        def event(name: str, data: dict[str, Any]) -> None:
            if name == "connection_lost":
                lost.callback(None)

        client = await connect(
            reactor,  # type: ignore[arg-type]
            f"tls:host=localhost:port={self.number}:trustRoots={self.trusted}",
            event,
        )
        self.assertEqual(await client.login(*ALICE), "alice")
        assert client.transport is not None
        client.transport.loseConnection()
        await lost

    async def test_untrusted_certificate_not_retried(self) -> None:
        """
        L{ReconnectingClient} retries a dropped connection, never a refused
        certificate: one connection, and L{CertificateRefused} names the issuer.
        """
        await self.asyncSetUp()
        client = ReconnectingClient(
            reactor,  # type: ignore[arg-type]
            f"tls:host=localhost:port={self.number}:trustRoots={self.stranger}",
        )
        with self.assertRaises(CertificateRefused) as caught:
            await client.ping()
        self.assertEqual(caught.exception.issuer, "CN=VendePass Test CA")
        self.assertEqual((self.factory.accepted, client.reconnections), (1, 0))

    async def test_untrusted_certificate_refused(self) -> None:
        """
        A server whose certificate is not signed by a trusted CA is refused
        at the first attempt (no retry can help), in plain words naming the
        certificate's issuer (exit code 3); with --json, as a JSON error.
        """
        await self.asyncSetUp()
        endpoint = f"tls:host=localhost:port={self.number}:trustRoots={self.stranger}"
        runs = [("en", [], "the server's certificate is not trusted (issuer CN=VendePass Test CA)."),
                ("pt_BR", [], "o certificado do servidor não é confiável (emissor CN=VendePass Test CA)."),
                ("en", ["--json"], "the server's certificate is not trusted (issuer CN=VendePass Test CA).")]
        for attempt, (lang, options, sentence) in enumerate(runs, 1):
            out, err = StringIO(), StringIO()
            code = await cli.main(
                reactor,  # type: ignore[arg-type]
                ["--connect", endpoint, "--lang", lang, *options, "routes"],
                out=out,
                err=err,
                environ={},
            )
            self.assertEqual(code, 3, err.getvalue())
            self.assertEqual(self.factory.accepted, attempt, "one connection per run: no retry")
            [line] = err.getvalue().splitlines()
            self.assertTrue(line.endswith(sentence), line)
            self.assertNotIn("SSL routines", line)
            if options:
                self.assertEqual(
                    json.loads(out.getvalue()),
                    {"ok": False, "error": {"code": "certificate_untrusted", "message": line}},
                )
            else:
                self.assertEqual(out.getvalue(), "")


    async def test_certificate_for_another_name_refused(self) -> None:
        """
        A trusted certificate issued to another name (here: localhost, asked
        for as 127.0.0.1) is refused at the first attempt too, saying so.
        """
        await self.asyncSetUp()
        endpoint = f"tls:host=127.0.0.1:port={self.number}:trustRoots={self.trusted}"
        runs = [("en", "the server's certificate is not valid for 127.0.0.1."),
                ("pt_BR", "o certificado do servidor não vale para 127.0.0.1.")]
        for attempt, (lang, sentence) in enumerate(runs, 1):
            err = StringIO()
            code = await cli.main(
                reactor,  # type: ignore[arg-type]
                ["--connect", endpoint, "--lang", lang, "routes"], out=StringIO(), err=err, environ={},
            )
            self.assertEqual(code, 3, err.getvalue())
            self.assertEqual(self.factory.accepted, attempt, "one connection per run: no retry")
            [line] = err.getvalue().splitlines()
            self.assertTrue(line.endswith(sentence), line)

    async def test_interactive_app_says_why(self) -> None:
        """
        The interactive app says in plain words why it refused the server.
        """
        await self.asyncSetUp()
        screen = Screen("untrusted", f"tls:host=localhost:port={self.number}:trustRoots={self.stranger}", False)
        self.assertEqual(await screen.end(), 3)
        said = screen.since()
        self.assertIn("the server's certificate is not trusted (issuer CN=VendePass Test CA).", said)
        self.assertEqual(self.factory.accepted, 1)


class Silent:
    """
    Raw loopback sockets that connect and send nothing, and what the server
    sends them until it closes them.
    """

    def __init__(self, port: int, count: int) -> None:
        self.received: dict[socket.socket, bytes] = {}
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            self.received[sock] = b""
        self.open = list(self.received)

    def _closed_by_peer(self, sock: socket.socket) -> bool:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:  # reset
            return True
        self.received[sock] += data
        return data == b""

    async def wait_until_closed(self, deadline: float, leaving: int = 0) -> float:
        """
        Read the sockets, letting the reactor run, until the server has
        closed them all but C{leaving} (EOF or reset) or C{deadline} seconds
        have passed; how long that took.
        """
        started = time.monotonic()
        for _ in range(int(deadline / 0.05) + 1):
            self.open = [s for s in self.open if not self._closed_by_peer(s)]
            if len(self.open) <= leaving or time.monotonic() - started > deadline:
                break
            await deferLater(reactor, 0.05)  # type: ignore[arg-type]
        return time.monotonic() - started

    def close(self) -> None:
        for sock in self.received:
            sock.close()


class SilentConnectionTests(TestCase):
    """
    Connections that connect and send nothing are closed by the server, on
    real loopback sockets: on a TLS listener by the handshake deadline, on
    a plain one by the idle timeout.
    """

    COUNT = 200

    async def listen(self, description: str, factory: VendePassFactory) -> Silent:
        port: IListeningPort = await serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)
        silent = Silent(port.getHost().port, self.COUNT)  # type: ignore[attr-defined]
        self.addCleanup(silent.close)
        return silent

    async def test_tls_without_handshake_closed(self) -> None:
        base = Path(self.mktemp()).resolve()
        ca_key, ca = make_ca(base, "VendePass Test CA")
        key_file, cert_file = make_server_certificate(base, ca_key, ca)
        # The real clock: the deadline is real time here.
        factory = VendePassFactory(
            make_service(), reactor, idle_timeout=300, max_connections_per_ip=1000, handshake_timeout=1.0  # type: ignore[arg-type]
        )
        silent = await self.listen(
            f"ssl:0:interface=127.0.0.1:backlog=512:privateKey={key_file}:certKey={cert_file}", factory
        )
        took = await silent.wait_until_closed(deadline=15.0)
        self.assertEqual(len(silent.open), 0, f"{len(silent.open)} of {self.COUNT} still open after {took:.1f} s")
        self.assertLess(took, 1.0 + 5.0)

    async def test_tls_refused_closed(self) -> None:
        """
        Connections over the per-address limit are refused; those that
        never finish their handshake are gone too, within the grace period.
        """
        base = Path(self.mktemp()).resolve()
        ca_key, ca = make_ca(base, "VendePass Test CA")
        key_file, cert_file = make_server_certificate(base, ca_key, ca)
        factory = VendePassFactory(
            make_service(), reactor, idle_timeout=300, max_connections_per_ip=10, handshake_timeout=None  # type: ignore[arg-type]
        )
        silent = await self.listen(
            f"ssl:0:interface=127.0.0.1:backlog=512:privateKey={key_file}:certKey={cert_file}", factory
        )
        took = await silent.wait_until_closed(deadline=CLOSE_GRACE_SECONDS + 5.0, leaving=10)
        # The 10 accepted ones wait for their handshake (no deadline here).
        self.assertEqual(len(silent.open), 10, f"after {took:.1f} s")

    async def test_tcp_idle_closed(self) -> None:
        """
        Plain TCP: the handshake deadline does not apply; the idle timeout
        does, each connection getting its welcome and its idle_timeout event
        before it is closed.
        """
        factory = VendePassFactory(
            make_service(), reactor, idle_timeout=1.0, max_connections_per_ip=1000, handshake_timeout=0.1  # type: ignore[arg-type]
        )
        silent = await self.listen("tcp:0:interface=127.0.0.1:backlog=512", factory)
        took = await silent.wait_until_closed(deadline=15.0)
        self.assertEqual(len(silent.open), 0, f"after {took:.1f} s")
        for received in silent.received.values():
            events = [json.loads(line)["event"] for line in received.splitlines()]
            self.assertEqual(events, ["welcome", "idle_timeout"])
