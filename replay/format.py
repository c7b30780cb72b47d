"""The on-disk trace format: `TraceWriter`, `open_trace` / `TraceReader`, `TraceError`.

Byte layout (all integers little-endian; full description in ``docs/trace-format.md``)::

    file head   20 B   magic b"FKVMTRC\\0", u16 format_version, u16 compat_version,
                       u32 header_len, u32 crc32(head[0:16] + header)
    header      header_len B   msgpack of `replay.events.Header`
    chunk*      frame 20 B     b"CK", u8 kind (0 events, 1 end, 2 kernel events: after
                               the end chunk), u8 flags (bit 0: zlib),
                               u32 count, u32 payload_len, u32 crc32(payload),
                               u32 crc32(frame[0:16])
                payload        msgpack (zlib-compressed when flags bit 0) of a columnar chunk

A chunk's payload is ``[kinds, calls, faults, contents]``, each events section a map from field
name to a column: `replay.codec` (chunks) and `replay.columns` (columns) encode and decode it.
The end chunk's count is the number of events in the trace.

Writing goes to ``PATH.incomplete``; each full chunk is written with one ``write`` (so a
process killed with SIGKILL leaves whole chunks plus at most one cut-short chunk), and
`TraceWriter.close` writes the end chunk and renames the file to ``PATH``. Reading is streaming:
one chunk in memory at a time. A missing end marker or a cut-short last chunk stops the
iteration quietly (``stopped_at`` says where) unless ``strict=True``; everything else that is
wrong (magic, version, checksums, undecodable bytes) raises `TraceError` naming the byte offset.

Public API (other modules build on these names): `TraceWriter`, `TraceReader`, `open_trace`,
`TraceError`, `FORMAT_VERSION`, `COMPAT_VERSION`, `MAGIC`; `encode_chunk`, `decode_chunk`,
`decode_columns`, ... are re-exported from `replay.codec`.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar

import msgspec

from replay.codec import (
    ChunkColumns,
    compress_payload,
    decode_chunk,
    decode_chunk_faults,
    decode_columns,
    decode_fault_columns,
    encode_chunk,
)
from replay.codec import decode_any as _dec_any
from replay.columns import Column
from replay.events import COMPAT_VERSION, FORMAT_VERSION, Event, Fault, Header, KernelEvent

__all__ = [
    "CHUNK_FRAME",
    "COMPAT_VERSION",
    "FORMAT_VERSION",
    "MAGIC",
    "ChunkColumns",
    "TraceError",
    "TraceReader",
    "TraceWriter",
    "compress_payload",
    "decode_chunk",
    "decode_chunk_faults",
    "decode_columns",
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
#: kernel tracepoint events, after the end chunk (`replay.kevents`)
CHUNK_KEVENTS = 2
FLAG_ZLIB = 1
ZLIB_LEVEL = 6  #: a closed trace's chunks: 12 % smaller than level 1 on real traces
#: while recording (the thread that fills a chunk compresses it, often a fault path):
#: 0.55 us an event at level 1 against 1.8 us at level 6; `TraceWriter.close` recompresses
RECORD_LEVEL = 1
#: a chunk bigger than this is corruption, not data (the frame CRC makes it unlikely anyway)
MAX_PAYLOAD = 1 << 30
INCOMPLETE = ".incomplete"

class TraceError(ValueError):
    """A trace that cannot be read: ``.offset`` is the byte where the problem is."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


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
            if self.level == ZLIB_LEVEL:
                z = compress_payload(payload, ZLIB_LEVEL)
            else:
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

    def discard(self) -> None:
        """Give the trace up: close and remove ``PATH.incomplete`` (nothing is renamed)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._f.close()
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass

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
                    z = compress_payload(zlib.decompress(payload), ZLIB_LEVEL)
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


def _decode_columns(payload: bytes) -> tuple[ChunkColumns, int]:
    cols = decode_columns(payload)
    return cols, len(cols.kinds)


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
        # the file head's versions are the file's: the header leaves out a field at its
        # default, and the default is this reader's version, not the writer's
        header.format_version, header.compat_version = fmt, compat
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

    def columns(self) -> Iterator[ChunkColumns]:
        """Per chunk, every field of every event as columns (`replay.codec.decode_columns`):
        the fast full decode, for readers that work on columns (stats, diffs, benchmarks)."""
        return self._chunks(_decode_columns)

    def fault_columns(self) -> Iterator[dict[str, Column]]:
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
            if plen > MAX_PAYLOAD or kind not in (CHUNK_EVENTS, CHUNK_END, CHUNK_KEVENTS):
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
            if kind == CHUNK_KEVENTS:  # kernel events are read by `kevents`, not here
                off = pstart + plen
                index += 1
                continue
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

    def kevents(self) -> Iterator[KernelEvent]:
        """The kernel tracepoint events ``capture --kvm-trace`` appended (`replay.kevents`),
        in time order; read through a file handle of their own (merge them lazily)."""
        from replay.kevents import read_kevents

        return read_kevents(self.path, self.data_offset)

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
