"""(Re)make the shipped traces in ``traces/``: ``python -m tools.make_traces [--real] [--fake]``.

Each entry of `TRACES` is one ``fakekvm migrate`` command recorded with `replay.capture`: the
real-kernel ones on a host whose ``/dev/kvm`` answers (this project's lab host, kvm-pvm), the
fake ones anywhere. Sizes are small (8 to 16 MiB guests, 10 to 40 KiB a trace) so the repository stays
small and CI can replay every one in ``verify`` mode. ``traces/README.md`` is rewritten with the
command, the host and the size of each trace.

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

TRACES_DIR = Path(__file__).resolve().parent.parent / "traces"


@dataclass(frozen=True)
class TraceSpec:
    name: str
    kernel: str  # "real" or "fake"
    args: tuple[str, ...]
    note: str

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
    TraceSpec("fake-kvm-userfault-2vcpu-random", "fake", _m("kvm-userfault", "8M", 2, "random"),
              "KVM Userfault (not upstream) on the fake profile 6.18+kvm-userfault"),
    TraceSpec("fake-gmem-private-1vcpu-sequential", "fake", _m("gmem-private", "8M", 1, "sequential"),
              "guest_memfd private memory, shared->private conversion faults (6.18+fake-cc)"),
    TraceSpec("fake-uffd-missing-2vcpu-idle", "fake", _m("uffd-missing", "8M", 2, "idle"),
              "an idle guest: everything arrives in the background"),
)  # fmt: skip


def make(spec: TraceSpec, out_dir: Path = TRACES_DIR) -> Path:
    from replay.capture import capture

    path = out_dir / f"{spec.name}.trace"
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
        "destination's recording and `NAME.trace.source` the source's. CI replays every one with",
        "`fakekvm replay --mode verify` (`tests/replay/test_shipped_traces.py`).",
        "",
        "| trace | kernel | host | command | what it shows | bytes |",
        "|---|---|---|---|---|---|",
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
        lines.append(f"| `{spec.name}` | {spec.kernel} | {host} | `{' '.join(spec.command())}` "
                     f"| {spec.note} | {size} |")  # fmt: skip
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
