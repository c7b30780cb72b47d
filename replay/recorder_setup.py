"""Recording a process from its environment: `maybe_record`, `make_header`, `close_all`.

`maybe_record` wraps a kernel in a `replay.recorder.RecordingKernel` writing the trace
``$FAKEKVM_TRACE`` names (see `replay.capture`, `postcopy.migrate`); every recorder it opens
is in the registry ``_ACTIVE`` (one object, also reachable as ``replay.recorder._ACTIVE``)
until `close_all` (registered at exit) or its own ``stop_recording`` closes it.
`make_header` describes the host and the run (``fakekvm doctor`` facts for the real kernel).
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fakekvm.kernel.seam import Kernel
from replay.events import Header, HostInfo
from replay.format import TraceWriter

if TYPE_CHECKING:
    from replay.recorder import RecordingKernel

_ACTIVE: set[RecordingKernel] = set()
_ATEXIT = False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def doctor_facts() -> dict[str, object]:
    """A few ``fakekvm doctor`` facts about this host (probed on a fresh `RealKernel`)."""
    from fakekvm.kernel.real import RealKernel
    from tools import doctor

    facts: dict[str, object] = {}
    k = RealKernel()
    try:
        kf = doctor.probe_kvm(k)
        facts["kvm"] = {
            "present": kf.present,
            "api_version": kf.api_version,
            "error": kf.error,
            "vcpu_mmap_size": kf.vcpu_mmap_size,
            "vm_types": kf.vm_types,
            "guest_memfd_flags": kf.guest_memfd_flag_names,
            "caps": {c.name: c.system for c in kf.caps if c.system},
        }
    except Exception as e:  # a probe must never stop a recording
        facts["kvm"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        uf = doctor.probe_uffd(k)
        facts["uffd"] = {
            "syscall": uf.syscall,
            "dev_usable": uf.dev_usable,
            "unprivileged_userfaultfd": uf.unprivileged_userfaultfd,
            "features": uf.feature_names,
            "register_modes": [
                f"{r.memory}:{r.mode}={'ok' if r.ok else r.error}" for r in uf.register_modes
            ],
        }
    except Exception as e:
        facts["uffd"] = {"error": f"{type(e).__name__}: {e}"}
    facts["running_as_root"] = os.geteuid() == 0
    return facts


def make_header(
    kernel: Kernel,
    *,
    role: str = "",
    argv: Sequence[str] | None = None,
    mechanism: str | None = None,
    guest: str | None = None,
    seed: int | None = None,
    profile: str | None = None,
    with_contents: bool = False,
    doctor: bool | None = None,
) -> Header:
    """A `Header` describing this host and run; ``doctor`` probes the real host (default: when
    ``kernel`` is the real one; a fake is described by its profile)."""
    u = os.uname()
    if doctor is None:
        doctor = kernel.name == "real"
    return Header(
        uuid=str(uuid.uuid4()),
        created=datetime.now(UTC).isoformat(timespec="microseconds"),
        host=HostInfo(
            kernel_release=u.release,
            machine=u.machine,
            cpu_model=_cpu_model(),
            page_size=os.sysconf("SC_PAGE_SIZE"),
            doctor=doctor_facts() if doctor else {},
        ),
        kernel=kernel.name,
        profile=profile,
        mechanism=mechanism,
        guest=guest,
        seed=seed,
        argv=list(argv) if argv is not None else list(sys.argv),
        role=role,
        with_contents=with_contents,
    )


def close_all() -> None:
    """Close every recorder `maybe_record` opened (capture calls it; also run at exit)."""
    for r in list(_ACTIVE):
        try:
            r.stop_recording()
        except Exception as e:  # at exit: say it, never crash
            print(f"fakekvm: closing trace: {e}", file=sys.stderr)


def trace_path(base: str, role: str) -> str:
    """Where role ``role`` writes when ``FAKEKVM_TRACE`` is ``base``."""
    return base + ".source" if role == "source" else base


def maybe_record(
    kernel: Kernel,
    *,
    role: str = "",
    argv: Sequence[str] | None = None,
    mechanism: str | None = None,
    guest: str | None = None,
    seed: int | None = None,
    profile: str | None = None,
) -> Kernel:
    """``kernel`` wrapped in a `RecordingKernel` writing ``$FAKEKVM_TRACE`` (the source role
    writes ``$FAKEKVM_TRACE.source``) when that variable is set, else ``kernel`` itself.

    ``FAKEKVM_TRACE_CONTENTS=1`` records guest memory bytes; ``FAKEKVM_TRACE_ARGV`` (JSON list)
    names the command line captured (default ``sys.argv``); ``FAKEKVM_TRACE_DOCTOR=0`` skips
    the ``fakekvm doctor`` probe of the real host for the header.
    """
    global _ATEXIT
    base = os.environ.get("FAKEKVM_TRACE")
    if not base:
        return kernel
    with_contents = os.environ.get("FAKEKVM_TRACE_CONTENTS", "") not in ("", "0")
    if argv is None and os.environ.get("FAKEKVM_TRACE_ARGV"):
        argv = json.loads(os.environ["FAKEKVM_TRACE_ARGV"])
    doctor = False if os.environ.get("FAKEKVM_TRACE_DOCTOR", "") == "0" else None
    header = make_header(
        kernel,
        doctor=doctor,
        role=role,
        argv=argv,
        mechanism=mechanism,
        guest=guest,
        seed=seed,
        profile=profile,
        with_contents=with_contents,
    )
    writer = TraceWriter(trace_path(base, role), header)
    # looked up on `replay.recorder` when called (the class may be swapped there: the in-situ
    # timing of ``fakekvm bench --recorder`` does it)
    from replay import recorder

    rec = recorder.RecordingKernel(
        kernel, writer, with_contents=with_contents, mechanism=mechanism or ""
    )
    _ACTIVE.add(rec)
    if not _ATEXIT:
        atexit.register(close_all)
        _ATEXIT = True
    return rec
