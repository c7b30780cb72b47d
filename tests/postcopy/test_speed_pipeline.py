"""The speed work of issue 5: the background pipeline, thread placement, the working-set push order.

* bulk staging slots: the receiver fills one slot while the placer thread COPYs
  another (:class:`postcopy.mechanisms.base.Staging`, ``Destination``'s placer);
* a placer that fails ends the migration with its error, never a hang;
* :mod:`postcopy.threadprio`: SCHED_IDLE / nice / pinning act on the calling thread;
* :mod:`postcopy.workingset`: a trace's faults become the source's push order.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from fakekvm.fake import FakeKernel
from fakekvm.kernel.real import RealKernel
from postcopy import threadprio
from postcopy import transport as tp
from postcopy.destination import Destination
from postcopy.mechanisms import make_mechanism
from postcopy.mechanisms.base import Staging
from postcopy.mechanisms.uffd_missing import UffdMissing
from postcopy.migrate import MigrateOptions, make_source, migrate
from postcopy.pages import page_digests
from postcopy.schedule import Policy
from postcopy.source import Source
from postcopy.workingset import fault_pages, order_pages

PS = 4096
T = TypeVar("T")


def test_staging_has_a_demand_buffer_and_distinct_bulk_slots() -> None:
    k = RealKernel()
    st = Staging(k, PS, pages=4, bulk_slots=3)
    try:
        addrs = {st.get(4, True)[0]} | {st.get(4, False, s)[0] for s in range(3)}
        assert len(addrs) == 4  # demand + 3 slots, no two share memory
        a0, v0 = st.get(2, False, 1)
        v0[:] = b"\x01" * (2 * PS)
        assert bytes(st.get(2, False, 2)[1][:1]) == b"\x00"  # another slot is untouched
        _, big = st.get(9, False, 2)  # a larger frame grows only that slot
        assert len(big) == 9 * PS and st.get(4, False, 1)[0] == a0
    finally:
        st.close()


def _fake_migration(mech: UffdMissing, pages: int = 512) -> tuple[Destination, bytes, bytes]:
    """Migrate ``pages`` pages of a pattern from a Source to a Destination on the fake,
    over in-memory transports, with the vCPUs not running (background only)."""
    mem = bytearray(os.urandom(PS) * 3 + bytes(PS)) * (pages // 4)
    src = Source(mem, [[bytes(144), bytes(312)]], batch_pages=16)
    d_dem, s_dem = tp.memory_pair()
    d_bulk, s_bulk = tp.memory_pair()
    src.serve(s_dem, s_bulk)
    dest = Destination(FakeKernel(), mech, connect=lambda: (d_dem, d_bulk), run_vcpus=False)
    seen: list[bytes] = []
    dest.inspect = lambda d: seen.append(page_digests(d.guest_view(), 0, pages))
    try:
        dest.run()
    finally:
        src.close()
    return dest, page_digests(mem, 0, pages), seen[0] if seen else b""


def test_background_batches_go_through_the_placer_thread() -> None:
    mech = UffdMissing(bulk_slots=3)
    placed_on: set[str] = set()
    slots: set[int] = set()
    place_slot = mech.place_slot

    def spy(start: int, count: int, slot: int) -> None:
        placed_on.add(threading.current_thread().name)
        slots.add(slot)
        place_slot(start, count, slot)

    mech.place_slot = spy  # type: ignore[method-assign]
    dest, want, got = _fake_migration(mech)
    assert got == want
    assert placed_on == {"postcopy-placer"} and slots <= {0, 1, 2} and len(slots) > 1
    assert dest.stats.pages_background == 512 and dest.nr_placed == 512
    assert dest._placer is not None and not dest._placer.is_alive()


def test_one_slot_places_on_the_receiver_as_before() -> None:
    mech = UffdMissing(bulk_slots=1)
    names: set[str] = set()
    place = mech.place

    def spy(start: int, count: int, demand: bool) -> None:
        names.add(threading.current_thread().name)
        place(start, count, demand)

    mech.place = spy  # type: ignore[method-assign]
    dest, want, got = _fake_migration(mech)
    assert got == want and dest._placer is None
    assert names == {"postcopy-fetch-bulk"}


def test_a_failing_placer_ends_the_migration_with_its_error() -> None:
    mech = UffdMissing(bulk_slots=2)
    calls = [0]
    place_slot = mech.place_slot

    def broken(start: int, count: int, slot: int) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOMEM, "UFFDIO_COPY: scripted failure")
        place_slot(start, count, slot)

    mech.place_slot = broken  # type: ignore[method-assign]
    done = threading.Event()
    err: list[BaseException] = []

    def run() -> None:
        try:
            _fake_migration(mech)
        except BaseException as e:
            err.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60), "the migration hung after its placer failed"
    assert err and isinstance(err[0], OSError) and err[0].errno == errno.ENOMEM


def test_make_mechanism_passes_bulk_slots() -> None:
    m = make_mechanism("uffd-missing", bulk_slots=2)
    assert m.bulk_slots == 2
    assert make_mechanism("uffd-minor", bulk_slots=3).bulk_slots == 3
    assert make_mechanism("kvm-userfault").bulk_slots == 1  # synchronous bitmap clear
    assert make_mechanism("gmem-private").bulk_slots == 1


# -- thread placement ----------------------------------------------------------------------


def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a fresh thread (placement calls act on the calling thread only)."""
    out: list[T] = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def test_background_idle_acts_on_the_calling_thread_only() -> None:
    def probe() -> tuple[bool, int]:
        return threadprio.background(), os.sched_getscheduler(0)

    changed, policy = _in_thread(probe)
    assert changed and policy in (os.SCHED_IDLE, os.SCHED_OTHER)
    if policy == os.SCHED_OTHER:  # SCHED_IDLE refused: nice 19 instead
        pytest.fail("SCHED_IDLE was refused on this host")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # this thread is untouched


def test_background_nice_and_zero() -> None:
    def probe() -> tuple[bool, int, bool]:
        return (
            threadprio.background(7),
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
            threadprio.background(0),
        )

    changed, nice, zero = _in_thread(probe)
    assert changed and nice == 7 and zero is False
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0


def test_pin_sets_the_calling_threads_affinity() -> None:
    allowed = threadprio.cpus()

    def probe() -> tuple[int, set[int]]:
        cpu = threadprio.pin(len(allowed) + 1)  # modulo the CPU count
        return cpu, os.sched_getaffinity(0)

    cpu, aff = _in_thread(probe)
    assert cpu == allowed[(len(allowed) + 1) % len(allowed)] and aff == {cpu}
    assert set(allowed) == os.sched_getaffinity(0)


def test_realtime_acts_on_the_calling_thread_only() -> None:
    def probe() -> tuple[bool, int, int]:
        ok = threadprio.realtime(2)
        return ok, os.sched_getscheduler(0), os.sched_getparam(0).sched_priority

    ok, policy, prio = _in_thread(probe)
    if not ok:
        pytest.skip("SCHED_FIFO refused here (no CAP_SYS_NICE / RLIMIT_RTPRIO)")
    assert (policy, prio) == (os.SCHED_FIFO, 2)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # this thread is untouched


def test_demand_rt_makes_the_demand_path_fifo_and_migrates(monkeypatch: pytest.MonkeyPatch) -> None:
    """``demand_rt``: the fault thread and the source's demand thread go SCHED_FIFO (and
    nothing else does: not the vCPUs, not the background threads); memory is verified."""
    if not _in_thread(threadprio.realtime):
        pytest.skip("SCHED_FIFO refused here (no CAP_SYS_NICE / RLIMIT_RTPRIO)")
    real = threadprio.realtime
    fifo: dict[str, int] = {}

    def spy(priority: int = 1) -> bool:
        ok = real(priority)
        fifo[threading.current_thread().name] = os.sched_getscheduler(0)
        return ok

    monkeypatch.setattr(threadprio, "realtime", spy)
    o = MigrateOptions(kernel="fake", profile="6.18-pvm", mem_size=8 << 20, workload="random",
                       same_process=True, demand_rt=True)  # fmt: skip
    r = migrate(o)
    st = r.result.stats
    assert st.pages_demand + st.pages_background >= (8 << 20) // PS
    assert set(fifo.values()) == {os.SCHED_FIFO}
    names = sorted(fifo)
    assert any(n.startswith("postcopy-fault") for n in names), names
    assert any("source" in n for n in names), names
    assert not any(n.startswith(("vcpu", "postcopy-placer", "postcopy-fetch-bulk")) for n in names)


# -- working set -----------------------------------------------------------------------------


def test_order_pages_first_observation_first_each_page_once() -> None:
    faults = [(30, 3, 5 * PS + 8), (10, 1, 9 * PS), (20, 2, 5 * PS), (10, 0, 2 * PS), (40, 4, -1)]
    assert list(order_pages(faults, PS)) == [2, 9, 5]


def _write_trace(path: Path, gpas: list[tuple[int, int]]) -> None:
    from replay.events import Fault, Header
    from replay.format import TraceWriter

    with TraceWriter(path, Header(kernel="fake", mechanism="uffd-missing")) as w:
        for seq, (t, gpa) in enumerate(gpas):
            w.append(Fault(seq=seq, tid=1, vcpu=0, gpa=gpa, observed_ns=t, resolved_ns=t + 5))


def test_fault_pages_reads_a_trace(tmp_path: Path) -> None:
    p = tmp_path / "run.fkt"
    _write_trace(p, [(300, 7 * PS), (100, 40 * PS), (200, 7 * PS + 64), (50, -1)])
    assert list(fault_pages(p, PS)) == [40, 7]


def test_push_order_from_a_trace_sends_the_working_set_first(tmp_path: Path) -> None:
    p = tmp_path / "run.fkt"
    _write_trace(p, [(1, 100 * PS), (2, 101 * PS), (3, 7 * PS)])
    o = MigrateOptions(kernel="fake", push_order=f"trace:{p}", batch_pages=64)
    src = make_source(bytearray(256 * PS), [], o)
    assert src.sched.policy is Policy.TRACE
    # each trace page with the unsent rest of its 64-page block
    assert [src.sched.next_background() for _ in range(3)] == [(100, 28), (7, 57), (0, 7)]
    with pytest.raises(ValueError, match="push order"):
        make_source(bytearray(PS), [], MigrateOptions(push_order="random"))


def test_fake_migration_with_a_trace_push_order(tmp_path: Path) -> None:
    p = tmp_path / "run.fkt"
    _write_trace(p, [(i, (2048 - 8 * i) * PS) for i in range(1, 40)])
    o = MigrateOptions(
        kernel="fake", mem_size=16 << 20, workload="random", same_process=True,
        push_order=f"trace:{p}",
    )  # fmt: skip
    r = migrate(o)
    assert r.result.stats.end_ns > 0 and r.source["result"] == "done"
    assert r.source["pages_background"] + r.source["pages_demand"] >= 4096


# -- the fault path's fast fetch ----------------------------------------------------------------


def test_concurrent_fetches_share_the_demand_channel() -> None:
    """Fast-path fetches (the first waiter leads) and slow-path ones (another leads)
    interleave from several threads; every page arrives intact, none is asked twice."""
    from postcopy.client import FetchClient

    pages = 2048
    mem = bytearray(os.urandom(PS * 8)) * (pages // 8)
    src = Source(mem, [[bytes(144), bytes(312)]])
    d_dem, s_dem = tp.memory_pair()
    src.serve(s_dem)
    c = FetchClient.over(d_dem)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(i: int) -> None:
        try:
            start.wait(10)
            for p in range(i, pages, 3):  # overlapping page sets between threads
                c.fetch(p, min(1 + p % 2, pages - p), timeout=30)
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    try:
        assert not errors and not any(th.is_alive() for th in ths)
        assert c.tracker.complete
        assert page_digests(c.memory, 0, pages) == page_digests(mem, 0, pages)
        assert c.pages_demand == pages  # de-duplicated: each page asked once
    finally:
        c.close()
        src.close()


def test_latency_sensitive_sets_a_short_slice() -> None:
    def probe() -> tuple[bool, str]:
        ok = threadprio.latency_sensitive(200_000)
        with open("/proc/thread-self/sched") as f:
            return ok, f.read()

    ok, sched = _in_thread(probe)
    assert ok  # Linux 6.18 here: sched_setattr with sched_runtime is accepted
    line = next(x for x in sched.splitlines() if x.startswith("se.slice"))
    assert int(line.split(":")[1]) == 200_000


# -- the clock reads of placement accounting ---------------------------------------------------


class _Clock:
    """A kernel whose only call here is ``monotonic_ns``: counted, 1000 ns apart."""

    def __init__(self) -> None:
        self.reads = 0

    def monotonic_ns(self) -> int:
        self.reads += 1
        return 1000 * self.reads


class _RacyOpen(dict[int, list[tuple[int, int]]]):
    """Open faults that look empty to the unlocked check only (a fault opened in between)."""

    checked = False

    def __bool__(self) -> bool:
        if not self.checked:
            self.checked = True
            return False
        return len(self) > 0


def _accounting(pages: int) -> tuple[Destination, _Clock]:
    from postcopy.mechanisms.base import MemoryLayout
    from postcopy.pages import Bitmap
    from postcopy.stats import MigrationStats

    clock = _Clock()
    d = Destination(clock, UffdMissing(), connect=lambda: (None, None))  # type: ignore[arg-type, return-value]
    d.layout = MemoryLayout(pages * PS, PS)
    d.placed = Bitmap(pages)
    d.stats = MigrationStats(1)
    return d, clock


def test_a_batch_that_resolves_no_fault_reads_no_clock() -> None:
    d, clock = _accounting(64)
    d._account(0, 16, False)  # background, nothing open: no kernel call at all
    assert clock.reads == 0 and d.nr_placed == 16
    d.stats.fault_begin(0, 500)
    d._open[20] = [(0, 500)]
    d._account(16, 16, False)  # a batch that ends the fault open on page 20
    assert clock.reads == 1 and list(d.stats.samples) == [1000 - 500] and not d._open


def test_a_fault_opened_during_the_check_is_still_ended() -> None:
    d, clock = _accounting(64)
    d.stats.fault_begin(0, 100)
    d._open = _RacyOpen({5: [(0, 100)]})
    d._account(0, 8, True)
    assert clock.reads == 1 and list(d.stats.samples) == [1000 - 100] and not d._open
