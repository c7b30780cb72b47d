"""The workloads as images, and Python mirrors of what each one computes.

Every guest program (``src/*.S``) has here a constructor that builds its
:class:`~fakekvm.guests.image.GuestImage` with the parameters in registers,
and the Python model of its result, so a test can check a guest's answer and
the guest memory it leaves behind:

* ``hello``    -- :data:`HELLO_MESSAGE` on port 0x3f8, then ``hlt``;
* ``toucher``  -- :func:`touch_order` (which pages, in which order),
  :func:`touch_value` (what a write stores), :func:`expected_touch_report`;
* ``writer``   -- :func:`pattern_bytes` (the exact bytes it writes);
* ``verifier`` -- :func:`checksum` of any buffer and :func:`expected_checksum`
  of the writer's pattern;
* ``echo``     -- reports each value it reads from port 0xe4, plus one.

The pattern functions work a page at a time on Python integers (no per-word
Python loop), so generating or checking 64 MiB takes a fraction of a second.
"""

from __future__ import annotations

import enum
import functools
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from fakekvm.guests import layout
from fakekvm.guests.image import GuestImage, long_mode_image, real_mode_image
from fakekvm.guests.programs import program

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
A_LCG = 0x5851F42D4C957F2D
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
#: the verifier's modulus: the largest prime below 2**64
CHECKSUM_PRIME = (1 << 64) - 59

HELLO_MESSAGE = b"Hello from fakekvm\n"
PAGE = layout.PAGE


# -- hello / echo ------------------------------------------------------------------


def hello_image() -> GuestImage:
    """Real mode, at 0x7c00: prints :data:`HELLO_MESSAGE` on 0x3f8, then ``hlt``."""
    return real_mode_image("hello", program("hello"))


def echo_image(mem_size: int = layout.DATA_BASE) -> GuestImage:
    """Long mode: loops ``in`` 0xe4 -> ``out`` value+1 to 0xe0 until it reads 0."""
    return long_mode_image("echo", program("echo"), mem_size)


# -- toucher -------------------------------------------------------------------------


class Pattern(enum.IntEnum):
    SEQUENTIAL = 0
    STRIDED = 1
    RANDOM = 2
    HOTSET = 3


TOUCH_WRITE = 1  # flags bit 0


@dataclass(frozen=True)
class TouchParams:
    """The toucher's parameters (register in brackets; see ``src/toucher.S``)."""

    base: int  # rdi
    size: int  # rsi, bytes
    pattern: Pattern = Pattern.SEQUENTIAL  # rcx
    write: bool = False  # r8 bit 0
    seed: int = 0  # rdx
    stride: int = 1  # r9, pages
    touches: int = 0  # r10 (HOTSET; 0 = npages)
    hot_pages: int = 0  # r12 (HOTSET; 0 = max(1, npages // 16))
    hot_percent: int = 90  # r13 (HOTSET)

    def __post_init__(self) -> None:
        if self.base % PAGE or self.size % PAGE:
            raise ValueError("toucher base and size must be page aligned")

    @property
    def npages(self) -> int:
        return self.size // PAGE

    def regs(self) -> dict[str, int]:
        return {
            "rdi": self.base,
            "rsi": self.size,
            "rdx": self.seed & M64,
            "rcx": int(self.pattern),
            "r8": TOUCH_WRITE if self.write else 0,
            "r9": self.stride,
            "r10": self.touches,
            "r12": self.hot_pages,
            "r13": self.hot_percent,
        }


def toucher_image(
    mem_size: int, params: TouchParams, *, mapped_size: int | None = None
) -> GuestImage:
    return long_mode_image(
        "toucher", program("toucher"), mem_size, mapped_size=mapped_size, regs=params.regs()
    )


def touch_order(p: TouchParams) -> Iterator[int]:
    """The page indices the toucher touches, in order (mirrors ``src/toucher.S``)."""
    n = p.npages
    if n == 0:
        return
    if p.pattern == Pattern.SEQUENTIAL:
        yield from range(n)
    elif p.pattern == Pattern.STRIDED:
        stride = min(p.stride or 1, n)
        for start in range(stride):
            yield from range(start, n, stride)
    elif p.pattern == Pattern.RANDOM:
        k = 0 if n <= 1 else (n - 1).bit_length()
        mask = (1 << k) - 1
        shift = k // 2 + 1
        c = (2 * p.seed + 1) & M64
        x = p.seed & mask
        for _ in range(1 << k):
            x = (A_LCG * x + c) & mask
            i = x ^ (x >> shift)
            if i < n:
                yield i
    elif p.pattern == Pattern.HOTSET:
        touches = p.touches or n
        hot = p.hot_pages or max(1, n >> 4)
        hot = min(hot, n)
        x = (p.seed ^ GOLDEN) & M64 or 1
        for _ in range(touches):
            x ^= (x << 13) & M64
            x ^= x >> 7
            x ^= (x << 17) & M64
            modulus = hot if (x >> 32) % 100 < p.hot_percent else n
            yield (x & 0xFFFFFFFF) % modulus
    else:
        raise ValueError(f"unknown pattern {p.pattern}")


def touch_value(seed: int, index: int) -> int:
    """What a WRITE touch stores in the first qword of page ``index``."""
    return ((seed << 32) | index) & M64


def expected_touch_report(
    p: TouchParams, data: bytes | bytearray | memoryview | None = None
) -> tuple[int, int]:
    """(touch count, 64-bit sum) the toucher reports.

    For a READ run, ``data`` is the content of ``[base, base+size)`` the guest
    reads (e.g. a copy of the host mapping taken before the run).
    """
    count = 0
    total = 0
    if p.write:
        for i in touch_order(p):
            total += touch_value(p.seed, i)
            count += 1
    else:
        if data is None:
            raise ValueError("a READ run's sum needs the memory it reads")
        words = memoryview(data).cast("B").cast("Q")
        for i in touch_order(p):
            total += words[i * (PAGE // 8)]
            count += 1
    return count, total & M64


def touched_pages(p: TouchParams) -> bytearray:
    """A bitmap-like ``bytearray`` (one byte a page) of the pages the toucher touches."""
    seen = bytearray(p.npages)
    for i in touch_order(p):
        seen[i] = 1
    return seen


# -- writer / verifier -------------------------------------------------------------


def writer_image(
    mem_size: int, base: int, size: int, seed: int, *, mapped_size: int | None = None
) -> GuestImage:
    if base % PAGE or size % PAGE:
        raise ValueError("writer base and size must be page aligned")
    return long_mode_image(
        "writer",
        program("writer"),
        mem_size,
        mapped_size=mapped_size,
        regs={"rdi": base, "rsi": size, "rdx": seed & M64},
    )


def verifier_image(
    mem_size: int, base: int, size: int, *, mapped_size: int | None = None
) -> GuestImage:
    if size % 8:
        raise ValueError("verifier size must be a multiple of 8")
    return long_mode_image(
        "verifier",
        program("verifier"),
        mem_size,
        mapped_size=mapped_size,
        regs={"rdi": base, "rsi": size},
    )


def mix64(x: int) -> int:
    """The splitmix64 finaliser the writer applies to ``seed ^ page address``."""
    x &= M64
    x ^= x >> 30
    x = (x * MIX1) & M64
    x ^= x >> 27
    x = (x * MIX2) & M64
    return x ^ (x >> 31)


@functools.cache
def _page_constants() -> tuple[int, int]:
    """(the 512 words j*GOLDEN as one integer, the integer with 1 in every word)."""
    table = array("Q", [(j * GOLDEN) & M64 for j in range(PAGE // 8)])
    ones = array("Q", [1] * (PAGE // 8))
    return int.from_bytes(table.tobytes(), "little"), int.from_bytes(ones.tobytes(), "little")


def pattern_page(seed: int, page_addr: int) -> bytes:
    """The 4096 bytes the writer leaves at guest page ``page_addr``."""
    table, ones = _page_constants()
    key = mix64(seed ^ page_addr)
    return ((key * ones) ^ table).to_bytes(PAGE, "little")


def pattern_bytes(seed: int, base: int, size: int) -> bytes:
    """The bytes the writer leaves in ``[base, base+size)`` (page aligned)."""
    if base % PAGE or size % PAGE:
        raise ValueError("base and size must be page aligned")
    return b"".join(pattern_page(seed, a) for a in range(base, base + size, PAGE))


_CK_CHUNK = 1 << 14
_CK_SHIFT = pow(2, 8 * _CK_CHUNK, CHECKSUM_PRIME)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The verifier's checksum of ``data``: its little-endian value mod :data:`CHECKSUM_PRIME`.

    Equal to ``int.from_bytes(data, "little") % CHECKSUM_PRIME``, computed by
    Horner's rule over 16 KiB chunks from the top down (2.5x faster).
    """
    mv = memoryview(data).cast("B")
    h = 0
    top = (len(mv) - 1) // _CK_CHUNK * _CK_CHUNK if len(mv) else -1
    for start in range(top, -1, -_CK_CHUNK):
        # only the topmost chunk can be short, and h is still 0 then
        h = (
            h * _CK_SHIFT + int.from_bytes(mv[start : start + _CK_CHUNK], "little")
        ) % CHECKSUM_PRIME
    return h


def expected_checksum(seed: int, base: int, size: int) -> int:
    """What the verifier reports over ``[base, base+size)`` after the writer ran with ``seed``."""
    return checksum(pattern_bytes(seed, base, size))


def first_difference(
    a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview, unit: int = PAGE
) -> int | None:
    """Index of the first ``unit``-sized block where ``a`` and ``b`` differ, or None."""
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if ma == mb:
        return None
    n = max(len(ma), len(mb))
    for off in range(0, n, unit):
        if ma[off : off + unit] != mb[off : off + unit]:
            return off // unit
    return None  # pragma: no cover - unreachable: the views differ
