"""Issue 5's acceptance matrix for ``fakekvm migrate``, with the speed targets.

    fakekvm migrate --acceptance [--kernel real] [--repeat 5] [--mem 512M]
    python -m tools.acceptance_postcopy [--kernel real] [--repeat 5] [--mem 512M]

Runs ``uffd-missing`` and ``uffd-minor`` x 1 and 2 vCPUs x the ``random`` and
``verify`` workloads, ``--repeat`` times each (5 by default), every run a
two-process migration whose memory and guest reports are verified
(:func:`postcopy.migrate.migrate`). A cell stops at its first failure. Then one
``idle`` run set per mechanism gives the background-only figures. Prints one
row per cell (medians) and the verdict on issue 5's "Done when":

* every run of the matrix passed (memory verified, guest reports as predicted);
* the speed targets, checked on the medians and reported, not failed on (the
  figures depend on the machine's load): demand-fault latency p50 < 100 us and
  p99 < 1 ms (uffd-missing, 1 vCPU, random), background push >= 400 k pages/s
  and total time < 300 ms (uffd-missing, idle).

Exit status 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from postcopy.migrate import MigrateOptions
from tools.migrate import FIGURES, figures, format_row, medians, run_once

MECHANISMS = ("uffd-missing", "uffd-minor")
VCPUS = (1, 2)
WORKLOADS = ("random", "verify")


@dataclass
class Cell:
    mechanism: str
    vcpus: int
    workload: str
    runs: list[list[float]] = field(default_factory=list)
    failure: str = ""

    @property
    def passed(self) -> bool:
        return not self.failure

    def median(self, key: str) -> float:
        i = [k for k, _, _, _ in FIGURES].index(key)
        return medians(self.runs)[i] if self.runs else float("nan")


@dataclass(frozen=True)
class Target:
    what: str
    mechanism: str
    workload: str
    key: str
    limit: float
    below: bool  # the figure must be below the limit (else at least the limit)

    def met(self, value: float) -> bool:
        return value < self.limit if self.below else value >= self.limit


TARGETS = (
    Target(
        "demand-fault latency p50 < 100 us", "uffd-missing", "random", "latency-p50-ns", 100, True
    ),
    Target(
        "demand-fault latency p99 < 1 ms", "uffd-missing", "random", "latency-p99-ns", 1000, True
    ),
    Target(
        "background push >= 400 k pages/s",
        "uffd-missing",
        "idle",
        "background-rate-pps",
        400,
        False,
    ),
    Target("idle guest total time < 300 ms", "uffd-missing", "idle", "total-time-ns", 300, True),
)


def run_cell(
    cell: Cell,
    base: MigrateOptions,
    repeat: int,
    log: Callable[[str], None],
) -> Cell:
    for i in range(repeat):
        o = MigrateOptions(**{**vars(base), "mechanism": cell.mechanism, "vcpus": cell.vcpus,
                              "workload": cell.workload})  # fmt: skip
        _code, report, msg = run_once(o)
        if report is None:
            cell.failure = f"run {i + 1}: {msg}"
            log(f"  {cell.mechanism} {cell.vcpus} vCPU {cell.workload}: {cell.failure}")
            return cell
        cell.runs.append(figures(report.as_dict()))
        log(f"  {cell.mechanism} {cell.vcpus} vCPU {cell.workload} run {i + 1}/{repeat}: "
            f"{format_row(cell.runs[-1])}")  # fmt: skip
    return cell


def table(cells: Sequence[Cell]) -> str:
    head = "  ".join(f"{title:>9}" for _, title, _, _ in FIGURES)
    lines = [f"{'mechanism':<13} {'vcpus':>5} {'workload':<8} {'runs':>5} {'verdict':<6}  {head}"]
    for c in cells:
        row = format_row(medians(c.runs)) if c.runs else ""
        verdict = "pass" if c.passed else "FAIL"
        lines.append(
            f"{c.mechanism:<13} {c.vcpus:>5} {c.workload:<8} {len(c.runs):>5} {verdict:<6}  {row}"
        )
    return "\n".join(lines)


def main(
    *,
    kernel: str = "real",
    mem_size: int = 512 << 20,
    repeat: int = 5,
    seed: int = 7,
    log: Callable[[str], None] | None = None,
    mechanisms: Sequence[str] = MECHANISMS,
    vcpus: Sequence[int] = VCPUS,
    workloads: Sequence[str] = WORKLOADS,
    pin: bool = False,
    demand_rt: bool = False,
) -> int:
    """Run the matrix and print the table; 0 when every run passed. ``pin`` and
    ``demand_rt`` are `fakekvm migrate`'s ``--pin`` and ``--demand-rt`` for every run."""
    out = log or (lambda s: print(s, file=sys.stderr, flush=True))
    base = MigrateOptions(kernel=kernel, mem_size=mem_size, seed=seed, pin=pin,
                          source_demand_cpu=0 if pin else None, demand_rt=demand_rt)  # fmt: skip
    cells = [Cell(m, v, w) for m in mechanisms for v in vcpus for w in workloads]
    cells += [Cell(m, 1, "idle") for m in mechanisms]
    flags = "".join(f" {f}" for f, on in (("--pin", pin), ("--demand-rt", demand_rt)) if on)
    out(f"issue 5 acceptance{flags}: kernel={kernel} mem={mem_size >> 20}M, {repeat} runs a cell, "
        f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for c in cells:
        run_cell(c, base, repeat, out)
    print(table(cells))
    print()
    for t in TARGETS:
        cell = next((c for c in cells if (c.mechanism, c.vcpus, c.workload) ==
                     (t.mechanism, 1, t.workload)), None)  # fmt: skip
        if cell is None or not cell.runs:
            print(f"target  {t.what}: not measured")
            continue
        i = [k for k, _, _, _ in FIGURES].index(t.key)
        scale_title = FIGURES[i][1]
        v = cell.median(t.key)
        print(f"target  {t.what}: {'met' if t.met(v) else 'MISSED'} "
              f"(median {v:.0f} {scale_title.split()[-1]}, {t.mechanism} {t.workload})")  # fmt: skip
    ok = all(c.passed for c in cells)
    failed = [c for c in cells if not c.passed]
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print("ACCEPTANCE: PASS (every run verified)" if ok else
          f"ACCEPTANCE: FAIL ({len(failed)} cells failed: " +
          "; ".join(f"{c.mechanism} {c.vcpus} vCPU {c.workload}: {c.failure}" for c in failed) + ")")  # fmt: skip
    return 0 if ok else 1


def _cli(argv: Sequence[str] | None = None) -> int:
    from tools.migrate import parse_size

    p = argparse.ArgumentParser(prog="acceptance_postcopy", description=__doc__.split("\n")[0])
    p.add_argument("--kernel", choices=("real", "fake"), default="real")
    p.add_argument("--mem", type=parse_size, default=parse_size("512M"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    return main(kernel=a.kernel, mem_size=a.mem, repeat=a.repeat, seed=a.seed)


if __name__ == "__main__":
    sys.exit(_cli())
