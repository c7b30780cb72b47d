"""tracefs ring-buffer pages: one page of ``per_cpu/cpuN/trace_pipe_raw``, parsed.

Follows Documentation/trace/ring-buffer-design.rst, include/linux/ring_buffer.h
``enum ring_buffer_type``, kernel/trace/ring_buffer.c ``rb_event_length``/
``rb_update_read_stamp``/``rb_fix_abs_ts``/``ring_buffer_read_page`` (libtraceevent
``kbuffer-parse.c`` is the reference reader): a page header laid out as ``events/header_page``
says (u64 ``timestamp``, ``commit`` = bytes of data plus the flags ``RB_MISSED_EVENTS`` (bit
31) and ``RB_MISSED_STORED`` (bit 30, the count of lost events then follows the data)), then
records with a 32-bit header: ``type_len`` (5 bits) and ``time_delta`` (27 bits). ``type_len``
1..28: a data record of ``4*type_len`` bytes; 0: a data record whose length (+4) is in
``array[0]``; 29 ``PADDING`` (``time_delta`` 0: the rest of the page is empty; else a discarded
record of ``array[0]`` bytes); 30 ``TIME_EXTEND`` (delta = ``array[0] << 27 | time_delta``); 31
``TIME_STAMP`` (absolute time, same encoding, top 5 bits taken from the current time as
``rb_fix_abs_ts`` does). Part of `replay.tracefs`, which re-exports every public name here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from replay.tracefs_format import parse_fields

__all__ = [
    "COMMIT_MASK",
    "DEFAULT_LAYOUT",
    "RB_MISSED_EVENTS",
    "RB_MISSED_STORED",
    "TS_MSB",
    "TS_SHIFT",
    "TYPE_DATA_MAX",
    "TYPE_PADDING",
    "TYPE_TIME_EXTEND",
    "TYPE_TIME_STAMP",
    "Page",
    "PageLayout",
    "parse_header_page",
    "parse_page",
]

TYPE_DATA_MAX = 28  #: RINGBUF_TYPE_DATA_TYPE_LEN_MAX
TYPE_PADDING = 29  #: RINGBUF_TYPE_PADDING
TYPE_TIME_EXTEND = 30  #: RINGBUF_TYPE_TIME_EXTEND
TYPE_TIME_STAMP = 31  #: RINGBUF_TYPE_TIME_STAMP
TS_SHIFT = 27
RB_MISSED_EVENTS = 1 << 31
RB_MISSED_STORED = 1 << 30
COMMIT_MASK = (1 << 27) - 1  #: kbuffer-parse.c: the data size in ``commit``
TS_MSB = 0xF8 << 56  #: ring_buffer.c: the bits an absolute TIME_STAMP does not carry
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class PageLayout:
    """``events/header_page``: where a ring-buffer page keeps its time, size and data."""

    timestamp_offset: int = 0
    timestamp_size: int = 8
    commit_offset: int = 8
    commit_size: int = 8
    data_offset: int = 16
    data_size: int = 4080

    @property
    def page_size(self) -> int:
        return self.data_offset + self.data_size


DEFAULT_LAYOUT = PageLayout()


def parse_header_page(text: str) -> PageLayout:
    """Parse ``events/header_page`` (fields ``timestamp``, ``commit`` and ``data``)."""
    by_name = {f.name: f for f in parse_fields(text)}
    missing = [n for n in ("timestamp", "commit", "data") if n not in by_name]
    if missing:
        raise ValueError(f"header_page: no field {', '.join(missing)}")
    ts, commit, data = by_name["timestamp"], by_name["commit"], by_name["data"]
    for f in (ts, commit):
        if f.size not in (4, 8):
            raise ValueError(f"header_page: {f.name} has size {f.size}")
    return PageLayout(ts.offset, ts.size, commit.offset, commit.size, data.offset, data.size)


@dataclass
class Page:
    """What one ring-buffer page held."""

    timestamp: int  #: the page's base time
    records: list[tuple[int, bytes]] = field(default_factory=list)  #: (t_ns, payload)
    #: events the writer lost before this page: 0 none, -1 some (count not stored), else the count
    missed: int = 0
    #: why parsing stopped before the page's committed end (a page cut short), else None
    stopped: str | None = None


def _fix_abs_ts(abs_ts: int, cur: int) -> int:
    """ring_buffer.c ``rb_fix_abs_ts``: restore the top bits an absolute stamp lost."""
    if cur & TS_MSB:
        abs_ts |= cur & TS_MSB
        if abs_ts < cur:
            abs_ts += 1 << 59
    return abs_ts


def _stop(p: Page, why: str) -> None:
    p.stopped = f"{p.stopped}; {why}" if p.stopped else why


def parse_page(page: bytes | memoryview, layout: PageLayout = DEFAULT_LAYOUT) -> Page:
    """Parse one page of ``trace_pipe_raw``. Never raises on bad data: a page cut short or a
    record running past the end stops the parse and says where in ``Page.stopped``."""
    mv = page if isinstance(page, bytes) else bytes(page)
    n = len(mv)
    head = max(
        layout.timestamp_offset + layout.timestamp_size, layout.commit_offset + layout.commit_size
    )
    if n < head:
        return Page(0, stopped=f"page is {n} bytes, shorter than its {head}-byte header")
    ts = int.from_bytes(
        mv[layout.timestamp_offset : layout.timestamp_offset + layout.timestamp_size], "little"
    )
    commit = int.from_bytes(
        mv[layout.commit_offset : layout.commit_offset + layout.commit_size], "little"
    )
    size = commit & COMMIT_MASK
    out = Page(ts)
    pos = layout.data_offset
    end = pos + size
    if commit & RB_MISSED_EVENTS:
        out.missed = -1
        if commit & RB_MISSED_STORED and end + layout.commit_size <= n:
            out.missed = int.from_bytes(mv[end : end + layout.commit_size], "little")
    if size > layout.data_size:
        out.stopped = f"commit says {size} bytes of data, a page holds {layout.data_size}"
        end = layout.page_size
    if end > n:
        out.stopped = f"page cut short: {n} bytes, its data ends at {end}"
        end = n
    records = out.records
    unpack = _U32.unpack_from
    while pos + 4 <= end:
        (hdr,) = unpack(mv, pos)
        type_len = hdr & 0x1F
        delta = hdr >> 5
        if type_len == 0 or type_len > TYPE_DATA_MAX:
            if pos + 8 > end:
                _stop(out, f"record at offset {pos} cut short (header only)")
                break
            (arg,) = unpack(mv, pos + 4)
        if 0 < type_len <= TYPE_DATA_MAX:
            start, length = pos + 4, type_len * 4
        elif type_len == 0:
            start, length = pos + 8, (arg - 4 + 3) & ~3
            if arg < 4:
                _stop(out, f"record at offset {pos}: length word {arg} < 4")
                break
        elif type_len == TYPE_PADDING:
            if delta == 0:  # a null event: nothing more on this page
                break
            ts += delta  # a discarded record: its time still counts (kbuffer-parse.c)
            pos += 4 + arg
            continue
        elif type_len == TYPE_TIME_EXTEND:
            ts += (arg << TS_SHIFT) + delta
            pos += 8
            continue
        else:  # TYPE_TIME_STAMP
            ts = _fix_abs_ts((arg << TS_SHIFT) + delta, ts)
            pos += 8
            continue
        if start + length > end:
            _stop(out, f"record at offset {pos} runs to {start + length}, past the end at {end}")
            break
        ts += delta
        records.append((ts, bytes(mv[start : start + length])))
        pos = start + length
    return out
