"""``fakekvm explore``: run one fake migration under many scheduler seeds; keep the failures.

    fakekvm explore --seeds 1-500 --mechanism uffd-missing --mem 8M --vcpus 2 \\
                    [--inject eagain=2,remove_before_fault=1] [--loss 0.01] -o explore-out/

Each seed is a deterministic run (`postcopy.detmigrate`: one thread at a time, virtual time, a
simulated network, the fake's userfaultfd injection knobs armed on the destination). A failing
seed gets a trace, ``OUT/seed-N.trace``, recorded from a rerun of that seed; ``fakekvm replay
--check-determinism OUT/seed-N.trace`` reproduces the failure. Exit status 1 when a seed failed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _inject(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        out[name.strip()] = int(value or 1)
    return out


def add_parser(sub: Any) -> None:
    from postcopy.mechanisms import MECHANISMS
    from tools.migrate import parse_size

    p = sub.add_parser("explore", help="run a fake migration under many scheduler seeds",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seeds", default="1-20", help="e.g. 1-500 or 1,5,9-12")
    p.add_argument("--mechanism", choices=MECHANISMS, default="uffd-missing")
    p.add_argument("--profile", help="fake profile (default: the mechanism's)")
    p.add_argument("--mem", type=parse_size, default=parse_size("8M"))
    p.add_argument("--vcpus", type=int, default=2)
    p.add_argument("--workload", default="random")
    p.add_argument("--fault-threads", type=int, default=1)
    p.add_argument("--inject", type=_inject, default={},
                   help="userfaultfd injection knobs: eagain=N,eexist_race=N,remove_before_fault=N")  # fmt: skip
    p.add_argument("--latency-us", type=float, default=50.0)
    p.add_argument("--bandwidth", type=float, default=1.25e9, help="bytes per second")
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("-o", "--output", default="explore-out", help="where failing seeds' traces go")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from postcopy.detmigrate import NetOptions
    from postcopy.migrate import MigrateOptions
    from replay.det import DetConfig, explore_seeds, parse_seeds
    from tools.migrate import DEFAULT_FAKE_PROFILE

    o = MigrateOptions(kernel="fake", profile=args.profile or DEFAULT_FAKE_PROFILE[args.mechanism],
                       mechanism=args.mechanism, mem_size=args.mem, vcpus=args.vcpus,
                       workload=args.workload, fault_threads=args.fault_threads)  # fmt: skip
    net = NetOptions(
        latency_ns=int(args.latency_us * 1000), bandwidth_Bps=args.bandwidth, loss=args.loss
    )
    seeds = parse_seeds(args.seeds)
    base = DetConfig(o, seeds[0] if seeds else 0, net, args.inject)
    failed = 0
    for e in explore_seeds(base, seeds, args.output, argv=["fakekvm", "explore", *sys.argv[2:]]):
        if e.outcome.failure is None:
            print(f"seed {e.seed}: ok {e.outcome.line()}")
        else:
            failed += 1
            note = "" if e.recorded_same else " (the recorded rerun interleaved differently)"
            print(f"seed {e.seed}: FAILED {e.outcome.failure}\n  trace: {e.trace}{note}")
    print(f"{len(seeds) - failed} of {len(seeds)} seeds passed")
    return 1 if failed else 0
