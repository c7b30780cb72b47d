"""Decoding ``struct kvm_run`` exits into comparable values (no I/O).

:func:`decode_exit` reads the exit reason and its union arm from the bytes of
a vCPU's ``kvm_run`` mapping (layout: ``include/uapi/linux/kvm.h``, see
uapi.md §1.5) and returns an :class:`Exit`: the reason, the arm's fields in C
order and the bytes that moved (IO data, MMIO data).  Two kernels that behave
the same give equal ``Exit`` values, which is what
:mod:`fakekvm.guests.compare` relies on.

Fields that carry no information for the exit are left out so the value is
deterministic: ``mmio.data`` of a read (stale bytes) becomes ``data`` only
once the VMM has supplied it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fakekvm.abi import kvm, names

_OFF = kvm.KVM_RUN_EXIT_OFFSET


def exit_name(reason: int) -> str:
    """``KVM_EXIT_IO`` for 2 (:func:`fakekvm.abi.names.name`), ``KVM_EXIT_<n>`` if unknown."""
    try:
        return names.name("exit", reason)
    except KeyError:
        return f"KVM_EXIT_{reason}"


@dataclass(frozen=True)
class Exit:
    """One ``KVM_RUN`` return: reason, arm fields (C order), and moved bytes."""

    reason: int
    fields: tuple[tuple[str, int], ...] = ()
    data: bytes = b""

    @property
    def name(self) -> str:
        return exit_name(self.reason)

    def field(self, name: str) -> int:
        for key, value in self.fields:
            if key == name:
                return value
        raise KeyError(f"{self.name} has no field {name!r}")

    def __str__(self) -> str:
        args = ", ".join(
            f"{k}={v:#x}" if k in ("port", "phys_addr", "gpa") else f"{k}={v}"
            for k, v in self.fields
        )
        data = f" data={self.data.hex()}" if self.data else ""
        return f"{self.name}({args}){data}"


def read_exit_reason(run: memoryview) -> int:
    return int(kvm.kvm_run_exit_reason_fmt.unpack_from(run, kvm.KVM_RUN_EXIT_REASON_OFFSET)[0])


def decode_exit(run: memoryview) -> Exit:
    """Decode the exit now in ``run`` (a ``kvm_run`` mapping, at least 2352 bytes).

    For ``KVM_EXIT_IO`` direction OUT ``data`` holds the ``size * count`` bytes
    at ``data_offset``; for MMIO writes the ``len`` bytes written.  IN and MMIO
    reads get their ``data`` from the VMM (see :meth:`Exit` users).
    """
    reason = read_exit_reason(run)
    fields: tuple[tuple[str, int], ...]
    if reason == kvm.KVM_EXIT_IO:
        direction, size, port, count, data_offset = kvm.kvm_run_io_fmt.unpack_from(run, _OFF)
        fields = (
            ("direction", direction), ("size", size), ("port", port),
            ("count", count), ("data_offset", data_offset),
        )  # fmt: skip
        data = b""
        if direction == kvm.KVM_EXIT_IO_OUT:
            data = bytes(run[data_offset : data_offset + size * count])
        return Exit(reason, fields, data)
    if reason == kvm.KVM_EXIT_MMIO:
        phys_addr, raw, length, is_write = kvm.kvm_run_mmio_fmt.unpack_from(run, _OFF)
        fields = (
            ("phys_addr", phys_addr),
            ("len", length),
            ("is_write", is_write),
        )
        return Exit(reason, fields, bytes(raw[:length]) if is_write else b"")
    if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = kvm.kvm_run_internal_fmt.unpack_from(run, _OFF)
        n = min(ndata, 16)
        words = bytes(run[_OFF + 8 : _OFF + 8 + 8 * n])
        return Exit(reason, (("suberror", suberror), ("ndata", ndata)), words)
    if reason == kvm.KVM_EXIT_FAIL_ENTRY:
        hw, cpu = kvm.kvm_run_fail_entry_fmt.unpack_from(run, _OFF)
        return Exit(reason, (("hardware_entry_failure_reason", hw), ("cpu", cpu)))
    if reason == kvm.KVM_EXIT_UNKNOWN:
        (hw,) = kvm.kvm_run_hw_fmt.unpack_from(run, _OFF)
        return Exit(reason, (("hardware_exit_reason", hw),))
    if reason == kvm.KVM_EXIT_SYSTEM_EVENT:
        type_, ndata, flags = kvm.kvm_run_system_event_fmt.unpack_from(run, _OFF)
        return Exit(reason, (("type", type_), ("ndata", ndata), ("flags", flags)))
    if reason == kvm.KVM_EXIT_MEMORY_FAULT:
        flags, gpa, size = kvm.kvm_run_memory_fault_fmt.unpack_from(run, _OFF)
        return Exit(reason, (("flags", flags), ("gpa", gpa), ("size", size)))
    if reason in (kvm.KVM_EXIT_HLT, kvm.KVM_EXIT_SHUTDOWN, kvm.KVM_EXIT_INTR):
        return Exit(reason)
    # anything else: keep the raw union so a comparison still sees it
    return Exit(reason, (), bytes(run[_OFF : _OFF + kvm.KVM_RUN_EXIT_SIZE]))
