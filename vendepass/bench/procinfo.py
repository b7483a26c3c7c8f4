"""
What the benchmark can read about a server process from C{/proc} (Linux):
its memory, its threads, its CPU time, and which process listens on a port.
Everything here returns C{None} rather than raising when it cannot read.
"""

from __future__ import annotations

import os
from pathlib import Path

from attrs import frozen

PROC = Path("/proc")
_LISTEN = "0A"


@frozen
class ProcessStatus:
    """
    One reading of C{/proc/<pid>/status} and C{/proc/<pid>/stat}, with the
    process's live descendants added in (a server's SQLite writer process
    is part of the server): C{processes} counts them all, C{threads} the
    server's own.
    """

    pid: int
    rss_kb: int
    peak_rss_kb: int
    threads: int
    cpu_seconds: float
    processes: int = 1


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def _read_one(pid: int) -> tuple[int, int, int, float]:
    fields = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    stat = (PROC / str(pid) / "stat").read_text()
    # After the command name (in parentheses, may hold spaces): state is
    # field 3, utime and stime are fields 14 and 15.
    after = stat[stat.rindex(")") + 2 :].split()
    ticks = int(after[11]) + int(after[12])
    return int(fields["VmRSS"][0]), int(fields["VmHWM"][0]), int(fields["Threads"][0]), ticks / os.sysconf("SC_CLK_TCK")


def read_status(pid: int | None) -> ProcessStatus | None:
    if pid is None:
        return None
    try:
        rss, peak, threads, cpu = _read_one(pid)
    except (OSError, KeyError, ValueError, IndexError):
        return None
    processes = 1
    pending = _children(pid)
    while pending:
        child = pending.pop()
        try:
            child_rss, child_peak, _, child_cpu = _read_one(child)
        except (OSError, KeyError, ValueError, IndexError):
            continue  # gone meanwhile
        rss, peak, cpu, processes = rss + child_rss, peak + child_peak, cpu + child_cpu, processes + 1
        pending += _children(child)
    return ProcessStatus(pid=pid, rss_kb=rss, peak_rss_kb=peak, threads=threads, cpu_seconds=cpu, processes=processes)


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == _LISTEN and int(parts[1].rpartition(":")[2], 16) == port:
                inodes.add(parts[9])
    return inodes


def find_listener(port: int) -> int | None:
    """
    The pid of a process (of ours: others' fds are unreadable) holding a
    socket that listens on TCP C{port}, found through C{/proc/net/tcp} and
    the C{socket:[inode]} links in C{/proc/*/fd}.
    """
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    return int(entry.name)
        except OSError:
            continue
    return None
