"""Runner identities, and telling at once that a runner on this host has died.

A runner id is ``<host>:<pid namespace>:<pid>:<random>``. Another process on the same host and in the same
pid namespace can check whether that pid still runs: when it does not (a SIGKILLed gunicorn worker, a
crashed api), the session can be taken over at once instead of after its lease lapses. Any doubt (another
host, another pid namespace, an unreadable namespace, a pid that exists) means "maybe alive": the caller
then waits for the lease, which is always safe. The store's claim stays the arbiter of who runs a session.
"""

from __future__ import annotations

import os
import socket
import uuid
from functools import cache


@cache
def _pid_namespace() -> str:
    """The inode of this process's pid namespace ("" when unknown, e.g. not Linux)."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return "".join(ch for ch in link if ch.isdigit())


def new_runner_id() -> str:
    """A fresh id for this process's runners: host, pid namespace, pid and a random suffix."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(runner_id: str | None) -> bool:
    """True only when ``runner_id`` names a process of this host and pid namespace that no longer runs
    (gone, or a zombie). False for this process, for other hosts or namespaces, and when unsure."""
    if not runner_id:
        return False
    parts = runner_id.rsplit(":", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    host, namespace, pid = parts[0], parts[1], int(parts[2])
    if not namespace or namespace != _pid_namespace() or host != socket.gethostname():
        return False
    if pid == os.getpid() or pid <= 1:
        return False
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")  # a zombie (killed, not reaped yet) runs nothing
