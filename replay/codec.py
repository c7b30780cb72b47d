"""A trace chunk's payload: events <-> per-field columns <-> msgpack (``docs/trace-format.md``).

A chunk's payload is ``[kinds, calls, faults, contents]``: ``kinds`` holds one byte per event
(0 `Call`, 1 `Fault`, 2 `Contents`, in trace order) and each of the three others maps a field
name to a column (`replay.columns`). One more tag lives here, because it names another field:
``["r", field, col]`` is ``field``'s value plus ``col``'s (``Fault.hva`` as ``gpa`` + the
memslot's constant offset, ``Fault.resolved_ns`` as ``observed_ns`` + the latency).

Three ways out of a payload, from the most to the least built:

* `decode_chunk`: the events as `Call`/`Fault`/`Contents` structs, in trace order;
* `decode_columns`: every field of every event as a column (`ChunkColumns`: int64 numpy
  arrays, `replay.columns.BytesColumn`, lists), no per-event object: the fast full decode;
* `decode_chunk_faults` / `decode_fault_columns`: the faults only, the calls skipped.

`compress_payload` is the zlib stream a closed trace stores.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Iterable, Sequence
from itertools import repeat, starmap
from typing import Any, NamedTuple

import msgspec
import numpy as np

from replay import columns as C
from replay.events import Call, Contents, Event, Fault

__all__ = [
    "ChunkColumns",
    "compress_payload",
    "decode_chunk",
    "decode_chunk_faults",
    "decode_columns",
    "decode_fault_columns",
    "encode_chunk",
]

KIND_CALL, KIND_FAULT, KIND_CONTENTS = 0, 1, 2

# Per-field column policy (`replay.columns.ENCODERS`), "lat" (resolved - observed); any other
# field (or one added later to events.py) is "any".
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
        "request": "table",
        "name": "table",
        "iarg": "table",  # None or a size: a handful of values
        "args": "table",
        "inp": "bytes",
        "out": "bytes",
        "ret": "table",
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
    Contents: {"seq": "delta", "hva": "addr", "data": "bytes"},
}
TYPES: tuple[type, type, type] = (Call, Fault, Contents)
_KIND_OF: dict[type, int] = {
    Call: KIND_CALL,
    tuple: KIND_CALL,  # a Call as a row of its fields (see TraceWriter.append)
    Fault: KIND_FAULT,
    Contents: KIND_CONTENTS,
}
_FIELDS: dict[type, tuple[str, ...]] = {t: t.__struct_fields__ for t in TYPES}  # type: ignore[attr-defined]

_enc = msgspec.msgpack.Encoder()
decode_any = msgspec.msgpack.Decoder()
_astuple = msgspec.structs.astuple


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _encode_section(cls: type, events: Sequence[Any]) -> dict[str, Any]:
    if not events:
        return {}
    fields = _FIELDS[cls]
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
            ok = lat and C.fits(lat)
            out[name] = ["r", "observed_ns", C.pack_ints(lat)] if ok else C.pack_ints(vals)
        else:
            out[name] = C.ENCODERS[how](vals)
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
    if all(h - g == diff for g, h in zip(gpa, hva, strict=True)) and C.fits([diff]):
        out["hva"] = ["r", "gpa", ["c", diff]]


def encode_chunk(events: Sequence[Event | tuple[Any, ...]]) -> bytes:
    """The (uncompressed) msgpack payload of one events chunk (tuples are `Call` rows)."""
    try:
        kinds = bytes(map(_KIND_OF.__getitem__, map(type, events)))
    except KeyError:
        bad = next(e for e in events if type(e) not in _KIND_OF)
        raise TypeError(f"not a trace event: {bad!r}") from None
    n = len(kinds)
    lists: list[Sequence[Any]]
    if kinds.count(KIND_CALL) == n:
        lists = [events, (), ()]
    else:
        lists = [[e for e, k in zip(events, kinds, strict=True) if k == want] for want in (0, 1, 2)]
    body = [kinds] + [_encode_section(t, lst) for t, lst in zip(TYPES, lists, strict=True)]
    return _enc.encode(body)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _section(cls: type, cols: Any, n: int) -> dict[str, C.Column]:
    """Every field's ``n`` values, in field order (defaults filled in)."""
    if not isinstance(cols, dict):
        raise ValueError(f"chunk {cls.__name__} section is not a map")
    fields = _FIELDS[cls]
    if n == 0:
        return {f: [] for f in fields}
    defaults: tuple[Any, ...] = cls.__struct_defaults__  # type: ignore[attr-defined]
    first_default = len(fields) - len(defaults)
    out: dict[str, C.Column] = {}
    #: columns computed from another: (field, the field they add to, the column added)
    dependent: list[tuple[str, str, Any]] = []
    for i, name in enumerate(fields):
        col = cols.get(name)
        if col is None:
            if i < first_default:
                raise ValueError(f"required column {name!r} missing")
            d = defaults[i - first_default]
            if isinstance(d, msgspec._core.Factory):
                out[name] = list(starmap(d.factory, repeat((), n)))
            else:
                out[name] = C.decode(["c", d], n)
        elif not isinstance(col, list) or not col:
            raise ValueError(f"column {name!r} is not a tagged array")
        elif col[0] == "lat":
            dependent.append((name, "observed_ns", col[1]))
        elif col[0] == "r":
            dependent.append((name, col[1], col[2]))
        else:
            out[name] = C.decode(col, n)
    for name, ref, sub in dependent:
        if ref not in out:
            raise ValueError(f"column {name!r} refers to {ref!r}, not a stored column")
        out[name] = C.add(out[ref], C.decode(sub, n))
    for name, vals in out.items():
        if len(vals) != n:
            raise ValueError(f"column {name!r} holds {len(vals)} values, {n} expected")
    return {f: out[f] for f in fields}


#: fields whose values are lists (``Call.args``): a table column hands out one list per
#: distinct value, a struct gets a copy of its own
_LIST_FIELDS: dict[type, frozenset[str]] = {}
for _t in TYPES:
    _defaults: tuple[Any, ...] = _t.__struct_defaults__  # type: ignore[attr-defined]
    _LIST_FIELDS[_t] = frozenset(
        f
        for f, d in zip(_FIELDS[_t][len(_FIELDS[_t]) - len(_defaults) :], _defaults, strict=True)
        if isinstance(d, msgspec._core.Factory) and d.factory is list
    )


def _structs(cls: type, cols: Any, n: int) -> list[Any]:
    if n == 0:
        return []
    sec = _section(cls, cols, n)
    its: list[Iterable[Any]] = []
    for f, vals in sec.items():
        col = cols.get(f)
        if type(col) is list and len(col) == 2 and col[0] == "c" and _immutable(col[1]):
            its.append(repeat(col[1], n))  # no list of n equal values to make, then drop
        elif f in _LIST_FIELDS[cls] and type(col) is list and col[0] == "t":
            its.append(list(map(list, vals)))
        else:
            its.append(C.to_list(vals))
    return list(map(cls, *its))


def _immutable(v: Any) -> bool:
    return v is None or type(v) in (int, str, bytes, bool, float)


def _body(payload: bytes) -> tuple[bytes, list[Any], tuple[int, int, int]]:
    body = decode_any.decode(payload)
    if not isinstance(body, list) or not body or not isinstance(body[0], bytes):
        raise ValueError("chunk body is not [kinds, ...]")
    kinds: bytes = body[0]
    counts = (kinds.count(0), kinds.count(1), kinds.count(2))
    if sum(counts) != len(kinds):
        raise ValueError("unknown event kind in chunk")
    return kinds, body, counts


def decode_chunk(payload: bytes) -> list[Event]:
    """Inverse of `encode_chunk`; raises ValueError/TypeError/msgspec errors on bad input."""
    kinds, body, counts = _body(payload)
    n = len(kinds)
    secs = [
        _structs(t, body[1 + k] if len(body) > 1 + k else {}, counts[k])
        for k, t in enumerate(TYPES)
    ]
    for k in range(3):
        if counts[k] == n:
            return secs[k]
    out = np.empty(n, dtype=object)
    kind = np.frombuffer(kinds, dtype=np.uint8)
    for k in range(3):
        if counts[k]:
            objs = np.empty(counts[k], dtype=object)
            objs[:] = secs[k]
            out[kind == k] = objs
    return out.tolist()


class ChunkColumns(NamedTuple):
    """One chunk decoded column-wise: ``kinds[i]`` is event i's kind (0 call, 1 fault,
    2 contents); ``calls``/``faults``/``contents`` map every field of that event type to its
    values, in the order those events come in the trace."""

    kinds: bytes
    calls: dict[str, C.Column]
    faults: dict[str, C.Column]
    contents: dict[str, C.Column]

    def __len__(self) -> int:
        return len(self.kinds)


def decode_columns(payload: bytes) -> ChunkColumns:
    """Every field of every event of the chunk as columns (no per-event object)."""
    kinds, body, counts = _body(payload)
    secs = [
        _section(t, body[1 + k] if len(body) > 1 + k else {}, counts[k])
        for k, t in enumerate(TYPES)
    ]
    return ChunkColumns(kinds, *secs)


#: a chunk body whose calls and contents sections msgspec skips without building them
_dec_faults_only = msgspec.msgpack.Decoder(tuple[bytes, msgspec.Raw, dict[str, Any], msgspec.Raw])


def _fault_body(payload: bytes) -> tuple[bytes, dict[str, Any], int]:
    try:
        body: Any = _dec_faults_only.decode(payload)
    except msgspec.ValidationError:  # not the 4-element body this writer makes: decode it all
        body = decode_any.decode(payload)
        if not isinstance(body, list) or not body:
            raise ValueError("chunk body is not an array") from None
    kinds = body[0]
    if not isinstance(kinds, bytes):
        raise ValueError("chunk kinds is not bytes")
    cols = body[2] if len(body) > 2 else {}
    if not isinstance(cols, dict):
        raise ValueError("chunk faults section is not a map")
    return kinds, cols, kinds.count(KIND_FAULT)


def decode_chunk_faults(payload: bytes) -> tuple[list[Fault], int]:
    """The chunk's `Fault` s (the calls are skipped, not decoded) and its event count."""
    kinds, cols, n = _fault_body(payload)
    return _structs(Fault, cols, n), len(kinds)


def decode_fault_columns(payload: bytes) -> tuple[dict[str, C.Column], int]:
    """The chunk's faults as columns, ``{field: values}`` for every `Fault` field (int64
    arrays or lists; no struct is built), and the chunk's event count."""
    kinds, cols, n = _fault_body(payload)
    if n == 0:
        return {f: [] for f in _FIELDS[Fault]}, len(kinds)
    return dict(_section(Fault, cols, n)), len(kinds)


# ---------------------------------------------------------------------------------------------
# Compression
# ---------------------------------------------------------------------------------------------

#: a byte plane shorter than this is not worth its own deflate block (a block's Huffman tables
#: cost tens of bytes)
MIN_PLANE_BLOCK = 512


def _plane_cuts(body: Any, payload: bytes, min_plane: int = MIN_PLANE_BLOCK) -> list[int]:
    """Offsets in ``payload`` where a byte plane of a packed column starts or ends.

    Found by looking each column's bytes up in the payload in encoding order: a wrong guess
    (the same bytes earlier in the payload) only moves a block boundary, never the bytes."""
    cuts: list[int] = []
    pos = 0
    for section in body[1:] if isinstance(body, list) else ():
        if not isinstance(section, dict):
            continue
        stack: list[Any] = list(section.values())[::-1]
        while stack:
            col = stack.pop()
            if type(col) is tuple:  # a "b" column's blob: a block of its own
                at = payload.find(col[1], pos)
                if at >= 0:
                    if len(col[1]) >= min_plane:
                        cuts.extend((at, at + len(col[1])))
                    pos = at + len(col[1])
                continue
            if not isinstance(col, list) or not col:
                continue
            tag = col[0]
            if tag in ("p", "a") and len(col) == 3 and isinstance(col[2], bytes):
                raw, size = col[2], C.ITEMSIZE.get(col[1], 1)
                at = payload.find(raw, pos)
                if at < 0:
                    continue
                m = len(raw) // size if tag == "p" else len(raw)
                if m >= min_plane:
                    cuts.extend(range(at, at + len(raw) + 1, m))
                pos = at + len(raw)
            elif tag == "b" and len(col) == 3 and isinstance(col[2], bytes):
                stack.append(("blob", col[2]))
                stack.append(col[1])  # the lengths come first in the payload, then the blob
            elif tag in ("d", "s", "t", "r") and len(col) == 3:
                stack.append(col[2])
    return cuts


def compress_payload(payload: bytes, level: int = 6) -> bytes:
    """``payload`` as one zlib stream (``zlib.decompress`` reads it back), with a deflate block
    boundary at every large byte plane, so each plane gets Huffman codes of its own: the low
    planes of times and page numbers are near-random bytes, the high ones a few values, and
    one table for both wastes about a bit a byte (real random faults: 8.7 -> 7.9 bytes a
    fault). A block's code tables cost tens of bytes, so planes of at least `MIN_PLANE_BLOCK`
    and of four times that are tried; the smallest stream wins, the plain one included."""
    best = zlib.compress(payload, level)
    try:
        body = decode_any.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError):
        return best
    tried: set[tuple[int, ...]] = set()
    for min_plane in (MIN_PLANE_BLOCK, 4 * MIN_PLANE_BLOCK):
        cuts = tuple(sorted(set(_plane_cuts(body, payload, min_plane))))
        if not cuts or cuts in tried:
            continue
        tried.add(cuts)
        z = _blocks(payload, cuts, level)
        if len(z) < len(best):
            best = z
    return best


def _blocks(payload: bytes, cuts: Sequence[int], level: int) -> bytes:
    # Z_FILTERED: fewer, longer matches (runs in the high planes), more literals (the low
    # planes); Z_BLOCK ends a block without a flush marker and keeps the window
    c = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_FILTERED)
    parts = []
    last = 0
    for cut in cuts:
        if cut > last:
            parts.append(c.compress(payload[last:cut]))
            parts.append(c.flush(zlib.Z_BLOCK))
            last = cut
    parts.append(c.compress(payload[last:]))
    parts.append(c.flush())
    return b"".join(parts)
