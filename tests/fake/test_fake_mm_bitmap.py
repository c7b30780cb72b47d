"""Bitmap: range ops, searches, moves — unit tests and a property test against a set."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fakekvm.fake.mm.bitmap import CHUNK_BITS, Bitmap


def test_single_bits() -> None:
    b = Bitmap()
    assert not b.test(5)
    b.set(5)
    assert b.test(5) and not b.test(4) and not b.test(6)
    b.clear(5)
    assert not b.test(5)


def test_range_set_clear_across_chunks() -> None:
    b = Bitmap()
    b.set_range(CHUNK_BITS - 3, CHUNK_BITS + 10)
    assert b.count(0, 3 * CHUNK_BITS) == 13
    assert b.find_next_set(0, 10 * CHUNK_BITS) == CHUNK_BITS - 3
    assert b.find_next_clear(CHUNK_BITS - 3, 10 * CHUNK_BITS) == CHUNK_BITS + 10
    b.clear_range(CHUNK_BITS, CHUNK_BITS + 10)
    assert list(b.runs(0, 3 * CHUNK_BITS)) == [(CHUNK_BITS - 3, CHUNK_BITS)]


def test_clear_frees_chunks() -> None:
    b = Bitmap()
    b.set_range(10, 20)
    assert b.nbytes() > CHUNK_BITS // 8
    b.clear_range(0, CHUNK_BITS)
    assert not b
    assert b.nbytes() < 1024


def test_sparse_search_is_fast_over_huge_ranges() -> None:
    b = Bitmap()
    far = 1 << 34  # page number of a 64 TiB address
    b.set(far)
    assert b.find_next_set(0, 1 << 35) == far
    assert b.find_next_set(far + 1, 1 << 35) == -1


def test_move_and_get_put_bits() -> None:
    b = Bitmap()
    b.set_range(3, 9)
    b.set(100)
    b.move(0, CHUNK_BITS * 2 + 5, 128)
    assert b.count(0, CHUNK_BITS) == 0
    assert list(b.runs(0, 4 * CHUNK_BITS)) == [
        (CHUNK_BITS * 2 + 8, CHUNK_BITS * 2 + 14),
        (CHUNK_BITS * 2 + 105, CHUNK_BITS * 2 + 106),
    ]


def test_large_range_metadata_is_small() -> None:
    b = Bitmap()
    pages_1g = (1 << 30) >> 12
    b.set_range(0, pages_1g)
    assert b.count(0, pages_1g) == pages_1g
    assert b.all(0, pages_1g)
    assert b.nbytes() < 64 * 1024  # 32 KiB of bits for 1 GiB of 4 KiB pages


ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "clear", "set_range", "clear_range", "move"]),
        st.integers(0, 3 * CHUNK_BITS),
        st.integers(0, 600),
        st.integers(0, 3 * CHUNK_BITS),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(0, 3 * CHUNK_BITS), st.integers(0, 3 * CHUNK_BITS))
def test_against_reference_set(
    program: list[tuple[str, int, int, int]], q1: int, q2: int
) -> None:
    b = Bitmap()
    ref: set[int] = set()
    for op, a, n, dst in program:
        if op == "set":
            b.set(a)
            ref.add(a)
        elif op == "clear":
            b.clear(a)
            ref.discard(a)
        elif op == "set_range":
            b.set_range(a, a + n)
            ref |= set(range(a, a + n))
        elif op == "clear_range":
            b.clear_range(a, a + n)
            ref -= set(range(a, a + n))
        else:
            src = {i for i in ref if a <= i < a + n}
            ref -= src
            ref -= set(range(dst, dst + n))
            ref |= {i - a + dst for i in src}
            b.move(a, dst, n)
    lo, hi = min(q1, q2), max(q1, q2)
    assert b.count(lo, hi) == len([i for i in ref if lo <= i < hi])
    inside = sorted(i for i in ref if lo <= i < hi)
    assert b.find_next_set(lo, hi) == (inside[0] if inside else -1)
    clear = next((i for i in range(lo, hi) if i not in ref), -1)
    assert b.find_next_clear(lo, hi) == clear
    assert sorted(b) == sorted(ref)
    assert [i for r in b.runs(lo, hi) for i in range(*r)] == inside
    assert all(b.test(i) == (i in ref) for i in range(lo, min(hi, lo + 300)))
