"""``fakekvm migrate``: run a post-copy migration of a guest and print the summary.

    fakekvm migrate --kernel fake|real --profile P --mechanism M --mem 512M --vcpus 2 \\
        --workload random --seed 7 [--same-process] [--json] [--progress] [--repeat N]
    fakekvm migrate --acceptance [--kernel real] [--repeat 5] [--mem 512M]

Source and destination run in two processes by default (the source is spawned);
``--same-process`` keeps both in one for debugging. The summary has the shapes
people already read: QEMU's ``info migrate`` (times, pages, blocktime, the
24-bucket latency distribution) and the kernel selftest's "Overall demand
paging rate". ``--json`` prints the same figures as JSON. Exit status 0 when
memory and the guest's reports match the source, 1 on a mismatch (naming the
first differing page), 2 when the migration failed.

``--repeat N`` runs N migrations one after the other, prints one line a run and
then the medians, and stops at the first failure with its message.
``--acceptance`` runs issue 5's matrix instead (:mod:`tools.acceptance_postcopy`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from postcopy.destination import MigrationFailed
from postcopy.mechanisms import MECHANISMS
from postcopy.migrate import (
    WORKLOADS,
    MigrateOptions,
    MigrationMismatch,
    MigrationReport,
    migrate,
)

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``65536K`` or bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in _UNITS:
        mult, t = _UNITS[t[-1]], t[:-1]
    try:
        n = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 2G)") from None
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 KiB")
    return n


def add_parser(sub: Any) -> None:
    p = sub.add_parser("migrate", help="post-copy migrate a guest and print the statistics")
    p.add_argument("--kernel", choices=("real", "fake"), default="real")
    p.add_argument(
        "--profile",
        default=None,
        help="FakeKernel profile (with --kernel fake); default: the first that has the "
        f"mechanism ({', '.join(f'{m}: {q}' for m, q in DEFAULT_FAKE_PROFILE.items())})",
    )
    p.add_argument("--mechanism", choices=MECHANISMS, default="uffd-missing")
    p.add_argument("--mem", type=parse_size, default=parse_size("512M"), help="guest memory")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--workload", choices=WORKLOADS, default="random")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--same-process", action="store_true", help="source and destination in one")
    p.add_argument("--huge", action="store_true", help="uffd-minor on 2 MiB hugetlb pages")
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin vCPU, fault and bulk threads to CPUs (and the source's demand thread to "
        "the first one, with vCPU 0 and its fault thread: no cross-CPU wake on a fault)",
    )
    p.add_argument("--fault-threads", type=int, default=1, help="userfaultfd fault threads")
    p.add_argument("--batch-pages", type=int, default=512, help="background batch size")
    p.add_argument(
        "--bulk-nice", type=int, default=0,
        help="lower the background threads' priority: 1..19 nice, 20 SCHED_IDLE (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--demand-rt", action="store_true",
        help="run the fault threads and the source's demand thread SCHED_FIFO (root): "
        "a fault preempts the background push at once (lower p99, slower push)",
    )  # fmt: skip
    p.add_argument(
        "--push-order",
        default="sequential",
        help="background push order: sequential, or trace:PATH (the faults of a recorded "
        "run first, REAP-style)",
    )
    p.add_argument(
        "--balloon-rounds", type=int, default=16,
        help="--workload balloon: inflate/deflate rounds of the balloon storm (default 16)",
    )  # fmt: skip
    p.add_argument(
        "--balloon-pages", type=int, default=32,
        help="--workload balloon: pages inflated a round (default 32)",
    )  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="run N migrations, then the medians")
    p.add_argument(
        "--acceptance", action="store_true",
        help="run issue 5's matrix (uffd-missing, uffd-minor x 1, 2 vCPUs x random, verify; "
        "--repeat times each, default 5) and print a table",
    )  # fmt: skip
    p.add_argument("--address", help="Unix socket path or host:port for the source")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--progress", action="store_true", help="progress bar even when not a TTY")
    p.set_defaults(handler=run)


class _Bar:
    """A one-line progress bar on stderr."""

    def __init__(self) -> None:
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        pct = done * 100 // total if total else 100
        if pct == self.last:
            return
        self.last = pct
        filled = pct * 40 // 100
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (40 - filled)}] {pct:3d}% {done}/{total} pages")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


#: the fake profile a mechanism needs when --profile is not given (this host's answers
#: where the mechanism exists on it; the proposal/fake-type profiles otherwise)
DEFAULT_FAKE_PROFILE = {
    "uffd-missing": "6.18-pvm",
    "uffd-minor": "6.18-pvm",
    "kvm-userfault": "6.18+kvm-userfault",
    "gmem-private": "6.18+fake-cc",
}


def options_from_args(args: argparse.Namespace) -> MigrateOptions:
    """The `MigrateOptions` a parsed ``fakekvm migrate`` command line asks for."""
    profile = args.profile
    if args.kernel == "fake" and profile is None:
        profile = DEFAULT_FAKE_PROFILE[args.mechanism]
    return MigrateOptions(
        kernel=args.kernel,
        profile=profile,
        mechanism=args.mechanism,
        mem_size=args.mem,
        vcpus=args.vcpus,
        workload=args.workload,
        seed=args.seed,
        same_process=args.same_process,
        pin=args.pin,
        source_demand_cpu=0 if args.pin else None,
        batch_pages=args.batch_pages,
        address=args.address,
        huge=args.huge,
        fault_threads=args.fault_threads,
        bulk_nice=args.bulk_nice,
        demand_rt=args.demand_rt,
        push_order=args.push_order,
        balloon_rounds=getattr(args, "balloon_rounds", 16),
        balloon_pages=getattr(args, "balloon_pages", 32),
    )


def run(args: argparse.Namespace) -> int:
    if args.vcpus < 1:
        print("fakekvm migrate: --vcpus must be at least 1", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("fakekvm migrate: --repeat must be at least 1", file=sys.stderr)
        return 2
    if args.acceptance:
        from tools import acceptance_postcopy

        return acceptance_postcopy.main(
            kernel=args.kernel,
            mem_size=args.mem,
            repeat=args.repeat if args.repeat > 1 else 5,
            seed=args.seed,
            pin=args.pin,
            demand_rt=args.demand_rt,
        )
    o = options_from_args(args)
    if args.repeat > 1:
        return run_repeated(o, args.repeat, as_json=args.json)
    bar = _Bar() if (args.progress or sys.stderr.isatty()) else None
    code, report, _ = run_once(o, progress=bar)
    if report is None:
        return code
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(report.summary())
    return 0


def run_once(o: MigrateOptions, progress: Any = None) -> tuple[int, MigrationReport | None, str]:
    """One migration: (exit code, report or None, failure message)."""
    try:
        return 0, migrate(o, progress=progress), ""
    except MigrationMismatch as e:
        msg = f"MISMATCH: {e}"
        code = 1
    except (MigrationFailed, OSError, RuntimeError, ValueError) as e:
        msg = f"failed: {e}"
        code = 2
    print(f"fakekvm migrate: {msg}", file=sys.stderr)
    return code, None, msg


#: the figures a repeated run prints, in order: (JSON key, column title, scale, format)
FIGURES = (
    ("total-time-ns", "total ms", 1e-6, "{:.0f}"),
    ("downtime-ns", "down ms", 1e-6, "{:.1f}"),
    ("faults", "faults", 1, "{:.0f}"),
    ("latency-p50-ns", "p50 us", 1e-3, "{:.0f}"),
    ("latency-p99-ns", "p99 us", 1e-3, "{:.0f}"),
    ("background-rate-pps", "bg kpg/s", 1e-3, "{:.0f}"),
    ("pages-demand", "demand pg", 1, "{:.0f}"),
)


def figures(d: dict[str, Any]) -> list[float]:
    return [float(d[key]) * scale for key, _, scale, _ in FIGURES]


def format_row(values: list[float]) -> str:
    return "  ".join(
        f"{fmt.format(v):>9}" for v, (_, _, _, fmt) in zip(values, FIGURES, strict=True)
    )


def medians(rows: list[list[float]]) -> list[float]:
    return [statistics.median(col) for col in zip(*rows, strict=True)]


def run_repeated(o: MigrateOptions, n: int, *, as_json: bool = False) -> int:
    """``--repeat N``: N migrations, one line each, then the medians; stops at the first
    failure (its exit code and message)."""
    head = "  ".join(f"{title:>9}" for _, title, _, _ in FIGURES)
    if not as_json:
        print(f"fakekvm migrate: kernel={o.kernel} mechanism={o.mechanism} "
              f"mem={o.mem_size >> 20}M vcpus={o.vcpus} workload={o.workload}, {n} runs")  # fmt: skip
        print(f"{'run':>5}  {head}")
    rows: list[list[float]] = []
    runs: list[dict[str, Any]] = []
    for i in range(n):
        code, report, msg = run_once(o)
        if report is None:
            print(f"run {i + 1}/{n} {msg}")
            return code
        d = report.as_dict()
        runs.append(d)
        rows.append(figures(d))
        if not as_json:
            print(f"{i + 1:>5}  {format_row(rows[-1])}", flush=True)
    med = medians(rows)
    if as_json:
        keys = [key for key, _, _, _ in FIGURES]
        out = {"runs": runs, "median": dict(zip(keys, med, strict=True))}
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"{'med':>5}  {format_row(med)}")
        print(f"{n} runs, memory verified in each")
    return 0
