"""User-memory access for ioctl handlers: ``copy_from_user``, ``copy_to_user``, ``fget``.

The fake's counterparts of ``arch/x86/include/asm/uaccess.h`` and
``fs/file.c`` ``fget`` as KVM's ioctl handlers use them: a bad user pointer is
``EFAULT`` (never a crash: the copy goes through the fake mm's fault path, or
``process_vm_readv``/``writev`` when there is no mm), an ioctl argument is
either a buffer passed by pointer or an address in user memory, and an fd that
is not open is ``EBADF``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fakekvm.fake.files import FakeFile
    from fakekvm.kernel.seam import IoctlArg


def copy_from_user(kernel: Any, address: int, n: int, what: str) -> bytes:
    """``copy_from_user``: EFAULT for a bad pointer (through the fake mm when it has one)."""
    mm = getattr(kernel, "mm", None)
    try:
        if mm is not None and hasattr(mm, "read"):
            return bytes(mm.read(address, n))
        from fakekvm.fake.mm.hostmem import safe_copy_from

        return safe_copy_from(address, n)
    except OSError as e:
        raise OSError(errno.EFAULT, f"{what}: bad user pointer {address:#x}") from e


def copy_to_user(kernel: Any, address: int, data: bytes, what: str) -> None:
    mm = getattr(kernel, "mm", None)
    try:
        if mm is not None and hasattr(mm, "write"):
            mm.write(address, data)
            return
        from fakekvm.fake.mm.hostmem import safe_copy_to

        safe_copy_to(address, data)
    except OSError as e:
        raise OSError(errno.EFAULT, f"{what}: bad user pointer {address:#x}") from e


def read_arg(kernel: Any, arg: IoctlArg, size: int, what: str) -> bytes:
    """The ioctl's struct: from the buffer passed by pointer, or from user memory at ``arg``."""
    if isinstance(arg, int):
        return copy_from_user(kernel, arg, size, what)
    mv = memoryview(arg).cast("B")  # type: ignore[arg-type]
    if len(mv) < size:
        return bytes(mv) + bytes(size - len(mv))
    return bytes(mv[:size])


def fget(kernel: Any, fd: int, what: str) -> FakeFile:
    """The fake file behind ``fd`` (no reference taken): EBADF if ``fd`` is not open,
    EINVAL if it is a real (host) fd, which can never be a KVM or gmem file."""
    try:
        return kernel.file(fd)
    except OSError:
        pass
    try:
        os.fstat(fd)
    except (OSError, OverflowError, ValueError):
        raise OSError(errno.EBADF, f"{what}: bad fd {fd}")
    raise OSError(errno.EINVAL, f"{what}: fd {fd} is not a file of this kind")
