"""tracefs format files: what a kvm tracepoint's record holds, and decoding records by it.

Follows Documentation/trace/events.rst §"Event formats": an ``events/SYSTEM/EVENT/format``
file gives each field's C declaration, ``offset``, ``size`` and ``signed``. Records are decoded
by these files only, never by offsets known in advance, because fields move between kernels.
``__data_loc`` (offset in the low 16 bits, length in the high 16) and ``__rel_loc`` (the same,
offset counted from the end of the field) are followed; ``char`` arrays become ``str``;
integers of 1, 2, 4 or 8 bytes become ``int``; anything else stays ``bytes``. `Decoder` turns
one ring-buffer record (`replay.tracefs_ring`) into a `KernelEvent` by its ``common_type``.
Part of `replay.tracefs`, which re-exports every public name here.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from replay.events import KernelEvent

__all__ = ["Decoder", "EventFormat", "FieldFormat", "parse_fields", "parse_format"]

_FIELD_RE = re.compile(
    r"field:\s*(?P<decl>[^;]*?)\s*;\s*offset:\s*(?P<off>\d+)\s*;\s*size:\s*(?P<size>\d+)\s*;"
    r"(?:\s*signed:\s*(?P<signed>-?\d+)\s*;)?"
)
_DECL_RE = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<arr>\[[^\]]*\])?$")
_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass(frozen=True)
class FieldFormat:
    """One ``field:`` line of a format file."""

    name: str
    type: str  #: the C type as written, without the name and the array brackets
    offset: int
    size: int
    signed: bool
    array: str = ""  #: "[16]", "[]", or "" for a scalar
    #: "int", "str" (char array), "bytes", "data_loc", "rel_loc" (dynamic arrays)
    kind: str = "int"

    @property
    def common(self) -> bool:
        return self.name.startswith("common_")


def _field(decl: str, offset: int, size: int, signed: bool) -> FieldFormat:
    m = _DECL_RE.match(decl.strip())
    if m is None:
        return FieldFormat(decl.strip(), "", offset, size, signed, "", "bytes")
    ctype, name, arr = m["type"].strip(), m["name"], m["arr"] or ""
    base = ctype.replace("const ", "").strip()
    if base.startswith("__data_loc"):
        kind = "data_loc"
    elif base.startswith("__rel_loc"):
        kind = "rel_loc"
    elif arr:
        kind = "str" if base == "char" else "bytes"
    elif size in _INT_CODES:
        kind = "int"
    else:
        kind = "bytes"
    return FieldFormat(name, ctype, offset, size, signed, arr, kind)


def parse_fields(text: str) -> list[FieldFormat]:
    """Every ``field:`` line of a format file (or of ``events/header_page``)."""
    return [
        _field(m["decl"], int(m["off"]), int(m["size"]), m["signed"] not in (None, "0"))
        for m in _FIELD_RE.finditer(text)
    ]


def _cstr(b: bytes | memoryview) -> str:
    raw = bytes(b)
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


class EventFormat:
    """A parsed ``format`` file, with its record decoder compiled once."""

    __slots__ = ("_all", "_ints", "_names", "_others", "_pid", "fields", "id", "name", "system")

    def __init__(self, system: str, name: str, id: int, fields: Sequence[FieldFormat]) -> None:
        self.system = system
        self.name = name
        self.id = id
        self.fields = tuple(fields)
        #: (name, Struct, offset, end) of the integer fields outside common_*
        self._ints: list[tuple[str, struct.Struct, int, int]] = []
        self._others: list[FieldFormat] = []
        self._pid: tuple[struct.Struct, int] | None = None
        for f in self.fields:
            if f.name == "common_pid" and f.kind == "int":
                self._pid = (_int_struct(f), f.offset)
            if f.common:
                continue
            if f.kind == "int":
                self._ints.append((f.name, _int_struct(f), f.offset, f.offset + f.size))
            else:
                self._others.append(f)
        # the fast path: common_pid and every integer field in one unpack (when none overlap)
        ints = sorted(
            [
                f
                for f in self.fields
                if f.kind == "int" and (f.name == "common_pid" or not f.common)
            ],
            key=lambda f: f.offset,
        )
        code, pos = "<", 0
        for f in ints:
            if f.offset < pos:
                code = ""
                break
            code += "x" * (f.offset - pos) + _int_struct(f).format[1:]
            pos = f.offset + f.size
        self._all = struct.Struct(code) if code and ints else None
        self._names = tuple(f.name for f in ints)

    @property
    def full_name(self) -> str:
        return f"{self.system}:{self.name}"

    def decode(self, payload: bytes | memoryview) -> tuple[int, dict[str, Any]]:
        """``(common_pid, fields)`` of one record. A field beyond a short record is left out."""
        n = len(payload)
        pid = -1
        fast = self._all
        if fast is not None and fast.size <= n:
            vals = fast.unpack_from(payload)
            out: dict[str, Any] = dict(zip(self._names, vals, strict=False))
            if self._pid is not None:
                pid = out.pop("common_pid")
            if not self._others:
                return pid, out
            return pid, self._decode_others(payload, n, out)
        if self._pid is not None and self._pid[1] + self._pid[0].size <= n:
            pid = self._pid[0].unpack_from(payload, self._pid[1])[0]
        out = {}
        for name, st, off, end in self._ints:
            if end <= n:
                out[name] = st.unpack_from(payload, off)[0]
        return pid, self._decode_others(payload, n, out)

    def _decode_others(
        self, payload: bytes | memoryview, n: int, out: dict[str, Any]
    ) -> dict[str, Any]:
        for f in self._others:
            end = f.offset + f.size
            if end > n:
                continue
            if f.kind in ("data_loc", "rel_loc"):
                if f.size != 4:
                    out[f.name] = bytes(payload[f.offset : end])
                    continue
                loc = int.from_bytes(payload[f.offset : end], "little")
                start, length = loc & 0xFFFF, loc >> 16
                if f.kind == "rel_loc":
                    start += end
                data = payload[start : start + length]
                out[f.name] = _cstr(data) if "char" in f.type else bytes(data)
            elif f.kind == "str":
                out[f.name] = _cstr(payload[f.offset : end])
            else:
                out[f.name] = bytes(payload[f.offset : end])
        return out

    def __repr__(self) -> str:
        return f"EventFormat({self.full_name!r}, id={self.id}, {len(self.fields)} fields)"


def _int_struct(f: FieldFormat) -> struct.Struct:
    code = _INT_CODES[f.size]
    return struct.Struct("<" + (code.lower() if f.signed else code))


def parse_format(text: str, system: str = "") -> EventFormat:
    """Parse an ``events/SYSTEM/EVENT/format`` file (``name:``, ``ID:``, ``field:`` lines)."""
    name = re.search(r"^name:\s*(\S+)", text, re.M)
    ident = re.search(r"^ID:\s*(\d+)", text, re.M)
    if name is None or ident is None:
        raise ValueError("not an event format file: no 'name:' or 'ID:' line")
    fields = parse_fields(text)
    if not fields:
        raise ValueError(f"format of {name[1]}: no 'field:' line")
    return EventFormat(system, name[1], int(ident[1]), fields)


# -- decoding -------------------------------------------------------------------------------------

_U16 = struct.Struct("<H")


class Decoder:
    """Turns ring-buffer records into `KernelEvent` by their ``common_type`` and format file."""

    def __init__(self, formats: Iterable[EventFormat]) -> None:
        self.formats: dict[int, EventFormat] = {f.id: f for f in formats}

    def decode(self, cpu: int, t_ns: int, payload: bytes) -> KernelEvent:
        type_id = _U16.unpack_from(payload)[0] if len(payload) >= 2 else -1
        fmt = self.formats.get(type_id)
        if fmt is None:
            pid = int.from_bytes(payload[4:8], "little", signed=True) if len(payload) >= 8 else -1
            return KernelEvent(t_ns, cpu, pid, "", f"type-{type_id}", {"raw": payload})
        pid, fields = fmt.decode(payload)
        return KernelEvent(t_ns, cpu, pid, fmt.system, fmt.name, fields)
