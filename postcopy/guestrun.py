"""`DestVM`: the destination's VMM -- a VM built by a fault mechanism, restored vCPUs, run loops.

Like :class:`fakekvm.guests.vm.GuestVM` (same port protocol,
:mod:`fakekvm.guests.ports`), but the mechanism chooses the VM type
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
from dataclasses import dataclass, field

from fakekvm.abi import kvm, mman
from fakekvm.guests import ports
from fakekvm.guests.exits import exit_name, read_exit_reason
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import Kernel

_OFF = kvm.KVM_RUN_EXIT_OFFSET
_IO = kvm.kvm_run_io_fmt
_MMIO = kvm.kvm_run_mmio_fmt
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
class VcpuResult:
    vcpu: int
    reports: list[int] = field(default_factory=list)
    serial: bytearray = field(default_factory=bytearray)
    done: int | None = None
    stop: str = ""
    error: str | None = None
    exits: int = 0
    memory_faults: int = 0

    def report64(self, index: int) -> int:
        return ports.join64(self.reports[index], self.reports[index + 1])


class GuestFailed(RuntimeError):
    """A vCPU stopped on an error exit."""


class DestVM:
    """A VM of ``vm_type`` with ``nr_vcpus`` vCPUs; memslots come from the caller."""

    def __init__(self, kernel: Kernel, vm_type: int, nr_vcpus: int, kvm_path: str = "/dev/kvm"):
        self.kernel = kernel
        self.kvm_fd = -1
        self.vm_fd = -1
        self.vcpu_fds: list[int] = []
        self.runs: list[Mapping] = []
        self.tids: list[int] = [0] * nr_vcpus
        self.stopping = False
        self._closed = False
        try:
            k = kernel
            self.kvm_fd = k.open(kvm_path, mman.O_RDWR | mman.O_CLOEXEC)
            self.vm_fd = k.ioctl(self.kvm_fd, kvm.KVM_CREATE_VM, vm_type)
            size = k.ioctl(self.kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE, 0)
            for i in range(nr_vcpus):
                fd = k.ioctl(self.vm_fd, kvm.KVM_CREATE_VCPU, i)
                self.vcpu_fds.append(fd)
                self.runs.append(
                    k.mmap(fd, size, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED, 0)
                )
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
                if self._handle(run, res):
                    return res
            res.stop, res.error = "max_exits", f"no stop after {max_exits} exits"
            return res
        finally:
            run.release()

    def _handle(self, run: memoryview, res: VcpuResult) -> bool:
        reason = read_exit_reason(run)
        if reason == kvm.KVM_EXIT_IO:
            direction, size, port, count, data_offset = _IO.unpack_from(run, _OFF)
            n = size * count
            if direction == kvm.KVM_EXIT_IO_OUT:
                data = bytes(run[data_offset : data_offset + n])
                if port == ports.PORT_TEXT:
                    res.serial += data
                elif port == ports.PORT_REPORT:
                    for i in range(count):
                        res.reports.append(
                            int.from_bytes(data[i * size : (i + 1) * size], "little")
                        )
                elif port == ports.PORT_DONE:
                    res.done = data[0] if data else 0
                    res.stop = "done"
                    return True
            else:
                run[data_offset : data_offset + n] = bytes(n)
            return False
        if reason == kvm.KVM_EXIT_MMIO:
            _, _, length, is_write = _MMIO.unpack_from(run, _OFF)
            if not is_write:
                run[_OFF + 8 : _OFF + 8 + length] = bytes(length)
            return False
        if reason == kvm.KVM_EXIT_HLT:
            res.stop = "hlt"
            return True
        res.stop = "error"
        res.error = f"unexpected exit {exit_name(reason)}"
        return True

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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        k = self.kernel
        for m in self.runs:
            k.munmap(m.address, m.length)
        self.runs.clear()
        for fd in self.vcpu_fds:
            k.close(fd)
        self.vcpu_fds.clear()
        if self.vm_fd >= 0:
            k.close(self.vm_fd)
            self.vm_fd = -1
        if self.kvm_fd >= 0:
            k.close(self.kvm_fd)
            self.kvm_fd = -1
