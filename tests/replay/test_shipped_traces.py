"""Every shipped trace in ``traces/`` replays in ``verify`` mode on the fake with no divergence,
runs deterministically, and holds the faults and REMOVE events ``traces/README.md`` claims.

A failure here means the engine (or the fake) now makes different kernel calls than when the
trace was recorded: a regression, or an intended change that needs ``python -m tools.make_traces``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.det import check_trace_determinism
from replay.format import open_trace
from replay.verify import verify
from tools.make_traces import TRACES as SPECS
from tools.make_traces import trace_counts

TRACES = sorted((Path(__file__).resolve().parents[2] / "traces").glob("*.trace"))
#: the one kind of trace without faults (its vCPUs never run; traces/README.md says so)
IDLE_HAS_NO_FAULTS = "idle"


def _deterministic(p: Path) -> bool:
    with open_trace(p) as r:
        return "deterministic" in (r.header.extra or {})


def test_traces_are_shipped() -> None:
    names = {p.name for p in TRACES}
    assert any(n.startswith("real-uffd-missing") for n in names)
    assert any(n.startswith("real-uffd-minor") for n in names)
    assert any(n.startswith("fake-") and "balloon" in n for n in names)
    assert {f"{s.name}.trace" for s in SPECS} <= names, "a trace of tools.make_traces is missing"
    for p in TRACES:
        if _deterministic(p):  # a synthetic trace: the destination only, by design
            assert p.name.startswith("fake-"), p.name
        else:
            assert Path(str(p) + ".source").exists(), f"{p.name} has no source side"
        size = p.stat().st_size
        assert size < 40 * 1024, f"{p.name}: {size} bytes"


@pytest.mark.parametrize("trace", TRACES, ids=[p.stem for p in TRACES])
def test_shipped_trace_has_the_faults_it_claims(trace: Path) -> None:
    """Every trace but the idle one has faults; the balloon ones have REMOVE events (and the
    README says so, with the same counts)."""
    _, faults, removes = trace_counts(trace)
    if IDLE_HAS_NO_FAULTS in trace.stem:
        assert faults == 0  # the vCPUs never run: the README says so
    else:
        assert faults > 0
    if "balloon" in trace.stem:
        assert removes > 0
    else:
        assert removes == 0
    row = next(
        (line for line in (trace.parent / "README.md").read_text().splitlines()
         if line.startswith(f"| `{trace.stem}` |")), None,
    )  # fmt: skip
    assert row is not None, f"traces/README.md does not describe {trace.stem}"
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-2:] == [str(faults), str(removes)], row


@pytest.mark.slow
@pytest.mark.parametrize("trace", TRACES, ids=[p.stem for p in TRACES])
def test_shipped_trace_verifies_on_the_fake(trace: Path, tmp_path: Path) -> None:
    with open_trace(trace) as r:
        header = r.header
        n = sum(1 for _ in r)
        assert r.complete, r.stopped_at
    assert n > 0 and header.argv
    res = verify(str(trace), workdir=str(tmp_path))
    assert res.ok, res.report()


@pytest.mark.slow
@pytest.mark.parametrize("trace", TRACES, ids=[p.stem for p in TRACES])
def test_shipped_trace_is_deterministic(trace: Path) -> None:
    """The trace's migration, run under the seeded scheduler, gives one outcome every time
    (CI runs 5; ``fakekvm replay --check-determinism -n 20`` is the full check)."""
    outs = check_trace_determinism(str(trace), n=5, seed=1)
    assert outs[0].failure is None, outs[0].failure
    assert len({o.key() for o in outs}) == 1
