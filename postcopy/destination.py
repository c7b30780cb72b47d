"""The post-copy destination: resume the guest at once, fetch its memory on demand and in the background.

QEMU's destination (``migration/postcopy-ram.c``, ``docs/devel/migration/postcopy.rst``)
made kernel-neutral: everything goes through a `Kernel`, and *how* faults are
caught and resolved is a :class:`~postcopy.mechanisms.base.Mechanism`
(``uffd-missing``, ``uffd-minor``, ``kvm-userfault``, ``gmem-private``).

:meth:`Destination.run`, in order:

1. open the demand channel (:class:`~postcopy.client.FetchClient`): the HELLO
   gives the geometry, the vCPU state blobs follow;
2. ``mechanism.arm`` (memory + userfaultfd/bitmap); when the mechanism can place
   pages before the memslots exist (``places_before_bind``) the bulk channel opens
   now, so the background push overlaps the rest of this step; build the VM
   (:class:`~postcopy.guestrun.DestVM`, type and memslots from the mechanism),
   restore each vCPU (``KVM_SET_SREGS``, ``KVM_SET_REGS``);
3. start the fault thread (userfaultfd designs), open the bulk channel (the
   background push starts; its receiver places each batch with one ioctl -- or,
   when the mechanism has ``bulk_slots > 1``, stages it and a *placer* thread
   places it while the next batch is received), and start one thread per vCPU:
   the guest runs (``resume``);
4. wait until every page is placed -- or a failure: a lost source
   (:class:`~postcopy.client.SourceLost` within the time the sockets report it),
   a guest error, a fault thread error -- the main thread never waits without
   a way to be woken;
5. ``mechanism.complete()`` (stop intercepting), stop the fault thread
   (an eventfd wakes its ``poll``), say DONE, and let the vCPUs run to their end.

Thread placement (:mod:`postcopy.threadprio`): ``demand_slice_ns`` gives the vCPU
and fault threads a short scheduler slice so that a fault's wake-ups preempt the
background threads (off by default: no gain measured on this host); ``pin`` puts fault thread *j* on vCPU *j*'s CPU (no
cross-CPU wake between a vCPU and its handler) and the bulk receiver on the last
CPU; ``bulk_nice`` lowers the background threads' priority.

Stats (:class:`~postcopy.stats.MigrationStats`, clock = ``kernel.monotonic_ns``):
a fault starts when it is observed (uffd message read, or the exit returned)
and ends when the ioctl that lets its vCPU continue returns (the COPY /
CONTINUE / WAKE / attribute flip). ``start`` = connect, ``resume`` = vCPUs
started, ``end`` = last page placed.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fakekvm.abi import kvm
from fakekvm.kernel.seam import Kernel
from postcopy import threadprio
from postcopy import transport as tp
from postcopy.client import FetchClient, SourceLost
from postcopy.guestrun import DestVM, GuestFailed, VcpuResult, install_kick_handler
from postcopy.mechanisms.base import Mechanism, MemoryLayout
from postcopy.pages import Bitmap
from postcopy.protocol import VcpuStateKind
from postcopy.stats import MigrationStats


class MigrationFailed(RuntimeError):
    """The destination could not complete the migration (source lost, guest error, ...)."""


@dataclass
class DestinationResult:
    stats: MigrationStats
    vcpus: list[VcpuResult] = field(default_factory=list)
    #: pages the guest wrote on the destination (KVM dirty log), one bit a page
    dirty: bytes = b""
    #: counters from the mechanism (EEXIST, EAGAIN, explicit wakes)
    placer: dict[str, int] = field(default_factory=dict)


class Destination:
    """One incoming migration; see the module docstring.

    ``connect`` makes the two transports (demand, bulk); the default connects to
    ``address``. ``run_vcpus=False`` restores the vCPUs but does not run them
    (an idle guest). ``pin`` pins the vCPU threads, the fault thread (with vCPU
    0) and the bulk receiver to CPUs. ``inspect(dest)`` is called after the
    vCPUs ended and before memory is released (digest compare).
    """

    def __init__(
        self,
        kernel: Kernel,
        mechanism: Mechanism,
        *,
        address: tp.Address | None = None,
        connect: Callable[[], tuple[tp.Transport, tp.Transport]] | None = None,
        run_vcpus: bool = True,
        pin: bool = False,
        dirty_log: bool = False,
        request_timeout: float = 30.0,
        bulk_nice: int = 0,
        demand_slice_ns: int = 0,
        demand_rt: bool = False,
        fault_threads: int = 1,
        yield_to_demand: float = 0.0,
        progress: Callable[[int, int], None] | None = None,
        inspect: Callable[[Destination], None] | None = None,
        kvm_path: str = "/dev/kvm",
    ) -> None:
        if connect is None:
            if address is None:
                raise ValueError("Destination needs an address or a connect function")
            addr = address

            def connect() -> tuple[tp.Transport, tp.Transport]:
                return tp.connect(addr, nodelay=True), tp.connect(addr)

        self.kernel = kernel
        self.mechanism = mechanism
        self._connect = connect
        self.run_vcpus = run_vcpus
        self.pin = pin
        self.dirty_log = dirty_log
        self.request_timeout = request_timeout
        self.bulk_nice = bulk_nice
        self.demand_slice_ns = demand_slice_ns
        self.demand_rt = demand_rt
        self.fault_threads = max(1, fault_threads)
        self.yield_to_demand = yield_to_demand
        self.progress = progress
        self.inspect = inspect
        self.kvm_path = kvm_path
        self.stop = threading.Event()  # FaultContext.stop: the fault thread ends
        self._lock = threading.Lock()
        self._demand_idle = threading.Condition(self._lock)
        self._wake = threading.Event()  # something changed: the main thread looks
        self._errors: list[BaseException] = []
        self._open: dict[int, list[tuple[int, int]]] = {}  # page -> [(vcpu, t_begin)]
        self._tid_vcpu: dict[int, int] = {}
        #: live vCPU threads (pthread ids) for the kick signal; an ended thread leaves under
        #: the lock, so `_abort` never signals a thread that has gone (undefined behaviour:
        #: it crashed the process with SIGSEGV)
        self._idents: dict[int, int] = {}
        self._idents_lock = threading.Lock()
        self._bulk_pinned = False
        #: background pipeline (mechanism.bulk_slots > 1): free staging slots, and the
        #: batches received and waiting for the placer thread
        self._slots = max(1, mechanism.bulk_slots)
        self._free_slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(self._slots):
            self._free_slots.put(i)
        self._placeq: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._bulk_slot = 0
        self._placer: threading.Thread | None = None
        self._placer_stopped = False
        self.client: FetchClient | None = None
        self.vm: DestVM | None = None
        self.stats = MigrationStats(1)
        self.placed = Bitmap(0)
        self.nr_placed = 0
        self.layout = MemoryLayout(0)
        self.results: list[VcpuResult] = []
        self.dirty = b""

    # -- FaultContext --------------------------------------------------------------------
    def vcpu_of_tid(self, tid: int) -> int:
        return self._tid_vcpu.get(tid, -1)

    def fault_observed(self, page: int, vcpu: int, t_ns: int) -> bool:
        with self._lock:
            self.stats.fault_begin(vcpu, t_ns)
            if self.placed.buf[page >> 3] & (1 << (page & 7)):
                return True
            self._open.setdefault(page, []).append((vcpu, t_ns))
            return False

    def fault_resolved_now(self, page: int, vcpu: int, t_begin_ns: int) -> None:
        t = self.kernel.monotonic_ns()
        with self._lock:
            self.stats.fault_end(vcpu, t_begin_ns, t)

    def fetch(self, pages: list[int]) -> None:
        client = self.client
        assert client is not None
        if len(pages) == 1:  # the usual fault: one page, one request
            client.fetch(pages[0], 1, self.request_timeout)
            return
        runs: list[tuple[int, int]] = []
        for p in sorted(set(pages)):
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        for s, c in runs:
            client.request(s, c)
        for s, c in runs:
            client.wait_pages(s, c, self.request_timeout)

    def pages_removed(self, start: int, count: int) -> None:
        """Nothing to undo: a later fault on a removed page is resolved with zeros."""

    # -- PageSink ------------------------------------------------------------------------
    def buffer_for(self, start: int, count: int, demand: bool) -> memoryview:
        if not demand and self.yield_to_demand and self._open:
            # a vCPU waits for a page: let its request and reply have the CPU(s) first
            with self._demand_idle:
                self._demand_idle.wait_for(lambda: not self._open, self.yield_to_demand)
        if not demand and not self._bulk_pinned:
            self._bulk_pinned = True
            if self.pin:
                cpus = sorted(os.sched_getaffinity(0))
                os.sched_setaffinity(0, {cpus[-1]})
            # the background push yields the CPU to vCPUs and the demand path
            threadprio.background(self.bulk_nice)
        if not demand and self._slots > 1:
            slot = self._take_slot()
            self._bulk_slot = slot
            return self.mechanism.buffer_for_slot(start, count, slot)
        return self.mechanism.buffer_for(start, count, demand)

    def _take_slot(self) -> int:
        """A free bulk staging slot (the placer thread gives them back after each COPY)."""
        while True:
            try:
                return self._free_slots.get(timeout=0.2)
            except queue.Empty:
                if self._placer_stopped:
                    raise ConnectionAbortedError("the bulk placer has stopped") from None

    def placed_pages(self, start: int, count: int, demand: bool) -> None:
        if not demand and self._slots > 1:
            # the receiver goes on with the next batch; the placer thread COPYs this one
            self._placeq.put((start, count, self._bulk_slot))
            return
        self.mechanism.place(start, count, demand)
        self._account(start, count, demand)

    def _placer_thread(self) -> None:
        """Places the background batches the bulk receiver staged, in arrival order."""
        threadprio.background(self.bulk_nice)
        mech = self.mechanism
        failed = False
        while True:
            item = self._placeq.get()
            if item is None:
                return
            start, count, slot = item
            try:
                if not failed:
                    mech.place_slot(start, count, slot)
                    self._account(start, count, False)
            except BaseException as e:
                failed = True  # keep handing slots back: the receiver must not block
                if not self.stop.is_set():
                    self._fail(e)
            finally:
                self._free_slots.put(slot)

    def _stop_placer(self, th: threading.Thread | None) -> None:
        if th is not None:
            self._placeq.put(None)
            th.join(10.0)
        self._placer_stopped = True

    def _account(self, start: int, count: int, demand: bool) -> None:
        """Pages are visible to the guest: count them and end the faults they resolve.

        The clock is read only when a fault is open (a demand page always has one): most
        background batches resolve none, and every clock read is a kernel call a recording
        pays for. A fault that opens between the check and the lock is ended with a clock
        read after the lock is dropped (no kernel call under the lock)."""
        t = self.kernel.monotonic_ns() if self._open else None
        st = self.stats
        late: list[tuple[int, int]] = []
        with self._lock:
            already = self.placed.count(start, count)
            if already < count:
                self.placed.set_range(start, count)
            self.nr_placed += count - already
            st.pages_duplicate += already
            if demand:
                st.pages_demand += count
            else:
                st.pages_background += count
            open_ = self._open
            if open_:
                if count <= len(open_):  # look the placed pages up (a demand page: one)
                    ended = [f for page in range(start, start + count) for f in open_.pop(page, ())]
                else:  # a big batch: look the few open faults up
                    end = start + count
                    pages = [p for p in open_ if start <= p < end]
                    ended = [f for page in pages for f in open_.pop(page)]
                if t is None:
                    late = ended
                else:
                    for vcpu, t0 in ended:
                        st.fault_end(vcpu, t0, t)
                if not open_:
                    self._demand_idle.notify_all()
            done = self.nr_placed == self.layout.nr_pages
        if late:
            t = self.kernel.monotonic_ns()
            with self._lock:
                for vcpu, t0 in late:
                    st.fault_end(vcpu, t0, t)
        if self.progress is not None:
            self.progress(self.nr_placed, self.layout.nr_pages)
        if done:
            self._wake.set()

    # -- threads ---------------------------------------------------------------------------
    def _fail(self, e: BaseException) -> None:
        with self._lock:
            self._errors.append(e)
        self._wake.set()

    def _pin(self, index: int) -> None:
        """Placement of a fault or vCPU thread: pinned (``pin``) and a short slice."""
        if self.pin:
            threadprio.pin(index)
        if self.demand_slice_ns:
            threadprio.latency_sensitive(self.demand_slice_ns)

    def _fault_thread(self, j: int) -> None:
        try:
            self._pin(j)  # fault thread j shares a CPU with vCPU j
            if self.demand_rt:
                threadprio.realtime()
            self.mechanism.run_fault_loop(self)
        except BaseException as e:
            if not self.stop.is_set():
                self._fail(e)

    def _vcpu_thread(self, i: int) -> None:
        vm = self.vm
        assert vm is not None
        try:
            self._pin(i)
            self._tid_vcpu[self.kernel.gettid()] = i
            self._idents[i] = threading.get_ident()
            res = vm.run(i, on_memory_fault=self._on_memory_fault)
            self.results[i] = res
            if res.error is not None and not vm.stopping:
                self._fail(GuestFailed(f"vCPU {i}: {res.error}"))
        except BaseException as e:
            if not vm.stopping:
                self._fail(e)
        finally:
            with self._idents_lock:
                self._idents.pop(i, None)
            self._wake.set()

    def _on_memory_fault(self, vcpu: int, run: memoryview) -> bool:
        return self.mechanism.on_vcpu_exit(self, vcpu, run)

    def _watch_complete(self) -> None:
        client = self.client
        assert client is not None
        try:
            client.wait_complete()
        except BaseException as e:
            self._fail(e)
        self._wake.set()

    # -- the migration ----------------------------------------------------------------------
    def run(self) -> DestinationResult:
        install_kick_handler()
        k = self.kernel
        t_start = k.monotonic_ns()
        demand, bulk = self._connect()
        try:
            client = FetchClient(demand, sink=_Sink(self))
        except BaseException:
            bulk.close()
            raise
        self.client = client
        self.layout = MemoryLayout(client.nr_pages * client.page_size, client.page_size)
        nr_vcpus = len(client.vcpu_states)
        self.stats = MigrationStats(
            nr_vcpus, page_size=client.page_size, guest_size=self.layout.mem_size
        )
        self.stats.start_ns = t_start
        self.placed = Bitmap(self.layout.nr_pages)
        self.results = [VcpuResult(i) for i in range(nr_vcpus)]
        mech = self.mechanism
        threads: list[threading.Thread] = []
        fault_threads: list[threading.Thread] = []
        armed = False
        try:
            mech.arm(k, self.layout)
            armed = True
            if mech.places_before_bind:  # background pages flow while the VM is built
                self._start_bulk(client, bulk)
            self.vm = vm = DestVM(k, mech.vm_type, nr_vcpus, self.kvm_path)
            if self.dirty_log and mech.supports_dirty_log:
                mech.slot_flags |= kvm.KVM_MEM_LOG_DIRTY_PAGES
            mech.bind(vm)
            for i, blobs in enumerate(client.vcpu_states):
                vm.restore(i, blobs[VcpuStateKind.REGS], blobs[VcpuStateKind.SREGS])
            if mech.needs_fault_thread:
                for j in range(self.fault_threads):
                    th = threading.Thread(
                        target=self._fault_thread, args=(j,), name=f"postcopy-fault{j}", daemon=True
                    )
                    fault_threads.append(th)
                    th.start()
            if not mech.places_before_bind:
                self._start_bulk(client, bulk)
            if self.run_vcpus:
                for i in range(nr_vcpus):
                    th = threading.Thread(
                        target=self._vcpu_thread, args=(i,), name=f"vcpu{i}", daemon=True
                    )
                    threads.append(th)
            self.stats.resume_ns = k.monotonic_ns()
            for th in threads:
                th.start()
            watcher = threading.Thread(
                target=self._watch_complete, name="postcopy-complete", daemon=True
            )
            watcher.start()
            while True:
                self._wake.wait()
                self._wake.clear()
                with self._lock:
                    if self._errors:
                        raise self._errors[0]
                    if self.nr_placed == self.layout.nr_pages:
                        break
            self.stats.end_ns = k.monotonic_ns()
            mech.complete()
            self._stop_fault_threads(fault_threads)
            client.wait_complete(self.request_timeout)
            client.finish()
            self._stop_placer(self._placer)
            for th in threads:
                th.join()
            with self._lock:
                if self._errors:
                    raise self._errors[0]
            self.stats.requests = client.requests
            self.stats.bytes = client.bytes_received
            result = DestinationResult(self.stats, list(self.results))
            if self.dirty_log and mech.supports_dirty_log:
                self.dirty = result.dirty = vm.dirty_log(0, self.layout.nr_pages)
            placer = getattr(mech, "placer", None)
            if placer is not None:
                result.placer = {
                    "eexist": placer.eexist, "eagain": placer.eagain, "wakes": placer.wakes
                }  # fmt: skip
            if self.inspect is not None:
                self.inspect(self)
            return result
        except BaseException as e:
            self._abort(threads, fault_threads)
            if isinstance(e, (SourceLost, ConnectionError)):
                raise MigrationFailed(
                    f"source lost: {e} ({self.layout.nr_pages - self.nr_placed} of "
                    f"{self.layout.nr_pages} pages never arrived)"
                ) from e
            if isinstance(e, TimeoutError):
                raise MigrationFailed(f"source did not answer: {e}") from e
            raise
        finally:
            self._close(armed, threads)

    def _start_bulk(self, client: FetchClient, bulk: tp.Transport) -> None:
        """Start the placer thread (``bulk_slots > 1``) and open the bulk channel."""
        if self._slots > 1:
            self._placer = threading.Thread(
                target=self._placer_thread, name="postcopy-placer", daemon=True
            )
            self._placer.start()
        client.attach_bulk(bulk)

    def _stop_fault_threads(self, ths: list[threading.Thread]) -> None:
        self.stop.set()
        self.mechanism.kick()  # the eventfd stays readable: every poller wakes
        for th in ths:
            th.join(10.0)

    def _abort(
        self, threads: list[threading.Thread], fault_threads: list[threading.Thread]
    ) -> None:
        vm = self.vm
        if vm is not None:
            with self._idents_lock:
                vm.interrupt(dict(self._idents))
        self._stop_fault_threads(fault_threads)
        self._stop_placer(self._placer)
        if self.client is not None:
            self.client.close(2.0)
        try:
            self.mechanism.complete()  # wakes vCPUs sleeping on missing pages
        except OSError:
            pass
        for th in threads:
            th.join(2.0)

    def _close(self, armed: bool, threads: list[threading.Thread]) -> None:
        if any(th.is_alive() for th in threads):
            return  # a vCPU is stuck in KVM_RUN: leave its fds and memory alone
        if self.vm is not None:
            self.vm.close()
        if armed:
            self.mechanism.disarm()

    def guest_view(self) -> memoryview:
        return self.mechanism.guest_view()

    def dirty_bits(self) -> bytes:
        """The KVM dirty log of the guest memory slot (``dirty_log=True``), one bit a page."""
        return self.dirty


class _Sink:
    """The :class:`~postcopy.client.PageSink` of a destination."""

    def __init__(self, dest: Destination) -> None:
        self.dest = dest

    def buffer_for(self, start: int, count: int, demand: bool) -> memoryview:
        return self.dest.buffer_for(start, count, demand)

    def placed(self, start: int, count: int, demand: bool) -> None:
        self.dest.placed_pages(start, count, demand)
