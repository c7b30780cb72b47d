"""The userfaultfd ioctls of the fake: argument checks, errno and output-field rules.

Follows ``fs/userfaultfd.c`` (``userfaultfd_api``, ``_register``, ``_unregister``, ``_wake``,
``_copy``, ``_zeropage``, ``_writeprotect``, ``_continue``, ``_poison``, ``_move``) and
``mm/userfaultfd.c`` (``mfill_atomic``, ``move_pages``, ``mwriteprotect_range``) of Linux 6.18,
with the order of checks measured on the live host (``fakekvm/testing/uffd_scenarios.py``):

1. an unread non-cooperative event (``mmap_changing``) → EAGAIN, output field = -EAGAIN,
   before anything else is looked at;
2. struct checks (alignment, len 0, unknown mode bits) → EINVAL, output field untouched;
3. owner process gone → ESRCH, output field untouched (MOVE: EINVAL, cross-mm);
4. the mfill walk: dst not in one registered VMA → ENOENT; MODE_WP without WP registration,
   CONTINUE on non-shmem, hugetlb misalignment → EINVAL; per page EEXIST/EFAULT/ENOENT; the
   output field gets bytes done, or -errno when nothing was done; partial progress → EAGAIN;
5. the pages done are woken unless DONTWAKE (never after an error with nothing done).

The page-table work itself is E1's :mod:`fakekvm.fake.mm.fill`.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fakekvm.abi import mman
from fakekvm.fake.mm import VM_UFFD_WP, VmaKind, fill
from fakekvm.fake.mm.fill import MFillError
from fakekvm.fake.mm.hostmem import safe_copy_from, safe_copy_to
from fakekvm.fake.uffd import _uapi as U
from fakekvm.fake.uffd.state import UffdState, register_ioctls

if TYPE_CHECKING:
    from fakekvm.fake.uffd.file import UserfaultfdFile

PAGE_SHIFT = mman.PAGE_SHIFT
PAGE_SIZE = mman.PAGE_SIZE
_s64 = struct.Struct("<q")
_u64 = struct.Struct("<Q")
_validate = UffdState.validate_range
_memmove = ctypes.memmove

Handler = Callable[[Any], int]
_PAGE_OFF = PAGE_SIZE - 1
_TASK_LAST = (1 << 47) - 2 * PAGE_SIZE  # validate_range: dst + len <= TASK_SIZE
_U64_END = 1 << 64
_ANON = VmaKind.ANON
_PROT_READ = mman.PROT_READ
_PROT_WRITE = mman.PROT_WRITE


class _Arg:
    """The ioctl argument as a buffer: in place for buffers, through safe copies for a pointer."""

    __slots__ = ("addr", "buf")

    def __init__(self, arg: Any, size: int) -> None:
        self.buf: Any
        if type(arg) is bytearray:  # the common case, first
            self.addr = 0
            self.buf = arg
            if len(arg) < size:
                raise OSError(errno.EFAULT, f"ioctl argument shorter than {size} bytes")
            return
        if isinstance(arg, int):
            self.addr = arg
            self.buf = bytearray(safe_copy_from(arg, size))
        else:
            self.addr = 0
            self.buf = arg
            if memoryview(arg).nbytes < size:
                raise OSError(errno.EFAULT, f"ioctl argument shorter than {size} bytes")

    def put(self, fmt: struct.Struct, off: int, value: int) -> None:
        fmt.pack_into(self.buf, off, value)
        if self.addr:
            safe_copy_to(self.addr + off, bytes(self.buf[off : off + fmt.size]))

    def put_all(self, data: bytes) -> None:
        self.buf[: len(data)] = data
        if self.addr:
            safe_copy_to(self.addr, data)


def table(f: UserfaultfdFile) -> dict[int, Handler]:
    st = f.state
    mm = f.mm

    known = ~0
    if not st.available & U.UFFD_FEATURE_POISON:
        known &= ~(1 << U._UFFDIO_POISON)
    if not st.available & U.UFFD_FEATURE_MOVE:
        known &= ~(1 << U._UFFDIO_MOVE)

    def eagain(a: _Arg, off: int | None, what: str) -> OSError:
        if off is not None:
            a.put(_s64, off, -errno.EAGAIN)
        return OSError(errno.EAGAIN, f"{what}: a non-cooperative event is unread")

    def finish(a: _Arg, off: int, what: str, start: int, length: int, done: int, err: OSError | None,
               dontwake: bool, installed_wp: bool | None = None) -> int:
        """Write the output field, wake what was done, EAGAIN on partial progress.

        ``installed_wp`` False: the pages were installed without MODE_WP, so a uffd-wp marker
        left on them (shmem, WP_UNPOPULATED) is gone, as with a fresh PTE in the kernel.
        """
        if done == 0 and err is not None:
            a.put(_s64, off, -(err.errno or errno.EFAULT))
            raise err
        if installed_wp is False and mm.wp._chunks:
            with mm.pt_lock:
                mm.wp.clear_range(start >> PAGE_SHIFT, (start + done) >> PAGE_SHIFT)
        a.put(_s64, off, done)
        if not dontwake:
            f.wake_range(start, done)
        if done != length:
            raise OSError(errno.EAGAIN, f"{what}: {done:#x} of {length:#x} bytes done")
        return 0

    def dst_vma(start: int, length: int, what: str) -> Any:
        """The registered VMA holding all of [start, start+len) (ENOENT otherwise)."""
        v = mm.find_vma(start)
        if v is None or start + length > v.end or v.uffd_ctx is None:
            raise OSError(errno.ENOENT, f"{what}: {start:#x}+{length:#x} not in one registered VMA")
        return v

    def huge_align(v: Any, start: int, length: int, what: str) -> None:
        ps = v.page_size
        if start & (ps - 1) or length & (ps - 1):
            raise OSError(errno.EINVAL, f"{what}: range not aligned to the {ps:#x} huge page")

    def eexist_race(v: Any, start: int, length: int, src: int | None = None) -> None:
        """Injection: the page a thread sleeps on appears "by someone else", with no wake.

        The someone else is a concurrent fill of the same data (another handler thread's
        ``UFFDIO_COPY`` with ``DONTWAKE`` of ``src``, or a ``CONTINUE``/``ZEROPAGE``), so the
        caller's ioctl then fails ``EEXIST`` and only an explicit wake lets the waiter go."""
        if not st.inject.eexist_race:
            return
        end = start + min(length, v.page_size)
        with f.lock:
            hit = st.waiters_in(start, end)
        if hit:
            st.inject.eexist_race -= 1
            try:
                if v.kind == VmaKind.SHMEM and v.uffd_flags & U.UFFDIO_REGISTER_MODE_MINOR:
                    fill.cont(mm, start, v.page_size)
                elif src is not None:
                    _copy_pages(mm, v, start, src, v.page_size, False)
                else:
                    fill.zeropage(mm, start, v.page_size)
            except OSError:
                pass

    # -- UFFDIO_API --------------------------------------------------------------------------------
    def api(arg: Any) -> int:
        a = _Arg(arg, 24)
        api_, features, _ = U.uffdio_api_fmt.unpack_from(a.buf)
        try:
            with f.lock:
                feats, ioctls = st.api(api_, features)
        except OSError:
            a.put_all(bytes(24))
            raise
        a.put_all(U.uffdio_api_fmt.pack(api_, feats, ioctls))
        return 0

    # -- UFFDIO_REGISTER / UNREGISTER ----------------------------------------------------------------
    def register(arg: Any) -> int:
        a = _Arg(arg, 32)
        start, length, mode, _ = U.uffdio_register_fmt.unpack_from(a.buf)
        if not mode or mode & ~U.UFFD_API_REGISTER_MODES:
            raise OSError(errno.EINVAL, f"UFFDIO_REGISTER: bad mode {mode:#x}")
        _validate(start, length, "UFFDIO_REGISTER")
        end = start + length
        vmas = mm.vmas(start, end)
        if not vmas:
            raise OSError(errno.EINVAL, "UFFDIO_REGISTER: no mapping in the range")
        first = vmas[0]
        if first.hugetlb and start & (first.page_size - 1):
            raise OSError(errno.EINVAL, "UFFDIO_REGISTER: start not huge-page aligned")
        basic = False
        for v in vmas:
            if not _can_userfault(v, mode):
                raise OSError(errno.EINVAL, f"UFFDIO_REGISTER: cannot register {v!r}")
            if v.hugetlb:
                basic = True
                if v.start < end <= v.end and end & (v.page_size - 1):
                    raise OSError(errno.EINVAL, "UFFDIO_REGISTER: end not huge-page aligned")
            if v.uffd_ctx is not None and v.uffd_ctx is not f:
                raise OSError(errno.EBUSY, "UFFDIO_REGISTER: range registered with another userfaultfd")
        mm.register_range(start, end, f, mode)
        a.put(_u64, 24, register_ioctls(mode, basic) & known)
        return 0

    def unregister(arg: Any) -> int:
        a = _Arg(arg, 16)
        start, length = U.uffdio_range_fmt.unpack_from(a.buf)
        _validate(start, length, "UFFDIO_UNREGISTER")
        end = start + length
        vmas = mm.vmas(start, end)
        if not vmas:
            raise OSError(errno.EINVAL, "UFFDIO_UNREGISTER: no mapping in the range")
        first = vmas[0]
        if first.hugetlb and start & (first.page_size - 1):
            raise OSError(errno.EINVAL, "UFFDIO_UNREGISTER: start not huge-page aligned")
        for v in vmas:
            if not _can_userfault(v, v.uffd_flags):
                raise OSError(errno.EINVAL, f"UFFDIO_UNREGISTER: {v!r} cannot be registered")
            if v.uffd_ctx is not None and v.uffd_ctx is not f:
                raise OSError(errno.EINVAL, "UFFDIO_UNREGISTER: range belongs to another userfaultfd")
        mm.unregister_range(start, end)
        f.wake_range(start, length)
        return 0

    # -- UFFDIO_WAKE ------------------------------------------------------------------------------------
    def wake(arg: Any) -> int:
        a = _Arg(arg, 16)
        start, length = U.uffdio_range_fmt.unpack_from(a.buf)
        _validate(start, length, "UFFDIO_WAKE")
        f.wake_range(start, length)
        return 0

    # -- UFFDIO_COPY / ZEROPAGE / CONTINUE / POISON --------------------------------------------------------
    inject = st.inject
    present = mm.present
    wp_bits = mm.wp
    pt_lock = mm.pt_lock
    find_vma = mm.find_vma
    copy_unpack = U.uffdio_copy_fmt.unpack_from
    pack_s64 = _s64.pack_into
    wake_range = f.wake_range

    def copy(arg: Any) -> int:
        # Fast path (the post-copy hot path): one 4 KiB page, mode 0, into an empty page of an
        # anonymous writable VMA registered with this context, from the fake's own readable
        # anonymous memory; no event unread, no injection. Anything else: the full path below,
        # which gives the same result for these arguments.
        if type(arg) is bytearray and len(arg) >= 40 and not st.mmap_changing and not inject.eagain \
                and not inject.eexist_race and not inject.owner_dead:
            dst, src, length, mode, _ = copy_unpack(arg)
            if length == PAGE_SIZE and not mode and not dst & _PAGE_OFF and dst < _TASK_LAST \
                    and src + PAGE_SIZE <= _U64_END:
                vpn = dst >> PAGE_SHIFT
                with pt_lock:
                    v = find_vma(dst)
                    if v is not None and v.uffd_ctx is f and v.kind is _ANON and v.page_shift == PAGE_SHIFT \
                            and v.prot & _PROT_WRITE and dst + PAGE_SIZE <= v.end \
                            and not present.test(vpn) and not (mm.poison._chunks and mm.poison.test(vpn)):
                        sv = find_vma(src)
                        if sv is not None and sv.kind is _ANON and sv.prot & _PROT_READ and src + PAGE_SIZE <= sv.end:
                            _memmove(dst, src, PAGE_SIZE)
                            present.set(vpn)
                            if wp_bits._chunks:  # a fresh PTE carries no uffd-wp marker
                                wp_bits.clear(vpn)
                            fast = True
                        else:
                            fast = False
                    else:
                        fast = False
                if fast:
                    pack_s64(arg, 32, PAGE_SIZE)
                    wake_range(dst, PAGE_SIZE)
                    return 0
        a = _Arg(arg, 40)
        if st.changing():
            raise eagain(a, 32, "UFFDIO_COPY")
        dst, src, length, mode, _ = U.uffdio_copy_fmt.unpack_from(a.buf)
        if length & (PAGE_SIZE - 1) or not length or src + length > 1 << 64:
            raise OSError(errno.EINVAL, "UFFDIO_COPY: bad src range")
        _validate(dst, length, "UFFDIO_COPY")
        if mode & ~(U.UFFDIO_COPY_MODE_DONTWAKE | U.UFFDIO_COPY_MODE_WP):
            raise OSError(errno.EINVAL, f"UFFDIO_COPY: bad mode {mode:#x}")
        if st.inject.owner_dead:
            raise OSError(errno.ESRCH, "UFFDIO_COPY: the owning process is gone")
        done, err = 0, None  # type: int, OSError | None
        try:
            v = dst_vma(dst, length, "UFFDIO_COPY")
            want_wp = bool(mode & U.UFFDIO_COPY_MODE_WP)
            if want_wp and not v.uffd_flags & VM_UFFD_WP:
                raise OSError(errno.EINVAL, "UFFDIO_COPY: MODE_WP on a range not registered for WP")
            _fillable(v, "UFFDIO_COPY")
            if v.hugetlb:
                huge_align(v, dst, length, "UFFDIO_COPY")
            eexist_race(v, dst, length, src)
            done = _copy_pages(mm, v, dst, src, length, want_wp)
        except MFillError as e:
            done, err = e.done, e
        except OSError as e:
            err = e
        return finish(a, 32, "UFFDIO_COPY", dst, length, done, err, bool(mode & U.UFFDIO_COPY_MODE_DONTWAKE),
                      bool(mode & U.UFFDIO_COPY_MODE_WP))

    def zeropage(arg: Any) -> int:
        a = _Arg(arg, 32)
        if st.changing():
            raise eagain(a, 24, "UFFDIO_ZEROPAGE")
        start, length, mode, _ = U.uffdio_zeropage_fmt.unpack_from(a.buf)
        _validate(start, length, "UFFDIO_ZEROPAGE")
        if mode & ~U.UFFDIO_ZEROPAGE_MODE_DONTWAKE:
            raise OSError(errno.EINVAL, f"UFFDIO_ZEROPAGE: bad mode {mode:#x}")
        if st.inject.owner_dead:
            raise OSError(errno.ESRCH, "UFFDIO_ZEROPAGE: the owning process is gone")
        done, err = 0, None  # type: int, OSError | None
        try:
            v = dst_vma(start, length, "UFFDIO_ZEROPAGE")
            _fillable(v, "UFFDIO_ZEROPAGE")
            if v.hugetlb:
                raise OSError(errno.EINVAL, "UFFDIO_ZEROPAGE: not supported on hugetlb")
            eexist_race(v, start, length)
            done = fill.zeropage(mm, start, length)
        except MFillError as e:
            done, err = e.done, e
        except OSError as e:
            err = e
        return finish(a, 24, "UFFDIO_ZEROPAGE", start, length, done, err, bool(mode & 1), False)

    def cont(arg: Any) -> int:
        a = _Arg(arg, 32)
        if st.changing():
            raise eagain(a, 24, "UFFDIO_CONTINUE")
        start, length, mode, _ = U.uffdio_continue_fmt.unpack_from(a.buf)
        _validate(start, length, "UFFDIO_CONTINUE")
        if mode & ~(U.UFFDIO_CONTINUE_MODE_DONTWAKE | U.UFFDIO_CONTINUE_MODE_WP):
            raise OSError(errno.EINVAL, f"UFFDIO_CONTINUE: bad mode {mode:#x}")
        if st.inject.owner_dead:
            raise OSError(errno.ESRCH, "UFFDIO_CONTINUE: the owning process is gone")
        done, err = 0, None  # type: int, OSError | None
        try:
            v = dst_vma(start, length, "UFFDIO_CONTINUE")
            want_wp = bool(mode & U.UFFDIO_CONTINUE_MODE_WP)
            if want_wp and not v.uffd_flags & VM_UFFD_WP:
                raise OSError(errno.EINVAL, "UFFDIO_CONTINUE: MODE_WP on a range not registered for WP")
            if v.hugetlb:
                huge_align(v, start, length, "UFFDIO_CONTINUE")
            if v.kind != VmaKind.SHMEM:
                raise OSError(errno.EINVAL, "UFFDIO_CONTINUE: needs a shmem or hugetlbfs mapping")
            eexist_race(v, start, length)
            done = fill.cont(mm, start, length, wp=want_wp)
        except MFillError as e:
            done, err = e.done, e
        except OSError as e:
            err = e
        return finish(a, 24, "UFFDIO_CONTINUE", start, length, done, err, bool(mode & 1),
                      bool(mode & U.UFFDIO_CONTINUE_MODE_WP))

    def poison(arg: Any) -> int:
        a = _Arg(arg, 32)
        if st.changing():
            raise eagain(a, 24, "UFFDIO_POISON")
        start, length, mode, _ = U.uffdio_poison_fmt.unpack_from(a.buf)
        _validate(start, length, "UFFDIO_POISON")
        if mode & ~U.UFFDIO_POISON_MODE_DONTWAKE:
            raise OSError(errno.EINVAL, f"UFFDIO_POISON: bad mode {mode:#x}")
        if st.inject.owner_dead:
            raise OSError(errno.ESRCH, "UFFDIO_POISON: the owning process is gone")
        done, err = 0, None  # type: int, OSError | None
        try:
            v = dst_vma(start, length, "UFFDIO_POISON")
            _fillable(v, "UFFDIO_POISON")
            if v.hugetlb:
                huge_align(v, start, length, "UFFDIO_POISON")
            done = fill.poison(mm, start, length)
        except MFillError as e:
            done, err = e.done, e
        except OSError as e:
            err = e
        return finish(a, 24, "UFFDIO_POISON", start, length, done, err, bool(mode & 1))

    # -- UFFDIO_MOVE ----------------------------------------------------------------------------------------
    def move(arg: Any) -> int:
        a = _Arg(arg, 40)
        if st.inject.owner_dead:
            raise OSError(errno.EINVAL, "UFFDIO_MOVE: cross-mm moves are not allowed")
        if st.changing():
            raise eagain(a, 32, "UFFDIO_MOVE")
        dst, src, length, mode, _ = U.uffdio_move_fmt.unpack_from(a.buf)
        if mode & ~(U.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | U.UFFDIO_MOVE_MODE_DONTWAKE):
            raise OSError(errno.EINVAL, f"UFFDIO_MOVE: bad mode {mode:#x}")
        _validate(dst, length, "UFFDIO_MOVE")
        _validate(src, length, "UFFDIO_MOVE")
        done, err = 0, None  # type: int, OSError | None
        try:
            dv = mm.find_vma(dst)
            sv = mm.find_vma(src)
            if dv is None or sv is None:
                raise OSError(errno.ENOENT, "UFFDIO_MOVE: no VMA at src or dst")
            if src + length > sv.end or dst + length > dv.end or sv.shared or dv.shared:
                raise OSError(errno.EINVAL, "UFFDIO_MOVE: range not inside one private VMA")
            if not sv.prot & mman.PROT_WRITE or sv.prot != dv.prot:
                raise OSError(errno.EINVAL, "UFFDIO_MOVE: VMAs differ in protection or are read-only")
            if dv.uffd_ctx is not f:
                raise OSError(errno.EINVAL, "UFFDIO_MOVE: dst not registered with this userfaultfd")
            if sv.kind != VmaKind.ANON or dv.kind != VmaKind.ANON or sv.hugetlb or dv.hugetlb:
                raise OSError(errno.EINVAL, "UFFDIO_MOVE: needs anonymous memory")
            holes = bool(mode & U.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES)
            done = fill.move(mm, dst, src, length, allow_src_holes=holes)
        except MFillError as e:
            done, err = e.done, e
        except OSError as e:
            err = e
        return finish(a, 32, "UFFDIO_MOVE", dst, length, done, err, bool(mode & U.UFFDIO_MOVE_MODE_DONTWAKE))

    # -- UFFDIO_WRITEPROTECT -------------------------------------------------------------------------------
    def writeprotect(arg: Any) -> int:
        a = _Arg(arg, 24)
        if st.changing():
            raise eagain(a, None, "UFFDIO_WRITEPROTECT")
        start, length, mode = U.uffdio_writeprotect_fmt.unpack_from(a.buf)
        _validate(start, length, "UFFDIO_WRITEPROTECT")
        if mode & ~(U.UFFDIO_WRITEPROTECT_MODE_WP | U.UFFDIO_WRITEPROTECT_MODE_DONTWAKE):
            raise OSError(errno.EINVAL, f"UFFDIO_WRITEPROTECT: bad mode {mode:#x}")
        protect = bool(mode & U.UFFDIO_WRITEPROTECT_MODE_WP)
        dontwake = bool(mode & U.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
        if protect and dontwake:
            raise OSError(errno.EINVAL, "UFFDIO_WRITEPROTECT: MODE_WP with MODE_DONTWAKE")
        if st.inject.owner_dead:
            raise OSError(errno.ESRCH, "UFFDIO_WRITEPROTECT: the owning process is gone")
        end = start + length
        vmas = mm.vmas(start, end)
        if not vmas or not mm.is_mapped(start, end):
            raise OSError(errno.ENOENT, "UFFDIO_WRITEPROTECT: range not mapped")
        for v in vmas:
            if not v.uffd_flags & VM_UFFD_WP:
                raise OSError(errno.ENOENT, "UFFDIO_WRITEPROTECT: range not registered for WP")
            if v.hugetlb:
                huge_align(v, max(start, v.start), min(end, v.end) - max(start, v.start), "UFFDIO_WRITEPROTECT")
        for v in vmas:
            s, e = max(start, v.start), min(end, v.end)
            anon = v.kind == VmaKind.ANON
            unpopulated = bool(st.features & U.UFFD_FEATURE_WP_UNPOPULATED)
            if protect and anon and unpopulated:
                # the kernel leaves a uffd-wp marker in none PTEs; E1's fault path has no such
                # marker, so the fake installs the (already zero) pages, write-protected
                mm.set_present(s, e)
            fill.writeprotect(mm, s, e - s, protect, only_present=anon and not unpopulated)
        if not protect and not dontwake:
            f.wake_range(start, length)
        return 0

    ops: dict[int, Handler] = {
        U.UFFDIO_API: api,
        U.UFFDIO_REGISTER: register,
        U.UFFDIO_UNREGISTER: unregister,
        U.UFFDIO_WAKE: wake,
        U.UFFDIO_COPY: copy,
        U.UFFDIO_ZEROPAGE: zeropage,
        U.UFFDIO_CONTINUE: cont,
        U.UFFDIO_POISON: poison,
        U.UFFDIO_MOVE: move,
        U.UFFDIO_WRITEPROTECT: writeprotect,
    }
    # a profile without the feature has no such ioctl (UFFDIO_POISON is 6.6, UFFDIO_MOVE 6.8)
    if not st.available & U.UFFD_FEATURE_POISON:
        del ops[U.UFFDIO_POISON]
    if not st.available & U.UFFD_FEATURE_MOVE:
        del ops[U.UFFDIO_MOVE]
    return ops


def _can_userfault(v: Any, mode: int) -> bool:
    """``vma_can_userfault``: anonymous, shmem or hugetlb; MINOR only on shmem or hugetlb."""
    if v.kind not in (VmaKind.ANON, VmaKind.SHMEM):
        return False
    return not (mode & U.UFFDIO_REGISTER_MODE_MINOR and v.kind != VmaKind.SHMEM and not v.hugetlb)


def _fillable(v: Any, what: str) -> None:
    if v.kind not in (VmaKind.ANON, VmaKind.SHMEM):
        raise OSError(errno.EINVAL, f"{what}: not an anonymous or shmem mapping")


def _src_readable(mm: Any, src: int, length: int) -> bool:
    """Is [src, src+len) inside readable anonymous VMAs of the fake (so a plain memmove is safe)?"""
    pos, end = src, src + length
    while pos < end:
        v = mm.find_vma(pos)
        if v is None or v.kind != VmaKind.ANON or not v.prot & mman.PROT_READ:
            return False
        pos = v.end
    return True


def _copy_pages(mm: Any, v: Any, dst: int, src: int, length: int, wp: bool) -> int:
    """fill.copy, except that a poison marker counts as empty (``pte_none_mostly``).

    Fast path (the post-copy hot path): 4 KiB anonymous pages from a source inside the fake's
    own anonymous memory are copied with one memmove per run of empty pages, no bounce buffer
    (a read-only destination goes through ``fill.copy``, which lifts the host protection).
    """
    if v.kind == VmaKind.ANON and not v.hugetlb and v.prot & _PROT_WRITE and _src_readable(mm, src, length):
        present, poison = mm.present, mm.poison
        first = dst >> PAGE_SHIFT
        n = length >> PAGE_SHIFT
        with mm.pt_lock:
            if n == 1:
                hit = first if present.test(first) else -1
            else:
                hit = present.find_next_set(first, first + n)
            if poison._chunks:
                p = poison.find_next_set(first, first + n)
                if p >= 0 and (hit < 0 or p < hit):
                    hit = -2  # let the slow path sort the markers out
            if hit != -2:
                good = n if hit < 0 else hit - first
                if good == 1:
                    _memmove(dst, src, PAGE_SIZE)
                    present.set(first)
                elif good:
                    _memmove(dst, src, good << PAGE_SHIFT)
                    present.set_range(first, first + good)
                if wp and good:
                    mm.wp.set_range(first, first + good)
                if good == n:
                    return length
                raise MFillError(errno.EEXIST, f"{dst + (good << PAGE_SHIFT):#x} is already populated",
                                 good << PAGE_SHIFT)
    done = 0
    while True:
        try:
            return done + fill.copy(mm, dst + done, src + done, length - done, wp=wp)
        except MFillError as e:
            at = dst + done + e.done
            vpn = at >> PAGE_SHIFT
            span = v.page_size >> PAGE_SHIFT
            if e.errno != errno.EEXIST or v.kind != VmaKind.ANON or not mm.poison.any(vpn, vpn + span) \
                    or mm.present.any(vpn, vpn + span):
                raise MFillError(e.errno or errno.EFAULT, str(e), done + e.done) from None
            with mm.pt_lock:
                mm.poison.clear_range(vpn, vpn + span)
            done += e.done
