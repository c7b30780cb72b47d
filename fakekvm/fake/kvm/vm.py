"""The VM file (``anon_inode:kvm-vm``): VM ioctls, memslots, dirty log, vCPU creation.

Follows ``virt/kvm/kvm_main.c`` ``kvm_vm_ioctl`` (6.18) and x86's
``kvm_arch_vm_ioctl``; answers were checked against the live 6.18 kernel
(uapi.md §4 and a scan of every ``_IO/_IOR/_IOW/_IOWR(KVMIO, 0..0xff, size)``):
an ioctl number the VM does not know answers ``ENOTTY``.

Pieces live in sibling modules: memslot rules `memslots`, dirty bitmaps `dirty`,
``KVM_ENABLE_CAP`` `vmcaps`, irqfd/ioeventfd `eventfds`, user copies `uaccess`,
the vCPU's second-stage lookup `translate`.

Emulated: ``KVM_CHECK_EXTENSION`` (VM column of the profile),
``KVM_CREATE_VCPU``, ``KVM_SET_USER_MEMORY_REGION{,2}``, ``KVM_GET_DIRTY_LOG``,
``KVM_CLEAR_DIRTY_LOG``, ``KVM_ENABLE_CAP`` (``MANUAL_DIRTY_LOG_PROTECT2``,
``HALT_POLL``, ``MAX_VCPU_ID`` and the x86 caps of ``vmcaps``; the in-kernel
irqchip and the dirty ring are not emulated), ``KVM_IRQFD`` (no in-kernel
irqchip: assign is EINVAL as on a VM without one), ``KVM_IOEVENTFD``
(bookkeeping + `ioeventfd_lookup`),
``KVM_SET_TSS_ADDR``, ``KVM_SET_IDENTITY_MAP_ADDR``,
``KVM_SET_MEMORY_ATTRIBUTES`` and ``KVM_CREATE_GUEST_MEMFD`` where the profile
has them. Other ioctls the live kernel implements (irqchip, PIT, clock, MSR
filter, stats fd, devices) answer ``ENOTTY``: not emulated, never faked success.

Listeners: every memslot change calls ``vcpu.memslots_changed()``; slot
delete/move, dirty-log enable, dirty-log collection (re-protection) and MMU
notifier ranges from the fake mm call ``vcpu.invalidate(gpa_start, gpa_end)``.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from fakekvm.abi import kvm as K
from fakekvm.fake.files import FakeFile
from fakekvm.fake.kvm import dirty as D
from fakekvm.fake.kvm import eventfds, private, userfault, vmcaps
from fakekvm.fake.kvm import translate as T
from fakekvm.fake.kvm.attributes import RangeAttributes
from fakekvm.fake.kvm.memslots import (
    KVM_MR_CREATE,
    KVM_MR_DELETE,
    KVM_MR_FLAGS_ONLY,
    KVM_MR_MOVE,
    PAGE_SHIFT,
    PAGE_SIZE,
    AddressSpace,
    Change,
    Memslot,
    RegionRequest,
    plan_change,
)
from fakekvm.fake.kvm.uaccess import copy_from_user, copy_to_user, fget, read_arg
from fakekvm.fake.profiles import Profile

# re-exported: other handlers (vcpu, gmem, private, userfault) import them from here
__all__ = ["FakeVm", "copy_from_user", "copy_to_user", "fget", "read_arg"]

if TYPE_CHECKING:
    from fakekvm.kernel.seam import IoctlArg

_REGION1 = K.kvm_userspace_memory_region_fmt
_REGION2 = K.kvm_userspace_memory_region2_fmt  # <IIQQQQII112x
_UF_BITMAP = struct.Struct("<Q")
_DIRTY_LOG = K.kvm_dirty_log_fmt
_CLEAR_LOG = K.kvm_clear_dirty_log_fmt
_MEM_ATTR = K.kvm_memory_attributes_fmt
_GMEM = K.kvm_create_guest_memfd_fmt
_U64 = struct.Struct("<Q")

#: kvm_mmu_max_gfn() with shadow paging (PVM; also mainline without TDP): 52 gpa bits
MAX_GPA_BITS = 52

#: VM ioctls the live 6.18-pvm kernel implements that the fake does not emulate (they
#: answer ENOTTY in the fake): request -> what the live kernel answered on a fresh VM
#: with a zeroed argument in the scan (a vCPU created earlier in the same scan).
NOT_EMULATED_ON_LIVE: dict[int, str] = {
    K.KVM_SET_NR_MMU_PAGES: "EINVAL",
    K.KVM_CREATE_IRQCHIP: "EINVAL (vCPU exists) / 0",
    K.KVM_IRQ_LINE: "ENXIO",
    K.KVM_GET_IRQCHIP: "ENXIO",
    K.KVM_SET_IRQCHIP: "ENXIO",
    K.KVM_CREATE_PIT: "ENOENT",
    K.KVM_GET_PIT: "ENXIO",
    K.KVM_SET_PIT: "ENXIO",
    K.KVM_REGISTER_COALESCED_MMIO: "0",
    K.KVM_UNREGISTER_COALESCED_MMIO: "0",
    K.KVM_IRQ_LINE_STATUS: "ENXIO",
    K.KVM_SET_GSI_ROUTING: "EINVAL",
    K.KVM_REINJECT_CONTROL: "EFAULT",
    K.KVM_CREATE_PIT2: "ENOENT",
    K.KVM_SET_BOOT_CPU_ID: "EBUSY (vCPU exists)",
    K.KVM_SET_CLOCK: "0",
    K.KVM_GET_CLOCK: "0",
    K.KVM_GET_PIT2: "ENXIO",
    K.KVM_SET_PIT2: "ENXIO",
    K.KVM_SET_TSC_KHZ: "EINVAL",
    K.KVM_GET_TSC_KHZ: "host TSC kHz",
    K.KVM_SIGNAL_MSI: "EINVAL",
    K.KVM_SET_PMU_EVENT_FILTER: "0",
    K.KVM_X86_SET_MSR_FILTER: "0",
    K.KVM_RESET_DIRTY_RINGS: "EINVAL",
    K.KVM_GET_STATS_FD: "a stats fd",
    K.KVM_CREATE_DEVICE: "ENODEV",
}


def _put_vm_on_release(vcpu: FakeFile, vm: FakeFile) -> None:
    """``kvm_vcpu_release``: when the vCPU file goes, drop the VM reference it held.

    The VM owns this reference; FakeVcpu.release must not put the VM itself.
    """
    inner = vcpu.release

    def release() -> None:
        try:
            inner()
        finally:
            vm.put()

    vcpu.release = release  # type: ignore[method-assign]


class FakeVm(FakeFile):
    """One VM; created by ``KVM_CREATE_VM`` on /dev/kvm."""

    kind = "kvm-vm"

    def __init__(self, kernel: Any, vm_type: int, profile: Profile) -> None:
        super().__init__()
        self.kernel = kernel
        self.vm_type = vm_type
        self.profile = profile
        self.caps: dict[int, int] = profile.vm_caps(vm_type)
        self.nr_as = profile.nr_address_spaces(vm_type)
        self.spaces = [AddressSpace() for _ in range(self.nr_as)]
        self.valid_mem_flags = profile.memslot_valid_flags(vm_type)
        self.gmem_flags = profile.gmem_flags(vm_type)
        self.supported_attributes = profile.memory_attributes(vm_type)
        self.private_mem = vm_type in profile.private_mem_vm_types
        self.bad_hva_mmio = profile.bad_hva_exit == "mmio"
        self.max_gfn = (1 << (MAX_GPA_BITS - PAGE_SHIFT)) - 1
        #: kvm->slots_lock: memslot updates, vCPU creation, enable_cap
        self.slots_lock = threading.RLock()
        #: kvm->mmu_lock: dirty bitmaps against vCPU translation
        self.mmu_lock = threading.Lock()
        self.vcpus: dict[int, Any] = {}
        #: kvm->mmu_invalidate_seq: bumped before every vCPU invalidation. A vCPU reads it
        #: before `translate` and re-translates if it changed before the mapping is live.
        self.mmu_invalidate_seq = 0
        self.created_vcpus = 0
        self.manual_dirty_log_protect = 0
        #: caps enabled with KVM_ENABLE_CAP (cap -> args[0]) for the vCPUs to consult
        self.enabled_caps: dict[int, int] = {}
        self.disabled_quirks = 0
        #: kvm->arch.max_vcpu_ids (0: not set; the first vCPU sets KVM_MAX_VCPU_IDS)
        self.max_vcpu_ids = 0
        self.max_halt_poll_ns: int | None = None
        self.tss_addr: int | None = None
        self.identity_map_addr: int | None = None
        self.attributes = RangeAttributes()
        self.ioeventfds: list[tuple[int, int, int, bool, int, FakeFile]] = []
        self._released = False
        self._handlers: dict[int, Callable[[IoctlArg], int]] = {
            K.KVM_CHECK_EXTENSION: self._check_extension,
            K.KVM_CREATE_VCPU: self._create_vcpu,
            K.KVM_SET_USER_MEMORY_REGION: self._set_region1,
            K.KVM_GET_DIRTY_LOG: self._get_dirty_log,
            K.KVM_CLEAR_DIRTY_LOG: self._clear_dirty_log,
            K.KVM_ENABLE_CAP: self._enable_cap,
            K.KVM_IRQFD: partial(eventfds.irqfd, self),
            K.KVM_IOEVENTFD: partial(eventfds.ioeventfd, self),
            K.KVM_SET_TSS_ADDR: self._set_tss_addr,
            K.KVM_SET_IDENTITY_MAP_ADDR: self._set_identity_map_addr,
        }
        if profile.has_region2:
            self._handlers[K.KVM_SET_USER_MEMORY_REGION2] = self._set_region2
        if profile.has_memory_attributes_ioctl:
            self._handlers[K.KVM_SET_MEMORY_ATTRIBUTES] = partial(
                private.set_memory_attributes, self, K.KVM_SET_MEMORY_ATTRIBUTES
            )
        if profile.has_guest_memfd:
            self._handlers[K.KVM_CREATE_GUEST_MEMFD] = self._create_guest_memfd
        # KVM Userfault (not upstream): the RFC's KVM_READ_USERFAULT and attribute
        self._handlers.update(userfault.vm_ioctls(self))
        #: the private/shared, gmem-only and KVM Userfault rules run before the hva path
        #: when this VM can have any of them (`private.pre_translate`); None: plain VM
        self.pre_translate: Callable[..., Any] | None = (
            private.pre_translate
            if self.private_mem
            or profile.userfault_variant is not None
            or (profile.has_guest_memfd and profile.gmem_only_slots)
            else None
        )
        mm = getattr(kernel, "mm", None)
        if mm is not None and hasattr(mm, "register_notifier"):
            mm.register_notifier(self)

    def register_ioctl(self, request: int, handler: Callable[[IoctlArg], int]) -> None:
        """Add or replace the handler of one VM ioctl (how later issues plug in)."""
        self._handlers[request] = handler

    # -- file operations ------------------------------------------------------------
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        h = self._handlers.get(request)
        if h is None:
            raise OSError(errno.ENOTTY, f"kvm-vm: inappropriate ioctl {request:#x}")
        return h(arg)

    def release(self) -> None:
        self._released = True
        mm = getattr(self.kernel, "mm", None)
        if mm is not None and hasattr(mm, "unregister_notifier"):
            mm.unregister_notifier(self)
        with self.slots_lock:
            for space in self.spaces:
                for s in space.slots():
                    self._drop_gmem(s)
            for *_, ev in self.ioeventfds:
                ev.put()
            self.ioeventfds.clear()
            # kvm_destroy_vm frees the vCPUs (no vCPU fd can be open: each holds the VM)
            vcpus, self.vcpus = self.vcpus, {}
        for v in vcpus.values():
            destroy = getattr(v, "destroy", None)
            if destroy is not None:
                destroy()

    def lseek(self, pos: int, how: int) -> int:
        return 0  # noop_llseek

    def poll(self) -> int:
        from fakekvm.fake.kvm.system import POLL_DEFAULT

        return POLL_DEFAULT

    def fstat(self) -> os.stat_result:
        return os.stat_result((0o600, 1, 15, 1, 0, 0, 0, 0, 0, 0), {"st_blksize": 4096})

    # -- the translation interface for vCPUs -------------------------------------------
    def translate(self, gpa: int, write: bool, exec_: bool, *, vcpu: object) -> T.Translation:
        return T.translate(self, gpa, write, exec_, vcpu)

    def memslot_regions(self) -> list[tuple[int, int, int, int]]:
        """(gpa, size, hva, flags) of every memslot in address space 0, by gpa."""
        return [(s.gpa, s.size, s.userspace_addr, s.flags) for s in self.spaces[0].slots()]

    def memslot_at(self, gpa: int, as_id: int = 0) -> Memslot | None:
        return self.spaces[as_id].lookup(gpa >> PAGE_SHIFT)

    def invalidate_range_start(self, start_hva: int, end_hva: int) -> None:
        """MMU notifier, before the mm changes the pages (``kvm_mmu_notifier_invalidate_range_start``)."""
        self.invalidate_range(start_hva, end_hva)

    def invalidate_range(self, start_hva: int, end_hva: int) -> None:
        """MMU notifier (from the fake mm): drop vCPU mappings of gfns backed by [start, end).

        Called before and after the change (the kernel instead blocks faults in between
        with ``mmu_invalidate_in_progress``): a mapping a vCPU made in the window is
        dropped again at the end.
        """
        ranges: list[tuple[int, int]] = []
        for s in self.spaces[0].slots():
            lo, hi = s.hva_range()
            a, b = max(lo, start_hva), min(hi, end_hva)
            if a < b:
                ranges.append((s.gpa + (a - lo), s.gpa + (b - lo)))
        for a, b in ranges:
            self._invalidate(a, b)

    def ioeventfd_lookup(self, bus: int, addr: int, length: int, data: int) -> FakeFile | None:
        """The eventfd an access (MMIO bus 0 / PIO bus 1) should signal instead of exiting."""
        return eventfds.lookup(self.ioeventfds, bus, addr, length, data)

    def invalidate_gpa_range(self, gpa_start: int, gpa_end: int) -> None:
        """Make every vCPU drop its translations of [gpa_start, gpa_end) (gmem punch, attributes)."""
        self._invalidate(gpa_start, gpa_end)

    def _vcpu_list(self) -> list[Any]:
        return list(self.vcpus.values())

    def _invalidate(self, gpa_start: int, gpa_end: int) -> None:
        self.mmu_invalidate_seq += 1
        for v in self._vcpu_list():
            v.invalidate(gpa_start, gpa_end)

    def _slots_changed(self) -> None:
        for v in self._vcpu_list():
            v.memslots_changed()

    # -- KVM_CHECK_EXTENSION ------------------------------------------------------------
    def _check_extension(self, arg: IoctlArg) -> int:
        return self.caps.get(arg, 0) if isinstance(arg, int) else 0

    # -- KVM_CREATE_VCPU ----------------------------------------------------------------
    def _create_vcpu(self, arg: IoctlArg) -> int:
        vid = arg if isinstance(arg, int) else 0
        vid &= (1 << 64) - 1
        p = self.profile
        if vid >= p.max_vcpu_id:
            raise OSError(errno.EINVAL, f"KVM_CREATE_VCPU: id {vid} >= KVM_MAX_VCPU_IDS")
        with self.slots_lock:
            if self.created_vcpus >= p.max_vcpus:
                raise OSError(errno.EINVAL, "KVM_CREATE_VCPU: KVM_MAX_VCPUS reached")
            # kvm_arch_vcpu_precreate
            if not self.max_vcpu_ids:
                self.max_vcpu_ids = p.max_vcpu_id
            if vid >= self.max_vcpu_ids:
                raise OSError(errno.EINVAL, f"KVM_CREATE_VCPU: id {vid} >= KVM_CAP_MAX_VCPU_ID")
            if vid in self.vcpus:
                raise OSError(errno.EEXIST, f"KVM_CREATE_VCPU: vcpu {vid} exists")
            from fakekvm.fake.kvm.vcpu import FakeVcpu

            self.get()  # the vCPU file holds the VM (kvm_get_kvm in kvm_vm_ioctl_create_vcpu)
            try:
                vcpu = FakeVcpu(self, vid)
                _put_vm_on_release(vcpu, self)
                vcpu.f_flags |= os.O_RDWR
                # create_vcpu_fd: anon_inode_getfd(name, ..., O_RDWR | O_CLOEXEC)
                fd: int = self.kernel.install_fd(vcpu, os.O_CLOEXEC)
            except BaseException:
                self.put()
                raise
            self.vcpus[vid] = vcpu
            self.created_vcpus += 1
            return fd

    # -- memslots -----------------------------------------------------------------------
    def _set_region1(self, arg: IoctlArg) -> int:
        raw = read_arg(self.kernel, arg, _REGION1.size, "KVM_SET_USER_MEMORY_REGION")
        req = RegionRequest(*_REGION1.unpack(raw))
        return self.set_memory_region(req, v1=True)

    def _set_region2(self, arg: IoctlArg) -> int:
        raw = read_arg(self.kernel, arg, _REGION2.size, "KVM_SET_USER_MEMORY_REGION2")
        slot, flags, gpa, size, hva, gofs, gfd, _pad1 = _REGION2.unpack(raw)
        if gfd >= 1 << 31:
            gfd -= 1 << 32
        ufb = 0
        if self.profile.userfault_variant == "v3":
            ufb = _UF_BITMAP.unpack_from(raw, 48)[0]
            userfault.check_region(flags, size, ufb)
        req = RegionRequest(slot, flags, gpa, size, hva, gofs, gfd, ufb)
        return self.set_memory_region(req, v1=False)

    def _resolve_gmem(self, fd: int) -> Any:
        f = fget(self.kernel, fd, "KVM_SET_USER_MEMORY_REGION2")
        if getattr(f, "kind", None) != "guest_memfd" or getattr(f, "vm", None) is not self:
            raise OSError(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2: not a guest_memfd of this VM")
        return f

    def set_memory_region(self, req: RegionRequest, *, v1: bool) -> int:
        p = self.profile
        with self.slots_lock:
            change = plan_change(
                req,
                v1=v1,
                valid_flags=self.valid_mem_flags,
                nr_address_spaces=self.nr_as,
                nr_memslots=p.nr_memslots,
                max_gfn=self.max_gfn,
                spaces=self.spaces,
                gmem_immutable=p.gmem_slot_immutable,
                resolve_gmem=self._resolve_gmem,
            )
            if change.old is change.new:
                return 0
            self._commit(change)
        return 0

    def _commit(self, change: Change) -> None:
        old, new = change.old, change.new
        if change.kind == KVM_MR_CREATE and new is not None and new.guest_memfd is not None:
            gm = new.guest_memfd
            start = new.guest_memfd_offset >> PAGE_SHIFT
            if hasattr(gm, "bind"):
                gm.bind(new, start, start + new.npages)
            gm.get()
        if new is not None:
            if not new.flags & K.KVM_MEM_LOG_DIRTY_PAGES:
                new.dirty = None
            elif old is not None and old.dirty is not None:
                new.dirty = old.dirty
            else:
                initially_set = bool(self.manual_dirty_log_protect & K.KVM_DIRTY_LOG_INITIALLY_SET)
                new.dirty = D.DirtyBitmap(new.npages, initially_set)
        space = self.spaces[(new or old).as_id]  # type: ignore[union-attr]
        with self.mmu_lock:
            space.apply(change)
        if change.kind == KVM_MR_DELETE and old is not None:
            self._drop_gmem(old)
        if old is not None and old.as_id == 0 and change.kind in (KVM_MR_DELETE, KVM_MR_MOVE):
            self._invalidate(old.gpa, old.gpa + old.size)
        elif change.kind == KVM_MR_FLAGS_ONLY and new is not None and new.as_id == 0:
            self._invalidate(new.gpa, new.gpa + new.size)
        self._slots_changed()

    def _drop_gmem(self, slot: Memslot) -> None:
        gm = slot.guest_memfd
        if gm is None:
            return
        slot.guest_memfd = None
        if hasattr(gm, "unbind"):
            gm.unbind(slot)
        gm.put()

    # -- dirty log --------------------------------------------------------------------------
    def _dirty_slot(self, slot_field: int, what: str) -> Memslot:
        as_id, sid = slot_field >> 16, slot_field & 0xFFFF
        if as_id >= self.nr_as or sid >= self.profile.nr_memslots:
            raise OSError(errno.EINVAL, f"{what}: bad slot {slot_field:#x}")
        s = self.spaces[as_id].by_id.get(sid)
        if s is None or s.dirty is None:
            raise OSError(errno.ENOENT, f"{what}: slot {slot_field:#x} has no dirty log")
        return s

    def _get_dirty_log(self, arg: IoctlArg) -> int:
        what = "KVM_GET_DIRTY_LOG"
        slot_field, _pad, ptr = _DIRTY_LOG.unpack(read_arg(self.kernel, arg, _DIRTY_LOG.size, what))
        with self.slots_lock:
            s = self._dirty_slot(slot_field, what)
            assert s.dirty is not None
            with self.mmu_lock:
                data, runs = s.dirty.get(bool(self.manual_dirty_log_protect))
            if s.as_id == 0:
                for a, b in runs:
                    self._invalidate(s.gpa + (a << PAGE_SHIFT), s.gpa + (b << PAGE_SHIFT))
            copy_to_user(self.kernel, ptr, data, what)
        return 0

    def _clear_dirty_log(self, arg: IoctlArg) -> int:
        what = "KVM_CLEAR_DIRTY_LOG"
        slot_field, num_pages, first_page, ptr = _CLEAR_LOG.unpack(
            read_arg(self.kernel, arg, _CLEAR_LOG.size, what)
        )
        with self.slots_lock:
            as_id, sid = slot_field >> 16, slot_field & 0xFFFF
            if as_id >= self.nr_as or sid >= self.profile.nr_memslots:
                raise OSError(errno.EINVAL, f"{what}: bad slot {slot_field:#x}")
            if first_page & 63:
                raise OSError(errno.EINVAL, f"{what}: first_page not a multiple of 64")
            s = self._dirty_slot(slot_field, what)
            assert s.dirty is not None
            D.validate_clear(first_page, num_pages, s.npages)
            n = ((num_pages + 63) // 64) * 8
            user = copy_from_user(self.kernel, ptr, n, what) if n else b""
            with self.mmu_lock:
                runs = s.dirty.clear(first_page, num_pages, user)
            if s.as_id == 0:
                for a, b in runs:
                    self._invalidate(s.gpa + (a << PAGE_SHIFT), s.gpa + (b << PAGE_SHIFT))
        return 0

    # -- x86 odds and ends -------------------------------------------------------------------
    def _set_tss_addr(self, arg: IoctlArg) -> int:
        addr = arg if isinstance(arg, int) else 0
        if addr & ((1 << 64) - 1) > (1 << 32) - 3 * PAGE_SIZE:
            raise OSError(errno.EINVAL, "KVM_SET_TSS_ADDR: address above 4G - 3 pages")
        self.tss_addr = addr
        return 0

    def _set_identity_map_addr(self, arg: IoctlArg) -> int:
        what = "KVM_SET_IDENTITY_MAP_ADDR"
        (addr,) = _U64.unpack(read_arg(self.kernel, arg, 8, what))
        with self.slots_lock:
            if self.created_vcpus:
                raise OSError(errno.EINVAL, f"{what}: vCPUs already created")
            self.identity_map_addr = addr
        return 0

    # -- KVM_ENABLE_CAP -------------------------------------------------------------------------
    def _enable_cap(self, arg: IoctlArg) -> int:
        raw = read_arg(self.kernel, arg, K.kvm_enable_cap_fmt.size, "KVM_ENABLE_CAP")
        cap = int.from_bytes(raw[:4], "little")
        if userfault.handles_enable_cap(self, cap):
            return int(userfault.enable_cap(self, K.KVM_ENABLE_CAP, arg))
        return vmcaps.enable_cap(self, arg)

    # -- KVM_SET_MEMORY_ATTRIBUTES: `fakekvm.fake.kvm.private.set_memory_attributes` ------------
    def memory_attributes(self, gfn: int) -> int:
        return self.attributes.get(gfn)

    # -- KVM_CREATE_GUEST_MEMFD ----------------------------------------------------------------
    def _create_guest_memfd(self, arg: IoctlArg) -> int:
        what = "KVM_CREATE_GUEST_MEMFD"
        size, flags = _GMEM.unpack(read_arg(self.kernel, arg, _GMEM.size, what))
        if flags & ~self.gmem_flags:
            raise OSError(errno.EINVAL, f"{what}: flags {flags:#x} not supported")
        if size >= 1 << 63 or size == 0 or size & (PAGE_SIZE - 1):
            raise OSError(errno.EINVAL, f"{what}: size {size:#x}")
        from fakekvm.fake import gmem

        return int(gmem.create(self, size, flags))
