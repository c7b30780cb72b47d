"""Fake-only userfaultfd behaviour: fault-injection knobs, vCPU-style faults, profiles, shutdown."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fakekvm.fake import FakeKernel
from fakekvm.fake.mm import Faulter, FaultResult
from fakekvm.fake.profiles import get_profile
from fakekvm.fake.uffd import _uapi as U
from fakekvm.fake.uffd import context, kill_owner
from fakekvm.fake.waits import KernelShutdown
from fakekvm.testing.uffd_scenarios import (
    PAGE,
    anon,
    api,
    copy,
    new_uffd,
    peek,
    read_msgs,
    register,
    rng,
    src_page,
    touch_in_thread,
    wait_readable,
)

MISSING = U.UFFDIO_REGISTER_MODE_MISSING


@pytest.fixture
def k() -> Iterator[Any]:
    kern = FakeKernel(profile="6.18-pvm")
    yield kern
    kern.shutdown()


def _setup(k: Any, npages: int = 2, features: int = 0) -> tuple[int, int, int]:
    m = anon(k, npages)
    fd = new_uffd(k, features)
    register(k, fd, m.address, npages * PAGE, MISSING)
    return fd, m.address, src_page(k, 0x3C).address


def test_inject_eagain(k: Any) -> None:
    fd, a, src = _setup(k)
    context(k, fd).state.inject.eagain = 2
    assert copy(k, fd, a, src) == ("EAGAIN", -11)
    assert copy(k, fd, a, src) == ("EAGAIN", -11)
    assert copy(k, fd, a, src) == ("0", PAGE)
    assert peek(k, a, 1) == b"\x3c"


def test_inject_remove_before_fault_orders_pagefault_first(k: Any) -> None:
    fd, a, src = _setup(k)
    context(k, fd).state.inject.remove_before_fault = 1
    t = touch_in_thread(k, a + PAGE, True)
    t.wait_blocked()
    assert read_msgs(k, fd, 32, a) == [("PAGEFAULT", "0x1", "0x1000", 0, 0, 0, 0, 0)]
    assert copy(k, fd, a + PAGE, src) == ("EAGAIN", -11)  # the REMOVE is unread
    assert read_msgs(k, fd, 32, a) == [("REMOVE", "0x1000", "0x2000", 0, 0, 0, 0)]
    assert copy(k, fd, a + PAGE, src) == ("0", PAGE)
    assert t.join()


def test_inject_eexist_race_needs_an_explicit_wake(k: Any) -> None:
    fd, a, src = _setup(k)
    context(k, fd).state.inject.eexist_race = 1
    t = touch_in_thread(k, a, True)
    t.wait_blocked()
    read_msgs(k, fd, 32, a)
    assert copy(k, fd, a, src) == ("EEXIST", -17)
    # "someone else" was a concurrent fill of the same data (anonymous memory: a COPY of src)
    assert bytes(k.mm.read(a, PAGE)) == b"\x3c" * PAGE
    t.wait_blocked()  # nobody woke it: the page is there, the waiter still sleeps
    assert t.thread.is_alive()
    assert rng(k, fd, U.UFFDIO_WAKE, a, PAGE) == "0"
    assert t.join()
    assert copy(k, fd, a + PAGE, src) == ("0", PAGE)  # only one race was injected


def test_kill_owner_esrch_and_blocked_faulter_gets_sigbus(k: Any) -> None:
    fd, a, src = _setup(k)
    t = touch_in_thread(k, a, False)
    t.wait_blocked()
    kill_owner(k, fd)
    with pytest.raises(OSError) as e:
        t.join()
    assert "SIGBUS" in str(e.value)
    assert copy(k, fd, a, src) == ("ESRCH", 0x7777)


def _fault_in_thread(k: Any, address: int, who: Faulter) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        out.append(threading.get_native_id())
        out.append(k.mm.fault(address, True, user=who.user, who=who))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def test_vcpu_fault_user_false_blocks_and_resumes_from_another_thread(k: Any) -> None:
    fd, a, src = _setup(k, features=U.UFFD_FEATURE_THREAD_ID)
    tid_box: list[int] = []
    ready = threading.Event()
    res: list[Any] = []

    def vcpu_thread() -> None:
        tid_box.append(threading.get_native_id())
        ready.set()
        who = Faulter(tid=tid_box[0], vcpu=0, kind="vcpu", user=False)
        res.append(k.mm.fault(a + 0x40, True, user=False, who=who))

    th = threading.Thread(target=vcpu_thread, daemon=True)
    th.start()
    ready.wait(10)
    wait_readable(k, fd)
    msgs = read_msgs(k, fd, 32, a, tid_box[0])
    assert msgs == [("PAGEFAULT", "0x1", "0x0", "tid", 0, 0, 0, 0)]
    assert th.is_alive()  # blocked in the fake until resolved
    assert copy(k, fd, a, src) == ("0", PAGE)
    th.join(10)
    assert res == [FaultResult.OK]


def test_user_mode_only_uffd_fails_kernel_faults_without_a_message(k: Any) -> None:
    m = anon(k, 1)
    fd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | U.UFFD_USER_MODE_ONLY)
    api(k, fd)
    register(k, fd, m.address, PAGE, MISSING)
    who = Faulter(vcpu=0, kind="kvm", user=False)
    assert k.mm.fault(m.address, True, user=False, who=who) == FaultResult.SIGBUS
    assert read_msgs(k, fd, 32, m.address) == "EAGAIN"


def test_feature_sigbus_fails_the_fault_without_a_message(k: Any) -> None:
    fd, a, _ = _setup(k, features=U.UFFD_FEATURE_SIGBUS)
    assert k.mm.touch(a, True) == FaultResult.SIGBUS
    assert read_msgs(k, fd, 32, a) == "EAGAIN"


@pytest.mark.parametrize("profile", ["6.1", "6.8", "6.18-pvm"])
def test_profile_features_and_ioctls(profile: str) -> None:
    k = FakeKernel(profile=profile)
    try:
        fd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
        feats = get_profile(profile).uffd_features
        assert api(k, fd) == ("0", (0xAA, feats, 0x8000000000000003))
        m = anon(k, 1)
        _, mask = register(k, fd, m.address, PAGE, MISSING)
        has_move = bool(feats & U.UFFD_FEATURE_MOVE)
        has_poison = bool(feats & U.UFFD_FEATURE_POISON)
        assert bool(mask & 1 << U._UFFDIO_MOVE) == has_move
        assert bool(mask & 1 << U._UFFDIO_POISON) == has_poison
        if not has_poison:
            with pytest.raises(OSError) as e:
                k.ioctl(fd, U.UFFDIO_POISON, bytearray(32))
            assert e.value.errno == errno.EINVAL
    finally:
        k.shutdown()


def test_shutdown_wakes_a_blocked_faulter(k: Any) -> None:
    _, a, _ = _setup(k)
    t = touch_in_thread(k, a, True)
    t.wait_blocked()
    k.shutdown()
    with pytest.raises(KernelShutdown):
        t.join()


def test_dev_userfaultfd_fd_is_equivalent(k: Any) -> None:
    dev = k.open("/dev/userfaultfd", os.O_RDWR)
    fd = k.ioctl(dev, U.USERFAULTFD_IOC_NEW, os.O_NONBLOCK)
    assert api(k, fd)[0] == "0"
    m = anon(k, 1)
    assert register(k, fd, m.address, PAGE, MISSING) == ("0", 0x13C)
    k.close(dev)
    k.close(fd)


def test_ioctl_argument_as_a_raw_pointer(k: Any) -> None:
    """An int argument is a user pointer (as in C): read and written through safe copies."""
    m = anon(k, 1)
    fd = k.userfaultfd(os.O_NONBLOCK)
    gone = anon(k, 1)
    k.munmap(gone.address, PAGE)
    with pytest.raises(OSError) as e:
        k.ioctl(fd, U.UFFDIO_API, gone.address)
    assert e.value.errno == errno.EFAULT
    k.mm.touch(m.address, True)
    U.uffdio_api_fmt.pack_into(m.view(), 0, U.UFFD_API, 0, 0)
    assert k.ioctl(fd, U.UFFDIO_API, m.address) == 0
    assert U.uffdio_api_fmt.unpack_from(m.view()) == (0xAA, 0x1FFFF, 0x8000000000000003)
