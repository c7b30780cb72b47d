"""The serve model's rules (`replay.serve_model`), driven without threads or fds, and the
matcher's teardown rule; plus the two blocking behaviours of `ReplayKernel` built on them."""

from __future__ import annotations

import errno
import struct
import threading

import pytest

from fakekvm.abi import kvm, uffd
from replay.events import Call, Header
from replay.match import Divergence, LiveCall, Matcher
from replay.serve import ReplayDivergence, ReplayKernel
from replay.serve_model import ModelDivergence, ServeModel

PS = 4096
BASE = 0x7F00_0000_0000  # recorded guest memory
UFD = 11
EFD = 12
VCPU_TID = 500
MAIN = 1
FAULT = 2
PLACER = 3


def _c(seq: int, op: str, *, tid: int = MAIN, t: int | None = None, dur: int = 1,
       **kw: object) -> Call:  # fmt: skip
    return Call(seq=seq, tid=tid, t_ns=seq * 10 if t is None else t, dur_ns=dur, op=op, **kw)  # type: ignore[arg-type]


def _register(seq: int, start: int = BASE, length: int = 8 * PS) -> Call:
    return _c(seq, "ioctl", fd=UFD, fd_kind="userfaultfd", name="UFFDIO_REGISTER",
              request=uffd.UFFDIO_REGISTER,
              inp=uffd.uffdio_register_fmt.pack(start, length, 1, 0))  # fmt: skip


def _copy(seq: int, dst: int, n: int, *, done: int | None = None, err: int = 0) -> Call:
    d = n * PS if done is None else done
    return _c(seq, "ioctl", tid=PLACER, fd=UFD, fd_kind="userfaultfd", name="UFFDIO_COPY",
              request=uffd.UFFDIO_COPY, inp=uffd.uffdio_copy_fmt.pack(dst, 0x1000, n * PS, 0, 0),
              out=uffd.uffdio_copy_fmt.pack(dst, 0x1000, n * PS, 0, d), errno=err)  # fmt: skip


def _msg(address: int, ptid: int = VCPU_TID) -> bytes:
    return uffd.uffd_msg_pagefault_fmt.pack(uffd.UFFD_EVENT_PAGEFAULT, 0, address, ptid)


def _read(seq: int, *msgs: bytes, t: int) -> Call:
    data = b"".join(msgs)
    return _c(seq, "read", tid=FAULT, t=t, fd=UFD, fd_kind="userfaultfd", iarg=2048, out=data,
              ret=len(data))  # fmt: skip


def _run(seq: int, t: int, dur: int) -> Call:
    return _c(seq, "ioctl", tid=VCPU_TID, t=t, dur=dur, fd=15, fd_kind="kvm-vcpu:0",
              name="KVM_RUN", request=kvm.KVM_RUN, iarg=0)  # fmt: skip


def _fill_in(dst: int, n: int) -> bytes:
    return uffd.uffdio_copy_fmt.pack(dst, 0x5000, n * PS, 0, 0)


# -- fills -------------------------------------------------------------------------------------


def _filled_model() -> ServeModel:
    """Pages 0-5 of an 8-page range were copied in the recording (6 and 7 never)."""
    calls = [_register(0), _copy(1, BASE, 4), _copy(2, BASE + 4 * PS, 2)]
    m = ServeModel(calls)
    m.registered(UFD, BASE, 8 * PS)
    return m


def test_fill_answers_follow_the_kernel() -> None:
    m = _filled_model()
    a = m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + PS, 2))  # pages 1-2: placed
    assert (a.errno, a.done, a.result) == (0, 2 * PS, 2 * PS)
    # pages 0-3: page 0 is missing, page 1 present -> partial progress, EAGAIN, copy = 4096
    a = m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE, 4))
    assert (a.errno, a.done, a.result) == (errno.EAGAIN, PS, PS)
    # at the first page -> EEXIST, copy = -EEXIST
    a = m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + PS, 1))
    assert (a.errno, a.done, a.result) == (errno.EEXIST, 0, -errno.EEXIST)
    # ZEROPAGE of a present page: EEXIST too (the kind check needs pages placed)
    z = uffd.uffdio_zeropage_fmt.pack(BASE, PS, 0, 0)
    assert m.fill(UFD, uffd.UFFDIO_ZEROPAGE, z).errno == errno.EEXIST
    # unaligned -> EINVAL; outside the registered range -> ENOENT (-2)
    assert m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + 1, 1)).errno == errno.EINVAL
    a = m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + 8 * PS, 1))
    assert (a.errno, a.result) == (errno.ENOENT, -errno.ENOENT)
    assert m.counters["pages"] == 3 and m.counters["eexist"] == 2 and m.counters["eagain"] == 1
    m.unregistered(UFD, BASE, 8 * PS)
    assert m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + 3 * PS, 1)).errno == errno.ENOENT
    assert m.wake(UFD, uffd.uffdio_range_fmt.pack(BASE, PS)) == 0
    assert m.wake(UFD, uffd.uffdio_range_fmt.pack(BASE, 0)) == errno.EINVAL


def test_a_fill_the_recording_never_made_diverges() -> None:
    m = _filled_model()
    with pytest.raises(ModelDivergence, match="page 6 of the registered range") as ei:
        m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + 5 * PS, 2))  # page 6: never filled
    assert ei.value.expected is not None and ei.value.expected.seq == 2  # the nearest fill
    z = uffd.uffdio_zeropage_fmt.pack(BASE + 3 * PS, PS, 0, 0)
    with pytest.raises(ModelDivergence, match="recording filled only with UFFDIO_COPY"):
        m.fill(UFD, uffd.UFFDIO_ZEROPAGE, z)  # places a page, with a kind never used to fill


def test_coverage_is_checked_at_the_end() -> None:
    m = _filled_model()
    assert m.covered_pages() == 6
    m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE, 4))
    problems = m.finish()
    assert len(problems) == 1 and "coverage: 2 page(s)" in problems[0]
    assert f"{BASE + 4 * PS:#x}" in problems[0]
    m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + 4 * PS, 2))
    assert m.finish() == []


def test_recorded_partial_fills_cover_only_the_bytes_done() -> None:
    calls = [_register(0), _copy(1, BASE, 3, done=PS, err=errno.EAGAIN)]
    m = ServeModel(calls)
    assert m.covered_pages() == 1


# -- messages and KVM_RUN gates ----------------------------------------------------------------


def _faulting_model() -> ServeModel:
    """vCPU 0 faults on page 2 during its second KVM_RUN (t 100..200) and, earlier, on page 0
    during its first (t 10..50); the fault thread read both."""
    calls = [
        _register(0),
        _c(1, "gettid", tid=VCPU_TID, ret=VCPU_TID),
        _run(2, t=10, dur=40),
        _read(3, _msg(BASE), t=20),
        _run(4, t=100, dur=100),
        _read(5, _msg(BASE + 2 * PS), t=150),
        _copy(6, BASE, 8),
    ]
    m = ServeModel(calls)
    m.registered(UFD, BASE, 8 * PS)
    return m


def test_a_vcpus_fault_is_read_only_after_it_entered_that_run() -> None:
    m = _faulting_model()
    assert not m.readable(UFD) and m.read_messages(UFD, 2048) is None
    assert m.gettid(live_thread=4242) == VCPU_TID  # the live vCPU thread stands for vCPU 0
    assert m.run_entered(0, live_thread=4242) == 0
    assert m.readable(UFD)
    assert m.read_messages(UFD, 2048) == _msg(BASE)
    assert m.read_messages(UFD, 2048) is None  # the second fault: in the second run
    assert m.run_entered(0, live_thread=4242) == 1
    assert m.read_messages(UFD, 2048) == _msg(BASE + 2 * PS)
    assert m.counters["messages"] == 2


def test_a_run_waits_for_the_pages_its_faults_asked_for() -> None:
    m = _faulting_model()
    assert m.run_waits_for(0, 0) == [BASE]
    assert m.run_waits_for(0, 1) == [BASE + 2 * PS]
    m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + 2 * PS, 1))
    assert m.run_waits_for(0, 1) == [] and m.run_waits_for(0, 0) == [BASE]


def test_ptid_becomes_the_live_vcpu_threads_tid() -> None:
    calls = [
        _c(0, "gettid", tid=VCPU_TID, ret=VCPU_TID),
        _c(1, "gettid", tid=VCPU_TID + 1, ret=VCPU_TID + 1),
        _run(2, t=10, dur=100),
        Call(
            seq=3,
            tid=VCPU_TID + 1,
            t_ns=10,
            dur_ns=100,
            op="ioctl",
            fd=16,
            fd_kind="kvm-vcpu:1",
            name="KVM_RUN",
            iarg=0,
        ),
        _read(4, _msg(BASE, VCPU_TID), t=50),
    ]
    m = ServeModel(calls)
    # the live threads asked in the other order: vCPU 1's thread got vCPU 0's recorded tid
    assert m.gettid(live_thread=71) == VCPU_TID
    assert m.gettid(live_thread=70) == VCPU_TID + 1
    assert m.gettid(live_thread=71) == VCPU_TID  # a thread keeps its tid
    assert m.gettid(live_thread=72) is None  # none left: the live one
    m.run_entered(1, live_thread=71)
    m.run_entered(0, live_thread=70)
    data = m.read_messages(UFD, 32)
    assert data is not None and uffd.uffd_msg_pagefault_fmt.unpack(data)[3] == VCPU_TID + 1


def test_a_read_smaller_than_the_batch_takes_whole_messages() -> None:
    m = ServeModel([_read(0, _msg(BASE), _msg(BASE + PS), _msg(BASE + 2 * PS), t=0)])
    assert m.read_messages(UFD, 70) == _msg(BASE) + _msg(BASE + PS)
    assert m.read_messages(UFD, 70) == _msg(BASE + 2 * PS)
    assert m.read_messages(UFD, 70) is None


def test_unregistering_takes_the_faults_away_and_unread_faults_count_only_if_unfilled() -> None:
    m = _faulting_model()
    problems = m.finish()
    assert any("2 recorded page fault(s) never read and never filled" in p for p in problems)
    m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE, 1))
    assert any("1 recorded page fault(s)" in p for p in m.finish())
    m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + PS, 7))
    assert m.finish() == []  # the live run filled those pages first: no fault needed
    m2 = _faulting_model()
    m2.run_entered(0, live_thread=1)
    m2.unregistered(UFD, BASE, 8 * PS)
    assert m2.read_messages(UFD, 2048) is None and m2.counters["dropped"] == 1


# -- eventfds, poll, attributes, pooled mmaps, gettid ------------------------------------------


def test_eventfd_and_poll() -> None:
    pollset = struct.pack("<iHHiHH", UFD, 1, 0, EFD, 1, 0)
    m = ServeModel([_c(0, "poll", inp=pollset, iarg=-1)])
    kinds = {UFD: "userfaultfd", EFD: "eventfd"}
    m.eventfd_created(EFD, 0)
    assert m.check_pollset(pollset) and not m.check_pollset(pollset[:8])
    assert m.poll_ready([(UFD, 1), (EFD, 1)], kinds) == []
    assert m.eventfd_read(EFD, 8) == -errno.EAGAIN
    assert m.eventfd_write(EFD, (2).to_bytes(8, "little")) == 8
    assert m.eventfd_write(EFD, (1).to_bytes(8, "little")) == 8
    assert m.poll_ready([(UFD, 1), (EFD, 1)], kinds) == [(EFD, 1)]
    assert m.eventfd_read(EFD, 4) == -errno.EINVAL
    assert m.eventfd_read(EFD, 8) == (3).to_bytes(8, "little")
    assert m.poll_ready([(EFD, 1)], kinds) == []


def _attrs(seq: int, gfn: int, n: int, value: int, tid: int = PLACER) -> Call:
    return _c(seq, "ioctl", tid=tid, fd=14, fd_kind="kvm-vm", name="KVM_SET_MEMORY_ATTRIBUTES",
              request=kvm.KVM_SET_MEMORY_ATTRIBUTES,
              inp=struct.pack("<QQQQ", gfn * PS, n * PS, value, 0))  # fmt: skip


def test_workers_conversions_are_compared_by_their_final_state() -> None:
    private = kvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
    calls = [_c(0, "open", inp=b"/dev/kvm", ret=3), _attrs(1, 0, 4, private),
             _attrs(2, 4, 4, private)]  # fmt: skip
    m = ServeModel(calls)
    assert [c.seq for c in m.ordered] == [0]  # the workers' calls are the model's
    for g in (3, 0, 1, 2, 4, 5, 6):  # another batching, another order
        assert m.set_attributes(struct.pack("<QQQQ", g * PS, PS, private, 0)) == 0
    assert any(p.startswith("attributes:") for p in m.finish())
    assert m.set_attributes(struct.pack("<QQQQ", 7 * PS, PS, private, 0)) == 0
    assert m.finish() == []
    with pytest.raises(ModelDivergence, match="sets 0x4; the recording's workers set only 0x8"):
        m.set_attributes(struct.pack("<QQQQ", 0, PS, 4, 0))
    assert m.set_attributes(struct.pack("<QQQQ", 1, PS, private, 0)) == errno.EINVAL


def test_worker_buffers_are_pooled_and_main_thread_calls_stay_ordered() -> None:
    calls = [
        _c(0, "mmap", iarg=PS, args=[3, 0x22, 0, 0], ret=0x1000_0000),
        _c(1, "mmap", tid=PLACER, iarg=2 * PS, args=[3, 0x22, 0, 0], ret=0x2000_0000),
    ]
    m = ServeModel(calls)
    assert [c.seq for c in m.ordered] == [0]
    assert m.take_pooled_mmap(PS, (3, 0x22, 0, 0)) is None
    got = m.take_pooled_mmap(2 * PS, (3, 0x22, 0, 0))
    assert got is not None and got.seq == 1 and m.pool == []


# -- the matcher's teardown rule ---------------------------------------------------------------


def test_closes_and_munmaps_match_in_any_order_and_hold_nothing_back() -> None:
    calls = [
        _c(0, "munmap", args=[0x1000, PS]),
        _c(1, "munmap", args=[0x9000, PS]),
        _c(2, "mmap", iarg=PS, args=[3, 0x22, 0, 0], ret=0x5000),
    ]
    m = Matcher(calls, window=1)
    # the thread's mmap first, although its two munmaps are pending before it
    assert m.match(LiveCall(op="mmap", iarg=PS, args=(3, 0x22, 0, 0))).seq == 2
    assert m.match(LiveCall(op="munmap", args=(0x9000, PS))).seq == 1  # beyond the window
    with pytest.raises(Divergence):
        m.match(LiveCall(op="munmap", args=(0x7000, PS)))
    assert m.match(LiveCall(op="munmap", args=(0x1000, PS))).seq == 0


# -- blocking in ReplayKernel ------------------------------------------------------------------


def test_a_run_whose_page_never_comes_is_reported_not_hung() -> None:
    calls = [
        _c(0, "open", inp=b"/dev/kvm", iarg=0, args=[0o600], ret=3),
        _c(1, "ioctl", fd=3, fd_kind="kvm", name="KVM_CREATE_VM", request=kvm.KVM_CREATE_VM,
           iarg=0, ret=14),
        _c(2, "ioctl", fd=14, fd_kind="kvm-vm", name="KVM_CREATE_VCPU",
           request=kvm.KVM_CREATE_VCPU, iarg=0, ret=15),
        _c(3, "mmap", iarg=8 * PS, args=[3, 0x4022, 0, 0], ret=BASE),
        _c(4, "userfaultfd", iarg=0, ret=UFD),
        _register(5),
        _run(6, t=100, dur=100),
        _read(7, _msg(BASE + 3 * PS), t=150),
        _copy(8, BASE, 8),
    ]  # fmt: skip
    rk = ReplayKernel(Header(), calls, patience=0.05)
    try:
        kfd = rk.open("/dev/kvm", 0)
        vm = rk.ioctl(kfd, kvm.KVM_CREATE_VM, 0)
        vcpu = rk.ioctl(vm, kvm.KVM_CREATE_VCPU, 0)
        mem = rk.mmap(-1, 8 * PS, 3, 0x4022)
        ufd = rk.userfaultfd(0)
        rk.ioctl(ufd, uffd.UFFDIO_REGISTER, bytearray(uffd.uffdio_register_fmt.pack(
            mem.address, 8 * PS, 1, 0)))  # fmt: skip
        with pytest.raises(ReplayDivergence) as ei:
            rk.ioctl(vcpu, kvm.KVM_RUN, 0)  # nobody fills page 3
    finally:
        rk.shutdown()
    text = str(ei.value)
    assert "stuck for 0.05 s" in text and "KVM_RUN #6" in text
    assert f"{mem.address + 3 * PS:#x}" in text  # the live address of the page
    assert rk.divergence is ei.value


def test_poll_blocks_until_another_thread_kicks_the_eventfd() -> None:
    pollset = struct.pack("<iHHiHH", UFD, 1, 0, EFD, 1, 0)
    calls = [
        _c(0, "userfaultfd", iarg=0, ret=UFD),
        _c(1, "eventfd", iarg=0, args=[0], ret=EFD),
        _c(2, "poll", tid=FAULT, inp=pollset, iarg=-1),
        _c(3, "write", fd=EFD, fd_kind="eventfd", inp=(1).to_bytes(8, "little"), ret=8),
    ]
    rk = ReplayKernel(Header(), calls, patience=30.0)
    got: list[list[tuple[int, int]]] = []
    try:
        assert rk.userfaultfd(0) == UFD and rk.eventfd(0, 0) == EFD
        t = threading.Thread(target=lambda: got.append(rk.poll([(UFD, 1), (EFD, 1)], None)))
        t.start()
        rk.write(EFD, (1).to_bytes(8, "little"))
        t.join()
        assert got == [[(EFD, 1)]]
        assert rk.read(EFD, 8) == (1).to_bytes(8, "little")
        with pytest.raises(BlockingIOError):
            rk.read(UFD, 2048)  # nothing recorded to deliver: EAGAIN
        assert rk.poll([(UFD, 1), (EFD, 1)], 0) == []
        with pytest.raises(ReplayDivergence, match="never polled"):
            rk.poll([(UFD, 1)], 0)
    finally:
        rk.shutdown()


def _remove_msg(start: int, end: int) -> bytes:
    return uffd.uffd_msg_remove_fmt.pack(uffd.UFFD_EVENT_REMOVE, start, end)


def test_a_balloons_remove_gates_fills_until_it_is_read() -> None:
    """madvise(DONTNEED) over registered memory raises the next recorded REMOVE (deliverable
    only then); until it is read fills answer EAGAIN with no progress; the dropped pages can
    then be filled again, by UFFDIO_ZEROPAGE too, and coverage counts pages ever filled."""
    calls = [
        _register(0),
        _copy(1, BASE, 8),
        _read(2, _remove_msg(BASE + 2 * PS, BASE + 4 * PS), t=30),
        _c(3, "madvise", tid=7, args=[BASE + 2 * PS, 2 * PS, 4]),
    ]
    m = ServeModel(calls)
    m.registered(UFD, BASE, 8 * PS)
    assert m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE, 8)).errno == 0
    assert m.read_messages(UFD, 2048) is None  # no madvise yet: nothing raised
    assert m.removed(BASE + 2 * PS, 2 * PS, 3) == 0  # MADV_WILLNEED drops nothing
    assert m.removed(BASE + 2 * PS, 2 * PS, 4) == 1
    a = m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + 2 * PS, 1))
    assert (a.errno, a.done, a.result) == (errno.EAGAIN, 0, -errno.EAGAIN)
    assert m.wake(UFD, uffd.uffdio_range_fmt.pack(BASE, PS)) == errno.EAGAIN
    assert m.read_messages(UFD, 2048) == _remove_msg(BASE + 2 * PS, BASE + 4 * PS)
    assert m.removes_read == 1
    z = uffd.uffdio_zeropage_fmt.pack(BASE + 2 * PS, 2 * PS, 0, 0)
    assert m.fill(UFD, uffd.UFFDIO_ZEROPAGE, z).errno == 0  # zeros: right for a dropped page
    assert m.fill(UFD, uffd.UFFDIO_COPY, _fill_in(BASE + 2 * PS, 1)).errno == errno.EEXIST
    assert m.finish() == []
    m.unregistered(UFD, BASE, 8 * PS)
    assert m.removed(BASE, PS, 4) == 0  # not registered any more: no event


def test_a_workers_unrecorded_buffer_is_served_but_not_the_main_threads() -> None:
    calls = [_c(0, "mmap", iarg=PS, args=[3, 0x22, 0, 0], ret=0x1000_0000)]
    rk = ReplayKernel(Header(), calls)
    try:
        m = rk.mmap(-1, PS, 3, 0x22)  # the first call: this thread is the engine's main
        got: list[int] = []

        def worker() -> None:
            w = rk.mmap(-1, 2 * PS, 3, 0x22)  # not in the trace: a staging buffer grown
            w.view()[0] = 7
            got.append(w.view()[0])
            rk.munmap(w.address, 2 * PS)

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert got == [7] and rk.model.counters["extra_maps"] == 1
        with pytest.raises(ReplayDivergence, match="stream 'mm'"):
            rk.mmap(-1, 2 * PS, 3, 0x22)  # the main thread's calls stay ordered
        assert rk.addresses.word_b_to_a(m.address) == 0x1000_0000
    finally:
        rk.shutdown()
