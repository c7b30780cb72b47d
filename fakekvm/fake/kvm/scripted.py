"""`ScriptedCpu`: a trace-driven vCPU that replays a recorded guest's behaviour, not its code.

``fakekvm replay --mode workload`` times a new engine build against an old run's guest: the
recorded faults become *touches* (an access to a gpa, through the same second-stage path a
unicorn vCPU takes: ``translate(gpa, write, exec_)``, so it blocks on userfaultfd, exits with
``KVM_EXIT_MEMORY_FAULT`` under KVM Userfault or a private/shared mismatch, exactly as guest code
would), and the recorded exits (port I/O reports, HLT, ...) are returned in their recorded order
between them. Optional think time before a touch reproduces the recorded time the vCPU ran
between two faults.

It has the `X86Cpu` surface `FakeVcpu` uses (``run``, registers, ``kick``, invalidation) and is
chosen per kernel by ``FakeKernel(vcpu_factory=...)`` (see `scripted_factory`). Registers and
special registers are stored, not executed: the engine's KVM_SET_REGS/GET_REGS round trip
still holds. No x86 code runs, so a script step costs microseconds.

After the last step every ``run`` returns ``ShutdownExit`` (the recorded guests end with
``DONE`` then ``ud2``, a triple fault, once re-entered).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from fakekvm.fake.cpu.exits import (
    Exit,
    HltExit,
    Interrupted,
    IoExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
)
from fakekvm.fake.cpu.state import reset_regs, reset_sregs
from fakekvm.fake.kvm.translate import Kind
from fakekvm.fake.waits import WaitDomain, WaitQueue

PAGE_SIZE = 4096


class Touch(msgspec.Struct, frozen=True, gc=False):
    """One guest access to ``gpa`` (a recorded fault), after ``think_ns`` of guest running time.

    A msgspec struct outside the garbage collector, not a frozen dataclass: a 1 GiB trace
    makes 262,144 of them, and a frozen dataclass costs ~4 µs each to build
    (``object.__setattr__`` per field, and the collector walking them), this ~0.1 µs.
    """

    gpa: int
    write: bool = False
    exec_: bool = False
    think_ns: int = 0


Step = Touch | IoExit | MmioExit | HltExit | ShutdownExit


@dataclass(slots=True)
class ScriptStats:
    touches: int = 0  #: touches completed
    memory_faults: int = 0  #: KVM_EXIT_MEMORY_FAULT exits taken (the touch is retried)
    skipped_mmio: int = 0  #: touches of a gpa that is no longer RAM (skipped)
    exits: int = 0  #: recorded exits returned


class ScriptedCpu:
    """A vCPU that plays ``script``; see the module docstring."""

    def __init__(
        self,
        translate: Callable[[int, bool, bool], Any],
        script: Sequence[Step],
        *,
        domain: WaitDomain | None = None,
        think: bool = True,
        apic_base: int = 0xFEE00900,
        vcpu_id: int = 0,
    ) -> None:
        self.vcpu_id = vcpu_id
        self._translate = translate
        self.script = list(script)
        self.pos = 0
        self.think = think
        self.stats = ScriptStats()
        self.apic_base = apic_base
        self.cr8 = 0
        self.on_emulation_arm: Callable[..., Any] | None = None
        self._regs = reset_regs()
        self._sregs: dict[str, Any] = reset_sregs(apic_base)
        self._kick = False
        #: ``time.monotonic_ns()`` when the script ran out (its last step returned), else 0
        self.finished_ns = 0
        self._think_done = False  # the current touch's think time was spent (a retry skips it)
        self._wq = WaitQueue(domain, "scripted-vcpu-think")
        #: set when the vCPU starts a think-time wait (for tests and tools: no polling)
        self.thinking = threading.Event()

    # -- the X86Cpu surface FakeVcpu uses ------------------------------------------------------
    def get_regs(self) -> dict[str, int]:
        return dict(self._regs)

    def set_regs(self, regs: dict[str, int]) -> None:
        self._regs = dict(regs)

    def get_sregs(self) -> dict[str, Any]:
        return copy.deepcopy(self._sregs)

    def set_sregs(self, sregs: dict[str, Any]) -> None:
        self._sregs = copy.deepcopy(sregs)
        self.apic_base = sregs.get("apic_base", self.apic_base)

    def rflags_cr8(self) -> tuple[int, int]:
        return self._regs["rflags"], self.cr8

    def and_rflags(self, mask: int) -> None:
        self._regs["rflags"] &= mask

    def kick(self) -> None:
        """Make a running (or the next) ``run()`` return `Interrupted` (think time included)."""
        with self._wq.lock:
            self._kick = True
            self._wq.wake_up_all_locked()

    def memslots_changed(self) -> None:
        """Nothing cached: every touch translates afresh."""

    def invalidate(self, gpa_start: int, gpa_end: int) -> None:
        """Nothing cached: every touch translates afresh."""

    # -- running ------------------------------------------------------------------------------
    def _take_kick(self) -> bool:
        if not self._kick:  # a plain read first: a kick sets it before waking (no lock per step)
            return False
        with self._wq.lock:
            if self._kick:
                self._kick = False
                return True
        return False

    def run(self, response: bytes | None = None) -> Exit:
        """Play steps until the next exit; ``response`` (IN/MMIO read data) is not needed."""
        script = self.script
        st = self.stats
        while True:
            if self._take_kick():
                return Interrupted()
            if self.pos >= len(script):
                if not self.finished_ns:
                    self.finished_ns = time.monotonic_ns()
                return ShutdownExit()
            step = script[self.pos]
            if type(step) is not Touch:
                self.pos += 1
                st.exits += 1
                if self.pos == len(script):
                    self.finished_ns = time.monotonic_ns()
                return step  # type: ignore[return-value]
            if self.think and step.think_ns and not self._think_done:
                self._think_done = True
                self.thinking.set()
                if self._wq.wait_event(lambda: self._kick, step.think_ns / 1e9, what="think time"):
                    continue  # kicked while thinking
            t = self._translate(step.gpa, step.write, step.exec_)
            if t.kind == Kind.FAULT:
                st.memory_faults += 1
                return MemoryFaultExit(step.gpa & ~(PAGE_SIZE - 1), PAGE_SIZE, t.fault_flags)
            if t.kind == Kind.MMIO:
                st.skipped_mmio += 1
            else:
                st.touches += 1
            self.pos += 1
            self._think_done = False


def scripted_factory(
    scripts: Mapping[int, Sequence[Step]], *, think: bool = True
) -> Callable[[Any, Any, Callable[[int, bool, bool], Any]], ScriptedCpu]:
    """A ``FakeKernel(vcpu_factory=...)`` that gives vCPU ``i`` the script ``scripts[i]``
    (an empty script for a vCPU the trace does not mention)."""

    def make(vm: Any, vcpu: Any, translate: Callable[[int, bool, bool], Any]) -> ScriptedCpu:
        return ScriptedCpu(
            translate, scripts.get(vcpu.vcpu_id, ()), domain=vm.kernel.waits, think=think,
            apic_base=getattr(vcpu, "reset_apic_base", 0xFEE00900), vcpu_id=vcpu.vcpu_id,
        )  # fmt: skip

    return make
