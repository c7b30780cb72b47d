"""First-touch cost: a guest storing to N fresh pages (one TLB fill -> walk -> translate each).

Runs as a correctness test (every page touched, one fill per page); with
``--benchmark-enable`` pytest-benchmark reports the time.
"""

from __future__ import annotations

from typing import Any

from fakekvm.fake.cpu import HltExit, X86Cpu
from fakekvm.fake.cpu.testing import CODE, PD, PT, STACK_TOP, StubMemory, assemble, long_mode_image

NPAGES = 1024


def _cpu() -> tuple[StubMemory, X86Cpu]:
    img, s = long_mode_image()
    pd = bytearray(4096)
    pd[0:8] = (PT | 3).to_bytes(8, "little")
    for i in range(1, 512):  # 2 MiB pages above the first 2 MiB
        pd[i * 8 : i * 8 + 8] = ((i << 21) | 0x83).to_bytes(8, "little")
    img[PD] = bytes(pd)
    img[CODE] = assemble(
        f"""
        mov $0x400000, %rbx
        mov ${NPAGES}, %rcx
    1:  movb $1, (%rbx)
        add $4096, %rbx
        dec %rcx
        jnz 1b
        hlt
        """
    )
    mem = StubMemory()
    mem.add(0, 0x400000 + NPAGES * 4096)
    for a, b in img.items():
        mem.write(a, b)
    cpu = X86Cpu(mem.translate)
    cpu.set_sregs(s)
    r = cpu.get_regs()
    r["rip"] = CODE
    r["rsp"] = STACK_TOP
    cpu.set_regs(r)
    return mem, cpu


def test_first_touch_pages(benchmark: Any) -> None:
    made: list[tuple[StubMemory, X86Cpu]] = []

    def setup() -> tuple[tuple[X86Cpu], dict[str, Any]]:
        made.append(_cpu())
        return (made[-1][1],), {}

    ex = benchmark.pedantic(lambda cpu: cpu.run(), setup=setup, rounds=3, iterations=1)
    mem, cpu = made[-1]
    assert ex == HltExit()
    assert cpu.tlb_fills >= NPAGES
    assert mem.read(0x400000 + (NPAGES - 1) * 4096, 1) == b"\x01"


def test_fake_kernel_first_touch_one_fill_per_page_and_one_cache_entry_per_2m(benchmark: Any) -> None:
    """The bench's workload (toucher, sequential writes) on FakeKernel: every page is
    touched and becomes present in the mm, with one TLB fill each, and the walk cache
    holds one entry per 2 MiB guest page touched (the guest library maps data with 2 MiB pages)."""
    from fakekvm.fake import FakeKernel
    from fakekvm.guests import GuestVM, Pattern, TouchParams, layout, toucher_image

    size = 4 << 20
    mem_size = layout.DATA_BASE + size
    p = TouchParams(layout.DATA_BASE, size, Pattern.SEQUENTIAL, write=True, seed=1)
    k = FakeKernel(profile="6.18-pvm")
    try:
        with GuestVM(k, mem_size) as vm:
            vm.load(toucher_image(mem_size, p))
            cpu = k.file(vm.vcpu_fds[0]).cpu  # type: ignore[attr-defined]
            r = benchmark.pedantic(vm.run, rounds=1, iterations=1)
            assert r.reports[0] == p.npages
            assert p.npages <= cpu.tlb_fills <= p.npages + 64  # + code, stack, tables, ports
            assert len(cpu._walker) <= size // (2 << 20) + 2
            assert vm.memory is not None
            base = vm.memory.address + layout.DATA_BASE
            assert all(k.mm.present.test((base >> 12) + i) for i in range(p.npages))
    finally:
        k.shutdown()
