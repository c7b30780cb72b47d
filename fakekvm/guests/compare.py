"""Run the same guest on two kernels and report the first difference.

:func:`run_on` builds a fresh :class:`~fakekvm.guests.vm.GuestVM` on a kernel
made by a factory, runs one image or a sequence of images in it (e.g.
writer then verifier), snapshots guest memory, and closes everything.
:func:`compare` then walks two results in a fixed order -- the ordered exits,
how the run stopped, the reported values, the serial text, guest memory page
by page (and, on request, the final registers) -- and returns the first
:class:`Difference`, or ``None``.

:func:`fake_kernel_status` tells whether ``FakeKernel`` can run a vCPU yet, so
tests against it can skip with the reason until it does.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fakekvm.guests.image import GuestImage
from fakekvm.guests.vm import GuestVM, IoInHandler, MmioReadHandler, RunResult
from fakekvm.guests.workloads import first_difference, hello_image
from fakekvm.kernel.seam import Kernel

KernelFactory = Callable[[], Kernel]
PAGE = 4096


@dataclass(frozen=True)
class RunParams:
    """How to run an image: VM size and the VMM's answers to IN / MMIO reads."""

    mem_size: int
    vcpus: int = 1
    vcpu: int = 0
    on_io_in: IoInHandler | None = None
    on_mmio_read: MmioReadHandler | None = None
    max_exits: int = 1_000_000
    snapshot: bool = True  # copy guest memory into RunResult.memory
    check: bool = False  # raise GuestError on an error exit (else it is in the result)


@dataclass(frozen=True)
class Difference:
    """Where two runs first differ: ``what`` (exit, stop, reports, serial, page, regs),
    ``index`` (exit number, page number, ...), and both sides as text."""

    what: str
    index: int
    left: str
    right: str
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return f"first difference: {self.what}[{self.index}]: {self.left} != {self.right}"


def run_steps_on(
    kernel_factory: KernelFactory, images: Sequence[GuestImage], params: RunParams
) -> list[RunResult]:
    """Run ``images`` one after the other in one VM on a fresh kernel.

    Each image is loaded (memory + CPU state) before it runs, so later steps
    see the memory earlier steps left.  The last result carries the memory
    snapshot when ``params.snapshot``.
    """
    kernel = kernel_factory()
    results: list[RunResult] = []
    try:
        with GuestVM(kernel, params.mem_size, vcpus=params.vcpus) as vm:
            for image in images:
                vm.load(image)
                result = vm.run(
                    params.vcpu,
                    on_io_in=params.on_io_in,
                    on_mmio_read=params.on_mmio_read,
                    max_exits=params.max_exits,
                    check=params.check,
                )
                results.append(result)
                if result.error is not None:
                    break
            if params.snapshot and results:
                results[-1].memory = bytes(vm.mem())
    finally:
        kernel.shutdown()
    return results


def run_on(
    kernel_factory: KernelFactory, image: GuestImage | Sequence[GuestImage], params: RunParams
) -> RunResult:
    """Run ``image`` (or several, in order) on a fresh kernel; the last step's result."""
    images = [image] if isinstance(image, GuestImage) else list(image)
    if not images:
        raise ValueError("nothing to run")
    return run_steps_on(kernel_factory, images, params)[-1]


def compare(a: RunResult, b: RunResult, *, regs: bool = False) -> Difference | None:
    """The first difference between two runs, or ``None`` if they agree."""
    for i, (ea, eb) in enumerate(zip(a.exits, b.exits, strict=False)):
        if ea != eb:
            return Difference("exit", i, str(ea), str(eb))
    if len(a.exits) != len(b.exits):
        i = min(len(a.exits), len(b.exits))
        extra = a.exits[i:] or b.exits[i:]
        side = "left" if len(a.exits) > len(b.exits) else "right"
        return Difference(
            "exit", i, str(a.exits[i]) if i < len(a.exits) else "(no more exits)",
            str(b.exits[i]) if i < len(b.exits) else "(no more exits)",
            (f"{side} has {len(extra)} more exits",),
        )  # fmt: skip
    if (a.stop, a.done, a.error) != (b.stop, b.done, b.error):
        return Difference(
            "stop", 0, f"{a.stop} done={a.done} {a.error}", f"{b.stop} done={b.done} {b.error}"
        )
    if a.reports != b.reports:
        i = next(
            (j for j, (x, y) in enumerate(zip(a.reports, b.reports, strict=False)) if x != y),
            min(len(a.reports), len(b.reports)),
        )
        return Difference("reports", i, _at(a.reports, i), _at(b.reports, i))
    if a.serial != b.serial:
        return Difference("serial", 0, repr(a.text), repr(b.text))
    if a.memory is not None and b.memory is not None:
        page = first_difference(a.memory, b.memory, PAGE)
        if page is not None:
            return Difference(
                "page", page, _page_summary(a.memory, page), _page_summary(b.memory, page)
            )
    if regs:
        for name, value in a.regs.items():
            if b.regs.get(name) != value:
                return Difference(
                    "regs", 0, f"{name}={value:#x}", f"{name}={b.regs.get(name, 0):#x}"
                )
    return None


def _at(values: list[int], i: int) -> str:
    return f"{values[i]:#x}" if i < len(values) else "(missing)"


def _page_summary(memory: bytes, page: int) -> str:
    chunk = memory[page * PAGE : (page + 1) * PAGE]
    if not chunk:
        return "(past the end)"
    return f"gpa {page * PAGE:#x}: {chunk[:16].hex()}..."


# -- FakeKernel availability ---------------------------------------------------------

#: errnos that mean "the fake does not implement this yet" rather than "wrong answer"
_NOT_YET = {errno.ENOSYS, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOENT, errno.ENODEV}


def fake_kernel_factory(profile: str = "6.18-pvm") -> KernelFactory:
    """A factory of ``FakeKernel(profile=...)`` (imported lazily)."""

    def make() -> Kernel:
        from fakekvm.fake import FakeKernel

        kernel: Kernel = FakeKernel(profile=profile)
        return kernel

    return make


def fake_kernel_status(profile: str = "6.18-pvm", timeout_s: float = 120.0) -> tuple[bool, str]:
    """Can ``FakeKernel(profile)`` run a vCPU?  Tries ``hello``; returns (ok, reason).

    "Not yet" is: the import fails, a call raises ``NotImplementedError``, or
    an ioctl fails with ENOSYS/ENOTTY/EOPNOTSUPP/ENOENT/ENODEV -- or the probe
    does not finish within ``timeout_s`` (a hang guard: it runs in a daemon
    thread).  Any other outcome is "yes": wrong answers must fail the tests,
    not skip them.
    """
    answer: list[tuple[bool, str]] = []
    probe = threading.Thread(
        target=lambda: answer.append(_probe_fake(profile)), name="fake-probe", daemon=True
    )
    probe.start()
    probe.join(timeout_s)
    if not answer:
        return False, f"FakeKernel did not finish the hello probe within {timeout_s:g} s"
    return answer[0]


def _probe_fake(profile: str) -> tuple[bool, str]:
    try:
        factory = fake_kernel_factory(profile)
        run_on(factory, hello_image(), RunParams(mem_size=0x10000, max_exits=64, snapshot=False))
    except ImportError as e:
        return False, f"FakeKernel cannot be imported yet: {e}"
    except NotImplementedError as e:
        return False, f"FakeKernel does not implement this yet: {e}"
    except OSError as e:
        if e.errno in _NOT_YET:
            return False, f"FakeKernel cannot run a vCPU yet: {e}"
        return True, f"FakeKernel answered with {e!r}"
    except Exception as e:  # a bug, not a gap: let the tests run and show it
        return True, f"FakeKernel raised {e!r}"
    return True, "FakeKernel ran hello"
