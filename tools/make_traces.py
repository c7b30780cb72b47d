"""(Re)make the shipped traces in ``traces/``: ``python -m tools.make_traces [--real] [--fake]``.

Each entry of `TRACES` is one ``fakekvm migrate`` command. The real-kernel ones are recorded
with `replay.capture` on a host whose ``/dev/kvm`` answers (this project's lab host, kvm-pvm):
destination ``NAME.trace`` and source ``NAME.trace.source``. The fake ones are *synthetic*:
recorded deterministically (`record_deterministic`: the seeded scheduler, virtual time, and a
slow simulated link, `SLOW`), so the guest really faults on pages still on their way -- a
real-time fake run may deliver everything in the background before a vCPU touches a page --
and the trace's header carries the configuration (``extra["deterministic"]``) that
``fakekvm replay --check-determinism`` re-runs; they have no source side. Sizes are small (8 to
16 MiB guests, under 40 KiB a trace) so the repository stays small and CI can replay every one
in ``verify`` mode and check its determinism. ``traces/README.md`` is rewritten with the
command, the host, the size, the fault count and the REMOVE count of each trace.

Re-make them when the engine's kernel calls change on purpose: ``replay --mode verify`` compares
a new engine against exactly these recordings, so an intended change shows up as divergences
until the traces are recorded again (which the commit then shows).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRACES_DIR = Path(__file__).resolve().parent.parent / "traces"


@dataclass(frozen=True)
class TraceSpec:
    name: str
    kernel: str  # "real" or "fake"
    args: tuple[str, ...]
    note: str
    #: fake traces: the deterministic scheduler's seed (None: a real-time capture)
    det_seed: int | None = None

    def command(self) -> list[str]:
        return ["fakekvm", "migrate", "--kernel", self.kernel, *self.args]


def _m(mech: str, mem: str, vcpus: int, workload: str, seed: int = 7) -> tuple[str, ...]:
    return ("--mechanism", mech, "--mem", mem, "--vcpus", str(vcpus), "--workload", workload,
            "--seed", str(seed))  # fmt: skip


TRACES: tuple[TraceSpec, ...] = (
    TraceSpec("real-uffd-missing-1vcpu-random", "real", _m("uffd-missing", "16M", 1, "random"),
              "userfaultfd MISSING + UFFDIO_COPY, random touches"),
    TraceSpec("real-uffd-missing-2vcpu-verify", "real", _m("uffd-missing", "16M", 2, "verify"),
              "two vCPUs checksum all memory through the guest's verifier"),
    TraceSpec("real-uffd-minor-1vcpu-sequential", "real", _m("uffd-minor", "16M", 1, "sequential"),
              "userfaultfd MINOR on a memfd mapped twice + UFFDIO_CONTINUE"),
    TraceSpec("real-uffd-minor-2vcpu-hotset", "real", _m("uffd-minor", "16M", 2, "hotset"),
              "two vCPUs re-touching a hot set"),
    TraceSpec("real-uffd-missing-1vcpu-balloon", "real", _m("uffd-missing", "16M", 1, "balloon"),
              "balloon storm on the real kernel: REMOVE events, EAGAIN from COPY while one is "
              "unread, refaults of ballooned pages"),
    TraceSpec("fake-kvm-userfault-2vcpu-random", "fake", _m("kvm-userfault", "8M", 2, "random"),
              "KVM Userfault (not upstream) on the fake profile 6.18+kvm-userfault; "
              "USERFAULT exits on the vCPU threads", det_seed=1),
    TraceSpec("fake-gmem-private-1vcpu-sequential", "fake", _m("gmem-private", "8M", 1, "sequential"),
              "guest_memfd private memory, shared->private conversion faults (6.18+fake-cc)",
              det_seed=1),
    TraceSpec("fake-uffd-missing-2vcpu-idle", "fake", _m("uffd-missing", "8M", 2, "idle"),
              "an idle guest: everything arrives in the background; NO faults by design "
              "(the vCPUs never run)", det_seed=1),
    TraceSpec("fake-uffd-missing-2vcpu-hotset", "fake", _m("uffd-missing", "8M", 2, "hotset"),
              "two vCPUs re-touching a hot set: repeat faults on pages still in flight", det_seed=1),
    TraceSpec("fake-uffd-missing-1vcpu-balloon", "fake", _m("uffd-missing", "8M", 1, "balloon"),
              "balloon storm (postcopy.balloon): 16 rounds of madvise(DONTNEED) -> "
              "UFFD_EVENT_REMOVE, refaults answered by UFFDIO_ZEROPAGE or a fetch, COPYs failing "
              "EAGAIN while a REMOVE is unread", det_seed=1),
    TraceSpec("fake-uffd-missing-2vcpu-balloon", "fake", _m("uffd-missing", "8M", 2, "balloon"),
              "the same storm beside two vCPUs faulting on their hot sets", det_seed=2),
    TraceSpec("fake-uffd-minor-1vcpu-balloon", "fake", _m("uffd-minor", "8M", 1, "balloon"),
              "the storm on memfd memory: MADV_REMOVE punches page-cache pages, a CONTINUE over "
              "one fails EFAULT and the engine refills the hole (fallocate) first", det_seed=1),
)  # fmt: skip

#: the simulated link of the deterministic traces: 200 us one way, 200 MB/s -- slow enough
#: that a vCPU's first touches find pages missing whatever the host's speed
SLOW = {"latency_ns": 200_000, "bandwidth_Bps": 200e6}


def record_deterministic(path: Path, spec: TraceSpec) -> Any:
    """`replay.det.record_deterministic` with the trace's own command line in the header (so
    ``replay --mode verify`` re-runs exactly that command) and the `SLOW` link."""
    from postcopy.detmigrate import NetOptions, migrate_deterministic
    from replay.det import DetConfig, options_from_command
    from replay.format import TraceWriter
    from replay.recorder import RecordingKernel, make_header

    assert spec.det_seed is not None
    o = options_from_command(spec.command())
    c = DetConfig(o, spec.det_seed, NetOptions(**SLOW))  # type: ignore[arg-type]
    for stale in (path, path.with_suffix(".trace.source")):
        stale.unlink(missing_ok=True)

    def record(k: Any) -> Any:
        h = make_header(k, role="destination", argv=spec.command(), mechanism=o.mechanism,
                        guest=o.workload, seed=o.seed, profile=o.profile, doctor=False)  # fmt: skip
        h.extra["deterministic"] = c.as_extra()
        return RecordingKernel(k, TraceWriter(str(path), h), mechanism=o.mechanism)

    return migrate_deterministic(o, c.seed, net=c.net, record=record)


def trace_counts(path: Path | str) -> tuple[int, int, int]:
    """(calls, faults, REMOVE events read by the engine) of a trace."""
    from fakekvm.abi import uffd
    from replay.events import Call, Fault
    from replay.format import open_trace

    calls = faults = removes = 0
    with open_trace(path) as r:
        for ev in r:
            if isinstance(ev, Fault):
                faults += 1
            elif isinstance(ev, Call):
                calls += 1
                if ev.op == "read" and ev.fd_kind == "userfaultfd" and ev.out:
                    removes += sum(
                        1 for off in range(0, len(ev.out), uffd.UFFD_MSG_SIZE)
                        if ev.out[off] == uffd.UFFD_EVENT_REMOVE
                    )  # fmt: skip
    return calls, faults, removes


def make(spec: TraceSpec, out_dir: Path = TRACES_DIR) -> Path:
    from replay.capture import capture

    path = out_dir / f"{spec.name}.trace"
    if spec.det_seed is not None:
        record_deterministic(path, spec)
        return path
    res = capture(str(path), spec.command())
    if res.returncode != 0:
        raise RuntimeError(f"{spec.name}: `{' '.join(spec.command())}` exited {res.returncode}")
    return path


def write_readme(out_dir: Path = TRACES_DIR) -> None:
    from replay.format import open_trace

    lines = [
        "# Shipped traces",
        "",
        "Made by `python -m tools.make_traces` (see that module); each trace `NAME.trace` is the",
        "destination's recording and, for the real-kernel ones, `NAME.trace.source` the source's.",
        "CI replays every one with `fakekvm replay --mode verify` and checks its determinism",
        "(`tests/replay/test_shipped_traces.py`, which also checks the fault and REMOVE counts).",
        "",
        "How they were made:",
        "- **real**: `fakekvm capture -o NAME.trace -- COMMAND` on this project's lab host (kvm-pvm),",
        "  in real time: source and destination in two processes, over a Unix socket.",
        "- **fake (synthetic)**: COMMAND run by `postcopy.detmigrate.migrate_deterministic` under the",
        "  seeded scheduler (seed in the `det seed` column) on virtual time, over a simulated link",
        f"  ({SLOW['latency_ns'] // 1000} us latency, {SLOW['bandwidth_Bps'] / 1e6:.0f} MB/s) so that the guest faults on pages still",
        '  in flight; the header keeps that configuration (`extra["deterministic"]`), so',
        "  `fakekvm replay --check-determinism -n 20 NAME.trace` re-runs exactly it; destination only.",
        "- **balloon**: `--workload balloon` (`postcopy/balloon.py`): hot-set guests, and a balloon",
        "  device that inflates (`madvise(MADV_DONTNEED)` -> `UFFD_EVENT_REMOVE`) and deflates",
        "  (the pages are touched again) 16 times, 32 pages a round, over the pages the guest",
        "  never touches; the final memory check excludes the ballooned pages and counts them.",
        "  Their `verify` re-runs are real-time fake migrations: the engine yields to a REMOVE's",
        "  raiser between EAGAIN retries (it must end `mmap_changing` first).",
        "",
        "Faults = `Fault` records in the trace (guest or host accesses that waited for the",
        "engine); REMOVE = `UFFD_EVENT_REMOVE` messages the engine read from its userfaultfd.",
        "",
        "| trace | kernel | det seed | host | command | what it shows | bytes | faults | REMOVE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in TRACES:
        p = out_dir / f"{spec.name}.trace"
        if not p.exists():
            continue
        with open_trace(p) as r:
            h = r.header
        host = f"{h.host.kernel_release} ({h.created[:10]})"
        size = p.stat().st_size + (p.with_suffix(".trace.source").stat().st_size
                                   if p.with_suffix(".trace.source").exists() else 0)  # fmt: skip
        _, faults, removes = trace_counts(p)
        det = "" if spec.det_seed is None else str(spec.det_seed)
        lines.append(f"| `{spec.name}` | {spec.kernel} | {det} | {host} | `{' '.join(spec.command())}` "
                     f"| {spec.note} | {size} | {faults} | {removes} |")  # fmt: skip
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="only the real-kernel traces")
    ap.add_argument("--fake", action="store_true", help="only the fake-kernel traces")
    ap.add_argument("--only", help="comma-separated trace names")
    args = ap.parse_args(argv)
    kinds = {k for k, on in (("real", args.real), ("fake", args.fake)) if on} or {"real", "fake"}
    only = set(args.only.split(",")) if args.only else None
    TRACES_DIR.mkdir(exist_ok=True)
    if "real" in kinds:
        from fakekvm.kernel.real import kvm_available

        ok, why = kvm_available()
        if not ok:
            print(f"make_traces: skipping the real-kernel traces: {why}", file=sys.stderr)
            kinds.discard("real")
    for spec in TRACES:
        if spec.kernel in kinds and (only is None or spec.name in only):
            p = make(spec)
            print(f"{p.name}: {os.path.getsize(p)} bytes", file=sys.stderr)
    write_readme()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
