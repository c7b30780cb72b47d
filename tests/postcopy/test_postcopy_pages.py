"""Bitmaps and the destination's page tracker, checked against a plain set model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy.pages import Bitmap, PageTracker

N = 300

ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "clear"]),
        st.integers(min_value=0, max_value=N - 1),
        st.integers(min_value=0, max_value=N),
    ),
    max_size=30,
)


def _runs(
    model: set[int], lo: int, hi: int, clear: bool, max_run: int | None
) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i = lo
    while i < hi:
        if (i in model) != clear:
            j = i
            while j < hi and (j in model) != clear and (not max_run or j - i < max_run):
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(min_value=0, max_value=N), st.integers(min_value=0, max_value=N))
def test_bitmap_matches_a_set(ops_: list[tuple[str, int, int]], a: int, b: int) -> None:
    bm = Bitmap(N)
    model: set[int] = set()
    for op, start, count in ops_:
        count = min(count, N - start)
        if op == "set":
            bm.set_range(start, count)
            model |= set(range(start, start + count))
        else:
            bm.clear_range(start, count)
            model -= set(range(start, start + count))
    lo, hi = min(a, b), max(a, b)
    assert bm.count() == len(model)
    assert bm.count(lo, hi - lo) == len([x for x in model if lo <= x < hi])
    assert bm.next_set(lo) == min([x for x in model if x >= lo], default=N)
    assert bm.next_clear(lo) == min([x for x in range(lo, N) if x not in model], default=N)
    assert [bm.test(i) for i in range(N)] == [i in model for i in range(N)]
    assert list(bm.runs(lo, hi)) == _runs(model, lo, hi, True, None)
    assert list(bm.runs(lo, hi, clear=False, max_run=7)) == _runs(model, lo, hi, False, 7)
    assert bm.all_set(lo, hi - lo) == all(x in model for x in range(lo, hi))


def test_bitmap_layout_is_the_kernels() -> None:
    bm = Bitmap(20)
    bm.set(0)
    bm.set(9)
    bm.set_range(16, 4)
    assert bytes(bm.buf) == bytes([0x01, 0x02, 0x0F])


def test_bitmap_bounds() -> None:
    bm = Bitmap(10)
    with pytest.raises(IndexError):
        bm.set_range(5, 6)
    with pytest.raises(IndexError):
        bm.test(10)
    assert bm.next_clear(10) == 10
    bm.set_range(0, 10)
    assert bm.next_clear(0) == 10  # padding bits of the last byte are not pages


def test_64_gib_guest_fits_in_bitmaps() -> None:
    nr = (64 << 30) // 4096  # 16 Mi pages
    t = PageTracker(nr)
    assert len(t.received.buf) == nr // 8 == 2 << 20
    t.mark_received(0, nr - 1)
    assert t.missing == 1
    assert t.next_missing(0) == nr - 1
    assert list(t.missing_runs()) == [(nr - 1, 1)]
    t.mark_received(nr - 1, 1)
    assert t.complete


def test_want_suppresses_duplicates() -> None:
    t = PageTracker(100)
    assert t.want(10) == [(10, 1)]
    assert t.want(10) == []  # in flight: no second request
    assert t.suppressed_requests == 1
    t.mark_received(12, 2)
    assert t.want(8, 10) == [(8, 2), (11, 1), (14, 4)]
    assert t.want(8, 10) == []
    assert t.mark_received(10, 1) == 1
    assert t.want(10) == []  # received: nothing to ask, not a suppression
    assert t.suppressed_requests == 1 + 1 + 8  # page 10 in flight once, then all 8 again
    assert t.mark_received(10, 5) == 2  # 11 and 14 new; 10, 12, 13 again
    assert t.duplicate_pages == 3
    assert t.nr_received == 5
    assert not t.inflight.test(11)
    with pytest.raises(IndexError):
        t.want(99, 2)


def test_page_digests() -> None:
    from postcopy.pages import first_difference, page_digests

    mem = bytearray(8 * 4096)
    a = page_digests(mem, 0, 8)
    assert len(a) == 64
    mem[5 * 4096] = 1
    b = page_digests(mem, 0, 8)
    assert first_difference(a, b) == 5
    assert first_difference(a, a) is None
    assert len(page_digests(mem, 1, 7, granule=3)) == 8 * 3
    assert page_digests(mem, 4, 4, granule=4) != page_digests(bytearray(8 * 4096), 4, 4, granule=4)
    with pytest.raises(IndexError):
        page_digests(mem, 7, 2)
