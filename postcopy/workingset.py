"""A previous run's working set, read from a trace, as the source's push order.

REAP (Ustiugov et al., "Benchmarking, Analysis, and Optimization of Serverless
Function Snapshots", ASPLOS'21) records the pages a function touched in one run
and prefetches exactly those first in the next: 97 % fewer faults. Here the
record is a fakekvm trace (:mod:`replay.format`, ``fakekvm capture``): its
:class:`replay.events.Fault` records carry the guest-physical address of every
access that waited for the engine. :func:`fault_pages` turns them into page
numbers in the order the faults were *observed* (``observed_ns``, then ``seq``;
the recorder appends a fault when it is resolved), each page once, ready for
:class:`postcopy.schedule.SendScheduler` with ``policy="trace"``.

Host accesses whose guest address is unknown (``gpa == -1``) are skipped.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable
from typing import Any


def order_pages(faults: Iterable[tuple[int, int, int]], page_size: int = 4096) -> array[int]:
    """``(observed_ns, seq, gpa)`` triples -> page numbers, first observation first,
    each page once."""
    out = array("Q")
    seen: dict[int, None] = {}  # the faulting pages only: thousands, not the guest's pages
    for _, _, gpa in sorted(faults):
        if gpa < 0:
            continue
        page = gpa // page_size
        if page not in seen:
            seen[page] = None
            out.append(page)
    return out


def fault_pages(path: str | os.PathLike[str], page_size: int = 4096) -> array[int]:
    """The pages of a trace's faults, in observation order (see the module docstring)."""
    from replay.events import Fault
    from replay.format import open_trace

    reader: Any = open_trace(path)
    try:
        faults = [(ev.observed_ns, ev.seq, ev.gpa) for ev in reader if isinstance(ev, Fault)]
    finally:
        reader.close()
    return order_pages(faults, page_size)
