"""``fakekvm trace upgrade``: rewrite a trace in the current format version.

A reader reads every older version (`replay.format`), so upgrading is never needed to read a
trace; it makes old recordings smaller and faster to decode (format 2: byte-string and table
columns, plane-aware deflate blocks). The events are read and written again unchanged, the
header too but for its two version fields; a cut-off recording stays cut off (its events are
kept and the result is marked complete only if the input was). The output is written as
``OUT.incomplete`` and renamed when whole, so a failed upgrade never leaves half a file under
the trace's name, and upgrading in place (``OUT`` == ``TRACE``) replaces it only then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgspec

from replay.events import COMPAT_VERSION, FORMAT_VERSION
from replay.format import TraceWriter, open_trace


@dataclass
class Upgraded:
    path: str
    old_version: int
    events: int
    old_bytes: int
    new_bytes: int


def upgrade(path: str, out: str | None = None) -> Upgraded:
    """Rewrite ``path`` at the current `FORMAT_VERSION` into ``out`` (default: in place).

    A cut-off recording is not upgraded (`ValueError` saying where it stops): read it as it is.
    """
    out = out or path
    tmp = out + ".upgrading"
    with open_trace(path) as r:
        old_bytes = os.path.getsize(r.path)  # (``PATH.incomplete`` when only that exists)
        old_version = r.header.format_version
        header = msgspec.structs.replace(
            r.header, format_version=FORMAT_VERSION, compat_version=COMPAT_VERSION
        )
        w = TraceWriter(tmp, header)
        events = 0
        try:
            for chunk in r.chunks():
                w.extend(chunk)
                events += len(chunk)
            if not r.complete:
                raise ValueError(f"{path}: {r.stopped_at}; a cut-off recording is not upgraded")
            w.close()
        except BaseException:
            w.discard()
            raise
    os.replace(tmp, out)
    return Upgraded(out, old_version, events, old_bytes, os.path.getsize(out))
