"""``fakekvm trace show``: a trace as strace-style lines, one per `Call`, one per `Fault`.

The format follows strace's (``ioctl(fd, REQUEST, {field=value, ...}) = ret``, errors as
``= -1 ENAME (message)``) with fd annotations like ``strace -yy`` (``7<kvm-vcpu:0>``).
Struct arguments are decoded with the precompiled ``struct.Struct`` codecs of
:mod:`fakekvm.abi.kvm`, :mod:`fakekvm.abi.uffd` and :mod:`fakekvm.abi.kvm_userfault`
(layouts from ``include/uapi/linux/kvm.h`` and ``include/uapi/linux/userfaultfd.h``), names
from :mod:`fakekvm.abi.names`:

* ``KVM_RUN``: the exit read from the recorded ``kvm_run`` bytes (``Call.out``: the page from
  offset 0; IO data either inside it at ``data_offset`` or appended after the first 0x120
  bytes — see :func:`kvm_run_io_data`);
* ``read`` on a userfaultfd: the ``uffd_msg`` records read, ``[PAGEFAULT flags=WRITE ...]``;
* a `Fault`: ``-- fault vcpu 0 gpa=0x1234000 write uffd-missing 41.2 µs (copy)``.

Nothing here raises on odd bytes: what cannot be decoded is printed as hex. Every function
takes events (no file access), so the same code serves the CLI and the tests.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fakekvm.abi import kvm, kvm_userfault, mman, names, uffd
from fakekvm.abi.ioctl import _IOC_DIR, _IOC_READ, _IOC_WRITE
from replay.events import Call, Contents, Event, Fault, Header, KernelEvent

#: hex dumps of undecodable bytes stop after this many bytes
HEX_LIMIT = 64
#: bytes of kvm_run the recorder keeps for KVM_RUN (header + exit union; `replay.recorder`)
KVM_RUN_RECORDED = 0x120
#: ops that only read the clock or the thread id: hidden by ``trace show`` unless asked for
CLOCK_OPS = frozenset({"monotonic_ns", "gettid"})

# (struct, field names, {field: flag namespace}, fields printed in hex)
_Codec = tuple[struct.Struct, tuple[str, ...], dict[str, str], frozenset[str]]

_ADDR_WORDS = frozenset(
    {
        "guest_phys_addr",
        "userspace_addr",
        "guest_memfd_offset",
        "address",
        "gpa",
        "dst",
        "src",
        "start",
        "size",
        "memory_size",
        "len",
        "userfault_bitmap",
        "dirty_bitmap",
        "first_page",
        "attributes",
        "addr",
        "datamatch",
        "api",
        "features",
        "ioctls",
    }
)


def _codec(fmt: struct.Struct, fields: str, flags: dict[str, str] | None = None) -> _Codec:
    names_ = tuple(fields.split())
    hexes = frozenset(n for n in names_ if n in _ADDR_WORDS and n not in ("len", "size"))
    if fmt is kvm.kvm_regs_fmt:
        hexes = frozenset(names_)
    return fmt, names_, flags or {}, hexes


_U = uffd
_K = kvm
#: ioctl name -> how to decode its struct argument
IOCTL_CODECS: dict[str, _Codec] = {
    "KVM_SET_USER_MEMORY_REGION": _codec(
        _K.kvm_userspace_memory_region_fmt,
        "slot flags guest_phys_addr memory_size userspace_addr",
        {"flags": "memslot_flag"},
    ),
    "KVM_SET_USER_MEMORY_REGION2": _codec(
        kvm_userfault.kvm_userspace_memory_region2_fmt,
        "slot flags guest_phys_addr memory_size userspace_addr guest_memfd_offset guest_memfd "
        "pad1 userfault_bitmap",
        {"flags": "memslot_flag"},
    ),
    "KVM_CREATE_GUEST_MEMFD": _codec(
        _K.kvm_create_guest_memfd_fmt, "size flags", {"flags": "gmem_flag"}
    ),
    "KVM_SET_MEMORY_ATTRIBUTES": _codec(
        _K.kvm_memory_attributes_fmt,
        "address size attributes flags",
        {"attributes": "memory_attribute"},
    ),
    "KVM_PRE_FAULT_MEMORY": _codec(_K.kvm_pre_fault_memory_fmt, "gpa size flags"),
    "KVM_GET_DIRTY_LOG": _codec(_K.kvm_dirty_log_fmt, "slot padding1 dirty_bitmap"),
    "KVM_CLEAR_DIRTY_LOG": _codec(
        _K.kvm_clear_dirty_log_fmt, "slot num_pages first_page dirty_bitmap"
    ),
    "KVM_IRQFD": _codec(_K.kvm_irqfd_fmt, "fd gsi flags resamplefd", {"flags": "irqfd_flag"}),
    "KVM_IOEVENTFD": _codec(
        _K.kvm_ioeventfd_fmt, "datamatch addr len fd flags", {"flags": "ioeventfd_flag"}
    ),
    "KVM_GET_REGS": _codec(_K.kvm_regs_fmt, " ".join(_K.KVM_REGS_FIELDS)),
    "KVM_SET_REGS": _codec(_K.kvm_regs_fmt, " ".join(_K.KVM_REGS_FIELDS)),
    "KVM_READ_USERFAULT": _codec(kvm_userfault.kvm_fault_fmt, "address"),
    "UFFDIO_API": _codec(
        _U.uffdio_api_fmt,
        "api features ioctls",
        {"features": "uffd_feature", "ioctls": "uffd_ioctls"},
    ),
    "UFFDIO_REGISTER": _codec(
        _U.uffdio_register_fmt,
        "start len mode ioctls",
        {"mode": "uffdio_register_mode", "ioctls": "uffd_ioctls"},
    ),
    "UFFDIO_UNREGISTER": _codec(_U.uffdio_range_fmt, "start len"),
    "UFFDIO_WAKE": _codec(_U.uffdio_range_fmt, "start len"),
    "UFFDIO_COPY": _codec(
        _U.uffdio_copy_fmt, "dst src len mode copy", {"mode": "uffdio_copy_mode"}
    ),
    "UFFDIO_ZEROPAGE": _codec(
        _U.uffdio_zeropage_fmt, "start len mode zeropage", {"mode": "uffdio_zeropage_mode"}
    ),
    "UFFDIO_WRITEPROTECT": _codec(
        _U.uffdio_writeprotect_fmt, "start len mode", {"mode": "uffdio_writeprotect_mode"}
    ),
    "UFFDIO_CONTINUE": _codec(
        _U.uffdio_continue_fmt, "start len mode mapped", {"mode": "uffdio_continue_mode"}
    ),
    "UFFDIO_POISON": _codec(
        _U.uffdio_poison_fmt, "start len mode updated", {"mode": "uffdio_poison_mode"}
    ),
    "UFFDIO_MOVE": _codec(
        _U.uffdio_move_fmt, "dst src len mode move", {"mode": "uffdio_move_mode"}
    ),
}
# kvm_enable_cap: cap, flags, args[4]
_ENABLE_CAP = _K.kvm_enable_cap_fmt

#: the ioctls whose integer argument names something
_INT_ARG_NAMESPACE = {
    "KVM_CHECK_EXTENSION": "cap",
    "KVM_CREATE_VM": "vm_type",
}

_SHORT_PREFIX = {
    "memory_exit_flag": "KVM_MEMORY_EXIT_FLAG_",
    "uffd_pagefault_flag": "UFFD_PAGEFAULT_FLAG_",
}


def hexdump(data: bytes, limit: int = HEX_LIMIT) -> str:
    """``"0011aabb"`` (``...`` and the length when longer than ``limit``)."""
    if len(data) <= limit:
        return data.hex()
    return f"{data[:limit].hex()}...({len(data)} bytes)"


def short_flags(ns: str, value: int) -> str:
    """Flag names without their common prefix: ``USERFAULT|PRIVATE``; ``0`` for none."""
    prefix = _SHORT_PREFIX.get(ns, "")
    parts = [n[len(prefix) :] if prefix and n.startswith(prefix) else n for n in
             names.flag_names(ns, value)]  # fmt: skip
    return "|".join(parts) or "0"


def errno_name(e: int) -> str:
    return _errno.errorcode.get(e, f"E{e}")


def fd_label(fd: int, fd_kind: str) -> str:
    return f"{fd}<{fd_kind}>" if fd_kind else str(fd)


def _fmt_int(name: str, value: int, hexes: frozenset[str]) -> str:
    if name in hexes or value >= 1 << 32:
        return f"{value:#x}"
    return str(value)


def decode_struct(name: str, data: bytes) -> str | None:
    """``{dst=0x7f.., src=.., len=4096, mode=0, copy=4096}`` for ioctl ``name``; None if
    ``name`` has no codec or ``data`` is too short."""
    if name == "KVM_ENABLE_CAP":
        if len(data) < _ENABLE_CAP.size:
            return None
        cap, flags, *args = _ENABLE_CAP.unpack_from(data)
        return (
            f"{{cap={names.describe('cap', cap)}, flags={flags:#x}, "
            f"args=[{', '.join(f'{a:#x}' for a in args)}]}}"
        )
    codec = IOCTL_CODECS.get(name)
    if codec is None:
        return None
    fmt, fields, flags, hexes = codec
    if len(data) < fmt.size:
        return None
    values = fmt.unpack_from(data)
    parts = []
    for f, v in zip(fields, values, strict=False):
        if f in flags and v:
            parts.append(f"{f}={names.decode_flags(flags[f], v)}")
        elif name.endswith("_REGS") and v == 0 and f != "rip":
            continue  # kvm_regs: the non-zero registers only
        elif f in ("pad1", "userfault_bitmap", "padding1") and v == 0:
            continue  # padding (and the NOT UPSTREAM userfault_bitmap) when unused
        else:
            parts.append(f"{f}={_fmt_int(f, v, hexes)}")
    return "{" + ", ".join(parts) + "}"


def decode_sregs(data: bytes) -> str | None:
    """The control registers of a ``kvm_sregs`` (the segments would fill a screen)."""
    fmt = kvm.kvm_sregs_fmt
    if len(data) < fmt.size:
        return None
    off = 8 * 24 + 2 * 16  # 8 segments, 2 dtables
    regs = struct.unpack_from("<7Q", data, off)
    cs_sel = struct.unpack_from("<H", data, 12)[0]  # kvm_segment: base, limit, selector
    parts = [f"{n}={v:#x}" for n, v in zip(kvm.KVM_SREGS_CONTROL, regs, strict=True)]
    return "{cs.selector=" + f"{cs_sel:#x}, " + ", ".join(parts) + ", ...}"


def kvm_run_io_data(out: bytes) -> bytes | None:
    """The data of a ``KVM_EXIT_IO`` in recorded ``kvm_run`` bytes, or None if not there.

    Either the recording holds the page up to ``data_offset + size * count`` or it holds the
    first :data:`KVM_RUN_RECORDED` bytes (0x100 accepted too) followed by exactly the
    ``size * count`` data bytes.
    """
    off = kvm.KVM_RUN_EXIT_OFFSET
    if len(out) < off + kvm.kvm_run_io_fmt.size:
        return None
    _direction, size, _port, count, data_offset = kvm.kvm_run_io_fmt.unpack_from(out, off)
    n = size * count
    if len(out) >= data_offset + n and data_offset >= off + kvm.kvm_run_io_fmt.size:
        return out[data_offset : data_offset + n]
    for head in (KVM_RUN_RECORDED, 0x100):
        if len(out) == head + n:
            return out[head:]
    return None


def decode_kvm_run(out: bytes) -> str:
    """``KVM_EXIT_IO OUT port=0x3f8 size=1 count=1 data=48``, from recorded kvm_run bytes."""
    if len(out) < kvm.KVM_RUN_EXIT_REASON_OFFSET + 4:
        return f"kvm_run? {hexdump(out)}" if out else "kvm_run not recorded"
    (reason,) = kvm.kvm_run_exit_reason_fmt.unpack_from(out, kvm.KVM_RUN_EXIT_REASON_OFFSET)
    label = names.describe("exit", reason)
    off = kvm.KVM_RUN_EXIT_OFFSET
    arm = out[off : off + kvm.KVM_RUN_EXIT_SIZE]
    try:
        if reason == kvm.KVM_EXIT_IO:
            direction, size, port, count, data_offset = kvm.kvm_run_io_fmt.unpack_from(arm)
            d = "OUT" if direction == kvm.KVM_EXIT_IO_OUT else "IN"
            s = f"{label} {d} port={port:#x} size={size} count={count}"
            if direction == kvm.KVM_EXIT_IO_OUT:
                data = kvm_run_io_data(out)
                s += (
                    f" data={hexdump(data)}"
                    if data is not None
                    else f" data_offset={data_offset:#x}"
                )
            return s
        if reason == kvm.KVM_EXIT_MMIO:
            phys_addr, raw, length, is_write = kvm.kvm_run_mmio_fmt.unpack_from(arm)
            s = f"{label} {'write' if is_write else 'read'} phys_addr={phys_addr:#x} len={length}"
            return s + (f" data={raw[: min(length, 8)].hex()}" if is_write else "")
        if reason == kvm.KVM_EXIT_MEMORY_FAULT:
            flags, gpa, size = kvm.kvm_run_memory_fault_fmt.unpack_from(arm)
            s = f"{label} flags={short_flags('memory_exit_flag', flags)} gpa={gpa:#x}"
            return s if size == 4096 or size == 0 else f"{s} size={size:#x}"
        if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = kvm.kvm_run_internal_fmt.unpack_from(arm)
            return f"{label} suberror={names.describe('internal_error', suberror)} ndata={ndata}"
        if reason == kvm.KVM_EXIT_SYSTEM_EVENT:
            type_, ndata, flags = kvm.kvm_run_system_event_fmt.unpack_from(arm)
            t = names.describe("system_event", type_)
            return f"{label} type={t} ndata={ndata} data0={flags:#x}"
        if reason == kvm.KVM_EXIT_FAIL_ENTRY:
            hw, cpu = kvm.kvm_run_fail_entry_fmt.unpack_from(arm)
            return f"{label} hardware_entry_failure_reason={hw:#x} cpu={cpu}"
        if reason == kvm.KVM_EXIT_UNKNOWN:
            (hw,) = kvm.kvm_run_hw_fmt.unpack_from(arm)
            return f"{label} hardware_exit_reason={hw:#x}"
    except struct.error:
        return f"{label} {hexdump(arm)}"
    if reason in (kvm.KVM_EXIT_HLT, kvm.KVM_EXIT_SHUTDOWN, kvm.KVM_EXIT_INTR):
        return label
    body = arm.rstrip(b"\0")
    return f"{label} {hexdump(body)}" if body else label


def decode_uffd_msgs(data: bytes) -> str:
    """``[PAGEFAULT flags=WRITE address=0x7f..000 ptid=1234, ...]`` for bytes read from a
    userfaultfd (whole 32-byte ``uffd_msg`` records; a tail is shown in hex)."""
    out = []
    n = uffd.UFFD_MSG_SIZE
    whole = len(data) - len(data) % n
    for i in range(0, whole, n):
        m = data[i : i + n]
        event = m[0]
        ename = names.describe("uffd_event", event).removeprefix("UFFD_EVENT_")
        if event == uffd.UFFD_EVENT_PAGEFAULT:
            _e, flags, address, ptid = uffd.uffd_msg_pagefault_fmt.unpack(m)
            fl = short_flags("uffd_pagefault_flag", flags)
            out.append(f"{ename} flags={fl} address={address:#x} ptid={ptid}")
        elif event == uffd.UFFD_EVENT_FORK:
            out.append(f"{ename} ufd={uffd.uffd_msg_fork_fmt.unpack(m)[1]}")
        elif event == uffd.UFFD_EVENT_REMAP:
            _e, frm, to, ln = uffd.uffd_msg_remap_fmt.unpack(m)
            out.append(f"{ename} from={frm:#x} to={to:#x} len={ln:#x}")
        elif event in (uffd.UFFD_EVENT_REMOVE, uffd.UFFD_EVENT_UNMAP):
            _e, start, end = uffd.uffd_msg_remove_fmt.unpack(m)
            out.append(f"{ename} start={start:#x} end={end:#x}")
        else:
            out.append(hexdump(m))
    if whole != len(data):
        out.append(hexdump(data[whole:]))
    return "[" + ", ".join(out) + "]"


def _ret(call: Call, detail: str | None = None) -> str:
    if call.errno:
        s = f"-1 {errno_name(call.errno)}"
        return f"{s} ({detail})" if detail else f"{s} ({os.strerror(call.errno)})"
    r = f"{call.ret:#x}" if call.op in ("mmap", "mremap") else str(call.ret)
    return f"{r} ({detail})" if detail else r


def _ioctl_arg(call: Call) -> str:
    name = call.name or names.ioctl_name(call.request)
    if not call.inp and not call.out:
        v = call.iarg if call.iarg is not None else 0
        ns = _INT_ARG_NAMESPACE.get(name)
        return names.describe(ns, v) if ns else str(v)
    d = _IOC_DIR(call.request)
    # what the kernel wrote back when it writes (out, or inp when unchanged); else what it read
    data = (call.out or call.inp) if d & _IOC_READ else (call.inp or call.out)
    if name in ("KVM_GET_SREGS", "KVM_SET_SREGS"):
        s = decode_sregs(data)
    else:
        s = decode_struct(name, data)
    if s is None:
        s = hexdump(data)
        if d & _IOC_WRITE and d & _IOC_READ and call.out and call.out != call.inp:
            s = f"{hexdump(call.inp)} => {hexdump(call.out)}"
    return s


def format_call(call: Call) -> str:
    """One strace-style line for ``call`` (no timestamp)."""
    fd = fd_label(call.fd, call.fd_kind)
    op = call.op
    if op == "ioctl":
        name = call.name or names.ioctl_name(call.request)
        if name == "KVM_RUN":
            detail = decode_kvm_run(call.out) if call.out else None
            if call.errno and detail is None:
                detail = os.strerror(call.errno)
            answer = f" {{answer={hexdump(call.inp, 16)}}}" if call.inp else ""
            return f"ioctl({fd}, KVM_RUN, {call.iarg or 0}{answer}) = {_ret(call, detail)}"
        return f"ioctl({fd}, {name}, {_ioctl_arg(call)}) = {_ret(call)}"
    if op in ("read", "pread"):
        n = call.iarg if call.iarg is not None else len(call.out)
        extra = f", {call.args[0]}" if op == "pread" and call.args else ""
        line = f"{op}({fd}, {n}{extra}) = {_ret(call)}"
        if call.out and not call.errno:
            if call.fd_kind == "userfaultfd":
                line += " " + decode_uffd_msgs(call.out)
            else:
                line += " " + hexdump(call.out, 16)
        return line
    if op in ("write", "pwrite"):
        n = len(call.inp) if call.inp else (call.iarg or 0)
        extra = f", {call.args[0]}" if op == "pwrite" and call.args else ""
        data = f"{hexdump(call.inp, 16)}, " if call.inp else ""
        return f"{op}({fd}, {data}{n}{extra}) = {_ret(call)}"
    if op == "open":
        path = call.inp.decode("utf-8", "replace") if call.inp else "?"
        flags = f", {open_flags(call.iarg)}" if call.iarg is not None else ""
        return f'open("{path}"{flags}) = {_ret(call)}'
    if op == "close":
        return f"close({fd}) = {_ret(call)}"
    if op == "mmap" and call.iarg is not None and len(call.args) == 4:
        prot, mflags, offset, address = call.args
        addr = f"{address:#x}" if address else "NULL"
        return (
            f"mmap({addr}, {call.iarg:#x}, {_bits(_PROT, prot) or 'PROT_NONE'}, "
            f"{_bits(_MAP, mflags)}, {fd}, {offset:#x}) = {_ret(call)}"
        )
    if op == "munmap" and len(call.args) == 2:
        return f"munmap({call.args[0]:#x}, {call.args[1]:#x}) = {_ret(call)}"
    if op in CLOCK_OPS:
        return f"{op}() = {call.ret}"
    if op == "userfaultfd" and call.iarg is not None:
        return f"userfaultfd({open_flags(call.iarg, accmode=False)}) = {_ret(call)}"
    if op == "eventfd" and call.iarg is not None and len(call.args) == 1:
        return f"eventfd({call.iarg}, {open_flags(call.args[0], accmode=False)}) = {_ret(call)}"
    if op == "poll" and call.inp:
        n = len(call.inp) // _POLLFD.size
        line = f"poll({decode_pollfds(call.inp, 'events')}, {n}, {call.iarg}) = {_ret(call)}"
        if call.out and not call.errno and call.ret > 0:
            line += f" ({decode_pollfds(call.out, 'revents')})"
        return line
    ints = [fd] if call.fd >= 0 else []
    if call.iarg is not None:
        ints.append(f"{call.iarg:#x}" if call.iarg >= 1 << 20 else str(call.iarg))
    ints += [f"{a:#x}" if a >= 1 << 20 else str(a) for a in call.args]
    if call.inp:
        ints.append(hexdump(call.inp, 32))
    return f"{op}({', '.join(ints)}) = {_ret(call)}"


_PROT = {v: k for k, v in vars(mman).items() if k.startswith("PROT_") and v}
_MAP = {
    v: k
    for k, v in vars(mman).items()
    if k.startswith("MAP_") and isinstance(v, int) and v and (v & (v - 1)) == 0 and v < 1 << 26
}


_POLL = {v: k for k, v in vars(mman).items() if k.startswith("POLL") and isinstance(v, int)}
_OPEN = {
    mman.O_NONBLOCK: "O_NONBLOCK", mman.O_CLOEXEC: "O_CLOEXEC", mman.O_CREAT: "O_CREAT",
    mman.O_EXCL: "O_EXCL", mman.O_TRUNC: "O_TRUNC", mman.O_APPEND: "O_APPEND",
    mman.O_NOCTTY: "O_NOCTTY",
}  # fmt: skip
_ACCMODE = {mman.O_RDONLY: "O_RDONLY", mman.O_WRONLY: "O_WRONLY", mman.O_RDWR: "O_RDWR"}
_POLLFD = struct.Struct("<iHH")


def open_flags(flags: int, *, accmode: bool = True) -> str:
    """``O_RDWR|O_CLOEXEC`` (without the access mode for userfaultfd/eventfd flags)."""
    rest = _bits(_OPEN, flags & ~mman.O_ACCMODE)
    if not accmode:
        extra = flags & mman.O_ACCMODE
        tail = f"{extra:#x}" if extra else ""
        return "|".join(p for p in (rest, tail) if p) or "0"
    acc = _ACCMODE.get(flags & mman.O_ACCMODE, f"{flags & mman.O_ACCMODE:#o}")
    return "|".join(p for p in (acc, rest) if p)


def decode_pollfds(data: bytes, field: str) -> str:
    """``[{fd=17, events=POLLIN}, ...]`` from a recorded ``struct pollfd`` array."""
    items = []
    for off in range(0, len(data) - len(data) % _POLLFD.size, _POLLFD.size):
        fd, events, revents = _POLLFD.unpack_from(data, off)
        v = events if field == "events" else revents
        if field == "revents" and not v:
            continue
        items.append(f"{{fd={fd}, {field}={_bits(_POLL, v) or '0'}}}")
    return "[" + ", ".join(items) + "]"


def _bits(table: dict[int, str], value: int) -> str:
    parts = []
    rest = value
    for bit, n in sorted(table.items()):
        if value & bit:
            parts.append(n)
            rest &= ~bit
    if rest:
        parts.append(f"{rest:#x}")
    return "|".join(parts)


def format_fault(f: Fault) -> str:
    """``-- fault vcpu 0 gpa=0x1234000 write uffd-missing 41.2 µs (copy)``."""
    who = f"vcpu {f.vcpu}" if f.vcpu >= 0 else f"tid {f.tid}"
    where = []
    if f.gpa >= 0:
        where.append(f"gpa={f.gpa:#x}")
    if f.hva >= 0:
        where.append(f"hva={f.hva:#x}")
    parts = [who, *where, f.access or "?", f.mechanism or "?"]
    if f.resolved_ns:
        parts.append(f"{(f.resolved_ns - f.observed_ns) / 1000:.1f} µs ({f.how or '?'})")
    else:
        parts.append("unresolved")
    return "-- fault " + " ".join(parts)


def format_contents(c: Contents) -> str:
    return f"-- contents hva={c.hva:#x} {len(c.data)} bytes"


@dataclass
class ShowFilter:
    """What ``trace show`` prints (``--tid``, ``--fd-kind``, ``--name``, ``--faults-only``)."""

    tid: int | None = None
    fd_kind: str | None = None  #: exact, or a prefix ending with ":" ("kvm-vcpu:")
    name: str | None = None  #: ioctl name or op
    faults_only: bool = False
    limit: int | None = None
    relative: bool = False  #: prefix each line with the time since the previous one
    clock: bool = False  #: also the ``monotonic_ns``/``gettid`` calls

    def keep(self, ev: Event | KernelEvent) -> bool:
        if isinstance(ev, KernelEvent):
            return not self.faults_only and self.name is None and self.fd_kind is None and (
                self.tid is None or ev.pid == self.tid
            )
        if isinstance(ev, Fault):
            if self.tid is not None and ev.tid != self.tid:
                return False
            return not (self.name is not None or self.fd_kind is not None)
        if self.faults_only:
            return False
        if isinstance(ev, Contents):
            return self.tid is None and self.name is None and self.fd_kind is None
        if self.tid is not None and ev.tid != self.tid:
            return False
        if ev.op in CLOCK_OPS and not self.clock and self.name != ev.op:
            return False
        if self.fd_kind is not None and not (
            ev.fd_kind == self.fd_kind
            or (self.fd_kind.endswith(":") and ev.fd_kind.startswith(self.fd_kind))
        ):
            return False
        return self.name is None or self.name in (ev.name, ev.op)


def _event_t(ev: Event | KernelEvent) -> int | None:
    if isinstance(ev, (Call, KernelEvent)):
        return ev.t_ns
    if isinstance(ev, Fault):
        return ev.observed_ns
    return None


def format_event(ev: Event | KernelEvent) -> str:
    if isinstance(ev, Call):
        return format_call(ev)
    if isinstance(ev, Fault):
        return format_fault(ev)
    if isinstance(ev, KernelEvent):
        return format_kevent(ev)
    return format_contents(ev)


def format_kevent(k: KernelEvent) -> str:
    """A kernel tracepoint hit (``capture --kvm-trace``): ``== kvm:kvm_userspace_exit ...``."""

    def value(v: object) -> str:
        if isinstance(v, int):
            return str(v) if -4096 < v < 4096 else f"{v:#x}"
        if isinstance(v, bytes):
            return v.hex()
        return repr(v)

    fields = " ".join(f"{name}={value(v)}" for name, v in k.fields.items())
    return f"== {k.system}:{k.name} cpu{k.cpu} pid {k.pid} {fields}".rstrip()


def show_lines(
    header: Header, events: Iterable[Event | KernelEvent], flt: ShowFilter | None = None
) -> Iterator[str]:
    """The lines of ``trace show`` for ``events`` (streamed: nothing is kept)."""
    flt = flt or ShowFilter()
    n = 0
    prev: int | None = None
    for ev in events:
        if flt.limit is not None and n >= flt.limit:
            return
        if not flt.keep(ev):
            continue
        try:
            line = format_event(ev)
        except Exception as e:  # never crash on a record: say what it was
            line = f"?? {type(ev).__name__} seq={getattr(ev, 'seq', '?')}: cannot decode ({e})"
        if flt.relative:
            t = _event_t(ev)
            if t is not None:
                d = 0 if prev is None else t - prev
                prev = t
                line = f"{d / 1e9:+.6f} {line}"
            else:
                line = f"{'':>9} {line}"
        n += 1
        yield line


def header_lines(header: Header) -> list[str]:
    """A short ``# key: value`` preamble describing where the trace comes from."""
    h = header
    out = [f"# trace {h.uuid or '?'} format {h.format_version} created {h.created or '?'}"]
    out.append(
        f"# kernel {h.kernel or '?'} {h.host.kernel_release} profile {h.profile} "
        f"mechanism {h.mechanism} guest {h.guest} seed {h.seed} role {h.role or '-'}"
    )
    if h.argv:
        out.append("# argv " + " ".join(h.argv))
    return out
