"""Every shipped trace in ``traces/`` replays in ``verify`` mode on the fake with no divergence.

A failure here means the engine (or the fake) now makes different kernel calls than when the
trace was recorded: a regression, or an intended change that needs ``python -m tools.make_traces``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.det import check_trace_determinism
from replay.format import open_trace
from replay.verify import verify

TRACES = sorted((Path(__file__).resolve().parents[2] / "traces").glob("*.trace"))


def test_traces_are_shipped() -> None:
    names = {p.name for p in TRACES}
    assert any(n.startswith("real-uffd-missing") for n in names)
    assert any(n.startswith("real-uffd-minor") for n in names)
    for p in TRACES:
        assert Path(str(p) + ".source").exists(), f"{p.name} has no source side"


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
