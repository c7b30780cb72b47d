"""``fakekvm doctor``: probe the host as a VMM would, and say what is there and what is missing.

Every probe goes through a `Kernel` (by default `RealKernel`) and through the
host's files (``/proc``, ``/sys``, ``/dev``), so tests can simulate other
hosts with pyfakefs (no ``/dev/kvm``, ``/dev/userfaultfd`` without permission,
``vm.unprivileged_userfaultfd`` 0 or 1, no hugepages) instead of mocking ``os``.

The report is data (`DoctorReport`, a msgspec struct): ``--json`` prints it as
is, the table printer only formats it. ``--require kvm,uffd,...`` turns unmet
needs into a non-zero exit; without it the doctor always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterator
from typing import Any

import msgspec

from fakekvm.abi import kvm, names, uffd
from fakekvm.abi import mman as m
from fakekvm.kernel import Kernel, RealKernel

# Highest capability number probed (upstream has reached ~249; leave room).
MAX_CAP = 300

REQUIREMENTS = ("kvm", "uffd", "dev-userfaultfd", "guest-memfd", "hugepages", "tracing")


class Cap(msgspec.Struct, frozen=True):
    number: int
    name: str
    system: int
    vm: int | None


class KvmFacts(msgspec.Struct):
    path: str
    present: bool
    mode: str | None = None
    api_version: int | None = None
    error: str | None = None
    caps: list[Cap] = []
    vm_types: list[str] = []
    guest_memfd_flags: int | None = None
    guest_memfd_flag_names: list[str] = []
    vcpu_mmap_size: int | None = None


class RegisterMode(msgspec.Struct, frozen=True):
    memory: str
    mode: str
    ok: bool
    ioctls: int | None
    ioctl_names: list[str]
    error: str | None


class UffdFacts(msgspec.Struct):
    syscall: bool
    syscall_error: str | None = None
    dev_present: bool = False
    dev_mode: str | None = None
    dev_usable: bool = False
    dev_error: str | None = None
    unprivileged_userfaultfd: int | None = None
    features: int | None = None
    feature_names: list[str] = []
    api_ioctls: int | None = None
    register_modes: list[RegisterMode] = []


class HugePagePool(msgspec.Struct, frozen=True):
    size_kib: int
    nr: int
    free: int


class TracingFacts(msgspec.Struct):
    path: str | None
    kvm_events: int
    note: str


class DoctorReport(msgspec.Struct):
    kernel_release: str
    running_as_root: bool
    kvm: KvmFacts
    uffd: UffdFacts
    hugepages: list[HugePagePool]
    tracing: TracingFacts
    unmet: list[str] = []


# -- helpers ------------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _describe(e: OSError) -> str:
    code = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{code} ({os.strerror(e.errno or 0)})"


def _mode(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    kind = "c" if stat.S_ISCHR(st.st_mode) else "-"
    return f"{kind}{stat.filemode(st.st_mode)[1:]} uid={st.st_uid} gid={st.st_gid}"


@contextlib.contextmanager
def _fd(kernel: Kernel, fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            kernel.close(fd)


# -- probes -------------------------------------------------------------------------


def probe_kvm(kernel: Kernel, path: str = "/dev/kvm") -> KvmFacts:
    facts = KvmFacts(path=path, present=os.path.exists(path), mode=_mode(path))
    if not facts.present:
        facts.error = f"{path} does not exist (no KVM module loaded, or not exposed to this machine)"
        return facts
    try:
        sys_fd = kernel.open(path, m.O_RDWR | m.O_CLOEXEC)
    except OSError as e:
        facts.error = f"cannot open {path}: {_describe(e)}"
        return facts
    with _fd(kernel, sys_fd):
        try:
            facts.api_version = kernel.ioctl(sys_fd, kvm.KVM_GET_API_VERSION)
        except OSError as e:
            facts.error = f"{path} does not answer KVM_GET_API_VERSION: {_describe(e)}"
            return facts
        if facts.api_version != kvm.KVM_API_VERSION:
            facts.error = (
                f"KVM_GET_API_VERSION returned {facts.api_version}, expected {kvm.KVM_API_VERSION}"
            )
            return facts
        with contextlib.suppress(OSError):
            facts.vcpu_mmap_size = kernel.ioctl(sys_fd, kvm.KVM_GET_VCPU_MMAP_SIZE)
        sys_caps = {}
        for cap in range(MAX_CAP + 1):
            try:
                sys_caps[cap] = kernel.ioctl(sys_fd, kvm.KVM_CHECK_EXTENSION, cap)
            except OSError:
                sys_caps[cap] = 0
        vm_caps: dict[int, int] = {}
        try:
            vm_fd = kernel.ioctl(sys_fd, kvm.KVM_CREATE_VM, kvm.KVM_X86_DEFAULT_VM)
        except OSError as e:
            facts.error = f"KVM_CREATE_VM(KVM_X86_DEFAULT_VM) failed: {_describe(e)}"
            vm_fd = -1
        if vm_fd >= 0:
            with _fd(kernel, vm_fd):
                if sys_caps.get(kvm.KVM_CAP_CHECK_EXTENSION_VM):
                    for cap in range(MAX_CAP + 1):
                        try:
                            vm_caps[cap] = kernel.ioctl(vm_fd, kvm.KVM_CHECK_EXTENSION, cap)
                        except OSError:
                            vm_caps[cap] = 0
        for cap in range(MAX_CAP + 1):
            name = names.describe("cap", cap)
            s, v = sys_caps.get(cap, 0), vm_caps.get(cap)
            if name.startswith("KVM_CAP_") or s or v:
                facts.caps.append(Cap(cap, name, s, v))
        types = sys_caps.get(kvm.KVM_CAP_VM_TYPES, 0)
        facts.vm_types = [names.describe("vm_type", bit) for bit in range(32) if types >> bit & 1]
        gmem = vm_caps.get(kvm.KVM_CAP_GUEST_MEMFD_FLAGS, sys_caps.get(kvm.KVM_CAP_GUEST_MEMFD_FLAGS))
        if sys_caps.get(kvm.KVM_CAP_GUEST_MEMFD):
            facts.guest_memfd_flags = gmem or 0
            facts.guest_memfd_flag_names = names.flag_names("gmem_flag", gmem or 0)
    return facts


def _uffd_api(kernel: Kernel, fd: int) -> tuple[int, int]:
    buf = bytearray(uffd.uffdio_api_fmt.pack(uffd.UFFD_API, 0, 0))
    kernel.ioctl(fd, uffd.UFFDIO_API, buf)
    _, features, ioctls = uffd.uffdio_api_fmt.unpack(buf)
    return features, ioctls


def _try_register(kernel: Kernel, fd: int, memory: str, mode: int) -> RegisterMode:
    mode_name = names.flag_names("uffdio_register_mode", mode)
    label = "|".join(n.removeprefix("UFFDIO_REGISTER_MODE_") for n in mode_name)
    length = m.PAGE_SIZE * 4
    mfd = -1
    try:
        if memory == "anon":
            mp = kernel.mmap(-1, length, m.PROT_READ | m.PROT_WRITE, m.MAP_PRIVATE | m.MAP_ANONYMOUS)
        else:
            mfd = kernel.memfd_create("fakekvm-doctor", m.MFD_CLOEXEC)
            kernel.ftruncate(mfd, length)
            mp = kernel.mmap(mfd, length, m.PROT_READ | m.PROT_WRITE, m.MAP_SHARED)
    except OSError as e:
        return RegisterMode(memory, label, False, None, [], f"mmap: {_describe(e)}")
    try:
        buf = bytearray(uffd.uffdio_register_fmt.pack(mp.address, length, mode, 0))
        try:
            kernel.ioctl(fd, uffd.UFFDIO_REGISTER, buf)
        except OSError as e:
            return RegisterMode(memory, label, False, None, [], _describe(e))
        ioctls = uffd.uffdio_register_fmt.unpack(buf)[3]
        unreg = bytearray(uffd.uffdio_range_fmt.pack(mp.address, length))
        kernel.ioctl(fd, uffd.UFFDIO_UNREGISTER, unreg)
        return RegisterMode(memory, label, True, ioctls, names.flag_names("uffd_ioctls", ioctls), None)
    finally:
        kernel.munmap(mp.address, length)
        if mfd >= 0:
            kernel.close(mfd)


def probe_uffd(kernel: Kernel, dev_path: str = "/dev/userfaultfd") -> UffdFacts:
    facts = UffdFacts(syscall=False)
    facts.unprivileged_userfaultfd = _read_int("/proc/sys/vm/unprivileged_userfaultfd")
    fd = -1
    try:
        fd = kernel.userfaultfd(m.O_CLOEXEC | m.O_NONBLOCK)
        facts.syscall = True
    except OSError as e:
        facts.syscall_error = _describe(e)
    facts.dev_present = os.path.exists(dev_path)
    facts.dev_mode = _mode(dev_path)
    if facts.dev_present:
        try:
            dev = kernel.open(dev_path, m.O_RDWR | m.O_CLOEXEC)
        except OSError as e:
            facts.dev_error = f"cannot open {dev_path}: {_describe(e)}"
        else:
            with _fd(kernel, dev):
                try:
                    dfd = kernel.ioctl(dev, uffd.USERFAULTFD_IOC_NEW, m.O_CLOEXEC | m.O_NONBLOCK)
                    facts.dev_usable = True
                    if fd < 0:
                        fd = dfd
                    else:
                        kernel.close(dfd)
                except OSError as e:
                    facts.dev_error = f"USERFAULTFD_IOC_NEW: {_describe(e)}"
    else:
        facts.dev_error = f"{dev_path} does not exist"
    if fd < 0:
        return facts
    with _fd(kernel, fd):
        try:
            facts.features, facts.api_ioctls = _uffd_api(kernel, fd)
        except OSError as e:
            facts.syscall_error = f"UFFDIO_API: {_describe(e)}"
            return facts
        facts.feature_names = names.flag_names("uffd_feature", facts.features)
    # Register modes per memory type, each on a fresh uffd (a registration holds the range).
    for memory, mode in (
        ("anon", uffd.UFFDIO_REGISTER_MODE_MISSING),
        ("anon", uffd.UFFDIO_REGISTER_MODE_MISSING | uffd.UFFDIO_REGISTER_MODE_WP),
        ("anon", uffd.UFFDIO_REGISTER_MODE_MINOR),
        ("shmem", uffd.UFFDIO_REGISTER_MODE_MISSING | uffd.UFFDIO_REGISTER_MODE_MINOR),
        ("shmem", uffd.UFFDIO_REGISTER_MODE_WP),
    ):
        try:
            rfd = kernel.userfaultfd(m.O_CLOEXEC | m.O_NONBLOCK)
        except OSError:
            break
        with _fd(kernel, rfd):
            try:
                _uffd_api(kernel, rfd)
            except OSError:
                break
            facts.register_modes.append(_try_register(kernel, rfd, memory, mode))
    return facts


def probe_hugepages(root: str = "/sys/kernel/mm/hugepages") -> list[HugePagePool]:
    pools = []
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    for entry in entries:
        if not entry.startswith("hugepages-") or not entry.endswith("kB"):
            continue
        size = int(entry[len("hugepages-") : -2])
        pools.append(
            HugePagePool(
                size,
                _read_int(f"{root}/{entry}/nr_hugepages") or 0,
                _read_int(f"{root}/{entry}/free_hugepages") or 0,
            )
        )
    return pools


def probe_tracing() -> TracingFacts:
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        events = f"{path}/events/kvm"
        if os.path.isdir(events):
            count = sum(1 for e in os.listdir(events) if os.path.isdir(f"{events}/{e}"))
            return TracingFacts(path, count, f"kvm tracepoints readable under {path}")
    note = (
        "no kvm tracepoints found: tracefs is not mounted "
        "(as root: mount -t tracefs nodev /sys/kernel/tracing)"
    )
    return TracingFacts(None, 0, note)


def probe(kernel: Kernel | None = None) -> DoctorReport:
    kernel = kernel or RealKernel()
    release = _read_text("/proc/sys/kernel/osrelease") or os.uname().release
    return DoctorReport(
        kernel_release=release,
        running_as_root=os.geteuid() == 0,
        kvm=probe_kvm(kernel),
        uffd=probe_uffd(kernel),
        hugepages=probe_hugepages(),
        tracing=probe_tracing(),
    )


def unmet(report: DoctorReport, required: list[str]) -> list[str]:
    """The subset of ``required`` this host does not meet, each with the reason."""
    out = []
    for need in required:
        if need == "kvm" and report.kvm.api_version != kvm.KVM_API_VERSION:
            out.append(f"kvm: {report.kvm.error or 'no KVM'}")
        elif need == "uffd" and report.uffd.features is None:
            out.append(f"uffd: {report.uffd.syscall_error or report.uffd.dev_error or 'unavailable'}")
        elif need == "dev-userfaultfd" and not report.uffd.dev_usable:
            out.append(f"dev-userfaultfd: {report.uffd.dev_error}")
        elif need == "guest-memfd" and report.kvm.guest_memfd_flags is None:
            out.append("guest-memfd: KVM_CAP_GUEST_MEMFD is 0 or KVM is unavailable")
        elif need == "hugepages" and not any(p.nr for p in report.hugepages):
            out.append("hugepages: no pool has pages (echo N > /proc/sys/vm/nr_hugepages)")
        elif need == "tracing" and report.tracing.path is None:
            out.append(f"tracing: {report.tracing.note}")
    return out


# -- printing -------------------------------------------------------------------------


def _row(key: str, value: Any) -> str:
    return f"  {key:<34} {value}"


def format_report(r: DoctorReport) -> str:
    yes = {True: "yes", False: "no"}
    lines = ["fakekvm doctor", "", "host"]
    lines.append(_row("kernel release", r.kernel_release))
    lines.append(_row("running as root", yes[r.running_as_root]))
    lines += ["", "kvm"]
    k = r.kvm
    lines.append(_row(k.path, k.mode or "missing"))
    lines.append(_row("KVM_GET_API_VERSION", k.api_version if k.api_version is not None else "-"))
    if k.error:
        lines.append(_row("problem", k.error))
    if k.api_version is not None and not k.error:
        lines.append(_row("KVM_GET_VCPU_MMAP_SIZE", k.vcpu_mmap_size))
        lines.append(_row("VM types (KVM_CAP_VM_TYPES)", ", ".join(k.vm_types) or "-"))
        gm = k.guest_memfd_flags
        lines.append(
            _row(
                "guest_memfd flags",
                "unsupported" if gm is None else f"{gm:#x} {' | '.join(k.guest_memfd_flag_names)}",
            )
        )
        lines += ["", f"  {'capability':<42} {'#':>4} {'system':>10} {'VM':>10}"]
        for c in k.caps:
            if not c.name.startswith("KVM_CAP_") and not c.system and not c.vm:
                continue
            vm = "-" if c.vm is None else str(c.vm)
            mark = "" if c.vm is None or c.vm == c.system else "  (differs)"
            lines.append(f"  {c.name:<42} {c.number:>4} {c.system:>10} {vm:>10}{mark}")
    lines += ["", "userfaultfd"]
    u = r.uffd
    lines.append(_row("userfaultfd(2)", "works" if u.syscall else f"fails: {u.syscall_error}"))
    lines.append(
        _row(
            "/dev/userfaultfd",
            ("usable" if u.dev_usable else f"unusable: {u.dev_error}")
            + (f" [{u.dev_mode}]" if u.dev_mode else ""),
        )
    )
    upu = u.unprivileged_userfaultfd
    lines.append(
        _row(
            "vm.unprivileged_userfaultfd",
            "unknown" if upu is None else f"{upu}"
            + (" (non-root needs UFFD_USER_MODE_ONLY or CAP_SYS_PTRACE)" if upu == 0 else ""),
        )
    )
    if u.features is not None:
        lines.append(_row("UFFDIO_API features", f"{u.features:#x}"))
        for n in u.feature_names:
            lines.append(_row("", n))
        lines.append(_row("UFFDIO_API ioctls", f"{u.api_ioctls:#x}"))
        for rm in u.register_modes:
            value = (
                f"ioctls {rm.ioctls:#x} ({', '.join(n.removeprefix('_UFFDIO_').removeprefix('UFFDIO_') for n in rm.ioctl_names)})"
                if rm.ok and rm.ioctls is not None
                else f"refused: {rm.error}"
            )
            lines.append(_row(f"register {rm.memory} {rm.mode}", value))
    lines += ["", "hugepages"]
    if not r.hugepages:
        lines.append(_row("pools", "none"))
    for p in r.hugepages:
        size = f"{p.size_kib // 1024} MiB" if p.size_kib < 1 << 20 else f"{p.size_kib >> 20} GiB"
        lines.append(_row(f"{size} pool", f"{p.nr} pages, {p.free} free"))
    lines += ["", "tracing"]
    lines.append(_row("kvm tracepoints", r.tracing.note))
    if r.unmet:
        lines += ["", "unmet requirements"]
        lines += [f"  - {u_}" for u_ in r.unmet]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    required = [s for s in (args.require or "").split(",") if s]
    bad = [s for s in required if s not in REQUIREMENTS]
    if bad:
        print(f"fakekvm doctor: unknown requirement(s) {', '.join(bad)}; "
              f"choose from {', '.join(REQUIREMENTS)}", file=sys.stderr)
        return 2
    report = probe()
    report.unmet = unmet(report, required)
    if args.json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    else:
        print(format_report(report))
    return 1 if report.unmet else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="probe the host's KVM, userfaultfd, hugepages and tracing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--require",
        metavar="NEEDS",
        help=f"comma-separated needs; exit 1 if any is unmet ({', '.join(REQUIREMENTS)})",
    )
    p.set_defaults(handler=run)
