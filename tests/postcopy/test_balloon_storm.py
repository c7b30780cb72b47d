"""Balloon REMOVE/refault storms during post-copy (`postcopy.balloon`).

* the plan: only pages the guest never touches are ballooned, seeded, and the same every time;
* the final check really needs the exclusion (a ballooned page reads as zeros);
* a whole storm on the fake under the deterministic scheduler (uffd-missing, uffd-minor), memory
  verified except the ballooned pages;
* the REMOVE-while-COPY race, deterministically: a ``UFFDIO_COPY`` fails ``EAGAIN`` because a
  REMOVE is unread, the engine reads it and the same COPY then succeeds;
* the storm on this host's real kernel and on the fake in real time (uffd-missing, uffd-minor).
  The storm found three engine bugs, fixed in the engine: a placer retrying EAGAIN without
  yielding to the REMOVE's raiser (``UffdPlacer.drain``), a CONTINUE over a page MADV_REMOVE
  punched out of the page cache (``UffdMinor._cont``), and a kick signal to an ended vCPU
  thread (``Destination._idents_lock``).
"""

from __future__ import annotations

import errno
import itertools
from typing import Any

import pytest

from fakekvm.abi import uffd
from fakekvm.guests import layout
from fakekvm.guests import workloads as w
from postcopy.balloon import BalloonStorm, eligible_pages, plan_rounds
from postcopy.detmigrate import NetOptions, migrate_deterministic
from postcopy.migrate import MigrateOptions, MigrationMismatch, compare_memory, migrate, shares
from postcopy.pages import page_digests

MiB = 1 << 20
#: a slow simulated link: pages are still arriving while the storm runs
SLOW = NetOptions(latency_ns=200_000, bandwidth_Bps=200e6)


def _opts(mechanism: str = "uffd-missing", vcpus: int = 1, **kw: Any) -> MigrateOptions:
    return MigrateOptions(kernel="fake", profile="6.18-pvm", mechanism=mechanism,
                          mem_size=8 * MiB, vcpus=vcpus, workload="balloon", seed=7, **kw)  # fmt: skip


# -- the plan ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 2])
def test_only_pages_the_guest_never_touches_are_eligible(vcpus: int) -> None:
    mem = 8 * MiB
    el = eligible_pages(mem, vcpus, 7)
    assert not any(el[: layout.DATA_BASE // layout.PAGE])  # system area: never
    for i, (base, size) in enumerate(shares(mem, vcpus)):
        p = w.TouchParams(base, size, w.Pattern.HOTSET, seed=7 + i)
        for j in w.touch_order(p):
            assert el[base // layout.PAGE + j] == 0
    assert sum(el) > (mem - layout.DATA_BASE) // layout.PAGE // 2  # most of a hot-set guest


def test_plan_is_seeded_and_stays_in_eligible_pages() -> None:
    el = eligible_pages(8 * MiB, 1, 7)
    a = plan_rounds(el, 16, 32, seed=7)
    assert a == plan_rounds(el, 16, 32, seed=7)
    assert a != plan_rounds(el, 16, 32, seed=8)
    assert len(a) == 16
    for ranges in a:
        assert 0 < sum(n for _, n in ranges) <= 32  # 32 drawn; overlapping draws merge
        for s, n in ranges:
            assert all(el[s : s + n]), (s, n)
        for (s0, n0), (s1, _) in itertools.pairwise(ranges):
            assert s0 + n0 < s1  # sorted, merged: one madvise per run


def test_storm_refuses_mechanisms_without_remove_events() -> None:
    with pytest.raises(ValueError, match="REMOVE"):
        BalloonStorm.for_options(_opts("kvm-userfault"))
    assert BalloonStorm.for_options(MigrateOptions(workload="hotset")) is None


def test_ballooned_pages_must_be_excluded_from_the_memory_check() -> None:
    ps = layout.PAGE
    mem = bytearray(8 * ps)
    for i in range(8):
        mem[i * ps] = i + 1
    digests = page_digests(memoryview(mem), 0, 8)
    mem[3 * ps : 4 * ps] = bytes(ps)  # page 3 was ballooned: it reads as zeros now
    with pytest.raises(MigrationMismatch, match="page 3"):
        compare_memory(memoryview(mem), digests, b"", ps)
    assert compare_memory(memoryview(mem), digests, b"", ps, skip=bytes([1 << 3])) == 0


# -- whole storms on the fake, deterministic ---------------------------------------------------


def _check_storm(r: Any) -> dict[str, Any]:
    b = r.report.balloon
    assert b is not None
    assert b["rounds"] == 16 and b["inflations"] > 16
    assert b["refaults"] == b["pages_inflated"] > 16 * 16  # every inflated page refaulted
    assert 0 < b["ballooned"] <= b["pages_inflated"]
    assert b["started_on_run"]  # the guest was running: a storm during post-copy
    return b


@pytest.mark.parametrize("vcpus", [1, 2])
def test_storm_on_the_fake_uffd_missing(vcpus: int) -> None:
    r = migrate_deterministic(_opts(vcpus=vcpus), seed=3, net=SLOW)
    _check_storm(r)
    # the vCPUs' hot-set reports matched the source and memory did, ballooned pages aside
    # (migrate_deterministic raises MigrationMismatch otherwise); demand faults happened
    assert r.report.result.stats.pages_demand > 0
    # a REMOVE was unread while a resolution ioctl ran, and the engine got over it
    assert r.report.result.placer["eagain"] > 0


def test_storm_is_deterministic() -> None:
    a = migrate_deterministic(_opts(), seed=5, net=SLOW)
    b = migrate_deterministic(_opts(), seed=5, net=SLOW)
    assert (a.event_digest, a.memory_digest) == (b.event_digest, b.memory_digest)
    assert a.report.balloon == b.report.balloon


def test_storm_on_the_fake_uffd_minor() -> None:
    r = migrate_deterministic(_opts("uffd-minor"), seed=3, net=SLOW)
    _check_storm(r)


def test_remove_while_copy_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A REMOVE arrives while a UFFDIO_COPY is in flight: the COPY fails EAGAIN (copy field
    -EAGAIN, no progress), the engine reads the REMOVE and retries the same range, which then
    lands; injected REMOVEs before faults (``remove_before_fault``) add the reordered case."""
    from replay.events import Call
    from replay.recorder import RecordingKernel

    calls: list[Any] = []

    def record(k: Any) -> Any:
        return RecordingKernel(k, calls, mechanism="uffd-missing")

    r = migrate_deterministic(_opts(), seed=11, net=SLOW, inject={"remove_before_fault": 32},
                              record=record)  # fmt: skip
    _check_storm(r)
    seq = [c for c in calls if isinstance(c, Call)]
    copies = [c for c in seq if c.name == "UFFDIO_COPY"]
    failed = [c for c in copies if c.errno == errno.EAGAIN]
    assert failed, "no COPY met an unread REMOVE"
    fmt = uffd.uffdio_copy_fmt
    for c in failed:
        # signed: -EAGAIN (or 0) when the event was unread from the start; bytes done when the
        # REMOVE was raised while the COPY was under way (mfill_atomic rechecks mmap_changing)
        done, length = fmt.unpack(c.out)[4], fmt.unpack(c.inp)[2]
        assert done in (0, -errno.EAGAIN) or (0 < done < length and done % layout.PAGE == 0)
    # every failed COPY's range was later placed by a COPY that succeeded (or, for a page
    # REMOVE dropped after the engine placed it, resolved another way): none is left undone
    ok = {fmt.unpack(c.inp)[0] for c in copies if c.errno == 0}
    first_failed = {fmt.unpack(c.inp)[0] for c in failed}
    assert first_failed & ok
    # REMOVE messages were read by the engine (its reads of the userfaultfd)
    removes = sum(
        1
        for c in seq
        if c.op == "read" and c.fd_kind == "userfaultfd"
        for off in range(0, len(c.out), 32)
        if c.out[off] == uffd.UFFD_EVENT_REMOVE
    )
    b = r.report.balloon
    assert b is not None and removes >= b["inflations"]


# -- the real kernel ----------------------------------------------------------------------------


def _real(mechanism: str, vcpus: int, kernel: str = "real") -> Any:
    o = MigrateOptions(kernel=kernel, mechanism=mechanism, mem_size=16 * MiB, vcpus=vcpus,
                       workload="balloon", seed=7, same_process=True,
                       profile="6.18-pvm" if kernel == "fake" else None)  # fmt: skip
    return migrate(o)


@pytest.mark.parametrize("mechanism", ["uffd-missing", "uffd-minor"])
def test_storm_on_the_fake_in_real_time(mechanism: str) -> None:
    r = _real(mechanism, 2, kernel="fake")
    assert r.balloon is not None and r.balloon["ballooned"] > 0
    assert r.balloon["refaults"] == r.balloon["pages_inflated"]


@pytest.mark.real_kernel
@pytest.mark.real_uffd
@pytest.mark.parametrize("vcpus", [1, 2])
def test_storm_on_the_real_kernel_uffd_missing(vcpus: int) -> None:
    r = _real("uffd-missing", vcpus)
    b = r.balloon
    assert b is not None and b["rounds"] == 16 and b["inflations"] > 16
    assert b["refaults"] == b["pages_inflated"] and b["ballooned"] > 0
    assert "ballooned pages excluded" in r.summary()
    assert r.as_dict()["ballooned-pages"] == b["ballooned"]


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_storm_on_the_real_kernel_uffd_minor() -> None:
    r = _real("uffd-minor", 1)
    assert r.balloon is not None and r.balloon["ballooned"] > 0
