"""The port-I/O protocol between the guest programs and the VMM.

A guest at CPL3 cannot ``hlt`` (it would fault), so it talks to the VMM only
through ``in``/``out`` (RFLAGS.IOPL = 3 lets CPL3 use them, and each one is a
``KVM_EXIT_IO``), the way QEMU's ``isa-debug-exit`` device ends a test:

============  =====  ===  =========================================================
port          dir    size meaning
============  =====  ===  =========================================================
``0x3f8``     out    1    one byte of text (the COM1 data register)
``0xe0``      out    4    one 32-bit reported value (64-bit values: low, then high)
``0xe4``      in     4    the VMM supplies a 32-bit value
``0xf4``      out    1    done: AL is the exit code (0 ok, 2 bad parameter)
============  =====  ===  =========================================================

The runner (:mod:`fakekvm.guests.vm`) stops at the first write to
``PORT_DONE`` (or at ``KVM_EXIT_HLT`` for the real-mode ``hello``).  The same
numbers are in ``src/ports.inc`` for the assembler sources.
"""

from __future__ import annotations

PORT_TEXT = 0x3F8
PORT_REPORT = 0xE0
PORT_INPUT = 0xE4
PORT_DONE = 0xF4

DONE_OK = 0
DONE_BAD_PARAM = 2


def join64(low: int, high: int) -> int:
    """Rebuild a 64-bit value reported as two 32-bit halves."""
    return (high & 0xFFFFFFFF) << 32 | (low & 0xFFFFFFFF)
