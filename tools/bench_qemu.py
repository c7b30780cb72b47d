"""``fakekvm bench --qemu``: QEMU's post-copy and fakekvm's engine side by side, on this host.

The QEMU side runs Debian's ``qemu-system-x86_64`` (7.2 here) with KVM twice on
localhost -- a source booting ``fakekvm/guests/mb_toucher.bin`` (a multiboot
kernel: it fills RAM, waits, then touches every page above 2 MiB at CPL3 in the
workload's order, timing each touch with ``rdtsc``) and a destination started
with ``-incoming defer`` -- and drives both over QMP (docs/interop/qmp-spec.rst;
the commands and the ``query-migrate`` fields are QEMU's qapi/migration.json):
capabilities ``postcopy-ram`` + ``postcopy-preempt`` (+ ``postcopy-blocktime``
on the destination, ``events`` on both), ``migrate``, at once
``migrate-start-postcopy``, and the ``MIGRATION`` events until ``completed``.

The guest only starts touching once it runs on the destination: it spins
reading port 0xe9, and QEMU's isa-debugcon answers reads with its ``readback``
property, which only the destination's device sets to the guest's go value.
That mirrors fakekvm's engine, whose workload starts when the destination
resumes the vCPU.

Demand-fault latency for QEMU is measured *in the guest*: every touch is timed
with ``lfence; rdtsc`` before and after the store and counted in a
quarter-octave histogram of cycles, reported through the debugcon port; cycles
become microseconds with the TSC rate measured here on the host (the guest's
TSC ticks at the host's rate under KVM without TSC scaling). Touches slower
than ``--fault-threshold-us`` (3 µs) count as remote faults, and p50/p99 are
over those. ``--calibrate`` checks the threshold: a *pre-copy* migration of
the same guest, where every page is local when touched, gave 284 of 130,560
touches over 3 µs (interrupts and host preemption on a loaded host: the noise
floor), the rest 0.05-0.8 µs; post-copy adds ~16,000 touches of 7-30 µs (a
page missing when touched, placed moments later by the background stream, so
QEMU sends no request for most of them) and a tail of requested pages from
0.1 to 30 ms. Each figure includes the whole round trip (guest exit,
userfaultfd, request, transfer, UFFDIO_COPY, wake, re-entry), so it is an upper
bound next to the engine's own figure (fault observed -> vCPU may continue).
The quarter-octave buckets give each percentile to within +-12 %.
``postcopy-blocktime`` (destination, per vCPU) is reported as "vCPU blocked".

Background push rate for QEMU: pages sent after the switch to post-copy
(``ram.postcopy-bytes`` / page size) minus ``postcopy-requests``, over the time
from the ``postcopy-active`` event to ``completed`` (QEMU timestamps events).

fakekvm's side is :func:`postcopy.migrate.migrate` with ``kernel="real"``,
``mechanism="uffd-missing"``, the same memory size, one vCPU and the same
workload and seed (its toucher reads each page; the QEMU guest writes it: both
are MISSING faults resolved by UFFDIO_COPY).

``-cpu host`` fails on this kvm-pvm host ("failed to set MSR 0x10a", the
ARCH_CAPABILITIES MSR), so the default is ``host,-arch-capabilities``.

Every QEMU process is started in its own session with ``PR_SET_PDEATHSIG``
(SIGKILL) so it cannot outlive this process, and is quit over QMP, then
terminated, then killed, on every exit path.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
GUEST = Path(__file__).resolve().parent.parent / "fakekvm" / "guests" / "mb_toucher.bin"
PAGE = 4096
GO = 0x47  # the guest's go value (mb_toucher.S)
DATA_BASE = 0x200000
WORKLOAD_CODES = {"idle": "i", "sequential": "s", "random": "r"}
DEFAULT_CPU = "host,-arch-capabilities"  # -cpu host alone: "failed to set MSR 0x10a" on kvm-pvm


class QemuError(RuntimeError):
    """QEMU is missing, died, timed out, or answered an error."""


class QMPError(QemuError):
    """A QMP command answered ``{"error": ...}``."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"QMP {command}: {self.error_class}: {self.desc}")


# -- QMP -------------------------------------------------------------------------------------------


class QMP:
    """A QMP client over a Unix socket: greeting, ``qmp_capabilities``, commands, events.

    One JSON object a line each way (qmp-spec.rst §2). Replies carry the ``id``
    we sent; asynchronous events arriving in between are kept in
    :attr:`events` (each with QEMU's ``timestamp``) for :meth:`wait_event`.
    """

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._next_id = 0
        sock.settimeout(timeout)
        greeting = self._read()
        if "QMP" not in greeting:
            raise QemuError(f"not a QMP greeting: {greeting!r}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities")

    @classmethod
    def connect(
        cls, path: str, timeout: float = 10.0, alive: Callable[[], bool] | None = None
    ) -> QMP:
        """Connect to ``path``, retrying while the socket does not exist yet."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return cls(s, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if alive is not None and not alive():
                    raise QemuError(f"QEMU exited before its QMP socket {path} opened") from None
                if time.monotonic() > deadline:
                    raise QemuError(f"no QMP socket at {path} after {timeout} s") from None
                time.sleep(0.01)
            except BaseException:
                s.close()
                raise

    def _read(self, timeout: float | None = None) -> dict[str, Any]:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QemuError("QMP: no answer in time") from None
            except OSError as e:
                raise QemuError(f"QMP: connection closed by QEMU ({e})") from None
            if not chunk:
                raise QemuError("QMP: connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QemuError(f"QMP: bad JSON {line[:200]!r}: {e}") from None
        if not isinstance(msg, dict):
            raise QemuError(f"QMP: not an object: {line[:200]!r}")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value, or :class:`QMPError`."""
        self._next_id += 1
        ident = f"fk{self._next_id}"
        req: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            req["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise QemuError(f"QMP: connection closed by QEMU ({e})") from None
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != ident:
                continue  # a reply to a command we gave up on
            if "error" in msg:
                raise QMPError(command, msg["error"])
            return msg.get("return")

    def wait_event(
        self,
        name: str,
        pred: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """The first event ``name`` (already received or yet to come) that ``pred`` accepts."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if ev["event"] == name and pred(ev.get("data", {})):
                    return ev
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"QMP: no {name} event in {timeout} s")
            msg = self._read(timeout=left)
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


def event_time(ev: dict[str, Any]) -> float:
    """An event's QEMU timestamp in seconds."""
    ts = ev.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


# -- QEMU processes ----------------------------------------------------------------------------------


def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise QemuError(f"{QEMU} not found on PATH (Debian: apt-get install qemu-system-x86)")
    return path


def _pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class QemuProcess:
    """One QEMU: its process, QMP socket and debugcon log; :meth:`close` kills it whatever happens."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.qmp_path = str(workdir / f"{name}.qmp")
        self.log_path = workdir / f"{name}.debugcon"
        self.err_path = workdir / f"{name}.stderr"
        self.argv = [
            *argv,
            "-chardev", f"file,id=dbg,path={self.log_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        self.qmp: QMP | None = None
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                preexec_fn=_pdeathsig,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def died(self) -> QemuError:
        return QemuError(
            f"{self.name} QEMU exited with {self.proc.returncode}: {self.stderr() or '(no output)'}"
        )

    def connect(self, timeout: float = 10.0) -> QMP:
        try:
            self.qmp = QMP.connect(self.qmp_path, timeout, self.alive)
        except QemuError:
            try:  # QEMU opens its QMP socket before it checks all its options
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                raise
            raise self.died() from None
        return self.qmp

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, marker: str, timeout: float) -> str:
        """Poll the debugcon log until a complete line starting with ``marker`` appears
        (the guest writes a byte per exit: a line is complete at its newline)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if any(line.startswith(marker) for line in text.split("\n")[:-1]):
                return text
            if not self.alive():
                raise self.died()
            if time.monotonic() > deadline:
                raise QemuError(
                    f"{self.name}: no {marker!r} from the guest in {timeout} s (log: {text!r})"
                )
            time.sleep(0.002)

    def close(self) -> None:
        """``quit`` over QMP, else SIGTERM, else SIGKILL; always reaps the process."""
        quitting = False
        if self.alive() and self.qmp is not None:
            try:
                self.qmp.execute("quit")
                quitting = True
            except (QemuError, OSError):
                pass
        if self.qmp is not None:
            self.qmp.close()
        try:
            self.proc.wait(5 if quitting else 0)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def qemu_argv(
    qemu: str,
    mem: int,
    workload: str,
    seed: int,
    *,
    cpu: str,
    destination: bool,
    guest: Path = GUEST,
) -> list[str]:
    readback = f",readback={GO:#x}" if destination else ""
    argv = [
        qemu, "-nodefaults", "-display", "none", "-enable-kvm", "-cpu", cpu, "-smp", "1",
        "-m", f"{mem >> 20}M",
        # the guest ends with a triple fault: the vCPU stops, QEMU (and the migration) go on
        "-action", "reboot=shutdown,shutdown=pause",
        "-kernel", str(guest), "-append", f"@{WORKLOAD_CODES[workload]}{seed}",
        "-device", f"isa-debugcon,iobase=0xe9,chardev=dbg{readback}",
    ]  # fmt: skip
    if destination:
        argv += ["-incoming", "defer"]
    return argv


@contextmanager
def qemu_pair(
    mem: int, workload: str, seed: int, *, cpu: str = DEFAULT_CPU, guest: Path = GUEST
) -> Iterator[tuple[QemuProcess, QemuProcess]]:
    """A source and a destination QEMU in a temporary directory; both killed on exit."""
    qemu = find_qemu()
    if not guest.is_file():
        raise QemuError(f"guest {guest} missing: run python tools/build_guests.py")
    procs: list[QemuProcess] = []
    with tempfile.TemporaryDirectory(prefix="fakekvm-qemu-") as tmp:
        try:
            for name, dest in (("source", False), ("destination", True)):
                argv = qemu_argv(qemu, mem, workload, seed, cpu=cpu, destination=dest, guest=guest)
                procs.append(QemuProcess(name, argv, Path(tmp)))
            yield procs[0], procs[1]
        finally:
            for p in procs:
                p.close()


# -- the guest's report -----------------------------------------------------------------------------


@dataclass
class GuestReport:
    """What mb_toucher printed on the destination: the touch histogram (cycles) and the totals."""

    mem_end: int
    touches: int
    total: int
    hist: dict[int, int]

    def check(self, workload: str, seed: int) -> None:
        """Raise :class:`QemuError` unless the guest touched every data page once, as predicted."""
        want = expected_touches(self.mem_end, workload, seed)
        if (self.touches, self.total) != want:
            raise QemuError(
                f"guest reported {self.touches} touches, sum {self.total:#x}; "
                f"expected {want[0]}, {want[1]:#x} ({workload}, seed {seed}, mem_end {self.mem_end:#x})"
            )


def parse_guest_log(text: str) -> GuestReport | None:
    """The ``G``/``H``/``D`` lines of the destination's debugcon log; None before ``D``."""
    hist: dict[int, int] = {}
    mem_end = 0
    for line in text.splitlines():
        parts = line.split()
        try:
            if len(parts) == 2 and parts[0] == "G":
                mem_end = int(parts[1], 16)
            elif len(parts) == 3 and parts[0] == "H":
                hist[int(parts[1], 16)] = int(parts[2], 16)
            elif len(parts) == 3 and parts[0] == "D":
                return GuestReport(mem_end, int(parts[1], 16), int(parts[2], 16), hist)
        except ValueError:
            raise QemuError(f"garbled guest line {line!r}") from None
    return None


def bucket_bounds(idx: int) -> tuple[int, int]:
    """Cycle range [lo, hi) of histogram bucket ``idx`` (mb_toucher.S's quarter octaves)."""
    if idx < 4:
        return idx, idx + 1
    if idx < 8:
        raise ValueError(f"bucket {idx} is never used")
    b, q = divmod(idx, 4)
    return (4 + q) << (b - 2), (5 + q) << (b - 2)


def expected_touches(mem_end: int, workload: str, seed: int) -> tuple[int, int]:
    """(touches, sum) the guest must report: every page of [2 MiB, mem_end) once, value
    (seed << 32) | i. (mem_end is what the BIOS e820 leaves: 128 KiB under -m here.)"""
    if workload == "idle":
        return 0, 0
    n = (mem_end - DATA_BASE) // PAGE
    return n, ((seed << 32) * n + n * (n - 1) // 2) & (2**64 - 1)


@dataclass
class LatencySummary:
    faults: int
    p50_us: float
    p99_us: float
    max_us: float


def remote_fault_latency(
    hist: dict[int, int], tsc_hz: float, threshold_us: float, slowest: int | None = None
) -> LatencySummary:
    """Touches slower than ``threshold_us`` -- or, with ``slowest``, the ``slowest`` slowest
    touches -- : count and nearest-rank p50/p99 (bucket geometric mids)."""
    rows = []
    for idx, count in sorted(hist.items()):
        lo, hi = bucket_bounds(idx)
        mid_us = (lo * hi) ** 0.5 / tsc_hz * 1e6
        if slowest is not None or lo / tsc_hz * 1e6 >= threshold_us:
            rows.append((mid_us, hi / tsc_hz * 1e6, count))
    if slowest is not None:
        drop = max(0, sum(c for _, _, c in rows) - max(0, slowest))
        while rows and drop >= rows[0][2]:
            drop -= rows.pop(0)[2]
        if rows and drop:
            rows[0] = (rows[0][0], rows[0][1], rows[0][2] - drop)
    n = sum(c for _, _, c in rows)

    def pct(p: float) -> float:
        if n == 0:
            return 0.0
        rank = max(1, -(-int(p * n) // 100))
        acc = 0
        for mid, _, c in rows:
            acc += c
            if acc >= rank:
                return mid
        return rows[-1][0]

    return LatencySummary(n, pct(50), pct(99), rows[-1][1] if rows else 0.0)


_RDTSC = bytes.fromhex("0f3148c1e2204809d0c3")  # rdtsc; shl $32,%rdx; or %rdx,%rax; ret


def host_tsc_hz(seconds: float = 0.05) -> float:
    """The TSC rate, measured against ``time.perf_counter_ns`` (median of 5)."""
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        buf.write(_RDTSC)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
        rates = []
        for _ in range(5):
            c0, t0 = rdtsc(), time.perf_counter_ns()
            time.sleep(seconds)
            c1, t1 = rdtsc(), time.perf_counter_ns()
            rates.append((c1 - c0) / ((t1 - t0) / 1e9))
        del rdtsc
        return statistics.median(rates)
    finally:
        try:
            buf.close()
        except BufferError:
            pass


# -- one QEMU migration ---------------------------------------------------------------------------------


@dataclass
class QemuRun:
    workload: str
    total_ms: float
    downtime_ms: float
    setup_ms: float
    postcopy_ms: float
    postcopy_requests: int
    pages_postcopy: int
    background_pps: float
    blocktime_ms: float | None
    latency: LatencySummary
    #: the ``postcopy_requests`` slowest touches: an estimate of requested pages' latency
    requested: LatencySummary
    guest: GuestReport
    capabilities: list[str]
    ram: dict[str, Any] = field(default_factory=dict)


def _set_caps(qmp: QMP, caps: list[str]) -> list[str]:
    """Enable ``caps``; drops (and reports by omission) one QEMU refuses."""
    enabled = []
    for cap in caps:
        try:
            qmp.execute(
                "migrate-set-capabilities", capabilities=[{"capability": cap, "state": True}]
            )
            enabled.append(cap)
        except QMPError:
            if cap != "postcopy-preempt":
                raise
    return enabled


def _final_info(qmp: QMP, timeout: float = 5.0) -> dict[str, Any]:
    """``query-migrate`` once the totals are in: the ``completed`` event comes before the
    migration thread computes ``total-time`` (migration_calculate_complete), so poll."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate")
        if info.get("status") != "completed" or info.get("total-time", 0) > 0:
            return info
        if time.monotonic() > deadline:
            return info
        time.sleep(0.001)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_qemu_migration(
    mem: int,
    workload: str,
    seed: int = 7,
    *,
    cpu: str = DEFAULT_CPU,
    preempt: bool = True,
    postcopy: bool = True,
    precopy_bandwidth: int | None = None,
    boot_timeout: float = 120.0,
    migrate_timeout: float = 120.0,
    tsc_hz: float | None = None,
    threshold_us: float = 3.0,
    guest: Path = GUEST,
) -> QemuRun:
    """One QEMU post-copy migration of mb_toucher (see the module docstring).

    ``postcopy=False`` migrates by pre-copy alone (the calibration run).
    ``precopy_bandwidth`` caps ``max-bandwidth`` before the switch so that no page goes
    by pre-copy; off by default: most runs send none anyway (the switch is requested at
    once), and measured here the cap also slowed the post-copy phase of QEMU 7.2."""
    if workload not in WORKLOAD_CODES:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOAD_CODES)}")
    hz = tsc_hz or host_tsc_hz()
    with qemu_pair(mem, workload, seed, cpu=cpu, guest=guest) as (src, dst):
        try:
            return _migrate(
                src,
                dst,
                workload,
                seed,
                preempt,
                postcopy,
                boot_timeout,
                migrate_timeout,
                hz,
                threshold_us,
                precopy_bandwidth,
            )
        except QemuError as e:
            dead = [p for p in (src, dst) if not p.alive()]
            if dead and "exited with" not in str(e):
                raise QemuError(f"{e}; {dead[0].died()}") from e
            raise


def _migrate(  # the body of run_qemu_migration, inside its qemu_pair
    src: QemuProcess,
    dst: QemuProcess,
    workload: str,
    seed: int,
    preempt: bool,
    postcopy: bool,
    boot_timeout: float,
    migrate_timeout: float,
    hz: float,
    threshold_us: float,
    precopy_bandwidth: int | None,
) -> QemuRun:
    sq, dq = src.connect(), dst.connect()
    src.wait_log("F", boot_timeout)  # booted, RAM filled, spinning
    want = ["events"]
    if postcopy:
        want += ["postcopy-ram", "postcopy-preempt"] if preempt else ["postcopy-ram"]
    caps = _set_caps(sq, want)
    _set_caps(dq, [*caps, "postcopy-blocktime"] if postcopy else caps)
    port = _free_port()
    dq.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    if postcopy and precopy_bandwidth is not None:  # bytes/s before the switch; after: unlimited
        sq.execute("migrate-set-parameters", **{"max-bandwidth": precopy_bandwidth})
    sq.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + 10
    while postcopy:
        try:
            sq.execute("migrate-start-postcopy")
            break
        except QMPError as e:  # "Postcopy must be started after migration has been started"
            if time.monotonic() > deadline or not src.alive():
                raise QemuError(f"migrate-start-postcopy refused: {e.desc}") from None
            time.sleep(0.001)

    def final(d: dict[str, Any]) -> bool:
        return d.get("status") in ("completed", "failed", "cancelled")

    end = sq.wait_event("MIGRATION", final, migrate_timeout)
    info = _final_info(sq)
    if end["data"]["status"] != "completed":
        raise QemuError(f"migration {end['data']['status']}: {info.get('error-desc', info)}")
    text = dst.wait_log("D", 60)
    report = parse_guest_log(text)
    if report is None:
        raise QemuError(f"destination guest log has no final report: {text!r}")
    report.check(workload, seed)
    dinfo = dq.execute("query-migrate")
    pc = [
        e
        for e in sq.events
        if e["event"] == "MIGRATION" and e["data"].get("status") == "postcopy-active"
    ]
    postcopy_s = event_time(end) - event_time(pc[0]) if pc else 0.0
    ram = info.get("ram", {})
    requests = int(ram.get("postcopy-requests", 0))
    pages_pc = int(ram.get("postcopy-bytes", 0)) // PAGE
    bg = max(0, pages_pc - requests)
    return QemuRun(
        workload=workload,
        total_ms=float(info.get("total-time", 0)),
        downtime_ms=float(info.get("downtime", 0)),
        setup_ms=float(info.get("setup-time", 0)),
        postcopy_ms=postcopy_s * 1e3,
        postcopy_requests=requests,
        pages_postcopy=pages_pc,
        background_pps=bg / postcopy_s if postcopy_s > 0 else 0.0,
        blocktime_ms=float(dinfo["postcopy-blocktime"]) if "postcopy-blocktime" in dinfo else None,
        latency=remote_fault_latency(report.hist, hz, threshold_us),
        requested=remote_fault_latency(report.hist, hz, threshold_us, slowest=requests),
        guest=report,
        capabilities=caps,
        ram=ram,
    )


# -- fakekvm's engine, the same workload ---------------------------------------------------------


@dataclass
class EngineRun:
    workload: str
    total_ms: float
    downtime_ms: float
    p50_us: float
    p99_us: float
    background_pps: float
    faults: int
    requests: int
    blocked_ms: float
    raw: dict[str, Any] = field(default_factory=dict)


def run_engine_migration(mem: int, workload: str, seed: int = 7) -> EngineRun:
    """:func:`postcopy.migrate.migrate` on the real kernel, uffd-missing, one vCPU."""
    from postcopy.migrate import MigrateOptions, migrate

    o = MigrateOptions(
        kernel="real", mechanism="uffd-missing", mem_size=mem, vcpus=1, workload=workload, seed=seed
    )
    d = migrate(o).as_dict()
    return EngineRun(
        workload=workload,
        total_ms=d["total-time-ns"] / 1e6,
        downtime_ms=d["downtime-ns"] / 1e6,
        p50_us=d["latency-p50-ns"] / 1e3,
        p99_us=d["latency-p99-ns"] / 1e3,
        background_pps=float(d["background-rate-pps"]),
        faults=int(d["faults"]),
        requests=int(d["requests"]),
        blocked_ms=d["postcopy-vcpu-blocktime-ns"][0] / 1e6,
        raw={k: v for k, v in d.items() if k not in ("postcopy-latency-dist", "vcpu-reports")},
    )


# -- the table -----------------------------------------------------------------------------------------

#: (label, QemuRun getter, EngineRun getter, format, target for fakekvm)
ROWS: list[tuple[str, Callable[[QemuRun], float], Callable[[EngineRun], float], str, str]] = [
    ("total time (ms)", lambda q: q.total_ms, lambda e: e.total_ms, "{:,.1f}", "< 300 (idle)"),
    ("downtime (ms)", lambda q: q.downtime_ms, lambda e: e.downtime_ms, "{:,.2f}", ""),
    ("demand p50 (µs)", lambda q: q.latency.p50_us, lambda e: e.p50_us, "{:,.1f}", "< 100"),
    ("demand p99 (µs)", lambda q: q.latency.p99_us, lambda e: e.p99_us, "{:,.1f}", "< 1000"),
    # QEMU: the slowest N touches, N = postcopy-requests; the engine requests every fault
    ("requested p50 (µs)", lambda q: q.requested.p50_us, lambda e: e.p50_us, "{:,.1f}", ""),
    ("requested p99 (µs)", lambda q: q.requested.p99_us, lambda e: e.p99_us, "{:,.1f}", ""),
    (
        "background pages/s",
        lambda q: q.background_pps,
        lambda e: e.background_pps,
        "{:,.0f}",
        ">= 400,000",
    ),
    ("vCPU blocked (ms)", lambda q: q.blocktime_ms or 0.0, lambda e: e.blocked_ms, "{:,.1f}", ""),
    ("faults", lambda q: q.latency.faults, lambda e: e.faults, "{:,.0f}", ""),
    ("requests", lambda q: q.postcopy_requests, lambda e: e.requests, "{:,.0f}", ""),
]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(qemu: list[QemuRun], engine: list[EngineRun]) -> dict[str, dict[str, float]]:
    """Median of each row over the runs: {label: {"qemu": x, "fakekvm": y}}."""
    return {
        label: {"qemu": _median([fq(r) for r in qemu]), "fakekvm": _median([fe(r) for r in engine])}
        for label, fq, fe, _, _ in ROWS
    }


def format_table(workload: str, med: dict[str, dict[str, float]], runs: int) -> str:
    lines = [
        f"workload={workload} (median of {runs})",
        f"  {'':<20} {'QEMU 7.2':>14} {'fakekvm':>14}  target",
    ]
    for label, _, _, fmt, target in ROWS:
        if "(idle)" in target and workload != "idle":
            target = ""
        q, f = med[label]["qemu"], med[label]["fakekvm"]
        qs = "-" if q != q else fmt.format(q)
        fs = "-" if f != f else fmt.format(f)
        lines.append(f"  {label:<20} {qs:>14} {fs:>14}  {target}")
    return "\n".join(lines)


def run_bench(
    mem: int,
    workloads: list[str],
    repeat: int = 3,
    seed: int = 7,
    *,
    cpu: str = DEFAULT_CPU,
    threshold_us: float = 3.0,
    engine: bool = True,
    calibrate: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Both sides, ``repeat`` times each per workload, alternating QEMU and fakekvm. With
    ``calibrate``, first one QEMU *pre-copy* run per touching workload: every page is local
    when the guest touches it, so its touches over the threshold are the method's noise."""
    hz = host_tsc_hz()
    out: dict[str, Any] = {
        "mem": mem,
        "repeat": repeat,
        "seed": seed,
        "tsc-hz": hz,
        "fault-threshold-us": threshold_us,
        "loadavg-before": os.getloadavg(),
        "qemu": subprocess.run(
            [find_qemu(), "--version"], capture_output=True, text=True
        ).stdout.split("\n")[0],
        "workloads": {},
    }
    for w in workloads:
        qruns: list[QemuRun] = []
        eruns: list[EngineRun] = []
        noise: dict[str, Any] | None = None
        if calibrate and w != "idle":
            log(f"{w}: QEMU pre-copy calibration")
            c = run_qemu_migration(
                mem, w, seed, cpu=cpu, tsc_hz=hz, threshold_us=threshold_us, postcopy=False
            )
            noise = {"touches": c.guest.touches, **c.latency.__dict__}
        for i in range(repeat):
            log(f"{w} run {i + 1}/{repeat}: QEMU")
            qruns.append(
                run_qemu_migration(mem, w, seed, cpu=cpu, tsc_hz=hz, threshold_us=threshold_us)
            )
            if engine:
                log(f"{w} run {i + 1}/{repeat}: fakekvm")
                eruns.append(run_engine_migration(mem, w, seed))
        out["workloads"][w] = {
            "median": summarize(qruns, eruns),
            "calibration": noise,
            "qemu": [_qemu_dict(r) for r in qruns],
            "fakekvm": [r.__dict__ for r in eruns],
        }
    out["loadavg-after"] = os.getloadavg()
    return out


def _qemu_dict(r: QemuRun) -> dict[str, Any]:
    d = dict(r.__dict__)
    d["latency"] = r.latency.__dict__
    d["requested"] = r.requested.__dict__
    d["guest"] = {"mem_end": r.guest.mem_end, "touches": r.guest.touches, "hist": r.guest.hist}
    return d


def format_bench(res: dict[str, Any]) -> str:
    head = (
        f"fakekvm bench --qemu: {res['qemu']} vs fakekvm (real kernel, uffd-missing), "
        f"mem={res['mem'] >> 20}M, 1 vCPU, seed {res['seed']}\n"
        f"QEMU demand latency: in-guest rdtsc per touch, touches > {res['fault-threshold-us']} µs; "
        f"TSC {res['tsc-hz'] / 1e9:.3f} GHz; load average before {res['loadavg-before'][0]:.2f}"
    )
    body = []
    for w, v in res["workloads"].items():
        text = format_table(w, v["median"], res["repeat"])
        c = v.get("calibration")
        if c:
            text += (
                f"\n  QEMU pre-copy calibration (every page local): {c['faults']} of "
                f"{c['touches']} touches over the threshold (p50 {c['p50_us']:.1f} µs)"
            )
        body.append(text)
    return "\n\n".join([head, *body])


def _size(text: str) -> int:
    """``512M``, ``2G``, ``65536K`` (MiB multiples: QEMU's -m takes MiB here)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if t[-1:] in "KMG" else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 2G)") from None
    if n < (4 << 20) or n % (1 << 20):
        raise argparse.ArgumentTypeError(f"size {text!r}: a whole number of MiB, at least 4M")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mem", type=_size, default=512 << 20, help="guest memory (default 512M)")
    p.add_argument(
        "--workloads", default="idle,random", help="comma-separated: idle,sequential,random"
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cpu", default=DEFAULT_CPU, help=f"QEMU -cpu (default {DEFAULT_CPU})")
    p.add_argument("--fault-threshold-us", type=float, default=3.0)
    p.add_argument("--qemu-only", action="store_true", help="skip fakekvm's engine")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="one QEMU pre-copy run per workload: the latency method's noise floor",
    )
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOAD_CODES:
            print(f"unknown workload {w!r}; known: {', '.join(WORKLOAD_CODES)}", file=sys.stderr)
            return 2
    try:
        res = run_bench(
            args.mem,
            workloads,
            args.repeat,
            args.seed,
            cpu=args.cpu,
            threshold_us=args.fault_threshold_us,
            engine=not args.qemu_only,
            calibrate=args.calibrate,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except QemuError as e:
        print(f"fakekvm bench --qemu: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print(format_bench(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
