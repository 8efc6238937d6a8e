"""Runner identities, and telling at once that a runner on this host has died.

A runner id is ``<host>:<boot>:<pid namespace>:<pid>:<random>``: the host name (sanitised, at most 63
characters), the first 12 hex digits of the kernel's boot id (``/proc/sys/kernel/random/boot_id``: differs
between machines and between boots of one machine, where the root pid-namespace inode and the host name may
not), the pid namespace inode, the pid and 8 random hex digits; at most ~120 characters. Another process of
the same boot and pid namespace can check whether that pid still runs: when it does not (a SIGKILLed gunicorn
worker, a crashed api), the session can be taken over at once instead of after its lease lapses. Any doubt
(another host or boot, another pid namespace, an unreadable boot id or namespace, a pid that exists) means
"maybe alive": the caller then waits for the lease, which is always safe. The store's claim stays the
arbiter of who runs a session.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from functools import cache
from typing import NamedTuple

_HOST_CHARS = re.compile(r"[^A-Za-z0-9.-]")
_HOST_MAX = 63


class RunnerIdentity(NamedTuple):
    """The parts of a runner id (see the module docstring)."""

    host: str
    boot: str  # 12 hex digits of the boot id, "" when unknown
    namespace: str  # pid-namespace inode digits, "" when unknown
    pid: int


@cache
def _pid_namespace() -> str:
    """The inode of this process's pid namespace ("" when unknown, e.g. not Linux)."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return "".join(ch for ch in link if ch.isdigit())


@cache
def _boot_id() -> str:
    """12 hex digits of this boot's id ("" when unknown)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return ""
    return "".join(ch for ch in text.lower() if ch in "0123456789abcdef")[:12]


def _host() -> str:
    """The host name with anything but letters, digits, dots and dashes replaced, at most 63 chars."""
    return _HOST_CHARS.sub("-", socket.gethostname())[:_HOST_MAX] or "host"


def new_runner_id() -> str:
    """A fresh id for this process's runners: host, boot, pid namespace, pid and a random suffix."""
    return f"{_host()}:{_boot_id()}:{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def parse_runner_id(runner_id: str | None) -> RunnerIdentity | None:
    """The parts of ``runner_id``; None when it is not an id made by ``new_runner_id``."""
    if not runner_id:
        return None
    parts = runner_id.split(":")
    if len(parts) != 5 or not parts[3].isdigit():
        return None
    return RunnerIdentity(parts[0], parts[1], parts[2], int(parts[3]))


def owner_is_dead(runner_id: str | None) -> bool:
    """True only when ``runner_id`` names a process of this host, boot and pid namespace that no longer
    runs (gone, or a zombie). False for this process, for other hosts, boots or namespaces, and when
    unsure (an id of another shape, an unknown boot id or namespace)."""
    who = parse_runner_id(runner_id)
    if who is None:
        return False
    here = RunnerIdentity(_host(), _boot_id(), _pid_namespace(), os.getpid())
    if not who.boot or not who.namespace or (who.host, who.boot, who.namespace) != here[:3]:
        return False
    if who.pid == here.pid or who.pid <= 1:
        return False
    return not _pid_alive(who.pid)


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
