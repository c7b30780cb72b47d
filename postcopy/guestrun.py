"""`DestVM`: the destination's VMM -- a VM built by a fault mechanism, restored vCPUs, run loops.

Like :class:`fakekvm.guests.vm.GuestVM` (same fds, port protocol and teardown:
:mod:`fakekvm.guests.vmm`, :mod:`fakekvm.guests.ports`), but the mechanism chooses the VM type
(``KVM_CREATE_VM`` argument: the fake confidential type for ``gmem-private``)
and installs the memslots itself (``KVM_SET_USER_MEMORY_REGION2`` with
``KVM_MEM_USERFAULT`` or ``KVM_MEM_GUEST_MEMFD``), vCPU state arrives as raw
``kvm_regs``/``kvm_sregs`` blobs from the source (``KVM_SET_SREGS`` then
``KVM_SET_REGS``, the order QEMU's ``kvm_arch_put_registers`` uses for them),
and the run loop hands ``KVM_RUN`` = -1/``EFAULT`` with
``KVM_EXIT_MEMORY_FAULT`` to the mechanism (``Documentation/virt/kvm/api.rst``
§5 ``KVM_EXIT_MEMORY_FAULT``: "userspace ... can resolve the fault and re-enter").

Stopping a vCPU from another thread: ``kvm_run.immediate_exit`` = 1 plus
a signal to the thread (:meth:`DestVM.interrupt`), so ``KVM_RUN`` returns
``EINTR`` (api.rst §5: immediate_exit).
"""

from __future__ import annotations

import errno
import signal
import threading
from dataclasses import dataclass

from fakekvm.abi import kvm, mman
from fakekvm.guests.exits import decode_exit, read_exit_reason
from fakekvm.guests.vmm import PortResult, VmmBase, answer_exit
from fakekvm.kernel.seam import Kernel

_KICK_SIGNAL = signal.SIGUSR1


def _noop(signum: int, frame: object) -> None:
    return None


def install_kick_handler() -> bool:
    """Install a no-op handler for the signal that kicks a vCPU out of KVM_RUN (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(_KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(_KICK_SIGNAL, _noop)
    return True


@dataclass
class VcpuResult(PortResult):
    """What one :meth:`DestVM.run` saw (``stop`` may also be "stopped", "max_exits")."""

    exits: int = 0
    memory_faults: int = 0


class GuestFailed(RuntimeError):
    """A vCPU stopped on an error exit."""


class DestVM(VmmBase):
    """A VM of ``vm_type`` with ``nr_vcpus`` vCPUs; memslots come from the caller."""

    def __init__(self, kernel: Kernel, vm_type: int, nr_vcpus: int, kvm_path: str = "/dev/kvm"):
        super().__init__(kernel)
        self.tids: list[int] = [0] * nr_vcpus
        self.stopping = False
        try:
            self._create_vm(kvm_path, vm_type)
            self._create_vcpus(nr_vcpus)
        except BaseException:
            self.close()
            raise

    # -- memory --------------------------------------------------------------------------
    def set_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        buf = bytearray(kvm.kvm_userspace_memory_region_fmt.pack(slot, flags, gpa, size, hva))
        self.kernel.ioctl(self.vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, buf)

    def set_region2(self, packed: bytes) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` with a packed 160-byte struct."""
        self.kernel.ioctl(self.vm_fd, kvm.KVM_SET_USER_MEMORY_REGION2, bytearray(packed))

    def dirty_log(self, slot: int, npages: int) -> bytes:
        """``KVM_GET_DIRTY_LOG`` of ``slot`` (the bitmap, one bit per page).

        The bitmap lives in memory mapped through the kernel (``kernel.mmap``), so a
        fake kernel's address space holds it as well as the real one's."""
        k = self.kernel
        n = ((npages + 63) // 64) * 8
        length = -(-n // mman.PAGE_SIZE) * mman.PAGE_SIZE
        m = k.mmap(
            -1, length, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
        )
        try:
            buf = bytearray(kvm.kvm_dirty_log_fmt.pack(slot, 0, m.address))
            k.ioctl(self.vm_fd, kvm.KVM_GET_DIRTY_LOG, buf)
            v = m.view()
            try:
                return bytes(v[:n])
            finally:
                v.release()
        finally:
            k.munmap(m.address, m.length)

    # -- vCPU state ----------------------------------------------------------------------
    def restore(self, vcpu: int, regs: bytes, sregs: bytes) -> None:
        if len(regs) != kvm.kvm_regs_fmt.size or len(sregs) != kvm.kvm_sregs.sizeof():
            raise ValueError(f"vCPU {vcpu}: bad state blob sizes {len(regs)}, {len(sregs)}")
        fd = self.vcpu_fds[vcpu]
        self.kernel.ioctl(fd, kvm.KVM_SET_SREGS, bytearray(sregs))
        self.kernel.ioctl(fd, kvm.KVM_SET_REGS, bytearray(regs))

    # -- running --------------------------------------------------------------------------
    def run(
        self, vcpu: int, on_memory_fault: object = None, max_exits: int = 10_000_000
    ) -> VcpuResult:
        """Run vCPU ``vcpu`` until PORT_DONE/HLT/error/stop (see the module doc).

        ``on_memory_fault(vcpu, run_view) -> bool`` handles ``KVM_EXIT_MEMORY_FAULT``.
        """
        k = self.kernel
        self.tids[vcpu] = k.gettid()
        fd = self.vcpu_fds[vcpu]
        run = self.runs[vcpu].view()
        res = VcpuResult(vcpu)
        handler = on_memory_fault
        try:
            while res.exits < max_exits:
                if self.stopping:
                    res.stop = "stopped"
                    return res
                try:
                    k.ioctl(fd, kvm.KVM_RUN, 0)
                except OSError as e:
                    if e.errno == errno.EINTR:
                        run[kvm.KVM_RUN_IMMEDIATE_EXIT_OFFSET] = 0
                        continue
                    if (
                        e.errno == errno.EFAULT
                        and handler is not None
                        and read_exit_reason(run) == kvm.KVM_EXIT_MEMORY_FAULT
                    ):
                        res.memory_faults += 1
                        if handler(vcpu, run):  # type: ignore[operator]
                            continue
                    raise OSError(e.errno, f"KVM_RUN vCPU {vcpu}: {e.strerror}") from e
                res.exits += 1
                answer_exit(decode_exit(run), run, res)  # the port protocol
                if res.stop:
                    return res
            res.stop, res.error = "max_exits", f"no stop after {max_exits} exits"
            return res
        finally:
            run.release()

    def interrupt(self, thread_idents: dict[int, int]) -> None:
        """Ask every vCPU to leave KVM_RUN: immediate_exit, then a signal to its thread."""
        self.stopping = True
        for m in self.runs:
            m.view()[kvm.KVM_RUN_IMMEDIATE_EXIT_OFFSET] = 1
        if signal.getsignal(_KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            return  # no handler (installed from the main thread only): the default would kill us
        for ident in thread_idents.values():
            try:
                signal.pthread_kill(ident, _KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass
