"""Userspace-side helpers: issue KVM system/VM ioctls through any `Kernel`.

Used by the tests that run the same calls on `RealKernel` and `FakeKernel`
(``tests/fake/test_kvm_*``, ``test_memslot_*``, ``test_dirty_log_*``) and handy
for a VMM: each helper packs the uAPI struct with the `fakekvm.abi.kvm`
codecs, calls ``kernel.ioctl`` and returns the result. `outcome` turns a call
into a comparable value (the return value, or the errno name).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TypeVar

from fakekvm.abi import kvm as K
from fakekvm.kernel.seam import Kernel

T = TypeVar("T")


def outcome(fn: Callable[[], T]) -> T | str:
    """``fn()``'s value, or the errno name it raised (``"EINVAL"``)."""
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def open_kvm(k: Kernel) -> int:
    return k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)


def create_vm(k: Kernel, kvm_fd: int, vm_type: int = 0) -> int:
    return k.ioctl(kvm_fd, K.KVM_CREATE_VM, vm_type)


def check_extension(k: Kernel, fd: int, cap: int) -> int:
    return k.ioctl(fd, K.KVM_CHECK_EXTENSION, cap)


def set_region(k: Kernel, vm_fd: int, slot: int, flags: int, gpa: int, size: int, hva: int) -> int:
    """KVM_SET_USER_MEMORY_REGION."""
    buf = bytearray(K.kvm_userspace_memory_region_fmt.pack(slot, flags, gpa, size, hva))
    return k.ioctl(vm_fd, K.KVM_SET_USER_MEMORY_REGION, buf)


def set_region2(
    k: Kernel,
    vm_fd: int,
    slot: int,
    flags: int,
    gpa: int,
    size: int,
    hva: int,
    guest_memfd_offset: int = 0,
    guest_memfd: int = 0,
    pad1: int = 0,
) -> int:
    """KVM_SET_USER_MEMORY_REGION2 (guest_memfd is a signed fd; -1 allowed)."""
    buf = bytearray(
        K.kvm_userspace_memory_region2_fmt.pack(
            slot, flags, gpa, size, hva, guest_memfd_offset, guest_memfd & 0xFFFFFFFF, pad1
        )
    )
    return k.ioctl(vm_fd, K.KVM_SET_USER_MEMORY_REGION2, buf)


def get_dirty_log(
    k: Kernel, vm_fd: int, slot: int, nbytes: int, *, pointer: int | None = None
) -> bytes:
    """KVM_GET_DIRTY_LOG into a fresh anonymous mapping (or at ``pointer``); returns the bitmap."""
    m = None
    if pointer is None:
        m = k.mmap(-1, max(nbytes, 1), 3, 0x22)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
        pointer = m.address
    try:
        k.ioctl(vm_fd, K.KVM_GET_DIRTY_LOG, bytearray(K.kvm_dirty_log_fmt.pack(slot, 0, pointer)))
        return bytes(memoryview(m).cast("B")[:nbytes]) if m is not None else b""  # type: ignore[arg-type]
    finally:
        if m is not None:
            k.munmap(m.address, m.length)


def clear_dirty_log(
    k: Kernel, vm_fd: int, slot: int, first_page: int, num_pages: int, bitmap: bytes | None
) -> int:
    """KVM_CLEAR_DIRTY_LOG with ``bitmap`` placed in user memory (None: a NULL pointer)."""
    m = None
    ptr = 0
    if bitmap is not None:
        m = k.mmap(-1, max(len(bitmap), 1), 3, 0x22)
        memoryview(m).cast("B")[: len(bitmap)] = bitmap  # type: ignore[arg-type]
        ptr = m.address
    try:
        return k.ioctl(
            vm_fd,
            K.KVM_CLEAR_DIRTY_LOG,
            bytearray(K.kvm_clear_dirty_log_fmt.pack(slot, num_pages, first_page, ptr)),
        )
    finally:
        if m is not None:
            k.munmap(m.address, m.length)


def enable_cap(k: Kernel, fd: int, cap: int, *args: int, flags: int = 0) -> int:
    a = [*args, 0, 0, 0, 0][:4]
    return k.ioctl(fd, K.KVM_ENABLE_CAP, bytearray(K.kvm_enable_cap_fmt.pack(cap, flags, *a)))


def create_guest_memfd(k: Kernel, vm_fd: int, size: int, flags: int = 0) -> int:
    return k.ioctl(
        vm_fd, K.KVM_CREATE_GUEST_MEMFD, bytearray(K.kvm_create_guest_memfd_fmt.pack(size, flags))
    )


def set_memory_attributes(
    k: Kernel, vm_fd: int, address: int, size: int, attributes: int, flags: int = 0
) -> int:
    return k.ioctl(
        vm_fd,
        K.KVM_SET_MEMORY_ATTRIBUTES,
        bytearray(K.kvm_memory_attributes_fmt.pack(address, size, attributes, flags)),
    )
