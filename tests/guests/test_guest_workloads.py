"""The Python mirrors of the guest programs, and exit decoding (pure)."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakekvm.abi import kvm
from fakekvm.guests import ports
from fakekvm.guests import workloads as w
from fakekvm.guests.exits import Exit, decode_exit, exit_name
from fakekvm.guests.workloads import Pattern, TouchParams

BASE = 0x200000


@pytest.mark.parametrize("pattern", [Pattern.SEQUENTIAL, Pattern.STRIDED, Pattern.RANDOM])
@pytest.mark.parametrize("npages", [1, 2, 3, 5, 16, 17, 1000])
@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF12345678])
def test_covering_patterns_touch_every_page_once(pattern: Pattern, npages: int, seed: int) -> None:
    p = TouchParams(BASE, npages * 4096, pattern, seed=seed, stride=3)
    order = list(w.touch_order(p))
    assert sorted(order) == list(range(npages))


def test_strided_order() -> None:
    p = TouchParams(BASE, 7 * 4096, Pattern.STRIDED, stride=3)
    assert list(w.touch_order(p)) == [0, 3, 6, 1, 4, 2, 5]
    p = TouchParams(BASE, 3 * 4096, Pattern.STRIDED, stride=100)
    assert list(w.touch_order(p)) == [0, 1, 2], "stride capped at npages"


def test_random_order_depends_on_the_seed_and_is_not_sequential() -> None:
    a = list(w.touch_order(TouchParams(BASE, 4096 * 4096, Pattern.RANDOM, seed=1)))
    b = list(w.touch_order(TouchParams(BASE, 4096 * 4096, Pattern.RANDOM, seed=2)))
    assert a != b
    assert a != sorted(a)
    ascending = sum(1 for x, y in itertools.pairwise(a) if y == x + 1)
    assert ascending < len(a) // 10


def test_hotset_mix() -> None:
    p = TouchParams(BASE, 4096 * 4096, Pattern.HOTSET, seed=9, touches=20000, hot_pages=64)
    order = list(w.touch_order(p))
    assert len(order) == 20000
    hot = sum(1 for i in order if i < 64)
    assert 0.85 * len(order) < hot < 0.97 * len(order)
    assert max(order) > 64 and max(order) < 4096
    assert order == list(w.touch_order(p)), "deterministic"
    default = TouchParams(BASE, 160 * 4096, Pattern.HOTSET, seed=9)
    d = list(w.touch_order(default))
    assert len(d) == 160, "touches defaults to npages"


def test_touch_report_mirrors() -> None:
    p = TouchParams(BASE, 8 * 4096, Pattern.SEQUENTIAL, write=True, seed=3)
    count, total = w.expected_touch_report(p)
    assert count == 8
    assert total == sum((3 << 32) | i for i in range(8))
    data = bytearray(8 * 4096)
    for i in range(8):
        struct.pack_into("<Q", data, i * 4096, 1000 + i)
    r = TouchParams(BASE, 8 * 4096, Pattern.STRIDED, stride=2)
    assert w.expected_touch_report(r, data) == (8, sum(1000 + i for i in range(8)))
    with pytest.raises(ValueError):
        w.expected_touch_report(r)
    seen = w.touched_pages(
        TouchParams(BASE, 64 * 4096, Pattern.HOTSET, hot_pages=2, hot_percent=100)
    )
    assert seen[:2] != b"\0\0" and not any(seen[2:])


def test_pattern_page_is_the_documented_formula() -> None:
    seed = 0x1234
    for page in (0x200000, 0x201000, 0x7FFFF000):
        data = w.pattern_page(seed, page)
        words = struct.unpack("<512Q", data)
        key = w.mix64(seed ^ page)
        for j in (0, 1, 255, 511):
            assert words[j] == key ^ (j * w.GOLDEN & w.M64)
    assert w.pattern_page(seed, 0x200000) != w.pattern_page(seed + 1, 0x200000)
    assert w.pattern_bytes(seed, 0x200000, 2 * 4096) == w.pattern_page(
        seed, 0x200000
    ) + w.pattern_page(seed, 0x201000)


def test_mix64_known_value() -> None:
    # splitmix64's finaliser applied to the first state of the reference
    # generator seeded with 0 (state 0x9e3779b97f4a7c15) gives 0xe220a8397b1dcdaf
    assert w.mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=70000))
def test_checksum_is_the_value_mod_p(data: bytes) -> None:
    assert w.checksum(data) == int.from_bytes(data, "little") % w.CHECKSUM_PRIME


def test_checksum_sees_word_order() -> None:
    a = os.urandom(4096 * 3)
    swapped = a[4096:8192] + a[:4096] + a[8192:]
    assert w.checksum(a) != w.checksum(swapped)
    assert w.expected_checksum(5, BASE, 8192) == w.checksum(w.pattern_bytes(5, BASE, 8192))


def test_first_difference() -> None:
    a = bytes(4 * 4096)
    b = bytearray(a)
    assert w.first_difference(a, b) is None
    b[2 * 4096 + 7] = 1
    assert w.first_difference(a, b) == 2
    assert w.first_difference(a, a[:4096]) == 1


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TouchParams(BASE + 1, 4096)
    with pytest.raises(ValueError):
        w.writer_image(4 << 20, BASE, 100, 1)
    with pytest.raises(ValueError):
        w.verifier_image(4 << 20, BASE, 12)


def test_port_join64() -> None:
    assert ports.join64(0x89ABCDEF, 0x01234567) == 0x0123456789ABCDEF


# -- exit decoding -------------------------------------------------------------------


def _run_page(reason: int) -> bytearray:
    run = bytearray(12288)
    struct.pack_into("<I", run, kvm.KVM_RUN_EXIT_REASON_OFFSET, reason)
    return run


def test_decode_io_out_takes_the_data_bytes() -> None:
    run = _run_page(kvm.KVM_EXIT_IO)
    kvm.kvm_run_io_fmt.pack_into(run, 32, kvm.KVM_EXIT_IO_OUT, 4, 0xE0, 2, 4096)
    run[4096:4104] = b"\x01\0\0\0\x02\0\0\0"
    ex = decode_exit(memoryview(run))
    assert ex == Exit(
        kvm.KVM_EXIT_IO,
        (("direction", 1), ("size", 4), ("port", 0xE0), ("count", 2), ("data_offset", 4096)),
        b"\x01\0\0\0\x02\0\0\0",
    )
    assert ex.name == "KVM_EXIT_IO" and ex.field("port") == 0xE0
    assert "port=0xe0" in str(ex)
    with pytest.raises(KeyError):
        ex.field("nope")


def test_decode_io_in_has_no_data_yet() -> None:
    run = _run_page(kvm.KVM_EXIT_IO)
    kvm.kvm_run_io_fmt.pack_into(run, 32, kvm.KVM_EXIT_IO_IN, 1, 0x60, 1, 4096)
    run[4096] = 0x55
    assert decode_exit(memoryview(run)).data == b""


def test_decode_mmio() -> None:
    run = _run_page(kvm.KVM_EXIT_MMIO)
    kvm.kvm_run_mmio_fmt.pack_into(run, 32, 0xFEE00000, b"\x11\x22\x33\x44\x55\x66\x77\x88", 4, 1)
    ex = decode_exit(memoryview(run))
    assert ex.fields == (("phys_addr", 0xFEE00000), ("len", 4), ("is_write", 1))
    assert ex.data == b"\x11\x22\x33\x44"
    kvm.kvm_run_mmio_fmt.pack_into(run, 32, 0x1000, b"\xff" * 8, 8, 0)
    assert decode_exit(memoryview(run)).data == b"", "a read's stale data is not part of the exit"


def test_decode_error_exits() -> None:
    run = _run_page(kvm.KVM_EXIT_INTERNAL_ERROR)
    struct.pack_into("<II2Q", run, 32, 1, 2, 0xAA, 0xBB)
    ex = decode_exit(memoryview(run))
    assert ex.fields == (("suberror", 1), ("ndata", 2)) and ex.data == struct.pack(
        "<2Q", 0xAA, 0xBB
    )
    run = _run_page(kvm.KVM_EXIT_FAIL_ENTRY)
    kvm.kvm_run_fail_entry_fmt.pack_into(run, 32, 0x80000021, 3)
    assert decode_exit(memoryview(run)).fields == (
        ("hardware_entry_failure_reason", 0x80000021),
        ("cpu", 3),
    )
    assert decode_exit(memoryview(_run_page(kvm.KVM_EXIT_SHUTDOWN))) == Exit(kvm.KVM_EXIT_SHUTDOWN)
    run = _run_page(kvm.KVM_EXIT_MEMORY_FAULT)
    kvm.kvm_run_memory_fault_fmt.pack_into(run, 32, 0, 0x5000, 4096)
    assert decode_exit(memoryview(run)).field("gpa") == 0x5000
    raw = decode_exit(memoryview(_run_page(kvm.KVM_EXIT_DEBUG)))
    assert len(raw.data) == 256, "unknown arms keep the raw union"


def test_exit_names() -> None:
    assert exit_name(kvm.KVM_EXIT_HLT) == "KVM_EXIT_HLT"
    assert exit_name(kvm.KVM_EXIT_INTERNAL_ERROR) == "KVM_EXIT_INTERNAL_ERROR"
    assert exit_name(999) == "KVM_EXIT_999"
