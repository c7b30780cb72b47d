"""The logical records of a fakekvm trace (format described in ``docs/trace-format.md``).

A trace is a `Header` followed by two interleaved event streams:

* `Call`: one `Kernel` call (``ioctl``, ``read``, ``mmap``, ...) as the engine made it, with the
  bytes it passed in and the bytes the kernel wrote back, its return value and errno;
* `Fault`: one guest (or host) access that had to wait for the migration engine, from the moment
  it was observed (a ``uffd_msg`` read, a ``KVM_EXIT_MEMORY_FAULT`` returned) to the moment the
  faulting thread could go on (the ``UFFDIO_COPY``/``CONTINUE``/``WAKE`` or the re-entered
  ``KVM_RUN``).

These structs are what readers hand out and writers take; how they are laid out on disk (chunks,
checksums, delta encoding) is `replay.format`'s business. Times are the monotonic nanoseconds of
the `Kernel` that was recorded (``Kernel.monotonic_ns``), so a fake with a manual clock records
virtual time.
"""

from __future__ import annotations

from typing import Any

import msgspec

#: bump when a reader of the previous version cannot read the new files
FORMAT_VERSION = 2
#: the oldest reader version that can still read what this version writes
COMPAT_VERSION = 2


class HostInfo(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Where the trace was recorded."""

    kernel_release: str = ""  #: ``uname -r``
    machine: str = ""  #: ``uname -m``
    cpu_model: str = ""  #: ``model name`` from /proc/cpuinfo
    page_size: int = 4096
    #: facts from ``fakekvm doctor`` (API version, capabilities, uffd features, ...)
    doctor: dict[str, object] = msgspec.field(default_factory=dict)


class Header(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """The first record of every trace."""

    format_version: int = FORMAT_VERSION
    compat_version: int = COMPAT_VERSION
    uuid: str = ""
    created: str = ""  #: ISO 8601, UTC
    host: HostInfo = msgspec.field(default_factory=HostInfo)
    kernel: str = ""  #: "real", "fake" or "replay"
    profile: str | None = None  #: the fake's kernel profile (None on the real kernel)
    mechanism: str | None = None  #: post-copy mechanism ("uffd-missing", ...) if any
    guest: str | None = None  #: guest program / workload name
    seed: int | None = None
    argv: list[str] = msgspec.field(default_factory=list)  #: the command line recorded
    role: str = ""  #: "destination", "source", "" (a single-process run)
    with_contents: bool = False  #: True when guest memory bytes were recorded
    extra: dict[str, object] = msgspec.field(default_factory=dict)


class Call(
    msgspec.Struct, tag="call", omit_defaults=True, forbid_unknown_fields=False, gc=False
):
    """One call through the `Kernel` seam."""

    seq: int  #: 0, 1, 2, ... over the whole trace (calls and faults share nothing else)
    tid: int  #: native thread id of the caller
    t_ns: int  #: monotonic ns when the call was entered
    dur_ns: int  #: how long it took
    op: str  #: the Kernel method: "ioctl", "read", "write", "mmap", "open", "close", ...
    fd: int = -1
    fd_kind: str = ""  #: "kvm", "kvm-vm", "kvm-vcpu:0", "userfaultfd", "guest_memfd", "memfd", ...
    vcpu: int = -1  #: the vCPU index for vCPU-fd calls, else -1
    request: int = 0  #: the ioctl number (0 for other ops)
    name: str = ""  #: "KVM_RUN", "UFFDIO_COPY", ... (``fakekvm.abi.names``)
    iarg: int | None = None  #: an integer argument (ioctl int arg, read size, mmap length ...)
    args: list[int] = msgspec.field(default_factory=list)  #: further integer arguments, in order
    inp: bytes = b""  #: bytes passed in (struct argument, data written)
    out: bytes = b""  #: bytes the kernel wrote back (ioctl struct after the call, data read)
    ret: int = 0  #: return value (for mmap: the address)
    errno: int = 0  #: 0 on success


class Fault(
    msgspec.Struct, tag="fault", omit_defaults=True, forbid_unknown_fields=False, gc=False
):
    """One access that waited for the engine."""

    seq: int  #: position in the trace (the seq of the call that revealed it, or the next one)
    tid: int  #: the faulting thread (ptid or vCPU thread)
    vcpu: int = -1
    gpa: int = -1  #: guest-physical address, -1 if not known (a host access)
    hva: int = -1  #: host-virtual address, -1 if not known (a KVM Userfault exit gives gpa only)
    access: str = ""  #: "read", "write", "exec", "wp", "minor", "private", "shared"
    mechanism: str = ""  #: "uffd-missing", "uffd-minor", "kvm-userfault", "gmem-private", ...
    observed_ns: int = 0
    resolved_ns: int = 0  #: 0 while unresolved (a trace cut off mid-fault)
    how: str = ""  #: "copy", "continue", "zeropage", "wake", "eexist", "rerun", "convert", ...


class Contents(
    msgspec.Struct, tag="contents", omit_defaults=True, forbid_unknown_fields=False, gc=False
):
    """Guest memory bytes, only with ``--with-contents``."""

    seq: int
    hva: int
    data: bytes


Event = Call | Fault | Contents


class KernelEvent(msgspec.Struct, tag="kevent", omit_defaults=True, forbid_unknown_fields=False):
    """One kernel tracepoint hit read from tracefs (``replay.tracefs``), e.g. ``kvm:kvm_exit``.

    Not part of `Event`: a trace keeps them in chunks of their own after its end chunk
    (`replay.kevents`, ``TraceReader.kevents``), and `replay.tracefs_merge.merge` interleaves
    them with the recorded events by time. ``fields`` are decoded by the event's
    ``format`` file (``common_*`` fields left out): integers as ``int``, ``char`` arrays and
    ``__data_loc char[]`` as ``str``, anything else as ``bytes``.
    """

    t_ns: int  #: trace_clock ``mono``: the same clock as ``time.monotonic_ns()``
    cpu: int  #: the CPU whose ring buffer held it
    pid: int  #: ``common_pid``: the thread id that hit the tracepoint
    system: str  #: "kvm", "kvmmmu", ...
    name: str  #: "kvm_exit", "kvm_userspace_exit", ...
    #: values are ``int | bytes | str``; typed ``Any`` because msgspec cannot decode a union of
    #: two str-like types (msgpack keeps bytes and str apart, so they round-trip)
    fields: dict[str, Any] = msgspec.field(default_factory=dict)
