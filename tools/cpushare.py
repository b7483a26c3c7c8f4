"""
How many cores some processes use over a few seconds, and how busy the
whole machine is (Linux: /proc). For the benchmark notes in
docs/performance.md:

    python3 tools/cpushare.py 8 "logfile=/tmp/pg1.log" "postgres: " vendepass-bench

Each pattern is matched against the processes' command lines; the figure
is the sum of their user and system time over the interval.
"""

from __future__ import annotations

import os
import sys
import time


def _cpu_ticks(pattern: str) -> dict[str, int]:
    ticks = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if pattern in command:
            ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def _machine() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write(__doc__ or "")
        return 2
    seconds, patterns = float(argv[0]), argv[1:]
    before = {p: _cpu_ticks(p) for p in patterns}
    total0, idle0 = _machine()
    time.sleep(seconds)
    after = {p: _cpu_ticks(p) for p in patterns}
    total1, idle1 = _machine()
    hz = os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    busy = (total1 - total0) - (idle1 - idle0)
    print(f"machine busy {busy / max(total1 - total0, 1) * cores:.2f} of {cores} cores")
    for pattern in patterns:
        used = sum(t - before[pattern].get(pid, t) for pid, t in after[pattern].items())
        print(f"{pattern}: {used / hz / seconds:.2f} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
