"""Capture: run a command with the recorder under its kernel seam (``fakekvm capture``).

`capture` sets ``FAKEKVM_TRACE=FILE`` (and ``FAKEKVM_TRACE_CONTENTS=1`` with contents, and
``FAKEKVM_TRACE_ARGV`` = the command as JSON) and runs the command: in this process when it is a
``fakekvm`` subcommand (``tools.cli.main``), else as a subprocess that inherits the variables.
Every kernel the command makes through `postcopy.migrate.make_kernel` is then wrapped by
`replay.recorder.maybe_record`: a migration's destination writes ``FILE``, its source
``FILE.source`` (a single-process real-kernel run writes only ``FILE``).

Privilege: capture needs exactly what the command needs (``/dev/kvm`` access for
``--kernel real``, and userfaultfd: root, ``vm.unprivileged_userfaultfd=1`` or access to
``/dev/userfaultfd``); it adds nothing but the right to write ``FILE``. With ``--kvm-trace`` it
also reads the kvm tracepoints from a private tracefs instance, which needs root (tracefs is
0700 root:root here), and appends them to ``FILE`` after its end chunk (`replay.kevents`;
into the side file ``FILE.kevents`` instead when ``FILE`` was not closed whole);
``fakekvm trace show`` interleaves them by time.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from replay.events import Call, Contents, Fault, KernelEvent
from replay.format import INCOMPLETE, TraceError, open_trace

__all__ = ["CaptureResult", "TraceSummary", "capture", "summarize"]

ENV_TRACE = "FAKEKVM_TRACE"
ENV_CONTENTS = "FAKEKVM_TRACE_CONTENTS"
ENV_ARGV = "FAKEKVM_TRACE_ARGV"
#: the side file of kernel tracepoint hits (``capture --kvm-trace``)
KEVENTS = ".kevents"


@dataclass
class TraceSummary:
    path: str
    role: str = ""
    complete: bool = False
    stopped_at: str | None = None
    error: str | None = None
    calls: int = 0
    faults: int = 0
    contents: int = 0
    size: int = 0

    @property
    def events(self) -> int:
        return self.calls + self.faults + self.contents

    def line(self) -> str:
        if self.error:
            return f"{self.path}: unreadable: {self.error}"
        per = self.size / self.events if self.events else 0.0
        state = "complete" if self.complete else f"INCOMPLETE ({self.stopped_at})"
        return (
            f"{self.path}: {self.role or 'single'}: {self.calls} calls, {self.faults} faults, "
            f"{self.contents} contents, {self.size} bytes ({per:.1f} B/event), {state}"
        )


@dataclass
class CaptureResult:
    returncode: int
    traces: list[TraceSummary] = field(default_factory=list)
    #: with ``kvm_trace``: where the kernel tracepoint hits went (``FILE``, or the side file
    #: ``FILE.kevents`` when ``FILE`` is not a closed trace)
    kevents_path: str = ""
    #: with ``kvm_trace``: kernel tracepoint hits saved, and the events
    #: this kernel does not have (name -> why)
    kevents: int | None = None
    kevents_skipped: dict[str, str] = field(default_factory=dict)


def summarize(path: str) -> TraceSummary:
    """Count a trace's events (streaming)."""
    s = TraceSummary(path)
    try:
        s.size = os.path.getsize(path)
        with open_trace(path) as r:
            s.role = r.header.role
            for chunk in r.chunks():
                for e in chunk:
                    t = type(e)
                    if t is Call:
                        s.calls += 1
                    elif t is Fault:
                        s.faults += 1
                    elif t is Contents:
                        s.contents += 1
            s.complete, s.stopped_at = r.complete, r.stopped_at
    except (TraceError, OSError) as e:
        s.error = str(e)
    return s


def _is_fakekvm(command: Sequence[str]) -> bool:
    return bool(command) and os.path.basename(command[0]) == "fakekvm"


def capture(
    output: str, command: Sequence[str], *, with_contents: bool = False, kvm_trace: bool = False
) -> CaptureResult:
    """Run ``command`` recorded into ``output`` (and ``output.source``); see the module doc.

    ``kvm_trace``: also read the kernel's kvm tracepoints (`replay.tracefs`) for the command's
    threads and children, written to ``output.kevents`` (needs root: see `tracefs_status`).
    """
    if kvm_trace:
        from replay.tracefs import TracefsSession, tracefs_status

        ok, why = tracefs_status()
        if not ok:
            raise OSError(f"capture --kvm-trace: {why}")
        with TracefsSession() as session:
            result = capture(output, command, with_contents=with_contents)
        result.kevents_path = _keep_kevents(os.path.abspath(output), session.events)
        result.kevents = len(session.events)
        result.kevents_skipped = dict(session.skipped)
        return result
    if not command:
        raise ValueError("capture: no command to run")
    output = os.path.abspath(output)
    for p in (output, output + ".source"):
        for stale in (p, p + INCOMPLETE):
            if os.path.exists(stale):
                os.unlink(stale)
    env = {ENV_TRACE: output, ENV_ARGV: json.dumps(list(command))}
    if with_contents:
        env[ENV_CONTENTS] = "1"
    if _is_fakekvm(command):
        rc = _run_in_process(list(command[1:]), env)
    else:
        full = dict(os.environ)
        full.pop(ENV_CONTENTS, None)
        full.update(env)
        rc = subprocess.run(list(command), env=full, check=False).returncode
    result = CaptureResult(rc)
    for p in (output, output + ".source"):
        for cand in (p, p + INCOMPLETE):
            if os.path.exists(cand):
                result.traces.append(summarize(cand))
    return result


def _run_in_process(argv: list[str], env: dict[str, str]) -> int:
    from replay.recorder import close_all
    from tools.cli import main

    saved = {k: os.environ.get(k) for k in (ENV_TRACE, ENV_CONTENTS, ENV_ARGV)}
    os.environ.pop(ENV_CONTENTS, None)
    os.environ.update(env)
    try:
        try:
            return main(argv)
        except SystemExit as e:  # argparse errors, sys.exit in a subcommand
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        close_all()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _keep_kevents(output: str, kevents: Sequence[KernelEvent]) -> str:
    """Append ``kevents`` to the closed trace ``output``; else (no closed trace: the command
    failed, or was cut off) write them to ``output.kevents``. Returns where they went."""
    from replay.kevents import append_kevents
    from replay.tracefs_merge import save_kevents

    if os.path.exists(output):
        try:
            append_kevents(output, kevents)
            return output
        except (ValueError, OSError):  # (TraceError is a ValueError) not a closed trace
            pass
    save_kevents(output + KEVENTS, kevents)
    return output + KEVENTS
