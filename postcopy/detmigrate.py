"""A whole post-copy migration on the fake, serialised by a seeded scheduler: same seed, same bytes.

:func:`migrate_deterministic` is :func:`postcopy.migrate.migrate` with
``same_process=True`` on the fake kernel, run inside
:func:`fakekvm.fake.detprims.deterministic`:

* both fake kernels use the scheduler (``scheduler=``) and its virtual clock
  (``clock=``), and the destination's is wrapped in a
  :class:`~fakekvm.fake.serial.SerializingKernel` (a scheduling point at every call);
* the source is served over two :func:`postcopy.simnet.sim_pair` links (demand and
  bulk: latency, bandwidth, loss from the seed) instead of a socket, through
  :meth:`Source.serve` and the destination's ``connect`` hook — no engine change;
* the engine's ``threading``/``time``/``secrets`` are the scheduler-aware stand-ins
  of :mod:`fakekvm.fake.detprims` for the duration of the run.

The result carries two digests: the scheduler's event log (every scheduling
point and every ``uffd_msg`` read, canonical) and the destination's guest
memory at the end (BLAKE2b-128 over every byte). Same seed and options ⇒ the
same two digests in any process; another seed ⇒ another interleaving. The usual
verdict still applies (vCPU reports and memory equal to the source's, else
:class:`~postcopy.migrate.MigrationMismatch`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import postcopy.migrate
from fakekvm.fake.detprims import deterministic
from fakekvm.fake.kernel import FakeKernel
from fakekvm.fake.serial import SerializingKernel
from fakekvm.guests import layout
from fakekvm.kernel.seam import Kernel
from postcopy.balloon import BalloonStorm
from postcopy.destination import Destination
from postcopy.mechanisms import make_mechanism
from postcopy.migrate import (
    MigrateOptions,
    MigrationMismatch,
    MigrationReport,
    check_reports,
    compare_memory,
    prepare_source,
)
from postcopy.pages import first_difference, page_digests
from postcopy.simnet import LinkStats, sim_pair
from postcopy.source import Source


@dataclass
class NetOptions:
    """The simulated links (both channels get the same parameters, their own seeds)."""

    latency_ns: int = 50_000
    bandwidth_Bps: float = 1.25e9  # 10 Gbit/s
    loss: float = 0.0
    rto_ns: int | None = None


@dataclass
class DetMigrationResult:
    seed: int
    report: MigrationReport
    #: BLAKE2b-128 of the scheduler's event log
    event_digest: str
    #: BLAKE2b-128 of the destination's guest memory at the end
    memory_digest: str
    points: int
    switches: int
    virtual_ns: int
    net: dict[str, LinkStats] = field(default_factory=dict)
    leftover: list[str] = field(default_factory=list)
    log: list[tuple[int, str, bytes]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"seed {self.seed}: events {self.event_digest} memory {self.memory_digest} "
            f"({self.points} points, {self.switches} switches, {self.virtual_ns / 1e6:.3f} ms virtual)"
        )


def migrate_deterministic(
    o: MigrateOptions,
    seed: int,
    *,
    net: NetOptions | None = None,
    cost_ns: int = 1_000,
    keep_log: bool = False,
    max_steps: int | None = 50_000_000,
    inject: dict[str, int] | None = None,
    record: Callable[[Kernel], Kernel] | None = None,
) -> DetMigrationResult:
    """Run one migration under the deterministic scheduler (module docstring).

    ``inject``: fault-injection knobs of the fake's userfaultfd
    (`fakekvm.fake.uffd.Injections`: ``eagain``, ``eexist_race``,
    ``remove_before_fault``) armed on every userfaultfd the destination opens.
    ``record``: wraps the destination's kernel (e.g. in a ``replay.recorder.RecordingKernel``,
    whose locks are then made scheduler-aware too); its ``stop_recording`` runs at the end."""
    if o.kernel != "fake":
        raise ValueError("a deterministic migration runs on the fake kernel only")
    net = net or NetOptions()
    mem_digest: list[str] = [""]
    modules = ("postcopy", "replay") if record is not None else ("postcopy",)
    with deterministic(
        seed, cost_ns=cost_ns, keep_log=keep_log, max_steps=max_steps, modules=modules
    ) as s:
        profile = o.profile or "6.18-pvm"
        src_fk = FakeKernel(profile, clock=s.clock, scheduler=s)
        dst_fk = FakeKernel(profile, clock=s.clock, scheduler=s)
        try:
            report, links = _run(o, seed, net, s, src_fk, dst_fk, mem_digest, inject or {}, record)
        finally:
            dst_fk.shutdown()
            src_fk.shutdown()
    return DetMigrationResult(
        seed, report, s.digest(), mem_digest[0], s.points, s.switches, s.now_ns,
        links, list(s.leftover), list(s.log),
    )  # fmt: skip


class _InjectingKernel(SerializingKernel):
    """Arms the fake's userfaultfd injection knobs on every userfaultfd it opens."""

    def __init__(self, inner: FakeKernel, sched: Any, inject: dict[str, int]) -> None:
        super().__init__(inner, sched)
        self.inject = inject

    def userfaultfd(self, flags: int) -> int:
        fd = super().userfaultfd(flags)
        knobs = self.inner.file(fd).state.inject  # type: ignore[attr-defined]
        for name, value in self.inject.items():
            if not hasattr(knobs, name):
                raise ValueError(f"no userfaultfd injection knob {name!r}")
            setattr(knobs, name, value)
        return fd


def _make_source(mem: Any, states: list[list[bytes]], o: MigrateOptions) -> Source:
    """`postcopy.migrate.make_source` where it exists (push order, priorities), else the
    plain source with ``o``'s batch size."""
    make = getattr(postcopy.migrate, "make_source", None)
    if make is not None:
        src: Source = make(mem, states, o)
        return src
    return Source(mem, states, batch_pages=o.batch_pages)


def _optional(o: MigrateOptions, *names: str) -> dict[str, Any]:
    """The options of ``o`` that this engine version has (passed on as they are)."""
    return {n: getattr(o, n) for n in names if hasattr(o, n)}


def _run(
    o: MigrateOptions,
    seed: int,
    net: NetOptions,
    s: Any,
    src_fk: FakeKernel,
    dst_fk: FakeKernel,
    mem_digest: list[str],
    inject: dict[str, int],
    record: Callable[[Kernel], Kernel] | None = None,
) -> tuple[MigrationReport, dict[str, LinkStats]]:
    g = prepare_source(SerializingKernel(src_fk, s), o.mem_size, o.vcpus, o.workload, o.seed)
    mem = g.vm.mem()
    try:
        digests = page_digests(mem, 0, o.mem_size // layout.PAGE)
        src = _make_source(mem, g.states, o)
        src.clock = s.clock.monotonic_ns  # its statistics on the virtual clock
        kw: dict[str, Any] = dict(
            latency_ns=net.latency_ns,
            bandwidth_Bps=net.bandwidth_Bps,
            loss=net.loss,
            rto_ns=net.rto_ns,
        )
        d_src, d_dst = sim_pair(s, seed=seed * 2 + 1, name="demand", **kw)
        b_src, b_dst = sim_pair(s, seed=seed * 2 + 2, name="bulk", **kw)
        src.serve(d_src, b_src)
        excluded = [0]
        dst_k: Kernel = (
            _InjectingKernel(dst_fk, s, inject) if inject else SerializingKernel(dst_fk, s)
        )
        if record is not None:
            dst_k = record(dst_k)
        storm = BalloonStorm.for_options(o)  # workload "balloon": its calls are recorded too
        if storm is not None:
            dst_k = storm.wrap(dst_k)
        dest = Destination(
            dst_k,
            make_mechanism(o.mechanism, huge=o.huge),
            connect=lambda: (d_dst, b_dst),
            run_vcpus=o.workload != "idle",
            dirty_log=True,
            fault_threads=o.fault_threads,
            yield_to_demand=o.yield_to_demand,
            **_optional(o, "bulk_nice", "demand_slice_ns"),
        )

        def inspect(d: Destination) -> None:
            view = d.guest_view()
            try:
                mem_digest[0] = hashlib.blake2b(view, digest_size=16).hexdigest()
                placed = d.mechanism.placed_digests
                if placed is not None:
                    i = first_difference(bytes(placed), digests)
                    if i is not None:
                        raise MigrationMismatch(f"page {i} arrived different from the source's")
                    return
                skip = storm.ballooned if storm is not None else None
                excluded[0] = compare_memory(
                    view, digests, d.dirty_bits(), d.layout.page_size, skip
                )
            finally:
                view.release()

        dest.inspect = inspect
        try:
            result = dest.run()
        finally:
            src.close()
            stop = getattr(dst_k, "stop_recording", None)
            if stop is not None:
                stop()  # a recorder closes its trace (the caller shuts the fake down)
        if storm is not None:
            storm.check()
        check_reports(result, g.expect, o.workload)
        links = {
            "demand-to-source": d_dst.stats, "demand-to-destination": d_src.stats,
            "bulk-to-source": b_dst.stats, "bulk-to-destination": b_src.stats,
        }  # fmt: skip
        return MigrationReport(
            o, result, excluded[0], dict(vars(src.stats), result=src.result),
            None if storm is None else storm.stats.as_dict(),
        ), links  # fmt: skip
    finally:
        mem.release()
        g.vm.close()


class NondeterminismError(AssertionError):
    """Two runs with the same seed gave different digests."""


def check_determinism(
    o: MigrateOptions,
    seed: int,
    n: int = 20,
    *,
    net: NetOptions | None = None,
    cost_ns: int = 1_000,
) -> list[DetMigrationResult]:
    """Run the same deterministic migration ``n`` times; raise `NondeterminismError` naming
    the first run whose event-log or memory digest differs from the first run's."""
    runs: list[DetMigrationResult] = []
    for i in range(n):
        r = migrate_deterministic(o, seed, net=net, cost_ns=cost_ns)
        if runs and (r.event_digest, r.memory_digest) != (
            runs[0].event_digest,
            runs[0].memory_digest,
        ):
            raise NondeterminismError(
                f"seed {seed}: run {i} differs from run 0:\n  run 0: {runs[0].summary()}\n"
                f"  run {i}: {r.summary()}"
            )
        runs.append(r)
    return runs


@dataclass
class SeedOutcome:
    seed: int
    result: DetMigrationResult | None
    #: ``"Type: message"`` of what the run raised (None: it passed)
    error: str | None


def explore(
    o: MigrateOptions,
    seeds: range | list[int],
    *,
    net: NetOptions | None = None,
    cost_ns: int = 1_000,
    inject: dict[str, int] | None = None,
) -> list[SeedOutcome]:
    """Run the migration once per seed; a failing seed is reported, not raised, and
    reproduces with ``migrate_deterministic(o, seed, net=net, inject=inject)``."""
    out: list[SeedOutcome] = []
    for seed in seeds:
        try:
            r = migrate_deterministic(o, seed, net=net, cost_ns=cost_ns, inject=inject)
            out.append(SeedOutcome(seed, r, None))
        except Exception as e:  # a failing seed is the finding
            out.append(SeedOutcome(seed, None, f"{type(e).__name__}: {e}"))
    return out
