"""One column of a trace chunk: a field's values for every event of one kind, and back.

A column is a small msgpack value (tags and layout in ``docs/trace-format.md``)::

    ["c", v]               every value is v
    ["a", code, bytes]     1-byte ints (``code`` "b"), packed
    ["p", code, bytes]     ints of ``code`` ("h", "i", "q": 2, 4, 8 bytes, little-endian) as byte
                           planes: every value's byte 0, then every byte 1, ...
    ["l", [...]]           plain msgpack values
    ["d", first, col]      ``first`` then running sums of the n-1 deltas in ``col``
    ["s", k, col]          each value of ``col`` shifted left by k bits
    ["t", table, col]      ``table[i]`` for each index in ``col``
    ["b", col, blob]       byte strings: ``col`` holds their lengths, ``blob`` them end to end
                           (format version 2)

(``["r", field, col]``, one field computed from another, is the chunk codec's: `replay.codec`.)

Encoding and decoding run on numpy arrays (one C loop a column, not one Python step a value)
whenever the values are Python ints within +-2**62, so that deltas, running sums and shifts
cannot overflow int64; anything else (None, a bool, an int beyond that, bytes ...) takes the
plain-Python path, which writes the same tags. Decoding gives an int64 `numpy.ndarray` for
integer columns, a `BytesColumn` for ``"b"``, a `TableColumn` for a table of anything but
ints, and a list otherwise; `to_list` makes Python objects of any of them.
"""

from __future__ import annotations

import io
import operator
from collections.abc import Iterator, Sequence
from itertools import accumulate, repeat
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

I64: TypeAlias = npt.NDArray[np.int64]

_INT_CODES = (("b", 1 << 7), ("h", 1 << 15), ("i", 1 << 31), ("q", 1 << 63))
ITEMSIZE = {"b": 1, "h": 2, "i": 4, "q": 8}
#: numpy arithmetic only on values within this bound (a delta or a sum of two stays in int64)
_SAFE = 1 << 62
_INT_ONLY = {int}
_BYTES_ONLY = {bytes}
_I64_MIN = -(1 << 63)
_U64_MAX = (1 << 64) - 1


class BytesColumn(Sequence[bytes]):
    """Byte strings stored end to end in ``blob``; value i is ``blob[offsets[i]:offsets[i+1]]``
    (Arrow's binary layout): a column of n strings without n objects until one is asked for."""

    __slots__ = ("blob", "lengths", "offsets")

    def __init__(self, blob: bytes, lengths: I64) -> None:
        self.blob = blob
        self.lengths = lengths
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.tolist()[i]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("BytesColumn index out of range")
        return self.blob[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.tolist())

    def tolist(self) -> list[bytes]:
        # one C call a value (a slice object each costs four times as much)
        return list(map(io.BytesIO(self.blob).read, self.lengths.tolist()))


class TableColumn(Sequence[Any]):
    """Value i is ``table[idx[i]]`` (a dictionary-encoded column, like Arrow's): a column of
    strings decoded without n references until the values are asked for."""

    __slots__ = ("idx", "table")

    def __init__(self, table: list[Any], idx: I64) -> None:
        self.table = table
        self.idx = idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.tolist()[i]
        return self.table[int(self.idx[i])]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def tolist(self) -> list[Any]:
        objs = np.empty(len(self.table), dtype=object)
        for i, v in enumerate(self.table):  # (objs[:] = table would unpack list values)
            objs[i] = v
        return objs[self.idx].tolist()


#: integer columns decode to int64 arrays, byte strings to `BytesColumn`, other tables to
#: `TableColumn`, anything else to a list
Column: TypeAlias = "I64 | BytesColumn | TableColumn | list[Any]"


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def as_i64(vals: Sequence[Any]) -> I64 | None:
    """``vals`` as an int64 array when every value is an int (not a bool) within +-2**62."""
    if not vals or set(map(type, vals)) != _INT_ONLY:
        return None
    try:
        a = np.array(vals, dtype=np.int64)
    except OverflowError:
        return None
    if int(a.min()) < -_SAFE or int(a.max()) > _SAFE:
        return None
    return a


def fits(ints: Sequence[Any]) -> bool:
    """True when every value is an int msgpack can hold (int64 or uint64)."""
    return (
        bool(ints)
        and set(map(type, ints)) == _INT_ONLY
        and min(ints) >= _I64_MIN
        and max(ints) <= _U64_MAX
    )


def _pack_array(a: I64) -> list[Any]:
    lo, hi = int(a.min()), int(a.max())
    if lo == hi:
        return ["c", lo]
    code = next(c for c, lim in _INT_CODES if -lim <= lo and hi < lim)
    size = ITEMSIZE[code]
    packed = a.astype(f"<i{size}")
    if size == 1:
        return ["a", code, packed.tobytes()]
    # byte planes (all low bytes, then the next ...): zlib then finds the runs of 0x00/0xff
    # in the high planes of small values
    return ["p", code, packed.view(np.uint8).reshape(len(a), size).T.tobytes()]


def pack_ints(vals: Sequence[Any]) -> list[Any]:
    """Integers as ``c``, ``a`` or ``p``; anything else as ``c`` or ``l``."""
    if not len(vals):
        return ["c", 0]
    a = vals if type(vals) is np.ndarray else as_i64(vals)
    if a is not None:
        return _pack_array(a)
    first = vals[0]
    if _constant(vals):
        return ["c", first]
    if fits(vals):  # ints beyond +-2**62: the byte planes of int64, made in Python
        a = np.array(vals, dtype=np.int64) if max(vals) < (1 << 63) else None
        if a is not None:
            return _pack_array(a)
    return ["l", list(vals)]


_EQUAL_ACROSS_TYPES = {bool, int, float}


def _constant(vals: Sequence[Any]) -> bool:
    """Every value equal to the first, and of its type (``0 == False``, yet not the same)."""
    first = vals[0]
    return bool(vals.count(first) == len(vals) and set(map(type, vals)) == {type(first)})


def _low_zero_bits(a: I64) -> int:
    bits = int(np.bitwise_or.reduce(a)) if len(a) else 0
    return (bits & -bits).bit_length() - 1 if bits else 0


def _shifted(a: I64) -> list[Any]:
    """``["s", k, col]`` when every value has k >= 8 low zero bits (page-aligned address
    deltas), else the packed column."""
    k = _low_zero_bits(a)
    if k < 8:
        return _pack_array(a)
    return ["s", k, _pack_array(a >> k)]


def delta(vals: Sequence[Any]) -> list[Any]:
    """``["d", first, deltas]`` for ints; else packed or plain."""
    if not len(vals):
        return ["c", 0]
    a = as_i64(vals)
    if a is None:
        return _delta_py(vals)
    if len(a) == 1:
        return ["d", int(a[0]), ["c", 0]]
    return ["d", int(a[0]), _pack_array(np.diff(a))]


def _delta_py(vals: Sequence[Any]) -> list[Any]:
    if len(vals) == 1:
        return ["d", vals[0], ["c", 0]] if type(vals[0]) is int else ["l", list(vals)]
    if set(map(type, vals)) != _INT_ONLY:
        return pack_ints(vals)
    deltas = list(map(operator.sub, vals[1:], vals[:-1]))
    if not fits(deltas):
        return pack_ints(vals)
    return ["d", vals[0], pack_ints(deltas)]


def addr(vals: Sequence[Any]) -> list[Any]:
    """Addresses: delta-encoded (shifted when page-aligned), or, when the addresses are no
    wider than their deltas (random pages: a delta needs a sign bit and one bit more), the
    shifted addresses themselves."""
    a = as_i64(vals)
    if a is None or len(a) < 2:
        return delta(vals)
    d = np.diff(a)
    lo, hi = int(d.min()), int(d.max())
    if lo == hi:
        return ["d", int(a[0]), ["c", lo]]
    if int(a.min()) >= 0:
        k = _low_zero_bits(a)
        span = max(-lo, hi).bit_length() + 1
        if (int(a.max()) >> k).bit_length() <= span - min(k, _low_zero_bits(d)):
            return _shifted(a)
    return ["d", int(a[0]), _shifted(d)]


def table(vals: Sequence[Any]) -> list[Any]:
    """``["t", distinct values, indexes]`` (strings, thread ids, return values), or, for
    values that are mostly distinct, `pack_ints`."""
    if not len(vals):
        return ["c", 0]
    if _constant(vals):
        return ["c", vals[0]]
    types = set(map(type, vals))
    if len(types & _EQUAL_ACROSS_TYPES) > 1:  # 0 == False == 0.0: one key for three values
        return ["l", list(vals)]
    keys: Sequence[Any] = vals
    try:
        tab = list(dict.fromkeys(keys))
    except TypeError:  # unhashable values: lists (``Call.args``) are keyed as tuples
        if not types <= {list, tuple}:
            return ["l", list(vals)]
        keys = list(map(tuple, vals))
        tab = list(dict.fromkeys(keys))
    if len(tab) > max(16, len(vals) >> 3):  # many distinct values: not a table's job
        return pack_ints(vals)
    pos = {v: i for i, v in enumerate(tab)}
    idx = np.fromiter(map(pos.__getitem__, keys), dtype=np.int64, count=len(vals))
    return ["t", tab, _pack_array(idx)]  # (tuples are msgpack arrays: lists when read)


def blob(vals: Sequence[Any]) -> list[Any]:
    """Byte strings as ``["b", lengths, blob]`` (``c`` when all equal, ``l`` if not bytes)."""
    if not len(vals):
        return ["c", b""]
    if _constant(vals):
        return ["c", vals[0]]
    if set(map(type, vals)) != _BYTES_ONLY:
        return ["l", list(vals)]
    lengths = np.fromiter(map(len, vals), dtype=np.int64, count=len(vals))
    return ["b", _pack_array(lengths), b"".join(vals)]


ENCODERS = {
    "delta": delta,
    "addr": addr,
    "table": table,
    "int": pack_ints,
    "bytes": blob,
    "any": pack_ints,
}


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _planes(code: Any, raw: Any, n: int, packed: bool) -> I64:
    size = ITEMSIZE[code]
    if not isinstance(raw, bytes) or len(raw) != n * size:
        raise ValueError(f"packed column holds {len(raw)} bytes, {n} values of {size} expected")
    u8 = np.frombuffer(raw, dtype=np.uint8)
    if not packed or size == 1:
        return u8.view(f"<i{size}").astype(np.int64)
    planes = u8.reshape(size, n)
    if size < 8:  # shift the planes together, the top one signed (faster than a transpose)
        v = planes[size - 1].view(np.int8).astype(np.int64)
        for k in range(size - 2, -1, -1):
            v <<= 8
            v |= planes[k]
        return v
    out = np.empty((n, size), dtype=np.uint8)
    out.T[...] = planes
    return out.view("<i8").reshape(n)


def _bounded(a: I64) -> bool:
    return not len(a) or (int(a.min()) >= -_SAFE and int(a.max()) <= _SAFE)


def to_list(col: Column) -> list[Any]:
    """The column's values as Python objects."""
    if type(col) is list:
        return col
    return col.tolist()  # type: ignore[union-attr]


def decode(col: Any, n: int) -> Column:
    """The ``n`` values of column ``col`` (bad input raises ValueError/TypeError/...)."""
    tag = col[0]
    if tag == "c":
        v = col[1]
        if type(v) is int and -_SAFE <= v <= _SAFE:
            return np.full(n, v, dtype=np.int64)
        if isinstance(v, list | dict):  # a fresh copy for each event, never one shared list
            return list(map(type(v), repeat(v, n)))
        return [v] * n
    if tag == "a" or tag == "p":
        return _planes(col[1], col[2], n, tag == "p")
    if tag == "l":
        vals = col[1]
        if not isinstance(vals, list) or len(vals) != n:
            raise ValueError(f"column holds {len(vals)} values, {n} expected")
        return vals
    if tag == "d":
        if n == 0:
            return np.empty(0, dtype=np.int64)
        first, sub_col = col[1], col[2]
        if (
            type(sub_col) is list
            and len(sub_col) == 2
            and sub_col[0] == "c"
            and type(first) is int
            and type(sub_col[1]) is int
            and abs(first) + abs(sub_col[1]) * n <= _SAFE
        ):  # an arithmetic progression (sequence numbers, sequential pages)
            step = sub_col[1]
            return (
                np.arange(first, first + n * step, step, dtype=np.int64)
                if step
                else np.full(n, first, dtype=np.int64)
            )
        sub = decode(sub_col, n - 1)
        if type(sub) is np.ndarray and type(first) is int and abs(first) <= _SAFE:
            if sub_col[0] in ("a", "p") and ITEMSIZE.get(sub_col[1], 8) <= 4 and n < (1 << 30):
                big = 1 << 31  # no pass over the deltas: their width bounds them
            else:
                big = max(-int(sub.min()), int(sub.max())) if n > 1 else 0
            if big * n + abs(first) < (1 << 63):
                out = np.empty(n, dtype=np.int64)
                out[0] = first
                np.cumsum(sub, out=out[1:])
                out[1:] += first
                return out
        return list(accumulate(to_list(sub), initial=first))
    if tag == "s":
        k, sub = col[1], decode(col[2], n)
        if type(k) is not int or k < 0:
            raise ValueError(f"bad shift {k!r}")
        if type(sub) is np.ndarray:
            big = max(-int(sub.min()), int(sub.max())) if len(sub) else 0
            if big.bit_length() + k <= 62:
                return sub << k
        return list(map(operator.lshift, to_list(sub), repeat(k)))
    if tag == "t":
        tab, idx = col[1], decode(col[2], n)
        if not isinstance(tab, list):
            raise ValueError("table column without a table")
        if type(idx) is not np.ndarray:
            return list(map(tab.__getitem__, idx))
        if n and (int(idx.min()) < 0 or int(idx.max()) >= len(tab)):
            raise IndexError(f"table index out of range (table of {len(tab)})")
        ints = as_i64(tab)
        if ints is not None:
            return ints[idx]
        return TableColumn(tab, idx)
    if tag == "b":
        lengths, data = decode(col[1], n), col[2]
        if type(lengths) is not np.ndarray or not isinstance(data, bytes):
            raise ValueError("bytes column without lengths or blob")
        strings = BytesColumn(data, lengths)
        if n and (int(lengths.min()) < 0 or int(strings.offsets[-1]) != len(data)):
            raise ValueError(
                f"bytes column lengths add up to {int(strings.offsets[-1])}, not {len(data)}"
            )
        return strings
    raise ValueError(f"unknown column tag {tag!r}")


def add(base: Column, sub: Column) -> Column:
    """``base[i] + sub[i]`` for each i (a computed column: ``hva = gpa + offset``)."""
    if type(base) is np.ndarray and type(sub) is np.ndarray and _bounded(base) and _bounded(sub):
        return base + sub
    return list(map(operator.add, to_list(base), to_list(sub)))
