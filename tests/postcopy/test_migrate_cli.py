"""``fakekvm migrate``: argument parsing, the summary and JSON shapes, the verdict."""

from __future__ import annotations

import argparse
import json

import pytest

from fakekvm.guests import layout
from postcopy.migrate import MigrationMismatch, compare_memory
from postcopy.pages import page_digests
from tools import migrate as cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fakekvm")
    cli.add_parser(p.add_subparsers())
    return p


def test_parse_size() -> None:
    assert cli.parse_size("512M") == 512 << 20
    assert cli.parse_size("2G") == 2 << 30
    assert cli.parse_size("64MiB") == 64 << 20
    assert cli.parse_size("8192") == 8192
    for bad in ("12x", "100", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_size(bad)


def test_defaults_and_choices() -> None:
    a = _parser().parse_args(["migrate"])
    assert (a.kernel, a.mechanism, a.mem, a.vcpus, a.workload, a.seed) == (
        "real", "uffd-missing", 512 << 20, 1, "random", 7,
    )  # fmt: skip
    assert a.handler is cli.run
    with pytest.raises(SystemExit):
        _parser().parse_args(["migrate", "--mechanism", "nope"])


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_json_run(capsys: pytest.CaptureFixture[str]) -> None:
    a = _parser().parse_args(
        ["migrate", "--mem", "16M", "--workload", "verify", "--vcpus", "2", "--same-process",
         "--json"]
    )  # fmt: skip
    assert a.handler(a) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["status"] == "completed" and d["mechanism"] == "uffd-missing"
    assert d["pages-demand"] + d["pages-background"] - d["pages-duplicate"] == 16 << 8
    assert len(d["postcopy-latency-dist"]) == 24
    assert len(d["postcopy-vcpu-blocktime"]) == 2
    assert d["faults"] == sum(d["postcopy-latency-dist"])


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_text_run_with_progress(capsys: pytest.CaptureFixture[str]) -> None:
    a = _parser().parse_args(
        ["migrate", "--mem", "8M", "--workload", "random", "--mechanism", "uffd-minor",
         "--progress"]
    )  # fmt: skip
    assert a.handler(a) == 0
    out, err = capsys.readouterr()
    assert "Postcopy Latency Distribution:" in out
    assert "Overall demand paging rate:" in out
    assert "Memory verified" in out
    assert "100%" in err and "pages" in err


def test_compare_memory_names_the_first_differing_page() -> None:
    mem = bytearray(8 * layout.PAGE)
    digests = page_digests(mem, 0, 8)
    assert compare_memory(memoryview(mem), digests, b"", layout.PAGE) == 0
    mem[5 * layout.PAGE + 17] = 1
    mem[6 * layout.PAGE] = 1
    with pytest.raises(MigrationMismatch, match=r"page 5 \(gpa 0x5000\)"):
        compare_memory(memoryview(mem), digests, b"", layout.PAGE)
    # pages the guest wrote on the destination (dirty log) are not differences
    assert compare_memory(memoryview(mem), digests, bytes([0x60]), layout.PAGE) == 2


def test_mismatch_exit_status(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(o: object, progress: object = None) -> None:
        raise MigrationMismatch("guest memory differs from the source at page 3 (gpa 0x3000)")

    monkeypatch.setattr(cli, "migrate", boom)
    a = _parser().parse_args(["migrate", "--mem", "8M"])
    assert a.handler(a) == 1


@pytest.mark.parametrize("mechanism", ["kvm-userfault", "gmem-private"])
def test_fake_picks_a_profile_that_has_the_mechanism(
    mechanism: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --profile, --kernel fake uses the profile where the mechanism exists."""
    a = _parser().parse_args(
        ["migrate", "--kernel", "fake", "--mechanism", mechanism, "--mem", "4M",
         "--workload", "verify", "--same-process", "--json"]
    )  # fmt: skip
    assert a.handler(a) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["status"] == "completed" and d["mechanism"] == mechanism
    assert d["pages-demand"] + d["pages-background"] - d["pages-duplicate"] == 4 << 8
