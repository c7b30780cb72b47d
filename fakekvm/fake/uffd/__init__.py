"""The fake userfaultfd (fs/userfaultfd.c, mm/userfaultfd.c; Documentation/admin-guide/mm/userfaultfd.rst).

Modules: `state` (the pure context state: handshake, queues, wake rules, injection knobs),
`file` (`UserfaultfdFile`: read/poll/release and the fault handler E1's mm calls), `ioctls`
(argument checks and errno/output-field rules), `events` (REMOVE/UNMAP/REMAP from mm changes).

Entry points used by `FakeKernel`: :func:`create` (userfaultfd(2)) and :func:`register` (adds
"/dev/userfaultfd" to ``kernel.devices``). Test and fault-injection hooks: :func:`context`,
:func:`kill_owner`, :func:`wait_for_faulter`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from fakekvm.abi import mman
from fakekvm.fake.files import FakeFile
from fakekvm.fake.uffd import _uapi as U
from fakekvm.fake.uffd.file import UserfaultfdFile
from fakekvm.fake.uffd.state import Injections, UffdState
from fakekvm.kernel.seam import IoctlArg

__all__ = [
    "Injections",
    "UffdState",
    "UserfaultfdDevice",
    "UserfaultfdFile",
    "context",
    "create",
    "kick_faulter_watchers",
    "kill_owner",
    "register",
    "wait_for_faulter",
]

_FLAGS = mman.O_CLOEXEC | mman.O_NONBLOCK | U.UFFD_USER_MODE_ONLY


def _features(kernel: Any) -> int:
    try:
        from fakekvm.fake.profiles import get_profile

        return int(get_profile(kernel.profile).uffd_features)
    except Exception:  # a profile module not there (yet): the 6.18 set
        return U.UFFD_API_FEATURES


def create(kernel: Any, flags: int) -> int:
    """userfaultfd(2) (``new_userfaultfd``): EINVAL for flags other than CLOEXEC/NONBLOCK/USER_MODE_ONLY."""
    if flags & ~_FLAGS:
        raise OSError(errno.EINVAL, f"userfaultfd: bad flags {flags:#x}")
    from fakekvm.fake.uffd import events

    events.install(kernel.mm)
    f = UserfaultfdFile(kernel, flags, _features(kernel))
    return int(kernel.install_fd(f, flags & (mman.O_CLOEXEC | mman.O_NONBLOCK)))


class UserfaultfdDevice(FakeFile):
    """/dev/userfaultfd (``userfaultfd_dev_ioctl``): only USERFAULTFD_IOC_NEW, else EINVAL."""

    kind = "userfaultfd-dev"

    def __init__(self, kernel: Any) -> None:
        super().__init__()
        self.kernel = kernel

    def ioctl(self, request: int, arg: IoctlArg) -> int:
        if request != U.USERFAULTFD_IOC_NEW or not isinstance(arg, int):
            raise OSError(errno.EINVAL, f"/dev/userfaultfd: unknown ioctl {request:#x}")
        return create(self.kernel, arg)


def register(kernel: Any) -> None:
    """Add "/dev/userfaultfd" to ``kernel.devices``."""
    kernel.devices["/dev/userfaultfd"] = lambda k, flags: UserfaultfdDevice(k)


def context(kernel: Any, fd: int) -> UserfaultfdFile:
    """The `UserfaultfdFile` behind ``fd`` (EINVAL if ``fd`` is another kind of file)."""
    f = kernel.file(fd)
    if not isinstance(f, UserfaultfdFile):
        raise OSError(errno.EINVAL, f"fd {fd} is not a userfaultfd")
    return f


def kill_owner(kernel: Any, fd: int) -> None:
    """Fault injection: the process that created the uffd is gone (resolution ioctls → ESRCH)."""
    context(kernel, fd).kill_owner()


def wait_for_faulter(
    kernel: Any, tid: int, timeout: float, alive: Callable[[], bool] | None = None
) -> None:
    """Return once thread ``tid`` sleeps in the fault handler of one of ``kernel``'s uffds.

    Also returns when ``alive()`` turns false (the thread ended; see `kick_faulter_watchers`).
    """
    ctxs = [f for f in kernel.fds().values() if isinstance(f, UserfaultfdFile)]
    if not ctxs:
        raise OSError(errno.EINVAL, "wait_for_faulter: no userfaultfd in this fake kernel")
    ok = ctxs[0].wait_for_faulter(tid, timeout, ctxs[1:], alive)
    if not ok:
        raise TimeoutError(f"thread {tid} never blocked in a userfaultfd")


def kick_faulter_watchers(kernel: Any) -> None:
    """Wake `wait_for_faulter` callers so they re-check (a watched thread ended)."""
    for f in kernel.fds().values():
        if isinstance(f, UserfaultfdFile):
            f.blocked_wq.wake_up_all()
