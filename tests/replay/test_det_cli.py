"""``fakekvm explore`` writes a trace for every failing seed; ``fakekvm replay
--check-determinism`` reproduces it, and proves a captured migration deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.capture import capture
from replay.det import det_config, parse_seeds
from replay.format import open_trace
from tools.cli import main


def test_failing_seeds_get_traces_that_reproduce(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "explore"
    rc = main(["explore", "--seeds", "1-2", "--mem", "4M", "--inject", "owner_dead=1", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 1 and "0 of 2 seeds passed" in text
    trace = out / "seed-2.trace"
    assert trace.exists()
    with open_trace(trace) as r:
        c = det_config(r.header)
        calls = sum(1 for _ in r)
    assert c.seed == 2 and c.inject == {"owner_dead": 1} and c.failure and calls > 0
    assert main(["replay", "--check-determinism", "-n", "3", str(trace)]) == 0
    assert f"3 runs, one outcome: failed: {c.failure}" in capsys.readouterr().out


def test_a_captured_migration_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = str(tmp_path / "m.trace")
    cmd = ["fakekvm", "migrate", "--kernel", "fake", "--mechanism", "uffd-minor", "--mem", "4M",
           "--vcpus", "2", "--workload", "random", "--seed", "9"]  # fmt: skip
    assert capture(t, cmd).returncode == 0
    capsys.readouterr()
    assert main(["replay", "--check-determinism", "-n", "4", "--seed", "5", t]) == 0
    line = capsys.readouterr().out
    assert line.startswith("4 runs, one outcome: events ")


def test_seed_ranges() -> None:
    assert parse_seeds("1-3,7,9-10") == [1, 2, 3, 7, 9, 10]
