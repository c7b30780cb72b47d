"""The source's send order: demand first, background policies, batches, no resends."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy.schedule import SendScheduler


def _drain(s: SendScheduler) -> list[tuple[int, int, bool]]:
    out = []
    while (x := s.next()) is not None:
        out.append(x)
    return out


def test_sequential_batches() -> None:
    s = SendScheduler(10, batch_pages=4)
    assert _drain(s) == [(0, 4, False), (4, 4, False), (8, 2, False)]
    assert s.background_done and s.next_background() is None


def test_demand_overtakes_background() -> None:
    s = SendScheduler(100, batch_pages=8)
    assert s.next() == (0, 8, False)
    s.demand(50, 2)
    s.demand(90)
    assert s.next() == (50, 2, True)
    assert s.next() == (90, 1, True)


def test_follow_demand_moves_the_cursor_and_wraps() -> None:
    s = SendScheduler(20, batch_pages=4, follow_demand=True)
    assert s.next() == (0, 4, False)
    s.demand(10)
    assert s.next() == (10, 1, True)
    assert s.next() == (11, 4, False)  # QEMU: the scan continues after the requested page
    assert s.next() == (15, 4, False)
    assert s.next() == (19, 1, False)
    assert s.next() == (4, 4, False)  # wrap around to what was skipped
    assert s.next() == (8, 2, False)
    assert s.next() is None


def test_without_follow_demand_the_cursor_stays() -> None:
    s = SendScheduler(20, batch_pages=4, follow_demand=False)
    assert s.next() == (0, 4, False)
    s.demand(10)
    assert s.next() == (10, 1, True)
    assert s.next() == (4, 4, False)
    assert s.next() == (8, 2, False)  # stops short of the page demand sent
    assert s.next() == (11, 4, False)


def test_demand_is_split_into_batches_and_may_resend() -> None:
    s = SendScheduler(100, batch_pages=4)
    assert s.next() == (0, 4, False)
    s.demand(2, 7)
    assert s.take_demand() == (2, 4)
    assert s.take_demand() == (6, 3)
    assert s.take_demand() is None
    assert s.pages_resent == 2  # pages 2 and 3 went out twice: the destination asked


def test_trace_policy_sends_the_working_set_first() -> None:
    trace = [40, 41, 42, 7, 7, 99, 500, 8, 3]  # duplicates and out-of-range entries are ignored
    s = SendScheduler(100, batch_pages=2, policy="trace", trace=trace)
    out = _drain(s)
    # each trace page with the unsent rest of its batch-aligned block: [42, 44), [8, 10)
    assert out[:6] == [(40, 2, False), (42, 2, False), (7, 1, False), (99, 1, False),
                       (8, 2, False), (3, 1, False)]  # fmt: skip
    assert out[6] == (0, 2, False)  # then the rest sequentially
    sent = sorted(p for a, c, _ in out for p in range(a, a + c))
    assert sent == list(range(100))


def test_trace_policy_follows_a_demand_along_the_trace() -> None:
    """A demand for a trace page moves the push to the trace entry after it (the guest is
    there); the trace pages skipped go out with the sequential sweep at the end."""
    trace = [10, 20, 30, 40, 50, 60]
    s = SendScheduler(100, batch_pages=1, policy="trace", trace=trace)
    assert s.next() == (10, 1, False)
    s.demand(40)
    assert s.next() == (40, 1, True)
    assert s.next() == (50, 1, False)  # not 20: the guest touched 40 already
    s.demand(20)  # an earlier trace page: no jump back
    assert s.next() == (20, 1, True)
    assert s.next() == (60, 1, False)
    rest = _drain(s)
    assert rest[0] == (0, 1, False) and (30, 1, False) in rest
    assert sorted({p for a, c, _ in rest for p in range(a, a + c)} | {10, 20, 40, 50, 60}) == list(range(100))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=300),
    st.integers(min_value=1, max_value=17),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=299), max_size=40),
    st.lists(st.integers(min_value=0, max_value=299), max_size=40),
)
def test_every_page_exactly_once_from_background(
    n: int, batch: int, follow: bool, demands: list[int], trace: list[int]
) -> None:
    s = SendScheduler(n, batch_pages=batch, follow_demand=follow, policy="trace", trace=trace)
    times = bytearray(n)
    demanded = set()
    di = 0
    while True:
        if di < len(demands) and demands[di] < n and di % 3 == 0:
            s.demand(demands[di])
        di += 1
        x = s.next()
        if x is None:
            break
        a, c, is_demand = x
        assert 1 <= c <= batch and a >= 0 and a + c <= n
        for p in range(a, a + c):
            if is_demand:
                demanded.add(p)
            else:
                assert p not in demanded  # the background never resends what demand sent
            times[p] += 1
    assert s.background_done
    assert all(t >= 1 for t in times)
    # a page goes out twice only when demand asked for it after it was sent
    assert sum(times) - n == s.pages_resent
