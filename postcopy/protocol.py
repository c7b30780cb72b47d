"""The post-copy wire protocol, as an I/O-free state machine (h11-style).

Two connections join a destination to a source, like QEMU's main migration
stream and its ``postcopy-preempt`` channel (``migration/postcopy-ram.c``,
``docs/devel/migration/postcopy.rst``): a *demand* channel that carries page
requests and their replies, and a *bulk* channel that carries the background
push. Nothing here touches a socket: bytes go in through
:meth:`Connection.receive_data`, events come out of :meth:`Connection.next_event`,
and :meth:`Connection.send` turns an event into a list of buffers to write.

Framing. Every frame is an 8-byte header ``<BBHI``: ``type``, ``flags``,
``reserved`` (0) and the payload length, then the payload. Payloads:

=========== ==========================================================================
HELLO       ``<4sHHIQIIQ`` (36 bytes) magic ``b"FKPC"``, version, channel, page_size,
            guest_size, nr_vcpus, state_blobs, session
VCPU_STATE  ``<II`` vcpu, kind, then the blob (opaque: ``kvm_regs``, ``kvm_sregs``)
REQUEST     ``<I`` nr ranges, then nr x ``<QQ`` (start page, page count)
PAGES       ``<QII`` start page, page count, flags (1: a demand reply); then the pages
ERROR       ``<iIQQ`` code (an errno), pad, start, count (the refused range); UTF-8 text
DONE, BYE   empty
DIGEST_REQ  ``<QQI4x`` start page, page count, granule (pages per digest)
DIGEST      ``<QQI4x`` the same, then ceil(count / granule) x ``<Q`` digests
            (:func:`postcopy.pages.page_digests`), to verify memory at the end
=========== ==========================================================================

``PAGES`` data is never copied on send (:meth:`Connection.send` returns the
header and the caller's memoryview slice), and on receive the caller may take
it straight into its own buffer (``zero_copy_pages``; see :class:`Decoder`).

Anything malformed raises :class:`ProtocolError` and nothing else.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

MAGIC: Final = b"FKPC"
VERSION: Final = 1

#: frame header: type, flags, reserved, payload length
FRAME = struct.Struct("<BBHI")
HELLO_BODY = struct.Struct("<4sHHIQIIQ")
VCPU_STATE_BODY = struct.Struct("<II")
REQUEST_BODY = struct.Struct("<I")
RANGE = struct.Struct("<QQ")
PAGES_BODY = struct.Struct("<QII")
ERROR_BODY = struct.Struct("<iIQQ")
DIGEST_BODY = struct.Struct("<QQI4x")
#: a DIGEST answers at most this many digests
MAX_DIGESTS: Final = 1 << 17
#: header + PAGES fixed part in one pack
PAGES_HEAD = struct.Struct("<BBHIQII")
#: a whole one-range REQUEST frame, and its payload
_ONE_RANGE = struct.Struct("<BBHIIQQ")
_ONE_RANGE_BODY = struct.Struct("<IQQ")

#: frames other than PAGES are small; a bigger declared length is garbage
MAX_CONTROL_PAYLOAD: Final = 1 << 20
#: PAGES payloads are bounded by this many pages
MAX_PAGES_PER_FRAME: Final = 1 << 16
MAX_RANGES: Final = 4096
PAGE_SIZES: Final = frozenset(1 << s for s in range(12, 31))  # 4 KiB .. 1 GiB


class ProtocolError(Exception):
    """The peer (or the caller) broke the protocol."""


class MsgType(enum.IntEnum):
    HELLO = 1
    VCPU_STATE = 2
    REQUEST = 3
    PAGES = 4
    ERROR = 5
    DONE = 6
    BYE = 7
    DIGEST_REQUEST = 8
    DIGEST = 9


_KINDS: Final = {int(k): k for k in MsgType}


class Channel(enum.IntEnum):
    DEMAND = 1
    BULK = 2


class Role(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class VcpuStateKind(enum.IntEnum):
    REGS = 1  # struct kvm_regs, 144 bytes
    SREGS = 2  # struct kvm_sregs, 312 bytes


#: PAGES flags
PAGES_DEMAND: Final = 1  # a reply to a REQUEST (else background push)


# -- events ----------------------------------------------------------------------------


@dataclass(slots=True)
class Hello:
    channel: Channel
    page_size: int = 0
    guest_size: int = 0
    nr_vcpus: int = 0
    state_blobs: int = 0
    session: int = 0
    version: int = VERSION

    @property
    def nr_pages(self) -> int:
        return self.guest_size // self.page_size if self.page_size else 0


@dataclass(slots=True)
class VcpuState:
    vcpu: int
    kind: int
    blob: bytes


@dataclass(slots=True)
class Request:
    ranges: tuple[tuple[int, int], ...]


@dataclass(slots=True)
class Pages:
    """``count`` pages from ``start``. ``data`` is None when the decoder left the
    bytes for the caller to take (zero-copy receive)."""

    start: int
    count: int
    flags: int = 0
    data: bytes | bytearray | memoryview | None = field(default=None, compare=False)

    @property
    def demand(self) -> bool:
        return bool(self.flags & PAGES_DEMAND)


@dataclass(slots=True)
class Error:
    code: int
    text: str
    start: int = 0
    count: int = 0


@dataclass(slots=True)
class DigestRequest:
    start: int
    count: int
    granule: int = 1

    @property
    def entries(self) -> int:
        return -(-self.count // self.granule) if self.granule > 0 else 0


@dataclass(slots=True)
class Digest:
    start: int
    count: int
    granule: int
    digests: bytes  # entries x 8 bytes, little-endian u64


@dataclass(slots=True)
class Done:
    pass


@dataclass(slots=True)
class Bye:
    pass


Event = Hello | VcpuState | Request | Pages | Error | Done | Bye | DigestRequest | Digest


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by next_event() when a whole frame is not buffered yet
NEED_DATA: Final = NeedData()

Buffer = bytes | bytearray | memoryview


# -- encoder ---------------------------------------------------------------------------


def encode(ev: Event, page_size: int = 0) -> list[Buffer]:
    """Frame one event. PAGES data is passed through as given (no copy)."""
    if isinstance(ev, Pages):
        if ev.data is None:
            raise ProtocolError("PAGES: no data to send")
        n = len(ev.data)
        if page_size and n != ev.count * page_size:
            raise ProtocolError(f"PAGES: {n} data bytes for {ev.count} pages of {page_size}")
        head = PAGES_HEAD.pack(
            MsgType.PAGES, 0, 0, PAGES_BODY.size + n, ev.start, ev.count, ev.flags
        )
        return [head, ev.data]
    if isinstance(ev, Request):
        body = REQUEST_BODY.pack(len(ev.ranges)) + b"".join(RANGE.pack(s, c) for s, c in ev.ranges)
        return [FRAME.pack(MsgType.REQUEST, 0, 0, len(body)) + body]
    if isinstance(ev, Hello):
        body = HELLO_BODY.pack(
            MAGIC,
            ev.version,
            ev.channel,
            ev.page_size,
            ev.guest_size,
            ev.nr_vcpus,
            ev.state_blobs,
            ev.session,
        )
        return [FRAME.pack(MsgType.HELLO, 0, 0, len(body)) + body]
    if isinstance(ev, VcpuState):
        body = VCPU_STATE_BODY.pack(ev.vcpu, ev.kind) + bytes(ev.blob)
        return [FRAME.pack(MsgType.VCPU_STATE, 0, 0, len(body)) + body]
    if isinstance(ev, Error):
        text = ev.text.encode()[:4096]
        body = ERROR_BODY.pack(ev.code, 0, ev.start, ev.count) + text
        return [FRAME.pack(MsgType.ERROR, 0, 0, len(body)) + body]
    if isinstance(ev, DigestRequest):
        body = DIGEST_BODY.pack(ev.start, ev.count, ev.granule)
        return [FRAME.pack(MsgType.DIGEST_REQUEST, 0, 0, len(body)) + body]
    if isinstance(ev, Digest):
        body = DIGEST_BODY.pack(ev.start, ev.count, ev.granule) + bytes(ev.digests)
        return [FRAME.pack(MsgType.DIGEST, 0, 0, len(body)) + body]
    if isinstance(ev, Done):
        return [FRAME.pack(MsgType.DONE, 0, 0, 0)]
    if isinstance(ev, Bye):
        return [FRAME.pack(MsgType.BYE, 0, 0, 0)]
    raise ProtocolError(f"cannot encode {ev!r}")


# -- decoder ---------------------------------------------------------------------------


class Decoder:
    """Turns a byte stream into events.

    Feed any split of the stream with :meth:`feed`; :meth:`next_event` returns
    one event or :data:`NEED_DATA`. With ``zero_copy_pages`` a PAGES frame is
    returned as soon as its fixed part is in (``data=None``) and the decoder then
    owes the caller :attr:`body_remaining` bytes of page data: the caller takes
    what is already buffered with :meth:`take_body` and reads the rest itself
    straight into its own memory, reporting it with :meth:`body_received`.
    """

    def __init__(self, *, page_size: int = 0, zero_copy_pages: bool = False) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.page_size = page_size
        self.zero_copy_pages = zero_copy_pages
        self.body_remaining = 0
        self.closed = False

    # input ------------------------------------------------------------------
    def feed(self, data: Buffer) -> None:
        if self.closed:
            raise ProtocolError("data after end of stream")
        if data:
            if self._pos and self._pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            self._buf += data

    def feed_eof(self) -> None:
        self.closed = True

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def trailing_data(self) -> bool:
        """True when EOF came inside a frame (a truncated stream)."""
        return self.closed and (self.buffered > 0 or self.body_remaining > 0)

    # zero-copy body ---------------------------------------------------------
    def take_body(self, n: int) -> bytes:
        """Up to ``n`` bytes of the owed page data that are already buffered."""
        n = min(n, self.body_remaining, self.buffered)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self.body_remaining -= n
        self._compact()
        return out

    def take_body_into(self, target: memoryview) -> int:
        """Copy the owed page data already buffered into ``target``; returns the count."""
        n = min(len(target), self.body_remaining, self.buffered)
        if n:
            with memoryview(self._buf) as m:
                target[:n] = m[self._pos : self._pos + n]
            self._pos += n
            self.body_remaining -= n
            self._compact()
        return n

    def body_received(self, n: int) -> None:
        if n < 0 or n > self.body_remaining:
            raise ProtocolError(f"body_received({n}) with {self.body_remaining} owed")
        self.body_remaining -= n

    # output -----------------------------------------------------------------
    def next_event(self) -> Event | NeedData:
        if self.body_remaining:
            raise ProtocolError(f"{self.body_remaining} bytes of page data not taken yet")
        avail = self.buffered
        if avail < FRAME.size:
            return NEED_DATA
        mtype, flags, reserved, length = FRAME.unpack_from(self._buf, self._pos)
        if reserved or flags:
            raise ProtocolError(f"frame header: flags={flags} reserved={reserved} must be 0")
        kind = _KINDS.get(mtype)
        if kind is None:
            raise ProtocolError(f"unknown message type {mtype}")
        if kind is MsgType.PAGES:
            return self._pages(length, avail)
        if kind is MsgType.REQUEST and length == _ONE_RANGE_BODY.size:  # the fault path
            if avail < FRAME.size + length:
                return NEED_DATA
            nr, s, c = _ONE_RANGE_BODY.unpack_from(self._buf, self._pos + FRAME.size)
            if nr == 1:
                self._pos += FRAME.size + length
                self._compact()
                return Request(((s, c),))
        if length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(f"{kind.name}: payload of {length} bytes is too large")
        if avail < FRAME.size + length:
            return NEED_DATA
        start = self._pos + FRAME.size
        body = bytes(self._buf[start : start + length])
        self._pos = start + length
        self._compact()
        return _parse_control(kind, body)

    def _pages(self, length: int, avail: int) -> Pages | NeedData:
        if length < PAGES_BODY.size:
            raise ProtocolError(f"PAGES: payload of {length} bytes is shorter than its header")
        if avail < FRAME.size + PAGES_BODY.size:
            return NEED_DATA
        start, count, flags = PAGES_BODY.unpack_from(self._buf, self._pos + FRAME.size)
        nbytes = length - PAGES_BODY.size
        if count == 0 or count > MAX_PAGES_PER_FRAME:
            raise ProtocolError(f"PAGES: page count {count} out of range")
        if flags & ~PAGES_DEMAND:
            raise ProtocolError(f"PAGES: unknown flags {flags:#x}")
        if not self.page_size:
            raise ProtocolError("PAGES before HELLO told the page size")
        if nbytes != count * self.page_size:
            raise ProtocolError(f"PAGES: {nbytes} data bytes for {count} pages of {self.page_size}")
        head = FRAME.size + PAGES_BODY.size
        if self.zero_copy_pages:
            self._pos += head
            self.body_remaining = nbytes
            self._compact()
            return Pages(start, count, flags, None)
        if avail < head + nbytes:
            return NEED_DATA
        begin = self._pos + head
        data = bytes(self._buf[begin : begin + nbytes])
        self._pos = begin + nbytes
        self._compact()
        return Pages(start, count, flags, data)

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 1 << 16:
            del self._buf[: self._pos]
            self._pos = 0


def _parse_control(kind: MsgType, body: bytes) -> Event:
    n = len(body)
    if kind is MsgType.HELLO:
        if n != HELLO_BODY.size:
            raise ProtocolError(f"HELLO: payload of {n} bytes, expected {HELLO_BODY.size}")
        magic, version, channel, page_size, guest_size, nr_vcpus, blobs, session = (
            HELLO_BODY.unpack(body)
        )
        if magic != MAGIC:
            raise ProtocolError(f"HELLO: bad magic {magic!r}")
        if version != VERSION:
            raise ProtocolError(f"HELLO: version {version} not supported (this is {VERSION})")
        try:
            ch = Channel(channel)
        except ValueError:
            raise ProtocolError(f"HELLO: unknown channel {channel}") from None
        if page_size and page_size not in PAGE_SIZES:
            raise ProtocolError(f"HELLO: page size {page_size} is not a power of two >= 4096")
        if page_size and guest_size % page_size:
            raise ProtocolError(f"HELLO: guest size {guest_size} not a multiple of {page_size}")
        return Hello(ch, page_size, guest_size, nr_vcpus, blobs, session, version)
    if kind is MsgType.VCPU_STATE:
        if n < VCPU_STATE_BODY.size:
            raise ProtocolError(f"VCPU_STATE: payload of {n} bytes is too short")
        vcpu, k = VCPU_STATE_BODY.unpack_from(body)
        return VcpuState(vcpu, k, body[VCPU_STATE_BODY.size :])
    if kind is MsgType.REQUEST:
        if n < REQUEST_BODY.size:
            raise ProtocolError("REQUEST: payload too short")
        (nr,) = REQUEST_BODY.unpack_from(body)
        if nr == 0 or nr > MAX_RANGES or n != REQUEST_BODY.size + nr * RANGE.size:
            raise ProtocolError(f"REQUEST: {nr} ranges in a payload of {n} bytes")
        ranges = tuple(RANGE.iter_unpack(body[REQUEST_BODY.size :]))
        return Request(ranges)
    if kind is MsgType.ERROR:
        if n < ERROR_BODY.size:
            raise ProtocolError("ERROR: payload too short")
        code, _pad, start, count = ERROR_BODY.unpack_from(body)
        try:
            text = body[ERROR_BODY.size :].decode()
        except UnicodeDecodeError:
            raise ProtocolError("ERROR: text is not UTF-8") from None
        return Error(code, text, start, count)
    if kind is MsgType.DIGEST_REQUEST or kind is MsgType.DIGEST:
        if n < DIGEST_BODY.size:
            raise ProtocolError(f"{kind.name}: payload too short")
        start, count, granule = DIGEST_BODY.unpack_from(body)
        if granule == 0 or count == 0:
            raise ProtocolError(f"{kind.name}: count {count} granule {granule}")
        if kind is MsgType.DIGEST_REQUEST:
            if n != DIGEST_BODY.size:
                raise ProtocolError(f"DIGEST_REQUEST: payload of {n} bytes")
            return DigestRequest(start, count, granule)
        entries = -(-count // granule)
        if entries > MAX_DIGESTS or n != DIGEST_BODY.size + 8 * entries:
            raise ProtocolError(f"DIGEST: {n} bytes for {entries} digests")
        return Digest(start, count, granule, body[DIGEST_BODY.size :])
    if n:
        raise ProtocolError(f"{kind.name}: unexpected payload of {n} bytes")
    return Done() if kind is MsgType.DONE else Bye()


# -- connection state machine ----------------------------------------------------------


class State(enum.Enum):
    START = "start"  # nothing exchanged
    HELLO_SENT = "hello-sent"  # destination: waiting for the source's HELLO
    HELLO_RECEIVED = "hello-received"  # source: must answer with HELLO
    READY = "ready"
    DONE = "done"  # DONE was sent (destination) or received (source)
    CLOSED = "closed"  # BYE exchanged in this direction, or EOF


_SOURCE_SENDS: Final = (Hello, VcpuState, Pages, Error, Done, Bye, Digest)
_DEST_SENDS: Final = (Hello, Request, Done, Bye, DigestRequest)


class Connection:
    """One side of one channel.

    The destination speaks first (HELLO naming the channel), the source answers
    HELLO with the guest's geometry; then the destination sends REQUEST, DONE
    and BYE, the source VCPU_STATE, PAGES, ERROR, DONE (bulk: background push
    complete) and BYE. Each side's sending and receiving states are tracked
    separately; an event in the wrong state raises :class:`ProtocolError`.
    """

    def __init__(
        self, role: Role, channel: Channel | None = None, *, zero_copy_pages: bool = False
    ) -> None:
        # a source may leave ``channel`` None: the destination's HELLO names it
        self.role = role
        self.channel = channel
        self.state = State.START
        self.peer_closed = False
        self.hello: Hello | None = None  # the source's HELLO (geometry)
        self.peer_hello: Hello | None = None
        self.page_size = 0
        self.nr_pages = 0
        self.decoder = Decoder(zero_copy_pages=zero_copy_pages)

    # sending ----------------------------------------------------------------
    def send_pages(self, start: int, count: int, flags: int, data: Buffer) -> list[Buffer]:
        """``send(Pages(...))`` without building the event: the source's hot path."""
        if self.role is not Role.SOURCE or self.state not in (State.READY, State.DONE):
            return self.send(Pages(start, count, flags, data))
        if count <= 0 or start < 0 or start + count > self.nr_pages:
            self._check_range(start, count, "PAGES")
        n = len(data) if isinstance(data, (bytes, bytearray)) else data.nbytes
        if n != count * self.page_size:
            raise ProtocolError(f"PAGES: {n} data bytes for {count} pages of {self.page_size}")
        if flags & ~PAGES_DEMAND:
            raise ProtocolError(f"PAGES: unknown flags {flags:#x}")
        return [
            PAGES_HEAD.pack(MsgType.PAGES, 0, 0, PAGES_BODY.size + n, start, count, flags),
            data,
        ]

    def send_request(self, ranges: Sequence[tuple[int, int]]) -> list[Buffer]:
        """``send(Request(...))`` without building the event: the destination's hot path."""
        if self.role is not Role.DESTINATION or self.state is not State.READY or len(ranges) != 1:
            return self.send(Request(tuple(ranges)))
        ((s, c),) = ranges
        if c <= 0:
            raise ProtocolError(f"REQUEST: empty range at page {s}")
        return [_ONE_RANGE.pack(MsgType.REQUEST, 0, 0, REQUEST_BODY.size + RANGE.size, 1, s, c)]

    def send(self, ev: Event) -> list[Buffer]:
        allowed = _SOURCE_SENDS if self.role is Role.SOURCE else _DEST_SENDS
        if not isinstance(ev, allowed):
            raise ProtocolError(f"{self.role.value} cannot send {type(ev).__name__}")
        st = self.state
        if st is State.CLOSED:
            raise ProtocolError(f"send {type(ev).__name__} after BYE")
        if isinstance(ev, Hello):
            self._send_hello(ev)
        elif isinstance(ev, Bye):
            self.state = State.CLOSED
        elif isinstance(ev, Error):
            pass  # the source may refuse at any point, even instead of its HELLO
        elif not (st is State.READY or (st is State.DONE and self.role is Role.SOURCE)):
            # the source may still answer after the destination's DONE (races
            # between channels); the destination says nothing after DONE but BYE
            raise ProtocolError(f"send {type(ev).__name__} in state {st.value}")
        if isinstance(ev, Pages):
            self._check_range(ev.start, ev.count, "PAGES")
        elif isinstance(ev, Request):
            for s, c in ev.ranges:
                if c <= 0:
                    raise ProtocolError(f"REQUEST: empty range at page {s}")
        elif isinstance(ev, DigestRequest):
            if ev.count <= 0 or ev.granule <= 0 or ev.entries > MAX_DIGESTS:
                raise ProtocolError(
                    f"DIGEST_REQUEST: {ev.count} pages by {ev.granule} (at most {MAX_DIGESTS} digests)"
                )
        elif isinstance(ev, Digest):
            entries = -(-ev.count // ev.granule) if ev.granule > 0 else 0
            if not entries or len(ev.digests) != 8 * entries:
                raise ProtocolError(f"DIGEST: {len(ev.digests)} bytes for {entries} digests")
        elif isinstance(ev, Done) and self.role is Role.DESTINATION:
            self.state = State.DONE
        return encode(ev, self.page_size)

    def _send_hello(self, ev: Hello) -> None:
        if self.role is Role.SOURCE and self.state is not State.HELLO_RECEIVED:
            raise ProtocolError(f"source HELLO in state {self.state.value}")
        if ev.channel is not self.channel:
            raise ProtocolError(f"HELLO for {ev.channel.name} on the {_name(self.channel)} channel")
        if self.role is Role.DESTINATION:
            if self.state is not State.START:
                raise ProtocolError("HELLO sent twice")
            self.state = State.HELLO_SENT
        else:
            if self.state is not State.HELLO_RECEIVED:
                raise ProtocolError(f"source HELLO in state {self.state.value}")
            if ev.page_size not in PAGE_SIZES or ev.guest_size % ev.page_size:
                raise ProtocolError(f"HELLO: bad geometry {ev.guest_size}/{ev.page_size}")
            self._learn(ev)
            self.state = State.READY

    def _learn(self, ev: Hello) -> None:
        self.hello = ev
        self.page_size = ev.page_size
        self.nr_pages = ev.nr_pages
        self.decoder.page_size = ev.page_size

    def _check_range(self, start: int, count: int, what: str) -> None:
        if count <= 0 or start < 0 or start + count > self.nr_pages:
            raise ProtocolError(
                f"{what}: pages [{start}, {start + count}) outside guest memory "
                f"({self.nr_pages} pages)"
            )

    # receiving --------------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        """Feed received bytes; ``b""`` means EOF."""
        if data:
            self.decoder.feed(data)
        else:
            self.decoder.feed_eof()

    def next_event(self) -> Event | NeedData:
        if self.peer_closed:
            raise ProtocolError("event after the peer's BYE")
        ev = self.decoder.next_event()
        if ev is NEED_DATA:
            if self.decoder.trailing_data:
                raise ProtocolError("connection closed inside a frame")
            return ev
        assert not isinstance(ev, NeedData)
        self._on_receive(ev)
        return ev

    def _on_receive(self, ev: Event) -> None:
        t = type(ev)
        if self.state is State.READY:  # the hot paths first
            if t is Pages and self.role is Role.DESTINATION:
                assert isinstance(ev, Pages)
                if ev.start + ev.count > self.nr_pages:
                    self._check_range(ev.start, ev.count, "PAGES")
                return
            if t is Request and self.role is Role.SOURCE:
                return
        peer_sends = _DEST_SENDS if self.role is Role.SOURCE else _SOURCE_SENDS
        if not isinstance(ev, peer_sends):
            raise ProtocolError(f"{self.role.value} received {type(ev).__name__} from its peer")
        if isinstance(ev, Bye):
            self.peer_closed = True
            return
        if isinstance(ev, Error):
            return  # an error may come at any time
        if isinstance(ev, Hello):
            if self.channel is None and self.role is Role.SOURCE:
                self.channel = ev.channel
            if ev.channel is not self.channel:
                raise ProtocolError(
                    f"HELLO for {ev.channel.name} on the {_name(self.channel)} channel"
                )
            if self.peer_hello is not None:
                raise ProtocolError("HELLO received twice")
            self.peer_hello = ev
            if self.role is Role.SOURCE:
                self.state = State.HELLO_RECEIVED
            else:
                if self.state is not State.HELLO_SENT:
                    raise ProtocolError("source HELLO before ours")
                if ev.page_size not in PAGE_SIZES:
                    raise ProtocolError(f"HELLO: page size {ev.page_size} unusable")
                self._learn(ev)
                self.state = State.READY
            return
        if self.peer_hello is None or (self.role is Role.DESTINATION and self.state is State.START):
            raise ProtocolError(f"{type(ev).__name__} before HELLO")
        if self.role is Role.SOURCE:
            if self.state is State.HELLO_RECEIVED:
                raise ProtocolError(f"{type(ev).__name__} before the source answered HELLO")
            if self.state is State.DONE:
                raise ProtocolError(f"{type(ev).__name__} after DONE")
            if isinstance(ev, Done):
                self.state = State.DONE
            # REQUEST ranges are *not* checked here: an out-of-range request is
            # a runtime error answered with ERROR, not a protocol violation.
        elif isinstance(ev, Pages):
            self._check_range(ev.start, ev.count, "PAGES")


def _name(ch: Channel | None) -> str:
    return ch.name if ch is not None else "unnamed"


def request_bounds_error(ranges: Sequence[tuple[int, int]], nr_pages: int) -> Error | None:
    """The ERROR a source answers for the first range outside guest memory, if any."""
    for s, c in ranges:
        if c == 0 or s >= nr_pages or c > nr_pages - s:
            return Error(
                errno.EFAULT,
                f"REQUEST: pages [{s}, {s + c}) outside guest memory ({nr_pages} pages)",
                s,
                c,
            )
    return None
