"""``fakekvm bench --recorder``: what recording costs a post-copy fault (issue 6, item 2).

Target: recording on the real kernel adds at most 5 % to the per-fault latency of a migration.
A whole-migration A/B drowns a few percent in run-to-run noise (single runs spread 259-522 µs
at p50 on this host), so the figure is built from parts that do not:

1. **added µs per call** (`call_costs`): the same call, in interleaved blocks, through the
   plain kernel and through a `replay.recorder.RecordingKernel` writing a real trace file
   (its chunk flushes included), for the calls a fault makes: the fault thread's ``poll`` and
   ``read``, the engine's ``monotonic_ns``, the demand ``UFFDIO_COPY`` (4 KiB, nobody
   waiting), ``UFFDIO_WAKE``, and ``KVM_CHECK_EXTENSION`` as the cheapest ioctl there is.
   Added = median over blocks of (recorded - plain) per call;
2. **the recorder's own work per call** (`wrapper_costs`): the same wrapper over a
   `NullKernel` whose calls cost nothing, so what remains is the recorder alone, without
   kernel noise; this one includes ``KVM_RUN`` (the ``kvm_run`` page copy);
3. **calls per fault** and the **median fault latency** of one recorded migration
   (`analyse_trace`): the calls on the faults' path (those that end while a fault is open,
   from the read that reveals it to the call that resolves it, and the poll that woke the
   fault thread before that read) and every call of the run, by kind, per fault;
4. the figure (headline): Σ (fault-path calls of a kind per fault x whole added µs of that
   kind) / median fault latency; also shown: the same calls at their call-path cost, and the
   upper bound that charges every call of the run (setup, background push) to its faults;
5. the cross-check (`ab_migrations`): interleaved pairs of whole migrations, plain and
   recorded (``FAKEKVM_TRACE``), medians and spread of their p50 fault latency; 512 MiB
   random guests (about 1000 faults a run) unless ``--quick``.

Nothing here asserts a time: it prints the figures, the 5 % target and PASS/FAIL.

This module runs them all and prints them (`run_bench`, `format_bench`, `print_json`,
`run_cli`); the parts live in `tools.bench_recorder_calls` (1, 2: `NullKernel`, the
recorders, `call_costs`, `wrapper_costs`), `tools.bench_recorder_runs` (3 to 5:
`analyse_trace`, `per_fault_figure`, `ab_migrations`) and `tools.bench_recorder_insitu`
(`insitu`, real kernel only), and every public name of theirs is importable from here.
"""

from __future__ import annotations

import ctypes  # noqa: F401  (kept importable as bench_recorder.ctypes, which tests use)
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fakekvm.kernel.seam import Kernel
from tools.bench_recorder_calls import (
    OPS,
    PAGE,
    CallCost,
    NullKernel,
    RecorderFactory,
    call_costs,
    default_recorder,
    hot_path_recorder,
    wrapper_costs,
)
from tools.bench_recorder_insitu import InSitu, insitu
from tools.bench_recorder_runs import (
    Figure,
    Pair,
    RecordedRun,
    ab_migrations,
    analyse_trace,
    migrate_once,
    op_of,
    per_fault_figure,
)

__all__ = [
    "OPS",
    "PAGE",
    "TARGET_PCT",
    "CallCost",
    "Figure",
    "InSitu",
    "NullKernel",
    "Pair",
    "RecordedRun",
    "RecorderBench",
    "RecorderFactory",
    "ab_migrations",
    "analyse_trace",
    "call_costs",
    "default_recorder",
    "format_bench",
    "hot_path_recorder",
    "insitu",
    "migrate_once",
    "op_of",
    "per_fault_figure",
    "print_json",
    "run_bench",
    "run_cli",
    "wrapper_costs",
]

TARGET_PCT = 5.0


# ---------------------------------------------------------------------------------------------
# ``fakekvm bench --recorder``
# ---------------------------------------------------------------------------------------------


@dataclass
class RecorderBench:
    kernel: str
    costs: list[CallCost]
    hot: list[CallCost]
    wrapper: list[CallCost]
    run: RecordedRun | None
    run_p50_us: float
    #: the headline: the calls on the faults' path (made while a fault was open, and the poll
    #: before each revealing read) at their whole cost (chunks converted, encoded and written,
    #: amortised)
    figure: Figure | None
    #: the same calls at their call-path cost (what the faulting thread pays between chunks)
    window_figure: Figure | None
    #: the upper bound: every call of the run (setup, background push) charged to its faults,
    #: at the whole cost
    upper_figure: Figure | None = None
    pairs: list[Pair] = field(default_factory=list)
    note: str = ""
    #: the recorder timing its own work inside a real migration (real kernel only), and the
    #: same timing around a wrapper that only forwards (the timing's own cost in situ)
    in_situ: InSitu | None = None
    in_situ_control: InSitu | None = None

    def in_situ_net(self) -> tuple[float, dict[str, float]] | None:
        """µs per fault the recorder adds in situ, net of the timing (per op: the recorder's
        median minus the control's for the same kind of call), and the per-call nets."""
        rec, ctl = self.in_situ, self.in_situ_control
        if rec is None or ctl is None or not rec.faults:
            return None
        net: dict[str, float] = {}
        total = 0.0
        for op, (n, _) in rec.ops.items():
            base = ctl.median_us.get(op, ctl.median_us.get("ioctl", 0.0))
            net[op] = max(0.0, rec.median_us.get(op, 0.0) - base)
            total += n / rec.faults * net[op]
        return total, net

    @property
    def verdict(self) -> str:
        if self.figure is None or self.figure.faults == 0:
            return "n/a"
        return "PASS" if self.figure.pct <= TARGET_PCT else "FAIL"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run_bench(
    kernel: str = "auto",
    *,
    pairs: int = 10,
    mem: str = "64M",
    workload: str = "random",
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RecorderBench:
    """Everything ``fakekvm bench --recorder`` prints (see the module doc)."""
    from fakekvm.kernel.real import RealKernel, kvm_available

    say = progress or (lambda _m: None)
    if kernel == "auto":
        kernel = "real" if kvm_available()[0] else "fake"
    inner: Kernel
    if kernel == "real":
        inner = RealKernel()
    else:
        from fakekvm.fake import FakeKernel

        inner = FakeKernel(profile="6.18-pvm")
    n, blocks = (300, 5) if quick else (4096, 11)
    try:
        say("per-call cost, recorded vs plain (trace file written) ...")
        costs = call_costs(inner, n=n, blocks=blocks)
        say("per-call cost, call path only ...")
        hot = call_costs(inner, hot_path_recorder, n=n, blocks=blocks)
    finally:
        inner.shutdown()
    say("the recorder's own work (over a kernel that costs nothing) ...")
    wrapper = wrapper_costs(n=2000 if quick else 20000, blocks=5 if quick else 9)
    kvm_run = [c for c in wrapper if c.op == "kvm_run"]
    res = RecorderBench(kernel, costs, hot, wrapper, None, 0.0, None, None)
    with tempfile.TemporaryDirectory(prefix="fakekvm-bench-rec-") as d:
        say(f"one recorded migration ({kernel}, {mem}, {workload}) ...")
        trace = os.path.join(d, "run.trc")
        try:
            rep = migrate_once(kernel, mem, workload, 1, trace)
        except RuntimeError as e:
            res.note = str(e)
            return res
        res.run = analyse_trace(trace)
        res.run_p50_us = rep["latency-p50-ns"] / 1000
        if res.run.faults:
            p50, run = res.run_p50_us, res.run
            res.figure = per_fault_figure(kernel, run, p50, costs + kvm_run, window=True)
            res.window_figure = per_fault_figure(kernel, run, p50, hot + kvm_run, window=True)
            res.upper_figure = per_fault_figure(kernel, run, p50, costs + kvm_run, window=False)
        if kernel == "real":
            say("the recorder timing itself inside a real migration ...")
            try:
                res.in_situ_control = insitu(mem, workload, seed=2, control=True)
                res.in_situ = insitu(mem, workload, seed=2)
            except (RuntimeError, OSError) as e:
                res.note = f"in situ: {e}"
        for i, pair in enumerate(ab_migrations(kernel, pairs, mem, workload, tmp=d)):
            say(f"A/B pair {i + 1}/{pairs}: plain p50 {pair.plain_p50_us:.0f} µs, "
                f"recorded p50 {pair.recorded_p50_us:.0f} µs")  # fmt: skip
            res.pairs.append(pair)
    return res


def _spread(xs: Sequence[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):8.1f}  [{min(xs):.0f} .. {max(xs):.0f}]"


def format_bench(b: RecorderBench) -> str:
    lines = [f"fakekvm bench --recorder: kernel {b.kernel}, target: recording adds <= "
             f"{TARGET_PCT:g}% to the per-fault latency (load {_load()})", "",
             "1. added µs per call (median of interleaved blocks; [quartiles])",
             f"   {'call':<16} {'plain':>8} {'recorded':>9} {'added':>8}   {'call path only':>14}"
             f"   {'recorder alone':>14}"]  # fmt: skip
    hot = {c.op: c for c in b.hot}
    alone = {c.op: c for c in b.wrapper}
    for c in b.costs:
        h, a = hot.get(c.op), alone.get(c.op)
        lines.append(
            f"   {c.op:<16} {c.plain_us:8.2f} {c.recorded_us:9.2f} {c.added_us:8.2f}   "
            f"{(h.added_us if h else float('nan')):14.2f}   {(a.added_us if a else float('nan')):14.2f}"
            f"   [{c.spread_us[0]:.2f} .. {c.spread_us[1]:.2f}]"
        )
    if "kvm_run" in alone:
        lines.append(f"   {'kvm_run':<16} {'':>8} {'':>9} {'':>8}   {'':>14}   "
                     f"{alone['kvm_run'].added_us:14.2f}   (no exit loop here: the recorder alone)")  # fmt: skip
    lines += ["   added = whole cost with a trace file written (chunks converted, encoded and "
              "written, amortised);", "   call path only = what the calling thread pays between "
              "two chunks; recorder alone = over a kernel that costs nothing", ""]  # fmt: skip
    if b.run is None:
        lines.append(f"2. recorded migration: failed: {b.note}")
        return "\n".join(lines)
    r = b.run
    lines.append(f"2. one recorded migration: {r.faults} faults, p50 fault latency "
                 f"{b.run_p50_us:.1f} µs (stats), {sum(r.calls.values())} calls")  # fmt: skip
    for title, fig in (
        ("the faults' path (calls while a fault is open + the waking poll), whole cost "
         "[headline]", b.figure),
        ("the same calls, call-path cost only", b.window_figure),
        ("upper bound: every call of the run charged to its faults, whole cost", b.upper_figure),
    ):  # fmt: skip
        if fig is None:
            lines.append(f"   {title}: n/a (no faults in this run)")
            continue
        detail = ", ".join(f"{op} {n:.2f}x{us:.2f}" for op, (n, us) in fig.parts.items())
        lines.append(f"   {title}:")
        lines.append(f"     {fig.added_us:.1f} µs/fault / {fig.p50_us:.1f} µs = {fig.pct:.2f}%"
                     f"   ({detail})")  # fmt: skip
    lines.append("")
    if b.in_situ is not None:
        st = b.in_situ
        lines.append(f"3. in situ: the recorder timing its own work in a real migration ({st.faults} "
                     f"faults, p50 {st.p50_us:.1f} µs; hot timing cost {st.probe_us:.2f} µs/call "
                     "subtracted)")  # fmt: skip
        for op, (n, us) in sorted(st.ops.items()):
            lines.append(f"   {op:<16} {n / max(1, st.faults):5.2f}/fault  median "
                         f"{st.median_us.get(op, 0.0):6.2f}  mean {us / max(1, n):6.2f} µs/call")  # fmt: skip
        lines.append(f"   per fault: {st.per_fault_median_us:.1f} µs (medians) = "
                     f"{100 * st.per_fault_median_us / st.p50_us:.2f}%; {st.per_fault_us:.1f} µs "
                     f"(means) = {st.pct:.2f}% of p50")  # fmt: skip
        ctl = b.in_situ_control
        net = b.in_situ_net()
        if ctl is not None and net is not None:
            cm = ", ".join(f"{op} {us:.2f}" for op, us in sorted(ctl.median_us.items()))
            lines.append(f"   control (the same timing around a wrapper that only forwards), "
                         f"medians µs/call: {cm}")  # fmt: skip
            nets = ", ".join(f"{op} {us:.2f}" for op, us in sorted(net[1].items()))
            lines.append(f"   net of the timing: {net[0]:.1f} µs/fault = "
                         f"{100 * net[0] / st.p50_us:.2f}% of p50   ({nets} µs/call)")  # fmt: skip
        lines.append("")
    if b.pairs:
        p = [x.plain_p50_us for x in b.pairs]
        q = [x.recorded_p50_us for x in b.pairs]
        d = [x.recorded_p50_us - x.plain_p50_us for x in b.pairs]
        lines.append(f"4. A/B of whole migrations, {len(b.pairs)} interleaved pairs, p50 fault "
                     f"latency µs: median [min .. max]")  # fmt: skip
        lines.append(f"   plain     {_spread(p)}")
        lines.append(f"   recorded  {_spread(q)}")
        mp = statistics.median(p)
        rel = f"   ({100 * statistics.median(d) / mp:+.1f}% of the plain median)" if mp else ""
        lines.append(f"   recorded - plain, per pair: {_spread(d)}{rel}")
        lines.append(f"   medians: recorded / plain = "
                     f"{statistics.median(q) / mp if mp else float('nan'):.3f}")  # fmt: skip
        lines.append("   (the cross-check: single runs spread more than the target; see 2.)")
        lines.append("")
    net = b.in_situ_net()
    if net is not None and b.in_situ is not None and b.in_situ.p50_us:
        x = 100 * net[0] / b.in_situ.p50_us
        ok = "PASS" if x <= TARGET_PCT else "FAIL"
        lines.append(
            f"in situ (net of the timing, medians): {x:.2f}% (target <= {TARGET_PCT:g}%): {ok}"
        )
    if b.pairs:
        mp = statistics.median(x.plain_p50_us for x in b.pairs)
        if mp:
            ab = 100 * (statistics.median(x.recorded_p50_us for x in b.pairs) / mp - 1)
            ok = "PASS" if ab <= TARGET_PCT else "FAIL"
            lines.append(
                f"A/B (ratio of medians, noisy): {ab:+.2f}% (target <= {TARGET_PCT:g}%): {ok}"
            )
    w = b.window_figure
    if w is not None and w.faults:
        ok = "PASS" if w.pct <= TARGET_PCT else "FAIL"
        lines.append(f"what a fault waits for (call path of the fault-path calls): {w.pct:.2f}% "
                     f"(target <= {TARGET_PCT:g}%): {ok}")  # fmt: skip
    f = b.figure
    pct = "n/a" if f is None or not f.faults else f"{f.pct:.2f}%"
    lines.append(f"recorder overhead per fault: {pct} (target <= {TARGET_PCT:g}%): {b.verdict}")
    return "\n".join(lines)


def run_cli(kernel: str, pairs: int, quick: bool, as_json: bool) -> int:
    """``fakekvm bench --recorder[=KERNEL] [--recorder-pairs N] [--quick] [--json]``."""
    # 512 MiB: about 1000 faults a run, so one run's p50 is a steadier figure than 64 MiB's 100
    mem = "16M" if quick else "512M"
    b = run_bench(kernel, pairs=pairs, mem=mem, quick=quick,
                  progress=None if as_json else (lambda m: print(f"  {m}", file=sys.stderr)))  # fmt: skip
    if as_json:
        print_json(b)
    else:
        print(format_bench(b))
    return 0


def print_json(b: RecorderBench) -> None:
    import msgspec

    data = msgspec.to_builtins(b)  # (dataclasses.asdict would rebuild each Counter from pairs)
    data["verdict"] = b.verdict
    data["pct"] = None if b.figure is None else b.figure.pct
    data["window_pct"] = None if b.window_figure is None else b.window_figure.pct
    data["upper_pct"] = None if b.upper_figure is None else b.upper_figure.pct
    data["load"] = _load()
    print(json.dumps(data, indent=1, default=str))
