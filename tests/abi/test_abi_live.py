"""What the 6.1 headers cannot show, checked on the live kernel through RealKernel.

Each test hands the kernel our ioctl number and bytes built from our construct
definitions (or ``*_fmt`` codecs) and checks that the kernel understood them:
a field at the wrong offset or a wrong number gives ENOTTY/EINVAL/EBADF or a
wrong result instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import threading
from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm, mman, uffd
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.real import RealKernel

PAGE = 4096


@pytest.fixture
def vm(real_kernel: RealKernel) -> Iterator[tuple[RealKernel, int, int]]:
    k = real_kernel
    sys_fd = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm_fd = k.ioctl(sys_fd, kvm.KVM_CREATE_VM, kvm.KVM_X86_DEFAULT_VM)
    try:
        yield k, sys_fd, vm_fd
    finally:
        k.close(vm_fd)
        k.close(sys_fd)


def _anon(k: RealKernel, length: int) -> Mapping:
    return k.mmap(
        -1, length, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
    )


def _region2(slot: int, gpa: int, size: int, ua: int, flags: int = 0, gmem_off: int = 0, gmem: int = 0) -> bytearray:
    return bytearray(
        kvm.kvm_userspace_memory_region2.build(
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": ua,
                "guest_memfd_offset": gmem_off,
                "guest_memfd": gmem,
                "pad1": 0,
                "pad2": [0] * 14,
            }
        )
    )


@pytest.mark.real_kernel
def test_api_version_and_caps(vm: tuple[RealKernel, int, int]) -> None:
    k, sys_fd, vm_fd = vm
    assert k.ioctl(sys_fd, kvm.KVM_GET_API_VERSION) == kvm.KVM_API_VERSION
    assert k.ioctl(sys_fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_USER_MEMORY2) == 1
    assert k.ioctl(vm_fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_GUEST_MEMFD_FLAGS) == (
        kvm.GUEST_MEMFD_FLAG_MMAP | kvm.GUEST_MEMFD_FLAG_INIT_SHARED
    )
    assert k.ioctl(vm_fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_GUEST_MEMFD) == 1
    assert k.ioctl(sys_fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_SYNC_REGS) == kvm.KVM_SYNC_X86_VALID_FIELDS
    mmap_size = k.ioctl(sys_fd, kvm.KVM_GET_VCPU_MMAP_SIZE)
    assert mmap_size >= kvm.KVM_RUN_SIZE and mmap_size % PAGE == 0


@pytest.mark.real_kernel
def test_set_user_memory_region2_maps_and_deletes(vm: tuple[RealKernel, int, int]) -> None:
    k, _, vm_fd = vm
    m = _anon(k, 2 * PAGE)
    try:
        gpa = 0x100000
        assert k.ioctl(vm_fd, kvm.KVM_SET_USER_MEMORY_REGION2, _region2(0, gpa, 2 * PAGE, m.address)) == 0
        # the slot really covers [gpa, gpa + 2 pages): another slot overlapping it is refused
        with pytest.raises(OSError) as e:
            k.ioctl(vm_fd, kvm.KVM_SET_USER_MEMORY_REGION2, _region2(1, gpa + PAGE, PAGE, m.address))
        assert e.value.errno == errno.EEXIST
        # same slot, size 0: deleted; now the range is free for slot 1
        assert k.ioctl(vm_fd, kvm.KVM_SET_USER_MEMORY_REGION2, _region2(0, gpa, 0, m.address)) == 0
        assert k.ioctl(vm_fd, kvm.KVM_SET_USER_MEMORY_REGION2, _region2(1, gpa + PAGE, PAGE, m.address)) == 0
        # unknown flag bit 3 (the KVM Userfault proposal) is refused: not upstream
        with pytest.raises(OSError) as e:
            k.ioctl(vm_fd, kvm.KVM_SET_USER_MEMORY_REGION2, _region2(2, 0x200000, PAGE, m.address, flags=1 << 3))
        assert e.value.errno == errno.EINVAL
        # the old 32-byte ioctl with our fmt codec
        old = bytearray(kvm.kvm_userspace_memory_region_fmt.pack(3, 0, 0x300000, PAGE, m.address))
        assert k.ioctl(vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, old) == 0
    finally:
        k.munmap(m.address, m.length)


@pytest.mark.real_kernel
def test_create_guest_memfd_and_bind(vm: tuple[RealKernel, int, int]) -> None:
    k, _, vm_fd = vm
    size = 2 << 20
    for flags in (0, kvm.GUEST_MEMFD_FLAG_MMAP | kvm.GUEST_MEMFD_FLAG_INIT_SHARED):
        arg = bytearray(kvm.kvm_create_guest_memfd.build({"size": size, "flags": flags, "reserved": [0] * 6}))
        gfd = k.ioctl(vm_fd, kvm.KVM_CREATE_GUEST_MEMFD, arg)
        try:
            assert gfd > 2
            assert k.fstat(gfd).st_size == size
        finally:
            k.close(gfd)
    # flags really sit at offset 8: an unknown bit there is refused
    bad = bytearray(kvm.kvm_create_guest_memfd_fmt.pack(size, 1 << 2))
    with pytest.raises(OSError) as e:
        k.ioctl(vm_fd, kvm.KVM_CREATE_GUEST_MEMFD, bad)
    assert e.value.errno == errno.EINVAL
    # bind it: guest_memfd_offset@32 and guest_memfd@40 are read where we put them
    gfd = k.ioctl(vm_fd, kvm.KVM_CREATE_GUEST_MEMFD, bytearray(kvm.kvm_create_guest_memfd_fmt.pack(size, 0)))
    m = _anon(k, size)
    try:
        with pytest.raises(OSError) as e:
            k.ioctl(
                vm_fd,
                kvm.KVM_SET_USER_MEMORY_REGION2,
                _region2(0, 0x400000, size, m.address, kvm.KVM_MEM_GUEST_MEMFD, 0, 0xFFFFFFFF),
            )
        assert e.value.errno == errno.EBADF
        with pytest.raises(OSError) as e:  # offset + size beyond the file
            k.ioctl(
                vm_fd,
                kvm.KVM_SET_USER_MEMORY_REGION2,
                _region2(0, 0x400000, size, m.address, kvm.KVM_MEM_GUEST_MEMFD, PAGE, gfd),
            )
        assert e.value.errno == errno.EINVAL
        assert (
            k.ioctl(
                vm_fd,
                kvm.KVM_SET_USER_MEMORY_REGION2,
                _region2(0, 0x400000, size, m.address, kvm.KVM_MEM_GUEST_MEMFD, 0, gfd),
            )
            == 0
        )
    finally:
        k.munmap(m.address, m.length)
        k.close(gfd)


# mov dx, 0x3f8; mov al, 0x42; out dx, al; hlt   (16-bit real mode)
_GUEST = bytes.fromhex("baf803b042eef4")


@pytest.mark.real_kernel
def test_vcpu_run_io_exit_layout(vm: tuple[RealKernel, int, int]) -> None:
    """A real-mode guest proves kvm_regs, kvm_sregs, the kvm_run header and the io arm."""
    k, sys_fd, vm_fd = vm
    mem = _anon(k, 0x10000)
    vcpu = -1
    run = None
    try:
        mem.view()[0x1000 : 0x1000 + len(_GUEST)] = _GUEST
        region = bytearray(kvm.kvm_userspace_memory_region_fmt.pack(0, 0, 0, mem.length, mem.address))
        k.ioctl(vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
        vcpu = k.ioctl(vm_fd, kvm.KVM_CREATE_VCPU, 0)
        size = k.ioctl(sys_fd, kvm.KVM_GET_VCPU_MMAP_SIZE)
        run = k.mmap(vcpu, size, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED)

        sbuf = bytearray(kvm.kvm_sregs.sizeof())
        k.ioctl(vcpu, kvm.KVM_GET_SREGS, sbuf)
        sregs = kvm.kvm_sregs.parse(bytes(sbuf))
        assert sregs.cs.limit == 0xFFFF  # reset state, read through our layout
        sregs.cs.base = 0
        sregs.cs.selector = 0
        k.ioctl(vcpu, kvm.KVM_SET_SREGS, bytearray(kvm.kvm_sregs.build(sregs)))

        regs = [0] * 18
        regs[kvm.KVM_REGS_FIELDS.index("rip")] = 0x1000
        regs[kvm.KVM_REGS_FIELDS.index("rflags")] = 0x2
        k.ioctl(vcpu, kvm.KVM_SET_REGS, bytearray(kvm.kvm_regs_fmt.pack(*regs)))

        rv = run.view()
        assert k.ioctl(vcpu, kvm.KVM_RUN) == 0
        hdr = kvm.kvm_run_header_fmt.unpack_from(rv, 0)
        assert hdr[2] == kvm.KVM_EXIT_IO
        direction, io_size, port, count, data_offset = kvm.kvm_run_io_fmt.unpack_from(rv, kvm.KVM_RUN_EXIT_OFFSET)
        assert (direction, io_size, port, count) == (kvm.KVM_EXIT_IO_OUT, 1, 0x3F8, 1)
        assert rv[data_offset] == 0x42
        parsed = kvm.kvm_run.parse(bytes(rv[: kvm.KVM_RUN_SIZE]))
        assert parsed.u.io.port == 0x3F8 and parsed.exit_reason == kvm.KVM_EXIT_IO

        assert k.ioctl(vcpu, kvm.KVM_RUN) == 0
        assert kvm.kvm_run_exit_reason_fmt.unpack_from(rv, kvm.KVM_RUN_EXIT_REASON_OFFSET)[0] == kvm.KVM_EXIT_HLT

        rbuf = bytearray(kvm.kvm_regs.sizeof())
        k.ioctl(vcpu, kvm.KVM_GET_REGS, rbuf)
        r = kvm.kvm_regs.parse(bytes(rbuf))
        assert r.rip == 0x1000 + len(_GUEST)
        assert r.rax & 0xFF == 0x42
        assert r.rdx & 0xFFFF == 0x3F8

        # KVM_PRE_FAULT_MEMORY: our number is known to this kernel (not ENOTTY)
        pf = bytearray(kvm.kvm_pre_fault_memory_fmt.pack(0, PAGE, 0))
        if k.ioctl(vm_fd, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_PRE_FAULT_MEMORY) == 0:
            with pytest.raises(OSError) as e:
                k.ioctl(vcpu, kvm.KVM_PRE_FAULT_MEMORY, pf)
            assert e.value.errno == errno.EOPNOTSUPP
        else:
            assert k.ioctl(vcpu, kvm.KVM_PRE_FAULT_MEMORY, pf) == 0
    finally:
        if run is not None:
            k.munmap(run.address, run.length)
        if vcpu >= 0:
            k.close(vcpu)
        k.munmap(mem.address, mem.length)


@pytest.mark.real_uffd
def test_uffd_api_move_poison_and_msg(real_kernel: RealKernel) -> None:
    k = real_kernel
    ufd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    dst = _anon(k, 4 * PAGE)
    src = _anon(k, PAGE)
    toucher: threading.Thread | None = None
    try:
        api = bytearray(uffd.uffdio_api_fmt.pack(uffd.UFFD_API, 0, 0))
        assert k.ioctl(ufd, uffd.UFFDIO_API, api) == 0
        _, features, ioctls = uffd.uffdio_api_fmt.unpack(api)
        assert features & (uffd.UFFD_FEATURE_MOVE | uffd.UFFD_FEATURE_POISON) == (
            uffd.UFFD_FEATURE_MOVE | uffd.UFFD_FEATURE_POISON
        )
        assert ioctls == uffd.UFFD_API_IOCTLS

        reg = bytearray(uffd.uffdio_register_fmt.pack(dst.address, dst.length, uffd.UFFDIO_REGISTER_MODE_MISSING, 0))
        assert k.ioctl(ufd, uffd.UFFDIO_REGISTER, reg) == 0
        range_ioctls = uffd.uffdio_register_fmt.unpack(reg)[3]
        assert range_ioctls & (1 << uffd._UFFDIO_MOVE) and range_ioctls & (1 << uffd._UFFDIO_POISON)

        # MOVE one page from a populated anonymous source
        src.view()[:PAGE] = bytes(range(256)) * 16
        mv = bytearray(uffd.uffdio_move_fmt.pack(dst.address, src.address, PAGE, 0, 0))
        assert k.ioctl(ufd, uffd.UFFDIO_MOVE, mv) == 0
        assert uffd.uffdio_move_fmt.unpack(mv)[4] == PAGE
        assert bytes(dst.view()[:PAGE]) == bytes(range(256)) * 16

        # POISON the second page (never touched afterwards: it would SIGBUS)
        po = bytearray(uffd.uffdio_poison_fmt.pack(dst.address + PAGE, PAGE, 0, 0))
        assert k.ioctl(ufd, uffd.UFFDIO_POISON, po) == 0
        assert uffd.uffdio_poison_fmt.unpack(po)[3] == PAGE
        with pytest.raises(OSError) as e:
            k.ioctl(ufd, uffd.UFFDIO_POISON, bytearray(uffd.uffdio_poison_fmt.pack(dst.address + PAGE, PAGE, 0, 0)))
        assert e.value.errno == errno.EEXIST

        # a write fault on page 3 produces a uffd_msg we decode with both codecs
        target = dst.address + 3 * PAGE
        toucher = threading.Thread(target=ctypes.memset, args=(target, 7, 1))  # releases the GIL
        toucher.start()
        ready = k.poll([(ufd, select.POLLIN)], 30_000)  # hang guard only
        assert ready and ready[0][1] & select.POLLIN
        msg = k.read(ufd, uffd.UFFD_MSG_SIZE)
        event, flags, address, _ptid = uffd.uffd_msg_pagefault_fmt.unpack(msg)
        assert event == uffd.UFFD_EVENT_PAGEFAULT
        assert address == target
        assert flags & uffd.UFFD_PAGEFAULT_FLAG_WRITE
        parsed = uffd.uffd_msg.parse(msg)
        assert parsed.arg.pagefault.address == target

        src.view()[:PAGE] = b"\x55" * PAGE  # the moved-away source page is a hole again
        cp = bytearray(uffd.uffdio_copy_fmt.pack(target, src.address, PAGE, 0, 0))
        assert k.ioctl(ufd, uffd.UFFDIO_COPY, cp) == 0
        assert uffd.uffdio_copy_fmt.unpack(cp)[4] == PAGE
        toucher.join()
        toucher = None
        assert dst.view()[3 * PAGE] == 7 and dst.view()[3 * PAGE + 1] == 0x55
        # a second COPY onto the populated page: EEXIST, and -EEXIST in the signed copy field
        with pytest.raises(OSError) as e:
            k.ioctl(ufd, uffd.UFFDIO_COPY, cp)
        assert e.value.errno == errno.EEXIST
        assert uffd.uffdio_copy_fmt.unpack(cp)[4] == -errno.EEXIST
        zp = bytearray(uffd.uffdio_zeropage_fmt.pack(dst.address + 2 * PAGE, PAGE, 0, 0))
        assert k.ioctl(ufd, uffd.UFFDIO_ZEROPAGE, zp) == 0
        assert uffd.uffdio_zeropage_fmt.unpack(zp)[3] == PAGE
        k.ioctl(ufd, uffd.UFFDIO_UNREGISTER, bytearray(uffd.uffdio_range_fmt.pack(dst.address, dst.length)))
    finally:
        if toucher is not None:  # never leave the thread blocked: resolve the fault
            try:
                k.ioctl(ufd, uffd.UFFDIO_ZEROPAGE, bytearray(uffd.uffdio_zeropage_fmt.pack(dst.address + 3 * PAGE, PAGE, 0, 0)))
            except OSError:
                pass
            toucher.join()
        k.close(ufd)
        k.munmap(dst.address, dst.length)
        k.munmap(src.address, src.length)
