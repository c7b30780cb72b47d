"""`DestVM` and `GuestVM` share one port protocol and one teardown (`fakekvm.guests.vmm`).

Each guest program runs once under `GuestVM` and once under `DestVM` (memory
mapped by the caller, vCPU state restored from raw ``kvm_regs``/``kvm_sregs``
blobs, as the post-copy destination does), on the fake and on the live kernel;
both must collect the same serial text, reports, exit code and stop reason, and
both must tear down with the same sequence of calls, leaving nothing open.
"""

from __future__ import annotations

from typing import Any

import pytest

from fakekvm.abi import kvm, mman
from fakekvm.guests import GuestVM, echo_image, hello_image, long_mode_image, toucher_image
from fakekvm.guests import workloads as w
from fakekvm.guests.image import GuestImage
from fakekvm.guests.vmm import PortResult, VmmBase
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import ForwardingKernel, IoctlArg, Kernel
from postcopy.guestrun import DestVM, VcpuResult

MiB = 1 << 20
MEM = 4 * MiB


class Tracking(ForwardingKernel):
    """Logs calls (kind, request) and which fds and mappings are open."""

    def __init__(self, inner: Kernel) -> None:
        super().__init__(inner)
        self.log: list[tuple[str, int]] = []
        self.fds: set[int] = set()
        self.maps: set[int] = set()

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        self.fds.add(fd)
        self.log.append(("open", 0))
        return fd

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        r = super().ioctl(fd, request, arg)
        if request in (kvm.KVM_CREATE_VM, kvm.KVM_CREATE_VCPU):
            self.fds.add(r)
        self.log.append(("ioctl", request))
        return r

    def close(self, fd: int) -> None:
        super().close(fd)
        self.fds.discard(fd)
        self.log.append(("close", 0))

    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        m = super().mmap(fd, length, prot, flags, offset, address)
        self.maps.add(m.address)
        self.log.append(("mmap", 0))
        return m

    def munmap(self, address: int, length: int) -> None:
        super().munmap(address, length)
        self.maps.discard(address)
        self.log.append(("munmap", 0))


def _blobs(k: Kernel, image: GuestImage) -> tuple[bytes, bytes]:
    """The image's vCPU state as the source would send it (``KVM_GET_REGS``/``SREGS``)."""
    with GuestVM(k, MEM) as vm:
        vm.load(image, write_memory=False)
        regs, sregs = bytearray(kvm.kvm_regs_fmt.size), bytearray(kvm.kvm_sregs.sizeof())
        k.ioctl(vm.vcpu_fds[0], kvm.KVM_GET_REGS, regs)
        k.ioctl(vm.vcpu_fds[0], kvm.KVM_GET_SREGS, sregs)
    return bytes(regs), bytes(sregs)


def _run_dest(k: Tracking, image: GuestImage) -> tuple[VcpuResult, list[tuple[str, int]]]:
    regs, sregs = _blobs(k, image)
    mem = k.mmap(-1, MEM, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    try:
        view = mem.view()
        for chunk in image.chunks:
            view[chunk.gpa : chunk.end] = chunk.data
        view.release()
        vm = DestVM(k, kvm.KVM_X86_DEFAULT_VM, 1)
        try:
            vm.set_region(0, 0, 0, MEM, mem.address)
            vm.restore(0, regs, sregs)
            res = vm.run(0)
        finally:
            start = len(k.log)
            vm.close()
            teardown = k.log[start:]
            vm.close()  # idempotent
            assert len(k.log) == start + len(teardown)
    finally:
        k.munmap(mem.address, mem.length)
    return res, teardown


def _run_guest(k: Tracking, image: GuestImage) -> tuple[Any, list[tuple[str, int]]]:
    vm = GuestVM(k, MEM)
    try:
        vm.load(image)
        res = vm.run(0, check=False)
    finally:
        start = len(k.log)
        vm.close()
        teardown = k.log[start:]
    return res, teardown


IMAGES = {
    # serial text, then HLT (real mode)
    "hello": lambda: hello_image(),
    # IN 0xe4 answered with zeros: the loop ends at once, done 0
    "echo": lambda: echo_image(MEM),
    # reports and done; two MMIO reads (no memslot there) answered with zeros
    "mmio": lambda: toucher_image(
        MEM, w.TouchParams(MEM, 2 * 4096, w.Pattern.SEQUENTIAL), mapped_size=MEM + 2 * 4096
    ),
    # ud2 with no IDT: triple fault, KVM_EXIT_SHUTDOWN, an error naming the exit
    "shutdown": lambda: long_mode_image("bad", b"\x0f\x0b", MEM),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_s4a_destvm_answers_exits_like_guestvm(name: str, any_kernel: Kernel) -> None:
    image = IMAGES[name]()
    k = Tracking(any_kernel)
    g, g_teardown = _run_guest(k, image)
    d, d_teardown = _run_dest(k, image)
    assert (d.serial, d.reports, d.done, d.stop, d.error) == (
        g.serial, g.reports, g.done, g.stop, g.error,
    )  # fmt: skip
    expected_stop = {"hello": "hlt", "shutdown": "error"}.get(name, "done")
    assert d.stop == expected_stop
    if name == "hello":
        assert bytes(d.serial) == w.HELLO_MESSAGE
    if name == "mmio":
        assert d.reports[0] == 2 and d.report64(1) == 0  # it read our zeros twice
    if name == "shutdown":
        assert d.error is not None and d.error.startswith("guest stopped: KVM_EXIT_SHUTDOWN")
    else:
        assert d.done in (None, 0) and d.error is None
    assert d.exits == len(g.exits)
    # one teardown, in the same order; GuestVM also unmaps the memory it mapped itself
    run_map, vcpu_fd, vm_fd, kvm_fd = ("munmap", 0), ("close", 0), ("close", 0), ("close", 0)
    assert d_teardown == [run_map, vcpu_fd, vm_fd, kvm_fd]
    assert g_teardown == [run_map, vcpu_fd, vm_fd, ("munmap", 0), kvm_fd]
    assert not k.fds and not k.maps, "every fd and mapping was released"


def test_s4a_results_share_port_result() -> None:
    r = VcpuResult(0, reports=[0x89ABCDEF, 0x01234567])
    assert isinstance(r, PortResult) and r.report64(0) == 0x0123456789ABCDEF
    assert issubclass(DestVM, VmmBase) and issubclass(GuestVM, VmmBase)
    assert DestVM.close is GuestVM.close is VmmBase.close  # one teardown


def test_s4a_destvm_failed_setup_releases_what_it_made(any_kernel: Kernel) -> None:
    k = Tracking(any_kernel)
    with pytest.raises(OSError):
        DestVM(k, 0x7FFF, 1)  # KVM_CREATE_VM refuses an unknown type
    assert not k.fds and not k.maps
