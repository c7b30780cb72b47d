"""``fakekvm trace plot T -o out.png``: a fault timeline and the fault-latency CDF.

Left: one dot per fault at (time observed, vCPU) — or (time, guest-physical address) with
``y="gpa"`` — coloured by how it was resolved (copy, continue, zeropage, wake, rerun, ...).
Right: the empirical CDF of fault latency, log-scaled in µs.

matplotlib is optional (not a runtime dependency of fakekvm): it is imported lazily with the
non-interactive Agg backend, and a missing matplotlib is a clear `PlotError`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

from replay.events import Event, Fault, Header


class PlotError(RuntimeError):
    """The plot cannot be made (matplotlib missing, nothing to plot)."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotError(
            "trace plot needs matplotlib (pip install matplotlib); it is not a dependency "
            f"of fakekvm ({e})"
        ) from None
    return plt


def plot_trace(
    header: Header, events: Iterable[Event], out: str, *, y: str = "vcpu", title: str = ""
) -> int:
    """Write the PNG to ``out``; returns the number of faults plotted."""
    if y not in ("vcpu", "gpa"):
        raise ValueError(f"y must be 'vcpu' or 'gpa', not {y!r}")
    plt = _pyplot()
    series: dict[str, tuple[array[float], array[float]]] = {}
    lat = array("d")
    t0: int | None = None
    n = 0
    for ev in events:
        if not isinstance(ev, Fault):
            continue
        n += 1
        if t0 is None:
            t0 = ev.observed_ns
        xs, ys = series.setdefault(ev.how or "unresolved", (array("d"), array("d")))
        xs.append((ev.observed_ns - t0) / 1e6)
        ys.append(float(ev.vcpu if y == "vcpu" else (ev.gpa if ev.gpa >= 0 else ev.hva)))
        if ev.resolved_ns and ev.resolved_ns >= ev.observed_ns:
            lat.append(max((ev.resolved_ns - ev.observed_ns) / 1000, 1e-3))
    if n == 0:
        raise PlotError("the trace has no faults to plot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        for how, (xs, ys) in sorted(series.items()):
            ax1.scatter(list(xs), list(ys), s=4, label=f"{how} ({len(xs)})")
        ax1.set_xlabel("time (ms)")
        ax1.set_ylabel("vCPU" if y == "vcpu" else "guest-physical address")
        if y == "vcpu":
            top = max(max(ys) for _xs, ys in series.values())
            ax1.set_yticks(range(-1 if min(min(ys) for _x, ys in series.values()) < 0 else 0,
                                 int(top) + 1))  # fmt: skip
            ax1.set_ylim(-1.5 if ax1.get_yticks()[0] < 0 else -0.5, top + 0.5)
        ax1.set_title("faults")
        ax1.legend(loc="best", fontsize="small")
        if lat:
            s = sorted(lat)
            ax2.step(s, [(i + 1) / len(s) for i in range(len(s))], where="post")
            ax2.set_xscale("log")
        ax2.set_xlabel("fault latency (µs)")
        ax2.set_ylabel("fraction of faults")
        ax2.set_title("latency CDF")
        ax2.grid(True, which="both", alpha=0.3)
        fig.suptitle(title or f"{header.kernel or '?'} {header.mechanism or ''} "
                     f"{header.guest or ''} {header.uuid[:8]}".strip())  # fmt: skip
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return n
