"""Just enough x86 decoding to recognise port-I/O instructions.

KVM reports string port I/O (``ins``/``outs``, with or without ``rep``) through
its instruction emulator (``arch/x86/kvm/emulate.c``: ``em_in``/``em_out``,
``pio_in_emulated``); the engine needs the prefixes to reproduce the exit
batching and the register updates. Opcodes from the SDM vol. 2 (IN E4/E5/EC/ED,
OUT E6/E7/EE/EF, INS 6C/6D, OUTS 6E/6F); prefixes 66 (operand size), 67 (address
size), F2/F3 (rep), segment overrides, REX in 64-bit code.
"""

from __future__ import annotations

from typing import NamedTuple

_SEG_PREFIX = {0x26: 0, 0x2E: 1, 0x36: 2, 0x3E: 3, 0x64: 4, 0x65: 5}  # -> QEMU seg index ES CS SS DS FS GS


class PioInsn(NamedTuple):
    length: int  # bytes of the whole instruction
    is_in: bool
    string: bool
    rep: bool
    size: int  # 1, 2 or 4 bytes per item
    addr_size: int  # 2, 4 or 8
    seg: int  # source segment for outs (QEMU index), default DS
    imm_port: int  # -1 when the port is in DX


def decode_pio(code: bytes, default_size: int, long_mode: bool) -> PioInsn | None:
    """Decode ``code`` (bytes at rip); ``default_size`` 2 or 4 (CS.D), 8 means 64-bit code."""
    op32 = default_size != 2
    addr = 8 if default_size == 8 else default_size
    rep = False
    seg = 3
    i = 0
    while i < len(code):
        b = code[i]
        if b == 0x66:
            op32 = default_size == 2
        elif b == 0x67:
            addr = 4 if default_size == 8 else (4 if default_size == 2 else 2)
        elif b in (0xF2, 0xF3):
            rep = True
        elif b in _SEG_PREFIX:
            seg = _SEG_PREFIX[b]
        elif b == 0xF0 or (long_mode and default_size == 8 and 0x40 <= b <= 0x4F):
            pass
        else:
            break
        i += 1
    else:
        return None
    op = code[i]
    size = 4 if op32 else 2
    if op in (0xE4, 0xE5, 0xE6, 0xE7):
        if i + 1 >= len(code):
            return None
        return PioInsn(i + 2, op in (0xE4, 0xE5), False, False, 1 if op in (0xE4, 0xE6) else size, addr, seg, code[i + 1])
    if op in (0xEC, 0xED, 0xEE, 0xEF):
        return PioInsn(i + 1, op in (0xEC, 0xED), False, False, 1 if op in (0xEC, 0xEE) else size, addr, seg, -1)
    if op in (0x6C, 0x6D, 0x6E, 0x6F):
        return PioInsn(i + 1, op in (0x6C, 0x6D), True, rep, 1 if op in (0x6C, 0x6E) else size, addr, seg, -1)
    return None
