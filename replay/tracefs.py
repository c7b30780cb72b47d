"""The kernel's own kvm tracepoints, read from tracefs and joined to a capture.

What it models, and the kernel sources it follows:

* **format files** (``events/SYSTEM/EVENT/format``, Documentation/trace/events.rst §"Event
  formats"): each field's C declaration, ``offset``, ``size`` and ``signed``. Records are decoded
  by these files only, never by offsets known in advance, because fields move between kernels.
  ``__data_loc`` (offset in the low 16 bits, length in the high 16) and ``__rel_loc`` (the same,
  offset counted from the end of the field) are followed; ``char`` arrays become ``str``;
  integers of 1, 2, 4 or 8 bytes become ``int``; anything else stays ``bytes``.
* **ring-buffer pages** (``per_cpu/cpuN/trace_pipe_raw``; Documentation/trace/
  ring-buffer-design.rst, include/linux/ring_buffer.h ``enum ring_buffer_type``,
  kernel/trace/ring_buffer.c ``rb_event_length``/``rb_update_read_stamp``/``rb_fix_abs_ts``/
  ``ring_buffer_read_page``; libtraceevent ``kbuffer-parse.c`` is the reference reader): a page
  header laid out as ``events/header_page`` says (u64 ``timestamp``, ``commit`` = bytes of data
  plus the flags ``RB_MISSED_EVENTS`` (bit 31) and ``RB_MISSED_STORED`` (bit 30, the count of
  lost events then follows the data)), then records with a 32-bit header: ``type_len`` (5 bits)
  and ``time_delta`` (27 bits). ``type_len`` 1..28: a data record of ``4*type_len`` bytes; 0: a
  data record whose length (+4) is in ``array[0]``; 29 ``PADDING`` (``time_delta`` 0: the rest
  of the page is empty; else a discarded record of ``array[0]`` bytes); 30 ``TIME_EXTEND``
  (delta = ``array[0] << 27 | time_delta``); 31 ``TIME_STAMP`` (absolute time, same encoding,
  top 5 bits taken from the current time as ``rb_fix_abs_ts`` does).
* **an instance** (``instances/NAME``, Documentation/trace/ftrace.rst §"Instances"): a private
  ring buffer, so a capture never touches the global buffer or other users' instances. Its
  ``trace_clock`` is set to ``mono`` (``ktime_get_mono_fast_ns``: CLOCK_MONOTONIC, the clock of
  ``time.monotonic_ns()`` and so of the recorder's ``t_ns``), events are limited to this
  process's threads with ``set_event_pid`` (and ``options/event-fork`` for threads started
  later), ``options/overwrite`` is 0 so a full buffer drops new events (counted) rather than
  silently eating old ones.

Privilege (measured here): the tracefs root is mode 0700 root:root, ``instances/`` 0750, the
control files (``buffer_size_kb``, ``trace_clock``, ``set_event_pid``, ``events/*/*/enable``)
0640 and ``trace_pipe_raw`` 0440. A session creates an instance and writes control files, so it
needs root or CAP_DAC_OVERRIDE; a tracefs mounted with ``gid=GROUP`` only lets GROUP read
(unless an administrator adds group write to those files). Mounting tracefs needs CAP_SYS_ADMIN.
`tracefs_status` says which of these is missing, with the modes it found.

On this host (6.18, kvm-pvm) ``kvm_userspace_exit`` fires once per ``KVM_RUN`` return (its
``reason`` is ``kvm_run.exit_reason``, ``errno`` the negative errno of a failed run),
``kvm_pio`` once per port-I/O exit, ``kvm_mmio`` twice per MMIO read exit (``type`` 0
"unsatisfied read" at the exit, 1 "read" when the data is taken on re-entry); PVM never fires
``kvm_exit``, ``kvm_entry`` or ``kvm_page_fault`` (VMX/SVM exit-handler tracepoints); its
shadow-MMU work shows in ``kvmmmu:*``.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import re
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from replay.events import Call, Contents, Fault, KernelEvent

__all__ = [
    "DEFAULT_EVENTS",
    "DEFAULT_LAYOUT",
    "Decoder",
    "EventFormat",
    "FieldFormat",
    "Page",
    "PageLayout",
    "TracefsError",
    "TracefsSession",
    "find_tracefs",
    "load_kevents",
    "merge",
    "parse_format",
    "parse_header_page",
    "parse_page",
    "remove_stale_instances",
    "save_kevents",
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


# -- format files ---------------------------------------------------------------------------------

_FIELD_RE = re.compile(
    r"field:\s*(?P<decl>[^;]*?)\s*;\s*offset:\s*(?P<off>\d+)\s*;\s*size:\s*(?P<size>\d+)\s*;"
    r"(?:\s*signed:\s*(?P<signed>-?\d+)\s*;)?"
)
_DECL_RE = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<arr>\[[^\]]*\])?$")
_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass(frozen=True)
class FieldFormat:
    """One ``field:`` line of a format file."""

    name: str
    type: str  #: the C type as written, without the name and the array brackets
    offset: int
    size: int
    signed: bool
    array: str = ""  #: "[16]", "[]", or "" for a scalar
    #: "int", "str" (char array), "bytes", "data_loc", "rel_loc" (dynamic arrays)
    kind: str = "int"

    @property
    def common(self) -> bool:
        return self.name.startswith("common_")


def _field(decl: str, offset: int, size: int, signed: bool) -> FieldFormat:
    m = _DECL_RE.match(decl.strip())
    if m is None:
        return FieldFormat(decl.strip(), "", offset, size, signed, "", "bytes")
    ctype, name, arr = m["type"].strip(), m["name"], m["arr"] or ""
    base = ctype.replace("const ", "").strip()
    if base.startswith("__data_loc"):
        kind = "data_loc"
    elif base.startswith("__rel_loc"):
        kind = "rel_loc"
    elif arr:
        kind = "str" if base == "char" else "bytes"
    elif size in _INT_CODES:
        kind = "int"
    else:
        kind = "bytes"
    return FieldFormat(name, ctype, offset, size, signed, arr, kind)


def _fields(text: str) -> list[FieldFormat]:
    return [
        _field(m["decl"], int(m["off"]), int(m["size"]), m["signed"] not in (None, "0"))
        for m in _FIELD_RE.finditer(text)
    ]


def _cstr(b: bytes | memoryview) -> str:
    raw = bytes(b)
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


class EventFormat:
    """A parsed ``format`` file, with its record decoder compiled once."""

    __slots__ = ("_all", "_ints", "_names", "_others", "_pid", "fields", "id", "name", "system")

    def __init__(self, system: str, name: str, id: int, fields: Sequence[FieldFormat]) -> None:
        self.system = system
        self.name = name
        self.id = id
        self.fields = tuple(fields)
        #: (name, Struct, offset, end) of the integer fields outside common_*
        self._ints: list[tuple[str, struct.Struct, int, int]] = []
        self._others: list[FieldFormat] = []
        self._pid: tuple[struct.Struct, int] | None = None
        for f in self.fields:
            if f.name == "common_pid" and f.kind == "int":
                self._pid = (_int_struct(f), f.offset)
            if f.common:
                continue
            if f.kind == "int":
                self._ints.append((f.name, _int_struct(f), f.offset, f.offset + f.size))
            else:
                self._others.append(f)
        # the fast path: common_pid and every integer field in one unpack (when none overlap)
        ints = sorted(
            [
                f
                for f in self.fields
                if f.kind == "int" and (f.name == "common_pid" or not f.common)
            ],
            key=lambda f: f.offset,
        )
        code, pos = "<", 0
        for f in ints:
            if f.offset < pos:
                code = ""
                break
            code += "x" * (f.offset - pos) + _int_struct(f).format[1:]
            pos = f.offset + f.size
        self._all = struct.Struct(code) if code and ints else None
        self._names = tuple(f.name for f in ints)

    @property
    def full_name(self) -> str:
        return f"{self.system}:{self.name}"

    def decode(self, payload: bytes | memoryview) -> tuple[int, dict[str, Any]]:
        """``(common_pid, fields)`` of one record. A field beyond a short record is left out."""
        n = len(payload)
        pid = -1
        fast = self._all
        if fast is not None and fast.size <= n:
            vals = fast.unpack_from(payload)
            out: dict[str, Any] = dict(zip(self._names, vals, strict=False))
            if self._pid is not None:
                pid = out.pop("common_pid")
            if not self._others:
                return pid, out
            return pid, self._decode_others(payload, n, out)
        if self._pid is not None and self._pid[1] + self._pid[0].size <= n:
            pid = self._pid[0].unpack_from(payload, self._pid[1])[0]
        out = {}
        for name, st, off, end in self._ints:
            if end <= n:
                out[name] = st.unpack_from(payload, off)[0]
        return pid, self._decode_others(payload, n, out)

    def _decode_others(
        self, payload: bytes | memoryview, n: int, out: dict[str, Any]
    ) -> dict[str, Any]:
        for f in self._others:
            end = f.offset + f.size
            if end > n:
                continue
            if f.kind in ("data_loc", "rel_loc"):
                if f.size != 4:
                    out[f.name] = bytes(payload[f.offset : end])
                    continue
                loc = int.from_bytes(payload[f.offset : end], "little")
                start, length = loc & 0xFFFF, loc >> 16
                if f.kind == "rel_loc":
                    start += end
                data = payload[start : start + length]
                out[f.name] = _cstr(data) if "char" in f.type else bytes(data)
            elif f.kind == "str":
                out[f.name] = _cstr(payload[f.offset : end])
            else:
                out[f.name] = bytes(payload[f.offset : end])
        return out

    def __repr__(self) -> str:
        return f"EventFormat({self.full_name!r}, id={self.id}, {len(self.fields)} fields)"


def _int_struct(f: FieldFormat) -> struct.Struct:
    code = _INT_CODES[f.size]
    return struct.Struct("<" + (code.lower() if f.signed else code))


def parse_format(text: str, system: str = "") -> EventFormat:
    """Parse an ``events/SYSTEM/EVENT/format`` file (``name:``, ``ID:``, ``field:`` lines)."""
    name = re.search(r"^name:\s*(\S+)", text, re.M)
    ident = re.search(r"^ID:\s*(\d+)", text, re.M)
    if name is None or ident is None:
        raise ValueError("not an event format file: no 'name:' or 'ID:' line")
    fields = _fields(text)
    if not fields:
        raise ValueError(f"format of {name[1]}: no 'field:' line")
    return EventFormat(system, name[1], int(ident[1]), fields)


# -- ring-buffer pages ----------------------------------------------------------------------------

TYPE_DATA_MAX = 28  #: RINGBUF_TYPE_DATA_TYPE_LEN_MAX
TYPE_PADDING = 29  #: RINGBUF_TYPE_PADDING
TYPE_TIME_EXTEND = 30  #: RINGBUF_TYPE_TIME_EXTEND
TYPE_TIME_STAMP = 31  #: RINGBUF_TYPE_TIME_STAMP
TS_SHIFT = 27
RB_MISSED_EVENTS = 1 << 31
RB_MISSED_STORED = 1 << 30
COMMIT_MASK = (1 << 27) - 1  #: kbuffer-parse.c: the data size in ``commit``
TS_MSB = 0xF8 << 56  #: ring_buffer.c: the bits an absolute TIME_STAMP does not carry
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


@dataclass(frozen=True)
class PageLayout:
    """``events/header_page``: where a ring-buffer page keeps its time, size and data."""

    timestamp_offset: int = 0
    timestamp_size: int = 8
    commit_offset: int = 8
    commit_size: int = 8
    data_offset: int = 16
    data_size: int = 4080

    @property
    def page_size(self) -> int:
        return self.data_offset + self.data_size


DEFAULT_LAYOUT = PageLayout()


def parse_header_page(text: str) -> PageLayout:
    """Parse ``events/header_page`` (fields ``timestamp``, ``commit`` and ``data``)."""
    by_name = {f.name: f for f in _fields(text)}
    missing = [n for n in ("timestamp", "commit", "data") if n not in by_name]
    if missing:
        raise ValueError(f"header_page: no field {', '.join(missing)}")
    ts, commit, data = by_name["timestamp"], by_name["commit"], by_name["data"]
    for f in (ts, commit):
        if f.size not in (4, 8):
            raise ValueError(f"header_page: {f.name} has size {f.size}")
    return PageLayout(ts.offset, ts.size, commit.offset, commit.size, data.offset, data.size)


@dataclass
class Page:
    """What one ring-buffer page held."""

    timestamp: int  #: the page's base time
    records: list[tuple[int, bytes]] = field(default_factory=list)  #: (t_ns, payload)
    #: events the writer lost before this page: 0 none, -1 some (count not stored), else the count
    missed: int = 0
    #: why parsing stopped before the page's committed end (a page cut short), else None
    stopped: str | None = None


def _fix_abs_ts(abs_ts: int, cur: int) -> int:
    """ring_buffer.c ``rb_fix_abs_ts``: restore the top bits an absolute stamp lost."""
    if cur & TS_MSB:
        abs_ts |= cur & TS_MSB
        if abs_ts < cur:
            abs_ts += 1 << 59
    return abs_ts


def _stop(p: Page, why: str) -> None:
    p.stopped = f"{p.stopped}; {why}" if p.stopped else why


def parse_page(page: bytes | memoryview, layout: PageLayout = DEFAULT_LAYOUT) -> Page:
    """Parse one page of ``trace_pipe_raw``. Never raises on bad data: a page cut short or a
    record running past the end stops the parse and says where in ``Page.stopped``."""
    mv = page if isinstance(page, bytes) else bytes(page)
    n = len(mv)
    head = max(
        layout.timestamp_offset + layout.timestamp_size, layout.commit_offset + layout.commit_size
    )
    if n < head:
        return Page(0, stopped=f"page is {n} bytes, shorter than its {head}-byte header")
    ts = int.from_bytes(
        mv[layout.timestamp_offset : layout.timestamp_offset + layout.timestamp_size], "little"
    )
    commit = int.from_bytes(
        mv[layout.commit_offset : layout.commit_offset + layout.commit_size], "little"
    )
    size = commit & COMMIT_MASK
    out = Page(ts)
    pos = layout.data_offset
    end = pos + size
    if commit & RB_MISSED_EVENTS:
        out.missed = -1
        if commit & RB_MISSED_STORED and end + layout.commit_size <= n:
            out.missed = int.from_bytes(mv[end : end + layout.commit_size], "little")
    if size > layout.data_size:
        out.stopped = f"commit says {size} bytes of data, a page holds {layout.data_size}"
        end = layout.page_size
    if end > n:
        out.stopped = f"page cut short: {n} bytes, its data ends at {end}"
        end = n
    records = out.records
    unpack = _U32.unpack_from
    while pos + 4 <= end:
        (hdr,) = unpack(mv, pos)
        type_len = hdr & 0x1F
        delta = hdr >> 5
        if type_len == 0 or type_len > TYPE_DATA_MAX:
            if pos + 8 > end:
                _stop(out, f"record at offset {pos} cut short (header only)")
                break
            (arg,) = unpack(mv, pos + 4)
        if 0 < type_len <= TYPE_DATA_MAX:
            start, length = pos + 4, type_len * 4
        elif type_len == 0:
            start, length = pos + 8, (arg - 4 + 3) & ~3
            if arg < 4:
                _stop(out, f"record at offset {pos}: length word {arg} < 4")
                break
        elif type_len == TYPE_PADDING:
            if delta == 0:  # a null event: nothing more on this page
                break
            ts += delta  # a discarded record: its time still counts (kbuffer-parse.c)
            pos += 4 + arg
            continue
        elif type_len == TYPE_TIME_EXTEND:
            ts += (arg << TS_SHIFT) + delta
            pos += 8
            continue
        else:  # TYPE_TIME_STAMP
            ts = _fix_abs_ts((arg << TS_SHIFT) + delta, ts)
            pos += 8
            continue
        if start + length > end:
            _stop(out, f"record at offset {pos} runs to {start + length}, past the end at {end}")
            break
        ts += delta
        records.append((ts, bytes(mv[start : start + length])))
        pos = start + length
    return out


# -- decoding -------------------------------------------------------------------------------------


class Decoder:
    """Turns ring-buffer records into `KernelEvent` by their ``common_type`` and format file."""

    def __init__(self, formats: Iterable[EventFormat]) -> None:
        self.formats: dict[int, EventFormat] = {f.id: f for f in formats}

    def decode(self, cpu: int, t_ns: int, payload: bytes) -> KernelEvent:
        type_id = _U16.unpack_from(payload)[0] if len(payload) >= 2 else -1
        fmt = self.formats.get(type_id)
        if fmt is None:
            pid = int.from_bytes(payload[4:8], "little", signed=True) if len(payload) >= 8 else -1
            return KernelEvent(t_ns, cpu, pid, "", f"type-{type_id}", {"raw": payload})
        pid, fields = fmt.decode(payload)
        return KernelEvent(t_ns, cpu, pid, fmt.system, fmt.name, fields)


# -- finding tracefs and saying what is missing ----------------------------------------------------


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


# -- the session ----------------------------------------------------------------------------------

_instance_counter = itertools.count()


class TracefsSession:
    """A private tracefs instance tracing kvm events of this process's threads.

    ``with TracefsSession() as s: ...run...`` then ``s.events`` (time-ordered `KernelEvent`), or
    ``start()``/``stop()``. ``stop`` (also on every exit path of the ``with``) stops tracing,
    reads every page, disables the events and removes the instance. ``drain()`` empties the
    buffers while tracing (or ``drain_interval`` > 0 does it from a thread), for runs that would
    overflow ``buffer_size_kb`` per CPU; ``lost`` counts what the kernel dropped anyway.
    """

    def __init__(
        self,
        events: Sequence[str] = DEFAULT_EVENTS,
        instance: str | None = None,
        *,
        root: str | None = None,
        buffer_size_kb: int = 4096,
        pids: Sequence[int] | None = None,
        follow_forks: bool = True,
        clock: str = "mono",
        strict: bool = False,
        drain_interval: float = 0.0,
        subbuf_size_kb: int | None = None,
    ) -> None:
        self.requested = tuple(events)
        self.name = instance or f"{INSTANCE_PREFIX}{os.getpid()}-{next(_instance_counter)}"
        self._root = root
        self.buffer_size_kb = buffer_size_kb
        self.pids = pids  #: None: every thread of this process
        self.follow_forks = follow_forks
        self.clock = clock
        self.strict = strict
        self.drain_interval = drain_interval
        self.subbuf_size_kb = subbuf_size_kb  #: ring-buffer page size (None: the kernel's)
        self.path = ""
        self.layout = DEFAULT_LAYOUT
        self.decoder = Decoder(())
        self.enabled: list[str] = []  #: "system:event" actually traced
        self.skipped: dict[str, str] = {}  #: requested but not traced -> why
        self.lost = 0  #: events the kernel dropped (per_cpu stats: overrun + dropped events)
        self.pid_filtered = False
        #: what the pages said went wrong (lost events, a page cut short), for the report
        self.notes: list[str] = []
        self._pages: dict[int, list[bytes]] = {}
        self._events: list[KernelEvent] | None = None
        self._lock = threading.Lock()
        self._stop_drain = threading.Event()
        self._drainer: threading.Thread | None = None
        self.started = False

    # -- files
    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def _write(self, rel: str, value: str) -> None:
        try:
            with open(self._p(rel), "w", encoding="ascii") as f:
                f.write(value)
        except OSError as e:
            raise TracefsError(
                e.errno or errno.EIO,
                f"tracefs: writing {value!r} to {self._p(rel)}: "
                f"{os.strerror(e.errno or errno.EIO)}",
            ) from None

    def _read(self, rel: str) -> str:
        with open(self._p(rel), encoding="utf-8", errors="replace") as f:
            return f.read()

    # -- life cycle
    def start(self) -> TracefsSession:
        if self.started:
            raise TracefsError(errno.EBUSY, f"tracefs session {self.name} already started")
        root = self._root or find_tracefs()
        if root is None:
            raise TracefsError(errno.ENOENT, tracefs_status(self.requested)[1])
        path = os.path.join(root, "instances", self.name)
        try:
            os.mkdir(path)
        except OSError as e:
            why = os.strerror(e.errno or errno.EIO)
            hint = (
                tracefs_status(self.requested)[1] if e.errno in (errno.EACCES, errno.EPERM) else ""
            )
            raise TracefsError(
                e.errno or errno.EIO,
                f"tracefs: creating instance {path}: {why}" + (f" ({hint})" if hint else ""),
            ) from None
        self.path = path
        self.started = True
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def _setup(self) -> None:
        if self.subbuf_size_kb is not None:  # before header_page, which follows it
            self._write("buffer_subbuf_size_kb", str(self.subbuf_size_kb))
        header = self._p("events", "header_page")
        if os.path.exists(header):
            self.layout = parse_header_page(self._read("events/header_page"))
        self._write("tracing_on", "0")
        self._write("trace_clock", self.clock)
        self._write("buffer_size_kb", str(self.buffer_size_kb))
        if os.path.exists(self._p("options", "overwrite")):
            self._write("options/overwrite", "0")
        if os.path.exists(self._p("set_event_pid")):
            tids = self.pids if self.pids is not None else _threads(os.getpid())
            self._write("set_event_pid", " ".join(str(t) for t in tids))
            if self.follow_forks and os.path.exists(self._p("options", "event-fork")):
                self._write("options/event-fork", "1")
            self.pid_filtered = True
        formats = []
        for ev in self.requested:
            system, _, name = ev.partition(":")
            d = self._p("events", system, name)
            if not name or not os.path.isdir(d):
                self.skipped[ev] = "no such event on this kernel"
                continue
            try:
                fmt = parse_format(self._read(f"events/{system}/{name}/format"), system)
            except (OSError, ValueError) as e:
                self.skipped[ev] = f"format unreadable: {e}"
                continue
            formats.append(fmt)
        if self.strict and self.skipped:
            raise TracefsError(errno.ENOENT, f"tracefs: events not available: {self.skipped}")
        if not formats:
            raise TracefsError(
                errno.ENOENT, f"tracefs: none of the events exists: {sorted(self.skipped)}"
            )
        for fmt in formats:
            self._write(f"events/{fmt.system}/{fmt.name}/enable", "1")
            self.enabled.append(fmt.full_name)
        self.decoder = Decoder(formats)
        self._pages = {cpu: [] for cpu in self._cpus()}
        self._write("tracing_on", "1")
        if self.drain_interval > 0:
            self._drainer = threading.Thread(
                target=self._drain_loop, name="tracefs-drain", daemon=True
            )
            self._drainer.start()

    def _cpus(self) -> list[int]:
        names = os.listdir(self._p("per_cpu"))
        return sorted(int(n[3:]) for n in names if n.startswith("cpu") and n[3:].isdigit())

    def _drain_loop(self) -> None:
        while not self._stop_drain.wait(self.drain_interval):
            try:
                self.drain()
            except OSError:
                return

    def drain(self) -> int:
        """Move what the kernel's buffers hold (whole pages, and the events of the page being
        written) into this session; return how many pages were read."""
        got = 0
        with self._lock:
            for cpu, pages in self._pages.items():
                fd = os.open(
                    self._p("per_cpu", f"cpu{cpu}", "trace_pipe_raw"), os.O_RDONLY | os.O_NONBLOCK
                )
                try:
                    while True:
                        try:
                            data = os.read(fd, self.layout.page_size)
                        except BlockingIOError:
                            break
                        if not data:
                            break
                        pages.append(data)
                        got += 1
                finally:
                    os.close(fd)
        return got

    def stop(self) -> list[KernelEvent]:
        """Stop tracing, read everything, remove the instance; the events, in time order."""
        if self._events is not None:
            return self._events
        if not self.started:
            raise TracefsError(errno.EINVAL, f"tracefs session {self.name} was never started")
        try:
            self._write("tracing_on", "0")
            self._stop_drainer()
            self.drain()
            self.lost = self._lost()
        finally:
            self._teardown()
        streams = [self._decode_cpu(cpu, pages) for cpu, pages in self._pages.items()]
        self._pages = {}
        self._events = list(heapq.merge(*streams, key=lambda e: e.t_ns))
        return self._events

    def _decode_cpu(self, cpu: int, pages: list[bytes]) -> list[KernelEvent]:
        out: list[KernelEvent] = []
        decode = self.decoder.decode
        for i, raw in enumerate(pages):
            page = parse_page(raw, self.layout)
            if page.missed:
                self.notes.append(
                    f"cpu{cpu} page {i}: events lost before it"
                    + (f" ({page.missed})" if page.missed > 0 else "")
                )
            if page.stopped:
                self.notes.append(f"cpu{cpu} page {i}: {page.stopped}")
            out.extend(decode(cpu, t, payload) for t, payload in page.records)
        return out

    def _stop_drainer(self) -> None:
        self._stop_drain.set()
        if self._drainer is not None:
            self._drainer.join()
            self._drainer = None

    def _lost(self) -> int:
        total = 0
        for cpu in self._pages:
            try:
                text = self._read(f"per_cpu/cpu{cpu}/stats")
            except OSError:
                continue
            for key in ("overrun", "dropped events"):
                m = re.search(rf"^{key}:\s*(\d+)", text, re.M)
                if m:
                    total += int(m[1])
        return total

    def _teardown(self) -> None:
        """Disable everything and remove the instance; every step tried, first error raised."""
        if not self.path:
            return
        self._stop_drainer()
        first: OSError | None = None
        for rel, value in (("tracing_on", "0"), ("events/enable", "0"), ("set_event_pid", "")):
            try:
                if os.path.exists(self._p(rel)):
                    self._write(rel, value)
            except OSError as e:
                first = first or e
        try:
            os.rmdir(self.path)
        except OSError as e:
            first = first or TracefsError(
                e.errno or errno.EIO,
                f"tracefs: removing instance {self.path}: {os.strerror(e.errno or 0)}",
            )
        else:
            self.path = ""
        if first is not None:
            raise first

    @property
    def events(self) -> list[KernelEvent]:
        if self._events is None:
            raise TracefsError(errno.EINVAL, "tracefs session not stopped yet")
        return self._events

    def __iter__(self) -> Iterator[KernelEvent]:
        return iter(self.events)

    def __enter__(self) -> TracefsSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.started and self._events is None:
            if exc[0] is None:
                self.stop()
            else:  # keep the original exception; still remove the instance
                try:
                    self.stop()
                except OSError:
                    pass


def _threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return [pid]


# -- joining a recorded stream --------------------------------------------------------------------


def _key(ev: Call | Fault | Contents) -> int | None:
    if isinstance(ev, Call):
        return ev.t_ns
    if isinstance(ev, Fault):
        return ev.observed_ns
    return None  # Contents: stays right after the call it belongs to


def merge(
    events: Iterable[Call | Fault | Contents], kevents: Iterable[KernelEvent]
) -> Iterator[Call | Fault | Contents | KernelEvent]:
    """Interleave time-ordered kernel events into a recorded stream, keeping its order.

    Each recorded event's time is ``Call.t_ns`` (when the call was entered) or
    ``Fault.observed_ns``, made non-decreasing along the stream (the recorder writes calls in
    completion order); a `KernelEvent` goes just before the first recorded event whose time is
    later than its own, so what the kernel did inside a call follows that call's record. Lazy on
    both sides (bounded memory); ``kevents`` must be sorted by ``t_ns`` (as a session gives them).
    """
    kit = iter(kevents)
    pending = next(kit, None)
    high = -(1 << 63)
    for ev in events:
        k = _key(ev)
        if k is not None:
            high = max(high, k)
            while pending is not None and pending.t_ns < high:
                yield pending
                pending = next(kit, None)
        yield ev
    if pending is not None:
        yield pending
        yield from kit


# -- a side file for the kernel events of a capture ------------------------------------------------

KEVENTS_MAGIC = b"FKVMKEV1"
_LEN = struct.Struct("<I")


def save_kevents(path: str | os.PathLike[str], kevents: Iterable[KernelEvent]) -> int:
    """Write kernel events next to a trace (``FILE.kevents``: magic, then length-prefixed
    msgpack `KernelEvent` records); return how many. The trace chunks do not hold them yet."""
    enc = msgspec.msgpack.Encoder()
    n = 0
    with open(path, "wb") as f:
        f.write(KEVENTS_MAGIC)
        for ev in kevents:
            b = enc.encode(ev)
            f.write(_LEN.pack(len(b)) + b)
            n += 1
    return n


def load_kevents(path: str | os.PathLike[str]) -> Iterator[KernelEvent]:
    """Read a `save_kevents` file as a stream; a record cut short raises ValueError naming
    its byte offset."""
    dec = msgspec.msgpack.Decoder(KernelEvent)
    with open(path, "rb") as f:
        if f.read(len(KEVENTS_MAGIC)) != KEVENTS_MAGIC:
            raise ValueError(f"{path}: offset 0: not a fakekvm kernel-event file")
        off = len(KEVENTS_MAGIC)
        while head := f.read(4):
            want = _LEN.unpack(head)[0] if len(head) == 4 else -1
            body = f.read(want) if want >= 0 else b""
            if len(body) != want:
                raise ValueError(f"{path}: offset {off}: record cut short")
            try:
                yield dec.decode(body)
            except msgspec.DecodeError as e:
                raise ValueError(f"{path}: offset {off}: {e}") from None
            off += 4 + len(body)
