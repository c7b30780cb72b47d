"""Faults derived from a stream of recorded `Call`s: a pure state machine (no I/O, no threads).

`FaultTracker.feed` takes the calls in trace order and returns the `Fault`s each call
*resolves*; `FaultTracker.finish` returns the faults still waiting when the trace ends (with
``resolved_ns`` 0). Nothing is asked of the engine: everything comes from bytes the recorder
already has.

userfaultfd (``Documentation/admin-guide/mm/userfaultfd.rst``, ``fs/userfaultfd.c``):

* a ``read`` on a userfaultfd returns ``uffd_msg`` s (32 bytes each); every
  ``UFFD_EVENT_PAGEFAULT`` is a fault *observed* when the read returned, at ``address``, by
  thread ``feat.ptid`` (``UFFD_FEATURE_THREAD_ID``), access from ``flags`` (``WP`` -> "wp",
  ``MINOR`` -> "minor", ``WRITE`` -> "write", else "read");
* ``UFFDIO_COPY`` / ``UFFDIO_ZEROPAGE`` / ``UFFDIO_CONTINUE`` / ``UFFDIO_POISON`` /
  ``UFFDIO_MOVE`` without ``*_MODE_DONTWAKE`` wake the waiters of the range they filled
  (``userfaultfd.c``: ``wake_userfault`` over the bytes done, also when the ioctl then fails
  ``EAGAIN`` after partial progress; a negative result wakes nobody): those faults are
  *resolved* ("copy", "zeropage", "continue", "poison", "move") when the ioctl returns;
* ``EEXIST`` (the page was already there) wakes nobody; the handler's ``UFFDIO_WAKE`` on the
  range resolves it ("wake"), as does a ``UFFDIO_WAKE`` after a ``DONTWAKE`` fill.

KVM (``Documentation/virt/kvm/api.rst``, ``KVM_EXIT_MEMORY_FAULT``):

* ``KVM_RUN`` failing ``EFAULT`` with ``exit_reason == KVM_EXIT_MEMORY_FAULT`` in the
  recorded ``kvm_run`` bytes is a fault observed on that vCPU at ``memory_fault.gpa``;
  access: ``KVM_MEMORY_EXIT_FLAG_USERFAULT`` (NOT UPSTREAM) -> "userfault", ``PRIVATE`` ->
  "private", neither -> "shared";
* the vCPU's next ``KVM_RUN`` resolves it ("rerun"; resolved at that call's entry).

Guest-physical and host-virtual addresses are translated through the memslots seen in
``KVM_SET_USER_MEMORY_REGION``/``KVM_SET_USER_MEMORY_REGION2`` calls; the thread-to-vCPU map
comes from the threads that called ``KVM_RUN`` (`FaultTracker.vcpu_thread`, told at entry).
"""

from __future__ import annotations

import errno
import struct

from fakekvm.abi import kvm, kvm_userfault, uffd
from replay.events import Call, Fault

_MSG = struct.Struct("<B7xQQI4x")  # uffd_msg as a pagefault: event, flags, address, ptid
_MSG_SIZE = 32
_RANGE = struct.Struct("<QQ")
_Q = struct.Struct("<Q")
_q = struct.Struct("<q")
_U32 = struct.Struct("<I")
_MEMFAULT = struct.Struct("<QQQ")  # kvm_run.memory_fault: flags, gpa, size @32
_REGION = struct.Struct("<IIQQQ")  # slot, flags, guest_phys_addr, memory_size, userspace_addr

#: request -> (how, offset of mode, its DONTWAKE bit, offset of the signed result field)
_FILLS: dict[int, tuple[str, int, int, int]] = {
    uffd.UFFDIO_COPY: ("copy", 24, uffd.UFFDIO_COPY_MODE_DONTWAKE, 32),
    uffd.UFFDIO_ZEROPAGE: ("zeropage", 16, uffd.UFFDIO_ZEROPAGE_MODE_DONTWAKE, 24),
    uffd.UFFDIO_CONTINUE: ("continue", 16, uffd.UFFDIO_CONTINUE_MODE_DONTWAKE, 24),
    uffd.UFFDIO_POISON: ("poison", 16, uffd.UFFDIO_POISON_MODE_DONTWAKE, 24),
    uffd.UFFDIO_MOVE: ("move", 24, uffd.UFFDIO_MOVE_MODE_DONTWAKE, 32),
}
_REGIONS = (kvm.KVM_SET_USER_MEMORY_REGION, kvm.KVM_SET_USER_MEMORY_REGION2)
_FLAG_PRIVATE = kvm.KVM_MEMORY_EXIT_FLAG_PRIVATE
_FLAG_USERFAULT = kvm_userfault.KVM_MEMORY_EXIT_FLAG_USERFAULT
_PF_WRITE = uffd.UFFD_PAGEFAULT_FLAG_WRITE
_PF_WP = uffd.UFFD_PAGEFAULT_FLAG_WP
_PF_MINOR = uffd.UFFD_PAGEFAULT_FLAG_MINOR


def uffd_access(flags: int) -> str:
    if flags & _PF_WP:
        return "wp"
    if flags & _PF_MINOR:
        return "minor"
    return "write" if flags & _PF_WRITE else "read"


def memory_fault_access(flags: int) -> str:
    if flags & _FLAG_USERFAULT:
        return "userfault"
    return "private" if flags & _FLAG_PRIVATE else "shared"


class FaultTracker:
    """Consume `Call` s in trace order; emit each `Fault` once it is resolved."""

    def __init__(self, mechanism: str = "") -> None:
        self.mechanism = mechanism
        #: uffd faults waiting: address -> faults (a page can have several waiters)
        self.pending: dict[int, list[Fault]] = {}
        #: KVM memory faults waiting, by vCPU index
        self.vcpu_pending: dict[int, Fault] = {}
        #: memslots: slot -> (gpa, size, hva)
        self.slots: dict[int, tuple[int, int, int]] = {}
        self.tid_vcpu: dict[int, int] = {}
        self.observed = 0
        self.resolved = 0

    # -- address translation -----------------------------------------------------------------

    def gpa_of(self, hva: int) -> int:
        for gpa, size, base in self.slots.values():
            if base <= hva < base + size:
                return gpa + hva - base
        return -1

    def hva_of(self, gpa: int) -> int:
        for base_gpa, size, base in self.slots.values():
            if base_gpa <= gpa < base_gpa + size:
                return base + gpa - base_gpa
        return -1

    def vcpu_thread(self, tid: int, vcpu: int) -> None:
        """Thread ``tid`` runs vCPU ``vcpu`` (the recorder says so when ``KVM_RUN`` is entered,
        before its `Call` exists, so faults taken inside that ``KVM_RUN`` name the vCPU)."""
        self.tid_vcpu[tid] = vcpu

    # -- the stream ------------------------------------------------------------------------------

    def feed(self, call: Call) -> list[Fault]:
        """The faults ``call`` resolves (usually none). ``call`` must have its final ``seq``."""
        kind = call.fd_kind
        if kind == "userfaultfd":
            if call.op == "read":
                if call.errno == 0:
                    self._uffd_read(call)
                return []
            if call.op == "ioctl" and self.pending:
                return self._uffd_ioctl(call)
            return []
        if call.vcpu >= 0 and call.op == "ioctl" and call.request == kvm.KVM_RUN:
            return self._kvm_run(call)
        if call.op == "ioctl" and call.request in _REGIONS and call.errno == 0:
            self._region(call)
        return []

    def finish(self) -> list[Fault]:
        """Faults never resolved (``resolved_ns`` 0), in the order they were observed."""
        out = [f for lst in self.pending.values() for f in lst]
        out.extend(self.vcpu_pending.values())
        self.pending.clear()
        self.vcpu_pending.clear()
        out.sort(key=lambda f: (f.observed_ns, f.seq))
        return out

    # -- userfaultfd -----------------------------------------------------------------------------

    def _uffd_read(self, call: Call) -> None:
        data = call.out
        t = call.t_ns + call.dur_ns
        pending = self.pending
        for off in range(0, len(data) - _MSG_SIZE + 1, _MSG_SIZE):
            event, flags, address, ptid = _MSG.unpack_from(data, off)
            if event != uffd.UFFD_EVENT_PAGEFAULT:
                continue
            f = Fault(
                seq=call.seq,
                tid=ptid,
                vcpu=self.tid_vcpu.get(ptid, -1),
                gpa=self.gpa_of(address),
                hva=address,
                access=uffd_access(flags),
                mechanism=self.mechanism,
                observed_ns=t,
            )
            pending.setdefault(address, []).append(f)
            self.observed += 1

    def _uffd_ioctl(self, call: Call) -> list[Fault]:
        req = call.request
        inp = call.inp
        fill = _FILLS.get(req)
        if fill is not None:
            how, mode_off, dontwake, res_off = fill
            if len(inp) < res_off:
                return []
            start = _Q.unpack_from(inp, 0)[0]
            length = _Q.unpack_from(inp, 16 if res_off == 32 else 8)[0]
            mode = _Q.unpack_from(inp, mode_off)[0]
            out = call.out or inp
            done = _q.unpack_from(out, res_off)[0] if len(out) >= res_off + 8 else -1
            if call.errno == 0:
                done = length
            if call.errno == errno.EEXIST or done <= 0 or mode & dontwake:
                return []  # nobody woken: the waiters stay pending until a WAKE
            return self._wake(start, done, call, how)
        if req == uffd.UFFDIO_WAKE and call.errno == 0 and len(inp) >= 16:
            start, length = _RANGE.unpack_from(inp, 0)
            return self._wake(start, length, call, "wake")
        return []

    def _wake(self, start: int, length: int, call: Call, how: str) -> list[Fault]:
        end = start + length
        hit = [a for a in self.pending if start <= a < end]
        if not hit:
            return []
        t = call.t_ns + call.dur_ns
        out: list[Fault] = []
        for a in hit:
            for f in self.pending.pop(a):
                f.resolved_ns = t
                f.how = how
                out.append(f)
        self.resolved += len(out)
        return out

    # -- KVM -------------------------------------------------------------------------------------

    def _kvm_run(self, call: Call) -> list[Fault]:
        vcpu = call.vcpu
        self.tid_vcpu[call.tid] = vcpu
        out: list[Fault] = []
        f = self.vcpu_pending.pop(vcpu, None)
        if f is not None:
            f.resolved_ns = call.t_ns
            f.how = "rerun"
            out.append(f)
            self.resolved += 1
        run = call.out
        if (
            call.errno == errno.EFAULT
            and len(run) >= 56
            and _U32.unpack_from(run, 8)[0] == kvm.KVM_EXIT_MEMORY_FAULT
        ):
            flags, gpa, _size = _MEMFAULT.unpack_from(run, 32)
            self.vcpu_pending[vcpu] = Fault(
                seq=call.seq,
                tid=call.tid,
                vcpu=vcpu,
                gpa=gpa,
                hva=self.hva_of(gpa),
                access=memory_fault_access(flags),
                mechanism=self.mechanism,
                observed_ns=call.t_ns + call.dur_ns,
            )
            self.observed += 1
        return out

    def _region(self, call: Call) -> None:
        if len(call.inp) < _REGION.size:
            return
        slot, _flags, gpa, size, hva = _REGION.unpack_from(call.inp, 0)
        if size == 0:
            self.slots.pop(slot, None)
        else:
            self.slots[slot] = (gpa, size, hva)
