"""Rebuild the guest binaries: ``python tools/build_guests.py [--check]``.

Assembles every ``fakekvm/guests/src/*.S`` (GNU ``as --64`` + ``objcopy -O
binary``) and writes ``NAME.bin`` beside it.  With ``--check`` it writes
nothing and exits 1 if a committed ``.bin`` differs from its source.

Besides the programs in ``src/`` (loaded by the fakekvm VMM), it builds
``fakekvm/guests/mb_toucher.S``: the multiboot kernel ``tools/bench_qemu.py``
boots in QEMU (kept out of ``src/``: it is not a program of the guest library).
"""

from __future__ import annotations

import argparse
import sys

from fakekvm.guests.build import SRC_DIR, assemble, build_all, toolchain

#: extra guests outside src/: (source, committed binary)
EXTRA = [(SRC_DIR.parent / "mb_toucher.S", SRC_DIR.parent / "mb_toucher.bin")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    args = ap.parse_args(argv)
    ok, reason = toolchain()
    if not ok:
        print(reason, file=sys.stderr)
        return 2
    committed = {p.stem: p.read_bytes() for p in SRC_DIR.glob("*.bin")}
    built = build_all(write=not args.check)
    for src, binary in EXTRA:
        committed[binary.stem] = binary.read_bytes() if binary.is_file() else b""
        built[binary.stem] = data = assemble(src)
        if not args.check:
            binary.write_bytes(data)
    stale = []
    for name, data in built.items():
        same = committed.get(name) == data
        if not same:
            stale.append(name)
        state = "unchanged" if same else ("STALE" if args.check else "rewritten")
        print(f"{name:10s} {len(data):5d} bytes {state}")
    if not args.check:
        return 0
    if stale:
        print(f"stale: {', '.join(stale)} (run tools/build_guests.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
