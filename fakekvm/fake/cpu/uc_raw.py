"""Thin, fast access to libunicorn below the Python binding.

The binding wraps every hook in Python decorators and builds ctypes arrays on
each ``reg_read_batch``; on the engine's hot paths (the TLB-fill hook on every
first touch of a page, register reads on every exit) that overhead dominates.
Here: a raw ``UC_HOOK_TLB_FILL`` registration (``uc_cb_tlbevent_t`` from
``include/unicorn/unicorn.h``) and preallocated batch register readers.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

from unicorn import Uc, UcError
from unicorn.unicorn_const import UC_ERR_OK, UC_HOOK_TLB_FILL
from unicorn.unicorn_py3.unicorn import uclib


class TlbEntry(ctypes.Structure):
    _fields_ = [("paddr", ctypes.c_uint64), ("perms", ctypes.c_int)]


TLB_FILL_CFUNC = ctypes.CFUNCTYPE(
    ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(TlbEntry), ctypes.c_void_p
)


#: ``(uc, vaddr, mem_type, entry, user_data) -> bool``, called straight from C
TlbFillFn = Callable[[int, int, int, "ctypes._Pointer[TlbEntry]", int], bool]


def hook_tlb_fill(uc: Uc, fn: TlbFillFn) -> object:
    """Install ``fn`` as the TLB-fill hook (no wrapper frame); returns the keep-alive pointer.

    ``fn`` fills ``entry.contents`` (paddr, perms) and returns True, or returns False
    for "no translation" (unicorn then raises the access as unmapped).
    """
    fptr = TLB_FILL_CFUNC(fn)
    h = ctypes.c_size_t()
    status = uclib.uc_hook_add(
        uc._uch, ctypes.byref(h), UC_HOOK_TLB_FILL, fptr, None, ctypes.c_uint64(1), ctypes.c_uint64(0)
    )
    if status != UC_ERR_OK:
        raise UcError(status)
    return fptr


# The same library, with the batch functions called without argtypes conversion
# (arguments are passed as ready ctypes objects): half the cost of the binding's call.
_lib = ctypes.CDLL(uclib._name)
_read_batch = _lib.uc_reg_read_batch
_read_batch.restype = ctypes.c_int
_read_batch.argtypes = None  # type: ignore[assignment]
_write_batch = _lib.uc_reg_write_batch
_write_batch.restype = ctypes.c_int
_write_batch.argtypes = None  # type: ignore[assignment]


class BatchReader:
    """Read a fixed list of 64-bit registers in one ``uc_reg_read_batch`` call."""

    def __init__(self, uc: Uc, regs: Sequence[int]) -> None:
        n = len(regs)
        self._uch = ctypes.c_void_p(uc._uch.value)  # type: ignore[union-attr]
        self._n = ctypes.c_int(n)
        self._ids = (ctypes.c_int * n)(*regs)
        self._vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self._vals)
        self._ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])

    def read(self) -> list[int]:
        status = _read_batch(self._uch, self._ids, self._ptrs, self._n)
        if status != UC_ERR_OK:
            raise UcError(status)
        return self._vals[:]


class BatchWriter:
    """Write a fixed list of 64-bit registers in one ``uc_reg_write_batch`` call."""

    def __init__(self, uc: Uc, regs: Sequence[int]) -> None:
        n = len(regs)
        self._uch = ctypes.c_void_p(uc._uch.value)  # type: ignore[union-attr]
        self._n = ctypes.c_int(n)
        self._ids = (ctypes.c_int * n)(*regs)
        self._vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self._vals)
        self._ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])

    def write(self, values: Sequence[int]) -> None:
        for i, v in enumerate(values):
            self._vals[i] = v & 0xFFFF_FFFF_FFFF_FFFF
        status = _write_batch(self._uch, self._ids, self._ptrs, self._n)
        if status != UC_ERR_OK:
            raise UcError(status)
