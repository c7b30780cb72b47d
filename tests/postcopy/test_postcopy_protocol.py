"""The wire protocol: framing, decoding any split, garbage, and the per-side state machine."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy import protocol as p
from postcopy.protocol import (
    NEED_DATA,
    Bye,
    Channel,
    Connection,
    Decoder,
    Done,
    Error,
    Hello,
    NeedData,
    Pages,
    ProtocolError,
    Request,
    Role,
    VcpuState,
)

PS = 4096
GUEST = 64 * PS


def _join(parts: list[p.Buffer]) -> bytes:
    return b"".join(bytes(x) for x in parts)


def _source_stream() -> tuple[bytes, list[object]]:
    """A valid stream of every message type (the decoder does not care which side sent
    what) and the events it must decode to."""
    evs: list[object] = [
        Hello(Channel.DEMAND, PS, GUEST, 2, 3, 77),
        VcpuState(0, 1, bytes(range(144))),
        VcpuState(0, 2, b"\x5a" * 312),
        VcpuState(1, 1, b"\x01" * 144),
        Pages(3, 2, p.PAGES_DEMAND, bytes([7]) * (2 * PS)),
        Error(14, "REQUEST: pages [99, 100) outside guest memory (64 pages)", 99, 1),
        Pages(0, 1, 0, bytes([9]) * PS),
        Request(((1, 2), (10, 5))),
        p.DigestRequest(0, 64, 8),
        p.Digest(0, 64, 8, bytes(range(64))),
        Done(),
        Bye(),
    ]
    data = b"".join(_join(p.encode(e, PS)) for e in evs)  # type: ignore[arg-type]
    return data, evs


def _drain(dec: Decoder) -> list[object]:
    out: list[object] = []
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)


def _pages_data(ev: object) -> bytes | None:
    return bytes(ev.data) if isinstance(ev, Pages) and ev.data is not None else None


def test_frame_layout_is_fixed() -> None:
    assert p.FRAME.size == 8
    assert p.HELLO_BODY.size == 36
    hdr = _join(p.encode(Hello(Channel.BULK, 4096, 1 << 30, 4, 8, 5)))
    assert hdr[:8] == struct.pack("<BBHI", 1, 0, 0, 36)
    assert hdr[8:12] == b"FKPC"
    assert struct.unpack_from("<H", hdr, 12)[0] == p.VERSION
    assert _join(p.encode(Bye())) == b"\x07" + bytes(7)


def test_pages_encoding_passes_the_callers_buffer_through() -> None:
    mem = bytearray(4 * PS)
    view = memoryview(mem)[PS : 3 * PS]
    parts = p.encode(Pages(1, 2, 0, view), PS)
    assert parts[1] is view  # no copy of page data
    assert len(parts[0]) == p.PAGES_HEAD.size


def test_roundtrip_every_event_in_one_feed() -> None:
    data, evs = _source_stream()
    dec = Decoder(page_size=PS)
    dec.feed(data)
    got = _drain(dec)
    assert got == evs
    assert [_pages_data(e) for e in got] == [_pages_data(e) for e in evs]


def test_request_roundtrip() -> None:
    dec = Decoder(page_size=PS)
    dec.feed(_join(p.encode(Request(((1, 2), (10, 5))))))
    assert dec.next_event() == Request(((1, 2), (10, 5)))
    assert dec.next_event() is NEED_DATA


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=12))
def test_any_split_decodes_to_the_same_events(cuts: list[int]) -> None:
    data, evs = _source_stream()
    points = sorted({c % (len(data) + 1) for c in cuts})
    dec = Decoder(page_size=PS)
    got: list[object] = []
    prev = 0
    for c in [*points, len(data)]:
        dec.feed(data[prev:c])
        prev = c
        got += _drain(dec)
    assert got == evs
    assert [_pages_data(e) for e in got] == [_pages_data(e) for e in evs]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=40))
def test_zero_copy_body_any_split(chunks: list[int]) -> None:
    """With zero_copy_pages the caller takes page data itself; any split works."""
    data, evs = _source_stream()
    dec = Decoder(page_size=PS, zero_copy_pages=True)
    got: list[object] = []
    bodies: list[bytes] = []
    pos = 0
    target: memoryview | None = None
    filled = 0
    i = 0
    while pos < len(data) or dec.buffered or dec.body_remaining:
        if dec.body_remaining:
            assert target is not None
            n = dec.take_body_into(target[filled:])
            filled += n
            if dec.body_remaining and pos < len(data):
                # the caller reads the rest straight into its memory
                k = min(chunks[i % len(chunks)], dec.body_remaining, len(data) - pos)
                i += 1
                target[filled : filled + k] = data[pos : pos + k]
                dec.body_received(k)
                filled += k
                pos += k
            if not dec.body_remaining:
                bodies.append(bytes(target))
            continue
        ev = dec.next_event()
        if isinstance(ev, NeedData):
            k = chunks[i % len(chunks)]
            i += 1
            dec.feed(data[pos : pos + k])
            pos += k
            continue
        got.append(ev)
        if isinstance(ev, Pages):
            assert ev.data is None
            target = memoryview(bytearray(ev.count * PS))
            filled = 0
    assert [type(e) for e in got] == [type(e) for e in evs]
    assert bodies == [bytes(e.data) for e in evs if isinstance(e, Pages) and e.data is not None]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0, PS]))
def test_garbage_gives_protocol_error_or_need_data_only(blob: bytes, ps: int) -> None:
    dec = Decoder(page_size=ps)
    try:
        dec.feed(blob)
        for _ in range(100):
            if dec.next_event() is NEED_DATA:
                break
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0, max_value=400))
def test_mutated_valid_stream_never_raises_another_type(noise: bytes, at: int) -> None:
    data, _ = _source_stream()
    at %= len(data)
    mutated = data[:at] + noise + data[at + len(noise) :]
    for role in (Role.DESTINATION, Role.SOURCE):
        conn = Connection(role, Channel.DEMAND)
        if role is Role.DESTINATION:
            conn.send(Hello(Channel.DEMAND))
        try:
            conn.receive_data(mutated)
            conn.receive_data(b"")
            for _ in range(100):
                if conn.next_event() is NEED_DATA:
                    break
        except ProtocolError:
            pass


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (struct.pack("<BBHI", 99, 0, 0, 0), "unknown message type"),
        (struct.pack("<BBHI", 6, 1, 0, 0), "flags"),
        (struct.pack("<BBHI", 6, 0, 0, 4) + b"abcd", "unexpected payload"),
        (struct.pack("<BBHI", 3, 0, 0, 1 << 30), "too large"),
        (struct.pack("<BBHI", 3, 0, 0, 4) + struct.pack("<I", 0), "0 ranges"),
        (struct.pack("<BBHI", 4, 0, 0, 16) + struct.pack("<QII", 0, 1, 0), "data bytes"),
        (struct.pack("<BBHI", 4, 0, 0, 16 + PS) + struct.pack("<QII", 0, 0, 0), "page count"),
        (struct.pack("<BBHI", 4, 0, 0, 16 + PS) + struct.pack("<QII", 0, 1, 8), "flags"),
        (
            struct.pack("<BBHI", 1, 0, 0, 36)
            + struct.pack("<4sHHIQIIQ", b"XXXX", 1, 1, PS, GUEST, 1, 0, 0),
            "magic",
        ),
        (
            struct.pack("<BBHI", 1, 0, 0, 36)
            + struct.pack("<4sHHIQIIQ", b"FKPC", 9, 1, PS, GUEST, 1, 0, 0),
            "version 9",
        ),
        (
            struct.pack("<BBHI", 1, 0, 0, 36)
            + struct.pack("<4sHHIQIIQ", b"FKPC", 1, 1, 1000, GUEST, 1, 0, 0),
            "page size",
        ),
        (
            struct.pack("<BBHI", 5, 0, 0, 26) + struct.pack("<iIQQ", 1, 0, 0, 0) + b"\xff\xfe",
            "UTF-8",
        ),
    ],
)
def test_each_malformation_is_named(frame: bytes, match: str) -> None:
    dec = Decoder(page_size=PS)
    dec.feed(frame)
    with pytest.raises(ProtocolError, match=match):
        dec.next_event()


def test_pages_before_hello_is_an_error() -> None:
    dec = Decoder()
    dec.feed(p.PAGES_HEAD.pack(4, 0, 0, 16 + PS, 0, 1, 0) + bytes(PS))
    with pytest.raises(ProtocolError, match="before HELLO"):
        dec.next_event()


def _pair() -> tuple[Connection, Connection]:
    """A source and destination connection after the handshake."""
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION, Channel.DEMAND)
    src.receive_data(_join(dst.send(Hello(Channel.DEMAND))))
    assert src.next_event() == Hello(Channel.DEMAND)
    assert src.channel is Channel.DEMAND
    dst.receive_data(_join(src.send(Hello(Channel.DEMAND, PS, GUEST, 1, 0, 5))))
    ev = dst.next_event()
    assert isinstance(ev, Hello) and ev.nr_pages == 64
    assert src.state is p.State.READY and dst.state is p.State.READY
    return src, dst


def test_handshake_and_exchange() -> None:
    src, dst = _pair()
    src.receive_data(_join(dst.send(Request(((5, 1),)))))
    assert src.next_event() == Request(((5, 1),))
    assert _join(dst.send_request([(5, 1)])) == _join(p.encode(Request(((5, 1),))))
    data = bytes([3]) * PS
    dst.receive_data(_join(src.send_pages(5, 1, p.PAGES_DEMAND, data)))
    ev = dst.next_event()
    assert isinstance(ev, Pages) and ev.demand and bytes(ev.data or b"") == data
    src.receive_data(_join(dst.send(Done())))
    assert src.next_event() == Done()
    assert src.state is p.State.DONE
    with pytest.raises(ProtocolError, match="in state done"):
        dst.send(Request(((1, 1),)))
    dst.receive_data(_join(src.send(Bye())))
    assert dst.next_event() == Bye()
    with pytest.raises(ProtocolError, match="after the peer's BYE"):
        dst.next_event()
    with pytest.raises(ProtocolError, match="after BYE"):
        src.send(Pages(0, 1, 0, data))


def test_state_violations() -> None:
    src = Connection(Role.SOURCE)
    with pytest.raises(ProtocolError, match="source HELLO in state start"):
        src.send(Hello(Channel.DEMAND, PS, GUEST))
    src.receive_data(_join(p.encode(Request(((1, 1),)))))
    with pytest.raises(ProtocolError, match="before HELLO"):
        src.next_event()
    dst = Connection(Role.DESTINATION, Channel.BULK)
    with pytest.raises(ProtocolError, match="HELLO for DEMAND on the BULK channel"):
        dst.send(Hello(Channel.DEMAND))
    with pytest.raises(ProtocolError, match="cannot send Pages"):
        dst.send(Pages(0, 1, 0, bytes(PS)))
    with pytest.raises(ProtocolError, match="in state start"):
        dst.send(Request(((0, 1),)))
    dst.send(Hello(Channel.BULK))
    with pytest.raises(ProtocolError, match="HELLO sent twice"):
        dst.send(Hello(Channel.BULK))
    # the source speaks before the destination said HELLO: a destination refuses it
    d2 = Connection(Role.DESTINATION, Channel.DEMAND)
    d2.receive_data(_join(p.encode(Hello(Channel.DEMAND, PS, GUEST))))
    with pytest.raises(ProtocolError, match="before ours"):
        d2.next_event()


def test_out_of_range_pages_are_refused_both_ways() -> None:
    src, dst = _pair()
    with pytest.raises(ProtocolError, match="outside guest memory"):
        src.send_pages(63, 2, 0, bytes(2 * PS))
    dst.receive_data(p.PAGES_HEAD.pack(4, 0, 0, 16 + PS, 64, 1, 0) + bytes(PS))
    with pytest.raises(ProtocolError, match="outside guest memory"):
        dst.next_event()


def test_truncated_stream_is_an_error_at_eof() -> None:
    src, dst = _pair()
    frame = _join(src.send_pages(1, 1, 0, bytes(PS)))
    dst.receive_data(frame[:100])
    assert dst.next_event() is NEED_DATA
    dst.receive_data(b"")
    with pytest.raises(ProtocolError, match="inside a frame"):
        dst.next_event()


def test_request_bounds_error() -> None:
    assert p.request_bounds_error([(0, 64)], 64) is None
    err = p.request_bounds_error([(0, 1), (63, 2)], 64)
    assert err is not None and err.code == 14 and (err.start, err.count) == (63, 2)
    assert p.request_bounds_error([(1 << 62, 1)], 64) is not None


def test_digest_messages() -> None:
    src, dst = _pair()
    src.receive_data(_join(dst.send(p.DigestRequest(0, 64, 8))))
    assert src.next_event() == p.DigestRequest(0, 64, 8)
    dst.receive_data(_join(src.send(p.Digest(0, 64, 8, bytes(range(64))))))
    assert dst.next_event() == p.Digest(0, 64, 8, bytes(range(64)))
    with pytest.raises(ProtocolError, match="digests"):
        src.send(p.Digest(0, 64, 8, bytes(8)))
    with pytest.raises(ProtocolError, match="DIGEST_REQUEST"):
        dst.send(p.DigestRequest(0, 1 << 40, 1))
    dec = Decoder(page_size=PS)
    dec.feed(struct.pack("<BBHI", 9, 0, 0, 24 + 8) + struct.pack("<QQI4x", 0, 64, 8) + bytes(8))
    with pytest.raises(ProtocolError, match="DIGEST"):
        dec.next_event()
