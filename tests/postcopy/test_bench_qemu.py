"""``fakekvm bench --qemu``: the QMP client against a fake server, the guest report's arithmetic,
the multiboot guest's bytes, and (slow, live KVM + QEMU) one small QEMU post-copy migration."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakekvm.guests import build
from tools import bench_qemu as bq

# -- a fake QMP server on a socketpair -------------------------------------------------------------

Script = Callable[["FakeServer"], None]


class FakeServer:
    """The QEMU end of a socketpair, run by ``script`` in a thread."""

    def __init__(self, script: Script, greeting: dict[str, Any] | None = None) -> None:
        self.client, self.server = socket.socketpair()
        self.file = self.server.makefile("rwb")
        self.received: list[dict[str, Any]] = []
        self.greeting = (
            greeting
            if greeting is not None
            else {
                "QMP": {
                    "version": {"qemu": {"major": 7, "minor": 2, "micro": 22}},
                    "capabilities": [],
                }
            }
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Script) -> None:
        try:
            self.send(self.greeting)
            script(self)
        except BaseException as e:  # reported by join()
            self.error = e
        finally:
            self.file.close()
            self.server.close()

    def send(self, obj: dict[str, Any]) -> None:
        self.file.write(json.dumps(obj).encode() + b"\n")
        self.file.flush()

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "client closed"
        msg: dict[str, Any] = json.loads(line)
        self.received.append(msg)
        return msg

    def reply(self, ret: Any = None) -> dict[str, Any]:
        msg = self.recv()
        self.send({"return": {} if ret is None else ret, "id": msg["id"]})
        return msg

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def _event(name: str, data: dict[str, Any], sec: int = 100, usec: int = 0) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": {"seconds": sec, "microseconds": usec}}


def _handshake(srv: FakeServer) -> None:
    msg = srv.reply()
    assert msg["execute"] == "qmp_capabilities"


def test_qmp_handshake_and_command_with_arguments() -> None:
    def script(srv: FakeServer) -> None:
        _handshake(srv)
        srv.reply({"status": "running", "running": True})

    srv = FakeServer(script)
    q = bq.QMP(srv.client)
    assert q.greeting["version"]["qemu"]["major"] == 7
    assert q.execute("query-status", verbose=True) == {"status": "running", "running": True}
    q.close()
    srv.join()
    assert srv.received[1]["execute"] == "query-status"
    assert srv.received[1]["arguments"] == {"verbose": True}
    assert srv.received[0]["id"] != srv.received[1]["id"]
    assert "arguments" not in srv.received[0]


def test_qmp_error_reply_is_a_qmperror_with_class_and_desc() -> None:
    def script(srv: FakeServer) -> None:
        _handshake(srv)
        msg = srv.recv()
        desc = "Postcopy must be started after migration has been started"
        srv.send({"error": {"class": "GenericError", "desc": desc}, "id": msg["id"]})

    srv = FakeServer(script)
    q = bq.QMP(srv.client)
    with pytest.raises(bq.QMPError) as ei:
        q.execute("migrate-start-postcopy")
    assert ei.value.error_class == "GenericError"
    assert "must be started" in ei.value.desc
    assert isinstance(ei.value, bq.QemuError)
    q.close()
    srv.join()


def test_qmp_events_between_replies_are_kept_and_stale_replies_skipped() -> None:
    def script(srv: FakeServer) -> None:
        _handshake(srv)
        msg = srv.recv()
        srv.send(_event("MIGRATION", {"status": "setup"}, 5, 1))
        srv.send({"return": "stale", "id": "not-ours"})
        srv.send(_event("MIGRATION", {"status": "active"}, 5, 2))
        srv.send({"return": {}, "id": msg["id"]})
        srv.send(_event("MIGRATION", {"status": "postcopy-active"}, 5, 3))
        srv.send(_event("MIGRATION", {"status": "completed"}, 6, 500000))

    srv = FakeServer(script)
    q = bq.QMP(srv.client)
    assert q.execute("migrate", uri="tcp:127.0.0.1:1") == {}
    assert [e["data"]["status"] for e in q.events] == ["setup", "active"]
    # an event already received is found without reading
    assert (
        q.wait_event("MIGRATION", lambda d: d["status"] == "active")["data"]["status"] == "active"
    )
    end = q.wait_event("MIGRATION", lambda d: d["status"] == "completed", timeout=10)
    assert bq.event_time(end) == pytest.approx(6.5)
    assert [e["data"]["status"] for e in q.events][-2:] == ["postcopy-active", "completed"]
    q.close()
    srv.join()


def test_qmp_connection_closed_mid_command_is_a_clear_error() -> None:
    def script(srv: FakeServer) -> None:
        _handshake(srv)
        srv.recv()  # then close without answering

    srv = FakeServer(script)
    q = bq.QMP(srv.client)
    with pytest.raises(bq.QemuError, match="closed"):
        q.execute("query-migrate")
    q.close()
    srv.join()


def test_qmp_silent_server_times_out() -> None:
    done = threading.Event()

    def script(srv: FakeServer) -> None:
        _handshake(srv)
        srv.recv()
        done.wait(10)

    srv = FakeServer(script)
    q = bq.QMP(srv.client, timeout=0.2)
    with pytest.raises(bq.QemuError, match="no answer"):
        q.execute("query-migrate")
    done.set()
    q.close()
    srv.join()


def test_qmp_rejects_a_non_qmp_greeting_and_bad_json() -> None:
    srv = FakeServer(lambda s: None, greeting={"hello": 1})
    with pytest.raises(bq.QemuError, match="greeting"):
        bq.QMP(srv.client)
    srv.client.close()
    srv.join()

    def garbage(srv: FakeServer) -> None:
        srv.recv()
        srv.file.write(b"{not json\n")
        srv.file.flush()

    srv = FakeServer(garbage)
    with pytest.raises(bq.QemuError, match="bad JSON"):
        bq.QMP(srv.client)
    srv.client.close()
    srv.join()


def test_qmp_connect_fails_fast_when_qemu_is_gone(tmp_path: Path) -> None:
    with pytest.raises(bq.QemuError, match="exited"):
        bq.QMP.connect(str(tmp_path / "none.qmp"), timeout=10, alive=lambda: False)


def test_qmp_connect_over_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "q.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)

    def serve() -> None:
        conn, _ = ls.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            msg = json.loads(f.readline())
            f.write(json.dumps({"return": {}, "id": msg["id"]}).encode() + b"\n")
            f.flush()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    q = bq.QMP.connect(path, timeout=5)
    q.close()
    t.join(10)
    ls.close()
    assert not t.is_alive()


# -- the guest's report ---------------------------------------------------------------------------


def _bucket(d: int) -> int:
    """mb_toucher.S's bucket of ``d`` cycles, in Python."""
    if d < 4:
        return d
    b = d.bit_length() - 1
    return 4 * b + ((d >> (b - 2)) & 3)


@pytest.mark.parametrize(
    "d", [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 1000, 4095, 4096, 2**40 + 12345, 2**64 - 1]
)
def test_bucket_bounds_hold_the_value_the_guest_buckets(d: int) -> None:
    lo, hi = bq.bucket_bounds(_bucket(d))
    assert lo <= d < hi
    assert _bucket(d) < 256


def test_buckets_tile_the_cycle_axis() -> None:
    assert bq.bucket_bounds(3) == (3, 4)
    assert bq.bucket_bounds(8) == (4, 5)
    prev_hi = 5
    for idx in range(9, 256):
        lo, hi = bq.bucket_bounds(idx)
        assert lo == prev_hi and hi > lo
        prev_hi = hi
    assert prev_hi == 2**64
    with pytest.raises(ValueError):
        bq.bucket_bounds(5)


LOG = """B
F
G 1ffe0000
H 8 3
H 28 100
H 3a 2
H 3e 1
D 1ffde 700000000
"""


def test_parse_guest_log_reads_histogram_and_totals() -> None:
    r = bq.parse_guest_log(LOG)
    assert r is not None
    assert (r.mem_end, r.touches, r.total) == (0x1FFE0000, 0x1FFDE, 0x700000000)
    assert r.hist == {8: 3, 0x28: 0x100, 0x3A: 2, 0x3E: 1}
    assert bq.parse_guest_log("B\nF\nG 1000\nH 8 1\n") is None
    with pytest.raises(bq.QemuError, match="garbled"):
        bq.parse_guest_log("H zz 1\n")


def test_report_check_demands_every_page_once() -> None:
    mem_end = 0x400000  # 512 data pages
    n, total = bq.expected_touches(mem_end, "random", 7)
    assert n == 512
    assert total == sum((7 << 32) | i for i in range(512))
    bq.GuestReport(mem_end, n, total, {}).check("random", 7)
    bq.GuestReport(mem_end, 0, 0, {}).check("idle", 7)
    with pytest.raises(bq.QemuError, match="511 touches"):
        bq.GuestReport(mem_end, n - 1, total, {}).check("random", 7)
    with pytest.raises(bq.QemuError):
        bq.GuestReport(mem_end, n, total + 1, {}).check("sequential", 7)


def test_remote_fault_latency_counts_only_touches_over_the_threshold() -> None:
    hz = 1e9  # 1 cycle = 1 ns
    local = _bucket(1000)  # 1 µs
    remote = _bucket(20_000)  # 20 µs
    slow = _bucket(5_000_000)  # 5 ms
    s = bq.remote_fault_latency({local: 1000, remote: 98, slow: 2}, hz, threshold_us=3.0)
    assert s.faults == 100
    lo, hi = bq.bucket_bounds(remote)
    assert lo / 1e3 <= s.p50_us < hi / 1e3
    lo, hi = bq.bucket_bounds(slow)
    assert lo / 1e3 <= s.p99_us < hi / 1e3  # rank 99 of 100 is in the slow bucket
    assert s.max_us == bq.bucket_bounds(slow)[1] / 1e3
    # the slowest 10: 8 of the 20 µs bucket and the 2 slow ones
    top = bq.remote_fault_latency({local: 1000, remote: 98, slow: 2}, hz, 3.0, slowest=10)
    assert top.faults == 10
    assert bq.bucket_bounds(remote)[0] / 1e3 <= top.p50_us < bq.bucket_bounds(remote)[1] / 1e3
    assert bq.bucket_bounds(slow)[0] / 1e3 <= top.p99_us
    assert bq.remote_fault_latency({local: 5}, hz, 3.0, slowest=0).faults == 0
    assert bq.remote_fault_latency({local: 5}, hz, 3.0, slowest=50).faults == 5
    none = bq.remote_fault_latency({local: 5}, hz, threshold_us=3.0)
    assert (none.faults, none.p50_us, none.p99_us) == (0, 0.0, 0.0)


def test_host_tsc_rate_is_plausible() -> None:
    hz = bq.host_tsc_hz(0.01)
    assert 1e8 < hz < 1e11


# -- the QEMU command lines and processes ----------------------------------------------------------


def test_source_and_destination_differ_only_in_readback_and_incoming() -> None:
    src = bq.qemu_argv("qemu", 64 << 20, "random", 7, cpu="host", destination=False)
    dst = bq.qemu_argv("qemu", 64 << 20, "random", 7, cpu="host", destination=True)
    assert "-incoming" not in src and dst[-2:] == ["-incoming", "defer"]
    assert "@r7" in src and "64M" in src
    dev_s = src[src.index("-device") + 1]
    dev_d = dst[dst.index("-device") + 1]
    assert "readback" not in dev_s and dev_d == dev_s + f",readback={bq.GO:#x}"
    with pytest.raises(KeyError):
        bq.qemu_argv("qemu", 64 << 20, "nope", 7, cpu="host", destination=False)


def test_missing_qemu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(bq.QemuError, match="not found"):
        bq.find_qemu()
    with pytest.raises(bq.QemuError, match="not found"), bq.qemu_pair(64 << 20, "idle", 1):
        pass


def test_process_is_killed_on_close_and_its_death_reported(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    p = bq.QemuProcess("fake", sleeper, tmp_path)
    assert p.alive()
    p.close()  # no QMP: terminate, then kill
    assert p.proc.returncode is not None and not p.alive()
    dies = [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
    p = bq.QemuProcess("fake2", dies, tmp_path)
    p.proc.wait(10)
    with pytest.raises(bq.QemuError, match="exited with 3: boom"):
        p.wait_log("F", 10)
    p.close()


def test_wait_log_waits_for_the_newline(tmp_path: Path) -> None:
    """The guest writes a byte per exit: "D 1fd" without its newline is not the report yet."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    p = bq.QemuProcess("fake", sleeper, tmp_path)
    try:
        p.log_path.write_text("G 1000\nD 1fd")
        with pytest.raises(bq.QemuError, match="no 'D' from the guest"):
            p.wait_log("D", 0)
        p.log_path.write_text("G 1000\nD 1fd 5\n")
        assert p.wait_log("D", 0).endswith("D 1fd 5\n")
    finally:
        p.close()


# -- the multiboot guest ---------------------------------------------------------------------------


def test_mb_toucher_has_a_valid_multiboot_header() -> None:
    data = bq.GUEST.read_bytes()
    magic, flags, checksum, header, load, load_end, bss_end, entry = struct.unpack_from(
        "<8I", data, 0
    )
    assert magic == 0x1BADB002
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert flags & (1 << 16)  # address fields valid: a flat binary
    assert header == load == 0x100000
    assert load_end == bss_end == load + len(data)
    assert load < entry < load_end


_ok, _why = build.toolchain()


@pytest.mark.skipif(not _ok, reason=_why)
def test_committed_mb_toucher_bin_is_its_source() -> None:
    assert build.assemble(bq.GUEST.with_suffix(".S")) == bq.GUEST.read_bytes(), (
        "mb_toucher.bin is stale: run python tools/build_guests.py"
    )


# -- live: QEMU with KVM -------------------------------------------------------------------------------

needs_qemu = pytest.mark.skipif(
    shutil.which(bq.QEMU) is None,
    reason=f"{bq.QEMU} not installed (apt-get install qemu-system-x86)",
)


@pytest.fixture
def no_leftover_qemu() -> Iterator[list[bq.QemuProcess]]:
    """Collects the QemuProcess objects made during the test; asserts they are all dead after."""
    made: list[bq.QemuProcess] = []
    orig = bq.QemuProcess.__init__

    def spy(self: bq.QemuProcess, *a: Any, **k: Any) -> None:
        orig(self, *a, **k)
        made.append(self)

    bq.QemuProcess.__init__ = spy  # type: ignore[method-assign]
    try:
        yield made
    finally:
        bq.QemuProcess.__init__ = orig  # type: ignore[method-assign]
    for p in made:
        assert p.proc.poll() is not None, f"{p.name} QEMU still running"


@pytest.mark.slow
@pytest.mark.real_kernel
@needs_qemu
@pytest.mark.parametrize("workload", ["random", "idle"])
def test_qemu_postcopy_migration_completes_and_the_guest_reports(
    workload: str, no_leftover_qemu: list[bq.QemuProcess]
) -> None:
    r = bq.run_qemu_migration(64 << 20, workload, 7, tsc_hz=bq.host_tsc_hz(0.01))
    assert len(no_leftover_qemu) == 2
    assert "postcopy-ram" in r.capabilities
    assert r.total_ms > 0 and r.postcopy_ms > 0
    # the final report arrived, and says every data page was touched once (checked inside too)
    n, total = bq.expected_touches(r.guest.mem_end, workload, 7)
    assert (r.guest.touches, r.guest.total) == (n, total)
    assert 0 < r.guest.mem_end <= 64 << 20
    # pages went over after the switch to post-copy: (nearly) all of RAM
    assert r.pages_postcopy >= (48 << 20) // bq.PAGE
    if workload == "random":
        assert sum(r.guest.hist.values()) == n
        assert r.latency.faults > 0  # the destination guest waited for pages
        assert r.latency.p50_us > 0 and r.latency.p99_us >= r.latency.p50_us
    else:
        assert r.guest.hist == {} and r.latency.faults == 0


@pytest.mark.slow
@pytest.mark.real_kernel
@needs_qemu
def test_qemu_precopy_calibration_run_moves_no_page_after_the_switch(
    no_leftover_qemu: list[bq.QemuProcess],
) -> None:
    r = bq.run_qemu_migration(64 << 20, "sequential", 3, tsc_hz=1e9, postcopy=False)
    assert "postcopy-ram" not in r.capabilities
    assert (r.pages_postcopy, r.postcopy_requests, r.postcopy_ms) == (0, 0, 0.0)
    assert r.guest.touches == bq.expected_touches(r.guest.mem_end, "sequential", 3)[0] > 0
    assert r.total_ms > 0


@pytest.mark.slow
@pytest.mark.real_kernel
@needs_qemu
def test_a_guest_that_does_not_report_in_time_is_an_error_and_both_qemus_die(
    no_leftover_qemu: list[bq.QemuProcess],
) -> None:
    with pytest.raises(bq.QemuError, match=r"no 'F' from the guest in 0\.1 s"):
        bq.run_qemu_migration(64 << 20, "random", 7, tsc_hz=1e9, boot_timeout=0.1)
    assert len(no_leftover_qemu) == 2


@pytest.mark.slow
@pytest.mark.real_kernel
@needs_qemu
def test_qemu_that_cannot_start_is_reported_with_its_message(
    no_leftover_qemu: list[bq.QemuProcess],
) -> None:
    with pytest.raises(bq.QemuError, match="exited"):
        bq.run_qemu_migration(64 << 20, "idle", 7, cpu="no-such-cpu-model", tsc_hz=1e9)


@pytest.mark.slow
@needs_qemu
def test_cli_reports_a_broken_qemu_setup_cleanly(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools.bench_qemu", "--mem", "64M", "--workloads", "bogus"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "unknown workload 'bogus'" in out.stderr


def test_fakekvm_bench_qemu_without_qemu_says_so() -> None:
    """``fakekvm bench --qemu`` reaches tools/bench_qemu.py and fails with a clear message."""
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "--qemu", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={"PATH": "", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )
    assert out.returncode == 1
    assert "qemu-system-x86_64 not found on PATH" in out.stderr
