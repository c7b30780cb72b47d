"""fakekvm: a byte-exact emulation of the Linux KVM, guest_memfd and userfaultfd interfaces.

Public names:

* :class:`Kernel` — the syscall seam every component talks through;
* :class:`RealKernel` — the host's kernel behind that seam;
* :class:`FakeKernel` — the emulation behind the same seam;
* :mod:`fakekvm.abi` — the uAPI (ioctl numbers, structs, constants) as data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fakekvm.kernel import ForwardingKernel, Kernel, Mapping, RealKernel

if TYPE_CHECKING:
    from fakekvm.fake import FakeKernel

__all__ = ["FakeKernel", "ForwardingKernel", "Kernel", "Mapping", "RealKernel"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # FakeKernel pulls in unicorn; load it only for users of the fake.
    if name == "FakeKernel":
        from fakekvm.fake import FakeKernel

        return FakeKernel
    raise AttributeError(f"module 'fakekvm' has no attribute {name!r}")
