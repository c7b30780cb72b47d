"""Whole migrations on this host's real kernel: uffd-missing and uffd-minor, 64 MiB guests.

Each run checks memory page by page against the source's digests (pages the
destination guest wrote itself, per the KVM dirty log, excepted) and the guest's
own reports: the verifier's checksum must equal ``expected_checksum`` of the
writer's pattern, the toucher's count and sum what the source predicts.
"""

from __future__ import annotations

import pytest

from fakekvm.guests import layout
from fakekvm.guests import workloads as w
from postcopy.migrate import MigrateOptions, MigrationReport, migrate, shares

pytestmark = [pytest.mark.real_kernel, pytest.mark.real_uffd]

MiB = 1 << 20
MEM = 64 * MiB
SEED = 7


def _run(
    mechanism: str, workload: str, vcpus: int, *, same_process: bool = True
) -> MigrationReport:
    o = MigrateOptions(
        kernel="real",
        mechanism=mechanism,
        mem_size=MEM,
        vcpus=vcpus,
        workload=workload,
        seed=SEED,
        same_process=same_process,
    )
    return migrate(o)


def _common(r: MigrationReport, vcpus: int) -> None:
    st = r.result.stats
    nr = MEM // layout.PAGE
    assert st.pages_demand + st.pages_background - st.pages_duplicate == nr
    assert st.end_ns >= st.resume_ns >= st.start_ns > 0
    assert st.bytes >= nr * layout.PAGE
    assert len(st.vcpu_blocked_ns) == vcpus
    assert sum(st.hist.buckets) == st.faults == len(st.samples)
    # only stacks and page tables may differ from the source
    assert r.excluded_pages < 64


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mechanism", ["uffd-missing", "uffd-minor"])
def test_verify_workload(mechanism: str, vcpus: int) -> None:
    r = _run(mechanism, "verify", vcpus)
    _common(r, vcpus)
    for res, (base, size) in zip(r.result.vcpus, shares(MEM, vcpus), strict=True):
        assert (res.stop, res.done) == ("done", 0)
        assert res.report64(0) == w.expected_checksum(SEED, base, size)


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("mechanism", ["uffd-missing", "uffd-minor"])
def test_random_workload(mechanism: str, vcpus: int) -> None:
    r = _run(mechanism, "random", vcpus)
    _common(r, vcpus)
    for i, (res, (base, size)) in enumerate(zip(r.result.vcpus, shares(MEM, vcpus), strict=True)):
        p = w.TouchParams(base, size, w.Pattern.RANDOM, seed=SEED + i)
        count, total = w.expected_touch_report(p, w.pattern_bytes(SEED, base, size))
        assert (res.stop, res.done) == ("done", 0)
        assert res.reports[0] == count == size // layout.PAGE
        assert res.report64(1) == total
    st = r.result.stats
    # a random reader faults: every fault was accounted to a vCPU and ended
    assert st.faults > 0 and sum(st.vcpu_faults) == st.faults - st.non_vcpu_faults
    assert st.pages_demand > 0


def test_two_processes_verify() -> None:
    """The default: the source in its own (spawned) process."""
    r = _run("uffd-missing", "verify", 2, same_process=False)
    _common(r, 2)
    assert r.source["result"] == "done"
    for res, (base, size) in zip(r.result.vcpus, shares(MEM, 2), strict=True):
        assert res.report64(0) == w.expected_checksum(SEED, base, size)


@pytest.mark.parametrize("workload", ["idle", "sequential", "hotset"])
def test_other_workloads(workload: str) -> None:
    r = _run("uffd-missing", workload, 1)
    _common(r, 1)
    if workload == "idle":
        assert r.result.stats.faults == 0 and r.result.stats.pages_demand == 0
    else:
        assert r.result.vcpus[0].done == 0


@pytest.mark.parametrize("mechanism", ["uffd-missing", "uffd-minor"])
def test_two_fault_threads(mechanism: str) -> None:
    o = MigrateOptions(
        mechanism=mechanism, mem_size=MEM, vcpus=2, workload="random", seed=SEED,
        same_process=True, fault_threads=2,
    )  # fmt: skip
    r = migrate(o)
    _common(r, 2)
    assert all(res.done == 0 for res in r.result.vcpus)


def test_pinned_threads_and_bulk_yielding_to_demand() -> None:
    o = MigrateOptions(
        mechanism="uffd-missing", mem_size=MEM, vcpus=2, workload="random", seed=SEED,
        same_process=True, pin=True, yield_to_demand=0.002,
    )  # fmt: skip
    r = migrate(o)
    _common(r, 2)
    assert all(res.done == 0 for res in r.result.vcpus)
