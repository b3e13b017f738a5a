#!/usr/bin/env bash
# The full-size runs, once each (about 20-30 minutes on the 2-core machine, more if other
# work on the machine forces re-measurements).  Results: one JSON line per command on
# stdout and appended to bench/results/<command>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY bench/selftest.py
$PY bench/run.py rss --conns 1000 15000
for r in 10 100 1000; do
  $PY bench/run.py fanout --subs 10000 --rate "$r" --duration 20
done
$PY bench/run.py maxrate --subs 10000
$PY bench/run.py directed --topics 10000 --rate 2000 --duration 20
