"""``fakekvm capture --kvm-trace``: the kernel's own record of every KVM_RUN return joins the trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.capture import capture
from replay.events import Call
from replay.format import open_trace
from replay.tracefs import load_kevents, tracefs_status
from tools.cli import main


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_every_kvm_run_return_has_its_tracepoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok, why = tracefs_status()
    if not ok:
        pytest.skip(why)
    out = str(tmp_path / "k.trace")
    cmd = ["fakekvm", "migrate", "--kernel", "real", "--mechanism", "uffd-missing", "--mem", "8M",
           "--workload", "random"]  # fmt: skip
    res = capture(out, cmd, kvm_trace=True)
    assert res.returncode == 0 and res.kevents
    runs = 0
    for p in (out, out + ".source"):
        with open_trace(p) as r:
            runs += sum(1 for ev in r if type(ev) is Call and ev.name == "KVM_RUN")
    kevents = list(load_kevents(out + ".kevents"))
    exits = [k for k in kevents if k.name == "kvm_userspace_exit"]
    assert runs > 0 and len(exits) == runs
    capsys.readouterr()
    assert main(["trace", "show", out]) == 0
    shown = capsys.readouterr().out
    assert "== kvm:kvm_userspace_exit" in shown and "KVM_RUN" in shown
