"""The kernel seam and its real backend."""

from fakekvm.kernel.mapping import Mapping, make_mapping
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import ForwardingKernel, IoctlArg, Kernel

__all__ = ["ForwardingKernel", "IoctlArg", "Kernel", "Mapping", "RealKernel", "make_mapping"]
