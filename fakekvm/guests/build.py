"""Rebuild the guest programs: GNU ``as`` + ``objcopy`` over ``src/*.S``.

Each ``src/NAME.S`` is assembled with ``as --64`` (16-bit sources say
``.code16`` themselves) and its ``.text`` section dumped with
``objcopy -O binary``; the result is committed as ``src/NAME.bin`` and is what
:mod:`fakekvm.guests.programs` loads.  The sources are written so that the
object has no relocations (addresses are assemble-time constants or
RIP-relative), which :func:`assemble` checks, so no linker is needed.

Used by ``tools/build_guests.py`` and by the test that proves the committed
bytes are what the sources say.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

SRC_DIR = Path(__file__).with_name("src")


def toolchain() -> tuple[bool, str]:
    """Are ``as``, ``objcopy`` and ``objdump`` on PATH? Returns (ok, reason)."""
    missing = [t for t in ("as", "objcopy", "objdump") if shutil.which(t) is None]
    if missing:
        return False, f"binutils missing: {', '.join(missing)} not on PATH"
    return True, "binutils found"


def sources(src_dir: Path = SRC_DIR) -> list[Path]:
    """Every assembler source, sorted by name."""
    return sorted(src_dir.glob("*.S"))


def assemble(source: Path) -> bytes:
    """Assemble ``source`` and return its flat ``.text`` bytes.

    Raises ``RuntimeError`` with the tool's message on failure or when the
    object would need relocating.
    """
    with tempfile.TemporaryDirectory(prefix="fakekvm-guest-") as tmp:
        obj = Path(tmp) / (source.stem + ".o")
        out = Path(tmp) / (source.stem + ".bin")
        _run(["as", "--64", "-I", str(source.parent), "-o", str(obj), str(source)])
        relocs = _run(["objdump", "-r", str(obj)])
        if "R_X86_64" in relocs or "R_386" in relocs:
            raise RuntimeError(f"{source.name}: object has relocations:\n{relocs}")
        _run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)])
        return out.read_bytes()


def build_all(src_dir: Path = SRC_DIR, *, write: bool = True) -> dict[str, bytes]:
    """Assemble every source; with ``write`` store ``NAME.bin`` beside it."""
    built: dict[str, bytes] = {}
    for source in sources(src_dir):
        data = assemble(source)
        built[source.stem] = data
        if write:
            source.with_suffix(".bin").write_bytes(data)
    return built


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout
