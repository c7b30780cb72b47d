"""RealKernel: the thin layer over the host's system calls."""

from __future__ import annotations

import errno
import os

import pytest

from fakekvm.abi import kvm, mman, uffd
from fakekvm.kernel import ForwardingKernel, Kernel, RealKernel


def test_mmap_gives_a_buffer_at_a_real_address(real_kernel: RealKernel) -> None:
    m = real_kernel.mmap(-1, 3 * 4096, mman.PROT_READ | mman.PROT_WRITE,
                         mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    try:
        assert m.address % 4096 == 0 and m.length == 3 * 4096
        m.view()[4096:4099] = b"abc"
        import ctypes

        assert ctypes.string_at(m.address + 4096, 3) == b"abc"
        assert bytes(memoryview(m)[4096:4099]) == b"abc"
    finally:
        real_kernel.munmap(m.address, m.length)


def test_failures_raise_oserror_with_the_kernel_errno(real_kernel: RealKernel) -> None:
    with pytest.raises(OSError) as ei:
        real_kernel.mmap(-1, 4096, mman.PROT_READ, mman.MAP_SHARED)  # not anonymous, no fd
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        real_kernel.mmap(-1, 0, mman.PROT_READ, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        real_kernel.madvise(1, 4096, mman.MADV_DONTNEED)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        real_kernel.userfaultfd(0x40)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.real_kernel
def test_ioctl_passes_an_unsigned_long_argument(real_kernel: RealKernel) -> None:
    """fcntl.ioctl takes a C int; KVM_SET_TSS_ADDR's 0xfffbd000 does not fit one."""
    sys_fd = real_kernel.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = real_kernel.ioctl(sys_fd, kvm.KVM_CREATE_VM, 0)
    try:
        assert real_kernel.ioctl(vm, kvm.KVM_SET_TSS_ADDR, 0xFFFBD000) == 0
        with pytest.raises(OSError) as ei:  # above 4 GiB - 3 pages: EINVAL, not OverflowError
            real_kernel.ioctl(vm, kvm.KVM_SET_TSS_ADDR, 0xFFFFF000)
        assert ei.value.errno == errno.EINVAL
    finally:
        real_kernel.close(vm)
        real_kernel.close(sys_fd)


@pytest.mark.real_uffd
def test_userfaultfd_by_syscall_and_by_dev_node(real_kernel: RealKernel) -> None:
    a = real_kernel.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    dev = real_kernel.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    b = real_kernel.ioctl(dev, uffd.USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        for fd in (a, b):
            buf = bytearray(uffd.uffdio_api_fmt.pack(uffd.UFFD_API, 0, 0))
            assert real_kernel.ioctl(fd, uffd.UFFDIO_API, buf) == 0
            assert uffd.uffdio_api_fmt.unpack(buf)[1:] == (0x1FFFF, 0x8000000000000003)
    finally:
        for fd in (a, b, dev):
            real_kernel.close(fd)


def test_forwarding_kernel_wraps_every_call() -> None:
    """A wrapper sees every Kernel method: none is left to the abstract base."""
    abstract = {n for n in dir(Kernel) if getattr(getattr(Kernel, n), "__isabstractmethod__", False)}
    assert abstract  # the seam is abstract
    calls: list[str] = []

    class Spy(ForwardingKernel):
        def __getattribute__(self, name: str):  # type: ignore[no-untyped-def]
            if name in abstract:
                calls.append(name)
            return object.__getattribute__(self, name)

    k = Spy(RealKernel())
    fd = k.eventfd(0, 0)
    k.write(fd, (1).to_bytes(8, "little"))
    assert k.poll([(fd, mman.POLLIN)], 0) == [(fd, mman.POLLIN)]
    assert int.from_bytes(k.read(fd, 8), "little") == 1
    k.close(fd)
    assert k.monotonic_ns() > 0 and k.gettid() == __import__("threading").get_native_id()
    assert calls == ["eventfd", "write", "poll", "read", "close", "monotonic_ns", "gettid"]
    for name in abstract:
        assert getattr(ForwardingKernel, name) is not getattr(Kernel, name), name
