"""``fakekvm migrate --repeat N`` and ``--acceptance`` (issue 5's matrix)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from postcopy.migrate import MigrateOptions, MigrationMismatch
from tools import acceptance_postcopy as acc
from tools import migrate as cli


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fakekvm")
    cli.add_parser(p.add_subparsers())
    return p.parse_args(["migrate", *argv])


def test_repeat_prints_a_line_a_run_and_the_medians(capsys: pytest.CaptureFixture[str]) -> None:
    a = _args("--kernel", "fake", "--mem", "8M", "--workload", "verify", "--repeat", "2",
              "--same-process")  # fmt: skip
    assert a.handler(a) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [r for r in (line.split() for line in out) if r and r[0] in ("1", "2", "med")]
    rows = [r for r in rows if r[1] != "runs,"]
    assert [r[0] for r in rows] == ["1", "2", "med"]
    assert all(len(r) == 1 + len(cli.FIGURES) for r in rows)
    assert float(rows[0][1]) > 0  # total ms
    assert "2 runs, memory verified in each" in out[-1]


def test_repeat_stops_at_the_first_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = [0]

    def fake_migrate(o: MigrateOptions, progress: Any = None) -> Any:
        calls[0] += 1
        raise MigrationMismatch("guest memory differs from the source at page 9 (gpa 0x9000)")

    monkeypatch.setattr(cli, "migrate", fake_migrate)
    a = _args("--kernel", "fake", "--mem", "8M", "--repeat", "5")
    assert a.handler(a) == 1
    assert calls[0] == 1
    cap = capsys.readouterr()
    assert "run 1/5 MISMATCH: guest memory differs from the source at page 9" in cap.out
    assert "med" not in cap.out


def test_repeat_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    a = _args("--repeat", "0")
    assert a.handler(a) == 2
    assert "--repeat" in capsys.readouterr().err


def test_medians_of_rows() -> None:
    assert cli.medians([[1.0, 9.0], [3.0, 1.0], [2.0, 5.0]]) == [2.0, 5.0]


def test_acceptance_matrix_on_the_fake(capsys: pytest.CaptureFixture[str]) -> None:
    logs: list[str] = []
    code = acc.main(
        kernel="fake", mem_size=8 << 20, repeat=1, log=logs.append,
        mechanisms=("uffd-missing",), vcpus=(2,), workloads=("verify",),
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "ACCEPTANCE: PASS" in out
    table = [line.split() for line in out.splitlines() if line.startswith("uffd-missing")]
    assert [(r[1], r[2], r[3], r[4]) for r in table] == [
        ("2", "verify", "1", "pass"),
        ("1", "idle", "1", "pass"),
    ]
    assert any("target  idle guest total time < 300 ms" in line for line in out.splitlines())
    assert any("run 1/1" in line for line in logs)


def test_acceptance_reports_a_failed_cell(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(o: MigrateOptions, progress: Any = None) -> tuple[int, None, str]:
        return 2, None, "failed: source lost: scripted"

    monkeypatch.setattr(acc, "run_once", failing)
    code = acc.main(kernel="fake", mem_size=8 << 20, repeat=3, log=lambda s: None,
                    mechanisms=("uffd-minor",), vcpus=(1,), workloads=("random",))  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "ACCEPTANCE: FAIL (2 cells failed" in out
    assert "uffd-minor 1 vCPU random: run 1: failed: source lost: scripted" in out
    assert "not measured" in out


def test_acceptance_flag_runs_the_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(acc, "main", lambda **kw: seen.update(kw) or 0)
    a = _args("--acceptance", "--kernel", "fake", "--mem", "16M")
    assert a.handler(a) == 0
    assert seen == {"kernel": "fake", "mem_size": 16 << 20, "repeat": 5, "seed": 7,
                    "pin": False, "demand_rt": False}  # fmt: skip
    a = _args("--acceptance", "--kernel", "fake", "--pin", "--demand-rt")
    assert a.handler(a) == 0
    assert seen["pin"] is True and seen["demand_rt"] is True


def test_target_checks() -> None:
    lat = next(t for t in acc.TARGETS if t.key == "latency-p50-ns")
    bg = next(t for t in acc.TARGETS if t.key == "background-rate-pps")
    assert lat.met(99) and not lat.met(100)
    assert bg.met(400) and not bg.met(399.9)
