"""KVM_CREATE_VCPU on both kernels: id limits, duplicates, KVM_MAX_VCPUS, vCPU ids
after close, and the VM outliving its fd while a vCPU holds it."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from fakekvm.abi import kvm as K
from fakekvm.fake.files import FakeFile
from fakekvm.fake.kvm.client import create_vm, enable_cap, open_kvm, outcome
from fakekvm.kernel.seam import Kernel


def _stub_module() -> types.ModuleType:
    """A stand-in for B's fakekvm.fake.kvm.vcpu: FakeVcpu(vm, vcpu_id); the VM manages
    the reference the vCPU file holds on it."""

    class StubVcpu(FakeFile):
        def __init__(self, vm: Any, vcpu_id: int) -> None:
            super().__init__()
            self.vm, self.vcpu_id = vm, vcpu_id
            self.kind = f"kvm-vcpu:{vcpu_id}"
            self.released = False

        def release(self) -> None:
            self.released = True

    mod = types.ModuleType("fakekvm.fake.kvm.vcpu")
    mod.FakeVcpu = StubVcpu  # type: ignore[attr-defined]
    return mod


@pytest.fixture(autouse=True)
def _vcpu_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until B's FakeVcpu is in the tree, the fake runs these tests against the stub."""
    if importlib.util.find_spec("fakekvm.fake.kvm.vcpu") is None:
        monkeypatch.setitem(sys.modules, "fakekvm.fake.kvm.vcpu", _stub_module())


@pytest.fixture
def vm(any_kernel: Kernel) -> Iterator[tuple[Kernel, int]]:
    kvm = open_kvm(any_kernel)
    vmfd = create_vm(any_kernel, kvm)
    any_kernel.close(kvm)
    yield any_kernel, vmfd
    any_kernel.close(vmfd)


def cv(k: Kernel, vmfd: int, vid: int) -> object:
    return outcome(lambda: k.ioctl(vmfd, K.KVM_CREATE_VCPU, vid))


def test_vcpu_ids(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    v0 = cv(k, fd, 0)
    assert isinstance(v0, int) and v0 >= 0
    assert cv(k, fd, 0) == "EEXIST"
    v4095 = cv(k, fd, 4095)
    assert isinstance(v4095, int)
    assert cv(k, fd, 4096) == "EINVAL"  # KVM_MAX_VCPU_IDS
    assert cv(k, fd, -1) == "EINVAL"  # an unsigned long: huge
    assert cv(k, fd, 1 << 20) == "EINVAL"
    k.close(v0)
    assert cv(k, fd, 0) == "EEXIST"  # a vCPU lives as long as its VM, not its fd
    # identity map address can only be set before the first vCPU
    buf = bytearray((0xFFFBC000).to_bytes(8, "little"))
    assert outcome(lambda: k.ioctl(fd, K.KVM_SET_IDENTITY_MAP_ADDR, buf)) == "EINVAL"
    k.close(v4095)


def test_max_vcpu_id_cap(vm: tuple[Kernel, int]) -> None:
    k, fd = vm

    def ec(a0: int) -> object:
        return outcome(lambda: enable_cap(k, fd, K.KVM_CAP_MAX_VCPU_ID, a0))

    assert ec(0) == 0  # 0 leaves it unset
    assert ec(10) == 0
    assert isinstance(cv(k, fd, 9), int)
    assert cv(k, fd, 10) == "EINVAL"
    assert ec(4096) == "EINVAL"


def test_first_vcpu_fixes_max_vcpu_id(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    assert isinstance(cv(k, fd, 3), int)
    assert outcome(lambda: enable_cap(k, fd, K.KVM_CAP_MAX_VCPU_ID, 10)) == "EINVAL"
    assert enable_cap(k, fd, K.KVM_CAP_MAX_VCPU_ID, 4096) == 0
    assert outcome(lambda: enable_cap(k, fd, K.KVM_CAP_X86_DISABLE_EXITS, 2)) == "EINVAL"
    assert outcome(lambda: enable_cap(k, fd, K.KVM_CAP_VM_DISABLE_NX_HUGE_PAGES, 0)) == "EINVAL"


def test_max_vcpus(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    fds = [k.ioctl(fd, K.KVM_CREATE_VCPU, i) for i in range(1024)]
    try:
        assert len(set(fds)) == 1024
        assert cv(k, fd, 2000) == "EINVAL"  # KVM_MAX_VCPUS reached
        assert cv(k, fd, 5) == "EINVAL"  # the limit is checked before the duplicate id
    finally:
        for f in fds:
            k.close(f)
    assert cv(k, fd, 2001) == "EINVAL"  # closing fds frees no vCPU


def test_vcpu_keeps_vm_alive(any_kernel: Kernel) -> None:
    k = any_kernel
    kvm = open_kvm(k)
    vmfd = create_vm(k, kvm)
    vcpu = k.ioctl(vmfd, K.KVM_CREATE_VCPU, 0)
    vm_obj = k.file(vmfd) if k.name == "fake" else None  # type: ignore[attr-defined]
    k.close(vmfd)
    k.close(kvm)
    assert outcome(lambda: k.ioctl(vcpu, K.KVM_CREATE_VM, 0)) != "EBADF"  # still a live fd
    if vm_obj is not None:
        assert not vm_obj._released
    k.close(vcpu)
    if vm_obj is not None:
        assert vm_obj._released


def test_create_vcpu_contract_with_a_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM side of KVM_CREATE_VCPU against the stub FakeVcpu(vm, vcpu_id) (runs without B):
    limits, EEXIST, the VM reference the vCPU holds, the fd it gets."""
    from fakekvm.fake.kernel import FakeKernel

    monkeypatch.setitem(sys.modules, "fakekvm.fake.kvm.vcpu", _stub_module())
    k = FakeKernel(profile="6.18-pvm")
    try:
        kvm = open_kvm(k)
        vmfd = create_vm(k, kvm)
        vm = k.file(vmfd)
        v0 = k.ioctl(vmfd, K.KVM_CREATE_VCPU, 0)
        f0 = k.file(v0)
        assert f0.kind == "kvm-vcpu:0" and f0.vm is vm and vm.vcpus[0] is f0  # type: ignore[attr-defined]
        assert cv(k, vmfd, 0) == "EEXIST"
        assert cv(k, vmfd, 4096) == "EINVAL"
        fds = [k.ioctl(vmfd, K.KVM_CREATE_VCPU, i) for i in range(1, 1024)]
        assert cv(k, vmfd, 2000) == "EINVAL"
        k.close(vmfd)
        assert not vm._released
        for f in [*fds, v0]:
            k.close(f)
        assert f0.released
        assert vm._released
        assert vm.vcpus == {}
    finally:
        k.shutdown()
