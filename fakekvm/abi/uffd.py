"""The userfaultfd uAPI as data: structs, ioctl numbers and constants.

Follows ``include/uapi/linux/userfaultfd.h`` (text as of v6.8-rc2, which
strace's syncs through v7.2-rc1 show unchanged; see
``/work/shared/reference/uapi.md`` §2) and
``Documentation/admin-guide/mm/userfaultfd.rst``. Names are the C names.

Each struct has a ``construct`` definition (``uffdio_copy``) and, for the hot
ones, a precompiled :class:`struct.Struct` ``<name>_fmt`` in C field order with
nested ``range`` flattened (``uffdio_copy_fmt.unpack(b)`` ->
``(dst, src, len, mode, copy)``). The output fields (``copy``, ``zeropage``,
``mapped``, ``updated``, ``move``) are signed: negative means ``-errno``.

``uffd_msg`` is ``__attribute__((packed))``; its ``arg`` union is modelled as
a ``construct.Union`` whose raw arm ``reserved`` comes first, so a Container
from ``parse`` builds back to the same bytes; to build one event pass only its
arm (``{"pagefault": {...}}``) or use ``uffd_msg_pagefault_fmt``.
"""

from __future__ import annotations

import struct

from construct import Int8ul, Int16ul, Int32ul, Int64sl, Int64ul, Padded, Padding, Struct, Union

from fakekvm.abi.ioctl import _IO, _IOR, _IOWR

USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)

UFFDIO = 0xAA
UFFD_API = 0xAA

#: userfaultfd(2) flag: only user-mode faults are reported
UFFD_USER_MODE_ONLY = 1

# ---------------------------------------------------------------------------------------------
# struct uffd_msg (32 bytes, packed)
# ---------------------------------------------------------------------------------------------

uffd_msg_arg_pagefault = Struct(
    "flags" / Int64ul,
    "address" / Int64ul,
    "feat" / Struct("ptid" / Int32ul),  # union { __u32 ptid; } feat
    Padding(4),  # the arm is 8-aligned: 24 bytes
)
uffd_msg_arg_fork = Struct("ufd" / Int32ul)
uffd_msg_arg_remap = Struct("from" / Int64ul, "to" / Int64ul, "len" / Int64ul)
uffd_msg_arg_remove = Struct("start" / Int64ul, "end" / Int64ul)
uffd_msg_arg_reserved = Struct(
    "reserved1" / Int64ul, "reserved2" / Int64ul, "reserved3" / Int64ul
)

UFFD_MSG_ARG_OFFSET = 8

uffd_msg = Struct(
    "event" / Int8ul,
    "reserved1" / Int8ul,
    "reserved2" / Int16ul,
    "reserved3" / Int32ul,
    "arg" / Padded(
        24,
        Union(
            None,
            "reserved" / uffd_msg_arg_reserved,
            "pagefault" / uffd_msg_arg_pagefault,
            "fork" / uffd_msg_arg_fork,
            "remap" / uffd_msg_arg_remap,
            "remove" / uffd_msg_arg_remove,
        ),
    ),
)
UFFD_MSG_SIZE = 32

#: event, flags, address, ptid (pagefault arm; reserved fields packed as 0)
uffd_msg_pagefault_fmt = struct.Struct("<B7xQQI4x")
#: event, ufd
uffd_msg_fork_fmt = struct.Struct("<B7xI20x")
#: event, from, to, len
uffd_msg_remap_fmt = struct.Struct("<B7xQQQ")
#: event, start, end (REMOVE and UNMAP)
uffd_msg_remove_fmt = struct.Struct("<B7xQQ8x")

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

# ---------------------------------------------------------------------------------------------
# features (uffdio_api.features)
# ---------------------------------------------------------------------------------------------

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

#: all 17 features (what 6.8+ may report): 0x1FFFF
UFFD_API_FEATURES = (
    UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_MISSING_HUGETLBFS
    | UFFD_FEATURE_MISSING_SHMEM
    | UFFD_FEATURE_SIGBUS
    | UFFD_FEATURE_THREAD_ID
    | UFFD_FEATURE_MINOR_HUGETLBFS
    | UFFD_FEATURE_MINOR_SHMEM
    | UFFD_FEATURE_EXACT_ADDRESS
    | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | UFFD_FEATURE_WP_UNPOPULATED
    | UFFD_FEATURE_POISON
    | UFFD_FEATURE_WP_ASYNC
    | UFFD_FEATURE_MOVE
)

# ---------------------------------------------------------------------------------------------
# ioctl command numbers (also the bit positions in the *ioctls masks)
# ---------------------------------------------------------------------------------------------

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_API = 0x3F

UFFD_API_IOCTLS = 1 << _UFFDIO_REGISTER | 1 << _UFFDIO_UNREGISTER | 1 << _UFFDIO_API
UFFD_API_RANGE_IOCTLS = (
    1 << _UFFDIO_WAKE
    | 1 << _UFFDIO_COPY
    | 1 << _UFFDIO_ZEROPAGE
    | 1 << _UFFDIO_MOVE
    | 1 << _UFFDIO_WRITEPROTECT
    | 1 << _UFFDIO_CONTINUE
    | 1 << _UFFDIO_POISON
)
UFFD_API_RANGE_IOCTLS_BASIC = (
    1 << _UFFDIO_WAKE
    | 1 << _UFFDIO_COPY
    | 1 << _UFFDIO_WRITEPROTECT
    | 1 << _UFFDIO_CONTINUE
    | 1 << _UFFDIO_POISON
)

# ---------------------------------------------------------------------------------------------
# ioctl structs
# ---------------------------------------------------------------------------------------------

uffdio_api = Struct("api" / Int64ul, "features" / Int64ul, "ioctls" / Int64ul)
uffdio_api_fmt = struct.Struct("<QQQ")

uffdio_range = Struct("start" / Int64ul, "len" / Int64ul)
uffdio_range_fmt = struct.Struct("<QQ")

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFD_API_REGISTER_MODES = (
    UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR
)

uffdio_register = Struct("range" / uffdio_range, "mode" / Int64ul, "ioctls" / Int64ul)
#: start, len, mode, ioctls
uffdio_register_fmt = struct.Struct("<QQQQ")

UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1

uffdio_copy = Struct(
    "dst" / Int64ul,
    "src" / Int64ul,
    "len" / Int64ul,
    "mode" / Int64ul,
    "copy" / Int64sl,
)
#: dst, src, len, mode, copy
uffdio_copy_fmt = struct.Struct("<QQQQq")

UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

uffdio_zeropage = Struct("range" / uffdio_range, "mode" / Int64ul, "zeropage" / Int64sl)
#: start, len, mode, zeropage
uffdio_zeropage_fmt = struct.Struct("<QQQq")

UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

uffdio_writeprotect = Struct("range" / uffdio_range, "mode" / Int64ul)
#: start, len, mode
uffdio_writeprotect_fmt = struct.Struct("<QQQ")

UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1

uffdio_continue = Struct("range" / uffdio_range, "mode" / Int64ul, "mapped" / Int64sl)
#: start, len, mode, mapped
uffdio_continue_fmt = struct.Struct("<QQQq")

UFFDIO_POISON_MODE_DONTWAKE = 1 << 0

uffdio_poison = Struct("range" / uffdio_range, "mode" / Int64ul, "updated" / Int64sl)
#: start, len, mode, updated
uffdio_poison_fmt = struct.Struct("<QQQq")

UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

uffdio_move = Struct(
    "dst" / Int64ul,
    "src" / Int64ul,
    "len" / Int64ul,
    "mode" / Int64ul,
    "move" / Int64sl,
)
#: dst, src, len, mode, move
uffdio_move_fmt = struct.Struct("<QQQQq")

# ---------------------------------------------------------------------------------------------
# ioctl numbers
# ---------------------------------------------------------------------------------------------

UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, uffdio_api)
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, uffdio_register)
# UNREGISTER and WAKE are _IOR although the kernel reads the struct (header comment).
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, uffdio_range)
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, uffdio_range)
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, uffdio_copy)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage)
UFFDIO_MOVE = _IOWR(UFFDIO, _UFFDIO_MOVE, uffdio_move)
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, uffdio_writeprotect)
UFFDIO_CONTINUE = _IOWR(UFFDIO, _UFFDIO_CONTINUE, uffdio_continue)
UFFDIO_POISON = _IOWR(UFFDIO, _UFFDIO_POISON, uffdio_poison)

#: every UFFDIO_* request and USERFAULTFD_IOC_NEW: name -> number
UFFD_IOCTLS: dict[str, int] = {
    "UFFDIO_API": UFFDIO_API,
    "UFFDIO_REGISTER": UFFDIO_REGISTER,
    "UFFDIO_UNREGISTER": UFFDIO_UNREGISTER,
    "UFFDIO_WAKE": UFFDIO_WAKE,
    "UFFDIO_COPY": UFFDIO_COPY,
    "UFFDIO_ZEROPAGE": UFFDIO_ZEROPAGE,
    "UFFDIO_MOVE": UFFDIO_MOVE,
    "UFFDIO_WRITEPROTECT": UFFDIO_WRITEPROTECT,
    "UFFDIO_CONTINUE": UFFDIO_CONTINUE,
    "UFFDIO_POISON": UFFDIO_POISON,
    "USERFAULTFD_IOC_NEW": USERFAULTFD_IOC_NEW,
}

#: _UFFDIO_<cmd> number -> "UFFDIO_<cmd>" (the bits of uffdio_register.ioctls)
UFFDIO_CMD_NAMES: dict[int, str] = {
    _UFFDIO_REGISTER: "UFFDIO_REGISTER",
    _UFFDIO_UNREGISTER: "UFFDIO_UNREGISTER",
    _UFFDIO_WAKE: "UFFDIO_WAKE",
    _UFFDIO_COPY: "UFFDIO_COPY",
    _UFFDIO_ZEROPAGE: "UFFDIO_ZEROPAGE",
    _UFFDIO_MOVE: "UFFDIO_MOVE",
    _UFFDIO_WRITEPROTECT: "UFFDIO_WRITEPROTECT",
    _UFFDIO_CONTINUE: "UFFDIO_CONTINUE",
    _UFFDIO_POISON: "UFFDIO_POISON",
    _UFFDIO_API: "UFFDIO_API",
}

#: every uffd struct, by C name
UFFD_STRUCTS = {
    "uffd_msg": uffd_msg,
    "uffdio_api": uffdio_api,
    "uffdio_range": uffdio_range,
    "uffdio_register": uffdio_register,
    "uffdio_copy": uffdio_copy,
    "uffdio_zeropage": uffdio_zeropage,
    "uffdio_writeprotect": uffdio_writeprotect,
    "uffdio_continue": uffdio_continue,
    "uffdio_poison": uffdio_poison,
    "uffdio_move": uffdio_move,
}
