"""fakekvm: a byte-exact emulation of the Linux KVM, guest_memfd and userfaultfd interfaces.

Public names:

* :class:`Kernel` — the syscall seam every component talks through;
* :class:`RealKernel` — the host's kernel behind that seam;
* :class:`FakeKernel` — the emulation behind the same seam;
* :mod:`fakekvm.abi` — the uAPI (ioctl numbers, structs, constants) as data.
"""

from fakekvm.kernel import ForwardingKernel, Kernel, Mapping, RealKernel

__all__ = ["ForwardingKernel", "Kernel", "Mapping", "RealKernel"]
__version__ = "0.1.0"
