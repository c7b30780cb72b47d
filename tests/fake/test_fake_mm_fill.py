"""The userfaultfd side of the mm: registration splits, the fault hook, fill helpers."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator

import pytest

from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.fake.mm import (
    MM,
    UFFD_PAGEFAULT_FLAG_MINOR,
    UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VMA,
    Faulter,
    FaultResult,
    MFillError,
    fill,
)
from fakekvm.fake.waits import WaitQueue

P = mman.PAGE_SIZE
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS


@pytest.fixture
def k() -> Iterator[FakeKernel]:
    kern = FakeKernel()
    yield kern
    kern.shutdown()


class Ctx:
    """A minimal userfaultfd context: records faults, blocks until resolved."""

    def __init__(self, k: FakeKernel) -> None:
        self.wq = WaitQueue(k.waits, name="test-uffd")
        self.faults: list[tuple[int, int, Faulter]] = []
        self.arrived = threading.Event()
        self.resolved = False

    def handle_fault(self, mm: MM, vma: VMA, address: int, reason: int, who: Faulter) -> FaultResult | None:
        with self.wq.lock:
            self.faults.append((address, reason, who))
        self.arrived.set()
        self.wq.wait_event(lambda: self.resolved, what="test fault")
        return None  # retry

    def resolve(self) -> None:
        with self.wq.lock:
            self.resolved = True
            self.wq.wake_up_all_locked()


def test_register_splits_and_unregister_merges(k: FakeKernel) -> None:
    m = k.mmap(-1, 4 * P, RW, ANON)
    ctx = object()
    k.mm.register_range(m.address + P, m.address + 3 * P, ctx, VM_UFFD_MISSING)
    vmas = k.mm.vmas(m.address, m.end)
    assert [(v.start - m.address, v.uffd_ctx is ctx) for v in vmas] == [(0, False), (P, True), (3 * P, False)]
    with pytest.raises(OSError) as ei:
        k.mm.vma_for_range(m.address, m.address + 2 * P)  # spans two VMAs
    assert ei.value.errno == errno.ENOENT
    k.mm.unregister_range(m.address + P, m.address + 3 * P)
    assert len(k.mm.vmas(m.address, m.end)) == 1


def test_missing_fault_blocks_until_copy(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, ANON)
    ctx = Ctx(k)
    k.mm.register_range(m.address, m.end, ctx, VM_UFFD_MISSING)
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(k.mm.read(m.address + 8, 4, Faulter(vcpu=0, kind="vcpu"))))
    t.start()
    assert ctx.arrived.wait(10)
    addr, reason, who = ctx.faults[0]
    assert addr == m.address + 8 and reason == 0 and who.vcpu == 0
    assert fill.copy(k.mm, m.address, b"\x11" * P, P) == P
    ctx.resolve()
    t.join(10)
    assert result == [b"\x11" * 4]
    assert k.mm.is_present(m.address)


def test_write_fault_reason_and_wp(k: FakeKernel) -> None:
    m = k.mmap(-1, P, RW, ANON)
    ctx = Ctx(k)
    k.mm.register_range(m.address, m.end, ctx, VM_UFFD_MISSING | VM_UFFD_WP)
    fill.copy(k.mm, m.address, bytes(P), P, wp=True)
    t = threading.Thread(target=lambda: k.mm.touch(m.address, True))
    t.start()
    assert ctx.arrived.wait(10)
    assert ctx.faults[0][1] == UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE
    fill.writeprotect(k.mm, m.address, P, False)
    ctx.resolve()
    t.join(10)
    assert not t.is_alive()
    assert k.mm.touch(m.address, False) == FaultResult.OK


def test_minor_fault_on_shmem_and_continue(k: FakeKernel) -> None:
    fd = k.memfd_create("m")
    k.ftruncate(fd, 2 * P)
    k.pwrite(fd, b"cached", 0)
    a = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
    ctx = Ctx(k)
    k.mm.register_range(a.address, a.end, ctx, VM_UFFD_MINOR)
    t = threading.Thread(target=lambda: k.mm.touch(a.address, False))
    t.start()
    assert ctx.arrived.wait(10)
    assert ctx.faults[0][1] == UFFD_PAGEFAULT_FLAG_MINOR
    assert fill.cont(k.mm, a.address, P) == P
    ctx.resolve()
    t.join(10)
    assert bytes(a.view()[:6]) == b"cached"
    with pytest.raises(MFillError) as ei:
        fill.cont(k.mm, a.address, P)
    assert ei.value.errno == errno.EEXIST and ei.value.done == 0
    with pytest.raises(MFillError) as ei:
        fill.cont(k.mm, a.address + P, P)  # not in the page cache
    assert ei.value.errno == errno.EFAULT


def test_copy_partial_progress_and_errors(k: FakeKernel) -> None:
    m = k.mmap(-1, 3 * P, RW, ANON)
    k.mm.touch(m.address + P, True)
    with pytest.raises(MFillError) as ei:
        fill.copy(k.mm, m.address, bytes(2 * P), 2 * P)
    assert ei.value.errno == errno.EEXIST and ei.value.done == P
    with pytest.raises(OSError) as ei2:
        fill.copy(k.mm, m.address + 2 * P, bytes(P), P + 1)
    assert ei2.value.errno == errno.EINVAL
    bad = k.mm.arena.start  # PROT_NONE reservation: unreadable
    with pytest.raises(MFillError) as ei:
        fill.copy(k.mm, m.address + 2 * P, bad, P)
    assert ei.value.errno == errno.EFAULT and ei.value.done == 0
    # a src pointer into real memory works (UFFDIO_COPY's src)
    src = k.mmap(-1, P, RW, ANON)
    src.view()[:3] = b"src"
    assert fill.copy(k.mm, m.address + 2 * P, src.address, P) == P
    assert bytes(m.view()[2 * P : 2 * P + 3]) == b"src"


def test_shmem_copy_beyond_eof_is_efault(k: FakeKernel) -> None:
    fd = k.memfd_create("m")
    k.ftruncate(fd, P)
    a = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
    assert fill.copy(k.mm, a.address, b"z" * P, P) == P
    assert k.pread(fd, 1, 0) == b"z"
    with pytest.raises(MFillError) as ei:
        fill.copy(k.mm, a.address + P, b"z" * P, P)
    assert ei.value.errno == errno.EFAULT


def test_zeropage_poison_move(k: FakeKernel) -> None:
    m = k.mmap(-1, 4 * P, RW, ANON)
    m.view()[:1] = b"x"  # host write behind the fake's back: ZEROPAGE still zeroes
    assert fill.zeropage(k.mm, m.address, P) == P
    assert bytes(m.view()[:1]) == b"\0"
    assert fill.poison(k.mm, m.address + P, P) == P
    assert k.mm.touch(m.address + P) == FaultResult.SIGBUS
    with pytest.raises(MFillError) as ei:
        fill.poison(k.mm, m.address + P, P)
    assert ei.value.errno == errno.EEXIST
    k.mm.write(m.address + 2 * P, b"payload")
    assert fill.move(k.mm, m.address + 3 * P, m.address + 2 * P, P) == P
    assert bytes(m.view()[3 * P : 3 * P + 7]) == b"payload"
    assert bytes(m.view()[2 * P : 2 * P + 7]) == bytes(7)
    assert not k.mm.is_present(m.address + 2 * P) and k.mm.is_present(m.address + 3 * P)
    with pytest.raises(MFillError) as ei:
        fill.move(k.mm, m.address + 3 * P, m.address, P)  # hole source? no: dst populated
    assert ei.value.errno == errno.EEXIST


def test_shutdown_wakes_a_blocked_fault(k: FakeKernel) -> None:
    m = k.mmap(-1, P, RW, ANON)
    ctx = Ctx(k)
    k.mm.register_range(m.address, m.end, ctx, VM_UFFD_MISSING)
    err: list[OSError] = []

    def run() -> None:
        try:
            k.mm.touch(m.address)
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    assert ctx.arrived.wait(10)
    k.waits.shutdown()
    t.join(10)
    assert not t.is_alive()
    assert err and err[0].errno == errno.ESHUTDOWN


class RecordingCtx:
    """Answers every fault at once with SIGBUS (like a released uffd with UFFD_FEATURE_SIGBUS)."""

    def __init__(self) -> None:
        self.seen: list[Faulter] = []

    def handle_fault(self, mm: MM, vma: VMA, address: int, reason: int, who: Faulter) -> FaultResult | None:
        self.seen.append(who)
        return FaultResult.SIGBUS


def test_hook_result_ends_the_fault_and_user_flag_is_passed(k: FakeKernel) -> None:
    m = k.mmap(-1, P, RW, ANON)
    ctx = RecordingCtx()
    k.mm.register_range(m.address, m.end, ctx, VM_UFFD_MISSING)
    assert k.mm.fault(m.address, False, user=False, who=Faulter(vcpu=1, kind="kvm")) == FaultResult.SIGBUS
    assert k.mm.fault(m.address, True, user=True) == FaultResult.SIGBUS
    assert [(w.user, w.vcpu, w.kind) for w in ctx.seen] == [(False, 1, "kvm"), (True, None, "host")]
    assert not k.mm.is_present(m.address)
    k.mm.unregister_ctx(ctx)
    assert k.mm.fault(m.address, True, user=True) == FaultResult.OK


def test_copy_into_read_only_and_private_file_mappings(k: FakeKernel) -> None:
    ro = k.mmap(-1, P, mman.PROT_READ, ANON)
    assert fill.copy(k.mm, ro.address, b"r" * P, P) == P
    assert bytes(ro.view()[:1]) == b"r"
    assert k.mm.touch(ro.address, True) == FaultResult.SIGSEGV  # still read-only
    fd = k.memfd_create("m")
    k.ftruncate(fd, P)
    priv = k.mmap(fd, P, RW, mman.MAP_PRIVATE)
    assert fill.copy(k.mm, priv.address, b"p" * P, P) == P
    assert bytes(priv.view()[:1]) == b"p"
    assert k.pread(fd, 1, 0) == b"\0"  # a private copy: the file is untouched
