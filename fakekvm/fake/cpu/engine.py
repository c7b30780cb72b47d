"""`X86Cpu`: one x86-64 CPU executing guest code on unicorn, with a pluggable second stage.

What it models: the part of a KVM vCPU below the uAPI — guest execution in real
mode, 32-bit protected mode and long mode, the guest's own paging (walked in
software, :mod:`fakekvm.fake.cpu.paging`), exception delivery through the guest
IDT (:mod:`fakekvm.fake.cpu.interrupts`), and the events that make KVM leave the
guest (``arch/x86/kvm/x86.c: vcpu_enter_guest`` / ``kvm_arch_vcpu_ioctl_run``):
port I/O, MMIO, HLT, triple fault, emulation failure, memory faults.

How it sits on unicorn (facts measured on unicorn 2.1.4):

* ``UC_TLB_VIRTUAL`` + a ``UC_HOOK_TLB_FILL`` hook: on the first touch of a
  linear page the hook walks the guest page tables, asks the second stage
  (``translate(gpa, write, exec_)``, e.g. ``FakeVm.translate``) for the host
  page, and returns (gpa, perms). Guest RAM is each memslot's host memory,
  mapped once with ``mem_map_ptr`` (zero copy). The hook is the first-touch hot
  path: it is registered without a wrapper (:mod:`~fakekvm.fake.cpu.uc_raw`),
  reads CR0/CR3/CR4/EFER/CS in place from QEMU's ``CPUX86State``
  (:mod:`~fakekvm.fake.cpu.envview`) and walks through a paging-structure cache
  validated on every hit (:class:`~fakekvm.fake.cpu.paging.WalkCache`).
* Unicorn never delivers exceptions to the guest: ``UC_HOOK_INTR`` catches them
  and the engine delivers them itself.
* A hook calling ``emu_stop`` stops only at the end of the translation block,
  unless a ``UC_HOOK_CODE`` hook covers the instruction (unicorn then checks the
  exit request before each instruction). So every ``emu_start`` passes a huge
  instruction ``count``: unicorn's own C counting hook gives precise stops right
  after an I/O instruction.
* MMIO: a gpa outside RAM makes the fill fail; the instruction is re-executed
  alone (``count=1``) with that page pointed at a scratch ``mmio_map`` page whose
  callbacks record the access (offset, size, value) or supply the read data.
  The same probe gives the exact CR2 of a guest page fault.
* Hidden segment state (and CR8, kept in ``env->v_tpr``) is written into
  QEMU's CPUX86State through a saved context (:mod:`fakekvm.fake.cpu.layout`,
  :mod:`fakekvm.fake.cpu.state`), because ``uc_reg_write`` cannot.
* Host writes to guest code are invisible to unicorn's translation cache: the
  pages code was translated from are checksummed at each exit and the cache is
  dropped at the next entry if one changed (``coherent_code``).

Module map: :mod:`~fakekvm.fake.cpu.state` (registers),
:mod:`~fakekvm.fake.cpu.memory` (RAM mappings, linear accesses),
:mod:`~fakekvm.fake.cpu.paging` (the walk), :mod:`~fakekvm.fake.cpu.interrupts`
(exception delivery), :mod:`~fakekvm.fake.cpu.decode` (port-I/O decoding),
this module (hooks, the run loop, exits, cross-thread requests).

Threads: ``run()`` is called by one thread; ``kick()``, ``invalidate()`` and
``memslots_changed()`` may be called from any thread (request flags + emu_stop,
like ``kvm_make_request`` + ``kvm_vcpu_kick``).
"""

from __future__ import annotations

import ctypes
import threading
import zlib
from collections.abc import Callable
from typing import Any

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_TLB_VIRTUAL, Uc, UcError
from unicorn.unicorn_const import (
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_WRITE,
    UC_MEM_FETCH,
    UC_MEM_WRITE,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
)
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
)

from fakekvm.fake.cpu import envview, interrupts, paging
from fakekvm.fake.cpu.decode import PioInsn, decode_pio
from fakekvm.fake.cpu.exits import (
    Exit,
    HltExit,
    InternalErrorExit,
    Interrupted,
    IoExit,
    MemoryFaultExit,
    MmioExit,
)
from fakekvm.fake.cpu.memory import (
    KIND_FAULT,
    KIND_MMIO,
    KIND_RAM,
    GuestMemory,
    Translate,
)
from fakekvm.fake.cpu.memory import _PhysError as _PhysError
from fakekvm.fake.cpu.state import (
    _REG_IDS,
    CpuState,
    reset_regs,
    reset_sregs,
)
from fakekvm.fake.cpu.uc_raw import BatchReader, BatchWriter, TlbEntry, hook_tlb_fill

#: where the probe page lives in unicorn's physical space (above any guest gpa)
SCRATCH_PA = (1 << 47) - 0x1000
_UNTIL = 0xFFFF_FFFF_FFFF_F000  # never reached: we stop through hooks and counts
_UNTIL_FILL = (_UNTIL - 1) & ~0xFFF
_COUNT = 1 << 62
_PAGE = 0x1000
_RF = 1 << 16
#: code pages tracked for coherence; beyond this, every run() flushes all translations
_CODE_TRACK_MAX = 64
_I_CR0, _I_CR3, _I_CR4, _I_EFER, _I_CS = envview.I_CR0, envview.I_CR3, envview.I_CR4, envview.I_EFER, envview.I_CS
_ACC_READ, _ACC_WRITE, _ACC_FETCH, _EFER_LMA = paging.ACC_READ, paging.ACC_WRITE, paging.ACC_FETCH, paging.EFER_LMA

class _Probe:
    """State of a one-instruction probe through the scratch MMIO page."""

    __slots__ = ("buf", "log", "reply", "vpage")

    def __init__(self, vpage: int, reply: bytes | None) -> None:
        self.vpage = vpage
        self.reply = reply
        self.buf = bytearray(_PAGE + 8)  # what the scratch page reads as
        self.log: list[tuple[bool, int, int, int]] = []  # (is_write, offset, size, value)


class X86Cpu(CpuState, GuestMemory):
    """One x86 CPU. See the module docstring."""

    def __init__(self, translate: Translate, *, apic_base: int = 0xFEE00900, pvm_emulation: bool = True) -> None:
        self.translate = translate
        #: reproduce PVM's ring-0 emulator (see fakekvm.fake.cpu.interrupts)
        self.pvm_emulation = pvm_emulation
        #: called with the instruction bytes when PVM would leave emulation-failure
        #: data in kvm_run without exiting (a ring-0 #UD)
        self.on_emulation_arm: Callable[[bytes], None] | None = None
        #: see host writes to guest code between runs, as a real CPU does (checksums
        #: of the code pages at each exit/entry); False trades that for faster exits
        self.coherent_code = True
        self._code_pages: set[int] = set()  # gpa pages code was translated from (bounded)
        self._code_sums: dict[int, int] = {}
        self._code_overflow = False
        # typed Any: the binding's stubs lack the x86 subclass's ctl_* methods
        uc: Any = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        self.uc: Any = uc
        # every hook is installed before the first instruction is translated
        self._tlb_keep = hook_tlb_fill(uc, self._tlb_fill)
        uc.hook_add(UC_HOOK_INSN, self._hook_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._hook_in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INTR, self._hook_intr)
        uc.mmio_map(SCRATCH_PA, _PAGE, self._mmio_read, None, self._mmio_write, None)
        self._regs_r = BatchReader(uc, _REG_IDS)
        self._regs_w = BatchWriter(uc, _REG_IDS)
        self._mode_r = BatchReader(uc, (UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CR4, UC_X86_REG_CS))
        #: QEMU's live CPUX86State: the fill hook reads CR0/3/4, EFER and CS from it in place
        self._env = envview.env_view(uc)
        self._rip_r = BatchReader(uc, (UC_X86_REG_RIP,))
        self._hdr_r = BatchReader(uc, (UC_X86_REG_RFLAGS,))
        # guest RAM mapped into unicorn: slot base gpa -> (size, hva)
        self._mapped: dict[int, tuple[int, int]] = {}
        self._slots_sorted: list[tuple[int, int, int]] = []
        self._views: dict[int, tuple[memoryview, memoryview, memoryview]] = {}  # PT page -> u64/u32/u8 views
        self._pt_ok: set[int] = set()  # page-table pages translated for read
        self._pt_w_ok: set[int] = set()  # ... and for write (A/D updates dirty-logged)
        # 4-level walks through a validated paging-structure cache (holds _views' views:
        # cleared with them)
        self._walker = paging.WalkCache(self._table64, self._set_pte_bits)
        self._walk64 = self._walker.walk
        self._efer_cache = (-1, -1, 0)  # (cr0, cr4) -> efer
        self._unmapping = False
        self._rf_pending = False
        self._ins_continues: int | None = None
        # cross-thread requests
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._in_emu = False
        self._in_hook = False  # the vCPU thread is inside a hook that may block
        self._emu_thread = 0  # threading.get_ident() of the thread in emu_start
        self._kick = False
        self._req_remap = False
        self._req_flush = False
        self._stop_gen = 0
        # per-run state set by hooks
        self._reason: str | None = None
        self._fault: Any = None
        self._io: Any = None
        self._probe: _Probe | None = None
        self._pending: tuple[Any, ...] | None = None
        self.apic_base = apic_base
        self._sregs_shadow: dict[str, dict[str, int]] = {}
        self.set_regs(reset_regs())
        self.set_sregs(reset_sregs(apic_base))
        #: number of TLB fills served (for measurements)
        self.tlb_fills = 0

    # ------------------------------------------------------------------ hooks
    def _tlb_fill(self, _uc: int, vaddr: int, mtype: int, entry_p: ctypes._Pointer[TlbEntry], _ud: int) -> bool:
        """UC_HOOK_TLB_FILL, called straight from C (uc_cb_tlbevent_t): fill ``entry_p`` or return False."""
        if self._unmapping:
            # mem_unmap invalidates the TBs of the range and asks for the
            # translation of its (physical) pages: answer identity
            entry = entry_p.contents
            entry.paddr = vaddr
            entry.perms = UC_PROT_ALL
            return True
        if vaddr == _UNTIL_FILL:
            # unicorn invalidates the TB at the `until` address around each
            # emu_start; that lookup is not a guest access
            entry = entry_p.contents
            entry.paddr = SCRATCH_PA
            entry.perms = UC_PROT_READ | UC_PROT_EXEC
            return True
        self.tlb_fills += 1
        if self._reason is not None:
            # an exit is already decided (emu_stop pending); touch nothing more
            return False
        write = mtype == UC_MEM_WRITE
        fetch = mtype == UC_MEM_FETCH
        probe = self._probe
        if probe is not None and probe.vpage == vaddr:
            entry = entry_p.contents
            entry.paddr = SCRATCH_PA
            entry.perms = UC_PROT_READ | UC_PROT_WRITE
            return True
        # the walk and translate may block (userfaultfd, mmu_lock): `_request` must know
        self._in_hook = True
        try:
            env = self._env
            cr0 = env[_I_CR0]
            try:
                if cr0 & 0x8000_0000:
                    efer = env[_I_EFER]
                    access = _ACC_WRITE if write else (_ACC_FETCH if fetch else _ACC_READ)
                    if efer & _EFER_LMA:
                        gpa, prot = self._walk64(
                            vaddr, access, (env[_I_CS] & 3) == 3, cr0, env[_I_CR3], env[_I_CR4], efer
                        )
                    else:
                        gpa, prot = paging.walk(
                            vaddr, access, (env[_I_CS] & 3) == 3, cr0, env[_I_CR3], env[_I_CR4], efer,
                            self._read_pte, self._set_pte_bits,
                        )  # fmt: skip
                else:
                    gpa, prot = vaddr, 7
            except paging.PageFault as pf:
                self._reason = "pf"
                self._fault = (vaddr, pf.error_code, fetch)
                return False
            except _PhysError as e:
                t = e.translation
                if t is not None and t.kind == KIND_FAULT:
                    # the walk's own read of a page-table page took a stage-2 fault
                    # (KVM Userfault bit, private/shared mismatch): KVM exits with that
                    # page's gpa, as for any other access the vCPU makes
                    self._reason = "memfault"
                    self._fault = (e.gpa, t.fault_flags)
                else:
                    self._reason = "phys"
                    self._fault = e
                return False
            t = self.translate(gpa, write, fetch)
            kind = t.kind
            if kind == KIND_RAM:
                m = self._mapped.get(t.slot_base_gpa)
                if m is None or m[1] != t.slot_hva or m[0] != t.slot_size:
                    self._ensure_mapped(t)
                perms = UC_PROT_READ
                if fetch and prot & 4:
                    # execute permission only from a fetch fill, so every page code
                    # is translated from passes here and is tracked for coherence
                    perms |= UC_PROT_EXEC
                    pages = self._code_pages
                    if gpa not in pages:
                        if len(pages) >= _CODE_TRACK_MAX:
                            self._code_overflow = True
                        else:
                            pages.add(gpa)
                if prot & 2 and t.writable:
                    perms |= UC_PROT_WRITE
                entry = entry_p.contents
                entry.paddr = gpa
                entry.perms = perms
                return True
            if kind == KIND_MMIO:
                self._reason = "fetch_mmio" if fetch else "mmio"
                self._fault = (vaddr, gpa)
            else:
                self._reason = "memfault"
                self._fault = (gpa, t.fault_flags)
            return False
        finally:
            self._in_hook = False
            if self._kick:
                # a kick that landed while this hook ran (`_request` stopped retrying because
                # the hook may block): stop from the vCPU's own thread, which cannot be lost
                self.uc.emu_stop()

    def _hook_out(self, uc: Uc, port: int, size: int, value: int, _ud: Any) -> None:
        if self._probe is not None:
            return
        vals = self._regs_r.read()
        self._reason = "out"
        self._io = (port, size, value, vals[16], vals[2], vals[4], vals[17])
        uc.emu_stop()

    def _hook_in(self, uc: Uc, port: int, size: int, _ud: Any) -> int:
        self._in_hook = True  # decoding reads guest memory: may block like a fill
        try:
            return self._hook_in_body(uc, port, size)
        finally:
            self._in_hook = False
            if self._kick:
                uc.emu_stop()  # see `_tlb_fill`

    def _hook_in_body(self, uc: Uc, port: int, size: int) -> int:
        vals = self._regs_r.read()
        rip = vals[16]
        insn = self._decode_pio(rip)
        # Return what is already there so the instruction changes nothing; the
        # real value is written on re-entry, when userspace has supplied it.
        cur = 0
        if insn is not None and insn.string:
            try:
                cur = int.from_bytes(self.read_linear(self._es_rdi(insn), size, peek=True), "little")
            except (paging.PageFault, _PhysError):
                cur = 0
        else:
            cur = vals[0] & ((1 << (8 * size)) - 1)
        if self._probe is None:
            self._reason = "in"
            self._io = (port, size, insn, rip, vals[2], vals[5], vals[17])
            uc.emu_stop()
        return cur

    def _hook_intr(self, uc: Uc, intno: int, _ud: Any) -> None:
        self._reason = "intr"
        self._fault = (intno, self._rip_r.read()[0])
        uc.emu_stop()

    def _mmio_read(self, uc: Uc, offset: int, size: int, _ud: Any) -> int:
        # unicorn splits unaligned accesses into aligned pieces: serve each piece
        # from the buffer the exact-access hook filled
        p = self._probe
        if p is None:
            return 0
        return int.from_bytes(p.buf[offset : offset + size], "little")

    def _mmio_write(self, uc: Uc, offset: int, size: int, value: int, _ud: Any) -> None:
        pass  # recorded, unsplit, by _probe_mem_hook

    def _probe_mem_hook(self, uc: Uc, access: int, address: int, size: int, value: int, _ud: Any) -> None:
        p = self._probe
        # unicorn reports accesses to an MMIO region by physical address
        if p is None or (address & ~0xFFF) not in (p.vpage, SCRATCH_PA):
            return
        off = address & 0xFFF
        if access == UC_MEM_WRITE:
            p.log.append((True, off, size, value & ((1 << (8 * size)) - 1)))
            return
        if p.reply is not None:
            p.buf[off : off + size] = p.reply[:size].ljust(size, b"\0")
            p.reply = None
        else:
            p.log.append((False, off, size, 0))

    # ------------------------------------------------------------------ helpers
    def _decode_pio(self, rip: int) -> PioInsn | None:
        cs_base = self.segment("cs")[1]
        size = self.code_size()
        try:
            code = self.read_linear(cs_base + rip if size != 8 else rip, 15, fetch=True, peek=True)
        except (paging.PageFault, _PhysError):
            return None
        return decode_pio(code, size, size == 8)

    def _es_rdi(self, insn: PioInsn) -> int:
        rdi = self._regs_r.read()[5]
        mask = (1 << (8 * insn.addr_size)) - 1
        es_base = 0 if self.code_size() == 8 else self.segment("es")[1]
        return es_base + (rdi & mask)

    def and_rflags(self, mask: int) -> None:
        """``rflags &= mask`` between runs (a profile's exit-time quirk: PVM drops IOPL)."""
        r = self.uc.reg_read(UC_X86_REG_RFLAGS)
        if r & ~mask:
            self.uc.reg_write(UC_X86_REG_RFLAGS, r & mask)

    # ------------------------------------------------------------------ requests
    def kick(self) -> None:
        """Make a running (or the next) ``run()`` return :class:`Interrupted`."""
        self._request("kick")

    def memslots_changed(self) -> None:
        """Drop every RAM mapping; re-established from translate() on next touch."""
        self._request("remap")

    def invalidate(self, gpa_start: int, gpa_end: int) -> None:
        """Forget translations of [gpa_start, gpa_end); returns once the CPU cannot use them."""
        self._request("flush")

    def _request(self, what: str) -> None:
        with self._cond:
            if what == "kick":
                self._kick = True
            else:
                if what == "remap":
                    self._req_remap = True
                self._req_flush = True
            if not self._in_emu:
                return
            if threading.get_ident() == self._emu_thread:
                self.uc.emu_stop()  # from the vCPU's own hook: emulation is running
                return
            gen = self._stop_gen
            while self._in_emu and self._stop_gen == gen:
                # emu_stop is lost if it lands before emu_start has started emulating
                # (unicorn resets its stop flags there): retry until the vCPU has left
                # emu_start. The vCPU cannot leave it without this lock, which the wait
                # releases. If the vCPU is inside a hook (possibly waiting for a lock
                # the caller holds: translate -> mmu_lock), emulation is running, so
                # this emu_stop is registered and takes effect when the hook returns,
                # before the next guest instruction (the count hook checks it per insn).
                in_hook = self._in_hook
                self.uc.emu_stop()
                if in_hook:
                    break
                self._cond.wait(0.001)

    def _service_requests(self) -> None:
        """Called with the lock held, between emu_start calls."""
        if self._req_remap:
            self._req_remap = False
            self._unmap_all()
        if self._req_flush:
            self._req_flush = False
            # the pages may come back with other contents (MADV_DONTNEED + UFFDIO_COPY):
            # translated code is keyed by guest-physical address, so drop it too
            self.uc.ctl_flush_tb()
            self._views.clear()
            self._walker.clear()
            self._pt_ok.clear()
            self._pt_w_ok.clear()
            self._flush_tlb()

    # ------------------------------------------------------------------ run
    def _emu(self, count: int = _COUNT) -> int:
        """One emu_start from the current rip; returns the unicorn error (0 = clean stop)."""
        rip = self._rip_r.read()[0]
        err = 0
        with self._cond:
            self._service_requests()
            self._in_emu = True
            self._emu_thread = threading.get_ident()
        try:
            self.uc.emu_start(rip, _UNTIL, 0, count)
        except UcError as e:
            err = e.errno
        finally:
            with self._cond:
                self._in_emu = False
                self._stop_gen += 1
                self._cond.notify_all()
        return err

    def run(self, response: bytes | None = None) -> Exit:
        """Run until the next exit. ``response``: IN data / MMIO read data for the pending exit."""
        if self.coherent_code:
            self._check_code()
        ex = self._run(response)
        if self.coherent_code:
            self._snapshot_code()
        return ex

    # Unicorn cannot see writes made through the host mapping, so code the host
    # rewrote between two runs would keep running from stale translations. The
    # pages code was translated from are tracked (fetch fills) and checksummed at
    # each exit; a changed page at the next entry drops the translation cache.
    def _code_digest(self, page: int) -> int:
        slot = self._slot_of(page)
        if slot is None:
            return -1
        return zlib.crc32((ctypes.c_char * _PAGE).from_address(slot[2] + (page - slot[0])))

    def _check_code(self) -> None:
        if self._code_overflow or any(self._code_digest(p) != d for p, d in self._code_sums.items()):
            self.uc.ctl_flush_tb()
            self._code_pages.clear()
            self._code_sums = {}
            self._code_overflow = False

    def _snapshot_code(self) -> None:
        if not self._code_overflow:
            self._code_sums = {p: self._code_digest(p) for p in self._code_pages}

    def _run(self, response: bytes | None) -> Exit:
        pending = self._pending
        self._pending = None
        if self._rf_pending:
            self._rf_pending = False
            self.uc.reg_write(UC_X86_REG_RFLAGS, self._regs_r.read()[17] & ~_RF)
        if pending is not None:
            ex = self._complete(pending, response or b"")
            if ex is not None:
                return ex
        while True:
            with self._cond:
                if self._kick:
                    self._kick = False
                    return Interrupted()
            self._reason = None
            err = self._emu()
            reason = self._reason
            if reason is None:
                with self._cond:
                    if self._kick:
                        self._kick = False
                        return Interrupted()
                if err == UC_ERR_INSN_INVALID:
                    ex = self._exception(interrupts.UD, None)
                    if ex is not None:
                        return ex
                    continue
                if err == 0 and self._after_hlt():
                    return HltExit()
                continue  # a request stopped us; serviced on the next _emu
            ex = self._dispatch(reason, err)
            if ex is not None:
                return ex

    def _after_hlt(self) -> bool:
        rip = self._rip_r.read()[0]
        size = self.code_size()
        lin = rip if size == 8 else self.segment("cs")[1] + rip
        try:
            return self.read_linear(lin - 1, 1, fetch=True, peek=True) == b"\xf4"
        except (paging.PageFault, _PhysError):
            return False

    def _dispatch(self, reason: str, err: int) -> Exit | None:
        if reason == "out":
            port, size, value, rip, rcx, rsi, rflags = self._io
            after = self._regs_r.read()
            # only OUTS moves RSI: decode (slow: walks and reads the code) just then
            insn = self._decode_pio(rip) if after[4] != rsi else None
            if insn is not None and insn.string:
                # KVM (emulate.c em_out) exits once per element; registers are
                # those after the element, rip stays on a rep instruction.
                mask = (1 << (8 * insn.addr_size)) - 1
                df = -1 if rflags & (1 << 10) else 1
                self._set_gpr(4, (rsi & ~mask) | ((rsi + df * size) & mask))
                if insn.rep:
                    self._set_gpr(2, (rcx & ~mask) | ((rcx - 1) & mask))
                    self._set_rip(rip)
                    # interrupted mid-instruction: KVM reports RFLAGS.RF set
                    self.uc.reg_write(UC_X86_REG_RFLAGS, rflags | _RF)
                    self._rf_pending = True
                else:
                    self._set_rip(rip + insn.length)
            return IoExit(1, size, port, 1, value.to_bytes(size, "little"))
        if reason == "in":
            port, size, insn, rip, rcx, rdi, rflags = self._io
            if insn is not None and insn.string:
                # back to the state before the instruction: KVM reports the batch
                # with rcx/rdi untouched and completes it on re-entry
                mask = (1 << (8 * insn.addr_size)) - 1
                df = -1 if rflags & (1 << 10) else 1
                self._set_gpr(5, rdi)
                self._set_gpr(2, rcx)
                self._set_rip(rip)
                if self._ins_continues == rip:
                    # a later batch of a started rep ins: RF set, as KVM reports it
                    self.uc.reg_write(UC_X86_REG_RFLAGS, rflags | _RF)
                    self._rf_pending = True
                self._ins_continues = None
                count = 1
                if insn.rep:
                    off = rdi & 0xFFF
                    in_page = off + 1 if df < 0 else _PAGE - off  # bytes, compared with items (KVM quirk)
                    count = max(1, min(in_page, 1024 // size, rcx & mask))
                self._pending = ("ins", port, size, insn, rip, count)
                return IoExit(0, size, port, count, bytes(size * count))
            self._set_rip(rip)
            length = insn.length if insn is not None else 1
            self._pending = ("in", port, size, rip, length)
            return IoExit(0, size, port, 1, bytes(size))
        if reason in ("mmio", "pf"):
            return self._probe_fault(reason)
        if reason == "fetch_mmio":
            return InternalErrorExit(1, b"", ())
        if reason == "memfault":
            gpa, flags = self._fault
            return MemoryFaultExit(gpa & ~0xFFF, _PAGE, flags)
        if reason == "phys":
            return InternalErrorExit(1, self.fetch_insn_bytes(), ())
        if reason == "intr":
            intno, rip = self._fault
            return self._exception(intno, rip)
        return None

    def _set_rip(self, rip: int) -> None:
        self.uc.reg_write(UC_X86_REG_RIP, rip)

    def _set_gpr(self, idx: int, v: int) -> None:
        self.uc.reg_write(_REG_IDS[idx], v & 0xFFFF_FFFF_FFFF_FFFF)

    def _run_probe(self, vpage: int, reply: bytes | None) -> tuple[_Probe, int]:
        """Execute exactly one instruction with ``vpage`` pointed at the scratch MMIO page.

        A memory hook (exact address and size, unlike the MMIO callbacks, which
        see unaligned accesses split) is added for this instruction only; the
        translation cache is flushed around it so no other code pays for it.
        """
        uc = self.uc
        self._probe = _Probe(vpage, reply)
        self._reason = None
        h = uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._probe_mem_hook)
        uc.ctl_flush_tb()
        self._flush_tlb()
        try:
            err = self._emu(1)
        finally:
            p = self._probe
            self._probe = None
            uc.hook_del(h)
            uc.ctl_flush_tb()
            self._flush_tlb()
        return p, err

    def _probe_fault(self, reason: str) -> Exit | None:
        if reason == "pf":
            vpage, code, fetch = self._fault
            if fetch:
                rip = self._rip_r.read()[0]
                cs_base = 0 if self.code_size() == 8 else self.segment("cs")[1]
                lin = cs_base + rip
                cr2 = lin if lin & ~0xFFF == vpage else vpage
            else:
                ctx = self.uc.context_save()
                p, _err = self._run_probe(vpage, None)
                self.uc.context_restore(ctx)
                cr2 = vpage + p.log[0][1] if p.log else vpage
            self.uc.reg_write(UC_X86_REG_CR2, cr2)
            return self._exception(interrupts.PF, None, error_code=code)
        vpage, gpa_page = self._fault
        ctx = self.uc.context_save()
        p, _err = self._run_probe(vpage, None)
        if not p.log:
            self.uc.context_restore(ctx)
            return None
        is_write, off, size, value = p.log[0]
        if is_write:
            return MmioExit(gpa_page + off, size, True, value.to_bytes(size, "little"))
        self.uc.context_restore(ctx)
        self._pending = ("mmio", vpage, gpa_page + off, size)
        return MmioExit(gpa_page + off, size, False, b"")

    def _complete(self, pending: tuple[Any, ...], data: bytes) -> Exit | None:
        kind = pending[0]
        if kind == "in":
            _k, _port, size, rip, length = pending
            val = int.from_bytes(data[:size].ljust(size, b"\0"), "little")
            rax = self._regs_r.read()[0]
            # a 32-bit IN zero-extends into RAX; 8/16-bit ones keep the upper bits
            rax = val if size == 4 else (rax & ~((1 << (8 * size)) - 1)) | val
            self._set_gpr(0, rax)
            self._set_rip(rip + length)
            return None
        if kind == "ins":
            _k, _port, size, insn, rip, count = pending
            vals = self._regs_r.read()
            mask = (1 << (8 * insn.addr_size)) - 1
            df = -1 if vals[17] & (1 << 10) else 1
            rdi, rcx = vals[5], vals[2]
            es_base = 0 if self.code_size() == 8 else self.segment("es")[1]
            for i in range(count):
                item = data[i * size : (i + 1) * size].ljust(size, b"\0")
                self.write_linear(es_base + (rdi & mask), item)
                rdi = (rdi & ~mask) | ((rdi + df * size) & mask)
            self._set_gpr(5, rdi)
            if insn.rep:
                rcx = (rcx & ~mask) | ((rcx - count) & mask)
                self._set_gpr(2, rcx)
                if rcx & mask == 0:
                    self._set_rip(rip + insn.length)
                else:
                    self._ins_continues = rip
            else:
                self._set_rip(rip + insn.length)
            return None
        if kind == "mmio":
            _k, vpage, gpa, size = pending
            ctx = self.uc.context_save()
            p, err = self._run_probe(vpage, data[:size])
            if p.log and p.log[0][0]:
                _w, off, wsize, value = p.log[0]
                return MmioExit((gpa & ~0xFFF) + off, wsize, True, value.to_bytes(wsize, "little"))
            if err and self._reason not in (None, "intr"):
                self.uc.context_restore(ctx)
            return None
        return None

    def _exception(self, vector: int, rip: int | None, error_code: int | None = None) -> Exit | None:
        """Deliver an exception/interrupt the guest raised; None to continue, or the exit."""
        return interrupts.deliver(self, vector, rip, error_code)

