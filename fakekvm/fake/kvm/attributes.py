"""Per-gfn memory attributes (``KVM_SET_MEMORY_ATTRIBUTES``), stored as ranges.

Models ``kvm->mem_attr_array`` of ``virt/kvm/kvm_main.c`` (an xarray gfn ->
attributes) with a sorted list of run boundaries, so a 2^40-gfn range costs one
entry per distinct run, never one object (or one bit) per page. All gfns start
with attributes 0 (shared), as at VM creation. A change re-merges only the runs
next to it, so a post-copy engine converting pages one by one in any order pays
a bisect and a list splice per page.
"""

from __future__ import annotations

import bisect

from fakekvm.abi.kvm import KVM_MEMORY_ATTRIBUTE_PRIVATE


class RangeAttributes:
    """gfn -> attribute bits, piecewise constant over [start, next_start)."""

    __slots__ = ("_starts", "_values")

    def __init__(self) -> None:
        self._starts: list[int] = [0]
        self._values: list[int] = [0]

    def get(self, gfn: int) -> int:
        return self._values[bisect.bisect_right(self._starts, gfn) - 1]

    def is_private(self, gfn: int) -> bool:
        return bool(self.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def has(self, gfn: int, attribute: int) -> bool:
        return bool(self.get(gfn) & attribute)

    def uniform(self, start: int, end: int, value: int) -> bool:
        """``kvm_range_has_memory_attributes(kvm, start, end, ~0, value)``: all of [start, end) == value."""
        i = bisect.bisect_right(self._starts, start) - 1
        if self._values[i] != value:
            return False
        return i + 1 >= len(self._starts) or self._starts[i + 1] >= end

    def set(self, start: int, end: int, value: int) -> bool:
        """Set [start, end) to exactly ``value`` (``kvm_vm_set_mem_attributes``); False if unchanged."""
        if start >= end or self.uniform(start, end, value):
            return False
        s, v = self._starts, self._values
        tail = self.get(end)
        i = bisect.bisect_left(s, start)
        j = bisect.bisect_left(s, end)
        if j < len(s) and s[j] == end:
            new_s, new_v = [start], [value]
        else:
            new_s, new_v = [start, end], [value, tail]
        s[i:j] = new_s
        v[i:j] = new_v
        # merge equal neighbours around the splice, highest index first so lower ones stay valid
        for k in range(min(i + len(new_s), len(s) - 1), max(i, 1) - 1, -1):
            if v[k] == v[k - 1]:
                del s[k]
                del v[k]
        return True

    def runs(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(run_start, run_end, value) pieces covering [start, end)."""
        out: list[tuple[int, int, int]] = []
        i = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < end:
            nxt = self._starts[i + 1] if i + 1 < len(self._starts) else end
            e = min(nxt, end)
            out.append((pos, e, self._values[i]))
            pos = e
            i += 1
        return out

    def __len__(self) -> int:
        return len(self._starts)
