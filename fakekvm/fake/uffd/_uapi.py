"""The userfaultfd uAPI names this package uses, from :mod:`fakekvm.abi.uffd` (userfaultfd.h).

Re-exports the C names (constants, ioctl numbers, ``struct.Struct`` codecs) and adds the one
codec this package needs that the abi module does not spell: `uffd_msg_fmt`, the raw 32-byte
message as (event, reserved1, reserved2, reserved3, arg0, arg1, arg2).
"""

from __future__ import annotations

import struct

from fakekvm.abi.uffd import *  # noqa: F403 - the C names, verbatim
from fakekvm.abi.uffd import (  # the command numbers: underscore names are not in "*"
    _UFFDIO_API,
    _UFFDIO_CONTINUE,
    _UFFDIO_COPY,
    _UFFDIO_MOVE,
    _UFFDIO_POISON,
    _UFFDIO_REGISTER,
    _UFFDIO_UNREGISTER,
    _UFFDIO_WAKE,
    _UFFDIO_WRITEPROTECT,
    _UFFDIO_ZEROPAGE,
    UFFD_MSG_SIZE,
)

__all__ = [
    "_UFFDIO_API", "_UFFDIO_CONTINUE", "_UFFDIO_COPY", "_UFFDIO_MOVE", "_UFFDIO_POISON",
    "_UFFDIO_REGISTER", "_UFFDIO_UNREGISTER", "_UFFDIO_WAKE", "_UFFDIO_WRITEPROTECT",
    "_UFFDIO_ZEROPAGE", "uffd_msg_fmt",
]

#: a raw uffd_msg: event u8, reserved1 u8, reserved2 u16, reserved3 u32, then the 24-byte arg
#: union as three u64 (pagefault: flags, address, ptid|pad; remove: start, end; remap: from, to, len)
uffd_msg_fmt = struct.Struct("<BBHIQQQ")
assert uffd_msg_fmt.size == UFFD_MSG_SIZE
