"""Per-fault round trip of one Python handler (MISSING + UFFDIO_COPY), real kernel vs fake.

pytest-benchmark is disabled by default (``--benchmark-disable`` in pyproject.toml): then each
case runs once as a smoke test. Run ``pytest tests/uffd/test_uffd_bench.py --benchmark-enable``
to measure; both threads are pinned to CPU 0 as in anchors.md's 9.6 µs figure.
"""

from __future__ import annotations

from typing import Any

import pytest

from fakekvm.kernel.real import RealKernel
from fakekvm.testing.uffd_scenarios import fault_round_trip


def _kernel(kind: str) -> Any:
    if kind == "real":
        return RealKernel()
    from fakekvm.fake import FakeKernel

    return FakeKernel(profile="6.18-pvm")


@pytest.mark.parametrize("kind", [pytest.param("real", marks=pytest.mark.real_uffd), "fake"])
def test_fault_round_trip(kind: str, benchmark: Any) -> None:
    k = _kernel(kind)
    try:
        per_fault = benchmark.pedantic(fault_round_trip, args=(k, 300), rounds=3, iterations=1)
    finally:
        k.shutdown()
    assert 0 < per_fault < 0.05  # seconds per fault: a generous bound, not a timing claim
