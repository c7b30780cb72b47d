"""``fakekvm trace show|stats|diff|plot``: look into recorded traces.

* ``show T``: strace-style lines (:mod:`replay.show`), filters ``--tid``, ``--fd-kind``,
  ``--name``, ``--faults-only``, ``--limit``, ``-r`` (time since the previous line);
* ``stats T [--json]``: fault counts, QEMU's latency histogram, per-vCPU blocked time, calls
  per name (:mod:`replay.stats`);
* ``diff A B``: first divergence of the call sequences and the latency comparison
  (:mod:`replay.diff`); exit status 0 when the sequences are the same, 1 when they differ;
* ``plot T -o out.png``: fault timeline and latency CDF (:mod:`replay.plot`, needs matplotlib).

A trace that cannot be read (bad magic, checksum, version) prints one line naming the byte
offset and exits 2; a trace cut off by a crash is read up to its last whole chunk and the
place it stopped is said on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from replay.events import Event, Header

if TYPE_CHECKING:
    from replay.codec import ChunkColumns


def add_parser(sub: Any) -> None:
    p = sub.add_parser("trace", help="inspect recorded traces: show, stats, diff, plot, upgrade")
    tsub = p.add_subparsers(dest="trace_command", metavar="ACTION")
    tsub.required = True

    s = tsub.add_parser("show", help="strace-style listing of the calls and faults")
    s.add_argument("trace")
    s.add_argument("--tid", type=int, help="only this thread's calls and faults")
    s.add_argument("--fd-kind", help="only calls on this fd kind (kvm-vcpu:0, userfaultfd, "
                   "kvm-vcpu: for every vCPU)")  # fmt: skip
    s.add_argument("--name", help="only this ioctl name or op (KVM_RUN, read, mmap)")
    s.add_argument("--faults-only", action="store_true", help="only the faults")
    s.add_argument("--limit", type=int, help="stop after this many lines")
    s.add_argument("-r", "--relative", action="store_true",
                   help="prefix each line with the seconds since the previous one")  # fmt: skip
    s.add_argument("--no-header", action="store_true", help="no '#' preamble")
    s.add_argument("--clock", action="store_true",
                   help="also the recorded monotonic_ns/gettid calls")  # fmt: skip
    s.set_defaults(handler=run_show)

    st = tsub.add_parser("stats", help="fault counts, latency histogram, blocked time, calls")
    st.add_argument("trace")
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=run_stats)

    d = tsub.add_parser("diff", help="compare two runs: call sequence and latencies")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--context", type=int, default=5, help="calls shown before a divergence")
    d.add_argument("--json", action="store_true")
    d.add_argument("--out", action="store_true",
                   help="also compare the bytes the kernel wrote back (KVM_RUN exits, ...)")  # fmt: skip
    d.set_defaults(handler=run_diff)

    u = tsub.add_parser("upgrade", help="rewrite traces in the current format version")
    u.add_argument("traces", nargs="+", metavar="TRACE")
    u.add_argument("-o", "--output", help="where to write (one TRACE only; default: in place)")
    u.set_defaults(handler=run_upgrade)

    pl = tsub.add_parser("plot", help="fault timeline and latency CDF as a PNG (matplotlib)")
    pl.add_argument("trace")
    pl.add_argument("-o", "--output", required=True, help="PNG file to write")
    pl.add_argument("--y", choices=("vcpu", "gpa"), default="vcpu", help="timeline y axis")
    pl.set_defaults(handler=run_plot)


class _Opened:
    """A trace opened for one pass; reports where a cut-off trace stopped."""

    def __init__(self, path: str) -> None:
        from replay.format import open_trace

        self.path = path
        self.reader = open_trace(path)
        self.header: Header = self.reader.header

    def events(self) -> Iterator[Event]:
        yield from self.reader
        if self.reader.stopped_at:
            sys.stdout.flush()
            print(f"{self.path}: {self.reader.stopped_at}", file=sys.stderr)

    def columns(self) -> Iterator[ChunkColumns]:
        yield from self.reader.columns()
        if self.reader.stopped_at:
            sys.stdout.flush()
            print(f"{self.path}: {self.reader.stopped_at}", file=sys.stderr)

    def close(self) -> None:
        self.reader.close()


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a TraceError or a missing file into one line on stderr and exit status 2."""

    def wrapper(args: argparse.Namespace) -> int:
        from replay.format import TraceError

        try:
            return fn(args)
        except TraceError as e:
            print(f"fakekvm: bad trace (byte {e.offset}): {e}", file=sys.stderr)
            return 2
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            print(f"fakekvm: {e.filename}: {e.strerror}", file=sys.stderr)
            return 2

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@guarded
def run_show(args: argparse.Namespace) -> int:
    from replay.show import ShowFilter, header_lines, show_lines

    t = _Opened(args.trace)
    try:
        flt = ShowFilter(tid=args.tid, fd_kind=args.fd_kind, name=args.name,
                         faults_only=args.faults_only, limit=args.limit,
                         relative=args.relative, clock=args.clock)  # fmt: skip
        out = sys.stdout
        if not args.no_header:
            for line in header_lines(t.header):
                out.write(line + "\n")
        events: Iterator[Any] = t.events()
        if not args.faults_only:  # capture --kvm-trace: in the trace, or (older) beside it
            from replay.tracefs_merge import load_kevents, merge

            kpath = args.trace + ".kevents"
            kevents = t.reader.kevents()
            first = next(kevents, None)
            if first is not None:
                events = merge(events, itertools.chain((first,), kevents))
            elif os.path.exists(kpath):
                events = merge(events, load_kevents(kpath))
        for line in show_lines(t.header, events, flt):
            out.write(line + "\n")
    finally:
        t.close()
    return 0


@guarded
def run_stats(args: argparse.Namespace) -> int:
    from replay.stats import compute_stats_columns, format_stats

    t = _Opened(args.trace)
    try:
        st = compute_stats_columns(t.header, t.columns())
    finally:
        t.close()
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
    else:
        print(format_stats(st, t.header))
    return 0


@guarded
def run_diff(args: argparse.Namespace) -> int:
    from replay.diff import diff_traces

    a, b = _Opened(args.a), _Opened(args.b)
    try:
        res = diff_traces(a.events(), b.events(), context=args.context, compare_out=args.out)
    finally:
        a.close()
        b.close()
    if args.json:
        lat = res.latency
        print(json.dumps({
            "same": res.same, "calls-a": res.calls_a, "calls-b": res.calls_b,
            "first-divergence": None if res.same else res.at, "fields": res.fields,
            "latency": None if lat is None else {
                "faults-a": lat.n_a, "faults-b": lat.n_b, "p50-a-ns": lat.p50_a,
                "p50-b-ns": lat.p50_b, "p99-a-ns": lat.p99_a, "p99-b-ns": lat.p99_b,
                "p50-ratio": lat.p50_ratio, "p99-ratio": lat.p99_ratio, "ks-d": lat.ks_d,
            },
        }, indent=2))  # fmt: skip
    else:
        print(f"A: {args.a}\nB: {args.b}")
        print(res.report())
    return 0 if res.same else 1


@guarded
def run_plot(args: argparse.Namespace) -> int:
    from replay.plot import PlotError, plot_trace

    t = _Opened(args.trace)
    try:
        n = plot_trace(t.header, t.events(), args.output, y=args.y)
    except PlotError as e:
        print(f"fakekvm trace plot: {e}", file=sys.stderr)
        return 2
    finally:
        t.close()
    print(f"{args.output}: {n} faults")
    return 0


@guarded
def run_upgrade(args: argparse.Namespace) -> int:
    from replay.upgrade import upgrade

    if args.output and len(args.traces) > 1:
        print("fakekvm trace upgrade: -o takes one TRACE", file=sys.stderr)
        return 2
    status = 0
    for path in args.traces:
        try:
            u = upgrade(path, args.output)
        except ValueError as e:  # a cut-off recording (TraceError is a ValueError: re-raised)
            from replay.format import TraceError

            if isinstance(e, TraceError):
                raise
            print(f"fakekvm trace upgrade: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{u.path}: format {u.old_version} -> current, {u.events} events, "
              f"{u.old_bytes} -> {u.new_bytes} bytes")  # fmt: skip
    return status
