"""Scripts for the trace-driven vCPU, built from recorded calls and faults."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from fakekvm.abi import kvm as K
from fakekvm.fake.cpu import HltExit, IoExit
from fakekvm.fake.kvm.scripted import Touch
from replay.capture import capture
from replay.events import Call, Fault
from replay.format import open_trace
from replay.workload import run_workload, scripts_from_events
from tools.cli import main


def _run(
    seq: int,
    vcpu: int,
    t: int,
    dur: int,
    reason: int,
    exit_bytes: bytes = b"",
    data: bytes = b"",
    err: int = 0,
) -> Call:
    head = bytearray(0x120)
    head[8:12] = reason.to_bytes(4, "little")
    head[32 : 32 + len(exit_bytes)] = exit_bytes
    return Call(
        seq,
        100 + vcpu,
        t,
        dur,
        "ioctl",
        5 + vcpu,
        f"kvm-vcpu:{vcpu}",
        vcpu,
        K.KVM_RUN,
        "KVM_RUN",
        0,
        [],
        b"",
        bytes(head) + data,
        -1 if err else 0,
        err,
    )


def test_faults_become_touches_inside_their_run_with_think_time() -> None:
    io = K.kvm_run_io_fmt.pack(K.KVM_EXIT_IO_OUT, 4, 0xE9, 1, 0x1000)
    events = [
        _run(0, 0, 1_000, 9_000, K.KVM_EXIT_IO, io, b"\x07\0\0\0"),  # [1000, 10000]: 2 faults
        Fault(1, 100, 0, 0x5000, 0x7F0000005000, "write", "uffd-missing", 3_000, 4_000, "copy"),
        Fault(2, 100, 0, 0x9000, 0x7F0000009000, "read", "uffd-missing", 6_000, 7_000, "copy"),
        Fault(
            3, 999, -1, -1, 0x7F000000A000, "read", "uffd-missing", 6_500, 6_600, "copy"
        ),  # host access
        _run(4, 0, 12_000, 3_000, K.KVM_EXIT_MEMORY_FAULT, b"", b"", errno.EFAULT),  # kvm userfault
        Fault(5, 100, 0, 0xB000, -1, "userfault", "kvm-userfault", 15_000, 16_000, "rerun"),
        _run(6, 0, 16_000, 1_000, K.KVM_EXIT_HLT),
        _run(7, 1, 2_000, 500, K.KVM_EXIT_HLT),
    ]
    scripts, info = scripts_from_events(events)
    assert scripts[0] == [
        Touch(0x5000, write=True, think_ns=2_000),  # from the run's entry at 1000
        Touch(0x9000, write=False, think_ns=2_000),  # from the previous fault's resolution at 4000
        IoExit(K.KVM_EXIT_IO_OUT, 4, 0xE9, 1, b"\x07\0\0\0"),
        Touch(0xB000, write=False, think_ns=3_000),  # the MEMORY_FAULT run itself is not replayed
        HltExit(),
    ]
    assert scripts[1] == [HltExit()]
    assert info.skipped_faults == 1 and info.skipped_exits == 1
    assert info.touches == {0: 3, 1: 0} and info.exits == {0: 2, 1: 1}


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_a_real_recording_drives_a_fake_migration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "r.trace")
    cmd = ["fakekvm", "migrate", "--kernel", "real", "--mechanism", "uffd-missing", "--mem", "16M",
           "--vcpus", "2", "--workload", "random"]  # fmt: skip
    assert capture(out, cmd).returncode == 0
    with open_trace(out) as r:
        events = list(r)
    scripts, _info = scripts_from_events(events)
    recorded_touches = {v: sum(1 for s in sc if isinstance(s, Touch)) for v, sc in scripts.items()}
    recorded_exits = {v: sum(1 for s in sc if not isinstance(s, Touch)) for v, sc in scripts.items()}
    res = run_workload(out, think=False)
    assert "fake" in res.command
    # every vCPU played its whole script: each recorded touch, each recorded exit (the engine's
    # report check passed, so the exits carried the recorded reports)
    assert {v: t for v, (t, _e, _m) in res.scripted.items()} == recorded_touches
    assert {v: e for v, (_t, e, _m) in res.scripted.items()} == recorded_exits
    assert res.recorded["faults"] == sum(1 for ev in events if isinstance(ev, Fault))
    assert "recorded" in res.report() and "replay" in res.report()
    capsys.readouterr()
    assert main(["replay", "--mode", "workload", "--no-think", out]) == 0
    assert "replayed as workload" in capsys.readouterr().out
