"""eventfd, memfd and poll: the same scenario on the host kernel and on FakeKernel."""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Iterator

import pytest

from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.kernel import Kernel, RealKernel

P = mman.PAGE_SIZE
U64 = struct.Struct("=Q")
MAX = (1 << 64) - 2


@pytest.fixture(params=["real", "fake"])
def kern(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    k: Kernel = RealKernel() if request.param == "real" else FakeKernel()
    opened: list[int] = []
    k._test_fds = opened  # type: ignore[attr-defined]
    yield k
    for fd in opened:
        try:
            k.close(fd)
        except OSError:
            pass
    k.shutdown()


def track(k: Kernel, fd: int) -> int:
    k._test_fds.append(fd)  # type: ignore[attr-defined]
    return fd


def errno_of(f) -> int:
    try:
        f()
    except OSError as e:
        return e.errno or 0
    return 0


# -- eventfd ---------------------------------------------------------------------------------
def test_eventfd_counter_semantics(kern: Kernel) -> None:
    fd = track(kern, kern.eventfd(3, mman.EFD_NONBLOCK))
    assert kern.write(fd, U64.pack(4)) == 8
    assert kern.read(fd, 8) == U64.pack(7)
    assert errno_of(lambda: kern.read(fd, 8)) == errno.EAGAIN
    assert errno_of(lambda: kern.read(fd, 7)) == errno.EINVAL
    assert errno_of(lambda: kern.write(fd, b"1234567")) == errno.EINVAL
    assert errno_of(lambda: kern.write(fd, U64.pack((1 << 64) - 1))) == errno.EINVAL
    assert errno_of(lambda: kern.write(fd, U64.pack(9) + b"x")) == errno.EINVAL  # exactly 8
    kern.write(fd, U64.pack(9))
    assert kern.read(fd, 16) == U64.pack(9)  # a long buffer still gets 8 bytes
    assert kern.write(fd, U64.pack(MAX)) == 8
    assert errno_of(lambda: kern.write(fd, U64.pack(1))) == errno.EAGAIN
    assert kern.write(fd, U64.pack(0)) == 8  # adding 0 always fits
    assert kern.read(fd, 8) == U64.pack(MAX)


def test_eventfd_semaphore(kern: Kernel) -> None:
    fd = track(kern, kern.eventfd(2, mman.EFD_SEMAPHORE | mman.EFD_NONBLOCK))
    assert kern.read(fd, 8) == U64.pack(1)
    assert kern.read(fd, 8) == U64.pack(1)
    assert errno_of(lambda: kern.read(fd, 8)) == errno.EAGAIN


def test_eventfd_bad_flags_and_file_ops(kern: Kernel) -> None:
    assert errno_of(lambda: kern.eventfd(0, 0x100)) == errno.EINVAL
    fd = track(kern, kern.eventfd(0))
    assert kern.lseek(fd, 0, os.SEEK_SET) == 0
    assert errno_of(lambda: kern.pread(fd, 8, 0)) == errno.ESPIPE
    assert errno_of(lambda: kern.ftruncate(fd, 0)) == errno.EINVAL
    assert errno_of(lambda: kern.fallocate(fd, 0, 0, P)) == errno.ENODEV
    st = kern.fstat(fd)
    assert st.st_mode == 0o600


def test_eventfd_poll_bits(kern: Kernel) -> None:
    fd = track(kern, kern.eventfd(0, mman.EFD_NONBLOCK))
    allev = 0xFFFF
    assert kern.poll([(fd, allev)], 0) == [(fd, mman.POLLOUT)]
    kern.write(fd, U64.pack(1))
    assert kern.poll([(fd, allev)], 0) == [(fd, mman.POLLIN | mman.POLLOUT)]
    kern.write(fd, U64.pack(MAX - 1))
    assert kern.poll([(fd, allev)], 0) == [(fd, mman.POLLIN)]
    assert kern.poll([(fd, mman.POLLOUT)], 0) == []


def test_eventfd_blocking_read_woken_by_write(kern: Kernel) -> None:
    fd = track(kern, kern.eventfd(0))
    got: list[bytes] = []
    started = threading.Event()

    def reader() -> None:
        started.set()
        got.append(kern.read(fd, 8))

    t = threading.Thread(target=reader)
    t.start()
    assert started.wait(10)
    kern.write(fd, U64.pack(5))
    t.join(10)
    assert got == [U64.pack(5)]


# -- memfd -------------------------------------------------------------------------------------
def test_memfd_create_errors(kern: Kernel) -> None:
    assert errno_of(lambda: kern.memfd_create("x", 0x100)) == errno.EINVAL
    assert errno_of(lambda: kern.memfd_create("x", mman.MFD_EXEC | mman.MFD_NOEXEC_SEAL)) == errno.EINVAL
    assert errno_of(lambda: kern.memfd_create("x" * 250)) == errno.EINVAL
    assert errno_of(lambda: kern.memfd_create("x", mman.MFD_HUGE_2MB)) == errno.EINVAL
    assert errno_of(lambda: kern.memfd_create("x", mman.MFD_HUGETLB | (22 << 26))) == errno.ENODEV
    track(kern, kern.memfd_create("x" * 249))


def test_memfd_file_ops(kern: Kernel) -> None:
    fd = track(kern, kern.memfd_create("m", mman.MFD_CLOEXEC))
    assert kern.fstat(fd).st_size == 0
    assert kern.write(fd, b"hello") == 5
    assert kern.lseek(fd, 0, os.SEEK_CUR) == 5
    assert kern.lseek(fd, 1, os.SEEK_SET) == 1
    assert kern.read(fd, 3) == b"ell"
    assert kern.pwrite(fd, b"J", 0) == 1
    assert kern.pread(fd, 5, 0) == b"Jello"
    assert errno_of(lambda: kern.pread(fd, 5, -1)) == errno.EINVAL
    assert errno_of(lambda: kern.lseek(fd, 0, 7)) == errno.EINVAL
    kern.ftruncate(fd, 3 * P)
    assert kern.fstat(fd).st_size == 3 * P
    assert errno_of(lambda: kern.ftruncate(fd, -1)) == errno.EINVAL
    assert kern.lseek(fd, 0, os.SEEK_HOLE) == P
    assert errno_of(lambda: kern.lseek(fd, P, os.SEEK_DATA)) == errno.ENXIO


def test_memfd_fallocate_errnos(kern: Kernel) -> None:
    fd = track(kern, kern.memfd_create("m"))
    PH, KS = mman.FALLOC_FL_PUNCH_HOLE, mman.FALLOC_FL_KEEP_SIZE
    assert errno_of(lambda: kern.fallocate(fd, PH, 0, P)) == errno.EOPNOTSUPP
    assert errno_of(lambda: kern.fallocate(fd, 0, -1, P)) == errno.EINVAL
    assert errno_of(lambda: kern.fallocate(fd, 0, 0, 0)) == errno.EINVAL
    assert errno_of(lambda: kern.fallocate(fd, mman.FALLOC_FL_ZERO_RANGE, 0, P)) == errno.EOPNOTSUPP
    assert errno_of(lambda: kern.fallocate(fd, mman.FALLOC_FL_COLLAPSE_RANGE, 0, P)) == errno.EOPNOTSUPP
    kern.fallocate(fd, 0, 0, 2 * P)
    assert kern.fstat(fd).st_size == 2 * P
    kern.fallocate(fd, KS, 0, 4 * P)
    assert kern.fstat(fd).st_size == 2 * P
    kern.pwrite(fd, b"abc", P)
    kern.fallocate(fd, PH | KS, P, P)
    assert kern.pread(fd, 3, P) == b"\0\0\0"
    kern.fallocate(fd, PH | KS, 8 * P, P)  # beyond EOF: fine


def test_memfd_hugetlb_errnos(kern: Kernel) -> None:
    H = 2 << 20
    fd = track(kern, kern.memfd_create("h", mman.MFD_HUGETLB | mman.MFD_HUGE_2MB))
    assert kern.fstat(fd).st_blksize == H
    assert errno_of(lambda: kern.ftruncate(fd, P)) == errno.EINVAL
    kern.ftruncate(fd, H)
    assert errno_of(lambda: kern.write(fd, b"x")) == errno.EINVAL
    assert errno_of(lambda: kern.pwrite(fd, b"x", 0)) == errno.EINVAL
    assert kern.pread(fd, 4, 0) == bytes(4)
    assert kern.lseek(fd, 0, os.SEEK_DATA) == 0
    PH, KS = mman.FALLOC_FL_PUNCH_HOLE, mman.FALLOC_FL_KEEP_SIZE
    kern.fallocate(fd, PH | KS, 0, H)
    assert errno_of(lambda: kern.fallocate(fd, PH, 0, H)) == errno.EOPNOTSUPP


# -- poll --------------------------------------------------------------------------------------
def test_poll_closed_fd_is_pollnval(kern: Kernel) -> None:
    other = track(kern, kern.eventfd(1))
    fd = kern.eventfd(0)
    kern.close(fd)
    res = dict(kern.poll([(fd, mman.POLLIN), (other, mman.POLLIN)], 0))
    assert res == {fd: mman.POLLNVAL, other: mman.POLLIN}


def test_poll_timeout_zero_and_short(kern: Kernel) -> None:
    fd = track(kern, kern.eventfd(0))
    assert kern.poll([(fd, mman.POLLIN)], 0) == []
    assert kern.poll([(fd, mman.POLLIN)], 1) == []


def test_poll_mixed_with_a_pipe(kern: Kernel) -> None:
    r, w = os.pipe()
    try:
        efd = track(kern, kern.eventfd(0))
        assert kern.poll([(r, mman.POLLIN), (efd, mman.POLLIN)], 0) == []
        os.write(w, b"x")
        assert kern.poll([(r, mman.POLLIN), (efd, mman.POLLIN)], 0) == [(r, mman.POLLIN)]
        os.read(r, 1)
        # block on both; an eventfd write from another thread wakes the poll
        result: list[list[tuple[int, int]]] = []
        t = threading.Thread(target=lambda: result.append(kern.poll([(r, mman.POLLIN), (efd, mman.POLLIN)], -1)))
        t.start()
        kern.write(efd, U64.pack(1))
        t.join(10)
        assert result == [[(efd, mman.POLLIN)]]
        # ... and a pipe write wakes it too
        kern.read(efd, 8)
        result.clear()
        t = threading.Thread(target=lambda: result.append(kern.poll([(r, mman.POLLIN), (efd, mman.POLLIN)], None)))
        t.start()
        os.write(w, b"y")
        t.join(10)
        assert result == [[(r, mman.POLLIN)]]
    finally:
        os.close(r)
        os.close(w)


def test_poll_blocks_until_a_fake_file_is_ready(kern: Kernel) -> None:
    a = track(kern, kern.eventfd(0))
    b = track(kern, kern.eventfd(0))
    result: list[list[tuple[int, int]]] = []
    t = threading.Thread(target=lambda: result.append(kern.poll([(a, mman.POLLIN), (b, mman.POLLIN)], None)))
    t.start()
    kern.write(b, U64.pack(2))
    t.join(10)
    assert result == [[(b, mman.POLLIN)]]
