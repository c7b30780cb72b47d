"""Turn a recording into per-vCPU scripts for the trace-driven vCPU (``replay --mode workload``).

A recorded run's guest behaviour, as far as post-copy cares, is: which pages each vCPU touched
for the first time and in what order (the trace's `Fault`s, each with its vCPU and gpa), how
long it ran between two of them, and the exits it made to userspace (the ``KVM_RUN`` calls'
``kvm_run`` bytes: port I/O reports, HLT, ...). `scripts_from_events` rebuilds exactly that as
`fakekvm.fake.kvm.scripted` steps:

* a fault observed during a vCPU's ``KVM_RUN`` (``t_ns <= observed_ns <= t_ns + dur_ns``) is a
  `Touch` placed before that run's exit; its think time is the time from the later of the run's
  entry and the previous fault's resolution to this fault's observation (the vCPU was running);
* a ``KVM_RUN`` that returned an exit the guest made (IO, MMIO, HLT, SHUTDOWN) becomes that exit;
  ``KVM_EXIT_MEMORY_FAULT`` and ``EINTR`` returns are the environment's, not the guest's: the
  scripted vCPU takes them again by itself (its touch meets the same userfault bit or
  private/shared mismatch) or not at all.

Faults with no vCPU (host accesses) or no gpa are left out and counted in `ScriptInfo`.

Two ways to run the scripts through the engine on the fake:

* `run_workload`: the recorded ``fakekvm migrate`` command again, its destination's vCPUs
  scripted; the source re-runs the recorded guest program to build the same memory;
* `replay.workload_engine.run_engine_workload`: the engine against a memory image, no guest
  (issue 6's 262,144-fault benchmark); `run_workload` sends synthetic traces there (they have
  no recorded guest to re-run).
"""

from __future__ import annotations

import bisect
import errno as E
import functools
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from typing import TYPE_CHECKING, Any

from fakekvm.abi import kvm as K
from fakekvm.fake.cpu.exits import HltExit, IoExit, MmioExit, ShutdownExit
from fakekvm.fake.kvm.scripted import Step, Touch
from replay.events import Call, Event, Fault

if TYPE_CHECKING:
    from replay.workload_engine import EngineRun

_EXIT_OFF = 32
_WRITES = frozenset({"write", "wp"})
_OBSERVED = operator.attrgetter("observed_ns")
_GPA = operator.attrgetter("gpa")


@dataclass
class ScriptInfo:
    """What went into the scripts, and what was left out."""

    touches: dict[int, int] = field(default_factory=dict)  #: vCPU -> touches
    exits: dict[int, int] = field(default_factory=dict)  #: vCPU -> guest exits
    skipped_faults: int = 0  #: no vCPU or no gpa (host accesses), or outside every run
    skipped_exits: int = 0  #: environment exits (MEMORY_FAULT, EINTR) and undecodable ones


def decode_exit(out: bytes) -> IoExit | MmioExit | HltExit | ShutdownExit | None:
    """The guest exit a recorded ``KVM_RUN`` returned (recorder layout: kvm_run head + PIO data)."""
    if len(out) < _EXIT_OFF + 24:
        return None
    reason = int.from_bytes(out[8:12], "little")
    if reason == K.KVM_EXIT_IO:
        direction, size, port, count, _data_offset = K.kvm_run_io_fmt.unpack_from(out, _EXIT_OFF)
        n = size * count
        head = 0x120
        data = out[head : head + n] if len(out) >= head + n else bytes(n)
        return IoExit(direction, size, port, count, bytes(data))
    if reason == K.KVM_EXIT_MMIO:
        gpa, data, length, is_write = K.kvm_run_mmio_fmt.unpack_from(out, _EXIT_OFF)
        return MmioExit(gpa, length, bool(is_write), bytes(data[:length]) if is_write else b"")
    if reason == K.KVM_EXIT_HLT:
        return HltExit()
    if reason == K.KVM_EXIT_SHUTDOWN:
        return ShutdownExit()
    return None


def scripts_from_events(events: Iterable[Event]) -> tuple[dict[int, list[Step]], ScriptInfo]:
    """Per-vCPU scripts (see the module docstring) and a `ScriptInfo`."""
    runs: dict[int, list[Call]] = {}
    faults: dict[int, list[Fault]] = {}
    info = ScriptInfo()
    skipped = 0
    ev: Any
    for ev in events:  # no allocation per event (a `setdefault(k, [])` makes a list each time)
        t = type(ev)
        if t is Fault:
            v = ev.vcpu
            if v < 0 or ev.gpa < 0:
                skipped += 1
                continue
            lst = faults.get(v)
            if lst is None:
                lst = faults[v] = []
            lst.append(ev)
        elif t is Call and ev.name == "KVM_RUN" and ev.vcpu >= 0:
            runs.setdefault(ev.vcpu, []).append(ev)
    info.skipped_faults += skipped
    scripts: dict[int, list[Step]] = {}
    for vcpu in sorted(set(runs) | set(faults)):
        script = scripts[vcpu] = []
        vruns = runs.get(vcpu, [])
        vfaults = sorted(faults.get(vcpu, []), key=_OBSERVED)
        ends = [r.t_ns + r.dur_ns for r in vruns]
        # the run each fault happened in: the first run that ended at or after its observation
        # (faults are in observation order, so each run's faults are one slice of them); the
        # per-fault work is done by C loops (map, accumulate): a 1 GiB trace has 262,144
        obs = list(map(_OBSERVED, vfaults))
        runs_of = list(map(functools.partial(bisect.bisect_left, ends), obs))
        placed = bisect.bisect_left(runs_of, len(vruns))
        info.skipped_faults += len(vfaults) - placed
        n_touch = n_exit = 0
        j = 0
        for i, r in enumerate(vruns):
            k = bisect.bisect_right(runs_of, i, j, placed)
            if k > j:
                fs = vfaults[j:k]
                done = [f.resolved_ns or f.observed_ns for f in fs]
                # think: from the later of the run's entry and the previous faults' resolution
                marks = accumulate(done[:-1], max, initial=r.t_ns)
                thinks = map(max, repeat(0), map(operator.sub, obs[j:k], marks))
                writes = [f.access in _WRITES for f in fs]
                gpas = map(_GPA, fs)
                script.extend(map(Touch, gpas, writes, repeat(False), thinks))
                n_touch += k - j
                j = k
            if r.errno in (E.EFAULT, E.EINTR):
                info.skipped_exits += 1
                continue
            ex = decode_exit(r.out) if r.errno == 0 else None
            if ex is None:
                info.skipped_exits += 1
                continue
            script.append(ex)
            n_exit += 1
        info.touches[vcpu] = n_touch
        info.exits[vcpu] = n_exit
    return scripts, info


# -- running a recording as the workload of a new migration (``replay --mode workload``) --------


@dataclass
class WorkloadRun:
    """The recorded run's figures next to the replayed one's."""

    command: list[str]
    info: ScriptInfo
    recorded: dict[str, float]
    replayed: dict[str, float]
    scripted: dict[int, tuple[int, int, int]] = field(
        default_factory=dict
    )  #: vCPU -> touches, exits, memory faults

    def report(self) -> str:
        rows = [("faults", "faults"), ("latency p50 (µs)", "p50_us"), ("latency p99 (µs)", "p99_us"),
                ("vCPU blocked (ms)", "blocked_ms"), ("total (ms)", "total_ms")]  # fmt: skip
        out = [f"replayed as workload: {' '.join(self.command)}",
               f"{'':20s} {'recorded':>12s} {'replay':>12s}"]  # fmt: skip
        for label, key in rows:
            a, b = self.recorded.get(key), self.replayed.get(key)
            fa = "-" if a is None else f"{a:12.1f}"
            fb = "-" if b is None else f"{b:12.1f}"
            out.append(f"{label:20s} {fa:>12s} {fb:>12s}")
        for vcpu, (t, e, mf) in sorted(self.scripted.items()):
            out.append(
                f"vCPU {vcpu}: {t} recorded touches replayed, {e} exits, {mf} memory-fault exits"
            )
        if self.info.skipped_faults:
            out.append(
                f"{self.info.skipped_faults} recorded faults had no vCPU or gpa (host accesses): not replayed"
            )
        return "\n".join(out)


def run_workload(path: str, *, think: bool = True) -> WorkloadRun | EngineRun:
    """Migrate on the fake again with the recorded guest behaviour as the workload.

    A synthetic trace (`synthetic_trace`, ``header.extra["synthetic"]``) has no guest to
    re-run: it goes to `run_engine_workload` (the source serves an image).

    The destination's vCPUs are `ScriptedCpu` s playing `scripts_from_events` (the recorded
    touches, think time if ``think``, and the recorded exits, so the engine's report checks
    pass); the source is the recorded command's own (the same workload and seed build the same
    memory). Returns both runs' figures: recorded from the trace, replayed from the engine.
    """
    import io
    import json
    from contextlib import redirect_stdout

    from fakekvm.fake.kvm.scripted import ScriptedCpu, scripted_factory
    from postcopy import migrate as pm
    from replay.format import open_trace
    from replay.stats import compute_stats
    from replay.verify import VerifyError, replay_command
    from tools.cli import main

    with open_trace(path) as r:
        header = r.header
        if header.extra.get("synthetic"):  # no recorded guest to re-run: serve an image
            from replay.workload_engine import run_engine_workload

            return run_engine_workload(path, think=think)
        events = list(r)
    scripts, info = scripts_from_events(events)
    if not any(scripts.values()):
        raise VerifyError(f"{path}: no vCPU activity to replay")
    st = compute_stats(header, events)
    recorded = {
        "faults": float(st.faults),
        "p50_us": st.percentile_ns(50) / 1e3,
        "p99_us": st.percentile_ns(99) / 1e3,
        "blocked_ms": sum(st.blocked_ns.values()) / 1e6,
    }
    command = replay_command(header.argv, header.profile if header.kernel != "real" else None)
    cpus: list[ScriptedCpu] = []
    factory = scripted_factory(scripts, think=think)

    def hook(kernel: object, role: str) -> object:
        if role == "destination":

            def make(vm: object, vcpu: object, translate: object) -> ScriptedCpu:
                c = factory(vm, vcpu, translate)  # type: ignore[arg-type]
                cpus.append(c)
                return c

            kernel.vcpu_factory = make  # type: ignore[attr-defined]
        return kernel

    argv = [*command[1:], "--json"]
    buf = io.StringIO()
    pm.KERNEL_HOOKS.append(hook)  # type: ignore[arg-type]
    try:
        with redirect_stdout(buf):
            rc = main(argv)
    finally:
        pm.KERNEL_HOOKS.remove(hook)  # type: ignore[arg-type]
    if rc != 0:
        raise VerifyError(f"the replayed migration failed (exit status {rc}): {' '.join(command)}")
    d = json.loads(buf.getvalue())
    replayed = {
        "faults": float(d.get("faults", 0)),
        "p50_us": d.get("latency-p50-ns", 0) / 1e3,
        "p99_us": d.get("latency-p99-ns", 0) / 1e3,
        "blocked_ms": d.get("postcopy-blocktime", 0),
        "total_ms": d.get("total-time", 0),
    }
    res = WorkloadRun(command, info, recorded, replayed)
    for c in cpus:
        res.scripted[c.vcpu_id] = (c.stats.touches, c.stats.exits, c.stats.memory_faults)
    return res
