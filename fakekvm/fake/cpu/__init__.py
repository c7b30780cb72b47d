"""x86 execution on unicorn for the fake vCPU (no KVM knowledge here).

:class:`~fakekvm.fake.cpu.engine.X86Cpu` runs guest code; exits are the tuples in
:mod:`fakekvm.fake.cpu.exits`.
"""

from fakekvm.fake.cpu.engine import X86Cpu, reset_regs, reset_sregs
from fakekvm.fake.cpu.exits import (
    Exit,
    HltExit,
    InternalErrorExit,
    Interrupted,
    IoExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
)

__all__ = [
    "Exit",
    "HltExit",
    "InternalErrorExit",
    "Interrupted",
    "IoExit",
    "MemoryFaultExit",
    "MmioExit",
    "ShutdownExit",
    "X86Cpu",
    "reset_regs",
    "reset_sregs",
]
