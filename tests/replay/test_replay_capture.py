"""``fakekvm capture``: a migration recorded through the kernel seam, both sides, readable."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from replay.capture import capture, summarize
from replay.events import Call, Fault
from replay.format import open_trace
from tools.cli import main


def test_capture_a_fake_migration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mig.trc"
    cmd = [
        "fakekvm",
        "migrate",
        "--kernel",
        "fake",
        "--mechanism",
        "uffd-missing",
        "--mem",
        "16M",
        "--workload",
        "sequential",
        "--seed",
        "5",
        "--json",
    ]
    rc = main(["capture", "-o", str(out), "--", *cmd])
    assert rc == 0
    stdout, stderr = capsys.readouterr()
    report = json.loads(stdout)
    assert os.environ.get("FAKEKVM_TRACE") is None  # restored after the in-process run
    dst, src = out, Path(str(out) + ".source")
    assert dst.exists() and src.exists()
    assert not Path(str(out) + ".incomplete").exists()
    assert f"{dst}: destination:" in stderr and f"{src}: source:" in stderr

    r = open_trace(dst, strict=True)
    evs = list(r)
    h = r.header
    assert r.complete and (h.role, h.kernel, h.mechanism, h.guest, h.seed) == (
        "destination",
        "fake",
        "uffd-missing",
        "sequential",
        5,
    )
    assert h.profile == "6.18-pvm" and h.argv == cmd and not h.with_contents
    fs = [e for e in evs if isinstance(e, Fault)]
    # on the fake the background push may deliver all 16 MiB before the vCPUs first touch it
    # (it starts while the VM is built), so the count may be 0; it must match the engine's
    assert len(fs) == report["faults"]
    assert any(isinstance(e, Call) and e.name == "KVM_RUN" for e in evs)
    assert all(f.resolved_ns >= f.observed_ns and f.how in ("copy", "wake") for f in fs)
    cs = [e for e in evs if isinstance(e, Call)]
    names = {c.name for c in cs}
    assert {"UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_COPY", "KVM_RUN"} <= names

    rs = open_trace(src, strict=True)
    sevs = list(rs)
    assert rs.complete and rs.header.role == "source" and rs.header.argv == cmd
    assert not any(isinstance(e, Fault) for e in sevs)
    assert any(isinstance(e, Call) and e.name == "KVM_GET_REGS" for e in sevs)
    s = summarize(str(dst))
    assert s.complete and s.faults == len(fs) and s.calls == len(cs) and s.error is None


def test_capture_passes_the_trace_to_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "sub.trc"
    script = (
        "import os;"
        "from fakekvm.fake import FakeKernel;"
        "from replay.recorder import maybe_record;"
        "k = maybe_record(FakeKernel(profile='6.18-pvm'), role='destination');"
        "k.gettid();"
        "assert os.environ['FAKEKVM_TRACE_CONTENTS'] == '1'"
    )
    res = capture(str(out), [sys.executable, "-c", script], with_contents=True)
    assert res.returncode == 0
    assert [t.path for t in res.traces] == [str(out)]
    r = open_trace(out, strict=True)
    assert r.header.with_contents and r.header.argv[0] == sys.executable
    assert [e.op for e in r] == ["gettid"]  # type: ignore[union-attr]


def test_capture_without_a_command_or_a_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["capture", "-o", str(tmp_path / "x.trc")]) == 2
    assert "no command given" in capsys.readouterr().err
    rc = main(["capture", "-o", str(tmp_path / "y.trc"), "--", sys.executable, "-c", "pass"])
    assert rc == 2
    assert "wrote no trace" in capsys.readouterr().err
