"""The kernel's own kvm tracepoints, read from tracefs and joined to a capture.

This module is the front door: every public name of the five modules below is importable
from here (``from replay.tracefs import TracefsSession, merge``), which is how outside
callers and the docs name them.

* `replay.tracefs_format`: format files (``events/SYSTEM/EVENT/format``, Documentation/trace/
  events.rst) and `Decoder`, records decoded by those files only;
* `replay.tracefs_ring`: ring-buffer pages of ``per_cpu/cpuN/trace_pipe_raw``
  (kernel/trace/ring_buffer.c, libtraceevent ``kbuffer-parse.c``);
* `replay.tracefs_access`: finding tracefs, the privilege a session needs (`tracefs_status`),
  stale instances;
* `replay.tracefs_session`: `TracefsSession`, a private instance (Documentation/trace/
  ftrace.rst §"Instances") tracing this process's threads on the ``mono`` clock;
* `replay.tracefs_merge`: `merge` into a recorded stream, and the ``FILE.kevents`` side file.

On this host (6.18, kvm-pvm) ``kvm_userspace_exit`` fires once per ``KVM_RUN`` return (its
``reason`` is ``kvm_run.exit_reason``, ``errno`` the negative errno of a failed run),
``kvm_pio`` once per port-I/O exit, ``kvm_mmio`` twice per MMIO read exit (``type`` 0
"unsatisfied read" at the exit, 1 "read" when the data is taken on re-entry); PVM never fires
``kvm_exit``, ``kvm_entry`` or ``kvm_page_fault`` (VMX/SVM exit-handler tracepoints); its
shadow-MMU work shows in ``kvmmmu:*``.
"""

from __future__ import annotations

from replay.tracefs_access import (
    DEFAULT_EVENTS,
    INSTANCE_PREFIX,
    TRACEFS_PATHS,
    TracefsError,
    find_tracefs,
    remove_stale_instances,
    tracefs_status,
)
from replay.tracefs_format import Decoder, EventFormat, FieldFormat, parse_format
from replay.tracefs_merge import KEVENTS_MAGIC, load_kevents, merge, save_kevents
from replay.tracefs_ring import (
    COMMIT_MASK,
    DEFAULT_LAYOUT,
    RB_MISSED_EVENTS,
    RB_MISSED_STORED,
    TS_MSB,
    TS_SHIFT,
    TYPE_DATA_MAX,
    TYPE_PADDING,
    TYPE_TIME_EXTEND,
    TYPE_TIME_STAMP,
    Page,
    PageLayout,
    parse_header_page,
    parse_page,
)
from replay.tracefs_session import TracefsSession

__all__ = [
    "COMMIT_MASK",
    "DEFAULT_EVENTS",
    "DEFAULT_LAYOUT",
    "INSTANCE_PREFIX",
    "KEVENTS_MAGIC",
    "RB_MISSED_EVENTS",
    "RB_MISSED_STORED",
    "TRACEFS_PATHS",
    "TS_MSB",
    "TS_SHIFT",
    "TYPE_DATA_MAX",
    "TYPE_PADDING",
    "TYPE_TIME_EXTEND",
    "TYPE_TIME_STAMP",
    "Decoder",
    "EventFormat",
    "FieldFormat",
    "Page",
    "PageLayout",
    "TracefsError",
    "TracefsSession",
    "find_tracefs",
    "load_kevents",
    "merge",
    "parse_format",
    "parse_header_page",
    "parse_page",
    "remove_stale_instances",
    "save_kevents",
    "tracefs_status",
]
