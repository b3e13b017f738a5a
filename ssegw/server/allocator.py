"""Which C allocator serves this process, and handing freed memory back to the system.

Python's own allocator (pymalloc) takes memory in 1 MiB arenas and returns an arena only when
every object in it is gone.  After a burst of connections (a flood), the arenas the burst
needed stay: the objects that keep living -- events in history, timers, counters -- settle in
their free space (tuning.md "A connection flood").  jemalloc, with ``PYTHONMALLOC=malloc``,
returns free pages by the page: the systemd unit (``systemd/ssegw.service``) preloads it.
``PYTHONMALLOC=malloc`` on glibc's malloc alone fragments more than pymalloc does (measured),
so the gateway warns about that combination.

:func:`release` is what a worker calls once a burst has closed: glibc's ``malloc_trim(0)``
(free pages from anywhere in glibc's heap) and, under jemalloc, a purge of every arena
(instead of waiting for its decay, 10 s by default).
"""

from __future__ import annotations

import ctypes
import os

#: jemalloc's MALLCTL_ARENAS_ALL: ``arena.<i>.purge`` for every arena.
_ARENAS_ALL = 4096


def _symbols() -> tuple[object | None, object | None]:
    try:
        lib = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no dynamic loader (not Linux)
        return None, None
    trim = getattr(lib, "malloc_trim", None)  # glibc; absent on musl
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    mallctl = getattr(lib, "mallctl", None)  # jemalloc, when it is loaded (LD_PRELOAD)
    if mallctl is not None:
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        mallctl.restype = ctypes.c_int
    return trim, mallctl


_trim, _mallctl = _symbols()


def jemalloc_version() -> str | None:
    """jemalloc's version when it serves this process's ``malloc``, else None."""
    if _mallctl is None:
        return None
    v = ctypes.c_char_p()
    size = ctypes.c_size_t(ctypes.sizeof(v))
    if _mallctl(b"version", ctypes.byref(v), ctypes.byref(size), None, 0) != 0 or v.value is None:  # type: ignore[operator]
        return None
    return v.value.decode("ascii", "replace").split("-", 1)[0]


def describe() -> tuple[str, str | None]:
    """(what allocates Python's objects, a warning or None) for the startup log."""
    je = jemalloc_version()
    pymalloc = os.environ.get("PYTHONMALLOC", "") not in ("malloc", "malloc_debug")
    if pymalloc:
        return ("pymalloc" + (f" (jemalloc {je} loaded, not used for Python objects: set PYTHONMALLOC=malloc)"
                              if je else "")), None
    if je:
        return f"jemalloc {je} (PYTHONMALLOC=malloc)", None
    return "C malloc (PYTHONMALLOC=malloc)", (
        "PYTHONMALLOC=malloc without jemalloc: glibc's malloc keeps more memory after a burst of "
        "connections than Python's own allocator (tuning.md \"A connection flood\"); preload "
        "libjemalloc.so.2 or unset PYTHONMALLOC")


def release() -> None:
    """Hand freed memory back to the system (after a burst has closed)."""
    if _trim is not None:
        _trim(0)  # type: ignore[operator]
    if _mallctl is not None:
        _mallctl(b"arena.%d.purge" % _ARENAS_ALL, None, None, None, 0)  # type: ignore[operator]
