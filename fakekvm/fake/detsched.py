"""`DeterministicScheduler`: one thread runs at a time, the seeded RNG picks which.

A model of a uniprocessor kernel's ``schedule()`` (``kernel/sched/core.c``)
with a random pick among the runnable tasks, in the spirit of loom, Coyote's
random strategy and trio's ``MockClock``: every thread the fake (or the engine
above it) runs is a *task* holding a private real lock, its *gate*. Exactly one
task — the baton holder, :attr:`DeterministicScheduler.current` — is not
parked on its gate. At every *scheduling point* the holder calls the scheduler,
which chooses the next task with ``random.Random(seed)`` among the runnable
ones (in task-number order, so the pick depends on nothing but the seed and the
history), releases that task's gate and parks on its own. So the interleaving is
a function of the seed alone: same seed, same sequence of (task, point) pairs,
in any process on any machine.

Scheduling points:

* :meth:`point` — an explicit one (every `Kernel` call through
  :class:`~fakekvm.fake.serial.SerializingKernel`, a fault, a thread start);
* :meth:`block` — the `fakekvm.fake.waits.Scheduler` hook: every sleep of the
  fake (``wait_event`` on a `WaitQueue`) parks the task until :meth:`wake`;
* :meth:`block_on` — the same for any object (the scheduler-aware locks,
  conditions and events of :mod:`fakekvm.fake.detprims`, thread join, the
  simulated network of :mod:`postcopy.simnet`); :meth:`wake_obj` wakes them;
* task start (:meth:`new_task` / :meth:`task_begin`) and exit (:meth:`task_exit`).

Time is virtual (:class:`VirtualClock`, the fake kernel's ``clock``): each
scheduling point costs ``cost_ns``; when every task is blocked and some wait
has a deadline, the clock jumps to the earliest deadline and those waits time
out. When every task is blocked and no wait has a deadline, the run is
deadlocked: :class:`DeadlockError` names every task, what it waits on and
where (file:line of its innermost frame outside the scheduler) — never a hang.
After a failure (or :meth:`close`) the scheduler stops serialising: every
parked task is released and its wait raises, so every thread unwinds.

The event log (:attr:`log`, and its running BLAKE2b :meth:`digest`) holds one
``(task, label, data)`` entry per scheduling point plus the entries callers add
with :meth:`record` (e.g. the canonical ``uffd_msg`` bytes read). Labels must
not contain host-dependent values (addresses, fd numbers, native tids).
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import sys
import threading
from _thread import allocate_lock as _allocate_lock
from _thread import get_ident as _get_ident
from collections.abc import Callable
from typing import Any

from fakekvm.fake.waits import Scheduler, WaitQueue

RUNNABLE = "runnable"
BLOCKED = "blocked"
DONE = "done"

#: task numbers are reported to the fake as tids from here (above PID_MAX_LIMIT, 4194304)
TID_BASE = 0x4000_0000

_ENTRY = struct.Struct("<IHI")  # task, len(label), len(data)
_ME = (__file__.rsplit(".", 1)[0],)


class DeadlockError(RuntimeError):
    """Every task is blocked and no wait has a deadline."""


class SchedulerClosed(RuntimeError):
    """The scheduler stopped serialising (closed or failed) while this thread waited."""


class LivelockError(RuntimeError):
    """The run took more than ``max_steps`` scheduling steps (points and blocks)."""


class StallError(RuntimeError):
    """No scheduling step for ``stall_s`` real seconds: a task blocks outside the scheduler."""


class VirtualClock:
    """The fake kernel's clock in deterministic mode: the scheduler's virtual time.

    Unlike `fakekvm.fake.kernel.ManualClock` it has no ``wq``, so ``FakeKernel.poll``
    with a timeout sleeps with a (virtual) deadline the scheduler can jump to.
    """

    wq: WaitQueue | None = None

    def __init__(self, sched: DeterministicScheduler) -> None:
        self._sched = sched

    def monotonic_ns(self) -> int:
        return self._sched.now_ns


class Task:
    """One serialised thread."""

    __slots__ = (
        "blocked_on", "deadline", "gate", "ident", "leftover", "name", "native_tid",
        "state", "thread", "tid", "timed_out", "what",
    )  # fmt: skip

    def __init__(self, tid: int, name: str) -> None:
        self.tid = tid
        self.name = name
        self.gate = _allocate_lock()
        self.gate.acquire()
        self.state = RUNNABLE
        self.blocked_on: object = None
        self.what = ""
        self.deadline: int | None = None
        self.timed_out = False
        self.ident = 0
        self.native_tid = 0
        self.thread: threading.Thread | None = None
        self.leftover = False

    def __repr__(self) -> str:
        return f"<task {self.tid} {self.name!r} {self.state}>"


def _where(frame: Any) -> str:
    """file:line function of the innermost frame outside the scheduling machinery."""
    skip = ("detsched", "detprims", "waits", "threading", "simnet", "serial", "seam")
    while frame is not None:
        fn = frame.f_code.co_filename
        base = fn.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if base not in skip:
            parts = fn.split("/")
            short = "/".join(parts[-2:])
            return f"{short}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _ns(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1e9)) if seconds > 0 else 0


class DeterministicScheduler(Scheduler):
    """See the module docstring. ``cost_ns``: virtual time charged per scheduling point."""

    def __init__(
        self,
        seed: int,
        *,
        cost_ns: int = 1_000,
        keep_log: bool = True,
        max_steps: int | None = None,
    ) -> None:
        self.seed = seed
        #: a budget of scheduling steps (points + blocks): beyond it, `LivelockError`
        self.max_steps = max_steps
        self.steps = 0
        #: stand-in locks (`fakekvm.fake.detprims`) make every acquire a scheduling point
        self.lock_points = False
        self.cost_ns = cost_ns
        self.now_ns = 0
        self.clock = VirtualClock(self)
        self.rng = random.Random(seed)
        self.serialising = True
        self.current: Task | None = None
        self.points = 0
        self.switches = 0
        self.keep_log = keep_log
        self.log: list[tuple[int, str, bytes]] = []
        self._hash = hashlib.blake2b(digest_size=16)
        self._tasks: list[Task] = []  # live tasks in task-number order
        self._by_ident: dict[int, Task] = {}
        self._by_native: dict[int, int] = {}
        self._next_tid = 0
        self._mu = threading.Lock()  # scheduler state (the baton makes it uncontended)
        self._failure: str | None = None
        self._failure_kind: type[RuntimeError] = DeadlockError
        self._closing = False
        self._all_done = object()  # close() sleeps on this until every other task ended
        #: tasks left blocked when close() gave up on them (names), for the report
        self.leftover: list[str] = []

    # -- tasks -----------------------------------------------------------------------------
    def attach_main(self, name: str = "main") -> Task:
        """Make the calling thread task 0, the baton holder."""
        if self._tasks:
            raise RuntimeError("attach_main: the scheduler already has tasks")
        t = self.new_task(name)
        t.thread = threading.current_thread()
        self._bind(t)
        self.current = t
        return t

    def new_task(self, name: str) -> Task:
        """A runnable task for a thread about to start (it waits for the baton in `task_begin`)."""
        with self._mu:
            t = Task(self._next_tid, name)
            self._next_tid += 1
            self._tasks.append(t)
        return t

    def _bind(self, t: Task) -> None:
        t.ident = _get_ident()
        t.native_tid = threading.get_native_id()
        self._by_ident[t.ident] = t
        self._by_native[t.native_tid] = t.tid

    def task_begin(self, t: Task) -> None:
        """First thing a new task's thread does: wait until the scheduler picks it."""
        self._bind(t)
        t.gate.acquire()
        self._check_failed()

    def task_exit(self, t: Task) -> None:
        """Last thing a task's thread does: wake its joiners and hand the baton on."""
        self.record("exit", b"", t)
        with self._mu:
            t.state = DONE
            if t in self._tasks:
                self._tasks.remove(t)
            self._by_ident.pop(t.ident, None)
            for o in self._tasks:
                if o.state is BLOCKED and (o.blocked_on is t or o.blocked_on is self._all_done):
                    self._make_runnable(o)
            if not self.serialising:
                return
            try:
                nxt = self._pick_locked()
            except DeadlockError:
                self._fail_locked()
                return
            self._switch_to_locked(nxt)
        if nxt is not None:
            nxt.gate.release()

    def abandon(self, t: Task) -> None:
        """Forget a task whose thread never started (no baton hand-off)."""
        with self._mu:
            t.state = DONE
            if t in self._tasks:
                self._tasks.remove(t)

    def me(self) -> Task | None:
        """The calling thread's task (None for a thread the scheduler does not run)."""
        return self._by_ident.get(_get_ident())

    def task_number(self, native_tid: int) -> int:
        """The task number of a native tid (-1 if unknown): for logs."""
        return self._by_native.get(native_tid, -1)

    @property
    def tasks(self) -> list[Task]:
        return list(self._tasks)

    # -- the log ---------------------------------------------------------------------------------
    def record(self, label: str, data: bytes = b"", task: Task | None = None) -> None:
        """Add ``(task, label, data)`` to the event log (no scheduling point)."""
        t = task if task is not None else self.me()
        n = -1 if t is None else t.tid
        lb = label.encode()
        self._hash.update(_ENTRY.pack(n & 0xFFFFFFFF, len(lb), len(data)))
        self._hash.update(lb)
        if data:
            self._hash.update(data)
        if self.keep_log:
            self.log.append((n, label, bytes(data)))

    def digest(self) -> str:
        """Hex BLAKE2b-128 of the event log so far."""
        return self._hash.copy().hexdigest()

    # -- scheduling points ----------------------------------------------------------------------
    def point(self, label: str) -> None:
        """A scheduling point: charge ``cost_ns``, log, let the RNG choose who runs next."""
        me = self._by_ident.get(_get_ident())
        if me is None or not self.serialising:
            return
        self.points += 1
        self._step(me)
        self.now_ns += self.cost_ns
        self.record(label, b"", me)
        self._reschedule(me)

    def block_on(self, obj: object, deadline_ns: int | None, what: str) -> bool:
        """Park the calling task until `wake_obj(obj)` or virtual ``deadline_ns``.

        Returns True if the deadline passed (no wake). Raises `SchedulerClosed` /
        `DeadlockError` once the scheduler stopped serialising.
        """
        me = self._by_ident.get(_get_ident())
        if me is None:
            raise RuntimeError(f"block_on({what}) from a thread the scheduler does not run")
        self._check_failed()
        self._step(me)
        with self._mu:
            me.state = BLOCKED
            me.blocked_on = obj
            me.what = what
            me.deadline = deadline_ns
            me.timed_out = False
        self._reschedule(me)
        return me.timed_out

    def _step(self, me: Task) -> None:
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            text = self._tasks_text(
                f"deterministic scheduler (seed {self.seed}): more than {self.max_steps} "
                f"scheduling steps (livelock?) at virtual time {self.now_ns} ns"
            )
            self.fail(text, LivelockError)
            self._check_failed(me)

    def sleep_until(self, deadline_ns: int, what: str = "sleep") -> None:
        """Block the calling task until virtual time ``deadline_ns``."""
        token = object()
        while self.now_ns < deadline_ns:
            self.block_on(token, deadline_ns, what)

    def wake_obj(self, obj: object) -> int:
        """Make every task blocked on ``obj`` runnable; returns how many."""
        n = 0
        with self._mu:
            for t in self._tasks:
                if t.state is BLOCKED and t.blocked_on is obj:
                    self._make_runnable(t)
                    n += 1
        return n

    def wake_task(self, t: Task) -> None:
        with self._mu:
            if t.state is BLOCKED:
                self._make_runnable(t)

    def _make_runnable(self, t: Task) -> None:
        t.state = RUNNABLE
        t.blocked_on = None
        t.deadline = None

    def _reschedule(self, me: Task) -> None:
        with self._mu:
            if not self.serialising:
                nxt = None
            else:
                try:
                    nxt = self._pick_locked()
                except DeadlockError:
                    self._fail_locked()
                    nxt = None
                else:
                    if nxt is me:
                        return
                    self._switch_to_locked(nxt)
        if nxt is not None:
            self.switches += 1
            nxt.gate.release()
        me.gate.acquire()
        self._check_failed(me)

    def _switch_to_locked(self, nxt: Task | None) -> None:
        self.current = nxt

    def _pick_locked(self) -> Task | None:
        tasks = self._tasks
        if not tasks:
            return None
        now = self.now_ns
        for t in tasks:  # expired timers
            if t.state is BLOCKED and t.deadline is not None and t.deadline <= now:
                self._make_runnable(t)
                t.timed_out = True
        run = [t for t in tasks if t.state is RUNNABLE]
        if not run:
            timed = [t.deadline for t in tasks if t.state is BLOCKED and t.deadline is not None]
            if not timed:
                if self._closing:  # close() waits on the others: they are left over
                    main = tasks[0]
                    if main.blocked_on is self._all_done:
                        self._make_runnable(main)
                        main.leftover = True
                        return main
                raise DeadlockError(self._deadlock_text())
            self.now_ns = now = min(d for d in timed if d is not None)
            for t in tasks:
                if t.state is BLOCKED and t.deadline is not None and t.deadline <= now:
                    self._make_runnable(t)
                    t.timed_out = True
            run = [t for t in tasks if t.state is RUNNABLE]
        if len(run) == 1:
            return run[0]
        return run[self.rng.randrange(len(run))]

    # -- failure and end ---------------------------------------------------------------------------
    def _deadlock_text(self) -> str:
        return self._tasks_text(
            f"deterministic scheduler (seed {self.seed}): deadlock at virtual time "
            f"{self.now_ns} ns after {self.points} scheduling points: every task is blocked "
            f"and no wait has a deadline"
        )

    def _tasks_text(self, head: str) -> str:
        """``head`` and one line per live task: its state, what it waits on, and where."""
        frames = sys._current_frames()
        lines = [head]
        for t in self._tasks:
            where = _where(frames.get(t.ident)) if t.ident else "not started"
            if t.state is BLOCKED:
                doing = f"waits on {t.what}"
            elif t is self.current:
                doing = "runs (holds the baton)"
            else:
                doing = t.state
            lines.append(f"  task {t.tid} {t.name!r} {doing}  [at {where}]")
        return "\n".join(lines)

    def _fail_locked(
        self, text: str | None = None, kind: type[RuntimeError] = DeadlockError
    ) -> None:
        if self._failure is None:
            self._failure = text if text is not None else self._deadlock_text()
            self._failure_kind = kind
        self.serialising = False
        self.current = None
        for t in self._tasks:
            t.gate.release() if t.gate.locked() else None

    def fail(self, text: str, kind: type[RuntimeError] = DeadlockError) -> None:
        """Stop serialising with an error every parked task raises."""
        with self._mu:
            self._fail_locked(text, kind)

    @property
    def failure(self) -> RuntimeError | None:
        return None if self._failure is None else self._failure_kind(self._failure)

    def _check_failed(self, me: Task | None = None) -> None:
        if self._failure is not None:
            raise self._failure_kind(self._failure)
        if not self.serialising:
            what = f" while task {me.tid} {me.name!r} waited on {me.what}" if me is not None else ""
            raise SchedulerClosed(f"deterministic scheduler (seed {self.seed}) closed{what}")

    def close(self, join_timeout_s: float = 5.0) -> list[str]:
        """From task 0 at the end of the run: wait until every other task ended.

        Tasks still blocked when nothing else can run are *left over*: the scheduler
        stops serialising, their waits raise `SchedulerClosed`, and their names are
        returned (and kept in :attr:`leftover`).
        """
        me = self.me()
        if me is not None and self.serialising and self._failure is None:
            self._closing = True
            try:
                while len(self._tasks) > 1 and not me.leftover:
                    self.block_on(self._all_done, None, "the end of every other task (close)")
            except (DeadlockError, SchedulerClosed):
                pass
        with self._mu:
            rest = [t for t in self._tasks if t is not me]
            self.leftover = [f"task {t.tid} {t.name!r}: {t.what}" for t in rest]
            self.serialising = False
            self.current = None
            for t in rest:
                if t.gate.locked():
                    t.gate.release()
            if me is not None and me in self._tasks:
                self._tasks.remove(me)
                self._by_ident.pop(me.ident, None)
        for t in rest:
            th = t.thread
            if th is not None and th is not threading.current_thread():
                _join_real(th, join_timeout_s)
        return self.leftover

    def start_watchdog(self, stall_s: float) -> None:
        """Fail with `StallError` if no scheduling step happens for ``stall_s`` real seconds
        (a task blocked in something the scheduler does not see: a real lock, a socket).
        A guard against hangs, not part of the schedule: it never changes an interleaving."""
        stop = threading.Event()
        self._watchdog_stop = stop

        def watch() -> None:
            last = -1
            while not stop.wait(stall_s):
                if not self.serialising:
                    return
                if self.steps == last:
                    self.fail(
                        self._tasks_text(
                            f"deterministic scheduler (seed {self.seed}): no scheduling step for "
                            f"{stall_s} s (real time): a task blocks outside the scheduler"
                        ),
                        StallError,
                    )
                    return
                last = self.steps

        th = threading.Thread(target=watch, name="detsched-watchdog", daemon=True)
        self._watchdog = th
        _START(th)

    def stop_watchdog(self) -> None:
        stop = getattr(self, "_watchdog_stop", None)
        if stop is not None:
            stop.set()
            _join_real(self._watchdog, 10.0)  # a guard: it wakes at once

    # -- the waits.Scheduler hook (called with wq.lock held) ----------------------------------------
    def block(self, wq: WaitQueue, timeout: float | None) -> None:
        me = self._by_ident.get(_get_ident())
        if me is None:
            Scheduler.block(self, wq, timeout)  # not a task: a real sleep
            return
        deadline = None if timeout is None else self.now_ns + _ns(timeout)
        lock: Any = wq.lock
        recursive = wq.recursive
        saved = lock._release_save() if recursive else lock.release()
        try:
            self.block_on(wq, deadline, f"wait queue {wq.name!r} of {wq.domain.name}")
        finally:
            if recursive:
                lock._acquire_restore(saved)
            else:
                self._reacquire(lock, me)

    def _reacquire(self, lock: Any, me: Task) -> None:
        spins = 0
        while not lock.acquire(False):
            if not self.serialising:
                lock.acquire()
                return
            spins += 1
            if spins > 100_000:
                self.fail(f"task {me.tid} {me.name!r} could not retake a fake lock: {lock!r}")
                lock.acquire()
                return
            self.point("retake a fake lock")

    def wake(self, wq: WaitQueue) -> None:
        if wq.waiters:  # sleepers that are not tasks
            Scheduler.wake(self, wq)
        self.wake_obj(wq)

    def now(self) -> float:
        return self.now_ns / 1e9


_JOIN: Callable[[threading.Thread, float | None], None] = threading.Thread.join
_START: Callable[[threading.Thread], None] = threading.Thread.start


def _join_real(th: threading.Thread, timeout: float | None) -> None:
    _JOIN(th, timeout)
