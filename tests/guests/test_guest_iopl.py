"""PVM drops RFLAGS.IOPL at every exit; the fake's 6.18-pvm profile does the same, mainline not.

Found by comparing a real-kernel migration recording with the fake's (``replay.streams``): the
source's ``KVM_GET_REGS`` after the guest ran read rflags 0x46 on this host, 0x3046 on the fake.
"""

from __future__ import annotations

import pytest

from fakekvm.fake import FakeKernel
from fakekvm.guests.layout import RFLAGS_IOPL3
from fakekvm.guests.vm import GuestVM
from fakekvm.guests.workloads import writer_image
from fakekvm.kernel.seam import Kernel

MiB = 1 << 20
MEM, BASE, SIZE = 4 * MiB, 2 * MiB, 64 * 1024


def _rflags_after_run(k: Kernel) -> tuple[int, int]:
    with GuestVM(k, MEM) as vm:
        img = writer_image(MEM, BASE, SIZE, 3)
        vm.load(img)
        before = vm.get_regs()["rflags"]
        r = vm.run()
    assert r.stop == "done"
    return before, r.regs["rflags"]


def test_iopl_is_gone_after_an_exit(any_kernel: Kernel) -> None:
    before, after = _rflags_after_run(any_kernel)
    assert before & RFLAGS_IOPL3 == RFLAGS_IOPL3  # the image enters CPL3 with IOPL 3
    assert after & RFLAGS_IOPL3 == 0


@pytest.mark.parametrize("profile", ["6.18"])
def test_mainline_keeps_iopl(profile: str) -> None:
    k = FakeKernel(profile=profile)
    try:
        _before, after = _rflags_after_run(k)
        assert after & RFLAGS_IOPL3 == RFLAGS_IOPL3
    finally:
        k.shutdown()
