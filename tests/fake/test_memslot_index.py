"""Pure data structures behind memslots: the gfn index (bisect + last-hit cache),
overlap checks, and the per-gfn attribute range map, against reference models."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fakekvm.fake.kvm.attributes import RangeAttributes
from fakekvm.fake.kvm.memslots import (
    KVM_MR_CREATE,
    AddressSpace,
    Change,
    Memslot,
    RegionRequest,
    plan_change,
)


def _add(space: AddressSpace, sid: int, base: int, npages: int) -> Memslot:
    s = Memslot(as_id=0, id=sid, flags=0, base_gfn=base, npages=npages, userspace_addr=0)
    space.apply(Change(KVM_MR_CREATE, None, s))
    return s


def test_lookup_many_slots() -> None:
    space = AddressSpace()
    slots = [_add(space, i, i * 100, 50) for i in range(2000)]
    for i, s in enumerate(slots):
        assert space.lookup(i * 100) is s
        assert space.lookup(i * 100 + 49) is s
        assert space.lookup(i * 100 + 50) is None
    assert space.lookup(10**9) is None
    assert space.generation == 2000
    assert space.overlaps(-1, 149, 151) and not space.overlaps(-1, 150, 200)
    assert not space.overlaps(1, 100, 150)  # a slot never overlaps itself


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=25))
def test_plan_change_overlap_matches_a_model(reqs: list[tuple[int, int]]) -> None:
    space = AddressSpace()
    taken: list[tuple[int, int]] = []
    for sid, (base, n) in enumerate(reqs):
        req = RegionRequest(sid, 0, base << 12, n << 12, 0x10000000)
        clash = any(b < base + n and base < b + m for b, m in taken)
        try:
            ch = plan_change(
                req, v1=True, valid_flags=3, nr_address_spaces=1, nr_memslots=32764,
                max_gfn=(1 << 40) - 1, spaces=[space], gmem_immutable=True,
            )  # fmt: skip
        except OSError as e:
            assert clash and e.errno == 17  # EEXIST
            continue
        assert not clash
        space.apply(ch)
        taken.append((base, n))
    for gfn in range(0, 260):
        owners = [b for b, m in taken if b <= gfn < b + m]
        s = space.lookup(gfn)
        assert (s.base_gfn if s else None) == (owners[0] if owners else None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(0, 64), st.sampled_from([0, 8, 16])),
                max_size=30))  # fmt: skip
def test_range_attributes_match_a_model(ops: list[tuple[int, int, int]]) -> None:
    ra = RangeAttributes()
    model = [0] * 80
    for a, b, v in ops:
        lo, hi = min(a, b), max(a, b)
        ra.set(lo, hi, v)
        model[lo:hi] = [v] * (hi - lo)
    assert [ra.get(g) for g in range(80)] == model
    runs = ra.runs(0, 80)
    assert [v for a, b, v in runs for _ in range(a, b)] == model
    # adjacent equal runs are merged: one entry per value change over all gfns
    changes = sum(1 for i in range(1, 80) if model[i] != model[i - 1])
    assert len(ra) == 1 + changes + (1 if model[-1] != 0 else 0)
