"""`GuestVM`: the minimal VMM that runs the guest images through any `Kernel`.

It does what every KVM VMM does (``Documentation/virt/kvm/api.rst`` §4 and
the LWN "Using the KVM API" walk-through), and nothing kernel-specific:

1. ``open("/dev/kvm")``, ``KVM_CREATE_VM``, ``KVM_GET_VCPU_MMAP_SIZE``;
2. guest memory: an anonymous private mapping, or a caller's
   :class:`~fakekvm.kernel.mapping.Mapping` (e.g. userfaultfd-registered memory
   for post-copy), bound with ``KVM_SET_USER_MEMORY_REGION`` as slot 0 at GPA 0;
3. per vCPU ``KVM_CREATE_VCPU`` and an ``mmap`` of its ``kvm_run``;
4. :meth:`GuestVM.load` copies an image's chunks into memory and sets regs
   (``KVM_SET_REGS``) and sregs (``KVM_GET_SREGS``, overlay, ``KVM_SET_SREGS``);
5. :meth:`GuestVM.run` loops on ``KVM_RUN`` and handles each exit following the
   port protocol of :mod:`fakekvm.guests.ports`:

   ==================  =============================================================
   IO OUT 0x3f8        text byte(s), appended to ``RunResult.serial``
   IO OUT 0xe0         32-bit reported values, appended to ``RunResult.reports``
   IO OUT 0xf4         done: stop, ``RunResult.done`` = the byte written
   other IO OUT        recorded only
   IO IN               ``on_io_in(port, size, count)`` supplies the bytes (zeros)
   MMIO read           ``on_mmio_read(phys_addr, len)`` supplies the bytes (zeros)
   MMIO write          recorded
   HLT                 stop
   SHUTDOWN, FAIL_ENTRY, INTERNAL_ERROR, UNKNOWN, anything else: stop with an error
   ==================  =============================================================

Every exit is recorded, decoded (:mod:`fakekvm.guests.exits`), in order.
The fds, the exit answers and the teardown are :mod:`fakekvm.guests.vmm`'s
(shared with the post-copy destination's VMM).
``KVM_RUN`` failing with ``EINTR`` is re-entered; any other errno is raised
as the kernel's ``OSError``.  A guest error raises :class:`GuestError`
carrying the :class:`RunResult` (or, with ``check=False``, is returned in it).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fakekvm.abi import kvm, mman
from fakekvm.guests.exits import Exit, decode_exit
from fakekvm.guests.image import GuestImage
from fakekvm.guests.vmm import IoInHandler, MmioReadHandler, PortResult, VmmBase, answer_exit
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import Kernel

__all__ = ["GuestError", "GuestVM", "IoInHandler", "MmioReadHandler", "RunResult", "StopPredicate"]

StopPredicate = Callable[[Exit], bool]


@dataclass
class RunResult(PortResult):
    """What one :meth:`GuestVM.run` saw (``stop`` may also be "until", "max_exits")."""

    exits: list[Exit] = field(default_factory=list)
    regs: dict[str, int] = field(default_factory=dict)
    elapsed_ns: int = 0
    #: a copy of guest memory after the run, when the caller asked for one
    memory: bytes | None = None

    @property
    def text(self) -> str:
        return self.serial.decode("latin-1")


class GuestError(RuntimeError):
    """The guest stopped on an error exit; ``result`` holds what was seen."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


class GuestVM(VmmBase):
    """A VM with ``mem_size`` bytes of memory at GPA 0 and ``vcpus`` vCPUs."""

    def __init__(
        self,
        kernel: Kernel,
        mem_size: int,
        *,
        vcpus: int = 1,
        memory: Mapping | None = None,
        slot_flags: int = 0,
        kvm_path: str = "/dev/kvm",
    ) -> None:
        if mem_size <= 0 or mem_size % mman.PAGE_SIZE:
            raise ValueError(f"mem_size {mem_size:#x} must be a positive multiple of the page size")
        if memory is not None and memory.length < mem_size:
            raise ValueError(f"memory mapping ({memory.length:#x}) is smaller than mem_size")
        super().__init__(kernel)
        self.mem_size = mem_size
        self._own_memory = memory is None
        self.memory: Mapping | None = None
        try:
            self._setup(memory, vcpus, slot_flags, kvm_path)
        except BaseException:
            self.close()
            raise

    def _setup(self, memory: Mapping | None, vcpus: int, slot_flags: int, kvm_path: str) -> None:
        k = self.kernel
        self._create_vm(kvm_path, kvm.KVM_X86_DEFAULT_VM)
        if memory is None:
            memory = k.mmap(
                -1,
                self.mem_size,
                mman.PROT_READ | mman.PROT_WRITE,
                mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE,
            )
        self.memory = memory
        self.set_memslot(0, 0, self.mem_size, memory.address, slot_flags)
        self._create_vcpus(vcpus)

    # -- memory ----------------------------------------------------------------------

    def set_memslot(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (size 0 deletes the slot)."""
        region = bytearray(
            kvm.kvm_userspace_memory_region_fmt.pack(slot, flags, gpa, size, userspace_addr)
        )
        self.kernel.ioctl(self.vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, region)

    def mem(self) -> memoryview:
        """Guest memory ``[0, mem_size)`` as a flat byte view (GPA = index).

        The view is over the mapping itself: do not use it after :meth:`close`.
        """
        if self.memory is None:
            raise ValueError("GuestVM is closed")
        return self.memory.view()[: self.mem_size]

    # -- vCPU state --------------------------------------------------------------------

    def get_regs(self, vcpu: int = 0) -> dict[str, int]:
        buf = bytearray(kvm.kvm_regs_fmt.size)
        self.kernel.ioctl(self.vcpu_fds[vcpu], kvm.KVM_GET_REGS, buf)
        return dict(zip(kvm.KVM_REGS_FIELDS, kvm.kvm_regs_fmt.unpack(buf), strict=True))

    def set_regs(self, vcpu: int = 0, **fields: int) -> None:
        """``KVM_SET_REGS`` with the named fields; the others are zero."""
        unknown = set(fields) - set(kvm.KVM_REGS_FIELDS)
        if unknown:
            raise KeyError(f"not kvm_regs fields: {sorted(unknown)}")
        values = [fields.get(name, 0) for name in kvm.KVM_REGS_FIELDS]
        self.kernel.ioctl(
            self.vcpu_fds[vcpu], kvm.KVM_SET_REGS, bytearray(kvm.kvm_regs_fmt.pack(*values))
        )

    def get_sregs(self, vcpu: int = 0) -> dict[str, Any]:
        buf = bytearray(kvm.kvm_sregs.sizeof())
        self.kernel.ioctl(self.vcpu_fds[vcpu], kvm.KVM_GET_SREGS, buf)
        return _plain(kvm.kvm_sregs.parse(bytes(buf)))

    def set_sregs(self, vcpu: int = 0, **overlay: Any) -> None:
        """``KVM_GET_SREGS``, overlay the named fields (nested for segments), ``KVM_SET_SREGS``."""
        sregs = self.get_sregs(vcpu)
        for key, value in overlay.items():
            if key not in sregs:
                raise KeyError(f"not a kvm_sregs field: {key!r}")
            if isinstance(value, dict):
                sregs[key].update(value)
            else:
                sregs[key] = value
        buf = bytearray(kvm.kvm_sregs.build(sregs))
        self.kernel.ioctl(self.vcpu_fds[vcpu], kvm.KVM_SET_SREGS, buf)

    # -- images --------------------------------------------------------------------

    def load(
        self, image: GuestImage, *, vcpus: list[int] | None = None, write_memory: bool = True
    ) -> None:
        """Copy ``image`` into guest memory and set the CPU state of ``vcpus`` (all).

        ``write_memory=False`` sets only the CPU state: for a destination whose
        memory arrives by other means (post-copy), or to re-run a program.
        """
        if image.min_mem_size > self.mem_size:
            raise ValueError(f"{image.name} needs {image.min_mem_size:#x} bytes of memory")
        if write_memory:
            mem = self.mem()
            for chunk in image.chunks:
                if chunk.end > self.mem_size:
                    raise ValueError(
                        f"{image.name}: {chunk.what} at {chunk.gpa:#x} is outside memory"
                    )
                mem[chunk.gpa : chunk.end] = chunk.data
        for vcpu in vcpus if vcpus is not None else range(len(self.vcpu_fds)):
            self.set_sregs(vcpu, **image.sregs)
            self.set_regs(vcpu, **image.regs_for(vcpu))

    # -- running ---------------------------------------------------------------------

    def run(
        self,
        vcpu: int = 0,
        *,
        until: StopPredicate | None = None,
        on_io_in: IoInHandler | None = None,
        on_mmio_read: MmioReadHandler | None = None,
        max_exits: int = 1_000_000,
        check: bool = True,
    ) -> RunResult:
        """Run vCPU ``vcpu`` until done/HLT/error/``until(exit)``; see the module doc."""
        k = self.kernel
        fd = self.vcpu_fds[vcpu]
        run = self.runs[vcpu].view()
        result = RunResult(vcpu=vcpu)
        start = k.monotonic_ns()
        try:
            while True:
                if len(result.exits) >= max_exits:
                    result.stop = "max_exits"
                    result.error = f"no stop after {max_exits} exits"
                    break
                try:
                    k.ioctl(fd, kvm.KVM_RUN, 0)
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    raise
                ex = answer_exit(decode_exit(run), run, result, on_io_in, on_mmio_read)
                result.exits.append(ex)
                if result.stop:
                    break
                if until is not None and until(ex):
                    result.stop = "until"
                    break
        finally:
            result.elapsed_ns = k.monotonic_ns() - start
        result.regs = self.get_regs(vcpu)
        if result.error is not None and check:
            raise GuestError(f"vCPU {vcpu}: {result.error}", result)
        return result

    # -- teardown --------------------------------------------------------------------

    def _close_memory(self) -> None:
        """:meth:`close` unmaps the memory this VM mapped itself (not a caller's)."""
        if self.memory is not None and self._own_memory:
            self.kernel.munmap(self.memory.address, self.memory.length)
        self.memory = None

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """A construct Container/ListContainer as plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
