"""`replay.show`: strace-style lines for Calls and Faults, decoded with `fakekvm.abi`."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from fakekvm.abi import kvm, kvm_userfault, uffd
from replay.events import Call, Contents, Fault, Header
from replay.format import TraceWriter
from replay.show import (
    KVM_RUN_RECORDED,
    ShowFilter,
    decode_kvm_run,
    decode_uffd_msgs,
    format_call,
    format_fault,
    show_lines,
)
from tools.cli import main


def _run_out(reason: int, arm: bytes = b"", extra: bytes = b"") -> bytes:
    out = bytearray(KVM_RUN_RECORDED)
    kvm.kvm_run_exit_reason_fmt.pack_into(out, kvm.KVM_RUN_EXIT_REASON_OFFSET, reason)
    out[kvm.KVM_RUN_EXIT_OFFSET : kvm.KVM_RUN_EXIT_OFFSET + len(arm)] = arm
    return bytes(out) + extra


def _kvm_run(out: bytes, err: int = 0) -> Call:
    return Call(seq=3, tid=10, t_ns=100, dur_ns=5, op="ioctl", fd=7, fd_kind="kvm-vcpu:0",
                vcpu=0, request=kvm.KVM_RUN, name="KVM_RUN", iarg=0, out=out,
                ret=-1 if err else 0, errno=err)  # fmt: skip


def test_kvm_run_memory_fault_userfault() -> None:
    arm = kvm.kvm_run_memory_fault_fmt.pack(
        kvm_userfault.KVM_MEMORY_EXIT_FLAG_USERFAULT, 0x1234000, 4096
    )
    line = format_call(_kvm_run(_run_out(kvm.KVM_EXIT_MEMORY_FAULT, arm), errno.EFAULT))
    assert line == (
        "ioctl(7<kvm-vcpu:0>, KVM_RUN, 0) = -1 EFAULT "
        "(KVM_EXIT_MEMORY_FAULT flags=USERFAULT gpa=0x1234000)"
    )


def test_kvm_run_private_memory_fault_with_size() -> None:
    arm = kvm.kvm_run_memory_fault_fmt.pack(kvm.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x200000, 0x200000)
    assert decode_kvm_run(_run_out(kvm.KVM_EXIT_MEMORY_FAULT, arm)) == (
        "KVM_EXIT_MEMORY_FAULT flags=PRIVATE gpa=0x200000 size=0x200000"
    )


def test_kvm_run_io_out_data_appended_and_in_page() -> None:
    arm = kvm.kvm_run_io_fmt.pack(kvm.KVM_EXIT_IO_OUT, 1, 0x3F8, 1, 4096)
    line = format_call(_kvm_run(_run_out(kvm.KVM_EXIT_IO, arm, b"H")))
    assert line == ("ioctl(7<kvm-vcpu:0>, KVM_RUN, 0) = 0 "
                    "(KVM_EXIT_IO OUT port=0x3f8 size=1 count=1 data=48)")  # fmt: skip
    # IO data inside the recorded page (data_offset within the bytes)
    arm2 = kvm.kvm_run_io_fmt.pack(kvm.KVM_EXIT_IO_OUT, 4, 0xE0, 2, 0x80)
    page = bytearray(_run_out(kvm.KVM_EXIT_IO, arm2))
    page[0x80:0x88] = bytes(range(1, 9))
    assert decode_kvm_run(bytes(page)).endswith("port=0xe0 size=4 count=2 data=0102030405060708")
    arm3 = kvm.kvm_run_io_fmt.pack(kvm.KVM_EXIT_IO_IN, 1, 0xE4, 1, 4096)
    assert decode_kvm_run(_run_out(kvm.KVM_EXIT_IO, arm3)) == (
        "KVM_EXIT_IO IN port=0xe4 size=1 count=1"
    )


def test_kvm_run_mmio_hlt_and_garbage() -> None:
    arm = kvm.kvm_run_mmio_fmt.pack(0xFEE00000, b"\x01\x02\x03\x04\0\0\0\0", 4, 1)
    assert decode_kvm_run(_run_out(kvm.KVM_EXIT_MMIO, arm)) == (
        "KVM_EXIT_MMIO write phys_addr=0xfee00000 len=4 data=01020304"
    )
    assert decode_kvm_run(_run_out(kvm.KVM_EXIT_HLT)) == "KVM_EXIT_HLT"
    assert decode_kvm_run(b"\x01\x02") == "kvm_run? 0102"
    assert decode_kvm_run(_run_out(9999, b"\xaa\xbb")) == "<exit 9999> aabb"


def test_uffdio_copy_line() -> None:
    inp = uffd.uffdio_copy_fmt.pack(0x7F12_3456_7000, 0x7F00_0000_0000, 4096, 0, 0)
    out = uffd.uffdio_copy_fmt.pack(0x7F12_3456_7000, 0x7F00_0000_0000, 4096, 0, 4096)
    c = Call(seq=5, tid=11, t_ns=0, dur_ns=0, op="ioctl", fd=9, fd_kind="userfaultfd",
             request=uffd.UFFDIO_COPY, name="UFFDIO_COPY", inp=inp, out=out)  # fmt: skip
    assert format_call(c) == (
        "ioctl(9<userfaultfd>, UFFDIO_COPY, {dst=0x7f1234567000, src=0x7f0000000000, "
        "len=4096, mode=0, copy=4096}) = 0"
    )
    c2 = Call(seq=6, tid=11, t_ns=0, dur_ns=0, op="ioctl", fd=9, fd_kind="userfaultfd",
              request=uffd.UFFDIO_COPY, name="UFFDIO_COPY",
              inp=uffd.uffdio_copy_fmt.pack(0x1000, 0x2000, 4096,
                                            uffd.UFFDIO_COPY_MODE_DONTWAKE, -17),
              ret=-1, errno=errno.EEXIST)  # fmt: skip
    assert format_call(c2) == (
        "ioctl(9<userfaultfd>, UFFDIO_COPY, {dst=0x1000, src=0x2000, len=4096, "
        "mode=UFFDIO_COPY_MODE_DONTWAKE, copy=-17}) = -1 EEXIST (File exists)"
    )


def test_uffd_read_line() -> None:
    msg = uffd.uffd_msg_pagefault_fmt.pack(
        uffd.UFFD_EVENT_PAGEFAULT, uffd.UFFD_PAGEFAULT_FLAG_WRITE, 0x7F00_1234_5000, 1234
    )
    c = Call(seq=7, tid=11, t_ns=0, dur_ns=0, op="read", fd=9, fd_kind="userfaultfd",
             iarg=32, out=msg, ret=32)  # fmt: skip
    assert format_call(c) == (
        "read(9<userfaultfd>, 32) = 32 [PAGEFAULT flags=WRITE address=0x7f0012345000 ptid=1234]"
    )
    rm = uffd.uffd_msg_remove_fmt.pack(uffd.UFFD_EVENT_REMOVE, 0x1000, 0x3000)
    assert decode_uffd_msgs(msg + rm + b"\x01\x02") == (
        "[PAGEFAULT flags=WRITE address=0x7f0012345000 ptid=1234, REMOVE start=0x1000 "
        "end=0x3000, 0102]"
    )
    eagain = Call(seq=8, tid=11, t_ns=0, dur_ns=0, op="read", fd=9, fd_kind="userfaultfd",
                  iarg=32, ret=-1, errno=errno.EAGAIN)  # fmt: skip
    assert format_call(eagain) == (
        "read(9<userfaultfd>, 32) = -1 EAGAIN (Resource temporarily unavailable)"
    )


def test_memslot_register_int_args_mmap_and_unknown() -> None:
    region = kvm.kvm_userspace_memory_region_fmt.pack(
        0, kvm.KVM_MEM_LOG_DIRTY_PAGES, 0, 0x100000, 0x7F00_0000_0000
    )
    c = Call(seq=1, tid=1, t_ns=0, dur_ns=0, op="ioctl", fd=4, fd_kind="kvm-vm",
             request=kvm.KVM_SET_USER_MEMORY_REGION, name="KVM_SET_USER_MEMORY_REGION",
             inp=region)  # fmt: skip
    assert format_call(c) == (
        "ioctl(4<kvm-vm>, KVM_SET_USER_MEMORY_REGION, {slot=0, flags=KVM_MEM_LOG_DIRTY_PAGES, "
        "guest_phys_addr=0x0, memory_size=0x100000, userspace_addr=0x7f0000000000}) = 0"
    )
    reg = uffd.uffdio_register_fmt.pack(0x7F00_0000_0000, 0x100000,
                                        uffd.UFFDIO_REGISTER_MODE_MISSING, 0)  # fmt: skip
    reg_out = uffd.uffdio_register_fmt.pack(0x7F00_0000_0000, 0x100000,
                                            uffd.UFFDIO_REGISTER_MODE_MISSING, 0x1C)  # fmt: skip
    c = Call(seq=1, tid=1, t_ns=0, dur_ns=0, op="ioctl", fd=9, fd_kind="userfaultfd",
             request=uffd.UFFDIO_REGISTER, name="UFFDIO_REGISTER", inp=reg, out=reg_out)  # fmt: skip
    assert format_call(c) == (
        "ioctl(9<userfaultfd>, UFFDIO_REGISTER, {start=0x7f0000000000, len=1048576, "
        "mode=UFFDIO_REGISTER_MODE_MISSING, ioctls=UFFDIO_WAKE|UFFDIO_COPY|UFFDIO_ZEROPAGE}) = 0"
    )
    chk = Call(seq=2, tid=1, t_ns=0, dur_ns=0, op="ioctl", fd=3, fd_kind="kvm",
               request=kvm.KVM_CHECK_EXTENSION, name="KVM_CHECK_EXTENSION",
               iarg=kvm.KVM_CAP_USER_MEMORY, ret=1)  # fmt: skip
    assert format_call(chk) == "ioctl(3<kvm>, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) = 1"
    mm = Call(seq=3, tid=1, t_ns=0, dur_ns=0, op="mmap", fd=-1, iarg=0x200000,
              args=[3, 0x4022, 0, 0], ret=0x7F00_0000_0000)  # fmt: skip
    assert format_call(mm) == (
        "mmap(NULL, 0x200000, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, "
        "-1, 0x0) = 0x7f0000000000"
    )
    odd = Call(seq=4, tid=1, t_ns=0, dur_ns=0, op="ioctl", fd=4, fd_kind="kvm-vm",
               request=0xC018AEFF, name="", inp=b"\x01\x02\x03", ret=-1, errno=errno.ENOTTY)  # fmt: skip
    assert format_call(odd) == (
        "ioctl(4<kvm-vm>, _IOC(_IOC_READ|_IOC_WRITE, 0xae, 0xff, 0x18), 010203) = -1 ENOTTY "
        "(Inappropriate ioctl for device)"
    )
    # a struct too short for its codec: hex, not a crash
    short = Call(seq=5, tid=1, t_ns=0, dur_ns=0, op="ioctl", fd=9, fd_kind="userfaultfd",
                 request=uffd.UFFDIO_COPY, name="UFFDIO_COPY", inp=b"\xff" * 5)  # fmt: skip
    assert format_call(short) == "ioctl(9<userfaultfd>, UFFDIO_COPY, ffffffffff) = 0"


def test_fault_lines() -> None:
    f = Fault(seq=9, tid=12, vcpu=0, gpa=0x1234000, access="write", mechanism="uffd-missing",
              observed_ns=1_000_000, resolved_ns=1_041_200, how="copy")  # fmt: skip
    assert format_fault(f) == "-- fault vcpu 0 gpa=0x1234000 write uffd-missing 41.2 µs (copy)"
    g = Fault(seq=9, tid=12, hva=0x7F00_0000_1000, access="read", mechanism="uffd-minor",
              observed_ns=5)  # fmt: skip
    assert format_fault(g) == "-- fault tid 12 hva=0x7f0000001000 read uffd-minor unresolved"


def _events() -> list[Call | Fault | Contents]:
    return [
        Call(seq=0, tid=1, t_ns=1000, dur_ns=10, op="open", inp=b"/dev/kvm", iarg=0o2000002,
             ret=3),
        Call(seq=1, tid=1, t_ns=3000, dur_ns=10, op="ioctl", fd=3, fd_kind="kvm",
             request=kvm.KVM_CREATE_VM, name="KVM_CREATE_VM", iarg=0, ret=4),
        Call(seq=2, tid=2, t_ns=4000, dur_ns=10, op="ioctl", fd=7, fd_kind="kvm-vcpu:0",
             request=kvm.KVM_RUN, name="KVM_RUN", iarg=0, out=_run_out(kvm.KVM_EXIT_HLT)),
        Fault(seq=2, tid=2, vcpu=0, gpa=0x5000, access="read", mechanism="kvm-userfault",
              observed_ns=4500, resolved_ns=6500, how="rerun"),
        Contents(seq=3, hva=0x1000, data=b"xy"),
        Call(seq=3, tid=2, t_ns=9000, dur_ns=10, op="ioctl", fd=8, fd_kind="kvm-vcpu:1",
             request=kvm.KVM_RUN, name="KVM_RUN", iarg=0, out=_run_out(kvm.KVM_EXIT_HLT)),
    ]  # fmt: skip


def test_filters_limit_and_relative_times() -> None:
    h = Header()
    ev = _events()
    assert len(list(show_lines(h, ev))) == 6
    assert list(show_lines(h, ev, ShowFilter(faults_only=True))) == [
        "-- fault vcpu 0 gpa=0x5000 read kvm-userfault 2.0 µs (rerun)"
    ]
    runs = list(show_lines(h, ev, ShowFilter(name="KVM_RUN")))
    assert len(runs) == 2 and all("KVM_EXIT_HLT" in s for s in runs)
    assert len(list(show_lines(h, ev, ShowFilter(fd_kind="kvm-vcpu:")))) == 2
    assert len(list(show_lines(h, ev, ShowFilter(fd_kind="kvm-vcpu:1")))) == 1
    assert len(list(show_lines(h, ev, ShowFilter(tid=1)))) == 2
    assert len(list(show_lines(h, ev, ShowFilter(limit=3)))) == 3
    rel = list(show_lines(h, ev, ShowFilter(relative=True, limit=3)))
    assert rel[0].startswith('+0.000000 open("/dev/kvm"')
    assert rel[1].startswith("+0.000002 ioctl(3<kvm>, KVM_CREATE_VM, KVM_X86_DEFAULT_VM) = 4")
    assert rel[2].startswith("+0.000001 ioctl(7<kvm-vcpu:0>, KVM_RUN")


def test_a_broken_record_prints_a_line_instead_of_raising() -> None:
    bad = Call(seq=0, tid=1, t_ns=0, dur_ns=0, op="ioctl", fd=3, fd_kind="kvm",
               request=kvm.KVM_CHECK_EXTENSION, name="KVM_CHECK_EXTENSION", iarg=None)  # fmt: skip
    bad.args = ["not an int"]  # type: ignore[list-item]
    lines = list(show_lines(Header(), [bad, *_events()[:1]]))
    assert len(lines) == 2
    assert lines[1].startswith("open(")


def test_cli_show_reads_a_cut_off_trace_up_to_its_last_chunk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.trace"
    w = TraceWriter(str(path), Header(kernel="fake"), chunk_events=2)
    for ev in _events():
        w.append(ev)
    w.flush()  # 3 whole chunks on disk, no end marker: a crashed recording
    w._f.close()  # what SIGKILL would leave: the .incomplete file
    inc = Path(str(path) + ".incomplete")
    raw = inc.read_bytes()
    inc.write_bytes(raw[:-5])  # the last chunk cut short
    assert main(["trace", "show", "--no-header", str(path)]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert 1 <= len(lines) < 6 and lines[0].startswith('open("/dev/kvm"')
    assert "stopped" in cap.err or "cut" in cap.err or "truncated" in cap.err
    assert main(["trace", "show", "-r", "--tid", "2", "--no-header", str(path)]) == 0
    assert all(s.startswith("+") for s in capsys.readouterr().out.splitlines())
