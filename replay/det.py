"""Deterministic runs from traces: ``replay --check-determinism`` and ``fakekvm explore``.

A trace names a migration (its header's command line, or, for a trace `explore` wrote, the
exact deterministic configuration in ``header.extra["deterministic"]``: options, seed, network,
fault-injection knobs, and the failure that seed produced). `det_config` turns either into
arguments for `postcopy.detmigrate.migrate_deterministic`:

* `check_trace_determinism` runs it ``n`` times and requires the same outcome every time: the
  same event-log and memory digests, or the same failure (a failing seed reproduces);
* `explore_seeds` runs one configuration under many seeds with the fake's injection knobs and
  writes, for every failing seed, a trace recorded *during a rerun of that seed* (the
  destination's calls, the faults, and the configuration): ``fakekvm replay --check-determinism
  TRACE`` then reproduces the failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from postcopy.detmigrate import DetMigrationResult, NetOptions, migrate_deterministic
from postcopy.migrate import MigrateOptions
from replay.events import Header
from replay.format import open_trace

#: the MigrateOptions fields a deterministic configuration keeps
_OPTION_FIELDS = ("kernel", "profile", "mechanism", "mem_size", "vcpus", "workload", "seed",
                  "huge", "fault_threads", "batch_pages", "balloon_rounds",
                  "balloon_pages")  # fmt: skip


@dataclass
class DetConfig:
    options: MigrateOptions
    seed: int
    net: NetOptions = field(default_factory=NetOptions)
    inject: dict[str, int] = field(default_factory=dict)
    #: the failure this seed produced when the trace was written (None: it passed)
    failure: str | None = None

    def as_extra(self) -> dict[str, Any]:
        return {
            "options": {f: getattr(self.options, f) for f in _OPTION_FIELDS},
            "seed": self.seed,
            "net": dataclasses.asdict(self.net),
            "inject": dict(self.inject),
            "failure": self.failure,
        }


def options_from_command(argv: Sequence[str]) -> MigrateOptions:
    """`MigrateOptions` for a recorded ``fakekvm migrate`` command line, on the fake."""
    from tools.migrate import add_parser as add_migrate
    from tools.migrate import options_from_args

    args = list(argv)
    if "migrate" not in args:
        raise ValueError(f"not a `fakekvm migrate` command: {' '.join(args)}")
    args = args[args.index("migrate") + 1 :]
    ap = argparse.ArgumentParser(prog="fakekvm")
    add_migrate(ap.add_subparsers())
    a = ap.parse_args(["migrate", *args])
    if a.kernel != "fake":  # a real-kernel recording replays on the fake profile for it
        a.kernel, a.profile = "fake", None
    return options_from_args(a)


def det_config(header: Header, seed: int | None = None) -> DetConfig:
    """The deterministic run a trace describes (``seed`` overrides the recorded one)."""
    d = header.extra.get("deterministic") if header.extra else None
    if isinstance(d, dict):
        o = MigrateOptions(**{k: v for k, v in d["options"].items() if k in _OPTION_FIELDS})
        return DetConfig(o, d["seed"] if seed is None else seed, NetOptions(**d["net"]),
                         dict(d["inject"]), d.get("failure") if seed is None else None)  # fmt: skip
    if not header.argv:
        raise ValueError("the trace records no command and no deterministic configuration")
    o = options_from_command(header.argv)
    return DetConfig(o, seed if seed is not None else (header.seed or 0))


@dataclass
class Outcome:
    """One deterministic run: its digests, or its failure."""

    event_digest: str = ""
    memory_digest: str = ""
    failure: str | None = None

    def key(self) -> tuple[str, str, str | None]:
        return (self.event_digest, self.memory_digest, self.failure)

    def line(self) -> str:
        if self.failure is not None:
            return f"failed: {self.failure}"
        return f"events {self.event_digest} memory {self.memory_digest}"


def run_once(c: DetConfig, *, record: Any = None) -> tuple[Outcome, DetMigrationResult | None]:
    try:
        r = migrate_deterministic(
            c.options, c.seed, net=c.net, inject=c.inject or None, record=record
        )
    except Exception as e:  # a failing seed is an outcome, not an error of this tool
        return Outcome(failure=f"{type(e).__name__}: {e}"), None
    return Outcome(r.event_digest, r.memory_digest), r


class NotDeterministic(AssertionError):
    pass


def check_trace_determinism(path: str, n: int = 20, *, seed: int | None = None) -> list[Outcome]:
    """Run the trace's configuration ``n`` times; every outcome must be the same (and, for a
    trace of a failing seed, that failure). Raises `NotDeterministic` naming the first run
    that differs."""
    with open_trace(path) as r:
        c = det_config(r.header, seed)
    outs: list[Outcome] = []
    for i in range(n):
        o, _ = run_once(c)
        if outs and o.key() != outs[0].key():
            raise NotDeterministic(f"seed {c.seed}: run {i} differs from run 0:\n"
                                   f"  run 0: {outs[0].line()}\n  run {i}: {o.line()}")  # fmt: skip
        if c.failure is not None and o.failure != c.failure:
            raise NotDeterministic(f"seed {c.seed}: the recorded failure did not reproduce:\n"
                                   f"  recorded: {c.failure}\n  run {i}: {o.line()}")  # fmt: skip
        outs.append(o)
    return outs


def parse_seeds(text: str) -> list[int]:
    """``1-500``, ``7``, ``1,5,9-12``."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


@dataclass
class Explored:
    seed: int
    outcome: Outcome
    trace: str | None = None
    #: the rerun recorded into ``trace`` failed the same way
    recorded_same: bool = True


def explore_seeds(
    base: DetConfig, seeds: Iterable[int], out_dir: str, *, argv: Sequence[str] = ()
) -> list[Explored]:
    """Run ``base`` under each seed; record a trace for each failing one (see the module doc)."""
    from replay.format import TraceWriter
    from replay.recorder import RecordingKernel, make_header

    res: list[Explored] = []
    os.makedirs(out_dir, exist_ok=True)
    for seed in seeds:
        c = dataclasses.replace(base, seed=seed, failure=None)
        o, _ = run_once(c)
        e = Explored(seed, o)
        if o.failure is not None:
            c.failure = o.failure
            path = os.path.join(out_dir, f"seed-{seed}.trace")

            def record(k: Any, c: DetConfig = c, path: str = path) -> Any:
                h = make_header(k, role="destination", argv=list(argv), mechanism=c.options.mechanism,
                                guest=c.options.workload, seed=c.seed, profile=c.options.profile,
                                doctor=False)  # fmt: skip
                h.extra["deterministic"] = c.as_extra()
                return RecordingKernel(k, TraceWriter(path, h), mechanism=c.options.mechanism)

            again, _ = run_once(c, record=record)
            # the recorder's own locks are scheduling points too, so the recorded rerun may
            # interleave differently; the trace's configuration reproduces the unrecorded run
            e.recorded_same = again.failure == o.failure
            e.trace = path
        res.append(e)
    return res


def record_deterministic(
    path: str, options: MigrateOptions, seed: int, net: NetOptions | None = None
) -> DetMigrationResult:
    """Record the destination of a deterministic migration into ``path``.

    A slow simulated link (``net``) makes demand faults certain, whatever the host's speed:
    what tests that need a trace *with* faults use (a real-time fake migration may deliver every
    page in the background before the guest touches one).
    """
    from replay.format import TraceWriter
    from replay.recorder import RecordingKernel, make_header

    c = DetConfig(options, seed, net or NetOptions())

    def record(k: Any) -> Any:
        h = make_header(k, role="destination", argv=["fakekvm", "migrate", "--kernel", "fake"],
                        mechanism=options.mechanism, guest=options.workload, seed=seed,
                        profile=options.profile, doctor=False)  # fmt: skip
        h.extra["deterministic"] = c.as_extra()
        return RecordingKernel(k, TraceWriter(path, h), mechanism=options.mechanism)

    return migrate_deterministic(options, seed, net=c.net, record=record)
