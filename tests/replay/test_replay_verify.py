"""``replay --mode verify``: a recording replays on the fake with zero divergences, and an engine
change that alters one ioctl is caught at that call with a readable report."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakekvm.abi import uffd
from postcopy.mechanisms import uffd_missing
from replay.capture import capture
from replay.verify import VerifyError, replay_command, verify

MIGRATE = ["fakekvm", "migrate", "--mechanism", "uffd-missing", "--mem", "8M", "--vcpus", "2",
           "--workload", "random", "--seed", "3"]  # fmt: skip


def _record(tmp_path: Path, kernel: str) -> str:
    out = str(tmp_path / f"{kernel}.trace")
    res = capture(out, [*MIGRATE, "--kernel", kernel])
    assert res.returncode == 0
    assert {t.role for t in res.traces} == {"destination", "source"}
    return out


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_a_real_kernel_migration_verifies_on_the_fake(tmp_path: Path) -> None:
    trace = _record(tmp_path, "real")
    res = verify(trace, workdir=str(tmp_path))
    assert res.command[:2] == ["fakekvm", "migrate"] and "fake" in res.command
    assert set(res.divergences) == {"destination", "source"}
    assert res.ok, res.report()


def test_an_engine_change_is_caught_at_the_call_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = _record(tmp_path, "fake")
    (tmp_path / "same").mkdir()
    same = verify(trace, workdir=str(tmp_path / "same"))  # the unchanged engine: no divergence
    assert same.ok, same.report()

    def changed_engine(out: str, command: list[str]) -> int:
        # the "new build": asks UFFDIO_API for one more feature
        with monkeypatch.context() as m:
            m.setattr(uffd_missing, "FEATURES", uffd_missing.FEATURES | uffd.UFFD_FEATURE_EXACT_ADDRESS)
            return capture(out, command).returncode

    (tmp_path / "changed").mkdir()
    res = verify(trace, workdir=str(tmp_path / "changed"), run=changed_engine)
    assert not res.ok
    d = res.divergences["destination"]
    assert d is not None and d.part == "main"
    assert d.expected_call is not None and d.got_call is not None
    assert d.expected_call.name == d.got_call.name == "UFFDIO_API"
    text = res.report()
    assert "destination: DIVERGES" in text and "UFFDIO_API" in text
    assert res.divergences["source"] is None  # the source runs in its own process: unchanged


def test_the_recorded_command_is_made_to_run_on_the_fake() -> None:
    argv = ["/usr/bin/fakekvm", "migrate", "--kernel", "real", "--mem", "8M"]
    assert replay_command(argv, None) == ["fakekvm", "migrate", "--kernel", "fake", "--mem", "8M"]
    assert replay_command(["fakekvm", "migrate"], "6.18+kvm-userfault") == [
        "fakekvm", "migrate", "--kernel", "fake", "--profile", "6.18+kvm-userfault"]  # fmt: skip
    with pytest.raises(VerifyError):
        replay_command(["fakekvm", "bench"], None)
