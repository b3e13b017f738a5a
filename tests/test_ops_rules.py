"""Operations artefacts: the Prometheus alert rules, their unit tests, the Grafana dashboard and
the runbook are checked against each other and against a running gateway.

- ``promtool check rules`` and ``promtool test rules`` pass (skipped without ``promtool``:
  ``apt-get install prometheus``; ``.ci/run`` installs it).
- Every alert has a promtool test in which it fires and one in which it stays quiet, a severity,
  a summary, a description and a ``runbook_url`` whose anchor is a section of docs/runbook.md
  (and every alert section there belongs to a rule).
- The dashboard is importable (a ``${DS_PROMETHEUS}`` input, unique ids, no overlapping panels)
  and its expressions parse as PromQL.
- Every metric name the rules and the dashboard use is exposed by a real gateway's ``/metrics``
  (after a publish reached a subscriber, so the histograms have samples).

No YAML library is needed: the two YAML files are read with the small line-based readers below,
which rely on the layout those files keep (one ``- alert:`` per rule, ``expr:`` inline or as a
``|`` block, ``alertname:`` followed by ``exp_alerts:`` in the tests).  promtool parses them for
real; the readers only pick out names, so a layout they do not understand makes the coverage
test fail loudly, not pass quietly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "ssegw-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "ssegw-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ssegw-dashboard.json"
RUNBOOK = ROOT / "docs" / "runbook.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; .ci/run installs it)")

SEVERITIES = {"critical", "warning", "info"}
#: Series Prometheus makes itself, never exposed by a target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
#: What the dashboard must show (the panels the ops brief asks for), by metric name.
DASHBOARD_MUST_USE = {
    "ssegw_connections_open", "ssegw_streams_open", "ssegw_events_published_total", "ssegw_events_delivered_total",
    "ssegw_delivery_lag_seconds_bucket", "ssegw_publish_duration_seconds_bucket", "ssegw_flush_delay_seconds_bucket",
    "ssegw_slow_consumer_closed_total", "ssegw_refused_total", "ssegw_auth_failures_total", "ssegw_broker_up",
    "ssegw_broker_errors_total", "ssegw_workers", "ssegw_worker_restarts_total", "ssegw_watchdog_misses_total",
    "ssegw_event_loop_lag_seconds_bucket", "process_cpu_seconds_total", "process_resident_memory_bytes",
}


# -- reading the rule files ----------------------------------------------------------------------

def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return json.loads(v)
    if len(v) >= 2 and v[0] == v[-1] == "'":
        return v[1:-1].replace("''", "'")
    return v


def read_rules(text: str) -> list[dict[str, str]]:
    """Each ``- alert:`` rule as a flat dict of its scalar fields (``expr`` with blocks joined)."""
    lines = text.splitlines()
    rules: list[dict[str, str]] = []
    cur: dict[str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)- alert:\s*(\S+)\s*$", line)
        if m:
            cur = {"alert": m.group(2)}
            rules.append(cur)
            i += 1
            continue
        m = re.match(r"^(\s*)([a-z_]+):\s*(.*)$", line)
        if cur is not None and m and not line.lstrip().startswith("#"):
            indent, key, value = len(m.group(1)), m.group(2), m.group(3).strip()
            if value in ("|", ">", "|-", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                cur[key] = " ".join(b for b in block if b)
                continue
            if value:
                cur[key] = _unquote(value)
        i += 1
    return rules


def read_rule_tests(text: str) -> dict[str, dict[str, int]]:
    """alertname -> {"fires": n, "quiet": n}: how many evaluations expect it, or expect nothing."""
    out: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^\s*alertname:\s*(\S+)\s*\n\s*exp_alerts:[ \t]*(\[\])?[ \t]*\n(\s*- exp_labels:)?",
                         text, re.M):
        counts = out.setdefault(m.group(1), {"fires": 0, "quiet": 0})
        if m.group(2):
            counts["quiet"] += 1
        elif m.group(3):
            counts["fires"] += 1
    return out


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# -- reading PromQL --------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels, durations, keywords and
    Grafana variables stripped)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                   # strings (label values)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", " ", e)                      # Grafana variables
    e = re.sub(r"\{[^}]*\}", " ", e)                                 # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                # ranges, subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()", e):
        if m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, nested rows included."""
    out = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out


def dashboard_template_metrics(dash: dict) -> set[str]:
    names = set()
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.match(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)", q)
        if m:
            names.add(m.group(1))
        elif q.strip().startswith("query_result("):
            names |= metric_names(q.strip()[len("query_result("):-1])
    return names


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition offers: samples, and declared families (a labelled
    counter that has not counted yet has only its ``# TYPE``), histograms with their
    ``_bucket``/``_sum``/``_count``."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def used_names() -> dict[str, set[str]]:
    """metric name -> where it is used ("rule X", "panel Y")."""
    used: dict[str, set[str]] = {}
    for r in read_rules(RULES.read_text()):
        for n in metric_names(r["expr"]):
            used.setdefault(n, set()).add(f"rule {r['alert']}")
    dash = json.loads(DASHBOARD.read_text())
    for title, expr in dashboard_exprs(dash):
        for n in metric_names(expr):
            used.setdefault(n, set()).add(f"panel {title!r}")
    for n in dashboard_template_metrics(dash):
        used.setdefault(n, set()).add("dashboard variable")
    return used


# -- the readers themselves ------------------------------------------------------------------------

def test_metric_names_reader() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{job=~"$job"}'
                        '[$__rate_interval])))') == {"a_bucket"}
    assert metric_names("x / ignoring (reason) group_left () (sum without (reason) (rate(y[5m])) + z)"
                        " > 0.25 and rate(y[5m]) > 1e-3") == {"x", "y", "z"}
    assert metric_names('max by (job) (up{job="ssegw"}) == 0 or absent(up{job="ssegw"})') == {"up"}
    assert metric_names("rate(a[5m] offset 1h) > bool 2 unless on (instance) b") == {"a", "b"}


def test_rule_readers() -> None:
    rules = read_rules(RULES.read_text())
    assert len(rules) >= 10
    for r in rules:
        assert r.get("expr"), f"{r['alert']}: no expr read"
    tests = read_rule_tests("alertname: A\n  exp_alerts: []\n- eval_time: 1m\n  alertname: B\n  exp_alerts:\n"
                            "    - exp_labels:\n")
    assert tests == {"A": {"fires": 0, "quiet": 1}, "B": {"fires": 1, "quiet": 0}}


# -- (a) (b) promtool --------------------------------------------------------------------------------

def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_rules() -> None:
    r = _promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(read_rules(RULES.read_text()))
    assert f"SUCCESS: {n} rules found" in r.stdout, r.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    r = _promtool("test", "rules", str(RULES_TEST.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


# -- (c) coverage and annotations -------------------------------------------------------------------

def test_every_rule_has_a_firing_and_a_quiet_test() -> None:
    alerts = [r["alert"] for r in read_rules(RULES.read_text())]
    assert len(alerts) == len(set(alerts)), "duplicate alert names"
    tests = read_rule_tests(RULES_TEST.read_text())
    missing = {a: tests.get(a, {"fires": 0, "quiet": 0}) for a in alerts
               if tests.get(a, {}).get("fires", 0) == 0 or tests.get(a, {}).get("quiet", 0) == 0}
    assert not missing, f"alerts without a firing and a quiet promtool test: {missing}"
    unknown = set(tests) - set(alerts)
    assert not unknown, f"tests of alerts that are not in the rules: {unknown}"


def test_rules_carry_severity_annotations_and_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    sections = {github_anchor(h): h for h in re.findall(r"^## (.+)$", runbook, re.M)}
    alerts = read_rules(RULES.read_text())
    for r in alerts:
        name = r["alert"]
        assert re.fullmatch(r"Ssegw[A-Z][A-Za-z]+", name), name
        assert re.fullmatch(r"\d+[smh]", r.get("for", "")), f"{name}: needs a for: duration"
        assert r.get("severity") in SEVERITIES, f"{name}: severity {r.get('severity')!r}"
        assert r.get("summary") and r.get("description"), f"{name}: summary and description"
        url = r.get("runbook_url", "")
        assert url == f"docs/runbook.md#{github_anchor(name)}", f"{name}: runbook_url {url!r}"
        assert sections.get(github_anchor(name)) == name, f"{name}: no '## {name}' section in docs/runbook.md"
    stale = {h for h in sections.values() if h.startswith("Ssegw")} - {r["alert"] for r in alerts}
    assert not stale, f"runbook sections without an alert: {stale}"


# -- the dashboard -----------------------------------------------------------------------------------

def test_dashboard_is_importable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 39
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    assert dash["uid"] and dash["title"]
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for v in dash["templating"]["list"]:
        assert v["datasource"] == ds, v["name"]
    ids: list[int] = []
    boxes: list[tuple[str, int, int, int, int]] = []
    for p in dash["panels"]:
        ids.append(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["w"], g["h"]))
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds, p["title"]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for i, (ta, xa, ya, wa, ha) in enumerate(boxes):
        for tb, xb, yb, wb, hb in boxes[i + 1:]:
            overlap = xa < xb + wb and xb < xa + wa and ya < yb + hb and yb < ya + ha
            assert not overlap, f"panels {ta!r} and {tb!r} overlap"
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs(dash)))
    assert DASHBOARD_MUST_USE <= used, f"dashboard lacks panels for {sorted(DASHBOARD_MUST_USE - used)}"


@needs_promtool
def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Every dashboard expression, with Grafana's variables filled in, is valid PromQL (checked by
    promtool as the expression of a recording rule)."""
    dash = json.loads(DASHBOARD.read_text())
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_exprs(dash)):
        e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
        e = re.sub(r"\$\{?(\w+)\}?", r"\1", e)
        rules += [f"      - record: dashboard:expr{i}", f"        expr: {json.dumps(e)}"]
    f = tmp_path / "dashboard-rules.yml"
    f.write_text("\n".join(rules) + "\n")
    r = _promtool("check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


# -- (d) every metric used exists -------------------------------------------------------------------

def test_every_metric_used_is_exposed(gateway) -> None:  # noqa: ANN001
    g = gateway("--flush-interval", "10ms", "--heartbeat-interval", "1s")
    with g.stream("/events?topic=ops.rules") as s:
        assert s.status == 200
        r = g.publish({"topic": "ops.rules", "data": "x"})
        assert r.status == 200, r
        assert len(s.wait_events(1)) == 1
        resp = g.request("GET", "/metrics", admin=True)
    assert resp.status == 200
    exposed = exposed_names(resp.body.decode())
    used = used_names()
    missing = {n: sorted(where) for n, where in used.items() if n not in exposed and n not in SYNTHETIC}
    assert not missing, "metrics used by the rules or the dashboard but not exposed by /metrics:\n" + "\n".join(
        f"  {n}: {', '.join(w)}" for n, w in sorted(missing.items()))
