"""The x86-64 KVM, guest_memfd and userfaultfd uAPI as data (no I/O).

* :mod:`~fakekvm.abi.ioctl` — ``_IO/_IOR/_IOW/_IOWR`` arithmetic
* :mod:`~fakekvm.abi.kvm` — ``linux/kvm.h`` + x86 ``asm/kvm.h``
* :mod:`~fakekvm.abi.uffd` — ``linux/userfaultfd.h``
* :mod:`~fakekvm.abi.kvm_userfault` — NOT UPSTREAM: the KVM Userfault proposal
* :mod:`~fakekvm.abi.fake_cc` — NOT UPSTREAM: fakekvm's own confidential VM type
* :mod:`~fakekvm.abi.mman` — mman/falloc/memfd/fcntl constants
* :mod:`~fakekvm.abi.names` — number <-> name lookups for printouts
* :mod:`~fakekvm.abi.layout` — ``offsetof``/``fields`` over construct structs
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["fake_cc", "ioctl", "kvm", "kvm_userfault", "layout", "mman", "names", "uffd"]


def __getattr__(name: str) -> ModuleType:
    # Submodules load on first use: `from fakekvm.abi import mman` must not pay for
    # building every construct struct (~150 ms) in processes that only need constants.
    if name in __all__:
        return importlib.import_module(f"fakekvm.abi.{name}")
    raise AttributeError(f"module 'fakekvm.abi' has no attribute {name!r}")
