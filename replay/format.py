"""The on-disk trace format: `TraceWriter`, `open_trace` / `TraceReader`, `TraceError`.

Byte layout (all integers little-endian; full description in ``docs/trace-format.md``)::

    file head   20 B   magic b"FKVMTRC\\0", u16 format_version, u16 compat_version,
                       u32 header_len, u32 crc32(head[0:16] + header)
    header      header_len B   msgpack of `replay.events.Header`
    chunk*      frame 20 B     b"CK", u8 kind (0 events, 1 end), u8 flags (bit 0: zlib),
                               u32 count, u32 payload_len, u32 crc32(payload),
                               u32 crc32(frame[0:16])
                payload        msgpack (zlib-compressed when flags bit 0) of a columnar chunk

A chunk's payload is ``[kinds, calls, faults, contents]``: ``kinds`` holds one byte per event
(0 `Call`, 1 `Fault`, 2 `Contents`, in trace order) and each of the three others maps a field
name to a *column*: ``["c", v]`` (every value is v), ``["a", typecode, bytes]`` (a packed
little-endian `array.array`), ``["p", typecode, bytes]`` (the same bytes as byte planes: every
value's byte 0, then every byte 1, ...), ``["l", [...]]`` (plain msgpack values), ``["d", first, col]``
(``first`` then running sums of the n-1 deltas in ``col``), ``["t", table, col]``
(``table[i]`` for each index in ``col``), ``["s", k, col]`` (each value of ``col`` shifted left
by k bits: page-aligned address deltas), ``["r", field, col]`` (``field``'s value plus ``col``'s:
``Fault.hva`` as ``gpa`` + the memslot's constant offset). Times (``t_ns``, ``observed_ns``), ``seq`` and
addresses (``gpa``, ``hva``) are delta columns; strings and thread ids are table columns;
``Fault.resolved_ns`` is stored as ``resolved_ns - observed_ns`` (``["r", "observed_ns", col]``). The end chunk's count is the
number of events in the trace.

Writing goes to ``PATH.incomplete``; each full chunk is written with one ``write`` (so a
process killed with SIGKILL leaves whole chunks plus at most one cut-short chunk), and
`TraceWriter.close` writes the end chunk and renames the file to ``PATH``. Reading is streaming:
one chunk in memory at a time. A missing end marker or a cut-short last chunk stops the
iteration quietly (``stopped_at`` says where) unless ``strict=True``; everything else that is
wrong (magic, version, checksums, undecodable bytes) raises `TraceError` naming the byte offset.

Public API (other modules build on these names): `TraceWriter`, `TraceReader`, `open_trace`,
`TraceError`, `encode_chunk`, `decode_chunk`, `FORMAT_VERSION`, `COMPAT_VERSION`, `MAGIC`.
"""

from __future__ import annotations

import functools
import operator
import os
import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate, repeat, starmap
from typing import Any, BinaryIO, TypeVar

import msgspec

from replay.events import COMPAT_VERSION, FORMAT_VERSION, Call, Contents, Event, Fault, Header

__all__ = [
    "CHUNK_FRAME",
    "COMPAT_VERSION",
    "FORMAT_VERSION",
    "MAGIC",
    "TraceError",
    "TraceReader",
    "TraceWriter",
    "decode_chunk",
    "decode_chunk_faults",
    "decode_fault_columns",
    "encode_chunk",
    "open_trace",
]

MAGIC = b"FKVMTRC\0"
_HEAD = struct.Struct("<8sHHII")  # magic, format_version, compat_version, header_len, crc
#: b"CK", kind, flags, count, payload_len, payload_crc, frame_crc
_FRAME = struct.Struct("<2sBBIIII")
CHUNK_FRAME = _FRAME  #: the chunk frame's layout, for tools that walk a file's chunks
FRAME_MAGIC = b"CK"
CHUNK_EVENTS = 0
CHUNK_END = 1
FLAG_ZLIB = 1
ZLIB_LEVEL = 6  #: a closed trace's chunks: 12 % smaller than level 1 on real traces
#: while recording (the thread that fills a chunk compresses it, often a fault path):
#: 0.55 us an event at level 1 against 1.8 us at level 6; `TraceWriter.close` recompresses
RECORD_LEVEL = 1
#: a chunk bigger than this is corruption, not data (the frame CRC makes it unlikely anyway)
MAX_PAYLOAD = 1 << 30
INCOMPLETE = ".incomplete"

_KIND_CALL, _KIND_FAULT, _KIND_CONTENTS = 0, 1, 2
_BIG_ENDIAN = sys.byteorder == "big"
_INT_CODES = (("b", 1 << 7), ("h", 1 << 15), ("i", 1 << 31), ("q", 1 << 63))
_ITEMSIZE = {"b": 1, "h": 2, "i": 4, "q": 8}
assert all(array(c).itemsize == s for c, s in _ITEMSIZE.items())

# Per-field column policy: "delta", "addr" (delta, shifted when page-aligned), "table", "int"
# (packed ints), "lat" (resolved - observed); any other field (or one added later to
# events.py) is "any".
_POLICY: dict[type, dict[str, str]] = {
    Call: {
        "seq": "delta",
        "tid": "table",
        "t_ns": "delta",
        "dur_ns": "int",
        "op": "table",
        "fd": "int",
        "fd_kind": "table",
        "vcpu": "int",
        "request": "int",
        "name": "table",
        "ret": "int",
        "errno": "int",
    },
    Fault: {
        "seq": "delta",
        "tid": "table",
        "vcpu": "int",
        "gpa": "addr",
        "hva": "addr",
        "access": "table",
        "mechanism": "table",
        "observed_ns": "delta",
        "resolved_ns": "lat",
        "how": "table",
    },
    Contents: {"seq": "delta", "hva": "addr"},
}
_TYPES: tuple[type, type, type] = (Call, Fault, Contents)
_KIND_OF: dict[type, int] = {
    Call: _KIND_CALL,
    tuple: _KIND_CALL,  # a Call as a row of its fields (see TraceWriter.append)
    Fault: _KIND_FAULT,
    Contents: _KIND_CONTENTS,
}


class TraceError(ValueError):
    """A trace that cannot be read: ``.offset`` is the byte where the problem is."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


# ---------------------------------------------------------------------------------------------
# Columns
# ---------------------------------------------------------------------------------------------


def _pack_ints(vals: Sequence[Any]) -> list[Any]:
    if not vals:
        return ["c", 0]
    first = vals[0]
    if vals.count(first) == len(vals):
        return ["c", first]
    try:
        lo, hi = min(vals), max(vals)
        for code, lim in _INT_CODES:
            if -lim <= lo and hi < lim:
                a = array(code, vals)
                if _BIG_ENDIAN:
                    a.byteswap()
                raw = a.tobytes()
                size = a.itemsize
                if size == 1:
                    return ["a", code, raw]
                # byte planes (all low bytes, then the next ...): zlib then finds the runs of
                # 0x00/0xff in the high planes of small values
                return ["p", code, b"".join([raw[k::size] for k in range(size)])]
    except TypeError:  # not all ints (None, bytes, ...), or a bool/float mix
        pass
    return ["l", list(vals)]


def _shifted(vals: list[int]) -> list[Any]:
    """``["s", k, col]`` (values ``col[i] << k``) when every value has k >= 8 low zero bits
    (page-aligned address deltas), else the packed column."""
    bits = functools.reduce(operator.or_, vals, 0)
    k = (bits & -bits).bit_length() - 1 if bits else 0
    if k < 8:
        return _pack_ints(vals)
    return ["s", k, _pack_ints(list(map(operator.rshift, vals, repeat(k))))]


def _addr(vals: Sequence[Any]) -> list[Any]:
    """Addresses: delta-encoded (shifted when page-aligned), or, when the addresses are no
    wider than their deltas (random pages: a delta needs a sign bit and one bit more), the
    shifted addresses themselves."""
    col = _delta(vals)
    if col[0] == "d" and col[2][0] != "c":
        try:
            deltas = list(_dec(col[2], len(vals) - 1))
            col[2] = _shifted(deltas)
            if min(vals) >= 0 and _fits(list(vals)):
                bits = functools.reduce(operator.or_, vals, 0)
                k = (bits & -bits).bit_length() - 1 if bits else 0
                span = max(map(abs, deltas)).bit_length() + 1
                if (max(vals) >> k).bit_length() <= span - min(k, _low_zero_bits(deltas)):
                    return _shifted(list(vals))
        except TypeError:
            pass
    return col


def _low_zero_bits(vals: list[int]) -> int:
    bits = functools.reduce(operator.or_, vals, 0)
    return (bits & -bits).bit_length() - 1 if bits else 0


def _delta(vals: Sequence[Any]) -> list[Any]:
    if not vals:
        return ["c", 0]
    if len(vals) == 1:
        return ["d", vals[0], ["c", 0]] if type(vals[0]) is int else ["l", list(vals)]
    try:
        deltas = list(map(operator.sub, vals[1:], vals[:-1]))
    except TypeError:
        return ["l", list(vals)]
    if type(vals[0]) is not int or not _fits(deltas):
        return _pack_ints(vals)
    return ["d", vals[0], _pack_ints(deltas)]


_INT_ONLY = {int}
_I64_MIN = -(1 << 63)
_U64_MAX = (1 << 64) - 1


def _all_ints(vals: Sequence[Any]) -> bool:
    return set(map(type, vals)) == _INT_ONLY


def _fits(ints: list[int]) -> bool:
    """True when every value is an int msgpack can hold (int64 or uint64)."""
    return _all_ints(ints) and min(ints) >= _I64_MIN and max(ints) <= _U64_MAX


def _table(vals: Sequence[Any]) -> list[Any]:
    if not vals:
        return ["c", 0]
    first = vals[0]
    if vals.count(first) == len(vals):
        return ["c", first]
    try:
        table = list(dict.fromkeys(vals))
    except TypeError:  # unhashable values
        return ["l", list(vals)]
    pos = {v: i for i, v in enumerate(table)}
    return ["t", table, _pack_ints(list(map(pos.__getitem__, vals)))]


def _any(vals: Sequence[Any]) -> list[Any]:
    return _pack_ints(vals)


_ENCODERS = {"delta": _delta, "addr": _addr, "table": _table, "int": _pack_ints, "any": _any}


def _planes(col: Any, n: int) -> array[int]:
    """The array of an ``a`` or ``p`` column (byte planes put back together)."""
    code, raw = col[1], col[2]
    if col[0] == "p":
        size = _ITEMSIZE[code]
        m, rest = divmod(len(raw), size)
        if rest or m != n:
            raise ValueError(f"byte-plane column holds {len(raw)} bytes, {n} values expected")
        planes = raw
        raw = bytearray(len(planes))
        for k in range(size):
            raw[k::size] = planes[k * m : (k + 1) * m]
    a = array(code)
    a.frombytes(raw)
    if _BIG_ENDIAN:
        a.byteswap()
    if len(a) != n:
        raise ValueError(f"packed column holds {len(a)} values, {n} expected")
    return a


def _dec(col: Any, n: int) -> Sequence[Any] | Iterable[Any]:
    """The ``n`` values of column ``col`` (errors raise ValueError/TypeError/...).

    Built for speed (decoding is mostly this): lists, arrays and ranges made by C loops
    (``array.frombytes``, ``itertools.accumulate``, ``operator.itemgetter``) rather than
    chains of lazy iterators, which cost a Python-level step per value and per layer.
    """
    tag = col[0]
    if tag == "c":
        v = col[1]
        if isinstance(v, list | dict):  # a fresh copy for each event, never one shared list
            return list(map(type(v), repeat(v, n)))
        return repeat(v, n)
    if tag == "a" or tag == "p":
        return _planes(col, n)
    if tag == "l":
        vals = col[1]
        if len(vals) != n:
            raise ValueError(f"column holds {len(vals)} values, {n} expected")
        return vals
    if tag == "d":
        if n == 0:
            return ()
        first, sub = col[1], col[2]
        if sub[0] == "c" and type(sub[1]) is int and sub[1] and type(first) is int:
            step = sub[1]  # an arithmetic progression (sequential pages, a fixed period)
            return range(first, first + n * step, step)
        if sub[0] == "c" and sub[1] == 0:
            return repeat(first, n)
        return list(accumulate(_dec(sub, n - 1), initial=first))
    if tag == "s":
        k = col[1]
        vals = _dec(col[2], n)
        if type(vals) is range:
            return range(vals.start << k, vals.stop << k, vals.step << k) if vals.step else vals
        return list(map(operator.lshift, vals, repeat(k)))
    if tag == "t":
        table = col[1]
        idx = _dec(col[2], n)
        if n == 1:
            return [table[next(iter(idx))]]
        # an index past the table raises IndexError while the chunk is built (a TraceError);
        # the checksums already vouch for the bytes, so no pass over the indexes here
        return operator.itemgetter(*idx)(table) if n else ()
    raise ValueError(f"unknown column tag {tag!r}")


# ---------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------

_enc = msgspec.msgpack.Encoder()
_dec_any = msgspec.msgpack.Decoder()
_astuple = msgspec.structs.astuple


def _encode_section(cls: type, events: Sequence[Any]) -> dict[str, Any]:
    if not events:
        return {}
    fields: tuple[str, ...] = cls.__struct_fields__  # type: ignore[attr-defined]
    if cls is Call:  # Calls may come as rows (tuples of their fields) from the recorder
        rows = [e if type(e) is tuple else _astuple(e) for e in events]
    else:
        rows = list(map(_astuple, events))
    cols = list(zip(*rows, strict=True))
    policy = _POLICY[cls]
    out: dict[str, Any] = {}
    for i, name in enumerate(fields[: len(cols)]):  # (rows may predate a field added later)
        how = policy.get(name, "any")
        vals = cols[i]
        if how == "lat":
            obs = cols[fields.index("observed_ns")]
            try:
                lat = list(map(operator.sub, vals, obs))
            except TypeError:
                lat = []
            ok = lat and _fits(lat)
            out[name] = ["r", "observed_ns", _pack_ints(lat)] if ok else _any(vals)
        else:
            out[name] = _ENCODERS[how](vals)
    if cls is Fault:
        _relative_hva(out, cols[fields.index("gpa")], cols[fields.index("hva")])
    return out


def _relative_hva(out: dict[str, Any], gpa: Sequence[Any], hva: Sequence[Any]) -> None:
    """One memslot: ``hva - gpa`` is the same for every fault, so store just that."""
    try:
        if min(gpa) < 0:
            return
        diff = hva[0] - gpa[0]
    except TypeError:
        return
    if all(h - g == diff for g, h in zip(gpa, hva, strict=True)) and _fits([diff]):
        out["hva"] = ["r", "gpa", ["c", diff]]


def _section_columns(cls: type, cols: dict[str, Any], n: int) -> list[Iterable[Any]]:
    """Every field's ``n`` values (a list, array, range or `itertools.repeat`), in field order."""
    fields: tuple[str, ...] = cls.__struct_fields__  # type: ignore[attr-defined]
    defaults: tuple[Any, ...] = cls.__struct_defaults__  # type: ignore[attr-defined]
    first_default = len(fields) - len(defaults)
    its: list[Iterable[Any]] = []
    #: columns computed from another: (index, the field they add to, the column added)
    dependent: list[tuple[int, str, Any]] = []
    for i, name in enumerate(fields):
        col = cols.get(name)
        if col is None:
            if i < first_default:
                raise ValueError(f"required column {name!r} missing")
            d = defaults[i - first_default]
            if isinstance(d, msgspec._core.Factory):
                its.append(starmap(d.factory, repeat((), n)))
            else:
                its.append(repeat(d, n))
        elif col[0] == "lat":
            dependent.append((i, "observed_ns", col[1]))
            its.append(())  # filled below
        elif col[0] == "r":
            dependent.append((i, col[1], col[2]))
            its.append(())
        else:
            its.append(_dec(col, n))
    for i, ref, sub in dependent:
        j = fields.index(ref)
        if any(j == k for k, _, _ in dependent):
            raise ValueError(f"column {fields[i]!r} refers to the computed column {ref!r}")
        base = its[j]
        if type(base) is not range:
            base = its[j] = list(base)
        if sub[0] == "c" and type(sub[1]) is int and type(base) is range:
            c = sub[1]  # e.g. hva = gpa + the memslot's offset, over sequential pages
            its[i] = range(base.start + c, base.stop + c, base.step)
        else:
            its[i] = list(map(operator.add, base, _dec(sub, n)))
    return its


def _decode_section(cls: type, cols: dict[str, Any], n: int) -> list[Any]:
    if n == 0:
        return []
    out = list(map(cls, *_section_columns(cls, cols, n)))
    if len(out) != n:
        raise ValueError(f"{len(out)} {cls.__name__} events decoded, {n} expected")
    return out


def encode_chunk(events: Sequence[Event | tuple[Any, ...]]) -> bytes:
    """The (uncompressed) msgpack payload of one events chunk (tuples are `Call` rows)."""
    try:
        kinds = bytes(map(_KIND_OF.__getitem__, map(type, events)))
    except KeyError:
        bad = next(e for e in events if type(e) not in _KIND_OF)
        raise TypeError(f"not a trace event: {bad!r}") from None
    n = len(kinds)
    lists: list[Sequence[Any]]
    if kinds.count(_KIND_CALL) == n:
        lists = [events, (), ()]
    else:
        lists = [[e for e, k in zip(events, kinds, strict=True) if k == want] for want in (0, 1, 2)]
    body = [kinds] + [_encode_section(t, lst) for t, lst in zip(_TYPES, lists, strict=True)]
    return _enc.encode(body)


def decode_chunk(payload: bytes) -> list[Event]:
    """Inverse of `encode_chunk`; raises ValueError/TypeError/msgspec errors on bad input."""
    body = _dec_any.decode(payload)
    kinds = body[0]
    if not isinstance(kinds, bytes):
        raise ValueError("chunk kinds is not bytes")
    n = len(kinds)
    counts = (kinds.count(0), kinds.count(1), kinds.count(2))
    if sum(counts) != n:
        raise ValueError("unknown event kind in chunk")
    secs = [
        _decode_section(t, body[1 + k] if len(body) > 1 + k else {}, counts[k])
        for k, t in enumerate(_TYPES)
    ]
    if counts[0] == n:
        return secs[0]
    if counts[1] == n:
        return secs[1]
    nexts = [iter(s).__next__ for s in secs]
    return [nexts[k]() for k in kinds]


#: a chunk body whose calls and contents sections msgspec skips without building them
_dec_faults_only = msgspec.msgpack.Decoder(tuple[bytes, msgspec.Raw, dict[str, Any], msgspec.Raw])
_FAULT_FIELDS: tuple[str, ...] = Fault.__struct_fields__


def _fault_body(payload: bytes) -> tuple[bytes, dict[str, Any], int]:
    try:
        body: Any = _dec_faults_only.decode(payload)
    except msgspec.ValidationError:  # not the 4-element body this writer makes: decode it all
        body = _dec_any.decode(payload)
        if not isinstance(body, list) or not body:
            raise ValueError("chunk body is not an array") from None
    kinds = body[0]
    if not isinstance(kinds, bytes):
        raise ValueError("chunk kinds is not bytes")
    cols = body[2] if len(body) > 2 else {}
    if not isinstance(cols, dict):
        raise ValueError("chunk faults section is not a map")
    return kinds, cols, kinds.count(_KIND_FAULT)


def decode_chunk_faults(payload: bytes) -> tuple[list[Fault], int]:
    """The chunk's `Fault` s (the calls are skipped, not decoded) and its event count."""
    kinds, cols, n = _fault_body(payload)
    return _decode_section(Fault, cols, n), len(kinds)


def decode_fault_columns(payload: bytes) -> tuple[dict[str, Sequence[Any]], int]:
    """The chunk's faults as columns, ``{field: values}`` for every `Fault` field (lists,
    arrays or ranges; no struct is built), and the chunk's event count."""
    kinds, cols, n = _fault_body(payload)
    if n == 0:
        return {f: [] for f in _FAULT_FIELDS}, len(kinds)
    out: dict[str, Sequence[Any]] = {}
    for name, vals in zip(_FAULT_FIELDS, _section_columns(Fault, cols, n), strict=True):
        v = vals if isinstance(vals, list | range | array | tuple) else list(vals)
        if len(v) != n:
            raise ValueError(f"column {name!r} holds {len(v)} values, {n} expected")
        out[name] = v
    return out, len(kinds)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


class TraceWriter:
    """Write a trace to ``path + ".incomplete"``; `close` seals it and renames it to ``path``.

    ``append`` is thread-safe and cheap (a list append under a lock; every ``chunk_events``
    events the appending thread encodes and writes one chunk). ``fsync=True`` syncs each chunk.

    Chunks are compressed fast while recording (zlib level `RECORD_LEVEL`: the thread that
    fills a chunk pays for it, and that is often a fault path) and again at `ZLIB_LEVEL` by
    `close` (``recompress``), which rewrites the sealed file chunk by chunk before the rename;
    a file cut short by a crash keeps its fast chunks, which read the same.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: Header,
        chunk_events: int = 4096,
        *,
        fsync: bool = False,
        compress: bool = True,
        recompress: bool = True,
    ) -> None:
        if chunk_events < 1:
            raise ValueError("chunk_events must be >= 1")
        self.path = os.fspath(path)
        self.tmp_path = self.path + INCOMPLETE
        self.header = header
        self.chunk_events = chunk_events
        self.fsync = fsync
        self.compress = compress
        self.recompress = recompress and compress
        self.level = RECORD_LEVEL if self.recompress else ZLIB_LEVEL
        self.events = 0
        self.chunks = 0
        self.bytes = 0
        self.closed = False
        self._buf: list[Event | tuple[Any, ...]] = []
        #: called (under the lock) with the events of each chunk before it is written; returns
        #: more events for the chunk (the recorder derives its faults here, off the hot path)
        self.before_flush: Callable[[list[Any]], list[Event]] | None = None
        self._lock = threading.Lock()
        hb = msgspec.msgpack.encode(header)
        head16 = _HEAD.pack(MAGIC, header.format_version, header.compat_version, len(hb), 0)[:16]
        self._f: BinaryIO = open(self.tmp_path, "wb", buffering=0)  # noqa: SIM115
        self._write(head16 + struct.pack("<I", zlib.crc32(hb, zlib.crc32(head16))) + hb)
        self.head_bytes = self.bytes  #: bytes of the file head and header (chunks follow)

    def _write(self, data: bytes) -> None:
        mv = memoryview(data)
        while mv:
            n = self._f.write(mv)
            mv = mv[n:]
        self.bytes += len(data)

    def _chunk(self, kind: int, count: int, payload: bytes) -> None:
        flags = 0
        if self.compress and kind == CHUNK_EVENTS:
            z = zlib.compress(payload, self.level)
            if len(z) < len(payload):
                payload, flags = z, FLAG_ZLIB
        frame16 = _FRAME.pack(
            FRAME_MAGIC, kind, flags, count, len(payload), zlib.crc32(payload), 0
        )[:16]
        self._write(frame16 + struct.pack("<I", zlib.crc32(frame16)) + payload)
        if self.fsync:
            os.fsync(self._f.fileno())

    def _flush_locked(self) -> None:
        buf = self._buf
        if self.before_flush is not None and buf:
            buf.extend(self.before_flush(buf))
        if not buf:
            return
        self._buf = []
        self._chunk(CHUNK_EVENTS, len(buf), encode_chunk(buf))
        self.events += len(buf)
        self.chunks += 1

    def append(self, event: Event | tuple[Any, ...]) -> None:
        """Append an event; a tuple is a `Call` given as its fields in order (seq first)."""
        with self._lock:
            buf = self._buf
            buf.append(event)
            if len(buf) >= self.chunk_events:
                self._flush_locked()

    def _append_locked(self, event: Event | tuple[Any, ...]) -> None:
        """`append` for a caller that holds ``self._lock`` (the recorder)."""
        buf = self._buf
        buf.append(event)
        if len(buf) >= self.chunk_events:
            self._flush_locked()

    def extend(self, events: Iterable[Event]) -> None:
        for e in events:
            self.append(e)

    def flush(self) -> None:
        """Write the events appended so far as a (possibly short) chunk."""
        with self._lock:
            if not self.closed:
                self._flush_locked()

    def close(self) -> None:
        """Flush, write the end chunk, rename ``PATH.incomplete`` to ``PATH``. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self._flush_locked()
            end = msgspec.msgpack.encode({"events": self.events, "chunks": self.chunks})
            self._chunk(CHUNK_END, self.events, end)
            if not self.fsync:
                os.fsync(self._f.fileno())
            self._f.close()
            if self.recompress and self.level != ZLIB_LEVEL:
                self._recompress()
            os.replace(self.tmp_path, self.path)
            self.closed = True

    def _recompress(self) -> None:
        """Rewrite the sealed ``PATH.incomplete`` with every zlib chunk at `ZLIB_LEVEL`
        (frames and checksums remade; head, header and end chunk copied), then swap it in."""
        new_path = self.tmp_path + ".z"
        total = 0
        with open(self.tmp_path, "rb") as src, open(new_path, "wb") as dst:
            head = src.read(self.head_bytes)
            dst.write(head)
            total += len(head)
            while frame := src.read(_FRAME.size):
                magic, kind, flags, count, plen, _pcrc, _fcrc = _FRAME.unpack(frame)
                payload = src.read(plen)
                if kind == CHUNK_EVENTS and flags & FLAG_ZLIB:
                    z = zlib.compress(zlib.decompress(payload), ZLIB_LEVEL)
                    if len(z) < len(payload):
                        frame16 = _FRAME.pack(magic, kind, flags, count, len(z), zlib.crc32(z), 0)[:16]
                        frame, payload = frame16 + struct.pack("<I", zlib.crc32(frame16)), z
                dst.write(frame + payload)
                total += len(frame) + len(payload)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(new_path, self.tmp_path)
        self.bytes = total

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


_T = TypeVar("_T")


def _decode_all(payload: bytes) -> tuple[list[Event], int]:
    events = decode_chunk(payload)
    return events, len(events)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


class TraceReader:
    """A trace opened for reading: ``.header``, iterate for the events (streaming).

    After an iteration ``.complete`` is True when the end marker was read, and ``.stopped_at``
    says where and why reading stopped early (a cut-off recording), else None.
    """

    def __init__(self, path: str | os.PathLike[str], *, strict: bool = False) -> None:
        self.path = os.fspath(path)
        self.strict = strict
        self.complete = False
        self.stopped_at: str | None = None
        self.chunks_read = 0
        self.events_read = 0
        self.end_info: dict[str, Any] = {}
        self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115
        try:
            self.header, self.data_offset = self._read_header()
        except BaseException:
            self._f.close()
            raise

    def _read_header(self) -> tuple[Header, int]:
        f = self._f
        head = _read_exact(f, _HEAD.size)
        if len(head) >= 8 and head[:8] != MAGIC:
            raise TraceError(
                f"{self.path}: not a fakekvm trace: bad magic {head[:8]!r} at byte 0 "
                f"(expected {MAGIC!r})",
                0,
            )
        if len(head) < _HEAD.size:
            raise TraceError(
                f"{self.path}: truncated header at byte {len(head)}: the file ends before the "
                f"{_HEAD.size}-byte file head",
                len(head),
            )
        _, fmt, compat, hlen, crc = _HEAD.unpack(head)
        hb = _read_exact(f, hlen)
        if len(hb) < hlen:
            off = _HEAD.size + len(hb)
            raise TraceError(
                f"{self.path}: truncated header at byte {off}: the header needs {hlen} bytes "
                f"from byte {_HEAD.size}, the file ends after {len(hb)}",
                off,
            )
        if zlib.crc32(hb, zlib.crc32(head[:16])) != crc:
            raise TraceError(
                f"{self.path}: header checksum mismatch at byte 0 (the file head and the "
                f"header, bytes 0..{_HEAD.size + hlen}): the file is corrupt",
                0,
            )
        if compat > FORMAT_VERSION:
            raise TraceError(
                f"{self.path}: at byte 8: the trace is format version {fmt} and needs a reader "
                f"of version >= {compat}; this reader is version {FORMAT_VERSION}",
                8,
            )
        try:
            header = msgspec.msgpack.decode(hb, type=Header)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise TraceError(
                f"{self.path}: undecodable header at byte {_HEAD.size}: {e}", _HEAD.size
            ) from None
        return header, _HEAD.size + hlen

    # -- iteration ---------------------------------------------------------------------------

    def _stop(self, message: str, offset: int) -> None:
        if self.strict:
            raise TraceError(f"{self.path}: {message}", offset)
        self.stopped_at = message

    def chunks(self) -> Iterator[list[Event]]:
        """The events one chunk at a time (the fastest way through a trace)."""
        return self._chunks(_decode_all)

    def faults(self) -> Iterator[Fault]:
        """Only the `Fault` events, in order (calls are skipped undecoded: much faster)."""
        for faults in self._chunks(decode_chunk_faults):
            yield from faults

    def fault_columns(self) -> Iterator[dict[str, Sequence[Any]]]:
        """Per chunk, the faults as ``{field: values}`` (`decode_fault_columns`): the fastest
        way to the fault stream when no `Fault` object is needed."""
        return self._chunks(decode_fault_columns)

    def _chunks(self, decode: Callable[[bytes], tuple[_T, int]]) -> Iterator[_T]:
        """Read, check and ``decode`` each events chunk (``decode(payload) -> (result,
        events in the chunk)``), yielding the results; see `chunks`."""
        f = self._f
        f.seek(self.data_offset)
        self.complete = False
        self.stopped_at = None
        self.chunks_read = 0
        self.events_read = 0
        off = self.data_offset
        index = 0
        while True:
            frame = _read_exact(f, _FRAME.size)
            if not frame:
                self._stop(
                    f"no end marker: the recording was cut off after chunk {index - 1} (byte {off})"
                    if index
                    else f"no end marker: the recording was cut off before its first chunk "
                    f"(byte {off})",
                    off,
                )
                return
            if len(frame) < _FRAME.size:
                self._stop(
                    f"truncated at byte {off + len(frame)}: chunk {index} is cut short "
                    f"(its {_FRAME.size}-byte frame at byte {off} has {len(frame)})",
                    off + len(frame),
                )
                return
            magic, kind, flags, count, plen, pcrc, fcrc = _FRAME.unpack(frame)
            if magic != FRAME_MAGIC:
                raise TraceError(
                    f"{self.path}: chunk {index} at byte {off}: bad chunk frame magic "
                    f"{magic!r} (expected {FRAME_MAGIC!r}): the file is corrupt",
                    off,
                )
            if zlib.crc32(frame[:16]) != fcrc:
                raise TraceError(
                    f"{self.path}: chunk {index} at byte {off}: frame checksum mismatch: "
                    f"the file is corrupt",
                    off,
                )
            if plen > MAX_PAYLOAD or kind not in (CHUNK_EVENTS, CHUNK_END):
                raise TraceError(
                    f"{self.path}: chunk {index} at byte {off}: kind {kind}, {plen} payload "
                    f"bytes: not a chunk this reader knows",
                    off,
                )
            pstart = off + _FRAME.size
            payload = _read_exact(f, plen)
            if len(payload) < plen:
                self._stop(
                    f"truncated at byte {pstart + len(payload)}: chunk {index} is cut short "
                    f"(its frame at byte {off} announces {plen} payload bytes, "
                    f"{len(payload)} are there)",
                    pstart + len(payload),
                )
                return
            if zlib.crc32(payload) != pcrc:
                raise TraceError(
                    f"{self.path}: chunk {index} at byte {pstart}: payload checksum mismatch "
                    f"(bytes {pstart}..{pstart + plen}): the file is corrupt",
                    pstart,
                )
            try:
                if flags & FLAG_ZLIB:
                    payload = zlib.decompress(payload)
                if kind == CHUNK_END:
                    info = _dec_any.decode(payload)
                    self.end_info = info if isinstance(info, dict) else {}
                    got = 0
                else:
                    result, got = decode(payload)
            except Exception as e:  # any decoding failure is the file's fault, not ours
                raise TraceError(
                    f"{self.path}: chunk {index} at byte {pstart}: undecodable payload: "
                    f"{type(e).__name__}: {e}",
                    pstart,
                ) from None
            if kind == CHUNK_END:
                if count != self.events_read:
                    raise TraceError(
                        f"{self.path}: end chunk at byte {off} counts {count} events, "
                        f"{self.events_read} were read",
                        off,
                    )
                self.complete = True
                return
            if got != count:
                raise TraceError(
                    f"{self.path}: chunk {index} at byte {off}: frame counts {count} events, "
                    f"the payload holds {got}",
                    off,
                )
            self.chunks_read += 1
            self.events_read += count
            off = pstart + plen
            index += 1
            yield result

    def __iter__(self) -> Iterator[Event]:
        for events in self.chunks():
            yield from events

    def read_all(self) -> list[Event]:
        """Every event in a list (only for small traces: iterate instead)."""
        return list(self)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_trace(path: str | os.PathLike[str], *, strict: bool = False) -> TraceReader:
    """Open a trace; ``PATH.incomplete`` is opened when only it exists (a cut-off recording)."""
    p = os.fspath(path)
    if not os.path.exists(p) and os.path.exists(p + INCOMPLETE):
        p += INCOMPLETE
    return TraceReader(p, strict=strict)
