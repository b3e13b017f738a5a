"""ssegw.server.allocator: which allocator serves the process, and the release after a burst.

Each case runs a fresh interpreter (the allocator is chosen before Python starts: LD_PRELOAD
and PYTHONMALLOC), asks ``describe()`` and calls ``release()`` there.  jemalloc comes with
Debian's redis-server package (libjemalloc2); without it those cases are skipped.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

JEMALLOC = "libjemalloc.so.2"
PROBE = ("import json; from ssegw.server import allocator as a; w, warn = a.describe(); a.release(); "
         "print(json.dumps([w, warn, a.jemalloc_version()]))")


def have_jemalloc() -> bool:
    # Not dlopen()ed here: jemalloc loaded late into a running process may fail (static TLS).
    return ctypes.util.find_library("jemalloc") is not None


def probe(**env: str) -> list:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


def test_pymalloc_by_default() -> None:
    what, warning, je = probe()
    assert what == "pymalloc" and warning is None and je is None
    # The unit's variables overridden as the README says (a drop-in without libjemalloc2).
    assert probe(LD_PRELOAD="", PYTHONMALLOC="pymalloc") == ["pymalloc", None, None]


def test_malloc_without_jemalloc_is_warned_about() -> None:
    what, warning, je = probe(PYTHONMALLOC="malloc")
    assert what == "C malloc (PYTHONMALLOC=malloc)" and je is None
    assert "without jemalloc" in warning and "libjemalloc.so.2" in warning


@pytest.mark.skipif(not have_jemalloc(), reason="libjemalloc2 is not installed")
def test_jemalloc_preloaded_is_named_and_purged() -> None:
    what, warning, je = probe(LD_PRELOAD=JEMALLOC, PYTHONMALLOC="malloc")
    assert je and je[0].isdigit()
    assert what == f"jemalloc {je} (PYTHONMALLOC=malloc)" and warning is None
    # Loaded but not serving Python's objects: said so.
    what, warning, _ = probe(LD_PRELOAD=JEMALLOC)
    assert what.startswith("pymalloc (jemalloc") and "PYTHONMALLOC=malloc" in what and warning is None


def test_the_gateway_logs_its_allocator() -> None:
    from harness import Gateway

    with Gateway(env={"PYTHONMALLOC": "malloc"}) as g:
        pass
    log = "".join(g.log)
    assert "memory allocator: C malloc (PYTHONMALLOC=malloc)" in log
    assert "without jemalloc" in log
