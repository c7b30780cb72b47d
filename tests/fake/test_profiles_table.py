"""Kernel profiles: the data, the per-VM-type columns, and profile="auto" on this host."""

from __future__ import annotations

import os

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi.kvm_userfault import KVM_MEM_USERFAULT, USERFAULT_CAP_BY_REVISION
from fakekvm.fake.kernel import FakeKernel
from fakekvm.fake.kvm.client import (
    check_extension,
    create_vm,
    open_kvm,
    outcome,
    set_memory_attributes,
    set_region,
    set_region2,
)
from fakekvm.fake.profiles import PROFILES, auto_profile, get_profile, probe_host
from fakekvm.kernel.real import RealKernel

H = 0x7F0000000000


def test_known_profiles() -> None:
    assert set(PROFILES) == {"6.1", "6.8", "6.18", "6.18-pvm", "6.18+kvm-userfault",
                             "6.10-rfc-userfault"}  # fmt: skip
    with pytest.raises(ValueError):
        get_profile("5.4")
    for p in PROFILES.values():
        assert p.api_version == 12 and p.vcpu_mmap_size == 12288
        assert p.sys_caps[K.KVM_CAP_NR_VCPUS] == min(os.cpu_count() or 1, 1024)
        assert p.sys_caps[K.KVM_CAP_MAX_VCPUS] == p.max_vcpus == 1024
        assert p.sys_caps[K.KVM_CAP_MAX_VCPU_ID] == p.max_vcpu_id == 4096
        assert p.sys_caps[K.KVM_CAP_NR_MEMSLOTS] == p.nr_memslots == 32764
        assert all(v for v in p.sys_caps.values())  # tables hold non-zero answers only


def test_uffd_features_by_version() -> None:
    assert get_profile("6.1").uffd_features == 0x1FFF  # up to WP_HUGETLBFS_SHMEM (6.0)
    for name in ("6.8", "6.18", "6.18-pvm"):
        assert get_profile(name).uffd_features == 0x1FFFF  # MOVE arrived in 6.8


def test_pvm_matches_the_measured_host() -> None:
    p = get_profile("6.18-pvm")
    assert p.vm_types == {0}
    assert p.sys_caps[K.KVM_CAP_VM_TYPES] == 1
    assert p.sys_caps[K.KVM_CAP_X2APIC_API] == 15 and p.vm_caps(0)[K.KVM_CAP_X2APIC_API] == 11
    assert K.KVM_CAP_MEMORY_ATTRIBUTES not in p.sys_caps
    assert K.KVM_CAP_PRE_FAULT_MEMORY not in p.sys_caps
    assert p.gmem_flags(0) == K.GUEST_MEMFD_FLAG_MMAP | K.GUEST_MEMFD_FLAG_INIT_SHARED
    assert (p.bad_hva_exit, p.pre_fault_memory) == ("mmio", "eopnotsupp")
    assert p.internal_error_on_int3_without_idt and p.nr_address_spaces(0) == 1


def test_mainline_618_private_memory_columns() -> None:
    p = get_profile("6.18")
    assert p.vm_types == {0, 1} and p.sys_caps[K.KVM_CAP_VM_TYPES] == 0x3
    assert p.sys_caps[K.KVM_CAP_MEMORY_ATTRIBUTES] == K.KVM_MEMORY_ATTRIBUTE_PRIVATE
    assert p.memory_attributes(0) == 0
    assert p.memory_attributes(1) == K.KVM_MEMORY_ATTRIBUTE_PRIVATE
    assert p.gmem_flags(0) == 3 and p.gmem_flags(1) == K.GUEST_MEMFD_FLAG_MMAP
    assert p.sys_caps[K.KVM_CAP_PRE_FAULT_MEMORY] == 1 and p.bad_hva_exit == "memory_fault"
    assert p.nr_address_spaces(0) == 2 and p.nr_address_spaces(1) == 1


def test_older_kernels_lack_newer_caps() -> None:
    p61, p68 = get_profile("6.1"), get_profile("6.8")
    assert max(p61.sys_caps) <= K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    assert K.KVM_CAP_USER_MEMORY2 not in p61.sys_caps and not p61.has_region2
    assert not p61.has_guest_memfd and not p61.has_memory_attributes_ioctl
    assert p68.sys_caps[K.KVM_CAP_GUEST_MEMFD] == 1 and max(p68.sys_caps) == K.KVM_CAP_GUEST_MEMFD
    assert p68.memslot_valid_flags(0) & K.KVM_MEM_GUEST_MEMFD == 0  # private-memory VMs only
    assert K.KVM_CAP_GUEST_MEMFD not in p68.vm_caps(0) and p68.vm_caps(1)[K.KVM_CAP_GUEST_MEMFD]
    assert p68.gmem_flags(1) == 0  # no flags existed in 6.8
    assert p68.memslot_valid_flags(1) & K.KVM_MEM_GUEST_MEMFD


def test_userfault_profiles() -> None:
    v3, rfc = get_profile("6.18+kvm-userfault"), get_profile("6.10-rfc-userfault")
    assert v3.userfault_cap == USERFAULT_CAP_BY_REVISION["v3"] == 243
    assert v3.sys_caps[243] == 1 and v3.memslot_valid_flags(0) & KVM_MEM_USERFAULT
    assert rfc.userfault_cap == USERFAULT_CAP_BY_REVISION["rfc"] == 236
    assert rfc.sys_caps[236] == 1 and not rfc.memslot_valid_flags(0) & KVM_MEM_USERFAULT
    for name in ("6.1", "6.8", "6.18", "6.18-pvm"):
        assert not get_profile(name).memslot_valid_flags(0) & KVM_MEM_USERFAULT


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_fake_answers_its_profile(name: str) -> None:
    p = get_profile(name)
    k = FakeKernel(profile=name)
    try:
        kvm = open_kvm(k)
        assert {c: check_extension(k, kvm, c) for c in range(301)} == {
            c: p.sys_caps.get(c, 0) for c in range(301)
        }
        for t in range(8):
            r = outcome(lambda t=t: create_vm(k, kvm, t))  # type: ignore[misc]
            if t not in p.vm_types:
                assert r == "EINVAL"
                continue
            assert isinstance(r, int)
            got = {c: check_extension(k, r, c) for c in range(301)}
            assert got == {c: p.vm_caps(t).get(c, 0) for c in range(301)}
            uf = outcome(lambda r=r: set_region2(k, r, 0, KVM_MEM_USERFAULT, 0, 4096, H))  # type: ignore[misc]
            if not p.has_region2:
                assert uf == "ENOTTY"
            else:
                assert uf == (0 if p.userfault_variant == "v3" else "EINVAL")
            r2 = outcome(lambda r=r: set_region2(k, r, 1, 0, 1 << 30, 4096, H))  # type: ignore[misc]
            assert r2 == (0 if p.has_region2 else "ENOTTY")
    finally:
        k.shutdown()


def test_memory_attributes_on_sw_protected_vm() -> None:
    k = FakeKernel(profile="6.18")
    try:
        kvm = open_kvm(k)
        vm0, vm1 = create_vm(k, kvm, 0), create_vm(k, kvm, 1)
        PRIV = K.KVM_MEMORY_ATTRIBUTE_PRIVATE

        def sma(vm: int, a: int, s: int, attr: int, flags: int = 0) -> object:
            return outcome(lambda: set_memory_attributes(k, vm, a, s, attr, flags))

        assert sma(vm0, 0, 4096, PRIV) == "EINVAL"  # default VM: no private memory
        assert sma(vm0, 0, 4096, 0) == 0
        assert sma(vm1, 0, 4096, PRIV, flags=1) == "EINVAL"
        assert sma(vm1, 0, 0, PRIV) == "EINVAL"
        assert sma(vm1, 1, 4096, PRIV) == "EINVAL"
        assert sma(vm1, 0, 4095, PRIV) == "EINVAL"
        assert sma(vm1, (1 << 64) - 4096, 8192, PRIV) == "EINVAL"
        assert sma(vm1, 0, 4096, 1 << 4) == "EINVAL"  # USERFAULT: RFC only
        vm = k.file(vm1)
        assert sma(vm1, 0x10000, 0x4000, PRIV) == 0
        assert [vm.memory_attributes(g) for g in range(0xF, 0x15)] == [0, 8, 8, 8, 8, 0]  # type: ignore[attr-defined]
        assert sma(vm1, 0x11000, 0x1000, 0) == 0
        assert [vm.memory_attributes(g) for g in range(0x10, 0x14)] == [8, 0, 8, 8]  # type: ignore[attr-defined]
        # a 2^40-gfn range costs a couple of entries, not one per page
        assert sma(vm1, 0, 1 << 52, PRIV) == 0
        assert len(vm.attributes) <= 2  # type: ignore[attr-defined]
        # memslot address spaces differ by type: 2 on the default VM (SMM), 1 on SW_PROTECTED
        assert set_region(k, vm0, 1 << 16, 0, 0, 4096, H) == 0
        assert outcome(lambda: set_region(k, vm1, 1 << 16, 0, 0, 4096, H)) == "EINVAL"
    finally:
        k.shutdown()


@pytest.mark.real_kernel
def test_auto_profile_equals_pvm_on_this_host() -> None:
    auto, pvm = auto_profile(), get_profile("6.18-pvm")
    assert auto.name == "auto(6.18-pvm)"
    assert {c: auto.sys_caps.get(c, 0) for c in range(301)} == {
        c: pvm.sys_caps.get(c, 0) for c in range(301)
    }
    assert auto.vm_caps(0) == pvm.vm_caps(0)
    assert auto.vm_types == pvm.vm_types and auto.uffd_features == pvm.uffd_features == 0x1FFFF
    assert auto.api_version == 12 and auto.vcpu_mmap_size == 12288
    probe = probe_host(RealKernel())
    assert probe.sys_caps == {c: v for c, v in pvm.sys_caps.items()}
    k = FakeKernel(profile="auto")
    try:
        kvm = open_kvm(k)
        assert check_extension(k, kvm, K.KVM_CAP_X2APIC_API) == 15
    finally:
        k.shutdown()
