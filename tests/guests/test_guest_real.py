"""The guests on the live kernel, through `RealKernel` and `fakekvm.abi` only."""

from __future__ import annotations

import ctypes
import os
import threading

import pytest

from fakekvm.abi import kvm, mman
from fakekvm.guests import (
    HELLO_MESSAGE,
    GuestError,
    GuestVM,
    Pattern,
    TouchParams,
    echo_image,
    expected_checksum,
    expected_touch_report,
    hello_image,
    layout,
    long_mode_image,
    pattern_bytes,
    touch_order,
    toucher_image,
    verifier_image,
    writer_image,
)
from fakekvm.guests import workloads as w
from fakekvm.kernel.real import RealKernel

pytestmark = pytest.mark.real_kernel

MiB = 1 << 20
BASE = layout.DATA_BASE
SIZE = 16 * MiB
MEM = BASE + SIZE


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_issue2_hello_in_real_mode(real_kernel: RealKernel) -> None:
    """Issue-2 acceptance: VM, memslot, vCPU, real-mode hello; IO exits carry the message."""
    with GuestVM(real_kernel, 1 * MiB) as vm:
        vm.load(hello_image())
        r = vm.run()
    io_exits = r.exits[:-1]
    assert len(io_exits) == len(HELLO_MESSAGE)
    for ex, byte in zip(io_exits, HELLO_MESSAGE, strict=True):
        assert ex.reason == kvm.KVM_EXIT_IO
        assert ex.field("port") == 0x3F8
        assert ex.field("direction") == kvm.KVM_EXIT_IO_OUT
        assert ex.field("size") == 1 and ex.field("count") == 1
        assert ex.data == bytes([byte])
    assert r.exits[-1].reason == kvm.KVM_EXIT_HLT and r.stop == "hlt"
    assert r.serial == HELLO_MESSAGE
    assert r.regs["rip"] == 0x7C00 + 0x14, "stopped after the hlt"


@pytest.mark.parametrize("pattern", list(Pattern), ids=lambda p: p.name)
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_toucher_patterns(real_kernel: RealKernel, pattern: Pattern, write: bool) -> None:
    p = TouchParams(BASE, SIZE, pattern, write=write, seed=0x5EED, stride=7, hot_pages=32)
    with GuestVM(real_kernel, MEM) as vm:
        mem = vm.mem()
        if not write:  # give the reads something to sum
            mem[BASE:MEM] = pattern_bytes(3, BASE, SIZE)
        before = bytes(mem[BASE:MEM])
        vm.load(toucher_image(MEM, p))
        r = vm.run()
        after = bytes(mem[BASE:MEM])
    count, total = expected_touch_report(p, before)
    assert (r.stop, r.done) == ("done", 0)
    assert r.reports[0] == count == p.npages  # HOTSET: touches defaults to npages
    assert r.report64(1) == total
    if write:
        expect = bytearray(before)
        for i in touch_order(p):
            expect[i * 4096 : i * 4096 + 8] = w.touch_value(p.seed, i).to_bytes(8, "little")
        assert after == bytes(expect)
    else:
        assert after == before, "a read run changes nothing"


def test_toucher_unknown_pattern_reports_bad_param(real_kernel: RealKernel) -> None:
    image = toucher_image(MEM, TouchParams(BASE, SIZE)).with_regs(rcx=9)
    with GuestVM(real_kernel, MEM) as vm:
        vm.load(image)
        r = vm.run()
    assert (r.stop, r.done, r.reports) == ("done", 2, [])


def test_writer_then_verifier(real_kernel: RealKernel) -> None:
    seed = 0xC0FFEE
    with GuestVM(real_kernel, MEM) as vm:
        vm.load(writer_image(MEM, BASE, SIZE, seed))
        r = vm.run()
        assert r.reports == [SIZE // 4096] and r.done == 0
        assert bytes(vm.mem()[BASE:MEM]) == pattern_bytes(seed, BASE, SIZE)
        vm.load(verifier_image(MEM, BASE, SIZE))
        r = vm.run()
        assert r.report64(0) == expected_checksum(seed, BASE, SIZE)
        # the verifier sees a change of one byte
        vm.mem()[BASE + 12345] ^= 1
        vm.load(verifier_image(MEM, BASE, SIZE))
        assert (
            vm.run().report64(0)
            == w.checksum(vm.mem()[BASE:MEM])
            != expected_checksum(seed, BASE, SIZE)
        )


def test_echo_in_exits(real_kernel: RealKernel) -> None:
    values = iter([41, 0xFFFFFFFE, 0])
    with GuestVM(real_kernel, 2 * MiB) as vm:
        vm.load(echo_image(2 * MiB))
        r = vm.run(on_io_in=lambda port, size, count: next(values).to_bytes(4, "little"))
    assert r.reports == [42, 0xFFFFFFFF] and r.text == ".." and r.done == 0
    ins = [e for e in r.exits if e.field("direction") == kvm.KVM_EXIT_IO_IN]
    assert [(e.field("port"), e.field("size"), e.data) for e in ins] == [
        (0xE4, 4, (41).to_bytes(4, "little")),
        (0xE4, 4, (0xFFFFFFFE).to_bytes(4, "little")),
        (0xE4, 4, bytes(4)),
    ]


def test_mmio_outside_the_memslot(real_kernel: RealKernel) -> None:
    """Pages mapped by the guest tables but with no memslot exit with KVM_EXIT_MMIO."""
    mem = 4 * MiB
    window = mem  # two pages past the end of memory
    read = TouchParams(window, 2 * 4096, Pattern.SEQUENTIAL)
    with GuestVM(real_kernel, mem) as vm:
        vm.load(toucher_image(mem, read, mapped_size=mem + 2 * 4096))
        r = vm.run(on_mmio_read=lambda addr, n: (addr & 0xFFFFFFFF).to_bytes(8, "little")[:n])
        mmios = [e for e in r.exits if e.reason == kvm.KVM_EXIT_MMIO]
        assert [(e.field("phys_addr"), e.field("len"), e.field("is_write")) for e in mmios] == [
            (window, 8, 0),
            (window + 4096, 8, 0),
        ]
        assert r.reports[0] == 2 and r.report64(1) == 2 * window + 4096, "the guest read our data"
        write = TouchParams(window, 4096, Pattern.SEQUENTIAL, write=True, seed=1)
        vm.load(toucher_image(mem, write, mapped_size=mem + 2 * 4096))
        r = vm.run()
        (m,) = [e for e in r.exits if e.reason == kvm.KVM_EXIT_MMIO]
        assert m.field("is_write") == 1 and m.data == w.touch_value(1, 0).to_bytes(8, "little")


@pytest.mark.parametrize(
    "code",
    [b"\x0f\x0b", b"\xf4", b"\x48\x8b\x04\x25\x00\x00\x00\x00"],
    ids=["ud2", "hlt-at-cpl3", "null-read"],
)
def test_error_exit_is_named(real_kernel: RealKernel, code: bytes) -> None:
    """Any exception triple-faults (IDT.limit = 0, page 0 absent): KVM_EXIT_SHUTDOWN."""
    with GuestVM(real_kernel, 2 * MiB) as vm:
        vm.load(long_mode_image("bad", code, 2 * MiB))
        with pytest.raises(GuestError, match="KVM_EXIT_SHUTDOWN") as e:
            vm.run()
    assert e.value.result.exits[-1].reason == kvm.KVM_EXIT_SHUTDOWN


def test_dirty_log_never_shows_the_page_tables(real_kernel: RealKernel) -> None:
    """A/D bits are preset, so the guest's page walk dirties no table page."""
    mem_size = 8 * MiB
    p = TouchParams(BASE + 0x10000, 3 * 4096, Pattern.SEQUENTIAL, write=True)
    with GuestVM(real_kernel, mem_size, slot_flags=kvm.KVM_MEM_LOG_DIRTY_PAGES) as vm:
        vm.load(toucher_image(mem_size, p))
        bitmap = bytearray(mem_size // 4096 // 8)
        holder = (ctypes.c_ubyte * len(bitmap)).from_buffer(bitmap)
        arg = bytearray(kvm.kvm_dirty_log_fmt.pack(0, 0, ctypes.addressof(holder)))
        vm.run()
        real_kernel.ioctl(vm.vm_fd, kvm.KVM_GET_DIRTY_LOG, arg)
        dirty = {i * 4096 for i in range(mem_size // 4096) if bitmap[i // 8] >> (i % 8) & 1}
        del holder
    assert {BASE + 0x10000, BASE + 0x11000, BASE + 0x12000} <= dirty
    tables = set(range(layout.PML4_ADDR, layout.PD_ADDR + 4096, 4096))
    assert not dirty & tables, sorted(hex(a) for a in dirty & tables)
    assert max(dirty) == BASE + 0x12000 and not dirty & {layout.GDT_ADDR, layout.TSS_ADDR}


def test_callers_memory_and_close(real_kernel: RealKernel) -> None:
    before = _fds()
    mine = real_kernel.mmap(
        -1, MEM, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
    )
    try:
        vm = GuestVM(real_kernel, MEM, memory=mine)
        assert len(_fds()) == len(before) + 3, "kvm, vm and vcpu fds"
        vm.load(writer_image(MEM, BASE, SIZE, 77))
        vm.run()
        vm.close()
        assert _fds() == before, "close released every fd"
        assert bytes(mine.view()[BASE : BASE + 4096]) == w.pattern_page(77, BASE), "still mapped"
    finally:
        real_kernel.munmap(mine.address, mine.length)


def test_two_vcpus_in_two_threads(real_kernel: RealKernel) -> None:
    half = SIZE // 2
    p0 = TouchParams(BASE, half, Pattern.RANDOM, write=True, seed=1)
    p1 = TouchParams(BASE + half, half, Pattern.STRIDED, write=True, seed=2, stride=3)
    with GuestVM(real_kernel, MEM, vcpus=2) as vm:
        vm.load(toucher_image(MEM, p0), vcpus=[0])
        vm.load(toucher_image(MEM, p1), vcpus=[1])
        results = {}
        start = threading.Barrier(2)

        def go(i: int) -> None:
            start.wait()
            results[i] = vm.run(i)

        threads = [threading.Thread(target=go, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        mem = vm.mem()
        for i, p in ((0, p0), (1, p1)):
            assert results[i].reports[0] == p.npages
            assert results[i].report64(1) == expected_touch_report(p)[1]
            for page in (0, p.npages - 1):
                off = p.base + page * 4096
                assert bytes(mem[off : off + 8]) == w.touch_value(p.seed, page).to_bytes(
                    8, "little"
                )


def test_first_touch_rate_64mib(
    real_kernel: RealKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    """Report: pages first-touched per second by the toucher on 64 MiB (write, sequential)."""
    size = 64 * MiB
    mem = BASE + size
    rates = []
    for pattern in (Pattern.SEQUENTIAL, Pattern.RANDOM):
        p = TouchParams(BASE, size, pattern, write=True, seed=1)
        with GuestVM(real_kernel, mem) as vm:
            vm.load(toucher_image(mem, p))
            r = vm.run()
        assert r.reports[0] == p.npages
        rates.append((pattern.name, p.npages / (r.elapsed_ns / 1e9), r.elapsed_ns / 1e6))
    with capsys.disabled():
        for name, rate, ms in rates:
            print(
                f"\n[real kvm] toucher {name} write 64 MiB: {rate:,.0f} pages/s first touch ({ms:.1f} ms)"
            )
