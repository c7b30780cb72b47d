"""waits: WaitQueue wake-ups, timeouts, abort, shutdown, signals, watchdog, poll tables."""

from __future__ import annotations

import errno
import threading

import pytest

from fakekvm.fake.waits import (
    KernelShutdown,
    PollTable,
    Scheduler,
    WaitDomain,
    WaitQueue,
    WaitTimeout,
    poll_wait,
)


def _run(fn) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=body)
    t.start()
    return t, out


class CountingScheduler(Scheduler):
    def __init__(self) -> None:
        self.blocked = threading.Event()
        self.blocks = 0

    def block(self, wq: WaitQueue, timeout: float | None) -> None:
        self.blocks += 1
        self.blocked.set()
        super().block(wq, timeout)


def test_wait_event_wakes_on_state_change() -> None:
    sched = CountingScheduler()
    d = WaitDomain("t", scheduler=sched)
    wq = WaitQueue(d)
    state = {"ready": False}
    t, out = _run(lambda: wq.wait_event(lambda: state["ready"]))
    assert sched.blocked.wait(10)  # it went through the scheduler hook
    with wq.lock:
        state["ready"] = True
        wq.wake_up_all_locked()
    t.join(10)
    assert out == [True]
    assert d.sleepers() == {}


def test_true_condition_does_not_block() -> None:
    sched = CountingScheduler()
    wq = WaitQueue(WaitDomain("t", scheduler=sched))
    assert wq.wait_event(lambda: True) is True
    assert sched.blocks == 0
    assert wq.wait_event(lambda: False, 0) is False


def test_timeout_returns_false() -> None:
    wq = WaitQueue(WaitDomain("t"))
    assert wq.wait_event(lambda: False, 0.01) is False


def test_abort_wakes_with_the_error() -> None:
    sched = CountingScheduler()
    wq = WaitQueue(WaitDomain("t", scheduler=sched))
    t, out = _run(lambda: wq.wait_event(lambda: False))
    assert sched.blocked.wait(10)
    wq.abort(OSError(errno.EBADF, "released"))
    t.join(10)
    assert isinstance(out[0], OSError) and out[0].errno == errno.EBADF
    with pytest.raises(OSError):
        wq.wait_event(lambda: False)


def test_shutdown_wakes_everyone() -> None:
    sched = CountingScheduler()
    d = WaitDomain("t", scheduler=sched)
    queues = [WaitQueue(d, name=f"q{i}") for i in range(3)]
    threads = [_run(lambda q=q: q.wait_event(lambda: False)) for q in queues]
    while len(d.sleepers()) < 3:
        sched.blocked.wait(10)
        sched.blocked.clear()
    d.shutdown()
    for t, out in threads:
        t.join(10)
        assert isinstance(out[0], KernelShutdown) and out[0].errno == errno.ESHUTDOWN
    with pytest.raises(KernelShutdown):
        WaitQueue(d).wait_event(lambda: False)


def test_interrupt_only_breaks_interruptible_waits() -> None:
    sched = CountingScheduler()
    d = WaitDomain("t", scheduler=sched)
    wq = WaitQueue(d)
    t, out = _run(lambda: wq.wait_event(lambda: False, interruptible=True))
    assert sched.blocked.wait(10)
    (tid,) = d.sleepers()
    d.interrupt(tid)
    t.join(10)
    assert isinstance(out[0], OSError) and out[0].errno == errno.EINTR
    assert not d.signal_pending(tid)  # consumed
    # a pending signal makes the next interruptible wait fail at once
    me = threading.get_native_id()
    d.interrupt(me)
    with pytest.raises(OSError) as ei:
        wq.wait_event(lambda: False, interruptible=True)
    assert ei.value.errno == errno.EINTR


def test_watchdog_names_the_queue() -> None:
    wq = WaitQueue(WaitDomain("t", watchdog_s=0.01), name="stuck-queue")
    with pytest.raises(WaitTimeout) as ei:
        wq.wait_event(lambda: False, what="a page")
    assert ei.value.errno == errno.ETIMEDOUT
    assert "stuck-queue" in str(ei.value) and "a page" in str(ei.value)


def test_poll_table_callbacks() -> None:
    d = WaitDomain("t")
    q1, q2 = WaitQueue(d), WaitQueue(d)
    hits: list[int] = []
    table = PollTable(d, lambda: hits.append(1))
    poll_wait(q1, table)
    poll_wait(q1, table)  # registering twice is harmless
    poll_wait(q2, None)  # no table: no-op
    q1.wake_up_all()
    assert table.triggered and hits == [1]
    table.remove_all()
    q1.wake_up_all()
    assert hits == [1]
