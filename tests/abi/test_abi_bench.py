"""Hot-path codecs (pytest-benchmark; run with ``--benchmark-enable`` to time them).

Each benchmark also asserts the result, so with benchmarks disabled (the
default in pyproject) it is a plain correctness test.
"""

from __future__ import annotations

from typing import Any

from fakekvm.abi import kvm, names, uffd


def test_bench_uffd_msg_pagefault_unpack(benchmark: Any) -> None:
    msg = uffd.uffd_msg_pagefault_fmt.pack(uffd.UFFD_EVENT_PAGEFAULT, 1, 0x7F0000001000, 42)
    assert benchmark(uffd.uffd_msg_pagefault_fmt.unpack, msg) == (0x12, 1, 0x7F0000001000, 42)


def test_bench_uffdio_copy_pack_into(benchmark: Any) -> None:
    buf = bytearray(uffd.uffdio_copy_fmt.size)
    benchmark(uffd.uffdio_copy_fmt.pack_into, buf, 0, 0x1000, 0x2000, 4096, 0, 0)
    assert uffd.uffdio_copy.parse(bytes(buf)).len == 4096


def test_bench_kvm_run_io_unpack(benchmark: Any) -> None:
    run = bytearray(kvm.KVM_RUN_SIZE)
    kvm.kvm_run_io_fmt.pack_into(run, kvm.KVM_RUN_EXIT_OFFSET, 1, 1, 0x3F8, 1, 4096)
    assert benchmark(kvm.kvm_run_io_fmt.unpack_from, run, kvm.KVM_RUN_EXIT_OFFSET) == (1, 1, 0x3F8, 1, 4096)


def test_bench_ioctl_name(benchmark: Any) -> None:
    assert benchmark(names.ioctl_name, kvm.KVM_RUN) == "KVM_RUN"


def test_bench_decode_flags(benchmark: Any) -> None:
    assert benchmark(names.decode_flags, "memslot_flag", 3) == "KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY"
