"""report.md of a suite run: the headline ratios (each baseline against ssegw, measured in
the same run), one row per measured window, the Locust statistics, and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _windows(run: dict[str, Any]) -> list[dict[str, Any]]:
    res = run.get("result")
    if not res:
        return []
    return res["steps"] if "steps" in res else [res]


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def headline(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per target: the figures the report compares."""
    out: dict[str, dict[str, Any]] = {}
    for r in doc.get("runs", []):
        h = out.setdefault(r["target"], {})
        ws = _windows(r)
        h["foreign_max"] = max([h.get("foreign_max", 0.0)] + [w["cpu"]["foreign_pct"] for w in ws if "cpu" in w])
        if r["group"] == "rates":
            good = [w for w in ws if w.get("verdict") == "ok"]
            for w in ws:
                h[f"p99_at_{w['rate']:g}"] = w["latency"].get("p99_ms")
            h["best_rate"] = max((w["rate"] for w in good), default=None)
            h["best_delivered"] = max((w["delivered_per_s"] for w in good), default=None)
        elif r["group"] == "subs" and ws:
            m = r.get("server_rss_open_mib") or {}
            if r["users"] >= h.get("subs_users", 0):
                h["subs_users"] = r["users"]
                h["subs_delivered"] = ws[0]["delivered_per_s"]
                h["subs_p99"] = ws[0]["latency"].get("p99_ms")
                if m.get("conns"):
                    h["rss_per_stream_kib"] = round((m["with_users"] - m["start"]) * 1024 / m["conns"], 2)
        elif r["group"] == "directed" and ws:
            h["directed_p99"] = ws[0]["latency"].get("p99_ms")
        elif r["group"] == "storm" and ws:
            tl = ws[0].get("timeline") or []
            h["storm_p99_max"] = max((p["p99_ms"] for p in tl if p["p99_ms"] is not None), default=None)
    return out


def rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, key) of the headline rows, labelled with the sizes the run used."""
    def first(group: str) -> dict[str, Any]:
        return next((r for r in doc.get("runs", []) if r["group"] == group and r["target"] == "ssegw"), {})

    rates, subs = first("rates"), [r for r in doc.get("runs", []) if r["group"] == "subs"]
    out = [(f"p99 latency (ms), {rates.get('users', 0):,} subscribers × {w['rate']:g} msg/s", f"p99_at_{w['rate']:g}")
           for w in _windows(rates)]
    out += [(f"highest passing rate, {rates.get('users', 0):,} subscribers (msg/s)", "best_rate"),
            ("delivered events/s at that rate", "best_delivered")]
    if subs:
        out += [(f"delivered events/s, {max(r['users'] for r in subs):,} subscribers × {subs[0]['rate']:g} msg/s",
                 "subs_delivered"), ("p99 there (ms)", "subs_p99"),
                ("server RSS per open stream there (KiB)", "rss_per_stream_kib")]
    out += [(f"directed p99, {first('directed').get('users', 0):,} per-user topics (ms)", "directed_p99"),
            ("worst p99 of a 0.5 s interval through the storm (ms)", "storm_p99_max"),
            ("most CPU other processes took in a window (%)", "foreign_max")]
    return out


def write(out: Path, doc: dict[str, Any], pngs: list[Path]) -> Path:
    code = doc.get("code", {})
    sc = doc.get("server_code") or {}
    if sc.get("commit"):
        commit = f"{sc['commit']} (servers run from a git archive of it), ssegw sources hash `{sc.get('ssegw_sha256')}`"
    else:
        commit = (f"{code.get('head', '?')}{' with uncommitted changes under ssegw/' if code.get('ssegw_dirty') else ''}"
                  f" (working tree), ssegw sources hash `{code.get('ssegw_sha256')}`")
    lines = [f"# `{doc.get('suite')}` run of {doc.get('at', '')[:16]}", "",
             f"- command: `{doc.get('command')}` (from the repository root)",
             f"- ssegw measured: commit {commit}; bench code at `{code.get('head')}`",
             f"- machine: {doc.get('machine', {}).get('cpus')} cores, Python {doc.get('machine', {}).get('python')}, "
             f"load average before {[round(x, 2) for x in doc.get('machine', {}).get('load_avg', [])]}; "
             "server on core 0, clients on core 1",
             f"- took {doc.get('elapsed_s')} s; failed: {len(doc.get('failed', []))}", ""]
    for f in doc.get("failed", []):
        lines.append(f"  - {f}")
    if doc.get("failed"):
        lines.append("")
    h = headline(doc)
    targets = [t for t in ("ssegw", "sse-starlette", "aiohttp-sse") if t in h]
    if len(targets) > 1:
        lines += ["## Headline: each baseline against ssegw, same run", "",
                  "| figure | " + " | ".join(targets) + " | " + " | ".join(f"{t} / ssegw" for t in targets[1:]) + " |",
                  "|---|" + "---:|" * (2 * len(targets) - 1)]
        for label, key in rows(doc):
            vals = [h[t].get(key) for t in targets]
            base = vals[0]
            ratios = [f"{v / base:.2f}×" if isinstance(v, (int, float)) and isinstance(base, (int, float)) and base
                      and key != "foreign_max" else "–" for v in vals[1:]]
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " | " + " | ".join(ratios) + " |")
        lines += ["", "Ratios are baseline / ssegw: above 1 means the baseline's figure is larger (worse for "
                  "latency and memory, better for events/s).  A rate sweep stops after the first rate that "
                  "fails the verdict (loss, p99 > 2 s, backlog, publisher short of its rate): '–' where a "
                  "target never ran that rate or never passed one.  Windows in which other processes took "
                  "more than 20 % CPU were measured again once; the least disturbed attempt is kept (last "
                  "column of the table below).", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    lines += ["## Every window", "",
              "| group | scenario | target | users | msg/s | delivered/s | lost | gaps/dups | p50 ms | p99 ms | "
              "server CPU % | others' CPU % | verdict |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc.get("runs", []):
        if "error" in r:
            lines.append(f"| {r['group']} | {r['scenario']} | {r['target']} | {r['users']} | {_fmt(r['rate'])} | "
                         f"| | | | | | | error: {r['error'][:80]} |")
        for w in _windows(r):
            lat = w.get("latency", {})
            cpu = w.get("cpu", {}).get("proc_pct", {}).get("server")
            foreign = w.get("cpu", {}).get("foreign_pct")
            v = w.get("verdict")
            lines.append(f"| {r['group']} | {r['scenario']} | {r['target']} | {r['users']} | {_fmt(w['rate'])} | "
                         f"{_fmt(w['delivered_per_s'])} | {_fmt(w['lost_events'])} | {w['seq_gaps']}/{w['seq_dups']} | "
                         f"{_fmt(lat.get('p50_ms'))} | {_fmt(lat.get('p99_ms'))} | {_fmt(cpu)} | {_fmt(foreign)} | "
                         f"{v if v == 'ok' else '; '.join(v)} |")
    loc = doc.get("locust")
    if loc:
        lines += ["", f"## Locust (bench/locustfile.py, {loc['users']} users, {loc['seconds']} s, against ssegw)", "",
                  f"`locust {' '.join(loc['args'])}` — exit code {loc['exit_code']}, verdict "
                  f"{loc['verdict'] if loc['verdict'] == 'ok' else '; '.join(loc['verdict'])}", "",
                  "| type | name | count | failures | median ms | p99 ms | max ms | per s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for s in loc.get("stats", []):
            lines.append(f"| {s['Type']} | {s['Name']} | {s['Request Count']} | {s['Failure Count']} | "
                         f"{_fmt(float(s['Median Response Time']), 0)} | {s['99%']} | {_fmt(float(s['Max Response Time']), 0)} | "
                         f"{_fmt(float(s['Requests/s']), 1)} |")
        for f in loc.get("failures", []):
            lines.append(f"\nfailure: {f.get('Method')} {f.get('Name')}: {f.get('Error')} × {f.get('Occurrences')}")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
