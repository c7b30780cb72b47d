"""Memory attributes: the per-gfn store, KVM_SET_MEMORY_ATTRIBUTES validation and handler."""

from __future__ import annotations

import errno
import itertools
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakekvm.abi import kvm as K
from fakekvm.fake import FakeKernel
from fakekvm.fake.kvm import private as P
from fakekvm.fake.kvm.attributes import RangeAttributes
from fakekvm.fake.profiles import get_profile
from fakekvm.kernel.real import RealKernel
from fakekvm.testing import gmem_scenarios as S

PRIV = P.KVM_MEMORY_ATTRIBUTE_PRIVATE
UF = P.KVM_MEMORY_ATTRIBUTE_USERFAULT
PAGE = 4096


def test_private_store_starts_shared_and_sets_exact_values() -> None:
    a = P.MemoryAttributes()
    assert a.get(0) == 0 and not a.is_private(123)
    assert a.set(10, 20, PRIV) is True
    assert [a.get(g) for g in (9, 10, 19, 20)] == [0, PRIV, PRIV, 0]
    assert a.set(10, 20, PRIV) is False  # no-op: already exactly that
    assert a.set(15, 30, PRIV | UF) is True
    assert a.get(14) == PRIV and a.get(15) == PRIV | UF and a.get(29) == PRIV | UF
    assert a.set(12, 16, 0) is True  # set replaces, it does not OR
    assert [a.get(g) for g in (11, 12, 15, 16)] == [PRIV, 0, 0, PRIV | UF]
    assert a.runs(8, 32) == [(8, 10, 0), (10, 12, PRIV), (12, 16, 0), (16, 30, PRIV | UF), (30, 32, 0)]
    assert a.uniform(12, 16, 0) and not a.uniform(11, 16, 0)


def test_private_store_scales_to_a_64GiB_guest() -> None:
    a = P.MemoryAttributes()
    npages = (64 << 30) >> 12
    a.set(0, npages, PRIV)
    flips = 0
    for g in range(0, npages, 2 * 4097):  # flip many single pages back to shared
        a.set(g, g + 1, 0)
        flips += 1
    assert a.is_private(1) and not a.is_private(2 * 4097) and a.is_private(npages - 1)
    # one entry per run boundary, never one object (or bit) per page
    assert len(a) <= 2 * flips + 2
    sparse = P.MemoryAttributes()
    sparse.set(0, 1 << 40, PRIV)  # 2^40 gfns: two boundaries
    assert len(sparse) == 2 and sparse.is_private((1 << 40) - 1) and not sparse.is_private(1 << 40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300), st.sampled_from([0, PRIV, UF, PRIV | UF])),
                max_size=25))
def test_private_store_matches_a_reference(ops: list[tuple[int, int, int]]) -> None:
    a = RangeAttributes()
    ref = [0] * 320
    for s, e, v in ops:
        s, e = min(s, e), max(s, e)
        changed = a.set(s, e, v)
        assert changed == any(ref[g] != v for g in range(s, e))
        for g in range(s, e):
            ref[g] = v
        # runs are maximal: no two neighbours carry the same value
        runs = a.runs(0, 320)
        assert all(x[2] != y[2] for x, y in itertools.pairwise(runs))
        assert len(a) == len(a.runs(0, 1 << 50))
    assert [a.get(g) for g in range(320)] == ref
    assert [a.uniform(g, g + 5, ref[g]) for g in range(300)] == [
        len(set(ref[g : g + 5])) == 1 for g in range(300)
    ]


@pytest.mark.parametrize(
    "address,size,attributes,flags,supported,want",
    [
        (0, PAGE, PRIV, 0, PRIV, None),
        (0, PAGE, 0, 0, 0, None),  # attributes 0 are always supported
        (0, PAGE, PRIV, 1, PRIV, errno.EINVAL),  # flags must be 0
        (0, PAGE, PRIV, 0, 0, errno.EINVAL),  # not supported on this VM
        (0, PAGE, UF, 0, PRIV, errno.EINVAL),
        (0, PAGE, 1, 0, PRIV, errno.EINVAL),  # unknown attribute bit
        (0, 0, PRIV, 0, PRIV, errno.EINVAL),  # size 0
        ((1 << 64) - PAGE, PAGE, PRIV, 0, PRIV, errno.EINVAL),  # address + size wraps to 0
        ((1 << 64) - 2 * PAGE, PAGE, PRIV, 0, PRIV, None),  # the last page is fine
        (1, PAGE, PRIV, 0, PRIV, errno.EINVAL),  # unaligned address
        (0, PAGE + 1, PRIV, 0, PRIV, errno.EINVAL),  # unaligned size
        (1, 0, PRIV, 1, 0, errno.EINVAL),
    ],
)
def test_private_validate_attributes(address: int, size: int, attributes: int, flags: int, supported: int,
                                     want: int | None) -> None:
    if want is None:
        start, end = P.validate_attributes(address, size, attributes, flags, supported)
        assert (start, end) == (address >> 12, (address + size) >> 12)
    else:
        with pytest.raises(OSError) as ei:
            P.validate_attributes(address, size, attributes, flags, supported)
        assert ei.value.errno == want and "KVM_SET_MEMORY_ATTRIBUTES" in str(ei.value)


def _attr_buf(address: int, size: int, attributes: int, flags: int = 0) -> bytearray:
    return bytearray(struct.pack("<4Q", address, size, attributes, flags))


@pytest.fixture
def sw_vm() -> Iterator[tuple[FakeKernel, int]]:
    k = FakeKernel(profile="6.18")
    with S.vm(k, K.KVM_X86_SW_PROTECTED_VM) as v:
        yield k, v
    k.shutdown()


def test_private_handler_sets_and_invalidates(sw_vm: tuple[FakeKernel, int]) -> None:
    k, v = sw_vm
    vm = k.file(v)
    cpu = S.ModelVcpu(k, v)
    req = K.KVM_SET_MEMORY_ATTRIBUTES
    assert P.set_memory_attributes(vm, req, _attr_buf(0x10000, 4 * PAGE, PRIV)) == 0
    assert [vm.attributes.get(g) for g in (0xF, 0x10, 0x13, 0x14)] == [0, PRIV, PRIV, 0]  # type: ignore[attr-defined]
    assert cpu.invalidations == [(0x10000, 0x14000)]
    # the same attributes again: a no-op, nothing invalidated
    assert P.set_memory_attributes(vm, req, _attr_buf(0x10000, 4 * PAGE, PRIV)) == 0
    assert cpu.invalidations == [(0x10000, 0x14000)]
    assert P.set_memory_attributes(vm, req, _attr_buf(0x12000, PAGE, 0)) == 0
    assert cpu.invalidations[-1] == (0x12000, 0x13000)
    for buf, e in [(_attr_buf(0, PAGE, PRIV, flags=1), errno.EINVAL), (_attr_buf(0, PAGE, UF), errno.EINVAL),
                   (_attr_buf(0, 0, PRIV), errno.EINVAL), (_attr_buf(1, PAGE, PRIV), errno.EINVAL)]:
        with pytest.raises(OSError) as ei:
            P.set_memory_attributes(vm, req, buf)
        assert ei.value.errno == e
    assert vm.attributes.get(0) == 0  # type: ignore[attr-defined]


def test_private_attributes_unsupported_on_a_default_vm() -> None:
    """6.18 mainline: the ioctl exists, but a default VM supports no attribute (only 0)."""
    k = FakeKernel(profile="6.18")
    try:
        with S.vm(k, 0) as v:
            vm = k.file(v)
            assert P.supported_attributes(vm) == 0
            with pytest.raises(OSError) as ei:
                P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr_buf(0, PAGE, PRIV))
            assert ei.value.errno == errno.EINVAL
            assert P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr_buf(0, PAGE, 0)) == 0
    finally:
        k.shutdown()


@pytest.mark.parametrize("kind", [pytest.param("real", marks=pytest.mark.real_kernel), "fake"])
def test_private_set_memory_attributes_is_enotty_on_this_host(kind: str) -> None:
    """Live 6.18-pvm: KVM_SET_MEMORY_ATTRIBUTES is not built (ENOTTY), on both kernels."""
    k = RealKernel() if kind == "real" else FakeKernel(profile="6.18-pvm")
    try:
        with S.vm(k) as v:
            with pytest.raises(OSError) as ei:
                k.ioctl(v, K.KVM_SET_MEMORY_ATTRIBUTES, _attr_buf(0, PAGE, PRIV))
            assert ei.value.errno == errno.ENOTTY
            assert k.ioctl(v, K.KVM_CHECK_EXTENSION, K.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    finally:
        k.shutdown()


def test_private_profile_knobs() -> None:
    assert P.vm_type_info(get_profile("6.18-pvm"), 0) == P.VmTypeInfo(0, False, 0, False)
    assert P.vm_type_info(get_profile("6.18"), 0) == P.VmTypeInfo(0, False, 0, True)
    assert P.vm_type_info(get_profile("6.18"), 1) == P.VmTypeInfo(1, True, 0, True)
    cc = P.with_fake_cc(get_profile("6.18"))
    assert P.vm_type_info(cc, P.KVM_X86_FAKE_CC_VM) == P.VmTypeInfo(16, True, 1 << 47, True)
    assert os.cpu_count()  # (the profile resolves online CPUs)
