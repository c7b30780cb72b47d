"""Number <-> name lookups for every printout, trace and error message.

Tables are built once, at import, from :mod:`fakekvm.abi.kvm`,
:mod:`fakekvm.abi.uffd`, :mod:`fakekvm.abi.kvm_userfault` and :mod:`errno`;
each lookup is one dict access.

* :func:`name` / :func:`value` — both ways within a namespace (:data:`NAMESPACES`):
  ``name("exit", 6) == "KVM_EXIT_MMIO"``, ``value("cap", "KVM_CAP_USER_MEMORY2") == 231``.
* :func:`ioctl_name` — an ioctl request's name, or the decoded
  ``_IOC(dir, type, nr, size)`` for a number nobody defines.
* :func:`decode_flags` / :func:`flag_names` — a bitmask as
  ``"KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY"`` / as a list; unknown bits are
  shown as hex.

The "ioctl" namespace holds the upstream KVM and UFFDIO requests plus the
(NOT UPSTREAM) ``KVM_READ_USERFAULT``; it shares nr 0xd5 with
``KVM_PRE_FAULT_MEMORY`` but not the full number, so neither shadows the other.
"""

from __future__ import annotations

import errno as _errno

from fakekvm.abi import kvm, kvm_userfault, uffd
from fakekvm.abi.ioctl import _IOC_DIR, _IOC_NR, _IOC_READ, _IOC_SIZE, _IOC_TYPE, _IOC_WRITE


def _prefixed(module: object, prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    return {
        k: v
        for k, v in vars(module).items()
        if k.startswith(prefix) and isinstance(v, int) and not k.startswith(exclude)
    }


def _ioctl_table() -> dict[str, int]:
    t: dict[str, int] = {}
    t.update(kvm.KVM_IOCTLS)
    t.update(uffd.UFFD_IOCTLS)
    t.update(kvm_userfault.KVM_USERFAULT_IOCTLS)
    return t


#: namespace -> {name: value}
_BY_NAME: dict[str, dict[str, int]] = {
    "ioctl": _ioctl_table(),
    "exit": dict(kvm.KVM_EXITS),
    "cap": dict(kvm.KVM_CAPS),
    "io_direction": {"KVM_EXIT_IO_IN": kvm.KVM_EXIT_IO_IN, "KVM_EXIT_IO_OUT": kvm.KVM_EXIT_IO_OUT},
    "internal_error": _prefixed(kvm, "KVM_INTERNAL_ERROR_", ("KVM_INTERNAL_ERROR_EMULATION_FLAG",)),
    "system_event": _prefixed(kvm, "KVM_SYSTEM_EVENT_"),
    "vm_type": {k: v for k, v in _prefixed(kvm, "KVM_X86_").items() if k.endswith("_VM")},
    "mp_state": _prefixed(kvm, "KVM_MP_STATE_"),
    "uffd_event": _prefixed(uffd, "UFFD_EVENT_"),
    "errno": {n: getattr(_errno, n) for n in dir(_errno) if n.startswith("E")},
    # flag namespaces (single bits)
    "memslot_flag": {
        **_prefixed(kvm, "KVM_MEM_"),
        "KVM_MEM_USERFAULT": kvm_userfault.KVM_MEM_USERFAULT,  # NOT UPSTREAM
    },
    "memory_exit_flag": {
        "KVM_MEMORY_EXIT_FLAG_PRIVATE": kvm.KVM_MEMORY_EXIT_FLAG_PRIVATE,
        "KVM_MEMORY_EXIT_FLAG_USERFAULT": kvm_userfault.KVM_MEMORY_EXIT_FLAG_USERFAULT,  # NOT UPSTREAM
    },
    "memory_attribute": {
        "KVM_MEMORY_ATTRIBUTE_PRIVATE": kvm.KVM_MEMORY_ATTRIBUTE_PRIVATE,
        "KVM_MEMORY_ATTRIBUTE_USERFAULT": kvm_userfault.KVM_MEMORY_ATTRIBUTE_USERFAULT,  # RFC
    },
    "gmem_flag": _prefixed(kvm, "GUEST_MEMFD_FLAG_"),
    "sync_regs": _prefixed(kvm, "KVM_SYNC_X86_", ("KVM_SYNC_X86_VALID",)),
    "run_flag": _prefixed(kvm, "KVM_RUN_X86_"),
    "irqfd_flag": _prefixed(kvm, "KVM_IRQFD_FLAG_"),
    "ioeventfd_flag": _prefixed(kvm, "KVM_IOEVENTFD_FLAG_"),
    "dirty_log_protect": {
        "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": kvm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
        "KVM_DIRTY_LOG_INITIALLY_SET": kvm.KVM_DIRTY_LOG_INITIALLY_SET,
    },
    "uffd_feature": _prefixed(uffd, "UFFD_FEATURE_"),
    "uffd_pagefault_flag": _prefixed(uffd, "UFFD_PAGEFAULT_FLAG_"),
    "uffdio_register_mode": _prefixed(uffd, "UFFDIO_REGISTER_MODE_"),
    "uffdio_copy_mode": _prefixed(uffd, "UFFDIO_COPY_MODE_"),
    "uffdio_zeropage_mode": _prefixed(uffd, "UFFDIO_ZEROPAGE_MODE_"),
    "uffdio_writeprotect_mode": _prefixed(uffd, "UFFDIO_WRITEPROTECT_MODE_"),
    "uffdio_continue_mode": _prefixed(uffd, "UFFDIO_CONTINUE_MODE_"),
    "uffdio_poison_mode": _prefixed(uffd, "UFFDIO_POISON_MODE_"),
    "uffdio_move_mode": _prefixed(uffd, "UFFDIO_MOVE_MODE_"),
    # the bits of uffdio_api.ioctls / uffdio_register.ioctls
    "uffd_ioctls": {n: 1 << nr for nr, n in uffd.UFFDIO_CMD_NAMES.items()},
}

#: namespaces whose values are bitmasks (decode_flags applies)
FLAG_NAMESPACES = frozenset(
    {
        "memslot_flag",
        "memory_exit_flag",
        "memory_attribute",
        "gmem_flag",
        "sync_regs",
        "run_flag",
        "irqfd_flag",
        "ioeventfd_flag",
        "dirty_log_protect",
        "uffd_feature",
        "uffd_pagefault_flag",
        "uffdio_register_mode",
        "uffdio_copy_mode",
        "uffdio_zeropage_mode",
        "uffdio_writeprotect_mode",
        "uffdio_continue_mode",
        "uffdio_poison_mode",
        "uffdio_move_mode",
        "uffd_ioctls",
    }
)

NAMESPACES = tuple(_BY_NAME)


def _invert(table: dict[str, int]) -> dict[int, str]:
    inv: dict[int, str] = {}
    for n, v in table.items():
        inv.setdefault(v, n)  # first definition wins
    return inv


_BY_VALUE: dict[str, dict[int, str]] = {ns: _invert(t) for ns, t in _BY_NAME.items()}
_BY_VALUE["errno"] = dict(_errno.errorcode)  # the canonical name for aliased values
_IOCTLS_BY_VALUE = _BY_VALUE["ioctl"]


def table(ns: str) -> dict[str, int]:
    """A copy of namespace ``ns`` as {name: value}."""
    return dict(_BY_NAME[ns])


def name(ns: str, value: int) -> str:
    """The C name of ``value`` in namespace ``ns``; KeyError if none."""
    try:
        return _BY_VALUE[ns][value]
    except KeyError:
        if ns not in _BY_VALUE:
            raise KeyError(f"unknown namespace {ns!r}") from None
        raise KeyError(f"{ns}: no name for {value:#x}") from None


def value(ns: str, name_: str) -> int:
    """The value of C name ``name_`` in ``ns``; flag namespaces accept ``"A|B"``."""
    t = _BY_NAME[ns]
    if ns in FLAG_NAMESPACES and "|" in name_:
        v = 0
        for part in name_.split("|"):
            v |= t[part] if part in t else int(part, 0)
        return v
    return t[name_]


def describe(ns: str, value_: int) -> str:
    """``name`` if known, else ``"<ns> <value>"`` — never raises (for printouts)."""
    if ns == "ioctl":
        return ioctl_name(value_)
    if ns in FLAG_NAMESPACES:
        return decode_flags(ns, value_)
    n = _BY_VALUE[ns].get(value_)
    return n if n is not None else f"<{ns} {value_}>"


def ioctl_name(request: int) -> str:
    """``"KVM_RUN"``, or ``"_IOC(_IOC_READ|_IOC_WRITE, 0xae, 0xff, 0x10)"`` if unknown."""
    n = _IOCTLS_BY_VALUE.get(request)
    if n is not None:
        return n
    d = _IOC_DIR(request)
    dirs = [s for bit, s in ((_IOC_READ, "_IOC_READ"), (_IOC_WRITE, "_IOC_WRITE")) if d & bit]
    dir_s = "|".join(dirs) if dirs else "_IOC_NONE"
    return (
        f"_IOC({dir_s}, {_IOC_TYPE(request):#04x}, {_IOC_NR(request):#04x}, "
        f"{_IOC_SIZE(request):#x})"
    )


def flag_names(ns: str, value_: int) -> list[str]:
    """The names of the bits set in ``value_``, lowest first; unknown bits as hex."""
    inv = _BY_VALUE[ns]
    out: list[str] = []
    unknown = 0
    v = value_
    while v:
        bit = v & -v
        v ^= bit
        n = inv.get(bit)
        if n is None:
            unknown |= bit
        else:
            out.append(n)
    if unknown:
        out.append(f"{unknown:#x}")
    return out


def decode_flags(ns: str, value_: int) -> str:
    """``"KVM_MEM_LOG_DIRTY_PAGES|KVM_MEM_READONLY"``; ``"0"`` for no bits."""
    return "|".join(flag_names(ns, value_)) or "0"
