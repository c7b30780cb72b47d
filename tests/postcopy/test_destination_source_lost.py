"""A source that dies halfway: the destination fails with a clear error, never hangs.

The kill is event-driven: when half of memory has been placed, the receiver's
progress callback hands over to a killer thread (``Source.kill``: every
connection is reset, as when the process dies) and waits until it is done.
"""

from __future__ import annotations

import errno
import threading

import pytest

from fakekvm.kernel.real import RealKernel
from postcopy.client import FetchClient, RemoteError
from postcopy.destination import Destination, MigrationFailed
from postcopy.guestrun import install_kick_handler
from postcopy.mechanisms import make_mechanism
from postcopy.migrate import prepare_source
from postcopy.source import Source

pytestmark = [pytest.mark.real_kernel, pytest.mark.real_uffd]

MEM = 32 << 20
GUARD_S = 60.0  # a guard against a hang, never a synchronisation


@pytest.mark.parametrize("mechanism", ["uffd-missing", "uffd-minor"])
def test_source_killed_halfway(mechanism: str) -> None:
    install_kick_handler()  # the destination runs in a thread here
    k = RealKernel()
    g = prepare_source(k, MEM, 1, "random", 3)
    mem = g.vm.mem()
    src = Source(mem, g.states, batch_pages=64)
    addr = src.listen()
    half = threading.Event()
    killed = threading.Event()

    def killer() -> None:
        half.wait()
        src.kill()
        killed.set()

    def progress(done: int, total: int) -> None:
        if done * 2 >= total and not half.is_set():
            half.set()
            assert killed.wait(GUARD_S)

    kt = threading.Thread(target=killer, daemon=True)
    kt.start()
    dest = Destination(k, make_mechanism(mechanism), address=addr, progress=progress)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            dest.run()
        except BaseException as e:
            outcome.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(GUARD_S)
    assert not th.is_alive(), "the destination hung after the source died"
    assert killed.is_set()
    assert len(outcome) == 1 and isinstance(outcome[0], MigrationFailed), outcome
    msg = str(outcome[0])
    assert "source lost" in msg and "pages never arrived" in msg
    assert 0 < dest.nr_placed < dest.layout.nr_pages
    kt.join(GUARD_S)
    mem.release()
    g.vm.close()


def test_request_beyond_guest_memory_is_refused() -> None:
    k = RealKernel()
    g = prepare_source(k, 4 << 20, 1, "idle", 1)
    mem = g.vm.mem()
    with Source(mem, g.states) as src:
        addr = src.listen()
        c = FetchClient.connect(addr, bulk=False)
        try:
            c.request(c.nr_pages, 1)
            with pytest.raises(RemoteError) as ei:
                c.wait_pages(c.nr_pages, 1, timeout=GUARD_S)
            assert ei.value.errno == errno.EFAULT
            c.fetch(0, 2, timeout=GUARD_S)  # the channel still works
            assert c.tracker.received.all_set(0, 2)
        finally:
            c.close()
    mem.release()
    g.vm.close()
