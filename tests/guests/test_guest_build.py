"""The committed guest binaries are exactly what their assembler sources say."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakekvm.guests import build, programs

_ok, _why = build.toolchain()
needs_binutils = pytest.mark.skipif(not _ok, reason=_why)


def test_every_source_has_a_committed_binary_and_a_name() -> None:
    stems = {p.stem for p in build.sources()}
    assert stems == set(programs.NAMES)
    for name in programs.NAMES:
        assert (build.SRC_DIR / f"{name}.bin").is_file()
        assert len(programs.program(name)) > 0


@needs_binutils
@pytest.mark.parametrize("name", programs.NAMES)
def test_reassembled_source_equals_committed_bin(name: str) -> None:
    source = build.SRC_DIR / f"{name}.S"
    assert build.assemble(source) == programs.program(name), (
        f"{name}.bin is stale: run python tools/build_guests.py"
    )


@needs_binutils
def test_assemble_rejects_a_source_that_needs_relocation(tmp_path: Path) -> None:
    src = tmp_path / "bad.S"
    src.write_text(".code64\n.text\n movabsq $external_symbol, %rax\n")
    with pytest.raises(RuntimeError, match="relocations"):
        build.assemble(src)


def test_unknown_program_name_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        programs.program("nope")


def test_hello_bytes_carry_the_message() -> None:
    from fakekvm.guests.workloads import HELLO_MESSAGE

    assert HELLO_MESSAGE + b"\0" in programs.program("hello")
