"""The four fault mechanisms of the post-copy destination (see :mod:`postcopy.mechanisms.base`)."""

from __future__ import annotations

from typing import Any

from postcopy.mechanisms.base import Mechanism, MemoryLayout

MECHANISMS = ("uffd-missing", "uffd-minor", "kvm-userfault", "gmem-private")


def make_mechanism(name: str, *, huge: bool = False, **options: Any) -> Mechanism:
    """A fresh mechanism by name; ``huge`` asks uffd-minor for 2 MiB pages (MFD_HUGETLB).
    ``options`` go to the userfaultfd mechanisms' constructors (``bulk_slots``, ...)."""
    if name == "uffd-missing":
        from postcopy.mechanisms.uffd_missing import UffdMissing

        return UffdMissing(**options)
    if name == "uffd-minor":
        from postcopy.mechanisms.uffd_minor import UffdMinor

        return UffdMinor(huge=huge, **options)
    if name == "kvm-userfault":
        from postcopy.mechanisms.kvm_userfault import KvmUserfault

        return KvmUserfault()
    if name == "gmem-private":
        from postcopy.mechanisms.gmem_private import GmemPrivate

        return GmemPrivate()
    raise ValueError(f"unknown mechanism {name!r}; known: {', '.join(MECHANISMS)}")


__all__ = ["MECHANISMS", "Mechanism", "MemoryLayout", "make_mechanism"]
