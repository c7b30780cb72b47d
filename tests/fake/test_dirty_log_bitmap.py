"""The dirty bitmap (pure): sizes, INITIALLY_SET, GET with and without manual protect,
CLEAR's fetch-and-clear and the re-protected runs it reports, against reference sets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fakekvm.fake.kvm.dirty import DirtyBitmap, bitmap_bytes, validate_clear


def _bits(data: bytes) -> set[int]:
    return {i for i in range(len(data) * 8) if data[i // 8] >> (i % 8) & 1}


def test_sizes_and_initially_set() -> None:
    assert [bitmap_bytes(n) for n in (1, 64, 65, 100, 128)] == [8, 8, 16, 16, 16]
    d = DirtyBitmap(100, initially_set=True)
    assert _bits(bytes(d.bits)) == set(range(100))
    assert DirtyBitmap(64, True).bits == b"\xff" * 8


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 199)), st.sets(st.integers(0, 199)))
def test_get_and_clear_match_sets(marked: set[int], to_clear: set[int]) -> None:
    d = DirtyBitmap(200)
    for g in marked:
        d.mark(g)
    data, runs = d.get(manual_protect=True)
    assert _bits(data) == marked and runs == []
    user = bytearray(32)
    for g in to_clear:
        user[g // 8] |= 1 << (g % 8)
    validate_clear(0, 200, 200)
    runs = d.clear(0, 200, bytes(user))
    covered = {g for a, b in runs for g in range(a, b)}
    assert covered == marked & to_clear  # exactly the bits that went 1 -> 0
    assert _bits(bytes(d.bits)) == marked - to_clear
    data, runs = d.get(manual_protect=False)
    assert _bits(data) == marked - to_clear
    assert {g for a, b in runs for g in range(a, b)} >= marked - to_clear
    assert _bits(bytes(d.bits)) == set()
