"""``fakekvm capture``: run a command with the recorder under its kernel seam.

    fakekvm capture -o FILE [--with-contents] [--kvm-trace] -- fakekvm migrate --kernel real ...

The command after ``--`` runs with ``FAKEKVM_TRACE=FILE`` set (in this process when it is a
``fakekvm`` subcommand, else as a subprocess); a migration's destination writes ``FILE`` and its
source ``FILE.source``. Guest memory bytes are recorded only with ``--with-contents``.
Capture needs the privileges the command needs and no more (see `replay.capture`). Exit
status: the command's, or 2 when no trace was written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from replay.capture import capture


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "capture",
        help="record every kernel call (and the faults) of a command into a trace",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-o", "--output", required=True, help="the trace file to write")
    p.add_argument(
        "--with-contents", action="store_true", help="also record guest memory bytes (private!)"
    )
    p.add_argument(
        "--kvm-trace", action="store_true",
        help="also record the kernel's kvm tracepoints into FILE, after its events (root)",
    )  # fmt: skip
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(
            "fakekvm capture: no command given (fakekvm capture -o FILE -- COMMAND ...)",
            file=sys.stderr,
        )
        return 2
    try:
        result = capture(args.output, command, with_contents=args.with_contents,
                         kvm_trace=args.kvm_trace)  # fmt: skip
    except OSError as e:
        print(f"fakekvm {e}", file=sys.stderr)
        return 2
    for t in result.traces:
        print(f"fakekvm capture: {t.line()}", file=sys.stderr)
    if result.kevents is not None:
        missing = ", ".join(sorted(result.kevents_skipped)) or "none"
        print(f"fakekvm capture: {result.kevents_path}: {result.kevents} kvm tracepoint hits "
              f"(not on this kernel: {missing})", file=sys.stderr)  # fmt: skip
    if not result.traces:
        print(
            f"fakekvm capture: the command wrote no trace (it made no kernel through the "
            f"recorder seam); exit status {result.returncode}",
            file=sys.stderr,
        )
        return result.returncode or 2
    return result.returncode
