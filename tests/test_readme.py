"""
README.md's client examples stay true: every C{vendepass-client} command of
its code blocks, run in order with the installed C{vendepass-client} against
a fresh installed C{twistd vendepass} (the bundled airline, a new SQLite
database, a loopback port), exits 0, and no search finds nothing.

The interactive example (no command) runs with its standard input closed and
no terminal: it must end by itself, successfully.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.test_end_to_end import DEADLINE, ServerProcess
from vendepass.client import views
from vendepass.client.i18n import LANGUAGES, Texts

README = Path(__file__).resolve().parent.parent / "README.md"
PROGRAM = "vendepass-client"
ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=.*")


def code_blocks(text: str) -> list[str]:
    """
    The contents of the fenced code blocks of a Markdown text.
    """
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def client_examples(text: str) -> list[tuple[dict[str, str], list[str]]]:
    """
    Each command line of C{text}'s code blocks that runs C{vendepass-client}
    (maybe after C{NAME=value} assignments), as (environment, arguments).
    """
    examples = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            environment: dict[str, str] = {}
            while words and ASSIGNMENT.fullmatch(words[0]):
                name, value = words.pop(0).split("=", 1)
                environment[name] = value
            if words and Path(words[0]).name == PROGRAM:
                examples.append((environment, words[1:]))
    return examples


def installed_client() -> str:
    script = Path(sys.executable).parent / PROGRAM
    if not script.exists():
        raise AssertionError(f"{script} is not installed: pip install . first")
    return str(script)


class ExtractionTests(TestCase):
    def test_examples(self) -> None:
        """
        The extractor finds commands after assignments and ignores comments
        and other programs (a C{docker run ... vendepass-client} is Docker's).
        """
        text = (
            "```sh\n"
            "VENDEPASS_PASSWORD=x .venv/bin/vendepass-client --user maria tickets  # comment\n"
            "docker run -it --rm vendepass vendepass-client --connect tcp:host=localhost:port=1\n"
            ".venv/bin/vendepass-client\n"
            "```\n"
            "`vendepass-client routes` in prose is no example.\n"
        )
        self.assertEqual(
            client_examples(text),
            [({"VENDEPASS_PASSWORD": "x"}, ["--user", "maria", "tickets"]), ({}, [])],
        )

    def test_readme_has_examples(self) -> None:
        examples = client_examples(README.read_text(encoding="utf-8"))
        self.assertGreaterEqual(len(examples), 5, examples)
        self.assertIn([], [argv for _, argv in examples], "the interactive example")


class ReadmeExamplesTests(TestCase):
    def test_every_example_works(self) -> None:
        examples = client_examples(README.read_text(encoding="utf-8"))
        client = installed_client()
        server = ServerProcess(self._directory())
        self.addCleanup(server.kill)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VENDEPASS_", "LANG", "LC_"))}
        base["VENDEPASS_CONNECT"] = f"tcp:host=127.0.0.1:port={server.port}"
        nothing_found = {views.itineraries(Texts(language), []) for language in LANGUAGES}
        failures = []
        for environment, argv in examples:
            shown = shlex.join([*(f"{k}={v}" for k, v in environment.items()), PROGRAM, *argv])
            try:
                done = subprocess.run(
                    [client, *argv],
                    env={**base, **environment},
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=DEADLINE,
                    start_new_session=True,  # no terminal: a prompt reads the closed stdin
                )
            except subprocess.TimeoutExpired as e:
                failures.append(f"{shown}: still running after {DEADLINE} s\n{e.stdout!r}\n{e.stderr!r}")
                continue
            if done.returncode != 0:
                failures.append(f"{shown}: exit code {done.returncode}\n{done.stdout}{done.stderr}")
            elif "routes" in argv and done.stdout.strip() in nothing_found:
                failures.append(f"{shown}: {done.stdout.strip()}")
        self.assertEqual(failures, [], "\n\n".join(failures))

    def _directory(self) -> Path:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        return directory
