"""userfaultfd scenarios on the fake under the deterministic scheduler: a handler thread and
2-4 toucher threads (host accesses through ``FakeKernel.mm.touch``)."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from dataclasses import dataclass

import pytest

from fakekvm.abi import mman, uffd
from fakekvm.fake.detprims import deterministic
from fakekvm.fake.detsched import DeadlockError
from fakekvm.fake.kernel import FakeKernel
from fakekvm.fake.serial import SerializingKernel, canonical_uffd_msgs

PAGE = mman.PAGE_SIZE
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS


@dataclass
class Run:
    log: list[tuple[int, str, bytes]]
    digest: str
    memory: bytes
    now_ns: int
    timeouts: int
    toucher_tasks: list[int]
    #: where the mapping is, relative to the fake arena (what canonical messages carry)
    map_offset: int


def _setup(k: SerializingKernel, npages: int) -> tuple[int, int, int]:
    m = k.mmap(-1, npages * PAGE, RW, ANON)
    fd = k.userfaultfd(mman.O_CLOEXEC | mman.O_NONBLOCK)
    api = uffd.uffdio_api_fmt.pack(uffd.UFFD_API, uffd.UFFD_FEATURE_THREAD_ID, 0)
    k.ioctl(fd, uffd.UFFDIO_API, bytearray(api))
    reg = uffd.uffdio_register_fmt.pack(
        m.address, npages * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING, 0
    )
    k.ioctl(fd, uffd.UFFDIO_REGISTER, bytearray(reg))
    return m.address, m.length, fd


def scenario(seed: int, touchers: int = 3, pages_each: int = 3, poll_timeout_ms: int = -1) -> Run:
    """Touchers fault on overlapping pages; the handler COPYs a page-numbered pattern."""
    timeouts = [0]
    with deterministic(seed) as s:
        fk = FakeKernel(clock=s.clock, scheduler=s)
        k = SerializingKernel(fk, s)
        try:
            n = touchers * pages_each
            base, length, fd = _setup(k, n)
            src = k.mmap(-1, PAGE, RW, ANON | mman.MAP_POPULATE)
            stop = k.eventfd(0, mman.EFD_NONBLOCK)
            sv = src.view()

            def handler() -> None:
                while True:
                    ready = k.poll([(fd, mman.POLLIN), (stop, mman.POLLIN)], poll_timeout_ms)
                    if not ready:
                        timeouts[0] += 1
                        continue
                    if any(f == stop for f, _ in ready):
                        return
                    try:
                        data = k.read(fd, uffd.UFFD_MSG_SIZE * 16)
                    except BlockingIOError:
                        continue
                    for off in range(0, len(data), uffd.UFFD_MSG_SIZE):
                        _, _, addr, _ = uffd.uffd_msg_pagefault_fmt.unpack_from(data, off)
                        page = (addr - base) // PAGE
                        sv[:PAGE] = bytes([page + 1]) * PAGE
                        cp = uffd.uffdio_copy_fmt.pack(base + page * PAGE, src.address, PAGE, 0, 0)
                        try:
                            k.ioctl(fd, uffd.UFFDIO_COPY, bytearray(cp))
                        except OSError as e:
                            if e.errno != errno.EEXIST:
                                raise

            def toucher(i: int) -> None:
                for j in range(pages_each):
                    # each page is touched by two threads: faults race on the same page
                    k.touch(base + ((i + j * touchers) % n) * PAGE)
                    fk.mm.touch(base + ((i + 1 + j * touchers) % n) * PAGE, False)

            h = threading.Thread(target=handler, name="handler")
            ts = [
                threading.Thread(target=toucher, args=(i,), name=f"toucher{i}")
                for i in range(touchers)
            ]
            h.start()
            for t in ts:
                t.start()
            tasks = [t._det_task.tid for t in ts]  # type: ignore[attr-defined]
            for t in ts:
                t.join()
            k.write(stop, (1).to_bytes(8, "little"))
            h.join()
            memory = ctypes.string_at(base, length)  # every page is present by now
            offset = base - fk.mm.arena.start
            sv.release()
        finally:
            fk.shutdown()
    return Run(list(s.log), s.digest(), memory, s.now_ns, timeouts[0], tasks, offset)


def test_same_seed_twenty_times_identical() -> None:
    first = scenario(1234)
    assert first.memory == b"".join(bytes([p + 1]) * PAGE for p in range(9))
    msgs = [d for _, lb, d in first.log if lb == "uffd_msg"]
    assert msgs, "the handler read page-fault messages"
    for _ in range(19):
        again = scenario(1234)
        assert again.log == first.log  # (task, point) pairs and the uffd_msg bytes read
        assert again.digest == first.digest
        assert again.memory == first.memory
        assert again.now_ns == first.now_ns


def test_other_seeds_explore_other_interleavings() -> None:
    runs = [scenario(seed) for seed in range(1, 7)]
    assert len({r.digest for r in runs}) >= 2
    orders = {tuple((t, lb) for t, lb, _ in r.log) for r in runs}
    assert len(orders) >= 2
    # every interleaving ends with the same memory: the handler resolves every fault
    assert len({r.memory for r in runs}) == 1


@pytest.mark.parametrize("touchers", [2, 4])
def test_uffd_msgs_are_canonical(touchers: int) -> None:
    r = scenario(77, touchers=touchers, pages_each=2)
    seen_tasks: set[int] = set()
    for _task, lb, data in r.log:
        if lb != "uffd_msg":
            continue
        for off in range(0, len(data), uffd.UFFD_MSG_SIZE):
            ev, _flags, addr, ptid = uffd.uffd_msg_pagefault_fmt.unpack_from(data, off)
            assert ev == uffd.UFFD_EVENT_PAGEFAULT
            rel = addr - r.map_offset  # addresses are relative to the fake's arena
            assert rel % PAGE == 0 and 0 <= rel < touchers * 2 * PAGE
            seen_tasks.add(ptid)
    assert seen_tasks and seen_tasks <= set(r.toucher_tasks)


def test_timed_poll_runs_on_virtual_time() -> None:
    a = scenario(5, touchers=2, pages_each=2, poll_timeout_ms=3)
    b = scenario(5, touchers=2, pages_each=2, poll_timeout_ms=3)
    assert a.log == b.log and a.timeouts == b.timeouts
    assert a.memory == b.memory


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_deadlock_without_handler_is_a_clear_error() -> None:
    errors: list[BaseException] = []
    with pytest.raises(DeadlockError) as ei, deterministic(3) as s:
        fk = FakeKernel(clock=s.clock, scheduler=s)
        k = SerializingKernel(fk, s)
        try:
            base, _, _ = _setup(k, 3)

            def toucher(i: int) -> None:
                try:
                    fk.mm.touch(base + i * PAGE, False)
                except BaseException as e:
                    errors.append(e)

            ts = [threading.Thread(target=toucher, args=(i,), name=f"toucher{i}") for i in range(3)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        finally:
            fk.shutdown()
    text = str(ei.value)
    assert text.startswith("deterministic scheduler (seed 3): deadlock")
    for i in range(3):
        assert f"'toucher{i}' waits on wait queue 'userfaultfd-fault'" in text
    assert "in handle_fault" in text
    assert "'main' waits on join of task 1 'toucher0'" in text
    assert len(errors) == 3 and all(isinstance(e, DeadlockError) for e in errors)


def test_poll_on_a_real_fd_is_refused_not_hung() -> None:
    r, w = os.pipe()
    try:
        with deterministic(1) as s:
            fk = FakeKernel(clock=s.clock, scheduler=s)
            k = SerializingKernel(fk, s)
            try:
                ev = k.eventfd(0, mman.EFD_NONBLOCK)
                with pytest.raises(RuntimeError, match="real fd"):
                    k.poll([(ev, mman.POLLIN), (r, mman.POLLIN)], -1)
                assert k.poll([(ev, mman.POLLIN), (r, mman.POLLIN)], 0) == []
            finally:
                fk.shutdown()
    finally:
        os.close(r)
        os.close(w)


def test_canonical_uffd_msgs() -> None:
    base = 0x7F00_0000_0000
    pf = uffd.uffd_msg_pagefault_fmt.pack(uffd.UFFD_EVENT_PAGEFAULT, 1, base + 5 * PAGE, 4242)
    rm = struct.pack("<B7xQQ8x", uffd.UFFD_EVENT_REMOVE, base + PAGE, base + 3 * PAGE)
    out = canonical_uffd_msgs(pf + rm, base, {4242: 3})
    assert uffd.uffd_msg_pagefault_fmt.unpack_from(out, 0) == (
        uffd.UFFD_EVENT_PAGEFAULT, 1, 5 * PAGE, 3,
    )  # fmt: skip
    assert struct.unpack_from("<B7xQQ", out, 32) == (uffd.UFFD_EVENT_REMOVE, PAGE, 3 * PAGE)
    unknown = canonical_uffd_msgs(pf, base, {})
    assert uffd.uffd_msg_pagefault_fmt.unpack_from(unknown, 0)[3] == 0xFFFFFFFF


def test_serialized_fake_is_wired_to_the_scheduler() -> None:
    from fakekvm.fake.serial import serialized_fake

    with deterministic(2) as s:
        k = serialized_fake(s)
        try:
            assert isinstance(k.inner, FakeKernel)
            assert k.inner.waits.scheduler is s
            t0 = k.monotonic_ns()  # a point: costs cost_ns of virtual time
            ev = k.eventfd(0, mman.EFD_NONBLOCK)
            assert k.poll([(ev, mman.POLLIN)], 40) == []  # times out on the virtual clock
            assert k.monotonic_ns() - t0 >= 40_000_000
        finally:
            k.shutdown()
    assert [lb for _, lb, _ in s.log][:3] == ["monotonic_ns", "eventfd", "poll"]
