"""``/dev/kvm``: the system fd (``kvm_dev_ioctl`` in ``virt/kvm/kvm_main.c``).

Emulated: ``KVM_GET_API_VERSION`` and ``KVM_GET_VCPU_MMAP_SIZE`` (EINVAL when
``arg`` is non-zero), ``KVM_CHECK_EXTENSION`` (the profile's /dev/kvm column;
an unknown cap answers 0), ``KVM_CREATE_VM`` (VM types of the profile, EINVAL
otherwise).

Every other number answers EINVAL: measured on the live 6.18 host by trying
``_IO(KVMIO, nr)`` and ``_IOR/_IOW/_IOWR(KVMIO, nr, size)`` for nr 0..0xff and
every struct size the uAPI uses (18 676 of 18 687 numbers gave EINVAL; the
arch default of ``kvm_arch_dev_ioctl`` is -EINVAL, unlike a VM fd's ENOTTY).
The live kernel also implements ``KVM_GET_MSR_INDEX_LIST``,
``KVM_GET_SUPPORTED_CPUID``, ``KVM_GET_EMULATED_CPUID``,
``KVM_GET_MSR_FEATURE_INDEX_LIST``, ``KVM_GET_MSRS`` (feature MSRs),
``KVM_X86_GET_MCE_CAP_SUPPORTED``, ``KVM_GET_DEVICE_ATTR`` and
``KVM_HAS_DEVICE_ATTR`` on /dev/kvm; the fake does not emulate them (host-CPU
data) and answers EINVAL, listed in `NOT_EMULATED_ON_LIVE`.

Other file operations, as measured: read/write/ftruncate EINVAL, pread EINVAL
(a char device has FMODE_PREAD), lseek 0 (``noop_llseek``), mmap ENODEV,
poll POLLIN|POLLOUT (no poll op), fstat S_IFCHR|0600 rdev 10:232.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.fake.files import FakeFile
from fakekvm.fake.profiles import Profile, get_profile
from fakekvm.kernel.seam import IoctlArg

#: ioctl numbers the live /dev/kvm answers with something other than EINVAL that the
#: fake does not emulate (it answers EINVAL): request -> live answer on a zeroed buffer.
NOT_EMULATED_ON_LIVE: dict[int, str] = {
    K.KVM_GET_MSR_INDEX_LIST: "E2BIG",
    K.KVM_GET_SUPPORTED_CPUID: "E2BIG",
    K.KVM_GET_EMULATED_CPUID: "E2BIG",
    K.KVM_GET_MSR_FEATURE_INDEX_LIST: "E2BIG",
    K.KVM_GET_MSRS: "0",
    K.KVM_X86_GET_MCE_CAP_SUPPORTED: "0",
    K.KVM_GET_DEVICE_ATTR: "EFAULT",
    K.KVM_HAS_DEVICE_ATTR: "0",
}

MISC_MAJOR = 10
KVM_MINOR = 232
POLL_DEFAULT = mman.POLLIN | mman.POLLOUT | mman.POLLRDNORM | mman.POLLWRNORM

_ULONG = (1 << 64) - 1


def _ulong(arg: IoctlArg) -> int:
    """The ioctl's ``unsigned long arg``; a buffer's address is never 0, so non-zero."""
    return arg & _ULONG if isinstance(arg, int) else 1 << 47


class FakeKvmDevice(FakeFile):
    """An open file of /dev/kvm."""

    kind = "kvm"

    def __init__(self, kernel: Any, profile: Profile) -> None:
        super().__init__()
        self.kernel = kernel
        self.profile = profile
        self.caps: dict[int, int] = profile.sys_caps
        self.f_flags = os.O_RDWR

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        if request == K.KVM_CHECK_EXTENSION:
            return self.caps.get(arg, 0) if isinstance(arg, int) else 0
        if request == K.KVM_GET_API_VERSION:
            if _ulong(arg):
                raise OSError(errno.EINVAL, "KVM_GET_API_VERSION: arg must be 0")
            return self.profile.api_version
        if request == K.KVM_GET_VCPU_MMAP_SIZE:
            if _ulong(arg):
                raise OSError(errno.EINVAL, "KVM_GET_VCPU_MMAP_SIZE: arg must be 0")
            return self.profile.vcpu_mmap_size
        if request == K.KVM_CREATE_VM:
            return self.create_vm(_ulong(arg))
        raise OSError(errno.EINVAL, f"kvm: ioctl {request:#x} not handled by /dev/kvm")

    def create_vm(self, vm_type: int) -> int:
        if vm_type not in self.profile.vm_types:
            raise OSError(errno.EINVAL, f"KVM_CREATE_VM: type {vm_type} not supported")
        from fakekvm.fake.kvm.vm import FakeVm

        vm = FakeVm(self.kernel, vm_type, self.profile)
        vm.f_flags = os.O_RDWR
        try:
            # anon_inode_getfd("kvm-vm", ..., O_RDWR | O_CLOEXEC)
            return int(self.kernel.install_fd(vm, mman.O_CLOEXEC))
        except BaseException:
            vm.put()
            raise

    # -- other file operations (measured live) -------------------------------------------
    def pread(self, n: int, offset: int) -> bytes:
        raise OSError(errno.EINVAL, "kvm: pread not supported")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        raise OSError(errno.EINVAL, "kvm: pwrite not supported")

    def lseek(self, pos: int, how: int) -> int:
        return 0  # noop_llseek

    def poll(self) -> int:
        return POLL_DEFAULT

    def fstat(self) -> os.stat_result:
        return os.stat_result(
            (0o020600, 1, 5, 1, 0, 0, 0, 0, 0, 0),
            {"st_rdev": os.makedev(MISC_MAJOR, KVM_MINOR), "st_blksize": 4096},
        )


def register(kernel: Any) -> None:
    """Add "/dev/kvm" to ``kernel.devices``: a factory called on every open."""
    profile = get_profile(getattr(kernel, "profile", "6.18-pvm"))
    kernel.subsystems["kvm"] = profile

    def open_kvm(*_args: Any, **_kw: Any) -> FakeKvmDevice:
        return FakeKvmDevice(kernel, profile)

    kernel.devices["/dev/kvm"] = open_kvm
