"""The trace file format: round trips, streaming, and every way a file can be broken.

Follows ``docs/trace-format.md``: truncation is reported (``stopped_at``) unless ``strict``;
corruption (magic, checksums, versions, undecodable bytes) is a `TraceError` naming the byte.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from replay.events import COMPAT_VERSION, FORMAT_VERSION, Call, Contents, Event, Fault, Header
from replay.format import (
    MAGIC,
    TraceError,
    TraceReader,
    TraceWriter,
    compress_payload,
    decode_chunk,
    encode_chunk,
    open_trace,
)

U64 = (1 << 64) - 1
I64_MIN = -(1 << 63)
HEAD = 20
FRAME = 20


def extreme_events() -> list[Event]:
    """Every event type, with the values that break naive encoders."""
    return [
        Call(0, 1, 0, 0, "open"),
        Call(
            1,
            2**31 - 1,
            2**63 - 1,
            0,
            "ioctl",
            fd=2**31 - 1,
            fd_kind="kvm-vcpu:0",
            vcpu=0,
            request=0xC028AA03,
            name="UFFDIO_COPY",
            iarg=None,
            inp=b"",
            out=b"",
            ret=-1,
            errno=-(2**31),
        ),
        Call(2, 7, 5, 1, "mmap", iarg=U64, args=[U64, I64_MIN, 0, -1], ret=U64, errno=-1),
        Call(3, 7, -5, 2**62, "read", fd=-1, iarg=-(2**63), inp=b"\0" * 300, out=bytes(range(256))),
        Fault(
            4,
            9,
            vcpu=3,
            gpa=U64,
            hva=0,
            access="write",
            mechanism="uffd-missing",
            observed_ns=2**63 - 1,
            resolved_ns=0,
            how="",
        ),
        Fault(5, 9, gpa=-1, hva=U64, observed_ns=0, resolved_ns=2**63 - 1, how="copy"),
        Contents(6, U64, b""),
        Contents(7, 0, os.urandom(5000)),
        Call(8, 1, 0, 0, "monotonic_ns", ret=I64_MIN),
        Fault(2**63 - 1, 0, observed_ns=-(2**63), resolved_ns=2**63 - 1),
    ]


def write(path: Path, events: list[Event], chunk: int = 4096, header: Header | None = None) -> Path:
    with TraceWriter(path, header or Header(kernel="fake"), chunk_events=chunk) as w:
        for e in events:
            w.append(e)
    return path


def chunk_offsets(path: Path) -> list[int]:
    """The byte offset of each chunk frame (the end chunk last)."""
    data = path.read_bytes()
    hlen = struct.unpack_from("<I", data, 12)[0]
    off, out = HEAD + hlen, []
    while off < len(data):
        out.append(off)
        off += FRAME + struct.unpack_from("<I", data, off + 8)[0]
    return out


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_round_trip_every_event_type_with_extreme_values(tmp_path: Path, chunk: int) -> None:
    evs = extreme_events()
    p = write(tmp_path / "t.trc", evs, chunk)
    assert not (tmp_path / "t.trc.incomplete").exists()
    with open_trace(p, strict=True) as r:
        assert r.header.kernel == "fake"
        assert r.header.format_version == FORMAT_VERSION
        back = list(r)
        assert r.complete and r.stopped_at is None
    assert back == evs
    assert [type(e) for e in back] == [type(e) for e in evs]


def test_chunk_codec_mixed_and_single_kind() -> None:
    evs = extreme_events()
    assert decode_chunk(encode_chunk(evs)) == evs
    calls = [e for e in evs if isinstance(e, Call)]
    assert decode_chunk(encode_chunk(calls)) == calls
    faults = [e for e in evs if isinstance(e, Fault)]
    assert decode_chunk(encode_chunk(faults)) == faults
    assert decode_chunk(encode_chunk([])) == []
    with pytest.raises(TypeError):
        encode_chunk([object()])  # type: ignore[list-item]


def test_delta_columns_make_sequential_faults_small(tmp_path: Path) -> None:
    base, t = 0x7F12_3456_0000, 10**12
    rng = random.Random(3)
    evs: list[Event] = []
    for i in range(20000):
        t += rng.randrange(20_000, 60_000)
        evs.append(
            Fault(
                i,
                4242,
                vcpu=0,
                gpa=i * 4096,
                hva=base + i * 4096,
                access="read",
                mechanism="uffd-missing",
                observed_ns=t,
                resolved_ns=t + rng.randrange(5_000, 200_000),
                how="copy",
            )
        )
    p = write(tmp_path / "f.trc", evs)
    size = p.stat().st_size
    assert size / len(evs) < 8, size / len(evs)  # two random times a fault, the rest is constant
    assert list(open_trace(p)) == evs


def test_header_fields_survive(tmp_path: Path) -> None:
    h = Header(
        uuid="u",
        created="2026-11-25T00:00:00+00:00",
        kernel="real",
        profile=None,
        mechanism="uffd-minor",
        guest="hotset",
        seed=-1,
        argv=["fakekvm", "migrate"],
        role="source",
        with_contents=True,
        extra={"k": [1, "x"]},
    )
    p = write(tmp_path / "h.trc", [], header=h)
    r = open_trace(p)
    assert r.header == h
    assert list(r) == [] and r.complete


def gen_events(n: int) -> Iterator[Event]:
    rng = random.Random(n)
    t = 1 << 40
    for i in range(n):
        t += 1000 + (i * 7919) % 5000
        if i % 4 == 3:
            yield Fault(
                i,
                100 + i % 3,
                hva=0x7F00_0000_0000 + ((i * 2654435761) % (1 << 30)) * 4096 // 4096 * 4096,
                access="read",
                mechanism="uffd-missing",
                observed_ns=t,
                resolved_ns=t + 9000,
                how="copy",
            )
        else:
            yield Call(
                i,
                100 + i % 3,
                t,
                700,
                "ioctl",
                fd=9,
                fd_kind="userfaultfd",
                request=0xC028AA03,
                name="UFFDIO_COPY",
                inp=rng.randbytes(40),
            )


def test_streaming_read_of_200k_events_in_bounded_memory(tmp_path: Path) -> None:
    n = 200_000
    p = tmp_path / "big.trc"
    with TraceWriter(p, Header(), chunk_events=2048) as w:
        for e in gen_events(n):
            w.append(e)
    size = p.stat().st_size
    count = faults = 0
    last_seq = -1
    tracemalloc.start()
    try:
        r = open_trace(p)
        for e in r:
            count += 1
            faults += type(e) is Fault
            assert e.seq == last_seq + 1
            last_seq = e.seq
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n and faults == n // 4 and r.complete
    # one decoded chunk at a time: a few MiB of Python objects at most, never the whole file
    assert size > 4 << 20
    assert peak < size / 2, (peak, size)


def test_truncated_at_every_chunk_boundary(tmp_path: Path) -> None:
    evs = list(gen_events(50))
    src = write(tmp_path / "t.trc", evs, chunk=10)
    data = src.read_bytes()
    offs = chunk_offsets(src)
    assert len(offs) == 6  # 5 event chunks + the end chunk
    cuts = sorted(
        {c for o in [*offs, len(data)] for c in range(o - 3, o + 4) if 0 <= c < len(data)}
    )
    for cut in cuts:
        p = tmp_path / "cut.trc"
        p.write_bytes(data[:cut])
        if cut < offs[0]:
            with pytest.raises(TraceError) as ei:
                open_trace(p)
            assert "truncated header" in str(ei.value) and f"byte {ei.value.offset}" in str(
                ei.value
            )
            continue
        whole = sum(1 for o in offs[1:] if o <= cut)  # event chunks entirely before the cut
        whole = min(whole, 5)
        r = open_trace(p)
        got = list(r)
        assert got == evs[: 10 * whole], cut
        assert not r.complete
        assert r.stopped_at is not None
        if cut in offs:
            assert r.stopped_at.startswith("no end marker"), r.stopped_at
            assert f"byte {cut}" in r.stopped_at
        else:
            assert r.stopped_at.startswith(f"truncated at byte {cut}: chunk "), r.stopped_at
            assert "is cut short" in r.stopped_at
        with pytest.raises(TraceError) as ei:
            list(open_trace(p, strict=True))
        assert ei.value.offset == cut
        assert f"byte {cut}" in str(ei.value)


def test_every_single_bit_flip_is_a_trace_error(tmp_path: Path) -> None:
    evs = extreme_events()[:6]
    src = write(tmp_path / "t.trc", evs, chunk=3)
    data = bytearray(src.read_bytes())
    first_chunk = chunk_offsets(src)[0]
    p = tmp_path / "flip.trc"
    rng = random.Random(5)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 1 << rng.randrange(8)
        p.write_bytes(bad)
        with pytest.raises(TraceError) as ei, open_trace(p) as r:
            list(r)
        msg = str(ei.value)
        assert f"byte {ei.value.offset}" in msg, msg
        if i >= first_chunk:  # (a flipped header length may point past the flip)
            assert ei.value.offset <= i, (i, msg)


def test_flip_reasons_name_the_part(tmp_path: Path) -> None:
    src = write(tmp_path / "t.trc", extreme_events(), chunk=4)
    data = src.read_bytes()
    offs = chunk_offsets(src)

    def err(i: int) -> TraceError:
        bad = bytearray(data)
        bad[i] ^= 0x10
        p = tmp_path / "x.trc"
        p.write_bytes(bad)
        with pytest.raises(TraceError) as ei:
            list(open_trace(p))
        return ei.value

    assert "bad magic" in str(err(0))
    assert "header checksum mismatch" in str(err(offs[0] - 2))
    assert "frame checksum mismatch" in str(err(offs[1] + 5))
    e = err(offs[1] + FRAME + 3)
    assert "payload checksum mismatch" in str(e) and e.offset == offs[1] + FRAME


def test_version_bumped_header(tmp_path: Path) -> None:
    p = write(
        tmp_path / "v.trc",
        [Call(0, 1, 2, 3, "open")],
        header=Header(format_version=FORMAT_VERSION + 1, compat_version=FORMAT_VERSION + 1),
    )
    with pytest.raises(TraceError) as ei:
        open_trace(p)
    assert ei.value.offset == 8
    assert f"needs a reader of version >= {FORMAT_VERSION + 1}" in str(ei.value)
    assert f"this reader is version {FORMAT_VERSION}" in str(ei.value)
    # a newer format that old readers can still read: accepted, unknown header fields ignored
    newer = Header(format_version=FORMAT_VERSION + 1, compat_version=COMPAT_VERSION)
    p2 = write(tmp_path / "v2.trc", [Call(0, 1, 2, 3, "open")], header=newer)
    assert list(open_trace(p2)) == [Call(0, 1, 2, 3, "open")]


def test_undecodable_payload_with_valid_checksums(tmp_path: Path) -> None:
    src = write(tmp_path / "t.trc", [], chunk=1)
    data = src.read_bytes()
    hlen = struct.unpack_from("<I", data, 12)[0]
    for payload in (
        b"\xc1garbage",
        msgspec.msgpack.encode([b"\x00\x07", {}, {}, {}]),
        msgspec.msgpack.encode([b"\x00", {"seq": ["z"]}, {}, {}]),
        msgspec.msgpack.encode([b"\x00", {"seq": ["a", "q", b"123"]}, {}, {}]),
    ):
        frame16 = struct.pack("<2sBBIII", b"CK", 0, 0, 1, len(payload), zlib.crc32(payload))
        chunk = frame16 + struct.pack("<I", zlib.crc32(frame16)) + payload
        p = tmp_path / "u.trc"
        p.write_bytes(data[: HEAD + hlen] + chunk + data[HEAD + hlen :])
        with pytest.raises(TraceError) as ei:
            list(open_trace(p))
        assert "undecodable payload" in str(ei.value)
        assert ei.value.offset == HEAD + hlen + FRAME


def test_not_a_trace(tmp_path: Path) -> None:
    p = tmp_path / "n.trc"
    p.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(TraceError, match="bad magic") as ei:
        open_trace(p)
    assert ei.value.offset == 0
    p.write_bytes(MAGIC[:5])
    with pytest.raises(TraceError, match="truncated header"):
        open_trace(p)


def test_threads_append_concurrently(tmp_path: Path) -> None:
    p = tmp_path / "mt.trc"
    w = TraceWriter(p, Header(), chunk_events=64)
    barrier = threading.Barrier(4)

    def worker(tid: int) -> None:
        barrier.wait()
        for i in range(5000):
            w.append(Call(i, tid, i, 0, "ioctl"))

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    w.close()
    by_tid: dict[int, list[int]] = {}
    for e in open_trace(p, strict=True):
        assert isinstance(e, Call)
        by_tid.setdefault(e.tid, []).append(e.seq)
    assert {t: v for t, v in by_tid.items()} == {t: list(range(5000)) for t in range(4)}


_KILLED_WRITER = r"""
import sys
from replay.events import Call, Header
from replay.format import TraceWriter
w = TraceWriter(sys.argv[1], Header(kernel="fake"), chunk_events=10)
for i in range(35):          # 3 whole chunks written, 5 events still in memory
    w.append(Call(i, 1, i * 100, 1, "ioctl", name="KVM_RUN"))
print("ready", flush=True)
sys.stdin.read()             # wait for the SIGKILL
"""


def test_recording_of_a_process_killed_with_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "killed.trc"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not path.exists()
    inc = tmp_path / "killed.trc.incomplete"
    assert inc.exists()
    for r in (open_trace(path), open_trace(inc)):  # the plain name finds the .incomplete file
        assert r.path == str(inc)
        evs = list(r)
        assert [e.seq for e in evs] == list(range(30))
        assert not r.complete
        assert r.stopped_at is not None
        assert r.stopped_at == (
            f"no end marker: the recording was cut off after chunk 2 (byte {inc.stat().st_size})"
        )
    with pytest.raises(TraceError, match="no end marker"):
        list(open_trace(inc, strict=True))


def test_reader_is_reiterable_and_counts(tmp_path: Path) -> None:
    evs = list(gen_events(100))
    p = write(tmp_path / "r.trc", evs, chunk=16)
    r: TraceReader = open_trace(p)
    assert list(r) == evs
    assert r.chunks_read == 7 and r.events_read == 100
    assert [len(c) for c in r.chunks()] == [16] * 6 + [4]
    assert r.end_info == {"events": 100, "chunks": 7}


def test_the_reader_in_the_docs_reads_what_we_write(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "trace-format.md").read_text()
    code = doc.split("<!-- reader:begin -->")[1].split("<!-- reader:end -->")[0]
    code = code.split("```python")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 40
    ns: dict[str, object] = {}
    exec(compile(code, "trace-format.md", "exec"), ns)
    evs = extreme_events() + list(gen_events(300))
    p = write(tmp_path / "doc.trc", evs, chunk=64)
    it = ns["read_trace"](str(p))  # type: ignore[operator]
    header = next(it)
    assert header["kernel"] == "fake"
    got = list(it)
    tags = {Call: "call", Fault: "fault", Contents: "contents"}
    want = [(tags[type(e)], msgspec.structs.asdict(e)) for e in evs]
    assert got == want


def test_decoded_events_never_share_a_list() -> None:
    evs: list[Event] = [Call(i, 1, i, 0, "ioctl") for i in range(5)]
    back = decode_chunk(encode_chunk(evs))
    assert isinstance(back[0], Call) and isinstance(back[1], Call)
    back[0].args.append(7)
    assert back[1].args == [] and back == [*back[:1], *evs[1:]]
    same = decode_chunk(encode_chunk([Call(i, 1, i, 0, "mmap", args=[1, 2]) for i in range(3)]))
    assert isinstance(same[0], Call) and isinstance(same[2], Call)
    same[0].args.append(3)
    assert same[2].args == [1, 2]


def test_bad_table_index_is_undecodable(tmp_path: Path) -> None:
    body = msgspec.msgpack.encode(
        [
            b"\x00",
            {
                "seq": ["c", 0],
                "tid": ["c", 1],
                "t_ns": ["c", 2],
                "dur_ns": ["c", 3],
                "op": ["t", ["ioctl"], ["a", "b", b"\x05"]],
            },
            {},
            {},
        ]
    )
    with pytest.raises(IndexError):
        decode_chunk(body)
    assert decode_chunk(body.replace(b"\x05", b"\x00")) == [Call(0, 1, 2, 3, "ioctl")]


def test_close_recompresses_the_fast_recording_chunks(tmp_path: Path) -> None:
    """While recording, chunks are zlib level `RECORD_LEVEL` (cheap for the thread that fills
    one); `close` rewrites each at `ZLIB_LEVEL`: the same events, smaller, every checksum valid."""
    from replay.format import CHUNK_FRAME, RECORD_LEVEL, ZLIB_LEVEL

    rnd = random.Random(3)
    events: list[Event] = []
    t = 10**12
    for i in range(3 * 512 + 7):
        t += rnd.randrange(1, 4000)
        events.append(Call(seq=i, tid=1000 + i % 3, t_ns=t, dur_ns=rnd.randrange(300, 9000),
                           op="ioctl", fd=7, fd_kind="userfaultfd", request=0xC028AA03,
                           name="UFFDIO_COPY", inp=rnd.randbytes(8) + bytes(32), out=bytes(40)))  # fmt: skip
    path = tmp_path / "t.trace"
    w = TraceWriter(path, Header(), chunk_events=512)
    w.extend(events)
    w.flush()
    fast = (tmp_path / "t.trace.incomplete").read_bytes()
    w.close()
    assert not (tmp_path / "t.trace.incomplete").exists()
    final = path.read_bytes()
    assert len(final) < len(fast) and w.bytes == len(final)
    with open_trace(path, strict=True) as r:
        assert list(r) == events

    def payloads(data: bytes) -> list[bytes]:
        out, off = [], w.head_bytes
        while off < len(data):
            _m, kind, _flags, _c, plen, pcrc, _f = CHUNK_FRAME.unpack_from(data, off)
            p = data[off + CHUNK_FRAME.size : off + CHUNK_FRAME.size + plen]
            assert zlib.crc32(p) == pcrc
            if kind == 0:
                out.append(p)
            off += CHUNK_FRAME.size + plen
        return out

    before, after = payloads(fast), payloads(final)
    assert len(before) == len(after) == 4
    for b, a in zip(before, after, strict=True):
        raw = zlib.decompress(b)
        assert zlib.decompress(a) == raw
        assert b == zlib.compress(raw, RECORD_LEVEL) and a == compress_payload(raw, ZLIB_LEVEL)
        assert len(a) <= len(zlib.compress(raw, ZLIB_LEVEL))


def test_plane_blocks_make_random_faults_smaller_and_read_back_with_plain_zlib() -> None:
    """`compress_payload` puts a deflate block boundary at each byte plane: a payload of
    random-page faults with jittered times (the real random workload's shape) gets smaller
    than one zlib stream at the same level, and plain ``zlib.decompress`` reads it back."""
    rnd = random.Random(11)
    t = 10**12
    faults = []
    for i in range(2000):
        t += rnd.randint(200_000, 3_000_000)
        gpa = rnd.randrange(1 << 17) << 12
        lat = int(rnd.lognormvariate(12.5, 0.8))
        f = Fault(seq=7 * i + rnd.randint(0, 5), tid=900, vcpu=0, gpa=gpa, hva=(1 << 46) + gpa,
                  access="read", mechanism="uffd-missing", observed_ns=t, resolved_ns=t + lat,
                  how="copy")  # fmt: skip
        faults.append(f)
    raw = encode_chunk(faults)
    z = compress_payload(raw, 6)
    assert zlib.decompress(z) == raw
    assert len(z) < 0.97 * len(zlib.compress(raw, 6))
    assert decode_chunk(zlib.decompress(z)) == faults
    # nothing to cut (no byte plane long enough): the plain stream
    small = encode_chunk(faults[:10])
    assert compress_payload(small, 6) == zlib.compress(small, 6)
