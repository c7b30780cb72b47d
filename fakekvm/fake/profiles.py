"""Kernel profiles: what a given kernel answers, as data.

A `Profile` is everything the fake needs to answer like one particular kernel
build: ``KVM_GET_API_VERSION``, the ``KVM_CHECK_EXTENSION`` tables on
``/dev/kvm`` and on a VM fd of each VM type, the VM types, memslot and
guest_memfd flags, the userfaultfd feature mask, limits, and behaviour knobs
where kernels differ. The fake's code paths read these fields; they never ask
"which kernel is this".

Sources:

* ``6.18-pvm`` is this project's host (Linux 6.18, ``CONFIG_KVM_PVM``),
  measured live: a full ``KVM_CHECK_EXTENSION`` scan of caps 0..300 on
  ``/dev/kvm`` and on a type-0 VM (see ``/work/shared/reference/uapi.md``
  §1.7, §1.8, §4, §6). The only sys/VM difference is ``KVM_CAP_X2APIC_API``
  (129): 15 on /dev/kvm, 11 on a VM.
* ``6.18`` (mainline VMX with ``CONFIG_KVM_SW_PROTECTED_VM``) is 6.18-pvm plus
  what ``virt/kvm/kvm_main.c`` and ``arch/x86/kvm/x86.c`` answer differently
  with TDP and private memory: ``KVM_CAP_VM_TYPES`` = DEFAULT|SW_PROTECTED,
  ``KVM_CAP_MEMORY_ATTRIBUTES`` = PRIVATE on /dev/kvm and on a SW_PROTECTED VM
  (``kvm_supported_mem_attributes``), 0 on a default VM;
  ``KVM_CAP_GUEST_MEMFD_FLAGS`` = MMAP only on a private-memory VM
  (``kvm_gmem_get_supported_flags``: no INIT_SHARED there);
  ``KVM_CAP_PRE_FAULT_MEMORY`` = ``tdp_enabled``; ``KVM_CAP_MULTI_ADDRESS_SPACE``
  = 2 (SMM) on a default VM, 1 on a private-memory VM
  (``kvm_arch_nr_memslot_as_ids``). CPU-dependent values (XSAVE2 size,
  DISABLE_EXITS, ...) are copied from the host and are approximations.
* ``6.8`` / ``6.1``: the mainline table cut at the last cap number of that
  release (234 = GUEST_MEMFD in 6.8; 223 = DIRTY_LOG_RING_ACQ_REL in 6.1, the
  local ``/usr/include/linux/kvm.h`` is 6.1.187). Caps are numbered in merge
  order, so the cut is right for presence; values are the 6.18 ones
  (approximation). 6.1 has no guest_memfd, no REGION2, no memory attributes.
* userfaultfd features (``fs/userfaultfd.c`` ``UFFD_API_FEATURES``):
  EXACT_ADDRESS (bit 11) 5.18, WP_HUGETLBFS_SHMEM (12) 6.0, WP_UNPOPULATED (13)
  6.4, POISON (14) 6.6, WP_ASYNC (15) 6.7, MOVE (16) 6.8. So 6.1 = 0x1FFF,
  6.8 and later = 0x1FFFF (live 6.18: 0x1FFFF).
* ``6.18+kvm-userfault``: mainline + James Houghton's "KVM: Introduce KVM
  Userfault" v3 (lore 20250618042424.330664-1-jthoughton@google.com):
  ``KVM_CAP_USERFAULT`` 243, memslot flag ``KVM_MEM_USERFAULT`` (1<<3).
  ``6.10-rfc-userfault``: the July 2024 RFC (cap 236, memory attribute
  ``KVM_MEMORY_ATTRIBUTE_USERFAULT``, ``KVM_READ_USERFAULT``). Not upstream.

``profile="auto"`` probes the live host through `RealKernel` (see
:func:`probe_host`) and lays the answers over the nearest known profile.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fakekvm.kernel.seam import Kernel

# Cap numbers used by the profile logic (names verbatim from kvm.h).
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_HALT_POLL = 182
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_GUEST_MEMFD_FLAGS = 244

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEM_USERFAULT = 1 << 3  # NOT UPSTREAM (KVM Userfault v1..v3)

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_ATTRIBUTE_USERFAULT = 1 << 4  # NOT UPSTREAM (RFC only)

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

#: Where a cap answer is the number of online CPUs (``num_online_cpus()``), the
#: table holds this marker and `Profile.sys_caps` resolves it on this host.
ONLINE_CPUS = -1

# Live scan of /dev/kvm on the 6.18 PVM host, caps 0..300; absent = 0.
_PVM_618_SYS: dict[int, int] = {
    0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 6: 1, 7: 1, 8: 1, 9: ONLINE_CPUS, 10: 32764, 11: 1, 12: 1,
    14: 1, 15: 2, 16: 1, 21: 1, 22: 1, 23: 1, 24: 1, 25: 4096, 26: 1, 30: 1, 31: 32, 32: 1,
    33: 1, 34: 1, 35: 1, 36: 1, 37: 1, 39: 14, 40: 1, 41: 1, 47: 1, 50: 1, 51: 1, 54: 1,
    55: 1, 56: 1, 59: 1, 61: 1, 66: 1024, 70: 1, 72: 1, 74: 7, 76: 1, 77: 1, 81: 1, 82: 1,
    89: 1, 95: 1, 97: 1, 98: 1, 100: 1, 105: 1, 116: 1, 121: 1, 122: 1, 127: 1, 128: 4096,
    129: 15, 136: 1, 143: 14, 153: 1, 159: 1, 162: 1, 164: 1, 168: 3, 173: 1, 182: 1, 183: 1,
    184: 1, 185: 1, 187: 1, 188: 1, 189: 1, 190: 1, 192: 1048576, 195: 2031619, 197: 1,
    200: 1, 201: 4096, 203: 1, 204: 1, 206: 1, 208: 4096, 209: 1, 213: 1535, 215: 1, 218: 1,
    220: 1, 223: 1048576, 226: 1, 231: 1, 232: 1, 234: 1, 235: 1, 237: 1, 238: 1, 244: 3,
}  # fmt: skip
# On a type-0 VM fd the live answers differ only here.
_PVM_618_VM0: dict[int, int] = {KVM_CAP_X2APIC_API: 11}


def _freeze(d: Mapping[int, int]) -> Mapping[int, int]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Profile:
    """One kernel build's answers. Cap tables hold non-zero answers only."""

    name: str
    version: tuple[int, int]
    #: KVM_GET_API_VERSION
    api_version: int = 12
    #: KVM_CHECK_EXTENSION on /dev/kvm (cap -> value; absent = 0)
    sys_caps_raw: Mapping[int, int] = field(default_factory=dict)
    #: per VM type: overrides of sys_caps on a VM fd of that type (0 allowed)
    vm_cap_overrides: Mapping[int, Mapping[int, int]] = field(default_factory=dict)
    #: VM types KVM_CREATE_VM accepts
    vm_types: frozenset[int] = frozenset({KVM_X86_DEFAULT_VM})
    #: VM types with private memory (kvm_arch_has_private_mem)
    private_mem_vm_types: frozenset[int] = frozenset()
    #: memslot flags check_memory_region_flags() accepts, per VM type (default: key 0)
    memslot_flags: Mapping[int, int] = field(default_factory=dict)
    #: memslot address spaces per VM type (kvm_arch_nr_memslot_as_ids)
    address_spaces: Mapping[int, int] = field(default_factory=dict)
    #: KVM_SET_USER_MEMORY_REGION2 exists (KVM_CAP_USER_MEMORY2)
    has_region2: bool = True
    #: KVM_CREATE_GUEST_MEMFD exists (CONFIG_KVM_GUEST_MEMFD / KVM_CAP_GUEST_MEMFD)
    has_guest_memfd: bool = True
    #: KVM_SET_MEMORY_ATTRIBUTES is built (CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES); else ENOTTY
    has_memory_attributes_ioctl: bool = False
    #: UFFDIO_API features
    uffd_features: int = 0x1FFFF
    #: KVM_GET_VCPU_MMAP_SIZE
    vcpu_mmap_size: int = 12288
    #: KVM_MAX_VCPUS, KVM_MAX_VCPU_IDS
    max_vcpus: int = 1024
    max_vcpu_id: int = 4096
    #: KVM_USER_MEM_SLOTS
    nr_memslots: int = 32764
    #: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 answer: the allowed KVM_ENABLE_CAP bits
    manual_dirty_log_caps: int = 3
    # -- behaviour knobs ----------------------------------------------------------------
    #: a gfn whose hva is unusable: "mmio" (PVM: KVM_EXIT_MMIO) or "memory_fault"
    #: (mainline: -1/EFAULT + KVM_EXIT_MEMORY_FAULT flags 0, gpa, size 4096)
    bad_hva_exit: str = "memory_fault"
    #: a guest_memfd memslot cannot be modified, only deleted (upstream; v3 userfault relaxes flags)
    gmem_slot_immutable: bool = True
    #: KVM_PRE_FAULT_MEMORY: "supported" or "eopnotsupp" (PVM, no TDP)
    pre_fault_memory: str = "supported"
    #: int3 with IDT.limit=0 -> KVM_EXIT_INTERNAL_ERROR (PVM's emulator) instead of SHUTDOWN
    internal_error_on_int3_without_idt: bool = False
    #: RFLAGS.IOPL reads back as 0 after every exit (PVM runs the guest at hardware CPL3 with
    #: IOPL 0; measured: a guest entered with IOPL 3 shows rflags 0x46 after its first exit)
    iopl_lost_on_exit: bool = False
    #: a slot bound to an MMAP-able guest_memfd is served from guest_memfd for shared
    #: accesses too (mainline 6.18 api.rst); PVM here reads userspace_addr (measured)
    gmem_only_slots: bool = True
    #: guest_memfd accepts write() to populate pages (AWS series, not merged): off
    gmem_write_population: bool = False
    # -- KVM Userfault (not upstream) ------------------------------------------------------
    #: None, "v3" or "rfc"
    userfault_variant: str | None = None
    userfault_cap: int | None = None

    # -- derived tables ------------------------------------------------------------------
    @functools.cached_property
    def sys_caps(self) -> dict[int, int]:
        """cap -> answer on /dev/kvm, resolved for this host (non-zero entries only)."""
        online = min(os.cpu_count() or 1, self.max_vcpus)
        return {c: (online if v == ONLINE_CPUS else v) for c, v in self.sys_caps_raw.items() if v}

    def vm_caps(self, vm_type: int) -> dict[int, int]:
        """cap -> answer on a VM fd of ``vm_type`` (non-zero entries only)."""
        return self._vm_caps_cache[vm_type]

    @functools.cached_property
    def _vm_caps_cache(self) -> dict[int, dict[int, int]]:
        out: dict[int, dict[int, int]] = {}
        for t in self.vm_types:
            d = dict(self.sys_caps)
            d.update(self.vm_cap_overrides.get(t, {}))
            out[t] = {c: v for c, v in d.items() if v}
        return out

    def memslot_valid_flags(self, vm_type: int) -> int:
        return self.memslot_flags.get(vm_type, self.memslot_flags.get(0, 0))

    def nr_address_spaces(self, vm_type: int) -> int:
        return self.address_spaces.get(vm_type, 1)

    def gmem_flags(self, vm_type: int) -> int:
        """Flags KVM_CREATE_GUEST_MEMFD accepts on this VM type (= KVM_CAP_GUEST_MEMFD_FLAGS)."""
        return self.vm_caps(vm_type).get(KVM_CAP_GUEST_MEMFD_FLAGS, 0)

    def memory_attributes(self, vm_type: int) -> int:
        """Attributes KVM_SET_MEMORY_ATTRIBUTES accepts on this VM type."""
        return self.vm_caps(vm_type).get(KVM_CAP_MEMORY_ATTRIBUTES, 0)


def _cut(d: Mapping[int, int], last: int) -> dict[int, int]:
    return {c: v for c, v in d.items() if c <= last}


_ALL_MEM_FLAGS_618 = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD

PVM_6_18 = Profile(
    name="6.18-pvm",
    version=(6, 18),
    sys_caps_raw=_freeze(_PVM_618_SYS),
    vm_cap_overrides=MappingProxyType({0: _freeze(_PVM_618_VM0)}),
    vm_types=frozenset({KVM_X86_DEFAULT_VM}),
    memslot_flags=_freeze({0: _ALL_MEM_FLAGS_618}),
    address_spaces=_freeze({0: 1}),
    has_memory_attributes_ioctl=False,
    bad_hva_exit="mmio",
    pre_fault_memory="eopnotsupp",
    internal_error_on_int3_without_idt=True,
    iopl_lost_on_exit=True,
    gmem_only_slots=False,
)

_MAINLINE_618_SYS = dict(_PVM_618_SYS)
_MAINLINE_618_SYS.update(
    {
        KVM_CAP_MULTI_ADDRESS_SPACE: 2,
        KVM_CAP_MEMORY_ATTRIBUTES: KVM_MEMORY_ATTRIBUTE_PRIVATE,
        KVM_CAP_VM_TYPES: (1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_SW_PROTECTED_VM),
        KVM_CAP_PRE_FAULT_MEMORY: 1,
    }
)
_MAINLINE_VM0 = {KVM_CAP_X2APIC_API: 11, KVM_CAP_MEMORY_ATTRIBUTES: 0}
_MAINLINE_VM1 = {
    KVM_CAP_X2APIC_API: 11,
    KVM_CAP_MULTI_ADDRESS_SPACE: 1,
    KVM_CAP_GUEST_MEMFD_FLAGS: GUEST_MEMFD_FLAG_MMAP,
}

MAINLINE_6_18 = Profile(
    name="6.18",
    version=(6, 18),
    sys_caps_raw=_freeze(_MAINLINE_618_SYS),
    vm_cap_overrides=MappingProxyType({0: _freeze(_MAINLINE_VM0), 1: _freeze(_MAINLINE_VM1)}),
    vm_types=frozenset({KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM}),
    private_mem_vm_types=frozenset({KVM_X86_SW_PROTECTED_VM}),
    memslot_flags=_freeze(
        {0: _ALL_MEM_FLAGS_618, 1: KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD}
    ),
    address_spaces=_freeze({0: 2, 1: 1}),
    has_memory_attributes_ioctl=True,
    bad_hva_exit="memory_fault",
    pre_fault_memory="supported",
)

# 6.8: guest_memfd arrives, only for private-memory VM types; no GUEST_MEMFD_FLAGS,
# no VM_TYPES cap (235 came later), no PRE_FAULT_MEMORY.
_618_TO_68 = _cut(_MAINLINE_618_SYS, KVM_CAP_GUEST_MEMFD)
_618_TO_68[KVM_CAP_GUEST_MEMFD] = 1
MAINLINE_6_8 = Profile(
    name="6.8",
    version=(6, 8),
    sys_caps_raw=_freeze(_618_TO_68),
    vm_cap_overrides=MappingProxyType(
        {
            # 6.8 KVM_CAP_GUEST_MEMFD: !kvm || kvm_arch_has_private_mem(kvm)
            0: _freeze(
                {KVM_CAP_X2APIC_API: 11, KVM_CAP_MEMORY_ATTRIBUTES: 0, KVM_CAP_GUEST_MEMFD: 0}
            ),
            1: _freeze({KVM_CAP_X2APIC_API: 11, KVM_CAP_MULTI_ADDRESS_SPACE: 1}),
        }
    ),
    vm_types=frozenset({KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM}),
    private_mem_vm_types=frozenset({KVM_X86_SW_PROTECTED_VM}),
    memslot_flags=_freeze({0: KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY, 1: _ALL_MEM_FLAGS_618}),
    address_spaces=_freeze({0: 2, 1: 1}),
    has_memory_attributes_ioctl=True,
    pre_fault_memory="absent",
)

MAINLINE_6_1 = Profile(
    name="6.1",
    version=(6, 1),
    sys_caps_raw=_freeze(_cut(_MAINLINE_618_SYS, 223)),
    vm_cap_overrides=MappingProxyType({0: _freeze({KVM_CAP_X2APIC_API: 11})}),
    vm_types=frozenset({KVM_X86_DEFAULT_VM}),
    memslot_flags=_freeze({0: KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY}),
    address_spaces=_freeze({0: 2}),
    has_region2=False,
    has_guest_memfd=False,
    has_memory_attributes_ioctl=False,
    uffd_features=0x1FFF,
    pre_fault_memory="absent",
)


def _userfault_cap(revision: str) -> int:
    try:
        from fakekvm.abi.kvm_userfault import USERFAULT_CAP_BY_REVISION
    except ImportError:  # pragma: no cover - A's module not there yet
        return {"v3": 243, "rfc": 236}[revision]
    return int(USERFAULT_CAP_BY_REVISION[revision])


_UF_V3_CAP = _userfault_cap("v3")
_uf_v3_sys = dict(_MAINLINE_618_SYS)
_uf_v3_sys[_UF_V3_CAP] = 1
USERFAULT_V3 = dataclasses.replace(
    MAINLINE_6_18,
    name="6.18+kvm-userfault",
    sys_caps_raw=_freeze(_uf_v3_sys),
    memslot_flags=_freeze(
        {k: v | KVM_MEM_USERFAULT for k, v in MAINLINE_6_18.memslot_flags.items()}
    ),
    gmem_slot_immutable=False,  # v3 patch 03: flags of a gmem slot may change (not move)
    userfault_variant="v3",
    userfault_cap=_UF_V3_CAP,
)

_UF_RFC_CAP = _userfault_cap("rfc")
_uf_rfc_sys = dict(_618_TO_68)
_uf_rfc_sys[KVM_CAP_VM_TYPES] = 0x3
_uf_rfc_sys[_UF_RFC_CAP] = 1
USERFAULT_RFC = dataclasses.replace(
    MAINLINE_6_8,
    name="6.10-rfc-userfault",
    version=(6, 10),
    sys_caps_raw=_freeze(_uf_rfc_sys),
    userfault_variant="rfc",
    userfault_cap=_UF_RFC_CAP,
)

PROFILES: Mapping[str, Profile] = MappingProxyType(
    {
        p.name: p
        for p in (MAINLINE_6_1, MAINLINE_6_8, MAINLINE_6_18, PVM_6_18, USERFAULT_V3, USERFAULT_RFC)
    }
)


#: Profiles with the fake confidential VM type (`fakekvm.fake.kvm.private.KVM_X86_FAKE_CC_VM`)
#: added: NOT a real kernel; they exist so private/shared conversion faults can be
#: exercised (see docs/fake-kernel.md, "Private memory"). Built on first use.
FAKE_CC_PROFILES: Mapping[str, str] = MappingProxyType(
    {"6.18+fake-cc": "6.18", "6.18+kvm-userfault+fake-cc": "6.18+kvm-userfault"}
)
_derived: dict[str, Profile] = {}


def profile_names() -> list[str]:
    return [*PROFILES, *FAKE_CC_PROFILES, "auto"]


def get_profile(name: str | Profile = "6.18-pvm") -> Profile:
    """The profile called ``name``; ``"auto"`` probes the live host."""
    if isinstance(name, Profile):
        return name
    if name == "auto":
        return auto_profile()
    if name in FAKE_CC_PROFILES:
        if name not in _derived:
            from fakekvm.fake.kvm.private import with_fake_cc

            base = PROFILES[FAKE_CC_PROFILES[name]]
            _derived[name] = dataclasses.replace(with_fake_cc(base), name=name)
        return _derived[name]
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown kernel profile {name!r}; known: {profile_names()}")


# -- probing the live host --------------------------------------------------------------
from fakekvm.abi.kvm import KVM_CHECK_EXTENSION as _KVM_CHECK_EXTENSION  # noqa: E402
from fakekvm.abi.kvm import KVM_CREATE_VM as _KVM_CREATE_VM  # noqa: E402
from fakekvm.abi.kvm import KVM_GET_API_VERSION as _KVM_GET_API_VERSION  # noqa: E402
from fakekvm.abi.kvm import KVM_GET_VCPU_MMAP_SIZE as _KVM_GET_VCPU_MMAP_SIZE  # noqa: E402
from fakekvm.abi.uffd import UFFD_API as _UFFD_API  # noqa: E402
from fakekvm.abi.uffd import UFFDIO_API as _UFFDIO_API  # noqa: E402


@dataclass
class HostProbe:
    api_version: int
    sys_caps: dict[int, int]
    vm0_caps: dict[int, int]
    vm_types: frozenset[int]
    vcpu_mmap_size: int
    uffd_features: int | None
    release: str


def probe_host(kernel: Kernel | None = None, *, max_cap: int = 300) -> HostProbe:
    """Ask the live kernel everything a profile holds (through the `Kernel` seam)."""
    import struct

    from fakekvm.kernel.real import RealKernel

    k = kernel or RealKernel()
    kvm = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        api = k.ioctl(kvm, _KVM_GET_API_VERSION, 0)
        mmap_size = k.ioctl(kvm, _KVM_GET_VCPU_MMAP_SIZE, 0)
        sys_caps = {c: k.ioctl(kvm, _KVM_CHECK_EXTENSION, c) for c in range(max_cap + 1)}
        vm = k.ioctl(kvm, _KVM_CREATE_VM, 0)
        try:
            vm0 = {c: k.ioctl(vm, _KVM_CHECK_EXTENSION, c) for c in range(max_cap + 1)}
        finally:
            k.close(vm)
    finally:
        k.close(kvm)
    mask = sys_caps.get(KVM_CAP_VM_TYPES, 0) or 1
    types = frozenset(t for t in range(32) if mask >> t & 1)
    feats: int | None
    try:
        ufd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        feats = None
    else:
        try:
            buf = bytearray(struct.pack("=QQQ", _UFFD_API, 0, 0))
            k.ioctl(ufd, _UFFDIO_API, buf)
            feats = struct.unpack_from("=Q", buf, 8)[0]
        except OSError:
            feats = None
        finally:
            k.close(ufd)
    return HostProbe(
        api_version=api,
        sys_caps={c: v for c, v in sys_caps.items() if v},
        vm0_caps={c: v for c, v in vm0.items() if v},
        vm_types=types,
        vcpu_mmap_size=mmap_size,
        uffd_features=feats,
        release=os.uname().release,
    )


def profile_from_probe(p: HostProbe) -> Profile:
    """Lay a `HostProbe` over the nearest known profile."""
    ver = tuple(int(x) for x in p.release.split("-")[0].split(".")[:2])
    pvm = os.path.exists("/sys/module/kvm_pvm") or _kvm_is_pvm()
    if ver >= (6, 18):
        base = PVM_6_18 if pvm else MAINLINE_6_18
    elif ver >= (6, 8):
        base = MAINLINE_6_8
    else:
        base = MAINLINE_6_1
    online = min(os.cpu_count() or 1, base.max_vcpus)
    sys_raw = {c: (ONLINE_CPUS if c == KVM_CAP_NR_VCPUS and v == online else v)
               for c, v in p.sys_caps.items()}  # fmt: skip
    vm0 = {c: v for c, v in p.vm0_caps.items() if p.sys_caps.get(c, 0) != v}
    vm0.update({c: 0 for c in p.sys_caps if c not in p.vm0_caps})
    overrides = dict(base.vm_cap_overrides)
    overrides[0] = _freeze(vm0)
    return dataclasses.replace(
        base,
        name=f"auto({base.name})",
        version=(ver[0], ver[1]) if len(ver) == 2 else base.version,
        api_version=p.api_version,
        sys_caps_raw=_freeze(sys_raw),
        vm_cap_overrides=MappingProxyType(overrides),
        vm_types=p.vm_types,
        vcpu_mmap_size=p.vcpu_mmap_size,
        max_vcpus=p.sys_caps.get(KVM_CAP_MAX_VCPUS, base.max_vcpus),
        max_vcpu_id=p.sys_caps.get(KVM_CAP_MAX_VCPU_ID, base.max_vcpu_id),
        nr_memslots=p.sys_caps.get(KVM_CAP_NR_MEMSLOTS, base.nr_memslots),
        manual_dirty_log_caps=p.sys_caps.get(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0),
        has_region2=bool(p.sys_caps.get(KVM_CAP_USER_MEMORY2)),
        has_guest_memfd=bool(p.sys_caps.get(KVM_CAP_GUEST_MEMFD)),
        uffd_features=p.uffd_features if p.uffd_features is not None else base.uffd_features,
    )


def _kvm_is_pvm() -> bool:
    try:
        with open("/proc/config.gz", "rb") as f:
            import gzip

            return b"CONFIG_KVM_PVM=y" in gzip.decompress(f.read())
    except OSError:
        return False


@functools.cache
def auto_profile() -> Profile:
    """The profile of this host, probed once per process."""
    return profile_from_probe(probe_host())
