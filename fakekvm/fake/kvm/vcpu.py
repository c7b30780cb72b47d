"""`FakeVcpu`: the vCPU file (``anon_inode:kvm-vcpu:N``) and its ``struct kvm_run``.

Models ``virt/kvm/kvm_main.c: kvm_vcpu_ioctl`` / ``kvm_vcpu_mmap`` and
``arch/x86/kvm/x86.c: kvm_arch_vcpu_ioctl_run`` over the unicorn CPU engine
(:mod:`fakekvm.fake.cpu`):

* ``mmap`` of the fd: the 3-page run area is a real memfd, so every mapping is
  real shared memory (page 0 ``struct kvm_run``, page 1 the PIO data page
  ``KVM_PIO_PAGE_OFFSET``, page 2 the coalesced-MMIO ring). As on the live
  host, lengths/offsets past 3 pages are accepted (touching them faults).
* ``KVM_RUN``: one thread at a time (``vcpu->mutex``: a second caller waits);
  ``immediate_exit`` → ``-EINTR`` with ``exit_reason`` left as it was; the guest
  runs in the caller's thread (unicorn releases the GIL); the exit is written
  into kvm_run field by field (header: exit_reason, ready_for_interrupt_injection,
  if_flag, flags, cr8, apic_base; then only the fields of the exit's arm, so
  the other bytes keep their old values as on the live kernel); a kick →
  ``-EINTR`` with ``KVM_EXIT_INTR``; a memory fault → ``-EFAULT`` with
  ``KVM_EXIT_MEMORY_FAULT``. Port/MMIO writes that match an ioeventfd signal it
  instead of exiting (``kvm_io_bus_write``).
* ``KVM_GET/SET_REGS``, ``KVM_GET/SET_SREGS`` byte-exact with the live host
  (reset state measured on 6.18 PVM), ``KVM_GET_MP_STATE`` (RUNNABLE),
  ``KVM_GET_VCPU_EVENTS`` (reset bytes as measured). Every other ioctl answers
  ``EINVAL``, as the live host does on a vCPU fd (``kvm_arch_vcpu_ioctl``'s default).
* Measured details reproduced (6.18 PVM): OUT exits with rip after the
  instruction, IN exits with rip on it (completed on re-entry) and the data
  bytes zeroed; ``rep outs`` one exit per element, ``rep ins`` batches of
  min(bytes left in the page, 1024/size, rcx) items; RFLAGS.RF set while a
  string instruction is part-done and on triple fault; MMIO writes exit after
  the instruction, reads before it. With the profile's
  ``internal_error_on_int3_without_idt`` (PVM emulates ring-0 code): ring-0
  ``int n``/``int3`` is an emulation failure and a ring-0 #UD leaves the
  emulation-failure arm in kvm_run.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from typing import TYPE_CHECKING, Any

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.fake.cpu import (
    HltExit,
    InternalErrorExit,
    Interrupted,
    IoExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
    X86Cpu,
)
from fakekvm.fake.files import FakeFile
from fakekvm.fake.kvm.translate import for_vcpu
from fakekvm.fake.kvm.vm import copy_to_user, read_arg
from fakekvm.fake.mm import hostmem
from fakekvm.fake.mm.fault import Faulter
from fakekvm.fake.waits import WaitQueue
from fakekvm.kernel.mapping import Mapping, make_mapping
from fakekvm.kernel.seam import IoctlArg

if TYPE_CHECKING:
    from fakekvm.fake.kvm.vm import FakeVm

RUN_PAGES = 3
RUN_SIZE = RUN_PAGES * mman.PAGE_SIZE
PIO_OFFSET = K.KVM_PIO_PAGE_OFFSET * mman.PAGE_SIZE

_IO = K.kvm_run_io_fmt
_MMIO_HEAD = struct.Struct("<Q")
_MMIO_TAIL = struct.Struct("<IB")
_MF = K.kvm_run_memory_fault_fmt
_INTERNAL = struct.Struct("<IIQB15s5Q")
_U32 = struct.Struct("<I")
_EXIT_OFF = K.KVM_RUN_EXIT_OFFSET
_RFLAGS_IOPL = 3 << 12

#: kvm_vcpu_events right after KVM_CREATE_VCPU on the live host: flags = NMI_PENDING|SHADOW|SMM valid
_RESET_EVENTS = bytes(20) + _U32.pack(
    K.KVM_VCPUEVENT_VALID_NMI_PENDING | K.KVM_VCPUEVENT_VALID_SHADOW | K.KVM_VCPUEVENT_VALID_SMM
) + bytes(40)

#: PVM's emulation-failure exit carries 5 words after the instruction bytes; measured
#: for int3/int n with no IDT: (0x1000, 0, 0, 0, 0)
_EMUL_INFO = (0x1000, 0, 0, 0, 0)


def _sregs_to_dict(raw: bytes) -> dict[str, Any]:
    c = K.kvm_sregs.parse(raw)
    d: dict[str, Any] = {}
    for n in K.KVM_SREGS_SEGMENTS:
        d[n] = {f: c[n][f] for f in K.KVM_SEGMENT_FIELDS}
    for n in ("gdt", "idt"):
        d[n] = {"base": c[n].base, "limit": c[n].limit, "padding": list(c[n].padding)}
    for n in K.KVM_SREGS_CONTROL:
        d[n] = c[n]
    d["interrupt_bitmap"] = list(c.interrupt_bitmap)
    return d


class FakeVcpu(FakeFile):
    """One vCPU of a `FakeVm` (see the module docstring)."""

    #: VM capabilities that change vCPU behaviour and that this vCPU honours
    ENABLEABLE_VM_CAPS: frozenset[int] = frozenset()

    def __init__(self, vm: FakeVm, vcpu_id: int) -> None:
        super().__init__()
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.kind = f"kvm-vcpu:{vcpu_id}"
        self._run_fd = os.memfd_create(f"kvm-vcpu:{vcpu_id}", os.MFD_CLOEXEC)
        os.ftruncate(self._run_fd, RUN_SIZE)
        self._run_map = mmap.mmap(self._run_fd, RUN_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_view = memoryview(self._run_map)
        # vcpu->mutex, as a wait queue so that the wait goes through fake/waits.py
        self._busy = False
        self._mutex_wq = WaitQueue(getattr(vm.kernel, "waits", None), name=f"{self.kind}:mutex")
        self._released = False
        profile = getattr(vm, "profile", None)
        pvm = bool(getattr(profile, "internal_error_on_int3_without_idt", True))
        #: who faults while this vCPU runs (uffd_msg ptid): set for the duration of KVM_RUN,
        #: for the thread running it (`fakekvm.fake.kvm.translate._faulter`)
        self.faulter: Faulter | None = None
        self._faulter_cache: Faulter | None = None
        # The unicorn instance (~3 MiB with its code cache) is made on first use, so a VMM
        # that creates many vCPUs (KVM_CAP_MAX_VCPUS is 1024) pays only for those it uses.
        self._pvm = pvm
        #: MSR_IA32_APICBASE at reset: enabled at 0xfee00000, BSP bit only on vCPU 0
        #: (kvm_vcpu_is_reset_bsp; measured: vCPU 1 reads 0xfee00800)
        self.reset_apic_base = 0xFEE00900 if vcpu_id == 0 else 0xFEE00800
        self._iopl_lost = bool(getattr(profile, "iopl_lost_on_exit", False))
        self._cpu: X86Cpu | None = None
        self._cpu_lock = threading.Lock()
        self._kick_early = False
        # the run area reads all zero until the first KVM_RUN (measured)
        self._pending: IoExit | MmioExit | None = None
        self._handlers = {
            K.KVM_RUN: self._ioctl_run,
            K.KVM_GET_REGS: self._get_regs,
            K.KVM_SET_REGS: self._set_regs,
            K.KVM_GET_SREGS: self._get_sregs,
            K.KVM_SET_SREGS: self._set_sregs,
            K.KVM_GET_MP_STATE: self._get_mp_state,
            K.KVM_GET_VCPU_EVENTS: self._get_vcpu_events,
        }

    def _emulation_arm(self, insn: bytes) -> None:
        insn = insn[:15]
        _INTERNAL.pack_into(
            self.run_view, _EXIT_OFF, K.KVM_INTERNAL_ERROR_EMULATION, 8,
            K.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
            len(insn), insn.ljust(15, b"\0"), *_EMUL_INFO,
        )  # fmt: skip

    @property
    def cpu(self) -> X86Cpu:
        c = self._cpu
        if c is None:
            with self._cpu_lock:
                c = self._cpu
                if c is None:
                    factory = getattr(self.vm.kernel, "vcpu_factory", None)
                    if factory is not None:  # e.g. a trace-driven vCPU (fakekvm.fake.kvm.scripted)
                        c = factory(self.vm, self, for_vcpu(self.vm, self))
                    else:
                        c = X86Cpu(for_vcpu(self.vm, self), apic_base=self.reset_apic_base,
                                   pvm_emulation=self._pvm)  # fmt: skip
                    c.on_emulation_arm = self._emulation_arm
                    if self._kick_early:
                        c.kick()
                    self._cpu = c
        return c

    # -- calls from the VM (other threads) -------------------------------------------------
    # Before the CPU exists nothing is cached, so there is nothing to invalidate.
    def memslots_changed(self) -> None:
        if self._cpu is not None:
            self._cpu.memslots_changed()

    def invalidate(self, gpa_start: int, gpa_end: int) -> None:
        if self._cpu is not None:
            self._cpu.invalidate(gpa_start, gpa_end)

    def kick(self) -> None:
        """Like a signal to the vCPU thread: a running (or the next) KVM_RUN returns EINTR."""
        with self._cpu_lock:
            if self._cpu is None:
                self._kick_early = True
                return
        self._cpu.kick()

    # -- file operations -----------------------------------------------------------------------
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        h = self._handlers.get(request)
        if h is None:
            raise OSError(errno.EINVAL, f"{self.kind}: ioctl {request:#x} not supported on a vCPU fd")
        # kvm_vcpu_ioctl: every vCPU ioctl runs under vcpu->mutex (a second caller waits)
        wq = self._mutex_wq
        with wq.lock:
            wq.wait_event_locked(lambda: not self._busy, what="vcpu->mutex")
            self._busy = True
        try:
            return h(arg)
        finally:
            with wq.lock:
                self._busy = False
                wq.wake_up_all_locked()

    def mmap(self, length: int, prot: int, flags: int, offset: int, address: int) -> Mapping:
        hostmem.map_fd_fixed(address, length, prot, self._run_fd, offset, shared=flags & mman.MAP_TYPE != mman.MAP_PRIVATE)
        return make_mapping(address, length, prot=prot, flags=flags, offset=offset, owner=self)

    def release(self) -> None:
        """Last fd closed: drop the VM reference KVM_CREATE_VCPU took (kvm_vcpu_release)."""
        self._released = True
        self.vm.put()

    def lseek(self, pos: int, how: int) -> int:
        return 0  # noop_llseek, as kvm_vcpu_fops

    def poll(self) -> int:
        from fakekvm.fake.kvm.system import POLL_DEFAULT

        return POLL_DEFAULT  # no .poll in kvm_vcpu_fops: DEFAULT_POLLMASK

    def destroy(self) -> None:
        """Called by the VM when it is freed."""
        if self._cpu is not None:
            self._cpu.kick()
        self.run_view.release()
        self._run_map.close()
        os.close(self._run_fd)

    # -- ioctls ----------------------------------------------------------------------------------
    def _out(self, arg: IoctlArg, data: bytes, what: str) -> int:
        if isinstance(arg, int):
            copy_to_user(self.vm.kernel, arg, data, what)
        else:
            memoryview(arg).cast("B")[: len(data)] = data  # type: ignore[arg-type]
        return 0

    def _get_regs(self, arg: IoctlArg) -> int:
        r = self.cpu.get_regs()
        return self._out(arg, K.kvm_regs_fmt.pack(*[r[n] for n in K.KVM_REGS_FIELDS]), "KVM_GET_REGS")

    def _set_regs(self, arg: IoctlArg) -> int:
        raw = read_arg(self.vm.kernel, arg, K.kvm_regs_fmt.size, "KVM_SET_REGS")
        self.cpu.set_regs(dict(zip(K.KVM_REGS_FIELDS, K.kvm_regs_fmt.unpack(raw), strict=True)))
        return 0

    def _get_sregs(self, arg: IoctlArg) -> int:
        s = self.cpu.get_sregs()
        return self._out(arg, K.kvm_sregs.build(s), "KVM_GET_SREGS")

    def _set_sregs(self, arg: IoctlArg) -> int:
        raw = read_arg(self.vm.kernel, arg, K.kvm_sregs.sizeof(), "KVM_SET_SREGS")
        d = _sregs_to_dict(raw)
        # kvm_is_valid_sregs: LMA must match LME && PG; CR0.PG needs PE
        # kvm_is_valid_sregs (arch/x86/kvm/x86.c)
        cr0, cr4, efer = d["cr0"], d["cr4"], d["efer"]
        if cr0 & (1 << 31) and not cr0 & 1:
            raise OSError(errno.EINVAL, "KVM_SET_SREGS: CR0.PG without CR0.PE")
        if efer & (1 << 8) and cr0 & (1 << 31):
            if not cr4 & (1 << 5) or not efer & (1 << 10):
                raise OSError(errno.EINVAL, "KVM_SET_SREGS: long mode needs CR4.PAE and EFER.LMA")
        elif efer & (1 << 10) or d["cs"]["l"]:
            raise OSError(errno.EINVAL, "KVM_SET_SREGS: EFER.LMA/CS.L without paging")
        self.cpu.set_sregs(d)
        return 0

    def _get_mp_state(self, arg: IoctlArg) -> int:
        return self._out(arg, _U32.pack(K.KVM_MP_STATE_RUNNABLE), "KVM_GET_MP_STATE")

    def _get_vcpu_events(self, arg: IoctlArg) -> int:
        return self._out(arg, _RESET_EVENTS, "KVM_GET_VCPU_EVENTS")

    # -- KVM_RUN ---------------------------------------------------------------------------------
    def _ioctl_run(self, arg: IoctlArg) -> int:
        run = self.run_view
        if run[K.KVM_RUN_IMMEDIATE_EXIT_OFFSET]:
            raise OSError(errno.EINTR, "KVM_RUN: immediate_exit")
        # kvm_set_cr8 from kvm_run (no in-kernel LAPIC)
        self.cpu.cr8 = struct.unpack_from("<Q", run, 16)[0] & 0xF
        response = self._response()
        tid = threading.get_native_id()
        f = self._faulter_cache
        if f is None or f.tid != tid:
            f = self._faulter_cache = Faulter(tid=tid, vcpu=self.vcpu_id, kind="vcpu")
        self.faulter = f
        try:
            while True:
                ex = self.cpu.run(response)
                response = None
                if isinstance(ex, IoExit) and ex.direction == K.KVM_EXIT_IO_OUT:
                    ev = self.vm.ioeventfd_lookup(1, ex.port, ex.size, int.from_bytes(ex.data, "little"))
                    if ev is not None:
                        ev.signal()  # type: ignore[attr-defined]
                        continue
                if isinstance(ex, MmioExit) and ex.is_write:
                    ev = self.vm.ioeventfd_lookup(0, ex.gpa, ex.len, int.from_bytes(ex.data, "little"))
                    if ev is not None:
                        ev.signal()  # type: ignore[attr-defined]
                        continue
                break
        finally:
            self.faulter = None
            if self._iopl_lost:
                self.cpu.and_rflags(~_RFLAGS_IOPL)
        return self._report(ex)

    def _response(self) -> bytes | None:
        p = self._pending
        self._pending = None
        if isinstance(p, IoExit):
            n = p.size * p.count
            return bytes(self.run_view[PIO_OFFSET : PIO_OFFSET + n])
        if isinstance(p, MmioExit):
            return bytes(self.run_view[_EXIT_OFF + 8 : _EXIT_OFF + 8 + p.len])
        return None

    def _header(self, reason: int) -> None:
        rflags, cr8 = self.cpu.rflags_cr8()
        if_flag = 1 if rflags & (1 << 9) else 0
        run = self.run_view
        _U32.pack_into(run, K.KVM_RUN_EXIT_REASON_OFFSET, reason)
        struct.pack_into("<BBHQQ", run, 12, if_flag, if_flag, 0, cr8, self.cpu.apic_base)

    def _report(self, ex: Any) -> int:
        run = self.run_view
        if isinstance(ex, IoExit):
            self._header(K.KVM_EXIT_IO)
            _IO.pack_into(run, _EXIT_OFF, ex.direction, ex.size, ex.port, ex.count, PIO_OFFSET)
            run[PIO_OFFSET : PIO_OFFSET + len(ex.data)] = ex.data
            if ex.direction == K.KVM_EXIT_IO_IN:
                self._pending = ex
            return 0
        if isinstance(ex, MmioExit):
            self._header(K.KVM_EXIT_MMIO)
            _MMIO_HEAD.pack_into(run, _EXIT_OFF, ex.gpa)
            if ex.is_write:
                run[_EXIT_OFF + 8 : _EXIT_OFF + 8 + len(ex.data)] = ex.data
            else:
                self._pending = ex
            _MMIO_TAIL.pack_into(run, _EXIT_OFF + 16, ex.len, 1 if ex.is_write else 0)
            return 0
        if isinstance(ex, HltExit):
            self._header(K.KVM_EXIT_HLT)
            return 0
        if isinstance(ex, ShutdownExit):
            self._header(K.KVM_EXIT_SHUTDOWN)
            if ex.emulation_insn:
                self._emulation_arm(ex.emulation_insn)
            return 0
        if isinstance(ex, InternalErrorExit):
            self._header(K.KVM_EXIT_INTERNAL_ERROR)
            insn = ex.insn_bytes[:15]
            _INTERNAL.pack_into(
                run, _EXIT_OFF, ex.suberror, 8, K.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
                len(insn), insn.ljust(15, b"\0"), *(ex.data or _EMUL_INFO),
            )  # fmt: skip
            return 0
        if isinstance(ex, MemoryFaultExit):
            self._header(K.KVM_EXIT_MEMORY_FAULT)
            _MF.pack_into(run, _EXIT_OFF, ex.flags, ex.gpa, ex.size)
            raise OSError(errno.EFAULT, f"KVM_RUN: memory fault at gpa {ex.gpa:#x}")
        if isinstance(ex, Interrupted):
            self._header(K.KVM_EXIT_INTR)
            raise OSError(errno.EINTR, "KVM_RUN: interrupted")
        raise OSError(errno.EINVAL, f"KVM_RUN: unexpected CPU exit {ex!r}")  # pragma: no cover
