"""
The deployment files: the Dockerfile (a dependency layer of its own, a
health check that really asks the server) and docker-compose.yml (no
default database password). No Docker engine is needed: the files are
read, and the commands they run are run here against a real server.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.test_end_to_end import DEADLINE, ServerTestCase

ROOT = Path(__file__).resolve().parent.parent


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """
    A Dockerfile's instructions, in order, as (keyword, arguments): comment
    lines left out, continued lines joined.
    """
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip() and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole:
            keyword, _, arguments = whole.partition(" ")
            result.append((keyword.upper(), arguments.strip()))
    return result


def healthcheck_command(dockerfile: Path) -> list[str]:
    [arguments] = [a for k, a in instructions(dockerfile) if k == "HEALTHCHECK"]
    _, _, command = arguments.partition("CMD ")
    parsed: list[str] = json.loads(command)
    return parsed


class DockerfileTests(SynchronousTestCase):
    dockerfile = ROOT / "Dockerfile"

    def test_dependencies_in_their_own_layer(self) -> None:
        """
        Only setup.cfg and pyproject.toml are copied before the dependencies
        are installed; the code comes after, installed without dependencies.
        """
        steps = instructions(self.dockerfile)
        copies = [i for i, (k, _) in enumerate(steps) if k == "COPY"]
        self.assertEqual(steps[copies[0]], ("COPY", "setup.cfg pyproject.toml /tmp/vendepass/"))
        requirements = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "pip install -r" in a)
        whole = next(i for i in copies if steps[i][1].startswith(". "))
        self.assertLess(copies[0], requirements)
        self.assertLess(requirements, whole)
        [package] = [a for k, a in steps[whole:] if k == "RUN" and "pip install" in a]
        self.assertIn("pip install --no-deps /tmp/vendepass", package)
        self.assertIn("pip check", package)

    def test_dependency_list_is_complete(self) -> None:
        """
        What the dependency layer installs, read from setup.cfg by the
        Dockerfile's own command, is what the installed package requires.
        """
        [step] = [a for k, a in instructions(self.dockerfile) if k == "RUN" and "pip install -r" in a]
        match = re.search(r'python -c "([^"]*)" > /tmp/requirements\.txt', step)
        assert match is not None, step
        code = match.group(1)
        self.assertIn("'/tmp/vendepass/setup.cfg'", code)
        code = code.replace("'/tmp/vendepass/setup.cfg'", repr(str(ROOT / "setup.cfg")))
        listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        wanted = {r.replace(" ", "") for r in metadata.requires("vendepass") or [] if "extra ==" not in r}
        got = {line.replace(" ", "") for line in listed.splitlines() if line.strip() and not line.startswith("#")}
        self.assertEqual(got, wanted)


class HealthCheckTests(ServerTestCase):
    def run_check(self, port: int) -> subprocess.CompletedProcess[bytes]:
        program, *arguments = healthcheck_command(ROOT / "Dockerfile")
        self.assertEqual(program, "python")
        code = arguments[-1]
        self.assertEqual(code.count("65432"), 1)
        arguments[-1] = code.replace("65432", str(port))
        return subprocess.run([sys.executable, *arguments], capture_output=True, timeout=DEADLINE)

    def test_healthy_while_the_server_answers(self) -> None:
        """
        The image's HEALTHCHECK succeeds against a server as the image runs
        it (plain tcp:), and fails where nothing answers.
        """
        server = self.start()
        result = self.run_check(server.port)
        self.assertEqual(result.returncode, 0, result.stderr)
        nobody = socket.socket()
        nobody.bind(("127.0.0.1", 0))
        free = nobody.getsockname()[1]
        nobody.close()
        self.assertNotEqual(self.run_check(free).returncode, 0)


class ComposeTests(SynchronousTestCase):
    compose = ROOT / "docker-compose.yml"

    def test_no_default_password(self) -> None:
        """
        Every use of VENDEPASS_DB_PASSWORD makes compose refuse to start
        when it is unset or empty (${VAR:?message}), none falls back.
        """
        text = self.compose.read_text()
        uses = re.findall(r"\$\{VENDEPASS_DB_PASSWORD([^}]*)\}", text)
        self.assertGreaterEqual(len(uses), 2)
        for use in uses:
            self.assertRegex(use, r"^:\?\S")

    def test_valid_yaml(self) -> None:
        import yaml

        document = yaml.safe_load(self.compose.read_text())
        self.assertEqual(set(document["services"]), {"postgres", "vendepass1", "vendepass2", "haproxy"})
        self.assertIn(":?", document["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"])
        self.assertTrue(any(":?" in part for part in document["services"]["vendepass1"]["command"]))
