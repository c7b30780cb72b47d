"""The four mechanisms on `FakeKernel`: whole migrations of a small guest.

The fake's vCPUs, userfaultfd, guest_memfd and KVM Userfault are being
finished by other helpers; each test first tries what it needs on the fake and
skips with the reason until the fake can do it (never a failure for a missing
feature, never a silent pass).
"""

from __future__ import annotations

import functools

import pytest

from fakekvm.abi import kvm, mman
from fakekvm.guests import workloads as w
from postcopy.migrate import MigrateOptions, make_kernel, migrate, shares

MiB = 1 << 20
MEM = 4 * MiB
SEED = 11

CASES = [
    ("uffd-missing", "6.18-pvm"),
    ("uffd-minor", "6.18-pvm"),
    ("kvm-userfault", "6.18+kvm-userfault"),
    ("gmem-private", "6.18+fake-cc"),
]


@functools.cache
def _fake_can(mechanism: str, profile: str) -> str | None:
    """None when the fake can run ``mechanism`` on ``profile``, else why not.

    The probe builds a VM with a vCPU but does not run it."""
    try:
        from fakekvm.guests import GuestVM

        k = make_kernel("fake", profile)
    except Exception as e:
        return f"FakeKernel({profile!r}) cannot be built: {type(e).__name__}: {e}"
    try:
        with GuestVM(k, 1 * MiB):  # VM, memslot, vCPU and its kvm_run (not run: see below)
            pass
        fd = k.userfaultfd(mman.O_CLOEXEC | mman.O_NONBLOCK)
        k.close(fd)
        if mechanism == "gmem-private":
            from postcopy.mechanisms.gmem_private import KVM_X86_FAKE_CC_VM

            kfd = k.open("/dev/kvm", mman.O_RDWR)
            try:
                vm_fd = k.ioctl(kfd, kvm.KVM_CREATE_VM, KVM_X86_FAKE_CC_VM)
                k.close(vm_fd)
            finally:
                k.close(kfd)
    except Exception as e:
        return f"the fake cannot run {mechanism} yet: {type(e).__name__}: {e}"
    finally:
        k.shutdown()
    return None


@pytest.mark.parametrize(("mechanism", "profile"), CASES, ids=[c[0] for c in CASES])
def test_fake_migration_verify(mechanism: str, profile: str) -> None:
    reason = _fake_can(mechanism, profile)
    if reason is not None:
        pytest.skip(reason)
    o = MigrateOptions(
        kernel="fake",
        profile=profile,
        mechanism=mechanism,
        mem_size=MEM,
        vcpus=1,
        workload="verify",
        seed=SEED,
        same_process=True,
        pin=False,
    )
    r = migrate(o)
    (base, size) = shares(MEM, 1)[0]
    res = r.result.vcpus[0]
    assert (res.stop, res.done) == ("done", 0)
    assert res.report64(0) == w.expected_checksum(SEED, base, size)
    st = r.result.stats
    assert st.pages_demand + st.pages_background - st.pages_duplicate == MEM // 4096
