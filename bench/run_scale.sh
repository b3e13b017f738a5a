#!/usr/bin/env bash
# The scale-out runs of issue 3 at full size, once each (about 30-40 minutes on the 2-core
# machine, more if other work on the machine forces re-measurements).  Results: one JSON line
# per run on stdout, appended to bench/results/scale_<command>.jsonl.  The gateway runs from a
# `git archive` snapshot of HEAD (--code HEAD), not from the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY bench/scale.py workers --workers 1 2 4 --subs 10000 --server-core 0   # same CPU budget: all on core 0
$PY bench/scale.py workers --workers 2 4 --subs 10000                     # workers on both cores (clients' too)
$PY bench/scale.py rediscost --subs 10000 --rates 100 1000                # one worker: memory vs Redis
$PY bench/scale.py rediscost --subs 1000 --rates 100 1000                 # ... with the server core not saturated
$PY bench/scale.py capacity --conns 60000 --procs 4 --workers 4 --topic idle        # 60k idle, one topic
$PY bench/scale.py capacity --conns 60000 --procs 4 --workers 4 --topic 'user.{i}'  # 60k idle, a topic each
$PY bench/scale.py capacity --conns 150000 --procs 8 --workers 10 --hold 60 --heartbeat 15s \
    --client-core 0,1 --sample-every 0.5 --quiet-wait 0                         # 150k idle over 10 workers
