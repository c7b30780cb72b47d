"""``fakekvm bench``: the same workload on the real kernel and on the fake, side by side, in one run.

Each benchmark runs the same code on `RealKernel` and on `FakeKernel` (through
the `Kernel` seam: the code does not know which it has), takes the median of a
few repetitions, and reports both numbers and their ratio against the target
the project set for it. Absolute numbers move with the machine's load; the ratio
within one run is what the targets are about. Where the host has no KVM or
userfaultfd the real column says why and the fake still runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from fakekvm.abi import kvm
from fakekvm.kernel import Kernel, RealKernel
from fakekvm.kernel.real import kvm_available

PROFILE = "6.18-pvm"


@dataclass
class Result:
    name: str
    unit: str
    real: float | None
    fake: float | None
    #: "fake/real <= x" (lower is better) or "fake/real >= x" (higher is better)
    target: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.real is None or self.fake is None or self.real == 0:
            return None
        return self.fake / self.real

    @property
    def met(self) -> bool | None:
        r = self.ratio
        if r is None:
            return None
        op, bound = self.target.split()[1], float(self.target.split()[2])
        return r <= bound if op == "<=" else r >= bound


def _fake() -> Kernel:
    from fakekvm.fake import FakeKernel

    return FakeKernel(profile=PROFILE)


def _median(f: Callable[[], float], repeat: int) -> float:
    return statistics.median(f() for _ in range(repeat))


def bench_check_extension(kernel: Kernel, n: int = 20000) -> float:
    """Microseconds per KVM_CHECK_EXTENSION on /dev/kvm (the cost of the seam itself)."""
    fd = kernel.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        ioctl, req, cap = kernel.ioctl, kvm.KVM_CHECK_EXTENSION, kvm.KVM_CAP_USER_MEMORY
        t0 = time.perf_counter_ns()
        for _ in range(n):
            ioctl(fd, req, cap)
        return (time.perf_counter_ns() - t0) / n / 1000
    finally:
        kernel.close(fd)


def bench_first_touch(kernel: Kernel, mib: int = 64) -> float:
    """Guest pages first-touched per second: the toucher guest writing every page of ``mib`` MiB."""
    from fakekvm.guests import GuestVM, Pattern, TouchParams, layout, toucher_image

    size = mib << 20
    mem = layout.DATA_BASE + size
    p = TouchParams(layout.DATA_BASE, size, Pattern.SEQUENTIAL, write=True, seed=1)
    with GuestVM(kernel, mem) as vm:
        vm.load(toucher_image(mem, p))
        t0 = time.perf_counter_ns()
        r = vm.run()
        dt = time.perf_counter_ns() - t0
    if r.reports[0] != p.npages:
        raise RuntimeError(f"toucher touched {r.reports[0]} pages, expected {p.npages}")
    return p.npages / (dt / 1e9)


def bench_uffd_fault(kernel: Kernel, npages: int = 2000, batch: bool = False) -> float:
    """Microseconds per userfaultfd fault round trip with one Python handler (UFFDIO_COPY),
    both threads on CPU 0; ``batch``: both under SCHED_BATCH (no wakeup preemption)."""
    from fakekvm.testing.uffd_scenarios import fault_round_trip

    return fault_round_trip(kernel, npages, batch=batch) * 1e6


def run_all(only: set[str] | None = None, repeat: int = 3, quick: bool = False) -> list[Result]:
    have_kvm, kvm_why = kvm_available()
    real = RealKernel()
    out: list[Result] = []

    def both(name: str, unit: str, target: str, f: Callable[[Kernel], float], needs_kvm: bool) -> None:
        if only and name not in only:
            return
        r: float | None = None
        note = ""
        if needs_kvm and not have_kvm:
            note = f"real: {kvm_why}"
        else:
            try:
                r = _median(lambda: f(real), repeat)
            except OSError as e:
                note = f"real: {e}"
        fk = _fake()
        try:
            fv = _median(lambda: f(fk), repeat)
        finally:
            fk.shutdown()
        out.append(Result(name, unit, r, fv, target, note))

    both("check_extension", "µs/call", "fake/real <= 3", bench_check_extension, True)
    both("first_touch", "pages/s", "fake/real >= 1",
         lambda k: bench_first_touch(k, 16 if quick else 64), True)
    both("uffd_fault", "µs/fault", "fake/real <= 1.5",
         lambda k: bench_uffd_fault(k, 500 if quick else 2000), False)
    both("uffd_fault_batch", "µs/fault", "fake/real <= 1.5",
         lambda k: bench_uffd_fault(k, 500 if quick else 2000, batch=True), False)
    return out


def format_results(results: list[Result]) -> str:
    lines = [f"{'benchmark':<18} {'unit':<10} {'real':>12} {'fake':>12} {'fake/real':>10}  target            met"]
    for r in results:
        real = "-" if r.real is None else f"{r.real:,.2f}"
        fake = "-" if r.fake is None else f"{r.fake:,.2f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        lines.append(f"{r.name:<18} {r.unit:<10} {real:>12} {fake:>12} {ratio:>10}  {r.target:<17} {met}")
        if r.note:
            lines.append(f"  {r.note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.qemu:
        return _run_qemu(args)
    if args.traces:
        from tools import bench_traces

        return bench_traces.run(trace=args.trace, quick=args.quick, repeat=args.repeat,
                                as_json=args.json, order=args.synthetic_order,
                                push_order=args.push_order)  # fmt: skip
    if getattr(args, "recorder", None):
        return _run_recorder(args)
    only = set(args.only.split(",")) if args.only else None
    results = run_all(only, repeat=args.repeat, quick=args.quick)
    if args.json:
        data: list[dict[str, Any]] = [
            {**asdict(r), "ratio": r.ratio, "met": r.met} for r in results
        ]
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(data)) + b"\n")
    else:
        print(f"fakekvm bench: real kernel vs FakeKernel(profile={PROFILE!r}), median of {args.repeat}")
        print(format_results(results))
    return 0


def _run_qemu(args: argparse.Namespace) -> int:
    """``--qemu``: QEMU's post-copy vs the engine (tools/bench_qemu.py); ``--only`` names the
    workloads (default idle,random), ``--quick`` uses 64 MiB instead of 512 MiB."""
    from tools import bench_qemu

    p = argparse.ArgumentParser()
    bench_qemu.add_arguments(p)
    qargs = p.parse_args([])
    qargs.repeat, qargs.json = args.repeat, args.json
    if args.only:
        qargs.workloads = args.only
    if args.quick:
        qargs.mem = 64 << 20
    return bench_qemu.run(qargs)


def _run_recorder(args: argparse.Namespace) -> int:
    """``--recorder[=real|fake]``: what recording costs a post-copy fault, per call and per fault,
    with the 5 % target and PASS/FAIL (tools/bench_recorder.py); ``--recorder-pairs N`` whole
    migrations A/B as the cross-check (0: none); ``--quick``: fewer blocks, 16 MiB."""
    from tools import bench_recorder

    return bench_recorder.run_cli(args.recorder, args.recorder_pairs, args.quick, args.json)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="run the same workloads on the real kernel and the fake, side by side")
    p.add_argument("--only", help="comma-separated: check_extension,first_touch,uffd_fault,uffd_fault_batch")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per measurement (median)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (for smoke tests)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--qemu",
        action="store_true",
        help="QEMU 7.2 post-copy vs fakekvm's engine, same workload (--only: idle,sequential,random)",
    )
    p.add_argument(
        "--recorder", nargs="?", const="auto", choices=("auto", "real", "fake"),
        help="the recorder's overhead per call and per fault (5%% target, PASS/FAIL); "
        "default kernel: real when /dev/kvm works",
    )  # fmt: skip
    p.add_argument("--recorder-pairs", type=int, default=10, metavar="N",
                   help="with --recorder: interleaved plain/recorded migration pairs (0: none)")  # fmt: skip
    p.add_argument(
        "--traces",
        action="store_true",
        help="issue 6's trace benchmarks (tools/bench_traces.py): record a real-kernel migration "
        "(the fake where no real kernel answers) and report decode rate, bytes per fault event "
        "and faults replayed per second through the engine, for it and a synthetic 1 GiB "
        "262,144-fault trace (--quick: 16 MiB recording, 64 MiB synthetic)",
    )
    p.add_argument("--trace", help="--traces: use this destination recording instead of recording one")
    p.add_argument("--synthetic-order", choices=("sequential", "random"), default="sequential",
                   help="--traces: the synthetic trace's page order (default sequential)")  # fmt: skip
    p.add_argument("--push-order", choices=("trace", "sequential"), default="trace",
                   help="--traces: the source's push order in the workload replays (trace: the "
                        "trace's own fault order, REAP-style; with today's scheduler a random "
                        "trace pushes one page a batch, so use sequential for --synthetic-order "
                        "random)")  # fmt: skip
    p.set_defaults(handler=run)
