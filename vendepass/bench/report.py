"""
What a benchmark run reports: frozen value objects, their JSON form
(C{--json}) and their text form.
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import frozen

from vendepass.bench.generator import Latency, Recorder
from vendepass.bench.procinfo import ProcessStatus

MAX_DETAILS = 20
W = 21  # width of the names column of the text report


@frozen
class OpFigures:
    count: int
    per_second: float
    latency: Latency


@frozen
class Phase:
    """
    One measured phase: C{operations} counts the scenario's unit (C{unit}:
    purchases, answers, requests), C{requests} every request sent, whose
    latencies C{latency} summarizes (by operation in C{by_op}).
    """

    unit: str
    concurrency: int
    seconds: float
    operations: int
    per_second: float
    requests: int
    requests_per_second: float
    latency: Latency
    by_op: dict[str, OpFigures]
    errors: dict[str, int]
    server_cpu_seconds: float | None
    generator_cpu_seconds: float

    @classmethod
    def of(
        cls,
        recorder: Recorder,
        *,
        unit: str,
        concurrency: int,
        seconds: float,
        operations: int,
        server_cpu_seconds: float | None,
        generator_cpu_seconds: float,
    ) -> Phase:
        seconds = max(seconds, 1e-9)
        every = [s for samples in recorder.samples.values() for s in samples]
        by_op = {
            op: OpFigures(len(samples), round(len(samples) / seconds, 1), Latency.of(samples))
            for op, samples in sorted(recorder.samples.items())
        }
        return cls(
            unit=unit,
            concurrency=concurrency,
            seconds=round(seconds, 3),
            operations=operations,
            per_second=round(operations / seconds, 1),
            requests=len(every),
            requests_per_second=round(len(every) / seconds, 1),
            latency=Latency.of(every),
            by_op=by_op,
            errors=dict(sorted(recorder.errors.items())),
            server_cpu_seconds=None if server_cpu_seconds is None else round(server_cpu_seconds, 2),
            generator_cpu_seconds=round(generator_cpu_seconds, 2),
        )


@frozen
class Ratios:
    """
    The scenario's figures over the ceiling's, at the same concurrency in the same run.
    """

    throughput: float  # scenario operations/s over ceiling requests/s
    p99: float  # scenario p99 over ceiling p99

    @classmethod
    def of(cls, measured: Phase, ceiling: Phase) -> Ratios:
        return cls(
            throughput=round(measured.per_second / max(ceiling.requests_per_second, 1e-9), 3),
            p99=round(measured.latency.p99 / max(ceiling.latency.p99, 1e-9), 3),
        )


@frozen
class CheckResult:
    name: str
    passed: bool
    summary: str
    details: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, summary: str, problems: list[str]) -> CheckResult:
        details = problems[:MAX_DETAILS]
        if len(problems) > MAX_DETAILS:
            details.append(f"... and {len(problems) - MAX_DETAILS} more")
        return cls(name, not problems, summary, tuple(details))


@frozen
class Report:
    scenario: str
    target: str
    customers: int
    connected: int
    logged_in: int | None
    setup_seconds: float | None
    connect_errors: dict[str, int]
    measure: Phase | None
    figures: dict[str, Any]
    server: ProcessStatus | None
    ceiling: Phase | None
    ratios: Ratios | None
    checks: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        result = attrs.asdict(self)
        if self.server is None:
            result["server"] = "unknown"
        result["ok"] = self.ok
        return result

    def render(self) -> str:
        lines = [f"vendepass-bench {self.scenario} -> {self.target}"]

        def row(name: str, text: str) -> None:
            lines.append(f"{name:<{W}} {text}")

        if self.scenario != "check":
            setup = f"; setup (connect{' + login' if self.logged_in is not None else ''}) {self.setup_seconds:.2f} s" if self.setup_seconds is not None else ""
            logged = f", {self.logged_in:,} logged in" if self.logged_in is not None else ""
            errors = f"; connect errors {_codes(self.connect_errors)}" if self.connect_errors else ""
            row("customers", f"{self.customers:,} requested, {self.connected:,} connected{logged}{setup}{errors}")
        if self.measure is not None:
            lines.extend(_phase(self.measure, "measured"))
        for name, value in self.figures.items():
            row(name, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
        if self.server is not None:
            s = self.server
            row("echo server" if self.scenario == "ceiling" else "server", f"pid {s.pid}: RSS {s.rss_kb:,} KB, peak RSS {s.peak_rss_kb:,} KB, {s.threads} threads"
                + (f", {s.processes} processes" if s.processes > 1 else ""))
        elif self.scenario != "ceiling":
            row("server", "unknown (no readable pid: --server-pid)")
        if self.ceiling is not None:
            lines.extend(_phase(self.ceiling, "ceiling"))
        if self.ratios is not None:
            row("ratios", f"throughput {self.ratios.throughput:.3f} x ceiling, p99 {self.ratios.p99:.3f} x ceiling")
        for check in self.checks:
            row("check", f"{'PASSED' if check.passed else 'FAILED'} {check.name}: {check.summary}")
            lines.extend(f"{'':<{W + 3}}{detail}" for detail in check.details)
        if self.checks:
            failed = sum(not c.passed for c in self.checks)
            row("result", "all checks passed" if not failed else f"{failed} check(s) FAILED")
        return "\n".join(lines) + "\n"


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in codes.items()) or "none"


def _ms(latency: Latency) -> str:
    return f"p50 {latency.p50:.2f}  p90 {latency.p90:.2f}  p99 {latency.p99:.2f}  max {latency.max:.2f} ms"


def _phase(phase: Phase, name: str) -> list[str]:
    cpu = [f"generator CPU {phase.generator_cpu_seconds:.1f} s ({100 * phase.generator_cpu_seconds / phase.seconds:.0f} %)"]
    if phase.server_cpu_seconds is not None:
        cpu.append(f"server CPU {phase.server_cpu_seconds:.1f} s ({100 * phase.server_cpu_seconds / phase.seconds:.0f} %)")
    lines = [
        f"{name:<{W}} {phase.operations:,} {phase.unit} in {phase.seconds:.2f} s with {phase.concurrency:,} customers:"
        f" {phase.per_second:,.1f} {phase.unit}/s ({phase.requests:,} requests, {phase.requests_per_second:,.1f}/s)",
        f"{'':<{W}} latency {_ms(phase.latency)}",
    ]
    if len(phase.by_op) > 1:
        lines.extend(f"{'':<{W + 3}}{op:<9}{f.count:>10,}  {f.per_second:>10,.1f}/s  {_ms(f.latency)}" for op, f in phase.by_op.items())
    lines.append(f"{'':<{W}} errors {_codes(phase.errors)}; {', '.join(cpu)}")
    return lines
