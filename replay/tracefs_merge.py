"""Kernel events joined to a recorded stream, and kept in a side file next to a trace.

`merge` interleaves time-ordered `KernelEvent` records (from a `replay.tracefs_session`) into
a recorded stream of `Call`/`Fault`/`Contents`; `save_kevents`/`load_kevents` write and read
the side file ``FILE.kevents``, where captures put them before format 2 and where `capture`
still puts them when its trace did not close whole (otherwise they go into the trace itself:
`replay.kevents`). Part of `replay.tracefs`, which re-exports every public name here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator

import msgspec

from replay.events import Call, Contents, Fault, KernelEvent

__all__ = ["KEVENTS_MAGIC", "load_kevents", "merge", "save_kevents"]

# -- joining a recorded stream --------------------------------------------------------------------


def _key(ev: Call | Fault | Contents) -> int | None:
    if isinstance(ev, Call):
        return ev.t_ns
    if isinstance(ev, Fault):
        return ev.observed_ns
    return None  # Contents: stays right after the call it belongs to


def merge(
    events: Iterable[Call | Fault | Contents], kevents: Iterable[KernelEvent]
) -> Iterator[Call | Fault | Contents | KernelEvent]:
    """Interleave time-ordered kernel events into a recorded stream, keeping its order.

    Each recorded event's time is ``Call.t_ns`` (when the call was entered) or
    ``Fault.observed_ns``, made non-decreasing along the stream (the recorder writes calls in
    completion order); a `KernelEvent` goes just before the first recorded event whose time is
    later than its own, so what the kernel did inside a call follows that call's record. Lazy on
    both sides (bounded memory); ``kevents`` must be sorted by ``t_ns`` (as a session gives them).
    """
    kit = iter(kevents)
    pending = next(kit, None)
    high = -(1 << 63)
    for ev in events:
        k = _key(ev)
        if k is not None:
            high = max(high, k)
            while pending is not None and pending.t_ns < high:
                yield pending
                pending = next(kit, None)
        yield ev
    if pending is not None:
        yield pending
        yield from kit


# -- a side file for the kernel events of a capture ------------------------------------------------

KEVENTS_MAGIC = b"FKVMKEV1"
_LEN = struct.Struct("<I")


def save_kevents(path: str | os.PathLike[str], kevents: Iterable[KernelEvent]) -> int:
    """Write kernel events next to a trace (``FILE.kevents``: magic, then length-prefixed
    msgpack `KernelEvent` records); return how many. The trace chunks do not hold them yet."""
    enc = msgspec.msgpack.Encoder()
    n = 0
    with open(path, "wb") as f:
        f.write(KEVENTS_MAGIC)
        for ev in kevents:
            b = enc.encode(ev)
            f.write(_LEN.pack(len(b)) + b)
            n += 1
    return n


def load_kevents(path: str | os.PathLike[str]) -> Iterator[KernelEvent]:
    """Read a `save_kevents` file as a stream; a record cut short raises ValueError naming
    its byte offset."""
    dec = msgspec.msgpack.Decoder(KernelEvent)
    with open(path, "rb") as f:
        if f.read(len(KEVENTS_MAGIC)) != KEVENTS_MAGIC:
            raise ValueError(f"{path}: offset 0: not a fakekvm kernel-event file")
        off = len(KEVENTS_MAGIC)
        while head := f.read(4):
            want = _LEN.unpack(head)[0] if len(head) == 4 else -1
            body = f.read(want) if want >= 0 else b""
            if len(body) != want:
                raise ValueError(f"{path}: offset {off}: record cut short")
            try:
                yield dec.decode(body)
            except msgspec.DecodeError as e:
                raise ValueError(f"{path}: offset {off}: {e}") from None
            off += 4 + len(body)
