"""`fakekvm bench` runs each workload on both kernels in one process and reports the ratio."""

from __future__ import annotations

import json

import pytest

from tools import bench
from tools.cli import main


def test_result_ratio_and_target() -> None:
    r = bench.Result("x", "µs", real=2.0, fake=5.0, target="fake/real <= 3")
    assert r.ratio == 2.5 and r.met is True
    r = bench.Result("x", "pages/s", real=100.0, fake=50.0, target="fake/real >= 1")
    assert r.ratio == 0.5 and r.met is False
    assert bench.Result("x", "u", None, 1.0, "fake/real <= 1").met is None


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_bench_reports_both_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--repeat", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == ["check_extension", "first_touch", "uffd_fault", "uffd_fault_batch"]
    for d in data:
        assert d["real"] > 0 and d["fake"] > 0 and d["ratio"] == pytest.approx(d["fake"] / d["real"])
