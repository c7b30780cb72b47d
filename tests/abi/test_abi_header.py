"""The header proof: fakekvm.abi against the installed <linux/kvm.h> and <linux/userfaultfd.h>.

A C program is generated from our own definitions (``layout.c_fields`` for
every struct, every int constant and ioctl of kvm.py/uffd.py behind an
``#ifdef NAME`` guard), compiled with ``cc`` against /usr/include (Linux 6.1
headers on this host) and run; every line it prints is compared with
fakekvm.abi. Zero mismatches are allowed.

What 6.1 does not have is listed explicitly below (structs, members, values
that changed), and the lists are themselves checked against the header's
``cc -E -dM`` macro set and text, so nothing is skipped silently. Newer things
are proven on the live kernel (test_abi_live.py) and against uapi.md
(test_abi_values.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fakekvm.abi import kvm, layout, uffd

pytestmark = pytest.mark.needs_cc

HEADERS = ("linux/kvm.h", "linux/userfaultfd.h")

#: structs fakekvm defines that the 6.1 headers do not have
NEW_STRUCTS = {
    "kvm_userspace_memory_region2",  # 6.8
    "kvm_create_guest_memfd",  # 6.8
    "kvm_memory_attributes",  # 6.8
    "kvm_pre_fault_memory",  # 6.10
    "uffdio_poison",  # 6.6
    "uffdio_move",  # 6.8
}
#: members of 6.1 structs that 6.1 does not have (struct, C path prefix)
NEW_MEMBERS = {
    ("kvm_run", "memory_fault"),  # 6.8
    ("kvm_run", "hypercall.flags"),  # 6.10: union { __u32 longmode; __u64 flags; }
}
#: ioctls newer than 6.1
NEW_IOCTLS = {
    "KVM_SET_USER_MEMORY_REGION2",
    "KVM_SET_MEMORY_ATTRIBUTES",
    "KVM_CREATE_GUEST_MEMFD",
    "KVM_PRE_FAULT_MEMORY",
    "UFFDIO_MOVE",
    "UFFDIO_POISON",
}
#: constants whose VALUE grew after 6.1: checked as a superset of 6.1's bits here,
#: and exactly against uapi.md in test_abi_values.py
CHANGED_SINCE_61 = {"UFFD_API_FEATURES", "UFFD_API_RANGE_IOCTLS", "UFFD_API_RANGE_IOCTLS_BASIC"}
#: enum constants (not macros, so no #ifdef): printed unguarded
ENUM_CONSTANTS = [n for n in vars(kvm) if n.startswith("kvm_ioeventfd_flag_nr_")]

#: names of ours in these families that 6.1 lacks; anything else missing is a typo
NEWER_NAMES = {
    # caps 224..249
    *[n for n, v in kvm.KVM_CAPS.items() if v >= 224],
    # exits 38..43
    *[n for n, v in kvm.KVM_EXITS.items() if v >= 38],
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "GUEST_MEMFD_FLAG_MMAP",
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "KVM_X86_DEFAULT_VM",
    "KVM_X86_SW_PROTECTED_VM",
    "KVM_X86_SEV_VM",
    "KVM_X86_SEV_ES_VM",
    "KVM_X86_SNP_VM",
    "KVM_X86_TDX_VM",
    "KVM_RUN_X86_GUEST_MODE",
    "KVM_SYSTEM_EVENT_TDX_FATAL",
    "UFFD_FEATURE_WP_UNPOPULATED",
    "UFFD_FEATURE_POISON",
    "UFFD_FEATURE_WP_ASYNC",
    "UFFD_FEATURE_MOVE",
    "_UFFDIO_MOVE",
    "_UFFDIO_POISON",
    "UFFDIO_CONTINUE_MODE_WP",
    "UFFDIO_POISON_MODE_DONTWAKE",
    "UFFDIO_MOVE_MODE_DONTWAKE",
    "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES",
    *NEW_IOCTLS,
}
#: the families checked for typos (a name of ours with this prefix must be in 6.1 or NEWER_NAMES)
CHECKED_PREFIXES = (
    "KVM_CAP_",
    "KVM_EXIT_",
    "KVM_MEM_",
    "KVM_MEMORY_",
    "GUEST_MEMFD_",
    "KVM_X86_",
    "KVM_RUN_X86_",
    "KVM_SYSTEM_EVENT_",
    "KVM_INTERNAL_ERROR_",
    "KVM_SYNC_X86_",
    "KVM_IRQFD_",
    "KVM_IOEVENTFD_",
    "KVM_DIRTY_LOG_",
    "KVM_MP_STATE_",
    "KVM_GUESTDBG_",
    "KVM_VCPUEVENT_",
    "KVM_MSR_EXIT_",
    "UFFD_FEATURE_",
    "UFFD_EVENT_",
    "UFFD_PAGEFAULT_",
    "UFFD_API",
    "UFFD_USER_",
    "UFFDIO",
    "_UFFDIO_",
    "USERFAULTFD_",
)


def _int_constants() -> dict[str, int]:
    out: dict[str, int] = {}
    for mod in (kvm, uffd):
        for n, v in vars(mod).items():
            if isinstance(v, int) and not isinstance(v, bool) and (n.isupper() or n.startswith("_UFFDIO")):
                if n.startswith("SIZEOF_"):
                    continue
                out[n] = v
    return out


def _structs() -> dict[str, object]:
    return {**kvm.KVM_STRUCTS, **uffd.UFFD_STRUCTS}


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        *[f"#include <{h}>" for h in HEADERS],
        "int main(void) {",
    ]
    for sname, s in _structs().items():
        if sname in NEW_STRUCTS:
            continue
        lines.append(f'  printf("S {sname} %zu\\n", sizeof(struct {sname}));')
        for f in layout.c_fields(s):
            if any(sname == ns and (f.path == p or f.path.startswith(p + ".")) for ns, p in NEW_MEMBERS):
                continue
            lines.append(
                f'  printf("F {sname} {f.path} %zu %zu\\n", offsetof(struct {sname}, {f.path}), '
                f"sizeof(((struct {sname} *)0)->{f.path}));"
            )
    for n in _int_constants():
        lines += [f"#ifdef {n}", f'  printf("C {n} %llu\\n", (unsigned long long)({n}));', "#endif"]
    for n in ENUM_CONSTANTS:
        lines.append(f'  printf("C {n} %llu\\n", (unsigned long long)({n}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def cc() -> str:
    c = shutil.which("cc") or shutil.which("gcc")
    if c is None:
        pytest.skip("no C compiler")
    return c


@pytest.fixture(scope="module")
def header_macros(cc: str) -> dict[str, str]:
    src = "".join(f"#include <{h}>\n" for h in HEADERS)
    out = subprocess.run([cc, "-E", "-dM", "-"], input=src, capture_output=True, text=True, check=True).stdout
    macros: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"#define (\w+)(?:\s+(.*))?$", line)
        if m:
            macros[m.group(1)] = m.group(2) or ""
    return macros


@pytest.fixture(scope="module")
def header_text() -> str:
    texts = []
    for h in (*HEADERS, "asm/kvm.h"):
        for root in ("/usr/include", "/usr/include/x86_64-linux-gnu"):
            p = Path(root) / h
            if p.exists():
                texts.append(p.read_text())
                break
    return "\n".join(texts)


@pytest.fixture(scope="module")
def c_output(cc: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("abi_c")
    (d / "abi.c").write_text(_c_program())
    r = subprocess.run([cc, "-O0", "-o", str(d / "abi"), str(d / "abi.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[:4000]
    return subprocess.run([str(d / "abi")], capture_output=True, text=True, check=True).stdout.splitlines()


def test_header_is_6_1(header_macros: dict[str, str]) -> None:
    # The proof's scope: this host's headers are 6.1 (uapi.md §0); re-check if they change.
    assert "KVM_SET_USER_MEMORY_REGION2" not in header_macros
    assert "KVM_SET_USER_MEMORY_REGION" in header_macros


def test_zero_mismatches_against_the_6_1_headers(c_output: list[str]) -> None:
    structs = _structs()
    consts = _int_constants()
    mismatches: list[str] = []
    counts = {"S": 0, "F": 0, "C": 0}
    for line in c_output:
        kind, *rest = line.split()
        counts[kind] += 1
        if kind == "S":
            sname, size = rest
            if structs[sname].sizeof() != int(size):  # type: ignore[attr-defined]
                mismatches.append(line)
        elif kind == "F":
            sname, path, off, size = rest
            f = layout.field(structs[sname], path)
            if (f.offset, f.size) != (int(off), int(size)):
                mismatches.append(f"{line} (ours {f.offset} {f.size})")
        else:
            n, v = rest
            ours = consts.get(n, vars(kvm).get(n))
            if n in CHANGED_SINCE_61:
                if int(v) & ~ours:  # type: ignore[operator]
                    mismatches.append(f"{line}: not a subset of ours {ours:#x}")
            elif ours != int(v):
                mismatches.append(f"{line} (ours {ours})")
    assert mismatches == []
    total = sum(counts.values())
    print(f"header checks: {total} ({counts}), mismatches: {len(mismatches)}")
    assert counts["S"] == len(structs) - len(NEW_STRUCTS)
    assert counts["F"] >= 400
    assert counts["C"] >= 400


def test_every_6_1_struct_we_define_was_compared(c_output: list[str], header_text: str) -> None:
    compared = {line.split()[1] for line in c_output if line.startswith("S ")}
    for sname in _structs():
        in_61 = re.search(rf"\bstruct {sname}\s*\{{", header_text) is not None
        if sname in NEW_STRUCTS:
            assert not in_61, f"{sname} is in 6.1: drop it from NEW_STRUCTS"
        else:
            assert in_61, f"{sname} not in the 6.1 headers: typo, or add to NEW_STRUCTS"
            assert sname in compared
    # every member of every compared struct was printed, except the listed newer ones
    printed = {(line.split()[1], line.split()[2]) for line in c_output if line.startswith("F ")}
    for sname in compared:
        for f in layout.c_fields(_structs()[sname]):
            newer = any(sname == ns and (f.path == p or f.path.startswith(p + ".")) for ns, p in NEW_MEMBERS)
            assert ((sname, f.path) in printed) != newer, (sname, f.path)


def test_every_6_1_ioctl_we_define_was_compared(c_output: list[str], header_macros: dict[str, str]) -> None:
    compared = {line.split()[1] for line in c_output if line.startswith("C ")}
    header_ioctls = {n for n, body in header_macros.items() if re.match(r"_IO(R|W|WR)?\(", body)}
    ours = {**kvm.KVM_IOCTLS, **uffd.UFFD_IOCTLS}
    not_in_61 = set(ours) - header_ioctls
    assert not_in_61 == NEW_IOCTLS
    used_and_in_61 = set(ours) & header_ioctls
    assert used_and_in_61 <= compared
    assert len(used_and_in_61) == len(ours) - len(NEW_IOCTLS) >= 100
    # and every x86/generic ioctl 6.1 defines that fakekvm names is among them
    for must in ("KVM_RUN", "KVM_GET_REGS", "KVM_SET_SREGS", "KVM_IRQFD", "KVM_GET_DIRTY_LOG", "UFFDIO_CONTINUE"):
        assert must in compared


def test_no_typos_and_full_families(header_macros: dict[str, str]) -> None:
    consts = _int_constants()
    missing_in_61 = {
        n for n in consts if n.startswith(CHECKED_PREFIXES) and n not in header_macros
    } - set(kvm.KVM_IOCTLS) - set(uffd.UFFD_IOCTLS)
    # each of ours in these families is either in 6.1 or a known newer name
    assert missing_in_61 <= NEWER_NAMES, missing_in_61 - NEWER_NAMES
    # and the reverse: every KVM_CAP_/KVM_EXIT_/UFFD_FEATURE_/UFFD_EVENT_/UFFDIO_* the header has, we have
    for prefix in ("KVM_CAP_", "KVM_EXIT_", "UFFD_FEATURE_", "UFFD_EVENT_", "UFFDIO_", "_UFFDIO_", "UFFD_PAGEFAULT_FLAG_"):
        theirs = {n for n in header_macros if n.startswith(prefix)}
        assert theirs - set(consts) == set(), (prefix, theirs - set(consts))
