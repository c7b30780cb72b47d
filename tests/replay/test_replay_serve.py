"""`ReplayKernel` (replay --mode serve) and the pure matcher behind it (`replay.match`).

Traces come from a real scenario: the hello guest run by `GuestVM` on `FakeKernel` through
`replay.recorder.RecordingKernel`; the live run is the same `GuestVM` code on a `ReplayKernel`.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest

from fakekvm.abi import kvm, uffd
from fakekvm.fake.kernel import FakeKernel
from fakekvm.guests import GuestVM, echo_image, hello_image
from fakekvm.guests.vm import RunResult
from fakekvm.kernel.seam import Kernel
from replay.events import Call, Event, Header
from replay.format import TraceWriter
from replay.match import AddressMap, Divergence, LiveCall, Matcher, stream_of
from replay.recorder import RecordingKernel
from replay.serve import ReplayDivergence, ReplayKernel, created_kinds
from replay.show import KVM_RUN_RECORDED
from tools.cli import main


def _hello(k: Kernel) -> RunResult:
    with GuestVM(k, 1 << 20) as vm:
        vm.load(hello_image())
        return vm.run()


@pytest.fixture(scope="module")
def hello_trace() -> tuple[Header, list[Event], RunResult]:
    fake = FakeKernel()
    events: list[Event] = []
    rec = RecordingKernel(fake, events)
    try:
        result = _hello(rec)
    finally:
        rec.shutdown()
    return Header(kernel="fake", profile="6.18-pvm", guest="hello"), events, result


def test_hello_replays_with_the_same_exits_and_output(hello_trace: Any) -> None:
    header, events, recorded = hello_trace
    rk = ReplayKernel(header, events)
    try:
        replayed = _hello(rk)
    finally:
        rk.shutdown()
    assert replayed.text == "Hello from fakekvm\n" == recorded.text
    assert replayed.exits == recorded.exits
    assert replayed.stop == recorded.stop == "hlt"
    assert replayed.regs == recorded.regs
    assert rk.pending() == []
    assert rk.divergence is None


def test_replay_hands_out_the_recorded_fds_and_real_memory(hello_trace: Any) -> None:
    header, events, _ = hello_trace
    rk = ReplayKernel(header, events)
    try:
        with GuestVM(rk, 1 << 20) as vm:
            assert vm.vm_fd == next(c.ret for c in events if c.name == "KVM_CREATE_VM")
            assert rk.kinds[vm.vcpu_fds[0]] == "kvm-vcpu:0"
            mem = vm.mem()
            mem[0x1234] = 0x5A  # real anonymous memory
            assert mem[0x1234] == 0x5A
            rec_mem = next(c.ret for c in events if c.op == "mmap" and c.fd == -1)
            assert rk.addresses.word_b_to_a(vm.memory.address + 8) == rec_mem + 8  # type: ignore[union-attr]
            vm.load(hello_image())
            assert vm.run().text == "Hello from fakekvm\n"
    finally:
        rk.shutdown()


def test_a_changed_ioctl_diverges_with_a_readable_report(hello_trace: Any) -> None:
    header, events, _ = hello_trace
    rk = ReplayKernel(header, events)
    try:
        with GuestVM(rk, 1 << 20) as vm:
            image = hello_image()
            vm.load(image)
            with pytest.raises(ReplayDivergence) as ei:
                vm.set_regs(0, rip=0x7C02, rflags=2)  # the recorded run set rip=0x7c00 once
    finally:
        rk.shutdown()
    e = ei.value
    assert e.errno == errno.EPROTO
    text = str(e)
    assert "replay divergence" in text
    assert "stream 'kvm-vcpu:0'" in text
    assert "expected #" in text and "KVM_RUN" in text  # the recorded next call on vCPU 0
    assert "got" in text and "KVM_SET_REGS, {rip=0x7c02" in text
    assert (
        "last calls matched:" in text
        and "KVM_SET_REGS, {rsp=0x7c00, rip=0x7c00, rflags=0x2}" in text
    )
    assert rk.divergence is e


def test_recorded_errno_is_raised_and_eintr_is_retried() -> None:
    run_out = bytearray(KVM_RUN_RECORDED)
    kvm.kvm_run_exit_reason_fmt.pack_into(run_out, 8, kvm.KVM_EXIT_HLT)
    calls = [
        Call(seq=0, tid=1, t_ns=0, dur_ns=1, op="open", inp=b"/dev/kvm", iarg=0, args=[0o600],
             ret=3),
        Call(seq=1, tid=1, t_ns=1, dur_ns=1, op="ioctl", fd=3, fd_kind="kvm", name="KVM_CREATE_VM",
             request=kvm.KVM_CREATE_VM, iarg=0, ret=4),
        Call(seq=2, tid=1, t_ns=2, dur_ns=1, op="ioctl", fd=4, fd_kind="kvm-vm",
             name="KVM_CHECK_EXTENSION", request=kvm.KVM_CHECK_EXTENSION, iarg=5, ret=-1,
             errno=errno.EINVAL),
    ]  # fmt: skip
    rk = ReplayKernel(Header(), calls)
    fd = rk.open("/dev/kvm", 0)
    vm = rk.ioctl(fd, kvm.KVM_CREATE_VM, 0)
    assert (fd, vm) == (3, 4)
    assert rk.kinds == {3: "kvm", 4: "kvm-vm"}
    with pytest.raises(OSError) as ei:
        rk.ioctl(vm, kvm.KVM_CHECK_EXTENSION, 5)
    assert ei.value.errno == errno.EINVAL and not isinstance(ei.value, ReplayDivergence)
    assert rk.monotonic_ns() == 3  # the trace has no clock reads: the end of the last call


def test_uffd_read_and_copy_translate_addresses() -> None:
    """A recorded message comes back with the live address; the COPY is answered by the
    model (the page was filled in the recording) and really copies the live staging bytes."""
    rec_base, rec_src = 0x7F00_0000_0000, 0x7F00_1000_0000
    msg = uffd.uffd_msg_pagefault_fmt.pack(uffd.UFFD_EVENT_PAGEFAULT, 1, rec_base + 0x3000, 77)
    copy_in = uffd.uffdio_copy_fmt.pack(rec_base + 0x3000, rec_src, 4096, 0, 0)
    copy_out = uffd.uffdio_copy_fmt.pack(rec_base + 0x3000, rec_src, 4096, 0, 4096)
    reg_in = uffd.uffdio_register_fmt.pack(rec_base, 0x10000, uffd.UFFDIO_REGISTER_MODE_MISSING, 0)
    calls = [
        Call(seq=0, tid=1, t_ns=0, dur_ns=1, op="userfaultfd", iarg=0, ret=5),
        Call(seq=1, tid=1, t_ns=1, dur_ns=1, op="mmap", iarg=0x10000, args=[3, 0x4022, 0, 0],
             ret=rec_base),
        Call(seq=2, tid=1, t_ns=1, dur_ns=1, op="mmap", iarg=0x1000, args=[3, 0x8022, 0, 0],
             ret=rec_src),
        Call(seq=3, tid=1, t_ns=2, dur_ns=1, op="ioctl", fd=5, fd_kind="userfaultfd",
             name="UFFDIO_REGISTER", request=uffd.UFFDIO_REGISTER, inp=reg_in),
        Call(seq=4, tid=2, t_ns=2, dur_ns=1, op="read", fd=5, fd_kind="userfaultfd", iarg=32,
             out=msg, ret=32),
        Call(seq=5, tid=2, t_ns=3, dur_ns=1, op="ioctl", fd=5, fd_kind="userfaultfd",
             name="UFFDIO_COPY", request=uffd.UFFDIO_COPY, inp=copy_in, out=copy_out),
    ]  # fmt: skip
    rk = ReplayKernel(Header(), calls)
    try:
        ufd = rk.userfaultfd(0)
        m = rk.mmap(-1, 0x10000, 3, 0x4022)
        staging = rk.mmap(-1, 0x1000, 3, 0x8022)
        assert m.address != rec_base
        reg = bytearray(uffd.uffdio_register_fmt.pack(m.address, 0x10000, 1, 0))
        rk.ioctl(ufd, uffd.UFFDIO_REGISTER, reg)
        data = rk.read(ufd, 32)
        _e, flags, address, ptid = uffd.uffd_msg_pagefault_fmt.unpack(data)
        assert (flags, address, ptid) == (1, m.address + 0x3000, 77)
        with pytest.raises(BlockingIOError):  # one recorded message: then EAGAIN
            rk.read(ufd, 32)
        staging.view()[:4] = b"page"
        buf = bytearray(uffd.uffdio_copy_fmt.pack(address, staging.address, 4096, 0, 0))
        assert rk.ioctl(ufd, uffd.UFFDIO_COPY, buf) == 0
        assert uffd.uffdio_copy_fmt.unpack(buf) == (address, staging.address, 4096, 0, 4096)
        assert bytes(m.view()[0x3000:0x3004]) == b"page"  # the memory effect
        # the same page again: present now, so EEXIST with copy = -EEXIST, as the kernel says
        with pytest.raises(FileExistsError):
            rk.ioctl(ufd, uffd.UFFDIO_COPY, buf)
        assert uffd.uffdio_copy_fmt.unpack(buf)[4] == -errno.EEXIST
        # a page the recording never filled: a divergence naming the nearest recorded fill
        far = bytearray(uffd.uffdio_copy_fmt.pack(m.address + 0x5000, staging.address, 4096, 0, 0))
        with pytest.raises(ReplayDivergence) as ei:
            rk.ioctl(ufd, uffd.UFFDIO_COPY, far)
        assert "which the recording never filled" in str(ei.value)
        assert "expected #5" in str(ei.value)
    finally:
        rk.shutdown()


# -- the pure matcher ------------------------------------------------------------------------


def _c(seq: int, tid: int, name: str, kind: str = "userfaultfd", inp: bytes = b"") -> Call:
    return Call(seq=seq, tid=tid, t_ns=seq, dur_ns=0, op="ioctl", fd=5, fd_kind=kind,
                name=name, inp=inp)  # fmt: skip


def _live(name: str, kind: str = "userfaultfd", inp: bytes = b"") -> LiveCall:
    return LiveCall(op="ioctl", fd=5, fd_kind=kind, name=name, inp=inp)


def test_matcher_streams_are_independent() -> None:
    m = Matcher([_c(0, 1, "A", "kvm-vcpu:0"), _c(1, 2, "B", "kvm-vcpu:1"),
                 _c(2, 1, "C", "kvm-vcpu:0")])  # fmt: skip
    # vCPU 1 runs first this time: fine, its stream is its own
    assert m.match(_live("B", "kvm-vcpu:1")).seq == 1
    assert m.match(_live("A", "kvm-vcpu:0")).seq == 0
    assert m.match(_live("C", "kvm-vcpu:0")).seq == 2
    assert m.pending() == [] and m.finished()


def test_matcher_lets_threads_swap_but_keeps_each_threads_order() -> None:
    calls = [_c(0, 1, "X", inp=b"1"), _c(1, 2, "X", inp=b"2"), _c(2, 1, "X", inp=b"3")]
    m = Matcher(calls)
    assert m.match(_live("X", inp=b"2")).seq == 1  # thread 2's call ahead of thread 1's
    with pytest.raises(Divergence) as ei:
        m.match(_live("X", inp=b"3"))  # thread 1 must do "1" before "3"
    assert ei.value.expected is not None and ei.value.expected.seq == 0
    assert m.match(_live("X", inp=b"1")).seq == 0
    assert m.match(_live("X", inp=b"3")).seq == 2
    with pytest.raises(Divergence, match="no \\(more\\) calls on stream 'userfaultfd'"):
        m.match(_live("X", inp=b"4"))


def test_matcher_translates_live_addresses_before_comparing() -> None:
    inp = uffd.uffdio_range_fmt.pack(0x7F00_0000_1000, 4096)
    m = Matcher([_c(0, 1, "UFFDIO_WAKE", inp=inp)])
    m.addresses.add(0x7F00_0000_0000, 0x7E00_0000_0000, 1 << 20)
    live = uffd.uffdio_range_fmt.pack(0x7E00_0000_1000, 4096)
    assert m.match(_live("UFFDIO_WAKE", inp=live)).seq == 0


def test_address_map_words_bytes_and_removal() -> None:
    am = AddressMap()
    am.add(0x1000_0000, 0x9000_0000, 0x2000)
    assert am.word_a_to_b(0x1000_0010) == 0x9000_0010
    assert am.word_a_to_b(0x1000_2000) == 0x9000_2000  # an end address counts
    assert am.word_a_to_b(0x1000_2001) == 0x1000_2001
    assert am.word_b_to_a(0x9000_1000) == 0x1000_1000
    raw = (0x1000_0008).to_bytes(8, "little") + (5).to_bytes(8, "little")
    assert am.bytes_a_to_b(raw) == (0x9000_0008).to_bytes(8, "little") + (5).to_bytes(8, "little")
    am.remove_b(0x9000_0000, 0x2000)
    assert len(am) == 0 and am.word_a_to_b(0x1000_0010) == 0x1000_0010


def test_stream_keys_and_created_kinds() -> None:
    assert stream_of("mmap", "") == "mm"
    assert stream_of("open", "") == "files"
    assert stream_of("ioctl", "kvm-vcpu:1") == "kvm-vcpu:1"
    calls = [
        Call(seq=0, tid=1, t_ns=0, dur_ns=0, op="open", inp=b"/dev/kvm", ret=3),
        Call(seq=1, tid=1, t_ns=0, dur_ns=0, op="ioctl", fd=3, fd_kind="kvm",
             name="KVM_CREATE_VM", ret=4),
        Call(seq=2, tid=1, t_ns=0, dur_ns=0, op="ioctl", fd=4, fd_kind="kvm-vm",
             name="KVM_CREATE_VCPU", iarg=0, ret=5),
    ]  # fmt: skip
    assert created_kinds(calls) == {0: "kvm", 1: "kvm-vm", 2: "kvm-vcpu:0"}


# -- the CLI ------------------------------------------------------------------------------------


def _write(path: Path, header: Header, events: list[Event]) -> str:
    with TraceWriter(str(path), header) as w:
        for e in events:
            w.append(e)
    return str(path)


def test_cli_serve_a_recorded_hello(
    hello_trace: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, events, _ = hello_trace
    path = _write(tmp_path / "hello.trace", header, events)
    assert main(["replay", "--mode", "serve", path]) == 0
    out = capsys.readouterr().out
    assert "vCPU 0: stop=hlt exits=20 reports=[] serial='Hello from fakekvm\\n'" in out
    assert "same as recorded" in out
    # a trace cut after its KVM_RUNs: the run wants more than the trace has
    cut = [e for e in events if not (isinstance(e, Call) and e.name == "KVM_RUN")][:12]
    short = _write(tmp_path / "short.trace", header, cut)
    assert main(["replay", "--mode", "serve", short]) == 1
    assert "replay divergence: the trace has no (more) calls on stream" in capsys.readouterr().out


def test_cli_modes_not_there_yet_and_unsupported_traces(
    hello_trace: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, events, _ = hello_trace
    path = _write(tmp_path / "hello.trace", header, events)
    for mode in ("verify", "workload"):  # both re-run a `fakekvm migrate`: a GuestVM run has none
        assert main(["replay", "--mode", mode, path]) == 2
        assert "only `fakekvm migrate` recordings can be re-run" in capsys.readouterr().err
    # a migration recorded with both sides in one real-kernel trace cannot be served
    mig = _write(tmp_path / "mig.trace", Header(guest="random", argv=["fakekvm", "migrate",
                 "--same-process"]), events)  # fmt: skip
    assert main(["replay", "--mode", "serve", mig]) == 2
    assert "source and destination in one trace" in capsys.readouterr().err
    other = _write(tmp_path / "other.trace", Header(guest="echo"), events)
    assert main(["replay", "--mode", "serve", other]) == 2
    assert "not implemented yet" in capsys.readouterr().err
    assert main(["trace", "plot", path, "-o", str(tmp_path / "x.png")]) == 2
    assert "no faults to plot" in capsys.readouterr().err


# -- IO IN answers and several vCPUs -----------------------------------------------------------


def _echo(k: Kernel, inputs: list[int]) -> RunResult:
    feed = iter(inputs)

    def on_in(port: int, size: int, count: int) -> bytes:
        return next(feed).to_bytes(4, "little")

    with GuestVM(k, 2 << 20) as vm:
        vm.load(echo_image(2 << 20))
        return vm.run(on_io_in=on_in)


def test_echo_replays_and_a_different_in_answer_diverges() -> None:
    fake = FakeKernel()
    events: list[Event] = []
    rec = RecordingKernel(fake, events)
    try:
        recorded = _echo(rec, [5, 9, 0])
    finally:
        rec.shutdown()
    assert recorded.reports == [6, 10] and recorded.done == 0
    rk = ReplayKernel(Header(), events)
    try:
        assert _echo(rk, [5, 9, 0]).reports == [6, 10]
    finally:
        rk.shutdown()
    rk = ReplayKernel(Header(), events)
    try:
        with pytest.raises(ReplayDivergence) as ei:
            _echo(rk, [5, 7, 0])  # the VMM answers the second IN differently
    finally:
        rk.shutdown()
    text = str(ei.value)
    assert "KVM_RUN, 0 {answer=09000000}" in text.split("expected")[1]
    assert "got" in text and "KVM_RUN, 0 {answer=07000000}" in text.split("got")[-1]


def test_two_vcpus_replay_in_another_order_and_in_threads() -> None:
    fake = FakeKernel()
    events: list[Event] = []
    rec = RecordingKernel(fake, events)
    try:
        with GuestVM(rec, 1 << 20, vcpus=2) as vm:
            vm.load(hello_image())
            recorded = [vm.run(0).text, vm.run(1).text]
    finally:
        rec.shutdown()
    assert recorded == ["Hello from fakekvm\n"] * 2
    # replayed the other way round: each vCPU's calls are their own stream
    rk = ReplayKernel(Header(), events)
    try:
        with GuestVM(rk, 1 << 20, vcpus=2) as vm:
            vm.load(hello_image())
            assert [vm.run(1).text, vm.run(0).text] == recorded
        assert rk.pending() == [] and rk.divergence is None
    finally:
        rk.shutdown()
    # and from two threads at once
    rk = ReplayKernel(Header(), events)
    texts: dict[int, str] = {}
    try:
        with GuestVM(rk, 1 << 20, vcpus=2) as vm:
            vm.load(hello_image())
            start = threading.Barrier(2)

            def go(v: int) -> None:
                start.wait()
                texts[v] = vm.run(v).text

            threads = [threading.Thread(target=go, args=(v,)) for v in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert texts == {0: recorded[0], 1: recorded[1]}
        assert rk.divergence is None
    finally:
        rk.shutdown()


@pytest.mark.real_kernel
def test_a_real_kernel_run_is_served_without_kvm(real_kernel: Kernel) -> None:
    """The point of serve: a run recorded on this host's real KVM answers the same VMM code
    later with no KVM at all, exit for exit (and register for register)."""
    events: list[Event] = []
    rec = RecordingKernel(real_kernel, events)
    try:
        recorded = _hello(rec)
    finally:
        rec.stop_recording()
    assert recorded.text == "Hello from fakekvm\n"
    rk = ReplayKernel(Header(kernel="real"), events)
    try:
        replayed = _hello(rk)
    finally:
        rk.shutdown()
    assert replayed.exits == recorded.exits
    assert replayed.regs == recorded.regs
    assert rk.pending() == [] and rk.divergence is None
