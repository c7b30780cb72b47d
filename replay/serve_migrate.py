"""``replay --mode serve`` of a post-copy migration trace: the destination engine on `ReplayKernel`.

The recorded ``fakekvm migrate`` command line (``header.argv``) is parsed back into
`postcopy.migrate.MigrateOptions`; then, in this process:

* the **source** is rebuilt on the fake (`FakeKernel`, the recorded profile for a fake trace,
  else the fake's default for the mechanism, as ``verify`` does): the writer guest fills
  memory from the recorded seed, so the source serves the very bytes the recorded source
  did (``replay.verify.replay_command`` relies on the same fact). Its own recording
  (``NAME.trace.source``) is not needed;
* the **destination** is the recorded engine (`postcopy.migrate.make_destination`, same
  options) on a :class:`~replay.serve.ReplayKernel`: no KVM and no fake behind it. The
  ordered calls must match the trace byte for byte; the timing-dependent ones are answered
  by `replay.serve_model` (messages, fills, polls, kicks);
* the verdict is the engine's own (vCPU reports against the source's prediction, memory
  against the source's page digests) plus the serve checks: nothing recorded left undone
  (`ReplayKernel.unfinished`: ordered calls, fill coverage, uffd messages, attributes).

A trace that cannot be served raises :class:`~replay.verify.VerifyError` saying why (no
``migrate`` command line, both sides in one recording, ...).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from replay.events import Call, Event, Header
from replay.serve import ReplayDivergence, ReplayKernel
from replay.verify import VerifyError

__all__ = ["ServeResult", "is_migration", "migrate_options", "serve_migration"]


def is_migration(header: Header) -> bool:
    return "migrate" in header.argv


def migrate_options(header: Header) -> Any:
    """The `MigrateOptions` of the recorded command line (`VerifyError` if it has none)."""
    import argparse

    from tools import migrate as migrate_cmd

    argv = list(header.argv)
    if "migrate" not in argv:
        raise VerifyError(
            f"only `fakekvm migrate` recordings are served this way; this one ran {argv!r}"
        )
    parser = argparse.ArgumentParser(prog="fakekvm", add_help=False, exit_on_error=False)
    sub = parser.add_subparsers()
    migrate_cmd.add_parser(sub)
    try:
        args = parser.parse_args(argv[argv.index("migrate") :])
    except (argparse.ArgumentError, SystemExit) as e:
        raise VerifyError(f"cannot parse the recorded command line {argv!r}: {e}") from None
    o = migrate_cmd.options_from_args(args)
    if getattr(args, "acceptance", False) or getattr(args, "repeat", 1) != 1:
        raise VerifyError("a --acceptance/--repeat recording holds several migrations: not served")
    if o.kernel == "real" and o.same_process:
        raise VerifyError(
            "a --same-process real-kernel recording has source and destination in one trace: "
            "serve needs the destination's calls alone (record without --same-process)"
        )
    if header.role not in ("", "destination"):
        raise VerifyError(f"this is the {header.role} side; serve the destination's trace")
    return o


def source_profile(header: Header, o: Any) -> str:
    """The fake profile the source is rebuilt on."""
    from tools.migrate import DEFAULT_FAKE_PROFILE

    if header.kernel == "fake" and header.profile:
        return header.profile
    return o.profile or DEFAULT_FAKE_PROFILE.get(o.mechanism, "6.18-pvm")


@dataclass
class ServeResult:
    command: list[str]
    calls: int = 0  #: ordered calls matched
    counters: dict[str, int] = field(default_factory=dict)  #: the model's answers
    vcpus: list[str] = field(default_factory=list)  #: one line per vCPU
    notes: list[str] = field(default_factory=list)  #: e.g. the balloon storm's figures
    verdict: str = ""  #: the engine's own check
    divergence: str | None = None  #: the decoded report
    failure: str | None = None  #: the engine failed without a divergence
    unfinished: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.divergence is None and self.failure is None and not self.unfinished

    def report(self) -> str:
        c = self.counters
        lines = [
            f"served: {' '.join(self.command)} (destination on ReplayKernel, source on the fake)"
        ]
        lines += self.vcpus + self.notes
        lines.append(
            f"answered {self.calls} ordered calls from the trace; modelled: "
            f"{c.get('messages', 0)} uffd messages, {c.get('fills', 0)} fills "
            f"({c.get('pages', 0)} pages; {c.get('eexist', 0)} EEXIST, {c.get('eagain', 0)} "
            f"partial EAGAIN), {c.get('wakes', 0)} wakes, {c.get('polls', 0)} polls, "
            f"{c.get('attributes', 0)} attribute changes, {c.get('removes', 0)} REMOVE events"
        )
        if self.verdict:
            lines.append(self.verdict)
        if self.divergence is not None:
            lines.append("DIVERGES")
            lines += ["  " + line for line in self.divergence.splitlines()]
        elif self.failure is not None:
            lines.append(f"FAILED: {self.failure}")
        for u in self.unfinished:
            lines.append(f"NOT DONE: {u}")
        if self.ok:
            lines.append("same as recorded")
        return "\n".join(lines)


def serve_migration(
    header: Header, events: list[Event], *, window: int = 64, patience: float = 30.0
) -> ServeResult:
    """Serve one migration trace (see the module docstring)."""
    from fakekvm.fake import FakeKernel
    from fakekvm.guests import layout
    from postcopy.balloon import BalloonStorm
    from postcopy.migrate import (
        MigrationMismatch,
        _parse_address,
        check_reports,
        make_destination,
        make_source,
        prepare_source,
    )
    from postcopy.pages import page_digests

    o = migrate_options(header)
    calls = [e for e in events if isinstance(e, Call)]
    if not calls:
        raise VerifyError("the trace holds no calls")
    res = ServeResult(list(header.argv))
    rk = ReplayKernel(header, events, window=window, patience=patience)
    tmp = tempfile.TemporaryDirectory(prefix="fakekvm-serve-")
    try:
        src_kernel = FakeKernel(profile=source_profile(header, o))
        g = prepare_source(src_kernel, o.mem_size, o.vcpus, o.workload, o.seed)
    except Exception as e:
        tmp.cleanup()
        raise VerifyError(f"cannot rebuild the source on the fake: {type(e).__name__}: {e}") from e
    mem = g.vm.mem()
    stuck = False
    try:
        digests = page_digests(mem, 0, o.mem_size // layout.PAGE)
        src = make_source(mem, g.states, o)
        addr = src.listen(_parse_address(os.path.join(tmp.name, "source.sock")))
        excluded: list[int] = [0]
        storm = BalloonStorm.for_options(o)  # workload "balloon": the VMM's balloon, recorded too
        if storm is not None:
            dest = make_destination(o, rk, addr, None, digests, excluded, storm)
        else:
            dest = make_destination(o, rk, addr, None, digests, excluded)
        try:
            outcome = _run_watched(dest.run, rk, limit=max(120.0, 4 * patience))
            if outcome is None:  # the engine did not come back: give up on it, report
                stuck = True
                if rk.divergence is None:
                    res.failure = f"the engine did not finish within {max(120.0, 4 * patience):g} s"
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                result = outcome
                for r in result.vcpus:
                    res.vcpus.append(
                        f"vCPU {r.vcpu}: stop={r.stop} exits={r.exits} "
                        f"memory_faults={r.memory_faults} reports={r.reports}"
                        + (f" error={r.error}" if r.error else "")
                    )
                if storm is not None:
                    storm.check()
                    s = storm.stats
                    res.notes.append(
                        f"balloon: {s.rounds} rounds, {s.inflations} madvise, {s.refaults} "
                        f"refaults, {s.ballooned} pages ballooned"
                    )
                check_reports(result, g.expect, o.workload)
                res.verdict = (
                    "engine's verdict: guest reports as the source predicts, memory equal to "
                    f"the source ({excluded[0]} guest-written pages excluded)"
                )
        except MigrationMismatch as e:
            res.failure = f"the engine's check failed: {e}"
        except ReplayDivergence:
            pass  # rk.divergence holds it
        except Exception as e:  # the engine failed: a divergence explains it, if there is one
            res.failure = f"{type(e).__name__}: {e}"
        finally:
            src.close()
    finally:
        if not stuck:  # a stuck engine thread may still touch the live memory: leave it
            mem.release()
            g.vm.close()
            rk.shutdown()
            tmp.cleanup()
    if rk.divergence is not None:
        res.divergence = str(rk.divergence)
        res.failure = None
    elif not stuck:
        res.unfinished = rk.unfinished()
    res.calls = rk.matcher.matched
    res.counters = dict(rk.model.counters)
    return res


def _run_watched(run: Callable[[], Any], rk: ReplayKernel, *, limit: float) -> Any:
    """``run()`` on a thread of its own: its result or exception, or None when it has not
    come back ``rk.patience`` seconds after a divergence (an engine that swallowed the error
    and waits for something the trace will never give) or after ``limit`` seconds in all."""
    from postcopy.guestrun import install_kick_handler

    install_kick_handler()  # the engine's run installs it from the main thread only
    box: list[Any] = []
    done = threading.Event()

    def target() -> None:
        try:
            box.append(run())
        except BaseException as e:
            box.append(e)
        finally:
            done.set()

    th = threading.Thread(target=target, name="serve-destination", daemon=True)
    th.start()
    deadline = time.monotonic() + limit
    while not done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
        if rk.diverged.is_set():
            done.wait(rk.patience)
            break
        if time.monotonic() >= deadline:
            break
    return box[0] if box else None
