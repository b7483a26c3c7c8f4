"""
The scaling curve of docs/performance.md: run C{vendepass-bench buy} (with
its ceiling) at several numbers of concurrent customers against a running
server, keep every report as JSON, and draw purchases per second against
customers, next to what the bare Twisted ceiling does, as a PNG.

    python tools/scaling.py --connect tcp:127.0.0.1:65432 --customers 100,1000,5000 \\
        --json docs/performance-scaling.json --png docs/performance-scaling.png

Drawing needs matplotlib (C{pip install matplotlib}); C{--from-json} redraws a
chart from saved reports without running anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run(connect: str, customers: int, duration: float, extra: list[str]) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "vendepass.bench", "buy", "--connect", connect, "-c", str(customers),
        "--duration", str(duration), "--json", "-q", *extra,
    ]
    print("running:", " ".join(command[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"vendepass-bench failed (exit {done.returncode})")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def draw(reports: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    customers = [r["customers"] for r in reports]
    bought = [r["measure"]["per_second"] for r in reports]
    ceiling = [r["ceiling"]["requests_per_second"] if r.get("ceiling") else None for r in reports]
    p99 = [r["measure"]["latency"]["p99"] for r in reports]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    left.plot(customers, bought, "o-", color="tab:blue", label="VendePass: durable purchases/s")
    if all(c is not None for c in ceiling):
        left.plot(customers, ceiling, "s--", color="tab:gray", label="ceiling: Twisted JSON echo, requests/s")
        for x, y, c in zip(customers, bought, ceiling):
            left.annotate(f"{y:,.0f}/s\n{y / c:.2f} x ceiling", (x, y), textcoords="offset points", xytext=(0, 10),
                          ha="center", fontsize=8)
    left.set_xscale("log")
    left.set_xticks(customers, [f"{c:,}" for c in customers])
    left.set_xlabel("concurrent customers (one connection each)")
    left.set_ylabel("per second")
    left.set_ylim(bottom=0)
    left.set_title("buy, one-step, SQLite durable commits")
    left.legend(fontsize=8, loc="upper left")
    left.grid(True, alpha=0.3)
    right.plot(customers, p99, "o-", color="tab:red", label="VendePass p99")
    if all(r.get("ceiling") for r in reports):
        right.plot(customers, [r["ceiling"]["latency"]["p99"] for r in reports], "s--", color="tab:gray",
                   label="ceiling p99")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xticks(customers, [f"{c:,}" for c in customers])
    right.set_xlabel("concurrent customers")
    right.set_ylabel("latency p99, ms (closed loop)")
    right.set_title("latency")
    right.legend(fontsize=8, loc="upper left")
    right.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(png)
    print(f"wrote {png}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0] if __doc__ else None)
    parser.add_argument("--connect", default="tcp:127.0.0.1:65432")
    parser.add_argument("--customers", default="100,1000,5000", help="comma-separated (default 100,1000,5000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of buying per point (default 10)")
    parser.add_argument("--json", type=Path, help="write the reports here")
    parser.add_argument("--png", type=Path, help="draw the chart here")
    parser.add_argument("--from-json", type=Path, help="draw from saved reports instead of running")
    parser.add_argument("bench_args", nargs="*", help="more vendepass-bench buy options, after --")
    args = parser.parse_args(argv)
    if args.from_json:
        reports = json.loads(args.from_json.read_text())
    else:
        reports = [run(args.connect, int(c), args.duration, args.bench_args) for c in args.customers.split(",")]
        if args.json:
            args.json.write_text(json.dumps(reports, indent=1) + "\n")
    for report in reports:
        measure, ceiling = report["measure"], report.get("ceiling")
        ratio = f", {measure['per_second'] / ceiling['requests_per_second']:.3f} x ceiling" if ceiling else ""
        print(f"{report['customers']:>6,} customers: {measure['per_second']:>8,.1f} purchases/s, p99"
              f" {measure['latency']['p99']:.1f} ms{ratio}; checks {'passed' if report['ok'] else 'FAILED'}")
    if args.png:
        draw(reports, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
