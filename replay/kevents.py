"""Kernel tracepoint events stored in the trace itself: chunks of kind 2 after the end chunk.

``fakekvm capture --kvm-trace`` reads the kernel's kvm tracepoints while the command runs
(`replay.tracefs`); once the recording is closed it appends them to the trace with
`append_kevents` as *trailer* chunks (frame kind 2, ``count`` = the events in the chunk; the
payload, zlib-compressed when flags bit 0, is a msgpack array of `replay.events.KernelEvent`).
Appending never rewrites what was recorded: the events chunks and the end chunk stay byte for
byte; a crash while appending leaves a trace that reads as before, plus the whole kevents
chunks written. Readers of the events stream stop at the end chunk and never see these;
`read_kevents` (``TraceReader.kevents``) reads them, with the same checksums, through its own
file handle so it can be merged lazily with the events (`replay.tracefs_merge.merge`).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import msgspec

from replay.events import KernelEvent
from replay.format import (
    CHUNK_END,
    CHUNK_FRAME,
    CHUNK_KEVENTS,
    FLAG_ZLIB,
    FRAME_MAGIC,
    MAX_PAYLOAD,
    TraceError,
    open_trace,
)

__all__ = ["append_kevents", "read_kevents"]

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(list[KernelEvent])
#: kernel events a chunk
KEVENTS_CHUNK = 4096


def _frames(f: BinaryIO, path: str, start: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(offset, kind, flags, count, payload_len, payload_crc) of each whole chunk frame from
    ``start``; stops at the end of the file or at a cut-short frame or payload."""
    size = os.fstat(f.fileno()).st_size
    off = start
    while off + CHUNK_FRAME.size <= size:
        f.seek(off)
        frame = f.read(CHUNK_FRAME.size)
        magic, kind, flags, count, plen, pcrc, fcrc = CHUNK_FRAME.unpack(frame)
        if magic != FRAME_MAGIC or zlib.crc32(frame[:16]) != fcrc or plen > MAX_PAYLOAD:
            raise TraceError(f"{path}: chunk frame at byte {off}: bad magic or checksum", off)
        if off + CHUNK_FRAME.size + plen > size:
            return
        yield off, kind, flags, count, plen, pcrc
        off += CHUNK_FRAME.size + plen


def append_kevents(path: str | os.PathLike[str], kevents: Iterable[KernelEvent]) -> int:
    """Append ``kevents`` (sorted by ``t_ns``) to the closed trace ``path`` as kevents chunks;
    returns how many. Raises `TraceError` for a damaged file and ValueError for a trace with no
    end chunk (a recording still open or cut off: its events are not known to be whole)."""
    p = os.fspath(path)
    with open_trace(p) as r:
        data_offset = r.data_offset
    with open(p, "r+b") as f:
        end = None
        for off, kind, _flags, _count, plen, _pcrc in _frames(f, p, data_offset):
            if kind == CHUNK_END or (end is not None and kind == CHUNK_KEVENTS):
                end = off + CHUNK_FRAME.size + plen
        if end is None:
            raise ValueError(f"{p}: no end chunk: kernel events go only after a closed trace")
        f.seek(end)
        f.truncate()  # (a kevents chunk cut short by an earlier crash)
        n = 0
        batch: list[KernelEvent] = []
        for ev in kevents:
            batch.append(ev)
            if len(batch) >= KEVENTS_CHUNK:
                n += _write_chunk(f, batch)
                batch = []
        if batch:
            n += _write_chunk(f, batch)
        f.flush()
        os.fsync(f.fileno())
    return n


def _write_chunk(f: BinaryIO, batch: list[KernelEvent]) -> int:
    raw = _enc.encode(batch)
    z = zlib.compress(raw, 6)
    payload, flags = (z, FLAG_ZLIB) if len(z) < len(raw) else (raw, 0)
    head = CHUNK_FRAME.pack(FRAME_MAGIC, CHUNK_KEVENTS, flags, len(batch), len(payload),
                            zlib.crc32(payload), 0)[:16]  # fmt: skip
    f.write(head + zlib.crc32(head).to_bytes(4, "little") + payload)
    return len(batch)


def read_kevents(path: str | os.PathLike[str], data_offset: int) -> Iterator[KernelEvent]:
    """The kernel events of the trace at ``path`` (chunks after ``data_offset``), in order."""
    p = os.fspath(path)
    with open(p, "rb") as f:
        for off, kind, flags, count, plen, pcrc in list(_frames(f, p, data_offset)):
            if kind != CHUNK_KEVENTS:
                continue
            pstart = off + CHUNK_FRAME.size
            f.seek(pstart)
            payload = f.read(plen)
            if zlib.crc32(payload) != pcrc:
                raise TraceError(
                    f"{p}: kevents chunk at byte {off}: payload checksum mismatch", pstart
                )
            try:
                evs = _dec.decode(zlib.decompress(payload) if flags & FLAG_ZLIB else payload)
            except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as e:
                raise TraceError(
                    f"{p}: kevents chunk at byte {off}: undecodable: {e}", pstart
                ) from None
            if len(evs) != count:
                raise TraceError(
                    f"{p}: kevents chunk at byte {off}: {len(evs)} events, frame says {count}", off
                )
            yield from evs
