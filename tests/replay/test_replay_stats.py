"""`replay.stats`: fault counts, QEMU's latency buckets, per-vCPU blocked time, calls."""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path
from typing import Any

import pytest

from postcopy.detmigrate import NetOptions
from postcopy.migrate import MigrateOptions
from postcopy.stats import latency_bucket
from replay.det import record_deterministic
from replay.events import Call, Event, Fault, Header
from replay.format import open_trace
from replay.show import ShowFilter, show_lines
from replay.stats import compute_stats, format_stats, union_ns
from tools.cli import main


def _f(vcpu: int, t0: int, lat: int, how: str = "copy", access: str = "read") -> Fault:
    return Fault(seq=0, tid=100 + vcpu, vcpu=vcpu, gpa=0x1000, access=access,
                 mechanism="uffd-missing", observed_ns=t0,
                 resolved_ns=t0 + lat if lat >= 0 else 0, how=how)  # fmt: skip


def _events() -> list[Event]:
    return [
        Call(seq=0, tid=1, t_ns=0, dur_ns=100, op="ioctl", name="KVM_RUN"),
        Call(seq=1, tid=1, t_ns=200, dur_ns=300, op="ioctl", name="KVM_RUN", errno=4),
        Call(seq=2, tid=2, t_ns=1000, dur_ns=50, op="read"),
        # vCPU 0: two overlapping faults [1000, 4000) and [2000, 5000) -> 4000 ns blocked
        _f(0, 1000, 3000),
        _f(0, 2000, 3000, how="wake", access="write"),
        # vCPU 1: [10_000, 10_500) and, disjoint, [20_000, 120_000)
        _f(1, 10_000, 500),
        _f(1, 20_000, 100_000, how="zeropage"),
        _f(1, 30_000, -1),  # unresolved
        # a non-vCPU (host thread) fault
        _f(-1, 40_000, 2_000_000),
    ]


def test_counts_buckets_percentiles_and_blocked_time() -> None:
    st = compute_stats(Header(mechanism="uffd-missing"), _events())
    assert st.calls == 3 and st.faults == 6 and st.unresolved == 1
    assert dict(st.by_vcpu) == {0: 2, 1: 3, -1: 1}
    assert st.by_how["copy"] == 4 and st.by_how["wake"] == 1 and st.by_how["zeropage"] == 1
    assert st.by_access["write"] == 1 and st.by_access["read"] == 5
    # latencies 3 µs, 3 µs, 0.5 µs, 100 µs, 2000 µs: QEMU buckets 1, 1, 0, 6, 10
    b = st.hist.buckets
    assert b[0] == 1 and b[1] == 2 and b[6] == 1 and b[10] == 1 and sum(b) == 5
    assert [latency_bucket(x) for x in (500, 3000, 100_000, 2_000_000)] == [0, 1, 6, 10]
    assert st.percentile_ns(50) == 3000
    assert st.percentile_ns(90) == 2_000_000
    assert st.blocked_ns == {0: 4000, 1: 100_500}
    run = st.by_name["KVM_RUN"]
    assert (run.count, run.total_ns, run.errors, run.mean_ns) == (2, 400, 1, 200.0)
    assert st.by_name["read"].count == 1


def test_json_and_text_forms() -> None:
    st = compute_stats(Header(), _events())
    d = json.loads(json.dumps(st.as_dict()))
    assert d["faults"] == 6 and d["unresolved-faults"] == 1
    assert d["latency-p50-ns"] == 3000 and d["latency-max-ns"] == 2_000_000
    assert d["latency-p99-ns"] == 2_000_000 and d["latency-p90-ns"] == 2_000_000
    assert d["vcpu-blocked-ns"] == {"0": 4000, "1": 100500}
    assert len(d["latency-dist"]) == 24 and d["latency-dist"][1] == 2
    assert d["calls-per-name"]["KVM_RUN"] == {"count": 2, "total-ns": 400, "mean-ns": 200,
                                              "errors": 1}  # fmt: skip
    text = format_stats(st, Header(kernel="fake"))
    assert "faults: 6 (unresolved 1)" in text
    assert "Postcopy Latency Distribution:" in text
    assert "  [   2 us -   4 us ]:          2" in text
    assert "vcpu 0: 0.004 ms (2 faults)" in text
    assert "p50 3.0 µs" in text


def test_union_of_intervals() -> None:
    s = array("Q", [10, 0, 5, 100, 100])
    e = array("Q", [20, 6, 12, 110, 105])
    assert union_ns(s, e) == (20 - 0) + (110 - 100)
    assert union_ns(array("Q"), array("Q")) == 0


def test_empty_trace() -> None:
    st = compute_stats(Header(), [])
    assert st.as_dict()["faults"] == 0 and st.as_dict()["latency-p99-ns"] == 0
    assert "calls: 0" in format_stats(st)


# -- a real scenario: a post-copy migration on the fake, recorded ------------------------------


@pytest.fixture(scope="module")
def migration(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    """(trace path, faults the engine counted) of an 8 MiB uffd-missing migration on the fake."""
    path = str(tmp_path_factory.mktemp("mig") / "mig.trace")
    # deterministic, over a slow simulated link: demand faults are certain
    r = record_deterministic(
        path,
        MigrateOptions(kernel="fake", mechanism="uffd-missing", mem_size=8 << 20, workload="random", seed=7),
        seed=3,
        net=NetOptions(latency_ns=100_000, bandwidth_Bps=20e6),
    )
    assert os.path.exists(path)
    return path, r.report.result.stats.faults


def test_stats_of_a_recorded_migration_agree_with_the_engine(migration: tuple[str, int]) -> None:
    path, engine_faults = migration
    with open_trace(path) as t:
        st = compute_stats(t.header, t)
    assert st.faults == engine_faults > 0
    assert st.unresolved == 0
    assert st.hist.total == len(st.samples) == st.faults
    assert set(st.by_how) <= {"copy", "wake", "zeropage"} and st.by_how["copy"] > 0
    assert list(st.blocked_ns) == [0]
    # blocked time: at most the sum of latencies (overlaps count once), at least the longest
    assert max(st.samples) <= st.blocked_ns[0] <= sum(st.samples)
    assert st.by_name["KVM_RUN"].count >= 1 and st.by_name["UFFDIO_COPY"].count >= st.faults // 2


def test_show_decodes_every_line_of_a_migration(migration: tuple[str, int]) -> None:
    path, engine_faults = migration
    with open_trace(path) as t:
        lines = list(show_lines(t.header, t))
    assert not [s for s in lines if s.startswith("??")]
    assert sum(s.startswith("-- fault vcpu 0 gpa=0x") for s in lines) == engine_faults
    reads = [s for s in lines if s.startswith("read(") and "<userfaultfd>" in s and "= 32 " in s]
    assert reads and all(" [PAGEFAULT flags=" in s for s in reads)
    assert any(s.startswith("ioctl(") and ", UFFDIO_COPY, {dst=0x" in s for s in lines)
    with open_trace(path) as t:
        faults = list(show_lines(t.header, t, ShowFilter(faults_only=True, limit=5)))
    assert len(faults) == min(5, engine_faults) and all(" uffd-missing " in s for s in faults)


def test_cli_show_stats_json_and_plot(
    migration: tuple[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, engine_faults = migration
    assert main(["trace", "stats", "--json", path]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["faults"] == engine_faults and len(d["latency-dist"]) == 24
    assert main(["trace", "stats", path]) == 0
    assert "Postcopy Latency Distribution:" in capsys.readouterr().out
    assert main(["trace", "show", "--name", "UFFDIO_REGISTER", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# trace ") and len([s for s in out if not s.startswith("#")]) == 1
    assert "mode=UFFDIO_REGISTER_MODE_MISSING" in out[-1]
    pytest.importorskip("matplotlib")
    png = tmp_path / "m.png"
    assert main(["trace", "plot", path, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{engine_faults} faults" in capsys.readouterr().out


def _shipped() -> list[Path]:
    return sorted((Path(__file__).resolve().parents[2] / "traces").glob("*.trace"))


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: p.name)
def test_stats_from_columns_equal_stats_from_events_on_shipped_traces(path: Path) -> None:
    """``trace stats`` computes from columns; every figure must be what one pass over the
    events gives (counts, histogram, percentiles, blocked time, per-call totals)."""
    from replay.stats import compute_stats_columns

    with open_trace(path) as r:
        by_events = compute_stats(r.header, iter(r)).as_dict()
        by_columns = compute_stats_columns(r.header, r.columns()).as_dict()
    assert by_columns == by_events
    assert by_events["calls"] > 0


def test_stats_from_columns_count_errors_unresolved_and_sub_microsecond_faults(tmp_path: Path) -> None:
    from replay.format import TraceWriter
    from replay.stats import compute_stats_columns

    evs: list[Any] = []
    for i in range(300):
        evs.append(Call(2 * i, 5, 1000 * i, 7 + i % 5, "ioctl", name="UFFDIO_COPY" if i % 3 else "",
                        errno=11 if i % 7 == 0 else 0))  # fmt: skip
        lat = (0, 500, 1999, 2000, 10**6, 10**12)[i % 6]
        evs.append(Fault(2 * i + 1, 9, vcpu=i % 3 - 1, gpa=4096 * i, observed_ns=10**6 + 1000 * i,
                         resolved_ns=0 if i % 11 == 0 else 10**6 + 1000 * i + lat,
                         access=("read", "")[i % 2], how="copy"))  # fmt: skip
    p = tmp_path / "s.trace"
    with TraceWriter(p, Header(mechanism="uffd-missing"), chunk_events=128) as w:
        w.extend(evs)
    with open_trace(p) as r:
        a = compute_stats(r.header, iter(r)).as_dict()
        b = compute_stats_columns(r.header, r.columns()).as_dict()
    assert a == b
    assert a["unresolved-faults"] == 28 and a["calls-per-name"]["ioctl"]["errors"] > 0
    assert a["latency-dist"][0] > 0 and a["latency-dist"][-1] > 0
