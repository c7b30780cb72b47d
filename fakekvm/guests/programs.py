"""The committed guest binaries, loaded with :mod:`importlib.resources`.

Each name is a ``src/NAME.S`` assembler source whose bytes are committed as
``src/NAME.bin`` (rebuilt by ``tools/build_guests.py``; a test checks that they
agree).  See each source's header for what the program does and which
registers carry its parameters.
"""

from __future__ import annotations

import functools
from importlib import resources

NAMES = ("hello", "toucher", "writer", "verifier", "echo")


@functools.cache
def program(name: str) -> bytes:
    """The flat code bytes of guest program ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise KeyError(f"no guest program {name!r}; have {', '.join(NAMES)}")
    return resources.files("fakekvm.guests").joinpath("src", f"{name}.bin").read_bytes()
