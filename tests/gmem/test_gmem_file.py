"""guest_memfd on both kernels: every row of the live 6.18 table (uapi.md §4).

Each scenario of :mod:`fakekvm.testing.gmem_scenarios` runs on RealKernel (marked
``real_kernel``) and on FakeKernel(profile="6.18-pvm"); both must answer exactly what
the live kernel answered when the table was recorded (``EXPECTED_618``), so the real
run also guards the recording.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakekvm.fake import FakeKernel
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import Kernel
from fakekvm.testing import gmem_scenarios as S


@pytest.fixture(params=[pytest.param("real", marks=pytest.mark.real_kernel), "fake"], ids=["real", "fake"])
def kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    if request.param == "real":
        yield RealKernel()
        return
    k = FakeKernel(profile="6.18-pvm")
    reason = S.fake_unready_reason(k)
    if reason is not None:
        k.shutdown()
        pytest.skip(reason)
    yield k
    k.shutdown()


@pytest.mark.parametrize("name", list(S.SCENARIOS))
def test_gmem_scenario_matches_live_table(kernel: Kernel, name: str) -> None:
    got = S.SCENARIOS[name](kernel)
    want = S.EXPECTED_618[name]
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    assert not diff, f"{kernel.name}: (got, want) per differing row: {diff}"
    assert set(got) == set(want)


def test_gmem_table_has_the_brief_rows() -> None:
    """The recorded table holds the rows the brief names, with the live answers."""
    e = S.EXPECTED_618
    assert e["create"]["flags_bit2"] == "EINVAL" and e["create"]["size_0x0"] == "EINVAL"
    assert e["create"]["size_0x800"] == "EINVAL" and e["create"]["reserved_nonzero"] == "fd"
    assert e["file_ops"]["f3_read"] == e["file_ops"]["f3_write"] == "EINVAL"
    assert e["file_ops"]["f3_pread"] == e["file_ops"]["f3_lseek"] == "ESPIPE"
    assert e["file_ops"]["f3_ftruncate_same"] == "EINVAL"
    assert e["file_ops"]["f3_fstat"][:2] == ("0o100600", 8 * S.PAGE)
    assert e["mmap"]["none_rw_shared"] == "ENODEV" and e["mmap"]["both_rw_private"] == "EINVAL"
    f = e["fallocate"]
    assert f["f3_keep_inside"] == "ok" and f["f3_keep_beyond"] == f["f3_keep_straddle"] == "EINVAL"
    assert f["f3_punch_beyond"] == "ok" and f["f3_mode0"] == f["f3_zero_keep"] == "ENOTSUP"
    assert f["f3_keep_unaligned_off"] == f["f3_keep_len0"] == "EINVAL"
    r = e["region2"]
    assert r["bind_overlap_file_range"] == r["bind_unaligned_offset"] == r["bind_beyond_file"] == "EINVAL"
    assert r["bind_other_vm_gmem"] == "EINVAL" and r["bind_fd_minus1"] == "EBADF"
    assert r["bind_readonly"] == r["bind_log_dirty"] == r["bind_via_v1"] == "EINVAL"
    assert r["reissue_identical"] == r["toggle_log_dirty"] == r["move"] == "EINVAL"
