"""``fakekvm bench --traces``: issue 6's trace benchmarks, next to the run they came from.

1. **A recording.** A real-kernel migration on this host (``fakekvm capture -- fakekvm migrate
   --kernel real --mechanism uffd-missing --mem 512M --workload random``), or, where no real
   kernel answers (no ``/dev/kvm``, no userfaultfd), the same on the fake (the output says so).
   ``--trace FILE`` uses an existing destination recording instead. The run's own figures
   (faults, latency p50) are printed with it.
2. **Decode rate** (median of ``--repeat`` timings, each decoding the file enough times to take
   a measurable while): events per second for a full decode of every field of every event into
   columns (`TraceReader.columns`: int64 arrays, byte-string columns, lists; the target's
   figure) and into `Call`/`Fault` structs (`TraceReader.chunks`: one Python object per event,
   which alone costs about 0.5 µs here), faults per second for the faults-only path
   (`TraceReader.faults`: calls skipped undecoded) and for fault columns
   (`TraceReader.fault_columns`).
3. **Bytes per fault event** (`bytes_per_fault`): the recording's `Fault` events alone written
   as a trace by `replay.format.TraceWriter` (default chunking and compression); the bytes of
   its events chunks (frames and stored payloads; not the file head, header or end chunk)
   divided by the number of faults. Whole-file bytes per event are shown too.
4. **Workload replay**: faults replayed per second through the engine in workload mode
   (`replay.workload_engine.run_engine_workload`: scripted vCPUs, the real `Source`/`Destination`,
   the fake kernel, the source serving an image), for the recording and for a synthetic 1 GiB
   trace whose 262,144 faults touch every page once (`replay.workload_engine.synthetic_trace`),
   pushed in the trace's order; with how many touches became demand faults and the time split.

Each figure is reported for both traces (the recording, the 1 GiB synthetic one) side by side.
"""

from __future__ import annotations

import gc
import io
import json
import os
import statistics
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from typing import Any

from replay.events import Fault, Header
from replay.format import CHUNK_EVENTS, CHUNK_FRAME, TraceWriter, open_trace

#: the targets of issue 6
TARGET_DECODE = 2_000_000  # events/s
TARGET_BYTES_PER_FAULT = 8.0
TARGET_REPLAY_S = 5.0  # a 262,144-fault replay through the engine


def bytes_per_fault(
    faults: list[Fault], header: Header | None = None, workdir: str | None = None
) -> float:
    """Bytes on disk per fault event: the events chunks (20-byte frames and payloads, as
    stored: zlib when smaller) of a trace holding only ``faults``, written by `TraceWriter`
    with its default chunking, divided by the number of faults. The file head, header and end
    chunk are not counted. 0.0 without faults."""
    if not faults:
        return 0.0
    with tempfile.TemporaryDirectory(prefix="fakekvm-bpf-", dir=workdir) as d:
        path = os.path.join(d, "faults.trace")
        with TraceWriter(path, header or Header()) as w:
            w.extend(faults)
        # the closed file (chunks recompressed by close): its events chunks' frames + payloads
        size = 0
        with open(path, "rb") as f:
            f.seek(w.head_bytes)
            while frame := f.read(CHUNK_FRAME.size):
                _magic, kind, _flags, _count, plen, _pcrc, _fcrc = CHUNK_FRAME.unpack(frame)
                f.seek(plen, os.SEEK_CUR)
                if kind == CHUNK_EVENTS:
                    size += len(frame) + plen
        return size / len(faults)


def decode_rate(path: str, how: str = "full", repeat: int = 5, min_time: float = 0.2) -> float:
    """Events (``how="full"``: structs, ``"events"``: columns) or faults (``"faults"``,
    ``"columns"``) decoded per second:
    the median of ``repeat`` timings of decoding ``path`` as often as ``min_time`` needs."""
    with open_trace(path) as r:

        def once() -> int:
            if how == "full":
                return sum(len(c) for c in r.chunks())
            if how == "faults":
                return sum(1 for _ in r.faults())
            if how == "columns":
                return sum(len(c["gpa"]) for c in r.fault_columns())
            if how == "events":
                return sum(len(c) for c in r.columns())
            raise ValueError(f"decode how {how!r}: full, events, faults or columns")

        t0 = time.perf_counter()
        n = once()
        one = max(time.perf_counter() - t0, 1e-6)
        loops = max(1, int(min_time / one))
        rates = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(loops):
                once()
            rates.append(n * loops / (time.perf_counter() - t0))
    return statistics.median(rates)


@dataclass
class TraceFigures:
    """Every figure for one trace."""

    label: str
    path: str
    events: int = 0
    faults: int = 0
    file_bytes: int = 0
    decode_events: float = 0.0  #: events/s, every field of every event as columns
    decode_full: float = 0.0  #: events/s into Call/Fault structs
    decode_faults: float = 0.0  #: faults/s, faults only (calls skipped)
    decode_columns: float = 0.0  #: faults/s as columns
    bytes_per_fault: float = 0.0
    replay: dict[str, float] = field(default_factory=dict)
    recorded: dict[str, float] = field(default_factory=dict)  #: the run's own figures
    note: str = ""
    push_order: str = "trace"


def measure(
    label: str, path: str, *, repeat: int = 5, replay: bool = True, push_order: str = "trace"
) -> TraceFigures:
    """Decode rates, bytes per fault and the workload replay of one trace."""
    from replay.workload_engine import run_engine_workload

    with open_trace(path) as r:  # counts first: nothing of the trace stays in memory while timing
        header = r.header
        events = sum(len(c) for c in r.chunks())
        nfaults = sum(len(c["gpa"]) for c in r.fault_columns())
    f = TraceFigures(label, path, events, nfaults, os.path.getsize(path))
    f.decode_events = decode_rate(path, "events", repeat)
    f.decode_full = decode_rate(path, "full", repeat)
    f.decode_faults = decode_rate(path, "faults", repeat) if nfaults else 0.0
    f.decode_columns = decode_rate(path, "columns", repeat) if nfaults else 0.0
    with open_trace(path) as r:
        faults = list(r.faults())
    f.bytes_per_fault = bytes_per_fault(faults, header)
    del faults
    if replay and nfaults:
        run = run_engine_workload(path, push_order=push_order)
        f.replay = {
            "touches": float(run.touched),
            "demand_faults": float(run.demand_faults),
            "touches_per_s": run.touches_per_s,
            "read_s": run.read_s,
            "setup_s": run.setup_s,
            "migration_s": run.migration_s,
            "touches_s": run.touches_s,
            "push_s": run.push_s,
            "verify_s": run.verify_s,
            "total_s": run.total_s,
            "p50_us": run.p50_us,
        }
    return f


def record(
    workdir: str, *, real: bool, mem: str, workload: str = "random"
) -> tuple[str, dict[str, float], str]:
    """Record ``fakekvm migrate`` (real kernel when ``real``) into ``workdir``: returns the
    destination trace, the run's figures (faults, p50) and the command."""
    from replay.capture import capture

    out = os.path.join(workdir, "recorded.trace")
    kernel = "real" if real else "fake"
    cmd = ["fakekvm", "migrate", "--kernel", kernel, "--mechanism", "uffd-missing",
           "--mem", mem, "--workload", workload, "--json"]  # fmt: skip
    buf = io.StringIO()
    with redirect_stdout(buf):
        res = capture(out, cmd)
    if res.returncode != 0:
        raise RuntimeError(
            f"the recorded migration failed (exit status {res.returncode}): {' '.join(cmd)}"
        )
    d = json.loads(buf.getvalue()[buf.getvalue().index("{") :])
    figs = {"faults": float(d.get("faults", 0)), "p50_us": d.get("latency-p50-ns", 0) / 1e3,
            "total_ms": float(d.get("total-time", 0))}  # fmt: skip
    return out, figs, " ".join(cmd[:-1])


def _row(label: str, a: str, b: str, target: str = "") -> str:
    return f"{label:34s} {a:>16s} {b:>16s}  {target}"


def format_report(rec: TraceFigures, syn: TraceFigures) -> str:
    def num(v: float, fmt: str = ",.0f") -> str:
        return format(v, fmt)

    def rp(f: TraceFigures, key: str, fmt: str = ",.3f") -> str:
        return num(f.replay[key], fmt) if key in f.replay else "-"

    syn_mib = syn.faults * 4096 >> 20

    lines = [
        f"recording: {rec.path}" + (f" ({rec.note})" if rec.note else ""),
        f"  its run: {rec.recorded.get('faults', 0):.0f} faults, latency p50 "
        f"{rec.recorded.get('p50_us', 0):.1f} µs, total {rec.recorded.get('total_ms', 0):.0f} ms",
        f"synthetic: {syn.path} ({syn.note})",
        "",
        _row("figure", "recording", f"synthetic {syn_mib} MiB", "target"),
        _row("events", num(rec.events), num(syn.events)),
        _row("faults", num(rec.faults), num(syn.faults)),
        _row("file bytes", num(rec.file_bytes), num(syn.file_bytes)),
        _row(
            "bytes per event (whole file)",
            num(rec.file_bytes / max(rec.events, 1), ".2f"),
            num(syn.file_bytes / max(syn.events, 1), ".2f"),
        ),
        _row(
            "bytes per fault event",
            num(rec.bytes_per_fault, ".2f"),
            num(syn.bytes_per_fault, ".2f"),
            f"<= {TARGET_BYTES_PER_FAULT:g}",
        ),
        _row(
            "decode, columns (events/s)",
            num(rec.decode_events),
            num(syn.decode_events),
            f">= {TARGET_DECODE:,}",
        ),
        _row("decode, into structs (events/s)", num(rec.decode_full), num(syn.decode_full)),
        _row("decode, faults only (faults/s)", num(rec.decode_faults), num(syn.decode_faults)),
        _row("decode, fault columns (faults/s)", num(rec.decode_columns), num(syn.decode_columns)),
        _row("replay: touches", rp(rec, "touches", ",.0f"), rp(syn, "touches", ",.0f")),
        _row(
            "replay: became demand faults",
            rp(rec, "demand_faults", ",.0f"),
            rp(syn, "demand_faults", ",.0f"),
        ),
        _row(
            "replay: faults replayed/s",
            rp(rec, "touches_per_s", ",.0f"),
            rp(syn, "touches_per_s", ",.0f"),
        ),
        _row("replay: demand fault p50 (µs)", rp(rec, "p50_us", ",.1f"), rp(syn, "p50_us", ",.1f")),
        _row("replay: read trace (s)", rp(rec, "read_s"), rp(syn, "read_s")),
        _row("replay: setup (s)", rp(rec, "setup_s"), rp(syn, "setup_s")),
        _row(
            "replay: migration (s)",
            rp(rec, "migration_s"),
            rp(syn, "migration_s"),
            f"< {TARGET_REPLAY_S:g} (262,144 faults)",
        ),
        _row("replay:   touches (s)", rp(rec, "touches_s"), rp(syn, "touches_s")),
        _row("replay:   push (s)", rp(rec, "push_s"), rp(syn, "push_s")),
        _row("replay: verify (s)", rp(rec, "verify_s"), rp(syn, "verify_s")),
        _row("replay: total, wall clock (s)", rp(rec, "total_s"), rp(syn, "total_s")),
        "",
        "bytes per fault event: the faults alone written as a trace (TraceWriter, default "
        "chunks, zlib): its events chunks' bytes (frames + payloads; not the file head, header "
        "or end chunk) per fault",
        "replay: scripted vCPUs touch the trace's fault pages in order (no think time) through "
        f"the engine on the fake; the source serves an image and pushes in {rec.push_order} "
        "order (trace: the trace's fault order); migration = Destination.run (connect .. every "
        "page placed); touches/push are measured from the vCPUs' resume",
    ]
    return "\n".join(lines)


def run(*, trace: str | None = None, quick: bool = False, repeat: int = 5,
        as_json: bool = False, order: str = "sequential", push_order: str = "trace") -> int:  # fmt: skip
    from fakekvm.kernel.real import kvm_available
    from replay.workload_engine import synthetic_trace

    with tempfile.TemporaryDirectory(prefix="fakekvm-bench-traces-") as d:
        note = ""
        recorded: dict[str, float] = {}
        if trace is None:
            have, why = kvm_available()
            mem = "16M" if quick else "512M"
            if not have:
                note = f"no real kernel here ({why}): a recording on the fake"
            trace, recorded, cmd = record(d, real=have, mem=mem)
            note = note or f"recorded on this host's real kernel: {cmd}"
        else:
            note = "an existing recording"
            with open_trace(trace) as r:
                recorded = {"faults": float(sum(1 for _ in r.faults()))}
        syn_mem = (64 << 20) if quick else (1 << 30)
        syn_path = os.path.join(d, "synthetic.trace")
        n = synthetic_trace(syn_path, syn_mem, order=order)
        # what the recording left on the heap is not the decoder's cost: the collector
        # would walk it on every full collection during the timings
        gc.collect()
        gc.freeze()
        try:
            rec = measure("recording", trace, repeat=repeat, push_order=push_order)
            syn = measure("synthetic", syn_path, repeat=repeat, push_order=push_order)
        finally:
            gc.unfreeze()
        rec.recorded, rec.note = recorded, note
        syn.note = f"{n} faults, every page of {syn_mem >> 20} MiB once, {order} order"
        rec.push_order = syn.push_order = push_order
        if as_json:
            out: dict[str, Any] = {"recording": vars(rec), "synthetic": vars(syn)}
            print(json.dumps(out, indent=2))
        else:
            print(format_report(rec, syn))
    return 0
