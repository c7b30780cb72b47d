"""Statistics: QEMU's latency buckets, blocked time, percentiles, summaries."""

from __future__ import annotations

import json

from postcopy.stats import (
    BLOCKTIME_LATENCY_BUCKET_N,
    LatencyHistogram,
    MigrationStats,
    latency_bucket,
    percentile_exact,
    time_us_to_str,
)

US = 1000


def test_buckets_follow_qemu() -> None:
    # index = 63 - clz64(us) for us > 0, 0 for 0 us, clamped to 23
    assert BLOCKTIME_LATENCY_BUCKET_N == 24
    assert latency_bucket(0) == 0
    assert latency_bucket(999) == 0  # 0 us (integer microseconds, as QEMU divides)
    assert latency_bucket(1 * US) == 0
    assert latency_bucket(1999) == 0
    assert latency_bucket(2 * US) == 1
    assert latency_bucket(3 * US) == 1
    assert latency_bucket(4 * US) == 2
    assert latency_bucket(1023 * US) == 9
    assert latency_bucket(1024 * US) == 10
    assert latency_bucket((1 << 23) * US) == 23
    assert latency_bucket((1 << 40) * US) == 23  # clamped to the top bucket
    for us in range(1, 5000):
        i = latency_bucket(us * US)
        assert (1 << i) <= us < (1 << (i + 1))


def test_hmp_labels() -> None:
    assert time_us_to_str(512) == "512 us"
    assert time_us_to_str(1024) == "1 ms"
    assert time_us_to_str(65536) == "65 ms"
    assert time_us_to_str(1 << 20) == "1 sec"
    h = LatencyHistogram()
    h.add(150 * US)
    rows = h.rows()
    assert len(rows) == 24
    assert rows[7] == "  [ 128 us - 256 us ]:          1"
    assert rows[0].startswith("  [   1 us -   2 us ]")


def test_percentiles() -> None:
    s = list(range(1, 101))
    assert percentile_exact(s, 50) == 50
    assert percentile_exact(s, 99) == 99
    assert percentile_exact(s, 100) == 100
    assert percentile_exact([], 50) == 0
    h = LatencyHistogram()
    for _ in range(98):
        h.add(100 * US)  # bucket 6: [64, 128)
    h.add(3000 * US)  # bucket 11
    h.add(3000 * US)
    assert h.percentile_us(50) == 128
    assert h.percentile_us(99) == 4096


def test_blocked_time_per_vcpu_and_all_vcpus() -> None:
    st = MigrationStats(2)
    # vCPU 0 blocked [100, 400); vCPU 1 blocked [200, 300) and [350, 500)
    st.fault_begin(0, 100)
    st.fault_begin(1, 200)
    st.fault_end(1, 200, 300)
    st.fault_begin(1, 350)
    st.fault_end(0, 100, 400)
    st.fault_end(1, 350, 500)
    assert list(st.vcpu_blocked_ns) == [300, 250]
    assert list(st.vcpu_faults) == [1, 2]
    assert st.total_blocktime_ns == (300 - 200) + (400 - 350)
    assert sorted(st.samples) == [100, 150, 300]


def test_two_faults_open_on_one_vcpu_count_once() -> None:
    st = MigrationStats(1)
    st.fault_begin(0, 0)
    st.fault_begin(0, 10)
    st.fault_end(0, 0, 50)
    st.fault_end(0, 10, 80)
    assert st.vcpu_blocked_ns[0] == 80
    assert st.total_blocktime_ns == 80
    assert st.faults == 2


def test_summary_and_json() -> None:
    st = MigrationStats(2, guest_size=512 << 20)
    st.start_ns, st.resume_ns, st.end_ns = 0, 2_000_000, 302_000_000
    for i in range(100):
        st.record_fault(i % 2, 10_000_000 + i * 1000, 10_000_000 + i * 1000 + 150 * US)
    st.pages_demand, st.pages_background = 100, 131_000
    st.bytes = (st.pages_demand + st.pages_background) * 4096
    d = st.as_dict()
    json.dumps(d)
    assert d["downtime"] == 2 and d["total-time"] == 302
    assert d["postcopy-latency-dist"][7] == 100
    assert d["latency-p50-ns"] == 150 * US
    assert d["postcopy-vcpu-blocktime-ns"] == [50 * 150 * US, 50 * 150 * US]
    assert abs(d["demand-rate-pps"] - 100 / 0.3) < 1e-6
    text = st.summary()
    assert "Postcopy Latency Distribution:" in text
    assert "Overall demand paging rate:\t333.333333 pgs/sec" in text
    assert "Time (ms): \t\ttotal=302, down=2" in text
    assert json.loads(st.to_json())["faults"] == 100
