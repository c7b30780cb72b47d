"""fakekvm.abi.names: both-way lookups in every namespace, flag decoding, unknown ioctls."""

from __future__ import annotations

import errno

import pytest

from fakekvm.abi import kvm, kvm_userfault, names, uffd
from fakekvm.abi.ioctl import _IO, _IOR, _IOW, _IOWR


@pytest.mark.parametrize("ns", names.NAMESPACES)
def test_round_trip_every_namespace(ns: str) -> None:
    t = names.table(ns)
    assert t, ns
    for n, v in t.items():
        assert names.value(ns, n) == v
        back = names.name(ns, v)
        assert names.value(ns, back) == v
    # values are unique within a namespace, except errno's aliases (EWOULDBLOCK == EAGAIN)
    if ns != "errno":
        assert len(set(t.values())) == len(t), ns
        for n, v in t.items():
            assert names.name(ns, v) == n


@pytest.mark.parametrize("ns", sorted(names.FLAG_NAMESPACES))
def test_flag_namespaces_are_single_bits(ns: str) -> None:
    for n, v in names.table(ns).items():
        assert v and v & (v - 1) == 0, (ns, n, v)
        assert names.decode_flags(ns, v) == n


def test_examples() -> None:
    assert names.name("exit", 6) == "KVM_EXIT_MMIO"
    assert names.value("exit", "KVM_EXIT_MEMORY_FAULT") == 39
    assert names.name("cap", 244) == "KVM_CAP_GUEST_MEMFD_FLAGS"
    assert names.value("cap", "KVM_CAP_USER_MEMORY2") == 231
    assert names.name("uffd_event", 0x12) == "UFFD_EVENT_PAGEFAULT"
    assert names.name("errno", errno.EFAULT) == "EFAULT"
    assert names.value("errno", "EWOULDBLOCK") == errno.EAGAIN
    assert names.name("errno", errno.EAGAIN) == "EAGAIN"
    assert names.name("ioctl", kvm.KVM_RUN) == "KVM_RUN"
    assert names.name("ioctl", uffd.UFFDIO_COPY) == "UFFDIO_COPY"
    assert names.name("vm_type", 0) == "KVM_X86_DEFAULT_VM"
    assert names.name("internal_error", 1) == "KVM_INTERNAL_ERROR_EMULATION"
    assert names.name("system_event", 2) == "KVM_SYSTEM_EVENT_RESET"


def test_ioctl_namespace_is_complete() -> None:
    t = names.table("ioctl")
    for n, v in {**kvm.KVM_IOCTLS, **uffd.UFFD_IOCTLS}.items():
        assert t[n] == v
    assert len(t) == len(kvm.KVM_IOCTLS) + len(uffd.UFFD_IOCTLS) + 1


def test_read_userfault_does_not_shadow_pre_fault_memory() -> None:
    assert names.ioctl_name(kvm.KVM_PRE_FAULT_MEMORY) == "KVM_PRE_FAULT_MEMORY"
    assert names.ioctl_name(kvm_userfault.KVM_READ_USERFAULT) == "KVM_READ_USERFAULT"
    # the pairs that share a (type, nr) in the real header also stay apart
    assert names.ioctl_name(kvm.KVM_IRQ_LINE_STATUS) == "KVM_IRQ_LINE_STATUS"
    assert names.ioctl_name(kvm.KVM_REGISTER_COALESCED_MMIO) == "KVM_REGISTER_COALESCED_MMIO"
    assert names.ioctl_name(kvm.KVM_SET_VCPU_EVENTS) == "KVM_SET_VCPU_EVENTS"
    assert names.ioctl_name(kvm.KVM_SET_PIT2) == "KVM_SET_PIT2"


def test_unknown_ioctl_decodes() -> None:
    assert names.ioctl_name(_IOWR(0xAE, 0xFF, 16)) == "_IOC(_IOC_READ|_IOC_WRITE, 0xae, 0xff, 0x10)"
    assert names.ioctl_name(_IO(0xAE, 0xFE)) == "_IOC(_IOC_NONE, 0xae, 0xfe, 0x0)"
    assert names.ioctl_name(_IOR(0xAA, 0x09, 32)) == "_IOC(_IOC_READ, 0xaa, 0x09, 0x20)"
    assert names.ioctl_name(_IOW(0xAE, 0x46, 33)) == "_IOC(_IOC_WRITE, 0xae, 0x46, 0x21)"
    assert names.describe("ioctl", _IO(0xAE, 0xFE)) == "_IOC(_IOC_NONE, 0xae, 0xfe, 0x0)"
    with pytest.raises(KeyError):
        names.name("ioctl", _IO(0xAE, 0xFE))


def test_decode_flags() -> None:
    assert (
        names.decode_flags("memslot_flag", kvm.KVM_MEM_LOG_DIRTY_PAGES | kvm.KVM_MEM_READONLY)
        == "KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY"
    )
    assert names.decode_flags("memslot_flag", 0) == "0"
    assert names.decode_flags("memslot_flag", 1 << 15 | 1) == "KVM_MEM_LOG_DIRTY_PAGES|0x8000"
    assert names.decode_flags("memslot_flag", 1 << 3) == "KVM_MEM_USERFAULT"
    assert names.value("memslot_flag", "KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY") == 3
    assert names.value("memslot_flag", "KVM_MEM_READONLY|0x8000") == 0x8002
    feats = names.flag_names("uffd_feature", 0x1FFFF)
    assert len(feats) == 17 and feats[0] == "UFFD_FEATURE_PAGEFAULT_FLAG_WP" and feats[-1] == "UFFD_FEATURE_MOVE"
    assert names.flag_names("uffd_feature", 1 << 20 | 1 << 16) == ["UFFD_FEATURE_MOVE", "0x100000"]
    assert names.decode_flags("uffd_ioctls", 0x13C) == (
        "UFFDIO_WAKE|UFFDIO_COPY|UFFDIO_ZEROPAGE|UFFDIO_MOVE|UFFDIO_POISON"
    )
    assert names.decode_flags("uffd_ioctls", uffd.UFFD_API_IOCTLS) == (
        "UFFDIO_REGISTER|UFFDIO_UNREGISTER|UFFDIO_API"
    )
    assert names.decode_flags("memory_exit_flag", 8 | 16) == (
        "KVM_MEMORY_EXIT_FLAG_PRIVATE|KVM_MEMORY_EXIT_FLAG_USERFAULT"
    )
    assert names.describe("uffd_pagefault_flag", 3) == "UFFD_PAGEFAULT_FLAG_WRITE|UFFD_PAGEFAULT_FLAG_WP"


def test_unknown_values() -> None:
    with pytest.raises(KeyError):
        names.name("exit", 999)
    with pytest.raises(KeyError):
        names.value("cap", "KVM_CAP_NOPE")
    with pytest.raises(KeyError):
        names.name("no_such_namespace", 1)
    assert names.describe("exit", 999) == "<exit 999>"
    assert names.describe("exit", 2) == "KVM_EXIT_IO"
