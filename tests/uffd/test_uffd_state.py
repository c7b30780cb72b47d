"""The pure userfaultfd state core (fakekvm.fake.uffd.state): no threads, no fds."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakekvm.abi import mman
from fakekvm.fake.uffd import _uapi as U
from fakekvm.fake.uffd.state import (
    TASK_SIZE,
    UffdState,
    Waiter,
    register_ioctls,
    remap_msg,
    remove_msg,
)

P = mman.PAGE_SIZE


def _ready(features: int = 0) -> UffdState:
    s = UffdState(flags=mman.O_NONBLOCK)
    s.api(U.UFFD_API, features)
    return s


def _fault(s: UffdState, address: int, reason: int = 1, tid: int = 77) -> Waiter:
    w = Waiter(address, s.fault_msg(address, reason, tid), tid)
    s.add_fault(w)
    return w


def test_api_handshake_rules() -> None:
    s = UffdState(flags=0)
    with pytest.raises(OSError) as e:
        s.api(0xAB, 0)
    assert e.value.errno == errno.EINVAL and not s.initialized
    with pytest.raises(OSError):
        s.api(U.UFFD_API, 1 << 17)
    assert not s.initialized  # a failed call does not use the handshake up
    assert s.api(U.UFFD_API, U.UFFD_FEATURE_THREAD_ID) == (0x1FFFF, 0x8000000000000003)
    assert s.features == U.UFFD_FEATURE_THREAD_ID
    with pytest.raises(OSError) as e:
        s.api(U.UFFD_API, 0)
    assert e.value.errno == errno.EINVAL


def test_api_profile_features_and_wp_async_implies_unpopulated() -> None:
    s = UffdState(flags=0, available=0x1FFF)  # a 6.1-like set: no POISON/WP_ASYNC/MOVE
    with pytest.raises(OSError):
        s.api(U.UFFD_API, U.UFFD_FEATURE_MOVE)
    assert s.api(U.UFFD_API, 0)[0] == 0x1FFF
    s2 = UffdState(flags=0)
    s2.api(U.UFFD_API, U.UFFD_FEATURE_WP_ASYNC)
    assert s2.features == U.UFFD_FEATURE_WP_ASYNC | U.UFFD_FEATURE_WP_UNPOPULATED


@pytest.mark.parametrize(
    ("start", "length"),
    [(1, P), (0x1000, P + 1), (0x1000, 0), (TASK_SIZE, P), (TASK_SIZE - P, 2 * P)],
)
def test_validate_range_rejects(start: int, length: int) -> None:
    with pytest.raises(OSError) as e:
        UffdState.validate_range(start, length, "X")
    assert e.value.errno == errno.EINVAL


def test_validate_range_accepts_the_last_page() -> None:
    UffdState.validate_range(TASK_SIZE - P, P, "X")


def test_fault_msg_masking_exact_and_thread_id() -> None:
    s = _ready()
    ev, flags, addr, ptid = U.uffd_msg_pagefault_fmt.unpack(s.fault_msg(0x7000123, 1, 42))
    assert (ev, flags, addr, ptid) == (U.UFFD_EVENT_PAGEFAULT, 1, 0x7000000, 0)
    s = _ready(U.UFFD_FEATURE_EXACT_ADDRESS | U.UFFD_FEATURE_THREAD_ID)
    msg = s.fault_msg(0x7000123, 3, 42)
    assert len(msg) == 32
    assert U.uffd_msg_pagefault_fmt.unpack(msg)[1:] == (3, 0x7000123, 42)
    assert msg[1:8] == bytes(7) and msg[28:] == bytes(4)  # reserved fields and padding are zero
    # hugetlb: masked to the huge page
    assert U.uffd_msg_pagefault_fmt.unpack(_ready().fault_msg(0x40345678, 0, 1, 1 << 21))[2] == 0x40200000


def test_read_faults_first_then_events_oldest_first() -> None:
    s = _ready()
    s.add_event(remove_msg(U.UFFD_EVENT_REMOVE, 0x1000, 0x3000))
    _fault(s, 0x5000)
    _fault(s, 0x6000)
    data = s.read(128)
    evs = [data[i] for i in range(0, len(data), 32)]
    assert evs == [U.UFFD_EVENT_PAGEFAULT, U.UFFD_EVENT_PAGEFAULT, U.UFFD_EVENT_REMOVE]
    assert U.uffd_msg_fmt.unpack_from(data, 0)[5] == 0x5000
    assert U.uffd_msg_fmt.unpack_from(data, 64)[4:6] == (0x1000, 0x3000)
    assert s.read(64) == b""


def test_read_returns_whole_messages_only() -> None:
    s = _ready()
    _fault(s, 0x5000)
    _fault(s, 0x6000)
    with pytest.raises(OSError) as e:
        s.read(31)
    assert e.value.errno == errno.EINVAL
    assert len(s.read(63)) == 32
    assert len(s.read(32)) == 32


def test_wake_covers_by_range_and_drops_unread_waiters() -> None:
    s = _ready()
    a = _fault(s, 0x5000)
    b = _fault(s, 0x6010)
    assert s.read(32)  # a is read, b is pending
    assert s.wake(0x6000, P) == [b]
    assert b.woken and not a.woken
    assert s.read(32) == b""  # woken before it was read: never delivered
    assert s.wake(0x4000, P) == []
    assert s.wake(0x5000, P) == [a]
    assert not s.waiting and not s.pending


def test_wake_len0_wakes_all_and_large_ranges() -> None:
    s = _ready()
    ws = [_fault(s, 0x100000 + i * P) for i in range(100)]
    s.read(32 * 50)
    assert len(s.wake(0x100000, 100 * P)) == 100  # the big-range path
    assert all(w.woken for w in ws)
    w = _fault(s, 0x9000)
    assert s.wake(0, 0) == [w]


@given(st.lists(st.integers(0, 63), min_size=1, max_size=20), st.integers(0, 63), st.integers(1, 64))
def test_wake_matches_a_reference(pages: list[int], start: int, n: int) -> None:
    s = _ready()
    ws = [_fault(s, 0x10000 + p * P + 8) for p in pages]
    if len(ws) >= 2:
        s.read(32 * (len(ws) // 2))  # some read, some still pending
    lo, hi = 0x10000 + start * P, 0x10000 + (start + n) * P
    woken = s.wake(lo, hi - lo)
    assert {id(w) for w in woken} == {id(w) for w in ws if lo <= w.address < hi}
    assert s.blocked_tids() == ({77} if len(woken) < len(ws) else set())


def test_poll_rules() -> None:
    s = UffdState(flags=0)
    assert s.poll(nonblock=True) == mman.POLLERR  # before the handshake
    s.api(U.UFFD_API, 0)
    assert s.poll(nonblock=False) == mman.POLLERR  # a blocking fd: always POLLERR
    assert s.poll(nonblock=True) == 0
    _fault(s, 0x1000)
    assert s.poll(nonblock=True) == mman.POLLIN
    assert s.poll(nonblock=False) == mman.POLLERR


def test_events_raise_mmap_changing_until_done() -> None:
    s = _ready()
    ev = s.add_event(remap_msg(0x1000, 0x9000, 0x2000))
    assert s.changing()
    assert U.uffd_msg_fmt.unpack(s.read(32))[4:] == (0x1000, 0x9000, 0x2000)
    assert ev.done
    assert s.mmap_changing == 1  # the raising thread ends it when it resumes
    s.mmap_changing -= 1
    assert not s.changing()
    s.add_event(remove_msg(U.UFFD_EVENT_REMOVE, 0, P), detached=True)
    s.read(32)
    assert s.mmap_changing == 0  # an injected event has no raiser: reading ends it


def test_injected_eagain_counts_down() -> None:
    s = _ready()
    s.inject.eagain = 2
    assert s.changing() and s.changing() and not s.changing()


def test_release_wakes_all_and_flushes_events() -> None:
    s = _ready()
    w = _fault(s, 0x1000)
    ev = s.add_event(remove_msg(U.UFFD_EVENT_UNMAP, 0, P))
    assert s.release() == [w]
    assert ev.done and not s.events and s.released and s.mmap_changing == 0


@pytest.mark.parametrize(
    ("mode", "basic", "mask"),
    [
        (U.UFFDIO_REGISTER_MODE_MISSING, False, 0x13C),
        (U.UFFDIO_REGISTER_MODE_MISSING | U.UFFDIO_REGISTER_MODE_WP, False, 0x17C),
        (U.UFFDIO_REGISTER_MODE_MISSING | U.UFFDIO_REGISTER_MODE_MINOR, False, 0x1BC),
        (U.UFFDIO_REGISTER_MODE_WP, False, 0x17C),
        (7, False, 0x1FC),
        (U.UFFDIO_REGISTER_MODE_MISSING, True, 0x10C),
        (U.UFFDIO_REGISTER_MODE_MINOR, True, 0x18C),
    ],
)
def test_register_ioctls_masks(mode: int, basic: bool, mask: int) -> None:
    assert register_ioctls(mode, basic) == mask
