"""``fakekvm migrate``: run a post-copy migration of a guest and print the summary.

    fakekvm migrate --kernel fake|real --profile P --mechanism M --mem 512M --vcpus 2 \\
        --workload random --seed 7 [--same-process] [--json] [--progress]

Source and destination run in two processes by default (the source is spawned);
``--same-process`` keeps both in one for debugging. The summary has the shapes
people already read: QEMU's ``info migrate`` (times, pages, blocktime, the
24-bucket latency distribution) and the kernel selftest's "Overall demand
paging rate". ``--json`` prints the same figures as JSON. Exit status 0 when
memory and the guest's reports match the source, 1 on a mismatch (naming the
first differing page), 2 when the migration failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from postcopy.destination import MigrationFailed
from postcopy.mechanisms import MECHANISMS
from postcopy.migrate import WORKLOADS, MigrateOptions, MigrationMismatch, migrate

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
    p.add_argument("--pin", action="store_true", help="pin vCPU, fault and bulk threads to CPUs")
    p.add_argument("--fault-threads", type=int, default=1, help="userfaultfd fault threads")
    p.add_argument("--batch-pages", type=int, default=256, help="background batch size")
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


def run(args: argparse.Namespace) -> int:
    if args.vcpus < 1:
        print("fakekvm migrate: --vcpus must be at least 1", file=sys.stderr)
        return 2
    profile = args.profile
    if args.kernel == "fake" and profile is None:
        profile = DEFAULT_FAKE_PROFILE[args.mechanism]
    o = MigrateOptions(
        kernel=args.kernel,
        profile=profile,
        mechanism=args.mechanism,
        mem_size=args.mem,
        vcpus=args.vcpus,
        workload=args.workload,
        seed=args.seed,
        same_process=args.same_process,
        pin=args.pin,
        batch_pages=args.batch_pages,
        address=args.address,
        huge=args.huge,
        fault_threads=args.fault_threads,
    )
    bar = _Bar() if (args.progress or sys.stderr.isatty()) else None
    try:
        report = migrate(o, progress=bar)
    except MigrationMismatch as e:
        print(f"fakekvm migrate: MISMATCH: {e}", file=sys.stderr)
        return 1
    except (MigrationFailed, OSError, RuntimeError, ValueError) as e:
        print(f"fakekvm migrate: failed: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(report.summary())
    return 0
