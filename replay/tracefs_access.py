"""Where tracefs is, whether this process may use it, and the instances left behind.

Privilege (measured here): the tracefs root is mode 0700 root:root, ``instances/`` 0750, the
control files (``buffer_size_kb``, ``trace_clock``, ``set_event_pid``, ``events/*/*/enable``)
0640 and ``trace_pipe_raw`` 0440. A session (`replay.tracefs_session`) creates an instance and
writes control files, so it needs root or CAP_DAC_OVERRIDE; a tracefs mounted with
``gid=GROUP`` only lets GROUP read (unless an administrator adds group write to those files).
Mounting tracefs needs CAP_SYS_ADMIN. `tracefs_status` says which of these is missing, with
the modes it found (Documentation/trace/ftrace.rst §"The File System", §"Instances").
Part of `replay.tracefs`, which re-exports every public name here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

__all__ = [
    "DEFAULT_EVENTS",
    "INSTANCE_PREFIX",
    "TRACEFS_PATHS",
    "TracefsError",
    "find_tracefs",
    "remove_stale_instances",
    "tracefs_status",
]

#: what a session traces unless told otherwise (those missing on a kernel are skipped)
DEFAULT_EVENTS: tuple[str, ...] = (
    "kvm:kvm_exit",
    "kvm:kvm_entry",
    "kvm:kvm_userspace_exit",
    "kvm:kvm_page_fault",
    "kvm:kvm_pio",
    "kvm:kvm_mmio",
)
#: where tracefs lives, in the order they are tried
TRACEFS_PATHS: tuple[str, ...] = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
INSTANCE_PREFIX = "fakekvm-"


class TracefsError(OSError):
    """A tracefs step failed; ``errno`` is the kernel's, the message says which file."""


def _mounts() -> list[tuple[str, str]]:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            rows = [line.split() for line in f]
    except OSError:
        return []
    return [(r[1].replace("\\040", " "), r[2]) for r in rows if len(r) >= 3]


def find_tracefs() -> str | None:
    """The tracefs directory: a tracefs mount (``/sys/kernel/tracing`` first), else
    ``tracing`` under a debugfs mount; None when neither is mounted. Found from
    ``/proc/self/mounts``, so a directory this process may not enter is still found (and
    `tracefs_status` says why it cannot be used)."""
    mounts = _mounts()
    trace = sorted((p for p, t in mounts if t == "tracefs"), key=lambda p: p != TRACEFS_PATHS[0])
    if trace:
        return trace[0]
    for p, t in mounts:
        if t == "debugfs":
            sub = os.path.join(p, "tracing")
            try:
                os.stat(sub)
            except PermissionError:
                return sub  # cannot look inside debugfs: assume its usual automount
            except OSError:
                continue
            return sub
    if not mounts:  # no /proc: try the usual places
        return next((p for p in TRACEFS_PATHS if os.path.isdir(p)), None)
    return None


def _mode(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {os.strerror(e.errno or 0)}"
    return f"{path} is mode {stat.S_IMODE(st.st_mode):04o} uid {st.st_uid} gid {st.st_gid}"


def tracefs_status(events: Sequence[str] = DEFAULT_EVENTS) -> tuple[bool, str]:
    """``(ok, why)`` for ``fakekvm doctor``: can this process run a `TracefsSession`?"""
    root = find_tracefs()
    if root is None:
        return False, (
            "tracefs is not mounted (neither /sys/kernel/tracing nor debugfs/tracing); "
            "mounting it needs CAP_SYS_ADMIN: mount -t tracefs nodev /sys/kernel/tracing"
        )
    inst = os.path.join(root, "instances")
    if not os.access(root, os.X_OK) or not os.access(inst, os.W_OK | os.X_OK):
        return False, (
            f"no access to {inst}: {_mode(root)}, {_mode(inst)}; creating an instance and "
            "writing its control files (mode 0640 root:root) needs root or CAP_DAC_OVERRIDE "
            "(a tracefs gid= group may only read them)"
        )
    have = [e for e in events if os.path.isdir(os.path.join(root, "events", *e.split(":", 1)))]
    if not os.path.isdir(os.path.join(root, "events", "kvm")):
        return False, f"{root}/events/kvm missing: the kvm module is not loaded"
    missing = sorted(set(events) - set(have))
    why = f"tracefs at {root}, instances writable; {len(have)}/{len(events)} events available"
    if missing:
        why += f" (missing: {', '.join(missing)})"
    return bool(have), why


def remove_stale_instances(root: str | None = None) -> list[str]:
    """Remove ``instances/fakekvm-PID`` left by processes that no longer exist; return them."""
    root = root or find_tracefs()
    if root is None:
        return []
    gone = []
    for name in os.listdir(os.path.join(root, "instances")):
        if not name.startswith(INSTANCE_PREFIX):
            continue
        pid = name[len(INSTANCE_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.rmdir(os.path.join(root, "instances", name))
                gone.append(name)
            except OSError:
                pass
    return gone
