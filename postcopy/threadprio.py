"""Thread placement for the post-copy engine: background threads yield, demand threads stay put.

Two Linux scheduler facts the engine relies on (``kernel/sched/fair.c``,
``check_preempt_wakeup_fair``; ``sched(7)``):

* a thread of policy ``SCHED_IDLE`` is preempted at once when a normal thread
  wakes on its CPU, so the background push (source sender, destination
  receiver and placer) never delays a demand request, a demand reply or a
  vCPU -- QEMU's ``postcopy-preempt`` channel gets the same effect from a
  separate socket and thread; here the CPU is the contended resource (two
  CPUs, five busy threads);
* any thread may lower its own policy (no privilege needed), and
  ``sched_setscheduler``/``sched_setaffinity`` with pid 0 act on the calling
  thread only.

Pinning (``sched_setaffinity``) keeps a faulting vCPU and the thread that
resolves its fault on one CPU: a wake-up on another CPU costs ~50 us on this
host (``shared/reference/anchors.md``).
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any


def background(nice: int = 20) -> bool:
    """Lower the calling thread's priority: ``nice`` 1..19 is a nice value, 20 (the
    default) is ``SCHED_IDLE`` (nice 19 where that policy is refused), 0 leaves it.
    Returns True when the priority changed."""
    if nice <= 0:
        return False
    if nice < 20:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
            return True
        except OSError:
            return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)  # pid 0 with PRIO_PROCESS: this thread on Linux
    except OSError:
        return False
    return True


def realtime(priority: int = 1) -> bool:
    """Make the calling thread ``SCHED_FIFO`` at ``priority`` (``sched(7)``): it
    preempts every normal thread on its CPU the moment it wakes and runs until it
    blocks again. For the threads that only run while a vCPU waits for a page (the
    fault threads, the source's demand thread): they sleep between faults, so they
    cannot starve the CPU, and a fault no longer waits behind the background push's
    time slice. Needs ``CAP_SYS_NICE`` (or an ``RLIMIT_RTPRIO``); returns False, the
    thread unchanged, where it is refused."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (OSError, AttributeError):
        return False


def cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def pin(index: int) -> int:
    """Pin the calling thread to the ``index``-th allowed CPU (modulo their number);
    returns the CPU."""
    allowed = cpus()
    cpu = allowed[index % len(allowed)]
    os.sched_setaffinity(0, {cpu})
    return cpu


# -- short slices (EEVDF, Linux 6.12+) --------------------------------------------------------

_SYS_SCHED_SETATTR = 314  # x86-64
_SCHED_ATTR = struct.Struct("<IIQiIQQQ")  # SCHED_ATTR_SIZE_VER0 (48 bytes)
_libc: Any = None


def latency_sensitive(slice_ns: int = 100_000) -> bool:
    """Give the calling thread a short EEVDF slice (``sched_setattr`` with
    ``sched_runtime``; ``kernel/sched/syscalls.c``, "sched/eevdf: Allow shorter slices
    to wakeup-preempt", Linux 6.12): when it wakes it preempts a thread with the default
    slice on its CPU instead of waiting for that thread's slice to end. For the threads
    of a demand fault: the fault thread, the vCPUs, the source's demand thread.
    Returns False where the kernel refuses (older kernels: the thread is unchanged)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        attr = ctypes.create_string_buffer(
            _SCHED_ATTR.pack(
                _SCHED_ATTR.size,
                os.SCHED_OTHER,
                0,
                os.getpriority(os.PRIO_PROCESS, 0),
                0,
                slice_ns,
                0,
                0,
            )
        )
        return int(_libc.syscall(_SYS_SCHED_SETATTR, 0, attr, 0)) == 0
    except (OSError, AttributeError):
        return False
