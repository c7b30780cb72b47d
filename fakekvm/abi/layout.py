"""``offsetof`` and field lists for the construct structs of :mod:`fakekvm.abi`.

Walks a fixed-size construct definition (``Struct``, ``Union``, ``Padded``,
``Array``, scalar and ``Bytes`` fields) and lists every named member as
``(path, offset, size)``, aggregates and leaves alike, the way C's
``offsetof(T, a.b.c)`` and ``sizeof(((T *)0)->a.b.c)`` see them.

Anonymous C unions are named ``u`` in :mod:`fakekvm.abi` (see
:data:`ANONYMOUS`); :func:`c_path` drops them, so ``u.io.port`` in
``kvm_run`` is C's ``io.port``. :func:`offsetof` accepts either spelling.
Used by the layout tests and the generated C comparison program.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from construct import Array, Construct, Padded, Renamed, Struct, Union

#: member names that stand for anonymous C unions/structs
ANONYMOUS = frozenset({"u"})


class Field(NamedTuple):
    path: str  # dotted construct path ("u.io.port")
    offset: int
    size: int

    @property
    def c_path(self) -> str:
        return c_path(self.path)


def c_path(path: str) -> str:
    """The C member designator for a construct path (anonymous parts dropped)."""
    return ".".join(p for p in path.split(".") if p not in ANONYMOUS)


def _unwrap(sc: Construct) -> Construct:
    while isinstance(sc, Renamed):
        sc = sc.subcon
    return sc


def _walk(sc: Construct, prefix: str, base: int, out: list[Field]) -> None:
    sc = _unwrap(sc)
    if isinstance(sc, Padded):
        _walk(sc.subcon, prefix, base, out)
        return
    if isinstance(sc, Struct):
        off = base
        for sub in sc.subcons:
            size = sub.sizeof()
            if sub.name:
                path = f"{prefix}{sub.name}"
                out.append(Field(path, off, size))
                _walk(sub, path + ".", off, out)
            off += size
        return
    if isinstance(sc, Union):
        for sub in sc.subcons:
            if not sub.name:
                continue
            path = f"{prefix}{sub.name}"
            out.append(Field(path, base, _unwrap(sub).sizeof()))
            _walk(sub, path + ".", base, out)
        return
    if isinstance(sc, Array):
        return  # arrays are leaves (no array of structs in the uAPI we model)
    # scalars, Bytes: leaves


@functools.cache
def _fields(struct: Construct) -> tuple[Field, ...]:
    out: list[Field] = []
    _walk(struct, "", 0, out)
    return tuple(out)


def fields(struct: Construct) -> list[Field]:
    """Every named member of ``struct`` as ``Field(path, offset, size)``, in order."""
    return list(_fields(struct))


def c_fields(struct: Construct) -> list[Field]:
    """Like :func:`fields`, with C paths and without the anonymous aggregates."""
    return [
        Field(f.c_path, f.offset, f.size)
        for f in _fields(struct)
        if f.path.rsplit(".", 1)[-1] not in ANONYMOUS
    ]


@functools.cache
def _index(struct: Construct) -> dict[str, Field]:
    idx: dict[str, Field] = {}
    for f in _fields(struct):
        idx.setdefault(f.path, f)
    for f in _fields(struct):
        idx.setdefault(f.c_path, f)
    return idx


def field(struct: Construct, path: str) -> Field:
    """The member at ``path`` (construct or C spelling); KeyError if absent."""
    try:
        return _index(struct)[path]
    except KeyError:
        raise KeyError(f"no member {path!r}") from None


def offsetof(struct: Construct, path: str) -> int:
    """C ``offsetof(struct, path)``; ``path`` is dotted (``"s.regs.regs.rip"``)."""
    return field(struct, path).offset


def sizeof(struct: Construct, path: str | None = None) -> int:
    """``sizeof(struct)``, or of the member at ``path``."""
    return struct.sizeof() if path is None else field(struct, path).size
