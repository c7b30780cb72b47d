"""A live, read-only view of unicorn's ``CPUX86State`` (``env``) for the TLB-fill hot path.

The TLB-fill hook needs the paging mode (CR0, CR3, CR4, EFER) and the CPL on every
fill. Through the API that is a ``uc_reg_read_batch`` (~1.8 µs from Python) plus an
``uc_msr_read`` (~6 µs); read from QEMU's ``CPUX86State`` in place it is a few
``memoryview`` indexings. These are exactly the fields ``uc_reg_read`` /
``uc_msr_read`` return (``qemu/target/i386/unicorn.c``: ``env->cr[n]``,
``env->segs[R_CS].selector``, ``env->efer``), and QEMU's helpers write them in place
(``helper_write_crN``, ``helper_wrmsr``, ``cpu_x86_load_seg_cache``), so a read from
inside a hook sees what the API would.

Where ``env`` is: ``struct uc_struct`` holds ``CPUState *cpu`` (``include/uc_priv.h``),
and ``env`` sits at a fixed offset inside the ``X86CPU`` that pointer designates
(``qemu/target/i386/cpu.h``: ``X86CPU { CPUState parent_obj; CPUNegativeOffsetState
neg; CPUX86State env; ...}``). Neither offset is in a public header, so both are
*measured* at import, like :mod:`fakekvm.fake.cpu.layout` does for the context:
distinctive register values are written through the API and searched for behind the
pointers found in ``uc_struct`` (read with ``process_vm_readv``, which fails instead of
faulting on a bad pointer). EFER's offset is found by toggling EFER.NXE through
``uc_msr_write``. Every view is checked against the API when it is made; a unicorn
build whose layout differs fails loudly.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as X

from fakekvm.fake.cpu import layout

MSR_EFER = 0xC000_0080

#: indexes into the u64 view (offsets / 8); CS selector is a u32 (upper half padding)
I_CR0 = (layout.OFF_CR + 0 * 8) // 8
I_CR3 = (layout.OFF_CR + 3 * 8) // 8
I_CR4 = (layout.OFF_CR + 4 * 8) // 8
I_CS = (layout.OFF_SEGS + layout.R_CS * layout.SEG_SIZE) // 8

_GPRS = (
    X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
    X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
    X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
    X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15,
)  # fmt: skip  (env->regs[] order: R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP, R_ESI, R_EDI, r8..r15)
_MAGIC = tuple(0x5EED_0000_0000_0000 | (i * 0x0101_0101_0101 + 0x1234_5678) for i in range(16))
_UC_SCAN = 0x1000  # bytes of uc_struct searched for the CPUState pointer
_CPU_SCAN = 0x40000  # bytes of X86CPU searched for env

_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _peek(address: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``address`` of this process (fewer at the end of a mapping, b"" if unmapped)."""
    buf = ctypes.create_string_buffer(n)
    local = _IoVec(ctypes.addressof(buf), n)
    remote = _IoVec(address, n)
    r = _libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return buf.raw[: max(r, 0)]


def _uc_ptr(uc: Any) -> int:
    return int(uc._uch.value)


def _init(uc: Any) -> None:
    # unicorn creates the CPU lazily, on the first call that needs it
    uc.reg_read(X.UC_X86_REG_RAX)


def _fresh(salt: int) -> tuple[Any, tuple[int, ...]]:
    """A new initialised Uc with distinctive values (depending on ``salt``) in its 16 GPRs."""
    uc: Any = Uc(UC_ARCH_X86, UC_MODE_64)
    _init(uc)
    magic = tuple(m ^ (salt * 0x0000_7F00_0000_7F00) for m in _MAGIC)
    for r, v in zip(_GPRS, magic, strict=True):
        uc.reg_write(r, v)
    return uc, magic


def _holds(uc: Any, magic: tuple[int, ...], uc_off: int, env_off: int) -> bool:
    head = _peek(_uc_ptr(uc) + uc_off, 8)
    if len(head) != 8:
        return False
    return _peek(struct.unpack("<Q", head)[0] + env_off, 128) == struct.pack("<16Q", *magic)


def _measure() -> tuple[int, int, int]:
    """(offset of ``cpu`` in uc_struct, offset of env in X86CPU, offset of efer in env)."""
    uc, magic = _fresh(0)
    pattern = struct.pack("<16Q", *magic)
    head = _peek(_uc_ptr(uc), _UC_SCAN)
    hits: list[tuple[int, int]] = []
    for uc_off in range(0, len(head) - 7, 8):
        p = struct.unpack_from("<Q", head, uc_off)[0]
        if p < 0x10000 or p >= 1 << 47 or p & 7:
            continue
        i = _peek(p, _CPU_SCAN).find(pattern)
        if i >= 0 and i % 8 == 0:
            hits.append((i, uc_off))
    # Other uc_struct pointers lead to objects allocated before the CPU, so they see env
    # at a larger distance that depends on the heap's layout: keep the closest one that
    # holds in two more instances (created with other allocations in between).
    others = [_fresh(1)]
    spacer = [bytearray(n) for n in (64, 4096, 40000)]
    others.append(_fresh(2))
    del spacer
    found: tuple[int, int] | None = None
    for env_off, uc_off in sorted(hits):
        if all(_holds(o, m, uc_off, env_off) for o, m in others):
            found = (uc_off, env_off)
            break
    if found is None:
        raise RuntimeError("unicorn layout: CPUX86State not found behind uc_struct (a different unicorn build?)")
    uc_off, env_off = found
    env = struct.unpack_from("<Q", _peek(_uc_ptr(uc) + uc_off, 8))[0] + env_off
    # efer is saved in a context (before end_reset_fields): search only that prefix of env
    before = _peek(env, uc.context_save().size - layout.CTX_HEADER)
    efer0 = uc.msr_read(MSR_EFER)
    uc.msr_write(MSR_EFER, efer0 ^ (1 << 11))  # NXE
    efer1 = uc.msr_read(MSR_EFER)
    after = _peek(env, len(before))
    efer_at = [
        o for o in range(0, len(after) - 7, 8)
        if struct.unpack_from("<Q", before, o)[0] == efer0 and struct.unpack_from("<Q", after, o)[0] == efer1
    ]  # fmt: skip
    if efer0 == efer1 or len(efer_at) != 1:
        raise RuntimeError(f"unicorn layout: env->efer not found (candidates {efer_at})")
    return uc_off, env_off, efer_at[0]


UC_CPU_OFF, ENV_OFF, OFF_EFER = _measure()
I_EFER = OFF_EFER // 8
_VIEW_BYTES = OFF_EFER + 8


def env_view(uc: Any) -> memoryview:
    """u64 view of ``uc``'s live CPUX86State (valid while ``uc`` is open). Checked against the API."""
    _init(uc)
    cpu = ctypes.c_uint64.from_address(_uc_ptr(uc) + UC_CPU_OFF).value
    if not cpu:
        raise RuntimeError("unicorn: uc->cpu is NULL")
    view = memoryview((ctypes.c_char * _VIEW_BYTES).from_address(cpu + ENV_OFF)).cast("B").cast("Q")
    saved = uc.reg_read(X.UC_X86_REG_R15)
    uc.reg_write(X.UC_X86_REG_R15, _MAGIC[15])
    ok = view[15] == _MAGIC[15]
    uc.reg_write(X.UC_X86_REG_R15, saved)
    ok = ok and view[15] == saved
    ok = ok and view[I_CR0] == uc.reg_read(X.UC_X86_REG_CR0) and view[I_CR3] == uc.reg_read(X.UC_X86_REG_CR3)
    ok = ok and view[I_CR4] == uc.reg_read(X.UC_X86_REG_CR4) and view[I_EFER] == uc.msr_read(MSR_EFER)
    ok = ok and view[I_CS] & 0xFFFF_FFFF == uc.reg_read(X.UC_X86_REG_CS)
    if not ok:
        raise RuntimeError("unicorn layout: the live CPUX86State view does not match uc_reg_read")
    return view
