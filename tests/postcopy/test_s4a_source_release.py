"""`Source.close()` lets go of the caller's image: the caller can close its mmap afterwards.

Before the fix the source kept the memoryview it took of a caller's image until
the Source object itself was collected, so ``mmap.close()`` after ``Source.close()``
raised ``BufferError: cannot close exported pointers exist`` (and a bytearray
image could not be resized).
"""

from __future__ import annotations

import mmap
import os

import pytest

from fakekvm.fake.kernel import FakeKernel
from fakekvm.guests import layout
from postcopy.client import FetchClient
from postcopy.destination import Destination
from postcopy.mechanisms import make_mechanism
from postcopy.migrate import check_reports, prepare_source
from postcopy.source import Source

PS = 4096
T = 60.0  # a failure guard only: nothing waits this long when things work
REGS, SREGS = bytes(range(144)), bytes(range(200, 256)) * 5 + bytes(32)


def _mmap_image(nbytes: int) -> mmap.mmap:
    m = mmap.mmap(-1, nbytes)
    m[:] = os.urandom(nbytes)
    return m


def _migrate_with_client(src: Source, image: bytes) -> None:
    """A short migration with a FetchClient: demand pages, the bulk push, digests, DONE."""
    addr = src.listen()
    dst = bytearray(len(image))
    c = FetchClient.connect(addr, sink=dst)
    try:
        nr = len(image) // PS
        for page in (nr - 1, 3, nr // 2):
            c.fetch(page, timeout=T)
            assert dst[page * PS : (page + 1) * PS] == image[page * PS : (page + 1) * PS]
        c.wait_complete(T)
        assert c.verify(timeout=T) is None  # DIGEST requests: the source read the image again
        c.finish(T)
    finally:
        c.close()
    assert dst == image
    assert src.wait(T)
    assert src.result == "done"
    assert src.threads_alive == 0 and c.threads_alive == 0


def _close_image(m: mmap.mmap) -> None:
    m.close()  # BufferError while anything still exports the mapping
    assert m.closed


def test_s4a_mmap_image_closes_after_source_close() -> None:
    m = _mmap_image(1 << 20)
    image = bytes(m)
    src = Source(m, [(REGS, SREGS)], batch_pages=16)
    _migrate_with_client(src, image)
    src.close()
    _close_image(m)  # BufferError before the fix: the source still exported the mapping


def test_s4a_bytearray_image_resizes_after_source_close() -> None:
    ba = bytearray(os.urandom(256 * PS))
    image = bytes(ba)
    src = Source(ba, batch_pages=32)
    _migrate_with_client(src, image)
    src.close()
    ba.extend(b"x")  # a bytearray with exports refuses to resize
    del ba[:]
    assert len(ba) == 0


def test_s4a_mmap_closes_after_close_without_serving() -> None:
    m = _mmap_image(64 * PS)
    src = Source(m)
    src.close()
    assert src.result == "closed"
    _close_image(m)


def test_s4a_mmap_closes_after_kill_mid_migration() -> None:
    m = _mmap_image(256 * PS)
    src = Source(m, batch_pages=8)
    addr = src.listen()
    c = FetchClient.connect(addr, sink=bytearray(256 * PS), bulk=False)
    try:
        c.fetch(10, timeout=T)
        src.kill()
    finally:
        c.close()
    assert src.result == "killed" and src.threads_alive == 0
    _close_image(m)


def test_s4a_cast_view_of_mmap_released_after_close() -> None:
    """A view of another format (the source casts it to bytes) is released too."""
    m = _mmap_image(128 * PS)
    image = bytes(m)
    words = memoryview(m).cast("Q")
    src = Source(words, batch_pages=16)
    _migrate_with_client(src, image)
    src.close()
    words.release()
    _close_image(m)


def test_s4a_source_memory_unusable_after_close() -> None:
    """The released view is really gone (not just another reference dropped)."""
    m = _mmap_image(16 * PS)
    src = Source(m)
    src.close()
    with pytest.raises(ValueError, match="released"):
        src.memory[0]
    _close_image(m)


def test_s4a_fake_kernel_migration_from_mmap_image() -> None:
    """A whole post-copy migration on the fake kernel, served from a copy of the paused
    guest's memory in an ``mmap.mmap``; afterwards the caller closes that mmap."""
    mem_size = 4 << 20
    src_k, dst_k = FakeKernel("6.18-pvm"), FakeKernel("6.18-pvm")
    g = prepare_source(src_k, mem_size, 1, "verify", 5)
    try:
        m = mmap.mmap(-1, mem_size)
        guest = g.vm.mem()
        m[:] = guest
        guest.release()
        src = Source(m, g.states, batch_pages=64)
        addr = src.listen()
        dest = Destination(dst_k, make_mechanism("uffd-missing"), address=addr)
        try:
            result = dest.run()
        finally:
            src.close()
        check_reports(result, g.expect, "verify")
        assert src.result == "done" and src.threads_alive == 0
        assert src.stats.pages_demand + src.stats.pages_background >= mem_size // layout.PAGE
        _close_image(m)
    finally:
        g.vm.close()
        dst_k.shutdown()
        src_k.shutdown()


def test_s4a_refused_image_is_not_held() -> None:
    """A constructor that refuses the image (not whole pages) keeps no view of it."""
    m = mmap.mmap(-1, PS + 512)
    with pytest.raises(ValueError, match="not whole 4096 B pages") as ei:
        Source(m)
    assert ei.tb is not None  # the traceback (its frames' locals) is still alive here
    _close_image(m)
