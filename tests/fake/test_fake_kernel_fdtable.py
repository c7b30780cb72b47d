"""FakeKernel's fd table, forwarding to the host, devices, clock, shutdown, ioctl speed."""

from __future__ import annotations

import errno
import fcntl
import os
import statistics
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from fakekvm.abi import mman
from fakekvm.fake import FakeKernel, ManualClock
from fakekvm.fake.files import FakeFile
from fakekvm.fake.waits import Scheduler, WaitQueue
from fakekvm.kernel.seam import IoctlArg

U64 = struct.Struct("=Q")


@pytest.fixture
def k() -> Iterator[FakeKernel]:
    kern = FakeKernel()
    yield kern
    kern.shutdown()


class Answer(FakeFile):
    kind = "answer"

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        return 42

    def release(self) -> None:
        self.released.set()


def test_fake_fds_never_collide_with_real_fds(k: FakeKernel) -> None:
    fake = [k.eventfd(0) for _ in range(5)]
    real = [os.open("/dev/null", os.O_RDONLY) for _ in range(5)]
    try:
        assert not set(fake) & set(real)
        for fd in fake:
            assert k.is_fake_fd(fd)
        for fd in real:
            assert not k.is_fake_fd(fd)
        k.close(fake[0])
        again = os.open("/dev/null", os.O_RDONLY)  # the number is free again on the host
        real.append(again)
        assert again == fake[0]
    finally:
        for fd in real:
            os.close(fd)


def test_unknown_fd_is_ebadf_and_close_drops_the_reference(k: FakeKernel) -> None:
    f = Answer()
    fd = k.install_fd(f, mman.O_CLOEXEC)
    assert k.file(fd) is f and f.kernel is k
    assert k.ioctl(fd, 0x1234) == 42
    k.close(fd)
    assert f.released.is_set()
    with pytest.raises(OSError) as ei:
        k.file(fd)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        k.close(fd)  # now it is not open anywhere
    assert ei.value.errno == errno.EBADF


def test_another_reference_keeps_the_file_alive(k: FakeKernel) -> None:
    f = Answer()
    fd = k.install_fd(f)
    held = k.fget(fd)
    k.close(fd)
    assert not f.released.is_set()
    held.put()
    assert f.released.is_set()


def test_default_file_operations_answer_like_the_kernel(k: FakeKernel) -> None:
    fd = k.install_fd(FakeFile())
    cases = [
        (lambda: FakeFile.ioctl(k.file(fd), 1, 0), errno.ENOTTY),
        (lambda: k.read(fd, 8), errno.EINVAL),
        (lambda: k.write(fd, b"12345678"), errno.EINVAL),
        (lambda: k.pread(fd, 8, 0), errno.ESPIPE),
        (lambda: k.ftruncate(fd, 0), errno.EINVAL),
        (lambda: k.fallocate(fd, 0, 0, 4096), errno.ENODEV),
        (lambda: k.mmap(fd, 4096, 3, mman.MAP_SHARED), errno.ENODEV),
    ]
    for call, err in cases:
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == err
    assert k.lseek(fd, 5, os.SEEK_SET) == 0  # noop_llseek
    assert k.fstat(fd).st_mode == 0o600  # an anon inode


def test_real_fds_are_forwarded(k: FakeKernel, tmp_path) -> None:
    path = str(tmp_path / "f")
    fd = k.open(path, os.O_RDWR | os.O_CREAT)
    assert not k.is_fake_fd(fd)
    assert k.write(fd, b"abc") == 3
    assert k.pread(fd, 3, 0) == b"abc"
    k.ftruncate(fd, 10)
    assert k.fstat(fd).st_size == 10
    k.close(fd)
    with pytest.raises(OSError) as ei:
        k.read(fd, 1)
    assert ei.value.errno == errno.EBADF


def test_device_registry_and_userfaultfd_hook(k: FakeKernel) -> None:
    made: list[int] = []

    def factory(kern: FakeKernel, flags: int) -> FakeFile:
        made.append(flags)
        return Answer()

    k.devices["/dev/answer"] = factory
    fd = k.open("/dev/answer", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    assert made == [os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK]
    assert k.file(fd).f_flags & os.O_NONBLOCK
    assert k.ioctl(fd, 1) == 42
    # userfaultfd(2) goes to fakekvm.fake.uffd.create, or ENOSYS until that exists
    try:
        ufd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        assert e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL)
    else:
        assert k.is_fake_fd(ufd)


def test_eventfd_ctx_lookup(k: FakeKernel) -> None:
    efd = k.eventfd(0)
    ctx = k.eventfd_ctx(efd)
    ctx.signal(3)
    assert k.read(efd, 8) == U64.pack(3)
    mfd = k.memfd_create("m")
    with pytest.raises(OSError) as ei:
        k.eventfd_ctx(mfd)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        k.eventfd_ctx(999_999)
    assert ei.value.errno == errno.EBADF


def test_manual_clock_drives_poll_timeouts() -> None:
    clock = ManualClock(1000)
    k = FakeKernel(clock=clock)
    try:
        assert k.monotonic_ns() == 1000
        efd = k.eventfd(0)
        started = threading.Event()
        result: list[object] = []

        def waiter() -> None:
            started.set()
            result.append(k.poll([(efd, mman.POLLIN)], 50))

        t = threading.Thread(target=waiter)
        t.start()
        assert started.wait(10)
        clock.advance(10_000_000)  # 10 ms: not yet
        t.join(0.05)
        assert t.is_alive() and result == []
        clock.advance(40_000_000)  # 50 ms reached: poll times out
        t.join(10)
        assert result == [[]]
        assert k.monotonic_ns() == 1000 + 50_000_000
    finally:
        k.shutdown()


def test_gettid_default_and_injected() -> None:
    k = FakeKernel(gettid=lambda: 77)
    try:
        assert k.gettid() == 77
    finally:
        k.shutdown()
    k2 = FakeKernel()
    try:
        assert k2.gettid() == threading.get_native_id()
    finally:
        k2.shutdown()


class SignallingScheduler(Scheduler):
    def __init__(self) -> None:
        self.blocked = threading.Event()

    def block(self, wq: WaitQueue, timeout: float | None) -> None:
        self.blocked.set()
        super().block(wq, timeout)


def test_shutdown_wakes_a_blocked_read_and_closes_fds() -> None:
    sched = SignallingScheduler()
    k = FakeKernel(scheduler=sched)
    efd = k.eventfd(0)
    out: list[OSError] = []

    def reader() -> None:
        try:
            k.read(efd, 8)
        except OSError as e:
            out.append(e)

    t = threading.Thread(target=reader)
    t.start()
    assert sched.blocked.wait(10)
    k.shutdown()
    t.join(10)
    assert out and out[0].errno == errno.ESHUTDOWN
    assert k.fds() == {}


@pytest.mark.real_kernel
def test_ioctl_dispatch_is_within_3x_of_a_real_ioctl(k: FakeKernel) -> None:
    KVM_CHECK_EXTENSION = 0xAE03
    fd = k.install_fd(Answer())
    rfd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        n = 20000

        def per_call(fn) -> float:
            samples = []
            for _ in range(5):
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    fn()
                samples.append((time.perf_counter_ns() - t0) / n)
            return statistics.median(samples)

        fake = per_call(lambda: k.ioctl(fd, KVM_CHECK_EXTENSION, 16))
        real = per_call(lambda: fcntl.ioctl(rfd, KVM_CHECK_EXTENSION, 16))
        print(f"ioctl dispatch: fake {fake:.0f} ns, real {real:.0f} ns")
        assert fake < 3 * real
    finally:
        os.close(rfd)


def test_shutdown_wakes_a_poll_on_real_and_fake_fds() -> None:
    k = FakeKernel()
    r, w = os.pipe()
    try:
        efd = k.eventfd(0)
        out: list[OSError] = []
        entered = threading.Event()
        real_poll_seen = threading.Event()

        def poller() -> None:
            entered.set()
            try:
                k.poll([(r, mman.POLLIN), (efd, mman.POLLIN)], None)
            except OSError as e:
                out.append(e)

        orig = k._poll_block_real

        def spy(*a, **kw):
            real_poll_seen.set()
            return orig(*a, **kw)

        k._poll_block_real = spy  # type: ignore[method-assign]
        t = threading.Thread(target=poller)
        t.start()
        assert real_poll_seen.wait(10)
        k.shutdown()
        t.join(10)
        assert not t.is_alive()
        assert out and out[0].errno == errno.ESHUTDOWN
    finally:
        os.close(r)
        os.close(w)


def test_a_dropped_kernel_gives_its_fd_numbers_back() -> None:
    import gc

    k = FakeKernel()
    fds = [k.eventfd(0) for _ in range(3)]
    del k
    gc.collect()
    for fd in fds:
        with pytest.raises(OSError) as ei:
            os.fstat(fd)
        assert ei.value.errno == errno.EBADF
