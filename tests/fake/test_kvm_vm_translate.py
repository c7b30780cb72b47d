"""FakeVm.translate (the vCPU's second-stage lookup) and the VM's listeners:
memslot changes, dirty-log re-protection and MMU notifiers reaching the vCPUs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.fake.kernel import FakeKernel
from fakekvm.fake.kvm.client import clear_dirty_log, create_vm, enable_cap, open_kvm, set_region
from fakekvm.fake.kvm.translate import Kind
from fakekvm.fake.kvm.vm import FakeVm

P = 4096
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
G0 = 0x100000


@dataclass
class RecordingVcpu:
    """Stands in for B's FakeVcpu: records what the VM tells its vCPUs."""

    vcpu_id: int = 0
    invalidations: list[tuple[int, int]] = field(default_factory=list)
    changes: int = 0

    def invalidate(self, gpa_start: int, gpa_end: int) -> None:
        self.invalidations.append((gpa_start, gpa_end))

    def memslots_changed(self) -> None:
        self.changes += 1

    def kick(self) -> None:
        pass

    def covered(self) -> set[int]:
        return {g for a, b in self.invalidations for g in range(a, b, P)}


@dataclass
class Env:
    k: FakeKernel
    vmfd: int
    vm: FakeVm
    vcpu: RecordingVcpu


def make_env(profile: str) -> Env:
    k = FakeKernel(profile=profile)
    vmfd = create_vm(k, open_kvm(k))
    vm = k.file(vmfd)
    assert isinstance(vm, FakeVm)
    rec = RecordingVcpu()
    vm.vcpus[0] = rec  # the listener interface is duck-typed
    return Env(k, vmfd, vm, rec)


@pytest.fixture
def env() -> Iterator[Env]:
    e = make_env("6.18-pvm")
    yield e
    e.k.shutdown()


def test_no_slot_and_readonly_are_mmio(env: Env) -> None:
    m = env.k.mmap(-1, 4 * P, RW, ANON)
    assert env.vm.translate(G0, False, False, vcpu=env.vcpu).kind is Kind.MMIO
    assert set_region(env.k, env.vmfd, 0, K.KVM_MEM_READONLY, G0, 4 * P, m.address) == 0
    w = env.vm.translate(G0 + P, True, False, vcpu=env.vcpu)
    assert (w.kind, w.gpa) == (Kind.MMIO, G0 + P)
    r = env.vm.translate(G0 + P + 123, False, False, vcpu=env.vcpu)
    assert (r.kind, r.gpa, r.hva, r.writable) == (Kind.RAM, G0 + P, m.address + P, False)
    assert env.vm.translate(G0 + 4 * P, False, False, vcpu=env.vcpu).kind is Kind.MMIO


def test_ram_translation_fields(env: Env) -> None:
    m = env.k.mmap(-1, 8 * P, RW, ANON)
    assert set_region(env.k, env.vmfd, 3, 0, G0, 8 * P, m.address) == 0
    t = env.vm.translate(G0 + 5 * P + 7, False, True, vcpu=env.vcpu)
    assert t.kind is Kind.RAM and t.writable
    assert (t.gpa, t.hva) == (G0 + 5 * P, m.address + 5 * P)
    assert (t.slot_base_gpa, t.slot_size, t.slot_hva) == (G0, 8 * P, m.address)
    # the guest's write lands in the host mapping
    memoryview(m).cast("B")[5 * P] = 0x5A  # type: ignore[arg-type]
    assert env.k.mm.read(t.hva, 1) == b"\x5a"
    assert env.vm.memslot_regions() == [(G0, 8 * P, m.address, 0)]


def test_dirty_logging_through_translate(env: Env) -> None:
    k, vm, v = env.k, env.vm, env.vcpu
    m = k.mmap(-1, 100 * P, RW, ANON)
    assert set_region(k, env.vmfd, 0, K.KVM_MEM_LOG_DIRTY_PAGES, G0, 100 * P, m.address) == 0
    r = vm.translate(G0 + 3 * P, False, False, vcpu=v)
    assert r.kind is Kind.RAM and not r.writable  # clean page: map read-only
    for page in (3, 9, 64, 99):
        assert vm.translate(G0 + page * P, True, False, vcpu=v).writable
    assert vm.translate(G0 + 3 * P, False, False, vcpu=v).writable  # dirty now
    v.invalidations.clear()
    bm = _get_log(env, 0)
    expect = bytearray(16)
    for page in (3, 9, 64, 99):
        expect[page // 8] |= 1 << (page % 8)
    assert bm == bytes(expect)
    # collection re-protected exactly the dirty pages (and told the vCPU)
    assert {G0 + p * P for p in (3, 9, 64, 99)} <= v.covered()
    assert not vm.translate(G0 + 3 * P, False, False, vcpu=v).writable
    assert _get_log(env, 0) == bytes(16)  # GET cleared the log


def test_manual_protect_clear_reprotects(env: Env) -> None:
    k, vm, v = env.k, env.vm, env.vcpu
    assert enable_cap(k, env.vmfd, K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1) == 0
    m = k.mmap(-1, 64 * P, RW, ANON)
    assert set_region(k, env.vmfd, 0, K.KVM_MEM_LOG_DIRTY_PAGES, G0, 64 * P, m.address) == 0
    vm.translate(G0 + 2 * P, True, False, vcpu=v)
    vm.translate(G0 + 5 * P, True, False, vcpu=v)
    v.invalidations.clear()
    assert _get_log(env, 0) == bytes([0x24]) + bytes(7)
    assert v.invalidations == []  # manual protect: GET does not re-protect
    assert clear_dirty_log(k, env.vmfd, 0, 0, 64, bytes([0x04]) + bytes(7)) == 0
    assert v.covered() == {G0 + 2 * P}
    assert _get_log(env, 0) == bytes([0x20]) + bytes(7)
    assert not vm.translate(G0 + 2 * P, False, False, vcpu=v).writable
    assert vm.translate(G0 + 5 * P, False, False, vcpu=v).writable


def _get_log(env: Env, slot: int) -> bytes:
    buf = env.k.mmap(-1, P, RW, ANON)
    env.k.ioctl(
        env.vmfd, K.KVM_GET_DIRTY_LOG, bytearray(K.kvm_dirty_log_fmt.pack(slot, 0, buf.address))
    )
    n = ((env.vm.memslot_at(G0).npages + 63) // 64) * 8  # type: ignore[union-attr]
    return bytes(memoryview(buf).cast("B")[:n])  # type: ignore[arg-type]


@pytest.mark.parametrize(("profile", "kind"), [("6.18-pvm", Kind.MMIO), ("6.18", Kind.FAULT)])
def test_bad_hva_follows_profile(profile: str, kind: Kind) -> None:
    e = make_env(profile)
    try:
        k = e.k
        m = k.mmap(-1, 4 * P, RW, ANON)
        k.munmap(m.address + P, P)  # page 1: unmapped
        k.mprotect(m.address + 2 * P, P, mman.PROT_NONE)  # page 2: PROT_NONE
        k.mprotect(m.address + 3 * P, P, mman.PROT_READ)  # page 3: read-only VMA
        assert set_region(k, e.vmfd, 0, 0, G0, 4 * P, m.address) == 0
        for page, write in ((1, False), (2, False), (3, True)):
            t = e.vm.translate(G0 + page * P + 8, write, False, vcpu=e.vcpu)
            assert (t.kind, t.gpa, t.fault_flags) == (kind, G0 + page * P, 0)
        t = e.vm.translate(G0 + 3 * P, False, False, vcpu=e.vcpu)
        assert t.kind is Kind.RAM and not t.writable  # readable, never writable
        assert e.vm.translate(G0, True, False, vcpu=e.vcpu).kind is Kind.RAM
    finally:
        e.k.shutdown()


def test_memfd_page_past_eof_is_bad_hva(env: Env) -> None:
    k = env.k
    fd = k.memfd_create("guest", 0)
    k.ftruncate(fd, P)
    m = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
    assert set_region(k, env.vmfd, 0, 0, G0, 2 * P, m.address) == 0
    assert env.vm.translate(G0, True, False, vcpu=env.vcpu).kind is Kind.RAM
    assert env.vm.translate(G0 + P, False, False, vcpu=env.vcpu).kind is Kind.MMIO


def test_mmu_notifier_reaches_vcpus(env: Env) -> None:
    k, v = env.k, env.vcpu
    m = k.mmap(-1, 16 * P, RW, ANON)
    assert set_region(k, env.vmfd, 0, 0, G0, 8 * P, m.address + 8 * P) == 0  # second half
    assert set_region(k, env.vmfd, 1, 0, 0x400000, 4 * P, m.address) == 0  # first 4 pages
    for g in (G0, G0 + 7 * P, 0x400000):
        env.vm.translate(g, True, False, vcpu=v)
    v.invalidations.clear()
    k.madvise(m.address + 2 * P, 8 * P, mman.MADV_DONTNEED)  # pages 2..9
    assert v.covered() == {0x402000, 0x403000, G0, G0 + P}
    v.invalidations.clear()
    k.munmap(m.address + 15 * P, P)
    assert v.covered() == {G0 + 7 * P}


def test_memslot_changes_notify(env: Env) -> None:
    k, v = env.k, env.vcpu
    m = k.mmap(-1, 4 * P, RW, ANON)
    assert set_region(k, env.vmfd, 0, 0, G0, 4 * P, m.address) == 0
    assert v.changes == 1 and v.invalidations == []
    assert set_region(k, env.vmfd, 0, 0, G0, 4 * P, m.address) == 0  # no change
    assert v.changes == 1
    assert set_region(k, env.vmfd, 0, 0, 2 * G0, 4 * P, m.address) == 0  # move
    assert v.changes == 2 and v.invalidations == [(G0, G0 + 4 * P)]
    assert env.vm.translate(G0, False, False, vcpu=v).kind is Kind.MMIO
    assert env.vm.translate(2 * G0, False, False, vcpu=v).hva == m.address
    assert set_region(k, env.vmfd, 0, K.KVM_MEM_LOG_DIRTY_PAGES, 2 * G0, 4 * P, m.address) == 0
    assert v.changes == 3 and v.invalidations[-1] == (2 * G0, 2 * G0 + 4 * P)
    assert set_region(k, env.vmfd, 0, 0, 0, 0, 0) == 0  # delete
    assert v.changes == 4 and v.invalidations[-1] == (2 * G0, 2 * G0 + 4 * P)
    assert env.vm.memslot_regions() == []


def test_vm_released_on_last_close() -> None:
    k = FakeKernel(profile="6.18-pvm")
    try:
        kvm = open_kvm(k)
        vmfd = create_vm(k, kvm)
        vm = k.file(vmfd)
        assert isinstance(vm, FakeVm)
        notifiers = len(k.mm._notifiers)
        vm.get()  # another holder (what a vCPU does)
        k.close(vmfd)
        assert not vm._released
        vm.put()
        assert vm._released
        assert len(k.mm._notifiers) == notifiers - 1
    finally:
        k.shutdown()


def test_concurrent_marking_and_harvesting_lose_nothing(env: Env) -> None:
    """A vCPU-like thread writes 2000 pages while another harvests the log: every page
    shows up in exactly one harvest (GET's fetch-and-clear is atomic against marking)."""
    import threading

    k, vm, v = env.k, env.vm, env.vcpu
    npages = 2048
    m = k.mmap(-1, npages * P, RW, ANON)
    assert set_region(k, env.vmfd, 0, K.KVM_MEM_LOG_DIRTY_PAGES, G0, npages * P, m.address) == 0
    out = k.mmap(-1, P, RW, ANON)
    start = threading.Barrier(2)
    done = threading.Event()

    def writer() -> None:
        start.wait()
        for page in range(2000):
            vm.translate(G0 + page * P, True, False, vcpu=v)
        done.set()

    seen: list[int] = []

    def harvest() -> None:
        k.ioctl(
            env.vmfd, K.KVM_GET_DIRTY_LOG, bytearray(K.kvm_dirty_log_fmt.pack(0, 0, out.address))
        )
        bm = bytes(memoryview(out).cast("B")[: npages // 8])  # type: ignore[arg-type]
        seen.extend(i for i in range(npages) if bm[i // 8] >> (i % 8) & 1)

    t = threading.Thread(target=writer)
    t.start()
    start.wait()
    rounds = 0
    while not done.is_set():
        harvest()
        rounds += 1
    t.join()
    harvest()
    assert sorted(seen) == list(range(2000))  # each page once: none lost, none doubled
    assert rounds >= 1
