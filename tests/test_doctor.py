"""`fakekvm doctor` on this host and on hosts simulated with pyfakefs."""

from __future__ import annotations

import json
import os

import pytest
from pyfakefs import helpers as fake_ids
from pyfakefs.fake_filesystem import FakeFilesystem

from fakekvm.abi import kvm
from fakekvm.kernel import RealKernel
from tools import doctor
from tools.cli import main


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_doctor_on_this_host_reports_the_known_facts(capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor.probe(RealKernel())
    assert report.kvm.api_version == 12
    assert report.kvm.vcpu_mmap_size == 12288
    assert report.kvm.vm_types == ["KVM_X86_DEFAULT_VM"]
    assert report.kvm.guest_memfd_flags == 3
    assert report.kvm.guest_memfd_flag_names == [
        "GUEST_MEMFD_FLAG_MMAP",
        "GUEST_MEMFD_FLAG_INIT_SHARED",
    ]
    caps = {c.name: c for c in report.kvm.caps}
    assert caps["KVM_CAP_NR_MEMSLOTS"].system == 32764
    assert (caps["KVM_CAP_X2APIC_API"].system, caps["KVM_CAP_X2APIC_API"].vm) == (15, 11)
    assert report.uffd.features == 0x1FFFF
    assert len(report.uffd.feature_names) == 17
    assert "UFFD_FEATURE_MOVE" in report.uffd.feature_names
    assert report.uffd.api_ioctls == 0x8000000000000003
    modes = {(r.memory, r.mode): r for r in report.uffd.register_modes}
    assert modes[("anon", "MISSING")].ioctls == 0x13C
    assert modes[("anon", "MISSING|WP")].ioctls == 0x17C
    assert not modes[("anon", "MINOR")].ok
    assert modes[("shmem", "MISSING|MINOR")].ioctls == 0x1BC
    # The table names things; the CLI prints it and exits 0.
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "UFFD_FEATURE_MOVE" in out and "GUEST_MEMFD_FLAG_INIT_SHARED" in out
    assert "KVM_CAP_USER_MEMORY2" in out


@pytest.mark.real_kernel
def test_doctor_json_is_machine_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "--require", "kvm"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kvm"]["api_version"] == 12
    assert data["unmet"] == []


def _host(fs: FakeFilesystem, *, unprivileged: int = 0) -> None:
    fs.create_file("/proc/sys/kernel/osrelease", contents="6.18.0-simulated\n")
    fs.create_file("/proc/sys/vm/unprivileged_userfaultfd", contents=f"{unprivileged}\n")


def test_simulated_host_without_dev_kvm(fs: FakeFilesystem, capsys: pytest.CaptureFixture[str]) -> None:
    _host(fs)
    report = doctor.probe(RealKernel())
    assert report.kernel_release == "6.18.0-simulated"
    assert not report.kvm.present
    assert "/dev/kvm does not exist" in (report.kvm.error or "")
    assert report.hugepages == []
    assert report.tracing.path is None
    # Without --require the doctor reports and exits 0 ...
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "/dev/kvm does not exist" in out
    # ... with it, the unmet need is named and the exit is non-zero.
    assert main(["doctor", "--require", "kvm,hugepages"]) == 1
    out = capsys.readouterr().out
    assert "kvm: /dev/kvm does not exist" in out
    assert "hugepages: no pool" in out


def test_simulated_dev_kvm_that_is_not_kvm(fs: FakeFilesystem) -> None:
    _host(fs)
    fs.create_file("/dev/kvm", st_mode=0o020600)
    report = doctor.probe(RealKernel())
    assert report.kvm.present
    assert report.kvm.api_version != kvm.KVM_API_VERSION
    assert report.kvm.error is not None
    assert doctor.unmet(report, ["kvm"])


def test_simulated_dev_userfaultfd_without_permission(fs: FakeFilesystem) -> None:
    _host(fs)
    fs.create_file("/dev/userfaultfd", st_mode=0o020600)
    os.chown("/dev/userfaultfd", 0, 0)
    fake_ids.set_uid(1000)
    fake_ids.set_gid(1000)
    try:
        facts = doctor.probe_uffd(RealKernel())
    finally:
        fake_ids.set_uid(0)
        fake_ids.set_gid(0)
    assert facts.dev_present
    assert not facts.dev_usable
    assert "EACCES" in (facts.dev_error or "")
    assert facts.dev_mode is not None and facts.dev_mode.startswith("crw-------")
    report = doctor.DoctorReport(
        kernel_release="x", running_as_root=False, kvm=doctor.KvmFacts("/dev/kvm", False),
        uffd=facts, hugepages=[], tracing=doctor.TracingFacts(None, 0, ""),
    )
    assert doctor.unmet(report, ["dev-userfaultfd"]) == [f"dev-userfaultfd: {facts.dev_error}"]


@pytest.mark.parametrize("value", [0, 1])
def test_simulated_unprivileged_userfaultfd_sysctl(fs: FakeFilesystem, value: int) -> None:
    _host(fs, unprivileged=value)
    facts = doctor.probe_uffd(RealKernel())
    assert facts.unprivileged_userfaultfd == value
    assert not facts.dev_present and facts.dev_error == "/dev/userfaultfd does not exist"
    text = doctor.format_report(
        doctor.DoctorReport("x", False, doctor.KvmFacts("/dev/kvm", False), facts, [],
                            doctor.TracingFacts(None, 0, "none"))
    )
    assert ("needs UFFD_USER_MODE_ONLY" in text) == (value == 0)


def test_simulated_hugepage_pools_and_tracefs(fs: FakeFilesystem) -> None:
    _host(fs)
    for size, nr, free in ((2048, 16, 12), (1048576, 1, 1)):
        base = f"/sys/kernel/mm/hugepages/hugepages-{size}kB"
        fs.create_file(f"{base}/nr_hugepages", contents=f"{nr}\n")
        fs.create_file(f"{base}/free_hugepages", contents=f"{free}\n")
    for ev in ("kvm_exit", "kvm_entry", "kvm_page_fault"):
        fs.create_file(f"/sys/kernel/tracing/events/kvm/{ev}/format", contents="name: x\n")
    pools = doctor.probe_hugepages()
    assert [(p.size_kib, p.nr, p.free) for p in pools] == [(1048576, 1, 1), (2048, 16, 12)]
    tracing = doctor.probe_tracing()
    assert tracing.path == "/sys/kernel/tracing" and tracing.kvm_events == 3
