"""KVM Userfault — *** NOT UPSTREAM. NO RELEASED KERNEL HAS ANY OF THIS. ***

James Houghton's (Google) proposal to let userspace intercept vCPU faults on
chosen gfns (uapi.md §3). It was never merged as of v7.2-rc1: the live 6.18
kernel rejects ``KVM_MEM_USERFAULT`` (memslot flag bit 3) with EINVAL. fakekvm
models it so a kernel *profile* can offer it; the fake must not offer it in a
profile that stands for a released kernel.

Two designs, both here:

* **v1/v2/v3** ("[PATCH v3 00/15] KVM: Introduce KVM Userfault", 2025-06-18,
  lore ``20250618042424.330664-1-jthoughton@google.com``): memslot flag
  ``KVM_MEM_USERFAULT = 1 << 3``; ``kvm_userspace_memory_region2`` grows
  ``__u64 userfault_bitmap`` at offset 48 (first ``pad2`` word; ``pad2[13]``
  remains, size stays 160); a vCPU fault on a gfn whose bit is set exits with
  ``KVM_EXIT_MEMORY_FAULT``, ``memory_fault.flags`` has
  ``KVM_MEMORY_EXIT_FLAG_USERFAULT = 1 << 4``, and KVM_RUN fails EFAULT.
* **RFC** ("[RFC PATCH 00/18] KVM: Post-copy live migration for guest_memfd",
  2024-07-10, lore ``20240710234222.2333120-1-jthoughton@google.com``): memory
  attribute ``KVM_MEMORY_ATTRIBUTE_USERFAULT = 1 << 4``, enabled with
  ``KVM_ENABLE_CAP(KVM_CAP_USERFAULT, args[0] = KVM_USERFAULT_ENABLE/DISABLE,
  args[1] = eventfd)``, and asynchronous userfaults popped with
  ``KVM_READ_USERFAULT = _IOR(KVMIO, 0xd5, struct kvm_fault)`` (whose
  ``address`` field carries a gfn).

The capability NUMBER changed with every revision and each number it used now
belongs to an upstream capability, so it is NOT a global constant: a profile
picks it from :data:`USERFAULT_CAP_BY_REVISION`.
"""

from __future__ import annotations

import struct

from construct import Array, Int32ul, Int64ul, Struct

from fakekvm.abi.ioctl import _IOR
from fakekvm.abi.kvm import KVMIO

# ---------------------------------------------------------------------------------------------
# v1 .. v3: memslot flag + bitmap
# ---------------------------------------------------------------------------------------------

KVM_MEM_USERFAULT = 1 << 3
KVM_MEMORY_EXIT_FLAG_USERFAULT = 1 << 4

#: the v1..v3 layout of ``struct kvm_userspace_memory_region2`` (still 160 bytes)
kvm_userspace_memory_region2 = Struct(
    "slot" / Int32ul,
    "flags" / Int32ul,
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "guest_memfd_offset" / Int64ul,
    "guest_memfd" / Int32ul,
    "pad1" / Int32ul,
    "userfault_bitmap" / Int64ul,
    "pad2" / Array(13, Int64ul),
)
#: slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
#: guest_memfd, pad1, userfault_bitmap (pad2 packed as zeros, skipped on unpack)
kvm_userspace_memory_region2_fmt = struct.Struct("<IIQQQQIIQ104x")
USERFAULT_BITMAP_OFFSET = 48

# ---------------------------------------------------------------------------------------------
# RFC: memory attribute + KVM_READ_USERFAULT
# ---------------------------------------------------------------------------------------------

KVM_MEMORY_ATTRIBUTE_USERFAULT = 1 << 4
KVM_USERFAULT_ENABLE = 1 << 0
KVM_USERFAULT_DISABLE = 1 << 1

kvm_fault = Struct("address" / Int64ul)  # a gfn, despite the name
kvm_fault_fmt = struct.Struct("<Q")

#: shares nr 0xd5 with upstream KVM_PRE_FAULT_MEMORY (_IOWR, 64 bytes) but not the number
KVM_READ_USERFAULT = _IOR(KVMIO, 0xD5, kvm_fault)

#: KVM_CAP_USERFAULT per revision. Every one collides with an upstream cap today:
#: 236 = KVM_CAP_PRE_FAULT_MEMORY (6.10), 239 = KVM_CAP_ARM_WRITABLE_IMP_ID_REGS,
#: 240 = KVM_CAP_ARM_EL2, 243 = KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED. A profile
#: that offers userfault must therefore not also report the upstream cap at that number.
USERFAULT_CAP_BY_REVISION: dict[str, int] = {
    "rfc": 236,
    "v1": 239,
    "v2": 239,
    "sean-rework": 240,
    "v3": 243,
}

#: the proposal's ioctls, name -> number (kept apart from the upstream table)
KVM_USERFAULT_IOCTLS: dict[str, int] = {"KVM_READ_USERFAULT": KVM_READ_USERFAULT}
