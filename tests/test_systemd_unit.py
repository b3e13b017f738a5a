"""What ships for systemd hosts: the unit, the sysctl drop-in, the example config, the constraints.

- The unit passes ``systemd-analyze verify`` and rates <= 3.0 in ``systemd-analyze security
  --offline=yes``, checked on a copy whose commands point at this interpreter and whose config is
  a temporary copy of the example.  Nothing on the host is created or changed: verify does not
  resolve ``User=`` (the ``ssegw`` user need not exist) and neither command talks to a running
  systemd.  A deliberately broken copy shows that verify's silence means something.
- The unit's ExecStartPre (``check-config``) accepts the example config, and the numbers its
  comments tie to the gateway's defaults (stop timeout vs drain_timeout, LimitNOFILE vs
  max_connections, WatchdogSec vs worker_timeout, somaxconn vs the listen backlog) still hold.
- ``ssegw print-systemd`` (package data) prints exactly the repository's ``systemd/`` files.
- ``constraints.txt`` pins every runtime dependency, within pyproject's ranges.

Run as a script, it prints the pins of the runtime dependencies installed in this interpreter's
environment (the body of constraints.txt).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ssegw.config import Config, parse_duration
from ssegw.packaged import FILES, print_systemd
from ssegw.server.sockets import BACKLOG, FD_RESERVE

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "ssegw.service"
#: Paths the unit uses on a real host (README "Running under systemd").
HOST_BIN = "/opt/ssegw/bin/ssegw"
HOST_CONFIG = "/etc/ssegw/ssegw.toml"
#: The exposure score the unit must stay at or under ("OK" is below 4.0 on systemd's scale).
MAX_EXPOSURE = 3.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=30)


def _local_unit(tmp_path: Path, extra: str = "") -> Path:
    """The unit, pointed at this interpreter and a temporary copy of the example config."""
    config = tmp_path / "ssegw.toml"
    config.write_text((SYSTEMD / "ssegw.toml.example").read_text())
    text = UNIT.read_text()
    assert HOST_BIN in text and HOST_CONFIG in text
    text = text.replace(HOST_BIN, f"{sys.executable} -m ssegw").replace(HOST_CONFIG, str(config))
    if extra:
        text = text.replace("[Service]\n", f"[Service]\n{extra}\n", 1)
    unit = tmp_path / "ssegw.service"
    unit.write_text(text)
    return unit


def _directives(text: str, section: str = "Service") -> dict[str, list[str]]:
    """``Key=value`` lines of one section (no continuation lines in our files)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _one(key: str) -> str:
    values = _directives(UNIT.read_text())[key]
    assert len(values) == 1, key
    return values[0]


# -- systemd-analyze ----------------------------------------------------------------------------


@needs_analyze
def test_unit_verifies_clean(tmp_path):
    unit = _local_unit(tmp_path)
    r = _analyze("verify", "--man=no", str(unit))
    about_us = [line for line in (r.stdout + r.stderr).splitlines() if "ssegw" in line]
    assert r.returncode == 0 and not about_us, r.stdout + r.stderr


@needs_analyze
def test_verify_reports_a_broken_unit(tmp_path):
    # A misspelt directive is silently ignored by systemd at runtime: verify must say so, or
    # the clean result above proves nothing.
    unit = _local_unit(tmp_path, extra="Restrat=on-failure")
    r = _analyze("verify", "--man=no", str(unit))
    assert "Restrat" in r.stdout + r.stderr


@needs_analyze
def test_security_exposure_at_most_3(tmp_path):
    unit = _local_unit(tmp_path)
    r = _analyze("security", "--offline=yes", "--no-pager", str(unit))
    if "offline" in r.stderr and r.returncode != 0:
        pytest.skip(f"systemd-analyze has no --offline (systemd < 250): {r.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: ([0-9]+\.[0-9]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m[1]) <= MAX_EXPOSURE, r.stdout


# -- the unit against the gateway ---------------------------------------------------------------


def test_exec_start_pre_accepts_the_example_config(tmp_path):
    """The unit's own check-config line (its real CLI syntax) passes on the example."""
    pre = _directives(_local_unit(tmp_path).read_text())["ExecStartPre"]
    assert len(pre) == 1
    r = subprocess.run(shlex.split(pre[0]), capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "port = 8080" in r.stdout


def test_unit_commands_use_the_host_paths():
    service = _directives(UNIT.read_text())
    assert service["ExecStart"] == [f"{HOST_BIN} serve --config {HOST_CONFIG}"]
    assert service["ExecStartPre"] == [f"{HOST_BIN} check-config {HOST_CONFIG}"]
    # Reload re-checks the config first: a bad file fails `systemctl reload`, no SIGHUP is sent.
    assert service["ExecReload"] == [f"{HOST_BIN} check-config {HOST_CONFIG}", "/bin/kill -HUP $MAINPID"]


def test_jemalloc_is_preloaded_together_with_pythonmalloc():
    """Both or neither: PYTHONMALLOC=malloc without jemalloc is worse than Python's allocator."""
    env = _directives(UNIT.read_text())["Environment"]
    assert "LD_PRELOAD=libjemalloc.so.2" in env and "PYTHONMALLOC=malloc" in env


def test_stop_timeout_outlasts_the_drain():
    # drain_timeout + supervisor KILL_GRACE (5 s) + a worker's broker close (5 s), plus margin.
    assert parse_duration(_one("TimeoutStopSec")) >= Config().drain_timeout + 15


def test_open_files_limit_covers_max_connections():
    assert int(_one("LimitNOFILE")) >= Config().max_connections + FD_RESERVE + 256


def test_watchdog_outlasts_worker_replacement():
    # The supervisor kills a worker silent for worker_timeout and withholds WATCHDOG=1 meanwhile.
    worker_timeout = getattr(Config(), "worker_timeout", 30.0)  # 30 s: its default, where the key exists
    assert parse_duration(_one("WatchdogSec")) >= 2 * worker_timeout


def test_proc_keeps_what_metrics_read():
    # ProcSubset=pid hides /proc/stat; ProcessCollector then finds no boot time and reports no
    # process_* metric at all (no error, no log line).
    import ssegw.metrics

    if hasattr(ssegw.metrics, "ProcessCollector"):
        assert _directives(UNIT.read_text()).get("ProcSubset", ["all"]) == ["all"]


def test_somaxconn_covers_the_listen_backlog():
    values = _sysctl_settings()
    field = Config.__dataclass_fields__.get("backlog")
    backlog = field.default if field is not None else BACKLOG
    assert int(values["net.core.somaxconn"]) >= backlog


# -- sysctl drop-in -----------------------------------------------------------------------------


def _sysctl_settings(commented: bool = False) -> dict[str, str]:
    out = {}
    pattern = re.compile(r"(#\s*)?([a-z0-9_.-]+)\s*=\s*(.+)")
    for line in (SYSTEMD / "99-ssegw.conf").read_text().splitlines():
        m = pattern.fullmatch(line.strip())
        if m and (commented or not m[1]):
            out[m[2]] = m[3]
    return out


def test_sysctl_keys_exist():
    if not Path("/proc/sys/net/core").is_dir():
        pytest.skip("no /proc/sys/net here")
    settings = _sysctl_settings(commented=True)
    assert {"net.core.somaxconn", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_mem"} <= set(settings)
    for key in settings:
        assert Path("/proc/sys", key.replace(".", "/")).exists(), key


def test_sysctl_port_range_is_sane():
    lo, hi = map(int, _sysctl_settings()["net.ipv4.ip_local_port_range"].split())
    # Above the gateway's default ports; different parity, as the kernel prefers.
    assert 8081 < lo < hi <= 65535 and (lo + hi) % 2 == 1


def test_sysctl_does_not_lower_file_limits():
    # systemd raises fs.file-max and fs.nr_open to their maximum at boot; a value here lowers them.
    assert not {"fs.file-max", "fs.nr_open"} & set(_sysctl_settings())


# -- package data and the CLI -------------------------------------------------------------------


@pytest.mark.parametrize("what", sorted(FILES))
def test_packaged_text_is_the_repository_text(what):
    name, _ = FILES[what]
    assert print_systemd(what) == (SYSTEMD / name).read_text()


def test_packaged_unknown_name():
    with pytest.raises(ValueError, match="unit, sysctl, config"):
        print_systemd("units")


def test_cli_print_systemd():
    from ssegw.cli import build_parser

    if "print-systemd" not in build_parser().format_help():
        pytest.skip("ssegw print-systemd is not wired into cli.py yet")
    r = subprocess.run([sys.executable, "-m", "ssegw", "print-systemd", "unit"], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == UNIT.read_text(), r.stderr


# -- constraints.txt ----------------------------------------------------------------------------

#: The interpreter floor of requires-python: requirements whose marker is true only there (such
#: as redis's async-timeout below 3.11.3, e.g. Debian 12's 3.11.2) must be pinned too.
FLOOR_ENV = {"python_version": "3.11", "python_full_version": "3.11.0", "extra": ""}


def _runtime_closure() -> tuple[dict[str, str], dict[str, list[Requirement]], set[str]]:
    """(name -> installed version, name -> requirements naming it, names needed only on older 3.11)."""
    installed: dict[str, str] = {}
    required_by: dict[str, list[Requirement]] = {}
    floor_only: set[str] = set()
    todo = [(Requirement(r), frozenset[str]()) for r in md.requires("ssegw") or []]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, parent_extras = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None:
            envs = [{"extra": e} for e in parent_extras or {""}]
            if not any(req.marker.evaluate(env) for env in envs):
                if any(req.marker.evaluate({**FLOOR_ENV, **env}) for env in envs):
                    floor_only.add(name)
                continue
        required_by.setdefault(name, []).append(req)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        dist = md.distribution(req.name)
        installed[name] = dist.version
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return installed, required_by, floor_only - set(installed)


def _pins() -> dict[str, Requirement]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def test_constraints_pin_the_runtime_closure():
    installed, required_by, floor_only = _runtime_closure()
    pins = _pins()
    assert set(installed) | floor_only == set(pins), "regenerate: python tests/test_systemd_unit.py"
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        for req in required_by.get(name, []):
            assert Version(spec.version) in req.specifier, f"{pin} is outside {req}"
        if name in floor_only:
            assert pin.marker is not None and pin.marker.evaluate(FLOOR_ENV), pin


def render_constraints() -> str:
    installed, _, floor_only = _runtime_closure()
    lines = [f"{name}=={version}" for name, version in sorted(installed.items())]
    lines += [f"# {name}: needed only on older Python 3.11 -- pin it by hand with its marker" for name in sorted(floor_only)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_constraints())
