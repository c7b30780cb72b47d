"""The destination's wait for the source process: a pipe closed without a word is an error at
once, not a busy loop (wait() reports a closed pipe ready for ever)."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

from postcopy.migrate import _recv


class _LiveProcess:
    """A source process that is still alive: its sentinel never becomes ready."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        self.sentinel = self._r
        self.exitcode: int | None = None
        self.joined: list[float | None] = []

    def join(self, timeout: float | None = None) -> None:
        self.joined.append(timeout)

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def test_a_closed_pipe_fails_instead_of_spinning() -> None:
    parent, child = mp.Pipe()
    child.close()  # the source closed its end and sent nothing
    proc = _LiveProcess()
    out: list[BaseException] = []

    def waiter() -> None:
        try:
            _recv(parent, proc)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=waiter, daemon=True)  # a regression spins: fail, don't hang
    try:
        t.start()
        t.join(30)
        assert not t.is_alive(), "_recv is still waiting on a closed pipe"
        assert len(out) == 1 and isinstance(out[0], RuntimeError)
        assert "closed its pipe without a word" in str(out[0])
        assert proc.joined == [5]  # it gave the process a moment to exit, once
    finally:
        proc.close()
        parent.close()


def test_a_message_is_received() -> None:
    parent, child = mp.Pipe()
    child.send(("ready", 1))
    proc = _LiveProcess()
    try:
        assert _recv(parent, proc) == ("ready", 1)
    finally:
        proc.close()
        parent.close()
        child.close()
