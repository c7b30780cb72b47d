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
