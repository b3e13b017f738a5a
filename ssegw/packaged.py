"""The files shipped for running ssegw as a systemd service and behind a proxy, as ``ssegw
print-systemd`` and ``ssegw print-proxy`` print them.

Strategy: one source of truth.  The canonical files live in the repository's ``systemd/`` and
``deploy/proxy/`` directories (where the README points); ``ssegw/data/`` holds symlinks to them,
which building a wheel turns into copies, so an installed gateway can print exactly the unit,
sysctl drop-in, example config and front-end recipes it was released with -- an operator
installing from a wheel has no checkout.  ``tests/test_systemd_unit.py`` and
``tests/test_frontends.py`` check that what this module returns is the repository's text.

No I/O beyond reading package data, no logging: the caller writes the text where it wants.
"""

from __future__ import annotations

from importlib import resources

#: what -> (file in ssegw/data, where the README installs it).
FILES: dict[str, tuple[str, str]] = {
    "unit": ("ssegw.service", "/etc/systemd/system/ssegw.service"),
    "sysctl": ("99-ssegw.conf", "/etc/sysctl.d/99-ssegw.conf"),
    "config": ("ssegw.toml.example", "/etc/ssegw/ssegw.toml"),
}


def print_systemd(what: str) -> str:
    """The text of one shipped file, for ``ssegw print-systemd WHAT``.

    Args:
        what: ``"unit"`` (ssegw.service), ``"sysctl"`` (99-ssegw.conf) or ``"config"``
            (ssegw.toml.example).

    Returns:
        The file's text, unchanged (paths in it are the README's: /opt/ssegw, /etc/ssegw).

    Raises:
        ValueError: ``what`` is none of those; the message lists them.
    """
    return _read("print-systemd", FILES, what)


#: Front-end recipes: name -> (file in ssegw/data, where the recipe's header installs it).
PROXIES: dict[str, tuple[str, str]] = {
    "nginx": ("nginx.conf", "/etc/nginx/conf.d/ssegw.conf"),
    "haproxy": ("haproxy.cfg", "/etc/haproxy/ssegw.cfg"),
    "haproxy-xff": ("haproxy-xff.cfg", "/etc/haproxy/ssegw.cfg"),
    "caddy": ("Caddyfile", "/etc/caddy/Caddyfile"),
}


def print_proxy(which: str) -> str:
    """The text of one shipped front-end recipe, for ``ssegw print-proxy WHICH``.

    Args:
        which: ``"nginx"`` (HTTP/2 + TLS, X-Forwarded-For), ``"haproxy"`` (HTTP/2 + TLS, PROXY
            protocol v2), ``"haproxy-xff"`` (the same with X-Forwarded-For) or ``"caddy"``.

    Returns:
        The recipe's text, unchanged (its names and paths are examples: sse.example.com,
        127.0.0.1:8080, certificates under /etc).

    Raises:
        ValueError: ``which`` is none of those; the message lists them.
    """
    return _read("print-proxy", PROXIES, which)


def _read(command: str, table: dict[str, tuple[str, str]], key: str) -> str:
    try:
        name, _ = table[key]
    except KeyError:
        raise ValueError(f"{command}: expected one of {', '.join(table)}, got {key!r}") from None
    return (resources.files("ssegw") / "data" / name).read_text(encoding="utf-8")
