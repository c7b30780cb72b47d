"""``fakekvm replay --mode verify TRACE``: run the recorded command again on the fake, compare.

The trace's header holds the command that was recorded (``argv``: a ``fakekvm migrate ...``
line). `verify` runs it again with ``--kernel fake`` (the profile: the recorded one for a fake
trace, else the fake's default for the mechanism, which models this host), recorded by
`replay.capture`, then compares the two recordings' canonical streams (`replay.streams`): the
destination's, and the source's when both sides have one. The first divergence is reported with
both calls decoded and the entries that led there.

What "the same" means is `replay.streams`'s business: ordered setup and per-vCPU streams byte
for byte, timing-dependent parts (fault delivery, which pages were demanded) as sets and
coverage. So a real-kernel recording verifies on the fake exactly when the fake gives the
engine the same bytes the real kernel gave it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from replay.format import open_trace
from replay.streams import Divergence, compare_streams, split_streams


class VerifyError(RuntimeError):
    """The trace cannot be verified (no command recorded, the re-run failed, ...)."""


@dataclass
class VerifyResult:
    command: list[str]
    #: role ("destination", "source") -> the first divergence, None when it agrees
    divergences: dict[str, Divergence | None] = field(default_factory=dict)
    replay_paths: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(d is None for d in self.divergences.values())

    def report(self) -> str:
        lines = [f"replayed: {' '.join(self.command)}"]
        for role, d in self.divergences.items():
            lines.append(f"{role}: " + ("same calls, same bytes" if d is None else "DIVERGES"))
            if d is not None:
                lines += ["  " + line for line in d.report().splitlines()]
        return "\n".join(lines)


def replay_command(argv: Sequence[str], profile: str | None) -> list[str]:
    """The recorded ``fakekvm migrate`` command, made to run on the fake."""
    args = list(argv)
    try:
        i = args.index("migrate")
    except ValueError:
        raise VerifyError(
            f"only `fakekvm migrate` recordings can be re-run; this one ran {args!r}"
        ) from None
    out = ["fakekvm", *args[i:]]
    if "--kernel" in out:
        j = out.index("--kernel")
        out[j + 1 : j + 2] = ["fake"]
    else:
        out += ["--kernel", "fake"]
    if profile and "--profile" not in out:
        out += ["--profile", profile]
    return out


def verify(
    path: str,
    *,
    workdir: str | None = None,
    run: Callable[[str, list[str]], int] | None = None,
) -> VerifyResult:
    """Re-run the command recorded in ``path`` on the fake and compare (see the module doc).

    ``run(output, command) -> exit status`` records ``command`` into ``output`` (default:
    `replay.capture.capture`); tests pass one that changes the engine on purpose.
    """
    with open_trace(path) as r:
        header = r.header
    if not header.argv:
        raise VerifyError(
            f"{path}: the header records no command line (only `fakekvm migrate` recordings can be re-run)"
        )
    command = replay_command(header.argv, header.profile if header.kernel != "real" else None)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fakekvm-verify-")
        workdir = tmp.name
    out = os.path.join(workdir, "replay.trace")
    if run is None:
        from replay.capture import capture

        def run(o: str, c: list[str]) -> int:
            return capture(o, c).returncode

    rc = run(out, command)
    if rc != 0:
        raise VerifyError(f"the replayed command failed (exit status {rc}): {' '.join(command)}")
    res = VerifyResult(command)
    for role, recorded, replayed in (
        ("destination", path, out),
        ("source", path + ".source", out + ".source"),
    ):
        if not os.path.exists(recorded):
            continue
        if not os.path.exists(replayed):
            raise VerifyError(f"the replay wrote no {role} trace ({replayed})")
        with open_trace(recorded) as a, open_trace(replayed) as b:
            res.divergences[role] = compare_streams(split_streams(a), split_streams(b))
        res.replay_paths[role] = replayed
    if tmp is not None:
        tmp.cleanup()
    return res
