"""The deterministic scheduler and its primitives, without a fake kernel."""

from __future__ import annotations

import threading
import time

import pytest

import fakekvm.fake.detprims as dp
from fakekvm.fake.detprims import (
    DetCondition,
    DetEvent,
    DetLock,
    DetRLock,
    DetSemaphore,
    deterministic,
)
from fakekvm.fake.detsched import DeadlockError, DeterministicScheduler, LivelockError


def _ping(seed: int, workers: int = 3, rounds: int = 5) -> list[tuple[int, str, bytes]]:
    with deterministic(seed) as s:

        def work(i: int) -> None:
            for r in range(rounds):
                s.point(f"w{i} r{r}")

        ts = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return s.log


def test_same_seed_same_interleaving_other_seeds_differ() -> None:
    first = _ping(7)
    for _ in range(5):
        assert _ping(7) == first
    others = {tuple(_ping(seed)) for seed in range(1, 9)}
    assert len(others) >= 2
    # every worker's points appear, in program order within the worker
    for i in range(3):
        mine = [lb for _, lb, _ in first if lb.startswith(f"w{i} ")]
        assert mine == [f"w{i} r{r}" for r in range(5)]


def test_one_thread_at_a_time() -> None:
    inside = [0]
    peak = [0]
    with deterministic(3) as s:

        def work() -> None:
            for _ in range(20):
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
                s.point("inside")  # another task may be picked here...
                inside[0] -= 1  # ...but none runs while this one is "inside"
                s.point("outside")

        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    # points inside the region let others run: the region is not atomic, but only
    # one thread executes Python at a time, so the counter never tears
    assert inside[0] == 0
    assert 1 <= peak[0] <= 4
    assert s.switches > 0


def test_lock_contention_blocks_in_the_scheduler() -> None:
    order: list[str] = []
    with deterministic(11) as s:
        lock = DetLock()

        def holder() -> None:
            with lock:
                order.append("holder in")
                s.point("holding")
                s.point("holding")
                order.append("holder out")

        def waiter() -> None:
            with lock:
                order.append("waiter in")

        a = threading.Thread(target=holder)
        with lock:  # main holds it while the holder starts and tries to take it
            a.start()
            order.append("main in")
            for _ in range(5):
                s.point("main holding")
            order.append("main out")
        a.join()
        b = threading.Thread(target=waiter)
        b.start()
        b.join()
    assert order == ["main in", "main out", "holder in", "holder out", "waiter in"]
    assert not lock.locked()


def test_condition_event_semaphore_and_rlock() -> None:
    got: list[int] = []
    with deterministic(5):
        cond = DetCondition(DetLock())
        items: list[int] = []
        ev = DetEvent()
        sem = DetSemaphore(0)
        rl = DetRLock()

        def consumer() -> None:
            for _ in range(3):
                with cond:
                    cond.wait_for(lambda: bool(items))
                    got.append(items.pop(0))
            ev.set()
            sem.release()

        c = threading.Thread(target=consumer)
        c.start()
        for i in range(3):
            with cond:
                items.append(i)
                cond.notify()
        assert ev.wait() is True
        assert sem.acquire()
        with rl, rl:  # re-entrant
            pass
        c.join()
    assert got == [0, 1, 2]


def test_timed_waits_jump_the_virtual_clock() -> None:
    with deterministic(1, cost_ns=10) as s:
        ev = DetEvent()
        t0 = s.now_ns
        assert ev.wait(2.5) is False  # nothing else can run: the clock jumps to the deadline
        waited = s.now_ns - t0
        assert 2_500_000_000 <= waited < 2_500_000_000 + 1_000
        lock = DetLock()
        lock.acquire()

        def try_lock(out: list[bool]) -> None:
            out.append(lock.acquire(timeout=0.5))

        out: list[bool] = []
        th = threading.Thread(target=try_lock, args=(out,))
        th.start()
        th.join()
        assert out == [False]
        lock.release()
        t1 = s.now_ns
        dp.TIME.sleep(1.0)  # the time stand-in sleeps on the virtual clock
        assert s.now_ns - t1 >= 1_000_000_000
        assert abs(dp.TIME.monotonic() - s.now_ns / 1e9) < 1e-9


def test_join_timeout_is_virtual() -> None:
    with deterministic(2) as s:
        ev = DetEvent()
        th = threading.Thread(target=ev.wait, name="sleeper")
        th.start()
        before = s.now_ns
        th.join(3.0)
        assert th.is_alive()
        assert s.now_ns - before >= 3_000_000_000
        ev.set()
        th.join()
        assert not th.is_alive()


def test_lock_order_deadlock_is_reported_not_hung() -> None:
    errors: list[BaseException] = []
    with pytest.raises(DeadlockError) as ei, deterministic(9):
        a = DetLock()
        b = DetLock()

        a_held, b_held = DetEvent(), DetEvent()

        def ab() -> None:
            try:
                with a:
                    a_held.set()
                    b_held.wait()
                    with b:
                        pass
            except DeadlockError as e:
                errors.append(e)

        def ba() -> None:
            try:
                with b:
                    b_held.set()
                    a_held.wait()
                    with a:
                        pass
            except DeadlockError as e:
                errors.append(e)

        t1 = threading.Thread(target=ab, name="takes-a-then-b")
        t2 = threading.Thread(target=ba, name="takes-b-then-a")
        t1.start()
        t2.start()
        t1.join()
        t2.join()
    text = str(ei.value)
    assert "deadlock" in text and "seed 9" in text
    assert "'takes-a-then-b' waits on lock <DetLock locked" in text
    assert "'takes-b-then-a' waits on lock <DetLock locked" in text
    assert "test_det_sched.py" in text  # where each task is stuck
    assert "'main' waits on join of task" in text
    assert len(errors) == 2
    assert threading.active_count() == 1 or all(not t.is_alive() for t in (t1, t2))


def test_livelock_budget() -> None:
    with (
        pytest.raises(LivelockError, match="more than 200 scheduling steps"),
        deterministic(4, max_steps=200) as s,
    ):
        while True:
            s.point("spin")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_leftover_tasks_are_released_at_the_end() -> None:
    with deterministic(6) as s:
        ev = DetEvent()
        th = threading.Thread(target=ev.wait, name="forgotten", daemon=True)
        th.start()
    assert s.leftover and "forgotten" in s.leftover[0]
    th.join(10)  # a guard, not a synchronisation: it was released with an error
    assert not th.is_alive()


def test_patches_are_removed() -> None:
    import postcopy.client as client

    start, join = threading.Thread.start, threading.Thread.join
    with deterministic(1):
        assert client.threading is dp.THREADING
        assert client.time is dp.TIME
        assert threading.Thread.start is not start
    assert client.threading is threading
    assert client.time is time
    assert threading.Thread.start is start and threading.Thread.join is join
    assert dp.active() is None


def test_primitives_work_without_a_scheduler() -> None:
    lock = DetLock()
    cond = DetCondition(lock)
    ev = DetEvent()
    done: list[int] = []

    def setter() -> None:
        with cond:
            done.append(1)
            cond.notify_all()
        ev.set()

    th = threading.Thread(target=setter)
    with cond:
        th.start()
        assert cond.wait_for(lambda: bool(done), timeout=20)
    assert ev.wait(20)
    th.join()


def test_scheduler_is_a_waits_scheduler() -> None:
    from fakekvm.fake.waits import Scheduler, WaitDomain, WaitQueue

    s = DeterministicScheduler(3)
    assert isinstance(s, Scheduler)
    with deterministic(3) as s:
        wq = WaitQueue(WaitDomain("t", scheduler=s), "q")
        flag = [False]

        def setter() -> None:
            with wq.lock:
                flag[0] = True
                wq.wake_up_all_locked()

        assert wq.wait_event(lambda: flag[0], timeout=0.25) is False  # virtual timeout
        assert s.now_ns >= 250_000_000
        th = threading.Thread(target=setter)
        th.start()
        assert wq.wait_event(lambda: flag[0]) is True
        th.join()


def test_queue_stand_in_blocks_and_times_out_virtually() -> None:
    import queue

    out: list[int] = []
    with deterministic(12) as s:
        q = dp.QUEUE.Queue(maxsize=2)
        assert isinstance(q, queue.Queue)

        def consumer() -> None:
            while (item := q.get()) is not None:
                out.append(item)

        th = threading.Thread(target=consumer)
        th.start()
        for i in range(6):
            q.put(i)  # blocks in the scheduler while the queue is full
        q.put(None)
        th.join()
        t0 = s.now_ns
        with pytest.raises(queue.Empty):
            q.get(timeout=0.75)
        assert s.now_ns - t0 >= 750_000_000
    assert out == list(range(6))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_real_block_outside_the_scheduler_is_a_stall_error() -> None:
    from fakekvm.fake.detsched import StallError

    real = threading.Lock()  # a real lock: the scheduler cannot see who waits on it
    with pytest.raises(StallError) as ei, deterministic(13, stall_s=1.0):
        ev = DetEvent()

        def holder() -> None:
            with real:
                ev.set()
                DetEvent().wait()  # parked in the scheduler, holding the real lock

        th = threading.Thread(target=holder, name="holds-a-real-lock")
        th.start()
        ev.wait()
        with real:  # blocks the baton holder for real: the watchdog fires
            pass
        th.join()
    text = str(ei.value)
    assert "no scheduling step for 1.0 s" in text
    assert "'main' runs (holds the baton)" in text
    assert "task 1 'holds-a-real-lock'" in text  # parked in the scheduler (blocked or runnable)


def test_a_thread_that_fails_to_start_is_forgotten() -> None:
    with deterministic(14) as s:
        th = threading.Thread(target=lambda: None)
        th.start()
        with pytest.raises(RuntimeError, match="only be started once"):
            th.start()
        th.join()
        s.point("after")
    assert not s.leftover and not s.tasks
