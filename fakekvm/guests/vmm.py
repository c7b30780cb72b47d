"""What every VMM of this project does the same way: its fds, the port protocol, teardown.

Shared by :class:`fakekvm.guests.vm.GuestVM` (the test VMM) and
:class:`postcopy.guestrun.DestVM` (the post-copy destination's VMM):

* :class:`VmmBase` -- ``open("/dev/kvm")``, ``KVM_CREATE_VM`` (of a given type),
  ``KVM_GET_VCPU_MMAP_SIZE``, per vCPU ``KVM_CREATE_VCPU`` + an ``mmap`` of its
  ``kvm_run`` (``Documentation/virt/kvm/api.rst`` §4.1-4.7, 4.127), and
  :meth:`VmmBase.close`, which undoes them in reverse;
* :func:`answer_exit` -- one decoded ``KVM_RUN`` exit (:mod:`fakekvm.guests.exits`)
  answered by the port protocol of :mod:`fakekvm.guests.ports`: text, reports and
  done on OUT, the VMM's bytes into ``kvm_run`` for IN and MMIO reads (api.rst §5:
  "the data ... must be filled in before re-entering"), HLT stops, anything else
  stops with an error naming the exit;
* :class:`PortResult` -- what a run collects from those exits (the result
  dataclasses of both VMMs derive from it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fakekvm.abi import kvm, mman, names
from fakekvm.guests import ports
from fakekvm.guests.exits import Exit, exit_name
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import Kernel

IoInHandler = Callable[[int, int, int], bytes]
MmioReadHandler = Callable[[int, int], bytes]

#: the exits that mean the guest itself stopped (rather than an exit this VMM does not expect)
ERROR_EXITS = (
    kvm.KVM_EXIT_SHUTDOWN,
    kvm.KVM_EXIT_FAIL_ENTRY,
    kvm.KVM_EXIT_INTERNAL_ERROR,
    kvm.KVM_EXIT_UNKNOWN,
)
#: ``kvm_run.mmio.data``: after ``phys_addr`` (u64)
MMIO_DATA_OFFSET = kvm.KVM_RUN_EXIT_OFFSET + 8


@dataclass
class PortResult:
    """What the port protocol collects from one vCPU's run (each VMM's result extends it)."""

    vcpu: int
    serial: bytearray = field(default_factory=bytearray)
    reports: list[int] = field(default_factory=list)
    done: int | None = None  # the exit code written to PORT_DONE
    stop: str = ""  # "" while running; "done", "hlt", "error", ...
    error: str | None = None

    def report64(self, index: int) -> int:
        """The 64-bit value reported as ``reports[index]`` (low), ``[index+1]`` (high)."""
        return ports.join64(self.reports[index], self.reports[index + 1])


def answer_exit(
    ex: Exit,
    run: memoryview,
    result: PortResult,
    on_io_in: IoInHandler | None = None,
    on_mmio_read: MmioReadHandler | None = None,
) -> Exit:
    """Handle exit ``ex`` (decoded from ``run``), following the port protocol.

    Records into ``result`` (``stop`` set when the vCPU must not re-enter) and
    returns the exit as it should be logged: for IN and MMIO reads, with the
    bytes the VMM supplied (``on_io_in(port, size, count)``,
    ``on_mmio_read(phys_addr, len)``; zeros without a handler).
    """
    reason = ex.reason
    if reason == kvm.KVM_EXIT_IO:
        direction, size, port, count, data_offset = (
            ex.field("direction"), ex.field("size"), ex.field("port"),
            ex.field("count"), ex.field("data_offset"),
        )  # fmt: skip
        if direction == kvm.KVM_EXIT_IO_OUT:
            if port == ports.PORT_TEXT:
                result.serial += ex.data
            elif port == ports.PORT_REPORT:
                for i in range(count):
                    result.reports.append(
                        int.from_bytes(ex.data[i * size : (i + 1) * size], "little")
                    )
            elif port == ports.PORT_DONE:
                result.done = ex.data[0] if ex.data else 0
                result.stop = "done"
            return ex
        n = size * count
        data = on_io_in(port, size, count) if on_io_in is not None else bytes(n)
        return _supply(ex, run, data_offset, data, n, f"on_io_in({port:#x})")
    if reason == kvm.KVM_EXIT_MMIO:
        if ex.field("is_write"):
            return ex
        length = ex.field("len")
        data = on_mmio_read(ex.field("phys_addr"), length) if on_mmio_read else bytes(length)
        return _supply(ex, run, MMIO_DATA_OFFSET, data, length, "on_mmio_read")
    if reason == kvm.KVM_EXIT_HLT:
        result.stop = "hlt"
        return ex
    result.stop = "error"
    parts = [f"{k}={v}" for k, v in ex.fields]
    if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
        parts[0] = names.describe("internal_error", ex.field("suberror"))
    detail = f" ({', '.join(parts)})" if parts else ""
    what = "unexpected exit" if reason not in ERROR_EXITS else "guest stopped"
    result.error = f"{what}: {exit_name(reason)}{detail}"
    return ex


def _supply(ex: Exit, run: memoryview, offset: int, data: bytes, want: int, who: str) -> Exit:
    """Put the VMM's ``data`` (``want`` bytes, from ``who``) into ``kvm_run`` at ``offset``."""
    if len(data) != want:
        raise ValueError(f"{who} returned {len(data)} bytes, want {want}")
    run[offset : offset + want] = data
    return Exit(ex.reason, ex.fields, bytes(data))


class VmmBase:
    """The fds and ``kvm_run`` mappings of one VM; :meth:`close` releases them.

    A subclass calls :meth:`_create_vm` and :meth:`_create_vcpus` from its
    constructor (closing on failure) and overrides :meth:`_close_memory` if it
    owns guest memory.
    """

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.kvm_fd = -1
        self.vm_fd = -1
        self.run_size = 0
        self.vcpu_fds: list[int] = []
        self.runs: list[Mapping] = []
        self._closed = False
        self._lock = threading.Lock()

    def _create_vm(self, kvm_path: str, vm_type: int) -> None:
        k = self.kernel
        self.kvm_fd = k.open(kvm_path, mman.O_RDWR | mman.O_CLOEXEC)
        self.vm_fd = k.ioctl(self.kvm_fd, kvm.KVM_CREATE_VM, vm_type)
        self.run_size = k.ioctl(self.kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE, 0)

    def _create_vcpus(self, n: int) -> None:
        k = self.kernel
        for i in range(n):
            fd = k.ioctl(self.vm_fd, kvm.KVM_CREATE_VCPU, i)
            self.vcpu_fds.append(fd)
            self.runs.append(
                k.mmap(fd, self.run_size, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED, 0)
            )

    def _close_memory(self) -> None:
        """Unmap guest memory this VMM owns (between the VM fd and ``/dev/kvm``)."""

    def close(self) -> None:
        """Unmap and close everything this VM opened (once; later calls do nothing)."""
        with self._lock:
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
        self._close_memory()
        if self.kvm_fd >= 0:
            k.close(self.kvm_fd)
            self.kvm_fd = -1
