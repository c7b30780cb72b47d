"""NOT UPSTREAM: fakekvm's own confidential VM type.

Upstream x86 decides whether a guest access is private from the gfn's
attribute alone (``KVM_X86_SW_PROTECTED_VM``), so a private/shared mismatch
cannot happen there. Real confidential types let the guest say it: TDX marks a
*shared* access with a bit of the guest-physical address. The fake type does the
same, so shared->private conversion faults (``KVM_EXIT_MEMORY_FAULT`` with
``KVM_MEMORY_EXIT_FLAG_PRIVATE``) can be exercised; it exists only in the
``+fake-cc`` profiles of `FakeKernel` and no real kernel accepts it.
"""

from __future__ import annotations

#: the KVM_CREATE_VM type (upstream uses 0..5); bit 16 of KVM_CAP_VM_TYPES
KVM_X86_FAKE_CC_VM = 16
#: the guest-physical address bit that marks a shared access (TDX with GPAW 48: bit 47)
FAKE_CC_SHARED_BIT = 1 << 47
