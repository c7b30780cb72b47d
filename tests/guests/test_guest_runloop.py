"""`GuestVM`'s setup, exit handling and teardown, driven by a scripted kernel.

No /dev/kvm, no threads: a `Kernel` whose ``KVM_RUN`` plays a script of exits
written straight into the vCPU's ``kvm_run`` buffer, and which records every
call, so the VMM's protocol can be checked exactly.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from fakekvm.abi import kvm
from fakekvm.guests import GuestError, GuestVM, hello_image
from fakekvm.guests.workloads import echo_image
from fakekvm.kernel.mapping import Mapping, make_mapping
from fakekvm.kernel.seam import IoctlArg, Kernel

Step = Callable[[memoryview], None] | BaseException


class ScriptedKernel(Kernel):
    name = "scripted"

    def __init__(self, script: Sequence[Step] = ()) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, Any]] = []
        self.open_fds: set[int] = set()
        self.maps: dict[int, object] = {}
        self.next_fd = 100
        self.regs = bytearray(kvm.kvm_regs_fmt.size)
        self.sregs = bytearray(kvm.kvm_sregs.sizeof())
        struct.pack_into("<Q", self.sregs, 272, 0xFEE00900)  # apic_base, must survive the overlay
        self.run: memoryview | None = None
        self.seen_before_run: list[bytes] = []
        self.fail: dict[int, int] = {}  # request -> errno

    def _fd(self) -> int:
        self.next_fd += 1
        self.open_fds.add(self.next_fd)
        return self.next_fd

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        self.calls.append(("open", path))
        return self._fd()

    def close(self, fd: int) -> None:
        self.calls.append(("close", fd))
        self.open_fds.remove(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        self.calls.append(("ioctl", request))
        if request in self.fail:
            raise OSError(self.fail[request], "scripted failure")
        if request in (kvm.KVM_CREATE_VM, kvm.KVM_CREATE_VCPU):
            return self._fd()
        if request == kvm.KVM_GET_VCPU_MMAP_SIZE:
            return 12288
        if request == kvm.KVM_SET_USER_MEMORY_REGION:
            assert isinstance(arg, bytearray)
            self.calls.append(("memslot", kvm.kvm_userspace_memory_region_fmt.unpack(arg)))
            return 0
        if request in (kvm.KVM_SET_REGS, kvm.KVM_SET_SREGS):
            target = self.regs if request == kvm.KVM_SET_REGS else self.sregs
            assert isinstance(arg, bytearray)
            target[:] = arg
            return 0
        if request in (kvm.KVM_GET_REGS, kvm.KVM_GET_SREGS):
            assert isinstance(arg, bytearray)
            arg[:] = self.regs if request == kvm.KVM_GET_REGS else self.sregs
            return 0
        if request == kvm.KVM_RUN:
            assert self.run is not None
            self.seen_before_run.append(bytes(self.run[:4200]))
            if not self.script:
                raise AssertionError("KVM_RUN past the end of the script")
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            step(self.run)
            return 0
        raise OSError(errno.ENOTTY, f"scripted: ioctl {request:#x}")

    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        buf = (ctypes.c_ubyte * length)()
        addr = ctypes.addressof(buf)
        self.maps[addr] = buf
        m = make_mapping(addr, length, fd=fd, prot=prot, flags=flags, owner=self)
        if fd >= 0:
            self.run = m.view()
        self.calls.append(("mmap", fd))
        return m

    def munmap(self, address: int, length: int) -> None:
        self.calls.append(("munmap", address))
        del self.maps[address]

    def shutdown(self) -> None:
        pass

    def _unused(self, *a: object, **k: object) -> object:
        raise NotImplementedError

    read = write = pread = pwrite = lseek = fstat = ftruncate = fallocate = _unused  # type: ignore[assignment]
    mremap = madvise = userfaultfd = eventfd = memfd_create = poll = _unused  # type: ignore[assignment]

    def monotonic_ns(self) -> int:
        return 0

    def gettid(self) -> int:
        return os.getpid()


def _set_reason(run: memoryview, reason: int) -> None:
    struct.pack_into("<I", run, kvm.KVM_RUN_EXIT_REASON_OFFSET, reason)


def io(direction: int, port: int, data: bytes, size: int = 1) -> Step:
    def step(run: memoryview) -> None:
        _set_reason(run, kvm.KVM_EXIT_IO)
        count = max(1, len(data) // size)
        kvm.kvm_run_io_fmt.pack_into(run, 32, direction, size, port, count, 4096)
        if direction == kvm.KVM_EXIT_IO_OUT:
            run[4096 : 4096 + len(data)] = data

    return step


def mmio(addr: int, length: int, write: bytes | None = None) -> Step:
    def step(run: memoryview) -> None:
        _set_reason(run, kvm.KVM_EXIT_MMIO)
        kvm.kvm_run_mmio_fmt.pack_into(
            run, 32, addr, (write or b"\xee" * 8).ljust(8, b"\0"), length, write is not None
        )

    return step


def bare(reason: int) -> Step:
    return lambda run: _set_reason(run, reason)


OUT, IN = kvm.KVM_EXIT_IO_OUT, kvm.KVM_EXIT_IO_IN


def test_setup_order_and_memslot() -> None:
    k = ScriptedKernel()
    vm = GuestVM(k, 1 << 20, vcpus=2)
    ops = [c for c in k.calls if c[0] in ("open", "ioctl")]
    assert ops[0] == ("open", "/dev/kvm")
    assert [c[1] for c in ops[1:3]] == [kvm.KVM_CREATE_VM, kvm.KVM_GET_VCPU_MMAP_SIZE]
    (slot,) = [c[1] for c in k.calls if c[0] == "memslot"]
    assert slot[:4] == (0, 0, 0, 1 << 20)
    assert vm.memory is not None and slot[4] == vm.memory.address
    assert sum(1 for c in k.calls if c == ("ioctl", kvm.KVM_CREATE_VCPU)) == 2
    vm.close()
    assert not k.open_fds and not k.maps, "close releases every fd and mapping"
    vm.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        vm.mem()


def test_failed_setup_releases_what_it_made() -> None:
    k = ScriptedKernel()
    k.fail[kvm.KVM_CREATE_VCPU] = errno.EEXIST
    with pytest.raises(OSError) as e:
        GuestVM(k, 1 << 20)
    assert e.value.errno == errno.EEXIST
    assert not k.open_fds and not k.maps


def test_callers_memory_is_used_and_not_unmapped() -> None:
    k = ScriptedKernel()
    mine = k.mmap(-1, 2 << 20, 3, 0x22)
    with GuestVM(k, 2 << 20, memory=mine) as vm:
        assert vm.memory is mine
        vm.load(hello_image())
        assert bytes(mine.view()[0x7C00:0x7C02]) == hello_image().chunks[0].data[:2]
    assert mine.address in k.maps
    with pytest.raises(ValueError):
        GuestVM(k, 4 << 20, memory=mine)


def test_load_overlays_sregs_and_sets_regs() -> None:
    k = ScriptedKernel()
    with GuestVM(k, 4 << 20) as vm:
        vm.load(echo_image(4 << 20))
        s = vm.get_sregs()
        assert s["cs"]["dpl"] == 3 and s["cs"]["l"] == 1 and s["efer"] == 0x500
        assert s["apic_base"] == 0xFEE00900, "fields the image does not name keep their value"
        r = vm.get_regs()
        assert r["rip"] == 0x100000 and r["rflags"] == 0x3002 and r["rsp"] == 0x200000
        with pytest.raises(KeyError):
            vm.set_regs(0, rpi=1)
        with pytest.raises(KeyError):
            vm.set_sregs(0, cr9=1)


def test_out_protocol_text_reports_done() -> None:
    script = [
        io(OUT, 0x3F8, b"h"),
        io(OUT, 0xE0, b"\x01\0\0\0\x02\0\0\0", size=4),
        io(OUT, 0x80, b"\x99"),
        io(OUT, 0x3F8, b"i"),
        io(OUT, 0xF4, b"\x07"),
    ]
    k = ScriptedKernel(script)
    with GuestVM(k, 1 << 20) as vm:
        r = vm.run()
    assert (r.stop, r.done, r.error) == ("done", 7, None)
    assert r.text == "hi" and r.reports == [1, 2]
    assert [e.field("port") for e in r.exits] == [0x3F8, 0xE0, 0x80, 0x3F8, 0xF4]
    assert not k.script


def test_in_and_mmio_read_data_reach_the_guest_on_reentry() -> None:
    script = [
        io(IN, 0xE4, b"", size=4),
        mmio(0x5000000, 4),
        mmio(0x5000010, 2, b"\xab\xcd"),
        bare(kvm.KVM_EXIT_HLT),
    ]
    k = ScriptedKernel(script)
    with GuestVM(k, 1 << 20) as vm:
        r = vm.run(
            on_io_in=lambda port, size, count: (port + size).to_bytes(4, "little"),
            on_mmio_read=lambda addr, n: b"\x11\x22\x33\x44"[:n],
        )
    before_mmio, before_mmio_write = k.seen_before_run[1], k.seen_before_run[2]
    assert before_mmio[4096:4100] == (0xE4 + 4).to_bytes(4, "little"), "IN data at data_offset"
    assert before_mmio_write[40:44] == b"\x11\x22\x33\x44", "MMIO read data in mmio.data"
    assert r.exits[0].data == (0xE8).to_bytes(4, "little")
    assert r.exits[1].data == b"\x11\x22\x33\x44"
    assert r.exits[2].data == b"\xab\xcd" and r.exits[2].field("is_write") == 1
    assert r.stop == "hlt"


def test_default_in_and_mmio_answers_are_zeros() -> None:
    k = ScriptedKernel([io(IN, 0x60, b""), mmio(0x9000000, 8), bare(kvm.KVM_EXIT_HLT)])
    with GuestVM(k, 1 << 20) as vm:
        r = vm.run()
    assert r.exits[0].data == b"\0" and r.exits[1].data == bytes(8)


def test_eintr_is_retried_and_not_recorded() -> None:
    k = ScriptedKernel(
        [InterruptedError(errno.EINTR, "x"), OSError(errno.EINTR, "y"), bare(kvm.KVM_EXIT_HLT)]
    )
    with GuestVM(k, 1 << 20) as vm:
        r = vm.run()
    assert [e.name for e in r.exits] == ["KVM_EXIT_HLT"]


def test_kvm_run_errno_propagates() -> None:
    k = ScriptedKernel([OSError(errno.EFAULT, "KVM_RUN: Bad address")])
    with GuestVM(k, 1 << 20) as vm, pytest.raises(OSError) as e:
        vm.run()
    assert e.value.errno == errno.EFAULT


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        (kvm.KVM_EXIT_SHUTDOWN, "guest stopped: KVM_EXIT_SHUTDOWN"),
        (kvm.KVM_EXIT_FAIL_ENTRY, "guest stopped: KVM_EXIT_FAIL_ENTRY"),
        (kvm.KVM_EXIT_INTERNAL_ERROR, "guest stopped: KVM_EXIT_INTERNAL_ERROR"),
        (kvm.KVM_EXIT_DEBUG, "unexpected exit: KVM_EXIT_DEBUG"),
    ],
)
def test_error_exits_stop_with_the_exit_named(reason: int, text: str) -> None:
    k = ScriptedKernel([io(OUT, 0x3F8, b"x"), bare(reason)])
    with GuestVM(k, 1 << 20) as vm:
        with pytest.raises(GuestError, match=text) as e:
            vm.run()
        assert e.value.result.text == "x" and e.value.result.stop == "error"
        k.script = [bare(reason)]
        r = vm.run(check=False)
        assert r.error is not None and text in r.error


def test_internal_error_names_the_suberror() -> None:
    def emulation_failure(run: memoryview) -> None:
        _set_reason(run, kvm.KVM_EXIT_INTERNAL_ERROR)
        struct.pack_into("<IIQ", run, 32, kvm.KVM_INTERNAL_ERROR_EMULATION, 1, 1)

    k = ScriptedKernel([emulation_failure])
    with GuestVM(k, 1 << 20) as vm:
        r = vm.run(check=False)
    assert r.error == (
        "guest stopped: KVM_EXIT_INTERNAL_ERROR (KVM_INTERNAL_ERROR_EMULATION, ndata=1)"
    )
    assert r.exits[0].data == struct.pack("<Q", 1)


def test_until_and_max_exits() -> None:
    k = ScriptedKernel([io(OUT, 0x3F8, b"a"), io(OUT, 0x3F8, b"b"), io(OUT, 0x3F8, b"c")])
    with GuestVM(k, 1 << 20) as vm:
        r = vm.run(until=lambda e: e.data == b"b")
        assert (r.stop, r.text) == ("until", "ab")
        k.script = [io(OUT, 0x3F8, b"z")] * 5
        r = vm.run(max_exits=3, check=False)
        assert r.stop == "max_exits" and len(r.exits) == 3 and r.error


def test_bad_sizes_are_refused() -> None:
    k = ScriptedKernel()
    with pytest.raises(ValueError):
        GuestVM(k, 1000)
    with GuestVM(k, 1 << 20) as vm, pytest.raises(ValueError):
        vm.load(echo_image(4 << 20))  # needs 2 MiB
    k = ScriptedKernel([io(IN, 0xE4, b"", size=4)])
    with GuestVM(k, 1 << 20) as vm, pytest.raises(ValueError):
        vm.run(on_io_in=lambda p, s, c: b"\0")
