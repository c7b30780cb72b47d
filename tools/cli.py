"""The ``fakekvm`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]

# Each module in tools/ named here provides add_parser(subparsers) and sets a handler.
SUBCOMMANDS = ["doctor", "migrate", "bench"]
SUBCOMMANDS.append("trace")  # fakekvm trace show|stats|diff|plot
SUBCOMMANDS.append("replay_cmd")  # fakekvm replay --mode ...
SUBCOMMANDS.append("capture")  # fakekvm capture -o FILE -- COMMAND
SUBCOMMANDS.append("explore")  # fakekvm explore --seeds 1-500 ...


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fakekvm",
        description="KVM/userfaultfd emulation, post-copy migration and record/replay.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in SUBCOMMANDS:
        importlib.import_module(f"tools.{module}").add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
