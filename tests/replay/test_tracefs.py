"""`replay.tracefs`: format files, ring-buffer pages, the instance life cycle, and the join.

The pure tests build ring-buffer pages by hand (every record type of include/linux/ring_buffer.h)
and parse format files captured from this host's 6.18 kernel, plus a made-up variant whose
fields moved. The real-kernel tests trace a hello guest on /dev/kvm and check the decoded
events against the KVM_RUN calls the recorder saw and against the kernel's own text rendering.
"""

from __future__ import annotations

import collections
import errno
import os
import pathlib
import re
import struct
import subprocess
import sys
import threading

import pytest

from fakekvm.abi import kvm
from fakekvm.guests import (
    HELLO_MESSAGE,
    GuestVM,
    Pattern,
    TouchParams,
    hello_image,
    layout,
    toucher_image,
)
from fakekvm.kernel.real import RealKernel
from replay.events import Call, Contents, Fault, KernelEvent
from replay.recorder import RecordingKernel
from replay.tracefs import (
    DEFAULT_LAYOUT,
    RB_MISSED_EVENTS,
    RB_MISSED_STORED,
    TS_SHIFT,
    TYPE_PADDING,
    TYPE_TIME_EXTEND,
    TYPE_TIME_STAMP,
    Decoder,
    PageLayout,
    TracefsError,
    TracefsSession,
    find_tracefs,
    load_kevents,
    merge,
    parse_format,
    parse_header_page,
    parse_page,
    remove_stale_instances,
    save_kevents,
    tracefs_status,
)

# -- captured from this host (Linux 6.18, kvm-pvm): /sys/kernel/tracing/events/... -------------

KVM_EXIT_FORMAT = """\
name: kvm_exit
ID: 103
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u32 isa;\toffset:24;\tsize:4;\tsigned:0;
\tfield:u64 info1;\toffset:32;\tsize:8;\tsigned:0;
\tfield:u64 info2;\toffset:40;\tsize:8;\tsigned:0;
\tfield:u32 intr_info;\toffset:48;\tsize:4;\tsigned:0;
\tfield:u32 error_code;\toffset:52;\tsize:4;\tsigned:0;
\tfield:unsigned int vcpu_id;\toffset:56;\tsize:4;\tsigned:0;
\tfield:u64 requests;\toffset:64;\tsize:8;\tsigned:0;

print fmt: "vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx intr_info 0x%08x \
error_code 0x%08x requests 0x%016llx", REC->vcpu_id, (REC->isa == 1) ? \
__print_symbolic(REC->exit_reason & 0xffff, { 0, "EXCEPTION_NMI" }) : "", REC->guest_rip
"""

#: a made-up older/other kernel: no ``requests``, ``vcpu_id`` first, ``guest_rip`` moved
KVM_EXIT_FORMAT_MOVED = """\
name: kvm_exit
ID: 77
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int vcpu_id;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned int exit_reason;\toffset:12;\tsize:4;\tsigned:0;
\tfield:u64 info1;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u64 info2;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long guest_rip;\toffset:32;\tsize:8;\tsigned:0;
\tfield:u32 isa;\toffset:40;\tsize:4;\tsigned:0;
\tfield:u32 intr_info;\toffset:44;\tsize:4;\tsigned:0;
\tfield:u32 error_code;\toffset:48;\tsize:4;\tsigned:0;

print fmt: "vcpu %u reason %s", REC->vcpu_id, REC->exit_reason
"""

KVM_USERSPACE_EXIT_FORMAT = """\
name: kvm_userspace_exit
ID: 42
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__u32 reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:int errno;\toffset:12;\tsize:4;\tsigned:1;

print fmt: "reason %s (%d)", REC->errno < 0 ? "error" : "ok", REC->reason
"""

HEADER_PAGE = """\
\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;
\tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;
\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;
\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;
"""

EXIT = parse_format(KVM_EXIT_FORMAT, "kvm")
UEXIT = parse_format(KVM_USERSPACE_EXIT_FORMAT, "kvm")


# -- building pages by hand ------------------------------------------------------------------------


def data(delta: int, payload: bytes, *, big: bool = False) -> bytes:
    """A data record: type_len = words (1..28), or 0 with the length (+4) in array[0]."""
    assert len(payload) % 4 == 0
    if big or len(payload) > 28 * 4:
        return struct.pack("<II", delta << 5, len(payload) + 4) + payload
    return struct.pack("<I", delta << 5 | len(payload) // 4) + payload


def padding(delta: int, length: int) -> bytes:
    """A discarded record (rb_event_discard): array[0] = bytes after the header."""
    return struct.pack("<II", delta << 5 | TYPE_PADDING, length) + bytes(length - 4)


def extend(delta: int) -> bytes:
    return struct.pack(
        "<II", (delta & ((1 << TS_SHIFT) - 1)) << 5 | TYPE_TIME_EXTEND, delta >> TS_SHIFT
    )


def stamp(t: int) -> bytes:
    return struct.pack("<II", (t & ((1 << TS_SHIFT) - 1)) << 5 | TYPE_TIME_STAMP, t >> TS_SHIFT)


def page(
    ts: int, *records: bytes, flags: int = 0, size: int | None = None, tail: bytes = b""
) -> bytes:
    body = b"".join(records)
    commit = (len(body) if size is None else size) | flags
    raw = struct.pack("<Qq", ts, commit) + body + tail
    return raw + bytes(4096 - len(raw))


def exit_payload(pid: int, reason: int, rip: int, vcpu: int) -> bytes:
    b = bytearray(72)
    struct.pack_into("<HBBi", b, 0, EXIT.id, 0, 0, pid)
    struct.pack_into("<I", b, 8, reason)
    struct.pack_into("<Q", b, 16, rip)
    struct.pack_into("<I", b, 56, vcpu)
    struct.pack_into("<Q", b, 64, 0xABCDEF)
    return bytes(b)


def uexit_payload(pid: int, reason: int, err: int = 0) -> bytes:
    return struct.pack("<HBBiIi", UEXIT.id, 0, 0, pid, reason, err)


# -- format files ----------------------------------------------------------------------------------


def test_format_file_of_this_host() -> None:
    assert (EXIT.system, EXIT.name, EXIT.id) == ("kvm", "kvm_exit", 103)
    by = {f.name: f for f in EXIT.fields}
    assert [f.name for f in EXIT.fields][:5] == [
        "common_type",
        "common_flags",
        "common_preempt_count",
        "common_pid",
        "exit_reason",
    ]
    assert (by["guest_rip"].type, by["guest_rip"].offset, by["guest_rip"].size) == (
        "unsigned long",
        16,
        8,
    )
    assert by["common_pid"].signed and not by["requests"].signed
    assert all(f.kind == "int" for f in EXIT.fields)
    pid, fields = EXIT.decode(exit_payload(1234, 30, 0x7C10, 3))
    assert pid == 1234
    assert fields == {
        "exit_reason": 30,
        "guest_rip": 0x7C10,
        "isa": 0,
        "info1": 0,
        "info2": 0,
        "intr_info": 0,
        "error_code": 0,
        "vcpu_id": 3,
        "requests": 0xABCDEF,
    }


def test_decoding_follows_the_file_not_fixed_offsets() -> None:
    moved = parse_format(KVM_EXIT_FORMAT_MOVED, "kvm")
    b = bytearray(56)
    struct.pack_into("<HBBi", b, 0, moved.id, 0, 0, 99)
    struct.pack_into("<IIQQQI", b, 8, 5, 48, 0x11, 0x22, 0xFFFF_8000_0000_1234, 1)
    pid, fields = moved.decode(bytes(b))
    assert pid == 99
    assert fields["vcpu_id"] == 5 and fields["exit_reason"] == 48
    assert fields["guest_rip"] == 0xFFFF_8000_0000_1234 and fields["isa"] == 1
    assert "requests" not in fields
    # the same bytes read with this host's layout give other values: offsets come from the file
    assert EXIT.decode(bytes(b) + bytes(16))[1]["guest_rip"] != fields["guest_rip"]


def test_signed_fields_strings_dynamic_arrays_and_unknown_types() -> None:
    fmt = parse_format(
        "name: odd\nID: 9\nformat:\n"
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
        "\tfield:int errno;\toffset:8;\tsize:4;\tsigned:1;\n"
        "\tfield:char comm[8];\toffset:12;\tsize:8;\tsigned:0;\n"
        "\tfield:u8 insn[3];\toffset:20;\tsize:3;\tsigned:0;\n"
        "\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;\n"
        "\tfield:__rel_loc u8[] blob;\toffset:28;\tsize:4;\tsigned:0;\n"
        "\tfield:struct weird w;\toffset:32;\tsize:12;\tsigned:0;\n"
        "\tfield:s8 small;\toffset:44;\tsize:1;\tsigned:1;\n",
        "test",
    )
    kinds = {f.name: f.kind for f in fmt.fields}
    assert kinds == {
        "common_type": "int",
        "common_pid": "int",
        "errno": "int",
        "comm": "str",
        "insn": "bytes",
        "name": "data_loc",
        "blob": "rel_loc",
        "w": "bytes",
        "small": "int",
    }
    b = bytearray(48)
    struct.pack_into("<HxxiI", b, 0, 9, 7, (-4) & 0xFFFFFFFF)
    b[12:20] = b"qemu\0zz\0"
    b[20:23] = b"\x0f\x01\xc1"
    struct.pack_into("<I", b, 24, 6 << 16 | 48)  # "vcpu0\0" at 48
    struct.pack_into("<I", b, 28, 2 << 16 | 24)  # 2 bytes at (28 + 4) + 24 = 56
    b[32:44] = bytes(range(12))
    b[44] = 0xFF
    b += b"vcpu0\0" + b"pq" + b"\xaa\xbb"
    pid, fields = fmt.decode(bytes(b))
    assert pid == 7
    assert fields == {
        "errno": -4,
        "comm": "qemu",
        "insn": b"\x0f\x01\xc1",
        "name": "vcpu0",
        "blob": b"\xaa\xbb",
        "w": bytes(range(12)),
        "small": -1,
    }
    # a record cut short keeps the fields it has
    assert fmt.decode(bytes(b[:16]))[1] == {"errno": -4}


def test_bad_format_files_are_refused() -> None:
    with pytest.raises(ValueError, match="no 'name:' or 'ID:'"):
        parse_format("format:\n\tfield:int x;\toffset:0;\tsize:4;\tsigned:1;\n")
    with pytest.raises(ValueError, match="no 'field:'"):
        parse_format("name: x\nID: 3\nformat:\n")


def test_header_page() -> None:
    assert parse_header_page(HEADER_PAGE) == DEFAULT_LAYOUT == PageLayout()
    assert DEFAULT_LAYOUT.page_size == 4096
    small = parse_header_page(
        "\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n"
        "\tfield: local_t commit;\toffset:8;\tsize:4;\tsigned:1;\n"
        "\tfield: char data;\toffset:12;\tsize:4084;\tsigned:0;\n"
    )
    assert (small.commit_size, small.data_offset, small.page_size) == (4, 12, 4096)
    with pytest.raises(ValueError, match="no field commit"):
        parse_header_page(
            "\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n"
            "\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;\n"
        )


# -- ring-buffer pages -----------------------------------------------------------------------------


def test_page_of_data_records_with_deltas() -> None:
    a, b = uexit_payload(10, kvm.KVM_EXIT_IO), exit_payload(10, 30, 0x7C10, 0)
    p = parse_page(page(1_000_000, data(0, a), data(250, b), data(7, a, big=True)))
    assert p.stopped is None and p.missed == 0 and p.timestamp == 1_000_000
    assert p.records == [(1_000_000, a), (1_000_250, b), (1_000_257, a)]
    assert len(b) // 4 <= 28, "the kvm_exit record fits a type_len"
    dec = Decoder([EXIT, UEXIT])
    evs = [dec.decode(2, t, pl) for t, pl in p.records]
    assert [(e.name, e.cpu, e.pid, e.t_ns) for e in evs] == [
        ("kvm_userspace_exit", 2, 10, 1_000_000),
        ("kvm_exit", 2, 10, 1_000_250),
        ("kvm_userspace_exit", 2, 10, 1_000_257),
    ]
    assert evs[0].fields == {"reason": kvm.KVM_EXIT_IO, "errno": 0}


def test_a_record_longer_than_28_words_uses_array0() -> None:
    long = uexit_payload(1, 2) + bytes(200)
    p = parse_page(page(5, data(3, long)))
    assert p.records == [(8, long)]
    assert Decoder([UEXIT]).decode(0, 8, p.records[0][1]).fields == {"reason": 2, "errno": 0}


def test_time_extend_and_absolute_time_stamp() -> None:
    a = uexit_payload(1, 2)
    big = (5 << TS_SHIFT) + 12345  # more than 27 bits of delta
    p = parse_page(
        page(
            100,
            data(1, a),
            extend(big),
            data(2, a),
            stamp(9_000_000_000),
            data(3, a),
            extend(0x7FFFFFF),
            data(0, a),
        )
    )
    assert p.stopped is None
    assert [t for t, _ in p.records] == [
        101,
        101 + big + 2,
        9_000_000_003,
        9_000_000_003 + 0x7FFFFFF,
    ]


def test_absolute_stamp_gets_its_top_bits_back() -> None:
    """rb_fix_abs_ts: a TIME_STAMP carries 59 bits; the top 5 come from the current time."""
    base = (0x18 << 56) | 1000
    p = parse_page(
        page(base, data(0, uexit_payload(1, 2)), stamp(2000), data(0, uexit_payload(1, 2)))
    )
    assert [t for t, _ in p.records] == [base, (0x18 << 56) | 2000]


def test_padding_discarded_records_and_the_null_event() -> None:
    a = uexit_payload(1, 2)
    p = parse_page(
        page(
            0, data(10, a), padding(5, 20), data(1, a), struct.pack("<I", TYPE_PADDING), data(1, a)
        )
    )
    assert [t for t, _ in p.records] == [10, 16], "padding time counts; the null event ends it"
    assert p.stopped is None


def test_missed_events_flags() -> None:
    a = uexit_payload(1, 2)
    assert parse_page(page(0, data(0, a), flags=RB_MISSED_EVENTS)).missed == -1
    stored = parse_page(
        page(0, data(0, a), flags=RB_MISSED_EVENTS | RB_MISSED_STORED, tail=struct.pack("<Q", 321))
    )
    assert stored.missed == 321 and len(stored.records) == 1


def test_a_page_cut_short() -> None:
    a = uexit_payload(1, 2)
    full = page(0, data(1, a), data(1, a), data(1, a))
    whole = 16 + 3 * (4 + len(a))
    cut = parse_page(full[: whole - 5])
    assert len(cut.records) == 2
    assert cut.stopped is not None and "cut short" in cut.stopped
    header_only = parse_page(full[:10])
    assert header_only.records == [] and "shorter than its 16-byte header" in (
        header_only.stopped or ""
    )
    # a record header whose array[0] is missing, and a commit larger than a page
    assert "cut short" in (parse_page(full[:16] + struct.pack("<I", 0)).stopped or "")
    liar = parse_page(page(0, data(1, a), size=9000))
    assert len(liar.records) == 1 and "a page holds 4080" in (liar.stopped or "")


def test_unknown_event_type_is_kept_raw() -> None:
    payload = struct.pack("<HBBi", 555, 0, 0, 42) + b"\x01\x02\x03\x04"
    ev = Decoder([EXIT]).decode(1, 7, payload)
    assert (ev.system, ev.name, ev.pid, ev.fields) == ("", "type-555", 42, {"raw": payload})


# -- merge -----------------------------------------------------------------------------------------


def _k(t: int, name: str = "e") -> KernelEvent:
    return KernelEvent(t, 0, 1, "kvm", name)


def test_merge_interleaves_by_time_and_keeps_the_recorded_order() -> None:
    c1 = Call(seq=0, tid=1, t_ns=100, dur_ns=50, op="ioctl", name="KVM_RUN")
    cont = Contents(seq=0, hva=0x1000, data=b"x")
    c2 = Call(seq=1, tid=2, t_ns=90, dur_ns=5, op="ioctl")  # completed later, entered earlier
    f = Fault(seq=2, tid=1, observed_ns=200)
    c3 = Call(seq=3, tid=1, t_ns=300, dur_ns=1, op="read")
    k = [_k(50), _k(100), _k(120), _k(199), _k(250), _k(400), _k(500)]
    out = list(merge([c1, cont, c2, f, c3], iter(k)))
    assert out == [k[0], c1, cont, c2, k[1], k[2], k[3], f, k[4], c3, k[5], k[6]]
    assert list(merge([], k)) == k and list(merge([c1, f], [])) == [c1, f]


# -- the live kernel -------------------------------------------------------------------------------

_OK, _WHY = tracefs_status()


def _instances() -> set[str]:
    root = find_tracefs()
    assert root is not None
    return set(os.listdir(os.path.join(root, "instances")))


def _ours() -> set[str]:
    """This process's instances (others' may come and go while the tests run)."""
    return {n for n in _instances() if n.startswith(f"fakekvm-{os.getpid()}-")}


def _is_pvm() -> bool:
    return os.path.isdir("/sys/module/kvm_pvm")


@pytest.mark.real_kernel
def test_status_on_this_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("tracefs here is mode 0700 root:root; the status check needs root")
    ok, why = tracefs_status()
    assert ok, why
    assert why.startswith("tracefs at /sys/kernel/tracing, instances writable"), why
    assert tracefs_status(("kvm:no_such_event",)) == (
        False,
        "tracefs at /sys/kernel/tracing, instances writable; 0/1 events available "
        "(missing: kvm:no_such_event)",
    )


@pytest.mark.real_kernel
@pytest.mark.skipif(not _OK, reason=f"tracefs: {_WHY}")
def test_hello_guest_userspace_exits_match_kvm_run_returns() -> None:
    """One ``kvm_userspace_exit`` per KVM_RUN return, with the same exit reason, placed by
    `merge` right after the recorded KVM_RUN call; one ``kvm_pio`` per OUT byte."""
    assert _ours() == set()
    calls: list[Call | Fault | Contents] = []
    result = {}
    with TracefsSession() as s:
        assert s.name in _instances() and s.pid_filtered
        rk = RecordingKernel(RealKernel(), calls)

        def vcpu_thread() -> None:  # started after the session: followed by event-fork
            with GuestVM(rk, 1 << 20) as vm:
                vm.load(hello_image())
                result["r"] = vm.run()

        t = threading.Thread(target=vcpu_thread)
        t.start()
        t.join()
        rk.stop_recording()
    assert _ours() == set(), "the instance is gone"
    assert s.lost == 0 and s.notes == []
    r = result["r"]
    runs = [c for c in calls if isinstance(c, Call) and c.name == "KVM_RUN"]
    by = collections.defaultdict(list)
    for e in s.events:
        by[e.name].append(e)
    assert len([c for c in runs if c.errno == 0]) == len(r.exits) == len(HELLO_MESSAGE) + 1
    ue = by["kvm_userspace_exit"]
    assert len(ue) == len(runs), "one kvm_userspace_exit per KVM_RUN return"
    assert [e.fields["reason"] for e in ue if e.fields["errno"] == 0] == [
        ex.reason for ex in r.exits
    ]
    # a failed KVM_RUN (EINTR, re-entered by GuestVM) is traced with the negative errno
    assert [-e.fields["errno"] for e in ue if e.fields["errno"]] == [
        c.errno for c in runs if c.errno
    ]
    assert {e.pid for e in ue} == {runs[0].tid}, "the vCPU thread, not the main one"
    pio = by["kvm_pio"]
    assert bytes(e.fields["val"] for e in pio) == HELLO_MESSAGE
    assert {(e.fields["port"], e.fields["rw"], e.fields["size"]) for e in pio} == {(0x3F8, 1, 1)}
    if _is_pvm():  # PVM never calls trace_kvm_exit/kvm_entry/kvm_page_fault (VMX/SVM-only)
        assert by["kvm_exit"] == [] and by["kvm_entry"] == [] and by["kvm_page_fault"] == []
    else:
        assert len(by["kvm_exit"]) >= len(runs)
    # the join: every KVM_RUN call is followed, before the next call, by its own exit event
    merged = list(merge(calls, s.events))
    assert len(merged) == len(calls) + len(s.events)
    starts = [i for i, e in enumerate(merged) if isinstance(e, Call)]
    for i, j in zip(starts, [*starts[1:], len(merged)], strict=True):
        c = merged[i]
        assert isinstance(c, Call)
        after = [e for e in merged[i + 1 : j] if isinstance(e, KernelEvent)]
        assert all(c.t_ns <= e.t_ns for e in after)
        ue_after = [e for e in after if e.name == "kvm_userspace_exit"]
        if c.name == "KVM_RUN" and c.errno:
            assert [e.fields["errno"] for e in ue_after] == [-c.errno]
        elif c.name == "KVM_RUN":
            reason = kvm.kvm_run_exit_reason_fmt.unpack_from(c.out, 8)[0]
            assert [e.fields["reason"] for e in ue_after] == [reason]
            assert c.t_ns <= ue_after[0].t_ns <= c.t_ns + c.dur_ns, "inside the call"
        else:
            assert ue_after == []


@pytest.mark.real_kernel
@pytest.mark.skipif(not _OK, reason=f"tracefs: {_WHY}")
@pytest.mark.parametrize("subbuf", [None, 8], ids=["4k-pages", "8k-subbuf"])
def test_binary_decode_agrees_with_the_kernels_text(subbuf: int | None) -> None:
    """Thousands of kvmmmu events over many pages: every event, its CPU, pid, microsecond and
    every integer field equal what the kernel prints in the instance's ``trace`` file."""
    mem = layout.DATA_BASE + (8 << 20)
    p = TouchParams(layout.DATA_BASE, 8 << 20, Pattern.RANDOM, write=True, seed=3)
    events = (
        "kvm:kvm_userspace_exit",
        "kvm:kvm_pio",
        "kvmmmu:kvm_mmu_set_spte",
        "kvmmmu:kvm_mmu_paging_element",
        "kvmmmu:kvm_mmu_get_page",
    )
    with TracefsSession(events, buffer_size_kb=8192, subbuf_size_kb=subbuf) as s:
        if not os.path.exists(os.path.join(s.path, "options", "fields")):
            pytest.skip("this kernel's tracefs has no options/fields")
        with open(os.path.join(s.path, "options", "fields"), "w") as f:
            f.write("1")  # print every field as name=0xhex (dec)
        with GuestVM(RealKernel(), mem) as vm:
            vm.load(toucher_image(mem, p))
            vm.run()
        with open(os.path.join(s.path, "tracing_on"), "w") as f:
            f.write("0")
        with open(os.path.join(s.path, "trace")) as f:
            text = [ln for ln in f.read().splitlines() if ln and not ln.startswith("#")]
    assert s.lost == 0 and s.notes == []
    assert s.layout.page_size == (subbuf or 4) * 1024, "the layout comes from header_page"
    assert len(s.events) == len(text) > 2000, "many pages' worth"
    line = re.compile(r"^\s*.*-(\d+)\s+\[(\d+)\]\s+\S+\s+(\d+)\.(\d+): (\w+): ?(.*)$")
    for ev, ln in zip(s.events, text, strict=True):
        m = line.match(ln)
        assert m is not None, ln
        pid, cpu, sec, usec, name, rest = m.groups()
        assert (ev.pid, ev.cpu, ev.name) == (int(pid), int(cpu), name), ln
        # the text rounds to the nearest microsecond (trace_output.c: ns2usecs adds 500)
        assert (ev.t_ns + 500) // 1000 == int(sec) * 1_000_000 + int(usec), ln
        shown = {k: int(v) for k, v in re.findall(r"(\w+)=(?:0x[0-9a-f]+ )?\((-?\d+)\)", rest)}
        assert shown, ln
        for k, v in shown.items():
            assert ev.fields[k] == v, (k, ln)


@pytest.mark.real_kernel
@pytest.mark.skipif(not _OK, reason=f"tracefs: {_WHY}")
def test_pid_filter_and_drain_while_tracing() -> None:
    """Only the listed threads are traced; ``drain`` mid-run loses nothing."""
    seen = threading.Event()

    def other() -> None:
        with GuestVM(RealKernel(), 1 << 20) as vm:
            vm.load(hello_image())
            assert vm.run().serial == HELLO_MESSAGE
        seen.set()

    with TracefsSession(
        ("kvm:kvm_userspace_exit",), pids=[threading.get_native_id()], follow_forks=False
    ) as s:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen.is_set()
        runs = 0
        for _ in range(2):
            with GuestVM(RealKernel(), 1 << 20) as vm:
                vm.load(hello_image())
                runs += len(vm.run().exits)
            s.drain()
    assert runs == 2 * (len(HELLO_MESSAGE) + 1)
    ok = [e for e in s.events if e.fields["errno"] == 0]  # (an EINTR return is traced too)
    assert len(ok) == runs, "the other thread's exits are not there, ours all are"
    assert {e.pid for e in s.events} == {threading.get_native_id()}
    # the same with a draining thread instead of explicit drains (correct whatever it catches)
    with TracefsSession(("kvm:kvm_userspace_exit",), drain_interval=0.001) as d:
        for _ in range(3):
            with GuestVM(RealKernel(), 1 << 20) as vm:
                vm.load(hello_image())
                vm.run()
    ok = [e for e in d.events if e.fields["errno"] == 0]
    assert len(ok) == 3 * (len(HELLO_MESSAGE) + 1) and d.lost == 0
    assert [e.t_ns for e in d.events] == sorted(e.t_ns for e in d.events)


_CHILD = """
from fakekvm.guests import GuestVM, hello_image
from fakekvm.kernel.real import RealKernel
with GuestVM(RealKernel(), 1 << 20) as vm:
    vm.load(hello_image())
    print(len(vm.run().exits))
"""


@pytest.mark.real_kernel
@pytest.mark.skipif(not _OK, reason=f"tracefs: {_WHY}")
def test_a_child_process_is_followed() -> None:
    """``fakekvm capture -- CMD`` runs CMD as a child: event-fork puts it in set_event_pid."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with (
        TracefsSession(("kvm:kvm_userspace_exit",)) as s,
        subprocess.Popen(
            [sys.executable, "-c", _CHILD], cwd=root, stdout=subprocess.PIPE, text=True
        ) as child,
    ):
        out, _ = child.communicate()
    assert child.returncode == 0
    exits = int(out.split()[-1])
    assert exits == len(HELLO_MESSAGE) + 1
    pids = collections.Counter(e.pid for e in s.events if e.fields["errno"] == 0)
    assert pids == {child.pid: exits}, "the child's main thread ran the vCPU"


@pytest.mark.real_kernel
@pytest.mark.skipif(not _OK, reason=f"tracefs: {_WHY}")
def test_cleanup_on_every_exit_path() -> None:
    assert _ours() == set()
    with pytest.raises(RuntimeError, match="boom"), TracefsSession() as s:
        assert s.name in _instances()
        raise RuntimeError("boom")
    assert _ours() == set()
    with pytest.raises(TracefsError) as e:
        TracefsSession(("kvm:kvm_userspace_exit", "kvm:no_such_event"), strict=True).start()
    assert e.value.errno == errno.ENOENT and "kvm:no_such_event" in str(e.value)
    assert _ours() == set()
    lax = TracefsSession(("kvm:no_such_event", "kvm:kvm_userspace_exit"))
    with lax:
        pass
    assert lax.enabled == ["kvm:kvm_userspace_exit"] and "kvm:no_such_event" in lax.skipped
    assert lax.events == [] and _ours() == set()
    with pytest.raises(TracefsError) as e2:
        TracefsSession(("nope:nothing",)).start()
    assert e2.value.errno == errno.ENOENT and _ours() == set()
    # an instance left by a process that no longer exists is removed; live ones are kept
    root = find_tracefs()
    assert root is not None
    stale = os.path.join(root, "instances", "fakekvm-999999999-0")
    os.mkdir(stale)
    with TracefsSession(("kvm:kvm_userspace_exit",)) as mine:
        assert "fakekvm-999999999-0" in remove_stale_instances()
        assert "fakekvm-999999999-0" not in _instances()
        assert mine.name in _instances()
    assert _ours() == set()


def test_kevents_side_file(tmp_path: pathlib.Path) -> None:
    evs = [
        KernelEvent(5, 1, 77, "kvm", "kvm_userspace_exit", {"reason": 2, "errno": -14}),
        KernelEvent(9, 0, 77, "test", "odd", {"comm": "qemu", "insn": b"\x0f\x01"}),
    ]
    path = tmp_path / "t.kevents"
    assert save_kevents(path, iter(evs)) == 2
    assert list(load_kevents(path)) == evs
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:-3])
    it = load_kevents(path)
    assert next(it) == evs[0]
    with pytest.raises(ValueError, match=r"offset \d+: record cut short"):
        next(it)
    with open(path, "wb") as f:
        f.write(b"nope")
    with pytest.raises(ValueError, match="offset 0: not a fakekvm kernel-event file"):
        list(load_kevents(path))
