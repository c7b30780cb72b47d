"""``replay --mode serve`` of post-copy migration traces: the destination engine runs on
`ReplayKernel` (no KVM, no fake) against every shipped trace to the end, and an engine change
is caught at the call it changes, both sides decoded."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

from fakekvm.abi import uffd
from postcopy.mechanisms import base, uffd_missing
from replay.events import Call, Event, Header
from replay.format import TraceWriter, open_trace
from replay.serve_migrate import migrate_options, serve_migration
from replay.verify import VerifyError
from tools.cli import main

TRACES = sorted((Path(__file__).resolve().parents[2] / "traces").glob("*.trace"))
MISSING_1VCPU = next(p for p in TRACES if p.name == "real-uffd-missing-1vcpu-random.trace")


def _read(path: Path) -> tuple[Header, list[Event]]:
    with open_trace(path) as r:
        return r.header, list(r)


def _recorded_reports(events: list[Event]) -> dict[int, list[int]]:
    """vCPU -> the values its recorded KVM_RUN exits wrote to the report port (0xe0)."""
    out: dict[int, list[int]] = {}
    for e in events:
        if isinstance(e, Call) and e.name == "KVM_RUN" and len(e.out) > 0x120:
            _d, size, port, count, _off = struct.unpack_from("<BBHIQ", e.out, 32)
            if port == 0xE0:
                data = e.out[0x120 : 0x120 + size * count]
                v = int(e.fd_kind.split(":")[1])
                out.setdefault(v, []).extend(
                    int.from_bytes(data[i : i + size], "little") for i in range(0, len(data), size)
                )
    return out


def test_real_and_fake_migration_traces_are_shipped() -> None:
    kernels = set()
    for p in TRACES:
        header, _ = _read(p)
        if "migrate" in header.argv:
            assert header.role == "destination"
            kernels.add(header.kernel)
    assert kernels == {"real", "fake"}


@pytest.mark.parametrize("trace", TRACES, ids=[p.stem for p in TRACES])
def test_shipped_trace_serves_to_completion(trace: Path) -> None:
    header, events = _read(trace)
    if "migrate" not in header.argv:  # a class serve_migration does not serve: it says so
        with pytest.raises(VerifyError, match="only `fakekvm migrate` recordings"):
            serve_migration(header, events)
        return
    res = serve_migration(header, events, patience=20.0)
    assert res.ok, res.report()
    text = res.report()
    assert "same as recorded" in text and "engine's verdict" in text
    o = migrate_options(header)
    assert len(res.vcpus) == o.vcpus
    # the guest's reports came from the trace's exits, and they are what the source predicts
    rec = _recorded_reports(events)
    for v, line in enumerate(res.vcpus):
        if o.workload == "idle":
            assert "exits=0" in line
        else:
            assert "stop=done" in line and f"reports={rec[v]}" in line
    assert res.calls > 30
    if header.mechanism in ("uffd-missing", "uffd-minor"):
        nr = o.mem_size // 4096
        if o.workload == "balloon":  # ballooned pages are filled again after their REMOVE
            assert res.counters["pages"] >= nr and res.counters["removes"] > 0
            assert any(n.startswith("balloon: 16 rounds") for n in res.notes)
        else:
            assert res.counters["pages"] == nr  # every page filled, once


def test_cli_serves_a_real_kernel_migration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--mode", "serve", str(MISSING_1VCPU)]) == 0
    out = capsys.readouterr().out
    assert "destination on ReplayKernel, source on the fake" in out
    assert "vCPU 0: stop=done" in out and "same as recorded" in out


def test_an_engine_change_is_caught_at_the_call_it_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The "new build" asks UFFDIO_API for one more feature: serve stops at that call."""
    header, events = _read(MISSING_1VCPU)
    api = next(e for e in events if isinstance(e, Call) and e.name == "UFFDIO_API")
    monkeypatch.setattr(
        uffd_missing, "FEATURES", uffd_missing.FEATURES | uffd.UFFD_FEATURE_EXACT_ADDRESS
    )
    res = serve_migration(header, events, patience=5.0)
    assert not res.ok and res.divergence is not None
    text = res.report()
    assert "DIVERGES" in text
    assert "call does not match the trace on stream 'userfaultfd'" in text
    expected = text.split("expected #")[1].split("\n")[0]
    got = text.split("  got ")[1].split("\n")[0]
    assert expected.startswith(f"{api.seq} ") and "UFFDIO_API" in expected
    assert "UFFD_FEATURE_THREAD_ID" in expected and "UFFD_FEATURE_EXACT_ADDRESS" not in expected
    assert "UFFDIO_API" in got and "UFFD_FEATURE_EXACT_ADDRESS" in got
    assert "last calls matched:" in text and "userfaultfd(O_NONBLOCK|O_CLOEXEC)" in text


def test_a_changed_fill_is_caught_by_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The "new build" places pages with UFFDIO_ZEROPAGE where the recording copied them:
    the timing-tolerant rules still catch it, at the first such fill."""

    def zero_instead(self: base.UffdPlacer, start_page: int, count: int, src: int,
                     *, wake: bool = True) -> None:  # fmt: skip
        buf = bytearray(uffd.uffdio_zeropage_fmt.pack(
            self.base + start_page * self.page_size, count * self.page_size, 0, 0))  # fmt: skip
        self.kernel.ioctl(self.fd, uffd.UFFDIO_ZEROPAGE, buf)

    header, events = _read(MISSING_1VCPU)
    monkeypatch.setattr(base.UffdPlacer, "copy", zero_instead)
    res = serve_migration(header, events, patience=5.0)
    assert res.divergence is not None, res.report()
    text = res.report()
    assert "UFFDIO_ZEROPAGE places pages but the recording filled only with UFFDIO_COPY" in text
    assert "expected #" in text and "UFFDIO_COPY" in text.split("expected #")[1].split("\n")[0]
    assert "UFFDIO_ZEROPAGE" in text.split("  got ")[1]


def _write(path: Path, header: Header, events: list[Event]) -> str:
    with TraceWriter(str(path), header) as w:
        for e in events:
            w.append(e)
    return str(path)


def test_traces_that_cannot_be_served_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, events = _read(MISSING_1VCPU)
    same = Header(kernel="real", role="destination",
                  argv=["fakekvm", "migrate", "--kernel", "real", "--same-process"])  # fmt: skip
    with pytest.raises(VerifyError, match="source and destination in one trace"):
        serve_migration(same, events)
    path = _write(tmp_path / "same.trace", same, events[:20])
    assert main(["replay", "--mode", "serve", path]) == 2
    assert "source and destination in one trace" in capsys.readouterr().err
    source = Header(kernel="real", role="source", argv=list(header.argv))
    with pytest.raises(VerifyError, match="serve the destination's trace"):
        serve_migration(source, events)
    bad = Header(role="destination", argv=["fakekvm", "migrate", "--mem", "12345"])
    with pytest.raises(VerifyError, match="cannot parse the recorded command line"):
        serve_migration(bad, events)


def test_a_trace_cut_short_diverges_instead_of_hanging() -> None:
    """The recording stops after the vCPU's first exit: the engine wants more KVM_RUNs than
    the trace has; serve reports it (and the engine tears down), it never hangs."""
    header, events = _read(MISSING_1VCPU)
    runs = [i for i, e in enumerate(events) if isinstance(e, Call) and e.name == "KVM_RUN"]
    cut = events[: runs[0] + 1]
    res = serve_migration(header, cut, patience=5.0)
    assert res.divergence is not None, res.report()
    assert "the trace has no (more) calls on stream 'kvm-vcpu:0'" in res.divergence
    assert "KVM_RUN" in res.divergence.split("  got ")[1]


def test_a_source_that_cannot_be_rebuilt_is_a_clear_error() -> None:
    _, events = _read(MISSING_1VCPU)
    tiny = Header(kernel="real", role="destination",
                  argv=["fakekvm", "migrate", "--kernel", "real", "--mem", "4K"])  # fmt: skip
    with pytest.raises(VerifyError, match="cannot rebuild the source on the fake"):
        serve_migration(tiny, events)


def test_an_engine_that_swallows_the_divergence_is_not_waited_for() -> None:
    """After a divergence the watcher gives the engine ``patience`` seconds to come back,
    then reports; the engine here ignores the error and waits for ever."""
    from replay.serve import ReplayKernel
    from replay.serve_migrate import _run_watched

    header, events = _read(MISSING_1VCPU)
    rk = ReplayKernel(header, events, patience=0.05)
    release = threading.Event()
    entered = threading.Event()

    def engine() -> int:
        try:
            rk.ioctl(99, uffd.UFFDIO_API, bytearray(24))  # matches nothing: a divergence
        except OSError:
            pass  # swallowed
        entered.set()
        release.wait()
        return 1

    try:
        assert _run_watched(engine, rk, limit=60.0) is None
        assert entered.is_set() and rk.divergence is not None
        assert "replay divergence" in str(rk.divergence)
    finally:
        release.set()
        rk.shutdown()
    assert _run_watched(lambda: 7, ReplayKernel(header, events), limit=60.0) == 7
