"""`TracefsSession`: a private tracefs instance tracing this process's kvm events.

An instance (``instances/NAME``, Documentation/trace/ftrace.rst §"Instances") is a private
ring buffer, so a capture never touches the global buffer or other users' instances. Its
``trace_clock`` is set to ``mono`` (``ktime_get_mono_fast_ns``: CLOCK_MONOTONIC, the clock of
``time.monotonic_ns()`` and so of the recorder's ``t_ns``), events are limited to this
process's threads with ``set_event_pid`` (and ``options/event-fork`` for threads started
later), ``options/overwrite`` is 0 so a full buffer drops new events (counted) rather than
silently eating old ones. Pages are parsed by `replay.tracefs_ring` and records decoded by
`replay.tracefs_format`; finding tracefs and the privilege it needs: `replay.tracefs_access`.
Part of `replay.tracefs`, which re-exports every public name here.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import re
import threading
from collections.abc import Iterator, Sequence

from replay.events import KernelEvent
from replay.tracefs_access import (
    DEFAULT_EVENTS,
    INSTANCE_PREFIX,
    TracefsError,
    find_tracefs,
    tracefs_status,
)
from replay.tracefs_format import Decoder, parse_format
from replay.tracefs_ring import DEFAULT_LAYOUT, parse_header_page, parse_page

__all__ = ["TracefsSession"]

_instance_counter = itertools.count()


class TracefsSession:
    """A private tracefs instance tracing kvm events of this process's threads.

    ``with TracefsSession() as s: ...run...`` then ``s.events`` (time-ordered `KernelEvent`), or
    ``start()``/``stop()``. ``stop`` (also on every exit path of the ``with``) stops tracing,
    reads every page, disables the events and removes the instance. ``drain()`` empties the
    buffers while tracing (or ``drain_interval`` > 0 does it from a thread), for runs that would
    overflow ``buffer_size_kb`` per CPU; ``lost`` counts what the kernel dropped anyway.
    """

    def __init__(
        self,
        events: Sequence[str] = DEFAULT_EVENTS,
        instance: str | None = None,
        *,
        root: str | None = None,
        buffer_size_kb: int = 4096,
        pids: Sequence[int] | None = None,
        follow_forks: bool = True,
        clock: str = "mono",
        strict: bool = False,
        drain_interval: float = 0.0,
        subbuf_size_kb: int | None = None,
    ) -> None:
        self.requested = tuple(events)
        self.name = instance or f"{INSTANCE_PREFIX}{os.getpid()}-{next(_instance_counter)}"
        self._root = root
        self.buffer_size_kb = buffer_size_kb
        self.pids = pids  #: None: every thread of this process
        self.follow_forks = follow_forks
        self.clock = clock
        self.strict = strict
        self.drain_interval = drain_interval
        self.subbuf_size_kb = subbuf_size_kb  #: ring-buffer page size (None: the kernel's)
        self.path = ""
        self.layout = DEFAULT_LAYOUT
        self.decoder = Decoder(())
        self.enabled: list[str] = []  #: "system:event" actually traced
        self.skipped: dict[str, str] = {}  #: requested but not traced -> why
        self.lost = 0  #: events the kernel dropped (per_cpu stats: overrun + dropped events)
        self.pid_filtered = False
        #: what the pages said went wrong (lost events, a page cut short), for the report
        self.notes: list[str] = []
        self._pages: dict[int, list[bytes]] = {}
        self._events: list[KernelEvent] | None = None
        self._lock = threading.Lock()
        self._stop_drain = threading.Event()
        self._drainer: threading.Thread | None = None
        self.started = False

    # -- files
    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def _write(self, rel: str, value: str) -> None:
        try:
            with open(self._p(rel), "w", encoding="ascii") as f:
                f.write(value)
        except OSError as e:
            raise TracefsError(
                e.errno or errno.EIO,
                f"tracefs: writing {value!r} to {self._p(rel)}: "
                f"{os.strerror(e.errno or errno.EIO)}",
            ) from None

    def _read(self, rel: str) -> str:
        with open(self._p(rel), encoding="utf-8", errors="replace") as f:
            return f.read()

    # -- life cycle
    def start(self) -> TracefsSession:
        if self.started:
            raise TracefsError(errno.EBUSY, f"tracefs session {self.name} already started")
        root = self._root or find_tracefs()
        if root is None:
            raise TracefsError(errno.ENOENT, tracefs_status(self.requested)[1])
        path = os.path.join(root, "instances", self.name)
        try:
            os.mkdir(path)
        except OSError as e:
            why = os.strerror(e.errno or errno.EIO)
            hint = (
                tracefs_status(self.requested)[1] if e.errno in (errno.EACCES, errno.EPERM) else ""
            )
            raise TracefsError(
                e.errno or errno.EIO,
                f"tracefs: creating instance {path}: {why}" + (f" ({hint})" if hint else ""),
            ) from None
        self.path = path
        self.started = True
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def _setup(self) -> None:
        if self.subbuf_size_kb is not None:  # before header_page, which follows it
            self._write("buffer_subbuf_size_kb", str(self.subbuf_size_kb))
        header = self._p("events", "header_page")
        if os.path.exists(header):
            self.layout = parse_header_page(self._read("events/header_page"))
        self._write("tracing_on", "0")
        self._write("trace_clock", self.clock)
        self._write("buffer_size_kb", str(self.buffer_size_kb))
        if os.path.exists(self._p("options", "overwrite")):
            self._write("options/overwrite", "0")
        if os.path.exists(self._p("set_event_pid")):
            tids = self.pids if self.pids is not None else _threads(os.getpid())
            self._write("set_event_pid", " ".join(str(t) for t in tids))
            if self.follow_forks and os.path.exists(self._p("options", "event-fork")):
                self._write("options/event-fork", "1")
            self.pid_filtered = True
        formats = []
        for ev in self.requested:
            system, _, name = ev.partition(":")
            d = self._p("events", system, name)
            if not name or not os.path.isdir(d):
                self.skipped[ev] = "no such event on this kernel"
                continue
            try:
                fmt = parse_format(self._read(f"events/{system}/{name}/format"), system)
            except (OSError, ValueError) as e:
                self.skipped[ev] = f"format unreadable: {e}"
                continue
            formats.append(fmt)
        if self.strict and self.skipped:
            raise TracefsError(errno.ENOENT, f"tracefs: events not available: {self.skipped}")
        if not formats:
            raise TracefsError(
                errno.ENOENT, f"tracefs: none of the events exists: {sorted(self.skipped)}"
            )
        for fmt in formats:
            self._write(f"events/{fmt.system}/{fmt.name}/enable", "1")
            self.enabled.append(fmt.full_name)
        self.decoder = Decoder(formats)
        self._pages = {cpu: [] for cpu in self._cpus()}
        self._write("tracing_on", "1")
        if self.drain_interval > 0:
            self._drainer = threading.Thread(
                target=self._drain_loop, name="tracefs-drain", daemon=True
            )
            self._drainer.start()

    def _cpus(self) -> list[int]:
        names = os.listdir(self._p("per_cpu"))
        return sorted(int(n[3:]) for n in names if n.startswith("cpu") and n[3:].isdigit())

    def _drain_loop(self) -> None:
        while not self._stop_drain.wait(self.drain_interval):
            try:
                self.drain()
            except OSError:
                return

    def drain(self) -> int:
        """Move what the kernel's buffers hold (whole pages, and the events of the page being
        written) into this session; return how many pages were read."""
        got = 0
        with self._lock:
            for cpu, pages in self._pages.items():
                fd = os.open(
                    self._p("per_cpu", f"cpu{cpu}", "trace_pipe_raw"), os.O_RDONLY | os.O_NONBLOCK
                )
                try:
                    while True:
                        try:
                            data = os.read(fd, self.layout.page_size)
                        except BlockingIOError:
                            break
                        if not data:
                            break
                        pages.append(data)
                        got += 1
                finally:
                    os.close(fd)
        return got

    def stop(self) -> list[KernelEvent]:
        """Stop tracing, read everything, remove the instance; the events, in time order."""
        if self._events is not None:
            return self._events
        if not self.started:
            raise TracefsError(errno.EINVAL, f"tracefs session {self.name} was never started")
        try:
            self._write("tracing_on", "0")
            self._stop_drainer()
            self.drain()
            self.lost = self._lost()
        finally:
            self._teardown()
        streams = [self._decode_cpu(cpu, pages) for cpu, pages in self._pages.items()]
        self._pages = {}
        self._events = list(heapq.merge(*streams, key=lambda e: e.t_ns))
        return self._events

    def _decode_cpu(self, cpu: int, pages: list[bytes]) -> list[KernelEvent]:
        out: list[KernelEvent] = []
        decode = self.decoder.decode
        for i, raw in enumerate(pages):
            page = parse_page(raw, self.layout)
            if page.missed:
                self.notes.append(
                    f"cpu{cpu} page {i}: events lost before it"
                    + (f" ({page.missed})" if page.missed > 0 else "")
                )
            if page.stopped:
                self.notes.append(f"cpu{cpu} page {i}: {page.stopped}")
            out.extend(decode(cpu, t, payload) for t, payload in page.records)
        return out

    def _stop_drainer(self) -> None:
        self._stop_drain.set()
        if self._drainer is not None:
            self._drainer.join()
            self._drainer = None

    def _lost(self) -> int:
        total = 0
        for cpu in self._pages:
            try:
                text = self._read(f"per_cpu/cpu{cpu}/stats")
            except OSError:
                continue
            for key in ("overrun", "dropped events"):
                m = re.search(rf"^{key}:\s*(\d+)", text, re.M)
                if m:
                    total += int(m[1])
        return total

    def _teardown(self) -> None:
        """Disable everything and remove the instance; every step tried, first error raised."""
        if not self.path:
            return
        self._stop_drainer()
        first: OSError | None = None
        for rel, value in (("tracing_on", "0"), ("events/enable", "0"), ("set_event_pid", "")):
            try:
                if os.path.exists(self._p(rel)):
                    self._write(rel, value)
            except OSError as e:
                first = first or e
        try:
            os.rmdir(self.path)
        except OSError as e:
            first = first or TracefsError(
                e.errno or errno.EIO,
                f"tracefs: removing instance {self.path}: {os.strerror(e.errno or 0)}",
            )
        else:
            self.path = ""
        if first is not None:
            raise first

    @property
    def events(self) -> list[KernelEvent]:
        if self._events is None:
            raise TracefsError(errno.EINVAL, "tracefs session not stopped yet")
        return self._events

    def __iter__(self) -> Iterator[KernelEvent]:
        return iter(self.events)

    def __enter__(self) -> TracefsSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.started and self._events is None:
            if exc[0] is None:
                self.stop()
            else:  # keep the original exception; still remove the instance
                try:
                    self.stop()
                except OSError:
                    pass


def _threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return [pid]
