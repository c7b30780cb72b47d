"""guest_memfd scenarios written once against the `Kernel` seam, run on the real and the fake kernel.

Each scenario is ``scenario(kernel) -> Record``: a dict of step name to what the kernel
answered (a value, ``"ok"``, or the errno name), so the records of two kernels compare
with ``==``. The rows are the live table of ``/work/shared/reference/uapi.md`` §4
(KVM_CREATE_GUEST_MEMFD, the guest_memfd file, KVM_SET_USER_MEMORY_REGION2 bindings) as
measured on Linux 6.18 here, plus the checks that follow from ``virt/kvm/guest_memfd.c``
and ``fs/open.c`` ``vfs_fallocate`` (order of EINVAL / EOPNOTSUPP / EFBIG).

Only :func:`is_fake`, :func:`poke`, :func:`peek` and :func:`touch_outcome` know which
kernel they drive (host accesses on the fake go through its mm so the fault path runs;
on the host a SIGBUS is observed in a forked child).

:class:`ModelVcpu` is a fake-only stand-in vCPU (a per-gfn translation cache that asks
`fakekvm.fake.kvm.private.resolve` on a miss and drops entries on ``invalidate``), for
unit-testing the private/shared and KVM Userfault rules without running guest code.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import os
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.kernel.seam import Kernel

Record = dict[str, Any]
PAGE = mman.PAGE_SIZE
RW = mman.PROT_READ | mman.PROT_WRITE
MMAP = K.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = K.GUEST_MEMFD_FLAG_INIT_SHARED
KEEP = mman.FALLOC_FL_KEEP_SIZE
PUNCH = mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE
_GMEM = struct.Struct("<QQ6Q")
_REGION2 = K.kvm_userspace_memory_region2_fmt
_REGION1 = K.kvm_userspace_memory_region_fmt


# ---------------------------------------------------------------------------------------------
# kernel-kind helpers
# ---------------------------------------------------------------------------------------------
def is_fake(k: Kernel) -> bool:
    return hasattr(k, "mm")


def poke(k: Kernel, address: int, data: bytes) -> None:
    if is_fake(k):
        k.mm.write(address, data)  # type: ignore[attr-defined]
    else:
        ctypes.memmove(address, data, len(data))


def peek(k: Kernel, address: int, n: int) -> bytes:
    if is_fake(k):
        return bytes(k.mm.read(address, n))  # type: ignore[attr-defined]
    return ctypes.string_at(address, n)


def touch_outcome(k: Kernel, address: int, write: bool) -> str:
    """"ok", "SIGBUS" or "SIGSEGV" for a host access (on the host: in a forked child)."""
    if is_fake(k):
        r = k.mm.touch(address, write)  # type: ignore[attr-defined]
        name = getattr(r, "name", str(r))
        return "ok" if name in ("OK", "ok", "0") else str(name)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            faulthandler.disable()  # the expected SIGBUS is not a crash report
            if write:
                ctypes.memset(address, 1, 1)
            else:
                ctypes.string_at(address, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return "ok"


# ---------------------------------------------------------------------------------------------
# small drivers
# ---------------------------------------------------------------------------------------------
def res(fn: Callable[[], Any]) -> Any:
    """The call's result (None -> "ok") or its errno name."""
    try:
        r = fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok" if r is None else r


@contextmanager
def vm(k: Kernel, vm_type: int = 0) -> Iterator[int]:
    """A VM fd (and /dev/kvm), closed afterwards."""
    kfd = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        v = k.ioctl(kfd, K.KVM_CREATE_VM, vm_type)
        try:
            yield v
        finally:
            k.close(v)
    finally:
        k.close(kfd)


def create_gmem(k: Kernel, vmfd: int, size: int, flags: int, reserved: int = 0) -> int:
    buf = bytearray(_GMEM.pack(size, flags, reserved, 0, 0, 0, 0, 0))
    return k.ioctl(vmfd, K.KVM_CREATE_GUEST_MEMFD, buf)


def gmem_res(k: Kernel, vmfd: int, size: int, flags: int, reserved: int = 0) -> str:
    """"fd" (then closed) or the errno name."""
    try:
        fd = create_gmem(k, vmfd, size, flags, reserved)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    k.close(fd)
    return "fd"


def region2(
    k: Kernel, vmfd: int, slot: int, flags: int, gpa: int, size: int, hva: int,
    gofs: int = 0, gfd: int = 0,
) -> Any:
    buf = bytearray(_REGION2.pack(slot, flags, gpa, size, hva, gofs, gfd & 0xFFFFFFFF, 0))
    return res(lambda: k.ioctl(vmfd, K.KVM_SET_USER_MEMORY_REGION2, buf))


def region1(k: Kernel, vmfd: int, slot: int, flags: int, gpa: int, size: int, hva: int) -> Any:
    buf = bytearray(_REGION1.pack(slot, flags, gpa, size, hva))
    return res(lambda: k.ioctl(vmfd, K.KVM_SET_USER_MEMORY_REGION, buf))


def fake_unready_reason(k: Kernel) -> str | None:
    """Why the fake cannot run these scenarios yet (None: it can)."""
    if not is_fake(k):
        return None
    try:
        with vm(k) as v:
            fd = create_gmem(k, v, PAGE, 0)
            k.close(fd)
    except OSError as e:
        return f"fake kernel cannot create a VM + guest_memfd yet: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------------
def scn_create(k: Kernel) -> Record:
    """KVM_CREATE_GUEST_MEMFD flags, size and reserved[] rows; KVM_CAP_GUEST_MEMFD_FLAGS."""
    r: Record = {}
    with vm(k) as v:
        r["cap_flags"] = k.ioctl(v, K.KVM_CHECK_EXTENSION, K.KVM_CAP_GUEST_MEMFD_FLAGS)
        for name, flags in [("0", 0), ("mmap", MMAP), ("init_shared", INIT_SHARED),
                            ("both", MMAP | INIT_SHARED), ("bit2", 1 << 2), ("bit63", 1 << 63),
                            ("both+bit2", 7)]:
            r[f"flags_{name}"] = gmem_res(k, v, 8 * PAGE, flags)
        for size in [0, 2048, 4097, (1 << 64) - 4096, 1 << 63, PAGE, 1 << 40, (1 << 63) - PAGE]:
            r[f"size_{size:#x}"] = gmem_res(k, v, size, MMAP | INIT_SHARED)
        r["reserved_nonzero"] = gmem_res(k, v, 8 * PAGE, 0, reserved=0xDEAD)
    return r


def _file_ops(k: Kernel, fd: int, p: str, r: Record) -> None:
    r[p + "read"] = res(lambda: k.read(fd, PAGE))
    r[p + "read0"] = res(lambda: k.read(fd, 0))
    r[p + "write"] = res(lambda: k.write(fd, bytes(PAGE)))
    r[p + "pread"] = res(lambda: k.pread(fd, PAGE, 0))
    r[p + "pwrite"] = res(lambda: k.pwrite(fd, bytes(PAGE), 0))
    r[p + "lseek"] = res(lambda: k.lseek(fd, 0, os.SEEK_SET))
    r[p + "lseek_data"] = res(lambda: k.lseek(fd, 0, os.SEEK_DATA))
    r[p + "ftruncate_same"] = res(lambda: k.ftruncate(fd, 8 * PAGE))
    r[p + "ftruncate_grow"] = res(lambda: k.ftruncate(fd, 16 * PAGE))
    r[p + "ftruncate_0"] = res(lambda: k.ftruncate(fd, 0))
    st = k.fstat(fd)
    r[p + "fstat"] = (oct(st.st_mode), st.st_size, st.st_nlink, st.st_blocks, st.st_blksize,
                      st.st_uid == os.geteuid())
    r[p + "ioctl_check_extension"] = res(lambda: k.ioctl(fd, K.KVM_CHECK_EXTENSION, 0))
    buf = bytearray(_GMEM.pack(PAGE, 0, 0, 0, 0, 0, 0, 0))
    r[p + "ioctl_create_gmem"] = res(lambda: k.ioctl(fd, K.KVM_CREATE_GUEST_MEMFD, buf))
    r[p + "poll"] = [ev for _fd, ev in k.poll([(fd, mman.POLLIN | mman.POLLOUT | mman.POLLPRI)], 0)]
    k.fallocate(fd, KEEP, 0, 2 * PAGE)
    r[p + "fstat_blocks_after_alloc"] = k.fstat(fd).st_blocks


def scn_file_ops(k: Kernel) -> Record:
    """read/write/pread/pwrite/lseek/ftruncate/fstat/ioctl on a guest_memfd."""
    r: Record = {}
    with vm(k) as v:
        for flags in (0, MMAP | INIT_SHARED):
            fd = create_gmem(k, v, 8 * PAGE, flags)
            _file_ops(k, fd, f"f{flags}_", r)
            k.close(fd)
    return r


#: (name, mode, offset, len) fallocate rows on an 8-page guest_memfd
FALLOCATE_ROWS: list[tuple[str, int, int, int]] = [
    ("keep_inside", KEEP, 0, PAGE),
    ("keep_whole", KEEP, 0, 8 * PAGE),
    ("keep_beyond", KEEP, 8 * PAGE, PAGE),
    ("keep_straddle", KEEP, 7 * PAGE, 2 * PAGE),
    ("punch_inside", PUNCH, PAGE, PAGE),
    ("punch_beyond", PUNCH, 1 << 40, PAGE),
    ("punch_straddle", PUNCH, 7 * PAGE, 4 * PAGE),
    ("mode0", 0, 0, PAGE),
    ("punch_no_keep", mman.FALLOC_FL_PUNCH_HOLE, 0, PAGE),
    ("no_hide_stale", KEEP | mman.FALLOC_FL_NO_HIDE_STALE, 0, PAGE),
    ("punch_no_hide_stale", PUNCH | mman.FALLOC_FL_NO_HIDE_STALE, 0, PAGE),
    ("collapse", mman.FALLOC_FL_COLLAPSE_RANGE, 0, PAGE),
    ("collapse_keep", mman.FALLOC_FL_COLLAPSE_RANGE | KEEP, 0, PAGE),
    ("zero", mman.FALLOC_FL_ZERO_RANGE, 0, PAGE),
    ("zero_keep", mman.FALLOC_FL_ZERO_RANGE | KEEP, 0, PAGE),
    ("zero_punch", mman.FALLOC_FL_ZERO_RANGE | mman.FALLOC_FL_PUNCH_HOLE, 0, PAGE),
    ("insert", mman.FALLOC_FL_INSERT_RANGE, 0, PAGE),
    ("insert_keep", mman.FALLOC_FL_INSERT_RANGE | KEEP, 0, PAGE),
    ("unshare_keep", mman.FALLOC_FL_UNSHARE_RANGE | KEEP, 0, PAGE),
    ("write_zeroes", 0x80, 0, PAGE),
    ("write_zeroes_keep", 0x80 | KEEP, 0, PAGE),
    ("unknown_0x100", 0x100 | KEEP, 0, PAGE),
    ("keep_unaligned_off", KEEP, 1, PAGE),
    ("keep_unaligned_len", KEEP, 0, PAGE - 1),
    ("punch_unaligned_off", PUNCH, 1, PAGE),
    ("punch_unaligned_len", PUNCH, 0, PAGE + 1),
    ("mode0_unaligned", 0, 1, PAGE - 1),
    ("keep_len0", KEEP, 0, 0),
    ("punch_len0", PUNCH, 0, 0),
    ("keep_neg_off", KEEP, -PAGE, PAGE),
    ("mode0_neg_off", 0, -PAGE, PAGE),
    ("keep_neg_len", KEEP, 0, -PAGE),
    ("keep_huge", KEEP, 0, 1 << 62),
    ("keep_overflow", KEEP, (1 << 63) - PAGE, PAGE),
    ("punch_overflow", PUNCH, 1 << 62, 1 << 62),
    ("mode0_overflow", 0, (1 << 63) - PAGE, PAGE),
    ("punch_no_keep_overflow", mman.FALLOC_FL_PUNCH_HOLE, (1 << 63) - PAGE, PAGE),
    ("no_hide_stale_overflow", mman.FALLOC_FL_NO_HIDE_STALE, (1 << 63) - PAGE, PAGE),
    ("write_zeroes_overflow", 0x80, (1 << 63) - PAGE, PAGE),
]


def _fallocate(k: Kernel, fd: int, mode: int, offset: int, length: int) -> Any:
    return res(lambda: k.fallocate(fd, mode, offset, length))


def scn_fallocate(k: Kernel) -> Record:
    r: Record = {}
    with vm(k) as v:
        for flags in (0, MMAP | INIT_SHARED):
            fd = create_gmem(k, v, 8 * PAGE, flags)
            for name, mode, off, ln in FALLOCATE_ROWS:
                r[f"f{flags}_{name}"] = _fallocate(k, fd, mode, off, ln)
            k.close(fd)
    return r


def scn_mmap(k: Kernel) -> Record:
    """mmap rows (flags x prot x map type), offsets, and what host accesses do."""
    r: Record = {}
    with vm(k) as v:
        fds = {name: create_gmem(k, v, 8 * PAGE, f) for name, f in
               [("none", 0), ("mmap", MMAP), ("init_shared", INIT_SHARED), ("both", MMAP | INIT_SHARED)]}

        def try_map(fd: int, length: int, prot: int, flags: int, off: int = 0) -> str:
            try:
                m = k.mmap(fd, length, prot, flags, off)
            except OSError as e:
                return errno.errorcode.get(e.errno or 0, str(e.errno))
            k.munmap(m.address, length)
            return "ok"

        for name, fd in fds.items():
            for pname, prot in [("r", mman.PROT_READ), ("rw", RW), ("rwx", RW | mman.PROT_EXEC),
                                ("none", mman.PROT_NONE)]:
                for tname, mt in [("shared", mman.MAP_SHARED), ("private", mman.MAP_PRIVATE),
                                  ("validate", mman.MAP_SHARED_VALIDATE)]:
                    r[f"{name}_{pname}_{tname}"] = try_map(fd, PAGE, prot, mt)
        both = fds["both"]
        r["beyond_eof_offset"] = try_map(both, PAGE, RW, mman.MAP_SHARED, 16 * PAGE)
        r["longer_than_file"] = try_map(both, 16 * PAGE, RW, mman.MAP_SHARED)
        r["unaligned_offset"] = try_map(both, PAGE, RW, mman.MAP_SHARED, 1)
        r["len0"] = try_map(both, 0, RW, mman.MAP_SHARED)

        m = k.mmap(both, 16 * PAGE, RW, mman.MAP_SHARED)
        r["shared_read"] = touch_outcome(k, m.address, False)
        r["shared_write"] = touch_outcome(k, m.address + PAGE, True)
        r["shared_last_page"] = touch_outcome(k, m.address + 7 * PAGE, True)
        r["shared_beyond_eof"] = touch_outcome(k, m.address + 8 * PAGE, False)
        k.munmap(m.address, 16 * PAGE)
        p = k.mmap(fds["mmap"], 2 * PAGE, RW, mman.MAP_SHARED)
        r["private_read"] = touch_outcome(k, p.address, False)
        r["private_write"] = touch_outcome(k, p.address + PAGE, True)
        r["private_fallocate"] = res(lambda: k.fallocate(fds["mmap"], KEEP, 0, PAGE))
        r["private_read_after_fallocate"] = touch_outcome(k, p.address, False)
        k.munmap(p.address, 2 * PAGE)
        for fd in fds.values():
            k.close(fd)
    return r


def scn_shared_views(k: Kernel) -> Record:
    """MMAP|INIT_SHARED: two mappings share bytes; PUNCH_HOLE zeroes them; re-allocation."""
    r: Record = {}
    with vm(k) as v:
        fd = create_gmem(k, v, 8 * PAGE, MMAP | INIT_SHARED)
        a = k.mmap(fd, 8 * PAGE, RW, mman.MAP_SHARED)
        b = k.mmap(fd, 8 * PAGE, RW, mman.MAP_SHARED)
        c = k.mmap(fd, 4 * PAGE, mman.PROT_READ, mman.MAP_SHARED, 4 * PAGE)
        r["fresh_reads_zero"] = peek(k, b.address, 16) == bytes(16)
        poke(k, a.address, b"A" * PAGE + b"B" * PAGE)
        poke(k, a.address + 5 * PAGE, b"F" * 8)
        r["view_b_page0"] = peek(k, b.address, 4)
        r["view_b_page1"] = peek(k, b.address + PAGE, 4)
        r["view_c_at_offset"] = peek(k, c.address + PAGE, 8)
        r["punch_page0"] = res(lambda: k.fallocate(fd, PUNCH, 0, PAGE))
        r["after_punch_a0"] = peek(k, a.address, 4)
        r["after_punch_b0"] = peek(k, b.address, 4)
        r["after_punch_b1"] = peek(k, b.address + PAGE, 4)
        r["punch_offset_page5"] = res(lambda: k.fallocate(fd, PUNCH, 5 * PAGE, PAGE))
        r["after_punch_c1"] = peek(k, c.address + PAGE, 8)
        r["punch_beyond_eof"] = res(lambda: k.fallocate(fd, PUNCH, 8 * PAGE, 8 * PAGE))
        r["still_b1"] = peek(k, b.address + PAGE, 4)
        r["realloc"] = res(lambda: k.fallocate(fd, KEEP, 0, 8 * PAGE))
        r["realloc_reads_zero"] = peek(k, a.address, 4)
        poke(k, b.address + 3 * PAGE, b"rewrite")
        r["rewrite_visible"] = peek(k, a.address + 3 * PAGE, 7)
        for m, n in ((a, 8), (b, 8), (c, 4)):
            k.munmap(m.address, n * PAGE)
        k.close(fd)
    return r


def scn_region2(k: Kernel) -> Record:
    """KVM_SET_USER_MEMORY_REGION2 guest_memfd binding rows (uapi.md §4)."""
    r: Record = {}
    G = K.KVM_MEM_GUEST_MEMFD
    with vm(k) as v, vm(k) as other:
        mem = k.mmap(-1, 64 * PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
        hva = mem.address
        fd = create_gmem(k, v, 16 * PAGE, MMAP | INIT_SHARED)
        ofd = create_gmem(k, other, 16 * PAGE, MMAP | INIT_SHARED)
        efd = k.eventfd(0, 0)
        gm = k.mmap(fd, 16 * PAGE, RW, mman.MAP_SHARED)
        r["bind_ok"] = region2(k, v, 0, G, 0, 4 * PAGE, gm.address, 0, fd)
        r["bind_overlap_file_range"] = region2(k, v, 1, G, 1 << 20, 4 * PAGE, hva, 2 * PAGE, fd)
        r["bind_second_range_ok"] = region2(k, v, 1, G, 1 << 20, 4 * PAGE, hva, 4 * PAGE, fd)
        r["bind_unaligned_offset"] = region2(k, v, 2, G, 2 << 20, PAGE, hva, 8 * PAGE + 1, fd)
        r["bind_beyond_file"] = region2(k, v, 2, G, 2 << 20, 4 * PAGE, hva, 14 * PAGE, fd)
        r["bind_offset_at_eof"] = region2(k, v, 2, G, 2 << 20, PAGE, hva, 16 * PAGE, fd)
        r["bind_other_vm_gmem"] = region2(k, v, 2, G, 2 << 20, PAGE, hva, 0, ofd)
        r["bind_eventfd"] = region2(k, v, 2, G, 2 << 20, PAGE, hva, 0, efd)
        r["bind_fd_minus1"] = region2(k, v, 2, G, 2 << 20, PAGE, hva, 0, -1)
        r["bind_readonly"] = region2(k, v, 2, G | K.KVM_MEM_READONLY, 2 << 20, PAGE, hva, 8 * PAGE, fd)
        r["bind_log_dirty"] = region2(k, v, 2, G | K.KVM_MEM_LOG_DIRTY_PAGES, 2 << 20, PAGE, hva, 8 * PAGE, fd)
        r["bind_via_v1"] = region1(k, v, 2, G, 2 << 20, PAGE, hva)
        r["bind_gpa_overlap"] = region2(k, v, 2, G, 0, PAGE, hva, 8 * PAGE, fd)
        r["no_flag_offset_ignored"] = region2(k, v, 3, 0, 3 << 20, PAGE, hva, 12345, fd)
        r["reissue_identical"] = region2(k, v, 0, G, 0, 4 * PAGE, gm.address, 0, fd)
        r["toggle_log_dirty"] = region2(k, v, 0, G | K.KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * PAGE, gm.address, 0, fd)
        r["move"] = region2(k, v, 0, G, 8 << 20, 4 * PAGE, gm.address, 0, fd)
        r["drop_gmem_flag"] = region2(k, v, 0, 0, 0, 4 * PAGE, gm.address, 0, fd)
        r["delete"] = region2(k, v, 0, G, 0, 0, gm.address, 0, fd)
        r["recreate_after_delete"] = region2(k, v, 0, G, 0, 4 * PAGE, gm.address, 0, fd)
        r["rebind_range_of_deleted_slot"] = region2(k, v, 4, G, 4 << 20, 4 * PAGE, hva, 0, fd)
        r["delete_again"] = region2(k, v, 0, G, 0, 0, gm.address, 0, fd)
        r["rebind_freed_range"] = region2(k, v, 4, G, 4 << 20, 4 * PAGE, hva, 0, fd)
        k.close(fd)
        r["bind_closed_fd"] = region2(k, v, 5, G, 5 << 20, PAGE, hva, 8 * PAGE, fd)
        k.munmap(gm.address, 16 * PAGE)
        k.close(ofd)
        k.close(efd)
        k.munmap(mem.address, 64 * PAGE)
    return r


SCENARIOS: dict[str, Callable[[Kernel], Record]] = {
    "create": scn_create,
    "file_ops": scn_file_ops,
    "fallocate": scn_fallocate,
    "mmap": scn_mmap,
    "shared_views": scn_shared_views,
    "region2": scn_region2,
}

#: what the live 6.18 kernel (6.18.44, kvm-pvm) answered, recorded with RealKernel;
#: tests/gmem/test_gmem_file.py checks both kernels against it
EXPECTED_618: dict[str, Record] = {'create': {'cap_flags': 3,
            'flags_0': 'fd',
            'flags_mmap': 'fd',
            'flags_init_shared': 'fd',
            'flags_both': 'fd',
            'flags_bit2': 'EINVAL',
            'flags_bit63': 'EINVAL',
            'flags_both+bit2': 'EINVAL',
            'size_0x0': 'EINVAL',
            'size_0x800': 'EINVAL',
            'size_0x1001': 'EINVAL',
            'size_0xfffffffffffff000': 'EINVAL',
            'size_0x8000000000000000': 'EINVAL',
            'size_0x1000': 'fd',
            'size_0x10000000000': 'fd',
            'size_0x7ffffffffffff000': 'fd',
            'reserved_nonzero': 'fd'},
 'file_ops': {'f0_read': 'EINVAL',
              'f0_read0': 'EINVAL',
              'f0_write': 'EINVAL',
              'f0_pread': 'ESPIPE',
              'f0_pwrite': 'ESPIPE',
              'f0_lseek': 'ESPIPE',
              'f0_lseek_data': 'ESPIPE',
              'f0_ftruncate_same': 'EINVAL',
              'f0_ftruncate_grow': 'EINVAL',
              'f0_ftruncate_0': 'EINVAL',
              'f0_fstat': ('0o100600', 32768, 1, 0, 4096, True),
              'f0_ioctl_check_extension': 'ENOTTY',
              'f0_ioctl_create_gmem': 'ENOTTY',
              'f0_poll': [5],
              'f0_fstat_blocks_after_alloc': 0,
              'f3_read': 'EINVAL',
              'f3_read0': 'EINVAL',
              'f3_write': 'EINVAL',
              'f3_pread': 'ESPIPE',
              'f3_pwrite': 'ESPIPE',
              'f3_lseek': 'ESPIPE',
              'f3_lseek_data': 'ESPIPE',
              'f3_ftruncate_same': 'EINVAL',
              'f3_ftruncate_grow': 'EINVAL',
              'f3_ftruncate_0': 'EINVAL',
              'f3_fstat': ('0o100600', 32768, 1, 0, 4096, True),
              'f3_ioctl_check_extension': 'ENOTTY',
              'f3_ioctl_create_gmem': 'ENOTTY',
              'f3_poll': [5],
              'f3_fstat_blocks_after_alloc': 0},
 'fallocate': {'f0_keep_inside': 'ok',
               'f0_keep_whole': 'ok',
               'f0_keep_beyond': 'EINVAL',
               'f0_keep_straddle': 'EINVAL',
               'f0_punch_inside': 'ok',
               'f0_punch_beyond': 'ok',
               'f0_punch_straddle': 'ok',
               'f0_mode0': 'ENOTSUP',
               'f0_punch_no_keep': 'ENOTSUP',
               'f0_no_hide_stale': 'ENOTSUP',
               'f0_punch_no_hide_stale': 'ENOTSUP',
               'f0_collapse': 'ENOTSUP',
               'f0_collapse_keep': 'ENOTSUP',
               'f0_zero': 'ENOTSUP',
               'f0_zero_keep': 'ENOTSUP',
               'f0_zero_punch': 'ENOTSUP',
               'f0_insert': 'ENOTSUP',
               'f0_insert_keep': 'ENOTSUP',
               'f0_unshare_keep': 'ENOTSUP',
               'f0_write_zeroes': 'ENOTSUP',
               'f0_write_zeroes_keep': 'ENOTSUP',
               'f0_unknown_0x100': 'ENOTSUP',
               'f0_keep_unaligned_off': 'EINVAL',
               'f0_keep_unaligned_len': 'EINVAL',
               'f0_punch_unaligned_off': 'EINVAL',
               'f0_punch_unaligned_len': 'EINVAL',
               'f0_mode0_unaligned': 'ENOTSUP',
               'f0_keep_len0': 'EINVAL',
               'f0_punch_len0': 'EINVAL',
               'f0_keep_neg_off': 'EINVAL',
               'f0_mode0_neg_off': 'EINVAL',
               'f0_keep_neg_len': 'EINVAL',
               'f0_keep_huge': 'EINVAL',
               'f0_keep_overflow': 'EFBIG',
               'f0_punch_overflow': 'EFBIG',
               'f0_mode0_overflow': 'EFBIG',
               'f0_punch_no_keep_overflow': 'ENOTSUP',
               'f0_no_hide_stale_overflow': 'ENOTSUP',
               'f0_write_zeroes_overflow': 'EFBIG',
               'f3_keep_inside': 'ok',
               'f3_keep_whole': 'ok',
               'f3_keep_beyond': 'EINVAL',
               'f3_keep_straddle': 'EINVAL',
               'f3_punch_inside': 'ok',
               'f3_punch_beyond': 'ok',
               'f3_punch_straddle': 'ok',
               'f3_mode0': 'ENOTSUP',
               'f3_punch_no_keep': 'ENOTSUP',
               'f3_no_hide_stale': 'ENOTSUP',
               'f3_punch_no_hide_stale': 'ENOTSUP',
               'f3_collapse': 'ENOTSUP',
               'f3_collapse_keep': 'ENOTSUP',
               'f3_zero': 'ENOTSUP',
               'f3_zero_keep': 'ENOTSUP',
               'f3_zero_punch': 'ENOTSUP',
               'f3_insert': 'ENOTSUP',
               'f3_insert_keep': 'ENOTSUP',
               'f3_unshare_keep': 'ENOTSUP',
               'f3_write_zeroes': 'ENOTSUP',
               'f3_write_zeroes_keep': 'ENOTSUP',
               'f3_unknown_0x100': 'ENOTSUP',
               'f3_keep_unaligned_off': 'EINVAL',
               'f3_keep_unaligned_len': 'EINVAL',
               'f3_punch_unaligned_off': 'EINVAL',
               'f3_punch_unaligned_len': 'EINVAL',
               'f3_mode0_unaligned': 'ENOTSUP',
               'f3_keep_len0': 'EINVAL',
               'f3_punch_len0': 'EINVAL',
               'f3_keep_neg_off': 'EINVAL',
               'f3_mode0_neg_off': 'EINVAL',
               'f3_keep_neg_len': 'EINVAL',
               'f3_keep_huge': 'EINVAL',
               'f3_keep_overflow': 'EFBIG',
               'f3_punch_overflow': 'EFBIG',
               'f3_mode0_overflow': 'EFBIG',
               'f3_punch_no_keep_overflow': 'ENOTSUP',
               'f3_no_hide_stale_overflow': 'ENOTSUP',
               'f3_write_zeroes_overflow': 'EFBIG'},
 'mmap': {'none_r_shared': 'ENODEV',
          'none_r_private': 'ENODEV',
          'none_r_validate': 'ENODEV',
          'none_rw_shared': 'ENODEV',
          'none_rw_private': 'ENODEV',
          'none_rw_validate': 'ENODEV',
          'none_rwx_shared': 'EPERM',
          'none_rwx_private': 'EPERM',
          'none_rwx_validate': 'EPERM',
          'none_none_shared': 'ENODEV',
          'none_none_private': 'ENODEV',
          'none_none_validate': 'ENODEV',
          'mmap_r_shared': 'ok',
          'mmap_r_private': 'EINVAL',
          'mmap_r_validate': 'ok',
          'mmap_rw_shared': 'ok',
          'mmap_rw_private': 'EINVAL',
          'mmap_rw_validate': 'ok',
          'mmap_rwx_shared': 'EPERM',
          'mmap_rwx_private': 'EPERM',
          'mmap_rwx_validate': 'EPERM',
          'mmap_none_shared': 'ok',
          'mmap_none_private': 'EINVAL',
          'mmap_none_validate': 'ok',
          'init_shared_r_shared': 'ENODEV',
          'init_shared_r_private': 'ENODEV',
          'init_shared_r_validate': 'ENODEV',
          'init_shared_rw_shared': 'ENODEV',
          'init_shared_rw_private': 'ENODEV',
          'init_shared_rw_validate': 'ENODEV',
          'init_shared_rwx_shared': 'EPERM',
          'init_shared_rwx_private': 'EPERM',
          'init_shared_rwx_validate': 'EPERM',
          'init_shared_none_shared': 'ENODEV',
          'init_shared_none_private': 'ENODEV',
          'init_shared_none_validate': 'ENODEV',
          'both_r_shared': 'ok',
          'both_r_private': 'EINVAL',
          'both_r_validate': 'ok',
          'both_rw_shared': 'ok',
          'both_rw_private': 'EINVAL',
          'both_rw_validate': 'ok',
          'both_rwx_shared': 'EPERM',
          'both_rwx_private': 'EPERM',
          'both_rwx_validate': 'EPERM',
          'both_none_shared': 'ok',
          'both_none_private': 'EINVAL',
          'both_none_validate': 'ok',
          'beyond_eof_offset': 'ok',
          'longer_than_file': 'ok',
          'unaligned_offset': 'EINVAL',
          'len0': 'EINVAL',
          'shared_read': 'ok',
          'shared_write': 'ok',
          'shared_last_page': 'ok',
          'shared_beyond_eof': 'SIGBUS',
          'private_read': 'SIGBUS',
          'private_write': 'SIGBUS',
          'private_fallocate': 'ok',
          'private_read_after_fallocate': 'SIGBUS'},
 'shared_views': {'fresh_reads_zero': True,
                  'view_b_page0': b'AAAA',
                  'view_b_page1': b'BBBB',
                  'view_c_at_offset': b'FFFFFFFF',
                  'punch_page0': 'ok',
                  'after_punch_a0': b'\x00\x00\x00\x00',
                  'after_punch_b0': b'\x00\x00\x00\x00',
                  'after_punch_b1': b'BBBB',
                  'punch_offset_page5': 'ok',
                  'after_punch_c1': b'\x00\x00\x00\x00\x00\x00\x00\x00',
                  'punch_beyond_eof': 'ok',
                  'still_b1': b'BBBB',
                  'realloc': 'ok',
                  'realloc_reads_zero': b'\x00\x00\x00\x00',
                  'rewrite_visible': b'rewrite'},
 'region2': {'bind_ok': 0,
             'bind_overlap_file_range': 'EINVAL',
             'bind_second_range_ok': 0,
             'bind_unaligned_offset': 'EINVAL',
             'bind_beyond_file': 'EINVAL',
             'bind_offset_at_eof': 'EINVAL',
             'bind_other_vm_gmem': 'EINVAL',
             'bind_eventfd': 'EINVAL',
             'bind_fd_minus1': 'EBADF',
             'bind_readonly': 'EINVAL',
             'bind_log_dirty': 'EINVAL',
             'bind_via_v1': 'EINVAL',
             'bind_gpa_overlap': 'EEXIST',
             'no_flag_offset_ignored': 0,
             'reissue_identical': 'EINVAL',
             'toggle_log_dirty': 'EINVAL',
             'move': 'EINVAL',
             'drop_gmem_flag': 'EINVAL',
             'delete': 0,
             'recreate_after_delete': 0,
             'rebind_range_of_deleted_slot': 'EINVAL',
             'delete_again': 0,
             'rebind_freed_range': 0,
             'bind_closed_fd': 'EBADF'}}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A stand-in vCPU for the fake side (until the lead wires the checks into the real vCPU)
# ---------------------------------------------------------------------------------------------
class ModelVcpu:
    """Caches translations per gfn like a TLB and asks the checks only on a miss.

    Registered in the fake VM's vCPU table, it receives ``invalidate`` exactly
    like the real vCPU, so tests can see which kernel actions drop translations
    (PUNCH_HOLE, attribute changes, turning KVM_MEM_USERFAULT on) and that a
    mapped page is not re-checked until then. Test helper: one dict entry per
    cached page is fine here, never in the fake itself.
    """

    def __init__(self, k: Kernel, vmfd: int, vcpu_id: int = 1000) -> None:
        from fakekvm.fake.kvm import private, userfault

        self.vm = k.file(vmfd)  # type: ignore[attr-defined]
        self.info = private.vm_type_info(self.vm.profile, self.vm.vm_type)
        self.check = userfault.access_check_for(self.vm)
        self.tlb: dict[tuple[int, bool], int] = {}  # (gfn, private) -> host page
        self.invalidations: list[tuple[int, int]] = []
        self.vm.vcpus[vcpu_id] = self

    # -- what the VM calls -------------------------------------------------------------------
    def invalidate(self, gpa_start: int, gpa_end: int) -> None:
        self.invalidations.append((gpa_start, gpa_end))
        lo, hi = gpa_start >> 12, (gpa_end + PAGE - 1) >> 12
        for key in [key for key in self.tlb if lo <= key[0] < hi]:
            del self.tlb[key]

    def memslots_changed(self) -> None:
        self.tlb.clear()

    def kick(self) -> None:
        pass

    # -- what the guest does ---------------------------------------------------------------------
    def access(self, gpa_from_guest: int) -> Any:
        """Returns the host address used, or the `MemoryFault` KVM_RUN would report."""
        from fakekvm.fake.kvm import private

        gpa, priv = private.classify(self.info, gpa_from_guest, self.vm.attributes)
        hit = self.tlb.get((gpa >> 12, priv))
        if hit is not None:
            return hit
        a = private.resolve(
            self.info, self.vm.attributes, lambda gfn: self.vm.spaces[0].lookup(gfn),
            gpa_from_guest, userfault=self.check,
        )
        if a.fault is not None:
            return a.fault
        if a.slot is None:
            return "MMIO"
        self.tlb[(a.gpa >> 12, a.private)] = a.hva
        return a.hva

    def read(self, gpa_from_guest: int, n: int = 8) -> Any:
        r = self.access(gpa_from_guest)
        if not isinstance(r, int):
            return r
        return ctypes.string_at(r + (gpa_from_guest & (PAGE - 1)), n)
