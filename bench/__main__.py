"""``python -m bench COMMAND``: the load-test entry point (from the repository root).

- ``run SCENARIO [-f FILE] [-u N] [-t 20s] [--rate R] [--target T]``: one scenario class of
  the high-scale engine (bench/scenarios.py, or your own file), headless, bounded in time;
- ``standard``: the standard suite (ssegw and the baselines), JSON, PNG plots and report.md
  in bench/results/<date>/ (about 12 minutes);
- ``smoke``: every scenario at a tiny size, the Locust file's included (well under a
  minute); exits 1 if any scenario lost or duplicated an event;
- ``report DIR``: redraw the plots and the report of a finished run from its JSON.

The older single-purpose scripts (``python bench/run.py ...`` and the others) are unchanged;
this file imports their modules the way they import each other (bench/ on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import engine  # noqa: E402
import suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    engine.add_run_parser(sub)
    suite.add_parsers(sub)
    args = ap.parse_args(argv)
    run_pin = __import__("run").pin_self
    run_pin()
    import uvloop

    if args.cmd == "run":
        return uvloop.run(engine.cmd_run(args))
    return suite.main(args)


if __name__ == "__main__":
    sys.exit(main())
