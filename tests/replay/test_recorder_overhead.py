"""The recorder's cheap call path (raw rows, converted a chunk at a time) and ``bench --recorder``.

The recorder must still record exactly what it recorded before rows were deferred: every field
of every `Call` (checked field by field against a scripted kernel), the same events whether the
sink is a list (each call converted at once) or a `TraceWriter` (a chunk at a time, any chunk
size), every call of every thread exactly once with ``seq`` = trace order, chunks of exactly
``chunk_events`` calls whatever the threads do, and the faults derived across chunk
boundaries. The bench section runs on the fake and prints its figures (no timing is asserted).
"""

from __future__ import annotations

import errno
import io
import os
import select
import struct
import threading
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fakekvm.abi import kvm, mman, uffd
from fakekvm.fake import FakeKernel
from fakekvm.kernel.seam import IoctlArg
from fakekvm.testing import uffd_scenarios as S
from replay.events import Call, Contents, Event, Fault
from replay.format import TraceWriter, open_trace
from replay.recorder import RecordingKernel, make_header
from tools import bench_recorder as B

PAGE = mman.PAGE_SIZE
UFD_BASE = 0x7F0000000000
_MSG = struct.Struct("<B7xQQI4x")


class Scripted(B.NullKernel):
    """A kernel whose answers depend only on the calls: a counting clock, one tid per thread
    (by order of first call), ``UFFDIO_COPY`` fills its ``copy`` field, ``read`` on the uffd
    returns one PAGEFAULT per page of ``faults``, ioctl 0xAEFF fails ``EINVAL``."""

    name = "scripted"

    def __init__(self) -> None:
        super().__init__()
        self.clock = 1000
        self._lock = threading.Lock()
        self.tids: dict[int, int] = {}
        self.faults: list[int] = []

    def monotonic_ns(self) -> int:
        with self._lock:
            self.clock += 10
            return self.clock

    def gettid(self) -> int:
        me = threading.get_ident()
        with self._lock:
            return self.tids.setdefault(me, 500 + len(self.tids))

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        if request == 0xAEFF:
            raise OSError(errno.EINVAL, "scripted")
        if request == uffd.UFFDIO_COPY and isinstance(arg, bytearray):
            dst, src, length, mode, _ = uffd.uffdio_copy_fmt.unpack(arg)
            arg[:] = uffd.uffdio_copy_fmt.pack(dst, src, length, mode, length)
            return 0
        if request == kvm.KVM_CHECK_EXTENSION:
            return 1
        return super().ioctl(fd, request, arg)

    def read(self, fd: int, n: int) -> bytes:
        if not self.faults:
            return bytes(range(n))
        out = b"".join(_MSG.pack(uffd.UFFD_EVENT_PAGEFAULT, 0, a, 77) for a in self.faults)
        self.faults = []
        return out

    def fstat(self, fd: int) -> os.stat_result:
        return os.stat_result((0o600, 1, 2, 1, 0, 0, 4096, 0, 0, 0))


def drive(k: Any, kernel: Scripted) -> None:
    """Every kind of row: int and buffer ioctls (changed and unchanged buffers, a failure),
    uffd reads with faults and the copies that resolve them, a memfd read (guest data),
    poll, monotonic_ns, gettid, fstat, mmap."""
    kfd = k.open("/dev/kvm", os.O_RDWR)
    assert k.ioctl(kfd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_USER_MEMORY) == 1
    with pytest.raises(OSError) as ei:
        k.ioctl(kfd, 0xAEFF, 0)
    assert ei.value.errno == errno.EINVAL
    ufd = k.userfaultfd(os.O_CLOEXEC)
    api = bytearray(uffd.uffdio_api_fmt.pack(uffd.UFFD_API, 0, 0))
    k.ioctl(ufd, uffd.UFFDIO_API, api)  # unchanged buffer: out is recorded empty
    mfd = k.memfd_create("guest")
    efd = k.eventfd(0)
    for i in range(3):
        kernel.faults = [UFD_BASE + i * PAGE, UFD_BASE + (i + 7) * PAGE]
        k.poll([(ufd, select.POLLIN), (efd, select.POLLIN)], -1)
        msgs = k.read(ufd, 2048)
        assert len(msgs) == 64
        t = k.monotonic_ns()
        assert t > 0
        for a in (UFD_BASE + i * PAGE, UFD_BASE + (i + 7) * PAGE):
            buf = bytearray(uffd.uffdio_copy_fmt.pack(a, 0x1000, PAGE, 0, 0))
            k.ioctl(ufd, uffd.UFFDIO_COPY, buf)
            assert uffd.uffdio_copy_fmt.unpack(buf)[4] == PAGE
    assert k.read(mfd, 16) == bytes(range(16))
    assert k.pread(mfd, 8, 4096) == bytes(8)
    k.fstat(efd)
    k.gettid()
    k.mmap(-1, 2 * PAGE, mman.PROT_READ, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)


def expected_calls() -> list[tuple[Any, ...]]:
    """(op, fd_kind, name, iarg, inp-is-empty, out-is-empty, ret, errno) of `drive`'s calls."""
    want: list[tuple[Any, ...]] = [
        ("open", "", "", os.O_RDWR, False, True, 101, 0),
        ("ioctl", "kvm", "KVM_CHECK_EXTENSION", kvm.KVM_CAP_USER_MEMORY, True, True, 1, 0),
        ("ioctl", "kvm", None, 0, True, True, -1, errno.EINVAL),
        ("userfaultfd", "", "", os.O_CLOEXEC, True, True, 102, 0),
        ("ioctl", "userfaultfd", "UFFDIO_API", None, False, True, 0, 0),
        ("memfd_create", "", "", 0, False, True, 103, 0),
        ("eventfd", "", "", 0, True, True, 104, 0),
    ]
    for _ in range(3):
        want += [("poll", "", "", -1, False, False, 1, 0),
                 ("read", "userfaultfd", "", 2048, True, False, 64, 0),
                 ("monotonic_ns", "", "", None, True, True, None, 0)]  # fmt: skip
        want += [("ioctl", "userfaultfd", "UFFDIO_COPY", None, False, False, 0, 0)] * 2
    want += [
        ("read", "memfd", "", 16, True, True, 16, 0),  # guest memory: the length only
        ("pread", "memfd", "", 8, True, True, 8, 0),
        ("fstat", "eventfd", "", None, True, False, 0, 0),
        ("gettid", "", "", None, True, True, None, 0),
        ("mmap", "", "", 2 * PAGE, True, True, None, 0),
    ]
    return want


def record_list() -> tuple[list[Event], RecordingKernel]:
    kernel = Scripted()
    evs: list[Event] = []
    rec = RecordingKernel(kernel, evs, mechanism="uffd-missing")
    drive(rec, kernel)
    rec.stop_recording()
    return evs, rec


def record_trace(path: Path, chunk: int) -> tuple[list[Event], RecordingKernel]:
    kernel = Scripted()
    w = TraceWriter(path, make_header(kernel, doctor=False), chunk_events=chunk)
    rec = RecordingKernel(kernel, w, mechanism="uffd-missing")
    drive(rec, kernel)
    rec.stop_recording()
    r = open_trace(path, strict=True)
    evs = list(r)
    assert r.complete
    return evs, rec


def calls(evs: list[Event]) -> list[Call]:
    return [e for e in evs if isinstance(e, Call)]


def comparable(evs: list[Event]) -> list[Call]:
    """The calls, with mmap's address (a buffer of this process) zeroed."""
    return [msgspec.structs.replace(c, ret=0) if c.op == "mmap" else c for c in calls(evs)]


def test_every_field_of_every_call_kind() -> None:
    evs, rec = record_list()
    cs = calls(evs)
    want = expected_calls()
    assert len(cs) == len(want) == rec.calls
    assert [c.seq for c in cs] == list(range(len(cs)))
    for c, (op, kind, name, iarg, no_inp, no_out, ret, err) in zip(cs, want, strict=True):
        assert (c.op, c.fd_kind, c.iarg, c.errno) == (op, kind, iarg, err), c
        assert (c.inp == b"", c.out == b"") == (no_inp, no_out), c
        if name is not None:
            assert c.name == name, c
        else:
            assert c.name.startswith("_IOC("), c
        if ret is not None:
            assert c.ret == ret, c
        assert c.tid == 500 and c.dur_ns >= 0 and c.t_ns > 1000
    # the bytes themselves
    copy = next(c for c in cs if c.name == "UFFDIO_COPY")
    assert uffd.uffdio_copy_fmt.unpack(copy.out)[4] == PAGE
    assert uffd.uffdio_copy_fmt.unpack(copy.inp)[4] == 0
    poll = next(c for c in cs if c.op == "poll")
    assert poll.inp == struct.pack("<iHHiHH", 102, select.POLLIN, 0, 104, select.POLLIN, 0)
    assert poll.out == struct.pack("<iHHiHH", 102, select.POLLIN, select.POLLIN, 104,
                                   select.POLLIN, 0)  # fmt: skip
    mono = next(c for c in cs if c.op == "monotonic_ns")
    assert mono.ret == mono.t_ns and mono.dur_ns == 0
    gettid = next(c for c in cs if c.op == "gettid")
    assert gettid.ret == 500
    # faults: 6 observed by the reads, each resolved by its copy
    fs = [e for e in evs if isinstance(e, Fault)]
    assert len(fs) == 6 == rec.fault_count
    assert all(f.how == "copy" and f.tid == 77 and f.resolved_ns > f.observed_ns for f in fs)
    assert sorted(f.hva for f in fs) == sorted(
        UFD_BASE + (i + d) * PAGE for i in range(3) for d in (0, 7)
    )


@pytest.mark.parametrize("chunk", [1, 2, 5, 4096])
def test_a_trace_holds_the_same_events_as_a_list(tmp_path: Path, chunk: int) -> None:
    """Same calls, same bytes, same faults, whatever the chunk size (faults are derived when
    a chunk is written, so they may sit later in the file: compared as a set)."""
    listed, _ = record_list()
    traced, rec = record_trace(tmp_path / "t.trc", chunk)
    assert comparable(traced) == comparable(listed)
    key = lambda f: (f.hva, f.observed_ns)  # noqa: E731
    assert sorted((e for e in traced if isinstance(e, Fault)), key=key) == sorted(
        (e for e in listed if isinstance(e, Fault)), key=key
    )
    assert rec.fault_count == 6


def test_a_writer_closed_around_the_recorder_gets_every_call(tmp_path: Path) -> None:
    """``with TraceWriter(...) as w: run(RecordingKernel(k, w))``: the writer's own close writes
    the rows the recorder has not converted yet."""
    kernel = Scripted()
    p = tmp_path / "ctx.trc"
    with TraceWriter(p, make_header(kernel, doctor=False)) as w:
        drive(RecordingKernel(kernel, w), kernel)
    assert len(calls(list(open_trace(p, strict=True)))) == len(expected_calls())


def test_threads_every_call_once_in_seq_order_and_whole_chunks(tmp_path: Path) -> None:
    kernel = Scripted()
    p = tmp_path / "threads.trc"
    chunk = 7
    w = TraceWriter(p, make_header(kernel, doctor=False), chunk_events=chunk)
    rec = RecordingKernel(kernel, w)
    kfd = rec.open("/dev/kvm", os.O_RDWR)
    n_threads, n_calls = 4, 300
    barrier = threading.Barrier(n_threads)

    def worker(i: int) -> None:
        barrier.wait()
        for j in range(n_calls):
            if j % 3 == 0:
                rec.monotonic_ns()
            else:
                rec.ioctl(kfd, kvm.KVM_CHECK_EXTENSION, i * 1000 + j)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    total = 1 + n_threads * n_calls
    assert rec.calls == total
    rec.stop_recording()
    r = open_trace(p, strict=True)
    sizes = [sum(1 for e in c if isinstance(e, Call)) for c in r.chunks()]
    assert r.complete
    assert sizes[:-1] == [chunk] * (len(sizes) - 1) and 0 < sizes[-1] <= chunk
    cs = calls(list(open_trace(p, strict=True)))
    assert [c.seq for c in cs] == list(range(total))
    by_tid: dict[int, list[Call]] = {}
    for c in cs[1:]:
        by_tid.setdefault(c.tid, []).append(c)
    assert len(by_tid) == n_threads
    for own in by_tid.values():  # each thread's calls, all there, in its own order
        args = [c.iarg or 0 for c in own if c.op == "ioctl"]
        i = args[0] // 1000
        assert args == [i * 1000 + j for j in range(n_calls) if j % 3]
        assert sum(1 for c in own if c.op == "monotonic_ns") == len(range(0, n_calls, 3))
        assert [c.t_ns for c in own] == sorted(c.t_ns for c in own)


def test_calls_after_stop_are_forwarded_not_recorded(tmp_path: Path) -> None:
    kernel = Scripted()
    evs: list[Event] = []
    rec = RecordingKernel(kernel, evs)
    kfd = rec.open("/dev/kvm", os.O_RDWR)
    rec.stop_recording()
    n = len(evs)
    assert rec.ioctl(kfd, kvm.KVM_CHECK_EXTENSION, 1) == 1
    assert rec.monotonic_ns() > 0
    assert len(evs) == n == 1


def test_faults_across_chunks_on_the_fake(tmp_path: Path) -> None:
    """A uffd scenario on the fake, written with 2-event chunks: every fault derived, resolved
    by the right call, although its read and its copy sit in different chunks."""
    p = tmp_path / "uffd.trc"
    with FakeKernel(profile="6.18-pvm") as fk:
        w = TraceWriter(p, make_header(fk, doctor=False), chunk_events=2)
        k = RecordingKernel(fk, w, mechanism="uffd-missing")
        m = S.anon(k, 3)
        a = m.address
        src = S.src_page(k, 0x42)
        fd = S.new_uffd(k, uffd.UFFD_FEATURE_THREAD_ID)
        assert S.register(k, fd, a, 3 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)[0] == "0"
        touchers = []
        for i in range(3):
            t = S.touch_in_thread(k, a + i * PAGE, write=False)
            t.wait_blocked()
            touchers.append(t)
        got = 0
        while got < 3 * 32:
            got += len(k.read(fd, 32 * 3))
        for i in range(3):
            assert S.copy(k, fd, a + i * PAGE, src.address) == ("0", PAGE)
        for t in touchers:
            t.join()
        k.stop_recording()
    evs = list(open_trace(p, strict=True))
    fs = [e for e in evs if isinstance(e, Fault)]
    cs = {c.seq: c for c in calls(evs)}
    assert sorted(f.hva - a for f in fs) == [0, PAGE, 2 * PAGE]
    assert all(f.how == "copy" and cs[f.seq].op == "read" for f in fs)
    assert {f.tid for f in fs} == {t.tid for t in touchers}


def test_with_contents_rows_keep_their_call(tmp_path: Path) -> None:
    kernel = Scripted()
    p = tmp_path / "c.trc"
    w = TraceWriter(p, make_header(kernel, doctor=False), chunk_events=3)
    rec = RecordingKernel(kernel, w, with_contents=True)
    ufd = rec.userfaultfd(0)
    src = (B.ctypes.c_ubyte * PAGE)(*([0x5A] * PAGE))
    for i in range(4):
        buf = bytearray(uffd.uffdio_copy_fmt.pack(UFD_BASE + i * PAGE,
                                                  B.ctypes.addressof(src), PAGE, 0, 0))  # fmt: skip
        rec.ioctl(ufd, uffd.UFFDIO_COPY, buf)
    rec.stop_recording()
    evs = list(open_trace(p, strict=True))
    cs = {c.seq: c for c in calls(evs)}
    cont = [e for e in evs if isinstance(e, Contents)]
    assert len(cont) == 4
    for c in cont:
        assert cs[c.seq].name == "UFFDIO_COPY" and c.data == bytes([0x5A]) * PAGE
        assert uffd.uffdio_copy_fmt.unpack(cs[c.seq].inp)[0] == c.hva


# ---------------------------------------------------------------------------------------------
# The bench section
# ---------------------------------------------------------------------------------------------


def test_analyse_trace_and_the_figure(tmp_path: Path) -> None:
    """Calls per fault by op, the calls inside fault windows, and the arithmetic of the figure."""
    record_trace(tmp_path / "a.trc", 4096)
    run = B.analyse_trace(str(tmp_path / "a.trc"))
    assert run.faults == 6
    # buffer ioctls count as copies (UFFDIO_API too), int ioctls as KVM_CHECK_EXTENSION
    assert run.calls["uffdio_copy"] == 7 and run.calls["check_extension"] == 2
    assert run.calls["poll"] == 3 and run.calls["read"] == 4
    assert run.calls["monotonic_ns"] == 4  # 3 + the gettid
    assert run.calls["other"] == 7  # open userfaultfd memfd_create eventfd pread fstat mmap
    # each window runs from a read's end to its second copy: that read, the monotonic_ns,
    # the copies; and the poll that woke each revealing read
    assert dict(run.calls_in_faults) == {"read": 3, "monotonic_ns": 3, "uffdio_copy": 6,
                                         "poll": 3}  # fmt: skip
    costs = [B.CallCost(op, 1.0, 2.0, 1.0) for op in B.OPS]
    costs[1] = B.CallCost("uffdio_copy", 1.0, 4.0, 3.0)
    fig = B.per_fault_figure("scripted", run, 100.0, costs, window=True)
    assert fig.parts["uffdio_copy"] == (1.0, 3.0)
    assert fig.added_us == pytest.approx(sum(n * us for n, us in fig.parts.values()))
    assert fig.pct == pytest.approx(fig.added_us)  # over 100 µs
    whole = B.per_fault_figure("scripted", run, 100.0, costs, window=False)
    assert whole.added_us > fig.added_us


def test_bench_recorder_runs_on_the_fake_and_prints_its_figures() -> None:
    from tools.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["bench", "--recorder", "fake", "--recorder-pairs", "1", "--quick"]) == 0
    text = out.getvalue()
    assert "kernel fake" in text and "target" in text
    for op in (*B.OPS, "kvm_run"):
        assert f"   {op}" in text
    assert "one recorded migration" in text
    assert "A/B of whole migrations, 1 interleaved pairs" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("recorder overhead per fault:")
    assert last.endswith(("PASS", "FAIL", "n/a"))


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_call_costs_on_the_real_kernel_record_real_calls(tmp_path: Path) -> None:
    """The per-call measurement drives the real kernel through the recorder: its trace holds
    the real UFFDIO_COPY answers (copy = 4096) for every page it placed."""
    from fakekvm.kernel.real import RealKernel

    paths: list[str] = []

    def keep(inner: Any, path: str) -> Any:
        p = str(tmp_path / f"k{len(paths)}.trc")
        paths.append(p)
        return B.default_recorder(inner, p)

    costs = B.call_costs(RealKernel(), keep, n=64, blocks=3, ops=("uffdio_copy", "read"))
    assert [c.op for c in costs] == ["uffdio_copy", "read"]
    assert all(c.plain_us > 0 and c.recorded_us > 0 for c in costs)
    cs = [c for c in calls(list(open_trace(paths[0], strict=True))) if c.name == "UFFDIO_COPY"]
    assert len(cs) == 64 // 4 + 3 * 64  # the warm-up and the recorded blocks
    assert all(c.errno == 0 and uffd.uffdio_copy_fmt.unpack(c.out)[4] == PAGE for c in cs)


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_in_situ_timing_counts_the_fault_path_calls_of_a_real_migration() -> None:
    """The in-situ measurement wraps the recorder (and, as control, a plain forwarder) in a
    real migration: every fault's read and copy are timed; the recorder is restored after."""
    from replay import recorder as R

    cls = R.RecordingKernel
    for control in (True, False):
        r = B.insitu("64M", "random", seed=5, control=control)  # 64M: faults certain
        assert R.RecordingKernel is cls and not R._ACTIVE
        assert r.faults > 0 and r.p50_us > 0
        assert r.ops["read"][0] >= 1 and r.ops["poll"][0] >= 1
        copies = r.ops["ioctl" if control else "uffdio_copy"][0]
        # demand copies were timed (not one a fault: the push resolves many faults of 64 MiB)
        assert copies >= 1
        assert all(us >= 0 for _, us in r.ops.values())
        assert set(r.median_us) == set(r.ops)


def test_bench_json_keeps_the_counts(tmp_path: Path) -> None:
    """``--json``: the per-op counts come out as a mapping op -> count."""
    record_trace(tmp_path / "j.trc", 4096)
    run = B.analyse_trace(str(tmp_path / "j.trc"))
    costs = [B.CallCost(op, 1.0, 2.0, 1.0) for op in B.OPS]
    fig = B.per_fault_figure("scripted", run, 100.0, costs, window=True)
    b = B.RecorderBench("scripted", costs, costs, costs, run, 100.0, fig, fig)
    out = io.StringIO()
    with redirect_stdout(out):
        B.print_json(b)
    data = __import__("json").loads(out.getvalue())
    assert data["run"]["calls"]["uffdio_copy"] == 7 and data["verdict"] == "PASS"
    assert data["pct"] == pytest.approx(fig.pct)
