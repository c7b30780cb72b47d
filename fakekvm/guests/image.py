"""`GuestImage`: a guest as data -- memory contents plus initial vCPU state.

An image says what to copy where in guest-physical memory (code, page tables,
GDT), where to start (``regs["rip"]``) and which ``kvm_regs``/``kvm_sregs``
fields to set (names verbatim from ``arch/x86/include/uapi/asm/kvm.h``; sregs
segments and tables are nested dicts, e.g. ``sregs["cs"]["dpl"]``).  Fields not
named keep the vCPU's reset value (the VMM reads the sregs, overlays, writes
back).  No I/O: :class:`fakekvm.guests.vm.GuestVM` applies an image through a
`Kernel`.

Builders:

* :func:`real_mode_image` -- 16-bit code at ``load_addr`` (``hello``);
* :func:`long_mode_image` -- 64-bit CPL3 code at ``layout.CODE_ADDR`` with the
  identity page tables, GDT and TSS of :mod:`fakekvm.guests.layout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fakekvm.guests import layout


@dataclass(frozen=True)
class Chunk:
    """``data`` to be copied at guest-physical ``gpa``; ``what`` names it."""

    gpa: int
    data: bytes
    what: str

    @property
    def end(self) -> int:
        return self.gpa + len(self.data)


@dataclass(frozen=True)
class GuestImage:
    name: str
    mode: str  # "real" or "long"
    chunks: tuple[Chunk, ...]
    regs: Mapping[str, int]
    sregs: Mapping[str, Any]
    #: the smallest guest memory the image fits in
    min_mem_size: int
    #: named guest-physical addresses (code, page tables, data window, ...)
    layout: Mapping[str, int] = field(default_factory=dict)

    @property
    def entry(self) -> int:
        return self.regs["rip"]

    @property
    def code(self) -> bytes:
        """The program bytes (the chunk named "code")."""
        return next(c.data for c in self.chunks if c.what == "code")

    @property
    def load_address(self) -> int:
        """Where the program bytes go (``layout["code"]``)."""
        return self.layout["code"]

    def with_regs(self, **regs: int) -> GuestImage:
        """A copy with some ``kvm_regs`` fields replaced (parameters, rsp, ...)."""
        return dataclasses.replace(self, regs={**self.regs, **regs})

    def regs_for(self, vcpu: int) -> dict[str, int]:
        """The regs of vCPU ``vcpu``: long-mode vCPUs each get their own stack."""
        regs = dict(self.regs)
        if self.mode == "long":
            regs["rsp"] = layout.stack_top(vcpu)
        return regs


def real_mode_image(name: str, code: bytes, *, load_addr: int = 0x7C00) -> GuestImage:
    """16-bit code at ``load_addr``, CS = DS = ... = 0, entered at its first byte."""
    if load_addr + len(code) > 0x100000:
        raise ValueError("real-mode code must fit below 1 MiB")
    end = load_addr + len(code)
    return GuestImage(
        name=name,
        mode="real",
        chunks=(Chunk(load_addr, bytes(code), "code"),),
        regs={"rip": load_addr, "rflags": layout.RFLAGS_FIXED, "rsp": load_addr},
        sregs=layout.real_mode_sregs(),
        min_mem_size=-(-end // layout.PAGE) * layout.PAGE,
        layout={"code": load_addr},
    )


def long_mode_image(
    name: str,
    code: bytes,
    mem_size: int,
    *,
    mapped_size: int | None = None,
    regs: Mapping[str, int] | None = None,
) -> GuestImage:
    """64-bit code started directly at CPL3 (see :mod:`fakekvm.guests.layout`).

    ``mapped_size`` (default ``mem_size``) is how much the page tables map; map
    more than the memory to let the guest reach addresses with no memslot
    (``KVM_EXIT_MMIO``).  ``regs`` are extra ``kvm_regs`` fields (parameters).
    """
    mapped = mapped_size if mapped_size is not None else mem_size
    if mem_size < layout.DATA_BASE:
        raise ValueError(f"long-mode guests need at least {layout.DATA_BASE:#x} bytes of memory")
    if len(code) > layout.CODE_MAX:
        raise ValueError(
            f"code ({len(code)} bytes) larger than the code area ({layout.CODE_MAX:#x})"
        )
    chunks = [
        Chunk(layout.GDT_ADDR, layout.gdt_bytes(), "gdt"),
        Chunk(layout.TSS_ADDR, layout.tss_bytes(), "tss"),
    ]
    chunks += [Chunk(gpa, data, "page tables") for gpa, data in layout.page_tables(mapped)]
    chunks.append(Chunk(layout.CODE_ADDR, bytes(code), "code"))
    base_regs = {
        "rip": layout.CODE_ADDR,
        "rsp": layout.stack_top(0),
        "rflags": layout.RFLAGS_FIXED | layout.RFLAGS_IOPL3,
    }
    return GuestImage(
        name=name,
        mode="long",
        chunks=tuple(sorted(chunks, key=lambda c: c.gpa)),
        regs={**base_regs, **(regs or {})},
        sregs=layout.long_mode_sregs(),
        min_mem_size=layout.DATA_BASE,
        layout={
            "gdt": layout.GDT_ADDR,
            "tss": layout.TSS_ADDR,
            "params": layout.PARAM_ADDR,
            "pml4": layout.PML4_ADDR,
            "code": layout.CODE_ADDR,
            "stack_top": layout.STACK_TOP,
            "data_base": layout.DATA_BASE,
            "data_end": mem_size,
            "mapped_end": mapped,
        },
    )
