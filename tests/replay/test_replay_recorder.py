"""`RecordingKernel` and the fault derivation (`replay.faults.FaultTracker`).

The recorder must be invisible (a recorded run gives the same answers as a plain one), must
record the bytes the kernel really exchanged, and the faults it derives from those bytes must
match what happened: one `Fault` per fault, with the right address, access and resolution.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from fakekvm.abi import kvm, kvm_userfault, mman, uffd
from fakekvm.fake import FakeKernel
from fakekvm.guests import GuestVM, hello_image
from fakekvm.guests.exits import decode_exit
from fakekvm.kernel.seam import ForwardingKernel, Kernel
from fakekvm.testing import uffd_scenarios as S
from replay.events import Call, Contents, Event, Fault, Header
from replay.faults import FaultTracker
from replay.format import TraceWriter, open_trace
from replay.recorder import KVM_RUN_BYTES, RecordingKernel, make_header, maybe_record

PAGE = mman.PAGE_SIZE


def calls(evs: list[Event]) -> list[Call]:
    return [e for e in evs if isinstance(e, Call)]


def faults(evs: list[Event]) -> list[Fault]:
    return [e for e in evs if isinstance(e, Fault)]


# ---------------------------------------------------------------------------------------------
# The recorder on the fake kernel
# ---------------------------------------------------------------------------------------------


def run_hello(k: Kernel) -> Any:
    with GuestVM(k, 4 << 20) as vm:
        vm.load(hello_image())
        return vm.run(0)


def test_guest_run_recorded_equals_plain_run() -> None:
    with FakeKernel(profile="6.18-pvm") as plain:
        want = run_hello(plain)
    evs: list[Event] = []
    with FakeKernel(profile="6.18-pvm") as fk:
        got = run_hello(RecordingKernel(fk, evs))
    assert got.exits == want.exits and got.regs == want.regs and got.text == want.text
    assert got.text  # the hello guest printed something

    cs = calls(evs)
    assert [c.seq for c in cs] == list(range(len(cs)))
    by_name = {c.name: c for c in cs if c.op == "ioctl"}
    assert by_name["KVM_CREATE_VM"].fd_kind == "kvm" and by_name["KVM_CREATE_VM"].iarg == 0
    vm_fd = by_name["KVM_CREATE_VM"].ret
    vcpu_call = by_name["KVM_CREATE_VCPU"]
    assert vcpu_call.fd == vm_fd and vcpu_call.fd_kind == "kvm-vm"
    region = by_name["KVM_SET_USER_MEMORY_REGION"]
    assert region.iarg is None and len(region.inp) == 32 and region.out == b""
    slot, _flags, gpa, size, hva = kvm.kvm_userspace_memory_region_fmt.unpack(region.inp)
    assert (slot, gpa, size) == (0, 0, 4 << 20)
    mmaps = [c for c in cs if c.op == "mmap"]
    assert hva in [c.ret for c in mmaps]  # the memory's address, never its bytes
    assert all(c.out == b"" and c.inp == b"" for c in mmaps)
    sregs = by_name["KVM_GET_SREGS"]
    assert len(sregs.inp) == kvm.kvm_sregs.sizeof() and sregs.out  # the kernel filled it

    runs = [c for c in cs if c.name == "KVM_RUN"]
    assert len(runs) == len(want.exits)
    assert {c.fd_kind for c in runs} == {"kvm-vcpu:0"} and {c.vcpu for c in runs} == {0}
    run_size = by_name["KVM_GET_VCPU_MMAP_SIZE"].ret
    for c, ex in zip(runs, want.exits, strict=True):
        buf = bytearray(run_size)
        buf[:KVM_RUN_BYTES] = c.out[:KVM_RUN_BYTES]
        if ex.reason == kvm.KVM_EXIT_IO:
            off = ex.field("data_offset")
            extra = c.out[KVM_RUN_BYTES:]
            assert len(extra) == ex.field("size") * ex.field("count")
            buf[off : off + len(extra)] = extra
        assert decode_exit(memoryview(buf)) == ex
    assert {c.errno for c in cs} == {0}


def test_errors_are_recorded_and_reraised_unchanged() -> None:
    evs: list[Event] = []
    with FakeKernel(profile="6.18-pvm") as fk:
        k = RecordingKernel(fk, evs)
        fd = k.open("/dev/kvm", mman.O_RDWR)
        with pytest.raises(OSError) as plain:
            fk.ioctl(fd, 0xAEFF, 0)
        with pytest.raises(OSError) as ei:
            k.ioctl(fd, 0xAEFF, 0)
        assert ei.value.errno == plain.value.errno and type(ei.value) is type(plain.value)
        with pytest.raises(OSError) as ei2:
            k.close(12345)
        assert ei2.value.errno == errno.EBADF
    cs = calls(evs)
    assert cs[0].op == "open" and cs[0].fd_kind == "" and cs[0].inp == b"/dev/kvm"
    bad = cs[1]
    assert bad.request == 0xAEFF and bad.errno == plain.value.errno and bad.ret == -1
    assert bad.fd_kind == "kvm" and bad.name.startswith("_IOC(")
    assert cs[2].op == "close" and cs[2].errno == errno.EBADF


def test_guest_memory_bytes_are_recorded_only_with_contents() -> None:
    secret = b"guest secret" * 100
    for with_contents in (False, True):
        evs: list[Event] = []
        with FakeKernel(profile="6.18-pvm") as fk:
            k = RecordingKernel(fk, evs, with_contents=with_contents)
            mfd = k.memfd_create("g", 0)
            k.ftruncate(mfd, 2 * PAGE)
            assert k.pwrite(mfd, secret, 100) == len(secret)
            assert k.pread(mfd, len(secret), 100) == secret
            efd = k.eventfd(0, 0)
            k.write(efd, struct.pack("<Q", 5))
            assert k.read(efd, 8) == struct.pack("<Q", 5)
        cs = calls(evs)
        kinds = {c.op: c.fd_kind for c in cs}
        assert kinds["ftruncate"] == "memfd" and kinds["eventfd"] == ""
        pw = next(c for c in cs if c.op == "pwrite")
        pr = next(c for c in cs if c.op == "pread")
        assert pw.ret == len(secret) and pr.ret == len(secret) and pr.args == [100]
        if with_contents:
            assert pw.inp == secret and pr.out == secret
        else:
            assert pw.inp == b"" and pr.out == b"" and pw.args == [100, len(secret)]
            blob = b"".join(c.inp + c.out for c in cs)
            assert b"guest secret" not in blob
        ev_read = next(c for c in cs if c.op == "read")
        assert ev_read.fd_kind == "eventfd" and ev_read.out == struct.pack("<Q", 5)


def test_the_recorder_is_invisible_to_kernel_specific_helpers() -> None:
    with FakeKernel(profile="6.18-pvm") as fk:
        k = RecordingKernel(fk, [])
        assert S.is_fake(k) and k.mm is fk.mm  # type: ignore[attr-defined]
        assert k.name == fk.name


# ---------------------------------------------------------------------------------------------
# Fault derivation on a real uffd scenario (the fake kernel)
# ---------------------------------------------------------------------------------------------


def _read_all_msgs(k: Kernel, fd: int, n: int) -> None:
    got = 0
    while got < n:
        S.wait_readable(k, fd)
        got += len(k.read(fd, 32 * (n - got))) // 32


def test_faults_derived_from_a_uffd_scenario() -> None:
    evs: list[Event] = []
    with FakeKernel(profile="6.18-pvm") as fk:
        k = RecordingKernel(fk, evs, mechanism="uffd-missing")
        m = S.anon(k, 4)
        a = m.address
        src = S.src_page(k, 0x42)
        fd = S.new_uffd(k, uffd.UFFD_FEATURE_THREAD_ID)
        assert S.register(k, fd, a, 4 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)[0] == "0"
        touchers = []
        for i in range(4):
            t = S.touch_in_thread(k, a + i * PAGE + 8, write=(i == 1))
            t.wait_blocked()
            touchers.append(t)
        _read_all_msgs(k, fd, 4)
        assert S.copy(k, fd, a, src.address) == ("0", PAGE)  # page 0: copy wakes
        assert S.zeropage(k, fd, a + PAGE)[0] == "0"  # page 1: zeropage wakes
        dontwake = uffd.UFFDIO_COPY_MODE_DONTWAKE
        assert S.copy(k, fd, a + 2 * PAGE, src.address, mode=dontwake)[0] == "0"
        assert len(faults(evs)) == 2  # DONTWAKE: page 2 is still waited for
        assert S.rng(k, fd, uffd.UFFDIO_WAKE, a + 2 * PAGE, PAGE) == "0"  # page 2: wake
        assert S.copy(k, fd, a + 3 * PAGE, src.address, mode=dontwake)[0] == "0"
        assert S.copy(k, fd, a + 3 * PAGE, src.address)[0] == "EEXIST"  # wakes nobody
        n_before_wake = len(faults(evs))
        assert S.rng(k, fd, uffd.UFFDIO_WAKE, a + 3 * PAGE, PAGE) == "0"  # page 3: wake
        for t in touchers:
            t.join()
        k.stop_recording()
    fs = faults(evs)
    assert n_before_wake == 3
    assert len(fs) == 4
    fs.sort(key=lambda f: f.hva)
    assert [f.hva - a for f in fs] == [i * PAGE for i in range(4)]  # without EXACT_ADDRESS
    assert [f.access for f in fs] == ["read", "write", "read", "read"]
    assert [f.how for f in fs] == ["copy", "zeropage", "wake", "wake"]
    assert [f.tid for f in fs] == [t.tid for t in touchers]
    assert all(f.mechanism == "uffd-missing" and f.gpa == -1 and f.vcpu == -1 for f in fs)
    assert all(0 < f.observed_ns <= f.resolved_ns for f in fs)
    reads = [c for c in calls(evs) if c.op == "read" and c.fd_kind == "userfaultfd"]
    assert sum(len(c.out) for c in reads) == 4 * 32
    assert all(f.seq in {c.seq for c in reads} for f in fs)


def test_with_contents_records_the_copied_bytes() -> None:
    evs: list[Event] = []
    with FakeKernel(profile="6.18-pvm") as fk:
        k = RecordingKernel(fk, evs, with_contents=True)
        m = S.anon(k, 1)
        src = S.src_page(k, 0x5A)
        fd = S.new_uffd(k)
        S.register(k, fd, m.address, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
        assert S.copy(k, fd, m.address, src.address)[0] == "0"
    cont = [e for e in evs if isinstance(e, Contents)]
    assert len(cont) == 1 and cont[0].hva == m.address and cont[0].data == b"\x5a" * PAGE
    copy_call = next(c for c in calls(evs) if c.name == "UFFDIO_COPY")
    assert cont[0].seq == copy_call.seq


# ---------------------------------------------------------------------------------------------
# FaultTracker with synthetic calls
# ---------------------------------------------------------------------------------------------

UFFD = "userfaultfd"


def msg(address: int, flags: int = 0, ptid: int = 0) -> bytes:
    return uffd.uffd_msg_pagefault_fmt.pack(uffd.UFFD_EVENT_PAGEFAULT, flags, address, ptid)


def uread(seq: int, t: int, *msgs: bytes) -> Call:
    data = b"".join(msgs)
    return Call(seq, 1, t, 10, "read", fd=5, fd_kind=UFFD, iarg=len(data), out=data, ret=len(data))


def uioctl(seq: int, t: int, req: int, inp: bytes, out: bytes = b"", err: int = 0) -> Call:
    return Call(
        seq,
        1,
        t,
        5,
        "ioctl",
        fd=5,
        fd_kind=UFFD,
        request=req,
        inp=inp,
        out=out,
        ret=-1 if err else 0,
        errno=err,
    )


def ucopy(dst: int, n: int = PAGE, mode: int = 0, res: int = 0) -> bytes:
    return uffd.uffdio_copy_fmt.pack(dst, 0x1000, n, mode, res)


def test_tracker_uffd_copy_zeropage_continue_and_access_kinds() -> None:
    tr = FaultTracker("uffd-minor")
    base = 0x7F00_0000_0000
    W, WP, MINOR = (
        uffd.UFFD_PAGEFAULT_FLAG_WRITE,
        uffd.UFFD_PAGEFAULT_FLAG_WP,
        uffd.UFFD_PAGEFAULT_FLAG_MINOR,
    )
    assert (
        tr.feed(
            uread(
                0,
                100,
                msg(base, 0, 11),
                msg(base + PAGE, W, 12),
                msg(base + 2 * PAGE, WP | W, 13),
                msg(base + 3 * PAGE, MINOR, 14),
            )
        )
        == []
    )
    # a non-pagefault message is not a fault
    rm = uffd.uffd_msg_remove_fmt.pack(uffd.UFFD_EVENT_REMOVE, base, base + PAGE)
    assert tr.feed(uread(1, 101, rm)) == []
    assert tr.observed == 4
    out = tr.feed(uioctl(2, 200, uffd.UFFDIO_COPY, ucopy(base, 2 * PAGE)))
    assert [(f.hva, f.how, f.access, f.tid, f.resolved_ns) for f in out] == [
        (base, "copy", "read", 11, 205),
        (base + PAGE, "copy", "write", 12, 205),
    ]
    z = uffd.uffdio_zeropage_fmt.pack(base + 2 * PAGE, PAGE, 0, 0)
    (f,) = tr.feed(uioctl(3, 300, uffd.UFFDIO_ZEROPAGE, z))
    assert (f.access, f.how, f.seq, f.observed_ns) == ("wp", "zeropage", 0, 110)
    c = uffd.uffdio_continue_fmt.pack(base + 3 * PAGE, PAGE, 0, 0)
    (f,) = tr.feed(uioctl(4, 400, uffd.UFFDIO_CONTINUE, c))
    assert (f.access, f.how, f.mechanism) == ("minor", "continue", "uffd-minor")
    assert tr.pending == {} and tr.finish() == []


def test_tracker_eexist_dontwake_partial_and_unresolved() -> None:
    tr = FaultTracker("uffd-missing")
    a = 0x5000_0000
    tr.feed(uread(0, 10, msg(a), msg(a + PAGE), msg(a + 2 * PAGE), msg(a + 3 * PAGE)))
    # EEXIST: the page is there, nobody is woken
    assert (
        tr.feed(
            uioctl(1, 20, uffd.UFFDIO_COPY, ucopy(a), ucopy(a, res=-errno.EEXIST), errno.EEXIST)
        )
        == []
    )
    (f,) = tr.feed(uioctl(2, 30, uffd.UFFDIO_WAKE, struct.pack("<QQ", a, PAGE)))
    assert (f.hva, f.how, f.resolved_ns) == (a, "wake", 35)
    # DONTWAKE: placed, not woken
    dw = uffd.UFFDIO_COPY_MODE_DONTWAKE
    assert tr.feed(uioctl(3, 40, uffd.UFFDIO_COPY, ucopy(a + PAGE, mode=dw))) == []
    # partial progress then EAGAIN: the bytes done are woken
    partial = tr.feed(
        uioctl(
            4,
            50,
            uffd.UFFDIO_COPY,
            ucopy(a + PAGE, 3 * PAGE),
            ucopy(a + PAGE, 3 * PAGE, res=PAGE),
            errno.EAGAIN,
        )
    )
    assert [(f.hva, f.how) for f in partial] == [(a + PAGE, "copy")]
    # a failed copy with no progress wakes nobody; the trace ends with page 2 and 3 waiting
    assert (
        tr.feed(
            uioctl(
                5,
                60,
                uffd.UFFDIO_COPY,
                ucopy(a + 2 * PAGE),
                ucopy(a + 2 * PAGE, res=-errno.ENOENT),
                errno.ENOENT,
            )
        )
        == []
    )
    rest = tr.finish()
    assert [(f.hva, f.resolved_ns, f.how) for f in rest] == [
        (a + 2 * PAGE, 0, ""),
        (a + 3 * PAGE, 0, ""),
    ]


def run_call(seq: int, t: int, vcpu: int, out: bytes, err: int = 0, tid: int = 77) -> Call:
    return Call(
        seq,
        tid,
        t,
        50,
        "ioctl",
        fd=9,
        fd_kind=f"kvm-vcpu:{vcpu}",
        vcpu=vcpu,
        request=kvm.KVM_RUN,
        name="KVM_RUN",
        iarg=0,
        out=out,
        ret=-1 if err else 0,
        errno=err,
    )


def memfault_run(flags: int, gpa: int) -> bytes:
    run = bytearray(KVM_RUN_BYTES)
    struct.pack_into("<I", run, 8, kvm.KVM_EXIT_MEMORY_FAULT)
    struct.pack_into("<QQQ", run, 32, flags, gpa, PAGE)
    return bytes(run)


def test_tracker_kvm_memory_faults_and_memslots() -> None:
    tr = FaultTracker("kvm-userfault")
    region = kvm.kvm_userspace_memory_region_fmt.pack(
        0, 0, 0x1_0000_0000, 1 << 30, 0x7F00_0000_0000
    )
    tr.feed(
        Call(
            0,
            1,
            0,
            1,
            "ioctl",
            fd=4,
            fd_kind="kvm-vm",
            request=kvm.KVM_SET_USER_MEMORY_REGION,
            inp=region,
        )
    )
    uf = kvm_userfault.KVM_MEMORY_EXIT_FLAG_USERFAULT
    priv = kvm.KVM_MEMORY_EXIT_FLAG_PRIVATE
    assert tr.feed(run_call(1, 100, 0, memfault_run(uf, 0x1_0000_3000), errno.EFAULT)) == []
    assert (
        tr.feed(run_call(2, 110, 1, memfault_run(priv, 0x1_0000_5000), errno.EFAULT, tid=78)) == []
    )
    # an EFAULT that is not a memory fault exit, and a plain exit, are not faults
    hlt = bytearray(KVM_RUN_BYTES)
    struct.pack_into("<I", hlt, 8, kvm.KVM_EXIT_HLT)
    (f0,) = tr.feed(run_call(3, 200, 0, bytes(hlt)))
    assert (f0.vcpu, f0.tid, f0.gpa, f0.hva) == (0, 77, 0x1_0000_3000, 0x7F00_0000_3000)
    assert (f0.access, f0.how, f0.observed_ns, f0.resolved_ns, f0.seq) == (
        "userfault",
        "rerun",
        150,
        200,
        1,
    )
    assert tr.feed(run_call(4, 300, 0, bytes(hlt), errno.EFAULT)) == []
    (f1,) = tr.feed(run_call(5, 400, 1, bytes(hlt), errno.EINTR, tid=78))
    assert (f1.vcpu, f1.access, f1.gpa, f1.resolved_ns) == (1, "private", 0x1_0000_5000, 400)
    # a uffd fault taken by a vCPU thread names the vCPU and the gpa
    tr.feed(uread(6, 500, msg(0x7F00_0000_8000, 0, 78)))
    (f2,) = tr.feed(uioctl(7, 600, uffd.UFFDIO_COPY, ucopy(0x7F00_0000_8000)))
    assert (f2.vcpu, f2.gpa) == (1, 0x1_0000_8000)
    # deleting the slot drops the translation
    gone = kvm.kvm_userspace_memory_region_fmt.pack(0, 0, 0x1_0000_0000, 0, 0x7F00_0000_0000)
    tr.feed(
        Call(
            8,
            1,
            0,
            1,
            "ioctl",
            fd=4,
            fd_kind="kvm-vm",
            request=kvm.KVM_SET_USER_MEMORY_REGION,
            inp=gone,
        )
    )
    assert tr.gpa_of(0x7F00_0000_8000) == -1
    assert tr.observed == 3 and tr.resolved == 3


# ---------------------------------------------------------------------------------------------
# maybe_record, the header, and the real kernel
# ---------------------------------------------------------------------------------------------


def test_maybe_record_only_with_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from replay import recorder

    monkeypatch.delenv("FAKEKVM_TRACE", raising=False)
    with FakeKernel(profile="6.18-pvm") as fk:
        assert maybe_record(fk, role="destination") is fk
        base = str(tmp_path / "m.trc")
        monkeypatch.setenv("FAKEKVM_TRACE", base)
        monkeypatch.setenv("FAKEKVM_TRACE_ARGV", '["fakekvm", "x"]')
        rk = maybe_record(
            fk, role="source", mechanism="uffd-minor", guest="idle", seed=3, profile="6.18-pvm"
        )
        assert isinstance(rk, RecordingKernel) and isinstance(rk, ForwardingKernel)
        rk.monotonic_ns()
        assert os.path.exists(base + ".source.incomplete")
        recorder.close_all()
    r = open_trace(base + ".source", strict=True)
    h = r.header
    assert (h.role, h.mechanism, h.guest, h.seed, h.profile, h.kernel) == (
        "source",
        "uffd-minor",
        "idle",
        3,
        "6.18-pvm",
        "fake",
    )
    assert h.argv == ["fakekvm", "x"] and h.uuid and h.created.endswith("+00:00")
    assert h.host.kernel_release == os.uname().release and h.host.page_size == PAGE
    assert [e.op for e in r] == ["monotonic_ns"]  # type: ignore[union-attr]


def test_header_has_doctor_facts_on_the_real_kernel() -> None:
    class Named(ForwardingKernel):
        pass

    with FakeKernel(profile="6.18-pvm") as fk:
        k = Named(fk)
        k.name = "real"
        h: Header = make_header(k, role="")
    assert "kvm" in h.host.doctor and "uffd" in h.host.doctor
    assert h.host.cpu_model


@pytest.mark.real_kernel
def test_record_hello_guest_on_the_real_kernel(tmp_path: Path) -> None:
    from fakekvm.kernel.real import RealKernel

    real = RealKernel()
    want = run_hello(real)
    p = tmp_path / "hello.trc"
    with TraceWriter(p, make_header(real, guest="hello")) as w:
        got = run_hello(RecordingKernel(real, w))
    assert got.exits == want.exits and got.text == want.text
    r = open_trace(p, strict=True)
    evs = list(r)
    assert r.complete and r.header.kernel == "real" and r.header.host.doctor["kvm"]
    runs = [c for c in calls(evs) if c.name == "KVM_RUN"]
    assert len(runs) == len(want.exits)
    reasons = [struct.unpack_from("<I", c.out, 8)[0] for c in runs]
    assert reasons == [ex.reason for ex in want.exits]


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_record_a_small_real_migration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from postcopy.migrate import MigrateOptions, migrate
    from replay import recorder

    base = str(tmp_path / "mig.trc")
    monkeypatch.setenv("FAKEKVM_TRACE", base)
    o = MigrateOptions(
        kernel="real",
        mechanism="uffd-missing",
        # 64 MiB: the push takes over 100 ms, so the guest faults even when its vCPU starts
        # late on a loaded host (with 16 MiB the push once placed every page first)
        mem_size=64 << 20,
        workload="random",
        seed=3,
        same_process=True,
        bulk_nice=19,
    )
    try:
        report = migrate(o)
    finally:
        recorder.close_all()
    r = open_trace(base, strict=True)
    evs = list(r)
    assert r.complete and r.header.kernel == "real" and r.header.mechanism == "uffd-missing"
    assert r.header.role == "" and not os.path.exists(base + ".source")
    fs = faults(evs)
    st = report.result.stats
    assert len(fs) == st.faults > 0
    assert all(f.resolved_ns >= f.observed_ns > 0 for f in fs)
    assert {f.how for f in fs} <= {"copy", "wake"}
    assert {f.vcpu for f in fs} == {0}  # the vCPU thread faulted inside KVM_RUN
    assert all(0 <= f.gpa < 64 << 20 for f in fs)
