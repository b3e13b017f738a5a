"""PNG plots of a suite run (matplotlib, Agg backend: no display needed).

``draw(out_dir, doc)`` reads the suite's JSON document (suite.py) and writes, next to it:

- ``latency_vs_rate.png``: p50 and p99 publish->receive latency vs publish rate (fan-out);
- ``delivered_vs_subscribers.png``: delivered events/s vs subscribers, with what was published;
- ``rss_vs_connections.png``: server RSS with N open streams (and the RSS per stream);
- ``flush_interval.png``: server CPU and p99 vs ``flush_interval`` (ssegw);
- ``storm_timeline.png``: open streams, events/s and p99 every 0.5 s through a connection storm.

``draw_capacity(out_dir, doc)`` does the same for one ``bench/scale.py capacity`` run:
``capacity_open.png`` (open streams and streams/s vs time while opening) and
``capacity_rss.png`` (gateway and client RSS vs open streams).

Each figure names the command, the commit and the date that produced it.  A plot whose data
is missing from the run is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"ssegw": "tab:blue", "sse-starlette": "tab:orange", "aiohttp-sse": "tab:green"}


def _runs(doc: dict[str, Any], group: str) -> list[dict[str, Any]]:
    return [r for r in doc.get("runs", []) if r.get("group") == group and "result" in r]


def _windows(run: dict[str, Any]) -> list[dict[str, Any]]:
    res = run["result"]
    return res["steps"] if "steps" in res else [res]


def _lat(w: dict[str, Any], key: str) -> float | None:
    v = (w.get("latency") or {}).get(key)
    return float(v) if v is not None else None


def measured_commit(doc: dict[str, Any]) -> str:
    """The commit whose ssegw the run measured (its snapshot, or the working tree's HEAD,
    marked "+dirty" when ssegw/ had uncommitted changes)."""
    sc = doc.get("server_code") or {}
    if sc.get("commit"):
        return str(sc["commit"])
    code = doc.get("code", {})
    return str(code.get("head", "?")) + ("+dirty" if code.get("ssegw_dirty") else "")


def _footer(fig: Any, doc: dict[str, Any]) -> None:
    commit = measured_commit(doc)
    fig.text(0.01, 0.005, f"{doc.get('command', '')} · commit {commit} · {doc.get('at', '')[:16]} · "
             f"{doc.get('machine', {}).get('cpus', '?')} cores", fontsize=7, color="0.4")


def _save(fig: Any, doc: dict[str, Any], path: Path) -> Path:
    _footer(fig, doc)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def latency_vs_rate(doc: dict[str, Any], out: Path) -> Path | None:
    runs = _runs(doc, "rates")
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        ws = [w for w in _windows(r) if _lat(w, "p99_ms") is not None]
        xs = [w["rate"] for w in ws]
        c = COLORS.get(r["target"])
        ax.plot(xs, [_lat(w, "p99_ms") for w in ws], "o-", color=c, label=f"{r['target']} p99")
        ax.plot(xs, [_lat(w, "p50_ms") for w in ws], "s--", color=c, alpha=0.6, label=f"{r['target']} p50")
        for w in ws:
            if w.get("verdict") != "ok":
                ax.annotate("fails", (w["rate"], _lat(w, "p99_ms")), fontsize=7, color=c)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("publish rate (messages/s, one topic)")
    ax.set_ylabel("publish → receive latency (ms)")
    ax.set_title(f"Fan-out latency vs publish rate, {runs[0]['users']} subscribers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, doc, out / "latency_vs_rate.png")


def _per_target(ax: Any, runs: list[dict[str, Any]], point: Any) -> dict[str, list[tuple[Any, ...]]]:
    """One line per target through ``point(run)`` = (x, y, ...), sorted by x; returns the points."""
    by: dict[str, list[tuple[Any, ...]]] = {}
    for r in runs:
        by.setdefault(r["target"], []).append(point(r))
    for t, pts in by.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS.get(t), label=t)
    return by


def delivered_vs_subscribers(doc: dict[str, Any], out: Path) -> Path | None:
    runs = _runs(doc, "subs")
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by = _per_target(ax, runs, lambda r: (r["users"], r["result"]["delivered_per_s"], r["result"]["expected_per_s"]))
    pts = max(by.values(), key=len)
    ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color="0.5", label="published × subscribers")
    ax.set_xlabel("subscribers (one topic)")
    ax.set_ylabel("delivered events/s")
    ax.set_title(f"Delivered events/s vs subscribers at {runs[0]['rate']:g} msg/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, doc, out / "delivered_vs_subscribers.png")


def rss_vs_connections(doc: dict[str, Any], out: Path) -> Path | None:
    runs = [r for r in doc.get("runs", []) if r.get("group") == "subs" and r.get("server_rss_open_mib")]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by = _per_target(ax, runs, lambda r: (r["server_rss_open_mib"]["conns"], r["server_rss_open_mib"]["with_users"],
                                          r["server_rss_open_mib"]["start"]))
    for t, pts in by.items():
        n, rss, base = pts[-1]
        if n:
            ax.annotate(f"{(rss - base) * 2**20 / n / 1024:.1f} KiB/stream", (n, rss), fontsize=7,
                        color=COLORS.get(t), xytext=(-60, 6), textcoords="offset points")
    ax.set_xlabel("open streams")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("Server memory vs connections (fresh server per point)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, doc, out / "rss_vs_connections.png")


def flush_interval(doc: dict[str, Any], out: Path) -> Path | None:
    runs = _runs(doc, "flush")
    if not runs:
        return None
    pts = []
    for r in runs:
        ms = float(r["server_args"][r["server_args"].index("--flush-interval") + 1].removesuffix("ms"))
        w = r["result"]
        pts.append((ms, w["cpu"]["proc_pct"].get("server"), _lat(w, "p99_ms")))
    pts.sort()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:red", label="server CPU %")
    ax.set_xlabel("flush_interval (ms)")
    ax.set_ylabel("server CPU (% of one core)", color="tab:red")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot([p[0] for p in pts], [p[2] for p in pts], "s-", color="tab:blue", label="p99 latency")
    ax2.set_ylabel("p99 latency (ms)", color="tab:blue")
    ax2.set_ylim(bottom=0)
    r0 = runs[0]
    ax.set_title(f"ssegw: CPU and p99 vs flush_interval ({r0['users']} subscribers, {r0['rate']:g} msg/s)")
    ax.grid(True, alpha=0.3)
    return _save(fig, doc, out / "flush_interval.png")


def storm_timeline(doc: dict[str, Any], out: Path) -> Path | None:
    runs = [r for r in _runs(doc, "storm") if r["result"].get("timeline")]
    if not runs:
        return None
    fig, axes = plt.subplots(3, 1, figsize=(7, 6.5), sharex=True)
    for r in runs:
        tl = r["result"]["timeline"]
        xs = [p["t_s"] for p in tl]
        c = COLORS.get(r["target"])
        axes[0].plot(xs, [p["streams_open"] for p in tl], color=c, label=r["target"])
        axes[1].plot(xs, [p["events_per_s"] if p["events_per_s"] is not None else float("nan") for p in tl], color=c)
        axes[2].plot(xs, [p["p99_ms"] if p["p99_ms"] is not None else float("nan") for p in tl], color=c)
    axes[0].set_ylabel("open streams")
    axes[1].set_ylabel("events/s to the\nsubscribers")
    axes[2].set_ylabel("p99 (ms), per 0.5 s")
    axes[2].set_xlabel("seconds since publishing started")
    r0 = runs[0]
    axes[0].set_title(f"Connection storm: {r0['result'].get('storm')} newcomers next to {r0['users']} "
                      f"subscribers at {r0['rate']:g} msg/s")
    axes[0].legend(fontsize=8)
    for a in axes:
        a.grid(True, alpha=0.3)
    return _save(fig, doc, out / "storm_timeline.png")


def capacity_timeline(doc: dict[str, Any], out: Path) -> Path | None:
    """``bench/scale.py capacity``: open streams (and streams/s) vs time while opening."""
    tl = doc.get("timeline") or []
    if len(tl) < 2:
        return None
    xs = [p["t_s"] for p in tl]
    ys = [p["streams_open"] for p in tl]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, ys, "o-", ms=3, color="tab:blue", label="open streams (/admin/stats, all workers)")
    ax.set_xlabel("seconds since the clients started")
    ax.set_ylabel("open streams")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    rx = [(a["t_s"] + b["t_s"]) / 2 for a, b in zip(tl, tl[1:], strict=False) if b["t_s"] > a["t_s"]]
    ry = [(b["streams_open"] - a["streams_open"]) / (b["t_s"] - a["t_s"])
          for a, b in zip(tl, tl[1:], strict=False) if b["t_s"] > a["t_s"]]
    ax2.plot(rx, ry, "-", color="tab:green", alpha=0.6, label="streams/s")
    ax2.set_ylabel("streams accepted per second", color="tab:green")
    ax2.set_ylim(bottom=0)
    mean = (doc.get("accept_rate") or {}).get("mean_5_95_per_s")
    ax.set_title(f"Opening {doc.get('connected') or ys[-1]:,} streams over {doc.get('workers')} workers"
                 + (f" (mean {mean:,}/s)" if mean else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, doc, out / "capacity_open.png")


def capacity_rss(doc: dict[str, Any], out: Path) -> Path | None:
    """``bench/scale.py capacity``: gateway RSS (all processes) and clients' RSS vs open streams."""
    tl = doc.get("timeline") or []
    if len(tl) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [p["streams_open"] for p in tl]
    ax.plot(xs, [p["rss_mib"] for p in tl], "o-", ms=3, color="tab:blue",
            label=f"gateway: supervisor + {doc.get('workers')} workers")
    ax.plot(xs, [p.get("clients_rss_mib") for p in tl], "s-", ms=3, color="tab:orange",
            label=f"clients: {doc.get('conditions', {}).get('procs')} processes")
    n = doc.get("connected") or xs[-1]
    ax.annotate(f"{doc.get('rss_per_conn_bytes', 0):,} B/stream marginal (settled)",
                (n, doc.get("rss_idle_mib", tl[-1]["rss_mib"])), fontsize=8, xytext=(-190, -16),
                textcoords="offset points")
    ax.set_xlabel("open streams")
    ax.set_ylabel("RSS (MiB), sampled while opening")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory vs connections (one run, sampled as the streams open)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, doc, out / "capacity_rss.png")


def draw_capacity(out: Path, doc: dict[str, Any]) -> list[Path]:
    """The plots of one ``bench/scale.py capacity`` run (its JSON document), into ``out``."""
    return [p for p in (capacity_timeline(doc, out), capacity_rss(doc, out)) if p is not None]


def draw(out: Path, doc: dict[str, Any]) -> list[Path]:
    made = []
    for fn in (latency_vs_rate, delivered_vs_subscribers, rss_vs_connections, flush_interval, storm_timeline):
        p = fn(doc, out)
        if p is not None:
            made.append(p)
    return made
