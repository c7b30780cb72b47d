"""``fakekvm capture --kvm-trace``: the kernel's own record of every KVM_RUN return joins the trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.capture import capture
from replay.events import Call, KernelEvent
from replay.format import open_trace
from replay.kevents import append_kevents
from replay.tracefs import load_kevents, save_kevents, tracefs_status
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
    # the kernel events are in the trace, after its end chunk: the events stream is unchanged
    assert res.kevents_path == out and not Path(out + ".kevents").exists()
    with open_trace(out, strict=True) as r:
        kevents = list(r.kevents())
        assert all(type(ev) is not KernelEvent for ev in r) and r.complete
    assert len(kevents) == res.kevents
    assert [k.t_ns for k in kevents] == sorted(k.t_ns for k in kevents)
    exits = [k for k in kevents if k.name == "kvm_userspace_exit"]
    assert runs > 0 and len(exits) == runs
    capsys.readouterr()
    assert main(["trace", "show", out]) == 0
    shown = capsys.readouterr().out
    assert "== kvm:kvm_userspace_exit" in shown and "KVM_RUN" in shown


def _kev(i: int) -> KernelEvent:
    return KernelEvent(t_ns=1000 + i, cpu=i % 2, pid=77, system="kvm", name="kvm_exit",
                       fields={"exit_reason": i, "guest_rip": 0xFFF0 + i, "isa": "x"})  # fmt: skip


def test_kernel_events_appended_after_the_end_chunk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`append_kevents` leaves the recorded bytes as they were and puts the kernel events after
    them; readers of the events never see them, ``kevents()`` reads them back (several chunks),
    ``trace show`` interleaves them; a kevents chunk cut short by a crash is dropped, and an
    open or cut-off recording takes none."""
    from replay import kevents as K
    from replay.events import Header
    from replay.format import TraceWriter

    p = tmp_path / "t.trace"
    calls = [Call(i, 5, 100 * i, 10, "ioctl", fd=3, fd_kind="kvm-vcpu:0", vcpu=0, request=0xAE80,
                  name="KVM_RUN") for i in range(50)]  # fmt: skip
    with TraceWriter(p, Header()) as w:
        w.extend(calls)
    recorded = p.read_bytes()
    evs = [_kev(i) for i in range(K.KEVENTS_CHUNK + 10)]
    assert append_kevents(p, evs) == len(evs)
    assert p.read_bytes().startswith(recorded)
    with open_trace(p, strict=True) as r:
        assert list(r) == calls and r.complete
        assert list(r.kevents()) == evs
    capsys.readouterr()
    assert main(["trace", "show", str(p), "--no-header"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert sum("== kvm:kvm_exit" in line for line in shown) == len(evs)
    # a crash while appending: the cut-short chunk is dropped by the next append, never read
    whole = p.read_bytes()
    assert append_kevents(p, [_kev(-2)]) == 1
    last = p.read_bytes()[len(whole) :]
    p.write_bytes(whole + last[: len(last) - 5])  # its payload cut short
    with open_trace(p) as r:
        assert list(r.kevents()) == evs
    assert append_kevents(p, [_kev(-1)]) == 1
    with open_trace(p) as r:
        assert list(r.kevents()) == [*evs, _kev(-1)]
    # an open recording (no end chunk): refused
    w = TraceWriter(tmp_path / "open.trace", Header())
    w.extend(calls)
    w.flush()
    with pytest.raises(ValueError, match="no end chunk"):
        append_kevents(w.tmp_path, evs)
    w.close()


def test_side_file_kevents_of_older_captures_still_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from replay.events import Header
    from replay.format import TraceWriter

    p = tmp_path / "old.trace"
    with TraceWriter(p, Header()) as w:
        w.extend([Call(0, 5, 100, 10, "ioctl", name="KVM_RUN")])
    save_kevents(str(p) + ".kevents", [_kev(0), _kev(500)])
    assert [k.t_ns for k in load_kevents(str(p) + ".kevents")] == [1000, 1500]
    capsys.readouterr()
    assert main(["trace", "show", str(p), "--no-header"]) == 0
    assert capsys.readouterr().out.count("== kvm:kvm_exit") == 2
