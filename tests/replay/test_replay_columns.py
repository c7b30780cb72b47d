"""The chunk codec's columns (`replay.columns`) and the column-wise decode (`decode_columns`).

Every column a writer makes must decode to the values it was given, whatever they are (ints at
the int64/uint64 edges, None, bools, bytes, lists): the numpy fast paths only take values
that cannot overflow, and everything else takes the plain path. The column-wise decode must
say the same as the struct decode, event by event, on the shipped traces too (format version
1, written before the codec moved to numpy) and after rewriting them in the current version.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay import columns as C
from replay.codec import decode_chunk, decode_columns, encode_chunk
from replay.events import COMPAT_VERSION, FORMAT_VERSION, Call, Contents, Fault, Header
from replay.format import TraceWriter, open_trace

U64 = (1 << 64) - 1
I64_MIN = -(1 << 63)
TRACES = sorted((Path(__file__).resolve().parents[2] / "traces").glob("*.trace"))
#: version-1 traces kept as they were shipped before format 2
V1_TRACES = sorted((Path(__file__).resolve().parent / "data" / "v1").glob("*.trace"))

ints64 = st.integers(min_value=I64_MIN, max_value=U64)
scalars = st.one_of(ints64, st.none(), st.booleans(), st.binary(max_size=8), st.text(max_size=4))


def _roundtrip(col: list[Any], n: int) -> list[Any]:
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(col))
    return C.to_list(C.decode(wire, n))


@settings(max_examples=300, deadline=None)
@given(st.lists(ints64, max_size=40))
def test_int_columns_round_trip_at_every_width(vals: list[int]) -> None:
    for enc in (C.pack_ints, C.delta, C.addr, C.table):
        out = _roundtrip(enc(vals), len(vals))
        assert out == vals and all(type(v) is int for v in out), enc.__name__


@settings(max_examples=300, deadline=None)
@given(st.lists(scalars, max_size=30))
def test_mixed_columns_round_trip_with_their_types(vals: list[Any]) -> None:
    for enc in (C.pack_ints, C.delta, C.table):
        out = _roundtrip(enc(vals), len(vals))
        assert out == vals and list(map(type, out)) == list(map(type, vals)), enc.__name__


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=70), max_size=30))
def test_bytes_columns_round_trip(vals: list[bytes]) -> None:
    col = C.blob(vals)
    out = C.decode(msgspec.msgpack.decode(msgspec.msgpack.encode(col)), len(vals))
    assert C.to_list(out) == vals
    assert len(out) == len(vals)
    assert [out[i] for i in range(-len(vals), 0)] == vals


def test_int_columns_decode_to_int64_arrays_with_the_tags_we_expect() -> None:
    gpas = [(i * 7919 % 1000) * 4096 for i in range(500)]  # random guest pages
    col = C.addr(gpas)
    assert col[0] == "s" and col[1] == 12 and col[2][:2] == ["p", "h"]  # page numbers
    out = C.decode(col, len(gpas))
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.tolist() == gpas
    hvas = [0x7F00_0000_0000 + g for g in gpas]  # wide addresses: page-number deltas
    col = C.addr(hvas)
    assert col[0] == "d" and col[2][:2] == ["s", 12]
    assert C.decode(col, len(hvas)).tolist() == hvas
    seq = list(range(10, 5010, 5))
    assert C.delta(seq) == ["d", 10, ["c", 5]]
    times = [10**12 + i * 1000 + (i * i) % 97 for i in range(300)]
    col = C.delta(times)
    assert col[0] == "d" and col[2][:2] == ["p", "h"]
    assert C.decode(col, 300).tolist() == times


def test_a_table_of_lists_hands_each_struct_its_own_list() -> None:
    calls = [Call(i, 1, i, 1, "mmap", args=[4096, 3] if i % 2 else []) for i in range(64)]
    payload = encode_chunk(calls)
    body = msgspec.msgpack.decode(payload)
    assert body[1]["args"][0] == "t"
    out = decode_chunk(payload)
    assert out == calls
    out[1].args.append(7)
    assert out[3].args == [4096, 3]


def test_damaged_columns_are_errors_not_wrong_values() -> None:
    with pytest.raises(ValueError):
        C.decode(["p", "i", b"\0" * 7], 2)  # 7 bytes for two 4-byte values
    with pytest.raises(ValueError):
        C.decode(["b", ["c", 3], b"ab"], 1)  # lengths add up to 3, blob holds 2
    with pytest.raises(IndexError):
        C.decode(["t", ["x"], ["a", "b", b"\x01"]], 1)
    with pytest.raises(ValueError):
        C.decode(["q", 1], 1)


def _events(n: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    out: list[Any] = []
    t = 1 << 40
    for i in range(n):
        t += rng.randint(100, 9000)
        r = rng.random()
        if r < 0.6:
            out.append(Call(i, 100 + i % 3, t, rng.randint(0, 10**6), "ioctl", fd=7,
                            fd_kind="userfaultfd", request=0xC028AA03, name="UFFDIO_COPY",
                            inp=rng.randbytes(40), out=rng.randbytes(40), ret=0))  # fmt: skip
        elif r < 0.7:
            out.append(Call(i, 5, t, 3, "read", fd=7, iarg=32768 if i % 2 else None,
                            out=rng.randbytes(32 * rng.randint(0, 3)), ret=32))  # fmt: skip
        elif r < 0.95:
            out.append(Fault(i, 100, vcpu=0, gpa=rng.randrange(1 << 17) << 12,
                             hva=(1 << 45) + (rng.randrange(1 << 17) << 12), access="read",
                             mechanism="uffd-missing", observed_ns=t,
                             resolved_ns=t + rng.randint(10**4, 10**6), how="copy"))  # fmt: skip
        else:
            out.append(Contents(i, rng.randrange(1 << 40) << 12, rng.randbytes(4096)))
    return out


def _as_rows(cols: Any) -> list[Any]:
    """The events of a `ChunkColumns`, rebuilt from the columns in trace order."""
    secs = []
    for cls, sec in zip((Call, Fault, Contents), (cols.calls, cols.faults, cols.contents), strict=True):
        vals = [C.to_list(v) for v in sec.values()]
        secs.append(iter([cls(*row) for row in zip(*vals, strict=True)]))
    return [next(secs[k]) for k in cols.kinds]


def test_column_decode_says_what_the_struct_decode_says() -> None:
    evs = _events(3000, 1)
    payload = encode_chunk(evs)
    cols = decode_columns(payload)
    assert len(cols) == 3000
    assert isinstance(cols.calls["t_ns"], np.ndarray)
    assert isinstance(cols.calls["inp"], C.BytesColumn)
    assert _as_rows(cols) == decode_chunk(payload) == evs


@pytest.mark.parametrize("path", TRACES + V1_TRACES, ids=[p.name for p in TRACES + V1_TRACES])
def test_shipped_traces_read_column_wise_and_upgrade_to_the_current_version(
    path: Path, tmp_path: Path
) -> None:
    with open_trace(path, strict=True) as r:
        old_version = r.header.format_version
        events = list(r)
        rows = [e for c in r.columns() for e in _as_rows(c)]
        header = r.header
    assert rows == events
    assert old_version <= FORMAT_VERSION
    new = tmp_path / "upgraded.trace"
    h = msgspec.structs.replace(header, format_version=FORMAT_VERSION, compat_version=COMPAT_VERSION)
    with TraceWriter(new, h) as w:
        w.extend(events)
    with open_trace(new, strict=True) as r:
        assert r.header.format_version == FORMAT_VERSION
        assert list(r) == events
    assert new.stat().st_size <= path.stat().st_size * 1.02 + 64


def test_the_version_1_fixtures_are_version_1() -> None:
    assert len(V1_TRACES) == 2
    for p in V1_TRACES:
        with open_trace(p, strict=True) as r:
            assert (r.header.format_version, r.header.compat_version) == (1, 1)


def test_a_version_1_reader_is_told_it_cannot_read_what_we_write(tmp_path: Path) -> None:
    """What we write uses column tags a version-1 reader does not know; the header says so."""
    p = tmp_path / "t.trace"
    with TraceWriter(p, Header()) as w:
        w.extend(_events(50, 2))
    raw = p.read_bytes()
    assert raw[8:12] == FORMAT_VERSION.to_bytes(2, "little") + COMPAT_VERSION.to_bytes(2, "little")
    assert COMPAT_VERSION >= 2


def test_trace_upgrade_rewrites_a_version_1_trace_in_place(tmp_path: Path) -> None:
    """``fakekvm trace upgrade``: the same header (but its versions) and the same events, in
    the current version, smaller; a cut-off recording is refused and left alone."""
    import shutil

    from tools.cli import main

    v1 = next(p for p in V1_TRACES if "real-uffd-missing-1vcpu-random" in p.name)
    path = tmp_path / v1.name
    shutil.copy(v1, path)
    with open_trace(path) as r:
        before_header, before = r.header, list(r)
    assert before_header.format_version == 1
    assert main(["trace", "upgrade", str(path)]) == 0
    with open_trace(path, strict=True) as r:
        assert r.header.format_version == FORMAT_VERSION
        assert msgspec.structs.replace(r.header, format_version=1, compat_version=1) == before_header
        assert list(r) == before
    assert path.stat().st_size < v1.stat().st_size
    assert not list(tmp_path.glob("*.upgrading*"))
    cut = tmp_path / "cut.trace.incomplete"
    cut.write_bytes(v1.read_bytes()[: v1.stat().st_size - 30])
    assert main(["trace", "upgrade", str(tmp_path / "cut.trace")]) == 1
    assert cut.read_bytes() == v1.read_bytes()[: v1.stat().st_size - 30]
    assert not list(tmp_path.glob("*.upgrading*"))
