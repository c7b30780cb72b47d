"""The fake's fast paths (brief R): same results as the slow paths and the live kernel.

* ``UFFDIO_COPY`` of one page (fakekvm/fake/uffd/ioctls.py ``copy`` fast path): output field,
  EEXIST on a present page, src outside the fake's memory (slow path), read-only dst, wake;
* one-message ``read`` of a userfaultfd (fakekvm/fake/uffd/file.py);
* the lock hand-off of the default `Scheduler` (fakekvm/fake/waits.py): wake, timeout, RLock.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest

from fakekvm.abi import mman
from fakekvm.fake.waits import WaitDomain, WaitQueue
from fakekvm.kernel.seam import Kernel
from fakekvm.testing import uffd_scenarios as S

U = S.U
PAGE = S.PAGE


def _copy_record(k: Kernel) -> dict[str, Any]:
    r: dict[str, Any] = {}
    m = S.anon(k, 4)
    src = S.src_page(k, 0x5A)
    fd = S.new_uffd(k, U.UFFD_FEATURE_THREAD_ID)
    S.register(k, fd, m.address, 4 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["copy"] = S.copy(k, fd, m.address, src.address)
    r["content"] = S.peek(k, m.address, 2).hex()
    r["again"] = S.copy(k, fd, m.address, src.address)
    r["dontwake"] = S.copy(k, fd, m.address + PAGE, src.address, PAGE, U.UFFDIO_COPY_MODE_DONTWAKE)
    r["bad_mode"] = S.copy(k, fd, m.address + 2 * PAGE, src.address, PAGE, 0x80)
    r["unaligned"] = S.copy(k, fd, m.address + 2 * PAGE + 1, src.address)
    r["src_unmapped"] = S.copy(k, fd, m.address + 2 * PAGE, 0x1000)
    r["outside"] = S.copy(k, fd, m.address + 4 * PAGE, src.address)
    ro = k.mmap(-1, PAGE, mman.PROT_READ, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    S.register(k, fd, ro.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["ro_dst"] = S.copy(k, fd, ro.address, src.address)
    r["ro_content"] = S.peek(k, ro.address, 2).hex()
    k.munmap(ro.address, PAGE)
    # a faulting thread is woken by a one-page copy and sees the data
    t = S.touch_in_thread(k, m.address + 3 * PAGE + 8, False)
    t.wait_blocked()
    data = k.read(fd, 32)
    r["msg"] = S.msgs(data, m.address, t.tid)
    r["copy_wakes"] = S.copy(k, fd, m.address + 3 * PAGE, src.address)
    r["joined"] = t.join()
    r["content3"] = S.peek(k, m.address + 3 * PAGE, 2).hex()
    k.close(fd)
    k.munmap(m.address, 4 * PAGE)
    k.munmap(src.address, PAGE)
    return r


EXPECTED = {
    "copy": ("0", 4096),
    "content": "5a5a",
    "again": ("EEXIST", -17),
    "dontwake": ("0", 4096),
    "bad_mode": ("EINVAL", S.SENTINEL),
    "unaligned": ("EINVAL", S.SENTINEL),
    "src_unmapped": ("EFAULT", -14),
    "outside": ("ENOENT", -2),
    "ro_dst": ("0", 4096),
    "ro_content": "5a5a",
    "copy_wakes": ("0", 4096),
    "joined": True,
    "content3": "5a5a",
}


@pytest.mark.real_uffd
def test_one_page_copy_matches_the_live_kernel(any_kernel: Kernel) -> None:
    r = _copy_record(any_kernel)
    msg = r.pop("msg")
    assert msg and msg[0][0] == "PAGEFAULT"
    assert r == EXPECTED


def test_fake_copy_fast_path_keeps_wp_and_poison_rules() -> None:
    from fakekvm.fake import FakeKernel

    k = FakeKernel()
    try:
        m = S.anon(k, 2)
        src = S.src_page(k, 0x33)
        fd = S.new_uffd(k, U.UFFD_FEATURE_POISON)
        S.register(k, fd, m.address, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
        assert S.poison(k, fd, m.address)[0] == "0"
        # a poison marker counts as empty for COPY (slow path clears it)
        assert S.copy(k, fd, m.address, src.address) == ("0", 4096)
        assert S.peek(k, m.address, 1) == b"\x33"
        # a read-only destination VMA is still filled (fast path must not memmove into it)
        k.mprotect(m.address + PAGE, PAGE, mman.PROT_READ)
        assert S.copy(k, fd, m.address + PAGE, src.address) == ("0", 4096)
        assert S.peek(k, m.address + PAGE, 1) == b"\x33"
        k.close(fd)
    finally:
        k.shutdown()


def test_fake_read_of_one_message_then_events_order() -> None:
    from fakekvm.fake import FakeKernel

    k = FakeKernel()
    try:
        m = S.anon(k, 1)
        fd = S.new_uffd(k, U.UFFD_FEATURE_THREAD_ID)
        S.register(k, fd, m.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
        t = S.touch_in_thread(k, m.address, True)
        t.wait_blocked()
        one = k.read(fd, 63)  # a buffer for one message only
        assert len(one) == 32
        assert S.msgs(one, m.address, t.tid)[0][0] == "PAGEFAULT"
        with pytest.raises(OSError) as e:
            k.read(fd, 32)
        assert e.value.errno == 11  # EAGAIN: the fault was read, nothing else queued
        assert S.rng(k, fd, U.UFFDIO_WAKE, m.address, PAGE) == "0"  # read waiters are found by WAKE
        assert S.zeropage(k, fd, m.address) == ("0", 4096)
        assert t.join()
        k.close(fd)
    finally:
        k.shutdown()


@pytest.mark.parametrize("lock", [None, threading.RLock()])
def test_scheduler_handoff_wakes_and_times_out(lock: Any) -> None:
    d = WaitDomain("t")
    wq = WaitQueue(d, lock=lock)
    # timeout: the waiter leaves the queue's hand-off list
    assert wq.wait_event(lambda: False, 0.01) is False
    assert wq.waiters == []
    state = {"go": False}
    out: list[bool] = []
    started = threading.Event()

    def body() -> None:
        started.set()
        out.append(wq.wait_event(lambda: state["go"]))

    th = threading.Thread(target=body)
    th.start()
    assert started.wait(10)
    with wq.lock:
        if lock is not None:
            with wq.lock:  # nested RLock level: the sleeper must still get it after wake
                state["go"] = True
                wq.wake_up_all_locked()
        else:
            state["go"] = True
            wq.wake_up_all_locked()
    th.join(10)
    assert out == [True]
    assert wq.waiters == []
    assert d.sleepers() == {}


def test_shutdown_wakes_a_handoff_sleeper() -> None:
    d = WaitDomain("t")
    wq = WaitQueue(d)
    errs: list[int] = []
    asleep = threading.Event()

    def cond() -> bool:
        asleep.set()
        return False

    def body() -> None:
        try:
            wq.wait_event(cond)
        except OSError as e:
            errs.append(e.errno or 0)

    th = threading.Thread(target=body)
    th.start()
    assert asleep.wait(10)
    d.shutdown()
    th.join(10)
    assert not th.is_alive()
    assert errs == [errno.ESHUTDOWN]
