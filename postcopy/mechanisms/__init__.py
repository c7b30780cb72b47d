"""The four fault mechanisms of the post-copy destination (see :mod:`postcopy.mechanisms.base`)."""

from __future__ import annotations

from postcopy.mechanisms.base import Mechanism, MemoryLayout

MECHANISMS = ("uffd-missing", "uffd-minor", "kvm-userfault", "gmem-private")


def make_mechanism(name: str, *, huge: bool = False) -> Mechanism:
    """A fresh mechanism by name; ``huge`` asks uffd-minor for 2 MiB pages (MFD_HUGETLB)."""
    if name == "uffd-missing":
        from postcopy.mechanisms.uffd_missing import UffdMissing

        return UffdMissing()
    if name == "uffd-minor":
        from postcopy.mechanisms.uffd_minor import UffdMinor

        return UffdMinor(huge=huge)
    if name == "kvm-userfault":
        from postcopy.mechanisms.kvm_userfault import KvmUserfault

        return KvmUserfault()
    if name == "gmem-private":
        from postcopy.mechanisms.gmem_private import GmemPrivate

        return GmemPrivate()
    raise ValueError(f"unknown mechanism {name!r}; known: {', '.join(MECHANISMS)}")


__all__ = ["MECHANISMS", "Mechanism", "MemoryLayout", "make_mechanism"]
