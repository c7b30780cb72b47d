"""KVM Userfault (fake side) -- *** NOT UPSTREAM: no released kernel has any of this. ***

Two designs by James Houghton (uapi.md §3), each on its own profile:

**v3** (profile ``6.18+kvm-userfault``; "[PATCH v3 00/15] KVM: Introduce KVM
Userfault", lore ``20250618042424.330664-1-jthoughton@google.com``, patches 04
and 15):

* memslot flag ``KVM_MEM_USERFAULT`` (1<<3) with ``userfault_bitmap`` (offset
  48 of ``kvm_userspace_memory_region2``): a user array of ``unsigned long``,
  bit i <-> gfn ``base_gfn + i``. `check_region` is the set-time check:
  EINVAL unless the pointer passes ``access_ok`` for
  ``ceil(npages / 64) * 8`` bytes. The fake is stricter than v3, as its brief
  asks: the bytes must also be readable now (``process_vm_readv``); v3 itself
  would accept an unmapped in-range pointer and fail the fault later.
  On x86 without LAM ``untagged_addr`` is the identity, so there is no tag check.
* `check` reads the USER's bitmap word live on every vCPU fault
  (``kvm_do_userfault`` -> ``__get_user``): the VMM clears bits with plain
  stores, nothing is cached. An unreadable word makes v3's KVM_RUN fail with a
  bare EFAULT (`check` raises ``OSError(EFAULT)``); the translate hook
  (`fakekvm.fake.kvm.private.resolve`) reports it as a flags-0 memory-fault
  exit instead, because an exception cannot leave unicorn's TLB-fill hook.
* `userfault_exit`: bit set -> ``KVM_EXIT_MEMORY_FAULT`` with flags
  ``KVM_MEMORY_EXIT_FLAG_USERFAULT`` (| ``PRIVATE`` for a private access), the
  page's gpa, size 4096, and KVM_RUN returns -1/EFAULT. Clearing the bit and
  re-entering proceeds. It runs after the private/shared mismatch check and
  only for accesses that hit a memslot (``__kvm_mmu_faultin_pfn``).
* Only faults are intercepted: a page KVM has already mapped is not affected by
  setting its bit until the flag is toggled off and on; turning the flag on
  drops every translation of the slot (`on_flags_change`, v3's
  ``kvm_arch_userfault_enabled``). Non-vCPU (KVM-internal) accesses are not
  intercepted at all (the cover letter leaves them to userfaultfd).

**RFC** (profile ``6.10-rfc-userfault``; "[RFC PATCH 00/18] KVM: Post-copy
live migration for guest_memfd", lore ``20240710234222.2333120-1-jthoughton@google.com``):

* ``KVM_ENABLE_CAP(KVM_CAP_USERFAULT = 236)``: ``flags`` must be 0;
  ``args[0]`` exactly one of ``KVM_USERFAULT_ENABLE``/``KVM_USERFAULT_DISABLE``
  (else EINVAL); ``args[1]`` an eventfd for asynchronous userfaults (EBADF /
  EINVAL as ``eventfd_ctx_fdget``); enabling twice -> EEXIST. Disabling while
  disabled is accepted (inferred; the RFC text does not say).
* ``KVM_MEMORY_ATTRIBUTE_USERFAULT`` (1<<4) is set and cleared with
  ``KVM_SET_MEMORY_ATTRIBUTES`` and is supported only while enabled
  (`fakekvm.fake.kvm.private.supported_attributes`).
* a vCPU fault on such a gfn exits like v3 (flags USERFAULT | PRIVATE).
* "asynchronous userfaults" -- accesses KVM cannot unwind to userspace (in the
  fake: its own emulator's accesses) -- `async_userfault`: queue the gfn,
  signal the eventfd, and wait (through `fakekvm.fake.waits`, where the RFC
  busy-waits) until the attribute is cleared or userfault is disabled.
* ``KVM_READ_USERFAULT`` pops a queued gfn into ``kvm_fault.address``;
  ENOENT when the queue is empty. A gfn is queued once while it waits.

Handlers for the VM's dispatch have the shape ``(vm, request, arg) -> int``;
per-access checks are pure functions the translate path calls.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import struct
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fakekvm.abi import mman
from fakekvm.fake.kvm.private import (
    KVM_MEMORY_ATTRIBUTE_USERFAULT,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_USERFAULT,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    MemoryFault,
)
from fakekvm.fake.mm.vma import VmaKind
from fakekvm.fake.waits import WaitQueue
from fakekvm.kernel.real import _libc

if TYPE_CHECKING:
    from fakekvm.kernel.seam import IoctlArg

KVM_MEM_USERFAULT = 1 << 3
KVM_USERFAULT_ENABLE = 1 << 0
KVM_USERFAULT_DISABLE = 1 << 1
#: x86-64 TASK_SIZE_MAX (4-level paging): access_ok's limit
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE

_ENABLE_CAP = struct.Struct("<II4Q64x")
_KVM_FAULT = struct.Struct("<Q")


# ---------------------------------------------------------------------------------------------
# v3: the memslot bitmap
# ---------------------------------------------------------------------------------------------
def bitmap_bytes(npages: int) -> int:
    """``DIV_ROUND_UP(npages, BITS_PER_LONG) * sizeof(long)``."""
    return (npages + 63) // 64 * 8


def _read(address: int, n: int) -> bytes:
    from fakekvm.fake.mm.hostmem import safe_copy_from

    return safe_copy_from(address, n)


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _WordReader(threading.local):
    """A per-thread ``process_vm_readv`` of 8 bytes with its structures built once."""

    def __init__(self) -> None:
        self.buf = ctypes.c_uint64()
        self.liov = _iovec(ctypes.addressof(self.buf), 8)
        self.riov = _iovec(0, 8)
        self.lref = ctypes.byref(self.liov)
        self.rref = ctypes.byref(self.riov)


_reader = _WordReader()
_NR_process_vm_readv = ctypes.c_long(310)
_ONE = ctypes.c_ulong(1)
_ZERO = ctypes.c_ulong(0)


def read_user_u64(address: int, mm: Any = None) -> int:
    """``__get_user`` of a u64: ``OSError(EFAULT)`` if unreadable, never a crash.

    Fast path: ``address`` in a readable anonymous VMA of the fake mm ``mm`` is
    read directly, holding the mm lock so the VMA cannot go away meanwhile.
    Otherwise one ``process_vm_readv`` on our own pid.
    """
    if mm is not None and mm.lock.acquire(blocking=False):
        try:
            v = mm.find_vma(address)
            if (
                v is not None and v.kind == VmaKind.ANON and v.prot & mman.PROT_READ
                and address + 8 <= v.end
            ):
                return ctypes.c_uint64.from_address(address).value
        finally:
            mm.lock.release()
    r = _reader
    r.riov.iov_base = address
    n = _libc.syscall(_NR_process_vm_readv, ctypes.c_long(os.getpid()), r.lref, _ONE, r.rref, _ONE, _ZERO)
    if n != 8:
        raise OSError(errno.EFAULT, f"bad user address {address:#x}")
    return r.buf.value


def check_region(flags: int, memory_size: int, userfault_bitmap: int) -> None:
    """KVM_SET_USER_MEMORY_REGION2's userfault_bitmap check (EINVAL); no-op without the flag.

    v3 does what ``access_ok()`` does: the range ``[bitmap, bitmap + ceil(npages/64)*8)``
    must be a user address range (untagged, below TASK_SIZE_MAX). Like the patch it
    does not read the bitmap: an unmapped bitmap shows at fault time, as KVM_RUN's EFAULT.
    """
    if not flags & KVM_MEM_USERFAULT or memory_size == 0:
        return
    n = bitmap_bytes(memory_size >> PAGE_SHIFT)
    what = "KVM_SET_USER_MEMORY_REGION2"
    if userfault_bitmap >> 56 or userfault_bitmap + n > TASK_SIZE_MAX:
        raise OSError(errno.EINVAL, f"{what}: userfault_bitmap {userfault_bitmap:#x} is not a user range")


def check(slot: Any, gfn: int, mm: Any = None) -> bool:
    """Is ``gfn``'s bit set in the slot's userfault bitmap? Reads the user's word now.

    Raises ``OSError(EFAULT)`` if the word is unreadable (KVM_RUN then fails
    EFAULT with no memory-fault exit). ``mm``: the fake mm, for the fast path.
    """
    rel = gfn - slot.base_gfn
    addr = slot.userfault_bitmap + (rel >> 6) * 8
    try:
        word = read_user_u64(addr, mm)
    except OSError:
        raise OSError(errno.EFAULT, f"KVM_RUN: userfault_bitmap word at {addr:#x} unreadable") from None
    return bool(word >> (rel & 63) & 1)


def userfault_exit(slot: Any, gpa: int, private: bool, mm: Any = None) -> MemoryFault | None:
    """v3's vCPU-fault check: the memory-fault exit to report, or None to go on."""
    if slot is None or not slot.flags & KVM_MEM_USERFAULT:
        return None
    if not check(slot, gpa >> PAGE_SHIFT, mm):
        return None
    flags = KVM_MEMORY_EXIT_FLAG_USERFAULT | (KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0)
    return MemoryFault(flags, gpa & PAGE_MASK, PAGE_SIZE)


def enabling(old_flags: int, new_flags: int) -> bool:
    """Does this flags change turn KVM_MEM_USERFAULT on (so the slot's translations go)?"""
    return bool(new_flags & KVM_MEM_USERFAULT and not old_flags & KVM_MEM_USERFAULT)


def on_flags_change(vm: Any, old: Any, new: Any) -> None:
    """kvm_arch_userfault_enabled: drop every translation of the slot when the flag goes on."""
    if old is not None and new is not None and enabling(old.flags, new.flags):
        from fakekvm.fake.gmem import invalidate_guest

        invalidate_guest(vm, new.base_gfn << PAGE_SHIFT, (new.base_gfn + new.npages) << PAGE_SHIFT)


# ---------------------------------------------------------------------------------------------
# RFC: enable cap, attribute, READ_USERFAULT, asynchronous userfaults
# ---------------------------------------------------------------------------------------------
@dataclass
class RfcState:
    """Per-VM RFC userfault state."""

    enabled: bool = False
    eventfd: Any = None  # the FakeEventfd from args[1] (a reference is held)
    queue: collections.deque[int] = field(default_factory=collections.deque)
    queued: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    wq: WaitQueue | None = None


_states: weakref.WeakKeyDictionary[Any, RfcState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def rfc_state(vm: Any) -> RfcState:
    st = _states.get(vm)
    if st is None:
        with _states_lock:
            st = _states.get(vm)
            if st is None:
                domain = getattr(getattr(vm, "kernel", None), "waits", None)
                st = RfcState(wq=WaitQueue(domain, name="kvm-userfault"))
                _states[vm] = st
    return st


def rfc_enabled(vm: Any) -> bool:
    st = _states.get(vm)
    return st is not None and st.enabled


def _is_rfc(vm: Any) -> bool:
    return getattr(getattr(vm, "profile", None), "userfault_variant", None) == "rfc"


def _read_arg(vm: Any, arg: IoctlArg, n: int, what: str) -> bytes:
    from fakekvm.fake.kvm.vm import read_arg

    return read_arg(vm.kernel, arg, n, what)


def _eventfd(vm: Any, fd: int) -> Any:
    kernel = vm.kernel
    getter = getattr(kernel, "eventfd_ctx", None)
    if getter is not None:
        return getter(fd)
    from fakekvm.fake.kvm.vm import fget

    f = fget(kernel, fd, "KVM_ENABLE_CAP")
    if getattr(f, "kind", None) != "eventfd":
        raise OSError(errno.EINVAL, f"KVM_ENABLE_CAP: fd {fd} is not an eventfd")
    return f


def enable_cap(vm: Any, request: int, arg: IoctlArg) -> int:
    """``KVM_ENABLE_CAP(KVM_CAP_USERFAULT)`` of the RFC (the VM routes that cap here)."""
    what = "KVM_ENABLE_CAP"
    cap, flags, a0, a1, _a2, _a3 = _ENABLE_CAP.unpack(_read_arg(vm, arg, _ENABLE_CAP.size, what))
    prof = getattr(vm, "profile", None)
    if not _is_rfc(vm) or cap != getattr(prof, "userfault_cap", None):
        raise OSError(errno.EINVAL, f"{what}: cap {cap} is not KVM_CAP_USERFAULT here")
    if flags:
        raise OSError(errno.EINVAL, f"{what}: KVM_CAP_USERFAULT flags must be 0")
    if a0 not in (KVM_USERFAULT_ENABLE, KVM_USERFAULT_DISABLE):
        raise OSError(errno.EINVAL, f"{what}: args[0] must be exactly one of ENABLE/DISABLE")
    st = rfc_state(vm)
    if a0 == KVM_USERFAULT_ENABLE:
        fd = a1 - (1 << 64) if a1 >= 1 << 63 else a1
        if fd < 0 or fd >= 1 << 31:
            raise OSError(errno.EBADF, f"{what}: bad eventfd {fd}")
        ev = _eventfd(vm, int(fd))
        with st.lock:
            if st.enabled:
                raise OSError(errno.EEXIST, f"{what}: userfault already enabled")
            ev.get()
            st.eventfd = ev
            st.enabled = True
        return 0
    with st.lock:
        old, st.eventfd = st.eventfd, None
        st.enabled = False
        st.queue.clear()
        st.queued.clear()
    if old is not None:
        old.put()
    _wake(st)
    return 0


def read_userfault(vm: Any, request: int, arg: IoctlArg) -> int:
    """``KVM_READ_USERFAULT``: pop one queued gfn into ``kvm_fault.address``; ENOENT if none."""
    what = "KVM_READ_USERFAULT"
    if not _is_rfc(vm):
        raise OSError(errno.ENOTTY, f"kvm-vm: inappropriate ioctl {request:#x}")
    st = rfc_state(vm)
    with st.lock:
        if not st.queue:
            raise OSError(errno.ENOENT, f"{what}: no asynchronous userfault pending")
        gfn = st.queue.popleft()
        st.queued.discard(gfn)
    data = _KVM_FAULT.pack(gfn)
    if isinstance(arg, int):
        from fakekvm.fake.kvm.vm import copy_to_user

        try:
            copy_to_user(vm.kernel, arg, data, what)
        except OSError:
            with st.lock:  # do not lose the gfn (the RFC did; review asked for this)
                st.queue.appendleft(gfn)
                st.queued.add(gfn)
            raise
    else:
        memoryview(arg).cast("B")[: _KVM_FAULT.size] = data  # type: ignore[arg-type]
    return 0


def rfc_check(vm: Any, gfn: int) -> bool:
    """Is ``gfn`` userfault-enabled (RFC attribute set and userfault enabled)?"""
    if not rfc_enabled(vm):
        return False
    attrs = getattr(vm, "attributes", None)
    if attrs is None:
        return False
    has = getattr(attrs, "has", None)
    if has is not None:
        return bool(has(gfn, KVM_MEMORY_ATTRIBUTE_USERFAULT))
    return bool(attrs.get(gfn) & KVM_MEMORY_ATTRIBUTE_USERFAULT)


def rfc_userfault_exit(vm: Any, gpa: int, private: bool) -> MemoryFault | None:
    """The RFC's vCPU-fault check: a memory-fault exit with USERFAULT (| PRIVATE), or None."""
    if not rfc_check(vm, gpa >> PAGE_SHIFT):
        return None
    flags = KVM_MEMORY_EXIT_FLAG_USERFAULT | (KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0)
    return MemoryFault(flags, gpa & PAGE_MASK, PAGE_SIZE)


def async_userfault(vm: Any, gfn: int, *, timeout: float | None = None) -> bool:
    """An access KVM cannot unwind: queue ``gfn``, signal the eventfd, wait until it is resolved.

    Returns True at once if the gfn is not userfault-enabled, True once its
    attribute is cleared (or userfault is disabled), False on timeout. The wait
    is interruptible (EINTR for a pending signal) and ends with ESHUTDOWN when
    the fake kernel shuts down.
    """
    if not rfc_check(vm, gfn):
        return True
    st = rfc_state(vm)
    signal = None
    with st.lock:
        if gfn not in st.queued:
            st.queue.append(gfn)
            st.queued.add(gfn)
            signal = st.eventfd
    if signal is not None:
        signal.signal(1)
    assert st.wq is not None
    return st.wq.wait_event(
        lambda: not rfc_check(vm, gfn), timeout, interruptible=True, what=f"userfault gfn {gfn:#x}"
    )


def attributes_changed(vm: Any) -> None:
    """Called after KVM_SET_MEMORY_ATTRIBUTES changed something: wake async waiters."""
    st = _states.get(vm)
    if st is not None:
        _wake(st)


def _wake(st: RfcState) -> None:
    if st.wq is not None:
        st.wq.wake_up_all()


def pending(vm: Any) -> list[int]:
    """The queued gfns (diagnostics, tests)."""
    st = _states.get(vm)
    if st is None:
        return []
    with st.lock:
        return list(st.queue)


def access_check_for(vm: Any) -> Any:
    """The per-access userfault check for ``vm``'s profile, shaped ``(slot, gpa, private)``.

    v3: `userfault_exit`; RFC: `rfc_userfault_exit` bound to the VM; None when
    the profile has no KVM Userfault. `fakekvm.fake.kvm.private.resolve` takes it.
    """
    variant = getattr(getattr(vm, "profile", None), "userfault_variant", None)
    if variant == "v3":
        mm = getattr(getattr(vm, "kernel", None), "mm", None)
        return lambda slot, gpa, private: userfault_exit(slot, gpa, private, mm)
    if variant == "rfc":
        return lambda slot, gpa, private: rfc_userfault_exit(vm, gpa, private)
    return None


# ---------------------------------------------------------------------------------------------
# Wiring for the VM's dispatch
# ---------------------------------------------------------------------------------------------
def vm_ioctls(vm: Any) -> dict[int, Any]:
    """The VM ioctls this module answers on ``vm``'s profile: ``{request: handler(arg)}``.

    RFC: ``KVM_READ_USERFAULT``, and ``KVM_SET_MEMORY_ATTRIBUTES`` through
    `fakekvm.fake.kvm.private.set_memory_attributes` (which knows the USERFAULT
    attribute and wakes asynchronous waiters). ``KVM_ENABLE_CAP`` is shared with
    other caps: route it here when `handles_enable_cap` says so.
    """
    from fakekvm.abi.kvm import KVM_SET_MEMORY_ATTRIBUTES
    from fakekvm.abi.kvm_userfault import KVM_READ_USERFAULT
    from fakekvm.fake.kvm import private

    out: dict[int, Any] = {}
    if _is_rfc(vm):
        out[KVM_READ_USERFAULT] = lambda arg: read_userfault(vm, KVM_READ_USERFAULT, arg)
        out[KVM_SET_MEMORY_ATTRIBUTES] = lambda arg: private.set_memory_attributes(
            vm, KVM_SET_MEMORY_ATTRIBUTES, arg
        )
    return out


def handles_enable_cap(vm: Any, cap: int) -> bool:
    """Is ``KVM_ENABLE_CAP(cap)`` the RFC's KVM_CAP_USERFAULT on this VM (-> `enable_cap`)?

    v3's cap is informational: KVM_ENABLE_CAP on it is EINVAL (the VM's default).
    """
    return _is_rfc(vm) and cap == getattr(getattr(vm, "profile", None), "userfault_cap", None)
