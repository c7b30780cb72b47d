"""The kernel's ioctl number arithmetic, `include/uapi/asm-generic/ioctl.h`.

x86-64 uses the asm-generic layout::

    _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr

Every ioctl number in :mod:`fakekvm.abi` is computed with these functions from
(type, nr, struct); none is typed as a hex literal.
"""

from __future__ import annotations

from typing import Protocol


class _Sized(Protocol):
    def sizeof(self) -> int: ...


_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _size(struct: _Sized | int) -> int:
    return struct if isinstance(struct, int) else struct.sizeof()


def _IOC(dir: int, type: int, nr: int, size: int) -> int:
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (dir << _IOC_DIRSHIFT)
        | (type << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type: int, nr: int, struct: _Sized | int) -> int:
    return _IOC(_IOC_READ, type, nr, _size(struct))


def _IOW(type: int, nr: int, struct: _Sized | int) -> int:
    return _IOC(_IOC_WRITE, type, nr, _size(struct))


def _IOWR(type: int, nr: int, struct: _Sized | int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, _size(struct))


def _IOC_DIR(nr: int) -> int:
    return (nr >> _IOC_DIRSHIFT) & _IOC_DIRMASK


def _IOC_TYPE(nr: int) -> int:
    return (nr >> _IOC_TYPESHIFT) & _IOC_TYPEMASK


def _IOC_NR(nr: int) -> int:
    return (nr >> _IOC_NRSHIFT) & _IOC_NRMASK


def _IOC_SIZE(nr: int) -> int:
    return (nr >> _IOC_SIZESHIFT) & _IOC_SIZEMASK
