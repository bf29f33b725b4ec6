"""script/bench: latency and throughput of the server as Home Assistant meets it.

A script, not a test: it measures and reports, and asserts nothing about speed.
Every figure comes from a real Wyoming client over a real socket, timed the way
Home Assistant waits (docs/benchmarks.md defines them). The modules:

- workloads: the replies, cases (a)-(c) and the concurrency sweep;
- client: the Wyoming client and the clock it reads;
- backends: what runs in this process (the fake, Turbo with forced lengths,
  the server) and the recorder that times the backend's calls;
- stats, targets: summaries of the samples, and the targets beside them;
- report: the printed tables; runs: the run files under docs/bench-runs/ and the
  latest figures in docs/benchmarks.md; machine: what ran them;
- cli: the command line (script/bench runs `python -m benchmark`).

Importing the package puts the repository first on sys.path (the bench measures
this tree's server) and keeps Hugging Face offline and its progress bars off.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
