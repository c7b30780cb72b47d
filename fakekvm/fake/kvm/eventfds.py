"""``KVM_IRQFD`` and ``KVM_IOEVENTFD`` on the fake VM (``virt/kvm/eventfd.c``).

* ``KVM_IRQFD``: flags beyond DEASSIGN|RESAMPLE are EINVAL; assigning needs an
  in-kernel irqchip (``kvm_arch_irqfd_allowed``), which the fake never has, so
  it is EINVAL as on a live VM without one; deassigning checks the fd
  (``eventfd_ctx_fdget``: EBADF / EINVAL) and succeeds.
* ``KVM_IOEVENTFD``: ``kvm_assign_ioeventfd`` / ``kvm_deassign_ioeventfd``
  checks in the kernel's order (len 0/1/2/4/8, address overflow, unknown
  flags, DATAMATCH without a length, then the fd), collisions EEXIST
  (``ioeventfd_check_collision``), a missing one ENOENT on deassign, at most
  ``NR_IOBUS_DEVS`` per VM. The VM keeps ``(bus, addr, len, wildcard,
  datamatch, eventfd)`` entries; a vCPU asks `FakeVm.ioeventfd_lookup` before
  exiting for a PIO/MMIO write (``kvm_io_bus_write``).

Errnos measured on the live 6.18 host (``tests/fake/test_kvm_vm_ioctls.py``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakekvm.abi import kvm as K
from fakekvm.fake.kvm.uaccess import fget, read_arg

if TYPE_CHECKING:
    from fakekvm.fake.files import FakeFile
    from fakekvm.fake.kvm.vm import FakeVm
    from fakekvm.kernel.seam import IoctlArg

_IRQFD = K.kvm_irqfd_fmt
_IOEVENTFD = K.kvm_ioeventfd_fmt
#: NR_IOBUS_DEVS
NR_IOBUS_DEVS = 1000
KVM_MMIO_BUS, KVM_PIO_BUS, KVM_VIRTIO_CCW_NOTIFY_BUS, KVM_FAST_MMIO_BUS = 0, 1, 2, 3


def eventfd_file(vm: FakeVm, fd: int, what: str) -> FakeFile:
    """eventfd_ctx_fdget: EBADF for a bad fd, EINVAL for another kind of file."""
    if fd >= 1 << 31:
        fd -= 1 << 32
    f = fget(vm.kernel, fd, what)
    if getattr(f, "kind", None) != "eventfd":
        raise OSError(errno.EINVAL, f"{what}: fd {fd} is not an eventfd")
    return f


def irqfd(vm: FakeVm, arg: IoctlArg) -> int:
    """KVM_IRQFD (``virt/kvm/eventfd.c`` ``kvm_irqfd``)."""
    what = "KVM_IRQFD"
    fd, _gsi, flags, _rfd = _IRQFD.unpack(read_arg(vm.kernel, arg, _IRQFD.size, what))
    if flags & ~(K.KVM_IRQFD_FLAG_DEASSIGN | K.KVM_IRQFD_FLAG_RESAMPLE):
        raise OSError(errno.EINVAL, f"{what}: flags {flags:#x}")
    if flags & K.KVM_IRQFD_FLAG_DEASSIGN:
        eventfd_file(vm, fd, what)
        return 0  # nothing can be assigned, so nothing to remove
    # kvm_arch_irqfd_allowed: no in-kernel irqchip in the fake
    raise OSError(errno.EINVAL, f"{what}: no in-kernel irqchip")


def ioeventfd(vm: FakeVm, arg: IoctlArg) -> int:
    """KVM_IOEVENTFD (``kvm_ioeventfd``: assign/deassign, collision rules)."""
    what = "KVM_IOEVENTFD"
    datamatch, addr, length, fd, flags = _IOEVENTFD.unpack(
        read_arg(vm.kernel, arg, _IOEVENTFD.size, what)
    )
    if flags & K.KVM_IOEVENTFD_FLAG_PIO:
        bus = KVM_PIO_BUS
    elif flags & K.KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY:
        bus = KVM_VIRTIO_CCW_NOTIFY_BUS
    else:
        bus = KVM_MMIO_BUS
    wildcard = not flags & K.KVM_IOEVENTFD_FLAG_DATAMATCH
    with vm.slots_lock:
        if flags & K.KVM_IOEVENTFD_FLAG_DEASSIGN:
            ev = eventfd_file(vm, fd, what)
            for i, (b, a, ln, wc, dm, e) in enumerate(vm.ioeventfds):
                if (b, a, ln, wc) == (bus, addr, length, wildcard) and e is ev:
                    if not wc and dm != datamatch:
                        continue
                    del vm.ioeventfds[i]
                    e.put()
                    return 0
            raise OSError(errno.ENOENT, f"{what}: no such ioeventfd")
        if length not in (0, 1, 2, 4, 8):
            raise OSError(errno.EINVAL, f"{what}: len {length}")
        if addr + length >= 1 << 64:
            raise OSError(errno.EINVAL, f"{what}: range overflows")
        if flags & ~K.KVM_IOEVENTFD_VALID_FLAG_MASK:
            raise OSError(errno.EINVAL, f"{what}: flags {flags:#x}")
        if not length and not wildcard:
            raise OSError(errno.EINVAL, f"{what}: DATAMATCH needs a length")
        ev = eventfd_file(vm, fd, what)
        for b, a, ln, wc, dm, _e in vm.ioeventfds:
            if (
                b == bus
                and a == addr
                and (not ln or not length or (ln == length and (wc or wildcard or dm == datamatch)))
            ):
                raise OSError(errno.EEXIST, f"{what}: collides with an ioeventfd")
        if len(vm.ioeventfds) >= NR_IOBUS_DEVS:
            raise OSError(errno.ENOSPC, f"{what}: bus full")
        ev.get()
        vm.ioeventfds.append((bus, addr, length, wildcard, datamatch, ev))
    return 0


def lookup(
    entries: list[tuple[int, int, int, bool, int, FakeFile]],
    bus: int,
    addr: int,
    length: int,
    data: int,
) -> FakeFile | None:
    """The eventfd a write of ``length`` bytes of ``data`` at ``addr`` on ``bus`` signals."""
    for b, a, ln, wildcard, dm, ev in entries:
        if b != bus or a != addr:
            continue
        if ln and ln != length:
            continue
        if wildcard or dm == data:
            return ev
    return None
