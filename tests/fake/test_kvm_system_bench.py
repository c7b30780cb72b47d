"""KVM_CHECK_EXTENSION through the seam, RealKernel vs FakeKernel (target: fake within 3x).

Run the timings with ``pytest tests/fake/test_kvm_system_bench.py --benchmark-enable``;
without it (the default addopts disable benchmarks) each test runs the call once
as a correctness check. No timing is asserted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from fakekvm.abi import kvm as K
from fakekvm.kernel.seam import Kernel


@pytest.fixture
def fds(any_kernel: Kernel) -> Iterator[tuple[Kernel, int, int]]:
    kvm = any_kernel.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = any_kernel.ioctl(kvm, K.KVM_CREATE_VM, 0)
    yield any_kernel, kvm, vm
    any_kernel.close(vm)
    any_kernel.close(kvm)


def test_check_extension_sys(benchmark: Any, fds: tuple[Kernel, int, int]) -> None:
    k, kvm, _vm = fds
    benchmark.group = "KVM_CHECK_EXTENSION /dev/kvm"
    r = benchmark(k.ioctl, kvm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_SYNC_MMU)
    assert r == 1


def test_check_extension_vm(benchmark: Any, fds: tuple[Kernel, int, int]) -> None:
    k, _kvm, vm = fds
    benchmark.group = "KVM_CHECK_EXTENSION vm"
    r = benchmark(k.ioctl, vm, K.KVM_CHECK_EXTENSION, K.KVM_CAP_NR_MEMSLOTS)
    assert r == 32764
