"""What one run of the CPU engine ends with: plain tuples, no KVM bytes.

The vCPU (``fakekvm.fake.kvm.vcpu``) turns them into ``struct kvm_run`` exits
(``include/uapi/linux/kvm.h``: KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_HLT,
KVM_EXIT_SHUTDOWN, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_MEMORY_FAULT) or into
``-EINTR`` for :class:`Interrupted`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class IoExit:
    """A dataclass, not a NamedTuple: a field called ``count`` would shadow tuple.count."""

    direction: int  # 0 in, 1 out (KVM_EXIT_IO_IN / _OUT)
    size: int  # 1, 2, 4
    port: int
    count: int
    data: bytes  # size*count bytes (OUT: what the guest wrote; IN: zeros, filled by userspace)


class MmioExit(NamedTuple):
    gpa: int
    len: int
    is_write: bool
    data: bytes  # written bytes (writes); b"" for reads


class HltExit(NamedTuple):
    pass


class ShutdownExit(NamedTuple):
    #: PVM fills the emulation-failure arm before a triple fault that began with an
    #: emulated #UD at CPL0 (measured: ud2 with no IDT); those bytes, else b""
    emulation_insn: bytes = b""


class InternalErrorExit(NamedTuple):
    suberror: int  # KVM_INTERNAL_ERROR_EMULATION = 1, ...
    insn_bytes: bytes  # up to 15 bytes fetched at rip
    data: tuple[int, ...]  # the extra u64 words after flags/insn (KVM's exit info)


class MemoryFaultExit(NamedTuple):
    gpa: int
    size: int
    flags: int


class Interrupted(NamedTuple):
    """KVM_RUN returns -EINTR: a kick or a pending request asked the vCPU out."""


Exit = IoExit | MmioExit | HltExit | ShutdownExit | InternalErrorExit | MemoryFaultExit | Interrupted
