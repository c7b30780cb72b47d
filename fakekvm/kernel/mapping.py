"""`Mapping`: what `Kernel.mmap` returns.

A mapping is a window on host memory at a known virtual address: it supports
the buffer protocol (``memoryview(m)``, ``m[i]``, slicing) and carries
``.address`` and ``.length``, so it can be handed to code that wants bytes
(``memoryview(m)[off:off+4096] = page``) and to ioctls that want pointers
(``uffdio_copy.src = m.address + off``).

It is a ctypes array laid over the mapped range, so no copy is ever made and
Python 3.11 (which cannot give a pure-Python class the buffer protocol) sees a
real buffer. One array type per length is cached.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


class Mapping:
    """Mixin carried by every mapping type; use :func:`make_mapping` to build one."""

    address: int
    fd: int
    prot: int
    flags: int
    offset: int
    owner: Any  # the Kernel that made it, for munmap and for fakes

    @property
    def length(self) -> int:
        return ctypes.sizeof(self)  # type: ignore[arg-type]

    @property
    def end(self) -> int:
        return self.address + self.length

    def view(self) -> memoryview:
        """A flat unsigned-byte memoryview of the whole mapping."""
        return memoryview(self).cast("B")  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"<Mapping 0x{self.address:x}-0x{self.end:x} len={self.length:#x} "
            f"prot={self.prot} flags={self.flags:#x} fd={self.fd}>"
        )


@functools.lru_cache(maxsize=256)
def _mapping_type(length: int) -> Any:
    return type("Mapping", (Mapping, ctypes.c_ubyte * length), {})


def make_mapping(
    address: int,
    length: int,
    *,
    fd: int = -1,
    prot: int = 0,
    flags: int = 0,
    offset: int = 0,
    owner: Any = None,
) -> Mapping:
    """Lay a :class:`Mapping` over ``length`` bytes of host memory at ``address``."""
    m = _mapping_type(length).from_address(address)
    m.address = address
    m.fd = fd
    m.prot = prot
    m.flags = flags
    m.offset = offset
    m.owner = owner
    return m
