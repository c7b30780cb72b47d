"""Orchestration of one post-copy migration: a source guest, a destination, the verdict.

The source side (:func:`prepare_source`) builds a guest through a `Kernel`,
runs the *writer* over the data area (so memory holds a known pattern,
:func:`fakekvm.guests.workloads.pattern_bytes`), loads the workload program
and sets each vCPU at its entry, then *pauses* it: the vCPU state is taken with
``KVM_GET_REGS``/``KVM_GET_SREGS`` as raw blobs and memory is served by a
:class:`~postcopy.source.Source`. The destination
(:class:`~postcopy.destination.Destination`) resumes the guest from those blobs
while its memory is still on the source.

Workloads (the data area ``[DATA_BASE, mem)`` is split evenly between vCPUs):

=============  ===================================================================
``idle``       the vCPUs are restored but do not run: pure background transfer
``sequential`` the toucher reads one qword per page, in order
``random``     the toucher, random permutation (seeded)
``hotset``     the toucher, 90 % of touches in a hot 1/16 (seeded)
``verify``     the verifier sums its share (mod 2^64-59) and reports the checksum
``balloon``    ``hotset``'s toucher, while the destination's VMM runs a balloon
               storm over the pages it never touches (:mod:`postcopy.balloon`)
=============  ===================================================================

Verdict: every vCPU must report what the source predicts (touch count and sum,
or the checksum), and guest memory must equal the source's page by page (a
64-bit digest a page, :func:`postcopy.pages.page_digests`, computed on both
sides) except for pages the destination guest itself wrote, which the KVM
dirty log of the destination memslot names (stacks, page-table A/D bits), and
pages a balloon storm discarded (their content is gone by design; counted).
:class:`MigrationMismatch` names the first differing page.

:func:`migrate` runs the source in a second process (``spawn``) by default, or
in the same process (``same_process=True``, for debugging and for tests that
drive the source directly).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fakekvm.abi import kvm
from fakekvm.guests import GuestVM, layout
from fakekvm.guests import workloads as w
from fakekvm.kernel.seam import Kernel
from postcopy import transport as tp
from postcopy.balloon import BalloonStorm
from postcopy.destination import Destination, DestinationResult
from postcopy.mechanisms import make_mechanism
from postcopy.pages import first_difference, page_digests
from postcopy.source import Source

WORKLOADS = ("idle", "sequential", "random", "hotset", "verify", "balloon")
_PATTERNS = {
    "sequential": w.Pattern.SEQUENTIAL,
    "random": w.Pattern.RANDOM,
    "hotset": w.Pattern.HOTSET,
    "balloon": w.Pattern.HOTSET,
}


class MigrationMismatch(RuntimeError):
    """Destination memory or a guest report differs from the source's."""


#: ``(kernel, role) -> kernel`` applied by `make_kernel` in this process, before any recorder
#: (``role``: "source", "destination" or "" for one kernel serving both)
KERNEL_HOOKS: list[Callable[[Kernel, str], Kernel]] = []


def make_kernel(
    kind: str, profile: str | None = None, *, role: str = "", options: MigrateOptions | None = None
) -> Kernel:
    """``real`` -> `RealKernel`; ``fake`` -> ``FakeKernel(profile)``.

    When ``FAKEKVM_TRACE`` is set (``fakekvm capture``) the kernel is wrapped in a recorder
    (`replay.recorder.maybe_record`): ``role`` "source" writes ``$FAKEKVM_TRACE.source``,
    the others ``$FAKEKVM_TRACE``.
    """
    kernel: Kernel
    if kind == "real":
        from fakekvm.kernel.real import RealKernel

        kernel = RealKernel()
    elif kind == "fake":
        from fakekvm.fake import FakeKernel

        profile = profile or "6.18-pvm"
        kernel = FakeKernel(profile=profile)
    else:
        raise ValueError(f"unknown kernel kind {kind!r} (real, fake)")
    for hook in KERNEL_HOOKS:  # e.g. replay --mode workload: scripted vCPUs on the destination
        kernel = hook(kernel, role)
    if os.environ.get("FAKEKVM_TRACE"):
        from replay.recorder import maybe_record

        o = options
        kernel = maybe_record(
            kernel,
            role=role,
            mechanism=o.mechanism if o else None,
            guest=o.workload if o else None,
            seed=o.seed if o else None,
            profile=profile if kind == "fake" else None,
        )
    return kernel


# -- the source side ---------------------------------------------------------------------------


@dataclass
class SourceGuest:
    vm: GuestVM
    #: per vCPU: [kvm_regs bytes, kvm_sregs bytes]
    states: list[list[bytes]]
    #: per vCPU: the reports the workload must produce on the destination
    expect: list[list[int]]
    workload: str


def shares(mem_size: int, vcpus: int) -> list[tuple[int, int]]:
    """(base, size) of each vCPU's share of the data area."""
    data = mem_size - layout.DATA_BASE
    size = data // vcpus // layout.PAGE * layout.PAGE
    if size <= 0:
        raise ValueError(f"{mem_size:#x} bytes of memory leave no data for {vcpus} vCPUs")
    return [(layout.DATA_BASE + i * size, size) for i in range(vcpus)]


def prepare_source(
    kernel: Kernel, mem_size: int, vcpus: int, workload: str, seed: int
) -> SourceGuest:
    """Build, fill and pause the source guest (see the module docstring)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    vm = GuestVM(kernel, mem_size, vcpus=vcpus)
    try:
        base, end = layout.DATA_BASE, mem_size
        vm.load(w.writer_image(mem_size, base, end - base, seed), vcpus=[0])
        r = vm.run(0)
        if r.done != 0:
            raise RuntimeError(f"source writer failed: {r.stop} {r.error}")
        mem = vm.mem()
        expect: list[list[int]] = []
        for i, (b, size) in enumerate(shares(mem_size, vcpus)):
            if workload == "verify":
                image = w.verifier_image(mem_size, b, size)
                ck = w.checksum(mem[b : b + size])
                expect.append([ck & 0xFFFFFFFF, ck >> 32])
            else:
                pattern = _PATTERNS.get(workload, w.Pattern.SEQUENTIAL)
                p = w.TouchParams(b, size, pattern, seed=seed + i)
                image = w.toucher_image(mem_size, p)
                if workload == "idle":
                    expect.append([])
                else:
                    count, total = w.expected_touch_report(p, mem[b : b + size])
                    expect.append([count, total & 0xFFFFFFFF, total >> 32])
            vm.load(image, vcpus=[i])
        states = []
        for i in range(vcpus):
            regs = bytearray(kvm.kvm_regs_fmt.size)
            sregs = bytearray(kvm.kvm_sregs.sizeof())
            kernel.ioctl(vm.vcpu_fds[i], kvm.KVM_GET_REGS, regs)
            kernel.ioctl(vm.vcpu_fds[i], kvm.KVM_GET_SREGS, sregs)
            states.append([bytes(regs), bytes(sregs)])
        return SourceGuest(vm, states, expect, workload)
    except BaseException:
        vm.close()
        raise


# -- the verdict -------------------------------------------------------------------------------


def check_reports(result: DestinationResult, expect: list[list[int]], workload: str) -> None:
    if workload == "idle":
        return
    for res, want in zip(result.vcpus, expect, strict=True):
        if res.stop != "done" or res.done != 0:
            raise MigrationMismatch(f"vCPU {res.vcpu}: stopped {res.stop!r} ({res.error})")
        if res.reports[: len(want)] != want:
            raise MigrationMismatch(
                f"vCPU {res.vcpu} ({workload}) reported {res.reports[: len(want)]}, "
                f"the source predicts {want}"
            )


def compare_memory(
    view: memoryview,
    source_digests: bytes,
    dirty: bytes,
    page_size: int,
    skip: bytes | bytearray | None = None,
) -> int:
    """Compare destination memory with the source's digests; returns pages excluded as
    guest-written (dirty). Pages set in ``skip`` (one bit a page: ballooned) are not
    compared at all. Raises :class:`MigrationMismatch` at the first other difference."""
    nr = len(source_digests) // 8
    mine = page_digests(view, 0, nr, 1, page_size)
    if mine == source_digests:
        return 0
    excluded = 0
    for i in range(nr):
        if mine[8 * i : 8 * i + 8] != source_digests[8 * i : 8 * i + 8]:
            if skip and skip[i >> 3] & (1 << (i & 7)):
                continue
            if dirty and dirty[i >> 3] & (1 << (i & 7)):
                excluded += 1
                continue
            raise MigrationMismatch(
                f"guest memory differs from the source at page {i} (gpa {i * page_size:#x})"
            )
    return excluded


def check_balloon(storm: BalloonStorm | None) -> None:
    """A balloon storm that failed fails the migration (`postcopy.balloon.BalloonError`)."""
    if storm is not None:
        storm.check()


def balloon_stats(storm: BalloonStorm | None) -> dict[str, Any] | None:
    return None if storm is None else storm.stats.as_dict()


# -- the whole migration -----------------------------------------------------------------------


@dataclass
class MigrateOptions:
    kernel: str = "real"
    profile: str | None = None
    mechanism: str = "uffd-missing"
    mem_size: int = 64 << 20
    vcpus: int = 1
    workload: str = "random"
    seed: int = 7
    same_process: bool = False
    #: pin vCPU/fault/bulk threads to CPUs (measured slower on this 2-CPU host: off)
    pin: bool = False
    batch_pages: int = 512
    address: str | None = None  # a Unix socket path (default: a temp dir) or "host:port"
    huge: bool = False
    fault_threads: int = 1
    #: the background receiver waits up to this long (s) while a vCPU waits for a page
    yield_to_demand: float = 0.0
    #: priority of the background threads on both sides (threadprio.background)
    bulk_nice: int = 0
    #: pin the source's demand thread to this CPU index
    source_demand_cpu: int | None = None
    #: the background push order: "sequential" or "trace:PATH" (a previous run's faults)
    push_order: str = "sequential"
    #: scheduler slice of the demand-path threads (vCPUs, fault, source demand); 0: default
    demand_slice_ns: int = 0
    #: run the fault threads and the source's demand thread SCHED_FIFO (threadprio.realtime)
    demand_rt: bool = False
    #: workload "balloon": inflate/deflate rounds, and pages a round (postcopy.balloon)
    balloon_rounds: int = 16
    balloon_pages: int = 32


@dataclass
class MigrationReport:
    options: MigrateOptions
    result: DestinationResult
    excluded_pages: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    #: the balloon storm's figures (workload "balloon"; postcopy.balloon.StormStats)
    balloon: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = self.result.stats.as_dict()
        d["mechanism"] = self.options.mechanism
        d["kernel"] = self.options.kernel
        d["workload"] = self.options.workload
        d["vcpus"] = self.options.vcpus
        d["guest-written-pages"] = self.excluded_pages
        d["vcpu-reports"] = [r.reports for r in self.result.vcpus]
        d["handler"] = self.result.placer
        d["source"] = self.source
        if self.balloon is not None:
            d["balloon"] = self.balloon
            d["ballooned-pages"] = self.balloon["ballooned"]
        return d

    def summary(self) -> str:
        o = self.options
        head = (
            f"fakekvm migrate: kernel={o.kernel} mechanism={o.mechanism} "
            f"mem={o.mem_size >> 20}M vcpus={o.vcpus} workload={o.workload}"
        )
        st = self.result.stats
        tail = (
            f"Background push rate:\t\t{st.background_rate_pps:f} pgs/sec\n"
            f"Memory verified: equal to the source "
            f"({self.excluded_pages} guest-written pages excluded{self._balloon_note()})"
        )
        return f"{head}\n{st.summary()}\n{tail}"

    def _balloon_note(self) -> str:
        b = self.balloon
        if b is None:
            return ""
        return (
            f"; {b['ballooned']} ballooned pages excluded: {b['rounds']} balloon rounds, "
            f"{b['inflations']} REMOVE-raising madvise calls, {b['refaults']} refaults"
        )


def _parse_address(a: str) -> tp.Address:
    if ":" in a and not a.startswith("/"):
        host, port = a.rsplit(":", 1)
        return (host, int(port))
    return a


def make_source(mem: Any, states: list[list[bytes]], o: MigrateOptions) -> Source:
    """The source for ``o``: batch size, background priority, and the push order
    (``"sequential"``, or ``"trace:PATH"``: a previous run's faults first,
    :func:`postcopy.workingset.fault_pages`)."""
    policy, trace = "sequential", None
    if o.push_order.startswith("trace:"):
        from postcopy.workingset import fault_pages

        policy, trace = "trace", fault_pages(o.push_order[len("trace:") :], layout.PAGE)
    elif o.push_order != "sequential":
        raise ValueError(f"push order {o.push_order!r}: sequential or trace:PATH")
    return Source(
        mem,
        states,
        batch_pages=o.batch_pages,
        policy=policy,
        trace=trace,
        bulk_nice=o.bulk_nice,
        demand_cpu=o.source_demand_cpu,
        demand_slice_ns=o.demand_slice_ns,
        demand_rt=o.demand_rt,
    )


def _source_process(conn: Any, o: MigrateOptions, address: str) -> None:
    """The source, in its own process: prepare, serve until the destination is done."""
    try:
        kernel = make_kernel(o.kernel, o.profile, role="source", options=o)
        g = prepare_source(kernel, o.mem_size, o.vcpus, o.workload, o.seed)
        mem = g.vm.mem()
        digests = page_digests(mem, 0, o.mem_size // layout.PAGE)
        src = make_source(mem, g.states, o)
        addr = src.listen(_parse_address(address))
        conn.send(("ready", addr, g.expect, digests))
        src.wait()
        conn.send(("done", src.result, vars(src.stats)))
        src.close()
        del mem
        g.vm.close()
    except BaseException as e:
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass


def migrate(
    o: MigrateOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> MigrationReport:
    """Run one migration (see the module docstring); raises on any mismatch."""
    tmp = tempfile.TemporaryDirectory(prefix="fakekvm-migrate-")
    address = o.address or os.path.join(tmp.name, "source.sock")
    try:
        if o.same_process:
            return _migrate_same_process(o, address, progress)
        return _migrate_two_processes(o, address, progress)
    finally:
        tmp.cleanup()


def make_destination(
    o: MigrateOptions,
    kernel: Kernel,
    address: tp.Address,
    progress: Callable[[int, int], None] | None,
    digests: bytes,
    excluded: list[int],
    storm: BalloonStorm | None = None,
) -> Destination:
    """The destination engine for options ``o`` on ``kernel``, its end-of-run check armed:
    memory compared with the source's ``digests`` (the number of guest-written pages left
    out goes to ``excluded[0]``). ``replay --mode serve`` builds its engine with this too."""
    mech = make_mechanism(o.mechanism, huge=o.huge)
    if storm is not None:  # workload "balloon": a balloon device behind the kernel
        kernel = storm.wrap(kernel)
    dest = Destination(
        kernel,
        mech,
        address=address,
        run_vcpus=o.workload != "idle",
        pin=o.pin,
        dirty_log=True,
        progress=progress,
        fault_threads=o.fault_threads,
        yield_to_demand=o.yield_to_demand,
        bulk_nice=o.bulk_nice,
        demand_slice_ns=o.demand_slice_ns,
        demand_rt=o.demand_rt,
    )

    def check(d: Destination) -> None:
        placed = d.mechanism.placed_digests
        if placed is not None:  # no dirty log (guest_memfd): pages as they arrived
            i = first_difference(bytes(placed), digests)
            if i is not None:
                raise MigrationMismatch(
                    f"page {i} (gpa {i * d.layout.page_size:#x}) arrived different from the source's"
                )
            excluded[:] = [0]
            return
        view = d.guest_view()
        try:
            skip = storm.ballooned if storm is not None else None
            excluded[:] = [compare_memory(view, digests, d.dirty_bits(), d.layout.page_size, skip)]
        finally:
            view.release()

    dest.inspect = check
    return dest


def _migrate_same_process(
    o: MigrateOptions, address: str, progress: Callable[[int, int], None] | None
) -> MigrationReport:
    if o.kernel == "real":  # one kernel for both sides: one trace
        src_kernel = dst_kernel = make_kernel(o.kernel, o.profile, options=o)
    else:
        src_kernel = make_kernel(o.kernel, o.profile, role="source", options=o)
        dst_kernel = make_kernel(o.kernel, o.profile, role="destination", options=o)
    g = prepare_source(src_kernel, o.mem_size, o.vcpus, o.workload, o.seed)
    mem = g.vm.mem()
    try:
        digests = page_digests(mem, 0, o.mem_size // layout.PAGE)
        src = make_source(mem, g.states, o)
        addr = src.listen(_parse_address(address))
        excluded: list[int] = [0]
        storm = BalloonStorm.for_options(o)
        dest = make_destination(o, dst_kernel, addr, progress, digests, excluded, storm)
        try:
            result = dest.run()
        finally:
            src.close()
        check_balloon(storm)
        check_reports(result, g.expect, o.workload)
        return MigrationReport(
            o, result, excluded[0], dict(vars(src.stats), result=src.result), balloon_stats(storm)
        )
    finally:
        mem.release()
        g.vm.close()


def _migrate_two_processes(
    o: MigrateOptions, address: str, progress: Callable[[int, int], None] | None
) -> MigrationReport:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_source_process, args=(child, o, address), daemon=True)
    proc.start()
    child.close()
    try:
        msg = _recv(parent, proc)
        if msg[0] != "ready":
            raise RuntimeError(f"source process failed: {msg[1]}")
        _, addr, expect, digests = msg
        dst_kernel = make_kernel(o.kernel, o.profile, role="destination", options=o)
        excluded: list[int] = [0]
        storm = BalloonStorm.for_options(o)
        dest = make_destination(o, dst_kernel, addr, progress, digests, excluded, storm)
        result = dest.run()
        check_balloon(storm)
        check_reports(result, expect, o.workload)
        end = _recv(parent, proc)
        source = dict(end[2], result=end[1]) if end[0] == "done" else {"error": end[1]}
        return MigrationReport(o, result, excluded[0], source, balloon_stats(storm))
    finally:
        parent.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _recv(conn: Any, proc: Any) -> Any:
    """Receive from the source process, or fail at once if it died."""
    from multiprocessing.connection import wait

    while True:
        ready = wait([conn, proc.sentinel])
        if conn in ready:
            try:
                return conn.recv()
            except EOFError:
                # the pipe is closed (wait() would report it ready for ever): the source is
                # gone or going; do not spin on it
                proc.join(5)
                raise RuntimeError(
                    f"source process closed its pipe without a word (exit code {proc.exitcode})"
                ) from None
        if proc.sentinel in ready and not conn.poll():
            raise RuntimeError(f"source process exited with code {proc.exitcode}")
