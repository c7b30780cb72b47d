"""`replay.diff` and ``fakekvm trace diff``: first divergence of two runs, latency comparison."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakekvm.fake.kernel import FakeKernel
from fakekvm.guests import GuestVM, hello_image
from replay.diff import Canon, compare_latencies, diff_traces, ks_statistic
from replay.events import Call, Event, Fault, Header
from replay.format import TraceWriter
from replay.recorder import RecordingKernel
from tools.cli import main


def _record_hello(rflags: int = 2, fake: FakeKernel | None = None) -> list[Event]:
    """The hello guest on a FakeKernel, recorded; ``rflags`` changes one ioctl."""
    own = fake is None
    kernel = fake if fake is not None else FakeKernel()
    events: list[Event] = []
    rec = RecordingKernel(kernel, events)
    try:
        with GuestVM(rec, 1 << 20) as vm:
            image = hello_image()
            vm.load(image)
            if rflags != 2:
                vm.set_regs(0, **{**image.regs_for(0), "rflags": rflags})
            assert vm.run().text == "Hello from fakekvm\n"
    finally:
        if own:
            rec.shutdown()
        else:
            rec.stop_recording()
    return events


@pytest.fixture(scope="module")
def hellos() -> Iterator[tuple[list[Event], list[Event]]]:
    """Two recordings of the same code on two FakeKernels alive at once (so that their
    addresses and fds differ)."""
    k1, k2 = FakeKernel(), FakeKernel()
    try:
        yield _record_hello(fake=k1), _record_hello(fake=k2)
    finally:
        k1.shutdown()
        k2.shutdown()


@pytest.fixture(scope="module")
def hello_a(hellos: tuple[list[Event], list[Event]]) -> list[Event]:
    return hellos[0]


@pytest.fixture(scope="module")
def hello_b(hellos: tuple[list[Event], list[Event]]) -> list[Event]:
    return hellos[1]


def _mmaps(events: list[Event]) -> list[int]:
    return [e.ret for e in events if isinstance(e, Call) and e.op == "mmap"]


def test_two_runs_of_the_same_code_are_the_same(hello_a: list[Event], hello_b: list[Event]) -> None:
    # the runs really differ in addresses (and times): the diff must see through that
    assert _mmaps(hello_a) != _mmaps(hello_b)
    res = diff_traces(hello_a, hello_b)
    assert res.same, res.report()
    assert res.calls_a == res.calls_b > 30
    assert "event sequences: same" in res.report()
    assert diff_traces(hello_a, hello_b, compare_out=True).same  # the same exits, too


def test_a_changed_ioctl_is_found_at_its_seq(hello_a: list[Event]) -> None:
    changed = _record_hello(rflags=0x202)
    res = diff_traces(hello_a, changed)
    assert not res.same
    assert res.a is not None and res.b is not None
    # A's next call is KVM_RUN; B makes an extra KVM_SET_REGS there
    calls_b = [e for e in changed if isinstance(e, Call) and e.op not in ("monotonic_ns", "gettid")]
    extra = [i for i, c in enumerate(calls_b) if c.name == "KVM_SET_REGS"][1]
    assert res.at == extra
    assert res.b.name == "KVM_SET_REGS" and res.a.name == "KVM_RUN"
    assert res.fields[:2] == ["name", "int argument"]
    text = res.report()
    assert f"event sequences differ at call {extra}" in text
    assert "the 5 calls before:" in text and len(res.context) == 5
    assert res.context[-1][0].name == "KVM_SET_REGS"  # the image's own KVM_SET_REGS
    assert f"B #{res.b.seq}: ioctl(" in text and "rflags=0x202" in text
    assert f"A #{res.a.seq}: ioctl(" in text and "KVM_RUN, 0) = 0 (KVM_EXIT_IO OUT" in text


def test_a_changed_input_byte_is_a_divergence_in_input_bytes() -> None:
    base = [Call(seq=i, tid=1, t_ns=i, dur_ns=0, op="ioctl", fd=3, fd_kind="kvm-vm",
                 name="X", inp=bytes([i, 0, 0, 0])) for i in range(10)]  # fmt: skip
    other = [Call(seq=c.seq, tid=9, t_ns=c.t_ns * 7, dur_ns=5, op=c.op, fd=4, fd_kind=c.fd_kind,
                  name=c.name, inp=c.inp) for c in base]  # fmt: skip
    assert diff_traces(base, other).same  # tids, times and fd numbers do not count
    other[6] = Call(seq=6, tid=9, t_ns=0, dur_ns=0, op="ioctl", fd=4, fd_kind="kvm-vm", name="X",
                    inp=b"\x06\x00\x00\x01")  # fmt: skip
    res = diff_traces(base, other, context=3)
    assert (res.at, res.fields) == (6, ["input bytes"])
    assert [a.seq for a, _ in res.context] == [3, 4, 5]
    outs = [Call(seq=c.seq, tid=1, t_ns=0, dur_ns=0, op=c.op, fd=3, fd_kind=c.fd_kind,
                 name=c.name, inp=c.inp, out=b"x" if c.seq == 2 else b"") for c in base]  # fmt: skip
    assert diff_traces(base, outs).same
    res = diff_traces(base, outs, compare_out=True)
    assert (res.at, res.fields) == (2, ["output bytes"])
    short = diff_traces(base, base[:8])
    assert not short.same and short.at == 8 and short.b is None
    assert "B: ends after 8 calls" in short.report()


def test_canon_maps_addresses_and_fds_per_trace() -> None:
    ca, cb = Canon(), Canon()
    mm_a = Call(seq=0, tid=1, t_ns=0, dur_ns=0, op="mmap", iarg=0x2000, args=[3, 0x22, 0, 0],
                ret=0x7F00_0000_0000)  # fmt: skip
    mm_b = Call(seq=0, tid=1, t_ns=0, dur_ns=0, op="mmap", iarg=0x2000, args=[3, 0x22, 0, 0],
                ret=0x7E11_0000_0000)  # fmt: skip
    assert ca.key(mm_a) == cb.key(mm_b)
    ca.note(mm_a)
    cb.note(mm_b)
    use_a = Call(seq=1, tid=1, t_ns=0, dur_ns=0, op="ioctl", name="Y",
                 inp=(0x7F00_0000_1000).to_bytes(8, "little"))  # fmt: skip
    use_b = Call(seq=1, tid=1, t_ns=0, dur_ns=0, op="ioctl", name="Y",
                 inp=(0x7E11_0000_1000).to_bytes(8, "little"))  # fmt: skip
    assert ca.key(use_a) == cb.key(use_b)
    off_b = Call(seq=1, tid=1, t_ns=0, dur_ns=0, op="ioctl", name="Y",
                 inp=(0x7E11_0000_1008).to_bytes(8, "little"))  # fmt: skip
    assert ca.key(use_a) != cb.key(off_b)
    fd_a = Call(seq=2, tid=1, t_ns=0, dur_ns=0, op="open", inp=b"/dev/kvm", ret=3)
    fd_b = Call(seq=2, tid=1, t_ns=0, dur_ns=0, op="open", inp=b"/dev/kvm", ret=11)
    assert ca.key(fd_a) == cb.key(fd_b)


def test_ks_statistic_and_latency_comparison() -> None:
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2], [10, 20, 30]) == 1.0
    assert ks_statistic([], []) == 0.0
    rng = random.Random(5)
    xs = [rng.randrange(1000) for _ in range(500)]
    ys = [rng.randrange(1000) for _ in range(300)]
    # against a direct evaluation of sup |F_a - F_b| over every sample point
    direct = max(abs(sum(x <= t for x in xs) / 500 - sum(y <= t for y in ys) / 300)
                 for t in xs + ys)  # fmt: skip
    assert ks_statistic(xs, ys) == pytest.approx(direct)
    from array import array

    lc = compare_latencies(
        array("Q", [1000, 2000, 3000, 4000]), array("Q", [2000, 4000, 6000, 8000])
    )
    assert (lc.p50_a, lc.p50_b, lc.p99_a, lc.p99_b) == (2000, 4000, 4000, 8000)
    assert lc.p50_ratio == 2.0 and lc.ks_d == 0.5


def _faults(lats: list[int]) -> list[Event]:
    return [Fault(seq=i, tid=1, vcpu=0, observed_ns=i * 10**6, resolved_ns=i * 10**6 + lat,
                  how="copy") for i, lat in enumerate(lats)]  # fmt: skip


def _write(path: Path, events: list[Event]) -> str:
    with TraceWriter(str(path), Header(kernel="fake", guest="hello")) as w:
        for e in events:
            w.append(e)
    return str(path)


def test_cli_exit_status_and_reports(
    tmp_path: Path, hello_a: list[Event], hello_b: list[Event], capsys: pytest.CaptureFixture[str]
) -> None:
    a = _write(tmp_path / "a.trace", [*hello_a, *_faults([1000, 2000, 3000])])
    b = _write(tmp_path / "b.trace", [*hello_b, *_faults([2000, 4000, 6000])])
    assert main(["trace", "diff", a, b]) == 0
    out = capsys.readouterr().out
    assert "event sequences: same" in out
    assert "latency p50: A 2.0 µs, B 4.0 µs (B/A 2.00)" in out
    assert "KS statistic D = 0.6667" in out
    c = _write(tmp_path / "c.trace", _record_hello(rflags=0x202))
    assert main(["trace", "diff", a, c]) == 1
    assert "event sequences differ at call" in capsys.readouterr().out
    assert main(["trace", "diff", "--json", a, c]) == 1
    assert '"same": false' in capsys.readouterr().out


def test_cli_bad_trace_is_one_line_and_exit_2(
    tmp_path: Path, hello_a: list[Event], capsys: pytest.CaptureFixture[str]
) -> None:
    a = _write(tmp_path / "a.trace", hello_a)
    bad = tmp_path / "bad.trace"
    raw = bytearray(Path(a).read_bytes())
    raw[len(raw) // 2] ^= 0x40  # a bit flip in a chunk
    bad.write_bytes(bytes(raw))
    junk = tmp_path / "junk.trace"
    junk.write_bytes(b"not a trace at all")
    for argv in (["trace", "diff", a, str(bad)], ["trace", "show", str(junk)],
                 ["trace", "stats", str(bad)], ["replay", "--mode", "serve", str(junk)],
                 ["trace", "show", str(tmp_path / "missing.trace")]):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("fakekvm: "), argv
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["trace", "stats", str(junk)]) == 2
    assert "(byte 0)" in capsys.readouterr().err
