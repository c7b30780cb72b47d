"""Test tiers.

* Pure tests run anywhere.
* ``real_kernel`` tests need ``/dev/kvm`` answering ``KVM_GET_API_VERSION``;
  ``real_uffd`` tests need a working userfaultfd. Where the host lacks them they
  are skipped with the reason, never failed.
* ``needs_cc`` tests need a C compiler and the uAPI headers.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator

import pytest

from fakekvm.kernel.real import RealKernel, kvm_available


@functools.cache
def _kvm() -> tuple[bool, str]:
    return kvm_available()


@functools.cache
def _uffd() -> tuple[bool, str]:
    k = RealKernel()
    try:
        fd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        try:
            fd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | 1)  # UFFD_USER_MODE_ONLY
        except OSError:
            return False, f"userfaultfd(2) fails: {e.strerror}"
    k.close(fd)
    return True, "userfaultfd(2) works"


@functools.cache
def _cc() -> tuple[bool, str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False, "no C compiler (cc/gcc) on PATH"
    if not os.path.exists("/usr/include/linux/kvm.h"):
        return False, "no /usr/include/linux/kvm.h (install linux-libc-dev)"
    return True, cc


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, probe in (("real_kernel", _kvm), ("real_uffd", _uffd), ("needs_cc", _cc)):
            if marker in item.keywords:
                ok, reason = probe()
                if not ok:
                    item.add_marker(pytest.mark.skip(reason=f"{marker}: {reason}"))


@pytest.fixture
def real_kernel() -> Iterator[RealKernel]:
    """The host kernel; use with ``@pytest.mark.real_kernel`` or ``real_uffd``."""
    yield RealKernel()


def _make_kernel(kind: str):  # type: ignore[no-untyped-def]
    if kind == "real":
        return RealKernel()
    from fakekvm import FakeKernel  # type: ignore[attr-defined]

    return FakeKernel(profile="6.18-pvm")


@pytest.fixture(
    params=[pytest.param("real", marks=pytest.mark.real_kernel), "fake"],
    ids=["real", "fake"],
)
def any_kernel(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Run the test once on the host kernel and once on FakeKernel(profile="6.18-pvm")."""
    k = _make_kernel(request.param)
    yield k
    k.shutdown()
