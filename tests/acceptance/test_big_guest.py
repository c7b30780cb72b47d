"""Issue-3 acceptance: a 1 GiB guest on the fake, with small fake-side metadata and honest RSS.

The toucher guest writes every page of 1 GiB. The fake's own Python-side state
for that (memslot, bitmaps, VMAs, vCPU) must stay under 1 MiB, and the process's
RSS may grow by no more than the guest pages actually touched (plus a fixed
allowance for the emulator's translation cache): guest memory is real host
memory, touched pages only, and per-page state lives in bitmaps.
"""

from __future__ import annotations

import tracemalloc

import pytest

from fakekvm.fake import FakeKernel
from fakekvm.guests import GuestVM, Pattern, TouchParams, layout, toucher_image

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.slow
def test_1gib_sequential_toucher_on_the_fake() -> None:
    size = 1 * GiB
    mem = layout.DATA_BASE + size
    p = TouchParams(layout.DATA_BASE, size, Pattern.SEQUENTIAL, write=True, seed=3)
    k = FakeKernel(profile="6.18-pvm")
    try:
        with GuestVM(k, mem) as vm:
            vm.load(toucher_image(mem, p))
            tracemalloc.start()
            rss0 = _rss()
            base0, _ = tracemalloc.get_traced_memory()
            r = vm.run()
            cur, peak = tracemalloc.get_traced_memory()
            rss1 = _rss()
            tracemalloc.stop()
            assert r.reports[0] == p.npages == size // PAGE
            touched = p.npages * PAGE
            # fake-side metadata: what the fake allocated in Python while the guest touched 1 GiB
            assert cur - base0 < 1 * MiB, f"fake metadata grew by {(cur - base0) / MiB:.2f} MiB"
            assert peak - base0 < 1 * MiB, f"fake metadata peaked at {(peak - base0) / MiB:.2f} MiB"
            # RSS: the touched guest pages, plus at most 64 MiB for unicorn's code cache and friends
            growth = rss1 - rss0
            assert touched * 0.95 <= growth <= touched + 64 * MiB, f"RSS grew {growth / MiB:.0f} MiB"
            # every page really holds what the guest wrote (spot checks across the range)
            m = vm.mem()
            for i in (0, 1, p.npages // 2, p.npages - 1):
                off = layout.DATA_BASE + i * PAGE
                assert bytes(m[off : off + 8]) != bytes(8)
    finally:
        k.shutdown()
