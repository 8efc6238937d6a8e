"""Finding the rows that make a batched operation fail, by retrying the rows apart.

A batched step (decode, sampler set-up, sampling) that raises may have failed because of one row (a value
or a state only that row has) or because of something shared (a lost device, memory). :func:`culprits`
bisects the batch with a caller-given probe that runs the operation on a subset of the rows without
touching the real batch, so that only the rows that fail on their own are failed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Probe = Callable[[list[int]], object]
"""Runs the failed operation on the rows at the given indices (in order); raises when it fails."""


def culprits(size: int, probe: Probe) -> list[int] | None:
    """Indices (ascending) of the rows that make ``probe`` fail, for a batch of ``size`` rows whose whole
    run already failed; ``None`` when the fault cannot be pinned on some rows only (every row fails, so it
    is not the rows' doing, or no subset fails, so it needs the whole batch).

    Bisection: a failing subset of one row is a culprit; a failing larger subset is split in halves. With
    ``c`` culprits it costs about ``2 * c * log2(size)`` probes, ``2 * size - 2`` at most.
    """
    if size < 2:
        return None
    mid = size // 2
    found = _bisect(list(range(mid)), probe) + _bisect(list(range(mid, size)), probe)
    if not found or len(found) == size:
        return None
    return found


def _bisect(indices: Sequence[int], probe: Probe) -> list[int]:
    try:
        probe(list(indices))
    except Exception:
        if len(indices) == 1:
            return list(indices)
        mid = len(indices) // 2
        return _bisect(indices[:mid], probe) + _bisect(indices[mid:], probe)
    return []
