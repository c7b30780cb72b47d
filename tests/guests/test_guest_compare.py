"""The side-by-side harness: real vs real, the difference finder, and FakeKernel.

The FakeKernel tests skip, with the reason, while ``FakeKernel(profile="6.18-pvm")``
cannot run a vCPU (:func:`fake_kernel_status`); once it can, they must pass.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
from collections.abc import Callable

import pytest

from fakekvm.guests import (
    GuestImage,
    Pattern,
    RunResult,
    TouchParams,
    echo_image,
    expected_checksum,
    hello_image,
    layout,
    toucher_image,
    verifier_image,
    writer_image,
)
from fakekvm.guests import compare as compare_mod
from fakekvm.guests.compare import (
    Difference,
    RunParams,
    compare,
    fake_kernel_factory,
    fake_kernel_status,
    run_on,
    run_steps_on,
)
from fakekvm.guests.exits import Exit
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import Kernel

MiB = 1 << 20
BASE = layout.DATA_BASE
SIZE = 8 * MiB
MEM = BASE + SIZE


def _echo_inputs() -> RunParams:
    values = iter([3, 9, 0])
    return RunParams(mem_size=2 * MiB, on_io_in=lambda p, s, c: next(values).to_bytes(4, "little"))


#: name -> (images, params factory); params are rebuilt per run (echo's iterator)
WORKLOADS: dict[str, tuple[list[GuestImage], Callable[[], RunParams]]] = {
    "hello": ([hello_image()], lambda: RunParams(mem_size=1 * MiB)),
    "echo": ([echo_image(2 * MiB)], _echo_inputs),
    "toucher-random-write": (
        [toucher_image(MEM, TouchParams(BASE, SIZE, Pattern.RANDOM, write=True, seed=4))],
        lambda: RunParams(mem_size=MEM),
    ),
    "toucher-hotset-read": (
        [toucher_image(MEM, TouchParams(BASE, SIZE, Pattern.HOTSET, seed=4, hot_pages=8))],
        lambda: RunParams(mem_size=MEM),
    ),
    "writer-verifier": (
        [writer_image(MEM, BASE, SIZE, 11), verifier_image(MEM, BASE, SIZE)],
        lambda: RunParams(mem_size=MEM),
    ),
}


def _run(factory: Callable[[], Kernel], name: str) -> RunResult:
    images, params = WORKLOADS[name]
    return run_on(factory, images, params())


# -- pure: the difference finder ----------------------------------------------------------


def _result(**kw: object) -> RunResult:
    r = RunResult(vcpu=0, exits=[Exit(5)], stop="hlt", regs={"rip": 1}, memory=bytes(3 * 4096))
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_compare_equal_results() -> None:
    assert compare(_result(), _result()) is None


def test_compare_names_the_first_differing_exit() -> None:
    io = Exit(2, (("port", 0x3F8),), b"a")
    a = _result(exits=[io, io, Exit(5)])
    b = _result(exits=[io, Exit(2, (("port", 0x3F8),), b"b"), Exit(5)])
    d = compare(a, b)
    assert d is not None and (d.what, d.index) == ("exit", 1)
    assert "data=61" in d.left and "data=62" in d.right
    d = compare(a, _result(exits=[io]))
    assert d is not None and (d.what, d.index) == ("exit", 1) and "2 more exits" in d.notes[0]


def test_compare_stop_reports_serial_page_regs() -> None:
    d = compare(_result(), _result(stop="done", done=1))
    assert d is not None and d.what == "stop"
    d = compare(_result(reports=[1, 2, 3]), _result(reports=[1, 5, 3]))
    assert d == Difference("reports", 1, "0x2", "0x5")
    d = compare(_result(serial=bytearray(b"x")), _result(serial=bytearray(b"y")))
    assert d is not None and d.what == "serial"
    mem = bytearray(3 * 4096)
    mem[2 * 4096 + 5] = 1
    d = compare(_result(), _result(memory=bytes(mem)))
    assert d is not None and (d.what, d.index) == ("page", 2) and "gpa 0x2000" in d.left
    assert compare(_result(), _result(regs={"rip": 2})) is None, "regs only on request"
    d = compare(_result(), _result(regs={"rip": 2}), regs=True)
    assert d is not None and d.what == "regs" and "first difference: regs" in str(d)


def test_run_on_refuses_nothing_to_run() -> None:
    with pytest.raises(ValueError):
        run_on(RealKernel, [], RunParams(mem_size=MiB))


# -- the real kernel against itself -------------------------------------------------------


@pytest.mark.real_kernel
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_real_runs_are_reproducible(name: str) -> None:
    a, b = _run(RealKernel, name), _run(RealKernel, name)
    assert a.error is None and a.stop in ("done", "hlt")
    assert compare(a, b) is None


@pytest.mark.real_kernel
def test_run_steps_on_keeps_memory_between_steps() -> None:
    images, params = WORKLOADS["writer-verifier"]
    w, v = run_steps_on(RealKernel, images, params())
    assert w.reports == [SIZE // 4096] and w.memory is None
    assert v.report64(0) == expected_checksum(11, BASE, SIZE) and v.memory is not None
    flipped = dataclasses.replace(v, memory=v.memory[:BASE] + b"\xff" + v.memory[BASE + 1 :])
    d = compare(v, flipped)
    assert d is not None and (d.what, d.index) == ("page", BASE // 4096)


# -- FakeKernel(profile="6.18-pvm") against the real kernel ---------------------------------


@functools.cache
def _fake() -> tuple[bool, str]:
    return fake_kernel_status("6.18-pvm")


def _need_fake() -> None:
    ok, why = _fake()
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_fake_runs_the_workloads(name: str) -> None:
    """Fake alone: the same answers as the Python mirrors (no /dev/kvm needed)."""
    _need_fake()
    r = _run(fake_kernel_factory("6.18-pvm"), name)
    assert r.error is None, r.error
    if name == "hello":
        assert r.text == "Hello from fakekvm\n" and r.stop == "hlt"
    elif name == "echo":
        assert r.reports == [4, 10] and r.done == 0
    elif name == "writer-verifier":
        assert r.report64(0) == expected_checksum(11, BASE, SIZE)
    else:
        assert r.reports[0] == SIZE // 4096 and r.done == 0


@pytest.mark.real_kernel
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_fake_matches_real(name: str) -> None:
    _need_fake()
    real = _run(RealKernel, name)
    fake = _run(fake_kernel_factory("6.18-pvm"), name)
    diff = compare(real, fake)
    assert diff is None, str(diff)


@pytest.mark.parametrize(
    ("exc", "ok", "text"),
    [
        (ImportError("no vcpu module"), False, "cannot be imported yet"),
        (NotImplementedError("KVM_RUN"), False, "does not implement"),
        (OSError(errno.ENOTTY, "KVM_RUN"), False, "cannot run a vCPU yet"),
        (OSError(errno.EINVAL, "KVM_SET_SREGS"), True, "answered with"),
        (TypeError("bug"), True, "raised"),
    ],
)
def test_fake_kernel_status_tells_gaps_from_bugs(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException, ok: bool, text: str
) -> None:
    def factory(profile: str) -> Callable[[], Kernel]:
        def make() -> Kernel:
            raise exc

        return make

    monkeypatch.setattr(compare_mod, "fake_kernel_factory", factory)
    got_ok, why = compare_mod.fake_kernel_status("x")
    assert got_ok is ok and text in why
