"""Real-kernel speed of the guests (pytest-benchmark; disabled by default).

Run with ``python -m pytest tests/guests/test_guest_bench.py --benchmark-enable``.
With benchmarks disabled each body still runs once, so the assertions hold.
"""

from __future__ import annotations

from typing import Any

import pytest

from fakekvm.guests import GuestVM, Pattern, TouchParams, echo_image, layout, toucher_image
from fakekvm.kernel.real import RealKernel

pytestmark = pytest.mark.real_kernel

MiB = 1 << 20
BASE = layout.DATA_BASE
SIZE = 64 * MiB
MEM = BASE + SIZE


def _toucher_vm(kernel: RealKernel, p: TouchParams) -> GuestVM:
    vm = GuestVM(kernel, MEM)
    vm.load(toucher_image(MEM, p))
    return vm


@pytest.mark.parametrize("pattern", [Pattern.SEQUENTIAL, Pattern.RANDOM], ids=lambda p: p.name)
def test_bench_first_touch_64mib(benchmark: Any, real_kernel: RealKernel, pattern: Pattern) -> None:
    """Every page of 64 MiB touched (written) for the first time: one fresh VM a round."""
    p = TouchParams(BASE, SIZE, pattern, write=True, seed=1)
    vms: list[GuestVM] = []

    def setup() -> tuple[tuple[GuestVM], dict[str, Any]]:
        vm = _toucher_vm(real_kernel, p)
        vms.append(vm)
        return (vm,), {}

    try:
        result = benchmark.pedantic(lambda vm: vm.run(), setup=setup, rounds=5, iterations=1)
    finally:
        for vm in vms:
            vm.close()
    assert result.reports[0] == p.npages
    benchmark.extra_info["pages"] = p.npages


def test_bench_retouch_populated_64mib(benchmark: Any, real_kernel: RealKernel) -> None:
    """The same pages touched again: host pages and shadow entries already exist."""
    p = TouchParams(BASE, SIZE, Pattern.SEQUENTIAL, write=True, seed=1)
    with _toucher_vm(real_kernel, p) as vm:
        vm.run()
        image = toucher_image(MEM, p)

        def again() -> int:
            vm.load(image, write_memory=False)
            return vm.run().reports[0]

        assert benchmark(again) == p.npages


def test_bench_io_exit_round_trip(benchmark: Any, real_kernel: RealKernel) -> None:
    """1000 IN exits plus 2000 OUT exits (echo): the cost of an exit to Python and back."""
    with GuestVM(real_kernel, 2 * MiB) as vm:
        image = echo_image(2 * MiB)

        def run() -> int:
            left = iter(range(1000, -1, -1))
            vm.load(image, write_memory=False)
            r = vm.run(on_io_in=lambda port, size, count: next(left).to_bytes(4, "little"))
            return len(r.exits)

        vm.load(image)
        assert benchmark(run) == 1000 * 3 + 2
