"""CPU seconds used by process trees during a level (Linux ``/proc``): where the time goes.

On 2 shared cores every process of the stack competes with the model's step loop, so the CPU each one
burns per generated token is the first thing to look at when a ratio misses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return kids


def _own_cpu(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and all its live descendants."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _own_cpu(p)
        todo += _children(p)
    return total


class CpuMeter:
    """Snapshot the CPU of named process trees (and this process) before and after a level."""

    def __init__(self, roots: Mapping[str, int]) -> None:
        self._roots = dict(roots)
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        return {name: round(end[name] - self._start.get(name, 0.0), 3) for name in end}

    def _sample(self) -> dict[str, float]:
        if not Path("/proc/self/stat").exists():
            return {}
        sample = {name: tree_cpu(pid) for name, pid in self._roots.items()}
        # This process alone: the servers are its children, so its tree would count them twice.
        sample["bench process"] = _own_cpu(os.getpid())
        return sample
