"""Replaying a trace's touches through the engine against a memory image (issue 6's benchmark).

`run_engine_workload`: `postcopy.source.Source` (in a second process) serves an image whose pages
carry their page number, `postcopy.destination.Destination` runs scripted vCPUs
(`replay.workload.scripts_from_events`) on a ``FakeKernel``; the push order is the trace's own
fault order (REAP-style working-set prefetch) or sequential; every page is checked on arrival. No
guest runs, so a 1 GiB trace replays in seconds (``fakekvm bench --traces``). `synthetic_trace`
writes such a trace: every page of a guest touched once. `replay.workload.run_workload` sends
synthetic traces here (they have no recorded guest to re-run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fakekvm.abi import kvm as K
from fakekvm.fake.kvm.scripted import Step
from replay.events import Call, Event, Fault
from replay.workload import _EXIT_OFF, ScriptInfo, scripts_from_events

# -- a synthetic recording: every page touched once (the 262,144-fault benchmark) -------------

_PORT_DONE = 0xF4
_RUN_HEAD = 0x120


def _done_exit_bytes() -> bytes:
    """A recorded ``KVM_RUN``'s ``out``: ``KVM_EXIT_IO`` OUT of one byte 0 to PORT_DONE."""
    out = bytearray(_RUN_HEAD + 1)
    out[8:12] = K.KVM_EXIT_IO.to_bytes(4, "little")
    K.kvm_run_io_fmt.pack_into(out, _EXIT_OFF, K.KVM_EXIT_IO_OUT, 1, _PORT_DONE, 1, _RUN_HEAD)
    return bytes(out)


def synthetic_trace(
    path: str,
    mem_size: int = 1 << 30,
    *,
    vcpus: int = 1,
    order: str = "random",
    seed: int = 1,
    mechanism: str = "uffd-missing",
    step_ns: int = 2000,
    latency_ns: int = 1000,
    chunk_events: int = 4096,
) -> int:
    """Write a trace whose faults touch every page of ``mem_size`` once; returns the faults.

    Pages are split into ``vcpus`` contiguous shares of a permutation (``order``: "random",
    seeded, or "sequential"); vCPU ``v``'s i-th fault is observed at ``i * step_ns`` and
    resolved ``latency_ns`` later (so the think time is ``step_ns - latency_ns``). Each vCPU
    has one ``KVM_RUN`` spanning its faults that returns the PORT_DONE report the migration
    guests end with. The header says ``extra["synthetic"]``: `run_workload` serves such a
    trace from a memory image (there is no recorded guest to re-run).
    """
    import random

    from replay.events import Header
    from replay.format import TraceWriter

    page = 4096
    nr = mem_size // page
    pages = list(range(nr))
    if order == "random":
        random.Random(seed).shuffle(pages)
    elif order != "sequential":
        raise ValueError(f"order {order!r}: random or sequential")
    share = -(-nr // vcpus)
    argv = ["fakekvm", "migrate", "--kernel", "fake", "--mechanism", mechanism,
            "--mem", str(mem_size), "--vcpus", str(vcpus), "--workload", order, "--seed", str(seed)]  # fmt: skip
    header = Header(
        kernel="fake", mechanism=mechanism, guest=f"synthetic-{order}", seed=seed, argv=argv,
        role="destination",
        extra={"synthetic": f"every page of {mem_size} bytes touched once, {order} order"},
    )  # fmt: skip
    done = _done_exit_bytes()
    span = share * step_ns + step_ns
    access = "private" if mechanism == "gmem-private" else "read"
    how = {"kvm-userfault": "rerun", "gmem-private": "convert", "uffd-minor": "continue"}.get(
        mechanism, "copy"
    )
    with TraceWriter(path, header, chunk_events=chunk_events) as w:
        for v in range(vcpus):
            w.append(Call(seq=v, tid=1000 + v, t_ns=step_ns, dur_ns=span, op="ioctl", fd=10 + v,
                          fd_kind=f"kvm-vcpu:{v}", vcpu=v, request=K.KVM_RUN, name="KVM_RUN",
                          iarg=0, out=done))  # fmt: skip
        shares = [pages[v * share : (v + 1) * share] for v in range(vcpus)]
        for i in range(share):
            t = (i + 1) * step_ns + step_ns // 2
            for v in range(vcpus):
                if i < len(shares[v]):
                    gpa = shares[v][i] * page
                    w.append(Fault(seq=v, tid=1000 + v, vcpu=v, gpa=gpa, hva=0x7F0000000000 + gpa,
                                   access=access, mechanism=mechanism, observed_ns=t + v,
                                   resolved_ns=t + v + latency_ns, how=how))  # fmt: skip
    return nr


# -- the engine against a memory image (``replay --mode workload`` of a synthetic trace) --------


@dataclass
class EngineRun:
    """One replay of a trace's touches through the engine (`Source` + `Destination`, fake)."""

    trace: str
    mechanism: str
    mem_size: int
    vcpus: int
    push_order: str
    info: ScriptInfo
    touched: int = 0  #: touches the scripted vCPUs completed
    demand_faults: int = 0  #: faults the engine saw (the touches that had to wait for it)
    memory_fault_exits: int = 0  #: KVM_EXIT_MEMORY_FAULT exits the scripted vCPUs took
    pages_demand: int = 0
    pages_background: int = 0
    p50_us: float = 0.0
    read_s: float = 0.0  #: reading the trace and building the scripts
    setup_s: float = 0.0  #: the source image, its stamps, the push order, the kernels
    touches_s: float = 0.0  #: vCPUs resumed -> the last vCPU's script done
    push_s: float = 0.0  #: vCPUs resumed -> every page placed
    migration_s: float = 0.0  #: Destination.run(): connect -> every page placed, threads ended
    #: (its final check, the stamps, is verify_s)
    verify_s: float = 0.0  #: checking each destination page holds the source's stamp
    total_s: float = 0.0  #: the whole replay, wall clock (read .. verified)

    @property
    def touches(self) -> int:
        return sum(self.info.touches.values())

    @property
    def touches_per_s(self) -> float:
        return self.touched / self.touches_s if self.touches_s > 0 else 0.0

    def report(self) -> str:
        return "\n".join([
            f"workload replay through the engine (fake kernel, {self.mechanism}, "
            f"{self.mem_size >> 20} MiB, {self.vcpus} vCPU, push order {self.push_order}): {self.trace}",
            f"touches replayed       {self.touched} of {self.touches} recorded",
            f"became demand faults   {self.demand_faults} ({self.memory_fault_exits} memory-fault exits);"
            f" pages demand/background {self.pages_demand}/{self.pages_background}",
            f"fault latency p50      {self.p50_us:.1f} µs",
            f"time: read {self.read_s:.3f} s, setup {self.setup_s:.3f} s, migration "
            f"{self.migration_s:.3f} s (touches {self.touches_s:.3f} s, push {self.push_s:.3f} s), "
            f"verify {self.verify_s:.3f} s; total {self.total_s:.3f} s",
            f"touches per second     {self.touches_per_s:,.0f}",
        ])  # fmt: skip


def _migrate_options(argv: list[str]) -> Any:
    """The `MigrateOptions` of a recorded ``fakekvm migrate`` command line, made for the fake."""
    import argparse

    from replay.verify import replay_command
    from tools import migrate as tm

    cmd = replay_command(argv, None)
    p = argparse.ArgumentParser(add_help=False)
    tm.add_parser(p.add_subparsers())
    return tm.options_from_args(p.parse_args(cmd[1:]))


def _scripts_of(path: str, events: list[Event]) -> tuple[dict[int, list[Step]], ScriptInfo]:
    from replay.verify import VerifyError

    scripts, info = scripts_from_events(events)
    if not any(scripts.values()):
        raise VerifyError(f"{path}: no vCPU activity to replay")
    return scripts, info


_REGION_NAMES = frozenset({"KVM_SET_USER_MEMORY_REGION", "KVM_SET_USER_MEMORY_REGION2"})


def _guest_size(events: list[Event]) -> int:
    """The end of the highest memslot the recording set (``guest_phys_addr + memory_size``)."""
    end = 0
    for e in events:
        if type(e) is Call and e.name in _REGION_NAMES and e.errno == 0 and len(e.inp) >= 24:
            gpa, size = (
                int.from_bytes(e.inp[8:16], "little"),
                int.from_bytes(e.inp[16:24], "little"),
            )
            end = max(end, gpa + size)
    return end


def _vcpu_states(profile: str, vcpus: int) -> list[list[bytes]]:
    """Reset-state ``kvm_regs``/``kvm_sregs`` blobs, read from a throwaway fake vCPU (a
    scripted vCPU executes nothing, so any valid state will do)."""
    import os

    from fakekvm.fake import FakeKernel

    k = FakeKernel(profile=profile)
    try:
        kvm_fd = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        vm = k.ioctl(kvm_fd, K.KVM_CREATE_VM, 0)
        cpu = k.ioctl(vm, K.KVM_CREATE_VCPU, 0)
        regs = bytearray(K.kvm_regs_fmt.size)
        sregs = bytearray(K.kvm_sregs.sizeof())
        k.ioctl(cpu, K.KVM_GET_REGS, regs)
        k.ioctl(cpu, K.KVM_GET_SREGS, sregs)
        return [[bytes(regs), bytes(sregs)] for _ in range(vcpus)]
    finally:
        k.shutdown()


def _image_source(
    conn: Any,
    address: str,
    nr: int,
    page: int,
    states: list[list[bytes]],
    batch_pages: int,
    trace: str | None,
) -> None:
    """The source process of `run_engine_workload`: an anonymous image of ``nr`` pages, each
    stamped with its page number, pushed in ``trace``'s fault order (None: sequential), served
    until the destination is done."""
    import mmap
    from array import array

    from postcopy.source import Source
    from postcopy.workingset import order_pages
    from replay.columns import to_list
    from replay.format import open_trace

    try:
        order = None
        if trace is not None:  # postcopy.workingset.fault_pages, from columns (no structs)
            with open_trace(trace) as r:
                triples = [t for c in r.fault_columns()
                           for t in zip(*map(to_list, (c["observed_ns"], c["seq"], c["gpa"])),
                                        strict=True)]  # fmt: skip
            order = order_pages(triples, page)
            del triples
        image = mmap.mmap(-1, nr * page)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # 512 page faults a 2 MiB, not one a page
            image.madvise(mmap.MADV_HUGEPAGE)
        stamps = memoryview(image).cast("Q")
        stamps[:: page // 8] = array("Q", range(nr))
        stamps.release()
        if order is None:
            src = Source(image, states, batch_pages=batch_pages)
        else:
            src = Source(image, states, batch_pages=batch_pages, policy="trace", trace=order)
        src.listen(address)
        conn.send(("ready",))
        src.wait()
        src.close()
    except BaseException as e:
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass


def run_engine_workload(
    path: str,
    *,
    push_order: str = "trace",
    think: bool = False,
    batch_pages: int = 512,
    events: list[Event] | None = None,
) -> EngineRun:
    """Replay ``path``'s touches through the engine on the fake, the source serving an image.

    The destination is `postcopy.destination.Destination` on a ``FakeKernel`` whose vCPUs are
    `ScriptedCpu` s (the recorded touches, in order; think time if ``think``); the source is
    `postcopy.source.Source` serving an anonymous memory image in this process over two
    socket pairs, pushing in ``push_order`` ("trace": the trace's own fault order,
    `postcopy.workingset.fault_pages`, REAP-style; or "sequential"). Every page of the image
    is stamped with its page number, and after the run every destination page must hold its
    stamp (pages arrived where they belong). Returns the figures and the time split.
    """
    import multiprocessing as mp
    import os
    import tempfile
    import time
    from array import array

    from fakekvm.fake import FakeKernel
    from fakekvm.fake.kvm.scripted import ScriptedCpu, scripted_factory
    from postcopy.destination import Destination
    from postcopy.mechanisms import make_mechanism
    from replay.format import open_trace
    from replay.verify import VerifyError
    from tools.migrate import DEFAULT_FAKE_PROFILE

    t0 = time.perf_counter()
    with open_trace(path) as r:
        header = r.header
    o = _migrate_options(header.argv)
    det = header.extra.get("deterministic")  # replay.det recordings: the options are there
    if isinstance(det, dict) and isinstance(det.get("options"), dict):
        for k, v in det["options"].items():
            if k != "kernel" and hasattr(o, k):
                setattr(o, k, v)
    mech_name = header.mechanism or o.mechanism
    profile = DEFAULT_FAKE_PROFILE.get(mech_name, "6.18-pvm")
    if push_order not in ("trace", "sequential"):
        raise ValueError(f"push order {push_order!r}: trace or sequential")
    page = 4096
    scripts: dict[int, list[Step]] | None = None
    info: ScriptInfo | None = None
    if not det and "--mem" not in header.argv:
        # the command line does not say the size: read the trace first, its memslots do
        if events is None:
            with open_trace(path) as r:
                events = list(r)
        scripts, info = _scripts_of(path, events)
        o.mem_size = _guest_size(events) or o.mem_size
        o.vcpus = max(o.vcpus, max(scripts) + 1)
    nr = o.mem_size // page
    vcpus = o.vcpus
    # the source process next: it builds its image and reads the push order meanwhile
    tmp = tempfile.TemporaryDirectory(prefix="fakekvm-workload-")
    address = os.path.join(tmp.name, "source.sock")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_image_source, daemon=True, args=(
        child, address, nr, page, _vcpu_states(profile, vcpus), batch_pages,
        path if push_order == "trace" else None))  # fmt: skip
    proc.start()
    child.close()
    try:
        if scripts is None or info is None:
            if events is None:
                with open_trace(path) as r:
                    events = list(r)
            scripts, info = _scripts_of(path, events)
        if max(scripts) >= vcpus:
            raise VerifyError(f"{path}: vCPU {max(scripts)} outside the recorded {vcpus}")
    except BaseException:
        proc.kill()
        proc.join()
        tmp.cleanup()
        raise
    res = EngineRun(path, mech_name, o.mem_size, vcpus, push_order, info)
    t1 = time.perf_counter()
    cpus: list[ScriptedCpu] = []
    factory = scripted_factory(scripts, think=think)

    def make(vm: Any, vcpu: Any, translate: Any) -> ScriptedCpu:
        c = factory(vm, vcpu, translate)
        cpus.append(c)
        return c

    kernel = FakeKernel(profile=profile, vcpu_factory=make)
    bad: list[int] = []
    t_end = [0]
    want = array("Q", range(nr))

    def check(d: Destination) -> None:
        t_end[0] = time.perf_counter_ns()
        view = d.guest_view()
        try:
            got = view.cast("Q")[:: page // 8]
            if got.tolist() != want.tolist():
                bad.append(next(i for i in range(nr) if got[i] != i))
            got.release()
        finally:
            view.release()

    try:
        msg = parent.recv()
        if msg[0] != "ready":
            raise VerifyError(f"the image source failed: {msg[1]}")
        dest = Destination(kernel, make_mechanism(mech_name), address=address,
                           run_vcpus=True, inspect=check)  # fmt: skip
        t2 = time.perf_counter()
        result = dest.run()
        t3 = time.perf_counter()
    finally:
        kernel.shutdown()
        parent.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        tmp.cleanup()
    if bad:
        raise VerifyError(f"{path}: destination page {bad[0]} does not hold the source's page")
    st = result.stats
    d = st.as_dict()
    t_check = t_end[0] / 1e9 if t_end[0] else t3  # Destination.run calls the check last
    res.read_s, res.setup_s, res.migration_s = t1 - t0, t2 - t1, t_check - t2
    res.verify_s, res.total_s = t3 - t_check, t3 - t0
    resume = st.resume_ns
    done = max((c.finished_ns for c in cpus), default=0)
    res.touches_s = max(0, done - resume) / 1e9 if done else 0.0
    res.push_s = max(0, st.end_ns - resume) / 1e9
    res.touched = sum(c.stats.touches for c in cpus)
    res.memory_fault_exits = sum(c.stats.memory_faults for c in cpus)
    res.demand_faults = int(d.get("faults", 0))
    res.pages_demand = int(d.get("pages-demand", 0))
    res.pages_background = int(d.get("pages-background", 0))
    res.p50_us = d.get("latency-p50-ns", 0) / 1e3
    return res
