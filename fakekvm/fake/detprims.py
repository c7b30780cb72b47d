"""Scheduler-aware ``threading``/``time`` stand-ins, and `deterministic(seed)` that installs them.

Engine code (``postcopy/``) blocks outside the fake too: ``threading.Lock``,
``Condition``, ``Event``, ``Thread.join``, ``time.monotonic`` deadlines. Under
a :class:`~fakekvm.fake.detsched.DeterministicScheduler` a task that blocked in
a real primitive would keep the baton and hang the run, so, while
:func:`deterministic` is active (the approach of loom's shimmed ``std::sync``
and Coyote's rewritten tasks, done here with monkeypatching so the engine's code
does not change):

* ``threading.Thread.start``/``join`` are patched on the class: a thread started
  by a task becomes a task that waits for the baton before its first instruction
  of ``run`` and hands it back when ``run`` ends; ``join`` of a task blocks in
  the scheduler (with a *virtual* timeout).
* Every module whose name starts with one of ``modules`` (default ``postcopy``;
  all its submodules are imported first, since engines import some lazily) gets, in its globals, ``threading`` replaced by a shim
  whose ``Lock``/``RLock``/``Condition``/``Event``/``Semaphore`` are
  :class:`DetLock`/:class:`DetRLock`/:class:`DetCondition`/:class:`DetEvent`/
  :class:`DetSemaphore`, ``time`` by one whose ``monotonic``/``perf_counter``/
  ``sleep`` read and wait on the virtual clock, and ``secrets`` by one drawing
  from the seed (the source's session id). Everything else falls through to the
  real module. Fake-kernel code keeps real locks: it never sleeps holding one
  except through `fakekvm.fake.waits`, which the scheduler already serves.
* ``fakekvm.fake.waits.DEFAULT_DOMAIN`` uses the scheduler (queues made before a
  file is installed).

The primitives work without a scheduler too (a thread that is not a task gets
real blocking), so objects that outlive the context stay usable. Objects must be
*created* inside the context to be scheduler-aware: build the kernels, the
source and the destination in the ``with`` block.
"""

from __future__ import annotations

import gc
import queue as _queue
import random
import sys
import threading
import time as _time
import types
from _thread import allocate_lock as _allocate_lock
from _thread import get_ident as _get_ident
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fakekvm.fake import waits
from fakekvm.fake.detsched import DeterministicScheduler, SchedulerClosed, Task, _ns

_ACTIVE: DeterministicScheduler | None = None
_ORIG_START = threading.Thread.start
_ORIG_JOIN = threading.Thread.join


def active() -> DeterministicScheduler | None:
    """The scheduler of the running `deterministic` context, if any."""
    return _ACTIVE


def _serial() -> tuple[DeterministicScheduler, Task] | None:
    """(scheduler, my task) when the caller is a serialised task, else None."""
    s = _ACTIVE
    if s is None or not s.serialising:
        return None
    t = s.me()
    return None if t is None else (s, t)


def _site() -> str:
    f = sys._getframe(2)
    return f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}"


# -- locks ---------------------------------------------------------------------------------------------
class DetLock:
    """``threading.Lock`` whose contended acquire blocks in the scheduler."""

    __slots__ = ("__weakref__", "_lock", "_site", "_waiting")

    def __init__(self) -> None:
        self._lock = _allocate_lock()
        self._waiting = 0
        self._site = _site()

    def __repr__(self) -> str:
        return f"<DetLock {'locked' if self._lock.locked() else 'unlocked'} made at {self._site}>"

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        sched = _ACTIVE
        if sched is not None and sched.lock_points:
            sched.point("lock")  # another task may run first (a no-op off the scheduler)
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        ctx = _serial()
        if ctx is None:
            return self._lock.acquire(True, timeout)
        s, _ = ctx
        deadline = None if timeout is None or timeout < 0 else s.now_ns + _ns(timeout)
        self._waiting += 1
        try:
            while True:
                timed_out = s.block_on(self, deadline, f"lock {self!r}")
                if self._lock.acquire(False):
                    return True
                if timed_out:
                    return False
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._lock.release()
        if self._waiting:
            s = _ACTIVE
            if s is not None:
                s.wake_obj(self)

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # what Condition needs
    def _is_owned(self) -> bool:
        return self._lock.locked()


class DetRLock:
    """``threading.RLock`` over a :class:`DetLock`."""

    __slots__ = ("__weakref__", "_count", "_inner", "_owner")

    def __init__(self) -> None:
        self._inner = DetLock()
        self._owner = 0
        self._count = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = _get_ident()
        if self._owner == me:
            self._count += 1
            return True
        if not self._inner.acquire(blocking, timeout):
            return False
        self._owner, self._count = me, 1
        return True

    def release(self) -> None:
        if self._owner != _get_ident():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if not self._count:
            self._owner = 0
            self._inner.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _is_owned(self) -> bool:
        return self._owner == _get_ident()

    def _release_save(self) -> tuple[int, int]:
        state = (self._count, self._owner)
        self._count, self._owner = 0, 0
        self._inner.release()
        return state

    def _acquire_restore(self, state: tuple[int, int]) -> None:
        self._inner.acquire()
        self._count, self._owner = state


class _Waiter:
    """One sleeper of a condition: a flag, a real lock for non-task sleepers."""

    __slots__ = ("lock", "notified", "task")

    def __init__(self, task: Task | None) -> None:
        self.task = task
        self.notified = False
        self.lock = _allocate_lock()
        self.lock.acquire()


class DetCondition:
    """``threading.Condition`` whose wait blocks in the scheduler (virtual timeouts)."""

    def __init__(self, lock: Any = None) -> None:
        self._lock = lock if lock is not None else DetRLock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        self._waiters: deque[_Waiter] = deque()
        self._site = _site()

    def __repr__(self) -> str:
        return f"<DetCondition made at {self._site}>"

    def __enter__(self) -> bool:
        return bool(self._lock.__enter__())

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def _is_owned(self) -> bool:
        f = getattr(self._lock, "_is_owned", None)
        return bool(f()) if f is not None else True

    def wait(self, timeout: float | None = None) -> bool:
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        ctx = _serial()
        w = _Waiter(None if ctx is None else ctx[1])
        self._waiters.append(w)
        lock: Any = self._lock
        saved = lock._release_save() if hasattr(lock, "_release_save") else lock.release()
        try:
            if ctx is None:
                if timeout is None:
                    got = w.lock.acquire()
                else:
                    got = w.lock.acquire(True, timeout) if timeout > 0 else w.lock.acquire(False)
                return bool(got)
            s, _ = ctx
            deadline = None if timeout is None else s.now_ns + _ns(timeout)
            while not w.notified:
                if s.block_on(w, deadline, f"condition {self!r}"):
                    break
            return w.notified
        finally:
            if not w.notified:
                try:
                    self._waiters.remove(w)
                except ValueError:
                    pass
            if hasattr(lock, "_acquire_restore"):
                lock._acquire_restore(saved)
            else:
                lock.acquire()

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        endtime = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = _now() + waittime
                else:
                    waittime = endtime - _now()
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        s = _ACTIVE
        while self._waiters and n > 0:
            w = self._waiters.popleft()
            w.notified = True
            n -= 1
            if w.task is None:
                w.lock.release()
            elif s is not None:
                s.wake_obj(w)

    def notify_all(self) -> None:
        self.notify(len(self._waiters))

    notifyAll = notify_all


class DetEvent:
    """``threading.Event`` over a :class:`DetCondition`."""

    def __init__(self) -> None:
        self._cond = DetCondition(DetLock())
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    isSet = is_set

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._flag:
                self._cond.wait(timeout)
            return self._flag


class DetSemaphore:
    """``threading.Semaphore`` over a :class:`DetCondition`."""

    def __init__(self, value: int = 1) -> None:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self._cond = DetCondition(DetLock())
        self._value = value

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        with self._cond:
            if not blocking and not self._value:
                return False
            if not self._cond.wait_for(lambda: self._value > 0, timeout):
                return False
            self._value -= 1
            return True

    __enter__ = acquire

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._value += n
            self._cond.notify(n)

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- queues -------------------------------------------------------------------------------------------------
class _DetQueueMixin:
    """``queue.Queue`` with scheduler-aware locks and virtual-time timeouts (CPython's
    ``get``/``put`` read ``time.monotonic`` directly, so they are redone here)."""

    mutex: Any
    not_empty: Any
    not_full: Any
    all_tasks_done: Any
    maxsize: int
    unfinished_tasks: int

    def _det_init(self) -> None:
        self.mutex = DetLock()
        self.not_empty = DetCondition(self.mutex)
        self.not_full = DetCondition(self.mutex)
        self.all_tasks_done = DetCondition(self.mutex)

    if TYPE_CHECKING:  # provided by queue.Queue (declared here only for the type checker)

        def _qsize(self) -> int: ...

        def _put(self, item: Any) -> None: ...

        def _get(self) -> Any: ...

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        with self.not_full:
            if self.maxsize > 0:
                full = lambda: self._qsize() >= self.maxsize  # noqa: E731
                if not block:
                    if full():
                        raise _queue.Full
                elif not self.not_full.wait_for(lambda: not full(), timeout):
                    raise _queue.Full
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self.not_empty:
            if not block:
                if not self._qsize():
                    raise _queue.Empty
            elif timeout is not None and timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            elif not self.not_empty.wait_for(self._qsize, timeout):
                raise _queue.Empty
            item = self._get()
            self.not_full.notify()
            return item


class DetQueue(_DetQueueMixin, _queue.Queue):
    def __init__(self, maxsize: int = 0) -> None:
        _queue.Queue.__init__(self, maxsize)
        self._det_init()


class DetLifoQueue(_DetQueueMixin, _queue.LifoQueue):
    def __init__(self, maxsize: int = 0) -> None:
        _queue.LifoQueue.__init__(self, maxsize)
        self._det_init()


class DetPriorityQueue(_DetQueueMixin, _queue.PriorityQueue):
    def __init__(self, maxsize: int = 0) -> None:
        _queue.PriorityQueue.__init__(self, maxsize)
        self._det_init()


# -- time -------------------------------------------------------------------------------------------------
def _now() -> float:
    s = _ACTIVE
    return _time.monotonic() if s is None else s.now_ns / 1e9


def _now_ns() -> int:
    s = _ACTIVE
    return _time.monotonic_ns() if s is None else s.now_ns


def _sleep(seconds: float) -> None:
    ctx = _serial()
    if ctx is None:
        _time.sleep(seconds)
        return
    s, _ = ctx
    s.point("sleep")
    s.sleep_until(s.now_ns + _ns(seconds), "time.sleep")


def _shim(name: str, real: types.ModuleType, attrs: dict[str, Any]) -> types.ModuleType:
    m = types.ModuleType(name, f"deterministic stand-in for {real.__name__}")
    m.__dict__.update(attrs)

    def __getattr__(attr: str) -> Any:
        return getattr(real, attr)

    m.__dict__["__getattr__"] = __getattr__
    return m


THREADING = _shim(
    "threading(deterministic)",
    threading,
    {
        "Lock": DetLock,
        "RLock": DetRLock,
        "Condition": DetCondition,
        "Event": DetEvent,
        "Semaphore": DetSemaphore,
        "BoundedSemaphore": DetSemaphore,
    },
)
QUEUE = _shim(
    "queue(deterministic)",
    _queue,
    {
        "Queue": DetQueue,
        "LifoQueue": DetLifoQueue,
        "PriorityQueue": DetPriorityQueue,
        "SimpleQueue": DetQueue,
    },
)
TIME = _shim(
    "time(deterministic)",
    _time,
    {
        "monotonic": _now,
        "monotonic_ns": _now_ns,
        "perf_counter": _now,
        "perf_counter_ns": _now_ns,
        "sleep": _sleep,
    },
)


def _secrets(seed: int) -> types.ModuleType:
    import secrets as real

    rng = random.Random(seed ^ 0x5EC2E75)
    return _shim(
        "secrets(deterministic)",
        real,
        {
            "randbits": rng.getrandbits,
            "token_bytes": lambda n=32: rng.randbytes(n),
            "token_hex": lambda n=32: rng.randbytes(n).hex(),
            "randbelow": lambda n: rng.randrange(n),
        },
    )


# -- threads ------------------------------------------------------------------------------------------------
def _det_start(self: threading.Thread) -> None:
    ctx = _serial()
    s = _ACTIVE
    if s is None or not s.serialising or getattr(self, "_det_task", None) is not None:
        _ORIG_START(self)  # (a second start raises "threads can only be started once")
        return
    task = s.new_task(self.name)
    task.thread = self
    self._det_task = task  # type: ignore[attr-defined]
    orig_run = self.run

    def run() -> None:
        try:
            s.task_begin(task)
        except (SchedulerClosed, RuntimeError):
            s.task_exit(task)
            return
        try:
            orig_run()
        finally:
            s.task_exit(task)

    self.run = run  # type: ignore[method-assign]
    try:
        _ORIG_START(self)
    except BaseException:
        s.abandon(task)
        raise
    if ctx is not None:
        s.point(f"start task {task.tid}")


def _det_join(self: threading.Thread, timeout: float | None = None) -> None:
    task: Task | None = getattr(self, "_det_task", None)
    ctx = _serial()
    if task is None or ctx is None:
        _ORIG_JOIN(self, timeout)
        return
    s, me = ctx
    if task is me:
        raise RuntimeError("cannot join current thread")
    s.point(f"join task {task.tid}")
    deadline = None if timeout is None else s.now_ns + _ns(timeout)
    while task.state != "done":
        timed_out = s.block_on(task, deadline, f"join of task {task.tid} {task.name!r}")
        if timed_out and task.state != "done":
            return
    _ORIG_JOIN(self)  # the thread is past its last scheduled step


# -- the context --------------------------------------------------------------------------------------------
def _import_all(prefixes: tuple[str, ...]) -> None:
    """Import every submodule of the packages named in ``prefixes`` (engines import some
    lazily, e.g. ``make_mechanism``): a module imported only inside the block would keep
    the real primitives, and the first run would differ from the later ones."""
    import importlib
    import pkgutil

    for prefix in prefixes:
        try:
            pkg = importlib.import_module(prefix)
        except Exception:  # a package that does not import: nothing to patch
            continue
        path = getattr(pkg, "__path__", None)
        if path is None:
            continue
        for info in pkgutil.walk_packages(path, prefix + "."):
            try:
                importlib.import_module(info.name)
            except Exception:  # a broken module cannot be used by the engine either
                continue


def _patch_modules(
    prefixes: tuple[str, ...], secrets_mod: types.ModuleType
) -> list[tuple[Any, str, Any]]:
    import secrets as real_secrets

    undo: list[tuple[Any, str, Any]] = []
    swaps = (
        (threading, THREADING),
        (_time, TIME),
        (_queue, QUEUE),
        (real_secrets, secrets_mod),
    )
    for name, mod in list(sys.modules.items()):
        if mod is None or not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        g = vars(mod)
        for attr, val in list(g.items()):
            for real, fake in swaps:
                if val is real:
                    undo.append((mod, attr, val))
                    setattr(mod, attr, fake)
    return undo


@contextmanager
def deterministic(
    seed: int,
    *,
    cost_ns: int = 1_000,
    modules: tuple[str, ...] = ("postcopy",),
    keep_log: bool = True,
    max_steps: int | None = None,
    stall_s: float | None = 300.0,
    lock_points: bool = True,
    gc_off: bool = True,
) -> Iterator[DeterministicScheduler]:
    """Serialise every thread started in the block under a seeded scheduler (module docstring).

    The calling thread is task 0. At the end the block waits until every task has
    ended; tasks still blocked then are reported in ``sched.leftover`` and released.
    A deadlock inside raises `DeadlockError` (in the blocked threads and here).
    ``lock_points``: every acquire of a stand-in lock is a scheduling point (not only a
    contended one), so a task can be preempted right before it takes a lock.
    ``gc_off``: the cyclic garbage collector is off inside the block (a finalizer that
    calls a kernel would otherwise run at an allocation-dependent moment).
    ``max_steps`` bounds the scheduling steps (`LivelockError`); ``stall_s`` real seconds
    without any step (a thread blocked outside the scheduler) raise `StallError`.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("deterministic(): already inside a deterministic context")
    s = DeterministicScheduler(seed, cost_ns=cost_ns, keep_log=keep_log, max_steps=max_steps)
    s.lock_points = lock_points
    s.attach_main()
    _import_all(modules)
    undo = _patch_modules(modules, _secrets(seed))
    saved_sched = waits.DEFAULT_DOMAIN.scheduler
    waits.DEFAULT_DOMAIN.scheduler = s
    threading.Thread.start = _det_start  # type: ignore[method-assign]
    threading.Thread.join = _det_join  # type: ignore[method-assign]
    _ACTIVE = s
    gc_was = gc.isenabled()
    if gc_off:
        gc.disable()
    if stall_s is not None:
        s.start_watchdog(stall_s)
    ok = False
    try:
        yield s
        ok = True
    finally:
        try:
            s.close()
        finally:
            s.stop_watchdog()
            if gc_was:
                gc.enable()
            _ACTIVE = None
            threading.Thread.start = _ORIG_START  # type: ignore[method-assign]
            threading.Thread.join = _ORIG_JOIN  # type: ignore[method-assign]
            waits.DEFAULT_DOMAIN.scheduler = saved_sched
            for mod, attr, val in reversed(undo):
                setattr(mod, attr, val)
    if ok and s.failure is not None:
        raise s.failure
