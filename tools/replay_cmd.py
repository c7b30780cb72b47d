"""``fakekvm replay --mode serve|verify|workload TRACE``.

* ``serve``: run the VMM code again against a :class:`~replay.serve.ReplayKernel` that
  answers from the trace alone (no KVM, no fake). A ``fakekvm migrate`` recording runs the
  recorded destination engine on it, with the source rebuilt on the fake
  (:mod:`replay.serve_migrate`); a `GuestVM` run of a guest image that takes no parameters
  (``header.guest`` = ``hello``) runs that VMM again (memory size and vCPU count read back
  from the trace). Exit status 0 when the run matched the trace to the end, 1 on a
  divergence (the decoded report is printed), 2 when the trace cannot be read or served.
* ``verify``: run the recorded ``fakekvm migrate`` command again on the fake, recorded, and
  compare the two recordings' canonical streams (:mod:`replay.verify`). Exit status 0 when they
  agree, 1 on a divergence (both sides decoded), 2 when the trace cannot be read or replayed.
* ``workload``: migrate on the fake again with the recorded guest behaviour as the workload:
  trace-driven vCPUs (:mod:`fakekvm.fake.kvm.scripted`) touch the recorded fault pages in the
  recorded order (with the recorded think time unless ``--no-think``) and make the recorded
  exits; prints the recorded and the replayed figures side by side (:mod:`replay.workload`).
"""

from __future__ import annotations

import argparse
import struct
import sys
from typing import Any

MODES = ("verify", "serve", "workload")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("replay", help="replay a recorded trace: verify, serve, or workload")
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--check-determinism", action="store_true",
                   help="run the trace's migration deterministically -n times: same digests "
                        "(or the same recorded failure) every time")  # fmt: skip
    p.add_argument("-n", type=int, default=20, help="--check-determinism: how many runs")
    p.add_argument("--seed", type=int, help="--check-determinism: the scheduler seed (default: the trace's)")
    p.add_argument("trace")
    p.add_argument("--window", type=int, default=64,
                   help="serve: how far ahead in a stream a call may match")  # fmt: skip
    p.add_argument("--patience", type=float, default=30.0,
                   help="serve: seconds a call may wait for the live run to catch up with the "
                        "recording before it is reported as a divergence")  # fmt: skip
    p.add_argument("--no-think", action="store_true",
                   help="workload: touch without the recorded think time between faults")  # fmt: skip
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from replay.format import TraceError

    if not args.check_determinism and args.mode is None:
        print("fakekvm replay: give --mode verify|serve|workload or --check-determinism", file=sys.stderr)
        return 2
    try:
        if args.check_determinism:
            return check_determinism(args.trace, args.n, args.seed)
        if args.mode == "verify":
            return verify(args.trace)
        if args.mode == "workload":
            return workload(args.trace, think=not args.no_think)
        return serve(args.trace, window=args.window, patience=args.patience)
    except TraceError as e:
        print(f"fakekvm: bad trace (byte {e.offset}): {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"fakekvm: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


#: guest images that need no parameters: name -> builder
def _image(name: str) -> Any:
    from fakekvm.guests import workloads

    return {"hello": workloads.hello_image}.get(name)


def _serve_migration(header: Any, events: list[Any], *, window: int, patience: float) -> int:
    from replay.serve_migrate import serve_migration
    from replay.verify import VerifyError

    try:
        res = serve_migration(header, events, window=window, patience=patience)
    except VerifyError as e:
        print(f"fakekvm replay --mode serve: {e}", file=sys.stderr)
        return 2
    print(res.report())
    return 0 if res.ok else 1


def serve(path: str, *, window: int = 64, patience: float = 30.0) -> int:
    from fakekvm.abi import kvm
    from fakekvm.guests import GuestError, GuestVM
    from replay.events import Call
    from replay.format import open_trace
    from replay.serve import ReplayDivergence, ReplayKernel

    with open_trace(path) as reader:
        header = reader.header
        events = list(reader)
        if reader.stopped_at:
            print(f"{path}: {reader.stopped_at}", file=sys.stderr)
    if any(a == "migrate" for a in header.argv):
        return _serve_migration(header, events, window=window, patience=patience)
    build = _image(header.guest or "")
    if build is None:
        what = " ".join(header.argv) or f"guest {header.guest!r}"
        print(f"fakekvm replay --mode serve: serving this trace ({what}) is not implemented "
              "yet; supported: `fakekvm migrate` recordings and GuestVM runs of the hello guest",
              file=sys.stderr)  # fmt: skip
        return 2
    calls = [e for e in events if isinstance(e, Call)]
    region = next((c for c in calls if c.name == "KVM_SET_USER_MEMORY_REGION"), None)
    if region is None or len(region.inp) < kvm.kvm_userspace_memory_region_fmt.size:
        print("fakekvm replay --mode serve: the trace sets no memory slot", file=sys.stderr)
        return 2
    mem_size = struct.unpack_from("<Q", region.inp, 16)[0]
    vcpus = sum(1 for c in calls if c.name == "KVM_CREATE_VCPU" and not c.errno)
    rk = ReplayKernel(header, events, window=window, patience=patience)
    try:
        with GuestVM(rk, mem_size, vcpus=vcpus) as vm:
            vm.load(build())
            for v in range(vcpus):
                r = vm.run(v, check=False)
                print(f"vCPU {v}: stop={r.stop} exits={len(r.exits)} reports={r.reports} "
                      f"serial={r.text!r}" + (f" error={r.error}" if r.error else ""))  # fmt: skip
    except ReplayDivergence as e:
        print(str(e))
        return 1
    except GuestError as e:
        print(f"guest error: {e}")
        return 1
    finally:
        rk.shutdown()
    left = rk.unfinished()
    if left:
        print("replay ended with work the recording did left undone:")
        for line in left:
            print(f"  {line}")
        return 1
    print(f"served {rk.matcher.matched} calls from the trace: same as recorded")
    return 0


def verify(path: str) -> int:
    from replay.verify import VerifyError
    from replay.verify import verify as run_verify

    try:
        res = run_verify(path)
    except VerifyError as e:
        print(f"fakekvm replay --mode verify: {e}", file=sys.stderr)
        return 2
    print(res.report())
    return 0 if res.ok else 1


def workload(path: str, *, think: bool = True) -> int:
    from replay.verify import VerifyError
    from replay.workload import run_workload

    try:
        res = run_workload(path, think=think)
    except VerifyError as e:
        print(f"fakekvm replay --mode workload: {e}", file=sys.stderr)
        return 2
    print(res.report())
    return 0


def check_determinism(path: str, n: int, seed: int | None) -> int:
    from replay.det import NotDeterministic, check_trace_determinism

    try:
        outs = check_trace_determinism(path, n, seed=seed)
    except NotDeterministic as e:
        print(f"fakekvm replay --check-determinism: NOT deterministic: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"fakekvm replay --check-determinism: {e}", file=sys.stderr)
        return 2
    print(f"{n} runs, one outcome: {outs[0].line()}")
    return 0
